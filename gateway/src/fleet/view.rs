//! The cluster view: which machines are online on *other* nodes, under
//! which epoch, and which nodes are alive. Fed by the presence events nodes
//! publish on NATS (fast path) and a periodic re-read of the database (so a
//! lost event costs at most one resync period). This node's own connections
//! stay in the presence registry; the view never overrides them.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use dashmap::DashMap;
use serde::{Deserialize, Serialize};
use vendgate_proto::machine::MachineNo;

use crate::storage::OwnershipSeen;

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
    machines: DashMap<MachineNo, Entry>,
    nodes: DashMap<String, (Heartbeat, Instant)>,
    /// What changed the view, and how (exported with the cluster figures).
    pub stats: ViewStats,
}

/// One machine in the view.
#[derive(Debug, Clone)]
struct Entry {
    remote: Remote,
    /// When the view took it.
    seen: Instant,
    /// Offline only as far as a database re-read could tell: a newer epoch
    /// read before its owner's presence write landed (the CONNECT takes the
    /// epoch at once; the owner writes it online a batch later). The owner's
    /// online note of that epoch still counts. Not so for an offline from a
    /// note, or one the database wrote after the online: a connection ends
    /// once.
    provisional: bool,
}

/// Counters of the view's changes: how many came from presence notes and
/// how many the database re-read had to make (a note lost, or late).
#[derive(Debug, Default)]
pub struct ViewStats {
    pub notes_applied: AtomicU64,
    pub resync_online: AtomicU64,
    pub resync_offline: AtomicU64,
}

/// How long an equal-epoch "offline" from the database must persist before
/// the resync believes it over an "online" event, when the row's presence
/// time cannot tell which is newer (see [`ClusterView::resync`]): the
/// database is written a moment after the event (the presence writer
/// batches).
const RESYNC_GRACE: Duration = Duration::from_secs(3);

/// Whether `a` (a database time, whole milliseconds) is later than `b`;
/// None within the same millisecond (the database cannot tell).
fn newer_ms(a: DateTime<Utc>, b: DateTime<Utc>) -> Option<bool> {
    match a.timestamp_millis().cmp(&b.timestamp_millis()) {
        std::cmp::Ordering::Greater => Some(true),
        std::cmp::Ordering::Less => Some(false),
        std::cmp::Ordering::Equal => None,
    }
}

impl ClusterView {
    /// Apply a note: a newer epoch always wins; at an equal epoch only
    /// online → offline (a connection ends once), or online over an offline
    /// the database re-read could not confirm yet (see `Entry::provisional`).
    pub fn apply(&self, n: &PresenceNote) -> bool {
        let fresh = Entry {
            remote: Remote {
                node: n.node.clone(),
                epoch: n.epoch,
                online: n.online,
                since: n.at,
            },
            seen: Instant::now(),
            provisional: false,
        };
        let applied = match self.machines.entry(n.machine_no) {
            dashmap::Entry::Vacant(v) => {
                v.insert(fresh);
                true
            }
            dashmap::Entry::Occupied(mut o) => {
                let cur = o.get();
                let same = n.epoch == cur.remote.epoch;
                let newer = n.epoch > cur.remote.epoch
                    || (same && cur.remote.online && !n.online)
                    || (same && !cur.remote.online && cur.provisional && n.online);
                if newer {
                    o.insert(fresh);
                }
                newer
            }
        };
        if applied {
            self.stats.notes_applied.fetch_add(1, Ordering::Relaxed);
        }
        applied
    }

    /// Merge what the database says. A newer epoch wins. At an equal epoch
    /// the database is behind the notes while the owner's presence writes
    /// are queued (a reconnect storm), so its flag is believed only when it
    /// cannot be that: an offline written after the online the view holds
    /// (its presence time is later: a lost offline note), or an online
    /// over an offline the database itself had not confirmed. When the
    /// presence time cannot tell (the same millisecond, or none), an
    /// offline is believed after [`RESYNC_GRACE`], as provisional.
    pub fn resync(&self, rows: &[OwnershipSeen]) {
        for seen in rows {
            let r = &seen.ownership;
            let Some(node) = r.node.clone() else { continue };
            let row = Entry {
                remote: Remote {
                    node,
                    epoch: r.epoch,
                    online: r.online,
                    // An online row's presence time is when it came online.
                    since: seen.last_seen.unwrap_or_else(Utc::now),
                },
                seen: Instant::now(),
                provisional: !r.online,
            };
            let took = match self.machines.entry(r.machine_no) {
                dashmap::Entry::Vacant(v) => {
                    if r.online {
                        v.insert(row);
                        true
                    } else {
                        false
                    }
                }
                dashmap::Entry::Occupied(mut o) => {
                    let cur = o.get();
                    let take = if r.epoch != cur.remote.epoch {
                        (r.epoch > cur.remote.epoch).then_some(row.provisional)
                    } else if cur.remote.online && !r.online {
                        match seen.last_seen.map(|at| newer_ms(at, cur.remote.since)) {
                            // Written after the online: final.
                            Some(Some(true)) => Some(false),
                            // Written before it (the CONNECT's epoch, the
                            // owner's online write still queued).
                            Some(Some(false)) => None,
                            // Cannot tell: believed after the grace, and
                            // open to the online that may still come.
                            Some(None) | None => {
                                (cur.seen.elapsed() > RESYNC_GRACE).then_some(true)
                            }
                        }
                    } else {
                        (!cur.remote.online && r.online && cur.provisional).then_some(false)
                    };
                    if let Some(provisional) = take {
                        o.insert(Entry { provisional, ..row });
                    }
                    take.is_some()
                }
            };
            if took {
                let counter = if r.online {
                    &self.stats.resync_online
                } else {
                    &self.stats.resync_offline
                };
                counter.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Machine `m` if the view has it online on a node other than `me`.
    pub fn remote(&self, m: &MachineNo, me: &str) -> Option<Remote> {
        self.machines
            .get(m)
            .map(|e| e.remote.clone())
            .filter(|r| r.online && r.node != me)
    }

    /// The node the view last saw machine `m` on.
    pub fn node_of(&self, m: &MachineNo) -> Option<String> {
        self.machines.get(m).map(|e| e.remote.node.clone())
    }

    /// Every machine online on another node than `me`.
    pub fn remote_online(&self, me: &str) -> Vec<(MachineNo, Remote)> {
        self.machines
            .iter()
            .filter(|e| e.remote.online && e.remote.node != me)
            .map(|e| (*e.key(), e.remote.clone()))
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
    use crate::storage::Ownership;

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
        let row = |epoch, online| OwnershipSeen {
            ownership: Ownership {
                machine_no: m,
                epoch,
                node: Some("a".into()),
                online,
            },
            last_seen: None,
        };
        // The database has not caught up with the online event yet.
        v.resync(&[row(5, false)]);
        assert!(v.remote(&m, "x").is_some());
        v.resync(&[row(6, false)]);
        assert!(v.remote(&m, "x").is_none());
    }

    fn row_at(epoch: u64, online: bool, at: DateTime<Utc>) -> OwnershipSeen {
        OwnershipSeen {
            ownership: Ownership {
                machine_no: "12345678".parse().unwrap(),
                epoch,
                node: Some("a".into()),
                online,
            },
            last_seen: Some(at),
        }
    }

    #[test]
    fn a_storm_behind_in_the_database_does_not_undo_online_notes() {
        let v = ClusterView::default();
        let m: MachineNo = "12345678".parse().unwrap();
        let n = note(5, true, "a");
        v.apply(&n);
        // The row as the CONNECT left it (epoch taken, before the online
        // event), the owner's online write still queued: however late.
        v.resync(&[row_at(5, false, n.at - chrono::Duration::milliseconds(40))]);
        assert!(v.remote(&m, "x").is_some());
        assert_eq!(v.stats.resync_offline.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn an_offline_written_after_the_online_is_believed_at_once() {
        let v = ClusterView::default();
        let m: MachineNo = "12345678".parse().unwrap();
        let n = note(5, true, "a");
        v.apply(&n);
        // The offline note was lost; the database has the offline.
        v.resync(&[row_at(5, false, n.at + chrono::Duration::milliseconds(40))]);
        assert!(v.remote(&m, "x").is_none());
        // Final: a stale online row of that epoch does not bring it back.
        v.resync(&[row_at(5, true, n.at)]);
        assert!(v.remote(&m, "x").is_none());
        assert!(!v.apply(&note(5, true, "a")));
    }

    #[test]
    fn a_newer_epoch_read_offline_before_its_online_write_still_takes_the_note() {
        let v = ClusterView::default();
        let m: MachineNo = "12345678".parse().unwrap();
        v.apply(&note(5, true, "a"));
        // Epoch 6 taken elsewhere; its owner's online write not there yet.
        v.resync(&[row_at(6, false, Utc::now())]);
        assert!(v.remote(&m, "x").is_none());
        // Its online note (late), or the database once written, counts.
        assert!(v.apply(&note(6, true, "b")));
        assert_eq!(v.remote(&m, "x").map(|r| r.node), Some("b".into()));
        let w = ClusterView::default();
        w.apply(&note(5, true, "a"));
        w.resync(&[row_at(6, false, Utc::now())]);
        w.resync(&[row_at(6, true, Utc::now())]);
        assert!(w.remote(&m, "x").is_some());
    }

    #[test]
    fn an_offline_note_is_not_undone_by_a_stale_online_row() {
        let v = ClusterView::default();
        let m: MachineNo = "12345678".parse().unwrap();
        let n = note(5, true, "a");
        v.apply(&n);
        v.apply(&note(5, false, "a"));
        // The owner's offline write still queued behind its online one.
        v.resync(&[row_at(5, true, n.at)]);
        assert!(v.remote(&m, "x").is_none());
    }
}
