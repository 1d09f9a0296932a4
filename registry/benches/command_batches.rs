//! The command writer's batch against the registry alone, no broker: the time and the thread
//! switches per batch of new commands, on SQLite's one-call path and on the general path (the
//! same batch with one no-op acknowledgement added, which takes the general path), in one run.
//!
//! ```sh
//! cargo bench -p fleet-registry --bench command_batches            # 16,000 devices, batches of 34 and 64
//! cargo bench -p fleet-registry --bench command_batches -- 8000 32  # devices, batch size
//! ```
//!
//! Figures: BENCHMARKS.md ("Issue 29, fifth pass").

use std::time::Instant;

use fleet_registry::{CommandOp, DeviceId, NewCert, NewCommand, Registry, Role, SerialNumber};

/// Context switches of every thread of this process so far (`/proc/self/task/*/status`).
fn switches() -> u64 {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else { return 0 };
    tasks
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("status")).ok())
        .flat_map(|status| {
            status
                .lines()
                .filter(|l| l.contains("ctxt_switches"))
                .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
                .collect::<Vec<_>>()
        })
        .sum()
}

/// Three commands per device in batches of `batch`; `general` adds a no-op acknowledgement to
/// each batch. Prints and returns the microseconds per batch.
async fn run(reg: &Registry, ids: &[DeviceId], batch: usize, general: bool) -> f64 {
    let mut conn = reg.writer_connection().await.expect("writer connection");
    let rounds = 3 * ids.len() / batch;
    let (s0, t) = (switches(), Instant::now());
    for r in 0..rounds {
        let mut ops: Vec<CommandOp<'_>> = (0..batch)
            .map(|j| {
                CommandOp::Enqueue(NewCommand {
                    device_id: &ids[(r * batch + j) % ids.len()],
                    name: "set-interval",
                    payload: br#"{"interval_s":300}"#,
                    sender: "bench-svc",
                    now: 1,
                    ttl_ms: 3_600_000_000,
                    response_topic: None,
                    correlation: None,
                })
            })
            .collect();
        if general {
            ops.push(CommandOp::Acknowledged { id: 0, now: 1 });
        }
        reg.apply_commands_on(&mut conn, &ops, 100).await.expect("apply");
    }
    let us = t.elapsed().as_micros() as f64 / rounds as f64;
    println!(
        "| {} | {batch} | {us:.0} µs | {:.2} µs | {:.1} |",
        if general { "general path (4 calls: BEGIN, the inserts, the no-op, COMMIT)" } else { "one call" },
        us / batch as f64,
        (switches() - s0) as f64 / rounds as f64
    );
    us
}

/// A fresh registry of `devices` active devices.
async fn registry(dir: &std::path::Path, devices: usize) -> (Registry, Vec<DeviceId>) {
    let url = format!("sqlite://{}", dir.join("registry.db").display());
    let reg = Registry::open(&url, true).await.expect("open");
    let ids: Vec<DeviceId> =
        (0..devices).map(|i| DeviceId::parse(&format!("bench-{i:06}")).expect("id")).collect();
    let certs: Vec<NewCert> = ids
        .iter()
        .map(|id| NewCert {
            device_id: id.clone(),
            role: Role::Device,
            serial: SerialNumber::random(),
            not_before: 0,
            not_after: i64::MAX / 2,
            key_source: "station",
            cert_der: vec![0x30, 0x00],
        })
        .collect();
    for chunk in certs.chunks(1000) {
        reg.record_certificates(chunk, true, 1).await.expect("record");
    }
    (reg, ids)
}

#[tokio::main]
async fn main() {
    let args: Vec<usize> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let devices = args.first().copied().unwrap_or(16_000);
    let batches: Vec<usize> = if args.len() > 1 { args[1..].to_vec() } else { vec![34, 64] };
    println!("{devices} devices, 3 commands each, SQLite, a fresh registry for each row");
    println!("| path | commands per batch | per batch | per command | thread switches per batch |");
    println!("|---|---:|---:|---:|---:|");
    for &batch in &batches {
        let mut took = [0.0; 2];
        for (k, general) in [true, false].into_iter().enumerate() {
            let dir = tempfile::tempdir().expect("tempdir");
            let (reg, ids) = registry(dir.path(), devices).await;
            took[k] = run(&reg, &ids, batch, general).await;
            reg.pool().close().await;
        }
        println!("| one call / general | {batch} | {:.2}× the time | | |", took[1] / took[0]);
    }
}
