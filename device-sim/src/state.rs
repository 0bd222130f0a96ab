//! The pure core of a simulated machine: commands in, messages out, stock and
//! order memory in between. No I/O and no clock of its own (time is passed
//! in), so every rule of PROTOCOL.md can be tested without a broker.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use tokio::time::Instant;
use vendgate_proto::machine::MachineNo;
use vendgate_proto::msg::{
    self, AckMsg, CancelCmd, DispenseCmd, InventoryItem, InventoryMsg, PingCmd, PongMsg,
    ResultItem, ResultMsg, StateMsg,
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
            | Self::DropConnection
            | Self::DropWhenDelivered
            | Self::Stall(_) => None,
        }
    }
}

/// What the machine remembers about one order id.
#[derive(Debug, Clone)]
enum Order {
    /// A cancel arrived before any dispense command: refuse it when it comes.
    CancelledEarly,
    /// A slow ack is pending; decided by [`MachineState::resume`].
    Deferred {
        cmd: DispenseCmd,
        received: Instant,
        cancelled: bool,
    },
    /// Answered; repeats get the same ack (and result, when there is one).
    Answered {
        ack: AckMsg,
        result: Option<ResultMsg>,
    },
}

/// How much of each line comes out.
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
    malformed: u64,
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
            malformed: 0,
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

    /// Every order id actually dispensed, once per dispense.
    pub fn dispensed_orders(&self) -> &[u64] {
        &self.dispensed
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
                Some(Order::Answered {
                    result: Some(r), ..
                }) => Some(r.clone()),
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
                    self.cancel(cancel.order_id);
                    Vec::new()
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
    /// `ttl_ms`, otherwise dispensed normally.
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
            self.accept(&cmd, Yield::Full, true, now)
        }
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

    fn cancel(&mut self, order_id: u64) {
        match self.orders.get_mut(&order_id) {
            None => self.remember(order_id, Order::CancelledEarly),
            Some(Order::Deferred { cancelled, .. }) => *cancelled = true,
            // Already answered: a refused order stays refused, a dispensed
            // one cannot be undone; either way nothing changes.
            Some(Order::CancelledEarly | Order::Answered { .. }) => {}
        }
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
            Some(Order::Answered { ack, result }) => {
                let mut out = vec![Outgoing::Ack(ack.clone())];
                if self.behaviour != Behaviour::AckThenSilent {
                    out.extend(result.clone().map(Outgoing::Result));
                }
                return out;
            }
            // The answer to the first copy is still coming.
            Some(Order::Deferred { .. }) => return Vec::new(),
            Some(Order::CancelledEarly) => return self.refuse(cmd.order_id, REASON_EXPIRED),
            None => {}
        }
        // A zero TTL is expired on arrival.
        if cmd.ttl_ms == 0 {
            return self.refuse(cmd.order_id, REASON_EXPIRED);
        }
        match self.behaviour.clone() {
            Behaviour::Normal => self.accept(&cmd, Yield::Full, true, now),
            Behaviour::AckThenSilent => self.accept(&cmd, Yield::Full, false, now),
            Behaviour::Refuse { reason } => self.refuse(cmd.order_id, &reason),
            Behaviour::Fail { error } => self.accept(&cmd, Yield::Nothing(error), true, now),
            Behaviour::Partial { error } => self.accept(&cmd, Yield::Half(error), true, now),
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
                // The result is stored, so `on_connect` re-publishes it.
                let mut out = self.accept(&cmd, Yield::Full, false, now);
                out.push(Outgoing::DropWhenDelivered);
                out
            }
            Behaviour::Duplicate => self
                .accept(&cmd, Yield::Full, true, now)
                .into_iter()
                .flat_map(|o| match o {
                    Outgoing::Ack(_) | Outgoing::Result(_) => vec![o.clone(), o],
                    o => vec![o],
                })
                .collect(),
            Behaviour::Malformed => {
                let (before, after_ack) = hostile_payloads(cmd.order_id);
                let mut answer = self.accept(&cmd, Yield::Full, true, now);
                // `accept` puts the ack first; the results that do not fit
                // the order follow it, so they cannot be read as the
                // machine's acceptance.
                let rest = answer.split_off(answer.len().min(1));
                before
                    .into_iter()
                    .chain(answer)
                    .chain(after_ack)
                    .chain(rest)
                    .collect()
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

    /// Accepts and dispenses; `publish_result` false keeps the result (and
    /// the inventory) to itself.
    fn accept(
        &mut self,
        cmd: &DispenseCmd,
        yield_: Yield,
        publish_result: bool,
        now: Instant,
    ) -> Vec<Outgoing> {
        let ack = AckMsg {
            order_id: cmd.order_id,
            accepted: true,
            reason: None,
        };
        let items: Vec<ResultItem> = cmd
            .items
            .iter()
            .map(|line| {
                let wanted = match yield_ {
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
        let error = match yield_ {
            Yield::Full => short.then(|| ERROR_OUT_OF_STOCK.to_owned()),
            Yield::Half(e) | Yield::Nothing(e) => Some(e),
        };
        self.dispensed.push(cmd.order_id);
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
                ack: ack.clone(),
                result: Some(result.clone()),
            },
        );
        let mut out = vec![Outgoing::Ack(ack)];
        if publish_result {
            out.push(Outgoing::Result(result));
            out.push(self.inventory());
        }
        out
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

/// The hostile payloads of behaviour `malformed` for a dispense of
/// `order_id`: those sent before the machine's real ack, and those sent
/// between its ack and its result. None of them may change anything at the
/// gateway; PROTOCOL.md gateway rule 3 says each is counted and dropped.
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
