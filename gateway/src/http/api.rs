//! The merchant open API (API.md): authentication by `Appid`/`AppSecret`,
//! request validation with the documented codes, and the handlers. Bodies are
//! parsed as JSON whatever their Content-Type says (the published Go and PHP
//! examples send none).

use std::collections::HashMap;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, Method, Uri};
use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::{json, Map, Value};
use tracing::{debug, info};
use vendgate_proto::codes::ErrorCode;
use vendgate_proto::machine::MachineNo;

use super::envelope::Envelope;
use super::openapi::{
    ApiRoutes, CancelAnswer, MachineAnswer, MachinePageAnswer, OrderAnswer, OrderPageAnswer,
    PlaceOrderRequest, PlacedAnswer, PongAnswer, RefundAnswer,
};
use super::AppState;
use crate::link::commands::DeliveryError;
use crate::orders::PlaceRequest;
use crate::secrets::{verify_rotating, AccountKind, SecretMatch};

/// The order and machine routes; each handler's `#[utoipa::path]` names
/// its path and method (openapi.rs).
pub(super) fn routes(r: ApiRoutes) -> ApiRoutes {
    r.add(__path_place_order, place_order)
        .add(__path_list_orders, list_orders)
        .add(__path_get_order, get_order)
        .add(__path_pay_order, pay_order)
        .add(__path_cancel_order, cancel_order)
        .add(__path_refund_order, refund_order)
        .add(__path_list_machines, list_machines)
        .add(__path_get_machine, get_machine)
        .add(__path_ping_machine, ping_machine)
}

pub(super) fn err(s: &AppState, code: ErrorCode) -> Envelope {
    Envelope::err(code, s.gw.settings.http.http_status)
}

pub(super) fn ok(s: &AppState, data: Value) -> Envelope {
    Envelope::ok(data, s.gw.settings.http.http_status)
}

pub async fn not_found(State(s): State<AppState>, method: Method, uri: Uri) -> Envelope {
    debug!(%method, %uri, "no such route");
    err(&s, ErrorCode::InvalidParams)
}

/// A known path with a method it does not take (`DELETE /orders`): the
/// envelope with 20001 like any other bad request, HTTP 405 when the
/// operator chose `http_status = "mirror"` (axum adds the `Allow` header).
pub async fn method_not_allowed(
    State(s): State<AppState>,
    method: Method,
    uri: Uri,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    debug!(%method, %uri, "method not allowed");
    let mut resp = err(&s, ErrorCode::InvalidParams).into_response();
    if s.gw.settings.http.http_status == crate::config::HttpStatusMode::Mirror {
        *resp.status_mut() = axum::http::StatusCode::METHOD_NOT_ALLOWED;
    }
    resp
}

/// The caller's appid when `Appid`/`AppSecret` match (constant-time; an
/// unknown appid costs the same as a wrong secret). During a rotation's grace
/// period the previous AppSecret matches too, and is counted and logged.
/// The merchant row comes from the storage's credential cache (trusted for
/// 1 s, `storage::cached`), so a rotation made by the CLI applies within a
/// second; the check itself is one HMAC, not a password hash.
pub(super) async fn authenticate(s: &AppState, headers: &HeaderMap) -> Result<String, ErrorCode> {
    let appid = headers
        .get("appid")
        .and_then(|v| v.to_str().ok())
        .map(str::trim);
    let secret = headers
        .get("appsecret")
        .and_then(|v| v.to_str().ok())
        .map(str::trim);
    let (Some(appid), Some(secret)) = (appid, secret) else {
        return Err(ErrorCode::MissingCredentials);
    };
    if appid.is_empty() || secret.is_empty() {
        return Err(ErrorCode::MissingCredentials);
    }
    let merchant =
        s.gw.store
            .merchant(appid)
            .await
            .map_err(|_| ErrorCode::Internal)?;
    let matched = verify_rotating(
        merchant.as_ref().map(|m| &m.appsecret_hash),
        merchant
            .as_ref()
            .and_then(|m| m.previous_appsecret.as_ref()),
        secret,
        Utc::now(),
    );
    match merchant {
        // A disabled merchant is answered like a wrong AppSecret.
        Some(m) if matched.is_match() && m.disabled_at.is_none() => {
            if matched == SecretMatch::Previous
                && s.gw
                    .metrics
                    .previous_secrets
                    .record(AccountKind::Merchant, &m.appid)
            {
                info!(
                    appid = %m.appid,
                    grace_until = %m.previous_appsecret.as_ref().map(|p| p.expires_at.to_rfc3339()).unwrap_or_default(),
                    "merchant authenticated with its previous AppSecret (rotation grace period)"
                );
            }
            if s.rate.allow(&m.appid) {
                Ok(m.appid)
            } else {
                s.gw.metrics
                    .http_rate_limited
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                Err(ErrorCode::RateLimited)
            }
        }
        _ => Err(ErrorCode::AuthFailed),
    }
}

/// The authenticated caller: extracting it checks `Appid`/`AppSecret` and the
/// merchant's rate, and rejects with the envelope (10001/10002/10003).
pub(super) struct Merchant(pub String);

impl axum::extract::FromRequestParts<AppState> for Merchant {
    type Rejection = Envelope;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        s: &AppState,
    ) -> Result<Self, Self::Rejection> {
        authenticate(s, &parts.headers)
            .await
            .map(Merchant)
            .map_err(|c| err(s, c))
    }
}

/// One path parameter. axum's `Path` rejects a segment that is not UTF-8
/// once percent-decoded (`/machines/%E9`) with a plain-text 400 outside the
/// envelope; such a segment names nothing, so it reads as "" and the handler
/// answers its own not-found/invalid code (found by the `http_api` fuzz
/// target).
pub(super) struct Segment(pub String);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for Segment {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        s: &S,
    ) -> Result<Self, Self::Rejection> {
        Ok(Segment(
            <Path<String> as axum::extract::FromRequestParts<S>>::from_request_parts(parts, s)
                .await
                .map(|Path(p)| p)
                .unwrap_or_default(),
        ))
    }
}

/// A validated `POST /orders` body.
#[derive(Debug, PartialEq, Eq)]
pub struct OrderBody {
    pub machine_no: MachineNo,
    pub lines: Vec<(i64, u32)>,
    pub out_trade_no: Option<String>,
    pub pay_later: bool,
}

/// Validate a body against API.md: 20001 for JSON and types, 20002 for the
/// machine number, 20003 for the products.
pub fn parse_order_body(
    body: &[u8],
    max_lines: usize,
    max_quantity: u32,
) -> Result<OrderBody, ErrorCode> {
    let v: Value = serde_json::from_slice(body).map_err(|_| ErrorCode::InvalidParams)?;
    let Value::Object(o) = v else {
        return Err(ErrorCode::InvalidParams);
    };
    let machine_no = match (o.get("machine_no"), o.get("imei")) {
        (Some(a), Some(b)) if a != b => return Err(ErrorCode::InvalidParams),
        (Some(v), _) | (None, Some(v)) => v,
        (None, None) => return Err(ErrorCode::InvalidParams),
    };
    let Value::String(machine_no) = machine_no else {
        return Err(ErrorCode::InvalidParams);
    };
    let Some(Value::Array(products)) = o.get("products") else {
        return Err(ErrorCode::InvalidParams);
    };
    let out_trade_no = match o.get("out_trade_no") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if !s.is_empty() && s.chars().count() <= 64 => Some(s.clone()),
        Some(_) => return Err(ErrorCode::InvalidParams),
    };
    let pay_later = match o.get("pay_later") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(ErrorCode::InvalidParams),
    };
    // Types first (20001), then values (20002, 20003).
    let mut raw = Vec::with_capacity(products.len());
    for p in products {
        let Value::Object(p) = p else {
            return Err(ErrorCode::InvalidParams);
        };
        let (Some(Value::Number(pid)), Some(Value::Number(q))) =
            (p.get("product_id"), p.get("quantity"))
        else {
            return Err(ErrorCode::InvalidParams);
        };
        // Integers only; 1.5 is a type error. Out-of-range integers are
        // product errors (they can only be invalid ids or quantities).
        if !(pid.is_i64() || pid.is_u64()) || !(q.is_i64() || q.is_u64()) {
            return Err(ErrorCode::InvalidParams);
        }
        raw.push((pid.as_i64(), q.as_i64()));
    }
    let machine_no: MachineNo = machine_no
        .parse()
        .map_err(|_| ErrorCode::InvalidMachineNo)?;
    if raw.is_empty() || raw.len() > max_lines {
        return Err(ErrorCode::InvalidProducts);
    }
    let mut lines = Vec::with_capacity(raw.len());
    for (pid, q) in raw {
        let (Some(pid), Some(q)) = (pid, q) else {
            return Err(ErrorCode::InvalidProducts);
        };
        if pid <= 0 || q <= 0 || q > i64::from(max_quantity) {
            return Err(ErrorCode::InvalidProducts);
        }
        lines.push((
            pid,
            u32::try_from(q).map_err(|_| ErrorCode::InvalidProducts)?,
        ));
    }
    Ok(OrderBody {
        machine_no,
        lines,
        out_trade_no,
        pay_later,
    })
}

/// Place an order.
///
/// Validate, check the machine is the caller's and online, reserve stock,
/// persist the order, send the dispense command, and wait up to
/// `accept_timeout` for the machine to accept it (a `pay_later` order is
/// answered after the reservation). Codes: 0; 10001–10003; 20001–20003;
/// 30001–30005; 40003; 50000.
#[utoipa::path(
    post,
    path = "/orders",
    tag = "orders",
    params(("Idempotency-Key" = Option<String>, Header, nullable = false, description = "Same meaning as `out_trade_no` (1–64 characters; the body's `out_trade_no` wins).")),
    request_body(content = PlaceOrderRequest, content_type = "application/json", description = "Parsed as JSON whatever the Content-Type says (the published examples send none)."),
    responses((status = 200, description = "The order was accepted by the machine (or reserved, for `pay_later`), or an error envelope.", body = PlacedAnswer))
)]
async fn place_order(
    State(s): State<AppState>,
    Merchant(merchant): Merchant,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Envelope {
    let Ok(body) = body else {
        // Oversized or unreadable body.
        return err(&s, ErrorCode::InvalidParams);
    };
    let orders = &s.gw.settings.orders;
    let mut parsed = match parse_order_body(&body, orders.max_lines, orders.max_quantity) {
        Ok(b) => b,
        Err(c) => return err(&s, c),
    };
    if parsed.out_trade_no.is_none() {
        if let Some(k) = headers.get("idempotency-key").and_then(|v| v.to_str().ok()) {
            if k.is_empty() || k.chars().count() > 64 {
                return err(&s, ErrorCode::InvalidParams);
            }
            parsed.out_trade_no = Some(k.to_string());
        }
    }
    let req = PlaceRequest {
        merchant: merchant.clone(),
        machine_no: parsed.machine_no,
        lines: parsed.lines,
        out_trade_no: parsed.out_trade_no,
        pay_later: parsed.pay_later,
        answer_by: crate::orders::answer_by(orders),
    };
    let m = req.machine_no;
    let pay_later = req.pay_later;
    match s.gw.front.place(req).await {
        Ok(order_id) if pay_later => {
            info!(appid = %merchant, machine_no = %m, order_id, "order reserved, awaiting payment");
            ok(
                &s,
                json!({ "order_id": order_id, "status": "awaiting_payment" }),
            )
        }
        Ok(order_id) => {
            info!(appid = %merchant, machine_no = %m, order_id, "order accepted");
            ok(&s, json!({ "order_id": order_id }))
        }
        Err(e) => {
            info!(appid = %merchant, machine_no = %m, code = e.code().code(), error = %e, "order not accepted");
            err(&s, e.code())
        }
    }
}

fn rfc3339(t: Option<DateTime<Utc>>) -> Value {
    t.map(|t| Value::String(t.to_rfc3339_opts(SecondsFormat::Millis, true)))
        .unwrap_or(Value::Null)
}

/// One of the caller's orders.
///
/// With its timeline (`events`), webhook attempts included.
/// Codes: 0; 10001–10003; 40001; 50000.
#[utoipa::path(
    get,
    path = "/orders/{order_id}",
    tag = "orders",
    params(("order_id" = u64, Path, description = "The `order_id` placing answered; anything else (or another merchant's order) is 40001.")),
    responses((status = 200, description = "The order, or an error envelope.", body = OrderAnswer))
)]
async fn get_order(
    State(s): State<AppState>,
    Merchant(merchant): Merchant,
    Segment(order_id): Segment,
) -> Envelope {
    let order_id = match parse_order_id(&s, &order_id) {
        Ok(id) => id,
        Err(a) => return a,
    };
    let (o, events) = match s.orders.get(&merchant, order_id).await {
        Ok(Some(x)) => x,
        Ok(None) => return err(&s, ErrorCode::OrderNotFound),
        Err(e) => return err(&s, e.code()),
    };
    let mut events: Vec<(DateTime<Utc>, Value)> = events
        .iter()
        .map(|e| {
            (
                e.at,
                json!({ "at": rfc3339(Some(e.at)), "type": e.kind, "detail": e.detail }),
            )
        })
        .collect();
    // Each webhook attempt joins the timeline, so "what happened to order X"
    // includes whether the merchant was told.
    match s.gw.store.order_webhook_attempts(order_id).await {
        Ok(attempts) => events.extend(attempts.into_iter().map(|a| {
            (
                a.at,
                json!({ "at": rfc3339(Some(a.at)), "type": "webhook", "detail": {
                    "event_id": a.event_id, "event": a.kind, "http_status": a.http_status,
                    "error": a.error.as_deref().map(crate::notifier::shown_error) } }),
            )
        })),
        Err(_) => return err(&s, ErrorCode::Internal),
    }
    events.sort_by_key(|(at, _)| *at);
    let events: Vec<Value> = events.into_iter().map(|(_, v)| v).collect();
    let mut data = order_json(&o);
    if let Some(d) = data.as_object_mut() {
        d.insert("events".into(), Value::Array(events));
        d.insert("events_dropped".into(), json!(o.events_dropped));
    }
    ok(&s, data)
}

/// An order as `GET /orders/{id}` shows it, without its timeline (which
/// the caller adds); also one entry of `GET /orders`.
fn order_json(o: &crate::storage::StoredOrder) -> Value {
    let items: Vec<Value> = o
        .lines
        .iter()
        .map(|l| json!({ "product_id": l.product_id, "quantity": l.quantity, "dispensed": l.dispensed, "unit_price": l.unit_price }))
        .collect();
    json!({
        "order_id": o.order_id,
        "machine_no": o.machine_no.as_str(),
        "status": o.status.as_str(),
        "out_trade_no": o.out_trade_no,
        "items": items,
        "amount": o.amount,
        "refund_amount": o.refund_amount,
        "created_at": rfc3339(Some(o.created_at)),
        "updated_at": rfc3339(Some(o.updated_at)),
        "error": o.error,
        "pay_later": o.pay_later,
        "pay_deadline": if o.status == crate::domain::order::Status::AwaitingPayment { rfc3339(o.pay_deadline) } else { Value::Null },
        "refund_status": refund_status(o),
        "refunded_amount": o.refunded_amount,
        "refunded_at": rfc3339(o.refunded_at),
    })
}

/// `pending` while a refund is owed and not recorded, `refunded` once the
/// merchant recorded it, `mismatch` when a late result changed what is owed
/// after that (both figures are in the order); absent when nothing is owed.
pub(super) fn refund_status(o: &crate::storage::StoredOrder) -> Value {
    match (o.refund_amount > 0, o.refunded_at) {
        (_, Some(_)) if o.refunded_amount != o.refund_amount => json!("mismatch"),
        (_, Some(_)) => json!("refunded"),
        (true, None) => json!("pending"),
        (false, None) => Value::Null,
    }
}

fn parse_order_id(s: &AppState, raw: &str) -> Result<u64, Envelope> {
    raw.parse::<u64>()
        .map_err(|_| err(s, ErrorCode::OrderNotFound))
}

/// Pay a `pay_later` order.
///
/// Marks it paid and dispatches it, with the online and accept rules of
/// placing. Codes: 0; 10001–10003; 30002–30005; 40001; 40002 (not
/// `awaiting_payment`, e.g. expired); 50000.
#[utoipa::path(
    post,
    path = "/orders/{order_id}/pay",
    tag = "orders",
    params(("order_id" = u64, Path, description = "The `order_id` placing answered; anything else (or another merchant's order) is 40001.")),
    responses((status = 200, description = "The machine accepted the paid order, or an error envelope.", body = PlacedAnswer))
)]
async fn pay_order(
    State(s): State<AppState>,
    Merchant(merchant): Merchant,
    Segment(order_id): Segment,
) -> Envelope {
    let order_id = match parse_order_id(&s, &order_id) {
        Ok(id) => id,
        Err(a) => return a,
    };
    let answer_by = crate::orders::answer_by(&s.gw.settings.orders);
    match s.gw.front.pay(&merchant, order_id, answer_by).await {
        Ok(order_id) => {
            info!(appid = %merchant, order_id, "paid order accepted by the machine");
            ok(&s, json!({ "order_id": order_id }))
        }
        Err(e) => {
            info!(appid = %merchant, order_id, code = e.code().code(), error = %e, "pay not completed");
            err(&s, e.code())
        }
    }
}

/// Record a refund.
///
/// Records that the merchant refunded the customer what the order owes
/// (`refund_amount`, from what came out). Idempotent. Codes: 0;
/// 10001–10003; 40001; 40002 (nothing owed); 50000.
#[utoipa::path(
    post,
    path = "/orders/{order_id}/refund",
    tag = "orders",
    params(("order_id" = u64, Path, description = "The `order_id` placing answered; anything else (or another merchant's order) is 40001.")),
    responses((status = 200, description = "The refund as recorded, or an error envelope.", body = RefundAnswer))
)]
async fn refund_order(
    State(s): State<AppState>,
    Merchant(merchant): Merchant,
    Segment(order_id): Segment,
) -> Envelope {
    let order_id = match parse_order_id(&s, &order_id) {
        Ok(id) => id,
        Err(a) => return a,
    };
    match s.orders.refund(&merchant, order_id).await {
        Ok(o) => ok(
            &s,
            json!({ "order_id": o.order_id, "refund_amount": o.refund_amount, "refunded_amount": o.refunded_amount, "refund_status": refund_status(&o), "refunded_at": rfc3339(o.refunded_at) }),
        ),
        Err(e) => err(&s, e.code()),
    }
}

/// Most orders on one page of `GET /orders`.
const MAX_ORDERS_PAGE: u64 = 100;
const DEFAULT_ORDERS_PAGE: u64 = 20;

/// An RFC 3339 instant of a query parameter.
fn query_time(raw: Option<&String>) -> Result<Option<DateTime<Utc>>, ()> {
    raw.map(|t| {
        DateTime::parse_from_rfc3339(t)
            .map(|t| t.with_timezone(&Utc))
            .map_err(|_| ())
    })
    .transpose()
}

/// `page` (from 1) and `page_size` (1..=`max`, default `default`) of a
/// listing's query; Err for anything else.
fn paging(q: &HashMap<String, String>, default: u64, max: u64) -> Result<(u64, u64), ()> {
    let page = match q.get("page").map(|p| p.parse::<u64>()) {
        None => 1,
        Some(Ok(p)) if p >= 1 => p,
        _ => return Err(()),
    };
    let page_size = match q.get("page_size").map(|p| p.parse::<u64>()) {
        None => default,
        Some(Ok(p)) if (1..=max).contains(&p) => p,
        _ => return Err(()),
    };
    Ok((page, page_size))
}

/// List the caller's orders.
///
/// Newest first (`created_at`, then `order_id`), filtered and paged; each
/// entry is what `GET /orders/{order_id}` shows, without the timeline.
/// Codes: 0; 10001–10003; 20001; 20002 (`machine_no`); 50000.
#[utoipa::path(
    get,
    path = "/orders",
    tag = "orders",
    params(
        ("from" = Option<String>, Query, nullable = false, format = DateTime, description = "RFC 3339; `from` ≤ created_at (any offset; `+` written `%2B`)."),
        ("to" = Option<String>, Query, nullable = false, format = DateTime, description = "RFC 3339; created_at < `to`; not before `from`."),
        ("status" = Option<crate::domain::order::Status>, Query, nullable = false, description = "One order status."),
        ("machine_no" = Option<String>, Query, nullable = false, description = "8 ASCII digits (else 20002)."),
        ("out_trade_no" = Option<String>, Query, nullable = false, description = "The merchant's order number, 1–64 characters."),
        ("page" = Option<u64>, Query, nullable = false, minimum = 1, description = "From 1 (default 1)."),
        ("page_size" = Option<u64>, Query, nullable = false, minimum = 1, maximum = 100, description = "1–100 (default 20)."),
    ),
    responses((status = 200, description = "One page of orders, or an error envelope (20001 for any bad parameter but `machine_no`).", body = OrderPageAnswer))
)]
async fn list_orders(
    State(s): State<AppState>,
    Merchant(merchant): Merchant,
    Query(q): Query<HashMap<String, String>>,
) -> Envelope {
    let Ok((page, page_size)) = paging(&q, DEFAULT_ORDERS_PAGE, MAX_ORDERS_PAGE) else {
        return err(&s, ErrorCode::InvalidParams);
    };
    let (Ok(from), Ok(to)) = (query_time(q.get("from")), query_time(q.get("to"))) else {
        return err(&s, ErrorCode::InvalidParams);
    };
    if let (Some(f), Some(t)) = (from, to) {
        if f > t {
            return err(&s, ErrorCode::InvalidParams);
        }
    }
    let status = match q.get("status") {
        None => None,
        Some(raw) => match crate::domain::order::Status::parse(raw) {
            Some(st) => Some(st),
            None => return err(&s, ErrorCode::InvalidParams),
        },
    };
    let machine_no = match q.get("machine_no") {
        None => None,
        Some(raw) => match raw.parse::<MachineNo>() {
            Ok(m) => Some(m),
            Err(_) => return err(&s, ErrorCode::InvalidMachineNo),
        },
    };
    let out_trade_no = match q.get("out_trade_no") {
        None => None,
        Some(o) if !o.is_empty() && o.chars().count() <= 64 => Some(o.clone()),
        Some(_) => return err(&s, ErrorCode::InvalidParams),
    };
    let query = crate::storage::OrderQuery {
        merchant_appid: merchant,
        from,
        to,
        status,
        machine_no,
        out_trade_no,
        offset: (page - 1).saturating_mul(page_size),
        limit: page_size,
    };
    let (orders, total) = match s.gw.store.list_orders(&query).await {
        Ok(x) => x,
        Err(_) => return err(&s, ErrorCode::Internal),
    };
    let mut data = Map::new();
    data.insert(
        "orders".into(),
        Value::Array(orders.iter().map(order_json).collect()),
    );
    data.insert("total".into(), json!(total));
    data.insert("page".into(), json!(page));
    data.insert("page_size".into(), json!(page_size));
    ok(&s, Value::Object(data))
}

/// Cancel an unpaid `pay_later` order.
///
/// The order becomes `cancelled` and its stock is released at once; no
/// webhook is sent. Not idempotent. Codes: 0; 10001–10003; 40001; 40002
/// (paid, expired, cancelled, or not `pay_later`); 50000.
#[utoipa::path(
    post,
    path = "/orders/{order_id}/cancel",
    tag = "orders",
    params(("order_id" = u64, Path, description = "The `order_id` placing answered; anything else (or another merchant's order) is 40001.")),
    responses((status = 200, description = "The order is `cancelled` and its stock released, or an error envelope (40002 once paid, expired, cancelled, or not `pay_later`).", body = CancelAnswer))
)]
async fn cancel_order(
    State(s): State<AppState>,
    Merchant(merchant): Merchant,
    Segment(order_id): Segment,
) -> Envelope {
    let order_id = match parse_order_id(&s, &order_id) {
        Ok(id) => id,
        Err(a) => return a,
    };
    match s.orders.cancel(&merchant, order_id).await {
        Ok(o) => {
            info!(appid = %merchant, order_id, "unpaid order cancelled; stock released");
            ok(
                &s,
                json!({ "order_id": o.order_id, "status": o.status.as_str() }),
            )
        }
        Err(e) => err(&s, e.code()),
    }
}

/// How long `POST /machines/{no}/ping` waits for the machine's `pong`.
const PING_TIMEOUT: Duration = Duration::from_secs(2);

/// Ping a machine.
///
/// An application-level round trip (`cmd/ping` → `pong`) on whichever node
/// holds the machine's connection, waiting at most 2 s; it becomes the
/// machine's `last_rtt_ms`. Codes: 0; 10001–10003; 20002; 30001; 30002;
/// 30003; 50000.
#[utoipa::path(
    post,
    path = "/machines/{machine_no}/ping",
    tag = "machines",
    params(("machine_no" = String, Path, description = "8 ASCII digits (else 20002); another merchant's machine is 30001.")),
    responses((status = 200, description = "The round trip, or an error envelope (30002 offline or no pong within 2 s, 30003 cannot take a command now).", body = PongAnswer))
)]
async fn ping_machine(
    State(s): State<AppState>,
    Merchant(merchant): Merchant,
    Segment(machine_no): Segment,
) -> Envelope {
    let m = match callers_machine(&s, &merchant, &machine_no).await {
        Ok(machine) => machine.machine_no,
        Err(code) => return err(&s, code),
    };
    if !s.gw.fleet.machine_online(&m) {
        return err(&s, ErrorCode::MachineOffline);
    }
    match s.gw.commands.ping(&m, PING_TIMEOUT).await {
        Ok(rtt) => ok(
            &s,
            json!({ "machine_no": m.as_str(), "rtt_ms": crate::fleet::presence::rtt_ms(rtt) }),
        ),
        // Connected but too slow to take a command: as for orders.
        Err(DeliveryError::Backpressure) => err(&s, ErrorCode::MachineBusy),
        // Gone, not subscribed, or no pong in time: not reachable now.
        Err(e) => {
            debug!(machine_no = %m, error = %e, "ping not answered");
            err(&s, ErrorCode::MachineOffline)
        }
    }
}

/// How long `GET /machines` waits for another node's stock figures.
const REMOTE_STOCK_WAIT: Duration = Duration::from_millis(500);

async fn machine_json(s: &AppState, m: &crate::storage::Machine) -> Value {
    let p = s.gw.fleet.machine_presence(&m.machine_no);
    // Stock and reservations live on the node holding the machine.
    let remote = match &s.gw.cluster {
        Some(c) => c.remote_stock(&m.machine_no, REMOTE_STOCK_WAIT).await,
        None => None,
    };
    let stock: Vec<Value> = remote
        .unwrap_or_else(|| s.orders.inventory.view(&m.machine_no))
        .into_iter()
        .map(|st| json!({ "product_id": st.product_id, "stock": st.stock, "reserved": st.reserved, "price": st.price }))
        .collect();
    // This process's registry is the truth for presence; storage has the
    // last seen time of machines that have not connected since start.
    let online = p.as_ref().is_some_and(|p| p.online);
    json!({
        "machine_no": m.machine_no.as_str(),
        "online": online,
        "last_seen": rfc3339(p.as_ref().and_then(|p| p.last_seen).or(m.last_seen)),
        "online_since": rfc3339(p.as_ref().and_then(|p| p.online_since)),
        "firmware": p.as_ref().and_then(|p| p.firmware.clone()),
        "last_rtt_ms": p.as_ref().and_then(|p| p.last_rtt_ms),
        "flaps": p.as_ref().map(|p| p.flaps).unwrap_or(0),
        "stock": stock,
    })
}

/// List the caller's machines.
///
/// Paged, filterable by presence. Codes: 0; 10001–10003; 20001; 50000.
#[utoipa::path(
    get,
    path = "/machines",
    tag = "machines",
    params(
        ("online" = Option<bool>, Query, nullable = false, description = "`true` or `false`: only machines online / offline."),
        ("page" = Option<u64>, Query, nullable = false, minimum = 1, description = "From 1 (default 1)."),
        ("page_size" = Option<u64>, Query, nullable = false, minimum = 1, maximum = 100, description = "1–100 (default 20)."),
    ),
    responses((status = 200, description = "One page of machines, or an error envelope.", body = MachinePageAnswer))
)]
async fn list_machines(
    State(s): State<AppState>,
    Merchant(merchant): Merchant,
    Query(q): Query<HashMap<String, String>>,
) -> Envelope {
    let Ok((page, page_size)) = paging(&q, 20, 100) else {
        return err(&s, ErrorCode::InvalidParams);
    };
    let (Ok(page), Ok(page_size)) = (usize::try_from(page), usize::try_from(page_size)) else {
        return err(&s, ErrorCode::InvalidParams);
    };
    let online_filter = match q.get("online").map(String::as_str) {
        None => None,
        Some("true") => Some(true),
        Some("false") => Some(false),
        Some(_) => return err(&s, ErrorCode::InvalidParams),
    };
    if online_filter == Some(true) {
        return list_online_machines(&s, &merchant, page, page_size).await;
    }
    let machines = match s.gw.fleet.list(Some(&merchant)).await {
        Ok(m) => m,
        Err(_) => return err(&s, ErrorCode::Internal),
    };
    let filtered: Vec<_> = machines
        .iter()
        .filter(|m| {
            online_filter.is_none_or(|want| s.gw.fleet.machine_online(&m.machine_no) == want)
        })
        .collect();
    let total = filtered.len();
    let list: Vec<Value> = futures::future::join_all(
        filtered
            .into_iter()
            .skip((page - 1).saturating_mul(page_size))
            .take(page_size)
            .map(|m| machine_json(&s, m)),
    )
    .await;
    machines_page(&s, list, total, page, page_size)
}

/// `GET /machines?online=true`, served from the presence map rather than by
/// listing every machine of the merchant from storage: operators and
/// merchants poll it to watch a fleet, and with 10,000 machines the full
/// listing costs tens of milliseconds where this costs a map scan. Only the
/// page's rows are read from storage.
async fn list_online_machines(
    s: &AppState,
    merchant: &str,
    page: usize,
    page_size: usize,
) -> Envelope {
    let mut mine = Vec::new();
    for m in s.gw.fleet.online_machines() {
        match s.gw.orders.owned_by(&m, merchant).await {
            Ok(true) => mine.push(m),
            Ok(false) => {}
            Err(_) => return err(s, ErrorCode::Internal),
        }
    }
    let total = mine.len();
    let mut list = Vec::new();
    for m in mine
        .iter()
        .skip((page - 1).saturating_mul(page_size))
        .take(page_size)
    {
        match s.gw.fleet.machine(m).await {
            Ok(Some(machine)) => list.push(machine_json(s, &machine).await),
            // Owned a moment ago, and machine rows are never deleted (a
            // removed machine keeps its row): only a storage error gets here.
            Ok(None) | Err(_) => return err(s, ErrorCode::Internal),
        }
    }
    machines_page(s, list, total, page, page_size)
}

/// One page of a machine listing, in the envelope.
fn machines_page(
    s: &AppState,
    list: Vec<Value>,
    total: usize,
    page: usize,
    page_size: usize,
) -> Envelope {
    let mut data = Map::new();
    data.insert("machines".into(), Value::Array(list));
    data.insert("total".into(), json!(total));
    data.insert("page".into(), json!(page));
    data.insert("page_size".into(), json!(page_size));
    ok(s, Value::Object(data))
}

/// One of the caller's machines.
///
/// Codes: 0; 10001–10003; 20002; 30001; 50000.
#[utoipa::path(
    get,
    path = "/machines/{machine_no}",
    tag = "machines",
    params(("machine_no" = String, Path, description = "8 ASCII digits (else 20002); another merchant's machine is 30001.")),
    responses((status = 200, description = "The machine, or an error envelope.", body = MachineAnswer))
)]
async fn get_machine(
    State(s): State<AppState>,
    Merchant(merchant): Merchant,
    Segment(machine_no): Segment,
) -> Envelope {
    match callers_machine(&s, &merchant, &machine_no).await {
        Ok(machine) => ok(&s, machine_json(&s, &machine).await),
        Err(code) => err(&s, code),
    }
}

/// The caller's machine `machine_no`, read from storage: 20002 when the
/// number is malformed, 30001 when it is unknown or another merchant's
/// (answered alike, so machine numbers cannot be probed).
async fn callers_machine(
    s: &AppState,
    merchant: &str,
    machine_no: &str,
) -> Result<crate::storage::Machine, ErrorCode> {
    let m = machine_no
        .parse::<MachineNo>()
        .map_err(|_| ErrorCode::InvalidMachineNo)?;
    match s.gw.fleet.machine(&m).await {
        Ok(Some(machine)) if machine.merchant_appid == merchant => Ok(machine),
        Ok(_) => Err(ErrorCode::MachineNotFound),
        Err(_) => Err(ErrorCode::Internal),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<OrderBody, ErrorCode> {
        parse_order_body(s.as_bytes(), 20, 99)
    }

    #[test]
    fn published_bodies_parse() {
        let go = r#"{"imei": "12345678","products": [{"product_id": 1,"quantity": 1}]}"#;
        let php = "{\"products\":[{\"product_id\":1,\"quantity\":1}],\"imei\":\"12345678\"}";
        let doc =
            r#"{ "machine_no": "12345678", "products": [ { "product_id": 1, "quantity": 1 } ] }"#;
        for b in [go, php, doc] {
            assert_eq!(parse(b).unwrap().lines, vec![(1, 1)]);
        }
    }

    #[test]
    fn codes_for_bad_bodies() {
        use ErrorCode::*;
        let cases = [
            ("not json", InvalidParams),
            ("[]", InvalidParams),
            (r#"{"products":[]}"#, InvalidParams),
            (
                r#"{"machine_no":12345678,"products":[{"product_id":1,"quantity":1}]}"#,
                InvalidParams,
            ),
            (
                r#"{"machine_no":"12345678","imei":"87654321","products":[{"product_id":1,"quantity":1}]}"#,
                InvalidParams,
            ),
            (r#"{"machine_no":"12345678","products":{}}"#, InvalidParams),
            (
                r#"{"machine_no":"12345678","products":[{"product_id":"1","quantity":1}]}"#,
                InvalidParams,
            ),
            (
                r#"{"machine_no":"12345678","products":[{"product_id":1.5,"quantity":1}]}"#,
                InvalidParams,
            ),
            (
                r#"{"machine_no":"12345678","products":[{"product_id":1,"quantity":1}],"pay_later":"yes"}"#,
                InvalidParams,
            ),
            (
                r#"{"machine_no":"12345678","products":[{"product_id":1,"quantity":1}],"out_trade_no":""}"#,
                InvalidParams,
            ),
            (
                r#"{"machine_no":"1234567","products":[{"product_id":1,"quantity":1}]}"#,
                InvalidMachineNo,
            ),
            (
                r#"{"machine_no":"1234567a","products":[{"product_id":1,"quantity":1}]}"#,
                InvalidMachineNo,
            ),
            (
                r#"{"machine_no":"12345678","products":[]}"#,
                InvalidProducts,
            ),
            (
                r#"{"machine_no":"12345678","products":[{"product_id":0,"quantity":1}]}"#,
                InvalidProducts,
            ),
            (
                r#"{"machine_no":"12345678","products":[{"product_id":1,"quantity":0}]}"#,
                InvalidProducts,
            ),
            (
                r#"{"machine_no":"12345678","products":[{"product_id":1,"quantity":100}]}"#,
                InvalidProducts,
            ),
            (
                r#"{"machine_no":"12345678","products":[{"product_id":1,"quantity":-1}]}"#,
                InvalidProducts,
            ),
            (
                r#"{"machine_no":"12345678","products":[{"product_id":18446744073709551615,"quantity":1}]}"#,
                InvalidProducts,
            ),
        ];
        for (body, want) in cases {
            assert_eq!(parse(body), Err(want), "{body}");
        }
        let many: Vec<String> = (1..=21)
            .map(|i| format!(r#"{{"product_id":{i},"quantity":1}}"#))
            .collect();
        let body = format!(
            r#"{{"machine_no":"12345678","products":[{}]}}"#,
            many.join(",")
        );
        assert_eq!(parse(&body), Err(InvalidProducts));
    }
}
