//! The HTTP listener: the merchant open API under `/api/openapi/v1` (API.md)
//! and health endpoints. Every answer, including malformed JSON, oversized
//! bodies and unknown routes, is one envelope.
//!
//! - `envelope`: the response envelope and `data` pruning.
//! - `api`: the open API handlers and request validation.

mod api;
pub mod envelope;
mod rate;

use std::sync::Arc;

use axum::routing::get;
use axum::Router;

use crate::orders::OrderService;
use crate::startup::GatewayHandle;

/// Shared state of the handlers.
#[derive(Clone)]
pub struct AppState {
    pub gw: GatewayHandle,
    pub orders: Arc<OrderService>,
    pub rate: Arc<rate::RateLimiter>,
}

pub fn router(gw: GatewayHandle, orders: Arc<OrderService>) -> Router {
    let rate = Arc::new(rate::RateLimiter::new(
        gw.settings.http.rate_limit,
        gw.settings.http.rate_burst,
    ));
    let state = AppState { gw, orders, rate };
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .nest("/api/openapi/v1", api::routes(&state))
        .fallback(api::not_found)
        .with_state(state)
}
