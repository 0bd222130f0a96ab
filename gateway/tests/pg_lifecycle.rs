//! `lifecycle.rs` once more, on PostgreSQL: the file picks the backend from
//! this test binary's `pg_` name prefix.

#[path = "lifecycle.rs"]
mod lifecycle;
