//! One client connection's task, from TCP accept to close: the handshake
//! (`handshake`: TLS, CONNECT, authentication), then the established
//! session loop (`session`: packets both ways, keep alive, acks) on a task
//! of its own, and at the end the will, presence, metrics and the session's
//! clean-up (or parking, for a persistent session). `framed` is the codec
//! over the socket, `close` why a connection ends, `labels` how it appears
//! in logs and metrics.
//!
//! What a client can make its connection hold is bounded in bytes by its
//! memory budget ([`Session::charge`](super::router::Session::charge)): before CONNECT the read buffer is
//! bounded by `max_connect_size`; after it, messages queued or in flight to
//! the client (QoS 0 included), retained messages replayed on SUBSCRIBE and
//! subscriptions are charged before they are allocated, and a connection
//! over its budget is closed (`memory_budget`). Writes go out in chunks of
//! at most `framed::WRITE_CHUNK` bytes, each bounded in time and abandoned
//! at once on a take-over or shutdown. Everything a machine sends (not only
//! PUBLISH) spends its packet-rate bucket, which is the machine's, not the
//! connection's, so reconnecting does not refill it. Client-chosen strings
//! (client ids, usernames, topics, filters) are logged escaped and
//! truncated (`labels::shown`), and refusals are logged at most a few times
//! per source address.

mod close;
mod framed;
mod handshake;
mod labels;
mod session;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use rumqttc::mqttbytes::v4::LastWill;
use tokio::net::TcpStream;
use tokio_util::task::TaskTracker;
use tracing::info;

use super::acl::ClientClass;
use super::limits::ConnSlot;
use super::router::SessionState;
use super::Hub;
use crate::edge::stats::Direction;
use close::CloseReason;
use handshake::{handshake, Established};
use labels::{client_kind, machine_label, shown};
use session::retain_allowed;

/// Serve one accepted TCP connection: the handshake on this task, then the
/// established session on a task of its own in `tasks`, so the handshake's
/// larger state is freed once CONNACK is queued and an idle connection
/// costs only the session loop's state. `slot` is the connection's place
/// under `max_connections`, held until the connection ends.
pub(crate) async fn serve(
    hub: Arc<Hub>,
    tcp: TcpStream,
    peer: SocketAddr,
    tls: Option<tokio_rustls::TlsAcceptor>,
    slot: ConnSlot,
    tasks: TaskTracker,
) {
    if let Some(established) = handshake(hub, tcp, peer, tls, slot).await {
        tasks.spawn(run(established));
    }
}

/// The established session until it closes, then what its end means: the
/// session parked or dropped, the will, presence, and the metrics.
// Written out on purpose (the size test below shows why).
#[allow(clippy::manual_async_fn)]
fn run(mut established: Established) -> impl std::future::Future<Output = ()> + Send {
    // An async block, not an async fn: an async fn stores its argument in
    // its state twice (as the argument and as the local it is moved to),
    // which would be every connection's task carrying two copies.
    async move {
        let e = &mut established;
        let reason = e.state.run(&mut e.framed, &mut e.rx).await;
        finish(established, reason);
    }
}

/// What a closed connection means: the session parked or dropped, the
/// will, presence, and the metrics.
fn finish(established: Established, reason: CloseReason) {
    let Established {
        slot: _slot,
        framed: _,
        mut state,
        mut rx,
        last_will,
    } = established;
    let hub = state.hub.clone();
    let session = state.session.clone();
    let (epoch, peer, class) = (state.epoch, state.peer, state.class);
    let client_id = &session.client_id;

    // A persistent session keeps its state for the next connection; the
    // router parks it (or hands it to a connection that took over).
    let kept = session.persistent.then(|| SessionState {
        subs: Vec::new(),
        inflight: std::mem::take(&mut state.inflight),
        queue: std::mem::take(&mut state.backlog),
        qos2_in: std::mem::take(&mut state.qos2_in),
        next_pkid: state.next_pkid,
    });
    hub.router.close(&session, &mut rx, kept);
    if reason.publishes_will() {
        if let Some(will) = last_will {
            publish_will(&hub, *will, class);
        }
    }
    if let Some((m, e)) = epoch {
        hub.presence.disconnected(m, e, reason.presence_reason());
    }
    hub.stats
        .connections
        .disconnected(client_kind(class), reason.metric_reason());
    count_close(&hub, reason);
    info!(%peer, client_id = ?shown(client_id), machine_no = machine_label(class), end = ?reason, "MQTT client disconnected");
}

/// The edge's counters of connections closed for a fault.
fn count_close(hub: &Hub, reason: CloseReason) {
    match reason {
        CloseReason::KeepAlive => {
            hub.stats
                .keep_alive_timeouts
                .fetch_add(1, Ordering::Relaxed);
        }
        CloseReason::Protocol(_) => {
            hub.stats.malformed.fetch_add(1, Ordering::Relaxed);
        }
        CloseReason::TooLarge => {
            hub.stats.malformed.fetch_add(1, Ordering::Relaxed);
            hub.stats.oversized_packets.fetch_add(1, Ordering::Relaxed);
        }
        CloseReason::MemoryBudget => {
            hub.stats.memory_budget.fetch_add(1, Ordering::Relaxed);
        }
        _ => {}
    }
}

/// The will goes out through the router like any publish of the client's,
/// under the same retained-message rule.
fn publish_will(hub: &Hub, will: LastWill, class: ClientClass) {
    hub.stats.messages_in.fetch_add(1, Ordering::Relaxed);
    hub.stats.topics.record(
        Direction::In,
        &will.topic,
        will.topic.len() + will.message.len(),
    );
    let retain = will.retain && retain_allowed(hub, class, &will.message);
    hub.router
        .publish(&will.topic, will.message, will.qos, retain);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The size of what `f` returns: for an async fn, its future.
    fn returned_size<A, R>(_: &impl FnOnce(A) -> R) -> usize {
        std::mem::size_of::<R>()
    }

    fn returned_size3<A, B, C, R>(_: &impl FnOnce(A, B, C) -> R) -> usize {
        std::mem::size_of::<R>()
    }

    /// What an idle connection's task holds inline (its future is the task's
    /// state for as long as the connection lives). Not a timing: a size, so
    /// a change that makes every idle machine larger shows up here.
    #[test]
    fn an_idle_connection_task_is_small() {
        let task = returned_size(&run);
        eprintln!(
            "run future {task} B; Established {} B; SessionLoop {} B; Framed {} B",
            std::mem::size_of::<Established>(),
            std::mem::size_of::<session::SessionLoop>(),
            std::mem::size_of::<framed::Framed>(),
        );
        eprintln!(
            "SessionLoop::run {} B; flush {} B; write_packets {} B",
            returned_size3(&session::SessionLoop::run),
            returned_size3(&session::SessionLoop::flush),
            returned_size3(&framed::Framed::write_packets),
        );
        eprintln!(
            "Sleep {} B; WaitForCancellation {} B; Session {} B; SessionState {} B",
            std::mem::size_of::<tokio::time::Sleep>(),
            std::mem::size_of::<tokio_util::sync::WaitForCancellationFutureOwned>(),
            std::mem::size_of::<crate::edge::router::Session>(),
            std::mem::size_of::<SessionState>(),
        );
        assert!(task <= 1024, "run future is {task} bytes");
    }
}
