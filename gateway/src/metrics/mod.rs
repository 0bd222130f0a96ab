//! Metrics: what operators scrape at `GET /metrics` (Prometheus text format).
//!
//! Components count in their own atomics on the hot path (`EdgeStats`,
//! `OrderStats`, `UplinkStats`, the observers below); at scrape time
//! [`Metrics::render`] copies them into a `metrics-exporter-prometheus`
//! recorder owned by this gateway and renders it. Histograms are recorded
//! straight into the recorder.
//!
//! Why a recorder per gateway and not the `metrics` facade's global one: tests
//! run many gateways in one process, and each must count only its own
//! traffic; installing a global recorder also fails when one exists. Every
//! series is registered up front with a fixed label set (topic *patterns*,
//! reasons, outcomes, API codes; never a machine number), so the exposition
//! has the same series for 10 machines as for 10,000 and panels never miss a
//! zero.
//!
//! - `orders`: order outcomes and recent failures ([`OrderObserver`]).
//! - `webhooks`: delivery result labels, notifier liveness ([`WebhookObserver`]).
//! - `process`: RSS, CPU, fds, start time from `/proc/self`.

pub mod http;
pub mod orders;
pub mod process;
pub mod webhooks;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use metrics::{Counter, Gauge, Histogram, Key, KeyName, Label, Metadata, Recorder, SharedString};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle, PrometheusRecorder};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use vendgate_proto::codes::ErrorCode;

use crate::edge::router::RouterStats;
use crate::edge::stats::{ClientKind, Direction, DisconnectReason, Timings, PATTERNS, REFUSALS};
use crate::edge::EdgeStats;
use crate::fleet::PresenceCounts;
use crate::notifier::NotifierStats;
use crate::secrets::PreviousSecretUses;
use crate::storage::OutboxBacklog;
pub use orders::OrderObserver;
pub use webhooks::WebhookObserver;

/// Latency buckets (seconds) for every histogram: from a loopback round trip
/// to the 60 s default dispense deadline.
const BUCKETS: [f64; 16] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];

/// The gateway's version, for `vendgate_build_info`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

static META: Metadata<'static> =
    Metadata::new(module_path!(), metrics::Level::INFO, Some(module_path!()));

/// `order_service` counters copied from `OrderStats`, by `event` label.
pub const ORDER_EVENTS: [&str; 15] = [
    "placed",
    "accepted",
    "refused",
    "not_accepted",
    "busy",
    "unknown",
    "results_applied",
    "duplicate_device_messages",
    "rejected_device_messages",
    "malformed_device_messages",
    "go_sent",
    "go_withheld",
    "caller_gone",
    "dispensed_after_rejection",
    "uplinks_overloaded",
];

/// The handles of every registered series.
struct Series {
    topic_messages: [[Counter; PATTERNS.len()]; 2],
    topic_bytes: [[Counter; PATTERNS.len()]; 2],
    malformed_packets: Counter,
    malformed_payloads: Counter,
    acl_violations: Counter,
    refused: [Counter; REFUSALS.len()],
    connects: [Counter; 2],
    disconnects: [[Counter; DisconnectReason::ALL.len()]; 2],
    sessions: Gauge,
    slow_consumers: Counter,
    persistent_sessions_away: Gauge,
    session_dropped: Counter,
    sessions_expired: Counter,
    denied_subscriptions: Counter,
    connections: Gauge,
    rejected: [Counter; 4],
    subscriptions_refused: Counter,
    retained_refused: Counter,
    log_lines_suppressed: Counter,
    connect_timeouts: Counter,
    tls_handshake_failures: Counter,
    oversized_packets: Counter,
    auth_throttled: [Counter; 2],
    http_rate_limited: Counter,
    tasks_ended: Counter,
    http_connections: Gauge,
    http_rejected: [Counter; 2],
    http_header_timeouts: Counter,
    http_request_timeouts: Counter,
    http_tls_handshake_timeouts: Counter,
    http_tls_handshake_failures: Counter,
    dashboard_login_failures: Counter,
    dashboard_login_throttled: [Counter; 2],
    argon2_busy: [Counter; 2],
    machines_online: Gauge,
    machines_provisioned: Gauge,
    machines_flapping: Gauge,
    orders: [Counter; orders::OUTCOMES.len()],
    order_events: [Counter; ORDER_EVENTS.len()],
    order_requests: [Counter; ErrorCode::ALL.len()],
    queue_depth: Gauge,
    webhook_deliveries: [Counter; webhooks::DeliveryResult::ALL.len()],
    webhook_refused_targets: Counter,
    /// Index 0: machine, 1: merchant.
    previous_secret_used: [Counter; 2],
    outbox_backlog: Gauge,
    outbox_oldest_age: Gauge,
    uptime: Gauge,
    retention_purged: [Counter; crate::retention::KINDS.len()],
    database_size: Gauge,
}

/// Registers series on the recorder, describing each name once.
struct Registrar<'a>(&'a PrometheusRecorder);

impl Registrar<'_> {
    fn key(name: &'static str, labels: &[(&'static str, &'static str)]) -> Key {
        let labels: Vec<Label> = labels.iter().map(|(k, v)| Label::new(*k, *v)).collect();
        Key::from_parts(name, labels)
    }

    fn counter(
        &self,
        name: &'static str,
        help: &'static str,
        labels: &[(&'static str, &'static str)],
    ) -> Counter {
        self.counter_key(name, help, Self::key(name, labels))
    }

    fn counter_key(&self, name: &'static str, help: &'static str, key: Key) -> Counter {
        self.0.describe_counter(
            KeyName::from_const_str(name),
            None,
            SharedString::const_str(help),
        );
        self.0.register_counter(&key, &META)
    }

    fn gauge(
        &self,
        name: &'static str,
        help: &'static str,
        labels: &[(&'static str, &'static str)],
    ) -> Gauge {
        self.0.describe_gauge(
            KeyName::from_const_str(name),
            None,
            SharedString::const_str(help),
        );
        self.0.register_gauge(&Self::key(name, labels), &META)
    }

    fn histogram(&self, name: &'static str, help: &'static str) -> Histogram {
        self.0.describe_histogram(
            KeyName::from_const_str(name),
            None,
            SharedString::const_str(help),
        );
        self.0.register_histogram(&Self::key(name, &[]), &META)
    }
}

/// What the exposition shows of the components: their counters (read in
/// place) and figures computed from their state. The builder of the gateway
/// fills one at each scrape; this module reads nothing of the components
/// itself, so every component can count into it without an import circle.
pub struct Snapshot<'a> {
    pub edge: &'a EdgeStats,
    pub router: &'a RouterStats,
    /// Sessions in the router, connected now.
    pub sessions: u64,
    /// Persistent sessions kept while their client is away.
    pub parked_sessions: u64,
    /// Open MQTT connections.
    pub connections: u64,
    pub log_lines_suppressed: u64,
    /// Uplink payloads dropped as malformed, by the uplink dispatcher and
    /// the order service together.
    pub malformed_payloads: u64,
    pub presence: PresenceCounts,
    /// Provisioned machines; None keeps the last value (storage error).
    pub machines_provisioned: Option<u64>,
    /// The order service's event counters, in [`ORDER_EVENTS`] order.
    pub order_events: [u64; ORDER_EVENTS.len()],
    pub notifier: &'a NotifierStats,
    /// The webhook outbox; None keeps the last value (storage error).
    pub outbox: Option<OutboxBacklog>,
    /// Cluster mode: this node's cluster traffic and the live members.
    pub cluster: Option<ClusterFigures>,
    /// Long-lived tasks that ended before shutdown.
    pub tasks_ended: u64,
}

/// Cluster series: counters and the live members' machine counts.
#[derive(Debug, Clone, Default)]
pub struct ClusterFigures {
    pub node: String,
    pub counts: ClusterCounts,
    /// Machines connected to each live node, as its heartbeat says.
    pub members: std::collections::HashMap<String, u64>,
}

/// The cluster's traffic counters at one scrape.
#[derive(Debug, Clone, Copy, Default)]
pub struct ClusterCounts {
    pub forwarded: u64,
    pub forward_lost: u64,
    pub no_responder_retries: u64,
    pub served: u64,
    pub takeovers_closed: u64,
    pub fenced: u64,
    pub machines_reaped: u64,
    pub uplinks_out: u64,
    pub uplinks_in: u64,
    pub uplinks_dropped: u64,
}

/// See the module docs. One per gateway, in `GatewayHandle::metrics`.
pub struct Metrics {
    handle: PrometheusHandle,
    series: Series,
    started: std::time::Instant,
    /// `POST /orders` answers by API code, index as `ErrorCode::ALL`.
    order_requests: [AtomicU64; ErrorCode::ALL.len()],
    order_request_duration: Histogram,
    accept_latency: Histogram,
    dispense_duration: Histogram,
    /// Order outcomes; the order service reports into it.
    pub orders: Arc<OrderObserver>,
    /// Whether the notifier's task runs (start-up wraps it).
    pub webhooks: Arc<WebhookObserver>,
    /// Uses of previous secrets during rotation grace periods; the edge's
    /// authenticator and the open API count into it.
    pub previous_secrets: Arc<PreviousSecretUses>,
    /// Open API requests refused with 10003 (any endpoint, not only
    /// `POST /orders`, which `order_requests` also counts by code).
    pub http_rate_limited: AtomicU64,
    /// The HTTP listeners' bounds and the dashboard's sign-in throttle.
    pub http: Arc<http::HttpStats>,
    /// Logins answered busy by the argon2 queues.
    pub argon2: Arc<crate::passwords::Argon2Stats>,
    /// The retention purge's counts and the database size.
    pub retention: Arc<crate::retention::RetentionStats>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        Self::for_node(None)
    }

    /// Cluster mode: every series carries `node="{node}"`, so a Prometheus
    /// scraping all nodes can sum or split them.
    pub fn for_node(node: Option<&str>) -> Self {
        let builder = || match node {
            Some(n) => PrometheusBuilder::new().add_global_label("node", n),
            None => PrometheusBuilder::new(),
        };
        let recorder = match builder().set_buckets(&BUCKETS) {
            Ok(b) => b.build_recorder(),
            // Only fails on an empty bucket list; summaries are still valid.
            Err(_) => builder().build_recorder(),
        };
        let handle = recorder.handle();
        let r = Registrar(&recorder);
        let topic = |name: &'static str, help: &'static str| -> [[Counter; PATTERNS.len()]; 2] {
            Direction::ALL.map(|d| {
                PATTERNS
                    .map(|p| r.counter(name, help, &[("pattern", p), ("direction", d.as_str())]))
            })
        };
        let series = Series {
            topic_messages: topic(
                "vendgate_mqtt_messages_total",
                "MQTT PUBLISH messages by topic pattern and direction (in: from clients, out: to clients).",
            ),
            topic_bytes: topic(
                "vendgate_mqtt_bytes_total",
                "Topic plus payload bytes of MQTT PUBLISH messages by topic pattern and direction.",
            ),
            malformed_packets: r.counter(
                "vendgate_mqtt_malformed_total",
                "Malformed input: MQTT packets that closed a connection, or protocol payloads that did not decode.",
                &[("kind", "packet")],
            ),
            malformed_payloads: r.counter(
                "vendgate_mqtt_malformed_total",
                "Malformed input: MQTT packets that closed a connection, or protocol payloads that did not decode.",
                &[("kind", "payload")],
            ),
            acl_violations: r.counter(
                "vendgate_mqtt_acl_violations_total",
                "PUBLISH, SUBSCRIBE or will topics refused by the topic ACL.",
                &[],
            ),
            refused: REFUSALS.map(|reason| {
                r.counter(
                    "vendgate_mqtt_connect_refused_total",
                    "CONNECTs refused, by reason.",
                    &[("reason", reason)],
                )
            }),
            connects: ClientKind::ALL.map(|k| {
                r.counter(
                    "vendgate_mqtt_connects_total",
                    "Accepted MQTT CONNECTs by client class.",
                    &[("class", k.as_str())],
                )
            }),
            disconnects: ClientKind::ALL.map(|k| {
                DisconnectReason::ALL.map(|reason| {
                    r.counter(
                        "vendgate_mqtt_disconnects_total",
                        "Ended MQTT connections by client class and reason; auth_failure counts refused CONNECTs.",
                        &[("class", k.as_str()), ("reason", reason.as_str())],
                    )
                })
            }),
            sessions: r.gauge(
                "vendgate_mqtt_sessions",
                "Live MQTT connections (machines and services).",
                &[],
            ),
            slow_consumers: r.counter(
                "vendgate_mqtt_slow_consumers_total",
                "Connections closed because they did not read their messages.",
                &[],
            ),
            persistent_sessions_away: r.gauge(
                "vendgate_mqtt_persistent_sessions_away",
                "Persistent (clean_session = 0) sessions kept for a client that is away.",
                &[],
            ),
            session_dropped: r.counter(
                "vendgate_mqtt_session_dropped_total",
                "QoS 1/2 messages not queued for an away persistent session because its queue was full.",
                &[],
            ),
            sessions_expired: r.counter(
                "vendgate_mqtt_sessions_expired_total",
                "Persistent sessions discarded after mqtt.session_expiry without their client.",
                &[],
            ),
            denied_subscriptions: r.counter(
                "vendgate_mqtt_denied_subscriptions_total",
                "SUBSCRIBE filters answered 0x80 because of mqtt.deny_filters.",
                &[],
            ),
            connections: r.gauge(
                "vendgate_mqtt_connections",
                "Open MQTT connections, plain and TLS, before and after CONNECT (limited by mqtt.max_connections).",
                &[],
            ),
            rejected: crate::edge::limits::Rejection::ALL.map(|reason| {
                r.counter(
                    "vendgate_mqtt_connections_rejected_total",
                    "Connections closed at accept by a limit (mqtt.max_connections, mqtt.accept_rate, and their per-address forms).",
                    &[("reason", reason.as_str())],
                )
            }),
            subscriptions_refused: r.counter(
                "vendgate_mqtt_subscriptions_refused_total",
                "SUBSCRIBE filters answered 0x80 by a session's limits (mqtt.max_subscriptions, mqtt.machine_max_subscriptions, mqtt.max_subscription_bytes, the memory budget).",
                &[],
            ),
            retained_refused: r.counter(
                "vendgate_mqtt_retained_refused_total",
                "Retained publishes not kept: over mqtt.max_retained, mqtt.max_retained_bytes or mqtt.max_retained_message_size, or a machine's payload that is not a JSON object.",
                &[],
            ),
            log_lines_suppressed: r.counter(
                "vendgate_mqtt_log_lines_suppressed_total",
                "Refusal log lines not written because their source address logged too many already.",
                &[],
            ),
            connect_timeouts: r.counter(
                "vendgate_mqtt_connect_timeouts_total",
                "Connections closed for want of a TLS handshake and CONNECT within mqtt.connect_timeout.",
                &[],
            ),
            tls_handshake_failures: r.counter(
                "vendgate_mqtt_tls_handshake_failures_total",
                "Failed TLS handshakes on the MQTT TLS listener (untrusted client certificates included).",
                &[],
            ),
            oversized_packets: r.counter(
                "vendgate_mqtt_oversized_packets_total",
                "Connections closed for a packet over mqtt.max_packet_size.",
                &[],
            ),
            auth_throttled: crate::edge::limits::ThrottleScope::ALL.map(|scope| {
                r.counter(
                    "vendgate_mqtt_auth_throttled_total",
                    "CONNECTs refused by failed-auth throttling, by the key that was blocked.",
                    &[("scope", scope.as_str())],
                )
            }),
            tasks_ended: r.counter(
                "vendgate_tasks_ended_total",
                "Long-lived tasks (edge, notifier, sweeps, persister...) that ended before shutdown; /readyz fails while any has.",
                &[],
            ),
            http_rate_limited: r.counter(
                "vendgate_http_rate_limited_total",
                "Open API requests refused with 10003 by the per-merchant rate limit.",
                &[],
            ),
            http_connections: r.gauge(
                "vendgate_http_connections",
                "Open HTTP connections (API and admin listeners, TLS handshakes included).",
                &[],
            ),
            http_rejected: http::ConnRejection::ALL.map(|why| {
                r.counter(
                    "vendgate_http_connections_rejected_total",
                    "New HTTP connections closed at once by a connection cap, by reason.",
                    &[("reason", why.as_str())],
                )
            }),
            http_header_timeouts: r.counter(
                "vendgate_http_header_timeouts_total",
                "HTTP connections closed because request headers did not arrive within http.header_read_timeout (slow or idle clients).",
                &[],
            ),
            http_request_timeouts: r.counter(
                "vendgate_http_request_timeouts_total",
                "HTTP requests answered 50000/503 because they ran past http.request_timeout.",
                &[],
            ),
            http_tls_handshake_timeouts: r.counter(
                "vendgate_http_tls_handshake_timeouts_total",
                "HTTPS connections closed because the TLS handshake (slot wait included) took longer than http.tls_handshake_timeout.",
                &[],
            ),
            http_tls_handshake_failures: r.counter(
                "vendgate_http_tls_handshake_failures_total",
                "Failed TLS handshakes on the HTTPS listener.",
                &[],
            ),
            dashboard_login_failures: r.counter(
                "vendgate_dashboard_login_failures_total",
                "Dashboard sign-ins with a wrong username or password.",
                &[],
            ),
            dashboard_login_throttled: crate::edge::limits::ThrottleScope::ALL.map(|scope| {
                r.counter(
                    "vendgate_dashboard_login_throttled_total",
                    "Dashboard sign-ins refused (429) by failed-login throttling, by the key that was blocked.",
                    &[("scope", scope.as_str())],
                )
            }),
            argon2_busy: crate::passwords::Lane::ALL.map(|lane| {
                r.counter(
                    "vendgate_argon2_busy_total",
                    "Logins answered busy because no argon2 slot was free within the bounds, by lane.",
                    &[("lane", lane.as_str())],
                )
            }),
            machines_online: r.gauge("vendgate_machines_online", "Machines online now.", &[]),
            machines_provisioned: r.gauge(
                "vendgate_machines_provisioned",
                "Machines provisioned in storage.",
                &[],
            ),
            machines_flapping: r.gauge(
                "vendgate_machines_flapping",
                "Machines with 3 or more connects in the last hour.",
                &[],
            ),
            orders: orders::OUTCOMES.map(|s| {
                r.counter(
                    "vendgate_orders_total",
                    "Orders reaching a final status (unknown may later settle and count again).",
                    &[("outcome", s.as_str())],
                )
            }),
            order_events: ORDER_EVENTS.map(|e| {
                r.counter(
                    "vendgate_order_service_events_total",
                    "Order service events: placements, machine answers, device message anomalies.",
                    &[("event", e)],
                )
            }),
            order_requests: ErrorCode::ALL.map(|c| {
                // The label set is the proto's code table, so it is fixed.
                let key = Key::from_parts(
                    "vendgate_order_requests_total",
                    vec![Label::new("code", c.code().to_string())],
                );
                r.counter_key(
                    "vendgate_order_requests_total",
                    "POST /orders answers by API code (0 is success).",
                    key,
                )
            }),
            queue_depth: r.gauge(
                "vendgate_order_queue_depth",
                "Orders waiting behind the one in flight, summed over machines.",
                &[],
            ),
            webhook_deliveries: webhooks::DeliveryResult::ALL.map(|d| {
                r.counter(
                    "vendgate_webhook_deliveries_total",
                    "Webhook delivery attempts by result.",
                    &[("result", d.as_str())],
                )
            }),
            webhook_refused_targets: r.counter(
                "vendgate_webhook_refused_targets_total",
                "Failed attempts whose notify_url resolved to a forbidden (private, loopback) address.",
                &[],
            ),
            previous_secret_used: ["machine", "merchant"].map(|account| {
                r.counter(
                    "vendgate_previous_secret_used_total",
                    "Authentications with a secret replaced by a rotation, during its grace period (machine: MQTT CONNECT, merchant: open API).",
                    &[("account", account)],
                )
            }),
            outbox_backlog: r.gauge(
                "vendgate_webhook_outbox_backlog",
                "Webhook events not yet delivered.",
                &[],
            ),
            outbox_oldest_age: r.gauge(
                "vendgate_webhook_outbox_oldest_age_seconds",
                "Age of the oldest undelivered webhook event (0 when none).",
                &[],
            ),
            uptime: r.gauge(
                "vendgate_uptime_seconds",
                "Seconds since this gateway was built.",
                &[],
            ),
            retention_purged: crate::retention::KINDS.map(|k| {
                r.counter(
                    "vendgate_retention_purged_rows_total",
                    "Rows deleted by the retention purge, by kind (orders, their timeline rows, webhook rows).",
                    &[("kind", k)],
                )
            }),
            database_size: r.gauge(
                "vendgate_database_size_bytes",
                "Size of the database (SQLite: the main file; PostgreSQL: pg_database_size), measured every minute; 0 before the first measurement.",
                &[],
            ),
        };
        let build_info = r.gauge(
            "vendgate_build_info",
            "Always 1; the version label tells the build.",
            &[("version", VERSION)],
        );
        build_info.set(1.0);
        let order_request_duration = r.histogram(
            "vendgate_order_request_duration_seconds",
            "POST /orders latency, request to answer (includes the machine's accept).",
        );
        let accept_latency = r.histogram(
            "vendgate_machine_accept_latency_seconds",
            "cmd/dispense written to the machine's ack for that order, measured at the edge.",
        );
        let dispense_duration = r.histogram(
            "vendgate_machine_dispense_duration_seconds",
            "Accepting ack to the machine's result for that order, measured at the edge.",
        );
        Self {
            handle,
            series,
            started: std::time::Instant::now(),
            order_requests: Default::default(),
            http_rate_limited: AtomicU64::new(0),
            http: Arc::default(),
            argon2: Arc::default(),
            retention: Arc::default(),
            order_request_duration,
            accept_latency,
            dispense_duration,
            orders: Arc::new(OrderObserver::default()),
            webhooks: Arc::new(WebhookObserver::default()),
            previous_secrets: Arc::default(),
        }
    }

    /// The edge's dispense-timing histograms, recorded into this recorder.
    pub fn edge_timings(&self) -> Timings {
        Timings {
            accept: self.accept_latency.clone(),
            dispense: self.dispense_duration.clone(),
        }
    }

    /// Drain recorded histogram samples into their buckets every few seconds,
    /// so memory stays flat when nobody scrapes.
    pub fn spawn_upkeep(self: &Arc<Self>, shutdown: CancellationToken) -> JoinHandle<()> {
        let me = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(5)) => me.handle.run_upkeep(),
                }
            }
        })
    }

    /// One `POST /orders` answered with API `code` (None: not an envelope)
    /// after `elapsed`.
    pub fn order_request(&self, code: Option<i32>, elapsed: Duration) {
        self.order_request_duration.record(elapsed.as_secs_f64());
        let i = code
            .and_then(ErrorCode::from_code)
            .and_then(|c| ErrorCode::ALL.iter().position(|x| *x == c))
            // An answer without an envelope code can only be an internal failure.
            .or_else(|| {
                ErrorCode::ALL
                    .iter()
                    .position(|x| *x == ErrorCode::Internal)
            });
        if let Some(a) = i.and_then(|i| self.order_requests.get(i)) {
            a.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// `POST /orders` answers with `code` so far.
    pub fn order_requests(&self, code: ErrorCode) -> u64 {
        ErrorCode::ALL
            .iter()
            .position(|x| *x == code)
            .and_then(|i| self.order_requests.get(i))
            .map_or(0, |a| a.load(Ordering::Relaxed))
    }

    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// The exposition: copy the figures of `snap` and this module's own
    /// counters into the recorder, then render.
    pub fn render(&self, snap: &Snapshot<'_>) -> String {
        let s = &self.series;
        let e = snap.edge;
        for d in Direction::ALL {
            for (i, _) in PATTERNS.iter().enumerate() {
                let (m, b) = e.topics.get(d, i);
                s.topic_messages[d as usize][i].absolute(m);
                s.topic_bytes[d as usize][i].absolute(b);
            }
        }
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        s.malformed_packets.absolute(l(&e.malformed));
        s.malformed_payloads.absolute(snap.malformed_payloads);
        s.acl_violations.absolute(l(&e.acl_violations));
        for (i, c) in s.refused.iter().enumerate() {
            c.absolute(e.connections.refusals(i));
        }
        for k in ClientKind::ALL {
            s.connects[k as usize].absolute(e.connections.connects(k));
            for r in DisconnectReason::ALL {
                s.disconnects[k as usize][r as usize].absolute(e.connections.disconnects(k, r));
            }
        }
        let router = snap.router;
        s.sessions.set(snap.sessions as f64);
        s.slow_consumers.absolute(l(&router.slow_consumers));
        s.persistent_sessions_away.set(snap.parked_sessions as f64);
        s.session_dropped.absolute(l(&router.session_dropped));
        s.sessions_expired.absolute(l(&router.sessions_expired));
        s.denied_subscriptions.absolute(l(&e.denied_subscriptions));
        s.connections.set(snap.connections as f64);
        s.rejected[0].absolute(l(&e.rejected_max_connections));
        s.rejected[1].absolute(l(&e.rejected_accept_rate));
        s.rejected[2].absolute(l(&e.rejected_address_connections));
        s.rejected[3].absolute(l(&e.rejected_address_rate));
        s.subscriptions_refused
            .absolute(l(&e.subscriptions_refused));
        s.retained_refused.absolute(l(&router.retained_refused));
        s.log_lines_suppressed.absolute(snap.log_lines_suppressed);
        s.connect_timeouts.absolute(l(&e.connect_timeouts));
        s.tls_handshake_failures
            .absolute(l(&e.tls_handshake_failures));
        s.oversized_packets.absolute(l(&e.oversized_packets));
        for (c, a) in s.auth_throttled.iter().zip(&e.auth_throttled) {
            c.absolute(l(a));
        }
        s.http_rate_limited.absolute(l(&self.http_rate_limited));
        s.tasks_ended.absolute(snap.tasks_ended);
        let h = &self.http;
        s.http_connections
            .set(h.connections.load(Ordering::Relaxed) as f64);
        for (c, a) in s.http_rejected.iter().zip(&h.rejected) {
            c.absolute(l(a));
        }
        s.http_header_timeouts.absolute(l(&h.header_timeouts));
        s.http_request_timeouts.absolute(l(&h.request_timeouts));
        s.http_tls_handshake_timeouts
            .absolute(l(&h.tls_handshake_timeouts));
        s.http_tls_handshake_failures
            .absolute(l(&h.tls_handshake_failures));
        s.dashboard_login_failures.absolute(l(&h.login_failures));
        for (c, a) in s.dashboard_login_throttled.iter().zip(&h.login_throttled) {
            c.absolute(l(a));
        }
        for (c, a) in s.argon2_busy.iter().zip(&self.argon2.busy) {
            c.absolute(l(a));
        }

        let p = snap.presence;
        s.machines_online.set(p.online as f64);
        s.machines_flapping.set(p.flapping as f64);
        s.queue_depth.set(p.queued_orders as f64);
        if let Some(n) = snap.machines_provisioned {
            s.machines_provisioned.set(n as f64);
        }

        for (i, c) in s.orders.iter().enumerate() {
            c.absolute(self.orders.outcome(i));
        }
        for (c, n) in s.order_events.iter().zip(snap.order_events) {
            c.absolute(n);
        }
        for (c, a) in s.order_requests.iter().zip(&self.order_requests) {
            c.absolute(l(a));
        }

        let n = snap.notifier;
        for d in webhooks::DeliveryResult::ALL {
            s.webhook_deliveries[d as usize].absolute(d.count(n));
        }
        s.webhook_refused_targets.absolute(l(&n.refused_targets));
        let prev = &self.previous_secrets;
        s.previous_secret_used[0].absolute(l(&prev.machine));
        s.previous_secret_used[1].absolute(l(&prev.merchant));
        // On a storage error the gauges keep their last value; /readyz
        // reports the storage problem.
        if let Some(b) = &snap.outbox {
            s.outbox_backlog.set(b.pending as f64);
            s.outbox_oldest_age
                .set(oldest_age_seconds(b.oldest_pending));
        }
        s.uptime.set(self.started.elapsed().as_secs_f64());
        for (c, n) in s.retention_purged.iter().zip(&self.retention.purged) {
            c.absolute(n.load(Ordering::Relaxed));
        }
        s.database_size
            .set(self.retention.database_size.load(Ordering::Relaxed) as f64);

        let mut out = self.handle.render();
        process::ProcessStats::read().render(&mut out);
        if let Some(c) = &snap.cluster {
            render_cluster(&mut out, c);
        }
        out
    }
}

/// Cluster series, written directly: the member label's values are the
/// nodes alive now, not a set fixed at start.
fn render_cluster(out: &mut String, c: &ClusterFigures) {
    use std::fmt::Write;
    let node = &c.node;
    let st = &c.counts;
    let l = |n: &u64| *n;
    let counters: [(&str, &str, u64); 10] = [
        ("vendgate_cluster_forwarded_total", "Orders, payments, commands and pings sent to the node holding the machine.", l(&st.forwarded)),
        ("vendgate_cluster_forward_lost_total", "Forwarded orders whose owner never answered (settled from the database like a missing ack).", l(&st.forward_lost)),
        ("vendgate_cluster_no_responder_retries_total", "Owner requests retried because nobody answered yet (a machine just moved).", l(&st.no_responder_retries)),
        ("vendgate_cluster_requests_served_total", "Requests from other nodes answered for machines held here.", l(&st.served)),
        ("vendgate_cluster_takeovers_closed_total", "Connections closed here because another node took the machine over.", l(&st.takeovers_closed)),
        ("vendgate_cluster_fenced_total", "Times this node found itself declared dead and closed its machine connections.", l(&st.fenced)),
        ("vendgate_cluster_machines_reaped_total", "Machines of dead nodes this node wrote offline.", l(&st.machines_reaped)),
        ("vendgate_cluster_uplinks_out_total", "Machine uplinks copied to the other nodes.", l(&st.uplinks_out)),
        ("vendgate_cluster_uplinks_in_total", "Machine uplinks copied here from other nodes.", l(&st.uplinks_in)),
        ("vendgate_cluster_uplinks_dropped_total", "Uplink copies dropped because NATS could not keep up.", l(&st.uplinks_dropped)),
    ];
    for (name, help, v) in counters {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} counter\n{name}{{node=\"{node}\"}} {v}"
        );
    }
    let members = &c.members;
    let _ = writeln!(out, "# HELP vendgate_cluster_nodes Nodes heard from within node_dead_after.\n# TYPE vendgate_cluster_nodes gauge\nvendgate_cluster_nodes{{node=\"{node}\"}} {}", members.len());
    let _ = writeln!(out, "# HELP vendgate_cluster_member_machines Machines connected to each live node, as its heartbeat says.\n# TYPE vendgate_cluster_member_machines gauge");
    let mut members: Vec<_> = members.iter().collect();
    members.sort();
    for (member, machines) in members {
        let _ = writeln!(
            out,
            "vendgate_cluster_member_machines{{node=\"{node}\",member=\"{member}\"}} {machines}"
        );
    }
}

/// Seconds since `oldest` (0 when there is nothing pending).
pub fn oldest_age_seconds(oldest: Option<DateTime<Utc>>) -> f64 {
    oldest.map_or(0.0, |t| {
        (Utc::now() - t).num_milliseconds().max(0) as f64 / 1000.0
    })
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn series_are_registered_up_front() {
        let m = Metrics::new();
        let text = m.handle.render();
        for name in [
            "vendgate_mqtt_messages_total{pattern=\"vend/v1/+/ack\",direction=\"in\"} 0",
            "vendgate_mqtt_disconnects_total{class=\"machine\",reason=\"take_over\"} 0",
            "vendgate_orders_total{outcome=\"partially_dispensed\"} 0",
            "vendgate_order_requests_total{code=\"30002\"} 0",
            "vendgate_build_info{version=",
            "vendgate_order_request_duration_seconds_bucket{le=\"0.001\"} 0",
        ] {
            assert!(text.contains(name), "{name} missing from:\n{text}");
        }
        m.order_request(Some(30002), Duration::from_millis(3));
        m.order_request(None, Duration::from_millis(3));
        assert_eq!(m.order_requests(ErrorCode::MachineOffline), 1);
        assert_eq!(m.order_requests(ErrorCode::Internal), 1);
    }
}
