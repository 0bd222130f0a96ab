//! Order outcomes as the order service applies them: a counter per final
//! status and a short ring of recent failures for the dashboard. The order
//! service calls [`OrderObserver::transition`] after each committed status
//! change (see `OrderStats::observer`); nothing here touches storage.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use chrono::{DateTime, Utc};
use serde::Serialize;
use vendgate_proto::machine::MachineNo;

use crate::domain::order::Status;

/// Failures kept for the dashboard's "recent failed orders" list.
const RECENT: usize = 50;
/// Longest machine-supplied error text kept (it is shown to operators, and a
/// machine must not be able to fill memory through it).
const MAX_ERROR: usize = 80;

/// Every `outcome` label, in index order: the statuses an order ends in
/// (`unknown` can still become a result later; both are counted then).
pub const OUTCOMES: [Status; 7] = [
    Status::Completed,
    Status::PartiallyDispensed,
    Status::Failed,
    Status::Rejected,
    Status::Expired,
    Status::Unknown,
    Status::Cancelled,
];

/// An order that ended badly, for operators.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct RecentOrder {
    pub order_id: u64,
    pub machine_no: String,
    pub status: &'static str,
    pub error: Option<String>,
    pub at: DateTime<Utc>,
}

/// See the module docs.
#[derive(Debug, Default)]
pub struct OrderObserver {
    outcomes: [AtomicU64; OUTCOMES.len()],
    recent: Mutex<VecDeque<RecentOrder>>,
}

impl OrderObserver {
    /// The order's stored status changed from `from` to `to` (committed).
    pub fn transition(
        &self,
        order_id: u64,
        machine_no: MachineNo,
        from: Status,
        to: Status,
        error: Option<&str>,
    ) {
        if from == to {
            return;
        }
        if let Some(i) = OUTCOMES.iter().position(|s| *s == to) {
            self.outcomes[i].fetch_add(1, Ordering::Relaxed);
        }
        if matches!(
            to,
            Status::Failed | Status::PartiallyDispensed | Status::Rejected | Status::Unknown
        ) {
            let error = error.map(|e| e.chars().take(MAX_ERROR).collect());
            let r = RecentOrder {
                order_id,
                machine_no: machine_no.to_string(),
                status: to.as_str(),
                error,
                at: Utc::now(),
            };
            // Poisoned only if a push panicked; the ring is still usable.
            let mut ring = self.recent.lock().unwrap_or_else(|p| p.into_inner());
            // A late result turns an `unknown` into a settled failure: show the
            // order once, with its latest status.
            ring.retain(|o| o.order_id != order_id);
            if ring.len() >= RECENT {
                ring.pop_back();
            }
            ring.push_front(r);
        }
    }

    /// Orders that reached `OUTCOMES[i]`.
    pub fn outcome(&self, i: usize) -> u64 {
        self.outcomes
            .get(i)
            .map_or(0, |a| a.load(Ordering::Relaxed))
    }

    /// Recent failures, newest first.
    pub fn recent(&self) -> Vec<RecentOrder> {
        let ring = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        ring.iter().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_and_recent_failures() {
        let o = OrderObserver::default();
        let m: MachineNo = "12345678".parse().unwrap();
        o.transition(1, m, Status::Dispatching, Status::Dispensing, None);
        o.transition(1, m, Status::Dispensing, Status::Completed, None);
        o.transition(2, m, Status::Dispensing, Status::Unknown, None);
        o.transition(
            2,
            m,
            Status::Unknown,
            Status::Failed,
            Some(&"x".repeat(500)),
        );
        o.transition(3, m, Status::Dispatching, Status::Dispatching, None);
        assert_eq!(o.outcome(0), 1);
        assert_eq!(o.outcome(2), 1);
        assert_eq!(o.outcome(5), 1);
        let r = o.recent();
        assert_eq!(r.len(), 1, "{r:?}");
        assert_eq!(r[0].status, "failed");
        assert_eq!(r[0].error.as_ref().map(|e| e.len()), Some(MAX_ERROR));
        for id in 10..200 {
            o.transition(id, m, Status::Dispatching, Status::Rejected, None);
        }
        assert_eq!(o.recent().len(), RECENT);
        assert_eq!(o.recent()[0].order_id, 199);
    }
}
