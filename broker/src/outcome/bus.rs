//! Why a node refused a message from the cluster bus.

/// Why a node refused to act on a message from the cluster bus (NATS):
/// `fleet_cluster_refused_total{reason}`. The bus is a trust boundary (docs/security.md): only
/// broker nodes may publish there, and what a node relays is checked again as if its client had
/// sent it here.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum BusRefusal {
    /// No `Fleet-Node` header: not sent by a node (e.g. a JetStream delivery of a stored
    /// message, or a client that is no node).
    NotFromNode,
    /// No or an unreadable `Fleet-Origin`: which client published it is unknown.
    NoOrigin,
    /// The client the origin names may not publish on the topic (its ACL).
    OriginDenied,
    /// A subject that maps to no topic.
    BadSubject,
    /// A revocation announcement the registry does not confirm.
    Unconfirmed,
}

impl BusRefusal {
    /// Every variant (for exporting every label at zero).
    pub const ALL: [BusRefusal; 5] = [
        BusRefusal::NotFromNode,
        BusRefusal::NoOrigin,
        BusRefusal::OriginDenied,
        BusRefusal::BadSubject,
        BusRefusal::Unconfirmed,
    ];

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            BusRefusal::NotFromNode => "not_from_node",
            BusRefusal::NoOrigin => "no_origin",
            BusRefusal::OriginDenied => "origin_denied",
            BusRefusal::BadSubject => "bad_subject",
            BusRefusal::Unconfirmed => "unconfirmed_revocation",
        }
    }
}
