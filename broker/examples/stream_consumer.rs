//! A backend reading a fleetgate cluster's device messages straight from JetStream, instead of
//! subscribing over MQTT or reading the SQL table (`docs/spec/cluster-stream.md`).
//!
//! ```sh
//! fleet-provision node-cert --stream-reader --name analytics --out analytics-nats
//! # the nodes run with nats_readers = "analytics=devices/+/telemetry": they create its consumer
//! cargo run -p fleet-broker --example stream_consumer -- nats://127.0.0.1:4222 analytics-nats
//! ```
//!
//! Arguments: NATS URL, the reader's identity directory (`fleet-provision node-cert
//! --stream-reader`: `cert.pem`, `key.pem`, `broker-trust.pem`), and how many messages to print
//! before exiting (default: run forever). The reader's name (the directory's certificate,
//! `urn:fleetgate:stream-reader:<name>`) is its durable consumer's name: the only consumer the
//! shipped NATS configuration lets it use, which the nodes create (`nats_readers`, with the
//! topic filter); it cannot create or change one (`deploy/nats/nats-server.conf`).
//! The consumer is durable: run it again and it continues where it stopped; every message is
//! acknowledged after it was handled (here: printed), so a crash re-delivers, never skips.
//! Each line: stream sequence, device, QoS, broker receive time (unix ms), topic, payload.

use futures_util::StreamExt;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let mut args = std::env::args().skip(1);
    let usage = "usage: stream_consumer NATS_URL IDENTITY_DIR [COUNT]";
    let url = args.next().ok_or(usage)?;
    let identity = std::path::PathBuf::from(args.next().ok_or(usage)?);
    let count: Option<usize> = args.next().map(|c| c.parse()).transpose()?;
    let durable = reader_name(&identity.join("cert.pem"))
        .ok_or("the identity's certificate names no stream reader (urn:fleetgate:stream-reader:<name>)")?;

    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = async_nats::ConnectOptions::new()
        .add_root_certificates(identity.join("broker-trust.pem"))
        .add_client_certificate(identity.join("cert.pem"), identity.join("key.pem"))
        .require_tls(true)
        .connect(&url)
        .await?;
    // Pull requests on the consumer's own subject (the one JetStream API subject a reader may
    // use, with acknowledgements): up to 64 messages a request, each request waiting up to 5 s.
    let next = format!("$JS.API.CONSUMER.MSG.NEXT.FLEET.{durable}");
    let inbox = client.new_inbox();
    let mut replies = client.subscribe(inbox.clone()).await?;
    let mut seen = 0;
    while count.is_none_or(|c| seen < c) {
        let request = r#"{"batch":64,"expires":5000000000}"#;
        client.publish_with_reply(next.clone(), inbox.clone(), request.into()).await?;
        loop {
            let Some(m) = replies.next().await else { return Ok(()) };
            // A status instead of a message: the request is done (no more messages, expired).
            let Some(ack) = m.reply.clone().filter(|_| m.status.is_none()) else { break };
            let header = |name: &str| {
                m.headers
                    .as_ref()
                    .and_then(|h| h.get(name))
                    .map(|v| v.as_str().to_owned())
                    .unwrap_or_default()
            };
            // `$JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.…`
            let seq = ack.as_str().split('.').nth(5).unwrap_or("?").to_owned();
            println!(
                "{seq} {} qos={} at={} {} {}",
                header(fleet_broker::stream::DEVICE),
                header(fleet_broker::stream::QOS),
                header(fleet_broker::stream::RECEIVED_AT),
                fleet_broker::stream::topic_of(m.subject.as_str()).unwrap_or_default(),
                String::from_utf8_lossy(&m.payload)
            );
            // Acknowledged once handled (here: printed): a crash re-delivers, never skips.
            client.publish(ack, "+ACK".into()).await?;
            seen += 1;
            if count.is_some_and(|c| seen >= c) {
                break;
            }
        }
    }
    client.flush().await?;
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
