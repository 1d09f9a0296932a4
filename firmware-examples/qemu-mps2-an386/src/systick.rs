//! SysTick as a core-tick counter: started with a reload value, its exception counts the
//! periods (in the image's own handler), and the count plus the current value give the ticks.

use core::sync::atomic::{AtomicU32, Ordering};

use cortex_m::peripheral::syst::SystClkSource;
use cortex_m::peripheral::SYST;

/// Counts the core clock down from `reload`, with its exception on each period.
pub(crate) fn start(mut syst: SYST, reload: u32) {
    syst.set_clock_source(SystClkSource::Core);
    syst.set_reload(reload);
    syst.clear_current();
    syst.enable_interrupt();
    syst.enable_counter();
}

/// Core ticks since `start`, given the periods counted so far.
pub(crate) fn ticks(periods: &AtomicU32, reload: u32) -> u64 {
    loop {
        let n = periods.load(Ordering::Acquire);
        let current = SYST::get_current();
        if periods.load(Ordering::Acquire) == n {
            return u64::from(n) * (u64::from(reload) + 1) + u64::from(reload - current);
        }
    }
}
