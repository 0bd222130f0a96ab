//! Webhook bodies (API.md "Notifications to the merchant"): every `order.*`
//! and `machine.*` body is built here, so the wire shape lives in one file.
//! Delivery (signing, retries) is the notifier's.

use chrono::{DateTime, SecondsFormat, Utc};
use rand::RngCore;
use serde_json::json;
use vendgate_proto::machine::MachineNo;

use super::order::{Notice, Order};

/// A fresh event id: `evt_` + 128 random bits in hex.
pub fn new_event_id() -> String {
    let mut b = [0u8; 16];
    rand::rngs::OsRng.fill_bytes(&mut b);
    format!("evt_{}", hex::encode(b))
}

/// A machine event whose merchant storage resolves from the machine row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MachineEvent {
    pub event_id: String,
    /// `machine.online` or `machine.offline`.
    pub kind: String,
    pub body: String,
    pub created_at: DateTime<Utc>,
}

/// The event of a machine's presence change (`machine.online` /
/// `machine.offline`).
pub fn machine_event(
    machine_no: MachineNo,
    online: bool,
    reason: Option<&str>,
    at: DateTime<Utc>,
    now: DateTime<Utc>,
) -> MachineEvent {
    let event_id = new_event_id();
    let kind = if online {
        "machine.online"
    } else {
        "machine.offline"
    };
    let mut data = json!({
        "machine_no": machine_no.as_str(),
        "online": online,
        "at": at.to_rfc3339_opts(SecondsFormat::Millis, true),
    });
    if let (Some(r), Some(obj)) = (reason, data.as_object_mut()) {
        obj.insert("reason".into(), json!(r));
    }
    let body = json!({
        "event_id": event_id,
        "type": kind,
        "created_at": now.to_rfc3339_opts(SecondsFormat::Millis, true),
        "data": data,
    });
    MachineEvent {
        event_id,
        kind: kind.to_string(),
        body: body.to_string(),
        created_at: now,
    }
}

/// What an order webhook is about: the stored facts that do not change.
#[derive(Debug, Clone, Copy)]
pub struct OrderFacts<'a> {
    pub order_id: u64,
    pub machine_no: MachineNo,
    pub out_trade_no: Option<&'a str>,
    pub amount: i64,
}

/// An `order.*` body: its event id and JSON text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrderWebhook {
    pub event_id: String,
    pub body: String,
}

/// The body of notice `kind` about an order that has become `next`.
pub fn order_event(
    o: OrderFacts<'_>,
    next: &Order,
    kind: Notice,
    at: DateTime<Utc>,
) -> OrderWebhook {
    let event_id = new_event_id();
    let items: Vec<serde_json::Value> = next
        .lines
        .iter()
        .map(|l| json!({ "product_id": l.product_id, "quantity": l.quantity, "dispensed": l.dispensed, "unit_price": l.unit_price }))
        .collect();
    let mut data = json!({
        "order_id": o.order_id,
        "machine_no": o.machine_no.as_str(),
        "status": next.status.as_str(),
        "out_trade_no": o.out_trade_no,
        "items": items,
        "amount": o.amount,
        "refund_amount": next.refund_amount(),
        "error": next.error,
    });
    if let Some(obj) = data.as_object_mut() {
        if next.refunded_amount > 0 {
            obj.insert("refunded_amount".into(), json!(next.refunded_amount));
        }
        if kind == Notice::DispensedAfterRejection {
            obj.insert("dispensed_amount".into(), json!(next.dispensed_amount()));
        }
    }
    let body = json!({
        "event_id": event_id,
        "type": kind.as_str(),
        "created_at": at.to_rfc3339_opts(SecondsFormat::Millis, true),
        "data": data,
    });
    OrderWebhook {
        event_id,
        body: body.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn machine_event_bodies() {
        let at = chrono::DateTime::parse_from_rfc3339("2025-03-01T12:00:00.5Z")
            .unwrap()
            .with_timezone(&Utc);
        let m: MachineNo = "00000042".parse().unwrap();
        let off = machine_event(m, false, Some("keep_alive_timeout"), at, at);
        let v: serde_json::Value = serde_json::from_str(&off.body).unwrap();
        assert_eq!(off.kind, "machine.offline");
        assert_eq!(v["event_id"], off.event_id.as_str());
        assert_eq!(v["type"], "machine.offline");
        assert_eq!(v["created_at"], "2025-03-01T12:00:00.500Z");
        assert_eq!(
            v["data"],
            json!({"machine_no": "00000042", "online": false,
                   "reason": "keep_alive_timeout", "at": "2025-03-01T12:00:00.500Z"})
        );
        let on = machine_event(m, true, None, at, at);
        let v: serde_json::Value = serde_json::from_str(&on.body).unwrap();
        assert_eq!(
            v["data"],
            json!({"machine_no": "00000042", "online": true, "at": "2025-03-01T12:00:00.500Z"})
        );
        assert_ne!(on.event_id, off.event_id);
    }
}
