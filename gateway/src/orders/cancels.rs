//! Commands a machine is owed outside an order's request: the cancel of an
//! order given up after its command may have left (sent at once, and again
//! when the machine reconnects if unacknowledged), and the `go` of an
//! accepted order with no result yet, sent again on a reconnect.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde_json::json;
use tracing::{debug, warn};
use vendgate_proto::machine::MachineNo;
use vendgate_proto::msg::{self, CancelCmd, GoCmd};
use vendgate_proto::topic::Command;

use super::{event, OrderService};
use crate::domain::order::Status;

/// How long a cancel waits for the machine's acknowledgement before it is
/// left owed (delivered again on the machine's next connection).
const CANCEL_ACK_WAIT: Duration = Duration::from_secs(2);

impl OrderService {
    /// Send the cancel a give-up owes, now, in the background (waiting for
    /// the machine's acknowledgement must not delay any answer); recorded as
    /// delivered once the machine acknowledged it, else left owed for its
    /// next connection.
    pub(super) fn cancel_now(&self, m: MachineNo, order_id: u64) {
        let Some(me) = self.me.upgrade() else { return };
        tokio::spawn(async move {
            match me.send_cancel(m, order_id).await {
                Ok(()) => {
                    let _ = me.store.cancel_delivered(order_id).await;
                }
                Err(e) => {
                    debug!(machine_no = %m, order_id, error = %e, "cancel not acknowledged; owed")
                }
            }
        });
    }

    /// A cancel to machine `m`; Ok once the machine acknowledged it (within
    /// [`CANCEL_ACK_WAIT`]).
    pub(super) async fn send_cancel(
        &self,
        m: MachineNo,
        order_id: u64,
    ) -> Result<(), crate::link::commands::DeliveryError> {
        let r = self
            .commands
            .send_confirmed(
                &m,
                Command::Cancel,
                Bytes::from(msg::encode(&CancelCmd { order_id })),
                CANCEL_ACK_WAIT,
            )
            .await;
        let _ = self
            .store
            .append_order_event(
                order_id,
                &event("cancel_sent", json!({ "delivered": r.is_ok() })),
            )
            .await;
        r
    }

    /// Deliver what machines are owed as they come online (on this node):
    /// the cancels of orders given up after their command may have left,
    /// and the `go` of accepted orders with no result yet (it may have been
    /// lost with the old connection; a machine that still holds the order
    /// dispenses it, one that does not answers `no_go`, so nothing can be
    /// dispensed twice or late). A machine subscribes right after CONNACK,
    /// so delivery is retried briefly.
    pub fn spawn_owed_delivery(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let me = self.clone();
        let mut rx = self.presence.subscribe();
        tokio::spawn(async move {
            loop {
                let ev = tokio::select! {
                    _ = me.shutdown.cancelled() => return,
                    ev = rx.recv() => ev,
                };
                match ev {
                    Ok(ev) if ev.online => me.clone().deliver_owed(ev.machine_no, ev.epoch),
                    Ok(_) => continue,
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                        // Missed events: try every machine online here.
                        for p in me.presence.snapshot() {
                            if p.online {
                                me.clone().deliver_owed(p.machine_no, p.epoch);
                            }
                        }
                    }
                    Err(_) => return,
                }
            }
        })
    }

    fn deliver_owed(self: Arc<Self>, m: MachineNo, epoch: u64) {
        tokio::spawn(async move {
            let cancels = match self.store.pending_cancels(&m).await {
                Ok(ids) => ids,
                Err(e) => {
                    warn!(machine_no = %m, error = %e, "could not read the cancels owed");
                    return;
                }
            };
            let goes: Vec<u64> = match self.store.open_orders(&m).await {
                Ok(open) => open
                    .into_iter()
                    .filter(|o| o.status == Status::Dispensing && !o.result_applied)
                    .map(|o| o.order_id)
                    .collect(),
                Err(e) => {
                    warn!(machine_no = %m, error = %e, "could not read the orders owed a go");
                    Vec::new()
                }
            };
            let owed = cancels
                .into_iter()
                .map(|id| (Command::Cancel, id))
                .chain(goes.into_iter().map(|id| (Command::Go, id)));
            for (command, id) in owed {
                let payload = Bytes::from(match command {
                    Command::Go => msg::encode(&GoCmd { order_id: id }),
                    _ => msg::encode(&CancelCmd { order_id: id }),
                });
                // 50 × 100 ms: the machine's subscription follows its CONNACK.
                for _ in 0..50 {
                    // This connection only: a later one delivers them itself.
                    if self.presence.online_epoch(&m) != Some(epoch) {
                        return;
                    }
                    if self
                        .commands
                        .send(&m, command, payload.clone())
                        .await
                        .is_ok()
                    {
                        let kind = if command == Command::Go {
                            "go_sent"
                        } else {
                            "cancel_sent"
                        };
                        let ev = event(kind, json!({ "delivered": true, "after": "reconnect" }));
                        let _ = self.store.append_order_event(id, &ev).await;
                        if command == Command::Cancel {
                            let _ = self.store.cancel_delivered(id).await;
                        }
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        });
    }
}
