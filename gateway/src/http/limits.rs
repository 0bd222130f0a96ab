//! Bounds of the HTTP listeners against clients that hold resources without
//! finishing requests: open connections in all and per source address
//! ([`ConnTable`]), and the request deadline ([`request_timeout`]). The
//! header-read deadline and TLS handshake bounds sit where connections are
//! served (`serve`, `tls`). Everything refused or cut is counted in
//! [`HttpStats`] for `/metrics`.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tracing::debug;
use vendgate_proto::codes::ErrorCode;

use super::envelope::Envelope;
use crate::config::HttpStatusMode;

pub use crate::metrics::http::{ConnRejection, HttpStats};

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Counts stay consistent between statements; a panic elsewhere does not
    // make them unusable.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The key per-address limits count under: IPv6 clients usually own a whole
/// /64, so the prefix rather than the address.
pub fn address_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let s = v6.segments();
            IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
        }
        v4 => v4,
    }
}

/// Open connections, in all and per source address.
#[derive(Debug)]
pub struct ConnTable {
    max: usize,
    per_address: usize,
    /// Open connections by address key; an entry goes when its count is 0,
    /// so the map is bounded by the open connections.
    by_address: Mutex<HashMap<IpAddr, usize>>,
    stats: Arc<HttpStats>,
}

/// One admitted connection; dropping it frees its places.
#[derive(Debug)]
pub struct ConnSlot {
    table: Arc<ConnTable>,
    key: IpAddr,
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        self.table.stats.connections.fetch_sub(1, Ordering::Relaxed);
        let mut map = lock(&self.table.by_address);
        if let Some(n) = map.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.key);
            }
        }
    }
}

impl ConnTable {
    /// `max` or `per_address` 0 disables that limit.
    pub fn new(max: usize, per_address: usize, stats: Arc<HttpStats>) -> Arc<Self> {
        Arc::new(Self {
            max,
            per_address,
            by_address: Mutex::new(HashMap::new()),
            stats,
        })
    }

    /// Admit a just-accepted connection from `ip`, or say (and count) why not.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<ConnSlot, ConnRejection> {
        let key = address_key(ip);
        // One lock for both counts, so concurrent admissions cannot both
        // take the last place.
        let mut map = lock(&self.by_address);
        let live = self.stats.connections.load(Ordering::Relaxed);
        let from_here = map.get(&key).copied().unwrap_or(0);
        let refused = if self.max > 0 && live >= self.max {
            Some(ConnRejection::MaxConnections)
        } else if self.per_address > 0 && from_here >= self.per_address {
            Some(ConnRejection::PerAddress)
        } else {
            None
        };
        if let Some(why) = refused {
            self.stats.rejected[why as usize].fetch_add(1, Ordering::Relaxed);
            return Err(why);
        }
        *map.entry(key).or_insert(0) += 1;
        self.stats.connections.fetch_add(1, Ordering::Relaxed);
        drop(map);
        Ok(ConnSlot {
            table: self.clone(),
            key,
        })
    }
}

/// What [`request_timeout`] needs.
#[derive(Debug, Clone)]
pub struct TimeoutState {
    pub timeout: Duration,
    pub mode: HttpStatusMode,
    pub stats: Arc<HttpStats>,
}

/// Prefix of the open API, whose answers are envelopes.
const API_PREFIX: &str = "/api/openapi/v1/";

/// Middleware: a request (reading its body included, which handlers do)
/// must be answered within the timeout. The open API answers 50000 in its
/// envelope (nothing was done that a retry would repeat: an order's wait for
/// its machine is far shorter, see `Settings::validate`); other paths answer
/// a plain 503. Not tower-http's `TimeoutLayer`: it can only answer a bare
/// status, and merchants' clients parse every answer as an envelope.
pub async fn request_timeout(State(t): State<TimeoutState>, req: Request, next: Next) -> Response {
    let api = req.uri().path().starts_with(API_PREFIX);
    let path = req.uri().path().to_owned();
    match tokio::time::timeout(t.timeout, next.run(req)).await {
        Ok(res) => res,
        Err(_) => {
            t.stats.request_timeouts.fetch_add(1, Ordering::Relaxed);
            debug!(%path, "request timed out");
            if api {
                Envelope::err(ErrorCode::Internal, t.mode).into_response()
            } else {
                (StatusCode::SERVICE_UNAVAILABLE, "request timed out").into_response()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_in_all_and_per_address_free_on_close() {
        let stats = Arc::new(HttpStats::default());
        let t = ConnTable::new(3, 2, stats.clone());
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let a1 = t.admit(a).unwrap();
        let _a2 = t.admit(a).unwrap();
        assert_eq!(t.admit(a).unwrap_err(), ConnRejection::PerAddress);
        let _b1 = t.admit(b).unwrap();
        assert_eq!(
            t.admit("192.0.2.3".parse().unwrap()).unwrap_err(),
            ConnRejection::MaxConnections
        );
        drop(a1);
        let _a3 = t.admit(a).expect("a closed connection frees its places");
        assert_eq!(stats.connections.load(Ordering::Relaxed), 3);
        assert_eq!(stats.rejected[0].load(Ordering::Relaxed), 1);
        assert_eq!(stats.rejected[1].load(Ordering::Relaxed), 1);
    }

    #[test]
    fn ipv6_counts_per_64_and_the_map_empties() {
        let stats = Arc::new(HttpStats::default());
        let t = ConnTable::new(0, 1, stats);
        let s = t.admit("2001:db8:1:2::1".parse().unwrap()).unwrap();
        assert_eq!(
            t.admit("2001:db8:1:2::ffff".parse().unwrap()).unwrap_err(),
            ConnRejection::PerAddress
        );
        assert!(t.admit("2001:db8:1:3::1".parse().unwrap()).is_ok());
        drop(s);
        assert!(lock(&t.by_address).is_empty());
    }
}
