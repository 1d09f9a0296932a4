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
mod caps;
mod clock;
mod cluster;
mod commands;
pub mod config;
mod fabric;
mod gate;
mod inbox;
mod ingest;
mod listener;
mod message;
mod observe;
mod ota;
pub mod outcome;
mod proxy;
mod router;
mod session;
mod sessions;
mod store;
mod tls;
mod watch;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use fleet_registry::{Registry, RevocationFeed};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::info;

use commands::status::Statuses;
use commands::Commands;
use fabric::{Fabric, Link};
use gate::Gate;
use ingest::Ingest;
use observe::Observe;
use session::park::{ParkLimits, Parking};
use session::services::Services;
use sessions::Sessions;
use watch::Watch;

pub use config::{Config, ConfigError, CrlPolicy};
pub use observe::metrics::Metrics;
pub use tls::{CrlInfo, TlsError};

/// How long a stopping broker waits for its telemetry log to be copied into the registry.
const FEED_GRACE: Duration = Duration::from_secs(10);

/// Where a telemetry log in `dir` stands, read from its files: its id (the registry's
/// `telemetry_feed.log_id`) and the last record's sequence number. Every message a broker
/// acknowledged before this is read is at or below it. `None`: no log in `dir`.
pub fn store_log_position(dir: &std::path::Path) -> Result<Option<(i64, u64)>, String> {
    store::log::position(dir)
}

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
    /// The telemetry log cannot be opened.
    #[error("{0}")]
    Store(String),
}

/// A configured broker, ready to serve: its services, built and wired, and the tasks that
/// [`Broker::serve`] starts. This is the only place that knows every service; each task is
/// handed the few it uses.
#[derive(Debug)]
pub struct Broker {
    config: Arc<Config>,
    registry: Registry,
    observe: Observe,
    gate: Arc<Gate>,
    fabric: Fabric,
    sessions: Arc<Sessions>,
    parking: Parking,
    ingest: Ingest,
    statuses: Statuses,
    shutdown: CancellationToken,
    store_writer: tokio::task::JoinHandle<()>,
    /// The telemetry log's copy into the registry and what stops it (`store = log`).
    store_feed: Option<(tokio::task::JoinHandle<()>, CancellationToken)>,
    /// Opened before the first admission: every revocation after it reaches the feed, every one
    /// before it is visible to admission queries.
    feed: RevocationFeed,
    /// The command writer's queue, until `serve` starts the writer.
    command_jobs: commands::writer::Jobs,
    /// A cluster member's JetStream, when this node feeds the SQL table from the stream.
    sql_sink: Option<async_nats::jetstream::Context>,
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
        let registry = Registry::open_existing(&config.database_url(), config.registry_timeout())
            .await?
            .with_writer_sync(config.store_fsync());
        let feed = registry.revocation_feed().await?;
        let observe = Observe::new();
        let metrics = observe.metrics().clone();
        let cluster = match &config.nats {
            Some(_) => Some(cluster::Cluster::connect(&config, &metrics).await?),
            None => None,
        };
        // A single node stores into its telemetry log (copied into the registry) or into the
        // registry; a cluster member into the JetStream stream.
        let feed_stop = CancellationToken::new();
        let mut store_feed = None;
        let log_settings = store::log::Settings {
            dir: config.store_log_dir_path(),
            sync: config.store_fsync() == fleet_registry::WriterSync::EveryCommit,
            max_backlog: config.store_log_max_bytes,
            segment_bytes: store::log::SEGMENT_BYTES,
        };
        let (store, store_writer) = match &cluster {
            Some(c) => store::Store::start(
                cluster::stream::JetStreamSink { js: c.js.clone(), max_payload: c.max_payload },
                config.store_batch,
                metrics.clone(),
            ),
            None if config.store_in_log() => {
                let started = store::start_log(
                    &log_settings,
                    &registry,
                    config.store_batch,
                    &metrics,
                    feed_stop.clone(),
                )
                .await
                .map_err(BrokerError::Store)?;
                store_feed = Some((started.feeder, feed_stop));
                (started.store, started.writer)
            }
            None => {
                store::drain_log(&log_settings, &registry, &metrics).await.map_err(BrokerError::Store)?;
                store::Store::start(registry.telemetry_writer(), config.store_batch, metrics.clone())
            }
        };
        let sql_sink = cluster.as_ref().filter(|_| config.nats_sql_sink).map(|c| c.js.clone());
        let link = match cluster {
            Some(c) => Link::Nats(Box::new(c)),
            None => Link::Local,
        };
        let router = router::Router::new(router::RetainLimits {
            per_device: config.max_retained_per_device,
            total_bytes: config.max_retained_bytes,
            issuer_bytes: config.max_retained_bytes_issuer,
        });
        let fabric = Fabric::new(router, link, metrics.clone());
        let config = Arc::new(config);
        let shutdown = CancellationToken::new();
        let sessions = Arc::new(Sessions::default());
        // Admission verdicts are read on a connection of their own (gate::lookup).
        let lookups = gate::Lookups::start(
            registry.with_own_pool(1, config.registry_timeout()).await?,
            config.registry_timeout(),
        );
        let gate = Arc::new(Gate::new(gate::Parts {
            config: config.clone(),
            tls_paths,
            tls: state,
            lookups,
            sessions: sessions.clone(),
            fabric: fabric.clone(),
            observe: observe.clone(),
            shutdown: shutdown.clone(),
        }));
        let limits = ParkLimits { per_claim: config.max_parked_per_claim, total: config.max_parked_sessions };
        let parking = Parking::new(limits, fabric.clone(), observe.clone(), sessions.clone());
        let (writer, command_jobs) = commands::writer::channel();
        let statuses = Statuses { fabric: fabric.clone(), metrics };
        let commands = Commands::new(
            writer,
            registry.clone(),
            statuses.clone(),
            config.max_command_bytes,
            config.command_ttl_secs,
        );
        let ingest = Ingest::new(store, commands);
        gate.update_gauges();
        Ok(Broker {
            config,
            registry,
            observe,
            gate,
            fabric,
            sessions,
            parking,
            ingest,
            statuses,
            shutdown,
            store_writer,
            store_feed,
            feed,
            command_jobs,
            sql_sink,
        })
    }

    /// Token that stops the broker when cancelled.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// The broker's metrics.
    pub fn metrics(&self) -> &Metrics {
        self.observe.metrics()
    }

    /// Serves MQTT on `listener` (and metrics on `metrics`) until the shutdown token is
    /// cancelled; then stops accepting, closes sessions and commits queued messages.
    pub async fn serve(self, listeners: Listeners) {
        let Listeners { mqtt: listener, metrics: metrics_listener, admin: admin_listener } = listeners;
        let Broker {
            config,
            registry,
            observe,
            gate,
            fabric,
            sessions,
            parking,
            ingest,
            statuses,
            shutdown,
            store_writer,
            store_feed,
            feed,
            command_jobs,
            sql_sink,
        } = self;
        let metrics = observe.metrics().clone();
        let tracker = TaskTracker::new();
        let watch = Arc::new(Watch {
            gate: gate.clone(),
            sessions: sessions.clone(),
            parking: parking.clone(),
            fabric: fabric.clone(),
            registry: registry.clone(),
            observe: observe.clone(),
            revocation_poll: Duration::from_millis(config.revocation_poll_ms),
            reload_poll_ms: config.reload_poll_ms,
            shutdown: shutdown.clone(),
        });
        tracker.spawn(watch.clone().revocations(feed));
        tracker.spawn(watch.clone().files());
        tracker.spawn(watch.cluster_revocations());
        tracker.spawn(ingest.commands().clone().sweep(shutdown.clone()));
        tracker.spawn(parking.clone().sweep(shutdown.clone()));
        let ota = ota::Ota::new(
            registry.clone(),
            config.ota_blob_dir_path(),
            fabric.clone(),
            metrics.clone(),
            ota::Limits {
                max_chunk: config.ota_max_chunk,
                bytes_per_sec: config.ota_bytes_per_sec,
                stall: config.ota_stall_secs.duration(),
                poll: Duration::from_millis(config.ota_poll_ms.max(10)),
            },
        );
        tracker.spawn(ota::runner::run(ota.clone(), ingest.commands().writer().clone(), shutdown.clone()));
        let max_queued = config.max_queued_commands;
        tracker.spawn(commands::writer::run(
            registry.clone(),
            statuses,
            max_queued,
            command_jobs,
            shutdown.clone(),
        ));
        if let Some(js) = sql_sink {
            tracker.spawn(cluster::stream::feed_sql(
                js,
                config.nats_stream.clone(),
                registry.telemetry_writer(),
                config.store_batch,
                metrics.clone(),
                shutdown.clone(),
            ));
        }
        if let Some(m) = metrics_listener {
            let (g, f) = (gate.clone(), fabric.clone());
            let probes = observe::http::Probes {
                refresh: Arc::new(move || g.update_gauges()),
                healthy: Arc::new(move || f.connected()),
            };
            tracker.spawn(observe::http::serve(metrics.clone(), probes, m, shutdown.clone()));
        }
        let node = listener.local_addr().map_or_else(|_| "?".into(), |a| a.to_string());
        let views = admin::Views::new(node, sessions.clone(), observe.clone(), fabric.clone());
        tracker.spawn(views.clone().answer(shutdown.clone()));
        if let Some(a) = admin_listener {
            let parts = admin::Parts {
                config: config.clone(),
                gate: gate.clone(),
                sessions: sessions.clone(),
                observe: observe.clone(),
                registry,
                views,
                shutdown: shutdown.clone(),
            };
            tracker.spawn(admin::serve(parts, a));
        }
        let limits = listener::Limits {
            max_connections: config.max_connections,
            per_source: config.max_pre_admission_per_source,
            max_handshakes: config.max_handshakes,
            proxy_protocol: config.proxy_protocol,
            // Validated at start (`Config::validate`).
            balancers: config.proxy_from().unwrap_or_default(),
            log_interval: config.log_interval(),
        };
        let svc = Arc::new(Services {
            config,
            gate,
            fabric,
            ingest,
            sessions,
            parking,
            observe,
            csr_rate: Default::default(),
            ota,
            shutdown: shutdown.clone(),
        });
        listener::run(limits, &metrics, listener, &tracker, &shutdown, |a| session::serve(svc.clone(), a))
            .await;
        tracker.close();
        tracker.wait().await;
        // Every session is gone: dropping the last store handle lets the writer commit what is
        // queued and stop.
        drop(svc);
        let _ = store_writer.await;
        if let Some((mut feeder, stop)) = store_feed {
            // What the registry has not taken when this runs out stays in the log for the next
            // start.
            if !feeder.is_finished() {
                info!(
                    grace_secs = FEED_GRACE.as_secs(),
                    "stopping: copying the rest of the telemetry log into the registry"
                );
            }
            if tokio::time::timeout(FEED_GRACE, &mut feeder).await.is_err() {
                tracing::warn!(
                    "telemetry log: not all of it is copied into the registry yet; the rest is copied at the next start"
                );
                stop.cancel();
                let _ = feeder.await;
            }
        }
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
    pub use crate::cluster::stream::{DEVICE, PROPERTIES, QOS, RECEIVED_AT, SQL_CONSUMER};

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
    pub use crate::proxy::{
        parse as parse_proxy_header, Header as ProxyHeader, ProxyError, MAX_HEADER as MAX_PROXY_HEADER,
    };
    pub use crate::session::conn::decode_client_packet;
    pub use crate::store::log::{
        decode as decode_log_record, encode as encode_log_record, Record as LogRecord,
    };
    pub use crate::tls::{parse_crl, CrlError, RevokedSerials};
    pub use fleet_topic::{Topic, TopicFilter};
}
