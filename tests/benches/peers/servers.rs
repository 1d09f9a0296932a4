//! Starting each server under test on loopback with equivalent mutual-TLS settings.

use std::io::BufRead;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use fleet_tests::fixture::{BrokerCommand, BrokerLog, Mosquitto, Process};
use std::time::{Duration, Instant};

/// The servers compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Peer {
    /// rustls with the same client verifier, handshake only: the ceiling.
    Bare,
    FleetBroker,
    Mosquitto,
    Rumqttd,
}

impl Peer {
    pub(crate) const ALL: [Peer; 4] = [Peer::Bare, Peer::FleetBroker, Peer::Mosquitto, Peer::Rumqttd];

    pub(crate) fn name(self) -> &'static str {
        match self {
            Peer::Bare => "bare rustls (handshake only)",
            Peer::FleetBroker => "fleet-broker",
            Peer::Mosquitto => "mosquitto",
            Peer::Rumqttd => "rumqttd",
        }
    }

    /// Whether the server checks a CRL.
    pub(crate) fn checks_crl(self) -> bool {
        self != Peer::Rumqttd
    }
}

/// A running server process, killed on drop.
pub(crate) struct Server {
    pub(crate) addr: SocketAddr,
    child: Process,
}

impl Server {
    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Resident set size in KiB (from /proc).
    pub(crate) fn rss_kib(&self) -> u64 {
        proc_field(&format!("/proc/{}/status", self.pid()), "VmRSS:", 1).unwrap_or(0)
    }

    /// Sends SIGHUP (Mosquitto reloads its configuration on it).
    pub(crate) fn hangup(&self) {
        self.signal("HUP");
    }

    /// Sends a signal (`TERM`, `KILL`, `HUP`).
    pub(crate) fn signal(&self, name: &str) {
        let _ = Command::new("kill").arg(format!("-{name}")).arg(self.pid().to_string()).status();
    }

    /// Waits until the process has exited.
    pub(crate) fn wait(&mut self) {
        let _ = self.child.wait();
    }

    /// CPU time the server has used so far (user + system), seconds.
    pub(crate) fn cpu_secs(&self) -> f64 {
        cpu_secs(self.pid())
    }
}

/// User + system CPU seconds of process `pid` (/proc/PID/stat fields 14 and 15, in clock ticks
/// of 1/100 s on Linux).
pub(crate) fn cpu_secs(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return 0.0 };
    // Fields after the command name (which may hold spaces) start at field 3.
    let Some((_, rest)) = stat.rsplit_once(')') else { return 0.0 };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    (ticks(11) + ticks(12)) as f64 / 100.0
}

/// Field `index` (whitespace-separated) of the first line starting with `prefix` in a /proc file.
pub(crate) fn proc_field(path: &str, prefix: &str, index: usize) -> Option<u64> {
    let text = std::fs::read_to_string(path).ok()?;
    text.lines().find(|l| l.starts_with(prefix))?.split_whitespace().nth(index)?.parse().ok()
}

/// Runs a peer with `-c CONF`, output discarded.
fn spawn_with_config(bin: &Path, conf: &Path) -> Result<Child, String> {
    Command::new(bin)
        .arg("-c")
        .arg(conf)
        .env("RUST_LOG", "error")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("{}: {e}", bin.display()))
}

/// Where the peers' programs are, and why one is missing.
pub(crate) fn program(peer: Peer) -> Result<PathBuf, String> {
    let found = |names: &[&str]| {
        let mut dirs: Vec<PathBuf> =
            std::env::var_os("PATH").map(|p| std::env::split_paths(&p).collect()).unwrap_or_default();
        dirs.extend(["/usr/sbin", "/usr/bin"].map(PathBuf::from));
        if let Some(h) = std::env::var_os("CARGO_HOME")
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo").into_os_string()))
        {
            dirs.push(PathBuf::from(h).join("bin"));
        }
        names.iter().flat_map(|n| dirs.iter().map(move |d| d.join(n))).find(|p| p.is_file())
    };
    match peer {
        Peer::Bare => std::env::current_exe().map_err(|e| e.to_string()),
        Peer::FleetBroker => Ok(fleet_tests::workspace_bin_dir(&["fleet-broker"]).join("fleet-broker")),
        Peer::Mosquitto => Mosquitto::program(),
        Peer::Rumqttd => std::env::var_os("RUMQTTD").map(PathBuf::from).or_else(|| found(&["rumqttd"])).ok_or_else(
            || {
                "not installed (cargo install rumqttd --version 0.20.0 --features verify-client-cert --locked; \
             scripts/bench does it)"
                    .into()
            },
        ),
    }
}

fn wait_listening(addr: SocketAddr) -> bool {
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(20) {
        if std::net::TcpStream::connect(addr).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// Reads the first `127.0.0.1:PORT` a child prints on stdout.
fn announced_addr(child: &mut Child) -> Option<SocketAddr> {
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take()?).read_line(&mut line).ok()?;
    line.split_whitespace().find(|w| w.starts_with("127.0.0.1:")).and_then(|a| a.parse().ok())
}

/// Starts `peer` with the fleet's device CA, the server certificate in HOME/broker-tls and (where
/// the peer supports it) HOME/crl.pem. `work` holds generated configuration files.
pub(crate) fn start(peer: Peer, home: &Path, work: &Path) -> Result<Server, String> {
    start_on(peer, home, work, 0)
}

/// As [`start`], on a given port (0: any; mosquitto and rumqttd get a free one).
pub(crate) fn start_on(peer: Peer, home: &Path, work: &Path, port: u16) -> Result<Server, String> {
    let (child, addr) = match peer {
        Peer::FleetBroker => return start_fleet_broker_on(home, port, &[]),
        Peer::Mosquitto => {
            let mosquitto = Mosquitto::builder(home)
                .port(port)
                .crl()
                .line("log_type none")
                .line("max_queued_messages 10000")
                // The in-flight window fleet-broker keeps per subscriber (64), not Mosquitto's
                // default 20: a consumer's throughput is then the servers', not their windows'.
                .line("max_inflight_messages 64")
                .start(work)?;
            (mosquitto.process, mosquitto.addr)
        }
        Peer::Bare => {
            let bin = program(peer)?;
            let mut child = Command::new(&bin)
                .arg("--serve-bare")
                .arg(home)
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .map_err(|e| format!("{}: {e}", bin.display()))?;
            let addr = announced_addr(&mut child).ok_or("no listen address announced")?;
            (Process::new(child), addr)
        }
        Peer::Rumqttd => {
            let bin = program(peer)?;
            let port = if port == 0 { fleet_tests::fixture::free_port() } else { port };
            let conf = work.join("rumqttd.toml");
            std::fs::write(
                &conf,
                format!(
                    "id = 0\n\n[router]\nmax_connections = 100010\nmax_outgoing_packet_count = 200\n\
                     max_segment_size = 104857600\nmax_segment_count = 10\n\n\
                     [v4.1]\nname = \"v4-1\"\nlisten = \"127.0.0.1:{port}\"\nnext_connection_delay_ms = 0\n\
                     [v4.1.tls]\ncapath = \"{}\"\ncertpath = \"{}\"\nkeypath = \"{}\"\n\
                     [v4.1.connections]\nconnection_timeout_ms = 60000\nmax_payload_size = 20480\n\
                     max_inflight_count = 100\ndynamic_filters = true\n",
                    home.join("device-ca.pem").display(),
                    home.join("broker-tls/cert.pem").display(),
                    home.join("broker-tls/key.pem").display(),
                ),
            )
            .map_err(|e| e.to_string())?;
            (Process::new(spawn_with_config(&bin, &conf)?), SocketAddr::from(([127, 0, 0, 1], port)))
        }
    };
    serve(peer.name(), child, addr)
}

/// The server `child` once it listens on `addr`, and has had time for its start-up work (CRL
/// parsing, registry open) before anything is measured.
pub(crate) fn serve(name: &str, child: Process, addr: SocketAddr) -> Result<Server, String> {
    let server = Server { addr, child };
    if !wait_listening(addr) {
        return Err(format!("{name} did not start listening on {addr}"));
    }
    std::thread::sleep(Duration::from_millis(300));
    Ok(server)
}

/// Starts fleet-broker on `home` with `extra` flags (a cluster node: `--nats`, `--database-url`).
pub(crate) fn start_fleet_broker(home: &Path, extra: &[&str]) -> Result<Server, String> {
    start_fleet_broker_on(home, 0, extra)
}

pub(crate) fn start_fleet_broker_on(home: &Path, port: u16, extra: &[&str]) -> Result<Server, String> {
    start_broker_program(&program(Peer::FleetBroker)?, home, port, extra)
}

/// As [`start_fleet_broker_on`], running the fleet-broker binary `bin` (`--before-broker`).
pub(crate) fn start_broker_program(
    bin: &Path,
    home: &Path,
    port: u16,
    extra: &[&str],
) -> Result<Server, String> {
    let broker = fleet_broker(home)?.program(bin).port(port).args(extra).spawn()?;
    serve(Peer::FleetBroker.name(), broker.child, broker.mqtt)
}

/// fleet-broker as the bench runs it on `home`: no metrics listener, room for 100,000
/// connections, warnings only, kept (appended) in the file `BENCH_BROKER_LOG` names for a look
/// afterwards.
pub(crate) fn fleet_broker(home: &Path) -> Result<BrokerCommand, String> {
    program(Peer::FleetBroker)?;
    let log = match std::env::var_os("BENCH_BROKER_LOG") {
        Some(f) => BrokerLog::Append(PathBuf::from(f)),
        None => BrokerLog::Discard,
    };
    Ok(BrokerCommand::new(home)
        .metrics_off()
        .args(&["--max-connections", "100000"])
        .rust_log("warn")
        .log(log))
}

/// The bare rustls server (`--serve-bare HOME`, run as a child process of the bench so it has
/// its own runtime like every other server): the broker's own TLS configuration, no MQTT.
pub(crate) fn serve_bare(home: &Path) {
    use tokio::io::AsyncWriteExt;
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    rt.block_on(async {
        let config = fleet_broker::Config {
            home: home.to_path_buf(),
            crl: Some(fleet_registry::Home::new(home).crl()),
            ..Default::default()
        };
        let acceptor = tokio_rustls::TlsAcceptor::from(fleet_broker::tls_config(&config).expect("tls"));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        println!("bare rustls on {}", listener.local_addr().expect("addr"));
        loop {
            let Ok((sock, _)) = listener.accept().await else { continue };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let _ = sock.set_nodelay(true);
                if let Ok(mut tls) = acceptor.accept(sock).await {
                    let _ = tls.write_all(&[1]).await;
                    let _ = tls.flush().await;
                    let mut b = [0u8; 64];
                    let _ = tokio::io::AsyncReadExt::read(&mut tls, &mut b).await;
                }
            });
        }
    });
}
