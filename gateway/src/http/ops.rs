//! Operator endpoints: `GET /metrics` (Prometheus text format), `GET /healthz`
//! (the process answers), `GET /readyz` (storage writable, MQTT edge
//! accepting, notifier running when there is one), the optional admin
//! listener that serves them apart from the public API, and the middleware
//! that times `POST /orders`.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Context;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tracing::{error, info};

use crate::metrics::webhooks::NotifierState;
use crate::startup::GatewayHandle;

/// Longest a readiness probe waits for storage.
const STORAGE_PROBE: Duration = Duration::from_secs(2);
/// The path whose latency and answer codes are measured.
const ORDERS_PATH: &str = "/api/openapi/v1/orders";
/// Largest answer body the order middleware reads back (envelopes are tiny).
const MAX_ANSWER: usize = 64 * 1024;

/// `/healthz` and `/readyz`, plus `/metrics` when `with_metrics`.
pub fn routes<S>(gw: GatewayHandle, with_metrics: bool) -> Router<S> {
    let mut r = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz));
    if with_metrics {
        r = r.route("/metrics", get(metrics));
    }
    r.with_state(gw)
}

async fn metrics(State(gw): State<GatewayHandle>) -> Response {
    let body = gw.metrics.render(&gw).await;
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    )
        .into_response()
}

/// The readiness checks, for `/readyz` and the dashboard.
pub async fn readiness(gw: &GatewayHandle) -> (bool, serde_json::Value) {
    let storage = match tokio::time::timeout(STORAGE_PROBE, gw.store.ping()).await {
        Ok(Ok(())) => "ok",
        Ok(Err(e)) => {
            error!(error = %e, "readiness: storage not writable");
            "failing"
        }
        Err(_) => "timeout",
    };
    let accepting = gw.hub.stats.accepting.load(Ordering::Relaxed) && !gw.shutdown.is_cancelled();
    let mqtt = if accepting { "ok" } else { "not_accepting" };
    let notifier = match gw.metrics.webhooks.state() {
        NotifierState::Absent => "absent",
        NotifierState::Running => "running",
        NotifierState::Stopped => "stopped",
    };
    // Cluster mode: without NATS this node cannot reach machines held
    // elsewhere nor be reached for its own.
    let nats = gw.cluster.as_ref().map(|c| c.nats_connected());
    let ready = storage == "ok" && accepting && notifier != "stopped" && nats != Some(false);
    let mut checks = json!({ "storage": storage, "mqtt": mqtt, "notifier": notifier });
    if let Some(up) = nats {
        checks["nats"] = json!(if up { "ok" } else { "disconnected" });
    }
    (
        ready,
        json!({
            "status": if ready { "ready" } else { "not_ready" },
            "checks": checks,
        }),
    )
}

async fn readyz(State(gw): State<GatewayHandle>) -> Response {
    let (ready, body) = readiness(&gw).await;
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body)).into_response()
}

/// Middleware: time `POST /orders` and count its answers by API code. The
/// envelope's code is read back from the (small) body because every answer
/// is HTTP 200 in the default mode.
pub async fn track_order_requests(
    State(gw): State<GatewayHandle>,
    req: Request,
    next: Next,
) -> Response {
    if req.method() != Method::POST || req.uri().path() != ORDERS_PATH {
        return next.run(req).await;
    }
    let started = tokio::time::Instant::now();
    let res = next.run(req).await;
    let (parts, body) = res.into_parts();
    let (code, body) = match axum::body::to_bytes(body, MAX_ANSWER).await {
        Ok(bytes) => {
            let code = serde_json::from_slice::<serde_json::Value>(&bytes)
                .ok()
                .and_then(|v| v.get("code").and_then(|c| c.as_i64()))
                .and_then(|c| i32::try_from(c).ok());
            (code, Body::from(bytes))
        }
        Err(_) => (None, Body::empty()),
    };
    gw.metrics.order_request(code, started.elapsed());
    Response::from_parts(parts, body)
}

/// The separate admin listener of `[metrics] addr`, when configured.
pub struct AdminListener {
    listener: TcpListener,
    addr: SocketAddr,
}

impl AdminListener {
    /// Bind `[metrics] addr`; None when unset (metrics go on the HTTP listener).
    pub async fn bind(settings: &crate::Settings) -> anyhow::Result<Option<Self>> {
        let Some(addr) = settings.metrics.addr else {
            return Ok(None);
        };
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding the metrics listener on {addr}"))?;
        let addr = listener.local_addr()?;
        Ok(Some(Self { listener, addr }))
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serve `/metrics`, `/healthz` and `/readyz` until shutdown.
    pub fn spawn(self, gw: GatewayHandle) -> JoinHandle<()> {
        let shutdown = gw.shutdown.clone();
        let settings = gw.settings.clone();
        let stats = gw.metrics.http.clone();
        let app: Router = routes(gw, true);
        info!(addr = %self.addr, "metrics listener running");
        // The same connection bounds as the API listener.
        tokio::spawn(async move {
            let served =
                super::serve::serve(self.listener, app, &settings.http, None, stats, shutdown);
            if let Err(e) = served.await {
                error!(error = %e, "metrics listener failed");
            }
        })
    }
}
