//! A backend reading a fleetgate cluster's device messages straight from JetStream, instead of
//! subscribing over MQTT or reading the SQL table (`docs/spec/cluster-stream.md`).
//!
//! ```sh
//! cargo run -p fleet-broker --example stream_consumer -- nats://127.0.0.1:4222 'devices/+/telemetry'
//! ```
//!
//! Arguments: NATS URL, MQTT topic filter (default `#`), durable consumer name (default
//! `example-backend`), and how many messages to print before exiting (default: run forever).
//! The consumer is durable: run it again and it continues where it stopped; every message is
//! acknowledged after it was handled (here: printed), so a crash re-delivers, never skips.
//! Each line: stream sequence, device, QoS, broker receive time (unix ms), topic, payload.

use std::time::Duration;

use async_nats::jetstream::consumer::{pull, AckPolicy};
use futures_util::StreamExt;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let mut args = std::env::args().skip(1);
    let url = args.next().ok_or("usage: stream_consumer NATS_URL [FILTER] [CONSUMER] [COUNT]")?;
    let filter = args.next().unwrap_or_else(|| "#".to_owned());
    let durable = args.next().unwrap_or_else(|| "example-backend".to_owned());
    let count: Option<usize> = args.next().map(|c| c.parse()).transpose()?;

    let client = async_nats::connect(&url).await?;
    let js = async_nats::jetstream::new(client);
    let stream = js.get_stream("FLEET").await?;
    let consumer = stream
        .get_or_create_consumer(
            &durable,
            pull::Config {
                durable_name: Some(durable.clone()),
                // nats-server 2.9 takes one filter subject; the first one of a `…/#` filter
                // covers every topic a device may publish (a device never publishes on the
                // parent level itself).
                filter_subject: fleet_broker::stream::filter_subjects(&filter)
                    .into_iter()
                    .next()
                    .unwrap_or_default(),
                ack_policy: AckPolicy::Explicit,
                ack_wait: Duration::from_secs(30),
                ..Default::default()
            },
        )
        .await?;
    let mut messages = consumer.messages().await?;
    let mut seen = 0;
    while count.is_none_or(|c| seen < c) {
        let Some(m) = messages.next().await else { break };
        let m = m?;
        let header = |name: &str| {
            m.headers.as_ref().and_then(|h| h.get(name)).map(|v| v.as_str().to_owned()).unwrap_or_default()
        };
        let topic = fleet_broker::stream::topic_of(m.subject.as_str()).unwrap_or_default();
        println!(
            "{} {} qos={} at={} {} {}",
            m.info()?.stream_sequence,
            header(fleet_broker::stream::DEVICE),
            header(fleet_broker::stream::QOS),
            header(fleet_broker::stream::RECEIVED_AT),
            topic,
            String::from_utf8_lossy(&m.payload)
        );
        m.ack().await?;
        seen += 1;
    }
    Ok(())
}
