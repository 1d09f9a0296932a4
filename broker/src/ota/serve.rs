//! A device session's chunk server: answers `devices/<id>/ota/get` on `devices/<id>/ota/chunk`,
//! to this session only (never routed, never stored), for the release of the device's open job
//! only, at most [`OUTSTANDING`] requests waiting at once and paced by a per-device byte bucket
//! (`ota_bytes_per_sec`): a request beyond the window is answered `busy` at once; one within it
//! is answered when the bucket allows, from a timer task that hands the chunk to the session's
//! inbox, so the session reads on meanwhile.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rumqttc::mqttbytes::QoS;
use tokio::time::Instant;

use super::wire::{chunk, Request, Status, Tag, CHUNK_HEADER};
use super::{Offered, Ota};
use crate::inbox::Inbox;
use crate::message::Message;

/// Most requests of one device waiting for their answer.
pub(crate) const OUTSTANDING: usize = 4;
/// How long a looked-up job is trusted before the registry is asked again (a job that ends or
/// a new offer is seen within this).
const RECHECK: Duration = Duration::from_secs(1);
/// A request naming another tag than the cached one asks the registry again at most this often.
const MISS_RECHECK: Duration = Duration::from_millis(200);

/// One session's chunk server.
#[derive(Debug)]
pub(crate) struct ChunkServer {
    /// The device's open job's release and its image (`None`: not servable now).
    job: Option<(Tag, Option<Bytes>)>,
    /// When the registry was last read (or failed to be).
    checked: Option<Instant>,
    /// The last read of the registry failed: answered busy until the next, like a miss.
    unreadable: bool,
    waiting: Arc<AtomicUsize>,
    bucket: Bucket,
}

/// Bytes per second to one device, holding one second's worth; may go into debt, paid by
/// waiting (as `session::rate`'s publish buckets).
#[derive(Debug)]
struct Bucket {
    rate: f64,
    tokens: f64,
    at: Instant,
}

impl Bucket {
    /// Takes `n` bytes at `now`; returns how long until the bucket is out of debt.
    fn take(&mut self, n: usize, now: Instant) -> Duration {
        if self.rate <= 0.0 {
            return Duration::ZERO;
        }
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.at = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.rate) - n as f64;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.rate)
        }
    }
}

impl ChunkServer {
    pub(crate) fn new(bytes_per_sec: u64) -> Self {
        Self {
            job: None,
            checked: None,
            unreadable: false,
            waiting: Arc::new(AtomicUsize::new(0)),
            bucket: Bucket { rate: bytes_per_sec as f64, tokens: bytes_per_sec as f64, at: Instant::now() },
        }
    }

    /// Answers one request of `device`: `Some` to send now; `None` when the answer will reach
    /// `inbox` later (paced) or the request is not one (malformed: counted, not answered).
    pub(crate) async fn answer(
        &mut self,
        ota: &Ota,
        device: &str,
        payload: &[u8],
        inbox: &Arc<Inbox>,
        max_packet: usize,
    ) -> Option<Message> {
        let metrics = ota.metrics();
        let Some(req) = Request::decode(payload) else {
            metrics.ota_refused.with_label_values(&["malformed"]).inc();
            return None;
        };
        let topic = format!(
            "{}/{device}/{}/{}",
            fleet_topic::level::DEVICES,
            fleet_topic::level::OTA,
            fleet_topic::level::CHUNK
        );
        let now = Instant::now();
        // An image that could not be served, or a registry that could not be read, is looked
        // for again as often as a miss (not at every request: a device flooding requests
        // while the registry is in trouble made a registry read each).
        let trust =
            if self.unreadable || matches!(self.job, Some((_, None))) { MISS_RECHECK } else { RECHECK };
        let stale = self.checked.is_none_or(|t| now.duration_since(t) >= trust);
        let missed = self.job.as_ref().is_none_or(|(tag, _)| *tag != req.tag)
            && self.checked.is_none_or(|t| now.duration_since(t) >= MISS_RECHECK);
        let refuse = |status: Status| {
            metrics.ota_refused.with_label_values(&[status.label()]).inc();
            Some(Message::new(topic.clone(), QoS::AtMostOnce, chunk(&req.tag, req.offset, status, &[])))
        };
        if stale || missed {
            let offered = ota.offered(device).await;
            // From when the answer came: a read that took long is not read again at once.
            self.checked = Some(Instant::now());
            self.unreadable = matches!(offered, Offered::Retry);
            self.job = match offered {
                Offered::Job { tag, image } => Some((tag, Some(image))),
                Offered::Unavailable { tag } => Some((tag, None)),
                Offered::Nothing | Offered::Retry => None,
            };
        }
        if self.unreadable {
            return refuse(Status::Busy);
        }
        let Some((_, image)) = self.job.as_ref().filter(|(tag, _)| *tag == req.tag) else {
            return refuse(Status::NotOffered);
        };
        // Its job's image, not servable now (a cluster node before the image was shared):
        // the device asks again after its pause.
        let Some(image) = image else { return refuse(Status::Busy) };
        let offset = req.offset as usize;
        if offset >= image.len() {
            return refuse(Status::BeyondImage);
        }
        if self.waiting.load(Ordering::Acquire) >= OUTSTANDING {
            return refuse(Status::Busy);
        }
        // The chunk with its topic and header fits the packet size the broker sends.
        let room = max_packet.saturating_sub(CHUNK_HEADER + topic.len() + 8).max(1);
        let n = usize::from(req.len).min(ota.limits().max_chunk).min(room).min(image.len() - offset);
        let data = image.slice(offset..offset + n);
        metrics.ota_chunks.inc();
        metrics.ota_chunk_bytes.inc_by(n as u64);
        let body = chunk(&req.tag, req.offset, Status::Data, &data);
        let wait = self.bucket.take(n, now);
        let m = Message::new(topic, QoS::AtMostOnce, body);
        if wait.is_zero() && self.waiting.load(Ordering::Acquire) == 0 {
            return Some(m);
        }
        self.waiting.fetch_add(1, Ordering::AcqRel);
        let (waiting, inbox) = (self.waiting.clone(), inbox.clone());
        tokio::spawn(async move {
            tokio::time::sleep(wait).await;
            // A full inbox drops it: the device asks again after its timeout.
            inbox.push(Box::new(m));
            waiting.fetch_sub(1, Ordering::AcqRel);
        });
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_byte_bucket_holds_a_device_to_its_rate() {
        let t0 = Instant::now();
        let mut b = Bucket { rate: 1000.0, tokens: 1000.0, at: t0 };
        assert!(b.take(1000, t0).is_zero());
        assert_eq!(b.take(500, t0), Duration::from_millis(500));
        assert_eq!(b.take(500, t0), Duration::from_secs(1));
        assert!(b.take(0, t0 + Duration::from_secs(2)).is_zero());
        let mut off = Bucket { rate: 0.0, tokens: 0.0, at: t0 };
        assert!(off.take(1 << 20, t0).is_zero());
    }
}
