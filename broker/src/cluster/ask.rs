//! Questions to every node and their answers (NATS request, many replies): the admin API's
//! cluster-wide views (`crate::admin::views`).

use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use tokio::task::JoinHandle;
use tracing::warn;

use super::{bus, Cluster};
use crate::outcome::BusRefusal;

/// Most answers taken for one question (more nodes than this is not a fleetgate cluster).
const MOST_ANSWERS: usize = 256;
/// Largest question answered, bytes.
const MAX_QUESTION: usize = 64 * 1024;

impl Cluster {
    /// Asks every other node on `subject` and returns the answers that arrive within `wait`
    /// (this node does not hear itself: the connection is `no_echo`).
    pub(crate) async fn scatter(
        &self,
        subject: &'static str,
        question: Vec<u8>,
        wait: Duration,
    ) -> Vec<Bytes> {
        let inbox = self.client.new_inbox();
        let mut sub = match self.client.subscribe(inbox.clone()).await {
            Ok(s) => s,
            Err(e) => {
                warn!(error = %e, "cluster question: no reply subscription");
                return Vec::new();
            }
        };
        if let Err(e) = self
            .client
            .publish_with_reply_and_headers(subject, inbox, self.node_headers(), question.into())
            .await
        {
            warn!(error = %e, "cluster question not sent");
            return Vec::new();
        }
        let _ = self.client.flush().await;
        let mut answers = Vec::new();
        let deadline = tokio::time::Instant::now() + wait;
        while answers.len() < MOST_ANSWERS {
            match tokio::time::timeout_at(deadline, sub.next()).await {
                Ok(Some(m)) if bus::from_node(m.headers.as_ref()) => answers.push(m.payload),
                Ok(Some(_)) => self.metrics.bus_refused(BusRefusal::NotFromNode),
                Ok(None) | Err(_) => break,
            }
        }
        answers
    }

    /// Answers questions on `subject` with `reply` (`None`: no answer) until aborted.
    pub(crate) async fn answer(
        &self,
        subject: &'static str,
        reply: impl Fn(Bytes) -> Option<Vec<u8>> + Send + 'static,
    ) -> Result<JoinHandle<()>, async_nats::SubscribeError> {
        let mut sub = self.client.subscribe(subject).await?;
        let client = self.client.clone();
        let (headers, metrics) = (self.node_headers(), self.metrics.clone());
        Ok(tokio::spawn(async move {
            while let Some(m) = sub.next().await {
                if !bus::from_node(m.headers.as_ref()) {
                    metrics.bus_refused(BusRefusal::NotFromNode);
                    continue;
                }
                let Some(to) = m.reply else { continue };
                if m.payload.len() > MAX_QUESTION {
                    continue;
                }
                if let Some(body) = reply(m.payload) {
                    if let Err(e) = client.publish_with_headers(to, headers.clone(), body.into()).await {
                        warn!(error = %e, "cluster answer not sent");
                    }
                }
            }
        }))
    }
}
