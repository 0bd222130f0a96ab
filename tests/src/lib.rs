//! Test harness for end-to-end tests: a real gateway on loopback port 0 with a
//! fresh SQLite file in a temp dir (or, with `VENDGATE_TEST_DATABASE=postgres`,
//! a fresh PostgreSQL database: [`pg`]), provisioning helpers, a raw MQTT client
//! for protocol-level tests (over TCP or TLS), a test CA for TLS tests, and
//! condition waits with deadlines (no sleeps).

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::BytesMut;
use rumqttc::mqttbytes::v4::{ConnAck, Connect, ConnectReturnCode, Login, Packet};
use std::sync::Arc;

use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::task::JoinHandle;
use vendgate::secrets::{generate_secret, SecretHash};
use vendgate::storage::{NewMachine, NewMerchant, NewService};
use vendgate::{Gateway, GatewayHandle, Settings};
use vendgate_proto::machine::MachineNo;

/// The PostgreSQL fixture lives in the testkit crate (the gateway's cluster
/// tests use it too); re-exported so `vendgate_e2e::pg` keeps working.
pub use vendgate_testkit::pg;

/// Generous: the suite must pass on a loaded 2-core machine.
pub const DEADLINE: Duration = Duration::from_secs(15);

/// A running gateway for one test.
pub struct TestGateway {
    pub dir: tempfile::TempDir,
    pub mqtt_addr: SocketAddr,
    /// The MQTT TLS listener, when the test configured `[mqtt.tls]`.
    pub mqtt_tls_addr: Option<SocketAddr>,
    pub http_addr: SocketAddr,
    pub handle: GatewayHandle,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

impl TestGateway {
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(tune: impl FnOnce(&mut Settings)) -> Self {
        Self::start_in(tempfile::tempdir().expect("temp dir"), tune).await
    }

    /// Start on an existing data directory (a restart keeps the database).
    pub async fn start_in(dir: tempfile::TempDir, tune: impl FnOnce(&mut Settings)) -> Self {
        Self::start_on(on_postgres(), dir, tune).await
    }

    /// [`TestGateway::start_in`] on the backend given rather than the one
    /// [`on_postgres`] picks for this process: the order benchmark runs
    /// SQLite and PostgreSQL side by side in one run. On PostgreSQL the
    /// database's URL is in `dir/postgres-url`.
    pub async fn start_on(
        postgres: bool,
        dir: tempfile::TempDir,
        tune: impl FnOnce(&mut Settings),
    ) -> Self {
        init_logs();
        let mut settings = Settings::for_tests(dir.path());
        if postgres {
            settings.database_url = pg::database_for_dir(dir.path()).await;
        }
        tune(&mut settings);
        let gw = Gateway::build(settings).await.expect("gateway builds");
        let (mqtt_addr, http_addr, handle) = (gw.mqtt_addr(), gw.http_addr(), gw.handle());
        let mqtt_tls_addr = gw.mqtt_tls_addr();
        let task = tokio::spawn(gw.run());
        Self {
            dir,
            mqtt_addr,
            mqtt_tls_addr,
            http_addr,
            handle,
            task: Some(task),
        }
    }

    /// Create a merchant; returns (appid, appsecret).
    pub async fn merchant(&self, name: &str) -> (String, String) {
        self.create_merchant(name, None).await
    }

    /// Create a merchant with a webhook URL; returns (appid, appsecret).
    pub async fn merchant_with_url(&self, name: &str, notify_url: &str) -> (String, String) {
        self.create_merchant(name, Some(notify_url.into())).await
    }

    /// As `vendgate merchant add` does: the AppSecret hashed for API
    /// authentication and encrypted under the gateway's webhook key for
    /// signing.
    async fn create_merchant(&self, name: &str, notify_url: Option<String>) -> (String, String) {
        let appid = vendgate::secrets::generate_appid();
        let secret = generate_secret();
        self.handle
            .store
            .create_merchant(NewMerchant {
                name: name.into(),
                notify_url,
                appsecret_enc: Some(self.handle.webhook_key.encrypt(&appid, &secret)),
                appid: appid.clone(),
                appsecret_hash: SecretHash::new(&secret),
            })
            .await
            .expect("merchant");
        (appid, secret)
    }

    /// Provision a machine for `appid`; returns its secret.
    pub async fn machine(&self, appid: &str, machine_no: &str) -> String {
        let secret = generate_secret();
        self.handle
            .store
            .create_machine(NewMachine {
                machine_no: machine_no.parse().expect("machine_no"),
                merchant_appid: appid.into(),
                secret_hash: SecretHash::new(&secret),
            })
            .await
            .expect("machine");
        secret
    }

    /// Provision a service account; returns (username, password).
    pub async fn service(&self, name: &str) -> (String, String) {
        let username = format!("svc-{name}");
        let password = generate_secret();
        self.handle
            .store
            .create_service(NewService {
                name: name.into(),
                username: username.clone(),
                password_hash: SecretHash::new(&password),
            })
            .await
            .expect("service");
        (username, password)
    }

    pub fn online(&self, m: &str) -> bool {
        let m: MachineNo = m.parse().expect("machine_no");
        self.handle.presence.is_online(&m)
    }

    /// Stop the gateway and wait for it to finish.
    pub async fn stop(self) {
        let _ = self.stop_keep_dir().await;
    }

    /// Stop the gateway and hand back its data directory (for a restart).
    pub async fn stop_keep_dir(mut self) -> tempfile::TempDir {
        self.handle.shutdown.cancel();
        if let Some(t) = self.task.take() {
            let r = tokio::time::timeout(DEADLINE, t).await;
            assert!(matches!(r, Ok(Ok(Ok(())))), "gateway stops cleanly: {r:?}");
        }
        let placeholder = tempfile::tempdir().expect("temp dir");
        std::mem::replace(&mut self.dir, placeholder)
    }
}

impl Drop for TestGateway {
    fn drop(&mut self) {
        self.handle.shutdown.cancel();
    }
}

/// Whether this test process runs the gateway on PostgreSQL: when
/// `VENDGATE_TEST_DATABASE=postgres`, or for the `pg_*` test targets
/// (tests/Cargo.toml), which run the order, money and webhook tests a
/// second time on PostgreSQL within `cargo test --workspace`.
pub fn on_postgres() -> bool {
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

pub fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_test_writer()
        .try_init();
}

/// Wait until `cond` holds, checking after each `tick` of the runtime; panics
/// with `what` at the deadline. Used instead of sleeps as synchronisation.
pub async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Async variant of [`wait_until`].
pub async fn wait_until_async<F, Fut>(what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while !cond().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A byte-level MQTT 3.1.1 client for protocol tests, over TCP or TLS.
pub struct RawClient<S = TcpStream> {
    pub stream: S,
    buf: BytesMut,
}

impl RawClient<TcpStream> {
    pub async fn tcp(addr: SocketAddr) -> Self {
        let stream = TcpStream::connect(addr).await.expect("tcp connect");
        stream.set_nodelay(true).ok();
        Self::over(stream)
    }

    /// TCP from a chosen local address (any of 127.0.0.0/8 on Linux), so a
    /// test can play clients at different source addresses.
    pub async fn tcp_from(local: std::net::IpAddr, addr: SocketAddr) -> Self {
        let socket = TcpSocket::new_v4().expect("socket");
        socket
            .bind(SocketAddr::new(local, 0))
            .expect("bind local address");
        let stream = socket.connect(addr).await.expect("tcp connect");
        stream.set_nodelay(true).ok();
        Self::over(stream)
    }

    /// TCP + CONNECT; returns the client and the CONNACK code (None when the
    /// server closed without CONNACK).
    pub async fn connect(
        addr: SocketAddr,
        client_id: &str,
        login: Option<(&str, &str)>,
        keep_alive: u16,
    ) -> (Self, Option<ConnectReturnCode>) {
        Self::tcp(addr)
            .await
            .mqtt_connect(client_id, login, keep_alive)
            .await
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> RawClient<S> {
    pub fn over(stream: S) -> Self {
        Self {
            stream,
            buf: BytesMut::new(),
        }
    }

    /// Send CONNECT; returns the client and the CONNACK code (None when the
    /// server closed without CONNACK).
    pub async fn mqtt_connect(
        mut self,
        client_id: &str,
        login: Option<(&str, &str)>,
        keep_alive: u16,
    ) -> (Self, Option<ConnectReturnCode>) {
        let mut connect = Connect::new(client_id);
        connect.keep_alive = keep_alive;
        connect.login = login.map(|(u, p)| Login::new(u, p));
        self.send(Packet::Connect(connect)).await;
        let code = match self.recv().await {
            Some(Packet::ConnAck(ConnAck { code, .. })) => Some(code),
            _ => None,
        };
        (self, code)
    }

    pub async fn send(&mut self, p: Packet) {
        let mut out = BytesMut::new();
        p.write(&mut out, usize::MAX).expect("encode");
        self.send_raw(&out).await;
    }

    /// Write and flush (TLS buffers records until flushed).
    pub async fn send_raw(&mut self, bytes: &[u8]) {
        if self.stream.write_all(bytes).await.is_ok() {
            let _ = self.stream.flush().await;
        }
    }

    /// Next packet, or None when the connection closed (or nothing came before
    /// the deadline).
    pub async fn recv(&mut self) -> Option<Packet> {
        self.recv_within(DEADLINE).await
    }

    pub async fn recv_within(&mut self, limit: Duration) -> Option<Packet> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            match Packet::read(&mut self.buf, 1 << 20) {
                Ok(p) => return Some(p),
                Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => {}
                Err(_) => return None,
            }
            let mut chunk = [0u8; 4096];
            match tokio::time::timeout_at(deadline, self.stream.read(&mut chunk)).await {
                Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return None,
                Ok(Ok(n)) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// True when the server closes the connection before the deadline.
    pub async fn closed(&mut self) -> bool {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            let mut chunk = [0u8; 4096];
            match tokio::time::timeout_at(deadline, self.stream.read(&mut chunk)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                Ok(Ok(_)) => continue,
                Err(_) => return false,
            }
        }
    }
}

/// A throwaway certificate authority for TLS tests (rcgen, in memory).
pub struct TestCa {
    issuer: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
}

/// A certificate issued by a [`TestCa`], with its key.
pub struct Leaf {
    pub cert: CertificateDer<'static>,
    pub cert_pem: String,
    pub key_pem: String,
    key_der: Vec<u8>,
}

impl Leaf {
    pub fn key(&self) -> PrivateKeyDer<'static> {
        PrivatePkcs8KeyDer::from(self.key_der.clone()).into()
    }

    /// Write `{name}.pem` and `{name}.key` into `dir`; returns their paths.
    pub fn write(
        &self,
        dir: &std::path::Path,
        name: &str,
    ) -> (std::path::PathBuf, std::path::PathBuf) {
        let (c, k) = (
            dir.join(format!("{name}.pem")),
            dir.join(format!("{name}.key")),
        );
        std::fs::write(&c, &self.cert_pem).expect("write cert");
        std::fs::write(&k, &self.key_pem).expect("write key");
        (c, k)
    }
}

impl TestCa {
    pub fn new(name: &str) -> Self {
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA params");
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.distinguished_name = rcgen::DistinguishedName::new();
        p.distinguished_name.push(rcgen::DnType::CommonName, name);
        p.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let key = rcgen::KeyPair::generate().expect("CA key");
        Self {
            issuer: rcgen::CertifiedIssuer::self_signed(p, key).expect("CA certificate"),
        }
    }

    pub fn pem(&self) -> String {
        self.issuer.pem()
    }

    pub fn der(&self) -> CertificateDer<'static> {
        self.issuer.der().clone()
    }

    /// Write the CA certificate to `dir/{name}`; returns the path.
    pub fn write(&self, dir: &std::path::Path, name: &str) -> std::path::PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, self.pem()).expect("write CA");
        p
    }

    /// A server certificate for `localhost` and 127.0.0.1.
    pub fn server(&self) -> Leaf {
        self.issue(
            "localhost",
            vec!["localhost".into(), "127.0.0.1".into()],
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        )
    }

    /// A client certificate whose subject CN is `cn` (a machine_no).
    pub fn client(&self, cn: &str) -> Leaf {
        self.issue(cn, Vec::new(), rcgen::ExtendedKeyUsagePurpose::ClientAuth)
    }

    fn issue(&self, cn: &str, sans: Vec<String>, eku: rcgen::ExtendedKeyUsagePurpose) -> Leaf {
        let mut p = rcgen::CertificateParams::new(sans).expect("leaf params");
        p.distinguished_name = rcgen::DistinguishedName::new();
        p.distinguished_name.push(rcgen::DnType::CommonName, cn);
        p.extended_key_usages = vec![eku];
        let key = rcgen::KeyPair::generate().expect("leaf key");
        let cert = p.signed_by(&key, &self.issuer).expect("sign leaf");
        Leaf {
            cert: cert.der().clone(),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            key_der: key.serialize_der(),
        }
    }

    /// A client configuration trusting this CA, optionally presenting `client`.
    pub fn client_config(&self, client: Option<&Leaf>) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.der()).expect("trust CA");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_root_certificates(roots);
        Arc::new(match client {
            Some(l) => builder
                .with_client_auth_cert(vec![l.cert.clone()], l.key())
                .expect("client cert"),
            None => builder.with_no_client_auth(),
        })
    }
}

/// A TLS connection to `addr` as `localhost`; Err when the handshake fails.
pub async fn tls_connect(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true).ok();
    let name = ServerName::try_from("localhost").map_err(std::io::Error::other)?;
    tokio::time::timeout(
        DEADLINE,
        tokio_rustls::TlsConnector::from(config).connect(name, tcp),
    )
    .await
    .map_err(std::io::Error::other)?
}

/// A rumqttc client driven on its own task; received publishes and
/// connection events arrive on `events`.
pub struct Client {
    pub client: rumqttc::AsyncClient,
    pub events: tokio::sync::mpsc::UnboundedReceiver<ClientEvent>,
    task: JoinHandle<()>,
}

#[derive(Debug, Clone)]
pub enum ClientEvent {
    ConnAck(ConnectReturnCode),
    Publish {
        topic: String,
        payload: Vec<u8>,
        qos: rumqttc::QoS,
        retain: bool,
    },
    SubAck(Vec<rumqttc::mqttbytes::v4::SubscribeReasonCode>),
    PubAck(u16),
    Disconnected(String),
}

impl Client {
    /// Connect once (no automatic reconnect: the first error ends the task).
    pub async fn connect(addr: SocketAddr, client_id: &str, user: &str, pass: &str) -> Self {
        Self::connect_with(addr, client_id, user, pass, |_| {}).await
    }

    pub async fn connect_with(
        addr: SocketAddr,
        client_id: &str,
        user: &str,
        pass: &str,
        tune: impl FnOnce(&mut rumqttc::MqttOptions),
    ) -> Self {
        let mut o = rumqttc::MqttOptions::new(client_id, addr.ip().to_string(), addr.port());
        o.set_credentials(user, pass);
        o.set_keep_alive(Duration::from_secs(30));
        o.set_clean_session(true);
        tune(&mut o);
        let (client, mut el) = rumqttc::AsyncClient::new(o, 64);
        let (tx, events) = tokio::sync::mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            loop {
                match el.poll().await {
                    Ok(rumqttc::Event::Incoming(p)) => {
                        let ev = match p {
                            Packet::ConnAck(a) => ClientEvent::ConnAck(a.code),
                            Packet::Publish(p) => ClientEvent::Publish {
                                topic: p.topic,
                                payload: p.payload.to_vec(),
                                qos: p.qos,
                                retain: p.retain,
                            },
                            Packet::SubAck(s) => ClientEvent::SubAck(s.return_codes),
                            Packet::PubAck(a) => ClientEvent::PubAck(a.pkid),
                            _ => continue,
                        };
                        if tx.send(ev).is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        let _ = tx.send(ClientEvent::Disconnected(e.to_string()));
                        return;
                    }
                }
            }
        });
        let mut c = Self {
            client,
            events,
            task,
        };
        match c.next().await {
            Some(ClientEvent::ConnAck(ConnectReturnCode::Success)) => {}
            other => panic!("{client_id}: expected CONNACK success, got {other:?}"),
        }
        c
    }

    pub async fn next(&mut self) -> Option<ClientEvent> {
        tokio::time::timeout(DEADLINE, self.events.recv())
            .await
            .ok()
            .flatten()
    }

    /// Next publish, skipping acks; None if the connection ended or deadline.
    pub async fn next_publish(&mut self) -> Option<(String, Vec<u8>, bool)> {
        loop {
            match self.next().await? {
                ClientEvent::Publish {
                    topic,
                    payload,
                    retain,
                    ..
                } => return Some((topic, payload, retain)),
                ClientEvent::Disconnected(_) => return None,
                _ => {}
            }
        }
    }

    /// Subscribe and wait for the SUBACK's return codes.
    pub async fn subscribe(
        &mut self,
        filter: &str,
        qos: rumqttc::QoS,
    ) -> Vec<rumqttc::mqttbytes::v4::SubscribeReasonCode> {
        self.client
            .subscribe(filter, qos)
            .await
            .expect("subscribe queued");
        loop {
            match self.next().await {
                Some(ClientEvent::SubAck(codes)) => return codes,
                Some(ClientEvent::Disconnected(e)) => panic!("disconnected while subscribing: {e}"),
                Some(_) => {}
                None => panic!("no SUBACK for {filter}"),
            }
        }
    }

    /// Wait until the connection ends; returns the error text.
    pub async fn wait_disconnected(&mut self) -> Option<String> {
        loop {
            if let ClientEvent::Disconnected(e) = self.next().await? {
                return Some(e);
            }
        }
    }

    pub fn abort(&self) {
        self.task.abort();
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// An HTTP client for the open API of one test gateway.
#[derive(Clone)]
pub struct Api {
    pub base: String,
    pub http: reqwest::Client,
    pub appid: String,
    pub secret: String,
}

impl Api {
    pub fn new(gw: &TestGateway, appid: &str, secret: &str) -> Self {
        Self {
            base: format!("http://{}/api/openapi/v1", gw.http_addr),
            http: reqwest::Client::new(),
            appid: appid.into(),
            secret: secret.into(),
        }
    }

    /// POST a raw body (no Content-Type, like the published examples).
    pub async fn post_raw(
        &self,
        path: &str,
        body: impl Into<reqwest::Body>,
    ) -> (u16, serde_json::Value) {
        let r = self
            .http
            .post(format!("{}{path}", self.base))
            .header("Appid", &self.appid)
            .header("AppSecret", &self.secret)
            .body(body)
            .send()
            .await
            .expect("request");
        let status = r.status().as_u16();
        (status, r.json().await.expect("JSON envelope"))
    }

    pub async fn order(&self, machine_no: &str, products: &[(i64, u32)]) -> serde_json::Value {
        let products: Vec<_> = products
            .iter()
            .map(|(p, q)| serde_json::json!({ "product_id": p, "quantity": q }))
            .collect();
        let body = serde_json::json!({ "machine_no": machine_no, "products": products });
        self.post_raw("/orders", body.to_string()).await.1
    }

    pub async fn get(&self, path: &str) -> serde_json::Value {
        let r = self
            .http
            .get(format!("{}{path}", self.base))
            .header("Appid", &self.appid)
            .header("AppSecret", &self.secret)
            .send()
            .await
            .expect("request");
        r.json().await.expect("JSON envelope")
    }

    pub async fn order_status(&self, order_id: u64) -> String {
        let v = self.get(&format!("/orders/{order_id}")).await;
        v["data"]["status"].as_str().unwrap_or("").to_string()
    }

    /// Wait until the order reaches `status`.
    pub async fn wait_status(&self, order_id: u64, status: &str) -> serde_json::Value {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            let v = self.get(&format!("/orders/{order_id}")).await;
            if v["data"]["status"] == status {
                return v;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "order {order_id} never reached {status}: {v}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// Start a simulated machine and wait until the gateway can use it: connected,
/// subscribed to its commands (a ping round trip proves it) and its inventory
/// received.
pub async fn ready_sim(
    gw: &TestGateway,
    config: vendgate_sim::SimConfig,
) -> vendgate_sim::SimHandle {
    let m = config.machine_no;
    let expect_stock = !config.inventory.is_empty();
    let sim = vendgate_sim::SimMachine::spawn(config);
    assert!(sim.wait_connected(DEADLINE).await, "{m} connects");
    let commands = gw.handle.commands.clone();
    wait_until_async("machine answers pings", || {
        let c = commands.clone();
        async move { c.ping(&m, Duration::from_millis(500)).await.is_ok() }
    })
    .await;
    if expect_stock {
        wait_until("inventory received", || {
            !gw.handle.orders.inventory.view(&m).is_empty()
        })
        .await;
    }
    sim
}

pub fn sim_config(gw: &TestGateway, machine_no: &str, secret: &str) -> vendgate_sim::SimConfig {
    let mut c = vendgate_sim::SimConfig::new(
        gw.mqtt_addr.to_string(),
        machine_no.parse().expect("machine_no"),
        secret,
    );
    c.inventory = vec![
        vendgate_proto::msg::InventoryItem {
            product_id: 1,
            stock: 10,
            price: 350,
        },
        vendgate_proto::msg::InventoryItem {
            product_id: 2,
            stock: 5,
            price: 200,
        },
    ];
    c
}

/// A hand-driven machine for tests that need to choose exactly when it acks
/// and publishes results: connected with its secret, subscribed to its
/// commands, and with product 1 (`stock` at `price` fen) reported to and
/// seen by the gateway.
pub async fn hand_machine(
    gw: &TestGateway,
    machine_no: &str,
    secret: &str,
    stock: u32,
    price: i64,
) -> Client {
    let mut mach = Client::connect(gw.mqtt_addr, machine_no, machine_no, secret).await;
    mach.subscribe(
        &format!("vend/v1/{machine_no}/cmd/#"),
        rumqttc::QoS::AtLeastOnce,
    )
    .await;
    let inventory = format!(r#"{{"items":[{{"product_id":1,"stock":{stock},"price":{price}}}]}}"#);
    mach.client
        .publish(
            format!("vend/v1/{machine_no}/inventory"),
            rumqttc::QoS::AtLeastOnce,
            false,
            inventory,
        )
        .await
        .expect("inventory queued");
    let m: MachineNo = machine_no.parse().expect("machine_no");
    wait_until("inventory seen by the gateway", || {
        !gw.handle.orders.inventory.view(&m).is_empty()
    })
    .await;
    mach
}

/// The `p` quantile (0..=1) of sorted durations, in milliseconds (benches).
pub fn percentile_ms(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)].as_secs_f64() * 1000.0
}

/// Faults injected into a test gateway's real database: a trigger makes
/// chosen writes fail inside the database, as a full disk or a broken
/// connection would, so the gateway's storage layer sees a real error.
pub struct StorageFaults {
    url: String,
}

impl StorageFaults {
    pub async fn open(gw: &TestGateway) -> Self {
        let s = &gw.handle.settings;
        let url = match s.sqlite_path() {
            Some(path) => format!("sqlite://{}", path.display()),
            None => s.database_url.clone(),
        };
        Self { url }
    }

    fn postgres(&self) -> bool {
        self.url.starts_with("postgres")
    }

    async fn execute(&self, statements: &[&str]) {
        use sqlx::Connection;
        if self.postgres() {
            let mut c = sqlx::PgConnection::connect(&self.url)
                .await
                .expect("connect to the test database");
            for q in statements {
                sqlx::query(q).execute(&mut c).await.expect(q);
            }
        } else {
            let mut c = sqlx::SqliteConnection::connect(&self.url)
                .await
                .expect("open the test database");
            for q in statements {
                sqlx::query(q).execute(&mut c).await.expect(q);
            }
        }
    }

    /// Every write that would record an order's acceptance (its status to
    /// `dispensing`) fails until [`StorageFaults::heal`].
    pub async fn fail_acceptances(&self) {
        if self.postgres() {
            self.execute(&[
                "CREATE OR REPLACE FUNCTION vg_fault() RETURNS trigger AS $$ \
                 BEGIN RAISE EXCEPTION 'injected fault'; END $$ LANGUAGE plpgsql",
                "CREATE TRIGGER vg_fault_accept BEFORE UPDATE ON orders FOR EACH ROW \
                 WHEN (NEW.status = 'dispensing') EXECUTE FUNCTION vg_fault()",
            ])
            .await;
        } else {
            self.execute(&[
                "CREATE TRIGGER vg_fault_accept BEFORE UPDATE OF status ON orders \
                 WHEN NEW.status = 'dispensing' BEGIN SELECT RAISE(ABORT, 'injected fault'); END",
            ])
            .await;
        }
    }

    /// Storage works again.
    pub async fn heal(&self) {
        if self.postgres() {
            self.execute(&["DROP TRIGGER IF EXISTS vg_fault_accept ON orders"])
                .await;
        } else {
            self.execute(&["DROP TRIGGER IF EXISTS vg_fault_accept"])
                .await;
        }
    }
}
