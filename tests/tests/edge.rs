//! The device edge over real sockets: authentication, ACL, presence, the
//! service class as a general MQTT broker, and hostile bytes.

use std::sync::atomic::Ordering;
use std::time::Duration;

use rumqttc::mqttbytes::v4::{
    Connect, ConnectReturnCode, LastWill, Login, Packet, Publish, Subscribe, SubscribeReasonCode,
};
use rumqttc::QoS;
use vendgate_e2e::{hand_machine, wait_until, Client, ClientEvent, RawClient, TestGateway};

const A: &str = "10000001";
const B: &str = "10000002";

async fn gateway_with_two_machines() -> (TestGateway, String, String) {
    let gw = TestGateway::start().await;
    let (appid, _) = gw.merchant("m").await;
    let sa = gw.machine(&appid, A).await;
    let sb = gw.machine(&appid, B).await;
    (gw, sa, sb)
}

#[tokio::test]
async fn machine_credentials_are_checked() {
    let (gw, sa, _) = gateway_with_two_machines().await;
    let addr = gw.mqtt_addr;

    let (_ok, code) = RawClient::connect(addr, A, Some((A, &sa)), 30).await;
    assert_eq!(code, Some(ConnectReturnCode::Success));

    type Case<'a> = (&'a str, Option<(&'a str, &'a str)>, ConnectReturnCode);
    let cases: [Case; 6] = [
        (
            A,
            Some((A, "0123456789abcdef0123456789abcdef")),
            ConnectReturnCode::NotAuthorized,
        ),
        (
            "10009999",
            Some(("10009999", sa.as_str())),
            ConnectReturnCode::NotAuthorized,
        ),
        (B, Some((A, sa.as_str())), ConnectReturnCode::NotAuthorized),
        (
            "1234567",
            Some(("1234567", sa.as_str())),
            ConnectReturnCode::NotAuthorized,
        ),
        (
            "１２３４５６７８",
            Some(("１２３４５６７８", sa.as_str())),
            ConnectReturnCode::NotAuthorized,
        ),
        (A, None, ConnectReturnCode::NotAuthorized),
    ];
    for (client_id, login, want) in cases {
        let (mut c, code) = RawClient::connect(addr, client_id, login, 30).await;
        assert_eq!(
            code,
            Some(want),
            "client {client_id} login {:?}",
            login.map(|l| l.0)
        );
        assert!(c.closed().await, "refused connection is closed");
    }
    assert!(!gw.online("10009999"));
    assert!(gw.handle.hub.stats().connect_refused >= 6);
    gw.stop().await;
}

#[tokio::test]
async fn presence_follows_connect_disconnect_kill_and_silence() {
    let (gw, sa, _) = gateway_with_two_machines().await;
    let addr = gw.mqtt_addr;

    // Connect → online; clean DISCONNECT → offline.
    let (mut c, code) = RawClient::connect(addr, A, Some((A, &sa)), 30).await;
    assert_eq!(code, Some(ConnectReturnCode::Success));
    assert!(gw.online(A), "online as soon as CONNACK is received");
    c.send(Packet::Disconnect).await;
    wait_until("offline after DISCONNECT", || !gw.online(A)).await;

    // Killed socket → offline.
    let (c, _) = RawClient::connect(addr, A, Some((A, &sa)), 30).await;
    assert!(gw.online(A));
    drop(c);
    wait_until("offline after socket close", || !gw.online(A)).await;

    // Silent client (keep alive 1 s): offline after 1.5 s of silence, while
    // the connection is still open.
    let (mut silent, _) = RawClient::connect(addr, A, Some((A, &sa)), 1).await;
    let t0 = tokio::time::Instant::now();
    assert!(gw.online(A));
    assert!(silent.closed().await, "server closes a silent client");
    let waited = t0.elapsed();
    assert!(!gw.online(A));
    assert!(
        waited >= Duration::from_millis(1400),
        "not before 1.5 × keep alive: {waited:?}"
    );
    assert_eq!(gw.handle.hub.stats().keep_alive_timeouts, 1);

    // A client that keeps pinging stays online past several keep-alive periods.
    let (mut pinger, _) = RawClient::connect(addr, A, Some((A, &sa)), 1).await;
    for _ in 0..4 {
        pinger.send(Packet::PingReq).await;
        assert_eq!(pinger.recv().await, Some(Packet::PingResp));
        tokio::time::sleep(Duration::from_millis(600)).await; // the client's own cadence, not synchronisation
        assert!(gw.online(A));
    }
    gw.stop().await;
}

#[tokio::test]
async fn take_over_keeps_machine_online() {
    let (gw, sa, _) = gateway_with_two_machines().await;
    let mut presence = gw.handle.presence.subscribe();
    let (mut first, _) = RawClient::connect(gw.mqtt_addr, A, Some((A, &sa)), 30).await;
    let (mut second, code) = RawClient::connect(gw.mqtt_addr, A, Some((A, &sa)), 30).await;
    assert_eq!(code, Some(ConnectReturnCode::Success));
    assert!(
        first.closed().await,
        "take-over closes the first connection"
    );
    // The old connection's close must not flip the machine offline.
    second.send(Packet::PingReq).await;
    assert_eq!(second.recv().await, Some(Packet::PingResp));
    assert!(gw.online(A));
    let mut events = Vec::new();
    while let Ok(e) = presence.try_recv() {
        events.push(e);
    }
    assert!(
        events.iter().all(|e| e.online),
        "no offline event during take-over: {events:?}"
    );
    assert!(events.last().is_some_and(|e| e.took_over));
    second.send(Packet::Disconnect).await;
    wait_until("offline after the new connection ends", || !gw.online(A)).await;
    gw.stop().await;
}

#[tokio::test]
async fn acl_confines_machines_to_their_prefix() {
    let (gw, sa, sb) = gateway_with_two_machines().await;
    let addr = gw.mqtt_addr;
    let mut b = Client::connect(addr, B, B, &sb).await;
    assert_eq!(
        b.subscribe("vend/v1/10000002/cmd/#", QoS::AtLeastOnce)
            .await,
        vec![SubscribeReasonCode::Success(QoS::AtLeastOnce)]
    );

    let mut a = Client::connect(addr, A, A, &sa).await;
    for filter in [
        "vend/v1/10000002/cmd/#",
        "#",
        "vend/v1/+/cmd/#",
        "vend/#",
        "vend/v1/10000001",
    ] {
        assert_eq!(
            a.subscribe(filter, QoS::AtLeastOnce).await,
            vec![SubscribeReasonCode::Failure],
            "{filter} must be refused"
        );
    }
    assert_eq!(
        a.subscribe("vend/v1/10000001/#", QoS::AtLeastOnce).await,
        vec![SubscribeReasonCode::Success(QoS::AtLeastOnce)]
    );
    // Its own topics work (and it sees its own publish through its own filter).
    a.client
        .publish(
            "vend/v1/10000001/inventory",
            QoS::AtLeastOnce,
            false,
            r#"{"items":[]}"#,
        )
        .await
        .unwrap();
    let (t, _, _) = a.next_publish().await.expect("own publish echoed");
    assert_eq!(t, "vend/v1/10000001/inventory");

    // Publishing into B's command topic closes A's connection; B gets nothing.
    a.client
        .publish(
            "vend/v1/10000002/cmd/dispense",
            QoS::AtLeastOnce,
            false,
            r#"{"order_id":1,"items":[],"ttl_ms":1}"#,
        )
        .await
        .unwrap();
    assert!(
        a.wait_disconnected().await.is_some(),
        "violating connection is closed"
    );
    wait_until("A offline", || !gw.online(A)).await;
    assert!(gw.handle.hub.stats().acl_violations >= 6);
    // B still works and received nothing of A's: a gateway ping reaches it first.
    gw.handle.hub.send_command(
        &B.parse().unwrap(),
        vendgate_proto::topic::Command::Ping,
        r#"{"id":7}"#.into(),
    );
    let (t, p, _) = b
        .next_publish()
        .await
        .expect("B receives the gateway's command");
    assert_eq!(t, "vend/v1/10000002/cmd/ping");
    assert_eq!(p, br#"{"id":7}"#);
    gw.stop().await;
}

#[tokio::test]
async fn service_clients_observe_machines_and_talk_to_each_other() {
    let (gw, sa, _) = gateway_with_two_machines().await;
    let addr = gw.mqtt_addr;
    let (u1, p1) = gw.service("observer").await;
    let (u2, p2) = gw.service("peer").await;

    let mut obs = Client::connect(addr, "observer-1", &u1, &p1).await;
    assert_eq!(
        obs.subscribe("vend/v1/#", QoS::AtLeastOnce).await,
        vec![SubscribeReasonCode::Success(QoS::AtLeastOnce)]
    );
    let a = Client::connect(addr, A, A, &sa).await;
    a.client
        .publish(
            "vend/v1/10000001/state",
            QoS::AtLeastOnce,
            true,
            r#"{"online":true,"firmware":"1.0"}"#,
        )
        .await
        .unwrap();
    let (t, p, _) = obs.next_publish().await.expect("observer sees the uplink");
    assert_eq!(t, "vend/v1/10000001/state");
    assert_eq!(p, br#"{"online":true,"firmware":"1.0"}"#);
    wait_until("firmware recorded", || {
        gw.handle
            .presence
            .get(&A.parse().unwrap())
            .and_then(|p| p.firmware)
            == Some("1.0".into())
    })
    .await;

    // Retained: a late subscriber gets the machine's state with retain = 1.
    let mut late = Client::connect(addr, "observer-2", &u1, &p1).await;
    late.subscribe("vend/v1/+/state", QoS::AtLeastOnce).await;
    let (t, _, retain) = late.next_publish().await.expect("retained state");
    assert_eq!(t, "vend/v1/10000001/state");
    assert!(retain);

    // Service ↔ service on their own topics, QoS 0 and 1, retained.
    let mut peer = Client::connect(addr, "peer-1", &u2, &p2).await;
    peer.subscribe("ops/#", QoS::AtLeastOnce).await;
    obs.client
        .publish("ops/q0", QoS::AtMostOnce, false, "zero")
        .await
        .unwrap();
    obs.client
        .publish("ops/q1", QoS::AtLeastOnce, false, "one")
        .await
        .unwrap();
    obs.client
        .publish("ops/keep", QoS::AtLeastOnce, true, "kept")
        .await
        .unwrap();
    let mut got = Vec::new();
    for _ in 0..3 {
        got.push(peer.next_publish().await.expect("peer receives"));
    }
    got.sort();
    assert_eq!(
        got.iter()
            .map(|(t, p, _)| (t.as_str(), p.as_slice()))
            .collect::<Vec<_>>(),
        vec![
            ("ops/keep", &b"kept"[..]),
            ("ops/q0", b"zero"),
            ("ops/q1", b"one")
        ]
    );
    let mut third = Client::connect(addr, "peer-2", &u2, &p2).await;
    third.subscribe("ops/keep", QoS::AtMostOnce).await;
    assert_eq!(
        third.next_publish().await.map(|x| x.1),
        Some(b"kept".to_vec())
    );
    // Clearing a retained message with an empty payload.
    obs.client
        .publish("ops/keep", QoS::AtLeastOnce, true, "")
        .await
        .unwrap();
    let _ = peer.next_publish().await; // the clearing message itself
    let mut fourth = Client::connect(addr, "peer-3", &u2, &p2).await;
    fourth.subscribe("ops/keep", QoS::AtMostOnce).await;
    fourth
        .client
        .publish("ops/keep-marker", QoS::AtLeastOnce, false, "m")
        .await
        .unwrap();
    fourth.subscribe("ops/keep-marker", QoS::AtMostOnce).await;
    fourth
        .client
        .publish("ops/keep-marker", QoS::AtLeastOnce, false, "m2")
        .await
        .unwrap();
    let (t, _, _) = fourth.next_publish().await.expect("marker");
    assert_eq!(t, "ops/keep-marker", "no retained message after clearing");

    // A service cannot write under vend/v1/.
    obs.client
        .publish(
            "vend/v1/10000001/cmd/dispense",
            QoS::AtLeastOnce,
            false,
            "{}",
        )
        .await
        .unwrap();
    assert!(obs.wait_disconnected().await.is_some());
    gw.stop().await;
}

#[tokio::test]
async fn will_fires_on_abnormal_close_only() {
    let (gw, sa, _) = gateway_with_two_machines().await;
    let (u, p) = gw.service("obs").await;
    let mut obs = Client::connect(gw.mqtt_addr, "obs", &u, &p).await;
    obs.subscribe("vend/v1/+/state", QoS::AtLeastOnce).await;
    let will = |o: &mut rumqttc::MqttOptions| {
        o.set_last_will(rumqttc::LastWill::new(
            "vend/v1/10000001/state",
            r#"{"online":false}"#,
            QoS::AtLeastOnce,
            true,
        ));
    };
    let a = Client::connect_with(gw.mqtt_addr, A, A, &sa, will).await;
    a.client.disconnect().await.unwrap();
    wait_until("offline", || !gw.online(A)).await;
    let a = Client::connect_with(gw.mqtt_addr, A, A, &sa, will).await;
    a.abort();
    let (t, p, _) = obs
        .next_publish()
        .await
        .expect("will after a killed socket");
    assert_eq!(t, "vend/v1/10000001/state");
    assert_eq!(
        p, br#"{"online":false}"#,
        "and not before: the clean disconnect sent none"
    );
    gw.stop().await;
}

#[tokio::test]
async fn hostile_bytes_close_only_the_offender() {
    let (gw, sa, sb) = gateway_with_two_machines().await;
    let addr = gw.mqtt_addr;
    let mut b = Client::connect(addr, B, B, &sb).await;
    b.subscribe("vend/v1/10000002/cmd/#", QoS::AtLeastOnce)
        .await;

    // Garbage before CONNECT, a first packet announcing a huge length, a
    // truncated CONNECT followed by close.
    for bytes in [
        &b"GET / HTTP/1.1\r\n\r\n"[..],
        &[0x30, 0xff, 0xff, 0xff, 0x7f][..],
        &[0x10, 0x20, 0x00, 0x04, b'M', b'Q'][..],
        &[0xff; 64][..],
    ] {
        let mut c = RawClient::tcp(addr).await;
        c.send_raw(bytes).await;
        if bytes[0] == 0x10 {
            drop(c);
        } else {
            assert!(
                c.closed().await,
                "garbage {bytes:02x?} closes the connection"
            );
        }
    }

    // Authenticated machine sending hostile packets.
    let hostile: Vec<(&str, Vec<u8>)> = vec![
        ("publish to é/x", publish_bytes("é/x")),
        (
            "wildcard in a publish topic",
            publish_bytes("vend/v1/10000001/+"),
        ),
        ("empty topic", publish_bytes("")),
        ("oversized packet", {
            let mut v = vec![0x30];
            v.extend([0x80, 0x80, 0x10]); // remaining length 256 KiB > 64 KiB
            v
        }),
        ("client-sent CONNACK", vec![0x20, 0x02, 0x00, 0x00]),
        ("second CONNECT", {
            let mut out = bytes::BytesMut::new();
            Packet::Connect(rumqttc::mqttbytes::v4::Connect::new(A))
                .write(&mut out, 1 << 20)
                .unwrap();
            out.to_vec()
        }),
        ("SUBSCRIBE without filters", vec![0x82, 0x02, 0x00, 0x01]),
    ];
    for (what, bytes) in hostile {
        let (mut c, code) = RawClient::connect(addr, A, Some((A, &sa)), 30).await;
        assert_eq!(code, Some(ConnectReturnCode::Success), "{what}");
        c.send_raw(&bytes).await;
        assert!(c.closed().await, "{what}: connection closed");
        wait_until("offender offline", || !gw.online(A)).await;
    }

    // Invalid filters are refused with 0x80, the connection stays.
    let (mut c, _) = RawClient::connect(addr, A, Some((A, &sa)), 30).await;
    let mut sub = Subscribe::new(
        "vend/v1/10000001/cmd/#x",
        rumqttc::mqttbytes::QoS::AtLeastOnce,
    );
    sub.pkid = 3;
    sub.add(
        "vend/v1/10000001/c+/x".into(),
        rumqttc::mqttbytes::QoS::AtLeastOnce,
    );
    sub.add(
        "vend/v1/10000001/cmd/#".into(),
        rumqttc::mqttbytes::QoS::AtLeastOnce,
    );
    c.send(Packet::Subscribe(sub)).await;
    match c.recv().await {
        Some(Packet::SubAck(s)) => assert_eq!(
            s.return_codes,
            vec![
                SubscribeReasonCode::Failure,
                SubscribeReasonCode::Failure,
                SubscribeReasonCode::Success(rumqttc::mqttbytes::QoS::AtLeastOnce)
            ]
        ),
        other => panic!("expected SUBACK, got {other:?}"),
    }

    // The hub still routes, and B never lost its connection.
    gw.handle.hub.send_command(
        &B.parse().unwrap(),
        vendgate_proto::topic::Command::Ping,
        r#"{"id":1}"#.into(),
    );
    let (t, _, _) = b.next_publish().await.expect("B still served");
    assert_eq!(t, "vend/v1/10000002/cmd/ping");
    assert!(gw.online(B));
    assert!(gw.handle.hub.stats().malformed >= 5);
    gw.stop().await;
}

fn publish_bytes(topic: &str) -> Vec<u8> {
    let mut p = Publish::new(topic, rumqttc::mqttbytes::QoS::AtMostOnce, b"{}".to_vec());
    p.pkid = 0;
    let mut out = bytes::BytesMut::new();
    Packet::Publish(p).write(&mut out, 1 << 20).unwrap();
    out.to_vec()
}

#[tokio::test]
async fn protocol_level_and_client_id_rules() {
    let (gw, _, _) = gateway_with_two_machines().await;
    let (u, p) = gw.service("svc").await;
    // MQTT 5 CONNECT → CONNACK 0x01 (unacceptable protocol version).
    let mut c = RawClient::tcp(gw.mqtt_addr).await;
    c.send_raw(&[
        0x10, 0x0d, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x05, 0x02, 0x00, 0x3c, 0x00, 0x01, b'x',
    ])
    .await;
    match c.recv().await {
        Some(Packet::ConnAck(a)) => assert_eq!(a.code, ConnectReturnCode::RefusedProtocolVersion),
        other => panic!("expected CONNACK 0x01, got {other:?}"),
    }
    // A service may not use a machine number as its client id (no take-over of machines).
    let (_c, code) = RawClient::connect(gw.mqtt_addr, A, Some((&u, &p)), 30).await;
    assert_eq!(code, Some(ConnectReturnCode::BadClientId));
    // Empty client id with clean session: the server assigns one.
    let (_c, code) = RawClient::connect(gw.mqtt_addr, "", Some((&u, &p)), 0).await;
    assert_eq!(code, Some(ConnectReturnCode::Success));
    gw.stop().await;
}

#[tokio::test]
async fn gateway_pings_a_machine() {
    let (gw, sa, _) = gateway_with_two_machines().await;
    let mut a = Client::connect(gw.mqtt_addr, A, A, &sa).await;
    a.subscribe("vend/v1/10000001/cmd/#", QoS::AtLeastOnce)
        .await;
    let m: vendgate_proto::machine::MachineNo = A.parse().unwrap();
    let bus = gw.handle.commands.clone();
    let ping = tokio::spawn(async move { bus.ping(&m, Duration::from_secs(10)).await });
    let (t, payload, _) = a.next_publish().await.expect("ping");
    assert_eq!(t, "vend/v1/10000001/cmd/ping");
    let v: serde_json::Value = serde_json::from_slice(&payload).unwrap();
    a.client
        .publish(
            "vend/v1/10000001/pong",
            QoS::AtLeastOnce,
            false,
            format!(r#"{{"id":{}}}"#, v["id"]),
        )
        .await
        .unwrap();
    let rtt = ping.await.unwrap().expect("pong answered");
    assert!(gw.handle.presence.get(&m).unwrap().last_rtt_ms.is_some());
    assert!(rtt < Duration::from_secs(10));
    let _ = ClientEvent::PubAck(0);
    gw.stop().await;
}

/// Issue 7: a stolen machine's credentials (A's) can neither read B's
/// commands, nor forge B's acks and results, nor mark B offline (by
/// take-over, will, or a `state` publish), and B's order completes on B's
/// own word.
#[tokio::test]
async fn stolen_machine_credentials_cannot_touch_another_machine() {
    let gw = TestGateway::start().await;
    let (appid, appsecret) = gw.merchant("m").await;
    let sa = gw.machine(&appid, A).await;
    let sb = gw.machine(&appid, B).await;
    let mut b = hand_machine(&gw, B, &sb, 5, 100).await;
    let addr = gw.mqtt_addr;

    // Take-over: A's credentials with B's client id are refused; B stays.
    let (mut c, code) = RawClient::connect(addr, B, Some((A, &sa)), 30).await;
    assert_eq!(code, Some(ConnectReturnCode::NotAuthorized));
    assert!(c.closed().await);
    // A will on B's state topic is refused at CONNECT.
    let mut c = RawClient::tcp(addr).await;
    let mut connect = Connect::new(A);
    connect.keep_alive = 30;
    connect.login = Some(Login::new(A, sa.as_str()));
    connect.last_will = Some(LastWill::new(
        format!("vend/v1/{B}/state"),
        r#"{"online":false}"#,
        rumqttc::mqttbytes::QoS::AtLeastOnce,
        true,
    ));
    c.send(Packet::Connect(connect)).await;
    match c.recv().await {
        Some(Packet::ConnAck(a)) => assert_eq!(a.code, ConnectReturnCode::NotAuthorized),
        other => panic!("expected CONNACK 0x05, got {other:?}"),
    }

    // Reading B's commands: every filter that could match them is refused.
    let mut a = Client::connect(addr, A, A, &sa).await;
    for f in [
        format!("vend/v1/{B}/cmd/#"),
        "vend/v1/+/cmd/dispense".to_string(),
        "#".to_string(),
    ] {
        assert_eq!(
            a.subscribe(&f, QoS::AtLeastOnce).await,
            vec![SubscribeReasonCode::Failure],
            "{f}"
        );
    }

    // An order on B: B receives it (A does not) and accepts it.
    let api = vendgate_e2e::Api::new(&gw, &appid, &appsecret);
    let placing = tokio::spawn(async move { api.order(B, &[(1, 1)]).await });
    let (t, p, _) = b.next_publish().await.expect("B receives the dispense");
    assert_eq!(t, format!("vend/v1/{B}/cmd/dispense"));
    let id = serde_json::from_slice::<serde_json::Value>(&p).unwrap()["order_id"]
        .as_u64()
        .expect("order_id");
    b.client
        .publish(
            format!("vend/v1/{B}/ack"),
            QoS::AtLeastOnce,
            false,
            format!(r#"{{"order_id":{id},"accepted":true}}"#),
        )
        .await
        .unwrap();
    let answered = placing.await.unwrap();
    assert_eq!(answered["code"], 0, "{answered}");

    // A forges B's result (nothing dispensed) and B's offline state: each
    // closes A's connection and changes nothing for B.
    let forgeries = [
        (
            format!("vend/v1/{B}/result"),
            format!(
                r#"{{"order_id":{id},"items":[{{"product_id":1,"quantity":1,"dispensed":0}}],"error":"motor_jam"}}"#
            ),
        ),
        (
            format!("vend/v1/{B}/state"),
            r#"{"online":false}"#.to_string(),
        ),
    ];
    for (topic, payload) in forgeries {
        let a2 = Client::connect(addr, A, A, &sa).await;
        a2.client
            .publish(topic.clone(), QoS::AtLeastOnce, true, payload)
            .await
            .unwrap();
        let mut a2 = a2;
        assert!(a2.wait_disconnected().await.is_some(), "{topic}: A closed");
    }
    assert!(
        a.wait_disconnected().await.is_some(),
        "A's first connection was taken over"
    );
    assert!(gw.online(B), "B is still online");

    // B's own result settles the order: one item dispensed, nothing refunded.
    b.client
        .publish(
            format!("vend/v1/{B}/result"),
            QoS::AtLeastOnce,
            false,
            format!(
                r#"{{"order_id":{id},"items":[{{"product_id":1,"quantity":1,"dispensed":1}}]}}"#
            ),
        )
        .await
        .unwrap();
    let api = vendgate_e2e::Api::new(&gw, &appid, &appsecret);
    let o = api.wait_status(id, "completed").await;
    assert_eq!(o["data"]["items"][0]["dispensed"], 1, "{o}");
    assert!(gw.handle.hub.stats().acl_violations >= 5);
    gw.stop().await;
}

/// A machine may publish only its own uplinks: a forged command on its own
/// command topic (or any topic PROTOCOL.md does not define) reaches no one,
/// is counted, and the machine stays connected.
#[tokio::test]
async fn machine_publishes_only_its_uplinks() {
    let gw = TestGateway::start().await;
    let (appid, _) = gw.merchant("m").await;
    let sa = gw.machine(&appid, A).await;
    let (user, pass) = gw.service("observer").await;
    let mut observer = Client::connect(gw.mqtt_addr, "observer", &user, &pass).await;
    observer.subscribe("vend/v1/#", QoS::AtLeastOnce).await;
    let a = hand_machine(&gw, A, &sa, 5, 100).await;
    // hand_machine's inventory reaches the observer first.
    let (t, _, _) = observer.next_publish().await.expect("inventory");
    assert_eq!(t, format!("vend/v1/{A}/inventory"));
    let before = gw.handle.hub.stats.acl_violations.load(Ordering::Relaxed);

    for topic in [
        format!("vend/v1/{A}/cmd/dispense"),
        format!("vend/v1/{A}/bogus"),
    ] {
        a.client
            .publish(topic, QoS::AtLeastOnce, false, r#"{"order_id":1}"#)
            .await
            .unwrap();
    }
    a.client
        .publish(
            format!("vend/v1/{A}/state"),
            QoS::AtLeastOnce,
            false,
            r#"{"online":true}"#,
        )
        .await
        .unwrap();
    // One connection's publishes are handled in order: the state arriving
    // first means the two before it were dropped.
    let (t, _, _) = observer.next_publish().await.expect("state");
    assert_eq!(t, format!("vend/v1/{A}/state"));
    assert_eq!(
        gw.handle.hub.stats.acl_violations.load(Ordering::Relaxed),
        before + 2
    );
    assert!(gw.handle.presence.is_online(&A.parse().unwrap()));

    // Nor as its will, which the hub would publish for it: refused at CONNECT
    // (before any take-over, so the connected machine stays).
    let mut c = RawClient::tcp(gw.mqtt_addr).await;
    let mut connect = Connect::new(A);
    connect.keep_alive = 30;
    connect.login = Some(Login::new(A, sa.as_str()));
    connect.last_will = Some(LastWill::new(
        format!("vend/v1/{A}/cmd/dispense"),
        r#"{"order_id":1}"#,
        rumqttc::mqttbytes::QoS::AtLeastOnce,
        false,
    ));
    c.send(Packet::Connect(connect)).await;
    match c.recv().await {
        Some(Packet::ConnAck(a)) => assert_eq!(a.code, ConnectReturnCode::NotAuthorized),
        other => panic!("expected CONNACK 0x05, got {other:?}"),
    }
    assert!(gw.handle.presence.is_online(&A.parse().unwrap()));
    gw.stop().await;
}
