//! The order state machine: `apply(order, event) -> Result<Transition, _>`,
//! pure (no I/O, no clock: times come in with the event). The order service
//! persists each transition before it acts on it. Property tests below check
//! the invariants over arbitrary event sequences.

use serde::{Deserialize, Serialize};

/// Order status, as API.md spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
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
    Unknown,
}

impl Status {
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

    /// No event except a late result changes these.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            Self::Completed
                | Self::PartiallyDispensed
                | Self::Failed
                | Self::Rejected
                | Self::Expired
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
}

/// What can happen to an order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// `pay_later` order paid: goes to dispatch.
    Paid,
    /// Unpaid past the deadline.
    PaymentExpired,
    /// The machine accepted the command.
    Accepted,
    /// The machine refused (reason).
    Refused(String),
    /// No ack within `accept_timeout`, or the machine was offline at dispatch.
    NotAccepted(String),
    /// The machine's per-item result: (product_id, quantity, dispensed).
    Result {
        items: Vec<(i64, u32, u32)>,
        error: Option<String>,
    },
    /// No result within the dispense deadline.
    DispenseDeadline,
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
        }
    }

    /// Σ quantity × unit price.
    pub fn amount(&self) -> i64 {
        self.lines
            .iter()
            .map(|l| i64::from(l.quantity).saturating_mul(l.unit_price))
            .fold(0i64, i64::saturating_add)
    }

    /// What the merchant owes back: Σ undispensed × unit price for settled
    /// orders with a shortfall; the whole amount while the outcome is
    /// `unknown` (the goods may not have come out; a late result corrects it).
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

/// Apply one event. Pure.
pub fn apply(order: &Order, event: &Event) -> Result<Transition, TransitionError> {
    use Status::*;
    let mut next = order.clone();
    match (order.status, event) {
        (AwaitingPayment, Event::Paid) => next.status = Dispatching,
        (AwaitingPayment, Event::PaymentExpired) => next.status = Expired,
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
            next.error = Some(why.clone());
        }
        (Rejected, Event::Refused(_) | Event::NotAccepted(_)) => return Ok(Transition::Unchanged),
        (Dispensing | Unknown, Event::Result { items, error }) => {
            if order.result_applied {
                return Ok(Transition::Unchanged);
            }
            let dispensed = result_per_line(order, items)?;
            for (l, d) in next.lines.iter_mut().zip(dispensed) {
                l.dispensed = d;
            }
            let wanted: u64 = next.lines.iter().map(|l| u64::from(l.quantity)).sum();
            let got: u64 = next.lines.iter().map(|l| u64::from(l.dispensed)).sum();
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
        (Unknown | Completed | PartiallyDispensed | Failed, Event::DispenseDeadline) => {
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

    fn any_event() -> impl Strategy<Value = Event> {
        let items = proptest::collection::vec((0i64..4, 0u32..4, 0u32..4), 0..4);
        prop_oneof![
            Just(Event::Paid),
            Just(Event::PaymentExpired),
            Just(Event::Accepted),
            Just(Event::Refused("door_open".into())),
            Just(Event::NotAccepted("accept_timeout".into())),
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
                        prop_assert!(!before.status.is_final(), "final status {:?} changed by {:?}", before.status, ev);
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
