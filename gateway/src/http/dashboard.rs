//! The operator dashboard: `GET /dashboard`, one page whose HTML, CSS and
//! JavaScript are compiled into the binary (`gateway/assets/`, no build
//! step), polling small JSON endpoints every 2 s:
//!
//! - `/dashboard/api/summary`: machines online/offline/flapping, topic
//!   counters per pattern, order outcomes, recent failures, webhook backlog;
//! - `/dashboard/api/machines?q=&page=&page_size=&filter=`: the machine list,
//!   filtered and paginated on the server so 10,000 machines cost one page;
//! - `/dashboard/api/machines/{machine_no}`: one machine's page: its
//!   presence, the order its command is pending for (`dispatching` or
//!   `dispensing`), and its last [`RECENT_ORDERS`] orders with their outcome;
//! - `POST /dashboard/api/machines/{machine_no}/ping`: a round trip to the
//!   machine, bounded by [`PING_TIMEOUT`];
//! - `/dashboard/api/orders/{id}`: one order with its timeline.
//!
//! Access needs the `[operator]` credential (HTTP Basic); its password may be
//! configured as an argon2id hash (`vendgate hash-password`, see
//! [`crate::passwords`]) or, with a warning, in plaintext. A successful Basic
//! login also sets an HttpOnly session cookie so the page's own requests do
//! not depend on how a browser replays Basic credentials (`Secure` when the
//! listener is HTTPS). Without a configured credential the dashboard is
//! refused with a message saying so.
//!
//! Sign-ins are guarded like MQTT CONNECTs: failed ones are throttled per
//! source address and per username (`http.login_throttle`; 429 while
//! blocked), and argon2 checks wait in the dashboard's own bounded queue
//! (`[argon2]`; 503 "busy" when it is full), so guessing costs the guesser
//! time and cannot delay MQTT service logins.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{ConnectInfo, Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine as _;
use chrono::{DateTime, SecondsFormat, Utc};
use dashmap::DashMap;
use rand::RngCore;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tracing::{info, warn};
use vendgate_proto::codes::ErrorCode;
use vendgate_proto::machine::MachineNo;

use super::limits::HttpStats;
use super::Parts;
use crate::domain::order::Status;
use crate::edge::limits::AuthThrottle;
use crate::edge::stats::{Direction, PATTERNS};
use crate::fleet::FLAP_THRESHOLD;
use crate::link::commands::DeliveryError;
use crate::metrics::orders::OUTCOMES;
use crate::metrics::webhooks::DeliveryResult;
use crate::passwords::{Argon2Queue, Busy, ConfigPassword, Lane};
use crate::storage::{OrderQuery, StoredOrder};

const INDEX_HTML: &str = include_str!("../../assets/dashboard.html");
const APP_JS: &str = include_str!("../../assets/dashboard.js");
const APP_CSS: &str = include_str!("../../assets/dashboard.css");

/// Session cookie name; scoped to `/dashboard`.
const COOKIE: &str = "vendgate_dashboard";
/// How long a dashboard session lasts after the Basic login.
const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);
/// Sessions kept at most; beyond it the oldest expire early (a client that
/// never keeps cookies must not grow the table).
const MAX_SESSIONS: usize = 1024;
/// Shortest operator password the dashboard accepts.
pub const MIN_PASSWORD: usize = 12;
/// Machine list page size bounds.
const DEFAULT_PAGE_SIZE: usize = 50;
const MAX_PAGE_SIZE: usize = 200;
/// Orders a machine's page lists, newest first.
const RECENT_ORDERS: u64 = 20;
/// How long the page's Ping waits for the machine's `pong`.
const PING_TIMEOUT: Duration = Duration::from_secs(2);
/// Every page and answer forbids framing and outside scripts.
const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'";

#[derive(Clone)]
struct DashState {
    gw: Parts,
    sessions: Arc<DashMap<String, tokio::time::Instant>>,
    /// The operator password, parsed once; Err says why the dashboard is
    /// refused.
    password: Result<Arc<ConfigPassword>, String>,
    /// Failed sign-ins per source address and per username.
    throttle: Arc<AuthThrottle>,
    stats: Arc<HttpStats>,
    /// Served over HTTPS: the session cookie is `Secure`.
    tls: bool,
}

/// The dashboard's routes (full paths, to merge into the HTTP router).
pub fn routes<S>(gw: Parts) -> Router<S> {
    let password = operator_password(&gw);
    match &password {
        Err(why) => warn!("{why}"),
        Ok(p) if !p.is_hashed() => warn!(
            "[operator] password is in plaintext; store `vendgate hash-password` output instead"
        ),
        Ok(_) => {}
    }
    let state = DashState {
        throttle: Arc::new(AuthThrottle::new(gw.settings.http.login_throttle.clone())),
        stats: gw.metrics.http.clone(),
        tls: gw.settings.http.tls.is_some(),
        gw,
        sessions: Arc::new(DashMap::new()),
        password,
    };
    Router::new()
        .route("/dashboard", get(index))
        .route("/dashboard/", get(index))
        .route("/dashboard/app.js", get(app_js))
        .route("/dashboard/app.css", get(app_css))
        .route("/dashboard/api/summary", get(summary))
        .route("/dashboard/api/machines", get(machines))
        .route("/dashboard/api/machines/{machine_no}", get(machine))
        .route("/dashboard/api/machines/{machine_no}/ping", post(ping))
        .route("/dashboard/api/orders/{order_id}", get(order))
        .route("/dashboard/api/cluster", get(cluster))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            require_operator,
        ))
        .with_state(state)
}

/// The configured operator password, or why it cannot protect the
/// dashboard. The length rule applies to plaintext only: a hash hides the
/// length (`hash-password` enforces the same minimum).
fn operator_password(gw: &Parts) -> Result<Arc<ConfigPassword>, String> {
    let op = &gw.settings.operator;
    if op.username.is_empty() || op.password.is_empty() {
        return Err("dashboard disabled: set [operator] username and password \
                    (or VENDGATE_OPERATOR__USERNAME / VENDGATE_OPERATOR__PASSWORD)"
            .into());
    }
    let queue = Argon2Queue::new(
        Lane::Dashboard,
        &gw.settings.argon2,
        gw.settings.argon2.max_wait,
        gw.metrics.argon2.clone(),
    );
    let password = ConfigPassword::parse(&op.password)
        .map_err(|e| format!("dashboard disabled: [operator] password: {e}"))?
        .queued(Arc::new(queue));
    if !password.is_hashed() && op.password.chars().count() < MIN_PASSWORD {
        return Err(format!(
            "dashboard disabled: [operator] password must have at least {MIN_PASSWORD} characters"
        ));
    }
    Ok(Arc::new(password))
}

fn digest(s: &str) -> [u8; 32] {
    Sha256::digest(s.as_bytes()).into()
}

/// Compare in constant time; hashing first makes the lengths equal.
fn same(a: &str, b: &str) -> bool {
    digest(a).ct_eq(&digest(b)).into()
}

/// The username and password of an `Authorization: Basic …` header.
fn basic_credentials(headers: &HeaderMap) -> Option<(String, String)> {
    let v = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())?;
    let b64 = v
        .strip_prefix("Basic ")
        .or_else(|| v.strip_prefix("basic "))?;
    let raw = base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .ok()?;
    let text = String::from_utf8(raw).ok()?;
    let (user, pass) = text.split_once(':')?;
    Some((user.to_string(), pass.to_string()))
}

/// The credential matches the operator's, or the password check was busy.
async fn credential_ok(
    gw: &Parts,
    password: &ConfigPassword,
    user: &str,
    pass: &str,
) -> Result<bool, Busy> {
    let op = &gw.settings.operator;
    // Both compared, always, so timing does not tell which one was wrong.
    let u = same(user, &op.username);
    let p = password.check(pass).await?;
    Ok(u & p)
}

fn session_cookie(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v.to_string())
}

fn session_ok(state: &DashState, headers: &HeaderMap) -> bool {
    let Some(token) = session_cookie(headers) else {
        return false;
    };
    // Tokens are looked up by their hash so the map never holds a usable
    // token and lookups do not compare secrets byte by byte.
    let key = hex::encode(digest(&token));
    match state.sessions.get(&key).map(|e| *e) {
        Some(expires) if tokio::time::Instant::now() < expires => true,
        Some(_) => {
            state.sessions.remove(&key);
            false
        }
        None => false,
    }
}

fn new_session(state: &DashState) -> String {
    let now = tokio::time::Instant::now();
    if state.sessions.len() >= MAX_SESSIONS {
        state.sessions.retain(|_, exp| *exp > now);
        if state.sessions.len() >= MAX_SESSIONS {
            state.sessions.clear();
        }
    }
    let mut b = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut b);
    let token = hex::encode(b);
    state
        .sessions
        .insert(hex::encode(digest(&token)), now + SESSION_TTL);
    token
}

/// Middleware: the operator credential or a session from it; 503 with the
/// reason when no usable credential is configured. A sign-in from a blocked
/// address or for a blocked username answers 429 without checking the
/// password; one whose check found the argon2 queue full answers 503.
async fn require_operator(State(state): State<DashState>, req: Request, next: Next) -> Response {
    let password = match &state.password {
        Ok(p) => p.clone(),
        Err(why) => return (StatusCode::SERVICE_UNAVAILABLE, why.clone()).into_response(),
    };
    if session_ok(&state, req.headers()) {
        return secure(next.run(req).await);
    }
    let Some((user, pass)) = basic_credentials(req.headers()) else {
        return unauthorized();
    };
    // Requests built without a socket (tests) have no peer: one shared key.
    let ip = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |c| c.0.ip());
    if let Some(scope) = state
        .throttle
        .check(ip, Some(&user), std::time::Instant::now())
    {
        state.stats.login_throttled[scope as usize].fetch_add(1, Ordering::Relaxed);
        let retry = state
            .gw
            .settings
            .http
            .login_throttle
            .cooldown
            .as_secs()
            .max(1);
        return retry_after(
            StatusCode::TOO_MANY_REQUESTS,
            "too many failed sign-ins; try again later",
            retry,
        );
    }
    match credential_ok(&state.gw, &password, &user, &pass).await {
        Ok(true) => {}
        Ok(false) => {
            state
                .throttle
                .failed(ip, Some(&user), std::time::Instant::now());
            state.stats.login_failures.fetch_add(1, Ordering::Relaxed);
            warn!(%ip, username = %user, "dashboard sign-in failed");
            return unauthorized();
        }
        Err(Busy) => {
            return retry_after(
                StatusCode::SERVICE_UNAVAILABLE,
                "sign-in is busy; try again shortly",
                1,
            )
        }
    }
    state.throttle.succeeded(ip, &user);
    let token = new_session(&state);
    info!("operator signed in to the dashboard");
    let mut res = secure(next.run(req).await);
    let cookie = format!(
        "{COOKIE}={token}; Path=/dashboard; HttpOnly; SameSite=Strict; Max-Age={}{}",
        SESSION_TTL.as_secs(),
        if state.tls { "; Secure" } else { "" },
    );
    if let Ok(v) = HeaderValue::from_str(&cookie) {
        res.headers_mut().append(header::SET_COOKIE, v);
    }
    res
}

fn unauthorized() -> Response {
    let mut res = (StatusCode::UNAUTHORIZED, "operator credential required").into_response();
    res.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Basic realm=\"vendgate dashboard\", charset=\"UTF-8\""),
    );
    res
}

fn retry_after(status: StatusCode, why: &'static str, secs: u64) -> Response {
    let mut res = (status, why).into_response();
    res.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(secs));
    res
}

fn secure(mut res: Response) -> Response {
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    res
}

async fn index() -> Response {
    (
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        INDEX_HTML,
    )
        .into_response()
}

async fn app_js() -> Response {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        APP_JS,
    )
        .into_response()
}

async fn app_css() -> Response {
    ([(header::CONTENT_TYPE, "text/css; charset=utf-8")], APP_CSS).into_response()
}

fn rfc3339(t: Option<DateTime<Utc>>) -> Value {
    t.map(|t| Value::String(t.to_rfc3339_opts(SecondsFormat::Millis, true)))
        .unwrap_or(Value::Null)
}

fn internal() -> Response {
    (
        StatusCode::INTERNAL_SERVER_ERROR,
        Json(json!({ "error": "internal error" })),
    )
        .into_response()
}

/// The numbers of the page's cards, tables and charts. Counters are
/// cumulative; the page turns successive samples into rates.
/// The cluster: each node with its machine count (heartbeats on NATS) and
/// its database row. Single node: `{"cluster": false}`.
async fn cluster(State(state): State<DashState>) -> Response {
    let gw = &state.gw;
    let Some(c) = &gw.cluster else {
        return Json(json!({ "cluster": false })).into_response();
    };
    let rows = match gw.store.nodes().await {
        Ok(r) => r,
        Err(_) => return internal(),
    };
    let live = c.node_machines();
    let nodes: Vec<Value> = rows
        .iter()
        .map(|n| {
            json!({
                "node_id": n.node_id,
                "alive": live.contains_key(&n.node_id),
                "machines": live.get(&n.node_id).copied().unwrap_or(0),
                "online_machines_stored": n.online_machines,
                "started_at": rfc3339(Some(n.started_at)),
                "heartbeat_at": rfc3339(Some(n.heartbeat_at)),
            })
        })
        .collect();
    Json(json!({
        "cluster": true,
        "node": c.node(),
        "nats": if c.nats_connected() { "connected" } else { "disconnected" },
        "nodes": nodes,
        "machines_online": gw.fleet.online_machines().len(),
        // How the view of the other nodes' machines was kept: from their
        // presence notes, or corrected by the database re-read (a note
        // lost or late). bench/cluster.sh reports them after a storm.
        "view": {
            "notes_applied": c.view.stats.notes_applied.load(Ordering::Relaxed),
            "resync_online": c.view.stats.resync_online.load(Ordering::Relaxed),
            "resync_offline": c.view.stats.resync_offline.load(Ordering::Relaxed),
        },
    }))
    .into_response()
}

async fn summary(State(state): State<DashState>) -> Response {
    let gw = &state.gw;
    let m = &gw.metrics;
    let provisioned = match gw.fleet.directory().await {
        Ok(l) => l.len() as u64,
        Err(_) => return internal(),
    };
    let p = gw.fleet.counts(|m| gw.orders.queued(m));
    let topics: Vec<Value> = PATTERNS
        .iter()
        .enumerate()
        .map(|(i, pattern)| {
            let (im, ib) = gw.hub.stats.topics.get(Direction::In, i);
            let (om, ob) = gw.hub.stats.topics.get(Direction::Out, i);
            json!({ "pattern": pattern, "in_messages": im, "in_bytes": ib, "out_messages": om, "out_bytes": ob })
        })
        .collect();
    // Arrays, not maps, so the page shows them in this fixed order.
    let outcomes: Vec<Value> = OUTCOMES
        .iter()
        .enumerate()
        .map(|(i, s)| json!({ "outcome": s.as_str(), "total": m.orders.outcome(i) }))
        .collect();
    let requests: Vec<Value> = ErrorCode::ALL
        .iter()
        .map(|c| (c, m.order_requests(*c)))
        .filter(|(_, n)| *n > 0)
        // The variant name reads in any locale (and any font); the
        // published message is Chinese.
        .map(|(c, n)| json!({ "code": c.code(), "name": format!("{c:?}"), "message": c.message(), "total": n }))
        .collect();
    let deliveries: serde_json::Map<String, Value> = DeliveryResult::ALL
        .iter()
        .map(|d| (d.as_str().to_string(), json!(d.count(&gw.notifier.stats))))
        .collect();
    let backlog = match gw.notifier.backlog().await {
        Ok(b) => b,
        Err(_) => return internal(),
    };
    let (ready, readiness) = super::ops::readiness(gw).await;
    let online = p.online.min(provisioned);
    (
        secure_json(),
        Json(json!({
            "now": rfc3339(Some(Utc::now())),
            "version": crate::metrics::VERSION,
            "uptime_seconds": m.uptime().as_secs(),
            "ready": ready,
            "readiness": readiness,
            "machines": {
                "provisioned": provisioned,
                "online": online,
                "offline": provisioned.saturating_sub(online),
                "flapping": p.flapping,
                "flap_threshold": FLAP_THRESHOLD,
            },
            "queue_depth": p.queued_orders,
            "topics": topics,
            "orders": outcomes,
            "order_requests": requests,
            "recent_failed": m.orders.recent(),
            "webhooks": {
                "backlog": backlog.pending,
                "oldest_age_seconds": crate::metrics::oldest_age_seconds(backlog.oldest_pending),
                "deliveries": deliveries,
            },
        })),
    )
        .into_response()
}

fn secure_json() -> [(header::HeaderName, &'static str); 1] {
    [(header::CACHE_CONTROL, "no-store")]
}

/// Which machines the list shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Filter {
    All,
    Online,
    Offline,
    Flapping,
}

/// Parsed `/api/machines` query; bad values fall back to defaults (this is
/// an operator page, not an API with error codes).
#[derive(Debug, PartialEq, Eq)]
struct MachineQuery {
    q: String,
    page: usize,
    page_size: usize,
    filter: Filter,
}

fn machine_query(q: &HashMap<String, String>) -> MachineQuery {
    let text: String = q
        .get("q")
        .map(|s| s.trim().chars().take(16).collect())
        .unwrap_or_default();
    let page = q
        .get("page")
        .and_then(|p| p.parse::<usize>().ok())
        .filter(|p| *p >= 1)
        .unwrap_or(1);
    let page_size = q
        .get("page_size")
        .and_then(|p| p.parse::<usize>().ok())
        .unwrap_or(DEFAULT_PAGE_SIZE)
        .clamp(1, MAX_PAGE_SIZE);
    let filter = match q.get("filter").map(String::as_str) {
        Some("online") => Filter::Online,
        Some("offline") => Filter::Offline,
        Some("flapping") => Filter::Flapping,
        _ => Filter::All,
    };
    MachineQuery {
        q: text,
        page,
        page_size,
        filter,
    }
}

/// One page of the machine list. Matching touches only machine numbers (and
/// the registry for presence filters); full rows are built for the page alone.
async fn machines(
    State(state): State<DashState>,
    Query(raw): Query<HashMap<String, String>>,
) -> Response {
    let gw = &state.gw;
    let q = machine_query(&raw);
    let list = match gw.fleet.directory().await {
        Ok(l) => l,
        Err(_) => return internal(),
    };
    let matches: Vec<_> = list
        .iter()
        .filter(|e| q.q.is_empty() || e.machine_no.as_str().contains(q.q.as_str()))
        .filter(|e| match q.filter {
            Filter::All => true,
            Filter::Online => gw.fleet.machine_online(&e.machine_no),
            Filter::Offline => !gw.fleet.machine_online(&e.machine_no),
            Filter::Flapping => gw
                .fleet
                .local()
                .get(&e.machine_no)
                .is_some_and(|p| p.flaps >= FLAP_THRESHOLD),
        })
        .collect();
    let total = matches.len();
    let rows: Vec<Value> = matches
        .into_iter()
        .skip((q.page - 1).saturating_mul(q.page_size))
        .take(q.page_size)
        .map(|e| machine_row(gw, &e.machine_no, e.last_seen))
        .collect();
    (
        secure_json(),
        Json(json!({
            "total": total,
            "page": q.page,
            "page_size": q.page_size,
            "machines": rows,
        })),
    )
        .into_response()
}

/// A machine's presence as the list and its page show it. This process's
/// registry is the truth; `stored_last_seen` covers machines that have not
/// connected since it started.
fn machine_row(gw: &Parts, m: &MachineNo, stored_last_seen: Option<DateTime<Utc>>) -> Value {
    let p = gw.fleet.machine_presence(m);
    json!({
        "machine_no": m.as_str(),
        "online": p.as_ref().is_some_and(|p| p.online),
        "last_seen": rfc3339(p.as_ref().and_then(|p| p.last_seen).or(stored_last_seen)),
        "online_since": rfc3339(p.as_ref().and_then(|p| p.online_since)),
        "flaps": p.as_ref().map_or(0, |p| p.flaps),
        "firmware": p.as_ref().and_then(|p| p.firmware.clone()),
        "last_rtt_ms": p.as_ref().and_then(|p| p.last_rtt_ms),
        "last_offline_reason": p.as_ref().and_then(|p| p.last_offline_reason).map(|r| r.as_str()),
        "queued_orders": gw.orders.queued(m),
    })
}

/// An order as a machine's page lists it: what was ordered and dispensed,
/// how it ended, and what refund is owed and recorded. `error` is the
/// machine's text, shown by the page as text only.
fn order_row(o: &StoredOrder) -> Value {
    let items: Vec<Value> = o
        .lines
        .iter()
        .map(|l| json!({ "product_id": l.product_id, "quantity": l.quantity, "dispensed": l.dispensed }))
        .collect();
    json!({
        "order_id": o.order_id,
        "status": o.status.as_str(),
        "created_at": rfc3339(Some(o.created_at)),
        // The last status change: for an open order, when it entered its status.
        "since": rfc3339(Some(o.updated_at)),
        "error": o.error,
        "items": items,
        "ordered": o.lines.iter().map(|l| u64::from(l.quantity)).sum::<u64>(),
        "dispensed": o.lines.iter().map(|l| u64::from(l.dispensed)).sum::<u64>(),
        "amount": o.amount,
        "refund_amount": o.refund_amount,
        "refunded_amount": o.refunded_amount,
        "refunded_at": rfc3339(o.refunded_at),
        "refund_status": super::api::refund_status(o),
    })
}

fn machine_not_found() -> Response {
    (
        StatusCode::NOT_FOUND,
        Json(json!({ "error": "machine not found" })),
    )
        .into_response()
}

/// A machine's page: its presence, the orders its dispense command is out
/// for, and its latest orders. The listing is the merchant order search
/// narrowed to the machine (orders on a machine are its owner's).
async fn machine(State(state): State<DashState>, Path(machine_no): Path<String>) -> Response {
    let gw = &state.gw;
    let Ok(m) = machine_no.parse::<MachineNo>() else {
        return machine_not_found();
    };
    let stored = match gw.fleet.machine(&m).await {
        Ok(Some(s)) => s,
        Ok(None) => return machine_not_found(),
        Err(_) => return internal(),
    };
    let pending: Vec<Value> = match gw.store.open_orders(&m).await {
        Ok(open) => open
            .iter()
            .filter(|o| matches!(o.status, Status::Dispatching | Status::Dispensing))
            .map(order_row)
            .collect(),
        Err(_) => return internal(),
    };
    let q = OrderQuery {
        merchant_appid: stored.merchant_appid.clone(),
        machine_no: Some(m),
        limit: RECENT_ORDERS,
        ..OrderQuery::default()
    };
    let (recent, total) = match gw.store.list_orders(&q).await {
        Ok(r) => r,
        Err(_) => return internal(),
    };
    let mut row = machine_row(gw, &m, stored.last_seen);
    if let Some(r) = row.as_object_mut() {
        r.insert("merchant".into(), json!(stored.merchant_appid));
        r.insert("pending".into(), Value::Array(pending));
        r.insert(
            "recent".into(),
            Value::Array(recent.iter().map(order_row).collect()),
        );
        r.insert("orders_total".into(), json!(total));
    }
    (secure_json(), Json(row)).into_response()
}

/// A request the browser marks as coming from another site (or whose
/// `Origin` is not this host). The session cookie is `SameSite=Strict`, but
/// a browser replays remembered Basic credentials on any site's form post.
fn cross_site(headers: &HeaderMap) -> bool {
    let text = |h| headers.get(h).and_then(|v: &HeaderValue| v.to_str().ok());
    if text("sec-fetch-site").is_some_and(|s| s != "same-origin" && s != "none") {
        return true;
    }
    match (text("origin"), text("host")) {
        (None, _) => false,
        (Some(origin), Some(host)) => origin
            .split_once("://")
            .is_none_or(|(_, rest)| !rest.eq_ignore_ascii_case(host)),
        (Some(_), None) => true,
    }
}

/// The page's Ping: `cmd/ping` → `pong` within [`PING_TIMEOUT`] (the round
/// trip also becomes the machine's `last_rtt_ms`). `result` is `ok` (with
/// `rtt_ms`), `offline` (not connected, nothing sent), `no_answer` or `busy`
/// (its connection cannot take a command now).
async fn ping(
    State(state): State<DashState>,
    headers: HeaderMap,
    Path(machine_no): Path<String>,
) -> Response {
    if cross_site(&headers) {
        return (
            StatusCode::FORBIDDEN,
            Json(json!({ "error": "cross-site request refused" })),
        )
            .into_response();
    }
    let gw = &state.gw;
    let Ok(m) = machine_no.parse::<MachineNo>() else {
        return machine_not_found();
    };
    match gw.fleet.machine(&m).await {
        Ok(Some(_)) => {}
        Ok(None) => return machine_not_found(),
        Err(_) => return internal(),
    }
    let (result, rtt) = if !gw.fleet.machine_online(&m) {
        ("offline", None)
    } else {
        match gw.commands.ping(&m, PING_TIMEOUT).await {
            Ok(rtt) => ("ok", Some(crate::fleet::presence::rtt_ms(rtt))),
            Err(DeliveryError::Backpressure) => ("busy", None),
            Err(DeliveryError::Timeout) => ("no_answer", None),
            Err(DeliveryError::NotConnected | DeliveryError::NotSubscribed) => ("offline", None),
        }
    };
    (
        secure_json(),
        Json(json!({ "machine_no": m.as_str(), "result": result, "rtt_ms": rtt })),
    )
        .into_response()
}

/// One order and its timeline, for any merchant (operators see all).
async fn order(State(state): State<DashState>, Path(order_id): Path<String>) -> Response {
    let gw = &state.gw;
    let not_found = || {
        (
            StatusCode::NOT_FOUND,
            Json(json!({ "error": "order not found" })),
        )
            .into_response()
    };
    let Ok(order_id) = order_id.parse::<u64>() else {
        return not_found();
    };
    let o = match gw.store.order(order_id).await {
        Ok(Some(o)) => o,
        Ok(None) => return not_found(),
        Err(_) => return internal(),
    };
    let events = match gw.store.order_events(order_id).await {
        Ok(e) => e,
        Err(_) => return internal(),
    };
    let items: Vec<Value> = o
        .lines
        .iter()
        .map(|l| json!({ "product_id": l.product_id, "quantity": l.quantity, "dispensed": l.dispensed, "unit_price": l.unit_price }))
        .collect();
    let events: Vec<Value> = events
        .iter()
        .map(|e| json!({ "at": rfc3339(Some(e.at)), "type": e.kind, "detail": e.detail }))
        .collect();
    (
        secure_json(),
        Json(json!({
            "order_id": o.order_id,
            "merchant": o.merchant_appid,
            "machine_no": o.machine_no.as_str(),
            "status": o.status.as_str(),
            "out_trade_no": o.out_trade_no,
            "pay_later": o.pay_later,
            "amount": o.amount,
            "refund_amount": o.refund_amount,
            "error": o.error,
            "items": items,
            "created_at": rfc3339(Some(o.created_at)),
            "updated_at": rfc3339(Some(o.updated_at)),
            "events": events,
        })),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn machine_query_defaults_and_bounds() {
        assert_eq!(
            machine_query(&q(&[])),
            MachineQuery {
                q: String::new(),
                page: 1,
                page_size: DEFAULT_PAGE_SIZE,
                filter: Filter::All
            }
        );
        let m = machine_query(&q(&[
            ("q", " 1234 "),
            ("page", "0"),
            ("page_size", "100000"),
            ("filter", "flapping"),
        ]));
        assert_eq!(m.q, "1234");
        assert_eq!(m.page, 1);
        assert_eq!(m.page_size, MAX_PAGE_SIZE);
        assert_eq!(m.filter, Filter::Flapping);
        assert_eq!(machine_query(&q(&[("q", &"9".repeat(100))])).q.len(), 16);
    }

    #[test]
    fn cookies_are_found_among_others() {
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("a=1; vendgate_dashboard=abc; b=2"),
        );
        assert_eq!(session_cookie(&h).as_deref(), Some("abc"));
        assert!(same("x", "x") && !same("x", "y"));
    }

    #[test]
    fn cross_site_posts_are_told_apart() {
        let h = |pairs: &[(&'static str, &'static str)]| {
            let mut h = HeaderMap::new();
            for (k, v) in pairs {
                h.insert(*k, HeaderValue::from_static(v));
            }
            h
        };
        // curl and other non-browser clients send neither header.
        assert!(!cross_site(&h(&[("host", "gw:8080")])));
        assert!(!cross_site(&h(&[
            ("host", "gw:8080"),
            ("origin", "http://gw:8080"),
            ("sec-fetch-site", "same-origin"),
        ])));
        assert!(cross_site(&h(&[
            ("host", "gw:8080"),
            ("origin", "https://evil.example")
        ])));
        assert!(cross_site(&h(&[("host", "gw:8080"), ("origin", "null")])));
        assert!(cross_site(&h(&[
            ("host", "gw:8080"),
            ("sec-fetch-site", "cross-site")
        ])));
        assert!(cross_site(&h(&[
            ("host", "gw:8080"),
            ("sec-fetch-site", "same-site")
        ])));
    }

    #[test]
    fn operator_password_is_redacted() {
        let mut s = crate::config::Settings::default();
        s.operator.username = "ops".into();
        s.operator.password = "correct horse battery".into();
        let shown = s.redacted_toml();
        assert!(!shown.contains("horse"), "{shown}");
        assert!(!format!("{:?}", s.operator).contains("horse"));
    }
}
