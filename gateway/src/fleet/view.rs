//! The cluster view: which machines are online on *other* nodes, under
//! which epoch, and which nodes are alive. Fed by the presence events nodes
//! publish on NATS (fast path) and a periodic re-read of the database (so a
//! lost event costs at most one resync period). This node's own connections
//! stay in the presence registry; the view never overrides them.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use dashmap::DashMap;
use serde::{Deserialize, Serialize};
use vendgate_proto::machine::MachineNo;

use crate::storage::Ownership;

/// A presence change as nodes announce it on NATS.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PresenceNote {
    pub machine_no: MachineNo,
    pub online: bool,
    pub epoch: u64,
    pub node: String,
    pub at: DateTime<Utc>,
}

/// One machine as the view knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Remote {
    pub node: String,
    pub epoch: u64,
    pub online: bool,
    pub since: DateTime<Utc>,
}

/// A node's heartbeat as last heard on NATS.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heartbeat {
    pub node: String,
    pub incarnation: String,
    /// Machines connected to it.
    pub machines: u64,
}

#[derive(Debug, Default)]
pub struct ClusterView {
    machines: DashMap<MachineNo, (Remote, Instant)>,
    nodes: DashMap<String, (Heartbeat, Instant)>,
}

/// How long an equal-epoch "offline" from the database must persist before
/// the resync believes it over an "online" event: the database is written a
/// moment after the event (the presence writer batches), so a fresh online
/// entry is newer than what the resync read.
const RESYNC_GRACE: Duration = Duration::from_secs(3);

impl ClusterView {
    /// Apply a note: a newer epoch always wins; at an equal epoch only
    /// online → offline (a connection ends once).
    pub fn apply(&self, n: &PresenceNote) -> bool {
        let fresh = Remote {
            node: n.node.clone(),
            epoch: n.epoch,
            online: n.online,
            since: n.at,
        };
        match self.machines.entry(n.machine_no) {
            dashmap::Entry::Vacant(v) => {
                v.insert((fresh, Instant::now()));
                true
            }
            dashmap::Entry::Occupied(mut o) => {
                let cur = &o.get().0;
                let newer =
                    n.epoch > cur.epoch || (n.epoch == cur.epoch && cur.online && !n.online);
                if newer {
                    o.insert((fresh, Instant::now()));
                }
                newer
            }
        }
    }

    /// Merge what the database says (see [`RESYNC_GRACE`]).
    pub fn resync(&self, rows: &[Ownership]) {
        for r in rows {
            let Some(node) = r.node.clone() else { continue };
            let row = Remote {
                node,
                epoch: r.epoch,
                online: r.online,
                since: Utc::now(),
            };
            match self.machines.entry(r.machine_no) {
                dashmap::Entry::Vacant(v) => {
                    if r.online {
                        v.insert((row, Instant::now()));
                    }
                }
                dashmap::Entry::Occupied(mut o) => {
                    let (cur, seen) = o.get();
                    let take = r.epoch > cur.epoch
                        || (r.epoch == cur.epoch
                            && cur.online != r.online
                            && seen.elapsed() > RESYNC_GRACE);
                    if take {
                        o.insert((row, Instant::now()));
                    }
                }
            }
        }
    }

    /// Machine `m` if the view has it online on a node other than `me`.
    pub fn remote(&self, m: &MachineNo, me: &str) -> Option<Remote> {
        self.machines
            .get(m)
            .map(|e| e.0.clone())
            .filter(|r| r.online && r.node != me)
    }

    /// The node the view last saw machine `m` on.
    pub fn node_of(&self, m: &MachineNo) -> Option<String> {
        self.machines.get(m).map(|e| e.0.node.clone())
    }

    /// Every machine online on another node than `me`.
    pub fn remote_online(&self, me: &str) -> Vec<(MachineNo, Remote)> {
        self.machines
            .iter()
            .filter(|e| e.0.online && e.0.node != me)
            .map(|e| (*e.key(), e.0.clone()))
            .collect()
    }

    pub fn heard(&self, hb: Heartbeat) {
        self.nodes.insert(hb.node.clone(), (hb, Instant::now()));
    }

    /// Nodes heard within `alive_within`, with their machine counts.
    pub fn live_nodes(&self, alive_within: Duration) -> HashMap<String, u64> {
        self.nodes
            .iter()
            .filter(|e| e.1.elapsed() <= alive_within)
            .map(|e| (e.key().clone(), e.0.machines))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn note(epoch: u64, online: bool, node: &str) -> PresenceNote {
        PresenceNote {
            machine_no: "12345678".parse().unwrap(),
            online,
            epoch,
            node: node.into(),
            at: Utc::now(),
        }
    }

    #[test]
    fn newer_epoch_wins_and_stale_close_is_ignored() {
        let v = ClusterView::default();
        let m: MachineNo = "12345678".parse().unwrap();
        assert!(v.apply(&note(1, true, "a")));
        assert!(v.apply(&note(2, true, "b")));
        // The late close of the connection on a: older epoch.
        assert!(!v.apply(&note(1, false, "a")));
        assert_eq!(v.remote(&m, "c").map(|r| r.node), Some("b".into()));
        // b's own close at its epoch counts.
        assert!(v.apply(&note(2, false, "b")));
        assert!(v.remote(&m, "c").is_none());
        // Offline at an equal epoch never comes back online.
        assert!(!v.apply(&note(2, true, "b")));
    }

    #[test]
    fn own_node_is_not_remote() {
        let v = ClusterView::default();
        let m: MachineNo = "12345678".parse().unwrap();
        v.apply(&note(3, true, "me"));
        assert!(v.remote(&m, "me").is_none());
        assert!(v.remote_online("me").is_empty());
    }

    #[test]
    fn resync_takes_newer_epochs_only() {
        let v = ClusterView::default();
        let m: MachineNo = "12345678".parse().unwrap();
        v.apply(&note(5, true, "a"));
        let row = |epoch, online| Ownership {
            machine_no: m,
            epoch,
            node: Some("a".into()),
            online,
        };
        // The database has not caught up with the online event yet.
        v.resync(&[row(5, false)]);
        assert!(v.remote(&m, "x").is_some());
        v.resync(&[row(6, false)]);
        assert!(v.remote(&m, "x").is_none());
    }
}
