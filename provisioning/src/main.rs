//! `fleet-provision`: the factory provisioning station CLI. Parses arguments and dispatches:
//! each command is a handler in [`cli::commands`] that returns a value, printed by
//! [`cli::report`]. See `fleet-provision --help`.

mod cli;

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::builder::{PossibleValuesParser, TypedValueParser};
use clap::{Parser, Subcommand};
use cli::commands;
use cli::report::{emit, Report};
use fleet_provision::campaign::{self, CampaignOptions, ReleaseRef};
use fleet_provision::firmware::{Board, ReleaseSpec, Version};
use fleet_provision::home::Home;
use fleet_provision::lifecycle::{ClaimOptions, Policy};
use fleet_provision::ota::ReleaseOptions;
use fleet_provision::station::{MintOptions, Station};
use fleet_provision::{Error, RevocationReason, Status};
use fleet_registry::DeviceSelector;

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
///   fleet-provision firmware-key                               # once: the image-signing key
///   fleet-provision release --image app.bin --version 1.2.0 --board mps2-an386
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
    /// Create the firmware image-signing key (Ed25519), once.
    ///
    /// The private key goes to HOME/private/firmware.key (PKCS#8 PEM, mode 0600), kept like the root CA key: move it
    /// offline and give its path to `release --key` when signing. Its public half is what device
    /// firmware embeds: HOME/firmware.pub (32 raw bytes, the public key embassy-boot's
    /// verify_and_mark_updated takes) and HOME/firmware.pub.pem (for openssl). Refuses if the
    /// station made one before (any of the three files exists). See docs/spec/ota.md.
    FirmwareKey,
    /// Sign a firmware image as a release that embassy-boot 0.7 verifies.
    ///
    /// The release is an Ed25519 signature over the image's SHA-512 digest (what embassy-boot's
    /// verify_and_mark_updated checks) and a manifest (version, minimum version,
    /// board, size, digest, signing key id) signed by the same key. The release is recorded in
    /// the registry and the issuance log, then written to DIR: image.bin, image.sha512 (the
    /// signed digest), image.sig (64 bytes), manifest.bin (the 268-byte manifest a device is
    /// offered) and manifest.json. A version is released once per board. See docs/spec/ota.md.
    Release {
        /// The firmware image: the raw binary the bootloader swaps into the active partition
        /// (e.g. `arm-none-eabi-objcopy -O binary app.elf app.bin`), not an ELF file.
        #[arg(long, value_name = "FILE")]
        image: PathBuf,
        /// The release's version: MAJOR.MINOR.PATCH (Semantic Versioning without pre-release or
        /// build tags). A device installs only a version newer than the one it runs.
        #[arg(long, value_name = "VERSION", value_parser = parse_version)]
        version: Version,
        /// The board the image is built for: 1-32 characters of a-z, 0-9, '.', '_', '-' (e.g.
        /// mps2-an386). A device installs only its own board's releases.
        #[arg(long, value_parser = parse_board)]
        board: Board,
        /// The oldest version a device may run to install this release (e.g. 1.1.0 when this
        /// one needs what 1.1.0 migrated); 0.0.0 means any version.
        #[arg(long, value_name = "VERSION", value_parser = parse_version, default_value = "0.0.0")]
        min_version: Version,
        /// The largest image accepted: the board's update partition, in bytes or with KiB, MiB or
        /// GiB (e.g. 448KiB). A device refuses an offer larger than its partition in any case.
        #[arg(long, value_name = "SIZE", value_parser = parse_size, default_value = "1MiB")]
        max_size: u64,
        /// The firmware signing key, when it is not in HOME/private/firmware.key (e.g. its
        /// offline copy on removable media). Only the key whose public half is HOME/firmware.pub
        /// is accepted.
        #[arg(long, value_name = "FILE")]
        key: Option<PathBuf>,
        /// The release directory to create (must not exist); default
        /// HOME/releases/<board>-<version>.
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
    },
    /// List the signed firmware releases in the registry, by board, oldest first.
    Releases {
        /// Only this board's.
        #[arg(long, value_parser = parse_board)]
        board: Option<Board>,
        /// JSON output (one array of manifests, as in each release's manifest.json).
        #[arg(long)]
        json: bool,
    },
    /// Firmware delivery and campaigns: publish a release's image for the brokers, start a
    /// staged campaign, watch it. See docs/spec/ota.md.
    Ota {
        #[command(subcommand)]
        command: OtaCommand,
    },
    /// PostgreSQL least privilege: create (if missing) and grant a role for the brokers that
    /// can read devices and certificates, insert telemetry, keep the command queue, read
    /// releases and move firmware campaigns' and jobs' states, and nothing else (no UPDATE of
    /// a certificate or device row, no issuance-log or CRL-state access, no new or deleted
    /// campaign or job). Run it as the schema
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

#[derive(Debug, Subcommand)]
enum OtaCommand {
    /// Copy a release's image into the brokers' blob directory, named by its SHA-512.
    ///
    /// The image is read from the release directory and checked against the SHA-512 the
    /// registry recorded for the release; the broker checks it again when it loads it. A broker
    /// serves images only from its `ota_blob_dir` (default HOME/ota-blobs).
    Publish {
        /// The release: <board>/<version>, e.g. mps2-an386/1.2.0 (see `fleet-provision releases`).
        #[arg(long, value_name = "BOARD/VERSION", value_parser = ReleaseRef::parse)]
        release: ReleaseRef,
        /// The release directory `release` wrote; default HOME/releases/<board>-<version>.
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
        /// The broker's `ota_blob_dir`; default HOME/ota-blobs (the broker's default when it
        /// shares this home).
        #[arg(long, value_name = "DIR")]
        blob_dir: Option<PathBuf>,
    },
    /// Start a staged update campaign: one job per device, offered wave by wave.
    ///
    /// The brokers' campaign runner puts the first wave's offers (the signed manifest) into
    /// the devices' command queues (a sleeping device gets its offer when it wakes), starts the
    /// next wave only when every job of the waves so far is final (confirmed, rolled back or
    /// failed), and stops the campaign once the failed share of those jobs passes
    /// --abort-if-failed. The campaign and each job are recorded in the issuance log.
    Start {
        /// The release: <board>/<version>, e.g. mps2-an386/1.2.0. It must be published
        /// (`fleet-provision ota publish`).
        #[arg(long, value_name = "BOARD/VERSION", value_parser = ReleaseRef::parse)]
        release: ReleaseRef,
        /// Which devices: `all`; `prefix:dev-` or `dev-*` (ids starting with it); `status:active`;
        /// or a comma-separated list of device ids. Only active devices are updated; a device
        /// with an open job in another campaign is refused.
        #[arg(long, value_name = "SELECTOR", value_parser = parse_devices_arg)]
        devices: (String, DeviceSelector),
        /// Cumulative share of the devices offered in each wave, rising, ending at 100%
        /// (devices in id order), e.g. 1%,10%,100%: the first 1%, then up to 10%, then all.
        #[arg(long, value_name = "PERCENTS", value_parser = parse_waves_arg, default_value = "1%,10%,100%")]
        waves: Waves,
        /// Stop the campaign (no further wave) once more than this share of the jobs offered so
        /// far failed or rolled back, e.g. 2% or 0.5%; 0% stops at the first failure.
        #[arg(long, value_name = "PERCENT", value_parser = campaign::parse_threshold, default_value = "2%")]
        abort_if_failed: i64,
        /// How long an offer waits in a device's command queue before its job fails as
        /// `expired`, seconds (at most 30 days).
        #[arg(long, value_name = "SECS", default_value_t = 7 * 86_400)]
        offer_ttl: i64,
        /// The broker's `ota_blob_dir` the release must be published in; default HOME/ota-blobs.
        #[arg(long, value_name = "DIR")]
        blob_dir: Option<PathBuf>,
    },
    /// Show campaigns (newest first) and their jobs' states.
    Status {
        /// Only this campaign, with every job.
        #[arg(long, value_name = "ID")]
        campaign: Option<String>,
        /// JSON output (an array of campaigns, each with its jobs).
        #[arg(long)]
        json: bool,
    },
}

/// `--waves`, parsed (one value: clap would read a `Vec` as repeated flags).
#[derive(Debug, Clone)]
struct Waves(Vec<u32>);

fn parse_waves_arg(s: &str) -> Result<Waves, String> {
    campaign::parse_waves(s).map(Waves)
}

/// `--devices`: the text as given and its parse.
fn parse_devices_arg(s: &str) -> Result<(String, DeviceSelector), String> {
    campaign::parse_devices(s).map(|d| (s.to_owned(), d))
}

/// `--reason`: the RFC 5280 names, listed in `--help`.
fn reason_parser() -> impl TypedValueParser<Value = RevocationReason> {
    PossibleValuesParser::new(RevocationReason::ALL.map(RevocationReason::as_str))
        .map(|s| RevocationReason::parse(&s).unwrap_or(RevocationReason::Unspecified))
}

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

/// `--version`, `--min-version`: MAJOR.MINOR.PATCH.
fn parse_version(s: &str) -> Result<Version, String> {
    Version::parse(s).map_err(|e| e.to_string())
}

/// `--board`.
fn parse_board(s: &str) -> Result<Board, String> {
    Board::parse(s).map_err(|e| e.to_string())
}

/// `--max-size`: bytes, or a number with KiB, MiB or GiB (K, M, G mean the same), at most 4 GiB - 1
/// (embassy-boot counts image bytes in a u32).
fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    let n: u64 =
        digits.parse().map_err(|_| "expected a number of bytes, or one with KiB or MiB (e.g. 448KiB)")?;
    let unit: u64 = match unit {
        "" | "B" => 1,
        "K" | "KiB" => 1 << 10,
        "M" | "MiB" => 1 << 20,
        "G" | "GiB" => 1 << 30,
        _ => return Err("the unit is KiB, MiB or GiB (e.g. 448KiB)".into()),
    };
    match n.checked_mul(unit) {
        Some(0) => Err("the size must be at least 1 byte".into()),
        Some(b) if b <= u64::from(u32::MAX) => Ok(b),
        _ => Err("at most 4 GiB - 1: embassy-boot counts image bytes in 32 bits".into()),
    }
}

/// `--status`: `active` or `revoked`.
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
        Error::NoFirmwareKey(_) => "run `fleet-provision firmware-key` first".into(),
        Error::FirmwareKeyOffline(_) => "pass its offline copy with --key FILE".into(),
        Error::FirmwareKeyExists(_) => {
            "devices embed its public half (firmware.pub); sign releases with it (`fleet-provision release`)".into()
        }
        Error::FirmwareKeyMismatch { .. } => {
            "sign with the key `fleet-provision firmware-key` made for this station (or its offline copy)".into()
        }
        Error::Registry(fleet_registry::Error::ReleaseExists { .. }) => {
            "give the new image a new version".into()
        }
        Error::Registry(fleet_registry::Error::SchemaNotCurrent(_)) => {
            "run a `fleet-provision` command (e.g. `fleet-provision list`) against this database as its owner to migrate it".into()
        }
        _ => return None,
    })
}

/// Runs one command and prints its result.
async fn run(cli: Cli) -> anyhow::Result<()> {
    let home = Home::new(&cli.home);
    let db = cli.database_url.as_deref();
    let station = || Station::open(home.clone(), db);
    let json = matches!(
        cli.command,
        Command::List { json: true, .. }
            | Command::Show { json: true, .. }
            | Command::Commands { json: true, .. }
            | Command::Releases { json: true, .. }
            | Command::Ota { command: OtaCommand::Status { json: true, .. } }
    );
    let report: Box<dyn Report> = match cli.command {
        Command::Init { org } => Box::new(commands::init(home.clone(), db, &org).await?),
        Command::ServerCert { dns, ip, out, renew, days } => {
            Box::new(commands::server_cert(station().await?, &dns, &ip, out, renew, days).await?)
        }
        Command::ServiceCert { name, out } => {
            Box::new(commands::service_cert(station().await?, &name, out).await?)
        }
        Command::NodeCert { name, out, stream_reader } => {
            Box::new(commands::node_cert(station().await?, name, out, stream_reader).await?)
        }
        Command::IssuerCert { name, out } => {
            Box::new(commands::issuer_cert(station().await?, &name, out).await?)
        }
        Command::OperatorCert { name, out, p12_password } => {
            Box::new(commands::operator_cert(station().await?, &name, out, p12_password).await?)
        }
        Command::ClaimCert { name, prefix, quota, days, out, broker_host, broker_port } => {
            let opts = ClaimOptions { name, id_prefix: prefix, quota, days, out, broker_host, broker_port };
            Box::new(commands::claim_cert(station().await?, opts).await?)
        }
        Command::Serve { identity, host, port, renew_within, min_interval, grace, tick } => {
            let policy = Policy { renew_within, min_interval, grace };
            Box::new(commands::serve(station().await?, identity, host, port, policy, tick).await?)
        }
        Command::Rotate { device_id, expiring_within, all, by } => {
            let within = if all { None } else { expiring_within };
            Box::new(commands::rotate(station().await?, device_id, within, &by).await?)
        }
        Command::Mint { count, prefix, out, broker_host, broker_port, days, chunk } => {
            let opts = MintOptions { count, prefix, out, broker_host, broker_port, chunk };
            Box::new(commands::mint(station().await?, opts, days).await?)
        }
        Command::SignCsr { csr, device_id, out, days } => {
            Box::new(commands::sign_csr(station().await?, csr, device_id, out, days).await?)
        }
        Command::Rekey { device_id, csr, out, days } => {
            Box::new(commands::rekey(station().await?, &device_id, csr, out, days).await?)
        }
        Command::Renew { device_id, out } => {
            Box::new(commands::renew(station().await?, &device_id, out).await?)
        }
        Command::Revoke { device_id, serial, reason } => {
            Box::new(commands::revoke(station().await?, device_id, serial, reason).await?)
        }
        Command::Crl { out, der, days } => Box::new(commands::crl(station().await?, out, der, days).await?),
        Command::List { status, expiring_within, .. } => {
            Box::new(commands::list(station().await?, status, expiring_within).await?)
        }
        Command::Show { device_id, .. } => Box::new(commands::show(station().await?, &device_id).await?),
        Command::Commands { device_id, limit, .. } => {
            Box::new(commands::commands(station().await?, &device_id, limit).await?)
        }
        Command::FirmwareKey => Box::new(commands::firmware_key(station().await?).await?),
        Command::Release { image, version, board, min_version, max_size, key, out } => {
            let spec = ReleaseSpec { version, min_version, board };
            let opts = ReleaseOptions { image, spec, max_size, key, out };
            Box::new(commands::release(station().await?, opts).await?)
        }
        Command::Releases { board, .. } => Box::new(commands::releases(station().await?, board).await?),
        Command::DbRoles { broker_role, print: true } => Box::new(commands::broker_role_sql(&broker_role)?),
        Command::DbRoles { broker_role, print: false } => {
            Box::new(commands::apply_broker_role(station().await?, broker_role).await?)
        }
        Command::VerifyLog => Box::new(commands::verify_log(station().await?).await?),
        Command::Ota { command: OtaCommand::Publish { release, dir, blob_dir } } => {
            let blob_dir = blob_dir.unwrap_or_else(|| home.ota_blobs());
            Box::new(commands::ota_publish(station().await?, release, dir, &blob_dir).await?)
        }
        Command::Ota {
            command:
                OtaCommand::Start {
                    release,
                    devices: (devices_text, devices),
                    waves,
                    abort_if_failed,
                    offer_ttl,
                    blob_dir,
                },
        } => {
            let blob_dir = blob_dir.unwrap_or_else(|| home.ota_blobs());
            let opts = CampaignOptions {
                release,
                devices_text,
                devices,
                waves: waves.0,
                abort_bp: abort_if_failed,
                offer_ttl,
                blob_dir,
            };
            Box::new(commands::ota_start(station().await?, opts).await?)
        }
        Command::Ota { command: OtaCommand::Status { campaign, .. } } => {
            Box::new(commands::ota_status(station().await?, campaign.as_deref()).await?)
        }
    };
    emit(report.as_ref(), json)
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
            if let Some(d) = e.downcast_ref::<commands::LogDisagrees>() {
                for row in &d.0.disagreements {
                    eprintln!("  {row}");
                }
            }
            match hint(&e) {
                Some(h) => eprintln!("error: {}; {h}", fleet_registry::report(e.as_ref())),
                None => eprintln!("error: {}", fleet_registry::report(e.as_ref())),
            }
            ExitCode::FAILURE
        }
    }
}
