//! The service's side of stock (the figures themselves are [`super::inventory`]):
//! releasing reservations, here and on the node holding the machine;
//! rebuilding them for a machine that arrives from another node; and
//! persisting inventory snapshots in the background.

use std::sync::Arc;

use chrono::Utc;
use tokio_util::sync::CancellationToken;
use tracing::warn;
use vendgate_proto::machine::MachineNo;
use vendgate_proto::msg;

use super::OrderService;
use crate::domain::order::Line;
use crate::storage::Storage;

impl OrderService {
    /// Give an order's reservation back, here and (cluster mode) on the
    /// node that holds the machine.
    pub(super) fn release(&self, m: MachineNo, lines: &[Line]) {
        self.inventory.release(m, lines);
        if !self.presence.is_online(&m) {
            if let Some(others) = &self.other_nodes {
                others.stock.released(&m, lines);
            }
        }
    }

    /// Cluster mode: machine `m` just connected to this node, coming from
    /// another one. Its stock figures come with its inventory snapshot; the
    /// quantities held by its open orders are rebuilt from storage (the node
    /// that held it before had them in memory).
    pub async fn rebuild_reservations(&self, m: MachineNo) {
        match self.store.open_orders(&m).await {
            Ok(open) => {
                let lines: Vec<Line> = open.into_iter().flat_map(|o| o.lines).collect();
                self.inventory.set_reserved(m, &lines);
            }
            Err(e) => {
                warn!(machine_no = %m, error = %e, "could not rebuild the machine's reservations")
            }
        }
    }

    /// After shutdown: wait until queued inventory snapshots are written, so
    /// storage can be closed without losing them.
    pub async fn finish_inventory_writes(&self) {
        let writer = self.inventory_writer.lock().ok().and_then(|mut w| w.take());
        if let Some(w) = writer {
            let _ = w.await;
        }
    }
}

/// Inventory snapshots waiting to be persisted: the latest per machine.
#[derive(Debug, Default)]
pub(crate) struct PendingSnapshots {
    latest: std::sync::Mutex<std::collections::HashMap<MachineNo, Vec<msg::InventoryItem>>>,
    ready: tokio::sync::Notify,
}

impl PendingSnapshots {
    pub(crate) fn put(&self, m: MachineNo, items: Vec<msg::InventoryItem>) {
        if let Ok(mut l) = self.latest.lock() {
            l.insert(m, items);
        }
        self.ready.notify_one();
    }

    /// Up to `n` pending snapshots, removed.
    fn take(&self, n: usize) -> Vec<(MachineNo, Vec<msg::InventoryItem>)> {
        let Ok(mut l) = self.latest.lock() else {
            return Vec::new();
        };
        let keys: Vec<MachineNo> = l.keys().take(n).copied().collect();
        keys.into_iter()
            .filter_map(|k| l.remove(&k).map(|v| (k, v)))
            .collect()
    }
}

/// Persists inventory snapshots off the edge's tasks, many machines per
/// transaction; whatever is pending at shutdown is written before it ends.
pub(super) async fn inventory_writer(
    store: Arc<dyn Storage>,
    pending: Arc<PendingSnapshots>,
    shutdown: CancellationToken,
) {
    /// Most snapshots written in one transaction.
    const BATCH: usize = 1024;
    loop {
        let batch = pending.take(BATCH);
        if batch.is_empty() {
            if shutdown.is_cancelled() {
                return;
            }
            tokio::select! {
                _ = pending.ready.notified() => {}
                _ = shutdown.cancelled() => {}
            }
            continue;
        }
        if let Err(e) = store.put_inventories(&batch, Utc::now()).await {
            warn!(machines = batch.len(), error = %e, "inventory snapshots not persisted");
        }
    }
}
