//! Certificates for keys born on the device, after manufacture (docs/spec/rotation.md):
//! rotation of an existing device's certificate from its own CSR, under a policy; claim
//! identities and the device identities they mint at first boot; operator-forced rotation.
//!
//! Each decision returns either the certificate or a [`Rejected`] reason that is sent back to
//! the device as is: the issuer never answers with a certificate it did not record.

use std::path::{Path, PathBuf};

use fleet_registry::{expiry, DeviceId, ExpiryWindow, IdentityFiles, Role, SerialNumber, Status};
use time::Duration;

use crate::error::{Error, Result};
use crate::home;
use crate::pki::{self, DeviceKey, IssuedCert};
use crate::station::{csr_identity, new_cert, now, Station};

/// What the online issuer allows.
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    /// A device may rotate when it expires within this many seconds ([`fleet_registry::expiry`]).
    pub renew_within: i64,
    /// At most one rotation per device in this many seconds (an operator's request overrides).
    pub min_interval: i64,
    /// The old certificates are revoked this many seconds after the broker saw the device use
    /// the new one.
    pub grace: i64,
}

impl Default for Policy {
    fn default() -> Self {
        Self { renew_within: 30 * 86_400, min_interval: 3_600, grace: 3_600 }
    }
}

/// Why the issuer refused a CSR: sent to `.../certs/rejected` as `<label>: <detail>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    /// Stable, machine-readable reason (docs/spec/rotation.md lists them).
    pub label: &'static str,
    /// For people.
    pub detail: String,
}

impl Rejected {
    pub(crate) fn new(label: &'static str, detail: impl Into<String>) -> Self {
        Self { label, detail: detail.into() }
    }

    /// The payload sent to the device.
    pub fn payload(&self) -> String {
        format!("{}: {}", self.label, self.detail)
    }
}

/// A certificate the issuer gave out, with the chain to send.
#[derive(Debug, Clone)]
pub struct Granted {
    /// The device it is for.
    pub device_id: DeviceId,
    /// The certificate.
    pub cert: IssuedCert,
    /// True if this is a certificate issued earlier for the same key, sent again (the device
    /// asked again because the first answer was lost).
    pub repeated: bool,
}

/// Options of a new claim identity.
#[derive(Debug, Clone)]
pub struct ClaimOptions {
    /// The claim's id.
    pub name: String,
    /// Device ids it may create: `<prefix>-...`.
    pub id_prefix: String,
    /// How many device identities it may create.
    pub quota: i64,
    /// Lifetime of the claim certificate, days.
    pub days: i64,
    /// Output directory (must not exist).
    pub out: PathBuf,
    /// Broker host written into its credentials.bin.
    pub broker_host: String,
    /// Broker port written into its credentials.bin.
    pub broker_port: u16,
}

impl Station {
    /// The device CA certificate, DER (the second element of an `issued` chain).
    pub fn device_ca_der(&self) -> Result<Vec<u8>> {
        let pem = home::read_text(&self.home.device_ca())?;
        pki::pem_decode(&pem, "CERTIFICATE")
            .ok_or_else(|| Error::BadPkiFile(self.home.device_ca(), "not a PEM certificate".into()))
    }

    /// Decides a device's rotation CSR that arrived on `devices/<topic_id>/certs/csr`.
    pub async fn rotate_from_csr(
        &self,
        topic_id: &DeviceId,
        csr: &[u8],
        policy: &Policy,
    ) -> Result<std::result::Result<Granted, Rejected>> {
        let checked = match pki::check_csr(csr) {
            Ok(c) => c,
            Err(e) => return Ok(Err(Rejected::new("bad_csr", e.to_string()))),
        };
        if checked.common_name.as_deref() != Some(topic_id.as_str()) {
            let cn = checked.common_name.as_deref().unwrap_or("(none)");
            return Ok(Err(Rejected::new(
                "id_mismatch",
                format!("the CSR names `{cn}` but was sent on the topic of `{topic_id}`"),
            )));
        }
        let Some(device) = self.registry.device(topic_id).await? else {
            return Ok(Err(Rejected::new("unknown_device", format!("`{topic_id}` is not registered"))));
        };
        if device.role != Role::Device {
            return Ok(Err(Rejected::new("unknown_device", format!("`{topic_id}` is not a device"))));
        }
        if device.status == Status::Revoked {
            return Ok(Err(Rejected::new("revoked", format!("`{topic_id}` is revoked"))));
        }
        let certs = self.registry.certificates_of(topic_id).await?;
        let active: Vec<_> = certs.iter().filter(|c| c.status == Status::Active).collect();
        // The same key asked again: the answer was lost. Send the certificate issued for it.
        for c in &active {
            if pki::summarize(&c.cert_der)?.spki_der == checked.spki_der {
                let last = self.registry.last_rotation(topic_id).await?;
                if last.as_ref().is_some_and(|(s, _)| s == &c.serial) {
                    let cert = issued_from_record(c)?;
                    return Ok(Ok(Granted { device_id: topic_id.clone(), cert, repeated: true }));
                }
                return Ok(Err(Rejected::new(
                    "same_key",
                    "the CSR's key is the key of the current certificate; generate a new key",
                )));
            }
        }
        let at = now().unix_timestamp();
        let forced = self.registry.rotation_requests().await?.iter().any(|(d, _)| d == topic_id);
        if !forced {
            let ends = expiry(active.iter().copied());
            if !ExpiryWindow::within(at, policy.renew_within).contains(ends) {
                return Ok(Err(Rejected::new(
                    "not_due",
                    format!(
                        "the certificate expires in {} days; rotation opens {} days before expiry",
                        (ends.unwrap_or(at) - at) / 86_400,
                        policy.renew_within / 86_400
                    ),
                )));
            }
            if let Some((_, issued)) = self.registry.last_rotation(topic_id).await? {
                if at - issued < policy.min_interval {
                    return Ok(Err(Rejected::new(
                        "rate_limited",
                        format!(
                            "rotated {} s ago; at most one rotation per {} s",
                            at - issued,
                            policy.min_interval
                        ),
                    )));
                }
            }
        }
        let cert = pki::issue_client(
            &self.device_ca()?,
            topic_id,
            Role::Device,
            &checked.public_key,
            self.lifetimes.client,
            now(),
            SerialNumber::random(),
        )?;
        match self
            .registry
            .record_rotation(&new_cert(topic_id, Role::Device, &cert, "rotation"), forced, at)
            .await
        {
            Ok(()) => Ok(Ok(Granted { device_id: topic_id.clone(), cert, repeated: false })),
            Err(fleet_registry::Error::DeviceRevoked(_)) => {
                Ok(Err(Rejected::new("revoked", format!("`{topic_id}` is revoked"))))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Decides a first-boot CSR that arrived on `claims/<claim>/<nonce>/certs/csr`: a new device
    /// named by the CSR's CN, which must start with the claim's prefix.
    pub async fn claim_from_csr(
        &self,
        claim: &DeviceId,
        csr: &[u8],
    ) -> Result<std::result::Result<Granted, Rejected>> {
        let Some(record) = self.registry.claim(claim).await? else {
            return Ok(Err(Rejected::new("claim_invalid", format!("`{claim}` is not a claim"))));
        };
        if record.status == Status::Revoked {
            return Ok(Err(Rejected::new("claim_invalid", format!("claim `{claim}` is revoked"))));
        }
        let (id, checked) = match csr_identity(csr, None) {
            Ok(x) => x,
            Err(e) => return Ok(Err(Rejected::new("bad_csr", e.to_string()))),
        };
        if !id.as_str().starts_with(&format!("{}-", record.id_prefix)) {
            return Ok(Err(Rejected::new(
                "bad_id",
                format!("claim `{claim}` creates devices named `{}-...`, not `{id}`", record.id_prefix),
            )));
        }
        if self.registry.device(&id).await?.is_some() {
            // The answer to this same key was lost: send it again. Anyone else: refused.
            let certs = self.registry.certificates_of(&id).await?;
            if let Some(c) = certs.iter().find(|c| c.status == Status::Active) {
                if pki::summarize(&c.cert_der)?.spki_der == checked.spki_der && c.key_source == "claim" {
                    let cert = issued_from_record(c)?;
                    return Ok(Ok(Granted { device_id: id, cert, repeated: true }));
                }
            }
            return Ok(Err(Rejected::new("id_taken", format!("`{id}` is already registered"))));
        }
        let at = now();
        let cert = pki::issue_client(
            &self.device_ca()?,
            &id,
            Role::Device,
            &checked.public_key,
            self.lifetimes.client,
            at,
            SerialNumber::random(),
        )?;
        match self
            .registry
            .record_claimed_device(claim, &new_cert(&id, Role::Device, &cert, "claim"), at.unix_timestamp())
            .await
        {
            Ok(()) => Ok(Ok(Granted { device_id: id, cert, repeated: false })),
            Err(fleet_registry::Error::ClaimExhausted(_)) => Ok(Err(Rejected::new(
                "claim_exhausted",
                format!("claim `{claim}` has issued all {} identities of its quota", record.quota),
            ))),
            Err(fleet_registry::Error::DuplicateDevice(_)) => {
                Ok(Err(Rejected::new("id_taken", format!("`{id}` is already registered"))))
            }
            Err(fleet_registry::Error::NotAClaim(_)) => {
                Ok(Err(Rejected::new("claim_invalid", format!("claim `{claim}` is revoked"))))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Issues a claim identity into `opts.out`: cert.pem, key.pem, broker-trust.pem, a
    /// credentials.bin whose device id is the claim's (the factory flashes it into every
    /// device of the batch) and id-prefix (what the devices' ids must start with).
    pub async fn claim_cert(&self, opts: &ClaimOptions) -> Result<crate::station::MintedDevice> {
        let id = DeviceId::parse_for_device(&opts.name)?;
        DeviceId::parse(&format!("{}-000000000000", opts.id_prefix))
            .map_err(|_| Error::InvalidInput(format!("invalid device-id prefix `{}`", opts.id_prefix)))?;
        if opts.quota < 1 {
            return Err(Error::InvalidInput("a claim's quota must be at least 1".into()));
        }
        if !(1..=365).contains(&opts.days) {
            return Err(Error::InvalidInput(
                "a claim's lifetime must be 1 to 365 days; keep it short".into(),
            ));
        }
        let ca = self.device_ca()?;
        let at = now();
        let key = DeviceKey::generate()?;
        let cert = pki::issue_client(
            &ca,
            &id,
            Role::Claim,
            &key.key_pair,
            Duration::days(opts.days),
            at,
            SerialNumber::random(),
        )?;
        self.registry
            .record_claim(
                &new_cert(&id, Role::Claim, &cert, "station"),
                &opts.id_prefix,
                opts.quota,
                at.unix_timestamp(),
            )
            .await?;
        let (server_ca_pem, server_ca_der) = self.server_ca_der()?;
        let trust_chain = home::read_text(&self.home.server_ca_chain())?;
        let creds = fleet_device::credentials::Credentials {
            device_id: id.as_str(),
            cert_der: &cert.der,
            key_der: &key.sec1_der,
            server_ca_der: &server_ca_der,
            broker_host: &opts.broker_host,
            broker_port: opts.broker_port,
        };
        let mut bundle = vec![0u8; creds.encoded_len()];
        let len = creds.encode(&mut bundle).map_err(Error::Bundle)?;
        bundle.truncate(len);
        let parent = opts.out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        let name =
            opts.out.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| id.to_string());
        home::create_dir(parent, false)?;
        let dir = home::write_dir_atomically(
            parent,
            &name,
            &[
                (IdentityFiles::CERT, cert.pem.as_bytes(), false),
                (IdentityFiles::KEY, key.sec1_pem().as_bytes(), true),
                (IdentityFiles::SERVER_CA, server_ca_pem.as_bytes(), false),
                (IdentityFiles::BROKER_TRUST, trust_chain.as_bytes(), false),
                (IdentityFiles::BUNDLE, &bundle, true),
                (IdentityFiles::CLAIM_PREFIX, opts.id_prefix.as_bytes(), false),
            ],
        )?;
        Ok(crate::station::MintedDevice { device_id: id, serial: cert.serial, dir })
    }

    /// Operator-forced rotation of `devices` (the online issuer asks each to rotate and accepts
    /// its CSR whatever its expiry). Returns how many were requested.
    pub async fn request_rotation(&self, devices: &[DeviceId], by: &str) -> Result<usize> {
        self.registry.request_rotation(devices, by, now().unix_timestamp()).await?;
        Ok(devices.len())
    }

    /// Active devices (role device) expiring within `secs` ([`fleet_registry::expiry`]), or all
    /// of them with `None`. One registry query.
    pub async fn devices_to_rotate(&self, within: Option<i64>) -> Result<Vec<DeviceId>> {
        let window = within.map(|secs| ExpiryWindow::within(now().unix_timestamp(), secs));
        let listed = self.registry.listing(Some(Status::Active), window).await?;
        Ok(listed.into_iter().filter(|l| l.device.role == Role::Device).map(|l| l.device.device_id).collect())
    }

    /// Revokes the superseded certificates of every rotation whose grace period has passed,
    /// then writes a fresh CRL if anything was revoked. Returns `(device, serials revoked)`.
    pub async fn supersede_due(&self, grace: i64) -> Result<Vec<(DeviceId, Vec<SerialNumber>)>> {
        let at = now().unix_timestamp();
        let mut out = Vec::new();
        for due in self.registry.rotations_due(at - grace).await? {
            let revoked = self.registry.supersede(&due.device_id, &due.serial, at).await?;
            out.push((due.device_id, revoked));
        }
        if out.iter().any(|(_, r)| !r.is_empty()) {
            self.write_crl(&self.home.crl()).await?;
        }
        Ok(out)
    }

    /// The broker saw `device` use certificate `serial`: starts the rotation's grace period.
    pub async fn rotation_seen(&self, device: &DeviceId, serial: &SerialNumber) -> Result<bool> {
        Ok(self.registry.rotation_seen(device, serial, now().unix_timestamp()).await?)
    }
}

fn issued_from_record(c: &fleet_registry::CertRecord) -> Result<IssuedCert> {
    Ok(IssuedCert {
        serial: c.serial.clone(),
        der: c.cert_der.clone(),
        pem: pki::pem_encode("CERTIFICATE", &c.cert_der),
        not_before: c.not_before,
        not_after: c.not_after,
    })
}
