//! fleet-broker: the fleetgate MQTT ingest broker.
//!
//! It admits a client only with a valid, unrevoked certificate from the device issuing CA, binds
//! the MQTT client id to the certificate's device id, confines each device to its own topics,
//! stores every device message before acknowledging it, cuts sessions within a second of a
//! revocation, and exports Prometheus metrics. See `broker/ARCHITECTURE.md`.
//!
//! The public surface is [`Broker`], [`Config`], [`check`] and the [`outcome`] labels; the rest
//! is internal (the fuzzer reaches what it needs through `fuzzing`).

mod admin;
mod auth;
mod cluster;
mod commands;
pub mod config;
mod events;
mod http;
mod inbox;
mod listener;
mod log_limit;
mod metrics;
pub mod outcome;
mod proxy;
mod router;
mod session;
mod store;
mod tls;
mod watch;

use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use fleet_registry::{Registry, RevocationFeed};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::info;

use outcome::Refusal;

pub use config::{Config, ConfigError, CrlPolicy};
pub use metrics::Metrics;
pub use tls::{CrlInfo, TlsError};

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
    /// NATS unreachable at start.
    #[error(transparent)]
    Cluster(#[from] cluster::ClusterError),
    /// Registry unreachable or broken.
    #[error(transparent)]
    Registry(#[from] fleet_registry::Error),
    /// Socket errors.
    #[error("{0}: {1}")]
    Io(String, std::io::Error),
}

/// State shared by the tasks of one broker.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) config: Config,
    /// The TLS files found at start (a CRL that appears later is picked up too).
    pub(crate) tls_paths: tls::TlsPaths,
    pub(crate) tls: ArcSwap<tls::TlsState>,
    pub(crate) registry: Registry,
    pub(crate) store: store::Store,
    /// The command queue's single writer.
    pub(crate) command_writer: commands::writer::Writer,
    pub(crate) router: Arc<router::Router>,
    /// The NATS connection of a cluster member (`None`: a single node).
    pub(crate) cluster: Option<cluster::Cluster>,
    pub(crate) sessions: session::table::Sessions,
    /// CSR buckets by identity (`csr_interval_secs`).
    pub(crate) csr_rate: session::rate::KeyedBuckets,
    /// Persistent sessions whose clients are away.
    pub(crate) parked: session::park::ParkedSessions,
    /// Registry verdicts of active certificates (admission without a database round trip).
    pub(crate) admissions: session::admit::AdmissionCache,
    pub(crate) metrics: Metrics,
    /// Admissions, refusals and session ends, for the admin API.
    pub(crate) events: events::Events,
    /// Cancelled to stop the broker.
    pub(crate) shutdown: CancellationToken,
}

impl Shared {
    /// A connection refused: counted, and recorded with the identity its certificate names.
    pub(crate) fn refused(&self, why: Refusal, peer: SocketAddr, cert: Option<&[u8]>) {
        self.metrics.refused(why);
        let mut e = events::Event::new(events::Kind::Refused, why.label(), peer);
        if let Some(der) = cert {
            match auth::identify(der) {
                Ok(id) => e = e.of(id.id.as_str(), id.serial.to_hex()),
                Err(_) => e.serial = Some(session::admit::serial_hex(der)).filter(|s| !s.is_empty()),
            }
        }
        self.events.record(e);
    }

    /// Within the configured topic length and depth?
    pub(crate) fn topic_within(&self, topic: &str) -> bool {
        topic.len() <= self.config.max_topic_length
            && topic.split('/').count() <= self.config.max_topic_levels
    }
}

pub(crate) fn now_unix() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

pub(crate) fn now_millis() -> i64 {
    (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64
}

/// A configured broker, ready to serve.
#[derive(Debug)]
pub struct Broker {
    shared: Arc<Shared>,
    store_writer: tokio::task::JoinHandle<()>,
    /// Opened before the first admission: every revocation after it reaches the feed, every one
    /// before it is visible to admission queries.
    feed: RevocationFeed,
    /// The command writer's queue, until `serve` starts the writer.
    command_jobs: commands::writer::Jobs,
}

/// What `check-config` reports.
#[derive(Debug)]
pub struct Plan {
    /// The configuration with every default path written out.
    pub config: Config,
    /// Loaded CRL.
    pub crl: Option<CrlInfo>,
    /// Server certificate notAfter (unix seconds).
    pub server_not_after: i64,
}

/// Validates the configuration, loads the TLS material and opens the registry, without serving.
pub async fn check(config: Config) -> Result<Plan, BrokerError> {
    config.validate()?;
    let state = tls::build(&tls::TlsPaths::of(&config))?;
    Registry::open_existing(&config.database_url(), config.registry_timeout()).await?;
    Ok(Plan { config: config.resolved(), crl: state.crl, server_not_after: state.server_not_after })
}

impl Broker {
    /// Loads TLS material, opens the registry and starts the store writer.
    pub async fn new(config: Config) -> Result<Broker, BrokerError> {
        config.validate()?;
        let tls_paths = tls::TlsPaths::of(&config);
        let state = tls::build(&tls_paths)?;
        let registry = Registry::open_existing(&config.database_url(), config.registry_timeout()).await?;
        let feed = registry.revocation_feed().await?;
        let metrics = Metrics::new();
        let cluster = match &config.nats {
            Some(_) => Some(cluster::Cluster::connect(&config, &metrics).await?),
            None => None,
        };
        // A single node stores into the registry; a cluster member into the JetStream stream.
        let (store, store_writer) = match &cluster {
            Some(c) => store::Store::start(
                cluster::stream::JetStreamSink { js: c.js.clone() },
                config.store_batch,
                metrics.clone(),
            ),
            None => store::Store::start(registry.telemetry_writer(), config.store_batch, metrics.clone()),
        };
        let (command_writer, command_jobs) = commands::writer::channel();
        let shared = Arc::new(Shared {
            tls_paths,
            tls: ArcSwap::from_pointee(state),
            registry,
            store,
            command_writer,
            router: Arc::new(router::Router::new(router::RetainLimits {
                per_device: config.max_retained_per_device,
                total_bytes: config.max_retained_bytes,
                issuer_bytes: config.max_retained_bytes_issuer,
            })),
            cluster,
            sessions: Default::default(),
            csr_rate: Default::default(),
            parked: session::park::ParkedSessions::new(session::park::ParkLimits {
                per_claim: config.max_parked_per_claim,
                total: config.max_parked_sessions,
            }),
            admissions: Default::default(),
            metrics,
            events: Default::default(),
            shutdown: CancellationToken::new(),
            config,
        });
        watch::update_gauges(&shared);
        Ok(Broker { shared, store_writer, feed, command_jobs })
    }

    /// Token that stops the broker when cancelled.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shared.shutdown.clone()
    }

    /// The broker's metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.shared.metrics
    }

    /// Serves MQTT on `listener` (and metrics on `metrics`) until the shutdown token is
    /// cancelled; then stops accepting, closes sessions and commits queued messages.
    pub async fn serve(self, listeners: Listeners) {
        let Listeners { mqtt: listener, metrics, admin: admin_listener } = listeners;
        let Broker { shared, store_writer, feed, command_jobs } = self;
        let tracker = TaskTracker::new();
        tracker.spawn(watch::revocations(shared.clone(), feed));
        tracker.spawn(watch::files(shared.clone()));
        tracker.spawn(commands::sweep(shared.clone()));
        tracker.spawn(commands::writer::run(shared.clone(), command_jobs));
        if let Some(c) = &shared.cluster {
            tracker.spawn(watch::cluster_revocations(shared.clone()));
            if shared.config.nats_sql_sink {
                tracker.spawn(cluster::stream::feed_sql(
                    c.js.clone(),
                    shared.config.nats_stream.clone(),
                    shared.registry.telemetry_writer(),
                    shared.config.store_batch,
                    shared.metrics.clone(),
                    shared.shutdown.clone(),
                ));
            }
        }
        if let Some(m) = metrics {
            tracker.spawn(http::serve(shared.clone(), m));
        }
        let node = listener.local_addr().map_or_else(|_| "?".into(), |a| a.to_string());
        if shared.cluster.is_some() {
            tracker.spawn(admin::views::answer(shared.clone(), node.clone()));
        }
        if let Some(a) = admin_listener {
            tracker.spawn(admin::serve(shared.clone(), a, node));
        }
        listener::run(&shared, listener, &tracker).await;
        tracker.close();
        tracker.wait().await;
        // Every session is gone: dropping the last store handle lets the writer commit what is
        // queued and stop.
        drop(shared);
        let _ = store_writer.await;
        info!("broker stopped");
    }
}

/// The rustls configuration the broker would accept connections with (certificate, client CA,
/// CRL and verifier as `config` names them): for benchmarks against bare TLS.
pub fn tls_config(config: &Config) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    Ok(tls::build(&tls::TlsPaths::of(config))?.config)
}

/// The sockets a broker serves on.
#[derive(Debug)]
pub struct Listeners {
    /// MQTT over TLS.
    pub mqtt: TcpListener,
    /// `/metrics` and `/healthz` (plain HTTP).
    pub metrics: Option<TcpListener>,
    /// The admin API and console (HTTPS, operators only).
    pub admin: Option<TcpListener>,
}

/// Binds the MQTT, metrics and admin listeners of `config`.
pub async fn bind(config: &Config) -> Result<Listeners, BrokerError> {
    let (mqtt, metrics) = bind_mqtt_and_metrics(config).await?;
    let admin = match config.admin_listen.0 {
        Some(a) => {
            Some(TcpListener::bind(a).await.map_err(|e| BrokerError::Io(format!("admin listen {a}"), e))?)
        }
        None => None,
    };
    Ok(Listeners { mqtt, metrics, admin })
}

async fn bind_mqtt_and_metrics(config: &Config) -> Result<(TcpListener, Option<TcpListener>), BrokerError> {
    let mqtt = TcpListener::bind(config.listen)
        .await
        .map_err(|e| BrokerError::Io(format!("listen {}", config.listen), e))?;
    let metrics = match config.metrics_listen.0 {
        Some(a) => {
            Some(TcpListener::bind(a).await.map_err(|e| BrokerError::Io(format!("metrics listen {a}"), e))?)
        }
        None => None,
    };
    Ok((mqtt, metrics))
}

/// Local address of a listener, for logs.
pub fn addr(l: &TcpListener) -> Option<SocketAddr> {
    l.local_addr().ok()
}

/// The contract of a cluster's JetStream stream, for backends that consume it directly
/// (`docs/spec/cluster-stream.md`, `broker/examples/stream_consumer.rs`).
pub mod stream {
    pub use crate::cluster::stream::{DEVICE, QOS, RECEIVED_AT, SQL_CONSUMER};

    /// The subject a device message on `topic` is stored under.
    pub fn subject_of(topic: &str) -> String {
        crate::cluster::subject::stored_subject_of(topic)
    }

    /// The topic of a stored message's subject (`None`: not a stored device message).
    pub fn topic_of(subject: &str) -> Option<String> {
        crate::cluster::subject::topic_of_stored(subject)
    }

    /// The subjects to consume for the topics an MQTT filter matches (`devices/+/telemetry`).
    pub fn filter_subjects(filter: &str) -> Vec<String> {
        crate::cluster::subject::stored_filter_subjects(filter)
    }
}

/// What the fuzz targets drive: the decoders and decisions a session runs on client bytes.
#[doc(hidden)]
pub mod fuzzing {
    pub use crate::auth::{identify, matches, may_publish, may_subscribe, Identity, IdentityError};
    pub use crate::cluster::subject::{filter_subjects, subject_of, topic_of};
    pub use crate::proxy::{parse as parse_proxy_header, Header as ProxyHeader, ProxyError};
    pub use crate::session::conn::decode_client_packet;
    pub use crate::tls::{parse_crl, CrlError, RevokedSerials};
}
