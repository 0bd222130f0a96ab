//! The stored transition every change of an order goes through: the state
//! machine's answer written with a compare-and-set on the stored status,
//! with the merchant's webhooks in the same transaction, then the counters.

use chrono::{DateTime, Utc};
use serde_json::json;

use super::{event, OrderError, OrderService};
use crate::domain::order::{
    apply, notices, Event, Notice, Order, Status, Transition, TransitionError,
};
use crate::domain::webhook::{order_event, OrderFacts};
use crate::storage::{NewOutboxEvent, OrderChange, StoredOrder};

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
            self.open.forget(current.order_id);
            return Ok(Cas::Missed);
        }
        self.open.wrote(StoredOrder {
            status: change.status,
            lines: change.lines,
            error: change.error,
            result_applied: change.result_applied,
            refund_amount: change.refund_amount,
            dispense_deadline: change.dispense_deadline,
            accept_by: change.accept_by,
            updated_at: now,
            ..current.clone()
        });
        if !outbox.is_empty() {
            self.notifier.wake();
        }
        self.observer.transition(
            current.order_id,
            current.machine_no,
            current.status,
            next.status,
            next.error.as_deref(),
        );
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
