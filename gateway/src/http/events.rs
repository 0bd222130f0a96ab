//! The merchant's webhook events (an extension of API.md): list them by
//! status (`GET /events`), and replay a dead one (`POST
//! /events/{event_id}/replay`). Same authentication and envelope as the
//! rest of the open API; another merchant's event answers like an absent
//! one (40001).

use std::collections::HashMap;

use axum::extract::{Query, State};
use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::{json, Value};
use tracing::info;
use vendgate_proto::codes::ErrorCode;

use super::api::{err, ok, Merchant, Segment};
use super::envelope::Envelope;
use super::openapi::{ApiRoutes, EventPageAnswer, ReplayAnswer};
use super::AppState;
use crate::storage::{OutboxEntry, OutboxStatus, ReplayOutcome};

/// Most events on one page.
const MAX_PAGE_SIZE: u64 = 100;
const DEFAULT_PAGE_SIZE: u64 = 20;

pub(super) fn routes(r: ApiRoutes) -> ApiRoutes {
    r.add(__path_list_events, list_events)
        .add(__path_replay_event, replay_event)
}

fn rfc3339(t: Option<DateTime<Utc>>) -> Value {
    t.map(|t| Value::String(t.to_rfc3339_opts(SecondsFormat::Millis, true)))
        .unwrap_or(Value::Null)
}

fn event_json(e: &OutboxEntry) -> Value {
    json!({
        "event_id": e.event_id,
        "type": e.kind,
        "status": e.status.as_str(),
        "attempts": e.attempts,
        "last_error": e.last_error.as_deref().map(crate::notifier::shown_error),
        "created_at": rfc3339(Some(e.created_at)),
        "next_attempt_at": rfc3339(e.next_attempt_at),
        "delivered_at": rfc3339(e.delivered_at),
        "order_id": e.order_id,
        "machine_no": e.machine_no.map(|m| m.as_str().to_string()),
    })
}

/// List the caller's webhook events.
///
/// Oldest first, filtered by delivery status, paged.
/// Codes: 0; 10001–10003; 20001; 50000.
#[utoipa::path(
    get,
    path = "/events",
    tag = "events",
    params(
        ("status" = Option<String>, Query, nullable = false, pattern = "^(pending|delivered|dead)?$", description = "`pending`, `delivered` or `dead` (absent or empty: all)."),
        ("page" = Option<u64>, Query, nullable = false, minimum = 1, description = "From 1 (default 1)."),
        ("page_size" = Option<u64>, Query, nullable = false, minimum = 1, maximum = 100, description = "1–100 (default 20)."),
    ),
    responses((status = 200, description = "One page of events, or an error envelope.", body = EventPageAnswer))
)]
async fn list_events(
    State(s): State<AppState>,
    Merchant(merchant): Merchant,
    Query(q): Query<HashMap<String, String>>,
) -> Envelope {
    let status = match q.get("status").map(String::as_str) {
        None | Some("") => None,
        Some(st) => match OutboxStatus::parse(st) {
            Some(st) => Some(st),
            None => return err(&s, ErrorCode::InvalidParams),
        },
    };
    let page = match q.get("page").map(|p| p.parse::<u64>()) {
        None => 1,
        Some(Ok(p)) if p >= 1 => p,
        _ => return err(&s, ErrorCode::InvalidParams),
    };
    let page_size = match q.get("page_size").map(|p| p.parse::<u64>()) {
        None => DEFAULT_PAGE_SIZE,
        Some(Ok(p)) if (1..=MAX_PAGE_SIZE).contains(&p) => p,
        _ => return err(&s, ErrorCode::InvalidParams),
    };
    let offset = (page - 1).saturating_mul(page_size);
    let (events, total) = match s
        .gw
        .store
        .list_outbox(&merchant, status, offset, page_size)
        .await
    {
        Ok(x) => x,
        Err(_) => return err(&s, ErrorCode::Internal),
    };
    let events: Vec<Value> = events.iter().map(event_json).collect();
    ok(
        &s,
        json!({ "events": events, "total": total, "page": page, "page_size": page_size }),
    )
}

/// Replay a dead webhook event.
///
/// It is pending again, ahead of its order's events still pending.
/// Codes: 0; 10001–10003; 40001 (unknown or another merchant's); 40002
/// (not dead); 50000.
#[utoipa::path(
    post,
    path = "/events/{event_id}/replay",
    tag = "events",
    params(("event_id" = String, Path, description = "The event's `event_id`.")),
    responses((status = 200, description = "The event is pending again, or an error envelope.", body = ReplayAnswer))
)]
async fn replay_event(
    State(s): State<AppState>,
    Merchant(merchant): Merchant,
    Segment(event_id): Segment,
) -> Envelope {
    match s
        .gw
        .store
        .replay_outbox(&merchant, &event_id, Utc::now())
        .await
    {
        Ok(ReplayOutcome::Replayed) => {
            info!(appid = %merchant, event_id = %event_id, "dead webhook event replayed");
            s.gw.notifier.wake();
            ok(&s, json!({ "event_id": event_id, "status": "pending" }))
        }
        // API.md's order codes, read for events: 40001 not found (or
        // another merchant's), 40002 the action does not fit its status.
        Ok(ReplayOutcome::NotFound) => err(&s, ErrorCode::OrderNotFound),
        Ok(ReplayOutcome::NotDead) => err(&s, ErrorCode::OrderStateConflict),
        Err(_) => err(&s, ErrorCode::Internal),
    }
}
