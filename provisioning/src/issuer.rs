//! The online issuer (`fleet-provision serve`): an MQTT client of the broker with an identity of
//! role `issuer` that answers devices' CSRs (docs/spec/rotation.md).
//!
//! - `devices/<id>/certs/csr` → policy ([`Policy`]) → `devices/<id>/certs/issued` (leaf DER then
//!   device CA DER) or `devices/<id>/certs/rejected` (`<reason>: <detail>`).
//! - `claims/<claim>/<nonce>/certs/csr` → a new device from the claim → `.../certs/issued` or
//!   `.../certs/rejected`.
//! - `devices/<id>/certs/active` (payload stamped by the broker with the serial in use) → the
//!   rotation's grace period starts; when it has passed, the old certificates are revoked
//!   (superseded) and a fresh CRL is written.
//! - Operator requests (`fleet-provision rotate`) are published as a retained
//!   `devices/<id>/certs/rotate` until the device has rotated.
//!
//! The MQTT event loop only reads and queues; one worker decides in arrival order, so a flood
//! of CSRs cannot stall the connection's keep-alive. The station never sees a device key: a CSR
//! carries only the public key, and the registry stores only certificates.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use fleet_registry::{DeviceId, IdentityFiles, SerialNumber, ISSUER_URI_PREFIX};
use fleet_topic::{level, Addressed, Root, Topic};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS, TlsConfiguration, Transport};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::error::{Error, Result};
use crate::lifecycle::{Granted, Policy, Rejected};
use crate::station::Station;

/// How the issuer connects and what it allows.
#[derive(Debug, Clone)]
pub struct IssuerConfig {
    /// Issuer identity directory (`fleet-provision issuer-cert --out`).
    pub identity: PathBuf,
    /// Broker host.
    pub host: String,
    /// Broker port.
    pub port: u16,
    /// Rotation policy.
    pub policy: Policy,
    /// How often pending operator requests are published again and due rotations superseded.
    pub tick: Duration,
}

/// What one answered request did (for logs, tests and the benchmark).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Certificates issued (rotations and claims).
    pub issued: u64,
    /// CSRs refused.
    pub rejected: u64,
    /// Old certificates revoked after their grace period.
    pub superseded: u64,
}

/// A message for the worker.
#[derive(Debug)]
enum Job {
    Csr { topic: String, payload: Vec<u8> },
    Active { device: DeviceId, payload: Vec<u8> },
}

fn read_identity(
    dir: &Path,
) -> Result<(String, Vec<CertificateDer<'static>>, PrivateKeyDer<'static>, rustls::RootCertStore)> {
    let path = |f: &str| dir.join(f);
    let bad = |f: &str, e: String| Error::BadPkiFile(path(f), e);
    let chain = CertificateDer::pem_file_iter(path(IdentityFiles::CERT))
        .map_err(|e| bad(IdentityFiles::CERT, e.to_string()))?
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| bad(IdentityFiles::CERT, e.to_string()))?;
    let key = PrivateKeyDer::from_pem_file(path(IdentityFiles::KEY))
        .map_err(|e| bad(IdentityFiles::KEY, e.to_string()))?;
    let mut roots = rustls::RootCertStore::empty();
    for r in CertificateDer::pem_file_iter(path(IdentityFiles::BROKER_TRUST))
        .map_err(|e| bad(IdentityFiles::BROKER_TRUST, e.to_string()))?
    {
        roots
            .add(r.map_err(|e| bad(IdentityFiles::BROKER_TRUST, e.to_string()))?)
            .map_err(|e| bad(IdentityFiles::BROKER_TRUST, e.to_string()))?;
    }
    let leaf = chain.first().ok_or_else(|| bad(IdentityFiles::CERT, "no certificate".into()))?;
    let uris = uris_of(leaf.as_ref());
    let name = uris
        .iter()
        .find_map(|u| u.strip_prefix(ISSUER_URI_PREFIX))
        .ok_or_else(|| {
            bad(
                IdentityFiles::CERT,
                "not an issuer identity (no urn:fleetgate:issuer: URI); create one with issuer-cert".into(),
            )
        })?
        .to_owned();
    Ok((name, chain, key, roots))
}

fn uris_of(der: &[u8]) -> Vec<String> {
    use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
    let Ok((_, cert)) = X509Certificate::from_der(der) else { return Vec::new() };
    let Ok(Some(san)) = cert.subject_alternative_name() else { return Vec::new() };
    san.value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::URI(u) => Some((*u).to_owned()),
            _ => None,
        })
        .collect()
}

fn options(cfg: &IssuerConfig) -> Result<MqttOptions> {
    let (name, chain, key, roots) = read_identity(&cfg.identity)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| Error::InvalidInput(format!("issuer TLS configuration: {e}")))?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .map_err(|e| Error::InvalidInput(format!("issuer TLS configuration: {e}")))?;
    let mut o = MqttOptions::new(name, &cfg.host, cfg.port);
    o.set_clean_session(true);
    o.set_keep_alive(Duration::from_secs(30));
    o.set_max_packet_size(64 * 1024, 64 * 1024);
    o.set_inflight(64);
    o.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(Arc::new(tls))));
    Ok(o)
}

/// The filters the issuer subscribes to.
pub const FILTERS: [&str; 3] = fleet_topic::filter::ISSUER;

/// Runs the issuer until `stop` resolves. Reconnects by itself when the broker goes away.
pub async fn serve(
    station: Station,
    cfg: IssuerConfig,
    stop: impl std::future::Future<Output = ()>,
) -> Result<Counts> {
    let (client, mut events) = AsyncClient::new(options(&cfg)?, 1024);
    let crl = tokio::spawn(sign_crl_on_revocations(station.clone()));
    let (jobs_tx, jobs_rx) = mpsc::channel::<Job>(8192);
    let worker = tokio::spawn(work(station, cfg.clone(), client.clone(), jobs_rx));
    tokio::pin!(stop);
    let mut was_up = false;
    loop {
        let ev = tokio::select! {
            () = &mut stop => break,
            ev = events.poll() => ev,
        };
        match ev {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                info!(host = %cfg.host, port = cfg.port, "issuer connected");
                was_up = true;
                for f in FILTERS {
                    if let Err(e) = client.subscribe(f, QoS::AtLeastOnce).await {
                        warn!(error = %e, "subscribe failed");
                    }
                }
            }
            Ok(Event::Incoming(Packet::SubAck(s))) => {
                if s.return_codes.iter().any(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure)) {
                    warn!("the broker refused an issuer subscription: is this identity of role issuer?");
                }
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                let job = match active_device(&p.topic) {
                    Some(device) => Job::Active { device, payload: p.payload.to_vec() },
                    None => Job::Csr { topic: p.topic.clone(), payload: p.payload.to_vec() },
                };
                if jobs_tx.try_send(job).is_err() {
                    warn!(topic = p.topic.as_str(), "issuer queue full; the device will ask again");
                }
            }
            Ok(_) => {}
            Err(e) => {
                if was_up {
                    warn!(error = %e, "issuer connection lost; reconnecting");
                } else {
                    warn!(error = %e, "cannot reach the broker; retrying");
                }
                was_up = false;
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
    drop(jobs_tx);
    crl.abort();
    let _ = client.disconnect().await;
    worker.await.map_err(|e| Error::InvalidInput(format!("issuer worker failed: {e}")))
}

/// How often the registry is asked for revocations (PostgreSQL also notifies at once).
const CRL_POLL: Duration = Duration::from_millis(500);

/// Signs a fresh HOME/crl.pem whenever the registry reports revocations, whoever made them (the
/// CLI, an operator through the broker's admin API, a rotation's supersede), so the CRL follows
/// the registry within a second while the issuer runs. Revocations that land together are
/// signed into one CRL.
async fn sign_crl_on_revocations(station: Station) {
    let mut feed = loop {
        match station.registry.revocation_feed().await {
            Ok(f) => break f,
            Err(e) => {
                warn!(error = %e, "CRL follower: no revocation feed yet; retrying");
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
        }
    };
    loop {
        feed.changed(CRL_POLL).await;
        match feed.next_batch().await {
            Ok(events) if events.is_empty() => {}
            Ok(events) => match station.write_crl(&station.home.crl()).await {
                Ok(crl) => info!(
                    number = crl.number,
                    listed = crl.revoked,
                    new = events.len(),
                    "CRL signed after revocations"
                ),
                Err(e) => warn!(error = %e, "CRL not signed; the next revocation retries"),
            },
            Err(e) => warn!(error = %e, "CRL follower: registry unavailable"),
        }
    }
}

/// `devices/<id>/certs/active` → the device.
fn active_device(topic: &str) -> Option<DeviceId> {
    match Topic::parse(topic).ok()?.addressed() {
        Addressed::DeviceCerts { device, kind: level::ACTIVE } => DeviceId::parse(device).ok(),
        _ => None,
    }
}

/// The CSR of a payload the broker relayed, if the certificate it names (`fleetgate-origin
/// <serial>`, set by the broker that admitted the publisher: docs/spec/rotation.md) is the
/// asker's own and in force: a device's active certificate for `devices/<id>/certs/csr`, the
/// claim's for a claim session. A CSR on a device's topic from anyone else, or unstamped, is
/// refused (`unbound`): the topic alone never names whose key gets certified.
async fn bound<'p>(
    station: &Station,
    who: &Asker,
    payload: &'p [u8],
) -> Result<std::result::Result<&'p [u8], Rejected>> {
    let unbound = |detail: String| Ok(Err(Rejected::new("unbound", detail)));
    let Some(rest) = payload.strip_prefix(format!("{} ", fleet_registry::CSR_ORIGIN).as_bytes()) else {
        return unbound("the CSR carries no origin from the broker (is the broker fleet-broker?)".into());
    };
    let Some(nl) = rest.iter().position(|&b| b == b'\n') else {
        return unbound("unreadable origin".into());
    };
    let Some(serial) = std::str::from_utf8(&rest[..nl]).ok().and_then(|s| SerialNumber::parse(s).ok()) else {
        return unbound("unreadable origin serial".into());
    };
    let (owner, role) = match who {
        Asker::Device(id) => (id, fleet_registry::Role::Device),
        Asker::Claim { claim, .. } => (claim, fleet_registry::Role::Claim),
    };
    let ok = match station.registry().admission(&serial).await? {
        Some(a) => {
            &a.device_id == owner
                && a.role == role
                && a.device_status == fleet_registry::Status::Active
                && a.cert_status == fleet_registry::Status::Active
        }
        None => false,
    };
    if ok {
        Ok(Ok(&rest[nl + 1..]))
    } else {
        unbound(format!("the CSR was sent with certificate {serial}, which is not {owner}'s in force"))
    }
}

/// Where a CSR came from, and where the answer goes (`<root>/certs/issued|rejected`).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Asker {
    Device(DeviceId),
    Claim { claim: DeviceId, root: String },
}

fn asker(topic: &str) -> Option<Asker> {
    match Topic::parse(topic).ok()?.addressed() {
        Addressed::DeviceCerts { device, kind: level::CSR } => {
            DeviceId::parse(device).ok().map(Asker::Device)
        }
        Addressed::ClaimCerts { claim, nonce, kind: level::CSR } => {
            let claim = DeviceId::parse(claim).ok()?;
            let root = fleet_topic::claim_session(claim.as_str(), nonce).to_string();
            Some(Asker::Claim { root, claim })
        }
        _ => None,
    }
}

impl Asker {
    fn root(&self) -> Root<'_> {
        match self {
            Asker::Device(id) => Root::Device(id.as_str()),
            Asker::Claim { root, .. } => Root::Claim(root),
        }
    }
}

async fn work(
    station: Station,
    cfg: IssuerConfig,
    client: AsyncClient,
    mut jobs: mpsc::Receiver<Job>,
) -> Counts {
    let mut counts = Counts::default();
    let ca_der = match station.device_ca_der() {
        Ok(d) => d,
        Err(e) => {
            warn!(error = %e, "cannot read the device CA; the issuer answers nothing");
            return counts;
        }
    };
    let mut tick = tokio::time::interval(cfg.tick);
    let mut requested: HashSet<DeviceId> = HashSet::new();
    loop {
        let job = tokio::select! {
            j = jobs.recv() => match j { Some(j) => j, None => return counts },
            _ = tick.tick() => {
                housekeeping(&station, &cfg, &client, &mut requested, &mut counts).await;
                continue;
            }
        };
        match job {
            Job::Active { device, payload } => {
                let seen = std::str::from_utf8(&payload).ok().and_then(|s| SerialNumber::parse(s).ok());
                match seen {
                    Some(serial) => match station.rotation_seen(&device, &serial).await {
                        Ok(true) => {
                            info!(%device, %serial, grace_s = cfg.policy.grace, "device runs on its rotated certificate")
                        }
                        Ok(false) => {}
                        Err(e) => warn!(%device, error = %e, "registry error"),
                    },
                    None => warn!(%device, "certs/active without a serial (is the broker fleet-broker?)"),
                }
            }
            Job::Csr { topic, payload } => {
                let Some(who) = asker(&topic) else { continue };
                let decision = match bound(&station, &who, &payload).await {
                    Ok(Ok(csr)) => match &who {
                        Asker::Device(id) => station.rotate_from_csr(id, csr, &cfg.policy).await,
                        Asker::Claim { claim, .. } => station.claim_from_csr(claim, csr).await,
                    },
                    Ok(Err(r)) => Ok(Err(r)),
                    Err(e) => Err(e),
                };
                let root = who.root();
                match decision {
                    Ok(Ok(Granted { device_id, cert, repeated })) => {
                        counts.issued += u64::from(!repeated);
                        info!(device = %device_id, serial = %cert.serial, repeated, via = %root, "certificate issued");
                        let mut chain = cert.der.clone();
                        chain.extend_from_slice(&ca_der);
                        publish(&client, root.with(&[level::CERTS, level::ISSUED]).to_string(), chain, false)
                            .await;
                        if let Asker::Device(id) = &who {
                            if requested.remove(id) {
                                publish(
                                    &client,
                                    root.with(&[level::CERTS, level::ROTATE]).to_string(),
                                    Vec::new(),
                                    true,
                                )
                                .await;
                            }
                        }
                    }
                    Ok(Err(r)) => {
                        counts.rejected += 1;
                        reject(&client, root, &r).await;
                    }
                    Err(e) => {
                        // A registry or CA failure: say so, the device retries later.
                        warn!(via = %root, error = %e, "cannot decide a CSR");
                        reject(
                            &client,
                            root,
                            &Rejected { label: "unavailable", detail: "issuer error; retry later".into() },
                        )
                        .await;
                    }
                }
            }
        }
    }
}

async fn reject(client: &AsyncClient, root: Root<'_>, r: &Rejected) {
    // The detail may quote the CSR (its CN): as a str field it is quoted and escaped.
    info!(via = %root, reason = r.label, detail = r.detail.as_str(), "CSR rejected");
    publish(client, root.with(&[level::CERTS, level::REJECTED]).to_string(), r.payload().into_bytes(), false)
        .await;
}

async fn publish(client: &AsyncClient, topic: String, payload: Vec<u8>, retain: bool) {
    if let Err(e) = client.publish(&topic, QoS::AtLeastOnce, retain, payload).await {
        warn!(topic = topic.as_str(), error = %e, "publish failed");
    }
}

/// Supersedes rotations past their grace period; (re)publishes operator requests.
async fn housekeeping(
    station: &Station,
    cfg: &IssuerConfig,
    client: &AsyncClient,
    requested: &mut HashSet<DeviceId>,
    counts: &mut Counts,
) {
    match station.supersede_due(cfg.policy.grace).await {
        Ok(done) => {
            for (device, serials) in done {
                counts.superseded += serials.len() as u64;
                let list: Vec<String> = serials.iter().map(SerialNumber::to_hex).collect();
                let revoked = list.join(",");
                info!(%device, %revoked, "old certificates revoked (superseded) after the grace period");
            }
        }
        Err(e) => warn!(error = %e, "cannot supersede due rotations"),
    }
    match station.registry.rotation_requests().await {
        Ok(reqs) => {
            for (device, _) in reqs {
                // Retained: a device that connects later still sees it when it subscribes.
                let topic = fleet_topic::device_certs(device.as_str(), level::ROTATE).to_string();
                publish(client, topic, b"rotate".to_vec(), true).await;
                requested.insert(device);
            }
        }
        Err(e) => warn!(error = %e, "cannot read rotation requests"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_are_parsed_strictly() {
        assert_eq!(
            asker("devices/dev-1/certs/csr"),
            Some(Asker::Device(DeviceId::parse("dev-1").unwrap_or_else(|_| unreachable!())))
        );
        assert!(matches!(asker("claims/batch-1/00ff00ff00ff00ff/certs/csr"), Some(Asker::Claim { .. })));
        for bad in [
            "devices/dev-1/certs/issued",
            "devices/BAD/certs/csr",
            "claims/b/n/certs/csr/x",
            "x/dev-1/certs/csr",
        ] {
            assert_eq!(asker(bad), None, "{bad}");
        }
        assert!(active_device("devices/dev-1/certs/active").is_some());
        assert!(active_device("devices/dev-1/certs/active/x").is_none());
    }
}
