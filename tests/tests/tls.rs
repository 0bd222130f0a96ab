//! TLS end to end with a test CA generated here (rcgen): MQTT over TLS with a
//! password and with a client certificate (CN = machine_no), refusals of
//! bad certificates and plaintext on the TLS port, a stalled handshake cut by
//! the connect timeout, HTTPS, and the start-up refusal of plaintext
//! listeners on public addresses.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use rumqttc::mqttbytes::v4::{ConnectReturnCode, Packet, Publish};
use rumqttc::QoS;
use vendgate::config::{HttpTlsSettings, MqttTlsSettings};
use vendgate::{Gateway, Settings};
use vendgate_e2e::{tls_connect, wait_until, Client, RawClient, TestCa, TestGateway};

const A: &str = "10000001";
const B: &str = "10000002";

fn loopback0() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

/// A gateway with `[mqtt.tls]` (server certificate from `server_ca`,
/// machines' certificates from `machine_ca`) and machines A and B.
async fn tls_gateway(
    server_ca: &TestCa,
    machine_ca: &TestCa,
    tune: impl FnOnce(&mut Settings),
) -> (TestGateway, SocketAddr, String, String) {
    let pki = tempfile::tempdir().expect("temp dir");
    let (cert, key) = server_ca.server().write(pki.path(), "server");
    let client_ca = machine_ca.write(pki.path(), "machines-ca.pem");
    let gw = TestGateway::start_with(|s| {
        s.mqtt.tls = Some(MqttTlsSettings {
            addr: loopback0(),
            cert,
            key,
            client_ca: Some(client_ca),
        });
        tune(s);
    })
    .await;
    // The PEM files are read at build time; the directory may go.
    drop(pki);
    let (appid, _) = gw.merchant("m").await;
    let sa = gw.machine(&appid, A).await;
    let sb = gw.machine(&appid, B).await;
    let addr = gw.mqtt_tls_addr.expect("TLS listener bound");
    (gw, addr, sa, sb)
}

#[tokio::test]
async fn machines_connect_over_tls_with_a_password_or_a_client_certificate() {
    let server_ca = TestCa::new("vendgate test server CA");
    let machine_ca = TestCa::new("vendgate test machine CA");
    let (gw, addr, sa, _) = tls_gateway(&server_ca, &machine_ca, |_| {}).await;

    // Password over TLS, no client certificate.
    let s = tls_connect(addr, server_ca.client_config(None))
        .await
        .expect("TLS handshake");
    let (mut a, code) = RawClient::over(s).mqtt_connect(A, Some((A, &sa)), 30).await;
    assert_eq!(code, Some(ConnectReturnCode::Success));
    assert!(gw.online(A));
    // The session reads and writes through TLS after CONNECT too.
    a.send(Packet::PingReq).await;
    assert!(matches!(a.recv().await, Some(Packet::PingResp)));
    let mut p = Publish::new(
        format!("vend/v1/{A}/state"),
        QoS::AtLeastOnce,
        br#"{"online":true}"#.to_vec(),
    );
    p.pkid = 7;
    a.send(Packet::Publish(p)).await;
    assert!(matches!(a.recv().await, Some(Packet::PubAck(ack)) if ack.pkid == 7));

    // Client certificate, CN = B, no username or password at all.
    let cert_b = machine_ca.client(B);
    let s = tls_connect(addr, server_ca.client_config(Some(&cert_b)))
        .await
        .expect("TLS handshake with client certificate");
    let (mut b, code) = RawClient::over(s).mqtt_connect(B, None, 30).await;
    assert_eq!(code, Some(ConnectReturnCode::Success));
    assert!(gw.online(B));
    b.send(Packet::PingReq).await;
    assert!(matches!(b.recv().await, Some(Packet::PingResp)));

    // The certificate names the machine: another client id, an unprovisioned
    // number or a CN that is no machine number are refused.
    let refused: [(&str, &str); 3] = [(B, A), ("10009999", "10009999"), ("cashier-7", "cashier-7")];
    for (cn, client_id) in refused {
        let cert = machine_ca.client(cn);
        let s = tls_connect(addr, server_ca.client_config(Some(&cert)))
            .await
            .expect("TLS handshake");
        let (mut c, code) = RawClient::over(s).mqtt_connect(client_id, None, 30).await;
        assert_eq!(
            code,
            Some(ConnectReturnCode::NotAuthorized),
            "CN {cn} as {client_id}"
        );
        assert!(c.closed().await);
    }
    assert!(!gw.online("10009999"));

    // A certificate from a CA the gateway does not trust ends the handshake
    // (with TLS 1.3 the client learns it at its first read).
    let rogue = TestCa::new("rogue CA");
    let forged = rogue.client(A);
    if let Ok(s) = tls_connect(addr, server_ca.client_config(Some(&forged))).await {
        let (_c, code) = RawClient::over(s).mqtt_connect(A, None, 30).await;
        assert_eq!(code, None, "no CONNACK for an untrusted certificate");
    }
    // Plain MQTT on the TLS port is not a TLS handshake.
    let (_c, code) = RawClient::connect(addr, A, Some((A, &sa)), 30).await;
    assert_eq!(code, None);
    let stats = &gw.handle.hub.stats;
    wait_until("both handshake failures counted", || {
        stats.tls_handshake_failures.load(Ordering::Relaxed) >= 2
    })
    .await;
    // None of that disturbed the established TLS sessions or the plain listener.
    a.send(Packet::PingReq).await;
    assert!(matches!(a.recv().await, Some(Packet::PingResp)));
    let (u, pw) = gw.service("ops").await;
    let _svc = Client::connect(gw.mqtt_addr, "ops-1", &u, &pw).await;
    let metrics = gw.handle.exposition().await;
    assert!(
        metrics.contains("vendgate_mqtt_tls_handshake_failures_total"),
        "{metrics}"
    );
    gw.stop().await;
}

#[tokio::test]
async fn a_stalled_tls_handshake_is_cut_by_the_connect_timeout() {
    let server_ca = TestCa::new("vendgate test server CA");
    let machine_ca = TestCa::new("vendgate test machine CA");
    let (gw, addr, sa, _) = tls_gateway(&server_ca, &machine_ca, |s| {
        s.mqtt.connect_timeout = Duration::from_millis(300);
    })
    .await;
    // TCP open, no ClientHello: the gateway closes it on its own.
    let mut staller = RawClient::tcp(addr).await;
    // Meanwhile other clients complete their handshakes.
    let s = tls_connect(addr, server_ca.client_config(None))
        .await
        .expect("TLS handshake while another peer stalls");
    let (_a, code) = RawClient::over(s).mqtt_connect(A, Some((A, &sa)), 30).await;
    assert_eq!(code, Some(ConnectReturnCode::Success));
    assert!(staller.closed().await, "the staller is closed");
    let stats = &gw.handle.hub.stats;
    wait_until("connect timeout counted", || {
        stats.connect_timeouts.load(Ordering::Relaxed) >= 1
    })
    .await;
    gw.stop().await;
}

#[tokio::test]
async fn https_serves_the_api_and_refuses_plain_http() {
    let ca = TestCa::new("vendgate test server CA");
    let pki = tempfile::tempdir().expect("temp dir");
    let (cert, key) = ca.server().write(pki.path(), "http");
    let gw = TestGateway::start_with(|s| {
        s.http.tls = Some(HttpTlsSettings { cert, key });
    })
    .await;
    let (appid, secret) = gw.merchant("m").await;
    let http = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(ca.pem().as_bytes()).expect("CA"))
        .resolve("localhost", gw.http_addr)
        .build()
        .expect("client");
    let port = gw.http_addr.port();
    let r = http
        .get(format!("https://localhost:{port}/healthz"))
        .send()
        .await
        .expect("HTTPS request");
    assert!(r.status().is_success());
    let v: serde_json::Value = http
        .get(format!("https://localhost:{port}/api/openapi/v1/machines"))
        .header("Appid", &appid)
        .header("AppSecret", &secret)
        .send()
        .await
        .expect("HTTPS request")
        .json()
        .await
        .expect("envelope");
    assert_eq!(v["code"], 0, "{v}");
    // Plain HTTP to the HTTPS port gets no HTTP answer.
    let plain = reqwest::Client::new()
        .get(format!("http://127.0.0.1:{port}/healthz"))
        .timeout(vendgate_e2e::DEADLINE)
        .send()
        .await;
    assert!(plain.is_err(), "plain HTTP answered: {plain:?}");
    gw.stop().await;
}

#[tokio::test]
async fn plaintext_on_a_public_address_is_refused_at_start_up() {
    let dir = tempfile::tempdir().expect("temp dir");
    let public0 = SocketAddr::from(([0, 0, 0, 0], 0));
    let build = |tune: &dyn Fn(&mut Settings)| {
        let mut s = Settings::for_tests(dir.path());
        tune(&mut s);
        Gateway::build(s)
    };
    let err = build(&|s| s.mqtt.addr = public0)
        .await
        .err()
        .expect("plain MQTT on 0.0.0.0 refused")
        .to_string();
    assert!(
        err.contains("mqtt.addr") && err.contains("mqtt.allow_plaintext"),
        "{err}"
    );
    let err = build(&|s| s.http.addr = public0)
        .await
        .err()
        .expect("plain HTTP on 0.0.0.0 refused")
        .to_string();
    assert!(err.contains("http.allow_plaintext"), "{err}");
    let err = build(&|s| s.metrics.addr = Some(public0))
        .await
        .err()
        .expect("plain metrics on 0.0.0.0 refused")
        .to_string();
    assert!(err.contains("metrics.allow_plaintext"), "{err}");

    // Explicitly allowed, it starts.
    let gw = build(&|s| {
        s.mqtt.addr = public0;
        s.mqtt.allow_plaintext = true;
        s.http.addr = public0;
        s.http.allow_plaintext = true;
    })
    .await
    .expect("allowed plaintext starts");
    drop(gw);

    // HTTPS on a public address needs no allowance; a missing PEM file is
    // named in the error.
    let ca = TestCa::new("vendgate test server CA");
    let (cert, key) = ca.server().write(dir.path(), "http");
    let gw = build(&|s| {
        s.http.addr = public0;
        s.http.tls = Some(HttpTlsSettings {
            cert: cert.clone(),
            key: key.clone(),
        });
    })
    .await
    .expect("HTTPS on 0.0.0.0 starts");
    drop(gw);
    let err = build(&|s| {
        s.mqtt.tls = Some(MqttTlsSettings {
            addr: loopback0(),
            cert: dir.path().join("missing.pem"),
            key: key.clone(),
            client_ca: None,
        })
    })
    .await
    .err()
    .expect("missing certificate refused")
    .to_string();
    assert!(err.contains("[mqtt.tls]"), "{err}");
    let err = format!(
        "{:#}",
        build(&|s| {
            s.mqtt.tls = Some(MqttTlsSettings {
                addr: loopback0(),
                cert: dir.path().join("missing.pem"),
                key: key.clone(),
                client_ca: None,
            })
        })
        .await
        .err()
        .expect("missing certificate refused")
    );
    assert!(err.contains("missing.pem"), "{err}");
}
