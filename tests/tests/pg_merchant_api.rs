//! `merchant_api.rs` once more, on PostgreSQL: the harness picks the backend
//! from this test binary's `pg_` name prefix (`vendgate_e2e::on_postgres`).

#[path = "merchant_api.rs"]
mod merchant_api;
