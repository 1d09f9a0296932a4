//! The manifest of a signed firmware release (`manifest.bin`, layout `fgota-m1`): what a device
//! reads in an update offer before it downloads a byte, and checks the image against after.
//!
//! Specified in `docs/spec/ota.md`. This module is the one implementation of the layout, shared
//! by the station (`fleet-provision release` encodes and signs it) and the device (decodes it
//! and decides whether to take the offer, [`Manifest::check_offer`]). It holds no cryptography:
//! a device verifies both signatures with the Ed25519 code its bootloader already links
//! (embassy-boot 0.7: ed25519-dalek or salty), so the SDK adds none.
//!
//! ```text
//! offset  size  field
//! 0       8     magic "fgota-m1"
//! 8       4     image size in bytes, u32 little endian, at least 1
//! 12      12    version: major, minor, patch, u32 little endian each
//! 24      12    min version: the oldest running version that may install it (0.0.0: any)
//! 36      32    board: 1-32 ASCII characters of [a-z0-9._-], then NUL bytes
//! 68      8     signing key id: the first 8 bytes of SHA-256 over the 32-byte public key
//! 76      64    image digest: SHA-512 of the image
//! 140     64    image signature: Ed25519 over the 64 digest bytes, exactly what embassy-boot's
//!               `verify_and_mark_updated(public_key, signature, image size)` checks
//! 204     64    manifest signature: Ed25519 over bytes 0..204, by the same key
//! 268           end
//! ```
//!
//! Why two signatures: embassy-boot authenticates the image bytes only. The version, the board
//! and the minimum version are what stop a broker (or anyone who can put a command on the
//! device's queue) from replaying an older signed image, or another board's, to the device: the
//! manifest signature makes them the station's words too. The two signed messages cannot be
//! taken for each other: one is 64 bytes long, the other 204.

use core::fmt;

/// First eight bytes of every manifest: the layout's name.
pub const MAGIC: [u8; 8] = *b"fgota-m1";
/// Bytes of an encoded manifest.
pub const MANIFEST_LEN: usize = 268;
/// Bytes the manifest signature covers (everything before it).
pub const SIGNED_LEN: usize = 204;
/// Longest board name.
pub const BOARD_MAX: usize = 32;
/// Bytes of a signing key id.
pub const KEY_ID_LEN: usize = 8;

const IMAGE_SIZE: usize = 8;
const VERSION_AT: usize = 12;
const MIN_VERSION_AT: usize = 24;
const BOARD_AT: usize = 36;
const KEY_ID_AT: usize = 68;
const DIGEST_AT: usize = 76;
const IMAGE_SIG_AT: usize = 140;

/// A release version, `MAJOR.MINOR.PATCH`, ordered as Semantic Versioning 2.0 orders versions
/// without pre-release tags. Pre-release and build tags are refused: a device compares three
/// numbers, nothing else.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Version {
    /// Incompatible changes.
    pub major: u32,
    /// Compatible features.
    pub minor: u32,
    /// Fixes.
    pub patch: u32,
}

/// Why a version string was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[non_exhaustive]
pub enum VersionError {
    /// Not three dot-separated numbers.
    Malformed,
    /// A number with a leading zero (`1.02.0`), which Semantic Versioning forbids.
    LeadingZero,
    /// A number above 4,294,967,295.
    TooLarge,
    /// A pre-release tag (`1.2.0-rc.1`): valid Semantic Versioning, not supported by devices.
    PreRelease,
    /// Build metadata (`1.2.0+abc`): it never orders versions, so two releases would tie.
    BuildMetadata,
}

impl fmt::Display for VersionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Malformed => "a version is MAJOR.MINOR.PATCH, three numbers (e.g. 1.2.0)",
            Self::LeadingZero => "a version number has no leading zero (Semantic Versioning)",
            Self::TooLarge => "a version number is at most 4294967295",
            Self::PreRelease => "pre-release versions (1.2.0-rc.1) are not supported: devices order MAJOR.MINOR.PATCH only",
            Self::BuildMetadata => "build metadata (1.2.0+build) is not supported: it does not order versions, two releases would tie",
        })
    }
}

impl core::error::Error for VersionError {}

impl Version {
    /// `0.0.0`: as a minimum version, any running version.
    pub const ZERO: Version = Version::new(0, 0, 0);

    /// `major.minor.patch`.
    pub const fn new(major: u32, minor: u32, patch: u32) -> Self {
        Self { major, minor, patch }
    }

    /// Parses `MAJOR.MINOR.PATCH` (Semantic Versioning 2.0 without pre-release or build tags).
    pub fn parse(s: &str) -> Result<Self, VersionError> {
        if s.contains('+') {
            return Err(VersionError::BuildMetadata);
        }
        if s.contains('-') {
            return Err(VersionError::PreRelease);
        }
        let mut parts = s.split('.');
        let mut next = || -> Result<u32, VersionError> {
            let p = parts.next().ok_or(VersionError::Malformed)?;
            if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) {
                return Err(VersionError::Malformed);
            }
            if p.len() > 1 && p.starts_with('0') {
                return Err(VersionError::LeadingZero);
            }
            p.parse().map_err(|_| VersionError::TooLarge)
        };
        let v = Version::new(next()?, next()?, next()?);
        if parts.next().is_some() {
            return Err(VersionError::Malformed);
        }
        Ok(v)
    }

    fn to_le(self) -> [u8; 12] {
        let mut out = [0u8; 12];
        out[0..4].copy_from_slice(&self.major.to_le_bytes());
        out[4..8].copy_from_slice(&self.minor.to_le_bytes());
        out[8..12].copy_from_slice(&self.patch.to_le_bytes());
        out
    }

    fn from_le(b: &[u8; 12]) -> Self {
        let n = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        Version::new(n(0), n(4), n(8))
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

/// The board a release is built for: 1 to 32 characters of `[a-z0-9._-]`, starting with a
/// letter or digit (e.g. `mps2-an386`, `nucleo-f429zi`). A device takes only its own board's
/// releases.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Board {
    bytes: [u8; BOARD_MAX],
    len: u8,
}

/// A board name that does not fit the rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct BoardError;

impl fmt::Display for BoardError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(
            "a board name is 1-32 characters of a-z, 0-9, '.', '_', '-', starting with a letter or digit",
        )
    }
}

impl core::error::Error for BoardError {}

impl Board {
    /// Parses a board name.
    pub fn parse(s: &str) -> Result<Self, BoardError> {
        let b = s.as_bytes();
        let allowed = |c: u8| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, b'.' | b'_' | b'-');
        let first_ok = b.first().is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
        if !first_ok || b.len() > BOARD_MAX || !b.iter().all(|&c| allowed(c)) {
            return Err(BoardError);
        }
        let mut bytes = [0u8; BOARD_MAX];
        bytes[..b.len()].copy_from_slice(b);
        // b.len() <= BOARD_MAX = 32: fits in u8.
        Ok(Self { bytes, len: b.len() as u8 })
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        // Only ASCII was let in by `parse` and `decode`.
        core::str::from_utf8(&self.bytes[..usize::from(self.len)]).unwrap_or_default()
    }

    /// The 32-byte field: the name, then NUL bytes.
    fn field(&self) -> [u8; BOARD_MAX] {
        self.bytes
    }

    fn from_field(f: &[u8; BOARD_MAX]) -> Result<Self, BoardError> {
        let len = f.iter().position(|&c| c == 0).unwrap_or(BOARD_MAX);
        if f[len..].iter().any(|&c| c != 0) {
            return Err(BoardError);
        }
        let s = core::str::from_utf8(&f[..len]).map_err(|_| BoardError)?;
        Self::parse(s)
    }
}

impl fmt::Debug for Board {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl fmt::Display for Board {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(feature = "defmt")]
impl defmt::Format for Board {
    fn format(&self, f: defmt::Formatter<'_>) {
        defmt::write!(f, "{=str}", self.as_str())
    }
}

/// A signed release's manifest. Build one with every field, [`Manifest::signed_part`] is what
/// the station signs; [`Manifest::encode`] and [`Manifest::decode`] are the 268-byte layout.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Manifest {
    /// Image bytes: what embassy-boot's `update_len` is.
    pub image_size: u32,
    /// The release's version.
    pub version: Version,
    /// The oldest running version that may install it ([`Version::ZERO`]: any).
    pub min_version: Version,
    /// The board it runs on.
    pub board: Board,
    /// The first 8 bytes of SHA-256 over the signing key's 32-byte public key.
    pub key_id: [u8; KEY_ID_LEN],
    /// SHA-512 of the image.
    pub image_sha512: [u8; 64],
    /// Ed25519 over `image_sha512` (embassy-boot's signature).
    pub image_signature: [u8; 64],
    /// Ed25519 over [`Manifest::signed_part`].
    pub manifest_signature: [u8; 64],
}

/// Why manifest bytes were refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[non_exhaustive]
pub enum ManifestError {
    /// Not exactly [`MANIFEST_LEN`] bytes.
    Length(usize),
    /// Not `fgota-m1`: another layout, or not a manifest.
    BadMagic,
    /// The board field is not a board name followed by NUL bytes.
    Board,
    /// An image of 0 bytes.
    EmptyImage,
    /// A minimum version at or above the version: no device could install it.
    MinVersion,
}

impl fmt::Display for ManifestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Length(n) => write!(f, "a release manifest is {MANIFEST_LEN} bytes, not {n}"),
            Self::BadMagic => f.write_str("not a release manifest of layout fgota-m1 (bad magic)"),
            Self::Board => f.write_str("release manifest has an invalid board field"),
            Self::EmptyImage => f.write_str("release manifest names an empty image"),
            Self::MinVersion => f.write_str("release manifest's minimum version is not below its version"),
        }
    }
}

impl core::error::Error for ManifestError {}

/// Why a device turns an offer down before downloading it. Reported in its `failed` status with
/// [`Refusal::reason`] (docs/spec/ota.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[non_exhaustive]
pub enum Refusal {
    /// Signed by a key the device does not hold.
    UnknownKey,
    /// Built for another board.
    WrongBoard,
    /// Larger than the device's update partition (embassy-boot would panic on it).
    TooLarge,
    /// Not newer than what runs: a replay of an old release, or the same one again.
    NotNewer,
    /// The running version is below the release's minimum version.
    BelowMinVersion,
}

impl Refusal {
    /// The reason's label in status reports.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::UnknownKey => "unknown_key",
            Self::WrongBoard => "wrong_board",
            Self::TooLarge => "too_large",
            Self::NotNewer => "not_newer",
            Self::BelowMinVersion => "below_min_version",
        }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.reason())
    }
}

impl Manifest {
    /// The bytes the manifest signature covers: the layout's first [`SIGNED_LEN`] bytes.
    pub fn signed_part(&self) -> [u8; SIGNED_LEN] {
        let mut out = [0u8; SIGNED_LEN];
        out[0..8].copy_from_slice(&MAGIC);
        out[IMAGE_SIZE..IMAGE_SIZE + 4].copy_from_slice(&self.image_size.to_le_bytes());
        out[VERSION_AT..VERSION_AT + 12].copy_from_slice(&self.version.to_le());
        out[MIN_VERSION_AT..MIN_VERSION_AT + 12].copy_from_slice(&self.min_version.to_le());
        out[BOARD_AT..BOARD_AT + BOARD_MAX].copy_from_slice(&self.board.field());
        out[KEY_ID_AT..KEY_ID_AT + KEY_ID_LEN].copy_from_slice(&self.key_id);
        out[DIGEST_AT..DIGEST_AT + 64].copy_from_slice(&self.image_sha512);
        out[IMAGE_SIG_AT..IMAGE_SIG_AT + 64].copy_from_slice(&self.image_signature);
        out
    }

    /// The 268-byte layout.
    pub fn encode(&self) -> [u8; MANIFEST_LEN] {
        let mut out = [0u8; MANIFEST_LEN];
        out[..SIGNED_LEN].copy_from_slice(&self.signed_part());
        out[SIGNED_LEN..].copy_from_slice(&self.manifest_signature);
        out
    }

    /// Reads a manifest: exactly [`MANIFEST_LEN`] bytes (an offer's payload). Checks the layout,
    /// not the signatures: verify [`Manifest::manifest_signature`] over
    /// [`Manifest::signed_part`] before trusting any field.
    pub fn decode(bytes: &[u8]) -> Result<Self, ManifestError> {
        let b: &[u8; MANIFEST_LEN] = bytes.try_into().map_err(|_| ManifestError::Length(bytes.len()))?;
        if b[0..8] != MAGIC {
            return Err(ManifestError::BadMagic);
        }
        let arr = |at: usize| -> [u8; 64] {
            let mut a = [0u8; 64];
            a.copy_from_slice(&b[at..at + 64]);
            a
        };
        let version = |at: usize| {
            let mut v = [0u8; 12];
            v.copy_from_slice(&b[at..at + 12]);
            Version::from_le(&v)
        };
        let mut board = [0u8; BOARD_MAX];
        board.copy_from_slice(&b[BOARD_AT..BOARD_AT + BOARD_MAX]);
        let mut key_id = [0u8; KEY_ID_LEN];
        key_id.copy_from_slice(&b[KEY_ID_AT..KEY_ID_AT + KEY_ID_LEN]);
        let m = Manifest {
            image_size: u32::from_le_bytes([b[8], b[9], b[10], b[11]]),
            version: version(VERSION_AT),
            min_version: version(MIN_VERSION_AT),
            board: Board::from_field(&board).map_err(|_| ManifestError::Board)?,
            key_id,
            image_sha512: arr(DIGEST_AT),
            image_signature: arr(IMAGE_SIG_AT),
            manifest_signature: arr(SIGNED_LEN),
        };
        if m.image_size == 0 {
            return Err(ManifestError::EmptyImage);
        }
        if m.min_version >= m.version {
            return Err(ManifestError::MinVersion);
        }
        Ok(m)
    }

    /// Whether a device may download this release: its key is `trusted_key_id`, its board is
    /// `board`, it fits an update partition of `capacity` bytes, it is newer than `running` and
    /// `running` is at least its minimum version. Call it only after the manifest signature
    /// verified with the trusted key.
    pub fn check_offer(
        &self,
        trusted_key_id: &[u8; KEY_ID_LEN],
        board: &Board,
        running: Version,
        capacity: u32,
    ) -> Result<(), Refusal> {
        if self.key_id != *trusted_key_id {
            return Err(Refusal::UnknownKey);
        }
        if self.board != *board {
            return Err(Refusal::WrongBoard);
        }
        if self.image_size > capacity {
            return Err(Refusal::TooLarge);
        }
        if self.version <= running {
            return Err(Refusal::NotNewer);
        }
        if running < self.min_version {
            return Err(Refusal::BelowMinVersion);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Manifest {
        Manifest {
            image_size: 0x0001_0203,
            version: Version::new(1, 2, 0),
            min_version: Version::new(1, 0, 7),
            board: Board::parse("mps2-an386").expect("board"),
            key_id: [0xa0, 0xa1, 0xa2, 0xa3, 0xa4, 0xa5, 0xa6, 0xa7],
            image_sha512: [0x11; 64],
            image_signature: [0x22; 64],
            manifest_signature: [0x33; 64],
        }
    }

    /// The exact bytes of `sample()`: a vector that pins the layout.
    fn sample_bytes() -> [u8; MANIFEST_LEN] {
        let mut v = [0u8; MANIFEST_LEN];
        let head: &[u8] = &[
            b'f', b'g', b'o', b't', b'a', b'-', b'm', b'1', // magic
            0x03, 0x02, 0x01, 0x00, // image size
            1, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, // version 1.2.0
            1, 0, 0, 0, 0, 0, 0, 0, 7, 0, 0, 0, // min version 1.0.7
            b'm', b'p', b's', b'2', b'-', b'a', b'n', b'3', b'8', b'6', // board, then NULs
        ];
        v[..head.len()].copy_from_slice(head);
        v[68..76].copy_from_slice(&[0xa0, 0xa1, 0xa2, 0xa3, 0xa4, 0xa5, 0xa6, 0xa7]);
        v[76..140].fill(0x11);
        v[140..204].fill(0x22);
        v[204..268].fill(0x33);
        v
    }

    #[test]
    fn vector_matches_the_spec_and_round_trips() {
        let bytes = sample().encode();
        assert_eq!(bytes, sample_bytes());
        assert_eq!(&sample().signed_part()[..], &bytes[..SIGNED_LEN]);
        assert_eq!(Manifest::decode(&bytes), Ok(sample()));
    }

    #[test]
    fn malformed_manifests_are_refused() {
        let good = sample_bytes();
        assert_eq!(Manifest::decode(&good[..267]), Err(ManifestError::Length(267)));
        let mut long = [0u8; MANIFEST_LEN + 1];
        long[..MANIFEST_LEN].copy_from_slice(&good);
        assert_eq!(Manifest::decode(&long), Err(ManifestError::Length(269)));
        let mut m = good;
        m[7] = b'2';
        assert_eq!(Manifest::decode(&m), Err(ManifestError::BadMagic));
        // A board with a byte after its NUL padding, an upper-case one, an empty one.
        let mut m = good;
        m[67] = b'x';
        assert_eq!(Manifest::decode(&m), Err(ManifestError::Board));
        let mut m = good;
        m[36] = b'M';
        assert_eq!(Manifest::decode(&m), Err(ManifestError::Board));
        let mut m = good;
        m[36..68].fill(0);
        assert_eq!(Manifest::decode(&m), Err(ManifestError::Board));
        let mut m = good;
        m[8..12].fill(0);
        assert_eq!(Manifest::decode(&m), Err(ManifestError::EmptyImage));
        // Minimum version 1.2.0 = version.
        let mut m = good;
        m[32] = 0;
        m[28] = 2;
        assert_eq!(Manifest::decode(&m), Err(ManifestError::MinVersion));
    }

    #[test]
    fn versions_parse_as_semver_without_tags_and_order_numerically() {
        assert_eq!(Version::parse("1.2.0"), Ok(Version::new(1, 2, 0)));
        assert_eq!(Version::parse("0.0.0"), Ok(Version::ZERO));
        assert_eq!(Version::parse("4294967295.0.10"), Ok(Version::new(u32::MAX, 0, 10)));
        for bad in ["", "1", "1.2", "1.2.3.4", "v1.2.0", "1..0", "1.2.x", " 1.2.0", "1.2.0 "] {
            assert_eq!(Version::parse(bad), Err(VersionError::Malformed), "{bad:?}");
        }
        assert_eq!(Version::parse("1.02.0"), Err(VersionError::LeadingZero));
        assert_eq!(Version::parse("4294967296.0.0"), Err(VersionError::TooLarge));
        assert_eq!(Version::parse("1.2.0-rc.1"), Err(VersionError::PreRelease));
        assert_eq!(Version::parse("1.2.0+abc"), Err(VersionError::BuildMetadata));
        assert!(Version::new(1, 10, 0) > Version::new(1, 9, 99));
        assert!(Version::new(2, 0, 0) > Version::new(1, 99, 99));
        assert_eq!(Version::new(1, 2, 3).to_string(), "1.2.3");
    }

    #[test]
    fn board_names_follow_the_id_rules() {
        assert_eq!(Board::parse("mps2-an386").map(|b| b.to_string()).as_deref(), Ok("mps2-an386"));
        assert!(Board::parse(&"a".repeat(32)).is_ok());
        for bad in ["", "-x", "Board", "a b", "a/b", "é", &"a".repeat(33)] {
            assert_eq!(Board::parse(bad), Err(BoardError), "{bad:?}");
        }
    }

    #[test]
    fn an_offer_is_taken_only_when_every_rule_holds() {
        let m = sample();
        let key = m.key_id;
        let board = m.board;
        let cap = m.image_size;
        assert_eq!(m.check_offer(&key, &board, Version::new(1, 1, 0), cap), Ok(()));
        assert_eq!(m.check_offer(&key, &board, Version::new(1, 0, 7), cap), Ok(()));
        assert_eq!(m.check_offer(&[0; 8], &board, Version::new(1, 1, 0), cap), Err(Refusal::UnknownKey));
        let other = Board::parse("nucleo-f429zi").expect("board");
        assert_eq!(m.check_offer(&key, &other, Version::new(1, 1, 0), cap), Err(Refusal::WrongBoard));
        assert_eq!(m.check_offer(&key, &board, Version::new(1, 1, 0), cap - 1), Err(Refusal::TooLarge));
        assert_eq!(m.check_offer(&key, &board, Version::new(1, 2, 0), cap), Err(Refusal::NotNewer));
        assert_eq!(m.check_offer(&key, &board, Version::new(2, 0, 0), cap), Err(Refusal::NotNewer));
        assert_eq!(m.check_offer(&key, &board, Version::new(1, 0, 6), cap), Err(Refusal::BelowMinVersion));
    }
}
