//! One task per connection: TLS handshake (with a deadline), admission, CONNECT identity binding,
//! then the MQTT session until the client leaves, the broker kicks it, or the broker stops.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::BytesMut;
use fleet_registry::Status;
use fleet_registry::{DeviceId, SerialNumber};
use futures_util::stream::{FuturesOrdered, StreamExt};
use futures_util::FutureExt;
use rumqttc::mqttbytes::v4::{
    ConnAck, ConnectReturnCode, Packet, PubAck, Publish, SubAck, SubscribeReasonCode, UnsubAck,
};
use rumqttc::mqttbytes::{Error as MqttError, QoS};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::{sleep_until, timeout, Instant};
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::auth::{self, Identity};
use crate::store::Message;
use crate::{tls, Shared};

/// Live sessions by device id: at most one per id.
///
/// It also remembers every serial the revocation watcher has reported since the broker started,
/// under the same lock as the sessions: a session registered after its serial was reported is cut
/// at registration, one registered before is cut by the watcher. That closes the window between
/// the admission query and registration without a second registry round trip per admission.
#[derive(Debug, Default)]
pub struct Sessions {
    inner: Mutex<SessionsInner>,
}

#[derive(Debug, Default)]
struct SessionsInner {
    live: HashMap<DeviceId, LiveSession>,
    revoked: std::collections::HashSet<SerialNumber>,
}

#[derive(Debug, Clone)]
struct LiveSession {
    conn_id: u64,
    serial: SerialNumber,
    kick: Kick,
}

/// Cuts a session, remembering why (for the `kicks_total{reason}` metric).
#[derive(Debug, Clone, Default)]
struct Kick {
    token: CancellationToken,
    reason: Arc<std::sync::OnceLock<&'static str>>,
}

impl Kick {
    fn cut(&self, reason: &'static str) {
        let _ = self.reason.set(reason);
        self.token.cancel();
    }
    fn reason(&self) -> &'static str {
        self.reason.get().copied().unwrap_or("unknown")
    }
}

impl Sessions {
    fn lock(&self) -> std::sync::MutexGuard<'_, SessionsInner> {
        // Single inserts/removes: a poisoned map is still consistent.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a session, returning the kick handle of the one it replaces. A session whose
    /// serial the watcher already reported as revoked is cut at once.
    fn register(&self, id: &DeviceId, s: LiveSession) -> Option<Kick> {
        let mut m = self.lock();
        if m.revoked.contains(&s.serial) {
            s.kick.cut("revoked");
        }
        m.live.insert(id.clone(), s).map(|old| old.kick)
    }

    fn remove(&self, id: &DeviceId, conn_id: u64) {
        let mut m = self.lock();
        if m.live.get(id).is_some_and(|s| s.conn_id == conn_id) {
            m.live.remove(id);
        }
    }

    /// Records that certificate `serial` of `id` is revoked and cuts the session running on it,
    /// if any. Returns whether one was cut.
    pub fn kick_serial(&self, id: &DeviceId, serial: &SerialNumber) -> bool {
        let mut m = self.lock();
        m.revoked.insert(serial.clone());
        match m.live.get(id) {
            Some(s) if &s.serial == serial => {
                s.kick.cut("revoked");
                true
            }
            _ => false,
        }
    }

    /// True if the watcher has reported `serial` as revoked.
    pub fn is_revoked(&self, serial: &SerialNumber) -> bool {
        self.lock().revoked.contains(serial)
    }

    /// Number of live sessions.
    pub fn len(&self) -> usize {
        self.lock().live.len()
    }

    /// True when no session is live.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Registry verdicts for active certificates, so an admission needs no database round trip.
///
/// Fed by the revocation watcher: every revocation it reports removes the serial here (and the
/// session table remembers it as revoked, checked first). An entry is used only while the
/// watcher's last successful poll is recent (`FEED_FRESH`): if the registry or the feed is down,
/// admissions go back to the database and fail closed. A revocation is therefore refused from the
/// moment the watcher sees it (at once on PostgreSQL NOTIFY, within `revocation_poll_ms` on
/// SQLite), and a session admitted just before is cut by the watcher as before.
#[derive(Debug, Default)]
pub struct AdmissionCache {
    entries: Mutex<HashMap<SerialNumber, (DeviceId, fleet_registry::Role)>>,
    /// Unix milliseconds of the watcher's last successful poll.
    feed_ok_ms: std::sync::atomic::AtomicI64,
}

/// How long after the watcher's last successful poll the cache is trusted.
const FEED_FRESH_MS: i64 = 5_000;
/// Most cached verdicts (about 100 bytes each); the cache starts over when full.
const ADMISSION_CACHE_MAX: usize = 200_000;

impl AdmissionCache {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<SerialNumber, (DeviceId, fleet_registry::Role)>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The watcher polled the registry successfully just now.
    pub fn feed_ok(&self) {
        self.feed_ok_ms.store(now_millis(), std::sync::atomic::Ordering::Relaxed);
    }

    /// Forgets a revoked certificate.
    pub fn revoked(&self, serial: &SerialNumber) {
        self.lock().remove(serial);
    }

    fn get(&self, serial: &SerialNumber) -> Option<(DeviceId, fleet_registry::Role)> {
        let fresh = now_millis() - self.feed_ok_ms.load(std::sync::atomic::Ordering::Relaxed) < FEED_FRESH_MS;
        if !fresh {
            return None;
        }
        self.lock().get(serial).cloned()
    }

    fn insert(&self, serial: SerialNumber, id: DeviceId, role: fleet_registry::Role) {
        let mut m = self.lock();
        if m.len() >= ADMISSION_CACHE_MAX {
            m.clear();
        }
        m.insert(serial, (id, role));
    }
}

/// Connections per source address still in the pre-admission phase (TLS handshake + CONNECT):
/// one address cannot hold more than `max_pre_admission_per_source` of the broker's connection
/// slots with sockets that never authenticate.
#[derive(Debug, Default)]
pub struct PreAdmission {
    inner: Mutex<HashMap<IpAddr, usize>>,
}

/// A connection counted in [`PreAdmission`] until dropped (at admission or when it ends).
#[derive(Debug)]
pub struct PreAdmissionSlot {
    table: Arc<PreAdmission>,
    ip: IpAddr,
}

impl PreAdmission {
    /// Counts a connection from `ip`, or `None` if `ip` already has `max` in the phase.
    pub fn enter(self: &Arc<Self>, ip: IpAddr, max: usize) -> Option<PreAdmissionSlot> {
        let mut m = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let n = m.entry(ip).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(PreAdmissionSlot { table: self.clone(), ip })
    }
}

impl Drop for PreAdmissionSlot {
    fn drop(&mut self) {
        let mut m = self.table.inner.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = m.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.ip);
            }
        }
    }
}

/// Rate-limits one kind of log line: at most one per interval, saying how many were skipped.
#[derive(Debug)]
pub struct LogLimiter {
    every: Duration,
    next: Option<Instant>,
    skipped: u64,
}

impl LogLimiter {
    /// One line per `every`.
    pub fn new(every: Duration) -> Self {
        Self { every, next: None, skipped: 0 }
    }

    /// `Some(skipped since the last line)` if a line may be written now.
    pub fn allow(&mut self) -> Option<u64> {
        let now = Instant::now();
        if self.next.is_some_and(|n| now < n) {
            self.skipped += 1;
            return None;
        }
        self.next = Some(now + self.every);
        Some(std::mem::take(&mut self.skipped))
    }
}

/// An admission refusal: metric reason and CONNACK code.
#[derive(Debug, Clone, Copy)]
struct Refusal {
    reason: &'static str,
    code: ConnectReturnCode,
}

const NOT_AUTHORIZED: ConnectReturnCode = ConnectReturnCode::NotAuthorized;

fn now_unix() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

fn now_millis() -> i64 {
    (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64
}

async fn admit(shared: &Shared, cert: &[u8]) -> Result<Identity, Refusal> {
    let id = auth::identify(cert).map_err(|e| Refusal { reason: e.reason(), code: NOT_AUTHORIZED })?;
    let crl_expired = shared.tls.load().crl.as_ref().is_some_and(|c| c.expired(now_unix()));
    if crl_expired && shared.config.crl_policy == crate::config::CrlPolicy::FailClosed {
        return Err(Refusal { reason: "crl_expired", code: ConnectReturnCode::ServiceUnavailable });
    }
    if shared.sessions.is_revoked(&id.serial) {
        return Err(Refusal { reason: "revoked", code: NOT_AUTHORIZED });
    }
    if let Some((device_id, role)) = shared.admissions.get(&id.serial) {
        shared.metrics.admission_cache.with_label_values(&["hit"]).inc();
        return if device_id == id.id && role == id.role {
            Ok(id)
        } else {
            Err(Refusal { reason: "bad_identity", code: NOT_AUTHORIZED })
        };
    }
    shared.metrics.admission_cache.with_label_values(&["miss"]).inc();
    match shared.registry.admission(&id.serial).await {
        Err(e) => {
            warn!(error = %e, "registry unavailable during admission");
            Err(Refusal { reason: "registry_unavailable", code: ConnectReturnCode::ServiceUnavailable })
        }
        Ok(None) => Err(Refusal { reason: "unknown_device", code: NOT_AUTHORIZED }),
        Ok(Some(a)) if a.device_id != id.id || a.role != id.role => {
            Err(Refusal { reason: "bad_identity", code: NOT_AUTHORIZED })
        }
        Ok(Some(a)) if a.device_status == Status::Revoked || a.cert_status == Status::Revoked => {
            Err(Refusal { reason: "revoked", code: NOT_AUTHORIZED })
        }
        Ok(Some(a)) => {
            shared.admissions.insert(id.serial.clone(), a.device_id, a.role);
            Ok(id)
        }
    }
}

type Tls = TlsStream<TcpStream>;

/// Why a session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    ClientGone,
    Kicked,
    Shutdown,
    Protocol(&'static str),
    Acl,
    StoreFailed,
    /// The peer stopped accepting bytes for `write_timeout_secs`.
    WriteTimeout,
    /// A per-session cap was hit (metric label).
    Limit(&'static str),
}

/// The end of a session whose write failed: a timeout, or the peer went away.
fn write_end(e: std::io::Error) -> End {
    if e.kind() == std::io::ErrorKind::TimedOut {
        End::WriteTimeout
    } else {
        End::ClientGone
    }
}

struct Conn {
    tls: Box<Tls>,
    buf: BytesMut,
    out: BytesMut,
    max_packet: usize,
    write_timeout: Duration,
}

impl Conn {
    /// Reads until one packet is complete. `Ok(None)`: the peer closed.
    async fn read_packet(&mut self) -> Result<Option<Packet>, &'static str> {
        loop {
            if let Some(p) = self.parse()? {
                return Ok(Some(p));
            }
            if !self.read_more().await {
                return Ok(None);
            }
        }
    }

    /// Reads more bytes; false when the peer closed. An idle session holds no read buffer (see
    /// `release_buffers`): the first read after idling takes what fits in 64 bytes (a PINGREQ),
    /// and a read that fills the buffer grows it for the next one.
    async fn read_more(&mut self) -> bool {
        let r = self.tls.read_buf(&mut self.buf).await;
        self.grow_if_full();
        matches!(r, Ok(n) if n > 0)
    }

    fn grow_if_full(&mut self) {
        if self.buf.len() == self.buf.capacity() {
            self.buf.reserve(READ_CHUNK);
        }
    }

    /// Frees the read and write buffers of an idle session (nothing buffered).
    fn release_buffers(&mut self) {
        if self.buf.is_empty() {
            self.buf = BytesMut::new();
        }
        self.out = BytesMut::new();
    }

    fn parse(&mut self) -> Result<Option<Packet>, &'static str> {
        decode_client_packet(&mut self.buf, self.max_packet)
    }

    async fn send(&mut self, p: Packet) -> std::io::Result<()> {
        self.out.clear();
        if p.write(&mut self.out, self.max_packet).is_err() {
            return Ok(()); // too large for this client: dropped (counted by the caller's metrics)
        }
        self.flush_out().await
    }

    /// Writes the encoded packets in `out`, failing with `TimedOut` if the peer accepts no
    /// bytes for the write timeout.
    async fn flush_out(&mut self) -> std::io::Result<()> {
        let write = async {
            self.tls.write_all(&self.out).await?;
            self.tls.flush().await
        };
        match timeout(self.write_timeout, write).await {
            Ok(r) => r,
            Err(_) => Err(std::io::ErrorKind::TimedOut.into()),
        }
    }
}

/// Takes one complete MQTT packet off the front of `buf` (bytes a client sent). `Ok(None)`: more
/// bytes are needed; `Err(reason)`: the session must be closed (the metric reason). Sans-IO, so
/// the fuzzer drives exactly what a session runs.
pub fn decode_client_packet(buf: &mut BytesMut, max_packet: usize) -> Result<Option<Packet>, &'static str> {
    if buf.is_empty() {
        return Ok(None);
    }
    match Packet::read(buf, max_packet) {
        Ok(p) => Ok(Some(p)),
        Err(MqttError::InsufficientBytes(_)) => Ok(None),
        Err(MqttError::PayloadSizeLimitExceeded(_)) => Err("packet_too_large"),
        Err(_) => Err("malformed_packet"),
    }
}

/// TLS handshake with its deadline. The stream is returned boxed and this future is awaited
/// boxed: an `async fn` keeps a slot for every value it moves (the handshake future, the stream it
/// yields, the connection holding it), and a connection task that carries all three for its
/// whole life costs ~2 KiB more per idle session.
async fn accept_tls(shared: &Shared, sock: TcpStream, peer: SocketAddr) -> Option<Box<Tls>> {
    let _ = sock.set_nodelay(true);
    let acceptor = tokio_rustls::TlsAcceptor::from(shared.tls.load().config.clone());
    tokio::select! {
        r = timeout(shared.config.handshake_timeout(), acceptor.accept(sock)) => match r {
            Err(_) => {
                shared.metrics.handshake(false, "handshake_timeout");
                debug!(%peer, "handshake timed out");
                None
            }
            Ok(Err(e)) => {
                let reason = tls::handshake_failure_reason(&e);
                shared.metrics.handshake(false, reason);
                info!(%peer, reason, error = %e, "TLS handshake refused");
                None
            }
            Ok(Ok(s)) => Some(Box::new(s)),
        },
        _ = shared.shutdown.cancelled() => None,
    }
}

/// Serves one accepted TCP connection to the end.
pub(crate) async fn handle(
    shared: Arc<Shared>,
    sock: TcpStream,
    peer: SocketAddr,
    conn_id: u64,
    pre_admission: PreAdmissionSlot,
) {
    let Some(tls) = Box::pin(accept_tls(&shared, sock, peer)).await else { return };
    let Some(cert) = tls.get_ref().1.peer_certificates().and_then(|c| c.first()).map(|c| c.to_vec()) else {
        shared.metrics.handshake(false, "no_certificate");
        return;
    };
    // Boxed, like the session loop below: the registry query and the loop are big futures that are
    // never live together, and a connection task should only carry the one it is in.
    let admission = Box::pin(admit(&shared, &cert)).await;
    let mut conn = Conn {
        tls,
        buf: BytesMut::new(),
        out: BytesMut::new(),
        max_packet: shared.config.max_packet_size,
        write_timeout: shared.config.write_timeout(),
    };

    // CONNECT must come first, within the deadline.
    let connect = match timeout(shared.config.connect_timeout(), conn.read_packet()).await {
        Ok(Ok(Some(Packet::Connect(c)))) => c,
        Ok(Ok(Some(_))) | Ok(Err(_)) => {
            shared.metrics.handshake(false, "protocol_error");
            return;
        }
        Ok(Ok(None)) => {
            shared.metrics.handshake(false, "peer_closed");
            return;
        }
        Err(_) => {
            shared.metrics.handshake(false, "connect_timeout");
            return;
        }
    };
    let id = match admission {
        Err(r) => {
            shared.metrics.handshake(false, r.reason);
            let serial_hex = cert_serial_hex(&cert);
            warn!(%peer, serial = %serial_hex, client_id = %connect.client_id, reason = r.reason, "connection refused");
            let _ = conn.send(Packet::ConnAck(ConnAck::new(r.code, false))).await;
            let _ = conn.tls.shutdown().await;
            return;
        }
        Ok(id) => id,
    };
    drop(cert);
    if !connect.client_id.is_empty() && connect.client_id != id.id.as_str() {
        shared.metrics.handshake(false, "client_id_mismatch");
        warn!(%peer, device = %id.id, serial = %id.serial, client_id = %connect.client_id, reason = "client_id_mismatch", "connection refused");
        let _ = conn.send(Packet::ConnAck(ConnAck::new(ConnectReturnCode::BadClientId, false))).await;
        let _ = conn.tls.shutdown().await;
        return;
    }

    drop(pre_admission);
    let kick = Kick::default();
    let live = LiveSession { conn_id, serial: id.serial.clone(), kick: kick.clone() };
    if let Some(old) = shared.sessions.register(&id.id, live) {
        info!(device = %id.id, "a new connection replaces the live session of this device");
        old.cut("takeover");
    }
    // A revocation that landed between the admission query and registration is cut by
    // `register` (the watcher reported it already) or by the watcher (it reports it later).
    shared.metrics.handshake(true, "ok");
    shared.metrics.sessions_live.inc();
    info!(%peer, device = %id.id, role = id.role.as_str(), serial = %id.serial, "session admitted");
    let keep_alive = Duration::from_secs(u64::from(connect.keep_alive));
    let end = match conn.send(Packet::ConnAck(ConnAck::new(ConnectReturnCode::Success, false))).await {
        Ok(()) => run(&shared, &mut conn, &id, conn_id, keep_alive, &kick).await,
        Err(e) => write_end(e),
    };
    shared.router.remove_connection(conn_id);
    shared.sessions.remove(&id.id, conn_id);
    shared.metrics.sessions_live.dec();
    match end {
        End::Kicked => {
            let reason = kick.reason();
            shared.metrics.kicks.with_label_values(&[reason]).inc();
            info!(device = %id.id, serial = %id.serial, reason, "session cut");
        }
        End::Protocol(reason) => {
            shared.metrics.protocol_errors.with_label_values(&[reason]).inc();
            info!(device = %id.id, reason, "session closed for a protocol violation");
        }
        End::WriteTimeout => {
            shared.metrics.kicks.with_label_values(&["write_timeout"]).inc();
            warn!(device = %id.id, reason = "write_timeout", "session closed: the peer accepts no data");
        }
        End::Limit(limit) => {
            shared.metrics.kicks.with_label_values(&[limit]).inc();
            warn!(device = %id.id, reason = limit, "session closed: limit exceeded");
        }
        other => debug!(device = %id.id, ?other, "session ended"),
    }
    let _ = timeout(Duration::from_secs(1), conn.tls.shutdown()).await;
}

fn cert_serial_hex(der: &[u8]) -> String {
    use x509_parser::prelude::FromDer;
    x509_parser::certificate::X509Certificate::from_der(der)
        .ok()
        .and_then(|(_, c)| SerialNumber::from_bytes(c.raw_serial()))
        .map(|s| s.to_hex())
        .unwrap_or_default()
}

const MAX_PENDING_ACKS: usize = 1024;
/// Read buffer growth step.
const READ_CHUNK: usize = 4096;
/// A session that read nothing for this long gives its buffers back.
const IDLE_RELEASE: Duration = Duration::from_secs(2);
/// Longest single timer for the certificate-expiry check (tokio timers cap at ~2 years).
const EXPIRY_RECHECK: Duration = Duration::from_secs(86_400);

/// Per-session state of the MQTT loop.
struct Local {
    tx: mpsc::Sender<Box<Publish>>,
    pending: FuturesOrdered<PendingAck>,
    /// Filters held, for the subscription cap.
    subs: HashSet<String>,
    acl_log: LogLimiter,
    limit_log: LogLimiter,
}

/// Runs `f` unless the session is kicked or the broker stops first: a stuck write never delays
/// a revocation, a takeover or shutdown.
async fn guarded<T>(
    shared: &Shared,
    kick: &Kick,
    f: impl std::future::Future<Output = Result<T, End>>,
) -> Result<T, End> {
    tokio::select! {
        biased;
        _ = kick.token.cancelled() => Err(End::Kicked),
        _ = shared.shutdown.cancelled() => Err(End::Shutdown),
        r = f => r,
    }
}

/// When the certificate's notAfter passes, or the next re-check (whichever is first).
fn expiry_check_at(not_after: i64) -> Instant {
    let left = u64::try_from(not_after.saturating_sub(now_unix())).unwrap_or(0);
    Instant::now() + Duration::from_secs(left).min(EXPIRY_RECHECK)
}

async fn run(
    shared: &Shared,
    conn: &mut Conn,
    id: &Identity,
    conn_id: u64,
    keep_alive: Duration,
    kick: &Kick,
) -> End {
    let (tx, mut rx) = mpsc::channel::<Box<Publish>>(shared.config.max_queued_messages);
    let every = shared.config.log_interval();
    let mut local = Local {
        tx,
        pending: FuturesOrdered::new(),
        subs: HashSet::new(),
        acl_log: LogLimiter::new(every),
        limit_log: LogLimiter::new(every),
    };
    let mut next_pkid: u16 = 0;
    // MQTT 3.1.1 §3.1.2.10: the server closes after 1.5 keep-alive periods without a packet.
    let grace = keep_alive.mul_f64(1.5);
    let mut deadline = Instant::now() + grace;
    let mut idle_at = Instant::now() + IDLE_RELEASE;
    let mut expiry_at = expiry_check_at(id.not_after);
    loop {
        // Packets already buffered are handled before reading more.
        let packet = match conn.parse() {
            Err(reason) => return End::Protocol(reason),
            Ok(Some(p)) => Some(p),
            Ok(None) => None,
        };
        if let Some(p) = packet {
            if !keep_alive.is_zero() {
                deadline = Instant::now() + grace;
            }
            // Boxed: an idle session should not carry the state of packet handling.
            let handled = Box::pin(handle_packet(shared, conn, id, conn_id, p, &mut local));
            match guarded(shared, kick, handled).await {
                Ok(()) => continue,
                Err(end) => return end,
            }
        }
        tokio::select! {
            biased;
            _ = kick.token.cancelled() => return End::Kicked,
            _ = shared.shutdown.cancelled() => return End::Shutdown,
            _ = sleep_until(expiry_at) => {
                if now_unix() >= id.not_after {
                    kick.cut("cert_expired");
                    return End::Kicked;
                }
                expiry_at = expiry_check_at(id.not_after);
            }
            Some((pkid, stored)) = local.pending.next(), if !local.pending.is_empty() => {
                // A group commit completes many messages at once: their PUBACKs leave in one
                // write, in order, stopping at the first that was not stored.
                let mut acks = vec![(pkid, stored)];
                while let Some(Some(done)) = local.pending.next().now_or_never() {
                    acks.push(done);
                }
                conn.out.clear();
                let mut failed = false;
                for (pkid, stored) in acks {
                    if !stored {
                        failed = true;
                        break;
                    }
                    if Packet::PubAck(PubAck::new(pkid)).write(&mut conn.out, conn.max_packet).is_err() {
                        return End::Protocol("encode");
                    }
                }
                if !conn.out.is_empty() {
                    if let Err(end) = guarded(shared, kick, async { conn.flush_out().await.map_err(write_end) }).await {
                        return end;
                    }
                }
                if failed {
                    return End::StoreFailed;
                }
            }
            r = conn.tls.read_buf(&mut conn.buf), if local.pending.len() < MAX_PENDING_ACKS => {
                conn.grow_if_full();
                match r {
                    Ok(0) | Err(_) => return End::ClientGone,
                    Ok(_) => idle_at = Instant::now() + IDLE_RELEASE,
                }
            }
            _ = sleep_until(idle_at), if conn.buf.capacity() > 0 || conn.out.capacity() > 0 => {
                conn.release_buffers();
                idle_at = Instant::now() + IDLE_RELEASE;
            }
            Some(p) = rx.recv() => {
                let mut p = *p;
                if p.qos == QoS::AtLeastOnce {
                    next_pkid = next_pkid.wrapping_add(1).max(1);
                    p.pkid = next_pkid;
                }
                if let Err(end) = guarded(shared, kick, async { conn.send(Packet::Publish(p)).await.map_err(write_end) }).await {
                    return end;
                }
            }
            _ = sleep_until(deadline), if !keep_alive.is_zero() => return End::Protocol("keepalive_timeout"),
        }
    }
}

type PendingAck = std::pin::Pin<Box<dyn std::future::Future<Output = (u16, bool)> + Send>>;

/// Within the configured topic length and depth?
fn topic_within(shared: &Shared, topic: &str) -> bool {
    topic.len() <= shared.config.max_topic_length
        && topic.split('/').count() <= shared.config.max_topic_levels
}

/// Counts a cap hit and logs it (rate-limited per session).
fn limit_hit(shared: &Shared, local: &mut Local, id: &Identity, limit: &'static str, what: &str) {
    shared.metrics.limits.with_label_values(&[limit]).inc();
    if let Some(skipped) = local.limit_log.allow() {
        warn!(device = %id.id, limit, what, skipped, "limit reached");
    }
}

async fn handle_packet(
    shared: &Shared,
    conn: &mut Conn,
    id: &Identity,
    conn_id: u64,
    packet: Packet,
    local: &mut Local,
) -> Result<(), End> {
    match packet {
        Packet::Publish(p) => {
            shared.metrics.messages_received.inc();
            if !topic_within(shared, &p.topic) {
                limit_hit(shared, local, id, "topic", &p.topic);
                return Err(End::Limit("topic_limit"));
            }
            if !auth::may_publish(id, &p.topic) {
                shared.metrics.acl_denied.with_label_values(&["publish"]).inc();
                if let Some(skipped) = local.acl_log.allow() {
                    warn!(device = %id.id, topic = %p.topic, qos = ?p.qos, skipped, "publish refused by ACL");
                }
                // QoS 0 has no acknowledgement to withhold; QoS 1 and 2 are cut off.
                return if p.qos == QoS::AtMostOnce { Ok(()) } else { Err(End::Acl) };
            }
            if p.qos == QoS::ExactlyOnce {
                return Err(End::Protocol("qos2_unsupported"));
            }
            // Routed first (subscribers get copies), then the publish itself moves to the store.
            if let Err(refused) = shared.router.route(&p, &shared.metrics) {
                limit_hit(shared, local, id, refused.label(), &p.topic);
                return Err(End::Limit(refused.label()));
            }
            let (pkid, qos) = (p.pkid, p.qos);
            // Devices' telemetry is stored; services' commands are only routed.
            if id.role == fleet_registry::Role::Device {
                let msg = Message {
                    device_id: id.id.to_string(),
                    topic: p.topic,
                    payload: p.payload,
                    qos: qos as u8,
                    received_at: now_millis(),
                };
                if qos == QoS::AtLeastOnce {
                    let done = shared.store.submit(msg).await;
                    local.pending.push_back(Box::pin(async move { (pkid, done.await.unwrap_or(false)) }));
                } else {
                    shared.store.submit_nowait(msg).await;
                }
            } else if qos == QoS::AtLeastOnce {
                local.pending.push_back(Box::pin(async move { (pkid, true) }));
            }
            Ok(())
        }
        Packet::Subscribe(s) => {
            let mut codes = Vec::with_capacity(s.filters.len());
            let mut retained = Vec::new();
            for f in &s.filters {
                let full = !local.subs.contains(&f.path)
                    && local.subs.len() >= shared.config.max_subscriptions_per_session;
                if !topic_within(shared, &f.path) {
                    limit_hit(shared, local, id, "topic", &f.path);
                    codes.push(SubscribeReasonCode::Failure);
                } else if !auth::may_subscribe(id, &f.path) {
                    shared.metrics.acl_denied.with_label_values(&["subscribe"]).inc();
                    if let Some(skipped) = local.acl_log.allow() {
                        warn!(device = %id.id, filter = %f.path, skipped, "subscribe refused by ACL");
                    }
                    codes.push(SubscribeReasonCode::Failure);
                } else if full {
                    limit_hit(shared, local, id, "subscriptions", &f.path);
                    codes.push(SubscribeReasonCode::Failure);
                } else {
                    let qos = if f.qos == QoS::AtMostOnce { QoS::AtMostOnce } else { QoS::AtLeastOnce };
                    retained.extend(shared.router.subscribe(conn_id, &f.path, qos, local.tx.clone()));
                    local.subs.insert(f.path.clone());
                    codes.push(SubscribeReasonCode::Success(qos));
                }
            }
            conn.send(Packet::SubAck(SubAck::new(s.pkid, codes))).await.map_err(write_end)?;
            for mut p in retained {
                p.qos = QoS::AtMostOnce;
                p.retain = true;
                conn.send(Packet::Publish(p)).await.map_err(write_end)?;
            }
            Ok(())
        }
        Packet::Unsubscribe(u) => {
            for f in &u.topics {
                shared.router.unsubscribe(conn_id, f);
                local.subs.remove(f);
            }
            conn.send(Packet::UnsubAck(UnsubAck::new(u.pkid))).await.map_err(write_end)
        }
        Packet::PingReq => conn.send(Packet::PingResp).await.map_err(write_end),
        Packet::Disconnect => Err(End::ClientGone),
        Packet::PubAck(_) => Ok(()),
        Packet::Connect(_) => Err(End::Protocol("second_connect")),
        _ => Err(End::Protocol("unexpected_packet")),
    }
}
