//! Who owns each machine, as the order path sees it: a cache of storage
//! trusted for [`OWNER_CACHE_TTL`].

use std::time::Duration;

use vendgate_proto::machine::MachineNo;

use super::OrderService;
use crate::storage::StorageError;

/// How long a cached machine owner is trusted (see `OrderService::owners`):
/// the bound on how long a transfer, disable or removal by the CLI takes to
/// reach the order path.
pub const OWNER_CACHE_TTL: Duration = Duration::from_secs(2);

/// A cached owner: the merchant, whether the machine is active (neither
/// disabled nor removed), and when this was read.
#[derive(Debug, Clone)]
pub(super) struct Owner {
    merchant: String,
    active: bool,
    read: std::time::Instant,
}

impl Owner {
    /// The merchant that may order from the machine, if still fresh.
    fn fresh(&self) -> Option<Option<&str>> {
        (self.read.elapsed() < OWNER_CACHE_TTL)
            .then(|| self.active.then_some(self.merchant.as_str()))
    }
}

impl OrderService {
    /// Whether `merchant` owns machine `m` and it is active (cached: see
    /// `owners`). A disabled or removed machine is nobody's.
    pub async fn owned_by(&self, m: &MachineNo, merchant: &str) -> Result<bool, StorageError> {
        if let Some(owner) = self
            .owners
            .get(m)
            .and_then(|o| o.fresh().map(|o| o == Some(merchant)))
        {
            return Ok(owner);
        }
        self.read_owner(m, merchant).await
    }

    /// Read `m`'s owner from storage into the cache; whether it is
    /// `merchant`'s and active.
    async fn read_owner(&self, m: &MachineNo, merchant: &str) -> Result<bool, StorageError> {
        let Some(machine) = self.store.machine(m).await? else {
            self.owners.remove(m);
            return Ok(false);
        };
        let active = machine.is_active();
        let owned = active && machine.merchant_appid == merchant;
        self.owners.insert(
            *m,
            Owner {
                merchant: machine.merchant_appid,
                active,
                read: std::time::Instant::now(),
            },
        );
        Ok(owned)
    }

    /// [`Self::owned_by`] for placing an order: a machine the cache does not
    /// show as the merchant's is read from storage whether it is cached as
    /// another merchant's, disabled, or unknown, so all answers take the same
    /// time (a faster "not found" for foreign machines would tell which
    /// numbers are provisioned).
    pub(super) async fn owned_for_order(
        &self,
        m: &MachineNo,
        merchant: &str,
    ) -> Result<bool, StorageError> {
        if self
            .owners
            .get(m)
            .is_some_and(|o| o.fresh() == Some(Some(merchant)))
        {
            return Ok(true);
        }
        self.read_owner(m, merchant).await
    }
}
