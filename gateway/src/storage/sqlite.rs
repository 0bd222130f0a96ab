//! The SQLite implementation of [`Storage`]: one database file shared by the
//! running gateway and the `vendgate` CLI processes.
//!
//! - WAL journal, so readers never block the writer and several processes can
//!   open the file at once; a 5 s busy timeout lets a writer wait for another
//!   process's write instead of failing with "database is locked".
//! - `synchronous = FULL`: in WAL mode `NORMAL` may lose the last commits on a
//!   power cut (the database stays consistent, but recent transactions roll
//!   back). Provisioned secrets, and soon orders and money, must not vanish
//!   after we have answered "ok", so every commit waits for the fsync.
//! - Foreign keys on: a machine cannot point at a missing merchant.
//! - Writes on the order path go through one group-commit writer
//!   (`sqlite_writer`): one connection of its own, concurrent writes batched
//!   into one transaction and one fsync, each in a savepoint. Reads and the
//!   rarer writes (provisioning, presence, outbox) use the pool.
//! - Merchants are cached in memory for a second after each read: API
//!   authentication reads one on every request, and a row changes only on a
//!   secret rotation, which may come from the CLI in another process.
//! - Timestamps are INTEGER unix milliseconds, machine numbers TEXT (leading
//!   zeros), so the schema ports to PostgreSQL as it is.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use dashmap::DashMap;
use sqlx::error::ErrorKind;
use sqlx::migrate::Migrator;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{ConnectOptions, Connection};
use vendgate_proto::machine::MachineNo;

use super::sqlite_writer::Writer;
use super::{
    Machine, Merchant, NewMachine, NewMerchant, NewService, PresenceWrite, ServiceAccount, Storage,
    StorageError,
};
use crate::secrets::{PreviousSecret, SecretHash};

/// Schema migrations, embedded at compile time.
static MIGRATOR: Migrator = sqlx::migrate!("migrations/sqlite");

/// How long a cached merchant row is trusted (see `SqliteStorage::merchants`).
const MERCHANT_CACHE_TTL: Duration = Duration::from_secs(1);
/// How long a statement waits for another connection's (or process's) write
/// lock before failing.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest wait for a free pooled connection.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(10);
/// SQLite has one writer at a time anyway; a few connections serve concurrent
/// readers (CONNECT authentication, API lookups).
const MAX_CONNECTIONS: u32 = 8;

/// A pool of connections to one SQLite file.
#[derive(Debug, Clone)]
pub struct SqliteStorage {
    pool: SqlitePool,
    /// The group-commit writer for the order path.
    writer: Arc<Writer>,
    /// Merchants by appid with the time they were read, filled on read and
    /// trusted for [`MERCHANT_CACHE_TTL`]. A merchant's row changes when its
    /// secret is rotated, usually by the CLI in another process, so an entry
    /// cannot be invalidated from here alone; the short TTL bounds how long a
    /// rotation takes to reach a running gateway. Misses are not cached, so
    /// a merchant created by the CLI is found on its first request.
    merchants: Arc<DashMap<String, (Merchant, Instant)>>,
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
                Err(OpenError::Busy(e)) => return Err(backend(e)),
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
        let writer_conn = options.connect().await?;
        Ok(Self {
            pool,
            writer: Arc::new(Writer::spawn(writer_conn)),
            merchants: Arc::new(DashMap::new()),
        })
    }

    /// The underlying pool, for backend-specific tools and tests.
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    /// Drop a cached merchant after this process changed its row.
    pub(super) fn forget_merchant(&self, appid: &str) {
        self.merchants.remove(appid);
    }

    /// The group-commit writer.
    pub(super) fn writer(&self) -> &Writer {
        &self.writer
    }
}

#[async_trait::async_trait]
impl Storage for SqliteStorage {
    async fn create_merchant(&self, m: NewMerchant) -> Result<Merchant, StorageError> {
        let created_at_ms = now_ms();
        sqlx::query(
            "INSERT INTO merchants \
             (appid, name, notify_url, appsecret_hash, appsecret_enc, created_at_ms) \
             VALUES (?, ?, ?, ?, ?, ?)",
        )
        .bind(&m.appid)
        .bind(&m.name)
        .bind(&m.notify_url)
        .bind(m.appsecret_hash.as_str())
        .bind(&m.appsecret_enc)
        .bind(created_at_ms)
        .execute(&self.pool)
        .await
        .map_err(|e| insert_error(e, "merchant"))?;
        Ok(Merchant {
            appid: m.appid,
            name: m.name,
            notify_url: m.notify_url,
            appsecret_hash: m.appsecret_hash,
            appsecret_enc: m.appsecret_enc,
            previous_appsecret: None,
            created_at: from_ms(created_at_ms, "merchants.created_at_ms")?,
            disabled_at: None,
        })
    }

    async fn merchant(&self, appid: &str) -> Result<Option<Merchant>, StorageError> {
        if let Some(m) = self.merchants.get(appid) {
            if m.1.elapsed() < MERCHANT_CACHE_TTL {
                return Ok(Some(m.0.clone()));
            }
        }
        let found = sqlx::query_as::<_, MerchantRow>(
            "SELECT appid, name, notify_url, appsecret_hash, appsecret_enc, created_at_ms, \
             prev_appsecret_hash, prev_appsecret_expires_ms, disabled_at_ms \
             FROM merchants WHERE appid = ?",
        )
        .bind(appid)
        .fetch_optional(&self.pool)
        .await
        .map_err(backend)?
        .map(MerchantRow::into_merchant)
        .transpose()?;
        match &found {
            Some(m) => {
                self.merchants
                    .insert(m.appid.clone(), (m.clone(), Instant::now()));
            }
            None => {
                self.merchants.remove(appid);
            }
        }
        Ok(found)
    }

    async fn set_notify_url(&self, appid: &str, url: Option<&str>) -> Result<bool, StorageError> {
        let done = sqlx::query("UPDATE merchants SET notify_url = ? WHERE appid = ?")
            .bind(url)
            .bind(appid)
            .execute(&self.pool)
            .await
            .map_err(backend)?;
        // This process sees the change at once; others within the TTL.
        self.merchants.remove(appid);
        Ok(done.rows_affected() == 1)
    }

    async fn list_merchants(&self) -> Result<Vec<Merchant>, StorageError> {
        sqlx::query_as::<_, MerchantRow>(
            "SELECT appid, name, notify_url, appsecret_hash, appsecret_enc, created_at_ms, \
             prev_appsecret_hash, prev_appsecret_expires_ms, disabled_at_ms \
             FROM merchants ORDER BY appid",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(backend)?
        .into_iter()
        .map(MerchantRow::into_merchant)
        .collect()
    }

    async fn create_machine(&self, m: NewMachine) -> Result<Machine, StorageError> {
        let created_at_ms = now_ms();
        sqlx::query(INSERT_MACHINE)
            .bind(m.machine_no.as_str())
            .bind(&m.merchant_appid)
            .bind(m.secret_hash.as_str())
            .bind(created_at_ms)
            .execute(&self.pool)
            .await
            .map_err(|e| insert_error(e, "machine"))?;
        Ok(Machine {
            machine_no: m.machine_no,
            merchant_appid: m.merchant_appid,
            secret_hash: m.secret_hash,
            previous_secret: None,
            online: false,
            last_seen: None,
            online_since: None,
            created_at: from_ms(created_at_ms, "machines.created_at_ms")?,
            disabled_at: None,
            removed_at: None,
        })
    }

    async fn create_machines(&self, ms: Vec<NewMachine>) -> Result<(), StorageError> {
        let created_at_ms = now_ms();
        // IMMEDIATE takes the write lock up front (waiting out other writers
        // under the busy timeout) instead of failing half-way on upgrade.
        let mut tx = self
            .pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(backend)?;
        // Multi-row INSERTs of BULK_ROWS rows: every full chunk has the same
        // SQL text, so sqlx prepares it once per connection and reuses it,
        // and there are 20 round trips to the SQLite worker thread per
        // 10,000 machines instead of 10,000 (measured ~20x faster). On any
        // error `tx` is dropped and rolls back, so nothing of the batch stays.
        for chunk in ms.chunks(BULK_ROWS) {
            let mut insert = sqlx::QueryBuilder::<sqlx::Sqlite>::new(
                "INSERT INTO machines (machine_no, merchant_appid, secret_hash, created_at_ms) ",
            );
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
                .map_err(|e| insert_error(e, "machine"))?;
        }
        tx.commit().await.map_err(backend)
    }

    async fn machine(&self, m: &MachineNo) -> Result<Option<Machine>, StorageError> {
        sqlx::query_as::<_, MachineRow>(
            "SELECT machine_no, merchant_appid, secret_hash, online, last_seen_ms, \
             online_since_ms, created_at_ms, prev_secret_hash, prev_secret_expires_ms, disabled_at_ms, removed_at_ms FROM machines WHERE machine_no = ?",
        )
        .bind(m.as_str())
        .fetch_optional(&self.pool)
        .await
        .map_err(backend)?
        .map(MachineRow::into_machine)
        .transpose()
    }

    async fn rotate_machine_secret(
        &self,
        m: &MachineNo,
        new_hash: &SecretHash,
        previous_until: Option<DateTime<Utc>>,
    ) -> Result<bool, StorageError> {
        // Right-hand sides of an UPDATE see the row as it was, so the old
        // `secret_hash` moves to `prev_secret_hash` while the new one lands.
        let done = sqlx::query(
            "UPDATE machines SET \
             prev_secret_hash = CASE WHEN ?2 IS NULL THEN NULL ELSE secret_hash END, \
             prev_secret_expires_ms = ?2, secret_hash = ?1 WHERE machine_no = ?3",
        )
        .bind(new_hash.as_str())
        .bind(previous_until.map(|t| t.timestamp_millis()))
        .bind(m.as_str())
        .execute(&self.pool)
        .await
        .map_err(backend)?;
        Ok(done.rows_affected() == 1)
    }

    async fn rotate_merchant_secret(
        &self,
        appid: &str,
        new_hash: &SecretHash,
        new_enc: &str,
        previous_until: Option<DateTime<Utc>>,
    ) -> Result<bool, StorageError> {
        // One statement: API authentication and webhook signing switch to the
        // new AppSecret in the same commit.
        let done = sqlx::query(
            "UPDATE merchants SET \
             prev_appsecret_hash = CASE WHEN ?2 IS NULL THEN NULL ELSE appsecret_hash END, \
             prev_appsecret_expires_ms = ?2, appsecret_hash = ?1, appsecret_enc = ?3 \
             WHERE appid = ?4",
        )
        .bind(new_hash.as_str())
        .bind(previous_until.map(|t| t.timestamp_millis()))
        .bind(new_enc)
        .bind(appid)
        .execute(&self.pool)
        .await
        .map_err(backend)?;
        // This process sees its own rotation at once; others within the TTL.
        self.merchants.remove(appid);
        Ok(done.rows_affected() == 1)
    }

    async fn list_machines(&self, merchant: Option<&str>) -> Result<Vec<Machine>, StorageError> {
        // Two statements rather than `? IS NULL OR ...` so that the merchant
        // filter can use the machines_by_merchant index.
        let query = match merchant {
            Some(appid) => sqlx::query_as::<_, MachineRow>(
                "SELECT machine_no, merchant_appid, secret_hash, online, last_seen_ms, \
                 online_since_ms, created_at_ms, prev_secret_hash, prev_secret_expires_ms, disabled_at_ms, removed_at_ms FROM machines WHERE merchant_appid = ? \
                 ORDER BY machine_no",
            )
            .bind(appid),
            None => sqlx::query_as::<_, MachineRow>(
                "SELECT machine_no, merchant_appid, secret_hash, online, last_seen_ms, \
                 online_since_ms, created_at_ms, prev_secret_hash, prev_secret_expires_ms, disabled_at_ms, removed_at_ms FROM machines ORDER BY machine_no",
            ),
        };
        query
            .fetch_all(&self.pool)
            .await
            .map_err(backend)?
            .into_iter()
            .map(MachineRow::into_machine)
            .collect()
    }

    async fn create_service(&self, s: NewService) -> Result<ServiceAccount, StorageError> {
        let created_at_ms = now_ms();
        sqlx::query(
            "INSERT INTO services (username, name, password_hash, created_at_ms) \
             VALUES (?, ?, ?, ?)",
        )
        .bind(&s.username)
        .bind(&s.name)
        .bind(s.password_hash.as_str())
        .bind(created_at_ms)
        .execute(&self.pool)
        .await
        .map_err(|e| insert_error(e, "service"))?;
        Ok(ServiceAccount {
            username: s.username,
            name: s.name,
            password_hash: s.password_hash,
            created_at: from_ms(created_at_ms, "services.created_at_ms")?,
        })
    }

    async fn service(&self, username: &str) -> Result<Option<ServiceAccount>, StorageError> {
        sqlx::query_as::<_, ServiceRow>(
            "SELECT username, name, password_hash, created_at_ms FROM services WHERE username = ?",
        )
        .bind(username)
        .fetch_optional(&self.pool)
        .await
        .map_err(backend)?
        .map(ServiceRow::into_service)
        .transpose()
    }

    async fn record_presence(
        &self,
        m: &MachineNo,
        online: bool,
        epoch: u64,
        at: DateTime<Utc>,
    ) -> Result<(), StorageError> {
        self.record_presence_batch(&[PresenceWrite {
            machine_no: *m,
            online,
            epoch,
            at,
        }])
        .await
    }

    async fn record_presence_batch(&self, batch: &[PresenceWrite]) -> Result<(), StorageError> {
        // One transaction (one fsync) for the whole batch: a reconnect storm
        // of 10,000 machines is a handful of commits, not 10,000.
        let mut tx = self.pool.begin().await.map_err(backend)?;
        for w in batch {
            write_presence(&mut tx, w).await?;
        }
        tx.commit().await.map_err(backend)
    }

    async fn reset_presence(&self) -> Result<(), StorageError> {
        sqlx::query(
            "UPDATE machines SET online = 0, online_since_ms = NULL, presence_epoch = 0 \
             WHERE online <> 0 OR presence_epoch <> 0",
        )
        .execute(&self.pool)
        .await
        .map_err(backend)?;
        Ok(())
    }

    async fn ping(&self) -> Result<(), StorageError> {
        // Taking the write lock proves the file is open, writable (not
        // read-only, not held by another writer beyond the busy timeout)
        // without writing anything. A full disk is not detected this way.
        let tx = self
            .pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(backend)?;
        tx.rollback().await.map_err(backend)
    }

    async fn close(&self) {
        // Writes queued before the close still commit.
        self.writer.close().await;
        self.pool.close().await;
    }
}

/// One presence write inside the caller's transaction, with the epoch rule
/// of [`Storage::record_presence`].
pub(super) async fn write_presence(
    tx: &mut sqlx::Transaction<'_, sqlx::Sqlite>,
    w: &PresenceWrite,
) -> Result<(), StorageError> {
    let epoch = presence_epoch(w)?;
    // The `presence_epoch <= ?` guard drops stale writes in the
    // database itself, so the check and the write are one atomic
    // statement even with several writers. In SET, every right-hand
    // side sees the old row.
    let sql = if w.online {
        // A repeated online write of the same connection (a resync)
        // keeps its online_since; a new connection starts it afresh.
        "UPDATE machines SET \
             online_since_ms = CASE WHEN online = 1 AND presence_epoch = ?2 \
                               THEN online_since_ms ELSE ?3 END, \
             online = 1, presence_epoch = ?2, last_seen_ms = ?3 \
         WHERE machine_no = ?1 AND presence_epoch <= ?2"
    } else {
        "UPDATE machines SET \
             online = 0, online_since_ms = NULL, presence_epoch = ?2, last_seen_ms = ?3 \
         WHERE machine_no = ?1 AND presence_epoch <= ?2"
    };
    sqlx::query(sql)
        .bind(w.machine_no.as_str())
        .bind(epoch)
        .bind(w.at.timestamp_millis())
        .execute(&mut **tx)
        .await
        .map_err(backend)?;
    Ok(())
}

/// Epochs are microsecond wall-clock seeds (see presence.rs), far below
/// i64::MAX; a larger one cannot be stored in an INTEGER column.
pub(super) fn presence_epoch(w: &PresenceWrite) -> Result<i64, StorageError> {
    i64::try_from(w.epoch).map_err(|_| {
        StorageError::Backend(format!("presence epoch {} exceeds i64", w.epoch).into())
    })
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
    Busy(sqlx::Error),
    Other(StorageError),
}

impl From<sqlx::Error> for OpenError {
    fn from(e: sqlx::Error) -> Self {
        let busy = matches!(&e, sqlx::Error::Database(db)
            if matches!(db.code().as_deref(), Some("5" | "6" | "517" | "261")));
        if busy {
            Self::Busy(e)
        } else {
            Self::Other(backend(e))
        }
    }
}

/// Rows per multi-row INSERT in bulk provisioning: 4 bound values each, far
/// below SQLite's limit of 32,766 variables per statement.
const BULK_ROWS: usize = 500;

const INSERT_MACHINE: &str = "INSERT INTO machines \
     (machine_no, merchant_appid, secret_hash, created_at_ms) VALUES (?, ?, ?, ?)";

/// A `merchants` row; decodes from either backend (no flag columns).
#[derive(sqlx::FromRow)]
pub(super) struct MerchantRow {
    appid: String,
    name: String,
    notify_url: Option<String>,
    appsecret_hash: String,
    appsecret_enc: Option<String>,
    created_at_ms: i64,
    prev_appsecret_hash: Option<String>,
    prev_appsecret_expires_ms: Option<i64>,
    disabled_at_ms: Option<i64>,
}

impl MerchantRow {
    pub(super) fn into_merchant(self) -> Result<Merchant, StorageError> {
        let previous_appsecret = previous(
            self.prev_appsecret_hash.as_deref(),
            self.prev_appsecret_expires_ms,
            "merchants.prev_appsecret_hash",
            &self.appid,
        )?;
        Ok(Merchant {
            previous_appsecret,
            appsecret_hash: parse_hash(
                &self.appsecret_hash,
                "merchants.appsecret_hash",
                &self.appid,
            )?,
            created_at: from_ms(self.created_at_ms, "merchants.created_at_ms")?,
            disabled_at: opt_from_ms(self.disabled_at_ms, "merchants.disabled_at_ms")?,
            appid: self.appid,
            name: self.name,
            notify_url: self.notify_url,
            appsecret_enc: self.appsecret_enc,
        })
    }
}

/// A `machines` row; `online` is 0/1 (PostgreSQL selects its BOOLEAN as
/// an integer to share this type).
#[derive(sqlx::FromRow)]
pub(super) struct MachineRow {
    machine_no: String,
    merchant_appid: String,
    secret_hash: String,
    online: i64,
    last_seen_ms: Option<i64>,
    online_since_ms: Option<i64>,
    created_at_ms: i64,
    prev_secret_hash: Option<String>,
    prev_secret_expires_ms: Option<i64>,
    disabled_at_ms: Option<i64>,
    removed_at_ms: Option<i64>,
}

impl MachineRow {
    pub(super) fn into_machine(self) -> Result<Machine, StorageError> {
        let machine_no = self.machine_no.parse::<MachineNo>().map_err(|_| {
            StorageError::Corrupt(format!(
                "machines.machine_no {:?} is not a machine number",
                self.machine_no
            ))
        })?;
        Ok(Machine {
            secret_hash: parse_hash(
                &self.secret_hash,
                "machines.secret_hash",
                machine_no.as_str(),
            )?,
            previous_secret: previous(
                self.prev_secret_hash.as_deref(),
                self.prev_secret_expires_ms,
                "machines.prev_secret_hash",
                machine_no.as_str(),
            )?,
            online: self.online != 0,
            last_seen: self
                .last_seen_ms
                .map(|ms| from_ms(ms, "machines.last_seen_ms"))
                .transpose()?,
            online_since: self
                .online_since_ms
                .map(|ms| from_ms(ms, "machines.online_since_ms"))
                .transpose()?,
            created_at: from_ms(self.created_at_ms, "machines.created_at_ms")?,
            disabled_at: opt_from_ms(self.disabled_at_ms, "machines.disabled_at_ms")?,
            removed_at: opt_from_ms(self.removed_at_ms, "machines.removed_at_ms")?,
            machine_no,
            merchant_appid: self.merchant_appid,
        })
    }
}

/// A `services` row; decodes from either backend.
#[derive(sqlx::FromRow)]
pub(super) struct ServiceRow {
    username: String,
    name: String,
    password_hash: String,
    created_at_ms: i64,
}

impl ServiceRow {
    pub(super) fn into_service(self) -> Result<ServiceAccount, StorageError> {
        Ok(ServiceAccount {
            password_hash: parse_hash(
                &self.password_hash,
                "services.password_hash",
                &self.username,
            )?,
            created_at: from_ms(self.created_at_ms, "services.created_at_ms")?,
            username: self.username,
            name: self.name,
        })
    }
}

pub(super) fn now_ms() -> i64 {
    Utc::now().timestamp_millis()
}

pub(super) fn from_ms(ms: i64, column: &str) -> Result<DateTime<Utc>, StorageError> {
    DateTime::from_timestamp_millis(ms)
        .ok_or_else(|| StorageError::Corrupt(format!("{column} {ms} is out of range")))
}

pub(super) fn opt_from_ms(
    ms: Option<i64>,
    column: &str,
) -> Result<Option<DateTime<Utc>>, StorageError> {
    ms.map(|ms| from_ms(ms, column)).transpose()
}

/// `key` names the row; the stored value is not repeated in the message.
fn parse_hash(stored: &str, column: &str, key: &str) -> Result<SecretHash, StorageError> {
    SecretHash::parse(stored)
        .map_err(|e| StorageError::Corrupt(format!("{column} of {key:?}: {e}")))
}

/// The previous secret of a rotation; both columns are written together, so
/// only one of them set is corrupt.
fn previous(
    hash: Option<&str>,
    expires_ms: Option<i64>,
    column: &str,
    key: &str,
) -> Result<Option<PreviousSecret>, StorageError> {
    match (hash, expires_ms) {
        (None, None) => Ok(None),
        (Some(h), Some(ms)) => Ok(Some(PreviousSecret {
            hash: parse_hash(h, column, key)?,
            expires_at: from_ms(ms, column)?,
        })),
        _ => Err(StorageError::Corrupt(format!(
            "{column} of {key:?}: hash and expiry must be set together"
        ))),
    }
}

pub(super) fn backend(e: impl std::error::Error + Send + Sync + 'static) -> StorageError {
    StorageError::Backend(Box::new(e))
}

/// Constraint violations of an INSERT become the typed errors callers act on;
/// the only foreign key we have (machines.merchant_appid) means an unknown
/// merchant.
fn insert_error(e: sqlx::Error, what: &'static str) -> StorageError {
    if let sqlx::Error::Database(db) = &e {
        match db.kind() {
            ErrorKind::UniqueViolation => return StorageError::Duplicate(what),
            ErrorKind::ForeignKeyViolation => return StorageError::UnknownMerchant,
            _ => {}
        }
    }
    backend(e)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Instant;

    use chrono::TimeZone;
    use tempfile::TempDir;

    use super::*;
    use crate::storage::open_sqlite;

    async fn open() -> (TempDir, Arc<dyn Storage>) {
        let dir = tempfile::tempdir().unwrap();
        let store = open_sqlite(&dir.path().join("vendgate.db")).await.unwrap();
        (dir, store)
    }

    fn no(s: &str) -> MachineNo {
        s.parse().unwrap()
    }

    fn t(ms: i64) -> DateTime<Utc> {
        Utc.timestamp_millis_opt(ms).unwrap()
    }

    async fn merchant(store: &dyn Storage, appid: &str) -> Merchant {
        store
            .create_merchant(NewMerchant {
                name: format!("merchant {appid}"),
                notify_url: Some("https://hooks.example/n".into()),
                appid: appid.into(),
                appsecret_hash: SecretHash::new("appsecret"),
                appsecret_enc: Some(format!("enc-{appid}")),
            })
            .await
            .unwrap()
    }

    fn new_machine(m: &str, merchant: &str) -> NewMachine {
        NewMachine {
            machine_no: no(m),
            merchant_appid: merchant.into(),
            secret_hash: SecretHash::new(&format!("secret-{m}")),
        }
    }

    #[tokio::test]
    async fn open_creates_parent_directories_and_reopens() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a/b/vendgate.db");
        let store = open_sqlite(&path).await.unwrap();
        merchant(store.as_ref(), "vgone").await;
        store.close().await;
        assert!(path.exists());
        // Reopening runs the migrations again as a no-op and keeps the data.
        let store = open_sqlite(&path).await.unwrap();
        assert!(store.merchant("vgone").await.unwrap().is_some());
    }

    #[tokio::test]
    async fn connection_settings() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStorage::open(&dir.path().join("x.db")).await.unwrap();
        let mut conn = store.pool().acquire().await.unwrap();
        let mode: String = sqlx::query_scalar("PRAGMA journal_mode")
            .fetch_one(&mut *conn)
            .await
            .unwrap();
        assert_eq!(mode, "wal");
        let sync: i64 = sqlx::query_scalar("PRAGMA synchronous")
            .fetch_one(&mut *conn)
            .await
            .unwrap();
        assert_eq!(sync, 2, "FULL");
        let fk: i64 = sqlx::query_scalar("PRAGMA foreign_keys")
            .fetch_one(&mut *conn)
            .await
            .unwrap();
        assert_eq!(fk, 1);
        let busy: i64 = sqlx::query_scalar("PRAGMA busy_timeout")
            .fetch_one(&mut *conn)
            .await
            .unwrap();
        assert_eq!(busy, 5000);
    }

    #[tokio::test]
    async fn merchant_round_trip() {
        let (_dir, store) = open().await;
        let created = merchant(store.as_ref(), "vgb").await;
        merchant(store.as_ref(), "vga").await;
        let read = store.merchant("vgb").await.unwrap().unwrap();
        assert_eq!(read.appid, "vgb");
        assert_eq!(read.name, "merchant vgb");
        assert_eq!(read.notify_url.as_deref(), Some("https://hooks.example/n"));
        assert_eq!(read.created_at, created.created_at);
        assert_eq!(
            read.appsecret_hash.as_str(),
            created.appsecret_hash.as_str()
        );
        assert!(read.appsecret_hash.verify("appsecret"));
        assert!(store.merchant("vgc").await.unwrap().is_none());
        let all: Vec<String> = store
            .list_merchants()
            .await
            .unwrap()
            .into_iter()
            .map(|m| m.appid)
            .collect();
        assert_eq!(all, ["vga", "vgb"]);
        // No notify_url round-trips as None.
        store
            .create_merchant(NewMerchant {
                name: "n".into(),
                notify_url: None,
                appid: "vgn".into(),
                appsecret_hash: SecretHash::new("s"),
                appsecret_enc: None,
            })
            .await
            .unwrap();
        assert!(store
            .merchant("vgn")
            .await
            .unwrap()
            .unwrap()
            .notify_url
            .is_none());
    }

    #[tokio::test]
    async fn duplicate_merchant() {
        let (_dir, store) = open().await;
        merchant(store.as_ref(), "vga").await;
        let err = store
            .create_merchant(NewMerchant {
                name: "again".into(),
                notify_url: None,
                appid: "vga".into(),
                appsecret_hash: SecretHash::new("x"),
                appsecret_enc: None,
            })
            .await
            .unwrap_err();
        assert!(
            matches!(err, StorageError::Duplicate("merchant")),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn machine_round_trip_and_listing() {
        let (_dir, store) = open().await;
        merchant(store.as_ref(), "vga").await;
        merchant(store.as_ref(), "vgb").await;
        let created = store
            .create_machine(new_machine("00000002", "vga"))
            .await
            .unwrap();
        assert!(!created.online);
        store
            .create_machine(new_machine("00000001", "vgb"))
            .await
            .unwrap();
        store
            .create_machine(new_machine("00000010", "vga"))
            .await
            .unwrap();

        let read = store.machine(&no("00000002")).await.unwrap().unwrap();
        assert_eq!(read.machine_no, no("00000002"));
        assert_eq!(read.merchant_appid, "vga");
        assert!(read.secret_hash.verify("secret-00000002"));
        assert!(!read.online);
        assert!(read.last_seen.is_none() && read.online_since.is_none());
        assert_eq!(read.created_at, created.created_at);
        assert!(store.machine(&no("00000003")).await.unwrap().is_none());

        let all: Vec<String> = store
            .list_machines(None)
            .await
            .unwrap()
            .iter()
            .map(|m| m.machine_no.to_string())
            .collect();
        assert_eq!(all, ["00000001", "00000002", "00000010"]);
        let a: Vec<String> = store
            .list_machines(Some("vga"))
            .await
            .unwrap()
            .iter()
            .map(|m| m.machine_no.to_string())
            .collect();
        assert_eq!(a, ["00000002", "00000010"]);
        assert!(store.list_machines(Some("vgz")).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn machine_errors() {
        let (_dir, store) = open().await;
        let err = store
            .create_machine(new_machine("00000001", "vgnope"))
            .await
            .unwrap_err();
        assert!(matches!(err, StorageError::UnknownMerchant), "{err:?}");

        merchant(store.as_ref(), "vga").await;
        merchant(store.as_ref(), "vgb").await;
        store
            .create_machine(new_machine("00000001", "vga"))
            .await
            .unwrap();
        // Taken, whichever merchant asks.
        for owner in ["vga", "vgb"] {
            let err = store
                .create_machine(new_machine("00000001", owner))
                .await
                .unwrap_err();
            assert!(matches!(err, StorageError::Duplicate("machine")), "{err:?}");
        }
    }

    #[tokio::test]
    async fn bulk_insert_of_10000_in_one_transaction() {
        let (_dir, store) = open().await;
        merchant(store.as_ref(), "vga").await;
        let ms: Vec<NewMachine> = (1..=10_000)
            .map(|n| NewMachine {
                machine_no: MachineNo::from_u32(n).unwrap(),
                merchant_appid: "vga".into(),
                secret_hash: SecretHash::new(&crate::secrets::generate_secret()),
            })
            .collect();
        let started = Instant::now();
        store.create_machines(ms).await.unwrap();
        let took = started.elapsed();
        eprintln!("bulk insert of 10000 machines took {took:?}");
        assert!(took < Duration::from_secs(5), "{took:?}");
        let all = store.list_machines(Some("vga")).await.unwrap();
        assert_eq!(all.len(), 10_000);
        assert_eq!(all[0].machine_no.as_str(), "00000001");
        assert_eq!(all[9_999].machine_no.as_str(), "00010000");
    }

    #[tokio::test]
    async fn bulk_insert_is_all_or_nothing() {
        let (_dir, store) = open().await;
        merchant(store.as_ref(), "vga").await;
        store
            .create_machine(new_machine("00000500", "vga"))
            .await
            .unwrap();

        // Clashes with a stored machine half-way through.
        let ms: Vec<NewMachine> = (1..=1000)
            .map(|n| new_machine(MachineNo::from_u32(n).unwrap().as_str(), "vga"))
            .collect();
        let err = store.create_machines(ms).await.unwrap_err();
        assert!(matches!(err, StorageError::Duplicate("machine")), "{err:?}");
        assert_eq!(store.list_machines(None).await.unwrap().len(), 1);

        // Repeats a number within the batch.
        let ms = vec![
            new_machine("00000001", "vga"),
            new_machine("00000002", "vga"),
            new_machine("00000001", "vga"),
        ];
        let err = store.create_machines(ms).await.unwrap_err();
        assert!(matches!(err, StorageError::Duplicate("machine")), "{err:?}");

        // Unknown merchant at the end.
        let ms = vec![
            new_machine("00000001", "vga"),
            new_machine("00000002", "vgnope"),
        ];
        let err = store.create_machines(ms).await.unwrap_err();
        assert!(matches!(err, StorageError::UnknownMerchant), "{err:?}");
        assert_eq!(store.list_machines(None).await.unwrap().len(), 1);

        // The pool is still usable after the rolled-back transactions.
        store
            .create_machines(vec![new_machine("00000001", "vga")])
            .await
            .unwrap();
        store.create_machines(Vec::new()).await.unwrap();
        assert_eq!(store.list_machines(None).await.unwrap().len(), 2);
    }

    #[tokio::test]
    async fn service_round_trip_and_duplicate() {
        let (_dir, store) = open().await;
        let created = store
            .create_service(NewService {
                name: "billing".into(),
                username: "svc-abc".into(),
                password_hash: SecretHash::new("pw"),
            })
            .await
            .unwrap();
        let read = store.service("svc-abc").await.unwrap().unwrap();
        assert_eq!(read.username, "svc-abc");
        assert_eq!(read.name, "billing");
        assert_eq!(read.created_at, created.created_at);
        assert!(read.password_hash.verify("pw"));
        assert!(store.service("svc-nope").await.unwrap().is_none());
        let err = store
            .create_service(NewService {
                name: "other".into(),
                username: "svc-abc".into(),
                password_hash: SecretHash::new("pw2"),
            })
            .await
            .unwrap_err();
        assert!(matches!(err, StorageError::Duplicate("service")), "{err:?}");
    }

    #[tokio::test]
    async fn record_presence_epoch_guard() {
        let (_dir, store) = open().await;
        merchant(store.as_ref(), "vga").await;
        store
            .create_machine(new_machine("00000001", "vga"))
            .await
            .unwrap();
        let m = no("00000001");
        let state = |s: &Arc<dyn Storage>| {
            let s = s.clone();
            async move {
                let r = s.machine(&no("00000001")).await.unwrap().unwrap();
                (r.online, r.online_since, r.last_seen)
            }
        };

        // Connection with epoch 10 comes online.
        store.record_presence(&m, true, 10, t(1_000)).await.unwrap();
        assert_eq!(state(&store).await, (true, Some(t(1_000)), Some(t(1_000))));

        // The same connection re-announced (resync): online_since is kept.
        store.record_presence(&m, true, 10, t(1_500)).await.unwrap();
        assert_eq!(state(&store).await, (true, Some(t(1_000)), Some(t(1_500))));

        // Take-over by epoch 11, then the late close of epoch 10: ignored.
        store.record_presence(&m, true, 11, t(2_000)).await.unwrap();
        store
            .record_presence(&m, false, 10, t(2_001))
            .await
            .unwrap();
        assert_eq!(state(&store).await, (true, Some(t(2_000)), Some(t(2_000))));

        // A stale online write is ignored too.
        store.record_presence(&m, true, 9, t(2_002)).await.unwrap();
        assert_eq!(state(&store).await, (true, Some(t(2_000)), Some(t(2_000))));

        // The current connection closes: offline wins.
        store
            .record_presence(&m, false, 11, t(3_000))
            .await
            .unwrap();
        assert_eq!(state(&store).await, (false, None, Some(t(3_000))));

        // A newer connection wins again.
        store.record_presence(&m, true, 12, t(4_000)).await.unwrap();
        assert_eq!(state(&store).await, (true, Some(t(4_000)), Some(t(4_000))));

        // An offline write with a newer epoch than stored also wins.
        store
            .record_presence(&m, false, 13, t(5_000))
            .await
            .unwrap();
        assert_eq!(state(&store).await, (false, None, Some(t(5_000))));

        // Unknown machines are ignored; epochs beyond i64 are refused.
        store
            .record_presence(&no("99999999"), true, 1, t(1))
            .await
            .unwrap();
        assert!(store.machine(&no("99999999")).await.unwrap().is_none());
        assert!(store
            .record_presence(&m, true, u64::MAX, t(1))
            .await
            .is_err());
    }

    #[tokio::test]
    async fn reset_presence_marks_everything_offline_and_resets_epochs() {
        let (_dir, store) = open().await;
        merchant(store.as_ref(), "vga").await;
        for m in ["00000001", "00000002"] {
            store.create_machine(new_machine(m, "vga")).await.unwrap();
        }
        // Epochs of a process whose clock was ahead.
        store
            .record_presence(&no("00000001"), true, 1_000_000, t(1_000))
            .await
            .unwrap();
        store
            .record_presence(&no("00000002"), true, 2_000_000, t(2_000))
            .await
            .unwrap();

        store.reset_presence().await.unwrap();
        for m in store.list_machines(None).await.unwrap() {
            assert!(!m.online, "{}", m.machine_no);
            assert!(m.online_since.is_none());
            assert!(m.last_seen.is_some(), "last_seen is history, kept");
        }
        // The next process's epochs win even if smaller than the old ones.
        store
            .record_presence(&no("00000001"), true, 5, t(3_000))
            .await
            .unwrap();
        assert!(
            store
                .machine(&no("00000001"))
                .await
                .unwrap()
                .unwrap()
                .online
        );
    }

    #[tokio::test]
    async fn ping_and_close() {
        let (_dir, store) = open().await;
        store.ping().await.unwrap();
        store.close().await;
        assert!(matches!(store.ping().await, Err(StorageError::Backend(_))));
    }

    #[tokio::test]
    async fn two_pools_on_one_file_see_each_other() {
        // The running gateway and a CLI process, each with its own pool.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("shared.db");
        let (gateway, cli) = tokio::join!(open_sqlite(&path), open_sqlite(&path));
        let (gateway, cli) = (gateway.unwrap(), cli.unwrap());

        merchant(cli.as_ref(), "vga").await;
        cli.create_machine(new_machine("00000001", "vga"))
            .await
            .unwrap();
        let seen = gateway.machine(&no("00000001")).await.unwrap().unwrap();
        assert!(seen.secret_hash.verify("secret-00000001"));

        gateway
            .record_presence(&no("00000001"), true, 1, t(1_000))
            .await
            .unwrap();
        assert!(cli.machine(&no("00000001")).await.unwrap().unwrap().online);

        // Concurrent writers from both pools queue on the lock instead of failing.
        let a = {
            let s = gateway.clone();
            tokio::spawn(async move {
                for e in 2..200u64 {
                    s.record_presence(&no("00000001"), e % 2 == 0, e, t(1_000 + e as i64))
                        .await
                        .unwrap();
                }
            })
        };
        let b = {
            let s = cli.clone();
            tokio::spawn(async move {
                let ms: Vec<NewMachine> = (100..1100)
                    .map(|n| new_machine(MachineNo::from_u32(n).unwrap().as_str(), "vga"))
                    .collect();
                s.create_machines(ms).await.unwrap();
                s.ping().await.unwrap();
            })
        };
        a.await.unwrap();
        b.await.unwrap();
        assert_eq!(gateway.list_machines(None).await.unwrap().len(), 1001);
        let m = cli.machine(&no("00000001")).await.unwrap().unwrap();
        assert!(!m.online, "epoch 199 (odd) was an offline write");
        assert_eq!(m.last_seen, Some(t(1_199)));
    }

    #[tokio::test]
    async fn concurrent_first_opens_of_a_fresh_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fresh.db");
        let opens = (0..6).map(|_| {
            let path = path.clone();
            tokio::spawn(async move { SqliteStorage::open(&path).await })
        });
        for o in opens.collect::<Vec<_>>() {
            o.await.unwrap().unwrap();
        }
    }

    #[tokio::test]
    async fn corrupt_rows_are_reported_not_panicked_on() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStorage::open(&dir.path().join("x.db")).await.unwrap();
        merchant(&store, "vga").await;
        store
            .create_machine(new_machine("00000001", "vga"))
            .await
            .unwrap();
        sqlx::query("UPDATE machines SET secret_hash = 'plaintext!'")
            .execute(store.pool())
            .await
            .unwrap();
        let err = store.machine(&no("00000001")).await.unwrap_err();
        match err {
            StorageError::Corrupt(msg) => {
                assert!(msg.contains("machines.secret_hash"), "{msg}");
                assert!(!msg.contains("plaintext!"), "{msg}");
            }
            e => panic!("{e:?}"),
        }
    }

    // ClusterStorage: tests/tests/storage_contract.rs, against both backends.
}
