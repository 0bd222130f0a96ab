//! The caller's own settings (an extension of API.md): `GET /merchant`
//! shows its appid, name and `notify_url`; `PUT /merchant` sets or clears
//! the `notify_url`. A URL is checked when it is set with what can be
//! checked without DNS (scheme, host, an IP-literal host's address: the
//! rules delivery applies, `notifier::target::check_url`); names are still
//! checked at every delivery, where they are resolved.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use serde_json::{json, Value};
use tracing::info;
use vendgate_proto::codes::ErrorCode;

use super::api::{err, ok, Merchant};
use super::envelope::Envelope;
use super::openapi::{ApiRoutes, MerchantAnswer, MerchantUpdate};
use super::AppState;
use crate::notifier::target::check_url;

/// Longest `notify_url` accepted (browsers' and proxies' common limit).
const MAX_NOTIFY_URL: usize = 2048;

pub(super) fn routes(r: ApiRoutes) -> ApiRoutes {
    r.add(__path_get_merchant, get_merchant)
        .add(__path_put_merchant, put_merchant)
}

async fn show(s: &AppState, appid: &str) -> Envelope {
    match s.gw.store.merchant(appid).await {
        Ok(Some(m)) => ok(
            s,
            json!({ "appid": m.appid, "name": m.name, "notify_url": m.notify_url }),
        ),
        // Authenticated a moment ago: only a storage error gets here.
        Ok(None) | Err(_) => err(s, ErrorCode::Internal),
    }
}

/// The caller's settings.
///
/// Codes: 0; 10001–10003; 50000.
#[utoipa::path(
    get,
    path = "/merchant",
    tag = "merchant",
    responses((status = 200, description = "The settings, or an error envelope.", body = MerchantAnswer))
)]
async fn get_merchant(State(s): State<AppState>, Merchant(appid): Merchant) -> Envelope {
    show(&s, &appid).await
}

/// What `PUT /merchant` asks for: a checked URL, or none (null or "").
fn parse_notify_url(body: &[u8], allow_private: bool) -> Result<Option<String>, ErrorCode> {
    let v: Value = serde_json::from_slice(body).map_err(|_| ErrorCode::InvalidParams)?;
    let obj = v.as_object().ok_or(ErrorCode::InvalidParams)?;
    match obj.get("notify_url") {
        Some(Value::Null) => Ok(None),
        Some(Value::String(u)) if u.is_empty() => Ok(None),
        Some(Value::String(u)) if u.len() <= MAX_NOTIFY_URL => check_url(u, allow_private)
            .map(|_| Some(u.clone()))
            .map_err(|_| ErrorCode::InvalidParams),
        // Missing, too long, or not a string.
        _ => Err(ErrorCode::InvalidParams),
    }
}

/// Set or clear the webhook URL.
///
/// Answers the settings as `GET` does. Codes: 0; 10001–10003; 20001 (bad
/// body or URL: nothing changed); 50000.
#[utoipa::path(
    put,
    path = "/merchant",
    tag = "merchant",
    request_body(content = MerchantUpdate, content_type = "application/json"),
    responses((status = 200, description = "The settings after the change, or an error envelope.", body = MerchantAnswer))
)]
async fn put_merchant(
    State(s): State<AppState>,
    Merchant(appid): Merchant,
    body: Result<Bytes, BytesRejection>,
) -> Envelope {
    let Ok(body) = body else {
        return err(&s, ErrorCode::InvalidParams);
    };
    let allow_private = s.gw.settings.notifier.allow_private_targets;
    let url = match parse_notify_url(&body, allow_private) {
        Ok(u) => u,
        Err(c) => return err(&s, c),
    };
    match s.gw.store.set_notify_url(&appid, url.as_deref()).await {
        Ok(true) => {
            info!(appid = %appid, set = url.is_some(), "merchant notify_url changed");
            show(&s, &appid).await
        }
        Ok(false) | Err(_) => err(&s, ErrorCode::Internal),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notify_urls_are_checked_when_set() {
        let p = |b: &str| parse_notify_url(b.as_bytes(), false);
        assert_eq!(
            p(r#"{"notify_url":"https://hooks.example/n"}"#),
            Ok(Some("https://hooks.example/n".into()))
        );
        assert_eq!(p(r#"{"notify_url":null}"#), Ok(None));
        assert_eq!(p(r#"{"notify_url":""}"#), Ok(None));
        for bad in [
            "not json",
            "[]",
            "{}",
            r#"{"notify_url":1}"#,
            r#"{"notify_url":"ftp://hooks.example/"}"#,
            r#"{"notify_url":"http://127.0.0.1/hook"}"#,
            r#"{"notify_url":"http://169.254.169.254/"}"#,
            r#"{"notify_url":"http://[::1]/"}"#,
            r#"{"notify_url":"http://0x7f.1/"}"#,
            r#"{"notify_url":"hooks.example"}"#,
        ] {
            assert_eq!(p(bad), Err(ErrorCode::InvalidParams), "{bad}");
        }
        let long = format!(
            r#"{{"notify_url":"https://h.example/{}"}}"#,
            "a".repeat(2048)
        );
        assert_eq!(p(&long), Err(ErrorCode::InvalidParams));
        // Development settings let private targets through, as at delivery.
        assert!(parse_notify_url(br#"{"notify_url":"http://127.0.0.1:9/h"}"#, true).is_ok());
    }
}
