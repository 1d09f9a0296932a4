//! CONNECT binding: the first packet must be a CONNECT, within the deadline, and its client id
//! must be the certificate's device id (or empty, and then it is assigned); a claim session's is
//! `claims/<claim-id>/<nonce>`. A refused client
//! gets one exit: the metric, one log line, a CONNACK with the refusal's code when it got as far
//! as CONNECT, then close_notify.

use std::net::SocketAddr;
use std::time::Duration;

use rumqttc::mqttbytes::v4::{Connect, Packet};
use tokio::time::timeout;
use tracing::{debug, warn};

use super::conn::{Conn, Inbound};
use super::services::Services;
use crate::auth::Identity;
use crate::outcome::Refusal;
use fleet_registry::Role;

/// A connection that will not become a session.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Refused {
    /// Why.
    pub(crate) refusal: Refusal,
    /// Whether the client sent a CONNECT and so expects a CONNACK.
    pub(crate) connack: bool,
}

/// A bound session: who, its keep-alive, and how long it outlives its connection.
#[derive(Debug)]
pub(crate) struct Bound {
    pub(crate) id: Identity,
    pub(crate) keep_alive: Duration,
    /// Start clean: a kept session is discarded (3.1.1 clean session, v5 Clean Start).
    pub(crate) clean_start: bool,
    /// How long the session is kept after the connection ends (zero: not kept). 3.1.1: the
    /// configured `session_expiry_secs` unless clean session; v5: what the client asked for,
    /// at most that.
    pub(crate) expiry: Duration,
    /// The client asked for more than the broker grants (v5: the CONNACK says how much).
    pub(crate) expiry_capped: bool,
    /// The client sent an empty client id (v5: the CONNACK says which one it got).
    pub(crate) assigned: bool,
}

/// Reads the CONNECT and binds it to the admission's identity.
pub(crate) async fn bind(
    svc: &Services,
    conn: &mut Conn,
    admission: Result<Identity, Refusal>,
) -> Result<Bound, (Refused, Option<Connect>)> {
    let early = |refusal| (Refused { refusal, connack: false }, None);
    let connect = match timeout(svc.config.connect_timeout(), conn.read_packet()).await {
        Ok(Ok(Some(Inbound::Packet(Packet::Connect(c))))) => c,
        // A v5 client is told why its CONNECT was refused (CONNACK 0x82); a 3.1.1 one is closed.
        Ok(Ok(Some(_))) | Ok(Err(_)) => {
            return Err((Refused { refusal: Refusal::ProtocolError, connack: conn.edge().is_some() }, None))
        }
        Ok(Ok(None)) => return Err(early(Refusal::PeerClosed)),
        Err(_) => return Err(early(Refusal::ConnectTimeout)),
    };
    let mut id = match admission {
        Ok(id) => id,
        Err(refusal) => return Err((Refused { refusal, connack: true }, Some(connect))),
    };
    if id.role == Role::Operator {
        return Err((Refused { refusal: Refusal::WrongRole, connack: true }, Some(connect)));
    }
    if id.role == Role::Claim {
        // Many devices share a claim certificate: each session names itself
        // `claims/<claim-id>/<nonce>` and is confined to that subtree.
        match id.claim_nonce(&connect.client_id) {
            Some(nonce) => id.nonce = Some(nonce.to_owned()),
            None => {
                return Err((Refused { refusal: Refusal::ClientIdMismatch, connack: true }, Some(connect)))
            }
        }
        // One claim key is on every device of a batch: a leaked one must not take every
        // connection slot (a reconnect of a session it holds replaces it, so it is let in).
        // Never more than a quarter of the broker's connection slots, whatever the setting.
        let cap = svc.config.max_sessions_per_claim.min((svc.config.max_connections / 4).max(1));
        let held = svc.sessions.claim_sessions(id.id.as_str());
        if held >= cap && svc.sessions.get(&id.session_key()).is_none() {
            return Err((Refused { refusal: Refusal::ClaimBusy, connack: true }, Some(connect)));
        }
    } else if !connect.client_id.is_empty() && connect.client_id != id.id.as_str() {
        return Err((Refused { refusal: Refusal::ClientIdMismatch, connack: true }, Some(connect)));
    }
    // Only a client that authenticated learns where the fleet went.
    if svc.config.moved_to.is_some() {
        return Err((Refused { refusal: Refusal::Moved, connack: true }, Some(connect)));
    }
    let keep_alive = Duration::from_secs(u64::from(connect.keep_alive));
    let cap = svc.config.session_expiry_secs;
    let (asked, expiry) = match conn.edge() {
        Some(edge) => {
            let asked = u64::from(edge.terms.session_expiry);
            (asked, asked.min(cap))
        }
        None if connect.clean_session => (0, 0),
        None => (cap, cap),
    };
    Ok(Bound {
        id,
        keep_alive,
        clean_start: connect.clean_session,
        expiry: Duration::from_secs(expiry),
        expiry_capped: asked > expiry,
        assigned: connect.client_id.is_empty(),
    })
}

impl Refused {
    /// The one exit of every refused connection.
    pub(crate) async fn finish(
        self,
        svc: &Services,
        conn: &mut Conn,
        peer: SocketAddr,
        cert: &[u8],
        connect: Option<&Connect>,
    ) {
        svc.gate.refused(self.refusal, peer, Some(cert));
        let reason = self.refusal.label();
        if !self.connack {
            debug!(%peer, reason, "connection closed before CONNECT");
            return;
        }
        let client_id = connect.map_or("", |c| c.client_id.as_str());
        let serial = crate::gate::serial_hex(cert);
        // As a str field the client id is quoted and escaped: a newline in it cannot forge a line.
        match self.refusal {
            Refusal::Moved => {
                debug!(%peer, %serial, client_id, reason, "connection refused: this node moved")
            }
            _ => warn!(%peer, %serial, client_id, reason, "connection refused"),
        }
        let _ = conn.send_refusal(self.refusal, svc.config.moved_to.as_deref()).await;
        conn.close(Duration::from_secs(1)).await;
    }
}
