//! [`ClusterStorage`] for SQLite: ownership epochs, node rows, leased order
//! sweeps and owed cancels. Writes go through the group-commit writer like
//! the order path's, so they queue behind it instead of on the file lock.

use chrono::{DateTime, Utc};
use sqlx::sqlite::{SqliteConnection, SqliteRow};
use sqlx::Row;
use vendgate_proto::machine::MachineNo;

use super::cluster::{ClusterStorage, Due, NodeRow, Ownership};
use super::sqlite::{backend, from_ms, SqliteStorage};
use super::sqlite_orders::{id_i64, ORDER_COLUMNS};
use super::{StorageError, StoredOrder};

/// Machine numbers per `IN (…)` list: far below SQLite's variable limit.
const IN_CHUNK: usize = 500;

fn machine_no(row: &SqliteRow) -> Result<MachineNo, StorageError> {
    let m: String = row.try_get("machine_no").map_err(backend)?;
    m.parse::<MachineNo>()
        .map_err(|_| StorageError::Corrupt(format!("machines.machine_no {m:?}")))
}

fn epoch(row: &SqliteRow) -> Result<u64, StorageError> {
    let e: i64 = row.try_get("presence_epoch").map_err(backend)?;
    u64::try_from(e).map_err(|_| StorageError::Corrupt(format!("machines.presence_epoch {e}")))
}

/// (machine, stored epoch) pairs of a `machine_no, presence_epoch` query.
fn machine_epochs(rows: &[SqliteRow]) -> Result<Vec<(MachineNo, u64)>, StorageError> {
    rows.iter()
        .map(|r| Ok((machine_no(r)?, epoch(r)?)))
        .collect()
}

fn ownership_row(row: &SqliteRow) -> Result<Ownership, StorageError> {
    Ok(Ownership {
        machine_no: machine_no(row)?,
        epoch: epoch(row)?,
        node: row.try_get("owner_node").map_err(backend)?,
        online: row.try_get::<i64, _>("online").map_err(backend)? != 0,
    })
}

fn to_i64(n: usize, what: &str) -> Result<i64, StorageError> {
    i64::try_from(n).map_err(|_| StorageError::Corrupt(format!("{what} out of range")))
}

/// Online machines owned by `node`, inside the caller's transaction.
async fn owned_online(
    conn: &mut SqliteConnection,
    node: &str,
) -> Result<Vec<(MachineNo, u64)>, StorageError> {
    let rows = sqlx::query(
        "SELECT machine_no, presence_epoch FROM machines \
         WHERE online = 1 AND owner_node = ? ORDER BY machine_no",
    )
    .bind(node)
    .fetch_all(&mut *conn)
    .await
    .map_err(backend)?;
    machine_epochs(&rows)
}

/// The WHERE condition and sort column of a sweep kind; `?1` is now, `?3`
/// the stale-dispatch cut-off.
fn due_filter(due: Due) -> (&'static str, &'static str) {
    match due {
        Due::Unpaid => (
            "status = 'awaiting_payment' AND pay_deadline_ms <= ?1",
            "pay_deadline_ms",
        ),
        Due::DispenseDeadline => (
            "status = 'dispensing' AND dispense_deadline_ms <= ?1",
            "dispense_deadline_ms",
        ),
        Due::StaleDispatch { .. } => (
            "status = 'dispatching' AND updated_at_ms < ?3",
            "updated_at_ms",
        ),
    }
}

/// The sort key of a claimed order, to give the claim back oldest first
/// (RETURNING does not keep the subquery's order).
fn due_key(due: Due, o: &StoredOrder) -> (Option<DateTime<Utc>>, u64) {
    let at = match due {
        Due::Unpaid => o.pay_deadline,
        Due::DispenseDeadline => o.dispense_deadline,
        Due::StaleDispatch { .. } => Some(o.updated_at),
    };
    (at, o.order_id)
}

#[async_trait::async_trait]
impl ClusterStorage for SqliteStorage {
    async fn take_ownership(
        &self,
        m: &MachineNo,
        node: &str,
        at: DateTime<Utc>,
    ) -> Result<Option<u64>, StorageError> {
        let (m, node, at) = (
            m.as_str().to_string(),
            node.to_string(),
            at.timestamp_millis(),
        );
        // One statement: the increment reads and writes the row under the
        // write lock, so two callers always get two different epochs.
        let epoch: Option<i64> = self
            .writer()
            .write_value(move |conn| {
                Box::pin(async move {
                    sqlx::query_scalar(
                        "UPDATE machines SET presence_epoch = presence_epoch + 1, \
                         owner_node = ?1, last_seen_ms = ?2 \
                         WHERE machine_no = ?3 RETURNING presence_epoch",
                    )
                    .bind(node)
                    .bind(at)
                    .bind(m)
                    .fetch_optional(&mut *conn)
                    .await
                    .map_err(backend)
                })
            })
            .await?;
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
        let Some(machines) = machines else {
            let rows = sqlx::query(&format!(
                "SELECT {COLUMNS} FROM machines ORDER BY machine_no"
            ))
            .fetch_all(self.pool())
            .await
            .map_err(backend)?;
            return rows.iter().map(ownership_row).collect();
        };
        let mut out = Vec::with_capacity(machines.len());
        for chunk in machines.chunks(IN_CHUNK) {
            let marks = vec!["?"; chunk.len()].join(", ");
            let sql = format!("SELECT {COLUMNS} FROM machines WHERE machine_no IN ({marks})");
            let mut q = sqlx::query(&sql);
            for m in chunk {
                q = q.bind(m.as_str());
            }
            for row in q.fetch_all(self.pool()).await.map_err(backend)? {
                out.push(ownership_row(&row)?);
            }
        }
        // Chunks come back in any order, and a machine asked for twice once.
        out.sort_by(|a, b| a.machine_no.as_str().cmp(b.machine_no.as_str()));
        out.dedup_by(|a, b| a.machine_no == b.machine_no);
        Ok(out)
    }

    async fn register_node(
        &self,
        node: &str,
        incarnation: &str,
        at: DateTime<Utc>,
    ) -> Result<Vec<(MachineNo, u64)>, StorageError> {
        let (node, incarnation, at) = (
            node.to_string(),
            incarnation.to_string(),
            at.timestamp_millis(),
        );
        self.writer()
            .write_value(move |conn| {
                Box::pin(async move {
                    sqlx::query(
                        "INSERT INTO cluster_nodes \
                         (node_id, incarnation, started_at_ms, heartbeat_at_ms) \
                         VALUES (?1, ?2, ?3, ?3) \
                         ON CONFLICT (node_id) DO UPDATE SET incarnation = excluded.incarnation, \
                         started_at_ms = excluded.started_at_ms, \
                         heartbeat_at_ms = excluded.heartbeat_at_ms",
                    )
                    .bind(&node)
                    .bind(&incarnation)
                    .bind(at)
                    .execute(&mut *conn)
                    .await
                    .map_err(backend)?;
                    owned_online(conn, &node).await
                })
            })
            .await
    }

    async fn node_heartbeat(
        &self,
        node: &str,
        incarnation: &str,
        at: DateTime<Utc>,
    ) -> Result<bool, StorageError> {
        let (node, incarnation, at) = (
            node.to_string(),
            incarnation.to_string(),
            at.timestamp_millis(),
        );
        self.writer()
            .write(move |conn| {
                Box::pin(async move {
                    let done = sqlx::query(
                        "UPDATE cluster_nodes SET heartbeat_at_ms = ? \
                         WHERE node_id = ? AND incarnation = ?",
                    )
                    .bind(at)
                    .bind(node)
                    .bind(incarnation)
                    .execute(&mut *conn)
                    .await
                    .map_err(backend)?;
                    Ok(done.rows_affected() == 1)
                })
            })
            .await
    }

    async fn reap_nodes(&self, dead_before: DateTime<Utc>) -> Result<Vec<String>, StorageError> {
        let before = dead_before.timestamp_millis();
        let mut reaped: Vec<String> = self
            .writer()
            .write_value(move |conn| {
                Box::pin(async move {
                    sqlx::query_scalar(
                        "DELETE FROM cluster_nodes WHERE heartbeat_at_ms < ? RETURNING node_id",
                    )
                    .bind(before)
                    .fetch_all(&mut *conn)
                    .await
                    .map_err(backend)
                })
            })
            .await?;
        reaped.sort();
        Ok(reaped)
    }

    async fn orphaned_machines(&self, limit: usize) -> Result<Vec<(MachineNo, u64)>, StorageError> {
        // A NULL owner has no node row either: online without an owner was
        // written by a single-node process, which is not running in a
        // cluster (it would fight the nodes over presence).
        let rows = sqlx::query(
            "SELECT machine_no, presence_epoch FROM machines m \
             WHERE online = 1 AND NOT EXISTS \
               (SELECT 1 FROM cluster_nodes n WHERE n.node_id = m.owner_node) \
             ORDER BY machine_no LIMIT ?",
        )
        .bind(to_i64(limit, "limit")?)
        .fetch_all(self.pool())
        .await
        .map_err(backend)?;
        machine_epochs(&rows)
    }

    async fn nodes(&self) -> Result<Vec<NodeRow>, StorageError> {
        let rows = sqlx::query(
            "SELECT n.node_id, n.incarnation, n.started_at_ms, n.heartbeat_at_ms, \
               (SELECT COUNT(*) FROM machines m WHERE m.online = 1 AND m.owner_node = n.node_id) \
               AS online_machines \
             FROM cluster_nodes n ORDER BY n.node_id",
        )
        .fetch_all(self.pool())
        .await
        .map_err(backend)?;
        rows.iter()
            .map(|r| {
                let n: i64 = r.try_get("online_machines").map_err(backend)?;
                Ok(NodeRow {
                    node_id: r.try_get("node_id").map_err(backend)?,
                    incarnation: r.try_get("incarnation").map_err(backend)?,
                    started_at: from_ms(
                        r.try_get("started_at_ms").map_err(backend)?,
                        "cluster_nodes.started_at_ms",
                    )?,
                    heartbeat_at: from_ms(
                        r.try_get("heartbeat_at_ms").map_err(backend)?,
                        "cluster_nodes.heartbeat_at_ms",
                    )?,
                    online_machines: u64::try_from(n)
                        .map_err(|_| StorageError::Corrupt("count".into()))?,
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
        // Select and lease in one statement under the writer's write lock:
        // a concurrent claimer (another process) runs before or after it
        // and then finds these rows leased. A lease runs out at its instant.
        let sql = format!(
            "UPDATE orders SET sweep_lease_until_ms = ?2 WHERE order_id IN ( \
               SELECT order_id FROM orders WHERE {filter} \
                 AND (sweep_lease_until_ms IS NULL OR sweep_lease_until_ms <= ?1) \
               ORDER BY {order_by}, order_id LIMIT ?4) \
             RETURNING {ORDER_COLUMNS}"
        );
        let (now_ms, lease_ms, limit) = (
            now.timestamp_millis(),
            lease_until.timestamp_millis(),
            to_i64(limit, "limit")?,
        );
        let rows = self
            .writer()
            .write_value(move |conn| {
                Box::pin(async move {
                    sqlx::query(&sql)
                        .bind(now_ms)
                        .bind(lease_ms)
                        .bind(stale_before)
                        .bind(limit)
                        .fetch_all(&mut *conn)
                        .await
                        .map_err(backend)
                })
            })
            .await?;
        let mut orders = self.load_orders(rows).await?;
        orders.sort_by_key(|o| due_key(due, o));
        Ok(orders)
    }

    async fn pending_cancels(&self, m: &MachineNo) -> Result<Vec<u64>, StorageError> {
        let ids: Vec<i64> = sqlx::query_scalar(
            "SELECT order_id FROM orders WHERE machine_no = ? AND cancel_pending = 1 \
             ORDER BY updated_at_ms, order_id",
        )
        .bind(m.as_str())
        .fetch_all(self.pool())
        .await
        .map_err(backend)?;
        ids.into_iter()
            .map(|id| {
                u64::try_from(id).map_err(|_| StorageError::Corrupt("orders.order_id".into()))
            })
            .collect()
    }

    async fn cancel_delivered(&self, order_id: u64) -> Result<(), StorageError> {
        let Ok(id) = id_i64(order_id) else {
            // No such order can be stored.
            return Ok(());
        };
        self.writer()
            .write(move |conn| {
                Box::pin(async move {
                    sqlx::query(
                        "UPDATE orders SET cancel_pending = 0 \
                         WHERE order_id = ? AND cancel_pending = 1",
                    )
                    .bind(id)
                    .execute(&mut *conn)
                    .await
                    .map_err(backend)?;
                    Ok(true)
                })
            })
            .await?;
        Ok(())
    }

    async fn open_orders(&self, m: &MachineNo) -> Result<Vec<StoredOrder>, StorageError> {
        let rows = sqlx::query(&format!(
            "SELECT {ORDER_COLUMNS} FROM orders WHERE machine_no = ? \
             AND status IN ('awaiting_payment', 'dispatching', 'dispensing') ORDER BY order_id"
        ))
        .bind(m.as_str())
        .fetch_all(self.pool())
        .await
        .map_err(backend)?;
        self.load_orders(rows).await
    }
}
