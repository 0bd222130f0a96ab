//! The cluster operations (nodes, ownership epochs, reaping), written once for every `Backend`.

use crate::storage::backend::Backend;
use crate::storage::cluster::*;
use crate::storage::ops::orders::{load_orders, orders};
use crate::storage::rows::{
    epoch, id_i64, machine_epochs, order_ids, to_i64, MachineEpochRow, NodeRowRaw, OrderRow,
    OwnershipRow,
};
use crate::storage::run::{Run, Stmt, Value};
use crate::storage::{sql, StorageError, StoredOrder};
use chrono::{DateTime, Utc};
use vendgate_proto::machine::MachineNo;

#[async_trait::async_trait]
impl<B: Backend> ClusterStorage for B {
    async fn take_ownership(
        &self,
        m: &MachineNo,
        node: &str,
        at: DateTime<Utc>,
    ) -> Result<Option<u64>, StorageError> {
        let (m, node, at) = (*m, node.to_string(), at.timestamp_millis());
        let stored: Option<(i64,)> = self
            .write_one(move |conn| {
                Box::pin(async move {
                    let take = Stmt::new(sql::TAKE_OWNERSHIP)
                        .bind(&node)
                        .bind(at)
                        .bind(m.as_str());
                    conn.fetch_optional(take).await
                })
            })
            .await?;
        stored.map(|(e,)| epoch(e)).transpose()
    }

    async fn ownership(
        &self,
        machines: Option<&[MachineNo]>,
    ) -> Result<Vec<Ownership>, StorageError> {
        let Some(machines) = machines else {
            return self
                .pooled()
                .fetch_all::<OwnershipRow>(Stmt::new(sql::OWNERSHIP))
                .await?
                .into_iter()
                .map(OwnershipRow::into_ownership)
                .collect();
        };
        let mut out = Vec::with_capacity(machines.len());
        for chunk in machines.chunks(Self::DIALECT.set_limit()) {
            let nos = chunk.iter().map(|m| m.as_str()).collect();
            let (set, values) = sql::set_of(Self::DIALECT, Value::Texts(nos));
            let select = Stmt::new(sql::ownership_of(&set)).bind_all(values);
            for row in self.pooled().fetch_all::<OwnershipRow>(select).await? {
                out.push(row.into_ownership()?);
            }
        }
        // Chunks come back in any order, and a machine asked for twice once.
        out.sort_by(|a, b| a.machine_no.as_str().cmp(b.machine_no.as_str()));
        out.dedup_by(|a, b| a.machine_no == b.machine_no);
        Ok(out)
    }

    async fn ownership_seen(&self) -> Result<Vec<OwnershipSeen>, StorageError> {
        self.pooled()
            .fetch_all::<OwnershipRow>(Stmt::new(sql::OWNERSHIP_SEEN))
            .await?
            .into_iter()
            .map(OwnershipRow::into_seen)
            .collect()
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
        self.write(move |conn| {
            Box::pin(async move {
                let register = Stmt::new(sql::REGISTER_NODE)
                    .bind(&node)
                    .bind(&incarnation)
                    .bind(at);
                conn.execute(register).await?;
                let owned = Stmt::new(sql::OWNED_ONLINE.of(Self::DIALECT)).bind(&node);
                machine_epochs(conn.fetch_all::<MachineEpochRow>(owned).await?)
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
        self.write_one(move |conn| {
            Box::pin(async move {
                let beat = Stmt::new(sql::NODE_HEARTBEAT)
                    .bind(at)
                    .bind(&node)
                    .bind(&incarnation);
                Ok(conn.execute(beat).await? == 1)
            })
        })
        .await
    }

    async fn reap_nodes(&self, dead_before: DateTime<Utc>) -> Result<Vec<String>, StorageError> {
        // Of concurrent reapers, each gets a node at most once: SQLite's run
        // one after the other; on PostgreSQL one that finds a row deleted
        // by another waits for it, then skips the row.
        let before = dead_before.timestamp_millis();
        let reaped: Vec<(String,)> = self
            .write_one(move |conn| {
                Box::pin(async move {
                    conn.fetch_all(Stmt::new(sql::REAP_NODES).bind(before))
                        .await
                })
            })
            .await?;
        let mut reaped: Vec<String> = reaped.into_iter().map(|(n,)| n).collect();
        reaped.sort();
        Ok(reaped)
    }

    async fn orphaned_machines(&self, limit: usize) -> Result<Vec<(MachineNo, u64)>, StorageError> {
        let select =
            Stmt::new(sql::ORPHANED_MACHINES.of(Self::DIALECT)).bind(to_i64(limit, "limit")?);
        machine_epochs(self.pooled().fetch_all::<MachineEpochRow>(select).await?)
    }

    async fn nodes(&self) -> Result<Vec<NodeRow>, StorageError> {
        self.pooled()
            .fetch_all::<NodeRowRaw>(Stmt::new(sql::NODES.of(Self::DIALECT)))
            .await?
            .into_iter()
            .map(NodeRowRaw::into_node)
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
        let sql = sql::claim_due_orders(due, Self::DIALECT);
        let (now_ms, lease_ms, stale_ms, limit) = (
            now.timestamp_millis(),
            lease_until.timestamp_millis(),
            due.stale_before_ms(),
            to_i64(limit, "limit")?,
        );
        let rows = self
            .write_one(move |conn| {
                Box::pin(async move {
                    let claim = Stmt::new(&sql)
                        .bind(now_ms)
                        .bind(lease_ms)
                        .bind(stale_ms)
                        .bind(limit);
                    conn.fetch_all::<OrderRow>(claim).await
                })
            })
            .await?;
        let mut orders = load_orders(self, rows).await?;
        orders.sort_by_key(|o| due.sort_key(o));
        Ok(orders)
    }

    async fn pending_cancels(&self, m: &MachineNo) -> Result<Vec<u64>, StorageError> {
        let select = Stmt::new(sql::PENDING_CANCELS.of(Self::DIALECT)).bind(m.as_str());
        let ids: Vec<(i64,)> = self.pooled().fetch_all(select).await?;
        order_ids(ids.into_iter().map(|(id,)| id).collect())
    }

    async fn cancel_delivered(&self, order_id: u64) -> Result<(), StorageError> {
        let Ok(id) = id_i64(order_id) else {
            // No such order can be stored.
            return Ok(());
        };
        self.write_one(move |conn| {
            Box::pin(async move {
                conn.execute(Stmt::new(sql::CANCEL_DELIVERED).bind(id))
                    .await
                    .map(drop)
            })
        })
        .await
    }

    async fn open_orders(&self, m: &MachineNo) -> Result<Vec<StoredOrder>, StorageError> {
        orders(self, Stmt::new(sql::OPEN_ORDERS).bind(m.as_str())).await
    }
}
