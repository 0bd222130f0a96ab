//! Order truth: what the merchant is told and what the machine does always
//! agree (two-phase dispense, end-to-end deadlines, no outcome dropped).
//! Real sockets, the real simulator, a real database (SQLite here, and
//! PostgreSQL through `pg_order_truth.rs`).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use serde_json::Value;
use tokio::time::Instant;
use vendgate_e2e::*;
use vendgate_proto::machine::MachineNo;
use vendgate_sim::journal::JournalEvent;
use vendgate_sim::Behaviour;
use vendgate_testkit::relay::Relay;

const M1: &str = "30000001";
const M2: &str = "30000002";

fn code(v: &Value) -> i64 {
    v["code"].as_i64().expect("code")
}

fn m(s: &str) -> MachineNo {
    s.parse().expect("machine_no")
}

/// Short order deadlines so the tests run in seconds: a machine has 1 s to
/// accept, every request is answered within 2 s.
fn quick(s: &mut vendgate::Settings) {
    s.orders.accept_timeout = Duration::from_secs(1);
    s.orders.request_timeout = Duration::from_secs(2);
    s.notifier.allow_private_targets = true;
    s.notifier.backoff_base = Duration::from_millis(50);
    s.notifier.backoff_cap = Duration::from_millis(200);
    s.notifier.poll_interval = Duration::from_millis(50);
}

/// Webhook bodies a merchant received, in arrival order.
#[derive(Clone, Default)]
struct Hooks(Arc<Mutex<Vec<Value>>>);

impl Hooks {
    async fn start() -> (Self, String) {
        let hooks = Self::default();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind receiver");
        let url = format!("http://{}/hook", listener.local_addr().expect("addr"));
        let app = axum::Router::new()
            .fallback(|State(h): State<Hooks>, body: String| async move {
                let v: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
                h.0.lock().expect("hooks").push(v);
                StatusCode::OK
            })
            .with_state(hooks.clone());
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        (hooks, url)
    }

    fn of(&self, order_id: u64, kind: &str) -> Vec<Value> {
        self.0
            .lock()
            .expect("hooks")
            .iter()
            .filter(|v| v["type"] == kind && v["data"]["order_id"] == order_id)
            .cloned()
            .collect()
    }

    async fn wait(&self, order_id: u64, kind: &str) -> Value {
        wait_until(&format!("webhook {kind} for {order_id}"), || {
            !self.of(order_id, kind).is_empty()
        })
        .await;
        self.of(order_id, kind).remove(0)
    }
}

/// A gateway with one merchant (webhooks to `hooks`) and its machine `M1`
/// simulated behind a relay, ready for orders.
struct Setup {
    gw: TestGateway,
    api: Api,
    relay: Relay,
    sim: vendgate_sim::SimHandle,
    hooks: Hooks,
}

async fn setup(
    tune: impl FnOnce(&mut vendgate::Settings),
    sim: impl FnOnce(&mut vendgate_sim::SimConfig),
) -> Setup {
    let gw = TestGateway::start_with(|s| {
        quick(s);
        tune(s);
    })
    .await;
    let (hooks, url) = Hooks::start().await;
    let (appid, secret) = gw.merchant_with_url("truth", &url).await;
    let ms = gw.machine(&appid, M1).await;
    let api = Api::new(&gw, &appid, &secret);
    let relay = Relay::start(gw.mqtt_addr).await;
    let mut c = sim_config(&gw, M1, &ms);
    c.gateway = relay.gateway();
    sim(&mut c);
    let sim = ready_sim(&gw, c).await;
    Setup {
        gw,
        api,
        relay,
        sim,
        hooks,
    }
}

fn order_id_of(v: &Value) -> u64 {
    v["data"]["order_id"].as_u64().expect("order_id")
}

/// The order the gateway stored for `M1` most recently (the merchant's
/// answer to a 30002 carries no id).
async fn last_order(gw: &TestGateway) -> vendgate::storage::StoredOrder {
    let mut open = gw
        .handle
        .store
        .orders_in_status(&[
            vendgate::domain::order::Status::Rejected,
            vendgate::domain::order::Status::Dispatching,
        ])
        .await
        .expect("orders");
    open.sort_by_key(|o| o.created_at);
    open.pop().expect("an order was stored")
}

fn received_dispense(j: &[vendgate_sim::journal::JournalEntry], id: u64) -> bool {
    j.iter()
        .any(|e| matches!(&e.event, JournalEvent::DispenseReceived(c) if c.order_id == id))
}

/// A dispense held on a stalled link reaches the machine after the merchant
/// was told 30002: the machine acks and holds it, but the gateway's
/// acceptance compare-and-set finds the order given up, so it cancels and
/// no `go` ever leaves. The machine never dispenses; the order stays
/// `rejected`.
#[tokio::test]
async fn a_dispense_delivered_late_after_30002_is_never_dispensed() {
    let s = setup(|_| {}, |_| {}).await;
    s.relay.pause();
    let started = Instant::now();
    let v = s.api.order(M1, &[(1, 1)]).await;
    let answered = started.elapsed();
    assert_eq!(code(&v), 30002, "{v}");
    assert!(
        answered < Duration::from_secs(3),
        "answered in {answered:?}"
    );
    let o = last_order(&s.gw).await;
    assert_eq!(o.status.as_str(), "rejected");
    assert_eq!(o.error.as_deref(), Some("accept_timeout"));

    // The link stalls 5 s in all, then delivers what it held.
    tokio::time::sleep_until(started + Duration::from_secs(5)).await;
    s.relay.resume();
    let id = o.order_id;
    assert!(
        s.sim.wait_for(|j| received_dispense(j, id), DEADLINE).await,
        "the late dispense reaches the machine"
    );
    // The cancel (sent at the give-up, and again for the late ack) drops it.
    assert!(
        s.sim
            .wait_for(
                |j| j.iter().any(|e| matches!(&e.event,
                    JournalEvent::HoldCancelled { order_id } | JournalEvent::NoGo { order_id } if *order_id == id)),
                DEADLINE
            )
            .await,
        "the machine drops the held order"
    );
    assert!(!s.sim.was_dispensed(id), "never dispensed");
    assert!(
        !s.sim
            .journal()
            .iter()
            .any(|e| matches!(&e.event, JournalEvent::GoReceived { order_id } if *order_id == id)),
        "no go was sent for an order answered 30002"
    );
    let o = s.api.get(&format!("/orders/{id}")).await;
    assert_eq!(o["data"]["status"], "rejected");
    // The machine is usable again at once.
    let v = s.api.order(M1, &[(1, 1)]).await;
    assert_eq!(code(&v), 0, "{v}");
    s.api.wait_status(order_id_of(&v), "completed").await;
    s.gw.stop().await;
}

/// The same stall for a machine that connects with clean_session = 0: its
/// unacknowledged dispense is never redelivered on the next connection
/// (PROTOCOL.md gateway rule 8).
#[tokio::test]
async fn a_clean_session_zero_machine_gets_no_redelivery_after_reconnecting() {
    let s = setup(|_| {}, |c| c.clean_session = false).await;
    s.relay.pause();
    let v = s.api.order(M1, &[(1, 1)]).await;
    assert_eq!(code(&v), 30002, "{v}");
    let id = last_order(&s.gw).await.order_id;
    // The machine's connection dies with the dispense unacknowledged; it
    // reconnects (clean_session = 0 again) on a working link.
    // The held bytes die with the old connection: it is cut while the link
    // is still stalled, and the link recovers only once the machine saw it go.
    let connects = s.relay.accepted();
    s.relay.cut();
    assert!(
        s.sim.wait_disconnected(DEADLINE).await,
        "the old connection ends"
    );
    s.relay.resume();
    wait_until("the machine reconnects", || s.relay.accepted() > connects).await;
    assert!(s.sim.wait_ready(DEADLINE).await, "ready again");
    // An order placed now goes through the new connection: everything the
    // gateway would have redelivered would have arrived before it.
    let later = s.api.order(M1, &[(1, 1)]).await;
    assert_eq!(code(&later), 0, "{later}");
    s.api.wait_status(order_id_of(&later), "completed").await;
    assert!(
        !received_dispense(&s.sim.journal(), id),
        "the stalled dispense was not redelivered"
    );
    assert!(!s.sim.was_dispensed(id));
    s.gw.stop().await;
}

/// A machine that does not follow the protocol and dispenses without `go`:
/// its goods are never dropped. The order answered 30002 shows what came
/// out, and the merchant gets `order.dispensed_after_rejection` with the
/// items and amounts.
#[tokio::test]
async fn goods_from_a_machine_that_ignores_go_are_recorded_and_notified() {
    let s = setup(|_| {}, |c| c.behaviour = Behaviour::IgnoreGo).await;
    s.relay.pause();
    let v = s.api.order(M1, &[(1, 2)]).await;
    assert_eq!(code(&v), 30002, "{v}");
    let id = last_order(&s.gw).await.order_id;
    s.relay.resume();
    assert!(
        s.sim
            .wait_for(
                |j| j.iter().any(|e| matches!(&e.event,
                    JournalEvent::Dispensed { order_id, .. } if *order_id == id)),
                DEADLINE
            )
            .await,
        "the non-compliant machine dispenses on its own"
    );
    let hook = s.hooks.wait(id, "order.dispensed_after_rejection").await;
    let d = &hook["data"];
    assert_eq!(d["status"], "rejected");
    assert_eq!(d["items"][0]["dispensed"], 2);
    assert_eq!(d["amount"], 700);
    assert_eq!(d["dispensed_amount"], 700);
    let o = s.api.get(&format!("/orders/{id}")).await;
    assert_eq!(o["data"]["status"], "rejected");
    assert_eq!(o["data"]["items"][0]["dispensed"], 2, "{o}");
    assert_eq!(
        s.gw.handle
            .orders
            .stats
            .dispensed_after_rejection
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    s.gw.stop().await;
}

/// A slow machine with a queue: every request is answered within
/// `request_timeout`; the orders that could not be sent with
/// `accept_timeout` to spare are 30003 and never reach the machine; a
/// merchant that hangs up while its order is queued causes no dispense.
#[tokio::test]
async fn queued_orders_are_answered_in_time_and_never_sent_late() {
    let s = setup(
        |s| {
            s.orders.queue_depth = 8;
            s.orders.dispense_timeout = Duration::from_secs(2);
        },
        // Accepts, then takes its time: no result for the first order.
        |c| c.behaviour = Behaviour::AckThenSilent,
    )
    .await;
    let first = s.api.order(M1, &[(1, 1)]).await;
    assert_eq!(code(&first), 0, "{first}");
    let first = order_id_of(&first);

    let api = Arc::new(s.api.clone());
    let mut queued = Vec::new();
    for _ in 0..8 {
        let a = api.clone();
        queued.push(tokio::spawn(async move {
            let t = Instant::now();
            let v = a.order(M1, &[(1, 1)]).await;
            (v, t.elapsed())
        }));
    }
    // One more whose merchant hangs up while it waits in the queue.
    let gone = {
        let http = reqwest::Client::new();
        let url = format!("{}/orders", s.api.base);
        let (appid, secret) = (s.api.appid.clone(), s.api.secret.clone());
        tokio::spawn(async move {
            let _ = http
                .post(url)
                .header("Appid", appid)
                .header("AppSecret", secret)
                .body(format!(
                    r#"{{"machine_no":"{M1}","products":[{{"product_id":1,"quantity":3}}]}}"#
                ))
                .timeout(Duration::from_millis(300))
                .send()
                .await;
        })
    };
    for q in queued {
        let (v, took) = q.await.expect("request task");
        assert_eq!(code(&v), 30003, "{v}");
        assert_eq!(v["message"], "设备忙");
        assert!(took <= Duration::from_secs(2), "answered in {took:?}");
    }
    gone.await.expect("hang-up task");
    // The first order ends `unknown` at its deadline; then the worker goes
    // through the queue, where nothing is left to send.
    s.api.wait_status(first, "unknown").await;
    wait_until("queue drained", || s.gw.handle.orders.queued(&m(M1)) == 0).await;
    let next = s.api.order(M1, &[(1, 1)]).await;
    assert_eq!(code(&next), 0, "{next}");
    let next = order_id_of(&next);
    // Only the first order ever reached the machine.
    let dispenses: Vec<u64> = s
        .sim
        .journal()
        .iter()
        .filter_map(|e| match &e.event {
            JournalEvent::DispenseReceived(c) => Some(c.order_id),
            _ => None,
        })
        .collect();
    assert_eq!(dispenses, vec![first, next]);
    // Nothing was stored for them: a retry with the same out_trade_no is safe.
    let stored =
        s.gw.handle
            .store
            .orders_in_status(&[vendgate::domain::order::Status::Rejected])
            .await
            .expect("orders");
    assert!(stored.is_empty(), "{stored:?}");
    s.gw.stop().await;
}

/// A merchant whose connection closes after its order was sent but before
/// the acceptance is recorded: the order is given up (`caller_gone`) and
/// never dispensed.
#[tokio::test]
async fn a_caller_gone_before_the_acceptance_gets_nothing_dispensed() {
    // The machine acks only after 800 ms; the merchant hangs up at 300 ms.
    let s = setup(|_| {}, |c| c.behaviour = Behaviour::SlowAck { ms: 800 }).await;
    let http = reqwest::Client::new();
    let sent = http
        .post(format!("{}/orders", s.api.base))
        .header("Appid", s.api.appid.clone())
        .header("AppSecret", s.api.secret.clone())
        .body(format!(
            r#"{{"machine_no":"{M1}","products":[{{"product_id":1,"quantity":1}}]}}"#
        ))
        .timeout(Duration::from_millis(300))
        .send()
        .await;
    assert!(sent.is_err(), "the client gave up first");
    let store = s.gw.handle.store.clone();
    wait_until_async("the order is given up", || {
        let store = store.clone();
        async move {
            let o = store
                .orders_in_status(&[vendgate::domain::order::Status::Rejected])
                .await
                .unwrap_or_default();
            o.iter().any(|o| o.error.as_deref() == Some("caller_gone"))
        }
    })
    .await;
    let id = last_order(&s.gw).await.order_id;
    // The cancel reaches the machine, and its (slow) answer comes after it.
    assert!(
        s.sim
            .wait_for(
                |j| {
                    let cancel = j.iter().position(|e| {
                        matches!(&e.event,
                        JournalEvent::CancelReceived { order_id } if *order_id == id)
                    });
                    let ack = j.iter().rposition(|e| {
                        matches!(&e.event,
                        JournalEvent::AckSent(a) if a.order_id == id)
                    });
                    matches!((cancel, ack), (Some(c), Some(a)) if a > c)
                },
                DEADLINE
            )
            .await,
        "the machine gets the cancel, then answers"
    );
    // Its ack, if an acceptance, finds the order given up: no go.
    let store = s.gw.handle.store.clone();
    wait_until_async("the gateway saw the late answer", || {
        let store = store.clone();
        async move {
            store
                .order_events(id)
                .await
                .unwrap_or_default()
                .iter()
                .filter(|e| e.kind == "cancel_sent")
                .count()
                >= 1
        }
    })
    .await;
    assert!(!s.sim.was_dispensed(id));
    assert!(!s
        .sim
        .journal()
        .iter()
        .any(|e| matches!(&e.event, JournalEvent::GoReceived { .. })));
    s.gw.stop().await;
}

/// Storage fails at the acceptance compare-and-set: 30002, no `go`, and the
/// record converges to `rejected` once storage is back.
#[tokio::test]
async fn storage_failing_at_the_acceptance_answers_30002_without_go() {
    let s = setup(|_| {}, |_| {}).await;
    let faults = StorageFaults::open(&s.gw).await;
    faults.fail_acceptances().await;
    let v = s.api.order(M1, &[(1, 1)]).await;
    assert_eq!(code(&v), 30002, "{v}");
    let id = last_order(&s.gw).await.order_id;
    assert!(
        s.sim
            .wait_for(
                |j| j.iter().any(|e| matches!(&e.event,
                    JournalEvent::HoldCancelled { order_id } | JournalEvent::NoGo { order_id } if *order_id == id)),
                DEADLINE
            )
            .await,
        "the machine drops the order"
    );
    assert!(
        !s.sim
            .journal()
            .iter()
            .any(|e| matches!(&e.event, JournalEvent::GoReceived { .. })),
        "no go"
    );
    assert!(!s.sim.was_dispensed(id));
    faults.heal().await;
    s.api.wait_status(id, "rejected").await;
    let v = s.api.order(M1, &[(1, 1)]).await;
    assert_eq!(code(&v), 0, "{v}");
    s.gw.stop().await;
}

/// A machine that reboots between its ack and the `go` forgets the order:
/// the order answered 0 ends `failed` with `no_go` and a full refund,
/// never stuck, and nothing comes out.
#[tokio::test]
async fn a_machine_rebooting_before_go_ends_the_order_failed_with_a_full_refund() {
    let s = setup(|_| {}, |c| c.behaviour = Behaviour::RebootBeforeGo).await;
    let v = s.api.order(M1, &[(1, 2)]).await;
    assert_eq!(code(&v), 0, "{v}");
    let id = order_id_of(&v);
    let o = s.api.wait_status(id, "failed").await;
    assert_eq!(o["data"]["error"], "no_go", "{o}");
    assert_eq!(o["data"]["refund_amount"], 700);
    assert!(!s.sim.was_dispensed(id));
    let hook = s.hooks.wait(id, "order.dispense_failed").await;
    assert_eq!(hook["data"]["refund_amount"], 700);
    s.gw.stop().await;
}

/// An `unknown` order refunded in full, then settled by a late result:
/// both figures are shown, and `order.refund_mismatch` is delivered.
#[tokio::test]
async fn a_refund_then_a_late_completion_shows_both_amounts_and_notifies() {
    let gw = TestGateway::start_with(|s| {
        quick(s);
        // The ack must beat its accept deadline even on a loaded machine:
        // this test is about the refund, not the deadline.
        s.orders.accept_timeout = Duration::from_secs(4);
        s.orders.request_timeout = Duration::from_secs(5);
        s.orders.dispense_timeout = Duration::from_secs(1);
    })
    .await;
    let (hooks, url) = Hooks::start().await;
    let (appid, secret) = gw.merchant_with_url("late", &url).await;
    let ms = gw.machine(&appid, M2).await;
    let api = Api::new(&gw, &appid, &secret);
    let mut mach = hand_machine(&gw, M2, &ms, 10, 350).await;
    let order = {
        let api = api.clone();
        tokio::spawn(async move { api.order(M2, &[(1, 1)]).await })
    };
    let (_, p, _) = mach.next_publish().await.expect("dispense");
    let id = serde_json::from_slice::<Value>(&p).expect("json")["order_id"]
        .as_u64()
        .expect("id");
    publish(
        &mach,
        "ack",
        format!(r#"{{"order_id":{id},"accepted":true}}"#),
    )
    .await;
    let (topic, _, _) = mach.next_publish().await.expect("go");
    assert_eq!(topic, format!("vend/v1/{M2}/cmd/go"));
    assert_eq!(code(&order.await.expect("order task")), 0);

    let u = api.wait_status(id, "unknown").await;
    assert_eq!(u["data"]["refund_amount"], 350);
    let (_, r) = api.post_raw(&format!("/orders/{id}/refund"), "").await;
    assert_eq!(r["code"], 0, "{r}");
    assert_eq!(r["data"]["refunded_amount"], 350);

    publish(
        &mach,
        "result",
        format!(r#"{{"order_id":{id},"items":[{{"product_id":1,"quantity":1,"dispensed":1}}]}}"#),
    )
    .await;
    let done = api.wait_status(id, "completed").await;
    let d = &done["data"];
    assert_eq!(d["refunded_amount"], 350, "{done}");
    assert!(
        d["refund_amount"].is_null() || d["refund_amount"] == 0,
        "{done}"
    );
    assert_eq!(d["refund_status"], "mismatch");
    let completed = hooks.wait(id, "order.completed").await;
    assert_eq!(completed["data"]["refunded_amount"], 350);
    let mismatch = hooks.wait(id, "order.refund_mismatch").await;
    assert_eq!(mismatch["data"]["refunded_amount"], 350);
    assert_eq!(mismatch["data"]["refund_amount"], 0);
    gw.stop().await;
}

async fn publish(mach: &Client, suffix: &str, payload: String) {
    mach.client
        .publish(
            format!("vend/v1/{M2}/{suffix}"),
            rumqttc::QoS::AtLeastOnce,
            false,
            payload,
        )
        .await
        .expect("publish");
}

/// A raw machine that reads its commands and acknowledges (PUBACK) only
/// when told to.
struct RawMachine(RawClient);

impl RawMachine {
    async fn connect(gw: &TestGateway, m: &str, secret: &str) -> Self {
        use rumqttc::mqttbytes::v4::{Packet, Publish, Subscribe};
        use rumqttc::mqttbytes::QoS;
        let (mut c, code) = RawClient::connect(gw.mqtt_addr, m, Some((m, secret)), 30).await;
        assert_eq!(
            code,
            Some(rumqttc::mqttbytes::v4::ConnectReturnCode::Success)
        );
        c.send(Packet::Subscribe(Subscribe::new(
            format!("vend/v1/{m}/cmd/#"),
            QoS::AtLeastOnce,
        )))
        .await;
        assert!(matches!(c.recv().await, Some(Packet::SubAck(_))), "suback");
        let inv = r#"{"items":[{"product_id":1,"stock":10,"price":350}]}"#;
        c.send(Packet::Publish(Publish::new(
            format!("vend/v1/{m}/inventory"),
            QoS::AtMostOnce,
            inv,
        )))
        .await;
        let mn = self::m(m);
        wait_until("inventory seen", || {
            !gw.handle.orders.inventory.view(&mn).is_empty()
        })
        .await;
        Self(c)
    }

    /// The next command PUBLISH (topic, payload, pkid), not acknowledged.
    async fn command(&mut self) -> (String, Value, u16) {
        loop {
            match self.0.recv().await {
                Some(rumqttc::mqttbytes::v4::Packet::Publish(p)) => {
                    let v = serde_json::from_slice(&p.payload).expect("json");
                    return (p.topic, v, p.pkid);
                }
                Some(_) => continue,
                None => panic!("connection closed before a command"),
            }
        }
    }

    async fn puback(&mut self, pkid: u16) {
        self.0
            .send(rumqttc::mqttbytes::v4::Packet::PubAck(
                rumqttc::mqttbytes::v4::PubAck::new(pkid),
            ))
            .await;
    }
}

/// A cancel counts as delivered only once the machine acknowledged it: one
/// the machine never PUBACKs stays owed and is sent again on its next
/// connection, where its PUBACK settles it.
#[tokio::test]
async fn a_cancel_is_delivered_only_when_the_machine_acknowledges_it() {
    let gw = TestGateway::start_with(quick).await;
    let (appid, secret) = gw.merchant("acks").await;
    let ms = gw.machine(&appid, M2).await;
    let api = Api::new(&gw, &appid, &secret);
    let mut mach = RawMachine::connect(&gw, M2, &ms).await;
    // The machine receives the dispense but never answers: 30002.
    let v = api.order(M2, &[(1, 1)]).await;
    assert_eq!(code(&v), 30002, "{v}");
    let (topic, cmd, _) = mach.command().await;
    assert_eq!(topic, format!("vend/v1/{M2}/cmd/dispense"));
    let id = cmd["order_id"].as_u64().expect("id");
    let (topic, _, pkid) = mach.command().await;
    assert_eq!(topic, format!("vend/v1/{M2}/cmd/cancel"));
    // Not acknowledged: recorded as not delivered, still owed.
    let store = gw.handle.store.clone();
    wait_until_async("the unacknowledged cancel recorded", || {
        let store = store.clone();
        async move {
            store
                .order_events(id)
                .await
                .unwrap_or_default()
                .iter()
                .any(|e| e.kind == "cancel_sent" && e.detail["delivered"] == false)
        }
    })
    .await;
    assert_eq!(
        gw.handle.store.pending_cancels(&m(M2)).await.unwrap(),
        vec![id]
    );
    // The machine goes away without acknowledging anything, and comes back.
    let _ = pkid;
    drop(mach);
    wait_until("offline", || !gw.online(M2)).await;
    let mut mach = RawMachine::connect(&gw, M2, &ms).await;
    let (topic, cmd, pkid) = mach.command().await;
    assert_eq!(topic, format!("vend/v1/{M2}/cmd/cancel"));
    assert_eq!(cmd["order_id"], id);
    assert_eq!(
        gw.handle.store.pending_cancels(&m(M2)).await.unwrap(),
        vec![id]
    );
    mach.puback(pkid).await;
    let store = gw.handle.store.clone();
    wait_until_async("the acknowledged cancel settled", || {
        let store = store.clone();
        async move {
            store
                .pending_cancels(&m(M2))
                .await
                .unwrap_or_default()
                .is_empty()
        }
    })
    .await;
    gw.stop().await;
}

/// One machine, orders one after another as fast as the merchant can send
/// them: each is answered 0 and completes; the machine's worker moves on as
/// soon as each result is in (a result can arrive right after `go`, before
/// the worker has answered the merchant).
#[tokio::test]
async fn back_to_back_orders_on_one_machine_all_go_through() {
    let s = setup(|_| {}, |_| {}).await;
    for _ in 0..10 {
        let v = s.api.order(M1, &[(1, 1)]).await;
        assert_eq!(code(&v), 0, "{v}");
        s.api.wait_status(order_id_of(&v), "completed").await;
    }
    s.gw.stop().await;
}
