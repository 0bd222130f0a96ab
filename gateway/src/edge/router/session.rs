//! One client's session as the router sees it: its identity, its
//! subscriptions (bounded in count and bytes), its connection's memory
//! budget, and the queue that carries messages to its connection's task.
//! The connection holds the other half (`edge::conn`): the socket and the
//! in-flight window.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use rumqttc::mqttbytes::QoS;
use tokio::sync::mpsc;

use super::outbox::Outbound;
use super::outbox::Sender;
use tokio_util::sync::CancellationToken;
use vendgate_proto::topic;

use super::super::acl::ClientClass;

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
    tx: Sender,
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
pub(super) fn service_account_of(key: &str) -> Option<&str> {
    let (len, rest) = key.split_once(':')?;
    rest.get(..len.parse::<usize>().ok()?)
}

impl Session {
    pub fn new(
        conn_id: u64,
        client_id: String,
        class: ClientClass,
        persistent: bool,
        tx: Sender,
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

    /// Make the kick a child of `stop` (the hub's shutdown): cancelling
    /// `stop` kicks this session too, so its connection waits on one
    /// signal instead of two.
    pub fn with_stop_parent(mut self, stop: &CancellationToken) -> Self {
        self.kick = stop.child_token();
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
    pub(super) fn granted(&self, topic_name: &str) -> Option<QoS> {
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
                    reserve_first(&mut subs);
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
        reserve_first(&mut subs);
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
    pub(super) fn set_subscriptions(&self, subs: Vec<(String, QoS)>) {
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
    pub(super) fn offer(&self, msg: Outbound) -> Offer {
        let cost = msg.cost();
        if !self.charge(cost) {
            return Offer::OverBudget;
        }
        // Boxed: a queued message is one pointer in the queue's buffer, so
        // a connection's queue stays small whatever a message holds.
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

/// Room for exactly one subscription in an empty list: a machine holds one
/// for as long as it is connected, and the default first growth (four
/// slots) would triple that on every idle machine.
fn reserve_first(subs: &mut Vec<(String, QoS)>) {
    if subs.capacity() == 0 {
        subs.reserve_exact(1);
    }
}

/// What became of a message offered to a session's queue.
pub(super) enum Offer {
    Queued,
    /// The connection is ending: the message goes to its parked session, if
    /// it keeps one (it was not lost to a slow consumer).
    Closed,
    /// The connection cannot keep up.
    Full,
    /// The connection's memory budget has no room for the message.
    OverBudget,
}

/// Overlapping subscriptions (§3.3.5): the message is delivered once, at the
/// highest QoS any matching filter granted.
pub(super) fn granted_in(subs: &[(String, QoS)], topic_name: &str) -> Option<QoS> {
    subs.iter()
        .filter(|(f, _)| topic::filter_matches(f, topic_name))
        .map(|(_, q)| *q)
        .max_by_key(|q| *q as u8)
}

/// The QoS a message is delivered at: the lower of the publish's and the
/// subscription's (MQTT 3.1.1 §3.8.4).
pub fn min_qos(a: QoS, b: QoS) -> QoS {
    if (a as u8) <= (b as u8) {
        a
    } else {
        b
    }
}
