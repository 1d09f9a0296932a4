//! What each command prints: one value per command, printed here and nowhere else, as text and
//! (`list`, `show`, `commands`) as `--json`. The values come from [`super::commands`].
//!
//! The text and the JSON are an interface: scripts and the README (executed by
//! `tests/tests/readme.rs`) read them, so a change here is a change for users. JSON objects are
//! `serde_json::Value`s, whose keys print sorted.

use std::io::{self, Write};
use std::path::PathBuf;

use fleet_provision::firmware::{Manifest, MANIFEST_LEN};
use fleet_provision::issuer::Counts;
use fleet_provision::ota::{manifest_json, FirmwareKeyMade, SignedRelease};
use fleet_provision::pki::IssuedCert;
use fleet_provision::station::{CrlOutput, DeviceReport, MintedDevice};
use fleet_provision::{DeviceId, RevocationReason, SerialNumber};
use fleet_registry::{Command, Home, ListedIdentity, LogReport, ReleaseFiles, ReleaseRecord};
use serde_json::{json, Value};

/// A command's result, ready to print.
pub(crate) trait Report {
    /// The text a person reads (stdout).
    fn text(&self, out: &mut dyn Write) -> io::Result<()>;

    /// The `--json` form, for the commands that have one.
    fn json(&self) -> Option<Value> {
        None
    }
}

/// Prints `report` on stdout, as JSON when `json` is set (and the report has a JSON form). A
/// closed stdout (piped into `head`) ends the process quietly instead of failing.
pub(crate) fn emit(report: &dyn Report, json: bool) -> anyhow::Result<()> {
    let mut text = Vec::new();
    match report.json().filter(|_| json) {
        Some(v) => writeln!(text, "{}", serde_json::to_string_pretty(&v)?)?,
        None => report.text(&mut text)?,
    }
    let mut stdout = io::stdout().lock();
    if let Err(e) = stdout.write_all(&text).and_then(|()| stdout.flush()) {
        if e.kind() == io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
    }
    Ok(())
}

/// RFC 3339 UTC, or the raw number if it is out of range.
pub(crate) fn fmt_time(t: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(t)
        .ok()
        .and_then(|d| d.format(&time::format_description::well_known::Rfc3339).ok())
        .unwrap_or_else(|| t.to_string())
}

/// `init`.
#[derive(Debug)]
pub(crate) struct Initialised {
    pub(crate) home: Home,
}

impl Report for Initialised {
    fn text(&self, out: &mut dyn Write) -> io::Result<()> {
        let h = &self.home;
        writeln!(out, "initialised fleet home {}", h.root().display())?;
        writeln!(
            out,
            "  root CA         {}  (move {} offline)",
            h.root_ca().display(),
            h.root_ca_key().display()
        )?;
        writeln!(out, "  device CA       {}", h.device_ca().display())?;
        writeln!(out, "  server CA       {}", h.server_ca().display())?;
        writeln!(out, "  CRL             {}", h.crl().display())?;
        writeln!(
            out,
            "next: fleet-provision server-cert --dns <broker host>   (writes {}, where fleet-broker looks)",
            h.broker_tls().dir().display()
        )
    }
}

/// `server-cert`.
#[derive(Debug)]
pub(crate) struct ServerCert {
    pub(crate) dir: PathBuf,
    pub(crate) cert: IssuedCert,
}

impl Report for ServerCert {
    fn text(&self, out: &mut dyn Write) -> io::Result<()> {
        writeln!(
            out,
            "server certificate {} (serial {}) valid until {}",
            self.dir.display(),
            self.cert.serial,
            fmt_time(self.cert.not_after)
        )
    }
}

/// `service-cert`, `issuer-cert`: a client identity of a role.
#[derive(Debug)]
pub(crate) struct RoleIdentity {
    /// "service", "issuer".
    pub(crate) kind: &'static str,
    pub(crate) identity: MintedDevice,
}

impl Report for RoleIdentity {
    fn text(&self, out: &mut dyn Write) -> io::Result<()> {
        let d = &self.identity;
        writeln!(out, "{} identity {} (serial {}) in {}", self.kind, d.device_id, d.serial, d.dir.display())
    }
}

/// `node-cert`.
#[derive(Debug)]
pub(crate) struct NodeIdentity {
    pub(crate) name: String,
    pub(crate) stream_reader: bool,
    pub(crate) dir: PathBuf,
    pub(crate) cert: IssuedCert,
}

impl Report for NodeIdentity {
    fn text(&self, out: &mut dyn Write) -> io::Result<()> {
        let what = if self.stream_reader { "stream reader" } else { "node" };
        writeln!(
            out,
            "cluster-bus {what} identity {} (serial {}) in {}, valid until {}",
            self.name,
            self.cert.serial,
            self.dir.display(),
            fmt_time(self.cert.not_after)
        )
    }
}

/// `operator-cert`.
#[derive(Debug)]
pub(crate) struct OperatorIdentity {
    pub(crate) identity: MintedDevice,
    /// The PKCS#12 password was made here and written to `p12-password`.
    pub(crate) password_made: bool,
}

impl Report for OperatorIdentity {
    fn text(&self, out: &mut dyn Write) -> io::Result<()> {
        let d = &self.identity;
        writeln!(out, "operator identity {} (serial {}) in {}", d.device_id, d.serial, d.dir.display())?;
        writeln!(
            out,
            "  browsers: import {}/operator.p12 (password {})",
            d.dir.display(),
            if self.password_made { "in p12-password" } else { "as given" }
        )
    }
}

/// `claim-cert`.
#[derive(Debug)]
pub(crate) struct ClaimIdentity {
    pub(crate) identity: MintedDevice,
    pub(crate) quota: i64,
    pub(crate) id_prefix: String,
}

impl Report for ClaimIdentity {
    fn text(&self, out: &mut dyn Write) -> io::Result<()> {
        let d = &self.identity;
        writeln!(
            out,
            "claim identity {} (serial {}, quota {}, devices {}-...) in {}",
            d.device_id,
            d.serial,
            self.quota,
            self.id_prefix,
            d.dir.display()
        )
    }
}

/// `serve`, once it stopped.
#[derive(Debug)]
pub(crate) struct IssuerStopped(pub(crate) Counts);

impl Report for IssuerStopped {
    fn text(&self, out: &mut dyn Write) -> io::Result<()> {
        let c = &self.0;
        writeln!(
            out,
            "issuer stopped: {} issued, {} rejected, {} superseded",
            c.issued, c.rejected, c.superseded
        )
    }
}

/// `rotate`: how many devices were asked to rotate.
#[derive(Debug)]
pub(crate) struct RotationRequested(pub(crate) usize);

impl Report for RotationRequested {
    fn text(&self, out: &mut dyn Write) -> io::Result<()> {
        writeln!(
            out,
            "rotation requested for {} device(s); the issuer (fleet-provision serve) asks each to rotate",
            self.0
        )
    }
}

/// `mint`.
#[derive(Debug)]
pub(crate) struct Minted {
    pub(crate) devices: Vec<MintedDevice>,
    pub(crate) dir: PathBuf,
}

impl Minted {
    /// Devices named one per line; the rest are counted.
    const SHOWN: usize = 20;
}

impl Report for Minted {
    fn text(&self, out: &mut dyn Write) -> io::Result<()> {
        for d in self.devices.iter().take(Self::SHOWN) {
            writeln!(out, "{}  serial {}", d.device_id, d.serial)?;
        }
        if self.devices.len() > Self::SHOWN {
            writeln!(out, "... and {} more", self.devices.len() - Self::SHOWN)?;
        }
        writeln!(out, "minted {} device identities into {}", self.devices.len(), self.dir.display())
    }
}

/// `sign-csr`.
#[derive(Debug)]
pub(crate) struct CsrSigned {
    pub(crate) cert: IssuedCert,
    pub(crate) file: PathBuf,
}

impl Report for CsrSigned {
    fn text(&self, out: &mut dyn Write) -> io::Result<()> {
        let c = &self.cert;
        writeln!(
            out,
            "issued serial {} valid until {} -> {}",
            c.serial,
            fmt_time(c.not_after),
            self.file.display()
        )
    }
}

/// A CRL written into the home after a revocation.
#[derive(Debug)]
pub(crate) struct CrlInHome {
    pub(crate) crl: CrlOutput,
    pub(crate) file: PathBuf,
}

impl CrlInHome {
    fn text(&self, out: &mut dyn Write) -> io::Result<()> {
        writeln!(
            out,
            "CRL #{} with {} entries written to {}",
            self.crl.number,
            self.crl.revoked,
            self.file.display()
        )
    }
}

/// `rekey`.
#[derive(Debug)]
pub(crate) struct Rekeyed {
    pub(crate) device_id: DeviceId,
    pub(crate) cert: IssuedCert,
    pub(crate) file: PathBuf,
    pub(crate) superseded: Vec<SerialNumber>,
    pub(crate) crl: CrlInHome,
}

impl Report for Rekeyed {
    fn text(&self, out: &mut dyn Write) -> io::Result<()> {
        let c = &self.cert;
        writeln!(
            out,
            "re-keyed {}: serial {} valid until {} -> {}",
            self.device_id,
            c.serial,
            fmt_time(c.not_after),
            self.file.display()
        )?;
        for sn in &self.superseded {
            writeln!(out, "  revoked (superseded) serial {sn}")?;
        }
        self.crl.text(out)
    }
}

/// `renew`: into a file, or the PEM itself.
#[derive(Debug)]
pub(crate) struct Renewed {
    pub(crate) device_id: DeviceId,
    pub(crate) cert: IssuedCert,
    pub(crate) file: Option<PathBuf>,
}

impl Report for Renewed {
    fn text(&self, out: &mut dyn Write) -> io::Result<()> {
        let c = &self.cert;
        match &self.file {
            Some(file) => writeln!(
                out,
                "renewed {}: serial {} valid until {} -> {}",
                self.device_id,
                c.serial,
                fmt_time(c.not_after),
                file.display()
            ),
            None => write!(out, "{}", c.pem),
        }
    }
}

/// What `revoke` revoked.
#[derive(Debug)]
pub(crate) enum Revoked {
    /// A device and every certificate it had active.
    Device { device_id: DeviceId, serials: Vec<SerialNumber> },
    /// One certificate (`serial` as given: hex, maybe with colons or 0x), of `owner`.
    Certificate { serial: String, owner: DeviceId },
}

/// `revoke`.
#[derive(Debug)]
pub(crate) struct Revocation {
    pub(crate) revoked: Revoked,
    pub(crate) reason: RevocationReason,
    pub(crate) crl: CrlInHome,
}

impl Report for Revocation {
    fn text(&self, out: &mut dyn Write) -> io::Result<()> {
        let reason = self.reason.as_str();
        match &self.revoked {
            Revoked::Device { device_id, serials } => {
                writeln!(out, "revoked device {device_id} ({reason}): {} certificate(s)", serials.len())?;
                for sn in serials {
                    writeln!(out, "  serial {sn}")?;
                }
            }
            Revoked::Certificate { serial, owner } => {
                writeln!(out, "revoked certificate {serial} of {owner} ({reason})")?;
            }
        }
        self.crl.text(out)
    }
}

/// `crl`.
#[derive(Debug)]
pub(crate) struct CrlSigned {
    pub(crate) crl: CrlOutput,
    pub(crate) file: PathBuf,
}

impl Report for CrlSigned {
    fn text(&self, out: &mut dyn Write) -> io::Result<()> {
        writeln!(
            out,
            "CRL #{} with {} revoked certificate(s) -> {}",
            self.crl.number,
            self.crl.revoked,
            self.file.display()
        )
    }
}

/// `list`.
#[derive(Debug)]
pub(crate) struct Listing(pub(crate) Vec<ListedIdentity>);

impl Report for Listing {
    fn text(&self, out: &mut dyn Write) -> io::Result<()> {
        writeln!(out, "{:<40} {:<8} {:<8} {:<34} EXPIRES", "DEVICE", "ROLE", "STATUS", "SERIAL")?;
        for l in &self.0 {
            let (serial, expires) =
                l.newest.as_ref().map_or((String::new(), String::new()), |(s, t)| (s.to_hex(), fmt_time(*t)));
            let d = &l.device;
            writeln!(
                out,
                "{:<40} {:<8} {:<8} {:<34} {}",
                d.device_id,
                d.role.as_str(),
                d.status.as_str(),
                serial,
                expires
            )?;
        }
        writeln!(out, "{} identities", self.0.len())
    }

    fn json(&self) -> Option<Value> {
        let rows = self.0.iter().map(|l| {
            json!({
                "device_id": l.device.device_id.as_str(),
                "role": l.device.role.as_str(),
                "status": l.device.status.as_str(),
                "serial": l.newest.as_ref().map(|(s, _)| s.to_hex()),
                "not_after": l.newest.as_ref().map(|(_, t)| fmt_time(*t)),
            })
        });
        Some(Value::Array(rows.collect()))
    }
}

/// `show`.
#[derive(Debug)]
pub(crate) struct Shown(pub(crate) DeviceReport);

impl Report for Shown {
    fn text(&self, out: &mut dyn Write) -> io::Result<()> {
        let d = &self.0.device;
        writeln!(out, "device   {}", d.device_id)?;
        writeln!(out, "role     {}", d.role.as_str())?;
        writeln!(out, "status   {}", d.status.as_str())?;
        writeln!(out, "created  {}", fmt_time(d.created_at))?;
        for c in &self.0.certificates {
            writeln!(
                out,
                "cert     {}  {}  {} .. {}  key:{}{}",
                c.serial,
                c.status.as_str(),
                fmt_time(c.not_before),
                fmt_time(c.not_after),
                c.key_source,
                c.revocation_reason.as_deref().map(|r| format!("  reason:{r}")).unwrap_or_default()
            )?;
        }
        Ok(())
    }

    fn json(&self) -> Option<Value> {
        let DeviceReport { device: d, certificates } = &self.0;
        let certs: Vec<_> = certificates
            .iter()
            .map(|c| {
                json!({
                    "serial": c.serial.to_hex(), "status": c.status.as_str(), "key_source": c.key_source,
                    "not_before": fmt_time(c.not_before), "not_after": fmt_time(c.not_after),
                    "revocation_reason": c.revocation_reason,
                })
            })
            .collect();
        Some(json!({
            "device_id": d.device_id.as_str(), "role": d.role.as_str(),
            "status": d.status.as_str(), "created_at": fmt_time(d.created_at),
            "certificates": certs,
        }))
    }
}

/// `commands`.
#[derive(Debug)]
pub(crate) struct Commands(pub(crate) Vec<Command>);

/// Command times are unix milliseconds.
fn fmt_ms(t: i64) -> String {
    fmt_time(t.div_euclid(1000))
}

impl Report for Commands {
    fn text(&self, out: &mut dyn Write) -> io::Result<()> {
        for c in &self.0 {
            writeln!(
                out,
                "{:>8}  {:<12}  {:<24}  sent {}  expires {}  attempts {}  from {}  {} bytes",
                c.id,
                c.status.as_str(),
                c.name,
                fmt_ms(c.created_at),
                fmt_ms(c.expires_at),
                c.attempts,
                c.sender,
                c.payload.len()
            )?;
        }
        writeln!(out, "{} commands", self.0.len())
    }

    fn json(&self) -> Option<Value> {
        let rows = self.0.iter().map(|c| {
            let payload = match std::str::from_utf8(&c.payload) {
                Ok(t) => json!({ "text": t }),
                Err(_) => json!({ "hex": hex::encode(&c.payload) }),
            };
            json!({
                "id": c.id, "name": c.name, "status": c.status.as_str(), "sender": c.sender,
                "created_at": fmt_ms(c.created_at), "expires_at": fmt_ms(c.expires_at),
                "attempts": c.attempts, "payload": payload,
            })
        });
        Some(Value::Array(rows.collect()))
    }
}

/// `db-roles`: the SQL (`--print`) or the role it was applied for.
#[derive(Debug)]
pub(crate) enum BrokerRole {
    Sql(Vec<String>),
    Applied(String),
}

impl Report for BrokerRole {
    fn text(&self, out: &mut dyn Write) -> io::Result<()> {
        match self {
            BrokerRole::Sql(statements) => {
                for stmt in statements {
                    writeln!(out, "{stmt};")?;
                }
                Ok(())
            }
            BrokerRole::Applied(role) => writeln!(
                out,
                "role {role}: SELECT on devices, certificates; INSERT on telemetry; the command queue; nothing else"
            ),
        }
    }
}

/// `verify-log`, when the log and the registry agree (else the command fails with
/// [`super::commands::LogDisagrees`]).
#[derive(Debug)]
pub(crate) struct LogVerified(pub(crate) LogReport);

impl Report for LogVerified {
    fn text(&self, out: &mut dyn Write) -> io::Result<()> {
        writeln!(out, "issuance log OK: {} entries, head {}", self.0.entries, self.0.head)
    }
}

/// `firmware-key`.
#[derive(Debug)]
pub(crate) struct FirmwareKey(pub(crate) FirmwareKeyMade);

impl Report for FirmwareKey {
    fn text(&self, out: &mut dyn Write) -> io::Result<()> {
        let k = &self.0;
        writeln!(out, "firmware signing key (Ed25519) created, key id {}", k.public.key_id_hex())?;
        writeln!(
            out,
            "  private key     {}  (mode 0600: move it offline; sign with `release --key FILE`)",
            k.key.display()
        )?;
        writeln!(out, "  public key      {}  (32 bytes: embed them in the firmware)", k.raw.display())?;
        writeln!(out, "  public key PEM  {}  (for openssl)", k.pem.display())?;
        writeln!(out, "  public key hex  {}", hex::encode(k.public.as_bytes()))?;
        writeln!(out, "next: fleet-provision release --image app.bin --version 1.0.0 --board <board>")
    }
}

/// `release`.
#[derive(Debug)]
pub(crate) struct Released {
    pub(crate) release: SignedRelease,
    /// `HOME/firmware.pub.pem`, for the openssl line.
    pub(crate) public_pem: PathBuf,
}

impl Report for Released {
    fn text(&self, out: &mut dyn Write) -> io::Result<()> {
        let r = &self.release;
        let m = &r.manifest;
        if r.again {
            writeln!(
                out,
                "release {} {} was recorded at {} with these bytes; its files are written again",
                m.board,
                m.version,
                fmt_time(r.created_at)
            )?;
        } else {
            writeln!(out, "released {} {} (signed by key {})", m.board, m.version, hex::encode(m.key_id))?;
        }
        writeln!(out, "  directory       {}", r.dir.display())?;
        writeln!(out, "  image           {} bytes, SHA-512 {}", m.image_size, hex::encode(m.image_sha512))?;
        writeln!(out, "  min version     {}", m.min_version)?;
        writeln!(
            out,
            "  manifest        {} ({MANIFEST_LEN} bytes: what a device is offered)",
            r.dir.join(ReleaseFiles::MANIFEST).display()
        )?;
        writeln!(
            out,
            "check: openssl pkeyutl -verify -pubin -inkey {} -rawin -in {} -sigfile {}",
            self.public_pem.display(),
            r.dir.join(ReleaseFiles::DIGEST).display(),
            r.dir.join(ReleaseFiles::SIGNATURE).display()
        )
    }
}

/// `releases`.
#[derive(Debug)]
pub(crate) struct Releases(pub(crate) Vec<ReleaseRecord>);

impl Report for Releases {
    fn text(&self, out: &mut dyn Write) -> io::Result<()> {
        writeln!(
            out,
            "{:<32} {:<14} {:<14} {:>10} {:<16} {:<20} SHA-512",
            "BOARD", "VERSION", "MIN VERSION", "BYTES", "KEY", "RECORDED"
        )?;
        for r in &self.0 {
            let n = &r.release;
            writeln!(
                out,
                "{:<32} {:<14} {:<14} {:>10} {:<16} {:<20} {}…",
                n.board,
                n.version,
                n.min_version,
                n.size,
                n.key_id,
                fmt_time(r.created_at),
                n.sha512.get(..16).unwrap_or(&n.sha512)
            )?;
        }
        writeln!(out, "{} releases", self.0.len())
    }

    fn json(&self) -> Option<Value> {
        let rows = self.0.iter().map(|r| match Manifest::decode(&r.release.manifest) {
            Ok(m) => manifest_json(&m, r.created_at),
            // A row whose manifest does not decode: its columns, said to be unreadable.
            Err(e) => json!({
                "board": r.release.board, "version": r.release.version, "created_at": r.created_at,
                "manifest_error": e.to_string(),
            }),
        });
        Some(Value::Array(rows.collect()))
    }
}

/// `ota publish`.
#[derive(Debug)]
pub(crate) struct OtaPublished(pub(crate) fleet_provision::campaign::Published);

impl Report for OtaPublished {
    fn text(&self, out: &mut dyn Write) -> io::Result<()> {
        let p = &self.0;
        let what = if p.already { "already published" } else { "published" };
        writeln!(out, "{what} {} ({} bytes, sha512 {}…)", p.release, p.size, &p.sha512[..16])?;
        writeln!(out, "  blob  {}", p.blob.display())?;
        writeln!(
            out,
            "next: fleet-provision ota start --release {} --devices prefix:<id prefix> --waves 1%,10%,100% --abort-if-failed 2%",
            p.release
        )
    }
}

/// `ota start` and `ota status`: campaigns with their jobs.
#[derive(Debug)]
pub(crate) struct Campaigns {
    pub(crate) list: Vec<(fleet_registry::Campaign, Vec<fleet_registry::Job>)>,
    /// Just started (`ota start`).
    pub(crate) started: bool,
    /// One campaign asked for: list every job.
    pub(crate) detail: bool,
}

/// Jobs by state, in the order of the update.
fn job_counts(jobs: &[fleet_registry::Job]) -> Vec<(&'static str, usize)> {
    fleet_registry::JobState::ALL
        .into_iter()
        .map(|s| (s.as_str(), jobs.iter().filter(|j| j.state == s).count()))
        .filter(|(_, n)| *n > 0)
        .collect()
}

impl Report for Campaigns {
    fn text(&self, out: &mut dyn Write) -> io::Result<()> {
        if self.list.is_empty() {
            return writeln!(out, "no campaigns");
        }
        for (c, jobs) in &self.list {
            let waves = c.waves.iter().map(|w| format!("{w}%")).collect::<Vec<_>>().join(",");
            let head = if self.started { "started campaign" } else { "campaign" };
            writeln!(out, "{head} {}  {}/{}  {}", c.id, c.board, c.version, c.state)?;
            writeln!(
                out,
                "  waves {waves}, wave {} of {} offered; stops past {}.{:02}% failed; devices {}",
                c.wave + 1,
                c.waves.len(),
                c.abort_bp / 100,
                c.abort_bp % 100,
                c.devices
            )?;
            if let Some(r) = &c.reason {
                writeln!(out, "  stopped: {r}")?;
            }
            let counts =
                job_counts(jobs).iter().map(|(s, n)| format!("{s} {n}")).collect::<Vec<_>>().join(", ");
            writeln!(out, "  {} jobs: {counts}", jobs.len())?;
            if self.detail {
                for j in jobs {
                    let progress = match j.state {
                        fleet_registry::JobState::Downloading if j.size > 0 => {
                            format!(" {}%", j.progress * 100 / j.size)
                        }
                        _ => String::new(),
                    };
                    let reason = j.reason.as_deref().map(|r| format!(" ({r})")).unwrap_or_default();
                    writeln!(
                        out,
                        "  {:<24} wave {}  {}{progress}{reason}",
                        j.device_id,
                        j.wave + 1,
                        j.state.as_str()
                    )?;
                }
            }
        }
        Ok(())
    }

    fn json(&self) -> Option<Value> {
        let list = self
            .list
            .iter()
            .map(|(c, jobs)| {
                let mut v = serde_json::to_value(c).unwrap_or(Value::Null);
                v["jobs"] = serde_json::to_value(jobs).unwrap_or(Value::Null);
                v["counts"] = job_counts(jobs).into_iter().map(|(s, n)| (s.to_owned(), json!(n))).collect();
                v
            })
            .collect();
        Some(Value::Array(list))
    }
}
