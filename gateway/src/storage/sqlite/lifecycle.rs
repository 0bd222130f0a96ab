//! The guarded machine changes as SQLite makes them: under `BEGIN
//! IMMEDIATE` the transaction is the only writer, so one UPDATE that checks
//! for orders in flight itself sees the same orders as the check of why it
//! did not apply.

use vendgate_proto::machine::MachineNo;

use super::SqliteStorage;
use crate::storage::backend::OwnMachineChanges;
use crate::storage::lifecycle::{MachineChange, MachineUpdate};
use crate::storage::ops::lifecycle::in_flight;
use crate::storage::run::{Run, Stmt, Transaction};
use crate::storage::sql;
use crate::storage::StorageError;

#[async_trait::async_trait]
impl OwnMachineChanges for SqliteStorage {
    async fn change_machine(
        &self,
        m: &MachineNo,
        change: MachineUpdate<'_>,
    ) -> Result<MachineChange, StorageError> {
        let mut tx = self.begin_immediate().await?;
        if let MachineUpdate::Transfer { to } = change {
            let known: Option<(i32,)> = tx
                .fetch_optional(Stmt::new(sql::MERCHANT_EXISTS).bind(to))
                .await?;
            if known.is_none() {
                return Err(StorageError::UnknownMerchant);
            }
        }
        let result = if tx.execute(change.stmt(m, true)).await? == 1 {
            MachineChange::Done
        } else {
            // Why not, read in the same transaction.
            let present: Option<(i32,)> = tx
                .fetch_optional(Stmt::new(sql::MACHINE_PRESENT.sqlite).bind(m.as_str()))
                .await?;
            match present {
                None => MachineChange::NotFound,
                Some(_) => MachineChange::OrdersInFlight(in_flight(&mut tx, m).await?),
            }
        };
        Transaction::commit(tx).await?;
        Ok(result)
    }
}
