//! Orders: the product's main job. A merchant's order is validated, checked
//! against ownership, presence and stock, queued per machine (one order in
//! flight per machine, from its command until its result), **persisted**,
//! then sent as `cmd/dispense`. The machine's `ack` is recorded with a
//! compare-and-set that succeeds only before the order's `accept_by`; only
//! then does `cmd/go` leave and the merchant hear 0 (PROTOCOL.md, gateway
//! rule 4). The machine's `result` settles the order.
//!
//! - [`crate::domain::order`]: the pure state machine every change goes through.
//! - [`dispatch`]: the per-machine queue, the worker, and the ticket that
//!   decides, once, between an acceptance and a give-up.
//! - [`uplinks`]: acks (the decision), results, inventory snapshots.
//! - [`settle`]: the stored transition, webhooks, deadlines, sweeps,
//!   recovery, owed cancels.
//! - [`inventory`]: reported stock and reservations. [`ids`]: order ids.
//!
//! # Waits and their bounds
//! Every wait of a request has a deadline derived from `request_timeout`
//! (API.md "Deadlines"): the request's `answer_by` is its start +
//! `request_timeout` − [`ANSWER_MARGIN`].
//! - Waiting behind another order in the machine's queue: until `send_by` =
//!   `answer_by` − `accept_timeout`; past it the order is answered 30003 and
//!   never sent (`place_local`).
//! - Waiting for the acceptance: until the order's `accept_by` = its insert
//!   time + `accept_timeout` (`dispatch::Worker::await_decision`).
//! - An ack being recorded when `accept_by` passes: until `answer_by`, then
//!   the ticket is abandoned and the recorded acceptance, if any, gets no
//!   `go` (`dispatch::Ticket::abandon`).
//! - A repeat of an order in flight: until that order's `accept_by` + the
//!   owner-answer slack, bounded by the repeat's own `answer_by`
//!   (`repeat`).
//! - The same out_trade_no's lock: until `answer_by` (30003 past it).
//! - The worker on an accepted order: until its result or
//!   `dispense_timeout` (then `unknown`).
//! - Storage calls: the backend's own bounds (SQLite busy timeout, the
//!   PostgreSQL pool's acquire timeout).
//!
//! Ordering rules: an order row is committed before its command leaves;
//! every later change is a compare-and-set on the stored status, so a
//! duplicate or racing ack/result/deadline applies at most once.

pub mod dispatch;
pub mod ids;
pub mod inventory;
pub mod settle;
pub mod uplinks;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use chrono::Utc;
use dashmap::DashMap;
use serde_json::json;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error};
use vendgate_proto::codes::ErrorCode;
use vendgate_proto::machine::MachineNo;

use crate::commands::CommandBus;
use crate::config::OrderSettings;
use crate::domain::order::{GiveUp, Line, Order, Status};
use crate::presence::PresenceRegistry;
use crate::storage::{OrderEvent, Storage, StorageError, StoredOrder};
use dispatch::{Job, Ticket};
use ids::OrderIds;
use inventory::{Inventory, Shortfall};

pub use uplinks::OrderUplinks;

pub use crate::config::ANSWER_MARGIN;

/// How long a cached machine owner is trusted (see `OrderService::owners`):
/// the bound on how long a transfer, disable or removal by the CLI takes to
/// reach the order path.
pub const OWNER_CACHE_TTL: Duration = Duration::from_secs(2);

/// A cached owner: the merchant, whether the machine is active (neither
/// disabled nor removed), and when this was read.
#[derive(Debug, Clone)]
struct Owner {
    merchant: String,
    active: bool,
    read: std::time::Instant,
}

impl Owner {
    /// The merchant that may order from the machine, if still fresh.
    fn fresh(&self) -> Option<Option<&str>> {
        (self.read.elapsed() < OWNER_CACHE_TTL)
            .then(|| self.active.then_some(self.merchant.as_str()))
    }
}

/// Why an order was not accepted; each maps to one API code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OrderError {
    #[error("machine not found")]
    MachineNotFound,
    #[error("machine offline")]
    Offline,
    #[error("machine did not accept in time")]
    NotAccepted,
    #[error("machine busy: the order could not be sent in time")]
    Busy,
    #[error("insufficient stock")]
    InsufficientStock,
    #[error("machine refused: {0}")]
    Refused(String),
    #[error("order not found")]
    OrderNotFound,
    #[error("order state conflict")]
    StateConflict,
    #[error("out_trade_no reused with a different body")]
    DuplicateOutTradeNo,
    /// Internal: the out_trade_no is taken by this order (a concurrent repeat).
    #[error("repeat of order {0}")]
    RepeatOf(u64),
    /// Nothing was dispatched (API.md: 50000 means exactly that).
    #[error("internal error")]
    Internal,
}

impl OrderError {
    /// The one place order errors meet API codes.
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::MachineNotFound => ErrorCode::MachineNotFound,
            // API.md: "offline, or its acceptance was not received and
            // recorded in time".
            Self::Offline | Self::NotAccepted => ErrorCode::MachineOffline,
            Self::Busy => ErrorCode::MachineBusy,
            Self::InsufficientStock => ErrorCode::InsufficientStock,
            Self::Refused(_) => ErrorCode::MachineRefused,
            Self::OrderNotFound => ErrorCode::OrderNotFound,
            Self::StateConflict => ErrorCode::OrderStateConflict,
            Self::DuplicateOutTradeNo => ErrorCode::DuplicateOutTradeNo,
            // Never leaves the service: `place` resolves it.
            Self::RepeatOf(_) | Self::Internal => ErrorCode::Internal,
        }
    }
}

impl From<StorageError> for OrderError {
    fn from(e: StorageError) -> Self {
        error!(error = %e, "storage failed in the order path");
        Self::Internal
    }
}

/// A validated order request.
#[derive(Debug, Clone)]
pub struct PlaceRequest {
    pub merchant: String,
    pub machine_no: MachineNo,
    pub lines: Vec<(i64, u32)>,
    pub out_trade_no: Option<String>,
    pub pay_later: bool,
    /// When the merchant must have its answer (the request's start +
    /// `request_timeout` − [`ANSWER_MARGIN`]); see [`answer_by`].
    pub answer_by: Instant,
    /// Set when another node forwarded the request to this one, the owner
    /// of the machine's connection (cluster mode).
    pub forwarded: Option<Forwarded>,
}

/// The `answer_by` of a request arriving now.
pub fn answer_by(settings: &OrderSettings) -> Instant {
    Instant::now() + settings.request_timeout.saturating_sub(ANSWER_MARGIN)
}

/// What the node that took a request tells the owner it forwards it to.
#[derive(Debug, Clone, Copy)]
pub struct Forwarded {
    /// The id the requester chose, so that if the owner's answer is lost
    /// the requester can find the order and settle it.
    pub order_id: u64,
}

/// Cluster mode: how the order service reaches machines connected to other
/// nodes (implemented over NATS by `crate::cluster`).
#[async_trait::async_trait]
pub trait RemoteMachines: Send + Sync + 'static {
    /// Whether machine `m` is online on another node.
    fn is_remote(&self, m: &MachineNo) -> bool;
    /// How much longer than `accept_timeout` a requester waits for the
    /// owning node's answer.
    fn answer_slack(&self) -> Duration;
    /// Have the owning node place the order (it runs the local path).
    async fn place(&self, req: &PlaceRequest, order_id: u64) -> Result<u64, OrderError>;
    /// Have the owning node dispatch a paid `pay_later` order.
    async fn pay(
        &self,
        m: &MachineNo,
        merchant: &str,
        order_id: u64,
        answer_by: Instant,
    ) -> Result<u64, OrderError>;
    /// A sweep on this node released an order's reservation: the owner of
    /// the machine, which holds its stock figures, must release it too.
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
    /// Where committed status changes are reported for metrics and the
    /// dashboard (set once at start-up).
    pub observer: std::sync::OnceLock<Arc<crate::metrics::OrderObserver>>,
}

/// The order service. Build with [`OrderService::new`], then [`OrderService::recover`].
pub struct OrderService {
    store: Arc<dyn Storage>,
    presence: Arc<PresenceRegistry>,
    commands: Arc<dyn CommandBus>,
    pub inventory: Inventory,
    settings: OrderSettings,
    queues: DashMap<MachineNo, mpsc::Sender<Job>>,
    /// The ticket of each order this node sent and has not settled, by
    /// order id: where an ack's decision meets the worker waiting for it.
    /// At most one per machine (plus the ones being wound up), so bounded
    /// by the machines connected here.
    inflight: DashMap<u64, Arc<Ticket>>,
    /// The in-flight order's "result applied" waiter, by order id.
    settled: DashMap<u64, tokio::sync::oneshot::Sender<()>>,
    /// Inventory snapshots not yet persisted: the latest per machine (a
    /// newer one replaces it), so bounded by the machines connected here.
    inventory_writes: Arc<settle::PendingSnapshots>,
    inventory_writer: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// Acks and results waiting for a task (see [`uplinks`]).
    uplink_work: mpsc::Sender<uplinks::Work>,
    uplink_rx: std::sync::Mutex<Option<mpsc::Receiver<uplinks::Work>>>,
    ids: OrderIds,
    idempotency_locks: IdempotencyLocks,
    /// Machine → owning merchant and whether it may take orders, filled on
    /// use and trusted for [`OWNER_CACHE_TTL`]. The CLI transfers, disables
    /// and removes machines from another process, so an entry cannot be
    /// invalidated from here: the TTL bounds how long the previous owner (or
    /// a disabled machine) is still answered for. Unknown machines are not
    /// cached, so one the CLI adds later is found at once.
    owners: DashMap<MachineNo, Owner>,
    /// Cluster mode: machines connected to other nodes.
    remote: std::sync::OnceLock<Arc<dyn RemoteMachines>>,
    pub stats: OrderStats,
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

impl OrderService {
    pub fn new(
        store: Arc<dyn Storage>,
        presence: Arc<PresenceRegistry>,
        commands: Arc<dyn CommandBus>,
        settings: OrderSettings,
        notifier: Arc<crate::notifier::Notifier>,
        shutdown: CancellationToken,
    ) -> Arc<Self> {
        let inventory_writes = Arc::new(settle::PendingSnapshots::default());
        let (uplink_work, uplink_rx) = mpsc::channel(uplinks::WORK_QUEUE);
        let svc = Arc::new_cyclic(|me| Self {
            store,
            presence,
            commands,
            inventory: Inventory::default(),
            settings,
            queues: DashMap::new(),
            inflight: DashMap::new(),
            settled: DashMap::new(),
            inventory_writes,
            inventory_writer: std::sync::Mutex::new(None),
            uplink_work,
            uplink_rx: std::sync::Mutex::new(Some(uplink_rx)),
            ids: OrderIds::default(),
            idempotency_locks: DashMap::new(),
            owners: DashMap::new(),
            remote: std::sync::OnceLock::new(),
            stats: OrderStats::default(),
            notifier,
            shutdown,
            me: me.clone(),
        });
        let writer = tokio::spawn(settle::inventory_writer(
            svc.store.clone(),
            svc.inventory_writes.clone(),
            svc.shutdown.clone(),
        ));
        if let Ok(mut w) = svc.inventory_writer.lock() {
            *w = Some(writer);
        }
        svc.spawn_uplink_workers();
        svc
    }

    /// After shutdown: wait until queued inventory snapshots are written, so
    /// storage can be closed without losing them.
    pub async fn flush(&self) {
        let writer = self.inventory_writer.lock().ok().and_then(|mut w| w.take());
        if let Some(w) = writer {
            let _ = w.await;
        }
    }

    /// Place an order; answered within the request's `answer_by`.
    pub async fn place(&self, req: PlaceRequest) -> Result<u64, OrderError> {
        self.stats.placed.fetch_add(1, Ordering::Relaxed);
        // Concurrent requests with one out_trade_no run one after another, so
        // every repeat finds the first one's order instead of racing it for
        // stock and queue slots. The first holds the lock at most until its
        // own `answer_by`, which is earlier than ours.
        let _key_guard = match &req.out_trade_no {
            Some(otn) => {
                let key = (req.merchant.clone(), otn.clone());
                let lock = self
                    .idempotency_locks
                    .entry(key.clone())
                    .or_default()
                    .clone();
                let Ok(guard) = tokio::time::timeout_at(req.answer_by, lock.lock_owned()).await
                else {
                    return Err(OrderError::Busy);
                };
                Some(KeyGuard {
                    locks: &self.idempotency_locks,
                    key,
                    _guard: guard,
                })
            }
            None => None,
        };
        if let Some(otn) = &req.out_trade_no {
            if let Some(existing) = self.store.order_by_out_trade_no(&req.merchant, otn).await? {
                return self
                    .repeat(existing, &fingerprint(&req), req.answer_by)
                    .await;
            }
        }
        match self.place_new(&req).await {
            Err(OrderError::RepeatOf(id)) => {
                let existing = self.load(id).await?;
                self.repeat(existing, &fingerprint(&req), req.answer_by)
                    .await
            }
            other => other,
        }
    }

    /// Answer a repeat of an earlier request with the same out_trade_no:
    /// the same order_id (nothing dispatched again) when the body matches,
    /// 40003 when it does not. A first attempt still in flight is waited
    /// for until its decision is due.
    async fn repeat(
        &self,
        mut existing: StoredOrder,
        fingerprint: &str,
        answer_by: Instant,
    ) -> Result<u64, OrderError> {
        if existing.request_fingerprint.as_deref() != Some(fingerprint) {
            return Err(OrderError::DuplicateOutTradeNo);
        }
        let decided_by = self.decision_due(&existing).min(answer_by);
        while existing.status == Status::Dispatching && Instant::now() < decided_by {
            tokio::time::sleep(Duration::from_millis(20)).await;
            existing = self.load(existing.order_id).await?;
        }
        outcome(&existing)
    }

    /// When a decision on a `dispatching` order is due: its `accept_by`
    /// (plus, in cluster mode, the slack of an owner's answer), as an
    /// instant of this process's clock.
    fn decision_due(&self, o: &StoredOrder) -> Instant {
        let slack = self
            .remote
            .get()
            .map_or(Duration::ZERO, |r| r.answer_slack());
        let left = o
            .accept_by
            .and_then(|a| (a - Utc::now()).to_std().ok())
            .unwrap_or(Duration::ZERO);
        Instant::now() + left + slack
    }

    async fn place_new(&self, req: &PlaceRequest) -> Result<u64, OrderError> {
        // Another merchant's machine answers exactly like an absent one.
        if !self.owned_for_order(&req.machine_no, &req.merchant).await? {
            return Err(OrderError::MachineNotFound);
        }
        if !self.presence.is_online(&req.machine_no) {
            if req.forwarded.is_none() {
                if let Some(remote) = self.remote.get() {
                    if remote.is_remote(&req.machine_no) {
                        return remote.place(req, self.ids.next()).await;
                    }
                }
            }
            return Err(OrderError::Offline);
        }
        if req.pay_later {
            let (by_merchant, by_machine) = self
                .store
                .count_unpaid(&req.merchant, &req.machine_no)
                .await?;
            if by_merchant >= self.settings.max_unpaid_per_merchant
                || by_machine >= self.settings.max_unpaid_per_machine
            {
                debug!(machine_no = %req.machine_no, by_merchant, by_machine, "unpaid reservation cap reached");
                return Err(OrderError::InsufficientStock);
            }
        }
        let lines = self
            .inventory
            .reserve(req.machine_no, &req.lines)
            .map_err(|s| {
                debug!(machine_no = %req.machine_no, shortfall = ?s, "insufficient stock");
                match s {
                    Shortfall::NotCarried(_) | Shortfall::Insufficient(_) => {
                        OrderError::InsufficientStock
                    }
                }
            })?;
        let order_id = match req.forwarded {
            Some(f) => f.order_id,
            None => self.ids.next(),
        };
        if req.pay_later {
            // Reserve and answer at once; no command until payment.
            let deadline = chrono::Duration::from_std(self.settings.unpaid_timeout)
                .ok()
                .map(|d| Utc::now() + d);
            return match self
                .persist_new(order_id, req, &lines, true, deadline)
                .await
            {
                Ok(o) => Ok(o.order_id),
                Err((_, e)) => {
                    self.inventory.release(req.machine_no, &lines);
                    Err(e)
                }
            };
        }
        self.place_local(order_id, req.clone(), lines, None).await
    }

    /// Set before [`Self::recover`] in cluster mode: reach machines on
    /// other nodes through `remote`.
    pub fn set_remote(&self, remote: Arc<dyn RemoteMachines>) {
        let _ = self.remote.set(remote);
    }

    /// Whether `merchant` owns machine `m` and it is active (cached: see
    /// `owners`). A disabled or removed machine is nobody's.
    pub async fn owned_by(&self, m: &MachineNo, merchant: &str) -> Result<bool, StorageError> {
        if let Some(owner) = self
            .owners
            .get(m)
            .and_then(|o| o.fresh().map(|o| o == Some(merchant)))
        {
            return Ok(owner);
        }
        self.read_owner(m, merchant).await
    }

    /// Read `m`'s owner from storage into the cache; whether it is
    /// `merchant`'s and active.
    async fn read_owner(&self, m: &MachineNo, merchant: &str) -> Result<bool, StorageError> {
        let Some(machine) = self.store.machine(m).await? else {
            self.owners.remove(m);
            return Ok(false);
        };
        let active = machine.is_active();
        let owned = active && machine.merchant_appid == merchant;
        self.owners.insert(
            *m,
            Owner {
                merchant: machine.merchant_appid,
                active,
                read: std::time::Instant::now(),
            },
        );
        Ok(owned)
    }

    /// [`Self::owned_by`] for placing an order: a machine the cache does not
    /// show as the merchant's is read from storage whether it is cached as
    /// another merchant's, disabled, or unknown, so all answers take the same
    /// time (a faster "not found" for foreign machines would tell which
    /// numbers are provisioned).
    async fn owned_for_order(&self, m: &MachineNo, merchant: &str) -> Result<bool, StorageError> {
        if self
            .owners
            .get(m)
            .is_some_and(|o| o.fresh() == Some(Some(merchant)))
        {
            return Ok(true);
        }
        self.read_owner(m, merchant).await
    }

    /// Orders waiting behind the one in flight on machine `m`.
    pub fn queued(&self, m: &MachineNo) -> usize {
        self.queues
            .get(m)
            .map(|q| q.max_capacity() - q.capacity())
            .unwrap_or(0)
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

    /// `POST /orders/{id}/pay`: mark a `pay_later` order paid and dispatch it
    /// under the same online, accept and deadline rules as placing. Exactly
    /// one of a payment and the expiry wins (compare-and-set on the status).
    pub async fn pay(
        &self,
        merchant: &str,
        order_id: u64,
        answer_by: Instant,
    ) -> Result<u64, OrderError> {
        self.pay_with(merchant, order_id, answer_by, false).await
    }

    /// [`Self::pay`]; `forwarded`: another node sent it here, the owner.
    pub async fn pay_with(
        &self,
        merchant: &str,
        order_id: u64,
        answer_by: Instant,
        forwarded: bool,
    ) -> Result<u64, OrderError> {
        let Some(o) = self.store.order(order_id).await? else {
            return Err(OrderError::OrderNotFound);
        };
        if o.merchant_appid != merchant {
            return Err(OrderError::OrderNotFound);
        }
        if o.status != Status::AwaitingPayment {
            return Err(OrderError::StateConflict);
        }
        // Offline: stay unpaid (the merchant may retry until the deadline).
        if !self.presence.is_online(&o.machine_no) {
            if !forwarded {
                if let Some(remote) = self.remote.get() {
                    if remote.is_remote(&o.machine_no) {
                        return remote
                            .pay(&o.machine_no, merchant, order_id, answer_by)
                            .await;
                    }
                }
            }
            return Err(OrderError::Offline);
        }
        let req = PlaceRequest {
            merchant: merchant.to_string(),
            machine_no: o.machine_no,
            lines: o.lines.iter().map(|l| (l.product_id, l.quantity)).collect(),
            out_trade_no: o.out_trade_no.clone(),
            pay_later: true,
            answer_by,
            forwarded: forwarded.then_some(Forwarded { order_id }),
        };
        let lines = o.lines.clone();
        self.place_local(order_id, req, lines, Some(o)).await
    }

    /// `POST /orders/{id}/cancel`: cancel an unpaid `pay_later` order and
    /// give its stock back at once. Exactly one of a cancel, a payment and
    /// the expiry wins (compare-and-set on `awaiting_payment`); the losers
    /// see a state conflict, and only the winner releases the stock. A
    /// second cancel is a conflict too: the order is no longer unpaid.
    pub async fn cancel(&self, merchant: &str, order_id: u64) -> Result<StoredOrder, OrderError> {
        let Some(o) = self.store.order(order_id).await? else {
            return Err(OrderError::OrderNotFound);
        };
        if o.merchant_appid != merchant {
            return Err(OrderError::OrderNotFound);
        }
        if o.status != Status::AwaitingPayment {
            return Err(OrderError::StateConflict);
        }
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
        let Some(o) = self.store.order(order_id).await? else {
            return Err(OrderError::OrderNotFound);
        };
        if o.merchant_appid != merchant {
            return Err(OrderError::OrderNotFound);
        }
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

/// The merchant's answer for an order placed earlier (a repeat, or one
/// whose owner's answer was lost), from its stored status.
pub(crate) fn outcome(o: &StoredOrder) -> Result<u64, OrderError> {
    match o.status {
        Status::Rejected => match o.error.as_deref() {
            Some("dispensed_without_go") | None => Err(OrderError::NotAccepted),
            Some(e) if GiveUp::parse(e).is_some() => Err(OrderError::NotAccepted),
            Some(reason) => Err(OrderError::Refused(reason.to_string())),
        },
        // No decision recorded (yet): nothing will be dispensed once the
        // order's `accept_by` has passed.
        Status::Dispatching => Err(OrderError::NotAccepted),
        _ => Ok(o.order_id),
    }
}

/// Identifies a request body for idempotency: the same out_trade_no with a
/// different machine, products or pay_later is a different order (40003).
fn fingerprint(req: &PlaceRequest) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(req.machine_no.as_str());
    h.update(if req.pay_later {
        b"|later|"
    } else {
        b"|now|  "
    });
    for (p, q) in &req.lines {
        h.update(format!("{p}:{q},"));
    }
    hex::encode(h.finalize())
}

type IdempotencyLocks = DashMap<(String, String), Arc<tokio::sync::Mutex<()>>>;

/// Holds one out_trade_no's lock; the map entry goes when nobody else waits.
struct KeyGuard<'a> {
    locks: &'a IdempotencyLocks,
    key: (String, String),
    _guard: tokio::sync::OwnedMutexGuard<()>,
}

impl Drop for KeyGuard<'_> {
    fn drop(&mut self) {
        // Two references left (the map's and our guard's mutex Arc) means no
        // waiter holds a clone.
        self.locks
            .remove_if(&self.key, |_, m| Arc::strong_count(m) <= 2);
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
