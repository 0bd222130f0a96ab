//! The owner's side: this node answers other nodes' requests for the
//! machines connected to it, by calling its own order service and
//! commands. Built after the order service ([`OwnerServer::new`]), it
//! follows this node's connections: each one gets its owner subscription
//! (`{prefix}.own.{machine}.{epoch}`), is announced to the other nodes, and
//! a machine arriving from another node has its reservations rebuilt.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use chrono::Utc;
use dashmap::DashMap;
use futures::StreamExt;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::warn;
use vendgate_proto::machine::MachineNo;
use vendgate_proto::topic::Command;

use super::wire::{self, OwnerReply, OwnerRequest, Released};
use super::Cluster;
use crate::fleet::presence::PresenceEvent;
use crate::fleet::view::PresenceNote;
use crate::link::commands::CommandBus;
use crate::orders::{Admission, OrderError, OrderService, PlaceRequest};

/// Answers requests for the machines connected to this node.
pub struct OwnerServer {
    cluster: Arc<Cluster>,
    orders: Arc<OrderService>,
    /// Owner subscriptions of the connections held here: (epoch, stop).
    serving: DashMap<MachineNo, (u64, CancellationToken)>,
    me: Weak<OwnerServer>,
}

impl OwnerServer {
    pub fn new(cluster: Arc<Cluster>, orders: Arc<OrderService>) -> Arc<Self> {
        Arc::new_cyclic(|me| Self {
            cluster,
            orders,
            serving: DashMap::new(),
            me: me.clone(),
        })
    }

    /// Start following this node's connections and the other nodes'
    /// released reservations; the tasks end at shutdown.
    pub fn spawn(self: &Arc<Self>) -> Vec<JoinHandle<()>> {
        vec![
            tokio::spawn(self.clone().local_presence()),
            tokio::spawn(self.clone().released_in()),
        ]
    }

    /// Changes of this node's connections: announce them, serve requests
    /// for the machines held here, rebuild an arriving machine's stock.
    async fn local_presence(self: Arc<Self>) {
        let mut rx = self.cluster.presence.subscribe();
        loop {
            let ev = tokio::select! {
                _ = self.cluster.shutdown.cancelled() => return,
                ev = rx.recv() => ev,
            };
            match ev {
                Ok(ev) => self.local_change(ev).await,
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    warn!(missed = n, "cluster presence lagged; resynchronising");
                    for p in self.cluster.presence.snapshot() {
                        let serving = self.serving.get(&p.machine_no).map(|s| s.0);
                        if p.online && serving != Some(p.epoch) {
                            self.local_change(PresenceEvent {
                                machine_no: p.machine_no,
                                online: true,
                                epoch: p.epoch,
                                at: Utc::now(),
                                reason: None,
                                took_over: false,
                            })
                            .await;
                        } else if !p.online && serving.is_some() {
                            self.local_change(PresenceEvent {
                                machine_no: p.machine_no,
                                online: false,
                                epoch: p.epoch,
                                at: Utc::now(),
                                reason: p.last_offline_reason,
                                took_over: false,
                            })
                            .await;
                        }
                    }
                }
                Err(_) => return,
            }
        }
    }

    async fn local_change(&self, ev: PresenceEvent) {
        let c = &self.cluster;
        let note = PresenceNote {
            machine_no: ev.machine_no,
            online: ev.online,
            epoch: ev.epoch,
            node: c.node.clone(),
            at: ev.at,
        };
        let m = ev.machine_no;
        // Arriving from another node (or first seen): its reservations were
        // that node's memory. A reconnect to this same node keeps ours,
        // which include jobs queued here and not yet stored.
        let arriving = c.local_connection(&note);
        if ev.online {
            self.serve(m, ev.epoch);
            if arriving {
                let orders = self.orders.clone();
                tokio::spawn(async move { orders.rebuild_reservations(m).await });
            }
        } else if let Some((_, (_, stop))) = self
            .serving
            .remove_if(&m, |_, (epoch, _)| *epoch == ev.epoch)
        {
            stop.cancel();
        }
        c.publish_json(c.subjects.presence(), &note).await;
    }

    /// Subscribe to the owner subject of this connection of `m` and answer
    /// its requests until the connection ends.
    fn serve(&self, m: MachineNo, epoch: u64) {
        let Some(me) = self.me.upgrade() else { return };
        let stop = CancellationToken::new();
        if let Some(old) = self.serving.insert(m, (epoch, stop.clone())) {
            old.1.cancel();
        }
        tokio::spawn(async move {
            let subject = me.cluster.subjects.owner(&m, epoch);
            let mut sub = match me.cluster.nats.subscribe(subject).await {
                Ok(s) => s,
                Err(e) => {
                    warn!(machine_no = %m, error = %e, "cannot subscribe to the machine's owner subject");
                    return;
                }
            };
            loop {
                let msg = tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = me.cluster.shutdown.cancelled() => break,
                    msg = sub.next() => msg,
                };
                let Some(msg) = msg else { break };
                let me = me.clone();
                tokio::spawn(async move { me.answer(m, epoch, msg).await });
            }
            // Dropping the subscriber unsubscribes.
        });
    }

    /// Answer one request for the connection (m, epoch) held here.
    async fn answer(&self, m: MachineNo, epoch: u64, msg: async_nats::Message) {
        let Some(reply) = msg.reply.clone() else {
            return;
        };
        self.cluster.stats.served.fetch_add(1, Ordering::Relaxed);
        let answer = if self.cluster.presence.online_epoch(&m) != Some(epoch) {
            OwnerReply::Moved
        } else {
            match serde_json::from_slice::<OwnerRequest>(&msg.payload) {
                Ok(req) => self.execute(m, req).await,
                Err(e) => {
                    warn!(machine_no = %m, error = %e, "undecodable owner request");
                    OwnerReply::failed(&OrderError::Internal)
                }
            }
        };
        self.cluster.publish_json(reply.to_string(), &answer).await;
    }

    async fn execute(&self, m: MachineNo, req: OwnerRequest) -> OwnerReply {
        let failed = |error| OwnerReply::failed(&error);
        // The owner answers `owner_answer_slack` before the requester stops
        // waiting, so that "no answer" can only mean the owner died or the
        // answer was lost, never "still deciding".
        let by = |wait_ms: u64| {
            Instant::now()
                + Duration::from_millis(wait_ms)
                    .saturating_sub(self.cluster.settings.owner_answer_slack)
        };
        match req {
            OwnerRequest::Place(p) => {
                let req = PlaceRequest {
                    merchant: p.merchant,
                    machine_no: m,
                    lines: p.lines,
                    out_trade_no: p.out_trade_no,
                    pay_later: p.pay_later,
                    answer_by: by(p.wait_ms),
                };
                // Placed here or not at all: never forwarded again.
                let placed = match self.orders.admit(req).await {
                    Admission::Answered(answer) => answer,
                    Admission::Admitted(placing) => placing.place_here_as(p.order_id).await,
                };
                match placed {
                    Ok(order_id) => OwnerReply::Placed { order_id },
                    Err(e) => failed(e),
                }
            }
            OwnerRequest::Pay {
                merchant,
                order_id,
                wait_ms,
            } => {
                let paid = match self.orders.unpaid(&merchant, order_id).await {
                    Ok(unpaid) => self.orders.pay_here(unpaid, by(wait_ms)).await,
                    Err(e) => Err(e),
                };
                match paid {
                    Ok(order_id) => OwnerReply::Placed { order_id },
                    Err(e) => failed(e),
                }
            }
            OwnerRequest::Command {
                suffix,
                payload,
                confirm_ms,
            } => {
                let Some(command) = Command::ALL.into_iter().find(|c| c.suffix() == suffix) else {
                    return OwnerReply::NotDelivered {
                        error: "unknown command".into(),
                    };
                };
                let Ok(payload) = base64::engine::general_purpose::STANDARD.decode(payload) else {
                    return OwnerReply::NotDelivered {
                        error: "bad payload".into(),
                    };
                };
                let payload = Bytes::from(payload);
                let sent = match confirm_ms {
                    Some(ms) => {
                        self.cluster
                            .local
                            .send_confirmed(&m, command, payload, Duration::from_millis(ms))
                            .await
                    }
                    None => self.cluster.local.send(&m, command, payload).await,
                };
                match sent {
                    Ok(()) => OwnerReply::Delivered,
                    Err(e) => OwnerReply::NotDelivered {
                        error: wire::delivery_name(e).into(),
                    },
                }
            }
            OwnerRequest::Stock => OwnerReply::Stock {
                items: self.orders.inventory.view(&m),
            },
            OwnerRequest::Ping { timeout_ms } => {
                match self
                    .cluster
                    .local
                    .ping(&m, Duration::from_millis(timeout_ms))
                    .await
                {
                    Ok(rtt) => OwnerReply::Pong {
                        rtt_us: u64::try_from(rtt.as_micros()).unwrap_or(u64::MAX),
                    },
                    Err(e) => OwnerReply::NotDelivered {
                        error: wire::delivery_name(e).into(),
                    },
                }
            }
        }
    }

    async fn released_in(self: Arc<Self>) {
        let Some(mut sub) = self
            .cluster
            .subscribe(self.cluster.subjects.released())
            .await
        else {
            return;
        };
        while let Some(msg) = self.cluster.next_message(&mut sub).await {
            let Ok(r) = serde_json::from_slice::<Released>(&msg.payload) else {
                continue;
            };
            if self.cluster.presence.is_online(&r.machine_no) {
                self.orders.inventory.release(r.machine_no, &r.lines);
            }
        }
    }
}
