//! Tests of the load tools over real sockets: `Fleet` and `rr` against an
//! embedded rumqttd broker, `load` against a mock of the open API.

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
use vendgate_sim::load::{LoadStop, CODE_BAD_ANSWER, CODE_TRANSPORT_ERROR};
use vendgate_sim::{load, rr, Fleet, FleetOptions, LoadOptions, RrOptions};

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
