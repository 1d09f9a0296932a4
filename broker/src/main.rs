//! `fleet-broker`: reads the configuration (file, then `FLEET_*` environment, then flags), then
//! runs the broker. See `--help`.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Arg, ArgAction, ArgMatches, Command};
use fleet_broker::{Broker, Config};

const ABOUT: &str = "The fleetgate MQTT ingest broker (mutual TLS, MQTT 3.1.1).";

const LONG_ABOUT: &str = "\
The fleetgate MQTT ingest broker (mutual TLS, MQTT 3.1.1).

Admits a client only with a valid, unrevoked certificate from the fleet's device issuing CA;
the MQTT client id must equal the certificate's device id (an empty one is assigned it); a
device may publish and subscribe only under devices/<its id>/; a `service` identity may
subscribe to devices/+/... and publish devices/<id>/commands/.... Device messages are stored
in the registry database before they are acknowledged. A revocation in the registry cuts the
device's session within a second.

With no flags it serves the fleet home ./fleet-pki (as written by `fleet-provision init` and
`fleet-provision server-cert --dns <host>`): TLS on 0.0.0.0:8883, metrics on 127.0.0.1:9464.

Every configuration key is a flag (--max-packet-size) and an environment variable
(FLEET_MAX_PACKET_SIZE). Precedence: flags > FLEET_* environment > --config file > defaults.
`check-config` prints the resolved configuration as a commented TOML file to start from.";

/// The command line: `--config`, one flag per configuration key, and `check-config`.
fn cli() -> Command {
    let mut cmd = Command::new("fleet-broker")
        .version(env!("CARGO_PKG_VERSION"))
        .about(ABOUT)
        .long_about(LONG_ABOUT)
        .arg(
            Arg::new("config")
                .long("config")
                .env("FLEET_BROKER_CONFIG")
                .value_name("FILE")
                .value_parser(clap::value_parser!(PathBuf))
                .help("TOML configuration file (keys as in `check-config` output)"),
        )
        .subcommand(
            Command::new("check-config")
                .about("Validate the configuration, load certificates and CRL, open the registry, print the resolved configuration"),
        );
    for key in Config::KEYS {
        let mut help = key.help.split_whitespace().collect::<Vec<_>>().join(" ");
        // Shown as clap shows a default, but not given to clap: a default there would
        // override the --config file.
        if let Some(d) = Config::default_text(key.name) {
            help.push_str(&format!(" [default: {d}]"));
        }
        let mut arg = Arg::new(key.name)
            .long(key.flag())
            .env(key.env())
            .value_name(key.name.to_ascii_uppercase())
            .action(ArgAction::Set)
            .help(help);
        if let Some(old) = key.alias {
            arg = arg.alias(old);
        }
        cmd = cmd.arg(arg);
    }
    cmd
}

/// Defaults, then the file, then environment and flags (clap resolves those two, flags first).
fn resolve(m: &ArgMatches) -> anyhow::Result<Config> {
    let mut c = match m.get_one::<PathBuf>("config") {
        Some(p) => {
            let text = std::fs::read_to_string(p).with_context(|| p.display().to_string())?;
            Config::from_toml(&text).with_context(|| p.display().to_string())?
        }
        None => Config::default(),
    };
    for key in Config::KEYS {
        if let Some(v) = m.get_one::<String>(key.name) {
            c.set(key.name, v).with_context(|| format!("--{} / {}", key.flag(), key.env()))?;
        }
    }
    c.validate()?;
    Ok(c)
}

async fn run(m: ArgMatches) -> anyhow::Result<()> {
    let config = resolve(&m)?;
    if m.subcommand_matches("check-config").is_some() {
        let plan = fleet_broker::check(config).await?;
        print!("{}", plan.config.redacted().to_commented_toml());
        println!("\n# configuration OK: certificates, key and client CA load; the registry opens.");
        match &plan.crl {
            Some(crl) => println!("# {crl}"),
            None => println!("# CRL: none loaded"),
        }
        return Ok(());
    }
    let broker = Broker::new(config.clone()).await?;
    let listeners = fleet_broker::bind(&config).await?;
    let (mqtt, metrics) = (&listeners.mqtt, &listeners.metrics);
    // Printed on stdout so scripts and tests that bind port 0 can find the ports.
    println!(
        "fleet-broker listening on {} (mqtts)",
        fleet_broker::addr(mqtt).map_or("?".into(), |a| a.to_string())
    );
    if let Some(a) = &listeners.admin {
        println!(
            "fleet-broker admin console on https://{}/ (operator certificates only)",
            fleet_broker::addr(a).map_or("?".into(), |a| a.to_string())
        );
    }
    if let Some(m) = metrics {
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
    broker.serve(listeners).await;
    Ok(())
}

/// What to do next, for the errors where the fix is another program's command.
fn hint(e: &anyhow::Error) -> Option<&'static str> {
    match e.downcast_ref::<fleet_broker::BrokerError>()? {
        fleet_broker::BrokerError::Registry(fleet_registry::Error::SchemaNotCurrent(_)) => Some(
            "the station migrates the registry: run a `fleet-provision` command (e.g. `fleet-provision list`) against this database as its owner",
        ),
        _ => None,
    }
}

/// Colour only on a terminal, and never with `NO_COLOR` set (<https://no-color.org>): logs that
/// go to a file or journald stay plain text.
fn colour(stream: &impl std::io::IsTerminal) -> bool {
    stream.is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

fn main() -> ExitCode {
    let matches = cli().get_matches_from(std::env::args_os().collect::<Vec<OsString>>());
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(colour(&std::io::stderr()))
        .init();
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(matches)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            match hint(&e) {
                Some(h) => eprintln!("error: {}; {h}", fleet_registry::report(e.as_ref())),
                None => eprintln!("error: {}", fleet_registry::report(e.as_ref())),
            }
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_is_well_formed_and_flags_override_the_defaults() {
        cli().debug_assert();
        let m = cli()
            .try_get_matches_from([
                "fleet-broker",
                "--max-packet-size",
                "8192",
                "--handshake-timeout",
                "2",
                "--connect-timeout-secs",
                "3",
                "--metrics-listen",
                "off",
            ])
            .expect("parses");
        let c = resolve(&m).expect("resolves");
        assert_eq!(
            (
                c.max_packet_size,
                c.handshake_timeout_secs.get(),
                c.connect_timeout_secs.get(),
                c.metrics_listen.0
            ),
            (8192, 2.0, 3.0, None)
        );
        let m = cli().try_get_matches_from(["fleet-broker", "--max-packet-size", "big"]).expect("parses");
        let e = format!("{:#}", resolve(&m).expect_err("not a number"));
        assert!(e.contains("--max-packet-size") && e.contains("big"), "{e}");
    }
}
