//! The merchant API beyond placing orders, end to end over real sockets:
//! listing and searching orders, cancelling an unpaid order, the
//! merchant's own settings, pinging a machine, and the envelope for a wrong
//! method. `pg_merchant_api` runs the same tests on PostgreSQL.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use vendgate_e2e::{ready_sim, sim_config, wait_until, Api, TestGateway};
use vendgate_proto::machine::MachineNo;

const M1: &str = "60000001";
const M2: &str = "60000002";

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

async fn setup(tune: impl FnOnce(&mut vendgate::Settings)) -> (TestGateway, Api, String) {
    let gw = TestGateway::start_with(tune).await;
    let (appid, secret) = gw.merchant("shop").await;
    let ms = gw.machine(&appid, M1).await;
    let api = Api::new(&gw, &appid, &secret);
    (gw, api, ms)
}

/// Another merchant with machine M2 (never connected).
async fn other_merchant(gw: &TestGateway) -> Api {
    let (appid, secret) = gw.merchant("rival").await;
    gw.machine(&appid, M2).await;
    Api::new(gw, &appid, &secret)
}

async fn pay_later(api: &Api, q: u32, out_trade_no: Option<&str>) -> Value {
    let mut body = json!({ "machine_no": M1, "products": [{ "product_id": 1, "quantity": q }], "pay_later": true });
    if let Some(o) = out_trade_no {
        body["out_trade_no"] = json!(o);
    }
    api.post_raw("/orders", body.to_string()).await.1
}

async fn send(api: &Api, method: reqwest::Method, path: &str, body: &str) -> (u16, Value) {
    let r = api
        .http
        .request(method, format!("{}{path}", api.base))
        .header("Appid", &api.appid)
        .header("AppSecret", &api.secret)
        .body(body.to_string())
        .send()
        .await
        .expect("request");
    let status = r.status().as_u16();
    (status, r.json().await.expect("JSON envelope"))
}

fn ids(v: &Value) -> Vec<u64> {
    v["data"]["orders"]
        .as_array()
        .map(|a| a.iter().map(|o| o["order_id"].as_u64().unwrap()).collect())
        .unwrap_or_default()
}

/// `data.total`, 0 when left out (the envelope omits zeros).
fn total(v: &Value) -> u64 {
    assert_eq!(code(v), 0, "{v}");
    v["data"]["total"].as_u64().unwrap_or(0)
}

#[tokio::test]
async fn orders_are_listed_newest_first_filtered_and_paged() {
    let (gw, api, ms) = setup(|_| {}).await;
    let _sim = ready_sim(&gw, sim_config(&gw, M1, &ms)).await;
    let rival = other_merchant(&gw).await;
    // Five orders a few milliseconds apart: 1 and 4 paid now, the others
    // reserved and unpaid.
    let mut placed = Vec::new();
    for (i, later) in [false, true, true, false, true].into_iter().enumerate() {
        let id = if later {
            order_id(&pay_later(&api, 1, Some(&format!("T-{i}"))).await)
        } else {
            let id = order_id(&api.order(M1, &[(1, 1)]).await);
            api.wait_status(id, "completed").await;
            id
        };
        placed.push(id);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let newest_first: Vec<u64> = placed.iter().rev().copied().collect();

    let all = api.get("/orders").await;
    assert_eq!(ids(&all), newest_first, "{all}");
    assert_eq!(total(&all), 5);
    assert_eq!(
        (&all["data"]["page"], &all["data"]["page_size"]),
        (&json!(1), &json!(20))
    );
    // Each entry is GET /orders/{id} without its timeline.
    for entry in all["data"]["orders"].as_array().unwrap() {
        let id = entry["order_id"].as_u64().unwrap();
        let mut one = api.get(&format!("/orders/{id}")).await["data"].clone();
        let one = one.as_object_mut().unwrap();
        assert!(one.remove("events").is_some());
        one.remove("events_dropped");
        assert_eq!(entry, &Value::Object(one.clone()));
    }

    let page = api.get("/orders?page=2&page_size=2").await;
    assert_eq!(ids(&page), newest_first[2..4].to_vec());
    assert_eq!(
        (
            total(&page),
            &page["data"]["page"],
            &page["data"]["page_size"]
        ),
        (5, &json!(2), &json!(2))
    );
    let past_end = api.get("/orders?page=9&page_size=2").await;
    assert_eq!((ids(&past_end), total(&past_end)), (vec![], 5));

    let unpaid = api.get("/orders?status=awaiting_payment").await;
    assert_eq!(ids(&unpaid), vec![placed[4], placed[2], placed[1]]);
    let done = api
        .get(&format!("/orders?status=completed&machine_no={M1}"))
        .await;
    assert_eq!(ids(&done), vec![placed[3], placed[0]]);
    let by_otn = api.get("/orders?out_trade_no=T-2").await;
    assert_eq!((ids(&by_otn), total(&by_otn)), (vec![placed[2]], 1));

    // from is inclusive, to exclusive: [from, to) ranges never overlap.
    let created = |id: u64| {
        let v = all["data"]["orders"]
            .as_array()
            .unwrap()
            .iter()
            .find(|o| o["order_id"] == id)
            .unwrap()["created_at"]
            .as_str()
            .unwrap()
            .to_string();
        v.replace('+', "%2B")
    };
    let from = api
        .get(&format!("/orders?from={}", created(placed[2])))
        .await;
    assert_eq!(ids(&from), vec![placed[4], placed[3], placed[2]]);
    let to = api.get(&format!("/orders?to={}", created(placed[2]))).await;
    assert_eq!(ids(&to), vec![placed[1], placed[0]]);
    let both = api
        .get(&format!(
            "/orders?from={}&to={}",
            created(placed[1]),
            created(placed[3])
        ))
        .await;
    assert_eq!(ids(&both), vec![placed[2], placed[1]]);
    // Offsets other than Z are understood.
    let far = api.get("/orders?from=2999-01-01T08:00:00%2B08:00").await;
    assert_eq!(total(&far), 0);

    // Isolation: the rival sees none of them, and its machine filter finds
    // nothing here; ours finds nothing there.
    let theirs = rival.get("/orders").await;
    assert_eq!((ids(&theirs), total(&theirs)), (vec![], 0));
    assert_eq!(
        total(&rival.get(&format!("/orders?machine_no={M1}")).await),
        0
    );
    assert_eq!(
        total(&api.get(&format!("/orders?machine_no={M2}")).await),
        0
    );
    assert_eq!(total(&rival.get("/orders?out_trade_no=T-2").await), 0);

    for bad in [
        "page=0",
        "page=x",
        "page_size=0",
        "page_size=101",
        "from=yesterday",
        "to=2026-13-01T00:00:00Z",
        "from=2026-01-02T00:00:00Z&to=2026-01-01T00:00:00Z",
        "status=paid",
        "status=",
        "out_trade_no=",
    ] {
        let v = api.get(&format!("/orders?{bad}")).await;
        assert_eq!(
            v,
            json!({"code": 20001, "message": "参数错误", "data": {}}),
            "{bad}"
        );
    }
    let long = "x".repeat(65);
    assert_eq!(
        code(&api.get(&format!("/orders?out_trade_no={long}")).await),
        20001
    );
    for bad in ["1234567", "1234567a", ""] {
        let v = api.get(&format!("/orders?machine_no={bad}")).await;
        assert_eq!(code(&v), 20002, "{bad}");
    }
    assert_eq!(ids(&api.get("/orders?page_size=100").await).len(), 5);
    gw.stop().await;
}

#[tokio::test]
async fn cancel_frees_the_stock_at_once_and_only_once() {
    let (gw, api, ms) = setup(|_| {}).await;
    let mut c = sim_config(&gw, M1, &ms);
    c.inventory[0].stock = 1;
    let sim = ready_sim(&gw, c).await;
    let rival = other_merchant(&gw).await;

    let id = order_id(&pay_later(&api, 1, None).await);
    // The last unit is held.
    assert_eq!(code(&api.order(M1, &[(1, 1)]).await), 30004);
    let path = format!("/orders/{id}/cancel");
    // Another merchant's order answers as if absent; so does an unknown one.
    assert_eq!(
        rival.post_raw(&path, "").await.1,
        json!({"code": 40001, "message": "订单不存在", "data": {}})
    );
    assert_eq!(code(&api.post_raw("/orders/777/cancel", "").await.1), 40001);
    assert_eq!(code(&api.post_raw("/orders/x/cancel", "").await.1), 40001);

    let v = api.post_raw(&path, "").await.1;
    assert_eq!(
        v,
        json!({"code": 0, "message": "ok", "data": {"order_id": id, "status": "cancelled"}})
    );
    assert_eq!(gw.handle.orders.inventory.reserved_total(&m(M1)), 0);
    // Free at once: a new order takes the last unit.
    let next = order_id(&api.order(M1, &[(1, 1)]).await);
    api.wait_status(next, "completed").await;
    // Paying or cancelling again is a state conflict.
    assert_eq!(
        code(&api.post_raw(&format!("/orders/{id}/pay"), "").await.1),
        40002
    );
    assert_eq!(code(&api.post_raw(&path, "").await.1), 40002);
    // An order paid on placing cannot be cancelled.
    assert_eq!(
        code(&api.post_raw(&format!("/orders/{next}/cancel"), "").await.1),
        40002
    );
    let d = api.get(&format!("/orders/{id}")).await["data"].clone();
    assert_eq!(d["status"], "cancelled");
    assert!(d.get("pay_deadline").is_none() && d.get("refund_amount").is_none());
    let kinds: Vec<&str> = d["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["type"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, vec!["created", "cancelled"]);
    assert_eq!(
        sim.dispensed_orders(),
        vec![next],
        "nothing of the cancelled order came out"
    );
    let listed = api.get("/orders?status=cancelled").await;
    assert_eq!(ids(&listed), vec![id]);
    gw.stop().await;
}

#[tokio::test]
async fn cancel_racing_payment_and_expiry_has_exactly_one_winner() {
    let (gw, api, ms) = setup(|s| {
        s.orders.unpaid_timeout = Duration::from_millis(400);
        s.orders.max_unpaid_per_machine = 100;
        s.orders.queue_depth = 32;
    })
    .await;
    let mut c = sim_config(&gw, M1, &ms);
    c.inventory[0].stock = 100;
    let sim = ready_sim(&gw, c).await;
    let api = Arc::new(api);
    let mut orders = Vec::new();
    for _ in 0..8 {
        orders.push(order_id(&pay_later(&api, 1, None).await));
    }
    // Each order is paid and cancelled at once, around its expiry.
    let mut tasks = Vec::new();
    for (i, id) in orders.iter().copied().enumerate() {
        let (a, b) = (api.clone(), api.clone());
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300 + 15 * i as u64)).await;
            let pay = async { code(&a.post_raw(&format!("/orders/{id}/pay"), "").await.1) };
            let cancel = async { code(&b.post_raw(&format!("/orders/{id}/cancel"), "").await.1) };
            let (p, c) = tokio::join!(pay, cancel);
            (id, p, c)
        }));
    }
    for t in tasks {
        let (id, pay, cancel) = t.await.unwrap();
        assert!(
            (pay == 0) as u8 + (cancel == 0) as u8 <= 1,
            "order {id}: pay {pay}, cancel {cancel}"
        );
        assert!(pay == 0 || pay == 40002, "pay answered {pay}");
        assert!(cancel == 0 || cancel == 40002, "cancel answered {cancel}");
        let want = match (pay, cancel) {
            (0, _) => "completed",
            (_, 0) => "cancelled",
            _ => "expired",
        };
        api.wait_status(id, want).await;
        assert_eq!(sim.dispensed_orders().contains(&id), pay == 0, "order {id}");
    }
    wait_until("every reservation released once", || {
        gw.handle.orders.inventory.reserved_total(&m(M1)) == 0
    })
    .await;
    gw.stop().await;
}

#[tokio::test]
async fn merchant_settings_round_trip_with_checked_urls() {
    let (gw, api, _ms) = setup(|_| {}).await;
    let rival = other_merchant(&gw).await;
    let put = |body: &'static str| {
        let api = api.clone();
        async move { send(&api, reqwest::Method::PUT, "/merchant", body).await.1 }
    };
    assert_eq!(
        api.get("/merchant").await,
        json!({"code": 0, "message": "ok", "data": {"appid": api.appid, "name": "shop"}})
    );
    let v = put(r#"{"notify_url": "https://hooks.example/vend?x=1"}"#).await;
    assert_eq!(
        v["data"],
        json!({"appid": api.appid, "name": "shop", "notify_url": "https://hooks.example/vend?x=1"})
    );
    assert_eq!(api.get("/merchant").await["data"], v["data"]);
    let stored = gw.handle.store.merchant(&api.appid).await.unwrap().unwrap();
    assert_eq!(
        stored.notify_url.as_deref(),
        Some("https://hooks.example/vend?x=1")
    );
    // The rival's settings are its own.
    assert_eq!(
        rival.get("/merchant").await["data"]["appid"],
        json!(rival.appid)
    );
    assert!(rival.get("/merchant").await["data"]
        .get("notify_url")
        .is_none());

    // Refused as delivery would refuse them (no DNS needed), nothing changed.
    for bad in [
        r#"{"notify_url": "http://127.0.0.1:8080/hook"}"#,
        r#"{"notify_url": "http://169.254.169.254/latest"}"#,
        r#"{"notify_url": "http://[::1]/"}"#,
        r#"{"notify_url": "http://10.1.2.3/"}"#,
        r#"{"notify_url": "ftp://hooks.example/"}"#,
        r#"{"notify_url": "hooks.example"}"#,
        r#"{"notify_url": 7}"#,
        r#"{}"#,
        "not json",
    ] {
        assert_eq!(
            put(bad).await,
            json!({"code": 20001, "message": "参数错误", "data": {}}),
            "{bad}"
        );
    }
    assert_eq!(
        api.get("/merchant").await["data"]["notify_url"],
        "https://hooks.example/vend?x=1"
    );
    // null and "" clear it.
    for clear in [r#"{"notify_url": null}"#, r#"{"notify_url": ""}"#] {
        let v = put(clear).await;
        assert_eq!(
            v["data"],
            json!({"appid": api.appid, "name": "shop"}),
            "{clear}"
        );
        let stored = gw.handle.store.merchant(&api.appid).await.unwrap().unwrap();
        assert!(stored.notify_url.is_none());
    }
    // Without credentials: the usual 10001.
    let anon = Api::new(&gw, "", "");
    assert_eq!(code(&anon.get("/merchant").await), 10001);
    gw.stop().await;
}

#[tokio::test]
async fn ping_measures_the_round_trip_of_the_callers_machine() {
    let (gw, api, ms) = setup(|_| {}).await;
    let rival = other_merchant(&gw).await;
    let path = format!("/machines/{M1}/ping");
    assert_eq!(
        api.post_raw(&path, "").await.1,
        json!({"code": 30002, "message": "设备已离线", "data": {}})
    );
    let sim = ready_sim(&gw, sim_config(&gw, M1, &ms)).await;
    let v = api.post_raw(&path, "").await.1;
    assert_eq!(code(&v), 0, "{v}");
    assert_eq!(v["data"]["machine_no"], M1);
    let rtt = v["data"]["rtt_ms"].as_u64().expect("rtt_ms");
    assert!((1..2_000).contains(&rtt), "{v}");
    let machine = api.get(&format!("/machines/{M1}")).await;
    assert!(
        machine["data"]["last_rtt_ms"]
            .as_u64()
            .is_some_and(|r| r >= 1),
        "{machine}"
    );
    // Another merchant's machine and an unknown one look alike.
    let foreign = rival.post_raw(&path, "").await.1;
    assert_eq!(
        foreign,
        json!({"code": 30001, "message": "设备不存在", "data": {}})
    );
    assert_eq!(api.post_raw("/machines/69999999/ping", "").await.1, foreign);
    assert_eq!(
        code(&api.post_raw(&format!("/machines/{M2}/ping"), "").await.1),
        30001
    );
    assert_eq!(
        code(&api.post_raw("/machines/6000000/ping", "").await.1),
        20002
    );
    sim.shutdown().await;
    wait_until("offline", || !gw.online(M1)).await;
    assert_eq!(code(&api.post_raw(&path, "").await.1), 30002);
    gw.stop().await;
}

#[tokio::test]
async fn wrong_methods_answer_the_envelope() {
    for mirror in [false, true] {
        let gw = TestGateway::start_with(|s| {
            if mirror {
                s.http.http_status = vendgate::config::HttpStatusMode::Mirror;
            }
        })
        .await;
        let (appid, secret) = gw.merchant("shop").await;
        let api = Api::new(&gw, &appid, &secret);
        use reqwest::Method;
        for (method, path) in [
            (Method::DELETE, "/orders"),
            (Method::PUT, "/orders/1"),
            (Method::GET, "/orders/1/cancel"),
            (Method::GET, "/orders/1/pay"),
            (Method::PATCH, "/machines"),
            (Method::GET, "/machines/60000001/ping"),
            (Method::POST, "/merchant"),
            (Method::DELETE, "/events"),
        ] {
            let (status, v) = send(&api, method.clone(), path, "").await;
            assert_eq!(
                v,
                json!({"code": 20001, "message": "参数错误", "data": {}}),
                "{method} {path}"
            );
            assert_eq!(status, if mirror { 405 } else { 200 }, "{method} {path}");
        }
        // The 405 still says which methods the path takes.
        let r = api
            .http
            .delete(format!("{}/orders", api.base))
            .send()
            .await
            .unwrap();
        let allow = r
            .headers()
            .get("allow")
            .map(|h| h.to_str().unwrap().to_string());
        let allow = allow.expect("Allow header");
        assert!(allow.contains("GET") && allow.contains("POST"), "{allow}");
        gw.stop().await;
    }
}
