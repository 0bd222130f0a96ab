//! What nodes say to each other on NATS: the subjects and the JSON bodies.
//! Every subject starts with `[cluster] subject_prefix`, so several clusters
//! can share one NATS.

use serde::{Deserialize, Serialize};
use vendgate_proto::machine::MachineNo;

use crate::domain::order::Line;
use crate::link::commands::DeliveryError;
use crate::orders::inventory::StockView;
use crate::orders::OrderError;

/// Subject builders for one prefix.
#[derive(Debug, Clone)]
pub struct Subjects {
    prefix: String,
}

impl Subjects {
    pub fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.to_string(),
        }
    }

    /// Requests for the connection of machine `m` under `epoch`. Only the
    /// node holding that very connection subscribes, so a request that
    /// names an old epoch finds no responder instead of a stale connection.
    pub fn owner(&self, m: &MachineNo, epoch: u64) -> String {
        format!("{}.own.{m}.{epoch}", self.prefix)
    }

    /// Presence changes of every node ([`crate::fleet::view::PresenceNote`]); an
    /// online note is also the take-over announcement.
    pub fn presence(&self) -> String {
        format!("{}.presence", self.prefix)
    }

    /// Node heartbeats ([`crate::fleet::view::Heartbeat`]).
    pub fn heartbeat(&self) -> String {
        format!("{}.node", self.prefix)
    }

    /// Reservations released by a sweep on a node that does not hold the
    /// machine ([`Released`]).
    pub fn released(&self) -> String {
        format!("{}.released", self.prefix)
    }

    /// Machine uplinks copied to every node's hub (headers carry the topic).
    pub fn uplinks(&self) -> String {
        format!("{}.uplink", self.prefix)
    }
}

/// Header names of forwarded uplinks.
pub const H_TOPIC: &str = "Vendgate-Topic";
pub const H_NODE: &str = "Vendgate-Node";
pub const H_QOS: &str = "Vendgate-Qos";
pub const H_RETAIN: &str = "Vendgate-Retain";

/// An order request forwarded to the owner.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PlaceOnOwner {
    pub order_id: u64,
    pub merchant: String,
    pub machine_no: MachineNo,
    pub lines: Vec<(i64, u32)>,
    pub out_trade_no: Option<String>,
    pub pay_later: bool,
    /// How long the requester waits for the answer, from sending (the
    /// owner answers `owner_answer_slack` sooner).
    pub wait_ms: u64,
}

/// A request to the node holding a machine's connection.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum OwnerRequest {
    Place(PlaceOnOwner),
    Pay {
        merchant: String,
        order_id: u64,
        wait_ms: u64,
    },
    /// Publish a command on the machine's topic (`suffix` as in
    /// `Command::suffix`), payload base64.
    Command {
        suffix: String,
        payload: String,
        /// Answer `delivered` only once the machine acknowledged it, waiting
        /// up to this long (absent: once it is queued).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        confirm_ms: Option<u64>,
    },
    Ping {
        timeout_ms: u64,
    },
    /// The machine's stock figures as the owner holds them.
    Stock,
}

/// The owner's answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "answer", rename_all = "snake_case")]
pub enum OwnerReply {
    Placed {
        order_id: u64,
    },
    /// The API code (API.md), and a machine's refusal reason for 30005:
    /// numbers that stay the same across versions, unlike Rust names.
    Failed {
        code: i32,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
    Delivered,
    NotDelivered {
        error: String,
    },
    Pong {
        rtt_us: u64,
    },
    Stock {
        items: Vec<StockView>,
    },
    /// The connection the subject names is gone from this node.
    Moved,
}

/// A released reservation (see [`Subjects::released`]).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Released {
    pub machine_no: MachineNo,
    pub lines: Vec<Line>,
}

impl OwnerReply {
    /// The wire form of an order error.
    pub fn failed(e: &OrderError) -> Self {
        Self::Failed {
            code: e.code().code(),
            reason: match e {
                OrderError::Refused(r) => Some(r.clone()),
                _ => None,
            },
        }
    }
}

/// The order error a [`OwnerReply::Failed`] carries (unknown codes: 50000).
pub fn order_error(code: i32, reason: Option<String>) -> OrderError {
    OrderError::from_code(code, reason)
}

/// The wire name of a command's delivery error ([`OwnerReply::NotDelivered`]).
pub fn delivery_name(e: DeliveryError) -> &'static str {
    match e {
        DeliveryError::NotConnected => "not_connected",
        DeliveryError::NotSubscribed => "not_subscribed",
        DeliveryError::Backpressure => "backpressure",
        DeliveryError::Timeout => "timeout",
    }
}

/// The delivery error a wire name stands for (unknown names: not connected).
pub fn delivery_from(name: &str) -> DeliveryError {
    match name {
        "not_subscribed" => DeliveryError::NotSubscribed,
        "backpressure" => DeliveryError::Backpressure,
        "timeout" => DeliveryError::Timeout,
        _ => DeliveryError::NotConnected,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn order_errors_cross_the_wire_by_code() {
        for e in [
            OrderError::MachineNotFound,
            OrderError::NotAccepted,
            OrderError::Busy,
            OrderError::InsufficientStock,
            OrderError::Refused("door_open".into()),
            OrderError::OrderNotFound,
            OrderError::StateConflict,
            OrderError::DuplicateOutTradeNo,
            OrderError::Internal,
        ] {
            let json = serde_json::to_string(&OwnerReply::failed(&e)).unwrap();
            let back: OwnerReply = serde_json::from_str(&json).unwrap();
            let OwnerReply::Failed { code, reason } = back else {
                panic!("not a failure: {json}");
            };
            assert_eq!(order_error(code, reason), e, "{json}");
        }
    }

    /// The JSON an owner answers for each order error: API codes (and a
    /// refusal's reason), never Rust names, so renaming a variant cannot
    /// break a rolling upgrade. A new variant fails to compile here until
    /// its wire form is pinned.
    #[test]
    fn order_error_wire_form_is_pinned() {
        let pinned = |e: &OrderError| match e {
            OrderError::MachineNotFound => r#"{"answer":"failed","code":30001}"#,
            OrderError::Offline | OrderError::NotAccepted => r#"{"answer":"failed","code":30002}"#,
            OrderError::Busy => r#"{"answer":"failed","code":30003}"#,
            OrderError::InsufficientStock => r#"{"answer":"failed","code":30004}"#,
            OrderError::Refused(_) => r#"{"answer":"failed","code":30005,"reason":"door_open"}"#,
            OrderError::OrderNotFound => r#"{"answer":"failed","code":40001}"#,
            OrderError::StateConflict => r#"{"answer":"failed","code":40002}"#,
            OrderError::DuplicateOutTradeNo => r#"{"answer":"failed","code":40003}"#,
            OrderError::RepeatOf(_) | OrderError::Internal => r#"{"answer":"failed","code":50000}"#,
        };
        for e in [
            OrderError::MachineNotFound,
            OrderError::Offline,
            OrderError::NotAccepted,
            OrderError::Busy,
            OrderError::InsufficientStock,
            OrderError::Refused("door_open".into()),
            OrderError::OrderNotFound,
            OrderError::StateConflict,
            OrderError::DuplicateOutTradeNo,
            OrderError::RepeatOf(7),
            OrderError::Internal,
        ] {
            let json = serde_json::to_string(&OwnerReply::failed(&e)).unwrap();
            assert_eq!(json, pinned(&e), "{e:?}");
        }
        // Read back as the requester reads them.
        assert_eq!(order_error(30002, None), OrderError::NotAccepted);
        assert_eq!(
            order_error(30005, None),
            OrderError::Refused("refused".into())
        );
        assert_eq!(order_error(12345, None), OrderError::Internal);
    }

    #[test]
    fn delivery_error_wire_names_are_pinned() {
        for (e, name) in [
            (DeliveryError::NotConnected, "not_connected"),
            (DeliveryError::NotSubscribed, "not_subscribed"),
            (DeliveryError::Backpressure, "backpressure"),
            (DeliveryError::Timeout, "timeout"),
        ] {
            assert_eq!(delivery_name(e), name);
            assert_eq!(delivery_from(name), e);
        }
    }
}
