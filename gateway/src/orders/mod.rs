//! Orders: the product's main job. A merchant's order is validated, checked
//! against ownership, presence and stock, queued per machine (one order in
//! flight per machine, from its command until its result), **persisted**,
//! then sent as `cmd/dispense`. The machine's `ack` is recorded with a
//! compare-and-set that succeeds only before the order's `accept_by`; only
//! then does `cmd/go` leave and the merchant hear 0 (PROTOCOL.md, gateway
//! rule 4). The machine's `result` settles the order.
//!
//! - [`crate::domain::order`]: the pure state machine every change goes through.
//! - [`error`]: [`OrderError`] and its API codes.
//! - [`place`]: admitting a request (out_trade_no lock and repeats, owner
//!   check), reserving, storing a new order; paying. [`owners`]: the
//!   machine owner cache.
//! - [`dispatch`]: the per-machine queue and the worker; [`ticket`]: where
//!   the decision between an acceptance and a give-up is made, once.
//! - [`uplinks`]: acks (the decision), results, inventory snapshots.
//! - [`transition`]: the stored compare-and-set every change goes through,
//!   with its webhooks.
//! - [`deadlines`]: dispense deadlines, the sweeps, recovery at start-up.
//! - [`cancels`]: cancels and `go`s owed to machines.
//! - [`unanswered`]: cluster mode, forwarded orders whose owner never
//!   answered.
//! - [`inventory`]: reported stock and reservations; [`stock`]: releasing
//!   and rebuilding reservations, persisting snapshots. [`ids`]: order ids.
//!
//! Where a request runs (here, or on the node holding the machine) is
//! decided by `crate::front`; this module knows of other nodes only what
//! [`OtherNodes`] says.
//!
//! # Waits and their bounds
//! Every wait of a request has a deadline derived from `request_timeout`
//! (API.md "Deadlines"): the request's `answer_by` is its start +
//! `request_timeout` − [`ANSWER_MARGIN`].
//! - Waiting behind another order in the machine's queue: until `send_by` =
//!   `answer_by` − `accept_timeout`; past it the order is answered 30003 and
//!   never sent (`dispatch::place_local`).
//! - Waiting for the acceptance: until the order's `accept_by` = its insert
//!   time + `accept_timeout` (`dispatch`, `await_decision`).
//! - An ack being recorded when `accept_by` passes: until `answer_by`, then
//!   the ticket is abandoned and the recorded acceptance, if any, gets no
//!   `go` (`ticket::Ticket::abandon`).
//! - A repeat of an order in flight: until that order's `accept_by` + the
//!   owner-answer slack, bounded by the repeat's own `answer_by`
//!   (`place::repeat`).
//! - The same out_trade_no's lock: until `answer_by` (30003 past it); held
//!   while the request is placed here or forwarded.
//! - A forwarded order or payment: the owner answers by the requester's
//!   `answer_by` − `owner_answer_slack`; the requester waits until its
//!   `answer_by`, then settles from storage ([`unanswered`]), retrying the
//!   give-up until `answer_by` (or `owner_answer_slack` after its caller
//!   went away).
//! - The worker on an accepted order: until its result or
//!   `dispense_timeout` (then `unknown`).
//! - Storage calls: the backend's own bounds (SQLite busy timeout, the
//!   PostgreSQL pool's acquire timeout).
//!
//! Ordering rules: an order row is committed before its command leaves;
//! every later change is a compare-and-set on the stored status, so a
//! duplicate or racing ack/result/deadline applies at most once.

pub mod cancels;
pub mod deadlines;
pub mod dispatch;
pub mod error;
mod go;
pub mod ids;
pub mod inventory;
mod open;
pub mod owners;
pub mod place;
pub mod stock;
pub mod ticket;
pub mod transition;
pub mod unanswered;
pub mod uplinks;

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Weak};
use std::time::Duration;

use chrono::Utc;
use dashmap::DashMap;
use serde_json::json;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use vendgate_proto::machine::MachineNo;

use crate::config::OrderSettings;
use crate::domain::order::{Line, Order};
use crate::fleet::presence::PresenceRegistry;
use crate::link::commands::CommandBus;
use crate::storage::{OrderEvent, Storage, StoredOrder};
use dispatch::Job;
use ids::OrderIds;
use inventory::Inventory;
use owners::Owner;
use place::IdempotencyLocks;
use ticket::Ticket;

pub use error::OrderError;
pub use owners::OWNER_CACHE_TTL;
pub use place::{answer_by, Admission, PlaceRequest, Placing, Unpaid};
pub use uplinks::{intake, IntakeQueue, OrderIntake};

pub use crate::config::ANSWER_MARGIN;

/// Cluster mode: what the order service knows of the other nodes sharing
/// its database. Absent on a single node.
pub struct OtherNodes {
    /// Where stock figures of machines held by other nodes live.
    pub stock: Arc<dyn StockElsewhere>,
    /// How much longer than `accept_timeout` a requester waits for the
    /// owning node's answer: a repeat of a forwarded order waits as long.
    pub answer_slack: Duration,
}

/// The node holding a machine's connection keeps its stock figures.
pub trait StockElsewhere: Send + Sync + 'static {
    /// A sweep on this node released an order's reservation of machine `m`,
    /// held elsewhere: its node must release it too.
    fn released(&self, m: &MachineNo, lines: &[Line]);
}

/// Counters (exported by the metrics module).
#[derive(Debug, Default)]
pub struct OrderStats {
    pub placed: AtomicU64,
    pub accepted: AtomicU64,
    pub refused: AtomicU64,
    pub not_accepted: AtomicU64,
    pub busy: AtomicU64,
    pub unknown: AtomicU64,
    pub results_applied: AtomicU64,
    pub duplicate_device_messages: AtomicU64,
    pub rejected_device_messages: AtomicU64,
    pub malformed_device_messages: AtomicU64,
    /// `cmd/go` handed to the machine's connection.
    pub go_sent: AtomicU64,
    /// Acceptances recorded (or possibly recorded) without a `go` following.
    pub go_withheld: AtomicU64,
    /// Orders given up because the merchant's connection went away.
    pub caller_gone: AtomicU64,
    /// Results reporting goods out for an order that had been given up.
    pub dispensed_after_rejection: AtomicU64,
    /// Acks and results dropped because the uplink work queue was full.
    pub uplinks_overloaded: AtomicU64,
}

/// The order service. Build with [`OrderService::new`], then [`OrderService::recover`].
/// Its methods live in the submodule of their concern.
pub struct OrderService {
    store: Arc<dyn Storage>,
    presence: Arc<PresenceRegistry>,
    commands: Arc<dyn CommandBus>,
    pub inventory: Arc<Inventory>,
    settings: OrderSettings,
    queues: DashMap<MachineNo, mpsc::Sender<Job>>,
    /// The ticket of each order this node sent and has not settled, by
    /// order id: where an ack's decision meets the worker waiting for it.
    /// At most one per machine (plus the ones being wound up), so bounded
    /// by the machines connected here.
    inflight: DashMap<u64, Arc<Ticket>>,
    /// The orders in flight as this node last wrote them (acks and results
    /// need no read).
    open: open::OpenOrders,
    /// The in-flight order's "result applied" waiter, by order id.
    settled: DashMap<u64, tokio::sync::oneshot::Sender<()>>,
    /// Inventory snapshots not yet persisted: the latest per machine (a
    /// newer one replaces it), so bounded by the machines connected here.
    inventory_writes: Arc<stock::PendingSnapshots>,
    inventory_writer: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
    ids: OrderIds,
    idempotency_locks: IdempotencyLocks,
    /// Machine → owning merchant and whether it may take orders, filled on
    /// use and trusted for [`OWNER_CACHE_TTL`]. The CLI transfers, disables
    /// and removes machines from another process, so an entry cannot be
    /// invalidated from here: the TTL bounds how long the previous owner (or
    /// a disabled machine) is still answered for. Unknown machines are not
    /// cached, so one the CLI adds later is found at once.
    owners: DashMap<MachineNo, Owner>,
    /// Cluster mode: the other nodes (see [`OtherNodes`]).
    other_nodes: Option<OtherNodes>,
    /// Shared with the uplink intake, which counts into it too.
    pub stats: Arc<OrderStats>,
    /// Where committed status changes are reported for metrics and the
    /// dashboard.
    observer: Arc<crate::metrics::OrderObserver>,
    /// Woken after a change wrote a webhook event, so delivery starts at once.
    notifier: Arc<crate::notifier::Notifier>,
    shutdown: CancellationToken,
    me: Weak<OrderService>,
}

fn event(kind: &str, detail: serde_json::Value) -> OrderEvent {
    OrderEvent {
        at: Utc::now(),
        kind: kind.to_string(),
        detail,
    }
}

/// What the order service is connected to, each given once by the
/// builder (`app`).
pub struct Connections {
    /// How commands reach machines (this node's hub, or the cluster).
    pub commands: Arc<dyn CommandBus>,
    /// The receiving end of the uplink intake ([`uplinks::intake`]).
    pub intake: IntakeQueue,
    /// Cluster mode: the other nodes.
    pub other_nodes: Option<OtherNodes>,
    /// Where committed status changes are reported.
    pub observer: Arc<crate::metrics::OrderObserver>,
}

impl OrderService {
    pub fn new(
        store: Arc<dyn Storage>,
        presence: Arc<PresenceRegistry>,
        settings: OrderSettings,
        notifier: Arc<crate::notifier::Notifier>,
        links: Connections,
        shutdown: CancellationToken,
    ) -> Arc<Self> {
        let Connections {
            commands,
            intake,
            other_nodes,
            observer,
        } = links;
        let IntakeQueue {
            inventory,
            writes: inventory_writes,
            stats,
            work,
        } = intake;
        let svc = Arc::new_cyclic(|me| Self {
            store,
            presence,
            commands,
            inventory,
            settings,
            queues: DashMap::new(),
            inflight: DashMap::new(),
            open: open::OpenOrders::default(),
            settled: DashMap::new(),
            inventory_writes,
            inventory_writer: std::sync::Mutex::new(None),
            ids: OrderIds::default(),
            idempotency_locks: DashMap::new(),
            owners: DashMap::new(),
            other_nodes,
            stats,
            observer,
            notifier,
            shutdown,
            me: me.clone(),
        });
        let writer = tokio::spawn(stock::inventory_writer(
            svc.store.clone(),
            svc.inventory_writes.clone(),
            svc.shutdown.clone(),
        ));
        if let Ok(mut w) = svc.inventory_writer.lock() {
            *w = Some(writer);
        }
        svc.spawn_uplink_workers(work);
        svc
    }

    /// Orders waiting behind the one in flight on machine `m`.
    pub fn queued(&self, m: &MachineNo) -> usize {
        self.queues
            .get(m)
            .map(|q| q.max_capacity() - q.capacity())
            .unwrap_or(0)
    }

    /// Order `order_id` if it is `merchant`'s; another merchant's order
    /// is answered exactly like an absent one (40001).
    async fn merchants_order(
        &self,
        merchant: &str,
        order_id: u64,
    ) -> Result<StoredOrder, OrderError> {
        match self.store.order(order_id).await? {
            Some(o) if o.merchant_appid == merchant => Ok(o),
            _ => Err(OrderError::OrderNotFound),
        }
    }

    /// A merchant's view of one order: None when absent or another merchant's.
    pub async fn get(
        &self,
        merchant: &str,
        order_id: u64,
    ) -> Result<Option<(StoredOrder, Vec<OrderEvent>)>, OrderError> {
        let Some(o) = self.store.order(order_id).await? else {
            return Ok(None);
        };
        if o.merchant_appid != merchant {
            return Ok(None);
        }
        let events = self.store.order_events(order_id).await?;
        Ok(Some((o, events)))
    }

    /// Whether machine `m` is connected to this node.
    pub fn connected_here(&self, m: &MachineNo) -> bool {
        self.presence.is_online(m)
    }

    /// `POST /orders/{id}/cancel`: cancel an unpaid `pay_later` order and
    /// give its stock back at once. Exactly one of a cancel, a payment and
    /// the expiry wins (compare-and-set on `awaiting_payment`); the losers
    /// see a state conflict, and only the winner releases the stock. A
    /// second cancel is a conflict too: the order is no longer unpaid.
    pub async fn cancel(&self, merchant: &str, order_id: u64) -> Result<StoredOrder, OrderError> {
        let Unpaid(o) = self.unpaid(merchant, order_id).await?;
        match self
            .transition(
                &o,
                &crate::domain::order::Event::Cancel,
                json!({ "by": "merchant" }),
            )
            .await?
        {
            Some(_) => {
                self.release(o.machine_no, &o.lines);
                self.load(order_id).await
            }
            None => Err(OrderError::StateConflict),
        }
    }

    /// `POST /orders/{id}/refund`: the merchant records that it refunded
    /// `refund_amount`. Idempotent; 40002 when there is nothing to refund.
    pub async fn refund(&self, merchant: &str, order_id: u64) -> Result<StoredOrder, OrderError> {
        let o = self.merchants_order(merchant, order_id).await?;
        if o.refunded_at.is_some() {
            return Ok(o);
        }
        if o.refund_amount <= 0 {
            return Err(OrderError::StateConflict);
        }
        let now = Utc::now();
        let ev = event("refunded", json!({ "refund_amount": o.refund_amount }));
        self.store.mark_refunded(order_id, now, &ev).await?;
        self.load(order_id).await
    }

    async fn load(&self, order_id: u64) -> Result<StoredOrder, OrderError> {
        self.store
            .order(order_id)
            .await?
            .ok_or(OrderError::Internal)
    }
}

impl StoredOrder {
    /// The state-machine view of a stored order.
    pub fn as_state(&self) -> Order {
        Order {
            status: self.status,
            lines: self.lines.clone(),
            error: self.error.clone(),
            result_applied: self.result_applied,
            refunded_amount: self.refunded_amount,
        }
    }
}
