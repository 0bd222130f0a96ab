//! The per-machine queue and the worker that sends one order at a time:
//! stored first, then `cmd/dispense`, then the wait for the decision on the
//! order's [`Ticket`].

use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use chrono::Utc;
use serde_json::json;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tracing::warn;
use vendgate_proto::machine::MachineNo;
use vendgate_proto::msg::{self, DispenseCmd, OrderLine};
use vendgate_proto::topic::Command;

use super::place::{outcome, NewId};
use super::ticket::{Abandon, CallerGuard, Decision, Ticket};
use super::{OrderError, OrderService, PlaceRequest};
use crate::config::ANSWER_MARGIN;
use crate::domain::order::{Event, GiveUp, Line, Status};
use crate::storage::StoredOrder;

/// One order waiting for its machine.
pub(crate) struct Job {
    id: NewId,
    req: PlaceRequest,
    lines: Vec<Line>,
    /// A paid `pay_later` order (stored `awaiting_payment`, paid only when
    /// its command is about to leave).
    paid: Option<StoredOrder>,
    ticket: Arc<Ticket>,
    reply: oneshot::Sender<Result<u64, OrderError>>,
}

/// How the worker's order ended, for the merchant's answer.
enum Answered {
    /// Acceptance recorded here, `go` sent: 0, and the stock stays held.
    Accepted,
    /// The stored record answers (it moved on elsewhere).
    Stored(Box<StoredOrder>),
    /// 30002: no acceptance recorded, no `go` ever sent.
    NotAccepted,
    /// Another answer (30005, 30002 for an undelivered command, 40002...).
    Failed(OrderError),
}

impl OrderService {
    /// Queue an order for its machine and wait for its answer, within the
    /// request's `answer_by` (see the module doc for each bound).
    pub(super) async fn place_local(
        &self,
        id: NewId,
        req: PlaceRequest,
        lines: Vec<Line>,
        paid: Option<StoredOrder>,
    ) -> Result<u64, OrderError> {
        let m = req.machine_no;
        let new = paid.is_none();
        // A paid order that is not sent stays unpaid and keeps its stock.
        let release = |lines: &[Line]| {
            if new {
                self.inventory.release(m, lines);
            }
        };
        let answer_by = req.answer_by;
        let Some(send_by) = answer_by.checked_sub(self.settings.accept_timeout) else {
            release(&lines);
            return Err(OrderError::Busy);
        };
        if Instant::now() >= send_by {
            release(&lines);
            self.stats.busy.fetch_add(1, Ordering::Relaxed);
            return Err(OrderError::Busy);
        }
        let ticket = Ticket::new(m);
        let (reply, mut answer) = oneshot::channel();
        // Released here if the job is abandoned in its queue.
        let held = if new { lines.clone() } else { Vec::new() };
        let order_id = id.id;
        let job = Job {
            id,
            req,
            lines,
            paid,
            ticket: ticket.clone(),
            reply,
        };
        if let Err(e) = self.queue(m).try_send(job) {
            let job = match e {
                mpsc::error::TrySendError::Full(j) | mpsc::error::TrySendError::Closed(j) => j,
            };
            release(&job.lines);
            self.stats.busy.fetch_add(1, Ordering::Relaxed);
            return Err(OrderError::Busy);
        }
        let mut guard = CallerGuard(Some(ticket.clone()));
        let got = match tokio::time::timeout_at(send_by, &mut answer).await {
            Ok(r) => Some(r),
            Err(_) if ticket.abandon_queued() => {
                // Not sent in time: answered now, never sent later.
                guard.0 = None;
                release(&held);
                self.stats.busy.fetch_add(1, Ordering::Relaxed);
                return Err(OrderError::Busy);
            }
            // The worker has it: its own waits end by `answer_by`.
            Err(_) => tokio::time::timeout_at(answer_by + ANSWER_MARGIN, &mut answer)
                .await
                .ok(),
        };
        guard.0 = None;
        match got {
            Some(Ok(r)) => r,
            // No answer (shutdown, or a storage call past its bounds): the
            // ticket says what may still happen, and nothing goes unsaid.
            Some(Err(_)) | None => match ticket.abandon() {
                Abandon::NotSent => Err(OrderError::Internal),
                Abandon::Decided(d) => answer_of(order_id, &d),
                Abandon::Pending | Abandon::Withheld => Err(OrderError::NotAccepted),
            },
        }
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
        // Orders still queued were never stored or sent.
        while let Ok(job) = rx.try_recv() {
            if job.ticket.take() && job.paid.is_none() {
                self.inventory.release(m, &job.lines);
            }
            let _ = job.reply.send(Err(OrderError::Internal));
        }
    }

    async fn dispatch(&self, job: Job) {
        let Job {
            id,
            req,
            lines,
            paid,
            ticket,
            reply,
        } = job;
        let m = req.machine_no;
        let new = paid.is_none();
        if !ticket.take() {
            // The caller stopped waiting while it was queued. A caller whose
            // deadline passed released the stock itself; a gone one did not.
            if ticket.gone.is_cancelled() && new {
                self.inventory.release(m, &lines);
            }
            return;
        }
        let send_by = req.answer_by.checked_sub(self.settings.accept_timeout);
        let refuse = |e: OrderError| {
            if new {
                self.inventory.release(m, &lines);
            }
            e
        };
        if send_by.is_none_or(|b| Instant::now() >= b) {
            self.stats.busy.fetch_add(1, Ordering::Relaxed);
            let _ = reply.send(Err(refuse(OrderError::Busy)));
            return;
        }
        if !self.presence.is_online(&m) {
            let _ = reply.send(Err(refuse(OrderError::Offline)));
            return;
        }
        let stored = match self.store_for_dispatch(id, &req, &lines, paid).await {
            Ok(o) => o,
            Err(e) => {
                let _ = reply.send(Err(refuse(e)));
                return;
            }
        };
        let order_id = stored.order_id;
        // The same instant as the stored `accept_by`, on this clock.
        let accept_by = Instant::now()
            + stored
                .accept_by
                .and_then(|a| (a - Utc::now()).to_std().ok())
                .unwrap_or_default();
        self.inflight.insert(order_id, ticket.clone());
        // Registered before the command leaves: a machine can dispense and
        // report right after `go`, before this worker would get to it.
        let (settled_tx, settled_rx) = oneshot::channel();
        self.settled.insert(order_id, settled_tx);
        let answered = self
            .send_and_decide(&stored, &ticket, accept_by, req.answer_by)
            .await;
        let (answer, holds) = match answered {
            Answered::Accepted => (Ok(order_id), true),
            Answered::Stored(o) => (outcome(&o), o.status == Status::Dispensing),
            Answered::NotAccepted => (Err(OrderError::NotAccepted), false),
            Answered::Failed(e) => (Err(e), false),
        };
        let _ = reply.send(answer);
        if holds {
            // Stay on this order until it settles or reaches its deadline:
            // one order at a time per machine.
            let got = tokio::select! {
                r = tokio::time::timeout(self.settings.dispense_timeout, settled_rx) => r.is_ok(),
                _ = self.shutdown.cancelled() => true,
            };
            if !got {
                self.deadline_passed(order_id).await;
            }
        } else {
            // Given up or refused: the stock goes back (a paid order's too:
            // it is no longer unpaid).
            self.inventory.release(m, &lines);
        }
        self.settled.remove(&order_id);
        self.inflight.remove(&order_id);
    }

    /// Durable before anything leaves: insert a new order, or pay a
    /// `pay_later` one (exactly one of this payment and the expiry wins).
    /// Either way the order is `dispatching` with its `accept_by` set.
    async fn store_for_dispatch(
        &self,
        id: NewId,
        req: &PlaceRequest,
        lines: &[Line],
        paid: Option<StoredOrder>,
    ) -> Result<StoredOrder, OrderError> {
        let accept_by = self.accept_by_for(req.answer_by);
        match paid {
            Some(mut o) => match self.pay_transition(&o, accept_by).await {
                Ok(true) => {
                    o.status = Status::Dispatching;
                    o.accept_by = Some(accept_by);
                    o.updated_at = Utc::now();
                    Ok(o)
                }
                Ok(false) | Err(_) => Err(OrderError::StateConflict),
            },
            None => self.persist_new(id, req, lines, false, None).await,
        }
    }

    /// Send the stored order's dispense command and decide.
    async fn send_and_decide(
        &self,
        stored: &StoredOrder,
        ticket: &Arc<Ticket>,
        accept_by: Instant,
        answer_by: Instant,
    ) -> Answered {
        let (order_id, m) = (stored.order_id, stored.machine_no);
        if !ticket.leaving() {
            // The caller went away while the order was stored: it never leaves.
            self.stats.caller_gone.fetch_add(1, Ordering::Relaxed);
            let why = GiveUp::NotDelivered("caller_gone".into());
            let _ = self
                .transition(stored, &Event::NotAccepted(why), json!({}))
                .await;
            return Answered::NotAccepted;
        }
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
        // Set before the command leaves: its ack may be handled before
        // `send` returns here.
        let _ = ticket.sent.set(json!({
            "sent_at": Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            "ttl_ms": ttl_ms,
        }));
        if let Err(e) = self
            .commands
            .send(&m, Command::Dispense, Bytes::from(msg::encode(&cmd)))
            .await
        {
            // Never handed over: nothing to decide, no cancel owed.
            ticket.abandon();
            let why = GiveUp::NotDelivered(e.to_string());
            let _ = self
                .transition(stored, &Event::NotAccepted(why), json!({}))
                .await;
            return Answered::Failed(OrderError::Offline);
        }
        match self.await_decision(ticket, accept_by, answer_by).await {
            (Abandon::Decided(Decision::Accepted), _) => Answered::Accepted,
            (Abandon::Decided(Decision::Refused(r)), _) => Answered::Failed(OrderError::Refused(r)),
            (Abandon::Decided(Decision::NotAccepted), _) | (Abandon::NotSent, _) => {
                Answered::NotAccepted
            }
            (Abandon::Decided(Decision::Stored(o)), _) => Answered::Stored(o),
            // An acceptance being recorded here was cut off: its handler
            // withholds `go` and gives the order up.
            (Abandon::Withheld, _) => {
                self.stats.not_accepted.fetch_add(1, Ordering::Relaxed);
                Answered::NotAccepted
            }
            (Abandon::Pending, why) => self.give_up(stored, why).await,
        }
    }

    /// Wait for the decision until the order's `accept_by` (an ack being
    /// recorded then is waited for until `answer_by`), or until the caller
    /// goes away; then abandon the ticket unless decided.
    async fn await_decision(
        &self,
        ticket: &Ticket,
        accept_by: Instant,
        answer_by: Instant,
    ) -> (Abandon, GiveUp) {
        let why = loop {
            if let Some(d) = ticket.decision() {
                return (Abandon::Decided(d), GiveUp::AcceptTimeout);
            }
            tokio::select! {
                _ = ticket.decided.notified() => {}
                _ = tokio::time::sleep_until(accept_by) => break GiveUp::AcceptTimeout,
                _ = ticket.gone.cancelled() => break GiveUp::CallerGone,
                _ = self.shutdown.cancelled() => break GiveUp::GatewayRestart,
            }
        };
        if matches!(why, GiveUp::AcceptTimeout) {
            while ticket.deciding() {
                tokio::select! {
                    _ = ticket.decided.notified() => {}
                    _ = tokio::time::sleep_until(answer_by) => break,
                }
            }
        }
        (ticket.abandon(), why)
    }

    /// No acceptance was decided here by `accept_by` (or the caller went
    /// away): record the give-up with a compare-and-set. If the order moved
    /// on meanwhile (another node recorded the ack, a result gave it up),
    /// the stored record answers.
    async fn give_up(&self, stored: &StoredOrder, why: GiveUp) -> Answered {
        if matches!(why, GiveUp::CallerGone) {
            self.stats.caller_gone.fetch_add(1, Ordering::Relaxed);
        }
        let owes_cancel = why.owes_cancel();
        match self
            .transition(stored, &Event::NotAccepted(why), json!({}))
            .await
        {
            Ok(Some(_)) => {
                self.stats.not_accepted.fetch_add(1, Ordering::Relaxed);
                if owes_cancel {
                    self.cancel_now(stored.machine_no, stored.order_id);
                }
                Answered::NotAccepted
            }
            Ok(None) | Err(OrderError::StateConflict) => {
                match self.store.order(stored.order_id).await {
                    Ok(Some(o)) => Answered::Stored(Box::new(o)),
                    _ => Answered::NotAccepted,
                }
            }
            // Storage failed: the order's `accept_by` has passed, so no
            // acceptance can be recorded any more; the sweep records the
            // give-up once storage is back (`GiveUp::DispatchLost`).
            Err(e) => {
                warn!(order_id = stored.order_id, error = %e, "give-up not recorded; the sweep will");
                self.stats.not_accepted.fetch_add(1, Ordering::Relaxed);
                Answered::NotAccepted
            }
        }
    }

    /// The `accept_by` of an order stored now: `accept_timeout` from now,
    /// but never past the request's `answer_by` (an order taken from its
    /// queue at the last moment gets the time that is left).
    pub(super) fn accept_by_for(&self, answer_by: Instant) -> chrono::DateTime<Utc> {
        let left = self
            .settings
            .accept_timeout
            .min(answer_by.saturating_duration_since(Instant::now()));
        Utc::now() + chrono::Duration::from_std(left).unwrap_or(chrono::Duration::MAX)
    }
}

/// The merchant's answer for a decision.
fn answer_of(order_id: u64, d: &Decision) -> Result<u64, OrderError> {
    match d {
        Decision::Accepted => Ok(order_id),
        Decision::Refused(r) => Err(OrderError::Refused(r.clone())),
        Decision::NotAccepted => Err(OrderError::NotAccepted),
        Decision::Stored(o) => outcome(o),
    }
}
