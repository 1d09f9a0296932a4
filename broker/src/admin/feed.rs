//! `GET /api/v1/events`: admissions, refusals and session ends as server-sent events. A stream
//! lives as long as its client keeps it, so they are capped: `admin_max_event_streams` in all,
//! `admin_max_event_streams_per_operator` per operator (more: 429).

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::State;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use futures_util::stream::{self, Stream, StreamExt};

use super::error::{ApiCode, ApiError};
use super::extract::Op;
use super::state::Admin;
use crate::caps::TallySlot;
use crate::observe::events::Event;
use crate::observe::metrics::AdminDenial;

/// Server-sent events: the newest 20 events, then each one as it happens (`event:` is the
/// kind, `data:` the JSON of an event).
pub(crate) async fn events(
    Op(op, _): Op,
    State(admin): State<Admin>,
) -> Result<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>, ApiError> {
    let config = &admin.config;
    let held: Option<(TallySlot<()>, TallySlot<String>)> = admin
        .streams
        .per_operator
        .enter(op.id.to_string(), config.admin_max_event_streams_per_operator)
        .and_then(|mine| Some((admin.streams.all.enter((), config.admin_max_event_streams)?, mine)));
    let Some(held) = held else {
        admin.observe.metrics().admin_denied(AdminDenial::EventStreams);
        return Err(ApiError::new(
            ApiCode::TooManyStreams,
            "too many live event streams (in all or of this operator)",
        ));
    };
    let events = admin.observe.events();
    let rx = events.subscribe();
    let mut backlog = events.recent(None, None, 20);
    backlog.reverse();
    let sse = |e: &Event| {
        Ok(SseEvent::default().event(e.kind.label()).data(serde_json::to_string(e).unwrap_or_default()))
    };
    let first: Vec<_> = backlog.iter().map(sse).collect();
    // The stream holds its places under the caps until it ends.
    let live = stream::unfold((rx, held), move |(mut rx, held)| async move {
        let next = match rx.recv().await {
            Ok(e) => sse(&e),
            // A subscriber that fell behind is told how many events it missed.
            Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                Ok(SseEvent::default().event("lagged").data(n.to_string()))
            }
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
        };
        Some((next, (rx, held)))
    });
    let stop = admin.shutdown.clone().cancelled_owned();
    Ok(Sse::new(stream::iter(first).chain(live).take_until(stop))
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}
