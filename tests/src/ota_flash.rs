//! The host side of the QEMU board's A/B bootloader: builds and reads the update flash file
//! (BOOTLOADER STATE, ACTIVE, DFU; layout in firmware-examples/qemu-mps2-an386/src/ota_layout.rs,
//! shared with the firmware) through embassy-boot itself, so that the state partition holds
//! what the crate writes (its magic words and progress layout), never bytes written by hand.
//!
//! - [`Image`]: an application image (feature `ota` build) flattened from its ELF, as it lies in
//!   ACTIVE or DFU, with its description block stamped (version, the ed25519 key that its
//!   successors must be signed with) the way release tooling would after linking.
//! - [`sign`]: embassy-boot's signature scheme: ed25519 over the SHA-512 of the image.
//! - [`FlashFile`]: the file as embassy-boot `NorFlash` partitions (erase = 0xFF, writes only clear
//!   bits): [`FlashFile::create`] with an image in ACTIVE, [`FlashFile::place_update`] writes one
//!   into DFU (embassy-boot's `write_firmware`), [`FlashFile::mark_update`] marks it through
//!   `verify_and_mark_updated` (the updater has no unverified path with `ed25519-dalek`).

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use ed25519_dalek::{Signer, SigningKey};
use embassy_boot::{
    AlignedBuffer, BlockingFirmwareState, BlockingFirmwareUpdater, FirmwareUpdaterConfig,
    FirmwareUpdaterError,
};
use embedded_storage::nor_flash::{
    check_erase, check_read, check_write, ErrorType, NorFlash, NorFlashError, NorFlashErrorKind, ReadNorFlash,
};
use sha2::{Digest, Sha512};

pub use embassy_boot::State;

#[allow(dead_code, unreachable_pub)] // the firmware's part of the layout
#[path = "../../firmware-examples/qemu-mps2-an386/src/ota_layout.rs"]
mod layout;

/// Name of the flash file the firmware opens in QEMU's working directory.
pub const FLASH_FILE: &str = layout::FLASH_FILE;
/// Bytes in ACTIVE (an image must fit).
pub const ACTIVE_SIZE: u32 = layout::ACTIVE_SIZE;
/// Where the bootloader copies ACTIVE and the application is linked.
pub const EXEC_ADDR: u32 = layout::EXEC_ADDR;
/// The bootloader's image must end below this address.
pub const BOOTLOADER_MAX: u32 = layout::BOOTLOADER_MAX;

/// What went wrong with an image or the flash file.
#[derive(Debug)]
#[non_exhaustive]
pub enum OtaFlashError {
    /// Reading or writing a file.
    Io(std::io::Error),
    /// Not an ELF image of the layout (why).
    Image(String),
    /// embassy-boot refused (bad state, flash error, or a signature that does not verify).
    Updater(FirmwareUpdaterError),
}

impl std::fmt::Display for OtaFlashError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OtaFlashError::Io(e) => write!(f, "{e}"),
            OtaFlashError::Image(why) => write!(f, "not an application image for the bootloader: {why}"),
            OtaFlashError::Updater(e) => write!(f, "embassy-boot refused: {e:?}"),
        }
    }
}

impl std::error::Error for OtaFlashError {}

impl From<std::io::Error> for OtaFlashError {
    fn from(e: std::io::Error) -> Self {
        OtaFlashError::Io(e)
    }
}

impl From<FirmwareUpdaterError> for OtaFlashError {
    fn from(e: FirmwareUpdaterError) -> Self {
        OtaFlashError::Updater(e)
    }
}

/// `n` bytes that look like a firmware image (deterministic, xorshift from `seed`): test images.
pub fn test_image(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// The loadable segments `(paddr, bytes)` of a 32-bit little-endian ELF file.
pub fn elf_segments(elf: &[u8]) -> Result<Vec<(u32, Vec<u8>)>, OtaFlashError> {
    let bad = |why: &str| OtaFlashError::Image(why.to_owned());
    if elf.len() < 52 || &elf[..4] != b"\x7fELF" || elf[4] != 1 || elf[5] != 1 {
        return Err(bad("not a 32-bit little-endian ELF file"));
    }
    let u16_at = |o: usize| u16::from_le_bytes([elf[o], elf[o + 1]]) as usize;
    let u32_at = |o: usize| u32::from_le_bytes([elf[o], elf[o + 1], elf[o + 2], elf[o + 3]]);
    let (phoff, phentsize, phnum) = (u32_at(28) as usize, u16_at(42), u16_at(44));
    let mut out = Vec::new();
    for i in 0..phnum {
        let ph = phoff + i * phentsize;
        if ph + 32 > elf.len() {
            return Err(bad("program header outside the file"));
        }
        let (kind, offset, paddr, filesz) =
            (u32_at(ph), u32_at(ph + 4) as usize, u32_at(ph + 12), u32_at(ph + 16) as usize);
        const PT_LOAD: u32 = 1;
        if kind != PT_LOAD || filesz == 0 {
            continue;
        }
        let bytes = elf.get(offset..offset + filesz).ok_or_else(|| bad("segment outside the file"))?;
        out.push((paddr, bytes.to_vec()));
    }
    Ok(out)
}

/// An application image as it lies in ACTIVE: the bytes from `EXEC_ADDR` on.
#[derive(Clone, PartialEq, Eq)]
pub struct Image {
    bytes: Vec<u8>,
}

impl std::fmt::Debug for Image {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Image({} bytes, version {:?})", self.bytes.len(), self.version())
    }
}

impl Image {
    /// Flattens the ELF of an application built with feature `ota` (gaps 0xFF, padded to the
    /// flash's write unit), checking that it is linked at the execution region.
    pub fn from_elf(path: &Path) -> Result<Image, OtaFlashError> {
        let elf = std::fs::read(path)?;
        let exec = u64::from(EXEC_ADDR)..u64::from(EXEC_ADDR) + u64::from(ACTIVE_SIZE);
        let mut bytes = Vec::new();
        for (paddr, seg) in elf_segments(&elf)? {
            let (start, end) = (u64::from(paddr), u64::from(paddr) + seg.len() as u64);
            if !exec.contains(&start) || end > exec.end {
                return Err(OtaFlashError::Image(format!(
                    "{}: a segment at {paddr:#x} lies outside the execution region {EXEC_ADDR:#x}+{ACTIVE_SIZE:#x} \
                     (build it with --features ota)",
                    path.display()
                )));
            }
            let at = (paddr - EXEC_ADDR) as usize;
            if bytes.len() < at + seg.len() {
                bytes.resize(at + seg.len(), 0xff);
            }
            bytes[at..at + seg.len()].copy_from_slice(&seg);
        }
        let write = layout::WRITE as usize;
        bytes.resize(bytes.len().div_ceil(write) * write, 0xff);
        let image = Image { bytes };
        image.info_at()?;
        Ok(image)
    }

    /// Any bytes as an image (simulated devices: no vector table, no description block).
    pub fn from_bytes(bytes: Vec<u8>) -> Image {
        Image { bytes }
    }

    /// The image's bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Offset of the description block (its magic occurs exactly once).
    fn info_at(&self) -> Result<usize, OtaFlashError> {
        let magic = &layout::INFO_MAGIC;
        let mut hits =
            self.bytes.windows(magic.len()).enumerate().filter(|(_, w)| w == magic).map(|(i, _)| i);
        match (hits.next(), hits.next()) {
            (Some(at), None) if at + layout::INFO_SIZE <= self.bytes.len() => Ok(at),
            (None, _) => Err(OtaFlashError::Image("no image description block".into())),
            _ => Err(OtaFlashError::Image("the description block's magic occurs twice".into())),
        }
    }

    /// A copy with `version` and the public half of `successor_key` stamped into its description
    /// block: updates to this image must be signed with that key.
    pub fn stamped(&self, version: &str, successor_key: &SigningKey) -> Result<Image, OtaFlashError> {
        if version.is_empty() || version.len() > layout::INFO_VERSION || version.contains('\0') {
            return Err(OtaFlashError::Image(format!("version {version:?}: 1 to 32 bytes, no NUL")));
        }
        let at = self.info_at()? + layout::INFO_MAGIC.len();
        let mut bytes = self.bytes.clone();
        let field = &mut bytes[at..at + layout::INFO_VERSION];
        field.fill(0);
        field[..version.len()].copy_from_slice(version.as_bytes());
        let key = at + layout::INFO_VERSION;
        bytes[key..key + layout::INFO_KEY].copy_from_slice(successor_key.verifying_key().as_bytes());
        Ok(Image { bytes })
    }

    /// The version in the description block.
    pub fn version(&self) -> Option<String> {
        image_version(&self.bytes)
    }

    /// Length in bytes (what the signature covers).
    pub fn len(&self) -> u32 {
        // An image fits ACTIVE (checked in `from_elf`), far below 4 GiB.
        u32::try_from(self.bytes.len()).unwrap_or(u32::MAX)
    }

    /// Never: an image has at least its vector table.
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }
}

/// The version in the first image description block in `bytes` (a partition's contents).
pub fn image_version(bytes: &[u8]) -> Option<String> {
    let magic = &layout::INFO_MAGIC;
    let at = bytes.windows(magic.len()).position(|w| w == magic)? + magic.len();
    let field = bytes.get(at..at + layout::INFO_VERSION)?;
    let len = field.iter().position(|&b| b == 0).unwrap_or(field.len());
    String::from_utf8(field[..len].to_vec()).ok()
}

/// embassy-boot's signature of an image: ed25519 over the SHA-512 of its bytes.
pub fn sign(image: &Image, key: &SigningKey) -> [u8; 64] {
    key.sign(&Sha512::digest(image.bytes())).to_bytes()
}

/// A release's signed manifest (`fgota-m1`, docs/spec/ota.md) for `image` as `version` on
/// `board`, signed with `key` as `fleet-provision release` signs it: the image signature over
/// its SHA-512, the manifest signature over the signed part.
pub fn manifest(image: &Image, version: &str, board: &str, key: &SigningKey) -> Vec<u8> {
    use fleet_device::release::{Board, Manifest, Version};
    let digest: [u8; 64] = Sha512::digest(image.bytes()).into();
    let mut m = Manifest {
        image_size: image.len(),
        version: Version::parse(version).expect("version"),
        min_version: Version::ZERO,
        board: Board::parse(board).expect("board"),
        key_id: fleet_device::ota::key_id(key.verifying_key().as_bytes()),
        image_sha512: digest,
        image_signature: sign(image, key),
        manifest_signature: [0; 64],
    };
    m.manifest_signature = key.sign(&m.signed_part()).to_bytes();
    m.encode().to_vec()
}

/// A fresh signing key (test keys are made at test time, never stored in the repository).
pub fn generate_key() -> SigningKey {
    let mut seed = [0u8; 32];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut seed);
    SigningKey::from_bytes(&seed)
}

/// The update flash file.
#[derive(Debug, Clone)]
pub struct FlashFile {
    path: PathBuf,
}

impl FlashFile {
    /// A new file: everything erased (so the state partition reads as `Boot`), `active` in ACTIVE.
    pub fn create(path: &Path, active: &Image) -> Result<FlashFile, OtaFlashError> {
        if active.len() > ACTIVE_SIZE {
            return Err(OtaFlashError::Image(format!(
                "{} bytes do not fit ACTIVE ({ACTIVE_SIZE})",
                active.len()
            )));
        }
        std::fs::write(path, vec![0xffu8; layout::FLASH_SIZE as usize])?;
        let file = FlashFile { path: path.to_owned() };
        let mut part = file.partition::<{ layout::ACTIVE_SIZE }>(layout::ACTIVE_OFFSET)?;
        part.write(0, active.bytes()).map_err(|e| OtaFlashError::Image(format!("writing ACTIVE: {e:?}")))?;
        Ok(file)
    }

    /// An existing file.
    pub fn open(path: &Path) -> FlashFile {
        FlashFile { path: path.to_owned() }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn partition<const SIZE: u32>(&self, base: u32) -> Result<FilePartition<SIZE>, OtaFlashError> {
        let file = OpenOptions::new().read(true).write(true).open(&self.path)?;
        Ok(FilePartition { file, base })
    }

    fn updater<'a>(
        &self,
        word: &'a mut [u8],
    ) -> Result<
        BlockingFirmwareUpdater<
            'a,
            FilePartition<{ layout::DFU_SIZE }>,
            FilePartition<{ layout::STATE_SIZE }>,
        >,
        OtaFlashError,
    > {
        let config = FirmwareUpdaterConfig {
            dfu: self.partition(layout::DFU_OFFSET)?,
            state: self.partition(layout::STATE_OFFSET)?,
        };
        Ok(BlockingFirmwareUpdater::new(config, word))
    }

    /// Writes `image` into DFU as the download path would (embassy-boot `write_firmware`, which
    /// refuses while a trial boot is unconfirmed). Does not mark it.
    pub fn place_update(&self, image: &Image) -> Result<(), OtaFlashError> {
        let mut word = AlignedBuffer([0u8; layout::WRITE as usize]);
        let mut updater = self.updater(&mut word.0)?;
        for (i, chunk) in image.bytes().chunks(layout::PAGE as usize).enumerate() {
            updater.write_firmware(i * layout::PAGE as usize, chunk)?;
        }
        Ok(())
    }

    /// Marks the first `len` bytes of DFU for the swap, through embassy-boot's
    /// `verify_and_mark_updated` under `public_key`: a signature that does not verify marks
    /// nothing.
    pub fn mark_update(
        &self,
        public_key: &[u8; 32],
        signature: &[u8; 64],
        len: u32,
    ) -> Result<(), OtaFlashError> {
        let mut word = AlignedBuffer([0u8; layout::WRITE as usize]);
        self.updater(&mut word.0)?.verify_and_mark_updated(public_key, signature, len)?;
        Ok(())
    }

    /// The bootloader state as embassy-boot reads it.
    pub fn state(&self) -> Result<State, OtaFlashError> {
        let mut word = AlignedBuffer([0u8; layout::WRITE as usize]);
        let state = self.partition::<{ layout::STATE_SIZE }>(layout::STATE_OFFSET)?;
        Ok(BlockingFirmwareState::new(state, &mut word.0).get_state()?)
    }

    /// The first `len` bytes of ACTIVE.
    pub fn active(&self, len: u32) -> Result<Vec<u8>, OtaFlashError> {
        self.read_at(layout::ACTIVE_OFFSET, len.min(ACTIVE_SIZE))
    }

    /// The first `len` bytes of DFU.
    pub fn dfu(&self, len: u32) -> Result<Vec<u8>, OtaFlashError> {
        self.read_at(layout::DFU_OFFSET, len.min(layout::DFU_SIZE))
    }

    fn read_at(&self, offset: u32, len: u32) -> Result<Vec<u8>, OtaFlashError> {
        let mut f = File::open(&self.path)?;
        f.seek(SeekFrom::Start(u64::from(offset)))?;
        let mut out = vec![0u8; len as usize];
        f.read_exact(&mut out)?;
        Ok(out)
    }
}

/// A flash operation on the file failed.
#[derive(Debug)]
pub enum FileFlashError {
    Bounds(NorFlashErrorKind),
    /// A write would set a bit that is 0.
    NotErased,
    Io(std::io::ErrorKind),
}

impl NorFlashError for FileFlashError {
    fn kind(&self) -> NorFlashErrorKind {
        match self {
            FileFlashError::Bounds(k) => *k,
            _ => NorFlashErrorKind::Other,
        }
    }
}

impl From<NorFlashErrorKind> for FileFlashError {
    fn from(k: NorFlashErrorKind) -> Self {
        FileFlashError::Bounds(k)
    }
}

impl From<std::io::Error> for FileFlashError {
    fn from(e: std::io::Error) -> Self {
        FileFlashError::Io(e.kind())
    }
}

/// `[base, base + SIZE)` of the file as NOR flash, with the firmware's semantics
/// (host_flash.rs): erase sets 0xFF, a write may only clear bits.
#[derive(Debug)]
pub struct FilePartition<const SIZE: u32> {
    file: File,
    base: u32,
}

impl<const SIZE: u32> FilePartition<SIZE> {
    fn at(&mut self, offset: u32) -> Result<(), FileFlashError> {
        self.file.seek(SeekFrom::Start(u64::from(self.base) + u64::from(offset)))?;
        Ok(())
    }
}

impl<const SIZE: u32> ErrorType for FilePartition<SIZE> {
    type Error = FileFlashError;
}

impl<const SIZE: u32> ReadNorFlash for FilePartition<SIZE> {
    const READ_SIZE: usize = 1;

    fn read(&mut self, offset: u32, bytes: &mut [u8]) -> Result<(), FileFlashError> {
        check_read(self, offset, bytes.len())?;
        self.at(offset)?;
        self.file.read_exact(bytes)?;
        Ok(())
    }

    fn capacity(&self) -> usize {
        SIZE as usize
    }
}

impl<const SIZE: u32> NorFlash for FilePartition<SIZE> {
    const WRITE_SIZE: usize = layout::WRITE as usize;
    const ERASE_SIZE: usize = layout::PAGE as usize;

    fn erase(&mut self, from: u32, to: u32) -> Result<(), FileFlashError> {
        check_erase(self, from, to)?;
        self.at(from)?;
        self.file.write_all(&vec![0xffu8; (to - from) as usize])?;
        Ok(())
    }

    fn write(&mut self, offset: u32, bytes: &[u8]) -> Result<(), FileFlashError> {
        check_write(self, offset, bytes.len())?;
        let mut old = vec![0u8; bytes.len()];
        self.read(offset, &mut old)?;
        if old.iter().zip(bytes).any(|(o, b)| b & !o != 0) {
            return Err(FileFlashError::NotErased);
        }
        self.at(offset)?;
        self.file.write_all(bytes)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // test code
    use super::*;

    /// A fake application image: a vector table, the description block, some code.
    fn image() -> Image {
        let mut bytes = vec![0u8; 1024];
        bytes.extend_from_slice(&layout::INFO_MAGIC);
        bytes.extend_from_slice(&[0u8; layout::INFO_VERSION + layout::INFO_KEY]);
        bytes.extend_from_slice(&[0x5a; 3 * 4096]);
        Image { bytes }
    }

    #[test]
    fn the_file_behaves_like_nor_flash() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FLASH_FILE);
        std::fs::write(&path, vec![0xffu8; layout::FLASH_SIZE as usize]).unwrap();
        let mut part = FlashFile::open(&path).partition::<{ layout::STATE_SIZE }>(0).unwrap();
        part.write(0, &[0x0f, 0xf0, 0x00, 0xff]).unwrap();
        // Clearing more bits is programming; setting one back is not.
        part.write(0, &[0x0e, 0x00, 0x00, 0xff]).unwrap();
        assert!(matches!(part.write(0, &[0x0f, 0x00, 0x00, 0xff]), Err(FileFlashError::NotErased)));
        assert!(matches!(part.write(2, &[0; 4]), Err(FileFlashError::Bounds(NorFlashErrorKind::NotAligned))));
        part.erase(0, layout::PAGE).unwrap();
        let mut word = [0u8; 4];
        part.read(0, &mut word).unwrap();
        assert_eq!(word, [0xff; 4]);
    }

    #[test]
    fn only_a_verified_update_is_marked() {
        let dir = tempfile::tempdir().unwrap();
        let key = generate_key();
        let (v1, v2) = (image().stamped("1.0.0", &key).unwrap(), image().stamped("2.0.0", &key).unwrap());
        let flash = FlashFile::create(&dir.path().join(FLASH_FILE), &v1).unwrap();
        assert_eq!(flash.state().unwrap(), State::Boot);
        assert_eq!(image_version(&flash.active(ACTIVE_SIZE).unwrap()).as_deref(), Some("1.0.0"));
        flash.place_update(&v2).unwrap();
        assert_eq!(flash.dfu(v2.len()).unwrap(), v2.bytes());
        let public = key.verifying_key().to_bytes();
        let forged = sign(&v2, &generate_key());
        assert!(matches!(
            flash.mark_update(&public, &forged, v2.len()),
            Err(OtaFlashError::Updater(FirmwareUpdaterError::Signature(_)))
        ));
        // One byte of the image changed after signing.
        let mut tampered = v2.clone();
        tampered.bytes[2000] ^= 1;
        flash.place_update(&tampered).unwrap();
        assert!(flash.mark_update(&public, &sign(&v2, &key), v2.len()).is_err());
        assert_eq!(flash.state().unwrap(), State::Boot);
        flash.place_update(&v2).unwrap();
        flash.mark_update(&public, &sign(&v2, &key), v2.len()).unwrap();
        assert_eq!(flash.state().unwrap(), State::Swap);
        // Marked and not yet booted: embassy-boot takes no other download meanwhile.
        assert!(flash.place_update(&v1).is_err());
    }

    #[test]
    fn an_image_needs_exactly_one_description_block() {
        let key = generate_key();
        let mut twice = image();
        twice.bytes.extend_from_slice(&layout::INFO_MAGIC);
        assert!(twice.stamped("1.0.0", &key).is_err());
        assert!(Image { bytes: vec![0; 64] }.stamped("1.0.0", &key).is_err());
        assert!(image().stamped(&"9".repeat(33), &key).is_err());
        assert_eq!(image().stamped("1.2.3", &key).unwrap().version().as_deref(), Some("1.2.3"));
    }
}
