//! `fleet-sim`: simulated devices and a service client for trying fleetgate on one machine.
//!
//! `run` starts one simulated device per `credentials.bin` found under `--devices`: each trusts
//! only the server CA pinned in its bundle, presents its own certificate, publishes telemetry at
//! `--rate`, subscribes to its commands and acknowledges each command on `devices/<id>/acks/...`.
//! A device whose connection is refused or cut keeps retrying with jittered exponential back-off
//! and reports what happened. `watch` and `command` act as the backend service.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use fleet_device::credentials::Credentials;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS, TlsConfiguration, Transport};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivateSec1KeyDer};

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
        #[arg(long, default_value = "devices/+/telemetry")]
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
    let read = |f: &str| dir.join(f);
    let roots = CertificateDer::pem_file_iter(read("broker-trust.pem"))
        .with_context(|| format!("{}", read("broker-trust.pem").display()))?
        .collect::<Result<Vec<_>, _>>()?;
    let chain = CertificateDer::pem_file_iter(read("cert.pem"))?.collect::<Result<Vec<_>, _>>()?;
    let key = PrivateKeyDer::from_pem_file(read("key.pem"))
        .with_context(|| format!("{}", read("key.pem").display()))?;
    // The broker binds the client id to the certificate: use the id in its SAN URI.
    let id = service_id(&chain[0]).context("service certificate carries no urn:fleetgate:service: URI")?;
    let mut o = MqttOptions::new(id, host, port);
    o.set_clean_session(true);
    o.set_keep_alive(Duration::from_secs(30));
    o.set_transport(tls(roots, chain, key)?);
    Ok(o)
}

/// The id in a certificate's `urn:fleetgate:service:<id>` SAN: a `[6] IA5String` whose length
/// byte precedes it (ids are at most 64 chars, so the short length form always applies).
fn service_id(der: &[u8]) -> Option<String> {
    const PREFIX: &[u8] = b"urn:fleetgate:service:";
    let start = der.windows(PREFIX.len()).position(|w| w == PREFIX)?;
    let len = usize::from(*der.get(start.checked_sub(1)?)?);
    let id = der.get(start + PREFIX.len()..start + len)?;
    std::str::from_utf8(id).ok().filter(|s| !s.is_empty()).map(str::to_owned)
}

#[derive(Debug, Default, Clone)]
struct Stats {
    sent: u64,
    acked: u64,
    commands: u64,
    connects: u64,
    refusals: u64,
    last_error: Option<String>,
    connected: bool,
}

async fn device(
    bundle_path: PathBuf,
    port: Option<u16>,
    rate: f64,
    until: Instant,
    stats: Arc<Mutex<BTreeMap<String, Stats>>>,
) -> anyhow::Result<()> {
    let bytes = std::fs::read(&bundle_path).with_context(|| format!("{}", bundle_path.display()))?;
    let c = Credentials::decode(&bytes).map_err(|e| anyhow::anyhow!("{}: {e}", bundle_path.display()))?;
    let id = c.device_id.to_owned();
    let key = PrivateKeyDer::Sec1(PrivateSec1KeyDer::from(c.key_der.to_vec()));
    let transport = tls(
        vec![CertificateDer::from(c.server_ca_der.to_vec())],
        vec![CertificateDer::from(c.cert_der.to_vec())],
        key,
    )?;
    let mut o = MqttOptions::new(&id, c.broker_host, port.unwrap_or(c.broker_port));
    o.set_keep_alive(Duration::from_secs(30));
    o.set_transport(transport);
    let (client, mut ev) = AsyncClient::new(o, 64);
    let telemetry = format!("devices/{id}/telemetry");
    let commands = format!("devices/{id}/commands/#");
    let update = |f: &dyn Fn(&mut Stats)| {
        let mut m = stats.lock().unwrap_or_else(|p| p.into_inner());
        f(m.entry(id.clone()).or_default());
    };
    update(&|_| {});
    // Telemetry is produced by its own task: rumqttc's `poll` must never be cancelled mid-way
    // (a dropped poll abandons a half-done TLS handshake).
    let producer = {
        let client = client.clone();
        let stats = stats.clone();
        let id = id.clone();
        let period = Duration::from_secs_f64(1.0 / rate.max(0.01));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            let mut seq = 0u64;
            loop {
                tick.tick().await;
                seq += 1;
                let body =
                    serde_json::json!({ "seq": seq, "temp_c": 20.0 + (seq % 50) as f64 / 10.0 }).to_string();
                // Queued while disconnected; sent after reconnect.
                if client.try_publish(&telemetry, QoS::AtLeastOnce, false, body).is_ok() {
                    let mut m = stats.lock().unwrap_or_else(|p| p.into_inner());
                    m.entry(id.clone()).or_default().sent += 1;
                }
            }
        })
    };
    let mut backoff = Duration::from_millis(250);
    let mut attempt = 0u32;
    let deadline = tokio::time::Instant::from_std(until);
    loop {
        let e = tokio::select! {
            _ = tokio::time::sleep_until(deadline) => break,
            e = ev.poll() => e,
        };
        match e {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                backoff = Duration::from_millis(250);
                update(&|s| {
                    s.connects += 1;
                    s.connected = true;
                });
                let _ = client.try_subscribe(&commands, QoS::AtLeastOnce);
            }
            Ok(Event::Incoming(Packet::PubAck(_))) => update(&|s| s.acked += 1),
            Ok(Event::Incoming(Packet::Publish(p))) => {
                update(&|s| s.commands += 1);
                let name = p.topic.rsplit('/').next().unwrap_or("command").to_owned();
                let _ = client.try_publish(
                    format!("devices/{id}/acks/{name}"),
                    QoS::AtLeastOnce,
                    false,
                    p.payload.to_vec(),
                );
            }
            Ok(_) => {}
            Err(e) => {
                let msg = e.to_string();
                update(&|s| {
                    s.refusals += 1;
                    s.connected = false;
                    s.last_error = Some(msg.clone());
                });
                // Jittered exponential back-off.
                attempt = attempt.wrapping_add(1);
                let jitter = Duration::from_millis(
                    u64::from(std::process::id().wrapping_mul(31).wrapping_add(attempt * 97)) % 250,
                );
                tokio::time::sleep(backoff + jitter).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
    producer.abort();
    let _ = client.try_disconnect();
    Ok(())
}

async fn run(devices: PathBuf, port: Option<u16>, rate: f64, duration: f64) -> anyhow::Result<()> {
    let mut bundles: Vec<PathBuf> = std::fs::read_dir(&devices)
        .with_context(|| format!("{}", devices.display()))?
        .flatten()
        .map(|e| e.path().join("credentials.bin"))
        .filter(|p| p.is_file())
        .collect();
    bundles.sort();
    if bundles.is_empty() {
        bail!("no */credentials.bin under {}", devices.display());
    }
    let until = Instant::now() + Duration::from_secs_f64(duration);
    let stats = Arc::new(Mutex::new(BTreeMap::new()));
    println!("fleet-sim: {} devices, {rate} msg/s each, {duration} s", bundles.len());
    let tasks: Vec<_> =
        bundles.into_iter().map(|b| tokio::spawn(device(b, port, rate, until, stats.clone()))).collect();
    for t in tasks {
        t.await??;
    }
    let m = stats.lock().unwrap_or_else(|p| p.into_inner()).clone();
    println!("{:<20} {:>6} {:>6} {:>9} {:>9}  state", "DEVICE", "SENT", "ACKED", "COMMANDS", "REFUSALS");
    for (id, s) in &m {
        let state = if s.connected {
            "connected".to_owned()
        } else {
            format!("cut off ({})", s.last_error.as_deref().unwrap_or("never connected"))
        };
        println!("{id:<20} {:>6} {:>6} {:>9} {:>9}  {state}", s.sent, s.acked, s.commands, s.refusals);
    }
    let total_acked: u64 = m.values().map(|s| s.acked).sum();
    println!("fleet-sim: {total_acked} messages acknowledged (stored) by the broker");
    Ok(())
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
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                client.subscribe(&filter, QoS::AtLeastOnce).await?;
                println!("watching {filter}");
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                println!("{} {}", p.topic, String::from_utf8_lossy(&p.payload));
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
    payload: String,
) -> anyhow::Result<()> {
    let (client, mut ev) = AsyncClient::new(service_options(&identity, &host, port)?, 8);
    let topic = format!("devices/{device}/commands/{name}");
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

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let r = match cli.command {
        Cmd::Run { devices, port, rate, duration } => run(devices, port, rate, duration).await,
        Cmd::Watch { identity, host, port, filter, duration } => {
            watch(identity, host, port, filter, duration).await
        }
        Cmd::Command { identity, host, port, device, name, payload } => {
            command(identity, host, port, device, name, payload).await
        }
    };
    match r {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
