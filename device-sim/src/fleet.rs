//! A fleet: thousands of simulated machines in one process and one tokio
//! runtime, started at a bounded connect rate, counted while they connect,
//! and disconnected together.

use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use vendgate_proto::machine::MachineNo;
use vendgate_proto::msg::InventoryItem;

use crate::behaviour::Behaviour;
use crate::sim::{SimConfig, SimHandle, SimMachine};
use crate::state::DEFAULT_GO_TIMEOUT;

/// Default machines started per second: fast, yet a gateway's accept loop
/// and authentication are not hit by ten thousand CONNECTs at once.
pub const DEFAULT_CONNECT_RATE: u32 = 2_000;

const NANOS_PER_SEC: u128 = 1_000_000_000;
/// Stand-in for "no deadline" (`Instant + Duration::MAX` would overflow).
const FOREVER: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// How every machine of a fleet behaves.
#[derive(Debug, Clone)]
pub struct FleetOptions {
    /// Machines started per second; 0 starts them all at once.
    pub connect_rate: u32,
    /// MQTT keep alive of every machine.
    pub keep_alive: Duration,
    pub behaviour: Behaviour,
    /// Initial stock of every machine.
    pub inventory: Vec<InventoryItem>,
    /// Reported in each machine's `state` message.
    pub firmware: String,
    /// How long every machine holds an acked order waiting for `go` (see
    /// [`SimConfig::go_timeout`]); a scenario may override it per machine.
    pub go_timeout: Duration,
    /// The CONNECT's clean session flag of every machine (see
    /// [`SimConfig::clean_session`]).
    pub clean_session: bool,
}

impl Default for FleetOptions {
    /// 2,000 connects per second, keep alive 30 s, normal behaviour, no
    /// stock, go timeout 10 s, clean session.
    fn default() -> Self {
        Self {
            connect_rate: DEFAULT_CONNECT_RATE,
            keep_alive: Duration::from_secs(30),
            behaviour: Behaviour::Normal,
            inventory: Vec::new(),
            firmware: concat!("vendgate-sim/", env!("CARGO_PKG_VERSION")).to_owned(),
            go_timeout: DEFAULT_GO_TIMEOUT,
            clean_session: true,
        }
    }
}

/// Many simulated machines sharing the current tokio runtime.
///
/// A machine counts as *connected* here once it is [`ready`](SimHandle::ready):
/// its CONNECT was accepted and its command subscription granted, so it can
/// take orders.
///
/// # Memory
///
/// About **30 KiB per machine**. Measured with `vendgate-sim fleet` (release
/// build, 2 vCPUs, glibc malloc), VmRSS of `/proc/self/status` before
/// spawning and once all machines were connected:
///
/// | broker | machines | RSS before → after | per machine |
/// | --- | --- | --- | --- |
/// | Mosquitto 2.0.11 | 10,000 | 5.6 → 294.7 MiB | 29.6 KiB (29.5–29.7 over 3 runs) |
/// | vendgate gateway | 1,000 | 4.8 → 33.8 MiB | 29.8 KiB |
///
/// It stays flat while idle: a minute of 1 s keep-alives moved 10,000
/// machines from 294 to 296 MiB. Before `sim.rs` shrank rumqttc's
/// defaults the same fleet took 38.1 KiB per machine at connect (inflight
/// window 100, request channel 256); with those at 10 but the event queue
/// still pre-sized for 100 events, it took 32.5 KiB and then grew ~8 KiB
/// per machine within a minute of keep-alives, as the queue's ring buffer
/// touched fresh slots. The queue now starts at 8 events.
///
/// What remains is mostly rumqttc's per-connection state, which cannot be
/// configured: two 8 KiB codec buffers (tokio-util's `Framed`) and an 8 KiB
/// bitset of incoming packet ids; then the two tasks (~3 KiB) and channels
/// of each machine. 10,000 machines connected in 5.0 s at the default
/// 2,000/s, 2.3 s with `--connect-rate 0`.
pub struct Fleet {
    handles: Vec<SimHandle>,
    /// Parent of every machine's lifetime token and of the starter.
    cancel: CancellationToken,
    starter: JoinHandle<()>,
    /// Machines the starter has revived so far.
    started: Arc<AtomicUsize>,
    spawned_at: Instant,
}

impl fmt::Debug for Fleet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Fleet")
            .field("machines", &self.handles.len())
            .field("progress", &self.progress())
            .finish()
    }
}

/// Counts of a fleet at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FleetProgress {
    pub machines: usize,
    /// Told to connect so far (the connect rate holds the rest back).
    pub started: usize,
    /// Connected and subscribed.
    pub connected: usize,
    /// Started, not connected, and at least one attempt failed: refused
    /// credentials, an unreachable gateway, or a lost connection being
    /// retried.
    pub failed: usize,
    /// Since [`Fleet::spawn`].
    pub elapsed: Duration,
}

impl fmt::Display for FleetProgress {
    /// `started=… connected=… failed=… elapsed=…s`, the CLI's progress line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "started={} connected={} failed={} elapsed={:.1}s",
            self.started,
            self.connected,
            self.failed,
            self.elapsed.as_secs_f64()
        )
    }
}

impl Fleet {
    /// Builds one machine per `(machine_no, secret)` and starts them, in
    /// order, at most `options.connect_rate` per second. Must be called on
    /// a tokio runtime; every machine reconnects (with backoff) until
    /// [`shutdown`](Self::shutdown).
    pub fn spawn(
        gateway: impl Into<String>,
        machines: Vec<(MachineNo, String)>,
        options: FleetOptions,
    ) -> Fleet {
        let behaviour = options.behaviour.clone();
        Self::spawn_with(gateway, machines, options, |_| behaviour.clone())
    }

    /// As [`spawn`](Self::spawn), but each machine starts with the
    /// behaviour `behaviour_for` gives it (e.g. from a
    /// [`Scenario`](crate::scenario::Scenario)) instead of `options.behaviour`.
    pub fn spawn_with(
        gateway: impl Into<String>,
        machines: Vec<(MachineNo, String)>,
        options: FleetOptions,
        behaviour_for: impl Fn(MachineNo) -> Behaviour,
    ) -> Fleet {
        Self::spawn_configured(gateway, machines, options, |c| {
            c.behaviour = behaviour_for(c.machine_no);
        })
    }

    /// As [`spawn`](Self::spawn), with each machine's behaviour, starting
    /// stock and go timeout from `scenario` (stock falls back to
    /// `options.inventory`, the go timeout to `options.go_timeout`).
    /// Start its schedules with [`Scenario::start_schedules`](crate::scenario::Scenario::start_schedules).
    pub fn spawn_scenario(
        gateway: impl Into<String>,
        machines: Vec<(MachineNo, String)>,
        options: FleetOptions,
        scenario: &crate::scenario::Scenario,
    ) -> Fleet {
        Self::spawn_configured(gateway, machines, options, |c| {
            let a = scenario.assignment_for(c.machine_no);
            c.behaviour = a.behaviour;
            if let Some(stock) = a.stock {
                c.inventory = stock;
            }
            if let Some(go_timeout) = a.go_timeout {
                c.go_timeout = go_timeout;
            }
        })
    }

    /// Builds every machine from `options`, lets `configure` adjust each
    /// one, and starts them at the fleet's rate.
    fn spawn_configured(
        gateway: impl Into<String>,
        machines: Vec<(MachineNo, String)>,
        options: FleetOptions,
        configure: impl Fn(&mut SimConfig),
    ) -> Fleet {
        let gateway = gateway.into();
        let cancel = CancellationToken::new();
        let handles: Vec<SimHandle> = machines
            .into_iter()
            .map(|(machine_no, secret)| {
                let mut config = SimConfig {
                    gateway: gateway.clone(),
                    machine_no,
                    secret,
                    keep_alive: options.keep_alive,
                    firmware: options.firmware.clone(),
                    inventory: options.inventory.clone(),
                    behaviour: options.behaviour.clone(),
                    go_timeout: options.go_timeout,
                    clean_session: options.clean_session,
                };
                configure(&mut config);
                // A child token each: one machine's `shutdown` must not
                // stop the others.
                SimMachine::idle(config, cancel.child_token())
            })
            .collect();
        let started = Arc::new(AtomicUsize::new(0));
        let to_start = handles.clone();
        let starter = tokio::spawn(start_at_rate(
            handles.len(),
            options.connect_rate,
            Arc::clone(&started),
            cancel.clone(),
            move |i| to_start[i].revive(),
        ));
        Fleet {
            handles,
            cancel,
            starter,
            started,
            spawned_at: Instant::now(),
        }
    }

    /// Every machine, in the order given to [`spawn`](Self::spawn).
    pub fn handles(&self) -> &[SimHandle] {
        &self.handles
    }

    pub fn len(&self) -> usize {
        self.handles.len()
    }

    pub fn is_empty(&self) -> bool {
        self.handles.is_empty()
    }

    /// Machines connected and subscribed right now.
    pub fn connected_count(&self) -> usize {
        self.handles.iter().filter(|h| h.ready()).count()
    }

    /// All counts in one pass over the machines.
    pub fn progress(&self) -> FleetProgress {
        let started = self.started.load(Ordering::Relaxed);
        let (mut connected, mut failed) = (0, 0);
        for h in &self.handles[..started.min(self.handles.len())] {
            if h.ready() {
                connected += 1;
            } else if h.connection_errors() > 0 {
                failed += 1;
            }
        }
        FleetProgress {
            machines: self.handles.len(),
            started,
            connected,
            failed,
            elapsed: self.spawned_at.elapsed(),
        }
    }

    /// Waits until every machine is connected at once. `Ok` holds the time
    /// from [`spawn`](Self::spawn) until this wait saw the last one;
    /// `Err` the number still missing when `timeout` ran out.
    pub async fn wait_all_connected(&self, timeout: Duration) -> Result<Duration, usize> {
        let now = Instant::now();
        let deadline = now
            .checked_add(timeout)
            .unwrap_or_else(|| now + FOREVER.min(timeout));
        loop {
            // Event-driven: each wait returns as soon as that machine's
            // SUBACK arrives, so the loop costs one pass per machine.
            for h in &self.handles {
                let left = deadline.saturating_duration_since(Instant::now());
                if !h.wait_ready(left).await {
                    return Err(self.len() - self.connected_count());
                }
            }
            // One checked early may have dropped since; go round again.
            if self.handles.iter().all(SimHandle::ready) {
                return Ok(self.spawned_at.elapsed());
            }
        }
    }

    /// Stops starting machines and disconnects every one cleanly (MQTT
    /// DISCONNECT, so no will fires), all at once; returns when they have
    /// stopped (about a second at most).
    pub async fn shutdown(mut self) {
        self.cancel.cancel();
        let _ = (&mut self.starter).await;
        // Every machine saw the cancellation above and is already sending
        // its DISCONNECT; these waits only collect the tasks.
        for h in &self.handles {
            h.shutdown().await;
        }
    }
}

impl Drop for Fleet {
    /// A fleet dropped without [`shutdown`](Fleet::shutdown) still
    /// disconnects its machines, in the background.
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// Calls `start(i)` for `i` in `0..total`, in order, at most `rate` times
/// per second (0: no limit), counting in `started`.
async fn start_at_rate(
    total: usize,
    rate: u32,
    started: Arc<AtomicUsize>,
    cancel: CancellationToken,
    mut start: impl FnMut(usize),
) {
    let begin = Instant::now();
    let mut next = 0;
    while next < total {
        // Machines due by now: one at t=0, then one every 1/rate seconds.
        // Catching up in batches keeps the rate exact although tokio's
        // timer only ticks every millisecond. Integer nanoseconds, so the
        // wake-up below always makes the next machine due (float rounding
        // could leave it just short and spin).
        let due = if rate == 0 {
            total
        } else {
            let due = begin.elapsed().as_nanos() * u128::from(rate) / NANOS_PER_SEC + 1;
            usize::try_from(due).unwrap_or(usize::MAX).min(total)
        };
        while next < due {
            if cancel.is_cancelled() {
                return;
            }
            start(next);
            next += 1;
            started.store(next, Ordering::Relaxed);
        }
        if next == total {
            break;
        }
        // When machine `next` becomes due: ceil(next / rate) seconds in.
        let nanos = (next as u128 * NANOS_PER_SEC).div_ceil(u128::from(rate.max(1)));
        let at = begin + Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX));
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep_until(at) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    /// What a test of the starter looks at: the count, the indices
    /// started in order, the stop token and the task.
    type Starter = (
        Arc<AtomicUsize>,
        Arc<Mutex<Vec<usize>>>,
        CancellationToken,
        JoinHandle<()>,
    );

    /// Runs the starter with a `start` that only logs the index.
    fn starter(total: usize, rate: u32) -> Starter {
        let started = Arc::new(AtomicUsize::new(0));
        let order = Arc::new(Mutex::new(Vec::new()));
        let cancel = CancellationToken::new();
        let log = Arc::clone(&order);
        let task = tokio::spawn(start_at_rate(
            total,
            rate,
            Arc::clone(&started),
            cancel.clone(),
            move |i| log.lock().unwrap().push(i),
        ));
        (started, order, cancel, task)
    }

    #[tokio::test(start_paused = true)]
    async fn starts_in_order_at_the_connect_rate() {
        let (started, order, _cancel, task) = starter(250, 100);
        tokio::time::sleep(Duration::from_millis(1_005)).await;
        // One at t=0, then one every 10 ms of (virtual) time.
        assert_eq!(started.load(Ordering::Relaxed), 101);
        task.await.unwrap();
        assert_eq!(started.load(Ordering::Relaxed), 250);
        assert_eq!(*order.lock().unwrap(), (0..250).collect::<Vec<_>>());
    }

    #[tokio::test(start_paused = true)]
    async fn rate_zero_starts_everything_at_once() {
        let (started, _order, _cancel, task) = starter(1_000, 0);
        task.await.unwrap();
        assert_eq!(started.load(Ordering::Relaxed), 1_000);
    }

    #[tokio::test(start_paused = true)]
    async fn cancel_stops_the_starter() {
        let (started, _order, cancel, task) = starter(10, 1);
        tokio::time::sleep(Duration::from_millis(1_500)).await;
        cancel.cancel();
        task.await.unwrap();
        assert_eq!(started.load(Ordering::Relaxed), 2);
    }

    #[tokio::test]
    async fn shutdown_before_start_leaves_machines_down() {
        let options = FleetOptions {
            connect_rate: 1,
            ..FleetOptions::default()
        };
        let machines = (0..10)
            .map(|i| {
                (
                    MachineNo::from_u32(10_000_000 + i).unwrap(),
                    format!("s{i}"),
                )
            })
            .collect();
        // Nothing listens on the discard port; only the first machine
        // starts before the shutdown.
        let fleet = Fleet::spawn("127.0.0.1:9", machines, options);
        let handles = fleet.handles().to_vec();
        assert_eq!(handles.len(), 10);
        fleet.shutdown().await;
        assert!(handles
            .iter()
            .all(|h| h.cancellation_token().is_cancelled()));
        handles[9].revive();
        assert!(!handles[9].connected());
    }

    #[test]
    fn progress_line() {
        let p = FleetProgress {
            machines: 10,
            started: 10,
            connected: 7,
            failed: 2,
            elapsed: Duration::from_millis(1_300),
        };
        assert_eq!(
            p.to_string(),
            "started=10 connected=7 failed=2 elapsed=1.3s"
        );
    }
}
