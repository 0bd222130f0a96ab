//! The shipped scenario files (`device-sim/scenarios/`) end to end: each one
//! drives a simulated machine against a real gateway, and the merchant sees
//! the outcome its header documents.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use vendgate_e2e::{ready_sim, sim_config, wait_until, wait_until_async, Api, TestGateway};
use vendgate_proto::machine::MachineNo;
use vendgate_sim::{Behaviour, JournalEvent, Scenario, SimHandle};

const M1: &str = "30000001";
const M2: &str = "30000002";

fn scenario(file: &str) -> Scenario {
    let path: PathBuf = [
        env!("CARGO_MANIFEST_DIR"),
        "..",
        "device-sim",
        "scenarios",
        file,
    ]
    .iter()
    .collect();
    Scenario::load(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn m(s: &str) -> MachineNo {
    s.parse().unwrap()
}

fn code(v: &Value) -> i64 {
    v["code"].as_i64().unwrap_or(-1)
}

fn order_id(v: &Value) -> u64 {
    assert_eq!(code(v), 0, "expected success: {v}");
    v["data"]["order_id"].as_u64().expect("order_id")
}

/// A gateway, a merchant with machine [`M1`], and the machine running with
/// the behaviour (and stock, if any) `file` assigns it.
async fn start(
    file: &str,
    tune: impl FnOnce(&mut vendgate::Settings),
) -> (TestGateway, Api, SimHandle) {
    let gw = TestGateway::start_with(tune).await;
    let (appid, secret) = gw.merchant("shop").await;
    let api = Api::new(&gw, &appid, &secret);
    let sim = start_machine(&gw, &appid, M1, file, |_| {}).await;
    (gw, api, sim)
}

/// Provisions `machine` for `appid` and runs it as `file` assigns it;
/// `tune` adjusts its configuration last.
async fn start_machine(
    gw: &TestGateway,
    appid: &str,
    machine: &str,
    file: &str,
    tune: impl FnOnce(&mut vendgate_sim::SimConfig),
) -> SimHandle {
    let secret = gw.machine(appid, machine).await;
    let mut config = sim_config(gw, machine, &secret);
    let a = scenario(file).assignment_for(m(machine));
    config.behaviour = a.behaviour;
    if let Some(stock) = a.stock {
        config.inventory = stock;
    }
    tune(&mut config);
    ready_sim(gw, config).await
}

/// The value of one series of the gateway's `/metrics`, 0 when absent.
async fn metric(gw: &TestGateway, series: &str) -> f64 {
    let text = reqwest::get(format!("http://{}/metrics", gw.http_addr))
        .await
        .expect("GET /metrics")
        .text()
        .await
        .expect("metrics body");
    text.lines()
        .filter_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .find_map(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Waits until a `/metrics` series reaches at least `at_least`.
async fn wait_metric(gw: &TestGateway, series: &str, at_least: f64) -> f64 {
    let deadline = tokio::time::Instant::now() + vendgate_e2e::DEADLINE;
    loop {
        let v = metric(gw, series).await;
        if v >= at_least {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{series} stayed at {v}, below {at_least}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

const DUPLICATES: &str =
    r#"vendgate_order_service_events_total{event="duplicate_device_messages"}"#;
const REJECTED: &str = r#"vendgate_order_service_events_total{event="rejected_device_messages"}"#;
const RESULTS_APPLIED: &str = r#"vendgate_order_service_events_total{event="results_applied"}"#;
const MALFORMED: &str = r#"vendgate_mqtt_malformed_total{kind="payload"}"#;

/// The merchant's outbox events of `kind` for `order_id` (`GET /events`).
async fn outbox_events(api: &Api, kind: &str, order_id: u64) -> Vec<Value> {
    let v = api.get("/events?page_size=100").await;
    assert_eq!(code(&v), 0, "{v}");
    v["data"]["events"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .filter(|e| e["type"] == kind && e["order_id"].as_u64() == Some(order_id))
        .collect()
}

/// A webhook receiver on loopback that records every event body it gets
/// and answers 200.
#[derive(Clone, Default)]
struct Hooks(Arc<Mutex<Vec<Value>>>);

impl Hooks {
    async fn start() -> (Self, String) {
        let hooks = Self::default();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind receiver");
        let url = format!("http://{}/hook", listener.local_addr().expect("address"));
        let seen = hooks.clone();
        let app = axum::Router::new().fallback(move |body: String| {
            let seen = seen.clone();
            async move {
                let v = serde_json::from_str(&body).unwrap_or(Value::Null);
                seen.0.lock().expect("hooks").push(v);
                axum::http::StatusCode::OK
            }
        });
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        (hooks, url)
    }

    /// Deliveries of `kind` for `order_id`.
    fn of(&self, kind: &str, order_id: u64) -> usize {
        self.0
            .lock()
            .expect("hooks")
            .iter()
            .filter(|v| v["type"] == kind && v["data"]["order_id"].as_u64() == Some(order_id))
            .count()
    }
}

/// A gateway that delivers webhooks to a loopback [`Hooks`], a merchant
/// using it, and machine [`M1`] running as `file` assigns it.
async fn start_with_hooks(file: &str) -> (TestGateway, Api, SimHandle, Hooks) {
    let (hooks, url) = Hooks::start().await;
    let gw = TestGateway::start_with(|s| s.notifier.allow_private_targets = true).await;
    let (appid, secret) = gw.merchant_with_url("shop", &url).await;
    let api = Api::new(&gw, &appid, &secret);
    let sim = start_machine(&gw, &appid, M1, file, |_| {}).await;
    (gw, api, sim, hooks)
}

fn count(sim: &SimHandle, pred: impl Fn(&JournalEvent) -> bool) -> usize {
    sim.journal().iter().filter(|e| pred(&e.event)).count()
}

/// A number from an API answer; the envelope leaves out zero values
/// (protobuf JSON defaults), so absent is 0.
fn num(v: &Value) -> i64 {
    v.as_i64().unwrap_or(0)
}

/// The stock and reservation of one product as `GET /machines/{no}` shows it.
async fn stock_of(api: &Api, machine: &str, product: i64) -> (i64, i64) {
    let v = api.get(&format!("/machines/{machine}")).await;
    v["data"]["stock"]
        .as_array()
        .and_then(|items| items.iter().find(|i| i["product_id"] == product))
        .map(|i| (num(&i["stock"]), num(&i["reserved"])))
        .unwrap_or((-1, -1))
}

#[tokio::test]
async fn refuse_scenario_answers_30005() {
    let (gw, api, sim) = start("refuse.toml", |_| {}).await;
    assert!(matches!(sim.behaviour(), Behaviour::Refuse { .. }));
    let v = api.order(M1, &[(1, 1)]).await;
    assert_eq!(code(&v), 30005, "{v}");
    assert!(sim.dispensed_orders().is_empty());
    assert_eq!(gw.handle.orders.inventory.reserved_total(&m(M1)), 0);
    gw.stop().await;
}

#[tokio::test]
async fn fail_scenario_fails_with_full_refund() {
    let (gw, api, _sim) = start("fail.toml", |_| {}).await;
    let id = order_id(&api.order(M1, &[(1, 2)]).await);
    let d = api.wait_status(id, "failed").await;
    assert_eq!(d["data"]["refund_amount"], 700, "{d}");
    assert_eq!(d["data"]["error"], "motor_jam");
    gw.stop().await;
}

#[tokio::test]
async fn partial_scenario_refunds_the_shortfall() {
    let (gw, api, _sim) = start("partial.toml", |_| {}).await;
    let id = order_id(&api.order(M1, &[(1, 2), (2, 1)]).await);
    let d = api.wait_status(id, "partially_dispensed").await;
    // Half of each line, rounded down: 1 of 2 × 350 and 0 of 1 × 200.
    assert_eq!(d["data"]["amount"], 900, "{d}");
    assert_eq!(d["data"]["refund_amount"], 350 + 200, "{d}");
    assert_eq!(d["data"]["error"], "motor_jam");
    gw.stop().await;
}

#[tokio::test]
async fn never_ack_scenario_answers_30002() {
    let (gw, api, sim) = start("never-ack.toml", |s| {
        s.orders.accept_timeout = Duration::from_millis(300);
    })
    .await;
    let v = api.order(M1, &[(1, 1)]).await;
    assert_eq!(code(&v), 30002, "{v}");
    assert!(sim.dispensed_orders().is_empty());
    wait_until("reservation released", || {
        gw.handle.orders.inventory.reserved_total(&m(M1)) == 0
    })
    .await;
    gw.stop().await;
}

#[tokio::test]
async fn ack_then_silent_scenario_goes_unknown() {
    let (gw, api, _sim) = start("ack-then-silent.toml", |s| {
        s.orders.dispense_timeout = Duration::from_millis(300);
    })
    .await;
    let id = order_id(&api.order(M1, &[(1, 1)]).await);
    let d = api.wait_status(id, "unknown").await;
    assert_eq!(
        d["data"]["refund_amount"], 350,
        "whole amount may be owed: {d}"
    );
    gw.stop().await;
}

#[tokio::test]
async fn slow_ack_scenario_completes() {
    let (gw, api, sim) = start("slow-ack.toml", |_| {}).await;
    let Behaviour::SlowAck { ms } = sim.behaviour() else {
        panic!("slow-ack.toml gave {}", sim.behaviour());
    };
    // The file's delay must stay inside the default accept timeout (3 s).
    assert!(ms < 3_000, "slow-ack delay {ms} ms");
    let id = order_id(&api.order(M1, &[(1, 1)]).await);
    api.wait_status(id, "completed").await;
    assert_eq!(sim.dispensed_orders(), vec![id]);
    gw.stop().await;
}

#[tokio::test]
async fn drop_connection_scenario_answers_30002() {
    let (gw, api, sim) = start("drop-connection.toml", |_| {}).await;
    let v = api.order(M1, &[(1, 1)]).await;
    assert_eq!(code(&v), 30002, "{v}");
    assert!(sim.dispensed_orders().is_empty());
    // The machine comes back by itself and now behaves normally.
    wait_until("machine back online", || sim.ready() && gw.online(M1)).await;
    wait_until("reservation released", || {
        gw.handle.orders.inventory.reserved_total(&m(M1)) == 0
    })
    .await;
    let id = order_id(&api.order(M1, &[(1, 1)]).await);
    api.wait_status(id, "completed").await;
    assert_eq!(sim.dispensed_orders(), vec![id]);
    gw.stop().await;
}

/// `mixed.toml` assigns by seeded draw: the same machines get the same
/// behaviour on every load, pinned machines keep their rule, and each share
/// is about its size.
#[test]
fn mixed_scenario_assignment_is_deterministic() {
    let a = scenario("mixed.toml");
    let b = scenario("mixed.toml");
    for n in 10_000_000..10_000_010 {
        assert_eq!(
            a.behaviour_for(m(&n.to_string())),
            Behaviour::Refuse {
                reason: "door_open".into()
            }
        );
    }
    let mut counts = std::collections::BTreeMap::<String, usize>::new();
    let mut flapping = 0;
    for n in 10_000_010..10_010_010 {
        let machine = m(&n.to_string());
        let got = a.assignment_for(machine);
        assert_eq!(got, b.assignment_for(machine), "machine {n}");
        flapping += usize::from(got.flap.is_some());
        *counts.entry(got.behaviour.to_string()).or_default() += 1;
    }
    let count = |k: &str| counts.get(k).copied().unwrap_or(0);
    let about = |k: &str, share: f64| {
        let expected = share * 10_000.0;
        let got = count(k) as f64;
        assert!(
            (got - expected).abs() < expected * 0.3 + 10.0,
            "{k}: {got} of 10000, expected about {expected}: {counts:?}"
        );
    };
    about("refuse:maintenance", 0.05);
    about("fail:motor_jam", 0.05);
    about("partial:motor_jam", 0.05);
    about("never-ack", 0.02);
    about("ack-then-silent", 0.02);
    about("slow-ack:500", 0.05);
    about("drop-connection", 0.01);
    assert!((100..300).contains(&flapping), "flapping: {flapping}");
    // Unpinned machines never get the pinned rule's reason.
    assert_eq!(count("refuse:door_open"), 0);
    about("normal", 0.75);
}

/// A rule's `flap` schedule drops the machine's connection every period; it
/// reconnects by itself each time, and the schedule stops on cancel.
#[tokio::test]
async fn flap_schedule_drops_and_reconnects() {
    let gw = TestGateway::start().await;
    let (appid, _) = gw.merchant("shop").await;
    let ms = gw.machine(&appid, M1).await;
    let s = Scenario::parse(
        r#"
        [[rule]]
        machines = "30000001"
        behaviour = { kind = "normal" }
        flap = { period_ms = 300 }
        "#,
    )
    .unwrap();
    let mut config = sim_config(&gw, M1, &ms);
    config.behaviour = s.behaviour_for(m(M1));
    let sim = ready_sim(&gw, config).await;
    let cancel = tokio_util::sync::CancellationToken::new();
    let tasks = s.start_schedules(std::slice::from_ref(&sim), &cancel);
    assert_eq!(tasks.len(), 1);
    let connects = |sim: &SimHandle| {
        sim.journal()
            .iter()
            .filter(|e| matches!(e.event, JournalEvent::Connected))
            .count()
    };
    wait_until("two drops and reconnects", || {
        sim.journal()
            .iter()
            .filter(|e| matches!(e.event, JournalEvent::Dropped))
            .count()
            >= 2
            && connects(&sim) >= 3
    })
    .await;
    cancel.cancel();
    for t in tasks {
        t.await.unwrap();
    }
    wait_until("back online", || sim.ready() && gw.online(M1)).await;
    sim.shutdown().await;
    gw.stop().await;
}

/// result-after-reconnect.toml: the ack gets through, the connection drops
/// before the result, and the result re-published after the reconnect
/// settles the order exactly once; later repeats change nothing.
#[tokio::test]
async fn result_after_reconnect_scenario_settles_once() {
    let (gw, api, sim, hooks) = start_with_hooks("result-after-reconnect.toml").await;
    assert_eq!(sim.behaviour(), Behaviour::ResultAfterReconnect);
    let id = order_id(&api.order(M1, &[(1, 1)]).await);
    let d = api.wait_status(id, "completed").await;
    assert_eq!(num(&d["data"]["refund_amount"]), 0, "{d}");
    assert_eq!(d["data"]["items"][0]["dispensed"], 1, "{d}");
    // The machine's side: ack, drop, reconnect, and only then the result.
    let journal: Vec<JournalEvent> = sim.journal().into_iter().map(|e| e.event).collect();
    let at = |pred: &dyn Fn(&JournalEvent) -> bool| journal.iter().position(pred);
    let acked = at(&|e| matches!(e, JournalEvent::AckSent(a) if a.order_id == id && a.accepted));
    let dropped = at(&|e| matches!(e, JournalEvent::Dropped));
    let result = at(&|e| matches!(e, JournalEvent::ResultSent(r) if r.order_id == id));
    assert!(
        acked < dropped && dropped < result && acked.is_some(),
        "ack {acked:?}, drop {dropped:?}, result {result:?}: {journal:?}"
    );
    let reconnected = journal
        .iter()
        .skip(dropped.unwrap_or(0))
        .position(|e| matches!(e, JournalEvent::Connected));
    assert!(reconnected.is_some(), "no reconnect after the drop");
    assert_eq!(sim.dispensed_orders(), vec![id]);
    wait_until("order.completed delivered", || {
        hooks.of("order.completed", id) >= 1
    })
    .await;
    // Repeats of the stored result are no-ops (PROTOCOL.md gateway rule 3).
    let applied = metric(&gw, RESULTS_APPLIED).await;
    let dups = metric(&gw, DUPLICATES).await;
    sim.republish_results();
    wait_metric(&gw, DUPLICATES, dups + 1.0).await;
    assert_eq!(metric(&gw, RESULTS_APPLIED).await, applied);
    assert_eq!(api.order_status(id).await, "completed");
    assert_eq!(outbox_events(&api, "order.completed", id).await.len(), 1);
    assert_eq!(gw.handle.orders.inventory.reserved_total(&m(M1)), 0);
    gw.stop().await;
}

/// duplicate.toml: every ack and result twice; one settlement, one
/// webhook, and the repeats counted.
#[tokio::test]
async fn duplicate_scenario_settles_once_and_counts_repeats() {
    let (gw, api, sim, hooks) = start_with_hooks("duplicate.toml").await;
    assert_eq!(sim.behaviour(), Behaviour::Duplicate);
    let dups = metric(&gw, DUPLICATES).await;
    let id = order_id(&api.order(M1, &[(1, 2)]).await);
    let d = api.wait_status(id, "completed").await;
    assert_eq!(num(&d["data"]["refund_amount"]), 0, "{d}");
    // The machine really sent both twice.
    let sent = |f: fn(&JournalEvent, u64) -> bool| count(&sim, |e| f(e, id));
    assert_eq!(
        sent(|e, id| matches!(e, JournalEvent::AckSent(a) if a.order_id == id)),
        2
    );
    assert_eq!(
        sent(|e, id| matches!(e, JournalEvent::ResultSent(r) if r.order_id == id)),
        2
    );
    // One repeated ack and one repeated result.
    wait_metric(&gw, DUPLICATES, dups + 2.0).await;
    wait_until("order.completed delivered", || {
        hooks.of("order.completed", id) >= 1
    })
    .await;
    // Re-published later (as after a reconnect): still nothing changes.
    sim.republish_results();
    wait_metric(&gw, DUPLICATES, dups + 3.0).await;
    assert_eq!(api.order_status(id).await, "completed");
    assert_eq!(outbox_events(&api, "order.completed", id).await.len(), 1);
    assert_eq!(
        outbox_events(&api, "order.completed", id).await[0]["status"],
        "delivered"
    );
    assert_eq!(hooks.of("order.completed", id), 1);
    assert_eq!(sim.dispensed_orders(), vec![id]);
    // Stock went down once: 10 - 2.
    wait_until_async("stock view after one dispense", || async {
        stock_of(&api, M1, 1).await == (8, 0)
    })
    .await;
    gw.stop().await;
}

/// malformed.toml: a burst of hostile payloads around a normal answer. The
/// order completes as if nothing happened, the garbage is counted, the
/// machine stays connected, and a second machine keeps working.
#[tokio::test]
async fn malformed_scenario_changes_nothing_and_is_counted() {
    let gw = TestGateway::start().await;
    let (appid, secret) = gw.merchant("shop").await;
    let api = Api::new(&gw, &appid, &secret);
    let hostile = start_machine(&gw, &appid, M1, "malformed.toml", |_| {}).await;
    let normal = start_machine(&gw, &appid, M2, "refuse.toml", |c| {
        c.behaviour = Behaviour::Normal;
    })
    .await;
    assert_eq!(hostile.behaviour(), Behaviour::Malformed);
    let other = order_id(&api.order(M2, &[(2, 1)]).await);
    let other_before = api.wait_status(other, "completed").await;

    let (malformed, rejected, dups) = (
        metric(&gw, MALFORMED).await,
        metric(&gw, REJECTED).await,
        metric(&gw, DUPLICATES).await,
    );
    let id = order_id(&api.order(M1, &[(1, 1)]).await);
    let d = api.wait_status(id, "completed").await;
    assert_eq!(num(&d["data"]["refund_amount"]), 0, "{d}");
    assert_eq!(d["data"]["items"][0]["dispensed"], 1, "{d}");
    let raw = count(&hostile, |e| matches!(e, JournalEvent::RawSent { .. }));
    assert!(raw >= 15, "only {raw} hostile payloads sent");
    // A result naming the other machine's order.
    hostile.publish_raw(
        "result",
        json!({ "order_id": other,
                "items": [{ "product_id": 2, "quantity": 1, "dispensed": 0 }],
                "error": "motor_jam" })
        .to_string(),
    );
    // 14 payloads that do not decode; 4 results rejected: an unknown order,
    // two that do not fit the order (whether they arrive before or after
    // the real result: the gateway handles results concurrently), and the
    // other machine's order; the ack for an unknown order is a stray one.
    wait_metric(&gw, MALFORMED, malformed + 14.0).await;
    wait_metric(&gw, REJECTED, rejected + 4.0).await;
    wait_metric(&gw, DUPLICATES, dups + 1.0).await;
    // Exactly those: nothing else was counted against the machine.
    assert_eq!(metric(&gw, MALFORMED).await, malformed + 14.0);
    assert_eq!(metric(&gw, REJECTED).await, rejected + 4.0);
    assert_eq!(metric(&gw, DUPLICATES).await, dups + 1.0);

    // Nothing changed: both orders as settled, the other untouched, the
    // stock view from the real snapshot only, the hostile machine still on
    // its first connection.
    let other_after = api.get(&format!("/orders/{other}")).await;
    assert_eq!(other_after["data"], other_before["data"]);
    assert_eq!(api.order_status(id).await, "completed");
    wait_until_async("stock view from the real snapshot", || async {
        stock_of(&api, M1, 1).await == (9, 0)
    })
    .await;
    assert!(gw.online(M1) && gw.online(M2));
    let v = api.get(&format!("/machines/{M1}")).await;
    assert_eq!(v["data"]["flaps"], 1, "{v}");
    assert_eq!(count(&hostile, |e| matches!(e, JournalEvent::Connected)), 1);
    assert_eq!(hostile.dispensed_orders(), vec![id]);
    // Both machines keep serving.
    let again = order_id(&api.order(M2, &[(1, 1)]).await);
    api.wait_status(again, "completed").await;
    let again = order_id(&api.order(M1, &[(2, 1)]).await);
    api.wait_status(again, "completed").await;
    assert_eq!(normal.dispensed_orders().len(), 2);
    gw.stop().await;
}

/// half-open.toml: the machine stops reading with its socket open; the
/// gateway marks it offline by keep alive alone (1.5 × 1 s here), orders
/// answer 30002, and once the machine reads again it comes back.
#[tokio::test]
async fn half_open_scenario_goes_offline_by_keep_alive() {
    let gw = TestGateway::start_with(|s| {
        s.orders.accept_timeout = Duration::from_millis(300);
    })
    .await;
    let (appid, secret) = gw.merchant("shop").await;
    let api = Api::new(&gw, &appid, &secret);
    let sim = start_machine(&gw, &appid, M1, "half-open.toml", |c| {
        c.keep_alive = Duration::from_secs(1);
    })
    .await;
    let Behaviour::HalfOpen { ms } = sim.behaviour() else {
        panic!("half-open.toml gave {}", sim.behaviour());
    };
    // The stall must outlast the gateway's limit by far, or it proves nothing.
    assert!(ms >= 30_000, "stall of {ms} ms");
    let timeouts =
        r#"vendgate_mqtt_disconnects_total{class="machine",reason="keep_alive_timeout"}"#;
    let before = metric(&gw, timeouts).await;

    let v = api.order(M1, &[(1, 1)]).await;
    assert_eq!(code(&v), 30002, "{v}");
    assert!(
        sim.wait_for(
            |j| j
                .iter()
                .any(|e| matches!(e.event, JournalEvent::Stalled { .. })),
            vendgate_e2e::DEADLINE
        )
        .await
    );
    wait_until("gateway marks the machine offline", || !gw.online(M1)).await;
    wait_metric(&gw, timeouts, before + 1.0).await;
    // The machine never closed its socket: it is still stalled, with no
    // drop or connection loss since it stopped reading.
    let after_stall: Vec<JournalEvent> = sim
        .journal()
        .into_iter()
        .map(|e| e.event)
        .skip_while(|e| !matches!(e, JournalEvent::Stalled { .. }))
        .collect();
    assert!(
        !after_stall.iter().any(|e| matches!(
            e,
            JournalEvent::Dropped | JournalEvent::ConnectionLost { .. } | JournalEvent::StallEnded
        )),
        "{after_stall:?}"
    );
    assert!(sim.dispensed_orders().is_empty());
    let v = api.order(M1, &[(1, 1)]).await;
    assert_eq!(code(&v), 30002, "offline: {v}");
    let v = api.get(&format!("/machines/{M1}")).await;
    assert!(!v["data"]["online"].as_bool().unwrap_or(false), "{v}");

    // End the stall early (the file's is long): the machine reconnects and
    // behaves normally again.
    sim.drop_connection();
    wait_until("machine back online", || sim.ready() && gw.online(M1)).await;
    wait_until("reservations released", || {
        gw.handle.orders.inventory.reserved_total(&m(M1)) == 0
    })
    .await;
    let id = order_id(&api.order(M1, &[(1, 1)]).await);
    api.wait_status(id, "completed").await;
    assert_eq!(sim.dispensed_orders(), vec![id]);
    gw.stop().await;
}

/// reconnect-storm.toml: every machine drops at once and returns at once;
/// all are online again (one more flap each) and orders complete on all.
#[tokio::test]
async fn reconnect_storm_scenario_brings_every_machine_back() {
    const FLEET: [&str; 4] = ["30000001", "30000002", "30000003", "30000004"];
    let gw = TestGateway::start().await;
    let (appid, secret) = gw.merchant("shop").await;
    let api = Api::new(&gw, &appid, &secret);
    let s = scenario("reconnect-storm.toml");
    assert!(s.storm.is_some_and(|st| st.period.is_none()));
    let mut sims = Vec::new();
    for machine in FLEET {
        sims.push(start_machine(&gw, &appid, machine, "reconnect-storm.toml", |_| {}).await);
    }
    let cancel = tokio_util::sync::CancellationToken::new();
    let tasks = s.start_schedules(&sims, &cancel);
    assert_eq!(tasks.len(), 1, "one storm task, no flapping");
    // The storm runs once and ends by itself.
    for t in tasks {
        tokio::time::timeout(vendgate_e2e::DEADLINE, t)
            .await
            .expect("storm ends")
            .expect("storm task");
    }
    for sim in &sims {
        assert_eq!(count(sim, |e| matches!(e, JournalEvent::Dropped)), 1);
    }
    wait_until("every machine back online", || {
        sims.iter()
            .all(|sim| sim.ready() && gw.online(sim.machine_no().as_str()))
    })
    .await;
    for machine in FLEET {
        let v = api.get(&format!("/machines/{machine}")).await;
        assert_eq!(v["data"]["online"], true, "{v}");
        assert!(v["data"]["flaps"].as_u64() >= Some(2), "{v}");
    }
    let mut ids = Vec::new();
    for machine in FLEET {
        ids.push(order_id(&api.order(machine, &[(1, 1)]).await));
    }
    for (id, sim) in ids.iter().zip(&sims) {
        api.wait_status(*id, "completed").await;
        assert_eq!(sim.dispensed_orders(), vec![*id]);
    }
    cancel.cancel();
    gw.stop().await;
}

/// stock-out.toml: little stock, so orders run it out: the gateway answers
/// 30004 from its stock view, and a slot sold out behind its back (a local
/// sale) comes back from the machine as `out_of_stock`, refunded.
#[tokio::test]
async fn stock_out_scenario_answers_30004_and_refunds_a_sold_out_slot() {
    let (gw, api, sim) = start("stock-out.toml", |_| {}).await;
    assert_eq!(stock_of(&api, M1, 1).await, (2, 0));
    assert_eq!(stock_of(&api, M1, 2).await, (1, 0));
    // More than there is: refused by the gateway, nothing sent.
    let v = api.order(M1, &[(1, 3)]).await;
    assert_eq!(code(&v), 30004, "{v}");
    let v = api.order(M1, &[(2, 2)]).await;
    assert_eq!(code(&v), 30004, "{v}");
    assert!(count(&sim, |e| matches!(e, JournalEvent::DispenseReceived(_))) == 0);

    let id = order_id(&api.order(M1, &[(1, 1), (2, 1)]).await);
    api.wait_status(id, "completed").await;
    wait_until_async("snapshot after the dispense", || async {
        stock_of(&api, M1, 2).await == (0, 0) && stock_of(&api, M1, 1).await == (1, 0)
    })
    .await;
    let v = api.order(M1, &[(2, 1)]).await;
    assert_eq!(code(&v), 30004, "sold out: {v}");

    // The last one of product 1 goes at the machine itself; the gateway
    // still believes in it, and the machine reports the slot empty.
    assert_eq!(sim.sell_locally(1, 1), 1);
    let id = order_id(&api.order(M1, &[(1, 1)]).await);
    let d = api.wait_status(id, "failed").await;
    assert_eq!(d["data"]["error"], "out_of_stock", "{d}");
    assert_eq!(d["data"]["refund_amount"], 350, "{d}");
    assert_eq!(num(&d["data"]["items"][0]["dispensed"]), 0, "{d}");
    // Its snapshot after that dispense corrects the gateway's view.
    wait_until_async("snapshot shows the slot empty", || async {
        stock_of(&api, M1, 1).await == (0, 0)
    })
    .await;
    let v = api.order(M1, &[(1, 1)]).await;
    assert_eq!(code(&v), 30004, "{v}");
    // Refilled, it sells again.
    sim.refill(vec![vendgate_proto::msg::InventoryItem {
        product_id: 1,
        stock: 1,
        price: 350,
    }]);
    wait_until_async("refill seen", || async {
        stock_of(&api, M1, 1).await == (1, 0)
    })
    .await;
    let id = order_id(&api.order(M1, &[(1, 1)]).await);
    api.wait_status(id, "completed").await;
    gw.stop().await;
}

/// The malformed scenario's ill-fitting results, sent before the machine's
/// answer: a result that does not fit the order is dropped, so it cannot
/// stand in for the machine's acceptance; the refusal that follows decides.
#[tokio::test]
async fn an_ill_fitting_result_is_not_an_acceptance() {
    let gw = TestGateway::start().await;
    let (appid, secret) = gw.merchant("shop").await;
    let ms = gw.machine(&appid, M1).await;
    let api = Api::new(&gw, &appid, &secret);
    let mut mach = vendgate_e2e::hand_machine(&gw, M1, &ms, 5, 100).await;
    let rejected = metric(&gw, REJECTED).await;
    let place = tokio::spawn(async move { (api.order(M1, &[(1, 1)]).await, api) });
    let (_, payload, _) = mach.next_publish().await.expect("dispense command");
    let cmd: Value = serde_json::from_slice(&payload).expect("dispense JSON");
    let id = cmd["order_id"].as_u64().expect("order_id");
    let publish = |suffix: &str, body: Value| {
        let client = mach.client.clone();
        let topic = format!("vend/v1/{M1}/{suffix}");
        async move {
            client
                .publish(topic, rumqttc::QoS::AtLeastOnce, false, body.to_string())
                .await
                .expect("queued");
        }
    };
    publish(
        "result",
        json!({ "order_id": id,
                "items": [{ "product_id": 999, "quantity": 1, "dispensed": 1 }] }),
    )
    .await;
    wait_metric(&gw, REJECTED, rejected + 1.0).await;
    publish(
        "ack",
        json!({ "order_id": id, "accepted": false, "reason": "door_open" }),
    )
    .await;
    let (v, api) = place.await.expect("order task");
    assert_eq!(code(&v), 30005, "{v}");
    let d = api.wait_status(id, "rejected").await;
    assert_eq!(num(&d["data"]["refund_amount"]), 0, "{d}");
    wait_until("reservation released", || {
        gw.handle.orders.inventory.reserved_total(&m(M1)) == 0
    })
    .await;
    gw.stop().await;
}

/// What a merchant sees of one order on a machine behaving as `b`
/// (mixed.toml's header): an error code, or the order's final status.
fn expected_outcome(b: &Behaviour) -> &'static str {
    match b {
        Behaviour::Refuse { .. } => "30005",
        Behaviour::Fail { .. } => "failed",
        Behaviour::Partial { .. } => "partially_dispensed",
        Behaviour::NeverAck | Behaviour::DropConnection => "30002",
        Behaviour::AckThenSilent => "unknown",
        Behaviour::SlowAck { .. } | Behaviour::Normal => "completed",
        other => panic!("mixed.toml gained a behaviour this test does not know: {other:?}"),
    }
}

/// The status an order settles in: the first one that is not on the way.
async fn settled_status(api: &Api, id: u64) -> String {
    let deadline = tokio::time::Instant::now() + vendgate_e2e::DEADLINE;
    loop {
        let status = api.order_status(id).await;
        if !matches!(status.as_str(), "" | "dispatching" | "dispensing") {
            return status;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "order {id} never settled (last {status:?})"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// mixed.toml end to end: a fleet of machines each behaving as the file
/// assigns (flapping included), one order each, all at once. Every order
/// ends as its machine's behaviour says, and each outcome comes in about
/// its share. The seed fixes who does what, so the counts are the same on
/// every run; the bounds only say "about its share".
#[tokio::test]
async fn mixed_scenario_outcomes_come_in_their_shares() {
    const FLEET: u32 = 150;
    let gw = TestGateway::start_with(|s| {
        // ack-then-silent machines become `unknown` at this deadline.
        s.orders.dispense_timeout = Duration::from_secs(5);
    })
    .await;
    let (appid, secret) = gw.merchant("shop").await;
    let api = Api::new(&gw, &appid, &secret);
    let file = scenario("mixed.toml");
    let mut sims = Vec::new();
    for n in 0..FLEET {
        let machine = (10_000_000 + n).to_string();
        sims.push(start_machine(&gw, &appid, &machine, "mixed.toml", |_| {}).await);
    }
    let cancel = tokio_util::sync::CancellationToken::new();
    let _schedules = file.start_schedules(&sims, &cancel);

    let mut orders = tokio::task::JoinSet::new();
    for sim in &sims {
        let (api, machine) = (api.clone(), sim.machine_no());
        orders.spawn(async move {
            let v = api.order(machine.as_str(), &[(1, 2)]).await;
            let outcome = match code(&v) {
                0 => settled_status(&api, order_id(&v)).await,
                c => c.to_string(),
            };
            (machine, outcome)
        });
    }
    let mut counts = std::collections::BTreeMap::<String, u32>::new();
    while let Some(done) = orders.join_next().await {
        let (machine, outcome) = done.expect("order task");
        let a = file.assignment_for(machine);
        let expected = expected_outcome(&a.behaviour);
        // A flapping machine may be between connections when its order
        // comes (30002); otherwise it works.
        let ok = outcome == expected || (a.flap.is_some() && outcome == "30002");
        assert!(
            ok,
            "{machine} ({}): {outcome}, expected {expected}",
            a.behaviour
        );
        *counts.entry(outcome).or_default() += 1;
    }

    // About its share: 10 pinned refusals plus 5 % of the other 140, and
    // so on down mixed.toml; completed takes the rest (75 % normal, 5 %
    // slow-ack, 2 % flapping).
    let drawn = f64::from(FLEET - 10);
    let about = |outcome: &str, expected: f64| {
        let got = f64::from(counts.get(outcome).copied().unwrap_or(0));
        assert!(
            got >= 1.0 && got >= expected / 3.0 && got <= expected * 3.0 + 3.0,
            "{outcome}: {got} of {FLEET}, expected about {expected:.1}: {counts:?}"
        );
    };
    about("30005", 10.0 + 0.05 * drawn);
    about("failed", 0.05 * drawn);
    about("partially_dispensed", 0.05 * drawn);
    about("30002", 0.03 * drawn);
    about("unknown", 0.02 * drawn);
    about("completed", 0.82 * drawn);
    assert_eq!(counts.values().sum::<u32>(), FLEET);

    // Flapping: every machine with a `flap` rule drops and comes back.
    let flapping: Vec<&SimHandle> = sims
        .iter()
        .filter(|s| file.assignment_for(s.machine_no()).flap.is_some())
        .collect();
    assert!(
        !flapping.is_empty(),
        "the draw gave no machine the flap rule"
    );
    wait_until("every flapping machine dropped once", || {
        flapping
            .iter()
            .all(|s| count(s, |e| matches!(e, JournalEvent::Dropped)) >= 1)
    })
    .await;
    wait_until("and is back", || flapping.iter().all(|s| s.ready())).await;
    cancel.cancel();
    gw.stop().await;
}
