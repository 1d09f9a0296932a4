//! `revoke`: revoke → disconnect latency. 100 connected devices are revoked one by one through
//! the station (the `fleet-provision revoke` path); fleet-broker sees the registry and cuts each
//! session, so the tool waits for each cut. Mosquitto and rumqttd only have the CRL file: it is
//! rewritten (and Mosquitto sent SIGHUP), then the sessions still open after 5 s are counted.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fleet_provision::{DeviceId, RevocationReason};

use crate::client::{self, Identity};
use crate::servers::Peer;
use crate::{percentile, Args, Env, Report};

/// Connects every identity and returns, per session, a receiver that fires when it closes.
pub(crate) async fn open_sessions(
    addr: SocketAddr,
    ids: &[Arc<Identity>],
) -> Vec<Option<tokio::sync::oneshot::Receiver<Instant>>> {
    let mut closed = Vec::new();
    for who in ids {
        match client::session(addr, who, 120).await {
            Some(s) => {
                let (tx, rx) = tokio::sync::oneshot::channel();
                tokio::spawn(async move {
                    let (mut rd, _wr) = tokio::io::split(s);
                    client::read_packets(&mut rd, |_| true).await;
                    let _ = tx.send(Instant::now());
                });
                closed.push(Some(rx));
            }
            None => closed.push(None),
        }
    }
    closed
}

async fn revoke(env: &Env, who: &Identity) -> Duration {
    let t = Instant::now();
    let id = DeviceId::parse(&who.id).expect("device id");
    env.station.revoke_device(&id, RevocationReason::KeyCompromise).await.expect("revoke");
    t.elapsed()
}

/// How long each revocation took to cut its session, and the revoke calls themselves.
pub(crate) struct RevokeTimes {
    pub(crate) cut: Vec<Duration>,
    pub(crate) calls: Vec<Duration>,
    /// Sessions never opened or never cut within 5 s.
    pub(crate) never: usize,
}

/// Revokes each of `ids` at a random moment and waits for its session (from `open_sessions`)
/// to close.
pub(crate) async fn revoke_each(
    env: &Env,
    ids: &[Arc<Identity>],
    sessions: Vec<Option<tokio::sync::oneshot::Receiver<Instant>>>,
) -> RevokeTimes {
    let mut r = RevokeTimes { cut: Vec::new(), calls: Vec::new(), never: 0 };
    for (who, closed) in ids.iter().zip(sessions) {
        let Some(closed) = closed else {
            r.never += 1;
            continue;
        };
        // Revocations arrive at random moments, not in step with the broker's poll.
        tokio::time::sleep(Duration::from_millis(rand::random::<u64>() % 250)).await;
        let t = Instant::now();
        r.calls.push(revoke(env, who).await);
        match tokio::time::timeout(Duration::from_secs(5), closed).await {
            Ok(Ok(at)) => r.cut.push(at.saturating_duration_since(t)),
            _ => r.never += 1,
        }
    }
    r
}

pub(crate) async fn scenario_revoke(env: &Env, a: &Args, report: &mut Report) {
    const N: usize = 100;
    println!(
        "\n== revoke → disconnect: {N} connected devices revoked one by one (`fleet-provision revoke` path)"
    );
    // fleet-broker (and the before binary): each revocation, then wait for that session to close.
    for subject in a.subjects(&[Peer::FleetBroker]) {
        let ids = env.mint(if subject.before.is_some() { "rvb" } else { "rvf" }, N).await;
        let Some(server) = env.start_subject(&subject) else { continue };
        let sessions = open_sessions(server.addr, &ids).await;
        let RevokeTimes { cut: mut lat, mut calls, never } = revoke_each(env, &ids, sessions).await;
        lat.sort();
        calls.sort();
        let refused = client::session(server.addr, &ids[0], 30).await.is_none();
        report.add(
            "revoke",
            format!(
                "| {} | {} / {N} cut | p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms | revoke command p50 {:.0} ms | reconnect {} | {never} never cut |",
                subject.name(),
                lat.len(),
                percentile(&lat, 50.0).as_secs_f64() * 1e3,
                percentile(&lat, 99.0).as_secs_f64() * 1e3,
                lat.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
                percentile(&calls, 50.0).as_secs_f64() * 1e3,
                if refused { "refused" } else { "ADMITTED" },
            ),
        );
    }
    // Peers: they cannot see the registry; their only revocation input is the CRL file.
    for (peer, prefix) in
        [(Peer::Mosquitto, "rvm"), (Peer::Rumqttd, "rvr")].into_iter().filter(|&(p, _)| a.wants(p))
    {
        let ids = env.mint(prefix, N).await;
        let Some(server) = env.start(peer) else { continue };
        let sessions = open_sessions(server.addr, &ids).await;
        let t = Instant::now();
        for who in &ids {
            revoke(env, who).await;
        }
        // Mosquitto re-reads its configuration on SIGHUP; rumqttd has nothing to reload.
        let how = if peer == Peer::Mosquitto {
            server.hangup();
            "CRL rewritten + SIGHUP"
        } else {
            "CRL rewritten (ignored: no CRL support)"
        };
        tokio::time::sleep(Duration::from_secs(5)).await;
        let mut cut = 0;
        let mut connected = 0;
        for mut closed in sessions.into_iter().flatten() {
            connected += 1;
            if closed.try_recv().is_ok() {
                cut += 1;
            }
        }
        let refused = client::session(server.addr, &ids[0], 30).await.is_none();
        report.add(
            "revoke",
            format!(
                "| {} | {cut} / {connected} cut within {:.0} s | – | {how} | reconnect {} | {} never cut |",
                peer.name(),
                t.elapsed().as_secs_f64(),
                if refused { "refused" } else { "ADMITTED" },
                connected - cut,
            ),
        );
    }
}
