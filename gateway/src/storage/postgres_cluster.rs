//! [`ClusterStorage`] for PostgreSQL: what several nodes agree on through the
//! shared database. Ownership epochs are one `UPDATE … RETURNING` (the row
//! lock orders concurrent takers), sweeps claim with `FOR UPDATE SKIP
//! LOCKED`, reaping deletes with `RETURNING` (a row deleted by another reaper
//! is not returned twice).

use chrono::{DateTime, Utc};
use sqlx::postgres::{PgConnection, PgRow};
use sqlx::Row;
use vendgate_proto::machine::MachineNo;

use super::cluster::{ClusterStorage, Due, NodeRow, Ownership};
use super::postgres::{get_machine_no, get_ms, get_u64, pg_error, to_i64, PgStorage};
use super::postgres_orders::ORDER_COLUMNS;
use super::sqlite::backend;
use super::{StorageError, StoredOrder};

fn machine_epochs(rows: &[PgRow]) -> Result<Vec<(MachineNo, u64)>, StorageError> {
    rows.iter()
        .map(|r| {
            Ok((
                get_machine_no(r, "machine_no")?,
                get_u64(r, "presence_epoch")?,
            ))
        })
        .collect()
}

fn ownership_row(row: &PgRow) -> Result<Ownership, StorageError> {
    Ok(Ownership {
        machine_no: get_machine_no(row, "machine_no")?,
        epoch: get_u64(row, "presence_epoch")?,
        node: row.try_get("owner_node").map_err(backend)?,
        online: row.try_get("online").map_err(backend)?,
    })
}

/// Online machines owned by `node`, inside the caller's transaction.
async fn owned_online(
    conn: &mut PgConnection,
    node: &str,
) -> Result<Vec<(MachineNo, u64)>, StorageError> {
    let rows = sqlx::query(
        "SELECT machine_no, presence_epoch FROM machines \
         WHERE online AND owner_node = $1 ORDER BY machine_no",
    )
    .bind(node)
    .fetch_all(&mut *conn)
    .await
    .map_err(pg_error)?;
    machine_epochs(&rows)
}

/// The WHERE condition and sort column of a sweep kind (as in SQLite); `$1`
/// is now, `$3` the stale-dispatch cut-off.
fn due_filter(due: Due) -> (&'static str, &'static str) {
    match due {
        Due::Unpaid => (
            "status = 'awaiting_payment' AND pay_deadline_ms <= $1",
            "pay_deadline_ms",
        ),
        Due::DispenseDeadline => (
            "status = 'dispensing' AND dispense_deadline_ms <= $1",
            "dispense_deadline_ms",
        ),
        Due::StaleDispatch { .. } => (
            "status = 'dispatching' AND updated_at_ms < $3",
            "updated_at_ms",
        ),
    }
}

fn due_key(due: Due, o: &StoredOrder) -> (Option<DateTime<Utc>>, u64) {
    let at = match due {
        Due::Unpaid => o.pay_deadline,
        Due::DispenseDeadline => o.dispense_deadline,
        Due::StaleDispatch { .. } => Some(o.updated_at),
    };
    (at, o.order_id)
}

#[async_trait::async_trait]
impl ClusterStorage for PgStorage {
    async fn take_ownership(
        &self,
        m: &MachineNo,
        node: &str,
        at: DateTime<Utc>,
    ) -> Result<Option<u64>, StorageError> {
        // Concurrent takers queue on the row lock; each increments the
        // committed value of the one before, so the epochs differ.
        let epoch: Option<i64> = sqlx::query_scalar(
            "UPDATE machines SET presence_epoch = presence_epoch + 1, \
             owner_node = $1, last_seen_ms = $2 \
             WHERE machine_no = $3 RETURNING presence_epoch",
        )
        .bind(node)
        .bind(at.timestamp_millis())
        .bind(m.as_str())
        .fetch_optional(self.pool())
        .await
        .map_err(pg_error)?;
        epoch
            .map(|e| {
                u64::try_from(e)
                    .map_err(|_| StorageError::Corrupt(format!("machines.presence_epoch {e}")))
            })
            .transpose()
    }

    async fn ownership(
        &self,
        machines: Option<&[MachineNo]>,
    ) -> Result<Vec<Ownership>, StorageError> {
        const COLUMNS: &str = "machine_no, presence_epoch, owner_node, online";
        let rows = match machines {
            None => {
                sqlx::query(&format!(
                    "SELECT {COLUMNS} FROM machines ORDER BY machine_no"
                ))
                .fetch_all(self.pool())
                .await
            }
            Some(ms) => {
                let nos: Vec<&str> = ms.iter().map(|m| m.as_str()).collect();
                sqlx::query(&format!(
                    "SELECT {COLUMNS} FROM machines WHERE machine_no = ANY($1) ORDER BY machine_no"
                ))
                .bind(&nos)
                .fetch_all(self.pool())
                .await
            }
        }
        .map_err(pg_error)?;
        rows.iter().map(ownership_row).collect()
    }

    async fn register_node(
        &self,
        node: &str,
        incarnation: &str,
        at: DateTime<Utc>,
    ) -> Result<Vec<(MachineNo, u64)>, StorageError> {
        let mut tx = self.pool().begin().await.map_err(pg_error)?;
        sqlx::query(
            "INSERT INTO cluster_nodes (node_id, incarnation, started_at_ms, heartbeat_at_ms) \
             VALUES ($1, $2, $3, $3) ON CONFLICT (node_id) DO UPDATE SET \
             incarnation = excluded.incarnation, started_at_ms = excluded.started_at_ms, \
             heartbeat_at_ms = excluded.heartbeat_at_ms",
        )
        .bind(node)
        .bind(incarnation)
        .bind(at.timestamp_millis())
        .execute(&mut *tx)
        .await
        .map_err(pg_error)?;
        let left = owned_online(&mut tx, node).await?;
        tx.commit().await.map_err(pg_error)?;
        Ok(left)
    }

    async fn node_heartbeat(
        &self,
        node: &str,
        incarnation: &str,
        at: DateTime<Utc>,
    ) -> Result<bool, StorageError> {
        let done = sqlx::query(
            "UPDATE cluster_nodes SET heartbeat_at_ms = $1 \
             WHERE node_id = $2 AND incarnation = $3",
        )
        .bind(at.timestamp_millis())
        .bind(node)
        .bind(incarnation)
        .execute(self.pool())
        .await
        .map_err(pg_error)?;
        Ok(done.rows_affected() == 1)
    }

    async fn reap_nodes(&self, dead_before: DateTime<Utc>) -> Result<Vec<String>, StorageError> {
        // A concurrent reaper that deleted a row first makes this statement
        // wait for it, then skip the row: each node is returned once.
        let mut reaped: Vec<String> = sqlx::query_scalar(
            "DELETE FROM cluster_nodes WHERE heartbeat_at_ms < $1 RETURNING node_id",
        )
        .bind(dead_before.timestamp_millis())
        .fetch_all(self.pool())
        .await
        .map_err(pg_error)?;
        reaped.sort();
        Ok(reaped)
    }

    async fn orphaned_machines(&self, limit: usize) -> Result<Vec<(MachineNo, u64)>, StorageError> {
        // As in SQLite, a NULL owner has no node row either.
        let rows = sqlx::query(
            "SELECT machine_no, presence_epoch FROM machines m \
             WHERE online AND NOT EXISTS \
               (SELECT 1 FROM cluster_nodes n WHERE n.node_id = m.owner_node) \
             ORDER BY machine_no LIMIT $1",
        )
        .bind(to_i64(limit, "limit")?)
        .fetch_all(self.pool())
        .await
        .map_err(pg_error)?;
        machine_epochs(&rows)
    }

    async fn nodes(&self) -> Result<Vec<NodeRow>, StorageError> {
        let rows = sqlx::query(
            "SELECT n.node_id, n.incarnation, n.started_at_ms, n.heartbeat_at_ms, \
               (SELECT COUNT(*) FROM machines m WHERE m.online AND m.owner_node = n.node_id) \
               AS online_machines \
             FROM cluster_nodes n ORDER BY n.node_id",
        )
        .fetch_all(self.pool())
        .await
        .map_err(pg_error)?;
        rows.iter()
            .map(|r| {
                Ok(NodeRow {
                    node_id: r.try_get("node_id").map_err(backend)?,
                    incarnation: r.try_get("incarnation").map_err(backend)?,
                    started_at: get_ms(r, "started_at_ms")?,
                    heartbeat_at: get_ms(r, "heartbeat_at_ms")?,
                    online_machines: get_u64(r, "online_machines")?,
                })
            })
            .collect()
    }

    async fn claim_due_orders(
        &self,
        due: Due,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
        limit: usize,
    ) -> Result<Vec<StoredOrder>, StorageError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let (filter, order_by) = due_filter(due);
        let stale_before = match due {
            Due::StaleDispatch { updated_before } => updated_before.timestamp_millis(),
            _ => 0,
        };
        // Rows another sweep is claiming right now are skipped, not waited
        // for; a row it leased meanwhile is re-checked after its lock and is
        // no longer claimable. A lease runs out at its instant (as in SQLite).
        let sql = format!(
            "UPDATE orders SET sweep_lease_until_ms = $2 WHERE order_id IN ( \
               SELECT order_id FROM orders WHERE {filter} \
                 AND (sweep_lease_until_ms IS NULL OR sweep_lease_until_ms <= $1) \
               ORDER BY {order_by}, order_id LIMIT $4 FOR UPDATE SKIP LOCKED) \
             RETURNING {ORDER_COLUMNS}"
        );
        let rows = sqlx::query(&sql)
            .bind(now.timestamp_millis())
            .bind(lease_until.timestamp_millis())
            .bind(stale_before)
            .bind(to_i64(limit, "limit")?)
            .fetch_all(self.pool())
            .await
            .map_err(pg_error)?;
        let mut orders = self.load_orders(rows).await?;
        // RETURNING does not keep the subquery's order.
        orders.sort_by_key(|o| due_key(due, o));
        Ok(orders)
    }

    async fn pending_cancels(&self, m: &MachineNo) -> Result<Vec<u64>, StorageError> {
        let ids: Vec<i64> = sqlx::query_scalar(
            "SELECT order_id FROM orders WHERE machine_no = $1 AND cancel_pending \
             ORDER BY updated_at_ms, order_id",
        )
        .bind(m.as_str())
        .fetch_all(self.pool())
        .await
        .map_err(pg_error)?;
        ids.into_iter()
            .map(|id| {
                u64::try_from(id).map_err(|_| StorageError::Corrupt("orders.order_id".into()))
            })
            .collect()
    }

    async fn cancel_delivered(&self, order_id: u64) -> Result<(), StorageError> {
        let Ok(id) = i64::try_from(order_id) else {
            // No such order can be stored.
            return Ok(());
        };
        sqlx::query(
            "UPDATE orders SET cancel_pending = false WHERE order_id = $1 AND cancel_pending",
        )
        .bind(id)
        .execute(self.pool())
        .await
        .map_err(pg_error)?;
        Ok(())
    }

    async fn open_orders(&self, m: &MachineNo) -> Result<Vec<StoredOrder>, StorageError> {
        let rows = sqlx::query(&format!(
            "SELECT {ORDER_COLUMNS} FROM orders WHERE machine_no = $1 \
             AND status IN ('awaiting_payment', 'dispatching', 'dispensing') ORDER BY order_id"
        ))
        .bind(m.as_str())
        .fetch_all(self.pool())
        .await
        .map_err(pg_error)?;
        self.load_orders(rows).await
    }
}
