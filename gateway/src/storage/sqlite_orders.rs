//! [`OrderStorage`] for SQLite: orders, lines, timeline and inventory, each
//! write one transaction, status changes compare-and-set on `status`. The
//! order-path writes go through the group-commit writer (`sqlite_writer`):
//! each is one savepoint of a shared transaction, acknowledged after its
//! commit.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use sqlx::error::ErrorKind;
use sqlx::sqlite::SqliteConnection;
use sqlx::Row;
use vendgate_proto::machine::MachineNo;
use vendgate_proto::msg::InventoryItem;

use super::orders::{
    Bind, NewOrder, NewOutboxEvent, OrderChange, OrderEvent, OrderQuery, OrderStorage, StoredOrder,
    MAX_EXTRA_EVENTS,
};
use super::sqlite::{backend, from_ms, SqliteStorage};
use super::StorageError;
use crate::domain::order::{Line, Status};

pub(super) const ORDER_COLUMNS: &str = "order_id, merchant_appid, machine_no, out_trade_no, request_fingerprint, \
     pay_later, status, amount, refund_amount, error, result_applied, created_at_ms, updated_at_ms, \
     dispense_deadline_ms, pay_deadline_ms, refunded_at_ms, refunded_amount, accept_by_ms, events_dropped";

pub(super) fn id_i64(id: u64) -> Result<i64, StorageError> {
    i64::try_from(id).map_err(|_| StorageError::Corrupt(format!("order id {id} out of range")))
}

fn opt_ms(t: Option<DateTime<Utc>>) -> Option<i64> {
    t.map(|t| t.timestamp_millis())
}

fn order_insert_error(e: sqlx::Error) -> StorageError {
    if let sqlx::Error::Database(db) = &e {
        if db.kind() == ErrorKind::UniqueViolation {
            // SQLite names the columns of the violated constraint.
            return if db.message().contains("out_trade_no") {
                StorageError::Duplicate("out_trade_no")
            } else {
                StorageError::Duplicate("order")
            };
        }
        if db.kind() == ErrorKind::ForeignKeyViolation {
            return StorageError::UnknownMerchant;
        }
    }
    backend(e)
}

async fn insert_event(
    conn: &mut SqliteConnection,
    order_id: i64,
    ev: &OrderEvent,
) -> Result<(), StorageError> {
    sqlx::query("INSERT INTO order_events (order_id, at_ms, kind, detail) VALUES (?, ?, ?, ?)")
        .bind(order_id)
        .bind(ev.at.timestamp_millis())
        .bind(&ev.kind)
        .bind(ev.detail.to_string())
        .execute(&mut *conn)
        .await
        .map_err(backend)?;
    Ok(())
}

/// Write one outbox row inside the caller's transaction; due at once.
pub(super) async fn insert_outbox(
    conn: &mut SqliteConnection,
    o: &NewOutboxEvent,
) -> Result<(), StorageError> {
    let order_id = o.order_id.map(id_i64).transpose()?;
    sqlx::query(
        "INSERT INTO outbox (event_id, merchant_appid, order_key, order_id, machine_no, type, body, \
         created_at_ms, next_attempt_at_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
    )
    .bind(&o.event_id)
    .bind(&o.merchant_appid)
    .bind(&o.order_key)
    .bind(order_id)
    .bind(o.machine_no.as_ref().map(|m| m.as_str().to_string()))
    .bind(&o.kind)
    .bind(&o.body)
    .bind(o.created_at.timestamp_millis())
    .bind(o.created_at.timestamp_millis())
    .execute(&mut *conn)
    .await
    .map_err(backend)?;
    Ok(())
}

/// The order row, its lines and its first event (one savepoint of a group
/// commit).
async fn write_order(
    conn: &mut SqliteConnection,
    id: i64,
    o: &NewOrder,
    ev: &OrderEvent,
) -> Result<(), StorageError> {
    let at = o.created_at.timestamp_millis();
    sqlx::query(
        "INSERT INTO orders (order_id, merchant_appid, machine_no, out_trade_no, request_fingerprint, \
         pay_later, status, amount, created_at_ms, updated_at_ms, pay_deadline_ms, accept_by_ms) \
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
    )
    .bind(id)
    .bind(&o.merchant_appid)
    .bind(o.machine_no.as_str())
    .bind(&o.out_trade_no)
    .bind(&o.request_fingerprint)
    .bind(i64::from(o.pay_later))
    .bind(o.status.as_str())
    .bind(o.amount)
    .bind(at)
    .bind(at)
    .bind(opt_ms(o.pay_deadline))
    .bind(opt_ms(o.accept_by))
    .execute(&mut *conn)
    .await
    .map_err(order_insert_error)?;
    for (i, l) in o.lines.iter().enumerate() {
        sqlx::query(
            "INSERT INTO order_items (order_id, line, product_id, quantity, dispensed, unit_price) \
             VALUES (?, ?, ?, ?, ?, ?)",
        )
        .bind(id)
        .bind(i64::try_from(i).unwrap_or(i64::MAX))
        .bind(l.product_id)
        .bind(i64::from(l.quantity))
        .bind(i64::from(l.dispensed))
        .bind(l.unit_price)
        .execute(&mut *conn)
        .await
        .map_err(backend)?;
    }
    insert_event(conn, id, ev).await
}

/// A status change compare-and-set on `from`, with its event and webhook;
/// Ok(false) when the stored status moved on (nothing written).
async fn write_change(
    conn: &mut SqliteConnection,
    id: i64,
    from: Status,
    change: &OrderChange,
    ev: &OrderEvent,
    outbox: &[NewOutboxEvent],
) -> Result<bool, StorageError> {
    // A status change ends whatever a sweep claimed the order for, so its
    // lease is dropped: in its new status the order is due on its own terms.
    let before = opt_ms(change.only_before_accept_by);
    let done = sqlx::query(
        "UPDATE orders SET status = ?, error = ?, result_applied = ?, refund_amount = ?, \
         dispense_deadline_ms = ?, cancel_pending = ?, accept_by_ms = ?, sweep_lease_until_ms = NULL, \
         updated_at_ms = ? WHERE order_id = ? AND status = ? \
         AND (? IS NULL OR accept_by_ms > ?)",
    )
    .bind(change.status.as_str())
    .bind(&change.error)
    .bind(i64::from(change.result_applied))
    .bind(change.refund_amount)
    .bind(opt_ms(change.dispense_deadline))
    .bind(i64::from(change.cancel_pending))
    .bind(opt_ms(change.accept_by))
    .bind(change.at.timestamp_millis())
    .bind(id)
    .bind(from.as_str())
    .bind(before)
    .bind(before)
    .execute(&mut *conn)
    .await
    .map_err(backend)?;
    if done.rows_affected() != 1 {
        return Ok(false);
    }
    for (i, l) in change.lines.iter().enumerate() {
        sqlx::query("UPDATE order_items SET dispensed = ? WHERE order_id = ? AND line = ?")
            .bind(i64::from(l.dispensed))
            .bind(id)
            .bind(i64::try_from(i).unwrap_or(i64::MAX))
            .execute(&mut *conn)
            .await
            .map_err(backend)?;
    }
    insert_event(conn, id, ev).await?;
    for o in outbox {
        insert_outbox(conn, o).await?;
    }
    Ok(true)
}

impl SqliteStorage {
    /// Rows of [`ORDER_COLUMNS`] with their lines, as stored orders.
    pub(super) async fn load_orders(
        &self,
        rows: Vec<sqlx::sqlite::SqliteRow>,
    ) -> Result<Vec<StoredOrder>, StorageError> {
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            let order_id: i64 = row.try_get("order_id").map_err(backend)?;
            let items = sqlx::query(
                "SELECT product_id, quantity, dispensed, unit_price FROM order_items WHERE order_id = ? ORDER BY line",
            )
            .bind(order_id)
            .fetch_all(self.pool())
            .await
            .map_err(backend)?;
            let mut lines = Vec::with_capacity(items.len());
            for it in items {
                let q: i64 = it.try_get("quantity").map_err(backend)?;
                let d: i64 = it.try_get("dispensed").map_err(backend)?;
                lines.push(Line {
                    product_id: it.try_get("product_id").map_err(backend)?,
                    quantity: u32::try_from(q)
                        .map_err(|_| StorageError::Corrupt("quantity".into()))?,
                    dispensed: u32::try_from(d)
                        .map_err(|_| StorageError::Corrupt("dispensed".into()))?,
                    unit_price: it.try_get("unit_price").map_err(backend)?,
                });
            }
            let status: String = row.try_get("status").map_err(backend)?;
            let machine_no: String = row.try_get("machine_no").map_err(backend)?;
            let ms = |c: &str| -> Result<Option<DateTime<Utc>>, StorageError> {
                let v: Option<i64> = row.try_get(c).map_err(backend)?;
                v.map(|v| from_ms(v, c)).transpose()
            };
            out.push(StoredOrder {
                order_id: u64::try_from(order_id)
                    .map_err(|_| StorageError::Corrupt("order_id".into()))?,
                merchant_appid: row.try_get("merchant_appid").map_err(backend)?,
                machine_no: machine_no.parse::<MachineNo>().map_err(|_| {
                    StorageError::Corrupt(format!("machine_no of order {order_id}"))
                })?,
                out_trade_no: row.try_get("out_trade_no").map_err(backend)?,
                request_fingerprint: row.try_get("request_fingerprint").map_err(backend)?,
                pay_later: row.try_get::<i64, _>("pay_later").map_err(backend)? != 0,
                status: Status::parse(&status).ok_or_else(|| {
                    StorageError::Corrupt(format!("status {status:?} of order {order_id}"))
                })?,
                lines,
                amount: row.try_get("amount").map_err(backend)?,
                refund_amount: row.try_get("refund_amount").map_err(backend)?,
                error: row.try_get("error").map_err(backend)?,
                result_applied: row.try_get::<i64, _>("result_applied").map_err(backend)? != 0,
                created_at: from_ms(
                    row.try_get("created_at_ms").map_err(backend)?,
                    "created_at_ms",
                )?,
                updated_at: from_ms(
                    row.try_get("updated_at_ms").map_err(backend)?,
                    "updated_at_ms",
                )?,
                dispense_deadline: ms("dispense_deadline_ms")?,
                pay_deadline: ms("pay_deadline_ms")?,
                refunded_at: ms("refunded_at_ms")?,
                refunded_amount: row.try_get("refunded_amount").map_err(backend)?,
                accept_by: ms("accept_by_ms")?,
                events_dropped: row.try_get("events_dropped").map_err(backend)?,
            });
        }
        Ok(out)
    }
}

/// Bind the values of an [`OrderQuery`]'s `WHERE` clause, in order.
fn bind_all<'q>(
    mut query: sqlx::query::Query<'q, sqlx::Sqlite, sqlx::sqlite::SqliteArguments<'q>>,
    binds: &[Bind],
) -> sqlx::query::Query<'q, sqlx::Sqlite, sqlx::sqlite::SqliteArguments<'q>> {
    for b in binds {
        query = match b {
            Bind::Text(t) => query.bind(t.clone()),
            Bind::Int(i) => query.bind(*i),
        };
    }
    query
}

#[async_trait::async_trait]
impl OrderStorage for SqliteStorage {
    async fn insert_order(&self, o: &NewOrder, ev: &OrderEvent) -> Result<(), StorageError> {
        let id = id_i64(o.order_id)?;
        let (o, ev) = (o.clone(), ev.clone());
        self.writer()
            .write(move |conn| {
                Box::pin(async move {
                    write_order(conn, id, &o, &ev).await?;
                    Ok(true)
                })
            })
            .await?;
        Ok(())
    }

    async fn order(&self, order_id: u64) -> Result<Option<StoredOrder>, StorageError> {
        let Ok(id) = i64::try_from(order_id) else {
            return Ok(None);
        };
        let rows = sqlx::query(&format!(
            "SELECT {ORDER_COLUMNS} FROM orders WHERE order_id = ?"
        ))
        .bind(id)
        .fetch_all(self.pool())
        .await
        .map_err(backend)?;
        Ok(self.load_orders(rows).await?.pop())
    }

    async fn order_by_out_trade_no(
        &self,
        merchant: &str,
        out_trade_no: &str,
    ) -> Result<Option<StoredOrder>, StorageError> {
        let rows = sqlx::query(&format!(
            "SELECT {ORDER_COLUMNS} FROM orders WHERE merchant_appid = ? AND out_trade_no = ?"
        ))
        .bind(merchant)
        .bind(out_trade_no)
        .fetch_all(self.pool())
        .await
        .map_err(backend)?;
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
        let (change, ev, outbox) = (change.clone(), ev.clone(), outbox.to_vec());
        self.writer()
            .write(move |conn| {
                Box::pin(async move { write_change(conn, id, from, &change, &ev, &outbox).await })
            })
            .await
    }

    async fn mark_refunded(
        &self,
        order_id: u64,
        at: DateTime<Utc>,
        ev: &OrderEvent,
    ) -> Result<bool, StorageError> {
        let id = id_i64(order_id)?;
        let ev = ev.clone();
        self.writer()
            .write(move |conn| {
                Box::pin(async move {
                    let done = sqlx::query(
                        "UPDATE orders SET refunded_at_ms = ?, updated_at_ms = ?, \
                         refunded_amount = refund_amount \
                         WHERE order_id = ? AND refunded_at_ms IS NULL AND refund_amount > 0",
                    )
                    .bind(at.timestamp_millis())
                    .bind(at.timestamp_millis())
                    .bind(id)
                    .execute(&mut *conn)
                    .await
                    .map_err(backend)?;
                    if done.rows_affected() != 1 {
                        return Ok(false);
                    }
                    insert_event(conn, id, &ev).await?;
                    Ok(true)
                })
            })
            .await
    }

    async fn list_orders(&self, q: &OrderQuery) -> Result<(Vec<StoredOrder>, u64), StorageError> {
        let (cond, binds) = q.where_clause('?');
        let count_sql = format!("SELECT count(*) AS n FROM orders WHERE {cond}");
        let total: i64 = bind_all(sqlx::query(&count_sql), &binds)
            .fetch_one(self.pool())
            .await
            .map_err(backend)?
            .try_get("n")
            .map_err(backend)?;
        let (limit, offset) = q.limit_offset();
        let n = binds.len();
        let page_sql = format!(
            "SELECT {ORDER_COLUMNS} FROM orders WHERE {cond} \
             ORDER BY created_at_ms DESC, order_id DESC LIMIT ?{} OFFSET ?{}",
            n + 1,
            n + 2
        );
        let rows = bind_all(sqlx::query(&page_sql), &binds)
            .bind(limit)
            .bind(offset)
            .fetch_all(self.pool())
            .await
            .map_err(backend)?;
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
               (SELECT count(*) FROM orders WHERE status = 'awaiting_payment' AND merchant_appid = ?) AS by_merchant, \
               (SELECT count(*) FROM orders WHERE status = 'awaiting_payment' AND machine_no = ?) AS by_machine",
        )
        .bind(merchant)
        .bind(m.as_str())
        .fetch_one(self.pool())
        .await
        .map_err(backend)?;
        let a: i64 = row.try_get("by_merchant").map_err(backend)?;
        let b: i64 = row.try_get("by_machine").map_err(backend)?;
        Ok((u64::try_from(a).unwrap_or(0), u64::try_from(b).unwrap_or(0)))
    }

    async fn append_order_event(&self, order_id: u64, ev: &OrderEvent) -> Result<(), StorageError> {
        let id = id_i64(order_id)?;
        let ev = ev.clone();
        self.writer()
            .write(move |conn| {
                Box::pin(async move {
                    // The count on the order row is the bound: no scan of
                    // its timeline.
                    let room = sqlx::query(
                        "UPDATE orders SET extra_events = extra_events + 1 \
                         WHERE order_id = ? AND extra_events < ?",
                    )
                    .bind(id)
                    .bind(MAX_EXTRA_EVENTS)
                    .execute(&mut *conn)
                    .await
                    .map_err(backend)?;
                    if room.rows_affected() == 1 {
                        insert_event(conn, id, &ev).await?;
                    } else {
                        sqlx::query(
                            "UPDATE orders SET events_dropped = events_dropped + 1 WHERE order_id = ?",
                        )
                        .bind(id)
                        .execute(&mut *conn)
                        .await
                        .map_err(backend)?;
                    }
                    Ok(true)
                })
            })
            .await?;
        Ok(())
    }

    async fn order_events(&self, order_id: u64) -> Result<Vec<OrderEvent>, StorageError> {
        let id = id_i64(order_id)?;
        let rows = sqlx::query(
            "SELECT at_ms, kind, detail FROM order_events WHERE order_id = ? ORDER BY id",
        )
        .bind(id)
        .fetch_all(self.pool())
        .await
        .map_err(backend)?;
        rows.into_iter()
            .map(|r| {
                let detail: String = r.try_get("detail").map_err(backend)?;
                Ok(OrderEvent {
                    at: from_ms(r.try_get("at_ms").map_err(backend)?, "at_ms")?,
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
        let marks = vec!["?"; statuses.len()].join(", ");
        let sql = format!(
            "SELECT {ORDER_COLUMNS} FROM orders WHERE status IN ({marks}) ORDER BY order_id"
        );
        let mut q = sqlx::query(&sql);
        for s in statuses {
            q = q.bind(s.as_str());
        }
        let rows = q.fetch_all(self.pool()).await.map_err(backend)?;
        self.load_orders(rows).await
    }

    async fn put_inventories(
        &self,
        batch: &[(MachineNo, Vec<InventoryItem>)],
        at: DateTime<Utc>,
    ) -> Result<(), StorageError> {
        // Through the group-commit writer too: machines report stock after
        // every dispense, and a pool transaction would wait on SQLite's write
        // lock (seconds, in the busy handler's sleeps) while the writer keeps
        // taking it.
        let batch = batch.to_vec();
        let at_ms = at.timestamp_millis();
        self.writer()
            .write(move |conn| {
                Box::pin(async move {
                    for (m, items) in &batch {
                        sqlx::query("DELETE FROM inventory WHERE machine_no = ?")
                            .bind(m.as_str())
                            .execute(&mut *conn)
                            .await
                            .map_err(backend)?;
                        for it in items {
                            sqlx::query(
                                "INSERT OR REPLACE INTO inventory (machine_no, product_id, stock, price, updated_at_ms) \
                                 VALUES (?, ?, ?, ?, ?)",
                            )
                            .bind(m.as_str())
                            .bind(it.product_id)
                            .bind(i64::from(it.stock))
                            .bind(it.price)
                            .bind(at_ms)
                            .execute(&mut *conn)
                            .await
                            .map_err(backend)?;
                        }
                    }
                    Ok(true)
                })
            })
            .await?;
        Ok(())
    }

    async fn inventories(&self) -> Result<Vec<(MachineNo, Vec<InventoryItem>)>, StorageError> {
        let rows = sqlx::query("SELECT machine_no, product_id, stock, price FROM inventory ORDER BY machine_no, product_id")
            .fetch_all(self.pool())
            .await
            .map_err(backend)?;
        let mut by: HashMap<String, Vec<InventoryItem>> = HashMap::new();
        for r in rows {
            let m: String = r.try_get("machine_no").map_err(backend)?;
            let stock: i64 = r.try_get("stock").map_err(backend)?;
            by.entry(m).or_default().push(InventoryItem {
                product_id: r.try_get("product_id").map_err(backend)?,
                stock: u32::try_from(stock).map_err(|_| StorageError::Corrupt("stock".into()))?,
                price: r.try_get("price").map_err(backend)?,
            });
        }
        let mut out = Vec::with_capacity(by.len());
        for (m, items) in by {
            let m = m
                .parse::<MachineNo>()
                .map_err(|_| StorageError::Corrupt("inventory machine_no".into()))?;
            out.push((m, items));
        }
        Ok(out)
    }
}
