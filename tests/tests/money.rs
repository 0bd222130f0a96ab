//! Money paths: refunds, pay_later with the unpaid deadline (durable across
//! restarts, one winner against a racing payment), unpaid caps.

use std::time::Duration;

use serde_json::{json, Value};
use vendgate_e2e::{ready_sim, sim_config, wait_until, Api, TestGateway};
use vendgate_proto::machine::MachineNo;
use vendgate_sim::Behaviour;

const M1: &str = "50000001";

fn code(v: &Value) -> i64 {
    v["code"].as_i64().unwrap_or(-1)
}

fn order_id(v: &Value) -> u64 {
    assert_eq!(code(v), 0, "expected success: {v}");
    v["data"]["order_id"].as_u64().expect("order_id")
}

fn m() -> MachineNo {
    M1.parse().unwrap()
}

async fn pay_later(api: &Api, q: u32) -> Value {
    let body = json!({ "machine_no": M1, "products": [{ "product_id": 1, "quantity": q }], "pay_later": true });
    api.post_raw("/orders", body.to_string()).await.1
}

async fn setup(tune: impl FnOnce(&mut vendgate::Settings)) -> (TestGateway, Api, String) {
    let gw = TestGateway::start_with(tune).await;
    let (appid, secret) = gw.merchant("shop").await;
    let ms = gw.machine(&appid, M1).await;
    let api = Api::new(&gw, &appid, &secret);
    (gw, api, ms)
}

#[tokio::test]
async fn refunds_are_recorded_once_and_only_where_owed() {
    let (gw, api, ms) = setup(|_| {}).await;
    let mut c = sim_config(&gw, M1, &ms);
    c.behaviour = Behaviour::Fail {
        error: "motor_jam".into(),
    };
    let sim = ready_sim(&gw, c).await;
    let failed = order_id(&api.order(M1, &[(1, 2)]).await);
    let d = api.wait_status(failed, "failed").await;
    assert_eq!(
        (
            d["data"]["refund_amount"].clone(),
            d["data"]["refund_status"].clone()
        ),
        (json!(700), json!("pending"))
    );

    let r1 = api
        .post_raw(&format!("/orders/{failed}/refund"), "")
        .await
        .1;
    assert_eq!(code(&r1), 0);
    assert_eq!(r1["data"]["refund_status"], "refunded");
    let r2 = api
        .post_raw(&format!("/orders/{failed}/refund"), "")
        .await
        .1;
    assert_eq!(
        r2["data"]["refunded_at"], r1["data"]["refunded_at"],
        "idempotent"
    );
    let d = api.get(&format!("/orders/{failed}")).await;
    assert_eq!(d["data"]["refund_status"], "refunded");
    let refunds = d["data"]["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["type"] == "refunded")
        .count();
    assert_eq!(refunds, 1);

    sim.set_behaviour(Behaviour::Normal);
    let ok = order_id(&api.order(M1, &[(1, 1)]).await);
    let d = api.wait_status(ok, "completed").await;
    assert!(d["data"].get("refund_status").is_none());
    assert_eq!(
        code(&api.post_raw(&format!("/orders/{ok}/refund"), "").await.1),
        40002
    );
    let (other_id, other_secret) = gw.merchant("other").await;
    let other = Api::new(&gw, &other_id, &other_secret);
    assert_eq!(
        code(
            &other
                .post_raw(&format!("/orders/{failed}/refund"), "")
                .await
                .1
        ),
        40001
    );
    assert_eq!(code(&api.post_raw("/orders/777/refund", "").await.1), 40001);
    gw.stop().await;
}

#[tokio::test]
async fn pay_later_reserves_then_pay_dispatches() {
    let (gw, api, ms) = setup(|_| {}).await;
    let sim = ready_sim(&gw, sim_config(&gw, M1, &ms)).await;
    let v = pay_later(&api, 3).await;
    assert_eq!(v["data"]["status"], "awaiting_payment");
    let id = order_id(&v);
    assert_eq!(gw.handle.orders.inventory.reserved_total(&m()), 3);
    assert!(
        sim.journal().iter().all(|e| e.event.order_id() != Some(id)),
        "no command before payment"
    );
    let d = api.get(&format!("/orders/{id}")).await;
    assert_eq!(d["data"]["status"], "awaiting_payment");
    assert!(d["data"]["pay_deadline"].is_string());
    // Reserved stock is not free for others: 10 − 3 leaves 7.
    assert_eq!(code(&api.order(M1, &[(1, 8)]).await), 30004);

    let paid = api.post_raw(&format!("/orders/{id}/pay"), "").await.1;
    assert_eq!(order_id(&paid), id);
    api.wait_status(id, "completed").await;
    assert_eq!(sim.dispensed_orders(), vec![id]);
    assert_eq!(
        code(&api.post_raw(&format!("/orders/{id}/pay"), "").await.1),
        40002
    );
    gw.stop().await;
}

#[tokio::test]
async fn unpaid_orders_expire_and_release_stock_and_late_pay_is_40002() {
    let (gw, api, ms) = setup(|s| s.orders.unpaid_timeout = Duration::from_millis(300)).await;
    let sim = ready_sim(&gw, sim_config(&gw, M1, &ms)).await;
    let id = order_id(&pay_later(&api, 4).await);
    assert_eq!(gw.handle.orders.inventory.reserved_total(&m()), 4);
    let d = api.wait_status(id, "expired").await;
    assert!(d["data"].get("pay_deadline").is_none());
    assert_eq!(
        gw.handle.orders.inventory.reserved_total(&m()),
        0,
        "stock back to free"
    );
    assert_eq!(
        code(&api.post_raw(&format!("/orders/{id}/pay"), "").await.1),
        40002
    );
    assert!(sim.dispensed_orders().is_empty());
    let kinds: Vec<String> = d["data"]["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["type"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(kinds, vec!["created", "expired"]);
    gw.stop().await;
}

#[tokio::test]
async fn payment_racing_expiry_has_exactly_one_winner() {
    let (gw, api, ms) = setup(|s| {
        s.orders.unpaid_timeout = Duration::from_millis(200);
        s.orders.max_unpaid_per_machine = 100;
        s.orders.queue_depth = 32;
    })
    .await;
    let mut c = sim_config(&gw, M1, &ms);
    c.inventory[0].stock = 100;
    let sim = ready_sim(&gw, c).await;
    let api = std::sync::Arc::new(api);
    let mut ids = Vec::new();
    for _ in 0..12 {
        ids.push(order_id(&pay_later(&api, 1).await));
    }
    // Pay each one around its deadline, so some payments land before the
    // sweep and some after.
    let mut tasks = Vec::new();
    for (i, id) in ids.iter().copied().enumerate() {
        let a = api.clone();
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(150 + 10 * i as u64)).await; // spreads attempts across the deadline
            (
                id,
                code(&a.post_raw(&format!("/orders/{id}/pay"), "").await.1),
            )
        }));
    }
    for t in tasks {
        let (id, c) = t.await.unwrap();
        assert!(c == 0 || c == 40002, "pay answered {c}");
        let status = if c == 0 {
            api.wait_status(id, "completed").await;
            "completed"
        } else {
            api.wait_status(id, "expired").await;
            "expired"
        };
        let dispensed = sim.dispensed_orders().contains(&id);
        assert_eq!(
            dispensed,
            status == "completed",
            "order {id}: {status}, dispensed {dispensed}"
        );
    }
    wait_until("all reservations settled", || {
        gw.handle.orders.inventory.reserved_total(&m()) == 0
    })
    .await;
    gw.stop().await;
}

#[tokio::test]
async fn deadline_passed_while_down_expires_right_after_start() {
    let tune = |s: &mut vendgate::Settings| s.orders.unpaid_timeout = Duration::from_millis(400);
    let (gw, api, ms) = setup(tune).await;
    let sim = ready_sim(&gw, sim_config(&gw, M1, &ms)).await;
    let id = order_id(&pay_later(&api, 2).await);
    let deadline = gw
        .handle
        .store
        .order(id)
        .await
        .unwrap()
        .unwrap()
        .pay_deadline
        .unwrap();
    sim.shutdown().await;
    let dir = gw.stop_keep_dir().await;
    // The deadline passes while nothing runs.
    let left = (deadline - chrono::Utc::now()).to_std().unwrap_or_default();
    tokio::time::sleep(left + Duration::from_millis(50)).await;
    let gw =
        TestGateway::start_in(dir, |s| s.orders.unpaid_timeout = Duration::from_secs(3600)).await;
    let api = Api::new(&gw, &api.appid, &api.secret);
    api.wait_status(id, "expired").await;
    assert_eq!(gw.handle.orders.inventory.reserved_total(&m()), 0);
    gw.stop().await;
}

#[tokio::test]
async fn unpaid_reservations_are_capped_per_machine() {
    let (gw, api, ms) = setup(|s| s.orders.max_unpaid_per_machine = 2).await;
    let _sim = ready_sim(&gw, sim_config(&gw, M1, &ms)).await;
    order_id(&pay_later(&api, 1).await);
    order_id(&pay_later(&api, 1).await);
    assert_eq!(code(&pay_later(&api, 1).await), 30004);
    assert_eq!(gw.handle.orders.inventory.reserved_total(&m()), 2);
    // Paying-now orders are not affected by the unpaid cap.
    let id = order_id(&api.order(M1, &[(1, 1)]).await);
    api.wait_status(id, "completed").await;
    gw.stop().await;
}
