//! Machine connection epochs in cluster mode: each accepted CONNECT takes
//! the next cluster-wide epoch from the shared database, so connections to
//! different nodes are ordered. Built before the hub, which asks it.

use std::sync::Arc;

use async_trait::async_trait;
use chrono::Utc;
use tracing::warn;
use vendgate_proto::machine::MachineNo;

use crate::edge::EpochSource;
use crate::storage::Storage;

/// Epochs taken from [`crate::storage::ClusterStorage::take_ownership`].
pub struct OwnershipEpochs {
    store: Arc<dyn Storage>,
    /// This node, recorded as the machine's owner.
    node: String,
}

impl OwnershipEpochs {
    pub fn new(store: Arc<dyn Storage>, node: String) -> Self {
        Self { store, node }
    }
}

#[async_trait]
impl EpochSource for OwnershipEpochs {
    async fn acquire(&self, machine_no: MachineNo) -> Option<u64> {
        match self
            .store
            .take_ownership(&machine_no, &self.node, Utc::now())
            .await
        {
            Ok(e) => e,
            Err(e) => {
                warn!(%machine_no, error = %e, "cannot take the machine's epoch");
                None
            }
        }
    }
}
