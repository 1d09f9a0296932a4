//! The deployable units: Prometheus alert rules (promtool), the Grafana dashboard and the
//! systemd units, each checked against the real broker or the real tool.
#![allow(clippy::unwrap_used)] // test code

mod common;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use fleet_tests::{require_program, workspace_bin_dir};

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// Every `fleet_*` metric name in `text`.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let b = text.as_bytes();
    let mut i = 0;
    while let Some(at) = text[i..].find("fleet_") {
        let start = i + at;
        let boundary = start == 0 || !(b[start - 1].is_ascii_alphanumeric() || b[start - 1] == b'_');
        let mut end = start;
        while end < b.len() && (b[end].is_ascii_lowercase() || b[end].is_ascii_digit() || b[end] == b'_') {
            end += 1;
        }
        if boundary {
            names.insert(text[start..end].to_string());
        }
        i = end;
    }
    names
}

#[test]
fn alert_rules_pass_promtool_and_their_unit_tests_fire_and_stay_quiet() {
    let promtool = require_program("promtool", "prometheus");
    let dir = deploy().join("prometheus");
    for args in [&["check", "rules", "alerts.yml"][..], &["test", "rules", "alerts_test.yml"][..]] {
        let out = Command::new(&promtool).args(args).current_dir(&dir).output().unwrap();
        assert!(
            out.status.success(),
            "promtool {args:?}:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[tokio::test]
async fn the_dashboard_and_the_alerts_use_only_metrics_the_broker_exports_from_its_start() {
    let committed = std::fs::read_to_string(deploy().join("grafana/fleetgate.json")).unwrap();
    // The JSON is generated: a hand edit that the generator would undo fails here.
    let python = require_program("python3", "python3");
    let out =
        Command::new(python).arg(deploy().join("grafana/generate.py")).arg("--stdout").output().unwrap();
    assert!(out.status.success(), "generate.py: {}", String::from_utf8_lossy(&out.stderr));
    assert!(
        String::from_utf8_lossy(&out.stdout) == committed,
        "deploy/grafana/fleetgate.json differs from what generate.py writes: run it and commit"
    );
    let dashboard: serde_json::Value = serde_json::from_str(&committed).unwrap();
    let alerts = std::fs::read_to_string(deploy().join("prometheus/alerts.yml")).unwrap();

    // The dashboard's shape: unique panel ids, every graph has a query, all inside 24 columns.
    let panels = dashboard["panels"].as_array().unwrap();
    let mut ids = BTreeSet::new();
    let mut exprs = String::new();
    for p in panels {
        assert!(ids.insert(p["id"].as_i64().unwrap()), "duplicate panel id {}", p["id"]);
        let g = &p["gridPos"];
        assert!(
            g["x"].as_i64().unwrap() + g["w"].as_i64().unwrap() <= 24,
            "panel {} off the grid",
            p["title"]
        );
        if p["type"] != "row" {
            let targets = p["targets"].as_array().unwrap();
            assert!(!targets.is_empty(), "panel {} has no query", p["title"]);
            for t in targets {
                exprs.push_str(t["expr"].as_str().unwrap());
                exprs.push('\n');
            }
        }
    }
    let wanted: BTreeSet<String> = metric_names(&exprs).into_iter().chain(metric_names(&alerts)).collect();
    assert!(wanted.len() >= 20, "only {} metrics referenced: {wanted:?}", wanted.len());

    // A broker that has seen no device yet: every referenced family is already exported, and
    // the counters an alert takes `increase()` of exist at 0 (a series born at its first event
    // would hide that event from `increase`).
    let fleet = Fleet::new(1, None).await;
    let broker = BrokerProc::start(&fleet, &[]);
    let text = broker.metrics_text().await;
    let exported: BTreeSet<String> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect();
    let missing: Vec<_> = wanted.difference(&exported).collect();
    assert!(missing.is_empty(), "referenced but not exported: {missing:?}\n{text}");
    for series in [
        "fleet_handshakes_total{outcome=\"refused\",reason=\"registry_unavailable\"} 0",
        "fleet_handshakes_total{outcome=\"refused\",reason=\"revoked\"} 0",
        "fleet_handshakes_total{outcome=\"accepted\",reason=\"ok\"} 0",
        "fleet_kicks_total{reason=\"revoked\"} 0",
        "fleet_store_errors_total 0",
        "fleet_cluster_member 0",
    ] {
        assert!(text.lines().any(|l| l == series), "no `{series}` at start:\n{text}");
    }

    // Every label value a rule or a panel selects on (`reason="registry_unavailable"`,
    // `cert="client_ca"`, …) is exported by the fresh broker: a misspelt or renamed value would
    // select nothing, and the alert would never fire.
    let selected: BTreeSet<_> = label_values(&exprs).into_iter().chain(label_values(&alerts)).collect();
    assert!(
        selected.iter().any(|(_, l, v)| l == "cert" && v == "client_ca"),
        "the label parser found too little: {selected:?}"
    );
    let series: Vec<&str> = text.lines().filter(|l| l.starts_with("fleet_")).collect();
    for (name, label, value) in &selected {
        let wanted = format!("{label}=\"{value}\"");
        let found = series.iter().any(|l| {
            l.strip_prefix(name.as_str())
                .and_then(|rest| rest.strip_prefix('{'))
                .and_then(|rest| rest.split_once('}'))
                .is_some_and(|(labels, _)| labels.split(',').any(|m| m == wanted))
        });
        assert!(
            found,
            "{name}{{{wanted}}} is selected by a rule or panel but not exported at start:\n{text}"
        );
    }
}

/// Every `(metric, label, value)` a selector in `text` names with `label="value"` or
/// `label=~"a|b"` (literal alternatives), except the dashboard's `$instance` variable.
fn label_values(text: &str) -> BTreeSet<(String, String, String)> {
    let mut out = BTreeSet::new();
    let mut i = 0;
    while let Some(at) = text[i..].find("fleet_") {
        let start = i + at;
        let name_end =
            start + text[start..].find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(0);
        i = name_end.max(start + 1);
        if !text[name_end..].starts_with('{') {
            continue;
        }
        let close = name_end + text[name_end..].find('}').expect("an unclosed selector");
        let name = &text[start..name_end];
        for matcher in text[name_end + 1..close].split(',') {
            let matcher = matcher.trim();
            let (label, op, value) = if let Some((l, v)) = matcher.split_once("=~") {
                (l, "=~", v)
            } else if let Some((l, v)) = matcher.split_once("!=").or_else(|| matcher.split_once("!~")) {
                let _ = (l, v);
                continue; // a negative matcher names no value that must exist
            } else if let Some((l, v)) = matcher.split_once('=') {
                (l, "=", v)
            } else {
                continue;
            };
            let value = value.trim().trim_matches('"');
            if value.contains('$') || label.trim() == "instance" {
                continue;
            }
            let values: Vec<&str> = if op == "=~" { value.split('|').collect() } else { vec![value] };
            for v in values {
                assert!(
                    v.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
                    "{name}{{{matcher}}}: not a literal value list"
                );
                out.insert((name.to_owned(), label.trim().to_owned(), v.to_owned()));
            }
        }
        i = close;
    }
    out
}

/// The unit's `key=` lines (continuations not used in our units).
fn unit_values(unit: &str, key: &str) -> Vec<String> {
    unit.lines().filter_map(|l| l.strip_prefix(&format!("{key}="))).map(str::to_string).collect()
}

#[tokio::test]
async fn the_systemd_units_verify_are_hardened_and_their_command_lines_start_a_broker() {
    let analyze = require_program("systemd-analyze", "systemd");
    let bin = workspace_bin_dir(&["fleet-broker", "fleet-provision"]);
    let tmp = tempfile::tempdir().unwrap();
    for name in ["fleet-broker.service", "fleet-issuer.service"] {
        let unit = std::fs::read_to_string(deploy().join("systemd").join(name)).unwrap();
        // The binaries where this machine has them (verify checks ExecStart= exists).
        let local = unit.replace("/usr/local/bin/", &format!("{}/", bin.display()));
        let path = tmp.path().join(name);
        std::fs::write(&path, local).unwrap();
        let out = Command::new(&analyze).arg("verify").arg(&path).output().unwrap();
        let said =
            format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        // Unknown keys and bad values are warnings with exit status 0: any output fails.
        assert!(out.status.success() && said.trim().is_empty(), "systemd-analyze verify {name}:\n{said}");
        let out = Command::new(&analyze)
            .args(["security", "--offline=yes", "--threshold=20", "--no-pager"])
            .arg(&path)
            .output()
            .unwrap();
        let said = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{name}: exposure above 2.0:\n{said}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(said.contains("OK"), "{name}: {}", said.lines().last().unwrap_or_default());
    }

    // The broker unit's own command lines, on a fleet home and a config written by
    // `check-config` as the README says: ExecStartPre passes, ExecStart serves.
    let fleet = Fleet::new(1, None).await;
    let home = fleet.home();
    let etc = tmp.path().join("etc");
    std::fs::create_dir_all(&etc).unwrap();
    let out = Command::new(bin.join("fleet-broker"))
        .env("FLEET_HOME", &home)
        .env_remove("FLEET_DATABASE_URL")
        .arg("check-config")
        .output()
        .unwrap();
    assert!(out.status.success(), "check-config: {}", String::from_utf8_lossy(&out.stderr));
    std::fs::write(etc.join("broker.toml"), &out.stdout).unwrap();
    let unit = std::fs::read_to_string(deploy().join("systemd/fleet-broker.service")).unwrap();
    let local = |line: &str| -> Vec<String> {
        line.replace("/usr/local/bin/", &format!("{}/", bin.display()))
            .replace("/etc/fleetgate", etc.to_str().unwrap())
            .replace("/var/lib/fleetgate", home.to_str().unwrap())
            .split_whitespace()
            .map(str::to_string)
            .collect()
    };
    let command = |line: &str| {
        let argv = local(line);
        let mut c = Command::new(&argv[0]);
        // Port 0 here, not the unit's 8883 (the environment overrides the file).
        c.args(&argv[1..])
            .env("FLEET_LISTEN", "127.0.0.1:0")
            .env("FLEET_METRICS_LISTEN", "127.0.0.1:0")
            .env_remove("FLEET_HOME")
            .env_remove("FLEET_DATABASE_URL");
        c
    };
    let pre = unit_values(&unit, "ExecStartPre");
    assert_eq!(pre.len(), 1, "one ExecStartPre");
    let out = command(&pre[0]).output().unwrap();
    assert!(out.status.success(), "ExecStartPre: {}", String::from_utf8_lossy(&out.stderr));
    let start = unit_values(&unit, "ExecStart");
    assert_eq!(start.len(), 1, "one ExecStart");
    let mut child = command(&start[0]).stdout(Stdio::piped()).stderr(Stdio::null()).spawn().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let t = Instant::now();
    let first = lines.next().map(|l| l.unwrap_or_default()).unwrap_or_default();
    let _ = child.kill();
    let _ = child.wait();
    assert!(first.contains("listening on 127.0.0.1:"), "ExecStart printed {first:?}");
    assert!(t.elapsed() < Duration::from_secs(30));
}
