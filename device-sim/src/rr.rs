//! `rr`: bare MQTT request/response round trips through any MQTT 3.1.1
//! broker, to tell the broker's share of an order's latency from the
//! gateway's.
//!
//! Two rumqttc clients (TCP_NODELAY on): a responder subscribed to
//! `vendgate-rr/{run}/req/+` echoes each request to
//! `vendgate-rr/{run}/resp/{id}`; a requester subscribed to the responses
//! keeps `concurrency` requests outstanding until `count` have been sent,
//! and records each round trip in an HdrHistogram. Topics stay outside
//! `vend/v1/`, where service clients of the gateway may not publish.
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
/// Room for topic and header beyond the payload in a packet.
const PACKET_OVERHEAD: usize = 1024;

/// What to run.
#[derive(Clone)]
pub struct RrOptions {
    /// The broker, `host:port` (`[::1]:1883` for IPv6).
    pub broker: String,
    pub username: Option<String>,
    pub password: Option<String>,
    /// Requests outstanding at any time (≥ 1).
    pub concurrency: usize,
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
    let (host, port) = split_host_port(&opts.broker)?;
    let run = run_id();
    let topics = Topics::new(&run);
    let cancel = CancellationToken::new();
    // Stops every task of the run however this function returns.
    let _stop = cancel.clone().drop_guard();

    let mqtt = |role: &str| {
        let mut o = MqttOptions::new(format!("{TOPIC_ROOT}-{run}-{role}"), host.clone(), port);
        let max_packet = opts.payload.saturating_add(PACKET_OVERHEAD);
        o.set_keep_alive(KEEP_ALIVE)
            .set_clean_session(true)
            .set_max_packet_size(max_packet, max_packet)
            // A slot per outstanding message, so QoS 1/2 never throttles.
            .set_inflight(u16::try_from(opts.concurrency.max(10)).unwrap_or(u16::MAX));
        if let Some(user) = &opts.username {
            o.set_credentials(user.as_str(), opts.password.as_deref().unwrap_or(""));
        }
        o
    };
    // Room for every outstanding request plus SUBSCRIBE and DISCONNECT.
    let capacity = opts.concurrency.saturating_add(10);

    let (resp_client, resp_loop) = AsyncClient::new(mqtt("resp"), capacity);
    let (req_client, req_loop) = AsyncClient::new(mqtt("req"), capacity);
    let (echo_tx, echo_rx) = mpsc::unbounded_channel();
    let (resp_ready_tx, resp_ready) = oneshot::channel();
    let (req_ready_tx, req_ready) = oneshot::channel();
    let (done_tx, done_rx) = oneshot::channel();
    let starts: Arc<Mutex<HashMap<u64, Instant>>> = Arc::default();
    let permits = Arc::new(Semaphore::new(opts.concurrency));

    let mut responder = tokio::spawn(poll_responder(
        resp_loop,
        resp_ready_tx,
        echo_tx,
        topics.clone(),
        cancel.clone(),
    ));
    tokio::spawn(echo(
        resp_client.clone(),
        echo_rx,
        topics.clone(),
        qos,
        cancel.clone(),
    ));
    let mut requester = tokio::spawn(poll_requester(
        req_loop,
        Requester {
            ready: Some(req_ready_tx),
            done: Some(done_tx),
            starts: Arc::clone(&starts),
            permits: Arc::clone(&permits),
            topics: topics.clone(),
            count: opts.count,
            stall_timeout: opts.stall_timeout,
            hist: LatencyHistogram::new(),
            completed: 0,
            last_response: None,
        },
        cancel.clone(),
    ));
    // Queued before the first poll: rumqttc sends them after CONNACK.
    resp_client
        .try_subscribe(topics.request_filter(), qos)
        .context("queueing the responder's SUBSCRIBE")?;
    req_client
        .try_subscribe(topics.response_filter(), qos)
        .context("queueing the requester's SUBSCRIBE")?;

    let setup = async { (resp_ready.await, req_ready.await) };
    match tokio::time::timeout(SETUP_TIMEOUT, setup).await {
        Ok((Ok(Ok(())), Ok(Ok(())))) => {}
        Ok((Ok(Err(e)), _)) => bail!("responder: {e}"),
        Ok((_, Ok(Err(e)))) => bail!("requester: {e}"),
        // A task ended without saying why: it panicked.
        Ok(_) => bail!("a client task stopped during setup"),
        Err(_) => bail!(
            "broker {} did not accept and subscribe both clients within {SETUP_TIMEOUT:?}",
            opts.broker
        ),
    }

    let started = Instant::now();
    let sender = tokio::spawn(send_requests(
        req_client.clone(),
        topics,
        Bytes::from(vec![b'x'; opts.payload]),
        qos,
        opts.count,
        starts,
        permits,
    ));
    let done = tokio::select! {
        done = done_rx => match done {
            Ok(done) => done,
            // The requester ended without a result: its error says why.
            Err(_) => return Err(task_error("requester", requester.await)),
        },
        r = &mut responder => return Err(task_error("responder", r)),
    };
    sender.abort();

    // Clean DISCONNECTs; the poll tasks end when theirs is written.
    let _ = req_client.try_disconnect();
    let _ = resp_client.try_disconnect();
    let _ = tokio::time::timeout(DISCONNECT_TIMEOUT, async {
        let _ = (&mut requester).await;
        let _ = (&mut responder).await;
    })
    .await;

    let elapsed = done
        .last_response
        .map_or(Duration::ZERO, |at| at.duration_since(started));
    let s = done.hist.summary();
    Ok(RrReport {
        count: done.completed,
        errors: opts.count - done.completed,
        elapsed,
        throughput: stats::rate(done.completed, elapsed),
        p50_ms: s.p50_ms,
        p90_ms: s.p90_ms,
        p99_ms: s.p99_ms,
        p999_ms: s.p999_ms,
        max_ms: s.max_ms,
    })
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

/// The topics of one run.
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

    fn request(&self, id: u64) -> String {
        format!("{}{id}", self.request_prefix)
    }

    fn response(&self, id: u64) -> String {
        format!("{}{id}", self.response_prefix)
    }

    fn request_filter(&self) -> String {
        format!("{}+", self.request_prefix)
    }

    fn response_filter(&self) -> String {
        format!("{}+", self.response_prefix)
    }

    fn request_id(&self, topic: &str) -> Option<u64> {
        topic.strip_prefix(&self.request_prefix)?.parse().ok()
    }

    fn response_id(&self, topic: &str) -> Option<u64> {
        topic.strip_prefix(&self.response_prefix)?.parse().ok()
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

/// Polls the responder's event loop, handing each request to the echo task.
async fn poll_responder(
    mut eventloop: EventLoop,
    ready: Ready,
    echo_tx: mpsc::UnboundedSender<(u64, Bytes)>,
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
                if let Some(id) = topics.request_id(&p.topic) {
                    // The echo task outlives this loop except at the end.
                    let _ = echo_tx.send((id, p.payload));
                }
            }
            Ok(Event::Outgoing(Outgoing::Disconnect)) => return Ok(()),
            Ok(_) => {}
            Err(e) => return Err(connection_lost(e, &mut ready)),
        }
    }
}

/// Publishes the responder's answers, off the polling task.
async fn echo(
    client: AsyncClient,
    mut echo_rx: mpsc::UnboundedReceiver<(u64, Bytes)>,
    topics: Topics,
    qos: QoS,
    cancel: CancellationToken,
) {
    loop {
        let (id, payload) = tokio::select! {
            () = cancel.cancelled() => return,
            next = echo_rx.recv() => match next {
                Some(next) => next,
                None => return,
            },
        };
        let sent = tokio::select! {
            () = cancel.cancelled() => return,
            sent = client.publish_bytes(topics.response(id), qos, false, payload) => sent,
        };
        // Fails only once the event loop is gone.
        if sent.is_err() {
            return;
        }
    }
}

/// What the requester's loop reports when the run is over.
struct Done {
    hist: LatencyHistogram,
    completed: u64,
    last_response: Option<Instant>,
}

/// The requester's loop state.
struct Requester {
    ready: Option<Ready>,
    done: Option<oneshot::Sender<Done>>,
    /// Send time of each outstanding request, by id; shared with the sender.
    starts: Arc<Mutex<HashMap<u64, Instant>>>,
    /// A permit per request that may be sent; one comes back per response.
    permits: Arc<Semaphore>,
    topics: Topics,
    count: u64,
    stall_timeout: Duration,
    hist: LatencyHistogram,
    completed: u64,
    last_response: Option<Instant>,
}

impl Requester {
    /// Records one response; true when the run is complete.
    fn on_response(&mut self, topic: &str, now: Instant) -> bool {
        let Some(id) = self.topics.response_id(topic) else {
            return false;
        };
        // A QoS 1 duplicate finds no start any more and is ignored.
        let Some(sent) = lock(&self.starts).remove(&id) else {
            return false;
        };
        self.hist.record(now.duration_since(sent));
        self.completed += 1;
        self.last_response = Some(now);
        self.permits.add_permits(1);
        self.completed == self.count
    }

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

/// Polls the requester's event loop: times responses, returns permits,
/// and finishes the run when all are in or none came for `stall_timeout`.
/// Keeps polling afterwards so the DISCONNECT goes out cleanly.
async fn poll_requester(
    mut eventloop: EventLoop,
    mut state: Requester,
    cancel: CancellationToken,
) -> anyhow::Result<()> {
    set_network_options(&mut eventloop);
    // Armed at SUBACK, re-armed by each response.
    let mut stall_at: Option<Instant> = None;
    loop {
        // Only while the run is on: after `finish` the loop just waits for
        // the DISCONNECT.
        let armed = stall_at.filter(|_| state.done.is_some());
        let stall = async move {
            match armed {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        let event = tokio::select! {
            () = cancel.cancelled() => return Ok(()),
            () = stall => {
                state.finish();
                continue;
            }
            event = eventloop.poll() => event,
        };
        match event {
            Ok(Event::Incoming(Packet::SubAck(ack))) => {
                on_suback(&mut state.ready, &ack.return_codes);
                stall_at = Some(Instant::now() + state.stall_timeout);
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                let now = Instant::now();
                if state.on_response(&p.topic, now) {
                    state.finish();
                }
                stall_at = Some(now + state.stall_timeout);
            }
            Ok(Event::Outgoing(Outgoing::Disconnect)) => return Ok(()),
            Ok(_) => {}
            Err(e) => return Err(connection_lost(e, &mut state.ready)),
        }
    }
}

/// Sends requests 0..count, each when a permit is free.
async fn send_requests(
    client: AsyncClient,
    topics: Topics,
    payload: Bytes,
    qos: QoS,
    count: u64,
    starts: Arc<Mutex<HashMap<u64, Instant>>>,
    permits: Arc<Semaphore>,
) {
    for id in 0..count {
        match permits.acquire().await {
            // Returned by the requester's loop when the response arrives.
            Ok(permit) => permit.forget(),
            Err(_) => return,
        }
        lock(&starts).insert(id, Instant::now());
        let sent = client
            .publish_bytes(topics.request(id), qos, false, payload.clone())
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
        assert_eq!(t.request(7), "vendgate-rr/abc-1/req/7");
        assert_eq!(t.request_filter(), "vendgate-rr/abc-1/req/+");
        assert_eq!(t.request_id(&t.request(42)), Some(42));
        assert_eq!(t.response_id(&t.response(42)), Some(42));
        assert_eq!(t.response_id(&t.request(42)), None);
        assert_eq!(t.request_id("vendgate-rr/other/req/1"), None);
        assert_eq!(t.request_id("vendgate-rr/abc-1/req/x"), None);
        assert!(!t.request(1).starts_with("vend/v1/"));
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
        assert!(rr(opts).await.is_err());
    }

    #[test]
    fn report_json_names_units() {
        let report = RrReport {
            count: 10,
            errors: 0,
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
