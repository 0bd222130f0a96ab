//! Orders end to end: real HTTP, real MQTT, a SQLite file, simulated machines.

use std::time::Duration;

use rumqttc::QoS;
use serde_json::{json, Value};
use vendgate_e2e::{hand_machine, ready_sim, sim_config, wait_until, Api, Client, TestGateway};
use vendgate_proto::machine::MachineNo;
use vendgate_sim::{Behaviour, JournalEvent};

const M1: &str = "20000001";

async fn setup(tune: impl FnOnce(&mut vendgate::Settings)) -> (TestGateway, Api, String) {
    let gw = TestGateway::start_with(tune).await;
    let (appid, secret) = gw.merchant("shop").await;
    let ms = gw.machine(&appid, M1).await;
    let api = Api::new(&gw, &appid, &secret);
    (gw, api, ms)
}

fn code(v: &Value) -> i64 {
    v["code"].as_i64().unwrap_or(-1)
}

fn order_id(v: &Value) -> u64 {
    assert_eq!(code(v), 0, "expected success: {v}");
    v["data"]["order_id"].as_u64().expect("order_id")
}

fn m(s: &str) -> MachineNo {
    s.parse().unwrap()
}

#[tokio::test]
async fn order_completes_and_is_recorded() {
    let (gw, api, ms) = setup(|_| {}).await;
    let sim = ready_sim(&gw, sim_config(&gw, M1, &ms)).await;
    let v = api.order(M1, &[(1, 2), (2, 1)]).await;
    assert_eq!(v["message"], "ok");
    let id = order_id(&v);
    assert_eq!(
        v["data"].as_object().unwrap().len(),
        1,
        "only order_id in data: {v}"
    );
    let done = api.wait_status(id, "completed").await;
    let d = &done["data"];
    assert_eq!(d["machine_no"], M1);
    assert_eq!(d["amount"], 900);
    assert!(
        d.get("refund_amount").is_none(),
        "zero refund left out: {d}"
    );
    assert_eq!(
        d["items"][0],
        json!({"product_id": 1, "quantity": 2, "dispensed": 2, "unit_price": 350})
    );
    let kinds: Vec<&str> = d["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["type"].as_str().unwrap())
        .collect();
    // "accepted" is recorded by the ack, or implied by a result that
    // overtook it (then "sent" follows as its own entry).
    assert_eq!(kinds[0], "created");
    assert!(
        kinds.contains(&"accepted") && kinds.contains(&"result"),
        "{kinds:?}"
    );
    let sent = d["events"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["detail"]["ttl_ms"] == 3000)
        .expect("when the command left is recorded");
    assert!(sent["detail"]["sent_at"].is_string());
    assert_eq!(sim.dispensed_orders(), vec![id]);
    // Reservation released; stock follows the machine's report.
    wait_until("reservation released", || {
        gw.handle.orders.inventory.reserved_total(&m(M1)) == 0
    })
    .await;
    gw.stop().await;
}

#[tokio::test]
async fn published_go_and_php_bodies_place_orders() {
    let (gw, api, ms) = setup(|_| {}).await;
    let _sim = ready_sim(&gw, sim_config(&gw, M1, &ms)).await;
    let go = format!(r#"{{"imei": "{M1}","products": [{{"product_id": 1,"quantity": 1}}]}}"#);
    let php = format!("{{\"products\":[{{\"product_id\":1,\"quantity\":1}}],\"imei\":\"{M1}\"}}");
    for body in [go, php] {
        let (status, v) = api.post_raw("/orders", body).await;
        assert_eq!(status, 200);
        let id = order_id(&v);
        api.wait_status(id, "completed").await;
    }
    gw.stop().await;
}

#[tokio::test]
async fn offline_machines_answer_30002_with_empty_data() {
    let (gw, api, ms) = setup(|_| {}).await;
    let v = api.order(M1, &[(1, 1)]).await;
    assert_eq!(
        v,
        json!({"code": 30002, "message": "设备已离线", "data": {}})
    );
    let sim = ready_sim(&gw, sim_config(&gw, M1, &ms)).await;
    sim.disconnect().await;
    wait_until("offline", || !gw.online(M1)).await;
    let v = api.order(M1, &[(1, 1)]).await;
    assert_eq!(code(&v), 30002);
    assert!(sim.dispensed_orders().is_empty());
    gw.stop().await;
}

#[tokio::test]
async fn never_acking_machine_gets_30002_cancel_and_never_dispenses() {
    let (gw, api, ms) = setup(|s| s.orders.accept_timeout = Duration::from_millis(400)).await;
    let mut c = sim_config(&gw, M1, &ms);
    c.behaviour = Behaviour::NeverAck;
    let sim = ready_sim(&gw, c).await;
    let v = api.order(M1, &[(1, 1)]).await;
    assert_eq!(code(&v), 30002);
    // The machine got the command with a TTL, then the cancel.
    assert!(
        sim.wait_for(
            |j| j
                .iter()
                .any(|e| matches!(e.event, JournalEvent::CancelReceived { .. })),
            vendgate_e2e::DEADLINE
        )
        .await
    );
    let (cmd_ttl, order_id) = sim
        .journal()
        .iter()
        .find_map(|e| match &e.event {
            JournalEvent::DispenseReceived(cmd) => Some((cmd.ttl_ms, cmd.order_id)),
            _ => None,
        })
        .expect("dispense received");
    assert_eq!(cmd_ttl, 400);
    // Now the machine would answer normally: a re-delivery must be refused.
    sim.set_behaviour(Behaviour::Normal);
    let o = gw.handle.store.order(order_id).await.unwrap().unwrap();
    assert_eq!(o.status.as_str(), "rejected");
    assert_eq!(o.error.as_deref(), Some("accept_timeout"));
    assert_eq!(gw.handle.orders.inventory.reserved_total(&m(M1)), 0);
    // A later order goes through; the cancelled one never came out.
    let id2 = order_id_of(api.order(M1, &[(1, 1)]).await);
    api.wait_status(id2, "completed").await;
    assert_eq!(sim.dispensed_orders(), vec![id2]);
    gw.stop().await;
}

fn order_id_of(v: Value) -> u64 {
    order_id(&v)
}

#[tokio::test]
async fn refusal_failure_and_partial_dispense() {
    let (gw, api, ms) = setup(|_| {}).await;
    let mut c = sim_config(&gw, M1, &ms);
    c.behaviour = Behaviour::Refuse {
        reason: "door_open".into(),
    };
    let sim = ready_sim(&gw, c).await;

    let v = api.order(M1, &[(1, 1)]).await;
    assert_eq!(
        (code(&v), v["message"].as_str().unwrap()),
        (30005, "设备拒绝出货")
    );
    assert_eq!(gw.handle.orders.inventory.reserved_total(&m(M1)), 0);

    sim.set_behaviour(Behaviour::Fail {
        error: "motor_jam".into(),
    });
    let id = order_id_of(api.order(M1, &[(1, 2)]).await);
    let d = api.wait_status(id, "failed").await;
    assert_eq!(d["data"]["refund_amount"], 700);
    assert_eq!(d["data"]["error"], "motor_jam");

    sim.set_behaviour(Behaviour::Partial {
        error: "motor_jam".into(),
    });
    let id = order_id_of(api.order(M1, &[(1, 2), (2, 1)]).await);
    let d = api.wait_status(id, "partially_dispensed").await;
    // Half of each line, rounded down: 1 of 2 × 350 and 0 of 1 × 200 come out.
    assert_eq!(d["data"]["refund_amount"], 350 + 200);
    assert_eq!(d["data"]["amount"], 900);
    gw.stop().await;
}

#[tokio::test]
async fn silent_after_accept_becomes_unknown_then_late_result_settles() {
    let (gw, api, ms) = setup(|s| s.orders.dispense_timeout = Duration::from_millis(500)).await;
    // A hand-driven machine, to send the late result exactly when we want.
    let mut mach = hand_machine(&gw, M1, &ms, 5, 100).await;
    let api2 = api;
    let place = tokio::spawn(async move {
        let v = api2.order(M1, &[(1, 2)]).await;
        (v, api2)
    });
    let (_, payload, _) = mach.next_publish().await.expect("dispense command");
    let cmd: Value = serde_json::from_slice(&payload).unwrap();
    let id = cmd["order_id"].as_u64().unwrap();
    ack(&mach, id).await;
    let (v, api) = place.await.unwrap();
    assert_eq!(order_id(&v), id);
    let d = api.wait_status(id, "unknown").await;
    assert_eq!(
        d["data"]["refund_amount"], 200,
        "unknown: the whole amount may be owed"
    );
    assert_eq!(gw.handle.orders.inventory.reserved_total(&m(M1)), 0);
    result(&mach, id, 2).await;
    let d = api.wait_status(id, "completed").await;
    assert!(d["data"].get("refund_amount").is_none());
    gw.stop().await;
}

#[tokio::test]
async fn stock_is_checked_and_nothing_reserved_on_30004() {
    let (gw, api, ms) = setup(|_| {}).await;
    let _sim = ready_sim(&gw, sim_config(&gw, M1, &ms)).await;
    for products in [vec![(9, 1)], vec![(1, 11)], vec![(1, 1), (2, 6)]] {
        let v = api.order(M1, &products).await;
        assert_eq!(code(&v), 30004, "{products:?}");
        assert_eq!(v["message"], "库存不足");
    }
    assert_eq!(gw.handle.orders.inventory.reserved_total(&m(M1)), 0);
    let v = api.get(&format!("/machines/{M1}")).await;
    assert_eq!(
        v["data"]["stock"][0],
        json!({"product_id": 1, "stock": 10, "price": 350})
    );
    gw.stop().await;
}

#[tokio::test]
async fn busy_machine_queues_in_order_and_answers_30003_when_full() {
    let (gw, api, ms) = setup(|s| s.orders.queue_depth = 2).await;
    let mut mach = hand_machine(&gw, M1, &ms, 50, 100).await;
    let api = std::sync::Arc::new(api);

    // Order 1 in flight (accepted, no result yet).
    let a = api.clone();
    let first = tokio::spawn(async move { a.order(M1, &[(1, 1)]).await });
    let id1 = next_command(&mut mach, "dispense").await["order_id"]
        .as_u64()
        .unwrap();
    ack(&mach, id1).await;
    assert_eq!(next_command(&mut mach, "go").await["order_id"], id1);
    assert_eq!(order_id(&first.await.unwrap()), id1);

    // Two more wait, in order; a fourth finds the queue full.
    let mut waiting = Vec::new();
    for q in [2u32, 3] {
        let a = api.clone();
        waiting.push(tokio::spawn(async move { a.order(M1, &[(1, q)]).await }));
        wait_until("queued", || {
            gw.handle.orders.queued(&m(M1)) == q as usize - 1
        })
        .await;
    }
    let v = api.order(M1, &[(1, 1)]).await;
    assert_eq!(
        (code(&v), v["message"].as_str().unwrap()),
        (30003, "设备忙")
    );

    // Finish order 1; orders 2 and 3 follow in arrival order.
    result(&mach, id1, 1).await;
    for (i, q) in [2u32, 3].into_iter().enumerate() {
        let cmd = next_command(&mut mach, "dispense").await;
        assert_eq!(
            cmd["items"][0]["quantity"], q,
            "dispatched in arrival order"
        );
        let id = cmd["order_id"].as_u64().unwrap();
        ack(&mach, id).await;
        assert_eq!(next_command(&mut mach, "go").await["order_id"], id);
        let answered = waiting.remove(0).await.unwrap();
        assert_eq!(
            order_id(&answered),
            id,
            "queued order {i} answered with its id"
        );
        result(&mach, id, q).await;
        api.wait_status(id, "completed").await;
    }
    gw.stop().await;
}

/// The next command the hand-driven machine receives, checked to be `kind`.
async fn next_command(mach: &mut Client, kind: &str) -> Value {
    let (topic, p, _) = mach.next_publish().await.expect("a command");
    assert_eq!(topic, format!("vend/v1/{M1}/cmd/{kind}"), "next command");
    serde_json::from_slice(&p).expect("command JSON")
}

async fn ack(mach: &Client, id: u64) {
    mach.client
        .publish(
            "vend/v1/20000001/ack",
            QoS::AtLeastOnce,
            false,
            format!(r#"{{"order_id":{id},"accepted":true}}"#),
        )
        .await
        .unwrap();
}

async fn result(mach: &Client, id: u64, q: u32) {
    mach.client
        .publish(
            "vend/v1/20000001/result",
            QoS::AtLeastOnce,
            false,
            format!(
                r#"{{"order_id":{id},"items":[{{"product_id":1,"quantity":{q},"dispensed":{q}}}]}}"#
            ),
        )
        .await
        .unwrap();
}

#[tokio::test]
async fn every_auth_and_validation_code() {
    let (gw, api, _) = setup(|s| s.http.max_body = 1024).await;
    let http = reqwest::Client::new();
    let url = format!("{}/orders", api.base);
    let body = format!(r#"{{"machine_no":"{M1}","products":[{{"product_id":1,"quantity":1}}]}}"#);

    let send = |h: Vec<(&'static str, String)>, b: String| {
        let mut r = http.post(&url).body(b);
        for (k, v) in h {
            r = r.header(k, v);
        }
        async move { r.send().await.unwrap().json::<Value>().await.unwrap() }
    };
    let good = || {
        vec![
            ("Appid", api.appid.clone()),
            ("AppSecret", api.secret.clone()),
        ]
    };

    assert_eq!(code(&send(vec![], body.clone()).await), 10001);
    assert_eq!(
        code(&send(vec![("Appid", api.appid.clone())], body.clone()).await),
        10001
    );
    assert_eq!(
        code(
            &send(
                vec![("Appid", api.appid.clone()), ("AppSecret", "wrong".into())],
                body.clone()
            )
            .await
        ),
        10002
    );
    assert_eq!(
        code(
            &send(
                vec![
                    ("Appid", "nobody".into()),
                    ("AppSecret", api.secret.clone())
                ],
                body.clone()
            )
            .await
        ),
        10002
    );
    // Header names are case-insensitive.
    assert_eq!(
        code(
            &send(
                vec![
                    ("APPID", api.appid.clone()),
                    ("appsecret", api.secret.clone())
                ],
                body.clone()
            )
            .await
        ),
        30002
    );

    let cases: Vec<(String, i64)> = vec![
        ("{not json".into(), 20001),
        (
            r#"{"machine_no":12345678,"products":[{"product_id":1,"quantity":1}]}"#.into(),
            20001,
        ),
        ("x".repeat(4096), 20001),
        (
            r#"{"machine_no":"1234","products":[{"product_id":1,"quantity":1}]}"#.into(),
            20002,
        ),
        (format!(r#"{{"machine_no":"{M1}","products":[]}}"#), 20003),
        (
            format!(r#"{{"machine_no":"{M1}","products":[{{"product_id":-1,"quantity":1}}]}}"#),
            20003,
        ),
        (
            format!(r#"{{"machine_no":"{M1}","products":[{{"product_id":1,"quantity":1000}}]}}"#),
            20003,
        ),
    ];
    for (b, want) in cases {
        let v = send(good(), b.clone()).await;
        assert_eq!(code(&v), want, "body {b:.60}");
        assert_eq!(v["data"], json!({}));
    }
    // Content-Type does not matter.
    let v: Value = http
        .post(&url)
        .header("Appid", &api.appid)
        .header("AppSecret", &api.secret)
        .header("Content-Type", "text/plain; charset=utf-8")
        .body(body.clone())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(code(&v), 30002);
    // Unknown routes answer in the envelope too.
    let v = api.get("/nope").await;
    assert_eq!(code(&v), 20001);
    assert_eq!(v["data"], json!({}));
    gw.stop().await;
}

#[tokio::test]
async fn merchants_are_isolated() {
    let (gw, api, ms) = setup(|_| {}).await;
    let _sim = ready_sim(&gw, sim_config(&gw, M1, &ms)).await;
    let id = order_id_of(api.order(M1, &[(1, 1)]).await);
    let (other_id, other_secret) = gw.merchant("other").await;
    let other = Api::new(&gw, &other_id, &other_secret);
    assert_eq!(code(&other.order(M1, &[(1, 1)]).await), 30001);
    assert_eq!(
        code(&other.order("29999999", &[(1, 1)]).await),
        30001,
        "same answer as an absent machine"
    );
    assert_eq!(code(&other.get(&format!("/orders/{id}")).await), 40001);
    assert_eq!(code(&other.get("/orders/12345").await), 40001);
    assert_eq!(code(&other.get(&format!("/machines/{M1}")).await), 30001);
    assert_eq!(
        other.get("/machines").await["data"],
        json!({"page": 1, "page_size": 20})
    );
    // The online listing is served from presence: another merchant's online
    // machine is not in it, and it pages like the full listing.
    assert_eq!(
        other.get("/machines?online=true").await["data"],
        json!({"page": 1, "page_size": 20})
    );
    // Settled first, so no reservation changes between the two listings.
    api.wait_status(id, "completed").await;
    let mine = api.get("/machines?online=true").await;
    assert_eq!(mine["data"]["total"], 1);
    assert_eq!(mine["data"]["machines"][0]["machine_no"], M1);
    assert_eq!(mine["data"]["machines"][0]["online"], true);
    assert_eq!(
        mine["data"]["machines"][0],
        api.get("/machines").await["data"]["machines"][0],
        "same row as the full listing"
    );
    let past_the_end = api.get("/machines?online=true&page=2").await;
    assert_eq!(past_the_end["data"]["total"], 1);
    assert!(past_the_end["data"]["machines"]
        .as_array()
        .is_none_or(|l| l.is_empty()));
    assert_eq!(code(&api.get("/machines?page_size=101").await), 20001);
    assert_eq!(code(&api.get("/machines/1234").await), 20002);
    gw.stop().await;
}

#[tokio::test]
async fn mirror_mode_maps_http_status() {
    let (gw, api, _) =
        setup(|s| s.http.http_status = vendgate::config::HttpStatusMode::Mirror).await;
    let (status, v) = api
        .post_raw(
            "/orders",
            format!(r#"{{"machine_no":"{M1}","products":[{{"product_id":1,"quantity":1}}]}}"#),
        )
        .await;
    assert_eq!((status, code(&v)), (503, 30002));
    let (status, v) = api.post_raw("/orders", "nope").await;
    assert_eq!((status, code(&v)), (400, 20001));
    gw.stop().await;
}

#[tokio::test]
async fn duplicate_and_hostile_device_messages_change_nothing() {
    let (gw, api, ms) = setup(|_| {}).await;
    let ms2 = gw.machine(&gw.merchant("b").await.0, "20000002").await;
    let mut mach = hand_machine(&gw, M1, &ms, 5, 100).await;
    let api = std::sync::Arc::new(api);
    let a = api.clone();
    let place = tokio::spawn(async move { a.order(M1, &[(1, 2)]).await });
    let (_, p, _) = mach.next_publish().await.unwrap();
    let id = serde_json::from_slice::<Value>(&p).unwrap()["order_id"]
        .as_u64()
        .unwrap();
    ack(&mach, id).await;
    ack(&mach, id).await; // duplicate ack
    assert_eq!(order_id(&place.await.unwrap()), id);

    let stats = || {
        let s = &gw.handle.orders.stats;
        (
            s.rejected_device_messages
                .load(std::sync::atomic::Ordering::Relaxed),
            s.malformed_device_messages
                .load(std::sync::atomic::Ordering::Relaxed),
        )
    };
    let hostile = [
        format!(r#"{{"order_id":{id},"items":[{{"product_id":1,"quantity":2,"dispensed":3}}]}}"#),
        format!(r#"{{"order_id":{id},"items":[{{"product_id":7,"quantity":2,"dispensed":1}}]}}"#),
        r#"{"order_id":999,"items":[]}"#.to_string(),
        "{not json".to_string(),
        r#"{"order_id":"x"}"#.to_string(),
    ];
    for h in &hostile {
        mach.client
            .publish(
                "vend/v1/20000001/result",
                QoS::AtLeastOnce,
                false,
                h.clone(),
            )
            .await
            .unwrap();
    }
    wait_until("hostile results counted", || stats() == (3, 2)).await;
    assert_eq!(api.order_status(id).await, "dispensing");

    // Another machine forging a result for this order is dropped.
    let other = Client::connect(gw.mqtt_addr, "20000002", "20000002", &ms2).await;
    other
        .client
        .publish(
            "vend/v1/20000002/result",
            QoS::AtLeastOnce,
            false,
            format!(
                r#"{{"order_id":{id},"items":[{{"product_id":1,"quantity":2,"dispensed":0}}]}}"#
            ),
        )
        .await
        .unwrap();
    wait_until("forged result counted", || stats().0 == 4).await;
    assert_eq!(api.order_status(id).await, "dispensing");

    // The real result, twice: applied once.
    result(&mach, id, 2).await;
    api.wait_status(id, "completed").await;
    result(&mach, id, 2).await;
    wait_until("duplicate counted", || {
        gw.handle
            .orders
            .stats
            .duplicate_device_messages
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 2
    })
    .await;
    let d = api.get(&format!("/orders/{id}")).await;
    assert_eq!(d["data"]["status"], "completed");
    let results = d["data"]["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["type"] == "result")
        .count();
    assert_eq!(results, 1);
    gw.stop().await;
}

#[tokio::test]
async fn merchant_over_its_rate_gets_10003_and_others_do_not() {
    let (gw, api, _) = setup(|s| {
        s.http.rate_limit = 1;
        s.http.rate_burst = 3;
    })
    .await;
    let (other_id, other_secret) = gw.merchant("other").await;
    let other = Api::new(&gw, &other_id, &other_secret);
    let mut codes = Vec::new();
    for _ in 0..4 {
        codes.push(code(&api.get("/machines").await));
    }
    assert_eq!(codes, vec![0, 0, 0, 10003]);
    let v = api.get("/machines").await;
    assert_eq!(
        v,
        json!({"code": 10003, "message": "请求过于频繁", "data": {}})
    );
    assert_eq!(code(&other.get("/machines").await), 0);
    gw.stop().await;
}

#[tokio::test]
async fn out_trade_no_repeats_return_the_same_order_and_dispatch_once() {
    let (gw, api, ms) = setup(|_| {}).await;
    let sim = ready_sim(&gw, sim_config(&gw, M1, &ms)).await;
    let body = format!(
        r#"{{"machine_no":"{M1}","products":[{{"product_id":1,"quantity":1}}],"out_trade_no":"T-1"}}"#
    );
    let api = std::sync::Arc::new(api);
    let mut tasks = Vec::new();
    for _ in 0..32 {
        let a = api.clone();
        let b = body.clone();
        tasks.push(tokio::spawn(
            async move { a.post_raw("/orders", b).await.1 },
        ));
    }
    let mut ids = Vec::new();
    for t in tasks {
        ids.push(order_id(&t.await.unwrap()));
    }
    ids.dedup();
    assert_eq!(ids.len(), 1, "32 concurrent repeats, one order: {ids:?}");
    api.wait_status(ids[0], "completed").await;
    assert_eq!(sim.dispensed_orders(), vec![ids[0]], "dispatched once");
    let dispense_cmds = sim
        .journal()
        .iter()
        .filter(|e| matches!(e.event, JournalEvent::DispenseReceived(_)))
        .count();
    assert_eq!(dispense_cmds, 1);

    // Same key, different body: 40003. The Idempotency-Key header works too.
    let other = format!(
        r#"{{"machine_no":"{M1}","products":[{{"product_id":1,"quantity":2}}],"out_trade_no":"T-1"}}"#
    );
    let v = api.post_raw("/orders", other).await.1;
    assert_eq!(
        (code(&v), v["message"].as_str().unwrap()),
        (40003, "重复订单号")
    );
    let http = reqwest::Client::new();
    let keyed = || {
        http.post(format!("{}/orders", api.base))
            .header("Appid", &api.appid)
            .header("AppSecret", &api.secret)
            .header("Idempotency-Key", "K-9")
            .body(format!(
                r#"{{"machine_no":"{M1}","products":[{{"product_id":2,"quantity":1}}]}}"#
            ))
    };
    let a: Value = keyed().send().await.unwrap().json().await.unwrap();
    let b: Value = keyed().send().await.unwrap().json().await.unwrap();
    assert_eq!(order_id(&a), order_id(&b));
    gw.stop().await;
}

#[tokio::test]
async fn stock_follows_the_machines_snapshots_without_double_counting() {
    let (gw, api, ms) = setup(|_| {}).await;
    let sim = ready_sim(&gw, sim_config(&gw, M1, &ms)).await;
    for _ in 0..3 {
        let id = order_id_of(api.order(M1, &[(1, 1)]).await);
        api.wait_status(id, "completed").await;
    }
    // The machine reports 10 - 3 = 7 after its third dispense.
    wait_until("snapshot after the third dispense", || {
        gw.handle
            .orders
            .inventory
            .view(&m(M1))
            .first()
            .map(|s| (s.stock, s.reserved))
            == Some((7, 0))
    })
    .await;
    assert_eq!(
        sim.stock()
            .iter()
            .find(|i| i.product_id == 1)
            .map(|i| i.stock),
        Some(7)
    );
    gw.stop().await;
}
