//! The shipped scenario files (`device-sim/scenarios/`) end to end: each one
//! drives a simulated machine against a real gateway, and the merchant sees
//! the outcome its header documents.

use std::path::PathBuf;
use std::time::Duration;

use serde_json::Value;
use vendgate_e2e::{ready_sim, sim_config, wait_until, Api, TestGateway};
use vendgate_proto::machine::MachineNo;
use vendgate_sim::{Behaviour, JournalEvent, Scenario, SimHandle};

const M1: &str = "30000001";

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
/// the behaviour `file` assigns it.
async fn start(
    file: &str,
    tune: impl FnOnce(&mut vendgate::Settings),
) -> (TestGateway, Api, SimHandle) {
    let gw = TestGateway::start_with(tune).await;
    let (appid, secret) = gw.merchant("shop").await;
    let ms = gw.machine(&appid, M1).await;
    let api = Api::new(&gw, &appid, &secret);
    let mut config = sim_config(&gw, M1, &ms);
    config.behaviour = scenario(file).behaviour_for(m(M1));
    let sim = ready_sim(&gw, config).await;
    (gw, api, sim)
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
