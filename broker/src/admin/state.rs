//! What the admin API's handlers hold ([`Admin`], axum state) and who makes a request
//! ([`Caller`], a request extension set by the connection).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use fleet_registry::Registry;

use super::views::Views;
use crate::auth::Identity;
use crate::caps::Tally;
use crate::config::Config;
use crate::gate::Gate;
use crate::observe::Observe;
use crate::sessions::Sessions;

/// Who is on the other end of an admitted admin connection (an extension of every request).
#[derive(Debug)]
pub(crate) struct Caller {
    pub(crate) addr: SocketAddr,
    /// The operator, as the gate admitted it at the handshake.
    pub(crate) id: Identity,
    /// The certificate, for the gate's check at every request.
    pub(crate) cert: Vec<u8>,
}

/// Live event streams, in all and per operator.
#[derive(Debug, Default)]
pub(crate) struct Streams {
    pub(crate) all: Arc<Tally<()>>,
    pub(crate) per_operator: Arc<Tally<String>>,
}

/// Every revocation the registry held at the last look, and the feed position after it: each
/// summary reads only what is new (an operator's page asking every few seconds once read the
/// whole list each time, and with 20,000 revocations took the registry from admissions).
#[derive(Debug, Default)]
pub(crate) struct Revocations {
    pub(crate) after: i64,
    pub(crate) all: Vec<fleet_registry::RevocationEvent>,
}

/// The API's state.
#[derive(Debug, Clone)]
pub(crate) struct Admin {
    pub(crate) config: Arc<Config>,
    /// Asked again at every request; its TLS state shows the CRL.
    pub(crate) gate: Arc<Gate>,
    /// Cut at once by a revocation made here.
    pub(crate) sessions: Arc<Sessions>,
    pub(crate) observe: Observe,
    /// The registry as the broker reads it.
    pub(crate) registry: Registry,
    /// The registry revocations are written through (`admin_database_url`, else the same).
    pub(crate) writer: Registry,
    /// What every node knows (sessions, counts, events).
    pub(crate) views: Views,
    /// The last issuance-log check: (unix seconds, its JSON).
    pub(crate) log_check: Arc<Mutex<Option<(i64, serde_json::Value)>>>,
    /// Live event streams.
    pub(crate) streams: Arc<Streams>,
    /// The registry's revocations read so far, for the CRL health check (read incrementally).
    pub(crate) revocations: Arc<Mutex<Revocations>>,
    /// Ends the event streams.
    pub(crate) shutdown: tokio_util::sync::CancellationToken,
}

impl Admin {
    /// This node, as the API names it (its MQTT listen address).
    pub(crate) fn node(&self) -> &str {
        self.views.node()
    }

    /// The organisation the console names: `org_name`, else the client CA's O, else none.
    pub(crate) fn organisation(&self) -> Option<String> {
        self.config.org_name.clone().or_else(|| self.gate.tls().client_ca_org.clone())
    }
}
