//! Output a person can read (issue 27): errors in plain words said once, no colour codes off a
//! terminal, `check-config` a TOML file to start from, and `--help` naming every key's flag and
//! default.
#![allow(clippy::unwrap_used)] // test code

mod common;

use std::path::Path;
use std::process::{Command, Output, Stdio};

use common::{broker_bin, BrokerProc, Fleet};
use fleet_broker::Config;
use fleet_tests::assert_plain_words;

fn bin(name: &str) -> std::path::PathBuf {
    fleet_tests::workspace_bin_dir(&["fleet-provision", "fleet-broker", "fleet-sim"]).join(name)
}

fn run(cmd: &mut Command) -> Output {
    cmd.env_remove("FLEET_HOME").env_remove("FLEET_DATABASE_URL").env_remove("FLEET_BROKER_CONFIG");
    fleet_tests::run(cmd.stdin(Stdio::null()))
}

/// Runs a command that must fail; returns its stderr after checking it is plain words.
fn fails(cmd: &mut Command, must_say: &[&str]) -> String {
    let out = run(cmd);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "{cmd:?} succeeded:\n{err}");
    assert!(err.starts_with("error: "), "{cmd:?}:\n{err}");
    for s in must_say {
        assert!(err.contains(s), "{cmd:?} does not say `{s}`:\n{err}");
    }
    assert_plain_words(&err);
    err
}

fn broker(home: &Path) -> Command {
    let mut c = Command::new(broker_bin());
    c.arg("--home").arg(home);
    c
}

#[tokio::test(flavor = "multi_thread")]
async fn real_errors_are_said_once_in_plain_words() {
    let fleet = Fleet::new(1, None).await;
    let home = fleet.home();
    let dir = fleet.dir.path();
    // A configuration file that is not there.
    fails(
        broker(&home).args(["--config", "/nonexistent/fleet.toml", "check-config"]),
        &["/nonexistent/fleet.toml"],
    );
    // A certificate that cannot be read.
    fails(
        broker(&home).args(["--cert", "/nonexistent/cert.pem", "check-config"]),
        &["/nonexistent/cert.pem"],
    );
    // A CRL that is not one, and one that is not signed by the client CA.
    std::fs::write(dir.join("bad.crl"), "not a CRL").unwrap();
    fails(broker(&home).arg("--crl").arg(dir.join("bad.crl")).arg("check-config"), &["bad.crl"]);
    std::fs::write(dir.join("garbled.crl"), "-----BEGIN X509 CRL-----\nAAAA\n-----END X509 CRL-----\n")
        .unwrap();
    fails(broker(&home).arg("--crl").arg(dir.join("garbled.crl")).arg("check-config"), &["garbled.crl"]);
    // Certificate and key files that are not what they should be.
    std::fs::write(dir.join("b64.pem"), "-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n")
        .unwrap();
    std::fs::write(dir.join("der.pem"), "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
        .unwrap();
    for (flag, file) in
        [("--cert", "b64.pem"), ("--cert", "der.pem"), ("--client-ca", "der.pem"), ("--key", "der.pem")]
    {
        fails(broker(&home).arg(flag).arg(dir.join(file)).arg("check-config"), &[file]);
    }
    // A registry that cannot be opened (sqlx prints its cause inside its own message).
    let db = "sqlite:///nonexistent/registry.db";
    let err =
        fails(broker(&home).args(["--database-url", db, "check-config"]), &["unable to open database file"]);
    assert_eq!(err.matches("unable to open database file").count(), 1, "{err}");
    let err = fails(
        Command::new(bin("fleet-provision")).arg("--home").arg(&home).args(["--database-url", db, "list"]),
        &["unable to open database file"],
    );
    assert_eq!(err.matches("unable to open database file").count(), 1, "{err}");
    // A value that does not parse names the flag and the value.
    fails(broker(&home).args(["--max-packet-size", "big", "check-config"]), &["--max-packet-size", "big"]);
    // A refused connection: a port that was just free.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port().to_string();
    fails(
        Command::new(bin("fleet-sim"))
            .args(["command", "--port", &port, "--device", &fleet.id(0), "--name", "x"])
            .arg("--identity")
            .arg(&fleet.service),
        &["refused"],
    );
    // A device whose broker is gone: fleet-sim's table says why in words.
    let out = run(Command::new(bin("fleet-sim"))
        .args(["run", "--port", &port, "--duration", "1", "--rate", "1", "--devices"])
        .arg(dir.join("devices")));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains("cut off ("), "{text}");
    assert_plain_words(&text);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_revoked_device_and_a_reloaded_crl_are_logged_in_words_without_colour() {
    let fleet = Fleet::new(2, None).await;
    let broker = BrokerProc::start(&fleet, &[]);
    // A revocation (the CRL file is rewritten: the broker reloads it and logs it) and the
    // revoked device trying again.
    let st = fleet.station().await;
    let id = fleet_provision::DeviceId::parse(&fleet.id(0)).unwrap();
    st.revoke_device(&id, fleet_provision::RevocationReason::KeyCompromise).await.unwrap();
    let out = run(Command::new(bin("fleet-sim"))
        .args(["run", "--port", &broker.port(), "--duration", "2.5", "--rate", "2", "--devices"])
        .arg(fleet.dir.path().join("devices")));
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{table}");
    assert_plain_words(&table);
    for row in table.lines().filter(|l| l.starts_with("dev-")) {
        let cols: Vec<&str> = row.split_whitespace().collect();
        assert!(
            cols[2].parse::<u64>().unwrap() <= cols[1].parse::<u64>().unwrap(),
            "ACKED above SENT: {row}"
        );
    }
    let log = broker.log();
    assert!(log.contains("TLS configuration reloaded; CRL #"), "{log}");
    assert!(log.contains("revoked"), "{log}");
    assert_plain_words(&log);
}

/// Runs `sh -c cmd` on a pseudo-terminal (util-linux `script`), returning what it wrote.
fn on_a_terminal(cmd: &str, env: &[(&str, &str)]) -> String {
    let script = fleet_tests::require_program("script", "util-linux");
    let out = run(Command::new(script).args(["-qec", cmd, "/dev/null"]).envs(env.iter().copied()));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn colour_only_on_a_terminal_and_never_with_no_color() {
    let fleet = Fleet::new(1, None).await;
    // A failing start logs an error through tracing; `check-config` on a fleet whose
    // registry is fine logs nothing, so provoke a log line: a missing admin database.
    let cmd = format!(
        "{} --home {} --listen 127.0.0.1:0 --metrics-listen off --admin-listen 127.0.0.1:0 \
         --admin-database-url sqlite:///nonexistent/x.db --registry-timeout-secs 1 & pid=$!; sleep 2; kill $pid",
        broker_bin().display(),
        fleet.home().display()
    );
    let coloured = on_a_terminal(&cmd, &[("RUST_LOG", "info")]);
    assert!(coloured.contains("admin API off"), "{coloured}");
    assert!(coloured.contains("\x1b["), "a terminal gets colour:\n{coloured}");
    let plain = on_a_terminal(&cmd, &[("RUST_LOG", "info"), ("NO_COLOR", "1")]);
    assert!(plain.contains("admin API off") && !plain.contains('\x1b'), "NO_COLOR:\n{plain}");
    // Off a terminal (a file), no colour either.
    let broker = BrokerProc::start(
        &fleet,
        &["--admin-listen", "127.0.0.1:0", "--admin-database-url", "sqlite:///nonexistent/x.db"],
    );
    std::thread::sleep(std::time::Duration::from_millis(500));
    let log = broker.log();
    assert!(log.contains("admin API off") && !log.contains('\x1b'), "{log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn check_config_prints_a_commented_toml_file_that_round_trips() {
    let fleet = Fleet::new(1, None).await;
    let out = run(broker(&fleet.home()).args(["--max-packet-size", "8192", "check-config"]));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    assert_plain_words(&text);
    let table: toml::Table = toml::from_str(&text).unwrap_or_else(|e| panic!("not TOML: {e}\n{text}"));
    assert_eq!(table["max_packet_size"].as_integer(), Some(8192));
    assert_eq!(table["handshake_timeout_secs"].as_float(), Some(10.0));
    for key in Config::KEYS {
        let first_doc_line = key.help.lines().next().unwrap().trim();
        assert!(text.contains(&format!("# {first_doc_line}")), "{} has no comment:\n{text}", key.name);
        assert!(
            table.contains_key(key.name) || text.contains(&format!("# {}: not set", key.name)),
            "{} is missing:\n{text}",
            key.name
        );
    }
    // The CRL line is words and dates, not Rust values.
    let crl = text.lines().find(|l| l.starts_with("# CRL #")).unwrap();
    assert!(crl.contains("next update 20") && crl.ends_with('Z'), "{crl}");
    // Fed back as the configuration file, the same file comes out.
    let file = fleet.dir.path().join("fleet.toml");
    std::fs::write(&file, &text).unwrap();
    let again = run(Command::new(broker_bin()).arg("--config").arg(&file).arg("check-config"));
    assert!(again.status.success(), "{}", String::from_utf8_lossy(&again.stderr));
    assert_eq!(String::from_utf8(again.stdout).unwrap(), text);
}

#[test]
fn every_config_key_is_a_flag_of_the_same_name_and_help_names_its_default() {
    let out = run(Command::new(broker_bin()).arg("--help"));
    let help = String::from_utf8(out.stdout).unwrap();
    assert!(out.status.success() && !help.contains('\x1b'), "{help}");
    // Each flag's block runs to the next flag.
    let blocks: Vec<&str> = help.split("\n      --").skip(1).collect();
    for key in Config::KEYS {
        let flag = key.name.replace('_', "-");
        let block = blocks
            .iter()
            .find(|b| b.starts_with(&format!("{flag} ")))
            .unwrap_or_else(|| panic!("no --{flag} for key {}:\n{help}", key.name));
        assert!(block.contains("[default: "), "--{flag} names no default:\n{block}");
        assert!(block.contains(&format!("[env: {}=", key.env())), "--{flag}:\n{block}");
    }
    // The old spellings still work.
    let home = tempfile::tempdir().unwrap();
    let out = run(broker(home.path()).args([
        "--handshake-timeout",
        "2",
        "--connect-timeout",
        "3",
        "--registry-timeout",
        "4",
        "check-config",
    ]));
    // The home is empty: the check fails on the certificate, after the flags parsed.
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cert.pem") && !err.contains("unexpected argument"), "{err}");
}

/// One figure for the device's TLS receive buffer, the one the SDK computes and `connect`
/// enforces: the broker's `--help`, the README and the SDK docs say it, and no older figure
/// (4,113 B, "+17 bytes", "5 KiB buffer", "16.6 KiB") is left anywhere.
#[test]
fn one_receive_buffer_figure_everywhere() {
    use fleet_device::client::{rx_buffer_for, FLEET_BROKER_RECORD, UNCAPPED_RECORD};
    let with_commas = |n: usize| format!("{},{:03}", n / 1000, n % 1000);
    let record = Config::default().max_tls_record_size;
    assert_eq!(record, FLEET_BROKER_RECORD, "the SDK's default matches the broker's");
    let (capped, uncapped) =
        (with_commas(rx_buffer_for(record)), with_commas(rx_buffer_for(UNCAPPED_RECORD)));
    let key = Config::KEYS.iter().find(|k| k.name == "max_tls_record_size").unwrap();
    assert!(key.help.contains(&capped) && key.help.contains(&uncapped), "{}", key.help);
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let readme = std::fs::read_to_string(repo.join("README.md")).unwrap();
    assert!(readme.contains(&format!("{capped} bytes")), "README does not state {capped}");
    let mut files = vec![repo.join("README.md"), repo.join("BENCHMARKS.md")];
    for dir in ["docs", "broker/src", "broker/src/config", "broker/src/tls", "device/src", "device/src/tls"] {
        for e in std::fs::read_dir(repo.join(dir)).unwrap().flatten() {
            let p = e.path();
            if p.extension().is_some_and(|x| x == "md" || x == "rs") {
                files.push(p);
            }
        }
    }
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        for stale in ["4,113", "4113", "+ 17 bytes", "+17", "5 KiB buffer", "~5 KiB", "16.6 KiB"] {
            assert!(!text.contains(stale), "{} still says `{stale}`", f.display());
        }
    }
}
