//! Side-by-side mutual-TLS admission throughput on loopback, in one run:
//! fleet-broker vs Mosquitto (require_certificate, use_identity_as_username, crlfile) vs a bare
//! rustls server (the ceiling: handshake only, no MQTT, no registry).
//!
//!     cargo bench -p fleet-broker --bench peers [-- SECONDS CONCURRENCY]
//!
//! Each client: TCP connect, TLS 1.3 with a P-256 client certificate (full handshake, no
//! resumption), MQTT CONNECT → CONNACK (the bare server: handshake complete), close.
//! Clients run in this process on the same 2 cores as the server under test, so the figures are
//! lower bounds and comparable with each other, not absolute.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use fleet_provision::home::Home;
use fleet_provision::station::{MintOptions, Station};
use rumqttc::mqttbytes::v4::{Connect, Packet};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

struct Identity {
    id: String,
    config: Arc<rustls::ClientConfig>,
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn identity(dir: &Path) -> Identity {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(dir.join("broker-trust.pem")).expect("trust") {
        roots.add(c.expect("cert")).expect("root");
    }
    let chain: Vec<_> =
        CertificateDer::pem_file_iter(dir.join("cert.pem")).expect("cert").map(|c| c.expect("c")).collect();
    let key = PrivateKeyDer::from_pem_file(dir.join("key.pem")).expect("key");
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("tls13")
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .expect("client auth");
    config.resumption = rustls::client::Resumption::disabled();
    Identity {
        id: dir.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_owned(),
        config: Arc::new(config),
    }
}

/// One admission; true if it completed.
async fn admit(addr: SocketAddr, who: &Identity, mqtt: bool) -> bool {
    let Ok(tcp) = TcpStream::connect(addr).await else { return false };
    let _ = tcp.set_nodelay(true);
    let name = ServerName::try_from("localhost").expect("name");
    let Ok(mut tls) = tokio_rustls::TlsConnector::from(who.config.clone()).connect(name, tcp).await else {
        return false;
    };
    if !mqtt {
        // TLS 1.3: the server's verdict on the client certificate arrives with its first write;
        // the bare server writes one byte after a successful handshake.
        let mut b = [0u8; 1];
        return matches!(tls.read(&mut b).await, Ok(1));
    }
    let mut out = BytesMut::new();
    let mut c = Connect::new(who.id.clone());
    c.keep_alive = 30;
    if Packet::Connect(c).write(&mut out, 1 << 16).is_err() || tls.write_all(&out).await.is_err() {
        return false;
    }
    let mut buf = [0u8; 4];
    let ok = tls.read_exact(&mut buf).await.is_ok() && buf == [0x20, 2, 0, 0];
    let _ = tls.write_all(&[0xe0, 0]).await;
    ok
}

async fn measure(
    label: &str,
    addr: SocketAddr,
    ids: &Arc<Vec<Identity>>,
    mqtt: bool,
    secs: f64,
    conc: usize,
) -> f64 {
    let done = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let until = Instant::now() + Duration::from_secs_f64(secs);
    let mut tasks = Vec::new();
    for w in 0..conc {
        let (ids, done, failed) = (ids.clone(), done.clone(), failed.clone());
        tasks.push(tokio::spawn(async move {
            let mut i = w;
            while Instant::now() < until {
                if admit(addr, &ids[i % ids.len()], mqtt).await {
                    done.fetch_add(1, Ordering::Relaxed);
                } else {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
                i += conc;
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let rate = done.load(Ordering::Relaxed) as f64 / secs;
    println!("  {label:<34} {rate:>8.0} admissions/s   ({} failed)", failed.load(Ordering::Relaxed));
    rate
}

/// The ceiling: rustls with the same client verifier, no MQTT, no registry.
async fn bare_rustls(home: &Path) -> SocketAddr {
    let paths = fleet_broker::tls::TlsPaths {
        cert: home.join("broker-tls/cert.pem"),
        key: home.join("broker-tls/key.pem"),
        client_ca: home.join("device-ca.pem"),
        crl: Some(home.join("crl.pem")),
    };
    let state = fleet_broker::tls::build(&paths).expect("tls");
    let acceptor = tokio_rustls::TlsAcceptor::from(state.config);
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        loop {
            let Ok((sock, _)) = listener.accept().await else { continue };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                if let Ok(mut tls) = acceptor.accept(sock).await {
                    let _ = tls.write_all(&[1]).await;
                    let _ = tls.flush().await;
                }
            });
        }
    });
    addr
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).unwrap_or(18883)
}

fn wait_listening(addr: SocketAddr) {
    let t = Instant::now();
    while std::net::TcpStream::connect(addr).is_err() && t.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(50));
    }
}

struct Proc(Child);
impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn mosquitto(home: &Path, dir: &Path) -> Option<(Proc, SocketAddr)> {
    let bin =
        ["/usr/sbin/mosquitto", "/usr/bin/mosquitto"].into_iter().map(PathBuf::from).find(|p| p.is_file())?;
    let port = free_port();
    let conf = dir.join("mosquitto.conf");
    std::fs::write(
        &conf,
        format!(
            "listener {port} 127.0.0.1\ncafile {}\ncertfile {}\nkeyfile {}\ncrlfile {}\nrequire_certificate true\n\
             use_identity_as_username true\ntls_version tlsv1.3\nallow_anonymous false\nuser root\nlog_type none\n",
            home.join("device-ca-chain.pem").display(),
            home.join("broker-tls/cert.pem").display(),
            home.join("broker-tls/key.pem").display(),
            home.join("crl.pem").display(),
        ),
    )
    .ok()?;
    let child =
        Command::new(bin).arg("-c").arg(&conf).stdout(Stdio::null()).stderr(Stdio::null()).spawn().ok()?;
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().ok()?;
    wait_listening(addr);
    Some((Proc(child), addr))
}

fn fleet_broker(home: &Path) -> (Proc, SocketAddr) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_fleet-broker"))
        .arg("--home")
        .arg(home)
        .args(["--listen", "127.0.0.1:0", "--metrics-listen", "off"])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn fleet-broker");
    let mut line = String::new();
    use std::io::BufRead;
    let _ = std::io::BufReader::new(child.stdout.take().expect("stdout")).read_line(&mut line);
    let addr = line
        .split_whitespace()
        .find(|w| w.starts_with("127.0.0.1:"))
        .and_then(|a| a.parse().ok())
        .expect("addr");
    (Proc(child), addr)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    let secs: f64 = args.first().and_then(|a| a.parse().ok()).unwrap_or(5.0);
    let conc: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(16);
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    rt.block_on(async {
        let dir = tempfile::tempdir().expect("tempdir");
        let home = dir.path().join("home");
        let st = Station::init(Home::new(&home), "Bench", None).await.expect("init");
        st.server_cert(&["localhost".into()], &[], &home.join("broker-tls")).await.expect("server cert");
        let opts = MintOptions {
            count: 64,
            prefix: "bench".into(),
            out: dir.path().join("devices"),
            broker_host: "localhost".into(),
            broker_port: 8883,
            chunk: 64,
        };
        let minted = st.mint(&opts, &|_| {}).await.expect("mint");
        let ids: Arc<Vec<Identity>> = Arc::new(minted.iter().map(|d| identity(&d.dir)).collect());
        println!("mTLS admissions (TLS 1.3, P-256 client certs, full handshakes), {secs} s each, {conc} concurrent clients");
        let bare = bare_rustls(&home).await;
        let ceiling = measure("bare rustls (handshake only)", bare, &ids, false, secs, conc).await;
        let (_fb, fb_addr) = fleet_broker(&home);
        wait_listening(fb_addr);
        let fb = measure("fleet-broker (+CONNECT/CONNACK)", fb_addr, &ids, true, secs, conc).await;
        let mq = match mosquitto(&home, dir.path()) {
            Some((_p, addr)) => measure("mosquitto (+CONNECT/CONNACK)", addr, &ids, true, secs, conc).await,
            None => {
                println!("  mosquitto not installed (apt-get install mosquitto): skipped");
                0.0
            }
        };
        println!("  fleet-broker / bare rustls = {:.2}", fb / ceiling);
        if mq > 0.0 {
            println!("  fleet-broker / mosquitto   = {:.2}", fb / mq);
        }
    });
}
