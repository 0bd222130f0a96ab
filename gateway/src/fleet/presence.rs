//! Presence registry: which machines are online right now, since when, and how
//! they got there. The edge is the only writer; everything else reads.
//!
//! Every accepted machine CONNECT takes a fresh *epoch*. A close only marks the
//! machine offline when it carries the current epoch, so the late close of a
//! connection that was taken over never flips a newer connection offline.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use dashmap::DashMap;
use serde::Serialize;
use tokio::sync::broadcast;
use vendgate_proto::machine::MachineNo;

/// A machine counts as flapping with this many connects in the last hour.
pub const FLAP_THRESHOLD: u32 = 3;

/// How long a connect counts towards a machine's flap counter.
const FLAP_WINDOW: Duration = Duration::from_secs(3600);
/// Capacity of the change stream; a lagging reader resynchronises from
/// [`PresenceRegistry::snapshot`].
const EVENT_CAPACITY: usize = 16 * 1024;

/// Why a machine went offline; also the `reason` label of the disconnect metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OfflineReason {
    /// The machine sent DISCONNECT.
    Clean,
    /// The socket closed or failed without DISCONNECT.
    SocketClosed,
    /// Nothing received for 1.5 × keep alive.
    KeepAliveTimeout,
    /// A protocol error, an ACL violation or a flood closed the connection.
    ProtocolViolation,
    /// The machine announced `{"online":false}` on its state topic.
    StateOffline,
    /// The gateway is shutting down.
    Shutdown,
}

impl OfflineReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Clean => "clean",
            Self::SocketClosed => "socket_closed",
            Self::KeepAliveTimeout => "keep_alive_timeout",
            Self::ProtocolViolation => "protocol_violation",
            Self::StateOffline => "state_offline",
            Self::Shutdown => "shutdown",
        }
    }
}

/// A change of a machine's presence, in the order the registry applied it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PresenceEvent {
    pub machine_no: MachineNo,
    pub online: bool,
    pub epoch: u64,
    pub at: DateTime<Utc>,
    /// `None` when the event is a connect.
    pub reason: Option<OfflineReason>,
    /// True when this connect replaced a live connection (take-over).
    pub took_over: bool,
}

/// Point-in-time view of one machine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MachinePresence {
    pub machine_no: MachineNo,
    pub online: bool,
    pub epoch: u64,
    pub online_since: Option<DateTime<Utc>>,
    pub last_seen: Option<DateTime<Utc>>,
    pub firmware: Option<String>,
    pub last_rtt_ms: Option<u64>,
    /// Connects in the last hour.
    pub flaps: u32,
    pub last_offline_reason: Option<OfflineReason>,
}

#[derive(Debug, Default)]
struct Entry {
    online: bool,
    epoch: u64,
    online_since: Option<DateTime<Utc>>,
    last_seen: Option<DateTime<Utc>>,
    firmware: Option<String>,
    last_rtt_ms: Option<u64>,
    connects: VecDeque<Instant>,
    last_offline_reason: Option<OfflineReason>,
}

/// The registry. Cheap to share behind an `Arc`; all methods take `&self`.
#[derive(Debug)]
pub struct PresenceRegistry {
    machines: DashMap<MachineNo, Entry>,
    next_epoch: AtomicU64,
    events: broadcast::Sender<PresenceEvent>,
}

impl Default for PresenceRegistry {
    fn default() -> Self {
        Self::new()
    }
}

impl PresenceRegistry {
    pub fn new() -> Self {
        // Epochs are persisted with presence rows; seeding from the wall clock
        // (µs) keeps them increasing across restarts, so a row written by the
        // previous process never outranks a connection of this one.
        let seed = u64::try_from(Utc::now().timestamp_micros())
            .unwrap_or(1)
            .max(1);
        let (events, _) = broadcast::channel(EVENT_CAPACITY);
        Self {
            machines: DashMap::new(),
            next_epoch: AtomicU64::new(seed),
            events,
        }
    }

    /// Subscribe to presence changes.
    pub fn subscribe(&self) -> broadcast::Receiver<PresenceEvent> {
        self.events.subscribe()
    }

    /// A machine's CONNECT was accepted: it is online from now, under a new
    /// epoch which the connection must present when it ends.
    pub fn connected(&self, machine_no: MachineNo) -> u64 {
        let epoch = self.next_epoch.fetch_add(1, Ordering::Relaxed);
        self.connected_at(machine_no, epoch)
    }

    /// [`Self::connected`] under an epoch taken elsewhere (cluster mode: the
    /// cluster-wide counter). Returns `epoch`.
    pub fn connected_at(&self, machine_no: MachineNo, epoch: u64) -> u64 {
        let now = Utc::now();
        let took_over;
        {
            let mut e = self.machines.entry(machine_no).or_default();
            took_over = e.online;
            e.online = true;
            e.epoch = epoch;
            e.online_since = Some(now);
            e.last_seen = Some(now);
            let t = Instant::now();
            // One slot for a machine's first connect (the usual case: it
            // stays connected): the default first growth is four.
            if e.connects.capacity() == 0 {
                e.connects.reserve_exact(1);
            }
            e.connects.push_back(t);
            while e
                .connects
                .front()
                .is_some_and(|c| t.duration_since(*c) > FLAP_WINDOW)
            {
                e.connects.pop_front();
            }
            // Send while holding the entry lock so events for one machine
            // leave in the order the registry applied them.
            let _ = self.events.send(PresenceEvent {
                machine_no,
                online: true,
                epoch,
                at: now,
                reason: None,
                took_over,
            });
        }
        epoch
    }

    /// The connection of `epoch` ended. Returns false (and changes nothing)
    /// when a newer connection owns the machine or it is already offline.
    pub fn disconnected(&self, machine_no: MachineNo, epoch: u64, reason: OfflineReason) -> bool {
        let Some(mut e) = self.machines.get_mut(&machine_no) else {
            return false;
        };
        if e.epoch != epoch || !e.online {
            return false;
        }
        let now = Utc::now();
        e.online = false;
        e.online_since = None;
        e.last_offline_reason = Some(reason);
        let _ = self.events.send(PresenceEvent {
            machine_no,
            online: false,
            epoch,
            at: now,
            reason: Some(reason),
            took_over: false,
        });
        true
    }

    /// Any packet from the machine's current connection.
    pub fn touch(&self, machine_no: &MachineNo) {
        if let Some(mut e) = self.machines.get_mut(machine_no) {
            e.last_seen = Some(Utc::now());
        }
    }

    pub fn set_firmware(&self, machine_no: &MachineNo, firmware: Option<String>) {
        if let Some(mut e) = self.machines.get_mut(machine_no) {
            if firmware.is_some() {
                e.firmware = firmware;
            }
        }
    }

    /// Record a ping's round trip (see [`rtt_ms`]).
    pub fn set_rtt(&self, machine_no: &MachineNo, rtt: Duration) {
        if let Some(mut e) = self.machines.get_mut(machine_no) {
            e.last_rtt_ms = Some(rtt_ms(rtt));
        }
    }

    /// Is the machine online, and under which epoch.
    pub fn online_epoch(&self, machine_no: &MachineNo) -> Option<u64> {
        self.machines
            .get(machine_no)
            .and_then(|e| e.online.then_some(e.epoch))
    }

    pub fn is_online(&self, machine_no: &MachineNo) -> bool {
        self.online_epoch(machine_no).is_some()
    }

    pub fn get(&self, machine_no: &MachineNo) -> Option<MachinePresence> {
        self.machines.get(machine_no).map(|e| view(*e.key(), &e))
    }

    pub fn online_count(&self) -> usize {
        self.machines.iter().filter(|e| e.online).count()
    }

    /// The machines online now, in machine number order.
    pub fn online_machines(&self) -> Vec<MachineNo> {
        let mut v: Vec<_> = self
            .machines
            .iter()
            .filter(|e| e.online)
            .map(|e| *e.key())
            .collect();
        v.sort_unstable();
        v
    }

    /// Every machine the registry has seen since start.
    pub fn snapshot(&self) -> Vec<MachinePresence> {
        let mut v: Vec<_> = self.machines.iter().map(|e| view(*e.key(), &e)).collect();
        v.sort_by_key(|p| p.machine_no);
        v
    }
}

fn view(machine_no: MachineNo, e: &Entry) -> MachinePresence {
    let now = Instant::now();
    let flaps = e
        .connects
        .iter()
        .filter(|c| now.duration_since(**c) <= FLAP_WINDOW)
        .count();
    MachinePresence {
        machine_no,
        online: e.online,
        epoch: e.epoch,
        online_since: e.online_since,
        last_seen: e.last_seen,
        firmware: e.firmware.clone(),
        last_rtt_ms: e.last_rtt_ms,
        flaps: u32::try_from(flaps).unwrap_or(u32::MAX),
        last_offline_reason: e.last_offline_reason,
    }
}

/// A round trip in whole milliseconds, rounded up: a measured round trip
/// never reads as 0, which the API leaves out as "not measured".
pub fn rtt_ms(rtt: Duration) -> u64 {
    u64::try_from(rtt.as_micros().div_ceil(1000)).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(s: &str) -> MachineNo {
        s.parse().unwrap()
    }

    #[test]
    fn stale_close_does_not_flip_newer_connection() {
        let reg = PresenceRegistry::new();
        let a = m("12345678");
        let e1 = reg.connected(a);
        let e2 = reg.connected(a);
        assert!(e2 > e1);
        assert!(!reg.disconnected(a, e1, OfflineReason::SocketClosed));
        assert!(reg.is_online(&a));
        assert!(reg.disconnected(a, e2, OfflineReason::Clean));
        assert!(!reg.is_online(&a));
        assert!(
            !reg.disconnected(a, e2, OfflineReason::Clean),
            "second close is a no-op"
        );
    }

    #[test]
    fn events_are_ordered_and_flaps_counted() {
        let reg = PresenceRegistry::new();
        let mut rx = reg.subscribe();
        let a = m("00000001");
        let e1 = reg.connected(a);
        reg.disconnected(a, e1, OfflineReason::KeepAliveTimeout);
        let e2 = reg.connected(a);
        let got: Vec<_> = std::iter::from_fn(|| rx.try_recv().ok()).collect();
        assert_eq!(got.len(), 3);
        assert!(got[0].online && !got[1].online && got[2].online);
        assert_eq!(got[1].reason, Some(OfflineReason::KeepAliveTimeout));
        assert_eq!(got[2].epoch, e2);
        assert_eq!(reg.get(&a).unwrap().flaps, 2);
        assert_eq!(reg.online_count(), 1);
    }
}
