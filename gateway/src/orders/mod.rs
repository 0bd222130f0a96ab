//! Orders: the product's main job. A merchant's order is validated, checked
//! against ownership, presence and stock, queued per machine (one order in
//! flight per machine), **persisted**, then sent as `cmd/dispense`; the
//! machine's `ack` answers the merchant and its `result` settles the order.
//!
//! - `state`: the pure state machine every change goes through.
//! - `inventory`: reported stock and reservations.
//! - `ids`: order id generation.
//!
//! Ordering rules: an order row is committed before its command leaves; every
//! later change is a compare-and-set on the stored status, so a duplicate or
//! racing ack/result/deadline applies at most once.

pub mod ids;
pub mod inventory;
pub mod state;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::Bytes;
use chrono::Utc;
use dashmap::DashMap;
use serde_json::json;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};
use vendgate_proto::codes::ErrorCode;
use vendgate_proto::machine::MachineNo;
use vendgate_proto::msg::{
    self, AckMsg, CancelCmd, DispenseCmd, InventoryMsg, OrderLine, ResultMsg,
};
use vendgate_proto::topic::{Command, Uplink};

use crate::commands::CommandBus;
use crate::config::OrderSettings;
use crate::edge::UplinkHandler;
use crate::presence::PresenceRegistry;
use crate::storage::{
    Due, NewOrder, NewOutboxEvent, OrderChange, OrderEvent, Storage, StorageError, StoredOrder,
};
use ids::OrderIds;
use inventory::{Inventory, Shortfall};
use state::{apply, check_result, Event, Line, Order, Status, Transition, TransitionError};

/// Why an order was not accepted; each maps to one API code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, serde::Serialize, serde::Deserialize)]
pub enum OrderError {
    #[error("machine not found")]
    MachineNotFound,
    #[error("machine offline")]
    Offline,
    #[error("machine did not accept in time")]
    NotAccepted,
    #[error("machine queue full")]
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
    #[error("internal error")]
    Internal,
}

impl OrderError {
    /// The one place order errors meet API codes.
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::MachineNotFound => ErrorCode::MachineNotFound,
            // API.md: "offline, or did not accept within accept_timeout".
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
    /// Set when another node forwarded the request to this one, the owner
    /// of the machine's connection (cluster mode).
    pub forwarded: Option<Forwarded>,
}

/// What the node that took a request tells the owner it forwards it to.
#[derive(Debug, Clone, Copy)]
pub struct Forwarded {
    /// The id the requester chose, so that if the owner's answer is lost
    /// the requester can find the order and settle it.
    pub order_id: u64,
    /// The requester stops waiting soon after this: a job still queued
    /// then is answered 30002 without being dispatched.
    pub dispatch_by: tokio::time::Instant,
}

/// Cluster mode: how the order service reaches machines connected to other
/// nodes (implemented over NATS by `crate::cluster`).
#[async_trait::async_trait]
pub trait RemoteMachines: Send + Sync + 'static {
    /// Whether machine `m` is online on another node.
    fn is_remote(&self, m: &MachineNo) -> bool;
    /// Have the owning node place the order (it runs the local path).
    async fn place(&self, req: &PlaceRequest, order_id: u64) -> Result<u64, OrderError>;
    /// Have the owning node dispatch a paid `pay_later` order.
    async fn pay(&self, m: &MachineNo, merchant: &str, order_id: u64) -> Result<u64, OrderError>;
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
    /// Where committed status changes are reported for metrics and the
    /// dashboard (set once at start-up).
    pub observer: std::sync::OnceLock<Arc<crate::metrics::OrderObserver>>,
}

/// Why a job did not get its order accepted, and whether its reservation
/// goes back (a paid order that stays unpaid keeps it).
struct Failed {
    order_id: u64,
    error: OrderError,
    release: bool,
}

struct Job {
    order_id: u64,
    req: PlaceRequest,
    lines: Vec<Line>,
    /// A paid `pay_later` order (already stored, now `dispatching`).
    paid: Option<StoredOrder>,
    reply: oneshot::Sender<Result<u64, OrderError>>,
}

/// The order service. Build with [`OrderService::new`], then [`OrderService::recover`].
pub struct OrderService {
    store: Arc<dyn Storage>,
    presence: Arc<PresenceRegistry>,
    commands: Arc<dyn CommandBus>,
    pub inventory: Inventory,
    settings: OrderSettings,
    queues: DashMap<MachineNo, mpsc::Sender<Job>>,
    /// The in-flight order's ack waiter, by order id.
    acks: DashMap<u64, (MachineNo, oneshot::Sender<AckMsg>)>,
    /// The in-flight order's "result applied" waiter, by order id.
    settled: DashMap<u64, oneshot::Sender<()>>,
    inventory_writes: mpsc::UnboundedSender<(MachineNo, Vec<msg::InventoryItem>)>,
    inventory_writer: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
    ids: OrderIds,
    idempotency_locks: IdempotencyLocks,
    /// Machine → owning merchant, filled on first use. A machine's owner
    /// never changes once provisioned (there is no transfer or delete), so
    /// entries never go stale; unknown machines are not cached, so one the
    /// CLI adds later is found. A future transfer command must clear its
    /// entry.
    owners: DashMap<MachineNo, String>,
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
        let (inventory_writes, rx) = mpsc::unbounded_channel();
        let svc = Arc::new_cyclic(|me| Self {
            store,
            presence,
            commands,
            inventory: Inventory::default(),
            settings,
            queues: DashMap::new(),
            acks: DashMap::new(),
            settled: DashMap::new(),
            inventory_writes,
            inventory_writer: std::sync::Mutex::new(None),
            ids: OrderIds::default(),
            idempotency_locks: DashMap::new(),
            owners: DashMap::new(),
            remote: std::sync::OnceLock::new(),
            stats: OrderStats::default(),
            notifier,
            shutdown,
            me: me.clone(),
        });
        let writer = tokio::spawn(inventory_writer(
            svc.store.clone(),
            rx,
            svc.shutdown.clone(),
        ));
        if let Ok(mut w) = svc.inventory_writer.lock() {
            *w = Some(writer);
        }
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

    /// Start-up: load stock snapshots, re-hold reservations of open orders,
    /// give up on orders that were dispatching when the process stopped
    /// (their merchant never got an answer), and re-arm dispense deadlines.
    pub async fn recover(&self) -> Result<(), StorageError> {
        if self.remote.get().is_some() {
            // Cluster mode: other nodes are running. Stock is rebuilt per
            // machine as it connects here ([`Self::adopt`]); orders a dead
            // node left behind are settled by the sweeps.
            return Ok(());
        }
        for (m, items) in self.store.inventories().await? {
            self.inventory.set_snapshot(m, &items);
        }
        let open = self
            .store
            .orders_in_status(&[
                Status::AwaitingPayment,
                Status::Dispatching,
                Status::Dispensing,
            ])
            .await?;
        for o in open {
            match o.status {
                Status::AwaitingPayment => self.inventory.restore(o.machine_no, &o.lines),
                Status::Dispatching => {
                    // The command may have left: the change records a cancel
                    // owed, delivered when the machine is back (its TTL is
                    // the last guard).
                    let _ = self
                        .transition(&o, &Event::NotAccepted("gateway_restart".into()), json!({}))
                        .await;
                }
                Status::Dispensing => {
                    self.inventory.restore(o.machine_no, &o.lines);
                    if let Some(me) = self.me.upgrade() {
                        tokio::spawn(async move { me.watch_deadline(o.order_id).await });
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Place an order and wait for the machine's acceptance.
    pub async fn place(&self, req: PlaceRequest) -> Result<u64, OrderError> {
        self.stats.placed.fetch_add(1, Ordering::Relaxed);
        // Concurrent requests with one out_trade_no run one after another, so
        // every repeat finds the first one's order instead of racing it for
        // stock and queue slots.
        let _key_guard = match &req.out_trade_no {
            Some(otn) => {
                let key = (req.merchant.clone(), otn.clone());
                let lock = self
                    .idempotency_locks
                    .entry(key.clone())
                    .or_default()
                    .clone();
                let guard = lock.lock_owned().await;
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
                return self.repeat(existing, &fingerprint(&req)).await;
            }
        }
        match self.place_new(&req).await {
            Err(OrderError::RepeatOf(id)) => {
                let existing = self.load(id).await?;
                self.repeat(existing, &fingerprint(&req)).await
            }
            other => other,
        }
    }

    /// Answer a repeat of an earlier request with the same out_trade_no:
    /// the same order_id (nothing dispatched again) when the body matches,
    /// 40003 when it does not. A first attempt still in flight is waited for.
    async fn repeat(
        &self,
        mut existing: StoredOrder,
        fingerprint: &str,
    ) -> Result<u64, OrderError> {
        if existing.request_fingerprint.as_deref() != Some(fingerprint) {
            return Err(OrderError::DuplicateOutTradeNo);
        }
        let until =
            tokio::time::Instant::now() + self.settings.accept_timeout + Duration::from_secs(1);
        while existing.status == Status::Dispatching && tokio::time::Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(20)).await;
            existing = self.load(existing.order_id).await?;
        }
        outcome(&existing)
    }

    /// Cluster mode: the owning node's answer about a forwarded order never
    /// came and storage has no order `order_id`. The owner may still be
    /// about to store it (it was paused between its last check and the
    /// insert): store it here first, given up, so the owner's insert finds
    /// the id taken and the order never starts. If the owner got there
    /// first, settle what it stored.
    pub(crate) async fn record_lost(
        &self,
        req: &PlaceRequest,
        order_id: u64,
    ) -> Result<u64, OrderError> {
        let now = Utc::now();
        let lines: Vec<Line> = req
            .lines
            .iter()
            .map(|(p, q)| Line {
                product_id: *p,
                quantity: *q,
                dispensed: 0,
                unit_price: 0,
            })
            .collect();
        let new = NewOrder {
            order_id,
            merchant_appid: req.merchant.clone(),
            machine_no: req.machine_no,
            out_trade_no: req.out_trade_no.clone(),
            request_fingerprint: req.out_trade_no.as_ref().map(|_| fingerprint(req)),
            pay_later: req.pay_later,
            status: Status::Dispatching,
            lines,
            amount: 0,
            created_at: now,
            pay_deadline: None,
        };
        let ev = event("created", json!({ "by": "requester", "owner_lost": true }));
        match self.store.insert_order(&new, &ev).await {
            Ok(()) => {
                let stored = self.load(order_id).await?;
                // Never sent (the owner cannot store it now): no cancel owed.
                let _ = self
                    .transition(
                        &stored,
                        &Event::NotAccepted("not_delivered: owner lost".into()),
                        json!({}),
                    )
                    .await;
                Err(OrderError::Offline)
            }
            Err(StorageError::Duplicate("order")) => {
                self.give_up_lost(self.load(order_id).await?).await
            }
            Err(StorageError::Duplicate("out_trade_no")) => {
                let otn = req.out_trade_no.as_deref().unwrap_or("");
                match self.store.order_by_out_trade_no(&req.merchant, otn).await? {
                    Some(o) => self.give_up_lost(o).await,
                    None => Err(OrderError::Internal),
                }
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Cluster mode: the owning node's answer about `o` never came (it died
    /// with the request, or the answer was lost). Treated exactly like a
    /// missing ack: a `dispatching` order is given up with a cancel owed
    /// (sent now if the machine is reachable, else when it reconnects); an
    /// order the owner did settle is answered from what it recorded. The
    /// dispense is never sent again.
    pub(crate) async fn give_up_lost(&self, mut o: StoredOrder) -> Result<u64, OrderError> {
        // Until the give-up is recorded or the order is seen settled: a
        // frozen owner may hold the order's row inside a transaction until
        // the database ends its session (idle_in_transaction_session_timeout),
        // and answering 30002 before knowing would be wrong if it completes.
        let until = tokio::time::Instant::now() + GIVE_UP_PATIENCE;
        loop {
            if o.status != Status::Dispatching {
                return outcome(&o);
            }
            match self
                .transition(&o, &Event::NotAccepted("owner_lost".into()), json!({}))
                .await
            {
                Ok(Some(_)) => {
                    self.stats.not_accepted.fetch_add(1, Ordering::Relaxed);
                    self.release(o.machine_no, &o.lines);
                    if self.send_cancel(o.machine_no, o.order_id).await.is_ok() {
                        let _ = self.store.cancel_delivered(o.order_id).await;
                    }
                    return Err(OrderError::NotAccepted);
                }
                // Changed under us (the owner recorded the ack after all), or
                // storage could not take the write yet.
                Ok(None) | Err(_) => {
                    if tokio::time::Instant::now() >= until {
                        // Unknown: the sweep settles it later; the merchant
                        // may repeat with its out_trade_no.
                        return Err(OrderError::Internal);
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    o = self.load(o.order_id).await?;
                }
            }
        }
    }

    async fn place_new(&self, req: &PlaceRequest) -> Result<u64, OrderError> {
        let req = req.clone();
        // Another merchant's machine answers exactly like an absent one.
        if !self.owned_for_order(&req.machine_no, &req.merchant).await? {
            return Err(OrderError::MachineNotFound);
        }
        if !self.presence.is_online(&req.machine_no) {
            if req.forwarded.is_none() {
                if let Some(remote) = self.remote.get() {
                    if remote.is_remote(&req.machine_no) {
                        return remote.place(&req, self.ids.next()).await;
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
                .persist_new(order_id, &req, &lines, true, deadline)
                .await
            {
                Ok(o) => Ok(o.order_id),
                Err((_, e)) => {
                    self.inventory.release(req.machine_no, &lines);
                    Err(e)
                }
            };
        }
        let (reply, answer) = oneshot::channel();
        let job = Job {
            order_id,
            req,
            lines,
            paid: None,
            reply,
        };
        let m = job.req.machine_no;
        let queue = self.queue(m);
        if let Err(e) = queue.try_send(job) {
            let job = match e {
                mpsc::error::TrySendError::Full(j) | mpsc::error::TrySendError::Closed(j) => j,
            };
            self.inventory.release(m, &job.lines);
            self.stats.busy.fetch_add(1, Ordering::Relaxed);
            return Err(OrderError::Busy);
        }
        // The worker always answers; a dropped sender means shutdown.
        answer.await.unwrap_or(Err(OrderError::Internal))
    }

    /// Cluster mode: reach machines on other nodes through `remote`. Set
    /// before [`Self::recover`].
    pub fn set_remote(&self, remote: Arc<dyn RemoteMachines>) {
        let _ = self.remote.set(remote);
    }

    /// Whether `merchant` owns machine `m` (cached: see `owners`).
    pub async fn owned_by(&self, m: &MachineNo, merchant: &str) -> Result<bool, StorageError> {
        if let Some(owner) = self.owners.get(m) {
            return Ok(owner.as_str() == merchant);
        }
        let Some(machine) = self.store.machine(m).await? else {
            return Ok(false);
        };
        let owned = machine.merchant_appid == merchant;
        self.owners.insert(*m, machine.merchant_appid);
        Ok(owned)
    }

    /// [`Self::owned_by`] for placing an order: a machine the cache does not
    /// show as the merchant's is read from storage whether it is cached as
    /// another merchant's or unknown, so both answers take the same time (a
    /// faster "not found" for foreign machines would tell which numbers are
    /// provisioned).
    async fn owned_for_order(&self, m: &MachineNo, merchant: &str) -> Result<bool, StorageError> {
        if self.owners.get(m).is_some_and(|o| o.as_str() == merchant) {
            return Ok(true);
        }
        let Some(machine) = self.store.machine(m).await? else {
            return Ok(false);
        };
        let owned = machine.merchant_appid == merchant;
        self.owners.insert(*m, machine.merchant_appid);
        Ok(owned)
    }

    /// Orders waiting behind the one in flight on machine `m`.
    pub fn queued(&self, m: &MachineNo) -> usize {
        self.queues
            .get(m)
            .map(|q| q.max_capacity() - q.capacity())
            .unwrap_or(0)
    }

    fn queue(&self, m: MachineNo) -> mpsc::Sender<Job> {
        self.queues
            .entry(m)
            .or_insert_with(|| {
                let (tx, rx) = mpsc::channel(self.settings.queue_depth.max(1));
                if let Some(me) = self.me.upgrade() {
                    tokio::spawn(async move { me.worker(m, rx).await });
                }
                tx
            })
            .clone()
    }

    /// One machine's orders, one at a time, in arrival order.
    async fn worker(self: Arc<Self>, m: MachineNo, mut rx: mpsc::Receiver<Job>) {
        loop {
            let job = tokio::select! {
                _ = self.shutdown.cancelled() => break,
                j = rx.recv() => match j { Some(j) => j, None => break },
            };
            self.dispatch(job).await;
        }
        // Orders still queued were never persisted; their callers get 50000.
        while let Ok(job) = rx.try_recv() {
            self.inventory.release(m, &job.lines);
            let _ = job.reply.send(Err(OrderError::Internal));
        }
    }

    async fn dispatch(&self, job: Job) {
        let Job {
            order_id,
            req,
            lines,
            paid,
            reply,
        } = job;
        let m = req.machine_no;
        let order_id = match self.dispatch_inner(order_id, &req, &lines, paid).await {
            Ok(Accepted { order_id, settled }) => {
                let _ = reply.send(Ok(order_id));
                // Stay on this order until it settles or reaches its deadline:
                // one order at a time per machine.
                let deadline = self.settings.dispense_timeout;
                let got = tokio::select! {
                    r = tokio::time::timeout(deadline, settled) => r.is_ok(),
                    _ = self.shutdown.cancelled() => return,
                };
                if !got {
                    self.deadline_passed(order_id).await;
                }
                order_id
            }
            Err(Failed {
                order_id,
                error,
                release,
            }) => {
                if release {
                    self.inventory.release(m, &lines);
                }
                let _ = reply.send(Err(error));
                order_id
            }
        };
        self.settled.remove(&order_id);
        self.acks.remove(&order_id);
    }

    async fn dispatch_inner(
        &self,
        order_id: u64,
        req: &PlaceRequest,
        lines: &[Line],
        paid: Option<StoredOrder>,
    ) -> Result<Accepted, Failed> {
        let m = req.machine_no;
        // A paid order keeps its reservation (it stays unpaid) unless this
        // job moves it on; a new order's reservation is this job's.
        let fail = |error, release| Failed {
            order_id,
            error,
            release,
        };
        // Gone meanwhile; or a forwarded job that waited in the queue past
        // the requester's patience: the requester has answered 30002 (or is
        // about to), so the order must not start now.
        let late = req
            .forwarded
            .is_some_and(|f| tokio::time::Instant::now() >= f.dispatch_by);
        if late || !self.presence.is_online(&m) {
            return Err(fail(OrderError::Offline, paid.is_none()));
        }
        let stored = match paid {
            // A pay_later order is paid only now, right before its command
            // leaves, so it is never `dispatching` while queued: a
            // `dispatching` order older than the accept timeout is one its
            // node lost. Exactly one of this payment and the expiry wins.
            Some(mut o) => match self.transition(&o, &Event::Paid, json!({})).await {
                Ok(Some(next)) if next.status == Status::Dispatching => {
                    o.status = next.status;
                    o.updated_at = Utc::now();
                    o
                }
                Ok(_) | Err(_) => return Err(fail(OrderError::StateConflict, false)),
            },
            // Durable before anything leaves.
            None => self
                .persist_new(order_id, req, lines, false, None)
                .await
                .map_err(|(id, e)| Failed {
                    order_id: id,
                    error: e,
                    release: true,
                })?,
        };
        let dispatch_by = req.forwarded.map(|f| f.dispatch_by);
        self.send_and_wait(stored, dispatch_by)
            .await
            .map_err(|(id, e)| Failed {
                order_id: id,
                error: e,
                release: true,
            })
    }

    /// Insert a new order (retrying on an id collision).
    async fn persist_new(
        &self,
        mut order_id: u64,
        req: &PlaceRequest,
        lines: &[Line],
        pay_later: bool,
        pay_deadline: Option<chrono::DateTime<Utc>>,
    ) -> Result<StoredOrder, (u64, OrderError)> {
        let m = req.machine_no;
        let order = Order::new(lines.to_vec(), pay_later);
        let mut attempts = 0;
        loop {
            let now = Utc::now();
            let new = NewOrder {
                order_id,
                merchant_appid: req.merchant.clone(),
                machine_no: m,
                out_trade_no: req.out_trade_no.clone(),
                request_fingerprint: req.out_trade_no.as_ref().map(|_| fingerprint(req)),
                pay_later,
                status: order.status,
                lines: lines.to_vec(),
                amount: order.amount(),
                created_at: now,
                pay_deadline,
            };
            let ev = event(
                "created",
                json!({ "amount": order.amount(), "lines": lines, "pay_later": pay_later }),
            );
            match self.store.insert_order(&new, &ev).await {
                // The row just inserted, without reading it back.
                Ok(()) => {
                    return Ok(StoredOrder {
                        order_id,
                        merchant_appid: new.merchant_appid,
                        machine_no: m,
                        out_trade_no: new.out_trade_no,
                        request_fingerprint: new.request_fingerprint,
                        pay_later,
                        status: order.status,
                        lines: new.lines,
                        amount: new.amount,
                        refund_amount: 0,
                        error: None,
                        result_applied: false,
                        created_at: now,
                        updated_at: now,
                        dispense_deadline: None,
                        pay_deadline,
                        refunded_at: None,
                    })
                }
                // A forwarded order keeps the id its requester chose: taken,
                // it is the requester's record that it gave up (see
                // `record_lost`), so this order must not start.
                Err(StorageError::Duplicate("order")) if req.forwarded.is_some() => {
                    return Err((order_id, OrderError::Offline));
                }
                Err(StorageError::Duplicate("order")) if attempts < 5 => {
                    attempts += 1;
                    order_id = self.ids.next();
                }
                Err(StorageError::Duplicate("out_trade_no")) => {
                    // A concurrent repeat inserted first; answer as its repeat.
                    let otn = req.out_trade_no.as_deref().unwrap_or("");
                    return match self.store.order_by_out_trade_no(&req.merchant, otn).await {
                        Ok(Some(o)) => Err((order_id, OrderError::RepeatOf(o.order_id))),
                        _ => Err((order_id, OrderError::Internal)),
                    };
                }
                Err(e) => {
                    error!(machine_no = %m, error = %e, "could not persist order");
                    return Err((order_id, OrderError::Internal));
                }
            }
        }
    }

    /// Send the stored order's dispense command and wait for the machine.
    /// `dispatch_by`: a forwarded order must not leave after this (see
    /// [`Forwarded`]).
    async fn send_and_wait(
        &self,
        stored: StoredOrder,
        dispatch_by: Option<tokio::time::Instant>,
    ) -> Result<Accepted, (u64, OrderError)> {
        let (order_id, m) = (stored.order_id, stored.machine_no);
        let (ack_tx, ack_rx) = oneshot::channel();
        let (settled_tx, settled_rx) = oneshot::channel();
        self.acks.insert(order_id, (m, ack_tx));
        self.settled.insert(order_id, settled_tx);
        let ttl_ms = u64::try_from(self.settings.accept_timeout.as_millis()).unwrap_or(u64::MAX);
        let cmd = DispenseCmd {
            order_id,
            items: stored
                .lines
                .iter()
                .map(|l| OrderLine {
                    product_id: l.product_id,
                    quantity: l.quantity,
                })
                .collect(),
            ttl_ms,
        };
        // Checked again right before the command leaves (storing it took
        // time, or the process was paused): past it, the requester has
        // given up or is about to, and decides from storage alone.
        let sent = if dispatch_by.is_some_and(|d| tokio::time::Instant::now() >= d) {
            Err(crate::commands::DeliveryError::Timeout)
        } else {
            let sent_at = Utc::now();
            self.commands
                .send(&m, Command::Dispense, Bytes::from(msg::encode(&cmd)))
                .await
                .map(|()| sent_at)
        };
        let sent_at = match sent {
            Ok(at) => at,
            Err(e) => {
                let _ = self
                    .transition(
                        &stored,
                        &Event::NotAccepted(format!("not_delivered: {e}")),
                        json!({}),
                    )
                    .await;
                return Err((order_id, OrderError::Offline));
            }
        };
        // When the command left rides on the next transition's event: one
        // commit (one fsync) fewer per order than a separate "sent" row.
        let sent = json!({ "sent_at": sent_at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true), "ttl_ms": ttl_ms });

        let ack = tokio::time::timeout(self.settings.accept_timeout, ack_rx).await;
        match ack {
            Ok(Ok(a)) if a.accepted => {
                self.stats.accepted.fetch_add(1, Ordering::Relaxed);
                match self
                    .transition(&stored, &Event::Accepted, sent.clone())
                    .await
                {
                    Ok(applied) => {
                        if applied.is_none() {
                            // The result overtook us and recorded the
                            // acceptance; keep when the command left.
                            let _ = self
                                .store
                                .append_order_event(order_id, &event("sent", sent))
                                .await;
                        }
                        Ok(Accepted {
                            order_id,
                            settled: settled_rx,
                        })
                    }
                    Err(e) => Err((order_id, e)),
                }
            }
            Ok(Ok(a)) => {
                self.stats.refused.fetch_add(1, Ordering::Relaxed);
                let reason = a.reason.unwrap_or_else(|| "refused".into());
                let _ = self
                    .transition(&stored, &Event::Refused(reason.clone()), sent)
                    .await;
                Err((order_id, OrderError::Refused(reason)))
            }
            _ => {
                self.acks.remove(&order_id);
                // Record first, then cancel: the machine must never act on it
                // (the command's TTL and the machine's dedup are the other guards).
                let gave_up = self
                    .transition(&stored, &Event::NotAccepted("accept_timeout".into()), sent)
                    .await;
                if !matches!(gave_up, Ok(Some(_))) {
                    // Not recorded: the order moved on meanwhile. After a
                    // move the ack went down with the old connection and
                    // the result the machine re-published was applied by
                    // another node: answer from what storage says.
                    return self.answer_stored(order_id, settled_rx).await;
                }
                self.stats.not_accepted.fetch_add(1, Ordering::Relaxed);
                if let Err(e) = self.send_cancel(m, order_id).await {
                    debug!(machine_no = %m, order_id, error = %e, "cancel not delivered");
                }
                Err((order_id, OrderError::NotAccepted))
            }
        }
    }

    /// The merchant's answer for an in-flight order whose give-up could not
    /// be recorded: what storage holds (0 for an order the machine accepted;
    /// its result, applied wherever it arrived, settles it).
    async fn answer_stored(
        &self,
        order_id: u64,
        settled: oneshot::Receiver<()>,
    ) -> Result<Accepted, (u64, OrderError)> {
        let o = self.load(order_id).await.map_err(|e| (order_id, e))?;
        match outcome(&o) {
            Ok(_) => {
                self.stats.accepted.fetch_add(1, Ordering::Relaxed);
                let settled = if o.status.holds_reservation() {
                    settled
                } else {
                    // Already settled (elsewhere): nothing to wait for.
                    let (tx, rx) = oneshot::channel();
                    let _ = tx.send(());
                    rx
                };
                Ok(Accepted { order_id, settled })
            }
            Err(e) => Err((order_id, e)),
        }
    }

    async fn send_cancel(
        &self,
        m: MachineNo,
        order_id: u64,
    ) -> Result<(), crate::commands::DeliveryError> {
        let r = self
            .commands
            .send(
                &m,
                Command::Cancel,
                Bytes::from(msg::encode(&CancelCmd { order_id })),
            )
            .await;
        let _ = self
            .store
            .append_order_event(
                order_id,
                &event("cancel_sent", json!({ "delivered": r.is_ok() })),
            )
            .await;
        r
    }

    async fn load(&self, order_id: u64) -> Result<StoredOrder, OrderError> {
        self.store
            .order(order_id)
            .await?
            .ok_or(OrderError::Internal)
    }

    /// Apply `ev` to the stored order with a compare-and-set on its status,
    /// retrying on a lost race. Returns the new order when this call changed
    /// it, None when the event was a no-op (duplicate).
    async fn transition(
        &self,
        stored: &StoredOrder,
        ev: &Event,
        detail: serde_json::Value,
    ) -> Result<Option<Order>, OrderError> {
        let mut current = stored.clone();
        for _ in 0..8 {
            let before = current.as_state();
            let next = match apply(&before, ev) {
                Ok(Transition::Changed(n)) => n,
                Ok(Transition::Unchanged) => return Ok(None),
                Err(TransitionError::Conflict(_)) => return Err(OrderError::StateConflict),
                Err(TransitionError::BadResult(_)) => return Err(OrderError::StateConflict),
            };
            let now = Utc::now();
            let dispense_deadline = if next.status == Status::Dispensing {
                chrono::Duration::from_std(self.settings.dispense_timeout)
                    .ok()
                    .map(|d| now + d)
            } else {
                current.dispense_deadline
            };
            let change = OrderChange {
                status: next.status,
                lines: next.lines.clone(),
                error: next.error.clone(),
                result_applied: next.result_applied,
                refund_amount: next.refund_amount(),
                dispense_deadline,
                cancel_pending: owes_cancel(ev),
                at: now,
            };
            let mut d = detail.clone();
            if let Some(obj) = d.as_object_mut() {
                obj.insert("status".into(), json!(next.status.as_str()));
                if let Some(e) = &next.error {
                    obj.insert("error".into(), json!(e));
                }
            }
            let kind = match ev {
                Event::Paid => "paid",
                Event::PaymentExpired => "expired",
                Event::Accepted => "accepted",
                Event::Refused(_) => "refused",
                Event::NotAccepted(_) => "not_accepted",
                Event::Result { .. } => "result",
                Event::DispenseDeadline => "deadline",
            };
            let outbox = self.webhook_for(&current, &next, now).await?;
            if self
                .store
                .update_order(
                    current.order_id,
                    current.status,
                    &change,
                    &event(kind, d),
                    outbox.as_ref(),
                )
                .await?
            {
                if outbox.is_some() {
                    self.notifier.wake();
                }
                if let Some(o) = self.stats.observer.get() {
                    o.transition(
                        current.order_id,
                        current.machine_no,
                        current.status,
                        next.status,
                        next.error.as_deref(),
                    );
                }
                return Ok(Some(next));
            }
            // Lost a race (a result overtook the ack, say): reload and retry.
            current = self.load(current.order_id).await?;
        }
        Err(OrderError::StateConflict)
    }

    /// The merchant's webhook for a change into a status API.md notifies
    /// about, if the merchant has a `notify_url`. Written in the same
    /// transaction as the change.
    async fn webhook_for(
        &self,
        o: &StoredOrder,
        next: &Order,
        at: chrono::DateTime<Utc>,
    ) -> Result<Option<NewOutboxEvent>, OrderError> {
        let kind = match next.status {
            Status::Completed => "order.completed",
            Status::PartiallyDispensed => "order.partially_dispensed",
            Status::Failed => "order.dispense_failed",
            Status::Unknown => "order.unknown",
            Status::Expired => "order.expired",
            _ => return Ok(None),
        };
        let Some(merchant) = self.store.merchant(&o.merchant_appid).await? else {
            return Ok(None);
        };
        if merchant.notify_url.is_none() {
            return Ok(None);
        }
        let event_id = crate::notifier::new_event_id();
        let items: Vec<serde_json::Value> = next
            .lines
            .iter()
            .map(|l| json!({ "product_id": l.product_id, "quantity": l.quantity, "dispensed": l.dispensed, "unit_price": l.unit_price }))
            .collect();
        let created_at = at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        let body = json!({
            "event_id": event_id,
            "type": kind,
            "created_at": created_at,
            "data": {
                "order_id": o.order_id,
                "machine_no": o.machine_no.as_str(),
                "status": next.status.as_str(),
                "out_trade_no": o.out_trade_no,
                "items": items,
                "amount": o.amount,
                "refund_amount": next.refund_amount(),
                "error": next.error,
            }
        });
        Ok(Some(NewOutboxEvent {
            event_id,
            merchant_appid: o.merchant_appid.clone(),
            order_key: format!("order:{}", o.order_id),
            order_id: Some(o.order_id),
            machine_no: Some(o.machine_no),
            kind: kind.to_string(),
            body: body.to_string(),
            created_at: at,
        }))
    }

    async fn deadline_passed(&self, order_id: u64) {
        let Ok(o) = self.load(order_id).await else {
            return;
        };
        if o.status != Status::Dispensing {
            return;
        }
        // Ok(None)/Err: a result (or another deadline) got there first.
        if let Ok(Some(_)) = self
            .transition(&o, &Event::DispenseDeadline, json!({}))
            .await
        {
            self.stats.unknown.fetch_add(1, Ordering::Relaxed);
            warn!(machine_no = %o.machine_no, order_id, "no result before the dispense deadline: unknown");
            self.inventory.release(o.machine_no, &o.lines);
        }
    }

    /// For orders restored at start-up: wait out the stored deadline.
    async fn watch_deadline(self: Arc<Self>, order_id: u64) {
        let Ok(o) = self.load(order_id).await else {
            return;
        };
        let left = o
            .dispense_deadline
            .and_then(|d| (d - Utc::now()).to_std().ok())
            .unwrap_or(Duration::ZERO);
        let (tx, rx) = oneshot::channel();
        self.settled.insert(order_id, tx);
        let got = tokio::select! {
            r = tokio::time::timeout(left, rx) => r.is_ok(),
            _ = self.shutdown.cancelled() => return,
        };
        self.settled.remove(&order_id);
        if !got {
            self.deadline_passed(order_id).await;
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

    /// `POST /orders/{id}/pay`: mark a `pay_later` order paid and dispatch it
    /// under the same online and accept rules as placing. Exactly one of a
    /// payment and the expiry wins (compare-and-set on the status).
    pub async fn pay(&self, merchant: &str, order_id: u64) -> Result<u64, OrderError> {
        self.pay_with(merchant, order_id, None).await
    }

    /// [`Self::pay`]; `forwarded`: another node sent it here, the owner,
    /// and stops waiting soon after this instant.
    pub async fn pay_with(
        &self,
        merchant: &str,
        order_id: u64,
        forwarded: Option<tokio::time::Instant>,
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
            if forwarded.is_none() {
                if let Some(remote) = self.remote.get() {
                    if remote.is_remote(&o.machine_no) {
                        return remote.pay(&o.machine_no, merchant, order_id).await;
                    }
                }
            }
            return Err(OrderError::Offline);
        }
        let (reply, answer) = oneshot::channel();
        let req = PlaceRequest {
            merchant: merchant.to_string(),
            machine_no: o.machine_no,
            lines: o.lines.iter().map(|l| (l.product_id, l.quantity)).collect(),
            out_trade_no: o.out_trade_no.clone(),
            pay_later: true,
            forwarded: forwarded.map(|dispatch_by| Forwarded {
                order_id,
                dispatch_by,
            }),
        };
        let job = Job {
            order_id,
            req,
            lines: o.lines.clone(),
            paid: Some(o.clone()),
            reply,
        };
        if self.queue(o.machine_no).try_send(job).is_err() {
            // Still unpaid, its stock still held: the merchant may retry.
            self.stats.busy.fetch_add(1, Ordering::Relaxed);
            return Err(OrderError::Busy);
        }
        answer.await.unwrap_or(Err(OrderError::Internal))
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
        if o.refund_amount <= 0 {
            return Err(OrderError::StateConflict);
        }
        if o.refunded_at.is_none() {
            let now = Utc::now();
            let ev = event("refunded", json!({ "refund_amount": o.refund_amount }));
            self.store.mark_refunded(order_id, now, &ev).await?;
        }
        self.load(order_id).await
    }

    /// One sweep over due orders, claimed with a lease so that sweeps on
    /// several nodes share the work (the status compare-and-set is the final
    /// guard): unpaid orders past their deadline expire and release their
    /// stock; dispensing orders past their deadline become `unknown`;
    /// dispatching orders nobody settled (their node died between sending
    /// the command and recording the answer) are given up with a cancel
    /// owed. Returns how many orders changed.
    pub async fn sweep_due(&self) -> Result<usize, OrderError> {
        const BATCH: usize = 256;
        let now = Utc::now();
        let lease_until = now + chrono::Duration::seconds(30);
        let slack = self.settings.accept_timeout + STALE_DISPATCH_SLACK;
        let stale_before = now - chrono::Duration::from_std(slack).unwrap_or(chrono::Duration::MAX);
        let mut changed = 0;
        for due in [
            Due::Unpaid,
            Due::DispenseDeadline,
            Due::StaleDispatch {
                updated_before: stale_before,
            },
        ] {
            let claimed = self
                .store
                .claim_due_orders(due, now, lease_until, BATCH)
                .await?;
            for o in claimed {
                let ev = match due {
                    Due::Unpaid => Event::PaymentExpired,
                    Due::DispenseDeadline => Event::DispenseDeadline,
                    Due::StaleDispatch { .. } => Event::NotAccepted("dispatch_lost".into()),
                };
                // A payment or a result racing this loses or wins on the CAS.
                if let Ok(Some(_)) = self.transition(&o, &ev, json!({ "by": "sweep" })).await {
                    changed += 1;
                    match due {
                        Due::Unpaid => {
                            info!(machine_no = %o.machine_no, order_id = o.order_id, "unpaid order expired; stock released")
                        }
                        Due::DispenseDeadline => {
                            self.stats.unknown.fetch_add(1, Ordering::Relaxed);
                            warn!(machine_no = %o.machine_no, order_id = o.order_id, "no result before the dispense deadline: unknown");
                        }
                        Due::StaleDispatch { .. } => {
                            warn!(machine_no = %o.machine_no, order_id = o.order_id, "dispatching order left by a stopped node given up; cancel owed")
                        }
                    }
                    self.release(o.machine_no, &o.lines);
                }
            }
        }
        Ok(changed)
    }

    /// Give an order's reservation back, here and (cluster mode) on the
    /// node that holds the machine.
    fn release(&self, m: MachineNo, lines: &[Line]) {
        self.inventory.release(m, lines);
        if !self.presence.is_online(&m) {
            if let Some(r) = self.remote.get() {
                r.released(&m, lines);
            }
        }
    }

    /// Cluster mode: machine `m` just connected to this node. Its stock
    /// figures come with its inventory snapshot; the quantities held by its
    /// open orders are rebuilt from storage (the node that held it before
    /// had them in memory).
    pub async fn adopt(&self, m: MachineNo) {
        match self.store.open_orders(&m).await {
            Ok(open) => {
                let lines: Vec<Line> = open.into_iter().flat_map(|o| o.lines).collect();
                self.inventory.set_reserved(m, &lines);
            }
            Err(e) => {
                warn!(machine_no = %m, error = %e, "could not rebuild the machine's reservations")
            }
        }
    }

    /// Deliver the cancels owed to machines as they come online (on this
    /// node). A machine subscribes right after CONNACK, so delivery is
    /// retried briefly.
    pub fn spawn_cancel_delivery(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let me = self.clone();
        let mut rx = self.presence.subscribe();
        tokio::spawn(async move {
            loop {
                let ev = tokio::select! {
                    _ = me.shutdown.cancelled() => return,
                    ev = rx.recv() => ev,
                };
                match ev {
                    Ok(ev) if ev.online => me.clone().deliver_cancels(ev.machine_no, ev.epoch),
                    Ok(_) => continue,
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                        // Missed events: try every machine online here.
                        for p in me.presence.snapshot() {
                            if p.online {
                                me.clone().deliver_cancels(p.machine_no, p.epoch);
                            }
                        }
                    }
                    Err(_) => return,
                }
            }
        })
    }

    fn deliver_cancels(self: Arc<Self>, m: MachineNo, epoch: u64) {
        tokio::spawn(async move {
            let ids = match self.store.pending_cancels(&m).await {
                Ok(ids) => ids,
                Err(e) => {
                    warn!(machine_no = %m, error = %e, "could not read the cancels owed");
                    return;
                }
            };
            for id in ids {
                let payload = Bytes::from(msg::encode(&CancelCmd { order_id: id }));
                for _ in 0..50 {
                    // This connection only: a later one delivers them itself.
                    if self.presence.online_epoch(&m) != Some(epoch) {
                        return;
                    }
                    if self
                        .commands
                        .send(&m, Command::Cancel, payload.clone())
                        .await
                        .is_ok()
                    {
                        let ev = event(
                            "cancel_sent",
                            json!({ "delivered": true, "after": "reconnect" }),
                        );
                        let _ = self.store.append_order_event(id, &ev).await;
                        let _ = self.store.cancel_delivered(id).await;
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        });
    }

    /// Runs [`Self::sweep_due`] until shutdown.
    pub fn spawn_expiry(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let me = self.clone();
        let period = (self.settings.unpaid_timeout / 4)
            .clamp(Duration::from_millis(50), Duration::from_secs(1));
        tokio::spawn(async move {
            loop {
                if let Err(e) = me.sweep_due().await {
                    warn!(error = %e, "order sweep failed");
                }
                tokio::select! {
                    _ = me.shutdown.cancelled() => return,
                    _ = tokio::time::sleep(period) => {}
                }
            }
        })
    }

    fn on_ack(&self, m: MachineNo, payload: &Bytes) {
        let Ok(ack) = msg::decode::<AckMsg>(payload) else {
            self.stats
                .malformed_device_messages
                .fetch_add(1, Ordering::Relaxed);
            return;
        };
        // Only the machine the order was sent to can answer for it.
        let waiting = self.acks.remove_if(&ack.order_id, |_, (mm, _)| *mm == m);
        match waiting {
            Some((_, (_, tx))) => {
                let _ = tx.send(ack);
            }
            None => {
                self.stats
                    .duplicate_device_messages
                    .fetch_add(1, Ordering::Relaxed);
                debug!(machine_no = %m, order_id = ack.order_id, "ack for no waiting order (late, duplicate or foreign)");
                if ack.accepted {
                    // A late acceptance of an order we gave up on: repeat the cancel.
                    if let Some(me) = self.me.upgrade() {
                        tokio::spawn(async move { me.late_accept(m, ack.order_id).await });
                    }
                }
            }
        }
    }

    /// Whether order `id` is in flight and waiting for its machine's ack
    /// (the hostile-input harness plays the machine's answers).
    pub(crate) fn awaiting_ack(&self, id: u64) -> bool {
        self.acks.contains_key(&id)
    }

    async fn late_accept(&self, m: MachineNo, order_id: u64) {
        let Ok(Some(o)) = self.store.order(order_id).await else {
            return;
        };
        if o.machine_no == m && o.status == Status::Rejected {
            warn!(machine_no = %m, order_id, "machine accepted an order after it was given up; cancelling again");
            let _ = self.send_cancel(m, order_id).await;
        }
    }

    /// Apply a machine's result. `pub(crate)` so the hostile-input harness
    /// (`fuzzing`) can await it instead of the dispatcher's spawned task.
    pub(crate) async fn on_result(&self, m: MachineNo, payload: Bytes) {
        let Ok(r) = msg::decode::<ResultMsg>(&payload) else {
            self.stats
                .malformed_device_messages
                .fetch_add(1, Ordering::Relaxed);
            return;
        };
        let Ok(Some(o)) = self.store.order(r.order_id).await else {
            self.stats
                .rejected_device_messages
                .fetch_add(1, Ordering::Relaxed);
            warn!(machine_no = %m, order_id = r.order_id, "result for an unknown order dropped");
            return;
        };
        if o.machine_no != m {
            self.stats
                .rejected_device_messages
                .fetch_add(1, Ordering::Relaxed);
            warn!(machine_no = %m, order_id = r.order_id, "result for another machine's order dropped");
            return;
        }
        let items: Vec<(i64, u32, u32)> = r
            .items
            .iter()
            .map(|i| (i.product_id, i.quantity, i.dispensed))
            .collect();
        // A result implies acceptance: it can overtake the ack's bookkeeping.
        // Only one that fits the order, though: an ill-fitting result is
        // dropped (PROTOCOL.md gateway rule 3) and must not turn an order the
        // machine may still refuse into `dispensing` (the merchant would be
        // told 30005 while the order went on to `unknown`).
        if o.status == Status::Dispatching && check_result(&o.as_state(), &items).is_err() {
            self.reject_result(m, &o, &r).await;
            return;
        }
        let ev = Event::Result {
            items,
            error: r.error.clone(),
        };
        let mut o = o;
        if o.status == Status::Dispatching {
            match self
                .transition(&o, &Event::Accepted, json!({ "implied_by": "result" }))
                .await
            {
                Ok(_) => match self.load(o.order_id).await {
                    Ok(n) => o = n,
                    Err(_) => return,
                },
                Err(_) => return,
            }
        }
        let held = o.status.holds_reservation();
        match self.transition(&o, &ev, json!({ "items": r.items })).await {
            Ok(Some(next)) => {
                self.stats.results_applied.fetch_add(1, Ordering::Relaxed);
                info!(machine_no = %m, order_id = o.order_id, status = next.status.as_str(), "order settled");
                // An unknown order's reservation went at its deadline.
                if held {
                    self.inventory.release(m, &next.lines);
                }
                if let Some((_, tx)) = self.settled.remove(&o.order_id) {
                    let _ = tx.send(());
                }
            }
            Ok(None) => {
                self.stats
                    .duplicate_device_messages
                    .fetch_add(1, Ordering::Relaxed);
            }
            Err(_) => self.reject_result(m, &o, &r).await,
        }
    }

    /// Counts and records a result that does not fit its order; the order
    /// itself is left as it is.
    async fn reject_result(&self, m: MachineNo, o: &StoredOrder, r: &ResultMsg) {
        self.stats
            .rejected_device_messages
            .fetch_add(1, Ordering::Relaxed);
        warn!(machine_no = %m, order_id = o.order_id, status = o.status.as_str(), "result does not fit the order; dropped");
        let _ = self
            .store
            .append_order_event(
                o.order_id,
                &event(
                    "result_rejected",
                    json!({ "items": r.items, "error": r.error }),
                ),
            )
            .await;
    }

    fn on_inventory(&self, m: MachineNo, payload: &Bytes) {
        match msg::decode::<InventoryMsg>(payload) {
            Ok(inv) => {
                self.inventory.set_snapshot(m, &inv.items);
                let _ = self.inventory_writes.send((m, inv.items));
            }
            Err(_) => {
                self.stats
                    .malformed_device_messages
                    .fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// Why a rejected order was rejected, for answering repeats: the gateway's
/// own reasons are delivery failures (30002); anything else is the machine's
/// refusal reason (30005).
/// How long a requester keeps trying to record the give-up of an order
/// whose owner's answer was lost.
const GIVE_UP_PATIENCE: Duration = Duration::from_secs(15);

/// A `dispatching` order older than the accept timeout plus this was left
/// by a node that stopped: a live node settles it within the accept timeout
/// (forwarded requests wait `owner_answer_slack` longer, well below this).
const STALE_DISPATCH_SLACK: Duration = Duration::from_secs(15);

/// Whether giving up with `ev` leaves a dispense command that may have
/// reached the machine: a cancel is then owed until one is handed over.
/// A command that was never handed to a connection owes none.
fn owes_cancel(ev: &Event) -> bool {
    matches!(ev, Event::NotAccepted(r) if !r.starts_with("not_delivered") && r != "queue_full")
}

/// The merchant's answer for an order placed earlier (a repeat, or one
/// whose owner's answer was lost).
fn outcome(o: &StoredOrder) -> Result<u64, OrderError> {
    match o.status {
        Status::Rejected => match o.error.as_deref() {
            Some(e) if is_delivery_failure(e) => Err(OrderError::Offline),
            Some(reason) => Err(OrderError::Refused(reason.to_string())),
            None => Err(OrderError::Offline),
        },
        Status::Dispatching => Err(OrderError::Offline),
        _ => Ok(o.order_id),
    }
}

fn is_delivery_failure(error: &str) -> bool {
    matches!(
        error,
        "accept_timeout" | "gateway_restart" | "dispatch_lost" | "owner_lost"
    ) || error.starts_with("not_delivered")
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

struct Accepted {
    order_id: u64,
    settled: oneshot::Receiver<()>,
}

/// Persists inventory snapshots in arrival order, off the edge's tasks.
async fn inventory_writer(
    store: Arc<dyn Storage>,
    mut rx: mpsc::UnboundedReceiver<(MachineNo, Vec<msg::InventoryItem>)>,
    shutdown: CancellationToken,
) {
    /// Most snapshots written in one transaction.
    const BATCH: usize = 1024;
    loop {
        let first = tokio::select! {
            biased;
            n = rx.recv() => n,
            // Drain what is queued, then stop.
            _ = shutdown.cancelled() => rx.try_recv().ok(),
        };
        let Some(first) = first else { return };
        // Whatever else is queued goes in the same transaction; a machine's
        // later snapshot replaces its earlier one (arrival order is kept).
        let mut batch: Vec<(MachineNo, Vec<msg::InventoryItem>)> = vec![first];
        while batch.len() < BATCH {
            match rx.try_recv() {
                Ok((m, items)) => match batch.iter_mut().find(|(bm, _)| *bm == m) {
                    Some(slot) => slot.1 = items,
                    None => batch.push((m, items)),
                },
                Err(_) => break,
            }
        }
        if let Err(e) = store.put_inventories(&batch, Utc::now()).await {
            warn!(machines = batch.len(), error = %e, "inventory snapshots not persisted");
        }
    }
}

/// Uplinks routed to the order side.
pub struct OrderUplinks(pub Arc<OrderService>);

impl UplinkHandler for OrderUplinks {
    fn on_uplink(&self, machine_no: MachineNo, _epoch: u64, kind: Uplink, payload: &Bytes) {
        match kind {
            Uplink::Inventory => self.0.on_inventory(machine_no, payload),
            Uplink::Ack => self.0.on_ack(machine_no, payload),
            Uplink::Result => {
                let svc = self.0.clone();
                let payload = payload.clone();
                tokio::spawn(async move { svc.on_result(machine_no, payload).await });
            }
            Uplink::State | Uplink::Pong => {}
        }
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
        }
    }
}
