//! `order_truth.rs` once more, on PostgreSQL: the harness picks the backend
//! from this test binary's `pg_` name prefix (`vendgate_e2e::on_postgres`).

#[path = "order_truth.rs"]
mod order_truth;
