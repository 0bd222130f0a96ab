//! The order state machine: `apply(order, event) -> Result<Transition, _>`,
//! pure (no I/O, no clock: times come in with the event). The order service
//! persists each transition before it acts on it. Property tests below check
//! the invariants over arbitrary event sequences.

use serde::{Deserialize, Serialize};

/// Order status, as API.md spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    AwaitingPayment,
    Dispatching,
    Dispensing,
    Completed,
    PartiallyDispensed,
    Failed,
    Rejected,
    Expired,
    /// A `pay_later` order the merchant cancelled before paying.
    Cancelled,
    Unknown,
}

impl Status {
    /// Every status, for code that must cover them all (SQL lists).
    pub const ALL: [Self; 10] = [
        Self::AwaitingPayment,
        Self::Dispatching,
        Self::Dispensing,
        Self::Completed,
        Self::PartiallyDispensed,
        Self::Failed,
        Self::Rejected,
        Self::Expired,
        Self::Cancelled,
        Self::Unknown,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::AwaitingPayment => "awaiting_payment",
            Self::Dispatching => "dispatching",
            Self::Dispensing => "dispensing",
            Self::Completed => "completed",
            Self::PartiallyDispensed => "partially_dispensed",
            Self::Failed => "failed",
            Self::Rejected => "rejected",
            Self::Expired => "expired",
            Self::Cancelled => "cancelled",
            Self::Unknown => "unknown",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "awaiting_payment" => Self::AwaitingPayment,
            "dispatching" => Self::Dispatching,
            "dispensing" => Self::Dispensing,
            "completed" => Self::Completed,
            "partially_dispensed" => Self::PartiallyDispensed,
            "failed" => Self::Failed,
            "rejected" => Self::Rejected,
            "expired" => Self::Expired,
            "cancelled" => Self::Cancelled,
            "unknown" => Self::Unknown,
            _ => return None,
        })
    }

    /// Stock is held for the order in these states.
    pub fn holds_reservation(self) -> bool {
        matches!(
            self,
            Self::AwaitingPayment | Self::Dispatching | Self::Dispensing
        )
    }

    /// Their status never changes again. A late result may still record
    /// on a `Rejected` order what a non-compliant machine dispensed.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            Self::Completed
                | Self::PartiallyDispensed
                | Self::Failed
                | Self::Rejected
                | Self::Expired
                | Self::Cancelled
        )
    }
}

/// One line of an order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Line {
    pub product_id: i64,
    pub quantity: u32,
    pub dispensed: u32,
    /// Fen, from the machine's inventory when the order was reserved.
    pub unit_price: i64,
}

/// The state-machine view of an order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Order {
    pub status: Status,
    pub lines: Vec<Line>,
    /// The machine's failure reason, or why the gateway gave up.
    pub error: Option<String>,
    /// Set once a result has been applied (a repeat is a no-op).
    pub result_applied: bool,
    /// What the merchant recorded as refunded (0 until it does).
    pub refunded_amount: i64,
}

/// Why the gateway gave an order up before the machine's acceptance was
/// recorded. Stored as the order's `error`; every one of them is answered
/// 30002 (a machine's own refusal reason is answered 30005).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GiveUp {
    /// No acceptance recorded before the order's `accept_by`.
    AcceptTimeout,
    /// The process stopped while the order was dispatching.
    GatewayRestart,
    /// Cluster mode: the owning node's answer never came.
    OwnerLost,
    /// A sweep found it dispatching long after its node should have settled it.
    DispatchLost,
    /// The merchant's connection closed before the acceptance was recorded.
    CallerGone,
    /// The acceptance could not be recorded (storage failed): no `go` was sent.
    AcceptNotRecorded,
    /// The machine reported `no_go`, or a result, before any acceptance was
    /// recorded: the order never got its `go`.
    NoGo,
    /// The command was never handed to the machine's connection.
    NotDelivered(String),
}

impl GiveUp {
    const NOT_DELIVERED: &'static str = "not_delivered";

    /// The stored `error` text.
    pub fn as_str(&self) -> std::borrow::Cow<'static, str> {
        use std::borrow::Cow;
        Cow::Borrowed(match self {
            Self::AcceptTimeout => "accept_timeout",
            Self::GatewayRestart => "gateway_restart",
            Self::OwnerLost => "owner_lost",
            Self::DispatchLost => "dispatch_lost",
            Self::CallerGone => "caller_gone",
            Self::AcceptNotRecorded => "accept_not_recorded",
            Self::NoGo => vendgate_proto::msg::ERROR_NO_GO,
            Self::NotDelivered(why) => {
                return Cow::Owned(format!("{}: {why}", Self::NOT_DELIVERED))
            }
        })
    }

    /// The reason a stored `error` names, if it is one of the gateway's own.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "accept_timeout" => Self::AcceptTimeout,
            "gateway_restart" => Self::GatewayRestart,
            "owner_lost" => Self::OwnerLost,
            "dispatch_lost" => Self::DispatchLost,
            "caller_gone" => Self::CallerGone,
            "accept_not_recorded" => Self::AcceptNotRecorded,
            vendgate_proto::msg::ERROR_NO_GO => Self::NoGo,
            _ => {
                let why = s.strip_prefix(Self::NOT_DELIVERED)?;
                Self::NotDelivered(why.trim_start_matches(':').trim_start().to_string())
            }
        })
    }

    /// Whether the dispense command may have reached the machine: a
    /// `cmd/cancel` is then owed until one is handed to its connection. A
    /// command never handed over owes none; nor does an order the machine
    /// itself reported dropped (`no_go`).
    pub fn owes_cancel(&self) -> bool {
        !matches!(self, Self::NotDelivered(_) | Self::NoGo)
    }
}

/// What can happen to an order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// `pay_later` order paid: goes to dispatch.
    Paid,
    /// Unpaid past the deadline.
    PaymentExpired,
    /// The merchant cancelled a `pay_later` order before paying it.
    Cancel,
    /// The machine's acceptance was recorded (before the order's
    /// `accept_by`: the storage compare-and-set checks that): `go` follows.
    Accepted,
    /// The machine refused (reason).
    Refused(String),
    /// The gateway gave up before an acceptance was recorded.
    NotAccepted(GiveUp),
    /// This node recorded (or may have recorded) the acceptance but never
    /// sent `go`: the order is given up like [`Event::NotAccepted`], from
    /// `dispensing` too, as long as no result came.
    GoWithheld,
    /// The machine's per-item result: (product_id, quantity, dispensed).
    Result {
        items: Vec<(i64, u32, u32)>,
        error: Option<String>,
    },
    /// No result within the dispense deadline.
    DispenseDeadline,
}

impl Event {
    /// The timeline entry's kind.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Paid => "paid",
            Self::PaymentExpired => "expired",
            Self::Cancel => "cancelled",
            Self::Accepted => "accepted",
            Self::Refused(_) => "refused",
            Self::NotAccepted(_) | Self::GoWithheld => "not_accepted",
            Self::Result { .. } => "result",
            Self::DispenseDeadline => "deadline",
        }
    }

    /// Whether the change this event makes leaves a dispense command that
    /// may still reach the machine (see [`GiveUp::owes_cancel`]).
    pub fn owes_cancel(&self) -> bool {
        match self {
            Self::NotAccepted(why) => why.owes_cancel(),
            Self::GoWithheld => true,
            _ => false,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransitionError {
    #[error("event does not apply to an order in status {0:?}")]
    Conflict(Status),
    #[error("result does not match the order: {0}")]
    BadResult(&'static str),
}

/// The outcome of applying an event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transition {
    /// The order changed; persist it.
    Changed(Order),
    /// A repeat of something already applied (duplicate ack/result): nothing to do.
    Unchanged,
}

/// Webhook event types (API.md "Notifications to the merchant").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Notice {
    Completed,
    PartiallyDispensed,
    DispenseFailed,
    Unknown,
    Expired,
    /// A machine reported goods out for an order the gateway had answered
    /// 30002/30005 or given up on.
    DispensedAfterRejection,
    /// A late result changed what is owed after a refund was recorded.
    RefundMismatch,
}

impl Notice {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Completed => "order.completed",
            Self::PartiallyDispensed => "order.partially_dispensed",
            Self::DispenseFailed => "order.dispense_failed",
            Self::Unknown => "order.unknown",
            Self::Expired => "order.expired",
            Self::DispensedAfterRejection => "order.dispensed_after_rejection",
            Self::RefundMismatch => "order.refund_mismatch",
        }
    }
}

/// The webhooks a committed change from `before` to `after` sends, in
/// delivery order.
pub fn notices(before: &Order, after: &Order) -> Vec<Notice> {
    let mut out = Vec::new();
    if after.status == Status::Rejected {
        if after.result_applied && !before.result_applied && after.dispensed_units() > 0 {
            out.push(Notice::DispensedAfterRejection);
        }
        return out;
    }
    if before.status != after.status {
        out.extend(match after.status {
            Status::Completed => Some(Notice::Completed),
            Status::PartiallyDispensed => Some(Notice::PartiallyDispensed),
            Status::Failed => Some(Notice::DispenseFailed),
            Status::Unknown => Some(Notice::Unknown),
            Status::Expired => Some(Notice::Expired),
            _ => None,
        });
    }
    if after.refunded_amount > 0 && after.refund_amount() != before.refund_amount() {
        out.push(Notice::RefundMismatch);
    }
    out
}

impl Order {
    pub fn new(lines: Vec<Line>, pay_later: bool) -> Self {
        Self {
            status: if pay_later {
                Status::AwaitingPayment
            } else {
                Status::Dispatching
            },
            lines,
            error: None,
            result_applied: false,
            refunded_amount: 0,
        }
    }

    /// Σ quantity × unit price.
    pub fn amount(&self) -> i64 {
        self.lines
            .iter()
            .map(|l| i64::from(l.quantity).saturating_mul(l.unit_price))
            .fold(0i64, i64::saturating_add)
    }

    /// Σ dispensed × unit price: the value of what came out.
    pub fn dispensed_amount(&self) -> i64 {
        self.lines
            .iter()
            .map(|l| i64::from(l.dispensed).saturating_mul(l.unit_price))
            .fold(0i64, i64::saturating_add)
    }

    /// Units that came out, over every line.
    pub fn dispensed_units(&self) -> u64 {
        self.lines.iter().map(|l| u64::from(l.dispensed)).sum()
    }

    /// What the merchant owes back: Σ undispensed × unit price for settled
    /// orders with a shortfall; the whole amount while the outcome is
    /// `unknown` (the goods may not have come out; a late result corrects
    /// it). A rejected order was never charged (it was answered 30002 or
    /// 30005), so it owes nothing, whatever a non-compliant machine did.
    pub fn refund_amount(&self) -> i64 {
        match self.status {
            Status::PartiallyDispensed | Status::Failed => self
                .lines
                .iter()
                .map(|l| {
                    i64::from(l.quantity.saturating_sub(l.dispensed)).saturating_mul(l.unit_price)
                })
                .fold(0i64, i64::saturating_add),
            Status::Unknown => self.amount(),
            _ => 0,
        }
    }
}

/// Record what a result says came out, for an order that was given up
/// (`Rejected`): the status stays, the lines show the goods.
fn record_goods(
    order: &Order,
    items: &[(i64, u32, u32)],
    next: &mut Order,
) -> Result<(), TransitionError> {
    let dispensed = result_per_line(order, items)?;
    for (l, d) in next.lines.iter_mut().zip(dispensed) {
        l.dispensed = d;
    }
    next.result_applied = true;
    Ok(())
}

/// Apply one event. Pure.
pub fn apply(order: &Order, event: &Event) -> Result<Transition, TransitionError> {
    use Status::*;
    let mut next = order.clone();
    match (order.status, event) {
        (AwaitingPayment, Event::Paid) => next.status = Dispatching,
        (AwaitingPayment, Event::PaymentExpired) => next.status = Expired,
        // Only before payment: no command has left, so nothing is owed to
        // or from the machine. Of a cancel, a payment and the expiry, the
        // first stored wins (compare-and-set on `awaiting_payment`).
        (AwaitingPayment, Event::Cancel) => next.status = Cancelled,
        (Dispatching, Event::Accepted) => next.status = Dispensing,
        // A duplicate ack after we moved on changes nothing.
        (Dispensing | Completed | PartiallyDispensed | Failed | Unknown, Event::Accepted) => {
            return Ok(Transition::Unchanged)
        }
        (Dispatching, Event::Refused(reason)) => {
            next.status = Rejected;
            next.error = Some(reason.clone());
        }
        (Dispatching, Event::NotAccepted(why)) => {
            next.status = Rejected;
            next.error = Some(why.as_str().into_owned());
        }
        (Dispatching, Event::GoWithheld) => {
            next.status = Rejected;
            next.error = Some(GiveUp::AcceptNotRecorded.as_str().into_owned());
        }
        // Withheld `go`: no result can have come from a compliant machine.
        (Dispensing, Event::GoWithheld) if !order.result_applied => {
            next.status = Rejected;
            next.error = Some(GiveUp::AcceptNotRecorded.as_str().into_owned());
        }
        (
            Rejected,
            Event::Refused(_) | Event::NotAccepted(_) | Event::GoWithheld | Event::Accepted,
        ) => return Ok(Transition::Unchanged),
        // A result never implies an acceptance: before one was recorded,
        // the order never got its `go`. `no_go` (or nothing out) gives it
        // up; goods out (a machine that did not wait for `go`) give it up
        // too, with what came out recorded and notified.
        (Dispatching, Event::Result { items, error }) => {
            record_goods(order, items, &mut next)?;
            next.status = Rejected;
            next.error = Some(if next.dispensed_units() > 0 {
                "dispensed_without_go".to_string()
            } else {
                error
                    .clone()
                    .filter(|e| !e.is_empty())
                    .unwrap_or_else(|| GiveUp::NoGo.as_str().into_owned())
            });
        }
        (Rejected, Event::Result { items, .. }) => {
            if order.result_applied {
                check_result(order, items)?;
                return Ok(Transition::Unchanged);
            }
            let dispensed = result_per_line(order, items)?;
            if dispensed.iter().all(|d| *d == 0) {
                // Nothing came out: what the record already says.
                return Ok(Transition::Unchanged);
            }
            record_goods(order, items, &mut next)?;
        }
        (Dispensing | Unknown, Event::Result { items, error }) => {
            if order.result_applied {
                return Ok(Transition::Unchanged);
            }
            let dispensed = result_per_line(order, items)?;
            for (l, d) in next.lines.iter_mut().zip(dispensed) {
                l.dispensed = d;
            }
            let wanted: u64 = next.lines.iter().map(|l| u64::from(l.quantity)).sum();
            let got = next.dispensed_units();
            next.status = if got == wanted {
                Completed
            } else if got == 0 {
                Failed
            } else {
                PartiallyDispensed
            };
            next.error = error
                .clone()
                .filter(|e| !e.is_empty())
                .or_else(|| (got < wanted).then(|| "short_dispense".to_string()));
            next.result_applied = true;
        }
        (Completed | PartiallyDispensed | Failed, Event::Result { items, .. }) => {
            // A repeat is a no-op; a result that could never have settled
            // this order is not a repeat but a bad message.
            check_result(order, items)?;
            return Ok(Transition::Unchanged);
        }
        (Dispensing, Event::DispenseDeadline) => {
            next.status = Unknown;
            next.error = Some("no_result_before_deadline".into());
        }
        (Unknown | Completed | PartiallyDispensed | Failed | Rejected, Event::DispenseDeadline) => {
            return Ok(Transition::Unchanged)
        }
        (Expired, Event::PaymentExpired) => return Ok(Transition::Unchanged),
        (s, _) => return Err(TransitionError::Conflict(s)),
    }
    Ok(Transition::Changed(next))
}

/// Whether `items` could settle `order` (see [`result_per_line`]).
pub fn check_result(order: &Order, items: &[(i64, u32, u32)]) -> Result<(), TransitionError> {
    result_per_line(order, items).map(|_| ())
}

/// A result must name exactly the order's lines, with the ordered
/// quantities and no more dispensed than ordered. Returns what was dispensed
/// per order line (0 for a line the result leaves out).
///
/// An order may repeat a product (`POST /orders` accepts repeated lines and
/// the command carries each), and the machine reports each command line, so
/// each result item settles the first line not yet reported with its product
/// and quantity. Matching by product alone refused every result of such an
/// order ("product listed twice"), leaving it `unknown` with a full refund
/// although the goods came out (found by the `device_payload` fuzz target).
fn result_per_line(order: &Order, items: &[(i64, u32, u32)]) -> Result<Vec<u32>, TransitionError> {
    let mut dispensed: Vec<Option<u32>> = vec![None; order.lines.len()];
    for (p, q, d) in items {
        if !order.lines.iter().any(|l| l.product_id == *p) {
            return Err(TransitionError::BadResult("product not in the order"));
        }
        let open = order
            .lines
            .iter()
            .zip(dispensed.iter_mut())
            .filter(|(l, got)| l.product_id == *p && got.is_none());
        let mut same_quantity = None;
        let mut any_open = false;
        for (l, got) in open {
            any_open = true;
            if l.quantity == *q {
                same_quantity = Some(got);
                break;
            }
        }
        let Some(slot) = same_quantity else {
            return Err(TransitionError::BadResult(if any_open {
                "quantity differs from the order"
            } else {
                "product listed twice"
            }));
        };
        if d > q {
            return Err(TransitionError::BadResult("dispensed more than ordered"));
        }
        *slot = Some(*d);
    }
    Ok(dispensed.into_iter().map(|d| d.unwrap_or(0)).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn order(pay_later: bool) -> Order {
        Order::new(
            vec![
                Line {
                    product_id: 1,
                    quantity: 2,
                    dispensed: 0,
                    unit_price: 350,
                },
                Line {
                    product_id: 2,
                    quantity: 1,
                    dispensed: 0,
                    unit_price: 200,
                },
            ],
            pay_later,
        )
    }

    fn changed(t: Result<Transition, TransitionError>) -> Order {
        match t {
            Ok(Transition::Changed(o)) => o,
            other => panic!("expected a change, got {other:?}"),
        }
    }

    #[test]
    fn repeated_product_lines_settle_line_by_line() {
        let line = |q| Line {
            product_id: 1,
            quantity: q,
            dispensed: 0,
            unit_price: 100,
        };
        let mut o = Order::new(vec![line(1), line(2)], false);
        o.status = Status::Dispensing;
        // Reported in another order than the command's lines.
        let ev = Event::Result {
            items: vec![(1, 2, 1), (1, 1, 1)],
            error: None,
        };
        let next = changed(apply(&o, &ev));
        assert_eq!(next.status, Status::PartiallyDispensed);
        assert_eq!(
            next.lines.iter().map(|l| l.dispensed).collect::<Vec<_>>(),
            vec![1, 1]
        );
        assert_eq!(next.refund_amount(), 100);
        // One line more than ordered is still refused.
        let ev = Event::Result {
            items: vec![(1, 1, 1), (1, 2, 2), (1, 1, 1)],
            error: None,
        };
        assert!(matches!(apply(&o, &ev), Err(TransitionError::BadResult(_))));
    }

    #[test]
    fn happy_path_and_refunds() {
        let o = changed(apply(&order(false), &Event::Accepted));
        assert_eq!(o.status, Status::Dispensing);
        let full = changed(apply(
            &o,
            &Event::Result {
                items: vec![(1, 2, 2), (2, 1, 1)],
                error: None,
            },
        ));
        assert_eq!((full.status, full.refund_amount()), (Status::Completed, 0));
        let part = changed(apply(
            &o,
            &Event::Result {
                items: vec![(1, 2, 1), (2, 1, 1)],
                error: Some("motor_jam".into()),
            },
        ));
        assert_eq!(
            (part.status, part.refund_amount()),
            (Status::PartiallyDispensed, 350)
        );
        assert_eq!(part.error.as_deref(), Some("motor_jam"));
        let none = changed(apply(
            &o,
            &Event::Result {
                items: vec![(1, 2, 0), (2, 1, 0)],
                error: None,
            },
        ));
        assert_eq!((none.status, none.refund_amount()), (Status::Failed, 900));
        assert_eq!(
            apply(
                &full,
                &Event::Result {
                    items: vec![],
                    error: None
                }
            ),
            Ok(Transition::Unchanged)
        );
    }

    #[test]
    fn unknown_then_late_result_settles() {
        let o = changed(apply(&order(false), &Event::Accepted));
        let u = changed(apply(&o, &Event::DispenseDeadline));
        assert_eq!((u.status, u.refund_amount()), (Status::Unknown, 900));
        let s = changed(apply(
            &u,
            &Event::Result {
                items: vec![(1, 2, 2), (2, 1, 1)],
                error: None,
            },
        ));
        assert_eq!(s.status, Status::Completed);
    }

    #[test]
    fn impossible_results_are_refused() {
        let o = changed(apply(&order(false), &Event::Accepted));
        for items in [
            vec![(1, 2, 3)],
            vec![(9, 1, 1)],
            vec![(1, 5, 1)],
            vec![(1, 2, 1), (1, 2, 1)],
        ] {
            assert!(matches!(
                apply(&o, &Event::Result { items, error: None }),
                Err(TransitionError::BadResult(_))
            ));
        }
    }

    #[test]
    fn pay_later_paths() {
        let o = order(true);
        assert_eq!(changed(apply(&o, &Event::Paid)).status, Status::Dispatching);
        let e = changed(apply(&o, &Event::PaymentExpired));
        assert_eq!(e.status, Status::Expired);
        assert!(matches!(
            apply(&e, &Event::Paid),
            Err(TransitionError::Conflict(Status::Expired))
        ));
    }

    #[test]
    fn cancel_only_before_payment() {
        let o = order(true);
        let c = changed(apply(&o, &Event::Cancel));
        assert_eq!(c.status, Status::Cancelled);
        assert!(c.status.is_final() && !c.status.holds_reservation());
        assert_eq!((c.refund_amount(), notices(&o, &c)), (0, vec![]));
        // Nothing moves a cancelled order, a second cancel included.
        for ev in [Event::Cancel, Event::Paid, Event::PaymentExpired] {
            assert_eq!(
                apply(&c, &ev),
                Err(TransitionError::Conflict(Status::Cancelled)),
                "{ev:?}"
            );
        }
        // Paid, expired or never `pay_later`: too late to cancel.
        let paid = changed(apply(&o, &Event::Paid));
        let expired = changed(apply(&o, &Event::PaymentExpired));
        for x in [paid, expired, order(false)] {
            assert!(matches!(
                apply(&x, &Event::Cancel),
                Err(TransitionError::Conflict(_))
            ));
        }
        assert_eq!(Status::parse("cancelled"), Some(Status::Cancelled));
        assert_eq!(Status::Cancelled.as_str(), "cancelled");
    }

    #[test]
    fn all_statuses_listed_once() {
        let names: std::collections::HashSet<&str> =
            Status::ALL.iter().map(|s| s.as_str()).collect();
        assert_eq!(names.len(), Status::ALL.len());
        for s in Status::ALL {
            assert_eq!(Status::parse(s.as_str()), Some(s));
        }
    }

    #[test]
    fn give_up_reasons_round_trip() {
        for g in [
            GiveUp::AcceptTimeout,
            GiveUp::GatewayRestart,
            GiveUp::OwnerLost,
            GiveUp::DispatchLost,
            GiveUp::CallerGone,
            GiveUp::AcceptNotRecorded,
            GiveUp::NoGo,
            GiveUp::NotDelivered("machine is not connected".into()),
        ] {
            assert_eq!(GiveUp::parse(&g.as_str()), Some(g.clone()));
        }
        assert_eq!(GiveUp::parse("door_open"), None);
        assert!(!GiveUp::NoGo.owes_cancel());
        assert!(!GiveUp::NotDelivered(String::new()).owes_cancel());
        assert!(GiveUp::CallerGone.owes_cancel());
    }

    #[test]
    fn a_result_never_implies_acceptance() {
        let o = order(false);
        // no_go before any acceptance: given up, nothing owed.
        let r = changed(apply(
            &o,
            &Event::Result {
                items: vec![],
                error: Some("no_go".into()),
            },
        ));
        assert_eq!(r.status, Status::Rejected);
        assert_eq!(r.error.as_deref(), Some("no_go"));
        assert_eq!(notices(&o, &r), vec![]);
        // Goods out without `go`: given up, goods recorded and notified.
        let r = changed(apply(
            &o,
            &Event::Result {
                items: vec![(1, 2, 2), (2, 1, 0)],
                error: None,
            },
        ));
        assert_eq!(r.status, Status::Rejected);
        assert_eq!(r.dispensed_amount(), 700);
        assert_eq!(r.refund_amount(), 0);
        assert_eq!(notices(&o, &r), vec![Notice::DispensedAfterRejection]);
        // The acceptance that comes after changes nothing.
        assert_eq!(apply(&r, &Event::Accepted), Ok(Transition::Unchanged));
    }

    #[test]
    fn goods_after_a_give_up_are_recorded_once() {
        let o = changed(apply(
            &order(false),
            &Event::NotAccepted(GiveUp::AcceptTimeout),
        ));
        let nothing = Event::Result {
            items: vec![(1, 2, 0), (2, 1, 0)],
            error: Some("no_go".into()),
        };
        assert_eq!(apply(&o, &nothing), Ok(Transition::Unchanged));
        let goods = Event::Result {
            items: vec![(1, 2, 1), (2, 1, 1)],
            error: None,
        };
        let r = changed(apply(&o, &goods));
        assert_eq!(r.status, Status::Rejected);
        assert_eq!(r.error.as_deref(), Some("accept_timeout"));
        assert_eq!(r.dispensed_amount(), 550);
        assert_eq!(notices(&o, &r), vec![Notice::DispensedAfterRejection]);
        assert_eq!(apply(&r, &goods), Ok(Transition::Unchanged));
    }

    #[test]
    fn no_go_after_acceptance_fails_with_a_full_refund() {
        let o = changed(apply(&order(false), &Event::Accepted));
        let f = changed(apply(
            &o,
            &Event::Result {
                items: vec![],
                error: Some("no_go".into()),
            },
        ));
        assert_eq!((f.status, f.refund_amount()), (Status::Failed, 900));
        assert_eq!(f.error.as_deref(), Some("no_go"));
        assert_eq!(notices(&o, &f), vec![Notice::DispenseFailed]);
    }

    #[test]
    fn withheld_go_gives_up_a_recorded_acceptance() {
        let o = changed(apply(&order(false), &Event::Accepted));
        let r = changed(apply(&o, &Event::GoWithheld));
        assert_eq!(r.status, Status::Rejected);
        assert_eq!(r.error.as_deref(), Some("accept_not_recorded"));
        assert!(Event::GoWithheld.owes_cancel());
    }

    #[test]
    fn refund_then_late_completion_is_a_mismatch() {
        let o = changed(apply(&order(false), &Event::Accepted));
        let mut u = changed(apply(&o, &Event::DispenseDeadline));
        u.refunded_amount = u.refund_amount();
        let done = changed(apply(
            &u,
            &Event::Result {
                items: vec![(1, 2, 2), (2, 1, 1)],
                error: None,
            },
        ));
        assert_eq!((done.refund_amount(), done.refunded_amount), (0, 900));
        assert_eq!(
            notices(&u, &done),
            vec![Notice::Completed, Notice::RefundMismatch]
        );
    }

    fn any_event() -> impl Strategy<Value = Event> {
        let items = proptest::collection::vec((0i64..4, 0u32..4, 0u32..4), 0..4);
        prop_oneof![
            Just(Event::Paid),
            Just(Event::PaymentExpired),
            Just(Event::Cancel),
            Just(Event::Accepted),
            Just(Event::Refused("door_open".into())),
            Just(Event::NotAccepted(GiveUp::AcceptTimeout)),
            Just(Event::NotAccepted(GiveUp::CallerGone)),
            Just(Event::GoWithheld),
            Just(Event::DispenseDeadline),
            (items, proptest::option::of("[a-z_]{0,8}"))
                .prop_map(|(items, error)| Event::Result { items, error }),
        ]
    }

    proptest! {
        /// Over any event sequence: dispensed never exceeds quantity, the
        /// refund never exceeds the amount, a final status never changes, and
        /// a result is applied at most once.
        #[test]
        fn invariants_hold(pay_later: bool, events in proptest::collection::vec(any_event(), 0..24)) {
            let mut o = order(pay_later);
            let mut results_applied = 0;
            for ev in &events {
                let before = o.clone();
                match apply(&o, ev) {
                    Ok(Transition::Changed(n)) => {
                        prop_assert!(!before.status.is_final() || n.status == before.status, "final status {:?} changed by {:?}", before.status, ev);
                        // A result never implies an acceptance.
                        if n.status == Status::Dispensing {
                            prop_assert_eq!(ev, &Event::Accepted);
                            prop_assert_eq!(before.status, Status::Dispatching);
                        }
                        if n.status == Status::Rejected {
                            prop_assert_eq!(n.refund_amount(), 0);
                        }
                        // Only an unpaid order is cancelled, and only by a cancel.
                        if n.status == Status::Cancelled {
                            prop_assert_eq!(ev, &Event::Cancel);
                            prop_assert_eq!(before.status, Status::AwaitingPayment);
                        }
                        if n.result_applied && !before.result_applied { results_applied += 1; }
                        o = n;
                    }
                    Ok(Transition::Unchanged) | Err(_) => {}
                }
                prop_assert!(o.lines.iter().all(|l| l.dispensed <= l.quantity));
                prop_assert!(o.refund_amount() >= 0 && o.refund_amount() <= o.amount());
                prop_assert!(results_applied <= 1);
            }
        }
    }
}
