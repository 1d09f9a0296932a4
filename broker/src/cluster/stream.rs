//! Durable ingest of a cluster through JetStream (`docs/spec/cluster-stream.md`).
//!
//! A cluster member stores device messages in one JetStream stream (file storage, replicas as
//! configured) instead of the registry: the store writer hands a batch to [`JetStreamSink`],
//! which publishes every message on its stored subject (`fleet.m.<topic>`) and waits for every
//! JetStream acknowledgement; a QoS 1 PUBACK follows only those. A QoS 1 message carries a
//! `Nats-Msg-Id` made of the device, the packet id and a digest of topic and payload, so a
//! retransmission (DUP, possibly through another node after a crash) within the stream's
//! duplicate window is stored once.
//!
//! The SQL `telemetry` table is fed from the stream by [`feed_sql`]: one durable pull consumer
//! shared by every node that runs the sink (the stream's messages are split between them),
//! batched, idempotent (the stream sequence is a unique column), acknowledged after the commit.
//! Backends may consume the stream themselves the same way (`docs/spec/cluster-stream.md`, `broker/examples/stream_consumer.rs`).

use std::fmt::Write as _;
use std::future::IntoFuture;
use std::time::Duration;

use async_nats::jetstream::consumer::{pull, AckPolicy};
use async_nats::jetstream::context::Publish;
use async_nats::jetstream::{self, stream};
use async_nats::HeaderMap;
use fleet_registry::{DeviceId, Telemetry, TelemetryWriter};
use futures_util::{FutureExt, StreamExt};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::subject;
use crate::message::Props;
use crate::observe::metrics::Metrics;
use crate::store::{Sink, SinkError};

/// Header: the publishing device.
pub const DEVICE: &str = "Fleet-Device";
/// Header: the QoS the device published with ("0" or "1").
pub const QOS: &str = "Fleet-QoS";
/// Header: unix milliseconds at the broker that accepted the message.
pub const RECEIVED_AT: &str = "Fleet-Received-At";
/// Header of a stored message's MQTT 5 properties (one line of ASCII JSON, docs/spec/mqtt5.md).
pub const PROPERTIES: &str = "Mqtt-Properties";
/// The durable consumer the nodes' SQL sinks share.
pub use crate::config::SQL_CONSUMER;

/// The stream a cluster's nodes store into, as `config` describes it.
pub(crate) fn stream_config(name: &str, replicas: usize, duplicate_window: Duration) -> stream::Config {
    stream::Config {
        name: name.to_owned(),
        subjects: vec![format!("{}.>", subject::STORED)],
        storage: stream::StorageType::File,
        num_replicas: replicas,
        duplicate_window,
        ..Default::default()
    }
}

/// A stream reader's durable pull consumer (`nats_readers`): the stored subjects of `filter`
/// (nats-server 2.9 takes one filter subject: the first of a `…/#` filter covers every topic a
/// device publishes), explicit acknowledgements.
pub(crate) fn reader_consumer(name: &str, filter: &str) -> pull::Config {
    pull::Config {
        durable_name: Some(name.to_owned()),
        filter_subject: subject::stored_filter_subjects(filter).into_iter().next().unwrap_or_default(),
        ack_policy: AckPolicy::Explicit,
        ack_wait: Duration::from_secs(30),
        max_ack_pending: 10_000,
        ..Default::default()
    }
}

/// The de-duplication id of a QoS 1 message: the same for a device's retransmission of it,
/// whichever node it arrives at.
pub(crate) fn message_id(device: &str, pkid: u16, topic: &str, payload: &[u8]) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(&(topic.len() as u64).to_be_bytes());
    ctx.update(topic.as_bytes());
    ctx.update(payload);
    let digest = ctx.finish();
    let mut id = format!("{device}:{pkid}:");
    for b in &digest.as_ref()[..12] {
        // Writing to a String cannot fail; no allocation per byte on the ingest path.
        let _ = write!(id, "{b:02x}");
    }
    id
}

/// Room kept for a bus message's headers (node, origin, QoS, message id) beside its payload.
pub(crate) const HEADROOM: usize = 4096;

/// Does a message with `payload` bytes and these properties fit the server's `max_payload`?
/// Its properties are left behind when they do not (they may be up to six times their size on
/// the wire once escaped): the message itself always fits (`PayloadLimit` at start).
pub(crate) fn props_fit(max_payload: usize, payload: usize, props_json: &str) -> bool {
    payload + props_json.len() + HEADROOM <= max_payload
}

/// The store writer's sink in a cluster: JetStream.
#[derive(Debug, Clone)]
pub(crate) struct JetStreamSink {
    pub(crate) js: jetstream::Context,
    /// The server's largest message ([`super::Cluster::max_payload`]).
    pub(crate) max_payload: usize,
}

impl Sink for JetStreamSink {
    async fn store(&self, rows: &[Telemetry], pkids: &[u16]) -> Result<(), SinkError> {
        let mut acks = Vec::with_capacity(rows.len());
        for (row, &pkid) in rows.iter().zip(pkids) {
            let mut headers = HeaderMap::new();
            headers.insert(DEVICE, row.device_id.as_str());
            headers.insert(QOS, if row.qos == 0 { "0" } else { "1" });
            headers.insert(RECEIVED_AT, row.received_at.to_string().as_str());
            // Properties too large for the server's messages stay behind: the message is stored
            // (one device's oversized properties must not fail its batch, others' messages too).
            if let Some(props) =
                row.properties.as_ref().filter(|p| props_fit(self.max_payload, row.payload.len(), p))
            {
                headers.insert(PROPERTIES, props.as_str());
            }
            let mut p = Publish::build().payload(row.payload.clone()).headers(headers);
            if pkid != 0 {
                p = p.message_id(message_id(row.device_id.as_str(), pkid, &row.topic, &row.payload));
            }
            acks.push(self.js.send_publish(subject::stored_subject_of(&row.topic), p).await?);
        }
        // Every acknowledgement, or the batch failed (its QoS 1 messages stay unacknowledged;
        // what was stored meets its retransmission in the duplicate window).
        for r in futures_util::future::join_all(acks.into_iter().map(|a| a.into_future())).await {
            r?;
        }
        Ok(())
    }
}

/// A stored message back as a telemetry row (`None`: not one a broker stored).
fn row_of(m: &async_nats::Message) -> Option<Telemetry> {
    let topic = subject::topic_of_stored(m.subject.as_str())?;
    let header = |name: &str| m.headers.as_ref().and_then(|h| h.get(name)).map(|v| v.as_str().to_owned());
    let device_id = DeviceId::parse(&header(DEVICE)?).ok()?;
    // The publisher is the device whose subtree the topic is in (the ACL saw to it).
    if topic.split('/').nth(1) != Some(device_id.as_str()) {
        return None;
    }
    Some(Telemetry {
        device_id,
        topic,
        payload: m.payload.clone(),
        qos: if header(QOS)? == "0" { 0 } else { 1 },
        received_at: header(RECEIVED_AT)?.parse().ok()?,
        // Written by a node from the properties it parsed: kept only if they still read as such.
        properties: header(PROPERTIES).filter(|p| Props::from_json(p).is_some()),
    })
}

/// Feeds the SQL telemetry table from the stream until `shutdown`; comes back by itself after
/// NATS or registry outages.
pub(crate) async fn feed_sql(
    js: jetstream::Context,
    stream_name: String,
    writer: TelemetryWriter,
    batch: usize,
    metrics: Metrics,
    shutdown: CancellationToken,
) {
    let mut failing = false;
    loop {
        let run = sink_once(&js, &stream_name, &writer, batch, &metrics, &shutdown);
        match tokio::select! { r = run => r, _ = shutdown.cancelled() => return } {
            Ok(()) => return,
            Err(e) => {
                if !failing {
                    warn!(error = %e, "SQL sink: stream unavailable; retrying");
                    failing = true;
                }
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
    }
}

async fn sink_once(
    js: &jetstream::Context,
    stream_name: &str,
    writer: &TelemetryWriter,
    batch: usize,
    metrics: &Metrics,
    shutdown: &CancellationToken,
) -> Result<(), SinkError> {
    let stream = js.get_stream(stream_name).await?;
    let consumer = stream
        .get_or_create_consumer(
            SQL_CONSUMER,
            pull::Config {
                durable_name: Some(SQL_CONSUMER.to_owned()),
                ack_policy: AckPolicy::Explicit,
                // What a node that died holding a batch delays: its messages go to another
                // node after this long.
                ack_wait: Duration::from_secs(5),
                max_ack_pending: 65_536,
                ..Default::default()
            },
        )
        .await?;
    let mut messages = consumer.stream().max_messages_per_batch(batch).messages().await?;
    info!(stream = stream_name, consumer = SQL_CONSUMER, "SQL sink: feeding the telemetry table");
    let mut taken = Vec::with_capacity(batch);
    while let Some(first) = messages.next().await {
        taken.push(first?);
        while taken.len() < batch {
            match messages.next().now_or_never() {
                Some(Some(m)) => taken.push(m?),
                _ => break,
            }
        }
        let mut rows = Vec::with_capacity(taken.len());
        for m in &taken {
            let seq = m.info()?.stream_sequence;
            match row_of(m) {
                Some(row) => rows.push((seq, row)),
                None => warn!(seq, subject = %m.subject, "SQL sink: not a stored device message; skipped"),
            }
        }
        // Retried until it lands: acknowledging first could lose rows, and the insert is
        // idempotent, so a redelivery after a crash stores nothing twice.
        loop {
            match writer.insert_from_stream(&rows).await {
                Ok(()) => break,
                Err(e) => {
                    metrics.cluster_sink_errors.inc();
                    warn!(error = %e, rows = rows.len(), "SQL sink: commit failed; retrying");
                    tokio::select! {
                        _ = shutdown.cancelled() => return Ok(()),
                        _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                    }
                }
            }
        }
        metrics.cluster_sink_rows.inc_by(rows.len() as u64);
        for m in taken.drain(..) {
            m.ack().await?;
        }
    }
    Err("the stream's message feed ended".into())
}

/// A ready-made payload for tests of the header contract.
#[cfg(test)]
fn stored_message(subject: &str, headers: &[(&str, &str)], payload: &'static [u8]) -> async_nats::Message {
    let mut h = HeaderMap::new();
    for (k, v) in headers {
        h.insert(*k, *v);
    }
    async_nats::Message {
        subject: subject.into(),
        reply: None,
        payload: bytes::Bytes::from_static(payload),
        headers: Some(h),
        status: None,
        description: None,
        length: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_retransmission_has_the_same_id_and_another_message_another() {
        let a = message_id("dev-1", 7, "devices/dev-1/t", b"21.5");
        assert_eq!(a, message_id("dev-1", 7, "devices/dev-1/t", b"21.5"));
        assert_ne!(a, message_id("dev-1", 8, "devices/dev-1/t", b"21.5"));
        assert_ne!(a, message_id("dev-1", 7, "devices/dev-1/t", b"21.6"));
        assert_ne!(a, message_id("dev-2", 7, "devices/dev-1/t", b"21.5"));
        // Topic and payload do not run into each other.
        assert_ne!(message_id("d", 1, "ab", b"c"), message_id("d", 1, "a", b"bc"));
    }

    #[test]
    fn stored_messages_read_back_as_rows_and_foreign_ones_do_not() {
        let subject = subject::stored_subject_of("devices/dev-1/telemetry");
        let ok = [(DEVICE, "dev-1"), (QOS, "1"), (RECEIVED_AT, "1700000000123")];
        let row = row_of(&stored_message(&subject, &ok, b"x")).expect("row");
        assert_eq!(
            (row.device_id.as_str(), row.topic.as_str(), row.qos, row.received_at),
            ("dev-1", "devices/dev-1/telemetry", 1, 1_700_000_000_123)
        );
        assert!(row_of(&stored_message("fleet.t.devices.dev-1.telemetry", &ok, b"x")).is_none());
        assert!(row_of(&stored_message(&subject, &ok[..2], b"x")).is_none());
        let other = [(DEVICE, "dev-2"), (QOS, "1"), (RECEIVED_AT, "1")];
        assert!(row_of(&stored_message(&subject, &other, b"x")).is_none(), "device and topic disagree");
    }
}
