//! `memory`: resident memory per idle mTLS session. Each server is started, `--sessions`
//! sessions are opened (64 at a time) and left idle past fleet-broker's 2 s buffer release; the
//! growth of the server's RSS is divided by the sessions it holds.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::client;
use crate::servers::Peer;
use crate::{fd_limit, Args, Env, Report};

pub(crate) async fn scenario_memory(env: &Env, a: &Args, report: &mut Report) {
    let n = a.sessions;
    println!("\n== memory: resident set of each server with {n} idle mTLS sessions");
    let limit = fd_limit();
    if limit < (n as u64) + 1024 {
        println!(
            "  skipped: open-file limit {limit} < {n} sessions; raise it (ulimit -n {}; scripts/bench does)",
            n * 2 + 1024
        );
        return;
    }
    let t = Instant::now();
    let ids = env.mint("mem", n).await;
    println!("  minted {n} identities in {:.1} s", t.elapsed().as_secs_f64());
    for subject in a.subjects(&Peer::ALL) {
        let bare = subject.is(Peer::Bare);
        let Some(server) = env.start_subject(&subject) else { continue };
        let before = server.rss_kib();
        let held = Arc::new(tokio::sync::Mutex::new(Vec::with_capacity(n)));
        let next = Arc::new(AtomicU64::new(0));
        let t = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..64 {
            let (ids, held, next, addr) = (ids.clone(), held.clone(), next.clone(), server.addr);
            tasks.push(tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                    let Some(who) = ids.get(i) else { break };
                    let s = if bare {
                        match client::tls(addr, who).await {
                            Some(mut s) => {
                                let mut b = [0u8; 1];
                                tokio::io::AsyncReadExt::read(&mut s, &mut b)
                                    .await
                                    .ok()
                                    .filter(|&k| k == 1)
                                    .map(|_| s)
                            }
                            None => None,
                        }
                    } else {
                        client::session(addr, who, 600).await
                    };
                    if let Some(s) = s {
                        held.lock().await.push(s);
                    }
                }
            }));
        }
        for t in tasks {
            let _ = t.await;
        }
        let open = held.lock().await.len();
        let took = t.elapsed().as_secs_f64();
        // Idle means idle: past fleet-broker's 2 s buffer release.
        tokio::time::sleep(Duration::from_secs(4)).await;
        let after = server.rss_kib();
        let per = if open > 0 { (after.saturating_sub(before)) as f64 / open as f64 } else { 0.0 };
        report.add(
            "memory",
            format!(
                "| {} | {open} / {n} | {:.1} MiB → {:.1} MiB | **{per:.1} KiB** | connected in {took:.0} s |",
                subject.name(),
                before as f64 / 1024.0,
                after as f64 / 1024.0
            ),
        );
        drop(server);
        held.lock().await.clear();
    }
}
