//! The network side of a simulated machine: one MQTT connection per
//! machine (rumqttc), reconnecting with backoff, driving the pure
//! [`MachineState`], and the [`SimHandle`] tests use to steer and observe it.
//!
//! Tasks per running machine ("incarnation"):
//! - the connection task owns the rumqttc `EventLoop`, turns incoming
//!   commands into [`Outgoing`]s and never awaits a publish itself (rumqttc
//!   freezes if the polling task blocks on its own request channel);
//! - the publisher task hands messages to the client in order;
//! - one short timer task per slow ack;
//! - one timer task per held order, for its go timeout. It belongs to the
//!   machine, not the connection: a held order times out (and its `no_go`
//!   result is stored) even while the machine is offline.
//!
//! Two behaviours need the connection task itself: `half-open` stops
//! polling the event loop (so nothing is read or written, PINGREQ included,
//! while the socket stays open), and `result-after-reconnect` (after its
//! go) and `reboot-before-go` (after its ack) cut the socket only once a
//! re-SUBSCRIBE queued behind what they sent is answered, which proves the
//! gateway has it.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use rumqttc::{
    AsyncClient, Event, EventLoop, LastWill, MqttOptions, NetworkOptions, Packet, QoS,
    SubscribeReasonCode,
};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use vendgate_proto::machine::MachineNo;
use vendgate_proto::msg::{self, InventoryItem, StateMsg};
use vendgate_proto::topic::{self, Topic, Uplink};

use crate::behaviour::Behaviour;
use crate::journal::{JournalEntry, JournalEvent};
use crate::state::{MachineState, Outgoing, DEFAULT_GO_TIMEOUT};

/// First delay before reconnecting; doubles up to [`BACKOFF_MAX`]. rumqttc
/// itself reconnects at once (issue #703), which would spin on a refusal.
const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// Largest MQTT packet in either direction: a 64 KiB payload
/// ([`msg::MAX_PAYLOAD`]) plus topic and header, well above rumqttc's 10 KiB
/// default.
const MAX_PACKET: usize = msg::MAX_PAYLOAD + 4 * 1024;
/// Requests buffered between the publisher and the event loop. Small:
/// the publisher awaits room anyway, and a fleet runs thousands of these.
const REQUEST_CAPACITY: usize = 10;
/// Unacknowledged QoS 1 publishes in flight per machine. rumqttc allocates
/// a slot per possible packet up front (default 100, ~6 KiB); a machine
/// rarely has more than its ack, result and inventory out at once, and the
/// publisher simply waits when the window is full.
const INFLIGHT: u16 = 10;
/// Initial room in rumqttc's queue of polled events.
const EVENT_CAPACITY: usize = 8;
/// TCP connect + CONNACK deadline, in seconds (rumqttc's unit).
const CONNECT_TIMEOUT_SECS: u64 = 5;
/// How long a clean shutdown waits for DISCONNECT to be written.
const DISCONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// How to run one simulated machine.
#[derive(Clone)]
pub struct SimConfig {
    /// The gateway's MQTT listener, `host:port` (`[::1]:1883` for IPv6).
    pub gateway: String,
    pub machine_no: MachineNo,
    /// The MQTT password issued at provisioning.
    pub secret: String,
    /// MQTT keep alive; clamped to 1 s ..= 65 535 s (whole seconds).
    pub keep_alive: Duration,
    /// Reported in the retained `state` message.
    pub firmware: String,
    /// Initial stock.
    pub inventory: Vec<InventoryItem>,
    pub behaviour: Behaviour,
    /// How long an acked order is held waiting for `cmd/go` or
    /// `cmd/cancel` before the machine drops it with a `no_go` result
    /// (PROTOCOL.md machine rule 2); default [`DEFAULT_GO_TIMEOUT`] (10 s).
    pub go_timeout: Duration,
    /// The CONNECT's clean session flag. PROTOCOL.md says machines connect
    /// with clean session (`true`, the default); `false` makes a machine
    /// that asks for a persistent session, which the gateway must treat as
    /// clean (gateway rule 8). The machine itself behaves the same either
    /// way: it subscribes on every CONNACK, and rumqttc drops its
    /// unacknowledged requests when the CONNACK says no session is present.
    pub clean_session: bool,
}

impl SimConfig {
    /// A normally behaving machine with no stock, keep alive 30 s, go
    /// timeout 10 s, clean session.
    pub fn new(
        gateway: impl Into<String>,
        machine_no: MachineNo,
        secret: impl Into<String>,
    ) -> Self {
        Self {
            gateway: gateway.into(),
            machine_no,
            secret: secret.into(),
            keep_alive: Duration::from_secs(30),
            firmware: concat!("vendgate-sim/", env!("CARGO_PKG_VERSION")).to_owned(),
            inventory: Vec::new(),
            behaviour: Behaviour::Normal,
            go_timeout: DEFAULT_GO_TIMEOUT,
            clean_session: true,
        }
    }
}

impl fmt::Debug for SimConfig {
    /// Like a derived `Debug`, but the secret is never printed.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimConfig")
            .field("gateway", &self.gateway)
            .field("machine_no", &self.machine_no)
            .field("secret", &"<redacted>")
            .field("keep_alive", &self.keep_alive)
            .field("firmware", &self.firmware)
            .field("inventory", &self.inventory)
            .field("behaviour", &self.behaviour)
            .field("go_timeout", &self.go_timeout)
            .field("clean_session", &self.clean_session)
            .finish()
    }
}

/// Starts simulated machines.
pub struct SimMachine;

impl SimMachine {
    /// Spawns a machine on the current tokio runtime; it connects at once and
    /// keeps reconnecting until [`SimHandle::shutdown`].
    pub fn spawn(config: SimConfig) -> SimHandle {
        Self::spawn_with_cancel(config, CancellationToken::new())
    }

    /// Like [`spawn`](Self::spawn); the machine also shuts down cleanly
    /// (with DISCONNECT) when `cancel` fires, e.g. a whole fleet at once.
    pub fn spawn_with_cancel(config: SimConfig, cancel: CancellationToken) -> SimHandle {
        let handle = Self::idle(config, cancel);
        handle.revive();
        handle
    }

    /// Builds a machine that does not connect until [`SimHandle::revive`]
    /// (a fleet starts its machines at a bounded rate); `cancel` as in
    /// [`spawn_with_cancel`](Self::spawn_with_cancel). Needs no runtime
    /// until revived.
    pub fn idle(config: SimConfig, cancel: CancellationToken) -> SimHandle {
        let mut state = MachineState::new(
            config.machine_no,
            config.firmware.clone(),
            config.inventory.clone(),
            config.behaviour.clone(),
        );
        state.set_go_timeout(config.go_timeout);
        let shared = Arc::new(Shared {
            config,
            state: Mutex::new(state),
            journal_tx: watch::Sender::new(0),
            connected_tx: watch::Sender::new(false),
            ready_tx: watch::Sender::new(false),
            cancel,
            running: Mutex::new(None),
            connection_errors: AtomicU64::new(0),
        });
        SimHandle { shared }
    }
}

/// State shared by the handle and the machine's tasks.
struct Shared {
    config: SimConfig,
    /// Locked only for short, synchronous sections, never across an await.
    state: Mutex<MachineState>,
    /// Bumped to [`MachineState::journal_seq`] after every change.
    journal_tx: watch::Sender<u64>,
    connected_tx: watch::Sender<bool>,
    /// Connected and subscribed to its commands (SUBACK received).
    ready_tx: watch::Sender<bool>,
    /// The machine's lifetime; once cancelled it cannot be revived.
    cancel: CancellationToken,
    /// The current connection, if any.
    running: Mutex<Option<Incarnation>>,
    /// Failed connection attempts and lost connections, ever.
    connection_errors: AtomicU64,
}

/// One run of the connection task, from `revive` until it stops.
struct Incarnation {
    /// Child of the machine's token: ends this run's tasks.
    life: CancellationToken,
    task: JoinHandle<()>,
    control: mpsc::UnboundedSender<Control>,
    out: mpsc::UnboundedSender<Outgoing>,
}

/// Requests from the handle and the publisher to the connection task.
enum Control {
    DropConnection,
    /// Cut at the next SUBACK: the publisher has queued a re-SUBSCRIBE
    /// behind the messages that must reach the gateway first, and the
    /// gateway answers one connection's packets in order, so that SUBACK
    /// proves they arrived (rumqttc tells nothing per publish).
    CutOnSubAck,
}

/// Locks a mutex; a panic elsewhere cannot leave these structures half
/// updated in a way that matters to a simulator, so poisoning is ignored.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Shared {
    /// Runs `f` on the machine state, then logs new journal entries and
    /// wakes journal waiters.
    fn with_state<R>(&self, f: impl FnOnce(&mut MachineState) -> R) -> R {
        let mut state = lock(&self.state);
        let before = state.journal_seq();
        let r = f(&mut state);
        let seq = state.journal_seq();
        let new = usize::try_from(seq - before)
            .unwrap_or(usize::MAX)
            .min(state.journal().len());
        let journal = state.journal();
        for entry in &journal[journal.len() - new..] {
            log_event(&self.config.machine_no, &entry.event);
        }
        drop(state);
        self.journal_tx
            .send_if_modified(|v| std::mem::replace(v, seq) != seq);
        r
    }

    fn record(&self, event: JournalEvent) {
        self.with_state(|s| s.record(event, Instant::now()));
    }

    fn set_connected(&self, connected: bool) {
        self.connected_tx
            .send_if_modified(|v| std::mem::replace(v, connected) != connected);
        if !connected {
            self.set_ready(false);
        }
    }

    fn set_ready(&self, ready: bool) {
        self.ready_tx
            .send_if_modified(|v| std::mem::replace(v, ready) != ready);
    }

    /// Queues messages for the running publisher, if any.
    fn send_out(&self, out: Vec<Outgoing>) {
        if let Some(run) = lock(&self.running).as_ref() {
            for o in out {
                // A closed queue means the connection is gone; the next
                // connect re-announces state, stock and results anyway.
                let _ = run.out.send(o);
            }
        }
    }
}

/// Logs a journal event: one line per command, answer and dispense.
fn log_event(m: &MachineNo, event: &JournalEvent) {
    match event {
        JournalEvent::ConnectionLost { error } => warn!(machine_no = %m, error, "connection lost"),
        JournalEvent::Malformed { topic, error } => {
            warn!(machine_no = %m, topic, error, "ignored message")
        }
        JournalEvent::SubscribeRefused => warn!(machine_no = %m, "command subscription refused"),
        JournalEvent::StateSent(_) | JournalEvent::InventorySent(_) => {
            debug!(machine_no = %m, ?event)
        }
        _ => info!(machine_no = %m, order_id = event.order_id(), ?event),
    }
}

/// Steers and observes one simulated machine. Cheap to clone.
///
/// Dropping every handle does not stop the machine (its tasks belong to the
/// runtime); call [`shutdown`](Self::shutdown) or cancel its token.
#[derive(Clone)]
pub struct SimHandle {
    shared: Arc<Shared>,
}

impl fmt::Debug for SimHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimHandle")
            .field("machine_no", &self.shared.config.machine_no)
            .field("connected", &self.connected())
            .finish()
    }
}

impl SimHandle {
    pub fn machine_no(&self) -> MachineNo {
        self.shared.config.machine_no
    }

    /// The machine's lifetime token; cancelling it shuts the machine down
    /// cleanly.
    pub fn cancellation_token(&self) -> CancellationToken {
        self.shared.cancel.clone()
    }

    /// A copy of the journal.
    pub fn journal(&self) -> Vec<JournalEntry> {
        lock(&self.shared.state).journal().to_vec()
    }

    /// Every order id actually dispensed, once per dispense, in order.
    /// Never trimmed: an id absent here was never dispensed.
    pub fn dispensed_orders(&self) -> Vec<u64> {
        lock(&self.shared.state).dispensed_orders().to_vec()
    }

    /// Whether this order was ever dispensed.
    pub fn was_dispensed(&self, order_id: u64) -> bool {
        lock(&self.shared.state).was_dispensed(order_id)
    }

    /// The orders acked and held, waiting for `cmd/go` (oldest first).
    pub fn held_orders(&self) -> Vec<u64> {
        lock(&self.shared.state).held_orders()
    }

    /// Current stock.
    pub fn stock(&self) -> Vec<InventoryItem> {
        lock(&self.shared.state).stock().to_vec()
    }

    /// Messages ignored as malformed or unexpected.
    pub fn malformed(&self) -> u64 {
        lock(&self.shared.state).malformed()
    }

    pub fn behaviour(&self) -> Behaviour {
        lock(&self.shared.state).behaviour().clone()
    }

    /// Changes how later dispense commands are answered. Orders already
    /// held are dispensed (on `go`) as the behaviour of their ack said.
    pub fn set_behaviour(&self, behaviour: Behaviour) {
        self.shared.with_state(|s| s.set_behaviour(behaviour));
    }

    /// Whether the gateway has accepted the current connection.
    pub fn connected(&self) -> bool {
        *self.shared.connected_tx.borrow()
    }

    /// Connection attempts that failed plus connections lost, since the
    /// machine was built (a fleet reports machines that cannot connect).
    pub fn connection_errors(&self) -> u64 {
        self.shared.connection_errors.load(Ordering::Relaxed)
    }

    /// Whether the machine is connected and its command subscription was
    /// granted, so a command published now will reach it.
    pub fn ready(&self) -> bool {
        *self.shared.ready_tx.borrow()
    }

    /// Waits until connected (CONNACK); false on timeout.
    pub async fn wait_connected(&self, timeout: Duration) -> bool {
        wait_watch(&self.shared.connected_tx, true, timeout).await
    }

    /// Waits until [`ready`](Self::ready); false on timeout. Prefer this over
    /// [`wait_connected`](Self::wait_connected) before sending commands.
    pub async fn wait_ready(&self, timeout: Duration) -> bool {
        wait_watch(&self.shared.ready_tx, true, timeout).await
    }

    /// Waits until not connected; false on timeout.
    pub async fn wait_disconnected(&self, timeout: Duration) -> bool {
        wait_watch(&self.shared.connected_tx, false, timeout).await
    }

    /// Waits until `pred` holds for the journal, re-checking after every
    /// append; false on timeout.
    pub async fn wait_for<F>(&self, mut pred: F, timeout: Duration) -> bool
    where
        F: FnMut(&[JournalEntry]) -> bool,
    {
        let deadline = Instant::now() + timeout;
        let mut rx = self.shared.journal_tx.subscribe();
        loop {
            // Mark the version seen before checking, so an append between
            // the check and the wait still wakes us.
            rx.borrow_and_update();
            if pred(lock(&self.shared.state).journal()) {
                return true;
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => {}
                // Timed out, or the sender is gone (cannot happen while we
                // hold `shared`).
                _ => return false,
            }
        }
    }

    /// Sets the stock to `items` and publishes the snapshot.
    pub fn refill(&self, items: Vec<InventoryItem>) {
        let out = self.shared.with_state(|s| s.refill(items));
        self.shared.send_out(out);
    }

    /// A sale at the machine itself (coins, a local card reader) of up to
    /// `quantity` of a product: stock goes down but no snapshot is
    /// published until the next dispense or refill, so the gateway's view is
    /// stale meanwhile. Returns how many came out.
    pub fn sell_locally(&self, product_id: i64, quantity: u32) -> u32 {
        self.shared
            .with_state(|s| s.sell_locally(product_id, quantity, Instant::now()))
    }

    /// Publishes `payload` as it is on `vend/v1/{own machine_no}/{suffix}`
    /// (e.g. a result naming another machine's order).
    pub fn publish_raw(&self, suffix: &str, payload: impl Into<Vec<u8>>) {
        self.shared.send_out(vec![Outgoing::Raw {
            suffix: suffix.to_owned(),
            payload: payload.into(),
        }]);
    }

    /// Publishes the stored recent results again, whatever the behaviour.
    pub fn republish_results(&self) {
        let results = lock(&self.shared.state).recent_results();
        self.shared
            .send_out(results.into_iter().map(Outgoing::Result).collect());
    }

    /// Reboots the machine now: forgets every held order (see
    /// [`MachineState::reboot`]; stock and finished orders' answers are
    /// kept), cuts the connection without DISCONNECT and reconnects after
    /// the backoff. A later `go` for a forgotten order is answered `no_go`.
    /// Returns the forgotten order ids.
    pub fn reboot(&self) -> Vec<u64> {
        let forgotten = self.shared.with_state(|s| s.reboot(Instant::now()));
        self.drop_connection();
        forgotten
    }

    /// Cuts the connection without DISCONNECT (the will fires); the machine
    /// reconnects after the backoff.
    pub fn drop_connection(&self) {
        if let Some(run) = lock(&self.shared.running).as_ref() {
            let _ = run.control.send(Control::DropConnection);
        }
    }

    /// Sends DISCONNECT and stays offline (no will) until [`revive`](Self::revive).
    pub async fn disconnect(&self) {
        let Some(run) = lock(&self.shared.running).take() else {
            return;
        };
        run.life.cancel();
        // The task ends by itself within DISCONNECT_TIMEOUT.
        let _ = run.task.await;
    }

    /// Closes the socket without DISCONNECT, like a power cut: the will
    /// fires and the machine stays offline until [`revive`](Self::revive).
    /// Stock, stored answers and the journal survive, as in flash memory;
    /// so do held orders, whose go timeouts keep running (a `no_go` result
    /// due meanwhile goes out on the next connect). For a machine that
    /// also forgets its held orders, use [`reboot`](Self::reboot).
    pub async fn kill(&self) {
        let Some(run) = lock(&self.shared.running).take() else {
            return;
        };
        // Abort before cancelling: the connection task would otherwise take
        // `life.cancelled()` as a request for a clean DISCONNECT.
        run.task.abort();
        let _ = run.task.await;
        run.life.cancel();
        self.shared.set_connected(false);
        self.shared.record(JournalEvent::Dropped);
    }

    /// Starts connecting again after `disconnect` or `kill`; does nothing if
    /// the machine is running or was shut down.
    pub fn revive(&self) {
        let mut running = lock(&self.shared.running);
        if self.shared.cancel.is_cancelled()
            || running.as_ref().is_some_and(|r| !r.task.is_finished())
        {
            return;
        }
        let life = self.shared.cancel.child_token();
        let (control, control_rx) = mpsc::unbounded_channel();
        let (out, out_rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(run_connection(
            Arc::clone(&self.shared),
            life.clone(),
            (control.clone(), control_rx),
            out.clone(),
            out_rx,
        ));
        *running = Some(Incarnation {
            life,
            task,
            control,
            out,
        });
    }

    /// Disconnects cleanly and stops for good.
    pub async fn shutdown(&self) {
        self.shared.cancel.cancel();
        self.disconnect().await;
    }
}

/// Waits until the watched flag equals `want`; false on timeout.
async fn wait_watch(tx: &watch::Sender<bool>, want: bool, timeout: Duration) -> bool {
    let mut rx = tx.subscribe();
    let reached = tokio::time::timeout(timeout, rx.wait_for(|v| *v == want)).await;
    matches!(reached, Ok(Ok(_)))
}

/// Builds the rumqttc options of PROTOCOL.md "Connecting".
fn mqtt_options(config: &SimConfig) -> Result<MqttOptions, String> {
    let (host, port) = config
        .gateway
        .rsplit_once(':')
        .and_then(|(host, port)| Some((host, port.parse::<u16>().ok()?)))
        .ok_or_else(|| format!("gateway address {:?} is not host:port", config.gateway))?;
    let m = config.machine_no;
    let mut options = MqttOptions::new(m.as_str(), host, port);
    // rumqttc panics below 1 s and truncates above u16::MAX seconds.
    let keep_alive = config.keep_alive.as_secs().clamp(1, u64::from(u16::MAX));
    options
        .set_keep_alive(Duration::from_secs(keep_alive))
        .set_clean_session(config.clean_session)
        .set_credentials(m.as_str(), config.secret.as_str())
        .set_max_packet_size(MAX_PACKET, MAX_PACKET)
        .set_inflight(INFLIGHT)
        .set_last_will(LastWill::new(
            topic::uplink(&m, Uplink::State),
            msg::encode(&StateMsg {
                online: false,
                firmware: None,
            }),
            QoS::AtLeastOnce,
            true,
        ));
    Ok(options)
}

/// The connection task of one incarnation.
async fn run_connection(
    shared: Arc<Shared>,
    life: CancellationToken,
    (control_tx, mut control): (
        mpsc::UnboundedSender<Control>,
        mpsc::UnboundedReceiver<Control>,
    ),
    out_tx: mpsc::UnboundedSender<Outgoing>,
    out_rx: mpsc::UnboundedReceiver<Outgoing>,
) {
    let options = match mqtt_options(&shared.config) {
        Ok(options) => options,
        Err(error) => {
            shared.record(JournalEvent::ConnectionLost { error });
            return;
        }
    };
    let (client, mut eventloop) = AsyncClient::new(options, REQUEST_CAPACITY);
    let mut network = NetworkOptions::new();
    // Without NODELAY every QoS 1 round trip waits ~40 ms on Nagle plus
    // delayed ACK.
    network.set_tcp_nodelay(true);
    network.set_connection_timeout(CONNECT_TIMEOUT_SECS);
    eventloop.set_network_options(network);
    // rumqttc pre-sizes its event queue for 100 events (~14 KiB). The ring
    // buffer's head wanders, so over hours every slot gets touched and
    // becomes resident; a fleet of idle machines grew ~8 KiB each in a
    // minute of keep-alives. A few slots suffice: the queue is drained on
    // every poll and grows on demand.
    eventloop.state.events = std::collections::VecDeque::with_capacity(EVENT_CAPACITY);
    tokio::spawn(run_publisher(
        Arc::clone(&shared),
        client.clone(),
        out_rx,
        control_tx,
        life.clone(),
    ));

    let mut backoff = BACKOFF_MIN;
    // Set by `Control::CutOnSubAck` (result-after-reconnect,
    // reboot-before-go).
    let mut cut_on_suback = false;
    // While set, the event loop is not polled at all (half-open): nothing is
    // read from or written to the socket, which stays open.
    let mut stalled_until: Option<Instant> = None;
    loop {
        if let Some(until) = stalled_until {
            tokio::select! {
                biased;
                () = life.cancelled() => {
                    // A stalled machine cannot say goodbye: the socket just
                    // closes with the task.
                    shared.record(JournalEvent::Dropped);
                    break;
                }
                Some(c) = control.recv() => {
                    if matches!(c, Control::DropConnection) {
                        stalled_until = None;
                        shared.record(JournalEvent::StallEnded);
                        if cut(&shared, &mut eventloop) && !pause(&life, BACKOFF_MIN).await {
                            break;
                        }
                    }
                }
                () = tokio::time::sleep_until(until) => {
                    stalled_until = None;
                    shared.record(JournalEvent::StallEnded);
                }
            }
            continue;
        }
        // `poll` is dropped when another branch wins. That is safe enough
        // here: rumqttc buffers reads and writes inside its framed codec,
        // and the other branches only fire on a stop or a test's request
        // to cut the connection anyway.
        let event = tokio::select! {
            biased;
            () = life.cancelled() => {
                disconnect_cleanly(&client, &mut eventloop).await;
                shared.record(JournalEvent::Disconnected);
                break;
            }
            Some(c) = control.recv() => {
                match c {
                    Control::DropConnection => {
                        if cut(&shared, &mut eventloop) && !pause(&life, BACKOFF_MIN).await {
                            break;
                        }
                    }
                    Control::CutOnSubAck => cut_on_suback = true,
                }
                continue;
            }
            event = eventloop.poll() => event,
        };
        match event {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                backoff = BACKOFF_MIN;
                // The reconnect a pending cut was for has happened anyway.
                cut_on_suback = false;
                shared.set_connected(true);
                // The gateway keeps no session, whatever the CONNECT asked
                // (gateway rule 8), and rumqttc does not resubscribe (issue
                // #250), so announce and subscribe on every CONNACK.
                let out = shared.with_state(|s| s.on_connect(Instant::now()));
                dispatch(&shared, &life, &out_tx, out);
            }
            Ok(Event::Incoming(Packet::SubAck(_))) if cut_on_suback => {
                cut_on_suback = false;
                if cut(&shared, &mut eventloop) && !pause(&life, BACKOFF_MIN).await {
                    break;
                }
            }
            Ok(Event::Incoming(Packet::SubAck(ack))) => {
                // The `cmd/#` SUBSCRIBE of `on_connect` (a re-SUBSCRIBE for
                // a pending cut is handled above).
                if ack
                    .return_codes
                    .iter()
                    .all(|c| matches!(c, SubscribeReasonCode::Success(_)))
                {
                    shared.record(JournalEvent::Subscribed);
                    shared.set_ready(true);
                } else {
                    shared.record(JournalEvent::SubscribeRefused);
                }
            }
            Ok(Event::Incoming(Packet::Publish(publish))) => {
                let out = on_publish(&shared, &publish.topic, &publish.payload);
                let then = dispatch(&shared, &life, &out_tx, out);
                if let Some(d) = then.stall {
                    shared.record(JournalEvent::Stalled {
                        ms: u64::try_from(d.as_millis()).unwrap_or(u64::MAX),
                    });
                    stalled_until = Some(Instant::now() + d);
                } else if then.cut
                    && cut(&shared, &mut eventloop)
                    && !pause(&life, BACKOFF_MIN).await
                {
                    break;
                }
            }
            Ok(_) => {}
            Err(e) => {
                shared.set_connected(false);
                shared.connection_errors.fetch_add(1, Ordering::Relaxed);
                shared.record(JournalEvent::ConnectionLost {
                    error: e.to_string(),
                });
                if !pause(&life, backoff).await {
                    break;
                }
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }
    shared.set_connected(false);
    // Ends the publisher and any slow-ack timers of this incarnation.
    life.cancel();
}

/// Drops the socket without DISCONNECT; false if there was none.
fn cut(shared: &Shared, eventloop: &mut EventLoop) -> bool {
    if eventloop.network.is_none() {
        return false;
    }
    // `clean` drops the network (closing the socket) and keeps unacked
    // requests; the next clean session discards them.
    eventloop.clean();
    shared.set_connected(false);
    shared.record(JournalEvent::Dropped);
    true
}

/// Sleeps unless the incarnation ends first; false if it ended.
async fn pause(life: &CancellationToken, d: Duration) -> bool {
    tokio::select! {
        () = life.cancelled() => false,
        () = tokio::time::sleep(d) => true,
    }
}

/// Sends DISCONNECT and polls until it is written, bounded in time.
async fn disconnect_cleanly(client: &AsyncClient, eventloop: &mut EventLoop) {
    // Polling without a network would open a new connection.
    if eventloop.network.is_none() || client.try_disconnect().is_err() {
        return;
    }
    let written = async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    let _ = tokio::time::timeout(DISCONNECT_TIMEOUT, written).await;
}

/// Turns an incoming PUBLISH into the machine's answers.
fn on_publish(shared: &Shared, topic_name: &str, payload: &[u8]) -> Vec<Outgoing> {
    let own = shared.config.machine_no;
    shared.with_state(|s| match topic::parse(topic_name) {
        Some(Topic::Command(m, kind)) if m == own => {
            s.handle_command(kind, payload, Instant::now())
        }
        _ => {
            s.note_unexpected(topic_name, "not a command for this machine", Instant::now());
            Vec::new()
        }
    })
}

/// What the connection task must do after [`dispatch`].
#[derive(Debug, Default)]
struct Then {
    /// Cut the connection now.
    cut: bool,
    /// Stop polling the event loop for this long (half-open).
    stall: Option<Duration>,
}

/// Routes outgoings: messages (and the delivered-then-cut marker, which must
/// stay behind them) to the publisher, slow acks and go timeouts to timers;
/// returns what the connection task itself must do.
fn dispatch(
    shared: &Arc<Shared>,
    life: &CancellationToken,
    out_tx: &mpsc::UnboundedSender<Outgoing>,
    out: Vec<Outgoing>,
) -> Then {
    let mut then = Then::default();
    for o in out {
        match o {
            Outgoing::DropConnection => then.cut = true,
            Outgoing::Stall(d) => then.stall = Some(d),
            Outgoing::Defer { order_id, after } => {
                let (shared, life, out_tx) = (Arc::clone(shared), life.clone(), out_tx.clone());
                tokio::spawn(async move {
                    if pause(&life, after).await {
                        let out = shared.with_state(|s| s.resume(order_id, Instant::now()));
                        // An ack and its go timeout, or a refusal: nothing
                        // for the connection task itself.
                        dispatch(&shared, &life, &out_tx, out);
                    }
                });
            }
            Outgoing::GoDeadline { order_id, after } => {
                let shared = Arc::clone(shared);
                // The machine's lifetime, not this connection's: the order
                // is held across reconnects (and a kill), so it times out
                // across them too. Its `no_go` result is stored, and
                // re-published on the next connect if no connection takes
                // it now. A timer whose order got its go or cancel first
                // finds nothing to do.
                let machine = shared.cancel.clone();
                tokio::spawn(async move {
                    tokio::select! {
                        () = machine.cancelled() => {}
                        () = tokio::time::sleep(after) => {
                            let out =
                                shared.with_state(|s| s.go_deadline(order_id, Instant::now()));
                            shared.send_out(out);
                        }
                    }
                });
            }
            // Fails only when the publisher has stopped with the incarnation.
            o => {
                let _ = out_tx.send(o);
            }
        }
    }
    then
}

/// Hands queued messages to the MQTT client, in order, and journals them.
async fn run_publisher(
    shared: Arc<Shared>,
    client: AsyncClient,
    mut out_rx: mpsc::UnboundedReceiver<Outgoing>,
    control: mpsc::UnboundedSender<Control>,
    life: CancellationToken,
) {
    let m = shared.config.machine_no;
    loop {
        let o = tokio::select! {
            () = life.cancelled() => return,
            o = out_rx.recv() => match o {
                Some(o) => o,
                None => return,
            },
        };
        let sent = async {
            match &o {
                Outgoing::Subscribe(filter) => {
                    client.subscribe(filter.as_str(), QoS::AtLeastOnce).await
                }
                Outgoing::DropWhenDelivered => {
                    // Everything before this marker is already in the
                    // client's queue; the re-SUBSCRIBE (same filter, so no
                    // change at the gateway) goes behind it.
                    let _ = control.send(Control::CutOnSubAck);
                    client
                        .subscribe(topic::command_filter(&m), QoS::AtLeastOnce)
                        .await
                }
                other => match other.publication(&m) {
                    Some(p) => {
                        client
                            .publish(p.topic, QoS::AtLeastOnce, p.retain, p.payload)
                            .await
                    }
                    None => Ok(()),
                },
            }
        };
        // The request channel blocks while the event loop is reconnecting;
        // stay stoppable meanwhile.
        let result = tokio::select! {
            () = life.cancelled() => return,
            r = sent => r,
        };
        match result {
            Ok(()) => {
                if let Some(event) = o.sent_event(&m) {
                    shared.record(event);
                }
            }
            // The event loop is gone: this incarnation is ending.
            Err(e) => {
                debug!(machine_no = %m, error = %e, "publisher stopped");
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_options_follow_the_config() {
        let m = MachineNo::parse("12345678").unwrap();
        let mut config = SimConfig::new("127.0.0.1:1883", m, "s");
        assert_eq!(config.go_timeout, DEFAULT_GO_TIMEOUT);
        let options = mqtt_options(&config).unwrap();
        assert!(options.clean_session(), "PROTOCOL.md: clean session");
        assert_eq!(options.client_id(), "12345678");
        config.clean_session = false;
        assert!(!mqtt_options(&config).unwrap().clean_session());
        let debug = format!("{config:?}");
        assert!(debug.contains("clean_session: false") && !debug.contains("\"s\""));
    }
}
