//! JSON payloads of the device protocol (PROTOCOL.md) and their bounded
//! decoder/encoder.
//!
//! Unknown fields are ignored on decode (serde's default) so either side can
//! add fields; optional fields are left out when absent so old peers see the
//! exact payloads of the protocol document.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// Largest payload [`decode`] accepts. Protocol messages are far smaller; the
/// cap bounds the work a misbehaving peer can cause.
pub const MAX_PAYLOAD: usize = 64 * 1024;

/// `vend/v1/{m}/state` (retained). The last will is `{"online":false}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateMsg {
    pub online: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub firmware: Option<String>,
}

/// `vend/v1/{m}/inventory`: a full stock snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InventoryMsg {
    pub items: Vec<InventoryItem>,
}

/// One product slot of an inventory snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InventoryItem {
    pub product_id: i64,
    pub stock: u32,
    /// Unit price in fen.
    pub price: i64,
}

/// `vend/v1/{m}/cmd/dispense`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DispenseCmd {
    pub order_id: u64,
    pub items: Vec<OrderLine>,
    /// How long after sending the command is still valid; 0 means expired.
    pub ttl_ms: u64,
}

/// One line of an order: a product and how many of it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderLine {
    pub product_id: i64,
    pub quantity: u32,
}

/// `vend/v1/{m}/cmd/go`: dispense the order the machine acked and holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GoCmd {
    pub order_id: u64,
}

/// `vend/v1/{m}/cmd/cancel`: never dispense this order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CancelCmd {
    pub order_id: u64,
}

/// `vend/v1/{m}/cmd/ping`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PingCmd {
    pub id: u64,
}

/// `vend/v1/{m}/pong`: echoes the ping's id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PongMsg {
    pub id: u64,
}

/// `vend/v1/{m}/ack`: the machine accepts or refuses a dispense command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AckMsg {
    pub order_id: u64,
    pub accepted: bool,
    /// Why the order was refused (`"expired"`, `"door_open"`, …).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// The result `error` of an order the machine dropped without dispensing
/// because no `cmd/go` came within its go timeout, or of a `go` for an
/// order it does not hold (PROTOCOL.md, machine rule 2).
pub const ERROR_NO_GO: &str = "no_go";

/// `vend/v1/{m}/result`: what actually came out for an accepted order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResultMsg {
    pub order_id: u64,
    pub items: Vec<ResultItem>,
    /// Present when anything fell short (`"motor_jam"`, `"out_of_stock"`, …).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// One line of a result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResultItem {
    pub product_id: i64,
    pub quantity: u32,
    pub dispensed: u32,
}

/// Why a payload could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// The payload exceeds [`MAX_PAYLOAD`]; it was not parsed.
    #[error("payload of {len} bytes exceeds the {max} byte limit")]
    TooLarge { len: usize, max: usize },
    /// The payload is not valid JSON for the expected message.
    #[error("malformed payload")]
    Json(#[from] serde_json::Error),
}

/// Decodes a JSON payload of at most [`MAX_PAYLOAD`] bytes.
pub fn decode<T: DeserializeOwned>(payload: &[u8]) -> Result<T, DecodeError> {
    if payload.len() > MAX_PAYLOAD {
        return Err(DecodeError::TooLarge {
            len: payload.len(),
            max: MAX_PAYLOAD,
        });
    }
    Ok(serde_json::from_slice(payload)?)
}

/// Encodes a message as compact JSON.
///
/// # Panics
///
/// Only if `T`'s `Serialize` impl reports an error or produces a map with
/// non-string keys. The message types of this module are derived structs of
/// bools, integers, strings, options and vectors, for which serde_json
/// serialization into a `Vec` cannot fail.
pub fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("protocol messages always serialize to JSON")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protocol_examples_decode() {
        let d: DispenseCmd = decode(
            br#"{"order_id":1111111,"items":[{"product_id":1,"quantity":2}],"ttl_ms":10000}"#,
        )
        .unwrap();
        assert_eq!(d.order_id, 1_111_111);
        assert_eq!(
            d.items,
            vec![OrderLine {
                product_id: 1,
                quantity: 2
            }]
        );
        let r: ResultMsg = decode(
            br#"{"order_id":1111111,"items":[{"product_id":1,"quantity":2,"dispensed":1}],"error":"motor_jam"}"#,
        )
        .unwrap();
        assert_eq!(r.error.as_deref(), Some("motor_jam"));
        let a: AckMsg = decode(br#"{"order_id":1111111,"accepted":true}"#).unwrap();
        assert_eq!(a.reason, None);
    }

    #[test]
    fn optional_fields_are_omitted() {
        let will = encode(&StateMsg {
            online: false,
            firmware: None,
        });
        assert_eq!(will, br#"{"online":false}"#);
        let ack = encode(&AckMsg {
            order_id: 7,
            accepted: true,
            reason: None,
        });
        assert_eq!(ack, br#"{"order_id":7,"accepted":true}"#);
    }

    #[test]
    fn size_cap() {
        let mut big = b"{\"id\":1,\"pad\":\"".to_vec();
        big.resize(MAX_PAYLOAD + 1, b'x');
        assert!(matches!(
            decode::<PingCmd>(&big),
            Err(DecodeError::TooLarge { .. })
        ));
        assert!(matches!(decode::<PingCmd>(b"{"), Err(DecodeError::Json(_))));
        assert!(matches!(
            decode::<PingCmd>(b"{\"id\":-1}"),
            Err(DecodeError::Json(_))
        ));
    }
}
