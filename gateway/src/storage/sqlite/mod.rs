//! The SQLite backend: one database file shared by the running gateway and
//! the `vendgate` CLI processes. This module opens and migrates the file and
//! gives the shared storage operations what they run on (`Backend`);
//! `lite` runs statements on rusqlite connections, `writer` is the
//! group-commit writer thread, `readers` the reader threads, `bind` binds
//! values and maps errors for the sqlx pool, `outbox` and `lifecycle` hold
//! the operations SQLite does its own way. The statements are in
//! `storage::sql`.
//!
//! - WAL journal, so readers never block the writer and several processes can
//!   open the file at once; a 5 s busy timeout lets a writer wait for another
//!   process's write instead of failing with "database is locked".
//! - `synchronous = FULL` on every connection (sqlx's and rusqlite's): in WAL
//!   mode `NORMAL` may lose the last commits on a power cut (the database
//!   stays consistent, but recent transactions roll back). Provisioned
//!   secrets, orders and money must not vanish after we have answered "ok",
//!   so every commit waits for the fsync.
//! - Foreign keys on: a machine cannot point at a missing merchant.
//! - Writes on the order path go through one group-commit writer
//!   (`writer`): a thread of its own owning one rusqlite connection,
//!   concurrent writes batched into one transaction and one fsync, each in
//!   a savepoint, each caller answered after the COMMIT. Pooled statements
//!   (reads, the rarer writes: provisioning, settings) run on a few reader
//!   threads (`readers`), each with its own rusqlite connection. Both keep
//!   their statements prepared, and a statement is never handed to another
//!   thread on its own: a write job crosses once, a pooled statement once.
//!   Every queue is bounded, every wait for it has a deadline.
//! - Transactions outside the writer (outbox claims, guarded machine
//!   changes, bulk provisioning, the readiness probe) and the migrations
//!   still run on a small sqlx pool; those whose reads decide their writes
//!   take the write lock at BEGIN (`BEGIN IMMEDIATE`), so they never fail
//!   half-way on the lock upgrade.
//! - Timestamps are INTEGER unix milliseconds, machine numbers TEXT (leading
//!   zeros), flags INTEGER 0/1, so the schema ports to PostgreSQL as it is.

mod bind;
mod lifecycle;
mod lite;
mod outbox;
mod readers;
mod writer;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use vendgate_proto::machine::MachineNo;
use vendgate_proto::msg::InventoryItem;

use sqlx::migrate::Migrator;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{Connection, Sqlite};

use self::lite::LiteConn;
use self::readers::{LitePooled, Readers};
use self::writer::Writer;
use crate::domain::order::Status;
use crate::storage::backend::{Backend, Common, Job};
use crate::storage::ops::orders::{orders, write_change, write_inventories, write_order};
use crate::storage::rows::{backend, now_ms, LineRow};
use crate::storage::run::{Inserts, Run, Stmt};
use crate::storage::sql;
use crate::storage::{NewMachine, PresenceWrite, Storage, StorageError};
use crate::storage::{NewOrder, NewOutboxEvent, OrderChange, OrderEvent, StoredOrder};

/// Schema migrations, embedded at compile time.
static MIGRATOR: Migrator = sqlx::migrate!("migrations/sqlite");

/// How long a statement waits for another connection's (or process's) write
/// lock before failing.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest wait for a free pooled connection.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(10);
/// The sqlx pool serves transactions and migrations only (statements run on
/// the writer and reader threads). Concurrent claims and probes wait for
/// one another on the write lock, not for a connection.
const MAX_CONNECTIONS: u32 = 8;
/// Rows per multi-row INSERT in bulk provisioning: 4 bound values each, far
/// below SQLite's limit of 32,766 variables per statement.
const BULK_ROWS: usize = 500;

type SqliteTx = sqlx::Transaction<'static, Sqlite>;

/// A pool of connections to one SQLite file.
#[derive(Debug, Clone)]
pub struct SqliteStorage {
    common: Common<Sqlite>,
    /// The group-commit writer for the order path.
    writer: Arc<Writer>,
    /// Pooled statements (reads, the rarer writes) on rusqlite.
    readers: Arc<Readers>,
}

impl SqliteStorage {
    /// Open `path`, creating the file and its parent directory if missing, and
    /// apply pending migrations.
    pub async fn open(path: &Path) -> Result<Self, StorageError> {
        // Private to the gateway's user whatever the umask: the database
        // holds every secret's hash and the merchants' encrypted AppSecrets.
        let owned = path.to_path_buf();
        tokio::task::spawn_blocking(move || crate::private_fs::prepare_sqlite(&owned))
            .await
            .map_err(backend)?
            .map_err(backend)?;
        // Two processes opening a fresh file at once (gateway and CLI): the
        // first connections turn the file to WAL, and SQLite answers another
        // connection's set-up SQLITE_BUSY at that moment without waiting in
        // the busy handler (seen ~3 % of the time with six concurrent opens).
        // Set-up is idempotent, so it is retried until the busy timeout.
        let deadline = tokio::time::Instant::now() + BUSY_TIMEOUT;
        loop {
            match Self::open_once(path).await {
                Err(OpenError::Busy(_)) if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(OpenError::Busy(e)) => return Err(e),
                Err(OpenError::Other(e)) => return Err(e),
                Ok(s) => return Ok(s),
            }
        }
    }

    async fn open_once(path: &Path) -> Result<Self, OpenError> {
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(BUSY_TIMEOUT)
            .foreign_keys(true)
            // 1 MiB page cache per connection instead of SQLite's 2 MiB: the
            // hot set (machines, open orders) is small, and 8 connections'
            // caches would otherwise be most of an idle gateway's memory.
            .pragma("cache_size", "-1024");
        let pool = SqlitePoolOptions::new()
            .max_connections(MAX_CONNECTIONS)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_with(options.clone())
            .await?;
        migrate(&pool).await?;
        let owned = path.to_path_buf();
        let writer_conn = tokio::task::spawn_blocking(move || lite::open(&owned, BUSY_TIMEOUT))
            .await
            .map_err(|e| OpenError::Other(backend(e)))?
            .map_err(OpenError::from_lite)?;
        let writer = Writer::spawn(writer_conn).map_err(|e| OpenError::Other(backend(e)))?;
        let owned = path.to_path_buf();
        let readers = tokio::task::spawn_blocking(move || Readers::spawn(&owned, BUSY_TIMEOUT))
            .await
            .map_err(|e| OpenError::Other(backend(e)))?
            .map_err(OpenError::Other)?;
        Ok(Self {
            common: Common::new(pool),
            writer: Arc::new(writer),
            readers: Arc::new(readers),
        })
    }

    /// The underlying pool, for backend-specific tools and tests.
    pub fn pool(&self) -> &SqlitePool {
        &self.common.pool
    }

    /// A transaction on a pooled connection that holds the write lock from
    /// its BEGIN.
    async fn begin_immediate(&self) -> Result<SqliteTx, StorageError> {
        self.pool()
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(backend)
    }
}

#[async_trait::async_trait]
impl Backend for SqliteStorage {
    type Engine = Sqlite;

    fn common(&self) -> &Common<Sqlite> {
        &self.common
    }

    /// The reader threads rather than the sqlx pool (see `readers`).
    fn pooled(&self) -> LitePooled<'_> {
        LitePooled::Readers(&self.readers)
    }

    async fn begin(&self, immediate: bool) -> Result<SqliteTx, StorageError> {
        if immediate {
            self.begin_immediate().await
        } else {
            self.pool().begin().await.map_err(backend)
        }
    }

    async fn write<T, F>(&self, job: F) -> Result<T, StorageError>
    where
        T: Send + 'static,
        F: Job<LiteConn, T>,
    {
        self.writer.write_value(job).await
    }

    async fn write_one<T, F>(&self, job: F) -> Result<T, StorageError>
    where
        T: Send + 'static,
        F: Job<LiteConn, T>,
    {
        self.writer.write_value(job).await
    }

    async fn insert_machines(&self, ms: Vec<NewMachine>) -> Result<(), StorageError> {
        let created_at_ms = now_ms();
        let mut tx = self.begin_immediate().await?;
        // Multi-row INSERTs of BULK_ROWS rows: every full chunk has the same
        // SQL text, so sqlx prepares it once per connection and reuses it,
        // and there are 20 round trips to the SQLite worker thread per
        // 10,000 machines instead of 10,000 (measured ~20x faster). On any
        // error `tx` is dropped and rolls back, so nothing of the batch stays.
        for chunk in ms.chunks(BULK_ROWS) {
            let mut insert = sqlx::QueryBuilder::<Sqlite>::new(sql::INSERT_MACHINES_INTO);
            insert.push_values(chunk, |mut row, m| {
                row.push_bind(m.machine_no.as_str())
                    .push_bind(&m.merchant_appid)
                    .push_bind(m.secret_hash.as_str())
                    .push_bind(created_at_ms);
            });
            insert
                .build()
                .execute(&mut *tx)
                .await
                .map_err(|e| bind::error(e, Some(Inserts::Account("machine"))))?;
        }
        tx.commit().await.map_err(backend)
    }

    async fn record_one_presence(&self, w: PresenceWrite) -> Result<(), StorageError> {
        self.record_presence_batch(&[w]).await
    }

    async fn check_ready(&self) -> Result<(), StorageError> {
        // Taking the write lock proves the file is open, writable (not
        // read-only, not held by another writer beyond the busy timeout)
        // without writing anything. A full disk is not detected this way.
        let tx = self.begin_immediate().await?;
        tx.rollback().await.map_err(backend)
    }

    async fn shut_down(&self) {
        // Writes queued before the close still commit.
        self.writer.close().await;
        self.readers.close().await;
        self.pool().close().await;
    }

    // The order path's writes, a statement per row: the group-commit
    // writer runs them on its own thread with no hand-off per statement.

    async fn insert_order_rows(
        &self,
        id: i64,
        o: NewOrder,
        ev: OrderEvent,
    ) -> Result<(), StorageError> {
        self.write(move |conn| Box::pin(async move { write_order(conn, id, &o, &ev).await }))
            .await
    }

    async fn change_order_rows(
        &self,
        id: i64,
        from: Status,
        change: OrderChange,
        ev: OrderEvent,
        outbox: Vec<NewOutboxEvent>,
    ) -> Result<bool, StorageError> {
        self.write(move |conn| {
            Box::pin(async move { write_change(conn, id, from, &change, &ev, &outbox).await })
        })
        .await
    }

    async fn one_order(&self, id: i64) -> Result<Option<StoredOrder>, StorageError> {
        Ok(orders(self, Stmt::new(sql::ORDER).bind(id)).await?.pop())
    }

    async fn replace_inventories(
        &self,
        batch: &[(MachineNo, Vec<InventoryItem>)],
        at: DateTime<Utc>,
    ) -> Result<(), StorageError> {
        write_inventories(self, batch, at).await
    }

    async fn order_lines(&self, ids: &[i64]) -> Result<Vec<LineRow>, StorageError> {
        // One read per order: reads are in-process, and an order has few
        // lines.
        let mut lines = Vec::new();
        for id in ids {
            let select = Stmt::new(sql::ORDER_LINES.sqlite).bind(*id);
            lines.extend(self.pooled().fetch_all::<LineRow>(select).await?);
        }
        Ok(lines)
    }
}

/// The SQLite migrator of sqlx takes no lock, so two processes opening a
/// fresh file at once (gateway and CLI) could both try to create the
/// tables. Running it inside our own `BEGIN IMMEDIATE` transaction
/// serialises them: the second waits for the write lock (busy timeout),
/// then finds the migrations applied. sqlx nests each migration's own
/// transaction as a savepoint inside ours.
async fn migrate(pool: &SqlitePool) -> Result<(), OpenError> {
    let mut conn = pool.acquire().await?;
    let mut tx = conn.begin_with("BEGIN IMMEDIATE").await?;
    // `run_direct` rather than `run`: the latter's `Acquire` bound makes the
    // future not provably `Send`, so `open` could not be spawned.
    MIGRATOR.run_direct(&mut *tx).await.map_err(|e| match e {
        sqlx::migrate::MigrateError::Execute(e) => OpenError::from(e),
        e => OpenError::Other(backend(e)),
    })?;
    Ok(tx.commit().await?)
}

/// Why one attempt to open the database failed: busy (retried) or not.
enum OpenError {
    Busy(StorageError),
    Other(StorageError),
}

impl OpenError {
    fn from_lite(e: rusqlite::Error) -> Self {
        let busy = matches!(
            e.sqlite_error_code(),
            Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
        );
        if busy {
            Self::Busy(backend(e))
        } else {
            Self::Other(backend(e))
        }
    }
}

impl From<sqlx::Error> for OpenError {
    fn from(e: sqlx::Error) -> Self {
        let busy = matches!(&e, sqlx::Error::Database(db)
            if matches!(db.code().as_deref(), Some("5" | "6" | "517" | "261")));
        if busy {
            Self::Busy(backend(e))
        } else {
            Self::Other(backend(e))
        }
    }
}

#[cfg(test)]
mod tests;
