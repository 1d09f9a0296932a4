//! One session per device across the cluster (claims) and the revocation fan-out: what nodes
//! tell each other about devices, besides their messages.

use bytes::Bytes;
use fleet_registry::{DeviceId, SerialNumber};
use futures_util::StreamExt;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::warn;

use super::{bus, subject, Cluster};
use crate::outcome::BusRefusal;

/// A claim: which node admitted a session of a device, and when (unix nanoseconds).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Claim {
    started: u128,
    node: u64,
}

impl Claim {
    fn encode(self) -> Bytes {
        Bytes::from(format!("{} {}", self.started, self.node))
    }

    fn decode(b: &[u8]) -> Option<Self> {
        let (started, node) = std::str::from_utf8(b).ok()?.split_once(' ')?;
        Some(Self { started: started.parse().ok()?, node: node.parse().ok()? })
    }
}

/// Listens to other nodes' claims on a device for as long as this node's session of it lives.
#[derive(Debug)]
pub(crate) struct ClaimGuard(JoinHandle<()>);

impl Drop for ClaimGuard {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Cluster {
    /// This node admitted a session of `device`: tells the other nodes, and calls `cut` if
    /// another node admits the device later.
    pub(crate) async fn claim(&self, device: &str, cut: impl Fn() + Send + 'static) -> Option<ClaimGuard> {
        let mine = Claim {
            started: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos()),
            node: self.node_id,
        };
        let subject = subject::session_subject(device);
        // Subscribed before the claim goes out: a claim racing ours is seen either way.
        let mut sub = match self.client.subscribe(subject.clone()).await {
            Ok(s) => s,
            Err(e) => {
                warn!(error = %e, %subject, "cluster session subscribe failed");
                return None;
            }
        };
        if let Err(e) = self.client.publish_with_headers(subject, self.node_headers(), mine.encode()).await {
            warn!(error = %e, "cluster session claim failed");
        }
        let metrics = self.metrics.clone();
        Some(ClaimGuard(tokio::spawn(async move {
            while let Some(m) = sub.next().await {
                if !bus::from_node(m.headers.as_ref()) {
                    metrics.bus_refused(BusRefusal::NotFromNode);
                    continue;
                }
                match Claim::decode(&m.payload) {
                    Some(theirs) if theirs > mine => {
                        cut();
                        return;
                    }
                    _ => {}
                }
            }
        })))
    }
}

/// A revocation as nodes announce it on [`subject::REVOCATIONS`]: `<device id> <serial hex>`.
fn encode_revocation(device: &DeviceId, serial: &SerialNumber) -> Bytes {
    Bytes::from(format!("{device} {}", serial.to_hex()))
}

fn decode_revocation(b: &[u8]) -> Option<(DeviceId, SerialNumber)> {
    let (device, serial) = std::str::from_utf8(b).ok()?.split_once(' ')?;
    Some((DeviceId::parse(device).ok()?, SerialNumber::parse(serial).ok()?))
}

impl Cluster {
    /// Tells the other nodes of a revocation this node saw in the registry.
    pub(crate) async fn announce_revocation(&self, device: &DeviceId, serial: &SerialNumber) {
        let payload = encode_revocation(device, serial);
        if let Err(e) =
            self.client.publish_with_headers(subject::REVOCATIONS, self.node_headers(), payload).await
        {
            warn!(error = %e, %device, "cluster revocation announcement failed (the registry feed still carries it)");
        }
    }

    /// The revocations other nodes announce, until the connection closes (subscribed before it
    /// returns). Only well-formed announcements from nodes come through; the receiver still
    /// asks the registry before acting on one (`watch::cluster_revocations`).
    pub(crate) async fn revocations(
        &self,
    ) -> Result<(JoinHandle<()>, mpsc::Receiver<(DeviceId, SerialNumber)>), async_nats::SubscribeError> {
        let mut sub = self.client.subscribe(subject::REVOCATIONS).await?;
        let (tx, rx) = mpsc::channel(1024);
        let metrics = self.metrics.clone();
        Ok((
            tokio::spawn(async move {
                while let Some(m) = sub.next().await {
                    if !bus::from_node(m.headers.as_ref()) {
                        metrics.bus_refused(BusRefusal::NotFromNode);
                        continue;
                    }
                    match decode_revocation(&m.payload) {
                        // A full queue: a flood. What is dropped the registry feed still carries.
                        Some(r) => {
                            let _ = tx.try_send(r);
                        }
                        None => warn!(len = m.payload.len(), "malformed cluster revocation ignored"),
                    }
                }
            }),
            rx,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_later_claim_wins_and_the_node_id_breaks_a_tie() {
        let a = Claim { started: 10, node: 7 };
        let later = Claim { started: 11, node: 1 };
        let same_time = Claim { started: 10, node: 8 };
        assert!(later > a && same_time > a);
        assert_eq!(Claim::decode(&later.encode()), Some(later));
        assert_eq!(Claim::decode(b"garbage"), None);
        assert_eq!(Claim::decode(b"1 x"), None);
    }

    #[test]
    fn revocations_round_trip_and_garbage_is_refused() {
        let device = DeviceId::parse("dev-1").unwrap();
        let serial = SerialNumber::parse("4a0b").unwrap();
        let b = encode_revocation(&device, &serial);
        assert_eq!(decode_revocation(&b), Some((device, serial)));
        for bad in [&b""[..], b"dev-1", b"dev-1 zz", b"../x 4a0b", b"\xff 4a"] {
            assert_eq!(decode_revocation(bad), None);
        }
    }
}
