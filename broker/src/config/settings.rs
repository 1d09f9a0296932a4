//! Every configuration key, declared once: its type, default and doc (the `settings!` list).
//! A duration key is a [`Secs`]: it checks itself when parsed, so a new key is one line here.

use std::net::SocketAddr;
use std::path::PathBuf;

use fleet_registry::Home;

use super::value::{settings, CrlPolicy, Endpoint, Secs};

settings! {
    /// MQTT over TLS listen address.
    listen: SocketAddr = SocketAddr::from(([0, 0, 0, 0], 8883));
    /// fleet-provision home (device CA, CRL, registry, broker-tls/).
    home: PathBuf = PathBuf::from(Home::DEFAULT_DIR);
    /// Registry URL; default: the SQLite registry in the home.
    database_url: Option<String> = None;
    /// NATS server URL (`nats://host:4222`) that makes this node a cluster member: device
    /// messages are routed to the other nodes' subscribers through NATS. Needs a PostgreSQL
    /// registry shared by the nodes. Default: off (a single node, in-process routing).
    nats: Option<String> = None;
    /// CA certificates (PEM) the NATS server's certificate must chain to (e.g. the
    /// `broker-trust.pem` that `fleet-provision node-cert` writes): the connection uses TLS and
    /// verifies the server.
    nats_ca: Option<PathBuf> = None;
    /// This node's client certificate for NATS (PEM; `fleet-provision node-cert --name <node>`
    /// writes `cert.pem`): the server maps it to the node's user (`deploy/nats/`).
    nats_cert: Option<PathBuf> = None;
    /// The private key of `nats_cert` (PEM).
    nats_key: Option<PathBuf> = None;
    /// A file holding this node's NATS nkey seed (`SU...`, mode 0600), for a server that lists
    /// the node's public nkey as a user; instead of or besides a certificate.
    nats_nkey: Option<PathBuf> = None;
    /// Stream readers' durable pull consumers this node creates on the stream (if missing):
    /// `name` or `name=<MQTT filter>`, comma-separated, e.g. `analytics=devices/+/telemetry`.
    /// A reader (`fleet-provision node-cert --stream-reader --name <name>`) may only fetch from
    /// and acknowledge its own consumer (`deploy/nats/nats-server.conf`); it cannot create one.
    nats_readers: String = String::new();
    /// Lets a node join a NATS server without TLS or credentials. For a development NATS on
    /// loopback only: anyone who reaches such a server can forge device messages, commands and
    /// revocations. Logged as a warning at start.
    insecure_nats_no_auth: bool = false;
    /// JetStream stream of a cluster's device messages (created at start if missing): a QoS 1
    /// PUBACK follows its acknowledgement.
    nats_stream: String = String::from("FLEET");
    /// Replicas of the stream when this node creates it: 1 for one nats-server, 3 for a NATS
    /// cluster of three or more.
    nats_replicas: usize = 1;
    /// JetStream de-duplication window, seconds: a device's retransmission of a message within
    /// it is stored once.
    nats_duplicate_window_secs: Secs = Secs::of(120.0);
    /// Whether this node feeds the SQL `telemetry` table from the stream (a durable consumer
    /// shared by the nodes that do; idempotent). `false` leaves the table to other nodes or to
    /// your own consumers.
    nats_sql_sink: bool = true;
    /// Longest wait for JetStream to acknowledge a stored message, seconds: while NATS is down,
    /// unstored messages stay unacknowledged and their sessions close after this long.
    nats_timeout_secs: Secs = Secs::of(3.0);
    /// Where this node's clients connect now, as `host:port` (MQTT 5's Server Reference), for
    /// moving a fleet to another endpoint: every client that authenticates is refused, an
    /// MQTT 5 client with CONNACK 0x9D "Server moved" naming this server (the fleet SDK
    /// connects there next), a 3.1.1 client with CONNACK 3 (server unavailable, try later).
    /// Only admitted clients learn it. Default: off.
    moved_to: Option<String> = None;
    /// Metrics and health endpoint (`/metrics`, `/healthz`); `off` disables it.
    metrics_listen: Endpoint = Endpoint(Some(SocketAddr::from(([127, 0, 0, 1], 9464))));
    /// Admin API and operator console over HTTPS (`https://<addr>/`), with the broker's
    /// certificate; only clients with an operator certificate (`fleet-provision operator-cert`)
    /// get in. Default: off.
    admin_listen: Endpoint = Endpoint(None);
    /// The organisation the operator console names in its header; default: the organisation
    /// (O) in the client CA's subject, as `fleet-provision init --org` wrote it.
    org_name: Option<String> = None;
    /// Registry URL the admin API revokes through (a role that may revoke; the broker's own
    /// PostgreSQL role may not). Default: `database_url`.
    admin_database_url: Option<String> = None;
    /// Admin listener: most TLS handshakes in progress at once. A source address gets at most
    /// `max_pre_admission_per_source` of them and at most its fair share (this divided by the
    /// addresses holding slots, plus one kept for a newcomer), so floods from a few addresses
    /// cannot take them all.
    admin_handshakes: usize = 64;
    /// Admin listener: a request's headers must arrive within this many seconds of the
    /// connection (or of the previous answer); otherwise the connection is closed.
    admin_header_timeout_secs: Secs = Secs::of(10.0);
    /// Admin listener: a connection that moves no byte either way for this long is closed
    /// (an event stream sends a keep-alive every 15 s), seconds.
    admin_idle_timeout_secs: Secs = Secs::of(60.0);
    /// Admin listener: most open connections of one operator certificate; more get 429.
    admin_max_connections_per_identity: usize = 16;
    /// Admin listener: most open operator connections from one source address (IPv6: one
    /// /64); more get 429.
    admin_max_connections_per_source: usize = 32;
    /// Admin listener: most live event streams (`/api/v1/events`) in all; more get 429.
    admin_max_event_streams: usize = 32;
    /// Admin listener: most live event streams of one operator; more get 429.
    admin_max_event_streams_per_operator: usize = 4;
    /// Broker certificate chain (PEM); default HOME/broker-tls/cert.pem.
    cert: Option<PathBuf> = None;
    /// Broker private key (PEM); default HOME/broker-tls/key.pem.
    key: Option<PathBuf> = None;
    /// CA that client certificates must chain to; default HOME/device-ca.pem.
    client_ca: Option<PathBuf> = None;
    /// CRL (PEM or DER) signed by the client CA, reloaded when it changes; default
    /// HOME/crl.pem when it exists.
    crl: Option<PathBuf> = None;
    /// What to do when the CRL is past nextUpdate: fail-closed (refuse new connections) or
    /// fail-open (admit, alert).
    crl_policy: CrlPolicy = CrlPolicy::FailClosed;
    /// TLS handshake deadline, seconds.
    handshake_timeout_secs: Secs = Secs::of(10.0), alias "handshake-timeout";
    /// Deadline for CONNECT after the handshake, seconds.
    connect_timeout_secs: Secs = Secs::of(10.0), alias "connect-timeout";
    /// Most open connections; more are closed at accept.
    max_connections: usize = 10_000;
    /// Largest MQTT packet accepted from or sent to a client, bytes.
    max_packet_size: usize = 4096;
    /// Largest TLS record the broker sends, bytes, 5-byte header included (2048-16389). A
    /// device's TLS receive buffer is `rx_buffer_for(this)` = this + 256 bytes: 4,352 for the
    /// default 4096; 16,640 for 16389, the TLS maximum.
    max_tls_record_size: usize = 4096;
    /// How often the registry is polled for revocations, milliseconds (PostgreSQL also
    /// LISTENs).
    revocation_poll_ms: u64 = 200;
    /// How often certificate, key, CA and CRL files are checked for changes, milliseconds.
    reload_poll_ms: u64 = 1000;
    /// Most messages committed in one store transaction.
    store_batch: usize = 4096;
    /// When a commit of the store and the command queue is flushed to disk (SQLite):
    /// `every-commit` (the default: every group commit is fsync'd before its PUBACKs, so an
    /// acknowledged message survives a power cut) or `checkpoint` (written to the operating
    /// system before the PUBACK and fsync'd at checkpoints: survives a crash of the broker, not a
    /// power cut). PostgreSQL: its own `synchronous_commit` decides.
    store_fsync: String = "every-commit".to_owned();
    /// Where a single node makes acknowledged messages durable: `log` (the default: appended to
    /// the telemetry log in `store_log_dir` before the PUBACK, and copied into the registry's
    /// `telemetry` table in the background, exactly once) or `registry` (committed to the
    /// `telemetry` table before the PUBACK). A cluster member stores into its JetStream stream
    /// either way.
    store: String = "log".to_owned();
    /// The telemetry log's directory (`store = log`); one broker per directory. Default:
    /// HOME/telemetry-log.
    store_log_dir: Option<PathBuf> = None;
    /// With `store = log`: while the log holds more than this many bytes the registry has not
    /// taken yet (the database down or slower than ingest), messages are not acknowledged
    /// (devices retransmit them later). 0: no limit.
    store_log_max_bytes: u64 = 1 << 30;
    /// Longest wait for a registry connection, seconds: while the database is down, new
    /// devices get CONNACK 3 and unstored messages stay unacknowledged after this long.
    registry_timeout_secs: Secs = Secs::of(3.0), alias "registry-timeout";
    /// Expect a PROXY protocol v2 header (HAProxy `send-proxy-v2`) before TLS on every
    /// connection, and take the client address from it (per-source cap, logs). Enable only
    /// where nothing but the load balancer can reach the broker: the header is trusted.
    proxy_protocol: bool = false;
    /// With `proxy_protocol`: the load balancers' addresses (comma-separated IPs or CIDR blocks,
    /// e.g. `10.0.0.5, 10.0.1.0/28`). A connection from any other address is closed at accept
    /// (reason `proxy_header`), before it can hold a connection slot. Unset: any address may send
    /// a header, so only a firewall keeps others from the port.
    proxy_from: Option<String> = None;
    /// Most connections from one source address in the pre-admission phase (TLS handshake +
    /// CONNECT) at once; more are closed at accept (reason `source_limit`).
    max_pre_admission_per_source: usize = 32;
    /// Most connections in the pre-admission phase (TLS handshake + CONNECT) at once, from all
    /// sources together, each source held to its fair share (this number over the sources
    /// holding slots plus one, and `max_pre_admission_per_source`); more are closed at accept,
    /// before any handshake work (reason `handshakes_busy`, or `source_limit` past a source's
    /// share), and the client tries again. A reconnect storm is then admitted at the rate the
    /// cores sign handshakes, instead of every handshake slowing down together until all time
    /// out (BENCHMARKS.md, commands).
    max_handshakes: usize = 512;
    /// A socket that accepts no bytes for this long is closed (reason `write_timeout`),
    /// seconds.
    write_timeout_secs: Secs = Secs::of(10.0);
    /// Most live sessions of one claim certificate at once (first boots of a batch; all
    /// nonces together), and never more than a quarter of `max_connections`; more get
    /// CONNACK 3 (reason `claim_busy`) until one ends.
    max_sessions_per_claim: usize = 64;
    /// One CSR (`certs/csr`) per identity per this long, seconds, after a burst of 3 (a claim's
    /// burst: `max_sessions_per_claim`); more are dropped (acknowledged, never relayed to the
    /// issuer; `fleet_limits_total{limit="csr_rate"}`). The SDK asks every 30 s at most.
    csr_interval_secs: Secs = Secs::of(10.0);
    /// Most subscriptions one session holds; more get SUBACK 0x80.
    max_subscriptions_per_session: usize = 64;
    /// Most retained messages under one device's topics (`devices/<id>/...`).
    max_retained_per_device: usize = 16;
    /// Most bytes (topic, payload and MQTT 5 properties) of retained messages in the whole
    /// broker.
    max_retained_bytes: usize = 16 << 20;
    /// Most bytes (topic, payload, properties) of the online issuer's retained messages (operator-forced
    /// rotation requests, `devices/<id>/certs/rotate`): a budget of their own, so that devices
    /// filling theirs cannot stop a rotation.
    max_retained_bytes_issuer: usize = 4 << 20;
    /// Most PUBLISH packets per second from one device or claim session (a token bucket holding
    /// one second's worth); a client over it waits: its next message is handled, and a QoS 1
    /// one acknowledged, once it is back within the rate (counted, `publish_rate`). 0: off.
    max_publish_rate: u64 = 20_000;
    /// Most PUBLISH bytes (topic, payload and MQTT 5 properties) per second from one device or
    /// claim session, the same way (counted, `publish_rate`). 0: off.
    max_publish_bytes_rate: u64 = 32 << 20;
    /// Most messages queued for delivery to one session; more are dropped (counted).
    max_queued_messages: usize = 256;
    /// Longest topic or filter, bytes: a PUBLISH over it closes the session, a filter gets
    /// 0x80.
    max_topic_length: usize = 256;
    /// Most levels in a topic or filter (same treatment).
    max_topic_levels: usize = 8;
    /// How long a persistent session (clean session = 0) is kept after its client left,
    /// seconds.
    session_expiry_secs: u64 = 86_400;
    /// Most persistent sessions kept (for clients that are away) in the broker; a client that
    /// leaves when this many are kept is not kept (counted, `parked_total`).
    max_parked_sessions: usize = 100_000;
    /// Most persistent sessions kept for the nonces of one claim certificate (one session key
    /// per device or service identity caps those at one each); more are not kept (counted,
    /// `parked_per_claim`).
    max_parked_per_claim: usize = 16;
    /// Time-to-live of a queued command without a `ttl=<secs>` topic level, seconds.
    command_ttl_secs: u64 = 86_400;
    /// Most open (unacknowledged, unexpired) commands per device; the oldest are dropped.
    max_queued_commands: usize = 100;
    /// Largest command payload accepted into the queue, bytes (the SDK's 2 KiB inbox holds a
    /// command of this size with its topic); larger ones are refused (`too_large`).
    max_command_bytes: usize = 1900;
    /// Firmware images the broker serves to devices (docs/spec/ota.md): files named by their
    /// SHA-512 in hex, which `fleet-provision ota publish` copies in; the digest is checked when
    /// an image is loaded. Default: HOME/ota-blobs.
    ota_blob_dir: Option<PathBuf> = None;
    /// Largest chunk a device may ask for (`ota/get`), bytes; longer requests get this much.
    ota_max_chunk: usize = 1024;
    /// Chunk bytes per second to one device (a token bucket holding one second's worth), so
    /// that a campaign cannot starve the broker's other work. 0: off.
    ota_bytes_per_sec: u64 = 256 << 10;
    /// An update job that is offered, downloading, verified or rebooted and has no news from
    /// its device for this long fails as `stalled`, seconds.
    ota_stall_secs: Secs = Secs::of(3600.0);
    /// How often the campaign runner settles jobs and starts waves, milliseconds.
    ota_poll_ms: u64 = 1000;
    /// ACL refusals and limit hits are logged at most once per session per this interval,
    /// with a count of those not logged, seconds.
    log_interval_secs: Secs = Secs::of(10.0);
}
