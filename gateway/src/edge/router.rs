//! The hub's message routing: who is subscribed to what, the retained store,
//! the persistent (clean_session = 0) sessions of clients that are away, and
//! fan-out of one PUBLISH to every matching session.
//!
//! Machines only ever subscribe under their own prefix, so a topic under
//! `vend/v1/{m}/` reaches at most one machine session (looked up by key, O(1));
//! service sessions are few and are scanned. A 10,000-machine fleet therefore
//! costs nothing per publish beyond the service scan.
//!
//! Everything a client can make the hub hold is bounded: subscriptions per
//! session (count and bytes; an identical filter replaces the existing one),
//! each connection's memory (messages queued or in flight to it, retained
//! messages replayed to it, its subscriptions: [`Session::charge`]), parked
//! sessions (messages and bytes), and the retained store (entries, bytes,
//! bytes per message). Topics matching `mqtt.deny_filters` are delivered to
//! nobody, so a wide subscription that overlaps a denied filter is granted
//! and simply never sees the denied topics.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

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
    /// Fired when the client acknowledges this message (QoS 1 PUBACK).
    pub receipt: Option<Receipt>,
}

/// Tells a sender that its QoS 1 message reached the client: the machine's
/// PUBACK, not the moment it was queued.
#[derive(Debug, Clone)]
pub struct Receipt(Arc<std::sync::Mutex<Option<tokio::sync::oneshot::Sender<()>>>>);

impl Receipt {
    pub fn new() -> (Self, tokio::sync::oneshot::Receiver<()>) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        (Self(Arc::new(std::sync::Mutex::new(Some(tx)))), rx)
    }

    pub fn fire(&self) {
        let tx = self.0.lock().ok().and_then(|mut t| t.take());
        if let Some(tx) = tx {
            let _ = tx.send(());
        }
    }
}

impl Outbound {
    /// What this message counts against its connection's memory budget.
    pub fn cost(&self) -> usize {
        message_cost(&self.topic, self.payload.len())
    }
}

/// Bytes a queued message is charged: topic, payload and the bookkeeping
/// around them (the box, the packet, the queue slot).
pub fn message_cost(topic: &str, payload_len: usize) -> usize {
    const OVERHEAD: usize = 64;
    topic.len() + payload_len + OVERHEAD
}

/// Why the hub closed a connection from the outside.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KickReason {
    TakeOver,
    SlowConsumer,
    /// Its connection's memory budget was exhausted.
    MemoryBudget,
    /// Its account was disabled or removed (`edge::enforce`).
    Revoked,
}

/// Why a SUBSCRIBE filter was refused by the session's limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubscribeRefusal {
    /// `max_subscriptions` (or `machine_max_subscriptions`) reached.
    Count,
    /// `max_subscription_bytes` reached.
    Bytes,
    /// The connection's memory budget has no room for it.
    Memory,
}

/// Per-session limits, decided at CONNECT.
#[derive(Debug, Clone, Copy)]
pub struct SessionBudget {
    /// Bytes the connection may hold (see [`Session::charge`]).
    pub memory: usize,
    pub max_subscriptions: usize,
    pub max_subscription_bytes: usize,
}

impl SessionBudget {
    pub const UNLIMITED: Self = Self {
        memory: usize::MAX,
        max_subscriptions: usize::MAX,
        max_subscription_bytes: usize::MAX,
    };
}

/// The shared half of a live connection: what the router needs to reach it.
#[derive(Debug)]
pub struct Session {
    pub conn_id: u64,
    pub client_id: String,
    /// The router's key: the client id of a machine; for a service, its
    /// account and client id together, so one service account can never
    /// take over (or resume) another account's session.
    pub key: String,
    pub class: ClientClass,
    /// CONNECT said clean_session = 0: the session outlives the connection.
    pub persistent: bool,
    /// Few (bounded by `budget.max_subscriptions`), so scanned.
    subs: Mutex<Vec<(String, QoS)>>,
    sub_bytes: AtomicUsize,
    tx: mpsc::Sender<Box<Outbound>>,
    kick: CancellationToken,
    kick_reason: Mutex<Option<KickReason>>,
    budget: SessionBudget,
    /// Bytes charged against `budget.memory` now.
    mem: AtomicUsize,
}

/// The router key of a service session: `{len}:{account}:{client_id}` (the
/// length makes it unambiguous whatever the two contain).
pub fn service_key(account: &str, client_id: &str) -> String {
    format!("{}:{account}:{client_id}", account.len())
}

/// The account part of a [`service_key`].
fn service_account_of(key: &str) -> Option<&str> {
    let (len, rest) = key.split_once(':')?;
    rest.get(..len.parse::<usize>().ok()?)
}

impl Session {
    pub fn new(
        conn_id: u64,
        client_id: String,
        class: ClientClass,
        persistent: bool,
        tx: mpsc::Sender<Box<Outbound>>,
    ) -> Self {
        Self {
            conn_id,
            key: client_id.clone(),
            client_id,
            class,
            persistent,
            subs: Mutex::new(Vec::new()),
            sub_bytes: AtomicUsize::new(0),
            tx,
            kick: CancellationToken::new(),
            kick_reason: Mutex::new(None),
            budget: SessionBudget::UNLIMITED,
            mem: AtomicUsize::new(0),
        }
    }

    /// Register under `key` instead of the client id.
    pub fn with_key(mut self, key: String) -> Self {
        self.key = key;
        self
    }

    pub fn with_budget(mut self, budget: SessionBudget) -> Self {
        self.budget = budget;
        self
    }

    /// Charge `bytes` against the connection's memory budget; false (and
    /// nothing charged) when they do not fit. Callers charge *before* they
    /// allocate, so a connection over its budget never holds more.
    pub fn charge(&self, bytes: usize) -> bool {
        let mut cur = self.mem.load(Ordering::Relaxed);
        loop {
            let Some(next) = cur.checked_add(bytes).filter(|n| *n <= self.budget.memory) else {
                return false;
            };
            match self
                .mem
                .compare_exchange_weak(cur, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return true,
                Err(now) => cur = now,
            }
        }
    }

    /// Charge bytes that are already held (a resumed session's messages,
    /// which were within their own bound), even past the budget.
    pub fn charge_unchecked(&self, bytes: usize) {
        self.mem.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Give back what [`Session::charge`] took.
    pub fn release(&self, bytes: usize) {
        let _ = self
            .mem
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |m| {
                Some(m.saturating_sub(bytes))
            });
    }

    /// Bytes charged now.
    pub fn memory(&self) -> usize {
        self.mem.load(Ordering::Relaxed)
    }

    /// Room left under the memory budget.
    pub fn memory_room(&self) -> usize {
        self.budget.memory.saturating_sub(self.memory())
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
        granted_in(&subs, topic_name)
    }

    pub fn has_subscriptions(&self) -> bool {
        self.subs.lock().map(|s| !s.is_empty()).unwrap_or(false)
    }

    /// Add or replace (same filter) a subscription, ignoring the limits
    /// (tests and resumed sessions).
    pub fn subscribe(&self, filter: &str, qos: QoS) {
        if let Ok(mut subs) = self.subs.lock() {
            match subs.iter_mut().find(|(f, _)| f == filter) {
                Some(s) => s.1 = qos,
                None => {
                    self.sub_bytes.fetch_add(filter.len(), Ordering::Relaxed);
                    self.mem.fetch_add(filter.len(), Ordering::Relaxed);
                    subs.push((filter.to_owned(), qos));
                }
            }
        }
    }

    /// Add a subscription within the session's limits. An identical filter
    /// replaces the existing subscription (§3.8.4) and costs nothing more.
    pub fn try_subscribe(&self, filter: &str, qos: QoS) -> Result<(), SubscribeRefusal> {
        let Ok(mut subs) = self.subs.lock() else {
            return Err(SubscribeRefusal::Count);
        };
        if let Some(s) = subs.iter_mut().find(|(f, _)| f == filter) {
            s.1 = qos;
            return Ok(());
        }
        if subs.len() >= self.budget.max_subscriptions {
            return Err(SubscribeRefusal::Count);
        }
        let bytes = self.sub_bytes.load(Ordering::Relaxed);
        if bytes.saturating_add(filter.len()) > self.budget.max_subscription_bytes {
            return Err(SubscribeRefusal::Bytes);
        }
        if !self.charge(filter.len()) {
            return Err(SubscribeRefusal::Memory);
        }
        self.sub_bytes.fetch_add(filter.len(), Ordering::Relaxed);
        subs.push((filter.to_owned(), qos));
        Ok(())
    }

    pub fn unsubscribe(&self, filter: &str) {
        if let Ok(mut subs) = self.subs.lock() {
            let before = subs.len();
            subs.retain(|(f, _)| f != filter);
            if subs.len() < before {
                let _ = self
                    .sub_bytes
                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| {
                        Some(b.saturating_sub(filter.len()))
                    });
                self.release(filter.len());
            }
        }
    }

    /// Subscriptions held now.
    pub fn subscription_count(&self) -> usize {
        self.subs.lock().map(|s| s.len()).unwrap_or(0)
    }

    /// A copy of the subscriptions (to park or hand over the session).
    pub fn subscriptions(&self) -> Vec<(String, QoS)> {
        self.subs.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Install a resumed session's subscriptions (they were within the
    /// limits when they were made).
    fn set_subscriptions(&self, subs: Vec<(String, QoS)>) {
        let bytes: usize = subs.iter().map(|(f, _)| f.len()).sum();
        if let Ok(mut s) = self.subs.lock() {
            *s = subs;
            let old = self.sub_bytes.swap(bytes, Ordering::Relaxed);
            self.release(old);
            self.mem.fetch_add(bytes, Ordering::Relaxed);
        }
    }

    /// Queue a message, charged against the connection's memory budget
    /// until the connection has written it (QoS 0) or the client has
    /// acknowledged it (QoS 1/2).
    fn offer(&self, msg: Outbound) -> Offer {
        let cost = msg.cost();
        if !self.charge(cost) {
            return Offer::OverBudget;
        }
        // Boxed: a channel allocates its slots in blocks of 32 up front, and
        // 32 pointers cost an idle connection far less than 32 messages.
        match self.tx.try_send(Box::new(msg)) {
            Ok(()) => Offer::Queued,
            Err(e) => {
                self.release(cost);
                match e {
                    mpsc::error::TrySendError::Closed(_) => Offer::Closed,
                    mpsc::error::TrySendError::Full(_) => Offer::Full,
                }
            }
        }
    }
}

enum Offer {
    Queued,
    /// The connection is ending: the message goes to its parked session, if
    /// it keeps one (it was not lost to a slow consumer).
    Closed,
    /// The connection cannot keep up.
    Full,
    /// The connection's memory budget has no room for the message.
    OverBudget,
}

/// One outbound QoS 1/2 message not yet acknowledged by the client.
#[derive(Debug, Clone)]
pub struct InflightOut {
    pub pkid: u16,
    pub msg: Outbound,
    /// QoS 2: PUBREC came and PUBREL was sent; waiting for PUBCOMP.
    pub released: bool,
}

/// What a persistent session keeps between connections (MQTT 3.1.1 §3.1.2.4):
/// its subscriptions, QoS 1/2 messages sent but not acknowledged, QoS 1/2
/// messages queued while the client was away, and the packet ids of the
/// client's QoS 2 publishes not yet released.
#[derive(Debug, Default)]
pub struct SessionState {
    pub subs: Vec<(String, QoS)>,
    pub inflight: Vec<InflightOut>,
    pub queue: VecDeque<Outbound>,
    pub qos2_in: HashSet<u16>,
    pub next_pkid: u16,
}

/// A persistent session whose client is away.
#[derive(Debug)]
struct Parked {
    class: ClientClass,
    state: SessionState,
    since: Instant,
    /// What its queue and unacknowledged messages cost (`message_cost`),
    /// bounded by `SessionLimits::max_parked_bytes`.
    bytes: usize,
}

/// Parked sessions: machines by key (a topic reaches at most one), services
/// scanned (few), as for live sessions.
#[derive(Debug, Default)]
struct ParkedSessions {
    machines: HashMap<String, Parked>,
    services: HashMap<String, Parked>,
    last_sweep: Option<Instant>,
}

impl ParkedSessions {
    fn map(&mut self, class: ClientClass) -> &mut HashMap<String, Parked> {
        match class {
            ClientClass::Machine(_) => &mut self.machines,
            ClientClass::Service => &mut self.services,
        }
    }

    fn len(&self) -> usize {
        self.machines.len() + self.services.len()
    }
}

/// Bounds of persistent sessions (from `[mqtt]`).
#[derive(Debug, Clone, Copy)]
pub struct SessionLimits {
    /// QoS 1/2 messages queued for an away service session; beyond are dropped.
    pub max_queued: usize,
    /// The same for machines (commands are only meaningful live).
    pub machine_max_queued: usize,
    /// A parked session not resumed within this time is discarded.
    pub expiry: Duration,
    /// Bytes a parked session may hold (queued and unacknowledged messages);
    /// messages beyond are dropped and counted.
    pub max_parked_bytes: usize,
}

impl Default for SessionLimits {
    fn default() -> Self {
        Self {
            max_queued: 1000,
            machine_max_queued: 0,
            expiry: Duration::from_secs(3600),
            max_parked_bytes: 64 * 1024 * 1024,
        }
    }
}

/// What CONNECT found for its client id.
#[derive(Debug, Default)]
pub struct Registered {
    /// A live connection with this client id was taken over.
    pub took_over: bool,
    /// CONNACK's session present flag (§3.2.2.2).
    pub session_present: bool,
    /// The resumed session's state (subscriptions are already installed).
    pub resumed: SessionState,
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
    /// QoS 1/2 messages not queued for an away persistent session (full).
    pub session_dropped: AtomicU64,
    /// Parked sessions discarded after `session_expiry`.
    pub sessions_expired: AtomicU64,
    /// Connections closed because a message did not fit their memory budget.
    pub over_budget: AtomicU64,
}

/// Caps of the retained store.
#[derive(Debug, Clone, Copy)]
pub struct RetainedLimits {
    pub max_entries: usize,
    /// Topic + payload bytes of every retained message together.
    pub max_bytes: usize,
    /// Topic + payload bytes of one retained message.
    pub max_message: usize,
}

#[derive(Debug, Default)]
struct RetainedStore {
    map: BTreeMap<String, (Bytes, QoS)>,
    /// Sum of topic + payload lengths in `map`.
    bytes: usize,
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
    retained: RwLock<RetainedStore>,
    retained_limits: RetainedLimits,
    /// `mqtt.deny_filters`: topics matching one are delivered to nobody.
    deny: Vec<String>,
    /// Persistent sessions whose client is away. This lock also orders
    /// `register` against `close`, so a session is always either live or
    /// parked, never both and never lost in between.
    parked: Mutex<ParkedSessions>,
    /// `parked.len()`, readable without the lock: publishes skip the parked
    /// lookup entirely while no session is parked (the common case).
    parked_count: AtomicUsize,
    limits: SessionLimits,
    pub stats: RouterStats,
}

impl Router {
    pub fn new(max_retained: usize) -> Self {
        Self::with_limits(max_retained, SessionLimits::default())
    }

    pub fn with_limits(max_retained: usize, limits: SessionLimits) -> Self {
        Self {
            sessions: DashMap::new(),
            service_subscribers: RwLock::new(HashMap::new()),
            retained: RwLock::new(RetainedStore::default()),
            retained_limits: RetainedLimits {
                max_entries: max_retained,
                max_bytes: usize::MAX,
                max_message: usize::MAX,
            },
            deny: Vec::new(),
            parked: Mutex::new(ParkedSessions::default()),
            parked_count: AtomicUsize::new(0),
            limits,
            stats: RouterStats::default(),
        }
    }

    /// Cap the retained store in bytes as well as entries.
    pub fn with_retained_limits(mut self, limits: RetainedLimits) -> Self {
        self.retained_limits = limits;
        self
    }

    /// Withhold topics matching any of `deny` from every client.
    pub fn with_deny_filters(mut self, deny: Vec<String>) -> Self {
        self.deny = deny;
        self
    }

    /// Whether `topic_name` is withheld by the deny list.
    pub fn denied(&self, topic_name: &str) -> bool {
        self.deny
            .iter()
            .any(|d| topic::filter_matches(d, topic_name))
    }

    /// Retained messages kept now: (entries, bytes).
    pub fn retained_usage(&self) -> (usize, usize) {
        self.retained
            .read()
            .map(|r| (r.map.len(), r.bytes))
            .unwrap_or_default()
    }

    fn lock_parked(&self) -> std::sync::MutexGuard<'_, ParkedSessions> {
        // A panic while holding it cannot leave the maps inconsistent (every
        // update is a single insert or remove), so a poisoned lock is usable.
        match self.parked.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// Register a new session under its client id, kicking the previous one
    /// (MQTT take-over), and resume or discard the client's stored session
    /// (§3.1.2.4): clean_session = 1 discards it, 0 resumes it.
    pub fn register(&self, session: Arc<Session>) -> Registered {
        let mut parked = self.lock_parked();
        self.sweep(&mut parked);
        let stored = parked.map(session.class).remove(&session.key);
        self.parked_count.store(parked.len(), Ordering::Relaxed);
        let mut reg = Registered::default();
        if let Some(p) = stored {
            if session.persistent && p.class == session.class {
                if p.since.elapsed() >= self.limits.expiry {
                    self.stats.sessions_expired.fetch_add(1, Ordering::Relaxed);
                } else {
                    reg.session_present = true;
                    reg.resumed = p.state;
                }
            }
        }
        // A live persistent session moves to the new connection: its
        // subscriptions now, its queued and unacknowledged messages when the
        // old connection has ended (`close` hands them over).
        let previous = self.sessions.get(&session.key).map(|s| s.clone());
        if let Some(old) = &previous {
            if session.persistent && old.persistent && old.class == session.class {
                reg.session_present = true;
                reg.resumed.subs = old.subscriptions();
            }
        }
        // Subscriptions are installed before the session is reachable, and
        // the service index is updated before the lock is released, so no
        // publish finds the client neither parked nor subscribed.
        session.set_subscriptions(std::mem::take(&mut reg.resumed.subs));
        if let Some(old) = self.sessions.insert(session.key.clone(), session.clone()) {
            old.kick(KickReason::TakeOver);
            self.forget_service(old.conn_id);
            reg.took_over = true;
        }
        self.service_subscriptions_changed(&session);
        drop(parked);
        reg
    }

    /// Kick every live session whose class matches (as a take-over: no
    /// will). A scan: for the rare cross-node take-over and for fencing.
    pub fn kick_where(&self, pick: impl Fn(&ClientClass) -> bool) -> usize {
        let mut n = 0;
        for s in self.sessions.iter() {
            if pick(&s.class) {
                s.kick(KickReason::TakeOver);
                n += 1;
            }
        }
        n
    }

    /// Close the live sessions of service account `account` (its sessions'
    /// keys start with its part of [`service_key`]). Returns how many.
    pub fn kick_service_account(&self, account: &str, reason: KickReason) -> usize {
        let prefix = format!("{}:{account}:", account.len());
        let mut n = 0;
        for s in self.sessions.iter() {
            if s.class == ClientClass::Service && s.key.starts_with(&prefix) {
                s.kick(reason);
                n += 1;
            }
        }
        n
    }

    /// The service accounts with a live session, each once.
    pub fn service_accounts(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .sessions
            .iter()
            .filter(|s| s.class == ClientClass::Service)
            .filter_map(|s| service_account_of(&s.key).map(str::to_owned))
            .collect();
        out.sort_unstable();
        out.dedup();
        out
    }

    /// Close machine `m`'s live session with `reason`; whether there was one.
    pub fn kick_machine(&self, m: &MachineNo, reason: KickReason) -> bool {
        match self.sessions.get(m.as_str()) {
            Some(s) if s.class == ClientClass::Machine(*m) => {
                s.kick(reason);
                true
            }
            _ => false,
        }
    }

    /// Remove a session if it is still the registered one for its client id.
    /// Used by tests; connections end through [`Router::close`].
    pub fn unregister(&self, session: &Session) {
        self.sessions
            .remove_if(&session.key, |_, s| s.conn_id == session.conn_id);
        self.forget_service(session.conn_id);
    }

    /// A connection ended. A persistent session is parked with `state`
    /// (plus whatever is still in its channel); if a newer connection already
    /// took the client id over, the messages are handed to it instead.
    pub fn close(
        &self,
        session: &Session,
        rx: &mut mpsc::Receiver<Box<Outbound>>,
        state: Option<SessionState>,
    ) {
        let mut parked = self.lock_parked();
        let removed = self
            .sessions
            .remove_if(&session.key, |_, s| s.conn_id == session.conn_id)
            .is_some();
        self.forget_service(session.conn_id);
        // From here a publisher's `offer` answers Closed and comes to the
        // parked map, which it can only read once this lock is released.
        rx.close();
        let Some(mut state) = state.filter(|_| session.persistent) else {
            return;
        };
        while let Ok(m) = rx.try_recv() {
            state.queue.push_back(*m);
        }
        if removed {
            state.subs = session.subscriptions();
            let cap = self.queue_cap(session.class);
            let max_bytes = self.limits.max_parked_bytes;
            // Unacknowledged messages first (they are owed), then the queue
            // while it fits the count and the bytes; QoS 0 is not kept for an
            // away client (as in `offer_parked`). Copies are made only of
            // what is kept.
            let mut bytes = 0usize;
            state.inflight.retain(|f| {
                let c = f.msg.cost();
                let keep = bytes.saturating_add(c) <= max_bytes;
                if keep {
                    bytes += c;
                } else {
                    self.stats.session_dropped.fetch_add(1, Ordering::Relaxed);
                }
                keep
            });
            for f in &mut state.inflight {
                f.msg = detached(f.msg.clone());
            }
            let mut kept = VecDeque::new();
            for m in state.queue.into_iter().filter(|m| m.qos != QoS::AtMostOnce) {
                let c = m.cost();
                if kept.len() < cap && bytes.saturating_add(c) <= max_bytes {
                    bytes += c;
                    kept.push_back(detached(m));
                } else {
                    self.stats.session_dropped.fetch_add(1, Ordering::Relaxed);
                }
            }
            state.queue = kept;
            parked.map(session.class).insert(
                session.key.clone(),
                Parked {
                    class: session.class,
                    state,
                    since: Instant::now(),
                    bytes,
                },
            );
            self.parked_count.store(parked.len(), Ordering::Relaxed);
            return;
        }
        drop(parked);
        // Taken over: the new connection owns the session now. Unacknowledged
        // messages go to it again (with new packet ids); if it started clean,
        // the session ended with the old connection.
        let Some(new) = self.sessions.get(&session.key).map(|s| s.clone()) else {
            return;
        };
        if !new.persistent || new.class != session.class {
            return;
        }
        let msgs = state
            .inflight
            .into_iter()
            .filter(|f| !f.released)
            .map(|f| f.msg)
            .chain(state.queue);
        for m in msgs {
            match new.offer(m) {
                Offer::Queued | Offer::Closed => {}
                Offer::OverBudget => {
                    self.over_budget(&new);
                    break;
                }
                Offer::Full => {
                    self.slow(&new);
                    break;
                }
            }
        }
    }

    fn queue_cap(&self, class: ClientClass) -> usize {
        match class {
            ClientClass::Machine(_) => self.limits.machine_max_queued,
            ClientClass::Service => self.limits.max_queued,
        }
    }

    /// Discard parked sessions older than the expiry; at most once a minute
    /// (or once per expiry, if shorter) so a connect storm does not rescan.
    fn sweep(&self, parked: &mut ParkedSessions) {
        let now = Instant::now();
        let every = self.limits.expiry.min(Duration::from_secs(60));
        if parked
            .last_sweep
            .is_some_and(|t| now.duration_since(t) < every)
        {
            return;
        }
        parked.last_sweep = Some(now);
        let expiry = self.limits.expiry;
        let mut expired = 0u64;
        for map in [&mut parked.machines, &mut parked.services] {
            map.retain(|_, p| {
                let keep = now.duration_since(p.since) < expiry;
                expired += u64::from(!keep);
                keep
            });
        }
        self.stats
            .sessions_expired
            .fetch_add(expired, Ordering::Relaxed);
        self.parked_count.store(parked.len(), Ordering::Relaxed);
    }

    /// Persistent sessions whose client is away.
    pub fn parked_count(&self) -> usize {
        self.parked_count.load(Ordering::Relaxed)
    }

    /// Queue a message for a parked session, or for the live session that
    /// replaced it meanwhile. QoS 0 is not queued (§3.1.2.4 allows either).
    fn offer_parked(
        &self,
        class: ClientClass,
        client_id: &str,
        topic_name: &str,
        make: &dyn Fn(QoS) -> Outbound,
    ) {
        let mut parked = self.lock_parked();
        if let Some(p) = parked.map(class).get_mut(client_id) {
            let Some(g) = granted_in(&p.state.subs, topic_name) else {
                return;
            };
            let msg = make(g);
            if msg.qos == QoS::AtMostOnce {
                return;
            }
            let cap = self.queue_cap(class);
            self.park_message(p, msg, cap);
            return;
        }
        // Not parked: it may have resumed between the publisher's look-up
        // and this lock (register holds it while installing the session).
        let live = self.sessions.get(client_id).map(|s| s.clone());
        drop(parked);
        if let Some(s) = live {
            if let Some(g) = s.granted(topic_name) {
                match s.offer(make(g)) {
                    Offer::Full => self.slow(&s),
                    Offer::OverBudget => self.over_budget(&s),
                    Offer::Queued | Offer::Closed => {}
                }
            }
        }
    }

    /// Queue `msg` for a parked session if it fits its count and bytes.
    fn park_message(&self, p: &mut Parked, msg: Outbound, cap: usize) {
        let c = msg.cost();
        if p.state.queue.len() < cap && p.bytes.saturating_add(c) <= self.limits.max_parked_bytes {
            p.bytes += c;
            p.state.queue.push_back(detached(msg));
        } else {
            self.stats.session_dropped.fetch_add(1, Ordering::Relaxed);
        }
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
            .get(&session.key)
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
        self.publish_with_receipt(topic_name, payload, qos, retain, None)
    }

    /// [`Router::publish`]; the machine's copy carries `receipt`, fired on
    /// its acknowledgement.
    pub fn publish_with_receipt(
        &self,
        topic_name: &str,
        payload: Bytes,
        qos: QoS,
        retain: bool,
        receipt: Option<Receipt>,
    ) -> MachineDelivery {
        if self.denied(topic_name) {
            // Nobody may receive it, so it is neither delivered nor kept.
            return match topic::machine_of(topic_name) {
                Some(_) => MachineDelivery::NotSubscribed,
                None => MachineDelivery::NotAMachineTopic,
            };
        }
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
            receipt: None,
        };

        let any_parked = self.parked_count() > 0;
        let machine = match topic::machine_of(topic_name) {
            None => MachineDelivery::NotAMachineTopic,
            Some(m) => match self.sessions.get(m.as_str()).map(|s| s.clone()) {
                Some(s) if s.class == ClientClass::Machine(m) => match s.granted(topic_name) {
                    Some(g) => match s.offer(Outbound {
                        receipt: receipt.clone(),
                        ..make(g)
                    }) {
                        Offer::Queued => {
                            self.stats.delivered.fetch_add(1, Ordering::Relaxed);
                            MachineDelivery::Queued
                        }
                        Offer::Closed => {
                            if s.persistent {
                                self.offer_parked(s.class, &s.key, topic_name, &make);
                            }
                            MachineDelivery::NotConnected
                        }
                        Offer::Full => {
                            self.slow(&s);
                            MachineDelivery::Backpressure
                        }
                        Offer::OverBudget => {
                            self.over_budget(&s);
                            MachineDelivery::Backpressure
                        }
                    },
                    None => MachineDelivery::NotSubscribed,
                },
                _ => {
                    if any_parked {
                        self.offer_parked(ClientClass::Machine(m), m.as_str(), topic_name, &make);
                    }
                    MachineDelivery::NotConnected
                }
            },
        };

        let services: Vec<Arc<Session>> = match self.service_subscribers.read() {
            Ok(m) if !m.is_empty() => m.values().cloned().collect(),
            _ => Vec::new(),
        };
        for s in services {
            if let Some(g) = s.granted(topic_name) {
                match s.offer(make(g)) {
                    Offer::Queued => {
                        self.stats.delivered.fetch_add(1, Ordering::Relaxed);
                    }
                    Offer::Closed => {
                        if s.persistent {
                            self.offer_parked(s.class, &s.key, topic_name, &make);
                        }
                    }
                    Offer::Full => self.slow(&s),
                    Offer::OverBudget => self.over_budget(&s),
                }
            }
        }
        if any_parked {
            self.offer_parked_services(topic_name, &make);
        }
        machine
    }

    /// Queue a message for every parked service session it matches.
    fn offer_parked_services(&self, topic_name: &str, make: &dyn Fn(QoS) -> Outbound) {
        let mut parked = self.lock_parked();
        let cap = self.limits.max_queued;
        for p in parked.services.values_mut() {
            let Some(g) = granted_in(&p.state.subs, topic_name) else {
                continue;
            };
            let msg = make(g);
            if msg.qos == QoS::AtMostOnce {
                continue;
            }
            self.park_message(p, msg, cap);
        }
    }

    fn slow(&self, s: &Arc<Session>) {
        self.stats.slow_consumers.fetch_add(1, Ordering::Relaxed);
        s.kick(KickReason::SlowConsumer);
    }

    fn over_budget(&self, s: &Arc<Session>) {
        self.stats.over_budget.fetch_add(1, Ordering::Relaxed);
        s.kick(KickReason::MemoryBudget);
    }

    /// Keep, replace or clear the retained message of `topic_name`, within
    /// the store's caps. A message over a cap is refused (and counted); the
    /// topic's previous retained message, if any, is cleared, so a
    /// subscriber never gets a stale state as the current one.
    fn retain(&self, topic_name: &str, payload: &Bytes, qos: QoS) {
        let Ok(mut r) = self.retained.write() else {
            return;
        };
        let r = &mut *r;
        let old = r
            .map
            .get(topic_name)
            .map_or(0, |(p, _)| topic_name.len() + p.len());
        if payload.is_empty() {
            if r.map.remove(topic_name).is_some() {
                r.bytes = r.bytes.saturating_sub(old);
            }
            return;
        }
        let l = self.retained_limits;
        let size = topic_name.len() + payload.len();
        let exists = old > 0;
        let fits = size <= l.max_message
            && (exists || r.map.len() < l.max_entries)
            && r.bytes - old + size <= l.max_bytes;
        if fits {
            // Copy: the payload is a view into the connection's read buffer,
            // and a retained message must not pin that whole buffer for as
            // long as it is kept (one per machine).
            r.map.insert(
                topic_name.to_owned(),
                (Bytes::copy_from_slice(payload), qos),
            );
            r.bytes = r.bytes - old + size;
        } else {
            self.stats.retained_refused.fetch_add(1, Ordering::Relaxed);
            if exists {
                r.map.remove(topic_name);
                r.bytes -= old;
            }
        }
    }

    /// Retained messages matching a new subscription (sent with retain = 1).
    pub fn retained_for(&self, filter: &str, granted: QoS) -> Vec<Outbound> {
        self.retained_within(filter, granted, usize::MAX)
            .map(|(v, _)| v)
            .unwrap_or_default()
    }

    /// Retained messages matching a new subscription, and what they cost
    /// ([`Outbound::cost`]), if that is at most `budget`; None, having
    /// built no more than `budget` bytes' worth, if not.
    pub fn retained_within(
        &self,
        filter: &str,
        granted: QoS,
        budget: usize,
    ) -> Option<(Vec<Outbound>, usize)> {
        let Ok(r) = self.retained.read() else {
            return Some((Vec::new(), 0));
        };
        // Every matching topic starts with the filter's text before its
        // first wildcard.
        let prefix = filter.find(['+', '#']).map_or(filter, |i| &filter[..i]);
        let matching = r
            .map
            .range::<str, _>((
                std::ops::Bound::Included(prefix),
                std::ops::Bound::Unbounded,
            ))
            .take_while(|(t, _)| t.starts_with(prefix))
            .filter(|(t, _)| topic::filter_matches(filter, t) && !self.denied(t));
        let mut out = Vec::new();
        let mut cost = 0usize;
        for (t, (p, q)) in matching {
            cost = cost.saturating_add(message_cost(t, p.len()));
            if cost > budget {
                return None;
            }
            out.push(Outbound {
                topic: Arc::from(t.as_str()),
                payload: p.clone(),
                qos: min_qos(*q, granted),
                retain: true,
                receipt: None,
            });
        }
        Some((out, cost))
    }
}

/// A message to be kept while its client is away: its own copy of the
/// payload, which otherwise is a view into the publisher's read buffer and
/// would pin that whole buffer for as long as the session is parked.
fn detached(mut m: Outbound) -> Outbound {
    m.payload = Bytes::copy_from_slice(&m.payload);
    m
}

/// Overlapping subscriptions (§3.3.5): the message is delivered once, at the
/// highest QoS any matching filter granted.
fn granted_in(subs: &[(String, QoS)], topic_name: &str) -> Option<QoS> {
    subs.iter()
        .filter(|(f, _)| topic::filter_matches(f, topic_name))
        .map(|(_, q)| *q)
        .max_by_key(|q| *q as u8)
}

/// Whether every topic name `inner` matches is also matched by `outer` (both
/// already valid filters). The deny list refuses a subscription that lies
/// wholly inside a denied filter: it could never receive anything. A wider
/// one is granted and the denied topics are withheld at delivery
/// ([`Router::publish`]), as a broker's ACL does.
pub fn filter_within(inner: &str, outer: &str) -> bool {
    // §4.7.2: a leading wildcard does not match `$` topics, so an outer
    // filter starting with one contains no inner filter that names `$…`.
    if outer.starts_with(['+', '#']) && inner.starts_with('$') {
        return false;
    }
    let mut li = inner.split('/');
    let mut lo = outer.split('/');
    loop {
        match (li.next(), lo.next()) {
            // `a/#` also matches `a` itself (§4.7.1.2).
            (_, Some("#")) => return true,
            (None, None) => return true,
            (Some("#"), _) => return false,
            (Some(_), Some("+")) => {}
            (Some("+"), Some(_)) => return false,
            (Some(x), Some(y)) if x == y => {}
            _ => return false,
        }
    }
}

/// Whether some topic name matches both filters (both already valid); a
/// leading wildcard never matches `$` topics (§4.7.2).
pub fn filters_overlap(a: &str, b: &str) -> bool {
    let leading_wild = |f: &str| f.starts_with(['+', '#']);
    if (a.starts_with('$') && leading_wild(b)) || (b.starts_with('$') && leading_wild(a)) {
        return false;
    }
    let mut la = a.split('/');
    let mut lb = b.split('/');
    loop {
        match (la.next(), lb.next()) {
            (Some("#"), _) | (_, Some("#")) => return true,
            (None, None) => return true,
            (Some("+"), Some(_)) | (Some(_), Some("+")) => {}
            (Some(x), Some(y)) if x == y => {}
            _ => return false,
        }
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
        (
            Arc::new(Session::new(id, client.into(), class, false, tx)),
            rx,
        )
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
        assert!(!r.register(a.clone()).took_over);
        assert!(r.register(b.clone()).took_over);
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

    fn persistent(id: u64, client: &str) -> (Arc<Session>, mpsc::Receiver<Box<Outbound>>) {
        let (tx, rx) = mpsc::channel(8);
        let s = Session::new(id, client.into(), ClientClass::Service, true, tx);
        (Arc::new(s), rx)
    }

    #[test]
    fn persistent_session_parks_queues_bounded_and_resumes() {
        let limits = SessionLimits {
            max_queued: 2,
            ..SessionLimits::default()
        };
        let r = Router::with_limits(10, limits);
        let (a, mut rxa) = persistent(1, "svc");
        assert!(!r.register(a.clone()).session_present);
        a.subscribe("x/#", QoS::ExactlyOnce);
        r.service_subscriptions_changed(&a);
        r.close(&a, &mut rxa, Some(SessionState::default()));
        assert_eq!(r.parked_count(), 1);
        for p in ["1", "2", "3"] {
            r.publish("x/y", Bytes::from(p), QoS::AtLeastOnce, false);
        }
        // QoS 0 is not queued for an away client.
        r.publish("x/y", Bytes::from_static(b"0"), QoS::AtMostOnce, false);
        assert_eq!(r.stats.session_dropped.load(Ordering::Relaxed), 1);

        let (b, _rxb) = persistent(2, "svc");
        let reg = r.register(b.clone());
        assert!(reg.session_present);
        let got: Vec<_> = reg
            .resumed
            .queue
            .iter()
            .map(|m| m.payload.clone())
            .collect();
        assert_eq!(got, vec![Bytes::from("1"), Bytes::from("2")]);
        assert_eq!(
            b.subscriptions(),
            vec![("x/#".to_string(), QoS::ExactlyOnce)]
        );
        assert_eq!(r.parked_count(), 0);
    }

    #[test]
    fn clean_session_discards_and_expiry_forgets() {
        let r = Router::with_limits(
            10,
            SessionLimits {
                expiry: Duration::ZERO,
                ..SessionLimits::default()
            },
        );
        let (a, mut rxa) = persistent(1, "svc");
        r.register(a.clone());
        a.subscribe("x", QoS::AtLeastOnce);
        r.close(&a, &mut rxa, Some(SessionState::default()));
        let (b, _rxb) = persistent(2, "svc");
        assert!(!r.register(b).session_present, "expired");
        assert_eq!(r.stats.sessions_expired.load(Ordering::Relaxed), 1);

        let r = Router::new(10);
        let (a, mut rxa) = persistent(1, "svc");
        r.register(a.clone());
        r.close(&a, &mut rxa, Some(SessionState::default()));
        let (tx, _rx) = mpsc::channel(4);
        let clean = Arc::new(Session::new(
            2,
            "svc".into(),
            ClientClass::Service,
            false,
            tx,
        ));
        assert!(!r.register(clean.clone()).session_present);
        assert_eq!(
            r.parked_count(),
            0,
            "clean_session = 1 discards the stored session"
        );
    }

    #[test]
    fn filter_within_follows_the_matching_rules() {
        assert!(filter_within("secret/x", "secret/#"));
        assert!(filter_within("secret/#", "secret/#"));
        assert!(filter_within("secret", "secret/#"), "a/# matches a");
        assert!(filter_within("secret/+/y", "secret/#"));
        assert!(filter_within("a/b", "a/+"));
        assert!(filter_within("a/+", "a/+"));
        assert!(!filter_within("#", "secret/#"));
        assert!(!filter_within("+/x", "secret/#"));
        assert!(!filter_within("a/+", "a/b"));
        assert!(!filter_within("a/#", "a/+"));
        assert!(!filter_within("a/b/c", "a/+"));
        assert!(!filter_within("$SYS/x", "#"));
        assert!(filter_within("$SYS/x", "$SYS/#"));
        assert!(filter_within("x", "#"));
    }

    #[test]
    fn denied_topics_reach_nobody_and_are_not_retained() {
        let r = Router::new(10).with_deny_filters(vec!["secret/#".into()]);
        let (s, mut rx) = session(1, "svc", ClientClass::Service);
        r.register(s.clone());
        s.subscribe("#", QoS::AtMostOnce);
        r.service_subscriptions_changed(&s);
        r.publish("secret/x", Bytes::from_static(b"1"), QoS::AtMostOnce, true);
        r.publish("open/x", Bytes::from_static(b"2"), QoS::AtMostOnce, true);
        assert_eq!(&*rx.try_recv().unwrap().topic, "open/x");
        assert!(rx.try_recv().is_err());
        assert_eq!(r.retained_for("#", QoS::AtMostOnce).len(), 1);
    }

    #[test]
    fn subscriptions_are_capped_and_identical_filters_replace() {
        let (tx, _rx) = mpsc::channel(4);
        let s = Session::new(1, "svc".into(), ClientClass::Service, false, tx).with_budget(
            SessionBudget {
                memory: 1000,
                max_subscriptions: 2,
                max_subscription_bytes: 12,
            },
        );
        for _ in 0..3000 {
            assert_eq!(s.try_subscribe("a/#", QoS::AtMostOnce), Ok(()));
        }
        assert_eq!(s.subscription_count(), 1, "identical filters replace");
        assert_eq!(s.memory(), 3);
        assert_eq!(s.try_subscribe("b/#", QoS::AtLeastOnce), Ok(()));
        assert_eq!(
            s.try_subscribe("c/#", QoS::AtMostOnce),
            Err(SubscribeRefusal::Count)
        );
        s.unsubscribe("b/#");
        assert_eq!(
            s.try_subscribe("long/filter/#", QoS::AtMostOnce),
            Err(SubscribeRefusal::Bytes)
        );
        assert_eq!(s.memory(), 3, "unsubscribe gives the bytes back");
    }

    #[test]
    fn retained_store_is_capped_in_bytes_and_replay_in_budget() {
        let r = Router::new(100).with_retained_limits(RetainedLimits {
            max_entries: 100,
            max_bytes: 90,
            max_message: 40,
        });
        let big = Bytes::from(vec![b'x'; 40]);
        r.publish("t/1", big.clone(), QoS::AtMostOnce, true);
        assert_eq!(r.retained_usage(), (0, 0), "over the per-message cap");
        r.publish("t/1", Bytes::from(vec![b'x'; 30]), QoS::AtMostOnce, true);
        r.publish("t/2", Bytes::from(vec![b'x'; 30]), QoS::AtMostOnce, true);
        r.publish("t/3", Bytes::from(vec![b'x'; 30]), QoS::AtMostOnce, true);
        assert_eq!(r.retained_usage(), (2, 66), "over the total cap");
        r.publish("t/1", Bytes::from(vec![b'x'; 10]), QoS::AtMostOnce, true);
        assert_eq!(r.retained_usage(), (2, 46), "replacing adjusts the bytes");
        assert_eq!(r.stats.retained_refused.load(Ordering::Relaxed), 2);
        let all = message_cost("t/1", 10) + message_cost("t/2", 30);
        assert_eq!(
            r.retained_within("t/#", QoS::AtMostOnce, all).unwrap().1,
            all
        );
        assert!(r.retained_within("t/#", QoS::AtMostOnce, all - 1).is_none());
    }

    #[test]
    fn a_message_over_the_budget_kicks_the_connection() {
        let r = Router::new(10);
        let (tx, _rx) = mpsc::channel(100);
        let m: MachineNo = "12345678".parse().unwrap();
        let s = Arc::new(
            Session::new(1, "12345678".into(), ClientClass::Machine(m), false, tx).with_budget(
                SessionBudget {
                    memory: 300,
                    max_subscriptions: 8,
                    max_subscription_bytes: 1024,
                },
            ),
        );
        r.register(s.clone());
        s.subscribe("vend/v1/12345678/cmd/#", QoS::AtLeastOnce);
        let t = "vend/v1/12345678/cmd/ping";
        let p = Bytes::from(vec![b'x'; 100]);
        assert_eq!(
            r.publish(t, p.clone(), QoS::AtLeastOnce, false),
            MachineDelivery::Queued
        );
        assert_eq!(
            r.publish(t, p, QoS::AtLeastOnce, false),
            MachineDelivery::Backpressure
        );
        assert_eq!(s.kick_reason(), Some(KickReason::MemoryBudget));
        assert_eq!(r.stats.over_budget.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn service_sessions_are_keyed_by_account() {
        let r = Router::new(10);
        let (tx, _rx) = mpsc::channel(4);
        let a = Arc::new(
            Session::new(1, "dash".into(), ClientClass::Service, false, tx)
                .with_key(service_key("svc-a", "dash")),
        );
        let (tx, _rx2) = mpsc::channel(4);
        let b = Arc::new(
            Session::new(2, "dash".into(), ClientClass::Service, false, tx)
                .with_key(service_key("svc-b", "dash")),
        );
        r.register(a.clone());
        assert!(!r.register(b).took_over, "another account's id is its own");
        assert_eq!(a.kick_reason(), None);
        assert_ne!(service_key("a:b", "c"), service_key("a", "b:c"));
    }

    #[test]
    fn overlapping_filters() {
        assert!(filters_overlap("#", "secret/x"));
        assert!(filters_overlap("a/+/c", "a/b/#"));
        assert!(filters_overlap("a/#", "a"));
        assert!(!filters_overlap("a/+", "a"));
        assert!(!filters_overlap("a/b", "a/c"));
        assert!(!filters_overlap("#", "$SYS/#"));
        assert!(filters_overlap("$SYS/+", "$SYS/#"));
    }
}
