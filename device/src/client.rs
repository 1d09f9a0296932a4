//! The high-level device API: a firmware's whole connectivity in a few calls.
//!
//! ```text
//! let creds = Credentials::decode(FLASH_BUNDLE)?;                  // from the credentials region
//! let mut device: Device<'_, 8, 256> = Device::new(creds, SessionConfig::default());
//! loop {
//!     let tcp = open_tcp(creds.broker_host, creds.broker_port);     // TCP, UART, ... : embedded-io
//!     // rx holds the broker's largest TLS record: rx_buffer_for(4096) = 4,352 B for fleet-broker
//!     // (records capped at 4 KiB by default), 16,640 B for a broker without a cap.
//!     let (mut rx, mut tx) = ([0u8; rx_buffer_for(FLEET_BROKER_RECORD)], [0u8; MIN_TX_BUFFER]);
//!     let mut tls = match device.connect(tcp, &mut rx, &mut tx, &mut rng, clock.unix(), clock.ms()) {
//!         Ok(tls) => tls,
//!         Err(e) => { device.disconnected(clock.ms(), rng.next_u32()); wait_until(device.reconnect_at()); continue }
//!     };
//!     device.publish_telemetry(&Reading { temp_c: 21.5 })?;         // postcard, QoS 1, queued
//!     while let Ok(ev) = device.poll(&mut tls, clock.ms()) {
//!         if let Some(Incoming::Command { name, payload }) = ev { handle(&name, &payload) }
//!     }
//!     device.disconnected(clock.ms(), rng.next_u32());               // back off, then reconnect
//! }
//! ```
//!
//! `poll` sends what the session has to send, then performs one read on the transport; on a
//! host the socket's read timeout bounds it, on a board the transport decides. With the `async`
//! feature the same calls exist as `connect_async`, `poll_async`, ... over `embedded-io-async`;
//! `connect_with` / `connect_with_async` take a [`DeviceSigner`] when the key is not in RAM.

use embedded_io::{Error as _, Read, Write};
use embedded_tls::blocking::{TlsConfig, TlsConnection, TlsContext};
use embedded_tls::{Aes128GcmSha256, TlsError};
use heapless::{String, Vec};
use rand_core::CryptoRngCore;
use serde::Serialize;

use crate::credentials::Credentials;
use crate::mqtt::session::{Event, Millis, Session, SessionConfig, SessionError};
use crate::mqtt::QoS;
use crate::tls::{DeviceProvider, DeviceSigner, RamSigner, Rejection};

/// Bytes of MQTT input buffered between reads. The broker's `max_packet_size` (default 4096)
/// caps every packet it sends; a PUBLISH larger than this inbox is not a connection error: it
/// is acknowledged per its QoS, skipped as it streams in and reported as
/// [`Incoming::CommandTooLarge`] (so a big command can never put the device in a reconnect loop).
pub const INBOX: usize = 2048;
/// Largest packet the device writes.
pub const OUTBOX_PACKET: usize = 1024;

/// An established mutual-TLS connection to the broker.
pub type Connection<'b, T> = TlsConnection<'b, T, Aes128GcmSha256>;

/// An established mutual-TLS connection over an `embedded-io-async` transport.
#[cfg(feature = "async")]
pub type AsyncConnection<'b, T> = embedded_tls::TlsConnection<'b, T, Aes128GcmSha256>;

/// The largest TLS record (plaintext) fleet-broker sends with its default configuration
/// (`max_tls_record_size = 4096`).
pub const FLEET_BROKER_RECORD: usize = 4096;
/// The largest TLS record any TLS 1.3 server may send (2^14): Mosquitto, EMQX, AWS IoT, ...
pub const UNCAPPED_RECORD: usize = 16_384;

/// The TLS receive buffer a connection needs when the broker's records carry at most
/// `record_limit` bytes of plaintext: one whole record with its content type, AEAD tag and
/// padding (RFC 8446 §5.2: at most 256 bytes more); the 5-byte header is read separately.
///
/// | broker setting | receive buffer |
/// |---|---:|
/// | fleet-broker default (`max_tls_record_size = 4096`) | 4,352 B |
/// | fleet-broker `max_tls_record_size = 2048` | 2,304 B |
/// | a broker without a cap (Mosquitto, ...) | 16,640 B |
pub const fn rx_buffer_for(record_limit: usize) -> usize {
    record_limit + 256
}

/// The smallest TLS send buffer: the client's Certificate message (a fleetgate device
/// certificate is under 1 KiB) and the largest MQTT packet the device writes, in one record.
pub const MIN_TX_BUFFER: usize = 2048;

/// What arrived for the application.
#[derive(Debug, Clone, PartialEq, Eq)]
#[allow(clippy::large_enum_variant)] // no allocator to box into: commands are returned by value
pub enum Incoming {
    /// The broker accepted the session.
    Connected,
    /// A queued QoS 1 message was stored by the broker.
    Delivered,
    /// A command for this device.
    Command {
        /// Command name (`devices/<id>/commands/<name>`).
        name: String<32>,
        /// Payload.
        payload: Vec<u8, 256>,
    },
    /// The issuer sent a certificate for this device's rotation (or first boot): the leaf's
    /// DER. Give it to [`crate::rotation::Rotator::bundle`], which checks it.
    Certificate {
        /// Leaf certificate, DER.
        der: Vec<u8, { crate::rotation::CERT_MAX }>,
    },
    /// The issuer refused this device's CSR: `<reason>: <detail>` (docs/spec/rotation.md).
    CertificateRejected {
        /// The reason, cut to 128 bytes.
        reason: String<128>,
    },
    /// An operator asked this device to rotate now (`fleet-provision rotate`).
    RotateRequested,
    /// A firmware update offer (`commands/ota/offer`, feature `ota`): the manifest, for
    /// [`crate::ota::Updater::offer`].
    #[cfg(feature = "_ota")]
    OtaOffer {
        /// The payload (a manifest is 268 bytes; other lengths are the updater's to refuse).
        manifest: Vec<u8, { crate::release::MANIFEST_LEN }>,
    },
    /// A firmware chunk (`ota/chunk`, feature `ota`), for [`crate::ota::Updater::chunk`].
    #[cfg(feature = "_ota")]
    OtaChunk {
        /// Tag, offset, status, data.
        payload: Vec<u8, { crate::ota::CHUNK_HEADER + crate::ota::MAX_CHUNK }>,
    },
    /// A command arrived that does not fit `Command` (name over 32 bytes, payload over 256, or
    /// the whole packet over [`INBOX`]): it was acknowledged to the broker but not delivered;
    /// the application decides what to do.
    CommandTooLarge {
        /// Bytes of the command name.
        name_len: usize,
        /// Bytes of the payload.
        payload_len: usize,
    },
    /// MQTT 5: the broker refused a queued QoS 1 message with this reason code (0x87 not
    /// authorized, 0x97 quota exceeded); it is not sent again.
    #[cfg(feature = "mqtt5")]
    Refused {
        /// The reason code.
        reason: u8,
    },
}

/// `<root>/certs/<kind>` as an event: the leaf of an `issued` chain, a rejection's reason, an
/// operator's request (an empty retained `rotate` is its withdrawal: nothing).
fn certs(kind: &str, payload: &[u8]) -> Option<Incoming> {
    match kind {
        "issued" => {
            let leaf = crate::tls::x509::read_tlv(payload).ok().map(|(t, _)| t.raw).unwrap_or(payload);
            Some(match Vec::from_slice(leaf) {
                Ok(der) => Incoming::Certificate { der },
                Err(_) => Incoming::CertificateRejected {
                    reason: String::try_from("too_large: the certificate does not fit CERT_MAX")
                        .unwrap_or_default(),
                },
            })
        }
        "rejected" => {
            let text = core::str::from_utf8(payload).unwrap_or("rejected");
            let mut reason = String::new();
            for c in text.chars() {
                if reason.push(c).is_err() {
                    break;
                }
            }
            Some(Incoming::CertificateRejected { reason })
        }
        "rotate" if !payload.is_empty() => Some(Incoming::RotateRequested),
        _ => None,
    }
}

fn command(name: &str, payload: &[u8]) -> Incoming {
    #[cfg(feature = "_ota")]
    if name == crate::ota::OFFER_COMMAND {
        // A payload that is no manifest is the updater's to refuse (and report): empty here.
        return Incoming::OtaOffer { manifest: Vec::from_slice(payload).unwrap_or_default() };
    }
    match (String::try_from(name), Vec::from_slice(payload)) {
        (Ok(name), Ok(payload)) => Incoming::Command { name, payload },
        _ => Incoming::CommandTooLarge { name_len: name.len(), payload_len: payload.len() },
    }
}

/// Room for the host a device follows (MQTT 5 Server Reference); nothing without `mqtt5`.
#[cfg(feature = "mqtt5")]
type HostBuf = heapless::String<{ crate::mqtt::MAX_SERVER_REFERENCE }>;
#[cfg(not(feature = "mqtt5"))]
type HostBuf = ();

/// `host:port`, `[v6]:port` or a bare host, as (host, port); `default_port` when it names none.
#[cfg(feature = "mqtt5")]
fn split_reference(r: &str, default_port: u16) -> (&str, u16) {
    let (host, port) = match r.rsplit_once(':') {
        Some((h, p)) if !h.is_empty() && !h.ends_with(':') => match p.parse::<u16>() {
            Ok(port) if port > 0 => (h, port),
            _ => (r, default_port),
        },
        _ => (r, default_port),
    };
    (host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host), port)
}

/// A host connection: TCP whose read timeouts fall only between TLS records.
#[cfg(feature = "std")]
pub type HostLink = crate::transport::RecordBoundary<HostTcp>;

/// Connects TCP to the broker named in the bundle (host use, `std` feature), with a read
/// timeout so that `poll` returns (`Ok(None)`) when nothing arrived. Inside a TLS record the
/// timeout is waited out (for up to 10 s in all), so it never cuts one
/// ([`crate::transport::RecordBoundary`]).
#[cfg(feature = "std")]
pub fn connect_tcp(creds: &Credentials<'_>, read_timeout: core::time::Duration) -> std::io::Result<HostLink> {
    connect_tcp_to((creds.broker_host, creds.broker_port), read_timeout)
}

/// As [`connect_tcp`], to `(host, port)`: [`Device::broker`] follows a broker that sent the
/// device elsewhere.
#[cfg(feature = "std")]
pub fn connect_tcp_to(broker: (&str, u16), read_timeout: core::time::Duration) -> std::io::Result<HostLink> {
    let s = std::net::TcpStream::connect(broker)?;
    s.set_read_timeout(Some(read_timeout))?;
    s.set_nodelay(true)?;
    let stalls = 10_000 / read_timeout.as_millis().clamp(1, 10_000);
    Ok(crate::transport::RecordBoundary::new(HostTcp(s), u32::try_from(stalls).unwrap_or(1)))
}

/// A host TCP stream as an `embedded-io` transport whose read timeout is `TimedOut` (std
/// reports it as `WouldBlock`, which `embedded-io` has no name for).
#[cfg(feature = "std")]
#[derive(Debug)]
pub struct HostTcp(pub std::net::TcpStream);

#[cfg(feature = "std")]
impl embedded_io::ErrorType for HostTcp {
    type Error = embedded_io::ErrorKind;
}

#[cfg(feature = "std")]
impl Read for HostTcp {
    fn read(&mut self, buf: &mut [u8]) -> Result<usize, Self::Error> {
        use std::io::Read as _;
        self.0.read(buf).map_err(|e| match e.kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => embedded_io::ErrorKind::TimedOut,
            k => k.into(),
        })
    }
}

#[cfg(feature = "std")]
impl Write for HostTcp {
    fn write(&mut self, buf: &[u8]) -> Result<usize, Self::Error> {
        use std::io::Write as _;
        self.0.write(buf).map_err(|e| e.kind().into())
    }
    fn flush(&mut self) -> Result<(), Self::Error> {
        use std::io::Write as _;
        self.0.flush().map_err(|e| e.kind().into())
    }
}

/// Why the device is not connected (any of these: call `disconnected` and retry later, except
/// `BufferTooSmall` and `Key`, which are the firmware's configuration).
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub enum ClientError {
    /// The TLS buffers cannot hold what the broker may send ([`rx_buffer_for`]) or what the
    /// device must send ([`MIN_TX_BUFFER`]): refused before the handshake starts.
    BufferTooSmall {
        /// `"rx"` or `"tx"`.
        which: &'static str,
        /// Bytes needed.
        needed: usize,
        /// Bytes given.
        given: usize,
    },
    /// The device key is unusable: the bundle's key does not decode, the signer's public key
    /// is not the certificate's, or the signer failed to sign during the handshake.
    Key,
    /// The TLS handshake failed; `rejection` says why when the broker's certificate was refused.
    Tls {
        /// The TLS error.
        error: TlsError,
        /// Why the verifier refused the broker, if it did.
        rejection: Option<Rejection>,
    },
    /// The MQTT session failed (refused, protocol, keep-alive).
    Session(SessionError),
    /// The transport failed or closed.
    Transport,
    /// A telemetry value did not serialize into the payload size.
    Serialize,
}

impl core::fmt::Display for ClientError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::BufferTooSmall { which, needed, given } => {
                write!(f, "the TLS {which} buffer holds {given} bytes; {needed} are needed")
            }
            Self::Key => f.write_str("the device key is unusable"),
            // The verifier's reason says it all: the TLS error is only its consequence.
            Self::Tls { rejection: Some(r), .. } => write!(f, "{r}"),
            Self::Tls { error, rejection: None } => write!(f, "TLS handshake failed: {}", TlsWords(error)),
            Self::Session(e) => write!(f, "{e}"),
            Self::Transport => f.write_str("the connection failed or closed"),
            Self::Serialize => f.write_str("a telemetry value does not fit the payload size"),
        }
    }
}

/// An embedded-tls error in words (its own `Display` is its `Debug`).
struct TlsWords<'e>(&'e TlsError);

impl core::fmt::Display for TlsWords<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        use embedded_io::ErrorKind as K;
        use embedded_tls::alert::AlertDescription as A;
        let alert = |d: &A| match d {
            A::CertificateRevoked => "certificate revoked",
            A::CertificateExpired => "certificate expired",
            A::BadCertificate => "bad certificate",
            A::UnknownCa => "unknown CA",
            A::AccessDenied => "access denied",
            A::HandshakeFailure => "handshake failure",
            A::DecryptError => "decrypt error",
            _ => "alert",
        };
        f.write_str(match self.0 {
            TlsError::ConnectionClosed
            | TlsError::Io(K::BrokenPipe | K::ConnectionReset | K::ConnectionAborted | K::NotConnected) => {
                "the broker closed the connection"
            }
            TlsError::Io(K::TimedOut) => "timed out",
            TlsError::Io(_) | TlsError::IoError => "the connection failed",
            TlsError::HandshakeAborted(_, d) => return write!(f, "the broker sent an alert: {}", alert(d)),
            TlsError::AbortHandshake(_, d) => return write!(f, "aborted by this device: {}", alert(d)),
            TlsError::InsufficientSpace | TlsError::OutOfMemory => "a TLS buffer is too small",
            TlsError::InvalidCertificate | TlsError::InvalidCertificateEntry => {
                "the broker's certificate is invalid"
            }
            TlsError::InvalidSignature => "a handshake signature does not verify",
            TlsError::InvalidPrivateKey => "the device key is unusable",
            TlsError::InvalidCipherSuite | TlsError::InvalidKeyShare | TlsError::InvalidSupportedVersions => {
                "the broker offered no compatible TLS parameters"
            }
            _ => "protocol error",
        })
    }
}

/// A device: its credentials and its MQTT session with a bounded outbox of `N` messages of up
/// to `M` bytes.
#[derive(Debug)]
pub struct Device<'a, const N: usize, const M: usize> {
    creds: Credentials<'a>,
    session: Session<'a, N, M>,
    inbox: [u8; INBOX],
    filled: usize,
    /// Bytes still to discard of an oversized packet.
    skip: usize,
    /// Largest TLS record the broker sends (plaintext bytes).
    record_limit: usize,
}

impl<'a, const N: usize, const M: usize> Device<'a, N, M> {
    /// A disconnected device.
    pub fn new(creds: Credentials<'a>, cfg: SessionConfig) -> Self {
        Self::with_session(creds, Session::new(creds.device_id, cfg))
    }

    /// A claim session for first boot with the batch's claim credentials: `client_id` is
    /// `claims/<claim-id>/<nonce>`, the nonce fresh random hex (docs/spec/rotation.md).
    pub fn new_claim(creds: Credentials<'a>, client_id: &'a str, cfg: SessionConfig) -> Self {
        Self::with_session(creds, Session::new_claim(client_id, cfg))
    }

    fn with_session(creds: Credentials<'a>, session: Session<'a, N, M>) -> Self {
        Self { session, creds, inbox: [0; INBOX], filled: 0, skip: 0, record_limit: FLEET_BROKER_RECORD }
    }

    /// The largest TLS record the broker sends, in plaintext bytes: [`FLEET_BROKER_RECORD`] by
    /// default (fleet-broker's default cap); [`UNCAPPED_RECORD`] for a broker without a cap.
    /// `connect` refuses a receive buffer smaller than [`rx_buffer_for`] this.
    pub fn set_broker_record_limit(&mut self, bytes: usize) {
        self.record_limit = bytes;
    }

    /// Checks that `signer` holds the key of this device's certificate (one public-key
    /// computation: call it once at boot, not before every connection).
    pub fn check_signer(&self, signer: &mut impl DeviceSigner) -> Result<(), ClientError> {
        let cert = crate::tls::x509::parse(self.creds.cert_der).map_err(|_| ClientError::Key)?;
        match signer.public_key() {
            Some(key) if key[..] == *cert.public_key => Ok(()),
            _ => Err(ClientError::Key),
        }
    }

    /// Sends `payload` on `<root>/<suffix>` at once, outside the outbox (e.g. a CSR, larger
    /// than the outbox's messages; the [`crate::rotation::Rotator`] repeats it if unanswered).
    pub fn publish_now<T: Write>(
        &mut self,
        conn: &mut T,
        suffix: &str,
        payload: &[u8],
        now: Millis,
    ) -> Result<(), ClientError> {
        self.send_now(conn, suffix, payload, QoS::AtLeastOnce, now)
    }

    /// [`Device::publish_now`] at `qos`: e.g. an OTA chunk request (QoS 0, its sender asks
    /// again on a timeout), which must not wait behind the outbox's QoS 1 messages.
    pub fn send_now<T: Write>(
        &mut self,
        conn: &mut T,
        suffix: &str,
        payload: &[u8],
        qos: QoS,
        now: Millis,
    ) -> Result<(), ClientError> {
        self.flush(conn, now)?;
        let mut out = [0u8; OUTBOX_PACKET];
        let n = self.session.encode_now(suffix, payload, qos, &mut out).map_err(ClientError::Session)?;
        conn.write_all(&out[..n]).map_err(|_| ClientError::Transport)?;
        conn.flush().map_err(|_| ClientError::Transport)
    }

    /// Ends the MQTT session (DISCONNECT): the broker closes the connection without treating it
    /// as lost. Close or drop the transport afterwards and call [`Device::disconnected`].
    pub fn disconnect<T: Write>(&mut self, conn: &mut T) -> Result<(), ClientError> {
        conn.write_all(&DISCONNECT).map_err(|_| ClientError::Transport)?;
        conn.flush().map_err(|_| ClientError::Transport)
    }

    /// The credentials in use.
    pub fn credentials(&self) -> &Credentials<'a> {
        &self.creds
    }

    /// The session (queue length, drops, state).
    pub fn session(&self) -> &Session<'a, N, M> {
        &self.session
    }

    /// Opens mutual TLS over `transport`, verifying the broker strictly, and starts MQTT; the
    /// device key is the bundle's, in RAM. `now_unix` enables certificate date checks; `now` is
    /// the monotonic clock. `rx` must hold [`rx_buffer_for`] the broker's record limit.
    pub fn connect<'b, T: Read + Write, R: CryptoRngCore>(
        &mut self,
        transport: T,
        rx: &'b mut [u8],
        tx: &'b mut [u8],
        rng: R,
        now_unix: Option<i64>,
        now: Millis,
    ) -> Result<Connection<'b, T>, ClientError> {
        let signer = RamSigner::from_sec1_der(self.creds.key_der).ok_or(ClientError::Key)?;
        self.connect_with(transport, rx, tx, rng, signer, now_unix, now)
    }

    /// [`Device::connect`] with the device key held by `signer` (a secure element, PSA, ...).
    #[allow(clippy::too_many_arguments)]
    pub fn connect_with<'b, T: Read + Write, R: CryptoRngCore, S: DeviceSigner>(
        &mut self,
        transport: T,
        rx: &'b mut [u8],
        tx: &'b mut [u8],
        rng: R,
        signer: S,
        now_unix: Option<i64>,
        now: Millis,
    ) -> Result<Connection<'b, T>, ClientError> {
        self.check_buffers(rx.len(), tx.len())?;
        let mut moved = HostBuf::default();
        let creds = self.creds_for_tls(&mut moved);
        let config = TlsConfig::new().with_server_name(creds.broker_host);
        let mut tls = TlsConnection::new(transport, rx, tx);
        let mut provider = DeviceProvider::new(creds, signer, rng, now_unix);
        let opened = tls.open(TlsContext::new(&config, &mut provider));
        self.handshake_done(opened, &provider, now)?;
        Ok(tls)
    }

    fn check_buffers(&self, rx: usize, tx: usize) -> Result<(), ClientError> {
        let needed = rx_buffer_for(self.record_limit);
        if rx < needed {
            warn!("TLS receive buffer {} B, the broker's records need {} B", rx, needed);
            return Err(ClientError::BufferTooSmall { which: "rx", needed, given: rx });
        }
        if tx < MIN_TX_BUFFER {
            return Err(ClientError::BufferTooSmall { which: "tx", needed: MIN_TX_BUFFER, given: tx });
        }
        Ok(())
    }

    /// After `open`: the broker must have proven its identity, then MQTT starts.
    fn handshake_done<R: CryptoRngCore, S: DeviceSigner>(
        &mut self,
        opened: Result<(), TlsError>,
        provider: &DeviceProvider<'_, R, S>,
        now: Millis,
    ) -> Result<(), ClientError> {
        if provider.signer_failed() {
            warn!("the device key's signer failed during the handshake");
            return Err(ClientError::Key);
        }
        if let Err(error) = opened {
            let rejection = provider.rejection();
            warn!("TLS to {} failed: {:?}, broker rejection: {:?}", self.creds.broker_host, error, rejection);
            return Err(ClientError::Tls { error, rejection });
        }
        if let Err(rejection) = provider.authenticated() {
            // The server reached its Finished without proving its identity (embedded-tls does
            // not require it). The caller drops the connection before a single application byte.
            warn!("{} did not authenticate: {:?}", self.creds.broker_host, rejection);
            return Err(ClientError::Tls { error: TlsError::InvalidCertificate, rejection: Some(rejection) });
        }
        info!("mutual TLS to {} established", self.creds.broker_host);
        self.filled = 0;
        self.skip = 0;
        self.session.transport_up(now);
        Ok(())
    }

    /// Queues a postcard-encoded telemetry value for `devices/<id>/telemetry` (QoS 1).
    pub fn publish_telemetry<V: Serialize>(&mut self, value: &V) -> Result<(), ClientError> {
        let mut buf = [0u8; M];
        let bytes = postcard::to_slice(value, &mut buf).map_err(|_| ClientError::Serialize)?;
        self.session
            .publish(fleet_topic::suffix::TELEMETRY, bytes, QoS::AtLeastOnce)
            .map_err(ClientError::Session)
    }

    /// Queues raw bytes for `devices/<id>/<suffix>`.
    pub fn publish(&mut self, suffix: &str, payload: &[u8], qos: QoS) -> Result<(), ClientError> {
        self.session.publish(suffix, payload, qos).map_err(ClientError::Session)
    }

    /// Sends what is due, reads once, and returns the first thing that happened. A read that
    /// times out (host sockets with a read timeout) returns `Ok(None)`.
    pub fn poll<T: Read + Write>(
        &mut self,
        conn: &mut T,
        now: Millis,
    ) -> Result<Option<Incoming>, ClientError> {
        // Input already buffered first.
        if let Some(ev) = self.take_event(now)? {
            self.flush(conn, now)?;
            return Ok(Some(ev));
        }
        self.flush(conn, now)?;
        let read = conn.read(&mut self.inbox[self.filled..]).map_err(|e| e.kind());
        if !self.received(read)? {
            return Ok(None);
        }
        let ev = self.take_event(now)?;
        self.flush(conn, now)?;
        Ok(ev)
    }

    /// Sends every packet the session has due.
    pub fn flush<T: Write>(&mut self, conn: &mut T, now: Millis) -> Result<(), ClientError> {
        let mut out = [0u8; OUTBOX_PACKET];
        let mut wrote = false;
        while let Some(n) = self.transmit(now, &mut out)? {
            conn.write_all(&out[..n]).map_err(|_| ClientError::Transport)?;
            wrote = true;
        }
        if wrote {
            conn.flush().map_err(|_| ClientError::Transport)?;
        }
        Ok(())
    }

    /// The outcome of one read into the inbox: `Ok(true)` if bytes arrived, `Ok(false)` if the
    /// transport's read timed out with nothing (idle, not a failure: it fires between TLS
    /// records, nothing of the next record was consumed).
    fn received(&mut self, read: Result<usize, embedded_io::ErrorKind>) -> Result<bool, ClientError> {
        match read {
            Ok(0) => Err(ClientError::Transport),
            Ok(n) => {
                self.filled += n;
                Ok(true)
            }
            Err(embedded_io::ErrorKind::TimedOut) => Ok(false),
            Err(_) => Err(ClientError::Transport),
        }
    }

    /// The next packet due (keep-alive, queued publishes, acknowledgements), encoded in `out`.
    fn transmit(&mut self, now: Millis, out: &mut [u8; OUTBOX_PACKET]) -> Result<Option<usize>, ClientError> {
        self.session.poll_transmit(now, out).map_err(ClientError::Session)
    }

    fn take_event(&mut self, now: Millis) -> Result<Option<Incoming>, ClientError> {
        loop {
            if self.skip > 0 {
                let n = self.skip.min(self.filled);
                self.inbox.copy_within(n..self.filled, 0);
                self.filled -= n;
                self.skip -= n;
            }
            if self.filled == 0 {
                return Ok(None);
            }
            let (used, ev) =
                self.session.handle(now, &self.inbox[..self.filled]).map_err(ClientError::Session)?;
            if used == 0 {
                if self.filled < INBOX {
                    return Ok(None);
                }
                // A packet larger than the inbox: acknowledge it, then discard it as it arrives.
                let head = self.session.skip_oversized(&self.inbox).map_err(ClientError::Session)?;
                let name_len = self.session.command_name(head.topic).map(str::len);
                self.skip = head.total;
                if let Some(name_len) = name_len {
                    return Ok(Some(Incoming::CommandTooLarge { name_len, payload_len: head.payload_len }));
                }
                continue;
            }
            let out = ev.and_then(|e| match e {
                Event::Connected => Some(Incoming::Connected),
                Event::Delivered { .. } => Some(Incoming::Delivered),
                Event::Subscribed => None,
                Event::Command { name, payload } => Some(command(name, payload)),
                Event::Certs { kind, payload } => certs(kind, payload),
                #[cfg(feature = "_ota")]
                Event::OtaChunk { payload } => {
                    Vec::from_slice(payload).ok().map(|payload| Incoming::OtaChunk { payload })
                }
                #[cfg(feature = "mqtt5")]
                Event::Refused { reason, .. } => Some(Incoming::Refused { reason }),
            });
            self.inbox.copy_within(used..self.filled, 0);
            self.filled -= used;
            if out.is_some() {
                return Ok(out);
            }
        }
    }

    /// When the session next has something to send (a keep-alive PING, a retransmission):
    /// a firmware without a read timeout wakes up by then and calls `poll` again.
    pub fn poll_at(&self) -> Option<Millis> {
        self.session.poll_at()
    }

    /// The transport is gone: schedule the reconnect (jittered back-off).
    pub fn disconnected(&mut self, now: Millis, random: u32) {
        self.filled = 0;
        self.skip = 0;
        self.session.transport_down(now, random);
    }

    /// When to try connecting again.
    pub fn reconnect_at(&self) -> Millis {
        self.session.reconnect_at().unwrap_or(Millis(0))
    }

    /// The server to open the next transport to: the one the broker sent this device to (MQTT
    /// 5 "use another server" / "server moved", while the device follows it:
    /// [`Session::server_reference`]), else the bundle's broker. A reference without a port
    /// keeps the bundle's port. The TLS handshake verifies the broker under this name.
    pub fn broker(&self) -> (&str, u16) {
        #[cfg(feature = "mqtt5")]
        if let Some(r) = self.session.server_reference() {
            return split_reference(r, self.creds.broker_port);
        }
        (self.creds.broker_host, self.creds.broker_port)
    }

    /// The credentials the TLS handshake uses: the bundle's, with the host the device follows
    /// (copied into `buf`, so the handshake does not borrow the session).
    fn creds_for_tls<'s>(&self, buf: &'s mut HostBuf) -> Credentials<'s>
    where
        'a: 's,
    {
        #[allow(unused_mut)]
        let mut creds: Credentials<'s> = self.creds;
        #[cfg(feature = "mqtt5")]
        if let Some(r) = self.session.server_reference() {
            buf.clear();
            if buf.push_str(split_reference(r, 0).0).is_ok() {
                creds.broker_host = buf.as_str();
            }
        }
        #[cfg(not(feature = "mqtt5"))]
        let _ = buf;
        creds
    }
}

/// The same device over `embedded-io-async` (feature `async`): the same session, inbox and
/// outbox, so blocking and async firmware behave alike. No executor or timer is assumed: a
/// transport that should wake the device for keep-alive returns `ErrorKind::TimedOut` from a
/// read that got nothing for a while (e.g. `embassy_time::with_timeout` around the socket's
/// read), and `poll_async` returns `Ok(None)`; [`Device::poll_at`] says by when. Wrap such a
/// transport in [`crate::transport::RecordBoundary`] so that a timeout never cuts a TLS record.
#[cfg(feature = "async")]
impl<const N: usize, const M: usize> Device<'_, N, M> {
    /// [`Device::connect`] over an async transport (key in RAM).
    pub async fn connect_async<'b, T, R>(
        &mut self,
        transport: T,
        rx: &'b mut [u8],
        tx: &'b mut [u8],
        rng: R,
        now_unix: Option<i64>,
        now: Millis,
    ) -> Result<AsyncConnection<'b, T>, ClientError>
    where
        T: embedded_io_async::Read + embedded_io_async::Write + 'b,
        R: CryptoRngCore,
    {
        let signer = RamSigner::from_sec1_der(self.creds.key_der).ok_or(ClientError::Key)?;
        self.connect_with_async(transport, rx, tx, rng, signer, now_unix, now).await
    }

    /// [`Device::connect_with`] over an async transport: the key is held by `signer`.
    #[allow(clippy::too_many_arguments)]
    pub async fn connect_with_async<'b, T, R, S>(
        &mut self,
        transport: T,
        rx: &'b mut [u8],
        tx: &'b mut [u8],
        rng: R,
        signer: S,
        now_unix: Option<i64>,
        now: Millis,
    ) -> Result<AsyncConnection<'b, T>, ClientError>
    where
        T: embedded_io_async::Read + embedded_io_async::Write + 'b,
        R: CryptoRngCore,
        S: DeviceSigner,
    {
        self.check_buffers(rx.len(), tx.len())?;
        let mut moved = HostBuf::default();
        let creds = self.creds_for_tls(&mut moved);
        let config = embedded_tls::TlsConfig::new().with_server_name(creds.broker_host);
        let mut tls = embedded_tls::TlsConnection::new(transport, rx, tx);
        let mut provider = DeviceProvider::new(creds, signer, rng, now_unix);
        let opened = tls.open(embedded_tls::TlsContext::new(&config, &mut provider)).await;
        self.handshake_done(opened, &provider, now)?;
        Ok(tls)
    }

    /// [`Device::poll`]: sends what is due, reads once, returns the first thing that happened.
    pub async fn poll_async<T>(&mut self, conn: &mut T, now: Millis) -> Result<Option<Incoming>, ClientError>
    where
        T: embedded_io_async::Read + embedded_io_async::Write,
    {
        if let Some(ev) = self.take_event(now)? {
            self.flush_async(conn, now).await?;
            return Ok(Some(ev));
        }
        self.flush_async(conn, now).await?;
        let read = conn.read(&mut self.inbox[self.filled..]).await.map_err(|e| e.kind());
        if !self.received(read)? {
            return Ok(None);
        }
        let ev = self.take_event(now)?;
        self.flush_async(conn, now).await?;
        Ok(ev)
    }

    /// [`Device::flush`]: sends every packet the session has due.
    pub async fn flush_async<T: embedded_io_async::Write>(
        &mut self,
        conn: &mut T,
        now: Millis,
    ) -> Result<(), ClientError> {
        let mut out = [0u8; OUTBOX_PACKET];
        let mut wrote = false;
        while let Some(n) = self.transmit(now, &mut out)? {
            conn.write_all(&out[..n]).await.map_err(|_| ClientError::Transport)?;
            wrote = true;
        }
        if wrote {
            conn.flush().await.map_err(|_| ClientError::Transport)?;
        }
        Ok(())
    }

    /// [`Device::disconnect`]: ends the MQTT session cleanly.
    pub async fn disconnect_async<T: embedded_io_async::Write>(
        &mut self,
        conn: &mut T,
    ) -> Result<(), ClientError> {
        conn.write_all(&DISCONNECT).await.map_err(|_| ClientError::Transport)?;
        conn.flush().await.map_err(|_| ClientError::Transport)
    }
}

/// An MQTT DISCONNECT packet.
const DISCONNECT: [u8; 2] = [0xE0, 0];

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mqtt::codec::{Packet, Publish};

    /// An in-memory transport: reads from `input`, records writes.
    struct Pipe {
        input: std::vec::Vec<u8>,
        written: std::vec::Vec<u8>,
    }

    impl embedded_io::ErrorType for Pipe {
        type Error = embedded_io::ErrorKind;
    }
    impl Read for Pipe {
        fn read(&mut self, buf: &mut [u8]) -> Result<usize, Self::Error> {
            let n = buf.len().min(self.input.len());
            buf[..n].copy_from_slice(&self.input[..n]);
            self.input.drain(..n);
            Ok(n)
        }
    }
    impl Write for Pipe {
        fn write(&mut self, buf: &[u8]) -> Result<usize, Self::Error> {
            self.written.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> Result<(), Self::Error> {
            Ok(())
        }
    }

    fn command_bytes(name: &str, payload: &[u8]) -> std::vec::Vec<u8> {
        let topic = std::format!("devices/dev-1/commands/{name}");
        let p = Publish {
            topic: &topic,
            payload,
            qos: QoS::AtLeastOnce,
            retain: false,
            dup: false,
            pkid: Some(3),
        };
        let mut out = std::vec![0u8; 8192];
        let n = Packet::Publish(p).encode(&mut out).expect("encode");
        out[..n].to_vec()
    }

    #[test]
    fn commands_are_delivered_whole_or_reported_too_large() {
        let creds = Credentials {
            device_id: "dev-1",
            cert_der: &[0x30],
            key_der: &[0x30],
            server_ca_der: &[0x30],
            broker_host: "localhost",
            broker_port: 8883,
        };
        let mut d: Device<'_, 4, 64> = Device::new(creds, SessionConfig::default());
        d.session.transport_up(Millis(0));
        let mut input = std::vec![0x20, 2, 0, 0]; // CONNACK
        input.extend(command_bytes("blink", b"3"));
        input.extend(command_bytes("firmware", &[7u8; 300]));
        input.extend(command_bytes(&"n".repeat(40), b"x"));
        // Larger than the whole inbox: skipped and acknowledged, the session goes on.
        input.extend(command_bytes("image", &[9u8; 3 * INBOX]));
        input.extend(command_bytes("blink", b"4"));
        let mut pipe = Pipe { input, written: std::vec::Vec::new() };
        assert_eq!(d.poll(&mut pipe, Millis(1)).expect("poll"), Some(Incoming::Connected));
        let got = d.poll(&mut pipe, Millis(2)).expect("poll");
        assert_eq!(
            got,
            Some(Incoming::Command {
                name: "blink".try_into().expect("fits"),
                payload: Vec::from_slice(b"3").expect("fits")
            })
        );
        assert_eq!(
            d.poll(&mut pipe, Millis(3)).expect("poll"),
            Some(Incoming::CommandTooLarge { name_len: 8, payload_len: 300 })
        );
        assert_eq!(
            d.poll(&mut pipe, Millis(4)).expect("poll"),
            Some(Incoming::CommandTooLarge { name_len: 40, payload_len: 1 })
        );
        assert_eq!(
            d.poll(&mut pipe, Millis(5)).expect("an oversized command is no connection error"),
            Some(Incoming::CommandTooLarge { name_len: 5, payload_len: 3 * INBOX })
        );
        let mut next = None;
        for t in 6..20 {
            next = d.poll(&mut pipe, Millis(t)).expect("poll");
            if next.is_some() {
                break;
            }
        }
        assert_eq!(
            next,
            Some(Incoming::Command {
                name: "blink".try_into().expect("fits"),
                payload: Vec::from_slice(b"4").expect("fits")
            })
        );
        // CONNECT went out first; every QoS 1 command was acknowledged.
        assert_eq!(pipe.written[0] >> 4, 1);
        assert!(pipe.written.windows(4).filter(|w| *w == [0x40, 2, 0, 3]).count() >= 5);
    }
}
