//! The order half of the storage contract: orders with their lines, the
//! order timeline, and machines' inventory snapshots, and their operations
//! written once for every `Backend`. Every status change is a
//! compare-and-set on the stored status, which is what makes duplicate and
//! racing device messages (and concurrent nodes) apply at most once.

use chrono::{DateTime, Utc};
use vendgate_proto::machine::MachineNo;
use vendgate_proto::msg::InventoryItem;

use super::StorageError;
use crate::domain::order::{Line, Status};

/// An order to insert (with its lines) in one transaction.
#[derive(Debug, Clone)]
pub struct NewOrder {
    pub order_id: u64,
    pub merchant_appid: String,
    pub machine_no: MachineNo,
    pub out_trade_no: Option<String>,
    /// Hash of the request body, to tell an idempotent repeat from a reuse.
    pub request_fingerprint: Option<String>,
    pub pay_later: bool,
    pub status: Status,
    pub lines: Vec<Line>,
    pub amount: i64,
    pub created_at: DateTime<Utc>,
    pub pay_deadline: Option<DateTime<Utc>>,
    /// The acceptance can be recorded only before this instant (an order
    /// inserted `dispatching`: its insert time + `accept_timeout`).
    pub accept_by: Option<DateTime<Utc>>,
}

/// A stored order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredOrder {
    pub order_id: u64,
    pub merchant_appid: String,
    pub machine_no: MachineNo,
    pub out_trade_no: Option<String>,
    pub request_fingerprint: Option<String>,
    pub pay_later: bool,
    pub status: Status,
    pub lines: Vec<Line>,
    pub amount: i64,
    pub refund_amount: i64,
    pub error: Option<String>,
    pub result_applied: bool,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub dispense_deadline: Option<DateTime<Utc>>,
    pub pay_deadline: Option<DateTime<Utc>>,
    /// When the merchant recorded the refund (None: pending or nothing to refund).
    pub refunded_at: Option<DateTime<Utc>>,
    /// What the merchant recorded as refunded (`refund_amount` at that time).
    pub refunded_amount: i64,
    /// The machine's acceptance counts only if recorded before this.
    pub accept_by: Option<DateTime<Utc>>,
    /// Timeline events not stored because the order had its
    /// [`MAX_EXTRA_EVENTS`] already.
    pub events_dropped: i64,
}

/// The new values of a status change (lines carry the dispensed counts).
#[derive(Debug, Clone)]
pub struct OrderChange {
    pub status: Status,
    pub lines: Vec<Line>,
    pub error: Option<String>,
    pub result_applied: bool,
    pub refund_amount: i64,
    pub dispense_deadline: Option<DateTime<Utc>>,
    /// Stored as the order's `cancel_pending` flag: the change gives up on
    /// an order whose dispense command may have reached the machine, so a
    /// cancel is owed until one is handed to the machine's connection
    /// ([`super::ClusterStorage::pending_cancels`]).
    pub cancel_pending: bool,
    /// The order's `accept_by` after the change (set when a payment moves
    /// it to `dispatching`; otherwise the stored value, unchanged).
    pub accept_by: Option<DateTime<Utc>>,
    /// The acceptance compare-and-set: apply only if the stored
    /// `accept_by` is later than this instant (None: no such condition).
    pub only_before_accept_by: Option<DateTime<Utc>>,
    pub at: DateTime<Utc>,
}

/// A webhook event to write to the outbox in the same transaction as the
/// change that causes it (see `notifier`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewOutboxEvent {
    pub event_id: String,
    pub merchant_appid: String,
    /// Events with the same key are delivered in the order they were written
    /// (`order:{id}` or `machine:{machine_no}`).
    pub order_key: String,
    pub order_id: Option<u64>,
    pub machine_no: Option<MachineNo>,
    /// `order.completed`, `machine.offline`, …
    pub kind: String,
    /// The exact JSON body delivered.
    pub body: String,
    pub created_at: DateTime<Utc>,
}

/// A merchant's search of its orders (`GET /orders`): every filter given
/// must match; newest first (`created_at`, then `order_id`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OrderQuery {
    pub merchant_appid: String,
    /// Created at or after this instant.
    pub from: Option<DateTime<Utc>>,
    /// Created before this instant (half-open: consecutive ranges never
    /// list an order twice).
    pub to: Option<DateTime<Utc>>,
    pub status: Option<Status>,
    pub machine_no: Option<MachineNo>,
    pub out_trade_no: Option<String>,
    /// Rows skipped (the pages before this one).
    pub offset: u64,
    /// Most rows returned.
    pub limit: u64,
}

impl OrderQuery {
    /// `LIMIT`/`OFFSET` as the signed integers both backends bind.
    pub(super) fn limit_offset(&self) -> (i64, i64) {
        (
            i64::try_from(self.limit).unwrap_or(i64::MAX),
            i64::try_from(self.offset).unwrap_or(i64::MAX),
        )
    }
}

/// Most rows one order's timeline holds beside its status changes (which
/// the state machine bounds on its own).
pub const MAX_EXTRA_EVENTS: i64 = 64;

/// One entry of an order's timeline.
#[derive(Debug, Clone, PartialEq)]
pub struct OrderEvent {
    pub at: DateTime<Utc>,
    pub kind: String,
    pub detail: serde_json::Value,
}

#[async_trait::async_trait]
pub trait OrderStorage: Send + Sync + 'static {
    /// Insert the order, its lines and its first timeline event atomically.
    /// Err(Duplicate("order")) when the id is taken, Err(Duplicate("out_trade_no"))
    /// when the merchant already used that out_trade_no.
    async fn insert_order(&self, o: &NewOrder, ev: &OrderEvent) -> Result<(), StorageError>;
    async fn order(&self, order_id: u64) -> Result<Option<StoredOrder>, StorageError>;
    async fn order_by_out_trade_no(
        &self,
        merchant: &str,
        out_trade_no: &str,
    ) -> Result<Option<StoredOrder>, StorageError>;
    /// Apply `change`, append `ev` and write the `outbox` events atomically if
    /// the stored status is still `from` and, with
    /// [`OrderChange::only_before_accept_by`], its `accept_by` is later;
    /// Ok(false) (nothing written) otherwise.
    async fn update_order(
        &self,
        order_id: u64,
        from: Status,
        change: &OrderChange,
        ev: &OrderEvent,
        outbox: &[NewOutboxEvent],
    ) -> Result<bool, StorageError>;
    /// Record that the merchant refunded `refund_amount` (stored as
    /// `refunded_amount`), with a timeline event; Ok(false) if already
    /// recorded or there is nothing to refund.
    async fn mark_refunded(
        &self,
        order_id: u64,
        at: DateTime<Utc>,
        ev: &OrderEvent,
    ) -> Result<bool, StorageError>;
    /// One page of a merchant's orders matching `q`, newest first, and how
    /// many match in all.
    async fn list_orders(&self, q: &OrderQuery) -> Result<(Vec<StoredOrder>, u64), StorageError>;
    /// Open `awaiting_payment` orders of a merchant and of a machine.
    async fn count_unpaid(&self, merchant: &str, m: &MachineNo)
        -> Result<(u64, u64), StorageError>;
    /// An event beside the status changes (a command sent, a refund
    /// recorded). At most [`MAX_EXTRA_EVENTS`] such rows per order, so a
    /// machine repeating itself cannot grow an order's history: past that
    /// the order's `events_dropped` counts them instead.
    async fn append_order_event(&self, order_id: u64, ev: &OrderEvent) -> Result<(), StorageError>;
    /// The timeline, oldest first.
    async fn order_events(&self, order_id: u64) -> Result<Vec<OrderEvent>, StorageError>;
    async fn orders_in_status(&self, statuses: &[Status])
        -> Result<Vec<StoredOrder>, StorageError>;
    /// Replace the machine's inventory snapshot.
    async fn put_inventory(
        &self,
        m: &MachineNo,
        items: &[InventoryItem],
        at: DateTime<Utc>,
    ) -> Result<(), StorageError> {
        self.put_inventories(&[(*m, items.to_vec())], at).await
    }
    /// Replace several machines' snapshots in one transaction (a reconnect
    /// storm brings one snapshot per machine at once).
    async fn put_inventories(
        &self,
        batch: &[(MachineNo, Vec<InventoryItem>)],
        at: DateTime<Utc>,
    ) -> Result<(), StorageError>;
    /// Every machine's latest snapshot.
    async fn inventories(&self) -> Result<Vec<(MachineNo, Vec<InventoryItem>)>, StorageError>;
}
