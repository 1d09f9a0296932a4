//! Test-only helpers over the fixtures of the `fleet-tests` library ([`fleet_tests::fixture`]:
//! the fleet, the broker process, Mosquitto, the cluster), re-exported here: clients (rumqttc,
//! a raw TLS+MQTT client), metric series names, and waits on a child's output.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used)] // shared by several test binaries; test code

pub mod admin;
pub mod bus;
pub mod qemu;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use rumqttc::mqttbytes::v4::Packet;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub use fleet_broker::outcome::{CloseReason, Refusal};
#[allow(unused_imports)] // each test binary uses some
pub use fleet_tests::fixture::{
    rand_suffix, refused, BrokerProc, Cluster, ClusterBuilder, Fleet, Mosquitto, LATENCY_BOUND, PATIENCE,
};

/// `fleet_connections_rejected_total` series of an accept-time refusal.
pub fn rejected(r: Refusal) -> String {
    format!("fleet_connections_rejected_total{{reason=\"{}\"}}", r.label())
}

/// `fleet_kicks_total` series of a close the broker made.
pub fn kicks(c: CloseReason) -> String {
    format!("fleet_kicks_total{{reason=\"{}\"}}", c.label())
}

/// `fleet_protocol_errors_total` series of a protocol violation.
pub fn protocol_errors(c: CloseReason) -> String {
    format!("fleet_protocol_errors_total{{reason=\"{}\"}}", c.label())
}

/// The `fleet-broker` binary of this workspace (built by `cargo build --workspace --bins`).
pub fn broker_bin() -> PathBuf {
    fleet_tests::workspace_bin_dir(&["fleet-broker"]).join("fleet-broker")
}

pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A rustls client config trusting `trust` (PEM file), with an optional client identity.
pub fn client_config(trust: &Path, identity: Option<(&Path, &Path)>) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(trust).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let b = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots);
    Arc::new(match identity {
        Some((cert, key)) => {
            let chain: Vec<_> = CertificateDer::pem_file_iter(cert).unwrap().map(|c| c.unwrap()).collect();
            b.with_client_auth_cert(chain, PrivateKeyDer::from_pem_file(key).unwrap()).unwrap()
        }
        None => b.with_no_client_auth(),
    })
}

/// A minimal MQTT client over TLS, for the cases rumqttc will not produce.
pub struct Raw {
    pub tls: tokio_rustls::client::TlsStream<TcpStream>,
    buf: BytesMut,
}

/// A TCP connection to `addr` from loopback address `src` (any of 127.0.0.0/8), for tests of
/// per-source limits.
pub async fn tcp_from(src: [u8; 4], addr: SocketAddr) -> std::io::Result<TcpStream> {
    let s = tokio::net::TcpSocket::new_v4()?;
    s.bind(SocketAddr::from((src, 0)))?;
    s.connect(addr).await
}

impl Raw {
    pub async fn connect(addr: SocketAddr, cfg: Arc<rustls::ClientConfig>) -> std::io::Result<Raw> {
        Self::over(TcpStream::connect(addr).await?, cfg).await
    }
    /// TLS over an existing TCP connection.
    pub async fn over(tcp: TcpStream, cfg: Arc<rustls::ClientConfig>) -> std::io::Result<Raw> {
        let tls = tokio_rustls::TlsConnector::from(cfg)
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await?;
        Ok(Raw { tls, buf: BytesMut::new() })
    }
    /// The device in `dir` over an existing TCP connection.
    pub async fn device_over(tcp: TcpStream, dir: &Path) -> std::io::Result<Raw> {
        Self::over(
            tcp,
            client_config(&dir.join("broker-trust.pem"), Some((&dir.join("cert.pem"), &dir.join("key.pem")))),
        )
        .await
    }
    pub async fn device(addr: SocketAddr, dir: &Path) -> std::io::Result<Raw> {
        Self::connect(
            addr,
            client_config(&dir.join("broker-trust.pem"), Some((&dir.join("cert.pem"), &dir.join("key.pem")))),
        )
        .await
    }
    pub async fn send(&mut self, p: Packet) -> std::io::Result<()> {
        let mut out = BytesMut::new();
        p.write(&mut out, 1 << 20).unwrap();
        self.tls.write_all(&out).await?;
        self.tls.flush().await
    }
    pub async fn send_raw(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.tls.write_all(bytes).await?;
        self.tls.flush().await
    }
    /// Next packet, `None` on EOF/error, within `within`.
    pub async fn recv(&mut self, within: Duration) -> Option<Packet> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if !self.buf.is_empty() {
                match Packet::read(&mut self.buf, 1 << 20) {
                    Ok(p) => return Some(p),
                    Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => {}
                    Err(_) => return None,
                }
            }
            match tokio::time::timeout_at(deadline, self.tls.read_buf(&mut self.buf)).await {
                Ok(Ok(n)) if n > 0 => {}
                _ => return None,
            }
        }
    }
    pub async fn mqtt_connect(&mut self, client_id: &str, keep_alive: u16) -> Option<Packet> {
        let mut c = rumqttc::mqttbytes::v4::Connect::new(client_id);
        c.keep_alive = keep_alive;
        self.send(Packet::Connect(c)).await.ok()?;
        self.recv(PATIENCE).await
    }
    /// True if the peer closed the connection within `within`.
    pub async fn closed_within(&mut self, within: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            match tokio::time::timeout_at(deadline, self.tls.read_buf(&mut self.buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                Ok(Ok(_)) => continue,
                Err(_) => return false,
            }
        }
    }
}

/// Waits for the SUBACK of `filter` on a raw session.
pub async fn subscribe(c: &mut Raw, filter: &str, pkid: u16) {
    let mut sub = rumqttc::mqttbytes::v4::Subscribe::new(filter, rumqttc::mqttbytes::QoS::AtLeastOnce);
    sub.pkid = pkid;
    c.send(Packet::Subscribe(sub)).await.unwrap();
    assert!(matches!(c.recv(PATIENCE).await, Some(Packet::SubAck(_))), "no SUBACK for {filter}");
}

/// The next PUBLISH a raw session receives (skipping other packets).
pub async fn next_publish(c: &mut Raw, within: Duration) -> Option<rumqttc::mqttbytes::v4::Publish> {
    let t = Instant::now();
    while t.elapsed() < within {
        match c.recv(within - t.elapsed()).await {
            Some(Packet::Publish(p)) => return Some(p),
            Some(_) => continue,
            None => return None,
        }
    }
    None
}

pub fn connack_code(p: &Option<Packet>) -> Option<rumqttc::mqttbytes::v4::ConnectReturnCode> {
    match p {
        Some(Packet::ConnAck(a)) => Some(a.code),
        _ => None,
    }
}

/// rumqttc options for a device or service directory.
pub fn rumqttc_options(dir: &Path, client_id: &str, addr: SocketAddr) -> rumqttc::MqttOptions {
    let mut o = rumqttc::MqttOptions::new(client_id, "localhost", addr.port());
    o.set_keep_alive(Duration::from_secs(30));
    let cfg =
        client_config(&dir.join("broker-trust.pem"), Some((&dir.join("cert.pem"), &dir.join("key.pem"))));
    o.set_transport(rumqttc::Transport::tls_with_config(rumqttc::TlsConfiguration::Rustls(cfg)));
    o
}

/// Polls a rumqttc event loop until CONNACK; returns the error if the connection fails.
pub async fn rumqttc_connected(ev: &mut rumqttc::EventLoop) -> Result<(), rumqttc::ConnectionError> {
    loop {
        let event = tokio::time::timeout(PATIENCE, ev.poll()).await.expect("rumqttc poll timed out")?;
        if let rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_)) = event {
            return Ok(());
        }
    }
}

// ---- persistent sessions (clean session = 0) ----

/// A raw CONNECT with the clean-session flag; returns (accepted, session present).
pub async fn connect_session(c: &mut Raw, client_id: &str, clean: bool) -> (bool, bool) {
    let mut conn = rumqttc::mqttbytes::v4::Connect::new(client_id);
    conn.keep_alive = 30;
    conn.clean_session = clean;
    c.send(Packet::Connect(conn)).await.unwrap();
    match c.recv(PATIENCE).await {
        Some(Packet::ConnAck(a)) => {
            (a.code == rumqttc::mqttbytes::v4::ConnectReturnCode::Success, a.session_present)
        }
        other => panic!("no CONNACK: {other:?}"),
    }
}

/// The lines a child process writes, as they come (a reader thread ends at EOF).
pub fn lines_of(out: impl std::io::Read + Send + 'static) -> std::sync::mpsc::Receiver<String> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    rx
}

/// Reads `lines` until one satisfies `pred` (at most [`PATIENCE`]); returns every line read.
pub fn wait_line(
    lines: &std::sync::mpsc::Receiver<String>,
    what: &str,
    pred: impl Fn(&str) -> bool,
) -> Vec<String> {
    let t = Instant::now();
    let mut seen = Vec::new();
    loop {
        let Some(left) = PATIENCE.checked_sub(t.elapsed()) else {
            panic!("no line with {what} in {PATIENCE:?}: {seen:?}");
        };
        match lines.recv_timeout(left) {
            Ok(l) => {
                let done = pred(&l);
                seen.push(l);
                if done {
                    return seen;
                }
            }
            Err(_) => panic!("no line with {what} (the output ended or went quiet): {seen:?}"),
        }
    }
}
