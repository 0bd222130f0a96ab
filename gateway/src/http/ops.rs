//! Operator endpoints: `GET /metrics` (Prometheus text format), `GET /healthz`
//! (the process answers), `GET /readyz` (storage writable, MQTT edge
//! accepting, notifier running when there is one), the optional admin
//! listener that serves them apart from the public API, and the middleware
//! that times `POST /orders`.

use std::net::SocketAddr;

use anyhow::Context;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tracing::{error, info};

use super::Parts;

/// The path whose latency and answer codes are measured.
const ORDERS_PATH: &str = "/api/openapi/v1/orders";
/// Largest answer body the order middleware reads back (envelopes are tiny).
const MAX_ANSWER: usize = 64 * 1024;

/// `/healthz` and `/readyz`, plus `/metrics` when `with_metrics`.
pub fn routes<S>(gw: Parts, with_metrics: bool) -> Router<S> {
    let mut r = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz));
    if with_metrics {
        r = r.route("/metrics", get(metrics));
    }
    r.with_state(gw)
}

/// What the operator endpoints ask of the running gateway: the builder
/// (`app`) implements it, as the one part that sees every component.
#[async_trait::async_trait]
pub trait Probe: Send + Sync + 'static {
    /// Whether the gateway is ready, and the checks behind the answer.
    async fn readiness(&self) -> (bool, serde_json::Value);
    /// The Prometheus exposition.
    async fn exposition(&self) -> String;
}

async fn metrics(State(gw): State<Parts>) -> Response {
    let body = gw.probe.exposition().await;
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
pub async fn readiness(gw: &Parts) -> (bool, serde_json::Value) {
    gw.probe.readiness().await
}

async fn readyz(State(gw): State<Parts>) -> Response {
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
pub async fn track_order_requests(State(gw): State<Parts>, req: Request, next: Next) -> Response {
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
    pub async fn bind(settings: &crate::config::Settings) -> anyhow::Result<Option<Self>> {
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
    pub fn spawn(self, gw: Parts) -> JoinHandle<()> {
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
