//! Every SQL statement of the storage, written once as text with `$N`
//! placeholders: PostgreSQL numbers its parameters so, and sqlx-sqlite binds
//! a `$N` parameter to the N-th bound value (a repeated `$N` is one value).
//! Where the engines need different text, both variants stand side by side
//! with the reason. Binding values and reading rows are each backend's part.
//!
//! Flags are INTEGER 0/1 in SQLite and BOOLEAN in PostgreSQL. Shared text
//! sets them with `true`/`false` (SQLite reads those keywords as 1 and 0)
//! and tests them as truth values (`WHERE online OR …`), which both engines
//! read alike. The exception is a test a partial index must match: see
//! `flagged!`.

use super::cluster::Due;
use super::orders::OrderQuery;
use super::run::{Dialect, Value};
use crate::domain::order::Status;

/// A test against the set `values` (a [`Value::Ints`] or [`Value::Texts`])
/// as the only parameters of its statement, and the values to bind: SQLite
/// has no arrays, so an `IN ($1, …)` list with each value bound; PostgreSQL
/// one array, `= ANY($1)`.
pub fn set_of(d: Dialect, values: Value<'_>) -> (String, Vec<Value<'_>>) {
    match (d, values) {
        (Dialect::Postgres, values) => ("= ANY($1)".to_string(), vec![values]),
        (Dialect::Sqlite, Value::Ints(v)) => {
            (in_list(v.len()), v.into_iter().map(Value::Int).collect())
        }
        (Dialect::Sqlite, Value::Texts(v)) => {
            (in_list(v.len()), v.into_iter().map(Value::from).collect())
        }
        (Dialect::Sqlite, one) => (in_list(1), vec![one]),
    }
}

/// A statement whose text differs between the engines.
#[derive(Debug, Clone, Copy)]
pub struct Variants {
    pub sqlite: &'static str,
    pub postgres: &'static str,
}

impl Variants {
    /// The text for `d`.
    pub fn of(self, d: Dialect) -> &'static str {
        match d {
            Dialect::Sqlite => self.sqlite,
            Dialect::Postgres => self.postgres,
        }
    }
}

/// A statement written once with `YES` where it tests a flag, as
/// [`Variants`]: `= 1` for SQLite, `= true` for PostgreSQL. SQLite uses a
/// partial index (`… WHERE online = 1`) only when the query repeats its
/// condition to the letter; PostgreSQL reads `flag = true` as the bare flag
/// its partial indexes name.
macro_rules! flagged {
    (@part $yes:literal, YES) => { $yes };
    (@part $yes:literal, $text:literal) => { $text };
    ($($part:tt),+ $(,)?) => {
        Variants {
            sqlite: concat!($(flagged!(@part "1", $part)),+),
            postgres: concat!($(flagged!(@part "true", $part)),+),
        }
    };
}

// ---------------------------------------------------------------- accounts

macro_rules! merchant_columns {
    () => {
        "appid, name, notify_url, appsecret_hash, appsecret_enc, created_at_ms, \
         prev_appsecret_hash, prev_appsecret_expires_ms, disabled_at_ms"
    };
}

macro_rules! machine_columns {
    () => {
        "machine_no, merchant_appid, secret_hash, online, last_seen_ms, online_since_ms, \
         created_at_ms, prev_secret_hash, prev_secret_expires_ms, disabled_at_ms, removed_at_ms"
    };
}

macro_rules! service_columns {
    () => {
        "username, name, password_hash, created_at_ms"
    };
}

pub const INSERT_MERCHANT: &str = "INSERT INTO merchants \
     (appid, name, notify_url, appsecret_hash, appsecret_enc, created_at_ms) \
     VALUES ($1, $2, $3, $4, $5, $6)";

pub const MERCHANT: &str = concat!(
    "SELECT ",
    merchant_columns!(),
    " FROM merchants WHERE appid = $1"
);

pub const MERCHANTS: &str = concat!(
    "SELECT ",
    merchant_columns!(),
    " FROM merchants ORDER BY appid"
);

pub const SET_NOTIFY_URL: &str = "UPDATE merchants SET notify_url = $1 WHERE appid = $2";

/// Right-hand sides of an UPDATE see the row as it was, so the old
/// AppSecret moves to `prev_appsecret_hash` while the new one lands; the
/// encrypted copy for webhook signing changes in the same statement.
pub const ROTATE_MERCHANT_SECRET: &str = "UPDATE merchants SET \
     prev_appsecret_hash = CASE WHEN CAST($2 AS BIGINT) IS NULL THEN NULL ELSE appsecret_hash END, \
     prev_appsecret_expires_ms = $2, appsecret_hash = $1, appsecret_enc = $3 \
     WHERE appid = $4";

pub const SET_MERCHANT_DISABLED: &str = "UPDATE merchants SET disabled_at_ms = $1 WHERE appid = $2";

macro_rules! insert_machines_into {
    () => {
        "INSERT INTO machines (machine_no, merchant_appid, secret_hash, created_at_ms) "
    };
}

/// The head of bulk provisioning's INSERT; SQLite adds rows of `VALUES`.
pub const INSERT_MACHINES_INTO: &str = insert_machines_into!();

pub const INSERT_MACHINE: &str = concat!(insert_machines_into!(), "VALUES ($1, $2, $3, $4)");

/// PostgreSQL: bulk provisioning in one statement over arrays, one round
/// trip for any number of machines. SQLite has no arrays.
pub const INSERT_MACHINES_UNNEST: &str = concat!(
    insert_machines_into!(),
    "SELECT no, owner, hash, $4 FROM UNNEST($1::text[], $2::text[], $3::text[]) \
     AS t (no, owner, hash)"
);

pub const MACHINE: &str = concat!(
    "SELECT ",
    machine_columns!(),
    " FROM machines WHERE machine_no = $1"
);

/// Two statements rather than `$1 IS NULL OR …`, so that the merchant
/// filter can use the machines_by_merchant index.
pub const MACHINES_OF_MERCHANT: &str = concat!(
    "SELECT ",
    machine_columns!(),
    " FROM machines WHERE merchant_appid = $1 ORDER BY machine_no"
);

pub const MACHINES: &str = concat!(
    "SELECT ",
    machine_columns!(),
    " FROM machines ORDER BY machine_no"
);

/// As [`ROTATE_MERCHANT_SECRET`], for a machine's secret.
pub const ROTATE_MACHINE_SECRET: &str = "UPDATE machines SET \
     prev_secret_hash = CASE WHEN CAST($2 AS BIGINT) IS NULL THEN NULL ELSE secret_hash END, \
     prev_secret_expires_ms = $2, secret_hash = $1 WHERE machine_no = $3";

pub const SET_MACHINE_DISABLED: &str =
    "UPDATE machines SET disabled_at_ms = $1 WHERE machine_no = $2 AND removed_at_ms IS NULL";

pub const BLOCKED_MACHINES: &str = "SELECT machine_no FROM machines \
     WHERE disabled_at_ms IS NOT NULL OR removed_at_ms IS NOT NULL";

pub const INSERT_SERVICE: &str = "INSERT INTO services \
     (username, name, password_hash, created_at_ms) VALUES ($1, $2, $3, $4)";

pub const SERVICE: &str = concat!(
    "SELECT ",
    service_columns!(),
    " FROM services WHERE username = $1"
);

pub const SERVICES: &str = concat!(
    "SELECT ",
    service_columns!(),
    " FROM services ORDER BY username"
);

pub const REMOVE_SERVICE: &str = "DELETE FROM services WHERE username = $1";

// ---------------------------------------------------------------- presence

/// A presence write: `$1` machine, `$2` epoch, `$3` at. The `presence_epoch
/// <= $2` guard drops stale writes in the statement itself, so the check and
/// the write are one atomic step with several writers (a PostgreSQL writer
/// that waited for the row's lock re-checks it against the committed row).
/// In SET, every right-hand side sees the old row. A repeated online write
/// of the same connection (a resync) keeps its online_since; a new
/// connection starts it afresh.
macro_rules! presence_online {
    () => {
        "UPDATE machines SET \
             online_since_ms = CASE WHEN online AND presence_epoch = $2 \
                               THEN online_since_ms ELSE $3 END, \
             online = true, presence_epoch = $2, last_seen_ms = $3 \
         WHERE machine_no = $1 AND presence_epoch <= $2"
    };
}

macro_rules! presence_offline {
    () => {
        "UPDATE machines SET \
             online = false, online_since_ms = NULL, presence_epoch = $2, last_seen_ms = $3 \
         WHERE machine_no = $1 AND presence_epoch <= $2"
    };
}

pub const PRESENCE_ONLINE: &str = presence_online!();
pub const PRESENCE_OFFLINE: &str = presence_offline!();

/// The presence write for `online`.
pub fn presence(online: bool) -> &'static str {
    if online {
        PRESENCE_ONLINE
    } else {
        PRESENCE_OFFLINE
    }
}

/// PostgreSQL: the presence write only if it also flips the stored flag
/// (`$4` the new flag), returning the machine's merchant. Two nodes writing
/// the same flip: the second waits for the first's row lock, then finds the
/// flag flipped, so exactly one of them sees the flip. SQLite needs no such
/// statement: its writers hold the write lock from BEGIN IMMEDIATE, so it
/// checks the flip before the plain write ([`MACHINE_EVENT_BEFORE_WRITE`]).
pub fn presence_if_flip(online: bool) -> &'static str {
    if online {
        concat!(
            presence_online!(),
            " AND online <> $4 RETURNING merchant_appid"
        )
    } else {
        concat!(
            presence_offline!(),
            " AND online <> $4 RETURNING merchant_appid"
        )
    }
}

/// At start-up nothing is connected: every machine offline, epochs reset.
pub const RESET_PRESENCE: &str = "UPDATE machines SET online = false, online_since_ms = NULL, \
     presence_epoch = 0 WHERE online OR presence_epoch <> 0";

/// SQLite: a machine event written before the presence write `$5`/`$6`/`$7`
/// (machine, epoch, new flag) applies, judged against the row as it is: the
/// write will apply (epoch rule) and flip `online`, and the merchant wants
/// notifications. The transaction holds the write lock, so nothing changes
/// the row in between.
pub const MACHINE_EVENT_BEFORE_WRITE: &str = "INSERT INTO outbox \
     (event_id, merchant_appid, order_key, machine_no, type, body, created_at_ms, \
      next_attempt_at_ms) \
     SELECT $1, m.merchant_appid, 'machine:' || m.machine_no, m.machine_no, $2, $3, $4, $4 \
     FROM machines m JOIN merchants c ON c.appid = m.merchant_appid \
     WHERE m.machine_no = $5 AND m.presence_epoch <= $6 AND m.online <> $7 \
       AND c.notify_url IS NOT NULL";

/// PostgreSQL: the machine event of a flip [`presence_if_flip`] reported,
/// for merchant `$6` if it wants notifications. Written after the machine
/// row's UPDATE, under its lock, so events of one machine get their seq in
/// commit order.
pub const MACHINE_EVENT_AFTER_FLIP: &str = "INSERT INTO outbox \
     (event_id, merchant_appid, order_key, machine_no, type, body, created_at_ms, \
      next_attempt_at_ms) \
     SELECT $1, c.appid, 'machine:' || $2, $2, $3, $4, $5, $5 \
     FROM merchants c WHERE c.appid = $6 AND c.notify_url IS NOT NULL";

// ------------------------------------------------------------------ orders

macro_rules! order_columns {
    () => {
        "order_id, merchant_appid, machine_no, out_trade_no, request_fingerprint, pay_later, \
         status, amount, refund_amount, error, result_applied, created_at_ms, updated_at_ms, \
         dispense_deadline_ms, pay_deadline_ms, refunded_at_ms, refunded_amount, accept_by_ms, \
         events_dropped"
    };
}

/// What [`crate::storage::rows::OrderRow`] reads.
pub const ORDER_COLUMNS: &str = order_columns!();

/// `$9` is both the creation and the update time.
pub const INSERT_ORDER: &str = "INSERT INTO orders (order_id, merchant_appid, machine_no, \
     out_trade_no, request_fingerprint, pay_later, status, amount, created_at_ms, updated_at_ms, \
     pay_deadline_ms, accept_by_ms) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $9, $10, $11)";

pub const INSERT_ORDER_LINE: &str = "INSERT INTO order_items \
     (order_id, line, product_id, quantity, dispensed, unit_price) \
     VALUES ($1, $2, $3, $4, $5, $6)";

pub const INSERT_ORDER_EVENT: &str =
    "INSERT INTO order_events (order_id, at_ms, kind, detail) VALUES ($1, $2, $3, $4)";

/// An outbox row, due at once (`$8` is both its creation and its first
/// attempt time).
pub const INSERT_OUTBOX: &str = "INSERT INTO outbox (event_id, merchant_appid, order_key, \
     order_id, machine_no, type, body, created_at_ms, next_attempt_at_ms) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $8)";

/// The status change compare-and-set on `$9` (and, when `$11` is set, on
/// `accept_by` being later). A status change ends whatever a sweep claimed
/// the order for, so its lease is dropped: in its new status the order is
/// due on its own terms.
pub const UPDATE_ORDER: &str = "UPDATE orders SET status = $1, error = $2, \
     result_applied = $3, refund_amount = $4, dispense_deadline_ms = $5, cancel_pending = $6, \
     accept_by_ms = $10, sweep_lease_until_ms = NULL, updated_at_ms = $7 \
     WHERE order_id = $8 AND status = $9 \
     AND (CAST($11 AS BIGINT) IS NULL OR accept_by_ms > $11)";

pub const UPDATE_ORDER_LINE: &str =
    "UPDATE order_items SET dispensed = $1 WHERE order_id = $2 AND line = $3";

// PostgreSQL only: the order path's writes, each one statement (so one
// round trip and one commit) instead of a transaction of one statement per
// row. The rows of the other tables join the order's own INSERT or UPDATE
// (`FROM o`, `FROM u`), so they are written only if it wrote, and only after
// it: an outbox row gets its `seq` after the UPDATE took the order's row
// lock, so events of one key still get their seqs in commit order. Lines
// and outbox rows come as arrays (SQLite has none: it keeps the statements
// above, one per row, in its group-commit writer).

/// PostgreSQL: [`INSERT_ORDER`] (`$1`…`$11`), its lines (`$12`…`$16`: line,
/// product_id, quantity, dispensed, unit_price, as arrays) and its first
/// event (`$17`…`$19`: at_ms, kind, detail). The foreign keys of the lines
/// and the event on the order are checked at the end of the statement, when
/// the order row is there.
pub const PG_INSERT_ORDER_WHOLE: &str = "WITH o AS (INSERT INTO orders (order_id, \
     merchant_appid, machine_no, out_trade_no, request_fingerprint, pay_later, status, amount, \
     created_at_ms, updated_at_ms, pay_deadline_ms, accept_by_ms) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $9, $10, $11) RETURNING order_id), \
     l AS (INSERT INTO order_items (order_id, line, product_id, quantity, dispensed, unit_price) \
     SELECT o.order_id, x.line::integer, x.product_id, x.quantity, x.dispensed, x.unit_price \
     FROM o, UNNEST($12::bigint[], $13::bigint[], $14::bigint[], $15::bigint[], $16::bigint[]) \
     AS x (line, product_id, quantity, dispensed, unit_price)) \
     INSERT INTO order_events (order_id, at_ms, kind, detail) SELECT order_id, $17, $18, $19 FROM o";

/// PostgreSQL: [`UPDATE_ORDER`] (`$1`…`$11`, the same compare-and-set),
/// then, only if it matched, the lines' `dispensed` (`$12`, `$13`: line and
/// dispensed as arrays), its event (`$14`…`$16`: at_ms, kind, detail) and
/// its outbox rows (`$17`…`$24` as arrays: event_id, merchant_appid,
/// order_key, order_id, machine_no, type, body, created_at_ms), inserted in
/// the arrays' order. Arrays carry no NULLs here: an outbox row's absent
/// order_id is -1 and its absent machine_no '' (neither is a real one: ids
/// fit in i64 as non-negative numbers, a machine_no is 8 digits). Answers
/// the rows the compare-and-set changed (0 or 1).
pub const PG_UPDATE_ORDER_WHOLE: &str = "WITH u AS (UPDATE orders SET status = $1, \
     error = $2, result_applied = $3, refund_amount = $4, dispense_deadline_ms = $5, \
     cancel_pending = $6, accept_by_ms = $10, sweep_lease_until_ms = NULL, updated_at_ms = $7 \
     WHERE order_id = $8 AND status = $9 \
     AND (CAST($11 AS BIGINT) IS NULL OR accept_by_ms > $11) RETURNING order_id), \
     l AS (UPDATE order_items i SET dispensed = x.dispensed \
     FROM u, UNNEST($12::bigint[], $13::bigint[]) AS x (line, dispensed) \
     WHERE i.order_id = u.order_id AND i.line = x.line), \
     e AS (INSERT INTO order_events (order_id, at_ms, kind, detail) \
     SELECT order_id, $14, $15, $16 FROM u), \
     b AS (INSERT INTO outbox (event_id, merchant_appid, order_key, order_id, machine_no, type, \
     body, created_at_ms, next_attempt_at_ms) \
     SELECT x.event_id, x.merchant_appid, x.order_key, NULLIF(x.order_id, -1), \
     NULLIF(x.machine_no, ''), x.type, x.body, x.created_at_ms, x.created_at_ms \
     FROM u, UNNEST($17::text[], $18::text[], $19::text[], $20::bigint[], $21::text[], \
     $22::text[], $23::text[], $24::bigint[]) WITH ORDINALITY \
     AS x (event_id, merchant_appid, order_key, order_id, machine_no, type, body, \
     created_at_ms, n) ORDER BY x.n) \
     SELECT count(*) FROM u";

/// PostgreSQL: the advisory locks of the inventory snapshots of the
/// machines `$2` (as numbers; class `$1`), taken in ascending order so two
/// batches cannot deadlock on them.
pub const PG_LOCK_INVENTORIES: &str = "SELECT pg_advisory_xact_lock($1, m) \
     FROM (SELECT DISTINCT m FROM UNNEST($2::integer[]) AS t (m) ORDER BY m) AS s";

/// PostgreSQL: [`DELETE_INVENTORY`] of every machine in `$1`.
pub const PG_DELETE_INVENTORIES: &str = "DELETE FROM inventory WHERE machine_no = ANY($1)";

/// PostgreSQL: the snapshots' rows (`$1`…`$4`: machine_no, product_id,
/// stock, price as arrays; `$5` the time), at most one per machine and
/// product (an INSERT cannot upsert a row twice), after
/// [`PG_DELETE_INVENTORIES`] emptied their machines.
pub const PG_INSERT_INVENTORIES: &str = "INSERT INTO inventory \
     (machine_no, product_id, stock, price, updated_at_ms) \
     SELECT m, p, s, c, $5 FROM UNNEST($1::text[], $2::bigint[], $3::bigint[], $4::bigint[]) \
     AS t (m, p, s, c) \
     ON CONFLICT (machine_no, product_id) DO UPDATE SET stock = excluded.stock, \
     price = excluded.price, updated_at_ms = excluded.updated_at_ms";

pub const MARK_REFUNDED: &str = "UPDATE orders SET refunded_at_ms = $1, updated_at_ms = $1, \
     refunded_amount = refund_amount \
     WHERE order_id = $2 AND refunded_at_ms IS NULL AND refund_amount > 0";

pub const ORDER: &str = concat!(
    "SELECT ",
    order_columns!(),
    " FROM orders WHERE order_id = $1"
);

/// PostgreSQL: [`ORDER`] with its lines in the same statement (one round
/// trip instead of two: the order path reads an order at every machine
/// message), as arrays in line order (NULL without lines).
pub const PG_ORDER_WITH_LINES: &str = concat!(
    "SELECT ",
    order_columns!(),
    ", l.products, l.quantities, l.dispensed_counts, l.unit_prices FROM orders o \
     CROSS JOIN LATERAL (SELECT array_agg(product_id ORDER BY line) AS products, \
     array_agg(quantity ORDER BY line) AS quantities, \
     array_agg(dispensed ORDER BY line) AS dispensed_counts, \
     array_agg(unit_price ORDER BY line) AS unit_prices \
     FROM order_items i WHERE i.order_id = o.order_id) AS l \
     WHERE o.order_id = $1"
);

pub const ORDER_BY_OUT_TRADE_NO: &str = concat!(
    "SELECT ",
    order_columns!(),
    " FROM orders WHERE merchant_appid = $1 AND out_trade_no = $2"
);

/// An order's lines: SQLite reads them per order (the read is in-process),
/// PostgreSQL for every order of a listing in one round trip (an array).
pub const ORDER_LINES: Variants = Variants {
    sqlite: "SELECT order_id, product_id, quantity, dispensed, unit_price FROM order_items \
             WHERE order_id = $1 ORDER BY order_id, line",
    postgres: "SELECT order_id, product_id, quantity, dispensed, unit_price FROM order_items \
               WHERE order_id = ANY($1) ORDER BY order_id, line",
};

/// A merchant's order search: the count of all matches, one page of them
/// (newest first; the page's `LIMIT` and `OFFSET` are bound after
/// `values`), and the values of the filter, in order.
pub struct OrderSearch<'q> {
    pub count: String,
    pub page: String,
    pub values: Vec<Value<'q>>,
}

/// The statements of [`OrderQuery`]. The filter leads with `merchant_appid`
/// and a `created_at_ms` range: the `orders_by_merchant` index of both
/// schemas serves the filter and the newest-first order.
pub fn order_search<'q>(q: &'q OrderQuery) -> OrderSearch<'q> {
    let mut values = vec![Value::from(&q.merchant_appid)];
    let mut cond = String::from("merchant_appid = $1");
    let mut add = |test: &str, v: Value<'q>| {
        values.push(v);
        cond.push_str(&format!(" AND {test} ${}", values.len()));
    };
    if let Some(t) = q.from {
        add("created_at_ms >=", Value::Int(t.timestamp_millis()));
    }
    if let Some(t) = q.to {
        add("created_at_ms <", Value::Int(t.timestamp_millis()));
    }
    if let Some(s) = q.status {
        add("status =", Value::from(s.as_str()));
    }
    if let Some(m) = &q.machine_no {
        add("machine_no =", Value::from(m.as_str()));
    }
    if let Some(o) = &q.out_trade_no {
        add("out_trade_no =", Value::from(o));
    }
    let n = values.len();
    OrderSearch {
        count: format!("SELECT count(*) AS n FROM orders WHERE {cond}"),
        page: format!(
            "SELECT {ORDER_COLUMNS} FROM orders WHERE {cond} \
             ORDER BY created_at_ms DESC, order_id DESC LIMIT ${} OFFSET ${}",
            n + 1,
            n + 2
        ),
        values,
    }
}

pub const COUNT_UNPAID: &str = "SELECT \
     (SELECT count(*) FROM orders WHERE status = 'awaiting_payment' AND merchant_appid = $1) \
       AS by_merchant, \
     (SELECT count(*) FROM orders WHERE status = 'awaiting_payment' AND machine_no = $2) \
       AS by_machine";

/// The count on the order row bounds its extra events (`$2` the cap): no
/// scan of its timeline.
pub const COUNT_EXTRA_EVENT: &str = "UPDATE orders SET extra_events = extra_events + 1 \
     WHERE order_id = $1 AND extra_events < $2";

pub const COUNT_DROPPED_EVENT: &str =
    "UPDATE orders SET events_dropped = events_dropped + 1 WHERE order_id = $1";

pub const ORDER_EVENTS: &str =
    "SELECT at_ms, kind, detail FROM order_events WHERE order_id = $1 ORDER BY id";

/// Orders whose status is in `set` (`IN ($1, …)`, or `= ANY($1)`).
pub fn orders_in_status(set: &str) -> String {
    format!("SELECT {ORDER_COLUMNS} FROM orders WHERE status {set} ORDER BY order_id")
}

pub const DELETE_INVENTORY: &str = "DELETE FROM inventory WHERE machine_no = $1";

/// A product listed twice in one snapshot: the last entry wins.
pub const UPSERT_INVENTORY: &str = "INSERT INTO inventory \
     (machine_no, product_id, stock, price, updated_at_ms) VALUES ($1, $2, $3, $4, $5) \
     ON CONFLICT (machine_no, product_id) DO UPDATE SET stock = excluded.stock, \
     price = excluded.price, updated_at_ms = excluded.updated_at_ms";

pub const INVENTORIES: &str = "SELECT machine_no, product_id, stock, price FROM inventory \
     ORDER BY machine_no, product_id";

/// PostgreSQL: a transaction-scoped advisory lock on two keys (class,
/// object); it ends with the transaction.
pub const ADVISORY_XACT_LOCK: &str = "SELECT pg_advisory_xact_lock($1, $2)";

// ------------------------------------------------------------------ outbox

/// SQLite: is anything due at `$1`? The idle case of every poll is a read on
/// the partial index, without taking the write lock order writes need.
pub const OUTBOX_ANY_DUE: &str = "SELECT 1 FROM outbox o \
     JOIN merchants c ON c.appid = o.merchant_appid \
     WHERE o.status = 'pending' AND o.next_attempt_at_ms <= $1 \
     AND c.disabled_at_ms IS NULL LIMIT 1";

/// Due, pending events that are first of their key among pending ones, each
/// merchant's oldest due first and at most `$2` per merchant, oldest due
/// first overall, at most `$3`. The NOT EXISTS probe uses `outbox_by_key`;
/// the due filter `outbox_due`. Events of a disabled merchant are held:
/// never claimed, so never attempted, until it is enabled again.
pub const OUTBOX_CANDIDATES: &str = "\
SELECT seq, event_id, merchant_appid, order_key, type, body, attempts, created_at_ms, \
       pending_since_ms, notify_url, appsecret_enc FROM ( \
    SELECT o.seq, o.event_id, o.merchant_appid, o.order_key, o.type, o.body, o.attempts, \
           o.created_at_ms, COALESCE(o.pending_since_ms, o.created_at_ms) AS pending_since_ms, \
           o.next_attempt_at_ms, c.notify_url, c.appsecret_enc, \
           ROW_NUMBER() OVER (PARTITION BY o.merchant_appid \
                              ORDER BY o.next_attempt_at_ms, o.seq) AS rn \
    FROM outbox o JOIN merchants c ON c.appid = o.merchant_appid \
    WHERE o.status = 'pending' AND o.next_attempt_at_ms <= $1 \
      AND c.disabled_at_ms IS NULL \
      AND NOT EXISTS (SELECT 1 FROM outbox p \
                      WHERE p.order_key = o.order_key AND p.status = 'pending' AND p.seq < o.seq) \
) AS due WHERE rn <= $2 ORDER BY next_attempt_at_ms, seq LIMIT $3";

/// Lease candidates until `$1` if they are still due at `$3`. SQLite leases
/// one event per statement inside a BEGIN IMMEDIATE transaction (it holds
/// the write lock, so no one else leases meanwhile). PostgreSQL leases a
/// wave of events `$2` at once, skipping (not waiting for) rows another
/// claimer is leasing right now; a row another claimer leased meanwhile is
/// re-checked after its lock and is no longer due.
pub const OUTBOX_LEASE: Variants = Variants {
    sqlite: "UPDATE outbox SET next_attempt_at_ms = $1 \
             WHERE seq = $2 AND status = 'pending' AND next_attempt_at_ms <= $3",
    postgres: "UPDATE outbox SET next_attempt_at_ms = $1 WHERE seq IN ( \
                 SELECT seq FROM outbox WHERE seq = ANY($2) AND status = 'pending' \
                   AND next_attempt_at_ms <= $3 FOR UPDATE SKIP LOCKED) \
               RETURNING seq",
};

pub const INSERT_ATTEMPT: &str =
    "INSERT INTO outbox_attempts (event_id, at_ms, http_status, error) VALUES ($1, $2, $3, $4)";

/// An attempt's effect on its event; an event no longer pending is left as
/// it is.
pub const APPLY_ATTEMPT: &str = "UPDATE outbox SET attempts = attempts + 1, status = $1, \
     next_attempt_at_ms = $2, delivered_at_ms = $3, last_error = $4 \
     WHERE event_id = $5 AND status = 'pending'";

macro_rules! entry_columns {
    () => {
        "event_id, type, status, attempts, last_error, created_at_ms, next_attempt_at_ms, \
         delivered_at_ms, order_id, machine_no"
    };
}

// Two statements each, rather than `$2 IS NULL OR status = $2`, so the
// status filter can use outbox_by_merchant (merchant, status, seq).

pub const OUTBOX_COUNT: &str = "SELECT COUNT(*) AS n FROM outbox WHERE merchant_appid = $1";

pub const OUTBOX_PAGE: &str = concat!(
    "SELECT ",
    entry_columns!(),
    " FROM outbox WHERE merchant_appid = $1 ORDER BY seq LIMIT $2 OFFSET $3"
);

pub const OUTBOX_COUNT_IN_STATUS: &str =
    "SELECT COUNT(*) AS n FROM outbox WHERE merchant_appid = $1 AND status = $2";

pub const OUTBOX_PAGE_IN_STATUS: &str = concat!(
    "SELECT ",
    entry_columns!(),
    " FROM outbox WHERE merchant_appid = $1 AND status = $2 ORDER BY seq LIMIT $3 OFFSET $4"
);

/// Dead → pending, due at `$1` with a fresh retry budget.
pub const REPLAY_OUTBOX: &str = "UPDATE outbox SET status = 'pending', attempts = 0, \
     last_error = NULL, next_attempt_at_ms = $1, pending_since_ms = $1 \
     WHERE event_id = $2 AND merchant_appid = $3 AND status = 'dead'";

pub const OUTBOX_EVENT_EXISTS: &str =
    "SELECT 1 FROM outbox WHERE event_id = $1 AND merchant_appid = $2";

pub const OUTBOX_BACKLOG: &str = "SELECT COUNT(*) AS n, MIN(created_at_ms) AS oldest \
     FROM outbox WHERE status = 'pending'";

/// `http_status` is INTEGER in both schemas, read as BIGINT by both.
pub const ORDER_WEBHOOK_ATTEMPTS: &str = "SELECT a.event_id, o.type, a.at_ms, \
     CAST(a.http_status AS BIGINT) AS http_status, a.error \
     FROM outbox o JOIN outbox_attempts a ON a.event_id = o.event_id \
     WHERE o.order_id = $1 ORDER BY a.id";

// ----------------------------------------------------------------- cluster

/// One statement: the increment reads and writes the row under its lock, so
/// two callers always get two different epochs.
pub const TAKE_OWNERSHIP: &str = "UPDATE machines SET presence_epoch = presence_epoch + 1, \
     owner_node = $1, last_seen_ms = $2 WHERE machine_no = $3 RETURNING presence_epoch";

macro_rules! ownership_columns {
    () => {
        "machine_no, presence_epoch, owner_node, online"
    };
}

pub const OWNERSHIP: &str = concat!(
    "SELECT ",
    ownership_columns!(),
    " FROM machines ORDER BY machine_no"
);

/// [`OWNERSHIP`] with each row's presence time.
pub const OWNERSHIP_SEEN: &str = concat!(
    "SELECT ",
    ownership_columns!(),
    ", last_seen_ms FROM machines ORDER BY machine_no"
);

/// Ownership of the machines in `set` (`IN ($1, …)`, or `= ANY($1)`).
pub fn ownership_of(set: &str) -> String {
    format!(
        concat!(
            "SELECT ",
            ownership_columns!(),
            " FROM machines WHERE machine_no {} ORDER BY machine_no"
        ),
        set
    )
}

pub const REGISTER_NODE: &str = "INSERT INTO cluster_nodes \
     (node_id, incarnation, started_at_ms, heartbeat_at_ms) VALUES ($1, $2, $3, $3) \
     ON CONFLICT (node_id) DO UPDATE SET incarnation = excluded.incarnation, \
     started_at_ms = excluded.started_at_ms, heartbeat_at_ms = excluded.heartbeat_at_ms";

/// Online machines owned by node `$1`.
pub const OWNED_ONLINE: Variants = flagged!(
    "SELECT machine_no, presence_epoch FROM machines WHERE online = ",
    YES,
    " AND owner_node = $1 ORDER BY machine_no"
);

pub const NODE_HEARTBEAT: &str = "UPDATE cluster_nodes SET heartbeat_at_ms = $1 \
     WHERE node_id = $2 AND incarnation = $3";

pub const REAP_NODES: &str =
    "DELETE FROM cluster_nodes WHERE heartbeat_at_ms < $1 RETURNING node_id";

/// Machines stored online whose owner has no node row, at most `$1`. A NULL
/// owner has no node row either: online without an owner was written by a
/// single-node process, which is not running in a cluster (it would fight
/// the nodes over presence).
pub const ORPHANED_MACHINES: Variants = flagged!(
    "SELECT machine_no, presence_epoch FROM machines m WHERE online = ",
    YES,
    " AND NOT EXISTS (SELECT 1 FROM cluster_nodes n WHERE n.node_id = m.owner_node) \
     ORDER BY machine_no LIMIT $1"
);

pub const NODES: Variants = flagged!(
    "SELECT n.node_id, n.incarnation, n.started_at_ms, n.heartbeat_at_ms, \
       (SELECT COUNT(*) FROM machines m WHERE m.online = ",
    YES,
    " AND m.owner_node = n.node_id) AS online_machines \
     FROM cluster_nodes n ORDER BY n.node_id"
);

/// Select and lease (until `$2`) at most `$4` orders of kind `due`, oldest
/// deadline first, in one statement; `$1` is now, `$3` the stale-dispatch
/// cut-off. A lease runs out at its instant. PostgreSQL skips rows another
/// sweep is claiming right now instead of waiting for them, and re-checks a
/// row it leased meanwhile after its lock; SQLite runs the statement under
/// the write lock, so a concurrent claimer runs before or after it and then
/// finds these rows leased.
pub fn claim_due_orders(due: Due, d: Dialect) -> String {
    let (filter, order_by) = match due {
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
    };
    let lock = skip_locked(d);
    format!(
        "UPDATE orders SET sweep_lease_until_ms = $2 WHERE order_id IN ( \
           SELECT order_id FROM orders WHERE {filter} \
             AND (sweep_lease_until_ms IS NULL OR sweep_lease_until_ms <= $1) \
           ORDER BY {order_by}, order_id LIMIT $4{lock}) \
         RETURNING {ORDER_COLUMNS}"
    )
}

/// Orders of machine `$1` whose cancel is still owed, oldest first.
pub const PENDING_CANCELS: Variants = flagged!(
    "SELECT order_id FROM orders WHERE machine_no = $1 AND cancel_pending = ",
    YES,
    " ORDER BY updated_at_ms, order_id"
);

pub const CANCEL_DELIVERED: &str =
    "UPDATE orders SET cancel_pending = false WHERE order_id = $1 AND cancel_pending";

pub const OPEN_ORDERS: &str = concat!(
    "SELECT ",
    order_columns!(),
    " FROM orders WHERE machine_no = $1 \
     AND status IN ('awaiting_payment', 'dispatching', 'dispensing') ORDER BY order_id"
);

// --------------------------------------------------------------- lifecycle

/// Machine `$1`, if it exists and is not removed. PostgreSQL also locks the
/// row: inserting an order takes a key-share lock on it (the foreign key),
/// so a guarded change waits for orders being inserted to commit and later
/// inserts wait for the change. SQLite's guarded changes hold the write
/// lock instead.
pub const MACHINE_PRESENT: Variants = Variants {
    sqlite: "SELECT 1 FROM machines WHERE machine_no = $1 AND removed_at_ms IS NULL",
    postgres: "SELECT 1 FROM machines WHERE machine_no = $1 AND removed_at_ms IS NULL \
               FOR UPDATE",
};

/// Orders of machine `$1` still in flight (holding stock): a machine with
/// such an order cannot be removed or transferred.
pub fn machine_in_flight() -> String {
    format!(
        "SELECT COUNT(*) FROM orders WHERE machine_no = $1 AND {}",
        in_flight()
    )
}

/// Remove machine `$3` at `$1`: its secret becomes `$2` (a hash of a secret
/// nobody knows), its previous secret is dropped. With `guarded` (SQLite)
/// the statement itself checks that the machine is present and has no
/// order in flight; PostgreSQL has checked both under the row's lock.
pub fn remove_machine(guarded: bool) -> String {
    let sql = "UPDATE machines SET removed_at_ms = $1, secret_hash = $2, \
               prev_secret_hash = NULL, prev_secret_expires_ms = NULL WHERE machine_no = $3";
    if guarded {
        format!(
            "{sql} AND removed_at_ms IS NULL \
             AND NOT EXISTS (SELECT 1 FROM orders WHERE machine_no = $3 AND {})",
            in_flight()
        )
    } else {
        sql.to_string()
    }
}

pub const MERCHANT_EXISTS: &str = "SELECT 1 FROM merchants WHERE appid = $1";

/// Give machine `$2` to merchant `$1`, guarded or not as in
/// [`remove_machine`].
pub fn transfer_machine(guarded: bool) -> String {
    let sql = "UPDATE machines SET merchant_appid = $1 WHERE machine_no = $2";
    if guarded {
        format!(
            "{sql} AND removed_at_ms IS NULL \
             AND NOT EXISTS (SELECT 1 FROM orders WHERE machine_no = $2 AND {})",
            in_flight()
        )
    } else {
        sql.to_string()
    }
}

/// One page of an export: created in [`$1`, `$2`), of merchant `$3` if set,
/// after (`$4`, `$5`), at most `$6`.
pub const EXPORT_ORDERS: &str = concat!(
    "SELECT ",
    order_columns!(),
    " FROM orders WHERE created_at_ms >= $1 AND created_at_ms < $2 \
     AND (CAST($3 AS TEXT) IS NULL OR merchant_appid = $3) \
     AND (created_at_ms > $4 OR (created_at_ms = $4 AND order_id > $5)) \
     ORDER BY created_at_ms, order_id LIMIT $6"
);

/// Ids of at most `$3` purgeable orders (see [`purgeable`]), least recently
/// changed first. PostgreSQL skips rows locked right now: an order some node
/// is updating waits for the next batch instead of holding this one.
pub fn purge_orders_batch(d: Dialect) -> String {
    format!(
        "SELECT o.order_id FROM orders o WHERE {} ORDER BY o.updated_at_ms LIMIT $3{}",
        purgeable("$1", "$2", d.yes()),
        skip_locked(d)
    )
}

/// PostgreSQL's `FOR UPDATE SKIP LOCKED` on a claim's rows; SQLite holds the
/// write lock instead.
fn skip_locked(d: Dialect) -> &'static str {
    match d {
        Dialect::Sqlite => "",
        Dialect::Postgres => " FOR UPDATE SKIP LOCKED",
    }
}

/// The deletes of a purge batch for the orders whose ids are in `set`
/// (`IN ($1, …)`, or `= ANY($1)`), children first: timeline, lines, webhook
/// attempts, webhooks, orders.
pub fn purge_order_rows(set: &str) -> [String; 5] {
    [
        format!("DELETE FROM order_events WHERE order_id {set}"),
        format!("DELETE FROM order_items WHERE order_id {set}"),
        format!(
            "DELETE FROM outbox_attempts WHERE event_id IN \
             (SELECT event_id FROM outbox WHERE order_id {set})"
        ),
        format!("DELETE FROM outbox WHERE order_id {set}"),
        format!("DELETE FROM orders WHERE order_id {set}"),
    ]
}

/// Seqs of at most `$2` delivered or dead webhook rows created before `$1`;
/// PostgreSQL skips rows locked right now, as [`purge_orders_batch`].
pub const PURGE_WEBHOOKS_BATCH: Variants = Variants {
    sqlite: "SELECT seq FROM outbox WHERE status IN ('delivered', 'dead') \
             AND created_at_ms < $1 ORDER BY created_at_ms LIMIT $2",
    postgres: "SELECT seq FROM outbox WHERE status IN ('delivered', 'dead') \
               AND created_at_ms < $1 ORDER BY created_at_ms LIMIT $2 FOR UPDATE SKIP LOCKED",
};

/// The deletes of a webhook purge batch for the seqs in `set`: attempts,
/// then the rows.
pub fn purge_webhook_rows(set: &str) -> [String; 2] {
    [
        format!(
            "DELETE FROM outbox_attempts WHERE event_id IN \
             (SELECT event_id FROM outbox WHERE seq {set})"
        ),
        format!("DELETE FROM outbox WHERE seq {set}"),
    ]
}

/// The database's size in bytes: SQLite the main file's pages, PostgreSQL
/// `pg_database_size`.
pub const DATABASE_SIZE: Variants = Variants {
    sqlite: "SELECT page_count * page_size FROM pragma_page_count(), pragma_page_size()",
    postgres: "SELECT pg_database_size(current_database())",
};

/// PostgreSQL readiness: a standby in recovery, or a read-only default,
/// would take every read and fail every order. (SQLite proves the same by
/// taking its write lock.)
pub const PG_READ_ONLY: &str =
    "SELECT pg_is_in_recovery() OR current_setting('transaction_read_only') = 'on'";

/// The condition (on `orders o`) of an order that is final, last changed
/// before `b`, and either not protected or last changed before `p`; `yes`
/// is the engine's true flag value.
fn purgeable(b: &str, p: &str, yes: &str) -> String {
    // Every status that holds no stock: the final ones and `unknown`
    // (protected below).
    let done = status_list(|s| !s.holds_reservation());
    format!(
        "o.status IN ({done}) \
         AND o.updated_at_ms < {b} \
         AND NOT EXISTS (SELECT 1 FROM outbox w WHERE w.order_id = o.order_id \
                         AND w.status = 'pending') \
         AND (o.updated_at_ms < {p} OR NOT ( \
              o.status = 'unknown' \
              OR o.cancel_pending = {yes} \
              OR (o.refund_amount > 0 AND o.refunded_at_ms IS NULL) \
              OR (o.status = 'rejected' AND o.result_applied = {yes} \
                  AND EXISTS (SELECT 1 FROM order_items i \
                              WHERE i.order_id = o.order_id AND i.dispensed > 0))))"
    )
}

/// `status IN (…)` of the statuses still in flight (holding stock).
fn in_flight() -> String {
    format!("status IN ({})", status_list(Status::holds_reservation))
}

/// The quoted names of the statuses `keep` selects, comma-separated.
fn status_list(keep: impl Fn(Status) -> bool) -> String {
    let list: Vec<String> = Status::ALL
        .into_iter()
        .filter(|s| keep(*s))
        .map(|s| format!("'{}'", s.as_str()))
        .collect();
    list.join(", ")
}

/// `IN ($1, …, $n)`: SQLite's way to test against a list (it has no arrays).
pub fn in_list(n: usize) -> String {
    let marks: Vec<String> = (1..=n).map(|i| format!("${i}")).collect();
    format!("IN ({})", marks.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flagged_statements_differ_only_in_the_flag() {
        for v in [OWNED_ONLINE, ORPHANED_MACHINES, NODES, PENDING_CANCELS] {
            assert_eq!(v.sqlite.replace("= 1", "= true"), v.postgres);
        }
    }

    #[test]
    fn in_lists_number_their_placeholders() {
        assert_eq!(in_list(3), "IN ($1, $2, $3)");
        assert_eq!(
            purge_order_rows(&in_list(1))[4],
            "DELETE FROM orders WHERE order_id IN ($1)"
        );
    }
}
