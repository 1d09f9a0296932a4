//! A minimal mutual-TLS MQTT client for the benchmarks: every server gets the same bytes. It
//! speaks 3.1.1, or MQTT 5 for the whole run (`--mqtt 5`: CONNECT, PUBLISH and what is read
//! back in v5 encoding, no properties).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use std::sync::atomic::{AtomicBool, Ordering};

use bytes::{Buf, BufMut, BytesMut};
use rumqttc::mqttbytes::v4::{Connect, Packet, Publish};
use rumqttc::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5 as m5;
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

static MQTT5: AtomicBool = AtomicBool::new(false);

/// Speak MQTT 5 instead of 3.1.1 from now on.
pub(crate) fn use_mqtt5(on: bool) {
    MQTT5.store(on, Ordering::Relaxed);
}

pub(crate) fn mqtt5() -> bool {
    MQTT5.load(Ordering::Relaxed)
}

/// CONNECT for `who` in the run's protocol (clean, no properties).
fn connect_bytes(who: &Identity, keep_alive: u16) -> Option<BytesMut> {
    let mut out = BytesMut::new();
    if mqtt5() {
        let c = m5::Connect { keep_alive, client_id: who.id.clone(), clean_start: true, properties: None };
        m5::Packet::Connect(c, None, None).write(&mut out, None).ok()?;
    } else {
        let mut c = Connect::new(who.id.clone());
        c.keep_alive = keep_alive;
        Packet::Connect(c).write(&mut out, 1 << 16).ok()?;
    }
    Some(out)
}

/// Sends CONNECT and reads the CONNACK's return (3.1.1) or reason (5) code.
async fn connect(s: &mut Tls, who: &Identity, keep_alive: u16) -> Option<u8> {
    s.write_all(&connect_bytes(who, keep_alive)?).await.ok()?;
    let mut head = [0u8; 2];
    s.read_exact(&mut head).await.ok()?;
    // A CONNACK's remaining length fits one byte here (v5: a few properties).
    if head[0] != 0x20 || head[1] < 2 || head[1] > 127 {
        return None;
    }
    let mut body = vec![0u8; usize::from(head[1])];
    s.read_exact(&mut body).await.ok()?;
    Some(body[1])
}

/// TLS handshake + CONNECT → CONNACK (accepted). Returns the open session.
pub(crate) async fn session(addr: SocketAddr, who: &Identity, keep_alive: u16) -> Option<Tls> {
    let mut s = tls(addr, who).await?;
    (connect(&mut s, who, keep_alive).await? == 0).then_some(s)
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
    match connect(&mut s, who, keep_alive).await {
        Some(0) => Outcome::Admitted(Box::new(s)),
        // 3.1.1: server unavailable; 5: server unavailable, server busy.
        Some(3 | 0x88 | 0x89) => Outcome::Unavailable,
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

/// Encodes one PUBLISH, by hand in both protocols (so that the client's cost does not differ
/// between them): a v5 PUBLISH without properties is the 3.1.1 one with a property length of 0
/// after the packet id.
pub(crate) fn publish(out: &mut BytesMut, topic: &str, qos: QoS, pkid: u16, payload: &[u8]) {
    let v5 = mqtt5();
    let id_len = if qos == QoS::AtMostOnce { 0 } else { 2 };
    let mut rest = 2 + topic.len() + id_len + usize::from(v5) + payload.len();
    out.put_u8(0x30 | ((qos as u8) << 1));
    loop {
        let byte = (rest % 128) as u8;
        rest /= 128;
        out.put_u8(if rest > 0 { byte | 0x80 } else { byte });
        if rest == 0 {
            break;
        }
    }
    out.put_u16(topic.len() as u16);
    out.put_slice(topic.as_bytes());
    if id_len > 0 {
        out.put_u16(pkid);
    }
    if v5 {
        out.put_u8(0);
    }
    out.put_slice(payload);
}

/// The next packet in `buf`, in the run's protocol, as its 3.1.1 counterpart (MQTT 5 PUBACKs,
/// PINGRESPs and PUBLISHes; anything else of a v5 server is skipped).
fn next_packet(buf: &mut BytesMut) -> Result<Option<Packet>, ()> {
    // A successful PUBACK without properties and a PINGRESP are the same four and two bytes
    // in both protocols: read here by hand for both, so
    // that the client's cost does not differ between the protocols.
    if let [0x40, 2, hi, lo, ..] = buf[..] {
        let pkid = u16::from_be_bytes([hi, lo]);
        buf.advance(4);
        return Ok(Some(Packet::PubAck(rumqttc::mqttbytes::v4::PubAck::new(pkid))));
    }
    if let [0xd0, 0, ..] = buf[..] {
        buf.advance(2);
        return Ok(Some(Packet::PingResp));
    }
    if !mqtt5() {
        return match Packet::read(buf, 1 << 20) {
            Ok(p) => Ok(Some(p)),
            Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => Ok(None),
            Err(_) => Err(()),
        };
    }
    match m5::Packet::read(buf, None) {
        Ok(m5::Packet::PubAck(a)) => Ok(Some(Packet::PubAck(rumqttc::mqttbytes::v4::PubAck::new(a.pkid)))),
        Ok(m5::Packet::PingResp(_)) => Ok(Some(Packet::PingResp)),
        Ok(m5::Packet::Publish(p)) => {
            let topic = String::from_utf8_lossy(&p.topic).into_owned();
            let mut out = Publish::new(topic, QoS::AtLeastOnce, p.payload.to_vec());
            (out.pkid, out.dup) = (p.pkid, p.dup);
            Ok(Some(Packet::Publish(out)))
        }
        Ok(_) => Ok(Some(Packet::PingReq)),
        Err(rumqttc::v5::mqttbytes::Error::InsufficientBytes(_)) => Ok(None),
        Err(_) => Err(()),
    }
}

/// Reads packets from `rd`, calling `on` for each, until EOF or an error.
pub(crate) async fn read_packets(rd: &mut ReadHalf<Tls>, mut on: impl FnMut(Packet) -> bool) {
    let mut buf = BytesMut::with_capacity(8192);
    loop {
        loop {
            match next_packet(&mut buf) {
                Ok(Some(p)) => {
                    if !on(p) {
                        return;
                    }
                }
                Ok(None) => break,
                Err(()) => return,
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
