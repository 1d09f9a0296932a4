//! Firmware updates over the air, the device's side (docs/spec/ota.md): take an offer, download
//! the image in chunks into embassy-boot's DFU partition, verify it, report each step, and
//! confirm the new image once it has reconnected to the broker.
//!
//! Sans-IO like the MQTT session: [`Ota`] takes offers, chunks and time and returns the messages
//! to publish ([`Ota::poll_transmit`]: chunk requests on `ota/get`, status JSON on
//! `ota/status`); it never reads a clock. Flash is reached through `embedded-storage`: the
//! firmware gives embassy-boot's [`BlockingFirmwareUpdater`] (or, with [`AsyncUpdater`],
//! its async [`FirmwareUpdater`]) for DFU and the bootloader state, and one erase unit of
//! NOR flash for the job's record ([`Record`]).
//!
//! Invariants:
//! - Nothing is downloaded before the manifest signature verified under the device's key and
//!   [`Manifest::check_offer`] took the offer; `verify_and_mark_updated` is never called with a
//!   size above the DFU partition (it would panic).
//! - Chunks are written strictly in order. The record keeps the manifest and, after every
//!   full DFU sector, the next offset: embassy-boot's `write_firmware` erases a sector the
//!   first time an updater writes into it, so a restarted device resumes at the last sector
//!   boundary and rewrites that sector whole.
//! - The image is marked for the swap only when the SHA-512 of what lies in DFU is the
//!   manifest's and embassy-boot verified the image signature over it.
//! - A new image confirms itself (`mark_booted`) only from [`Updater::connected`], which the
//!   firmware calls once the broker admitted it with its certificate.
//!
//! The Ed25519 code is the bootloader's (embassy-boot's `ed25519-dalek` with feature `ota`,
//! `salty` with `ota-salty`): the manifest signature is checked with the same functions.

use core::fmt::Write as _;

use embassy_boot::{BlockingFirmwareUpdater, FirmwareUpdater, FirmwareUpdaterError, State};
use embedded_storage::nor_flash::NorFlash;

use crate::mqtt::{Millis, QoS};
use crate::release::{Board, Manifest, Refusal, Version, KEY_ID_LEN, MANIFEST_LEN};

/// Bytes of a chunk request (`ota/get`).
pub const REQUEST_LEN: usize = 14;
/// Bytes of a chunk's header (`ota/chunk`): tag, offset, status.
pub const CHUNK_HEADER: usize = 13;
/// The longest chunk a device asks for: the broker's default `ota_max_chunk`.
pub const MAX_CHUNK: usize = 1024;
/// The command name of an offer (`devices/<id>/commands/ota/offer`).
pub const OFFER_COMMAND: &str = fleet_topic::suffix::OTA_OFFER_COMMAND;
/// Where a device asks for chunks.
pub const GET_SUFFIX: &str = fleet_topic::suffix::OTA_GET;
/// Where the broker answers (the device subscribes to it by name).
pub const CHUNK_SUFFIX: &str = fleet_topic::suffix::OTA_CHUNK;
/// Where a device reports its job.
pub const STATUS_SUFFIX: &str = fleet_topic::suffix::OTA_STATUS;
/// Room for the longest status report.
pub const STATUS_MAX: usize = 256;

/// A release's tag: the first 8 bytes of its image SHA-512.
pub fn tag(m: &Manifest) -> [u8; 8] {
    let mut t = [0u8; 8];
    t.copy_from_slice(&m.image_sha512[..8]);
    t
}

/// The 14-byte chunk request: tag, offset (u32 LE), length (u16 LE).
pub fn encode_request(tag: &[u8; 8], offset: u32, len: u16) -> [u8; REQUEST_LEN] {
    let mut r = [0u8; REQUEST_LEN];
    r[..8].copy_from_slice(tag);
    r[8..12].copy_from_slice(&offset.to_le_bytes());
    r[12..14].copy_from_slice(&len.to_le_bytes());
    r
}

/// What the broker said in a chunk's status byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum ChunkStatus {
    /// `0`: data follows.
    Data,
    /// `1`: this release is not offered to this device: stop.
    NotOffered,
    /// `2`: the offset lies beyond the image.
    BeyondImage,
    /// `3`: too many requests outstanding: ask again later.
    Busy,
    /// Any other value (a newer broker): ignored.
    Other(u8),
}

/// A decoded `ota/chunk` payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chunk<'a> {
    /// The release tag it belongs to.
    pub tag: [u8; 8],
    /// Where `data` starts in the image.
    pub offset: u32,
    /// The status byte.
    pub status: ChunkStatus,
    /// The image bytes (status `Data` only).
    pub data: &'a [u8],
}

impl<'a> Chunk<'a> {
    /// Decodes a chunk; `None` when it is shorter than its header.
    pub fn decode(b: &'a [u8]) -> Option<Self> {
        if b.len() < CHUNK_HEADER {
            return None;
        }
        let mut tag = [0u8; 8];
        tag.copy_from_slice(&b[..8]);
        let status = match b[12] {
            0 => ChunkStatus::Data,
            1 => ChunkStatus::NotOffered,
            2 => ChunkStatus::BeyondImage,
            3 => ChunkStatus::Busy,
            s => ChunkStatus::Other(s),
        };
        Some(Chunk {
            tag,
            offset: u32::from_le_bytes([b[8], b[9], b[10], b[11]]),
            status,
            data: &b[CHUNK_HEADER..],
        })
    }
}

/// The job states a device reports (`state` in the status JSON).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum Phase {
    /// Downloading (at the start and at every 10 %).
    Downloading,
    /// Digest and signature verified; marked for the swap, a reset follows.
    Verified,
    /// The new image runs on trial and connected with its certificate.
    Rebooted,
    /// The new image confirmed itself: final.
    Confirmed,
    /// The bootloader rolled the new image back: final.
    RolledBack,
    /// Given up: final, with a [`Reason`].
    Failed,
}

impl Phase {
    /// The label in status reports.
    pub fn label(self) -> &'static str {
        match self {
            Self::Downloading => "downloading",
            Self::Verified => "verified",
            Self::Rebooted => "rebooted",
            Self::Confirmed => "confirmed",
            Self::RolledBack => "rolled_back",
            Self::Failed => "failed",
        }
    }
}

/// Why a job failed (`reason` in the status JSON, docs/spec/ota.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[non_exhaustive]
pub enum Reason {
    /// The offer rule refused it.
    Refused(Refusal),
    /// The offer does not decode as a manifest.
    BadManifest,
    /// The manifest signature does not verify under the device's key.
    BadManifestSignature,
    /// The broker does not offer this release to the device (chunk status 1).
    NotOffered,
    /// The written image's SHA-512 is not the manifest's (after one more download).
    DigestMismatch,
    /// embassy-boot refused the image signature.
    BadSignature,
    /// A flash operation failed, or the bootloader state forbids an update now.
    Flash,
}

impl Reason {
    /// The label in status reports.
    pub fn label(self) -> &'static str {
        match self {
            Self::Refused(r) => r.reason(),
            Self::BadManifest => "bad_manifest",
            Self::BadManifestSignature => "bad_manifest_signature",
            Self::NotOffered => "not_offered",
            Self::DigestMismatch => "digest_mismatch",
            Self::BadSignature => "bad_signature",
            Self::Flash => "flash",
        }
    }
}

/// One status report, formatted when it is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Report {
    /// The state reported.
    pub phase: Phase,
    /// Why, for `Failed`.
    pub reason: Option<Reason>,
    /// The release (absent for an offer that does not decode).
    pub tag: Option<[u8; 8]>,
    /// The release's version.
    pub version: Option<Version>,
    /// Bytes written so far.
    pub offset: u32,
    /// Image size.
    pub size: u32,
    /// The version running now, once a new image ran (rebooted, confirmed, rolled back).
    pub running: Option<Version>,
}

impl Report {
    /// The status JSON (docs/spec/ota.md), written into `out`; returns its length.
    pub fn write_json(&self, out: &mut [u8]) -> Option<usize> {
        let mut w = Cursor { buf: out, len: 0 };
        self.fmt_json(&mut w).ok()?;
        Some(w.len)
    }

    fn fmt_json(&self, w: &mut Cursor<'_>) -> core::fmt::Result {
        w.write_char('{')?;
        if let Some(t) = self.tag {
            w.write_str("\"release\":\"")?;
            for b in t {
                write!(w, "{b:02x}")?;
            }
            w.write_str("\",")?;
        }
        if let Some(v) = self.version {
            write!(w, "\"version\":\"{v}\",")?;
        }
        write!(w, "\"state\":\"{}\"", self.phase.label())?;
        if self.tag.is_some() {
            write!(w, ",\"offset\":{},\"size\":{}", self.offset, self.size)?;
        }
        if let Some(v) = self.running {
            write!(w, ",\"running\":\"{v}\"")?;
        }
        if let Some(r) = self.reason {
            write!(w, ",\"reason\":\"{}\"", r.label())?;
        }
        w.write_char('}')
    }
}

struct Cursor<'a> {
    buf: &'a mut [u8],
    len: usize,
}

impl core::fmt::Write for Cursor<'_> {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        let end = self.len + s.len();
        self.buf.get_mut(self.len..end).ok_or(core::fmt::Error)?.copy_from_slice(s.as_bytes());
        self.len = end;
        Ok(())
    }
}

/// A message to publish under the device's root.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Message<'o> {
    /// `ota/get` or `ota/status`.
    pub suffix: &'static str,
    /// The payload.
    pub payload: &'o [u8],
    /// QoS 0 for requests (the timeout re-asks), 1 for status reports.
    pub qos: QoS,
}

/// What the device is and how it downloads.
#[derive(Debug, Clone, Copy)]
pub struct Config {
    /// This board (releases for other boards are refused).
    pub board: Board,
    /// The version running now.
    pub running: Version,
    /// The 32-byte Ed25519 public key releases must be signed with (`firmware.pub`).
    pub public_key: [u8; 32],
    /// Requests outstanding at once, 2 to 4.
    pub window: u8,
    /// Bytes asked per request: 1 to [`MAX_CHUNK`], a multiple of the DFU flash's write size,
    /// at most the write buffer's length.
    pub chunk_len: u16,
    /// A request unanswered this long is asked again (from the first byte still missing); also
    /// the pause after a "busy" answer.
    pub retry_ms: u64,
}

impl Config {
    /// Defaults for the rest: window 2, 1,024-byte chunks, 3 s retry.
    pub fn new(board: Board, running: Version, public_key: [u8; 32]) -> Self {
        Self { board, running, public_key, window: 2, chunk_len: MAX_CHUNK as u16, retry_ms: 3_000 }
    }
}

/// The job's record in flash: the manifest once, then progress entries appended. One erase per
/// job (a full record is erased and written again), so the wear is one erase of this unit per
/// update plus one per `capacity / entry` sectors downloaded.
///
/// ```text
/// 0    8    "fgota-r1"
/// 8    268  the manifest (fgota-m1)
/// 276  4    CRC-32 (ISO-HDLC) of bytes 0..276
/// then, from the next multiple of the write size: entries of max(8, write size) bytes,
///      value u32 LE, !value u32 LE, 0xFF padding; erased = end. The last valid entry wins:
///      a byte offset (the next sector to download), VERIFIED or DONE.
/// ```
#[derive(Debug)]
pub struct Record<F> {
    flash: F,
    /// Offset of the next free entry.
    next_entry: u32,
}

const RECORD_MAGIC: [u8; 8] = *b"fgota-r1";
const RECORD_HEAD: usize = 8 + MANIFEST_LEN + 4;
const RECORD_BUF: usize = 320;
/// Entry value: the image was verified and marked for the swap.
const VERIFIED: u32 = 0xFFFF_FF01;
/// Entry value: the job's final status was reported.
const DONE: u32 = 0xFFFF_FF02;
const CRC: crc::Crc<u32> = crc::Crc::<u32>::new(&crc::CRC_32_ISO_HDLC);

/// What a record held.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Kept {
    manifest: Manifest,
    /// The last entry (0: none yet).
    last: u32,
}

impl<F: NorFlash> Record<F> {
    /// The record in `flash` (at least one erase unit; write size at most 64 bytes).
    pub fn new(flash: F) -> Self {
        Self { flash, next_entry: 0 }
    }

    fn round(n: usize) -> usize {
        let w = F::WRITE_SIZE.max(1);
        n.div_ceil(w) * w
    }

    fn head_len() -> u32 {
        Self::round(RECORD_HEAD) as u32
    }

    fn entry_len() -> u32 {
        Self::round(8) as u32
    }

    /// The flash, back.
    pub fn release(self) -> F {
        self.flash
    }

    fn load(&mut self) -> Result<Option<Kept>, F::Error> {
        let mut b = [0u8; RECORD_BUF];
        let head = Self::head_len() as usize;
        if head > RECORD_BUF {
            return Ok(None);
        }
        self.flash.read(0, &mut b[..head])?;
        let sum = u32::from_le_bytes([b[276], b[277], b[278], b[279]]);
        if b[..8] != RECORD_MAGIC || CRC.checksum(&b[..276]) != sum {
            return Ok(None);
        }
        let Ok(manifest) = Manifest::decode(&b[8..276]) else { return Ok(None) };
        let (step, cap) = (Self::entry_len(), self.flash.capacity() as u32);
        let mut at = Self::head_len();
        let mut last = 0;
        while at + step <= cap {
            let e = &mut b[..step as usize];
            self.flash.read(at, e)?;
            if e.iter().all(|&x| x == 0xFF) {
                break;
            }
            let v = u32::from_le_bytes([e[0], e[1], e[2], e[3]]);
            if !v == u32::from_le_bytes([e[4], e[5], e[6], e[7]]) {
                last = v;
            }
            at += step;
        }
        self.next_entry = at;
        Ok(Some(Kept { manifest, last }))
    }

    /// Erases the record and keeps `m` (a new job at offset 0).
    fn start(&mut self, m: &Manifest) -> Result<(), F::Error> {
        self.flash.erase(0, self.flash.capacity() as u32)?;
        let mut b = [0xFFu8; RECORD_BUF];
        b[..8].copy_from_slice(&RECORD_MAGIC);
        b[8..276].copy_from_slice(&m.encode());
        let sum = CRC.checksum(&b[..276]);
        b[276..280].copy_from_slice(&sum.to_le_bytes());
        self.flash.write(0, &b[..Self::head_len() as usize])?;
        self.next_entry = Self::head_len();
        Ok(())
    }

    /// Appends an entry; a full record is written again with the entry.
    fn note(&mut self, m: &Manifest, value: u32) -> Result<(), F::Error> {
        let step = Self::entry_len();
        if self.next_entry < Self::head_len() || self.next_entry + step > self.flash.capacity() as u32 {
            self.start(m)?;
        }
        let mut e = [0xFFu8; 64];
        e[..4].copy_from_slice(&value.to_le_bytes());
        e[4..8].copy_from_slice(&(!value).to_le_bytes());
        self.flash.write(self.next_entry, &e[..step as usize])?;
        self.next_entry += step;
        Ok(())
    }

    /// Forgets any job (erases the record).
    pub fn clear(&mut self) -> Result<(), F::Error> {
        self.next_entry = 0;
        self.flash.erase(0, self.flash.capacity() as u32)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// Downloading: `next` bytes are written.
    Download,
    /// Marked for the swap: waiting for the reset.
    Marked,
    /// The new image on trial: confirm when connected.
    Trial,
    /// An already confirmed image whose report is due when connected.
    Confirm,
    /// The old image again: report when connected.
    Reverted,
}

#[derive(Debug, Clone)]
struct Job {
    manifest: Manifest,
    tag: [u8; 8],
    step: Step,
    /// Bytes written, in order.
    next: u32,
    /// Requests were sent up to here.
    requested: u32,
    /// When the last chunk was taken or the window (re)started.
    active_at: Millis,
    /// No request before this (after a "busy").
    hold_until: Millis,
    /// The digest did not match once: the second time fails the job.
    retried: bool,
}

const QUEUE: usize = 4;

/// The sans-IO OTA state machine with its record. Drive it through [`Updater`] (blocking) or
/// [`AsyncUpdater`], which do the DFU writes and the verification.
#[derive(Debug)]
pub struct Ota<R> {
    cfg: Config,
    key_id: [u8; KEY_ID_LEN],
    /// Bytes of the DFU partition: the largest image taken.
    capacity: u32,
    record: Record<R>,
    job: Option<Job>,
    reports: heapless::Deque<Report, QUEUE>,
    request: [u8; REQUEST_LEN],
    status: [u8; STATUS_MAX],
}

/// The first 8 bytes of SHA-256 over a public key: its id in manifests.
pub fn key_id(public_key: &[u8; 32]) -> [u8; KEY_ID_LEN] {
    use sha2::Digest as _;
    let d = sha2::Sha256::digest(public_key);
    let mut id = [0u8; KEY_ID_LEN];
    id.copy_from_slice(&d[..KEY_ID_LEN]);
    id
}

/// Ed25519 (pure) over `msg` with the verifier embassy-boot links.
#[cfg(feature = "ota")]
fn ed25519_ok(key: &[u8; 32], msg: &[u8], sig: &[u8; 64]) -> bool {
    use ed25519_dalek::{Signature, Verifier as _, VerifyingKey};
    VerifyingKey::from_bytes(key).is_ok_and(|k| k.verify(msg, &Signature::from_bytes(sig)).is_ok())
}

/// Ed25519 (pure) over `msg` with the verifier embassy-boot links.
#[cfg(all(feature = "ota-salty", not(feature = "ota")))]
fn ed25519_ok(key: &[u8; 32], msg: &[u8], sig: &[u8; 64]) -> bool {
    match (salty::PublicKey::try_from(key), salty::Signature::try_from(sig)) {
        (Ok(k), Ok(s)) => k.verify(msg, &s).is_ok(),
        _ => false,
    }
}

#[cfg(not(any(feature = "ota", feature = "ota-salty")))]
fn ed25519_ok(_: &[u8; 32], _: &[u8], _: &[u8; 64]) -> bool {
    // `_ota` alone chooses no verifier: nothing verifies.
    false
}

/// SHA-512 as a `digest` hasher, the implementation the verifier uses.
#[cfg(not(all(feature = "ota-salty", not(feature = "ota"))))]
type Sha512 = sha2::Sha512;

#[cfg(all(feature = "ota-salty", not(feature = "ota")))]
type Sha512 = salty_sha::Sha512;

#[cfg(all(feature = "ota-salty", not(feature = "ota")))]
mod salty_sha {
    //! salty's SHA-512 behind the `digest` traits (as embassy-boot's own adapter does).
    use digest::typenum::U64;
    use digest::{FixedOutput, HashMarker, OutputSizeUser, Update};

    pub(super) struct Sha512(salty::Sha512);

    impl Default for Sha512 {
        fn default() -> Self {
            Self(salty::Sha512::new())
        }
    }
    impl Update for Sha512 {
        fn update(&mut self, data: &[u8]) {
            self.0.update(data)
        }
    }
    impl FixedOutput for Sha512 {
        fn finalize_into(self, out: &mut digest::Output<Self>) {
            out.copy_from_slice(self.0.finalize().as_slice())
        }
    }
    impl OutputSizeUser for Sha512 {
        type OutputSize = U64;
    }
    impl HashMarker for Sha512 {}
}

/// What the adapter must do after [`Ota::wrote`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum After {
    Nothing,
    /// The whole image is in DFU: hash it and verify.
    Verify,
}

impl<R: NorFlash> Ota<R> {
    /// The state machine, resuming the job kept in `record`. `boot` is the bootloader state
    /// this boot found (embassy-boot `get_state`); `capacity` the DFU partition's size.
    pub fn new(cfg: Config, record: R, boot: &State, capacity: u32) -> Self {
        let mut ota = Self {
            key_id: key_id(&cfg.public_key),
            capacity,
            cfg,
            record: Record::new(record),
            job: None,
            reports: heapless::Deque::new(),
            request: [0; REQUEST_LEN],
            status: [0; STATUS_MAX],
        };
        ota.resume(boot);
        ota
    }

    fn resume(&mut self, boot: &State) {
        let kept = match self.record.load() {
            Ok(Some(k)) => k,
            Ok(None) => return,
            Err(_) => {
                warn!("OTA record unreadable");
                return;
            }
        };
        let m = &kept.manifest;
        let running = self.cfg.running;
        let step = match kept.last {
            DONE => return,
            VERIFIED if m.version == running && *boot == State::Swap => Step::Trial,
            VERIFIED if m.version == running => Step::Confirm,
            VERIFIED if *boot == State::Swap => Step::Marked,
            VERIFIED => Step::Reverted,
            _ if m.version <= running => {
                // Installed some other way meanwhile: nothing left to do.
                let _ = self.record.note(m, DONE);
                return;
            }
            _ => Step::Download,
        };
        let next = if step == Step::Download { kept.last.min(m.image_size) } else { m.image_size };
        info!("OTA job {} resumed at {} ({:?})", m.version, next, step);
        self.job = Some(Job {
            tag: tag(m),
            manifest: kept.manifest,
            step,
            next,
            requested: next,
            active_at: Millis(0),
            hold_until: Millis(0),
            retried: false,
        });
        if step == Step::Download {
            self.report(Phase::Downloading, None);
        }
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// The release being handled, if any: its manifest and bytes written.
    pub fn job(&self) -> Option<(&Manifest, u32)> {
        self.job.as_ref().map(|j| (&j.manifest, j.next))
    }

    /// True while marked for the swap: the firmware should reset (after its reports went out).
    pub fn reset_due(&self) -> bool {
        self.job.as_ref().is_some_and(|j| j.step == Step::Marked)
    }

    /// True while a download runs.
    pub fn downloading(&self) -> bool {
        self.job.as_ref().is_some_and(|j| j.step == Step::Download)
    }

    fn report(&mut self, phase: Phase, reason: Option<Reason>) {
        let r = match &self.job {
            Some(j) => Report {
                phase,
                reason,
                tag: Some(j.tag),
                version: Some(j.manifest.version),
                offset: j.next,
                size: j.manifest.image_size,
                running: matches!(phase, Phase::Rebooted | Phase::Confirmed | Phase::RolledBack)
                    .then_some(self.cfg.running),
            },
            None => Report { phase, reason, tag: None, version: None, offset: 0, size: 0, running: None },
        };
        self.push(r);
    }

    fn push(&mut self, r: Report) {
        if self.reports.is_full() {
            // The oldest progress report matters least.
            let _ = self.reports.pop_front();
        }
        let _ = self.reports.push_back(r);
    }

    /// An offer (`commands/ota/offer`'s payload). Returns true when the download starts; a
    /// refused offer is reported `failed` with its reason, and a job in progress goes on.
    pub fn offer(&mut self, payload: &[u8], now: Millis) -> bool {
        let m = match Manifest::decode(payload) {
            Ok(m) => m,
            Err(_) => {
                self.push(Report {
                    phase: Phase::Failed,
                    reason: Some(Reason::BadManifest),
                    tag: None,
                    version: None,
                    offset: 0,
                    size: 0,
                    running: None,
                });
                return false;
            }
        };
        if let Some(j) = &self.job {
            if j.tag == tag(&m) && j.manifest == m {
                // The same offer again (a re-delivery): the job goes on.
                return j.step == Step::Download;
            }
            if j.step != Step::Download {
                // Between the swap mark and the confirmation nothing else is taken.
                info!("OTA offer {} ignored: an update is being applied", m.version);
                return false;
            }
        }
        let capacity = self.capacity;
        let verdict = if !ed25519_ok(&self.cfg.public_key, &m.signed_part(), &m.manifest_signature) {
            // A key id that is not ours says more than "bad signature".
            if m.key_id != self.key_id {
                Err(Reason::Refused(Refusal::UnknownKey))
            } else {
                Err(Reason::BadManifestSignature)
            }
        } else {
            m.check_offer(&self.key_id, &self.cfg.board, self.cfg.running, capacity).map_err(Reason::Refused)
        }
        .and_then(|()| match &self.job {
            // A download in progress is replaced only by a newer release: a replayed offer of
            // an older one (also signed, also newer than the running image) would otherwise
            // pin the device below the release it was offered.
            Some(j) if m.version <= j.manifest.version => Err(Reason::Refused(Refusal::NotNewer)),
            _ => Ok(()),
        });
        if let Err(reason) = verdict {
            warn!("OTA offer {} refused: {}", m.version, reason.label());
            self.push(Report {
                phase: Phase::Failed,
                reason: Some(reason),
                tag: Some(tag(&m)),
                version: Some(m.version),
                offset: 0,
                size: m.image_size,
                running: None,
            });
            return false;
        }
        if self.record.start(&m).is_err() {
            self.job = None;
            self.push(Report {
                phase: Phase::Failed,
                reason: Some(Reason::Flash),
                tag: Some(tag(&m)),
                version: Some(m.version),
                offset: 0,
                size: m.image_size,
                running: None,
            });
            return false;
        }
        info!("OTA offer {} taken ({} bytes)", m.version, m.image_size);
        self.job = Some(Job {
            tag: tag(&m),
            manifest: m,
            step: Step::Download,
            next: 0,
            requested: 0,
            active_at: now,
            hold_until: now,
            retried: false,
        });
        self.report(Phase::Downloading, None);
        true
    }

    /// Fails the job: reported, recorded as done.
    fn fail(&mut self, reason: Reason) {
        warn!("OTA job failed: {}", reason.label());
        self.report(Phase::Failed, Some(reason));
        if let Some(j) = self.job.take() {
            let _ = self.record.note(&j.manifest, DONE);
        }
    }

    /// A chunk (`ota/chunk`'s payload): the bytes to write at an offset when it is the next
    /// one in order, `None` otherwise (a duplicate, a late answer, another release).
    /// `write` is the DFU write size: a broker whose `ota_max_chunk` is below `chunk_len`
    /// answers less than asked; a shorter answer in whole write units is taken, and the
    /// requests shrink to its length from then on.
    fn chunk<'p>(&mut self, payload: &'p [u8], now: Millis, write: usize) -> Option<(u32, &'p [u8])> {
        let c = Chunk::decode(payload)?;
        let chunk_len = u32::from(self.cfg.chunk_len);
        let retry = self.cfg.retry_ms;
        let j = self.job.as_mut().filter(|j| j.step == Step::Download && j.tag == c.tag)?;
        match c.status {
            ChunkStatus::Data => {
                let want = chunk_len.min(j.manifest.image_size - j.next) as usize;
                let n = c.data.len();
                if c.offset != j.next || n == 0 || n > want {
                    return None;
                }
                if n < want {
                    if n % write.max(1) != 0 {
                        return None;
                    }
                    // The broker's chunks are shorter: ask for that much, from here.
                    self.cfg.chunk_len = n as u16;
                    j.requested = j.next + n as u32;
                }
                Some((c.offset, c.data))
            }
            ChunkStatus::NotOffered => {
                self.fail(Reason::NotOffered);
                None
            }
            ChunkStatus::Busy | ChunkStatus::BeyondImage => {
                // Ask again from the first missing byte, later.
                j.requested = j.next;
                j.hold_until = now.plus(retry);
                j.active_at = now;
                None
            }
            ChunkStatus::Other(_) => None,
        }
    }

    /// `len` bytes at the job's offset were written (or not: `ok` false). `sector` is the DFU
    /// erase size: progress is recorded at each sector boundary passed.
    fn wrote(&mut self, now: Millis, len: u32, ok: bool, sector: u32) -> After {
        if !ok {
            self.fail(Reason::Flash);
            return After::Nothing;
        }
        let Some(j) = self.job.as_mut() else { return After::Nothing };
        let (before, size) = (j.next, j.manifest.image_size);
        j.next += len;
        j.active_at = now;
        let next = j.next;
        if next / sector.max(1) != before / sector.max(1) && next < size {
            let boundary = next - next % sector.max(1);
            if self.record.note(&j.manifest, boundary).is_err() {
                self.fail(Reason::Flash);
                return After::Nothing;
            }
        }
        if next >= size {
            return After::Verify;
        }
        let tenth = |n: u32| (u64::from(n) * 10 / u64::from(size)) as u32;
        if tenth(next) != tenth(before) {
            self.report(Phase::Downloading, None);
        }
        After::Nothing
    }

    /// The SHA-512 of DFU's first `size` bytes: true if it is the manifest's (then verify the
    /// signature); otherwise the image is downloaded once more, then the job fails.
    fn digest(&mut self, sha512: &[u8; 64]) -> bool {
        let Some(j) = self.job.as_mut() else { return false };
        if *sha512 == j.manifest.image_sha512 {
            return true;
        }
        if j.retried {
            self.fail(Reason::DigestMismatch);
        } else {
            warn!("OTA image digest mismatch: downloading again");
            j.retried = true;
            j.next = 0;
            j.requested = 0;
            let m = j.manifest.clone();
            if self.record.note(&m, 0).is_err() {
                self.fail(Reason::Flash);
            }
        }
        false
    }

    /// embassy-boot's verdict on the image signature.
    fn marked(&mut self, r: Result<(), FirmwareUpdaterError>) {
        match r {
            Ok(()) => {
                let Some(j) = self.job.as_mut() else { return };
                j.step = Step::Marked;
                let m = j.manifest.clone();
                if self.record.note(&m, VERIFIED).is_err() {
                    // Marked in the bootloader state all the same: the swap happens; the new
                    // image just cannot report `rebooted`.
                    warn!("OTA record: cannot note the verification");
                }
                info!("OTA image {} verified: marked for the swap", m.version);
                self.report(Phase::Verified, None);
            }
            Err(FirmwareUpdaterError::Signature(_)) => self.fail(Reason::BadSignature),
            Err(_) => self.fail(Reason::Flash),
        }
    }

    /// The broker admitted the device: true when this image must confirm itself now.
    fn admitted(&mut self) -> bool {
        let Some(j) = self.job.as_ref() else { return false };
        match j.step {
            Step::Trial => true,
            Step::Confirm => {
                self.confirmed(Ok(()));
                false
            }
            Step::Reverted => {
                self.report(Phase::RolledBack, None);
                self.finish();
                false
            }
            Step::Download => {
                // Ask again from the first missing byte at once.
                if let Some(j) = self.job.as_mut() {
                    j.requested = j.next;
                    j.hold_until = Millis(0);
                }
                false
            }
            Step::Marked => false,
        }
    }

    fn confirmed(&mut self, r: Result<(), FirmwareUpdaterError>) {
        match r {
            Ok(()) => {
                if self.job.as_ref().is_some_and(|j| j.step == Step::Trial) {
                    self.report(Phase::Rebooted, None);
                }
                self.report(Phase::Confirmed, None);
                self.finish();
            }
            Err(_) => self.fail(Reason::Flash),
        }
    }

    fn finish(&mut self) {
        if let Some(j) = self.job.take() {
            let _ = self.record.note(&j.manifest, DONE);
        }
    }

    /// The next message to publish: a status report first, then chunk requests while the
    /// window has room. Call until `None`, after every input and on a timer
    /// ([`Ota::poll_at`]).
    pub fn poll_transmit(&mut self, now: Millis) -> Option<Message<'_>> {
        if let Some(r) = self.reports.pop_front() {
            let n = r.write_json(&mut self.status)?;
            return Some(Message {
                suffix: STATUS_SUFFIX,
                payload: &self.status[..n],
                qos: QoS::AtLeastOnce,
            });
        }
        let (window, chunk, retry) =
            (u32::from(self.cfg.window.clamp(2, 4)), u32::from(self.cfg.chunk_len.max(1)), self.cfg.retry_ms);
        let j = self.job.as_mut().filter(|j| j.step == Step::Download)?;
        if now < j.hold_until {
            return None;
        }
        if j.requested > j.next && now >= j.active_at.plus(retry) {
            // Unanswered: ask again from the first missing byte (go-back-N).
            debug!("OTA: no chunk for {} ms, asking again at {}", retry, j.next);
            j.requested = j.next;
        }
        let size = j.manifest.image_size;
        if j.requested >= size || j.requested >= j.next + window * chunk {
            return None;
        }
        if j.requested == j.next {
            j.active_at = now;
        }
        let len = chunk.min(size - j.requested);
        self.request = encode_request(&j.tag, j.requested, len as u16);
        j.requested += len;
        Some(Message { suffix: GET_SUFFIX, payload: &self.request, qos: QoS::AtMostOnce })
    }

    /// When [`Ota::poll_transmit`] next has something to send by itself (a re-ask).
    pub fn poll_at(&self) -> Option<Millis> {
        let j = self.job.as_ref().filter(|j| j.step == Step::Download)?;
        Some(if j.requested > j.next { j.active_at.plus(self.cfg.retry_ms) } else { j.hold_until })
    }
}

/// How much of the buffer embassy-boot's `hash` reads at a time: it reads whole buffers, also
/// past the image, so the length must divide the partition (a power of two up to a sector).
fn hash_chunk(buf: usize, sector: usize) -> usize {
    let n = buf.min(sector).max(1);
    1 << (usize::BITS - 1 - n.leading_zeros())
}

/// Copies `data` into `buf` padded with 0xFF to the write size `w`; the padded length.
fn stage(buf: &mut [u8], data: &[u8], w: usize) -> Option<usize> {
    let padded = data.len().div_ceil(w.max(1)) * w.max(1);
    let dst = buf.get_mut(..padded)?;
    dst[..data.len()].copy_from_slice(data);
    dst[data.len()..].fill(0xFF);
    Some(padded)
}

/// The blocking driver: [`Ota`] plus embassy-boot's blocking updater and the write buffer
/// (at least `chunk_len` bytes, aligned as the DFU flash driver needs).
pub struct Updater<'d, DFU: NorFlash, STATE: NorFlash, R: NorFlash> {
    ota: Ota<R>,
    fw: BlockingFirmwareUpdater<'d, DFU, STATE>,
    buf: &'d mut [u8],
    capacity: u32,
}

impl<DFU: NorFlash, STATE: NorFlash, R: NorFlash> core::fmt::Debug for Updater<'_, DFU, STATE, R> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Updater").field("job", &self.ota.job()).finish_non_exhaustive()
    }
}

impl<'d, DFU: NorFlash, STATE: NorFlash, R: NorFlash> Updater<'d, DFU, STATE, R> {
    /// Resumes the job kept in `record`, if any. `dfu_capacity` is the DFU partition's size
    /// (the same flash `fw` was made with).
    #[inline(never)] // its frame (verifier, hashing) only while it runs, not in the caller's
    pub fn new(
        cfg: Config,
        mut fw: BlockingFirmwareUpdater<'d, DFU, STATE>,
        dfu_capacity: u32,
        record: R,
        buf: &'d mut [u8],
    ) -> Self {
        let boot = fw.get_state().unwrap_or(State::Boot);
        Self { ota: Ota::new(cfg, record, &boot, dfu_capacity), fw, buf, capacity: dfu_capacity }
    }

    /// The state machine (job, reports, timers).
    pub fn ota(&self) -> &Ota<R> {
        &self.ota
    }

    /// An offer's payload (`commands/ota/offer`).
    #[inline(never)] // its frame (verifier, hashing) only while it runs, not in the caller's
    pub fn offer(&mut self, payload: &[u8], now: Millis) -> bool {
        self.ota.offer(payload, now)
    }

    /// A chunk's payload (`ota/chunk`): written into DFU when it is the next in order; the
    /// last one starts the verification.
    #[inline(never)] // its frame (verifier, hashing) only while it runs, not in the caller's
    pub fn chunk(&mut self, payload: &[u8], now: Millis) {
        let Some((offset, data)) = self.ota.chunk(payload, now, DFU::WRITE_SIZE) else { return };
        let ok = stage(self.buf, data, DFU::WRITE_SIZE)
            .is_some_and(|n| self.fw.write_firmware(offset as usize, &self.buf[..n]).is_ok());
        if self.ota.wrote(now, data.len() as u32, ok, DFU::ERASE_SIZE as u32) == After::Verify {
            self.verify();
        }
    }

    #[inline(never)] // its frame (verifier, hashing) only while it runs, not in the caller's
    fn verify(&mut self) {
        let Some((m, _)) = self.ota.job() else { return };
        let (size, sig) = (m.image_size, m.image_signature);
        if size > self.capacity {
            // Never reached (checked at the offer): embassy-boot would panic.
            return self.ota.fail(Reason::Refused(Refusal::TooLarge));
        }
        let mut digest = [0u8; 64];
        let n = hash_chunk(self.buf.len(), DFU::ERASE_SIZE);
        let hashed = self.fw.hash::<Sha512>(size, &mut self.buf[..n], &mut digest);
        if hashed.is_err() {
            return self.ota.fail(Reason::Flash);
        }
        if self.ota.digest(&digest) {
            let r = self.fw.verify_and_mark_updated(&self.ota.cfg.public_key, &sig, size);
            self.ota.marked(r);
        }
    }

    /// The broker admitted the device with its certificate: a new image on trial confirms
    /// itself (`mark_booted`) and reports `rebooted` and `confirmed`; a rolled-back one reports
    /// `rolled_back`; a download asks again from where it stands.
    #[inline(never)] // its frame (verifier, hashing) only while it runs, not in the caller's
    pub fn connected(&mut self) {
        if self.ota.admitted() {
            let r = self.fw.mark_booted();
            self.ota.confirmed(r);
        }
    }

    /// The next message to publish ([`Ota::poll_transmit`]).
    pub fn poll_transmit(&mut self, now: Millis) -> Option<Message<'_>> {
        self.ota.poll_transmit(now)
    }

    /// True once the image is marked for the swap: reset when the `verified` report is out.
    pub fn reset_due(&self) -> bool {
        self.ota.reset_due()
    }
}

/// The async driver: [`Updater`] over embassy-boot's async updater
/// (`embedded-storage-async` DFU and state flash). The record stays a blocking `NorFlash`
/// (a few small writes per job).
pub struct AsyncUpdater<'d, DFU, STATE, R>
where
    DFU: embedded_storage_async::nor_flash::NorFlash,
    STATE: embedded_storage_async::nor_flash::NorFlash,
    R: NorFlash,
{
    ota: Ota<R>,
    fw: FirmwareUpdater<'d, DFU, STATE>,
    buf: &'d mut [u8],
    capacity: u32,
}

impl<DFU, STATE, R> core::fmt::Debug for AsyncUpdater<'_, DFU, STATE, R>
where
    DFU: embedded_storage_async::nor_flash::NorFlash,
    STATE: embedded_storage_async::nor_flash::NorFlash,
    R: NorFlash,
{
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("AsyncUpdater").field("job", &self.ota.job()).finish_non_exhaustive()
    }
}

impl<'d, DFU, STATE, R> AsyncUpdater<'d, DFU, STATE, R>
where
    DFU: embedded_storage_async::nor_flash::NorFlash,
    STATE: embedded_storage_async::nor_flash::NorFlash,
    R: NorFlash,
{
    /// [`Updater::new`].
    pub async fn new(
        cfg: Config,
        mut fw: FirmwareUpdater<'d, DFU, STATE>,
        dfu_capacity: u32,
        record: R,
        buf: &'d mut [u8],
    ) -> Self {
        let boot = fw.get_state().await.unwrap_or(State::Boot);
        Self { ota: Ota::new(cfg, record, &boot, dfu_capacity), fw, buf, capacity: dfu_capacity }
    }

    /// The state machine.
    pub fn ota(&self) -> &Ota<R> {
        &self.ota
    }

    /// [`Updater::offer`].
    pub fn offer(&mut self, payload: &[u8], now: Millis) -> bool {
        self.ota.offer(payload, now)
    }

    /// [`Updater::chunk`].
    pub async fn chunk(&mut self, payload: &[u8], now: Millis) {
        let Some((offset, data)) = self.ota.chunk(payload, now, DFU::WRITE_SIZE) else { return };
        let ok = match stage(self.buf, data, DFU::WRITE_SIZE) {
            Some(n) => self.fw.write_firmware(offset as usize, &self.buf[..n]).await.is_ok(),
            None => false,
        };
        if self.ota.wrote(now, data.len() as u32, ok, DFU::ERASE_SIZE as u32) == After::Verify {
            let Some((m, _)) = self.ota.job() else { return };
            let (size, sig) = (m.image_size, m.image_signature);
            if size > self.capacity {
                return self.ota.fail(Reason::Refused(Refusal::TooLarge));
            }
            let mut digest = [0u8; 64];
            let n = hash_chunk(self.buf.len(), DFU::ERASE_SIZE);
            if self.fw.hash::<Sha512>(size, &mut self.buf[..n], &mut digest).await.is_err() {
                return self.ota.fail(Reason::Flash);
            }
            if self.ota.digest(&digest) {
                let r = self.fw.verify_and_mark_updated(&self.ota.cfg.public_key, &sig, size).await;
                self.ota.marked(r);
            }
        }
    }

    /// [`Updater::connected`].
    pub async fn connected(&mut self) {
        if self.ota.admitted() {
            let r = self.fw.mark_booted().await;
            self.ota.confirmed(r);
        }
    }

    /// [`Ota::poll_transmit`].
    pub fn poll_transmit(&mut self, now: Millis) -> Option<Message<'_>> {
        self.ota.poll_transmit(now)
    }

    /// [`Updater::reset_due`].
    pub fn reset_due(&self) -> bool {
        self.ota.reset_due()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // test code
    use super::*;
    use ed25519_dalek::{Signer as _, SigningKey};
    use embassy_boot::{AlignedBuffer, FirmwareUpdaterConfig};
    use embedded_storage::nor_flash::{ErrorType, NorFlashErrorKind, ReadNorFlash};
    use sha2::Digest as _;
    use std::string::String;
    use std::vec::Vec;

    /// NOR flash in memory: erase sets 0xFF, a write may only clear bits, both whole units.
    struct MemFlash<const SIZE: usize, const ERASE: usize, const WRITE: usize>(Vec<u8>);

    impl<const SIZE: usize, const ERASE: usize, const WRITE: usize> MemFlash<SIZE, ERASE, WRITE> {
        fn new() -> Self {
            Self(std::vec![0xFF; SIZE])
        }
    }
    impl<const SIZE: usize, const ERASE: usize, const WRITE: usize> ErrorType for MemFlash<SIZE, ERASE, WRITE> {
        type Error = NorFlashErrorKind;
    }
    impl<const SIZE: usize, const ERASE: usize, const WRITE: usize> ReadNorFlash
        for MemFlash<SIZE, ERASE, WRITE>
    {
        const READ_SIZE: usize = 1;
        fn read(&mut self, offset: u32, bytes: &mut [u8]) -> Result<(), Self::Error> {
            let o = offset as usize;
            bytes.copy_from_slice(self.0.get(o..o + bytes.len()).ok_or(NorFlashErrorKind::OutOfBounds)?);
            Ok(())
        }
        fn capacity(&self) -> usize {
            SIZE
        }
    }
    impl<const SIZE: usize, const ERASE: usize, const WRITE: usize> NorFlash for MemFlash<SIZE, ERASE, WRITE> {
        const WRITE_SIZE: usize = WRITE;
        const ERASE_SIZE: usize = ERASE;
        fn erase(&mut self, from: u32, to: u32) -> Result<(), Self::Error> {
            embedded_storage::nor_flash::check_erase(self, from, to)?;
            self.0[from as usize..to as usize].fill(0xFF);
            Ok(())
        }
        fn write(&mut self, offset: u32, bytes: &[u8]) -> Result<(), Self::Error> {
            embedded_storage::nor_flash::check_write(self, offset, bytes.len())?;
            let o = offset as usize;
            let old = &mut self.0[o..o + bytes.len()];
            if old.iter().zip(bytes).any(|(o, b)| b & !o != 0) {
                return Err(NorFlashErrorKind::Other); // not erased
            }
            old.copy_from_slice(bytes);
            Ok(())
        }
    }
    impl<const SIZE: usize, const ERASE: usize, const WRITE: usize>
        embedded_storage_async::nor_flash::ReadNorFlash for MemFlash<SIZE, ERASE, WRITE>
    {
        const READ_SIZE: usize = 1;
        async fn read(&mut self, offset: u32, bytes: &mut [u8]) -> Result<(), Self::Error> {
            ReadNorFlash::read(self, offset, bytes)
        }
        fn capacity(&self) -> usize {
            SIZE
        }
    }
    impl<const SIZE: usize, const ERASE: usize, const WRITE: usize>
        embedded_storage_async::nor_flash::NorFlash for MemFlash<SIZE, ERASE, WRITE>
    {
        const WRITE_SIZE: usize = WRITE;
        const ERASE_SIZE: usize = ERASE;
        async fn erase(&mut self, from: u32, to: u32) -> Result<(), Self::Error> {
            NorFlash::erase(self, from, to)
        }
        async fn write(&mut self, offset: u32, bytes: &[u8]) -> Result<(), Self::Error> {
            NorFlash::write(self, offset, bytes)
        }
    }

    const SECTOR: usize = 4096;
    type Dfu = MemFlash<{ 8 * SECTOR }, SECTOR, 4>;
    type StateFlash = MemFlash<SECTOR, SECTOR, 4>;
    type RecordFlash = MemFlash<SECTOR, SECTOR, 4>;

    /// A board's flash that survives "power cuts" (dropping the updater).
    struct Board3 {
        dfu: Dfu,
        state: StateFlash,
        record: RecordFlash,
    }

    impl Board3 {
        fn new() -> Self {
            Self { dfu: Dfu::new(), state: StateFlash::new(), record: RecordFlash::new() }
        }
        fn state(&mut self) -> State {
            let mut w = AlignedBuffer([0u8; 4]);
            embassy_boot::BlockingFirmwareState::new(&mut self.state, &mut w.0).get_state().unwrap()
        }
    }

    fn board() -> crate::release::Board {
        crate::release::Board::parse("mps2-an386").unwrap()
    }

    fn station_key() -> SigningKey {
        SigningKey::from_bytes(&[7u8; 32])
    }

    fn image(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 31 % 251) as u8).collect()
    }

    /// A release as `fleet-provision release` makes it: the image signature over its SHA-512,
    /// the manifest signature over the signed part.
    fn release(
        img: &[u8],
        version: Version,
        board_name: &str,
        key: &SigningKey,
        image_key: &SigningKey,
    ) -> Vec<u8> {
        let digest: [u8; 64] = sha2::Sha512::digest(img).into();
        let mut m = Manifest {
            image_size: img.len() as u32,
            version,
            min_version: Version::ZERO,
            board: crate::release::Board::parse(board_name).unwrap(),
            key_id: key_id(&key.verifying_key().to_bytes()),
            image_sha512: digest,
            image_signature: image_key.sign(&digest).to_bytes(),
            manifest_signature: [0; 64],
        };
        m.manifest_signature = key.sign(&m.signed_part()).to_bytes();
        m.encode().to_vec()
    }

    fn cfg() -> Config {
        Config {
            retry_ms: 1_000,
            ..Config::new(board(), Version::new(1, 0, 0), station_key().verifying_key().to_bytes())
        }
    }

    type Up<'d> = Updater<'d, &'d mut Dfu, &'d mut StateFlash, &'d mut RecordFlash>;

    fn updater<'d>(b: &'d mut Board3, cfg: Config, word: &'d mut [u8; 4], buf: &'d mut [u8]) -> Up<'d> {
        let fw = BlockingFirmwareUpdater::new(
            FirmwareUpdaterConfig { dfu: &mut b.dfu, state: &mut b.state },
            word,
        );
        Updater::new(cfg, fw, (8 * SECTOR) as u32, &mut b.record, buf)
    }

    /// The broker's side as the spec says: answers each `ota/get` with `min(len, size-offset)`
    /// bytes of `img`, records statuses and requests. `drop`: requests it leaves unanswered
    /// (their order numbers); `stop_after`: answers no more after this many chunks.
    struct Peer {
        img: Vec<u8>,
        tag: [u8; 8],
        statuses: Vec<String>,
        requests: Vec<(u32, u16)>,
        answered: usize,
        drop: Vec<usize>,
        stop_after: Option<usize>,
        max_outstanding: usize,
        /// The broker's `ota_max_chunk`.
        max_chunk: usize,
    }

    impl Peer {
        fn new(img: Vec<u8>, manifest: &[u8]) -> Self {
            let tag = tag(&Manifest::decode(manifest).unwrap());
            Self {
                img,
                tag,
                statuses: Vec::new(),
                requests: Vec::new(),
                answered: 0,
                drop: Vec::new(),
                stop_after: None,
                max_outstanding: 0,
                max_chunk: MAX_CHUNK,
            }
        }

        fn answer(&self, req: &[u8]) -> Vec<u8> {
            assert_eq!(req.len(), REQUEST_LEN);
            let off = u32::from_le_bytes(req[8..12].try_into().unwrap()) as usize;
            let len = u16::from_le_bytes(req[12..14].try_into().unwrap()) as usize;
            let mut c = req[..12].to_vec();
            if &req[..8] != self.tag.as_slice() {
                c.push(1);
                return c;
            }
            if off >= self.img.len() {
                c.push(2);
                return c;
            }
            c.push(0);
            c.extend_from_slice(&self.img[off..(off + len.min(self.max_chunk)).min(self.img.len())]);
            c
        }

        /// Runs the device until it has nothing to say and nothing is answered, at most
        /// `rounds` times, advancing the clock by `step` ms per round.
        fn run(&mut self, up: &mut Up<'_>, now: &mut u64, rounds: usize, step: u64) {
            for _ in 0..rounds {
                let mut pending = Vec::new();
                while let Some(msg) = up.poll_transmit(Millis(*now)) {
                    match msg.suffix {
                        STATUS_SUFFIX => {
                            assert_eq!(msg.qos, QoS::AtLeastOnce);
                            self.statuses.push(String::from_utf8(msg.payload.to_vec()).unwrap());
                        }
                        GET_SUFFIX => {
                            assert_eq!(msg.qos, QoS::AtMostOnce);
                            let off = u32::from_le_bytes(msg.payload[8..12].try_into().unwrap());
                            let len = u16::from_le_bytes(msg.payload[12..14].try_into().unwrap());
                            self.requests.push((off, len));
                            pending.push(msg.payload.to_vec());
                        }
                        s => panic!("unexpected suffix {s}"),
                    }
                }
                self.max_outstanding = self.max_outstanding.max(pending.len());
                for req in pending {
                    if self.stop_after.is_some_and(|s| self.answered >= s) {
                        continue;
                    }
                    self.answered += 1;
                    if self.drop.contains(&self.answered) {
                        continue;
                    }
                    let chunk = self.answer(&req);
                    up.chunk(&chunk, Millis(*now));
                }
                *now += step;
            }
        }
    }

    fn state_of(status: &str) -> String {
        let v: serde_json::Value = serde_json::from_str(status).unwrap();
        v["state"].as_str().unwrap().into()
    }

    #[test]
    fn whole_download_verifies_marks_and_confirms_after_the_reboot() {
        let img = image(10 * 1024 + 123);
        let offer = release(&img, Version::new(1, 1, 0), "mps2-an386", &station_key(), &station_key());
        let mut b = Board3::new();
        let mut peer = Peer::new(img.clone(), &offer);
        let mut now = 0;
        {
            let (mut word, mut buf) = ([0u8; 4], [0u8; 1024]);
            let mut up = updater(&mut b, cfg(), &mut word, &mut buf);
            assert!(up.offer(&offer, Millis(now)));
            peer.run(&mut up, &mut now, 40, 10);
            assert!(up.reset_due());
        }
        // Window 2 (the default), every request in order, 1 KiB each.
        assert_eq!(peer.max_outstanding, 2);
        let offsets: Vec<u32> = peer.requests.iter().map(|r| r.0).collect();
        assert_eq!(offsets, (0..11).map(|i| i * 1024).collect::<Vec<u32>>());
        assert_eq!(peer.requests.last(), Some(&(10 * 1024, 123)));
        assert_eq!(&b.dfu.0[..img.len()], &img[..]);
        assert_eq!(b.state(), State::Swap);
        assert_eq!(peer.statuses.last().map(|s| state_of(s)).as_deref(), Some("verified"));

        // The bootloader swapped; the new image (1.1.0) runs on trial and connects.
        let mut peer2 = Peer::new(img.clone(), &offer);
        let (mut word, mut buf) = ([0u8; 4], [0u8; 1024]);
        let c = Config { running: Version::new(1, 1, 0), ..cfg() };
        let mut up = updater(&mut b, c, &mut word, &mut buf);
        peer2.run(&mut up, &mut now, 1, 10);
        assert!(peer2.statuses.is_empty(), "nothing said before the broker admitted it");
        up.connected();
        peer2.run(&mut up, &mut now, 2, 10);
        let states: Vec<String> = peer2.statuses.iter().map(|s| state_of(s)).collect();
        assert_eq!(states, ["rebooted", "confirmed"]);
        assert!(peer2.statuses[1].contains("\"running\":\"1.1.0\""));
        drop(up);
        assert_eq!(b.state(), State::Boot, "mark_booted");
        // Done: another boot reports nothing more.
        let (mut word, mut buf) = ([0u8; 4], [0u8; 1024]);
        let mut up = updater(&mut b, Config { running: Version::new(1, 1, 0), ..cfg() }, &mut word, &mut buf);
        up.connected();
        assert_eq!(up.poll_transmit(Millis(now)), None);
    }

    #[test]
    fn the_status_sequence_is_the_specs() {
        let img = image(20 * 512);
        let offer = release(&img, Version::new(1, 2, 0), "mps2-an386", &station_key(), &station_key());
        let mut b = Board3::new();
        let mut peer = Peer::new(img.clone(), &offer);
        let (mut word, mut buf) = ([0u8; 4], [0u8; 1024]);
        let c = Config { chunk_len: 512, window: 4, ..cfg() };
        let mut up = updater(&mut b, c, &mut word, &mut buf);
        let mut now = 0;
        assert!(up.offer(&offer, Millis(now)));
        peer.run(&mut up, &mut now, 30, 10);
        assert_eq!(peer.max_outstanding, 4);
        let t: String = Manifest::decode(&offer).unwrap().image_sha512[..8]
            .iter()
            .map(|b| std::format!("{b:02x}"))
            .collect();
        let mut want: Vec<String> = (0..10)
            .map(|i| {
                std::format!(
                    "{{\"release\":\"{t}\",\"version\":\"1.2.0\",\"state\":\"downloading\",\"offset\":{},\"size\":10240}}",
                    i * 1024
                )
            })
            .collect();
        want.push(std::format!(
            "{{\"release\":\"{t}\",\"version\":\"1.2.0\",\"state\":\"verified\",\"offset\":10240,\"size\":10240}}"
        ));
        assert_eq!(peer.statuses, want);
    }

    #[test]
    fn a_power_cut_resumes_at_the_last_sector_boundary() {
        let img = image(5 * SECTOR + 100);
        let offer = release(&img, Version::new(2, 0, 0), "mps2-an386", &station_key(), &station_key());
        let mut b = Board3::new();
        let mut now = 0;
        let mut peer = Peer::new(img.clone(), &offer);
        // 1,000-byte chunks do not divide a sector: progress is recorded at the boundary
        // passed, never at the chunk's end (a fresh updater erases the sector it enters).
        let c = Config { chunk_len: 1000, ..cfg() };
        peer.stop_after = Some(11); // 11,000 bytes: sectors 0 and 1 written whole, sector 2 in part
        {
            let (mut word, mut buf) = ([0u8; 4], [0u8; 1024]);
            let mut up = updater(&mut b, c, &mut word, &mut buf);
            assert!(up.offer(&offer, Millis(now)));
            peer.run(&mut up, &mut now, 20, 10);
            assert_eq!(up.ota().job().map(|(_, n)| n), Some(11_000));
        } // power cut
        let mut peer = Peer::new(img.clone(), &offer);
        let (mut word, mut buf) = ([0u8; 4], [0u8; 1024]);
        let mut up = updater(&mut b, c, &mut word, &mut buf);
        assert_eq!(up.ota().job().map(|(_, n)| n), Some(2 * SECTOR as u32), "no new offer needed");
        up.connected();
        peer.run(&mut up, &mut now, 40, 10);
        assert_eq!(peer.requests.first(), Some(&(2 * SECTOR as u32, 1000)));
        assert!(up.reset_due());
        assert_eq!(peer.requests.iter().filter(|r| r.0 == 0).count(), 0, "not downloaded again");
        drop(up);
        assert_eq!(&b.dfu.0[..img.len()], &img[..]);
        assert_eq!(b.state(), State::Swap);
        assert_eq!(state_of(&peer.statuses[0]), "downloading");
        assert!(peer.statuses[0].contains("\"offset\":8192"));
    }

    #[test]
    fn a_lost_chunk_is_asked_again_after_the_timeout() {
        let img = image(6 * 1024);
        let offer = release(&img, Version::new(1, 1, 0), "mps2-an386", &station_key(), &station_key());
        let mut b = Board3::new();
        let mut peer = Peer::new(img.clone(), &offer);
        peer.drop = std::vec![3];
        let (mut word, mut buf) = ([0u8; 4], [0u8; 1024]);
        let mut up = updater(&mut b, cfg(), &mut word, &mut buf);
        let mut now = 0;
        assert!(up.offer(&offer, Millis(now)));
        peer.run(&mut up, &mut now, 10, 10);
        // Stuck at 2 KiB: the third chunk was lost, the fourth arrived out of order.
        assert_eq!(up.ota().job().map(|(_, n)| n), Some(2048));
        assert_eq!(up.ota().poll_at(), Some(Millis(1010)), "retry 1 s after the last chunk taken");
        peer.run(&mut up, &mut now, 150, 10);
        assert!(up.reset_due());
        let asked_2048 = peer.requests.iter().filter(|r| r.0 == 2048).count();
        assert_eq!(asked_2048, 2);
        drop(up);
        assert_eq!(&b.dfu.0[..img.len()], &img[..]);
    }

    fn refused(offer: &[u8], c: Config) -> (Vec<String>, State) {
        let mut b = Board3::new();
        let mut peer = Peer::new(
            image(4),
            &release(&image(4), Version::new(9, 0, 0), "x", &station_key(), &station_key()),
        );
        let (mut word, mut buf) = ([0u8; 4], [0u8; 1024]);
        let mut up = updater(&mut b, c, &mut word, &mut buf);
        let mut now = 0;
        assert!(!up.offer(offer, Millis(now)));
        peer.run(&mut up, &mut now, 3, 10);
        assert!(peer.requests.is_empty(), "nothing downloaded");
        assert!(up.ota().job().is_none());
        drop(up);
        (peer.statuses, b.state())
    }

    fn reason(statuses: &[String]) -> String {
        assert_eq!(statuses.len(), 1, "{statuses:?}");
        let v: serde_json::Value = serde_json::from_str(&statuses[0]).unwrap();
        assert_eq!(v["state"], "failed");
        v["reason"].as_str().unwrap().into()
    }

    #[test]
    fn a_bad_manifest_signature_is_refused() {
        let img = image(3000);
        let mut offer = release(&img, Version::new(1, 1, 0), "mps2-an386", &station_key(), &station_key());
        offer[20] ^= 2; // patch: 1.1.0 -> 1.1.2 after signing
        let (s, state) = refused(&offer, cfg());
        assert_eq!(reason(&s), "bad_manifest_signature");
        assert_eq!(state, State::Boot);
        // Signed by another key that claims to be the station's key id.
        let other = SigningKey::from_bytes(&[9u8; 32]);
        let mut m = Manifest::decode(&release(
            &img,
            Version::new(1, 1, 0),
            "mps2-an386",
            &station_key(),
            &station_key(),
        ))
        .unwrap();
        m.manifest_signature = other.sign(&m.signed_part()).to_bytes();
        assert_eq!(reason(&refused(&m.encode(), cfg()).0), "bad_manifest_signature");
        // Signed by another station: its own key id.
        let theirs = release(&img, Version::new(1, 1, 0), "mps2-an386", &other, &other);
        assert_eq!(reason(&refused(&theirs, cfg()).0), "unknown_key");
        // Not a manifest.
        assert_eq!(reason(&refused(&offer[..200], cfg()).0), "bad_manifest");
    }

    #[test]
    fn another_boards_release_is_refused() {
        let offer =
            release(&image(3000), Version::new(1, 1, 0), "nucleo-f429zi", &station_key(), &station_key());
        assert_eq!(reason(&refused(&offer, cfg()).0), "wrong_board");
    }

    #[test]
    fn a_release_not_newer_is_refused() {
        let key = station_key();
        for v in [Version::new(1, 0, 0), Version::new(0, 9, 9)] {
            let offer = release(&image(3000), v, "mps2-an386", &key, &key);
            assert_eq!(reason(&refused(&offer, cfg()).0), "not_newer");
        }
        // Too large for DFU: refused before a byte (embassy-boot would panic on it).
        let offer = release(&image(8 * SECTOR + 4), Version::new(1, 1, 0), "mps2-an386", &key, &key);
        assert_eq!(reason(&refused(&offer, cfg()).0), "too_large");
    }

    #[test]
    fn a_digest_mismatch_downloads_once_more_then_fails() {
        let img = image(3 * 1024);
        let offer = release(&img, Version::new(1, 1, 0), "mps2-an386", &station_key(), &station_key());
        let mut served = img.clone();
        served[1500] ^= 0x40;
        let mut b = Board3::new();
        let mut peer = Peer::new(served, &offer);
        let (mut word, mut buf) = ([0u8; 4], [0u8; 1024]);
        let mut up = updater(&mut b, cfg(), &mut word, &mut buf);
        let mut now = 0;
        assert!(up.offer(&offer, Millis(now)));
        peer.run(&mut up, &mut now, 30, 10);
        assert!(!up.reset_due());
        assert_eq!(peer.requests.iter().filter(|r| r.0 == 0).count(), 2, "downloaded twice");
        assert_eq!(peer.statuses.last().map(|s| s.contains("\"reason\":\"digest_mismatch\"")), Some(true));
        drop(up);
        assert_eq!(b.state(), State::Boot);
    }

    #[test]
    fn a_bad_image_signature_is_refused_by_embassy_boot() {
        let img = image(3 * 1024 + 8);
        // The manifest is the station's, but its image signature is another key's.
        let offer = release(
            &img,
            Version::new(1, 1, 0),
            "mps2-an386",
            &station_key(),
            &SigningKey::from_bytes(&[3; 32]),
        );
        let mut b = Board3::new();
        let mut peer = Peer::new(img, &offer);
        let (mut word, mut buf) = ([0u8; 4], [0u8; 1024]);
        let mut up = updater(&mut b, cfg(), &mut word, &mut buf);
        let mut now = 0;
        assert!(up.offer(&offer, Millis(now)));
        peer.run(&mut up, &mut now, 30, 10);
        assert!(!up.reset_due());
        assert_eq!(peer.statuses.last().map(|s| s.contains("\"reason\":\"bad_signature\"")), Some(true));
        drop(up);
        assert_eq!(b.state(), State::Boot);
    }

    #[test]
    fn an_image_that_never_confirmed_reports_rolled_back() {
        let img = image(2048);
        let offer = release(&img, Version::new(1, 1, 0), "mps2-an386", &station_key(), &station_key());
        let mut b = Board3::new();
        let mut now = 0;
        {
            let mut peer = Peer::new(img.clone(), &offer);
            let (mut word, mut buf) = ([0u8; 4], [0u8; 1024]);
            let mut up = updater(&mut b, cfg(), &mut word, &mut buf);
            assert!(up.offer(&offer, Millis(now)));
            peer.run(&mut up, &mut now, 10, 10);
            assert!(up.reset_due());
        }
        // The bootloader reverted (state Revert): the old 1.0.0 runs again.
        b.state.0[..4].fill(0xC0);
        let mut peer = Peer::new(img.clone(), &offer);
        let (mut word, mut buf) = ([0u8; 4], [0u8; 1024]);
        let mut up = updater(&mut b, cfg(), &mut word, &mut buf);
        up.connected();
        peer.run(&mut up, &mut now, 1, 10);
        assert_eq!(peer.statuses.len(), 1);
        assert!(peer.statuses[0]
            .contains("\"state\":\"rolled_back\",\"offset\":2048,\"size\":2048,\"running\":\"1.0.0\""));
    }

    #[test]
    fn a_broker_with_shorter_chunks_is_followed() {
        let img = image(5 * 1024 + 6);
        let offer = release(&img, Version::new(1, 1, 0), "mps2-an386", &station_key(), &station_key());
        let mut b = Board3::new();
        let mut peer = Peer::new(img.clone(), &offer);
        peer.max_chunk = 256; // the broker's ota_max_chunk
        let (mut word, mut buf) = ([0u8; 4], [0u8; 1024]);
        let mut up = updater(&mut b, cfg(), &mut word, &mut buf);
        let mut now = 0;
        assert!(up.offer(&offer, Millis(now)));
        peer.run(&mut up, &mut now, 200, 10);
        assert!(up.reset_due(), "{:?}", peer.statuses.last());
        assert!(peer.requests.iter().skip(2).all(|r| r.1 <= 256), "{:?}", &peer.requests[..4]);
        drop(up);
        assert_eq!(&b.dfu.0[..img.len()], &img[..]);
    }

    #[test]
    fn not_offered_stops_the_job() {
        let img = image(2048);
        let offer = release(&img, Version::new(1, 1, 0), "mps2-an386", &station_key(), &station_key());
        let mut b = Board3::new();
        let mut peer = Peer::new(img, &offer);
        peer.tag = [0; 8]; // the broker has no job for this tag
        let (mut word, mut buf) = ([0u8; 4], [0u8; 1024]);
        let mut up = updater(&mut b, cfg(), &mut word, &mut buf);
        let mut now = 0;
        assert!(up.offer(&offer, Millis(now)));
        peer.run(&mut up, &mut now, 5, 10);
        assert_eq!(peer.statuses.last().map(|s| s.contains("\"reason\":\"not_offered\"")), Some(true));
        assert!(up.ota().job().is_none());
    }

    #[test]
    fn an_older_signed_release_cannot_replace_a_download_in_progress() {
        // A broker (or a replay of an old offer) cannot swap the job for an older release the
        // station also signed: the device would otherwise install 1.1.0 while 1.2.0 is offered.
        let key = station_key();
        let img = image(4 * 1024);
        let newer = release(&img, Version::new(1, 2, 0), "mps2-an386", &key, &key);
        let older_img = image(3 * 1024 + 7);
        let older = release(&older_img, Version::new(1, 1, 0), "mps2-an386", &key, &key);
        let mut b = Board3::new();
        let mut peer = Peer::new(img.clone(), &newer);
        peer.stop_after = Some(2);
        let (mut word, mut buf) = ([0u8; 4], [0u8; 1024]);
        let mut up = updater(&mut b, cfg(), &mut word, &mut buf);
        let mut now = 0;
        assert!(up.offer(&newer, Millis(now)));
        peer.run(&mut up, &mut now, 3, 10);
        assert_eq!(up.ota().job().map(|(m, n)| (m.version, n)), Some((Version::new(1, 2, 0), 2048)));
        // The same release's offer again is the same job; an older one is refused.
        assert!(up.offer(&newer, Millis(now)));
        assert!(!up.offer(&older, Millis(now)));
        assert_eq!(up.ota().job().map(|(m, n)| (m.version, n)), Some((Version::new(1, 2, 0), 2048)));
        peer.stop_after = None;
        peer.run(&mut up, &mut now, 40, 1_100);
        assert!(up.reset_due());
        assert_eq!(up.ota().job().map(|(m, _)| m.version), Some(Version::new(1, 2, 0)));
        assert!(peer.statuses.iter().any(|s| s.contains("\"reason\":\"not_newer\"")));
    }

    #[test]
    fn the_request_and_chunk_layouts_are_the_specs() {
        let r = encode_request(&[1, 2, 3, 4, 5, 6, 7, 8], 0x0001_0400, 1024);
        assert_eq!(r, [1, 2, 3, 4, 5, 6, 7, 8, 0x00, 0x04, 0x01, 0x00, 0x00, 0x04]);
        let c = [1, 2, 3, 4, 5, 6, 7, 8, 0x00, 0x04, 0x01, 0x00, 0, 0xAA, 0xBB];
        assert_eq!(
            Chunk::decode(&c),
            Some(Chunk {
                tag: [1, 2, 3, 4, 5, 6, 7, 8],
                offset: 0x10400,
                status: ChunkStatus::Data,
                data: &[0xAA, 0xBB]
            })
        );
        assert_eq!(Chunk::decode(&c[..12]), None);
        assert_eq!(Chunk::decode(&c[..13]).map(|c| c.status), Some(ChunkStatus::Data));
    }

    /// The async driver over the same flash, polled without an executor (memory flash never
    /// waits).
    #[test]
    fn the_async_driver_downloads_and_marks() {
        fn block_on<F: core::future::Future>(f: F) -> F::Output {
            let waker = core::task::Waker::noop();
            let mut cx = core::task::Context::from_waker(waker);
            let mut f = core::pin::pin!(f);
            loop {
                if let core::task::Poll::Ready(v) = f.as_mut().poll(&mut cx) {
                    return v;
                }
            }
        }
        let img = image(5000);
        let offer = release(&img, Version::new(1, 1, 0), "mps2-an386", &station_key(), &station_key());
        let peer = Peer::new(img.clone(), &offer);
        let mut b = Board3::new();
        let (mut word, mut buf) = ([0u8; 4], [0u8; 1024]);
        block_on(async {
            let fw = FirmwareUpdater::new(
                FirmwareUpdaterConfig { dfu: &mut b.dfu, state: &mut b.state },
                &mut word,
            );
            let mut up = AsyncUpdater::new(cfg(), fw, (8 * SECTOR) as u32, &mut b.record, &mut buf).await;
            assert!(up.offer(&offer, Millis(0)));
            for t in 0..20 {
                let mut reqs = Vec::new();
                while let Some(m) = up.poll_transmit(Millis(t)) {
                    if m.suffix == GET_SUFFIX {
                        reqs.push(m.payload.to_vec());
                    }
                }
                for r in reqs {
                    up.chunk(&peer.answer(&r), Millis(t)).await;
                }
            }
            assert!(up.reset_due());
        });
        assert_eq!(&b.dfu.0[..img.len()], &img[..]);
        assert_eq!(b.state(), State::Swap);
    }
}
