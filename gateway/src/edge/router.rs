//! The hub's message routing: who is subscribed to what, the retained store,
//! and fan-out of one PUBLISH to every matching session.
//!
//! Machines only ever subscribe under their own prefix, so a topic under
//! `vend/v1/{m}/` reaches at most one machine session (looked up by key, O(1));
//! service sessions are few and are scanned. A 10,000-machine fleet therefore
//! costs nothing per publish beyond the service scan.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use bytes::Bytes;
use dashmap::DashMap;
use rumqttc::mqttbytes::QoS;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use vendgate_proto::machine::MachineNo;
use vendgate_proto::topic;

/// Who a connection is, decided once at CONNECT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientClass {
    /// A vending machine: may publish and subscribe under its own prefix only.
    Machine(MachineNo),
    /// A trusted integration: anything, but read-only under `vend/v1/`.
    Service,
}

/// One message on its way to one client.
#[derive(Debug, Clone)]
pub struct Outbound {
    pub topic: Arc<str>,
    pub payload: Bytes,
    pub qos: QoS,
    pub retain: bool,
}

/// Why the hub closed a connection from the outside.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KickReason {
    TakeOver,
    SlowConsumer,
}

/// The shared half of a live connection: what the router needs to reach it.
#[derive(Debug)]
pub struct Session {
    pub conn_id: u64,
    pub client_id: String,
    pub class: ClientClass,
    subs: Mutex<Vec<(String, QoS)>>,
    tx: mpsc::Sender<Box<Outbound>>,
    kick: CancellationToken,
    kick_reason: Mutex<Option<KickReason>>,
}

impl Session {
    pub fn new(
        conn_id: u64,
        client_id: String,
        class: ClientClass,
        tx: mpsc::Sender<Box<Outbound>>,
    ) -> Self {
        Self {
            conn_id,
            client_id,
            class,
            subs: Mutex::new(Vec::new()),
            tx,
            kick: CancellationToken::new(),
            kick_reason: Mutex::new(None),
        }
    }

    /// Close this connection from outside (take-over, slow consumer).
    pub fn kick(&self, reason: KickReason) {
        if let Ok(mut r) = self.kick_reason.lock() {
            r.get_or_insert(reason);
        }
        self.kick.cancel();
    }

    pub fn kicked(&self) -> &CancellationToken {
        &self.kick
    }

    pub fn kick_reason(&self) -> Option<KickReason> {
        self.kick_reason.lock().ok().and_then(|r| *r)
    }

    /// Highest QoS granted by any of this session's filters matching `topic`.
    fn granted(&self, topic_name: &str) -> Option<QoS> {
        let subs = self.subs.lock().ok()?;
        subs.iter()
            .filter(|(f, _)| topic::filter_matches(f, topic_name))
            .map(|(_, q)| *q)
            .max_by_key(|q| *q as u8)
    }

    pub fn has_subscriptions(&self) -> bool {
        self.subs.lock().map(|s| !s.is_empty()).unwrap_or(false)
    }

    /// Add or replace (same filter) a subscription.
    pub fn subscribe(&self, filter: &str, qos: QoS) {
        if let Ok(mut subs) = self.subs.lock() {
            match subs.iter_mut().find(|(f, _)| f == filter) {
                Some(s) => s.1 = qos,
                None => subs.push((filter.to_owned(), qos)),
            }
        }
    }

    pub fn unsubscribe(&self, filter: &str) {
        if let Ok(mut subs) = self.subs.lock() {
            subs.retain(|(f, _)| f != filter);
        }
    }

    /// Queue a message; false when the connection cannot keep up.
    fn offer(&self, msg: Outbound) -> bool {
        // Boxed: a channel allocates its slots in blocks of 32 up front, and
        // 32 pointers cost an idle connection far less than 32 messages.
        match self.tx.try_send(Box::new(msg)) {
            Ok(()) => true,
            // Closed: the connection is ending anyway; not a slow consumer.
            Err(mpsc::error::TrySendError::Closed(_)) => true,
            Err(mpsc::error::TrySendError::Full(_)) => false,
        }
    }
}

/// The outcome of a publish for the one machine a command is addressed to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MachineDelivery {
    /// Queued on the machine's connection.
    Queued,
    /// No live connection for that machine.
    NotConnected,
    /// Connected but not (yet) subscribed to the topic.
    NotSubscribed,
    /// Its outbound queue is full; the connection is being closed.
    Backpressure,
    /// The topic is not under any machine's prefix.
    NotAMachineTopic,
}

/// Routing counters (exported as metrics later).
#[derive(Debug, Default)]
pub struct RouterStats {
    pub delivered: AtomicU64,
    pub slow_consumers: AtomicU64,
    pub retained_refused: AtomicU64,
}

/// Sessions by client id, service subscribers, and retained messages.
#[derive(Debug)]
pub struct Router {
    sessions: DashMap<String, Arc<Session>>,
    /// Service sessions that hold at least one subscription.
    service_subscribers: RwLock<HashMap<u64, Arc<Session>>>,
    /// Ordered, so a subscription only scans the topics under its literal
    /// prefix: 10,000 machines each subscribing to their own commands must
    /// not each scan every machine's retained state (measured: that scan was
    /// most of a reconnect storm's CPU).
    retained: RwLock<BTreeMap<String, (Bytes, QoS)>>,
    max_retained: usize,
    pub stats: RouterStats,
}

impl Router {
    pub fn new(max_retained: usize) -> Self {
        Self {
            sessions: DashMap::new(),
            service_subscribers: RwLock::new(HashMap::new()),
            retained: RwLock::new(BTreeMap::new()),
            max_retained,
            stats: RouterStats::default(),
        }
    }

    /// Register a new session under its client id, kicking the previous one
    /// (MQTT take-over). Returns true when a live session was taken over.
    pub fn register(&self, session: Arc<Session>) -> bool {
        let previous = self.sessions.insert(session.client_id.clone(), session);
        match previous {
            Some(old) => {
                old.kick(KickReason::TakeOver);
                self.forget_service(old.conn_id);
                true
            }
            None => false,
        }
    }

    /// Remove a session if it is still the registered one for its client id.
    pub fn unregister(&self, session: &Session) {
        self.sessions
            .remove_if(&session.client_id, |_, s| s.conn_id == session.conn_id);
        self.forget_service(session.conn_id);
    }

    fn forget_service(&self, conn_id: u64) {
        if let Ok(mut m) = self.service_subscribers.write() {
            m.remove(&conn_id);
        }
    }

    /// A service session's subscription set changed.
    pub fn service_subscriptions_changed(&self, session: &Arc<Session>) {
        if session.class != ClientClass::Service {
            return;
        }
        // Only index sessions that are still the registered one.
        let current = self
            .sessions
            .get(&session.client_id)
            .is_some_and(|s| s.conn_id == session.conn_id);
        if let Ok(mut m) = self.service_subscribers.write() {
            if current && session.has_subscriptions() {
                m.insert(session.conn_id, session.clone());
            } else {
                m.remove(&session.conn_id);
            }
        }
    }

    pub fn session_count(&self) -> usize {
        self.sessions.len()
    }

    /// Route one message. Retained handling follows MQTT 3.1.1 §3.3.1.3: a
    /// retained message with an empty payload clears the topic. Returns the
    /// delivery outcome for the machine whose prefix the topic is under.
    pub fn publish(
        &self,
        topic_name: &str,
        payload: Bytes,
        qos: QoS,
        retain: bool,
    ) -> MachineDelivery {
        if retain {
            self.retain(topic_name, &payload, qos);
        }
        let topic_arc: Arc<str> = Arc::from(topic_name);
        let make = |granted: QoS| Outbound {
            topic: topic_arc.clone(),
            payload: payload.clone(),
            qos: min_qos(qos, granted),
            // §3.3.1.3: messages forwarded to existing subscribers carry retain 0.
            retain: false,
        };

        let machine = match topic::machine_of(topic_name) {
            None => MachineDelivery::NotAMachineTopic,
            Some(m) => match self.sessions.get(m.as_str()).map(|s| s.clone()) {
                Some(s) if s.class == ClientClass::Machine(m) => match s.granted(topic_name) {
                    Some(g) => {
                        if s.offer(make(g)) {
                            self.stats.delivered.fetch_add(1, Ordering::Relaxed);
                            MachineDelivery::Queued
                        } else {
                            self.slow(&s);
                            MachineDelivery::Backpressure
                        }
                    }
                    None => MachineDelivery::NotSubscribed,
                },
                _ => MachineDelivery::NotConnected,
            },
        };

        let services: Vec<Arc<Session>> = match self.service_subscribers.read() {
            Ok(m) if !m.is_empty() => m.values().cloned().collect(),
            _ => Vec::new(),
        };
        for s in services {
            if let Some(g) = s.granted(topic_name) {
                if s.offer(make(g)) {
                    self.stats.delivered.fetch_add(1, Ordering::Relaxed);
                } else {
                    self.slow(&s);
                }
            }
        }
        machine
    }

    fn slow(&self, s: &Arc<Session>) {
        self.stats.slow_consumers.fetch_add(1, Ordering::Relaxed);
        s.kick(KickReason::SlowConsumer);
    }

    fn retain(&self, topic_name: &str, payload: &Bytes, qos: QoS) {
        let Ok(mut r) = self.retained.write() else {
            return;
        };
        if payload.is_empty() {
            r.remove(topic_name);
        } else if r.len() < self.max_retained || r.contains_key(topic_name) {
            // Copy: the payload is a view into the connection's read buffer,
            // and a retained message must not pin that whole buffer for as
            // long as it is kept (one per machine).
            r.insert(
                topic_name.to_owned(),
                (Bytes::copy_from_slice(payload), qos),
            );
        } else {
            self.stats.retained_refused.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Retained messages matching a new subscription (sent with retain = 1).
    pub fn retained_for(&self, filter: &str, granted: QoS) -> Vec<Outbound> {
        let Ok(r) = self.retained.read() else {
            return Vec::new();
        };
        // Every matching topic starts with the filter's text before its
        // first wildcard.
        let prefix = filter.find(['+', '#']).map_or(filter, |i| &filter[..i]);
        r.range::<str, _>((
            std::ops::Bound::Included(prefix),
            std::ops::Bound::Unbounded,
        ))
        .take_while(|(t, _)| t.starts_with(prefix))
        .filter(|(t, _)| topic::filter_matches(filter, t))
        .map(|(t, (p, q))| Outbound {
            topic: Arc::from(t.as_str()),
            payload: p.clone(),
            qos: min_qos(*q, granted),
            retain: true,
        })
        .collect()
    }
}

pub fn min_qos(a: QoS, b: QoS) -> QoS {
    if (a as u8) <= (b as u8) {
        a
    } else {
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session(
        id: u64,
        client: &str,
        class: ClientClass,
    ) -> (Arc<Session>, mpsc::Receiver<Box<Outbound>>) {
        let (tx, rx) = mpsc::channel(4);
        (Arc::new(Session::new(id, client.into(), class, tx)), rx)
    }

    #[test]
    fn machine_receives_only_subscribed_commands() {
        let r = Router::new(10);
        let m: MachineNo = "12345678".parse().unwrap();
        let (s, mut rx) = session(1, "12345678", ClientClass::Machine(m));
        r.register(s.clone());
        let t = "vend/v1/12345678/cmd/ping";
        assert_eq!(
            r.publish(t, Bytes::from_static(b"{}"), QoS::AtLeastOnce, false),
            MachineDelivery::NotSubscribed
        );
        s.subscribe("vend/v1/12345678/cmd/#", QoS::AtLeastOnce);
        assert_eq!(
            r.publish(t, Bytes::from_static(b"{}"), QoS::AtLeastOnce, false),
            MachineDelivery::Queued
        );
        assert_eq!(rx.try_recv().unwrap().qos, QoS::AtLeastOnce);
        assert_eq!(
            r.publish(
                "vend/v1/87654321/cmd/ping",
                Bytes::new(),
                QoS::AtLeastOnce,
                false
            ),
            MachineDelivery::NotConnected
        );
    }

    #[test]
    fn take_over_kicks_old_and_stale_unregister_keeps_new() {
        let r = Router::new(10);
        let (a, _ra) = session(1, "svc", ClientClass::Service);
        let (b, _rb) = session(2, "svc", ClientClass::Service);
        assert!(!r.register(a.clone()));
        assert!(r.register(b.clone()));
        assert_eq!(a.kick_reason(), Some(KickReason::TakeOver));
        r.unregister(&a);
        assert_eq!(r.session_count(), 1);
        r.unregister(&b);
        assert_eq!(r.session_count(), 0);
    }

    #[test]
    fn retained_set_clear_and_qos_downgrade() {
        let r = Router::new(1);
        r.publish("a/b", Bytes::from_static(b"x"), QoS::AtLeastOnce, true);
        r.publish("a/c", Bytes::from_static(b"y"), QoS::AtLeastOnce, true);
        assert_eq!(r.stats.retained_refused.load(Ordering::Relaxed), 1);
        let got = r.retained_for("a/#", QoS::AtMostOnce);
        assert_eq!(got.len(), 1);
        assert!(got[0].retain);
        assert_eq!(got[0].qos, QoS::AtMostOnce);
        r.publish("a/b", Bytes::new(), QoS::AtMostOnce, true);
        assert!(r.retained_for("#", QoS::AtLeastOnce).is_empty());
    }

    #[test]
    fn retained_lookup_by_prefix_finds_exactly_the_matches() {
        let r = Router::new(100);
        for t in ["a/b", "a/c/d", "a/cc/d", "b/x", "é/x", "$SYS/x"] {
            r.publish(t, Bytes::from_static(b"1"), QoS::AtMostOnce, true);
        }
        let topics = |f: &str| {
            let mut v: Vec<String> = r
                .retained_for(f, QoS::AtMostOnce)
                .iter()
                .map(|o| o.topic.to_string())
                .collect();
            v.sort();
            v
        };
        assert_eq!(topics("a/+/d"), vec!["a/c/d", "a/cc/d"]);
        assert_eq!(topics("a/b"), vec!["a/b"]);
        assert_eq!(topics("é/#"), vec!["é/x"]);
        assert_eq!(
            topics("#").len(),
            5,
            "$ topics are not matched by a leading wildcard"
        );
        assert!(topics("c/#").is_empty());
    }

    #[test]
    fn full_queue_kicks_slow_service_consumer() {
        let r = Router::new(10);
        let (s, _rx) = session(1, "svc", ClientClass::Service);
        r.register(s.clone());
        s.subscribe("#", QoS::AtMostOnce);
        r.service_subscriptions_changed(&s);
        for _ in 0..5 {
            r.publish("x", Bytes::from_static(b"1"), QoS::AtMostOnce, false);
        }
        assert_eq!(s.kick_reason(), Some(KickReason::SlowConsumer));
    }
}
