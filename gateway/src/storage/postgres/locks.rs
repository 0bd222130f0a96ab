//! The locks the PostgreSQL backend takes beyond a statement's own: the
//! machine_no order batches lock machine rows in, a machine row held for a
//! guarded change, an advisory lock per machine's inventory snapshot, and
//! outbox leases taken `FOR UPDATE SKIP LOCKED`. (SQLite needs none of
//! these: its writers hold the one write lock.)

use sqlx::PgConnection;
use vendgate_proto::machine::MachineNo;

use super::PgStorage;
use crate::storage::backend::Backend;
use crate::storage::run::{Run, Stmt, Value};
use crate::storage::sql;
use crate::storage::StorageError;

/// The class half of the two-key advisory lock that serialises inventory
/// snapshots of one machine ("vg" and 1); the machine number is the other
/// half. The two-key space is apart from sqlx's one-key migration lock.
pub(super) const INVENTORY_LOCK_CLASS: i32 = 0x7667_0001;

/// `batch` in machine_no order, each machine's writes in their given order
/// (a stable sort): the lock order that keeps concurrent batches from
/// deadlocking.
pub(super) fn by_machine<T: Clone>(batch: &[T], key: impl Fn(&T) -> &MachineNo) -> Vec<T> {
    let mut v = batch.to_vec();
    v.sort_by(|a, b| key(a).as_str().cmp(key(b).as_str()));
    v
}

/// Lock machine `m`'s row until the transaction ends; false if it does not
/// exist or was removed.
pub(super) async fn lock_machine(conn: &mut impl Run, m: &MachineNo) -> Result<bool, StorageError> {
    let found: Option<(i32,)> = conn
        .fetch_optional(Stmt::new(sql::MACHINE_PRESENT.postgres).bind(m.as_str()))
        .await?;
    Ok(found.is_some())
}

/// Serialise replacing machine `m`'s inventory snapshot until the
/// transaction ends: two writers replacing it at once (a take-over between
/// nodes) would otherwise interleave their DELETE and INSERTs into a mix of
/// both.
pub(super) async fn lock_inventory(
    conn: &mut PgConnection,
    m: &MachineNo,
) -> Result<(), StorageError> {
    let lock = Stmt::new(sql::ADVISORY_XACT_LOCK)
        .bind(INVENTORY_LOCK_CLASS)
        .bind(i32::try_from(m.to_u32()).unwrap_or(i32::MAX));
    conn.execute(lock).await?;
    Ok(())
}

/// Lease the outbox events `seqs` until `lease_until_ms` if they are still
/// due at `now_ms` and no other claimer is leasing them right now; the seqs
/// this call leased.
pub(super) async fn lease_outbox(
    s: &PgStorage,
    seqs: Vec<i64>,
    lease_until_ms: i64,
    now_ms: i64,
) -> Result<Vec<i64>, StorageError> {
    let lease = Stmt::new(sql::OUTBOX_LEASE.postgres)
        .bind(lease_until_ms)
        .bind(Value::Ints(seqs))
        .bind(now_ms);
    let leased: Vec<(i64,)> = s.pooled().fetch_all(lease).await?;
    Ok(leased.into_iter().map(|(seq,)| seq).collect())
}
