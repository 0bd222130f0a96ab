//! HTTPS for the HTTP listener: the TLS handshake of one accepted
//! connection, bounded in time and in how many run at once.
//!
//! The handshake slot is taken *after* the TCP accept, on the connection's
//! own task, and the wait for it counts against the same deadline as the
//! handshake: a peer that connects and says nothing holds one slot for at
//! most `http.tls_handshake_timeout`, never the accept loop, and (with the
//! per-address connection cap in front) one address cannot hold them all.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tracing::debug;

use super::limits::HttpStats;

/// The TLS side of one HTTPS listener.
#[derive(Clone)]
pub struct Handshakes {
    acceptor: TlsAcceptor,
    slots: Arc<Semaphore>,
    timeout: std::time::Duration,
    stats: Arc<HttpStats>,
}

impl Handshakes {
    pub fn new(
        config: Arc<rustls::ServerConfig>,
        max: usize,
        timeout: std::time::Duration,
        stats: Arc<HttpStats>,
    ) -> Self {
        Self {
            acceptor: TlsAcceptor::from(config),
            slots: Arc::new(Semaphore::new(max.max(1))),
            timeout,
            stats,
        }
    }

    /// Run the handshake of `tcp`; None (counted) when it fails or does not
    /// finish, slot wait included, within the timeout.
    pub async fn accept(&self, tcp: TcpStream, peer: SocketAddr) -> Option<TlsStream<TcpStream>> {
        let deadline = Instant::now() + self.timeout;
        let done = tokio::time::timeout_at(deadline, async {
            let _slot = self.slots.acquire().await.ok()?;
            Some(self.acceptor.accept(tcp).await)
        })
        .await;
        match done {
            Ok(Some(Ok(s))) => Some(s),
            Ok(Some(Err(e))) => {
                debug!(%peer, error = %e, "HTTPS handshake failed");
                self.stats
                    .tls_handshake_failures
                    .fetch_add(1, Ordering::Relaxed);
                None
            }
            // The semaphore is never closed; None cannot happen.
            Ok(None) => None,
            Err(_) => {
                debug!(%peer, "HTTPS handshake timed out");
                self.stats
                    .tls_handshake_timeouts
                    .fetch_add(1, Ordering::Relaxed);
                None
            }
        }
    }
}
