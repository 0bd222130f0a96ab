//! The journal of a simulated machine: what it received, sent and actually
//! dispensed, in order, so tests can assert on the machine's side of a run.

use tokio::time::Instant;
use vendgate_proto::msg::{
    AckMsg, DispenseCmd, InventoryMsg, PongMsg, ResultItem, ResultMsg, StateMsg,
};

/// Entries kept per machine; when exceeded the oldest half is dropped, so a
/// long-running fleet does not grow without bound. Dispensed order ids are
/// kept separately and never dropped.
pub const JOURNAL_LIMIT: usize = 100_000;

/// One thing that happened, and when (tokio's clock, so paused-time tests
/// see virtual time).
#[derive(Debug, Clone, PartialEq)]
pub struct JournalEntry {
    pub at: Instant,
    pub event: JournalEvent,
}

/// What happened.
#[derive(Debug, Clone, PartialEq)]
pub enum JournalEvent {
    /// The gateway answered CONNECT with a successful CONNACK.
    Connected,
    /// The gateway granted the `cmd/#` subscription: commands can arrive.
    Subscribed,
    /// The gateway refused the `cmd/#` subscription.
    SubscribeRefused,
    /// The connection ended or could not be established.
    ConnectionLost {
        error: String,
    },
    /// The machine sent DISCONNECT and went offline on purpose.
    Disconnected,
    /// The connection was cut without DISCONNECT (kill, drop-connection).
    Dropped,
    /// A `cmd/dispense` arrived (whatever the answer).
    DispenseReceived(DispenseCmd),
    /// A `cmd/go` arrived (whatever the answer).
    GoReceived {
        order_id: u64,
    },
    /// A `cmd/cancel` arrived.
    CancelReceived {
        order_id: u64,
    },
    /// The machine accepted the order and holds it, dispensing nothing
    /// until `cmd/go` (its ack follows).
    Held {
        order_id: u64,
    },
    /// A `cmd/cancel` dropped a held order: it will never be dispensed.
    HoldCancelled {
        order_id: u64,
    },
    /// Neither `go` nor `cancel` came within the go timeout: the held order
    /// was dropped undispensed and its `no_go` result stored (and published
    /// unless the machine is silent).
    NoGo {
        order_id: u64,
    },
    /// The machine rebooted: every held (and slow-ack pending) order was
    /// forgotten; stock and finished orders' answers were kept.
    Rebooted {
        forgotten: Vec<u64>,
    },
    /// A `cmd/ping` arrived.
    PingReceived {
        id: u64,
    },
    /// A message that is not a well-formed command for this machine; ignored.
    Malformed {
        topic: String,
        error: String,
    },
    /// Goods physically came out (or were attempted: a failing machine
    /// records a dispense of zero). One entry per dispense, so a test can
    /// check that no order is ever dispensed twice; an order without one
    /// was never dispensed (see also `SimHandle::dispensed_orders`, which
    /// the journal's trimming does not affect).
    Dispensed {
        order_id: u64,
        items: Vec<ResultItem>,
    },
    /// Messages handed to the MQTT client for publishing.
    StateSent(StateMsg),
    InventorySent(InventoryMsg),
    PongSent(PongMsg),
    AckSent(AckMsg),
    ResultSent(ResultMsg),
    /// A hostile or malformed payload handed to the MQTT client on purpose
    /// (behaviour `malformed`), with its full topic.
    RawSent {
        topic: String,
        payload: Vec<u8>,
    },
    /// The machine stopped reading and answering with its socket left open
    /// (behaviour `half-open`).
    Stalled {
        ms: u64,
    },
    /// A half-open stall ended: the machine reads its socket again.
    StallEnded,
    /// Goods sold at the machine itself, not through the gateway.
    SoldLocally {
        product_id: i64,
        quantity: u32,
    },
}

impl JournalEvent {
    /// The order the event is about, if any.
    pub fn order_id(&self) -> Option<u64> {
        match self {
            Self::DispenseReceived(cmd) => Some(cmd.order_id),
            Self::GoReceived { order_id }
            | Self::CancelReceived { order_id }
            | Self::Held { order_id }
            | Self::HoldCancelled { order_id }
            | Self::NoGo { order_id }
            | Self::Dispensed { order_id, .. } => Some(*order_id),
            Self::AckSent(ack) => Some(ack.order_id),
            Self::ResultSent(result) => Some(result.order_id),
            _ => None,
        }
    }
}
