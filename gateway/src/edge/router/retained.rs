//! Retained messages (MQTT 3.1.1 §3.3.1.3): the last retained message of
//! each topic, bounded in entries, in bytes, and in bytes per message, and
//! looked up by a new subscription's literal prefix.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::{Arc, RwLock};

use bytes::Bytes;
use rumqttc::mqttbytes::QoS;
use vendgate_proto::topic;

use super::outbox::{message_cost, Outbound};
use super::session::min_qos;

/// Caps of the retained store.
#[derive(Debug, Clone, Copy)]
pub struct RetainedLimits {
    pub max_entries: usize,
    /// Topic + payload bytes of every retained message together.
    pub max_bytes: usize,
    /// Topic + payload bytes of one retained message.
    pub max_message: usize,
}

impl RetainedLimits {
    /// At most `max_entries` messages, of any size.
    pub(super) fn entries(max_entries: usize) -> Self {
        Self {
            max_entries,
            max_bytes: usize::MAX,
            max_message: usize::MAX,
        }
    }
}

#[derive(Debug, Default)]
struct RetainedMessages {
    /// Ordered, so a subscription only scans the topics under its literal
    /// prefix: 10,000 machines each subscribing to their own commands must
    /// not each scan every machine's retained state (measured: that scan was
    /// most of a reconnect storm's CPU).
    map: BTreeMap<String, (Bytes, QoS)>,
    /// Sum of topic + payload lengths in `map`.
    bytes: usize,
}

/// The retained messages, behind their own lock.
#[derive(Debug)]
pub(super) struct RetainedStore {
    messages: RwLock<RetainedMessages>,
    limits: RetainedLimits,
}

impl RetainedStore {
    pub(super) fn new(limits: RetainedLimits) -> Self {
        Self {
            messages: RwLock::new(RetainedMessages::default()),
            limits,
        }
    }

    pub(super) fn set_limits(&mut self, limits: RetainedLimits) {
        self.limits = limits;
    }

    /// Retained messages kept now: (entries, bytes).
    pub(super) fn usage(&self) -> (usize, usize) {
        self.messages
            .read()
            .map(|r| (r.map.len(), r.bytes))
            .unwrap_or_default()
    }

    /// Keep, replace or clear the retained message of `topic_name`, within
    /// the caps; false when a message over a cap was refused. The topic's
    /// previous retained message, if any, is then cleared, so a subscriber
    /// never gets a stale state as the current one.
    pub(super) fn keep(&self, topic_name: &str, payload: &Bytes, qos: QoS) -> bool {
        let Ok(mut r) = self.messages.write() else {
            return true;
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
            return true;
        }
        let l = self.limits;
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
            true
        } else {
            if exists {
                r.map.remove(topic_name);
                r.bytes -= old;
            }
            false
        }
    }

    /// Retained messages matching a new subscription (sent with retain = 1)
    /// except those `withheld`, and what they cost ([`Outbound::cost`]), if
    /// that is at most `budget`; None, having built no more than `budget`
    /// bytes' worth, if not.
    pub(super) fn matching(
        &self,
        filter: &str,
        granted: QoS,
        budget: usize,
        withheld: impl Fn(&str) -> bool,
    ) -> Option<(Vec<Outbound>, usize)> {
        let Ok(r) = self.messages.read() else {
            return Some((Vec::new(), 0));
        };
        // Every matching topic starts with the filter's text before its
        // first wildcard.
        let prefix = filter.find(['+', '#']).map_or(filter, |i| &filter[..i]);
        let matching = r
            .map
            .range::<str, _>((Bound::Included(prefix), Bound::Unbounded))
            .take_while(|(t, _)| t.starts_with(prefix))
            .filter(|(t, _)| topic::filter_matches(filter, t) && !withheld(t));
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
