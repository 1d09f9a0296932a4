//! The async example's clock: SysTick at 1 kHz as the embassy time driver (`tick-hz-1_000`), and
//! the core-tick counter the handshake figure uses (as `ticks` in the blocking example).
//!
//! Each SysTick interrupt advances the millisecond count, wakes the timers that are due (a
//! generic queue of 8), and wakes the UART reader when a byte is waiting or its read timed out.

use core::cell::{Cell, RefCell};
use core::sync::atomic::{AtomicU32, Ordering};
use core::task::Waker;

use cortex_m::peripheral::SYST;
use cortex_m_rt::exception;
use critical_section::Mutex;
use embassy_time_driver::Driver;
use embassy_time_queue_utils::Queue;

/// Core clock of the mps2-an386 board, Hz.
pub(crate) const CORE_HZ: u64 = 25_000_000;
const RELOAD: u32 = (CORE_HZ / 1000) as u32 - 1;

static MILLIS: AtomicU32 = AtomicU32::new(0);

struct SysTickDriver {
    queue: Mutex<RefCell<Queue>>,
    alarm: Mutex<Cell<u64>>,
}

embassy_time_driver::time_driver_impl!(static DRIVER: SysTickDriver = SysTickDriver {
    queue: Mutex::new(RefCell::new(Queue::new())),
    alarm: Mutex::new(Cell::new(u64::MAX)),
});

impl Driver for SysTickDriver {
    fn now(&self) -> u64 {
        u64::from(MILLIS.load(Ordering::Relaxed))
    }

    fn schedule_wake(&self, at: u64, waker: &Waker) {
        critical_section::with(|cs| {
            let mut queue = self.queue.borrow(cs).borrow_mut();
            if queue.schedule_wake(at, waker) {
                let next = queue.next_expiration(self.now());
                self.alarm.borrow(cs).set(next);
            }
        });
    }
}

#[exception]
fn SysTick() {
    let now = u64::from(MILLIS.fetch_add(1, Ordering::Relaxed)) + 1;
    critical_section::with(|cs| {
        if now >= DRIVER.alarm.borrow(cs).get() {
            let next = DRIVER.queue.borrow(cs).borrow_mut().next_expiration(now);
            DRIVER.alarm.borrow(cs).set(next);
        }
    });
    crate::async_uart::on_tick(now);
}

/// Starts the 1 kHz tick.
pub(crate) fn start(syst: SYST) {
    crate::systick::start(syst, RELOAD);
}

/// Milliseconds since `start`.
pub(crate) fn millis() -> u64 {
    u64::from(MILLIS.load(Ordering::Relaxed))
}

/// Core ticks since `start` (x40 = instructions under `qemu -icount shift=0`).
pub(crate) fn now() -> u64 {
    crate::systick::ticks(&MILLIS, RELOAD)
}
