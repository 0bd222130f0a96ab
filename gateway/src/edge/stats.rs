//! Counters the MQTT edge bumps on its hot path: messages and bytes per topic
//! pattern and direction, connects, disconnects by reason, refused CONNECTs,
//! and the wire-level timings of dispense commands. Plain atomics indexed by
//! small enums, so a publish costs a topic parse and two relaxed adds; the
//! metrics module copies them into the exposition at scrape time.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use metrics::Histogram;
use serde::Deserialize;
use tokio::time::Instant;
use vendgate_proto::topic::{self, Command, Topic, Uplink};

/// Label of traffic on topics that are not the device protocol's (service
/// clients' own topics, malformed machine topics). One label for all of them
/// keeps the series count fixed whatever clients invent.
pub const OTHER: &str = "other";

/// Every `pattern` label value, in index order. Literals because the proto
/// crate's `pattern()` is not `const`; a test checks they agree.
pub const PATTERNS: [&str; 10] = [
    "vend/v1/+/state",
    "vend/v1/+/inventory",
    "vend/v1/+/pong",
    "vend/v1/+/ack",
    "vend/v1/+/result",
    "vend/v1/+/cmd/dispense",
    "vend/v1/+/cmd/cancel",
    "vend/v1/+/cmd/ping",
    "vend/v1/+/cmd/go",
    OTHER,
];

/// Which way a message crossed the edge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Received from a client (machine or service), including wills.
    In,
    /// Written to a client's socket.
    Out,
}

impl Direction {
    pub const ALL: [Self; 2] = [Self::In, Self::Out];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::In => "in",
            Self::Out => "out",
        }
    }
}

/// Index into [`PATTERNS`] for a parsed topic.
fn index_of(t: Option<Topic>) -> usize {
    match t {
        Some(Topic::Uplink(_, u)) => match u {
            Uplink::State => 0,
            Uplink::Inventory => 1,
            Uplink::Pong => 2,
            Uplink::Ack => 3,
            Uplink::Result => 4,
        },
        Some(Topic::Command(_, c)) => match c {
            Command::Dispense => 5,
            Command::Cancel => 6,
            Command::Ping => 7,
            Command::Go => 8,
        },
        None => 9,
    }
}

/// Messages and bytes per (direction, pattern).
#[derive(Debug, Default)]
pub struct TopicStats {
    messages: [[AtomicU64; PATTERNS.len()]; 2],
    bytes: [[AtomicU64; PATTERNS.len()]; 2],
}

impl TopicStats {
    /// Count one message on `topic_name` of `bytes` (topic + payload).
    /// Returns the parsed topic so callers need not parse it again.
    pub fn record(&self, dir: Direction, topic_name: &str, bytes: usize) -> Option<Topic> {
        let t = topic::parse(topic_name);
        let i = index_of(t);
        let d = dir as usize;
        self.messages[d][i].fetch_add(1, Ordering::Relaxed);
        self.bytes[d][i].fetch_add(bytes as u64, Ordering::Relaxed);
        t
    }

    /// (messages, bytes) for one direction and pattern index.
    pub fn get(&self, dir: Direction, pattern: usize) -> (u64, u64) {
        let d = dir as usize;
        match (self.messages[d].get(pattern), self.bytes[d].get(pattern)) {
            (Some(m), Some(b)) => (m.load(Ordering::Relaxed), b.load(Ordering::Relaxed)),
            _ => (0, 0),
        }
    }
}

/// Who a connection belonged to, for the connect/disconnect labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientKind {
    Machine,
    Service,
}

impl ClientKind {
    pub const ALL: [Self; 2] = [Self::Machine, Self::Service];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Machine => "machine",
            Self::Service => "service",
        }
    }
}

/// Why a connection ended (or never started, for `AuthFailure`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DisconnectReason {
    /// The client sent DISCONNECT.
    Clean,
    /// The socket closed or failed without DISCONNECT.
    SocketClosed,
    /// Nothing received for 1.5 × keep alive.
    KeepAliveTimeout,
    /// A newer connection with the same client id replaced this one.
    TakeOver,
    /// Malformed packets or protocol misuse.
    ProtocolViolation,
    /// A PUBLISH outside the client's ACL.
    AclViolation,
    /// The client did not read its messages fast enough.
    SlowConsumer,
    /// The gateway is shutting down.
    Shutdown,
    /// CONNECT refused: wrong or unknown credentials.
    AuthFailure,
    /// A packet larger than `mqtt.max_packet_size`.
    PacketTooLarge,
    /// More unreleased QoS 2 publishes than `mqtt.max_inflight`.
    InflightExceeded,
    /// A machine over `mqtt.machine_publish_rate`.
    RateLimited,
    /// Over `mqtt.machine_connection_memory` / `mqtt.service_connection_memory`.
    MemoryBudget,
    /// The account was disabled or removed while connected.
    Revoked,
}

impl DisconnectReason {
    pub const ALL: [Self; 14] = [
        Self::Clean,
        Self::SocketClosed,
        Self::KeepAliveTimeout,
        Self::TakeOver,
        Self::ProtocolViolation,
        Self::AclViolation,
        Self::SlowConsumer,
        Self::Shutdown,
        Self::AuthFailure,
        Self::PacketTooLarge,
        Self::InflightExceeded,
        Self::RateLimited,
        Self::MemoryBudget,
        Self::Revoked,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Clean => "clean",
            Self::SocketClosed => "socket_closed",
            Self::KeepAliveTimeout => "keep_alive_timeout",
            Self::TakeOver => "take_over",
            Self::ProtocolViolation => "protocol_violation",
            Self::AclViolation => "acl_violation",
            Self::SlowConsumer => "slow_consumer",
            Self::Shutdown => "shutdown",
            Self::AuthFailure => "auth_failure",
            Self::PacketTooLarge => "packet_too_large",
            Self::InflightExceeded => "inflight_exceeded",
            Self::RateLimited => "rate_limited",
            Self::MemoryBudget => "memory_budget",
            Self::Revoked => "revoked",
        }
    }
}

/// Every `reason` label of refused CONNECTs: the authenticator's refusals
/// (`edge::auth::Refusal::as_str`) and the edge's own checks.
pub const REFUSALS: [&str; 15] = [
    "no_credentials",
    "unknown_machine",
    "wrong_secret",
    "client_id_mismatch",
    "bad_client_id",
    "unknown_service",
    "storage_unavailable",
    "busy",
    "protocol_version",
    "will_not_allowed",
    "bad_certificate",
    "disabled",
    "throttled",
    "rate_limited",
    "other",
];

/// Connects, disconnects and refusals.
#[derive(Debug, Default)]
pub struct ConnectionStats {
    connects: [AtomicU64; 2],
    disconnects: [[AtomicU64; DisconnectReason::ALL.len()]; 2],
    refused: [AtomicU64; REFUSALS.len()],
}

impl ConnectionStats {
    pub fn connected(&self, kind: ClientKind) {
        self.connects[kind as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn disconnected(&self, kind: ClientKind, reason: DisconnectReason) {
        self.disconnects[kind as usize][reason as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// A refused CONNECT; `reason` outside [`REFUSALS`] counts as `other`.
    /// Credential refusals also count as an `auth_failure` disconnect of the
    /// kind the username claims (all digits: a machine), so one series shows
    /// every way a machine failed to stay connected.
    pub fn refused(&self, reason: &str, username: Option<&str>) {
        let i = REFUSALS
            .iter()
            .position(|r| *r == reason)
            .unwrap_or(REFUSALS.len() - 1);
        self.refused[i].fetch_add(1, Ordering::Relaxed);
        let credentials = matches!(
            reason,
            "no_credentials"
                | "unknown_machine"
                | "wrong_secret"
                | "client_id_mismatch"
                | "unknown_service"
                | "bad_certificate"
                | "disabled"
        );
        if credentials {
            // The authenticator's own rule: an all-digit username is a machine.
            let service =
                username.is_some_and(|u| !u.is_empty() && !u.bytes().all(|b| b.is_ascii_digit()));
            let kind = if service {
                ClientKind::Service
            } else {
                ClientKind::Machine
            };
            self.disconnected(kind, DisconnectReason::AuthFailure);
        }
    }

    pub fn connects(&self, kind: ClientKind) -> u64 {
        self.connects[kind as usize].load(Ordering::Relaxed)
    }

    pub fn disconnects(&self, kind: ClientKind, reason: DisconnectReason) -> u64 {
        self.disconnects[kind as usize][reason as usize].load(Ordering::Relaxed)
    }

    pub fn refusals(&self, i: usize) -> u64 {
        self.refused.get(i).map_or(0, |a| a.load(Ordering::Relaxed))
    }
}

/// Histograms of the dispense round trip as seen on the wire, handed to the
/// hub when it is built (the default records nothing, for an edge built
/// without metrics).
#[derive(Debug, Clone)]
pub struct Timings {
    /// `cmd/dispense` written → the machine's `ack` for that order.
    pub accept: Histogram,
    /// Accepting `ack` → the machine's `result` for that order.
    pub dispense: Histogram,
}

impl Default for Timings {
    fn default() -> Self {
        Self {
            accept: Histogram::noop(),
            dispense: Histogram::noop(),
        }
    }
}

/// The fields of `cmd/dispense`, `ack` and `result` that the timings need;
/// everything else in the payload is skipped by serde.
#[derive(Deserialize)]
struct OrderRef {
    order_id: u64,
    #[serde(default)]
    accepted: Option<bool>,
}

/// One machine connection's dispense in progress. A machine runs one order at
/// a time (the order service queues the rest), so one slot is enough, and it
/// is one slot rather than two because it sits in every connection's state;
/// a stale or foreign message just records nothing.
#[derive(Debug, Default)]
pub struct DispenseClock {
    /// Order, when its last step happened, and whether that step was the
    /// accepting ack (else: the command was written).
    slot: Option<(u64, Instant, bool)>,
}

impl DispenseClock {
    /// Outbound message to this machine.
    pub fn on_out(&mut self, t: Option<Topic>, payload: &[u8]) {
        if let Some(Topic::Command(_, Command::Dispense)) = t {
            if let Ok(r) = serde_json::from_slice::<OrderRef>(payload) {
                self.slot = Some((r.order_id, Instant::now(), false));
            }
        }
    }

    /// Inbound message from this machine (after the ACL).
    pub fn on_in(&mut self, timings: &Timings, t: Option<Topic>, payload: &[u8]) {
        let kind = match t {
            Some(Topic::Uplink(_, k @ (Uplink::Ack | Uplink::Result))) => k,
            _ => return,
        };
        let Some((id, at, accepted)) = self.slot else {
            return;
        };
        let Ok(r) = serde_json::from_slice::<OrderRef>(payload) else {
            return;
        };
        if r.order_id != id {
            return;
        }
        let now = Instant::now();
        match (kind, accepted) {
            (Uplink::Ack, false) => {
                record(&timings.accept, now - at);
                self.slot = (r.accepted == Some(true)).then_some((id, now, true));
            }
            (Uplink::Result, true) => {
                record(&timings.dispense, now - at);
                self.slot = None;
            }
            _ => {}
        }
    }
}

fn record(h: &Histogram, d: Duration) {
    h.record(d.as_secs_f64());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_index_their_topics() {
        let m: vendgate_proto::machine::MachineNo = "12345678".parse().unwrap();
        for u in Uplink::ALL {
            let t = topic::uplink(&m, u);
            assert_eq!(PATTERNS[index_of(topic::parse(&t))], u.pattern());
        }
        for c in Command::ALL {
            let t = topic::command(&m, c);
            assert_eq!(PATTERNS[index_of(topic::parse(&t))], c.pattern());
        }
        assert_eq!(PATTERNS[index_of(topic::parse("plant/1/temp"))], OTHER);
        assert_eq!(
            PATTERNS[index_of(topic::parse("vend/v1/12345678/extra"))],
            OTHER
        );
    }

    #[test]
    fn topic_stats_count_by_pattern_and_direction() {
        let s = TopicStats::default();
        s.record(Direction::In, "vend/v1/12345678/ack", 30);
        s.record(Direction::In, "vend/v1/87654321/ack", 10);
        s.record(Direction::Out, "x/y", 5);
        assert_eq!(s.get(Direction::In, 3), (2, 40));
        assert_eq!(s.get(Direction::Out, PATTERNS.len() - 1), (1, 5));
        assert_eq!(s.get(Direction::Out, 3), (0, 0));
        assert_eq!(s.get(Direction::Out, 99), (0, 0));
    }

    #[tokio::test]
    async fn dispense_clock_times_one_order_at_a_time() {
        // Samples go nowhere: the clock's bookkeeping is under test here;
        // recording is covered end to end.
        let timings = Timings::default();
        let m: vendgate_proto::machine::MachineNo = "12345678".parse().unwrap();
        let cmd = topic::parse(&topic::command(&m, Command::Dispense));
        let ack = topic::parse(&topic::uplink(&m, Uplink::Ack));
        let result = topic::parse(&topic::uplink(&m, Uplink::Result));
        let mut c = DispenseClock::default();
        // An ack before any command, or for another order, records nothing.
        c.on_in(&timings, ack, br#"{"order_id":1,"accepted":true}"#);
        assert!(c.slot.is_none());
        c.on_out(cmd, br#"{"order_id":7,"items":[],"ttl_ms":3000}"#);
        c.on_in(&timings, ack, br#"{"order_id":6,"accepted":true}"#);
        assert_eq!(c.slot.map(|s| (s.0, s.2)), Some((7, false)));
        c.on_in(&timings, ack, br#"{"order_id":7,"accepted":true}"#);
        assert_eq!(c.slot.map(|s| (s.0, s.2)), Some((7, true)));
        c.on_in(&timings, result, br#"{"order_id":7,"items":[]}"#);
        assert!(c.slot.is_none());
        // A refusal ends the order's clock.
        c.on_out(cmd, br#"{"order_id":8,"items":[],"ttl_ms":3000}"#);
        c.on_in(&timings, ack, br#"{"order_id":8,"accepted":false}"#);
        assert!(c.slot.is_none());
    }

    #[test]
    fn auth_refusals_count_as_disconnects_of_the_claimed_kind() {
        let s = ConnectionStats::default();
        s.refused("wrong_secret", Some("12345678"));
        s.refused("unknown_service", Some("svc-ops"));
        s.refused("protocol_version", None);
        s.refused("something_new", None);
        assert_eq!(
            s.disconnects(ClientKind::Machine, DisconnectReason::AuthFailure),
            1
        );
        assert_eq!(
            s.disconnects(ClientKind::Service, DisconnectReason::AuthFailure),
            1
        );
        let protocol = REFUSALS.iter().position(|r| *r == "protocol_version");
        assert_eq!(protocol.map(|i| s.refusals(i)), Some(1));
        assert_eq!(s.refusals(REFUSALS.len() - 1), 1);
        s.refused("disabled", Some("12345678"));
        assert_eq!(
            s.disconnects(ClientKind::Machine, DisconnectReason::AuthFailure),
            2,
            "a disabled machine's refusal counts as a failed connect"
        );
    }
}
