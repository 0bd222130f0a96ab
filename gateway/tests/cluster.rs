//! Cluster mode with real processes: three `vendgate` nodes on one
//! PostgreSQL database, a three-server NATS cluster between them and haproxy
//! in front (MQTT sticky on the client id, HTTP round robin, `/readyz`
//! checks), with simulated machines connecting through haproxy (or directly
//! to one node, or through a switchable relay to move them between nodes).
//!
//! Every test builds its own cluster on a fresh database (the PostgreSQL
//! server is shared by the test process, except for the outage test which
//! needs its own), so a failing test cannot break the next one. Tests wait
//! on conditions with deadlines; each states the bound it asserts and prints
//! what it measured on a line starting with "cluster figures". When a test
//! fails, the cluster prints every node's log tail and keeps its directory.
//!
//! Run: `cargo test -p vendgate --test cluster -- --test-threads=1`. Needs
//! `nats-server`, `haproxy` and PostgreSQL (the fixtures panic with the
//! install command when one is missing).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use vendgate_proto::machine::MachineNo;
use vendgate_proto::msg::InventoryItem;
use vendgate_sim::{Behaviour, JournalEvent, SimConfig, SimHandle, SimMachine};
use vendgate_testkit::{
    Backend, GatewayNode, Haproxy, NatsCluster, NodeOptions, PgServer, Relay, Timings,
};

const BIN: &str = env!("CARGO_BIN_EXE_vendgate");
/// Longest wait for anything that should happen within seconds; generous
/// for a loaded 2-core machine. Tighter bounds are asserted separately.
const DEADLINE: Duration = Duration::from_secs(30);
const OPERATOR: (&str, &str) = ("operator", "cluster-test-operator-password");
/// How long a change may take to show on every node (API contract:
/// cluster-wide online state converges within about a second).
const CONVERGE: Duration = Duration::from_millis(1500);
/// Initial stock of product 1 on every simulated machine.
const STOCK: u32 = 10_000;
const PRICE: i64 = 100;

fn timings() -> Timings {
    Timings {
        // A little above the testkit default: a node must not be declared
        // dead because a loaded 2-core machine delayed its heartbeat.
        node_dead_after: Duration::from_secs(3),
        ..Timings::default()
    }
}

// ------------------------------------------------------------------ cluster

#[derive(Default)]
struct ClusterOptions {
    /// A PostgreSQL server of its own (to stop and start it).
    dedicated_pg: bool,
    /// Extra `VENDGATE_…` settings for every node.
    env: Vec<(&'static str, String)>,
}

/// One cluster at a time in this test process: nine processes plus the
/// simulated machines already fill two cores, and the bounds the tests
/// assert are for an unshared cluster. Taken by [`Cluster::start`] and held
/// until the cluster is dropped, so `cargo test` (which runs tests on as many
/// threads as cores) and `--test-threads=1` behave alike.
static ONE_AT_A_TIME: std::sync::LazyLock<Arc<tokio::sync::Mutex<()>>> =
    std::sync::LazyLock::new(Arc::default);

/// Three NATS servers, PostgreSQL, three gateway nodes, haproxy.
struct Cluster {
    nodes: Vec<GatewayNode>,
    haproxy: Haproxy,
    nats: NatsCluster,
    pg: Option<PgServer>,
    dir: Option<tempfile::TempDir>,
    client: reqwest::Client,
    timings: Timings,
    // Last: released after everything above is gone.
    _turn: tokio::sync::OwnedMutexGuard<()>,
}

struct Merchant {
    appid: String,
    secret: String,
}

impl Cluster {
    async fn start(opts: ClusterOptions) -> Cluster {
        vendgate_testkit::require_cluster_binaries();
        let turn = ONE_AT_A_TIME.clone().lock_owned().await;
        let t = Instant::now();
        let dir = tempfile::Builder::new()
            .prefix("vg-cluster-")
            .tempdir()
            .expect("temp dir");
        let nats = NatsCluster::start(3).await;
        let pg = match opts.dedicated_pg {
            true => Some(PgServer::dedicated().await),
            false => None,
        };
        let db = match &pg {
            Some(pg) => pg.create_database().await,
            None => PgServer::shared_async().await.create_database().await,
        };
        let key = dir.path().join("webhook.key");
        let timings = timings();
        let mut nodes: Vec<GatewayNode> = (1..=3)
            .map(|i| {
                GatewayNode::start(
                    BIN.as_ref(),
                    dir.path(),
                    NodeOptions {
                        node_id: format!("gw{i}"),
                        database_url: db.clone(),
                        nats_urls: nats.urls(),
                        webhook_key_file: key.clone(),
                        operator: (OPERATOR.0.into(), OPERATOR.1.into()),
                        // CLUSTER_TEST_LOG=debug (or any filter) for more detail.
                        log_level: std::env::var("CLUSTER_TEST_LOG")
                            .unwrap_or_else(|_| "info".into()),
                        timings: timings.clone(),
                        // The bursts order from one machine far faster than
                        // a vending machine vends (each order is three
                        // publishes, and every reconnect republishes the
                        // stored results): off, or the edge's per-machine
                        // publish limit cuts the machines mid-test.
                        env: [("VENDGATE_MQTT__MACHINE_PUBLISH_RATE", "0".to_string())]
                            .iter()
                            .chain(opts.env.iter())
                            .map(|(k, v)| (k.to_string(), v.clone()))
                            .collect(),
                    },
                )
            })
            .collect();
        for n in &mut nodes {
            n.wait_ready(DEADLINE).await;
        }
        let backends: Vec<Backend> = nodes
            .iter()
            .map(|n| Backend {
                name: n.id().to_string(),
                mqtt: n.mqtt_addr(),
                http: n.http_addr(),
            })
            .collect();
        let haproxy = Haproxy::start(&backends).await;
        let c = Cluster {
            nodes,
            haproxy,
            nats,
            pg,
            dir: Some(dir),
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .expect("HTTP client"),
            timings,
            _turn: turn,
        };
        c.haproxy.wait_up(&["gw1", "gw2", "gw3"], DEADLINE).await;
        println!("cluster figures: cluster up in {:?}", t.elapsed());
        c
    }

    fn dir(&self) -> &std::path::Path {
        self.dir.as_ref().expect("cluster dir").path()
    }

    /// A merchant provisioned with the `vendgate` CLI (on gw1's config).
    fn merchant(&self, notify_url: Option<&str>) -> Merchant {
        let mut args = vec!["merchant", "add", "--name", "cluster-test"];
        if let Some(u) = notify_url {
            args.extend(["--notify-url", u]);
        }
        let out = self.nodes[0].cli(&args).unwrap_or_else(|e| panic!("{e}"));
        let field = |k: &str| {
            out.lines()
                .find_map(|l| l.strip_prefix(&format!("{k}=")))
                .unwrap_or_else(|| panic!("no {k} in {out:?}"))
                .to_string()
        };
        Merchant {
            appid: field("appid"),
            secret: field("appsecret"),
        }
    }

    /// `count` machines from `first`, provisioned with the CLI.
    fn machines(&self, m: &Merchant, first: u32, count: u32) -> Vec<(MachineNo, String)> {
        let first = MachineNo::from_u32(first).expect("machine_no");
        let file = self.dir().join(format!("secrets-{first}.csv"));
        self.nodes[0]
            .cli(&[
                "machine",
                "add",
                "--merchant",
                &m.appid,
                "--count",
                &count.to_string(),
                "--first",
                first.as_str(),
                "--secrets-out",
                &file.display().to_string(),
            ])
            .unwrap_or_else(|e| panic!("{e}"));
        vendgate_sim::secrets_file::read(&file).expect("secrets file")
    }

    /// The open API of node `i`.
    fn api(&self, i: usize, m: &Merchant) -> Api {
        Api::new(
            &self.client,
            self.nodes[i].http_addr(),
            m,
            self.nodes[i].id(),
        )
    }

    /// The open API through haproxy.
    fn lb_api(&self, m: &Merchant) -> Api {
        Api::new(&self.client, self.haproxy.http_addr(), m, "haproxy")
    }

    /// `GET /dashboard/api/cluster` on node `i`.
    async fn cluster_view(&self, i: usize) -> Option<Value> {
        let r = self
            .client
            .get(format!(
                "{}/dashboard/api/cluster",
                self.nodes[i].base_url()
            ))
            .basic_auth(OPERATOR.0, Some(OPERATOR.1))
            .timeout(Duration::from_secs(3))
            .send()
            .await
            .ok()?;
        if !r.status().is_success() {
            return None;
        }
        r.json().await.ok()
    }

    /// `GET /dashboard/api/orders/{id}` (the order with its timeline) on
    /// node `i`.
    async fn dashboard_order(&self, i: usize, id: u64) -> Option<Value> {
        let r = self
            .client
            .get(format!(
                "{}/dashboard/api/orders/{id}",
                self.nodes[i].base_url()
            ))
            .basic_auth(OPERATOR.0, Some(OPERATOR.1))
            .timeout(Duration::from_secs(3))
            .send()
            .await
            .ok()?;
        r.json().await.ok()
    }

    /// `GET /metrics` on node `i`.
    async fn metrics(&self, i: usize) -> Option<String> {
        let r = self
            .client
            .get(format!("{}/metrics", self.nodes[i].base_url()))
            .timeout(Duration::from_secs(3))
            .send()
            .await
            .ok()?;
        r.text().await.ok()
    }

    /// The node holding the most MQTT sessions through haproxy.
    async fn busiest_node(&self) -> (usize, u64) {
        let s = self.haproxy.mqtt_sessions().await;
        (0..self.nodes.len())
            .map(|i| (i, s.get(self.nodes[i].id()).copied().unwrap_or(0)))
            .max_by_key(|(_, n)| *n)
            .expect("nodes")
    }

    /// Log tails of every process, for a failing test.
    fn dump(&self) -> String {
        let mut s = String::new();
        for n in &self.nodes {
            s.push_str(&format!(
                "\n--- node {} ({}) ---\n{}\n",
                n.id(),
                n.log_path().display(),
                n.log_tail(60)
            ));
        }
        s.push_str(&format!(
            "\n--- haproxy ---\n{}\n",
            self.haproxy.log_tail(20)
        ));
        s.push_str(&self.nats.log_tails(10));
        if let Some(pg) = &self.pg {
            s.push_str(&format!("\n--- postgres ---\n{}\n", pg.log_tail(20)));
        }
        s
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.dump());
            if let Some(d) = self.dir.take() {
                eprintln!("cluster directory kept: {}", d.keep().display());
            }
        }
        // Nodes first (they would log errors while NATS and PostgreSQL go).
        for n in &mut self.nodes {
            n.kill();
        }
    }
}

/// Machine counts per node id from `/dashboard/api/cluster`, read
/// leniently: a list of nodes (top level or under `nodes`), each with an id
/// (`node_id`/`node`/`id`) and a count (`machines`/`online_machines`/
/// `machine_count`/`online`). None when the shape is not recognised.
fn node_counts(v: &Value) -> Option<BTreeMap<String, u64>> {
    let list = v
        .as_array()
        .or_else(|| v["nodes"].as_array())
        .or_else(|| v["data"]["nodes"].as_array())?;
    let mut out = BTreeMap::new();
    for n in list {
        let id = ["node_id", "node", "id"]
            .iter()
            .find_map(|k| n[*k].as_str())?;
        let count = ["machines", "online_machines", "machine_count", "online"]
            .iter()
            .find_map(|k| n[*k].as_u64())
            .unwrap_or(0);
        out.insert(id.to_string(), count);
    }
    Some(out)
}

// ------------------------------------------------------------------ HTTP

#[derive(Clone)]
struct Api {
    client: reqwest::Client,
    base: String,
    appid: String,
    secret: String,
    /// Which node (or "haproxy"), for messages.
    name: String,
}

impl Api {
    fn new(client: &reqwest::Client, addr: SocketAddr, m: &Merchant, name: &str) -> Api {
        Api {
            client: client.clone(),
            base: format!("http://{addr}/api/openapi/v1"),
            appid: m.appid.clone(),
            secret: m.secret.clone(),
            name: name.into(),
        }
    }

    /// POST /orders; None when no envelope came back (node down, proxy
    /// error, timeout).
    async fn order(&self, m: &MachineNo, quantity: u32, pay_later: bool) -> Option<Value> {
        let mut body = json!({
            "machine_no": m.as_str(),
            "products": [{ "product_id": 1, "quantity": quantity }],
        });
        if pay_later {
            body["pay_later"] = json!(true);
        }
        self.post("/orders", body.to_string()).await
    }

    /// POST /orders with the merchant's own order number in the body
    /// (`out_trade_no`, API.md), so that an order a machine dispensed leads
    /// back to the request that placed it and what that request was told.
    /// None when no envelope came back.
    async fn order_numbered(
        &self,
        m: &MachineNo,
        quantity: u32,
        out_trade_no: &str,
    ) -> Option<Value> {
        let body = json!({
            "machine_no": m.as_str(),
            "products": [{ "product_id": 1, "quantity": quantity }],
            "out_trade_no": out_trade_no,
        });
        self.post("/orders", body.to_string()).await
    }

    async fn post(&self, path: &str, body: String) -> Option<Value> {
        let r = self
            .client
            .post(format!("{}{path}", self.base))
            .header("Appid", &self.appid)
            .header("AppSecret", &self.secret)
            .body(body)
            .send()
            .await
            .ok()?;
        r.json().await.ok()
    }

    async fn get(&self, path: &str) -> Option<Value> {
        let r = self
            .client
            .get(format!("{}{path}", self.base))
            .header("Appid", &self.appid)
            .header("AppSecret", &self.secret)
            .send()
            .await
            .ok()?;
        r.json().await.ok()
    }

    /// `online` of GET /machines/{m}; None on error.
    async fn online(&self, m: &MachineNo) -> Option<bool> {
        let v = self.get(&format!("/machines/{m}")).await?;
        (v["code"] == 0).then(|| v["data"]["online"].as_bool().unwrap_or(false))
    }

    /// `total` of GET /machines?online=true.
    async fn online_total(&self) -> Option<u64> {
        let v = self.get("/machines?online=true&page_size=100").await?;
        (v["code"] == 0).then(|| v["data"]["total"].as_u64().unwrap_or(0))
    }

    /// (stock, reserved) of product 1 on machine `m` as this node sees it.
    async fn stock(&self, m: &MachineNo) -> Option<(u64, u64)> {
        let v = self.get(&format!("/machines/{m}")).await?;
        let s = v["data"]["stock"]
            .as_array()?
            .iter()
            .find(|s| s["product_id"] == 1)?
            .clone();
        Some((
            s["stock"].as_u64().unwrap_or(0),
            s["reserved"].as_u64().unwrap_or(0),
        ))
    }

    /// The order's status; Err(code) when the API answers an error.
    async fn status(&self, id: u64) -> Option<Result<String, i64>> {
        let v = self.get(&format!("/orders/{id}")).await?;
        if v["code"] == 0 {
            Some(Ok(v["data"]["status"].as_str().unwrap_or("").to_string()))
        } else {
            Some(Err(v["code"].as_i64().unwrap_or(-1)))
        }
    }
}

/// Waits until `cond` holds; panics with `what` after `limit`. Returns the
/// time it took.
async fn wait<F, Fut>(what: &str, limit: Duration, mut cond: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let t = Instant::now();
    while !cond().await {
        assert!(
            t.elapsed() < limit,
            "timed out after {limit:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    t.elapsed()
}

/// Polls `f` until its value satisfies `ok`; Ok(value), or Err(last value)
/// after `limit`.
async fn poll_value<T, F, Fut>(limit: Duration, mut f: F, ok: impl Fn(&T) -> bool) -> Result<T, T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = T>,
{
    let t = Instant::now();
    loop {
        let v = f().await;
        if ok(&v) {
            return Ok(v);
        }
        if t.elapsed() > limit {
            return Err(v);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until every API in `apis` reports `n` machines online.
async fn wait_online_everywhere(apis: &[Api], n: u64, limit: Duration) -> Duration {
    wait(
        &format!("{n} machines online on every node"),
        limit,
        || async move {
            for a in apis {
                if a.online_total().await != Some(n) {
                    return false;
                }
            }
            true
        },
    )
    .await
}

/// Waits until every order in `ids` has one of `statuses` (via `api`);
/// panics naming the stragglers. Every id must exist (an order answered 0
/// that is missing is lost).
async fn settle(
    api: &Api,
    ids: &[u64],
    statuses: &[&str],
    limit: Duration,
) -> HashMap<u64, String> {
    let t = Instant::now();
    let mut pending: Vec<u64> = ids.to_vec();
    let mut done = HashMap::new();
    loop {
        let mut still = Vec::new();
        for id in pending {
            match api.status(id).await {
                Some(Ok(s)) if statuses.contains(&s.as_str()) => {
                    done.insert(id, s);
                }
                Some(Err(40001)) => panic!("order {id}, answered 0, does not exist"),
                Some(Ok(s)) => {
                    done.insert(id, s);
                    still.push(id);
                }
                _ => still.push(id),
            }
        }
        if still.is_empty() {
            return done;
        }
        if t.elapsed() > limit {
            let late: Vec<String> = still
                .iter()
                .take(20)
                .map(|id| format!("{id}:{}", done.get(id).map(String::as_str).unwrap_or("?")))
                .collect();
            panic!(
                "{} orders not settled into {statuses:?} within {limit:?}: {late:?}",
                still.len()
            );
        }
        pending = still;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ------------------------------------------------------------------ machines

fn sim_config(gateway: String, (m, secret): &(MachineNo, String), b: Behaviour) -> SimConfig {
    let mut c = SimConfig::new(gateway, *m, secret.clone());
    c.inventory = vec![InventoryItem {
        product_id: 1,
        stock: STOCK,
        price: PRICE,
    }];
    c.behaviour = b;
    c
}

fn spawn_sim(gateway: String, creds: &(MachineNo, String), b: Behaviour) -> SimHandle {
    SimMachine::spawn(sim_config(gateway, creds, b))
}

/// Waits until every sim is connected and subscribed, every node reports
/// them all online, and some node sees each machine's stock.
async fn wait_machines_ready(sims: &[SimHandle], apis: &[Api]) -> Duration {
    let t = Instant::now();
    for s in sims {
        assert!(s.wait_ready(DEADLINE).await, "{} connects", s.machine_no());
    }
    wait_online_everywhere(apis, sims.len() as u64, DEADLINE).await;
    for s in sims {
        let m = s.machine_no();
        wait(&format!("stock of {m} known"), DEADLINE, || async move {
            for a in apis {
                if a.stock(&m).await.is_some_and(|(st, _)| st > 0) {
                    return true;
                }
            }
            false
        })
        .await;
    }
    t.elapsed()
}

/// Every order dispensed at most once across all journals; returns how
/// many dispenses there were and how many dispense commands arrived for an
/// order already commanded (allowed by PROTOCOL.md: machines dedup).
fn assert_dispensed_once(sims: &[SimHandle]) -> (usize, usize) {
    let mut seen = HashSet::new();
    for s in sims {
        for id in s.dispensed_orders() {
            assert!(seen.insert(id), "order {id} dispensed twice");
        }
    }
    let mut commands = HashSet::new();
    let mut repeated = 0;
    for s in sims {
        for e in s.journal() {
            if let JournalEvent::DispenseReceived(cmd) = e.event {
                if !commands.insert(cmd.order_id) {
                    repeated += 1;
                }
            }
        }
    }
    (seen.len(), repeated)
}

/// The last `n` journal entries of a machine, one a line, for failure
/// messages (time relative to the newest entry).
fn journal_tail(sim: &SimHandle, n: usize) -> String {
    let j = sim.journal();
    let last = j.last().map(|e| e.at);
    j[j.len().saturating_sub(n)..]
        .iter()
        .map(|e| {
            let ago = last
                .map(|l| l.saturating_duration_since(e.at))
                .unwrap_or_default();
            format!("  -{ago:?} {:?}", e.event)
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Waits until the machine is connected and subscribed again. A machine
/// that stays connected but never gets its SUBSCRIBE out is the simulator's
/// MQTT client wedged (rumqttc with a clean session keeps a publish stashed
/// on a pkid collision across a reconnect and stops sending: rumqtt issues
/// #1014/#1056): the failure says so, with the journal.
async fn wait_sim_ready(sim: &SimHandle) {
    if !sim.wait_ready(DEADLINE).await {
        panic!(
            "machine {} not subscribed {DEADLINE:?} after connecting (connected: {}){}\nmachine journal:\n{}",
            sim.machine_no(),
            sim.connected(),
            if sim.connected() {
                ": its MQTT client is wedged with requests queued (rumqttc collision after a reconnect, rumqtt #1056), \
                 a simulator problem, not the gateway's"
            } else {
                ""
            },
            journal_tail(sim, 30)
        );
    }
}

/// All order ids dispensed by these machines.
fn dispensed(sims: &[SimHandle]) -> HashSet<u64> {
    sims.iter().flat_map(|s| s.dispensed_orders()).collect()
}

/// Dispense commands received so far by these machines.
fn commands_received(sims: &[SimHandle]) -> usize {
    sims.iter()
        .map(|s| {
            s.journal()
                .iter()
                .filter(|e| matches!(e.event, JournalEvent::DispenseReceived(_)))
                .count()
        })
        .sum()
}

/// The gateway agrees with the machines: every order a (normal) machine
/// dispensed ends `completed` (a dispense the merchant was told failed, or
/// never heard of, is money lost).
async fn assert_dispensed_completed(api: &Api, sims: &[SimHandle]) {
    let ids: Vec<u64> = dispensed(sims).into_iter().collect();
    let st = settle(api, &ids, &["completed"], DEADLINE).await;
    assert!(st.values().all(|s| s == "completed"), "{st:?}");
}

/// Every order these machines were sent a dispense command for, from their
/// journals.
fn commanded(sims: &[SimHandle]) -> HashSet<u64> {
    sims.iter()
        .flat_map(|s| s.journal())
        .filter_map(|e| match e.event {
            JournalEvent::DispenseReceived(cmd) => Some(cmd.order_id),
            _ => None,
        })
        .collect()
}

/// An order's status and timeline as `GET /dashboard/api/orders/{id}`
/// shows them, on one line, for failure messages.
fn timeline(v: &Value) -> String {
    let events: Vec<String> = v["events"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|e| format!("{} {} {}", e["at"], e["type"], e["detail"]))
        .collect();
    format!("({}) {}", v["status"], events.join(" | "))
}

/// What a machine's journal says about one order, one entry a line.
fn machine_view(sims: &[SimHandle], id: u64) -> String {
    sims.iter()
        .flat_map(|s| {
            let m = s.machine_no();
            s.journal()
                .into_iter()
                .filter(|e| e.event.order_id() == Some(id))
                .map(move |e| format!("    {m}: {:?}", e.event))
                .collect::<Vec<_>>()
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// What the exact check of dispenses against answers counted (printed in
/// the figures lines).
#[derive(Debug, Default, Clone, Copy)]
struct DispenseAudit {
    /// Dispensed orders whose request was answered with a non-zero code
    /// (30002 and the others: API.md says such an order is never
    /// dispensed). Asserted 0.
    answered_failed_but_dispensed: usize,
    /// Dispensed orders whose request got no envelope at all (a node died
    /// under it): either outcome is allowed.
    unanswered_dispensed: usize,
}

impl std::fmt::Display for DispenseAudit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "answered_failed_but_dispensed={} unanswered_dispensed={}",
            self.answered_failed_but_dispensed, self.unanswered_dispensed
        )
    }
}

/// The machines agree with the merchant's answers, exactly. `answers` are
/// every order request the test made (each with its own out_trade_no).
/// Every order answered 0 was dispensed. Every other dispensed order is
/// traced back to its request through its out_trade_no (read from the
/// dashboard of node `node`): answered with any non-zero code (30002 and
/// friends: API.md says such an order is never dispensed, now or later) is
/// a violation, counted and asserted 0 with the order's timeline and the
/// machine's journal printed; no envelope (the node died under the
/// request) may have gone either way and is counted as unanswered and
/// dispensed. First every order a machine was commanded that was not
/// answered 0 is waited out of `dispatching`/`dispensing` (bound:
/// DEADLINE), so no `go` can follow the count; then every order answered
/// 0 is waited until the machine dispensed it (same bound).
async fn assert_dispenses_match_answers(
    c: &Cluster,
    node: usize,
    answers: &[Answer],
    sims: &[SimHandle],
) -> DispenseAudit {
    let accepted: HashSet<u64> = answers.iter().filter_map(|a| a.order_id).collect();
    let mut open: Vec<u64> = commanded(sims)
        .union(&dispensed(sims))
        .filter(|id| !accepted.contains(id))
        .copied()
        .collect();
    open.sort_unstable();
    let mut orders: HashMap<u64, Value> = HashMap::new();
    for id in open {
        let r = poll_value(
            DEADLINE,
            || c.dashboard_order(node, id),
            |v| {
                v.as_ref().is_some_and(|v| {
                    v["status"]
                        .as_str()
                        .is_some_and(|s| !matches!(s, "dispatching" | "dispensing"))
                })
            },
        )
        .await;
        match r {
            Ok(Some(v)) => {
                orders.insert(id, v);
            }
            Ok(None) => unreachable!(),
            Err(v) => panic!(
                "order {id} (commanded, not answered 0) still not settled after {DEADLINE:?} on gw{}: {}\n  machine:\n{}",
                node + 1,
                v.as_ref().map(timeline).unwrap_or_else(|| "unreadable".into()),
                machine_view(sims, id)
            ),
        }
    }

    // An order answered 0 may be dispensed a little later: its `go` can
    // follow the machine to its next connection (the retried go, or the
    // go owed on reconnect). Wait for every one, bounded by DEADLINE.
    let done = poll_value(
        DEADLINE,
        || async { dispensed(sims) },
        |d| accepted.is_subset(d),
    )
    .await
    .unwrap_or_else(|d| d);
    for id in &accepted {
        if !done.contains(id) {
            // The order's timeline and what the machine saw, so a failure
            // says where the go was lost.
            let v = c.dashboard_order(node, *id).await;
            panic!(
                "order {id} was answered 0 but never dispensed: {}\n  machine:\n{}",
                v.as_ref()
                    .map(timeline)
                    .unwrap_or_else(|| "unreadable".into()),
                machine_view(sims, *id)
            );
        }
    }
    let by_otn: HashMap<&str, &Answer> = answers
        .iter()
        .map(|a| (a.out_trade_no.as_str(), a))
        .collect();
    let mut extra: Vec<u64> = done.difference(&accepted).copied().collect();
    extra.sort_unstable();
    let mut audit = DispenseAudit::default();
    let mut violations = String::new();
    for id in extra {
        let order = orders
            .get(&id)
            .unwrap_or_else(|| panic!("order {id} dispensed but never read"));
        let otn = order["out_trade_no"].as_str().unwrap_or("");
        let Some(a) = by_otn.get(otn) else {
            panic!(
                "order {id} was dispensed but no request of this test placed it (out_trade_no {otn:?}): {}",
                timeline(order)
            );
        };
        match a.code {
            None => audit.unanswered_dispensed += 1,
            Some(0) => panic!(
                "order {id} was dispensed and its request {otn} was answered 0 with order {:?}: \
                 two orders for one out_trade_no: {}",
                a.order_id,
                timeline(order)
            ),
            Some(code) => {
                audit.answered_failed_but_dispensed += 1;
                violations.push_str(&format!(
                    "\n  order {id} (out_trade_no {otn}, answered {code} after {:?}): {}\n  machine:\n{}",
                    a.latency,
                    timeline(order),
                    machine_view(sims, id)
                ));
            }
        }
    }
    assert_eq!(
        audit.answered_failed_but_dispensed, 0,
        "answered 30002 (or another non-zero code) but dispensed: the merchant was told these orders failed \
         yet the goods came out ({audit}):{violations}"
    );
    audit
}

/// Reservations add up: for each machine, every node that shows its stock
/// shows nothing reserved and the machine's own count, and at least one
/// node (the one holding it) shows it. (Whether every node shows the stock
/// is asserted separately, in test (a).)
async fn assert_stock_adds_up(apis: &[Api], sims: &[SimHandle]) {
    for s in sims {
        let m = s.machine_no();
        let own = u64::from(s.stock().first().map(|i| i.stock).unwrap_or(0));
        let r = poll_value(
            DEADLINE,
            || async move {
                let mut views = Vec::new();
                for a in apis {
                    views.push((a.name.clone(), a.stock(&m).await));
                }
                views
            },
            |views| {
                views.iter().any(|(_, v)| v.is_some())
                    && views
                        .iter()
                        .all(|(_, v)| v.is_none() || *v == Some((own, 0)))
            },
        )
        .await;
        if let Err(views) = r {
            panic!(
                "machine {m}: (stock, reserved) per node {views:?}; the machine has {own} and nothing should be reserved"
            );
        }
    }
}

// ------------------------------------------------------------------ bursts

#[derive(Debug, Clone)]
struct Answer {
    /// When the answer came (or the request failed).
    at: Instant,
    latency: Duration,
    /// None: no envelope (transport error).
    code: Option<i64>,
    /// The order id of an answer 0.
    order_id: Option<u64>,
    /// The merchant's order number the request carried (unique per
    /// request).
    out_trade_no: String,
}

impl Answer {
    /// The answer `v` (None: no envelope) to a request started at
    /// `started` with `out_trade_no`.
    fn new(started: Instant, v: Option<&Value>, out_trade_no: String) -> Answer {
        let code = v.and_then(|v| v["code"].as_i64());
        Answer {
            at: Instant::now(),
            latency: started.elapsed(),
            code,
            order_id: v
                .filter(|_| code == Some(0))
                .and_then(|v| v["data"]["order_id"].as_u64()),
            out_trade_no,
        }
    }
}

/// A fresh out_trade_no for an order on machine `m` (unique in this test
/// process, so unique per merchant).
fn next_out_trade_no(m: &MachineNo) -> String {
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    format!(
        "t{}-{m}",
        SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    )
}

/// One order of `quantity` on `m` with a fresh out_trade_no; the answer
/// and, for failure messages, the envelope.
async fn place(api: &Api, m: &MachineNo, quantity: u32) -> (Answer, Option<Value>) {
    let out_trade_no = next_out_trade_no(m);
    let t = Instant::now();
    let v = api.order_numbered(m, quantity, &out_trade_no).await;
    (Answer::new(t, v.as_ref(), out_trade_no), v)
}

/// One worker per machine placing orders one after another until stopped,
/// each with its own out_trade_no.
struct Burst {
    stop: CancellationToken,
    answers: Arc<Mutex<Vec<Answer>>>,
    tasks: Vec<JoinHandle<()>>,
}

/// Six machines connected through haproxy, and a burst of orders through
/// haproxy under way (at least `min_successes` answered 0): where the node
/// and NATS failure tests start from.
struct BurstSetup {
    m: Merchant,
    apis: Vec<Api>,
    sims: Vec<SimHandle>,
    machines: Vec<MachineNo>,
    burst: Burst,
}

impl BurstSetup {
    async fn start(c: &Cluster, first: u32, min_successes: usize) -> BurstSetup {
        let m = c.merchant(None);
        let creds = c.machines(&m, first, 6);
        let apis: Vec<Api> = (0..3).map(|i| c.api(i, &m)).collect();
        let sims: Vec<SimHandle> = creds
            .iter()
            .map(|cr| spawn_sim(c.haproxy.mqtt_addr().to_string(), cr, Behaviour::Normal))
            .collect();
        wait_machines_ready(&sims, &apis).await;
        let machines: Vec<MachineNo> = sims.iter().map(SimHandle::machine_no).collect();
        let burst = Burst::start(&c.lb_api(&m), &machines, 1);
        wait("a burst under way", DEADLINE, || async {
            burst.successes() >= min_successes
        })
        .await;
        BurstSetup {
            m,
            apis,
            sims,
            machines,
            burst,
        }
    }
}

impl Burst {
    fn start(api: &Api, machines: &[MachineNo], quantity: u32) -> Burst {
        let stop = CancellationToken::new();
        let answers = Arc::new(Mutex::new(Vec::new()));
        let tasks = machines
            .iter()
            .map(|m| {
                let (api, stop, answers, m) = (api.clone(), stop.clone(), answers.clone(), *m);
                tokio::spawn(async move {
                    while !stop.is_cancelled() {
                        let (a, _) = place(&api, &m, quantity).await;
                        let code = a.code;
                        answers.lock().unwrap().push(a);
                        if code != Some(0) {
                            // Node down or machine away: pace the retries.
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                })
            })
            .collect();
        Burst {
            stop,
            answers,
            tasks,
        }
    }

    fn successes(&self) -> usize {
        self.answers
            .lock()
            .unwrap()
            .iter()
            .filter(|a| a.code == Some(0))
            .count()
    }

    fn successes_after(&self, t: Instant) -> usize {
        self.answers
            .lock()
            .unwrap()
            .iter()
            .filter(|a| a.code == Some(0) && a.at > t)
            .count()
    }

    async fn stop(self) -> Vec<Answer> {
        self.stop.cancel();
        for t in self.tasks {
            let _ = t.await;
        }
        let a = self.answers.lock().unwrap().clone();
        a
    }
}

fn accepted(answers: &[Answer]) -> Vec<u64> {
    answers.iter().filter_map(|a| a.order_id).collect()
}

/// Answer codes and counts, for the figures.
fn code_counts(answers: &[Answer]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for a in answers {
        let k = a
            .code
            .map(|c| c.to_string())
            .unwrap_or_else(|| "none".into());
        *m.entry(k).or_default() += 1;
    }
    m
}

// ------------------------------------------------------------------ webhooks

#[derive(Debug, Clone)]
struct Hit {
    event_id: String,
    kind: String,
    order_id: Option<u64>,
    status: String,
    created_at: String,
    body: String,
    signature: String,
}

/// The merchant's webhook receiver on loopback; answers 200 to everything.
#[derive(Clone, Default)]
struct Receiver {
    hits: Arc<Mutex<Vec<Hit>>>,
}

impl Receiver {
    async fn start() -> (Receiver, String) {
        let r = Receiver::default();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind receiver");
        let addr = listener.local_addr().expect("receiver address");
        let app = axum::Router::new().fallback(hook).with_state(r.clone());
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        (r, format!("http://{addr}/hook"))
    }

    fn hits(&self) -> Vec<Hit> {
        self.hits.lock().unwrap().clone()
    }

    /// Distinct events (first delivery of each event id), in arrival order,
    /// and how many deliveries were repeats.
    fn distinct(&self) -> (Vec<Hit>, usize) {
        let mut seen = HashSet::new();
        let mut out = Vec::new();
        let mut repeats = 0;
        for h in self.hits() {
            if seen.insert(h.event_id.clone()) {
                out.push(h);
            } else {
                repeats += 1;
            }
        }
        (out, repeats)
    }
}

async fn hook(State(r): State<Receiver>, headers: HeaderMap, body: String) -> StatusCode {
    let v: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
    r.hits.lock().unwrap().push(Hit {
        event_id: v["event_id"].as_str().unwrap_or("").into(),
        kind: v["type"].as_str().unwrap_or("").into(),
        order_id: v["data"]["order_id"].as_u64(),
        status: v["data"]["status"].as_str().unwrap_or("").into(),
        created_at: v["created_at"].as_str().unwrap_or("").into(),
        signature: headers
            .get("vendgate-signature")
            .and_then(|h| h.to_str().ok())
            .unwrap_or("")
            .into(),
        body,
    });
    StatusCode::OK
}

/// The signature a merchant checks: HMAC-SHA256 of "t.body" under the
/// AppSecret (API.md).
fn assert_signed(h: &Hit, secret: &str) {
    let mut t = None;
    let mut v1 = None;
    for part in h.signature.split(',') {
        match part.split_once('=') {
            Some(("t", x)) => t = Some(x.to_string()),
            Some(("v1", x)) => v1 = Some(x.to_string()),
            _ => {}
        }
    }
    let (Some(t), Some(v1)) = (t, v1) else {
        panic!(
            "event {} has no valid signature header {:?}",
            h.event_id, h.signature
        );
    };
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("any key length");
    mac.update(format!("{t}.{}", h.body).as_bytes());
    assert_eq!(
        v1,
        hex::encode(mac.finalize().into_bytes()),
        "event {} signed with the merchant's AppSecret",
        h.event_id
    );
}

fn event_type_for(status: &str) -> Option<&'static str> {
    Some(match status {
        "completed" => "order.completed",
        "partially_dispensed" => "order.partially_dispensed",
        "failed" => "order.dispense_failed",
        "unknown" => "order.unknown",
        "expired" => "order.expired",
        _ => return None,
    })
}

// ------------------------------------------------------------------ tests

/// (a) Machines pinned to each node (connected directly to its MQTT port);
/// an order placed on every node's HTTP API for every machine: each is
/// answered 0 at the first attempt and completes (bound: DEADLINE). Every
/// node shows all six machines online (bound: CONVERGE after the last
/// machine is ready), `/dashboard/api/cluster` lists the three nodes with
/// two machines each, and `/metrics` carries the node label and the
/// cluster-wide online count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orders_on_any_node_complete_on_the_owning_node() {
    let c = Cluster::start(ClusterOptions::default()).await;
    let m = c.merchant(None);
    let creds = c.machines(&m, 10_000_000, 6);
    let apis: Vec<Api> = (0..3).map(|i| c.api(i, &m)).collect();
    let sims: Vec<SimHandle> = creds
        .iter()
        .enumerate()
        .map(|(k, cr)| {
            spawn_sim(
                c.nodes[k % 3].mqtt_addr().to_string(),
                cr,
                Behaviour::Normal,
            )
        })
        .collect();
    for s in &sims {
        assert!(s.wait_ready(DEADLINE).await);
    }
    let converged = wait_online_everywhere(&apis, 6, DEADLINE).await;
    assert!(
        converged <= CONVERGE,
        "online state took {converged:?} to show on every node (bound {CONVERGE:?})"
    );
    wait_machines_ready(&sims, &apis).await;

    let mut ids = Vec::new();
    let mut slowest = Duration::ZERO;
    for (j, api) in apis.iter().enumerate() {
        for (k, s) in sims.iter().enumerate() {
            let t = Instant::now();
            let v = api.order(&s.machine_no(), 1, false).await;
            slowest = slowest.max(t.elapsed());
            let v = v.unwrap_or_else(|| panic!("no answer from gw{}", j + 1));
            assert_eq!(
                v["code"],
                0,
                "order on gw{} for {} (held by gw{}): {v}",
                j + 1,
                s.machine_no(),
                k % 3 + 1
            );
            ids.push(v["data"]["order_id"].as_u64().expect("order_id"));
        }
    }
    // Every node reads every order.
    for api in &apis {
        let st = settle(api, &ids, &["completed"], DEADLINE).await;
        assert!(
            st.values().all(|s| s == "completed"),
            "{}: {st:?}",
            api.name
        );
    }
    for s in &sims {
        assert_eq!(
            s.dispensed_orders().len(),
            3,
            "{} dispensed one order per node",
            s.machine_no()
        );
    }
    let (n, repeated) = assert_dispensed_once(&sims);
    assert_eq!(n, 18);

    // The operator's view of the cluster, on every node.
    for i in 0..3 {
        let want: BTreeMap<String, u64> = (1..=3).map(|k| (format!("gw{k}"), 2)).collect();
        let r = poll_value(
            DEADLINE,
            || c.cluster_view(i),
            |v| v.as_ref().and_then(node_counts).as_ref() == Some(&want),
        )
        .await;
        assert!(
            r.is_ok(),
            "gw{}: /dashboard/api/cluster should list gw1..gw3 with 2 machines each: {:?}",
            i + 1,
            r.unwrap_or_else(|e| e)
        );
    }
    // Metrics: node label, cluster-wide online count.
    for i in 0..3 {
        let text = c.metrics(i).await.expect("metrics");
        assert!(
            text.contains(&format!("node=\"gw{}\"", i + 1)),
            "gw{}: metrics carry a node label",
            i + 1
        );
        let online: f64 = text
            .lines()
            .find(|l| {
                l.starts_with("vendgate_machines_online{")
                    || l.starts_with("vendgate_machines_online ")
            })
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(-1.0);
        assert_eq!(
            online,
            6.0,
            "gw{}: vendgate_machines_online is cluster-wide",
            i + 1
        );
    }
    println!(
        "cluster figures: (a) online on every node {converged:?} after the last connect, \
         slowest cross-node order answer {slowest:?}, repeated dispense commands {repeated}"
    );
    for s in &sims {
        s.shutdown().await;
    }
}

/// (a2) A machine's stock and reservations read the same on every node:
/// API.md's `GET /machines/{m}` shows `stock` (stock, reserved), and a
/// merchant behind the load balancer reaches any node. One machine on gw1;
/// after an order completes every node shows its stock, and a `pay_later`
/// reservation shows as reserved on every node (bound: 5 s each).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stock_and_reservations_read_the_same_on_every_node() {
    let c = Cluster::start(ClusterOptions::default()).await;
    let m = c.merchant(None);
    let creds = c.machines(&m, 15_000_000, 1);
    let apis: Vec<Api> = (0..3).map(|i| c.api(i, &m)).collect();
    let sim = spawn_sim(
        c.nodes[0].mqtt_addr().to_string(),
        &creds[0],
        Behaviour::Normal,
    );
    let sims = vec![sim.clone()];
    wait_machines_ready(&sims, &apis).await;
    let machine = sim.machine_no();
    let v = apis[1].order(&machine, 1, false).await.expect("answer");
    assert_eq!(v["code"], 0, "{v}");
    let id = v["data"]["order_id"].as_u64().expect("order_id");
    settle(&apis[0], &[id], &["completed"], DEADLINE).await;
    let v = apis[2].order(&machine, 2, true).await.expect("answer");
    assert_eq!(v["code"], 0, "pay_later: {v}");
    let own = u64::from(STOCK - 1);
    let mut views = Vec::new();
    for a in &apis {
        let r = poll_value(
            Duration::from_secs(5),
            || a.stock(&machine),
            |v| *v == Some((own, 2)),
        )
        .await;
        views.push((a.name.clone(), r.is_ok(), r.unwrap_or_else(|e| e)));
    }
    assert!(
        views.iter().all(|(_, ok, _)| *ok),
        "GET /machines/{machine} (stock, reserved) per node {views:?}; the machine (on gw1) has {own} with 2 reserved: \
         every node must answer the same"
    );
    sim.shutdown().await;
}

/// A poll of one machine's `online` on one node.
#[derive(Debug, Clone)]
struct Poll {
    node: String,
    started: Instant,
    online: Option<bool>,
}

/// Polls `GET /machines/{m}` on every API until stopped.
fn poll_presence(
    apis: &[Api],
    m: MachineNo,
    stop: &CancellationToken,
) -> (Arc<Mutex<Vec<Poll>>>, Vec<JoinHandle<()>>) {
    let polls = Arc::new(Mutex::new(Vec::new()));
    let tasks = apis
        .iter()
        .map(|a| {
            let (a, stop, polls) = (a.clone(), stop.clone(), polls.clone());
            tokio::spawn(async move {
                while !stop.is_cancelled() {
                    let started = Instant::now();
                    let online = a.online(&m).await;
                    polls.lock().unwrap().push(Poll {
                        node: a.name.clone(),
                        started,
                        online,
                    });
                    tokio::time::sleep(Duration::from_millis(40)).await;
                }
            })
        })
        .collect();
    (polls, tasks)
}

/// How many times the machine has connected (CONNACKs in its journal).
fn connects(sim: &SimHandle) -> usize {
    sim.journal()
        .iter()
        .filter(|e| e.event == JournalEvent::Connected)
        .count()
}

/// When the sim's `n`-th CONNACK (1-based) arrived.
async fn nth_connect(sim: &SimHandle, n: usize) -> Instant {
    assert!(
        sim.wait_for(
            |j| j
                .iter()
                .filter(|e| e.event == JournalEvent::Connected)
                .count()
                >= n,
            DEADLINE
        )
        .await,
        "{} connects a {n}th time",
        sim.machine_no()
    );
    sim.journal()
        .iter()
        .filter(|e| e.event == JournalEvent::Connected)
        .nth(n - 1)
        .map(|e| e.at)
        .expect("connect entry")
}

/// (b) A machine moves gw1 → gw2 → gw3 → gw1 (its old TCP connection left
/// open at the old node each time, as when a machine's network path
/// changes) while orders flow through haproxy. Bounds: the old node closes
/// its stale connection within 5 s of the new connection (take-over over
/// NATS; the machine's keep alive alone would take 45 s); no node reports
/// the machine offline from CONVERGE after the new connection on; no order
/// is dispensed twice; every order answered 0 completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_machine_moving_between_nodes_is_not_reported_offline_nor_dispensed_twice() {
    let c = Cluster::start(ClusterOptions::default()).await;
    let m = c.merchant(None);
    let creds = c.machines(&m, 20_000_000, 1);
    let apis: Vec<Api> = (0..3).map(|i| c.api(i, &m)).collect();
    let relay = Relay::start(c.nodes[0].mqtt_addr()).await;
    let sim = spawn_sim(relay.gateway(), &creds[0], Behaviour::Normal);
    let sims = vec![sim.clone()];
    wait_machines_ready(&sims, &apis).await;
    let machine = sim.machine_no();

    let stop = CancellationToken::new();
    let (polls, pollers) = poll_presence(&apis, machine, &stop);
    let burst = Burst::start(&c.lb_api(&m), &[machine], 1);
    wait("orders flowing", DEADLINE, || async {
        burst.successes() >= 5
    })
    .await;

    // (switched at, new connection at, stale closed at)
    let mut moves = Vec::new();
    for (k, to) in [1usize, 2, 0].into_iter().enumerate() {
        let before = burst.successes();
        let switched = Instant::now();
        relay.switch(c.nodes[to].mqtt_addr(), true);
        let up = nth_connect(&sim, k + 2).await;
        wait_sim_ready(&sim).await;
        assert!(
            relay.wait_stale_closes(k + 1, DEADLINE).await,
            "the old node never closed the stale connection ({} still held)",
            relay.held_open()
        );
        let closed = relay.stale_closes()[k].closed_at;
        let stale_after = closed.saturating_duration_since(up);
        assert!(
            stale_after <= Duration::from_secs(5),
            "move {}: the old node closed its stale connection {stale_after:?} after the new one (bound 5 s)",
            k + 1
        );
        moves.push((switched, up, closed, to));
        // Orders reach the machine on its new node before the next move.
        wait(
            &format!("orders after move {}", k + 1),
            DEADLINE,
            || async { burst.successes() >= before + 3 },
        )
        .await;
    }
    // Observe a little beyond the last stale close: every node polled at
    // least five more times after CONVERGE.
    let last_up = moves.last().map(|m| m.1).expect("moves");
    let poll_from = last_up + CONVERGE;
    wait("polls after the last move", DEADLINE, || async {
        let p = polls.lock().unwrap();
        apis.iter().all(|a| {
            p.iter()
                .filter(|x| x.node == a.name && x.started > poll_from)
                .count()
                >= 5
        })
    })
    .await;
    stop.cancel();
    for p in pollers {
        let _ = p.await;
    }
    let answers = burst.stop().await;

    // No node showed the machine offline once the new connection had had
    // CONVERGE to spread.
    let polls = polls.lock().unwrap().clone();
    let mut early_offline = 0;
    for (k, (_, up, _, _)) in moves.iter().enumerate() {
        let next_switch = moves.get(k + 1).map(|m| m.0);
        for p in &polls {
            let in_window = p.started >= *up && next_switch.is_none_or(|n| p.started < n);
            if !in_window || p.online != Some(false) {
                continue;
            }
            assert!(
                p.started < *up + CONVERGE,
                "move {}: {} reported the machine offline {:?} after its new connection came up",
                k + 1,
                p.node,
                p.started - *up
            );
            early_offline += 1;
        }
    }
    let ids = accepted(&answers);
    let st = settle(&apis[0], &ids, &["completed"], DEADLINE).await;
    assert!(st.values().all(|s| s == "completed"), "{st:?}");
    let (n, repeated) = assert_dispensed_once(&sims);
    let audit = assert_dispenses_match_answers(&c, 0, &answers, &sims).await;
    assert_dispensed_completed(&apis[0], &sims).await;
    let stale: Vec<Duration> = moves
        .iter()
        .map(|(_, up, closed, _)| closed.saturating_duration_since(*up))
        .collect();
    println!(
        "cluster figures: (b) 3 moves; stale connection closed by the old node {stale:?} after the new connect; \
         offline polls within CONVERGE of a move: {early_offline}; answers {:?}; dispensed {n}; repeated commands {repeated}; {audit}",
        code_counts(&answers)
    );
    sim.shutdown().await;
}

/// (c) SIGKILL of the gateway node holding the most machines during a burst
/// of orders through haproxy. Bounds: all machines back online through
/// haproxy (connected, and every live node showing them online) within
/// 10 s of the kill; every order answered 0 exists and settles (completed,
/// failed, partially_dispensed or unknown) within DEADLINE; none dispensed
/// twice; every dispensed order ends completed; reservations add up on
/// every live node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_of_a_gateway_node_during_a_burst_loses_nothing() {
    let mut c = Cluster::start(ClusterOptions::default()).await;
    let BurstSetup {
        m,
        apis,
        sims,
        burst,
        ..
    } = BurstSetup::start(&c, 30_000_000, 40).await;

    let (victim, held) = c.busiest_node().await;
    assert!(held > 0, "some node holds machines");
    let before = burst.successes();
    let connects_before: Vec<usize> = sims.iter().map(connects).collect();
    let killed = Instant::now();
    c.nodes[victim].kill();
    let live: Vec<Api> = (0..3)
        .filter(|&i| i != victim)
        .map(|i| apis[i].clone())
        .collect();
    // Back: the victim's machines have reconnected (through haproxy, to the
    // others), every machine is subscribed, and every live node shows all
    // of them online.
    let back = wait(
        "all machines back online through haproxy",
        DEADLINE,
        || async {
            let reconnected = sims
                .iter()
                .zip(&connects_before)
                .filter(|(s, n)| connects(s) > **n)
                .count() as u64;
            reconnected >= held && sims.iter().all(SimHandle::ready) && {
                let mut all = true;
                for a in &live {
                    all &= a.online_total().await == Some(6);
                }
                all
            }
        },
    )
    .await;
    // Orders complete again on the re-homed machines.
    wait("orders after the kill", DEADLINE, || async {
        burst.successes_after(killed + back) >= 20
    })
    .await;
    let answers = burst.stop().await;
    assert!(
        back <= Duration::from_secs(10),
        "machines back online {back:?} after the kill (bound 10 s)"
    );

    let ids = accepted(&answers);
    let lb = c.lb_api(&m);
    let st = settle(
        &lb,
        &ids,
        &["completed", "failed", "partially_dispensed", "unknown"],
        DEADLINE,
    )
    .await;
    let (n, repeated) = assert_dispensed_once(&sims);
    let audit = assert_dispenses_match_answers(&c, (victim + 1) % 3, &answers, &sims).await;
    assert_dispensed_completed(&lb, &sims).await;
    assert_stock_adds_up(&live, &sims).await;
    let mut by_status: BTreeMap<&str, usize> = BTreeMap::new();
    for s in st.values() {
        *by_status.entry(s.as_str()).or_default() += 1;
    }
    println!(
        "cluster figures: (c) killed gw{} holding {held} machines after {before} orders; all machines back online \
         through haproxy {back:?} after the kill; answers {:?}; settled {by_status:?}; dispensed {n}; repeated commands {repeated}; {audit}",
        victim + 1,
        code_counts(&answers)
    );
    for s in &sims {
        s.shutdown().await;
    }
}

/// (d) SIGKILL of the NATS server with the most clients during a burst of
/// orders through haproxy (two thirds of them forwarded between nodes).
/// Bound: the longest time without a successful order, from the first
/// success to the last, is at most 2 s, counted while some worker of the
/// burst is free to place one (requests whose answers were lost with the
/// server are answered at their deadline, which every answer meets);
/// orders keep completing; none dispensed twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_of_a_nats_server_during_a_burst_keeps_orders_flowing() {
    let mut c = Cluster::start(ClusterOptions::default()).await;
    let BurstSetup {
        apis, sims, burst, ..
    } = BurstSetup::start(&c, 40_000_000, 30).await;

    let mut clients = Vec::new();
    for i in 0..3 {
        clients.push(c.nats.clients(i).await.unwrap_or(0));
    }
    let victim = (0..3).max_by_key(|&i| clients[i]).expect("servers");
    let killed = Instant::now();
    c.nats.kill(victim);
    // Run on until 4 s past the kill and 30 more successes.
    wait("orders after the NATS kill", DEADLINE, || async {
        killed.elapsed() >= Duration::from_secs(4) && burst.successes_after(killed) >= 30
    })
    .await;
    // No order is placed after this: the last gap ends here.
    let stopped = Instant::now();
    let answers = burst.stop().await;

    let mut ok: Vec<Instant> = answers
        .iter()
        .filter(|a| a.code == Some(0))
        .map(|a| a.at)
        .collect();
    ok.sort();
    // Requests whose answers were on the killed server (in flight at the
    // kill, or sent while their nodes reconnected) are answered from the
    // database at their deadline, 5.5 s after they arrived
    // (docs/scale-out.md). While every worker of the burst waits on one of
    // those, nobody can place an order: on a loaded machine, where each
    // worker always has a request out, that happens. Orders "stop" only
    // while some worker is free to place one, so each gap is counted from
    // the first moment one is.
    let caught: Vec<(Instant, Instant)> = answers
        .iter()
        .filter(|a| a.latency >= Duration::from_secs(5))
        .map(|a| (a.at - a.latency, a.at))
        .collect();
    let workers = sims.len();
    let free_from = |t: Instant| -> Instant {
        let mut waiting: Vec<Instant> = caught
            .iter()
            .filter(|&&(sent, at)| sent <= t && at > t)
            .map(|&(_, at)| at)
            .collect();
        if waiting.len() < workers {
            return t;
        }
        waiting.sort();
        waiting[0]
    };
    let (mut gap, mut gap_at, mut raw_gap) = (Duration::ZERO, killed, Duration::ZERO);
    for w in ok.windows(2) {
        raw_gap = raw_gap.max(w[1] - w[0]);
        let g = w[1].min(stopped).saturating_duration_since(free_from(w[0]));
        if g > gap {
            (gap, gap_at) = (g, w[0]);
        }
    }
    let slowest = answers.iter().map(|a| a.latency).max().unwrap_or_default();
    let ids = accepted(&answers);
    settle(&apis[0], &ids, &["completed"], DEADLINE).await;
    assert_dispensed_once(&sims);
    let audit = assert_dispenses_match_answers(&c, 0, &answers, &sims).await;
    assert_dispensed_completed(&apis[0], &sims).await;
    println!(
        "cluster figures: (d) killed NATS n{} (clients {clients:?}); longest gap without a successful order {gap:?} \
         (starting {:?} after the kill; {raw_gap:?} between successes, counting the burst's stop and the time every worker waited on an answer lost with the server); \
         slowest answer {slowest:?}; answers {:?}; {audit}",
        victim + 1,
        gap_at.checked_duration_since(killed).map(|d| format!("{d:?}")).unwrap_or_else(|| "before".into()),
        code_counts(&answers)
    );
    assert!(
        gap <= Duration::from_secs(2),
        "orders stopped for {gap:?} (bound 2 s)"
    );
    // The caught requests were answered by their deadline
    // (`orders.request_timeout`, 6 s), not left hanging.
    assert!(
        slowest <= Duration::from_secs(8),
        "an answer took {slowest:?} (request deadline 6 s)"
    );
    for s in &sims {
        s.shutdown().await;
    }
}

/// (e) Webhooks while a node is SIGKILLed: machines that complete, fail and
/// dispense partially; every order answered 0 gets the event of its final
/// status (none lost), signed with the merchant's AppSecret, at most one
/// event per order and type, and each order's events in order. API.md says
/// deliveries are at least once, so repeated deliveries of one event id are
/// allowed and counted (deduplicated by event id). Bound: all events within
/// 42 s after the orders settle (events the killed node had claimed wait for
/// their claim's lease, notifier.timeout + 30 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_events_survive_node_loss_in_order_and_none_lost() {
    let mut c = Cluster::start(ClusterOptions::default()).await;
    let (receiver, url) = Receiver::start().await;
    let m = c.merchant(Some(&url));
    let creds = c.machines(&m, 50_000_000, 6);
    let apis: Vec<Api> = (0..3).map(|i| c.api(i, &m)).collect();
    let behaviours = [
        Behaviour::Normal,
        Behaviour::Normal,
        Behaviour::Fail {
            error: "motor_jam".into(),
        },
        Behaviour::Fail {
            error: "motor_jam".into(),
        },
        Behaviour::Partial {
            error: "motor_jam".into(),
        },
        Behaviour::Partial {
            error: "motor_jam".into(),
        },
    ];
    let sims: Vec<SimHandle> = creds
        .iter()
        .zip(behaviours)
        .map(|(cr, b)| spawn_sim(c.haproxy.mqtt_addr().to_string(), cr, b))
        .collect();
    wait_machines_ready(&sims, &apis).await;
    let machines: Vec<MachineNo> = sims.iter().map(SimHandle::machine_no).collect();
    // Quantity 2: a partial machine dispenses 1 of 2.
    let burst = Burst::start(&c.lb_api(&m), &machines, 2);
    wait("a burst under way", DEADLINE, || async {
        burst.successes() >= 30
    })
    .await;
    let (victim, held) = c.busiest_node().await;
    let connects_before: Vec<usize> = sims.iter().map(connects).collect();
    let killed = Instant::now();
    c.nodes[victim].kill();
    // Its machines re-home and the orders go on, for all machines.
    wait("the killed node's machines re-homed", DEADLINE, || async {
        let reconnected = sims
            .iter()
            .zip(&connects_before)
            .filter(|(s, n)| connects(s) > **n)
            .count() as u64;
        reconnected >= held && sims.iter().all(SimHandle::ready)
    })
    .await;
    let rehomed = Instant::now();
    wait("orders after the kill", DEADLINE, || async {
        burst.successes_after(rehomed) >= 30
    })
    .await;
    let answers = burst.stop().await;
    let ids = accepted(&answers);
    let lb = c.lb_api(&m);
    let final_status = settle(
        &lb,
        &ids,
        &["completed", "failed", "partially_dispensed"],
        DEADLINE,
    )
    .await;

    // Every order's final event arrives.
    // Events the killed node had claimed wait out its claim's lease before
    // another node delivers them: notifier.timeout (2 s in the node config)
    // + the notifier's fixed 30 s margin. Seen: 28 s.
    const WEBHOOK_BOUND: Duration = Duration::from_secs(2 + 30 + 10);
    let waited = wait("every order's final event", WEBHOOK_BOUND, || async {
        let (events, _) = receiver.distinct();
        let have: HashSet<(u64, String)> = events
            .iter()
            .filter_map(|h| Some((h.order_id?, h.kind.clone())))
            .collect();
        final_status
            .iter()
            .all(|(id, s)| have.contains(&(*id, event_type_for(s).unwrap_or("?").to_string())))
    })
    .await;
    let (events, repeats) = receiver.distinct();
    let mut kinds: BTreeMap<&str, usize> = BTreeMap::new();
    for h in &events {
        *kinds.entry(h.kind.as_str()).or_default() += 1;
    }
    let mut per_order: HashMap<u64, Vec<&Hit>> = HashMap::new();
    for h in &events {
        assert_signed(h, &m.secret);
        if let Some(id) = h.order_id {
            per_order.entry(id).or_default().push(h);
        }
    }
    for (id, evs) in &per_order {
        let mut kinds = HashSet::new();
        for e in evs {
            assert!(
                kinds.insert(e.kind.as_str()),
                "order {id}: two distinct {} events (a transition recorded twice): {evs:?}",
                e.kind
            );
        }
        // In order: arrival order follows creation order.
        let created: Vec<&str> = evs.iter().map(|e| e.created_at.as_str()).collect();
        let mut sorted = created.clone();
        sorted.sort();
        assert_eq!(created, sorted, "order {id}: events out of order");
        if let Some(s) = final_status.get(id) {
            let last = evs.last().expect("events");
            assert_eq!(
                last.status, *s,
                "order {id}: the last event delivered says {} but the order is {s}",
                last.status
            );
        }
    }
    let mut by_status: BTreeMap<&str, usize> = BTreeMap::new();
    for s in final_status.values() {
        *by_status.entry(s.as_str()).or_default() += 1;
    }
    assert!(
        by_status.len() == 3,
        "completed, failed and partially_dispensed orders all occurred: {by_status:?}"
    );
    assert_dispensed_once(&sims);
    let audit = assert_dispenses_match_answers(&c, (victim + 1) % 3, &answers, &sims).await;
    println!(
        "cluster figures: (e) killed gw{} (its machines re-homed in {:?}); {} orders settled {by_status:?}; {} distinct events {kinds:?} ({} repeated deliveries, \
         deduplicated by event id); all final events in {waited:?} after settling; {audit}",
        victim + 1,
        rehomed.duration_since(killed),
        ids.len(),
        events.len(),
        repeats
    );
    for s in &sims {
        s.shutdown().await;
    }
}

/// (f) Many `pay_later` orders with a 2 s `unpaid_timeout`, swept by all
/// three nodes at once: each expires exactly once (one `expired` timeline
/// event, one distinct `order.expired` webhook) and the stock is released
/// once (nothing reserved; a pay_later order for the whole stock is taken,
/// one more unit is refused with 30004). Bound: every order expired within
/// 10 s of its deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_expiry_sweeps_expire_each_order_once() {
    const UNPAID: Duration = Duration::from_secs(2);
    const PER_MACHINE: u32 = 15;
    let c = Cluster::start(ClusterOptions {
        env: vec![
            ("VENDGATE_ORDERS__UNPAID_TIMEOUT", "2s".into()),
            ("VENDGATE_ORDERS__MAX_UNPAID_PER_MACHINE", "100".into()),
        ],
        ..ClusterOptions::default()
    })
    .await;
    let (receiver, url) = Receiver::start().await;
    let m = c.merchant(Some(&url));
    let creds = c.machines(&m, 60_000_000, 4);
    let apis: Vec<Api> = (0..3).map(|i| c.api(i, &m)).collect();
    // A small stock, so "released once" is checkable with one big order.
    let sims: Vec<SimHandle> = creds
        .iter()
        .map(|cr| {
            let mut cfg = sim_config(c.haproxy.mqtt_addr().to_string(), cr, Behaviour::Normal);
            cfg.inventory[0].stock = 60;
            SimMachine::spawn(cfg)
        })
        .collect();
    wait_machines_ready(&sims, &apis).await;

    // Placed round robin over the nodes.
    let mut ids = Vec::new();
    let mut last_placed = Instant::now();
    for k in 0..PER_MACHINE {
        for (j, s) in sims.iter().enumerate() {
            let api = &apis[(k as usize + j) % 3];
            let v = api.order(&s.machine_no(), 1, true).await.expect("answer");
            assert_eq!(v["code"], 0, "{}: pay_later order: {v}", api.name);
            ids.push(v["data"]["order_id"].as_u64().expect("order_id"));
            last_placed = Instant::now();
        }
    }
    let expired_in = wait(
        "every unpaid order expired",
        UNPAID + Duration::from_secs(10),
        || async {
            for id in &ids {
                if apis[0].status(*id).await != Some(Ok("expired".into())) {
                    return false;
                }
            }
            true
        },
    )
    .await;
    let lateness = (last_placed + expired_in).saturating_duration_since(last_placed + UNPAID);

    // One expiry per order in the timeline.
    let client = &c.client;
    for id in &ids {
        let v: Value = client
            .get(format!(
                "{}/dashboard/api/orders/{id}",
                c.nodes[0].base_url()
            ))
            .basic_auth(OPERATOR.0, Some(OPERATOR.1))
            .send()
            .await
            .expect("dashboard")
            .json()
            .await
            .expect("order JSON");
        let expired = v["events"]
            .as_array()
            .map(|e| e.iter().filter(|e| e["type"] == "expired").count())
            .unwrap_or(0);
        assert_eq!(expired, 1, "order {id}: {expired} expired events: {v}");
    }
    // One distinct order.expired event per order.
    wait("an order.expired webhook per order", DEADLINE, || async {
        let (events, _) = receiver.distinct();
        let got: HashSet<u64> = events
            .iter()
            .filter(|h| h.kind == "order.expired")
            .filter_map(|h| h.order_id)
            .collect();
        ids.iter().all(|id| got.contains(id))
    })
    .await;
    let (events, repeats) = receiver.distinct();
    let mut per_order: HashMap<u64, usize> = HashMap::new();
    for h in events.iter().filter(|h| h.kind == "order.expired") {
        *per_order.entry(h.order_id.expect("order_id")).or_default() += 1;
    }
    for (id, n) in &per_order {
        assert_eq!(*n, 1, "order {id}: {n} distinct order.expired events");
    }
    // Stock released once: nothing reserved anywhere; the whole stock can
    // be reserved again, and not one unit more.
    assert_stock_adds_up(&apis, &sims).await;
    for s in &sims {
        let v = apis[1]
            .order(&s.machine_no(), 60, true)
            .await
            .expect("answer");
        assert_eq!(
            v["code"],
            0,
            "the whole stock of {} is free again: {v}",
            s.machine_no()
        );
        let v = apis[2]
            .order(&s.machine_no(), 1, true)
            .await
            .expect("answer");
        assert_eq!(
            v["code"],
            30004,
            "no more than the stock of {} is free: {v}",
            s.machine_no()
        );
    }
    assert_eq!(
        commands_received(&sims),
        0,
        "unpaid orders are never dispatched"
    );
    println!(
        "cluster figures: (f) {} unpaid orders on 3 nodes expired once each, the last {lateness:?} after its deadline; \
         {} repeated webhook deliveries",
        ids.len(),
        repeats
    );
    assert!(lateness <= Duration::from_secs(10));
    for s in &sims {
        s.shutdown().await;
    }
}

/// (g) PostgreSQL (a dedicated server) stopped and started again, machines
/// connected directly to the nodes. Bounds: with the database down every
/// node answers orders 50000 within 3 s and dispatches nothing (no
/// dispense command reaches any machine), `/readyz` fails on every node
/// within 5 s; after the restart every node is ready again and orders
/// complete within 15 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_outage_fails_orders_fast_and_service_resumes() {
    let c = Cluster::start(ClusterOptions {
        dedicated_pg: true,
        ..ClusterOptions::default()
    })
    .await;
    let m = c.merchant(None);
    let creds = c.machines(&m, 70_000_000, 3);
    let apis: Vec<Api> = (0..3).map(|i| c.api(i, &m)).collect();
    let sims: Vec<SimHandle> = creds
        .iter()
        .enumerate()
        .map(|(k, cr)| spawn_sim(c.nodes[k].mqtt_addr().to_string(), cr, Behaviour::Normal))
        .collect();
    wait_machines_ready(&sims, &apis).await;
    let mut ids = Vec::new();
    for (j, api) in apis.iter().enumerate() {
        let v = api
            .order(&sims[(j + 1) % 3].machine_no(), 1, false)
            .await
            .expect("answer");
        assert_eq!(v["code"], 0, "{v}");
        ids.push(v["data"]["order_id"].as_u64().expect("order_id"));
    }
    settle(&apis[0], &ids, &["completed"], DEADLINE).await;
    let commands_before = commands_received(&sims);

    let pg = c.pg.as_ref().expect("dedicated PostgreSQL");
    let stopped = Instant::now();
    pg.stop().await;
    // From the stop: the readiness probe gives storage up to 2 s.
    wait(
        "/readyz failing on every node",
        Duration::from_secs(5),
        || async {
            for n in &c.nodes {
                if n.readyz().await != Some(false) {
                    return false;
                }
            }
            true
        },
    )
    .await;
    let unready = stopped.elapsed();
    let mut slowest = Duration::ZERO;
    for round in 0..3 {
        for (j, api) in apis.iter().enumerate() {
            let t = Instant::now();
            let v = api
                .order(&sims[(j + round) % 3].machine_no(), 1, false)
                .await;
            let took = t.elapsed();
            slowest = slowest.max(took);
            let v = v.unwrap_or_else(|| panic!("{}: no answer with the database down", api.name));
            assert_eq!(
                v["code"], 50000,
                "{}: order with the database down: {v}",
                api.name
            );
            assert!(
                took <= Duration::from_secs(3),
                "{}: 50000 took {took:?} (bound 3 s)",
                api.name
            );
        }
    }
    assert_eq!(
        commands_received(&sims),
        commands_before,
        "nothing is dispatched while the database is down"
    );
    let outage = stopped.elapsed();

    let restarted = Instant::now();
    pg.start().await;
    let ready = wait(
        "every node ready again",
        Duration::from_secs(15),
        || async {
            for n in &c.nodes {
                if n.readyz().await != Some(true) {
                    return false;
                }
            }
            true
        },
    )
    .await;
    // Service resumes: each node takes an order for a machine held by
    // another within the bound (retrying while it reconnects).
    let mut ids = Vec::new();
    for (j, api) in apis.iter().enumerate() {
        let target = sims[(j + 1) % 3].machine_no();
        let r = poll_value(
            Duration::from_secs(15),
            || api.order(&target, 1, false),
            |v| v.as_ref().is_some_and(|v| v["code"] == 0),
        )
        .await;
        let v = r.unwrap_or_else(|last| {
            panic!(
                "{}: no order taken after the database came back: {last:?}",
                api.name
            )
        });
        let id = v.and_then(|v| v["data"]["order_id"].as_u64());
        ids.push(id.expect("order id"));
    }
    let resumed = restarted.elapsed();
    settle(&apis[0], &ids, &["completed"], DEADLINE).await;
    assert_dispensed_once(&sims);
    println!(
        "cluster figures: (g) database down: slowest 50000 answer {slowest:?}, /readyz failing everywhere after {unready:?} \
         (outage observed {outage:?}); after the restart every node ready in {ready:?}, orders complete on every node {resumed:?} after the restart"
    );
    for s in &sims {
        s.shutdown().await;
    }
}

/// (node, when, machines online it reported).
type Samples = Arc<Mutex<Vec<(String, Instant, Option<u64>)>>>;

/// (h) SIGSTOP of the node holding the most machines for longer than
/// `node_dead_after`: its machines re-home through haproxy and take orders
/// (bound: within node_dead_after + 10 s); after SIGCONT the frozen node
/// dispenses nothing it should not (every dispensed order ends completed,
/// none twice) and marks nothing offline (every node keeps reporting all
/// machines online, the woken one from CONVERGE after it is ready again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigstop_of_a_gateway_node_rehomes_its_machines_and_the_woken_node_does_no_harm() {
    let mut c = Cluster::start(ClusterOptions::default()).await;
    let BurstSetup {
        m,
        apis,
        sims,
        machines,
        burst,
    } = BurstSetup::start(&c, 80_000_000, 30).await;

    let (victim, held) = c.busiest_node().await;
    assert!(held > 0);
    let victim_id = c.nodes[victim].id().to_string();
    let live: Vec<Api> = (0..3)
        .filter(|&i| i != victim)
        .map(|i| apis[i].clone())
        .collect();
    let frozen = Instant::now();
    c.nodes[victim].stop();
    let dead_after = c.timings.node_dead_after;
    // haproxy's /readyz check notices (inter 500 ms, fall 2, check timeout
    // 1 s) and cuts the frozen node's MQTT sessions; the machines reconnect
    // to the other nodes.
    c.haproxy.wait_down(&victim_id, DEADLINE).await;
    let marked_down = frozen.elapsed();
    wait(
        "machines re-homed",
        dead_after + Duration::from_secs(10),
        || async {
            if c.haproxy.mqtt_sessions().await.get(&victim_id).copied() != Some(0)
                || !sims.iter().all(SimHandle::ready)
            {
                return false;
            }
            for a in &live {
                if a.online_total().await != Some(6) {
                    return false;
                }
            }
            true
        },
    )
    .await;
    let rehomed = frozen.elapsed();
    // Each machine takes an order placed on a live node (fresh requests:
    // the burst's workers may sit in a request the frozen node holds).
    // Every request is kept, whatever its answer, for the check of
    // dispenses against answers.
    let mut own_answers: Vec<Answer> = Vec::new();
    for (k, m) in machines.iter().enumerate() {
        let api = &live[k % live.len()];
        let t = Instant::now();
        loop {
            let (a, v) = place(api, m, 1).await;
            let ok = a.code == Some(0);
            own_answers.push(a);
            if ok {
                break;
            }
            assert!(
                t.elapsed() <= DEADLINE,
                "{}: machine {m} takes no order after the freeze: {v:?}",
                api.name
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let orders_back = frozen.elapsed();
    assert!(
        orders_back <= dead_after + Duration::from_secs(10),
        "machines took orders again {orders_back:?} after the freeze (bound {:?})",
        dead_after + Duration::from_secs(10)
    );
    // Frozen for longer than node_dead_after (the scenario: the others
    // declare it dead meanwhile).
    wait("frozen longer than node_dead_after", DEADLINE, || async {
        frozen.elapsed() >= dead_after + Duration::from_secs(1)
    })
    .await;
    let froze_for = frozen.elapsed();

    // Wake it and watch every node's view for a while.
    let stop = CancellationToken::new();
    let woke = Instant::now();
    c.nodes[victim].cont();
    let samples: Samples = Arc::default();
    let watchers: Vec<JoinHandle<()>> = apis
        .iter()
        .map(|a| {
            let (a, stop, samples) = (a.clone(), stop.clone(), samples.clone());
            tokio::spawn(async move {
                while !stop.is_cancelled() {
                    let t = Instant::now();
                    let n = a.online_total().await;
                    samples.lock().unwrap().push((a.name.clone(), t, n));
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            })
        })
        .collect();
    let awake = wait("the woken node ready again", DEADLINE, || async {
        c.nodes[victim].readyz().await == Some(true)
    })
    .await;
    let woken_ready = woke + awake;
    // Observe for node_dead_after + 2 s after it is ready again (enough for
    // it to heartbeat, find itself declared dead and act on it).
    let until = woken_ready + dead_after + Duration::from_secs(2);
    wait("observation window", DEADLINE, || async {
        Instant::now() >= until
    })
    .await;
    stop.cancel();
    for w in watchers {
        let _ = w.await;
    }
    let answers = burst.stop().await;

    let samples = samples.lock().unwrap().clone();
    for (node, t, n) in &samples {
        let is_victim = *node == victim_id;
        if is_victim && *t < woken_ready + CONVERGE {
            continue;
        }
        if let Some(n) = n {
            if *n != 6 {
                // The node's answers over the window, where they changed.
                let mut series = String::new();
                let mut last = None;
                for (_, t, v) in samples.iter().filter(|x| x.0 == *node) {
                    if last != Some(*v) {
                        series.push_str(&format!(
                            " +{:?}: {v:?};",
                            t.saturating_duration_since(woke)
                        ));
                        last = Some(*v);
                    }
                }
                panic!(
                    "{node} reported {n} machines online {:?} after SIGCONT of {victim_id} (ready again after {awake:?}); \
                     its answers since SIGCONT:{series}",
                    t.saturating_duration_since(woke)
                );
            }
        }
    }
    // Every machine takes an order placed on every node, the woken one
    // included, at the first attempt.
    let after = Instant::now();
    for a in &apis {
        for m in &machines {
            let (answer, v) = place(a, m, 1).await;
            let v = v.expect("answer");
            assert_eq!(
                v["code"], 0,
                "{}: order for {m} after the wake: {v}",
                a.name
            );
            assert!(answer.order_id.is_some(), "order_id in {v}");
            own_answers.push(answer);
        }
    }
    let orders_after_wake = after.elapsed();
    let all_answers: Vec<Answer> = answers.iter().chain(&own_answers).cloned().collect();
    let ids = accepted(&all_answers);
    let lb = c.lb_api(&m);
    settle(
        &lb,
        &ids,
        &["completed", "unknown", "failed", "partially_dispensed"],
        DEADLINE,
    )
    .await;
    let (n, repeated) = assert_dispensed_once(&sims);
    let audit = assert_dispenses_match_answers(&c, (victim + 1) % 3, &all_answers, &sims).await;
    assert_dispensed_completed(&lb, &sims).await;
    println!(
        "cluster figures: (h) froze {victim_id} (held {held}) for {froze_for:?}; after SIGSTOP: haproxy marked it down at \
         {marked_down:?}, machines re-homed at {rehomed:?}, orders taken by all of them at {orders_back:?}; woken node ready {awake:?} after SIGCONT, 18 orders on the 3 nodes after the observation in \
         {orders_after_wake:?}; {} samples, answers {:?}; dispensed {n}; repeated commands {repeated}; {audit}",
        samples.len(),
        code_counts(&answers)
    );
    for s in &sims {
        s.shutdown().await;
    }
}

/// (i) A machine flapping between gw1 and gw2 (nine direct reconnects,
/// alternately leaving the old connection open) while orders are placed
/// through haproxy: no order dispensed twice, every dispensed order
/// completes, and at the end the machine is online on every node and held
/// by gw2 (the last one) within CONVERGE + DEADLINE.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flapping_machine_is_never_dispensed_twice_and_ends_online_on_the_last_node() {
    let c = Cluster::start(ClusterOptions::default()).await;
    let m = c.merchant(None);
    let creds = c.machines(&m, 90_000_000, 1);
    let apis: Vec<Api> = (0..3).map(|i| c.api(i, &m)).collect();
    let relay = Relay::start(c.nodes[0].mqtt_addr()).await;
    let sim = spawn_sim(relay.gateway(), &creds[0], Behaviour::Normal);
    let sims = vec![sim.clone()];
    wait_machines_ready(&sims, &apis).await;
    let machine = sim.machine_no();
    let burst = Burst::start(&c.lb_api(&m), &[machine], 1);
    wait("orders flowing", DEADLINE, || async {
        burst.successes() >= 3
    })
    .await;

    // Odd, so the last flip is to gw2.
    let flips = 9;
    let t = Instant::now();
    for k in 0..flips {
        let to = if k % 2 == 0 { 1 } else { 0 };
        let answered = burst.answers.lock().unwrap().len();
        relay.switch(c.nodes[to].mqtt_addr(), k % 4 < 2);
        nth_connect(&sim, k + 2).await;
        // Subscribed again (its state, inventory and stored results were
        // received before the SUBACK): cutting a connection while the
        // machine's first publishes are in flight wedges the simulator's
        // MQTT client (see wait_sim_ready), which is not what this tests.
        wait_sim_ready(&sim).await;
        // Let at least one order be answered (whatever its code) on this
        // connection before flipping again.
        wait("an order answered between flips", DEADLINE, || async {
            burst.answers.lock().unwrap().len() > answered
        })
        .await;
    }
    let flapped = t.elapsed();
    // The last connection (to gw2) stays: orders complete on it.
    let settled_from = Instant::now();
    let r = vendgate_testkit::wait_for(DEADLINE, Duration::from_millis(25), || async {
        burst.successes_after(settled_from) >= 3
    })
    .await;
    if r.is_err() {
        let mut views = Vec::new();
        for a in &apis {
            views.push((a.name.clone(), a.get(&format!("/machines/{machine}")).await));
        }
        panic!(
            "no order completed in {DEADLINE:?} after the last flip (sim connected: {}, subscribed: {}); \
             GET /machines/{machine} per node: {views:?}\nmachine journal:\n{}",
            sim.connected(),
            sim.ready(),
            journal_tail(&sim, 30)
        );
    }
    let answers = burst.stop().await;
    let online = wait("online on every node", DEADLINE, || async {
        for a in &apis {
            if a.online(&machine).await != Some(true) {
                return false;
            }
        }
        true
    })
    .await;
    let want: BTreeMap<String, u64> = [("gw1", 0), ("gw2", 1), ("gw3", 0)]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
    let mut views = Vec::new();
    for i in 0..3 {
        let r = poll_value(
            DEADLINE,
            || c.cluster_view(i),
            |v| v.as_ref().and_then(node_counts).as_ref() == Some(&want),
        )
        .await;
        let last = match r {
            Ok(v) => v,
            Err(v) => panic!(
                "gw{}: the machine should be held by gw2 at the end: {v:?}",
                i + 1
            ),
        };
        views.push(last);
    }
    let ids = accepted(&answers);
    settle(&apis[0], &ids, &["completed"], DEADLINE).await;
    let (n, repeated) = assert_dispensed_once(&sims);
    let audit = assert_dispenses_match_answers(&c, 0, &answers, &sims).await;
    assert_dispensed_completed(&apis[0], &sims).await;
    println!(
        "cluster figures: (i) {flips} flips in {flapped:?}; online everywhere {online:?} after the last; answers {:?}; \
         dispensed {n}; repeated commands {repeated}; stale connections closed by nodes {}; {audit}",
        code_counts(&answers),
        relay.stale_closes().len()
    );
    sim.shutdown().await;
}

/// Uplink copies: a service client on one node sees the uplinks of a
/// machine held by another node (its retained `state` on subscribing, then
/// the `ack`, `result` and `inventory` of an order placed on a third node).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_client_on_any_node_sees_every_machines_uplinks() {
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

    let c = Cluster::start(ClusterOptions::default()).await;
    let m = c.merchant(None);
    let creds = c.machines(&m, 50_000_000, 1);
    let sim = spawn_sim(
        c.nodes[1].mqtt_addr().to_string(),
        &creds[0],
        Behaviour::Normal,
    );
    assert!(sim.wait_ready(DEADLINE).await);
    let apis: Vec<Api> = (0..3).map(|i| c.api(i, &m)).collect();
    wait_machines_ready(std::slice::from_ref(&sim), &apis).await;
    let machine = sim.machine_no();

    let out = c.nodes[0]
        .cli(&["service", "add", "--name", "observer"])
        .unwrap_or_else(|e| panic!("{e}"));
    let field = |k: &str| {
        out.lines()
            .find_map(|l| l.strip_prefix(&format!("{k}=")))
            .unwrap_or_else(|| panic!("no {k} in {out:?}"))
            .to_string()
    };
    let addr = c.nodes[0].mqtt_addr();
    let mut opts = MqttOptions::new("observer-1", addr.ip().to_string(), addr.port());
    opts.set_credentials(field("username"), field("password"));
    let (client, mut events) = AsyncClient::new(opts, 64);
    client
        .subscribe(format!("vend/v1/{machine}/#"), QoS::AtLeastOnce)
        .await
        .expect("subscribe");
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let pump = {
        let seen = seen.clone();
        tokio::spawn(async move {
            while let Ok(ev) = events.poll().await {
                if let Event::Incoming(Packet::Publish(p)) = ev {
                    if let Ok(mut s) = seen.lock() {
                        s.push(p.topic.clone());
                    }
                }
            }
        })
    };
    let has = |suffix: &str| {
        let t = format!("vend/v1/{machine}/{suffix}");
        seen.lock().map(|s| s.contains(&t)).unwrap_or(false)
    };
    // The retained state was copied to node 0 when the machine connected.
    wait(
        "the machine's retained state on another node",
        DEADLINE,
        || async { has("state") },
    )
    .await;
    let answer = apis[2].order(&machine, 1, false).await.expect("an answer");
    assert_eq!(answer["code"], 0, "{answer}");
    wait(
        "ack, result and inventory copied to node 0",
        DEADLINE,
        || async { has("ack") && has("result") && has("inventory") },
    )
    .await;
    pump.abort();
    sim.shutdown().await;
}
