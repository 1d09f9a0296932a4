//! The board/host boundary: the credentials flash region, and TEST-ONLY entropy and time taken
//! from the host over ARM semihosting (QEMU's board has neither a TRNG nor an RTC).

use cortex_m_semihosting::syscall;

extern "C" {
    /// Start of the 64 KiB credentials region (memory.x).
    static __credentials_start: u8;
}

/// Address of the 64 KiB credentials region.
pub(crate) fn credentials_base() -> usize {
    core::ptr::addr_of!(__credentials_start) as usize
}

/// The first `len` bytes of the credentials region: the factory's part, which the firmware
/// never writes (its own identities live further in, see `flash`).
pub(crate) fn factory_part(len: usize) -> &'static [u8] {
    assert!(len <= 16 * 1024);
    // SAFETY: memory.x reserves 64 KiB at `__credentials_start`; its first 16 KiB hold what the
    // factory wrote, are mapped, never written by the firmware, and live for the whole program.
    unsafe { core::slice::from_raw_parts(credentials_base() as *const u8, len) }
}

/// TEST-ONLY: 32 bytes from the host's /dev/urandom.
pub(crate) fn host_entropy() -> [u8; 32] {
    let mut seed = [0u8; 32];
    let path = b"/dev/urandom\0";
    // SAFETY: SYS_OPEN/SYS_READ/SYS_CLOSE with valid pointers and lengths into live buffers.
    unsafe {
        let fd = syscall!(OPEN, path.as_ptr(), 0usize, path.len() - 1);
        if fd != usize::MAX {
            let _ = syscall!(READ, fd, seed.as_mut_ptr(), seed.len());
            let _ = syscall!(CLOSE, fd);
        }
    }
    seed
}

/// TEST-ONLY: the host's wall clock (unix seconds), for certificate date checks.
pub(crate) fn host_unix_time() -> Option<i64> {
    // SAFETY: SYS_TIME takes no argument block.
    let t = unsafe { syscall!(TIME) };
    (t != usize::MAX && t != 0).then_some(t as i64)
}

/// Centiseconds since the program started (SYS_CLOCK).
pub(crate) fn clock_centis() -> u64 {
    // SAFETY: SYS_CLOCK takes no argument block.
    let c = unsafe { syscall!(CLOCK) };
    if c == usize::MAX {
        0
    } else {
        c as u64
    }
}
