//! MQTT 3.1.1 conformance of the hub for service clients, checked with a
//! third-party client (Eclipse paho-mqtt for Python, scripts in
//! `tests/conformance/`) and, for byte-level cases, the harness's
//! `RawClient`; and the per-connection limits (packet size, in-flight window,
//! machine publish rate), each shown to trip while the rest keeps serving.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::OnceLock;
use std::time::Duration;

use bytes::Bytes;
use rumqttc::mqttbytes::v4::{
    Connect, ConnectReturnCode, Login, Packet, PubAck, PubComp, PubRec, Publish, Subscribe,
    SubscribeReasonCode,
};
use rumqttc::mqttbytes::QoS;
use vendgate::edge::stats::{ClientKind, DisconnectReason};
use vendgate::Settings;
use vendgate_e2e::{hand_machine, wait_until, Client, RawClient, TestGateway, DEADLINE};

const REPO: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/..");

/// Where `cargo xtask test` installs paho-mqtt (`VENDGATE_PYDEPS` overrides).
fn pydeps() -> PathBuf {
    std::env::var_os("VENDGATE_PYDEPS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(REPO).join("target/pydeps"))
}

/// `pydeps()` ahead of any PYTHONPATH already set.
fn pythonpath() -> std::ffi::OsString {
    let mut path = pydeps().into_os_string();
    if let Some(existing) = std::env::var_os("PYTHONPATH") {
        path.push(":");
        path.push(existing);
    }
    path
}

fn python() -> tokio::process::Command {
    let mut c = tokio::process::Command::new("python3");
    c.env("PYTHONPATH", pythonpath())
        .stdin(Stdio::null())
        .kill_on_drop(true);
    c
}

/// Whether python3 can import paho-mqtt 2.x from `pydeps()`.
fn paho_present() -> bool {
    std::process::Command::new("python3")
        .env("PYTHONPATH", pythonpath())
        .args([
            "-c",
            "import paho.mqtt; assert paho.mqtt.__version__.startswith('2.')",
        ])
        .stdin(Stdio::null())
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Make paho-mqtt available once per test binary: present already (`cargo
/// xtask test` installs it), or installed now with pip into `pydeps()` so a
/// bare `cargo test` works on a machine that has python3 and pip. Anything else
/// fails the test with the command that installs it: a conformance suite
/// that silently skips proves nothing.
fn ensure_paho() {
    static READY: OnceLock<Result<(), String>> = OnceLock::new();
    let ready = READY.get_or_init(|| {
        if paho_present() {
            return Ok(());
        }
        let install = std::process::Command::new("python3")
            .args(["-m", "pip", "install", "--quiet", "--target"])
            .arg(pydeps())
            .arg("paho-mqtt==2.*")
            .stdin(Stdio::null())
            .output();
        match install {
            Ok(o) if o.status.success() && paho_present() => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });
    if let Err(why) = ready {
        panic!(
            "python3 with paho-mqtt 2.x is required for the conformance tests and could not be \
             found or installed ({why}); run `cargo xtask test`, which installs what the test \
             suite needs, or: apt-get install -y python3-pip && python3 -m pip install \
             --target {} 'paho-mqtt==2.*'",
            pydeps().display()
        );
    }
}

/// Run one paho check against `gw` as a fresh service account.
async fn paho(gw: &TestGateway, check: &str) {
    ensure_paho();
    let (user, pass) = gw.service(check).await;
    let script = PathBuf::from(REPO).join("tests/conformance/paho_checks.py");
    let run = python()
        .arg(script)
        .args([
            check,
            &gw.mqtt_addr.ip().to_string(),
            &gw.mqtt_addr.port().to_string(),
            &user,
            &pass,
        ])
        .output();
    // The script's own waits are 15 s each; this only bounds a hang.
    let out = tokio::time::timeout(DEADLINE * 4, run)
        .await
        .unwrap_or_else(|_| panic!("paho check {check} did not finish"))
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "paho check {check} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

async fn paho_check(check: &str, tune: impl FnOnce(&mut Settings)) {
    let gw = TestGateway::start_with(tune).await;
    paho(&gw, check).await;
    gw.stop().await;
}

#[tokio::test]
async fn paho_qos_0_1_2_both_ways() {
    paho_check("qos", |_| {}).await;
}

#[tokio::test]
async fn paho_persistent_session() {
    paho_check("persistent", |_| {}).await;
}

#[tokio::test]
async fn paho_retained_and_clearing() {
    paho_check("retained", |_| {}).await;
}

#[tokio::test]
async fn paho_will_on_abnormal_close_only() {
    paho_check("will", |_| {}).await;
}

#[tokio::test]
async fn paho_keep_alive_zero() {
    paho_check("keepalive_zero", |_| {}).await;
}

#[tokio::test]
async fn paho_client_id_take_over() {
    paho_check("take_over", |_| {}).await;
}

#[tokio::test]
async fn paho_unsubscribe() {
    paho_check("unsubscribe", |_| {}).await;
}

#[tokio::test]
async fn paho_overlapping_subscriptions() {
    paho_check("overlap", |_| {}).await;
}

#[tokio::test]
async fn paho_deny_list_refuses_inner_filters_and_withholds_denied_topics() {
    paho_check("deny", |s| s.mqtt.deny_filters = vec!["secret/#".into()]).await;
    // The counter is the deny list's own metric.
    let gw = TestGateway::start_with(|s| s.mqtt.deny_filters = vec!["secret/#".into()]).await;
    let (u, p) = gw.service("deny").await;
    let mut c = Client::connect(gw.mqtt_addr, "deny-rs", &u, &p).await;
    assert_eq!(
        c.subscribe("secret/+/x", rumqttc::QoS::AtLeastOnce).await,
        vec![SubscribeReasonCode::Failure]
    );
    assert_eq!(
        c.subscribe("+/+/x", rumqttc::QoS::AtLeastOnce).await,
        vec![SubscribeReasonCode::Success(QoS::AtLeastOnce)],
        "a wider filter is granted"
    );
    assert_eq!(
        gw.handle
            .hub
            .stats
            .denied_subscriptions
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    gw.stop().await;
}

// ---- byte-level cases ----

/// CONNECT with the given clean_session flag; returns the client and
/// CONNACK's (code, session_present).
async fn connect_raw(
    gw: &TestGateway,
    client_id: &str,
    login: (&str, &str),
    clean_session: bool,
) -> (RawClient, ConnectReturnCode, bool) {
    let mut c = RawClient::tcp(gw.mqtt_addr).await;
    let mut connect = Connect::new(client_id);
    connect.keep_alive = 30;
    connect.clean_session = clean_session;
    connect.login = Some(Login::new(login.0, login.1));
    c.send(Packet::Connect(connect)).await;
    match c.recv().await {
        Some(Packet::ConnAck(a)) => (c, a.code, a.session_present),
        other => panic!("expected CONNACK, got {other:?}"),
    }
}

async fn subscribe_raw(c: &mut RawClient, filter: &str, qos: QoS) {
    c.send(Packet::Subscribe(Subscribe::new(filter, qos))).await;
    match c.recv().await {
        Some(Packet::SubAck(a)) => {
            assert_eq!(a.return_codes, vec![SubscribeReasonCode::Success(qos)])
        }
        other => panic!("expected SUBACK, got {other:?}"),
    }
}

async fn recv_publish(c: &mut RawClient) -> Publish {
    match c.recv().await {
        Some(Packet::Publish(p)) => p,
        other => panic!("expected PUBLISH, got {other:?}"),
    }
}

fn publish(gw: &TestGateway, topic: &str, payload: &'static str, qos: QoS) {
    gw.handle
        .hub
        .publish(topic, Bytes::from_static(payload.as_bytes()), qos, false);
}

#[tokio::test]
async fn bad_protocol_name_closes_and_bad_level_gets_0x01() {
    let gw = TestGateway::start().await;
    // §3.1.2.1: a protocol name other than "MQTT": the server closes.
    let mut c = RawClient::tcp(gw.mqtt_addr).await;
    c.send_raw(&[
        0x10, 0x0d, 0x00, 0x04, b'M', b'Q', b'T', b'X', 0x04, 0x02, 0x00, 0x3c, 0x00, 0x01, b'x',
    ])
    .await;
    assert!(c.recv().await.is_none(), "closed without CONNACK");
    // §3.1.2.2: level 3 with the right name: CONNACK 0x01, then close.
    let mut c = RawClient::tcp(gw.mqtt_addr).await;
    c.send_raw(&[
        0x10, 0x0d, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x03, 0x02, 0x00, 0x3c, 0x00, 0x01, b'x',
    ])
    .await;
    match c.recv().await {
        Some(Packet::ConnAck(a)) => assert_eq!(a.code, ConnectReturnCode::RefusedProtocolVersion),
        other => panic!("expected CONNACK 0x01, got {other:?}"),
    }
    assert!(c.closed().await);
    gw.stop().await;
}

#[tokio::test]
async fn persistent_session_redelivers_with_dup_and_bounds_its_queue() {
    let gw = TestGateway::start_with(|s| s.mqtt.session_max_queued = 2).await;
    let (u, p) = gw.service("persist").await;
    let (mut c, code, present) = connect_raw(&gw, "raw-persist", (&u, &p), false).await;
    assert_eq!((code, present), (ConnectReturnCode::Success, false));
    subscribe_raw(&mut c, "s/#", QoS::AtLeastOnce).await;
    publish(&gw, "s/0", "zero", QoS::AtLeastOnce);
    let first = recv_publish(&mut c).await;
    assert_eq!((first.topic.as_str(), first.dup), ("s/0", false));
    // Gone without PUBACK: the message stays in flight in the session.
    drop(c);
    wait_until("session parked", || {
        gw.handle.hub.router.parked_count() == 1
    })
    .await;
    for t in ["s/1", "s/2", "s/3", "s/4"] {
        publish(&gw, t, "queued", QoS::AtLeastOnce);
    }
    publish(&gw, "s/q0", "not kept", QoS::AtMostOnce);
    let dropped = || {
        gw.handle
            .hub
            .router
            .stats
            .session_dropped
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    assert_eq!(dropped(), 2, "a queue of 2: s/3 and s/4 are dropped");

    let (mut c, code, present) = connect_raw(&gw, "raw-persist", (&u, &p), false).await;
    assert_eq!((code, present), (ConnectReturnCode::Success, true));
    let again = recv_publish(&mut c).await;
    assert_eq!(
        (again.topic.as_str(), again.pkid, again.dup),
        ("s/0", first.pkid, true),
        "the unacknowledged message again, same packet id, DUP set"
    );
    c.send(Packet::PubAck(PubAck::new(again.pkid))).await;
    for t in ["s/1", "s/2"] {
        let p = recv_publish(&mut c).await;
        assert_eq!(
            (p.topic.as_str(), p.dup, p.qos),
            (t, false, QoS::AtLeastOnce)
        );
        c.send(Packet::PubAck(PubAck::new(p.pkid))).await;
    }
    // Nothing else was kept: a PINGRESP comes next, not s/3, s/4 or QoS 0.
    c.send(Packet::PingReq).await;
    assert!(matches!(c.recv().await, Some(Packet::PingResp)));
    gw.stop().await;
}

#[tokio::test]
async fn expired_session_is_forgotten() {
    let gw = TestGateway::start_with(|s| s.mqtt.session_expiry = Duration::ZERO).await;
    let (u, p) = gw.service("expire").await;
    let (mut c, _, _) = connect_raw(&gw, "raw-expire", (&u, &p), false).await;
    subscribe_raw(&mut c, "e/#", QoS::AtLeastOnce).await;
    drop(c);
    wait_until("session parked", || {
        gw.handle.hub.router.parked_count() == 1
    })
    .await;
    let (_c, code, present) = connect_raw(&gw, "raw-expire", (&u, &p), false).await;
    assert_eq!((code, present), (ConnectReturnCode::Success, false));
    assert_eq!(gw.handle.hub.router.parked_count(), 0);
    assert!(
        gw.handle
            .hub
            .router
            .stats
            .sessions_expired
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 1
    );
    gw.stop().await;
}

#[tokio::test]
async fn outbound_qos2_flow_survives_a_reconnect() {
    let gw = TestGateway::start().await;
    let (u, p) = gw.service("qos2").await;
    let (mut c, _, _) = connect_raw(&gw, "raw-qos2", (&u, &p), false).await;
    subscribe_raw(&mut c, "x/#", QoS::ExactlyOnce).await;
    publish(&gw, "x/1", "once", QoS::ExactlyOnce);
    let m = recv_publish(&mut c).await;
    assert_eq!(
        (m.qos, m.payload.as_ref()),
        (QoS::ExactlyOnce, &b"once"[..])
    );
    c.send(Packet::PubRec(PubRec::new(m.pkid))).await;
    match c.recv().await {
        Some(Packet::PubRel(r)) => assert_eq!(r.pkid, m.pkid),
        other => panic!("expected PUBREL, got {other:?}"),
    }
    // Gone before PUBCOMP: the resumed session sends PUBREL again, not the
    // message (§4.3.3: it has been delivered once).
    drop(c);
    wait_until("session parked", || {
        gw.handle.hub.router.parked_count() == 1
    })
    .await;
    let (mut c, _, present) = connect_raw(&gw, "raw-qos2", (&u, &p), false).await;
    assert!(present);
    match c.recv().await {
        Some(Packet::PubRel(r)) => assert_eq!(r.pkid, m.pkid),
        other => panic!("expected PUBREL again, got {other:?}"),
    }
    c.send(Packet::PubComp(PubComp::new(m.pkid))).await;
    publish(&gw, "x/2", "next", QoS::ExactlyOnce);
    let n = recv_publish(&mut c).await;
    assert_eq!((n.topic.as_str(), n.dup), ("x/2", false));
    gw.stop().await;
}

// ---- per-connection limits ----

#[tokio::test]
async fn outbound_inflight_window_waits_for_acks() {
    let gw = TestGateway::start_with(|s| s.mqtt.max_inflight = 2).await;
    let (u, p) = gw.service("window").await;
    let (mut c, _, _) = connect_raw(&gw, "raw-window", (&u, &p), true).await;
    subscribe_raw(&mut c, "w/#", QoS::AtLeastOnce).await;
    for t in ["w/1", "w/2", "w/3"] {
        publish(&gw, t, "m", QoS::AtLeastOnce);
    }
    let a = recv_publish(&mut c).await;
    let b = recv_publish(&mut c).await;
    assert_eq!((a.topic.as_str(), b.topic.as_str()), ("w/1", "w/2"));
    // The window is full: the third waits, so PINGRESP overtakes it.
    c.send(Packet::PingReq).await;
    assert!(matches!(c.recv().await, Some(Packet::PingResp)));
    c.send(Packet::PubAck(PubAck::new(a.pkid))).await;
    assert_eq!(recv_publish(&mut c).await.topic, "w/3");
    gw.stop().await;
}

#[tokio::test]
async fn unreleased_qos2_beyond_max_inflight_closes_only_that_connection() {
    let gw = TestGateway::start_with(|s| s.mqtt.max_inflight = 2).await;
    let (u, p) = gw.service("inflight").await;
    let mut other = Client::connect(gw.mqtt_addr, "bystander", &u, &p).await;
    other.subscribe("ok/#", rumqttc::QoS::AtLeastOnce).await;
    let (mut c, _, _) = connect_raw(&gw, "raw-inflight", (&u, &p), true).await;
    for pkid in 1..=3u16 {
        let mut p = Publish::new("q2/x", QoS::ExactlyOnce, b"x".to_vec());
        p.pkid = pkid;
        c.send(Packet::Publish(p)).await;
    }
    assert!(c.closed().await, "third unreleased QoS 2 publish closes");
    let stats = &gw.handle.hub.stats.connections;
    wait_until("counted", || {
        stats.disconnects(ClientKind::Service, DisconnectReason::InflightExceeded) == 1
    })
    .await;
    other
        .client
        .publish("ok/1", rumqttc::QoS::AtLeastOnce, false, "still")
        .await
        .unwrap();
    assert_eq!(
        other.next_publish().await.expect("bystander served").0,
        "ok/1"
    );
    gw.stop().await;
}

#[tokio::test]
async fn packet_over_max_size_closes_only_that_connection() {
    let gw = TestGateway::start_with(|s| s.mqtt.max_packet_size = 1024).await;
    let (u, p) = gw.service("size").await;
    let mut other = Client::connect(gw.mqtt_addr, "bystander", &u, &p).await;
    other.subscribe("big/#", rumqttc::QoS::AtLeastOnce).await;
    let (mut c, _, _) = connect_raw(&gw, "raw-size", (&u, &p), true).await;
    c.send(Packet::Publish(Publish::new(
        "big/x",
        QoS::AtMostOnce,
        vec![b'x'; 1000],
    )))
    .await;
    c.send(Packet::Publish(Publish::new(
        "big/x",
        QoS::AtMostOnce,
        vec![b'y'; 2000],
    )))
    .await;
    assert!(c.closed().await, "oversized packet closes");
    let stats = &gw.handle.hub.stats.connections;
    wait_until("counted", || {
        stats.disconnects(ClientKind::Service, DisconnectReason::PacketTooLarge) == 1
    })
    .await;
    let (_, payload, _) = other.next_publish().await.expect("the small one arrived");
    assert_eq!(payload.len(), 1000);
    other
        .client
        .publish("big/2", rumqttc::QoS::AtLeastOnce, false, "still")
        .await
        .unwrap();
    assert_eq!(
        other.next_publish().await.expect("bystander served").0,
        "big/2"
    );
    gw.stop().await;
}

#[tokio::test]
async fn machine_over_publish_rate_is_disconnected_others_unaffected() {
    const A: &str = "20000001";
    const B: &str = "20000002";
    let gw = TestGateway::start_with(|s| {
        s.mqtt.machine_publish_rate = 1;
        s.mqtt.machine_publish_burst = 10;
    })
    .await;
    let (appid, _) = gw.merchant("m").await;
    let sa = gw.machine(&appid, A).await;
    let sb = gw.machine(&appid, B).await;
    let mut b = hand_machine(&gw, B, &sb, 5, 100).await;
    let mut a = Client::connect(gw.mqtt_addr, A, A, &sa).await;
    // Far beyond a burst of 10 at 1/s, however slowly this machine runs.
    for i in 0..100 {
        if a.client
            .try_publish(
                format!("vend/v1/{A}/pong"),
                rumqttc::QoS::AtMostOnce,
                false,
                format!(r#"{{"id":{i}}}"#),
            )
            .is_err()
        {
            break;
        }
    }
    assert!(a.wait_disconnected().await.is_some(), "A is cut off");
    wait_until("A offline", || !gw.online(A)).await;
    let stats = &gw.handle.hub.stats.connections;
    assert_eq!(
        stats.disconnects(ClientKind::Machine, DisconnectReason::RateLimited),
        1
    );
    // B keeps its connection and its commands.
    assert!(gw.online(B));
    gw.handle.hub.send_command(
        &B.parse().unwrap(),
        vendgate_proto::topic::Command::Ping,
        r#"{"id":1}"#.into(),
    );
    let (t, _, _) = b.next_publish().await.expect("B receives its command");
    assert_eq!(t, format!("vend/v1/{B}/cmd/ping"));
    gw.stop().await;
}

#[tokio::test]
async fn persistent_take_over_moves_the_session_to_the_new_connection() {
    let gw = TestGateway::start().await;
    let (u, p) = gw.service("move").await;
    let (mut old, _, _) = connect_raw(&gw, "raw-move", (&u, &p), false).await;
    subscribe_raw(&mut old, "mv/#", QoS::AtLeastOnce).await;
    publish(&gw, "mv/1", "unacked", QoS::AtLeastOnce);
    assert_eq!(recv_publish(&mut old).await.topic, "mv/1");
    let (mut new, code, present) = connect_raw(&gw, "raw-move", (&u, &p), false).await;
    assert_eq!((code, present), (ConnectReturnCode::Success, true));
    assert!(old.closed().await, "the old connection is taken over");
    // The old connection's unacknowledged message, then new traffic through
    // the subscription the new connection never made itself.
    let again = recv_publish(&mut new).await;
    assert_eq!(again.topic, "mv/1");
    new.send(Packet::PubAck(PubAck::new(again.pkid))).await;
    publish(&gw, "mv/2", "new", QoS::AtLeastOnce);
    assert_eq!(recv_publish(&mut new).await.topic, "mv/2");
    gw.stop().await;
}

#[tokio::test]
async fn persistent_machine_is_served_as_clean() {
    // PROTOCOL.md, gateway rule 8: a machine asking for clean_session = 0
    // gets session present 0 and nothing of the earlier connection: no
    // subscriptions, and no redelivery of a command it did not acknowledge.
    const M: &str = "20000003";
    let gw = TestGateway::start().await;
    let (appid, _) = gw.merchant("m").await;
    let secret = gw.machine(&appid, M).await;
    let m: vendgate_proto::machine::MachineNo = M.parse().unwrap();
    let (mut c, _, present) = connect_raw(&gw, M, (M, &secret), false).await;
    assert!(!present);
    subscribe_raw(&mut c, &format!("vend/v1/{M}/cmd/#"), QoS::AtLeastOnce).await;
    let ping = |id: u32| {
        gw.handle.hub.send_command(
            &m,
            vendgate_proto::topic::Command::Ping,
            format!(r#"{{"id":{id}}}"#).into(),
        )
    };
    assert_eq!(ping(1), vendgate::edge::router::MachineDelivery::Queued);
    let unacked = recv_publish(&mut c).await;
    assert_eq!(unacked.qos, QoS::AtLeastOnce);
    drop(c);
    wait_until("offline", || !gw.online(M)).await;
    assert_eq!(gw.handle.hub.router.parked_count(), 0, "nothing parked");
    let (mut c, _, present) = connect_raw(&gw, M, (M, &secret), false).await;
    assert!(!present, "session present 0");
    // No redelivery: the PINGRESP is the first thing after CONNACK.
    c.send(Packet::PingReq).await;
    assert!(matches!(c.recv().await, Some(Packet::PingResp)));
    assert_eq!(
        ping(2),
        vendgate::edge::router::MachineDelivery::NotSubscribed,
        "no subscription was kept"
    );
    gw.stop().await;
}
