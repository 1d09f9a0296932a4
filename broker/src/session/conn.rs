//! One client's stream and every buffer it uses: framing in, encoding out, write deadlines, and
//! the batching of PUBACKs after a group commit.
//!
//! An idle session holds no buffers: after [`IDLE_RELEASE`] without a read, both are freed, and
//! the first read after idling takes what fits in 64 bytes (a PINGREQ); a read that fills the
//! buffer grows it for the next one.

use std::time::Duration;

use bytes::BytesMut;
use rumqttc::mqttbytes::v4::{Packet, PubAck};
use rumqttc::mqttbytes::Error as MqttError;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::timeout;

use crate::outcome::CloseReason;
use crate::tls::Tls;

/// Read buffer growth step.
const READ_CHUNK: usize = 4096;
/// A session that read nothing for this long gives its buffers back.
pub(crate) const IDLE_RELEASE: Duration = Duration::from_secs(2);

/// Takes one complete MQTT packet off the front of `buf` (bytes a client sent). `Ok(None)`: more
/// bytes are needed; `Err`: the session must be closed. Sans-IO, so the fuzzer drives exactly
/// what a session runs.
pub fn decode_client_packet(buf: &mut BytesMut, max_packet: usize) -> Result<Option<Packet>, CloseReason> {
    if buf.is_empty() {
        return Ok(None);
    }
    match Packet::read(buf, max_packet) {
        Ok(p) => Ok(Some(p)),
        Err(MqttError::InsufficientBytes(_)) => Ok(None),
        Err(MqttError::PayloadSizeLimitExceeded(_)) => Err(CloseReason::PacketTooLarge),
        Err(_) => Err(CloseReason::MalformedPacket),
    }
}

/// The end of a session whose write failed: a timeout, or the peer went away.
pub(crate) fn write_end(e: std::io::Error) -> CloseReason {
    if e.kind() == std::io::ErrorKind::TimedOut {
        CloseReason::WriteTimeout
    } else {
        CloseReason::ClientGone
    }
}

/// A client connection after the handshake.
pub(crate) struct Conn {
    tls: Box<Tls>,
    buf: BytesMut,
    out: BytesMut,
    max_packet: usize,
    write_timeout: Duration,
}

impl Conn {
    pub(crate) fn new(tls: Box<Tls>, max_packet: usize, write_timeout: Duration) -> Self {
        Self { tls, buf: BytesMut::new(), out: BytesMut::new(), max_packet, write_timeout }
    }

    /// Reads until one packet is complete. `Ok(None)`: the peer closed (or reset).
    pub(crate) async fn read_packet(&mut self) -> Result<Option<Packet>, CloseReason> {
        loop {
            if let Some(p) = self.parse()? {
                return Ok(Some(p));
            }
            if !self.read_more().await {
                return Ok(None);
            }
        }
    }

    /// Reads more bytes into the buffer; false when the peer closed or the read failed (a reset
    /// is the peer leaving, not a protocol error).
    pub(crate) async fn read_more(&mut self) -> bool {
        let r = self.tls.read_buf(&mut self.buf).await;
        if self.buf.len() == self.buf.capacity() {
            self.buf.reserve(READ_CHUNK);
        }
        matches!(r, Ok(n) if n > 0)
    }

    /// True while either buffer holds memory.
    pub(crate) fn holds_buffers(&self) -> bool {
        self.buf.capacity() > 0 || self.out.capacity() > 0
    }

    /// Frees the read and write buffers of an idle session (nothing buffered).
    pub(crate) fn release_buffers(&mut self) {
        if self.buf.is_empty() {
            self.buf = BytesMut::new();
        }
        self.out = BytesMut::new();
    }

    /// The next packet already buffered, if complete.
    pub(crate) fn parse(&mut self) -> Result<Option<Packet>, CloseReason> {
        decode_client_packet(&mut self.buf, self.max_packet)
    }

    /// Sends one packet. A packet too large for this client is dropped (the caller counts it).
    pub(crate) async fn send(&mut self, p: Packet) -> Result<(), CloseReason> {
        self.out.clear();
        if p.write(&mut self.out, self.max_packet).is_err() {
            return Ok(());
        }
        self.flush_out().await
    }

    /// Sends PUBACKs for the messages of `acks` in order, in one write, up to the first that
    /// was not stored; then fails with `StoreFailed` if one was not.
    pub(crate) async fn send_acks(&mut self, acks: &[(u16, bool)]) -> Result<(), CloseReason> {
        self.out.clear();
        let mut failed = false;
        for &(pkid, stored) in acks {
            if !stored {
                failed = true;
                break;
            }
            if Packet::PubAck(PubAck::new(pkid)).write(&mut self.out, self.max_packet).is_err() {
                return Err(CloseReason::Encode);
            }
        }
        if !self.out.is_empty() {
            self.flush_out().await?;
        }
        if failed {
            Err(CloseReason::StoreFailed)
        } else {
            Ok(())
        }
    }

    /// Writes the encoded packets in `out`, failing with `WriteTimeout` if the peer accepts no
    /// bytes for the write timeout.
    async fn flush_out(&mut self) -> Result<(), CloseReason> {
        let write = async {
            self.tls.write_all(&self.out).await?;
            self.tls.flush().await
        };
        match timeout(self.write_timeout, write).await {
            Ok(r) => r.map_err(write_end),
            Err(_) => Err(CloseReason::WriteTimeout),
        }
    }

    /// Sends close_notify, waiting at most `within`.
    pub(crate) async fn close(&mut self, within: Duration) {
        let _ = timeout(within, self.tls.shutdown()).await;
    }
}
