//! CPU clock ticks from SysTick, for the handshake figure in BENCHMARKS.md.
//!
//! SysTick counts the core clock (25 MHz on QEMU's mps2-an386) down from a 24-bit reload; its
//! exception counts the wraps. QEMU drives it from the virtual clock: run with `-icount shift=0`
//! and one instruction is one nanosecond, so ticks × 40 is the number of instructions executed.
//! On real hardware it is core cycles (÷ the core clock for time).

use core::sync::atomic::{AtomicU32, Ordering};

use cortex_m::peripheral::SYST;
use cortex_m_rt::exception;

const RELOAD: u32 = 0x00FF_FFFF;
/// Core clock of the mps2-an386 board, Hz.
#[allow(dead_code)]
pub(crate) const CORE_HZ: u64 = 25_000_000;

static WRAPS: AtomicU32 = AtomicU32::new(0);

#[exception]
fn SysTick() {
    WRAPS.fetch_add(1, Ordering::Relaxed);
}

/// Starts counting.
pub(crate) fn start(syst: SYST) {
    crate::systick::start(syst, RELOAD);
}

/// Ticks since `start`.
pub(crate) fn now() -> u64 {
    crate::systick::ticks(&WRAPS, RELOAD)
}
