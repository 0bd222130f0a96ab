//! What the gateway does with each machine uplink after the edge's ACL:
//! `state` feeds presence (firmware, an explicit `{"online":false}`), `pong`
//! completes pings, and `inventory`/`ack`/`result` go to the order side.
//! Malformed payloads are counted and dropped; they never affect another
//! machine.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use tracing::debug;
use vendgate_proto::machine::MachineNo;
use vendgate_proto::msg::{self, PongMsg, StateMsg};
use vendgate_proto::topic::Uplink;

use crate::edge::UplinkHandler;
use crate::fleet::presence::{OfflineReason, PresenceRegistry};
use crate::link::commands::PingTable;

/// Counters of uplink payload handling.
#[derive(Debug, Default)]
pub struct UplinkStats {
    pub malformed: AtomicU64,
    pub unknown_pongs: AtomicU64,
}

/// The gateway's uplink dispatcher.
pub struct DeviceUplinks {
    presence: Arc<PresenceRegistry>,
    pings: Arc<PingTable>,
    /// The order side's intake (`orders::intake`), built before the hub.
    orders: Arc<dyn UplinkHandler>,
    pub stats: UplinkStats,
}

impl DeviceUplinks {
    pub fn new(
        presence: Arc<PresenceRegistry>,
        pings: Arc<PingTable>,
        orders: Arc<dyn UplinkHandler>,
    ) -> Self {
        Self {
            presence,
            pings,
            orders,
            stats: UplinkStats::default(),
        }
    }

    fn malformed(&self, machine_no: MachineNo, kind: Uplink) {
        self.stats.malformed.fetch_add(1, Ordering::Relaxed);
        debug!(%machine_no, kind = kind.suffix(), "malformed uplink payload dropped");
    }
}

impl UplinkHandler for DeviceUplinks {
    fn on_uplink(&self, machine_no: MachineNo, epoch: u64, kind: Uplink, payload: &Bytes) {
        match kind {
            Uplink::State => match msg::decode::<StateMsg>(payload) {
                Ok(s) if s.online => self.presence.set_firmware(&machine_no, s.firmware),
                Ok(_) => {
                    // The machine says it is going offline (PROTOCOL.md, gateway
                    // rule 1). Only this connection's epoch can do that.
                    self.presence
                        .disconnected(machine_no, epoch, OfflineReason::StateOffline);
                }
                Err(_) => self.malformed(machine_no, kind),
            },
            Uplink::Pong => match msg::decode::<PongMsg>(payload) {
                Ok(p) => {
                    if !self.pings.pong(machine_no, p.id) {
                        self.stats.unknown_pongs.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Err(_) => self.malformed(machine_no, kind),
            },
            Uplink::Inventory | Uplink::Ack | Uplink::Result => {
                self.orders.on_uplink(machine_no, epoch, kind, payload)
            }
        }
    }
}
