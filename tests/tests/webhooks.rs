//! Webhooks end to end: a real HTTP receiver on loopback records what the
//! gateway's notifier POSTs (headers and body), and can fail, stall or be
//! absent; orders and presence changes come from simulated machines.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use hmac::{Hmac, Mac};
use rumqttc::QoS;
use serde_json::Value;
use sha2::Sha256;
use tokio_util::sync::CancellationToken;
use vendgate::secrets::{generate_secret, SecretHash};
use vendgate::storage::{NewMerchant, OutboxStatus};
use vendgate::Settings;
use vendgate_e2e::{hand_machine, ready_sim, sim_config, wait_until, Api, TestGateway};
use vendgate_sim::Behaviour;

const M1: &str = "30000001";
const M2: &str = "30000002";

/// One request the receiver got.
#[derive(Debug, Clone)]
struct Hit {
    headers: HeaderMap,
    body: String,
    json: Value,
    /// What the receiver answered (or will, for a stalled request).
    status: u16,
}

impl Hit {
    fn kind(&self) -> &str {
        self.json["type"].as_str().unwrap_or("")
    }

    fn event_id(&self) -> &str {
        self.json["event_id"].as_str().unwrap_or("")
    }

    fn order_id(&self) -> Option<u64> {
        self.json["data"]["order_id"].as_u64()
    }

    fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }
}

#[derive(Default)]
struct Recorded {
    hits: Vec<Hit>,
    /// Answer 500 to the first N attempts of every event.
    fail_first: usize,
    /// Answer 500 to everything.
    fail_all: bool,
    /// Hold each request this long (or until released) before answering.
    stall: Option<Duration>,
    started: usize,
    completed: usize,
    attempts: HashMap<String, usize>,
}

/// A webhook receiver on 127.0.0.1.
#[derive(Clone)]
struct Receiver {
    addr: SocketAddr,
    state: Arc<Mutex<Recorded>>,
    release: CancellationToken,
}

impl Receiver {
    async fn start() -> Self {
        let state = Arc::new(Mutex::new(Recorded::default()));
        let release = CancellationToken::new();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind receiver");
        let addr = listener.local_addr().expect("receiver address");
        let r = Self {
            addr,
            state,
            release,
        };
        let app = axum::Router::new().fallback(hook).with_state(r.clone());
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        r
    }

    fn url(&self) -> String {
        format!("http://{}/vendgate/hook?source=test", self.addr)
    }

    fn with<T>(&self, f: impl FnOnce(&mut Recorded) -> T) -> T {
        f(&mut self.state.lock().expect("receiver state"))
    }

    fn hits(&self) -> Vec<Hit> {
        self.with(|s| s.hits.clone())
    }

    /// Hits that were answered 2xx.
    fn delivered(&self) -> Vec<Hit> {
        self.hits()
            .into_iter()
            .filter(|h| (200..300).contains(&h.status))
            .collect()
    }

    fn delivered_of(&self, kind: &str) -> Vec<Hit> {
        self.delivered()
            .into_iter()
            .filter(|h| h.kind() == kind)
            .collect()
    }
}

async fn hook(State(r): State<Receiver>, headers: HeaderMap, body: String) -> StatusCode {
    let json: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
    let (status, stall) = r.with(|s| {
        s.started += 1;
        let id = json["event_id"].as_str().unwrap_or("").to_string();
        let n = s.attempts.entry(id).or_default();
        *n += 1;
        let status = if s.fail_all || *n <= s.fail_first {
            500
        } else {
            200
        };
        s.hits.push(Hit {
            headers,
            body: body.clone(),
            json: json.clone(),
            status,
        });
        (status, s.stall)
    });
    if let Some(d) = stall {
        tokio::select! {
            _ = tokio::time::sleep(d) => {}
            _ = r.release.cancelled() => {}
        }
    }
    r.with(|s| s.completed += 1);
    StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
}

/// Test timings: retries within milliseconds, private targets allowed (the
/// receiver is on loopback).
fn fast(s: &mut Settings) {
    s.notifier.allow_private_targets = true;
    s.notifier.backoff_base = Duration::from_millis(50);
    s.notifier.backoff_cap = Duration::from_millis(200);
    s.notifier.retry_for = Duration::from_secs(30);
    s.notifier.poll_interval = Duration::from_millis(50);
}

fn order_id(v: &Value) -> u64 {
    assert_eq!(v["code"], 0, "expected success: {v}");
    v["data"]["order_id"].as_u64().expect("order_id")
}

fn hmac_hex(key: &str, msg: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(key.as_bytes()).expect("any key length");
    mac.update(msg.as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

/// What a merchant's receiver does: parse `t=…,v1=…`, recompute the HMAC of
/// "t.body" with the AppSecret, and reject a stale `t`.
fn verify(hit: &Hit, app_secret: &str) {
    let sig = hit.header("vendgate-signature");
    let mut t = None;
    let mut v1 = None;
    for part in sig.split(',') {
        match part.split_once('=') {
            Some(("t", x)) => t = x.parse::<i64>().ok(),
            Some(("v1", x)) => v1 = Some(x.to_string()),
            _ => {}
        }
    }
    let (Some(t), Some(v1)) = (t, v1) else {
        panic!("malformed Vendgate-Signature {sig:?}");
    };
    assert_eq!(
        v1,
        hmac_hex(app_secret, &format!("{t}.{}", hit.body)),
        "{sig}"
    );
    assert_ne!(v1, hmac_hex("wrong", &format!("{t}.{}", hit.body)));
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let age = now - t;
    assert!((-5..300).contains(&age), "stale or future t: {age} s");
    assert_eq!(hit.header("vendgate-event-id"), hit.event_id());
    assert_eq!(hit.header("content-type"), "application/json");
}

async fn events(api: &Api, query: &str) -> Value {
    let v = api.get(&format!("/events{query}")).await;
    assert_eq!(v["code"], 0, "{v}");
    v["data"].clone()
}

#[tokio::test]
async fn order_events_are_signed_with_the_merchants_appsecret() {
    let rx = Receiver::start().await;
    let gw = TestGateway::start_with(fast).await;
    let (appid, secret) = gw.merchant_with_url("shop", &rx.url()).await;
    let ms = gw.machine(&appid, M1).await;
    let api = Api::new(&gw, &appid, &secret);
    let sim = ready_sim(&gw, sim_config(&gw, M1, &ms)).await;

    let done = order_id(&api.order(M1, &[(1, 2)]).await);
    sim.set_behaviour(Behaviour::Fail {
        error: "motor_jam".into(),
    });
    let failed = order_id(&api.order(M1, &[(1, 2), (2, 1)]).await);
    api.wait_status(failed, "failed").await;
    wait_until("both order events delivered", || {
        rx.delivered_of("order.completed").len() == 1
            && rx.delivered_of("order.dispense_failed").len() == 1
    })
    .await;

    let completed = &rx.delivered_of("order.completed")[0];
    verify(completed, &secret);
    let d = &completed.json["data"];
    assert_eq!(d["order_id"], done);
    assert_eq!(d["machine_no"], M1);
    assert_eq!(d["status"], "completed");
    assert_eq!(d["items"][0]["dispensed"], 2);
    assert!(completed.json["created_at"].is_string());

    let failure = &rx.delivered_of("order.dispense_failed")[0];
    verify(failure, &secret);
    let d = &failure.json["data"];
    assert_eq!(d["order_id"], failed);
    assert_eq!(d["status"], "failed");
    assert_eq!(d["error"], "motor_jam");
    assert_eq!(d["refund_amount"], 2 * 350 + 200);
    assert_eq!(
        d["items"][0],
        serde_json::json!({"product_id": 1, "quantity": 2, "dispensed": 0, "unit_price": 350})
    );
    // The signature is over the exact bytes sent, not a re-serialisation.
    assert!(rx.hits().iter().all(|h| h.body.starts_with('{')));

    // The merchant sees them as delivered (once the attempts are recorded,
    // just after the answers).
    vendgate_e2e::wait_until_async("both listed as delivered", || {
        let api = &api;
        async move {
            let list = api.get("/events?status=delivered").await;
            let kinds: Vec<String> = list["data"]["events"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .map(|e| e["type"].as_str().unwrap_or("").to_string())
                        .collect()
                })
                .unwrap_or_default();
            kinds.iter().any(|k| k == "order.completed")
                && kinds.iter().any(|k| k == "order.dispense_failed")
        }
    })
    .await;
    gw.stop().await;
}

#[tokio::test]
async fn failed_attempts_are_retried_until_a_2xx() {
    let rx = Receiver::start().await;
    rx.with(|s| s.fail_first = 3);
    let gw = TestGateway::start_with(fast).await;
    let (appid, secret) = gw.merchant_with_url("shop", &rx.url()).await;
    let ms = gw.machine(&appid, M1).await;
    let api = Api::new(&gw, &appid, &secret);
    let _sim = ready_sim(&gw, sim_config(&gw, M1, &ms)).await;

    let id = order_id(&api.order(M1, &[(1, 1)]).await);
    wait_until("delivered after three failures", || {
        rx.delivered_of("order.completed").len() == 1
    })
    .await;
    let tries: Vec<Hit> = rx
        .hits()
        .into_iter()
        .filter(|h| h.order_id() == Some(id))
        .collect();
    let statuses: Vec<u16> = tries.iter().map(|h| h.status).collect();
    assert_eq!(statuses, [500, 500, 500, 200]);
    // Every retry is the same event, byte for byte, freshly signed.
    assert!(tries.iter().all(|h| h.body == tries[0].body));
    for h in &tries {
        verify(h, &secret);
    }

    let event_id = tries[0].event_id().to_string();
    vendgate_e2e::wait_until_async("the last attempt recorded", || {
        let store = gw.handle.store.clone();
        async move {
            store
                .order_webhook_attempts(id)
                .await
                .map(|a| a.len() == 4)
                .unwrap_or(false)
        }
    })
    .await;
    let attempts = gw.handle.store.order_webhook_attempts(id).await.unwrap();
    let recorded: Vec<Option<u16>> = attempts.iter().map(|a| a.http_status).collect();
    assert_eq!(recorded, [Some(500), Some(500), Some(500), Some(200)]);
    assert_eq!(attempts[0].error.as_deref(), Some("http_500"));
    assert!(attempts.iter().all(|a| a.event_id == event_id));

    let list = events(&api, "?status=delivered").await;
    let ev = list["events"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["event_id"] == event_id.as_str())
        .cloned()
        .expect("listed");
    assert_eq!(ev["attempts"], 4);
    assert_eq!(ev["order_id"], id);
    assert!(ev.get("last_error").is_none(), "cleared on delivery: {ev}");
    gw.stop().await;
}

#[tokio::test]
async fn one_orders_events_arrive_in_order_while_the_merchant_fails() {
    let rx = Receiver::start().await;
    rx.with(|s| s.fail_all = true);
    let gw = TestGateway::start_with(|s| {
        fast(s);
        s.orders.dispense_timeout = Duration::from_millis(500);
    })
    .await;
    let (appid, secret) = gw.merchant_with_url("shop", &rx.url()).await;
    let ms = gw.machine(&appid, M1).await;
    let api = Api::new(&gw, &appid, &secret);
    // A hand-driven machine: accepts, stays silent past the deadline
    // (unknown), then reports late (completed).
    let mut mach = hand_machine(&gw, M1, &ms, 5, 100).await;
    let place = tokio::spawn(async move {
        let v = api.order(M1, &[(1, 2)]).await;
        (v, api)
    });
    let (_, payload, _) = mach.next_publish().await.expect("dispense command");
    let cmd: Value = serde_json::from_slice(&payload).unwrap();
    let id = cmd["order_id"].as_u64().unwrap();
    mach.client
        .publish(
            "vend/v1/30000001/ack",
            QoS::AtLeastOnce,
            false,
            format!(r#"{{"order_id":{id},"accepted":true}}"#),
        )
        .await
        .unwrap();
    let (v, api) = place.await.unwrap();
    assert_eq!(order_id(&v), id);
    api.wait_status(id, "unknown").await;
    wait_until("order.unknown attempted and refused", || {
        rx.hits()
            .iter()
            .filter(|h| h.kind() == "order.unknown")
            .count()
            >= 2
    })
    .await;
    // The late result settles the order: its event is written while
    // order.unknown is still failing.
    mach.client
        .publish(
            "vend/v1/30000001/result",
            QoS::AtLeastOnce,
            false,
            format!(
                r#"{{"order_id":{id},"items":[{{"product_id":1,"quantity":2,"dispensed":2}}]}}"#
            ),
        )
        .await
        .unwrap();
    api.wait_status(id, "completed").await;
    let unknown_tries = rx
        .hits()
        .iter()
        .filter(|h| h.kind() == "order.unknown")
        .count();
    wait_until("order.unknown retried after completed was written", || {
        rx.hits()
            .iter()
            .filter(|h| h.kind() == "order.unknown")
            .count()
            > unknown_tries + 1
    })
    .await;
    rx.with(|s| s.fail_all = false);
    wait_until("both delivered", || {
        rx.delivered_of("order.completed").len() == 1
    })
    .await;

    let of_order: Vec<Hit> = rx
        .hits()
        .into_iter()
        .filter(|h| h.order_id() == Some(id))
        .collect();
    // No attempt of the later event before the earlier one got its 2xx.
    let first_ok_unknown = of_order
        .iter()
        .position(|h| h.kind() == "order.unknown" && h.status == 200)
        .expect("order.unknown delivered");
    let first_completed = of_order
        .iter()
        .position(|h| h.kind() == "order.completed")
        .expect("order.completed attempted");
    assert!(
        first_ok_unknown < first_completed,
        "{:?}",
        of_order
            .iter()
            .map(|h| (h.kind().to_string(), h.status))
            .collect::<Vec<_>>()
    );
    let delivered: Vec<String> = rx
        .delivered()
        .iter()
        .filter(|h| h.order_id() == Some(id))
        .map(|h| h.kind().to_string())
        .collect();
    assert_eq!(delivered, ["order.unknown", "order.completed"]);
    let unknown = &rx.delivered_of("order.unknown")[0];
    assert_eq!(unknown.json["data"]["refund_amount"], 200);
    verify(unknown, &secret);
    gw.stop().await;
}

#[tokio::test]
async fn deliveries_survive_a_gateway_restart() {
    let rx = Receiver::start().await;
    rx.with(|s| s.fail_all = true);
    let gw = TestGateway::start_with(fast).await;
    let (appid, secret) = gw.merchant_with_url("shop", &rx.url()).await;
    let ms = gw.machine(&appid, M1).await;
    let api = Api::new(&gw, &appid, &secret);
    let sim = ready_sim(&gw, sim_config(&gw, M1, &ms)).await;
    let id = order_id(&api.order(M1, &[(1, 1)]).await);
    wait_until("order.completed attempted", || {
        rx.hits().iter().any(|h| h.order_id() == Some(id))
    })
    .await;
    sim.shutdown().await;

    let dir = gw.stop_keep_dir().await;
    let gw = TestGateway::start_in(dir, fast).await;
    let before = rx.hits().len();
    rx.with(|s| s.fail_all = false);
    wait_until("delivered by the new process", || {
        rx.delivered_of("order.completed").len() == 1
    })
    .await;
    assert!(rx.hits().len() > before);
    let hit = &rx.delivered_of("order.completed")[0];
    assert_eq!(hit.order_id(), Some(id));
    verify(hit, &secret);
    // The key file was kept: the new process signs with the same secret.
    assert!(gw.dir.path().join("webhook.key").exists());
    let api = Api::new(&gw, &appid, &secret);
    vendgate_e2e::wait_until_async("listed as delivered", || {
        let api = &api;
        async move {
            let list = api.get("/events?status=delivered").await;
            list["data"]["events"]
                .as_array()
                .is_some_and(|a| a.iter().any(|e| e["order_id"] == id))
        }
    })
    .await;
    gw.stop().await;
}

#[tokio::test]
async fn dead_letters_are_listed_and_replayed() {
    let rx = Receiver::start().await;
    rx.with(|s| s.fail_all = true);
    // A port nobody listens on: the merchant is down.
    let down = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let a = l.local_addr().unwrap();
        drop(l);
        a
    };
    let gw = TestGateway::start_with(|s| {
        fast(s);
        s.notifier.retry_for = Duration::from_secs(1);
    })
    .await;
    let (appid, secret) = gw.merchant_with_url("shop", &rx.url()).await;
    let (down_appid, down_secret) = gw
        .merchant_with_url("down", &format!("http://{down}/hook"))
        .await;
    let ms = gw.machine(&appid, M1).await;
    let ms2 = gw.machine(&down_appid, M2).await;
    let api = Api::new(&gw, &appid, &secret);
    let down_api = Api::new(&gw, &down_appid, &down_secret);
    let _sim = ready_sim(&gw, sim_config(&gw, M1, &ms)).await;
    let _sim2 = ready_sim(&gw, sim_config(&gw, M2, &ms2)).await;
    let id = order_id(&api.order(M1, &[(1, 1)]).await);

    let mut dead = Value::Null;
    for _ in 0..300 {
        dead = events(&api, "?status=dead").await;
        let has = dead["events"]
            .as_array()
            .is_some_and(|a| a.iter().any(|e| e["order_id"] == id));
        if has {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let ev = dead["events"]
        .as_array()
        .and_then(|a| a.iter().find(|e| e["order_id"] == id))
        .cloned()
        .unwrap_or_else(|| panic!("never dead: {dead}"));
    assert_eq!(ev["type"], "order.completed");
    assert_eq!(ev["status"], "dead");
    assert_eq!(ev["last_error"], "http_500");
    assert!(ev["attempts"].as_u64().unwrap_or(0) >= 2, "{ev}");
    assert!(ev.get("next_attempt_at").is_none());
    let event_id = ev["event_id"].as_str().unwrap().to_string();
    let tries_before = rx
        .hits()
        .iter()
        .filter(|h| h.event_id() == event_id)
        .count();

    // The down merchant's machine.online went dead with the connect error.
    vendgate_e2e::wait_until_async("down merchant's event dead", || {
        let down_api = &down_api;
        async move {
            let v = down_api.get("/events?status=dead").await;
            v["data"]["events"]
                .as_array()
                .is_some_and(|a| !a.is_empty())
        }
    })
    .await;
    let v = events(&down_api, "?status=dead").await;
    let down_ev = &v["events"][0];
    assert_eq!(down_ev["type"], "machine.online");
    assert_eq!(down_ev["machine_no"], M2);
    let err = down_ev["last_error"].as_str().unwrap_or("");
    assert_eq!(err, "connect_failed", "a category, no address");
    assert!(!err.contains(&down.to_string()), "URL left out: {err}");

    // Replay rules: only your own, only dead ones.
    let replay = |api: &Api, id: &str| {
        let path = format!("/events/{id}/replay");
        let api = Api::new(&gw, &api.appid, &api.secret);
        async move { api.post_raw(&path, "").await.1 }
    };
    assert_eq!(replay(&down_api, &event_id).await["code"], 40001);
    assert_eq!(replay(&api, "evt_nope").await["code"], 40001);
    // The merchant is back; the replayed event gets delivered.
    rx.with(|s| s.fail_all = false);
    let v = replay(&api, &event_id).await;
    assert_eq!(v["code"], 0, "{v}");
    assert_eq!(
        v["data"],
        serde_json::json!({"event_id": event_id, "status": "pending"})
    );
    assert_eq!(
        replay(&api, &event_id).await["code"],
        40002,
        "pending or delivered now"
    );
    wait_until("replayed event delivered", || {
        rx.delivered().iter().any(|h| h.event_id() == event_id)
    })
    .await;
    assert!(
        rx.hits()
            .iter()
            .filter(|h| h.event_id() == event_id)
            .count()
            > tries_before
    );
    verify(
        rx.delivered()
            .iter()
            .find(|h| h.event_id() == event_id)
            .unwrap(),
        &secret,
    );
    vendgate_e2e::wait_until_async("listed delivered", || {
        let api = &api;
        let event_id = &event_id;
        async move {
            let v = api.get("/events?status=delivered").await;
            v["data"]["events"]
                .as_array()
                .is_some_and(|a| a.iter().any(|e| e["event_id"] == event_id.as_str()))
        }
    })
    .await;
    assert_eq!(replay(&api, &event_id).await["code"], 40002, "delivered");

    // Listing: paging and parameter checks.
    let all = events(&api, "?page=1&page_size=1").await;
    assert_eq!(all["page_size"], 1);
    assert_eq!(all["events"].as_array().map(Vec::len), Some(1));
    assert!(all["total"].as_u64().unwrap_or(0) >= 2, "{all}");
    for bad in ["?status=lost", "?page=0", "?page_size=101", "?page=x"] {
        let v = api.get(&format!("/events{bad}")).await;
        assert_eq!(v["code"], 20001, "{bad}: {v}");
    }
    let v = Api::new(&gw, &appid, "wrong").get("/events").await;
    assert_eq!(v["code"], 10002);
    gw.stop().await;
}

#[tokio::test]
async fn a_slow_merchant_does_not_hold_up_another() {
    let slow = Receiver::start().await;
    slow.with(|s| s.stall = Some(Duration::from_secs(5)));
    let fast_rx = Receiver::start().await;
    let gw = TestGateway::start_with(|s| {
        fast(s);
        s.notifier.per_merchant_concurrency = 2;
    })
    .await;
    let (slow_id, slow_secret) = gw.merchant_with_url("slow", &slow.url()).await;
    let (fast_id, fast_secret) = gw.merchant_with_url("fast", &fast_rx.url()).await;
    let ms1 = gw.machine(&slow_id, M1).await;
    let ms2 = gw.machine(&fast_id, M2).await;
    let slow_api = Api::new(&gw, &slow_id, &slow_secret);
    let fast_api = Api::new(&gw, &fast_id, &fast_secret);

    // The slow merchant gets more events than it has delivery slots.
    let _s1 = ready_sim(&gw, sim_config(&gw, M1, &ms1)).await;
    for _ in 0..3 {
        let id = order_id(&slow_api.order(M1, &[(1, 1)]).await);
        slow_api.wait_status(id, "completed").await;
    }
    wait_until("the slow merchant's slots are taken", || {
        slow.with(|s| s.started) >= 2
    })
    .await;

    let _s2 = ready_sim(&gw, sim_config(&gw, M2, &ms2)).await;
    let id = order_id(&fast_api.order(M2, &[(1, 1)]).await);
    wait_until("the fast merchant's order event arrives", || {
        fast_rx.delivered().iter().any(|h| h.order_id() == Some(id))
    })
    .await;
    let (started, completed) = slow.with(|s| (s.started, s.completed));
    assert_eq!(completed, 0, "the slow merchant was still stuck");
    assert_eq!(
        started, 2,
        "never more than per_merchant_concurrency at once for one merchant"
    );
    slow.release.cancel();
    gw.stop().await;
}

#[tokio::test]
async fn machine_online_and_offline_events() {
    let rx = Receiver::start().await;
    let gw = TestGateway::start_with(fast).await;
    let (appid, secret) = gw.merchant_with_url("shop", &rx.url()).await;
    let (quiet, _) = gw.merchant("no url").await;
    let ms = gw.machine(&appid, M1).await;
    let ms2 = gw.machine(&quiet, M2).await;
    let sim = ready_sim(&gw, sim_config(&gw, M1, &ms)).await;
    let sim2 = ready_sim(&gw, sim_config(&gw, M2, &ms2)).await;
    wait_until("machine.online delivered", || {
        rx.delivered_of("machine.online").len() == 1
    })
    .await;
    sim.disconnect().await;
    sim2.disconnect().await;
    wait_until("machine.offline delivered", || {
        rx.delivered_of("machine.offline").len() == 1
    })
    .await;
    let on = &rx.delivered_of("machine.online")[0];
    verify(on, &secret);
    assert_eq!(on.json["data"]["machine_no"], M1);
    assert_eq!(on.json["data"]["online"], true);
    assert!(on.json["data"]["at"].is_string());
    let off = &rx.delivered_of("machine.offline")[0];
    verify(off, &secret);
    assert_eq!(
        off.json["data"]
            .as_object()
            .map(|o| o.keys().cloned().collect::<Vec<_>>()),
        Some(vec![
            "at".to_string(),
            "machine_no".into(),
            "online".into(),
            "reason".into()
        ])
    );
    assert_eq!(off.json["data"]["online"], false);
    assert_eq!(off.json["data"]["reason"], "clean");
    // In order, and nothing for the merchant without a notify_url.
    let kinds: Vec<String> = rx
        .delivered()
        .iter()
        .map(|h| h.kind().to_string())
        .collect();
    assert_eq!(kinds, ["machine.online", "machine.offline"]);
    let (list, total) = gw
        .handle
        .store
        .list_outbox(&quiet, None, 0, 10)
        .await
        .unwrap();
    assert!(list.is_empty() && total == 0);

    // A reconnect is a new online event.
    sim.revive();
    wait_until("back online", || {
        rx.delivered_of("machine.online").len() == 2
    })
    .await;
    gw.stop().await;
}

#[tokio::test]
async fn private_targets_are_refused_at_delivery() {
    let rx = Receiver::start().await;
    let gw = TestGateway::start_with(|s| {
        fast(s);
        s.notifier.allow_private_targets = false;
        s.notifier.retry_for = Duration::from_secs(1);
    })
    .await;
    let (literal, _) = gw.merchant_with_url("literal", &rx.url()).await;
    let by_name = format!("http://localhost:{}/hook", rx.addr.port());
    let (named, _) = gw.merchant_with_url("named", &by_name).await;
    let ms1 = gw.machine(&literal, M1).await;
    let ms2 = gw.machine(&named, M2).await;
    let _s1 = ready_sim(&gw, sim_config(&gw, M1, &ms1)).await;
    let _s2 = ready_sim(&gw, sim_config(&gw, M2, &ms2)).await;

    for (appid, want) in [(&literal, "blocked_address"), (&named, "blocked_address")] {
        let store = gw.handle.store.clone();
        let appid = appid.clone();
        vendgate_e2e::wait_until_async("refused events go dead", || {
            let store = store.clone();
            let appid = appid.clone();
            async move {
                store
                    .list_outbox(&appid, Some(OutboxStatus::Dead), 0, 10)
                    .await
                    .is_ok_and(|(l, _)| !l.is_empty())
            }
        })
        .await;
        let (dead, _) = store
            .list_outbox(&appid, Some(OutboxStatus::Dead), 0, 10)
            .await
            .unwrap();
        let err = dead[0].last_error.clone().unwrap_or_default();
        // A category only: the addresses are in the gateway's log.
        assert_eq!(err, want, "{appid}");
    }
    assert!(rx.hits().is_empty(), "nothing reached the private address");
    assert!(
        gw.handle
            .notifier
            .stats
            .refused_targets
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 2
    );
    gw.stop().await;
}

#[tokio::test]
async fn a_merchant_without_an_encrypted_secret_gets_dead_events_saying_why() {
    let rx = Receiver::start().await;
    let gw = TestGateway::start_with(fast).await;
    // As merchants were stored before webhook signing: hash only.
    let secret = generate_secret();
    gw.handle
        .store
        .create_merchant(NewMerchant {
            name: "old".into(),
            notify_url: Some(rx.url()),
            appid: "vgoldmerchant0001".into(),
            appsecret_hash: SecretHash::new(&secret),
            appsecret_enc: None,
        })
        .await
        .unwrap();
    let ms = gw.machine("vgoldmerchant0001", M1).await;
    let _sim = ready_sim(&gw, sim_config(&gw, M1, &ms)).await;
    let api = Api::new(&gw, "vgoldmerchant0001", &secret);
    vendgate_e2e::wait_until_async("its event is dead", || {
        let api = &api;
        async move {
            let v = api.get("/events?status=dead").await;
            v["data"]["total"] == 1
        }
    })
    .await;
    let v = events(&api, "?status=dead").await;
    let ev = &v["events"][0];
    assert_eq!(ev["type"], "machine.online");
    assert_eq!(ev["attempts"], 1, "dead at once: retrying cannot help");
    let err = ev["last_error"].as_str().unwrap_or("");
    assert!(
        err.starts_with("cannot sign: the merchant has no encrypted AppSecret"),
        "{err}"
    );
    assert!(rx.hits().is_empty(), "nothing unsigned was sent");
    gw.stop().await;
}

#[tokio::test]
async fn a_partially_dispensed_order_is_notified_with_the_shortfall_owed() {
    let rx = Receiver::start().await;
    let gw = TestGateway::start_with(fast).await;
    let (appid, secret) = gw.merchant_with_url("shop", &rx.url()).await;
    let ms = gw.machine(&appid, M1).await;
    let api = Api::new(&gw, &appid, &secret);
    let sim = ready_sim(&gw, sim_config(&gw, M1, &ms)).await;
    sim.set_behaviour(Behaviour::Partial {
        error: "motor_jam".into(),
    });

    let id = order_id(&api.order(M1, &[(1, 2), (2, 1)]).await);
    api.wait_status(id, "partially_dispensed").await;
    wait_until("order.partially_dispensed delivered", || {
        rx.delivered_of("order.partially_dispensed").len() == 1
    })
    .await;
    let hit = &rx.delivered_of("order.partially_dispensed")[0];
    verify(hit, &secret);
    let d = &hit.json["data"];
    assert_eq!(d["order_id"], id);
    assert_eq!(d["status"], "partially_dispensed");
    assert_eq!(d["error"], "motor_jam");
    // Half of each line, rounded down: 1 of 2 × 350 out, 0 of 1 × 200.
    assert_eq!(d["amount"], 2 * 350 + 200);
    assert_eq!(d["refund_amount"], 350 + 200);
    assert_eq!(d["items"][0]["dispensed"], 1);
    assert_eq!(d["items"][1]["dispensed"], 0);
    // The only order event: no order.completed or dispense_failed beside it.
    let kinds: Vec<String> = rx
        .delivered()
        .iter()
        .filter(|h| h.order_id() == Some(id))
        .map(|h| h.kind().to_string())
        .collect();
    assert_eq!(kinds, ["order.partially_dispensed"]);
    gw.stop().await;
}

#[tokio::test]
async fn an_unpaid_order_that_expires_is_notified() {
    let rx = Receiver::start().await;
    let gw = TestGateway::start_with(|s| {
        fast(s);
        s.orders.unpaid_timeout = Duration::from_millis(300);
    })
    .await;
    let (appid, secret) = gw.merchant_with_url("shop", &rx.url()).await;
    let ms = gw.machine(&appid, M1).await;
    let api = Api::new(&gw, &appid, &secret);
    let sim = ready_sim(&gw, sim_config(&gw, M1, &ms)).await;

    let body = serde_json::json!({
        "machine_no": M1,
        "products": [{ "product_id": 1, "quantity": 2 }],
        "pay_later": true,
    });
    let id = order_id(&api.post_raw("/orders", body.to_string()).await.1);
    api.wait_status(id, "expired").await;
    wait_until("order.expired delivered", || {
        rx.delivered_of("order.expired").len() == 1
    })
    .await;
    let hit = &rx.delivered_of("order.expired")[0];
    verify(hit, &secret);
    let d = &hit.json["data"];
    assert_eq!(d["order_id"], id);
    assert_eq!(d["machine_no"], M1);
    assert_eq!(d["status"], "expired");
    // Nothing was paid or dispensed, so nothing is owed.
    assert_eq!(d["refund_amount"], 0);
    assert_eq!(d["items"][0]["dispensed"], 0);
    assert!(sim.dispensed_orders().is_empty());
    gw.stop().await;
}

// ---------------------------------------------------------------------------
// The README's verification examples in Go and PHP (docs/examples/), run as
// a merchant would run them, against a real signed delivery.

const REPO: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
const GO_EXAMPLE: &str = "docs/examples/verify_webhook.go";
const PHP_EXAMPLE: &str = "docs/examples/verify_webhook.php";

/// The README shows each example file whole, so what is tested is what
/// merchants copy.
#[test]
fn the_readme_shows_the_example_files_verbatim() {
    let readme = std::fs::read_to_string(format!("{REPO}/README.md")).expect("README.md");
    for file in [GO_EXAMPLE, PHP_EXAMPLE] {
        let text = std::fs::read_to_string(format!("{REPO}/{file}")).expect(file);
        assert!(
            readme.contains(&text),
            "README.md must contain {file} verbatim (copy the file into its code block)"
        );
    }
}

/// One delivered, signed `order.completed`: (AppSecret, Vendgate-Signature,
/// body exactly as received).
async fn a_signed_delivery() -> (String, String, String) {
    let rx = Receiver::start().await;
    let gw = TestGateway::start_with(fast).await;
    let (appid, secret) = gw.merchant_with_url("shop", &rx.url()).await;
    let ms = gw.machine(&appid, M1).await;
    let api = Api::new(&gw, &appid, &secret);
    let sim = ready_sim(&gw, sim_config(&gw, M1, &ms)).await;
    order_id(&api.order(M1, &[(1, 1)]).await);
    wait_until("order.completed delivered", || {
        rx.delivered_of("order.completed").len() == 1
    })
    .await;
    let hit = rx.delivered_of("order.completed").remove(0);
    verify(&hit, &secret);
    sim.shutdown().await;
    gw.stop().await;
    let sig = hit.header("vendgate-signature").to_string();
    (secret, sig, hit.body)
}

/// Runs `program args… APPSECRET SIGNATURE` with `body` on stdin; whether it
/// accepted (exit status 0).
async fn example_accepts(
    program: &std::path::Path,
    args: &[&str],
    envs: &[(&str, std::ffi::OsString)],
    secret: &str,
    signature: &str,
    body: &str,
) -> bool {
    use tokio::io::AsyncWriteExt;
    let mut child = tokio::process::Command::new(program)
        .current_dir(REPO)
        .args(args)
        .args([secret, signature])
        .envs(envs.iter().map(|(k, v)| (*k, v)))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("running {}: {e}", program.display()));
    let mut stdin = child.stdin.take().expect("stdin");
    stdin
        .write_all(body.as_bytes())
        .await
        .expect("writing the body");
    drop(stdin);
    // Generous: the first `go run` compiles the standard library packages
    // it uses into an empty cache.
    let out = tokio::time::timeout(Duration::from_secs(300), child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("{} {args:?} did not finish", program.display()))
        .expect("waiting for the example");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    // (`go run` adds its own "exit status 1" line.)
    match out.status.code() {
        Some(0) => assert_eq!(stdout.trim(), "verified", "{stderr}"),
        Some(1) => assert!(stderr.starts_with("rejected\n"), "{stdout}\n{stderr}"),
        _ => panic!(
            "{} {args:?}: {}\n{stdout}\n{stderr}",
            program.display(),
            out.status
        ),
    }
    out.status.success()
}

/// The example accepts the genuine delivery and rejects a tampered body, the
/// wrong AppSecret, a stale timestamp (correctly signed) and a malformed
/// header.
async fn check_example(
    program: &std::path::Path,
    args: &[&str],
    envs: &[(&str, std::ffi::OsString)],
) {
    let (secret, sig, body) = a_signed_delivery().await;
    let run = |secret: String, sig: String, body: String| async move {
        example_accepts(program, args, envs, &secret, &sig, &body).await
    };
    assert!(
        run(secret.clone(), sig.clone(), body.clone()).await,
        "the genuine delivery was rejected: {sig} {body}"
    );
    let tampered = body.replacen("\"dispensed\":1", "\"dispensed\":2", 1);
    assert_ne!(tampered, body);
    assert!(
        !run(secret.clone(), sig.clone(), tampered).await,
        "tampered body"
    );
    assert!(
        !run("wrong".into(), sig.clone(), body.clone()).await,
        "wrong AppSecret"
    );
    let old = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs()
        - 600;
    let stale = format!("t={old},v1={}", hmac_hex(&secret, &format!("{old}.{body}")));
    assert!(!run(secret.clone(), stale, body.clone()).await, "stale t");
    assert!(
        !run(secret.clone(), "v1=00".into(), body.clone()).await,
        "no t"
    );
}

#[tokio::test]
async fn the_go_example_verifies_a_real_delivery() {
    let go =
        vendgate_testkit::require_tool("go", "the Go webhook example's test", "golang php-cli");
    // No network and nothing outside a temp dir: GOPATH mode for one
    // standard-library file, a private build cache, no proxy.
    let home = tempfile::tempdir().expect("temp dir");
    let envs = [
        ("HOME", home.path().into()),
        ("GOCACHE", home.path().join("cache").into()),
        ("GOPATH", home.path().join("gopath").into()),
        ("GO111MODULE", "off".into()),
        ("GOFLAGS", "".into()),
        ("GOPROXY", "off".into()),
        ("GOTOOLCHAIN", "local".into()),
        ("CGO_ENABLED", "0".into()),
    ];
    check_example(&go, &["run", GO_EXAMPLE], &envs).await;
}

#[tokio::test]
async fn the_php_example_verifies_a_real_delivery() {
    let php =
        vendgate_testkit::require_tool("php", "the PHP webhook example's test", "golang php-cli");
    check_example(&php, &[PHP_EXAMPLE], &[]).await;
}
