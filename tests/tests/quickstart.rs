//! The README's main-job command, `./scripts/quickstart`, run end to end and its output checked.
#![allow(clippy::unwrap_used)] // test code

use std::path::PathBuf;
use std::process::Command;

fn bin_dir() -> PathBuf {
    fleet_tests::workspace_bin_dir(&["fleet-provision", "fleet-broker", "fleet-sim"])
}

#[test]
fn quickstart_runs_the_whole_story() {
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let demo = tempfile::tempdir().unwrap();
    let out = Command::new("bash")
        .arg(repo.join("scripts/quickstart"))
        .arg(demo.path().join("demo"))
        .env("FLEET_BIN_DIR", bin_dir())
        .env_remove("FLEET_HOME")
        .env_remove("FLEET_DATABASE_URL")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "quickstart failed:\n{stdout}\n{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    // Provisioning, broker start, telemetry flowing, the command delivered, revocation cut.
    for expected in [
        "initialised fleet home",
        "minted 5 device identities",
        "fleet-broker listening on 127.0.0.1:",
        "command sent: devices/",
        "revoked device",
        "cut off (",
        "fleet_kicks_total{reason=\"revoked\"} 1",
        "issuance log OK",
        "fleet-sim: 1 certificate rotations",
        "key:rotation",
        "reason:superseded",
    ] {
        assert!(stdout.contains(expected), "quickstart output lacks `{expected}`:\n{stdout}");
    }
    // The series is exported at 0 from the start: its value shows the revoked device's
    // reconnection was refused as revoked.
    let revoked_refusals: f64 = stdout
        .lines()
        .find_map(|l| l.strip_prefix("fleet_handshakes_total{outcome=\"refused\",reason=\"revoked\"} "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no revoked-refusal series:\n{stdout}"));
    assert!(revoked_refusals >= 1.0, "the revoked device was never refused as revoked:\n{stdout}");
    // Four devices stay connected and one of them got the command.
    assert_eq!(stdout.matches("  connected").count(), 4, "{stdout}");
    let stored: u64 = stdout
        .lines()
        .find_map(|l| l.strip_prefix("fleet_messages_stored_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap();
    let acked: u64 = stdout
        .lines()
        .filter(|l| l.contains("messages acknowledged"))
        .find_map(|l| l.strip_prefix("fleet-sim: ").and_then(|r| r.split(' ').next()?.parse().ok()))
        .unwrap();
    assert!(acked > 20, "too little telemetry acknowledged: {acked}");
    assert!(stored >= acked, "every acknowledged message is stored ({stored} stored, {acked} acked)");
    let watched = stdout.lines().find(|l| l.contains("what the backend service received")).unwrap();
    assert!(!watched.contains("of 0 messages"), "{watched}");
    // Output a person can read: only the metrics that moved, ACKED never above SENT, errors in
    // words, and logs written to files without colour codes.
    let zeros: Vec<&str> = stdout.lines().filter(|l| l.starts_with("fleet_") && l.ends_with(" 0")).collect();
    assert!(zeros.is_empty(), "metrics at 0 are printed: {zeros:?}");
    let table = stdout.lines().skip_while(|l| !l.starts_with("DEVICE  ")).skip(1);
    for row in table.take_while(|l| l.starts_with("dev-")) {
        let cols: Vec<&str> = row.split_whitespace().collect();
        let (sent, acked): (u64, u64) = (cols[1].parse().unwrap(), cols[2].parse().unwrap());
        assert!(acked <= sent, "ACKED above SENT: {row}");
    }
    fleet_tests::assert_plain_words(&stdout);
    for log in ["broker.log", "issuer.log"] {
        let text = std::fs::read_to_string(demo.path().join("demo").join(log)).unwrap();
        assert!(!text.is_empty() && !text.contains('\x1b'), "{log} has colour codes:\n{text}");
    }
}
