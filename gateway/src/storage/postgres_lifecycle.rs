//! [`LifecycleStorage`] for PostgreSQL. A guarded machine change first
//! locks the machine row `FOR UPDATE`: inserting an order takes a key-share
//! lock on it (the foreign key), so the change waits for orders being
//! inserted to commit and then counts them, and later inserts wait for the
//! change.

use chrono::{DateTime, Utc};
use sqlx::postgres::PgConnection;
use vendgate_proto::machine::MachineNo;

use super::lifecycle::{
    in_flight_sql, purgeable, LifecycleStorage, MachineChange, OrderPage, OrderPurge, Purged,
};
use super::postgres::{pg_error, PgStorage};
use super::postgres_orders::ORDER_COLUMNS;
use super::sqlite::{backend, ServiceRow};
use super::sqlite_orders::id_i64;
use super::{ServiceAccount, StorageError, StoredOrder};
use crate::secrets::SecretHash;

/// Lock machine `m`'s row; false if it does not exist or was removed.
async fn lock_machine(conn: &mut PgConnection, m: &MachineNo) -> Result<bool, StorageError> {
    let found: Option<i32> = sqlx::query_scalar(
        "SELECT 1 FROM machines WHERE machine_no = $1 AND removed_at_ms IS NULL FOR UPDATE",
    )
    .bind(m.as_str())
    .fetch_optional(&mut *conn)
    .await
    .map_err(pg_error)?;
    Ok(found.is_some())
}

async fn in_flight(conn: &mut PgConnection, m: &MachineNo) -> Result<u64, StorageError> {
    let n: i64 = sqlx::query_scalar(&format!(
        "SELECT COUNT(*) FROM orders WHERE machine_no = $1 AND {}",
        in_flight_sql()
    ))
    .bind(m.as_str())
    .fetch_one(&mut *conn)
    .await
    .map_err(pg_error)?;
    Ok(n.max(0) as u64)
}

#[async_trait::async_trait]
impl LifecycleStorage for PgStorage {
    async fn set_machine_disabled(
        &self,
        m: &MachineNo,
        disabled: Option<DateTime<Utc>>,
    ) -> Result<bool, StorageError> {
        let done = sqlx::query(
            "UPDATE machines SET disabled_at_ms = $1 \
             WHERE machine_no = $2 AND removed_at_ms IS NULL",
        )
        .bind(disabled.map(|t| t.timestamp_millis()))
        .bind(m.as_str())
        .execute(self.pool())
        .await
        .map_err(pg_error)?;
        Ok(done.rows_affected() == 1)
    }

    async fn remove_machine(
        &self,
        m: &MachineNo,
        revoked: &SecretHash,
        at: DateTime<Utc>,
    ) -> Result<MachineChange, StorageError> {
        let mut tx = self.pool().begin().await.map_err(pg_error)?;
        if !lock_machine(&mut tx, m).await? {
            return Ok(MachineChange::NotFound);
        }
        let n = in_flight(&mut tx, m).await?;
        if n > 0 {
            return Ok(MachineChange::OrdersInFlight(n));
        }
        sqlx::query(
            "UPDATE machines SET removed_at_ms = $1, secret_hash = $2, \
             prev_secret_hash = NULL, prev_secret_expires_ms = NULL WHERE machine_no = $3",
        )
        .bind(at.timestamp_millis())
        .bind(revoked.as_str())
        .bind(m.as_str())
        .execute(&mut *tx)
        .await
        .map_err(pg_error)?;
        tx.commit().await.map_err(pg_error)?;
        Ok(MachineChange::Done)
    }

    async fn transfer_machine(
        &self,
        m: &MachineNo,
        to: &str,
    ) -> Result<MachineChange, StorageError> {
        let mut tx = self.pool().begin().await.map_err(pg_error)?;
        if !lock_machine(&mut tx, m).await? {
            return Ok(MachineChange::NotFound);
        }
        let n = in_flight(&mut tx, m).await?;
        if n > 0 {
            return Ok(MachineChange::OrdersInFlight(n));
        }
        // An unknown merchant violates machines_merchant_fkey: UnknownMerchant.
        sqlx::query("UPDATE machines SET merchant_appid = $1 WHERE machine_no = $2")
            .bind(to)
            .bind(m.as_str())
            .execute(&mut *tx)
            .await
            .map_err(pg_error)?;
        tx.commit().await.map_err(pg_error)?;
        Ok(MachineChange::Done)
    }

    async fn blocked_machines(&self) -> Result<Vec<MachineNo>, StorageError> {
        let rows: Vec<String> = sqlx::query_scalar(
            "SELECT machine_no FROM machines \
             WHERE disabled_at_ms IS NOT NULL OR removed_at_ms IS NOT NULL",
        )
        .fetch_all(self.pool())
        .await
        .map_err(pg_error)?;
        Ok(rows.iter().filter_map(|m| m.parse().ok()).collect())
    }

    async fn set_merchant_disabled(
        &self,
        appid: &str,
        disabled: Option<DateTime<Utc>>,
    ) -> Result<bool, StorageError> {
        let done = sqlx::query("UPDATE merchants SET disabled_at_ms = $1 WHERE appid = $2")
            .bind(disabled.map(|t| t.timestamp_millis()))
            .bind(appid)
            .execute(self.pool())
            .await
            .map_err(pg_error)?;
        self.forget_merchant(appid);
        Ok(done.rows_affected() == 1)
    }

    async fn set_merchant_notify_url(
        &self,
        appid: &str,
        url: Option<&str>,
    ) -> Result<bool, StorageError> {
        let done = sqlx::query("UPDATE merchants SET notify_url = $1 WHERE appid = $2")
            .bind(url)
            .bind(appid)
            .execute(self.pool())
            .await
            .map_err(pg_error)?;
        self.forget_merchant(appid);
        Ok(done.rows_affected() == 1)
    }

    async fn list_services(&self) -> Result<Vec<ServiceAccount>, StorageError> {
        sqlx::query_as::<_, ServiceRow>(
            "SELECT username, name, password_hash, created_at_ms FROM services ORDER BY username",
        )
        .fetch_all(self.pool())
        .await
        .map_err(pg_error)?
        .into_iter()
        .map(ServiceRow::into_service)
        .collect()
    }

    async fn remove_service(&self, username: &str) -> Result<bool, StorageError> {
        let done = sqlx::query("DELETE FROM services WHERE username = $1")
            .bind(username)
            .execute(self.pool())
            .await
            .map_err(pg_error)?;
        Ok(done.rows_affected() == 1)
    }

    async fn export_orders(&self, page: &OrderPage<'_>) -> Result<Vec<StoredOrder>, StorageError> {
        let (after_ms, after_id) = match page.after {
            Some((t, id)) => (t.timestamp_millis(), id_i64(id)?),
            None => (i64::MIN, i64::MIN),
        };
        let rows = sqlx::query(&format!(
            "SELECT {ORDER_COLUMNS} FROM orders \
             WHERE created_at_ms >= $1 AND created_at_ms < $2 \
             AND ($3::text IS NULL OR merchant_appid = $3) \
             AND (created_at_ms > $4 OR (created_at_ms = $4 AND order_id > $5)) \
             ORDER BY created_at_ms, order_id LIMIT $6"
        ))
        .bind(page.from.timestamp_millis())
        .bind(page.to.timestamp_millis())
        .bind(page.merchant)
        .bind(after_ms)
        .bind(after_id)
        .bind(i64::try_from(page.limit).unwrap_or(i64::MAX))
        .fetch_all(self.pool())
        .await
        .map_err(pg_error)?;
        self.load_orders(rows).await
    }

    async fn purge_orders(&self, rule: &OrderPurge) -> Result<Purged, StorageError> {
        let mut tx = self.pool().begin().await.map_err(pg_error)?;
        // SKIP LOCKED: an order some node is updating right now waits for
        // the next batch instead of holding this one.
        let ids: Vec<i64> = sqlx::query_scalar(&format!(
            "SELECT o.order_id FROM orders o WHERE {} ORDER BY o.updated_at_ms LIMIT $3 \
             FOR UPDATE SKIP LOCKED",
            purgeable("$1", "$2", "true")
        ))
        .bind(rule.before.timestamp_millis())
        .bind(rule.protected_before.timestamp_millis())
        .bind(i64::try_from(rule.limit).unwrap_or(i64::MAX))
        .fetch_all(&mut *tx)
        .await
        .map_err(pg_error)?;
        if ids.is_empty() {
            return Ok(Purged::default());
        }
        let exec = |sql: &'static str| sqlx::query(sql).bind(&ids);
        let order_events = exec("DELETE FROM order_events WHERE order_id = ANY($1)")
            .execute(&mut *tx)
            .await
            .map_err(pg_error)?
            .rows_affected();
        exec("DELETE FROM order_items WHERE order_id = ANY($1)")
            .execute(&mut *tx)
            .await
            .map_err(pg_error)?;
        exec(
            "DELETE FROM outbox_attempts WHERE event_id IN \
             (SELECT event_id FROM outbox WHERE order_id = ANY($1))",
        )
        .execute(&mut *tx)
        .await
        .map_err(pg_error)?;
        let webhooks = exec("DELETE FROM outbox WHERE order_id = ANY($1)")
            .execute(&mut *tx)
            .await
            .map_err(pg_error)?
            .rows_affected();
        let orders = exec("DELETE FROM orders WHERE order_id = ANY($1)")
            .execute(&mut *tx)
            .await
            .map_err(pg_error)?
            .rows_affected();
        tx.commit().await.map_err(pg_error)?;
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
        let mut tx = self.pool().begin().await.map_err(pg_error)?;
        let seqs: Vec<i64> = sqlx::query_scalar(
            "SELECT seq FROM outbox WHERE status IN ('delivered', 'dead') AND created_at_ms < $1 \
             ORDER BY created_at_ms LIMIT $2 FOR UPDATE SKIP LOCKED",
        )
        .bind(before.timestamp_millis())
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(&mut *tx)
        .await
        .map_err(pg_error)?;
        if seqs.is_empty() {
            return Ok(Purged::default());
        }
        sqlx::query(
            "DELETE FROM outbox_attempts WHERE event_id IN \
             (SELECT event_id FROM outbox WHERE seq = ANY($1))",
        )
        .bind(&seqs)
        .execute(&mut *tx)
        .await
        .map_err(pg_error)?;
        let webhooks = sqlx::query("DELETE FROM outbox WHERE seq = ANY($1)")
            .bind(&seqs)
            .execute(&mut *tx)
            .await
            .map_err(pg_error)?
            .rows_affected();
        tx.commit().await.map_err(pg_error)?;
        Ok(Purged {
            webhooks,
            ..Purged::default()
        })
    }

    async fn database_size(&self) -> Result<u64, StorageError> {
        let size: i64 = sqlx::query_scalar("SELECT pg_database_size(current_database())")
            .fetch_one(self.pool())
            .await
            .map_err(backend)?;
        Ok(size.max(0) as u64)
    }
}
