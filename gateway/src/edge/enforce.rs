//! Closes live connections whose account the CLI disabled or removed.
//!
//! The CLI runs in another process and changes only the database, so the
//! gateway cannot be told; it checks instead. Every [`ENFORCE_INTERVAL`] it
//! reads the machines that must not be connected (disabled or removed: a
//! partial index, so the read stays small) and the service accounts with a
//! live session that no longer exist, and closes those connections. A
//! connection therefore outlives the change by at most one interval plus
//! that read. New CONNECTs are refused at once: authentication reads
//! storage on every CONNECT, without a cache.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::router::KickReason;
use super::Hub;
use crate::storage::{Storage, StorageError};

/// How often live connections are checked against storage: the bound on
/// how long a disabled or removed account stays connected.
pub const ENFORCE_INTERVAL: Duration = Duration::from_secs(2);

/// One check; returns how many connections it closed.
pub async fn check(
    hub: &Hub,
    store: &dyn Storage,
    config_services: &HashSet<String>,
) -> Result<usize, StorageError> {
    let mut closed = 0;
    for m in store.blocked_machines().await? {
        if hub.router.kick_machine(&m, KickReason::Revoked) {
            info!(machine_no = %m, "closed the connection of a disabled or removed machine");
            closed += 1;
        }
    }
    for account in hub.router.service_accounts() {
        // Accounts from the config file are not the CLI's to remove.
        if config_services.contains(&account) {
            continue;
        }
        if store.service(&account).await?.is_none() {
            let n = hub
                .router
                .kick_service_account(&account, KickReason::Revoked);
            info!(username = %account, connections = n, "closed the connections of a removed service account");
            closed += n;
        }
    }
    Ok(closed)
}

/// Check every [`ENFORCE_INTERVAL`] until `shutdown`.
pub async fn run(
    hub: Arc<Hub>,
    store: Arc<dyn Storage>,
    config_services: HashSet<String>,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(ENFORCE_INTERVAL) => {}
        }
        if let Err(e) = check(&hub, store.as_ref(), &config_services).await {
            // Tried again next interval; CONNECTs are refused meanwhile.
            warn!(error = %e, "checking live connections against storage failed");
        }
    }
}
