//! The application's side of the A/B bootloader (feature `ota`, see `bin/bootloader.rs` and
//! `ota_layout.rs`): what this image is, confirming it, and marking a verified update.
//!
//! - The image carries its own description (`IMAGE_INFO`): its version and the ed25519 public
//!   key its successors must be signed with, stamped into the linked image by the release
//!   tooling (for tests, `fleet_tests::ota_flash`, with a key made at test time). An unstamped
//!   image has an all-zero key: every update is refused.
//! - After a swap the bootloader boots the new image on trial (embassy-boot state `Swap`); it
//!   confirms itself (`mark_booted`) only once the broker has admitted it with its certificate.
//!   An image that cannot get there resets the board instead (`give_up`), and the bootloader
//!   reverts it; an image that never confirms is reverted at the next reset whatever the cause.
//! - Updates arrive as offers (`commands/ota/offer`, a signed manifest) and are downloaded in
//!   chunks by the SDK's `fleet_device::ota::Updater` (docs/spec/ota.md): the manifest
//!   signature and the offer rule (this board, newer than this image, fits ACTIVE) before a
//!   byte, chunks in order into DFU with the progress in a record page of the flash file
//!   (resumed after a power cut), then SHA-512 and embassy-boot's `verify_and_mark_updated`
//!   under the key stamped in this image. With a verifier feature (`ota`: ed25519-dalek,
//!   `ota-salty`: salty) embassy-boot has no unverified `mark_updated` on the updater: there
//!   is no unverified path here.

use embassy_boot::{
    AlignedBuffer, BlockingFirmwareState, BlockingFirmwareUpdater, FirmwareUpdaterConfig,
    FirmwareUpdaterError, State,
};
use fleet_device::ota::Config;
use fleet_device::release::{Board, Version};

use crate::host_flash::{DfuFlash, FlashError, HostFlash, StateFlash};
use crate::ota_layout::{
    ACTIVE_SIZE, DFU_OFFSET, INFO_KEY, INFO_MAGIC, INFO_SIZE, INFO_VERSION, RECORD_OFFSET, RECORD_SIZE,
    STATE_OFFSET, WRITE,
};

/// This image's description block (layout in `ota_layout.rs`), patched after linking.
#[used]
static IMAGE_INFO: [u8; INFO_SIZE] = unstamped();

const fn unstamped() -> [u8; INFO_SIZE] {
    let mut out = [0u8; INFO_SIZE];
    let version = b"unstamped";
    let mut i = 0;
    while i < INFO_MAGIC.len() {
        out[i] = INFO_MAGIC[i];
        i += 1;
    }
    let mut j = 0;
    while j < version.len() {
        out[INFO_MAGIC.len() + j] = version[j];
        j += 1;
    }
    out
}

/// The running image's description.
pub(crate) struct ImageInfo {
    raw: [u8; INFO_SIZE],
}

impl ImageInfo {
    /// As stamped into the running image.
    pub(crate) fn read() -> Self {
        // SAFETY: a read of a static that lives for the whole program. Volatile, because the
        // bytes in the image are patched after linking: the compiler must not fold in the
        // initializer above.
        let raw = unsafe { core::ptr::read_volatile(core::ptr::addr_of!(IMAGE_INFO)) };
        ImageInfo { raw }
    }

    pub(crate) fn version(&self) -> &str {
        let field = &self.raw[INFO_MAGIC.len()..INFO_MAGIC.len() + INFO_VERSION];
        let len = field.iter().position(|&b| b == 0).unwrap_or(field.len());
        core::str::from_utf8(&field[..len]).unwrap_or("(not UTF-8)")
    }

    pub(crate) fn key(&self) -> [u8; INFO_KEY] {
        let mut key = [0u8; INFO_KEY];
        key.copy_from_slice(&self.raw[INFO_SIZE - INFO_KEY..]);
        key
    }
}

/// Why an update step failed.
#[derive(Debug)]
pub(crate) enum OtaError {
    /// The update flash could not be opened, read or written.
    Flash,
    /// The signature does not verify under the running image's key.
    Signature,
    /// The state partition is mid-update (a trial boot must confirm before taking another).
    BadState,
    /// The announced length is 0 or does not fit ACTIVE.
    Length,
}

impl From<FlashError> for OtaError {
    fn from(_: FlashError) -> Self {
        OtaError::Flash
    }
}

impl From<FirmwareUpdaterError> for OtaError {
    fn from(e: FirmwareUpdaterError) -> Self {
        match e {
            FirmwareUpdaterError::Flash(_) => OtaError::Flash,
            FirmwareUpdaterError::Signature(_) => OtaError::Signature,
            FirmwareUpdaterError::BadState => OtaError::BadState,
        }
    }
}

fn state_flash() -> Result<StateFlash, OtaError> {
    Ok(HostFlash::open(STATE_OFFSET)?)
}

/// The bootloader's state as this boot found it: `Swap` while on trial.
pub(crate) fn state() -> Result<State, OtaError> {
    let mut word = AlignedBuffer([0u8; WRITE as usize]);
    Ok(BlockingFirmwareState::new(state_flash()?, &mut word.0).get_state()?)
}

/// Is this a trial boot (swapped in, not yet confirmed)?
pub(crate) fn on_trial() -> bool {
    matches!(state(), Ok(State::Swap))
}

/// Confirms the running image: the bootloader keeps it from now on. False (and no write) when
/// it already was.
pub(crate) fn confirm() -> Result<bool, OtaError> {
    let mut word = AlignedBuffer([0u8; WRITE as usize]);
    let mut state = BlockingFirmwareState::new(state_flash()?, &mut word.0);
    if state.get_state()? == State::Boot {
        return Ok(false);
    }
    state.mark_booted()?;
    Ok(true)
}

/// This board's name in release manifests.
pub(crate) const BOARD: &str = "mps2-an386";

/// The updater's DFU bytes: what the swap moves (ACTIVE's size; DFU has one spare page).
const CAPACITY: u32 = ACTIVE_SIZE;

/// The record of the OTA job: one page of the flash file after DFU.
pub(crate) type RecordFlash = HostFlash<{ RECORD_SIZE }>;

/// `fleet_device::ota`'s blocking driver over the flash file.
pub(crate) type Updater<'d> = fleet_device::ota::Updater<'d, DfuFlash, StateFlash, RecordFlash>;

/// The SDK's updater for this image: trusts the key stamped in it, runs its stamped version
/// (an unstamped image runs "0.0.0" with an all-zero key: it takes nothing). It resumes a job
/// kept in the record (a download after a power cut, a swap to confirm or a rollback to report).
pub(crate) fn updater<'d>(word: &'d mut [u8], buf: &'d mut [u8]) -> Result<Updater<'d>, OtaError> {
    let info = ImageInfo::read();
    let running = Version::parse(info.version()).unwrap_or(Version::ZERO);
    let board = Board::parse(BOARD).map_err(|_| OtaError::Length)?;
    let cfg = Config { window: 2, ..Config::new(board, running, info.key()) };
    let dfu: DfuFlash = HostFlash::open(DFU_OFFSET)?;
    let fw = BlockingFirmwareUpdater::new(FirmwareUpdaterConfig { dfu, state: state_flash()? }, word);
    let record: RecordFlash = HostFlash::open(RECORD_OFFSET)?;
    Ok(fleet_device::ota::Updater::new(cfg, fw, CAPACITY, record, buf))
}

/// What to do once a command's acknowledgement is stored.
pub(crate) enum After {
    /// Reset the board (the bootloader then swaps in a marked update).
    Reboot,
}

/// The `reboot` command. Returns what to do after the acknowledgement and its payload; `None`
/// for other commands. (Updates arrive as offers: `fleet_device::ota`.)
pub(crate) fn command(name: &str, _payload: &[u8]) -> Option<(After, &'static str)> {
    match name {
        "reboot" => {
            say!("reboot requested");
            Some((After::Reboot, "rebooting"))
        }
        _ => None,
    }
}

/// Resets the board (SYSRESETREQ): the bootloader runs again.
pub(crate) fn reboot() -> ! {
    say!("resetting (SYSRESETREQ)");
    cortex_m::peripheral::SCB::sys_reset()
}
