//! Counters of the HTTP listeners: connections, refusals, deadlines, TLS
//! handshakes and dashboard sign-ins. The listeners (`http::serve`,
//! `http::limits`) count into them; the exposition reads them.

use std::sync::atomic::{AtomicU64, AtomicUsize};

/// Why a new connection was closed at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnRejection {
    MaxConnections,
    PerAddress,
}

impl ConnRejection {
    pub const ALL: [Self; 2] = [Self::MaxConnections, Self::PerAddress];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::MaxConnections => "max_connections",
            Self::PerAddress => "max_connections_per_address",
        }
    }
}

/// Counters of the HTTP listeners (the API listener and the admin one).
#[derive(Debug, Default)]
pub struct HttpStats {
    /// Open connections now, handshakes included.
    pub connections: AtomicUsize,
    /// New connections closed at once, by [`ConnRejection`].
    pub rejected: [AtomicU64; 2],
    /// Connections closed because a request's headers did not arrive in
    /// time (slow or idle clients).
    pub header_timeouts: AtomicU64,
    /// Requests answered because the handler ran past `request_timeout`.
    pub request_timeouts: AtomicU64,
    /// TLS handshakes not done within `tls_handshake_timeout` (waiting for a
    /// handshake slot included).
    pub tls_handshake_timeouts: AtomicU64,
    /// TLS handshakes that failed.
    pub tls_handshake_failures: AtomicU64,
    /// Dashboard sign-ins with a wrong credential.
    pub login_failures: AtomicU64,
    /// Dashboard sign-ins refused by the throttle, by `ThrottleScope`.
    pub login_throttled: [AtomicU64; 2],
}
