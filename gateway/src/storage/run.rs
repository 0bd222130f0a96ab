//! How code written once runs a statement on either engine: a statement is
//! its text and its values ([`Stmt`]), and a [`Run`] (a pool, a connection,
//! a transaction) binds and runs it. Each engine states how it binds a
//! [`Value`] and what its errors mean, and implements [`Run`] with
//! [`impl_run!`], so the code that runs a statement is written once too.

use std::borrow::Cow;

use sqlx::postgres::PgRow;
use sqlx::sqlite::SqliteRow;
use sqlx::FromRow;

use super::StorageError;

/// The SQL an engine speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    Sqlite,
    Postgres,
}

impl Dialect {
    /// A flag's true value as a literal.
    pub fn yes(self) -> &'static str {
        match self {
            Dialect::Sqlite => "1",
            Dialect::Postgres => "true",
        }
    }

    /// Most values one set test ([`set_of`]) holds: an SQLite `IN` list
    /// binds a variable per value, far below its limit of 32,766 at this
    /// size; a PostgreSQL array is one value.
    pub fn set_limit(self) -> usize {
        match self {
            Dialect::Sqlite => 500,
            Dialect::Postgres => usize::MAX,
        }
    }
}

/// One value bound to a statement. Each engine binds it as its schema
/// stores it (a flag: SQLite's INTEGER 0/1, PostgreSQL's BOOLEAN).
#[derive(Debug, Clone)]
pub enum Value<'a> {
    Text(Cow<'a, str>),
    OptText(Option<&'a str>),
    Int(i64),
    OptInt(Option<i64>),
    /// An INTEGER (32-bit) column of PostgreSQL.
    Int4(i32),
    OptInt4(Option<i32>),
    Flag(bool),
    /// A set of values as one PostgreSQL array (`= ANY($n)`); SQLite has
    /// no arrays and refuses it (its sets are `IN` lists, see
    /// [`super::sql::in_list`]).
    Ints(Vec<i64>),
    Texts(Vec<&'a str>),
}

impl<'a> From<&'a str> for Value<'a> {
    fn from(v: &'a str) -> Self {
        Value::Text(v.into())
    }
}

impl<'a> From<&'a String> for Value<'a> {
    fn from(v: &'a String) -> Self {
        Value::Text(v.into())
    }
}

impl From<String> for Value<'_> {
    fn from(v: String) -> Self {
        Value::Text(v.into())
    }
}

impl<'a> From<Option<&'a str>> for Value<'a> {
    fn from(v: Option<&'a str>) -> Self {
        Value::OptText(v)
    }
}

impl<'a> From<&'a Option<String>> for Value<'a> {
    fn from(v: &'a Option<String>) -> Self {
        Value::OptText(v.as_deref())
    }
}

impl From<i64> for Value<'_> {
    fn from(v: i64) -> Self {
        Value::Int(v)
    }
}

impl From<Option<i64>> for Value<'_> {
    fn from(v: Option<i64>) -> Self {
        Value::OptInt(v)
    }
}

impl From<i32> for Value<'_> {
    fn from(v: i32) -> Self {
        Value::Int4(v)
    }
}

impl From<Option<i32>> for Value<'_> {
    fn from(v: Option<i32>) -> Self {
        Value::OptInt4(v)
    }
}

impl From<bool> for Value<'_> {
    fn from(v: bool) -> Self {
        Value::Flag(v)
    }
}

/// What an INSERT adds, for an engine that tells a violated constraint by
/// the statement that violated it (SQLite) rather than by the constraint's
/// name (PostgreSQL).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Inserts {
    /// A merchant, machine or service: a unique violation is
    /// `Duplicate(name)`, a foreign key an unknown merchant.
    Account(&'static str),
    /// An order: a unique violation names the order or its out_trade_no.
    Order,
}

/// A statement and its values.
#[derive(Debug, Clone)]
pub struct Stmt<'a> {
    pub sql: Cow<'a, str>,
    pub values: Vec<Value<'a>>,
    pub inserts: Option<Inserts>,
}

impl<'a> Stmt<'a> {
    pub fn new(sql: impl Into<Cow<'a, str>>) -> Self {
        Stmt {
            sql: sql.into(),
            values: Vec::new(),
            inserts: None,
        }
    }

    /// Bind the next value (`$1`, `$2`, … in order).
    pub fn bind(mut self, v: impl Into<Value<'a>>) -> Self {
        self.values.push(v.into());
        self
    }

    /// Bind several values in order.
    pub fn bind_all(mut self, vs: impl IntoIterator<Item = Value<'a>>) -> Self {
        self.values.extend(vs);
        self
    }

    /// The statement inserts `what` (see [`Inserts`]).
    pub fn inserting(mut self, what: Inserts) -> Self {
        self.inserts = Some(what);
        self
    }
}

/// A row both engines decode (every row type of [`super::rows`], and
/// tuples of plain values): sqlx's `FromRow` for PostgreSQL (and the sqlx
/// SQLite pool), [`LiteRow`] for SQLite's rusqlite connections.
pub trait Row:
    for<'r> FromRow<'r, SqliteRow> + for<'r> FromRow<'r, PgRow> + LiteRow + Send + Unpin + 'static
{
}

impl<T> Row for T where
    T: for<'r> FromRow<'r, SqliteRow>
        + for<'r> FromRow<'r, PgRow>
        + LiteRow
        + Send
        + Unpin
        + 'static
{
}

/// A row as rusqlite reads it: a row type by column name (as sqlx's derived
/// `FromRow` does, see `lite_row!` in [`super::rows`]), a tuple by position.
pub trait LiteRow: Sized {
    fn from_lite(row: &rusqlite::Row<'_>) -> rusqlite::Result<Self>;
}

/// Tuples of plain values, read by position like sqlx's tuple `FromRow`.
macro_rules! lite_tuple {
    ($($t:ident $i:tt),+) => {
        impl<$($t: rusqlite::types::FromSql),+> LiteRow for ($($t,)+) {
            fn from_lite(row: &rusqlite::Row<'_>) -> rusqlite::Result<Self> {
                Ok(($(row.get::<_, $t>($i)?,)+))
            }
        }
    };
}

lite_tuple!(A 0);
lite_tuple!(A 0, B 1);
lite_tuple!(A 0, B 1, C 2);
lite_tuple!(A 0, B 1, C 2, D 3);

/// Where statements run: a pool (each statement on its own), a connection
/// or a transaction.
#[async_trait::async_trait]
pub trait Run: Send {
    /// Rows affected.
    async fn execute(&mut self, s: Stmt<'_>) -> Result<u64, StorageError>;
    async fn fetch_all<R: Row>(&mut self, s: Stmt<'_>) -> Result<Vec<R>, StorageError>;
    async fn fetch_optional<R: Row>(&mut self, s: Stmt<'_>) -> Result<Option<R>, StorageError>;
    async fn fetch_one<R: Row>(&mut self, s: Stmt<'_>) -> Result<R, StorageError>;
}

/// A transaction that statements run in until it ends; dropped, it rolls
/// back.
#[async_trait::async_trait]
pub trait Transaction: Run {
    async fn commit(self) -> Result<(), StorageError>;
    async fn rollback(self) -> Result<(), StorageError>;
}

/// A pool as a [`Run`]: each statement on a pooled connection of its own.
#[derive(Debug, Clone, Copy)]
pub struct Pooled<'p, DB: sqlx::Database>(pub &'p sqlx::Pool<DB>);

/// An engine: the SQL it speaks and what it runs statements on
/// ([`impl_run!`] names them).
pub trait Engine: sqlx::Database {
    const DIALECT: Dialect;
    /// A connection.
    type Conn: Run;
    /// A transaction on a pooled connection.
    type Tx: Transaction;
    /// The pool, each statement on its own.
    type Pooled<'p>: Run;

    fn pooled(pool: &sqlx::Pool<Self>) -> Self::Pooled<'_>;
}

/// Implements [`Engine`] for a sqlx database, and [`Run`] for its
/// connection, pool ([`Pooled`]) and transaction, and [`Transaction`], from
/// the engine's `bind` (one [`Value`], fallible) and `error` (a failed
/// statement's error and its [`Inserts`] to a [`StorageError`]) functions:
/// `impl_run!(Sqlite, SqliteConnection, Dialect::Sqlite, bind, error)`.
///
/// `impl_run!(conn = C, pooled = P; …)` makes `C` the engine's
/// [`Engine::Conn`] (the connection the order path's write jobs run on)
/// instead of the sqlx connection, and `P` (a `From<Pooled>`) its
/// [`Engine::Pooled`]: SQLite's writer and readers run statements on
/// rusqlite connections, which implement [`Run`] themselves.
macro_rules! impl_run {
    (conn = $engine_conn:ty, pooled = $pooled:ty; $db:ty, $conn:ty, $dialect:expr, $bind:path, $error:path) => {
        impl_run!(@engine $db, $engine_conn, $pooled, $dialect);
        impl_run!(@sqlx $db, $conn, $bind, $error);
    };
    ($db:ty, $conn:ty, $dialect:expr, $bind:path, $error:path) => {
        impl_run!(@engine $db, $conn, $crate::storage::run::Pooled<'p, $db>, $dialect);
        impl_run!(@sqlx $db, $conn, $bind, $error);
    };
    (@engine $db:ty, $engine_conn:ty, $pooled:ty, $dialect:expr) => {
        impl $crate::storage::run::Engine for $db {
            const DIALECT: $crate::storage::run::Dialect = $dialect;
            type Conn = $engine_conn;
            type Tx = sqlx::Transaction<'static, $db>;
            type Pooled<'p> = $pooled;

            // PostgreSQL's is the sqlx pool itself.
            #[allow(clippy::useless_conversion)]
            fn pooled(pool: &sqlx::Pool<$db>) -> Self::Pooled<'_> {
                $crate::storage::run::Pooled(pool).into()
            }
        }
    };
    (@sqlx $db:ty, $conn:ty, $bind:path, $error:path) => {

        /// A statement's text as a sqlx query with every value bound.
        fn bound_query<'q>(
            sql: &'q str,
            values: Vec<$crate::storage::run::Value<'q>>,
        ) -> Result<
            sqlx::query::Query<'q, $db, <$db as sqlx::Database>::Arguments<'q>>,
            $crate::storage::StorageError,
        > {
            values.into_iter().try_fold(sqlx::query(sql), $bind)
        }

        impl_run!(@run $db, $conn, $error, |c| &mut *c);
        impl_run!(@run $db, $crate::storage::run::Pooled<'_, $db>, $error, |p| p.0);
        impl_run!(@run $db, sqlx::Transaction<'static, $db>, $error, |t| &mut **t);

        #[async_trait::async_trait]
        impl $crate::storage::run::Transaction for sqlx::Transaction<'static, $db> {
            async fn commit(self) -> Result<(), $crate::storage::StorageError> {
                sqlx::Transaction::commit(self).await.map_err(|e| $error(e, None))
            }

            async fn rollback(self) -> Result<(), $crate::storage::StorageError> {
                sqlx::Transaction::rollback(self)
                    .await
                    .map_err(|e| $error(e, None))
            }
        }
    };
    (@run $db:ty, $on:ty, $error:path, |$x:ident| $exec:expr) => {
        #[async_trait::async_trait]
        impl $crate::storage::run::Run for $on {
            async fn execute(
                &mut self,
                s: $crate::storage::run::Stmt<'_>,
            ) -> Result<u64, $crate::storage::StorageError> {
                let $x = self;
                let done = bound_query(&s.sql, s.values)?
                    .execute($exec)
                    .await
                    .map_err(|e| $error(e, s.inserts))?;
                Ok(done.rows_affected())
            }

            async fn fetch_all<R: $crate::storage::run::Row>(
                &mut self,
                s: $crate::storage::run::Stmt<'_>,
            ) -> Result<Vec<R>, $crate::storage::StorageError> {
                let $x = self;
                let rows = bound_query(&s.sql, s.values)?
                    .fetch_all($exec)
                    .await
                    .map_err(|e| $error(e, s.inserts))?;
                rows.iter()
                    .map(|r| R::from_row(r).map_err(|e| $error(e, None)))
                    .collect()
            }

            async fn fetch_optional<R: $crate::storage::run::Row>(
                &mut self,
                s: $crate::storage::run::Stmt<'_>,
            ) -> Result<Option<R>, $crate::storage::StorageError> {
                let $x = self;
                let row = bound_query(&s.sql, s.values)?
                    .fetch_optional($exec)
                    .await
                    .map_err(|e| $error(e, s.inserts))?;
                row.map(|r| R::from_row(&r).map_err(|e| $error(e, None)))
                    .transpose()
            }

            async fn fetch_one<R: $crate::storage::run::Row>(
                &mut self,
                s: $crate::storage::run::Stmt<'_>,
            ) -> Result<R, $crate::storage::StorageError> {
                let $x = self;
                let row = bound_query(&s.sql, s.values)?
                    .fetch_one($exec)
                    .await
                    .map_err(|e| $error(e, s.inserts))?;
                R::from_row(&row).map_err(|e| $error(e, None))
            }
        }
    };
}

pub(crate) use impl_run;
