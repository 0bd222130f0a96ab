//! Hostile load on the MQTT edge over real sockets: each attack runs against
//! a real gateway and the test shows its bound holding while an honest
//! machine keeps working. The SUBSCRIBE amplification attack, which measures
//! the process's peak memory, has a test binary of its own
//! (`subscribe_bomb.rs`).

use std::io::Write;
use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rumqttc::mqttbytes::v4::{
    ConnectReturnCode, Packet, Subscribe, SubscribeFilter, SubscribeReasonCode,
};
use rumqttc::mqttbytes::QoS;
use vendgate::edge::limits::ThrottleScope;
use vendgate::edge::router::MachineDelivery;
use vendgate::edge::stats::{ClientKind, DisconnectReason};
use vendgate_e2e::{
    hand_machine, ready_sim, sim_config, wait_until, RawClient, TestGateway, DEADLINE,
};
use vendgate_proto::machine::MachineNo;
use vendgate_proto::topic::Command;

const A: &str = "40000001";
const B: &str = "40000002";
const ATTACKER_IP: [u8; 4] = [127, 0, 0, 2];

async fn gateway_with(tune: impl FnOnce(&mut vendgate::Settings)) -> (TestGateway, String, String) {
    let gw = TestGateway::start_with(tune).await;
    let (appid, _) = gw.merchant("m").await;
    let sa = gw.machine(&appid, A).await;
    let sb = gw.machine(&appid, B).await;
    (gw, sa, sb)
}

/// The honest machine still gets a command through and answers it.
async fn honest_machine_answers(gw: &TestGateway) -> Duration {
    let m: MachineNo = B.parse().unwrap();
    gw.handle
        .commands
        .ping(&m, Duration::from_secs(5))
        .await
        .expect("the honest machine answers a ping")
}

fn attacker() -> IpAddr {
    IpAddr::from(ATTACKER_IP)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_flood_from_one_address_does_not_starve_another_machines_reconnect() {
    let (gw, sa, sb) = gateway_with(|s| {
        s.mqtt.accept_rate = 20;
        s.mqtt.accept_burst = 20;
        s.mqtt.accept_rate_per_address = 5;
        s.mqtt.accept_burst_per_address = 10;
        s.mqtt.max_connections_per_address = 50;
    })
    .await;
    let _sim = ready_sim(&gw, sim_config(&gw, B, &sb)).await;

    // Bare TCP connects from 127.0.0.2, as fast as they go, until stopped.
    let stop = tokio_util::sync::CancellationToken::new();
    let addr = gw.mqtt_addr;
    let started = Instant::now();
    let flood = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.is_cancelled() {
                drop(RawClient::tcp_from(attacker(), addr).await);
                n += 1;
                tokio::task::yield_now().await;
            }
            n
        })
    };
    let stats = &gw.handle.hub.stats;
    wait_until("the flood is refused by its address's rate", || {
        stats.rejected_address_rate.load(Ordering::Relaxed) >= 500
    })
    .await;

    // Meanwhile the honest machine reconnects from 127.0.0.1, each time at
    // once, and the other machine keeps answering commands.
    let mut latencies = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        let (mut c, code) = RawClient::connect(gw.mqtt_addr, A, Some((A, &sa)), 30).await;
        assert_eq!(code, Some(ConnectReturnCode::Success), "honest reconnect");
        latencies.push(t.elapsed());
        c.send(Packet::Disconnect).await;
        assert!(c.closed().await);
        honest_machine_answers(&gw).await;
    }
    stop.cancel();
    let connects = flood.await.expect("flood");
    let flood_for = started.elapsed();
    let rejected = stats.rejected_address_rate.load(Ordering::Relaxed)
        + stats.rejected_address_connections.load(Ordering::Relaxed);
    println!(
        "connect flood: {connects} attacker connects in {flood_for:.2?} ({:.0}/s), {rejected} \
         refused by the per-address limits, {} by the global rate; honest reconnects {:?}",
        connects as f64 / flood_for.as_secs_f64(),
        stats.rejected_accept_rate.load(Ordering::Relaxed),
        latencies
    );
    assert!(rejected > 0);
    gw.stop().await;
}

/// A `tracing` writer into a shared buffer, to read what the gateway logged.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap_or_else(|p| p.into_inner())).into_owned()
    }
}

// Current-thread runtime: the in-process gateway's tasks run on this
// thread, where the capturing subscriber is the default.
#[tokio::test]
async fn pre_auth_refusals_are_throttled_and_logged_escaped_cut_and_sparingly() {
    let logs = Captured::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::INFO)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let (gw, sa, sb) = gateway_with(|s| {
        s.mqtt.auth_throttle.max_failures_per_address = 10;
    })
    .await;
    let _honest = hand_machine(&gw, B, &sb, 5, 100).await;

    // A machine-shaped client id with a service username is refused before
    // any password is looked at; it counts for the throttle all the same.
    // The username tries to forge a log line and is long.
    let forged = format!("evil\r\nWARN forged line {}", "u".repeat(2000));
    let mut codes = Vec::new();
    for _ in 0..30 {
        let (_c, code) = RawClient::tcp_from(attacker(), gw.mqtt_addr)
            .await
            .mqtt_connect("12345678", Some((&forged, "x")), 30)
            .await;
        codes.push(code);
    }
    assert_eq!(codes[0], Some(ConnectReturnCode::BadClientId));
    assert_eq!(
        codes[29],
        Some(ConnectReturnCode::NotAuthorized),
        "{codes:?}"
    );
    assert!(gw.handle.hub.stats.throttled(ThrottleScope::Address) >= 1);

    // A 64 KiB username is over the pre-auth packet bound: closed unread.
    let huge = "h".repeat(64 * 1024 - 100);
    let (_c, code) = RawClient::tcp_from(IpAddr::from([127, 0, 0, 3]), gw.mqtt_addr)
        .await
        .mqtt_connect(A, Some((&huge, "x")), 30)
        .await;
    assert_eq!(code, None);
    assert_eq!(
        gw.handle
            .hub
            .stats
            .oversized_packets
            .load(Ordering::Relaxed),
        1
    );

    // The honest machine, on another address, still connects and works.
    let (_a, code) = RawClient::connect(gw.mqtt_addr, A, Some((A, &sa)), 30).await;
    assert_eq!(code, Some(ConnectReturnCode::Success));
    assert_eq!(
        gw.handle.hub.send_command(
            &B.parse().unwrap(),
            Command::Ping,
            Bytes::from_static(br#"{"id":1}"#)
        ),
        MachineDelivery::Queued
    );

    let text = logs.text();
    assert!(
        !text.contains('\r'),
        "a raw CR from client input was logged"
    );
    assert!(
        !text.lines().any(|l| l.starts_with("WARN forged")),
        "a client forged a log line:\n{text}"
    );
    assert!(
        text.lines().all(|l| l.len() < 1000),
        "client strings are cut:\n{text}"
    );
    let refusals = text
        .lines()
        .filter(|l| l.contains("MQTT CONNECT refused"))
        .count();
    assert!(
        (1..=6).contains(&refusals),
        "{refusals} refusal lines for 30 refusals from one address:\n{text}"
    );
    assert!(gw.handle.hub.log_gate.suppressed.load(Ordering::Relaxed) >= 4);
    drop(_guard);
    gw.stop().await;
}

/// One rumqttc connection of machine `m` with clean_session = 0 and
/// manual acknowledgements; returns the client, its event loop, and
/// CONNACK's session present flag.
async fn persistent_machine(
    gw: &TestGateway,
    m: &str,
    secret: &str,
) -> (rumqttc::AsyncClient, rumqttc::EventLoop, bool) {
    let mut o = rumqttc::MqttOptions::new(m, "127.0.0.1", gw.mqtt_addr.port());
    o.set_credentials(m, secret);
    o.set_keep_alive(Duration::from_secs(30));
    o.set_clean_session(false);
    o.set_manual_acks(true);
    let (client, mut el) = rumqttc::AsyncClient::new(o, 16);
    let present = tokio::time::timeout(DEADLINE, async {
        loop {
            if let rumqttc::Event::Incoming(Packet::ConnAck(a)) = el.poll().await.expect("poll") {
                assert_eq!(a.code, ConnectReturnCode::Success);
                return a.session_present;
            }
        }
    })
    .await
    .expect("CONNACK");
    (client, el, present)
}

/// Poll until the next incoming PUBLISH (acks and the rest are skipped).
async fn next_publish(el: &mut rumqttc::EventLoop) -> rumqttc::mqttbytes::v4::Publish {
    tokio::time::timeout(DEADLINE, async {
        loop {
            if let rumqttc::Event::Incoming(Packet::Publish(p)) = el.poll().await.expect("poll") {
                return p;
            }
        }
    })
    .await
    .expect("a PUBLISH")
}

async fn subscribe_commands(client: &rumqttc::AsyncClient, el: &mut rumqttc::EventLoop, m: &str) {
    client
        .subscribe(format!("vend/v1/{m}/cmd/#"), rumqttc::QoS::AtLeastOnce)
        .await
        .expect("subscribe queued");
    tokio::time::timeout(DEADLINE, async {
        loop {
            if let rumqttc::Event::Incoming(Packet::SubAck(_)) = el.poll().await.expect("poll") {
                return;
            }
        }
    })
    .await
    .expect("SUBACK");
}

#[tokio::test]
async fn machine_asking_for_a_persistent_session_gets_no_redelivery() {
    let (gw, sa, _) = gateway_with(|_| {}).await;
    let m: MachineNo = A.parse().unwrap();
    let ping = |id: u32| {
        gw.handle
            .hub
            .send_command(&m, Command::Ping, format!(r#"{{"id":{id}}}"#).into())
    };

    let (client, mut el, present) = persistent_machine(&gw, A, &sa).await;
    assert!(!present);
    subscribe_commands(&client, &mut el, A).await;
    assert_eq!(ping(1), MachineDelivery::Queued);
    let first = next_publish(&mut el).await;
    assert_eq!(first.qos, QoS::AtLeastOnce);
    assert_eq!(first.payload.as_ref(), br#"{"id":1}"#);
    // Not acknowledged (manual acks): the connection ends with it in flight.
    drop(client);
    drop(el);
    wait_until("offline", || !gw.online(A)).await;

    let (client, mut el, present) = persistent_machine(&gw, A, &sa).await;
    assert!(!present, "CONNACK session present = 0");
    assert_eq!(
        ping(2),
        MachineDelivery::NotSubscribed,
        "nothing of the earlier connection is kept"
    );
    subscribe_commands(&client, &mut el, A).await;
    assert_eq!(ping(3), MachineDelivery::Queued);
    let next = next_publish(&mut el).await;
    assert_eq!(
        next.payload.as_ref(),
        br#"{"id":3}"#,
        "the unacknowledged command 1 was not redelivered"
    );
    assert_eq!(gw.handle.hub.router.parked_count(), 0);
    gw.stop().await;
}

#[tokio::test]
async fn take_over_ends_a_write_to_a_peer_that_does_not_read() {
    let (gw, _, _) = gateway_with(|_| {}).await;
    let (u, p) = gw.service("reader").await;
    let (mut stuck, code) = RawClient::connect(gw.mqtt_addr, "stuck", Some((&u, &p)), 0).await;
    assert_eq!(code, Some(ConnectReturnCode::Success));
    stuck
        .send(Packet::Subscribe(Subscribe::new("big/#", QoS::AtMostOnce)))
        .await;
    assert!(matches!(stuck.recv().await, Some(Packet::SubAck(_))));
    // 18 MB at QoS 0 for a client that reads nothing more: far more than
    // the loopback socket buffers hold, so the gateway's write blocks.
    let payload = Bytes::from(vec![b'x'; 60_000]);
    for _ in 0..300 {
        gw.handle
            .hub
            .publish("big/x", payload.clone(), QoS::AtMostOnce, false);
    }
    let out = &gw.handle.hub.stats.bytes_out;
    wait_until("the gateway has written what the socket takes", || {
        out.load(Ordering::Relaxed) > 1_000_000
    })
    .await;

    let t = Instant::now();
    let (_new, code) = RawClient::connect(gw.mqtt_addr, "stuck", Some((&u, &p)), 0).await;
    assert_eq!(code, Some(ConnectReturnCode::Success));
    let conns = &gw.handle.hub.stats.connections;
    wait_until("the old connection has ended", || {
        conns.disconnects(ClientKind::Service, DisconnectReason::TakeOver) == 1
    })
    .await;
    let ended = t.elapsed();
    println!("take-over of a connection blocked in a write ended it in {ended:?}");
    assert!(
        ended < Duration::from_secs(5),
        "ended by the take-over, not the 10 s write timeout: {ended:?}"
    );
    drop(stuck);
    gw.stop().await;
}

#[tokio::test]
async fn machine_subscriptions_are_capped_and_identical_filters_replace() {
    let (gw, sa, sb) = gateway_with(|_| {}).await;
    let mut honest = hand_machine(&gw, B, &sb, 5, 100).await;
    let (mut c, code) = RawClient::connect(gw.mqtt_addr, A, Some((A, &sa)), 30).await;
    assert_eq!(code, Some(ConnectReturnCode::Success));
    let mut filters: Vec<SubscribeFilter> = ["#", "+", "state", "inventory", "pong", "ack"]
        .iter()
        .chain(&["result", "cmd/#", "cmd/+"])
        .map(|f| SubscribeFilter::new(format!("vend/v1/{A}/{f}"), QoS::AtLeastOnce))
        .collect();
    // Copies of one filter take one place (§3.8.4: an identical filter
    // replaces the subscription).
    for _ in 0..100 {
        filters.insert(
            0,
            SubscribeFilter::new(format!("vend/v1/{A}/#"), QoS::AtMostOnce),
        );
    }
    c.send(Packet::Subscribe(Subscribe { pkid: 7, filters }))
        .await;
    let Some(Packet::SubAck(ack)) = c.recv().await else {
        panic!("no SUBACK")
    };
    let refused = ack
        .return_codes
        .iter()
        .filter(|r| **r == SubscribeReasonCode::Failure)
        .count();
    assert_eq!(
        refused, 1,
        "the ninth distinct filter: {:?}",
        ack.return_codes
    );
    assert_eq!(
        *ack.return_codes.last().unwrap(),
        SubscribeReasonCode::Failure
    );
    assert_eq!(
        gw.handle
            .hub
            .stats
            .subscriptions_refused
            .load(Ordering::Relaxed),
        1
    );
    // The honest machine's commands still flow.
    assert_eq!(
        gw.handle.hub.send_command(
            &B.parse().unwrap(),
            Command::Ping,
            Bytes::from_static(br#"{"id":9}"#)
        ),
        MachineDelivery::Queued
    );
    let (topic, _, _) = honest.next_publish().await.expect("the command arrives");
    assert_eq!(topic, format!("vend/v1/{B}/cmd/ping"));
    gw.stop().await;
}

#[tokio::test]
async fn machine_packet_rate_is_kept_across_reconnects() {
    let (gw, sa, _) = gateway_with(|s| {
        s.mqtt.machine_publish_rate = 1;
        s.mqtt.machine_publish_burst = 5;
    })
    .await;
    // CONNECT costs one token, each PINGREQ one: the fifth ping is over.
    let (mut c, code) = RawClient::connect(gw.mqtt_addr, A, Some((A, &sa)), 30).await;
    assert_eq!(code, Some(ConnectReturnCode::Success));
    let mut answered = 0;
    for _ in 0..20 {
        c.send(Packet::PingReq).await;
        match c.recv().await {
            Some(Packet::PingResp) => answered += 1,
            _ => break,
        }
    }
    // Four, or a few more on a machine stalled long enough to earn tokens.
    assert!((4..20).contains(&answered), "{answered}");
    assert!(c.closed().await, "over the rate: closed");

    // Reconnecting does not refill the bucket: the CONNECT is refused, or
    // (on a machine stalled for seconds) a four-filter SUBSCRIBE is over.
    let (mut c, code) = RawClient::connect(gw.mqtt_addr, A, Some((A, &sa)), 30).await;
    if code == Some(ConnectReturnCode::Success) {
        let filters = ["state", "pong", "ack", "result"]
            .map(|f| SubscribeFilter::new(format!("vend/v1/{A}/{f}"), QoS::AtMostOnce));
        c.send(Packet::Subscribe(Subscribe {
            pkid: 1,
            filters: filters.to_vec(),
        }))
        .await;
        assert!(c.closed().await, "the reconnected machine is still over");
    } else {
        assert_eq!(code, Some(ConnectReturnCode::ServiceUnavailable));
    }
    assert!(
        gw.handle
            .hub
            .stats
            .connections
            .disconnects(ClientKind::Machine, DisconnectReason::RateLimited)
            >= 1
    );
    gw.stop().await;
}

#[tokio::test]
async fn a_service_cannot_take_over_another_services_session() {
    let (gw, _, _) = gateway_with(|_| {}).await;
    let (u1, p1) = gw.service("one").await;
    let (u2, p2) = gw.service("two").await;
    let (mut first, code) =
        RawClient::connect(gw.mqtt_addr, "dashboard", Some((&u1, &p1)), 30).await;
    assert_eq!(code, Some(ConnectReturnCode::Success));
    let (mut other, code) =
        RawClient::connect(gw.mqtt_addr, "dashboard", Some((&u2, &p2)), 30).await;
    assert_eq!(code, Some(ConnectReturnCode::Success));
    // Both are served: the second account's "dashboard" is its own session.
    for c in [&mut first, &mut other] {
        c.send(Packet::PingReq).await;
        assert_eq!(c.recv().await, Some(Packet::PingResp));
    }
    assert_eq!(
        gw.handle
            .hub
            .stats
            .connections
            .disconnects(ClientKind::Service, DisconnectReason::TakeOver),
        0
    );
    // The same account's id still takes over (MQTT's rule).
    let (_again, code) = RawClient::connect(gw.mqtt_addr, "dashboard", Some((&u1, &p1)), 30).await;
    assert_eq!(code, Some(ConnectReturnCode::Success));
    assert!(first.closed().await);
    gw.stop().await;
}
