//! `fleet-sim`: simulated devices and a service client for trying fleetgate on one machine.
//!
//! `run` starts one simulated device per `credentials.bin` found under `--devices`: each trusts
//! only the server CA pinned in its bundle, presents its own certificate, publishes telemetry at
//! `--rate`, subscribes to its commands and acknowledges each command on `devices/<id>/acks/...`.
//! A device whose connection is refused or cut keeps retrying with jittered exponential back-off
//! and reports what happened. Each device keeps its identity in two credential slots
//! (`slots.bin`) and rotates its key and certificate over MQTT when the certificate nears its
//! end or an operator asks (`fleet-provision serve` answers). `claim` boots new devices from a
//! batch claim. `watch` and `command` act as the backend service.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use fleet_device::rotation::RotationConfig;
use fleet_device::topic;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS, TlsConfiguration, Transport};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// Simulated fleetgate devices and a backend-service client.
#[derive(Debug, Parser)]
#[command(name = "fleet-sim", version)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run one simulated device per DIR/*/credentials.bin.
    Run {
        /// Directory of minted devices (as written by `fleet-provision mint --out`).
        #[arg(long)]
        devices: PathBuf,
        /// Override the broker port written in the bundles.
        #[arg(long)]
        port: Option<u16>,
        /// Telemetry messages per second per device.
        #[arg(long, default_value_t = 1.0)]
        rate: f64,
        /// Stop after this many seconds.
        #[arg(long, default_value_t = 10.0)]
        duration: f64,
        /// Rotate key and certificate (CSR to the issuer, `fleet-provision serve`) when the
        /// certificate expires within this long, e.g. 30d; an operator's `rotate` also starts one.
        #[arg(long, default_value = "30d", value_parser = parse_secs)]
        rotate_within: i64,
        /// Ask the issuer again after this many ms without an answer (doubling up to an hour).
        #[arg(long, default_value_t = 10_000)]
        answer_timeout_ms: u64,
        /// Testing: cut the power this many bytes into writing a newly issued identity to the
        /// spare credential slot (the device stops; run again to see it boot).
        #[arg(long, hide = true)]
        power_loss_at_stage: Option<usize>,
        /// Stop each device once it runs on a rotated certificate (the run ends when all have,
        /// or at --duration).
        #[arg(long)]
        exit_when_rotated: bool,
        /// Stop each device once it confirmed a firmware update and its report was acknowledged
        /// (the run ends when all have, or at --duration).
        #[arg(long)]
        exit_when_updated: bool,
        /// Take firmware updates (docs/spec/ota.md) signed with this key (the station's
        /// `firmware.pub`, 32 bytes): offers are downloaded into flash in memory, verified and
        /// confirmed after a simulated A/B swap, with every status reported.
        #[arg(long)]
        ota_key: Option<PathBuf>,
        /// The board the simulated devices are (releases for it only).
        #[arg(long, default_value = "fleet-sim")]
        board: String,
        /// The firmware version they run at the start.
        #[arg(long, default_value = "1.0.0")]
        firmware_version: String,
        /// Bytes of their update partition.
        #[arg(long, default_value_t = 1024 * 1024)]
        ota_capacity: u32,
    },
    /// Claim-based first boot of COUNT new devices: each generates its key, connects with the
    /// batch's claim credentials (`fleet-provision claim-cert`), gets its own identity from the
    /// issuer (`fleet-provision serve`), stores it in OUT/<device-id>/ and connects as itself.
    Claim {
        /// Claim identity directory (its credentials.bin).
        #[arg(long)]
        claim: PathBuf,
        /// How many devices boot.
        #[arg(long, default_value_t = 1)]
        count: usize,
        /// Device ids are <prefix>-<12 random hex digits>; default: the claim's prefix, from
        /// CLAIM/id-prefix (written by `fleet-provision claim-cert`).
        #[arg(long)]
        prefix: Option<String>,
        /// Where each device's identity is written (OUT/<device-id>/slots.bin, credentials.bin).
        #[arg(long)]
        out: PathBuf,
        /// Override the broker port written in the claim bundle.
        #[arg(long)]
        port: Option<u16>,
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 30.0)]
        duration: f64,
        /// Ask the issuer again after this many ms without an answer.
        #[arg(long, default_value_t = 5_000)]
        answer_timeout_ms: u64,
    },
    /// Subscribe as a service identity and print what arrives.
    Watch {
        /// Service identity directory (cert.pem, key.pem, broker-trust.pem).
        #[arg(long)]
        identity: PathBuf,
        /// Broker host.
        #[arg(long, default_value = "localhost")]
        host: String,
        /// Broker port.
        #[arg(long, default_value_t = 8883)]
        port: u16,
        /// Topic filter.
        #[arg(long, default_value = topic::filter::ALL_TELEMETRY)]
        filter: String,
        /// Stop after this many seconds.
        #[arg(long, default_value_t = 10.0)]
        duration: f64,
    },
    /// Publish one command to a device as a service identity.
    Command {
        /// Service identity directory.
        #[arg(long)]
        identity: PathBuf,
        /// Broker host.
        #[arg(long, default_value = "localhost")]
        host: String,
        /// Broker port.
        #[arg(long, default_value_t = 8883)]
        port: u16,
        /// Target device id.
        #[arg(long)]
        device: String,
        /// Command name (topic devices/<id>/commands/<name>).
        #[arg(long)]
        name: String,
        /// Payload.
        #[arg(long, default_value = "")]
        payload: String,
        /// Payload from a file, byte for byte (e.g. `--name ota/offer --payload-file
        /// manifest.bin`).
        #[arg(long, conflicts_with = "payload")]
        payload_file: Option<PathBuf>,
    },
    /// TEST STAND-IN until the broker serves firmware chunks itself (issue 30, branch
    /// ota-broker): as a service identity on a broker without OTA ACLs (Mosquitto with the
    /// fleet's PKI), answer every `devices/<id>/ota/get` for one release the way
    /// docs/spec/ota.md says, and print each `ota/status` report. Offers are sent with
    /// `command --name ota/offer --payload-file manifest.bin`.
    OtaStandin {
        /// Service identity directory.
        #[arg(long)]
        identity: PathBuf,
        /// Broker host.
        #[arg(long, default_value = "localhost")]
        host: String,
        /// Broker port.
        #[arg(long, default_value_t = 8883)]
        port: u16,
        /// The release directory (`fleet-provision release --out`: image.bin, manifest.bin).
        #[arg(long)]
        release: PathBuf,
        /// Largest chunk answered (the broker's `ota_max_chunk`).
        #[arg(long, default_value_t = 1024)]
        max_chunk: usize,
        /// Stop after this many seconds.
        #[arg(long, default_value_t = 600.0)]
        duration: f64,
    },
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn tls(
    roots: Vec<CertificateDer<'static>>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> anyhow::Result<Transport> {
    let mut store = rustls::RootCertStore::empty();
    for r in roots {
        store.add(r)?;
    }
    let cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(store)
        .with_client_auth_cert(chain, key)?;
    Ok(Transport::tls_with_config(TlsConfiguration::Rustls(Arc::new(cfg))))
}

fn service_options(dir: &Path, host: &str, port: u16) -> anyhow::Result<MqttOptions> {
    service_options_as(dir, host, port, "")
}

/// [`service_options`] with `suffix` after the client id (fleet-broker binds the client id to
/// the certificate and refuses that; a peer broker without that rule takes it, and two clients
/// of one identity then do not take each other's session over).
fn service_options_as(dir: &Path, host: &str, port: u16, suffix: &str) -> anyhow::Result<MqttOptions> {
    let read = |f: &str| dir.join(f);
    let roots = CertificateDer::pem_file_iter(read("broker-trust.pem"))
        .with_context(|| format!("{}", read("broker-trust.pem").display()))?
        .collect::<Result<Vec<_>, _>>()?;
    let chain = CertificateDer::pem_file_iter(read("cert.pem"))?.collect::<Result<Vec<_>, _>>()?;
    let key = PrivateKeyDer::from_pem_file(read("key.pem"))
        .with_context(|| format!("{}", read("key.pem").display()))?;
    // The broker binds the client id to the certificate: use the id in its SAN URI.
    let id = service_id(&chain[0]).context("service certificate carries no urn:fleetgate:service: URI")?;
    let mut o = MqttOptions::new(format!("{id}{suffix}"), host, port);
    o.set_clean_session(true);
    o.set_keep_alive(Duration::from_secs(30));
    o.set_transport(tls(roots, chain, key)?);
    Ok(o)
}

/// The id in a certificate's `urn:fleetgate:service:<id>` SAN URI, read by the X.509 parser.
fn service_id(der: &[u8]) -> Option<String> {
    use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
    const PREFIX: &str = topic::uri::SERVICE;
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|n| match n {
        GeneralName::URI(uri) => uri.strip_prefix(PREFIX).filter(|id| !id.is_empty()).map(str::to_owned),
        _ => None,
    })
}

mod claim;
mod device;
mod ota;
mod slots;

#[derive(Debug, Default, Clone)]
struct Stats {
    /// QoS 1 messages queued: telemetry, command acknowledgements and `certs/active`.
    sent: u64,
    /// Those of them the broker acknowledged (stored).
    acked: u64,
    commands: u64,
    connects: u64,
    refusals: u64,
    csrs: u64,
    rotations: u64,
    serial: String,
    last_error: Option<String>,
    connected: bool,
    /// The firmware version it runs (with `--ota-key`).
    firmware: String,
    /// The last update state it reported (`downloading`, `verified`, `confirmed`, ...).
    ota: String,
    /// Updates it confirmed.
    updates: u64,
}

type StatsMap = BTreeMap<String, Stats>;

fn parse_secs(s: &str) -> Result<i64, String> {
    let s = s.trim();
    let (digits, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: i64 = digits.parse().map_err(|_| format!("{s:?}: expected e.g. 30d, 12h, 90s"))?;
    let unit = match unit {
        "d" | "" => 86_400,
        "h" => 3_600,
        "m" => 60,
        "s" => 1,
        _ => return Err(format!("{s:?}: the unit is d, h, m or s")),
    };
    n.checked_mul(unit).ok_or_else(|| format!("{s:?}: too long"))
}

async fn run(devices: PathBuf, opts: device::DeviceOpts) -> anyhow::Result<()> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&devices)
        .with_context(|| format!("{}", devices.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| device::check_dir(p).is_ok())
        .collect();
    dirs.sort();
    if dirs.is_empty() {
        bail!("no */credentials.bin under {}", devices.display());
    }
    let stats = Arc::new(Mutex::new(StatsMap::new()));
    let duration = opts.until.saturating_duration_since(Instant::now()).as_secs_f64();
    println!("fleet-sim: {} devices, {} msg/s each, {duration:.0} s", dirs.len(), opts.rate);
    let threads: Vec<_> = dirs
        .into_iter()
        .map(|dir| {
            let (stats, opts) = (stats.clone(), opts.clone());
            std::thread::spawn(move || device::run_device(&dir, &opts, &stats))
        })
        .collect();
    for t in threads {
        t.join().map_err(|_| anyhow::anyhow!("device thread panicked"))??;
    }
    let m = stats.lock().unwrap_or_else(|p| p.into_inner()).clone();
    println!(
        "{:<20} {:>6} {:>6} {:>9} {:>9} {:>8}  {:<32}  state",
        "DEVICE", "SENT", "ACKED", "COMMANDS", "REFUSALS", "ROTATED", "CERTIFICATE SERIAL"
    );
    for (id, s) in &m {
        let state = if s.connected {
            "connected".to_owned()
        } else {
            format!("cut off ({})", s.last_error.as_deref().unwrap_or("never connected"))
        };
        println!(
            "{id:<20} {:>6} {:>6} {:>9} {:>9} {:>8}  {:<32}  {state}",
            s.sent, s.acked, s.commands, s.refusals, s.rotations, s.serial
        );
    }
    let total_acked: u64 = m.values().map(|s| s.acked).sum();
    let rotations: u64 = m.values().map(|s| s.rotations).sum();
    println!("fleet-sim: {total_acked} messages acknowledged (stored) by the broker");
    println!("fleet-sim: {rotations} certificate rotations");
    if m.values().any(|s| !s.firmware.is_empty()) {
        let updates: u64 = m.values().map(|s| s.updates).sum();
        let mut versions = BTreeMap::<&str, usize>::new();
        for s in m.values() {
            *versions.entry(s.firmware.as_str()).or_default() += 1;
        }
        let on: Vec<String> = versions.iter().map(|(v, n)| format!("{n} on {v}")).collect();
        println!("fleet-sim: {updates} firmware updates confirmed; {}", on.join(", "));
    }
    Ok(())
}

/// The update options of `run`: the key file, board and version checked.
fn ota_opts(key: &Path, board: &str, version: &str, capacity: u32) -> anyhow::Result<ota::OtaOpts> {
    let bytes = std::fs::read(key).with_context(|| format!("{}", key.display()))?;
    let public_key: [u8; 32] = bytes
        .as_slice()
        .try_into()
        .map_err(|_| anyhow::anyhow!("{}: a firmware key is 32 raw bytes (firmware.pub)", key.display()))?;
    Ok(ota::OtaOpts {
        public_key,
        board: fleet_device::release::Board::parse(board).map_err(|e| anyhow::anyhow!("--board: {e}"))?,
        version: fleet_device::release::Version::parse(version)
            .map_err(|e| anyhow::anyhow!("--firmware-version: {e}"))?,
        capacity,
    })
}

async fn watch(
    identity: PathBuf,
    host: String,
    port: u16,
    filter: String,
    duration: f64,
) -> anyhow::Result<()> {
    let (client, mut ev) = AsyncClient::new(service_options(&identity, &host, port)?, 64);
    let until = tokio::time::Instant::now() + Duration::from_secs_f64(duration);
    loop {
        let e = tokio::select! {
            _ = tokio::time::sleep_until(until) => return Ok(()),
            e = ev.poll() => e,
        };
        match e {
            Ok(Event::Incoming(Packet::ConnAck(_))) => client.subscribe(&filter, QoS::AtLeastOnce).await?,
            // Said once the broker granted it: from here on nothing published is missed.
            Ok(Event::Incoming(Packet::SubAck(_))) => println!("watching {filter}"),
            Ok(Event::Incoming(Packet::Publish(p))) => {
                // Text as text; binary (postcard telemetry from SDK devices) as hex.
                match std::str::from_utf8(&p.payload) {
                    Ok(t) if t.chars().all(|c| !c.is_control()) => println!("{} {t}", p.topic),
                    _ => {
                        let hex: String = p.payload.iter().map(|b| format!("{b:02x}")).collect();
                        println!("{} 0x{hex} (binary, {} bytes)", p.topic, p.payload.len());
                    }
                }
            }
            Ok(_) => {}
            Err(e) => bail!("service connection failed: {e}"),
        }
    }
}

/// The chunk answer of docs/spec/ota.md for `request` (14 bytes: tag, offset, length).
fn chunk_answer(tag: &[u8], image: &[u8], request: &[u8], max_chunk: usize) -> Option<Vec<u8>> {
    if request.len() != fleet_device::ota::REQUEST_LEN {
        return None;
    }
    let offset = u32::from_le_bytes(request[8..12].try_into().ok()?) as usize;
    let len = usize::from(u16::from_le_bytes(request[12..14].try_into().ok()?));
    let mut out = request[..12].to_vec();
    if &request[..8] != tag {
        out.push(1); // not offered
    } else if offset >= image.len() {
        out.push(2); // beyond the image
    } else {
        out.push(0);
        let end = image.len().min(offset + len.clamp(1, max_chunk));
        out.extend_from_slice(&image[offset..end]);
    }
    Some(out)
}

async fn ota_standin(
    identity: PathBuf,
    host: String,
    port: u16,
    release: PathBuf,
    max_chunk: usize,
    duration: f64,
) -> anyhow::Result<()> {
    let image = std::fs::read(release.join("image.bin")).with_context(|| format!("{}", release.display()))?;
    let manifest = std::fs::read(release.join("manifest.bin"))?;
    let m = fleet_device::release::Manifest::decode(&manifest)
        .map_err(|e| anyhow::anyhow!("manifest.bin: {e}"))?;
    let tag = fleet_device::ota::tag(&m);
    // Its own client id: the offers are sent as the same service identity.
    let (client, mut ev) = AsyncClient::new(service_options_as(&identity, &host, port, "-ota-standin")?, 256);
    let until = tokio::time::Instant::now() + Duration::from_secs_f64(duration);
    let (get, status) = ("devices/+/ota/get", "devices/+/ota/status");
    loop {
        let e = tokio::select! {
            _ = tokio::time::sleep_until(until) => return Ok(()),
            e = ev.poll() => e,
        };
        match e {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                client.subscribe(get, QoS::AtMostOnce).await?;
                client.subscribe(status, QoS::AtLeastOnce).await?;
            }
            Ok(Event::Incoming(Packet::SubAck(_))) => println!("ota-standin: serving {} bytes", image.len()),
            Ok(Event::Incoming(Packet::Publish(p))) => {
                let Some(device) = topic::device_level(&p.topic).map(str::to_owned) else { continue };
                if p.topic.ends_with("/ota/get") {
                    if let Some(answer) = chunk_answer(&tag, &image, &p.payload, max_chunk) {
                        let t = format!("devices/{device}/ota/chunk");
                        client.publish(t, QoS::AtMostOnce, false, answer).await?;
                    }
                } else {
                    println!("ota-status {device} {}", String::from_utf8_lossy(&p.payload));
                }
            }
            Ok(_) => {}
            Err(e) => bail!("service connection failed: {e}"),
        }
    }
}

async fn command(
    identity: PathBuf,
    host: String,
    port: u16,
    device: String,
    name: String,
    payload: Vec<u8>,
) -> anyhow::Result<()> {
    let (client, mut ev) = AsyncClient::new(service_options(&identity, &host, port)?, 8);
    let topic = topic::command(&device, &name).to_string();
    loop {
        match tokio::time::timeout(Duration::from_secs(10), ev.poll())
            .await
            .context("broker did not answer")?
        {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                client.publish(&topic, QoS::AtLeastOnce, false, payload.clone()).await?
            }
            Ok(Event::Incoming(Packet::PubAck(_))) => {
                println!("command sent: {topic}");
                return Ok(());
            }
            Ok(_) => {}
            Err(e) => bail!("service connection failed: {e}"),
        }
    }
}

/// An error and its causes on one line, each said once (as `fleet_registry::report`): a cause
/// whose text the line already holds is left out.
pub(crate) fn report(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !text.is_empty() && !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let r = match cli.command {
        Cmd::Run {
            devices,
            port,
            rate,
            duration,
            rotate_within,
            answer_timeout_ms,
            power_loss_at_stage,
            exit_when_rotated,
            exit_when_updated,
            ota_key,
            board,
            firmware_version,
            ota_capacity,
        } => {
            let start = Instant::now();
            let ota = match ota_key {
                None => None,
                Some(path) => match ota_opts(&path, &board, &firmware_version, ota_capacity) {
                    Ok(o) => Some(o),
                    Err(e) => {
                        eprintln!("fleet-sim: {e:#}");
                        return std::process::ExitCode::FAILURE;
                    }
                },
            };
            let opts = device::DeviceOpts {
                port,
                rate,
                until: start + Duration::from_secs_f64(duration),
                rotate_within,
                rotation: RotationConfig { answer_timeout_ms, ..RotationConfig::default() },
                power_loss_at_stage,
                exit_when_rotated,
                exit_when_updated,
                start,
                ota,
            };
            run(devices, opts).await
        }
        Cmd::Claim { claim, count, prefix, out, port, duration, answer_timeout_ms } => {
            let opts = claim::ClaimOpts {
                claim,
                count,
                prefix,
                out,
                port,
                until: Instant::now() + Duration::from_secs_f64(duration),
                rotation: RotationConfig { answer_timeout_ms, ..RotationConfig::default() },
            };
            tokio::task::spawn_blocking(move || claim::run(&opts))
                .await
                .map_err(anyhow::Error::from)
                .and_then(|r| r)
        }
        Cmd::Watch { identity, host, port, filter, duration } => {
            watch(identity, host, port, filter, duration).await
        }
        Cmd::OtaStandin { identity, host, port, release, max_chunk, duration } => {
            ota_standin(identity, host, port, release, max_chunk, duration).await
        }
        Cmd::Command { identity, host, port, device, name, payload, payload_file } => {
            let payload = match payload_file {
                Some(f) => std::fs::read(&f).with_context(|| format!("{}", f.display())),
                None => Ok(payload.into_bytes()),
            };
            match payload {
                Ok(p) => command(identity, host, port, device, name, p).await,
                Err(e) => Err(e),
            }
        }
    };
    match r {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", report(e.as_ref()));
            std::process::ExitCode::FAILURE
        }
    }
}
