//! `fleet-provision`: the factory provisioning station CLI. Parses arguments, calls the library,
//! prints results. See `fleet-provision --help`.

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::builder::{PossibleValuesParser, TypedValueParser};
use clap::{Parser, Subcommand};
use fleet_provision::home::Home;
use fleet_provision::issuer::IssuerConfig;
use fleet_provision::lifecycle::{ClaimOptions, Policy};
use fleet_provision::station::{MintOptions, Station};
use fleet_provision::{DeviceId, Error, RevocationReason, SerialNumber, Status};
use fleet_registry::Registry;
use indicatif::{ProgressBar, ProgressStyle};

/// `println!` that ends the process quietly when stdout is closed (e.g. piped into `head`),
/// instead of panicking like `println!` does.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        if let Err(e) = writeln!(std::io::stdout().lock(), $($arg)*) {
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                std::process::exit(0);
            }
        }
    }};
}

/// `print!` with the same broken-pipe handling.
macro_rules! say_raw {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        if let Err(e) = write!(std::io::stdout().lock(), $($arg)*) {
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                std::process::exit(0);
            }
        }
    }};
}

/// The fleetgate factory provisioning station.
///
/// Creates the CA hierarchy, mints one X.509 identity per device, keeps the registry (SQLite in
/// the home by default, PostgreSQL with --database-url) and an append-only, hash-chained
/// issuance log, revokes identities and signs CRLs.
///
/// Typical flow:
///   fleet-provision init --org "Acme"
///   fleet-provision server-cert --dns broker.example.com       # into HOME/broker-tls, where fleet-broker looks
///   fleet-provision mint --count 100 --out devices --broker-host broker.example.com
///   fleet-provision revoke dev-0a1b2c3d4e5f --reason keyCompromise
#[derive(Debug, Parser)]
#[command(name = "fleet-provision", version, verbatim_doc_comment)]
struct Cli {
    /// Station home: CA certificates and keys, registry.db, crl.pem.
    #[arg(long, global = true, env = "FLEET_HOME", default_value = Home::DEFAULT_DIR)]
    home: PathBuf,
    /// Registry database; default: SQLite file registry.db in the home.
    /// Example: postgres://user@host/fleet
    #[arg(long, global = true, env = "FLEET_DATABASE_URL")]
    database_url: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create the root CA, device issuing CA and server CA, and the registry. Refuses to
    /// overwrite an existing hierarchy. Move private/root-ca.key offline afterwards.
    Init {
        /// Organisation name put in every certificate subject.
        #[arg(long)]
        org: String,
    },
    /// Issue a broker TLS certificate (EKU serverAuth) from the server CA into --out:
    /// cert.pem (leaf + server CA), key.pem, client-ca.pem (the device CA the broker trusts).
    ServerCert {
        /// DNS name the devices connect to (repeatable).
        #[arg(long)]
        dns: Vec<String>,
        /// IP address SAN (repeatable).
        #[arg(long)]
        ip: Vec<IpAddr>,
        /// Output directory (must not exist, unless --renew); default HOME/broker-tls, where
        /// fleet-broker looks.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Renew the certificate already in the output directory: new key, same names (unless
        /// --dns/--ip are given), files replaced atomically; running brokers reload it without
        /// dropping sessions. Run it from cron well before expiry (see README).
        #[arg(long)]
        renew: bool,
        /// Certificate lifetime in days (at most 397, the CA/Browser Forum limit).
        #[arg(long, default_value_t = 90)]
        days: i64,
    },
    /// Issue a backend-service client identity (role `service`: may subscribe to every
    /// device's telemetry and publish commands) into DIR.
    ServiceCert {
        /// Service name (used as its id).
        #[arg(long)]
        name: String,
        /// Output directory (must not exist).
        #[arg(long)]
        out: PathBuf,
    },
    /// Issue a broker node's identity on the cluster bus (NATS) from the server CA into DIR:
    /// cert.pem, key.pem and broker-trust.pem, for the node's nats_cert, nats_key and nats_ca.
    /// nats-server maps its URI (urn:fleetgate:node:NAME) to the node's user; see
    /// deploy/nats/nats-server.conf. With --stream-reader: a backend's read-only identity
    /// (urn:fleetgate:stream-reader:NAME), which may only consume the JetStream stream.
    NodeCert {
        /// Node name (e.g. n1), as listed in the NATS server's users.
        #[arg(long)]
        name: String,
        /// Output directory (must not exist).
        #[arg(long)]
        out: PathBuf,
        /// A backend's read-only stream identity instead of a broker node's.
        #[arg(long)]
        stream_reader: bool,
    },
    /// Issue a certificate-issuer identity (role `issuer`: may subscribe to devices' CSRs on
    /// devices/+/certs/csr and publish under devices/<id>/certs/ only) into DIR, for the
    /// online issuer that rotates device certificates over MQTT.
    IssuerCert {
        /// Issuer name (used as its id).
        #[arg(long)]
        name: String,
        /// Output directory (must not exist).
        #[arg(long)]
        out: PathBuf,
    },
    /// Issue an operator identity (role `operator`) into DIR: cert.pem and key.pem for curl and
    /// scripts, and operator.p12 to import into a browser, for the broker's admin API and console
    /// (`admin_listen`). Operators cannot connect over MQTT; devices and services cannot use the
    /// admin API. Revoke one like any identity: `revoke <name>`.
    OperatorCert {
        /// Operator name (used as its id and written to the issuance log with each change).
        #[arg(long)]
        name: String,
        /// Output directory (must not exist).
        #[arg(long)]
        out: PathBuf,
        /// Password of operator.p12 (at least 8 characters). Without it a random one is made and
        /// written to DIR/p12-password (mode 0600).
        #[arg(long, env = "FLEET_P12_PASSWORD", hide_env_values = true)]
        p12_password: Option<String>,
    },
    /// Issue a claim identity (role `claim`) into DIR, with a credentials.bin to flash into every
    /// device of a batch: at first boot each device generates its own key and exchanges a CSR
    /// for its own identity through `serve`, within the claim's quota. The station never sees
    /// those keys. Keep claims short-lived; revoke one with `revoke <claim>`.
    ClaimCert {
        /// Claim name (used as its id), e.g. batch-2026-12.
        #[arg(long)]
        name: String,
        /// Devices created by this claim are named <prefix>-<anything>.
        #[arg(long, default_value = "dev")]
        prefix: String,
        /// How many device identities this claim may create.
        #[arg(long)]
        quota: i64,
        /// Lifetime of the claim certificate in days.
        #[arg(long, default_value_t = 30)]
        days: i64,
        /// Output directory (must not exist).
        #[arg(long)]
        out: PathBuf,
        /// Broker host name written into credentials.bin.
        #[arg(long, default_value = "localhost")]
        broker_host: String,
        /// Broker port written into credentials.bin.
        #[arg(long, default_value_t = 8883)]
        broker_port: u16,
    },
    /// Run the online issuer: connect to the broker with an issuer identity and answer
    /// devices' CSRs (rotation before expiry, claim-based first boot), revoke each device's old
    /// certificate a grace period after it runs on the new one, and ask devices to rotate when
    /// an operator requested it (`rotate`). Runs until interrupted. See docs/spec/rotation.md.
    Serve {
        /// Issuer identity directory (from issuer-cert).
        #[arg(long)]
        identity: PathBuf,
        /// Broker host.
        #[arg(long, default_value = "localhost")]
        host: String,
        /// Broker port.
        #[arg(long, default_value_t = 8883)]
        port: u16,
        /// A device may rotate when its certificate expires within this long (e.g. 30d).
        #[arg(long, default_value = "30d", value_parser = parse_duration_secs)]
        renew_within: i64,
        /// At most one rotation per device in this long, unless an operator asked for it.
        #[arg(long, default_value = "1h", value_parser = parse_duration_secs)]
        min_interval: i64,
        /// Revoke the old certificate this long after the device runs on the new one (0s: at once).
        #[arg(long, default_value = "1h", value_parser = parse_duration_secs)]
        grace: i64,
        /// How often to re-announce operator requests and revoke superseded certificates.
        #[arg(long, default_value = "1s", value_parser = parse_duration_secs, hide = true)]
        tick: i64,
    },
    /// Ask devices to rotate their key and certificate now (operator-forced rotation): the
    /// running issuer (`serve`) tells each device and accepts its CSR whatever its expiry.
    Rotate {
        /// The device to rotate.
        #[arg(required_unless_present_any = ["expiring_within", "all"], conflicts_with_all = ["expiring_within", "all"])]
        device_id: Option<String>,
        /// Every active device whose certificate expires within this long (e.g. 30d).
        #[arg(long, value_name = "DURATION", value_parser = parse_duration_secs, conflicts_with = "all")]
        expiring_within: Option<i64>,
        /// Every active device.
        #[arg(long)]
        all: bool,
        /// Who asks (written to the issuance log).
        #[arg(long, env = "USER", default_value = "operator")]
        by: String,
    },
    /// Mint a batch of device identities with station-generated keys. Writes
    /// DIR/<device-id>/{cert.pem, key.pem, server-ca.pem, broker-trust.pem, credentials.bin}.
    /// Every identity is recorded in the registry before its files are written.
    Mint {
        /// How many identities.
        #[arg(long, default_value_t = 1)]
        count: usize,
        /// Device id prefix; ids are <prefix>-<12 hex digits>.
        #[arg(long, default_value = "dev")]
        prefix: String,
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
        /// Broker host name written into credentials.bin (the broker cert must carry it).
        #[arg(long, default_value = "localhost")]
        broker_host: String,
        /// Broker port written into credentials.bin.
        #[arg(long, default_value_t = 8883)]
        broker_port: u16,
        /// Certificate lifetime in days.
        #[arg(long, default_value_t = 1825)]
        days: i64,
        /// Identities per registry transaction.
        #[arg(long, default_value_t = 256, hide = true)]
        chunk: usize,
    },
    /// Issue a certificate for a device-generated key. The CSR must be P-256 ECDSA, correctly
    /// self-signed, and must not ask for CA:TRUE or an EKU other than clientAuth.
    ///
    /// Only for a NEW device: a CSR naming an existing device (or a service, or a reserved name
    /// such as `broker`) is refused. To replace an existing device's key, use `rekey`.
    SignCsr {
        /// PKCS#10 request, PEM or DER.
        #[arg(long)]
        csr: PathBuf,
        /// Device id; default: the CSR's subject CN.
        #[arg(long)]
        device_id: Option<String>,
        /// Where to write the certificate (PEM).
        #[arg(long)]
        out: PathBuf,
        /// Certificate lifetime in days (at most the device CA's remaining validity).
        #[arg(long, default_value_t = 1825)]
        days: i64,
    },
    /// Replace an existing device's key with the key of a device-generated CSR (e.g. after a
    /// suspected key compromise or a secure-element swap). In one registry transaction: the
    /// new certificate is issued, every other active certificate of the device is revoked with
    /// reason superseded, and the re-key is written to the issuance log; then a fresh CRL is
    /// written. Brokers cut sessions that use a superseded certificate.
    Rekey {
        /// The existing device.
        device_id: String,
        /// PKCS#10 request from the device (PEM or DER); its CN, if any, must be the device id.
        #[arg(long)]
        csr: PathBuf,
        /// Where to write the new certificate (PEM).
        #[arg(long)]
        out: PathBuf,
        /// Certificate lifetime in days (at most the device CA's remaining validity).
        #[arg(long, default_value_t = 1825)]
        days: i64,
    },
    /// Issue a new certificate (new serial) for the same device and key. The old certificate
    /// stays valid until it expires or is revoked.
    Renew {
        /// The device.
        device_id: String,
        /// Where to write the certificate (PEM); default: print it.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Revoke a device (all its certificates, forever) or one certificate, then write a fresh
    /// CRL to HOME/crl.pem. Brokers watching the registry cut the device's session.
    Revoke {
        /// The device to revoke.
        #[arg(required_unless_present = "serial", conflicts_with = "serial")]
        device_id: Option<String>,
        /// Revoke only this certificate (hex serial).
        #[arg(long)]
        serial: Option<String>,
        /// RFC 5280 reason.
        #[arg(long, default_value = "unspecified", value_parser = reason_parser())]
        reason: RevocationReason,
    },
    /// Sign an X.509 v2 CRL of every revoked certificate (device CA, increasing CRL number).
    Crl {
        /// Output file.
        #[arg(long)]
        out: PathBuf,
        /// Write DER instead of PEM.
        #[arg(long)]
        der: bool,
        /// Days until nextUpdate.
        #[arg(long, default_value_t = 7)]
        days: i64,
    },
    /// List devices and services.
    List {
        /// Only this status.
        #[arg(long, value_parser = status_parser())]
        status: Option<Status>,
        /// Only active identities whose newest certificate expires within this long (e.g. 30d,
        /// 12h; already expired ones included): the devices to rotate.
        #[arg(long, value_name = "DURATION", value_parser = parse_duration_secs)]
        expiring_within: Option<i64>,
        /// JSON output (one array).
        #[arg(long)]
        json: bool,
    },
    /// Show a device's status and certificates.
    Show {
        /// The device.
        device_id: String,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// A device's commands (newest first) and their status: queued, delivered, acknowledged,
    /// expired or dropped (see docs/spec/commands.md). Refused commands are never stored: the
    /// sender got the refusal on its status topic.
    Commands {
        /// The device.
        device_id: String,
        /// At most this many (the newest).
        #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(i64).range(1..=100_000))]
        limit: i64,
        /// JSON output (one array; payloads as UTF-8 text, or hex when they are not).
        #[arg(long)]
        json: bool,
    },
    /// PostgreSQL least privilege: create (if missing) and grant a role for the brokers that
    /// can read devices and certificates and insert telemetry, and nothing else (no UPDATE of
    /// a certificate or device row, no issuance-log or CRL-state access). Run it as the schema
    /// owner after `init` and after upgrades; then give the brokers
    /// `--database-url postgres://ROLE@host/db`. `--print` shows the SQL instead.
    DbRoles {
        /// Name of the broker role.
        #[arg(long, default_value = "fleet_broker")]
        broker_role: String,
        /// Print the SQL instead of running it.
        #[arg(long)]
        print: bool,
    },
    /// Verify the issuance log's hash chain, then recompute every security-relevant registry
    /// column (certificate status, revocation time and reason, not_after, bytes, owner; device
    /// status, revocation and role) from the log. Prints each row that disagrees and exits
    /// non-zero if any entry was edited or removed or any row disagrees.
    VerifyLog,
}

/// `--reason`: the RFC 5280 names, listed in `--help`.
fn reason_parser() -> impl TypedValueParser<Value = RevocationReason> {
    PossibleValuesParser::new(RevocationReason::ALL.map(RevocationReason::as_str))
        .map(|s| RevocationReason::parse(&s).unwrap_or(RevocationReason::Unspecified))
}

/// `--status`: `active` or `revoked`.
/// `30d`, `12h`, `90m`, `45s` (or a plain number of days) as seconds.
fn parse_duration_secs(s: &str) -> Result<i64, String> {
    let s = s.trim();
    let (digits, unit) = match s.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((i, _)) => s.split_at(i),
        None => (s, "d"),
    };
    let n: i64 = digits.parse().map_err(|_| format!("{s:?}: expected a number and a unit, e.g. 30d"))?;
    let unit = match unit {
        "d" => 86_400,
        "h" => 3_600,
        "m" => 60,
        "s" => 1,
        _ => return Err(format!("{s:?}: the unit is d, h, m or s (e.g. 30d)")),
    };
    n.checked_mul(unit).ok_or_else(|| format!("{s:?}: too long"))
}

fn status_parser() -> impl TypedValueParser<Value = Status> {
    PossibleValuesParser::new(Status::ALL.map(Status::as_str))
        .map(|s| Status::parse(&s).unwrap_or(Status::Active))
}

/// What to do next, for the errors where this CLI knows.
fn hint(e: &anyhow::Error) -> Option<String> {
    let e = e.downcast_ref::<Error>()?;
    Some(match e {
        Error::NotInitialised(..) => "run `fleet-provision init --org NAME` first or pass --home".into(),
        Error::DeviceExists(id) => format!(
            "to re-key it deliberately, run `fleet-provision rekey {id} --csr FILE` (revokes its current certificate as superseded)"
        ),
        Error::OutlivesIssuer { issuer_days_left, .. } => {
            format!("use --days {issuer_days_left} or less, or renew the CA")
        }
        Error::Registry(fleet_registry::Error::SchemaNotCurrent(_)) => {
            "run a `fleet-provision` command (e.g. `fleet-provision list`) against this database as its owner to migrate it".into()
        }
        _ => return None,
    })
}

fn fmt_time(t: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(t)
        .ok()
        .and_then(|d| d.format(&time::format_description::well_known::Rfc3339).ok())
        .unwrap_or_else(|| t.to_string())
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let home = Home::new(&cli.home);
    let db = cli.database_url.as_deref();
    match cli.command {
        Command::Init { org } => {
            let s = Station::init(home, &org, db).await?;
            say!("initialised fleet home {}", s.home().root().display());
            say!(
                "  root CA         {}  (move {} offline)",
                s.home().root_ca().display(),
                s.home().root_ca_key().display()
            );
            say!("  device CA       {}", s.home().device_ca().display());
            say!("  server CA       {}", s.home().server_ca().display());
            say!("  CRL             {}", s.home().crl().display());
            say!("next: fleet-provision server-cert --dns <broker host>   (writes {}, where fleet-broker looks)", s.home().broker_tls().dir().display());
        }
        Command::ServerCert { dns, ip, out, renew, days } => {
            let mut s = Station::open(home, db).await?;
            s.set_server_lifetime(days)?;
            let out = out.unwrap_or_else(|| s.home().broker_tls().dir().to_path_buf());
            let c = if renew {
                s.renew_server_cert(&dns, &ip, &out).await?
            } else {
                s.server_cert(&dns, &ip, &out).await?
            };
            say!(
                "server certificate {} (serial {}) valid until {}",
                out.display(),
                c.serial,
                fmt_time(c.not_after)
            );
        }
        Command::ServiceCert { name, out } => {
            let s = Station::open(home, db).await?;
            let d = s.service_cert(&name, &out).await?;
            say!("service identity {} (serial {}) in {}", d.device_id, d.serial, d.dir.display());
        }
        Command::NodeCert { name, out, stream_reader } => {
            let s = Station::open(home, db).await?;
            let c = s.node_cert(&name, stream_reader, &out).await?;
            let what = if stream_reader { "stream reader" } else { "node" };
            say!(
                "cluster-bus {what} identity {name} (serial {}) in {}, valid until {}",
                c.serial,
                out.display(),
                fmt_time(c.not_after)
            );
        }
        Command::IssuerCert { name, out } => {
            let s = Station::open(home, db).await?;
            let d = s.issuer_cert(&name, &out).await?;
            say!("issuer identity {} (serial {}) in {}", d.device_id, d.serial, d.dir.display());
        }
        Command::OperatorCert { name, out, p12_password } => {
            let s = Station::open(home, db).await?;
            let (password, made) = match p12_password {
                Some(p) => (p, false),
                None => (hex::encode(rand::random::<[u8; 12]>()), true),
            };
            let d = s.operator_cert(&name, &out, &password).await?;
            if made {
                fleet_provision::home::write_new(&d.dir.join("p12-password"), password.as_bytes(), true)?;
            }
            say!("operator identity {} (serial {}) in {}", d.device_id, d.serial, d.dir.display());
            say!(
                "  browsers: import {}/operator.p12 (password {})",
                d.dir.display(),
                if made { "in p12-password" } else { "as given" }
            );
        }
        Command::ClaimCert { name, prefix, quota, days, out, broker_host, broker_port } => {
            let s = Station::open(home, db).await?;
            let opts = ClaimOptions { name, id_prefix: prefix, quota, days, out, broker_host, broker_port };
            let d = s.claim_cert(&opts).await?;
            say!(
                "claim identity {} (serial {}, quota {}, devices {}-...) in {}",
                d.device_id,
                d.serial,
                opts.quota,
                opts.id_prefix,
                d.dir.display()
            );
        }
        Command::Serve { identity, host, port, renew_within, min_interval, grace, tick } => {
            let s = Station::open(home, db).await?;
            let policy = Policy { renew_within, min_interval, grace };
            let tick = std::time::Duration::from_secs(tick.max(1) as u64);
            let cfg = IssuerConfig { identity, host, port, policy, tick };
            let c = fleet_provision::issuer::serve(s, cfg, shutdown_signal()).await?;
            say!("issuer stopped: {} issued, {} rejected, {} superseded", c.issued, c.rejected, c.superseded);
        }
        Command::Rotate { device_id, expiring_within, all, by } => {
            let s = Station::open(home, db).await?;
            let ids = match device_id {
                Some(id) => vec![DeviceId::parse(&id)?],
                None => s.devices_to_rotate(if all { None } else { expiring_within }).await?,
            };
            let n = s.request_rotation(&ids, &by).await?;
            say!("rotation requested for {n} device(s); the issuer (fleet-provision serve) asks each to rotate");
        }
        Command::Mint { count, prefix, out, broker_host, broker_port, days, chunk } => {
            let mut s = Station::open(home, db).await?;
            s.set_client_lifetime(days)?;
            let bar = ProgressBar::new(count as u64);
            bar.set_style(
                ProgressStyle::with_template("{spinner} minting [{bar:40}] {pos}/{len} {per_sec} eta {eta}")
                    .context("progress template")?
                    .progress_chars("=> "),
            );
            if count < 50 {
                bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
            }
            let opts = MintOptions { count, prefix, out: out.clone(), broker_host, broker_port, chunk };
            let minted = s.mint(&opts, &|n| bar.inc(n)).await?;
            bar.finish_and_clear();
            for d in minted.iter().take(20) {
                say!("{}  serial {}", d.device_id, d.serial);
            }
            if minted.len() > 20 {
                say!("... and {} more", minted.len() - 20);
            }
            say!("minted {} device identities into {}", minted.len(), out.display());
        }
        Command::SignCsr { csr, device_id, out, days } => {
            let mut s = Station::open(home, db).await?;
            s.set_client_lifetime(days)?;
            let bytes = std::fs::read(&csr).with_context(|| format!("reading {}", csr.display()))?;
            let c = s.sign_csr(&bytes, device_id.as_deref()).await?;
            fleet_provision::home::write_new(&out, c.pem.as_bytes(), false)?;
            say!("issued serial {} valid until {} -> {}", c.serial, fmt_time(c.not_after), out.display());
        }
        Command::Rekey { device_id, csr, out, days } => {
            let mut s = Station::open(home, db).await?;
            s.set_client_lifetime(days)?;
            let bytes = std::fs::read(&csr).with_context(|| format!("reading {}", csr.display()))?;
            let (c, superseded, crl) = s.rekey(&DeviceId::parse(&device_id)?, &bytes).await?;
            fleet_provision::home::write_new(&out, c.pem.as_bytes(), false)?;
            say!(
                "re-keyed {device_id}: serial {} valid until {} -> {}",
                c.serial,
                fmt_time(c.not_after),
                out.display()
            );
            for sn in superseded {
                say!("  revoked (superseded) serial {sn}");
            }
            say!("CRL #{} with {} entries written to {}", crl.number, crl.revoked, s.home().crl().display());
        }
        Command::Renew { device_id, out } => {
            let s = Station::open(home, db).await?;
            let c = s.renew(&DeviceId::parse(&device_id)?).await?;
            match out {
                Some(out) => {
                    fleet_provision::home::write_new(&out, c.pem.as_bytes(), false)?;
                    say!(
                        "renewed {device_id}: serial {} valid until {} -> {}",
                        c.serial,
                        fmt_time(c.not_after),
                        out.display()
                    );
                }
                None => say_raw!("{}", c.pem),
            }
        }
        Command::Revoke { device_id, serial, reason } => {
            let s = Station::open(home, db).await?;
            let crl = match (device_id, serial) {
                (Some(id), _) => {
                    let (serials, crl) = s.revoke_device(&DeviceId::parse(&id)?, reason).await?;
                    say!(
                        "revoked device {id} ({reason}): {} certificate(s)",
                        serials.len(),
                        reason = reason.as_str()
                    );
                    for sn in serials {
                        say!("  serial {sn}");
                    }
                    crl
                }
                (None, Some(sn)) => {
                    let (owner, crl) = s.revoke_serial(&SerialNumber::parse(&sn)?, reason).await?;
                    say!("revoked certificate {sn} of {owner} ({})", reason.as_str());
                    crl
                }
                (None, None) => anyhow::bail!("give a DEVICE_ID or --serial"),
            };
            say!("CRL #{} with {} entries written to {}", crl.number, crl.revoked, s.home().crl().display());
        }
        Command::Crl { out, der, days } => {
            let s = Station::open(home, db).await?;
            let crl = s.crl(Some(days)).await?;
            let bytes = if der { crl.der.clone() } else { crl.pem.clone().into_bytes() };
            fleet_provision::home::write_replace(&out, &bytes)?;
            say!("CRL #{} with {} revoked certificate(s) -> {}", crl.number, crl.revoked, out.display());
        }
        Command::List { status, expiring_within, json } => {
            let s = Station::open(home, db).await?;
            let mut devices = s.registry().devices(status).await?;
            if let Some(within) = expiring_within {
                let until = time::OffsetDateTime::now_utc().unix_timestamp().saturating_add(within);
                let mut kept = Vec::new();
                for d in devices {
                    let certs = s.registry().certificates_of(&d.device_id).await?;
                    let expiring = certs.first().is_some_and(|c| c.not_after <= until);
                    if d.status == Status::Active && expiring {
                        kept.push(d);
                    }
                }
                devices = kept;
            }
            if json {
                let mut rows = Vec::new();
                for d in &devices {
                    let certs = s.registry().certificates_of(&d.device_id).await?;
                    let latest = certs.first();
                    rows.push(serde_json::json!({
                        "device_id": d.device_id.as_str(),
                        "role": d.role.as_str(),
                        "status": d.status.as_str(),
                        "serial": latest.map(|c| c.serial.to_hex()),
                        "not_after": latest.map(|c| fmt_time(c.not_after)),
                    }));
                }
                say!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                say!("{:<40} {:<8} {:<8} {:<34} EXPIRES", "DEVICE", "ROLE", "STATUS", "SERIAL");
                for d in &devices {
                    let certs = s.registry().certificates_of(&d.device_id).await?;
                    let (serial, exp) = certs.first().map_or((String::new(), String::new()), |c| {
                        (c.serial.to_hex(), fmt_time(c.not_after))
                    });
                    say!(
                        "{:<40} {:<8} {:<8} {:<34} {}",
                        d.device_id,
                        d.role.as_str(),
                        d.status.as_str(),
                        serial,
                        exp
                    );
                }
                say!("{} identities", devices.len());
            }
        }
        Command::Show { device_id, json } => {
            let s = Station::open(home, db).await?;
            let r = s.show(&DeviceId::parse(&device_id)?).await?;
            if json {
                let certs: Vec<_> = r
                    .certificates
                    .iter()
                    .map(|c| serde_json::json!({
                        "serial": c.serial.to_hex(), "status": c.status.as_str(), "key_source": c.key_source,
                        "not_before": fmt_time(c.not_before), "not_after": fmt_time(c.not_after),
                        "revocation_reason": c.revocation_reason,
                    }))
                    .collect();
                let v = serde_json::json!({
                    "device_id": r.device.device_id.as_str(), "role": r.device.role.as_str(),
                    "status": r.device.status.as_str(), "created_at": fmt_time(r.device.created_at),
                    "certificates": certs,
                });
                say!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                say!("device   {}", r.device.device_id);
                say!("role     {}", r.device.role.as_str());
                say!("status   {}", r.device.status.as_str());
                say!("created  {}", fmt_time(r.device.created_at));
                for c in &r.certificates {
                    say!(
                        "cert     {}  {}  {} .. {}  key:{}{}",
                        c.serial,
                        c.status.as_str(),
                        fmt_time(c.not_before),
                        fmt_time(c.not_after),
                        c.key_source,
                        c.revocation_reason.as_deref().map(|r| format!("  reason:{r}")).unwrap_or_default()
                    );
                }
            }
        }
        Command::Commands { device_id, limit, json } => {
            let s = Station::open(home, db).await?;
            let cmds = s.commands(&DeviceId::parse(&device_id)?, limit).await?;
            let ms = |t: i64| fmt_time(t.div_euclid(1000));
            if json {
                let v: Vec<_> = cmds
                    .iter()
                    .map(|c| {
                        let payload = match std::str::from_utf8(&c.payload) {
                            Ok(t) => serde_json::json!({ "text": t }),
                            Err(_) => serde_json::json!({ "hex": hex::encode(&c.payload) }),
                        };
                        serde_json::json!({
                            "id": c.id, "name": c.name, "status": c.status.as_str(), "sender": c.sender,
                            "created_at": ms(c.created_at), "expires_at": ms(c.expires_at),
                            "attempts": c.attempts, "payload": payload,
                        })
                    })
                    .collect();
                say!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                for c in &cmds {
                    say!(
                        "{:>8}  {:<12}  {:<24}  sent {}  expires {}  attempts {}  from {}  {} bytes",
                        c.id,
                        c.status.as_str(),
                        c.name,
                        ms(c.created_at),
                        ms(c.expires_at),
                        c.attempts,
                        c.sender,
                        c.payload.len()
                    );
                }
                say!("{} commands", cmds.len());
            }
        }
        Command::DbRoles { broker_role, print } => {
            if print {
                for stmt in Registry::broker_role_sql(&broker_role)? {
                    say!("{stmt};");
                }
            } else {
                let s = Station::open(home, db).await?;
                s.registry().apply_broker_role(&broker_role).await?;
                say!(
                    "role {broker_role}: SELECT on devices, certificates; INSERT on telemetry; the command queue; nothing else"
                );
            }
        }
        Command::VerifyLog => {
            let s = Station::open(home, db).await?;
            let r = s.verify_log().await?;
            if !r.disagreements.is_empty() {
                for d in &r.disagreements {
                    eprintln!("  {d}");
                }
                anyhow::bail!(
                    "issuance log verification failed: the hash chain of {} entries is intact, but {} registry \
                     row(s) disagree with it (edited outside fleet-provision?)",
                    r.entries,
                    r.disagreements.len()
                );
            }
            say!("issuance log OK: {} entries, head {}", r.entries, r.head);
        }
    }
    Ok(())
}

/// Resolves on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(t) => t,
            Err(_) => return std::future::pending().await,
        };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

/// Colour only on a terminal, and never with `NO_COLOR` set (<https://no-color.org>): the
/// issuer's log in a file or journald stays plain text.
fn colour(stream: &impl std::io::IsTerminal) -> bool {
    stream.is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The issuer is a service: it logs what it decides unless RUST_LOG says otherwise.
    let default = if matches!(cli.command, Command::Serve { .. }) { "info" } else { "error" };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default)),
        )
        .with_writer(std::io::stderr)
        .with_ansi(colour(&std::io::stderr()))
        .init();
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            match hint(&e) {
                Some(h) => eprintln!("error: {}; {h}", fleet_registry::report(e.as_ref())),
                None => eprintln!("error: {}", fleet_registry::report(e.as_ref())),
            }
            ExitCode::FAILURE
        }
    }
}
