//! Tests of the load tools over real sockets: `Fleet` and `rr` against an
//! embedded rumqttd broker, `load` against a mock of the open API; and of
//! one machine's runtime (two-phase dispense, go timeout, reboot, clean
//! session) against the broker, with a bare client standing in for the
//! gateway.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};
use vendgate_proto::machine::MachineNo;
use vendgate_proto::msg::{self, DispenseCmd, GoCmd, InventoryItem, OrderLine, ResultMsg};
use vendgate_proto::topic::{self, Command};
use vendgate_sim::load::{LoadStop, CODE_BAD_ANSWER, CODE_TRANSPORT_ERROR};
use vendgate_sim::{
    load, rr, Behaviour, Fleet, FleetOptions, JournalEntry, JournalEvent, LoadOptions, RrOptions,
    SimConfig, SimHandle, SimMachine,
};

/// Generous deadline for anything that should take milliseconds.
const DEADLINE: Duration = Duration::from_secs(20);

/// Starts rumqttd (MQTT 3.1.1, no authentication) on a free loopback port.
/// rumqttd cannot report a bound port or shut down, so the port is picked
/// first and the broker lives as long as the test process.
fn start_broker() -> SocketAddr {
    use rumqttd::{Broker, Config, ConnectionSettings, RouterConfig, ServerSettings};

    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port");
    let server = ServerSettings {
        name: "v4".into(),
        listen: addr,
        tls: None,
        next_connection_delay_ms: 0,
        connections: ConnectionSettings {
            connection_timeout_ms: 5_000,
            max_payload_size: 1 << 20,
            max_inflight_count: 100,
            auth: None,
            external_auth: None,
            dynamic_filters: true,
        },
    };
    let config = Config {
        router: RouterConfig {
            max_connections: 1_000,
            max_outgoing_packet_count: 200,
            // The default of 0 kills the router on the first subscribe.
            max_segment_size: 1 << 20,
            max_segment_count: 10,
            ..RouterConfig::default()
        },
        v4: Some(HashMap::from([("v4".to_owned(), server)])),
        ..Config::default()
    };
    std::thread::spawn(move || {
        let mut broker = Broker::new(config);
        let _ = broker.start();
    });
    let until = std::time::Instant::now() + DEADLINE;
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(std::time::Instant::now() < until, "broker did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    addr
}

fn machines(first: u32, n: u32) -> Vec<(MachineNo, String)> {
    (first..first + n)
        .map(|i| (MachineNo::from_u32(i).unwrap(), format!("secret-{i}")))
        .collect()
}

#[tokio::test]
async fn fleet_connects_every_machine_and_disconnects_them() {
    let broker = start_broker();
    let options = FleetOptions {
        connect_rate: 0,
        ..FleetOptions::default()
    };
    let fleet = Fleet::spawn(broker.to_string(), machines(10_000_000, 25), options);
    assert_eq!(fleet.len(), 25);
    assert!(fleet.wait_all_connected(DEADLINE).await.is_ok());
    assert_eq!(fleet.connected_count(), 25);
    let progress = fleet.progress();
    assert_eq!((progress.started, progress.connected), (25, 25));
    let handles = fleet.handles().to_vec();
    assert_eq!(handles[3].machine_no().as_str(), "10000003");
    fleet.shutdown().await;
    assert!(handles.iter().all(|h| !h.connected()));
}

#[tokio::test]
async fn fleet_reports_machines_that_cannot_connect() {
    // A port nobody listens on: every attempt is refused.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap();
    let fleet = Fleet::spawn(
        closed.to_string(),
        machines(10_000_000, 3),
        FleetOptions::default(),
    );
    assert_eq!(
        fleet.wait_all_connected(Duration::from_millis(300)).await,
        Err(3)
    );
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while fleet.progress().failed < 3 {
        assert!(tokio::time::Instant::now() < deadline, "failures counted");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    fleet.shutdown().await;
}

#[tokio::test]
async fn rr_completes_every_round_trip() {
    let broker = start_broker();
    // rumqttd leaves Nagle on, so each QoS 1 round trip takes ~40 ms:
    // keep the count small.
    let opts = RrOptions {
        concurrency: 8,
        count: 200,
        payload: 100,
        qos: 1,
        ..RrOptions::new(broker.to_string())
    };
    let report = rr(opts).await.unwrap();
    assert_eq!((report.count, report.errors), (200, 0));
    assert!(report.p50_ms <= report.p99_ms && report.p99_ms <= report.max_ms);
    assert!(report.throughput > 0.0);

    // Many connections: one responder for all, then one per requester.
    for responders in [1, 4] {
        let opts = RrOptions {
            concurrency: 8,
            requesters: 4,
            responders,
            count: 200,
            ..RrOptions::new(broker.to_string())
        };
        let report = rr(opts).await.unwrap();
        assert_eq!((report.count, report.errors), (200, 0));
        assert_eq!((report.requesters, report.responders), (4, responders));
    }

    // At QoS 0 anything lost counts as an error, never twice.
    let opts = RrOptions {
        concurrency: 4,
        count: 200,
        qos: 0,
        stall_timeout: Duration::from_secs(2),
        ..RrOptions::new(broker.to_string())
    };
    let report = rr(opts).await.unwrap();
    assert_eq!(report.count + report.errors, 200);
}

#[tokio::test]
async fn rr_fails_without_a_broker() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap();
    assert!(rr(RrOptions::new(closed.to_string())).await.is_err());
}

/// A mock of the open API: machine 10000001 accepts, 10000002 is offline,
/// 10000003 makes the server answer something that is not an envelope.
async fn start_api() -> (SocketAddr, Arc<AtomicU64>) {
    #[derive(Clone)]
    struct Mock {
        next_id: Arc<AtomicU64>,
    }

    async fn place(
        State(mock): State<Mock>,
        headers: HeaderMap,
        Json(body): Json<Value>,
    ) -> axum::response::Response {
        use axum::response::IntoResponse;
        if headers.get("appid").and_then(|v| v.to_str().ok()) != Some("app")
            || headers.get("appsecret").and_then(|v| v.to_str().ok()) != Some("secret")
        {
            return Json(json!({"code": 10002, "message": "认证失败", "data": {}})).into_response();
        }
        assert_eq!(body["products"], json!([{"product_id": 1, "quantity": 2}]));
        match body["machine_no"].as_str() {
            Some("10000001") => {
                let id = mock.next_id.fetch_add(1, Ordering::Relaxed);
                Json(json!({"code": 0, "message": "ok", "data": {"order_id": id}})).into_response()
            }
            Some("10000002") => {
                Json(json!({"code": 30002, "message": "设备已离线", "data": {}})).into_response()
            }
            _ => "<html>bad gateway</html>".into_response(),
        }
    }

    async fn order(Path(id): Path<u64>) -> Json<Value> {
        Json(json!({"code": 0, "message": "ok", "data": {"order_id": id, "status": "completed"}}))
    }

    let next_id = Arc::new(AtomicU64::new(1));
    let app = Router::new()
        .route("/api/openapi/v1/orders", post(place))
        .route("/api/openapi/v1/orders/{id}", get(order))
        .with_state(Mock {
            next_id: Arc::clone(&next_id),
        });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (addr, next_id)
}

fn load_options(api: SocketAddr, machines: &str) -> LoadOptions {
    let machines = load::parse_machines(machines).unwrap();
    LoadOptions {
        concurrency: 8,
        products: load::parse_product_lines("1:2").unwrap(),
        ..LoadOptions::new(format!("http://{api}"), "app", "secret", machines)
    }
}

#[tokio::test]
async fn load_counts_every_answer_by_code() {
    let (api, next_id) = start_api().await;
    let opts = LoadOptions {
        stop: LoadStop::Count(100),
        completion: true,
        ..load_options(api, "10000001,10000002,10000003")
    };
    let report = load(opts).await.unwrap();
    assert_eq!(report.placed, 100);
    assert_eq!(report.answered, 100);
    assert_eq!(report.codes.values().sum::<u64>(), 100);
    // Round robin: 34, 33, 33.
    assert_eq!(report.codes.get(&0), Some(&34));
    assert_eq!(report.codes.get(&30002), Some(&33));
    assert_eq!(report.codes.get(&CODE_BAD_ANSWER), Some(&33));
    assert_eq!(report.ok, 34);
    assert_eq!(report.latency.count, 100);
    assert_eq!(next_id.load(Ordering::Relaxed), 35);

    let completion = report.completion.unwrap();
    assert_eq!((completion.polled, completion.timed_out), (34, 0));
    assert_eq!(completion.statuses.get("completed"), Some(&34));

    let json = serde_json::to_value(
        load(LoadOptions {
            stop: LoadStop::Count(3),
            ..load_options(api, "10000002")
        })
        .await
        .unwrap(),
    )
    .unwrap();
    assert_eq!(json["codes"]["30002"], 3);
    assert!(json.get("completion").is_none());
}

#[tokio::test]
async fn load_by_duration_keeps_the_invariant() {
    let (api, _) = start_api().await;
    let opts = LoadOptions {
        stop: LoadStop::Duration(Duration::from_millis(200)),
        ..load_options(api, "10000001")
    };
    let report = load(opts).await.unwrap();
    assert!(report.placed > 0);
    assert_eq!(report.placed, report.answered);
    assert_eq!(report.codes.values().sum::<u64>(), report.answered);
}

#[tokio::test]
async fn load_counts_wrong_credentials_and_transport_errors() {
    let (api, _) = start_api().await;
    let opts = LoadOptions {
        appsecret: "wrong".into(),
        stop: LoadStop::Count(5),
        ..load_options(api, "10000001")
    };
    let report = load(opts).await.unwrap();
    assert_eq!(report.codes.get(&10002), Some(&5));

    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap();
    let opts = LoadOptions {
        stop: LoadStop::Count(5),
        ..load_options(closed, "10000001")
    };
    let report = load(opts).await.unwrap();
    assert_eq!(report.codes.get(&CODE_TRANSPORT_ERROR), Some(&5));
    assert_eq!(report.ok, 0);
}

fn shipped(file: &str) -> vendgate_sim::Scenario {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("scenarios")
        .join(file);
    vendgate_sim::Scenario::load(&path).unwrap()
}

/// `vendgate-sim fleet --scenario`: behaviour and starting stock per
/// machine from the file, and its storm takes the whole fleet down and back.
#[tokio::test]
async fn fleet_follows_a_scenarios_stock_and_storm() {
    let stock_out = shipped("stock-out.toml");
    let fleet = Fleet::spawn_scenario(
        "127.0.0.1:9",
        machines(10_000_000, 2),
        FleetOptions::default(),
        &stock_out,
    );
    for h in fleet.handles() {
        assert_eq!(Some(h.stock()), stock_out.stock.clone());
    }
    fleet.shutdown().await;

    let broker = start_broker();
    let storm = shipped("reconnect-storm.toml");
    let options = FleetOptions {
        connect_rate: 0,
        ..FleetOptions::default()
    };
    let fleet = Fleet::spawn_scenario(broker.to_string(), machines(10_100_000, 5), options, &storm);
    assert!(fleet.wait_all_connected(DEADLINE).await.is_ok());
    let cancel = tokio_util::sync::CancellationToken::new();
    for t in storm.start_schedules(fleet.handles(), &cancel) {
        tokio::time::timeout(DEADLINE, t).await.unwrap().unwrap();
    }
    for h in fleet.handles() {
        let dropped = h
            .journal()
            .iter()
            .filter(|e| matches!(e.event, vendgate_sim::JournalEvent::Dropped))
            .count();
        assert_eq!(dropped, 1, "{}", h.machine_no());
    }
    assert!(fleet.wait_all_connected(DEADLINE).await.is_ok());
    fleet.shutdown().await;
}

// ---- One machine's runtime: two-phase dispense over MQTT ----

/// Stands in for the gateway: publishes commands and collects the
/// machines' `result` messages.
struct Controller {
    client: rumqttc::AsyncClient,
    results: tokio::sync::mpsc::UnboundedReceiver<ResultMsg>,
}

impl Controller {
    async fn start(broker: SocketAddr) -> Self {
        use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

        let options = MqttOptions::new("controller", broker.ip().to_string(), broker.port());
        let (client, mut eventloop) = AsyncClient::new(options, 10);
        let (tx, results) = tokio::sync::mpsc::unbounded_channel();
        let (subscribed_tx, subscribed) = tokio::sync::oneshot::channel();
        let mut subscribed_tx = Some(subscribed_tx);
        tokio::spawn(async move {
            while let Ok(event) = eventloop.poll().await {
                match event {
                    Event::Incoming(Packet::SubAck(_)) => {
                        if let Some(tx) = subscribed_tx.take() {
                            let _ = tx.send(());
                        }
                    }
                    Event::Incoming(Packet::Publish(p)) if p.topic.ends_with("/result") => {
                        if let Ok(r) = msg::decode::<ResultMsg>(&p.payload) {
                            let _ = tx.send(r);
                        }
                    }
                    _ => {}
                }
            }
        });
        client
            .subscribe("vend/v1/+/result", QoS::AtLeastOnce)
            .await
            .unwrap();
        tokio::time::timeout(DEADLINE, subscribed)
            .await
            .expect("controller subscribed")
            .unwrap();
        Self { client, results }
    }

    async fn send(&self, m: MachineNo, kind: Command, payload: Vec<u8>) {
        self.client
            .publish(
                topic::command(&m, kind),
                rumqttc::QoS::AtLeastOnce,
                false,
                payload,
            )
            .await
            .unwrap();
    }

    async fn dispense(&self, m: MachineNo, order_id: u64) {
        let cmd = DispenseCmd {
            order_id,
            items: vec![OrderLine {
                product_id: 1,
                quantity: 1,
            }],
            ttl_ms: 10_000,
        };
        self.send(m, Command::Dispense, msg::encode(&cmd)).await;
    }

    async fn go(&self, m: MachineNo, order_id: u64) {
        self.send(m, Command::Go, msg::encode(&GoCmd { order_id }))
            .await;
    }

    /// The next result for `order_id` the broker delivered.
    async fn result_for(&mut self, order_id: u64) -> ResultMsg {
        tokio::time::timeout(DEADLINE, async {
            loop {
                let r = self.results.recv().await.expect("controller running");
                if r.order_id == order_id {
                    return r;
                }
            }
        })
        .await
        .expect("result delivered")
    }
}

/// A machine with stock of product 1 on the broker, connected and
/// subscribed.
async fn ready_machine(broker: SocketAddr, n: u32, tune: impl FnOnce(&mut SimConfig)) -> SimHandle {
    let mut config = SimConfig::new(
        broker.to_string(),
        MachineNo::from_u32(n).unwrap(),
        "secret",
    );
    config.inventory = vec![InventoryItem {
        product_id: 1,
        stock: 10,
        price: 350,
    }];
    tune(&mut config);
    let sim = SimMachine::spawn(config);
    assert!(sim.wait_ready(DEADLINE).await, "machine {n} ready");
    sim
}

/// Waits until the journal holds an entry matching `pred`.
async fn wait_event(sim: &SimHandle, what: &str, pred: impl Fn(&JournalEvent) -> bool) {
    let found = sim
        .wait_for(
            |j: &[JournalEntry]| j.iter().any(|e| pred(&e.event)),
            DEADLINE,
        )
        .await;
    assert!(found, "{what}: {:?}", sim.journal());
}

fn count(sim: &SimHandle, pred: impl Fn(&JournalEvent) -> bool) -> usize {
    sim.journal().iter().filter(|e| pred(&e.event)).count()
}

#[tokio::test]
async fn machine_dispenses_on_go_and_drops_an_order_without_one() {
    let broker = start_broker();
    let mut ctl = Controller::start(broker).await;
    // Long enough for order 1's go to arrive through rumqttd (Nagle on)
    // on a loaded machine, short enough for order 2 to time out quickly.
    let sim = ready_machine(broker, 20_000_001, |c| {
        c.go_timeout = Duration::from_secs(1);
    })
    .await;
    let m = sim.machine_no();

    // Phase one: acked and held, nothing out.
    ctl.dispense(m, 1).await;
    wait_event(
        &sim,
        "ack sent",
        |e| matches!(e, JournalEvent::AckSent(a) if a.order_id == 1 && a.accepted),
    )
    .await;
    assert_eq!(sim.held_orders(), vec![1]);
    assert!(sim.dispensed_orders().is_empty());
    // Phase two.
    ctl.go(m, 1).await;
    let r = ctl.result_for(1).await;
    assert_eq!((r.items[0].dispensed, r.error), (1, None));
    assert_eq!(sim.dispensed_orders(), vec![1]);

    // No go: dropped at the go timeout with every item dispensed 0.
    ctl.dispense(m, 2).await;
    let r = ctl.result_for(2).await;
    assert_eq!(r.error.as_deref(), Some(msg::ERROR_NO_GO));
    assert_eq!(r.items[0].dispensed, 0);
    assert_eq!(
        count(&sim, |e| matches!(e, JournalEvent::NoGo { order_id: 2 })),
        1
    );
    // Order 1's timer, due before order 2's, found it dispensed.
    assert_eq!(
        count(&sim, |e| matches!(e, JournalEvent::NoGo { order_id: 1 })),
        0
    );
    assert!(sim.held_orders().is_empty());
    assert_eq!(sim.dispensed_orders(), vec![1]);
    assert_eq!(sim.stock()[0].stock, 9);
    sim.shutdown().await;
}

#[tokio::test]
async fn reboot_before_go_reconnects_and_answers_the_go_with_no_go() {
    let broker = start_broker();
    let mut ctl = Controller::start(broker).await;
    let sim = ready_machine(broker, 20_000_002, |c| {
        c.behaviour = Behaviour::RebootBeforeGo;
    })
    .await;
    let m = sim.machine_no();
    ctl.dispense(m, 3).await;
    // Ack, reboot, cut, and back: subscribed a second time.
    let back = sim
        .wait_for(
            |j: &[JournalEntry]| {
                j.iter()
                    .filter(|e| matches!(e.event, JournalEvent::Subscribed))
                    .count()
                    >= 2
            },
            DEADLINE,
        )
        .await;
    assert!(back, "back after the reboot: {:?}", sim.journal());
    let journal: Vec<JournalEvent> = sim.journal().into_iter().map(|e| e.event).collect();
    let at = |pred: &dyn Fn(&JournalEvent) -> bool| journal.iter().position(pred);
    let acked = at(&|e| matches!(e, JournalEvent::AckSent(a) if a.order_id == 3 && a.accepted));
    let rebooted = at(&|e| matches!(e, JournalEvent::Rebooted { forgotten } if forgotten == &[3]));
    let dropped = at(&|e| matches!(e, JournalEvent::Dropped));
    assert!(
        acked.is_some() && rebooted.is_some() && acked < dropped,
        "{journal:?}"
    );
    // The gateway's go now finds nothing held.
    ctl.go(m, 3).await;
    let r = ctl.result_for(3).await;
    assert_eq!(
        (r.items.len(), r.error.as_deref()),
        (0, Some(msg::ERROR_NO_GO))
    );
    assert!(sim.dispensed_orders().is_empty());
    assert_eq!(sim.stock()[0].stock, 10);
    sim.shutdown().await;
}

#[tokio::test]
async fn go_timeout_runs_while_offline_and_its_result_goes_out_on_reconnect() {
    let broker = start_broker();
    let mut ctl = Controller::start(broker).await;
    let sim = ready_machine(broker, 20_000_003, |c| {
        c.go_timeout = Duration::from_millis(200);
    })
    .await;
    let m = sim.machine_no();
    ctl.dispense(m, 4).await;
    wait_event(&sim, "held", |e| {
        matches!(e, JournalEvent::Held { order_id: 4 })
    })
    .await;
    // A power cut: the timer belongs to the machine, not the connection.
    sim.kill().await;
    wait_event(&sim, "dropped while offline", |e| {
        matches!(e, JournalEvent::NoGo { order_id: 4 })
    })
    .await;
    assert_eq!(
        count(&sim, |e| matches!(e, JournalEvent::ResultSent(_))),
        0,
        "nothing sent while offline"
    );
    sim.revive();
    let r = ctl.result_for(4).await;
    assert_eq!(r.error.as_deref(), Some(msg::ERROR_NO_GO));
    assert!(sim.dispensed_orders().is_empty());
    sim.shutdown().await;
}

#[tokio::test]
async fn machine_can_ask_for_a_persistent_session() {
    let broker = start_broker();
    let mut ctl = Controller::start(broker).await;
    let sim = ready_machine(broker, 20_000_004, |c| {
        c.clean_session = false;
    })
    .await;
    let m = sim.machine_no();
    ctl.dispense(m, 5).await;
    wait_event(&sim, "held", |e| {
        matches!(e, JournalEvent::Held { order_id: 5 })
    })
    .await;
    ctl.go(m, 5).await;
    assert_eq!(ctl.result_for(5).await.items[0].dispensed, 1);
    assert_eq!(sim.dispensed_orders(), vec![5]);
    sim.shutdown().await;
}
