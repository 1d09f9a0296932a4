//! The station: every `fleet-provision` operation as a library call that returns values.
//! Terminal output and argument parsing stay in the binary (`main.rs`, `cli/`).

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use rcgen::{KeyPair, PKCS_ECDSA_P256_SHA256};
use serde::{Deserialize, Serialize};
use time::{Duration, OffsetDateTime};

use crate::error::{Error, Result};
use crate::home::{self, Home};
use crate::pki::{self, DeviceKey, IssuedCert, Lifetimes, LoadedCa};
use fleet_registry::{
    BrokerTls, CertRecord, DeviceId, DeviceRecord, ExpiryWindow, IdentityFiles, ListedIdentity, LogReport,
    NewCert, Registry, RevocationReason, Role, SerialNumber, Status,
};

/// Settings written by `init`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Settings {
    /// Organisation name in every subject.
    pub org: String,
    /// Unix seconds.
    pub created_at: i64,
}

/// An open station: home + registry (a clone shares the registry's pool).
#[derive(Debug, Clone)]
pub struct Station {
    pub(crate) home: Home,
    pub(crate) registry: Registry,
    pub(crate) lifetimes: Lifetimes,
}

/// Files produced for one device by `mint`.
#[derive(Debug, Clone)]
pub struct MintedDevice {
    /// Its id.
    pub device_id: DeviceId,
    /// Its serial.
    pub serial: SerialNumber,
    /// Directory holding cert.pem, key.pem, server-ca.pem, broker-trust.pem, credentials.bin.
    pub dir: PathBuf,
}

/// Options of `mint`.
#[derive(Debug, Clone)]
pub struct MintOptions {
    /// How many identities.
    pub count: usize,
    /// Id prefix (`<prefix>-<12 hex digits>`).
    pub prefix: String,
    /// Output directory.
    pub out: PathBuf,
    /// Broker host written into the bundle (and expected in the broker's certificate).
    pub broker_host: String,
    /// Broker port written into the bundle.
    pub broker_port: u16,
    /// Identities per registry transaction.
    pub chunk: usize,
}

/// A device and its certificates, for `show`.
#[derive(Debug, Clone)]
pub struct DeviceReport {
    /// The device row.
    pub device: DeviceRecord,
    /// Its certificates, newest first.
    pub certificates: Vec<CertRecord>,
}

/// What `crl` produced.
#[derive(Debug, Clone)]
pub struct CrlOutput {
    /// CRL number.
    pub number: u64,
    /// Revoked serials listed.
    pub revoked: usize,
    /// DER.
    pub der: Vec<u8>,
    /// PEM.
    pub pem: String,
}

pub(crate) fn now() -> OffsetDateTime {
    OffsetDateTime::now_utc()
}

/// The browser bundle of an operator identity (PKCS#12).
pub const OPERATOR_P12: &str = "operator.p12";

impl Station {
    /// Creates the CA hierarchy and the registry in `home`. Refuses if a CA is already there.
    pub async fn init(home: Home, org: &str, database_url: Option<&str>) -> Result<Station> {
        if home.device_ca().exists() || home.root_ca().exists() || home.device_ca_key().exists() {
            return Err(Error::AlreadyInitialised(home.root().to_path_buf()));
        }
        let lifetimes = Lifetimes::default();
        let at = now();
        let h = pki::create_hierarchy(org, &lifetimes, at)?;
        home::create_dir(home.root(), false)?;
        home::create_dir(&home.private_dir(), true)?;
        let url = database_url.map_or_else(|| home.default_database_url(), str::to_owned);
        let registry = Registry::open(&url, true).await?;
        home::write_new(&home.root_ca_key(), h.root.key_pem.as_bytes(), true)?;
        home::write_new(&home.device_ca_key(), h.device_ca.key_pem.as_bytes(), true)?;
        home::write_new(&home.server_ca_key(), h.server_ca.key_pem.as_bytes(), true)?;
        home::write_new(&home.root_ca(), h.root.cert_pem.as_bytes(), false)?;
        home::write_new(&home.server_ca(), h.server_ca.cert_pem.as_bytes(), false)?;
        home::write_new(
            &home.device_ca_chain(),
            format!("{}{}", h.device_ca.cert_pem, h.root.cert_pem).as_bytes(),
            false,
        )?;
        home::write_new(
            &home.server_ca_chain(),
            format!("{}{}", h.server_ca.cert_pem, h.root.cert_pem).as_bytes(),
            false,
        )?;
        let settings = Settings { org: org.to_owned(), created_at: at.unix_timestamp() };
        let json = serde_json::to_vec_pretty(&settings).map_err(|e| Error::InvalidInput(e.to_string()))?;
        home::write_new(&home.settings(), &json, false)?;
        // The device CA certificate is written last: its presence marks a complete init.
        home::write_new(&home.device_ca(), h.device_ca.cert_pem.as_bytes(), false)?;
        let station = Station { home, registry, lifetimes };
        station
            .registry
            .log_event("init", org, "", serde_json::json!({ "org": org }), at.unix_timestamp())
            .await?;
        station.write_crl(&station.home.crl()).await?;
        Ok(station)
    }

    /// Opens an initialised home.
    pub async fn open(home: Home, database_url: Option<&str>) -> Result<Station> {
        home::require_initialised(&home)?;
        let url = database_url.map_or_else(|| home.default_database_url(), str::to_owned);
        if database_url.is_none() && !home.registry_db().exists() {
            return Err(Error::NotInitialised(home.root().to_path_buf(), "registry.db"));
        }
        let registry = Registry::open(&url, false).await?;
        Ok(Station { home, registry, lifetimes: Lifetimes::default() })
    }

    /// Overrides certificate lifetimes (client certificate days, CRL days).
    pub fn set_client_lifetime(&mut self, days: i64) -> Result<()> {
        if !(1..=36500).contains(&days) {
            return Err(Error::InvalidInput(format!("a lifetime of {days} days is out of range 1..=36500")));
        }
        self.lifetimes.client = Duration::days(days);
        Ok(())
    }

    /// The registry.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The home.
    pub fn home(&self) -> &Home {
        &self.home
    }

    fn load_ca(&self, cert: &Path, key: &Path) -> Result<LoadedCa> {
        let cert_pem = home::read_text(cert)?;
        let key_pem = home::read_text(key)?;
        LoadedCa::from_pem(&cert_pem, &key_pem).map_err(|e| Error::BadPkiFile(cert.to_path_buf(), e))
    }

    pub(crate) fn device_ca(&self) -> Result<LoadedCa> {
        self.load_ca(&self.home.device_ca(), &self.home.device_ca_key())
    }

    pub(crate) fn server_ca_der(&self) -> Result<(String, Vec<u8>)> {
        let pem = home::read_text(&self.home.server_ca())?;
        let der = pki::pem_decode(&pem, "CERTIFICATE")
            .ok_or_else(|| Error::BadPkiFile(self.home.server_ca(), "not a PEM certificate".into()))?;
        Ok((pem, der))
    }

    /// Mints `count` station-keyed device identities. Each chunk is committed to the registry
    /// before any of its files are written; `progress` is called after each device's files.
    pub async fn mint(
        &self,
        opts: &MintOptions,
        progress: &(dyn Fn(u64) + Sync),
    ) -> Result<Vec<MintedDevice>> {
        if opts.count == 0 {
            return Err(Error::InvalidInput("the device count must be at least 1".into()));
        }
        DeviceId::parse(&format!("{}-000000000000", opts.prefix))
            .map_err(|_| Error::InvalidInput(format!("invalid device-id prefix `{}`", opts.prefix)))?;
        if opts.broker_port == 0 || opts.broker_host.is_empty() {
            return Err(Error::InvalidInput(
                "the broker host must be set and the broker port non-zero".into(),
            ));
        }
        let ca = self.device_ca()?;
        let (server_ca_pem, server_ca_der) = self.server_ca_der()?;
        let trust_chain = home::read_text(&self.home.server_ca_chain())?;
        home::create_dir(&opts.out, false)?;
        home::clean_partial_dirs(&opts.out)?;
        let mut out = Vec::with_capacity(opts.count);
        let mut remaining = opts.count;
        while remaining > 0 {
            let n = remaining.min(opts.chunk.max(1));
            remaining -= n;
            let at = now();
            let mut batch = Vec::with_capacity(n);
            for _ in 0..n {
                let id =
                    DeviceId::parse(&format!("{}-{}", opts.prefix, hex::encode(rand::random::<[u8; 6]>())))?;
                let key = DeviceKey::generate()?;
                let cert = pki::issue_client(
                    &ca,
                    &id,
                    Role::Device,
                    &key.key_pair,
                    self.lifetimes.client,
                    at,
                    SerialNumber::random(),
                )?;
                batch.push((id, key, cert));
            }
            let rows: Vec<NewCert> =
                batch.iter().map(|(id, _, c)| new_cert(id, Role::Device, c, "station")).collect();
            self.registry.record_certificates(&rows, true, at.unix_timestamp()).await?;
            for (id, key, cert) in batch {
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
                let key_pem = key.sec1_pem();
                let dir = home::write_dir_atomically(
                    &opts.out,
                    id.as_str(),
                    &[
                        (IdentityFiles::CERT, cert.pem.as_bytes(), false),
                        (IdentityFiles::KEY, key_pem.as_bytes(), true),
                        (IdentityFiles::SERVER_CA, server_ca_pem.as_bytes(), false),
                        (IdentityFiles::BROKER_TRUST, trust_chain.as_bytes(), false),
                        (IdentityFiles::BUNDLE, &bundle, true),
                    ],
                )?;
                out.push(MintedDevice { device_id: id, serial: cert.serial, dir });
                progress(1);
            }
        }
        Ok(out)
    }

    /// Issues a backend-service identity (role `service`) into `out/`.
    pub async fn service_cert(&self, name: &str, out: &Path) -> Result<MintedDevice> {
        self.role_cert(name, Role::Service, out, |_, _| Ok(Vec::new())).await
    }

    /// Issues an operator identity (role `operator`: the broker's admin API and console, never
    /// MQTT) into `out/`, with `operator.p12` (key, certificate and the device CA chain,
    /// PBES2/AES-256 and an HMAC-SHA-256 MAC under `p12_password`) for browsers.
    pub async fn operator_cert(&self, name: &str, out: &Path, p12_password: &str) -> Result<MintedDevice> {
        if p12_password.len() < 8 {
            return Err(Error::InvalidInput("the PKCS#12 password must have at least 8 characters".into()));
        }
        let chain_pem = home::read_text(&self.home.device_ca_chain())?;
        self.role_cert(name, Role::Operator, out, |key, cert| {
            let p12 = pki::pkcs12(name, key.key_pair.serialized_der(), &cert.der, &chain_pem, p12_password)?;
            Ok(vec![(OPERATOR_P12, p12)])
        })
        .await
    }

    /// Issues a certificate-issuer identity (role `issuer`: reads devices' CSRs on
    /// `devices/+/certs/csr`, answers under `devices/<id>/certs/`) into `out/`.
    pub async fn issuer_cert(&self, name: &str, out: &Path) -> Result<MintedDevice> {
        self.role_cert(name, Role::Issuer, out, |_, _| Ok(Vec::new())).await
    }

    /// Issues an identity of `role`; `extra` adds private files made from its key and certificate.
    async fn role_cert(
        &self,
        name: &str,
        role: Role,
        out: &Path,
        extra: impl FnOnce(&DeviceKey, &pki::IssuedCert) -> Result<Vec<(&'static str, Vec<u8>)>>,
    ) -> Result<MintedDevice> {
        let id = DeviceId::parse(name)?;
        let ca = self.device_ca()?;
        let at = now();
        let key = DeviceKey::generate()?;
        let cert = pki::issue_client(
            &ca,
            &id,
            role,
            &key.key_pair,
            self.lifetimes.client,
            at,
            SerialNumber::random(),
        )?;
        self.registry
            .record_certificates(&[new_cert(&id, role, &cert, "station")], true, at.unix_timestamp())
            .await?;
        let trust_chain = home::read_text(&self.home.server_ca_chain())?;
        let key_pem = key.key_pair.serialize_pem();
        let extra = extra(&key, &cert)?;
        let parent = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        let name =
            out.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| id.to_string());
        home::create_dir(parent, false)?;
        let dir = home::write_dir_atomically(
            parent,
            &name,
            &[
                (IdentityFiles::CERT, cert.pem.as_bytes(), false),
                (IdentityFiles::KEY, key_pem.as_bytes(), true),
                (IdentityFiles::BROKER_TRUST, trust_chain.as_bytes(), false),
            ]
            .into_iter()
            .chain(extra.iter().map(|(n, b)| (*n, b.as_slice(), true)))
            .collect::<Vec<_>>(),
        )?;
        Ok(MintedDevice { device_id: id, serial: cert.serial, dir })
    }

    /// Issues a cluster-bus identity from the server CA into `out/`: a broker node's
    /// (`urn:fleetgate:node:<name>`, may route and store through NATS) or, with
    /// `stream_reader`, a backend's (`urn:fleetgate:stream-reader:<name>`, may only consume the
    /// stream). `cert.pem`, `key.pem` (PKCS#8, mode 0600) and `broker-trust.pem` (server CA +
    /// root: verifies the NATS server's certificate). Logged as `node-cert`.
    pub async fn node_cert(&self, name: &str, stream_reader: bool, out: &Path) -> Result<IssuedCert> {
        let id = DeviceId::parse(name)?;
        let ca = self.load_ca(&self.home.server_ca(), &self.home.server_ca_key())?;
        let prefix = if stream_reader {
            fleet_registry::STREAM_READER_URI_PREFIX
        } else {
            fleet_registry::NODE_URI_PREFIX
        };
        let uri = format!("{prefix}{id}");
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let at = now();
        let cert = pki::issue_bus_client(&ca, id.as_str(), &uri, &key, self.lifetimes.client, at)?;
        let trust_chain = home::read_text(&self.home.server_ca_chain())?;
        write_out_dir(
            out,
            &[
                (IdentityFiles::CERT, cert.pem.as_bytes(), false),
                (IdentityFiles::KEY, key.serialize_pem().as_bytes(), true),
                (IdentityFiles::BROKER_TRUST, trust_chain.as_bytes(), false),
            ],
        )?;
        let detail = serde_json::json!({ "uri": uri, "not_after": cert.not_after });
        self.registry
            .log_event("node-cert", id.as_str(), &cert.serial.to_hex(), detail, at.unix_timestamp())
            .await?;
        Ok(cert)
    }

    /// Issues a broker certificate into `out/` (cert.pem = leaf + server CA, key.pem PKCS#8).
    pub async fn server_cert(&self, dns: &[String], ips: &[IpAddr], out: &Path) -> Result<IssuedCert> {
        let ca = self.load_ca(&self.home.server_ca(), &self.home.server_ca_key())?;
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let at = now();
        let cert = pki::issue_server(&ca, dns, ips, &key, self.lifetimes.server, at)?;
        let chain = format!("{}{}", cert.pem, ca.cert_pem);
        let key_pem = key.serialize_pem();
        let device_ca_pem = home::read_text(&self.home.device_ca())?;
        write_out_dir(
            out,
            &[
                (BrokerTls::CERT, chain.as_bytes(), false),
                (BrokerTls::KEY, key_pem.as_bytes(), true),
                (BrokerTls::CLIENT_CA, device_ca_pem.as_bytes(), false),
            ],
        )?;
        self.log_server_cert(dns, ips, &cert, false, at).await?;
        Ok(cert)
    }

    /// The issuance-log entry of a broker certificate.
    async fn log_server_cert(
        &self,
        dns: &[String],
        ips: &[IpAddr],
        cert: &IssuedCert,
        renewed: bool,
        at: OffsetDateTime,
    ) -> Result<()> {
        // The certificate itself (DER, hex): `verify-log` checks the logged serial against it.
        let detail = serde_json::json!({
            "dns": dns, "ip": ips, "not_after": cert.not_after, "renewed": renewed,
            "cert_der": hex::encode(&cert.der),
        });
        self.registry
            .log_event(
                "server-cert",
                dns.first().map_or("", String::as_str),
                &cert.serial.to_hex(),
                detail,
                at.unix_timestamp(),
            )
            .await?;
        Ok(())
    }

    /// Sets the lifetime of broker certificates issued from now on (days).
    pub fn set_server_lifetime(&mut self, days: i64) -> Result<()> {
        if !(1..=397).contains(&days) {
            return Err(Error::InvalidInput(format!(
                "a broker certificate lifetime of {days} days is out of range 1..=397"
            )));
        }
        self.lifetimes.server = Duration::days(days);
        Ok(())
    }

    /// Renews the broker certificate in `dir` (as `server_cert` wrote it): a new key and a new
    /// certificate for the same names (or `dns`/`ips` when given), each file replaced
    /// atomically, key first. A running broker reloads them without dropping sessions.
    pub async fn renew_server_cert(&self, dns: &[String], ips: &[IpAddr], dir: &Path) -> Result<IssuedCert> {
        let cert_path = dir.join(BrokerTls::CERT);
        let old = home::read_text(&cert_path)?;
        let der = pki::pem_decode(&old, "CERTIFICATE").ok_or_else(|| {
            Error::InvalidInput(format!("{}: no certificate to renew", cert_path.display()))
        })?;
        let (old_dns, old_ips) = pki::subject_alt_names(&der)?;
        let (dns, ips) =
            if dns.is_empty() && ips.is_empty() { (old_dns, old_ips) } else { (dns.to_vec(), ips.to_vec()) };
        let ca = self.load_ca(&self.home.server_ca(), &self.home.server_ca_key())?;
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let at = now();
        let cert = pki::issue_server(&ca, &dns, &ips, &key, self.lifetimes.server, at)?;
        let chain = format!("{}{}", cert.pem, ca.cert_pem);
        home::write_replace_with(&dir.join(BrokerTls::KEY), key.serialize_pem().as_bytes(), true)?;
        home::write_replace(&cert_path, chain.as_bytes())?;
        self.log_server_cert(&dns, &ips, &cert, true, at).await?;
        Ok(cert)
    }

    /// Issues a certificate for a device-generated key (a CSR) to a **new** device. With
    /// `device_id` unset, the id is the CSR's subject CN. An id that already exists (device or
    /// service) is refused: replacing a device's key is [`Station::rekey`], never a CSR alone.
    pub async fn sign_csr(&self, csr: &[u8], device_id: Option<&str>) -> Result<IssuedCert> {
        let (id, checked) = csr_identity(csr, device_id)?;
        if self.registry.device(&id).await?.is_some() {
            return Err(Error::DeviceExists(id.to_string()));
        }
        let cert = self.issue_device(&id, &checked.public_key)?;
        // `new_devices`: the insert fails if a concurrent run registered the id first.
        self.registry
            .record_certificates(&[new_cert(&id, Role::Device, &cert, "csr")], true, now().unix_timestamp())
            .await?;
        Ok(cert)
    }

    /// Replaces an existing, active device's key: certifies the CSR's key and, in the same
    /// registry transaction, revokes every other active certificate of the device (reason
    /// superseded) and logs the re-key. Then writes a fresh CRL. Returns the new certificate
    /// and the serials it superseded.
    pub async fn rekey(
        &self,
        id: &DeviceId,
        csr: &[u8],
    ) -> Result<(IssuedCert, Vec<SerialNumber>, CrlOutput)> {
        let (csr_id, checked) = csr_identity(csr, Some(id.as_str()))?;
        debug_assert_eq!(&csr_id, id);
        let device = self
            .registry
            .device(id)
            .await?
            .ok_or_else(|| Error::from(fleet_registry::Error::UnknownDevice(id.to_string())))?;
        if device.role != Role::Device {
            return Err(Error::InvalidInput(format!("`{id}` is a service identity; rekey is for devices")));
        }
        if device.status == Status::Revoked {
            return Err(Error::from(fleet_registry::Error::DeviceRevoked(id.to_string())));
        }
        let cert = self.issue_device(id, &checked.public_key)?;
        let superseded =
            self.registry.rekey(&new_cert(id, Role::Device, &cert, "csr"), now().unix_timestamp()).await?;
        let crl = self.write_crl(&self.home.crl()).await?;
        Ok((cert, superseded, crl))
    }

    fn issue_device(&self, id: &DeviceId, key: &impl rcgen::PublicKeyData) -> Result<IssuedCert> {
        let ca = self.device_ca()?;
        pki::issue_client(&ca, id, Role::Device, key, self.lifetimes.client, now(), SerialNumber::random())
    }

    /// A new certificate (new serial) for the same device and public key; the old one stays
    /// valid until it expires or is revoked.
    pub async fn renew(&self, id: &DeviceId) -> Result<IssuedCert> {
        let device = self
            .registry
            .device(id)
            .await?
            .ok_or_else(|| Error::from(fleet_registry::Error::UnknownDevice(id.to_string())))?;
        if device.status == Status::Revoked {
            return Err(Error::from(fleet_registry::Error::DeviceRevoked(id.to_string())));
        }
        let certs = self.registry.certificates_of(id).await?;
        let latest = certs
            .iter()
            .find(|c| c.status == Status::Active)
            .ok_or_else(|| Error::from(fleet_registry::Error::DeviceRevoked(id.to_string())))?;
        let spki = pki::summarize(&latest.cert_der)?.spki_der;
        let public_key = rcgen::SubjectPublicKeyInfo::from_der(&spki)?;
        let ca = self.device_ca()?;
        let at = now();
        let cert = pki::issue_client(
            &ca,
            id,
            device.role,
            &public_key,
            self.lifetimes.client,
            at,
            SerialNumber::random(),
        )?;
        self.registry
            .record_certificates(&[new_cert(id, device.role, &cert, "renew")], false, at.unix_timestamp())
            .await?;
        Ok(cert)
    }

    /// Revokes a device (all its certificates), then writes a fresh CRL into the home.
    pub async fn revoke_device(
        &self,
        id: &DeviceId,
        reason: RevocationReason,
    ) -> Result<(Vec<SerialNumber>, CrlOutput)> {
        let serials = self.registry.revoke_device(id, reason, now().unix_timestamp()).await?;
        let crl = self.write_crl(&self.home.crl()).await?;
        Ok((serials, crl))
    }

    /// Revokes one certificate, then writes a fresh CRL into the home.
    pub async fn revoke_serial(
        &self,
        serial: &SerialNumber,
        reason: RevocationReason,
    ) -> Result<(DeviceId, CrlOutput)> {
        let owner = self.registry.revoke_serial(serial, reason, now().unix_timestamp()).await?;
        let crl = self.write_crl(&self.home.crl()).await?;
        Ok((owner, crl))
    }

    /// Signs a new CRL (next number) over every revoked certificate.
    pub async fn crl(&self, days: Option<i64>) -> Result<CrlOutput> {
        let ca = self.device_ca()?;
        let at = now();
        let life = match days {
            Some(d) if (1..=365).contains(&d) => Duration::days(d),
            Some(d) => {
                return Err(Error::InvalidInput(format!(
                    "a CRL lifetime of {d} days is out of range 1..=365"
                )))
            }
            None => self.lifetimes.crl,
        };
        let (number, entries) = self.registry.crl_snapshot(at.unix_timestamp()).await?;
        let crl = pki::sign_crl(&ca, number, &entries, at, life)?;
        Ok(CrlOutput { number, revoked: entries.len(), der: crl.der().to_vec(), pem: crl.pem()? })
    }

    /// Signs a CRL and writes it (PEM) to `path`, replacing the old one atomically.
    /// A file that already holds a CRL with a higher number (a concurrent `revoke` finished
    /// first) is left in place: it lists everything this one does.
    pub async fn write_crl(&self, path: &Path) -> Result<CrlOutput> {
        let crl = self.crl(None).await?;
        let on_disk = std::fs::read_to_string(path).ok().and_then(|pem| pki::crl_number_of_pem(&pem));
        if on_disk.is_none_or(|n| n < crl.number) {
            home::write_replace(path, crl.pem.as_bytes())?;
        }
        Ok(crl)
    }

    /// A device and its certificates.
    pub async fn show(&self, id: &DeviceId) -> Result<DeviceReport> {
        let device = self
            .registry
            .device(id)
            .await?
            .ok_or_else(|| Error::from(fleet_registry::Error::UnknownDevice(id.to_string())))?;
        let certificates = self.registry.certificates_of(id).await?;
        Ok(DeviceReport { device, certificates })
    }

    /// The identities (or those of `status`), ordered by id, each with its newest certificate;
    /// with `expiring_within` (seconds), only those expiring within that long from now
    /// ([`fleet_registry::expiry`]). One registry query.
    pub async fn list(
        &self,
        status: Option<Status>,
        expiring_within: Option<i64>,
    ) -> Result<Vec<ListedIdentity>> {
        let window = expiring_within.map(|secs| ExpiryWindow::within(now().unix_timestamp(), secs));
        Ok(self.registry.listing(status, window).await?)
    }

    /// A device's newest `limit` commands, newest first (the device must exist).
    pub async fn commands(&self, id: &DeviceId, limit: i64) -> Result<Vec<fleet_registry::Command>> {
        if self.registry.device(id).await?.is_none() {
            return Err(Error::from(fleet_registry::Error::UnknownDevice(id.to_string())));
        }
        Ok(self.registry.commands_of(id, limit).await?)
    }

    /// Checks the issuance log.
    pub async fn verify_log(&self) -> Result<LogReport> {
        Ok(self.registry.verify_log().await?)
    }
}

/// The device id a CSR is for (the `--device-id` given, else the subject CN; both must agree),
/// checked against the id syntax and the reserved names, and the checked CSR.
pub(crate) fn csr_identity(csr: &[u8], device_id: Option<&str>) -> Result<(DeviceId, pki::CheckedCsr)> {
    let checked = pki::check_csr(csr)?;
    let id = match (device_id, checked.common_name.as_deref()) {
        (Some(given), Some(cn)) if given != cn => {
            return Err(Error::CsrProfile(format!(
                "subject CN `{cn}` does not match the device id `{given}`"
            )))
        }
        (Some(given), _) => DeviceId::parse_for_device(given)?,
        (None, Some(cn)) => DeviceId::parse_for_device(cn)?,
        (None, None) => return Err(Error::CsrProfile("no subject CN and no device id given".into())),
    };
    Ok((id, checked))
}

pub(crate) fn new_cert(id: &DeviceId, role: Role, c: &IssuedCert, key_source: &'static str) -> NewCert {
    NewCert {
        device_id: id.clone(),
        role,
        serial: c.serial.clone(),
        not_before: c.not_before,
        not_after: c.not_after,
        key_source,
        cert_der: c.der.clone(),
    }
}

/// Writes `files` (name, bytes, private) as the new directory `out`, atomically, creating its
/// parent if needed (`server-cert`, `node-cert`).
fn write_out_dir(out: &Path, files: &[(&str, &[u8], bool)]) -> Result<PathBuf> {
    let parent = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| Error::InvalidInput("the output path must name a directory".into()))?;
    home::create_dir(parent, false)?;
    home::write_dir_atomically(parent, &name, files)
}
