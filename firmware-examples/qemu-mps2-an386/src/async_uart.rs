//! UART0 as an `embedded-io-async` byte stream for the embassy example.
//!
//! A read completes as soon as bytes are waiting (it takes them all, up to the buffer), and
//! fails with `TimedOut` after the idle timeout with nothing: that is how the SDK's `poll_async`
//! returns `Ok(None)` to let the device loop publish on schedule, and how a handshake to a broker
//! that went away ends. The SysTick interrupt (1 kHz) wakes the reader. Writes go straight out.

use core::cell::{Cell, RefCell};
use core::future::poll_fn;
use core::sync::atomic::{AtomicU32, Ordering};
use core::task::{Poll, Waker};

use critical_section::Mutex;
use embedded_io::ErrorKind;

use crate::uart::{rx_ready, Uart0};

/// The reader waiting for bytes, and when its read times out (ms).
static READER: Mutex<RefCell<Option<Waker>>> = Mutex::new(RefCell::new(None));
static DEADLINE: Mutex<Cell<u64>> = Mutex::new(Cell::new(u64::MAX));
/// Idle timeout of a read, ms.
static IDLE_MS: AtomicU32 = AtomicU32::new(10_000);
/// Core ticks spent waiting for the peer (see `waiting_ticks`).
static WAITING: AtomicU32 = AtomicU32::new(0);

/// Core ticks reads spent waiting for bytes so far (wraps: subtract with `wrapping_sub`): the
/// handshake figure subtracts them, they measure the broker and the host.
pub(crate) fn waiting_ticks() -> u32 {
    WAITING.load(Ordering::Relaxed)
}

/// From the SysTick interrupt: wake the reader if a byte arrived or its time is up.
pub(crate) fn on_tick(now_ms: u64) {
    critical_section::with(|cs| {
        if rx_ready() || now_ms >= DEADLINE.borrow(cs).get() {
            if let Some(w) = READER.borrow(cs).borrow_mut().take() {
                w.wake();
            }
        }
    });
}

/// Sets how long a read waits for its first byte.
pub(crate) fn set_idle_timeout(ms: u32) {
    IDLE_MS.store(ms, Ordering::Relaxed);
}

/// The UART, async.
#[derive(Debug)]
pub(crate) struct AsyncUart<'u>(pub(crate) &'u mut Uart0);

impl embedded_io_async::ErrorType for AsyncUart<'_> {
    type Error = ErrorKind;
}

impl embedded_io_async::Read for AsyncUart<'_> {
    async fn read(&mut self, buf: &mut [u8]) -> Result<usize, ErrorKind> {
        if buf.is_empty() {
            return Ok(0);
        }
        let deadline = crate::ticks::millis() + u64::from(IDLE_MS.load(Ordering::Relaxed));
        let uart = &mut *self.0;
        let mut waiting_since = None;
        let done = |since: Option<u64>| {
            if let Some(t0) = since {
                WAITING.fetch_add((crate::ticks::now() - t0) as u32, Ordering::Relaxed);
            }
        };
        poll_fn(|cx| {
            let n = uart.take(buf);
            if n > 0 {
                done(waiting_since);
                return Poll::Ready(Ok(n));
            }
            if crate::ticks::millis() >= deadline {
                done(waiting_since);
                return Poll::Ready(Err(ErrorKind::TimedOut));
            }
            waiting_since.get_or_insert_with(crate::ticks::now);
            critical_section::with(|cs| {
                *READER.borrow(cs).borrow_mut() = Some(cx.waker().clone());
                DEADLINE.borrow(cs).set(deadline);
            });
            Poll::Pending
        })
        .await
    }
}

impl embedded_io_async::Write for AsyncUart<'_> {
    async fn write(&mut self, buf: &[u8]) -> Result<usize, ErrorKind> {
        self.0.send(buf);
        Ok(buf.len())
    }

    async fn flush(&mut self) -> Result<(), ErrorKind> {
        Ok(())
    }
}
