//! The PostgreSQL implementation of [`Storage`]: one database shared by every
//! gateway node of a cluster and the `vendgate` CLI.
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

use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use dashmap::DashMap;
use sqlx::error::ErrorKind;
use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool, PgPoolOptions};
use sqlx::{Connection, Row};
use vendgate_proto::machine::MachineNo;

use super::sqlite::{
    backend, from_ms, now_ms, presence_epoch, MachineRow, MerchantRow, ServiceRow,
};
use super::{
    Machine, Merchant, NewMachine, NewMerchant, NewService, PresenceWrite, ServiceAccount, Storage,
    StorageError,
};
use crate::config::DatabaseSettings;
use crate::secrets::SecretHash;

/// Schema migrations, embedded at compile time.
static MIGRATOR: Migrator = sqlx::migrate!("migrations/postgres");

/// How long a cached merchant row is trusted (as in the SQLite backend).
const MERCHANT_CACHE_TTL: Duration = Duration::from_secs(1);

/// Machine columns as [`MachineRow`] decodes them (`online` as 0/1).
pub(super) const MACHINE_COLUMNS: &str = "machine_no, merchant_appid, secret_hash, \
     (online::int)::bigint AS online, last_seen_ms, online_since_ms, created_at_ms, \
     prev_secret_hash, prev_secret_expires_ms, disabled_at_ms, removed_at_ms";

const MERCHANT_COLUMNS: &str = "appid, name, notify_url, appsecret_hash, appsecret_enc, \
     created_at_ms, prev_appsecret_hash, prev_appsecret_expires_ms, disabled_at_ms";

/// A pool of connections to one PostgreSQL database.
#[derive(Debug, Clone)]
pub struct PgStorage {
    pool: PgPool,
    /// Merchants by appid with the time they were read: API authentication
    /// reads one per request; a rotation (maybe by the CLI, maybe on another
    /// node) reaches this process within [`MERCHANT_CACHE_TTL`].
    merchants: Arc<DashMap<String, (Merchant, Instant)>>,
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
            pool,
            merchants: Arc::new(DashMap::new()),
        })
    }

    /// The underlying pool, for backend-specific tools and tests.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Drop a cached merchant after this process changed its row.
    pub(super) fn forget_merchant(&self, appid: &str) {
        self.merchants.remove(appid);
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

/// A unique key's constraint → what [`StorageError::Duplicate`] names.
fn duplicate_of(constraint: &str) -> Option<&'static str> {
    Some(match constraint {
        "merchants_pkey" => "merchant",
        "machines_pkey" => "machine",
        "services_pkey" => "service",
        "orders_pkey" => "order",
        "orders_out_trade_no" => "out_trade_no",
        _ => return None,
    })
}

/// sqlx errors as the backend-neutral errors callers act on. As in SQLite,
/// an order or machine that refers to a missing merchant (or an order to a
/// missing machine) is `UnknownMerchant`; any other violated constraint (an
/// outbox event id reused, an attempt for a missing event) is `Backend`.
pub(super) fn pg_error(e: sqlx::Error) -> StorageError {
    if let sqlx::Error::Database(db) = &e {
        match db.kind() {
            ErrorKind::UniqueViolation => {
                if let Some(what) = db.constraint().and_then(duplicate_of) {
                    return StorageError::Duplicate(what);
                }
            }
            ErrorKind::ForeignKeyViolation => {
                if matches!(
                    db.constraint(),
                    Some("machines_merchant_fkey" | "orders_merchant_fkey" | "orders_machine_fkey")
                ) {
                    return StorageError::UnknownMerchant;
                }
            }
            _ => {}
        }
    }
    backend(e)
}

/// The SET list and guard of a presence write ([`Storage::record_presence`]):
/// `$1` machine, `$2` epoch, `$3` at. The `presence_epoch <= $2` guard drops
/// stale writes in the statement itself; a writer that waited for the row's
/// lock re-checks it against the committed row. In SET, every right-hand
/// side sees the old row.
fn presence_sql(online: bool) -> &'static str {
    if online {
        // A repeated online write of the same connection (a resync) keeps
        // its online_since; a new connection starts it afresh.
        "UPDATE machines SET \
             online_since_ms = CASE WHEN online AND presence_epoch = $2 \
                               THEN online_since_ms ELSE $3 END, \
             online = true, presence_epoch = $2, last_seen_ms = $3 \
         WHERE machine_no = $1 AND presence_epoch <= $2"
    } else {
        "UPDATE machines SET \
             online = false, online_since_ms = NULL, presence_epoch = $2, last_seen_ms = $3 \
         WHERE machine_no = $1 AND presence_epoch <= $2"
    }
}

/// One presence write inside the caller's transaction.
pub(super) async fn write_presence(
    conn: &mut PgConnection,
    w: &PresenceWrite,
) -> Result<(), StorageError> {
    sqlx::query(presence_sql(w.online))
        .bind(w.machine_no.as_str())
        .bind(presence_epoch(w)?)
        .bind(w.at.timestamp_millis())
        .execute(&mut *conn)
        .await
        .map_err(pg_error)?;
    Ok(())
}

/// The presence write only if it applies and flips the stored flag, in one
/// statement; returns the machine's merchant when it did. Two nodes writing
/// the same flip: the second waits for the first's row lock, then finds the
/// flag already flipped, so exactly one of them sees the flip.
pub(super) async fn write_presence_if_flip(
    conn: &mut PgConnection,
    w: &PresenceWrite,
) -> Result<Option<String>, StorageError> {
    let sql = format!(
        "{} AND online <> $4 RETURNING merchant_appid",
        presence_sql(w.online)
    );
    sqlx::query_scalar(&sql)
        .bind(w.machine_no.as_str())
        .bind(presence_epoch(w)?)
        .bind(w.at.timestamp_millis())
        .bind(w.online)
        .fetch_optional(&mut *conn)
        .await
        .map_err(pg_error)
}

/// `batch` in machine_no order, each machine's writes in their given order
/// (a stable sort): the lock order that keeps concurrent batches from
/// deadlocking.
pub(super) fn by_machine<T: Clone>(batch: &[T], key: impl Fn(&T) -> &MachineNo) -> Vec<T> {
    let mut v = batch.to_vec();
    v.sort_by(|a, b| key(a).as_str().cmp(key(b).as_str()));
    v
}

#[async_trait::async_trait]
impl Storage for PgStorage {
    async fn create_merchant(&self, m: NewMerchant) -> Result<Merchant, StorageError> {
        let created_at_ms = now_ms();
        sqlx::query(
            "INSERT INTO merchants \
             (appid, name, notify_url, appsecret_hash, appsecret_enc, created_at_ms) \
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(&m.appid)
        .bind(&m.name)
        .bind(&m.notify_url)
        .bind(m.appsecret_hash.as_str())
        .bind(&m.appsecret_enc)
        .bind(created_at_ms)
        .execute(&self.pool)
        .await
        .map_err(pg_error)?;
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
        let found = sqlx::query_as::<_, MerchantRow>(&format!(
            "SELECT {MERCHANT_COLUMNS} FROM merchants WHERE appid = $1"
        ))
        .bind(appid)
        .fetch_optional(&self.pool)
        .await
        .map_err(pg_error)?
        .map(MerchantRow::into_merchant)
        .transpose()?;
        match &found {
            Some(m) => {
                self.merchants
                    .insert(m.appid.clone(), (m.clone(), Instant::now()));
            }
            // Misses are not cached: a merchant just created by the CLI is
            // found on its first request.
            None => {
                self.merchants.remove(appid);
            }
        }
        Ok(found)
    }

    async fn set_notify_url(&self, appid: &str, url: Option<&str>) -> Result<bool, StorageError> {
        let done = sqlx::query("UPDATE merchants SET notify_url = $1 WHERE appid = $2")
            .bind(url)
            .bind(appid)
            .execute(&self.pool)
            .await
            .map_err(pg_error)?;
        // This process sees the change at once; others within the TTL.
        self.merchants.remove(appid);
        Ok(done.rows_affected() == 1)
    }

    async fn list_merchants(&self) -> Result<Vec<Merchant>, StorageError> {
        sqlx::query_as::<_, MerchantRow>(&format!(
            "SELECT {MERCHANT_COLUMNS} FROM merchants ORDER BY appid"
        ))
        .fetch_all(&self.pool)
        .await
        .map_err(pg_error)?
        .into_iter()
        .map(MerchantRow::into_merchant)
        .collect()
    }

    async fn create_machine(&self, m: NewMachine) -> Result<Machine, StorageError> {
        let created_at_ms = now_ms();
        sqlx::query(
            "INSERT INTO machines (machine_no, merchant_appid, secret_hash, created_at_ms) \
             VALUES ($1, $2, $3, $4)",
        )
        .bind(m.machine_no.as_str())
        .bind(&m.merchant_appid)
        .bind(m.secret_hash.as_str())
        .bind(created_at_ms)
        .execute(&self.pool)
        .await
        .map_err(pg_error)?;
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
        if ms.is_empty() {
            return Ok(());
        }
        // One statement over arrays: one round trip for 10,000 machines, and
        // all or nothing by itself. A repeated machine_no within `ms`
        // violates machines_pkey like a stored one.
        let mut nos = Vec::with_capacity(ms.len());
        let mut owners = Vec::with_capacity(ms.len());
        let mut hashes = Vec::with_capacity(ms.len());
        for m in &ms {
            nos.push(m.machine_no.as_str().to_string());
            owners.push(m.merchant_appid.clone());
            hashes.push(m.secret_hash.as_str().to_string());
        }
        sqlx::query(
            "INSERT INTO machines (machine_no, merchant_appid, secret_hash, created_at_ms) \
             SELECT no, owner, hash, $4 FROM UNNEST($1::text[], $2::text[], $3::text[]) \
             AS t (no, owner, hash)",
        )
        .bind(&nos)
        .bind(&owners)
        .bind(&hashes)
        .bind(now_ms())
        .execute(&self.pool)
        .await
        .map_err(pg_error)?;
        Ok(())
    }

    async fn machine(&self, m: &MachineNo) -> Result<Option<Machine>, StorageError> {
        sqlx::query_as::<_, MachineRow>(&format!(
            "SELECT {MACHINE_COLUMNS} FROM machines WHERE machine_no = $1"
        ))
        .bind(m.as_str())
        .fetch_optional(&self.pool)
        .await
        .map_err(pg_error)?
        .map(MachineRow::into_machine)
        .transpose()
    }

    async fn rotate_machine_secret(
        &self,
        m: &MachineNo,
        new_hash: &SecretHash,
        previous_until: Option<DateTime<Utc>>,
    ) -> Result<bool, StorageError> {
        // Right-hand sides see the row as it was: the old secret moves to
        // prev_secret_hash while the new one lands.
        let done = sqlx::query(
            "UPDATE machines SET \
             prev_secret_hash = CASE WHEN $2::bigint IS NULL THEN NULL ELSE secret_hash END, \
             prev_secret_expires_ms = $2, secret_hash = $1 WHERE machine_no = $3",
        )
        .bind(new_hash.as_str())
        .bind(previous_until.map(|t| t.timestamp_millis()))
        .bind(m.as_str())
        .execute(&self.pool)
        .await
        .map_err(pg_error)?;
        Ok(done.rows_affected() == 1)
    }

    async fn rotate_merchant_secret(
        &self,
        appid: &str,
        new_hash: &SecretHash,
        new_enc: &str,
        previous_until: Option<DateTime<Utc>>,
    ) -> Result<bool, StorageError> {
        // One statement: authentication and webhook signing switch together.
        let done = sqlx::query(
            "UPDATE merchants SET \
             prev_appsecret_hash = CASE WHEN $2::bigint IS NULL THEN NULL ELSE appsecret_hash END, \
             prev_appsecret_expires_ms = $2, appsecret_hash = $1, appsecret_enc = $3 \
             WHERE appid = $4",
        )
        .bind(new_hash.as_str())
        .bind(previous_until.map(|t| t.timestamp_millis()))
        .bind(new_enc)
        .bind(appid)
        .execute(&self.pool)
        .await
        .map_err(pg_error)?;
        // This process sees its own rotation at once; others within the TTL.
        self.merchants.remove(appid);
        Ok(done.rows_affected() == 1)
    }

    async fn list_machines(&self, merchant: Option<&str>) -> Result<Vec<Machine>, StorageError> {
        // Two statements rather than `$1 IS NULL OR …`, so that the merchant
        // filter can use machines_by_merchant.
        let rows = match merchant {
            Some(appid) => {
                sqlx::query_as::<_, MachineRow>(&format!(
                    "SELECT {MACHINE_COLUMNS} FROM machines WHERE merchant_appid = $1 \
                     ORDER BY machine_no"
                ))
                .bind(appid)
                .fetch_all(&self.pool)
                .await
            }
            None => {
                sqlx::query_as::<_, MachineRow>(&format!(
                    "SELECT {MACHINE_COLUMNS} FROM machines ORDER BY machine_no"
                ))
                .fetch_all(&self.pool)
                .await
            }
        };
        rows.map_err(pg_error)?
            .into_iter()
            .map(MachineRow::into_machine)
            .collect()
    }

    async fn create_service(&self, s: NewService) -> Result<ServiceAccount, StorageError> {
        let created_at_ms = now_ms();
        sqlx::query(
            "INSERT INTO services (username, name, password_hash, created_at_ms) \
             VALUES ($1, $2, $3, $4)",
        )
        .bind(&s.username)
        .bind(&s.name)
        .bind(s.password_hash.as_str())
        .bind(created_at_ms)
        .execute(&self.pool)
        .await
        .map_err(pg_error)?;
        Ok(ServiceAccount {
            username: s.username,
            name: s.name,
            password_hash: s.password_hash,
            created_at: from_ms(created_at_ms, "services.created_at_ms")?,
        })
    }

    async fn service(&self, username: &str) -> Result<Option<ServiceAccount>, StorageError> {
        sqlx::query_as::<_, ServiceRow>(
            "SELECT username, name, password_hash, created_at_ms FROM services \
             WHERE username = $1",
        )
        .bind(username)
        .fetch_optional(&self.pool)
        .await
        .map_err(pg_error)?
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
        let w = PresenceWrite {
            machine_no: *m,
            online,
            epoch,
            at,
        };
        let mut conn = self.pool.acquire().await.map_err(pg_error)?;
        write_presence(&mut conn, &w).await
    }

    async fn record_presence_batch(&self, batch: &[PresenceWrite]) -> Result<(), StorageError> {
        // One transaction (one commit) for the whole batch.
        let mut tx = self.pool.begin().await.map_err(pg_error)?;
        for w in by_machine(batch, |w| &w.machine_no) {
            write_presence(&mut tx, &w).await?;
        }
        tx.commit().await.map_err(pg_error)
    }

    async fn reset_presence(&self) -> Result<(), StorageError> {
        sqlx::query(
            "UPDATE machines SET online = false, online_since_ms = NULL, presence_epoch = 0 \
             WHERE online OR presence_epoch <> 0",
        )
        .execute(&self.pool)
        .await
        .map_err(pg_error)?;
        Ok(())
    }

    async fn ping(&self) -> Result<(), StorageError> {
        // A pooled connection (within the acquire timeout) to a server that
        // accepts writes: a standby in recovery, or a read-only default,
        // would take every read and fail every order.
        let read_only: bool = sqlx::query_scalar(
            "SELECT pg_is_in_recovery() OR current_setting('transaction_read_only') = 'on'",
        )
        .fetch_one(&self.pool)
        .await
        .map_err(pg_error)?;
        if read_only {
            return Err(StorageError::Backend("the database is read-only".into()));
        }
        Ok(())
    }

    async fn close(&self) {
        // Waits for connections in use to come back, then closes them all.
        self.pool.close().await;
    }
}

/// A u64 stored as BIGINT (order ids, epochs, counts).
pub(super) fn to_i64(n: impl TryInto<i64>, what: &str) -> Result<i64, StorageError> {
    n.try_into()
        .map_err(|_| StorageError::Corrupt(format!("{what} out of range")))
}

/// A BIGINT column that must be non-negative.
pub(super) fn get_u64(row: &sqlx::postgres::PgRow, column: &str) -> Result<u64, StorageError> {
    let v: i64 = row.try_get(column).map_err(backend)?;
    u64::try_from(v).map_err(|_| StorageError::Corrupt(format!("{column} {v}")))
}

/// A stored machine number.
pub(super) fn get_machine_no(
    row: &sqlx::postgres::PgRow,
    column: &str,
) -> Result<MachineNo, StorageError> {
    let m: String = row.try_get(column).map_err(backend)?;
    m.parse::<MachineNo>()
        .map_err(|_| StorageError::Corrupt(format!("{column} {m:?} is not a machine number")))
}

/// A nullable BIGINT milliseconds column.
pub(super) fn get_opt_ms(
    row: &sqlx::postgres::PgRow,
    column: &str,
) -> Result<Option<DateTime<Utc>>, StorageError> {
    let v: Option<i64> = row.try_get(column).map_err(backend)?;
    v.map(|v| from_ms(v, column)).transpose()
}

/// A BIGINT milliseconds column.
pub(super) fn get_ms(
    row: &sqlx::postgres::PgRow,
    column: &str,
) -> Result<DateTime<Utc>, StorageError> {
    from_ms(row.try_get(column).map_err(backend)?, column)
}
