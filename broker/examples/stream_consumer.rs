//! A backend reading a fleetgate cluster's device messages straight from JetStream, instead of
//! subscribing over MQTT or reading the SQL table (`docs/spec/cluster-stream.md`).
//!
//! ```sh
//! fleet-provision node-cert --stream-reader --name analytics --out analytics-nats
//! cargo run -p fleet-broker --example stream_consumer -- nats://127.0.0.1:4222 analytics-nats 'devices/+/telemetry'
//! ```
//!
//! Arguments: NATS URL, the reader's identity directory (`fleet-provision node-cert
//! --stream-reader`: `cert.pem`, `key.pem`, `broker-trust.pem`), MQTT topic filter (default
//! `#`), and how many messages to print before exiting (default: run forever). The reader's
//! name (the directory's certificate, `urn:fleetgate:stream-reader:<name>`) is its durable
//! consumer's name and its inbox prefix (`_INBOX_<name>`): the only consumer and replies the
//! shipped NATS configuration lets it use (`deploy/nats/nats-server.conf`).
//! The consumer is durable: run it again and it continues where it stopped; every message is
//! acknowledged after it was handled (here: printed), so a crash re-delivers, never skips.
//! Each line: stream sequence, device, QoS, broker receive time (unix ms), topic, payload.

use std::time::Duration;

use async_nats::jetstream::consumer::{pull, AckPolicy};
use futures_util::StreamExt;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let mut args = std::env::args().skip(1);
    let usage = "usage: stream_consumer NATS_URL IDENTITY_DIR [FILTER] [COUNT]";
    let url = args.next().ok_or(usage)?;
    let identity = std::path::PathBuf::from(args.next().ok_or(usage)?);
    let filter = args.next().unwrap_or_else(|| "#".to_owned());
    let count: Option<usize> = args.next().map(|c| c.parse()).transpose()?;
    let durable = reader_name(&identity.join("cert.pem"))
        .ok_or("the identity's certificate names no stream reader (urn:fleetgate:stream-reader:<name>)")?;

    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = async_nats::ConnectOptions::new()
        .add_root_certificates(identity.join("broker-trust.pem"))
        .add_client_certificate(identity.join("cert.pem"), identity.join("key.pem"))
        .require_tls(true)
        .custom_inbox_prefix(format!("_INBOX_{durable}"))
        .connect(&url)
        .await?;
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

/// The reader name in the certificate's SAN URI (`urn:fleetgate:stream-reader:<name>`).
fn reader_name(cert: &std::path::Path) -> Option<String> {
    use rustls::pki_types::pem::PemObject;
    use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
    let der = rustls::pki_types::CertificateDer::from_pem_file(cert).ok()?;
    let (_, x509) = X509Certificate::from_der(&der).ok()?;
    let san = x509.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|n| match n {
        GeneralName::URI(u) => u.strip_prefix("urn:fleetgate:stream-reader:").map(str::to_owned),
        _ => None,
    })
}
