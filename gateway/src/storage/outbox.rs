//! The webhook half of the storage contract: the outbox of events for
//! merchants (written with the change that causes them), its delivery
//! bookkeeping (claims, attempts, dead letters, replays) and presence writes
//! that emit `machine.online` / `machine.offline` events; the operations
//! written once for every `Backend` (claims and machine events are each
//! backend's own).
//!
//! # Ordering
//!
//! Events with the same `order_key` (`order:{id}`, `machine:{machine_no}`)
//! are delivered in `seq` order: an event is deliverable only when no
//! earlier event of its key is still `pending`. A `dead` event does not
//! block the events after it: one unreachable moment must not hold back
//! every later notification of that order forever, and the merchant can
//! list and replay the dead one (it is then pending again and, being
//! earlier, blocks any of its key's events that are still pending).

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use vendgate_proto::machine::MachineNo;

use super::{PresenceWrite, StorageError};

/// Where an event is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OutboxStatus {
    /// Not delivered yet; retried until delivered or dead.
    Pending,
    /// A 2xx answer was received.
    Delivered,
    /// Retries ran out (or the event cannot be signed); kept for replay.
    Dead,
}

impl OutboxStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Delivered => "delivered",
            Self::Dead => "dead",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "pending" => Some(Self::Pending),
            "delivered" => Some(Self::Delivered),
            "dead" => Some(Self::Dead),
            _ => None,
        }
    }
}

/// What to claim: due events, head of their key, at most `per_merchant` in
/// flight per merchant counting `in_flight`, at most `limit` in all.
#[derive(Debug, Clone)]
pub struct ClaimRequest<'a> {
    pub now: DateTime<Utc>,
    /// Claimed events are not due again before this: if the claimer dies
    /// mid-delivery, the event is retried after the lease instead of never.
    pub lease_until: DateTime<Utc>,
    pub limit: usize,
    pub per_merchant: usize,
    /// Deliveries this claimer has in flight, by merchant appid.
    pub in_flight: &'a HashMap<String, usize>,
}

impl ClaimRequest<'_> {
    /// Candidates to read: each merchant contributes at most `per_merchant`
    /// rows, of which at most its in-flight count are skipped; reading that
    /// many more than `limit` still fills the batch when enough is due.
    pub(super) fn scan(&self) -> usize {
        let skipped_at_most: usize = self.in_flight.values().sum();
        self.limit.saturating_add(skipped_at_most)
    }

    /// Whether `merchant`, with `taken` events claimed so far in this call,
    /// has no room left under `per_merchant`.
    pub(super) fn at_cap(&self, merchant: &str, taken: usize) -> bool {
        let busy = self.in_flight.get(merchant).copied().unwrap_or(0);
        busy + taken >= self.per_merchant
    }
}

/// A claimed event with what delivering it needs from its merchant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimedEvent {
    pub event_id: String,
    pub merchant_appid: String,
    pub order_key: String,
    pub kind: String,
    /// The exact body to POST (and sign).
    pub body: String,
    /// Attempts made so far.
    pub attempts: u32,
    pub created_at: DateTime<Utc>,
    /// Start of the current retry budget (creation or last replay).
    pub pending_since: DateTime<Utc>,
    pub notify_url: Option<String>,
    /// The merchant's AppSecret, encrypted (see `secrets::WebhookKey`).
    pub appsecret_enc: Option<String>,
}

/// How an attempt ended, as decided by the notifier.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttemptResult {
    Delivered,
    /// Failed; try again at this time.
    RetryAt(DateTime<Utc>),
    /// Failed for the last time.
    Dead,
}

/// One delivery attempt to record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attempt {
    pub event_id: String,
    pub at: DateTime<Utc>,
    /// The merchant's HTTP status, when an answer came.
    pub http_status: Option<u16>,
    /// Why it failed; None when delivered.
    pub error: Option<String>,
    pub result: AttemptResult,
}

/// An event as the merchant's event list shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxEntry {
    pub event_id: String,
    pub kind: String,
    pub status: OutboxStatus,
    pub attempts: u32,
    pub last_error: Option<String>,
    pub created_at: DateTime<Utc>,
    /// Only for pending events.
    pub next_attempt_at: Option<DateTime<Utc>>,
    pub delivered_at: Option<DateTime<Utc>>,
    pub order_id: Option<u64>,
    pub machine_no: Option<MachineNo>,
}

/// What [`OutboxStorage::replay_outbox`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplayOutcome {
    /// Dead → pending, due now, attempts reset.
    Replayed,
    /// No such event for this merchant.
    NotFound,
    /// The event is pending or delivered.
    NotDead,
}

impl ReplayOutcome {
    /// What a replay that changed nothing answers, by whether the merchant
    /// has such an event: another merchant's event answers exactly like an
    /// absent one.
    pub(super) fn not_replayed(exists: bool) -> Self {
        if exists {
            ReplayOutcome::NotDead
        } else {
            ReplayOutcome::NotFound
        }
    }
}

/// The outbox's backlog, for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct OutboxBacklog {
    pub pending: u64,
    pub oldest_pending: Option<DateTime<Utc>>,
}

/// One webhook attempt of an order, for its timeline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookAttempt {
    pub event_id: String,
    pub kind: String,
    pub at: DateTime<Utc>,
    pub http_status: Option<u16>,
    pub error: Option<String>,
}

pub use crate::domain::webhook::MachineEvent;

/// A presence write and the event it emits if it flips the stored online
/// flag.
#[derive(Debug, Clone)]
pub struct PresenceChange {
    pub write: PresenceWrite,
    pub event: Option<MachineEvent>,
}

#[async_trait::async_trait]
pub trait OutboxStorage: Send + Sync + 'static {
    /// Atomically pick due deliverable events (see the module docs for the
    /// ordering rule) and push their next attempt to `lease_until`, so no
    /// other claimer (task or process) gets them meanwhile. Oldest due
    /// first, each merchant capped so that one merchant's backlog cannot
    /// fill a batch.
    async fn claim_outbox(&self, req: &ClaimRequest<'_>)
        -> Result<Vec<ClaimedEvent>, StorageError>;
    /// Record an attempt in `outbox_attempts` and apply its result to the
    /// event (attempts + 1, status, next attempt, last error) atomically.
    /// An event no longer pending is left as it is.
    async fn record_attempt(&self, a: &Attempt) -> Result<(), StorageError>;
    /// A merchant's events, oldest first, optionally of one status; and the
    /// total count of that selection.
    async fn list_outbox(
        &self,
        merchant: &str,
        status: Option<OutboxStatus>,
        offset: u64,
        limit: u64,
    ) -> Result<(Vec<OutboxEntry>, u64), StorageError>;
    /// Make a dead event of `merchant` pending again, due at `now`, with its
    /// attempts reset and a fresh retry budget.
    async fn replay_outbox(
        &self,
        merchant: &str,
        event_id: &str,
        now: DateTime<Utc>,
    ) -> Result<ReplayOutcome, StorageError>;
    /// Pending events and the creation time of the oldest.
    async fn outbox_backlog(&self) -> Result<OutboxBacklog, StorageError>;
    /// Every webhook attempt for the order's events, oldest first.
    async fn order_webhook_attempts(
        &self,
        order_id: u64,
    ) -> Result<Vec<WebhookAttempt>, StorageError>;
    /// [`super::Storage::record_presence_batch`] that also writes each
    /// change's event to the outbox, in the same transaction, when the write
    /// applies (epoch rule) and flips the stored online flag, and the
    /// machine's merchant has a notify_url. A take-over (online while
    /// online) or a stale write emits nothing.
    async fn record_presence_batch_with_events(
        &self,
        batch: &[PresenceChange],
    ) -> Result<(), StorageError>;
}
