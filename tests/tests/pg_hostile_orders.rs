//! `hostile_orders.rs` once more, on PostgreSQL: the harness picks the
//! backend from this test binary's `pg_` name prefix.

#[path = "hostile_orders.rs"]
mod hostile_orders;
