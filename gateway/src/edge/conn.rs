//! One client connection, from TCP accept to close: CONNECT and
//! authentication, then the packet loop (ACL and deny list on every PUBLISH
//! and SUBSCRIBE, QoS 0/1/2 both ways with a bounded in-flight window, the
//! per-machine publish rate), keep alive enforced on what the client *sends*,
//! and the will, presence and session clean-up (or parking, for a persistent
//! session) at the end.
//!
//! Idle connections hold no buffers: bytes are read into a stack buffer only
//! once the socket is readable, and kept only while a packet is incomplete.
//! That keeps a connected, idle machine at a few hundred bytes of heap (plus
//! rustls' connection state on the TLS listener).
//!
//! What a client can make its connection hold is bounded in bytes by its
//! memory budget ([`Session::charge`]): before CONNECT the read buffer is
//! bounded by `max_connect_size`; after it, messages queued or in flight to
//! the client (QoS 0 included), retained messages replayed on SUBSCRIBE and
//! subscriptions are charged before they are allocated, and a connection
//! over its budget is closed (`memory_budget`). Writes go out in chunks of
//! at most [`WRITE_CHUNK`] bytes, each bounded in time and abandoned at once
//! on a take-over or shutdown. Everything a machine sends (not only
//! PUBLISH) spends its packet-rate bucket, which is the machine's, not the
//! connection's, so reconnecting does not refill it. Client-chosen strings
//! (client ids, usernames, topics, filters) are logged escaped and
//! truncated ([`shown`]), and refusals are logged at most a few times per
//! source address.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use rumqttc::mqttbytes::v4::{
    ConnAck, Connect, ConnectReturnCode, LastWill, Packet, PubAck, PubComp, PubRec, PubRel,
    Publish, SubAck, Subscribe, SubscribeReasonCode, UnsubAck,
};
use rumqttc::mqttbytes::{Error as CodecError, Protocol, QoS};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::{sleep_until, timeout, timeout_at, Instant};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use vendgate_proto::machine::MachineNo;
use vendgate_proto::topic::{self, Topic};

use super::limits::{ConnSlot, MachineBucket};
use super::router::{
    filter_within, service_key, ClientClass, InflightOut, KickReason, Outbound, Session,
    SessionBudget, SessionState,
};
use super::stream::Stream;
use super::Hub;
use crate::edge::stats::{ClientKind, Direction, DisconnectReason, DispenseClock};
use crate::presence::OfflineReason;

/// Bytes read per readiness event.
const READ_CHUNK: usize = 4096;
/// Outbound packets can be large (service clients); the codec wants a cap.
const MAX_OUTGOING: usize = 16 * 1024 * 1024;
/// A write that cannot complete in this time means the peer stopped reading.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Outgoing packets are encoded and written at most this many bytes at a
/// time (plus one packet), whatever is queued.
pub(crate) const WRITE_CHUNK: usize = 64 * 1024;
/// Client-chosen strings in log lines are cut to this many characters.
const LOG_CHARS: usize = 64;

/// How a connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    Clean,
    SocketClosed,
    KeepAlive,
    Protocol(&'static str),
    Acl,
    TakeOver,
    SlowConsumer,
    Shutdown,
    /// A packet larger than `max_packet_size`.
    TooLarge,
    /// More unreleased inbound QoS 2 publishes than `max_inflight`.
    InflightExceeded,
    /// A machine over `machine_publish_rate`.
    RateLimited,
    /// The connection's memory budget was exhausted.
    MemoryBudget,
    /// Its account was disabled or removed while connected.
    Revoked,
}

impl End {
    fn presence_reason(self) -> OfflineReason {
        match self {
            End::Clean => OfflineReason::Clean,
            End::SocketClosed | End::TakeOver | End::SlowConsumer | End::Revoked => {
                OfflineReason::SocketClosed
            }
            End::KeepAlive => OfflineReason::KeepAliveTimeout,
            End::Protocol(_)
            | End::Acl
            | End::TooLarge
            | End::InflightExceeded
            | End::RateLimited
            | End::MemoryBudget => OfflineReason::ProtocolViolation,
            End::Shutdown => OfflineReason::Shutdown,
        }
    }

    /// MQTT 3.1.1 §3.1.2.5: the will goes out when the connection ends
    /// without DISCONNECT. A take-over hands the session to the new
    /// connection, and a shutting-down gateway is not the machine failing, so
    /// neither publishes it.
    fn publishes_will(self) -> bool {
        !matches!(self, End::Clean | End::TakeOver | End::Shutdown)
    }

    /// The `reason` label of the disconnect metric.
    fn metric_reason(self) -> DisconnectReason {
        match self {
            End::Clean => DisconnectReason::Clean,
            End::SocketClosed => DisconnectReason::SocketClosed,
            End::KeepAlive => DisconnectReason::KeepAliveTimeout,
            End::Protocol(_) => DisconnectReason::ProtocolViolation,
            End::Acl => DisconnectReason::AclViolation,
            End::TakeOver => DisconnectReason::TakeOver,
            End::SlowConsumer => DisconnectReason::SlowConsumer,
            End::Shutdown => DisconnectReason::Shutdown,
            End::TooLarge => DisconnectReason::PacketTooLarge,
            End::InflightExceeded => DisconnectReason::InflightExceeded,
            End::RateLimited => DisconnectReason::RateLimited,
            End::MemoryBudget => DisconnectReason::MemoryBudget,
            End::Revoked => DisconnectReason::Revoked,
        }
    }
}

fn client_kind(class: ClientClass) -> ClientKind {
    match class {
        ClientClass::Machine(_) => ClientKind::Machine,
        ClientClass::Service => ClientKind::Service,
    }
}

enum ReadError {
    Eof,
    Malformed(&'static str),
    TooLarge,
}

/// The TLS handshake (on the TLS listener), CONNECT, authentication and
/// registration of one accepted TCP connection. The established session runs
/// as a task of its own (`Established::run`), so the handshake's larger
/// state is freed once CONNACK is queued: an idle connection then costs only
/// the session loop's state. `slot` is the connection's place under
/// `max_connections`, held until the connection ends.
pub(crate) async fn handshake(
    hub: Arc<Hub>,
    tcp: TcpStream,
    peer: SocketAddr,
    tls: Option<tokio_rustls::TlsAcceptor>,
    slot: ConnSlot,
) -> Option<Established> {
    // Without NODELAY every QoS 1 round trip pays Nagle + delayed ACK (~40 ms).
    let _ = tcp.set_nodelay(true);
    // One deadline covers the TLS handshake and CONNECT: a peer that stalls
    // either holds its connection (and slot) no longer than connect_timeout.
    let deadline = Instant::now() + hub.settings.connect_timeout;
    let (stream, cert_cn) = match tls {
        None => (Stream::Plain(tcp), None),
        // Boxed: the handshake future is large and short-lived.
        Some(acceptor) => match timeout_at(deadline, Box::pin(acceptor.accept(tcp))).await {
            Ok(Ok(s)) => {
                let cn = s
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .and_then(crate::tls::common_name);
                (Stream::tls(s), cn)
            }
            Ok(Err(e)) => {
                debug!(%peer, error = %e, "TLS handshake failed");
                hub.stats
                    .tls_handshake_failures
                    .fetch_add(1, Ordering::Relaxed);
                return None;
            }
            Err(_) => {
                debug!(%peer, "no TLS handshake within the connect timeout");
                hub.stats.connect_timeouts.fetch_add(1, Ordering::Relaxed);
                return None;
            }
        },
    };
    // Until the client has authenticated, its read buffer is bounded by the
    // CONNECT packet's size, not by what an authenticated client may send.
    let mut conn = Conn {
        stream,
        rbuf: BytesMut::new(),
        max_packet: hub
            .settings
            .max_connect_size
            .min(hub.settings.max_packet_size),
    };

    // The pre-CONNECT and authentication futures are boxed: they are large
    // (the storage lookup especially) and live only until CONNACK, while an
    // async fn's state is as large as its largest await point for as long as
    // the connection lives.
    let connect = match timeout_at(deadline, Box::pin(conn.read_connect())).await {
        Ok(Ok(c)) => c,
        Ok(Err(ConnectError::Refuse(code))) => {
            conn.refuse(&hub, code).await;
            hub.stats.connect_refused.fetch_add(1, Ordering::Relaxed);
            hub.stats.connections.refused("protocol_version", None);
            return None;
        }
        Ok(Err(ConnectError::Drop(why))) => {
            debug!(%peer, why, "connection dropped before CONNECT");
            hub.stats.malformed.fetch_add(1, Ordering::Relaxed);
            if why == TOO_LARGE {
                hub.stats.oversized_packets.fetch_add(1, Ordering::Relaxed);
            }
            return None;
        }
        Err(_) => {
            debug!(%peer, "no CONNECT within the connect timeout");
            hub.stats.connect_timeouts.fetch_add(1, Ordering::Relaxed);
            return None;
        }
    };

    // Brute-force protection: refused before the password is even looked at.
    // A verified certificate cannot be guessed, so it is not throttled.
    let username = connect
        .login
        .as_ref()
        .map(|l| l.username.as_str())
        .filter(|u| !u.is_empty());
    if cert_cn.is_none() {
        if let Some(scope) = hub
            .throttle
            .check(peer.ip(), username, std::time::Instant::now())
        {
            // debug, not warn: a throttled flood must not flood the logs too;
            // the failures that caused the block were logged, and
            // vendgate_mqtt_auth_throttled_total counts these.
            debug!(%peer, client_id = ?shown(&connect.client_id), username = ?shown(username.unwrap_or("")), scope = scope.as_str(), "MQTT CONNECT refused: too many failed attempts");
            hub.stats.auth_throttled[scope as usize].fetch_add(1, Ordering::Relaxed);
            hub.stats.connect_refused.fetch_add(1, Ordering::Relaxed);
            hub.stats.connections.refused("throttled", username);
            conn.refuse(&hub, ConnectReturnCode::NotAuthorized).await;
            return None;
        }
    }

    // The CONNECT deadline covers authentication too (a queue for argon2
    // included): counted from the TCP accept, like everything before CONNACK.
    let authenticated = timeout_at(
        deadline,
        Box::pin(hub.auth.authenticate(
            &connect.client_id,
            connect.login.as_ref(),
            cert_cn.as_deref(),
        )),
    )
    .await;
    let Ok(authenticated) = authenticated else {
        debug!(%peer, "authentication not done within the connect timeout");
        hub.stats.connect_timeouts.fetch_add(1, Ordering::Relaxed);
        return None;
    };
    let class = match authenticated {
        Ok(c) => {
            if cert_cn.is_none() {
                if let Some(u) = username {
                    hub.throttle.succeeded(peer.ip(), u);
                }
            }
            c
        }
        Err(refusal) => {
            if refusal.is_credential_failure() {
                hub.throttle
                    .failed(peer.ip(), username, std::time::Instant::now());
            }
            // The username is not a secret; the password is never logged.
            // Both strings are the client's: escaped and cut, and at most a
            // few lines per source address (the metrics count every one).
            let user = connect
                .login
                .as_ref()
                .map(|l| l.username.as_str())
                .unwrap_or("");
            if hub.log_gate.allow(peer.ip()) {
                warn!(%peer, client_id = ?shown(&connect.client_id), username = ?shown(user), reason = refusal.as_str(), "MQTT CONNECT refused");
            }
            hub.stats.connect_refused.fetch_add(1, Ordering::Relaxed);
            hub.stats.connections.refused(
                refusal.as_str(),
                connect.login.as_ref().map(|l| l.username.as_str()),
            );
            conn.refuse(&hub, refusal.code()).await;
            return None;
        }
    };

    // Client id rules (§3.1.3.1): an empty id is allowed only with a clean
    // session, and then the server assigns one.
    let conn_id = hub.next_conn_id();
    let client_id = if connect.client_id.is_empty() {
        if !connect.clean_session {
            hub.stats.connections.refused("bad_client_id", None);
            conn.refuse(&hub, ConnectReturnCode::BadClientId).await;
            return None;
        }
        format!("vendgate-auto-{conn_id}")
    } else {
        connect.client_id.clone()
    };

    // The will is published by the hub on the client's behalf, so it must obey
    // the same ACL as the client's own publishes, and for a machine be one of
    // its uplinks: the only topics of its prefix that `route` passes on.
    if let Some(will) = &connect.last_will {
        let machine_non_uplink =
            matches!(class, ClientClass::Machine(m) if !is_own_uplink(m, &will.topic));
        if !topic::valid_publish_topic(&will.topic)
            || !may_publish(class, &will.topic)
            || machine_non_uplink
        {
            if hub.log_gate.allow(peer.ip()) {
                warn!(%peer, client_id = ?shown(&client_id), "MQTT CONNECT refused: will topic not allowed");
            }
            hub.stats.acl_violations.fetch_add(1, Ordering::Relaxed);
            hub.stats.connections.refused("will_not_allowed", None);
            conn.refuse(&hub, ConnectReturnCode::NotAuthorized).await;
            return None;
        }
    }

    let keep_alive = match (connect.keep_alive, class) {
        (0, ClientClass::Service) => None,
        // A machine must not be able to disable dead-peer detection.
        (0, ClientClass::Machine(_)) => Some(hub.settings.machine_max_idle),
        (s, _) => Some(Duration::from_millis(u64::from(s) * 1500)),
    };

    // A machine's packets (this CONNECT included) spend its own bucket,
    // which outlives its connections: reconnecting does not refill it.
    let bucket = match class {
        ClientClass::Machine(m) => {
            let b = hub.machine_rates.bucket(m);
            if !b.take(1) {
                hub.stats.rate_limited.fetch_add(1, Ordering::Relaxed);
                hub.stats.connect_refused.fetch_add(1, Ordering::Relaxed);
                hub.stats.connections.refused("rate_limited", None);
                if hub.log_gate.allow(peer.ip()) {
                    warn!(%peer, machine_no = %m, "MQTT CONNECT refused: machine over its packet rate");
                }
                conn.refuse(&hub, ConnectReturnCode::ServiceUnavailable)
                    .await;
                return None;
            }
            Some(b)
        }
        ClientClass::Service => None,
    };

    // Keep only the will: the rest of CONNECT (the password included) must
    // not live as long as the connection.
    let last_will = connect.last_will;
    let (tx, rx) = mpsc::channel(hub.settings.outbound_queue.max(1));
    // clean_session = 0 asks for a session that outlives the connection
    // (§3.1.2.4); the router resumes a stored one or starts a new one. Not
    // for machines (PROTOCOL.md, gateway rule 8): a machine's unacknowledged
    // command is never redelivered on a later connection, because a
    // dispense delivered late is worse than none. A machine asking for 0 is
    // served as if it had asked for 1 (session present 0, nothing kept).
    let persistent = !connect.clean_session && class == ClientClass::Service;
    let s = &hub.settings;
    let budget = match class {
        ClientClass::Machine(_) => SessionBudget {
            memory: s.machine_connection_memory,
            max_subscriptions: s.machine_max_subscriptions,
            max_subscription_bytes: s.max_subscription_bytes,
        },
        ClientClass::Service => SessionBudget {
            memory: s.service_connection_memory,
            max_subscriptions: s.max_subscriptions,
            max_subscription_bytes: s.max_subscription_bytes,
        },
    };
    let mut session =
        Session::new(conn_id, client_id.clone(), class, persistent, tx).with_budget(budget);
    if class == ClientClass::Service {
        // A service's sessions are its own: another account using the same
        // client id gets a session of its own instead of taking this one.
        let account = connect.login.as_ref().map_or("", |l| l.username.as_str());
        session = session.with_key(service_key(account, &client_id));
    }
    // The read buffer's bound is charged up front: it is what an
    // authenticated client can make this connection buffer at most.
    let inbound = s.max_packet_size.saturating_add(READ_CHUNK);
    if !session.charge(inbound) {
        warn!(%peer, client_id = ?shown(&client_id), "MQTT connection budget smaller than max_packet_size; refused");
        hub.stats.connections.refused("other", None);
        conn.refuse(&hub, ConnectReturnCode::ServiceUnavailable)
            .await;
        return None;
    }
    let session = Arc::new(session);
    // Cluster mode: the epoch comes from the cluster before anything local
    // changes, so a refused CONNECT leaves the old session alone.
    let cluster_epoch = match (class, hub.epochs.get()) {
        (ClientClass::Machine(m), Some(source)) => match source.acquire(m).await {
            Some(e) => Some(e),
            None => {
                warn!(%peer, client_id = ?shown(&client_id), "MQTT CONNECT refused: no cluster epoch (database unreachable)");
                hub.stats.connect_refused.fetch_add(1, Ordering::Relaxed);
                hub.stats.connections.refused("unavailable", None);
                conn.refuse(&hub, ConnectReturnCode::ServiceUnavailable)
                    .await;
                return None;
            }
        },
        _ => None,
    };
    let registered = hub.router.register(session.clone());
    let took_over = registered.took_over;
    let epoch = match class {
        ClientClass::Machine(m) => Some((
            m,
            match cluster_epoch {
                Some(e) => hub.presence.connected_at(m, e),
                None => hub.presence.connected(m),
            },
        )),
        ClientClass::Service => None,
    };
    hub.stats
        .connections_accepted
        .fetch_add(1, Ordering::Relaxed);
    hub.stats.connections.connected(client_kind(class));
    info!(%peer, client_id = ?shown(&client_id), machine_no = machine_label(class), took_over, "MQTT client connected");

    // Authenticated: packets may now be as large as `max_packet_size`.
    conn.max_packet = hub.settings.max_packet_size;
    let resumed = registered.resumed;
    // A resumed session's messages were within its parked bytes bound (at
    // most the budget); they count against the connection from now on.
    let resumed_bytes: usize = resumed
        .inflight
        .iter()
        .map(|f| f.msg.cost())
        .chain(resumed.queue.iter().map(Outbound::cost))
        .sum();
    session.charge_unchecked(resumed_bytes);
    let mut state = Loop {
        hub: hub.clone(),
        session: session.clone(),
        class,
        epoch,
        keep_alive,
        last_rx: Instant::now(),
        inflight: Vec::new(),
        next_pkid: resumed.next_pkid.max(1),
        qos2_in: resumed.qos2_in,
        backlog: resumed.queue,
        out: Vec::new(),
        out_bytes: 0,
        clock: DispenseClock::default(),
        bucket,
        peer,
    };
    state.out.push(Packet::ConnAck(ConnAck::new(
        ConnectReturnCode::Success,
        registered.session_present,
    )));
    // §4.4: unacknowledged messages are sent again, in their original order,
    // with their packet ids (PUBLISH with DUP = 1, or PUBREL once released).
    for f in resumed.inflight {
        state.out.push(redelivery(&f));
        state.inflight.push(f);
    }
    Some(Established {
        hub,
        _slot: slot,
        conn,
        state,
        rx,
        session,
        epoch,
        last_will,
        peer,
        client_id,
        class,
    })
}

/// A connection past CONNACK.
pub(crate) struct Established {
    hub: Arc<Hub>,
    /// Frees the connection's place under `max_connections` when dropped.
    _slot: ConnSlot,
    conn: Conn,
    state: Loop,
    rx: mpsc::Receiver<Box<Outbound>>,
    session: Arc<Session>,
    epoch: Option<(MachineNo, u64)>,
    last_will: Option<LastWill>,
    peer: SocketAddr,
    client_id: String,
    class: ClientClass,
}

impl Established {
    pub(crate) async fn run(self) {
        let Established {
            hub,
            _slot,
            mut conn,
            mut state,
            rx,
            session,
            epoch,
            last_will,
            peer,
            client_id,
            class,
        } = self;
        let mut rx = rx;
        let end = state.run(&mut conn, &mut rx).await;

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
        if end.publishes_will() {
            if let Some(will) = last_will {
                publish_will(&hub, will, class);
            }
        }
        if let Some((m, e)) = epoch {
            hub.presence.disconnected(m, e, end.presence_reason());
        }
        hub.stats
            .connections
            .disconnected(client_kind(class), end.metric_reason());
        match end {
            End::KeepAlive => {
                hub.stats
                    .keep_alive_timeouts
                    .fetch_add(1, Ordering::Relaxed);
            }
            End::Protocol(_) => {
                hub.stats.malformed.fetch_add(1, Ordering::Relaxed);
            }
            End::TooLarge => {
                hub.stats.malformed.fetch_add(1, Ordering::Relaxed);
                hub.stats.oversized_packets.fetch_add(1, Ordering::Relaxed);
            }
            _ => {}
        }
        if end == End::MemoryBudget {
            hub.stats.memory_budget.fetch_add(1, Ordering::Relaxed);
        }
        info!(%peer, client_id = ?shown(&client_id), machine_no = machine_label(class), end = ?end, "MQTT client disconnected");
    }
}

fn machine_label(class: ClientClass) -> String {
    match class {
        ClientClass::Machine(m) => m.to_string(),
        ClientClass::Service => String::new(),
    }
}

fn publish_will(hub: &Hub, will: LastWill, class: ClientClass) {
    hub.stats.messages_in.fetch_add(1, Ordering::Relaxed);
    hub.stats.topics.record(
        Direction::In,
        &will.topic,
        will.topic.len() + will.message.len(),
    );
    let retain = will.retain && retainable(hub, class, &will.message);
    hub.router
        .publish(&will.topic, will.message, will.qos, retain);
}

/// Whether a retained publish of `class` may be kept: a machine's uplinks
/// are JSON objects (PROTOCOL.md), so anything else it asks to retain is
/// delivered but not kept (counted), and cannot fill the store with junk. An
/// empty payload clears the topic, as MQTT says.
fn retainable(hub: &Hub, class: ClientClass, payload: &[u8]) -> bool {
    let ok = match class {
        ClientClass::Service => true,
        ClientClass::Machine(_) => payload.is_empty() || is_json_object(payload),
    };
    if !ok {
        hub.router
            .stats
            .retained_refused
            .fetch_add(1, Ordering::Relaxed);
    }
    ok
}

fn is_json_object(payload: &[u8]) -> bool {
    payload.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{')
        && serde_json::from_slice::<serde::de::IgnoredAny>(payload).is_ok()
}

/// A client-chosen string as a log field: Debug-escaped (CR, LF and other
/// control characters cannot forge log lines) and cut to [`LOG_CHARS`]
/// characters, with the full length in bytes when cut.
pub(crate) fn shown(s: &str) -> Shown<'_> {
    Shown(s)
}

pub(crate) struct Shown<'a>(&'a str);

impl std::fmt::Debug for Shown<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0.char_indices().nth(LOG_CHARS) {
            None => write!(f, "{:?}", self.0),
            Some((cut, _)) => {
                let head = self.0.get(..cut).unwrap_or("");
                write!(f, "{head:?}…({} bytes)", self.0.len())
            }
        }
    }
}

/// Whether `topic_name` is one of machine `m`'s uplink topics (PROTOCOL.md).
fn is_own_uplink(m: MachineNo, topic_name: &str) -> bool {
    matches!(topic::parse(topic_name), Some(Topic::Uplink(tm, _)) if tm == m)
}

/// The publish ACL: machines under their own prefix, services anywhere but
/// under `vend/v1/` (read-only there: only machines and the gateway write it).
fn may_publish(class: ClientClass, topic_name: &str) -> bool {
    match class {
        ClientClass::Machine(m) => topic::machine_of(topic_name) == Some(m),
        ClientClass::Service => !topic_name.starts_with(topic::PREFIX),
    }
}

/// The subscribe ACL: machines only within their own prefix; services any
/// valid filter.
fn may_subscribe(class: ClientClass, filter: &str) -> bool {
    match class {
        ClientClass::Machine(m) => topic::filter_within_prefix(filter, &topic::machine_prefix(&m)),
        ClientClass::Service => true,
    }
}

enum ConnectError {
    /// Answer with this CONNACK code, then close.
    Refuse(ConnectReturnCode),
    /// Close without CONNACK (§3.1.4: not a CONNECT, or malformed).
    Drop(&'static str),
}

/// Why a connection closed on an oversized packet (also counted apart).
const TOO_LARGE: &str = "packet too large";

struct Conn {
    stream: Stream,
    rbuf: BytesMut,
    max_packet: usize,
}

impl Conn {
    async fn read_connect(&mut self) -> Result<Connect, ConnectError> {
        loop {
            // Refuse a first packet that is not CONNECT before reading its body,
            // whatever length it announces.
            if let Some(b) = self.rbuf.first() {
                if b >> 4 != 1 {
                    return Err(ConnectError::Drop("first packet is not CONNECT"));
                }
            }
            match Packet::read(&mut self.rbuf, self.max_packet) {
                // MQTT 3.1.1 only (§3.1.2.2): level 5 parses, but is refused with 0x01.
                Ok(Packet::Connect(c)) if c.protocol != Protocol::V4 => {
                    return Err(ConnectError::Refuse(
                        ConnectReturnCode::RefusedProtocolVersion,
                    ))
                }
                Ok(Packet::Connect(c)) => return Ok(c),
                Ok(_) => return Err(ConnectError::Drop("first packet is not CONNECT")),
                Err(CodecError::InsufficientBytes(_)) => {}
                Err(CodecError::InvalidProtocolLevel(_)) => {
                    return Err(ConnectError::Refuse(
                        ConnectReturnCode::RefusedProtocolVersion,
                    ))
                }
                Err(CodecError::PayloadSizeLimitExceeded(_)) => {
                    return Err(ConnectError::Drop(TOO_LARGE))
                }
                Err(_) => return Err(ConnectError::Drop("malformed CONNECT")),
            }
            match self.fill().await {
                Ok(()) => {}
                Err(ReadError::Eof) => return Err(ConnectError::Drop("closed before CONNECT")),
                Err(ReadError::Malformed(w)) => return Err(ConnectError::Drop(w)),
                Err(ReadError::TooLarge) => return Err(ConnectError::Drop(TOO_LARGE)),
            }
        }
    }

    /// Wait for readability and append what is there to `rbuf`.
    async fn fill(&mut self) -> Result<(), ReadError> {
        loop {
            if self.stream.readable().await.is_err() {
                return Err(ReadError::Eof);
            }
            match self.try_fill() {
                Ok(true) => return Ok(()),
                Ok(false) => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Non-blocking read; Ok(false) on a spurious wake-up.
    fn try_fill(&mut self) -> Result<bool, ReadError> {
        let mut chunk = [0u8; READ_CHUNK];
        match self.stream.try_read(&mut chunk) {
            Ok(Some(0)) => Err(ReadError::Eof),
            Ok(Some(n)) => {
                let chunk = chunk.get(..n).ok_or(ReadError::Eof)?;
                self.rbuf.extend_from_slice(chunk);
                Ok(true)
            }
            Ok(None) => Ok(false),
            Err(_) => Err(ReadError::Eof),
        }
    }

    /// Next complete packet already buffered, if any.
    fn next_packet(&mut self) -> Result<Option<Packet>, ReadError> {
        if self.rbuf.is_empty() {
            return Ok(None);
        }
        match Packet::read(&mut self.rbuf, self.max_packet) {
            Ok(p) => {
                if self.rbuf.is_empty() {
                    // Drop the (now shared) allocation so an idle connection
                    // holds no buffer.
                    self.rbuf = BytesMut::new();
                }
                Ok(Some(p))
            }
            Err(CodecError::InsufficientBytes(_)) => Ok(None),
            Err(CodecError::PayloadSizeLimitExceeded(_)) => Err(ReadError::TooLarge),
            Err(_) => Err(ReadError::Malformed("malformed packet")),
        }
    }

    /// Answer CONNECT with a refusal (session present is always 0 then,
    /// §3.2.2.2); the connection is closed by the caller returning.
    async fn refuse(&mut self, hub: &Hub, code: ConnectReturnCode) {
        let never = CancellationToken::new();
        let stop = Stop {
            shutdown: &hub.shutdown,
            kicked: &never,
        };
        let _ = self
            .write_packets(&[Packet::ConnAck(ConnAck::new(code, false))], &stop)
            .await;
    }

    /// Encode and write `packets` in chunks of about [`WRITE_CHUNK`] bytes,
    /// so what is queued is never encoded into one buffer. Each chunk must
    /// be written within [`WRITE_TIMEOUT`]; a take-over or shutdown ends
    /// the write at once instead of waiting for a peer that does not read.
    async fn write_packets(&mut self, packets: &[Packet], stop: &Stop<'_>) -> Result<usize, End> {
        let mut buf = BytesMut::new();
        let mut written = 0;
        let mut rest = packets;
        while !rest.is_empty() {
            buf.clear();
            while let Some((p, tail)) = rest.split_first() {
                if buf.len() >= WRITE_CHUNK {
                    break;
                }
                if p.write(&mut buf, MAX_OUTGOING).is_err() {
                    return Err(End::Protocol("outgoing packet too large"));
                }
                rest = tail;
            }
            tokio::select! {
                biased;
                end = stop.fired() => return Err(end),
                r = timeout(WRITE_TIMEOUT, self.stream.write_all(&buf)) => match r {
                    Ok(Ok(())) => written += buf.len(),
                    _ => return Err(End::SocketClosed),
                },
            }
        }
        Ok(written)
    }
}

/// What ends a connection from outside while it waits: shutdown or a kick
/// (take-over, slow consumer, memory budget).
struct Stop<'a> {
    shutdown: &'a CancellationToken,
    kicked: &'a CancellationToken,
}

impl Stop<'_> {
    async fn fired(&self) -> End {
        tokio::select! {
            biased;
            _ = self.shutdown.cancelled() => End::Shutdown,
            _ = self.kicked.cancelled() => End::TakeOver,
        }
    }
}

/// Per-connection protocol state after a successful CONNECT.
struct Loop {
    hub: Arc<Hub>,
    session: Arc<Session>,
    class: ClientClass,
    epoch: Option<(MachineNo, u64)>,
    keep_alive: Option<Duration>,
    last_rx: Instant,
    /// Our QoS 1/2 publishes not yet acknowledged, in send order (at most
    /// `max_inflight`, so a linear search is cheap).
    inflight: Vec<InflightOut>,
    next_pkid: u16,
    /// Packet ids of the client's QoS 2 publishes between PUBREC and PUBREL;
    /// a duplicate id in that window is not routed again (exactly once).
    qos2_in: std::collections::HashSet<u16>,
    /// Messages waiting for room in the in-flight window or for the next
    /// write (retained messages on subscribe, and what the channel
    /// delivered). Charged against the session's memory budget.
    backlog: VecDeque<Outbound>,
    /// Packets to write at the end of this turn: at most about
    /// [`WRITE_CHUNK`] bytes of publishes (`out_bytes`) plus acknowledgements.
    out: Vec<Packet>,
    out_bytes: usize,
    /// A machine's dispense round trip, for the timing histograms.
    clock: DispenseClock,
    /// The machine's packet-rate bucket (None for services: trusted, not
    /// limited).
    bucket: Option<Arc<MachineBucket>>,
    peer: SocketAddr,
}

/// The packet that resumes one unacknowledged outbound message.
fn redelivery(f: &InflightOut) -> Packet {
    if f.released {
        return Packet::PubRel(PubRel::new(f.pkid));
    }
    let mut p = Publish::new(f.msg.topic.as_ref(), f.msg.qos, Vec::new());
    p.payload = f.msg.payload.clone();
    p.retain = f.msg.retain;
    p.pkid = f.pkid;
    p.dup = true;
    Packet::Publish(p)
}

impl Loop {
    async fn run(&mut self, conn: &mut Conn, rx: &mut mpsc::Receiver<Box<Outbound>>) -> End {
        let shutdown = self.hub.shutdown.clone();
        let kicked = self.session.kicked().clone();
        let stop = Stop {
            shutdown: &shutdown,
            kicked: &kicked,
        };
        let max_inflight = usize::from(self.hub.settings.max_inflight.max(1));
        loop {
            // One chunk per turn, so reads (acks, PINGREQ) and kicks are
            // served between the chunks of a long backlog.
            self.pump(max_inflight);
            if !self.out.is_empty() {
                if let Err(end) = self.flush(conn, &stop).await {
                    return self.stopped(end);
                }
            }
            let ka_deadline = self.keep_alive.map(|k| self.last_rx + k);
            let window_open = self.inflight.len() < max_inflight;
            let more = self
                .backlog
                .front()
                .is_some_and(|m| m.qos == QoS::AtMostOnce || window_open);
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => return End::Shutdown,
                _ = kicked.cancelled() => return self.stopped(End::TakeOver),
                r = conn.stream.readable() => {
                    if r.is_err() {
                        return End::SocketClosed;
                    }
                    match conn.try_fill() {
                        Ok(true) => {}
                        Ok(false) => continue,
                        Err(ReadError::Eof) => return End::SocketClosed,
                        Err(ReadError::Malformed(w)) => return End::Protocol(w),
                        Err(ReadError::TooLarge) => return End::TooLarge,
                    }
                    self.last_rx = Instant::now();
                    loop {
                        match conn.next_packet() {
                            Ok(Some(p)) => {
                                if let Some(end) = self.on_packet(p) {
                                    // Flush acknowledgements already queued (e.g. a
                                    // PUBACK before a clean DISCONNECT).
                                    if !self.out.is_empty() {
                                        let _ = self.flush(conn, &stop).await;
                                    }
                                    return end;
                                }
                            }
                            Ok(None) => break,
                            Err(ReadError::Malformed(w)) => return End::Protocol(w),
                            Err(ReadError::TooLarge) => return End::TooLarge,
                            Err(ReadError::Eof) => return End::SocketClosed,
                        }
                    }
                    if let Some((m, _)) = self.epoch {
                        self.hub.presence.touch(&m);
                    }
                }
                Some(msg) = rx.recv(), if window_open && self.backlog.is_empty() => {
                    self.backlog.push_back(*msg);
                    // Batch what is already queued into one write.
                    while self.backlog.len() < max_inflight {
                        match rx.try_recv() {
                            Ok(m) => self.backlog.push_back(*m),
                            Err(_) => break,
                        }
                    }
                }
                // More of the backlog can go out: next turn writes it.
                _ = std::future::ready(()), if more => {}
                _ = sleep_opt(ka_deadline) => {
                    if ka_deadline.is_some_and(|d| Instant::now() >= d) {
                        return End::KeepAlive;
                    }
                }
            }
        }
    }

    /// How a connection stopped from outside ends: the kick's reason.
    fn stopped(&self, end: End) -> End {
        if end != End::TakeOver {
            return end;
        }
        match self.session.kick_reason() {
            Some(KickReason::TakeOver) => End::TakeOver,
            Some(KickReason::MemoryBudget) => End::MemoryBudget,
            Some(KickReason::Revoked) => End::Revoked,
            _ => End::SlowConsumer,
        }
    }

    async fn flush(&mut self, conn: &mut Conn, stop: &Stop<'_>) -> Result<(), End> {
        let packets = std::mem::take(&mut self.out);
        self.out_bytes = 0;
        let n = conn.write_packets(&packets, stop).await?;
        self.hub
            .stats
            .bytes_out
            .fetch_add(n as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Move backlog messages into outgoing packets while the window allows,
    /// up to about one write chunk. A QoS 0 message leaves the budget once
    /// it is packed for writing; a QoS 1/2 one when it is acknowledged.
    fn pump(&mut self, max_inflight: usize) {
        while let Some(msg) = self.backlog.front() {
            if self.out_bytes >= WRITE_CHUNK {
                break;
            }
            if msg.qos != QoS::AtMostOnce && self.inflight.len() >= max_inflight {
                break;
            }
            let Some(msg) = self.backlog.pop_front() else {
                break;
            };
            let t = self.hub.stats.topics.record(
                Direction::Out,
                &msg.topic,
                msg.topic.len() + msg.payload.len(),
            );
            if self.epoch.is_some() {
                self.clock.on_out(t, &msg.payload);
            }
            self.out_bytes += msg.topic.len() + msg.payload.len();
            let mut p = Publish::new(msg.topic.as_ref(), msg.qos, Vec::new());
            p.payload = msg.payload.clone();
            p.retain = msg.retain;
            if msg.qos == QoS::AtMostOnce {
                self.session.release(msg.cost());
            } else {
                p.pkid = self.alloc_pkid();
                self.inflight.push(InflightOut {
                    pkid: p.pkid,
                    msg,
                    released: false,
                });
            }
            self.hub.stats.messages_out.fetch_add(1, Ordering::Relaxed);
            self.out.push(Packet::Publish(p));
        }
    }

    /// Forget acknowledged in-flight messages matching `done`, giving their
    /// bytes back to the budget.
    fn acked(&mut self, done: impl Fn(&InflightOut) -> bool) {
        let session = &self.session;
        self.inflight.retain(|f| {
            let keep = !done(f);
            if !keep {
                session.release(f.msg.cost());
                if let Some(r) = &f.msg.receipt {
                    r.fire();
                }
            }
            keep
        });
    }

    fn alloc_pkid(&mut self) -> u16 {
        loop {
            let id = self.next_pkid;
            self.next_pkid = self.next_pkid.wrapping_add(1).max(1);
            if !self.inflight.iter().any(|f| f.pkid == id) {
                return id;
            }
        }
    }

    /// Handle one packet; Some(end) closes the connection.
    fn on_packet(&mut self, packet: Packet) -> Option<End> {
        if let Some(bucket) = &self.bucket {
            // Every packet a machine sends of its own accord costs it: a
            // SUBSCRIBE or UNSUBSCRIBE one token per filter, anything else
            // one. Acknowledgements of what the gateway sent are free: the
            // in-flight window bounds them, and the gateway may ping or
            // command a machine as often as it needs to.
            let cost = match &packet {
                Packet::PubAck(_) | Packet::PubRec(_) | Packet::PubComp(_) => 0,
                Packet::Subscribe(s) => s.filters.len(),
                Packet::Unsubscribe(u) => u.topics.len(),
                _ => 1,
            };
            if cost > 0 && !bucket.take(cost) {
                self.hub.stats.rate_limited.fetch_add(1, Ordering::Relaxed);
                if self.hub.log_gate.allow(self.peer.ip()) {
                    warn!(client_id = ?shown(&self.session.client_id), "machine over its packet rate; closing");
                }
                return Some(End::RateLimited);
            }
        }
        match packet {
            Packet::Publish(p) => return self.on_publish(p),
            Packet::PubAck(a) => {
                self.acked(|f| f.pkid == a.pkid && f.msg.qos == QoS::AtLeastOnce);
            }
            // Outbound QoS 2 (§4.3.3): PUBREC → we release with PUBREL (and
            // forget the message, it is delivered) → PUBCOMP ends the flow.
            Packet::PubRec(r) => {
                if let Some(f) = self
                    .inflight
                    .iter_mut()
                    .find(|f| f.pkid == r.pkid && f.msg.qos == QoS::ExactlyOnce)
                {
                    f.released = true;
                    let before = f.msg.cost();
                    f.msg.payload = Bytes::new();
                    self.session.release(before - f.msg.cost());
                }
                // Also for an unknown id: the client is waiting for PUBREL.
                self.out.push(Packet::PubRel(PubRel::new(r.pkid)));
            }
            Packet::PubComp(c) => {
                self.acked(|f| f.pkid == c.pkid && f.released);
            }
            Packet::PubRel(r) => {
                self.qos2_in.remove(&r.pkid);
                self.out.push(Packet::PubComp(PubComp::new(r.pkid)));
            }
            Packet::Subscribe(s) => {
                if s.filters.is_empty() {
                    return Some(End::Protocol("SUBSCRIBE without filters"));
                }
                return self.on_subscribe(s);
            }
            Packet::Unsubscribe(u) => {
                for f in &u.topics {
                    self.session.unsubscribe(f);
                }
                self.hub.router.service_subscriptions_changed(&self.session);
                self.out.push(Packet::UnsubAck(UnsubAck::new(u.pkid)));
            }
            Packet::PingReq => self.out.push(Packet::PingResp),
            Packet::Disconnect => return Some(End::Clean),
            Packet::Connect(_) => return Some(End::Protocol("second CONNECT")),
            // Server-to-client packets, or replies to QoS 2 we never send.
            Packet::ConnAck(_) | Packet::SubAck(_) | Packet::UnsubAck(_) | Packet::PingResp => {
                return Some(End::Protocol("unexpected packet type"))
            }
        }
        None
    }

    /// SUBSCRIBE: ACL, deny list and session limits per filter, then the
    /// retained messages of each granted filter, charged to the memory
    /// budget before they are built. A filter repeated within one SUBSCRIBE
    /// replaces its own subscription and replays nothing more.
    fn on_subscribe(&mut self, s: Subscribe) -> Option<End> {
        let mut codes = Vec::with_capacity(s.filters.len());
        let mut replayed: Vec<&str> = Vec::new();
        let mut retained = Vec::new();
        let mut log_once = true;
        for f in &s.filters {
            if !topic::valid_filter(&f.path) {
                codes.push(SubscribeReasonCode::Failure);
                continue;
            }
            if !may_subscribe(self.class, &f.path) {
                self.hub
                    .stats
                    .acl_violations
                    .fetch_add(1, Ordering::Relaxed);
                if std::mem::take(&mut log_once) && self.hub.log_gate.allow(self.peer.ip()) {
                    warn!(client_id = ?shown(&self.session.client_id), filter = ?shown(&f.path), "SUBSCRIBE refused by ACL");
                }
                codes.push(SubscribeReasonCode::Failure);
                continue;
            }
            // A filter wholly inside a denied one could never receive
            // anything: refused. A wider one is granted; the router withholds
            // the denied topics from it.
            if let Some(d) = self
                .hub
                .settings
                .deny_filters
                .iter()
                .find(|d| filter_within(&f.path, d))
            {
                self.hub
                    .stats
                    .denied_subscriptions
                    .fetch_add(1, Ordering::Relaxed);
                debug!(client_id = ?shown(&self.session.client_id), filter = ?shown(&f.path), deny = %d, "SUBSCRIBE refused by the deny list");
                codes.push(SubscribeReasonCode::Failure);
                continue;
            }
            let granted = f.qos;
            if let Err(why) = self.session.try_subscribe(&f.path, granted) {
                self.hub
                    .stats
                    .subscriptions_refused
                    .fetch_add(1, Ordering::Relaxed);
                if std::mem::take(&mut log_once) && self.hub.log_gate.allow(self.peer.ip()) {
                    warn!(client_id = ?shown(&self.session.client_id), filter = ?shown(&f.path), why = ?why, "SUBSCRIBE refused by the session's limits");
                }
                codes.push(SubscribeReasonCode::Failure);
                continue;
            }
            codes.push(SubscribeReasonCode::Success(granted));
            if replayed.contains(&f.path.as_str()) {
                continue;
            }
            replayed.push(&f.path);
            let room = self.session.memory_room();
            match self.hub.router.retained_within(&f.path, granted, room) {
                Some((msgs, cost)) if self.session.charge(cost) => retained.extend(msgs),
                _ => {
                    if self.hub.log_gate.allow(self.peer.ip()) {
                        warn!(client_id = ?shown(&self.session.client_id), filter = ?shown(&f.path), "retained messages for SUBSCRIBE exceed the connection's memory budget; closing");
                    }
                    return Some(End::MemoryBudget);
                }
            }
        }
        self.hub.router.service_subscriptions_changed(&self.session);
        self.out.push(Packet::SubAck(SubAck::new(s.pkid, codes)));
        self.backlog.extend(retained);
        None
    }

    fn on_publish(&mut self, p: Publish) -> Option<End> {
        self.hub.stats.messages_in.fetch_add(1, Ordering::Relaxed);
        self.hub
            .stats
            .bytes_in
            .fetch_add((p.topic.len() + p.payload.len()) as u64, Ordering::Relaxed);
        let parsed =
            self.hub
                .stats
                .topics
                .record(Direction::In, &p.topic, p.topic.len() + p.payload.len());
        // §4.7.3: a topic name is non-empty and has no wildcards. The codec has
        // already checked UTF-8; routing never byte-slices topics.
        if !topic::valid_publish_topic(&p.topic) {
            return Some(End::Protocol("invalid topic name"));
        }
        if !may_publish(self.class, &p.topic) {
            self.hub
                .stats
                .acl_violations
                .fetch_add(1, Ordering::Relaxed);
            if self.hub.log_gate.allow(self.peer.ip()) {
                warn!(client_id = ?shown(&self.session.client_id), topic = ?shown(&p.topic), "PUBLISH refused by ACL; closing");
            }
            return Some(End::Acl);
        }
        if self.epoch.is_some() {
            self.clock
                .on_in(&self.hub.stats.timings, parsed, &p.payload);
        }
        match p.qos {
            QoS::AtMostOnce => self.route(p),
            QoS::AtLeastOnce => {
                let pkid = p.pkid;
                self.route(p);
                self.out.push(Packet::PubAck(PubAck::new(pkid)));
            }
            QoS::ExactlyOnce => {
                let pkid = p.pkid;
                if !self.qos2_in.contains(&pkid) {
                    if self.qos2_in.len() >= usize::from(self.hub.settings.max_inflight.max(1)) {
                        warn!(client_id = ?shown(&self.session.client_id), "too many unreleased QoS 2 publishes; closing");
                        return Some(End::InflightExceeded);
                    }
                    self.qos2_in.insert(pkid);
                    self.route(p);
                }
                self.out.push(Packet::PubRec(PubRec::new(pkid)));
            }
        }
        None
    }

    fn route(&mut self, p: Publish) {
        if let Some((m, epoch)) = self.epoch {
            match topic::parse(&p.topic) {
                Some(Topic::Uplink(tm, kind)) if tm == m => {
                    self.hub.uplinks.on_uplink(m, epoch, kind, &p.payload);
                }
                // Under its own prefix (the ACL let it through) but not one of
                // its uplinks (PROTOCOL.md): its own command topic, which
                // service clients would take for a command the gateway sent,
                // or a topic no firmware should use. Dropped and counted; the
                // connection stays, so a firmware bug does not become a
                // reconnect loop.
                _ => {
                    self.hub
                        .stats
                        .acl_violations
                        .fetch_add(1, Ordering::Relaxed);
                    debug!(machine_no = %m, topic = ?shown(&p.topic), "machine PUBLISH on a topic that is not one of its uplinks; dropped");
                    return;
                }
            }
        }
        let payload: Bytes = p.payload;
        let retain = p.retain && retainable(&self.hub, self.class, &payload);
        if self.epoch.is_some() {
            if let Some(f) = self.hub.forwarder.get() {
                f.forward(&p.topic, &payload, p.qos, retain);
            }
        }
        self.hub.router.publish(&p.topic, payload, p.qos, retain);
    }
}

async fn sleep_opt(deadline: Option<Instant>) {
    match deadline {
        Some(d) => sleep_until(d).await,
        None => std::future::pending().await,
    }
}
