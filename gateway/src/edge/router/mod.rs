//! The routing table inside the hub: fan-out of one PUBLISH to every
//! matching session, over the session table (`sessions`: who is connected,
//! subscribed, or away with a persistent session) and the retained store
//! (`retained`). `session` is one session as the router sees it.
//!
//! Machines only ever subscribe under their own prefix, so a topic under
//! `vend/v1/{m}/` reaches at most one machine session (looked up by key, O(1));
//! service sessions are found through an index of their filters' levels
//! (`index`), so a publish visits only the services whose filters can match
//! it, however many services are subscribed. The common publish allocates
//! only what it delivers (one shared topic, one queue entry per recipient).
//!
//! Everything a client can make the hub hold is bounded: subscriptions per
//! session (count and bytes; an identical filter replaces the existing one),
//! each connection's memory (messages queued or in flight to it, retained
//! messages replayed to it, its subscriptions: [`Session::charge`]), parked
//! sessions (messages and bytes), and the retained store (entries, bytes,
//! bytes per message). Topics matching `mqtt.deny_filters` are delivered to
//! nobody, so a wide subscription that overlaps a denied filter is granted
//! and simply never sees the denied topics.

mod index;
mod outbox;
mod retained;
mod session;
mod sessions;
#[cfg(test)]
mod tests;

use std::cell::OnceCell;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use rumqttc::mqttbytes::QoS;
use vendgate_proto::machine::MachineNo;
use vendgate_proto::topic;

pub use super::acl::ClientClass;
pub use outbox::{
    message_cost, outbox, Outbound, Receipt, Receiver as OutboxRx, Sender as OutboxTx,
};
pub use retained::RetainedLimits;
pub use session::{min_qos, service_key, KickReason, Session, SessionBudget, SubscribeRefusal};
pub use sessions::{InflightOut, Registered, RouterStats, SessionLimits, SessionState};

use retained::RetainedStore;
use session::Offer;
use sessions::{kick_over_budget, kick_slow, SessionTable};

thread_local! {
    /// The service candidates of a publish, reused so routing does not
    /// allocate a list per publish.
    static SCRATCH: std::cell::Cell<Vec<Arc<Session>>> = const { std::cell::Cell::new(Vec::new()) };
}

/// The scratch list's capacity kept between publishes (pointers).
const SCRATCH_KEEP: usize = 1024;

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

/// The routing table inside the [`Hub`](super::Hub): sessions by key,
/// service subscribers, persistent sessions of away clients, retained
/// messages, and the deny list.
#[derive(Debug)]
pub struct Router {
    sessions: SessionTable,
    retained: RetainedStore,
    /// `mqtt.deny_filters`: topics matching one are delivered to nobody.
    deny: Vec<String>,
    pub stats: RouterStats,
}

impl Router {
    pub fn new(max_retained: usize) -> Self {
        Self::with_limits(max_retained, SessionLimits::default())
    }

    pub fn with_limits(max_retained: usize, limits: SessionLimits) -> Self {
        Self {
            sessions: SessionTable::new(limits),
            retained: RetainedStore::new(RetainedLimits::entries(max_retained)),
            deny: Vec::new(),
            stats: RouterStats::default(),
        }
    }

    /// Cap the retained store in bytes as well as entries.
    pub fn with_retained_limits(mut self, limits: RetainedLimits) -> Self {
        self.retained.set_limits(limits);
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
        self.retained.usage()
    }

    /// Register a new session under its client id, kicking the previous one
    /// (MQTT take-over), and resume or discard the client's stored session
    /// (§3.1.2.4): clean_session = 1 discards it, 0 resumes it.
    pub fn register(&self, session: Arc<Session>) -> Registered {
        self.sessions.register(session, &self.stats)
    }

    /// Kick every live session whose class matches (as a take-over: no
    /// will). A scan: for the rare cross-node take-over and for fencing.
    pub fn kick_where(&self, pick: impl Fn(&ClientClass) -> bool) -> usize {
        self.sessions.kick_where(pick)
    }

    /// Close the live sessions of service account `account` (its sessions'
    /// keys start with its part of [`service_key`]). Returns how many.
    pub fn kick_service_account(&self, account: &str, reason: KickReason) -> usize {
        self.sessions.kick_service_account(account, reason)
    }

    /// The service accounts with a live session, each once.
    pub fn service_accounts(&self) -> Vec<String> {
        self.sessions.service_accounts()
    }

    /// Close machine `m`'s live session with `reason`; whether there was one.
    pub fn kick_machine(&self, m: &MachineNo, reason: KickReason) -> bool {
        self.sessions.kick_machine(m, reason)
    }

    /// Remove a session if it is still the registered one for its client id.
    /// Used by tests; connections end through [`Router::close`].
    pub fn unregister(&self, session: &Session) {
        self.sessions.unregister(session);
    }

    /// A connection ended. A persistent session is parked with `state`
    /// (plus whatever is still in its channel); if a newer connection already
    /// took the client id over, the messages are handed to it instead.
    pub fn close(&self, session: &Session, rx: &mut OutboxRx, state: Option<SessionState>) {
        self.sessions.close(session, rx, state, &self.stats);
    }

    /// Persistent sessions whose client is away.
    pub fn parked_count(&self) -> usize {
        self.sessions.parked_count()
    }

    /// A service session's subscription set changed.
    pub fn service_subscriptions_changed(&self, session: &Arc<Session>) {
        self.sessions.service_subscriptions_changed(session);
    }

    pub fn session_count(&self) -> usize {
        self.sessions.live_count()
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
        if retain && !self.retained.keep(topic_name, &payload, qos) {
            self.stats.retained_refused.fetch_add(1, Ordering::Relaxed);
        }
        // Made on the first delivery: a publish nobody receives allocates
        // nothing.
        let topic_arc: OnceCell<Arc<str>> = OnceCell::new();
        let make = |granted: QoS| Outbound {
            topic: topic_arc.get_or_init(|| Arc::from(topic_name)).clone(),
            payload: payload.clone(),
            qos: min_qos(qos, granted),
            // §3.3.1.3: messages forwarded to existing subscribers carry retain 0.
            retain: false,
            receipt: None,
        };
        let stats = &self.stats;

        let any_parked = self.parked_count() > 0;
        let machine = match topic::machine_of(topic_name) {
            None => MachineDelivery::NotAMachineTopic,
            Some(m) => match self.sessions.live(m.as_str()) {
                Some(s) if s.class == ClientClass::Machine(m) => match s.granted(topic_name) {
                    Some(g) => match s.offer(Outbound {
                        receipt: receipt.clone(),
                        ..make(g)
                    }) {
                        Offer::Queued => {
                            stats.delivered.fetch_add(1, Ordering::Relaxed);
                            MachineDelivery::Queued
                        }
                        Offer::Closed => {
                            if s.persistent {
                                self.sessions
                                    .offer_parked(s.class, &s.key, topic_name, &make, stats);
                            }
                            MachineDelivery::NotConnected
                        }
                        Offer::Full => {
                            kick_slow(&s, stats);
                            MachineDelivery::Backpressure
                        }
                        Offer::OverBudget => {
                            kick_over_budget(&s, stats);
                            MachineDelivery::Backpressure
                        }
                    },
                    None => MachineDelivery::NotSubscribed,
                },
                _ => {
                    if any_parked {
                        self.sessions.offer_parked(
                            ClientClass::Machine(m),
                            m.as_str(),
                            topic_name,
                            &make,
                            stats,
                        );
                    }
                    MachineDelivery::NotConnected
                }
            },
        };

        let mut services = SCRATCH.with(|c| c.take());
        self.sessions.service_candidates(topic_name, &mut services);
        for s in services.drain(..) {
            if let Some(g) = s.granted(topic_name) {
                match s.offer(make(g)) {
                    Offer::Queued => {
                        stats.delivered.fetch_add(1, Ordering::Relaxed);
                    }
                    Offer::Closed => {
                        if s.persistent {
                            self.sessions
                                .offer_parked(s.class, &s.key, topic_name, &make, stats);
                        }
                    }
                    Offer::Full => kick_slow(&s, stats),
                    Offer::OverBudget => kick_over_budget(&s, stats),
                }
            }
        }
        // Kept for the next publish on this thread, unless a rare fan-out
        // left it large.
        if services.capacity() <= SCRATCH_KEEP {
            SCRATCH.with(|c| c.replace(services));
        }
        if any_parked {
            self.sessions
                .offer_parked_services(topic_name, &make, stats);
        }
        machine
    }

    /// Retained messages matching a new subscription (sent with retain = 1).
    pub fn retained_for(&self, filter: &str, granted: QoS) -> Vec<Outbound> {
        self.retained_within(filter, granted, usize::MAX)
            .map(|(v, _)| v)
            .unwrap_or_default()
    }

    /// Retained messages matching a new subscription, and what they cost
    /// ([`Outbound::cost`]), if that is at most `budget`; None, having
    /// built no more than `budget` bytes' worth, if not. Denied topics are
    /// never replayed.
    pub fn retained_within(
        &self,
        filter: &str,
        granted: QoS,
        budget: usize,
    ) -> Option<(Vec<Outbound>, usize)> {
        self.retained
            .matching(filter, granted, budget, |t| self.denied(t))
    }
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
