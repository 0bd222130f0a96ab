//! The accept loop and connection handling of the HTTP listeners (the API
//! listener, plain or HTTPS, and the admin listener). Not `axum::serve`: it
//! has no header-read deadline and no connection cap, so half-sent requests
//! could hold descriptors (shared with the MQTT edge and SQLite) without end.
//!
//! For each accepted connection, in order:
//! 1. the connection caps ([`ConnTable`]): over them it is closed at once;
//! 2. on HTTPS, the handshake on the connection's own task, bounded in time
//!    and number ([`Handshakes`]), so the accept loop never waits on a peer;
//! 3. HTTP/1.1 by hyper with a header-read deadline that also limits how
//!    long an idle keep-alive connection stays open; the request deadline
//!    is the router's middleware (`limits::request_timeout`).
//!
//! Every request carries `ConnectInfo<SocketAddr>` (the peer) for handlers
//! that throttle by address.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::Router;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;
use tracing::{debug, warn};

use super::limits::{ConnSlot, ConnTable, HttpStats};
use super::tls::Handshakes;
use crate::config::HttpSettings;

/// How long requests in flight at shutdown may take to finish; below the
/// shutdown step start-up allows the HTTP task.
const DRAIN: Duration = Duration::from_secs(8);
/// Pause after a failed accept (EMFILE and friends) instead of spinning.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);

/// What every connection of one listener shares.
#[derive(Clone)]
struct Shared {
    app: Router,
    tls: Option<Handshakes>,
    header_read_timeout: Duration,
    stats: Arc<HttpStats>,
    shutdown: CancellationToken,
}

/// Serve `app` on `listener` until `shutdown` fires, then let requests in
/// flight finish (bounded) and return. `tls`: HTTPS only.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    settings: &HttpSettings,
    tls: Option<Arc<rustls::ServerConfig>>,
    stats: Arc<HttpStats>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let table = ConnTable::new(
        settings.max_connections,
        settings.max_connections_per_address,
        stats.clone(),
    );
    let shared = Shared {
        app,
        tls: tls.map(|c| {
            Handshakes::new(
                c,
                settings.max_tls_handshakes,
                settings.tls_handshake_timeout,
                stats.clone(),
            )
        }),
        header_read_timeout: settings.header_read_timeout,
        stats,
        shutdown: shutdown.clone(),
    };
    let tracker = TaskTracker::new();
    loop {
        let (tcp, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok(a) => a,
                Err(e) => {
                    warn!(error = %e, "HTTP accept failed");
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(ACCEPT_ERROR_PAUSE) => continue,
                    }
                }
            },
        };
        let slot = match table.admit(peer.ip()) {
            Ok(s) => s,
            Err(why) => {
                // Dropping the socket closes it; counted by the table.
                debug!(%peer, reason = why.as_str(), "HTTP connection refused");
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        tracker.spawn(connection(tcp, peer, slot, shared.clone()));
    }
    drop(listener);
    tracker.close();
    tracker.wait().await;
    Ok(())
}

async fn connection(tcp: tokio::net::TcpStream, peer: SocketAddr, slot: ConnSlot, s: Shared) {
    let _slot = slot;
    match &s.tls {
        None => http(TokioIo::new(tcp), peer, &s).await,
        Some(h) => {
            let stream = tokio::select! {
                _ = s.shutdown.cancelled() => return,
                st = h.accept(tcp, peer) => match st {
                    Some(st) => st,
                    None => return,
                },
            };
            http(TokioIo::new(stream), peer, &s).await
        }
    }
}

/// HTTP/1.1 on one connection until it closes, or shutdown (then requests
/// in flight get [`DRAIN`] to finish).
async fn http<I>(io: I, peer: SocketAddr, s: &Shared)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let app = s.app.clone();
    let service = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
        let app = app.clone();
        async move {
            let mut req = req.map(axum::body::Body::new);
            req.extensions_mut().insert(ConnectInfo(peer));
            app.oneshot(req).await
        }
    });
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(s.header_read_timeout);
    let conn = builder.serve_connection(io, service);
    tokio::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        _ = s.shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            match tokio::time::timeout(DRAIN, conn.as_mut()).await {
                Ok(r) => r,
                Err(_) => return,
            }
        }
    };
    if let Err(e) = result {
        if e.is_timeout() {
            s.stats.header_timeouts.fetch_add(1, Ordering::Relaxed);
            debug!(%peer, "HTTP request headers not received in time");
        } else {
            debug!(%peer, error = %e, "HTTP connection ended with an error");
        }
    }
}
