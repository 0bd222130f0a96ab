//! The command-delivery seam: how the gateway gets a command to a machine and
//! a ping answered. Today the machine's connection is local ([`LocalCommands`]
//! publishes through the hub); in cluster mode a NATS request to the owning
//! node implements the same trait, so callers do not change.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use dashmap::DashMap;
use tokio::sync::oneshot;
use tokio::time::Instant;
use vendgate_proto::machine::MachineNo;
use vendgate_proto::msg::{self, PingCmd};
use vendgate_proto::topic::Command;

use crate::edge::router::MachineDelivery;
use crate::edge::Hub;
use crate::fleet::presence::PresenceRegistry;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DeliveryError {
    #[error("machine is not connected")]
    NotConnected,
    #[error("machine has not subscribed to its command topics")]
    NotSubscribed,
    #[error("machine connection cannot keep up")]
    Backpressure,
    #[error("no answer in time")]
    Timeout,
}

#[async_trait]
pub trait CommandBus: Send + Sync + 'static {
    /// Queue `payload` on the machine's `cmd/{command}` topic at QoS 1.
    async fn send(
        &self,
        machine_no: &MachineNo,
        command: Command,
        payload: Bytes,
    ) -> Result<(), DeliveryError>;
    /// [`CommandBus::send`], then wait up to `within` for the machine's
    /// acknowledgement of it (its PUBACK): Ok only once the machine has it.
    async fn send_confirmed(
        &self,
        machine_no: &MachineNo,
        command: Command,
        payload: Bytes,
        within: Duration,
    ) -> Result<(), DeliveryError>;
    /// `cmd/ping` → `pong`: the machine's application-level round trip.
    async fn ping(
        &self,
        machine_no: &MachineNo,
        timeout: Duration,
    ) -> Result<Duration, DeliveryError>;
}

/// Outstanding pings by (machine, id); the pong handler completes them.
#[derive(Debug, Default)]
pub struct PingTable {
    next_id: AtomicU64,
    pending: DashMap<(MachineNo, u64), oneshot::Sender<Instant>>,
}

impl PingTable {
    /// A `pong` arrived. Unknown ids (late, duplicated, forged) are ignored.
    pub fn pong(&self, machine_no: MachineNo, id: u64) -> bool {
        match self.pending.remove(&(machine_no, id)) {
            Some((_, tx)) => tx.send(Instant::now()).is_ok(),
            None => false,
        }
    }
}

/// Commands to machines connected to this process.
pub struct LocalCommands {
    hub: Arc<Hub>,
    presence: Arc<PresenceRegistry>,
    pings: Arc<PingTable>,
}

impl LocalCommands {
    pub fn new(hub: Arc<Hub>, presence: Arc<PresenceRegistry>, pings: Arc<PingTable>) -> Self {
        Self {
            hub,
            presence,
            pings,
        }
    }
}

fn delivery(d: MachineDelivery) -> Result<(), DeliveryError> {
    match d {
        MachineDelivery::Queued => Ok(()),
        MachineDelivery::NotSubscribed => Err(DeliveryError::NotSubscribed),
        MachineDelivery::Backpressure => Err(DeliveryError::Backpressure),
        MachineDelivery::NotConnected | MachineDelivery::NotAMachineTopic => {
            Err(DeliveryError::NotConnected)
        }
    }
}

#[async_trait]
impl CommandBus for LocalCommands {
    async fn send(
        &self,
        machine_no: &MachineNo,
        command: Command,
        payload: Bytes,
    ) -> Result<(), DeliveryError> {
        delivery(self.hub.send_command(machine_no, command, payload))
    }

    async fn send_confirmed(
        &self,
        machine_no: &MachineNo,
        command: Command,
        payload: Bytes,
        within: Duration,
    ) -> Result<(), DeliveryError> {
        let (receipt, acked) = crate::edge::router::Receipt::new();
        delivery(
            self.hub
                .send_command_with_receipt(machine_no, command, payload, receipt),
        )?;
        match tokio::time::timeout(within, acked).await {
            Ok(Ok(())) => Ok(()),
            _ => Err(DeliveryError::Timeout),
        }
    }

    async fn ping(
        &self,
        machine_no: &MachineNo,
        timeout: Duration,
    ) -> Result<Duration, DeliveryError> {
        let id = self.pings.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let (tx, rx) = oneshot::channel();
        self.pings.pending.insert((*machine_no, id), tx);
        let started = Instant::now();
        let sent = delivery(self.hub.send_command(
            machine_no,
            Command::Ping,
            Bytes::from(msg::encode(&PingCmd { id })),
        ));
        if let Err(e) = sent {
            self.pings.pending.remove(&(*machine_no, id));
            return Err(e);
        }
        let answer = tokio::time::timeout(timeout, rx).await;
        self.pings.pending.remove(&(*machine_no, id));
        match answer {
            Ok(Ok(at)) => {
                let rtt = at.saturating_duration_since(started);
                self.presence.set_rtt(machine_no, rtt);
                Ok(rtt)
            }
            _ => Err(DeliveryError::Timeout),
        }
    }
}
