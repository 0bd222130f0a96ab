//! Backend-neutral rows: what the statements of [`super::sql`] read, decoded
//! alike by both engines (`sqlx::FromRow`; a flag decodes as `bool` from
//! SQLite's 0/1 and PostgreSQL's BOOLEAN), their conversion into the
//! storage's types (unix milliseconds ↔ `DateTime`, hashes, machine
//! numbers), and the errors every backend reports with.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use vendgate_proto::machine::MachineNo;
use vendgate_proto::msg::InventoryItem;

use super::cluster::{NodeRow, Ownership, OwnershipSeen};
use super::outbox::{
    Attempt, AttemptResult, ClaimedEvent, OutboxBacklog, OutboxEntry, OutboxStatus, WebhookAttempt,
};
use super::run::LiteRow;
use super::{Machine, Merchant, PresenceWrite, ServiceAccount, StorageError, StoredOrder};
use crate::domain::order::{Line, Status};
use crate::secrets::{PreviousSecret, SecretHash};

// ------------------------------------------------------------------ errors

/// Any error of the engine underneath, as [`StorageError::Backend`].
pub(super) fn backend(e: impl std::error::Error + Send + Sync + 'static) -> StorageError {
    StorageError::Backend(Box::new(e))
}

// ------------------------------------------------------------------ values

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

pub(super) fn opt_ms(t: Option<DateTime<Utc>>) -> Option<i64> {
    t.map(|t| t.timestamp_millis())
}

/// A count, limit or offset as the signed BIGINT both engines bind.
pub(super) fn to_i64(n: impl TryInto<i64>, what: &str) -> Result<i64, StorageError> {
    n.try_into()
        .map_err(|_| StorageError::Corrupt(format!("{what} out of range")))
}

/// An order id as stored (BIGINT).
pub(super) fn id_i64(id: u64) -> Result<i64, StorageError> {
    i64::try_from(id).map_err(|_| StorageError::Corrupt(format!("order id {id} out of range")))
}

/// Epochs are microsecond wall-clock seeds (see presence.rs), far below
/// i64::MAX; a larger one cannot be stored in a BIGINT column.
pub(super) fn presence_epoch(w: &PresenceWrite) -> Result<i64, StorageError> {
    i64::try_from(w.epoch).map_err(|_| {
        StorageError::Backend(format!("presence epoch {} exceeds i64", w.epoch).into())
    })
}

/// A stored BIGINT that must be non-negative.
pub(super) fn to_u64(v: i64, column: &str) -> Result<u64, StorageError> {
    u64::try_from(v).map_err(|_| StorageError::Corrupt(format!("{column} {v}")))
}

pub(super) fn to_u32(v: i64, column: &str) -> Result<u32, StorageError> {
    u32::try_from(v).map_err(|_| StorageError::Corrupt(format!("{column} {v}")))
}

fn machine_no(s: &str, column: &str) -> Result<MachineNo, StorageError> {
    s.parse::<MachineNo>()
        .map_err(|_| StorageError::Corrupt(format!("{column} {s:?} is not a machine number")))
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

// ---------------------------------------------------------------- accounts

/// A `merchants` row.
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

/// A `machines` row.
#[derive(sqlx::FromRow)]
pub(super) struct MachineRow {
    machine_no: String,
    merchant_appid: String,
    secret_hash: String,
    online: bool,
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
        let machine_no = machine_no(&self.machine_no, "machines.machine_no")?;
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
            online: self.online,
            last_seen: opt_from_ms(self.last_seen_ms, "machines.last_seen_ms")?,
            online_since: opt_from_ms(self.online_since_ms, "machines.online_since_ms")?,
            created_at: from_ms(self.created_at_ms, "machines.created_at_ms")?,
            disabled_at: opt_from_ms(self.disabled_at_ms, "machines.disabled_at_ms")?,
            removed_at: opt_from_ms(self.removed_at_ms, "machines.removed_at_ms")?,
            machine_no,
            merchant_appid: self.merchant_appid,
        })
    }
}

/// A `services` row.
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

// ------------------------------------------------------------------ orders

/// An `orders` row ([`super::sql::ORDER_COLUMNS`]), without its lines.
#[derive(sqlx::FromRow)]
pub(super) struct OrderRow {
    pub(super) order_id: i64,
    merchant_appid: String,
    machine_no: String,
    out_trade_no: Option<String>,
    request_fingerprint: Option<String>,
    pay_later: bool,
    status: String,
    amount: i64,
    refund_amount: i64,
    error: Option<String>,
    result_applied: bool,
    created_at_ms: i64,
    updated_at_ms: i64,
    dispense_deadline_ms: Option<i64>,
    pay_deadline_ms: Option<i64>,
    refunded_at_ms: Option<i64>,
    refunded_amount: i64,
    accept_by_ms: Option<i64>,
    events_dropped: i64,
}

impl OrderRow {
    pub(super) fn into_order(self, lines: Vec<Line>) -> Result<StoredOrder, StorageError> {
        let id = self.order_id;
        let status = Status::parse(&self.status).ok_or_else(|| {
            StorageError::Corrupt(format!("status {:?} of order {id}", self.status))
        })?;
        Ok(StoredOrder {
            order_id: u64::try_from(id).map_err(|_| StorageError::Corrupt("order_id".into()))?,
            machine_no: machine_no(&self.machine_no, "machine_no")?,
            status,
            lines,
            created_at: from_ms(self.created_at_ms, "created_at_ms")?,
            updated_at: from_ms(self.updated_at_ms, "updated_at_ms")?,
            dispense_deadline: opt_from_ms(self.dispense_deadline_ms, "dispense_deadline_ms")?,
            pay_deadline: opt_from_ms(self.pay_deadline_ms, "pay_deadline_ms")?,
            refunded_at: opt_from_ms(self.refunded_at_ms, "refunded_at_ms")?,
            accept_by: opt_from_ms(self.accept_by_ms, "accept_by_ms")?,
            merchant_appid: self.merchant_appid,
            out_trade_no: self.out_trade_no,
            request_fingerprint: self.request_fingerprint,
            pay_later: self.pay_later,
            amount: self.amount,
            refund_amount: self.refund_amount,
            error: self.error,
            result_applied: self.result_applied,
            refunded_amount: self.refunded_amount,
            events_dropped: self.events_dropped,
        })
    }
}

/// An `order_items` row.
#[derive(sqlx::FromRow)]
pub(super) struct LineRow {
    order_id: i64,
    product_id: i64,
    quantity: i64,
    dispensed: i64,
    unit_price: i64,
}

/// Orders with their lines, in the orders' order; `lines` in line order.
pub(super) fn orders_with_lines(
    orders: Vec<OrderRow>,
    lines: Vec<LineRow>,
) -> Result<Vec<StoredOrder>, StorageError> {
    let mut by_order: HashMap<i64, Vec<Line>> = HashMap::new();
    for l in lines {
        by_order.entry(l.order_id).or_default().push(Line {
            product_id: l.product_id,
            quantity: to_u32(l.quantity, "quantity")?,
            dispensed: to_u32(l.dispensed, "dispensed")?,
            unit_price: l.unit_price,
        });
    }
    orders
        .into_iter()
        .map(|o| {
            let lines = by_order.remove(&o.order_id).unwrap_or_default();
            o.into_order(lines)
        })
        .collect()
}

/// An `order_events` row.
#[derive(sqlx::FromRow)]
pub(super) struct OrderEventRow {
    at_ms: i64,
    kind: String,
    detail: String,
}

impl OrderEventRow {
    pub(super) fn into_event(self, order_id: u64) -> Result<super::OrderEvent, StorageError> {
        Ok(super::OrderEvent {
            at: from_ms(self.at_ms, "at_ms")?,
            kind: self.kind,
            detail: serde_json::from_str(&self.detail)
                .map_err(|_| StorageError::Corrupt(format!("event detail of order {order_id}")))?,
        })
    }
}

/// An `inventory` row.
#[derive(sqlx::FromRow)]
pub(super) struct InventoryRow {
    machine_no: String,
    product_id: i64,
    stock: i64,
    price: i64,
}

/// Snapshots by machine from rows ordered by machine.
pub(super) fn inventories(
    rows: Vec<InventoryRow>,
) -> Result<Vec<(MachineNo, Vec<InventoryItem>)>, StorageError> {
    let mut out: Vec<(MachineNo, Vec<InventoryItem>)> = Vec::new();
    for r in rows {
        let m = machine_no(&r.machine_no, "inventory.machine_no")?;
        let item = InventoryItem {
            product_id: r.product_id,
            stock: to_u32(r.stock, "stock")?,
            price: r.price,
        };
        match out.last_mut() {
            Some((last, items)) if *last == m => items.push(item),
            _ => out.push((m, vec![item])),
        }
    }
    Ok(out)
}

/// Order ids as stored.
pub(super) fn order_ids(ids: Vec<i64>) -> Result<Vec<u64>, StorageError> {
    ids.into_iter()
        .map(|id| u64::try_from(id).map_err(|_| StorageError::Corrupt("orders.order_id".into())))
        .collect()
}

// ------------------------------------------------------------------ outbox

/// A row of [`super::sql::OUTBOX_CANDIDATES`].
#[derive(sqlx::FromRow)]
pub(super) struct CandidateRow {
    pub(super) seq: i64,
    event_id: String,
    merchant_appid: String,
    order_key: String,
    #[sqlx(rename = "type")]
    kind: String,
    body: String,
    attempts: i64,
    created_at_ms: i64,
    pending_since_ms: i64,
    notify_url: Option<String>,
    appsecret_enc: Option<String>,
}

impl CandidateRow {
    pub(super) fn into_event(self) -> Result<ClaimedEvent, StorageError> {
        Ok(ClaimedEvent {
            attempts: attempts(self.attempts)?,
            created_at: from_ms(self.created_at_ms, "outbox.created_at_ms")?,
            pending_since: from_ms(self.pending_since_ms, "outbox.pending_since_ms")?,
            event_id: self.event_id,
            merchant_appid: self.merchant_appid,
            order_key: self.order_key,
            kind: self.kind,
            body: self.body,
            notify_url: self.notify_url,
            appsecret_enc: self.appsecret_enc,
        })
    }
}

fn attempts(n: i64) -> Result<u32, StorageError> {
    u32::try_from(n).map_err(|_| StorageError::Corrupt("outbox.attempts".into()))
}

/// An outbox row as a merchant's event list shows it.
#[derive(sqlx::FromRow)]
pub(super) struct EntryRow {
    event_id: String,
    #[sqlx(rename = "type")]
    kind: String,
    status: String,
    attempts: i64,
    last_error: Option<String>,
    created_at_ms: i64,
    next_attempt_at_ms: Option<i64>,
    delivered_at_ms: Option<i64>,
    order_id: Option<i64>,
    machine_no: Option<String>,
}

impl EntryRow {
    pub(super) fn into_entry(self) -> Result<OutboxEntry, StorageError> {
        let status = OutboxStatus::parse(&self.status)
            .ok_or_else(|| StorageError::Corrupt(format!("outbox status {:?}", self.status)))?;
        Ok(OutboxEntry {
            status,
            attempts: attempts(self.attempts)?,
            created_at: from_ms(self.created_at_ms, "outbox.created_at_ms")?,
            // A delivered or dead event has no next attempt, whatever the
            // column still holds.
            next_attempt_at: if status == OutboxStatus::Pending {
                opt_from_ms(self.next_attempt_at_ms, "outbox.next_attempt_at_ms")?
            } else {
                None
            },
            delivered_at: opt_from_ms(self.delivered_at_ms, "outbox.delivered_at_ms")?,
            order_id: self
                .order_id
                .map(|id| {
                    u64::try_from(id).map_err(|_| StorageError::Corrupt("outbox.order_id".into()))
                })
                .transpose()?,
            machine_no: self
                .machine_no
                .map(|m| machine_no(&m, "outbox.machine_no"))
                .transpose()?,
            event_id: self.event_id,
            kind: self.kind,
            last_error: self.last_error,
        })
    }
}

/// A row of [`super::sql::OUTBOX_BACKLOG`].
#[derive(sqlx::FromRow)]
pub(super) struct BacklogRow {
    n: i64,
    oldest: Option<i64>,
}

impl BacklogRow {
    pub(super) fn into_backlog(self) -> Result<OutboxBacklog, StorageError> {
        Ok(OutboxBacklog {
            pending: to_u64(self.n, "outbox count")?,
            oldest_pending: opt_from_ms(self.oldest, "outbox.created_at_ms")?,
        })
    }
}

/// A row of [`super::sql::ORDER_WEBHOOK_ATTEMPTS`].
#[derive(sqlx::FromRow)]
pub(super) struct WebhookAttemptRow {
    event_id: String,
    #[sqlx(rename = "type")]
    kind: String,
    at_ms: i64,
    http_status: Option<i64>,
    error: Option<String>,
}

impl WebhookAttemptRow {
    pub(super) fn into_attempt(self) -> Result<WebhookAttempt, StorageError> {
        Ok(WebhookAttempt {
            at: from_ms(self.at_ms, "outbox_attempts.at_ms")?,
            http_status: self
                .http_status
                .map(|s| {
                    u16::try_from(s)
                        .map_err(|_| StorageError::Corrupt("outbox_attempts.http_status".into()))
                })
                .transpose()?,
            event_id: self.event_id,
            kind: self.kind,
            error: self.error,
        })
    }
}

/// What an attempt does to its event: (status, next attempt, delivered at).
pub(super) fn attempt_effect(a: &Attempt) -> (OutboxStatus, i64, Option<i64>) {
    let at = a.at.timestamp_millis();
    match a.result {
        AttemptResult::Delivered => (OutboxStatus::Delivered, at, Some(at)),
        AttemptResult::RetryAt(t) => (OutboxStatus::Pending, t.timestamp_millis(), None),
        AttemptResult::Dead => (OutboxStatus::Dead, at, None),
    }
}

// ----------------------------------------------------------------- cluster

/// A stored presence epoch.
pub(super) fn epoch(e: i64) -> Result<u64, StorageError> {
    u64::try_from(e).map_err(|_| StorageError::Corrupt(format!("machines.presence_epoch {e}")))
}

/// A machine and its stored epoch.
#[derive(sqlx::FromRow)]
pub(super) struct MachineEpochRow {
    machine_no: String,
    presence_epoch: i64,
}

pub(super) fn machine_epochs(
    rows: Vec<MachineEpochRow>,
) -> Result<Vec<(MachineNo, u64)>, StorageError> {
    rows.into_iter()
        .map(|r| {
            Ok((
                machine_no(&r.machine_no, "machines.machine_no")?,
                epoch(r.presence_epoch)?,
            ))
        })
        .collect()
}

/// A row of [`super::sql::OWNERSHIP`].
#[derive(sqlx::FromRow)]
pub(super) struct OwnershipRow {
    machine_no: String,
    presence_epoch: i64,
    owner_node: Option<String>,
    online: bool,
    /// Only [`super::sql::OWNERSHIP_SEEN`] reads it.
    #[sqlx(default)]
    last_seen_ms: Option<i64>,
}

impl OwnershipRow {
    pub(super) fn into_ownership(self) -> Result<Ownership, StorageError> {
        Ok(Ownership {
            machine_no: machine_no(&self.machine_no, "machines.machine_no")?,
            epoch: epoch(self.presence_epoch)?,
            node: self.owner_node,
            online: self.online,
        })
    }

    pub(super) fn into_seen(self) -> Result<OwnershipSeen, StorageError> {
        let last_seen = self.last_seen_ms.and_then(DateTime::from_timestamp_millis);
        Ok(OwnershipSeen {
            ownership: self.into_ownership()?,
            last_seen,
        })
    }
}

/// A row of [`super::sql::NODES`].
#[derive(sqlx::FromRow)]
pub(super) struct NodeRowRaw {
    node_id: String,
    incarnation: String,
    started_at_ms: i64,
    heartbeat_at_ms: i64,
    online_machines: i64,
}

impl NodeRowRaw {
    pub(super) fn into_node(self) -> Result<NodeRow, StorageError> {
        Ok(NodeRow {
            started_at: from_ms(self.started_at_ms, "cluster_nodes.started_at_ms")?,
            heartbeat_at: from_ms(self.heartbeat_at_ms, "cluster_nodes.heartbeat_at_ms")?,
            online_machines: to_u64(self.online_machines, "online_machines")?,
            node_id: self.node_id,
            incarnation: self.incarnation,
        })
    }
}

// ------------------------------------------------------- what an insert made

impl Merchant {
    /// The merchant `m` as stored by its insert at `created_at`.
    pub(super) fn created(m: super::NewMerchant, created_at: DateTime<Utc>) -> Merchant {
        Merchant {
            appid: m.appid,
            name: m.name,
            notify_url: m.notify_url,
            appsecret_hash: m.appsecret_hash,
            appsecret_enc: m.appsecret_enc,
            previous_appsecret: None,
            created_at,
            disabled_at: None,
        }
    }
}

impl Machine {
    /// The machine `m` as stored by its insert at `created_at`: offline,
    /// never seen.
    pub(super) fn created(m: super::NewMachine, created_at: DateTime<Utc>) -> Machine {
        Machine {
            machine_no: m.machine_no,
            merchant_appid: m.merchant_appid,
            secret_hash: m.secret_hash,
            previous_secret: None,
            online: false,
            last_seen: None,
            online_since: None,
            created_at,
            disabled_at: None,
            removed_at: None,
        }
    }
}

impl ServiceAccount {
    /// The account `s` as stored by its insert at `created_at`.
    pub(super) fn created(s: super::NewService, created_at: DateTime<Utc>) -> ServiceAccount {
        ServiceAccount {
            username: s.username,
            name: s.name,
            password_hash: s.password_hash,
            created_at,
        }
    }
}

// ------------------------------------------------------------------ rusqlite

/// [`LiteRow`] for a row type, reading each field from the column of its
/// name (`field as "column"` where sqlx renames it), as sqlx's derived
/// `FromRow` does. The struct literal names every field, so a field added
/// to a row type and not here fails to compile.
macro_rules! lite_row {
    ($($row:ident { $($field:ident $(as $col:literal)?),+ $(,)? })+) => {
        $(
            impl LiteRow for $row {
                fn from_lite(row: &rusqlite::Row<'_>) -> rusqlite::Result<Self> {
                    Ok(Self {
                        $($field: row.get(lite_row!(@col $field $($col)?))?,)+
                    })
                }
            }
        )+
    };
    (@col $field:ident $col:literal) => { $col };
    (@col $field:ident) => { stringify!($field) };
}

lite_row! {
    MerchantRow {
        appid, name, notify_url, appsecret_hash, appsecret_enc, created_at_ms,
        prev_appsecret_hash, prev_appsecret_expires_ms, disabled_at_ms,
    }
    MachineRow {
        machine_no, merchant_appid, secret_hash, online, last_seen_ms, online_since_ms,
        created_at_ms, prev_secret_hash, prev_secret_expires_ms, disabled_at_ms, removed_at_ms,
    }
    ServiceRow { username, name, password_hash, created_at_ms }
    OrderRow {
        order_id, merchant_appid, machine_no, out_trade_no, request_fingerprint, pay_later,
        status, amount, refund_amount, error, result_applied, created_at_ms, updated_at_ms,
        dispense_deadline_ms, pay_deadline_ms, refunded_at_ms, refunded_amount, accept_by_ms,
        events_dropped,
    }
    LineRow { order_id, product_id, quantity, dispensed, unit_price }
    OrderEventRow { at_ms, kind, detail }
    InventoryRow { machine_no, product_id, stock, price }
    CandidateRow {
        seq, event_id, merchant_appid, order_key, kind as "type", body, attempts,
        created_at_ms, pending_since_ms, notify_url, appsecret_enc,
    }
    EntryRow {
        event_id, kind as "type", status, attempts, last_error, created_at_ms,
        next_attempt_at_ms, delivered_at_ms, order_id, machine_no,
    }
    BacklogRow { n, oldest }
    WebhookAttemptRow { event_id, kind as "type", at_ms, http_status, error }
    MachineEpochRow { machine_no, presence_epoch }
    NodeRowRaw { node_id, incarnation, started_at_ms, heartbeat_at_ms, online_machines }
}

impl LiteRow for OwnershipRow {
    fn from_lite(row: &rusqlite::Row<'_>) -> rusqlite::Result<Self> {
        Ok(Self {
            machine_no: row.get("machine_no")?,
            presence_epoch: row.get("presence_epoch")?,
            owner_node: row.get("owner_node")?,
            online: row.get("online")?,
            // Only OWNERSHIP_SEEN selects it (`sqlx(default)` on the sqlx
            // side): absent means None.
            last_seen_ms: match row.get("last_seen_ms") {
                Ok(v) => v,
                Err(rusqlite::Error::InvalidColumnName(_)) => None,
                Err(e) => return Err(e),
            },
        })
    }
}
