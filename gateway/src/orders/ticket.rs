//! The [`Ticket`] on which an order's dispense decision is made exactly
//! once on this node: either an ack's recorded acceptance (then `cmd/go`
//! follows) or a give-up (accept deadline, caller gone, shutdown), never
//! both.

use std::sync::Arc;

use serde_json::json;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use vendgate_proto::machine::MachineNo;

use crate::storage::StoredOrder;

/// What was decided about an order whose command left.
#[derive(Debug, Clone)]
pub(crate) enum Decision {
    /// The acceptance was recorded and `go` is sent: 0.
    Accepted,
    /// The machine refused: 30005.
    Refused(String),
    /// No acceptance recorded (none in time, or storage failed): 30002, and
    /// no `go` is ever sent for it.
    NotAccepted,
    /// The stored record answers (the order was settled elsewhere: another
    /// node took the ack, or a result gave it up).
    Stored(Box<StoredOrder>),
}

#[derive(Debug)]
enum Phase {
    /// In the machine's queue.
    Queued,
    /// Taken by the worker: being stored.
    Storing,
    /// The command may have left; no ack is being recorded.
    AwaitingAck,
    /// An ack's acceptance is being recorded on this node.
    Deciding,
    Decided(Decision),
    /// Given up before a decision: no `go` is ever sent for it from here.
    Abandoned,
}

/// How [`Ticket::begin_decision`] found the order.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Begin {
    /// This ack decides.
    Deciding,
    /// Another ack decides or decided: this one is a repeat.
    Repeat,
    /// Given up here: no `go` from this node.
    Abandoned,
}

/// How [`Ticket::abandon`] found the order.
#[derive(Debug)]
pub(crate) enum Abandon {
    /// It never left the queue: nothing stored, nothing sent.
    NotSent,
    /// Taken, no ack being recorded here: storage holds the decision.
    Pending,
    /// An ack's acceptance was being recorded here; if it commits it gets
    /// no `go` (the ack's handler gives the order up again).
    Withheld,
    Decided(Decision),
}

/// The one place an order's dispense decision is made on this node.
#[derive(Debug)]
pub(crate) struct Ticket {
    pub machine: MachineNo,
    phase: std::sync::Mutex<Phase>,
    pub(super) decided: Notify,
    /// Cancelled when the merchant's request goes away (its connection
    /// closed) before the answer.
    pub(super) gone: CancellationToken,
    /// When the command left and its TTL: written with the decision's
    /// event rather than as a row of its own (one commit fewer per order).
    pub(super) sent: std::sync::OnceLock<serde_json::Value>,
}

impl Ticket {
    pub(super) fn new(machine: MachineNo) -> Arc<Self> {
        Arc::new(Self {
            machine,
            phase: std::sync::Mutex::new(Phase::Queued),
            decided: Notify::new(),
            gone: CancellationToken::new(),
            sent: std::sync::OnceLock::new(),
        })
    }

    fn with<R>(&self, f: impl FnOnce(&mut Phase) -> R) -> R {
        // A poisoned lock means a panic while holding it, which the code
        // below cannot do (plain assignments); keep going with the value.
        let mut p = self.phase.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut p)
    }

    /// The worker takes the job from the queue. False when the caller
    /// stopped waiting (30003 answered, or its connection closed).
    pub(super) fn take(&self) -> bool {
        let gone = self.gone.is_cancelled();
        self.with(|p| match p {
            Phase::Queued if !gone => {
                *p = Phase::Storing;
                true
            }
            Phase::Queued => {
                *p = Phase::Abandoned;
                false
            }
            _ => false,
        })
    }

    /// The caller's deadline to be sent passed while queued: true if the
    /// job is now abandoned before the worker took it.
    pub(super) fn abandon_queued(&self) -> bool {
        self.with(|p| match p {
            Phase::Queued => {
                *p = Phase::Abandoned;
                true
            }
            _ => false,
        })
    }

    /// Stored; the command is about to leave. False if the order was
    /// abandoned meanwhile (then it must not leave).
    pub(super) fn leaving(&self) -> bool {
        self.with(|p| match p {
            Phase::Storing => {
                *p = Phase::AwaitingAck;
                true
            }
            _ => false,
        })
    }

    /// An ack arrived: start recording it, unless another ack is being
    /// recorded (a repeat), the order is decided, or it was abandoned here.
    pub(crate) fn begin_decision(&self) -> Begin {
        self.with(|p| match p {
            Phase::AwaitingAck => {
                *p = Phase::Deciding;
                Begin::Deciding
            }
            Phase::Deciding | Phase::Decided(_) => Begin::Repeat,
            Phase::Queued | Phase::Storing | Phase::Abandoned => Begin::Abandoned,
        })
    }

    /// The ack's outcome. False when the order was abandoned while it was
    /// being recorded: an acceptance then gets no `go`.
    pub(crate) fn decide(&self, d: Decision) -> bool {
        let done = self.with(|p| match p {
            Phase::Deciding | Phase::AwaitingAck => {
                *p = Phase::Decided(d);
                true
            }
            _ => false,
        });
        if done {
            self.decided.notify_one();
        }
        done
    }

    /// The timeline detail of the decision: when the command left.
    pub(crate) fn sent_detail(&self) -> serde_json::Value {
        self.sent.get().cloned().unwrap_or_else(|| json!({}))
    }

    pub(super) fn decision(&self) -> Option<Decision> {
        self.with(|p| match p {
            Phase::Decided(d) => Some(d.clone()),
            _ => None,
        })
    }

    pub(super) fn deciding(&self) -> bool {
        self.with(|p| matches!(p, Phase::Deciding))
    }

    /// Give the order up unless it is decided: from here on no `go` is
    /// sent for it by this node.
    pub(crate) fn abandon(&self) -> Abandon {
        self.with(|p| {
            let how = match p {
                Phase::Queued => Abandon::NotSent,
                Phase::Storing | Phase::AwaitingAck | Phase::Abandoned => Abandon::Pending,
                Phase::Deciding => Abandon::Withheld,
                Phase::Decided(d) => return Abandon::Decided(d.clone()),
            };
            *p = Phase::Abandoned;
            how
        })
    }
}

/// Marks the ticket's caller gone if the request future is dropped before
/// its answer (hyper drops it when the client closes the connection).
pub(super) struct CallerGuard(pub(super) Option<Arc<Ticket>>);

impl Drop for CallerGuard {
    fn drop(&mut self) {
        if let Some(t) = self.0.take() {
            t.gone.cancel();
        }
    }
}
