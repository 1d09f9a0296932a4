//! Read timeouts that never cut a TLS record.
//!
//! `Device::poll` / `poll_async` return `Ok(None)` when a transport read ends with
//! `ErrorKind::TimedOut`: that is how a firmware without threads gets control back to publish on
//! schedule. But embedded-tls reads a record in pieces (its 5-byte header, then the body) and
//! keeps no state across a failed read: a timeout in the middle of a record loses the bytes
//! already read, and the next read starts inside the record (a decryption failure, then a
//! reconnect). A slow link (a loaded UART bridge, a congested cellular modem) does pause inside
//! records.
//!
//! [`RecordBoundary`] wraps the transport and follows the TLS record framing of what it reads:
//! between records a timeout goes through (idle); inside a record it is retried, up to
//! `stall_limit` times in a row, after which the read fails with `ConnectionAborted` (a broker
//! that stops halfway through a record is gone). Writes pass through.

use embedded_io::{ErrorKind, ErrorType};

/// The TLS record header: content type, version (2), length (2).
const HEADER: usize = 5;

/// A transport whose read timeouts fall only between TLS records.
#[derive(Debug)]
pub struct RecordBoundary<T> {
    inner: T,
    /// Header bytes seen of the record being read (0 = between records).
    header: [u8; HEADER],
    seen: usize,
    /// Body bytes still to come.
    body: usize,
    stall_limit: u32,
    stalls: u32,
}

impl<T> RecordBoundary<T> {
    /// Wraps `inner`; inside a record, up to `stall_limit` timeouts in a row are waited out.
    pub fn new(inner: T, stall_limit: u32) -> Self {
        Self { inner, header: [0; HEADER], seen: 0, body: 0, stall_limit, stalls: 0 }
    }

    /// The wrapped transport.
    pub fn into_inner(self) -> T {
        self.inner
    }

    /// Between two records (a timeout now is idle time, not a stall)?
    pub fn at_boundary(&self) -> bool {
        self.seen == 0 && self.body == 0
    }

    /// Follows the framing over `bytes` just read.
    fn advance(&mut self, mut bytes: &[u8]) {
        self.stalls = 0;
        while !bytes.is_empty() {
            if self.body > 0 {
                let n = self.body.min(bytes.len());
                self.body -= n;
                bytes = &bytes[n..];
                continue;
            }
            self.header[self.seen] = bytes[0];
            self.seen += 1;
            bytes = &bytes[1..];
            if self.seen == HEADER {
                self.seen = 0;
                self.body = usize::from(u16::from_be_bytes([self.header[3], self.header[4]]));
            }
        }
    }

    /// What to do with a read's outcome: `Some` to return it, `None` to read again.
    fn outcome(&mut self, read: Result<usize, ErrorKind>, buf: &[u8]) -> Option<Result<usize, ErrorKind>> {
        match read {
            Ok(n) => {
                self.advance(&buf[..n]);
                Some(Ok(n))
            }
            Err(ErrorKind::TimedOut) if !self.at_boundary() => {
                self.stalls += 1;
                if self.stalls > self.stall_limit {
                    Some(Err(ErrorKind::ConnectionAborted))
                } else {
                    None
                }
            }
            Err(e) => Some(Err(e)),
        }
    }
}

impl<T> ErrorType for RecordBoundary<T> {
    type Error = ErrorKind;
}

impl<T: embedded_io::Read> embedded_io::Read for RecordBoundary<T> {
    fn read(&mut self, buf: &mut [u8]) -> Result<usize, ErrorKind> {
        loop {
            let read = self.inner.read(buf).map_err(|e| embedded_io::Error::kind(&e));
            if let Some(out) = self.outcome(read, buf) {
                return out;
            }
        }
    }
}

impl<T: embedded_io::Write> embedded_io::Write for RecordBoundary<T> {
    fn write(&mut self, buf: &[u8]) -> Result<usize, ErrorKind> {
        self.inner.write(buf).map_err(|e| embedded_io::Error::kind(&e))
    }

    fn flush(&mut self) -> Result<(), ErrorKind> {
        self.inner.flush().map_err(|e| embedded_io::Error::kind(&e))
    }
}

#[cfg(feature = "async")]
impl<T: embedded_io_async::Read> embedded_io_async::Read for RecordBoundary<T> {
    async fn read(&mut self, buf: &mut [u8]) -> Result<usize, ErrorKind> {
        loop {
            let read = self.inner.read(buf).await.map_err(|e| embedded_io::Error::kind(&e));
            if let Some(out) = self.outcome(read, buf) {
                return out;
            }
        }
    }
}

#[cfg(feature = "async")]
impl<T: embedded_io_async::Write> embedded_io_async::Write for RecordBoundary<T> {
    async fn write(&mut self, buf: &[u8]) -> Result<usize, ErrorKind> {
        self.inner.write(buf).await.map_err(|e| embedded_io::Error::kind(&e))
    }

    async fn flush(&mut self) -> Result<(), ErrorKind> {
        self.inner.flush().await.map_err(|e| embedded_io::Error::kind(&e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use embedded_io::Read as _;

    /// Plays a script: `Some(bytes)` delivers them, `None` times out.
    struct Script(std::vec::Vec<Option<&'static [u8]>>);

    impl ErrorType for Script {
        type Error = ErrorKind;
    }

    impl embedded_io::Read for Script {
        fn read(&mut self, buf: &mut [u8]) -> Result<usize, ErrorKind> {
            match self.0.remove(0) {
                Some(b) => {
                    buf[..b.len()].copy_from_slice(b);
                    Ok(b.len())
                }
                None => Err(ErrorKind::TimedOut),
            }
        }
    }

    #[test]
    fn timeouts_pass_between_records_and_wait_inside_them() {
        let mut t = RecordBoundary::new(
            Script(std::vec![
                None,                          // idle: passes
                Some(&[23, 3, 3]),             // half a header
                None,                          // stall: waited out
                Some(&[0, 4, 1]),              // header done, 1 of 4 body bytes
                None,                          // stall: waited out
                Some(&[2, 3, 4, 23, 3, 3, 0]), // body done, next header begins
                None,
                None,
                None, // three stalls: over the limit of 2
            ]),
            2,
        );
        let mut buf = [0u8; 16];
        assert_eq!(t.read(&mut buf), Err(ErrorKind::TimedOut));
        assert_eq!(t.read(&mut buf), Ok(3));
        assert!(!t.at_boundary());
        assert_eq!(t.read(&mut buf), Ok(3));
        assert_eq!(t.read(&mut buf), Ok(7));
        assert!(!t.at_boundary());
        assert_eq!(t.read(&mut buf), Err(ErrorKind::ConnectionAborted));
    }

    #[test]
    fn a_whole_record_in_one_read_ends_at_the_boundary() {
        let mut t = RecordBoundary::new(Script(std::vec![Some(&[23, 3, 3, 0, 2, 9, 9]), None]), 5);
        let mut buf = [0u8; 16];
        assert_eq!(t.read(&mut buf), Ok(7));
        assert!(t.at_boundary());
        assert_eq!(t.read(&mut buf), Err(ErrorKind::TimedOut));
    }
}
