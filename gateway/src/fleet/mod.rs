//! The fleet: which machines exist and which are online, on this node or, in
//! a cluster, on any node. It joins the local presence registry with the
//! cluster's view of the other nodes, so the HTTP layer and the exposition
//! ask one place "is this machine online, and since when?".
//!
//! - [`presence`]: this node's registry of connections, with epochs.
//! - [`persister`]: copies presence changes to storage with their webhooks.

pub mod persister;
pub mod presence;
pub mod view;

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use vendgate_proto::machine::MachineNo;

use crate::storage::{Machine, Storage, StorageError};
use presence::{MachinePresence, PresenceRegistry};
use view::ClusterView;

pub use presence::FLAP_THRESHOLD;

/// Presence figures computed in one pass over the registry.
#[derive(Debug, Clone, Copy, Default)]
pub struct PresenceCounts {
    pub online: u64,
    pub flapping: u64,
    pub queued_orders: u64,
}

/// Cluster mode: the view of the other nodes' machines, and this node's
/// id (its own machines are in the registry, never taken from the view).
pub struct OtherNodesView {
    pub view: Arc<ClusterView>,
    pub node: String,
}

/// The machines, as the API and the operators see them.
pub struct Fleet {
    presence: Arc<PresenceRegistry>,
    others: Option<OtherNodesView>,
    store: Arc<dyn Storage>,
    directory: Directory,
}

impl Fleet {
    pub fn new(
        presence: Arc<PresenceRegistry>,
        others: Option<OtherNodesView>,
        store: Arc<dyn Storage>,
    ) -> Self {
        Self {
            presence,
            others,
            store,
            directory: Directory::default(),
        }
    }

    /// This node's registry (connections held here).
    pub fn local(&self) -> &Arc<PresenceRegistry> {
        &self.presence
    }

    /// Machine `m` as the API shows it: this node's registry, or in a
    /// cluster the view of the node holding it (online there).
    pub fn machine_presence(&self, m: &MachineNo) -> Option<MachinePresence> {
        let local = self.presence.get(m);
        if local.as_ref().is_some_and(|p| p.online) {
            return local;
        }
        let remote = self.others.as_ref().and_then(|o| o.view.remote(m, &o.node));
        match remote {
            Some(r) => Some(MachinePresence {
                machine_no: *m,
                online: true,
                epoch: r.epoch,
                online_since: Some(r.since),
                last_seen: local.as_ref().and_then(|p| p.last_seen).max(Some(r.since)),
                firmware: local.as_ref().and_then(|p| p.firmware.clone()),
                last_rtt_ms: None,
                flaps: local.as_ref().map(|p| p.flaps).unwrap_or(0),
                last_offline_reason: None,
            }),
            None => local,
        }
    }

    /// Online on this node or, in a cluster, on any node.
    pub fn machine_online(&self, m: &MachineNo) -> bool {
        self.presence.is_online(m)
            || self
                .others
                .as_ref()
                .is_some_and(|o| o.view.remote(m, &o.node).is_some())
    }

    /// Every machine online anywhere, in machine number order.
    pub fn online_machines(&self) -> Vec<MachineNo> {
        let mut v = self.presence.online_machines();
        if let Some(o) = &self.others {
            v.extend(o.view.remote_online(&o.node).into_iter().map(|(m, _)| m));
            v.sort_unstable();
            v.dedup();
        }
        v
    }

    /// One pass over the registry (plus, in a cluster, the machines online
    /// on the other nodes); `queued` gives a machine's queued orders.
    pub fn counts(&self, queued: impl Fn(&MachineNo) -> usize) -> PresenceCounts {
        let mut c = PresenceCounts::default();
        for p in self.presence.snapshot() {
            if p.online {
                c.online += 1;
            }
            if p.flaps >= FLAP_THRESHOLD {
                c.flapping += 1;
            }
            c.queued_orders += queued(&p.machine_no) as u64;
        }
        if let Some(o) = &self.others {
            c.online += o.view.remote_online(&o.node).len() as u64;
        }
        c
    }

    /// The stored record of machine `m`.
    pub async fn machine(&self, m: &MachineNo) -> Result<Option<Machine>, StorageError> {
        self.store.machine(m).await
    }

    /// The stored machines, all or one merchant's.
    pub async fn list(&self, merchant: Option<&str>) -> Result<Vec<Machine>, StorageError> {
        self.store.list_machines(merchant).await
    }

    /// Every provisioned machine (cached for [`DIRECTORY_TTL`]).
    pub async fn directory(&self) -> Result<Arc<Vec<DirectoryEntry>>, StorageError> {
        self.directory.list(self.store.as_ref()).await
    }
}

/// How long the provisioned-machine list is reused.
pub const DIRECTORY_TTL: Duration = Duration::from_secs(5);

/// The provisioned machines (storage), cached for [`DIRECTORY_TTL`]: the
/// dashboard's machine list and the `machines_provisioned` gauge read it.
#[derive(Default)]
struct Directory {
    cached: tokio::sync::Mutex<Option<(tokio::time::Instant, Arc<Vec<DirectoryEntry>>)>>,
}

/// One provisioned machine as storage last recorded it.
#[derive(Debug, Clone)]
pub struct DirectoryEntry {
    pub machine_no: MachineNo,
    /// Persisted last-seen time (for machines not seen by this process).
    pub last_seen: Option<DateTime<Utc>>,
}

impl Directory {
    /// Every provisioned machine, ordered by machine_no.
    async fn list(&self, store: &dyn Storage) -> Result<Arc<Vec<DirectoryEntry>>, StorageError> {
        // One refresh at a time: concurrent polls wait for it instead of each
        // reading 10,000 rows.
        let mut cached = self.cached.lock().await;
        if let Some((at, list)) = cached.as_ref() {
            if at.elapsed() < DIRECTORY_TTL {
                return Ok(list.clone());
            }
        }
        let list: Arc<Vec<DirectoryEntry>> = Arc::new(
            store
                .list_machines(None)
                .await?
                .into_iter()
                .map(|m| DirectoryEntry {
                    machine_no: m.machine_no,
                    last_seen: m.last_seen,
                })
                .collect(),
        );
        *cached = Some((tokio::time::Instant::now(), list.clone()));
        Ok(list)
    }
}
