//! The lifecycle half of the storage contract: disabling, enabling,
//! removing and transferring accounts (the operator commands of `vendgate`),
//! paging orders out for an export, and the retention purge.
//!
//! Changes refused while orders are in flight (remove, transfer) check and
//! write in one transaction that holds the machine row, so an order being
//! inserted for the machine either committed before (and is counted) or
//! commits after the change; each backend does that its own way, the rest
//! is written once for every `Backend`.

use chrono::{DateTime, Utc};
use vendgate_proto::machine::MachineNo;

use super::{ServiceAccount, StorageError, StoredOrder};
use crate::secrets::SecretHash;

/// What a guarded machine change found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MachineChange {
    Done,
    /// No such machine, or it was removed.
    NotFound,
    /// Refused: this many orders of the machine are not final yet.
    OrdersInFlight(u64),
}

/// One page of an export: orders created in `[from, to)`, optionally one
/// merchant's, after the key of the previous page's last order, ordered by
/// (created_at, order_id).
#[derive(Debug, Clone)]
pub struct OrderPage<'a> {
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
    pub merchant: Option<&'a str>,
    /// (created_at, order_id) of the last order already read.
    pub after: Option<(DateTime<Utc>, u64)>,
    pub limit: usize,
}

/// Rows one purge batch deleted, by kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Purged {
    pub orders: u64,
    /// Timeline rows of the purged orders.
    pub order_events: u64,
    /// Outbox rows (with their attempts), of purged orders or on their own.
    pub webhooks: u64,
}

/// Which finished orders a purge batch may delete.
#[derive(Debug, Clone, Copy)]
pub struct OrderPurge {
    /// Final orders last changed before this go.
    pub before: DateTime<Utc>,
    /// ...except protected ones (`unknown`; `rejected` with goods reported
    /// out; a refund owed and not recorded; a cancel owed), which go only
    /// when last changed before this too.
    pub protected_before: DateTime<Utc>,
    pub limit: usize,
}

#[async_trait::async_trait]
pub trait LifecycleStorage: Send + Sync + 'static {
    /// Disable (`Some(at)`) or enable (`None`) a machine. Ok(false) if there
    /// is no such machine or it was removed.
    async fn set_machine_disabled(
        &self,
        m: &MachineNo,
        disabled: Option<DateTime<Utc>>,
    ) -> Result<bool, StorageError>;
    /// Remove a machine unless it has orders in flight: its secret becomes
    /// `revoked` (a hash of a secret nobody knows), its previous secret is
    /// dropped, `removed_at` is set. The row and its orders stay.
    async fn remove_machine(
        &self,
        m: &MachineNo,
        revoked: &SecretHash,
        at: DateTime<Utc>,
    ) -> Result<MachineChange, StorageError>;
    /// Give a machine to merchant `to` unless it has orders in flight.
    /// Err(UnknownMerchant) if `to` does not exist. Its past orders stay
    /// the previous owner's.
    async fn transfer_machine(
        &self,
        m: &MachineNo,
        to: &str,
    ) -> Result<MachineChange, StorageError>;
    /// Machines that must not be connected: disabled or removed.
    async fn blocked_machines(&self) -> Result<Vec<MachineNo>, StorageError>;
    /// Disable (`Some(at)`) or enable (`None`) a merchant; Ok(false) if
    /// unknown.
    async fn set_merchant_disabled(
        &self,
        appid: &str,
        disabled: Option<DateTime<Utc>>,
    ) -> Result<bool, StorageError>;
    /// Ok(false) if unknown.
    async fn set_merchant_notify_url(
        &self,
        appid: &str,
        url: Option<&str>,
    ) -> Result<bool, StorageError>;
    /// Service accounts ordered by username.
    async fn list_services(&self) -> Result<Vec<ServiceAccount>, StorageError>;
    /// Ok(false) if unknown.
    async fn remove_service(&self, username: &str) -> Result<bool, StorageError>;
    /// One page of an export (see [`OrderPage`]).
    async fn export_orders(&self, page: &OrderPage<'_>) -> Result<Vec<StoredOrder>, StorageError>;
    /// Delete at most `rule.limit` finished orders, with their lines,
    /// timeline and delivered or dead webhook rows, in one transaction.
    /// Orders with a webhook still pending are kept.
    async fn purge_orders(&self, rule: &OrderPurge) -> Result<Purged, StorageError>;
    /// Delete at most `limit` delivered or dead webhook rows (and their
    /// attempts) created before `before`, in one transaction.
    async fn purge_webhooks(
        &self,
        before: DateTime<Utc>,
        limit: usize,
    ) -> Result<Purged, StorageError>;
    /// The database's size in bytes (SQLite: the main file's pages;
    /// PostgreSQL: `pg_database_size`).
    async fn database_size(&self) -> Result<u64, StorageError>;
}

/// A machine change refused while the machine has orders in flight.
#[derive(Debug, Clone, Copy)]
pub enum MachineUpdate<'a> {
    /// [`LifecycleStorage::remove_machine`].
    Remove {
        revoked: &'a SecretHash,
        at: DateTime<Utc>,
    },
    /// [`LifecycleStorage::transfer_machine`].
    Transfer { to: &'a str },
}
