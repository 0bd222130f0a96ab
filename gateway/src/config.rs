//! Typed settings: built-in defaults, then an optional TOML file, then
//! `VENDGATE_…` environment variables (`__` separates nested keys), then
//! command-line flags. Secrets in here are never printed.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};

/// Every setting of the gateway.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// Directory for the embedded database and other state.
    pub data_dir: PathBuf,
    /// Database location; empty means `sqlite://{data_dir}/vendgate.db`.
    pub database_url: String,
    pub mqtt: MqttSettings,
    pub http: HttpSettings,
    pub orders: OrderSettings,
    pub notifier: NotifierSettings,
    pub log: LogSettings,
    /// `GET /metrics`: on the HTTP listener, or on its own listener.
    pub metrics: MetricsSettings,
    /// The operator credential of the dashboard.
    pub operator: OperatorSettings,
    /// Service accounts from configuration (in addition to those provisioned
    /// with `vendgate service add`).
    pub services: Vec<ServiceCredential>,
    /// Several nodes on NATS and PostgreSQL; off unless `nats_urls` is set.
    pub cluster: ClusterSettings,
    /// Database connection pool (PostgreSQL).
    pub database: DatabaseSettings,
    /// Bounds on argon2 password checks (dashboard and service logins).
    pub argon2: Argon2Settings,
    /// How long finished orders and webhook rows are kept.
    pub retention: RetentionSettings,
}

/// Cluster mode (docs/scale-out.md). The NATS client settings are chosen for
/// fast failure detection: a frozen server is noticed after about three
/// pings, and a reconnect does not wait on a hung server for long.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterSettings {
    /// Every NATS server of the cluster (the client fails over between
    /// them); empty: single node, the default.
    pub nats_urls: Vec<String>,
    /// This node's id, unique in the cluster; empty: the host name.
    pub node_id: String,
    /// First token of every subject, so clusters can share NATS.
    pub subject_prefix: String,
    /// Optional NATS credentials.
    pub nats_user: Option<String>,
    pub nats_password: Option<String>,
    /// NATS client ping: a frozen server is noticed after ~3 of these.
    #[serde(with = "humantime_serde")]
    pub nats_ping_interval: Duration,
    /// Longest wait to connect to one NATS server before trying the next.
    #[serde(with = "humantime_serde")]
    pub nats_connection_timeout: Duration,
    /// How long an order forwarded to the owning node waits for its answer
    /// beyond `orders.accept_timeout`; past it the order is treated like a
    /// missing ack (30002, cancel owed).
    #[serde(with = "humantime_serde")]
    pub owner_answer_slack: Duration,
    /// How long "no responders" (the machine just moved; the new owner's
    /// subscription is not visible yet) is retried before 30002.
    #[serde(with = "humantime_serde")]
    pub no_responders_retry: Duration,
    /// Node heartbeat to PostgreSQL and NATS.
    #[serde(with = "humantime_serde")]
    pub heartbeat_interval: Duration,
    /// A node whose heartbeat is older than this is dead: another node
    /// offlines its machines (they re-home through the load balancer).
    #[serde(with = "humantime_serde")]
    pub node_dead_after: Duration,
    /// Forward every machine uplink to the other nodes' hubs, so service
    /// clients on any node see every machine.
    pub forward_uplinks: bool,
}

impl Default for ClusterSettings {
    fn default() -> Self {
        Self {
            nats_urls: Vec::new(),
            node_id: String::new(),
            subject_prefix: "vendgate".into(),
            nats_user: None,
            nats_password: None,
            nats_ping_interval: Duration::from_secs(1),
            nats_connection_timeout: Duration::from_secs(1),
            owner_answer_slack: Duration::from_secs(2),
            no_responders_retry: Duration::from_secs(1),
            heartbeat_interval: Duration::from_secs(1),
            node_dead_after: Duration::from_secs(5),
            forward_uplinks: true,
        }
    }
}

impl ClusterSettings {
    pub fn enabled(&self) -> bool {
        !self.nats_urls.is_empty()
    }
}

/// The PostgreSQL pool (SQLite uses one writer and a few readers of its own).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DatabaseSettings {
    /// Most connections the pool opens.
    pub max_connections: u32,
    /// How long a query waits for a free connection, and how long a
    /// connection attempt may take, before the operation fails (50000):
    /// with the database down, orders fail fast instead of hanging.
    #[serde(with = "humantime_serde")]
    pub acquire_timeout: Duration,
}

impl Default for DatabaseSettings {
    fn default() -> Self {
        Self {
            max_connections: 16,
            acquire_timeout: Duration::from_secs(2),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MqttSettings {
    /// Machine-facing MQTT 3.1.1 listener. Port 0 picks a free port.
    pub addr: SocketAddr,
    /// Largest MQTT packet accepted (remaining length), bytes.
    pub max_packet_size: usize,
    /// A CONNECT must arrive this soon after the TCP accept.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Idle limit for a client that asked for keep alive 0 (MQTT allows it for
    /// service clients; a machine must not be able to hide its death).
    #[serde(with = "humantime_serde")]
    pub machine_max_idle: Duration,
    /// Outbound messages waiting for one connection before it is treated as a
    /// slow consumer and closed.
    pub outbound_queue: usize,
    /// Per connection: unacknowledged QoS 1/2 messages in flight to the
    /// client (beyond wait), and the client's QoS 2 publishes not yet
    /// released (beyond closes the connection).
    pub max_inflight: u16,
    /// Retained messages the hub keeps (oldest topics are not evicted: new ones
    /// beyond the cap are refused and counted).
    pub max_retained: usize,
    /// Topic filters no client may subscribe to: a SUBSCRIBE whose filter
    /// could match any topic one of these matches is answered 0x80.
    pub deny_filters: Vec<String>,
    /// QoS 1/2 messages queued for a service's persistent session
    /// (clean_session = 0) while it is away; beyond are dropped and counted.
    pub session_max_queued: usize,
    /// No effect: a machine never keeps a session between connections
    /// (PROTOCOL.md, gateway rule 8; clean_session = 0 is served as 1).
    /// Accepted so that existing configuration files still load.
    pub machine_session_max_queued: usize,
    /// A persistent session whose client stays away this long is discarded.
    #[serde(with = "humantime_serde")]
    pub session_expiry: Duration,
    /// PUBLISH packets per second a machine may send (token bucket); a
    /// machine over it is disconnected and counted. 0 disables the limit.
    pub machine_publish_rate: u32,
    /// The bucket's size: publishes a machine may send at once.
    pub machine_publish_burst: u32,
    /// Serve plain (unencrypted) MQTT on `addr` even when it is not a
    /// loopback address. Without it start-up refuses such an address.
    pub allow_plaintext: bool,
    /// MQTT over TLS on a listener of its own (usually port 8883).
    pub tls: Option<MqttTlsSettings>,
    /// Open connections (plain and TLS together, before and after CONNECT);
    /// beyond, a new connection is closed at once. 0 disables.
    pub max_connections: usize,
    /// New connections accepted per second (token bucket), so a flood of
    /// connects cannot exhaust the handshake and authentication path; beyond,
    /// a new connection is closed at once. 0 disables.
    pub accept_rate: u32,
    /// Connections accepted at once before `accept_rate` applies (a fleet
    /// reconnecting after an outage).
    pub accept_burst: u32,
    /// Failed-authentication throttling (brute-force protection).
    pub auth_throttle: AuthThrottleSettings,
    /// Open connections from one source address (IPv6: one /64), checked
    /// before `max_connections`; beyond, a new one is closed at once. 0
    /// disables.
    pub max_connections_per_address: usize,
    /// New connections per second from one source address (IPv6: one /64),
    /// checked before `accept_rate`, so one host cannot spend the shared
    /// bucket every machine reconnects through. 0 disables.
    pub accept_rate_per_address: u32,
    /// Connections one address may open at once before
    /// `accept_rate_per_address` applies.
    pub accept_burst_per_address: u32,
    /// Source addresses tracked at most by the per-address limits and the
    /// refusal-log limiter (memory bound); idle entries are pruned first.
    pub max_tracked_addresses: usize,
    /// Largest CONNECT packet accepted before authentication: the read
    /// buffer of a connection that has not authenticated yet is bounded by
    /// this, not by `max_packet_size`.
    pub max_connect_size: usize,
    /// Bytes one machine connection may hold: its read buffer, messages
    /// queued or in flight to it (QoS 0 included), retained messages replayed
    /// to it and its subscriptions. Over it the connection is closed and
    /// counted (`memory_budget`); nothing is allocated past it.
    pub machine_connection_memory: usize,
    /// The same for a service connection, and for a service's parked
    /// persistent session.
    pub service_connection_memory: usize,
    /// Subscriptions one machine session may hold (a machine needs one or
    /// two under its own prefix); a filter beyond gets SUBACK 0x80.
    pub machine_max_subscriptions: usize,
    /// Subscriptions one service session may hold; beyond gets 0x80.
    pub max_subscriptions: usize,
    /// Bytes of topic filters one session may hold; beyond gets 0x80.
    pub max_subscription_bytes: usize,
    /// Bytes (topic + payload) of all retained messages together; a new
    /// retained topic beyond is refused and counted.
    pub max_retained_bytes: usize,
    /// Bytes (topic + payload) of one retained message; a larger one is
    /// delivered but not retained, and counted.
    pub max_retained_message_size: usize,
}

/// `[mqtt.tls]`: the TLS listener. PEM files are read at start-up.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MqttTlsSettings {
    pub addr: SocketAddr,
    /// Certificate chain, leaf first.
    pub cert: PathBuf,
    /// Private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// CA certificates that sign machines' client certificates. Set, a
    /// machine may authenticate with a certificate whose subject CN is its
    /// machine_no instead of a password; unset, no certificate is asked for.
    pub client_ca: Option<PathBuf>,
}

impl Default for MqttTlsSettings {
    fn default() -> Self {
        Self {
            addr: SocketAddr::from(([0, 0, 0, 0], 8883)),
            cert: PathBuf::new(),
            key: PathBuf::new(),
            client_ca: None,
        }
    }
}

/// `[mqtt.auth_throttle]`: after `max_failures_per_*` failed CONNECTs
/// within `window`, further CONNECTs from that address (or for that
/// username) are refused with CONNACK 5 without checking the password, for
/// `cooldown`, doubling with each repeat up to `max_cooldown`. Refused
/// attempts do not count as failures, so a real machine retrying with its
/// right password gets in once the cooldown ends.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthThrottleSettings {
    /// Per source address (IPv6: per /64). Generous, because many machines
    /// may share one address behind a carrier NAT. 0 disables.
    pub max_failures_per_address: u32,
    /// Per username (a machine_no or a service account). 0 disables.
    pub max_failures_per_username: u32,
    #[serde(with = "humantime_serde")]
    pub window: Duration,
    #[serde(with = "humantime_serde")]
    pub cooldown: Duration,
    #[serde(with = "humantime_serde")]
    pub max_cooldown: Duration,
    /// Addresses and usernames tracked at most (memory bound under a
    /// distributed attack); idle entries are pruned first.
    pub max_tracked: usize,
}

impl Default for AuthThrottleSettings {
    fn default() -> Self {
        Self {
            max_failures_per_address: 20,
            max_failures_per_username: 5,
            window: Duration::from_secs(60),
            cooldown: Duration::from_secs(10),
            max_cooldown: Duration::from_secs(300),
            max_tracked: 100_000,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpSettings {
    pub addr: SocketAddr,
    /// `ok` (default): every enveloped answer is HTTP 200, as the published
    /// PHP/Guzzle example needs; `mirror`: 400/401/404/409/429/503 by code.
    pub http_status: HttpStatusMode,
    /// Largest request body accepted, bytes.
    pub max_body: usize,
    /// Requests per second per merchant (10003 beyond); 0 disables.
    pub rate_limit: u32,
    /// Requests a merchant may send at once before the rate applies.
    pub rate_burst: u32,
    /// Serve plain HTTP on `addr` even when it is not a loopback address.
    /// Without it (and without `[http.tls]`) start-up refuses such an address.
    pub allow_plaintext: bool,
    /// Set: `addr` serves HTTPS only.
    pub tls: Option<HttpTlsSettings>,
    /// A request's headers must have arrived this soon after the connection
    /// opened or its previous answer was sent (so also the keep-alive idle
    /// limit); beyond, the connection is closed.
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// A request (body included) must be answered this soon after its
    /// headers arrived; beyond, the answer is 50000 (503 outside the API).
    /// Must exceed `orders.accept_timeout` plus `cluster.owner_answer_slack`.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Open connections (plain or TLS, handshakes included); beyond, a new
    /// one is closed at once. 0 disables.
    pub max_connections: usize,
    /// Open connections from one source address (IPv6: one /64); beyond, a
    /// new one is closed at once. 0 disables (behind a proxy every
    /// connection has the proxy's address).
    pub max_connections_per_address: usize,
    /// A TLS handshake must be done this soon after the TCP accept.
    #[serde(with = "humantime_serde")]
    pub tls_handshake_timeout: Duration,
    /// TLS handshakes in progress at once; a connection that finds none free
    /// waits for one within its `tls_handshake_timeout`.
    pub max_tls_handshakes: usize,
    /// Failed dashboard sign-ins (HTTP Basic) throttled per source address
    /// and per username, like MQTT CONNECTs.
    pub login_throttle: AuthThrottleSettings,
}

/// `[argon2]`: the password checks of dashboard sign-ins and `[[services]]`
/// MQTT logins against argon2id hashes. Each kind has its own lane so a
/// flood of one cannot delay the other; each lane runs `concurrency`
/// checks at once (19 MiB each) with at most `max_waiting` more waiting.
/// A login that finds the line full, or waits longer than its bound, is
/// answered "busy" (dashboard 503, MQTT CONNACK 3) instead of queueing.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Argon2Settings {
    /// Checks running at once, per lane.
    pub concurrency: usize,
    /// Checks waiting for a slot, per lane.
    pub max_waiting: usize,
    /// Longest wait for a slot of a dashboard sign-in. An MQTT service login
    /// waits at most `mqtt.connect_timeout`.
    #[serde(with = "humantime_serde")]
    pub max_wait: Duration,
}

impl Default for Argon2Settings {
    fn default() -> Self {
        Self {
            concurrency: 1,
            max_waiting: 8,
            max_wait: Duration::from_secs(2),
        }
    }
}

/// `[http.tls]`: HTTPS on the HTTP listener. PEM files read at start-up.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpTlsSettings {
    /// Certificate chain, leaf first.
    pub cert: PathBuf,
    /// Private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum HttpStatusMode {
    Ok,
    Mirror,
}

/// Kept free at the end of `orders.request_timeout` for the answer to be
/// written after the last decision (a storage write, the HTTP response).
pub const ANSWER_MARGIN: Duration = Duration::from_millis(500);

/// Order handling.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OrderSettings {
    /// How long a machine has to `ack` a dispense command; also the command's
    /// `ttl_ms`. The acceptance counts only if recorded within this of the
    /// order's insert (its `accept_by`).
    #[serde(with = "humantime_serde")]
    pub accept_timeout: Duration,
    /// Every order request (place, pay) is answered within this: at least
    /// `accept_timeout` plus 0.5 s (plus `cluster.owner_answer_slack` in
    /// cluster mode). An order that cannot be sent with `accept_timeout` to
    /// spare is answered 30003 and never sent.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// An accepted order with no `result` by then becomes `unknown`.
    #[serde(with = "humantime_serde")]
    pub dispense_timeout: Duration,
    /// Orders waiting behind the one in flight, per machine (30003 beyond).
    pub queue_depth: usize,
    /// Most lines in one order (20003 beyond).
    pub max_lines: usize,
    /// Largest quantity of one line (20003 beyond).
    pub max_quantity: u32,
    /// A `pay_later` order unpaid this long expires and its goods go back
    /// to the machine's free stock.
    #[serde(with = "humantime_serde")]
    pub unpaid_timeout: Duration,
    /// Open unpaid orders one merchant may hold (30004 beyond), so a stolen
    /// key cannot hoard stock.
    pub max_unpaid_per_merchant: u64,
    /// Open unpaid orders on one machine (30004 beyond).
    pub max_unpaid_per_machine: u64,
}

impl Default for OrderSettings {
    fn default() -> Self {
        Self {
            accept_timeout: Duration::from_secs(3),
            request_timeout: Duration::from_secs(6),
            dispense_timeout: Duration::from_secs(60),
            queue_depth: 8,
            max_lines: 20,
            max_quantity: 99,
            unpaid_timeout: Duration::from_secs(20 * 60),
            max_unpaid_per_merchant: 1000,
            max_unpaid_per_machine: 8,
        }
    }
}

/// Webhook delivery (API.md "Notifications to the merchant").
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NotifierSettings {
    /// The key that encrypts merchants' AppSecrets (for signing); empty
    /// means `{data_dir}/webhook.key`. Created (mode 0600) if missing.
    pub key_file: Option<PathBuf>,
    /// One delivery attempt, connect to last byte of the answer.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// How long a failing event is retried before it goes dead (API.md
    /// promises at least 24 hours).
    #[serde(with = "humantime_serde")]
    pub retry_for: Duration,
    /// Exponential backoff with full jitter: the n-th retry waits a random
    /// time up to min(backoff_cap, backoff_base × 2^(n-1)).
    #[serde(with = "humantime_serde")]
    pub backoff_base: Duration,
    #[serde(with = "humantime_serde")]
    pub backoff_cap: Duration,
    /// Deliveries in flight to one merchant at once.
    pub per_merchant_concurrency: usize,
    /// Deliveries in flight in total.
    pub concurrency: usize,
    /// How often the outbox is checked for due events when nothing wakes
    /// the notifier (events written by other processes, retries coming due).
    #[serde(with = "humantime_serde")]
    pub poll_interval: Duration,
    /// Deliver to loopback, private, link-local and metadata addresses too.
    /// For tests and development only: it lets a notify_url reach the
    /// gateway's own network.
    pub allow_private_targets: bool,
}

impl Default for NotifierSettings {
    fn default() -> Self {
        Self {
            key_file: None,
            timeout: Duration::from_secs(10),
            retry_for: Duration::from_secs(25 * 3600),
            backoff_base: Duration::from_secs(1),
            backoff_cap: Duration::from_secs(3600),
            per_merchant_concurrency: 4,
            concurrency: 64,
            poll_interval: Duration::from_millis(200),
            allow_private_targets: false,
        }
    }
}

/// The background purge (README "Retention"). A duration of 0 keeps that
/// kind forever.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetentionSettings {
    /// Final orders (with their lines and timeline) are deleted this long
    /// after their last change.
    #[serde(with = "humantime_serde")]
    pub orders: Duration,
    /// Orders that may still matter to money or stock (`unknown`;
    /// `rejected` with goods reported out; a refund owed and not recorded;
    /// a cancel owed) are kept at least this long, whatever `orders` says.
    #[serde(with = "humantime_serde")]
    pub protected_orders: Duration,
    /// Delivered and dead webhook rows (with their attempts) are deleted
    /// this long after they were written.
    #[serde(with = "humantime_serde")]
    pub webhooks: Duration,
    /// How often the purge runs.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// Rows (orders, or webhook rows) deleted per transaction.
    pub batch_size: usize,
    /// Pause between two batches, so other writers get the database.
    #[serde(with = "humantime_serde")]
    pub batch_pause: Duration,
}

impl Default for RetentionSettings {
    fn default() -> Self {
        const DAY: u64 = 24 * 3600;
        Self {
            orders: Duration::from_secs(180 * DAY),
            protected_orders: Duration::from_secs(90 * DAY),
            webhooks: Duration::from_secs(30 * DAY),
            interval: Duration::from_secs(3600),
            batch_size: 500,
            batch_pause: Duration::from_millis(100),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogSettings {
    /// `text` or `json`.
    pub format: LogFormat,
    /// Default filter when `RUST_LOG` is unset.
    pub level: String,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// A service (integration / operator tool) MQTT credential from config.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceCredential {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for ServiceCredential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceCredential")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("./data"),
            database_url: String::new(),
            mqtt: MqttSettings::default(),
            http: HttpSettings::default(),
            orders: OrderSettings::default(),
            notifier: NotifierSettings::default(),
            log: LogSettings::default(),
            metrics: MetricsSettings::default(),
            operator: OperatorSettings::default(),
            services: Vec::new(),
            cluster: ClusterSettings::default(),
            database: DatabaseSettings::default(),
            argon2: Argon2Settings::default(),
            retention: RetentionSettings::default(),
        }
    }
}

impl Default for MqttSettings {
    fn default() -> Self {
        Self {
            // Plain listeners default to loopback: a public one needs TLS or
            // an explicit `allow_plaintext`.
            addr: SocketAddr::from(([127, 0, 0, 1], 1883)),
            max_packet_size: 64 * 1024,
            connect_timeout: Duration::from_secs(5),
            machine_max_idle: Duration::from_secs(90),
            outbound_queue: 1024,
            max_inflight: 100,
            max_retained: 200_000,
            deny_filters: Vec::new(),
            session_max_queued: 1000,
            machine_session_max_queued: 0,
            session_expiry: Duration::from_secs(3600),
            machine_publish_rate: 50,
            machine_publish_burst: 200,
            allow_plaintext: false,
            tls: None,
            max_connections: 50_000,
            accept_rate: 1_000,
            accept_burst: 20_000,
            auth_throttle: AuthThrottleSettings::default(),
            max_connections_per_address: 5_000,
            accept_rate_per_address: 100,
            accept_burst_per_address: 1_000,
            max_tracked_addresses: 100_000,
            max_connect_size: 4 * 1024,
            machine_connection_memory: 1024 * 1024,
            service_connection_memory: 64 * 1024 * 1024,
            machine_max_subscriptions: 8,
            max_subscriptions: 1_000,
            max_subscription_bytes: 64 * 1024,
            max_retained_bytes: 256 * 1024 * 1024,
            max_retained_message_size: 32 * 1024,
        }
    }
}

impl Default for HttpSettings {
    fn default() -> Self {
        Self {
            addr: SocketAddr::from(([127, 0, 0, 1], 8080)),
            http_status: HttpStatusMode::Ok,
            max_body: 64 * 1024,
            rate_limit: 200,
            rate_burst: 400,
            allow_plaintext: false,
            tls: None,
            header_read_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(30),
            max_connections: 10_000,
            max_connections_per_address: 256,
            tls_handshake_timeout: Duration::from_secs(5),
            max_tls_handshakes: 256,
            // One operator username: its limit is a limit on all guessing,
            // so no lower than an operator mistyping a few times.
            login_throttle: AuthThrottleSettings {
                max_failures_per_address: 10,
                max_failures_per_username: 10,
                ..AuthThrottleSettings::default()
            },
        }
    }
}

impl Default for LogSettings {
    fn default() -> Self {
        Self {
            format: LogFormat::Text,
            level: "info".into(),
        }
    }
}

/// Where `GET /metrics` is served.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsSettings {
    /// A separate admin listener for `/metrics`, `/healthz` and `/readyz`
    /// (keeps them off a public API address). Unset: `/metrics` is served on
    /// the HTTP listener.
    pub addr: Option<SocketAddr>,
    /// Allow `addr` (plain HTTP) on a non-loopback address.
    pub allow_plaintext: bool,
}

/// The operator credential (HTTP Basic) of `/dashboard`. The dashboard is
/// refused while either is empty.
#[derive(Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OperatorSettings {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for OperatorSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OperatorSettings")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// Command-line overrides, applied last.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub data_dir: Option<PathBuf>,
    pub mqtt_addr: Option<SocketAddr>,
    pub http_addr: Option<SocketAddr>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration: {0}")]
    Invalid(#[from] Box<figment::Error>),
    #[error("configuration file {0} does not exist")]
    MissingFile(PathBuf),
    #[error("configuration: mqtt.deny_filters: {0:?} is not a valid MQTT topic filter")]
    DenyFilter(String),
    #[error(
        "{listener} listener {setting} = {addr} would serve plaintext on a non-loopback address; \
         set {allow} = true (env {env}=true) to allow it, or bind it to 127.0.0.1{tls_hint}"
    )]
    Plaintext {
        listener: &'static str,
        setting: &'static str,
        addr: SocketAddr,
        allow: &'static str,
        env: &'static str,
        tls_hint: &'static str,
    },
    #[error("{0} is set but empty: give the PEM file's path")]
    MissingPem(&'static str),
    #[error("retention.batch_size = {0} must be between 1 and 10000")]
    RetentionBatch(usize),
    #[error("retention.interval must be at least 1 s")]
    RetentionInterval,
    #[error(
        "orders.request_timeout = {request_timeout:?} is below {least:?}: it must leave room for \
         orders.accept_timeout (+ cluster.owner_answer_slack in cluster mode) + 0.5 s"
    )]
    OrderRequestTimeout {
        request_timeout: Duration,
        least: Duration,
    },
    #[error(
        "http.request_timeout = {request:?} must be longer than orders.request_timeout \
         ({order:?}), or order requests would be cut off before their own deadline"
    )]
    RequestTimeout { request: Duration, order: Duration },
    #[error("{0} must be more than 0")]
    ZeroTimeout(&'static str),
}

impl Settings {
    /// Defaults ← `file` ← `VENDGATE_*` env ← `overrides`.
    pub fn load(file: Option<&Path>, overrides: &Overrides) -> Result<Self, ConfigError> {
        let mut fig = Figment::from(Serialized::defaults(Settings::default()));
        if let Some(f) = file {
            if !f.exists() {
                return Err(ConfigError::MissingFile(f.to_path_buf()));
            }
            fig = fig.merge(Toml::file(f));
        }
        // VENDGATE_CONFIG names the file (the CLI reads it); it is not a
        // setting.
        fig = fig.merge(Env::prefixed("VENDGATE_").ignore(&["config"]).split("__"));
        let mut s: Settings = fig.extract().map_err(Box::new)?;
        if let Some(d) = &overrides.data_dir {
            s.data_dir = d.clone();
        }
        if let Some(a) = overrides.mqtt_addr {
            s.mqtt.addr = a;
        }
        if let Some(a) = overrides.http_addr {
            s.http.addr = a;
        }
        // A malformed deny filter would silently deny nothing.
        if let Some(f) = s
            .mqtt
            .deny_filters
            .iter()
            .find(|f| !vendgate_proto::topic::valid_filter(f))
        {
            return Err(ConfigError::DenyFilter(f.clone()));
        }
        Ok(s)
    }

    /// Refuse plaintext listeners on non-loopback addresses unless their
    /// `allow_plaintext` says so, and TLS sections without their files.
    /// `Gateway::build` calls it before binding anything.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let slack = if self.cluster.enabled() {
            self.cluster.owner_answer_slack
        } else {
            Duration::ZERO
        };
        let r = &self.retention;
        if !(1..=10_000).contains(&r.batch_size) {
            return Err(ConfigError::RetentionBatch(r.batch_size));
        }
        // A tighter loop would be a busy purge, not a retention policy.
        if r.interval < Duration::from_secs(1) {
            return Err(ConfigError::RetentionInterval);
        }
        let least = self.orders.accept_timeout + slack + ANSWER_MARGIN;
        if self.orders.request_timeout < least {
            return Err(ConfigError::OrderRequestTimeout {
                request_timeout: self.orders.request_timeout,
                least,
            });
        }
        if !self.mqtt.addr.ip().is_loopback() && !self.mqtt.allow_plaintext {
            return Err(ConfigError::Plaintext {
                listener: "MQTT",
                setting: "mqtt.addr",
                addr: self.mqtt.addr,
                allow: "mqtt.allow_plaintext",
                env: "VENDGATE_MQTT__ALLOW_PLAINTEXT",
                tls_hint: " and serve machines on [mqtt.tls]",
            });
        }
        if self.http.tls.is_none()
            && !self.http.addr.ip().is_loopback()
            && !self.http.allow_plaintext
        {
            return Err(ConfigError::Plaintext {
                listener: "HTTP",
                setting: "http.addr",
                addr: self.http.addr,
                allow: "http.allow_plaintext",
                env: "VENDGATE_HTTP__ALLOW_PLAINTEXT",
                tls_hint: ", or configure [http.tls]",
            });
        }
        if let Some(addr) = self.metrics.addr {
            if !addr.ip().is_loopback() && !self.metrics.allow_plaintext {
                return Err(ConfigError::Plaintext {
                    listener: "metrics",
                    setting: "metrics.addr",
                    addr,
                    allow: "metrics.allow_plaintext",
                    env: "VENDGATE_METRICS__ALLOW_PLAINTEXT",
                    tls_hint: "",
                });
            }
        }
        if let Some(t) = &self.mqtt.tls {
            if t.cert.as_os_str().is_empty() {
                return Err(ConfigError::MissingPem("mqtt.tls.cert"));
            }
            if t.key.as_os_str().is_empty() {
                return Err(ConfigError::MissingPem("mqtt.tls.key"));
            }
        }
        // A POST /orders is answered within orders.request_timeout; the
        // HTTP request timeout is a bound for stuck clients, not for orders.
        let order = self.orders.request_timeout;
        if self.http.request_timeout <= order {
            return Err(ConfigError::RequestTimeout {
                request: self.http.request_timeout,
                order,
            });
        }
        for (name, d) in [
            ("http.header_read_timeout", self.http.header_read_timeout),
            (
                "http.tls_handshake_timeout",
                self.http.tls_handshake_timeout,
            ),
        ] {
            if d.is_zero() {
                return Err(ConfigError::ZeroTimeout(name));
            }
        }
        if let Some(t) = &self.http.tls {
            if t.cert.as_os_str().is_empty() {
                return Err(ConfigError::MissingPem("http.tls.cert"));
            }
            if t.key.as_os_str().is_empty() {
                return Err(ConfigError::MissingPem("http.tls.key"));
            }
        }
        Ok(())
    }

    /// Settings for tests: everything on loopback port 0, state in `dir`.
    pub fn for_tests(dir: &Path) -> Self {
        let mut s = Settings {
            data_dir: dir.to_path_buf(),
            ..Settings::default()
        };
        s.mqtt.addr = SocketAddr::from(([127, 0, 0, 1], 0));
        s.http.addr = SocketAddr::from(([127, 0, 0, 1], 0));
        s
    }

    /// The SQLite file when `database_url` is empty or `sqlite://…`.
    pub fn sqlite_path(&self) -> Option<PathBuf> {
        if self.database_url.is_empty() {
            return Some(self.data_dir.join("vendgate.db"));
        }
        self.database_url
            .strip_prefix("sqlite://")
            .map(PathBuf::from)
    }

    /// The file of the key that encrypts merchants' AppSecrets.
    pub fn webhook_key_path(&self) -> PathBuf {
        self.notifier
            .key_file
            .clone()
            .unwrap_or_else(|| self.data_dir.join("webhook.key"))
    }

    /// The effective settings as TOML with every secret redacted.
    pub fn redacted_toml(&self) -> String {
        let mut s = self.clone();
        for c in &mut s.services {
            c.password = "<redacted>".into();
        }
        if !s.operator.password.is_empty() {
            s.operator.password = "<redacted>".into();
        }
        if s.cluster.nats_password.is_some() {
            s.cluster.nats_password = Some("<redacted>".into());
        }
        if let Some((scheme, rest)) = s.database_url.split_once("://") {
            // postgres://user:password@host → keep the host, drop the password.
            if let Some((cred, host)) = rest.rsplit_once('@') {
                let user = cred.split(':').next().unwrap_or("");
                s.database_url = format!("{scheme}://{user}:<redacted>@{host}");
            }
        }
        toml::to_string_pretty(&s).unwrap_or_else(|e| format!("# cannot render settings: {e}\n"))
    }
}

#[cfg(test)]
// figment's Jail closures return its own large error type.
#[allow(clippy::result_large_err)]
mod tests {
    use super::*;

    #[test]
    fn file_env_and_flags_layer_in_order() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "v.toml",
                r#"
                data_dir = "/from/file"
                [mqtt]
                addr = "127.0.0.1:1999"
                connect_timeout = "2s"
                [[services]]
                username = "ops"
                password = "hunter2hunter2"
                "#,
            )?;
            jail.set_env("VENDGATE_MQTT__MAX_PACKET_SIZE", "1024");
            jail.set_env("VENDGATE_DATA_DIR", "/from/env");
            // The file's own variable is not a setting.
            jail.set_env("VENDGATE_CONFIG", "v.toml");
            let s = Settings::load(
                Some(Path::new("v.toml")),
                &Overrides {
                    http_addr: Some("127.0.0.1:9".parse().unwrap()),
                    ..Default::default()
                },
            )
            .map_err(|e| e.to_string())?;
            assert_eq!(s.data_dir, PathBuf::from("/from/env"));
            assert_eq!(s.mqtt.addr.port(), 1999);
            assert_eq!(s.mqtt.max_packet_size, 1024);
            assert_eq!(s.mqtt.connect_timeout, Duration::from_secs(2));
            assert_eq!(s.http.addr.port(), 9);
            let shown = s.redacted_toml();
            assert!(!shown.contains("hunter2"), "{shown}");
            Ok(())
        });
    }

    /// API.md promises that an unpaid `pay_later` order expires after 20
    /// minutes unless configured otherwise: the built-in default, and what
    /// a configuration that does not mention it loads.
    #[test]
    fn unpaid_orders_expire_after_20_minutes_by_default() {
        assert_eq!(
            OrderSettings::default().unpaid_timeout,
            Duration::from_secs(20 * 60)
        );
        figment::Jail::expect_with(|jail| {
            jail.create_file("v.toml", "[orders]\naccept_timeout = \"2s\"\n")?;
            let s = Settings::load(Some(Path::new("v.toml")), &Overrides::default())
                .map_err(|e| e.to_string())?;
            assert_eq!(s.orders.accept_timeout, Duration::from_secs(2));
            assert_eq!(s.orders.unpaid_timeout, Duration::from_secs(20 * 60));
            jail.set_env("VENDGATE_ORDERS__UNPAID_TIMEOUT", "5m");
            let s = Settings::load(Some(Path::new("v.toml")), &Overrides::default())
                .map_err(|e| e.to_string())?;
            assert_eq!(s.orders.unpaid_timeout, Duration::from_secs(5 * 60));
            Ok(())
        });
    }

    #[test]
    fn notifier_settings_and_key_file() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "v.toml",
                r#"
                data_dir = "/state"
                [notifier]
                timeout = "3s"
                retry_for = "26h"
                backoff_base = "50ms"
                allow_private_targets = true
                "#,
            )?;
            jail.set_env("VENDGATE_NOTIFIER__PER_MERCHANT_CONCURRENCY", "2");
            let s = Settings::load(Some(Path::new("v.toml")), &Overrides::default())
                .map_err(|e| e.to_string())?;
            let n = &s.notifier;
            assert_eq!(n.timeout, Duration::from_secs(3));
            assert_eq!(n.retry_for, Duration::from_secs(26 * 3600));
            assert_eq!(n.backoff_base, Duration::from_millis(50));
            assert_eq!(n.backoff_cap, Duration::from_secs(3600), "default kept");
            assert_eq!((n.per_merchant_concurrency, n.concurrency), (2, 64));
            assert!(n.allow_private_targets);
            assert_eq!(s.webhook_key_path(), PathBuf::from("/state/webhook.key"));
            jail.set_env("VENDGATE_NOTIFIER__KEY_FILE", "/secrets/wh.key");
            let s = Settings::load(Some(Path::new("v.toml")), &Overrides::default())
                .map_err(|e| e.to_string())?;
            assert_eq!(s.webhook_key_path(), PathBuf::from("/secrets/wh.key"));
            // The defaults keep API.md's promise of 24 hours of retries and
            // never deliver to private addresses.
            let d = NotifierSettings::default();
            assert!(d.retry_for >= Duration::from_secs(24 * 3600));
            assert!(!d.allow_private_targets);
            Ok(())
        });
    }

    #[test]
    fn tls_and_limit_settings_load_and_plaintext_is_refused_on_public_addresses() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "v.toml",
                r#"
                [mqtt]
                addr = "0.0.0.0:1883"
                [mqtt.tls]
                cert = "/etc/vg/cert.pem"
                key = "/etc/vg/key.pem"
                client_ca = "/etc/vg/machines-ca.pem"
                [mqtt.auth_throttle]
                cooldown = "30s"
                "#,
            )?;
            jail.set_env("VENDGATE_MQTT__MAX_CONNECTIONS", "7");
            jail.set_env("VENDGATE_HTTP__TLS__CERT", "/etc/vg/http.pem");
            jail.set_env("VENDGATE_HTTP__TLS__KEY", "/etc/vg/http.key");
            let s = Settings::load(Some(Path::new("v.toml")), &Overrides::default())
                .map_err(|e| e.to_string())?;
            let t = s.mqtt.tls.clone().expect("mqtt.tls");
            assert_eq!(t.addr.port(), 8883, "default TLS port");
            assert_eq!(t.client_ca, Some(PathBuf::from("/etc/vg/machines-ca.pem")));
            assert_eq!(s.mqtt.max_connections, 7);
            assert_eq!(s.mqtt.auth_throttle.cooldown, Duration::from_secs(30));
            assert_eq!(s.mqtt.auth_throttle.max_failures_per_username, 5);
            assert!(s.http.tls.is_some());
            // Plain MQTT on 0.0.0.0 without allow_plaintext: refused, naming the setting.
            let err = s.validate().expect_err("plaintext on 0.0.0.0").to_string();
            assert!(err.contains("mqtt.allow_plaintext"), "{err}");
            jail.set_env("VENDGATE_MQTT__ALLOW_PLAINTEXT", "true");
            let s = Settings::load(Some(Path::new("v.toml")), &Overrides::default())
                .map_err(|e| e.to_string())?;
            // HTTP is on loopback by default, and TLS anyway.
            assert!(s.validate().is_ok());
            // Defaults bind plain listeners to loopback only, so they validate.
            let d = Settings::default();
            assert!(d.mqtt.addr.ip().is_loopback() && d.http.addr.ip().is_loopback());
            assert!(d.validate().is_ok());
            Ok(())
        });
    }

    #[test]
    fn mqtt_session_and_limit_settings() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "v.toml",
                r#"
                [mqtt]
                deny_filters = ["secret/#", "$SYS/#"]
                session_expiry = "10m"
                "#,
            )?;
            jail.set_env("VENDGATE_MQTT__MACHINE_PUBLISH_RATE", "5");
            jail.set_env("VENDGATE_MQTT__SESSION_MAX_QUEUED", "7");
            jail.set_env("VENDGATE_MQTT__ACCEPT_RATE_PER_ADDRESS", "3");
            jail.set_env("VENDGATE_MQTT__MACHINE_CONNECTION_MEMORY", "65536");
            jail.set_env("VENDGATE_MQTT__MAX_RETAINED_BYTES", "1000");
            let s = Settings::load(Some(Path::new("v.toml")), &Overrides::default())
                .map_err(|e| e.to_string())?;
            let m = &s.mqtt;
            assert_eq!(m.deny_filters, vec!["secret/#", "$SYS/#"]);
            assert_eq!(m.session_expiry, Duration::from_secs(600));
            assert_eq!((m.machine_publish_rate, m.machine_publish_burst), (5, 200));
            assert_eq!((m.session_max_queued, m.machine_session_max_queued), (7, 0));
            assert_eq!(m.accept_rate_per_address, 3);
            assert_eq!(m.machine_connection_memory, 65536);
            assert_eq!(m.max_retained_bytes, 1000);
            assert_eq!(m.machine_max_subscriptions, 8);
            jail.create_file("bad.toml", "[mqtt]\ndeny_filters = [\"a/#/b\"]\n")?;
            assert!(matches!(
                Settings::load(Some(Path::new("bad.toml")), &Overrides::default()),
                Err(ConfigError::DenyFilter(_))
            ));
            Ok(())
        });
    }

    #[test]
    fn http_bounds_load_from_file_and_env_and_are_checked() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "v.toml",
                r#"
                [http]
                header_read_timeout = "3s"
                max_connections_per_address = 16
                [http.login_throttle]
                max_failures_per_username = 3
                [argon2]
                max_waiting = 2
                "#,
            )?;
            jail.set_env("VENDGATE_HTTP__REQUEST_TIMEOUT", "20s");
            jail.set_env("VENDGATE_HTTP__MAX_TLS_HANDSHAKES", "9");
            jail.set_env("VENDGATE_ARGON2__MAX_WAIT", "500ms");
            let s = Settings::load(Some(Path::new("v.toml")), &Overrides::default())
                .map_err(|e| e.to_string())?;
            let h = &s.http;
            assert_eq!(h.header_read_timeout, Duration::from_secs(3));
            assert_eq!(h.request_timeout, Duration::from_secs(20));
            assert_eq!(
                (h.max_connections, h.max_connections_per_address),
                (10_000, 16)
            );
            assert_eq!(h.max_tls_handshakes, 9);
            assert_eq!(h.tls_handshake_timeout, Duration::from_secs(5));
            assert_eq!(h.login_throttle.max_failures_per_username, 3);
            assert_eq!(h.login_throttle.max_failures_per_address, 10);
            assert_eq!(s.argon2.max_waiting, 2);
            assert_eq!(s.argon2.max_wait, Duration::from_millis(500));
            assert!(s.validate().is_ok());
            jail.set_env("VENDGATE_HTTP__REQUEST_TIMEOUT", "3s");
            let s = Settings::load(Some(Path::new("v.toml")), &Overrides::default())
                .map_err(|e| e.to_string())?;
            let err = s
                .validate()
                .expect_err("request timeout inside accept timeout");
            assert!(matches!(err, ConfigError::RequestTimeout { .. }), "{err}");
            Ok(())
        });
    }

    #[test]
    fn unknown_keys_are_refused() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("v.toml", "mqtt_adr = \"x\"\n")?;
            assert!(Settings::load(Some(Path::new("v.toml")), &Overrides::default()).is_err());
            Ok(())
        });
    }
}
