//! Hostile load on the HTTP side, over real sockets: half-sent requests and
//! silent TLS connects from one address (127.0.0.2) while an honest merchant
//! on 127.0.0.1 is served; connections over the caps closed at once;
//! dashboard sign-in throttling; an argon2 flood on the dashboard that does
//! not hold up MQTT service logins; owner-only file modes; webhook errors
//! shown without host names.
//!
//! The figures printed with `--nocapture` are the ones in SECURITY.md.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rumqttc::mqttbytes::v4::ConnectReturnCode;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use vendgate::config::{HttpTlsSettings, ServiceCredential};
use vendgate_e2e::{
    ready_sim, sim_config, wait_until, Api, RawClient, TestCa, TestGateway, DEADLINE,
};

const ATTACKER: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
const OTHER: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 3));
const HONEST: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1));
const M: &str = "10000001";

async fn connect_from(local: IpAddr, addr: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(local, 0))?;
    socket.connect(addr).await
}

/// Whether the server closes `s` within `limit` (EOF or reset).
async fn closed_within(s: &mut TcpStream, limit: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
            Err(_) => return false,
        }
    }
}

fn stats(gw: &TestGateway) -> Arc<vendgate::http::limits::HttpStats> {
    gw.handle.metrics.http.clone()
}

fn load(a: &AtomicU64) -> u64 {
    a.load(Ordering::Relaxed)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[tokio::test]
async fn half_sent_requests_do_not_starve_an_honest_merchant() {
    const ATTACK: usize = 200;
    const PER_ADDRESS: usize = 32;
    let gw = TestGateway::start_with(|s| {
        s.http.header_read_timeout = Duration::from_secs(5);
        s.http.max_connections_per_address = PER_ADDRESS;
    })
    .await;
    let (appid, secret) = gw.merchant("honest").await;
    gw.machine(&appid, M).await;
    let st = stats(&gw);

    // Slowloris: many connections from one address, each with a request
    // whose headers never end.
    let started = Instant::now();
    let mut held = Vec::new();
    for _ in 0..ATTACK {
        if let Ok(mut s) = connect_from(ATTACKER, gw.http_addr).await {
            let _ = s
                .write_all(b"GET /api/openapi/v1/machines HTTP/1.1\r\nHost: x\r\nAppid: ")
                .await;
            held.push(s);
        }
    }
    let attack_time = started.elapsed();
    wait_until("the excess is refused", || {
        load(&st.rejected[1]) >= (ATTACK - PER_ADDRESS) as u64
    })
    .await;
    assert_eq!(load(&st.rejected[1]), (ATTACK - PER_ADDRESS) as u64);
    assert_eq!(
        load(&st.header_timeouts),
        0,
        "the attack still holds its places"
    );

    // The honest merchant, from another address, meanwhile.
    let api = Api::new(&gw, &appid, &secret);
    let mut latencies = Vec::new();
    for _ in 0..20 {
        let t = Instant::now();
        let v = api.get("/machines").await;
        latencies.push(t.elapsed());
        assert_eq!(v["code"], 0, "{v}");
        assert_eq!(v["data"]["total"], 1, "{v}");
    }
    assert_eq!(
        load(&st.header_timeouts),
        0,
        "served while every attacking connection was still held"
    );
    latencies.sort();
    let worst = *latencies.last().unwrap();
    println!(
        "slowloris: {ATTACK} half-sent requests from one address in {:.0} ms; \
         {} refused at once; honest GET /machines p50 {:.1} ms, max {:.1} ms",
        ms(attack_time),
        ATTACK - PER_ADDRESS,
        ms(latencies[latencies.len() / 2]),
        ms(worst)
    );
    assert!(
        worst < Duration::from_secs(5),
        "honest request took {worst:?}"
    );

    // The held ones are cut at the header deadline, a trickling one too.
    let mut trickle = connect_from(OTHER, gw.http_addr).await.expect("connect");
    trickle
        .write_all(b"GET /healthz HTTP/1.1\r\n")
        .await
        .unwrap();
    let trickler = tokio::spawn(async move {
        let t = Instant::now();
        loop {
            // Pacing the attack (a header byte every 200 ms), not waiting
            // for the gateway.
            tokio::time::sleep(Duration::from_millis(200)).await;
            if trickle.write_all(b"X").await.is_err() || t.elapsed() > DEADLINE {
                return t.elapsed();
            }
        }
    });
    for s in &mut held {
        assert!(closed_within(s, DEADLINE).await, "held connection cut");
    }
    let trickled = trickler.await.unwrap();
    assert!(trickled < DEADLINE, "a trickle of header bytes is cut too");
    assert!(load(&st.header_timeouts) >= PER_ADDRESS as u64);
    gw.stop().await;
}

#[tokio::test]
async fn a_connection_over_the_global_cap_is_closed_at_once() {
    const CAP: usize = 8;
    let gw = TestGateway::start_with(|s| {
        s.http.max_connections = CAP;
        s.http.max_connections_per_address = 0;
    })
    .await;
    let st = stats(&gw);
    let mut held = Vec::new();
    for _ in 0..CAP {
        held.push(connect_from(ATTACKER, gw.http_addr).await.expect("connect"));
    }
    wait_until("the cap is reached", || load_usize(&st.connections) == CAP).await;
    let mut over = connect_from(OTHER, gw.http_addr).await.expect("connect");
    let t = Instant::now();
    // Well inside the 10 s header deadline a held connection would get.
    assert!(
        closed_within(&mut over, Duration::from_secs(5)).await,
        "over the cap: closed"
    );
    println!(
        "global cap: connection over the cap closed after {:.1} ms",
        ms(t.elapsed())
    );
    assert_eq!(load(&st.rejected[0]), 1);
    // A closed connection frees its place for the next client.
    held.pop();
    wait_until("a place is free", || load_usize(&st.connections) < CAP).await;
    let r = reqwest::Client::new()
        .get(format!("http://{}/healthz", gw.http_addr))
        .send()
        .await
        .expect("served");
    assert!(r.status().is_success());
    gw.stop().await;
}

fn load_usize(a: &std::sync::atomic::AtomicUsize) -> usize {
    a.load(Ordering::Relaxed)
}

#[tokio::test]
async fn silent_tls_connects_do_not_hold_every_handshake_slot() {
    const SLOTS: usize = 16;
    const PER_ADDRESS: usize = 8;
    let ca = TestCa::new("vendgate test server CA");
    let pki = tempfile::tempdir().expect("temp dir");
    let (cert, key) = ca.server().write(pki.path(), "http");
    let gw = TestGateway::start_with(|s| {
        s.http.tls = Some(HttpTlsSettings { cert, key });
        s.http.max_tls_handshakes = SLOTS;
        s.http.max_connections_per_address = PER_ADDRESS;
    })
    .await;
    let (appid, secret) = gw.merchant("honest").await;
    let ms_secret = gw.machine(&appid, M).await;
    let _sim = ready_sim(&gw, sim_config(&gw, M, &ms_secret)).await;
    let st = stats(&gw);

    // Silent connects from one address, paced at about 100 a second (four
    // times what held every slot of a listener that took its handshake
    // permit before accepting), for as long as the honest client works.
    let stop = Arc::new(AtomicBool::new(false));
    let opened = Arc::new(AtomicU64::new(0));
    let addr = gw.http_addr;
    let attacker = tokio::spawn({
        let (stop, opened) = (stop.clone(), opened.clone());
        async move {
            let mut held = Vec::new();
            while !stop.load(Ordering::Relaxed) && held.len() < 5000 {
                if let Ok(s) = connect_from(ATTACKER, addr).await {
                    held.push(s);
                    opened.fetch_add(1, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            held
        }
    });
    wait_until("the attacker holds its places", || {
        load(&st.rejected[1]) >= 20
    })
    .await;

    let port = gw.http_addr.port();
    let started = Instant::now();
    let mut latencies = Vec::new();
    for _ in 0..5 {
        // A fresh client each time: a new connection and handshake.
        let http = reqwest::Client::builder()
            .add_root_certificate(reqwest::Certificate::from_pem(ca.pem().as_bytes()).unwrap())
            .resolve("localhost", gw.http_addr)
            .build()
            .unwrap();
        let t = Instant::now();
        let body =
            format!(r#"{{"machine_no":"{M}","products":[{{"product_id":1,"quantity":1}}]}}"#);
        let v: Value = http
            .post(format!("https://localhost:{port}/api/openapi/v1/orders"))
            .header("Appid", &appid)
            .header("AppSecret", &secret)
            .body(body)
            .send()
            .await
            .expect("HTTPS order")
            .json()
            .await
            .expect("envelope");
        latencies.push(t.elapsed());
        assert_eq!(v["code"], 0, "{v}");
    }
    let during = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    let held = attacker.await.unwrap();
    let rate = opened.load(Ordering::Relaxed) as f64 / during.as_secs_f64().max(0.001);
    latencies.sort();
    let worst = *latencies.last().unwrap();
    println!(
        "silent TLS connects: {} opened from one address (~{rate:.0}/s) during the orders; \
         {} refused by the per-address cap; honest HTTPS order (new handshake each) \
         p50 {:.1} ms, max {:.1} ms",
        held.len(),
        load(&st.rejected[1]),
        ms(latencies[latencies.len() / 2]),
        ms(worst)
    );
    assert!(
        worst < gw.handle.settings.http.tls_handshake_timeout,
        "an honest order waited for a handshake slot: {worst:?}"
    );
    // The silent ones that got in are cut at the handshake deadline.
    wait_until("silent handshakes time out", || {
        load(&st.tls_handshake_timeouts) >= PER_ADDRESS as u64
    })
    .await;
    gw.stop().await;
}

const OPERATOR: &str = "ops";
const OPERATOR_PASSWORD: &str = "correct horse battery staple";

fn dashboard_client(local: IpAddr) -> reqwest::Client {
    reqwest::Client::builder()
        .local_address(local)
        .build()
        .expect("client")
}

async fn sign_in(gw: &TestGateway, from: IpAddr, password: &str) -> reqwest::Response {
    dashboard_client(from)
        .get(format!("http://{}/dashboard/api/summary", gw.http_addr))
        .basic_auth(OPERATOR, Some(password))
        .send()
        .await
        .expect("request")
}

#[tokio::test]
async fn failed_dashboard_sign_ins_are_throttled() {
    let gw = TestGateway::start_with(|s| {
        s.operator.username = OPERATOR.into();
        s.operator.password = OPERATOR_PASSWORD.into();
        s.http.login_throttle.max_failures_per_username = 3;
        s.http.login_throttle.cooldown = Duration::from_secs(60);
    })
    .await;
    let st = stats(&gw);
    // The operator signs in from its usual address.
    let r = sign_in(&gw, HONEST, OPERATOR_PASSWORD).await;
    assert_eq!(r.status(), 200);
    let cookie = r.headers()["set-cookie"].to_str().unwrap().to_string();
    assert!(!cookie.contains("Secure"), "plain HTTP: {cookie}");

    for i in 0..3 {
        let r = sign_in(&gw, ATTACKER, &format!("guess number {i}")).await;
        assert_eq!(r.status(), 401, "guess {i}");
    }
    let r = sign_in(&gw, ATTACKER, "guess number 4").await;
    assert_eq!(r.status(), 429, "throttled after 3 failures");
    assert!(r.headers().contains_key("retry-after"));
    // Blocked means not checked: even the right password is refused there.
    let r = sign_in(&gw, ATTACKER, OPERATOR_PASSWORD).await;
    assert_eq!(r.status(), 429);
    // The operator's last good address is not locked out by the guessing.
    let r = sign_in(&gw, HONEST, OPERATOR_PASSWORD).await;
    assert_eq!(r.status(), 200);
    assert_eq!(load(&st.login_failures), 3);
    assert_eq!(load(&st.login_throttled[1]), 2, "by username");
    let text = reqwest::Client::new()
        .get(format!("http://{}/metrics", gw.http_addr))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        text.contains("vendgate_dashboard_login_throttled_total{scope=\"username\"} 2"),
        "{text}"
    );
    gw.stop().await;
}

#[tokio::test]
async fn the_dashboard_cookie_is_secure_over_https() {
    let ca = TestCa::new("vendgate test server CA");
    let pki = tempfile::tempdir().expect("temp dir");
    let (cert, key) = ca.server().write(pki.path(), "http");
    let gw = TestGateway::start_with(|s| {
        s.http.tls = Some(HttpTlsSettings { cert, key });
        s.operator.username = OPERATOR.into();
        s.operator.password = OPERATOR_PASSWORD.into();
    })
    .await;
    let http = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(ca.pem().as_bytes()).unwrap())
        .resolve("localhost", gw.http_addr)
        .build()
        .unwrap();
    let r = http
        .get(format!(
            "https://localhost:{}/dashboard",
            gw.http_addr.port()
        ))
        .basic_auth(OPERATOR, Some(OPERATOR_PASSWORD))
        .send()
        .await
        .expect("HTTPS");
    assert_eq!(r.status(), 200);
    let cookie = r.headers()["set-cookie"].to_str().unwrap();
    assert!(cookie.contains("; Secure"), "{cookie}");
    gw.stop().await;
}

#[tokio::test]
async fn an_argon2_flood_on_the_dashboard_does_not_hold_up_service_logins() {
    const FLOODERS: usize = 16;
    let operator_hash = vendgate::passwords::hash_password(OPERATOR_PASSWORD).unwrap();
    let services: Vec<(String, String)> = (0..2)
        .map(|i| (format!("svc-{i}"), format!("service password {i}")))
        .collect();
    let hashed: Vec<ServiceCredential> = services
        .iter()
        .map(|(u, p)| ServiceCredential {
            username: u.clone(),
            password: vendgate::passwords::hash_password(p).unwrap(),
        })
        .collect();
    let gw = TestGateway::start_with(|s| {
        s.operator.username = OPERATOR.into();
        s.operator.password = operator_hash;
        s.services = hashed;
        // The worst case for the queue: guessing that is never throttled.
        s.http.login_throttle.max_failures_per_address = 0;
        s.http.login_throttle.max_failures_per_username = 0;
    })
    .await;
    let connect_timeout = gw.handle.settings.mqtt.connect_timeout;
    let stop = Arc::new(AtomicBool::new(false));
    let answers = Arc::new([AtomicU64::new(0), AtomicU64::new(0)]); // 401, 503
    let mut flood = Vec::new();
    for i in 0..FLOODERS {
        let (stop, answers) = (stop.clone(), answers.clone());
        let url = format!("http://{}/dashboard/api/summary", gw.http_addr);
        flood.push(tokio::spawn(async move {
            let http = dashboard_client(ATTACKER);
            while !stop.load(Ordering::Relaxed) {
                let Ok(r) = http
                    .get(&url)
                    .basic_auth(OPERATOR, Some(format!("wrong {i}")))
                    .send()
                    .await
                else {
                    continue;
                };
                match r.status().as_u16() {
                    401 => answers[0].fetch_add(1, Ordering::Relaxed),
                    503 => answers[1].fetch_add(1, Ordering::Relaxed),
                    other => panic!("flood answered {other}"),
                };
            }
        }));
    }
    let argon2 = gw.handle.metrics.argon2.clone();
    wait_until("the dashboard lane is saturated", || {
        load(&answers[0]) >= 2 && load(&argon2.busy[0]) >= 1
    })
    .await;

    // Each service's first login needs a full argon2 check.
    let mut latencies = Vec::new();
    for (user, pass) in &services {
        let t = Instant::now();
        let (_c, code) = RawClient::connect(gw.mqtt_addr, user, Some((user, pass)), 30).await;
        latencies.push(t.elapsed());
        assert_eq!(code, Some(ConnectReturnCode::Success), "{user}");
    }
    stop.store(true, Ordering::Relaxed);
    for f in flood {
        f.await.unwrap();
    }
    println!(
        "argon2 flood: {FLOODERS} concurrent wrong dashboard sign-ins: {} checked (401), \
         {} answered busy (503); MQTT service first logins took {:.0} ms and {:.0} ms \
         (connect_timeout {:?})",
        load(&answers[0]),
        load(&answers[1]),
        ms(latencies[0]),
        ms(latencies[1]),
        connect_timeout
    );
    for l in latencies {
        assert!(l < connect_timeout, "service login took {l:?}");
    }
    assert_eq!(load(&argon2.busy[1]), 0, "the service lane never refused");
    gw.stop().await;
}

#[tokio::test]
async fn state_files_are_private_whatever_the_umask() {
    // SAFETY: umask(2) cannot fail; it changes this test process's mask,
    // which only ever makes files more readable than needed.
    unsafe { libc::umask(0o022) };
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("state");
    let data_for_settings = data.clone();
    let gw = TestGateway::start_in(dir, move |s| s.data_dir = data_for_settings).await;
    // One write, so the WAL files exist.
    gw.merchant("m").await;
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &std::path::Path| {
        std::fs::metadata(p)
            .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(mode(&data), 0o700, "data dir");
    assert_eq!(mode(&data.join("webhook.key")), 0o600);
    if !vendgate_e2e::on_postgres() {
        for f in ["vendgate.db", "vendgate.db-wal", "vendgate.db-shm"] {
            assert_eq!(mode(&data.join(f)), 0o600, "{f}");
        }
    }
    gw.stop().await;
}

/// Until the merchant's first event has a failed attempt; returns the
/// `GET /events` answer.
async fn first_failed_event(api: &Api) -> Value {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let v = api.get("/events").await;
        if v["data"]["events"][0]["last_error"].is_string() {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no failed attempt: {v}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn webhook_errors_name_no_host() {
    // A closed port on this host.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    for (allow_private, url, want) in [
        (
            false,
            format!("http://localhost:{port}/hook"),
            "blocked_address",
        ),
        (
            false,
            "http://10.11.12.13/hook".to_string(),
            "blocked_address",
        ),
        (
            true,
            format!("http://localhost:{port}/hook"),
            "connect_failed",
        ),
    ] {
        let gw = TestGateway::start_with(|s| {
            s.notifier.allow_private_targets = allow_private;
            s.notifier.poll_interval = Duration::from_millis(50);
        })
        .await;
        let (appid, secret) = gw.merchant_with_url("m", &url).await;
        let ms_secret = gw.machine(&appid, M).await;
        let _sim = ready_sim(&gw, sim_config(&gw, M, &ms_secret)).await;
        let api = Api::new(&gw, &appid, &secret);
        let v = first_failed_event(&api).await;
        assert_eq!(v["data"]["events"][0]["last_error"], want, "{url}: {v}");
        let text = v.to_string();
        for leak in ["localhost", "127.0.0.1", "10.11.12.13", "resolves", "tcp"] {
            assert!(!text.contains(leak), "{url}: {leak} shown: {text}");
        }
        gw.stop().await;
    }
}
