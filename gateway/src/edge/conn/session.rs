//! The established session loop, from CONNACK to close: reads packets and
//! answers them (ACL and deny list on every PUBLISH and SUBSCRIBE, QoS 0/1/2
//! both ways, the machine's packet rate), writes what the router queued
//! through a bounded in-flight window, and enforces keep alive on what the
//! client *sends*.

use std::collections::{HashSet, VecDeque};
use std::future::poll_fn;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rumqttc::mqttbytes::v4::{
    Packet, PubAck, PubComp, PubRec, PubRel, Publish, SubAck, Subscribe, SubscribeReasonCode,
    UnsubAck,
};
use rumqttc::mqttbytes::QoS;
use tokio::time::{sleep_until, Instant};
use tracing::{debug, warn};
use vendgate_proto::machine::MachineNo;
use vendgate_proto::topic::{self, Topic};

use super::super::acl::{may_publish, may_retain, may_subscribe, ClientClass};
use super::super::limits::MachineBucket;
use super::super::router::{filter_within, InflightOut, KickReason, Outbound, OutboxRx, Session};
use super::super::Hub;
use super::close::{CloseReason, StopSignals};
use super::framed::{Framed, ReadError, WRITE_CHUNK};
use super::labels::shown;
use crate::edge::stats::{Direction, DispenseClock};

/// Per-connection protocol state after a successful CONNECT.
pub(super) struct SessionLoop {
    pub(super) hub: Arc<Hub>,
    /// The router's half of this session: subscriptions, memory budget, the
    /// queue the router fills.
    pub(super) session: Arc<Session>,
    pub(super) class: ClientClass,
    pub(super) epoch: Option<(MachineNo, u64)>,
    pub(super) keep_alive: Option<Duration>,
    pub(super) last_rx: Instant,
    /// Our QoS 1/2 publishes not yet acknowledged, in send order (at most
    /// `max_inflight`, so a linear search is cheap).
    pub(super) inflight: Vec<InflightOut>,
    pub(super) next_pkid: u16,
    /// Packet ids of the client's QoS 2 publishes between PUBREC and PUBREL;
    /// a duplicate id in that window is not routed again (exactly once).
    pub(super) qos2_in: HashSet<u16>,
    /// Messages waiting for room in the in-flight window or for the next
    /// write (retained messages on subscribe, and what the channel
    /// delivered). Charged against the session's memory budget.
    pub(super) backlog: VecDeque<Outbound>,
    /// Packets to write at the end of this turn: at most about
    /// [`WRITE_CHUNK`] bytes of publishes (`out_bytes`) plus acknowledgements.
    pub(super) out: Vec<Packet>,
    pub(super) out_bytes: usize,
    /// A machine's dispense round trip, for the timing histograms.
    pub(super) clock: DispenseClock,
    /// The machine's packet-rate bucket (None for services: trusted, not
    /// limited).
    pub(super) bucket: Option<Arc<MachineBucket>>,
    pub(super) peer: SocketAddr,
}

/// The packet that resumes one unacknowledged outbound message.
pub(super) fn redelivery(f: &InflightOut) -> Packet {
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

/// [`may_retain`], counting what it refuses: the message is still delivered,
/// only not kept.
pub(super) fn retain_allowed(hub: &Hub, class: ClientClass, payload: &[u8]) -> bool {
    let ok = may_retain(class, payload);
    if !ok {
        hub.router
            .stats
            .retained_refused
            .fetch_add(1, Ordering::Relaxed);
    }
    ok
}

impl SessionLoop {
    pub(super) async fn run(&mut self, framed: &mut Framed, rx: &mut OutboxRx) -> CloseReason {
        let shutdown = self.hub.shutdown.clone();
        let kicked = self.session.kicked().clone();
        let stop = StopSignals {
            shutdown: &shutdown,
            kicked: &kicked,
        };
        let max_inflight = usize::from(self.hub.settings.max_inflight.max(1));
        // Made once, not per turn: a fresh `cancelled()` registers (and on
        // drop unregisters) a waiter under the token's lock, and a fresh
        // sleep inserts (and removes) a timer entry, on every message. The
        // kick is a child of the shutdown token (`Session::with_stop_parent`),
        // so one waiter covers both. The socket and the queue are polled
        // (`poll_fn`) rather than awaited through futures, so an idle
        // connection's task holds no waiter state for them.
        let kicked_wait = kicked.cancelled();
        tokio::pin!(kicked_wait);
        // Keep alive: armed at the deadline known now; when it fires, the
        // deadline is measured again from the last packet received and the
        // timer re-armed if that moved it. An active connection thus touches
        // the timer once per keep-alive period, not once per packet.
        let ka_timer = sleep_until(self.keep_alive.map_or(self.last_rx, |k| self.last_rx + k));
        tokio::pin!(ka_timer);
        loop {
            // One chunk per turn, so reads (acks, PINGREQ) and kicks are
            // served between the chunks of a long backlog.
            self.pump(max_inflight);
            if !self.out.is_empty() {
                if let Err(reason) = self.flush(framed, &stop).await {
                    return self.stopped(reason);
                }
            }
            let window_open = self.inflight.len() < max_inflight;
            let more = self
                .backlog
                .front()
                .is_some_and(|m| m.qos == QoS::AtMostOnce || window_open);
            tokio::select! {
                biased;
                _ = &mut kicked_wait => {
                    if shutdown.is_cancelled() {
                        return CloseReason::Shutdown;
                    }
                    return self.stopped(CloseReason::TakeOver);
                }
                r = poll_fn(|cx| framed.stream.poll_read_ready(cx)) => {
                    if r.is_err() {
                        return CloseReason::SocketClosed;
                    }
                    match framed.try_fill() {
                        Ok(true) => {}
                        Ok(false) => continue,
                        Err(ReadError::Eof) => return CloseReason::SocketClosed,
                        Err(ReadError::Malformed(w)) => return CloseReason::Protocol(w),
                        Err(ReadError::TooLarge) => return CloseReason::TooLarge,
                    }
                    self.last_rx = Instant::now();
                    // Decided here, awaited below: a packet (or the read's
                    // result) alive across the flush's await would be
                    // stored in every connection's task.
                    let closing = loop {
                        match framed.next_packet() {
                            Ok(Some(p)) => {
                                if let Some(reason) = self.on_packet(p) {
                                    break Some(reason);
                                }
                            }
                            Ok(None) => break None,
                            Err(ReadError::Malformed(w)) => return CloseReason::Protocol(w),
                            Err(ReadError::TooLarge) => return CloseReason::TooLarge,
                            Err(ReadError::Eof) => return CloseReason::SocketClosed,
                        }
                    };
                    if let Some(reason) = closing {
                        // Flush acknowledgements already queued (e.g. a
                        // PUBACK before a clean DISCONNECT).
                        if !self.out.is_empty() {
                            let _ = self.flush(framed, &stop).await;
                        }
                        return reason;
                    }
                    if let Some((m, _)) = self.epoch {
                        self.hub.presence.touch(&m);
                    }
                }
                Some(msg) = poll_fn(|cx| rx.poll_recv(cx)), if window_open && self.backlog.is_empty() => {
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
                _ = &mut ka_timer, if self.keep_alive.is_some() => {
                    let Some(k) = self.keep_alive else { continue };
                    let deadline = self.last_rx + k;
                    if Instant::now() >= deadline {
                        return CloseReason::KeepAlive;
                    }
                    ka_timer.as_mut().reset(deadline);
                }
            }
        }
    }

    /// How a connection stopped from outside ends: the kick's reason.
    fn stopped(&self, reason: CloseReason) -> CloseReason {
        if reason != CloseReason::TakeOver {
            return reason;
        }
        match self.session.kick_reason() {
            Some(KickReason::TakeOver) => CloseReason::TakeOver,
            Some(KickReason::MemoryBudget) => CloseReason::MemoryBudget,
            Some(KickReason::Revoked) => CloseReason::Revoked,
            _ => CloseReason::SlowConsumer,
        }
    }

    pub(super) async fn flush(
        &mut self,
        framed: &mut Framed,
        stop: &StopSignals<'_>,
    ) -> Result<(), CloseReason> {
        let packets = std::mem::take(&mut self.out);
        self.out_bytes = 0;
        let n = framed.write_packets(&packets, stop).await?;
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

    /// Handle one packet; Some(reason) closes the connection.
    fn on_packet(&mut self, packet: Packet) -> Option<CloseReason> {
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
                return Some(CloseReason::RateLimited);
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
                    return Some(CloseReason::Protocol("SUBSCRIBE without filters"));
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
            Packet::Disconnect => return Some(CloseReason::Clean),
            Packet::Connect(_) => return Some(CloseReason::Protocol("second CONNECT")),
            // Server-to-client packets, or replies to QoS 2 we never send.
            Packet::ConnAck(_) | Packet::SubAck(_) | Packet::UnsubAck(_) | Packet::PingResp => {
                return Some(CloseReason::Protocol("unexpected packet type"))
            }
        }
        None
    }

    /// SUBSCRIBE: ACL, deny list and session limits per filter, then the
    /// retained messages of each granted filter, charged to the memory
    /// budget before they are built. A filter repeated within one SUBSCRIBE
    /// replaces its own subscription and replays nothing more.
    fn on_subscribe(&mut self, s: Subscribe) -> Option<CloseReason> {
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
                    return Some(CloseReason::MemoryBudget);
                }
            }
        }
        self.hub.router.service_subscriptions_changed(&self.session);
        self.out.push(Packet::SubAck(SubAck::new(s.pkid, codes)));
        self.backlog.extend(retained);
        None
    }

    fn on_publish(&mut self, p: Publish) -> Option<CloseReason> {
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
            return Some(CloseReason::Protocol("invalid topic name"));
        }
        if !may_publish(self.class, &p.topic) {
            self.hub
                .stats
                .acl_violations
                .fetch_add(1, Ordering::Relaxed);
            if self.hub.log_gate.allow(self.peer.ip()) {
                warn!(client_id = ?shown(&self.session.client_id), topic = ?shown(&p.topic), "PUBLISH refused by ACL; closing");
            }
            return Some(CloseReason::Acl);
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
                        return Some(CloseReason::InflightExceeded);
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
        let retain = p.retain && retain_allowed(&self.hub, self.class, &payload);
        if self.epoch.is_some() {
            if let Some(f) = self.hub.forwarder.as_ref() {
                f.forward(&p.topic, &payload, p.qos, retain);
            }
        }
        self.hub.router.publish(&p.topic, payload, p.qos, retain);
    }
}
