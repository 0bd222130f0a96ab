//! The pure core of a simulated machine: commands in, messages out, stock and
//! order memory in between. No I/O and no clock of its own (time is passed
//! in, timers are [`Outgoing`] actions the runtime calls back), so every
//! rule of PROTOCOL.md can be tested without a broker.
//!
//! # Two-phase dispense (machine rule 2)
//!
//! An accepted `cmd/dispense` is acked and the order *held*; nothing comes
//! out. `cmd/go` for a held order dispenses it (once: its id joins
//! [`MachineState::dispensed_orders`] and is never dispensed again);
//! `cmd/cancel` drops it; with neither within the go timeout
//! ([`Outgoing::GoDeadline`], [`MachineState::go_deadline`]) it is dropped
//! with a `no_go` result. A `go` for an order not held is answered
//! `{"items":[],"error":"no_go"}`; a `go` for a dispensed order is a repeat
//! and not answered.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::Duration;

use tokio::time::Instant;
use vendgate_proto::machine::MachineNo;
use vendgate_proto::msg::{
    self, AckMsg, CancelCmd, DispenseCmd, GoCmd, InventoryItem, InventoryMsg, PingCmd, PongMsg,
    ResultItem, ResultMsg, StateMsg, ERROR_NO_GO,
};
use vendgate_proto::topic::{self, Command, Uplink};

use crate::behaviour::Behaviour;
use crate::journal::{JournalEntry, JournalEvent, JOURNAL_LIMIT};

/// Orders remembered for deduplication and cancellation; older ones are
/// forgotten. Far more than the gateway keeps in flight per machine.
pub const DEDUP_WINDOW: usize = 1024;

/// Results re-published after every (re)connect. The protocol has no
/// "result seen" message, so the machine cannot know which results the
/// gateway already has; it repeats the most recent ones and the gateway
/// treats repeats as no-ops (PROTOCOL.md, machine rule 4).
pub const REPUBLISH_RESULTS: usize = 64;

/// Refusal reason for a cancelled or timed-out command.
pub const REASON_EXPIRED: &str = "expired";

/// Result error when stock ran short.
pub const ERROR_OUT_OF_STOCK: &str = "out_of_stock";

/// How long a machine holds an acked order waiting for `cmd/go` or
/// `cmd/cancel` before dropping it with a `no_go` result (PROTOCOL.md
/// machine rule 2).
pub const DEFAULT_GO_TIMEOUT: Duration = Duration::from_secs(10);

/// Something the runtime must do on the machine's behalf, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Outgoing {
    /// Publish the retained `state`.
    State(StateMsg),
    /// Subscribe to this filter at QoS 1.
    Subscribe(String),
    /// Publish an `inventory` snapshot.
    Inventory(InventoryMsg),
    /// Publish a `pong`.
    Pong(PongMsg),
    /// Publish an `ack`.
    Ack(AckMsg),
    /// Publish a `result`.
    Result(ResultMsg),
    /// Call [`MachineState::resume`] for this order after `after` (slow ack).
    Defer { order_id: u64, after: Duration },
    /// Call [`MachineState::go_deadline`] for this order after `after` (the
    /// go timeout of an order just acked and held). Calling it early, or
    /// after `go`/`cancel` settled the order, does nothing, so the runtime
    /// need not cancel the timer.
    GoDeadline { order_id: u64, after: Duration },
    /// Cut the connection without DISCONNECT, then reconnect.
    DropConnection,
    /// Cut the connection without DISCONNECT once the gateway has
    /// acknowledged every message queued before this one, then reconnect.
    DropWhenDelivered,
    /// Stop reading and answering for this long, socket left open.
    Stall(Duration),
    /// Publish these bytes as they are on `vend/v1/{m}/{suffix}`.
    Raw { suffix: String, payload: Vec<u8> },
}

/// A message ready for the MQTT client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publication {
    pub topic: String,
    pub payload: Vec<u8>,
    pub retain: bool,
}

impl Outgoing {
    /// The MQTT publication for message variants; `None` for actions.
    pub fn publication(&self, m: &MachineNo) -> Option<Publication> {
        let (kind, payload) = match self {
            Self::State(s) => (Uplink::State, msg::encode(s)),
            Self::Inventory(i) => (Uplink::Inventory, msg::encode(i)),
            Self::Pong(p) => (Uplink::Pong, msg::encode(p)),
            Self::Ack(a) => (Uplink::Ack, msg::encode(a)),
            Self::Result(r) => (Uplink::Result, msg::encode(r)),
            Self::Raw { suffix, payload } => {
                return Some(Publication {
                    topic: format!("{}{suffix}", topic::machine_prefix(m)),
                    payload: payload.clone(),
                    retain: false,
                })
            }
            Self::Subscribe(_)
            | Self::Defer { .. }
            | Self::GoDeadline { .. }
            | Self::DropConnection
            | Self::DropWhenDelivered
            | Self::Stall(_) => return None,
        };
        Some(Publication {
            topic: topic::uplink(m, kind),
            payload,
            // Only `state` is retained, so a gateway restart sees the last
            // state (and the will) without waiting for a reconnect.
            retain: kind == Uplink::State,
        })
    }

    /// The journal entry to record once the message was handed to the client.
    pub fn sent_event(&self, m: &MachineNo) -> Option<JournalEvent> {
        match self {
            Self::State(s) => Some(JournalEvent::StateSent(s.clone())),
            Self::Inventory(i) => Some(JournalEvent::InventorySent(i.clone())),
            Self::Pong(p) => Some(JournalEvent::PongSent(p.clone())),
            Self::Ack(a) => Some(JournalEvent::AckSent(a.clone())),
            Self::Result(r) => Some(JournalEvent::ResultSent(r.clone())),
            Self::Raw { .. } => self.publication(m).map(|p| JournalEvent::RawSent {
                topic: p.topic,
                payload: p.payload,
            }),
            Self::Subscribe(_)
            | Self::Defer { .. }
            | Self::GoDeadline { .. }
            | Self::DropConnection
            | Self::DropWhenDelivered
            | Self::Stall(_) => None,
        }
    }
}

/// What the machine remembers about one order id.
#[derive(Debug, Clone)]
enum Order {
    /// Not to be dispensed: a cancel arrived before the order was held (or
    /// dropped it while held), or a `go` came for an order the machine did
    /// not hold. A dispense command for it is refused as `expired`. `no_go`
    /// is the answer given to such a `go`, kept and re-published after a
    /// reconnect like a result.
    Cancelled { no_go: Option<ResultMsg> },
    /// A slow ack is pending; decided by [`MachineState::resume`].
    Deferred {
        cmd: DispenseCmd,
        received: Instant,
        cancelled: bool,
    },
    /// Acked and held: dispensed on `go` per `plan`, dropped on `cancel`,
    /// or dropped with a `no_go` result at `deadline`.
    Held {
        cmd: DispenseCmd,
        deadline: Instant,
        plan: Plan,
    },
    /// Finished (dispensed, refused, or dropped for lack of `go`; which of
    /// them the dispensed ids tell); repeats get the same ack (and result,
    /// when there is one).
    Answered {
        ack: AckMsg,
        result: Option<ResultMsg>,
    },
}

/// How a held order will be dispensed and reported, fixed when it is acked.
#[derive(Debug, Clone, PartialEq)]
struct Plan {
    yield_: Yield,
    report: Report,
}

impl Plan {
    const NORMAL: Plan = Plan {
        yield_: Yield::Full,
        report: Report::Normal,
    };

    fn full(report: Report) -> Plan {
        Plan {
            yield_: Yield::Full,
            report,
        }
    }
}

/// What the machine publishes about a held order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Report {
    /// Each ack and result once, the result followed by an inventory.
    Normal,
    /// The ack only; result (and inventory) stored, never published.
    Silent,
    /// Every ack and result twice.
    Twice,
    /// The result stored, not published; after the go the connection is
    /// cut once everything sent before is delivered.
    AfterReconnect,
    /// Hostile payloads before the ack and before the result.
    Hostile,
}

/// How much of each line comes out.
#[derive(Debug, Clone, PartialEq)]
enum Yield {
    /// Everything in stock; shortfall reported as `out_of_stock`.
    Full,
    /// Half of each line (rounded down), reported with this error.
    Half(String),
    /// Nothing, reported with this error.
    Nothing(String),
}

/// Everything one simulated machine knows.
#[derive(Debug)]
pub struct MachineState {
    machine_no: MachineNo,
    firmware: String,
    behaviour: Behaviour,
    stock: Vec<InventoryItem>,
    orders: HashMap<u64, Order>,
    /// Order ids in first-seen order: evicts the oldest beyond
    /// [`DEDUP_WINDOW`] and orders re-published results.
    order_log: VecDeque<u64>,
    journal: Vec<JournalEntry>,
    /// Entries ever appended (the journal itself may have been trimmed).
    journal_seq: u64,
    dispensed: Vec<u64>,
    /// The ids of `dispensed`, for lookups; like it, never trimmed, so an
    /// order is never dispensed twice even once the dedup window forgot it.
    dispensed_ids: HashSet<u64>,
    malformed: u64,
    go_timeout: Duration,
}

impl MachineState {
    /// A machine with this stock, answering per `behaviour`.
    pub fn new(
        machine_no: MachineNo,
        firmware: impl Into<String>,
        inventory: Vec<InventoryItem>,
        behaviour: Behaviour,
    ) -> Self {
        Self {
            machine_no,
            firmware: firmware.into(),
            behaviour,
            stock: inventory,
            orders: HashMap::new(),
            order_log: VecDeque::new(),
            journal: Vec::new(),
            journal_seq: 0,
            dispensed: Vec::new(),
            dispensed_ids: HashSet::new(),
            malformed: 0,
            go_timeout: DEFAULT_GO_TIMEOUT,
        }
    }

    pub fn machine_no(&self) -> MachineNo {
        self.machine_no
    }

    pub fn behaviour(&self) -> &Behaviour {
        &self.behaviour
    }

    pub fn set_behaviour(&mut self, behaviour: Behaviour) {
        self.behaviour = behaviour;
    }

    /// How long an acked order is held waiting for `go` or `cancel`
    /// ([`DEFAULT_GO_TIMEOUT`] unless set).
    pub fn go_timeout(&self) -> Duration {
        self.go_timeout
    }

    /// Sets the go timeout of orders held from now on.
    pub fn set_go_timeout(&mut self, go_timeout: Duration) {
        self.go_timeout = go_timeout;
    }

    /// Current stock per product.
    pub fn stock(&self) -> &[InventoryItem] {
        &self.stock
    }

    /// The journal (possibly trimmed to the last [`JOURNAL_LIMIT`] entries).
    pub fn journal(&self) -> &[JournalEntry] {
        &self.journal
    }

    /// How many entries were ever appended; grows by one per [`record`](Self::record).
    pub fn journal_seq(&self) -> u64 {
        self.journal_seq
    }

    /// Every order id actually dispensed, once per dispense. Never
    /// trimmed: an id absent here was never dispensed.
    pub fn dispensed_orders(&self) -> &[u64] {
        &self.dispensed
    }

    /// Whether this order was ever dispensed.
    pub fn was_dispensed(&self, order_id: u64) -> bool {
        self.dispensed_ids.contains(&order_id)
    }

    /// The orders acked and held, waiting for `go` (oldest first).
    pub fn held_orders(&self) -> Vec<u64> {
        self.order_log
            .iter()
            .copied()
            .filter(|id| matches!(self.orders.get(id), Some(Order::Held { .. })))
            .collect()
    }

    /// Messages ignored because they were malformed or unexpected.
    pub fn malformed(&self) -> u64 {
        self.malformed
    }

    /// Appends a journal entry.
    pub fn record(&mut self, event: JournalEvent, now: Instant) {
        if self.journal.len() >= JOURNAL_LIMIT {
            self.journal.drain(..JOURNAL_LIMIT / 2);
        }
        self.journal.push(JournalEntry { at: now, event });
        self.journal_seq += 1;
    }

    /// What to do right after every CONNACK: subscribe to commands (a clean
    /// session has none), announce the state, publish the stock and
    /// re-publish recent results.
    ///
    /// The SUBSCRIBE goes out before the `online` state (PROTOCOL.md lists
    /// them the other way round, without requiring an order) so that a
    /// gateway reacting to the state with a command finds the subscription
    /// already in place: the broker handles one connection's packets in order.
    pub fn on_connect(&mut self, now: Instant) -> Vec<Outgoing> {
        self.record(JournalEvent::Connected, now);
        let mut out = vec![
            Outgoing::Subscribe(topic::command_filter(&self.machine_no)),
            Outgoing::State(StateMsg {
                online: true,
                firmware: Some(self.firmware.clone()),
            }),
            self.inventory(),
        ];
        // A silent machine stays silent until its behaviour changes.
        if self.behaviour != Behaviour::AckThenSilent {
            out.extend(self.recent_results().into_iter().map(Outgoing::Result));
        }
        out
    }

    /// The stored results of the most recent orders, oldest first.
    pub fn recent_results(&self) -> Vec<ResultMsg> {
        let mut results: Vec<ResultMsg> = self
            .order_log
            .iter()
            .rev()
            .filter_map(|id| match self.orders.get(id) {
                Some(
                    Order::Answered {
                        result: Some(r), ..
                    }
                    | Order::Cancelled { no_go: Some(r) },
                ) => Some(r.clone()),
                _ => None,
            })
            .take(REPUBLISH_RESULTS)
            .collect();
        results.reverse();
        results
    }

    /// Replaces the stock (a technician refilled the machine) and returns
    /// the snapshot to publish (machine rule 5).
    pub fn refill(&mut self, items: Vec<InventoryItem>) -> Vec<Outgoing> {
        self.stock = items;
        vec![self.inventory()]
    }

    /// A sale at the machine itself: takes up to `quantity` without
    /// publishing a snapshot (see [`SimHandle::sell_locally`](crate::SimHandle::sell_locally)).
    pub fn sell_locally(&mut self, product_id: i64, quantity: u32, now: Instant) -> u32 {
        let sold = self.take_stock(product_id, quantity);
        self.record(
            JournalEvent::SoldLocally {
                product_id,
                quantity: sold,
            },
            now,
        );
        sold
    }

    /// Handles one command payload. Malformed payloads are counted,
    /// journalled and otherwise ignored.
    pub fn handle_command(&mut self, kind: Command, payload: &[u8], now: Instant) -> Vec<Outgoing> {
        match kind {
            Command::Ping => match msg::decode::<PingCmd>(payload) {
                Ok(ping) => {
                    self.record(JournalEvent::PingReceived { id: ping.id }, now);
                    vec![Outgoing::Pong(PongMsg { id: ping.id })]
                }
                Err(e) => self.malformed_command(kind, &e, now),
            },
            Command::Cancel => match msg::decode::<CancelCmd>(payload) {
                Ok(cancel) => {
                    self.record(
                        JournalEvent::CancelReceived {
                            order_id: cancel.order_id,
                        },
                        now,
                    );
                    self.cancel(cancel.order_id, now);
                    Vec::new()
                }
                Err(e) => self.malformed_command(kind, &e, now),
            },
            Command::Go => match msg::decode::<GoCmd>(payload) {
                Ok(go) => {
                    self.record(
                        JournalEvent::GoReceived {
                            order_id: go.order_id,
                        },
                        now,
                    );
                    self.go(go.order_id, now)
                }
                Err(e) => self.malformed_command(kind, &e, now),
            },
            Command::Dispense => match msg::decode::<DispenseCmd>(payload) {
                Ok(cmd) => {
                    self.record(JournalEvent::DispenseReceived(cmd.clone()), now);
                    self.dispense(cmd, now)
                }
                Err(e) => self.malformed_command(kind, &e, now),
            },
        }
    }

    /// Counts a message that is not a command for this machine.
    pub fn note_unexpected(&mut self, topic: &str, error: &str, now: Instant) {
        self.malformed += 1;
        let event = JournalEvent::Malformed {
            topic: topic.to_owned(),
            error: error.to_owned(),
        };
        self.record(event, now);
    }

    /// Decides a slow-acked order once its delay is over: refused as
    /// expired if it was cancelled meanwhile or the delay reached its
    /// `ttl_ms`, otherwise acked and held as `normal` does.
    pub fn resume(&mut self, order_id: u64, now: Instant) -> Vec<Outgoing> {
        let Some(Order::Deferred {
            cmd,
            received,
            cancelled,
        }) = self.orders.get(&order_id).cloned()
        else {
            return Vec::new();
        };
        // The machine cannot know when the gateway sent the command; time
        // since receipt is a lower bound of its age, so this only ever
        // errs on the side of dispensing less.
        let age = now.saturating_duration_since(received);
        if cancelled || age >= Duration::from_millis(cmd.ttl_ms) {
            self.refuse(order_id, REASON_EXPIRED)
        } else {
            self.hold(cmd, Plan::NORMAL, now)
        }
    }

    /// The go timeout of a held order ([`Outgoing::GoDeadline`]): if the
    /// order is still held and its deadline has passed, drops it
    /// undispensed, stores its result (every item `dispensed: 0`, error
    /// `no_go`, re-published after reconnects like any result) and returns
    /// it to publish. Otherwise (`go` or `cancel` came first, the machine
    /// rebooted, or this is a stale timer of an earlier hold of the same
    /// id) does nothing.
    pub fn go_deadline(&mut self, order_id: u64, now: Instant) -> Vec<Outgoing> {
        let Some(Order::Held {
            cmd,
            deadline,
            plan,
        }) = self.orders.get(&order_id)
        else {
            return Vec::new();
        };
        if now < *deadline {
            return Vec::new();
        }
        let items = cmd
            .items
            .iter()
            .map(|line| ResultItem {
                product_id: line.product_id,
                quantity: line.quantity,
                dispensed: 0,
            })
            .collect();
        let report = plan.report;
        let result = ResultMsg {
            order_id,
            items,
            error: Some(ERROR_NO_GO.to_owned()),
        };
        self.orders.insert(
            order_id,
            Order::Answered {
                ack: accepted_ack(order_id),
                result: Some(result.clone()),
            },
        );
        self.record(JournalEvent::NoGo { order_id }, now);
        match report {
            Report::Silent => Vec::new(),
            Report::Twice => vec![Outgoing::Result(result.clone()), Outgoing::Result(result)],
            Report::Normal | Report::AfterReconnect | Report::Hostile => {
                vec![Outgoing::Result(result)]
            }
        }
    }

    /// The machine reboots: every held order (and slow ack still pending)
    /// is forgotten, as if its command had never arrived; stock and the
    /// answers of finished orders are kept (flash). Returns the forgotten
    /// ids. The runtime cuts the connection as well.
    pub fn reboot(&mut self, now: Instant) -> Vec<u64> {
        let forgotten: Vec<u64> = self
            .order_log
            .iter()
            .copied()
            .filter(|id| {
                matches!(
                    self.orders.get(id),
                    Some(Order::Held { .. } | Order::Deferred { .. })
                )
            })
            .collect();
        if !forgotten.is_empty() {
            let gone: HashSet<u64> = forgotten.iter().copied().collect();
            self.orders.retain(|id, _| !gone.contains(id));
            self.order_log.retain(|id| !gone.contains(id));
        }
        self.record(
            JournalEvent::Rebooted {
                forgotten: forgotten.clone(),
            },
            now,
        );
        forgotten
    }

    fn malformed_command(
        &mut self,
        kind: Command,
        e: &msg::DecodeError,
        now: Instant,
    ) -> Vec<Outgoing> {
        let topic = topic::command(&self.machine_no, kind);
        self.note_unexpected(&topic, &e.to_string(), now);
        Vec::new()
    }

    fn cancel(&mut self, order_id: u64, now: Instant) {
        match self.orders.get_mut(&order_id) {
            None => self.remember(order_id, Order::Cancelled { no_go: None }),
            Some(Order::Deferred { cancelled, .. }) => *cancelled = true,
            Some(Order::Held { .. }) => {
                self.orders
                    .insert(order_id, Order::Cancelled { no_go: None });
                self.record(JournalEvent::HoldCancelled { order_id }, now);
            }
            // Already finished: a refused or dropped order stays so, a
            // dispensed one cannot be undone (a cancel after go is
            // ignored), a repeated cancel changes nothing.
            Some(Order::Cancelled { .. } | Order::Answered { .. }) => {}
        }
    }

    /// `cmd/go`: dispenses a held order; answers `no_go` for an order not
    /// held; ignores a repeat for a dispensed order.
    fn go(&mut self, order_id: u64, now: Instant) -> Vec<Outgoing> {
        // The non-compliant machine dispensed on its ack already.
        if self.behaviour == Behaviour::IgnoreGo {
            return Vec::new();
        }
        if let Some(Order::Held { cmd, plan, .. }) = self.orders.get(&order_id) {
            let (cmd, plan) = (cmd.clone(), plan.clone());
            return self.dispense_held(&cmd, &plan, now);
        }
        // A repeated go (the dedup window may have forgotten the order, the
        // dispensed ids never do).
        if self.was_dispensed(order_id) {
            return Vec::new();
        }
        let answer = ResultMsg {
            order_id,
            items: Vec::new(),
            error: Some(ERROR_NO_GO.to_owned()),
        };
        match self.orders.get_mut(&order_id) {
            // Never seen, or forgotten by a reboot: never to be dispensed
            // now, and the answer is kept like a result.
            None => self.remember(
                order_id,
                Order::Cancelled {
                    no_go: Some(answer.clone()),
                },
            ),
            Some(Order::Cancelled { no_go }) => {
                no_go.get_or_insert_with(|| answer.clone());
            }
            // Not acked yet (a go cannot come before the ack from a
            // compliant gateway): the order is dropped, its ack will be
            // the refusal `expired`.
            Some(Order::Deferred { cancelled, .. }) => *cancelled = true,
            // Refused, or dropped by its go timeout (its stored result says
            // so already); held orders were dispensed above.
            Some(Order::Answered { .. } | Order::Held { .. }) => {}
        }
        if self.behaviour == Behaviour::AckThenSilent {
            return Vec::new();
        }
        vec![Outgoing::Result(answer)]
    }

    fn dispense(&mut self, cmd: DispenseCmd, now: Instant) -> Vec<Outgoing> {
        match self.behaviour {
            Behaviour::NeverAck => return Vec::new(),
            Behaviour::DropConnection => {
                // Only the first command is dropped, so the machine comes
                // back and the gateway's retry can be answered.
                self.behaviour = Behaviour::Normal;
                return vec![Outgoing::DropConnection];
            }
            Behaviour::HalfOpen { ms } => {
                // As with drop-connection, only this command goes
                // unanswered: after the stall the gateway has dropped the
                // socket, the machine reconnects and answers normally.
                self.behaviour = Behaviour::Normal;
                return vec![Outgoing::Stall(Duration::from_millis(ms))];
            }
            _ => {}
        }
        match self.orders.get(&cmd.order_id) {
            // Machine rule 3: repeat the stored answer, never dispense again.
            Some(Order::Answered { ack, result, .. }) => {
                let mut out = vec![Outgoing::Ack(ack.clone())];
                if self.behaviour != Behaviour::AckThenSilent {
                    out.extend(result.clone().map(Outgoing::Result));
                }
                return out;
            }
            // Acked and waiting for go: the same ack again.
            Some(Order::Held { .. }) => {
                return vec![Outgoing::Ack(accepted_ack(cmd.order_id))];
            }
            // The answer to the first copy is still coming.
            Some(Order::Deferred { .. }) => return Vec::new(),
            Some(Order::Cancelled { .. }) => return self.refuse(cmd.order_id, REASON_EXPIRED),
            None => {}
        }
        // Dispensed long ago and forgotten by the dedup window: the ack it
        // had, and never a second dispense.
        if self.was_dispensed(cmd.order_id) {
            return vec![Outgoing::Ack(accepted_ack(cmd.order_id))];
        }
        // A zero TTL is expired on arrival.
        if cmd.ttl_ms == 0 {
            return self.refuse(cmd.order_id, REASON_EXPIRED);
        }
        match self.behaviour.clone() {
            Behaviour::Normal => self.hold(cmd, Plan::NORMAL, now),
            Behaviour::AckThenSilent => self.hold(cmd, Plan::full(Report::Silent), now),
            Behaviour::Refuse { reason } => self.refuse(cmd.order_id, &reason),
            Behaviour::Fail { error } => self.hold(
                cmd,
                Plan {
                    yield_: Yield::Nothing(error),
                    report: Report::Normal,
                },
                now,
            ),
            Behaviour::Partial { error } => self.hold(
                cmd,
                Plan {
                    yield_: Yield::Half(error),
                    report: Report::Normal,
                },
                now,
            ),
            Behaviour::SlowAck { ms } => {
                let order_id = cmd.order_id;
                self.remember(
                    order_id,
                    Order::Deferred {
                        cmd,
                        received: now,
                        cancelled: false,
                    },
                );
                vec![Outgoing::Defer {
                    order_id,
                    after: Duration::from_millis(ms),
                }]
            }
            Behaviour::ResultAfterReconnect => {
                self.hold(cmd, Plan::full(Report::AfterReconnect), now)
            }
            Behaviour::Duplicate => self.hold(cmd, Plan::full(Report::Twice), now),
            Behaviour::Malformed => {
                let (before, _) = hostile_payloads(cmd.order_id);
                let answer = self.hold(cmd, Plan::full(Report::Hostile), now);
                before.into_iter().chain(answer).collect()
            }
            Behaviour::IgnoreGo => {
                // The old one-phase machine: ack, dispense, report at once.
                let mut out = vec![Outgoing::Ack(accepted_ack(cmd.order_id))];
                out.extend(self.dispense_held(&cmd, &Plan::NORMAL, now));
                out
            }
            Behaviour::RebootBeforeGo => {
                let mut out = self.hold(cmd, Plan::NORMAL, now);
                // No timer: the reboot forgets the order before it is due.
                out.retain(|o| !matches!(o, Outgoing::GoDeadline { .. }));
                self.reboot(now);
                // The ack must reach the gateway before the "power" goes.
                out.push(Outgoing::DropWhenDelivered);
                out
            }
            // Handled above; listed so a new variant is a compile error here.
            Behaviour::NeverAck | Behaviour::DropConnection | Behaviour::HalfOpen { .. } => {
                Vec::new()
            }
        }
    }

    fn refuse(&mut self, order_id: u64, reason: &str) -> Vec<Outgoing> {
        let ack = AckMsg {
            order_id,
            accepted: false,
            reason: Some(reason.to_owned()),
        };
        self.remember(
            order_id,
            Order::Answered {
                ack: ack.clone(),
                result: None,
            },
        );
        vec![Outgoing::Ack(ack)]
    }

    /// Accepts and holds an order (phase one): the ack, and the go timeout
    /// to arm. Nothing is dispensed.
    fn hold(&mut self, cmd: DispenseCmd, plan: Plan, now: Instant) -> Vec<Outgoing> {
        let order_id = cmd.order_id;
        let ack = Outgoing::Ack(accepted_ack(order_id));
        let mut out = match plan.report {
            Report::Twice => vec![ack.clone(), ack],
            _ => vec![ack],
        };
        // A timeout too large for the clock never fires.
        let deadline = now
            .checked_add(self.go_timeout)
            .unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 24 * 3600));
        self.remember(
            order_id,
            Order::Held {
                cmd,
                deadline,
                plan,
            },
        );
        self.record(JournalEvent::Held { order_id }, now);
        out.push(Outgoing::GoDeadline {
            order_id,
            after: self.go_timeout,
        });
        out
    }

    /// Dispenses an order (phase two) per `plan`, stores its result and
    /// returns what to publish about it. The only place goods come out.
    fn dispense_held(&mut self, cmd: &DispenseCmd, plan: &Plan, now: Instant) -> Vec<Outgoing> {
        let items: Vec<ResultItem> = cmd
            .items
            .iter()
            .map(|line| {
                let wanted = match plan.yield_ {
                    Yield::Full => line.quantity,
                    Yield::Half(_) => line.quantity / 2,
                    Yield::Nothing(_) => 0,
                };
                let dispensed = self.take_stock(line.product_id, wanted);
                ResultItem {
                    product_id: line.product_id,
                    quantity: line.quantity,
                    dispensed,
                }
            })
            .collect();
        let short = items.iter().any(|i| i.dispensed < i.quantity);
        let error = match &plan.yield_ {
            Yield::Full => short.then(|| ERROR_OUT_OF_STOCK.to_owned()),
            Yield::Half(e) | Yield::Nothing(e) => Some(e.clone()),
        };
        self.dispensed.push(cmd.order_id);
        self.dispensed_ids.insert(cmd.order_id);
        self.record(
            JournalEvent::Dispensed {
                order_id: cmd.order_id,
                items: items.clone(),
            },
            now,
        );
        let result = ResultMsg {
            order_id: cmd.order_id,
            items,
            error,
        };
        self.remember(
            cmd.order_id,
            Order::Answered {
                ack: accepted_ack(cmd.order_id),
                result: Some(result.clone()),
            },
        );
        match plan.report {
            Report::Normal => vec![Outgoing::Result(result), self.inventory()],
            Report::Silent => Vec::new(),
            Report::Twice => vec![
                Outgoing::Result(result.clone()),
                Outgoing::Result(result),
                self.inventory(),
            ],
            // The result is stored, so `on_connect` re-publishes it.
            Report::AfterReconnect => vec![Outgoing::DropWhenDelivered],
            Report::Hostile => {
                // Between the ack and the result, after the gateway's go:
                // results for this order that do not fit it.
                let (_, before_result) = hostile_payloads(cmd.order_id);
                before_result
                    .into_iter()
                    .chain([Outgoing::Result(result), self.inventory()])
                    .collect()
            }
        }
    }

    /// Takes up to `wanted` of a product; returns how many came out. Stock
    /// never goes below zero; unknown products yield nothing.
    fn take_stock(&mut self, product_id: i64, wanted: u32) -> u32 {
        match self.stock.iter_mut().find(|s| s.product_id == product_id) {
            Some(slot) => {
                let taken = wanted.min(slot.stock);
                slot.stock -= taken;
                taken
            }
            None => 0,
        }
    }

    fn inventory(&self) -> Outgoing {
        Outgoing::Inventory(InventoryMsg {
            items: self.stock.clone(),
        })
    }

    /// Stores what is known about an order, forgetting the oldest beyond
    /// [`DEDUP_WINDOW`].
    fn remember(&mut self, order_id: u64, order: Order) {
        if self.orders.insert(order_id, order).is_none() {
            self.order_log.push_back(order_id);
            while self.order_log.len() > DEDUP_WINDOW {
                if let Some(old) = self.order_log.pop_front() {
                    self.orders.remove(&old);
                }
            }
        }
    }
}

/// The accepting ack of an order.
fn accepted_ack(order_id: u64) -> AckMsg {
    AckMsg {
        order_id,
        accepted: true,
        reason: None,
    }
}

/// The hostile payloads of behaviour `malformed` for a dispense of
/// `order_id`: those sent before the machine's real ack, and those sent
/// between its ack and its result (on `go`, right before the result). None
/// of them may change anything at the gateway; PROTOCOL.md gateway rule 3
/// says each is counted and dropped.
fn hostile_payloads(order_id: u64) -> (Vec<Outgoing>, Vec<Outgoing>) {
    let raw = |suffix: &str, payload: Vec<u8>| Outgoing::Raw {
        suffix: suffix.to_owned(),
        payload,
    };
    let text = |suffix: &str, payload: String| raw(suffix, payload.into_bytes());
    // Orders that cannot exist: order ids are positive and below 2^53.
    let unknown = i64::MAX;
    let before = vec![
        text("ack", format!("{{\"order_id\":{order_id},\"accepted\":")),
        text("ack", format!("{{\"order_id\":\"{order_id}\",\"accepted\":\"yes\"}}")),
        text("ack", "{\"order_id\":18446744073709551616,\"accepted\":true}".into()),
        text("ack", "{\"order_id\":-1,\"accepted\":true}".into()),
        text("ack", format!("{{\"order_id\":{unknown},\"accepted\":true}}")),
        raw("ack", Vec::new()),
        text("result", "not json at all".into()),
        raw("result", vec![0xff, 0xfe, b'{', b'}']),
        text("result", format!("{}{}", "[".repeat(5_000), "]".repeat(5_000))),
        text("result", format!("{{\"order_id\":{order_id},\"items\":\"lots\"}}")),
        text(
            "result",
            format!(
                "{{\"order_id\":{order_id},\"items\":[{{\"product_id\":1,\"quantity\":1e400,\"dispensed\":-5}}]}}"
            ),
        ),
        text(
            "result",
            format!(
                "{{\"order_id\":{unknown},\"items\":[{{\"product_id\":1,\"quantity\":1,\"dispensed\":1}}]}}"
            ),
        ),
        text(
            "inventory",
            "{\"items\":[{\"product_id\":1,\"stock\":-3,\"price\":\"free\"}]}".into(),
        ),
        text(
            "inventory",
            "{\"items\":[{\"product_id\":1,\"stock\":99999999999999999999,\"price\":1}]}".into(),
        ),
        text("state", "{\"online\":\"maybe\"}".into()),
        text("pong", "{\"id\":\"x\"}".into()),
        text("bogus", "{}".into()),
    ];
    let after_ack = vec![
        text(
            "result",
            format!(
                "{{\"order_id\":{order_id},\"items\":[{{\"product_id\":999,\"quantity\":1,\"dispensed\":1}}]}}"
            ),
        ),
        text(
            "result",
            format!(
                "{{\"order_id\":{order_id},\"items\":[{{\"product_id\":1,\"quantity\":1000,\"dispensed\":1000}}]}}"
            ),
        ),
    ];
    (before, after_ack)
}
