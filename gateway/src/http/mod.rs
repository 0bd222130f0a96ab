//! The HTTP listener: the merchant open API under `/api/openapi/v1` (API.md)
//! and health endpoints. Every answer, including malformed JSON, oversized
//! bodies and unknown routes, is one envelope, except the OpenAPI document
//! itself (`GET /api/openapi/v1/openapi.json`, no credentials), which is
//! served as it is.
//!
//! - `envelope`: the response envelope and `data` pruning.
//! - `api`: the open API handlers and request validation.
//! - `events`: the merchant's webhook events (list, replay).
//! - `merchant`: the merchant's own settings (`notify_url`).
//! - `openapi`: the OpenAPI document of the open API, and the route list it
//!   shares with the router.
//! - `ops`: `/metrics`, `/healthz`, `/readyz`, the admin listener.
//! - `dashboard`: the operator dashboard and its JSON endpoints.
//! - `serve`: the accept loop and connections of the HTTP listeners.
//! - `limits`: connection caps and the request deadline.
//! - `tls`: the bounded TLS handshake of the HTTPS listener (`[http.tls]`).

mod api;
pub mod dashboard;
pub mod envelope;
mod events;
pub mod limits;
mod merchant;
mod openapi;
pub mod ops;
mod rate;
pub mod serve;
pub mod tls;

use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::Router;

use tokio_util::sync::CancellationToken;

use crate::cluster::Cluster;
use crate::config::Settings;
use crate::edge::Hub;
use crate::fleet::Fleet;
use crate::front::Front;
use crate::link::commands::CommandBus;
use crate::metrics::Metrics;
use crate::notifier::Notifier;
use crate::orders::OrderService;
use crate::storage::Storage;

/// The parts of the gateway the handlers serve from, handed over by the
/// builder (`app`), which is the one place that knows every part.
#[derive(Clone)]
pub struct Parts {
    pub settings: Arc<Settings>,
    /// Places and pays orders wherever their machine is connected.
    pub front: Arc<Front>,
    /// Reads, cancels and refunds of stored orders; stock figures.
    pub orders: Arc<OrderService>,
    pub fleet: Arc<Fleet>,
    /// Pings, wherever the machine is connected.
    pub commands: Arc<dyn CommandBus>,
    /// Reads: merchants, stored orders, webhook attempts, cluster nodes.
    pub store: Arc<dyn Storage>,
    /// The edge's counters, for the dashboard.
    pub hub: Arc<Hub>,
    pub notifier: Arc<Notifier>,
    pub metrics: Arc<Metrics>,
    /// Readiness and the exposition, computed by the builder.
    pub probe: Arc<dyn ops::Probe>,
    /// Cluster mode: stock figures and membership of the other nodes.
    pub cluster: Option<Arc<Cluster>>,
    pub shutdown: CancellationToken,
}

/// Shared state of the handlers.
#[derive(Clone)]
pub struct AppState {
    pub gw: Parts,
    pub orders: Arc<OrderService>,
    pub rate: Arc<rate::RateLimiter>,
}

/// Every route of the open API, each with its document.
fn open_api_routes() -> openapi::ApiRoutes {
    events::routes(merchant::routes(api::routes(openapi::ApiRoutes::new())))
}

pub fn router(gw: Parts) -> Router {
    let orders = gw.orders.clone();
    let rate = Arc::new(rate::RateLimiter::new(
        gw.settings.http.rate_limit,
        gw.settings.http.rate_burst,
    ));
    let metrics_here = gw.settings.metrics.addr.is_none();
    let state = AppState { gw, orders, rate };
    Router::new()
        .merge(ops::routes(state.gw.clone(), metrics_here))
        .merge(dashboard::routes(state.gw.clone()))
        .nest(
            "/api/openapi/v1",
            open_api_routes()
                .finish()
                .layer(DefaultBodyLimit::max(state.gw.settings.http.max_body))
                // Last: it applies to the routes added before it.
                .method_not_allowed_fallback(api::method_not_allowed),
        )
        .fallback(api::not_found)
        .layer(axum::middleware::from_fn_with_state(
            state.gw.clone(),
            ops::track_order_requests,
        ))
        // Outermost, so the deadline covers the order middleware too.
        .layer(axum::middleware::from_fn_with_state(
            limits::TimeoutState {
                timeout: state.gw.settings.http.request_timeout,
                mode: state.gw.settings.http.http_status,
                stats: state.gw.metrics.http.clone(),
            },
            limits::request_timeout,
        ))
        .with_state(state)
}
