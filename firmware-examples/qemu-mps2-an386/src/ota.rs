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
//! - An update already in DFU (the download path writes it there; tests place it from the
//!   host) is marked for the swap only through embassy-boot's `verify_and_mark_updated`: the
//!   ed25519 signature over the SHA-512 of the image, under the key of the running image.
//!   Without feature `ed25519-dalek` embassy-boot has no unverified `mark_updated` on the
//!   updater, and this build enables it: there is no unverified path here.

use embassy_boot::{
    AlignedBuffer, BlockingFirmwareState, BlockingFirmwareUpdater, FirmwareUpdaterConfig,
    FirmwareUpdaterError, State,
};

use crate::host_flash::{DfuFlash, FlashError, HostFlash, StateFlash};
use crate::ota_layout::{
    ACTIVE_SIZE, DFU_OFFSET, INFO_KEY, INFO_MAGIC, INFO_SIZE, INFO_VERSION, STATE_OFFSET, WRITE,
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

    fn key(&self) -> [u8; INFO_KEY] {
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

/// Verifies the first `len` bytes of DFU against `signature` (ed25519 over their SHA-512) under
/// the running image's key and, if they verify, marks them for the swap at the next reset.
pub(crate) fn apply(len: u32, signature: &[u8; 64]) -> Result<(), OtaError> {
    // embassy-boot asserts `len <= DFU`; the swap moves ACTIVE's size.
    if len == 0 || len > ACTIVE_SIZE {
        return Err(OtaError::Length);
    }
    let dfu: DfuFlash = HostFlash::open(DFU_OFFSET)?;
    let mut word = AlignedBuffer([0u8; WRITE as usize]);
    let mut updater =
        BlockingFirmwareUpdater::new(FirmwareUpdaterConfig { dfu, state: state_flash()? }, &mut word.0);
    Ok(updater.verify_and_mark_updated(&ImageInfo::read().key(), signature, len)?)
}

/// What to do once a command's acknowledgement is stored.
pub(crate) enum After {
    /// Stay in the session.
    Stay,
    /// Reset the board (the bootloader then swaps in a marked update).
    Reboot,
}

/// The update commands: `ota-apply` with payload `<length> <signature, 128 hex digits>` (the
/// update already in DFU), and `reboot`. Returns what to do after the acknowledgement and its
/// payload; `None` for other commands.
pub(crate) fn command(name: &str, payload: &[u8]) -> Option<(After, &'static str)> {
    match name {
        "reboot" => {
            say!("reboot requested");
            Some((After::Reboot, "rebooting"))
        }
        "ota-apply" => {
            let t0 = crate::ticks::now();
            let verdict = parse_apply(payload).and_then(|(len, sig)| apply(len, &sig).map(|()| len));
            let ms = (crate::ticks::now() - t0) * 1000 / crate::ticks::CORE_HZ;
            Some(match verdict {
                Ok(len) => {
                    say!(
                        "update in DFU verified ({len} bytes, SHA-512 and ed25519 under this image's key, \
                         {ms} ms): marked for the swap"
                    );
                    (After::Reboot, "applied")
                }
                Err(e) => {
                    say!("update refused ({e:?}): staying on {}", ImageInfo::read().version());
                    (After::Stay, "refused")
                }
            })
        }
        _ => None,
    }
}

fn parse_apply(payload: &[u8]) -> Result<(u32, [u8; 64]), OtaError> {
    let text = core::str::from_utf8(payload).map_err(|_| OtaError::Length)?;
    let (len, sig) = text.trim().split_once(' ').ok_or(OtaError::Length)?;
    let len = len.parse().map_err(|_| OtaError::Length)?;
    let sig = sig.as_bytes();
    if sig.len() != 128 {
        return Err(OtaError::Signature);
    }
    let mut out = [0u8; 64];
    for (o, pair) in out.iter_mut().zip(sig.chunks(2)) {
        let digit = |c: u8| (c as char).to_digit(16).ok_or(OtaError::Signature);
        *o = (digit(pair[0])? * 16 + digit(pair[1])?) as u8;
    }
    Ok((len, out))
}

/// Resets the board (SYSRESETREQ): the bootloader runs again.
pub(crate) fn reboot() -> ! {
    say!("resetting (SYSRESETREQ)");
    cortex_m::peripheral::SCB::sys_reset()
}
