//! One task per connection, in phases: the TLS handshake and admission ([`admit`]), CONNECT
//! binding ([`connect`]), then the MQTT session ([`handler`]) until the client leaves, the broker
//! cuts it ([`table`]: revocation, takeover) or the broker stops. [`conn`] owns the stream and
//! its buffers.

pub(crate) mod admit;
pub(crate) mod conn;
pub(crate) mod connect;
pub(crate) mod handler;
pub(crate) mod table;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rumqttc::mqttbytes::v4::{ConnAck, ConnectReturnCode, Packet};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;
use tracing::{debug, info, warn};

use crate::listener::PreAdmissionSlot;
use crate::outcome::{CloseCounter, CloseReason};
use crate::Shared;
use conn::Conn;
use table::{Kick, LiveSession};

pub(crate) type Tls = TlsStream<TcpStream>;

/// A TCP connection the listener let in.
#[derive(Debug)]
pub(crate) struct Accepted {
    pub(crate) sock: TcpStream,
    pub(crate) peer: SocketAddr,
    /// Unique for the broker's life (router and session-table key).
    pub(crate) conn_id: u64,
    /// Its place in the source address's pre-admission share, given back at admission.
    pub(crate) pre_admission: PreAdmissionSlot,
}

/// Serves one accepted TCP connection to the end.
pub(crate) async fn serve(shared: Arc<Shared>, accepted: Accepted) {
    let Accepted { sock, peer, conn_id, pre_admission } = accepted;
    let tls = match Box::pin(admit::handshake(&shared, sock, peer)).await {
        Ok(tls) => tls,
        Err(Some(refusal)) => return shared.metrics.refused(refusal),
        Err(None) => return,
    };
    let cert = match admit::peer_certificate(&tls) {
        Ok(c) => c,
        Err(refusal) => return shared.metrics.refused(refusal),
    };
    // Boxed, like the handshake: the registry query is a big future that is never live together
    // with the session loop, and a connection task should not carry it for its whole life.
    let admission = Box::pin(admit::admit(&shared, &cert)).await;
    let mut conn = Conn::new(tls, shared.config.max_packet_size, shared.config.write_timeout());
    let bound = match connect::bind(&shared, &mut conn, admission).await {
        Ok(bound) => bound,
        Err((refused, connect)) => {
            return refused.finish(&shared, &mut conn, peer, &cert, connect.as_ref()).await
        }
    };
    drop(cert);
    drop(pre_admission);

    let id = bound.id;
    let kick = Kick::under(&shared.shutdown);
    let live = LiveSession { conn_id, serial: id.serial.clone(), kick: kick.clone() };
    if let Some(old) = shared.sessions.register(&id.id, live) {
        info!(device = %id.id, "a new connection replaces the live session of this device");
        old.cut(CloseReason::Takeover);
    }
    // A revocation that landed between the admission query and registration is cut by
    // `register` (the feed reported it already) or by the feed (it reports it later).
    // In a cluster, a later session of the device on another node cuts this one.
    let _claim = match &shared.cluster {
        Some(cluster) => {
            let (kick, device) = (kick.clone(), id.id.clone());
            cluster
                .claim(id.id.as_str(), move || {
                    info!(%device, "a session on another node replaces this one");
                    kick.cut(CloseReason::Takeover);
                })
                .await
        }
        None => None,
    };
    shared.metrics.accepted();
    shared.metrics.sessions_live.inc();
    info!(%peer, device = %id.id, role = id.role.as_str(), serial = %id.serial, "session admitted");
    let ctx = handler::Ctx { shared: &shared, id, conn_id, keep_alive: bound.keep_alive, kick };
    let (end, mut conn) =
        match conn.send(Packet::ConnAck(ConnAck::new(ConnectReturnCode::Success, false))).await {
            // Not boxed: the session loop shares this task's allocation with the phases before it
            // (they are never live together). Boxed, it came on top of them: +0.8 KiB per idle
            // session (BENCHMARKS.md, memory).
            Ok(()) => handler::run(&ctx, conn).await,
            Err(end) => (end, conn),
        };
    let filters = shared.router.remove_connection(conn_id);
    if let Some(cluster) = &shared.cluster {
        for f in &filters {
            cluster.unwatch(f);
        }
    }
    shared.sessions.remove(&ctx.id.id, conn_id);
    shared.metrics.sessions_live.dec();
    shared.metrics.closed(end);
    let (device, reason) = (&ctx.id.id, end.label());
    match end.counter() {
        CloseCounter::Kick if end == CloseReason::WriteTimeout => {
            warn!(%device, reason, "session closed: the peer accepts no data");
        }
        CloseCounter::Kick => info!(%device, serial = %ctx.id.serial, reason, "session cut"),
        CloseCounter::Protocol => info!(%device, reason, "session closed for a protocol violation"),
        CloseCounter::None => debug!(%device, reason, "session ended"),
    }
    conn.close(Duration::from_secs(1)).await;
}
