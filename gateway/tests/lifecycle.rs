//! Operator lifecycle with the real binary over real sockets: `vendgate
//! serve` in one process, the operator commands (`machine disable|enable|
//! transfer|remove`, `merchant disable|enable`, `service remove`, `export
//! orders`) from others against the same database, simulated machines, the
//! open API, a webhook receiver and `/metrics`.
//!
//! On SQLite; `pg_lifecycle.rs` runs this file again on PostgreSQL (the
//! backend is picked from the test binary's `pg_` name prefix, or by
//! `VENDGATE_TEST_DATABASE=postgres|sqlite`). Every wait is on a condition
//! with a deadline.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, TimeZone, Utc};
use serde_json::{json, Value};
use vendgate::domain::order::{Line, Status};
use vendgate::secrets::{generate_appid, generate_secret, SecretHash};
use vendgate::storage::{NewMachine, NewMerchant, NewOrder, OrderChange, OrderEvent, Storage};
use vendgate::Settings;
use vendgate_proto::machine::MachineNo;
use vendgate_proto::msg::InventoryItem;
use vendgate_sim::{SimConfig, SimHandle, SimMachine};
use vendgate_testkit::process::{Proc, Spec};

const BIN: &str = env!("CARGO_BIN_EXE_vendgate");
/// Generous: the suite must pass on a loaded 2-core machine.
const DEADLINE: Duration = Duration::from_secs(20);
/// What the operator commands promise: a live connection of a disabled or
/// removed account is closed within the 2 s check plus its read, and the
/// order path follows a change within the 2 s owner cache.
const ENFORCED_WITHIN: Duration = Duration::from_secs(3);

/// Whether this test binary runs on PostgreSQL (as the e2e harness decides).
fn on_postgres() -> bool {
    match std::env::var("VENDGATE_TEST_DATABASE").as_deref() {
        Ok("postgres") => true,
        Ok("sqlite") => false,
        Ok("") | Err(_) => std::env::current_exe()
            .ok()
            .and_then(|p| {
                p.file_name()
                    .map(|n| n.to_string_lossy().starts_with("pg_"))
            })
            .unwrap_or(false),
        Ok(other) => panic!("VENDGATE_TEST_DATABASE={other:?}: use postgres or sqlite"),
    }
}

/// A data directory, its configuration file, and (once started) the
/// `vendgate serve` process on it.
struct Gateway {
    dir: tempfile::TempDir,
    config: PathBuf,
    database_url: String,
    mqtt: SocketAddr,
    http: SocketAddr,
    proc: Option<Proc>,
    client: reqwest::Client,
}

impl Gateway {
    /// Writes the configuration (`extra` is appended TOML); starts nothing.
    async fn configure(extra: &str) -> Gateway {
        let dir = tempfile::tempdir().expect("temp dir");
        let database_url = if on_postgres() {
            vendgate_testkit::pg::database_for_dir(dir.path()).await
        } else {
            String::new()
        };
        let (mqtt, http) = (vendgate_testkit::free_addr(), vendgate_testkit::free_addr());
        let config = dir.path().join("vendgate.toml");
        let text = format!(
            "data_dir = {data:?}\n\
             database_url = {database_url:?}\n\
             [mqtt]\naddr = \"{mqtt}\"\n\
             [http]\naddr = \"{http}\"\nrate_limit = 0\n\
             [notifier]\nallow_private_targets = true\nbackoff_base = \"100ms\"\n\
             backoff_cap = \"1s\"\npoll_interval = \"100ms\"\ntimeout = \"2s\"\n\
             [log]\nlevel = \"info\"\n\
             {extra}\n",
            data = dir.path().display().to_string(),
        );
        std::fs::write(&config, text).expect("config file");
        Gateway {
            dir,
            config,
            database_url,
            mqtt,
            http,
            proc: None,
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .expect("HTTP client"),
        }
    }

    /// The gateway's database, opened from the test process (for data an
    /// operator command cannot make, such as orders of years ago).
    async fn store(&self) -> Arc<dyn Storage> {
        let mut s = Settings::for_tests(self.dir.path());
        s.database_url = self.database_url.clone();
        vendgate::storage::open(&s).await.expect("open storage")
    }

    /// `vendgate --config …` with the test process's `VENDGATE_*` variables
    /// removed (they would be read as settings).
    fn command(&self) -> Command {
        let mut cmd = Command::new(BIN);
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("VENDGATE_") {
                cmd.env_remove(&k);
            }
        }
        cmd.env_remove("RUST_LOG");
        cmd.arg("--config").arg(&self.config);
        cmd
    }

    /// Start `vendgate serve` and wait until `/readyz` says ready.
    async fn start(&mut self) {
        let mut cmd = self.command();
        cmd.arg("serve");
        self.proc = Some(Proc::spawn(Spec {
            name: "vendgate serve".into(),
            command: cmd,
            log: self.dir.path().join("vendgate.log"),
            graceful_signal: None,
            cleanup_dir: None,
        }));
        let url = format!("http://{}/readyz", self.http);
        let client = &self.client;
        let ready = wait(|| async {
            client
                .get(&url)
                .send()
                .await
                .is_ok_and(|r| r.status().is_success())
        })
        .await;
        assert!(ready, "gateway not ready:\n{}", self.log_tail());
    }

    fn log_tail(&self) -> String {
        self.proc
            .as_ref()
            .map(|p| p.log_tail(40))
            .unwrap_or_default()
    }

    /// Run an operator command; its stdout, or Err with its stderr.
    fn cli(&self, args: &[&str]) -> Result<String, String> {
        let out = self.command().args(args).output().expect("run vendgate");
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    #[track_caller]
    fn cli_ok(&self, args: &[&str]) -> String {
        self.cli(args)
            .unwrap_or_else(|e| panic!("vendgate {args:?} failed: {e}"))
    }

    /// `merchant add`: (appid, appsecret).
    fn merchant(&self, name: &str, notify_url: Option<&str>) -> (String, String) {
        let mut args = vec!["merchant", "add", "--name", name];
        if let Some(u) = notify_url {
            args.extend(["--notify-url", u]);
        }
        let out = self.cli_ok(&args);
        (value(&out, "appid"), value(&out, "appsecret"))
    }

    /// `machine add`: the machine's secret.
    fn machine(&self, appid: &str, m: &str) -> String {
        let out = self.cli_ok(&["machine", "add", "--merchant", appid, "--machine-no", m]);
        value(&out, "secret")
    }

    /// A simulated machine with product 1 in stock, connected.
    async fn sim(&self, m: &str, secret: &str) -> SimHandle {
        let mut c = SimConfig::new(self.mqtt.to_string(), no(m), secret);
        c.inventory = vec![InventoryItem {
            product_id: 1,
            stock: 100,
            price: 100,
        }];
        let sim = SimMachine::spawn(c);
        assert!(sim.wait_ready(DEADLINE).await, "{m} ready");
        sim
    }

    /// An open API call as merchant `who`: (HTTP status, envelope).
    async fn api(&self, who: &(String, String), post: Option<Value>, path: &str) -> (u16, Value) {
        let url = format!("http://{}/api/openapi/v1{path}", self.http);
        let req = match &post {
            Some(body) => self.client.post(url).body(body.to_string()),
            None => self.client.get(url),
        };
        let r = req
            .header("Appid", &who.0)
            .header("AppSecret", &who.1)
            .send()
            .await
            .expect("HTTP request");
        let status = r.status().as_u16();
        (status, r.json().await.expect("an envelope"))
    }

    /// `POST /orders` for `quantity` of `product` on machine `m`.
    async fn order(&self, who: &(String, String), m: &str, product: i64) -> (u16, Value) {
        let body =
            json!({ "machine_no": m, "products": [{ "product_id": product, "quantity": 1 }] });
        self.api(who, Some(body), "/orders").await
    }

    /// Wait until the order's status is `want`.
    async fn wait_status(&self, who: &(String, String), id: u64, want: &str) {
        let t = Instant::now();
        loop {
            let (_, v) = self.api(who, None, &format!("/orders/{id}")).await;
            if v["data"]["status"] == want {
                return;
            }
            assert!(t.elapsed() < DEADLINE, "order {id} never {want}: {v}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn metrics(&self) -> String {
        self.client
            .get(format!("http://{}/metrics", self.http))
            .send()
            .await
            .expect("GET /metrics")
            .text()
            .await
            .expect("metrics text")
    }
}

fn no(m: &str) -> MachineNo {
    m.parse().expect("machine_no")
}

fn value(out: &str, key: &str) -> String {
    out.split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("no {key}= in {out}"))
        .to_owned()
}

/// A sample's value: the line `name{…label…} value` (or `name value`).
fn sample(text: &str, name: &str, label: &str) -> f64 {
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(['{', ' ']))
                && l.contains(label)
        })
        .find_map(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0.0)
}

/// Re-check `cond` every 20 ms until it holds (true) or [`DEADLINE`] (false).
async fn wait<F, Fut>(cond: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    vendgate_testkit::wait_for(DEADLINE, Duration::from_millis(20), cond)
        .await
        .is_ok()
}

/// Re-run `probe` until it answers `code`; how long that took (panics with
/// the last answer at [`DEADLINE`]).
async fn until_code<Fut>(what: &str, code: i64, mut probe: impl FnMut() -> Fut) -> Duration
where
    Fut: std::future::Future<Output = (u16, Value)>,
{
    let t = Instant::now();
    loop {
        let (_, v) = probe().await;
        if v["code"] == code {
            return t.elapsed();
        }
        assert!(t.elapsed() < DEADLINE, "{what}: never {code}, last {v}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A client of the MQTT listener: Ok once CONNACK accepted (the event loop
/// keeps running; `closed` fires when the gateway closes the connection),
/// or the refusal.
struct MqttClient {
    _client: rumqttc::AsyncClient,
    closed: tokio::sync::oneshot::Receiver<()>,
}

async fn mqtt_connect(
    addr: SocketAddr,
    client_id: &str,
    user: &str,
    pass: &str,
) -> Result<MqttClient, rumqttc::ConnectionError> {
    let mut o = rumqttc::MqttOptions::new(client_id, addr.ip().to_string(), addr.port());
    o.set_credentials(user, pass);
    o.set_keep_alive(Duration::from_secs(30));
    let (client, mut el) = rumqttc::AsyncClient::new(o, 16);
    loop {
        match tokio::time::timeout(DEADLINE, el.poll()).await {
            Err(_) => panic!("no CONNACK for {client_id}"),
            Ok(Err(e)) => return Err(e),
            Ok(Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_)))) => break,
            Ok(Ok(_)) => {}
        }
    }
    let (tx, closed) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        while el.poll().await.is_ok() {}
        let _ = tx.send(());
    });
    Ok(MqttClient {
        _client: client,
        closed,
    })
}

fn not_authorized(r: Result<MqttClient, rumqttc::ConnectionError>) -> bool {
    matches!(
        r,
        Err(rumqttc::ConnectionError::ConnectionRefused(
            rumqttc::ConnectReturnCode::NotAuthorized
        ))
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn machine_disable_enable_transfer_and_remove() {
    let mut gw = Gateway::configure("").await;
    gw.start().await;
    let a = gw.merchant("shop-a", None);
    let b = gw.merchant("shop-b", None);
    let secret = gw.machine(&a.0, "00000101");
    let sim = gw.sim("00000101", &secret).await;
    let unknown = gw.order(&a, "00000199", 1).await;
    assert_eq!(unknown.1["code"], 30001, "{unknown:?}");

    let (_, v) = gw.order(&a, "00000101", 1).await;
    assert_eq!(v["code"], 0, "{v}");
    let first = v["data"]["order_id"].as_u64().expect("order_id");
    gw.wait_status(&a, first, "completed").await;

    // Disable: the live connection is closed within the bound, a CONNECT
    // is refused as not authorized and counted, and an order answers
    // exactly as for an unknown machine.
    let refused_before = sample(
        &gw.metrics().await,
        "vendgate_mqtt_connect_refused_total",
        "reason=\"disabled\"",
    );
    let out = gw.cli_ok(&["machine", "disable", "--machine", "00000101"]);
    assert_eq!(out.trim(), "machine=00000101 state=disabled");
    let t = Instant::now();
    assert!(
        sim.wait_disconnected(DEADLINE).await,
        "disabled machine still connected"
    );
    let closed_after = t.elapsed();
    assert!(
        closed_after <= ENFORCED_WITHIN,
        "closed after {closed_after:?}"
    );
    let r = mqtt_connect(gw.mqtt, "00000101", "00000101", &secret).await;
    assert!(not_authorized(r), "a disabled machine's CONNECT is refused");
    let metrics = gw.metrics().await;
    let refused = sample(
        &metrics,
        "vendgate_mqtt_connect_refused_total",
        "reason=\"disabled\"",
    );
    assert!(refused > refused_before, "refusal counted: {refused}");
    // Product 999 is not carried: 30004 while the machine is the
    // merchant's and online, so the probe itself never places an order.
    let took = until_code("disabled machine", 30001, || gw.order(&a, "00000101", 999)).await;
    assert!(took <= ENFORCED_WITHIN, "30001 after {took:?}");
    let disabled = gw.order(&a, "00000101", 1).await;
    let unknown = gw.order(&a, "00000199", 1).await;
    assert_eq!(
        disabled, unknown,
        "a disabled machine answers as an unknown one"
    );
    let listed = gw.cli_ok(&["machine", "list"]);
    assert!(
        listed
            .lines()
            .any(|l| l.starts_with("00000101\t") && l.ends_with("\tdisabled")),
        "{listed}"
    );

    // Enable: the machine reconnects by itself and takes orders again.
    gw.cli_ok(&["machine", "enable", "--machine", "00000101"]);
    assert!(sim.wait_ready(DEADLINE).await, "reconnects once enabled");
    until_code("enabled machine", 30004, || gw.order(&a, "00000101", 999)).await;
    let (_, v) = gw.order(&a, "00000101", 1).await;
    assert_eq!(v["code"], 0, "{v}");
    let second = v["data"]["order_id"].as_u64().expect("order_id");
    gw.wait_status(&a, second, "completed").await;

    // Transfer: within the owner cache's bound the old merchant gets 30001
    // and the new one can order; past orders stay the old merchant's.
    let out = gw.cli_ok(&[
        "machine",
        "transfer",
        "--machine",
        "00000101",
        "--merchant",
        &b.0,
    ]);
    assert_eq!(out.trim(), format!("machine=00000101 merchant={}", b.0));
    let took = until_code("old owner", 30001, || gw.order(&a, "00000101", 999)).await;
    assert!(took <= ENFORCED_WITHIN, "old owner refused after {took:?}");
    until_code("new owner", 30004, || gw.order(&b, "00000101", 999)).await;
    let (_, v) = gw.order(&b, "00000101", 1).await;
    assert_eq!(v["code"], 0, "{v}");
    let third = v["data"]["order_id"].as_u64().expect("order_id");
    gw.wait_status(&b, third, "completed").await;
    let (_, v) = gw.api(&b, None, &format!("/orders/{first}")).await;
    assert_ne!(
        v["code"], 0,
        "the old merchant's order is not the new one's: {v}"
    );

    // Remove: refused with an order in flight (an unpaid one), done once
    // it is cancelled; the connection is closed, the history stays.
    let body = json!({ "machine_no": "00000101", "pay_later": true,
                       "products": [{ "product_id": 1, "quantity": 1 }] });
    let (_, v) = gw.api(&b, Some(body), "/orders").await;
    assert_eq!(v["code"], 0, "{v}");
    let unpaid = v["data"]["order_id"].as_u64().expect("order_id");
    let err = gw
        .cli(&["machine", "remove", "--machine", "00000101"])
        .expect_err("remove refused with an order in flight");
    assert!(err.contains("in flight"), "{err}");
    let (_, v) = gw
        .api(&b, Some(json!({})), &format!("/orders/{unpaid}/cancel"))
        .await;
    assert_eq!(v["code"], 0, "{v}");
    let out = gw.cli_ok(&["machine", "remove", "--machine", "00000101"]);
    assert_eq!(out.trim(), "machine=00000101 state=removed");
    assert!(
        sim.wait_disconnected(DEADLINE).await,
        "removed machine still connected"
    );
    let r = mqtt_connect(gw.mqtt, "00000101", "00000101", &secret).await;
    assert!(not_authorized(r), "a removed machine's CONNECT is refused");
    until_code("removed machine", 30001, || gw.order(&b, "00000101", 999)).await;
    for (who, id, status) in [
        (&a, first, "completed"),
        (&b, third, "completed"),
        (&b, unpaid, "cancelled"),
    ] {
        let (_, v) = gw.api(who, None, &format!("/orders/{id}")).await;
        assert_eq!(v["code"], 0, "order {id} readable after removal: {v}");
        assert_eq!(v["data"]["status"], status, "{v}");
    }
    let listed = gw.cli_ok(&["machine", "list"]);
    assert!(
        listed
            .lines()
            .any(|l| l.starts_with("00000101\t") && l.ends_with("\tremoved")),
        "{listed}"
    );
    sim.shutdown().await;
}

/// A webhook receiver: its URL and the bodies it got.
async fn receiver() -> (String, Arc<Mutex<Vec<Value>>>) {
    let got = Arc::new(Mutex::new(Vec::new()));
    let g = got.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |body: String| {
            let g = g.clone();
            async move {
                if let Ok(v) = serde_json::from_str::<Value>(&body) {
                    g.lock().expect("bodies").push(v);
                }
                "success"
            }
        }),
    );
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(l, app).await });
    (format!("http://{addr}/hook"), got)
}

fn got(bodies: &Mutex<Vec<Value>>, kind: &str, m: &str) -> bool {
    bodies
        .lock()
        .expect("bodies")
        .iter()
        .any(|v| v["type"] == kind && v["data"]["machine_no"] == m)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn merchant_disable_refuses_its_api_and_holds_its_webhooks() {
    let (url, bodies) = receiver().await;
    let mut gw = Gateway::configure("").await;
    gw.start().await;
    let a = gw.merchant("shop-a", Some(&url));
    let c = gw.merchant("shop-c", Some(&url));
    let (sa, sc) = (gw.machine(&a.0, "00000201"), gw.machine(&c.0, "00000202"));
    let sim_a = gw.sim("00000201", &sa).await;
    let sim_c = gw.sim("00000202", &sc).await;
    assert!(
        wait(|| async {
            got(&bodies, "machine.online", "00000201") && got(&bodies, "machine.online", "00000202")
        })
        .await,
        "webhooks delivered while enabled"
    );
    let (_, v) = gw.api(&a, None, "/machines").await;
    assert_eq!(v["code"], 0, "{v}");

    gw.cli_ok(&["merchant", "disable", "--appid", &a.0]);
    until_code("disabled merchant", 10002, || gw.api(&a, None, "/machines")).await;
    let wrong = gw
        .api(&(a.0.clone(), "0".repeat(32)), None, "/machines")
        .await;
    let disabled = gw.api(&a, None, "/machines").await;
    assert_eq!(disabled, wrong, "answered like a wrong AppSecret");

    // A's machine goes offline first (its event is written with the
    // presence change `machine list` shows), C's after: once C's event is
    // delivered, the notifier has passed A's, which it holds.
    sim_a.shutdown().await;
    assert!(
        wait(|| async {
            gw.cli_ok(&["machine", "list"])
                .lines()
                .any(|l| l.starts_with("00000201\t") && l.contains("\toffline\t"))
        })
        .await,
        "A's machine recorded offline"
    );
    sim_c.shutdown().await;
    assert!(
        wait(|| async { got(&bodies, "machine.offline", "00000202") }).await,
        "the enabled merchant's webhook is delivered"
    );
    assert!(
        !got(&bodies, "machine.offline", "00000201"),
        "the disabled merchant's webhook is held"
    );

    gw.cli_ok(&["merchant", "enable", "--appid", &a.0]);
    assert!(
        wait(|| async { got(&bodies, "machine.offline", "00000201") }).await,
        "held webhook delivered after enable"
    );
    until_code("enabled merchant", 0, || gw.api(&a, None, "/machines")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_remove_closes_its_live_connection() {
    let mut gw = Gateway::configure("").await;
    gw.start().await;
    let out = gw.cli_ok(&["service", "add", "--name", "ops"]);
    let (user, pass) = (value(&out, "username"), value(&out, "password"));
    let listed = gw.cli_ok(&["service", "list"]);
    assert!(listed.starts_with(&format!("{user}\tops\t")), "{listed}");
    let live = mqtt_connect(gw.mqtt, "ops-tool", &user, &pass)
        .await
        .expect("service connects");

    let out = gw.cli_ok(&["service", "remove", "--username", &user]);
    assert_eq!(out.trim(), format!("username={user} state=removed"));
    let t = Instant::now();
    tokio::time::timeout(DEADLINE, live.closed)
        .await
        .expect("connection closed")
        .expect("event loop ended");
    assert!(
        t.elapsed() <= ENFORCED_WITHIN,
        "closed after {:?}",
        t.elapsed()
    );
    assert!(not_authorized(
        mqtt_connect(gw.mqtt, "ops-tool", &user, &pass).await
    ));
    assert_eq!(gw.cli_ok(&["service", "list"]), "");
}

fn at(y: i32, mo: u32, d: u32, min: u32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(y, mo, d, 0, min, 0)
        .single()
        .expect("time")
}

/// A merchant with a known AppSecret and machine 00000301, in storage.
async fn seed_merchant(store: &dyn Storage, name: &str) -> (String, String) {
    let (appid, secret) = (generate_appid(), generate_secret());
    store
        .create_merchant(NewMerchant {
            name: name.into(),
            notify_url: None,
            appid: appid.clone(),
            appsecret_hash: SecretHash::new(&secret),
            appsecret_enc: None,
        })
        .await
        .expect("merchant");
    (appid, secret)
}

/// Insert order `id` created at `created` and moved at `changed` from
/// `dispensing` to `status` with `lines` (as the order service writes it).
#[allow(clippy::too_many_arguments)]
async fn seed_order(
    store: &dyn Storage,
    id: u64,
    merchant: &str,
    out_trade_no: Option<&str>,
    created: DateTime<Utc>,
    changed: DateTime<Utc>,
    status: Status,
    refund_amount: i64,
) {
    let line = |dispensed| Line {
        product_id: 1,
        quantity: 2,
        dispensed,
        unit_price: 100,
    };
    let ev = |kind: &str, at| OrderEvent {
        at,
        kind: kind.into(),
        detail: json!({ "kind": kind }),
    };
    store
        .insert_order(
            &NewOrder {
                order_id: id,
                merchant_appid: merchant.into(),
                machine_no: no("00000301"),
                out_trade_no: out_trade_no.map(Into::into),
                request_fingerprint: None,
                pay_later: false,
                status: Status::Dispensing,
                lines: vec![line(0)],
                amount: 200,
                created_at: created,
                pay_deadline: None,
                accept_by: None,
            },
            &ev("created", created),
        )
        .await
        .expect("insert order");
    let dispensed = if refund_amount > 0 { 1 } else { 2 };
    let change = OrderChange {
        status,
        lines: vec![line(dispensed)],
        error: None,
        result_applied: true,
        refund_amount,
        dispense_deadline: None,
        cancel_pending: false,
        accept_by: None,
        only_before_accept_by: None,
        at: changed,
    };
    assert!(store
        .update_order(
            id,
            Status::Dispensing,
            &change,
            &ev(status.as_str(), changed),
            &[]
        )
        .await
        .expect("update order"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_purges_old_orders_in_batches_and_keeps_protected_ones() {
    let mut gw = Gateway::configure(
        "[retention]\norders = \"1day\"\nprotected_orders = \"36500days\"\n\
         interval = \"1s\"\nbatch_size = 2\nbatch_pause = \"10ms\"\n",
    )
    .await;
    let m = {
        let store = gw.store().await;
        let m = seed_merchant(store.as_ref(), "old-shop").await;
        store
            .create_machine(NewMachine {
                machine_no: no("00000301"),
                merchant_appid: m.0.clone(),
                secret_hash: SecretHash::new(&generate_secret()),
            })
            .await
            .expect("machine");
        let old = at(2021, 3, 1, 0);
        // Five plain finished orders of 2021: purged, two per batch.
        for id in 1..=5 {
            seed_order(
                store.as_ref(),
                id,
                &m.0,
                None,
                old,
                old,
                Status::Completed,
                0,
            )
            .await;
        }
        // Protected (an unknown outcome; a refund owed), and recent: kept.
        seed_order(store.as_ref(), 6, &m.0, None, old, old, Status::Unknown, 0).await;
        let partial = Status::PartiallyDispensed;
        seed_order(store.as_ref(), 7, &m.0, None, old, old, partial, 100).await;
        let recent = Utc::now() - chrono::Duration::minutes(5);
        seed_order(
            store.as_ref(),
            8,
            &m.0,
            None,
            recent,
            recent,
            Status::Completed,
            0,
        )
        .await;
        store.close().await;
        m
    };
    gw.start().await;

    let t = Instant::now();
    let last = loop {
        let text = gw.metrics().await;
        if sample(
            &text,
            "vendgate_retention_purged_rows_total",
            "kind=\"orders\"",
        ) >= 5.0
        {
            break text;
        }
        assert!(
            t.elapsed() < DEADLINE,
            "purge metric never reached 5:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(
        sample(
            &last,
            "vendgate_retention_purged_rows_total",
            "kind=\"orders\""
        ),
        5.0
    );
    assert!(
        sample(
            &last,
            "vendgate_retention_purged_rows_total",
            "kind=\"order_events\""
        ) >= 10.0
    );
    assert!(
        wait(|| async { sample(&gw.metrics().await, "vendgate_database_size_bytes", "") > 0.0 })
            .await,
        "database size measured"
    );
    for id in 1..=5 {
        let (_, v) = gw.api(&m, None, &format!("/orders/{id}")).await;
        assert_ne!(v["code"], 0, "order {id} purged: {v}");
    }
    for (id, status) in [(6, "unknown"), (7, "partially_dispensed"), (8, "completed")] {
        let (_, v) = gw.api(&m, None, &format!("/orders/{id}")).await;
        assert_eq!(v["code"], 0, "order {id} kept: {v}");
        assert_eq!(v["data"]["status"], status);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_orders_as_csv_and_jsonl() {
    let gw = Gateway::configure("").await;
    let (m, other) = {
        let store = gw.store().await;
        let m = seed_merchant(store.as_ref(), "export-shop").await;
        let other = seed_merchant(store.as_ref(), "other-shop").await;
        store
            .create_machine(NewMachine {
                machine_no: no("00000301"),
                merchant_appid: m.0.clone(),
                secret_hash: SecretHash::new(&generate_secret()),
            })
            .await
            .expect("machine");
        let day = |min| at(2021, 3, 1, min);
        let done = Status::Completed;
        seed_order(
            store.as_ref(),
            11,
            &m.0,
            Some("=HYPERLINK(\"x\")"),
            day(1),
            day(2),
            done,
            0,
        )
        .await;
        seed_order(
            store.as_ref(),
            12,
            &m.0,
            Some("plain-12"),
            day(3),
            day(4),
            done,
            0,
        )
        .await;
        seed_order(
            store.as_ref(),
            13,
            &other.0,
            Some("@a,b"),
            day(5),
            day(6),
            done,
            0,
        )
        .await;
        // Outside the range.
        let next = at(2021, 3, 2, 0);
        seed_order(store.as_ref(), 14, &m.0, Some("late"), next, next, done, 0).await;
        store.close().await;
        (m, other)
    };
    let range = [
        "--from",
        "2021-03-01T00:00:00Z",
        "--to",
        "2021-03-02T00:00:00Z",
    ];

    let csv = gw.cli_ok(&[&["export", "orders"][..], &range, &["--format", "csv"]].concat());
    let rows: Vec<&str> = csv.lines().collect();
    assert_eq!(rows.len(), 4, "header and three orders:\n{csv}");
    assert!(rows[0].starts_with("order_id,merchant_appid,machine_no,out_trade_no,status,"));
    let t = "2021-03-01T00:0";
    assert_eq!(
        rows[1],
        format!(
            "11,{},00000301,\"'=HYPERLINK(\"\"x\"\")\",completed,200,0,0,,,{t}1:00.000Z,{t}2:00.000Z,1:2:2:100",
            m.0
        )
    );
    assert!(
        rows[2].starts_with(&format!("12,{},00000301,plain-12,completed,", m.0)),
        "{csv}"
    );
    assert!(
        rows[3].starts_with(&format!("13,{},00000301,\"'@a,b\",", other.0)),
        "{csv}"
    );

    let jsonl = gw.cli_ok(
        &[
            &["export", "orders"][..],
            &range,
            &["--format", "jsonl", "--merchant", &m.0],
        ]
        .concat(),
    );
    let orders: Vec<Value> = jsonl
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect();
    let ids: Vec<&str> = orders
        .iter()
        .filter_map(|o| o["order_id"].as_str())
        .collect();
    assert_eq!(ids, ["11", "12"], "{jsonl}");
    // JSON carries the value as given: the escaping is CSV's alone.
    assert_eq!(orders[0]["out_trade_no"], "=HYPERLINK(\"x\")");
    assert_eq!(orders[0]["lines"][0]["dispensed"], 2);
    assert_eq!(orders[1]["created_at"], "2021-03-01T00:03:00.000Z");

    let err = gw
        .cli(&[
            "export",
            "orders",
            "--from",
            "2021-03-02T00:00:00Z",
            "--to",
            "2021-03-01T00:00:00Z",
        ])
        .expect_err("an empty range is refused");
    assert!(err.contains("--from must be before --to"), "{err}");
}
