//! Storage: what the gateway keeps across restarts and shares with other
//! processes (the `vendgate` CLI provisions into the same database while the
//! gateway runs), behind a backend-neutral trait.
//!
//! # What do we store?
//!
//! - merchants: appid, name, webhook URL, hashed AppSecret (for API
//!   authentication) and the AppSecret encrypted (for signing webhooks);
//! - machines: owner merchant, hashed secret, and presence as last written by
//!   the gateway (online, since when, last seen, connection epoch);
//! - service accounts: username, name, hashed password.
//!
//! - orders ([`orders`]) and the webhook outbox ([`outbox`]);
//! - account lifecycle (disabled, removed), exports and the retention purge
//!   ([`lifecycle`]).
//!
//! Secrets are stored hashed ([`SecretHash`]); the one exception is the
//! merchant's AppSecret, also kept encrypted under a key that lives outside
//! the database (`secrets::WebhookKey`), because webhooks are signed with it.
//!
//! The trait speaks plain Rust types only. Two backends implement it:
//! SQLite ([`sqlite`], one file, single node) and PostgreSQL ([`postgres`],
//! shared by the nodes of a cluster); [`open`] picks one by
//! `database_url`.
//!
//! # Layout
//!
//! Imports point one way: the backends use the shared files, never the
//! other way round.
//!
//! - this file: the [`Storage`] trait, its account types and errors, [`open`];
//! - [`orders`], [`outbox`], [`cluster`], [`lifecycle`]: the trait's other
//!   parts and their types, and with `accounts` the operations of them all,
//!   written once for every backend;
//! - `backend`: what a backend gives those operations (where statements
//!   run, its locks, and the few operations it does its own way);
//! - `sql`: every statement, written once for both engines (variants side
//!   by side where the engines differ); `run`: a statement with its values,
//!   and how it is run;
//! - `rows`: the rows both engines read and their conversion to the types
//!   above (milliseconds, hashes, machine numbers), and the error helpers;
//! - `cached`: the merchant credential cache;
//! - [`sqlite`], [`postgres`]: the backends: opening, migrating, binding
//!   values, mapping errors, and what each does its own way (SQLite's
//!   group-commit writer, PostgreSQL's locks).

use std::path::Path;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use vendgate_proto::machine::MachineNo;

use crate::secrets::{PreviousSecret, SecretHash};

mod backend;
mod cached;
pub mod cluster;
pub mod lifecycle;
mod ops;
pub mod orders;
pub mod outbox;
pub mod postgres;
mod rows;
mod run;
mod sql;
pub mod sqlite;

pub use cluster::{ClusterStorage, Due, NodeRow, Ownership, OwnershipSeen};
pub use lifecycle::{LifecycleStorage, MachineChange, OrderPage, OrderPurge, Purged};
pub use orders::{
    NewOrder, NewOutboxEvent, OrderChange, OrderEvent, OrderQuery, OrderStorage, StoredOrder,
    MAX_EXTRA_EVENTS,
};
pub use outbox::{
    Attempt, AttemptResult, ClaimRequest, ClaimedEvent, MachineEvent, OutboxBacklog, OutboxEntry,
    OutboxStatus, OutboxStorage, PresenceChange, ReplayOutcome, WebhookAttempt,
};

pub use postgres::PgStorage;
pub use sqlite::SqliteStorage;

/// A merchant to create.
#[derive(Debug, Clone)]
pub struct NewMerchant {
    pub name: String,
    pub notify_url: Option<String>,
    pub appid: String,
    pub appsecret_hash: SecretHash,
    /// The AppSecret encrypted for webhook signing (`WebhookKey::encrypt`).
    pub appsecret_enc: Option<String>,
}

/// A stored merchant.
#[derive(Debug, Clone)]
pub struct Merchant {
    pub appid: String,
    pub name: String,
    pub notify_url: Option<String>,
    pub appsecret_hash: SecretHash,
    /// None for merchants created before webhook signing: their events
    /// cannot be signed.
    pub appsecret_enc: Option<String>,
    /// The AppSecret a rotation replaced, while (or after) its grace runs;
    /// [`crate::secrets::verify_rotating`] ignores it once expired.
    pub previous_appsecret: Option<PreviousSecret>,
    pub created_at: DateTime<Utc>,
    /// Set by `vendgate merchant disable`: the API answers it like a wrong
    /// AppSecret and its webhooks are held (not attempted) until enabled.
    pub disabled_at: Option<DateTime<Utc>>,
}

/// A machine to provision.
#[derive(Debug, Clone)]
pub struct NewMachine {
    pub machine_no: MachineNo,
    pub merchant_appid: String,
    pub secret_hash: SecretHash,
}

/// A stored machine with its persisted presence. The presence fields lag the
/// running gateway's in-memory registry by at most one write; in the gateway
/// process itself the registry is the source of truth.
#[derive(Debug, Clone)]
pub struct Machine {
    pub machine_no: MachineNo,
    pub merchant_appid: String,
    pub secret_hash: SecretHash,
    /// The secret a rotation replaced (see [`Merchant::previous_appsecret`]).
    pub previous_secret: Option<PreviousSecret>,
    pub online: bool,
    pub last_seen: Option<DateTime<Utc>>,
    pub online_since: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    /// Set by `vendgate machine disable`: refused at CONNECT, closed if
    /// connected, and unknown to orders, until enabled again.
    pub disabled_at: Option<DateTime<Utc>>,
    /// Set by `vendgate machine remove`: its secrets are gone for good; the
    /// row stays because its orders (the merchant's history) refer to it.
    pub removed_at: Option<DateTime<Utc>>,
}

impl Machine {
    /// Neither disabled nor removed: may connect and take orders.
    pub fn is_active(&self) -> bool {
        self.disabled_at.is_none() && self.removed_at.is_none()
    }
}

/// A service account to create.
#[derive(Debug, Clone)]
pub struct NewService {
    pub name: String,
    pub username: String,
    pub password_hash: SecretHash,
}

/// A stored service account.
#[derive(Debug, Clone)]
pub struct ServiceAccount {
    pub username: String,
    pub name: String,
    pub password_hash: SecretHash,
    pub created_at: DateTime<Utc>,
}

/// One presence change to persist.
#[derive(Debug, Clone, Copy)]
pub struct PresenceWrite {
    pub machine_no: MachineNo,
    pub online: bool,
    pub epoch: u64,
    pub at: DateTime<Utc>,
}

/// Errors of every storage backend.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// A unique key is taken; names what ("merchant", "machine", "service").
    #[error("{0} already exists")]
    Duplicate(&'static str),
    /// A machine refers to a merchant that does not exist.
    #[error("unknown merchant")]
    UnknownMerchant,
    /// A stored value failed to parse (a bug or a hand-edited database).
    #[error("corrupt stored data: {0}")]
    Corrupt(String),
    /// The backend failed (I/O, locked for too long, closed pool, ...).
    #[error("storage backend error")]
    Backend(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// The storage operations the gateway and the provisioning commands need.
#[async_trait::async_trait]
pub trait Storage:
    OrderStorage + OutboxStorage + ClusterStorage + LifecycleStorage + Send + Sync + 'static
{
    /// Err(Duplicate("merchant")) if the appid is taken.
    async fn create_merchant(&self, m: NewMerchant) -> Result<Merchant, StorageError>;
    async fn merchant(&self, appid: &str) -> Result<Option<Merchant>, StorageError>;
    /// Set the merchant's webhook URL (None: no webhooks). Callers check
    /// the URL first (`notifier::target::check_url`). Ok(false) if there is
    /// no such merchant.
    async fn set_notify_url(&self, appid: &str, url: Option<&str>) -> Result<bool, StorageError>;
    /// All merchants, ordered by appid.
    async fn list_merchants(&self) -> Result<Vec<Merchant>, StorageError>;
    /// Err(UnknownMerchant) if the merchant does not exist,
    /// Err(Duplicate("machine")) if the machine number is taken (by any merchant).
    async fn create_machine(&self, m: NewMachine) -> Result<Machine, StorageError>;
    /// Bulk provisioning: one transaction, all or nothing; same errors as
    /// [`Storage::create_machine`] (a repeated machine_no within `ms` is a
    /// duplicate too).
    async fn create_machines(&self, ms: Vec<NewMachine>) -> Result<(), StorageError>;
    async fn machine(&self, m: &MachineNo) -> Result<Option<Machine>, StorageError>;
    /// Make `new_hash` the machine's secret in one statement. The replaced
    /// secret stays valid until `previous_until` (None: it stops at once);
    /// a previous secret still in its grace is dropped, so at most two
    /// secrets are ever valid. Ok(false) if there is no such machine.
    async fn rotate_machine_secret(
        &self,
        m: &MachineNo,
        new_hash: &SecretHash,
        previous_until: Option<DateTime<Utc>>,
    ) -> Result<bool, StorageError>;
    /// The same for a merchant's AppSecret; `new_enc` (its encrypted copy
    /// for webhook signing) is replaced in the same statement, so webhooks
    /// are signed with the new AppSecret from this commit on.
    async fn rotate_merchant_secret(
        &self,
        appid: &str,
        new_hash: &SecretHash,
        new_enc: &str,
        previous_until: Option<DateTime<Utc>>,
    ) -> Result<bool, StorageError>;
    /// Machines ordered by machine_no; only `merchant`'s when given.
    async fn list_machines(&self, merchant: Option<&str>) -> Result<Vec<Machine>, StorageError>;
    /// Err(Duplicate("service")) if the username is taken.
    async fn create_service(&self, s: NewService) -> Result<ServiceAccount, StorageError>;
    async fn service(&self, username: &str) -> Result<Option<ServiceAccount>, StorageError>;
    /// Persist presence so other processes (the CLI) see it. `epoch` guards
    /// against stale writes: a write (offline or online) with an older epoch
    /// than the stored one is ignored; an equal epoch is the same connection
    /// and updates `last_seen`. An unknown machine is ignored.
    async fn record_presence(
        &self,
        m: &MachineNo,
        online: bool,
        epoch: u64,
        at: DateTime<Utc>,
    ) -> Result<(), StorageError>;
    /// Several presence writes in one transaction, with the same epoch rule.
    async fn record_presence_batch(&self, batch: &[PresenceWrite]) -> Result<(), StorageError>;
    /// At start-up nothing is connected yet: mark every machine offline (a
    /// crash leaves stale online flags) and reset the stored epochs, so the
    /// new process's epochs always win whatever the clock did meanwhile.
    /// `last_seen` is kept.
    async fn reset_presence(&self) -> Result<(), StorageError>;
    /// Readiness: succeeds when the database can take a write right now.
    async fn ping(&self) -> Result<(), StorageError>;
    /// Close the connections, waiting for in-flight operations.
    async fn close(&self);
}

/// Open (creating if missing) the SQLite database at `path` and bring its
/// schema up to date.
pub async fn open_sqlite(path: &Path) -> Result<Arc<dyn Storage>, StorageError> {
    Ok(Arc::new(SqliteStorage::open(path).await?))
}

/// Open the database `settings.database_url` names and bring its schema up
/// to date: empty or `sqlite://PATH` is SQLite (at
/// [`crate::config::Settings::sqlite_path`]), `postgres://` or
/// `postgresql://` is PostgreSQL with the `[database]` pool settings.
pub async fn open(settings: &crate::config::Settings) -> Result<Arc<dyn Storage>, StorageError> {
    let url = settings.database_url.as_str();
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        return Ok(Arc::new(PgStorage::open(url, &settings.database).await?));
    }
    match settings.sqlite_path() {
        Some(path) => open_sqlite(&path).await,
        None => {
            // Only the scheme: the rest of a URL may hold a password.
            let scheme = url.split_once("://").map_or("(none)", |(s, _)| s);
            Err(StorageError::Backend(
                format!(
                    "unsupported database_url scheme {scheme:?}: use sqlite://PATH, \
                     postgres:// or postgresql://"
                )
                .into(),
            ))
        }
    }
}
