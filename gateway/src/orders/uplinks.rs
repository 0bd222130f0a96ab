//! What machines tell the order side: `ack` (where the dispense decision is
//! made: PROTOCOL.md gateway rule 4), `result` (rules 5–6) and `inventory`.
//! Acks and results need storage, so they wait in one bounded queue and run
//! on a bounded number of tasks; a flood beyond that is counted and dropped
//! rather than queued without end (machines are rate limited at the edge,
//! so an honest fleet never reaches it).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use chrono::Utc;
use serde_json::json;
use tokio::sync::{mpsc, Semaphore};
use tracing::{info, warn};
use vendgate_proto::machine::MachineNo;
use vendgate_proto::msg::{self, AckMsg, InventoryMsg, ResultMsg};
use vendgate_proto::topic::Uplink;

use super::inventory::Inventory;
use super::stock::PendingSnapshots;
use super::ticket::{Begin, Decision};
use super::transition::{Cas, ChangeOpts};
use super::{OrderError, OrderService, OrderStats};
use crate::domain::order::{check_result, Event, GiveUp, Order, Status};
use crate::edge::UplinkHandler;
use crate::storage::StoredOrder;

/// Acks and results waiting for a task, at most.
pub(super) const WORK_QUEUE: usize = 4096;

/// Acks and results being handled at once, at most.
const WORKERS: usize = 256;

/// One ack or result to handle.
pub struct Work {
    machine: MachineNo,
    kind: Uplink,
    payload: Bytes,
}

/// At most one WARN a second for machine messages that fit no order (a
/// stolen credential must not be able to fill the log); the rest count.
#[derive(Debug, Default)]
struct LogGate {
    second: AtomicU64,
}

impl LogGate {
    fn allow(&self) -> bool {
        let now = u64::try_from(Utc::now().timestamp()).unwrap_or(0);
        self.second.swap(now, Ordering::Relaxed) != now
    }
}

static UNMATCHED_LOG: LogGate = LogGate {
    second: AtomicU64::new(0),
};

/// The order side's end of machine uplinks: built before the hub, which
/// delivers to it, and before the order service, which drains it (so
/// neither waits for the other to exist). Inventory snapshots are applied
/// at once, on the edge's task; acks and results wait in a queue of
/// [`WORK_QUEUE`] for the service's workers.
pub struct OrderIntake {
    inventory: Arc<Inventory>,
    writes: Arc<PendingSnapshots>,
    stats: Arc<OrderStats>,
    work: mpsc::Sender<Work>,
}

/// What the order service takes over from [`intake`]: the queue's
/// receiving end and the state the intake shares with it.
pub struct IntakeQueue {
    pub(super) inventory: Arc<Inventory>,
    pub(super) writes: Arc<PendingSnapshots>,
    pub(super) stats: Arc<OrderStats>,
    pub(super) work: mpsc::Receiver<Work>,
}

/// The two ends of the order side's uplink intake.
pub fn intake() -> (Arc<OrderIntake>, IntakeQueue) {
    let inventory = Arc::new(Inventory::default());
    let writes = Arc::new(PendingSnapshots::default());
    let stats = Arc::new(OrderStats::default());
    let (tx, rx) = mpsc::channel(WORK_QUEUE);
    (
        Arc::new(OrderIntake {
            inventory: inventory.clone(),
            writes: writes.clone(),
            stats: stats.clone(),
            work: tx,
        }),
        IntakeQueue {
            inventory,
            writes,
            stats,
            work: rx,
        },
    )
}

impl UplinkHandler for OrderIntake {
    fn on_uplink(&self, machine: MachineNo, _epoch: u64, kind: Uplink, payload: &Bytes) {
        match kind {
            Uplink::Inventory => self.on_inventory(machine, payload),
            Uplink::Ack | Uplink::Result => {
                let work = Work {
                    machine,
                    kind,
                    payload: payload.clone(),
                };
                if self.work.try_send(work).is_err() {
                    self.stats
                        .uplinks_overloaded
                        .fetch_add(1, Ordering::Relaxed);
                }
            }
            Uplink::State | Uplink::Pong => {}
        }
    }
}

impl OrderIntake {
    fn on_inventory(&self, m: MachineNo, payload: &Bytes) {
        match msg::decode::<InventoryMsg>(payload) {
            // A negative price would make amounts and refunds negative: the
            // snapshot is malformed, and the last good one stays.
            Ok(inv) if inv.items.iter().any(|i| i.price < 0) => {
                self.stats
                    .malformed_device_messages
                    .fetch_add(1, Ordering::Relaxed);
            }
            Ok(inv) => {
                self.inventory.set_snapshot(m, &inv.items);
                self.writes.put(m, inv.items);
            }
            Err(_) => {
                self.stats
                    .malformed_device_messages
                    .fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

impl OrderService {
    /// Start the task that takes acks and results off the intake's queue.
    pub(super) fn spawn_uplink_workers(self: &Arc<Self>, mut rx: mpsc::Receiver<Work>) {
        let me = Arc::downgrade(self);
        let shutdown = self.shutdown.clone();
        tokio::spawn(async move {
            let permits = Arc::new(Semaphore::new(WORKERS));
            loop {
                let work = tokio::select! {
                    w = rx.recv() => match w { Some(w) => w, None => return },
                    _ = shutdown.cancelled() => return,
                };
                let Ok(permit) = permits.clone().acquire_owned().await else {
                    return;
                };
                let Some(svc) = me.upgrade() else { return };
                tokio::spawn(async move {
                    svc.handle(work).await;
                    drop(permit);
                });
            }
        });
    }

    async fn handle(&self, w: Work) {
        match w.kind {
            Uplink::Ack => self.on_ack(w.machine, &w.payload).await,
            Uplink::Result => self.on_result(w.machine, w.payload).await,
            _ => {}
        }
    }

    /// An ack: record the machine's answer and decide. On an acceptance,
    /// the compare-and-set `dispatching → dispensing` succeeds only before
    /// the order's `accept_by`; then `go` leaves (and the merchant hears 0).
    /// A CAS that finds the order given up sends a cancel; one that finds
    /// it `dispensing` or later is a repeat and sends nothing; a storage
    /// error counts as a failed CAS.
    pub(crate) async fn on_ack(&self, m: MachineNo, payload: &Bytes) {
        let Ok(ack) = msg::decode::<AckMsg>(payload) else {
            self.stats
                .malformed_device_messages
                .fetch_add(1, Ordering::Relaxed);
            return;
        };
        let id = ack.order_id;
        // Only the machine the order was sent to can answer for it.
        let ticket = self
            .inflight
            .get(&id)
            .filter(|t| t.machine == m)
            .map(|t| t.clone());
        // Whether this node's waiter takes the decision; None: no waiter
        // here (another node holds the request, or it was abandoned).
        let mut deciding = None;
        if let Some(t) = &ticket {
            match t.begin_decision() {
                Begin::Deciding => deciding = Some(t.clone()),
                Begin::Repeat => {
                    self.stats
                        .duplicate_device_messages
                        .fetch_add(1, Ordering::Relaxed);
                    return;
                }
                // This node gave the order up (its merchant may have been
                // answered 30002 already): it never sends `go` for it.
                Begin::Abandoned => {
                    self.withhold(m, id, ack.accepted, &|_| true).await;
                    return;
                }
            }
        }
        let decide = |d: Decision| deciding.as_ref().is_none_or(|t| t.decide(d));
        // When the command left rides on the decision's own timeline event.
        let sent = ticket
            .as_ref()
            .map_or_else(|| json!({}), |t| t.sent_detail());
        // A first ack finds its order cached as `dispatching` (module
        // `open`: the CAS below proves the guess); anything else is read.
        let cached = self.open.get(id, Status::Dispatching).map(Ok);
        let found = match cached {
            Some(o) => o.map(Some),
            None => self.store.order(id).await,
        };
        let o = match found {
            Ok(Some(o)) if o.machine_no == m => o,
            // An ack for no order of this machine: a stray (late, repeated
            // or foreign) one, counted as such.
            Ok(_) => {
                decide(Decision::NotAccepted);
                self.stats
                    .duplicate_device_messages
                    .fetch_add(1, Ordering::Relaxed);
                return;
            }
            Err(e) => {
                warn!(machine_no = %m, order_id = id, error = %e, "ack not recorded: storage failed");
                self.withhold(m, id, ack.accepted, &decide).await;
                return;
            }
        };
        if !ack.accepted {
            self.stats.refused.fetch_add(1, Ordering::Relaxed);
            let reason = ack.reason.clone().unwrap_or_else(|| "refused".into());
            let decision = match self
                .transition(&o, &Event::Refused(reason.clone()), sent)
                .await
            {
                Ok(Some(_)) => Decision::Refused(reason),
                _ => match self.store.order(id).await {
                    Ok(Some(now)) => Decision::Stored(Box::new(now)),
                    _ => Decision::NotAccepted,
                },
            };
            decide(decision);
            return;
        }
        let opts = ChangeOpts {
            accept_by: None,
            only_before_accept_by: Some(Utc::now()),
        };
        match self.change_once(&o, &Event::Accepted, sent, opts).await {
            Ok(Cas::Changed(_)) => {
                if decide(Decision::Accepted) {
                    self.stats.accepted.fetch_add(1, Ordering::Relaxed);
                    self.send_go(m, id).await;
                } else {
                    // The waiter gave up while this was being recorded: the
                    // merchant hears 30002, so no `go`.
                    self.withhold(m, id, true, &|_| true).await;
                }
            }
            // A repeat of an acceptance (or of a refusal) already applied.
            Ok(Cas::Unchanged) => {
                self.stats
                    .duplicate_device_messages
                    .fetch_add(1, Ordering::Relaxed);
                let now = self.store.order(id).await.ok().flatten().unwrap_or(o);
                if now.status == Status::Rejected {
                    self.late_accept(m, &now);
                }
                decide(Decision::Stored(Box::new(now)));
            }
            Ok(Cas::Missed) => {
                let now = match self.store.order(id).await {
                    Ok(Some(now)) => now,
                    _ => {
                        self.withhold(m, id, true, &decide).await;
                        return;
                    }
                };
                match now.status {
                    // Still dispatching: its `accept_by` has passed.
                    Status::Dispatching => {
                        let gave_up = self
                            .transition(
                                &now,
                                &Event::NotAccepted(GiveUp::AcceptTimeout),
                                json!({ "late_ack": true }),
                            )
                            .await;
                        if matches!(gave_up, Ok(Some(_))) {
                            self.cancel_now(m, id);
                        }
                        decide(Decision::NotAccepted);
                    }
                    Status::Rejected => {
                        self.late_accept(m, &now);
                        decide(Decision::Stored(Box::new(now)));
                    }
                    // Accepted already (a repeat): nothing to send.
                    _ => {
                        self.stats
                            .duplicate_device_messages
                            .fetch_add(1, Ordering::Relaxed);
                        decide(Decision::Stored(Box::new(now)));
                    }
                }
            }
            // An acceptance of an order that was never sent (unpaid,
            // expired): fits no order in flight.
            Err(OrderError::StateConflict) => {
                decide(Decision::NotAccepted);
                self.stats
                    .duplicate_device_messages
                    .fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                warn!(machine_no = %m, order_id = id, error = %e, "acceptance not recorded: storage failed; no go");
                self.withhold(m, id, true, &decide).await;
            }
        }
    }

    /// An acceptance this node may have recorded but will not follow with
    /// `go`: answer 30002, cancel, and give the order up once storage takes
    /// it (from `dispensing` too: [`Event::GoWithheld`]).
    async fn withhold(
        &self,
        m: MachineNo,
        id: u64,
        accepted: bool,
        decide: &(dyn Fn(Decision) -> bool + Sync),
    ) {
        decide(Decision::NotAccepted);
        if !accepted {
            return;
        }
        self.stats.go_withheld.fetch_add(1, Ordering::Relaxed);
        self.cancel_now(m, id);
        let Some(me) = self.me.upgrade() else { return };
        tokio::spawn(async move { me.record_withheld(id).await });
    }

    /// Retry [`Event::GoWithheld`] until storage takes it or the order has
    /// moved on. Bounded: a minute of attempts; past that the sweep gives a
    /// still-`dispatching` order up (`dispatch_lost`), and a `dispensing`
    /// one reaches its dispense deadline (`unknown`, full refund).
    async fn record_withheld(&self, id: u64) {
        const ATTEMPTS: u32 = 120;
        for _ in 0..ATTEMPTS {
            if let Ok(Some(o)) = self.store.order(id).await {
                if !matches!(o.status, Status::Dispatching | Status::Dispensing) {
                    return;
                }
                if let Ok(Some(_)) | Ok(None) =
                    self.transition(&o, &Event::GoWithheld, json!({})).await
                {
                    self.release(o.machine_no, &o.lines);
                    return;
                }
            }
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = tokio::time::sleep(std::time::Duration::from_millis(500)) => {}
            }
        }
        warn!(
            order_id = id,
            "withheld go not recorded after a minute; left to the sweeps"
        );
    }

    /// A machine accepted an order we gave up on: repeat the cancel (no
    /// `go` was ever sent for a rejected order).
    fn late_accept(&self, m: MachineNo, o: &StoredOrder) {
        warn!(machine_no = %m, order_id = o.order_id, "machine accepted an order after it was given up; cancelling again");
        self.cancel_now(m, o.order_id);
    }

    /// Apply a machine's result (PROTOCOL.md gateway rules 5–6). A result
    /// never implies an acceptance. Goods reported out for an order that
    /// was given up are recorded on it and notified, never dropped.
    pub(crate) async fn on_result(&self, m: MachineNo, payload: Bytes) {
        let Ok(r) = msg::decode::<ResultMsg>(&payload) else {
            self.stats
                .malformed_device_messages
                .fetch_add(1, Ordering::Relaxed);
            return;
        };
        let items: Vec<(i64, u32, u32)> = r
            .items
            .iter()
            .map(|i| (i.product_id, i.quantity, i.dispensed))
            .collect();
        let ev = Event::Result {
            items: items.clone(),
            error: r.error.clone(),
        };
        let detail = json!({ "items": r.items });
        // A first result finds its order cached as `dispensing` (module
        // `open`): applied with one compare-and-set and no read. Anything
        // but a change written is decided again from the stored order.
        if let Some(o) = self
            .open
            .get(r.order_id, Status::Dispensing)
            .filter(|o| o.machine_no == m)
        {
            if check_result(&o.as_state(), &items).is_ok() {
                if let Ok(Cas::Changed(next)) = self
                    .change_once(&o, &ev, detail.clone(), ChangeOpts::default())
                    .await
                {
                    self.result_applied(m, &o, next).await;
                    return;
                }
            }
        }
        let o = match self.store.order(r.order_id).await {
            Ok(Some(o)) if o.machine_no == m => o,
            _ => {
                self.unmatched(m, r.order_id, "result");
                return;
            }
        };
        // An ill-fitting result is counted and dropped (gateway rule 3),
        // and leaves the order as it is.
        if check_result(&o.as_state(), &items).is_err() {
            self.unmatched(m, o.order_id, "result that does not fit its order");
            return;
        }
        match self.transition(&o, &ev, detail).await {
            Ok(Some(next)) => self.result_applied(m, &o, next).await,
            Ok(None) => {
                self.stats
                    .duplicate_device_messages
                    .fetch_add(1, Ordering::Relaxed);
            }
            Err(_) => self.unmatched(m, o.order_id, "result that does not fit its order"),
        }
    }

    /// A result changed order `o` (as stored before the change) to `next`:
    /// counters, the reservation, and whoever waits on the order.
    async fn result_applied(&self, m: MachineNo, o: &StoredOrder, next: Order) {
        self.stats.results_applied.fetch_add(1, Ordering::Relaxed);
        if next.status == Status::Rejected && next.dispensed_units() > 0 {
            self.stats
                .dispensed_after_rejection
                .fetch_add(1, Ordering::Relaxed);
            warn!(machine_no = %m, order_id = o.order_id, amount = next.dispensed_amount(), "goods out for an order that was given up");
        } else {
            info!(machine_no = %m, order_id = o.order_id, status = next.status.as_str(), "order settled");
        }
        // An unknown order's reservation went at its deadline.
        if o.status.holds_reservation() {
            self.inventory.release(m, &next.lines);
        }
        if o.status == Status::Dispatching {
            // Given up before any acceptance: a waiter here hears it now.
            if let Some(t) = self.inflight.get(&o.order_id).map(|t| t.clone()) {
                if t.begin_decision() == Begin::Deciding {
                    if let Ok(Some(now)) = self.store.order(o.order_id).await {
                        t.decide(Decision::Stored(Box::new(now)));
                    } else {
                        t.decide(Decision::NotAccepted);
                    }
                }
            }
        }
        if let Some((_, tx)) = self.settled.remove(&o.order_id) {
            let _ = tx.send(());
        }
    }

    /// A machine message that fits none of its orders: counted, and logged
    /// at most once a second; nothing of it is stored.
    fn unmatched(&self, m: MachineNo, order_id: u64, what: &str) {
        self.stats
            .rejected_device_messages
            .fetch_add(1, Ordering::Relaxed);
        if UNMATCHED_LOG.allow() {
            warn!(machine_no = %m, order_id, what, "machine message for no order of its own dropped (further ones this second only counted)");
        }
    }

    /// Whether order `id` has been sent from here and waits for its
    /// machine's ack (the hostile-input harness plays the machine).
    pub(crate) fn awaiting_ack(&self, id: u64) -> bool {
        self.inflight.contains_key(&id)
    }
}
