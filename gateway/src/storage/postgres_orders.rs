//! [`OrderStorage`] for PostgreSQL: orders, lines, timeline and inventory,
//! each write one transaction; a status change is a compare-and-set `UPDATE`
//! on `status`, so of two nodes applying changes to one order only the first
//! to take the row's lock finds its `from` status.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use sqlx::postgres::{PgConnection, PgRow};
use sqlx::Row;
use vendgate_proto::machine::MachineNo;
use vendgate_proto::msg::InventoryItem;

use super::orders::{
    Bind, NewOrder, NewOutboxEvent, OrderChange, OrderEvent, OrderQuery, OrderStorage, StoredOrder,
    MAX_EXTRA_EVENTS,
};
use super::postgres::{
    by_machine, get_machine_no, get_ms, get_opt_ms, get_u64, pg_error, PgStorage,
};
use super::sqlite::backend;
use super::StorageError;
use crate::domain::order::{Line, Status};

pub(super) const ORDER_COLUMNS: &str = "order_id, merchant_appid, machine_no, out_trade_no, \
     request_fingerprint, pay_later, status, amount, refund_amount, error, result_applied, \
     created_at_ms, updated_at_ms, dispense_deadline_ms, pay_deadline_ms, refunded_at_ms, \
     refunded_amount, accept_by_ms, events_dropped";

/// The class half of the two-key advisory lock that serialises inventory
/// snapshots of one machine ("vg" and 1); the machine number is the other
/// half. The two-key space is apart from sqlx's one-key migration lock.
const INVENTORY_LOCK_CLASS: i32 = 0x7667_0001;

pub(super) fn id_i64(id: u64) -> Result<i64, StorageError> {
    i64::try_from(id).map_err(|_| StorageError::Corrupt(format!("order id {id} out of range")))
}

fn opt_ms(t: Option<DateTime<Utc>>) -> Option<i64> {
    t.map(|t| t.timestamp_millis())
}

fn line_no(i: usize) -> i32 {
    i32::try_from(i).unwrap_or(i32::MAX)
}

async fn insert_event(
    conn: &mut PgConnection,
    order_id: i64,
    ev: &OrderEvent,
) -> Result<(), StorageError> {
    sqlx::query("INSERT INTO order_events (order_id, at_ms, kind, detail) VALUES ($1, $2, $3, $4)")
        .bind(order_id)
        .bind(ev.at.timestamp_millis())
        .bind(&ev.kind)
        .bind(ev.detail.to_string())
        .execute(&mut *conn)
        .await
        .map_err(pg_error)?;
    Ok(())
}

/// Write one outbox row inside the caller's transaction, due at once. The
/// caller has already updated (and so locked) the row the event is about.
pub(super) async fn insert_outbox(
    conn: &mut PgConnection,
    o: &NewOutboxEvent,
) -> Result<(), StorageError> {
    let order_id = o.order_id.map(id_i64).transpose()?;
    sqlx::query(
        "INSERT INTO outbox (event_id, merchant_appid, order_key, order_id, machine_no, type, \
         body, created_at_ms, next_attempt_at_ms) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $8)",
    )
    .bind(&o.event_id)
    .bind(&o.merchant_appid)
    .bind(&o.order_key)
    .bind(order_id)
    .bind(o.machine_no.as_ref().map(|m| m.as_str().to_string()))
    .bind(&o.kind)
    .bind(&o.body)
    .bind(o.created_at.timestamp_millis())
    .execute(&mut *conn)
    .await
    .map_err(pg_error)?;
    Ok(())
}

fn get_u32(row: &PgRow, column: &str) -> Result<u32, StorageError> {
    let v: i64 = row.try_get(column).map_err(backend)?;
    u32::try_from(v).map_err(|_| StorageError::Corrupt(format!("{column} {v}")))
}

impl PgStorage {
    /// Rows of [`ORDER_COLUMNS`] with their lines (one query for all of
    /// them), as stored orders in the rows' order.
    pub(super) async fn load_orders(
        &self,
        rows: Vec<PgRow>,
    ) -> Result<Vec<StoredOrder>, StorageError> {
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        let ids = rows
            .iter()
            .map(|r| r.try_get::<i64, _>("order_id").map_err(backend))
            .collect::<Result<Vec<_>, _>>()?;
        let items = sqlx::query(
            "SELECT order_id, product_id, quantity, dispensed, unit_price FROM order_items \
             WHERE order_id = ANY($1) ORDER BY order_id, line",
        )
        .bind(&ids)
        .fetch_all(self.pool())
        .await
        .map_err(pg_error)?;
        let mut lines: HashMap<i64, Vec<Line>> = HashMap::new();
        for it in &items {
            let id: i64 = it.try_get("order_id").map_err(backend)?;
            lines.entry(id).or_default().push(Line {
                product_id: it.try_get("product_id").map_err(backend)?,
                quantity: get_u32(it, "quantity")?,
                dispensed: get_u32(it, "dispensed")?,
                unit_price: it.try_get("unit_price").map_err(backend)?,
            });
        }
        let mut out = Vec::with_capacity(rows.len());
        for (row, id) in rows.iter().zip(ids) {
            let status: String = row.try_get("status").map_err(backend)?;
            out.push(StoredOrder {
                order_id: u64::try_from(id)
                    .map_err(|_| StorageError::Corrupt("order_id".into()))?,
                merchant_appid: row.try_get("merchant_appid").map_err(backend)?,
                machine_no: get_machine_no(row, "machine_no")?,
                out_trade_no: row.try_get("out_trade_no").map_err(backend)?,
                request_fingerprint: row.try_get("request_fingerprint").map_err(backend)?,
                pay_later: row.try_get("pay_later").map_err(backend)?,
                status: Status::parse(&status).ok_or_else(|| {
                    StorageError::Corrupt(format!("status {status:?} of order {id}"))
                })?,
                lines: lines.remove(&id).unwrap_or_default(),
                amount: row.try_get("amount").map_err(backend)?,
                refund_amount: row.try_get("refund_amount").map_err(backend)?,
                error: row.try_get("error").map_err(backend)?,
                result_applied: row.try_get("result_applied").map_err(backend)?,
                created_at: get_ms(row, "created_at_ms")?,
                updated_at: get_ms(row, "updated_at_ms")?,
                dispense_deadline: get_opt_ms(row, "dispense_deadline_ms")?,
                pay_deadline: get_opt_ms(row, "pay_deadline_ms")?,
                refunded_at: get_opt_ms(row, "refunded_at_ms")?,
                refunded_amount: row.try_get("refunded_amount").map_err(backend)?,
                accept_by: get_opt_ms(row, "accept_by_ms")?,
                events_dropped: row.try_get("events_dropped").map_err(backend)?,
            });
        }
        Ok(out)
    }
}

/// Bind the values of an [`OrderQuery`]'s `WHERE` clause, in order.
fn bind_all<'q>(
    mut query: sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>,
    binds: &[Bind],
) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
    for b in binds {
        query = match b {
            Bind::Text(t) => query.bind(t.clone()),
            Bind::Int(i) => query.bind(*i),
        };
    }
    query
}

#[async_trait::async_trait]
impl OrderStorage for PgStorage {
    async fn insert_order(&self, o: &NewOrder, ev: &OrderEvent) -> Result<(), StorageError> {
        let id = id_i64(o.order_id)?;
        let at = o.created_at.timestamp_millis();
        let mut tx = self.pool().begin().await.map_err(pg_error)?;
        sqlx::query(
            "INSERT INTO orders (order_id, merchant_appid, machine_no, out_trade_no, \
             request_fingerprint, pay_later, status, amount, created_at_ms, updated_at_ms, \
             pay_deadline_ms, accept_by_ms) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $9, $10, $11)",
        )
        .bind(id)
        .bind(&o.merchant_appid)
        .bind(o.machine_no.as_str())
        .bind(&o.out_trade_no)
        .bind(&o.request_fingerprint)
        .bind(o.pay_later)
        .bind(o.status.as_str())
        .bind(o.amount)
        .bind(at)
        .bind(opt_ms(o.pay_deadline))
        .bind(opt_ms(o.accept_by))
        .execute(&mut *tx)
        .await
        .map_err(pg_error)?;
        for (i, l) in o.lines.iter().enumerate() {
            sqlx::query(
                "INSERT INTO order_items (order_id, line, product_id, quantity, dispensed, \
                 unit_price) VALUES ($1, $2, $3, $4, $5, $6)",
            )
            .bind(id)
            .bind(line_no(i))
            .bind(l.product_id)
            .bind(i64::from(l.quantity))
            .bind(i64::from(l.dispensed))
            .bind(l.unit_price)
            .execute(&mut *tx)
            .await
            .map_err(pg_error)?;
        }
        insert_event(&mut tx, id, ev).await?;
        tx.commit().await.map_err(pg_error)
    }

    async fn order(&self, order_id: u64) -> Result<Option<StoredOrder>, StorageError> {
        let Ok(id) = i64::try_from(order_id) else {
            return Ok(None);
        };
        let rows = sqlx::query(&format!(
            "SELECT {ORDER_COLUMNS} FROM orders WHERE order_id = $1"
        ))
        .bind(id)
        .fetch_all(self.pool())
        .await
        .map_err(pg_error)?;
        Ok(self.load_orders(rows).await?.pop())
    }

    async fn order_by_out_trade_no(
        &self,
        merchant: &str,
        out_trade_no: &str,
    ) -> Result<Option<StoredOrder>, StorageError> {
        let rows = sqlx::query(&format!(
            "SELECT {ORDER_COLUMNS} FROM orders WHERE merchant_appid = $1 AND out_trade_no = $2"
        ))
        .bind(merchant)
        .bind(out_trade_no)
        .fetch_all(self.pool())
        .await
        .map_err(pg_error)?;
        Ok(self.load_orders(rows).await?.pop())
    }

    async fn update_order(
        &self,
        order_id: u64,
        from: Status,
        change: &OrderChange,
        ev: &OrderEvent,
        outbox: &[NewOutboxEvent],
    ) -> Result<bool, StorageError> {
        let id = id_i64(order_id)?;
        let mut tx = self.pool().begin().await.map_err(pg_error)?;
        // The compare-and-set. A concurrent change holding the row's lock
        // makes this wait, then re-check `status` against its commit. A
        // status change also ends a sweep's claim (see the SQLite backend).
        let done = sqlx::query(
            "UPDATE orders SET status = $1, error = $2, result_applied = $3, refund_amount = $4, \
             dispense_deadline_ms = $5, cancel_pending = $6, accept_by_ms = $10, \
             sweep_lease_until_ms = NULL, updated_at_ms = $7 WHERE order_id = $8 AND status = $9 \
             AND ($11::BIGINT IS NULL OR accept_by_ms > $11)",
        )
        .bind(change.status.as_str())
        .bind(&change.error)
        .bind(change.result_applied)
        .bind(change.refund_amount)
        .bind(opt_ms(change.dispense_deadline))
        .bind(change.cancel_pending)
        .bind(change.at.timestamp_millis())
        .bind(id)
        .bind(from.as_str())
        .bind(opt_ms(change.accept_by))
        .bind(opt_ms(change.only_before_accept_by))
        .execute(&mut *tx)
        .await
        .map_err(pg_error)?;
        if done.rows_affected() != 1 {
            tx.rollback().await.map_err(pg_error)?;
            return Ok(false);
        }
        for (i, l) in change.lines.iter().enumerate() {
            sqlx::query("UPDATE order_items SET dispensed = $1 WHERE order_id = $2 AND line = $3")
                .bind(i64::from(l.dispensed))
                .bind(id)
                .bind(line_no(i))
                .execute(&mut *tx)
                .await
                .map_err(pg_error)?;
        }
        insert_event(&mut tx, id, ev).await?;
        for o in outbox {
            insert_outbox(&mut tx, o).await?;
        }
        tx.commit().await.map_err(pg_error)?;
        Ok(true)
    }

    async fn mark_refunded(
        &self,
        order_id: u64,
        at: DateTime<Utc>,
        ev: &OrderEvent,
    ) -> Result<bool, StorageError> {
        let id = id_i64(order_id)?;
        let mut tx = self.pool().begin().await.map_err(pg_error)?;
        let done = sqlx::query(
            "UPDATE orders SET refunded_at_ms = $1, updated_at_ms = $1, \
             refunded_amount = refund_amount \
             WHERE order_id = $2 AND refunded_at_ms IS NULL AND refund_amount > 0",
        )
        .bind(at.timestamp_millis())
        .bind(id)
        .execute(&mut *tx)
        .await
        .map_err(pg_error)?;
        if done.rows_affected() != 1 {
            tx.rollback().await.map_err(pg_error)?;
            return Ok(false);
        }
        insert_event(&mut tx, id, ev).await?;
        tx.commit().await.map_err(pg_error)?;
        Ok(true)
    }

    async fn list_orders(&self, q: &OrderQuery) -> Result<(Vec<StoredOrder>, u64), StorageError> {
        let (cond, binds) = q.where_clause('$');
        let count_sql = format!("SELECT count(*) AS n FROM orders WHERE {cond}");
        let total: i64 = bind_all(sqlx::query(&count_sql), &binds)
            .fetch_one(self.pool())
            .await
            .map_err(pg_error)?
            .try_get("n")
            .map_err(backend)?;
        let (limit, offset) = q.limit_offset();
        let n = binds.len();
        let page_sql = format!(
            "SELECT {ORDER_COLUMNS} FROM orders WHERE {cond} \
             ORDER BY created_at_ms DESC, order_id DESC LIMIT ${} OFFSET ${}",
            n + 1,
            n + 2
        );
        let rows = bind_all(sqlx::query(&page_sql), &binds)
            .bind(limit)
            .bind(offset)
            .fetch_all(self.pool())
            .await
            .map_err(pg_error)?;
        let orders = self.load_orders(rows).await?;
        Ok((orders, u64::try_from(total).unwrap_or(0)))
    }

    async fn count_unpaid(
        &self,
        merchant: &str,
        m: &MachineNo,
    ) -> Result<(u64, u64), StorageError> {
        let row = sqlx::query(
            "SELECT \
               (SELECT count(*) FROM orders WHERE status = 'awaiting_payment' \
                  AND merchant_appid = $1) AS by_merchant, \
               (SELECT count(*) FROM orders WHERE status = 'awaiting_payment' \
                  AND machine_no = $2) AS by_machine",
        )
        .bind(merchant)
        .bind(m.as_str())
        .fetch_one(self.pool())
        .await
        .map_err(pg_error)?;
        Ok((get_u64(&row, "by_merchant")?, get_u64(&row, "by_machine")?))
    }

    async fn append_order_event(&self, order_id: u64, ev: &OrderEvent) -> Result<(), StorageError> {
        let id = id_i64(order_id)?;
        let mut tx = self.pool().begin().await.map_err(pg_error)?;
        // The count on the order row is the bound: no scan of its timeline.
        let room = sqlx::query(
            "UPDATE orders SET extra_events = extra_events + 1 \
             WHERE order_id = $1 AND extra_events < $2",
        )
        .bind(id)
        .bind(MAX_EXTRA_EVENTS)
        .execute(&mut *tx)
        .await
        .map_err(pg_error)?;
        if room.rows_affected() == 1 {
            insert_event(&mut tx, id, ev).await?;
        } else {
            sqlx::query(
                "UPDATE orders SET events_dropped = events_dropped + 1 WHERE order_id = $1",
            )
            .bind(id)
            .execute(&mut *tx)
            .await
            .map_err(pg_error)?;
        }
        tx.commit().await.map_err(pg_error)?;
        Ok(())
    }

    async fn order_events(&self, order_id: u64) -> Result<Vec<OrderEvent>, StorageError> {
        let id = id_i64(order_id)?;
        let rows = sqlx::query(
            "SELECT at_ms, kind, detail FROM order_events WHERE order_id = $1 ORDER BY id",
        )
        .bind(id)
        .fetch_all(self.pool())
        .await
        .map_err(pg_error)?;
        rows.iter()
            .map(|r| {
                let detail: String = r.try_get("detail").map_err(backend)?;
                Ok(OrderEvent {
                    at: get_ms(r, "at_ms")?,
                    kind: r.try_get("kind").map_err(backend)?,
                    detail: serde_json::from_str(&detail).map_err(|_| {
                        StorageError::Corrupt(format!("event detail of order {order_id}"))
                    })?,
                })
            })
            .collect()
    }

    async fn orders_in_status(
        &self,
        statuses: &[Status],
    ) -> Result<Vec<StoredOrder>, StorageError> {
        if statuses.is_empty() {
            return Ok(Vec::new());
        }
        let statuses: Vec<&str> = statuses.iter().map(|s| s.as_str()).collect();
        let rows = sqlx::query(&format!(
            "SELECT {ORDER_COLUMNS} FROM orders WHERE status = ANY($1) ORDER BY order_id"
        ))
        .bind(&statuses)
        .fetch_all(self.pool())
        .await
        .map_err(pg_error)?;
        self.load_orders(rows).await
    }

    async fn put_inventories(
        &self,
        batch: &[(MachineNo, Vec<InventoryItem>)],
        at: DateTime<Utc>,
    ) -> Result<(), StorageError> {
        let at_ms = at.timestamp_millis();
        let mut tx = self.pool().begin().await.map_err(pg_error)?;
        // Machines in order (the locks below are taken in that order, so two
        // batches cannot deadlock); a machine's later snapshot in the batch
        // still replaces its earlier one.
        for (m, items) in by_machine(batch, |(m, _)| m) {
            // Two writers replacing one machine's snapshot at once (a
            // take-over between nodes) would otherwise interleave their
            // DELETE and INSERTs into a mix of both; the lock ends with the
            // transaction.
            sqlx::query("SELECT pg_advisory_xact_lock($1, $2)")
                .bind(INVENTORY_LOCK_CLASS)
                .bind(i32::try_from(m.to_u32()).unwrap_or(i32::MAX))
                .execute(&mut *tx)
                .await
                .map_err(pg_error)?;
            sqlx::query("DELETE FROM inventory WHERE machine_no = $1")
                .bind(m.as_str())
                .execute(&mut *tx)
                .await
                .map_err(pg_error)?;
            for it in &items {
                // A product listed twice: the last entry wins, as in SQLite's
                // INSERT OR REPLACE.
                sqlx::query(
                    "INSERT INTO inventory (machine_no, product_id, stock, price, updated_at_ms) \
                     VALUES ($1, $2, $3, $4, $5) ON CONFLICT (machine_no, product_id) DO UPDATE \
                     SET stock = excluded.stock, price = excluded.price, \
                     updated_at_ms = excluded.updated_at_ms",
                )
                .bind(m.as_str())
                .bind(it.product_id)
                .bind(i64::from(it.stock))
                .bind(it.price)
                .bind(at_ms)
                .execute(&mut *tx)
                .await
                .map_err(pg_error)?;
            }
        }
        tx.commit().await.map_err(pg_error)
    }

    async fn inventories(&self) -> Result<Vec<(MachineNo, Vec<InventoryItem>)>, StorageError> {
        let rows = sqlx::query(
            "SELECT machine_no, product_id, stock, price FROM inventory \
             ORDER BY machine_no, product_id",
        )
        .fetch_all(self.pool())
        .await
        .map_err(pg_error)?;
        let mut out: Vec<(MachineNo, Vec<InventoryItem>)> = Vec::new();
        for r in &rows {
            let m = get_machine_no(r, "machine_no")?;
            let item = InventoryItem {
                product_id: r.try_get("product_id").map_err(backend)?,
                stock: get_u32(r, "stock")?,
                price: r.try_get("price").map_err(backend)?,
            };
            match out.last_mut() {
                Some((last, items)) if *last == m => items.push(item),
                _ => out.push((m, vec![item])),
            }
        }
        Ok(out)
    }
}
