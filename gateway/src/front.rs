//! The front of placing and paying: the one place that decides whether a
//! merchant's order or payment runs on this node's order service or is
//! forwarded to the node holding the machine's connection (cluster mode).
//! Reads, cancels and refunds touch only storage and stay on
//! [`OrderService`].
//!
//! Waits: a forwarded request waits for the owner until its `answer_by`
//! (the owner answers `owner_answer_slack` sooner); with no answer, it is
//! settled from storage ([`OrderService::settle_unanswered`]) within the
//! same `answer_by`. A merchant that goes away meanwhile has the order given
//! up in the background, bounded by `owner_answer_slack`.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::time::Instant;
use vendgate_proto::machine::MachineNo;

use crate::cluster::{Cluster, OwnerAnswer};
use crate::domain::order::GiveUp;
use crate::orders::{Admission, OrderError, OrderService, PlaceRequest};

/// Places and pays orders wherever their machine is connected.
pub struct Front {
    orders: Arc<OrderService>,
    /// Cluster mode: the link to the other nodes.
    cluster: Option<Arc<Cluster>>,
}

impl Front {
    pub fn new(orders: Arc<OrderService>, cluster: Option<Arc<Cluster>>) -> Arc<Self> {
        Arc::new(Self { orders, cluster })
    }

    /// Place an order; answered within the request's `answer_by`. The
    /// checks that must come first (the out_trade_no lock and its repeats,
    /// the owner) run here; the lock is held until the answer, wherever the
    /// order is placed.
    pub async fn place(&self, req: PlaceRequest) -> Result<u64, OrderError> {
        let placing = match self.orders.admit(req).await {
            Admission::Answered(answer) => return answer,
            Admission::Admitted(placing) => placing,
        };
        let Some(cluster) = self.held_elsewhere(&placing.request().machine_no) else {
            return placing.place_here().await;
        };
        let order_id = placing.new_order_id();
        let req = placing.request().clone();
        // The caller going away before the answer gives the order up.
        let mut gone = CallerGone {
            orders: self.orders.clone(),
            cluster: cluster.clone(),
            order_id,
            req: Some(req.clone()),
        };
        let answer = cluster.place_on_owner(&req, order_id).await;
        gone.req = None;
        match answer {
            OwnerAnswer::Answered(answer) => answer,
            // It moved here meanwhile: the local path.
            OwnerAnswer::HeldHere => placing.place_here().await,
            OwnerAnswer::NotHeld => Err(OrderError::Offline),
            OwnerAnswer::NoAnswer => {
                cluster.stats.forward_lost.fetch_add(1, Ordering::Relaxed);
                self.orders
                    .settle_unanswered(order_id, Some(&req), GiveUp::OwnerLost, req.answer_by)
                    .await
            }
        }
    }

    /// `POST /orders/{id}/pay`: mark a `pay_later` order paid and dispatch
    /// it under the same online, accept and deadline rules as placing.
    pub async fn pay(
        &self,
        merchant: &str,
        order_id: u64,
        answer_by: Instant,
    ) -> Result<u64, OrderError> {
        let unpaid = self.orders.unpaid(merchant, order_id).await?;
        let m = unpaid.machine_no();
        let Some(cluster) = self.held_elsewhere(&m) else {
            return self.orders.pay_here(unpaid, answer_by).await;
        };
        match cluster
            .pay_on_owner(&m, merchant, order_id, answer_by)
            .await
        {
            OwnerAnswer::Answered(answer) => answer,
            OwnerAnswer::HeldHere => {
                let unpaid = self.orders.unpaid(merchant, order_id).await?;
                self.orders.pay_here(unpaid, answer_by).await
            }
            OwnerAnswer::NotHeld => Err(OrderError::Offline),
            OwnerAnswer::NoAnswer => match self.orders.unpaid(merchant, order_id).await {
                // The owner never paid it: it stays unpaid.
                Ok(_) => Err(OrderError::Offline),
                Err(_) => {
                    cluster.stats.forward_lost.fetch_add(1, Ordering::Relaxed);
                    self.orders
                        .settle_unanswered(order_id, None, GiveUp::OwnerLost, answer_by)
                        .await
                }
            },
        }
    }

    /// The cluster, when machine `m` is connected to another node and not
    /// to this one.
    fn held_elsewhere(&self, m: &MachineNo) -> Option<&Arc<Cluster>> {
        if self.orders.connected_here(m) {
            return None;
        }
        self.cluster.as_ref().filter(|c| c.held_elsewhere(m))
    }
}

/// The caller-gone rule for a forwarded order: if the request is dropped
/// (its merchant's connection closed) while the owner decides, the order is
/// given up in storage — before its acceptance is recorded, the owner's
/// acceptance compare-and-set then fails and it sends a cancel instead of
/// `go`.
struct CallerGone {
    orders: Arc<OrderService>,
    cluster: Arc<Cluster>,
    order_id: u64,
    req: Option<PlaceRequest>,
}

impl Drop for CallerGone {
    fn drop(&mut self) {
        let Some(req) = self.req.take() else {
            return;
        };
        let (orders, order_id) = (self.orders.clone(), self.order_id);
        self.cluster
            .stats
            .forward_lost
            .fetch_add(1, Ordering::Relaxed);
        // Bounded like the request it replaces.
        let answer_by = Instant::now() + self.cluster.answer_slack();
        tokio::spawn(async move {
            let _ = orders
                .settle_unanswered(order_id, Some(&req), GiveUp::CallerGone, answer_by)
                .await;
        });
    }
}
