//! SQLite connections on rusqlite: opening one as the backend configures
//! them, and running a shared [`Stmt`] on it ([`LiteConn`] is a [`Run`]):
//! the statement text of `storage::sql` prepared once per connection
//! (`prepare_cached`), its values bound as sqlx-sqlite binds them, its
//! errors read as `bind::error` reads sqlx's.
//!
//! A `LiteConn` runs each statement synchronously on the calling thread:
//! its `Run` futures are ready at their first poll, so the thread that owns
//! the connection (the writer, a reader) drives a job's future to its end
//! without a runtime and without handing any statement over.

use std::path::Path;
use std::time::Duration;

use rusqlite::{ffi, CachedStatement, Connection, OpenFlags};

use crate::storage::rows::backend;
use crate::storage::run::{Inserts, LiteRow, Row, Run, Stmt, Value};
use crate::storage::StorageError;

/// Statements kept prepared per connection. The writer runs some thirty
/// distinct statements (orders, outbox, cluster, inventory); a miss costs a
/// re-prepare, not an error. rusqlite's default (16) would evict the order
/// path's own statements in turn.
const STATEMENT_CACHE: usize = 128;

/// Open the database file at `path` (already created and migrated) the way
/// every connection of the backend is set up: WAL, `synchronous = FULL`,
/// foreign keys, the busy timeout, a 1 MiB page cache.
pub(super) fn open(path: &Path, busy_timeout: Duration) -> rusqlite::Result<Connection> {
    // NO_MUTEX: one thread uses the connection at a time (it is Send, not
    // Sync), so SQLite's own per-call mutex is pure cost.
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(busy_timeout)?;
    // The journal mode is the file's (set when the pool first opened it);
    // asked again so a connection never runs in another mode. It answers
    // with the mode in force.
    let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(rusqlite::Error::InvalidParameterName(format!(
            "journal_mode is {mode}, not wal"
        )));
    }
    // Durability as the module doc states it: every commit waits for its
    // fsync, WAL or not.
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    conn.pragma_update(None, "cache_size", -1024)?;
    conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
    Ok(conn)
}

/// A rusqlite connection as a [`Run`].
pub struct LiteConn(pub(super) Connection);

impl std::fmt::Debug for LiteConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LiteConn")
    }
}

impl LiteConn {
    /// The statement prepared (from the cache) with every value bound.
    fn prepare<'c>(
        &'c self,
        sql: &str,
        values: Vec<Value<'_>>,
    ) -> Result<CachedStatement<'c>, StorageError> {
        let mut st = self.0.prepare_cached(sql).map_err(backend)?;
        bind_all(&mut st, values)?;
        Ok(st)
    }

    /// Run `s` to its end; rows affected. A statement that returns rows
    /// (`… RETURNING`) is stepped through them.
    pub(super) fn execute_now(&self, s: Stmt<'_>) -> Result<u64, StorageError> {
        let inserts = s.inserts;
        let mut st = self.prepare(&s.sql, s.values)?;
        let mut rows = st.raw_query();
        while rows.next().map_err(|e| error(e, inserts))?.is_some() {}
        drop(rows);
        Ok(self.0.changes())
    }

    /// The rows of `s`, at most `limit` of them.
    pub(super) fn query_now<R: LiteRow>(
        &self,
        s: Stmt<'_>,
        limit: usize,
    ) -> Result<Vec<R>, StorageError> {
        let inserts = s.inserts;
        let mut st = self.prepare(&s.sql, s.values)?;
        let mut rows = st.raw_query();
        let mut out = Vec::new();
        while out.len() < limit {
            match rows.next().map_err(|e| error(e, inserts))? {
                Some(row) => out.push(R::from_lite(row).map_err(backend)?),
                None => break,
            }
        }
        Ok(out)
    }
}

#[async_trait::async_trait]
impl Run for LiteConn {
    async fn execute(&mut self, s: Stmt<'_>) -> Result<u64, StorageError> {
        self.execute_now(s)
    }

    async fn fetch_all<R: Row>(&mut self, s: Stmt<'_>) -> Result<Vec<R>, StorageError> {
        self.query_now(s, usize::MAX)
    }

    async fn fetch_optional<R: Row>(&mut self, s: Stmt<'_>) -> Result<Option<R>, StorageError> {
        Ok(self.query_now(s, 1)?.pop())
    }

    async fn fetch_one<R: Row>(&mut self, s: Stmt<'_>) -> Result<R, StorageError> {
        self.query_now(s, 1)?
            .pop()
            .ok_or_else(|| StorageError::Backend("statement returned no row".into()))
    }
}

/// Bind `values` as sqlx-sqlite does: a `$N` (or `?N`) parameter takes the
/// N-th value (a repeated `$N` is one parameter in SQLite), any other
/// parameter the next value in order.
fn bind_all(st: &mut CachedStatement<'_>, values: Vec<Value<'_>>) -> Result<(), StorageError> {
    let mut next = 0;
    for i in 1..=st.parameter_count() {
        let numbered = st
            .parameter_name(i)
            .and_then(|n| n.strip_prefix('$').or_else(|| n.strip_prefix('?')))
            .and_then(|n| n.parse::<usize>().ok())
            .and_then(|n| n.checked_sub(1));
        let at = numbered.unwrap_or_else(|| {
            next += 1;
            next - 1
        });
        let v = values.get(at).ok_or_else(|| {
            // Not the statement's expanded text: its values may be secrets.
            StorageError::Backend(
                format!("no value for parameter {i} ({} bound)", values.len()).into(),
            )
        })?;
        bind_one(st, i, v)?;
    }
    Ok(())
}

/// Flags and 32-bit values are stored as INTEGER; sets are `IN` lists of
/// single values, so an array is refused (as `bind::bind` does).
fn bind_one(st: &mut CachedStatement<'_>, i: usize, v: &Value<'_>) -> Result<(), StorageError> {
    let r = match v {
        Value::Text(t) => st.raw_bind_parameter(i, t.as_ref()),
        Value::OptText(t) => st.raw_bind_parameter(i, t),
        Value::Int(n) => st.raw_bind_parameter(i, n),
        Value::OptInt(n) => st.raw_bind_parameter(i, n),
        Value::Int4(n) => st.raw_bind_parameter(i, i64::from(*n)),
        Value::OptInt4(n) => st.raw_bind_parameter(i, n.map(i64::from)),
        Value::Flag(b) => st.raw_bind_parameter(i, i64::from(*b)),
        Value::Ints(_) | Value::Texts(_) => {
            return Err(StorageError::Backend("SQLite binds no arrays".into()))
        }
    };
    r.map_err(backend)
}

/// What a failed statement means, as `bind::error` reads sqlx's errors:
/// SQLite reports which kind of constraint failed, not its name, so what
/// the statement inserts tells which key it was; the only foreign keys an
/// insert can violate (a machine's or an order's merchant, an order's
/// machine) mean an unknown merchant.
pub(super) fn error(e: rusqlite::Error, inserts: Option<Inserts>) -> StorageError {
    if let (rusqlite::Error::SqliteFailure(f, msg), Some(what)) = (&e, inserts) {
        let unique = matches!(
            f.extended_code,
            ffi::SQLITE_CONSTRAINT_UNIQUE | ffi::SQLITE_CONSTRAINT_PRIMARYKEY
        );
        match what {
            Inserts::Account(name) if unique => return StorageError::Duplicate(name),
            // SQLite names the columns of the violated constraint.
            Inserts::Order if unique => {
                let trade_no = msg.as_deref().is_some_and(|m| m.contains("out_trade_no"));
                return if trade_no {
                    StorageError::Duplicate("out_trade_no")
                } else {
                    StorageError::Duplicate("order")
                };
            }
            _ if f.extended_code == ffi::SQLITE_CONSTRAINT_FOREIGNKEY => {
                return StorageError::UnknownMerchant
            }
            _ => {}
        }
    }
    backend(e)
}
