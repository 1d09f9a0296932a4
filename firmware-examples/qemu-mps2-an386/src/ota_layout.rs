// The A/B layout of the bootloaded build (`--bin bootloader`, and the application built with
// `--features ota`). One source for the bootloader, the application, build.rs (the application's
// memory.x) and the host-side flash builder (`fleet_tests::ota_flash`), which all `include!` or
// `#[path]` this file: plain constants, no items that need a crate.
//
// Why a host file and not the board's code memory: QEMU's loader writes every `-kernel` and
// `-device loader` image back into the mps2 "flash" (it is SSRAM) at each system reset, so an
// image swapped in place there would be overwritten by the original at SYSRESETREQ, and nothing
// in it survives a restart of QEMU. The update flash (STATE, ACTIVE, DFU) is therefore a host
// file reached through ARM semihosting, which survives both; the bootloader, the only `-kernel`
// image, copies ACTIVE at each boot into code memory that the loader never writes
// (`EXEC_ADDR`), where the application is linked, and jumps there.

/// The update flash: this file in QEMU's working directory (semihosting SYS_OPEN, "r+b").
pub(crate) const FLASH_FILE: &str = "fleet-flash.bin";

/// Erase unit of the update flash and embassy-boot's page: a swap moves one page at a time.
pub(crate) const PAGE: u32 = 4096;
/// Program unit (a write covers whole words, as on most MCU flash).
pub(crate) const WRITE: u32 = 4;

/// BOOTLOADER STATE: embassy-boot's magic word and swap/revert progress, one page.
pub(crate) const STATE_OFFSET: u32 = 0;
pub(crate) const STATE_SIZE: u32 = PAGE;
/// ACTIVE: the image that boots.
pub(crate) const ACTIVE_OFFSET: u32 = STATE_OFFSET + STATE_SIZE;
pub(crate) const ACTIVE_SIZE: u32 = 384 * 1024;
/// DFU: the update, one page larger than ACTIVE (embassy-boot's swap needs the spare page).
pub(crate) const DFU_OFFSET: u32 = ACTIVE_OFFSET + ACTIVE_SIZE;
pub(crate) const DFU_SIZE: u32 = ACTIVE_SIZE + PAGE;
/// The OTA job's record (`fleet_device::ota::Record`): the offered manifest and the download's
/// progress, one page, so that a download resumes after a power cut.
pub(crate) const RECORD_OFFSET: u32 = DFU_OFFSET + DFU_SIZE;
pub(crate) const RECORD_SIZE: u32 = PAGE;
/// Size of the whole file.
pub(crate) const FLASH_SIZE: u32 = RECORD_OFFSET + RECORD_SIZE;

/// Where the application runs: code memory (SSRAM1) above the bootloader, below the
/// credentials region (0x003F_0000). The bootloader copies ACTIVE here at every boot; QEMU's
/// loader never writes here (only the bootloader's own segments and credentials.bin).
pub(crate) const EXEC_ADDR: u32 = 0x0001_0000;
/// The bootloader (linked at 0x0) must end below `EXEC_ADDR`.
pub(crate) const BOOTLOADER_MAX: u32 = EXEC_ADDR;

/// The image description block in every application image (see `ota::IMAGE_INFO`): this
/// magic, then the version (`INFO_VERSION` bytes, NUL-padded UTF-8), then the ed25519 public key
/// (32 bytes) that updates to this image must be signed with. The release tooling (for tests:
/// `fleet_tests::ota_flash`) stamps version and key into the linked image.
pub(crate) const INFO_MAGIC: [u8; 16] = *b"FLEETGATE-IMAGE1";
pub(crate) const INFO_VERSION: usize = 32;
pub(crate) const INFO_KEY: usize = 32;
pub(crate) const INFO_SIZE: usize = INFO_MAGIC.len() + INFO_VERSION + INFO_KEY;
