//! Bodies of the fuzz targets (`fuzz/`) and of the stable hostile-input tests
//! (`gateway/tests/hostile.rs`): one function per target, so libFuzzer and
//! `cargo test` run exactly the same code. Not part of the gateway's API
//! (hidden from the docs); always compiled, because a cargo feature would
//! keep `cargo test --workspace` from running the regression corpus.
//! How the inputs are laid out: docs/fuzzing.md.
//!
//! The targets that need a gateway share one [`Harness`]: a real gateway
//! (`Gateway::build` + `run`, real SQLite in a temp dir, listeners on
//! loopback port 0) on its own runtime, a merchant, and simulated machines.
//! Every check is an `assert!`: under libFuzzer a failed check aborts and is
//! reported as a crash; in `cargo test` it fails the test.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use rumqttc::mqttbytes::v4::{Connect, Login, Packet};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use vendgate_proto::codes::ErrorCode;
use vendgate_proto::machine::MachineNo;
use vendgate_proto::msg::{self, AckMsg, InventoryItem, ResultItem, ResultMsg};
use vendgate_proto::topic::Uplink;

use crate::app::{Gateway, GatewayHandle};
use crate::config::Settings;
use crate::domain::order::Status;
use crate::edge::UplinkHandler;
use crate::orders::PlaceRequest;
use crate::secrets::{generate_appid, generate_secret, SecretHash};
use crate::storage::{NewMachine, NewMerchant, NewService};

/// The edge's default `mqtt.max_packet_size`, the bound the decoder runs with.
pub const MAX_PACKET: usize = 64 * 1024;

/// Longest any one step of a case may take before it counts as a hang. Far
/// above what a step needs, so a loaded machine never trips it.
const STEP: Duration = Duration::from_secs(20);

const OPERATOR_PASSWORD: &str = "fuzz-operator-password";

/// `mqtt_decode`: decode arbitrary bytes as a stream of MQTT 3.1.1 packets the
/// way the edge does (`Packet::read` bounded by the packet size), until the
/// bytes run out or the decoder refuses them. Invariant: no panic, and every
/// decoded packet consumes bytes (so the edge's read loop always progresses).
pub fn mqtt_decode(data: &[u8]) {
    let mut buf = BytesMut::from(data);
    while !buf.is_empty() {
        let before = buf.len();
        match Packet::read(&mut buf, MAX_PACKET) {
            Ok(_) => assert!(buf.len() < before, "a decoded packet consumed no bytes"),
            Err(_) => break,
        }
    }
}

/// The pure half of `device_payload`: every uplink payload type decoded from
/// the same bytes. Invariant: no panic (errors are fine).
pub fn decode_uplinks(data: &[u8]) {
    let _ = msg::decode::<msg::StateMsg>(data);
    let _ = msg::decode::<msg::PongMsg>(data);
    let _ = msg::decode::<msg::InventoryMsg>(data);
    let _ = msg::decode::<AckMsg>(data);
    let _ = msg::decode::<ResultMsg>(data);
}

/// Names of runtime threads that panicked (the hook below records them).
/// A panic inside a spawned task does not reach the caller (tokio catches
/// it), so each case checks this list for its own runtime's threads.
static PANICKED: Mutex<Vec<String>> = Mutex::new(Vec::new());
static HOOK: OnceLock<()> = OnceLock::new();
static HARNESS_IDS: AtomicU64 = AtomicU64::new(1);

fn install_panic_recorder() {
    HOOK.get_or_init(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if let Some(name) = std::thread::current().name() {
                if name.starts_with("vgfz-") {
                    if let Ok(mut p) = PANICKED.lock() {
                        p.push(name.to_owned());
                    }
                }
            }
            previous(info);
        }));
    });
}

/// A running gateway with a merchant, a service account and machines:
/// - `ack_machine`: a simulated machine that records dispense commands and
///   never answers them (the fuzz input plays its acks and results);
/// - `quiet_machine`: provisioned, never connected (foreign uplinks);
/// - `shop_machine`: a normally behaving simulated machine (HTTP orders).
pub struct Harness {
    rt: tokio::runtime::Runtime,
    thread_prefix: String,
    _dir: tempfile::TempDir,
    pub handle: GatewayHandle,
    mqtt: SocketAddr,
    router: axum::Router,
    appid: String,
    appsecret: String,
    other_appid: String,
    other_appsecret: String,
    ack_machine: MachineNo,
    ack_secret: String,
    quiet_machine: MachineNo,
    shop_machine: MachineNo,
    service: (String, String),
    /// Order ids seen in this harness (HTTP answers, placed orders), so inputs
    /// can name real orders.
    known_orders: Mutex<Vec<u64>>,
    cases: AtomicU64,
    _sims: Vec<vendgate_sim::SimHandle>,
}

impl Harness {
    /// Build and start the gateway; panics if it cannot (a set-up failure,
    /// not a finding).
    pub fn new() -> Self {
        install_panic_recorder();
        let thread_prefix = format!("vgfz-{}", HARNESS_IDS.fetch_add(1, Ordering::Relaxed));
        let name = thread_prefix.clone();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name(name)
            .enable_all()
            .build()
            .expect("fuzz runtime");
        let dir = tempfile::tempdir().expect("temp dir");
        let mut settings = Settings::for_tests(dir.path());
        // The rate limiter would answer 10003 to nearly every case.
        settings.http.rate_limit = 1_000_000;
        settings.http.rate_burst = 1_000_000;
        // Bounded stalls when an input leaves an order unanswered.
        settings.orders.accept_timeout = Duration::from_secs(2);
        settings.orders.dispense_timeout = Duration::from_secs(5);
        // The dashboard answers 503 until an operator is configured.
        settings.operator.username = "operator".into();
        settings.operator.password = OPERATOR_PASSWORD.into();
        let built = rt.block_on(async move {
            let gw = Gateway::build(settings).await.expect("gateway builds");
            let (mqtt, handle) = (gw.mqtt_addr(), gw.handle());
            tokio::spawn(gw.run());
            let store = &handle.store;
            let mut merchants = Vec::new();
            for name in ["fuzz", "other"] {
                let appid = generate_appid();
                let secret = generate_secret();
                store
                    .create_merchant(NewMerchant {
                        name: name.into(),
                        notify_url: None,
                        appsecret_enc: Some(handle.webhook_key.encrypt(&appid, &secret)),
                        appid: appid.clone(),
                        appsecret_hash: SecretHash::new(&secret),
                    })
                    .await
                    .expect("merchant");
                merchants.push((appid, secret));
            }
            let mut secrets = Vec::new();
            for no in ["10000001", "10000002", "10000003"] {
                let secret = generate_secret();
                store
                    .create_machine(NewMachine {
                        machine_no: no.parse().expect("machine_no"),
                        merchant_appid: merchants[0].0.clone(),
                        secret_hash: SecretHash::new(&secret),
                    })
                    .await
                    .expect("machine");
                secrets.push(secret);
            }
            let password = generate_secret();
            store
                .create_service(NewService {
                    name: "fuzz".into(),
                    username: "svc-fuzz".into(),
                    password_hash: SecretHash::new(&password),
                })
                .await
                .expect("service");
            let stock = fuzz_stock();
            let mut sims = Vec::new();
            for (no, secret, behaviour) in [
                ("10000001", &secrets[0], vendgate_sim::Behaviour::NeverAck),
                ("10000003", &secrets[2], vendgate_sim::Behaviour::Normal),
            ] {
                let mut c = vendgate_sim::SimConfig::new(
                    mqtt.to_string(),
                    no.parse().expect("machine_no"),
                    secret.clone(),
                );
                c.inventory = stock.clone();
                c.behaviour = behaviour;
                let sim = vendgate_sim::SimMachine::spawn(c);
                assert!(sim.wait_ready(STEP).await, "simulated machine {no} ready");
                sims.push(sim);
            }
            let router = crate::http::router(handle.http_parts());
            (mqtt, handle, merchants, secrets, password, sims, router)
        });
        let (mqtt, handle, merchants, secrets, password, sims, router) = built;
        let [(appid, appsecret), (other_appid, other_appsecret)]: [(String, String); 2] =
            merchants.try_into().expect("two merchants");
        let ack_secret = secrets.first().cloned().expect("three machines");
        Self {
            rt,
            thread_prefix,
            _dir: dir,
            handle,
            mqtt,
            router,
            appid,
            appsecret,
            other_appid,
            other_appsecret,
            ack_machine: "10000001".parse().expect("machine_no"),
            ack_secret,
            quiet_machine: "10000002".parse().expect("machine_no"),
            shop_machine: "10000003".parse().expect("machine_no"),
            service: ("svc-fuzz".into(), password),
            known_orders: Mutex::new(Vec::new()),
            cases: AtomicU64::new(0),
            _sims: sims,
        }
    }

    /// Run a future on the harness's runtime (regression tests that drive
    /// the gateway directly).
    pub fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.rt.block_on(f)
    }

    /// The merchant that owns the harness's machines.
    pub fn merchant(&self) -> &str {
        &self.appid
    }

    /// The normally behaving simulated machine.
    pub fn shop_machine(&self) -> MachineNo {
        self.shop_machine
    }

    /// After every case: nothing panicked on the gateway's threads, and the
    /// MQTT edge still accepts.
    fn check_alive(&self) {
        let panicked: Vec<String> = PANICKED
            .lock()
            .map(|p| {
                p.iter()
                    .filter(|n| n.as_str() == self.thread_prefix)
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        assert!(panicked.is_empty(), "a gateway task panicked: {panicked:?}");
        assert!(
            self.handle.hub.stats.accepting.load(Ordering::Relaxed),
            "the MQTT accept loop stopped"
        );
    }

    fn remember_order(&self, id: u64) {
        if let Ok(mut k) = self.known_orders.lock() {
            if k.len() >= 64 {
                k.remove(0);
            }
            k.push(id);
        }
    }

    fn known_order(&self, pick: u8) -> Option<u64> {
        let k = self.known_orders.lock().ok()?;
        if k.is_empty() {
            return None;
        }
        k.get(usize::from(pick) % k.len()).copied()
    }

    // ---------------------------------------------------------------- edge

    /// `edge_session`: one TCP connection to the real edge. Input: byte 0
    /// picks the opening (0: the bytes as they are; 1: a valid machine
    /// CONNECT first; 2: a valid service CONNECT first), the rest is written
    /// to the socket, then the write half is closed. Invariants: the edge
    /// closes the connection (no hang), no gateway task panics, the edge
    /// keeps accepting.
    pub fn edge_session(&self, data: &[u8]) {
        let Some((&mode, rest)) = data.split_first() else {
            return;
        };
        let mut bytes = BytesMut::new();
        let login = match mode % 3 {
            1 => Some((self.ack_machine.to_string(), self.ack_secret.clone())),
            2 => Some(self.service.clone()),
            _ => None,
        };
        if let Some((user, pass)) = login {
            // A client id of its own so the simulated machine's session is
            // not taken over by the fuzz connection.
            let mut c = Connect::new(format!("fuzz-{}", self.cases.load(Ordering::Relaxed)));
            c.keep_alive = 30;
            c.login = Some(Login::new(user, pass));
            if Packet::Connect(c).write(&mut bytes, MAX_PACKET).is_err() {
                return;
            }
        }
        bytes.extend_from_slice(rest);
        self.cases.fetch_add(1, Ordering::Relaxed);
        let addr = self.mqtt;
        self.rt.block_on(async move {
            let Ok(mut stream) = tokio::net::TcpStream::connect(addr).await else {
                panic!("the edge refused a TCP connection");
            };
            let (mut rd, mut wr) = stream.split();
            let write = async {
                // The edge may close before reading everything: not an error.
                let _ = wr.write_all(&bytes).await;
                let _ = wr.shutdown().await;
            };
            let read = async {
                let mut sink = Vec::new();
                tokio::time::timeout(STEP, rd.read_to_end(&mut sink)).await
            };
            let ((), r) = tokio::join!(write, read);
            assert!(
                r.is_ok(),
                "the edge did not close a connection whose client stopped sending"
            );
        });
        self.check_alive();
    }

    // ------------------------------------------------------------- devices

    /// `device_payload`: every uplink type decoded from the input, then one
    /// order on the never-answering machine and a sequence of acks, results,
    /// inventories, states and pongs built from the input, delivered through
    /// the gateway's uplink dispatcher (results awaited in place of the
    /// dispatcher's spawned task, so the case is deterministic). Afterwards
    /// the harness answers like a healthy machine so the order settles.
    /// Invariants: the order's status only moves along `domain::order`,
    /// amounts and counts stay consistent, every reservation is released
    /// once the order is final, nothing panics.
    pub fn device_payload(&self, data: &[u8]) {
        decode_uplinks(data);
        self.cases.fetch_add(1, Ordering::Relaxed);
        self.rt.block_on(self.device_case(data));
        self.check_alive();
    }

    async fn device_case(&self, data: &[u8]) {
        let mut r = Reader::new(data);
        let orders = &self.handle.orders;
        let a = self.ack_machine;
        let stock = msg::InventoryMsg {
            items: fuzz_stock(),
        };
        // The machine's own snapshot, as it publishes on connect: earlier
        // cases may have replaced it.
        self.handle
            .uplinks
            .on_uplink(a, 0, Uplink::Inventory, &Bytes::from(msg::encode(&stock)));

        let n_lines = 1 + usize::from(r.u8() % 3);
        let lines: Vec<(i64, u32)> = (0..n_lines)
            .map(|_| (i64::from(1 + r.u8() % 3), 1 + u32::from(r.u8() % 3)))
            .collect();
        let otn = format!("fz-{}", self.cases.load(Ordering::Relaxed));
        let req = PlaceRequest {
            merchant: self.appid.clone(),
            machine_no: a,
            lines,
            out_trade_no: Some(otn.clone()),
            pay_later: false,
            answer_by: crate::orders::answer_by(&self.handle.settings.orders),
        };
        let svc = orders.clone();
        let placing = tokio::spawn(async move { svc.place_here(req).await });

        // The order, once its command is out and its ack awaited.
        let deadline = tokio::time::Instant::now() + STEP;
        let mut current = None;
        while tokio::time::Instant::now() < deadline {
            if placing.is_finished() {
                break;
            }
            if let Ok(Some(o)) = self
                .handle
                .store
                .order_by_out_trade_no(&self.appid, &otn)
                .await
            {
                if orders.awaiting_ack(o.order_id) {
                    current = Some(o.order_id);
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let previous = self.known_order(0);
        if let Some(id) = current {
            self.remember_order(id);
        }
        let mut status = Status::Dispatching;

        // The input's uplinks.
        let mut ops = 0;
        while !r.is_empty() && ops < 32 {
            ops += 1;
            let op = r.u8();
            let machine = if op & 0x10 == 0 {
                a
            } else {
                self.quiet_machine
            };
            let order_id = match (op >> 5) & 3 {
                0 | 1 => current.unwrap_or(0),
                2 => previous.unwrap_or(1),
                _ => r.u64(),
            };
            let raw = op & 0x80 != 0 && op & 0x08 != 0;
            let (kind, payload) = match op % 5 {
                0 => (Uplink::Ack, {
                    let ack = AckMsg {
                        order_id,
                        accepted: r.u8() & 1 == 1,
                        reason: r.opt_str(),
                    };
                    msg::encode(&ack)
                }),
                1 | 2 => (Uplink::Result, {
                    let order_lines = match current {
                        Some(id) => self
                            .handle
                            .store
                            .order(id)
                            .await
                            .ok()
                            .flatten()
                            .map(|o| o.lines)
                            .unwrap_or_default(),
                        None => Vec::new(),
                    };
                    let n = usize::from(r.u8() % 4);
                    let items = (0..n)
                        .map(|i| {
                            let sel = r.u8();
                            match order_lines.get(i) {
                                // Mostly well-formed lines, so settlement
                                // paths are reached, not just refusals.
                                Some(l) if sel & 0x80 == 0 => ResultItem {
                                    product_id: l.product_id,
                                    quantity: l.quantity,
                                    dispensed: u32::from(sel) % (l.quantity + 1),
                                },
                                _ => ResultItem {
                                    product_id: i64::from(r.u8() % 5) - 1,
                                    quantity: u32::from(r.u8() % 5),
                                    dispensed: u32::from(sel % 7),
                                },
                            }
                        })
                        .collect();
                    msg::encode(&ResultMsg {
                        order_id,
                        items,
                        error: r.opt_str(),
                    })
                }),
                3 => (Uplink::Inventory, {
                    let n = usize::from(r.u8() % 4);
                    let items = (0..n)
                        .map(|_| InventoryItem {
                            product_id: i64::from(r.u8() % 5),
                            stock: r.u32(),
                            price: i64::from(r.u32()) - 1000,
                        })
                        .collect();
                    msg::encode(&msg::InventoryMsg { items })
                }),
                // State and pong go to the never-connected machine with a
                // made-up epoch: an `{"online":false}` for the connected one
                // would take it offline for every later case.
                _ => (
                    if op & 1 == 0 {
                        Uplink::State
                    } else {
                        Uplink::Pong
                    },
                    { format!(r#"{{"online":{},"id":{}}}"#, op & 2 == 0, order_id).into_bytes() },
                ),
            };
            let payload = if raw { r.bytes().to_vec() } else { payload };
            let payload = Bytes::from(payload);
            match kind {
                Uplink::Result => orders.on_result(machine, payload).await,
                Uplink::Ack => orders.on_ack(machine, &payload).await,
                Uplink::State | Uplink::Pong => {
                    self.handle
                        .uplinks
                        .on_uplink(self.quiet_machine, 9_999_999, kind, &payload)
                }
                _ => self.handle.uplinks.on_uplink(machine, 0, kind, &payload),
            }
            if let Some(id) = current {
                status = self.check_order(id, status).await;
            }
        }

        // Settle like a healthy machine: accept, then dispense everything.
        if let Some(id) = current {
            let ack = AckMsg {
                order_id: id,
                accepted: true,
                reason: None,
            };
            orders.on_ack(a, &Bytes::from(msg::encode(&ack))).await;
            if let Ok(Some(o)) = self.handle.store.order(id).await {
                let items = o
                    .lines
                    .iter()
                    .map(|l| ResultItem {
                        product_id: l.product_id,
                        quantity: l.quantity,
                        dispensed: l.quantity,
                    })
                    .collect();
                let result = ResultMsg {
                    order_id: id,
                    items,
                    error: None,
                };
                orders.on_result(a, Bytes::from(msg::encode(&result))).await;
            }
        }
        let placed = tokio::time::timeout(STEP, placing).await;
        assert!(placed.is_ok(), "placing an order did not finish");
        if let Some(id) = current {
            let mut last = status;
            let deadline = tokio::time::Instant::now() + STEP;
            loop {
                last = self.check_order(id, last).await;
                if last.is_final() && orders.inventory.reserved_total(&a) == 0 {
                    break;
                }
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "order {id} stuck in {last:?} with {} reserved",
                    orders.inventory.reserved_total(&a)
                );
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
    }

    /// The stored order's status may only have moved along the state
    /// machine since `before`; its figures stay consistent.
    async fn check_order(&self, id: u64, before: Status) -> Status {
        let Ok(Some(o)) = self.handle.store.order(id).await else {
            panic!("order {id} vanished from storage");
        };
        assert!(
            reachable(before, o.status),
            "order {id} went from {before:?} to {:?}",
            o.status
        );
        assert!(o.amount >= 0, "negative amount {}", o.amount);
        assert!(
            (0..=o.amount).contains(&o.refund_amount),
            "refund {} outside 0..={}",
            o.refund_amount,
            o.amount
        );
        for l in &o.lines {
            assert!(
                l.dispensed <= l.quantity,
                "dispensed more than ordered: {l:?}"
            );
        }
        for s in self.handle.orders.inventory.view(&self.ack_machine) {
            assert!(
                i64::from(s.stock) >= 0 && i64::from(s.reserved) >= 0,
                "stock figures {s:?}"
            );
        }
        o.status
    }

    // ---------------------------------------------------------------- http

    /// `http_api`: one request through the real axum router (no socket),
    /// built from the input: method, a path (every route, with a segment
    /// from the input, a real order id or machine number, or a raw path),
    /// credentials (none, valid, wrong, another merchant's), a query, one
    /// extra header and the body. Invariants: no panic; no 5xx; every answer
    /// under `/api/openapi/v1` (a wrong method on a known path included) is
    /// the JSON envelope with a code from `proto::codes` other than 50000;
    /// so is every unknown route, which elsewhere may be a bare 404/405 (a
    /// wrong method on `/healthz`, say).
    pub fn http_api(&self, data: &[u8]) {
        use axum::body::Body;
        use tower::ServiceExt;

        const METHODS: [&str; 7] = ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"];
        const PATHS: [&str; 24] = [
            "/api/openapi/v1/orders",
            "/api/openapi/v1/orders/{}",
            "/api/openapi/v1/orders/{}/pay",
            "/api/openapi/v1/orders/{}/cancel",
            "/api/openapi/v1/orders/{}/refund",
            "/api/openapi/v1/machines",
            "/api/openapi/v1/machines/{}",
            "/api/openapi/v1/machines/{}/ping",
            "/api/openapi/v1/merchant",
            "/api/openapi/v1/events",
            "/api/openapi/v1/events/{}/replay",
            "/api/openapi/v1/{}",
            "/healthz",
            "/readyz",
            "/metrics",
            "/dashboard",
            "/dashboard/app.js",
            "/dashboard/api/summary",
            "/dashboard/api/machines",
            "/dashboard/api/orders/{}",
            "/{}",
            "/api/openapi/v1/orders/{}/{}",
            // Appended: corpus inputs whose path byte is below 22 keep their path.
            "/dashboard/api/machines/{}",
            "/dashboard/api/machines/{}/ping",
        ];
        let mut r = Reader::new(data);
        let method = METHODS[usize::from(r.u8()) % METHODS.len()];
        let template = PATHS[usize::from(r.u8()) % PATHS.len()];
        let auth = r.u8();
        let seg_mode = r.u8();
        let segment = match seg_mode % 4 {
            0 => String::from_utf8_lossy(r.bytes()).into_owned(),
            1 => self.known_order(r.u8()).unwrap_or(1).to_string(),
            2 => self.shop_machine.to_string(),
            _ => r.u64().to_string(),
        };
        let query = String::from_utf8_lossy(r.bytes()).into_owned();
        let header_name = r.bytes().to_vec();
        let header_value = r.bytes().to_vec();
        let body = r.rest().to_vec();

        let mut path = template.replace("{}", &segment);
        if !query.is_empty() {
            path.push('?');
            path.push_str(&query);
        }
        let mut req = axum::http::Request::builder().method(method).uri(&path);
        let (appid, secret) = match auth % 5 {
            0 => (None, None),
            1 => (Some(self.appid.clone()), Some(self.appsecret.clone())),
            2 => (Some(self.appid.clone()), Some("wrong".to_owned())),
            3 => (
                Some(self.other_appid.clone()),
                Some(self.other_appsecret.clone()),
            ),
            _ => (
                Some(String::from_utf8_lossy(&header_value).into_owned()),
                Some(segment.clone()),
            ),
        };
        if let Some(a) = appid {
            req = req.header("Appid", a);
        }
        if let Some(s) = secret {
            req = req.header("AppSecret", s);
        }
        if auth & 0x80 != 0 {
            req = req.header("Content-Type", "application/json");
        }
        if auth & 0x40 != 0 {
            use base64::Engine;
            let basic = base64::engine::general_purpose::STANDARD
                .encode(format!("operator:{OPERATOR_PASSWORD}"));
            req = req.header("Authorization", format!("Basic {basic}"));
        }
        if !header_name.is_empty() {
            req = req.header(header_name.as_slice(), header_value.as_slice());
        }
        // Inputs that are not a valid HTTP request (bad URI, header bytes)
        // never reach the router: hyper refuses them on the wire.
        let Ok(req) = req.body(Body::from(body)) else {
            return;
        };
        self.cases.fetch_add(1, Ordering::Relaxed);
        let router = self.router.clone();
        let (status, bytes) = self.rt.block_on(async move {
            let resp = tokio::time::timeout(STEP, router.oneshot(req)).await;
            let Ok(Ok(resp)) = resp else {
                panic!("the router did not answer");
            };
            let status = resp.status();
            let body = axum::body::to_bytes(resp.into_body(), 64 * 1024 * 1024).await;
            (status, body.unwrap_or_default())
        });
        let api = !matches!(
            template,
            "/healthz"
                | "/readyz"
                | "/metrics"
                | "/dashboard"
                | "/dashboard/app.js"
                | "/dashboard/api/summary"
                | "/dashboard/api/machines"
                | "/dashboard/api/machines/{}"
                | "/dashboard/api/machines/{}/ping"
                | "/dashboard/api/orders/{}"
        );
        // `/readyz` answers 503 while not ready (documented in ops.rs).
        let readyz_503 = template == "/readyz" && status.as_u16() == 503;
        assert!(
            !status.is_server_error() || readyz_503,
            "{method} {path} answered {status}: {}",
            String::from_utf8_lossy(&bytes)
        );
        let bare_allowed =
            !path.starts_with("/api/openapi/v1") && matches!(status.as_u16(), 404 | 405);
        if api && method != "HEAD" && !bare_allowed {
            let v: serde_json::Value = match serde_json::from_slice(&bytes) {
                Ok(v) => v,
                Err(_) => panic!(
                    "{method} {path} answered {status} without an envelope: {}",
                    String::from_utf8_lossy(&bytes)
                ),
            };
            let code = v.get("code").and_then(|c| c.as_i64()).unwrap_or(-1);
            let known = i32::try_from(code).ok().and_then(ErrorCode::from_code);
            assert!(
                known.is_some_and(|c| c != ErrorCode::Internal),
                "{method} {path} answered code {code}: {v}"
            );
            if let Some(id) = v
                .get("data")
                .and_then(|d| d.get("order_id"))
                .and_then(|i| i.as_u64())
            {
                self.remember_order(id);
            }
        }
        self.check_alive();
    }
}

impl Default for Harness {
    fn default() -> Self {
        Self::new()
    }
}

/// Whether an order may get from status `a` to status `b` by any sequence
/// of transitions of `domain::order::apply`.
pub fn reachable(a: Status, b: Status) -> bool {
    use Status::*;
    fn next(s: Status) -> &'static [Status] {
        match s {
            AwaitingPayment => &[Dispatching, Expired, Cancelled],
            Dispatching => &[Dispensing, Rejected],
            // Rejected: an acceptance recorded whose `go` was withheld.
            Dispensing => &[Completed, PartiallyDispensed, Failed, Unknown, Rejected],
            Unknown => &[Completed, PartiallyDispensed, Failed],
            Completed | PartiallyDispensed | Failed | Rejected | Expired | Cancelled => &[],
        }
    }
    let mut todo = vec![a];
    let mut seen = Vec::new();
    while let Some(s) = todo.pop() {
        if s == b {
            return true;
        }
        if !seen.contains(&s) {
            seen.push(s);
            todo.extend_from_slice(next(s));
        }
    }
    false
}

/// Reads fuzz input as a sequence of fields; past the end every read gives
/// zeros, so any input is a complete case.
struct Reader<'a> {
    data: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(data: &'a [u8]) -> Self {
        Self { data }
    }

    fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    fn u8(&mut self) -> u8 {
        match self.data.split_first() {
            Some((&b, rest)) => {
                self.data = rest;
                b
            }
            None => 0,
        }
    }

    fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }

    fn u64(&mut self) -> u64 {
        u64::from(self.u32()) | (u64::from(self.u32()) << 32)
    }

    /// A length byte, then that many bytes (fewer at the end).
    fn bytes(&mut self) -> &'a [u8] {
        let n = usize::from(self.u8()).min(self.data.len());
        let (head, rest) = self.data.split_at(n);
        self.data = rest;
        head
    }

    fn opt_str(&mut self) -> Option<String> {
        let b = self.bytes();
        (!b.is_empty()).then(|| String::from_utf8_lossy(b).into_owned())
    }

    fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.data)
    }
}

/// The harness machines' stock: ample, so stock never decides a case.
fn fuzz_stock() -> Vec<InventoryItem> {
    [(1, 350), (2, 200), (3, 1)]
        .into_iter()
        .map(|(product_id, price)| InventoryItem {
            product_id,
            stock: 1_000_000,
            price,
        })
        .collect()
}
