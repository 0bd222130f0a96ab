//! How PostgreSQL binds a [`Value`] and what its errors mean; with them
//! [`impl_run!`] makes its connections, pool and transactions run
//! statements.

use sqlx::error::ErrorKind;
use sqlx::postgres::PgArguments;
use sqlx::{PgConnection, Postgres};

use crate::storage::rows::backend;
use crate::storage::run::Dialect;
use crate::storage::run::{impl_run, Inserts, Value};
use crate::storage::StorageError;

type Query<'q> = sqlx::query::Query<'q, Postgres, PgArguments>;

/// Flags are BOOLEAN, sets arrays.
fn bind<'q>(q: Query<'q>, v: Value<'q>) -> Result<Query<'q>, StorageError> {
    Ok(match v {
        Value::Text(t) => q.bind(t),
        Value::OptText(t) => q.bind(t),
        Value::Int(i) => q.bind(i),
        Value::OptInt(i) => q.bind(i),
        Value::Int4(i) => q.bind(i),
        Value::OptInt4(i) => q.bind(i),
        Value::Flag(b) => q.bind(b),
        Value::Ints(v) => q.bind(v),
        Value::Texts(v) => q.bind(v),
    })
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

/// sqlx errors as the backend-neutral errors callers act on, told by the
/// violated constraint's name whatever the statement. As in SQLite, an
/// order or machine that refers to a missing merchant (or an order to a
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

fn error(e: sqlx::Error, _inserts: Option<Inserts>) -> StorageError {
    pg_error(e)
}

impl_run!(Postgres, PgConnection, Dialect::Postgres, bind, error);
