//! Deadlines and what settles orders nobody is waiting on: dispense
//! deadlines (watched by the worker, or re-armed at start-up), the sweep
//! that expires unpaid orders, turns overdue dispenses `unknown` and gives
//! up dispatches a stopped node left, and recovery at start-up.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use serde_json::json;
use tracing::{info, warn};

use super::{OrderError, OrderService};
use crate::domain::order::{Event, GiveUp, Status};
use crate::storage::{Due, StorageError};

/// A `dispatching` order older than the accept timeout plus this was left
/// by a node that stopped: a live node settles it by its request's deadline
/// (forwarded requests wait `owner_answer_slack` longer, well below this).
const STALE_DISPATCH_SLACK: Duration = Duration::from_secs(15);

impl OrderService {
    pub(super) async fn deadline_passed(&self, order_id: u64) {
        let Ok(o) = self.load(order_id).await else {
            return;
        };
        if o.status != Status::Dispensing {
            return;
        }
        // Ok(None)/Err: a result (or another deadline) got there first.
        if let Ok(Some(_)) = self
            .transition(&o, &Event::DispenseDeadline, json!({}))
            .await
        {
            self.stats.unknown.fetch_add(1, Ordering::Relaxed);
            warn!(machine_no = %o.machine_no, order_id, "no result before the dispense deadline: unknown");
            self.inventory.release(o.machine_no, &o.lines);
        }
    }

    /// For orders restored at start-up: wait out the stored deadline.
    async fn watch_deadline(self: Arc<Self>, order_id: u64) {
        let Ok(o) = self.load(order_id).await else {
            return;
        };
        let left = o
            .dispense_deadline
            .and_then(|d| (d - Utc::now()).to_std().ok())
            .unwrap_or(Duration::ZERO);
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.settled.insert(order_id, tx);
        let got = tokio::select! {
            r = tokio::time::timeout(left, rx) => r.is_ok(),
            _ = self.shutdown.cancelled() => return,
        };
        self.settled.remove(&order_id);
        if !got {
            self.deadline_passed(order_id).await;
        }
    }

    /// Start-up: load stock snapshots, re-hold reservations of open orders,
    /// give up on orders that were dispatching when the process stopped
    /// (their merchant never got an answer, and no `go` left for them),
    /// and re-arm dispense deadlines.
    pub async fn recover(&self) -> Result<(), StorageError> {
        if self.other_nodes.is_some() {
            // Cluster mode: other nodes are running. Stock is rebuilt per
            // machine as it connects here ([`Self::rebuild_reservations`]); orders a dead
            // node left behind are settled by the sweeps.
            return Ok(());
        }
        for (m, items) in self.store.inventories().await? {
            self.inventory.set_snapshot(m, &items);
        }
        let open = self
            .store
            .orders_in_status(&[
                Status::AwaitingPayment,
                Status::Dispatching,
                Status::Dispensing,
            ])
            .await?;
        for o in open {
            match o.status {
                Status::AwaitingPayment => self.inventory.restore(o.machine_no, &o.lines),
                Status::Dispatching => {
                    // The command may have left: the change records a cancel
                    // owed, delivered when the machine is back.
                    let _ = self
                        .transition(&o, &Event::NotAccepted(GiveUp::GatewayRestart), json!({}))
                        .await;
                }
                Status::Dispensing => {
                    self.inventory.restore(o.machine_no, &o.lines);
                    if let Some(me) = self.me.upgrade() {
                        tokio::spawn(async move { me.watch_deadline(o.order_id).await });
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// One sweep over due orders, claimed with a lease so that sweeps on
    /// several nodes share the work (the status compare-and-set is the final
    /// guard): unpaid orders past their deadline expire and release their
    /// stock; dispensing orders past their deadline become `unknown`;
    /// dispatching orders nobody settled (their node died between sending
    /// the command and recording the answer, or storage failed when it
    /// tried) are given up with a cancel owed. Returns how many changed.
    pub async fn sweep_due(&self) -> Result<usize, OrderError> {
        const BATCH: usize = 256;
        let now = Utc::now();
        let lease_until = now + chrono::Duration::seconds(30);
        let slack = self.settings.accept_timeout + STALE_DISPATCH_SLACK;
        let stale_before = now - chrono::Duration::from_std(slack).unwrap_or(chrono::Duration::MAX);
        let mut changed = 0;
        for due in [
            Due::Unpaid,
            Due::DispenseDeadline,
            Due::StaleDispatch {
                updated_before: stale_before,
            },
        ] {
            let claimed = self
                .store
                .claim_due_orders(due, now, lease_until, BATCH)
                .await?;
            for o in claimed {
                let ev = match due {
                    Due::Unpaid => Event::PaymentExpired,
                    Due::DispenseDeadline => Event::DispenseDeadline,
                    Due::StaleDispatch { .. } => Event::NotAccepted(GiveUp::DispatchLost),
                };
                // A payment or a result racing this loses or wins on the CAS.
                if let Ok(Some(_)) = self.transition(&o, &ev, json!({ "by": "sweep" })).await {
                    changed += 1;
                    match due {
                        Due::Unpaid => {
                            info!(machine_no = %o.machine_no, order_id = o.order_id, "unpaid order expired; stock released")
                        }
                        Due::DispenseDeadline => {
                            self.stats.unknown.fetch_add(1, Ordering::Relaxed);
                            warn!(machine_no = %o.machine_no, order_id = o.order_id, "no result before the dispense deadline: unknown");
                        }
                        Due::StaleDispatch { .. } => {
                            warn!(machine_no = %o.machine_no, order_id = o.order_id, "dispatching order left unsettled given up; cancel owed")
                        }
                    }
                    self.release(o.machine_no, &o.lines);
                }
            }
        }
        Ok(changed)
    }

    /// Runs [`Self::sweep_due`] until shutdown: unpaid expiries, dispense
    /// deadlines of orders no worker watches, and lost dispatches.
    pub fn spawn_deadline_sweeps(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let me = self.clone();
        let period = (self.settings.unpaid_timeout / 4)
            .clamp(Duration::from_millis(50), Duration::from_secs(1));
        tokio::spawn(async move {
            loop {
                if let Err(e) = me.sweep_due().await {
                    warn!(error = %e, "order sweep failed");
                }
                tokio::select! {
                    _ = me.shutdown.cancelled() => return,
                    _ = tokio::time::sleep(period) => {}
                }
            }
        })
    }
}
