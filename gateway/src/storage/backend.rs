//! What a backend gives the storage operations written once (the
//! implementations of [`super::Storage`] and its parts for every
//! [`Backend`]): where statements run (its pool, the order path's writes,
//! transactions), its locks, and the few operations it does its own way
//! because its concurrency control differs (claims, guarded changes, bulk
//! inserts). SQLite and PostgreSQL implement it in their modules.

use std::borrow::Cow;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use vendgate_proto::machine::MachineNo;

use super::cached::MerchantCache;
use super::lifecycle::{MachineChange, MachineUpdate};
use super::orders::StoredOrder;
use super::orders::{NewOrder, NewOutboxEvent, OrderChange, OrderEvent};
use super::outbox::{ClaimRequest, ClaimedEvent, PresenceChange, ReplayOutcome};
use super::rows::LineRow;
use super::run::Dialect;
use super::run::Engine;
use super::{NewMachine, PresenceWrite, StorageError};
use crate::domain::order::Status;
use vendgate_proto::msg::InventoryItem;

/// What every backend holds: its pool and the merchant cache.
#[derive(Debug)]
pub(super) struct Common<DB: sqlx::Database> {
    pub(super) pool: sqlx::Pool<DB>,
    pub(super) merchants: Arc<MerchantCache>,
}

impl<DB: sqlx::Database> Clone for Common<DB> {
    fn clone(&self) -> Self {
        Common {
            pool: self.pool.clone(),
            merchants: self.merchants.clone(),
        }
    }
}

impl<DB: sqlx::Database> Common<DB> {
    pub(super) fn new(pool: sqlx::Pool<DB>) -> Self {
        Common {
            pool,
            merchants: Arc::default(),
        }
    }
}

/// A connection of `B`'s engine.
pub(super) type Conn<B> = <<B as Backend>::Engine as Engine>::Conn;

/// A job of the order path, run on the connection the backend gives it.
pub(super) trait Job<C, T>:
    for<'c> FnOnce(&'c mut C) -> BoxFuture<'c, Result<T, StorageError>> + Send + 'static
{
}

impl<C, T, F> Job<C, T> for F where
    F: for<'c> FnOnce(&'c mut C) -> BoxFuture<'c, Result<T, StorageError>> + Send + 'static
{
}

#[async_trait::async_trait]
pub(super) trait Backend: OwnOutbox + OwnMachineChanges + Send + Sync + 'static {
    type Engine: Engine;

    /// The SQL the engine speaks.
    const DIALECT: Dialect = <Self::Engine as Engine>::DIALECT;

    fn common(&self) -> &Common<Self::Engine>;

    /// The pool, each statement on its own (autocommit).
    fn pooled(&self) -> <Self::Engine as Engine>::Pooled<'_> {
        Self::Engine::pooled(&self.common().pool)
    }

    /// Merchants as API authentication reads them.
    fn merchants(&self) -> &MerchantCache {
        &self.common().merchants
    }

    /// Begin a transaction on a pooled connection. With `immediate`, SQLite
    /// takes its write lock at once (`BEGIN IMMEDIATE`: the transaction's
    /// reads decide its writes, and no other writer may come in between);
    /// PostgreSQL locks rows as statements touch them and ignores it.
    async fn begin(&self, immediate: bool) -> Result<<Self::Engine as Engine>::Tx, StorageError>;

    /// Run a write of the order path, all of it or nothing, answering after
    /// it is durable: SQLite's group-commit writer, a PostgreSQL
    /// transaction.
    async fn write<T, F>(&self, job: F) -> Result<T, StorageError>
    where
        T: Send + 'static,
        F: Job<Conn<Self>, T>;

    /// [`Backend::write`] for a job of one statement: PostgreSQL runs it
    /// on a pooled connection as its own transaction.
    async fn write_one<T, F>(&self, job: F) -> Result<T, StorageError>
    where
        T: Send + 'static,
        F: Job<Conn<Self>, T>;

    /// `batch` in the order a transaction writing several machines' rows
    /// must lock them in (PostgreSQL: by machine_no, so that two such
    /// transactions cannot deadlock); SQLite has one writer and keeps the
    /// given order.
    fn lock_order<T: Clone>(batch: &[T], key: impl Fn(&T) -> &MachineNo) -> Cow<'_, [T]> {
        let _ = key;
        Cow::Borrowed(batch)
    }

    /// Serialise replacing machine `m`'s inventory snapshot with other
    /// writers, until the transaction on `conn` ends (PostgreSQL; SQLite's
    /// writer is alone anyway).
    async fn lock_inventory(conn: &mut Conn<Self>, m: &MachineNo) -> Result<(), StorageError> {
        let _ = (conn, m);
        Ok(())
    }

    // The order path's writes: a statement per row on SQLite, whose
    // group-commit writer batches them (`super::ops::orders`); one
    // statement each on PostgreSQL (one round trip, one commit:
    // `postgres/orders.rs`).

    /// [`super::OrderStorage::insert_order`]'s write.
    async fn insert_order_rows(
        &self,
        id: i64,
        o: NewOrder,
        ev: OrderEvent,
    ) -> Result<(), StorageError>;

    /// [`super::OrderStorage::update_order`]'s write.
    async fn change_order_rows(
        &self,
        id: i64,
        from: Status,
        change: OrderChange,
        ev: OrderEvent,
        outbox: Vec<NewOutboxEvent>,
    ) -> Result<bool, StorageError>;

    /// [`super::OrderStorage::order`]'s read: the order with its lines.
    async fn one_order(&self, id: i64) -> Result<Option<StoredOrder>, StorageError>;

    /// [`super::OrderStorage::put_inventories`]'s write.
    async fn replace_inventories(
        &self,
        batch: &[(MachineNo, Vec<InventoryItem>)],
        at: DateTime<Utc>,
    ) -> Result<(), StorageError>;

    // The operations each backend does its own way.

    /// [`super::Storage::create_machines`].
    async fn insert_machines(&self, ms: Vec<NewMachine>) -> Result<(), StorageError>;
    /// [`super::Storage::record_presence`].
    async fn record_one_presence(&self, w: PresenceWrite) -> Result<(), StorageError>;
    /// [`super::Storage::ping`].
    async fn check_ready(&self) -> Result<(), StorageError>;
    /// [`super::Storage::close`].
    async fn shut_down(&self);
    /// The lines of the orders `ids`, in order of order and line.
    async fn order_lines(&self, ids: &[i64]) -> Result<Vec<LineRow>, StorageError>;
}

/// The outbox operations a backend does its own way (its `outbox` module).
#[async_trait::async_trait]
pub(super) trait OwnOutbox {
    /// [`super::OutboxStorage::claim_outbox`].
    async fn claim_events(&self, req: &ClaimRequest<'_>)
        -> Result<Vec<ClaimedEvent>, StorageError>;
    /// [`super::OutboxStorage::replay_outbox`].
    async fn replay_event(
        &self,
        merchant: &str,
        event_id: &str,
        now: DateTime<Utc>,
    ) -> Result<ReplayOutcome, StorageError>;
    /// [`super::OutboxStorage::record_presence_batch_with_events`].
    async fn presence_with_events(&self, batch: &[PresenceChange]) -> Result<(), StorageError>;
}

/// The machine changes refused while the machine has orders in flight
/// ([`super::LifecycleStorage::remove_machine`],
/// [`super::LifecycleStorage::transfer_machine`]), as a backend makes them
/// (its `lifecycle` module).
#[async_trait::async_trait]
pub(super) trait OwnMachineChanges {
    async fn change_machine(
        &self,
        m: &MachineNo,
        change: MachineUpdate<'_>,
    ) -> Result<MachineChange, StorageError>;
}
