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

use super::v5::{self, Edge, Version};
use super::wire::SubResult;
pub(crate) use super::wire::{Ack, Inbound};
use crate::message::Message;
use crate::outcome::{CloseReason, Refusal};
use crate::tls::Tls;
use rumqttc::v5::mqttbytes::v5 as m5;

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
    /// Known once the CONNECT is read.
    version: Option<Version>,
    /// A v5 client's state at the edge (boxed: most fleets speak 3.1.1, and an idle session
    /// should not carry it).
    edge: Option<Box<Edge>>,
}

impl Conn {
    pub(crate) fn new(tls: Box<Tls>, max_packet: usize, write_timeout: Duration) -> Self {
        Self {
            tls,
            buf: BytesMut::new(),
            out: BytesMut::new(),
            max_packet,
            write_timeout,
            version: None,
            edge: None,
        }
    }

    /// The protocol the client speaks (3.1.1 until its CONNECT said otherwise).
    pub(crate) fn version(&self) -> Version {
        self.version.unwrap_or(Version::V4)
    }

    /// A v5 client's state at the edge.
    pub(crate) fn edge(&self) -> Option<&Edge> {
        self.edge.as_deref()
    }

    /// The largest packet the client takes.
    fn out_max(&self) -> usize {
        self.edge.as_ref().map_or(self.max_packet, |e| e.max_packet(self.max_packet))
    }

    /// Reads until one packet is complete. `Ok(None)`: the peer closed (or reset).
    pub(crate) async fn read_packet(&mut self) -> Result<Option<Inbound>, CloseReason> {
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
    pub(crate) fn parse(&mut self) -> Result<Option<Inbound>, CloseReason> {
        let version = match self.version {
            Some(v) => v,
            None => match v5::protocol_level(&self.buf) {
                None => return Ok(None),
                Some(5) => {
                    self.edge = Some(Box::default());
                    *self.version.insert(Version::V5)
                }
                Some(_) => *self.version.insert(Version::V4),
            },
        };
        match (version, self.edge.as_mut()) {
            (Version::V5, Some(edge)) => edge.decode(&mut self.buf, self.max_packet),
            _ => Ok(decode_client_packet(&mut self.buf, self.max_packet)?.map(Inbound::v4)),
        }
    }

    /// Sends one packet. A packet too large for this client is dropped (the caller counts it).
    pub(crate) async fn send(&mut self, p: Packet) -> Result<(), CloseReason> {
        self.out.clear();
        let max = self.out_max();
        let written = match self.edge.as_ref() {
            Some(edge) => match edge.encode(p) {
                Some(p5) => p5.write(&mut self.out, Some(max as u32)).is_ok(),
                None => false,
            },
            None => p.write(&mut self.out, max).is_ok(),
        };
        if !written {
            return Ok(());
        }
        self.flush_out().await
    }

    /// Delivers a message: with its properties (and what remains of its expiry) to a v5 client,
    /// as topic and payload to a 3.1.1 client. `Ok(false)`: not sent, and never will be (it
    /// expired, or it is larger than the client takes): no acknowledgement will come for it.
    pub(crate) async fn send_message(&mut self, m: Message) -> Result<bool, CloseReason> {
        if m.expired() {
            return Ok(false);
        }
        self.out.clear();
        let max = self.out_max();
        let written = match self.edge.is_some() {
            true => m5::Packet::Publish(v5::publish_out(m)).write(&mut self.out, Some(max as u32)).is_ok(),
            false => Packet::Publish(m.into_v4()).write(&mut self.out, max).is_ok(),
        };
        if !written {
            return Ok(false);
        }
        self.flush_out().await.map(|()| true)
    }

    /// Sends a v5 packet (only to a v5 client).
    async fn send5(&mut self, p: m5::Packet) -> Result<(), CloseReason> {
        self.out.clear();
        let max = self.out_max();
        if p.write(&mut self.out, Some(max as u32)).is_err() {
            return Ok(());
        }
        self.flush_out().await
    }

    /// The CONNACK of an admitted session.
    pub(crate) async fn send_connack(&mut self, admitted: v5::Admitted) -> Result<(), CloseReason> {
        match self.version() {
            Version::V5 => self.send5(m5::Packet::ConnAck(v5::connack_ok(admitted))).await,
            Version::V4 => {
                let ack = rumqttc::mqttbytes::v4::ConnAck::new(
                    rumqttc::mqttbytes::v4::ConnectReturnCode::Success,
                    admitted.session_present,
                );
                self.send(Packet::ConnAck(ack)).await
            }
        }
    }

    /// The CONNACK of a refusal at CONNECT; `moved_to`: the server a v5 client is sent to
    /// when this node moved.
    pub(crate) async fn send_refusal(
        &mut self,
        refusal: Refusal,
        moved_to: Option<&str>,
    ) -> Result<(), CloseReason> {
        match self.edge.as_ref() {
            Some(edge) => {
                let ack = v5::connack_refused(refusal, edge.terms.problem_info, moved_to);
                self.send5(m5::Packet::ConnAck(ack)).await
            }
            None => {
                let ack = rumqttc::mqttbytes::v4::ConnAck::new(refusal.connack(), false);
                self.send(Packet::ConnAck(ack)).await
            }
        }
    }

    /// The SUBACK of a SUBSCRIBE.
    pub(crate) async fn send_suback(&mut self, pkid: u16, results: &[SubResult]) -> Result<(), CloseReason> {
        match self.version() {
            Version::V5 => {
                let codes = results.iter().map(|r| r.v5()).collect();
                self.send5(m5::Packet::SubAck(m5::SubAck { pkid, return_codes: codes, properties: None }))
                    .await
            }
            Version::V4 => {
                let codes = results.iter().map(|r| r.v4()).collect();
                self.send(Packet::SubAck(rumqttc::mqttbytes::v4::SubAck::new(pkid, codes))).await
            }
        }
    }

    /// The UNSUBACK of an UNSUBSCRIBE of `filters` filters.
    pub(crate) async fn send_unsuback(&mut self, pkid: u16, filters: usize) -> Result<(), CloseReason> {
        match self.version() {
            Version::V5 => {
                let reasons = vec![m5::UnsubAckReason::Success; filters];
                self.send5(m5::Packet::UnsubAck(m5::UnsubAck { pkid, reasons, properties: None })).await
            }
            Version::V4 => self.send(Packet::UnsubAck(rumqttc::mqttbytes::v4::UnsubAck::new(pkid))).await,
        }
    }

    /// A v5 client is told why the broker ends its session (DISCONNECT with the reason code).
    pub(crate) async fn say_goodbye(&mut self, end: CloseReason) {
        let Some(problem_info) = self.edge.as_ref().map(|e| e.terms.problem_info) else { return };
        if let Some(d) = v5::disconnect(end, problem_info) {
            let _ = self.send5(m5::Packet::Disconnect(d)).await;
        }
    }

    /// Sends PUBACKs for the messages of `acks` in order, in one write, up to the first that
    /// was not stored; then fails with `StoreFailed` if one was not.
    pub(crate) async fn send_acks(&mut self, acks: &[(u16, Ack)]) -> Result<(), CloseReason> {
        self.out.clear();
        let mut failed = false;
        let v5 = self.edge.is_some();
        for &(pkid, ack) in acks {
            let written = match (ack, v5) {
                (Ack::Failed, _) => {
                    failed = true;
                    break;
                }
                (Ack::Refused(r), true) => {
                    m5::Packet::PubAck(v5::puback(pkid, r.code())).write(&mut self.out, None).is_ok()
                }
                // A successful PUBACK is the same four bytes in both protocols.
                (_, _) => Packet::PubAck(PubAck::new(pkid)).write(&mut self.out, self.max_packet).is_ok(),
            };
            if !written {
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
