//! The guarded machine changes as PostgreSQL makes them: the machine row is
//! locked first ([`locks::lock_machine`]); inserting an order takes a
//! key-share lock on it (the foreign key), so the change waits for orders
//! being inserted to commit, then counts them, and later inserts wait for
//! the change.

use vendgate_proto::machine::MachineNo;

use super::{locks, PgStorage};
use crate::storage::backend::{Backend, OwnMachineChanges};
use crate::storage::lifecycle::{MachineChange, MachineUpdate};
use crate::storage::ops::lifecycle::in_flight;
use crate::storage::run::{Run, Transaction};
use crate::storage::StorageError;

#[async_trait::async_trait]
impl OwnMachineChanges for PgStorage {
    async fn change_machine(
        &self,
        m: &MachineNo,
        change: MachineUpdate<'_>,
    ) -> Result<MachineChange, StorageError> {
        let mut tx = self.begin(false).await?;
        if !locks::lock_machine(&mut tx, m).await? {
            return Ok(MachineChange::NotFound);
        }
        let n = in_flight(&mut tx, m).await?;
        if n > 0 {
            return Ok(MachineChange::OrdersInFlight(n));
        }
        // A transfer to an unknown merchant violates machines_merchant_fkey:
        // UnknownMerchant.
        tx.execute(change.stmt(m, false)).await?;
        Transaction::commit(tx).await?;
        Ok(MachineChange::Done)
    }
}
