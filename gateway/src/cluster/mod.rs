//! Cluster mode: several identical gateway nodes behind a TCP load
//! balancer, talking over NATS, sharing state in PostgreSQL
//! (docs/scale-out.md). This module owns everything a node does *because*
//! other nodes exist:
//!
//! - **Ownership.** The node holding a machine's MQTT connection owns it.
//!   Each accepted CONNECT takes a cluster-wide epoch from the database
//!   ([`crate::storage::ClusterStorage::take_ownership`]) and the node
//!   announces it on NATS; a node still holding an older connection of that
//!   machine closes it at once. Stale closes, acks and commands carry old
//!   epochs and change nothing.
//! - **Requests to the owner.** The owner subscribes to one subject per
//!   connection (`{prefix}.own.{machine}.{epoch}`); orders, payments,
//!   commands and pings for a machine held elsewhere are NATS requests on
//!   it. "No responders" right after a move is retried briefly. A request
//!   whose answer never comes is settled from the database like a missing
//!   ack: never by sending the dispense again.
//! - **The cluster view** (`crate::fleet::view`): who is online on which node, from the
//!   nodes' presence notes and a periodic database re-read.
//! - **Liveness.** Nodes heartbeat into the database and on NATS; a node
//!   silent for `node_dead_after` is reaped by another, which writes its
//!   machines offline (with their webhooks). A node that finds itself
//!   reaped (it was frozen) closes its connections and registers again.
//! - **Uplink copies** to the other nodes' hubs, for service clients.
//!
//! Layout: [`client`] (the [`Cluster`] link this node asks with, built
//! before the order service), [`server`] (the [`OwnerServer`] answering
//! other nodes for the machines held here, built after it, with it),
//! [`liveness`], [`copies`] (the hub's [`UplinkCopier`] and its queue),
//! [`epochs`] (built before the hub), [`wire`]. Which requests are
//! forwarded is decided by `crate::front`.

pub mod client;
pub mod copies;
pub mod epochs;
pub mod liveness;
pub mod server;
pub mod wire;

use std::sync::atomic::AtomicU64;

pub use client::{Cluster, ClusterParts, OwnerAnswer};
pub use copies::{uplink_copies, UplinkCopier, UplinkCopies};
pub use epochs::OwnershipEpochs;
pub use server::OwnerServer;

/// Counters of cluster traffic (exported by the metrics module).
#[derive(Debug, Default)]
pub struct ClusterStats {
    pub forwarded: AtomicU64,
    pub forward_lost: AtomicU64,
    pub no_responder_retries: AtomicU64,
    pub served: AtomicU64,
    pub takeovers_closed: AtomicU64,
    pub fenced: AtomicU64,
    pub machines_reaped: AtomicU64,
    pub uplinks_out: AtomicU64,
    pub uplinks_in: AtomicU64,
    pub uplinks_dropped: AtomicU64,
}

/// `[cluster] node_id`, or the host name.
pub fn node_id(configured: &str) -> String {
    if !configured.is_empty() {
        return configured.to_string();
    }
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "vendgate".into())
}
