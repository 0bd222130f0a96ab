//! The PostgreSQL backend: one database shared by every gateway node of a
//! cluster and the `vendgate` CLI. This module opens and migrates the
//! database and gives the shared storage operations what they run on
//! (`Backend`); `bind` binds values and maps errors, `locks` holds the
//! locks it takes, `orders` (the order path's writes, a statement each),
//! `outbox` and `lifecycle` the operations it does its own way. The statements are in `storage::sql`.
//!
//! - A bounded pool (`[database]` settings). Every operation first waits at
//!   most `acquire_timeout` for a connection, and that deadline also bounds
//!   connecting (sqlx retries within it), so with the database down calls
//!   fail with `Backend` in about that time instead of hanging.
//! - Each call is one transaction (`READ COMMITTED`). What SQLite gets from
//!   its single writer, PostgreSQL gets from row locks: every compare-and-set
//!   is a guarded `UPDATE` (re-checked against the row as committed when it
//!   waited for a lock), claims take rows `FOR UPDATE SKIP LOCKED`, and an
//!   outbox row is written after the `UPDATE` of the row it is about, so
//!   events of one key get their `seq` in commit order.
//! - Batches that lock several machine rows lock them in machine_no order,
//!   so two nodes writing overlapping batches cannot deadlock.
//! - Same schema as SQLite (timestamps BIGINT ms, machine_no TEXT), flags
//!   BOOLEAN; unique violations map to [`StorageError::Duplicate`] by
//!   constraint name.
//! - Migrations run at open under sqlx's advisory lock, so several nodes
//!   starting at once apply them once.

mod bind;
mod lifecycle;
mod locks;
mod orders;
mod outbox;

use std::borrow::Cow;
use std::str::FromStr;

use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{Connection, PgConnection, Postgres};
use vendgate_proto::machine::MachineNo;

use self::bind::pg_error;
use crate::config::DatabaseSettings;
use crate::domain::order::Status;
use crate::storage::backend::{Backend, Common, Job};
use crate::storage::ops::accounts::write_presence;
use crate::storage::rows::{backend, now_ms, LineRow};
use crate::storage::run::{Run, Stmt, Value};
use crate::storage::sql;
use crate::storage::{
    NewMachine, NewOrder, NewOutboxEvent, OrderChange, OrderEvent, PresenceWrite, StorageError,
    StoredOrder,
};
use chrono::{DateTime, Utc};
use vendgate_proto::msg::InventoryItem;

/// Schema migrations, embedded at compile time.
static MIGRATOR: Migrator = sqlx::migrate!("migrations/postgres");

/// A pool of connections to one PostgreSQL database.
#[derive(Debug, Clone)]
pub struct PgStorage {
    common: Common<Postgres>,
}

impl PgStorage {
    /// Connect to `url` (`postgres://…`) with a pool bounded by `settings`
    /// and apply pending migrations.
    pub async fn open(url: &str, settings: &DatabaseSettings) -> Result<Self, StorageError> {
        let options = PgConnectOptions::from_str(url)
            .map_err(backend)?
            .application_name("vendgate")
            // A node frozen (SIGSTOP) or cut off inside a transaction would
            // hold its row locks, and every other node's update of those
            // orders would wait, for as long as the freeze lasts. Our
            // transactions never wait on anything outside the database, so
            // a session idle inside one this long is such a node: end it.
            .options([("idle_in_transaction_session_timeout", "5s")]);
        let pool = PgPoolOptions::new()
            .max_connections(settings.max_connections.max(1))
            .acquire_timeout(settings.acquire_timeout)
            .connect_with(options)
            .await
            .map_err(backend)?;
        migrate(&pool).await?;
        Ok(Self {
            common: Common::new(pool),
        })
    }

    /// The underlying pool, for backend-specific tools and tests.
    pub fn pool(&self) -> &PgPool {
        &self.common.pool
    }
}

/// sqlx takes a session-level advisory lock (per database) around the
/// migrations, so nodes opening a fresh database at once apply them once;
/// the others wait, then find them applied. The migrating connection is
/// closed afterwards rather than returned to the pool: if a migration fails
/// sqlx returns before unlocking, and a pooled connection would keep that
/// lock (blocking every later open) for as long as it lives.
async fn migrate(pool: &PgPool) -> Result<(), StorageError> {
    let mut conn = pool.acquire().await.map_err(backend)?.detach();
    // `run_direct` rather than `run`: the latter's `Acquire` bound makes the
    // future not provably `Send`, so `open` could not be spawned.
    let result = MIGRATOR.run_direct(&mut conn).await;
    let _ = conn.close().await;
    result.map_err(backend)
}

#[async_trait::async_trait]
impl Backend for PgStorage {
    type Engine = Postgres;

    fn common(&self) -> &Common<Postgres> {
        &self.common
    }

    async fn begin(
        &self,
        _immediate: bool,
    ) -> Result<sqlx::Transaction<'static, Postgres>, StorageError> {
        self.pool().begin().await.map_err(pg_error)
    }

    async fn write<T, F>(&self, job: F) -> Result<T, StorageError>
    where
        T: Send + 'static,
        F: Job<PgConnection, T>,
    {
        // Dropped on an error, the transaction rolls back.
        let mut tx = self.pool().begin().await.map_err(pg_error)?;
        let answer = job(&mut tx).await?;
        tx.commit().await.map_err(pg_error)?;
        Ok(answer)
    }

    async fn write_one<T, F>(&self, job: F) -> Result<T, StorageError>
    where
        T: Send + 'static,
        F: Job<PgConnection, T>,
    {
        let mut conn = self.pool().acquire().await.map_err(pg_error)?;
        job(&mut conn).await
    }

    async fn insert_order_rows(
        &self,
        id: i64,
        o: NewOrder,
        ev: OrderEvent,
    ) -> Result<(), StorageError> {
        orders::insert_order(self, id, &o, &ev).await
    }

    async fn change_order_rows(
        &self,
        id: i64,
        from: Status,
        change: OrderChange,
        ev: OrderEvent,
        outbox: Vec<NewOutboxEvent>,
    ) -> Result<bool, StorageError> {
        orders::change_order(self, id, from, &change, &ev, &outbox).await
    }

    async fn one_order(&self, id: i64) -> Result<Option<StoredOrder>, StorageError> {
        orders::one_order(self, id).await
    }

    async fn replace_inventories(
        &self,
        batch: &[(MachineNo, Vec<InventoryItem>)],
        at: DateTime<Utc>,
    ) -> Result<(), StorageError> {
        orders::replace_inventories(self, batch, at).await
    }

    fn lock_order<T: Clone>(batch: &[T], key: impl Fn(&T) -> &MachineNo) -> Cow<'_, [T]> {
        Cow::Owned(locks::by_machine(batch, key))
    }

    async fn lock_inventory(conn: &mut PgConnection, m: &MachineNo) -> Result<(), StorageError> {
        locks::lock_inventory(conn, m).await
    }

    async fn insert_machines(&self, ms: Vec<NewMachine>) -> Result<(), StorageError> {
        if ms.is_empty() {
            return Ok(());
        }
        // One statement: all or nothing by itself. A repeated machine_no
        // within `ms` violates machines_pkey like a stored one.
        let nos = ms.iter().map(|m| m.machine_no.as_str()).collect();
        let owners = ms.iter().map(|m| m.merchant_appid.as_str()).collect();
        let hashes = ms.iter().map(|m| m.secret_hash.as_str()).collect();
        let insert = Stmt::new(sql::INSERT_MACHINES_UNNEST)
            .bind(Value::Texts(nos))
            .bind(Value::Texts(owners))
            .bind(Value::Texts(hashes))
            .bind(now_ms());
        self.pooled().execute(insert).await?;
        Ok(())
    }

    async fn record_one_presence(&self, w: PresenceWrite) -> Result<(), StorageError> {
        let mut conn = self.pool().acquire().await.map_err(pg_error)?;
        write_presence(&mut *conn, &w).await
    }

    async fn check_ready(&self) -> Result<(), StorageError> {
        let (read_only,): (bool,) = self
            .pooled()
            .fetch_one(Stmt::new(sql::PG_READ_ONLY))
            .await?;
        if read_only {
            return Err(StorageError::Backend("the database is read-only".into()));
        }
        Ok(())
    }

    async fn shut_down(&self) {
        // Waits for connections in use to come back, then closes them all.
        self.pool().close().await;
    }

    async fn order_lines(&self, ids: &[i64]) -> Result<Vec<LineRow>, StorageError> {
        let select = Stmt::new(sql::ORDER_LINES.postgres).bind(Value::Ints(ids.to_vec()));
        self.pooled().fetch_all(select).await
    }
}
