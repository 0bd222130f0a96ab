//! The `go` of an accepted order (PROTOCOL.md, two-phase dispense): sent
//! right after the acceptance is recorded, and retried while the machine
//! is between connections.

use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use serde_json::json;
use tracing::{debug, warn};
use vendgate_proto::machine::MachineNo;
use vendgate_proto::msg::{self, GoCmd};
use vendgate_proto::topic::Command;

use super::{event, OrderService};
use crate::domain::order::Status;

/// How long a `go` the machine's connection could not take is retried: half
/// the machine's `go_timeout` (10 s, PROTOCOL.md machine rule 2), so a retry
/// that gets through still arrives while the machine holds the order.
const GO_RESEND_FOR: Duration = Duration::from_secs(5);
/// Pause between those retries.
const GO_RESEND_EVERY: Duration = Duration::from_millis(100);

impl OrderService {
    /// Hand `go` for accepted order `id` to machine `m`'s connection
    /// (wherever it is held: the command bus forwards in a cluster).
    pub(super) async fn send_go(&self, m: MachineNo, id: u64) {
        let r = self
            .commands
            .send(
                &m,
                Command::Go,
                Bytes::from(msg::encode(&GoCmd { order_id: id })),
            )
            .await;
        match r {
            Ok(()) => {
                self.stats.go_sent.fetch_add(1, Ordering::Relaxed);
            }
            // The machine is between connections (a take-over, a node
            // being re-homed): keep handing the `go` over for a while, so
            // the merchant's 0 is honoured whichever node the machine comes
            // back to. A repeated `go` is never acted on twice (PROTOCOL.md
            // machine rule 3); past the retries the machine drops the order
            // after its go timeout and reports `no_go` (failed, full
            // refund), and a later connection gets it from `deliver_owed`.
            Err(e) => {
                debug!(machine_no = %m, order_id = id, error = %e, "go not delivered; retrying");
                self.resend_go(m, id);
            }
        }
    }

    /// Retry a `go` that could not be handed to the machine's connection,
    /// every [`GO_RESEND_EVERY`] for at most [`GO_RESEND_FOR`], while the
    /// order still waits for its result.
    fn resend_go(&self, m: MachineNo, id: u64) {
        let Some(me) = self.me.upgrade() else { return };
        tokio::spawn(async move {
            let payload = Bytes::from(msg::encode(&GoCmd { order_id: id }));
            let give_up = tokio::time::Instant::now() + GO_RESEND_FOR;
            loop {
                tokio::select! {
                    () = me.shutdown.cancelled() => return,
                    () = tokio::time::sleep(GO_RESEND_EVERY) => {}
                }
                match me.store.order(id).await {
                    Ok(Some(o)) if o.status == Status::Dispensing && !o.result_applied => {}
                    // Settled meanwhile (its result came, or `deliver_owed`
                    // delivered it and the machine answered).
                    Ok(_) => return,
                    Err(_) => {}
                }
                if me
                    .commands
                    .send(&m, Command::Go, payload.clone())
                    .await
                    .is_ok()
                {
                    me.stats.go_sent.fetch_add(1, Ordering::Relaxed);
                    let ev = event("go_sent", json!({ "delivered": true, "after": "retry" }));
                    let _ = me.store.append_order_event(id, &ev).await;
                    return;
                }
                if tokio::time::Instant::now() >= give_up {
                    warn!(machine_no = %m, order_id = id, "go not delivered; the machine will report no_go");
                    return;
                }
            }
        });
    }
}
