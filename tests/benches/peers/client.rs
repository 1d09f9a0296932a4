//! A minimal mutual-TLS MQTT 3.1.1 client for the benchmarks: every server gets the same bytes.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use bytes::BytesMut;
use rumqttc::mqttbytes::v4::{Connect, Packet, Publish};
use rumqttc::mqttbytes::QoS;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::TcpStream;

pub(crate) type Tls = tokio_rustls::client::TlsStream<TcpStream>;

/// A device identity as minted by the station, loaded into a rustls client configuration.
pub(crate) struct Identity {
    pub(crate) id: String,
    pub(crate) config: Arc<rustls::ClientConfig>,
}

impl Identity {
    pub(crate) fn load(dir: &Path) -> Identity {
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_file_iter(dir.join("broker-trust.pem")).expect("trust") {
            roots.add(c.expect("cert")).expect("root");
        }
        let chain: Vec<_> = CertificateDer::pem_file_iter(dir.join("cert.pem"))
            .expect("cert")
            .map(|c| c.expect("c"))
            .collect();
        let key = PrivateKeyDer::from_pem_file(dir.join("key.pem")).expect("key");
        let mut config =
            rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_protocol_versions(&[&rustls::version::TLS13])
                .expect("tls13")
                .with_root_certificates(roots)
                .with_client_auth_cert(chain, key)
                .expect("client auth");
        // Every admission is a full handshake: devices rarely resume.
        config.resumption = rustls::client::Resumption::disabled();
        Identity {
            id: dir.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_owned(),
            config: Arc::new(config),
        }
    }
}

/// A source address for the next connection: the clients spread over 127.0.100.1-254, as a
/// fleet comes from many addresses (the broker holds each address to
/// `max_pre_admission_per_source` connections in the handshake at once).
fn next_source() -> SocketAddr {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % 254;
    SocketAddr::from(([127, 0, 100, n as u8 + 1], 0))
}

/// TCP connect (from the next loopback source address) + TLS 1.3 handshake.
pub(crate) async fn tls(addr: SocketAddr, who: &Identity) -> Option<Tls> {
    let sock = tokio::net::TcpSocket::new_v4().ok()?;
    sock.bind(next_source()).ok()?;
    let tcp = sock.connect(addr).await.ok()?;
    let _ = tcp.set_nodelay(true);
    let name = ServerName::try_from("localhost").expect("name");
    tokio_rustls::TlsConnector::from(who.config.clone()).connect(name, tcp).await.ok()
}

/// TLS handshake, then the server's verdict: TLS 1.3 delivers a refusal of the client
/// certificate with the server's first write, and the bare server writes one byte on success.
pub(crate) async fn handshake_only(addr: SocketAddr, who: &Identity) -> bool {
    let Some(mut s) = tls(addr, who).await else { return false };
    let mut b = [0u8; 1];
    matches!(s.read(&mut b).await, Ok(1))
}

/// TLS handshake + CONNECT → CONNACK (accepted). Returns the open session.
pub(crate) async fn session(addr: SocketAddr, who: &Identity, keep_alive: u16) -> Option<Tls> {
    let mut s = tls(addr, who).await?;
    let mut out = BytesMut::new();
    let mut c = Connect::new(who.id.clone());
    c.keep_alive = keep_alive;
    Packet::Connect(c).write(&mut out, 1 << 16).ok()?;
    s.write_all(&out).await.ok()?;
    let mut buf = [0u8; 4];
    s.read_exact(&mut buf).await.ok()?;
    (buf == [0x20, 2, 0, 0]).then_some(s)
}

/// How a connect attempt ended.
pub(crate) enum Outcome {
    /// CONNACK 0: the open session.
    Admitted(Box<Tls>),
    /// CONNACK 3 (server unavailable: come back later).
    Unavailable,
    /// TCP or TLS failed, or another CONNACK.
    Failed,
}

/// TLS handshake + CONNECT → CONNACK, telling a "server unavailable" refusal apart.
pub(crate) async fn session_outcome(addr: SocketAddr, who: &Identity, keep_alive: u16) -> Outcome {
    let Some(mut s) = tls(addr, who).await else { return Outcome::Failed };
    let mut out = BytesMut::new();
    let mut c = Connect::new(who.id.clone());
    c.keep_alive = keep_alive;
    if Packet::Connect(c).write(&mut out, 1 << 16).is_err() || s.write_all(&out).await.is_err() {
        return Outcome::Failed;
    }
    let mut buf = [0u8; 4];
    if s.read_exact(&mut buf).await.is_err() {
        return Outcome::Failed;
    }
    match buf {
        [0x20, 2, _, 0] => Outcome::Admitted(Box::new(s)),
        [0x20, 2, _, 3] => Outcome::Unavailable,
        _ => Outcome::Failed,
    }
}

/// A full admission: session, then DISCONNECT.
pub(crate) async fn admit(addr: SocketAddr, who: &Identity) -> bool {
    match session(addr, who, 30).await {
        Some(mut s) => {
            // DISCONNECT, then close the socket (as MQTT clients do; no TLS close_notify).
            let _ = s.write_all(&[0xe0, 0]).await;
            true
        }
        None => false,
    }
}

/// Encodes one PUBLISH.
pub(crate) fn publish(out: &mut BytesMut, topic: &str, qos: QoS, pkid: u16, payload: &[u8]) {
    let mut p = Publish::new(topic, qos, payload.to_vec());
    p.pkid = pkid;
    Packet::Publish(p).write(out, 1 << 20).expect("encode publish");
}

/// Reads packets from `rd`, calling `on` for each, until EOF or an error.
pub(crate) async fn read_packets(rd: &mut ReadHalf<Tls>, mut on: impl FnMut(Packet) -> bool) {
    let mut buf = BytesMut::with_capacity(8192);
    loop {
        loop {
            match Packet::read(&mut buf, 1 << 20) {
                Ok(p) => {
                    if !on(p) {
                        return;
                    }
                }
                Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => break,
                Err(_) => return,
            }
        }
        match rd.read_buf(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

/// Sends PINGREQ and waits for the reader to see PINGRESP (a barrier: the server has handled
/// every packet sent before it on this connection).
pub(crate) async fn ping(wr: &mut WriteHalf<Tls>) -> bool {
    wr.write_all(&[0xc0, 0]).await.is_ok() && wr.flush().await.is_ok()
}
