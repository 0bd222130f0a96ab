//! Stored transitions and everything that settles orders after their
//! answer: the compare-and-set every change goes through (with its webhooks
//! in the same transaction), dispense deadlines, the sweeps that expire
//! unpaid orders and give up lost ones, recovery at start-up, cancels owed
//! to machines, and cluster mode's settling of orders whose owner's answer
//! was lost.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use serde_json::json;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use vendgate_proto::machine::MachineNo;
use vendgate_proto::msg::{self, CancelCmd, GoCmd};
use vendgate_proto::topic::Command;

use super::{event, fingerprint, outcome, OrderError, OrderService, PlaceRequest};
use crate::domain::order::{
    apply, notices, Event, GiveUp, Line, Notice, Order, Status, Transition, TransitionError,
};
use crate::domain::webhook::{order_event, OrderFacts};
use crate::storage::{
    Due, NewOrder, NewOutboxEvent, OrderChange, Storage, StorageError, StoredOrder,
};

/// A `dispatching` order older than the accept timeout plus this was left
/// by a node that stopped: a live node settles it by its request's deadline
/// (forwarded requests wait `owner_answer_slack` longer, well below this).
const STALE_DISPATCH_SLACK: Duration = Duration::from_secs(15);

/// How long a cancel waits for the machine's acknowledgement before it is
/// left owed (delivered again on the machine's next connection).
const CANCEL_ACK_WAIT: Duration = Duration::from_secs(2);

/// Conditions and values of one stored change beyond what the event says.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct ChangeOpts {
    /// The new `accept_by` (a payment moving the order to `dispatching`).
    pub accept_by: Option<DateTime<Utc>>,
    /// The acceptance compare-and-set: only while `accept_by` is later.
    pub only_before_accept_by: Option<DateTime<Utc>>,
}

/// The outcome of one compare-and-set attempt.
pub(crate) enum Cas {
    /// Written: the order as it now is.
    Changed(Order),
    /// A repeat of something already applied: nothing to write.
    Unchanged,
    /// The stored order moved on, or (with `only_before_accept_by`) its
    /// `accept_by` has passed: nothing written.
    Missed,
}

impl OrderService {
    /// Apply `ev` to the stored order with a compare-and-set on its status,
    /// retrying on a lost race. Returns the new order when this call changed
    /// it, None when the event was a no-op (duplicate).
    pub(super) async fn transition(
        &self,
        stored: &StoredOrder,
        ev: &Event,
        detail: serde_json::Value,
    ) -> Result<Option<Order>, OrderError> {
        let mut current = stored.clone();
        for _ in 0..8 {
            match self
                .change_once(&current, ev, detail.clone(), ChangeOpts::default())
                .await?
            {
                Cas::Changed(n) => return Ok(Some(n)),
                Cas::Unchanged => return Ok(None),
                // Lost a race (a result overtook the ack, say): reload and retry.
                Cas::Missed => current = self.load(current.order_id).await?,
            }
        }
        Err(OrderError::StateConflict)
    }

    /// One compare-and-set attempt of `ev` on `current`, no retry.
    pub(crate) async fn change_once(
        &self,
        current: &StoredOrder,
        ev: &Event,
        detail: serde_json::Value,
        opts: ChangeOpts,
    ) -> Result<Cas, OrderError> {
        let before = current.as_state();
        let next = match apply(&before, ev) {
            Ok(Transition::Changed(n)) => n,
            Ok(Transition::Unchanged) => return Ok(Cas::Unchanged),
            Err(TransitionError::Conflict(_) | TransitionError::BadResult(_)) => {
                return Err(OrderError::StateConflict)
            }
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
            cancel_pending: ev.owes_cancel(),
            accept_by: opts.accept_by.or(current.accept_by),
            only_before_accept_by: opts.only_before_accept_by,
            at: now,
        };
        let mut d = detail;
        if let Some(obj) = d.as_object_mut() {
            obj.insert("status".into(), json!(next.status.as_str()));
            if let Some(e) = &next.error {
                obj.insert("error".into(), json!(e));
            }
        }
        let outbox = self.webhooks_for(current, &before, &next, now).await?;
        if !self
            .store
            .update_order(
                current.order_id,
                current.status,
                &change,
                &event(ev.kind(), d),
                &outbox,
            )
            .await?
        {
            return Ok(Cas::Missed);
        }
        if !outbox.is_empty() {
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
        Ok(Cas::Changed(next))
    }

    /// `pay_later` paid right before its command leaves: `dispatching`
    /// with its `accept_by`. False when the expiry (or another payment) won.
    pub(super) async fn pay_transition(
        &self,
        o: &StoredOrder,
        accept_by: DateTime<Utc>,
    ) -> Result<bool, OrderError> {
        let opts = ChangeOpts {
            accept_by: Some(accept_by),
            only_before_accept_by: None,
        };
        Ok(matches!(
            self.change_once(o, &Event::Paid, json!({}), opts).await?,
            Cas::Changed(n) if n.status == Status::Dispatching
        ))
    }

    /// The merchant's webhooks for a change (API.md "Notifications to the
    /// merchant"), if it has a `notify_url`. Written in the same
    /// transaction as the change.
    async fn webhooks_for(
        &self,
        o: &StoredOrder,
        before: &Order,
        next: &Order,
        at: DateTime<Utc>,
    ) -> Result<Vec<NewOutboxEvent>, OrderError> {
        let kinds = notices(before, next);
        if kinds.is_empty() {
            return Ok(Vec::new());
        }
        let Some(merchant) = self.store.merchant(&o.merchant_appid).await? else {
            return Ok(Vec::new());
        };
        if merchant.notify_url.is_none() {
            return Ok(Vec::new());
        }
        Ok(kinds
            .into_iter()
            .map(|kind| order_webhook(o, next, kind, at))
            .collect())
    }

    pub(super) async fn deadline_passed(&self, order_id: u64) {
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
        let (tx, rx) = tokio::sync::oneshot::channel();
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

    /// Start-up: load stock snapshots, re-hold reservations of open orders,
    /// give up on orders that were dispatching when the process stopped
    /// (their merchant never got an answer, and no `go` left for them),
    /// and re-arm dispense deadlines.
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
                    // owed, delivered when the machine is back.
                    let _ = self
                        .transition(&o, &Event::NotAccepted(GiveUp::GatewayRestart), json!({}))
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

    /// One sweep over due orders, claimed with a lease so that sweeps on
    /// several nodes share the work (the status compare-and-set is the final
    /// guard): unpaid orders past their deadline expire and release their
    /// stock; dispensing orders past their deadline become `unknown`;
    /// dispatching orders nobody settled (their node died between sending
    /// the command and recording the answer, or storage failed when it
    /// tried) are given up with a cancel owed. Returns how many changed.
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
                    Due::StaleDispatch { .. } => Event::NotAccepted(GiveUp::DispatchLost),
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
                            warn!(machine_no = %o.machine_no, order_id = o.order_id, "dispatching order left unsettled given up; cancel owed")
                        }
                    }
                    self.release(o.machine_no, &o.lines);
                }
            }
        }
        Ok(changed)
    }

    /// Runs [`Self::sweep_due`] until shutdown: unpaid expiries, dispense
    /// deadlines of orders no worker watches, and lost dispatches.
    pub fn spawn_sweeps(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
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

    /// Give an order's reservation back, here and (cluster mode) on the
    /// node that holds the machine.
    pub(super) fn release(&self, m: MachineNo, lines: &[Line]) {
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

    /// Send the cancel a give-up owes, now, in the background (waiting for
    /// the machine's acknowledgement must not delay any answer); recorded as
    /// delivered once the machine acknowledged it, else left owed for its
    /// next connection.
    pub(super) fn cancel_now(&self, m: MachineNo, order_id: u64) {
        let Some(me) = self.me.upgrade() else { return };
        tokio::spawn(async move {
            match me.send_cancel(m, order_id).await {
                Ok(()) => {
                    let _ = me.store.cancel_delivered(order_id).await;
                }
                Err(e) => {
                    debug!(machine_no = %m, order_id, error = %e, "cancel not acknowledged; owed")
                }
            }
        });
    }

    /// A cancel to machine `m`; Ok once the machine acknowledged it (within
    /// [`CANCEL_ACK_WAIT`]).
    pub(super) async fn send_cancel(
        &self,
        m: MachineNo,
        order_id: u64,
    ) -> Result<(), crate::commands::DeliveryError> {
        let r = self
            .commands
            .send_confirmed(
                &m,
                Command::Cancel,
                Bytes::from(msg::encode(&CancelCmd { order_id })),
                CANCEL_ACK_WAIT,
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

    /// Deliver what machines are owed as they come online (on this node):
    /// the cancels of orders given up after their command may have left,
    /// and the `go` of accepted orders with no result yet (it may have been
    /// lost with the old connection; a machine that still holds the order
    /// dispenses it, one that does not answers `no_go`, so nothing can be
    /// dispensed twice or late). A machine subscribes right after CONNACK,
    /// so delivery is retried briefly.
    pub fn spawn_owed_delivery(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let me = self.clone();
        let mut rx = self.presence.subscribe();
        tokio::spawn(async move {
            loop {
                let ev = tokio::select! {
                    _ = me.shutdown.cancelled() => return,
                    ev = rx.recv() => ev,
                };
                match ev {
                    Ok(ev) if ev.online => me.clone().deliver_owed(ev.machine_no, ev.epoch),
                    Ok(_) => continue,
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                        // Missed events: try every machine online here.
                        for p in me.presence.snapshot() {
                            if p.online {
                                me.clone().deliver_owed(p.machine_no, p.epoch);
                            }
                        }
                    }
                    Err(_) => return,
                }
            }
        })
    }

    fn deliver_owed(self: Arc<Self>, m: MachineNo, epoch: u64) {
        tokio::spawn(async move {
            let cancels = match self.store.pending_cancels(&m).await {
                Ok(ids) => ids,
                Err(e) => {
                    warn!(machine_no = %m, error = %e, "could not read the cancels owed");
                    return;
                }
            };
            let goes: Vec<u64> = match self.store.open_orders(&m).await {
                Ok(open) => open
                    .into_iter()
                    .filter(|o| o.status == Status::Dispensing && !o.result_applied)
                    .map(|o| o.order_id)
                    .collect(),
                Err(e) => {
                    warn!(machine_no = %m, error = %e, "could not read the orders owed a go");
                    Vec::new()
                }
            };
            let owed = cancels
                .into_iter()
                .map(|id| (Command::Cancel, id))
                .chain(goes.into_iter().map(|id| (Command::Go, id)));
            for (command, id) in owed {
                let payload = Bytes::from(match command {
                    Command::Go => msg::encode(&GoCmd { order_id: id }),
                    _ => msg::encode(&CancelCmd { order_id: id }),
                });
                // 50 × 100 ms: the machine's subscription follows its CONNACK.
                for _ in 0..50 {
                    // This connection only: a later one delivers them itself.
                    if self.presence.online_epoch(&m) != Some(epoch) {
                        return;
                    }
                    if self
                        .commands
                        .send(&m, command, payload.clone())
                        .await
                        .is_ok()
                    {
                        let kind = if command == Command::Go {
                            "go_sent"
                        } else {
                            "cancel_sent"
                        };
                        let ev = event(kind, json!({ "delivered": true, "after": "reconnect" }));
                        let _ = self.store.append_order_event(id, &ev).await;
                        if command == Command::Cancel {
                            let _ = self.store.cancel_delivered(id).await;
                        }
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        });
    }

    /// Cluster mode: the owning node's answer about a forwarded order never
    /// came (or its caller went away) and storage has no order `order_id`.
    /// The owner may still be about to store it (it was paused between its
    /// last check and the insert): store it here first, given up, so the
    /// owner's insert finds the id taken and the order never starts. If the
    /// owner got there first, settle what it stored.
    pub(crate) async fn record_lost(
        &self,
        req: &PlaceRequest,
        order_id: u64,
        why: GiveUp,
        answer_by: Instant,
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
            // Never acceptable: it is given up right away.
            accept_by: Some(now),
        };
        let ev = event("created", json!({ "by": "requester", "owner_lost": true }));
        match self.store.insert_order(&new, &ev).await {
            Ok(()) => {
                let stored = self.load(order_id).await?;
                // Never sent (the owner cannot store it now): no cancel owed.
                let why = GiveUp::NotDelivered(why.as_str().into_owned());
                let _ = self
                    .transition(&stored, &Event::NotAccepted(why), json!({}))
                    .await;
                Err(OrderError::Offline)
            }
            Err(StorageError::Duplicate("order")) => {
                self.give_up_lost(self.load(order_id).await?, why, answer_by)
                    .await
            }
            Err(StorageError::Duplicate("out_trade_no")) => {
                let otn = req.out_trade_no.as_deref().unwrap_or("");
                match self.store.order_by_out_trade_no(&req.merchant, otn).await? {
                    Some(o) => self.give_up_lost(o, why, answer_by).await,
                    None => Err(OrderError::NotAccepted),
                }
            }
            // Nothing stored here; whatever the owner did is decided by
            // its `accept_by`, which has passed or will before anyone
            // could accept it for this caller: 30002.
            Err(_) => Err(OrderError::NotAccepted),
        }
    }

    /// Cluster mode: the owning node's answer about `o` never came (it died
    /// with the request, or the answer was lost), or the caller went away.
    /// A `dispatching` order is given up with a cancel owed (sent now if
    /// the machine is reachable, else when it reconnects); an order the
    /// owner did settle is answered from what it recorded. The dispense is
    /// never sent again. Bounded by `answer_by`: past it, an order still
    /// `dispatching` can no longer be accepted (its `accept_by` is earlier),
    /// so 30002 is the truth and the sweep records the give-up.
    pub(crate) async fn give_up_lost(
        &self,
        mut o: StoredOrder,
        why: GiveUp,
        answer_by: Instant,
    ) -> Result<u64, OrderError> {
        loop {
            if o.status != Status::Dispatching {
                return outcome(&o);
            }
            match self
                .transition(&o, &Event::NotAccepted(why.clone()), json!({}))
                .await
            {
                Ok(Some(_)) => {
                    self.stats.not_accepted.fetch_add(1, Ordering::Relaxed);
                    self.release(o.machine_no, &o.lines);
                    self.cancel_now(o.machine_no, o.order_id);
                    return Err(OrderError::NotAccepted);
                }
                // Changed under us (the owner recorded the ack after all), or
                // storage could not take the write yet.
                Ok(None) | Err(_) => {
                    if Instant::now() >= answer_by {
                        return Err(OrderError::NotAccepted);
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    o = self.load(o.order_id).await?;
                }
            }
        }
    }
}

/// A merchant's webhook about one order, as its outbox row (the body is
/// built by [`crate::domain::webhook::order_event`]).
fn order_webhook(o: &StoredOrder, next: &Order, kind: Notice, at: DateTime<Utc>) -> NewOutboxEvent {
    let facts = OrderFacts {
        order_id: o.order_id,
        machine_no: o.machine_no,
        out_trade_no: o.out_trade_no.as_deref(),
        amount: o.amount,
    };
    let hook = order_event(facts, next, kind, at);
    NewOutboxEvent {
        event_id: hook.event_id,
        merchant_appid: o.merchant_appid.clone(),
        order_key: format!("order:{}", o.order_id),
        order_id: Some(o.order_id),
        machine_no: Some(o.machine_no),
        kind: kind.as_str().to_string(),
        body: hook.body,
        created_at: at,
    }
}

/// Inventory snapshots waiting to be persisted: the latest per machine.
#[derive(Debug, Default)]
pub(crate) struct PendingSnapshots {
    latest: std::sync::Mutex<std::collections::HashMap<MachineNo, Vec<msg::InventoryItem>>>,
    ready: tokio::sync::Notify,
}

impl PendingSnapshots {
    pub(crate) fn put(&self, m: MachineNo, items: Vec<msg::InventoryItem>) {
        if let Ok(mut l) = self.latest.lock() {
            l.insert(m, items);
        }
        self.ready.notify_one();
    }

    /// Up to `n` pending snapshots, removed.
    fn take(&self, n: usize) -> Vec<(MachineNo, Vec<msg::InventoryItem>)> {
        let Ok(mut l) = self.latest.lock() else {
            return Vec::new();
        };
        let keys: Vec<MachineNo> = l.keys().take(n).copied().collect();
        keys.into_iter()
            .filter_map(|k| l.remove(&k).map(|v| (k, v)))
            .collect()
    }
}

/// Persists inventory snapshots off the edge's tasks, many machines per
/// transaction; whatever is pending at shutdown is written before it ends.
pub(super) async fn inventory_writer(
    store: Arc<dyn Storage>,
    pending: Arc<PendingSnapshots>,
    shutdown: CancellationToken,
) {
    /// Most snapshots written in one transaction.
    const BATCH: usize = 1024;
    loop {
        let batch = pending.take(BATCH);
        if batch.is_empty() {
            if shutdown.is_cancelled() {
                return;
            }
            tokio::select! {
                _ = pending.ready.notified() => {}
                _ = shutdown.cancelled() => {}
            }
            continue;
        }
        if let Err(e) = store.put_inventories(&batch, Utc::now()).await {
            warn!(machines = batch.len(), error = %e, "inventory snapshots not persisted");
        }
    }
}
