//! Operators: `/metrics` after a scripted run (checked with a strict
//! Prometheus text-format parser), series that do not grow with the fleet,
//! `/readyz`, the dashboard's credential and its JSON endpoints, the
//! dashboard in headless Chromium, and `vendgate top`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rumqttc::mqttbytes::v4::{ConnectReturnCode, Packet, Publish};
use rumqttc::mqttbytes::QoS;
use serde_json::Value;
use vendgate::edge::stats::{ClientKind, DisconnectReason};
use vendgate::secrets::{generate_secret, SecretHash};
use vendgate::storage::NewMachine;
use vendgate_e2e::{
    ready_sim, sim_config, wait_until, wait_until_async, Api, Client, RawClient, TestGateway,
    DEADLINE,
};
use vendgate_proto::machine::MachineNo;
use vendgate_sim::Behaviour;

const OPERATOR: &str = "ops";
const OPERATOR_PASSWORD: &str = "correct-horse-battery";

fn with_operator(s: &mut vendgate::Settings) {
    s.operator.username = OPERATOR.into();
    s.operator.password = OPERATOR_PASSWORD.into();
}

// ---------------------------------------------------------------------------
// A strict parser of the Prometheus text exposition format (0.0.4).

/// One series: metric name and its labels.
type SeriesKey = (String, BTreeMap<String, String>);

#[derive(Debug, Default)]
struct Exposition {
    types: HashMap<String, String>,
    samples: BTreeMap<SeriesKey, f64>,
}

impl Exposition {
    /// The value of `name{labels}` (exact label set); panics when absent.
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let key = (
            name.to_string(),
            labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        );
        match self.samples.get(&key) {
            Some(v) => *v,
            None => panic!("series {name}{labels:?} missing"),
        }
    }

    fn series(&self) -> BTreeSet<SeriesKey> {
        self.samples.keys().cloned().collect()
    }
}

fn valid_name(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn valid_label_name(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn parse_value(s: &str) -> Result<f64, String> {
    match s {
        "+Inf" => Ok(f64::INFINITY),
        "-Inf" => Ok(f64::NEG_INFINITY),
        "NaN" => Ok(f64::NAN),
        _ => s
            .parse::<f64>()
            .map_err(|e| format!("bad value {s:?}: {e}")),
    }
}

/// `{a="x",b="y\"z"}` → labels; returns the rest of the line.
fn parse_labels(s: &str) -> Result<(BTreeMap<String, String>, &str), String> {
    let mut labels = BTreeMap::new();
    let mut rest = s.strip_prefix('{').ok_or("expected {")?;
    loop {
        rest = rest.trim_start();
        if let Some(r) = rest.strip_prefix('}') {
            return Ok((labels, r));
        }
        let eq = rest.find('=').ok_or("expected =")?;
        let name = &rest[..eq];
        if !valid_label_name(name) {
            return Err(format!("bad label name {name:?}"));
        }
        rest = rest[eq + 1..]
            .strip_prefix('"')
            .ok_or("expected opening quote")?;
        let mut value = String::new();
        let mut chars = rest.char_indices();
        let end = loop {
            match chars.next() {
                Some((_, '\\')) => match chars.next() {
                    Some((_, '\\')) => value.push('\\'),
                    Some((_, '"')) => value.push('"'),
                    Some((_, 'n')) => value.push('\n'),
                    other => return Err(format!("bad escape {other:?}")),
                },
                Some((i, '"')) => break i,
                Some((_, c)) => value.push(c),
                None => return Err("unterminated label value".into()),
            }
        };
        if labels.insert(name.to_string(), value).is_some() {
            return Err(format!("duplicate label {name}"));
        }
        rest = &rest[end + 1..];
        rest = rest.strip_prefix(',').unwrap_or(rest);
    }
}

/// Parse and validate: names, labels, values, TYPE before samples, known
/// families only, no duplicate series, and histogram buckets that are
/// cumulative and end in `+Inf` equal to `_count`.
fn parse_exposition(text: &str) -> Exposition {
    let mut e = Exposition::default();
    let mut seen_families = BTreeSet::new();
    for (n, line) in text.lines().enumerate() {
        let line_no = n + 1;
        let fail = |why: String| -> ! { panic!("line {line_no}: {why}: {line:?}") };
        if line.trim().is_empty() {
            continue;
        }
        if let Some(c) = line.strip_prefix('#') {
            let mut parts = c.trim_start().splitn(3, ' ');
            match (parts.next(), parts.next(), parts.next()) {
                (Some("TYPE"), Some(name), Some(kind)) => {
                    if !valid_name(name) {
                        fail(format!("bad family name {name}"));
                    }
                    if !["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind) {
                        fail(format!("bad type {kind}"));
                    }
                    if e.types.insert(name.to_string(), kind.to_string()).is_some() {
                        fail(format!("second TYPE for {name}"));
                    }
                    if seen_families.contains(name) {
                        fail(format!("TYPE after samples of {name}"));
                    }
                }
                (Some("HELP"), Some(name), _) if !valid_name(name) => {
                    fail(format!("bad family name {name}"))
                }
                _ => {} // HELP lines and other comments are allowed
            }
            continue;
        }
        let name_end = line.find(['{', ' ']).unwrap_or(line.len());
        let name = &line[..name_end];
        if !valid_name(name) {
            fail(format!("bad metric name {name:?}"));
        }
        let (labels, rest) = if line[name_end..].starts_with('{') {
            parse_labels(&line[name_end..]).unwrap_or_else(|w| fail(w))
        } else {
            (BTreeMap::new(), &line[name_end..])
        };
        let mut fields = rest.split_whitespace();
        let value = parse_value(fields.next().unwrap_or_else(|| fail("no value".into())))
            .unwrap_or_else(|w| fail(w));
        if let Some(ts) = fields.next() {
            ts.parse::<i64>()
                .unwrap_or_else(|_| fail(format!("bad timestamp {ts}")));
        }
        if fields.next().is_some() {
            fail("trailing fields".into());
        }
        // Which family does the sample belong to?
        let family = if e.types.contains_key(name) {
            name.to_string()
        } else {
            ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suf| {
                    let base = name.strip_suffix(suf)?;
                    matches!(
                        e.types.get(base).map(String::as_str),
                        Some("histogram" | "summary")
                    )
                    .then(|| base.to_string())
                })
                .unwrap_or_else(|| fail(format!("sample of {name} before its TYPE")))
        };
        seen_families.insert(family);
        if name.ends_with("_bucket") && !labels.contains_key("le") {
            fail("bucket without le".into());
        }
        if e.samples
            .insert((name.to_string(), labels), value)
            .is_some()
        {
            fail("duplicate series".into());
        }
    }
    // Histogram buckets: cumulative, +Inf present and equal to _count.
    for (family, kind) in &e.types {
        if kind != "histogram" {
            continue;
        }
        let bucket = format!("{family}_bucket");
        let mut groups: BTreeMap<BTreeMap<String, String>, Vec<(f64, f64)>> = BTreeMap::new();
        for ((name, labels), v) in &e.samples {
            if *name == bucket {
                let mut rest = labels.clone();
                let le = rest.remove("le").unwrap_or_default();
                let le = parse_value(&le).unwrap_or_else(|w| panic!("{family}: {w}"));
                groups.entry(rest).or_default().push((le, *v));
            }
        }
        assert!(!groups.is_empty(), "histogram {family} has no buckets");
        for (labels, mut buckets) in groups {
            buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
            assert!(
                buckets.windows(2).all(|w| w[0].1 <= w[1].1),
                "{family}{labels:?}: buckets not cumulative: {buckets:?}"
            );
            let last = buckets.last().copied().unwrap_or((0.0, 0.0));
            assert!(last.0.is_infinite(), "{family}: no +Inf bucket");
            let count = e
                .samples
                .get(&(format!("{family}_count"), labels.clone()))
                .copied();
            assert_eq!(count, Some(last.1), "{family}{labels:?}: +Inf != _count");
        }
    }
    e
}

#[test]
fn the_parser_is_strict() {
    let good = "# HELP a_total A.\n# TYPE a_total counter\na_total{x=\"1\\\"2\"} 3\n\
                # TYPE h histogram\nh_bucket{le=\"1\"} 1\nh_bucket{le=\"+Inf\"} 2\nh_sum 3.5\nh_count 2\n";
    let e = parse_exposition(good);
    assert_eq!(e.get("a_total", &[("x", "1\"2")]), 3.0);
    for bad in [
        "a_total 1\n",                  // no TYPE
        "# TYPE a counter\na{x=1} 1\n", // unquoted
        "# TYPE a counter\na 1\na 2\n", // duplicate
        "# TYPE a counter\na one\n",    // value
        "# TYPE h histogram\nh_bucket{le=\"1\"} 2\nh_bucket{le=\"+Inf\"} 1\nh_count 1\n", // not cumulative
    ] {
        let r = std::panic::catch_unwind(|| parse_exposition(bad));
        assert!(r.is_err(), "accepted: {bad:?}");
    }
}

// ---------------------------------------------------------------------------
// Helpers.

async fn scrape(gw: &TestGateway) -> (String, Exposition) {
    let r = reqwest::get(format!("http://{}/metrics", gw.http_addr))
        .await
        .expect("GET /metrics");
    assert_eq!(r.status(), 200);
    let ct = r
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    assert!(ct.starts_with("text/plain; version=0.0.4"), "{ct}");
    let text = r.text().await.expect("body");
    let e = parse_exposition(&text);
    (text, e)
}

fn code(v: &Value) -> i64 {
    v["code"].as_i64().unwrap_or(-1)
}

fn order_id(v: &Value) -> u64 {
    assert_eq!(code(v), 0, "expected success: {v}");
    v["data"]["order_id"].as_u64().expect("order_id")
}

fn dash(gw: &TestGateway, path: &str) -> reqwest::RequestBuilder {
    reqwest::Client::new()
        .get(format!("http://{}{path}", gw.http_addr))
        .basic_auth(OPERATOR, Some(OPERATOR_PASSWORD))
}

async fn dash_json(gw: &TestGateway, path: &str) -> Value {
    let r = dash(gw, path).send().await.expect("request");
    assert_eq!(r.status(), 200, "{path}");
    r.json().await.expect("json")
}

fn m(s: &str) -> MachineNo {
    s.parse().expect("machine_no")
}

fn disconnects(gw: &TestGateway, kind: ClientKind, reason: DisconnectReason) -> u64 {
    gw.handle.hub.stats.connections.disconnects(kind, reason)
}

/// A webhook receiver on loopback that answers 500 to the very first
/// request and 200 to every later one; counts both.
#[derive(Clone, Default)]
struct FlakyReceiver {
    requests: Arc<AtomicUsize>,
    accepted: Arc<AtomicUsize>,
}

impl FlakyReceiver {
    async fn start(&self) -> SocketAddr {
        let me = self.clone();
        let app = axum::Router::new().route(
            "/hook",
            axum::routing::post(move || {
                let me = me.clone();
                async move {
                    if me.requests.fetch_add(1, Ordering::SeqCst) == 0 {
                        axum::http::StatusCode::INTERNAL_SERVER_ERROR
                    } else {
                        me.accepted.fetch_add(1, Ordering::SeqCst);
                        axum::http::StatusCode::OK
                    }
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind receiver");
        let addr = listener.local_addr().expect("receiver addr");
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        addr
    }
}

/// Provision `count` machines from `first` sharing one secret (hashing once).
async fn provision_many(gw: &TestGateway, appid: &str, first: u32, count: u32) -> String {
    let secret = generate_secret();
    let hash = SecretHash::new(&secret);
    let machines = (first..first + count)
        .map(|n| NewMachine {
            machine_no: MachineNo::from_u32(n).expect("machine_no"),
            merchant_appid: appid.into(),
            secret_hash: hash.clone(),
        })
        .collect();
    gw.handle
        .store
        .create_machines(machines)
        .await
        .expect("machines");
    secret
}

// ---------------------------------------------------------------------------
// Metrics.

/// Machines of the scripted run, one per behaviour.
const OK: &str = "30000001";
const REFUSES: &str = "30000002";
const FAILS: &str = "30000003";
const PARTIAL: &str = "30000004";
const NEVER_ACKS: &str = "30000005";
const SILENT: &str = "30000006";
const OFFLINE: &str = "30000007";
const TAKEN_OVER: &str = "30000008";
const TRESPASSER: &str = "30000009";
const IDLE: &str = "30000010";

#[tokio::test]
async fn metrics_after_a_scripted_run() {
    let gw = TestGateway::start_with(|s| {
        with_operator(s);
        s.orders.accept_timeout = Duration::from_millis(1000);
        s.orders.dispense_timeout = Duration::from_millis(2000);
        s.notifier.allow_private_targets = true;
        s.notifier.backoff_base = Duration::from_millis(50);
        s.notifier.backoff_cap = Duration::from_millis(200);
        s.notifier.poll_interval = Duration::from_millis(50);
    })
    .await;
    let receiver = FlakyReceiver::default();
    let hook = receiver.start().await;
    let (appid, appsecret) = gw
        .merchant_with_url("shop", &format!("http://{hook}/hook"))
        .await;
    let api = Api::new(&gw, &appid, &appsecret);
    let mut secrets = HashMap::new();
    for mno in [
        OK, REFUSES, FAILS, PARTIAL, NEVER_ACKS, SILENT, OFFLINE, TAKEN_OVER, TRESPASSER, IDLE,
    ] {
        secrets.insert(mno, gw.machine(&appid, mno).await);
    }
    let behaviours = [
        (OK, Behaviour::Normal),
        (
            REFUSES,
            Behaviour::Refuse {
                reason: "door_open".into(),
            },
        ),
        (
            FAILS,
            Behaviour::Fail {
                error: "motor_jam".into(),
            },
        ),
        (
            PARTIAL,
            Behaviour::Partial {
                error: "out_of_stock".into(),
            },
        ),
        (NEVER_ACKS, Behaviour::NeverAck),
        (SILENT, Behaviour::AckThenSilent),
    ];
    let mut sims = HashMap::new();
    for (mno, b) in behaviours {
        let mut c = sim_config(&gw, mno, &secrets[mno]);
        c.behaviour = b;
        sims.insert(mno, ready_sim(&gw, c).await);
    }

    // Orders with every outcome, and API answers with several codes.
    let completed = order_id(&api.order(OK, &[(1, 1)]).await);
    assert_eq!(code(&api.order(REFUSES, &[(1, 1)]).await), 30005);
    let failed = order_id(&api.order(FAILS, &[(1, 1)]).await);
    let partial = order_id(&api.order(PARTIAL, &[(1, 2)]).await);
    assert_eq!(code(&api.order(NEVER_ACKS, &[(1, 1)]).await), 30002);
    let unknown = order_id(&api.order(SILENT, &[(1, 1)]).await);
    assert_eq!(code(&api.order(OFFLINE, &[(1, 1)]).await), 30002);
    assert_eq!(code(&api.order("39999999", &[(1, 1)]).await), 30001);
    api.wait_status(completed, "completed").await;
    api.wait_status(failed, "failed").await;
    api.wait_status(partial, "partially_dispensed").await;
    api.wait_status(unknown, "unknown").await;

    // Connection endings of every kind.
    let (mut first, _) = RawClient::connect(
        gw.mqtt_addr,
        TAKEN_OVER,
        Some((TAKEN_OVER, &secrets[TAKEN_OVER])),
        30,
    )
    .await;
    let (_second, c) = RawClient::connect(
        gw.mqtt_addr,
        TAKEN_OVER,
        Some((TAKEN_OVER, &secrets[TAKEN_OVER])),
        30,
    )
    .await;
    assert_eq!(c, Some(ConnectReturnCode::Success));
    assert!(first.closed().await, "taken-over connection closed");
    let (mut trespasser, _) = RawClient::connect(
        gw.mqtt_addr,
        TRESPASSER,
        Some((TRESPASSER, &secrets[TRESPASSER])),
        30,
    )
    .await;
    let foreign = format!("vend/v1/{OK}/state");
    trespasser
        .send(Packet::Publish(Publish::new(
            foreign,
            QoS::AtMostOnce,
            b"{}".to_vec(),
        )))
        .await;
    assert!(trespasser.closed().await, "ACL violation closes");
    let (_, c) = RawClient::connect(gw.mqtt_addr, IDLE, Some((IDLE, "wrong-secret")), 30).await;
    assert_eq!(c, Some(ConnectReturnCode::NotAuthorized));
    let (mut idle, _) =
        RawClient::connect(gw.mqtt_addr, IDLE, Some((IDLE, &secrets[IDLE])), 1).await;
    assert!(idle.closed().await, "keep alive expires");
    sims[OK].disconnect().await;
    wait_until("clean disconnect counted", || {
        disconnects(&gw, ClientKind::Machine, DisconnectReason::Clean) == 1
    })
    .await;

    // A service client publishing on its own topic (the `other` pattern).
    let (user, pass) = gw.service("ops").await;
    let svc = Client::connect(gw.mqtt_addr, "ops-tool", &user, &pass).await;
    svc.client
        .publish(
            "plant/1/temperature",
            rumqttc::QoS::AtLeastOnce,
            false,
            "21.5",
        )
        .await
        .expect("publish queued");
    wait_until("service publish counted", || {
        gw.handle
            .hub
            .stats
            .topics
            .get(
                vendgate::edge::stats::Direction::In,
                vendgate::edge::stats::PATTERNS.len() - 1,
            )
            .0
            >= 1
    })
    .await;

    // Every webhook (orders and presence) delivered, one after a retry.
    wait_until_async("outbox drained", || async {
        gw.handle
            .notifier
            .backlog()
            .await
            .is_ok_and(|b| b.pending == 0)
    })
    .await;

    let (text, e) = scrape(&gw).await;
    let no_machine_labels = e
        .series()
        .iter()
        .flat_map(|(_, l)| l.values().cloned().collect::<Vec<_>>())
        .all(|v| !v.contains("3000000") && !v.contains("3999999"));
    assert!(
        no_machine_labels,
        "a machine number leaked into labels:\n{text}"
    );

    // Orders: API answers by code, latency histogram.
    let req = |c: &str| e.get("vendgate_order_requests_total", &[("code", c)]);
    assert_eq!(req("0"), 4.0);
    assert_eq!(req("30005"), 1.0);
    assert_eq!(req("30002"), 2.0);
    assert_eq!(req("30001"), 1.0);
    assert_eq!(
        e.get("vendgate_order_request_duration_seconds_count", &[]),
        8.0
    );
    // Outcomes as the order service committed them.
    let outcome = |o: &str| e.get("vendgate_orders_total", &[("outcome", o)]);
    assert_eq!(outcome("completed"), 1.0);
    assert_eq!(outcome("failed"), 1.0);
    assert_eq!(outcome("partially_dispensed"), 1.0);
    assert_eq!(outcome("unknown"), 1.0);
    assert_eq!(outcome("rejected"), 2.0, "refused + not accepted");
    assert_eq!(outcome("expired"), 0.0);
    let ev = |x: &str| e.get("vendgate_order_service_events_total", &[("event", x)]);
    assert_eq!(ev("refused"), 1.0);
    assert_eq!(ev("not_accepted"), 1.0);
    assert_eq!(ev("unknown"), 1.0);
    // Machine timings on the wire: five acks (not the never-acking machine),
    // three results (not the silent one).
    assert_eq!(
        e.get("vendgate_machine_accept_latency_seconds_count", &[]),
        5.0
    );
    assert_eq!(
        e.get("vendgate_machine_dispense_duration_seconds_count", &[]),
        3.0
    );

    // Topics by pattern and direction.
    let msgs = |p: &str, d: &str| {
        e.get(
            "vendgate_mqtt_messages_total",
            &[("pattern", p), ("direction", d)],
        )
    };
    assert_eq!(msgs("vend/v1/+/cmd/dispense", "out"), 6.0);
    assert_eq!(msgs("vend/v1/+/ack", "in"), 5.0);
    assert_eq!(msgs("vend/v1/+/result", "in"), 3.0);
    assert!(
        msgs("vend/v1/+/cmd/cancel", "out") >= 1.0,
        "cancel after accept timeout"
    );
    assert!(msgs("vend/v1/+/state", "in") >= 6.0);
    assert!(msgs("vend/v1/+/inventory", "in") >= 6.0);
    assert_eq!(msgs("other", "in"), 1.0);
    assert!(
        e.get(
            "vendgate_mqtt_bytes_total",
            &[("pattern", "vend/v1/+/cmd/dispense"), ("direction", "out")]
        ) > 6.0 * 40.0
    );
    assert_eq!(e.get("vendgate_mqtt_acl_violations_total", &[]), 1.0);

    // Presence and connections.
    let dis = |r: &str| {
        e.get(
            "vendgate_mqtt_disconnects_total",
            &[("class", "machine"), ("reason", r)],
        )
    };
    assert_eq!(dis("clean"), 1.0);
    assert_eq!(dis("take_over"), 1.0);
    assert_eq!(dis("acl_violation"), 1.0);
    assert_eq!(dis("keep_alive_timeout"), 1.0);
    assert_eq!(dis("auth_failure"), 1.0);
    assert_eq!(
        e.get(
            "vendgate_mqtt_connect_refused_total",
            &[("reason", "wrong_secret")]
        ),
        1.0
    );
    // Six simulators, two take-over connections, the trespasser, the idler.
    assert_eq!(
        e.get("vendgate_mqtt_connects_total", &[("class", "machine")]),
        10.0
    );
    assert_eq!(
        e.get("vendgate_mqtt_connects_total", &[("class", "service")]),
        1.0
    );
    // Five simulators left plus the take-over winner.
    assert_eq!(e.get("vendgate_machines_online", &[]), 6.0);
    assert_eq!(e.get("vendgate_machines_provisioned", &[]), 10.0);
    assert_eq!(e.get("vendgate_machines_flapping", &[]), 0.0);
    assert_eq!(e.get("vendgate_order_queue_depth", &[]), 0.0);

    // Webhooks: the receiver's first answer failed, the retry and the rest
    // went through; nothing left behind.
    let hooks = |r: &str| e.get("vendgate_webhook_deliveries_total", &[("result", r)]);
    assert_eq!(hooks("failed"), 1.0);
    assert_eq!(hooks("gave_up"), 0.0);
    assert_eq!(
        hooks("delivered"),
        receiver.accepted.load(Ordering::SeqCst) as f64
    );
    assert!(hooks("delivered") >= 4.0, "four order outcomes at least");
    assert_eq!(e.get("vendgate_webhook_outbox_backlog", &[]), 0.0);
    assert_eq!(
        e.get("vendgate_webhook_outbox_oldest_age_seconds", &[]),
        0.0
    );
    // Process basics.
    assert!(e.get("process_resident_memory_bytes", &[]) > 1e6);
    assert!(e.get("process_open_fds", &[]) > 0.0);
    assert!(e.get("process_cpu_seconds_total", &[]) > 0.0);
    assert!(e.get("vendgate_uptime_seconds", &[]) > 0.0);
    assert_eq!(
        e.get(
            "vendgate_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ),
        1.0
    );

    // The dashboard's summary agrees, and lists the failures with links.
    let s = dash_json(&gw, "/dashboard/api/summary").await;
    assert_eq!(s["machines"]["online"], 6);
    assert_eq!(s["machines"]["offline"], 4);
    let recent: Vec<u64> = s["recent_failed"]
        .as_array()
        .expect("recent_failed")
        .iter()
        .filter_map(|o| o["order_id"].as_u64())
        .collect();
    for id in [failed, partial, unknown] {
        assert!(recent.contains(&id), "{id} not in {recent:?}");
    }
    let timeline = dash_json(&gw, &format!("/dashboard/api/orders/{failed}")).await;
    assert_eq!(timeline["status"], "failed");
    assert_eq!(timeline["machine_no"], FAILS);
    let kinds: Vec<&str> = timeline["events"]
        .as_array()
        .expect("events")
        .iter()
        .filter_map(|e| e["type"].as_str())
        .collect();
    // A result can overtake the ack's bookkeeping (then "sent" follows).
    assert_eq!(kinds.first(), Some(&"created"));
    assert!(
        kinds.contains(&"accepted") && kinds.contains(&"result"),
        "{kinds:?}"
    );
    gw.stop().await;
}

#[tokio::test]
async fn series_do_not_grow_with_the_fleet() {
    const FLEET: u32 = 1000;
    const FIRST: u32 = 41_000_000;
    let gw = TestGateway::start_with(with_operator).await;
    let (appid, _) = gw.merchant("fleet").await;
    let secret = provision_many(&gw, &appid, FIRST, FLEET).await;

    async fn connect_range(
        gw: &TestGateway,
        secret: &str,
        range: std::ops::Range<u32>,
    ) -> Vec<RawClient> {
        let mut set = tokio::task::JoinSet::new();
        for n in range {
            let addr = gw.mqtt_addr;
            let secret = secret.to_string();
            set.spawn(async move {
                let mno = MachineNo::from_u32(n).expect("machine_no").to_string();
                let (mut c, code) = RawClient::connect(addr, &mno, Some((&mno, &secret)), 60).await;
                assert_eq!(code, Some(ConnectReturnCode::Success), "{mno}");
                // Some traffic on a protocol topic from every machine.
                c.send(Packet::Publish(Publish::new(
                    format!("vend/v1/{mno}/state"),
                    QoS::AtMostOnce,
                    br#"{"online":true,"firmware":"fleet/1"}"#.to_vec(),
                )))
                .await;
                c
            });
        }
        let mut clients = Vec::new();
        while let Some(c) = set.join_next().await {
            clients.push(c.expect("connect task"));
        }
        clients
    }

    let mut clients = connect_range(&gw, &secret, FIRST..FIRST + 10).await;
    wait_until("10 online", || gw.handle.presence.online_count() == 10).await;
    let (_, small) = scrape(&gw).await;
    assert_eq!(small.get("vendgate_machines_online", &[]), 10.0);

    // The rest in batches, so the test does not open 1,000 sockets at once.
    for start in (FIRST + 10..FIRST + FLEET).step_by(100) {
        let end = (start + 100).min(FIRST + FLEET);
        clients.extend(connect_range(&gw, &secret, start..end).await);
    }
    wait_until("1000 online", || {
        gw.handle.presence.online_count() == FLEET as usize
    })
    .await;
    wait_until("every state counted", || {
        gw.handle
            .hub
            .stats
            .topics
            .get(vendgate::edge::stats::Direction::In, 0)
            .0
            >= u64::from(FLEET)
    })
    .await;
    let (text, large) = scrape(&gw).await;
    assert_eq!(large.get("vendgate_machines_online", &[]), f64::from(FLEET));
    assert_eq!(
        large.get(
            "vendgate_mqtt_messages_total",
            &[("pattern", "vend/v1/+/state"), ("direction", "in")]
        ),
        f64::from(FLEET)
    );
    assert_eq!(
        small.series(),
        large.series(),
        "the series set changed with the fleet size"
    );
    let leaked: Vec<_> = large
        .series()
        .into_iter()
        .filter(|(_, l)| l.values().any(|v| v.contains("4100")))
        .collect();
    assert!(
        leaked.is_empty(),
        "machine numbers in labels: {leaked:?}\n{text}"
    );

    // The dashboard's machine list pages on the server and stays fast.
    let started = tokio::time::Instant::now();
    let page = dash_json(&gw, "/dashboard/api/machines?page=3&page_size=50").await;
    let elapsed = started.elapsed();
    assert_eq!(page["total"], FLEET);
    let rows = page["machines"].as_array().expect("machines");
    assert_eq!(rows.len(), 50);
    assert_eq!(rows[0]["machine_no"], (FIRST + 100).to_string());
    assert_eq!(rows[0]["online"], true);
    assert_eq!(rows[0]["firmware"], "fleet/1");
    assert!(
        elapsed < Duration::from_secs(2),
        "a page of 1,000 machines took {elapsed:?}"
    );
    let found = dash_json(&gw, &format!("/dashboard/api/machines?q={}", FIRST + 777)).await;
    assert_eq!(found["total"], 1);
    assert_eq!(
        found["machines"][0]["machine_no"],
        (FIRST + 777).to_string()
    );
    let summary = dash_json(&gw, "/dashboard/api/summary").await;
    assert_eq!(summary["machines"]["online"], FLEET);
    assert_eq!(summary["machines"]["offline"], 0);

    // Drop half; the list filters by presence.
    clients.truncate(FLEET as usize / 2);
    wait_until("half offline", || {
        gw.handle.presence.online_count() == FLEET as usize / 2
    })
    .await;
    let offline = dash_json(&gw, "/dashboard/api/machines?filter=offline&page_size=10").await;
    assert_eq!(offline["total"], FLEET / 2);
    assert_eq!(offline["machines"][0]["online"], false);
    assert_eq!(
        offline["machines"][0]["last_offline_reason"],
        "socket_closed"
    );
    drop(clients);
    gw.stop().await;
}

// ---------------------------------------------------------------------------
// Health.

#[tokio::test]
async fn readyz_checks_storage_edge_and_notifier() {
    let gw = TestGateway::start().await;
    let base = format!("http://{}", gw.http_addr);
    let r = reqwest::get(format!("{base}/healthz"))
        .await
        .expect("healthz");
    assert_eq!(r.status(), 200);
    wait_until_async("ready", || {
        let url = format!("{base}/readyz");
        async move { reqwest::get(url).await.is_ok_and(|r| r.status() == 200) }
    })
    .await;
    let v: Value = reqwest::get(format!("{base}/readyz"))
        .await
        .expect("readyz")
        .json()
        .await
        .expect("json");
    assert_eq!(v["status"], "ready");
    assert_eq!(v["checks"]["storage"], "ok");
    assert_eq!(v["checks"]["mqtt"], "ok");
    assert_eq!(v["checks"]["notifier"], "running");

    // A notifier whose task ended makes the gateway unready.
    gw.handle.metrics.webhooks.set_running(false);
    let r = reqwest::get(format!("{base}/readyz"))
        .await
        .expect("readyz");
    assert_eq!(r.status(), 503);
    let v: Value = r.json().await.expect("json");
    assert_eq!(v["checks"]["notifier"], "stopped");
    gw.handle.metrics.webhooks.set_running(true);

    // Storage that cannot take a write.
    gw.handle.store.close().await;
    let r = reqwest::get(format!("{base}/readyz"))
        .await
        .expect("readyz");
    assert_eq!(r.status(), 503);
    let v: Value = r.json().await.expect("json");
    assert_eq!(v["status"], "not_ready");
    assert_ne!(v["checks"]["storage"], "ok");
    // Liveness is not readiness.
    let r = reqwest::get(format!("{base}/healthz"))
        .await
        .expect("healthz");
    assert_eq!(r.status(), 200);
    gw.handle.shutdown.cancel();
}

#[tokio::test]
async fn metrics_can_move_to_their_own_listener() {
    vendgate_e2e::init_logs();
    let dir = tempfile::tempdir().expect("temp dir");
    let mut settings = vendgate::Settings::for_tests(dir.path());
    settings.metrics.addr = Some("127.0.0.1:0".parse().expect("addr"));
    let gw = vendgate::Gateway::build(settings).await.expect("builds");
    let admin = gw.metrics_addr().expect("metrics listener bound");
    let http = gw.http_addr();
    let h = gw.handle();
    let task = tokio::spawn(gw.run());
    let text = reqwest::get(format!("http://{admin}/metrics"))
        .await
        .expect("admin /metrics")
        .text()
        .await
        .expect("body");
    parse_exposition(&text).get("vendgate_machines_online", &[]);
    let r = reqwest::get(format!("http://{admin}/readyz"))
        .await
        .expect("admin /readyz");
    assert_eq!(r.status(), 200);
    // Not on the public listener any more.
    let body = reqwest::get(format!("http://{http}/metrics"))
        .await
        .expect("http /metrics")
        .text()
        .await
        .expect("body");
    assert!(!body.contains("vendgate_"), "{body}");
    h.shutdown.cancel();
    let r = tokio::time::timeout(DEADLINE, task).await;
    assert!(matches!(r, Ok(Ok(Ok(())))), "{r:?}");
}

// ---------------------------------------------------------------------------
// Dashboard.

#[tokio::test]
async fn dashboard_needs_the_operator_credential() {
    let gw = TestGateway::start_with(with_operator).await;
    let url = |p: &str| format!("http://{}{p}", gw.http_addr);
    let http = reqwest::Client::new();
    for path in [
        "/dashboard",
        "/dashboard/app.js",
        "/dashboard/api/summary",
        "/dashboard/api/machines",
        "/dashboard/api/machines/00000001",
        "/dashboard/api/orders/1",
    ] {
        let r = http.get(url(path)).send().await.expect("request");
        assert_eq!(r.status(), 401, "{path}");
        assert!(r
            .headers()
            .get("www-authenticate")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("Basic ")));
        let r = http
            .get(url(path))
            .basic_auth(OPERATOR, Some("wrong-password-here"))
            .send()
            .await
            .expect("request");
        assert_eq!(r.status(), 401, "{path} with a wrong password");
    }
    let r = dash(&gw, "/dashboard").send().await.expect("request");
    assert_eq!(r.status(), 200);
    assert!(r
        .headers()
        .get("content-security-policy")
        .is_some_and(|v| v.to_str().unwrap_or("").contains("default-src 'self'")));
    let cookie = r
        .headers()
        .get("set-cookie")
        .and_then(|v| v.to_str().ok())
        .expect("session cookie")
        .to_string();
    assert!(cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"));
    let html = r.text().await.expect("html");
    assert!(html.contains("id=\"online-count\""));
    // The cookie alone authenticates the page's own requests.
    let pair = cookie.split(';').next().expect("cookie pair").to_string();
    let r = http
        .get(url("/dashboard/api/summary"))
        .header("cookie", &pair)
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), 200);
    let r = http
        .get(url("/dashboard/api/summary"))
        .header("cookie", "vendgate_dashboard=forged")
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), 401);
    let r = dash(&gw, "/dashboard/api/orders/12345")
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), 404);
    // The open API is untouched by the operator credential.
    let r = http
        .get(url("/api/openapi/v1/machines"))
        .basic_auth(OPERATOR, Some(OPERATOR_PASSWORD))
        .send()
        .await
        .expect("request");
    let v: Value = r.json().await.expect("envelope");
    assert_eq!(v["code"], 10001);
    gw.stop().await;
}

/// A machine's page answers: the pending order, the newest orders (at most
/// 20 of however many), and a Ping with its round trip; all operator-only.
#[tokio::test]
async fn dashboard_machine_page_api() {
    use vendgate::domain::order::{Line, Status};
    use vendgate::storage::{NewOrder, OrderEvent};

    let gw = TestGateway::start_with(with_operator).await;
    let (appid, appsecret) = gw.merchant("shop").await;
    let api = Api::new(&gw, &appid, &appsecret);
    let (busy, idle) = ("70000001", "70000002");
    let secret = gw.machine(&appid, busy).await;
    gw.machine(&appid, idle).await;
    let mut c = sim_config(&gw, busy, &secret);
    c.behaviour = Behaviour::AckThenSilent;
    let _sim = ready_sim(&gw, c).await;

    let http = reqwest::Client::new();
    let url = |p: &str| format!("http://{}{p}", gw.http_addr);
    let page = format!("/dashboard/api/machines/{busy}");
    let ping = format!("{page}/ping");
    let r = http.get(url(&page)).send().await.expect("request");
    assert_eq!(r.status(), 401);
    let r = http.post(url(&ping)).send().await.expect("request");
    assert_eq!(r.status(), 401);
    for missing in ["99999999", "not-a-machine"] {
        let r = dash(&gw, &format!("/dashboard/api/machines/{missing}"))
            .send()
            .await
            .expect("request");
        assert_eq!(r.status(), 404, "{missing}");
    }

    // 24 finished orders from the last hour, then a real one left pending.
    let now = chrono::Utc::now();
    for i in 1..=24u64 {
        let at = now - chrono::Duration::minutes(60 - i as i64);
        let o = NewOrder {
            order_id: i,
            merchant_appid: appid.clone(),
            machine_no: m(busy),
            out_trade_no: None,
            request_fingerprint: None,
            pay_later: false,
            status: Status::Completed,
            lines: vec![Line {
                product_id: 1,
                quantity: 2,
                dispensed: 2,
                unit_price: 100,
            }],
            amount: 200,
            created_at: at,
            pay_deadline: None,
            accept_by: None,
        };
        let ev = OrderEvent {
            at,
            kind: "created".into(),
            detail: serde_json::json!({}),
        };
        gw.handle
            .store
            .insert_order(&o, &ev)
            .await
            .expect("insert order");
    }
    let pending = order_id(&api.order(busy, &[(1, 1)]).await);
    api.wait_status(pending, "dispensing").await;

    let v = dash_json(&gw, &page).await;
    assert_eq!(v["machine_no"], busy);
    assert_eq!(v["merchant"], appid.as_str());
    assert_eq!(v["online"], true);
    let open = v["pending"].as_array().expect("pending");
    assert_eq!(open.len(), 1, "{v}");
    assert_eq!(open[0]["order_id"], pending);
    assert_eq!(open[0]["status"], "dispensing");
    assert!(open[0]["since"].is_string());
    assert_eq!(open[0]["items"][0]["quantity"], 1);
    let recent = v["recent"].as_array().expect("recent");
    assert_eq!(recent.len(), 20, "bounded");
    assert_eq!(v["orders_total"], 25);
    assert_eq!(recent[0]["order_id"], pending, "newest first");
    assert_eq!(recent[1]["order_id"], 24);
    assert_eq!(recent[19]["order_id"], 6);
    assert_eq!(recent[1]["status"], "completed");
    assert_eq!(
        (
            recent[1]["dispensed"].as_u64(),
            recent[1]["ordered"].as_u64()
        ),
        (Some(2), Some(2))
    );

    // Ping: a round trip that becomes the machine's last_rtt_ms.
    let r = http
        .post(url(&ping))
        .basic_auth(OPERATOR, Some(OPERATOR_PASSWORD))
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), 200);
    let p: Value = r.json().await.expect("json");
    assert_eq!(p["result"], "ok", "{p}");
    let rtt = p["rtt_ms"].as_u64().expect("rtt_ms");
    assert_eq!(dash_json(&gw, &page).await["last_rtt_ms"], rtt);
    let r = http
        .post(url(&format!("/dashboard/api/machines/{idle}/ping")))
        .basic_auth(OPERATOR, Some(OPERATOR_PASSWORD))
        .send()
        .await
        .expect("request");
    let p: Value = r.json().await.expect("json");
    assert_eq!(p["result"], "offline", "{p}");
    assert!(p["rtt_ms"].is_null());
    // Another site's page cannot make the operator's browser ping.
    let r = http
        .post(url(&ping))
        .basic_auth(OPERATOR, Some(OPERATOR_PASSWORD))
        .header("origin", "https://elsewhere.example")
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), 403);
    let r = dash(&gw, &ping).send().await.expect("request");
    assert_eq!(r.status(), 405, "ping is a POST");
    gw.stop().await;
}

#[tokio::test]
async fn dashboard_is_refused_without_a_configured_credential() {
    for (user, pass) in [("", ""), ("ops", "short")] {
        let gw = TestGateway::start_with(|s| {
            s.operator.username = user.into();
            s.operator.password = pass.into();
        })
        .await;
        let r = reqwest::Client::new()
            .get(format!("http://{}/dashboard", gw.http_addr))
            .basic_auth(user, Some(pass))
            .send()
            .await
            .expect("request");
        assert_eq!(r.status(), 503);
        let body = r.text().await.expect("body");
        assert!(body.contains("dashboard disabled"), "{body}");
        assert!(body.contains("[operator]"), "{body}");
        gw.stop().await;
    }
}

// ---------------------------------------------------------------------------
// The dashboard in a real browser: headless Chromium driven over WebDriver
// (chromedriver), so the page is loaded once and its own polling must show
// changes.

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// A chromedriver process on a loopback port; killed when dropped.
struct Driver {
    _child: tokio::process::Child,
    base: String,
    http: reqwest::Client,
}

impl Driver {
    async fn start() -> Self {
        // A free port: bind, read it, release it for chromedriver.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let child = tokio::process::Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("chromedriver starts");
        let d = Self {
            _child: child,
            base: format!("http://127.0.0.1:{port}"),
            http: reqwest::Client::new(),
        };
        wait_until_async("chromedriver ready", || {
            let r = d.http.get(format!("{}/status", d.base)).send();
            async move {
                match r.await {
                    Ok(r) => r
                        .json::<Value>()
                        .await
                        .is_ok_and(|v| v["value"]["ready"] == true),
                    Err(_) => false,
                }
            }
        })
        .await;
        d
    }

    /// One WebDriver command; the `value` of the answer, or the error.
    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, String> {
        let mut req = self.http.request(method, format!("{}{path}", self.base));
        if let Some(b) = body {
            req = req.json(&b);
        }
        let r = req.send().await.map_err(|e| e.to_string())?;
        let ok = r.status().is_success();
        let v: Value = r.json().await.map_err(|e| e.to_string())?;
        if ok {
            Ok(v["value"].clone())
        } else {
            Err(v["value"]["message"]
                .as_str()
                .unwrap_or("webdriver error")
                .to_string())
        }
    }
}

/// A browser session; [`Browser::quit`] ends it and its process.
struct Browser<'a> {
    d: &'a Driver,
    id: String,
    pid: Option<u32>,
    _profile: tempfile::TempDir,
}

impl<'a> Browser<'a> {
    async fn open(d: &'a Driver) -> Self {
        let profile = tempfile::tempdir().expect("profile");
        let caps = serde_json::json!({ "capabilities": { "alwaysMatch": { "goog:chromeOptions": {
            "binary": CHROMIUM,
            "args": [
                "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--no-first-run", "--hide-scrollbars",
                "--window-size=1280,900",
                format!("--user-data-dir={}", profile.path().display()),
            ],
        }}}});
        let v = d
            .call(reqwest::Method::POST, "/session", Some(caps))
            .await
            .expect("browser session");
        Self {
            d,
            id: v["sessionId"].as_str().expect("sessionId").to_string(),
            pid: v["capabilities"]["goog:processID"]
                .as_u64()
                .and_then(|p| u32::try_from(p).ok()),
            _profile: profile,
        }
    }

    async fn session(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, String> {
        self.d
            .call(method, &format!("/session/{}{path}", self.id), body)
            .await
    }

    async fn goto(&self, url: &str) {
        self.session(
            reqwest::Method::POST,
            "/url",
            Some(serde_json::json!({ "url": url })),
        )
        .await
        .expect("navigate");
    }

    /// The element matching `css`, if there is one now.
    async fn find(&self, css: &str) -> Option<String> {
        let v = self
            .session(
                reqwest::Method::POST,
                "/element",
                Some(serde_json::json!({ "using": "css selector", "value": css })),
            )
            .await
            .ok()?;
        v.as_object()?.values().next()?.as_str().map(String::from)
    }

    async fn text(&self, css: &str) -> Option<String> {
        let e = self.find(css).await?;
        let v = self
            .session(reqwest::Method::GET, &format!("/element/{e}/text"), None)
            .await
            .ok()?;
        v.as_str().map(String::from)
    }

    /// Wait until the text of `css` is `want` (the page polls every 2 s).
    async fn wait_text(&self, css: &str, want: &str) {
        self.wait_text_that(css, want, |t| t == want).await;
    }

    /// Wait until the text of `css` passes `ok` (`what` describes it); the
    /// text it then has.
    async fn wait_text_that(&self, css: &str, what: &str, ok: impl Fn(&str) -> bool) -> String {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            let got = self.text(css).await;
            if let Some(t) = got.as_deref().filter(|t| ok(t)) {
                return t.to_string();
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{css}: wanted {what:?}, page shows {got:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn click(&self, css: &str) {
        let e = self.find(css).await.expect("element to click");
        self.session(
            reqwest::Method::POST,
            &format!("/element/{e}/click"),
            Some(serde_json::json!({})),
        )
        .await
        .expect("click");
    }

    async fn screenshot(&self) -> Vec<u8> {
        use base64::Engine as _;
        let v = self
            .session(reqwest::Method::GET, "/screenshot", None)
            .await
            .expect("screenshot");
        base64::engine::general_purpose::STANDARD
            .decode(v.as_str().expect("base64 PNG"))
            .expect("PNG bytes")
    }

    /// End the session and wait (bounded) for the browser to exit; `Drop`
    /// kills it if it has not.
    async fn quit(self) {
        let _ = self.session(reqwest::Method::DELETE, "", None).await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while self.alive() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The browser process still runs: its pid exists and is still the
    /// browser of this session's (unique) profile, not a reused pid.
    fn alive(&self) -> bool {
        let Some(pid) = self.pid else { return false };
        let profile = self._profile.path().to_string_lossy().into_owned();
        std::fs::read(format!("/proc/{pid}/cmdline"))
            .is_ok_and(|c| String::from_utf8_lossy(&c).contains(&profile))
    }
}

impl Drop for Browser<'_> {
    /// A failed assertion must not leave a browser behind: killing the
    /// browser process takes its renderers and helpers down with it.
    fn drop(&mut self) {
        if let (true, Some(pid)) = (self.alive(), self.pid) {
            let _ = std::process::Command::new("kill")
                .args(["-9", &pid.to_string()])
                .status();
        }
    }
}

/// Chromium or its driver is not installed: say so, and the test skips.
fn browser_missing(test: &str) -> bool {
    for tool in [CHROMIUM, CHROMEDRIVER] {
        if !Path::new(tool).exists() {
            println!(
                "SKIPPED {test}: {tool} is missing \
                 (`cargo xtask test` installs it where it can: apt-get install -y \
                 chromium chromium-driver)"
            );
            return true;
        }
    }
    false
}

/// Where a browser test's screenshot goes: where `env` says, else into
/// `dir`, so a test run never rewrites tracked files.
fn screenshot_path(env: &str, dir: &tempfile::TempDir, name: &str) -> PathBuf {
    std::env::var_os(env)
        .map(PathBuf::from)
        .unwrap_or_else(|| dir.path().join(name))
}

#[tokio::test]
async fn dashboard_in_headless_chromium() {
    if browser_missing("dashboard_in_headless_chromium") {
        return;
    }
    let gw = TestGateway::start_with(|s| {
        with_operator(s);
        s.orders.accept_timeout = Duration::from_millis(1000);
    })
    .await;
    let (appid, appsecret) = gw.merchant("shop").await;
    let api = Api::new(&gw, &appid, &appsecret);
    let machines = ["50000001", "50000002", "50000003"];
    let mut sims = Vec::new();
    for (i, mno) in machines.iter().enumerate() {
        let secret = gw.machine(&appid, mno).await;
        let mut c = sim_config(&gw, mno, &secret);
        if i == 2 {
            c.behaviour = Behaviour::Fail {
                error: "motor_jam".into(),
            };
        }
        sims.push(ready_sim(&gw, c).await);
    }
    for _ in 0..3 {
        let id = order_id(&api.order(machines[0], &[(1, 1)]).await);
        api.wait_status(id, "completed").await;
    }

    let driver = Driver::start().await;
    let browser = Browser::open(&driver).await;
    // Credentials in the URL answer the Basic challenge; the page then runs
    // on the session cookie.
    let url = format!(
        "http://{OPERATOR}:{OPERATOR_PASSWORD}@{}/dashboard",
        gw.http_addr
    );
    browser.goto(&url).await;
    browser.wait_text("#online-count", "3").await;
    browser.wait_text("#offline-count", "0").await;
    browser.wait_text("#machines-total", "3").await;
    assert_eq!(
        browser
            .text("#topics tr[data-pattern='vend/v1/+/cmd/dispense'] td")
            .await
            .as_deref(),
        Some("vend/v1/+/cmd/dispense")
    );

    // Live updates without reloading: a machine goes away, an order fails.
    sims[1].disconnect().await;
    wait_until("offline", || !gw.online(machines[1])).await;
    browser.wait_text("#online-count", "2").await;
    browser.wait_text("#offline-count", "1").await;
    let failed = order_id(&api.order(machines[2], &[(1, 1)]).await);
    api.wait_status(failed, "failed").await;
    let link = format!("#recent-failed a[href='#order/{failed}']");
    browser.wait_text(&link, &failed.to_string()).await;

    // Its timeline link opens the order's events.
    browser.click(&link).await;
    browser.wait_text("#timeline-id", &failed.to_string()).await;
    browser
        .wait_text("#timeline-events tr:nth-child(3) td:nth-child(2)", "result")
        .await;
    let summary = browser.text("#timeline-summary").await.unwrap_or_default();
    assert!(summary.contains("motor_jam"), "{summary}");
    browser.click("#timeline-close").await;

    // The screenshot: into a temp dir, or where VENDGATE_SCREENSHOT says
    // (`VENDGATE_SCREENSHOT=$PWD/docs/dashboard.png` refreshes the README's),
    // so a test run never rewrites tracked files. Orders and pings flow for a
    // few polls first so the rates and sparklines have something to show.
    let stop = tokio_util::sync::CancellationToken::new();
    let traffic = {
        let api = Api::new(&gw, &appid, &appsecret);
        let commands = gw.handle.commands.clone();
        let first = m(machines[0]);
        let stop = stop.clone();
        tokio::spawn(async move {
            while !stop.is_cancelled() {
                let _ = api.order(machines[0], &[(2, 1)]).await;
                let _ = commands.ping(&first, Duration::from_millis(500)).await;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_secs(7)).await;
    let png = browser.screenshot().await;
    stop.cancel();
    let _ = traffic.await;
    assert!(png.starts_with(b"\x89PNG"), "a PNG");
    let out_dir = tempfile::tempdir().expect("screenshot dir");
    let shot = screenshot_path("VENDGATE_SCREENSHOT", &out_dir, "dashboard.png");
    std::fs::write(&shot, &png).expect("screenshot written");
    browser.quit().await;
    gw.stop().await;
}

/// A machine's page, opened from the machine list: the order its command
/// is out for, its recent orders with their outcome (a machine's error text
/// shown as text, never markup), and a Ping that shows the round trip.
#[tokio::test]
async fn machine_page_in_headless_chromium() {
    if browser_missing("machine_page_in_headless_chromium") {
        return;
    }
    let gw = TestGateway::start_with(with_operator).await;
    let (appid, appsecret) = gw.merchant("shop").await;
    let api = Api::new(&gw, &appid, &appsecret);
    let mno = "50000011";
    let secret = gw.machine(&appid, mno).await;
    // Machines choose their error texts; this one tries markup.
    let error = "<img src=x onerror=alert(1)>jam";
    let mut c = sim_config(&gw, mno, &secret);
    c.behaviour = Behaviour::Fail {
        error: error.into(),
    };
    let sim = ready_sim(&gw, c).await;
    let failed = order_id(&api.order(mno, &[(1, 1)]).await);
    api.wait_status(failed, "failed").await;
    sim.set_behaviour(Behaviour::Normal);
    let completed = order_id(&api.order(mno, &[(1, 2)]).await);
    api.wait_status(completed, "completed").await;
    sim.set_behaviour(Behaviour::AckThenSilent);
    let pending = order_id(&api.order(mno, &[(2, 1)]).await);
    api.wait_status(pending, "dispensing").await;

    let driver = Driver::start().await;
    let browser = Browser::open(&driver).await;
    let url = format!(
        "http://{OPERATOR}:{OPERATOR_PASSWORD}@{}/dashboard",
        gw.http_addr
    );
    browser.goto(&url).await;
    browser.wait_text("#machines-total", "1").await;
    let link = format!("#machines a[href='#machine/{mno}']");
    browser.wait_text(&link, mno).await;
    browser.click(&link).await;
    browser.wait_text("#machine-no", mno).await;
    browser.wait_text("#machine-state", "online").await;

    let row = |table: &str, id: u64, col: u32| {
        format!("#{table} tr[data-order='{id}'] td:nth-child({col})")
    };
    browser
        .wait_text(&row("machine-pending", pending, 2), "dispensing")
        .await;
    let items = browser.text(&row("machine-pending", pending, 4)).await;
    assert_eq!(items.as_deref(), Some("product 2 × 1"));
    browser.wait_text("#machine-orders-total", "3").await;
    // Newest first.
    let first = browser
        .text("#machine-orders tr:nth-child(1) td:nth-child(1)")
        .await;
    assert_eq!(first, Some(pending.to_string()));
    let last = browser
        .text("#machine-orders tr:nth-child(3) td:nth-child(1)")
        .await;
    assert_eq!(last, Some(failed.to_string()));
    for (id, status, shown) in [
        (completed, "completed", "2 / 2"),
        (failed, "failed", "0 / 1"),
        (pending, "dispensing", "0 / 1"),
    ] {
        let got = browser.text(&row("machine-orders", id, 3)).await;
        assert_eq!(got.as_deref(), Some(status), "order {id}");
        let got = browser.text(&row("machine-orders", id, 5)).await;
        assert_eq!(got.as_deref(), Some(shown), "order {id}");
    }
    let got = browser.text(&row("machine-orders", failed, 4)).await;
    assert_eq!(got.as_deref(), Some(error), "the error as text");
    assert!(
        browser.find("#machine-page img").await.is_none(),
        "no markup from machines"
    );

    browser.click("#ping").await;
    let shown = browser
        .wait_text_that("#ping-result", "rtt N ms", |t| {
            t.strip_prefix("rtt ")
                .and_then(|t| t.strip_suffix(" ms"))
                .is_some_and(|n| n.parse::<u64>().is_ok())
        })
        .await;
    let rtt = gw
        .handle
        .fleet
        .machine_presence(&m(mno))
        .and_then(|p| p.last_rtt_ms)
        .expect("last_rtt_ms");
    assert_eq!(shown, format!("rtt {rtt} ms"));
    // Among the machine's figures too.
    let want = format!("last rtt {rtt} ms");
    browser
        .wait_text_that("#machine-summary", &want, |t| t.contains(&want))
        .await;

    let png = browser.screenshot().await;
    assert!(png.starts_with(b"\x89PNG"), "a PNG");
    let out_dir = tempfile::tempdir().expect("screenshot dir");
    let shot = screenshot_path("VENDGATE_MACHINE_SCREENSHOT", &out_dir, "machine.png");
    std::fs::write(&shot, &png).expect("screenshot written");

    // Back to the overview.
    browser.click("#machine-back").await;
    browser.wait_text(&link, mno).await;
    browser.quit().await;
    gw.stop().await;
}

#[tokio::test]
async fn top_prints_one_frame() {
    let gw = TestGateway::start_with(with_operator).await;
    let (appid, _) = gw.merchant("shop").await;
    let secret = gw.machine(&appid, "60000001").await;
    let _sim = ready_sim(&gw, sim_config(&gw, "60000001", &secret)).await;
    let frame = vendgate::tools::top::frame(&format!("http://{}/metrics", gw.http_addr))
        .await
        .expect("frame");
    assert!(frame.contains("machines online"), "{frame}");
    assert!(frame.contains("vend/v1/+/state"), "{frame}");
    let line = frame
        .lines()
        .find(|l| l.contains("machines online"))
        .expect("online line");
    assert!(line.contains(" 1"), "{line}");
    gw.stop().await;
}

/// Every metric the Grafana dashboard and the alert rules query is one the
/// gateway exports, so renaming a series cannot silently blank a panel.
#[tokio::test]
async fn grafana_and_alerts_query_exported_metrics() {
    let gw = TestGateway::start().await;
    let (_, e) = scrape(&gw).await;
    gw.stop().await;
    let deploy = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy");
    let dashboard =
        std::fs::read_to_string(deploy.join("grafana/vendgate.json")).expect("grafana dashboard");
    let v: Value = serde_json::from_str(&dashboard).expect("dashboard is JSON");
    assert_eq!(v["title"], "vendgate");
    let alerts = std::fs::read_to_string(deploy.join("vendgate-alerts.yml")).expect("alerts");
    let scrape_cfg =
        std::fs::read_to_string(deploy.join("prometheus.yml")).expect("prometheus.yml");
    assert!(scrape_cfg.contains("metrics_path: /metrics"));
    assert!(scrape_cfg.contains("vendgate-alerts.yml"));

    let exported: BTreeSet<String> = e.types.keys().cloned().collect();
    let mut used = BTreeSet::new();
    for text in [&dashboard, &alerts] {
        let bytes = text.as_bytes();
        let mut i = 0;
        while i < bytes.len() {
            let rest = &text[i..];
            if rest.starts_with("vendgate_") || rest.starts_with("process_") {
                let end = rest
                    .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .unwrap_or(rest.len());
                used.insert(rest[..end].to_string());
                i += end;
            } else {
                i += rest.chars().next().map_or(1, char::len_utf8);
            }
        }
    }
    assert!(used.len() > 15, "{used:?}");
    for name in &used {
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s).filter(|b| exported.contains(*b)))
            .unwrap_or(name);
        assert!(
            exported.contains(family),
            "{name} is queried but not exported"
        );
    }
}
