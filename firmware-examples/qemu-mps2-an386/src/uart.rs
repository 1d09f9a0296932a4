//! CMSDK APB UART0 of the MPS2 boards (0x4000_4000) as an `embedded_io` byte stream.
//!
//! Polled: `read` waits until at least one byte has arrived, then takes what is there, but
//! gives up after `RX_TIMEOUT_CENTIS` of silence: a UART has no end-of-file, so a peer that went
//! away would otherwise block the device forever. `write` waits while the transmit buffer is full.

use embedded_io::{ErrorKind, ErrorType, Read, Write};

use core::sync::atomic::{AtomicU32, Ordering};

use crate::semihost::clock_centis;

/// Core ticks spent waiting for the peer in `read` (the handshake figure subtracts them: they
/// measure the broker and the host, not the device).
static WAITING: AtomicU32 = AtomicU32::new(0);

/// Ticks spent waiting for input so far (wraps: subtract with `wrapping_sub`).
pub(crate) fn waiting_ticks() -> u32 {
    WAITING.load(Ordering::Relaxed)
}

/// Silence after which a read fails with `TimedOut` (15 s).
const RX_TIMEOUT_CENTIS: u64 = 1500;

/// The UART's only failure: nothing arrived in time.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RxTimeout;

impl core::fmt::Display for RxTimeout {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("UART receive timed out")
    }
}

impl core::error::Error for RxTimeout {}

impl embedded_io::Error for RxTimeout {
    fn kind(&self) -> ErrorKind {
        ErrorKind::TimedOut
    }
}

const BASE: usize = 0x4000_4000;
const DATA: usize = BASE;
const STATE: usize = BASE + 0x04;
const CTRL: usize = BASE + 0x08;
const BAUDDIV: usize = BASE + 0x10;
const TX_FULL: u32 = 1 << 0;
const RX_FULL: u32 = 1 << 1;

fn read_reg(addr: usize) -> u32 {
    // SAFETY: `addr` is one of the UART0 registers above, valid for a volatile 32-bit access on
    // this board; the UART is used only through this module.
    unsafe { core::ptr::read_volatile(addr as *const u32) }
}

fn write_reg(addr: usize, v: u32) {
    // SAFETY: as in `read_reg`.
    unsafe { core::ptr::write_volatile(addr as *mut u32, v) }
}

/// UART0, enabled for TX and RX.
#[derive(Debug)]
pub(crate) struct Uart0(());

impl Uart0 {
    pub(crate) fn init() -> Self {
        write_reg(BAUDDIV, 16);
        write_reg(CTRL, 0b11);
        Uart0(())
    }
}

/// Is a received byte waiting?
pub(crate) fn rx_ready() -> bool {
    read_reg(STATE) & RX_FULL != 0
}

impl Uart0 {
    /// Takes the bytes waiting (as many as fit); 0 if none.
    pub(crate) fn take(&mut self, buf: &mut [u8]) -> usize {
        let mut n = 0;
        while n < buf.len() && rx_ready() {
            buf[n] = read_reg(DATA) as u8;
            n += 1;
        }
        n
    }

    /// Queues `buf` for transmission, waiting while the transmit buffer is full.
    pub(crate) fn send(&mut self, buf: &[u8]) {
        for b in buf {
            while read_reg(STATE) & TX_FULL != 0 {}
            write_reg(DATA, u32::from(*b));
        }
    }

    /// Discards whatever bytes are waiting.
    pub(crate) fn drain(&mut self) {
        while read_reg(STATE) & RX_FULL != 0 {
            let _ = read_reg(DATA);
        }
    }
}

impl ErrorType for Uart0 {
    type Error = RxTimeout;
}

impl Read for Uart0 {
    fn read(&mut self, buf: &mut [u8]) -> Result<usize, Self::Error> {
        if buf.is_empty() {
            return Ok(0);
        }
        if read_reg(STATE) & RX_FULL == 0 {
            let (start, t0) = (clock_centis(), crate::ticks::now());
            while read_reg(STATE) & RX_FULL == 0 {
                if clock_centis().saturating_sub(start) > RX_TIMEOUT_CENTIS {
                    return Err(RxTimeout);
                }
            }
            WAITING.fetch_add((crate::ticks::now() - t0) as u32, Ordering::Relaxed);
        }
        Ok(self.take(buf))
    }
}

impl Write for Uart0 {
    fn write(&mut self, buf: &[u8]) -> Result<usize, Self::Error> {
        self.send(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> Result<(), Self::Error> {
        Ok(())
    }
}
