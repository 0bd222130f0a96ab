//! The presence persister: copies this node's presence changes to storage,
//! with their `machine.online` / `machine.offline` webhook events, so the
//! CLI, the other nodes and the next start see who is online.

use std::sync::Arc;

use tokio::sync::broadcast::error::{RecvError, TryRecvError};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::domain::webhook::machine_event;
use crate::fleet::presence::PresenceRegistry;
use crate::notifier::Notifier;
use crate::storage::{PresenceChange, PresenceWrite, Storage};

/// Writes presence changes to storage so other processes (the CLI, later other
/// nodes) see who is online, with their `machine.online` / `machine.offline`
/// webhook events in the same transaction (storage keeps only those that
/// flip the stored flag, for merchants with a notify_url). Whatever has
/// queued up is written in one transaction, so a reconnect storm costs a few
/// commits. Storage lags the registry by one batch; the registry stays the
/// source of truth for this process.
pub fn spawn_persister(
    presence: Arc<PresenceRegistry>,
    store: Arc<dyn Storage>,
    notifier: Arc<Notifier>,
    stop: CancellationToken,
) -> JoinHandle<()> {
    /// Most changes written in one transaction.
    const BATCH: usize = 1024;
    let mut rx = presence.subscribe();
    tokio::spawn(async move {
        loop {
            let first = tokio::select! {
                biased;
                ev = rx.recv() => ev,
                _ = stop.cancelled() => match rx.try_recv() {
                    // Drain what is already queued, then stop.
                    Ok(ev) => Ok(ev),
                    Err(_) => return,
                },
            };
            let mut batch = Vec::new();
            let mut lagged = false;
            let mut next = Some(first);
            while let Some(ev) = next.take() {
                match ev {
                    Ok(ev) => batch.push(PresenceChange {
                        write: PresenceWrite {
                            machine_no: ev.machine_no,
                            online: ev.online,
                            epoch: ev.epoch,
                            at: ev.at,
                        },
                        event: Some(machine_event(
                            ev.machine_no,
                            ev.online,
                            ev.reason.map(|r| r.as_str()),
                            ev.at,
                            chrono::Utc::now(),
                        )),
                    }),
                    Err(RecvError::Lagged(n)) => {
                        warn!(missed = n, "presence writer lagged; resynchronising");
                        lagged = true;
                    }
                    Err(RecvError::Closed) => return,
                }
                if batch.len() < BATCH {
                    next = match rx.try_recv() {
                        Ok(ev) => Some(Ok(ev)),
                        Err(TryRecvError::Lagged(n)) => Some(Err(RecvError::Lagged(n))),
                        Err(_) => None,
                    };
                }
            }
            if lagged {
                // Changes were missed: write the current state; storage
                // still emits an event wherever its stored flag flips.
                batch = presence
                    .snapshot()
                    .into_iter()
                    .map(|p| {
                        let at = p.last_seen.unwrap_or_else(chrono::Utc::now);
                        let reason = (!p.online)
                            .then_some(p.last_offline_reason)
                            .flatten()
                            .map(|r| r.as_str());
                        PresenceChange {
                            write: PresenceWrite {
                                machine_no: p.machine_no,
                                online: p.online,
                                epoch: p.epoch,
                                at,
                            },
                            event: Some(machine_event(
                                p.machine_no,
                                p.online,
                                reason,
                                at,
                                chrono::Utc::now(),
                            )),
                        }
                    })
                    .collect();
            }
            for chunk in batch.chunks(BATCH) {
                match store.record_presence_batch_with_events(chunk).await {
                    Ok(()) => notifier.wake(),
                    Err(e) => warn!(error = %e, changes = chunk.len(), "presence write failed"),
                }
            }
        }
    })
}
