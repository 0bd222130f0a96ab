//! How SQLite binds a [`Value`] and what its errors mean; with them
//! [`impl_run!`] makes its connections, pool and transactions run
//! statements.

use sqlx::error::ErrorKind;
use sqlx::sqlite::SqliteArguments;
use sqlx::{Sqlite, SqliteConnection};

use super::lite::LiteConn;
use super::readers::LitePooled;
use crate::storage::rows::backend;
use crate::storage::run::Dialect;
use crate::storage::run::{impl_run, Inserts, Value};
use crate::storage::StorageError;

type Query<'q> = sqlx::query::Query<'q, Sqlite, SqliteArguments<'q>>;

/// Flags and 32-bit values are stored as INTEGER; sets are `IN` lists of
/// single values, so an array is refused.
fn bind<'q>(q: Query<'q>, v: Value<'q>) -> Result<Query<'q>, StorageError> {
    Ok(match v {
        Value::Text(t) => q.bind(t),
        Value::OptText(t) => q.bind(t),
        Value::Int(i) => q.bind(i),
        Value::OptInt(i) => q.bind(i),
        Value::Int4(i) => q.bind(i64::from(i)),
        Value::OptInt4(i) => q.bind(i.map(i64::from)),
        Value::Flag(b) => q.bind(i64::from(b)),
        Value::Ints(_) | Value::Texts(_) => {
            return Err(StorageError::Backend("SQLite binds no arrays".into()))
        }
    })
}

/// SQLite reports which kind of constraint failed, not its name: what the
/// statement inserts tells which key it was. The only foreign keys an
/// insert can violate (a machine's or an order's merchant, an order's
/// machine) mean an unknown merchant.
pub(super) fn error(e: sqlx::Error, inserts: Option<Inserts>) -> StorageError {
    if let (sqlx::Error::Database(db), Some(what)) = (&e, inserts) {
        match (db.kind(), what) {
            (ErrorKind::UniqueViolation, Inserts::Account(name)) => {
                return StorageError::Duplicate(name)
            }
            // SQLite names the columns of the violated constraint.
            (ErrorKind::UniqueViolation, Inserts::Order) => {
                return if db.message().contains("out_trade_no") {
                    StorageError::Duplicate("out_trade_no")
                } else {
                    StorageError::Duplicate("order")
                };
            }
            (ErrorKind::ForeignKeyViolation, _) => return StorageError::UnknownMerchant,
            _ => {}
        }
    }
    backend(e)
}

// The order path's write jobs run on the writer's rusqlite connection,
// pooled statements on the readers' (`SqliteStorage` hands them out);
// transactions stay on the sqlx pool.
impl_run!(conn = LiteConn, pooled = LitePooled<'p>; Sqlite, SqliteConnection, Dialect::Sqlite, bind, error);
