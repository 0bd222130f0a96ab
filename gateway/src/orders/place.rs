//! Placing and paying, up to the machine's queue: the out_trade_no lock and
//! its repeats, the owner check, stock reservation, the unpaid caps, and
//! storing a new order. A request is first admitted ([`OrderService::admit`]
//! or [`OrderService::unpaid`]); the caller then places it here or, in
//! cluster mode, has the machine's node place it (`crate::front`).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use dashmap::DashMap;
use serde_json::json;
use tokio::time::Instant;
use tracing::{debug, error};
use vendgate_proto::machine::MachineNo;

use super::inventory::Shortfall;
use super::{event, OrderError, OrderService};
use crate::config::{OrderSettings, ANSWER_MARGIN};
use crate::domain::order::{GiveUp, Line, Order, Status};
use crate::storage::{NewOrder, StorageError, StoredOrder};

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
}

/// The `answer_by` of a request arriving now.
pub fn answer_by(settings: &OrderSettings) -> Instant {
    Instant::now() + settings.request_timeout.saturating_sub(ANSWER_MARGIN)
}

/// The id a new order is stored under.
#[derive(Debug, Clone, Copy)]
pub(super) struct NewId {
    pub id: u64,
    /// Chosen by the node that forwarded the request (cluster mode): if it
    /// is taken, that node stored the order given up
    /// ([`OrderService::preempt_unanswered`]), so the order must not start
    /// under another id.
    pub fixed: bool,
}

/// How [`OrderService::admit`] found a request.
pub enum Admission<'a> {
    /// Answered already: a repeat of an earlier out_trade_no, a machine
    /// that is not the merchant's, or a lock not had in time.
    Answered(Result<u64, OrderError>),
    /// Passed the checks; may be placed.
    Admitted(Placing<'a>),
}

/// An admitted request. Holds its out_trade_no's lock until dropped, so
/// repeats wait for its answer wherever it is placed.
pub struct Placing<'a> {
    svc: &'a OrderService,
    req: PlaceRequest,
    _key: Option<KeyGuard<'a>>,
}

impl Placing<'_> {
    pub fn request(&self) -> &PlaceRequest {
        &self.req
    }

    /// A fresh order id, for a node placing the order on this one's behalf.
    pub fn new_order_id(&self) -> u64 {
        self.svc.ids.next()
    }

    /// Place the order on this node (30002 unless the machine is connected
    /// here); answered within the request's `answer_by`.
    pub async fn place_here(self) -> Result<u64, OrderError> {
        let id = NewId {
            id: self.svc.ids.next(),
            fixed: false,
        };
        self.place(id).await
    }

    /// [`Self::place_here`] under the id the forwarding node chose.
    pub async fn place_here_as(self, order_id: u64) -> Result<u64, OrderError> {
        let id = NewId {
            id: order_id,
            fixed: true,
        };
        self.place(id).await
    }

    async fn place(self, id: NewId) -> Result<u64, OrderError> {
        let svc = self.svc;
        let req = &self.req;
        match svc.place_new(req, id).await {
            Err(OrderError::RepeatOf(id)) => {
                let existing = svc.load(id).await?;
                svc.repeat(existing, &fingerprint(req), req.answer_by).await
            }
            other => other,
        }
    }
}

/// A `pay_later` order of the merchant, unpaid when [`OrderService::unpaid`]
/// read it.
#[derive(Debug)]
pub struct Unpaid(pub(super) StoredOrder);

impl Unpaid {
    pub fn machine_no(&self) -> MachineNo {
        self.0.machine_no
    }

    pub fn order_id(&self) -> u64 {
        self.0.order_id
    }
}

impl OrderService {
    /// The checks every new order passes first, wherever it is placed:
    /// counted; concurrent requests with one out_trade_no run one after
    /// another (so every repeat finds the first one's order instead of
    /// racing it for stock and queue slots; the first holds the lock at most
    /// until its own `answer_by`, which is earlier than ours); a repeat is
    /// answered from the first attempt; another merchant's machine answers
    /// exactly like an absent one.
    pub async fn admit(&self, req: PlaceRequest) -> Admission<'_> {
        self.stats.placed.fetch_add(1, Ordering::Relaxed);
        let key = match &req.out_trade_no {
            Some(otn) => {
                let key = (req.merchant.clone(), otn.clone());
                let lock = self
                    .idempotency_locks
                    .entry(key.clone())
                    .or_default()
                    .clone();
                let Ok(guard) = tokio::time::timeout_at(req.answer_by, lock.lock_owned()).await
                else {
                    return Admission::Answered(Err(OrderError::Busy));
                };
                Some(KeyGuard {
                    locks: &self.idempotency_locks,
                    key,
                    _guard: guard,
                })
            }
            None => None,
        };
        match self.first_checks(&req).await {
            Ok(None) => Admission::Admitted(Placing {
                svc: self,
                req,
                _key: key,
            }),
            Ok(Some(answer)) => Admission::Answered(answer),
            Err(e) => Admission::Answered(Err(e)),
        }
    }

    /// The repeat and owner checks of [`Self::admit`]: Some(answer) when
    /// they answer the request.
    async fn first_checks(
        &self,
        req: &PlaceRequest,
    ) -> Result<Option<Result<u64, OrderError>>, OrderError> {
        if let Some(otn) = &req.out_trade_no {
            if let Some(existing) = self.store.order_by_out_trade_no(&req.merchant, otn).await? {
                let answer = self
                    .repeat(existing, &fingerprint(req), req.answer_by)
                    .await;
                return Ok(Some(answer));
            }
        }
        if !self.owned_for_order(&req.machine_no, &req.merchant).await? {
            return Ok(Some(Err(OrderError::MachineNotFound)));
        }
        Ok(None)
    }

    /// Place an order on this node, never forwarded: [`Self::admit`] then
    /// [`Placing::place_here`] (`crate::front` places wherever the machine is).
    pub async fn place_here(&self, req: PlaceRequest) -> Result<u64, OrderError> {
        match self.admit(req).await {
            Admission::Answered(answer) => answer,
            Admission::Admitted(placing) => placing.place_here().await,
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
            .other_nodes
            .as_ref()
            .map_or(Duration::ZERO, |n| n.answer_slack);
        let left = o
            .accept_by
            .and_then(|a| (a - Utc::now()).to_std().ok())
            .unwrap_or(Duration::ZERO);
        Instant::now() + left + slack
    }

    /// An admitted order, on this node: online, within the unpaid caps,
    /// reserved, then stored (`pay_later`) or queued for its machine.
    async fn place_new(&self, req: &PlaceRequest, id: NewId) -> Result<u64, OrderError> {
        if !self.presence.is_online(&req.machine_no) {
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
        if req.pay_later {
            // Reserve and answer at once; no command until payment.
            let deadline = chrono::Duration::from_std(self.settings.unpaid_timeout)
                .ok()
                .map(|d| Utc::now() + d);
            return match self.persist_new(id, req, &lines, true, deadline).await {
                Ok(o) => Ok(o.order_id),
                Err(e) => {
                    self.inventory.release(req.machine_no, &lines);
                    Err(e)
                }
            };
        }
        self.place_local(id, req.clone(), lines, None).await
    }

    /// `POST /orders/{id}/pay`, first step: the merchant's order, still
    /// awaiting payment.
    pub async fn unpaid(&self, merchant: &str, order_id: u64) -> Result<Unpaid, OrderError> {
        let o = self.merchants_order(merchant, order_id).await?;
        if o.status != Status::AwaitingPayment {
            return Err(OrderError::StateConflict);
        }
        Ok(Unpaid(o))
    }

    /// Mark an unpaid order paid and dispatch it on this node, under the
    /// same online, accept and deadline rules as placing. Exactly one of a
    /// payment and the expiry wins (compare-and-set on the status). Offline
    /// here: it stays unpaid (the merchant may retry until the deadline).
    pub async fn pay_here(&self, o: Unpaid, answer_by: Instant) -> Result<u64, OrderError> {
        let Unpaid(o) = o;
        if !self.presence.is_online(&o.machine_no) {
            return Err(OrderError::Offline);
        }
        let req = PlaceRequest {
            merchant: o.merchant_appid.clone(),
            machine_no: o.machine_no,
            lines: o.lines.iter().map(|l| (l.product_id, l.quantity)).collect(),
            out_trade_no: o.out_trade_no.clone(),
            pay_later: true,
            answer_by,
        };
        let id = NewId {
            id: o.order_id,
            fixed: true,
        };
        let lines = o.lines.clone();
        self.place_local(id, req, lines, Some(o)).await
    }

    /// Insert a new order (retrying on an id collision unless the id is
    /// fixed); `dispatching` orders get their `accept_by`.
    pub(super) async fn persist_new(
        &self,
        id: NewId,
        req: &PlaceRequest,
        lines: &[Line],
        pay_later: bool,
        pay_deadline: Option<chrono::DateTime<Utc>>,
    ) -> Result<StoredOrder, OrderError> {
        let m = req.machine_no;
        let order = Order::new(lines.to_vec(), pay_later);
        let mut order_id = id.id;
        let mut attempts = 0;
        loop {
            let now = Utc::now();
            let accept_by = (!pay_later).then(|| self.accept_by_for(req.answer_by));
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
                accept_by,
            };
            let ev = event(
                "created",
                json!({ "amount": order.amount(), "lines": lines, "pay_later": pay_later }),
            );
            match self.store.insert_order(&new, &ev).await {
                // The row just inserted, without reading it back.
                Ok(()) => {
                    let stored = StoredOrder::from_new(new);
                    self.open.wrote(stored.clone());
                    return Ok(stored);
                }
                // Taken: the forwarding node's record that it gave up.
                Err(StorageError::Duplicate("order")) if id.fixed => {
                    return Err(OrderError::Offline);
                }
                Err(StorageError::Duplicate("order")) if attempts < 5 => {
                    attempts += 1;
                    order_id = self.ids.next();
                }
                Err(StorageError::Duplicate("out_trade_no")) => {
                    // A concurrent repeat inserted first; answer as its repeat.
                    let otn = req.out_trade_no.as_deref().unwrap_or("");
                    return match self.store.order_by_out_trade_no(&req.merchant, otn).await {
                        Ok(Some(o)) => Err(OrderError::RepeatOf(o.order_id)),
                        _ => Err(OrderError::Internal),
                    };
                }
                Err(e) => {
                    error!(machine_no = %m, error = %e, "could not persist order");
                    return Err(OrderError::Internal);
                }
            }
        }
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
pub(super) fn fingerprint(req: &PlaceRequest) -> String {
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

pub(super) type IdempotencyLocks = DashMap<(String, String), Arc<tokio::sync::Mutex<()>>>;

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
    /// The row [`OrderService::persist_new`] just inserted.
    pub(super) fn from_new(new: NewOrder) -> Self {
        Self {
            order_id: new.order_id,
            merchant_appid: new.merchant_appid,
            machine_no: new.machine_no,
            out_trade_no: new.out_trade_no,
            request_fingerprint: new.request_fingerprint,
            pay_later: new.pay_later,
            status: new.status,
            lines: new.lines,
            amount: new.amount,
            refund_amount: 0,
            error: None,
            result_applied: false,
            created_at: new.created_at,
            updated_at: new.created_at,
            dispense_deadline: None,
            pay_deadline: new.pay_deadline,
            refunded_at: None,
            refunded_amount: 0,
            accept_by: new.accept_by,
            events_dropped: 0,
        }
    }
}
