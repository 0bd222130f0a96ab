//! `rr`: bare MQTT request/response round trips through any MQTT 3.1.1
//! broker, to tell the broker's share of an order's latency from the
//! gateway's.
//!
//! rumqttc clients (TCP_NODELAY on): `requesters` connections, requester
//! `r` subscribed to `vendgate-rr/{run}/resp/{r}/+` and publishing requests
//! to `vendgate-rr/{run}/req/{r}/{id}`, together keep `concurrency`
//! requests outstanding (split evenly) until `count` have been sent; each
//! round trip goes into one HdrHistogram. `responders` connections echo
//! each request to the matching `resp/` topic: one responder subscribed to
//! every request (`req/+/+`), or one per requester subscribed to its own
//! (`req/{r}/+`), which is the many-subscriber shape a broker must route
//! without scanning every session. Topics stay outside `vend/v1/`, where
//! service clients of the gateway may not publish.
//!
//! The broker must set TCP_NODELAY on its sockets too, or every round trip
//! at concurrency 1 waits ~40 ms for Nagle and delayed ACK (Mosquitto:
//! `set_tcp_nodelay true`, off by default). Mosquitto 2.0.11 on 2 vCPUs,
//! QoS 1, 64 B: c=1 ≈ 7,300 rt/s (p50 0.13 ms, p99 0.24 ms); c=64 ≈
//! 16–28k rt/s.
//!
//! Tasks: each client's event loop is polled by a task that never awaits a
//! publish (rumqttc freezes when the polling task blocks on its own request
//! channel, issue #1025); publishing happens in the sender task (requests)
//! and the echo task (responses).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context as _};
use bytes::Bytes;
use rumqttc::{
    AsyncClient, ConnectionError, Event, EventLoop, MqttOptions, NetworkOptions, Outgoing, Packet,
    QoS, SubscribeReasonCode,
};
use serde::Serialize;
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::stats::{self, LatencyHistogram};

/// First level of every topic the tool uses.
pub const TOPIC_ROOT: &str = "vendgate-rr";
/// How long to wait for both clients to connect and subscribe.
const SETUP_TIMEOUT: Duration = Duration::from_secs(10);
/// TCP connect + CONNACK deadline, in seconds (rumqttc's unit).
const CONNECT_TIMEOUT_SECS: u64 = 5;
const KEEP_ALIVE: Duration = Duration::from_secs(30);
/// How long the clean DISCONNECTs at the end may take.
const DISCONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Requester (and responder) connections at most: each is a socket and a
/// few tasks here and at the broker.
pub const MAX_CONNECTIONS: usize = 1024;
/// Room for topic and header beyond the payload in a packet.
const PACKET_OVERHEAD: usize = 1024;

/// What to run.
#[derive(Clone)]
pub struct RrOptions {
    /// The broker, `host:port` (`[::1]:1883` for IPv6).
    pub broker: String,
    pub username: Option<String>,
    pub password: Option<String>,
    /// Requests outstanding at any time, over all requesters (≥ requesters).
    pub concurrency: usize,
    /// Requester connections (1 to [`MAX_CONNECTIONS`]).
    pub requesters: usize,
    /// Responder connections: 1 (subscribed to every request) or
    /// `requesters` (one each, subscribed to its requester's topic).
    pub responders: usize,
    /// Requests sent in all.
    pub count: u64,
    /// Payload bytes per request (echoed in the response).
    pub payload: usize,
    /// QoS of requests, responses and both subscriptions: 0, 1 or 2.
    pub qos: u8,
    /// Give up on the outstanding requests when no response has arrived
    /// for this long (they count as errors).
    pub stall_timeout: Duration,
}

impl RrOptions {
    /// One request at a time, 10,000 requests of 64 bytes at QoS 1,
    /// anonymous, 10 s stall timeout.
    pub fn new(broker: impl Into<String>) -> Self {
        Self {
            broker: broker.into(),
            username: None,
            password: None,
            concurrency: 1,
            requesters: 1,
            responders: 1,
            count: 10_000,
            payload: 64,
            qos: 1,
            stall_timeout: Duration::from_secs(10),
        }
    }
}

impl std::fmt::Debug for RrOptions {
    /// Like a derived `Debug`, but the password is never printed.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RrOptions")
            .field("broker", &self.broker)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("concurrency", &self.concurrency)
            .field("requesters", &self.requesters)
            .field("responders", &self.responders)
            .field("count", &self.count)
            .field("payload", &self.payload)
            .field("qos", &self.qos)
            .field("stall_timeout", &self.stall_timeout)
            .finish()
    }
}

/// The outcome of a run. Latencies in milliseconds.
#[derive(Debug, Clone, Serialize)]
pub struct RrReport {
    /// Round trips completed.
    pub count: u64,
    /// Requests without a response: lost (QoS 0), or outstanding when the
    /// run stalled.
    pub errors: u64,
    /// Requester and responder connections used.
    pub requesters: usize,
    pub responders: usize,
    /// From the first request to the last response.
    #[serde(rename = "elapsed_s", serialize_with = "stats::serialize_secs")]
    pub elapsed: Duration,
    /// Round trips per second.
    pub throughput: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
}

impl std::fmt::Display for RrReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "round trips={} errors={} elapsed={:.2}s throughput={:.0} rt/s\n\
             latency p50={:.3}ms p90={:.3}ms p99={:.3}ms p99.9={:.3}ms max={:.3}ms",
            self.count,
            self.errors,
            self.elapsed.as_secs_f64(),
            self.throughput,
            self.p50_ms,
            self.p90_ms,
            self.p99_ms,
            self.p999_ms,
            self.max_ms
        )
    }
}

/// Runs the round trips and reports. Fails if the options are invalid, a
/// client cannot connect or subscribe, or a connection drops mid-run.
pub async fn rr(opts: RrOptions) -> anyhow::Result<RrReport> {
    let qos = match opts.qos {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        2 => QoS::ExactlyOnce,
        n => bail!("qos must be 0, 1 or 2, not {n}"),
    };
    if opts.concurrency == 0 || opts.count == 0 {
        bail!("concurrency and count must be at least 1");
    }
    if opts.requesters == 0 || opts.requesters > MAX_CONNECTIONS {
        bail!("requesters must be 1 to {MAX_CONNECTIONS}");
    }
    if opts.responders != 1 && opts.responders != opts.requesters {
        bail!("responders must be 1 or the number of requesters");
    }
    if opts.concurrency < opts.requesters {
        bail!("concurrency must be at least the number of requesters");
    }
    let (host, port) = split_host_port(&opts.broker)?;
    let run = run_id();
    let topics = Topics::new(&run);
    let cancel = CancellationToken::new();
    // Stops every task of the run however this function returns.
    let _stop = cancel.clone().drop_guard();

    let mqtt = |role: String, outstanding: usize| {
        let mut o = MqttOptions::new(format!("{TOPIC_ROOT}-{run}-{role}"), host.clone(), port);
        let max_packet = opts.payload.saturating_add(PACKET_OVERHEAD);
        o.set_keep_alive(KEEP_ALIVE)
            .set_clean_session(true)
            .set_max_packet_size(max_packet, max_packet)
            // A slot per outstanding message, so QoS 1/2 never throttles.
            .set_inflight(u16::try_from(outstanding.max(10)).unwrap_or(u16::MAX));
        if let Some(user) = &opts.username {
            o.set_credentials(user.as_str(), opts.password.as_deref().unwrap_or(""));
        }
        o
    };

    let mut ready = Vec::new();
    let mut clients = Vec::new();
    // Responders: one for every request topic, or one per requester.
    let mut responders = JoinSet::new();
    for j in 0..opts.responders {
        // A single responder may have every request outstanding at once.
        let outstanding = if opts.responders == 1 {
            opts.concurrency
        } else {
            share(opts.concurrency, opts.requesters, j)
        };
        let (client, eventloop) =
            AsyncClient::new(mqtt(format!("resp{j}"), outstanding), outstanding + 10);
        let (echo_tx, echo_rx) = mpsc::unbounded_channel();
        let (ready_tx, ready_rx) = oneshot::channel();
        responders.spawn(poll_responder(
            eventloop,
            ready_tx,
            echo_tx,
            topics.clone(),
            cancel.clone(),
        ));
        tokio::spawn(echo(client.clone(), echo_rx, qos, cancel.clone()));
        // Queued before the first poll: rumqttc sends it after CONNACK.
        let filter = if opts.responders == 1 {
            topics.all_requests_filter()
        } else {
            topics.request_filter(j)
        };
        client
            .try_subscribe(filter, qos)
            .context("queueing a responder's SUBSCRIBE")?;
        ready.push(ready_rx);
        clients.push(client);
    }

    let (done_tx, done_rx) = oneshot::channel();
    let tally = Arc::new(Mutex::new(Tally {
        done: Some(done_tx),
        hist: LatencyHistogram::new(),
        completed: 0,
        last_response: None,
    }));
    let starts: Arc<Mutex<HashMap<u64, Instant>>> = Arc::default();
    let next_id = Arc::new(AtomicU64::new(0));
    let mut requesters = JoinSet::new();
    let mut senders = Vec::new();
    for r in 0..opts.requesters {
        let outstanding = share(opts.concurrency, opts.requesters, r);
        let (client, eventloop) =
            AsyncClient::new(mqtt(format!("req{r}"), outstanding), outstanding + 10);
        let (ready_tx, ready_rx) = oneshot::channel();
        let permits = Arc::new(Semaphore::new(outstanding));
        requesters.spawn(poll_requester(
            eventloop,
            Requester {
                ready: Some(ready_tx),
                tally: Arc::clone(&tally),
                starts: Arc::clone(&starts),
                permits: Arc::clone(&permits),
                topics: topics.clone(),
                count: opts.count,
                stall_timeout: opts.stall_timeout,
            },
            cancel.clone(),
        ));
        client
            .try_subscribe(topics.response_filter(r), qos)
            .context("queueing a requester's SUBSCRIBE")?;
        ready.push(ready_rx);
        senders.push((client.clone(), permits));
        clients.push(client);
    }
    // The requesters' loops hold the tally now: when all of them are gone
    // without finishing, `done_rx` hears it.
    drop(tally);

    let setup = async {
        for r in ready {
            match r.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(anyhow::anyhow!(e)),
                // A task ended without saying why: it panicked.
                Err(_) => bail!("a client task stopped during setup"),
            }
        }
        Ok(())
    };
    match tokio::time::timeout(SETUP_TIMEOUT, setup).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(e),
        Err(_) => bail!(
            "broker {} did not accept and subscribe every client within {SETUP_TIMEOUT:?}",
            opts.broker
        ),
    }

    let started = Instant::now();
    let payload = Bytes::from(vec![b'x'; opts.payload]);
    let mut sending = JoinSet::new();
    for (r, (client, permits)) in senders.into_iter().enumerate() {
        sending.spawn(send_requests(
            client,
            topics.clone(),
            r,
            payload.clone(),
            qos,
            opts.count,
            Arc::clone(&next_id),
            Arc::clone(&starts),
            permits,
        ));
    }
    let done = tokio::select! {
        done = done_rx => match done {
            Ok(done) => done,
            // Every requester ended without a result: the first error says why.
            Err(_) => return Err(first_error("requester", &mut requesters).await),
        },
        Some(r) = requesters.join_next() => return Err(task_error("requester", r)),
        Some(r) = responders.join_next() => return Err(task_error("responder", r)),
    };
    sending.abort_all();

    // Clean DISCONNECTs; the poll tasks end when theirs is written.
    for c in &clients {
        let _ = c.try_disconnect();
    }
    let _ = tokio::time::timeout(DISCONNECT_TIMEOUT, async {
        while requesters.join_next().await.is_some() {}
        while responders.join_next().await.is_some() {}
    })
    .await;

    let elapsed = done
        .last_response
        .map_or(Duration::ZERO, |at| at.duration_since(started));
    let s = done.hist.summary();
    Ok(RrReport {
        count: done.completed,
        errors: opts.count - done.completed,
        requesters: opts.requesters,
        responders: opts.responders,
        elapsed,
        throughput: stats::rate(done.completed, elapsed),
        p50_ms: s.p50_ms,
        p90_ms: s.p90_ms,
        p99_ms: s.p99_ms,
        p999_ms: s.p999_ms,
        max_ms: s.max_ms,
    })
}

/// Connection `i`'s part of `total` split over `n` (the first ones get
/// the remainder).
fn share(total: usize, n: usize, i: usize) -> usize {
    total / n + usize::from(i < total % n)
}

/// The error a poll task ended with (ending with `Ok` is a clean
/// DISCONNECT, which is unexpected mid-run).
fn task_error(
    role: &str,
    joined: Result<anyhow::Result<()>, tokio::task::JoinError>,
) -> anyhow::Error {
    match joined {
        Ok(Err(e)) => e.context(role.to_owned()),
        Ok(Ok(())) => anyhow::anyhow!("{role} disconnected"),
        Err(join) => anyhow::anyhow!("{role} task failed: {join}"),
    }
}

/// The first of a set of ended poll tasks' errors.
async fn first_error(role: &str, set: &mut JoinSet<anyhow::Result<()>>) -> anyhow::Error {
    match set.join_next().await {
        Some(r) => task_error(role, r),
        None => anyhow::anyhow!("{role}s stopped"),
    }
}

/// The topics of one run: requester `r` sends `req/{r}/{id}` and hears
/// `resp/{r}/{id}`.
#[derive(Debug, Clone)]
struct Topics {
    request_prefix: String,
    response_prefix: String,
}

impl Topics {
    fn new(run: &str) -> Self {
        Self {
            request_prefix: format!("{TOPIC_ROOT}/{run}/req/"),
            response_prefix: format!("{TOPIC_ROOT}/{run}/resp/"),
        }
    }

    fn request(&self, r: usize, id: u64) -> String {
        format!("{}{r}/{id}", self.request_prefix)
    }

    #[cfg(test)]
    fn response(&self, r: usize, id: u64) -> String {
        format!("{}{r}/{id}", self.response_prefix)
    }

    /// The response topic answering request topic `topic`.
    fn response_to(&self, topic: &str) -> Option<String> {
        let rest = topic.strip_prefix(&self.request_prefix)?;
        Some(format!("{}{rest}", self.response_prefix))
    }

    /// What a single responder subscribes to.
    fn all_requests_filter(&self) -> String {
        format!("{}+/+", self.request_prefix)
    }

    /// Requester `r`'s requests, for its own responder.
    fn request_filter(&self, r: usize) -> String {
        format!("{}{r}/+", self.request_prefix)
    }

    fn response_filter(&self, r: usize) -> String {
        format!("{}{r}/+", self.response_prefix)
    }

    fn response_id(&self, topic: &str) -> Option<u64> {
        let rest = topic.strip_prefix(&self.response_prefix)?;
        rest.split_once('/')?.1.parse().ok()
    }
}

/// A short id that keeps concurrent runs on one broker apart.
fn run_id() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!("{:x}-{nanos:08x}", std::process::id())
}

/// Splits `host:port`; `[v6]:port` loses its brackets.
pub(crate) fn split_host_port(addr: &str) -> anyhow::Result<(String, u16)> {
    let (host, port) = addr
        .rsplit_once(':')
        .with_context(|| format!("{addr:?} is not host:port"))?;
    let port = port
        .parse()
        .with_context(|| format!("{addr:?}: bad port"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        bail!("{addr:?}: empty host");
    }
    Ok((host.to_owned(), port))
}

fn set_network_options(eventloop: &mut EventLoop) {
    let mut network = NetworkOptions::new();
    // Without NODELAY every QoS 1 round trip waits ~40 ms on Nagle plus
    // delayed ACK.
    network.set_tcp_nodelay(true);
    network.set_connection_timeout(CONNECT_TIMEOUT_SECS);
    eventloop.set_network_options(network);
}

type Ready = oneshot::Sender<Result<(), String>>;

/// Answers the setup waiter at the first SUBACK.
fn on_suback(ready: &mut Option<Ready>, codes: &[SubscribeReasonCode]) {
    if let Some(ready) = ready.take() {
        let granted = codes
            .iter()
            .all(|c| matches!(c, SubscribeReasonCode::Success(_)));
        let _ = ready.send(if granted {
            Ok(())
        } else {
            Err("subscription refused".to_owned())
        });
    }
}

/// A connection error ends the run (rumqttc would reconnect with a clean
/// session and no subscription); a setup waiter hears it first.
fn connection_lost(e: ConnectionError, ready: &mut Option<Ready>) -> anyhow::Error {
    if let Some(ready) = ready.take() {
        let _ = ready.send(Err(e.to_string()));
    }
    anyhow::Error::new(e).context("connection lost")
}

/// Polls a responder's event loop, handing each request to its echo task.
async fn poll_responder(
    mut eventloop: EventLoop,
    ready: Ready,
    echo_tx: mpsc::UnboundedSender<(String, Bytes)>,
    topics: Topics,
    cancel: CancellationToken,
) -> anyhow::Result<()> {
    set_network_options(&mut eventloop);
    let mut ready = Some(ready);
    loop {
        let event = tokio::select! {
            () = cancel.cancelled() => return Ok(()),
            event = eventloop.poll() => event,
        };
        match event {
            Ok(Event::Incoming(Packet::SubAck(ack))) => on_suback(&mut ready, &ack.return_codes),
            Ok(Event::Incoming(Packet::Publish(p))) => {
                if let Some(topic) = topics.response_to(&p.topic) {
                    // The echo task outlives this loop except at the end.
                    let _ = echo_tx.send((topic, p.payload));
                }
            }
            Ok(Event::Outgoing(Outgoing::Disconnect)) => return Ok(()),
            Ok(_) => {}
            Err(e) => return Err(connection_lost(e, &mut ready)),
        }
    }
}

/// Publishes a responder's answers, off the polling task. The channel
/// holds at most the requests outstanding (each requester waits for its
/// answers before sending more).
async fn echo(
    client: AsyncClient,
    mut echo_rx: mpsc::UnboundedReceiver<(String, Bytes)>,
    qos: QoS,
    cancel: CancellationToken,
) {
    loop {
        let (topic, payload) = tokio::select! {
            () = cancel.cancelled() => return,
            next = echo_rx.recv() => match next {
                Some(next) => next,
                None => return,
            },
        };
        let sent = tokio::select! {
            () = cancel.cancelled() => return,
            sent = client.publish_bytes(topic, qos, false, payload) => sent,
        };
        // Fails only once the event loop is gone.
        if sent.is_err() {
            return;
        }
    }
}

/// What the requesters report when the run is over.
struct Done {
    hist: LatencyHistogram,
    completed: u64,
    last_response: Option<Instant>,
}

/// The run's results so far, shared by every requester's loop.
struct Tally {
    /// Taken by the first loop to finish the run.
    done: Option<oneshot::Sender<Done>>,
    hist: LatencyHistogram,
    completed: u64,
    last_response: Option<Instant>,
}

impl Tally {
    /// Hands the result to `rr`; later calls do nothing.
    fn finish(&mut self) {
        if let Some(done) = self.done.take() {
            let _ = done.send(Done {
                hist: std::mem::take(&mut self.hist),
                completed: self.completed,
                last_response: self.last_response,
            });
        }
    }
}

/// One requester connection's loop state.
struct Requester {
    ready: Option<Ready>,
    tally: Arc<Mutex<Tally>>,
    /// Send time of each outstanding request, by id; shared with the senders.
    starts: Arc<Mutex<HashMap<u64, Instant>>>,
    /// A permit per request this connection may send; one comes back per
    /// response.
    permits: Arc<Semaphore>,
    topics: Topics,
    count: u64,
    stall_timeout: Duration,
}

impl Requester {
    /// Records one response; finishes the run when it is the last.
    fn on_response(&mut self, topic: &str, now: Instant) {
        let Some(id) = self.topics.response_id(topic) else {
            return;
        };
        // A QoS 1 duplicate finds no start any more and is ignored.
        let Some(sent) = lock(&self.starts).remove(&id) else {
            return;
        };
        let mut tally = lock(&self.tally);
        tally.hist.record(now.duration_since(sent));
        tally.completed += 1;
        tally.last_response = Some(now);
        self.permits.add_permits(1);
        if tally.completed == self.count {
            tally.finish();
        }
    }

    /// When the run counts as stalled: `stall_timeout` after the last
    /// response on any connection (or after `from`, before the first).
    fn stall_deadline(&self, from: Instant) -> Option<Instant> {
        let tally = lock(&self.tally);
        tally.done.as_ref()?;
        Some(tally.last_response.unwrap_or(from).max(from) + self.stall_timeout)
    }
}

/// Polls a requester's event loop: times responses, returns permits, and
/// finishes the run when all are in or none came on any connection for
/// `stall_timeout`. Keeps polling afterwards so the DISCONNECT goes out
/// cleanly.
async fn poll_requester(
    mut eventloop: EventLoop,
    mut state: Requester,
    cancel: CancellationToken,
) -> anyhow::Result<()> {
    set_network_options(&mut eventloop);
    // Armed at SUBACK.
    let mut armed_at: Option<Instant> = None;
    loop {
        // Only while the run is on: after it finished the loop just waits
        // for the DISCONNECT.
        let deadline = armed_at.and_then(|from| state.stall_deadline(from));
        let stall = async move {
            match deadline {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        let event = tokio::select! {
            () = cancel.cancelled() => return Ok(()),
            () = stall => {
                // Another connection's response may have moved the deadline.
                let now = Instant::now();
                let mut tally = lock(&state.tally);
                let last = tally.last_response.into_iter().chain(armed_at).max();
                if last.is_some_and(|l| now >= l + state.stall_timeout) {
                    tally.finish();
                }
                continue;
            }
            event = eventloop.poll() => event,
        };
        match event {
            Ok(Event::Incoming(Packet::SubAck(ack))) => {
                on_suback(&mut state.ready, &ack.return_codes);
                armed_at = Some(Instant::now());
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                state.on_response(&p.topic, Instant::now());
            }
            Ok(Event::Outgoing(Outgoing::Disconnect)) => return Ok(()),
            Ok(_) => {}
            Err(e) => return Err(connection_lost(e, &mut state.ready)),
        }
    }
}

/// Sends requests on requester `r`'s connection, each when one of its
/// permits is free, taking ids from the run's counter until `count`.
#[allow(clippy::too_many_arguments)]
async fn send_requests(
    client: AsyncClient,
    topics: Topics,
    r: usize,
    payload: Bytes,
    qos: QoS,
    count: u64,
    next_id: Arc<AtomicU64>,
    starts: Arc<Mutex<HashMap<u64, Instant>>>,
    permits: Arc<Semaphore>,
) {
    loop {
        match permits.acquire().await {
            // Returned by the requester's loop when the response arrives.
            Ok(permit) => permit.forget(),
            Err(_) => return,
        }
        let id = next_id.fetch_add(1, Ordering::Relaxed);
        if id >= count {
            return;
        }
        lock(&starts).insert(id, Instant::now());
        let sent = client
            .publish_bytes(topics.request(r, id), qos, false, payload.clone())
            .await;
        // Fails only once the event loop is gone.
        if sent.is_err() {
            return;
        }
    }
}

/// Locks a mutex; the maps behind it stay consistent even if a holder
/// panicked (every critical section is one insert or remove).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_round_trip_ids_and_avoid_the_protocol_prefix() {
        let t = Topics::new("abc-1");
        assert_eq!(t.request(3, 7), "vendgate-rr/abc-1/req/3/7");
        assert_eq!(t.request_filter(3), "vendgate-rr/abc-1/req/3/+");
        assert_eq!(t.all_requests_filter(), "vendgate-rr/abc-1/req/+/+");
        assert_eq!(t.response_filter(3), "vendgate-rr/abc-1/resp/3/+");
        assert_eq!(
            t.response_to(&t.request(3, 42)).as_deref(),
            Some(t.response(3, 42).as_str())
        );
        assert_eq!(t.response_id(&t.response(3, 42)), Some(42));
        assert_eq!(t.response_id(&t.request(3, 42)), None);
        assert_eq!(t.response_to("vendgate-rr/other/req/1/1"), None);
        assert_eq!(t.response_id("vendgate-rr/abc-1/resp/1/x"), None);
        assert!(!t.request(1, 1).starts_with("vend/v1/"));
    }

    #[test]
    fn splits_addresses() {
        assert_eq!(
            split_host_port("127.0.0.1:1883").unwrap(),
            ("127.0.0.1".to_owned(), 1883)
        );
        assert_eq!(
            split_host_port("[::1]:8883").unwrap(),
            ("::1".to_owned(), 8883)
        );
        assert!(split_host_port("localhost").is_err());
        assert!(split_host_port("host:99999").is_err());
        assert!(split_host_port(":1883").is_err());
    }

    #[tokio::test]
    async fn rejects_bad_options_before_connecting() {
        let mut opts = RrOptions::new("127.0.0.1:9");
        opts.qos = 3;
        assert!(rr(opts.clone()).await.is_err());
        opts.qos = 1;
        opts.concurrency = 0;
        assert!(rr(opts.clone()).await.is_err());
        opts.concurrency = 4;
        opts.requesters = 8;
        assert!(
            rr(opts.clone()).await.is_err(),
            "fewer outstanding than requesters"
        );
        opts.requesters = 4;
        opts.responders = 2;
        assert!(
            rr(opts).await.is_err(),
            "responders neither 1 nor requesters"
        );
    }

    #[test]
    fn shares_cover_the_total() {
        assert_eq!(
            (0..3).map(|i| share(10, 3, i)).collect::<Vec<_>>(),
            [4, 3, 3]
        );
        assert_eq!((0..64).map(|i| share(64, 64, i)).sum::<usize>(), 64);
    }

    #[test]
    fn report_json_names_units() {
        let report = RrReport {
            count: 10,
            errors: 0,
            requesters: 1,
            responders: 1,
            elapsed: Duration::from_millis(1_500),
            throughput: 6.7,
            p50_ms: 0.3,
            p90_ms: 0.4,
            p99_ms: 1.0,
            p999_ms: 1.2,
            max_ms: 1.5,
        };
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["elapsed_s"], 1.5);
        assert_eq!(json["p999_ms"], 1.2);
        assert!(!report.to_string().is_empty());
    }

    #[test]
    fn debug_hides_the_password() {
        let mut opts = RrOptions::new("b:1");
        opts.password = Some("hunter2".into());
        assert!(!format!("{opts:?}").contains("hunter2"));
    }
}
