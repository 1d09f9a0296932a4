//! One handler per command: calls the library, does the command's own file and terminal I/O
//! (reading a CSR, writing a certificate, the progress bar, a made-up PKCS#12 password), and
//! returns what happened as a [`super::report`] value. Nothing here prints a result.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use fleet_provision::campaign::{CampaignOptions, ReleaseRef};
use fleet_provision::firmware::Board;
use fleet_provision::home::{self, Home};
use fleet_provision::issuer::IssuerConfig;
use fleet_provision::lifecycle::{ClaimOptions, Policy};
use fleet_provision::ota::ReleaseOptions;
use fleet_provision::station::{MintOptions, Station};
use fleet_provision::{DeviceId, RevocationReason, SerialNumber, Status};
use fleet_registry::{LogReport, Registry};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use super::report::{
    BrokerRole, Campaigns, ClaimIdentity, Commands, CrlInHome, CrlSigned, CsrSigned, FirmwareKey,
    Initialised, IssuerStopped, Listing, LogVerified, Minted, NodeIdentity, OperatorIdentity, OtaPublished,
    Rekeyed, Released, Releases, Renewed, Revocation, Revoked, RoleIdentity, RotationRequested, ServerCert,
    Shown,
};

/// `init`.
pub(crate) async fn init(home: Home, db: Option<&str>, org: &str) -> anyhow::Result<Initialised> {
    let s = Station::init(home, org, db).await?;
    Ok(Initialised { home: s.home().clone() })
}

/// `server-cert`: a new broker certificate, or `renew` the one in `out`.
pub(crate) async fn server_cert(
    mut s: Station,
    dns: &[String],
    ips: &[IpAddr],
    out: Option<PathBuf>,
    renew: bool,
    days: i64,
) -> anyhow::Result<ServerCert> {
    s.set_server_lifetime(days)?;
    let dir = out.unwrap_or_else(|| s.home().broker_tls().dir().to_path_buf());
    let cert = if renew {
        s.renew_server_cert(dns, ips, &dir).await?
    } else {
        s.server_cert(dns, ips, &dir).await?
    };
    Ok(ServerCert { dir, cert })
}

/// `service-cert`.
pub(crate) async fn service_cert(s: Station, name: &str, out: PathBuf) -> anyhow::Result<RoleIdentity> {
    Ok(RoleIdentity { kind: "service", identity: s.service_cert(name, &out).await? })
}

/// `issuer-cert`.
pub(crate) async fn issuer_cert(s: Station, name: &str, out: PathBuf) -> anyhow::Result<RoleIdentity> {
    Ok(RoleIdentity { kind: "issuer", identity: s.issuer_cert(name, &out).await? })
}

/// `node-cert`.
pub(crate) async fn node_cert(
    s: Station,
    name: String,
    out: PathBuf,
    stream_reader: bool,
) -> anyhow::Result<NodeIdentity> {
    let cert = s.node_cert(&name, stream_reader, &out).await?;
    Ok(NodeIdentity { name, stream_reader, dir: out, cert })
}

/// `operator-cert`: without a password, makes one and writes it to `DIR/p12-password`.
pub(crate) async fn operator_cert(
    s: Station,
    name: &str,
    out: PathBuf,
    p12_password: Option<String>,
) -> anyhow::Result<OperatorIdentity> {
    let (password, made) = match p12_password {
        Some(p) => (p, false),
        None => (hex::encode(rand::random::<[u8; 12]>()), true),
    };
    let identity = s.operator_cert(name, &out, &password).await?;
    if made {
        home::write_new(&identity.dir.join("p12-password"), password.as_bytes(), true)?;
    }
    Ok(OperatorIdentity { identity, password_made: made })
}

/// `claim-cert`.
pub(crate) async fn claim_cert(s: Station, opts: ClaimOptions) -> anyhow::Result<ClaimIdentity> {
    let identity = s.claim_cert(&opts).await?;
    Ok(ClaimIdentity { identity, quota: opts.quota, id_prefix: opts.id_prefix })
}

/// `serve`: runs the online issuer until Ctrl-C or SIGTERM.
pub(crate) async fn serve(
    s: Station,
    identity: PathBuf,
    host: String,
    port: u16,
    policy: Policy,
    tick: i64,
) -> anyhow::Result<IssuerStopped> {
    let tick = std::time::Duration::from_secs(tick.max(1) as u64);
    let cfg = IssuerConfig { identity, host, port, policy, tick };
    Ok(IssuerStopped(fleet_provision::issuer::serve(s, cfg, shutdown_signal()).await?))
}

/// `rotate`: one device, the devices expiring within a window, or (`None`) every device.
pub(crate) async fn rotate(
    s: Station,
    device_id: Option<String>,
    expiring_within: Option<i64>,
    by: &str,
) -> anyhow::Result<RotationRequested> {
    let ids = match device_id {
        Some(id) => vec![DeviceId::parse(&id)?],
        None => s.devices_to_rotate(expiring_within).await?,
    };
    Ok(RotationRequested(s.request_rotation(&ids, by).await?))
}

/// `mint`, with a progress bar on stderr for batches of 50 or more.
pub(crate) async fn mint(mut s: Station, opts: MintOptions, days: i64) -> anyhow::Result<Minted> {
    s.set_client_lifetime(days)?;
    let bar = ProgressBar::new(opts.count as u64);
    bar.set_style(
        ProgressStyle::with_template("{spinner} minting [{bar:40}] {pos}/{len} {per_sec} eta {eta}")
            .context("progress template")?
            .progress_chars("=> "),
    );
    if opts.count < 50 {
        bar.set_draw_target(ProgressDrawTarget::hidden());
    }
    let devices = s.mint(&opts, &|n| bar.inc(n)).await?;
    bar.finish_and_clear();
    Ok(Minted { devices, dir: opts.out })
}

fn read_csr(csr: &Path) -> anyhow::Result<Vec<u8>> {
    std::fs::read(csr).with_context(|| format!("reading {}", csr.display()))
}

/// `sign-csr`.
pub(crate) async fn sign_csr(
    mut s: Station,
    csr: PathBuf,
    device_id: Option<String>,
    out: PathBuf,
    days: i64,
) -> anyhow::Result<CsrSigned> {
    s.set_client_lifetime(days)?;
    let cert = s.sign_csr(&read_csr(&csr)?, device_id.as_deref()).await?;
    home::write_new(&out, cert.pem.as_bytes(), false)?;
    Ok(CsrSigned { cert, file: out })
}

/// `rekey`.
pub(crate) async fn rekey(
    mut s: Station,
    device_id: &str,
    csr: PathBuf,
    out: PathBuf,
    days: i64,
) -> anyhow::Result<Rekeyed> {
    s.set_client_lifetime(days)?;
    let bytes = read_csr(&csr)?;
    let device_id = DeviceId::parse(device_id)?;
    let (cert, superseded, crl) = s.rekey(&device_id, &bytes).await?;
    home::write_new(&out, cert.pem.as_bytes(), false)?;
    let crl = CrlInHome { crl, file: s.home().crl() };
    Ok(Rekeyed { device_id, cert, file: out, superseded, crl })
}

/// `renew`: into `out`, or (`None`) printed.
pub(crate) async fn renew(s: Station, device_id: &str, out: Option<PathBuf>) -> anyhow::Result<Renewed> {
    let device_id = DeviceId::parse(device_id)?;
    let cert = s.renew(&device_id).await?;
    if let Some(out) = &out {
        home::write_new(out, cert.pem.as_bytes(), false)?;
    }
    Ok(Renewed { device_id, cert, file: out })
}

/// `revoke`: a device, or one certificate by serial; then a fresh CRL in the home.
pub(crate) async fn revoke(
    s: Station,
    device_id: Option<String>,
    serial: Option<String>,
    reason: RevocationReason,
) -> anyhow::Result<Revocation> {
    let (revoked, crl) = match (device_id, serial) {
        (Some(id), _) => {
            let device_id = DeviceId::parse(&id)?;
            let (serials, crl) = s.revoke_device(&device_id, reason).await?;
            (Revoked::Device { device_id, serials }, crl)
        }
        (None, Some(sn)) => {
            let (owner, crl) = s.revoke_serial(&SerialNumber::parse(&sn)?, reason).await?;
            (Revoked::Certificate { serial: sn, owner }, crl)
        }
        (None, None) => anyhow::bail!("give a DEVICE_ID or --serial"),
    };
    Ok(Revocation { revoked, reason, crl: CrlInHome { crl, file: s.home().crl() } })
}

/// `crl`: signs a CRL into `out` (PEM, or DER with `der`).
pub(crate) async fn crl(s: Station, out: PathBuf, der: bool, days: i64) -> anyhow::Result<CrlSigned> {
    let crl = s.crl(Some(days)).await?;
    let bytes = if der { crl.der.clone() } else { crl.pem.clone().into_bytes() };
    home::write_replace(&out, &bytes)?;
    Ok(CrlSigned { crl, file: out })
}

/// `list`.
pub(crate) async fn list(
    s: Station,
    status: Option<Status>,
    expiring_within: Option<i64>,
) -> anyhow::Result<Listing> {
    Ok(Listing(s.list(status, expiring_within).await?))
}

/// `show`.
pub(crate) async fn show(s: Station, device_id: &str) -> anyhow::Result<Shown> {
    Ok(Shown(s.show(&DeviceId::parse(device_id)?).await?))
}

/// `commands`.
pub(crate) async fn commands(s: Station, device_id: &str, limit: i64) -> anyhow::Result<Commands> {
    Ok(Commands(s.commands(&DeviceId::parse(device_id)?, limit).await?))
}

/// `db-roles --print`: the SQL, without a station.
pub(crate) fn broker_role_sql(role: &str) -> anyhow::Result<BrokerRole> {
    Ok(BrokerRole::Sql(Registry::broker_role_sql(role)?))
}

/// `db-roles`: grants the broker role in the station's PostgreSQL registry.
pub(crate) async fn apply_broker_role(s: Station, role: String) -> anyhow::Result<BrokerRole> {
    s.registry().apply_broker_role(&role).await?;
    Ok(BrokerRole::Applied(role))
}

/// `verify-log` found registry rows that disagree with an intact hash chain.
#[derive(Debug)]
pub(crate) struct LogDisagrees(pub(crate) LogReport);

impl std::fmt::Display for LogDisagrees {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "issuance log verification failed: the hash chain of {} entries is intact, but {} registry \
             row(s) disagree with it (edited outside fleet-provision?)",
            self.0.entries,
            self.0.disagreements.len()
        )
    }
}

impl std::error::Error for LogDisagrees {}

/// `verify-log`: fails with [`LogDisagrees`] if any registry row disagrees with the log.
pub(crate) async fn verify_log(s: Station) -> anyhow::Result<LogVerified> {
    let r = s.verify_log().await?;
    if !r.disagreements.is_empty() {
        return Err(LogDisagrees(r).into());
    }
    Ok(LogVerified(r))
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

/// `firmware-key`.
pub(crate) async fn firmware_key(s: Station) -> anyhow::Result<FirmwareKey> {
    Ok(FirmwareKey(s.firmware_key().await?))
}

/// `release`.
pub(crate) async fn release(s: Station, opts: ReleaseOptions) -> anyhow::Result<Released> {
    let release = s.release(&opts).await?;
    Ok(Released { release, public_pem: s.home().firmware_pub_pem() })
}

/// `releases`.
pub(crate) async fn releases(s: Station, board: Option<Board>) -> anyhow::Result<Releases> {
    Ok(Releases(s.releases(board.as_ref()).await?))
}

/// `ota publish`.
pub(crate) async fn ota_publish(
    s: Station,
    release: ReleaseRef,
    dir: Option<PathBuf>,
    blob_dir: &std::path::Path,
) -> anyhow::Result<OtaPublished> {
    Ok(OtaPublished(s.publish_release(release, dir, blob_dir).await?))
}

/// `ota start`.
pub(crate) async fn ota_start(s: Station, opts: CampaignOptions) -> anyhow::Result<Campaigns> {
    let c = s.start_campaign(&opts).await?;
    let jobs = s.registry().ota_jobs(&c.id).await?;
    Ok(Campaigns { list: vec![(c, jobs)], started: true, detail: false })
}

/// `ota status`.
pub(crate) async fn ota_status(s: Station, id: Option<&str>) -> anyhow::Result<Campaigns> {
    Ok(Campaigns { list: s.campaigns(id).await?, started: false, detail: id.is_some() })
}
