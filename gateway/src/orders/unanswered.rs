//! Cluster mode, the requesting node's side of a forwarded order or payment
//! whose owner never answered (it died with the request, the answer was
//! lost, or the merchant went away first): settled from storage exactly
//! like a missing ack, and never by sending the order again.

use std::sync::atomic::Ordering;
use std::time::Duration;

use chrono::Utc;
use serde_json::json;
use tokio::time::Instant;

use super::place::{fingerprint, outcome};
use super::{event, OrderError, OrderService, PlaceRequest};
use crate::domain::order::{Event, GiveUp, Line, Status};
use crate::storage::{NewOrder, StorageError, StoredOrder};

impl OrderService {
    /// The owning node's answer about forwarded order `order_id` never came
    /// (`why`: it was lost, or the merchant went away first). `req`: the
    /// request, when the order was being placed (not paid). Answered within
    /// `answer_by`.
    pub async fn settle_unanswered(
        &self,
        order_id: u64,
        req: Option<&PlaceRequest>,
        why: GiveUp,
        answer_by: Instant,
    ) -> Result<u64, OrderError> {
        let stored = match self.store.order(order_id).await {
            Ok(o) => o,
            // Nothing known; the order's `accept_by` passes before anyone
            // could accept it for this request.
            Err(_) => return Err(OrderError::NotAccepted),
        };
        match (stored, req) {
            // Not stored (yet): record it given up first, so a paused owner
            // cannot start it later.
            (None, Some(req)) => self.preempt_unanswered(req, order_id, why, answer_by).await,
            (None, None) => Err(OrderError::NotAccepted),
            (Some(o), _) => self.give_up_unanswered(o, why, answer_by).await,
        }
    }

    /// Storage has no order `order_id`, but the owner may still be about to
    /// store it (it was paused between its last check and the insert):
    /// store it here first, given up, so the owner's insert finds the id
    /// taken and the order never starts. If the owner got there first,
    /// settle what it stored.
    async fn preempt_unanswered(
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
                self.give_up_unanswered(self.load(order_id).await?, why, answer_by)
                    .await
            }
            Err(StorageError::Duplicate("out_trade_no")) => {
                let otn = req.out_trade_no.as_deref().unwrap_or("");
                match self.store.order_by_out_trade_no(&req.merchant, otn).await? {
                    Some(o) => self.give_up_unanswered(o, why, answer_by).await,
                    None => Err(OrderError::NotAccepted),
                }
            }
            // Nothing stored here; whatever the owner did is decided by
            // its `accept_by`, which has passed or will before anyone
            // could accept it for this caller: 30002.
            Err(_) => Err(OrderError::NotAccepted),
        }
    }

    /// The owning node's answer about `o` never came (it died with the
    /// request, or the answer was lost), or the caller went away. A
    /// `dispatching` order is given up with a cancel owed (sent now if
    /// the machine is reachable, else when it reconnects); an order the
    /// owner did settle is answered from what it recorded. The dispense is
    /// never sent again. Bounded by `answer_by`: past it, an order still
    /// `dispatching` can no longer be accepted (its `accept_by` is earlier),
    /// so 30002 is the truth and the sweep records the give-up.
    async fn give_up_unanswered(
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
