//! The order operations (insert, compare-and-set changes, queries, inventory snapshots), written once for every `Backend`.

use crate::domain::order::Status;
use crate::storage::backend::Backend;
use crate::storage::orders::*;
use crate::storage::rows::{self, id_i64, opt_ms, to_u64, InventoryRow, OrderEventRow, OrderRow};
use crate::storage::run::{Inserts, Run, Stmt, Value};
use crate::storage::{sql, StorageError};
use chrono::{DateTime, Utc};
use vendgate_proto::machine::MachineNo;
use vendgate_proto::msg::InventoryItem;

/// One timeline row of order `id`.
async fn insert_event(conn: &mut impl Run, id: i64, ev: &OrderEvent) -> Result<(), StorageError> {
    let insert = Stmt::new(sql::INSERT_ORDER_EVENT)
        .bind(id)
        .bind(ev.at.timestamp_millis())
        .bind(&ev.kind)
        .bind(ev.detail.to_string());
    conn.execute(insert).await?;
    Ok(())
}

/// One outbox row, due at once. The caller has already updated (and so
/// locked) the row the event is about.
async fn insert_outbox(conn: &mut impl Run, o: &NewOutboxEvent) -> Result<(), StorageError> {
    let insert = Stmt::new(sql::INSERT_OUTBOX)
        .bind(&o.event_id)
        .bind(&o.merchant_appid)
        .bind(&o.order_key)
        .bind(o.order_id.map(id_i64).transpose()?)
        .bind(o.machine_no.as_ref().map(|m| m.as_str()))
        .bind(&o.kind)
        .bind(&o.body)
        .bind(o.created_at.timestamp_millis());
    conn.execute(insert).await?;
    Ok(())
}

/// The line number as stored.
fn line_no(i: usize) -> i32 {
    i32::try_from(i).unwrap_or(i32::MAX)
}

/// `sql` with the order row's values bound as `$1`..`$11`: every engine's
/// insert of an order starts with them.
pub(in crate::storage) fn order_row<'q>(sql: &'q str, id: i64, o: &'q NewOrder) -> Stmt<'q> {
    Stmt::new(sql)
        .bind(id)
        .bind(&o.merchant_appid)
        .bind(o.machine_no.as_str())
        .bind(&o.out_trade_no)
        .bind(&o.request_fingerprint)
        .bind(o.pay_later)
        .bind(o.status.as_str())
        .bind(o.amount)
        .bind(o.created_at.timestamp_millis())
        .bind(opt_ms(o.pay_deadline))
        .bind(opt_ms(o.accept_by))
}

/// `sql` with a status change's values bound as `$1`..`$11` (the new
/// values, then the compare-and-set's conditions): every engine's update of
/// an order starts with them.
pub(in crate::storage) fn order_change<'q>(
    sql: &'q str,
    id: i64,
    from: Status,
    change: &'q OrderChange,
) -> Stmt<'q> {
    Stmt::new(sql)
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
}

/// The order row, its lines and its first event, a statement per row
/// (SQLite's [`Backend::insert_order_rows`]).
pub(in crate::storage) async fn write_order(
    conn: &mut impl Run,
    id: i64,
    o: &NewOrder,
    ev: &OrderEvent,
) -> Result<(), StorageError> {
    let insert = order_row(sql::INSERT_ORDER, id, o).inserting(Inserts::Order);
    conn.execute(insert).await?;
    for (i, l) in o.lines.iter().enumerate() {
        let line = Stmt::new(sql::INSERT_ORDER_LINE)
            .bind(id)
            .bind(line_no(i))
            .bind(l.product_id)
            .bind(i64::from(l.quantity))
            .bind(i64::from(l.dispensed))
            .bind(l.unit_price);
        conn.execute(line).await?;
    }
    insert_event(conn, id, ev).await
}

/// A status change compare-and-set on `from`, with its event and webhooks;
/// Ok(false) when the stored status moved on (nothing written). On
/// PostgreSQL a concurrent change holding the row's lock makes the UPDATE
/// wait, then re-check `status` against its commit. A statement per row
/// (SQLite's [`Backend::change_order_rows`]).
pub(in crate::storage) async fn write_change(
    conn: &mut impl Run,
    id: i64,
    from: Status,
    change: &OrderChange,
    ev: &OrderEvent,
    outbox: &[NewOutboxEvent],
) -> Result<bool, StorageError> {
    let update = order_change(sql::UPDATE_ORDER, id, from, change);
    if conn.execute(update).await? != 1 {
        return Ok(false);
    }
    for (i, l) in change.lines.iter().enumerate() {
        let line = Stmt::new(sql::UPDATE_ORDER_LINE)
            .bind(i64::from(l.dispensed))
            .bind(id)
            .bind(line_no(i));
        conn.execute(line).await?;
    }
    insert_event(conn, id, ev).await?;
    for o in outbox {
        insert_outbox(conn, o).await?;
    }
    Ok(true)
}

/// Replace the inventory snapshots of `batch`'s machines, a statement per
/// row (SQLite's [`Backend::replace_inventories`]).
pub(in crate::storage) async fn write_inventories<B: Backend + ?Sized>(
    b: &B,
    batch: &[(MachineNo, Vec<InventoryItem>)],
    at: DateTime<Utc>,
) -> Result<(), StorageError> {
    // A machine's later snapshot in the batch still replaces its
    // earlier one. On SQLite through the group-commit writer too:
    // machines report stock after every dispense, and a pool transaction
    // would wait on the write lock (seconds, in the busy handler's
    // sleeps) while the writer keeps taking it.
    let batch = B::lock_order(batch, |(m, _)| m).into_owned();
    let at_ms = at.timestamp_millis();
    b.write(move |conn| {
        Box::pin(async move {
            for (m, items) in &batch {
                B::lock_inventory(conn, m).await?;
                conn.execute(Stmt::new(sql::DELETE_INVENTORY).bind(m.as_str()))
                    .await?;
                for it in items {
                    let upsert = Stmt::new(sql::UPSERT_INVENTORY)
                        .bind(m.as_str())
                        .bind(it.product_id)
                        .bind(i64::from(it.stock))
                        .bind(it.price)
                        .bind(at_ms);
                    conn.execute(upsert).await?;
                }
            }
            Ok(())
        })
    })
    .await
}

/// Orders with their lines, in the order of `rows`.
pub(crate) async fn load_orders<B: Backend + ?Sized>(
    b: &B,
    rows: Vec<OrderRow>,
) -> Result<Vec<StoredOrder>, StorageError> {
    if rows.is_empty() {
        return Ok(Vec::new());
    }
    let ids: Vec<i64> = rows.iter().map(|r| r.order_id).collect();
    let lines = b.order_lines(&ids).await?;
    rows::orders_with_lines(rows, lines)
}

/// The orders a statement of [`sql::ORDER_COLUMNS`] selects, with their
/// lines.
pub(crate) async fn orders<B: Backend + ?Sized>(
    b: &B,
    select: Stmt<'_>,
) -> Result<Vec<StoredOrder>, StorageError> {
    let rows = b.pooled().fetch_all::<OrderRow>(select).await?;
    load_orders(b, rows).await
}

#[async_trait::async_trait]
impl<B: Backend> OrderStorage for B {
    async fn insert_order(&self, o: &NewOrder, ev: &OrderEvent) -> Result<(), StorageError> {
        let id = id_i64(o.order_id)?;
        self.insert_order_rows(id, o.clone(), ev.clone()).await
    }

    async fn order(&self, order_id: u64) -> Result<Option<StoredOrder>, StorageError> {
        let Ok(id) = i64::try_from(order_id) else {
            return Ok(None);
        };
        self.one_order(id).await
    }

    async fn order_by_out_trade_no(
        &self,
        merchant: &str,
        out_trade_no: &str,
    ) -> Result<Option<StoredOrder>, StorageError> {
        let select = Stmt::new(sql::ORDER_BY_OUT_TRADE_NO)
            .bind(merchant)
            .bind(out_trade_no);
        Ok(orders(self, select).await?.pop())
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
        self.change_order_rows(id, from, change.clone(), ev.clone(), outbox.to_vec())
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
        self.write(move |conn| {
            Box::pin(async move {
                let mark = Stmt::new(sql::MARK_REFUNDED)
                    .bind(at.timestamp_millis())
                    .bind(id);
                if conn.execute(mark).await? != 1 {
                    return Ok(false);
                }
                insert_event(conn, id, &ev).await?;
                Ok(true)
            })
        })
        .await
    }

    async fn list_orders(&self, q: &OrderQuery) -> Result<(Vec<StoredOrder>, u64), StorageError> {
        let search = sql::order_search(q);
        let count = Stmt::new(&search.count).bind_all(search.values.clone());
        let (total,): (i64,) = self.pooled().fetch_one(count).await?;
        let (limit, offset) = q.limit_offset();
        let page = Stmt::new(&search.page)
            .bind_all(search.values)
            .bind(limit)
            .bind(offset);
        let orders = orders(self, page).await?;
        Ok((orders, u64::try_from(total).unwrap_or(0)))
    }

    async fn count_unpaid(
        &self,
        merchant: &str,
        m: &MachineNo,
    ) -> Result<(u64, u64), StorageError> {
        let count = Stmt::new(sql::COUNT_UNPAID).bind(merchant).bind(m.as_str());
        let (a, b): (i64, i64) = self.pooled().fetch_one(count).await?;
        Ok((to_u64(a, "by_merchant")?, to_u64(b, "by_machine")?))
    }

    async fn append_order_event(&self, order_id: u64, ev: &OrderEvent) -> Result<(), StorageError> {
        let id = id_i64(order_id)?;
        let ev = ev.clone();
        self.write(move |conn| {
            Box::pin(async move {
                let room = Stmt::new(sql::COUNT_EXTRA_EVENT)
                    .bind(id)
                    .bind(MAX_EXTRA_EVENTS);
                if conn.execute(room).await? == 1 {
                    insert_event(conn, id, &ev).await
                } else {
                    let dropped = Stmt::new(sql::COUNT_DROPPED_EVENT).bind(id);
                    conn.execute(dropped).await.map(drop)
                }
            })
        })
        .await
    }

    async fn order_events(&self, order_id: u64) -> Result<Vec<OrderEvent>, StorageError> {
        let select = Stmt::new(sql::ORDER_EVENTS).bind(id_i64(order_id)?);
        self.pooled()
            .fetch_all::<OrderEventRow>(select)
            .await?
            .into_iter()
            .map(|r| r.into_event(order_id))
            .collect()
    }

    async fn orders_in_status(
        &self,
        statuses: &[Status],
    ) -> Result<Vec<StoredOrder>, StorageError> {
        if statuses.is_empty() {
            return Ok(Vec::new());
        }
        let names = statuses.iter().map(|s| s.as_str()).collect();
        let (set, values) = sql::set_of(Self::DIALECT, Value::Texts(names));
        orders(
            self,
            Stmt::new(sql::orders_in_status(&set)).bind_all(values),
        )
        .await
    }

    async fn put_inventories(
        &self,
        batch: &[(MachineNo, Vec<InventoryItem>)],
        at: DateTime<Utc>,
    ) -> Result<(), StorageError> {
        self.replace_inventories(batch, at).await
    }

    async fn inventories(&self) -> Result<Vec<(MachineNo, Vec<InventoryItem>)>, StorageError> {
        let rows = self
            .pooled()
            .fetch_all::<InventoryRow>(Stmt::new(sql::INVENTORIES))
            .await?;
        rows::inventories(rows)
    }
}
