//! The session table: who is connected (live sessions by key, MQTT
//! take-over), which service sessions are subscribed (the few the fan-out
//! scans), and the persistent (clean_session = 0) sessions of clients that
//! are away, with what is queued for them, bounded in count, bytes and age.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use super::outbox::Receiver;
use bytes::Bytes;
use dashmap::DashMap;
use rumqttc::mqttbytes::QoS;
use vendgate_proto::machine::MachineNo;

use super::super::acl::ClientClass;
use super::index::ServiceIndex;
use super::outbox::Outbound;
use super::session::{granted_in, service_account_of, KickReason, Offer, Session};

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

/// The router's counters (exported as metrics). The session table counts
/// what it drops, expires and kicks; the fan-out counts deliveries and the
/// retained store's refusals.
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

/// Close a connection whose queue is full: it cannot keep up.
pub(super) fn kick_slow(s: &Session, stats: &RouterStats) {
    stats.slow_consumers.fetch_add(1, Ordering::Relaxed);
    s.kick(KickReason::SlowConsumer);
}

/// Close a connection whose memory budget a message did not fit.
pub(super) fn kick_over_budget(s: &Session, stats: &RouterStats) {
    stats.over_budget.fetch_add(1, Ordering::Relaxed);
    s.kick(KickReason::MemoryBudget);
}

/// Live sessions, the service subscribers among them, and parked sessions.
#[derive(Debug)]
pub(super) struct SessionTable {
    /// Live sessions by [`Session::key`].
    live: DashMap<String, Arc<Session>>,
    /// Service sessions that hold at least one subscription, indexed by
    /// their filters (`index`), so a publish visits only those that match.
    service_subscribers: RwLock<ServiceIndex>,
    /// Persistent sessions whose client is away. This lock also orders
    /// `register` against `close`, so a session is always either live or
    /// parked, never both and never lost in between.
    parked: Mutex<ParkedSessions>,
    /// `parked.len()`, readable without the lock: publishes skip the parked
    /// lookup entirely while no session is parked (the common case).
    parked_count: AtomicUsize,
    limits: SessionLimits,
}

impl SessionTable {
    pub(super) fn new(limits: SessionLimits) -> Self {
        Self {
            live: DashMap::new(),
            service_subscribers: RwLock::new(ServiceIndex::default()),
            parked: Mutex::new(ParkedSessions::default()),
            parked_count: AtomicUsize::new(0),
            limits,
        }
    }

    fn lock_parked(&self) -> MutexGuard<'_, ParkedSessions> {
        // A panic while holding it cannot leave the maps inconsistent (every
        // update is a single insert or remove), so a poisoned lock is usable.
        match self.parked.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// Register a new session under its key, kicking the previous one (MQTT
    /// take-over), and resume or discard the client's stored session
    /// (§3.1.2.4): clean_session = 1 discards it, 0 resumes it.
    pub(super) fn register(&self, session: Arc<Session>, stats: &RouterStats) -> Registered {
        let mut parked = self.lock_parked();
        self.sweep(&mut parked, stats);
        let stored = parked.map(session.class).remove(&session.key);
        self.parked_count.store(parked.len(), Ordering::Relaxed);
        let mut reg = Registered::default();
        if let Some(p) = stored {
            if session.persistent && p.class == session.class {
                if p.since.elapsed() >= self.limits.expiry {
                    stats.sessions_expired.fetch_add(1, Ordering::Relaxed);
                } else {
                    reg.session_present = true;
                    reg.resumed = p.state;
                }
            }
        }
        // A live persistent session moves to the new connection: its
        // subscriptions now, its queued and unacknowledged messages when the
        // old connection has ended (`close` hands them over).
        let previous = self.live.get(&session.key).map(|s| s.clone());
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
        if let Some(old) = self.live.insert(session.key.clone(), session.clone()) {
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
    pub(super) fn kick_where(&self, pick: impl Fn(&ClientClass) -> bool) -> usize {
        let mut n = 0;
        for s in self.live.iter() {
            if pick(&s.class) {
                s.kick(KickReason::TakeOver);
                n += 1;
            }
        }
        n
    }

    /// Close the live sessions of service account `account` (its sessions'
    /// keys start with its part of the service key). Returns how many.
    pub(super) fn kick_service_account(&self, account: &str, reason: KickReason) -> usize {
        let prefix = format!("{}:{account}:", account.len());
        let mut n = 0;
        for s in self.live.iter() {
            if s.class == ClientClass::Service && s.key.starts_with(&prefix) {
                s.kick(reason);
                n += 1;
            }
        }
        n
    }

    /// The service accounts with a live session, each once.
    pub(super) fn service_accounts(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .live
            .iter()
            .filter(|s| s.class == ClientClass::Service)
            .filter_map(|s| service_account_of(&s.key).map(str::to_owned))
            .collect();
        out.sort_unstable();
        out.dedup();
        out
    }

    /// Close machine `m`'s live session with `reason`; whether there was one.
    pub(super) fn kick_machine(&self, m: &MachineNo, reason: KickReason) -> bool {
        match self.live.get(m.as_str()) {
            Some(s) if s.class == ClientClass::Machine(*m) => {
                s.kick(reason);
                true
            }
            _ => false,
        }
    }

    /// Remove a session if it is still the registered one for its key.
    pub(super) fn unregister(&self, session: &Session) {
        self.live
            .remove_if(&session.key, |_, s| s.conn_id == session.conn_id);
        self.forget_service(session.conn_id);
    }

    /// A connection ended. A persistent session is parked with `state`
    /// (plus whatever is still in its channel); if a newer connection already
    /// took the client id over, the messages are handed to it instead.
    pub(super) fn close(
        &self,
        session: &Session,
        rx: &mut Receiver,
        state: Option<SessionState>,
        stats: &RouterStats,
    ) {
        let mut parked = self.lock_parked();
        let removed = self
            .live
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
                    stats.session_dropped.fetch_add(1, Ordering::Relaxed);
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
                    stats.session_dropped.fetch_add(1, Ordering::Relaxed);
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
        let Some(new) = self.live.get(&session.key).map(|s| s.clone()) else {
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
                    kick_over_budget(&new, stats);
                    break;
                }
                Offer::Full => {
                    kick_slow(&new, stats);
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
    fn sweep(&self, parked: &mut ParkedSessions, stats: &RouterStats) {
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
        stats.sessions_expired.fetch_add(expired, Ordering::Relaxed);
        self.parked_count.store(parked.len(), Ordering::Relaxed);
    }

    /// Persistent sessions whose client is away.
    pub(super) fn parked_count(&self) -> usize {
        self.parked_count.load(Ordering::Relaxed)
    }

    /// The live session registered under `key`.
    pub(super) fn live(&self, key: &str) -> Option<Arc<Session>> {
        self.live.get(key).map(|s| s.clone())
    }

    /// The service sessions with a filter that may match `topic_name`, each
    /// once, appended to `out` (copied out of the lock: offering to them
    /// may take the parked lock, which `register` holds while it updates
    /// the index). The caller checks each with [`Session::granted`].
    pub(super) fn service_candidates(&self, topic_name: &str, out: &mut Vec<Arc<Session>>) {
        {
            let index = match self.service_subscribers.read() {
                Ok(g) => g,
                Err(p) => p.into_inner(),
            };
            if index.is_empty() {
                return;
            }
            index.candidates(topic_name, out);
        }
        // Overlapping filters list a session more than once; it gets one copy.
        if out.len() > 1 {
            out.sort_unstable_by_key(|s| s.conn_id);
            out.dedup_by_key(|s| s.conn_id);
        }
    }

    /// Queue a message for a parked session, or for the live session that
    /// replaced it meanwhile. QoS 0 is not queued (§3.1.2.4 allows either).
    pub(super) fn offer_parked(
        &self,
        class: ClientClass,
        key: &str,
        topic_name: &str,
        make: &dyn Fn(QoS) -> Outbound,
        stats: &RouterStats,
    ) {
        let mut parked = self.lock_parked();
        if let Some(p) = parked.map(class).get_mut(key) {
            let Some(g) = granted_in(&p.state.subs, topic_name) else {
                return;
            };
            let msg = make(g);
            if msg.qos == QoS::AtMostOnce {
                return;
            }
            let cap = self.queue_cap(class);
            self.park_message(p, msg, cap, stats);
            return;
        }
        // Not parked: it may have resumed between the publisher's look-up
        // and this lock (register holds it while installing the session).
        let live = self.live(key);
        drop(parked);
        if let Some(s) = live {
            if let Some(g) = s.granted(topic_name) {
                match s.offer(make(g)) {
                    Offer::Full => kick_slow(&s, stats),
                    Offer::OverBudget => kick_over_budget(&s, stats),
                    Offer::Queued | Offer::Closed => {}
                }
            }
        }
    }

    /// Queue a message for every parked service session it matches.
    pub(super) fn offer_parked_services(
        &self,
        topic_name: &str,
        make: &dyn Fn(QoS) -> Outbound,
        stats: &RouterStats,
    ) {
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
            self.park_message(p, msg, cap, stats);
        }
    }

    /// Queue `msg` for a parked session if it fits its count and bytes.
    fn park_message(&self, p: &mut Parked, msg: Outbound, cap: usize, stats: &RouterStats) {
        let c = msg.cost();
        if p.state.queue.len() < cap && p.bytes.saturating_add(c) <= self.limits.max_parked_bytes {
            p.bytes += c;
            p.state.queue.push_back(detached(msg));
        } else {
            stats.session_dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn index(&self) -> std::sync::RwLockWriteGuard<'_, ServiceIndex> {
        // Every update replaces one session's entries whole; a panic midway
        // leaves at worst stale candidates, which `granted` filters out.
        match self.service_subscribers.write() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    fn forget_service(&self, conn_id: u64) {
        self.index().remove(conn_id);
    }

    /// A service session's subscription set changed.
    pub(super) fn service_subscriptions_changed(&self, session: &Arc<Session>) {
        if session.class != ClientClass::Service {
            return;
        }
        // Only index sessions that are still the registered one.
        let current = self
            .live
            .get(&session.key)
            .is_some_and(|s| s.conn_id == session.conn_id);
        let filters: Vec<String> = if current {
            session
                .subscriptions()
                .into_iter()
                .map(|(f, _)| f)
                .collect()
        } else {
            Vec::new()
        };
        self.index().set(session, filters);
    }

    pub(super) fn live_count(&self) -> usize {
        self.live.len()
    }
}

/// A message to be kept while its client is away: its own copy of the
/// payload, which otherwise is a view into the publisher's read buffer and
/// would pin that whole buffer for as long as the session is parked.
fn detached(mut m: Outbound) -> Outbound {
    m.payload = Bytes::copy_from_slice(&m.payload);
    m
}
