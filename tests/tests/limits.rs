//! Every edge and API limit over real sockets: each one triggers, is counted
//! in its own metric, and the rest of the gateway keeps serving. Also the
//! failed-auth throttling (brute-force protection) and its expiry.

use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use rumqttc::mqttbytes::v4::{ConnectReturnCode, Packet, Publish};
use rumqttc::QoS;
use vendgate::edge::limits::ThrottleScope;
use vendgate_e2e::{wait_until, Api, RawClient, TestGateway, DEADLINE};

const A: &str = "10000001";
const B: &str = "10000002";

async fn pings(c: &mut RawClient) -> bool {
    c.send(Packet::PingReq).await;
    matches!(c.recv().await, Some(Packet::PingResp))
}

async fn metrics(gw: &TestGateway) -> String {
    gw.handle.exposition().await
}

/// Retry `attempt` (a fresh connection each time) until it is accepted;
/// the way a real client reconnects once a limit lets it in again.
async fn until_accepted(what: &str, mut attempt: impl AsyncFnMut() -> Option<ConnectReturnCode>) {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while attempt().await != Some(ConnectReturnCode::Success) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "never accepted: {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn connection_cap_closes_the_excess_and_frees_places_on_close() {
    let gw = TestGateway::start_with(|s| s.mqtt.max_connections = 3).await;
    let (u, p) = gw.service("ops").await;
    let addr = gw.mqtt_addr;
    let mut held = Vec::new();
    for i in 0..3 {
        let (c, code) = RawClient::connect(addr, &format!("ops-{i}"), Some((&u, &p)), 30).await;
        assert_eq!(code, Some(ConnectReturnCode::Success));
        held.push(c);
    }
    let mut excess = RawClient::tcp(addr).await;
    assert!(
        excess.closed().await,
        "the fourth connection is closed at once"
    );
    let stats = &gw.handle.hub.stats;
    assert_eq!(stats.rejected_max_connections.load(Ordering::Relaxed), 1);
    assert!(metrics(&gw)
        .await
        .contains("vendgate_mqtt_connections_rejected_total{reason=\"max_connections\"} 1"));
    // The connections inside the cap, and HTTP, are unaffected.
    for c in &mut held {
        assert!(pings(c).await);
    }
    let r = reqwest::get(format!("http://{}/healthz", gw.http_addr))
        .await
        .expect("HTTP");
    assert!(r.status().is_success());
    // Closing one frees its place.
    drop(held.pop());
    let gate = gw.handle.hub.gate.clone();
    wait_until("the closed connection's place is free", || gate.live() < 3).await;
    let (_c, code) = RawClient::connect(addr, "ops-9", Some((&u, &p)), 30).await;
    assert_eq!(code, Some(ConnectReturnCode::Success));
    gw.stop().await;
}

#[tokio::test]
async fn accept_rate_closes_a_flood_and_recovers() {
    let gw = TestGateway::start_with(|s| {
        s.mqtt.accept_rate = 1;
        s.mqtt.accept_burst = 3;
    })
    .await;
    let (appid, _) = gw.merchant("m").await;
    let sa = gw.machine(&appid, A).await;
    let (u, p) = gw.service("ops").await;
    let addr = gw.mqtt_addr;
    let (mut a, code) = RawClient::connect(addr, A, Some((A, &sa)), 30).await;
    assert_eq!(code, Some(ConnectReturnCode::Success));
    // A flood: connections beyond the burst are closed without a CONNACK.
    let mut flood = Vec::new();
    let mut refused = false;
    for i in 0..100 {
        let (c, code) = RawClient::connect(addr, &format!("ops-{i}"), Some((&u, &p)), 30).await;
        if code.is_none() {
            refused = true;
            break;
        }
        flood.push(c);
    }
    assert!(refused, "the accept rate refused part of the flood");
    let stats = &gw.handle.hub.stats;
    assert!(stats.rejected_accept_rate.load(Ordering::Relaxed) >= 1);
    assert!(!metrics(&gw)
        .await
        .contains("vendgate_mqtt_connections_rejected_total{reason=\"accept_rate\"} 0"));
    // Established connections keep working, and the bucket refills.
    assert!(pings(&mut a).await);
    until_accepted("after the bucket refills", async || {
        RawClient::connect(addr, "ops-late", Some((&u, &p)), 30)
            .await
            .1
    })
    .await;
    gw.stop().await;
}

#[tokio::test]
async fn connect_must_arrive_within_the_connect_timeout() {
    let gw = TestGateway::start_with(|s| s.mqtt.connect_timeout = Duration::from_millis(300)).await;
    let (appid, _) = gw.merchant("m").await;
    let sa = gw.machine(&appid, A).await;
    let addr = gw.mqtt_addr;
    // Silent, and slow (half a CONNECT, then nothing).
    let mut silent = RawClient::tcp(addr).await;
    let mut slow = RawClient::tcp(addr).await;
    slow.send_raw(&[0x10, 0x20, 0x00, 0x04, b'M']).await;
    // A real machine connecting meanwhile is served.
    let (mut a, code) = RawClient::connect(addr, A, Some((A, &sa)), 30).await;
    assert_eq!(code, Some(ConnectReturnCode::Success));
    assert!(silent.closed().await, "silent connection closed");
    assert!(slow.closed().await, "slow CONNECT closed");
    let stats = &gw.handle.hub.stats;
    wait_until("both timeouts counted", || {
        stats.connect_timeouts.load(Ordering::Relaxed) >= 2
    })
    .await;
    assert!(pings(&mut a).await, "the machine is still connected");
    assert!(gw.online(A));
    gw.stop().await;
}

#[tokio::test]
async fn an_oversized_packet_closes_only_its_connection() {
    let gw = TestGateway::start_with(|s| s.mqtt.max_packet_size = 1024).await;
    let (appid, _) = gw.merchant("m").await;
    let sa = gw.machine(&appid, A).await;
    let sb = gw.machine(&appid, B).await;
    let addr = gw.mqtt_addr;
    let (mut a, _) = RawClient::connect(addr, A, Some((A, &sa)), 30).await;
    let (mut b, _) = RawClient::connect(addr, B, Some((B, &sb)), 30).await;
    let p = Publish::new(
        format!("vend/v1/{A}/state"),
        QoS::AtMostOnce,
        vec![b'x'; 2048],
    );
    a.send(Packet::Publish(p)).await;
    assert!(a.closed().await, "oversized publish closes the connection");
    let stats = &gw.handle.hub.stats;
    wait_until("oversized packet counted", || {
        stats.oversized_packets.load(Ordering::Relaxed) == 1
    })
    .await;
    assert!(metrics(&gw)
        .await
        .contains("vendgate_mqtt_oversized_packets_total 1"));
    assert!(pings(&mut b).await, "the other machine is unaffected");
    // An oversized CONNECT is refused before its body is read.
    let mut c = RawClient::tcp(addr).await;
    c.send_raw(&[0x10, 0x80, 0x80, 0x04]).await;
    assert!(c.closed().await);
    wait_until("oversized CONNECT counted", || {
        stats.oversized_packets.load(Ordering::Relaxed) == 2
    })
    .await;
    gw.stop().await;
}

#[tokio::test]
async fn failed_auth_is_throttled_per_username_and_address_and_expires() {
    // Three seconds of cooldown: long enough that no check below can outlive
    // a block by accident, short enough to wait out once.
    let gw = TestGateway::start_with(|s| {
        let t = &mut s.mqtt.auth_throttle;
        t.max_failures_per_username = 3;
        t.max_failures_per_address = 6;
        t.cooldown = Duration::from_secs(3);
        t.max_cooldown = Duration::from_secs(3);
    })
    .await;
    let (appid, _) = gw.merchant("m").await;
    let sa = gw.machine(&appid, A).await;
    let sb = gw.machine(&appid, B).await;
    let addr = gw.mqtt_addr;
    let ip = |last: u8| IpAddr::from([127, 0, 0, last]);
    let wrong = "0123456789abcdef0123456789abcdef";
    let attempt = |from: IpAddr, user: &'static str, pass: String| async move {
        RawClient::tcp_from(from, addr)
            .await
            .mqtt_connect(user, Some((user, &pass)), 30)
            .await
            .1
    };
    let stats = &gw.handle.hub.stats;

    // Guessing A's secret: after three failures even the right one is refused.
    for _ in 0..3 {
        let code = attempt(ip(2), A, wrong.into()).await;
        assert_eq!(code, Some(ConnectReturnCode::NotAuthorized));
    }
    let code = attempt(ip(2), A, sa.clone()).await;
    assert_eq!(code, Some(ConnectReturnCode::NotAuthorized), "throttled");
    assert_eq!(stats.throttled(ThrottleScope::Username), 1);
    // Another machine from the same address is not affected.
    let code = attempt(ip(2), B, sb.clone()).await;
    assert_eq!(code, Some(ConnectReturnCode::Success));

    // Someone else guessing B's secret cannot lock B out: B's last good
    // address stays exempt from B's block.
    for _ in 0..3 {
        let code = attempt(ip(3), B, wrong.into()).await;
        assert_eq!(code, Some(ConnectReturnCode::NotAuthorized));
    }
    let code = attempt(ip(3), B, sb.clone()).await;
    assert_eq!(
        code,
        Some(ConnectReturnCode::NotAuthorized),
        "attacker throttled"
    );
    let code = attempt(ip(2), B, sb.clone()).await;
    assert_eq!(
        code,
        Some(ConnectReturnCode::Success),
        "real machine gets in"
    );

    // An address that guesses many usernames is throttled as a whole.
    let unknown = [
        "20000001", "20000002", "20000003", "20000004", "20000005", "20000006",
    ];
    for user in unknown {
        let code = attempt(ip(4), user, wrong.into()).await;
        assert_eq!(code, Some(ConnectReturnCode::NotAuthorized));
    }
    let code = attempt(ip(4), B, sb.clone()).await;
    assert_eq!(code, Some(ConnectReturnCode::NotAuthorized));
    assert_eq!(stats.throttled(ThrottleScope::Address), 1);

    let shown = metrics(&gw).await;
    assert!(
        shown.contains("vendgate_mqtt_auth_throttled_total{scope=\"username\"} 2"),
        "{shown}"
    );
    assert!(
        shown.contains("vendgate_mqtt_auth_throttled_total{scope=\"address\"} 1"),
        "{shown}"
    );

    // The block expires: A's right secret works again after the cooldown,
    // and its retries meanwhile did not extend it.
    until_accepted("A after its cooldown", async || {
        attempt(ip(2), A, sa.clone()).await
    })
    .await;
    assert!(gw.online(A));
    gw.stop().await;
}

#[tokio::test]
async fn the_merchant_rate_limit_answers_10003_and_has_its_own_metric() {
    let gw = TestGateway::start_with(|s| {
        s.http.rate_limit = 1;
        s.http.rate_burst = 2;
    })
    .await;
    let (a1, s1) = gw.merchant("busy").await;
    let (a2, s2) = gw.merchant("calm").await;
    let busy = Api::new(&gw, &a1, &s1);
    let calm = Api::new(&gw, &a2, &s2);
    let mut limited = false;
    for _ in 0..50 {
        if busy.get("/machines").await["code"] == 10003 {
            limited = true;
            break;
        }
    }
    assert!(limited, "the busy merchant hits its rate");
    assert!(gw.handle.metrics.http_rate_limited.load(Ordering::Relaxed) >= 1);
    assert!(!metrics(&gw)
        .await
        .contains("vendgate_http_rate_limited_total 0"));
    assert_eq!(calm.get("/machines").await["code"], 0, "others are served");
    gw.stop().await;
}
