//! The order path's writes as PostgreSQL makes them: an order with its
//! lines and first event, and a status change with its lines, event and
//! webhooks, each in one statement over arrays ([`sql::PG_INSERT_ORDER_WHOLE`],
//! [`sql::PG_UPDATE_ORDER_WHOLE`]) run on its own, so one round trip and one
//! commit instead of a transaction of a statement per row (six to eight
//! round trips, each waited for in turn, while the order's row lock is
//! held). Reading an order (at every machine message about it): the order
//! and its lines in one statement. Inventory snapshots: a batch in three
//! statements whatever its size. Same outcomes and errors as the shared per-row writes
//! (`storage::ops::orders`), which SQLite keeps.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use vendgate_proto::machine::MachineNo;
use vendgate_proto::msg::InventoryItem;

use super::bind::pg_error;
use super::locks::INVENTORY_LOCK_CLASS;
use super::PgStorage;
use crate::domain::order::{Line, Status};
use crate::storage::backend::Backend;
use crate::storage::ops::orders::{order_change, order_row};
use crate::storage::rows::{id_i64, to_u32, OrderRow};
use crate::storage::run::{Run, Stmt, Transaction, Value};
use crate::storage::sql;
use crate::storage::{
    NewOrder, NewOutboxEvent, OrderChange, OrderEvent, StorageError, StoredOrder,
};

/// The line numbers `0..n` as stored.
fn line_numbers(n: usize) -> Vec<i64> {
    (0..n)
        .map(|i| i64::try_from(i).unwrap_or(i64::MAX))
        .collect()
}

/// [`crate::storage::OrderStorage::insert_order`]: one statement.
pub(super) async fn insert_order(
    s: &PgStorage,
    id: i64,
    o: &NewOrder,
    ev: &OrderEvent,
) -> Result<(), StorageError> {
    let insert = order_row(sql::PG_INSERT_ORDER_WHOLE, id, o)
        .bind(Value::Ints(line_numbers(o.lines.len())))
        .bind(Value::Ints(o.lines.iter().map(|l| l.product_id).collect()))
        .bind(Value::Ints(
            o.lines.iter().map(|l| i64::from(l.quantity)).collect(),
        ))
        .bind(Value::Ints(
            o.lines.iter().map(|l| i64::from(l.dispensed)).collect(),
        ))
        .bind(Value::Ints(o.lines.iter().map(|l| l.unit_price).collect()))
        .bind(ev.at.timestamp_millis())
        .bind(&ev.kind)
        .bind(ev.detail.to_string());
    s.pooled().execute(insert).await?;
    Ok(())
}

/// [`crate::storage::OrderStorage::update_order`]: one statement; false
/// when the compare-and-set missed (nothing written).
pub(super) async fn change_order(
    s: &PgStorage,
    id: i64,
    from: Status,
    change: &OrderChange,
    ev: &OrderEvent,
    outbox: &[NewOutboxEvent],
) -> Result<bool, StorageError> {
    let order_ids = outbox
        .iter()
        // -1: no order (see the statement).
        .map(|o| o.order_id.map(id_i64).transpose().map(|v| v.unwrap_or(-1)))
        .collect::<Result<Vec<i64>, _>>()?;
    let update = order_change(sql::PG_UPDATE_ORDER_WHOLE, id, from, change)
        .bind(Value::Ints(line_numbers(change.lines.len())))
        .bind(Value::Ints(
            change
                .lines
                .iter()
                .map(|l| i64::from(l.dispensed))
                .collect(),
        ))
        .bind(ev.at.timestamp_millis())
        .bind(&ev.kind)
        .bind(ev.detail.to_string())
        .bind(Value::Texts(
            outbox.iter().map(|o| o.event_id.as_str()).collect(),
        ))
        .bind(Value::Texts(
            outbox.iter().map(|o| o.merchant_appid.as_str()).collect(),
        ))
        .bind(Value::Texts(
            outbox.iter().map(|o| o.order_key.as_str()).collect(),
        ))
        .bind(Value::Ints(order_ids))
        .bind(Value::Texts(
            outbox
                .iter()
                // '': no machine (see the statement).
                .map(|o| o.machine_no.as_ref().map_or("", |m| m.as_str()))
                .collect(),
        ))
        .bind(Value::Texts(
            outbox.iter().map(|o| o.kind.as_str()).collect(),
        ))
        .bind(Value::Texts(
            outbox.iter().map(|o| o.body.as_str()).collect(),
        ))
        .bind(Value::Ints(
            outbox
                .iter()
                .map(|o| o.created_at.timestamp_millis())
                .collect(),
        ));
    let (changed,): (i64,) = s.pooled().fetch_one(update).await?;
    Ok(changed == 1)
}

/// A row of [`sql::PG_ORDER_WITH_LINES`].
#[derive(sqlx::FromRow)]
struct OrderWithLines {
    #[sqlx(flatten)]
    order: OrderRow,
    products: Option<Vec<i64>>,
    quantities: Option<Vec<i64>>,
    dispensed_counts: Option<Vec<i64>>,
    unit_prices: Option<Vec<i64>>,
}

/// [`crate::storage::OrderStorage::order`]: the order and its lines in one
/// statement.
pub(super) async fn one_order(s: &PgStorage, id: i64) -> Result<Option<StoredOrder>, StorageError> {
    let row: Option<OrderWithLines> = sqlx::query_as(sql::PG_ORDER_WITH_LINES)
        .bind(id)
        .fetch_optional(s.pool())
        .await
        .map_err(pg_error)?;
    let Some(r) = row else { return Ok(None) };
    let products = r.products.unwrap_or_default();
    let (quantities, dispensed, prices) = (
        r.quantities.unwrap_or_default(),
        r.dispensed_counts.unwrap_or_default(),
        r.unit_prices.unwrap_or_default(),
    );
    let mut lines = Vec::with_capacity(products.len());
    for (i, product_id) in products.into_iter().enumerate() {
        // The four arrays aggregate the same rows: of equal length.
        let (Some(q), Some(d), Some(p)) = (quantities.get(i), dispensed.get(i), prices.get(i))
        else {
            return Err(StorageError::Corrupt(format!("lines of order {id}")));
        };
        lines.push(Line {
            product_id,
            quantity: to_u32(*q, "quantity")?,
            dispensed: to_u32(*d, "dispensed")?,
            unit_price: *p,
        });
    }
    r.order.into_order(lines).map(Some)
}

/// The advisory lock key of machine `m`'s inventory (as
/// [`super::locks::lock_inventory`] takes it).
fn inventory_key(m: &MachineNo) -> i32 {
    i32::try_from(m.to_u32()).unwrap_or(i32::MAX)
}

/// [`crate::storage::OrderStorage::put_inventories`]: one transaction of
/// three statements for the whole batch: the machines' snapshot locks (in
/// ascending order, so batches cannot deadlock), the DELETE of their rows,
/// and the INSERT of the new ones. A machine listed twice: its last snapshot
/// wins, as does a product listed twice in a snapshot (one INSERT cannot
/// upsert a row twice, so the rows are made unique first).
pub(super) async fn replace_inventories(
    s: &PgStorage,
    batch: &[(MachineNo, Vec<InventoryItem>)],
    at: DateTime<Utc>,
) -> Result<(), StorageError> {
    if batch.is_empty() {
        return Ok(());
    }
    let mut last: HashMap<&MachineNo, &[InventoryItem]> = HashMap::with_capacity(batch.len());
    for (m, items) in batch {
        last.insert(m, items);
    }
    let mut machines: Vec<&MachineNo> = last.keys().copied().collect();
    machines.sort_by(|a, b| a.as_str().cmp(b.as_str()));
    let (mut nos, mut products, mut stocks, mut prices) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for m in &machines {
        let items = last.get(m).copied().unwrap_or_default();
        let mut by_product: HashMap<i64, &InventoryItem> = HashMap::with_capacity(items.len());
        for it in items {
            by_product.insert(it.product_id, it);
        }
        let mut unique: Vec<&InventoryItem> = by_product.into_values().collect();
        unique.sort_by_key(|it| it.product_id);
        for it in unique {
            nos.push(m.as_str());
            products.push(it.product_id);
            stocks.push(i64::from(it.stock));
            prices.push(it.price);
        }
    }
    let keys: Vec<i64> = machines
        .iter()
        .map(|m| i64::from(inventory_key(m)))
        .collect();
    let mut tx = s.pool().begin().await.map_err(pg_error)?;
    let lock = Stmt::new(sql::PG_LOCK_INVENTORIES)
        .bind(INVENTORY_LOCK_CLASS)
        .bind(Value::Ints(keys));
    tx.execute(lock).await?;
    let all: Vec<&str> = machines.iter().map(|m| m.as_str()).collect();
    tx.execute(Stmt::new(sql::PG_DELETE_INVENTORIES).bind(Value::Texts(all)))
        .await?;
    if !nos.is_empty() {
        let insert = Stmt::new(sql::PG_INSERT_INVENTORIES)
            .bind(Value::Texts(nos))
            .bind(Value::Ints(products))
            .bind(Value::Ints(stocks))
            .bind(Value::Ints(prices))
            .bind(at.timestamp_millis());
        tx.execute(insert).await?;
    }
    Transaction::commit(tx).await
}
