//! A device's two credential slots in a file (`slots.bin` next to its `credentials.bin`),
//! standing in for two flash sectors. A write can be cut after a number of bytes to simulate a
//! power loss during it.

use std::fs::OpenOptions;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::PathBuf;

use fleet_device::store::{Slot, SlotStorage};

/// Bytes per slot.
pub(crate) const SLOT_SIZE: usize = 4096;

#[derive(Debug)]
pub(crate) struct FileSlots {
    path: PathBuf,
    /// Cut the next write after this many bytes (then the "device" is powered off).
    pub(crate) cut_after: Option<usize>,
}

impl FileSlots {
    /// Opens (creating an erased one) the slots file.
    pub(crate) fn open(path: PathBuf) -> std::io::Result<Self> {
        if !path.exists() {
            std::fs::write(&path, vec![0xff; 2 * SLOT_SIZE])?;
        }
        Ok(Self { path, cut_after: None })
    }

    fn offset(slot: Slot) -> u64 {
        match slot {
            Slot::A => 0,
            Slot::B => SLOT_SIZE as u64,
        }
    }
}

/// A write cut by the simulated power loss, or the file failing.
#[derive(Debug)]
pub(crate) enum SlotError {
    PowerLost,
    Io(std::io::Error),
}

impl SlotStorage for FileSlots {
    type Error = SlotError;

    fn slot_size(&self) -> usize {
        SLOT_SIZE
    }

    fn read(&mut self, slot: Slot, buf: &mut [u8]) -> Result<(), SlotError> {
        let mut f = std::fs::File::open(&self.path).map_err(SlotError::Io)?;
        f.seek(SeekFrom::Start(Self::offset(slot))).map_err(SlotError::Io)?;
        f.read_exact(buf).map_err(SlotError::Io)
    }

    fn write(&mut self, slot: Slot, data: &[u8]) -> Result<(), SlotError> {
        let mut f = OpenOptions::new().write(true).open(&self.path).map_err(SlotError::Io)?;
        f.seek(SeekFrom::Start(Self::offset(slot))).map_err(SlotError::Io)?;
        // Erase, then program: as flash does.
        f.write_all(&[0xff; SLOT_SIZE]).map_err(SlotError::Io)?;
        f.seek(SeekFrom::Start(Self::offset(slot))).map_err(SlotError::Io)?;
        let n = self.cut_after.take().unwrap_or(data.len()).min(data.len());
        f.write_all(&data[..n]).map_err(SlotError::Io)?;
        f.sync_all().map_err(SlotError::Io)?;
        if n < data.len() {
            return Err(SlotError::PowerLost);
        }
        Ok(())
    }
}

impl std::fmt::Display for SlotError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::PowerLost => f.write_str("power lost while writing"),
            Self::Io(e) => write!(f, "{e}"),
        }
    }
}
