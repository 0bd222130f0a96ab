//! Liveness: this node's registration and heartbeats, reaping nodes that
//! went silent (their machines are written offline, with webhooks), being
//! reaped (a frozen node closes its connections and registers again), the
//! other nodes' presence notes (the view, and closing a connection another
//! node took over), and leaving at shutdown.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use tokio::time::Instant;
use tracing::{debug, info, warn};
use vendgate_proto::machine::MachineNo;

use super::Cluster;
use crate::domain::webhook::machine_event;
use crate::fleet::view::{Heartbeat, PresenceNote};
use crate::storage::{PresenceChange, PresenceWrite};

/// Re-read ownership from the database every this many heartbeats.
const RESYNC_EVERY: u32 = 2;
/// Most orphaned machines written offline per heartbeat.
const REAP_BATCH: usize = 2000;

impl Cluster {
    /// Register (again) under a new incarnation; connections a previous
    /// incarnation held are written offline.
    pub(super) async fn register(&self) -> anyhow::Result<()> {
        let stale = self
            .store
            .register_node(&self.node, &self.incarnation, Utc::now())
            .await?;
        if !stale.is_empty() {
            info!(
                machines = stale.len(),
                "machines a previous incarnation of this node held: offline"
            );
            self.write_offline(&stale, "node_restarted").await;
        }
        Ok(())
    }

    /// Write machines offline at their epochs (the epoch rule leaves any
    /// that reconnected meanwhile alone) with their webhooks, and tell the
    /// other nodes.
    async fn write_offline(&self, machines: &[(MachineNo, u64)], reason: &str) {
        let now = Utc::now();
        let batch: Vec<PresenceChange> = machines
            .iter()
            .map(|(m, epoch)| PresenceChange {
                write: PresenceWrite {
                    machine_no: *m,
                    online: false,
                    epoch: *epoch,
                    at: now,
                },
                event: Some(machine_event(*m, false, Some(reason), now, now)),
            })
            .collect();
        for chunk in batch.chunks(1024) {
            if let Err(e) = self.store.record_presence_batch_with_events(chunk).await {
                warn!(error = %e, "could not write machines offline");
                return;
            }
        }
        self.notifier.wake();
        for (m, epoch) in machines {
            let note = PresenceNote {
                machine_no: *m,
                online: false,
                epoch: *epoch,
                node: String::new(),
                at: now,
            };
            self.view.apply(&note);
            self.publish_json(self.subjects.presence(), &note).await;
        }
    }

    /// Heartbeats, reaping dead nodes, and re-reading ownership.
    pub(super) async fn liveness(self: Arc<Self>) {
        let every = self
            .settings
            .heartbeat_interval
            .max(Duration::from_millis(100));
        let dead_after = self.settings.node_dead_after;
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Since when our own heartbeats have been succeeding: a node reaps
        // others only after it has itself been healthy for `dead_after`, so
        // when the database comes back after an outage the first node to
        // see it does not declare all the others dead.
        let mut healthy_since: Option<Instant> = None;
        let mut n: u32 = 0;
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            n = n.wrapping_add(1);
            let now = Utc::now();
            match self
                .store
                .node_heartbeat(&self.node, &self.incarnation, now)
                .await
            {
                Ok(true) => {
                    healthy_since.get_or_insert_with(Instant::now);
                }
                Ok(false) => {
                    // Another node declared us dead (we were frozen or cut
                    // off) and wrote our machines offline: our connections
                    // are stale. Close them; they come back with new epochs.
                    self.stats.fenced.fetch_add(1, Ordering::Relaxed);
                    let closed = self.hub.kick_all_machines();
                    warn!(closed, "this node was declared dead by the cluster; closed its machine connections and registering again");
                    healthy_since = None;
                    if let Err(e) = self.register().await {
                        warn!(error = %e, "registering again failed");
                    }
                    continue;
                }
                Err(e) => {
                    healthy_since = None;
                    warn!(error = %e, "node heartbeat failed");
                }
            }
            let hb = Heartbeat {
                node: self.node.clone(),
                incarnation: self.incarnation.clone(),
                machines: self.presence.online_count() as u64,
            };
            self.view.heard(hb.clone());
            self.publish_json(self.subjects.heartbeat(), &hb).await;
            if healthy_since.is_some_and(|t| t.elapsed() >= dead_after) {
                self.reap(now, dead_after).await;
            }
            if n.is_multiple_of(RESYNC_EVERY) {
                match self.store.ownership_seen().await {
                    Ok(rows) => self.view.resync(&rows),
                    Err(e) => debug!(error = %e, "ownership re-read failed"),
                }
            }
        }
    }

    async fn reap(&self, now: chrono::DateTime<Utc>, dead_after: Duration) {
        let dead_before =
            now - chrono::Duration::from_std(dead_after).unwrap_or(chrono::Duration::MAX);
        match self.store.reap_nodes(dead_before).await {
            Ok(nodes) => {
                for n in nodes {
                    warn!(node = %n, "node declared dead: no heartbeat");
                }
            }
            Err(e) => {
                debug!(error = %e, "reaping nodes failed");
                return;
            }
        }
        match self.store.orphaned_machines(REAP_BATCH).await {
            Ok(orphans) if !orphans.is_empty() => {
                self.stats
                    .machines_reaped
                    .fetch_add(orphans.len() as u64, Ordering::Relaxed);
                info!(machines = orphans.len(), "machines of dead nodes: offline");
                self.write_offline(&orphans, "node_lost").await;
            }
            Ok(_) => {}
            Err(e) => debug!(error = %e, "reading orphaned machines failed"),
        }
    }

    /// Other nodes' presence notes: the view, and closing a connection
    /// here that another node took over.
    pub(super) async fn remote_presence(self: Arc<Self>) {
        let Some(mut sub) = self.subscribe(self.subjects.presence()).await else {
            return;
        };
        while let Some(msg) = self.next_message(&mut sub).await {
            let Ok(note) = serde_json::from_slice::<PresenceNote>(&msg.payload) else {
                continue;
            };
            if note.node == self.node {
                continue;
            }
            self.view.apply(&note);
            if note.online {
                let here = self.presence.online_epoch(&note.machine_no);
                if here.is_some_and(|e| e < note.epoch) {
                    let closed = self.hub.kick_machine(&note.machine_no);
                    self.stats
                        .takeovers_closed
                        .fetch_add(closed as u64, Ordering::Relaxed);
                    info!(machine_no = %note.machine_no, to = %note.node, "machine taken over by another node; closed its connection here");
                }
            }
        }
    }

    pub(super) async fn heartbeats_in(self: Arc<Self>) {
        let Some(mut sub) = self.subscribe(self.subjects.heartbeat()).await else {
            return;
        };
        while let Some(msg) = self.next_message(&mut sub).await {
            if let Ok(hb) = serde_json::from_slice::<Heartbeat>(&msg.payload) {
                self.view.heard(hb);
            }
        }
    }

    /// A connection of this node opened or closed (`note`): into the view,
    /// and remembered for [`Self::leave`]. True when the machine arrives
    /// from another node (or is seen for the first time).
    pub(super) fn local_connection(&self, note: &PresenceNote) -> bool {
        let m = note.machine_no;
        let arriving = self.view.node_of(&m).as_deref() != Some(self.node.as_str());
        self.view.apply(note);
        if note.online {
            self.held.insert(m, note.epoch);
        } else {
            self.held.remove_if(&m, |_, epoch| *epoch == note.epoch);
        }
        arriving
    }

    /// Shutdown, after the edge closed every connection: tell the other
    /// nodes at once that this node's machines are gone (their presence
    /// notes would otherwise wait for the database re-read), and flush
    /// NATS. (The owner subscriptions ended with the shutdown.)
    pub async fn leave(&self) {
        let held: Vec<(MachineNo, u64)> =
            self.held.iter().map(|e| (*e.key(), *e.value())).collect();
        let now = Utc::now();
        for (m, epoch) in held {
            self.held.remove(&m);
            let note = PresenceNote {
                machine_no: m,
                online: false,
                epoch,
                node: self.node.clone(),
                at: now,
            };
            self.publish_json(self.subjects.presence(), &note).await;
        }
        let _ = tokio::time::timeout(Duration::from_secs(2), self.nats.flush()).await;
    }
}
