//! One simulated device on the SDK: blocking, on its own thread, exactly like firmware, with its
//! identity in two credential slots (`slots.bin`) and certificate rotation over MQTT.
//!
//! Boot: the active slot's identity (the first boot provisions it from `credentials.bin`); if a
//! staged identity is waiting (a rotation that was cut before it was confirmed), it is tried
//! first. A staged identity the broker admits (CONNACK 0) is committed and announced on
//! `certs/active`; one refused three times is abandoned and the old identity goes on.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use fleet_device::client::{ClientError, Device, HostLink, Incoming};
use fleet_device::credentials::Credentials;
use fleet_device::mqtt::{Millis, QoS, SessionConfig, SessionError};
use fleet_device::rotation::{renewal_due, RotationConfig, Rotator};
use fleet_device::store::{CredentialStore, StoreError};
use fleet_device::topic;
use rand::RngCore as _;

use crate::ota::{OtaOpts, SimOta};
use crate::slots::{FileSlots, SlotError, SLOT_SIZE};
use crate::{Stats, StatsMap};

/// Updates one device's line of the run's table.
#[derive(Debug, Clone)]
pub(crate) struct Tracker {
    stats: Arc<Mutex<StatsMap>>,
    id: String,
}

impl Tracker {
    pub(crate) fn new(stats: &Arc<Mutex<StatsMap>>, id: &str) -> Self {
        let t = Self { stats: stats.clone(), id: id.to_owned() };
        t.update(|_| {});
        t
    }

    pub(crate) fn update(&self, f: impl FnOnce(&mut Stats)) {
        let mut m = self.stats.lock().unwrap_or_else(|p| p.into_inner());
        f(m.entry(self.id.clone()).or_default());
    }

    pub(crate) fn failed(&self, msg: String) {
        self.update(|s| {
            s.refusals += 1;
            s.connected = false;
            s.last_error = Some(msg);
        });
    }
}

/// What every simulated device of a run shares.
#[derive(Debug, Clone)]
pub(crate) struct DeviceOpts {
    pub(crate) port: Option<u16>,
    pub(crate) rate: f64,
    pub(crate) until: Instant,
    /// Rotate when the certificate expires within this many seconds.
    pub(crate) rotate_within: i64,
    pub(crate) rotation: RotationConfig,
    /// Simulate a power loss this many bytes into writing a staged identity.
    pub(crate) power_loss_at_stage: Option<usize>,
    /// Stop a device once it runs on a rotated certificate (for benchmarks).
    pub(crate) exit_when_rotated: bool,
    /// Stop a device once it confirmed an update and the report was acknowledged.
    pub(crate) exit_when_updated: bool,
    pub(crate) start: Instant,
    /// Firmware updates (`--ota-key`): offers are taken and downloaded into flash in memory.
    pub(crate) ota: Option<OtaOpts>,
}

pub(crate) fn unix_now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}

/// Serial (hex) of a DER certificate.
pub(crate) fn serial_of(der: &[u8]) -> String {
    use x509_parser::prelude::{FromDer, X509Certificate};
    X509Certificate::from_der(der).map(|(_, c)| hex(c.raw_serial())).unwrap_or_default()
}

pub(crate) fn hex(b: &[u8]) -> String {
    b.iter().map(|b| format!("{b:02x}")).collect()
}

/// One line per lifecycle event, on stdout: `event <ms> <device> <what> [detail]`.
pub(crate) fn event(start: Instant, id: &str, what: &str, detail: &str) {
    println!("event {} {id} {what} {detail}", start.elapsed().as_millis());
}

fn describe(e: &ClientError) -> String {
    e.to_string()
}

/// A refusal of the identity itself (as opposed to the network).
fn refused(e: &ClientError) -> bool {
    matches!(e, ClientError::Tls { .. } | ClientError::Session(SessionError::Refused(_)))
}

type Store = CredentialStore<FileSlots>;

fn store_err(e: StoreError<SlotError>) -> anyhow::Error {
    match e {
        StoreError::Storage(SlotError::Io(io)) => anyhow::anyhow!("credential slots: {io}"),
        StoreError::Storage(SlotError::PowerLost) => {
            anyhow::anyhow!("credential slots: power lost while writing")
        }
        other => anyhow::anyhow!("credential slots: {other}"),
    }
}

/// How a connection ended.
enum End {
    /// The run is over.
    Done,
    /// A new identity is staged: reconnect with it.
    Staged(Vec<u8>),
    /// The simulated power loss happened.
    PowerLost,
    /// An update was verified: reset into it (the simulated A/B swap).
    Reboot(fleet_device::release::Version),
}

pub(crate) fn run_device(dir: &Path, opts: &DeviceOpts, stats: &Arc<Mutex<StatsMap>>) -> anyhow::Result<()> {
    let mut store = CredentialStore::new(FileSlots::open(dir.join("slots.bin"))?);
    let mut buf = vec![0u8; SLOT_SIZE];
    let mut active = vec![0u8; SLOT_SIZE];
    let n = match store.load(&mut buf, &mut active) {
        Ok(n) => n,
        Err(StoreError::Empty) => {
            let factory =
                std::fs::read(dir.join("credentials.bin")).with_context(|| format!("{}", dir.display()))?;
            store.provision(&factory, &mut buf).map_err(store_err)?;
            active[..factory.len()].copy_from_slice(&factory);
            factory.len()
        }
        Err(e) => return Err(store_err(e)),
    };
    active.truncate(n);
    let mut cand = vec![0u8; SLOT_SIZE];
    let mut candidate = store.candidate(&mut buf, &mut cand).map_err(store_err)?.map(|n| cand[..n].to_vec());
    let id = Credentials::decode(&active)
        .map_err(|e| anyhow::anyhow!("{}: {e}", dir.display()))?
        .device_id
        .to_owned();
    let track = Tracker::new(stats, &id);
    let ms = || Millis(opts.start.elapsed().as_millis() as u64);
    let mut rotator = Rotator::new(opts.rotation);
    let mut rng = rand::rngs::OsRng;
    let mut next_sample = Instant::now();
    let mut seq = 0u32;
    let mut candidate_refusals = 0;
    let mut sim_ota = opts.ota.map(SimOta::new);
    if let Some(o) = &sim_ota {
        let v = o.running().to_string();
        track.update(|s| s.firmware = v);
    }
    if candidate.is_some() {
        event(opts.start, &id, "candidate-found", "a staged identity from before the restart");
    }
    // One pass per identity: the active one, or a staged candidate.
    while Instant::now() < opts.until {
        let trying = candidate.is_some();
        let bundle = candidate.clone().unwrap_or_else(|| active.clone());
        let mut creds =
            Credentials::decode(&bundle).map_err(|e| anyhow::anyhow!("{}: {e}", dir.display()))?;
        if let Some(p) = opts.port {
            creds.broker_port = p;
        }
        let serial = serial_of(creds.cert_der);
        track.update(|s| s.serial = serial);
        let mut device: Device<'_, 64, 256> = Device::new(creds, SessionConfig::default());
        let period = Duration::from_secs_f64(1.0 / opts.rate.max(0.01));
        let mut sample = |device: &mut Device<'_, 64, 256>| {
            while next_sample <= Instant::now() {
                seq += 1;
                if device.publish_telemetry(&(seq, 2000 + (seq % 50) as i32)).is_ok() {
                    track.update(|s| s.sent += 1);
                }
                next_sample += period;
            }
        };
        let end = loop {
            if Instant::now() >= opts.until {
                break End::Done;
            }
            sample(&mut device);
            let wait = device.reconnect_at().0.saturating_sub(ms().0);
            if wait > 0 {
                std::thread::sleep(
                    Duration::from_millis(wait).min(opts.until.saturating_duration_since(Instant::now())),
                );
                continue;
            }
            let tcp = match fleet_device::client::connect_tcp_to(device.broker(), Duration::from_millis(100))
            {
                Ok(t) => t,
                Err(e) => {
                    track.failed(format!("TCP {e}"));
                    device.disconnected(ms(), rng.next_u32());
                    continue;
                }
            };
            let mut session = Session {
                opts,
                id: &id,
                trying,
                store: &mut store,
                rotator: &mut rotator,
                active: &mut active,
                track: &track,
            };
            match session.run(&mut device, tcp, &mut sample, sim_ota.as_mut()) {
                Ok(End::Staged(b)) => break End::Staged(b),
                Ok(End::Reboot(version)) => {
                    if let Some(o) = sim_ota.as_mut() {
                        o.swap_to(version);
                    }
                    event(opts.start, &id, "ota-reset", &version.to_string());
                    track.update(|s| {
                        s.connected = false;
                        s.firmware = version.to_string();
                    });
                    device.disconnected(ms(), rng.next_u32());
                }
                Ok(other) => break other,
                Err(e) => {
                    let msg = describe(&e);
                    track.failed(msg.clone());
                    device.disconnected(ms(), rng.next_u32());
                    if trying && refused(&e) {
                        candidate_refusals += 1;
                        if candidate_refusals >= 3 {
                            store.abandon(&mut buf).map_err(store_err)?;
                            event(opts.start, &id, "candidate-abandoned", &msg);
                            break End::Staged(Vec::new());
                        }
                    }
                    if trying && session_committed(&active, &bundle) {
                        // Committed during the connection that just ended: not a candidate now.
                        break End::Staged(Vec::new());
                    }
                }
            }
        };
        match end {
            End::Done => return Ok(()),
            End::Reboot(_) => unreachable!("handled in the connection loop"),
            End::PowerLost => {
                event(opts.start, &id, "power-lost", "while writing the staged identity");
                track.update(|s| s.last_error = Some("power lost".into()));
                return Ok(());
            }
            End::Staged(b) if b.is_empty() => {
                candidate = None;
                candidate_refusals = 0;
            }
            End::Staged(b) => {
                candidate = Some(b);
                candidate_refusals = 0;
            }
        }
        if trying && session_committed(&active, &bundle) {
            candidate = None;
        }
    }
    Ok(())
}

fn session_committed(active: &[u8], bundle: &[u8]) -> bool {
    active == bundle
}

/// One connection of one identity.
struct Session<'s> {
    opts: &'s DeviceOpts,
    id: &'s str,
    /// This identity is a staged candidate.
    trying: bool,
    store: &'s mut Store,
    rotator: &'s mut Rotator,
    active: &'s mut Vec<u8>,
    track: &'s Tracker,
}

impl Session<'_> {
    fn run<'a>(
        &mut self,
        device: &mut Device<'a, 64, 256>,
        tcp: HostLink,
        sample: &mut dyn FnMut(&mut Device<'a, 64, 256>),
        ota: Option<&mut SimOta>,
    ) -> Result<End, ClientError> {
        let start = self.opts.start;
        let ms = || Millis(start.elapsed().as_millis() as u64);
        let (mut rx, mut tx) = (vec![0u8; 16_640], vec![0u8; 4096]);
        let mut rng = rand::rngs::OsRng;
        let mut conn = device.connect(tcp, &mut rx, &mut tx, &mut rng, Some(unix_now()), ms())?;
        // The SDK's updater for this connection (it resumes a job kept in the record).
        let (mut word, mut chunk_buf) = ([0u8; 4], vec![0u8; fleet_device::ota::MAX_CHUNK]);
        let mut updater = ota.map(|o| o.updater(&mut word, &mut chunk_buf));
        let mut csr = [0u8; 512];
        let mut buf = vec![0u8; SLOT_SIZE];
        let mut out = vec![0u8; SLOT_SIZE];
        loop {
            if Instant::now() >= self.opts.until {
                return Ok(End::Done);
            }
            sample(device);
            if device.session().is_connected() {
                if let Some(req) =
                    self.rotator.poll_csr(self.id, ms(), &mut csr).map_err(|_| ClientError::Serialize)?
                {
                    device.publish_now(&mut conn, topic::suffix::CERTS_CSR, req, ms())?;
                    let n = self.rotator.attempts();
                    self.track.update(|s| s.csrs += 1);
                    event(start, self.id, "csr-sent", &n.to_string());
                }
            }
            match device.poll(&mut conn, ms())? {
                Some(Incoming::Connected) => {
                    self.track.update(|s| {
                        s.connects += 1;
                        s.connected = true;
                    });
                    // Admitted with its certificate: an update on trial confirms itself.
                    if let Some(u) = updater.as_mut() {
                        u.connected();
                    }
                    let cert = device.credentials().cert_der;
                    if self.trying {
                        // Admitted with the staged identity: it becomes the active one.
                        self.store.commit(&mut buf, &mut out).map_err(|_| ClientError::Transport)?;
                        let now_active = self.store_active(&mut buf, &mut out)?;
                        *self.active = now_active;
                        self.trying = false;
                        self.rotator.finish();
                        device.publish(topic::suffix::CERTS_ACTIVE, b"", QoS::AtLeastOnce)?;
                        // Every QoS 1 message of the outbox is SENT, so that ACKED never passes it.
                        self.track.update(|s| s.sent += 1);
                        let serial = serial_of(cert);
                        self.track.update(|s| s.rotations += 1);
                        event(start, self.id, "rotated", &serial);
                        if self.opts.exit_when_rotated {
                            return Ok(End::Done);
                        }
                    } else if !self.rotator.in_progress()
                        && renewal_due(cert, unix_now(), self.opts.rotate_within)
                    {
                        self.rotator.start(&mut rng, ms());
                        event(start, self.id, "rotation-due", "");
                    }
                }
                Some(Incoming::Delivered) => self.track.update(|s| s.acked += 1),
                Some(Incoming::OtaOffer { manifest }) => match updater.as_mut() {
                    Some(u) => {
                        if u.offer(&manifest, ms()) {
                            event(start, self.id, "ota-offer-taken", "");
                        }
                    }
                    None => {
                        self.track.update(|s| s.last_error = Some("update offered, but no --ota-key".into()))
                    }
                },
                Some(Incoming::OtaChunk { payload }) => {
                    if let Some(u) = updater.as_mut() {
                        u.chunk(&payload, ms());
                    }
                }
                Some(Incoming::Command { name, payload }) => {
                    self.track.update(|s| s.commands += 1);
                    let ack = topic::suffix::ack(&name).to_string();
                    device.publish(&ack, &payload, QoS::AtLeastOnce)?;
                    self.track.update(|s| s.sent += 1);
                }
                Some(Incoming::CommandTooLarge { name_len, payload_len }) => {
                    let msg = format!("command too large: {name_len} B name, {payload_len} B payload");
                    self.track.update(|s| s.last_error = Some(msg.clone()));
                }
                Some(Incoming::Refused { reason }) => {
                    // The broker refused a message (MQTT 5): it is not sent again.
                    self.track.update(|s| {
                        s.acked += 1;
                        s.last_error =
                            Some(format!("a message was refused by the broker (reason 0x{reason:02x})"));
                    });
                }
                Some(Incoming::RotateRequested) if !self.trying => {
                    self.rotator.start(&mut rng, ms());
                    event(start, self.id, "rotate-requested", "");
                }
                Some(Incoming::RotateRequested) => {}
                Some(Incoming::Certificate { der }) => {
                    let creds = *device.credentials();
                    match self.rotator.bundle(&creds, self.id, &der, &mut out) {
                        Ok(n) => {
                            self.store.storage_mut().cut_after = self.opts.power_loss_at_stage;
                            match self.store.stage(&out[..n], &mut buf) {
                                Ok(()) => {
                                    event(start, self.id, "staged", &serial_of(&der));
                                    return Ok(End::Staged(out[..n].to_vec()));
                                }
                                Err(StoreError::Storage(SlotError::PowerLost)) => return Ok(End::PowerLost),
                                Err(e) => {
                                    event(start, self.id, "stage-failed", &e.to_string());
                                    self.rotator.rejected(ms());
                                }
                            }
                        }
                        Err(e) => {
                            event(start, self.id, "certificate-refused", &e.to_string());
                            self.rotator.rejected(ms());
                        }
                    }
                }
                Some(Incoming::CertificateRejected { reason }) => {
                    self.rotator.rejected(ms());
                    let r = reason.to_string();
                    self.track.update(|s| s.last_error = Some(format!("CSR rejected: {r}")));
                    event(start, self.id, "rejected", &r);
                }
                None => {}
            }
            if let Some(u) = updater.as_mut() {
                while device.session().is_connected() {
                    let Some(m) = u.poll_transmit(ms()) else { break };
                    if m.qos == QoS::AtMostOnce {
                        device.send_now(&mut conn, m.suffix, m.payload, m.qos, ms())?;
                        continue;
                    }
                    let status = String::from_utf8_lossy(m.payload).into_owned();
                    device.publish(m.suffix, m.payload, m.qos)?;
                    let state = serde_json::from_str::<serde_json::Value>(&status)
                        .ok()
                        .and_then(|v| v["state"].as_str().map(str::to_owned))
                        .unwrap_or_default();
                    self.track.update(|s| {
                        s.sent += 1;
                        s.updates += u64::from(state == "confirmed");
                        s.ota = state;
                    });
                    event(start, self.id, "ota-status", &status);
                }
                let mut confirmed = false;
                self.track.update(|s| confirmed = s.ota == "confirmed");
                if self.opts.exit_when_updated && confirmed && device.session().queued() == 0 {
                    let _ = device.disconnect(&mut conn);
                    return Ok(End::Done);
                }
                // Verified and every report stored: reset into the new image.
                if u.reset_due() && device.session().queued() == 0 {
                    let version = u.ota().job().map(|(m, _)| m.version);
                    if let Some(v) = version {
                        let _ = device.disconnect(&mut conn);
                        return Ok(End::Reboot(v));
                    }
                }
            }
        }
    }

    fn store_active(&mut self, buf: &mut [u8], out: &mut [u8]) -> Result<Vec<u8>, ClientError> {
        let n = self.store.load(buf, out).map_err(|_| ClientError::Transport)?;
        Ok(out[..n].to_vec())
    }
}

/// Fails if `dir` holds no identity at all.
pub(crate) fn check_dir(dir: &Path) -> anyhow::Result<()> {
    if !dir.join("credentials.bin").is_file() && !dir.join("slots.bin").is_file() {
        bail!("{}: no credentials.bin or slots.bin", dir.display());
    }
    Ok(())
}
