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
use rand::RngCore as _;
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

/// The id in a certificate's `urn:fleetgate:service:<id>` SAN URI, read by the X.509 parser.
fn service_id(der: &[u8]) -> Option<String> {
    use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
    const PREFIX: &str = "urn:fleetgate:service:";
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|n| match n {
        GeneralName::URI(uri) => uri.strip_prefix(PREFIX).filter(|id| !id.is_empty()).map(str::to_owned),
        _ => None,
    })
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

/// One simulated device on the SDK: blocking, on its own thread, exactly like firmware.
fn device(
    bundle_path: PathBuf,
    port: Option<u16>,
    rate: f64,
    until: Instant,
    stats: Arc<Mutex<BTreeMap<String, Stats>>>,
) -> anyhow::Result<()> {
    use fleet_device::client::{ClientError, Device, Incoming};
    use fleet_device::mqtt::{Millis, SessionConfig};

    let bytes = std::fs::read(&bundle_path).with_context(|| format!("{}", bundle_path.display()))?;
    let mut creds =
        Credentials::decode(&bytes).map_err(|e| anyhow::anyhow!("{}: {e}", bundle_path.display()))?;
    if let Some(p) = port {
        creds.broker_port = p;
    }
    let id = creds.device_id.to_owned();
    let update = |f: &dyn Fn(&mut Stats)| {
        let mut m = stats.lock().unwrap_or_else(|p| p.into_inner());
        f(m.entry(id.clone()).or_default());
    };
    update(&|_| {});
    let start = Instant::now();
    let ms = || Millis(start.elapsed().as_millis() as u64);
    let period = Duration::from_secs_f64(1.0 / rate.max(0.01));
    let mut device: Device<'_, 64, 256> = Device::new(creds, SessionConfig::default());
    let mut seq = 0u32;
    let mut next_sample = Instant::now();
    let mut rng = rand::rngs::OsRng;
    let describe = |e: &ClientError| match e {
        ClientError::Tls { error, rejection: Some(r) } => format!("TLS {error:?}, broker refused: {r:?}"),
        ClientError::Tls { error, .. } => format!("TLS {error:?}"),
        ClientError::Session(fleet_device::mqtt::SessionError::Refused(5)) => {
            "refused: not authorized (CONNACK 5)".to_owned()
        }
        other => format!("{other:?}"),
    };
    // Samples are taken on schedule whether or not the broker is reachable; the outbox keeps them.
    let mut sample = |device: &mut Device<'_, 64, 256>| {
        while next_sample <= Instant::now() {
            seq += 1;
            if device.publish_telemetry(&(seq, 2000 + (seq % 50) as i32)).is_ok() {
                update(&|s| s.sent += 1);
            }
            next_sample += period;
        }
        next_sample
    };
    while Instant::now() < until {
        sample(&mut device);
        let wait = device.reconnect_at().0.saturating_sub(ms().0);
        if wait > 0 {
            std::thread::sleep(
                Duration::from_millis(wait).min(until.saturating_duration_since(Instant::now())),
            );
            continue;
        }
        let tcp = match fleet_device::client::connect_tcp(device.credentials(), Duration::from_secs(10)) {
            Ok(t) => t,
            Err(e) => {
                let msg = format!("TCP {e}");
                update(&|s| {
                    s.refusals += 1;
                    s.connected = false;
                    s.last_error = Some(msg.clone());
                });
                device.disconnected(ms(), rng.next_u32());
                continue;
            }
        };
        let (mut rx, mut tx) = (vec![0u8; 16_640], vec![0u8; 4096]);
        let result = (|| -> Result<(), ClientError> {
            let mut conn = device.connect(tcp, &mut rx, &mut tx, &mut rng, None, ms())?;
            loop {
                // Send what is queued and read until every message is acknowledged.
                while device.session().queued() > 0 || !device.session().is_connected() {
                    match device.poll(&mut conn, ms())? {
                        Some(Incoming::Connected) => update(&|s| {
                            s.connects += 1;
                            s.connected = true;
                        }),
                        Some(Incoming::Delivered) => update(&|s| s.acked += 1),
                        Some(Incoming::Command { name, payload }) => {
                            update(&|s| s.commands += 1);
                            let mut topic = String::from("acks/");
                            topic.push_str(&name);
                            device.publish(&topic, &payload, fleet_device::mqtt::QoS::AtLeastOnce)?;
                        }
                        Some(Incoming::CommandTooLarge { name_len, payload_len }) => {
                            let msg =
                                format!("command too large: {name_len} B name, {payload_len} B payload");
                            update(&|s| s.last_error = Some(msg.clone()));
                        }
                        None => {}
                    }
                }
                if Instant::now() >= until {
                    return Ok(());
                }
                let next = sample(&mut device);
                std::thread::sleep(next.saturating_duration_since(Instant::now()).min(period));
                sample(&mut device);
            }
        })();
        if let Err(e) = result {
            let msg = describe(&e);
            update(&|s| {
                s.refusals += 1;
                s.connected = false;
                s.last_error = Some(msg.clone());
            });
            device.disconnected(ms(), rng.next_u32());
        }
    }
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
    let threads: Vec<_> = bundles
        .into_iter()
        .map(|b| {
            let stats = stats.clone();
            std::thread::spawn(move || device(b, port, rate, until, stats))
        })
        .collect();
    for t in threads {
        t.join().map_err(|_| anyhow::anyhow!("device thread panicked"))??;
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
