//! The update flash of the bootloaded build: a region of a host file behind ARM semihosting
//! (SYS_OPEN/SEEK/READ/WRITE/CLOSE), as an `embedded-storage` `NorFlash` for embassy-boot.
//!
//! Why a host file: QEMU restores its `-kernel` and `-device loader` images into the mps2 code
//! memory (SSRAM) at every system reset and forgets it at exit, so neither survives what an
//! update must survive; a host file survives a SYSRESETREQ, a restart of QEMU and a kill of it
//! (each write is a host `write(2)` before the call returns). See `ota_layout.rs`.
//!
//! It behaves like NOR flash, so that embassy-boot's power-fail logic is exercised as on a real
//! part: `erase` sets whole pages to 0xFF, `write` covers whole words and may only clear bits (a
//! write that would set a bit that is 0 fails with `NotErased` instead of silently AND-ing, which
//! would hide a missing erase). Reads within one page are served from a one-page cache
//! (embassy-boot reads its state word by word and hashes an update two bytes at a time), which
//! writes and erases keep up to date.

use cortex_m_semihosting::{nr, syscall};
use embedded_storage::nor_flash::{
    check_erase, check_read, check_write, ErrorType, NorFlash, NorFlashError, NorFlashErrorKind, ReadNorFlash,
};

use crate::ota_layout as layout;

/// Why a flash operation failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FlashError {
    /// Misaligned or outside the region.
    Bounds(NorFlashErrorKind),
    /// A write would set a bit that is 0: the word was not erased first.
    NotErased,
    /// The host file could not be opened, or a host read or write came up short.
    Host,
}

impl NorFlashError for FlashError {
    fn kind(&self) -> NorFlashErrorKind {
        match self {
            FlashError::Bounds(k) => *k,
            FlashError::NotErased | FlashError::Host => NorFlashErrorKind::Other,
        }
    }
}

impl From<NorFlashErrorKind> for FlashError {
    fn from(k: NorFlashErrorKind) -> Self {
        FlashError::Bounds(k)
    }
}

const PAGE: usize = layout::PAGE as usize;

/// `[base, base + SIZE)` of the host file `layout::FLASH_FILE` as NOR flash.
pub(crate) struct HostFlash<const SIZE: u32> {
    fd: usize,
    base: u32,
    /// The page at `cached` (a page-aligned offset in this region), if any.
    cache: [u8; PAGE],
    cached: Option<u32>,
}

/// The three partitions of `layout`.
pub(crate) type StateFlash = HostFlash<{ layout::STATE_SIZE }>;
#[allow(dead_code)] // the bootloader's
pub(crate) type ActiveFlash = HostFlash<{ layout::ACTIVE_SIZE }>;
pub(crate) type DfuFlash = HostFlash<{ layout::DFU_SIZE }>;

impl<const SIZE: u32> HostFlash<SIZE> {
    /// Opens the region at `base` of the update flash file.
    pub(crate) fn open(base: u32) -> Result<Self, FlashError> {
        let name = layout::FLASH_FILE.as_bytes();
        let mut path = [0u8; 64]; // NUL-terminated for SYS_OPEN
        if name.len() >= path.len() {
            return Err(FlashError::Host);
        }
        path[..name.len()].copy_from_slice(name);
        // SAFETY: SYS_OPEN reads the NUL-terminated name in `path` (`name.len()` bytes before
        // the NUL), which lives across the call.
        let fd = unsafe { syscall!(OPEN, path.as_ptr(), nr::open::RW_BINARY, name.len()) };
        if fd == usize::MAX {
            return Err(FlashError::Host);
        }
        Ok(HostFlash { fd, base, cache: [0; PAGE], cached: None })
    }

    /// Makes the page holding `offset` the cached one; returns its start.
    fn load_page(&mut self, offset: u32) -> Result<u32, FlashError> {
        let start = offset - offset % layout::PAGE;
        if self.cached != Some(start) {
            self.cached = None;
            host_read(self.fd, self.base + start, &mut self.cache)?;
            self.cached = Some(start);
        }
        Ok(start)
    }

    /// Reads the first `len` bytes of the region straight into memory at `addr` (the
    /// bootloader's copy of ACTIVE into the execution region: one host call).
    ///
    /// # Safety
    /// `addr..addr + len` must be mapped, writable memory that nothing else uses or references
    /// while this runs.
    #[allow(dead_code)] // the bootloader's
    pub(crate) unsafe fn read_to_address(&mut self, addr: usize, len: usize) -> Result<(), FlashError> {
        check_read(self, 0, len)?;
        seek(self.fd, self.base)?;
        // SAFETY: SYS_READ writes at most `len` bytes at `addr`, which the caller vouches for.
        let missing = unsafe { syscall!(READ, self.fd, addr, len) };
        if missing == 0 {
            Ok(())
        } else {
            Err(FlashError::Host)
        }
    }
}

/// Host read of `buf.len()` bytes at `pos` of the file.
fn host_read(fd: usize, pos: u32, buf: &mut [u8]) -> Result<(), FlashError> {
    seek(fd, pos)?;
    // SAFETY: SYS_READ writes at most `buf.len()` bytes into `buf`, live across the call.
    let missing = unsafe { syscall!(READ, fd, buf.as_mut_ptr(), buf.len()) };
    if missing == 0 {
        Ok(())
    } else {
        Err(FlashError::Host)
    }
}

/// Host write of `buf` at `pos` of the file.
fn host_write(fd: usize, pos: u32, buf: &[u8]) -> Result<(), FlashError> {
    seek(fd, pos)?;
    // SAFETY: SYS_WRITE reads `buf.len()` bytes of `buf`, live across the call.
    let missing = unsafe { syscall!(WRITE, fd, buf.as_ptr(), buf.len()) };
    if missing == 0 {
        Ok(())
    } else {
        Err(FlashError::Host)
    }
}

fn seek(fd: usize, pos: u32) -> Result<(), FlashError> {
    // SAFETY: SYS_SEEK takes a handle and a position, no memory.
    let r = unsafe { syscall!(SEEK, fd, pos) };
    if r == 0 {
        Ok(())
    } else {
        Err(FlashError::Host)
    }
}

impl<const SIZE: u32> Drop for HostFlash<SIZE> {
    fn drop(&mut self) {
        // SAFETY: SYS_CLOSE takes the handle opened in `open`, no memory.
        let _ = unsafe { syscall!(CLOSE, self.fd) };
    }
}

impl<const SIZE: u32> ErrorType for HostFlash<SIZE> {
    type Error = FlashError;
}

impl<const SIZE: u32> ReadNorFlash for HostFlash<SIZE> {
    const READ_SIZE: usize = 1;

    fn read(&mut self, offset: u32, bytes: &mut [u8]) -> Result<(), FlashError> {
        check_read(self, offset, bytes.len())?;
        let mut at = offset;
        let mut rest = bytes;
        while !rest.is_empty() {
            let from = (at - self.load_page(at)?) as usize;
            let n = rest.len().min(PAGE - from);
            let (now, later) = core::mem::take(&mut rest).split_at_mut(n);
            now.copy_from_slice(&self.cache[from..from + n]);
            rest = later;
            at += n as u32;
        }
        Ok(())
    }

    fn capacity(&self) -> usize {
        SIZE as usize
    }
}

impl<const SIZE: u32> NorFlash for HostFlash<SIZE> {
    const WRITE_SIZE: usize = layout::WRITE as usize;
    const ERASE_SIZE: usize = PAGE;

    fn erase(&mut self, from: u32, to: u32) -> Result<(), FlashError> {
        check_erase(self, from, to)?;
        let erased = [0xffu8; PAGE];
        for start in (from..to).step_by(PAGE) {
            if self.cached == Some(start) {
                self.cached = None;
            }
            host_write(self.fd, self.base + start, &erased)?;
        }
        Ok(())
    }

    fn write(&mut self, offset: u32, bytes: &[u8]) -> Result<(), FlashError> {
        check_write(self, offset, bytes.len())?;
        let mut at = offset;
        let mut rest = bytes;
        while !rest.is_empty() {
            let from = (at - self.load_page(at)?) as usize;
            let n = rest.len().min(PAGE - from);
            let (now, later) = rest.split_at(n);
            let old = &mut self.cache[from..from + n];
            // NOR programming only clears bits.
            if old.iter().zip(now).any(|(o, b)| b & !o != 0) {
                return Err(FlashError::NotErased);
            }
            old.copy_from_slice(now);
            if let Err(e) = host_write(self.fd, self.base + at, now) {
                self.cached = None;
                return Err(e);
            }
            rest = later;
            at += n as u32;
        }
        Ok(())
    }
}
