//! fleet-broker: the fleetgate MQTT ingest broker.
//!
//! It admits a client only with a valid, unrevoked certificate from the device issuing CA, binds
//! the MQTT client id to the certificate's device id, confines each device to its own topics,
//! stores every device message before acknowledging it, cuts sessions within a second of a
//! revocation, and exports Prometheus metrics. See `broker/ARCHITECTURE.md`.

pub mod auth;
pub mod config;
pub mod metrics;
pub mod router;
pub mod session;
pub mod store;
pub mod tls;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use fleet_registry::{Backend, Registry};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

pub use config::{Config, CrlPolicy};
pub use metrics::Metrics;

/// Why the broker could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BrokerError {
    /// Bad configuration.
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    /// TLS material unusable.
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    /// Registry unreachable or broken.
    #[error("registry: {0}")]
    Registry(#[from] fleet_registry::Error),
    /// Socket errors.
    #[error("{0}: {1}")]
    Io(String, std::io::Error),
}

/// State shared by every task of one broker.
#[derive(Debug)]
pub struct Shared {
    /// Configuration in force.
    pub config: Config,
    tls_paths: tls::TlsPaths,
    /// Current TLS configuration.
    pub tls: ArcSwap<tls::TlsState>,
    /// The registry.
    pub registry: Registry,
    store: store::Store,
    router: router::Router,
    /// Live sessions.
    pub sessions: session::Sessions,
    /// Registry verdicts of active certificates (admission without a database round trip).
    admissions: session::AdmissionCache,
    /// Connections per source address not yet admitted.
    pre_admission: Arc<session::PreAdmission>,
    /// Rate limit of the `source_limit` log line.
    source_limit_log: std::sync::Mutex<session::LogLimiter>,
    /// Metrics.
    pub metrics: Metrics,
    next_conn: AtomicU64,
    /// Cancelled to stop the broker.
    pub shutdown: CancellationToken,
}

/// A configured broker, ready to serve.
#[derive(Debug)]
pub struct Broker {
    shared: Arc<Shared>,
    store_writer: tokio::task::JoinHandle<()>,
    /// Revocation sequence read before the first admission: every revocation after it reaches
    /// the watcher, every one before it is visible to admission queries.
    revocation_head: i64,
}

/// What `check-config` reports.
#[derive(Debug)]
pub struct Plan {
    /// Resolved configuration.
    pub config: Config,
    /// Registry URL.
    pub database_url: String,
    /// TLS files.
    pub tls: tls::TlsPaths,
    /// Loaded CRL.
    pub crl: Option<tls::CrlInfo>,
    /// Server certificate notAfter.
    pub server_not_after: i64,
}

fn tls_paths(c: &Config) -> tls::TlsPaths {
    tls::TlsPaths { cert: c.cert_path(), key: c.key_path(), client_ca: c.client_ca_path(), crl: c.crl_path() }
}

/// Validates the configuration, loads the TLS material and opens the registry, without serving.
pub async fn check(config: Config) -> Result<Plan, BrokerError> {
    config.validate()?;
    let paths = tls_paths(&config);
    let state = tls::build(&paths)?;
    let url = config.database_url();
    Registry::open_existing(&url, config.registry_timeout()).await?;
    Ok(Plan {
        database_url: url,
        tls: paths,
        crl: state.crl,
        server_not_after: state.server_not_after,
        config,
    })
}

impl Broker {
    /// Loads TLS material, opens the registry and starts the store writer.
    pub async fn new(config: Config) -> Result<Broker, BrokerError> {
        config.validate()?;
        let paths = tls_paths(&config);
        let state = tls::build(&paths)?;
        let registry = Registry::open_existing(&config.database_url(), config.registry_timeout()).await?;
        let revocation_head = registry.revocation_head().await?;
        let metrics = Metrics::new();
        let (store, store_writer) = store::Store::start(
            registry.pool().clone(),
            registry.backend(),
            config.store_batch,
            metrics.clone(),
        );
        let shared = Arc::new(Shared {
            tls_paths: paths,
            tls: ArcSwap::from_pointee(state),
            registry,
            store,
            router: router::Router::new(router::RetainLimits {
                per_device: config.max_retained_per_device,
                total_bytes: config.max_retained_bytes,
            }),
            sessions: session::Sessions::default(),
            pre_admission: Arc::default(),
            admissions: session::AdmissionCache::default(),
            source_limit_log: std::sync::Mutex::new(session::LogLimiter::new(config.log_interval())),
            metrics,
            next_conn: AtomicU64::new(1),
            shutdown: CancellationToken::new(),
            config,
        });
        update_gauges(&shared);
        Ok(Broker { shared, store_writer, revocation_head })
    }

    /// Token that stops the broker when cancelled.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shared.shutdown.clone()
    }

    /// Shared state (metrics, sessions).
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Serves MQTT on `listener` (and metrics on `metrics`) until the shutdown token is
    /// cancelled; then stops accepting, closes sessions and commits queued messages.
    pub async fn serve(self, listener: TcpListener, metrics: Option<TcpListener>) {
        let Broker { shared, store_writer, revocation_head } = self;
        let tracker = TaskTracker::new();
        tracker.spawn(watch_revocations(shared.clone(), revocation_head));
        tracker.spawn(watch_files(shared.clone()));
        if let Some(m) = metrics {
            tracker.spawn(serve_metrics(shared.clone(), m));
        }
        accept_loop(&shared, listener, &tracker).await;
        tracker.close();
        tracker.wait().await;
        // Every session is gone: dropping the last store handle lets the writer commit what is
        // queued and stop.
        drop(shared);
        let _ = store_writer.await;
        info!("broker stopped");
    }
}

async fn accept_loop(shared: &Arc<Shared>, listener: TcpListener, tracker: &TaskTracker) {
    let slots = Arc::new(Semaphore::new(shared.config.max_connections));
    let mut backoff = Duration::from_millis(5);
    loop {
        let accepted = tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            r = listener.accept() => r,
        };
        match accepted {
            Ok((sock, peer)) => {
                backoff = Duration::from_millis(5);
                let Some(pre_admission) =
                    shared.pre_admission.enter(peer.ip(), shared.config.max_pre_admission_per_source)
                else {
                    shared.metrics.connections_rejected.with_label_values(&["source_limit"]).inc();
                    shared.metrics.limits.with_label_values(&["source_limit"]).inc();
                    let allowed = shared.source_limit_log.lock().map(|mut l| l.allow()).unwrap_or(None);
                    if let Some(skipped) = allowed {
                        warn!(%peer, reason = "source_limit", skipped, "connection refused: too many unauthenticated connections from this address");
                    }
                    drop(sock);
                    continue;
                };
                let Ok(permit) = slots.clone().try_acquire_owned() else {
                    shared.metrics.connections_rejected.with_label_values(&["max_connections"]).inc();
                    warn!(%peer, "connection refused: max_connections reached");
                    drop(sock);
                    continue;
                };
                let conn_id = shared.next_conn.fetch_add(1, Ordering::Relaxed);
                let s = shared.clone();
                tracker.spawn(async move {
                    s.metrics.connections_open.inc();
                    session::handle(s.clone(), sock, peer, conn_id, pre_admission).await;
                    s.metrics.connections_open.dec();
                    drop(permit);
                });
            }
            Err(e) => {
                // EMFILE and friends: back off rather than spin.
                warn!(error = %e, "accept failed; backing off {backoff:?}");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        }
    }
}

/// Watches the registry for revocations and cuts the sessions they concern.
async fn watch_revocations(shared: Arc<Shared>, mut head: i64) {
    let mut listener = None;
    if shared.registry.backend() == Backend::Postgres {
        match sqlx::postgres::PgListener::connect(&shared.config.database_url()).await {
            Ok(mut l) => match l.listen(fleet_registry::REVOCATION_CHANNEL).await {
                Ok(()) => listener = Some(l),
                Err(e) => warn!(error = %e, "LISTEN failed; polling only"),
            },
            Err(e) => warn!(error = %e, "LISTEN connection failed; polling only"),
        }
    }
    let poll = Duration::from_millis(shared.config.revocation_poll_ms);
    let mut registry_down = false;
    loop {
        let notified = async {
            match listener.as_mut() {
                Some(l) => {
                    // recv reconnects by itself; while the database is down it fails at once,
                    // so wait before the next attempt instead of spinning.
                    if l.recv().await.is_err() {
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            _ = tokio::time::sleep(poll) => {}
            _ = notified => {}
        }
        match shared.registry.revocations_since(head).await {
            Ok(events) => {
                for ev in events {
                    head = head.max(ev.seq);
                    shared.metrics.revocations_seen.inc();
                    shared.admissions.revoked(&ev.serial);
                    if shared.sessions.kick_serial(&ev.device_id, &ev.serial) {
                        info!(device = %ev.device_id, serial = %ev.serial, "revoked: cutting live session");
                    }
                    let cleared = shared.router.clear_retained(ev.device_id.as_str());
                    if cleared > 0 {
                        info!(device = %ev.device_id, cleared, "revoked: retained messages cleared");
                    }
                }
                shared.admissions.feed_ok();
            }
            Err(e) => {
                if !registry_down {
                    warn!(error = %e, "revocation poll failed: registry unavailable; retrying");
                    registry_down = true;
                }
                continue;
            }
        }
        if registry_down {
            info!("registry reachable again: revocation watch resumed");
            registry_down = false;
        }
    }
}

/// Reloads TLS material when its files change; refreshes expiry gauges.
async fn watch_files(shared: Arc<Shared>) {
    let every = Duration::from_millis(shared.config.reload_poll_ms);
    let mut last_failed = None;
    loop {
        tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        // Pick up a CRL that appeared after start (`revoke` writes HOME/crl.pem).
        let mut paths = shared.tls_paths.clone();
        if paths.crl.is_none() {
            paths.crl = shared.config.crl_path();
        }
        let fp = paths.fingerprint();
        if fp != shared.tls.load().fingerprint && Some(&fp) != last_failed.as_ref() {
            match tls::build(&paths) {
                Ok(state) if tls::crl_replayed(shared.tls.load().crl.as_ref(), state.crl.as_ref()) => {
                    error!(
                        loaded = ?shared.tls.load().crl.as_ref().and_then(|c| c.number),
                        offered = ?state.crl.as_ref().and_then(|c| c.number),
                        "CRL refused: its number is lower than the loaded CRL's (an old CRL replayed?); keeping the loaded one"
                    );
                    shared.metrics.crl_reloads.with_label_values(&["replayed"]).inc();
                    last_failed = Some(fp);
                }
                Ok(state) => {
                    info!(crl = ?state.crl, "TLS configuration reloaded");
                    shared.metrics.crl_reloads.with_label_values(&["loaded"]).inc();
                    shared.tls.store(Arc::new(state));
                    last_failed = None;
                }
                Err(e) => {
                    error!(error = %e, "TLS reload refused; keeping the previous configuration");
                    shared.metrics.crl_reloads.with_label_values(&["rejected"]).inc();
                    last_failed = Some(fp);
                }
            }
        }
        update_gauges(&shared);
    }
}

fn update_gauges(shared: &Shared) {
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let state = shared.tls.load();
    let m = &shared.metrics;
    m.crl_number
        .set(state.crl.as_ref().and_then(|c| c.number).map_or(0, |n| i64::try_from(n).unwrap_or(i64::MAX)));
    match &state.crl {
        Some(crl) => {
            m.crl_age_seconds.set(now - crl.this_update);
            m.crl_next_update_seconds.set(crl.next_update.map_or(i64::MAX, |n| n - now));
            m.crl_expired.set(i64::from(crl.expired(now)));
        }
        None => m.crl_expired.set(0),
    }
    m.cert_expiry_days.with_label_values(&["server"]).set((state.server_not_after - now) / 86_400);
    m.cert_expiry_days.with_label_values(&["client_ca"]).set((state.client_ca_not_after - now) / 86_400);
}

/// A tiny HTTP/1.1 endpoint: `GET /metrics`, `GET /healthz`.
async fn serve_metrics(shared: Arc<Shared>, listener: TcpListener) {
    loop {
        let (sock, _) = tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(_) => { tokio::time::sleep(Duration::from_millis(50)).await; continue; }
            },
        };
        let s = shared.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(Duration::from_secs(5), http_reply(&s, sock)).await;
        });
    }
}

async fn http_reply(shared: &Shared, mut sock: TcpStream) -> std::io::Result<()> {
    let mut req = Vec::with_capacity(512);
    let mut buf = [0u8; 512];
    while !req.windows(4).any(|w| w == b"\r\n\r\n") && req.len() < 8192 {
        let n = sock.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        req.extend_from_slice(&buf[..n]);
    }
    let line = String::from_utf8_lossy(&req);
    let path = line.split_whitespace().nth(1).unwrap_or("");
    let (status, ctype, body) = match path {
        "/metrics" => {
            update_gauges(shared);
            ("200 OK", "text/plain; version=0.0.4", shared.metrics.render())
        }
        "/healthz" => ("200 OK", "text/plain", "ok\n".to_owned()),
        _ => ("404 Not Found", "text/plain", "not found\n".to_owned()),
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    sock.write_all(head.as_bytes()).await?;
    sock.write_all(body.as_bytes()).await?;
    sock.shutdown().await
}

/// Binds the MQTT and metrics listeners of `config`.
pub async fn bind(config: &Config) -> Result<(TcpListener, Option<TcpListener>), BrokerError> {
    let mqtt = TcpListener::bind(config.listen)
        .await
        .map_err(|e| BrokerError::Io(format!("listen {}", config.listen), e))?;
    let metrics = match config.metrics_listen {
        Some(a) => {
            Some(TcpListener::bind(a).await.map_err(|e| BrokerError::Io(format!("metrics listen {a}"), e))?)
        }
        None => None,
    };
    Ok((mqtt, metrics))
}

/// Local address helper for logs.
pub fn addr(l: &TcpListener) -> Option<SocketAddr> {
    l.local_addr().ok()
}
