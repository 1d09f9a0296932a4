//! `fleet-broker`: parses flags and the config file, then runs the broker. See `--help`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use fleet_broker::{Broker, Config, CrlPolicy};

/// The fleetgate MQTT ingest broker (mutual TLS, MQTT 3.1.1).
///
/// Admits a client only with a valid, unrevoked certificate from the fleet's device issuing CA;
/// the MQTT client id must equal the certificate's device id (an empty one is assigned it); a
/// device may publish and subscribe only under devices/<its id>/; a `service` identity may
/// subscribe to devices/+/... and publish devices/<id>/commands/.... Device messages are stored
/// in the registry database before they are acknowledged. A revocation in the registry cuts the
/// device's session within a second.
///
/// With no flags it serves the fleet home ./fleet-pki (as written by `fleet-provision init` and
/// `fleet-provision server-cert --dns <host>`): TLS on 0.0.0.0:8883, metrics on 127.0.0.1:9464.
/// Precedence: flags > FLEET_* environment > --config file > defaults.
#[derive(Debug, Parser)]
#[command(name = "fleet-broker", version, verbatim_doc_comment)]
struct Cli {
    /// TOML configuration file (keys as in `check-config` output).
    #[arg(long, env = "FLEET_BROKER_CONFIG")]
    config: Option<PathBuf>,
    /// MQTT over TLS listen address.
    #[arg(long, env = "FLEET_LISTEN")]
    listen: Option<SocketAddr>,
    /// fleet-provision home: device CA, CRL, registry, broker-tls/.
    #[arg(long, env = "FLEET_HOME")]
    home: Option<PathBuf>,
    /// Registry database URL (default: HOME/registry.db).
    #[arg(long, env = "FLEET_DATABASE_URL")]
    database_url: Option<String>,
    /// Metrics endpoint address; `off` disables it.
    #[arg(long, env = "FLEET_METRICS_LISTEN")]
    metrics_listen: Option<String>,
    /// Broker certificate chain (default HOME/broker-tls/cert.pem).
    #[arg(long)]
    cert: Option<PathBuf>,
    /// Broker private key (default HOME/broker-tls/key.pem).
    #[arg(long)]
    key: Option<PathBuf>,
    /// Client CA (default HOME/device-ca.pem).
    #[arg(long)]
    client_ca: Option<PathBuf>,
    /// CRL file, reloaded when it changes (default HOME/crl.pem if present).
    #[arg(long, env = "FLEET_CRL")]
    crl: Option<PathBuf>,
    /// What to do when the CRL is past nextUpdate.
    #[arg(long, value_enum)]
    crl_policy: Option<CrlPolicy>,
    /// Most open connections.
    #[arg(long)]
    max_connections: Option<usize>,
    /// Largest MQTT packet, bytes.
    #[arg(long)]
    max_packet_size: Option<usize>,
    /// TLS handshake deadline, seconds.
    #[arg(long)]
    handshake_timeout: Option<f64>,
    /// CONNECT deadline, seconds.
    #[arg(long)]
    connect_timeout: Option<f64>,
    /// Longest wait for a registry database connection, seconds (default 3): while the database
    /// is down, new devices get CONNACK 3 and unstored messages stay unacknowledged after this.
    #[arg(long)]
    registry_timeout: Option<f64>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Validate the configuration, load certificates/CRL, open the registry, print the plan.
    CheckConfig,
}

fn resolve(cli: &Cli) -> anyhow::Result<Config> {
    let mut c = match &cli.config {
        Some(p) => {
            let text = std::fs::read_to_string(p).map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?;
            Config::from_toml(&text).map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?
        }
        None => Config::default(),
    };
    if let Some(v) = cli.listen {
        c.listen = v;
    }
    if let Some(v) = &cli.home {
        c.home = v.clone();
    }
    if let Some(v) = &cli.database_url {
        c.database_url = Some(v.clone());
    }
    if let Some(v) = &cli.metrics_listen {
        c.metrics_listen = if v == "off" {
            None
        } else {
            Some(
                v.parse()
                    .map_err(|_| anyhow::anyhow!("--metrics-listen: `{v}` is not an address or `off`"))?,
            )
        };
    }
    for (dst, src) in [
        (&mut c.cert, &cli.cert),
        (&mut c.key, &cli.key),
        (&mut c.client_ca, &cli.client_ca),
        (&mut c.crl, &cli.crl),
    ] {
        if let Some(v) = src {
            *dst = Some(v.clone());
        }
    }
    if let Some(v) = cli.crl_policy {
        c.crl_policy = v;
    }
    if let Some(v) = cli.max_connections {
        c.max_connections = v;
    }
    if let Some(v) = cli.max_packet_size {
        c.max_packet_size = v;
    }
    if let Some(v) = cli.handshake_timeout {
        c.handshake_timeout_secs = v;
    }
    if let Some(v) = cli.connect_timeout {
        c.connect_timeout_secs = v;
    }
    if let Some(v) = cli.registry_timeout {
        c.registry_timeout_secs = v;
    }
    c.validate()?;
    Ok(c)
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let config = resolve(&cli)?;
    if let Some(Command::CheckConfig) = cli.command {
        let plan = fleet_broker::check(config).await?;
        let c = &plan.config;
        println!("configuration OK");
        println!("listen            = \"{}\"", c.listen);
        println!("home              = \"{}\"", c.home.display());
        println!("database_url      = \"{}\"", plan.database_url);
        println!("metrics_listen    = {}", c.metrics_listen.map_or("off".into(), |a| format!("\"{a}\"")));
        println!("cert              = \"{}\"", plan.tls.cert.display());
        println!("key               = \"{}\"", plan.tls.key.display());
        println!("client_ca         = \"{}\"", plan.tls.client_ca.display());
        println!(
            "crl               = {}",
            plan.tls.crl.as_ref().map_or("none".into(), |p| format!("\"{}\"", p.display()))
        );
        println!("crl_policy        = {:?}", c.crl_policy);
        println!("max_connections   = {}", c.max_connections);
        println!("max_packet_size   = {}", c.max_packet_size);
        println!("handshake_timeout_secs = {}", c.handshake_timeout_secs);
        println!("connect_timeout_secs   = {}", c.connect_timeout_secs);
        println!("registry_timeout_secs  = {}", c.registry_timeout_secs);
        println!("max_pre_admission_per_source = {}", c.max_pre_admission_per_source);
        println!("write_timeout_secs     = {}", c.write_timeout_secs);
        println!("max_subscriptions_per_session = {}", c.max_subscriptions_per_session);
        println!("max_retained_per_device = {}", c.max_retained_per_device);
        println!("max_retained_bytes     = {}", c.max_retained_bytes);
        println!("max_queued_messages    = {}", c.max_queued_messages);
        println!("max_topic_length       = {}", c.max_topic_length);
        println!("max_topic_levels       = {}", c.max_topic_levels);
        println!("log_interval_secs      = {}", c.log_interval_secs);
        if let Some(crl) = &plan.crl {
            println!("# CRL: {} revoked, nextUpdate {:?}", crl.revoked, crl.next_update);
        }
        return Ok(());
    }
    let broker = Broker::new(config.clone()).await?;
    let (mqtt, metrics) = fleet_broker::bind(&config).await?;
    // Printed on stdout so scripts and tests that bind port 0 can find the ports.
    println!(
        "fleet-broker listening on {} (mqtts)",
        fleet_broker::addr(&mqtt).map_or("?".into(), |a| a.to_string())
    );
    if let Some(m) = &metrics {
        println!(
            "fleet-broker metrics on http://{}/metrics",
            fleet_broker::addr(m).map_or("?".into(), |a| a.to_string())
        );
    }
    let token = broker.shutdown_token();
    tokio::spawn(async move {
        let term = async {
            #[cfg(unix)]
            if let Ok(mut s) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                s.recv().await;
                return;
            }
            std::future::pending::<()>().await
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term => {}
        }
        tracing::info!("shutting down: no new connections, finishing stores, closing sessions");
        token.cancel();
    });
    broker.serve(mqtt, metrics).await;
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
