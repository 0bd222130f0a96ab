//! From TCP accept to CONNACK: the TLS handshake, CONNECT within the
//! connect deadline, the failed-auth throttle, authentication, the checks
//! on client id, will and packet rate, and the refusals (a CONNACK code, or
//! closing without one). An accepted CONNECT registers the session with the
//! router and yields an [`Established`] connection.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use rumqttc::mqttbytes::v4::{ConnAck, Connect, ConnectReturnCode, LastWill, Packet};
use rumqttc::mqttbytes::{Error as CodecError, Protocol};
use tokio::net::TcpStream;
use tokio::time::{timeout_at, Instant};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use vendgate_proto::topic;

use super::super::acl::{is_own_uplink, may_publish, ClientClass};
use super::super::limits::ConnSlot;
use super::super::router::{outbox, service_key, Outbound, OutboxRx, Session, SessionBudget};
use super::super::stream::Stream;
use super::super::Hub;
use super::close::StopSignals;
use super::framed::{Framed, ReadError, READ_CHUNK};
use super::labels::{client_kind, machine_label, shown};
use super::session::{redelivery, SessionLoop};
use crate::edge::stats::DispenseClock;

/// A connection past CONNACK: what its session task needs. It lives in
/// the task for as long as the connection, so it holds nothing twice (the
/// hub, the session, the peer and the epoch are in `state`) and the rarely
/// present will is boxed.
pub(super) struct Established {
    /// Frees the connection's place under `max_connections` when dropped.
    pub(super) slot: ConnSlot,
    pub(super) framed: Framed,
    pub(super) state: SessionLoop,
    pub(super) rx: OutboxRx,
    pub(super) last_will: Option<Box<LastWill>>,
}

/// Why CONNECT did not arrive as a CONNECT the edge serves.
enum ConnectError {
    /// Answer with this CONNACK code, then close.
    Refuse(ConnectReturnCode),
    /// Close without CONNACK (§3.1.4: not a CONNECT, or malformed).
    Drop(&'static str),
}

/// Why a connection closed on an oversized packet (also counted apart).
const TOO_LARGE: &str = "packet too large";

/// The TLS handshake (on the TLS listener), CONNECT, authentication and
/// registration of one accepted TCP connection. `slot` is the connection's
/// place under `max_connections`, held until the connection ends.
pub(super) async fn handshake(
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
    let mut framed = Framed::new(
        stream,
        hub.settings
            .max_connect_size
            .min(hub.settings.max_packet_size),
    );

    // The pre-CONNECT and authentication futures are boxed: they are large
    // (the storage lookup especially) and live only until CONNACK, while an
    // async fn's state is as large as its largest await point for as long as
    // the connection lives.
    let connect = match timeout_at(deadline, Box::pin(read_connect(&mut framed))).await {
        Ok(Ok(c)) => c,
        Ok(Err(ConnectError::Refuse(code))) => {
            refuse(&mut framed, &hub, code).await;
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
            refuse(&mut framed, &hub, ConnectReturnCode::NotAuthorized).await;
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
            refuse(&mut framed, &hub, refusal.code()).await;
            return None;
        }
    };

    // Client id rules (§3.1.3.1): an empty id is allowed only with a clean
    // session, and then the server assigns one.
    let conn_id = hub.next_conn_id();
    let client_id = if connect.client_id.is_empty() {
        if !connect.clean_session {
            hub.stats.connections.refused("bad_client_id", None);
            refuse(&mut framed, &hub, ConnectReturnCode::BadClientId).await;
            return None;
        }
        format!("vendgate-auto-{conn_id}")
    } else {
        connect.client_id.clone()
    };

    // The will is published by the hub on the client's behalf, so it must obey
    // the same ACL as the client's own publishes, and for a machine be one of
    // its uplinks: the only topics of its prefix that the session routes.
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
            refuse(&mut framed, &hub, ConnectReturnCode::NotAuthorized).await;
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
                refuse(&mut framed, &hub, ConnectReturnCode::ServiceUnavailable).await;
                return None;
            }
            Some(b)
        }
        ClientClass::Service => None,
    };

    // Keep only the will: the rest of CONNECT (the password included) must
    // not live as long as the connection.
    let last_will = connect.last_will.map(Box::new);
    let (tx, rx) = outbox(hub.settings.outbound_queue.max(1));
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
    let mut session = Session::new(conn_id, client_id.clone(), class, persistent, tx)
        .with_budget(budget)
        .with_stop_parent(&hub.shutdown);
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
        refuse(&mut framed, &hub, ConnectReturnCode::ServiceUnavailable).await;
        return None;
    }
    let session = Arc::new(session);
    // Cluster mode: the epoch comes from the cluster before anything local
    // changes, so a refused CONNECT leaves the old session alone.
    let cluster_epoch = match (class, hub.epochs.as_ref()) {
        (ClientClass::Machine(m), Some(source)) => match source.acquire(m).await {
            Some(e) => Some(e),
            None => {
                warn!(%peer, client_id = ?shown(&client_id), "MQTT CONNECT refused: no cluster epoch (database unreachable)");
                hub.stats.connect_refused.fetch_add(1, Ordering::Relaxed);
                hub.stats.connections.refused("unavailable", None);
                refuse(&mut framed, &hub, ConnectReturnCode::ServiceUnavailable).await;
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
    framed.max_packet = hub.settings.max_packet_size;
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
    let mut state = SessionLoop {
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
        slot,
        framed,
        state,
        rx,
        last_will,
    })
}

/// Read the first packet, which must be an MQTT 3.1.1 CONNECT.
async fn read_connect(framed: &mut Framed) -> Result<Connect, ConnectError> {
    loop {
        // Refuse a first packet that is not CONNECT before reading its body,
        // whatever length it announces.
        if let Some(b) = framed.rbuf.first() {
            if b >> 4 != 1 {
                return Err(ConnectError::Drop("first packet is not CONNECT"));
            }
        }
        match Packet::read(&mut framed.rbuf, framed.max_packet) {
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
        match framed.fill().await {
            Ok(()) => {}
            Err(ReadError::Eof) => return Err(ConnectError::Drop("closed before CONNECT")),
            Err(ReadError::Malformed(w)) => return Err(ConnectError::Drop(w)),
            Err(ReadError::TooLarge) => return Err(ConnectError::Drop(TOO_LARGE)),
        }
    }
}

/// Answer CONNECT with a refusal (session present is always 0 then,
/// §3.2.2.2); the connection is closed by the caller returning.
async fn refuse(framed: &mut Framed, hub: &Hub, code: ConnectReturnCode) {
    let never = CancellationToken::new();
    let stop = StopSignals {
        shutdown: &hub.shutdown,
        kicked: &never,
    };
    let _ = framed
        .write_packets(&[Packet::ConnAck(ConnAck::new(code, false))], &stop)
        .await;
}
