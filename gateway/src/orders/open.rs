//! The orders in flight on this node (`dispatching`, `dispensing`) as this
//! node last wrote them, so a machine's ack or result is applied without
//! reading the order back first.
//!
//! Why this is safe: an entry is only a guess at the stored row. It is used
//! only when its status is the one the machine's message expects
//! (`dispatching` for an ack, `dispensing` for a result), and the write that
//! follows is the usual compare-and-set on the stored status. While an
//! order is in flight every change of its row changes its status (payment,
//! acceptance, result, give-up), so a stored row with the cached status is
//! the cached row; any other outcome than a successful change (the CAS
//! missed, a repeat) is handled from a fresh read, as without the cache.
//! Another node's change (cluster mode) therefore costs one missed CAS, not
//! a wrong write.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use chrono::Utc;
use dashmap::DashMap;

use crate::domain::order::Status;
use crate::storage::StoredOrder;

/// Most orders kept: the in-flight orders of every machine of a large
/// node fit (one or a few per machine); beyond it orders are simply read.
pub(super) const MAX_OPEN_ORDERS: usize = 65_536;
/// An entry not rewritten for this long is dropped when the map is full:
/// its order was settled by another node (or never will be here). Longer
/// than any in-flight phase (accept window, go and dispense timeouts).
const STALE_AFTER: Duration = Duration::from_secs(600);
/// At most one pruning pass per this interval while the map is full.
const PRUNE_EVERY: Duration = Duration::from_secs(1);

/// The cache; see the module doc.
#[derive(Debug)]
pub(super) struct OpenOrders {
    rows: DashMap<u64, StoredOrder>,
    last_prune: Mutex<Option<Instant>>,
}

impl Default for OpenOrders {
    fn default() -> Self {
        Self {
            rows: DashMap::new(),
            last_prune: Mutex::new(None),
        }
    }
}

impl OpenOrders {
    /// The order as last written here, if it is cached with status
    /// `expect`.
    pub(super) fn get(&self, order_id: u64, expect: Status) -> Option<StoredOrder> {
        self.rows
            .get(&order_id)
            .filter(|o| o.status == expect)
            .map(|o| o.clone())
    }

    /// This node just wrote `o` (inserted it, or changed it with a
    /// successful compare-and-set): keep it while it is in flight.
    pub(super) fn wrote(&self, o: StoredOrder) {
        if !matches!(o.status, Status::Dispatching | Status::Dispensing) {
            self.rows.remove(&o.order_id);
            return;
        }
        if self.rows.len() >= MAX_OPEN_ORDERS
            && !self.rows.contains_key(&o.order_id)
            && !self.prune()
        {
            return;
        }
        self.rows.insert(o.order_id, o);
    }

    /// The stored order is not what this node last wrote (a missed CAS):
    /// read it next time.
    pub(super) fn forget(&self, order_id: u64) {
        self.rows.remove(&order_id);
    }

    /// Drop stale entries, at most once per [`PRUNE_EVERY`]; true when
    /// there is room afterwards.
    fn prune(&self) -> bool {
        {
            let Ok(mut last) = self.last_prune.lock() else {
                return false;
            };
            if last.is_some_and(|t| t.elapsed() < PRUNE_EVERY) {
                return false;
            }
            *last = Some(Instant::now());
        }
        let cutoff = chrono::Duration::from_std(STALE_AFTER)
            .map(|d| Utc::now() - d)
            .unwrap_or_else(|_| Utc::now());
        self.rows.retain(|_, o| o.updated_at > cutoff);
        self.rows.len() < MAX_OPEN_ORDERS
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.rows.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::NewOrder;
    use vendgate_proto::machine::MachineNo;

    fn order(id: u64, status: Status, age: chrono::Duration) -> StoredOrder {
        let mut o = StoredOrder::from_new(NewOrder {
            order_id: id,
            merchant_appid: "m".into(),
            machine_no: MachineNo::parse("10000001").expect("a valid machine number"),
            out_trade_no: None,
            request_fingerprint: None,
            pay_later: false,
            status,
            lines: Vec::new(),
            amount: 0,
            created_at: Utc::now(),
            pay_deadline: None,
            accept_by: None,
        });
        o.updated_at = Utc::now() - age;
        o
    }

    #[test]
    fn only_in_flight_orders_are_kept_and_only_with_the_expected_status() {
        let c = OpenOrders::default();
        c.wrote(order(1, Status::Dispatching, chrono::Duration::zero()));
        assert!(c.get(1, Status::Dispatching).is_some());
        assert!(c.get(1, Status::Dispensing).is_none());
        c.wrote(order(1, Status::Dispensing, chrono::Duration::zero()));
        assert!(c.get(1, Status::Dispensing).is_some());
        // Settled: gone.
        c.wrote(order(1, Status::Completed, chrono::Duration::zero()));
        assert!(c.get(1, Status::Dispensing).is_none());
        assert_eq!(c.len(), 0);
        c.wrote(order(2, Status::AwaitingPayment, chrono::Duration::zero()));
        assert_eq!(c.len(), 0);
        c.wrote(order(3, Status::Dispatching, chrono::Duration::zero()));
        c.forget(3);
        assert!(c.get(3, Status::Dispatching).is_none());
    }

    #[test]
    fn a_full_cache_drops_stale_entries_and_otherwise_stops_growing() {
        let c = OpenOrders::default();
        let stale = chrono::Duration::seconds(STALE_AFTER.as_secs() as i64 + 60);
        for id in 0..MAX_OPEN_ORDERS as u64 {
            let age = if id % 2 == 0 {
                stale
            } else {
                chrono::Duration::zero()
            };
            c.wrote(order(id, Status::Dispensing, age));
        }
        assert_eq!(c.len(), MAX_OPEN_ORDERS);
        // Full: the stale half goes, the new one is kept.
        c.wrote(order(
            u64::MAX,
            Status::Dispatching,
            chrono::Duration::zero(),
        ));
        assert_eq!(c.len(), MAX_OPEN_ORDERS / 2 + 1);
        // Full of fresh entries, and pruned less than a second ago: not kept.
        for id in 0..(MAX_OPEN_ORDERS as u64 / 2) {
            c.wrote(order(id * 2, Status::Dispensing, chrono::Duration::zero()));
        }
        c.wrote(order(
            u64::MAX - 1,
            Status::Dispatching,
            chrono::Duration::zero(),
        ));
        assert!(c.get(u64::MAX - 1, Status::Dispatching).is_none());
        assert!(c.len() <= MAX_OPEN_ORDERS);
    }
}
