//! A seeded, fault-injecting transport for the SDK tests (after smoltcp's
//! `phy::FaultInjector`): wraps any embedded-io (blocking) or embedded-io-async transport and
//! drops, delays, stalls inside a TLS record, or cuts what goes through it.
//!
//! The faults a link really has are byte-stream faults: a chunk lost (on a TCP stream that
//! breaks the TLS record it was part of), latency, a pause in the middle of a record (a loaded
//! UART bridge, a congested cellular modem), the connection gone. Each is decided per chunk (one
//! read's or one write's bytes) or per TLS record read, by a seeded generator: the seed is
//! printed when the injector is made (libtest shows it with a failing test's output), and
//! `FLEET_FAULT_SEED=<seed>` replays the same decisions.
//!
//! Stalls are held in the injector, not in a sleeping future: a read that times out during one
//! (the injector's own [`FaultInjector::read_timeout`], or a caller's `with_timeout`) loses no
//! byte, and the next read goes on where it stopped. Faults apply from the start, or from when
//! the [`FaultSwitch`] is turned on (e.g. once the handshake is through); the TLS record
//! framing of what is read is followed from the first byte either way.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use embedded_io::{ErrorKind, ErrorType};
use tokio::time::Instant;

/// The environment variable that fixes the seed of every injector made without
/// [`FaultInjector::seed`].
pub const SEED_VAR: &str = "FLEET_FAULT_SEED";

/// The TLS record header: content type, version (2), length (2).
const HEADER: usize = 5;

/// A stall inside TLS records read.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Stall {
    /// Bytes of the record (its header included) delivered before the stall.
    pub after: usize,
    /// How long the rest of the record (and what follows it) is held back.
    pub duration: Duration,
    /// Chance that a record stalls (1.0: every record).
    pub chance: f64,
}

/// The faults an injector injects; none by default.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Faults {
    /// Chance that a chunk is lost.
    pub drop: f64,
    /// Added to every chunk's delivery.
    pub delay: Duration,
    /// Stalls inside the TLS records read.
    pub stall: Option<Stall>,
    /// Chance that the connection is cut at a chunk.
    pub cut: f64,
    /// Cut the connection once this many bytes went through (both ways).
    pub cut_after: Option<u64>,
}

/// Turns an injector's faults on and off from outside (the transport itself is moved into the
/// connection), and counts what it injected.
#[derive(Debug, Clone)]
pub struct FaultSwitch(Arc<SwitchState>);

#[derive(Debug, Default)]
struct SwitchState {
    on: AtomicBool,
    dropped: AtomicU64,
    delayed: AtomicU64,
    stalled: AtomicU64,
    cut: AtomicBool,
}

impl FaultSwitch {
    /// Faults from now on.
    pub fn on(&self) {
        self.0.on.store(true, Ordering::SeqCst);
    }

    /// No faults from now on (stalls already decided still run out).
    pub fn off(&self) {
        self.0.on.store(false, Ordering::SeqCst);
    }

    fn is_on(&self) -> bool {
        self.0.on.load(Ordering::SeqCst)
    }

    /// Chunks dropped so far.
    pub fn dropped(&self) -> u64 {
        self.0.dropped.load(Ordering::SeqCst)
    }

    /// Chunks delayed so far.
    pub fn delayed(&self) -> u64 {
        self.0.delayed.load(Ordering::SeqCst)
    }

    /// Records stalled so far.
    pub fn stalled(&self) -> u64 {
        self.0.stalled.load(Ordering::SeqCst)
    }

    /// Whether the connection was cut.
    pub fn was_cut(&self) -> bool {
        self.0.cut.load(Ordering::SeqCst)
    }
}

/// SplitMix64: tiny, and the same sequence for a seed whatever crate versions are in use.
#[derive(Debug, Clone)]
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// True with probability `p`.
    fn chance(&mut self, p: f64) -> bool {
        p > 0.0 && ((self.next() >> 11) as f64) / ((1u64 << 53) as f64) < p
    }
}

/// Where the reader is in the TLS record framing.
#[derive(Debug, Default)]
struct Framing {
    header: [u8; HEADER],
    /// Bytes of the current record seen (0: between records).
    pos: usize,
    /// The record's whole length, once its header is in.
    len: Option<usize>,
    /// This record stalls.
    stalls: bool,
}

/// A transport with faults; see the module documentation.
#[derive(Debug)]
pub struct FaultInjector<T> {
    /// `None` once cut (the connection closed).
    inner: Option<T>,
    faults: Faults,
    read_timeout: Option<Duration>,
    seed: u64,
    rng: Rng,
    switch: FaultSwitch,
    /// Bytes read from `inner`, each chunk with the moment it may be delivered.
    pending: VecDeque<(Instant, Vec<u8>)>,
    framing: Framing,
    /// Bytes through so far, both ways.
    through: u64,
    cut: bool,
}

impl<T> FaultInjector<T> {
    /// Wraps `inner` with no faults yet, on; the seed from `FLEET_FAULT_SEED` or a fresh one.
    pub fn new(inner: T) -> Self {
        let seed =
            std::env::var(SEED_VAR).ok().and_then(|s| s.trim().parse().ok()).unwrap_or_else(fresh_seed);
        let switch = FaultSwitch(Arc::default());
        switch.on();
        let mut injector = Self {
            inner: Some(inner),
            faults: Faults::default(),
            read_timeout: None,
            seed,
            rng: Rng(seed),
            switch,
            pending: VecDeque::new(),
            framing: Framing::default(),
            through: 0,
            cut: false,
        };
        injector.announce();
        injector
    }

    fn announce(&mut self) {
        eprintln!("fault injector: seed {0} ({SEED_VAR}={0} replays it)", self.seed);
    }

    /// This seed instead (a test that must always see the same faults).
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self.rng = Rng(seed);
        self.announce();
        self
    }

    /// The seed in use.
    pub fn seed_value(&self) -> u64 {
        self.seed
    }

    /// These faults.
    pub fn faults(mut self, faults: Faults) -> Self {
        self.faults = faults;
        self
    }

    /// Each chunk lost with probability `chance`.
    pub fn drop_chunks(mut self, chance: f64) -> Self {
        self.faults.drop = chance;
        self
    }

    /// Each chunk delivered `delay` late.
    pub fn delay(mut self, delay: Duration) -> Self {
        self.faults.delay = delay;
        self
    }

    /// Every TLS record read stalls for `duration` after its first `after` bytes.
    pub fn stall_inside_records(mut self, after: usize, duration: Duration) -> Self {
        self.faults.stall = Some(Stall { after, duration, chance: 1.0 });
        self
    }

    /// The connection cut at each chunk with probability `chance`.
    pub fn cut_chance(mut self, chance: f64) -> Self {
        self.faults.cut = chance;
        self
    }

    /// The connection cut once `bytes` went through, both ways together.
    pub fn cut_after(mut self, bytes: u64) -> Self {
        self.faults.cut_after = Some(bytes);
        self
    }

    /// A read that has nothing to deliver for `idle` fails with `ErrorKind::TimedOut`, as an
    /// embassy firmware's reads do with `with_timeout` (bytes held back are kept). For a
    /// blocking transport this bounds only what the injector holds back: set the socket's own
    /// read timeout as well.
    pub fn read_timeout(mut self, idle: Duration) -> Self {
        self.read_timeout = Some(idle);
        self
    }

    /// No faults until [`FaultSwitch::on`].
    pub fn paused(self) -> Self {
        self.switch.off();
        self
    }

    /// The switch (and counters) of this injector.
    pub fn switch(&self) -> FaultSwitch {
        self.switch.clone()
    }

    fn cut_now(&mut self) {
        self.cut = true;
        self.inner = None;
        self.switch.0.cut.store(true, Ordering::SeqCst);
    }

    /// Bytes just read from `inner`: queued for delivery, with the faults decided for them.
    fn arrived(&mut self, mut bytes: &[u8]) {
        let on = self.switch.is_on();
        if on && self.rng.chance(self.faults.cut) {
            self.cut_now();
            return;
        }
        let mut cut_after_these = false;
        if let (true, Some(limit)) = (on, self.faults.cut_after) {
            let room = usize::try_from(limit.saturating_sub(self.through)).unwrap_or(usize::MAX);
            if bytes.len() >= room {
                bytes = &bytes[..room];
                cut_after_these = true;
            }
        }
        self.through += bytes.len() as u64;
        if on && self.rng.chance(self.faults.drop) {
            self.switch.0.dropped.fetch_add(1, Ordering::SeqCst);
        } else {
            let mut at = Instant::now();
            if on && !self.faults.delay.is_zero() {
                at += self.faults.delay;
                self.switch.0.delayed.fetch_add(1, Ordering::SeqCst);
            }
            self.queue(bytes, at, on);
        }
        if cut_after_these {
            self.cut_now();
        }
    }

    /// Queues `bytes` from `at` on, split where a record stalls.
    fn queue(&mut self, bytes: &[u8], mut at: Instant, on: bool) {
        let mut start = 0;
        for (i, &b) in bytes.iter().enumerate() {
            let f = &mut self.framing;
            if f.pos == 0 {
                f.stalls = on && self.faults.stall.is_some_and(|s| self.rng.chance(s.chance));
            }
            if f.pos < HEADER {
                f.header[f.pos] = b;
            }
            f.pos += 1;
            if f.pos == HEADER {
                f.len = Some(HEADER + usize::from(u16::from_be_bytes([f.header[3], f.header[4]])));
            }
            if let (true, Some(stall)) = (f.stalls, self.faults.stall) {
                if f.pos == stall.after && f.len.is_none_or(|len| f.pos < len) {
                    self.push(&bytes[start..=i], at);
                    start = i + 1;
                    at += stall.duration;
                    self.switch.0.stalled.fetch_add(1, Ordering::SeqCst);
                }
            }
            let f = &mut self.framing;
            if f.len == Some(f.pos) {
                *f = Framing::default();
            }
        }
        self.push(&bytes[start..], at);
    }

    fn push(&mut self, bytes: &[u8], at: Instant) {
        if bytes.is_empty() {
            return;
        }
        // Never before what was queued earlier: a byte stream keeps its order.
        let at = self.pending.back().map_or(at, |(last, _)| at.max(*last));
        self.pending.push_back((at, bytes.to_vec()));
    }

    /// Delivers from the first queued chunk into `buf`.
    fn take(&mut self, buf: &mut [u8]) -> usize {
        let Some((_, chunk)) = self.pending.front_mut() else { return 0 };
        let n = buf.len().min(chunk.len());
        buf[..n].copy_from_slice(&chunk[..n]);
        chunk.drain(..n);
        if chunk.is_empty() {
            self.pending.pop_front();
        }
        n
    }

    /// What a write of `len` bytes becomes: `Err` (cut), `Ok(None)` (lost: report it
    /// written), `Ok(Some((n, delay)))` (write `n` bytes after `delay`, then maybe cut).
    fn outgoing(&mut self, len: usize) -> Result<Option<(usize, Duration, bool)>, ErrorKind> {
        if self.cut || self.inner.is_none() {
            return Err(ErrorKind::ConnectionReset);
        }
        let on = self.switch.is_on();
        if on && self.rng.chance(self.faults.cut) {
            self.cut_now();
            return Err(ErrorKind::ConnectionReset);
        }
        let mut n = len;
        let mut cut_after = false;
        if let (true, Some(limit)) = (on, self.faults.cut_after) {
            let room = usize::try_from(limit.saturating_sub(self.through)).unwrap_or(usize::MAX);
            if room == 0 {
                self.cut_now();
                return Err(ErrorKind::ConnectionReset);
            }
            if n >= room {
                n = room;
                cut_after = true;
            }
        }
        if on && self.rng.chance(self.faults.drop) {
            self.switch.0.dropped.fetch_add(1, Ordering::SeqCst);
            self.through += n as u64;
            if cut_after {
                self.cut_now();
            }
            return Ok(None);
        }
        let delay = if on { self.faults.delay } else { Duration::ZERO };
        if !delay.is_zero() {
            self.switch.0.delayed.fetch_add(1, Ordering::SeqCst);
        }
        Ok(Some((n, delay, cut_after)))
    }

    fn wrote(&mut self, n: usize, cut_after: bool) {
        self.through += n as u64;
        if cut_after {
            self.cut_now();
        }
    }
}

fn fresh_seed() -> u64 {
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    let mut r = Rng(nanos ^ (u64::from(std::process::id()) << 32) ^ N.fetch_add(1, Ordering::Relaxed));
    r.next()
}

impl<T> ErrorType for FaultInjector<T> {
    type Error = ErrorKind;
}

impl<T: embedded_io::Read> embedded_io::Read for FaultInjector<T> {
    fn read(&mut self, buf: &mut [u8]) -> Result<usize, ErrorKind> {
        let deadline = self.read_timeout.map(|t| Instant::now() + t);
        loop {
            if let Some(&(at, _)) = self.pending.front() {
                if let Some(d) = deadline.filter(|d| *d < at) {
                    std::thread::sleep(d.saturating_duration_since(Instant::now()));
                    return Err(ErrorKind::TimedOut);
                }
                std::thread::sleep(at.saturating_duration_since(Instant::now()));
                return Ok(self.take(buf));
            }
            let inner = self.inner.as_mut().ok_or(ErrorKind::ConnectionReset)?;
            let n = inner.read(buf).map_err(|e| embedded_io::Error::kind(&e))?;
            if n == 0 {
                return Ok(0);
            }
            self.arrived(&buf[..n]);
        }
    }
}

impl<T: embedded_io::Write> embedded_io::Write for FaultInjector<T> {
    fn write(&mut self, buf: &[u8]) -> Result<usize, ErrorKind> {
        let Some((n, delay, cut_after)) = self.outgoing(buf.len())? else { return Ok(buf.len()) };
        std::thread::sleep(delay);
        let inner = self.inner.as_mut().ok_or(ErrorKind::ConnectionReset)?;
        let written = inner.write(&buf[..n]).map_err(|e| embedded_io::Error::kind(&e))?;
        self.wrote(written, cut_after && written == n);
        Ok(written)
    }

    fn flush(&mut self) -> Result<(), ErrorKind> {
        let inner = self.inner.as_mut().ok_or(ErrorKind::ConnectionReset)?;
        inner.flush().map_err(|e| embedded_io::Error::kind(&e))
    }
}

impl<T: embedded_io_async::Read> embedded_io_async::Read for FaultInjector<T> {
    async fn read(&mut self, buf: &mut [u8]) -> Result<usize, ErrorKind> {
        let deadline = self.read_timeout.map(|t| Instant::now() + t);
        loop {
            if let Some(&(at, _)) = self.pending.front() {
                if let Some(d) = deadline.filter(|d| *d < at) {
                    tokio::time::sleep_until(d).await;
                    return Err(ErrorKind::TimedOut);
                }
                tokio::time::sleep_until(at).await;
                return Ok(self.take(buf));
            }
            let inner = self.inner.as_mut().ok_or(ErrorKind::ConnectionReset)?;
            let read = match deadline {
                Some(d) => match tokio::time::timeout_at(d, inner.read(buf)).await {
                    Ok(r) => r,
                    Err(_) => return Err(ErrorKind::TimedOut),
                },
                None => inner.read(buf).await,
            };
            let n = read.map_err(|e| embedded_io::Error::kind(&e))?;
            if n == 0 {
                return Ok(0);
            }
            self.arrived(&buf[..n]);
        }
    }
}

impl<T: embedded_io_async::Write> embedded_io_async::Write for FaultInjector<T> {
    async fn write(&mut self, buf: &[u8]) -> Result<usize, ErrorKind> {
        let Some((n, delay, cut_after)) = self.outgoing(buf.len())? else { return Ok(buf.len()) };
        tokio::time::sleep(delay).await;
        let inner = self.inner.as_mut().ok_or(ErrorKind::ConnectionReset)?;
        let written = inner.write(&buf[..n]).await.map_err(|e| embedded_io::Error::kind(&e))?;
        self.wrote(written, cut_after && written == n);
        Ok(written)
    }

    async fn flush(&mut self) -> Result<(), ErrorKind> {
        let inner = self.inner.as_mut().ok_or(ErrorKind::ConnectionReset)?;
        inner.flush().await.map_err(|e| embedded_io::Error::kind(&e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use embedded_io::{Read as _, Write as _};

    /// Reads come from `input` in chunks of at most `chunk`; writes are kept.
    struct Pipe {
        input: Vec<u8>,
        chunk: usize,
        written: Vec<u8>,
    }

    impl ErrorType for Pipe {
        type Error = ErrorKind;
    }

    impl embedded_io::Read for Pipe {
        fn read(&mut self, buf: &mut [u8]) -> Result<usize, ErrorKind> {
            let n = buf.len().min(self.input.len()).min(self.chunk);
            buf[..n].copy_from_slice(&self.input[..n]);
            self.input.drain(..n);
            Ok(n)
        }
    }

    impl embedded_io::Write for Pipe {
        fn write(&mut self, buf: &[u8]) -> Result<usize, ErrorKind> {
            self.written.extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> Result<(), ErrorKind> {
            Ok(())
        }
    }

    fn records(n: usize, body: usize) -> Vec<u8> {
        let mut out = Vec::new();
        for i in 0..n {
            out.extend([23, 3, 3]);
            out.extend(u16::try_from(body).map_or([0, 0], u16::to_be_bytes));
            out.extend(std::iter::repeat_n(i as u8, body));
        }
        out
    }

    fn pipe(input: Vec<u8>, chunk: usize) -> Pipe {
        Pipe { input, chunk, written: Vec::new() }
    }

    /// Every read until EOF or an error: (what arrived, the error).
    fn drain(t: &mut FaultInjector<Pipe>) -> (Vec<u8>, Option<ErrorKind>) {
        let mut got = Vec::new();
        let mut buf = [0u8; 64];
        loop {
            match t.read(&mut buf) {
                Ok(0) => return (got, None),
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) => return (got, Some(e)),
            }
        }
    }

    #[test]
    fn without_faults_every_byte_passes_in_order() {
        let input = records(5, 40);
        let mut t = FaultInjector::new(pipe(input.clone(), 7));
        assert_eq!(drain(&mut t), (input, None));
        t.write_all(b"hello").expect("write");
        assert_eq!(t.inner.as_ref().map(|p| p.written.clone()), Some(b"hello".to_vec()));
    }

    /// The stall splits each record after `after` bytes and times reads out meanwhile, losing
    /// nothing; a record shorter than `after` does not stall.
    #[test]
    fn stalls_fall_inside_records_and_timeouts_lose_nothing() {
        let mut input = records(2, 30);
        input.extend(records(1, 2)); // 7 bytes: ends before the stall point
        let mut t = FaultInjector::new(pipe(input.clone(), 100))
            .stall_inside_records(12, Duration::from_millis(60))
            .read_timeout(Duration::from_millis(20));
        let switch = t.switch();
        let mut buf = [0u8; 100];
        assert_eq!(t.read(&mut buf), Ok(12), "the first 12 bytes of the first record");
        assert_eq!(t.read(&mut buf), Err(ErrorKind::TimedOut), "stalled inside the record");
        let (rest, err) = {
            let mut got = buf[..12].to_vec();
            loop {
                match t.read(&mut buf) {
                    Ok(0) => break (got, None),
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                    Err(ErrorKind::TimedOut) => {}
                    Err(e) => break (got, Some(e)),
                }
            }
        };
        assert_eq!((rest, err), (input, None));
        assert_eq!(switch.stalled(), 2);
    }

    /// The same seed makes the same decisions: which chunks are lost, where the cut falls.
    #[test]
    fn a_seed_replays_the_same_faults() {
        let run = |seed: u64| {
            let mut t =
                FaultInjector::new(pipe(records(40, 20), 9)).seed(seed).drop_chunks(0.3).cut_chance(0.02);
            let (got, err) = drain(&mut t);
            (got, err, t.switch().dropped())
        };
        let a = run(7);
        assert_eq!(a, run(7));
        assert!(a.2 > 0, "30% of ~100 chunks and none lost?");
        assert_ne!(a, run(8), "another seed, other faults");
    }

    #[test]
    fn a_cut_after_n_bytes_delivers_them_then_fails_both_ways() {
        let input = records(3, 30);
        let mut t = FaultInjector::new(pipe(input.clone(), 16)).cut_after(50);
        assert_eq!(drain(&mut t), (input[..50].to_vec(), Some(ErrorKind::ConnectionReset)));
        assert!(t.switch().was_cut());
        assert_eq!(t.write(b"x"), Err(ErrorKind::ConnectionReset));
    }

    #[test]
    fn a_paused_injector_injects_nothing_until_switched_on() {
        let input = records(2, 10);
        let mut t = FaultInjector::new(pipe(input.clone(), 15)).drop_chunks(1.0).paused();
        let switch = t.switch();
        let mut buf = [0u8; 64];
        assert_eq!(t.read(&mut buf), Ok(15));
        switch.on();
        assert_eq!(drain(&mut t), (Vec::new(), None), "everything after is lost");
        assert_eq!(&buf[..15], &input[..15]);
        assert_eq!(switch.dropped(), 1);
    }

    #[test]
    fn delays_hold_chunks_back() {
        let mut t = FaultInjector::new(pipe(records(1, 10), 64)).delay(Duration::from_millis(50));
        let start = std::time::Instant::now();
        assert_eq!(drain(&mut t).0.len(), 15);
        assert!(start.elapsed() >= Duration::from_millis(50));
        assert_eq!(t.switch().delayed(), 1);
    }
}
