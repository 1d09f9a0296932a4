//! Side-by-side broker benchmarks on loopback, in one run, every server started by this tool
//! with equivalent mutual-TLS settings: fleet-broker, Mosquitto (`require_certificate`,
//! `use_identity_as_username`, `crlfile`), rumqttd (`verify-client-cert`; it has no CRL support)
//! and a bare rustls server with the broker's own TLS configuration (the ceiling); optionally a
//! second fleet-broker binary (`--before-broker`), to compare a change with its parent in one run.
//!
//!     scripts/bench [SCENARIO...] [OPTIONS]          (scripts/bench --help lists both)
//!     cargo bench -p fleet-tests --bench peers -- [same arguments]   (after building the release fleet-broker)
//!
//! This file parses the arguments ([`Cli`], resolved into [`Args`]) and dispatches to one module
//! per scenario; it also holds what the scenarios share: the fleet ([`Env`]), the servers they
//! measure ([`Subject`]) and the report. Clients run in this process on the same cores as the
//! server under test, so every figure is a lower bound, comparable only with the other figures
//! of the same run.

mod admissions;
mod client;
mod cluster;
mod commands;
mod ingest;
mod memory;
mod ota;
mod revoke;
mod rotation;
mod servers;
mod shared;
mod soak;
mod storm;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use clap::error::ErrorKind;
use clap::{CommandFactory, Parser, ValueEnum};
use client::Identity;
use fleet_provision::home::Home;
use fleet_provision::pki::{self, LoadedCa};
use fleet_provision::station::Station;
use fleet_provision::{RevocationReason, SerialNumber};
use fleet_registry::RevokedEntry;
use fleet_tests::fixture::Fleet;
use servers::{Peer, Server};

// What the scenario modules share, under the names they import from the crate root.
pub(crate) use admissions::admissions_per_sec;
pub(crate) use ingest::{ingest_rate, stored_rows};
pub(crate) use revoke::{open_sessions, revoke_each, RevokeTimes};

/// Side-by-side broker benchmarks on loopback: fleet-broker against Mosquitto, rumqttd and a bare
/// rustls server, every server started by this tool with the same PKI (one fleet-provision home).
///
/// Clients run in this process on the same cores as the server under test: every figure is a
/// lower bound, comparable only with the other figures of the same run. Each scenario prints its
/// rows as it goes and all of them again at the end, as table rows for BENCHMARKS.md.
#[derive(Debug, Parser)]
#[command(
    name = "scripts/bench",
    bin_name = "scripts/bench",
    after_help = "Examples:
  scripts/bench                                   # admissions, revoke, ingest, memory, storm, cluster
  scripts/bench admissions --secs 10 --peers fleet-broker,mosquitto
  scripts/bench admissions ingest --crl-sizes 0 --before-broker ../before/target/release/fleet-broker
  scripts/bench memory --sessions 10000
  scripts/bench storm --devices 20000
  scripts/bench soak --minutes 60
  scripts/bench rotation
  scripts/bench commands
  scripts/bench shared --mqtt 5 --peers fleet-broker,mosquitto"
)]
struct Cli {
    /// Scenarios to run, in the order given [default: admissions revoke ingest memory storm
    /// cluster; soak, rotation, commands and shared run only when named].
    #[arg(value_enum, value_name = "SCENARIO")]
    scenarios: Vec<Scenario>,
    /// Seconds each measurement runs: admissions per server and CRL size, ingest per server and
    /// QoS, the cluster's phases.
    #[arg(long, value_name = "S", default_value_t = 5.0, value_parser = positive_secs)]
    secs: f64,
    /// Concurrent clients connecting in the admissions scenario.
    #[arg(long, value_name = "C", default_value_t = 16, value_parser = at_least_one)]
    conc: usize,
    /// Idle sessions each server holds in the memory scenario.
    #[arg(long, value_name = "N", default_value_t = 10_000, value_parser = at_least_one)]
    sessions: usize,
    /// Devices of the storm [default: 20000, capped by the open-file limit]; of the rotation
    /// [default: 1000, at most 2000] and of commands [default: 10000] when given.
    #[arg(long, value_name = "N", value_parser = at_least_one)]
    devices: Option<usize>,
    /// Length of the soak, in minutes.
    #[arg(long, value_name = "M", default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..))]
    minutes: u64,
    /// Revoked serials in the CRL for each admissions round (a synthetic CRL signed by the
    /// device CA; 0: the station's real, empty CRL). Underscores allowed: 1_000_000.
    #[arg(
        long,
        value_name = "N,..",
        value_delimiter = ',',
        value_parser = crl_size,
        default_value = "0,100000,1000000"
    )]
    crl_sizes: Vec<usize>,
    /// Servers to measure. Storm, cluster and commands measure only fleet-broker and mosquitto;
    /// fleet-broker-before (needs --before-broker) is measured by admissions, revoke, ingest,
    /// commands and memory.
    #[arg(
        long,
        value_enum,
        value_name = "PEER,..",
        value_delimiter = ',',
        default_value = "bare,fleet-broker,mosquitto,rumqttd"
    )]
    peers: Vec<PeerArg>,
    /// Another fleet-broker binary (e.g. the release build of the commit before a change),
    /// measured as the peer fleet-broker-before beside fleet-broker in the same run, started the
    /// same way. Adds that peer to --peers.
    #[arg(long, value_name = "PATH", env = "BENCH_BEFORE_BROKER", value_parser = executable_file)]
    before_broker: Option<PathBuf>,
    /// The MQTT version every client speaks: 3 (3.1.1) or 5 (CONNECT, PUBLISH and the answers
    /// in MQTT 5 encoding, no properties). Compare two runs, one each.
    #[arg(long, value_name = "VERSION", default_value_t = 3, value_parser = clap::value_parser!(u8).range(3..=5))]
    mqtt: u8,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
    /// Internal: run the bare rustls server on this home (the bench starts itself with it).
    #[arg(long, hide = true, value_name = "HOME")]
    serve_bare: Option<PathBuf>,
}

/// A benchmark scenario.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Scenario {
    /// TCP + TLS 1.3 full handshake (P-256 client certificate, no resumption) + CONNECT/CONNACK +
    /// DISCONNECT per second, for each CRL size (--crl-sizes), with --conc clients
    Admissions,
    /// Revoke → disconnect latency over 100 revocations of connected devices
    Revoke,
    /// QoS 1 and QoS 0 PUBLISH throughput from 100 concurrently connected devices, --secs each
    Ingest,
    /// Resident memory per idle mTLS session with --sessions sessions
    Memory,
    /// --devices devices with the SDK's reconnect policy, the server stopped (SIGTERM, SIGKILL)
    /// and restarted: time until 50/99/100% are back, against the raw handshake ceiling
    Storm,
    /// Only when named (--minutes): 1,000 devices publishing and reconnecting at random; RSS,
    /// open fds and p99 PUBACK latency every minute, and the drift
    Soak,
    /// Three nodes on NATS JetStream + PostgreSQL: cross-node delivery latency, QoS 1 ingest
    /// through JetStream beside one node and Mosquitto, revoke → cut on three nodes
    Cluster,
    /// Only when named: --devices SDK devices rotating their certificates at once through
    /// `fleet-provision serve` (issuer CSRs/s, latency, time to a fleet on new certificates),
    /// beside an `openssl x509 -req` loop
    Rotation,
    /// Only when named: 3 consumers in a shared subscription on the devices' telemetry while the
    /// 100 devices publish QoS 1 for --secs (delivered msg/s, the split), beside Mosquitto's
    /// shared subscriptions
    Shared,
    /// Only when named: 3 commands queued for each of --devices offline devices, then the whole
    /// fleet reconnecting (queued/s, bytes per command, delivery rate, duplicates), beside
    /// Mosquitto with persistent sessions
    Commands,
    /// Only when named: a 256 KiB firmware campaign in waves to --devices simulated devices
    /// (time until all confirmed, broker CPU per MiB served)
    Ota,
    /// Only when named: one command from one service to every one of --devices (default
    /// 100,000) offline devices: the time until all are accepted (stored, PUBACKed)
    FleetWide,
}

impl Scenario {
    /// What runs when no scenario is named.
    const DEFAULT: [Scenario; 6] = [
        Scenario::Admissions,
        Scenario::Revoke,
        Scenario::Ingest,
        Scenario::Memory,
        Scenario::Storm,
        Scenario::Cluster,
    ];
}

/// A server named in `--peers`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum PeerArg {
    /// A bare rustls server with fleet-broker's TLS configuration, handshake only (the ceiling)
    #[value(alias = "rustls")]
    Bare,
    /// The release fleet-broker of this workspace
    #[value(alias = "fleet")]
    FleetBroker,
    /// The fleet-broker binary given by --before-broker
    FleetBrokerBefore,
    /// Mosquitto 2 (OpenSSL), with its CRL file
    Mosquitto,
    /// rumqttd 0.20 with verify-client-cert (no CRL support)
    Rumqttd,
}

fn positive_secs(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 => Ok(v),
        Ok(_) => Err("must be a positive number of seconds".into()),
        Err(e) => Err(e.to_string()),
    }
}

fn at_least_one(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(v) => Ok(v),
        Err(e) => Err(e.to_string()),
    }
}

fn crl_size(s: &str) -> Result<usize, String> {
    s.trim().replace('_', "").parse().map_err(|e| format!("{e}"))
}

fn executable_file(s: &str) -> Result<PathBuf, String> {
    let p = PathBuf::from(s);
    if p.is_file() {
        Ok(p)
    } else {
        Err("no such file (build it: cargo build --release -p fleet-broker --bin fleet-broker in that checkout)".into())
    }
}

/// The run's settings, resolved from [`Cli`]: what the scenario modules read.
struct Args {
    scenarios: Vec<Scenario>,
    secs: f64,
    conc: usize,
    sessions: usize,
    /// Devices of the storm (and of the rotation, when given).
    devices: usize,
    /// `--devices` was given.
    devices_set: bool,
    /// Length of the soak.
    minutes: u64,
    crl_sizes: Vec<usize>,
    /// Servers to measure (default: all).
    peers: Vec<Peer>,
    /// The second fleet-broker binary, when fleet-broker-before is measured.
    before_broker: Option<PathBuf>,
}

impl Args {
    fn wants(&self, p: Peer) -> bool {
        self.peers.contains(&p)
    }

    /// The wanted servers among `among`, in that order, with fleet-broker-before right after
    /// fleet-broker when it is measured.
    fn subjects(&self, among: &[Peer]) -> Vec<Subject> {
        let mut out = Vec::new();
        for &peer in among {
            if peer == Peer::FleetBroker {
                if self.wants(peer) {
                    out.push(Subject { peer, before: None });
                }
                if let Some(bin) = &self.before_broker {
                    out.push(Subject { peer, before: Some(bin.clone()) });
                }
            } else if self.wants(peer) {
                out.push(Subject { peer, before: None });
            }
        }
        out
    }
}

impl Cli {
    fn resolve(self) -> Result<Args, clap::Error> {
        let mut peers = Vec::new();
        let mut before_named = false;
        for p in &self.peers {
            let peer = match p {
                PeerArg::Bare => Peer::Bare,
                PeerArg::FleetBroker => Peer::FleetBroker,
                PeerArg::Mosquitto => Peer::Mosquitto,
                PeerArg::Rumqttd => Peer::Rumqttd,
                PeerArg::FleetBrokerBefore => {
                    before_named = true;
                    continue;
                }
            };
            if !peers.contains(&peer) {
                peers.push(peer);
            }
        }
        if before_named && self.before_broker.is_none() {
            return Err(Cli::command().error(
                ErrorKind::MissingRequiredArgument,
                "--peers fleet-broker-before needs --before-broker PATH (or BENCH_BEFORE_BROKER)",
            ));
        }
        Ok(Args {
            scenarios: if self.scenarios.is_empty() { Scenario::DEFAULT.to_vec() } else { self.scenarios },
            secs: self.secs,
            conc: self.conc,
            sessions: self.sessions,
            devices: self.devices.unwrap_or(20_000),
            devices_set: self.devices.is_some(),
            minutes: self.minutes,
            crl_sizes: self.crl_sizes,
            peers,
            before_broker: self.before_broker,
        })
    }
}

/// A server the admissions, revoke, ingest and memory scenarios measure: a peer, or (`before`)
/// the fleet-broker binary of `--before-broker`, started as the fleet-broker peer is.
#[derive(Debug, Clone)]
struct Subject {
    peer: Peer,
    before: Option<PathBuf>,
}

impl Subject {
    fn name(&self) -> &'static str {
        if self.before.is_some() {
            "fleet-broker-before"
        } else {
            self.peer.name()
        }
    }

    /// This is `peer` itself (not the before binary).
    fn is(&self, peer: Peer) -> bool {
        self.before.is_none() && self.peer == peer
    }
}

/// The fleet the benchmarks run against: one home, identities minted by the station.
/// The fleet a scenario measures with (the library's fixture, minted in batches) and its
/// station.
struct Env {
    fleet: Fleet,
    home: PathBuf,
    station: Station,
}

impl Env {
    async fn new() -> Env {
        Self::with_db(None).await
    }

    /// A fleet whose registry is at `db` (default: SQLite in the home).
    async fn with_db(db: Option<&str>) -> Env {
        let fleet = Fleet::new(0, db.map(str::to_owned)).await;
        let (home, station) = (fleet.home(), fleet.station().await);
        Env { fleet, home, station }
    }

    async fn mint(&self, prefix: &str, count: usize) -> Vec<Arc<Identity>> {
        let dirs = self.fleet.mint(prefix, count).await;
        dirs.iter().map(|d| Arc::new(Identity::load(d))).collect()
    }

    /// A backend service identity.
    async fn service(&self, name: &str) -> Identity {
        Identity::load(&self.fleet.service_identity(name).await)
    }

    /// The directory everything of this fleet lives in.
    fn dir(&self) -> &Path {
        self.fleet.dir.path()
    }

    fn start(&self, peer: Peer) -> Option<Server> {
        Self::started(peer.name(), servers::start(peer, &self.home, self.dir()))
    }

    /// Starts a subject: its peer, or the before binary with the fleet-broker peer's flags.
    fn start_subject(&self, s: &Subject) -> Option<Server> {
        match &s.before {
            None => self.start(s.peer),
            Some(bin) => Self::started(s.name(), servers::start_broker_program(bin, &self.home, 0, &[])),
        }
    }

    fn started(name: &str, r: Result<Server, String>) -> Option<Server> {
        match r {
            Ok(s) => Some(s),
            Err(e) => {
                println!("  {name:<30} skipped: {e}");
                None
            }
        }
    }

    /// Replaces HOME/crl.pem by a CRL signed by the device CA listing `n` random serials.
    fn write_synthetic_crl(&self, n: usize) {
        let home = Home::new(&self.home);
        let read =
            |p: PathBuf| std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        let ca = LoadedCa::from_pem(&read(home.device_ca()), &read(home.device_ca_key())).expect("device CA");
        let now = time::OffsetDateTime::now_utc();
        let entries: Vec<RevokedEntry> = (0..n)
            .map(|_| RevokedEntry {
                serial: SerialNumber::random(),
                revoked_at: now.unix_timestamp() - 3600,
                reason: RevocationReason::KeyCompromise,
            })
            .collect();
        let crl =
            pki::sign_crl(&ca, 1_000_000 + n as u64, &entries, now, time::Duration::days(7)).expect("crl");
        fleet_provision::home::write_replace(&home.crl(), crl.pem().expect("pem").as_bytes())
            .expect("write crl");
    }
}

/// Results, printed again at the end as the table rows for BENCHMARKS.md.
#[derive(Default)]
struct Report {
    rows: BTreeMap<String, Vec<String>>,
}

impl Report {
    fn add(&mut self, section: &str, row: String) {
        println!("  {row}");
        self.rows.entry(section.to_owned()).or_default().push(row);
    }

    fn print_summary(&self) {
        println!("\n== summary (rows for BENCHMARKS.md)");
        for (section, rows) in &self.rows {
            println!("[{section}]");
            for r in rows {
                println!("{r}");
            }
        }
    }
}

fn mean_rate(done: u64, secs: f64) -> f64 {
    done as f64 / secs
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn fd_limit() -> u64 {
    servers::proc_field("/proc/self/limits", "Max open files", 3).unwrap_or(1024)
}

fn main() {
    let cli = Cli::parse();
    if cli.mqtt == 4 {
        Cli::command().error(ErrorKind::InvalidValue, "--mqtt is 3 (3.1.1) or 5").exit();
    }
    client::use_mqtt5(cli.mqtt == 5);
    if let Some(home) = &cli.serve_bare {
        servers::serve_bare(Path::new(home));
        return;
    }
    let args = cli.resolve().unwrap_or_else(|e| e.exit());
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    rt.block_on(async {
        let env = Env::new().await;
        let devices = env.mint("dev", 100).await;
        let mut report = Report::default();
        for peer in [Peer::Mosquitto, Peer::Rumqttd] {
            if let Err(e) = servers::program(peer) {
                println!("note: {}: {e}", peer.name());
            }
        }
        for s in &args.scenarios {
            match s {
                Scenario::Admissions => {
                    admissions::scenario_admissions(&env, &devices, &args, &mut report).await
                }
                Scenario::Revoke => revoke::scenario_revoke(&env, &args, &mut report).await,
                Scenario::Ingest => ingest::scenario_ingest(&env, &devices, &args, &mut report).await,
                Scenario::Memory => memory::scenario_memory(&env, &args, &mut report).await,
                Scenario::Storm => storm::scenario_storm(&env, &args, &mut report).await,
                Scenario::Soak => soak::scenario_soak(&env, &args, &mut report).await,
                Scenario::Cluster => cluster::scenario_cluster(&env, &devices, &args, &mut report).await,
                Scenario::Rotation => rotation::scenario_rotation(&args, &mut report).await,
                Scenario::Commands => commands::scenario_commands(&env, &args, &mut report).await,
                Scenario::Ota => ota::scenario_ota(&args, &mut report).await,
                Scenario::FleetWide => commands::scenario_fleet_wide(&env, &args, &mut report).await,
                Scenario::Shared => shared::scenario_shared(&env, &devices, &args, &mut report).await,
            }
        }
        report.print_summary();
    });
}
