//! The OpenAPI 3.1 document of the open API, served at
//! `GET /api/openapi/v1/openapi.json`.
//!
//! Routes and document are one list: the open API's modules get no
//! `Router`, only [`ApiRoutes::add`], which takes a handler's
//! `#[utoipa::path]` description and routes the handler at the path and
//! methods that description names. So a route under `/api/openapi/v1` is
//! not served without being documented, nor documented where it is not
//! served. (What `add` cannot check is that the description passed is the
//! handler's own: `add(__path_x, x)`, by convention.)
//!
//! The schemas below describe what the handlers put in `data` (they build it
//! as JSON); the end-to-end tests validate real answers against them. Fields
//! the envelope may leave out (empty, `false`, 0 or null: API.md
//! conventions) are not `required`. Webhook bodies are not pruned: their
//! `null`s are sent as such.

use std::borrow::Cow;

use axum::handler::Handler;
use axum::http::header::CONTENT_TYPE;
use axum::response::IntoResponse;
use axum::routing::{MethodFilter, MethodRouter};
use axum::{Extension, Router};
use serde_json::{json, Value};
use utoipa::openapi::path::{HttpMethod, Paths};
use utoipa::openapi::schema::{ObjectBuilder, OneOfBuilder, Ref, Schema, Type};
use utoipa::openapi::RefOr;
use utoipa::{OpenApi, PartialSchema, ToSchema};
use vendgate_proto::codes::ErrorCode;

use super::AppState;
use crate::domain::order::Status;

/// The open API's routes, with the document of each, built together.
pub(super) struct ApiRoutes {
    router: Router<AppState>,
    paths: Paths,
}

impl ApiRoutes {
    pub(super) fn new() -> Self {
        Self {
            router: Router::new(),
            paths: Paths::new(),
        }
    }

    /// Serve `handler` at the path and methods of its `#[utoipa::path]`
    /// (`doc` is the `__path_<handler>` type that attribute generates).
    pub(super) fn add<D, H, T>(mut self, _doc: D, handler: H) -> Self
    where
        D: utoipa::Path,
        H: Handler<T, AppState>,
        T: 'static,
    {
        let path = D::path();
        let mut route = MethodRouter::new();
        for m in D::methods() {
            route = route.on(method_filter(&m), handler.clone());
        }
        self.router = self.router.route(&path, route);
        self.paths
            .add_path_operation(&path, D::methods(), D::operation());
        self
    }

    /// The router with `GET /openapi.json` added: the document of every
    /// route added before, and of itself. It needs no credentials, and it is
    /// the one answer under `/api/openapi/v1` outside the envelope.
    pub(super) fn finish(mut self) -> Router<AppState> {
        let path = <__path_openapi_json as utoipa::Path>::path();
        let mut route = MethodRouter::new();
        for m in <__path_openapi_json as utoipa::Path>::methods() {
            route = route.on(method_filter(&m), openapi_json);
        }
        let doc = OpenApiJson(bytes::Bytes::from(self.document().to_string()));
        self.router.route(&path, route.layer(Extension(doc)))
    }

    /// The document of the routes added so far, and of `GET /openapi.json`.
    fn document(&mut self) -> Value {
        let mut operation = <__path_openapi_json as utoipa::Path>::operation();
        // `security: []`: this one operation needs no credentials.
        operation.security = Some(Vec::new());
        self.paths.add_path_operation(
            <__path_openapi_json as utoipa::Path>::path(),
            <__path_openapi_json as utoipa::Path>::methods(),
            operation,
        );
        document(std::mem::take(&mut self.paths))
    }
}

/// The serialized document, handed to its handler.
#[derive(Clone)]
struct OpenApiJson(bytes::Bytes);

/// The OpenAPI 3.1 document of the open API (this document).
#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "meta",
    responses((status = 200, description = "This document (OpenAPI 3.1), outside the envelope.", content_type = "application/json"))
)]
async fn openapi_json(Extension(doc): Extension<OpenApiJson>) -> impl IntoResponse {
    ([(CONTENT_TYPE, "application/json")], doc.0)
}

fn method_filter(m: &HttpMethod) -> MethodFilter {
    match m {
        HttpMethod::Get => MethodFilter::GET,
        HttpMethod::Post => MethodFilter::POST,
        HttpMethod::Put => MethodFilter::PUT,
        HttpMethod::Delete => MethodFilter::DELETE,
        HttpMethod::Options => MethodFilter::OPTIONS,
        HttpMethod::Head => MethodFilter::HEAD,
        HttpMethod::Patch => MethodFilter::PATCH,
        HttpMethod::Trace => MethodFilter::TRACE,
    }
}

/// The fixed parts of the document; paths come from [`ApiRoutes`], and
/// [`document`] adds what utoipa 5 cannot express (see there).
#[derive(OpenApi)]
#[openapi(
    info(
        title = "vendgate merchant open API",
        description = "The merchant HTTP API of vendgate (API.md). Every answer except this \
document is the envelope `{code, message, data}`, HTTP 200 by default whatever the code \
(`http_status = \"mirror\"` maps error codes to 4xx/5xx; the body is the same). Inside \
`data`, fields whose value is empty, `false`, 0 or null are left out: a missing field is \
its empty value. Request bodies are read as JSON whatever their Content-Type says; unknown \
request fields are ignored."
    ),
    servers((url = "/api/openapi/v1", description = "this gateway")),
    security(("Appid" = [], "AppSecret" = [])),
    components(schemas(
        PlaceOrderRequest, ProductLine, PlacedOrder, Order, OrderItem, OrderEvent, OrderPage,
        RefundResult, CancelResult, Machine, StockLine, MachinePage, Pong, MerchantSettings,
        MerchantUpdate, WebhookEventRecord, EventPage, ReplayedEvent, Status,
        OrderWebhook, OrderWebhookData, MachineWebhook, MachineWebhookData,
        PlacedAnswer, OrderAnswer, OrderPageAnswer, RefundAnswer, CancelAnswer, MachineAnswer,
        MachinePageAnswer, PongAnswer, MerchantAnswer, EventPageAnswer, ReplayAnswer,
    )),
    tags(
        (name = "orders", description = "Placing, paying, refunding, cancelling and reading orders"),
        (name = "machines", description = "The caller's machines"),
        (name = "merchant", description = "The caller's own settings"),
        (name = "events", description = "The caller's webhook events: list, replay"),
        (name = "meta", description = "This document"),
    )
)]
struct Doc;

/// The whole document. What utoipa 5 has no type for is added as JSON: the
/// `webhooks` section (OpenAPI 3.1), the code enum (one `enum` of one value
/// per code, each with its description), the security schemes, and the
/// error answers of `http_status = "mirror"` on every enveloped operation.
fn document(paths: Paths) -> Value {
    let mut api = Doc::openapi();
    api.paths = paths;
    // Serializing plain data with string keys cannot fail.
    let mut doc = serde_json::to_value(&api).unwrap_or_else(|_| json!({}));
    if let Some(schemas) = doc
        .pointer_mut("/components/schemas")
        .and_then(Value::as_object_mut)
    {
        schemas.insert("ResultCode".into(), result_code_schema());
        schemas.insert("ErrorCode".into(), error_code_schema());
        schemas.insert("ErrorEnvelope".into(), error_envelope_schema());
        // `machine_no` or its alias `imei`: one of them is required.
        if let Some(req) = schemas.get_mut("PlaceOrderRequest") {
            req["anyOf"] = json!([{ "required": ["machine_no"] }, { "required": ["imei"] }]);
        }
    }
    if let Some(components) = doc.get_mut("components").and_then(Value::as_object_mut) {
        components.insert(
            "securitySchemes".into(),
            json!({
                "Appid": { "type": "apiKey", "in": "header", "name": "Appid",
                           "description": "The merchant's appid. Sent with `AppSecret`; 10001 when either is missing, 10002 when they do not match." },
                "AppSecret": { "type": "apiKey", "in": "header", "name": "AppSecret",
                               "description": "The merchant's secret, compared in constant time and never logged. During a rotation's grace period the previous secret matches too." }
            }),
        );
    }
    if let Some(paths) = doc.get_mut("paths").and_then(Value::as_object_mut) {
        for item in paths.values_mut().filter_map(Value::as_object_mut) {
            for op in item.values_mut().filter_map(Value::as_object_mut) {
                let enveloped = op.get("security") != Some(&json!([]));
                if let (true, Some(responses)) = (
                    enveloped,
                    op.get_mut("responses").and_then(Value::as_object_mut),
                ) {
                    for range in ["4XX", "5XX"] {
                        responses.insert(range.into(), mirror_response());
                    }
                }
            }
        }
    }
    if let Some(doc) = doc.as_object_mut() {
        doc.insert("webhooks".into(), webhooks());
    }
    doc
}

fn mirror_response() -> Value {
    json!({
        "description": "Only with `http_status = \"mirror\"`: an error envelope with the HTTP status of its code (400, 401, 404, 409, 429, 503; 405 for a method the path does not take). By default errors come with HTTP 200.",
        "content": { "application/json": { "schema": { "$ref": "#/components/schemas/ErrorEnvelope" } } }
    })
}

/// API.md's table, in English (the `message` is the Chinese text).
fn code_meaning(code: ErrorCode) -> &'static str {
    use ErrorCode::*;
    match code {
        Ok => "success",
        MissingCredentials => "missing credentials: no `Appid` or `AppSecret` header",
        AuthFailed => "authentication failed: unknown Appid or wrong AppSecret",
        RateLimited => "rate limited: over the merchant's request rate",
        InvalidParams => "invalid parameters: body is not valid JSON, wrong types, missing fields (also an unknown route or a method the path does not take)",
        InvalidMachineNo => "invalid machine_no: not exactly 8 ASCII digits",
        InvalidProducts => "invalid products: empty list, product_id ≤ 0, quantity ≤ 0, quantity over the per-line limit, too many lines",
        MachineNotFound => "machine not found: unknown machine, or another merchant's",
        MachineOffline => "machine offline, or its acceptance was not received and recorded in time; nothing will be dispensed",
        MachineBusy => "machine busy with another order past what the deadline allows, or its queue is full; nothing was sent",
        InsufficientStock => "insufficient stock: a product is not on the machine or its free stock is short",
        MachineRefused => "the machine refused the order (door open, maintenance…)",
        OrderNotFound => "order not found: unknown order (or webhook event), or another merchant's",
        OrderStateConflict => "order state conflict: the action does not fit the order's (or event's) status",
        DuplicateOutTradeNo => "duplicate out_trade_no: same `out_trade_no` / `Idempotency-Key`, different body",
        Internal => "internal error: the gateway failed; nothing was dispatched",
    }
}

fn code_value(code: ErrorCode) -> Value {
    json!({
        "type": "integer",
        "enum": [code.code()],
        "title": code.message(),
        "description": format!("{} ({}): {}", code.code(), code.message(), code_meaning(code)),
    })
}

/// Every `code` of the envelope: 0 and the error codes.
fn result_code_schema() -> Value {
    json!({
        "description": "The envelope's `code`: 0 for success, else an error code (API.md \"Error codes\").",
        "oneOf": [ code_value(ErrorCode::Ok), { "$ref": "#/components/schemas/ErrorCode" } ],
    })
}

fn error_code_schema() -> Value {
    let codes: Vec<Value> = ErrorCode::ALL
        .into_iter()
        .filter(|c| !c.is_ok())
        .map(code_value)
        .collect();
    json!({
        "description": "An error code; the envelope's `message` is its Chinese text (the `title` here).",
        "oneOf": codes,
    })
}

fn error_envelope_schema() -> Value {
    json!({
        "description": "An error answer: the code, its Chinese message, and `data` always `{}`.",
        "type": "object",
        "required": ["code", "message", "data"],
        "properties": {
            "code": { "$ref": "#/components/schemas/ErrorCode" },
            "message": { "type": "string" },
            "data": { "type": "object", "maxProperties": 0 }
        }
    })
}

fn webhook_headers() -> Value {
    json!({
        "Vendgate-Event-Id": {
            "description": "The event's `event_id` (deliveries are at least once: deduplicate on it).",
            "required": true, "schema": { "type": "string" }
        },
        "Vendgate-Signature": {
            "description": "`t=<unix seconds>,v1=<hex HMAC-SHA256 of \"t.body\" keyed by the merchant's AppSecret>`; computed per attempt.",
            "required": true,
            "schema": { "type": "string", "pattern": "^t=[0-9]+,v1=[0-9a-f]{64}$" }
        }
    })
}

/// The OpenAPI 3.1 `webhooks` section: what the gateway POSTs to the
/// merchant's `notify_url`.
fn webhooks() -> Value {
    let hook = |schema: &str, summary: &str| {
        json!({ "post": {
            "summary": summary,
            "description": "POSTed to the merchant's `notify_url`, at least once, in order per order, from a durable outbox, retried with backoff for at least 24 hours. A 2xx answer ends delivery; anything else retries. The body is not pruned: `null` fields are sent.",
            "security": [],
            "parameters": webhook_headers()
                .as_object()
                .map(|h| h.iter().map(|(name, p)| {
                    let mut p = p.clone();
                    p["name"] = json!(name);
                    p["in"] = json!("header");
                    p
                }).collect::<Vec<_>>())
                .unwrap_or_default(),
            "requestBody": { "required": true, "content": { "application/json": {
                "schema": { "$ref": format!("#/components/schemas/{schema}") } } } },
            "responses": { "2XX": { "description": "Delivered; any other answer is retried." } }
        } })
    };
    json!({
        "order": hook("OrderWebhook", "An order changed (order.* events)"),
        "machine": hook("MachineWebhook", "A machine came online or went offline (machine.* events)"),
    })
}

/// An enveloped success answer whose `data` is `$data`, or an error answer.
macro_rules! answer {
    ($name:ident, $data:ident) => {
        #[doc = concat!("The envelope with `data` a `", stringify!($data), "` (code 0), or an error envelope.")]
        pub(super) struct $name;

        impl PartialSchema for $name {
            fn schema() -> RefOr<Schema> {
                answer_schema(stringify!($data))
            }
        }

        impl ToSchema for $name {
            fn name() -> Cow<'static, str> {
                Cow::Borrowed(stringify!($name))
            }

            fn schemas(schemas: &mut Vec<(String, RefOr<Schema>)>) {
                schemas.push(($data::name().into(), $data::schema()));
                $data::schemas(schemas);
            }
        }
    };
}

fn answer_schema(data: &str) -> RefOr<Schema> {
    let ok = ObjectBuilder::new()
        .schema_type(Type::Object)
        .property(
            "code",
            ObjectBuilder::new()
                .schema_type(Type::Integer)
                .enum_values(Some([0])),
        )
        .required("code")
        .property(
            "message",
            ObjectBuilder::new()
                .schema_type(Type::String)
                .enum_values(Some(["ok"])),
        )
        .required("message")
        .property("data", Ref::from_schema_name(data))
        .required("data");
    OneOfBuilder::new()
        .item(ok)
        .item(Ref::from_schema_name("ErrorEnvelope"))
        .into()
}

answer!(PlacedAnswer, PlacedOrder);
answer!(OrderAnswer, Order);
answer!(OrderPageAnswer, OrderPage);
answer!(RefundAnswer, RefundResult);
answer!(CancelAnswer, CancelResult);
answer!(MachineAnswer, Machine);
answer!(MachinePageAnswer, MachinePage);
answer!(PongAnswer, Pong);
answer!(MerchantAnswer, MerchantSettings);
answer!(EventPageAnswer, EventPage);
answer!(ReplayAnswer, ReplayedEvent);

// ---- Request bodies ----

/// `POST /orders`. The published examples send the machine as `imei`:
/// `machine_no` or `imei` is required; both present and different is 20001.
#[derive(ToSchema)]
#[allow(dead_code)]
pub(super) struct PlaceOrderRequest {
    /// 8 ASCII digits (leading zeros count); else 20002.
    #[schema(required = false, pattern = "^[0-9]{8}$", example = "12345678")]
    machine_no: String,
    /// Alias of `machine_no`, as the published examples send it.
    #[schema(required = false, pattern = "^[0-9]{8}$")]
    imei: String,
    /// At least one line, at most `orders.max_lines`; else 20003.
    #[schema(min_items = 1)]
    products: Vec<ProductLine>,
    /// The merchant's own order number: a repeat with the same body answers
    /// the same `order_id` and never dispatches twice; with a different body
    /// 40003. The `Idempotency-Key` header means the same (this field wins).
    #[schema(required = false, min_length = 1, max_length = 64)]
    out_trade_no: String,
    /// Reserve the goods and wait for `POST /orders/{order_id}/pay`; unpaid
    /// after `orders.pay_timeout` (20 minutes by default) the order expires.
    #[schema(required = false)]
    pay_later: bool,
}

/// One line of an order request.
#[derive(ToSchema)]
#[allow(dead_code)]
pub(super) struct ProductLine {
    #[schema(minimum = 1)]
    product_id: i64,
    /// At most `orders.max_quantity`.
    #[schema(minimum = 1)]
    quantity: u32,
}

/// `PUT /merchant`: `notify_url` is required; `null` or `""` removes it.
#[derive(ToSchema)]
#[allow(dead_code)]
pub(super) struct MerchantUpdate {
    /// `http` or `https`, with a host, at most 2048 bytes; an IP-literal
    /// host must be a public address. Anything else is 20001.
    #[schema(required = true, max_length = 2048)]
    notify_url: Option<String>,
}

// ---- `data` of the answers ----

/// `data` of `POST /orders` and `POST /orders/{order_id}/pay`.
#[derive(ToSchema)]
#[allow(dead_code)]
pub(super) struct PlacedOrder {
    /// Positive, unique across restarts, never reused.
    #[schema(minimum = 1)]
    order_id: u64,
    /// `awaiting_payment` for a `pay_later` order; absent otherwise.
    #[schema(required = false)]
    status: Status,
}

/// An order, as `GET /orders/{order_id}` shows it (an entry of `GET /orders`
/// is the same without `events` and `events_dropped`).
#[derive(ToSchema)]
#[allow(dead_code)]
pub(super) struct Order {
    #[schema(minimum = 1)]
    order_id: u64,
    #[schema(pattern = "^[0-9]{8}$")]
    machine_no: String,
    status: Status,
    #[schema(required = false)]
    out_trade_no: String,
    items: Vec<OrderItem>,
    /// Total price in fen.
    #[schema(required = false)]
    amount: i64,
    /// What is owed back, in fen, computed from what came out.
    #[schema(required = false)]
    refund_amount: i64,
    #[schema(format = DateTime)]
    created_at: String,
    #[schema(format = DateTime)]
    updated_at: String,
    /// The machine's failure reason, if any.
    #[schema(required = false)]
    error: String,
    #[schema(required = false)]
    pay_later: bool,
    /// When an `awaiting_payment` order expires.
    #[schema(required = false, format = DateTime)]
    pay_deadline: String,
    /// `pending` while a refund is owed and not recorded, `refunded` once
    /// recorded, `mismatch` when a late result changed what is owed after
    /// that; absent when nothing is owed.
    #[schema(required = false, pattern = "^(pending|refunded|mismatch)$")]
    refund_status: String,
    /// What the merchant recorded as refunded, in fen.
    #[schema(required = false)]
    refunded_amount: i64,
    #[schema(required = false, format = DateTime)]
    refunded_at: String,
    /// `GET /orders/{order_id}` only: the order's timeline, webhook
    /// attempts included, oldest first.
    #[schema(required = false)]
    events: Vec<OrderEvent>,
    /// `GET /orders/{order_id}` only: timeline entries not kept.
    #[schema(required = false)]
    events_dropped: u64,
}

/// One line of an order.
#[derive(ToSchema)]
#[allow(dead_code)]
pub(super) struct OrderItem {
    product_id: i64,
    quantity: u32,
    /// How many came out.
    #[schema(required = false)]
    dispensed: u32,
    /// Price of one, in fen.
    #[schema(required = false)]
    unit_price: i64,
}

/// One entry of an order's timeline.
#[derive(ToSchema)]
#[allow(dead_code)]
pub(super) struct OrderEvent {
    #[schema(format = DateTime)]
    at: String,
    /// What happened (`created`, `accepted`, `result`, …, or `webhook` for
    /// a delivery attempt).
    #[schema(rename = "type")]
    kind: String,
    #[schema(required = false, value_type = Object)]
    detail: Value,
}

/// `data` of `GET /orders`: one page, newest first.
#[derive(ToSchema)]
#[allow(dead_code)]
pub(super) struct OrderPage {
    #[schema(required = false)]
    orders: Vec<Order>,
    /// Every match (absent when nothing matches).
    #[schema(required = false)]
    total: u64,
    page: u64,
    page_size: u64,
}

/// `data` of `POST /orders/{order_id}/refund`.
#[derive(ToSchema)]
#[allow(dead_code)]
pub(super) struct RefundResult {
    order_id: u64,
    #[schema(required = false)]
    refund_amount: i64,
    #[schema(required = false)]
    refunded_amount: i64,
    #[schema(required = false, pattern = "^(pending|refunded|mismatch)$")]
    refund_status: String,
    #[schema(required = false, format = DateTime)]
    refunded_at: String,
}

/// `data` of `POST /orders/{order_id}/cancel`.
#[derive(ToSchema)]
#[allow(dead_code)]
pub(super) struct CancelResult {
    order_id: u64,
    /// `cancelled`.
    status: Status,
}

/// One of the caller's machines.
#[derive(ToSchema)]
#[allow(dead_code)]
pub(super) struct Machine {
    #[schema(pattern = "^[0-9]{8}$")]
    machine_no: String,
    #[schema(required = false)]
    online: bool,
    #[schema(required = false, format = DateTime)]
    last_seen: String,
    #[schema(required = false, format = DateTime)]
    online_since: String,
    #[schema(required = false)]
    firmware: String,
    /// The latest ping round trip, in milliseconds.
    #[schema(required = false)]
    last_rtt_ms: u64,
    /// Connects in the last hour.
    #[schema(required = false)]
    flaps: u32,
    #[schema(required = false)]
    stock: Vec<StockLine>,
}

/// One product of a machine.
#[derive(ToSchema)]
#[allow(dead_code)]
pub(super) struct StockLine {
    product_id: i64,
    #[schema(required = false)]
    stock: u32,
    /// Held for orders not yet settled.
    #[schema(required = false)]
    reserved: u32,
    /// Price of one, in fen.
    #[schema(required = false)]
    price: i64,
}

/// `data` of `GET /machines`.
#[derive(ToSchema)]
#[allow(dead_code)]
pub(super) struct MachinePage {
    #[schema(required = false)]
    machines: Vec<Machine>,
    #[schema(required = false)]
    total: u64,
    page: u64,
    page_size: u64,
}

/// `data` of `POST /machines/{machine_no}/ping`.
#[derive(ToSchema)]
#[allow(dead_code)]
pub(super) struct Pong {
    #[schema(pattern = "^[0-9]{8}$")]
    machine_no: String,
    /// Rounded up to whole milliseconds, never 0.
    #[schema(minimum = 1)]
    rtt_ms: u64,
}

/// `data` of `GET /merchant` and `PUT /merchant`.
#[derive(ToSchema)]
#[allow(dead_code)]
pub(super) struct MerchantSettings {
    appid: String,
    #[schema(required = false)]
    name: String,
    #[schema(required = false)]
    notify_url: String,
}

/// One webhook event as `GET /events` lists it.
#[derive(ToSchema)]
#[allow(dead_code)]
pub(super) struct WebhookEventRecord {
    event_id: String,
    /// `order.*` or `machine.*`.
    #[schema(rename = "type")]
    kind: String,
    #[schema(pattern = "^(pending|delivered|dead)$")]
    status: String,
    #[schema(required = false)]
    attempts: u32,
    /// A category (`http_503`, `timeout`, …), never an address.
    #[schema(required = false)]
    last_error: String,
    #[schema(format = DateTime)]
    created_at: String,
    #[schema(required = false, format = DateTime)]
    next_attempt_at: String,
    #[schema(required = false, format = DateTime)]
    delivered_at: String,
    #[schema(required = false)]
    order_id: u64,
    #[schema(required = false, pattern = "^[0-9]{8}$")]
    machine_no: String,
}

/// `data` of `GET /events`: one page, oldest first.
#[derive(ToSchema)]
#[allow(dead_code)]
pub(super) struct EventPage {
    #[schema(required = false)]
    events: Vec<WebhookEventRecord>,
    #[schema(required = false)]
    total: u64,
    page: u64,
    page_size: u64,
}

/// `data` of `POST /events/{event_id}/replay`.
#[derive(ToSchema)]
#[allow(dead_code)]
pub(super) struct ReplayedEvent {
    event_id: String,
    /// `pending`.
    #[schema(pattern = "^pending$")]
    status: String,
}

// ---- Webhook bodies (not pruned) ----

/// The body of an `order.*` webhook.
#[derive(ToSchema)]
#[allow(dead_code)]
pub(super) struct OrderWebhook {
    event_id: String,
    #[schema(
        rename = "type",
        pattern = "^order\\.(completed|partially_dispensed|dispense_failed|unknown|expired|dispensed_after_rejection|refund_mismatch)$"
    )]
    kind: String,
    #[schema(format = DateTime)]
    created_at: String,
    data: OrderWebhookData,
}

/// `data` of an `order.*` webhook.
#[derive(ToSchema)]
#[allow(dead_code)]
pub(super) struct OrderWebhookData {
    order_id: u64,
    #[schema(pattern = "^[0-9]{8}$")]
    machine_no: String,
    status: Status,
    #[schema(required = true)]
    out_trade_no: Option<String>,
    items: Vec<WebhookItem>,
    amount: i64,
    refund_amount: i64,
    /// The machine's failure reason, or null.
    #[schema(required = true)]
    error: Option<String>,
    /// Present once a refund was recorded.
    #[schema(required = false)]
    refunded_amount: i64,
    /// `order.dispensed_after_rejection` only: the value of what came out.
    #[schema(required = false)]
    dispensed_amount: i64,
}

/// One line of an order in a webhook (every field sent, 0 included).
#[derive(ToSchema)]
#[allow(dead_code)]
pub(super) struct WebhookItem {
    product_id: i64,
    quantity: u32,
    dispensed: u32,
    unit_price: i64,
}

/// The body of a `machine.online` or `machine.offline` webhook.
#[derive(ToSchema)]
#[allow(dead_code)]
pub(super) struct MachineWebhook {
    event_id: String,
    #[schema(rename = "type", pattern = "^machine\\.(online|offline)$")]
    kind: String,
    #[schema(format = DateTime)]
    created_at: String,
    data: MachineWebhookData,
}

/// `data` of a `machine.*` webhook.
#[derive(ToSchema)]
#[allow(dead_code)]
pub(super) struct MachineWebhookData {
    #[schema(pattern = "^[0-9]{8}$")]
    machine_no: String,
    online: bool,
    /// When the change happened.
    #[schema(format = DateTime)]
    at: String,
    /// Why a machine went offline, when known.
    #[schema(required = false)]
    reason: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc() -> Value {
        super::super::open_api_routes().document()
    }

    /// Every `$ref` in `v`.
    fn refs<'a>(v: &'a Value, out: &mut Vec<&'a str>) {
        match v {
            Value::Object(m) => {
                if let Some(Value::String(r)) = m.get("$ref") {
                    out.push(r);
                }
                m.values().for_each(|v| refs(v, out));
            }
            Value::Array(a) => a.iter().for_each(|v| refs(v, out)),
            _ => {}
        }
    }

    #[test]
    fn every_reference_resolves() {
        let doc = doc();
        assert_eq!(doc["openapi"], "3.1.0");
        let mut all = Vec::new();
        refs(&doc, &mut all);
        assert!(all.len() > 20);
        for r in all {
            let pointer = r.strip_prefix('#').unwrap_or(r);
            assert!(doc.pointer(pointer).is_some(), "dangling $ref {r}");
        }
    }

    #[test]
    fn every_code_is_described_once() {
        let doc = doc();
        let codes: Vec<i64> = doc["components"]["schemas"]["ErrorCode"]["oneOf"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|c| c["enum"][0].as_i64())
            .collect();
        let want: Vec<i64> = ErrorCode::ALL
            .iter()
            .filter(|c| !c.is_ok())
            .map(|c| i64::from(c.code()))
            .collect();
        assert_eq!(codes, want);
    }

    #[test]
    fn the_document_itself_needs_no_credentials() {
        let doc = doc();
        assert_eq!(doc["paths"]["/openapi.json"]["get"]["security"], json!([]));
        assert_eq!(doc["security"], json!([{ "Appid": [], "AppSecret": [] }]));
        assert!(doc["paths"]["/orders"]["post"]["responses"]["4XX"].is_object());
        assert!(doc["paths"]["/openapi.json"]["get"]["responses"]["4XX"].is_null());
    }
}
