//! `GET /api/v1/events`: admissions, refusals and session ends as server-sent events.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::State;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use futures_util::stream::{self, Stream, StreamExt};

use super::api::Op;
use super::Admin;

/// Server-sent events: the newest 20 events, then each one as it happens (`event:` is the
/// kind, `data:` the JSON of an event).
pub(crate) async fn events(
    _: Op,
    State(admin): State<Admin>,
) -> Sse<impl Stream<Item = Result<SseEvent, Infallible>>> {
    let shared = admin.shared.clone();
    let rx = shared.events.subscribe();
    let mut backlog = shared.events.recent(None, None, 20);
    backlog.reverse();
    let sse = |e: &crate::events::Event| {
        Ok(SseEvent::default().event(e.kind.label()).data(serde_json::to_string(e).unwrap_or_default()))
    };
    let first: Vec<_> = backlog.iter().map(sse).collect();
    let live = stream::unfold(rx, move |mut rx| async move {
        let next = match rx.recv().await {
            Ok(e) => sse(&e),
            // A subscriber that fell behind is told how many events it missed.
            Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                Ok(SseEvent::default().event("lagged").data(n.to_string()))
            }
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
        };
        Some((next, rx))
    });
    let stop = shared.shutdown.clone().cancelled_owned();
    Sse::new(stream::iter(first).chain(live).take_until(stop))
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
}
