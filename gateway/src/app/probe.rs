//! Readiness and the metrics exposition: the figures that need every part of
//! the gateway, gathered here so neither the HTTP layer nor the metrics
//! module has to know the parts.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tracing::error;

use super::GatewayHandle;
use super::Supervisor;
use crate::metrics::webhooks::NotifierState;
use crate::metrics::{ClusterCounts, ClusterFigures, Snapshot, ORDER_EVENTS};

/// Longest a readiness probe waits for storage.
const STORAGE_PROBE: Duration = Duration::from_secs(2);

/// The running gateway as the operator endpoints see it.
pub(super) struct GatewayProbe {
    pub(super) gw: GatewayHandle,
    pub(super) supervisor: Arc<Supervisor>,
}

#[async_trait::async_trait]
impl crate::http::ops::Probe for GatewayProbe {
    async fn readiness(&self) -> (bool, serde_json::Value) {
        let gw = &self.gw;
        let storage = match tokio::time::timeout(STORAGE_PROBE, gw.store.ping()).await {
            Ok(Ok(())) => "ok",
            Ok(Err(e)) => {
                error!(error = %e, "readiness: storage not writable");
                "failing"
            }
            Err(_) => "timeout",
        };
        let accepting =
            gw.hub.stats.accepting.load(Ordering::Relaxed) && !gw.shutdown.is_cancelled();
        let mqtt = if accepting { "ok" } else { "not_accepting" };
        let notifier = match gw.metrics.webhooks.state() {
            NotifierState::Absent => "absent",
            NotifierState::Running => "running",
            NotifierState::Stopped => "stopped",
        };
        // Cluster mode: without NATS this node cannot reach machines held
        // elsewhere nor be reached for its own.
        let nats = gw.cluster.as_ref().map(|c| c.nats_connected());
        // A long-lived task that ended before shutdown: the gateway is not
        // doing all of its job.
        let ended = self.supervisor.ended();
        let ready = storage == "ok"
            && accepting
            && notifier != "stopped"
            && nats != Some(false)
            && ended.is_empty();
        let mut checks = json!({ "storage": storage, "mqtt": mqtt, "notifier": notifier });
        if let Some(up) = nats {
            checks["nats"] = json!(if up { "ok" } else { "disconnected" });
        }
        if !ended.is_empty() {
            checks["tasks"] = json!({ "ended": ended });
        }
        (
            ready,
            json!({
                "status": if ready { "ready" } else { "not_ready" },
                "checks": checks,
            }),
        )
    }

    async fn exposition(&self) -> String {
        let gw = &self.gw;
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let o = &gw.orders.stats;
        let order_events: [u64; ORDER_EVENTS.len()] = [
            l(&o.placed),
            l(&o.accepted),
            l(&o.refused),
            l(&o.not_accepted),
            l(&o.busy),
            l(&o.unknown),
            l(&o.results_applied),
            l(&o.duplicate_device_messages),
            l(&o.rejected_device_messages),
            l(&o.malformed_device_messages),
            l(&o.go_sent),
            l(&o.go_withheld),
            l(&o.caller_gone),
            l(&o.dispensed_after_rejection),
            l(&o.uplinks_overloaded),
        ];
        let cluster = gw.cluster.as_ref().map(|c| {
            let st = &c.stats;
            ClusterFigures {
                node: c.node().to_string(),
                counts: ClusterCounts {
                    forwarded: l(&st.forwarded),
                    forward_lost: l(&st.forward_lost),
                    no_responder_retries: l(&st.no_responder_retries),
                    served: l(&st.served),
                    takeovers_closed: l(&st.takeovers_closed),
                    fenced: l(&st.fenced),
                    machines_reaped: l(&st.machines_reaped),
                    uplinks_out: l(&st.uplinks_out),
                    uplinks_in: l(&st.uplinks_in),
                    uplinks_dropped: l(&st.uplinks_dropped),
                },
                members: c.node_machines(),
            }
        });
        let snap = Snapshot {
            edge: &gw.hub.stats,
            router: &gw.hub.router.stats,
            sessions: gw.hub.router.session_count() as u64,
            parked_sessions: gw.hub.router.parked_count() as u64,
            connections: gw.hub.gate.live() as u64,
            log_lines_suppressed: l(&gw.hub.log_gate.suppressed),
            malformed_payloads: l(&gw.uplinks.stats.malformed) + l(&o.malformed_device_messages),
            presence: gw.fleet.counts(|m| gw.orders.queued(m)),
            machines_provisioned: gw.fleet.directory().await.ok().map(|d| d.len() as u64),
            order_events,
            notifier: &gw.notifier.stats,
            outbox: gw.notifier.backlog().await.ok(),
            cluster,
            tasks_ended: self.supervisor.ended().len() as u64,
        };
        gw.metrics.render(&snap)
    }
}
