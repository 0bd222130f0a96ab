//! The cluster half of the storage contract: what several gateway nodes
//! sharing one database agree on through it. Machine ownership epochs
//! (fencing), node liveness, order sweeps that any node may run (claimed with
//! a lease so two nodes do not work the same row), and cancels owed to
//! machines, recorded durably so whichever node the machine reconnects to
//! delivers them.
//!
//! The single-node gateway uses the sweeps and the pending cancels too; only
//! [`ClusterStorage::take_ownership`] and the node rows are cluster-only.
//! It is written once for every `Backend`, so the contract tests cover
//! both.

use chrono::{DateTime, Utc};
use vendgate_proto::machine::MachineNo;

use super::{StorageError, StoredOrder};

/// Which due orders a sweep claims.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Due {
    /// `awaiting_payment` with `pay_deadline <= now`: the 20-minute expiry.
    Unpaid,
    /// `dispensing` with `dispense_deadline <= now`: no result in time.
    DispenseDeadline,
    /// `dispatching` and last updated before this instant: the node that
    /// sent the command died before the machine's ack (or its answer) was
    /// recorded. A live node settles `dispatching` within the accept timeout.
    StaleDispatch { updated_before: DateTime<Utc> },
}

impl Due {
    /// The stale-dispatch cut-off a sweep statement binds (0 for the other
    /// kinds, whose statements do not read it).
    pub(super) fn stale_before_ms(self) -> i64 {
        match self {
            Due::StaleDispatch { updated_before } => updated_before.timestamp_millis(),
            _ => 0,
        }
    }

    /// The sort key of a claimed order, to give a claim back oldest deadline
    /// first (RETURNING does not keep the subquery's order).
    pub(super) fn sort_key(self, o: &StoredOrder) -> (Option<DateTime<Utc>>, u64) {
        let at = match self {
            Due::Unpaid => o.pay_deadline,
            Due::DispenseDeadline => o.dispense_deadline,
            Due::StaleDispatch { .. } => Some(o.updated_at),
        };
        (at, o.order_id)
    }
}

/// A machine's cluster-wide ownership as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ownership {
    pub machine_no: MachineNo,
    /// The epoch of the machine's latest accepted CONNECT anywhere.
    pub epoch: u64,
    /// The node that accepted it (None: never connected in cluster mode).
    pub node: Option<String>,
    pub online: bool,
}

/// A machine's [`Ownership`] with the time of its row's latest presence
/// write (or of the CONNECT that took the epoch, before the owner's
/// presence write lands), in the owner's clock: it tells the cluster view
/// an offline written after the online it holds from one written before.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnershipSeen {
    pub ownership: Ownership,
    pub last_seen: Option<DateTime<Utc>>,
}

/// A live (or not yet reaped) gateway node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeRow {
    pub node_id: String,
    pub incarnation: String,
    pub started_at: DateTime<Utc>,
    pub heartbeat_at: DateTime<Utc>,
    /// Machines stored online with this node as owner.
    pub online_machines: u64,
}

#[async_trait::async_trait]
pub trait ClusterStorage: Send + Sync + 'static {
    /// A machine's CONNECT was accepted on `node`: in one statement, the
    /// stored epoch becomes `epoch + 1`, the owner `node`, `last_seen` `at`.
    /// Returns the new epoch; Ok(None) for an unknown machine. Two nodes
    /// taking the same machine at once get two different epochs; the larger
    /// one is the owner. The online flag is left to the presence write that
    /// follows at this epoch (which also emits `machine.online` when it
    /// flips the flag).
    async fn take_ownership(
        &self,
        m: &MachineNo,
        node: &str,
        at: DateTime<Utc>,
    ) -> Result<Option<u64>, StorageError>;

    /// Ownership of the given machines (all machines when `machines` is
    /// None), in machine_no order. Unknown machines are left out.
    async fn ownership(
        &self,
        machines: Option<&[MachineNo]>,
    ) -> Result<Vec<Ownership>, StorageError>;

    /// Every machine's ownership with its presence time (the cluster view's
    /// periodic re-read), in machine_no order.
    async fn ownership_seen(&self) -> Result<Vec<OwnershipSeen>, StorageError>;

    /// Insert or replace this node's row with a new incarnation (start-up,
    /// or after it found itself reaped). Returns the machines stored online
    /// with this node as owner: connections of a previous incarnation (a
    /// crash and restart under the same id) that no longer exist. The
    /// caller writes them offline at that epoch, like
    /// [`ClusterStorage::orphaned_machines`].
    async fn register_node(
        &self,
        node: &str,
        incarnation: &str,
        at: DateTime<Utc>,
    ) -> Result<Vec<(MachineNo, u64)>, StorageError>;

    /// Refresh the node's heartbeat. Ok(false) when its row is gone or
    /// carries another incarnation: another node declared this one dead
    /// and offlined its machines, so it must drop its connections (they
    /// reconnect with new epochs) and register again.
    async fn node_heartbeat(
        &self,
        node: &str,
        incarnation: &str,
        at: DateTime<Utc>,
    ) -> Result<bool, StorageError>;

    /// Delete the rows of nodes whose heartbeat is older than `dead_before`
    /// and return their ids. Concurrent callers each get a node at most once.
    async fn reap_nodes(&self, dead_before: DateTime<Utc>) -> Result<Vec<String>, StorageError>;

    /// Machines stored online whose owner has no node row (reaped, or a
    /// node that stopped): (machine, stored epoch), at most `limit`. The
    /// caller writes them offline at that epoch with
    /// [`super::OutboxStorage::record_presence_batch_with_events`], so a
    /// machine that reconnected meanwhile (newer epoch) is left alone.
    async fn orphaned_machines(&self, limit: usize) -> Result<Vec<(MachineNo, u64)>, StorageError>;

    /// Every node row, with its online machine count, by node id.
    async fn nodes(&self) -> Result<Vec<NodeRow>, StorageError>;

    /// Claim up to `limit` due orders of kind `due` (see [`Due`]): oldest
    /// deadline first, skipping rows another claimer holds (PostgreSQL: `FOR
    /// UPDATE SKIP LOCKED`) and rows whose sweep lease has not run out, and
    /// set their lease to `lease_until`, so concurrent sweeps on several
    /// nodes never get the same order twice within a lease. The caller then
    /// applies the change with the usual compare-and-set
    /// ([`super::OrderStorage::update_order`]), which is the final guard.
    async fn claim_due_orders(
        &self,
        due: Due,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
        limit: usize,
    ) -> Result<Vec<StoredOrder>, StorageError>;

    /// Orders of machine `m` whose cancel is still owed (an
    /// [`super::OrderChange`] with `cancel_pending` set it), oldest first.
    async fn pending_cancels(&self, m: &MachineNo) -> Result<Vec<u64>, StorageError>;

    /// The cancel was handed to the machine's live connection: clear
    /// `cancel_pending`. Idempotent.
    async fn cancel_delivered(&self, order_id: u64) -> Result<(), StorageError>;

    /// The machine's orders that hold stock (`awaiting_payment`,
    /// `dispatching`, `dispensing`): a node that adopts a machine rebuilds
    /// its reservations from them.
    async fn open_orders(&self, m: &MachineNo) -> Result<Vec<StoredOrder>, StorageError>;
}
