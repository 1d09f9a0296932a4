//! Claim-based first boot (docs/spec/rotation.md): a device that holds only its batch's claim
//! credentials generates its key, asks for its own identity on
//! `claims/<claim>/<nonce>/certs/csr`, stores what the issuer returns in its credential slots and
//! connects as itself. The key never leaves the device; the station sees only the CSR.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use fleet_device::client::{Device, Incoming};
use fleet_device::credentials::Credentials;
use fleet_device::mqtt::{Millis, SessionConfig};
use fleet_device::rotation::{RotationConfig, Rotator};
use fleet_device::store::CredentialStore;
use fleet_device::topic;
use rand::RngCore as _;

use crate::device::{event, hex, serial_of};
use crate::slots::{FileSlots, SLOT_SIZE};

#[derive(Debug, Clone)]
pub(crate) struct ClaimOpts {
    pub(crate) claim: PathBuf,
    pub(crate) count: usize,
    /// None: the claim's own, from `CLAIM/id-prefix`.
    pub(crate) prefix: Option<String>,
    pub(crate) out: PathBuf,
    pub(crate) port: Option<u16>,
    pub(crate) until: Instant,
    pub(crate) rotation: RotationConfig,
}

/// The rejection reasons (docs/spec/rotation.md, "Rejection reasons") after which asking
/// again cannot succeed: the claim, the CSR or the id is wrong for good. Anything else
/// (`unavailable`, `rate_limited`, `not_due`, an unknown reason) is asked again with back-off.
const PERMANENT: [&str; 9] = [
    "claim_invalid",
    "claim_exhausted",
    "bad_id",
    "id_taken",
    "bad_csr",
    "id_mismatch",
    "unknown_device",
    "revoked",
    "unbound",
];

/// Whether a `certs/rejected` payload (`<reason>: <detail>`) is final.
fn is_permanent(rejection: &str) -> bool {
    let reason = rejection.split(':').next().unwrap_or_default().trim();
    PERMANENT.contains(&reason)
}

/// The id prefix for devices of the claim in `dir`: `--prefix`, else `dir/id-prefix`.
fn claim_prefix(dir: &std::path::Path, given: Option<&str>) -> anyhow::Result<String> {
    if let Some(p) = given {
        return Ok(p.to_owned());
    }
    let path = dir.join("id-prefix");
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "{}: the claim's id prefix (written by `fleet-provision claim-cert`; or pass --prefix)",
            path.display()
        )
    })?;
    let prefix = text.trim();
    if prefix.is_empty() {
        bail!("{}: empty id prefix", path.display());
    }
    Ok(prefix.to_owned())
}

/// Boots `count` devices, each on its own thread; fails if any did not get its identity.
pub(crate) fn run(opts: &ClaimOpts) -> anyhow::Result<()> {
    let path = opts.claim.join("credentials.bin");
    let claim = std::fs::read(&path).with_context(|| format!("{}", path.display()))?;
    Credentials::decode(&claim).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let prefix = claim_prefix(&opts.claim, opts.prefix.as_deref())?;
    std::fs::create_dir_all(&opts.out).with_context(|| format!("{}", opts.out.display()))?;
    let start = Instant::now();
    let threads: Vec<_> = (0..opts.count)
        .map(|_| {
            let (claim, opts, prefix) = (claim.clone(), opts.clone(), prefix.clone());
            std::thread::spawn(move || first_boot(&claim, &opts, &prefix, start))
        })
        .collect();
    let mut failed = 0;
    for t in threads {
        match t.join() {
            Ok(Ok(id)) => println!("fleet-sim: {id} booted with its own identity"),
            Ok(Err(e)) => {
                failed += 1;
                eprintln!("fleet-sim: first boot failed: {}", crate::report(e.as_ref()));
            }
            Err(_) => failed += 1,
        }
    }
    println!("fleet-sim: {} of {} devices have their own identity", opts.count - failed, opts.count);
    if failed > 0 {
        bail!("{failed} device(s) did not complete their first boot");
    }
    Ok(())
}

/// One device: claim session → own identity in its slots → a session as itself.
fn first_boot(claim: &[u8], opts: &ClaimOpts, prefix: &str, start: Instant) -> anyhow::Result<String> {
    let mut rng = rand::rngs::OsRng;
    let mut claim_creds = Credentials::decode(claim).map_err(|e| anyhow::anyhow!("claim bundle: {e}"))?;
    if let Some(p) = opts.port {
        claim_creds.broker_port = p;
    }
    let mut id_bytes = [0u8; 6];
    rng.fill_bytes(&mut id_bytes);
    let id = format!("{prefix}-{}", hex(&id_bytes));
    let mut nonce = [0u8; 16];
    rng.fill_bytes(&mut nonce);
    let client_id = topic::claim_session(claim_creds.device_id, &hex(&nonce)).to_string();
    let ms = || Millis(start.elapsed().as_millis() as u64);
    let mut rotator = Rotator::new(opts.rotation);
    rotator.start(&mut rng, ms());
    let mut device: Device<'_, 4, 64> = Device::new_claim(claim_creds, &client_id, SessionConfig::default());
    let mut bundle = vec![0u8; SLOT_SIZE];
    let mut last = String::from("no answer");
    // 1. The claim session: ask until the issuer answers with a certificate.
    let n = 'claim: loop {
        if Instant::now() >= opts.until {
            bail!("{id}: no identity before the deadline ({last})");
        }
        let wait = device.reconnect_at().0.saturating_sub(ms().0);
        if wait > 0 {
            std::thread::sleep(Duration::from_millis(wait));
        }
        let tcp = match fleet_device::client::connect_tcp_to(device.broker(), Duration::from_millis(100)) {
            Ok(t) => t,
            Err(e) => {
                last = format!("TCP {e}");
                device.disconnected(ms(), rng.next_u32());
                continue;
            }
        };
        let (mut rx, mut tx) = (vec![0u8; 16_640], vec![0u8; 4096]);
        let mut conn =
            match device.connect(tcp, &mut rx, &mut tx, &mut rng, Some(crate::device::unix_now()), ms()) {
                Ok(c) => c,
                Err(e) => {
                    last = format!("{e}");
                    device.disconnected(ms(), rng.next_u32());
                    continue;
                }
            };
        let mut csr = [0u8; 512];
        loop {
            if Instant::now() >= opts.until {
                bail!("{id}: no identity before the deadline ({last})");
            }
            if device.session().is_connected() {
                if let Some(req) =
                    rotator.poll_csr(&id, ms(), &mut csr).map_err(|e| anyhow::anyhow!("CSR: {e}"))?
                {
                    if device.publish_now(&mut conn, topic::suffix::CERTS_CSR, req, ms()).is_err() {
                        break;
                    }
                    event(start, &id, "claim-csr-sent", &rotator.attempts().to_string());
                }
            }
            match device.poll(&mut conn, ms()) {
                Ok(Some(Incoming::Certificate { der })) => {
                    match rotator.bundle(&claim_creds, &id, &der, &mut bundle) {
                        Ok(n) => break 'claim n,
                        Err(e) => {
                            last = format!("certificate refused: {e}");
                            rotator.rejected(ms());
                        }
                    }
                }
                Ok(Some(Incoming::CertificateRejected { reason })) => {
                    event(start, &id, "claim-rejected", &reason);
                    if is_permanent(&reason) {
                        bail!("{id}: the issuer refused for good: {reason}");
                    }
                    last = reason.to_string();
                    rotator.rejected(ms());
                }
                Ok(_) => {}
                Err(e) => {
                    last = format!("{e}");
                    break;
                }
            }
        }
        device.disconnected(ms(), rng.next_u32());
    };
    bundle.truncate(n);
    // 2. Stored: the identity is the device's own from now on.
    let dir = opts.out.join(&id);
    std::fs::create_dir_all(&dir)?;
    let mut store = CredentialStore::new(FileSlots::open(dir.join("slots.bin"))?);
    let mut buf = vec![0u8; SLOT_SIZE];
    store.provision(&bundle, &mut buf).map_err(|e| anyhow::anyhow!("store: {e}"))?;
    std::fs::write(dir.join("credentials.bin"), &bundle)?;
    rotator.finish();
    let own = Credentials::decode(&bundle).map_err(|e| anyhow::anyhow!("own bundle: {e}"))?;
    event(start, &id, "claimed", &serial_of(own.cert_der));
    // 3. As itself: one telemetry message, acknowledged.
    let mut device: Device<'_, 4, 64> = Device::new(own, SessionConfig::default());
    let tcp = fleet_device::client::connect_tcp(&own, Duration::from_millis(100))?;
    let (mut rx, mut tx) = (vec![0u8; 16_640], vec![0u8; 4096]);
    let mut conn = device
        .connect(tcp, &mut rx, &mut tx, &mut rng, Some(crate::device::unix_now()), ms())
        .map_err(|e| anyhow::anyhow!("{id}: own identity refused: {e}"))?;
    device.publish_telemetry(&1u32).map_err(|e| anyhow::anyhow!("{e}"))?;
    loop {
        if Instant::now() >= opts.until {
            bail!("{id}: no acknowledgement as itself before the deadline");
        }
        match device.poll(&mut conn, ms()).map_err(|e| anyhow::anyhow!("{id}: as itself: {e}"))? {
            Some(Incoming::Delivered) => break,
            _ => continue,
        }
    }
    event(start, &id, "first-boot-done", "");
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permanent_rejections_are_the_specs_final_reasons() {
        assert!(is_permanent("bad_id: claim `batch` creates devices named `sensor-...`, not `dev-1`"));
        assert!(is_permanent("claim_exhausted: quota 3 used"));
        assert!(!is_permanent("unavailable: registry error"));
        assert!(!is_permanent("rate_limited: rotated 10 s ago"));
        assert!(!is_permanent("something_new: later"));
    }

    #[test]
    fn the_prefix_comes_from_the_claim_unless_given() {
        let dir = tempfile::tempdir().unwrap();
        assert!(claim_prefix(dir.path(), None).is_err(), "no file, no flag");
        std::fs::write(dir.path().join("id-prefix"), "sensor").unwrap();
        assert_eq!(claim_prefix(dir.path(), None).unwrap(), "sensor");
        assert_eq!(claim_prefix(dir.path(), Some("other")).unwrap(), "other");
    }
}
