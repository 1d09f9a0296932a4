//! Firmware updates of simulated devices: the SDK's `fleet_device::ota` over flash in memory.
//!
//! Each device holds a DFU partition, a bootloader state and a record page in RAM (allocated at
//! the first write: an idle device costs nothing). It takes offers, downloads chunks, verifies
//! (SHA-512 and the image signature, through embassy-boot exactly as firmware does) and reports
//! every status. The A/B swap is simulated: once `verified` is stored by the broker the device
//! "resets" and runs the offered version on trial (the bootloader state stays `Swap`, as
//! embassy-boot leaves it after a swap), reconnects, and the SDK confirms it. So 1,000 devices
//! can be updated in waves with real downloads and real checks, without firmware images.

use embassy_boot::{BlockingFirmwareUpdater, FirmwareUpdaterConfig};
use embedded_storage::nor_flash::{
    check_erase, check_write, ErrorType, NorFlash, NorFlashErrorKind, ReadNorFlash,
};
use fleet_device::ota::{Config, Updater};
use fleet_device::release::{Board, Version};

/// Erase unit of the simulated flash.
const SECTOR: usize = 4096;

/// NOR flash in memory: erase sets 0xFF, a write may only clear bits; nothing is allocated
/// before the first write or erase.
#[derive(Debug)]
pub(crate) struct MemFlash {
    size: usize,
    bytes: Vec<u8>,
}

impl MemFlash {
    pub(crate) fn new(size: usize) -> Self {
        Self { size, bytes: Vec::new() }
    }

    fn touch(&mut self) -> &mut Vec<u8> {
        if self.bytes.is_empty() {
            self.bytes = vec![0xFF; self.size];
        }
        &mut self.bytes
    }
}

impl ErrorType for MemFlash {
    type Error = NorFlashErrorKind;
}

impl ReadNorFlash for MemFlash {
    const READ_SIZE: usize = 1;

    fn read(&mut self, offset: u32, out: &mut [u8]) -> Result<(), Self::Error> {
        let o = offset as usize;
        if o + out.len() > self.size {
            return Err(NorFlashErrorKind::OutOfBounds);
        }
        match self.bytes.get(o..o + out.len()) {
            Some(b) => out.copy_from_slice(b),
            None => out.fill(0xFF),
        }
        Ok(())
    }

    fn capacity(&self) -> usize {
        self.size
    }
}

impl NorFlash for MemFlash {
    const WRITE_SIZE: usize = 4;
    const ERASE_SIZE: usize = SECTOR;

    fn erase(&mut self, from: u32, to: u32) -> Result<(), Self::Error> {
        check_erase(self, from, to)?;
        self.touch()[from as usize..to as usize].fill(0xFF);
        Ok(())
    }

    fn write(&mut self, offset: u32, data: &[u8]) -> Result<(), Self::Error> {
        check_write(self, offset, data.len())?;
        let o = offset as usize;
        let old = &mut self.touch()[o..o + data.len()];
        if old.iter().zip(data).any(|(o, d)| d & !o != 0) {
            return Err(NorFlashErrorKind::Other); // not erased
        }
        old.copy_from_slice(data);
        Ok(())
    }
}

/// What the simulated devices of a run are, for updates.
#[derive(Debug, Clone, Copy)]
pub(crate) struct OtaOpts {
    /// The station's firmware key (`firmware.pub`, 32 bytes).
    pub(crate) public_key: [u8; 32],
    /// The board the devices say they are.
    pub(crate) board: Board,
    /// The version they run at the start.
    pub(crate) version: Version,
    /// Bytes of their DFU partition.
    pub(crate) capacity: u32,
}

/// One simulated device's update flash and running version.
#[derive(Debug)]
pub(crate) struct SimOta {
    opts: OtaOpts,
    running: Version,
    dfu: MemFlash,
    state: MemFlash,
    record: MemFlash,
}

/// The SDK's blocking updater over a simulated device's flash.
pub(crate) type SimUpdater<'d> = Updater<'d, &'d mut MemFlash, &'d mut MemFlash, &'d mut MemFlash>;

impl SimOta {
    pub(crate) fn new(opts: OtaOpts) -> Self {
        Self {
            opts,
            running: opts.version,
            dfu: MemFlash::new(opts.capacity.next_multiple_of(SECTOR as u32) as usize),
            state: MemFlash::new(SECTOR),
            record: MemFlash::new(SECTOR),
        }
    }

    /// The version running now.
    pub(crate) fn running(&self) -> Version {
        self.running
    }

    /// The updater for one connection; it resumes the job kept in the record.
    pub(crate) fn updater<'d>(&'d mut self, word: &'d mut [u8], buf: &'d mut [u8]) -> SimUpdater<'d> {
        let cfg = Config { window: 4, ..Config::new(self.opts.board, self.running, self.opts.public_key) };
        let fw = BlockingFirmwareUpdater::new(
            FirmwareUpdaterConfig { dfu: &mut self.dfu, state: &mut self.state },
            word,
        );
        Updater::new(cfg, fw, self.opts.capacity, &mut self.record, buf)
    }

    /// The simulated reset after `verified`: the bootloader "swaps" and the new version runs
    /// on trial (state `Swap` as marked).
    pub(crate) fn swap_to(&mut self, version: Version) {
        self.running = version;
    }
}
