//! [`LifecycleStorage`] for SQLite. Guarded changes run under `BEGIN
//! IMMEDIATE`: the write lock is the only writer, so the in-flight check and
//! the change see the same orders.

use chrono::{DateTime, Utc};
use sqlx::Row;
use vendgate_proto::machine::MachineNo;

use super::lifecycle::{
    in_flight_sql, purgeable, LifecycleStorage, MachineChange, OrderPage, OrderPurge, Purged,
};
use super::sqlite::{backend, ServiceRow, SqliteStorage};
use super::sqlite_orders::{id_i64, ORDER_COLUMNS};
use super::{ServiceAccount, StorageError, StoredOrder};
use crate::secrets::SecretHash;

type Tx<'a> = sqlx::Transaction<'a, sqlx::Sqlite>;

/// Why a guarded change of machine `m` did not apply, read in its
/// transaction.
async fn refusal(tx: &mut Tx<'_>, m: &MachineNo) -> Result<MachineChange, StorageError> {
    let present: Option<i64> =
        sqlx::query_scalar("SELECT 1 FROM machines WHERE machine_no = ? AND removed_at_ms IS NULL")
            .bind(m.as_str())
            .fetch_optional(&mut **tx)
            .await
            .map_err(backend)?;
    if present.is_none() {
        return Ok(MachineChange::NotFound);
    }
    let n: i64 = sqlx::query_scalar(&format!(
        "SELECT COUNT(*) FROM orders WHERE machine_no = ? AND {}",
        in_flight_sql()
    ))
    .bind(m.as_str())
    .fetch_one(&mut **tx)
    .await
    .map_err(backend)?;
    Ok(MachineChange::OrdersInFlight(n.max(0) as u64))
}

fn marks(n: usize) -> String {
    vec!["?"; n].join(", ")
}

#[async_trait::async_trait]
impl LifecycleStorage for SqliteStorage {
    async fn set_machine_disabled(
        &self,
        m: &MachineNo,
        disabled: Option<DateTime<Utc>>,
    ) -> Result<bool, StorageError> {
        let done = sqlx::query(
            "UPDATE machines SET disabled_at_ms = ? WHERE machine_no = ? AND removed_at_ms IS NULL",
        )
        .bind(disabled.map(|t| t.timestamp_millis()))
        .bind(m.as_str())
        .execute(self.pool())
        .await
        .map_err(backend)?;
        Ok(done.rows_affected() == 1)
    }

    async fn remove_machine(
        &self,
        m: &MachineNo,
        revoked: &SecretHash,
        at: DateTime<Utc>,
    ) -> Result<MachineChange, StorageError> {
        let mut tx = self
            .pool()
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(backend)?;
        let done = sqlx::query(&format!(
            "UPDATE machines SET removed_at_ms = ?1, secret_hash = ?2, \
             prev_secret_hash = NULL, prev_secret_expires_ms = NULL \
             WHERE machine_no = ?3 AND removed_at_ms IS NULL \
             AND NOT EXISTS (SELECT 1 FROM orders WHERE machine_no = ?3 AND {})",
            in_flight_sql()
        ))
        .bind(at.timestamp_millis())
        .bind(revoked.as_str())
        .bind(m.as_str())
        .execute(&mut *tx)
        .await
        .map_err(backend)?;
        let change = if done.rows_affected() == 1 {
            MachineChange::Done
        } else {
            refusal(&mut tx, m).await?
        };
        tx.commit().await.map_err(backend)?;
        Ok(change)
    }

    async fn transfer_machine(
        &self,
        m: &MachineNo,
        to: &str,
    ) -> Result<MachineChange, StorageError> {
        let mut tx = self
            .pool()
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(backend)?;
        let known: Option<i64> = sqlx::query_scalar("SELECT 1 FROM merchants WHERE appid = ?")
            .bind(to)
            .fetch_optional(&mut *tx)
            .await
            .map_err(backend)?;
        if known.is_none() {
            return Err(StorageError::UnknownMerchant);
        }
        let done = sqlx::query(&format!(
            "UPDATE machines SET merchant_appid = ?1 \
             WHERE machine_no = ?2 AND removed_at_ms IS NULL \
             AND NOT EXISTS (SELECT 1 FROM orders WHERE machine_no = ?2 AND {})",
            in_flight_sql()
        ))
        .bind(to)
        .bind(m.as_str())
        .execute(&mut *tx)
        .await
        .map_err(backend)?;
        let change = if done.rows_affected() == 1 {
            MachineChange::Done
        } else {
            refusal(&mut tx, m).await?
        };
        tx.commit().await.map_err(backend)?;
        Ok(change)
    }

    async fn blocked_machines(&self) -> Result<Vec<MachineNo>, StorageError> {
        let rows: Vec<String> = sqlx::query_scalar(
            "SELECT machine_no FROM machines \
             WHERE disabled_at_ms IS NOT NULL OR removed_at_ms IS NOT NULL",
        )
        .fetch_all(self.pool())
        .await
        .map_err(backend)?;
        Ok(rows.iter().filter_map(|m| m.parse().ok()).collect())
    }

    async fn set_merchant_disabled(
        &self,
        appid: &str,
        disabled: Option<DateTime<Utc>>,
    ) -> Result<bool, StorageError> {
        let done = sqlx::query("UPDATE merchants SET disabled_at_ms = ? WHERE appid = ?")
            .bind(disabled.map(|t| t.timestamp_millis()))
            .bind(appid)
            .execute(self.pool())
            .await
            .map_err(backend)?;
        self.forget_merchant(appid);
        Ok(done.rows_affected() == 1)
    }

    async fn set_merchant_notify_url(
        &self,
        appid: &str,
        url: Option<&str>,
    ) -> Result<bool, StorageError> {
        let done = sqlx::query("UPDATE merchants SET notify_url = ? WHERE appid = ?")
            .bind(url)
            .bind(appid)
            .execute(self.pool())
            .await
            .map_err(backend)?;
        self.forget_merchant(appid);
        Ok(done.rows_affected() == 1)
    }

    async fn list_services(&self) -> Result<Vec<ServiceAccount>, StorageError> {
        sqlx::query_as::<_, ServiceRow>(
            "SELECT username, name, password_hash, created_at_ms FROM services ORDER BY username",
        )
        .fetch_all(self.pool())
        .await
        .map_err(backend)?
        .into_iter()
        .map(ServiceRow::into_service)
        .collect()
    }

    async fn remove_service(&self, username: &str) -> Result<bool, StorageError> {
        let done = sqlx::query("DELETE FROM services WHERE username = ?")
            .bind(username)
            .execute(self.pool())
            .await
            .map_err(backend)?;
        Ok(done.rows_affected() == 1)
    }

    async fn export_orders(&self, page: &OrderPage<'_>) -> Result<Vec<StoredOrder>, StorageError> {
        let (after_ms, after_id) = match page.after {
            Some((t, id)) => (t.timestamp_millis(), id_i64(id)?),
            None => (i64::MIN, i64::MIN),
        };
        let rows = sqlx::query(&format!(
            "SELECT {ORDER_COLUMNS} FROM orders \
             WHERE created_at_ms >= ?1 AND created_at_ms < ?2 \
             AND (?3 IS NULL OR merchant_appid = ?3) \
             AND (created_at_ms > ?4 OR (created_at_ms = ?4 AND order_id > ?5)) \
             ORDER BY created_at_ms, order_id LIMIT ?6"
        ))
        .bind(page.from.timestamp_millis())
        .bind(page.to.timestamp_millis())
        .bind(page.merchant)
        .bind(after_ms)
        .bind(after_id)
        .bind(i64::try_from(page.limit).unwrap_or(i64::MAX))
        .fetch_all(self.pool())
        .await
        .map_err(backend)?;
        self.load_orders(rows).await
    }

    async fn purge_orders(&self, rule: &OrderPurge) -> Result<Purged, StorageError> {
        // The batch is chosen and deleted under one write lock, held for
        // one batch only (the purge pauses between batches).
        let mut tx = self
            .pool()
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(backend)?;
        let ids: Vec<i64> = sqlx::query_scalar(&format!(
            "SELECT o.order_id FROM orders o WHERE {} ORDER BY o.updated_at_ms LIMIT ?3",
            purgeable("?1", "?2", "1")
        ))
        .bind(rule.before.timestamp_millis())
        .bind(rule.protected_before.timestamp_millis())
        .bind(i64::try_from(rule.limit).unwrap_or(i64::MAX))
        .fetch_all(&mut *tx)
        .await
        .map_err(backend)?;
        if ids.is_empty() {
            return Ok(Purged::default());
        }
        let list = marks(ids.len());
        let order_events = delete_in(
            &mut tx,
            &format!("DELETE FROM order_events WHERE order_id IN ({list})"),
            &ids,
        )
        .await?;
        delete_in(
            &mut tx,
            &format!("DELETE FROM order_items WHERE order_id IN ({list})"),
            &ids,
        )
        .await?;
        delete_in(
            &mut tx,
            &format!(
                "DELETE FROM outbox_attempts WHERE event_id IN \
                 (SELECT event_id FROM outbox WHERE order_id IN ({list}))"
            ),
            &ids,
        )
        .await?;
        let webhooks = delete_in(
            &mut tx,
            &format!("DELETE FROM outbox WHERE order_id IN ({list})"),
            &ids,
        )
        .await?;
        let orders = delete_in(
            &mut tx,
            &format!("DELETE FROM orders WHERE order_id IN ({list})"),
            &ids,
        )
        .await?;
        tx.commit().await.map_err(backend)?;
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
        let mut tx = self
            .pool()
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(backend)?;
        let rows = sqlx::query(
            "SELECT seq FROM outbox WHERE status IN ('delivered', 'dead') AND created_at_ms < ? \
             ORDER BY created_at_ms LIMIT ?",
        )
        .bind(before.timestamp_millis())
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(&mut *tx)
        .await
        .map_err(backend)?;
        let seqs: Vec<i64> = rows
            .iter()
            .map(|r| r.try_get("seq"))
            .collect::<Result<_, _>>()
            .map_err(backend)?;
        if seqs.is_empty() {
            return Ok(Purged::default());
        }
        let list = marks(seqs.len());
        delete_in(
            &mut tx,
            &format!(
                "DELETE FROM outbox_attempts WHERE event_id IN \
                 (SELECT event_id FROM outbox WHERE seq IN ({list}))"
            ),
            &seqs,
        )
        .await?;
        let webhooks = delete_in(
            &mut tx,
            &format!("DELETE FROM outbox WHERE seq IN ({list})"),
            &seqs,
        )
        .await?;
        tx.commit().await.map_err(backend)?;
        Ok(Purged {
            webhooks,
            ..Purged::default()
        })
    }

    async fn database_size(&self) -> Result<u64, StorageError> {
        let size: i64 = sqlx::query_scalar(
            "SELECT page_count * page_size FROM pragma_page_count(), pragma_page_size()",
        )
        .fetch_one(self.pool())
        .await
        .map_err(backend)?;
        Ok(size.max(0) as u64)
    }
}

/// Run `sql` (one `IN (?, …)` list) with `ids` bound; rows affected.
async fn delete_in(tx: &mut Tx<'_>, sql: &str, ids: &[i64]) -> Result<u64, StorageError> {
    let mut q = sqlx::query(sql);
    for id in ids {
        q = q.bind(*id);
    }
    Ok(q.execute(&mut **tx).await.map_err(backend)?.rows_affected())
}
