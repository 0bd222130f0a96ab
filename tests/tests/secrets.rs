//! Secret rotation and configured passwords end to end: rotations are made
//! the way `vendgate … rotate-secret` makes them (the provisioning functions
//! on a second connection to the gateway's SQLite file, with the key file
//! loaded from its data directory), and checked over real MQTT CONNECTs, real
//! open-API requests and a real webhook receiver.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::{HeaderMap, StatusCode};
use hmac::{Hmac, Mac};
use rumqttc::mqttbytes::v4::ConnectReturnCode;
use sha2::Sha256;
use vendgate::config::ServiceCredential;
use vendgate::secrets::{SecretHash, WebhookKey};
use vendgate::storage::Storage;
use vendgate_e2e::{
    ready_sim, sim_config, wait_until, wait_until_async, Api, RawClient, TestGateway,
};
use vendgate_proto::machine::MachineNo;

const M1: &str = "40000001";
const HOUR: Duration = Duration::from_secs(3600);

/// What `vendgate` CLI commands open: the gateway's database file through
/// their own pool, and the webhook key from its data directory.
async fn cli_side(gw: &TestGateway) -> (Arc<dyn Storage>, WebhookKey) {
    // The CLI opens the gateway's database from the same settings.
    let store = vendgate::storage::open(&gw.handle.settings)
        .await
        .expect("open the gateway's database");
    let key = WebhookKey::load_or_create(&gw.handle.settings.webhook_key_path())
        .expect("the gateway's webhook key");
    (store, key)
}

/// `key=value` output lines of a provisioning command, by key.
fn field(out: &[u8], key: &str) -> String {
    String::from_utf8_lossy(out)
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")).map(str::to_owned))
        .unwrap_or_else(|| panic!("no {key}= in {:?}", String::from_utf8_lossy(out)))
}

async fn rotate_machine(store: &dyn Storage, m: &str, grace: Duration) -> String {
    let mut out = Vec::new();
    vendgate::tools::provision::machine_rotate_secret(
        store,
        m.parse().expect("machine_no"),
        grace,
        &mut out,
    )
    .await
    .expect("rotate machine secret");
    field(&out, "secret")
}

async fn rotate_merchant(
    store: &dyn Storage,
    key: &WebhookKey,
    appid: &str,
    grace: Duration,
) -> String {
    let mut out = Vec::new();
    vendgate::tools::provision::merchant_rotate_secret(store, key, appid, grace, &mut out)
        .await
        .expect("rotate merchant secret");
    assert_eq!(field(&out, "appid"), appid);
    field(&out, "appsecret")
}

/// The CONNACK code of a machine CONNECT with `secret` (the connection is
/// dropped right after).
async fn connack(addr: SocketAddr, m: &str, secret: &str) -> Option<ConnectReturnCode> {
    RawClient::connect(addr, m, Some((m, secret)), 30).await.1
}

async fn metrics_text(gw: &TestGateway) -> String {
    reqwest::get(format!("http://{}/metrics", gw.http_addr))
        .await
        .expect("GET /metrics")
        .text()
        .await
        .expect("metrics body")
}

#[tokio::test]
async fn machine_old_and_new_secrets_connect_during_the_grace_then_only_the_new() {
    let gw = TestGateway::start().await;
    let (appid, _) = gw.merchant("shop").await;
    let first = gw.machine(&appid, M1).await;
    let (cli, _) = cli_side(&gw).await;
    let addr = gw.mqtt_addr;

    let second = rotate_machine(cli.as_ref(), M1, HOUR).await;
    assert_eq!(
        connack(addr, M1, &second).await,
        Some(ConnectReturnCode::Success)
    );
    assert_eq!(
        connack(addr, M1, &first).await,
        Some(ConnectReturnCode::Success),
        "the old secret works during the grace"
    );
    assert_eq!(
        connack(addr, M1, "0123456789abcdef0123456789abcdef").await,
        Some(ConnectReturnCode::NotAuthorized)
    );
    // Operators see who has not switched yet.
    assert_eq!(
        gw.handle
            .metrics
            .previous_secrets
            .machine
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    assert!(
        metrics_text(&gw)
            .await
            .contains("vendgate_previous_secret_used_total{account=\"machine\"} 1"),
        "metric exposed"
    );

    // Rotating again during the grace ends the first secret at once.
    let third = rotate_machine(cli.as_ref(), M1, HOUR).await;
    assert_eq!(
        connack(addr, M1, &first).await,
        Some(ConnectReturnCode::NotAuthorized)
    );
    assert_eq!(
        connack(addr, M1, &second).await,
        Some(ConnectReturnCode::Success)
    );
    assert_eq!(
        connack(addr, M1, &third).await,
        Some(ConnectReturnCode::Success)
    );

    // A grace that ended (expiry stored in the past): only the new one.
    let m: MachineNo = M1.parse().expect("machine_no");
    let past = chrono::Utc::now() - chrono::Duration::seconds(5);
    assert!(cli
        .rotate_machine_secret(&m, &SecretHash::new("fourth-secret"), Some(past))
        .await
        .expect("rotate"));
    assert_eq!(
        connack(addr, M1, &third).await,
        Some(ConnectReturnCode::NotAuthorized)
    );
    assert_eq!(
        connack(addr, M1, "fourth-secret").await,
        Some(ConnectReturnCode::Success)
    );

    // Grace 0: the old one stops with the rotation.
    let fifth = rotate_machine(cli.as_ref(), M1, Duration::ZERO).await;
    assert_eq!(
        connack(addr, M1, "fourth-secret").await,
        Some(ConnectReturnCode::NotAuthorized)
    );
    assert_eq!(
        connack(addr, M1, &fifth).await,
        Some(ConnectReturnCode::Success)
    );
    cli.close().await;
    gw.stop().await;
}

/// A rotation made by another process (the CLI) reaches the running gateway
/// within its merchant cache's TTL (one second): wait until `appsecret`
/// authenticates.
async fn new_appsecret_reaches(gw: &TestGateway, appid: &str, appsecret: &str) {
    wait_until_async("the rotated AppSecret reaches the gateway", || async {
        Api::new(gw, appid, appsecret).get("/machines").await["code"] == 0
    })
    .await;
}

#[tokio::test]
async fn merchant_old_and_new_appsecrets_work_during_the_grace_then_only_the_new() {
    let gw = TestGateway::start().await;
    let (appid, first) = gw.merchant("shop").await;
    let (cli, key) = cli_side(&gw).await;
    let code = |v: serde_json::Value| v["code"].as_i64().unwrap_or(-1);

    let second = rotate_merchant(cli.as_ref(), &key, &appid, HOUR).await;
    new_appsecret_reaches(&gw, &appid, &second).await;
    assert_eq!(
        code(Api::new(&gw, &appid, &first).get("/machines").await),
        0,
        "the old AppSecret works during the grace"
    );
    assert_eq!(
        code(
            Api::new(&gw, &appid, "not-the-secret")
                .get("/machines")
                .await
        ),
        10002
    );
    assert_eq!(
        gw.handle
            .metrics
            .previous_secrets
            .merchant
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    assert!(metrics_text(&gw)
        .await
        .contains("vendgate_previous_secret_used_total{account=\"merchant\"} 1"));

    // No grace: the previous AppSecret is refused from the next request on.
    let third = rotate_merchant(cli.as_ref(), &key, &appid, Duration::ZERO).await;
    new_appsecret_reaches(&gw, &appid, &third).await;
    assert_eq!(
        code(Api::new(&gw, &appid, &second).get("/machines").await),
        10002
    );
    assert_eq!(
        code(Api::new(&gw, &appid, &first).get("/machines").await),
        10002
    );
    assert_eq!(
        code(Api::new(&gw, &appid, &third).get("/machines").await),
        0
    );

    // A grace that has ended, as stored.
    let past = chrono::Utc::now() - chrono::Duration::seconds(5);
    assert!(cli
        .rotate_merchant_secret(
            &appid,
            &SecretHash::new("fourth-secret"),
            &key.encrypt(&appid, "fourth-secret"),
            Some(past),
        )
        .await
        .expect("rotate"));
    new_appsecret_reaches(&gw, &appid, "fourth-secret").await;
    assert_eq!(
        code(Api::new(&gw, &appid, &third).get("/machines").await),
        10002
    );
    assert_eq!(
        code(
            Api::new(&gw, &appid, "fourth-secret")
                .get("/machines")
                .await
        ),
        0
    );
    cli.close().await;
    gw.stop().await;
}

/// Webhook bodies and signatures as a merchant's endpoint receives them.
#[derive(Clone, Default)]
struct Hooks(Arc<Mutex<Vec<(String, String)>>>);

impl Hooks {
    async fn start(&self) -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind receiver");
        let addr = listener.local_addr().expect("receiver address");
        let hooks = self.clone();
        let app = axum::Router::new().fallback(move |headers: HeaderMap, body: String| {
            let hooks = hooks.clone();
            async move {
                let sig = headers
                    .get("vendgate-signature")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_owned();
                if let Ok(mut h) = hooks.0.lock() {
                    h.push((sig, body));
                }
                StatusCode::OK
            }
        });
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        addr
    }

    fn all(&self) -> Vec<(String, String)> {
        self.0.lock().map(|h| h.clone()).unwrap_or_default()
    }
}

/// Whether `sig` (`t=…,v1=…`) is the HMAC of "t.body" under `secret`.
fn signed_with(sig: &str, body: &str, secret: &str) -> bool {
    let mut t = "";
    let mut v1 = "";
    for part in sig.split(',') {
        match part.split_once('=') {
            Some(("t", x)) => t = x,
            Some(("v1", x)) => v1 = x,
            _ => {}
        }
    }
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("any key length");
    mac.update(format!("{t}.{body}").as_bytes());
    !t.is_empty() && hex::encode(mac.finalize().into_bytes()) == v1
}

#[tokio::test]
async fn webhooks_are_signed_with_the_new_appsecret_from_the_rotation_on() {
    let hooks = Hooks::default();
    let rx = hooks.start().await;
    let gw = TestGateway::start_with(|s| {
        s.notifier.allow_private_targets = true;
        s.notifier.poll_interval = Duration::from_millis(50);
    })
    .await;
    let (appid, old) = gw
        .merchant_with_url("shop", &format!("http://{rx}/hook"))
        .await;
    let machine_secret = gw.machine(&appid, M1).await;
    let (cli, key) = cli_side(&gw).await;
    let new = rotate_merchant(cli.as_ref(), &key, &appid, HOUR).await;

    let sim = ready_sim(&gw, sim_config(&gw, M1, &machine_secret)).await;
    wait_until("machine.online delivered", || {
        hooks
            .all()
            .iter()
            .any(|(_, b)| b.contains("\"machine.online\""))
    })
    .await;
    for (sig, body) in hooks.all() {
        assert!(
            signed_with(&sig, &body, &new),
            "signed with the new AppSecret"
        );
        assert!(!signed_with(&sig, &body, &old), "not with the old one");
    }
    sim.disconnect().await;
    cli.close().await;
    gw.stop().await;
}

#[tokio::test]
async fn a_service_password_configured_as_an_argon2_hash() {
    let mut phc = Vec::new();
    vendgate::tools::cli::hash_password(&b"correct horse battery\n"[..], &mut phc).expect("hash");
    let phc = String::from_utf8(phc).expect("utf-8").trim_end().to_owned();
    assert!(phc.starts_with("$argon2id$"), "{phc}");
    let gw = TestGateway::start_with(|s| {
        s.services.push(ServiceCredential {
            username: "ops-bridge".into(),
            password: phc.clone(),
        });
    })
    .await;
    let login = |pass: &'static str| {
        let addr = gw.mqtt_addr;
        async move {
            RawClient::connect(addr, "ops-1", Some(("ops-bridge", pass)), 30)
                .await
                .1
        }
    };
    assert_eq!(
        login("correct horse battery").await,
        Some(ConnectReturnCode::Success)
    );
    // Again (now answered from the remembered success), and a wrong one.
    assert_eq!(
        login("correct horse battery").await,
        Some(ConnectReturnCode::Success)
    );
    assert_eq!(
        login("correct horse batterY").await,
        Some(ConnectReturnCode::NotAuthorized)
    );
    // The hash itself is not a password.
    let mut raw = RawClient::connect(gw.mqtt_addr, "ops-2", Some(("ops-bridge", &phc)), 30).await;
    assert_eq!(raw.1, Some(ConnectReturnCode::NotAuthorized));
    raw.0.closed().await;
    gw.stop().await;
}

#[tokio::test]
async fn the_dashboard_accepts_an_argon2_operator_password() {
    let mut phc = Vec::new();
    vendgate::tools::cli::hash_password(&b"operator password 1\n"[..], &mut phc).expect("hash");
    let phc = String::from_utf8(phc).expect("utf-8").trim_end().to_owned();
    let gw = TestGateway::start_with(|s| {
        s.operator.username = "ops".into();
        s.operator.password = phc.clone();
    })
    .await;
    let http = reqwest::Client::new();
    let url = format!("http://{}/dashboard/api/summary", gw.http_addr);
    let status = |user: &'static str, pass: &'static str| {
        let (http, url) = (http.clone(), url.clone());
        async move {
            http.get(url)
                .basic_auth(user, Some(pass))
                .send()
                .await
                .expect("request")
                .status()
                .as_u16()
        }
    };
    assert_eq!(status("ops", "operator password 1").await, 200);
    assert_eq!(status("ops", "operator password 2").await, 401);
    assert_eq!(status("root", "operator password 1").await, 401);
    gw.stop().await;
}

#[tokio::test]
async fn a_broken_argon2_service_password_stops_start_up() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut settings = vendgate::Settings::for_tests(dir.path());
    settings.services.push(ServiceCredential {
        username: "ops-bridge".into(),
        password: "$argon2id$v=19$m=19456,t=2,p=1$garbled".into(),
    });
    let Err(err) = vendgate::Gateway::build(settings).await else {
        panic!("a gateway with an unusable password hash started");
    };
    let text = format!("{err:#}");
    assert!(
        text.contains("[[services]] \"ops-bridge\" password"),
        "{text}"
    );
    assert!(
        !text.contains("garbled"),
        "the value is not repeated: {text}"
    );
}
