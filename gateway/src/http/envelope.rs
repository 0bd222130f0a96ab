//! The response envelope of every answer: `{"code", "message", "data"}`, with
//! empty, `false`, `0` and null fields left out of `data` (the protobuf JSON
//! habit the published document warns about), HTTP 200 unless the operator
//! chose `http_status = "mirror"`.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Map, Value};
use vendgate_proto::codes::ErrorCode;

use crate::config::HttpStatusMode;

/// An answer: a code and, for success, the data.
#[derive(Debug, Clone)]
pub struct Envelope {
    pub code: ErrorCode,
    pub data: Value,
    pub mode: HttpStatusMode,
}

impl Envelope {
    pub fn ok(data: Value, mode: HttpStatusMode) -> Self {
        Self {
            code: ErrorCode::Ok,
            data,
            mode,
        }
    }

    pub fn err(code: ErrorCode, mode: HttpStatusMode) -> Self {
        Self {
            code,
            data: json!({}),
            mode,
        }
    }
}

impl IntoResponse for Envelope {
    fn into_response(self) -> Response {
        let status = match self.mode {
            HttpStatusMode::Ok => StatusCode::OK,
            HttpStatusMode::Mirror => StatusCode::from_u16(self.code.http_status())
                .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        };
        let data = match prune(self.data) {
            Some(Value::Object(m)) => Value::Object(m),
            _ => Value::Object(Map::new()),
        };
        let body =
            json!({ "code": self.code.code(), "message": self.code.message(), "data": data });
        (status, Json(body)).into_response()
    }
}

/// Drop empty/false/0/null values recursively; None when the value itself is
/// one of those. Array elements are pruned but kept (positions matter).
pub fn prune(v: Value) -> Option<Value> {
    match v {
        Value::Null => None,
        Value::Bool(false) => None,
        Value::Number(ref n) if n.as_f64() == Some(0.0) => None,
        Value::String(ref s) if s.is_empty() => None,
        Value::Array(a) if a.is_empty() => None,
        Value::Array(a) => Some(Value::Array(
            a.into_iter()
                .map(|x| prune(x).unwrap_or_else(|| Value::Object(Map::new())))
                .collect(),
        )),
        Value::Object(m) => {
            let m: Map<String, Value> = m
                .into_iter()
                .filter_map(|(k, v)| prune(v).map(|v| (k, v)))
                .collect();
            if m.is_empty() {
                None
            } else {
                Some(Value::Object(m))
            }
        }
        other => Some(other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prune_drops_protobuf_defaults() {
        let v = json!({"order_id": 1, "a": 0, "b": false, "c": "", "d": null, "e": [],
                       "items": [{"product_id": 1, "dispensed": 0}], "f": {"g": 0}});
        assert_eq!(
            prune(v),
            Some(json!({"order_id": 1, "items": [{"product_id": 1}]}))
        );
    }
}
