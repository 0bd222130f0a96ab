//! The account lifecycle, export and retention operations, written once for every `Backend`.

use crate::secrets::SecretHash;
use crate::storage::backend::Backend;
use crate::storage::lifecycle::*;
use crate::storage::ops::accounts::update_merchant;
use crate::storage::ops::orders::orders;
use crate::storage::rows::{id_i64, opt_ms, ServiceRow};
use crate::storage::run::{Run, Stmt, Transaction, Value};
use crate::storage::{sql, ServiceAccount, StorageError, StoredOrder};
use chrono::{DateTime, Utc};
use vendgate_proto::machine::MachineNo;

/// Machine `m`'s orders in flight (holding stock).
pub(crate) async fn in_flight(conn: &mut impl Run, m: &MachineNo) -> Result<u64, StorageError> {
    let select = Stmt::new(sql::machine_in_flight()).bind(m.as_str());
    let (n,): (i64,) = conn.fetch_one(select).await?;
    Ok(n.max(0) as u64)
}

/// Run each delete of `statements` (each with the one set of `set`, see
/// [`sql::set_of`]) in `tx`, in order; the rows each deleted.
async fn delete_each<const N: usize>(
    tx: &mut impl Run,
    statements: [String; N],
    values: Vec<Value<'_>>,
) -> Result<[u64; N], StorageError> {
    let mut deleted = [0; N];
    for (sql, n) in statements.iter().zip(deleted.iter_mut()) {
        *n = tx.execute(Stmt::new(sql).bind_all(values.clone())).await?;
    }
    Ok(deleted)
}

#[async_trait::async_trait]
impl<B: Backend> LifecycleStorage for B {
    async fn set_machine_disabled(
        &self,
        m: &MachineNo,
        disabled: Option<DateTime<Utc>>,
    ) -> Result<bool, StorageError> {
        let update = Stmt::new(sql::SET_MACHINE_DISABLED)
            .bind(opt_ms(disabled))
            .bind(m.as_str());
        Ok(self.pooled().execute(update).await? == 1)
    }

    async fn remove_machine(
        &self,
        m: &MachineNo,
        revoked: &SecretHash,
        at: DateTime<Utc>,
    ) -> Result<MachineChange, StorageError> {
        self.change_machine(m, MachineUpdate::Remove { revoked, at })
            .await
    }

    async fn transfer_machine(
        &self,
        m: &MachineNo,
        to: &str,
    ) -> Result<MachineChange, StorageError> {
        self.change_machine(m, MachineUpdate::Transfer { to }).await
    }

    async fn blocked_machines(&self) -> Result<Vec<MachineNo>, StorageError> {
        let rows: Vec<(String,)> = self
            .pooled()
            .fetch_all(Stmt::new(sql::BLOCKED_MACHINES))
            .await?;
        Ok(rows.iter().filter_map(|(m,)| m.parse().ok()).collect())
    }

    async fn set_merchant_disabled(
        &self,
        appid: &str,
        disabled: Option<DateTime<Utc>>,
    ) -> Result<bool, StorageError> {
        let update = Stmt::new(sql::SET_MERCHANT_DISABLED)
            .bind(opt_ms(disabled))
            .bind(appid);
        update_merchant(self, appid, update).await
    }

    async fn set_merchant_notify_url(
        &self,
        appid: &str,
        url: Option<&str>,
    ) -> Result<bool, StorageError> {
        update_merchant(
            self,
            appid,
            Stmt::new(sql::SET_NOTIFY_URL).bind(url).bind(appid),
        )
        .await
    }

    async fn list_services(&self) -> Result<Vec<ServiceAccount>, StorageError> {
        self.pooled()
            .fetch_all::<ServiceRow>(Stmt::new(sql::SERVICES))
            .await?
            .into_iter()
            .map(ServiceRow::into_service)
            .collect()
    }

    async fn remove_service(&self, username: &str) -> Result<bool, StorageError> {
        let delete = Stmt::new(sql::REMOVE_SERVICE).bind(username);
        Ok(self.pooled().execute(delete).await? == 1)
    }

    async fn export_orders(&self, page: &OrderPage<'_>) -> Result<Vec<StoredOrder>, StorageError> {
        let (after_ms, after_id) = match page.after {
            Some((t, id)) => (t.timestamp_millis(), id_i64(id)?),
            None => (i64::MIN, i64::MIN),
        };
        let select = Stmt::new(sql::EXPORT_ORDERS)
            .bind(page.from.timestamp_millis())
            .bind(page.to.timestamp_millis())
            .bind(page.merchant)
            .bind(after_ms)
            .bind(after_id)
            .bind(i64::try_from(page.limit).unwrap_or(i64::MAX));
        orders(self, select).await
    }

    async fn purge_orders(&self, rule: &OrderPurge) -> Result<Purged, StorageError> {
        // The batch is chosen and deleted in one transaction, which on
        // SQLite holds the write lock for one batch only (the purge pauses
        // between batches).
        let mut tx = self.begin(true).await?;
        let select = Stmt::new(sql::purge_orders_batch(Self::DIALECT))
            .bind(rule.before.timestamp_millis())
            .bind(rule.protected_before.timestamp_millis())
            .bind(i64::try_from(rule.limit).unwrap_or(i64::MAX));
        let ids: Vec<(i64,)> = tx.fetch_all(select).await?;
        if ids.is_empty() {
            return Ok(Purged::default());
        }
        let ids = ids.into_iter().map(|(id,)| id).collect();
        let (set, values) = sql::set_of(Self::DIALECT, Value::Ints(ids));
        let [order_events, _, _, webhooks, orders] =
            delete_each(&mut tx, sql::purge_order_rows(&set), values).await?;
        tx.commit().await?;
        Ok(Purged {
            orders,
            order_events,
            webhooks,
        })
    }

    async fn purge_webhooks(
        &self,
        before: DateTime<Utc>,
        limit: usize,
    ) -> Result<Purged, StorageError> {
        let mut tx = self.begin(true).await?;
        let select = Stmt::new(sql::PURGE_WEBHOOKS_BATCH.of(Self::DIALECT))
            .bind(before.timestamp_millis())
            .bind(i64::try_from(limit).unwrap_or(i64::MAX));
        let seqs: Vec<(i64,)> = tx.fetch_all(select).await?;
        if seqs.is_empty() {
            return Ok(Purged::default());
        }
        let seqs = seqs.into_iter().map(|(seq,)| seq).collect();
        let (set, values) = sql::set_of(Self::DIALECT, Value::Ints(seqs));
        let [_, webhooks] = delete_each(&mut tx, sql::purge_webhook_rows(&set), values).await?;
        tx.commit().await?;
        Ok(Purged {
            webhooks,
            ..Purged::default()
        })
    }

    async fn database_size(&self) -> Result<u64, StorageError> {
        let select = Stmt::new(sql::DATABASE_SIZE.of(Self::DIALECT));
        let (size,): (i64,) = self.pooled().fetch_one(select).await?;
        Ok(size.max(0) as u64)
    }
}

impl<'a> MachineUpdate<'a> {
    /// The UPDATE of machine `m`. `guarded`: the statement itself checks
    /// that the machine is present and has no order in flight (SQLite,
    /// under its write lock); PostgreSQL checks both first, under the
    /// machine row's lock.
    pub(crate) fn stmt(self, m: &'a MachineNo, guarded: bool) -> Stmt<'a> {
        match self {
            MachineUpdate::Remove { revoked, at } => Stmt::new(sql::remove_machine(guarded))
                .bind(at.timestamp_millis())
                .bind(revoked.as_str())
                .bind(m.as_str()),
            MachineUpdate::Transfer { to } => Stmt::new(sql::transfer_machine(guarded))
                .bind(to)
                .bind(m.as_str()),
        }
    }
}
