//! The gateway assembled: the one module that knows every part.
//! `Gateway::build` opens storage, builds the parts in dependency order and
//! binds every listener (port 0 allowed, bound addresses reported);
//! `Gateway::run` supervises the long-lived tasks until the cancellation
//! token fires, then stops intake, closes machine connections, flushes
//! presence to storage, lets in-flight webhook deliveries finish and returns.
//!
//! - [`probe`]: readiness and the metrics exposition, which need every part.
//! - [`supervise`]: a long-lived task that ends early fails readiness.

mod probe;
pub mod supervise;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use futures::FutureExt;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::cluster::{Cluster, ClusterParts, OwnerServer, OwnershipEpochs};
use crate::config::Settings;
use crate::edge::auth::Authenticator;
use crate::edge::{ClusterHooks, Edge, Hub, UplinkForwarder};
use crate::fleet::presence::PresenceRegistry;
use crate::fleet::view::ClusterView;
use crate::fleet::{Fleet, OtherNodesView};
use crate::front::Front;
use crate::link::commands::{CommandBus, LocalCommands, PingTable};
use crate::link::uplinks::DeviceUplinks;
use crate::notifier::Notifier;
use crate::orders::{Connections, OrderService};
use crate::passwords::{Argon2Queue, ConfigPassword, Lane};
use crate::secrets::WebhookKey;
use crate::storage::{self, Storage};
use supervise::Supervisor;

/// Longest a shutdown step may take before we give up on it.
const SHUTDOWN_STEP: Duration = Duration::from_secs(10);

/// Handles to the running parts, for the HTTP layer, tests and tools.
#[derive(Clone)]
pub struct GatewayHandle {
    pub settings: Arc<Settings>,
    pub store: Arc<dyn Storage>,
    pub hub: Arc<Hub>,
    pub presence: Arc<PresenceRegistry>,
    /// Presence across the cluster, machine records, pings.
    pub fleet: Arc<Fleet>,
    pub commands: Arc<dyn CommandBus>,
    pub uplinks: Arc<DeviceUplinks>,
    pub orders: Arc<OrderService>,
    /// Places and pays orders here or on the machine's node.
    pub front: Arc<Front>,
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Webhook delivery; call `notifier.wake()` after writing outbox events.
    pub notifier: Arc<Notifier>,
    /// Encrypts merchants' AppSecrets for webhook signing (provisioning).
    pub webhook_key: Arc<WebhookKey>,
    /// Cluster mode: this node's view of and link to the others.
    pub cluster: Option<Arc<Cluster>>,
    /// Watches the long-lived tasks `run` spawns.
    pub supervisor: Arc<Supervisor>,
    pub shutdown: CancellationToken,
}

impl GatewayHandle {
    fn probe(&self) -> probe::GatewayProbe {
        probe::GatewayProbe {
            gw: self.clone(),
            supervisor: self.supervisor.clone(),
        }
    }

    /// The Prometheus exposition, as `GET /metrics` serves it.
    pub async fn exposition(&self) -> String {
        crate::http::ops::Probe::exposition(&self.probe()).await
    }

    /// What the HTTP layer serves from.
    pub fn http_parts(&self) -> crate::http::Parts {
        crate::http::Parts {
            settings: self.settings.clone(),
            front: self.front.clone(),
            orders: self.orders.clone(),
            fleet: self.fleet.clone(),
            commands: self.commands.clone(),
            store: self.store.clone(),
            hub: self.hub.clone(),
            notifier: self.notifier.clone(),
            metrics: self.metrics.clone(),
            probe: Arc::new(self.probe()),
            cluster: self.cluster.clone(),
            shutdown: self.shutdown.clone(),
        }
    }
}

/// The HTTP listener: plain, or HTTPS with `[http.tls]`.
enum HttpListener {
    Plain(tokio::net::TcpListener),
    Tls(tokio::net::TcpListener, Arc<rustls::ServerConfig>),
}

/// A built, bound, not yet running gateway.
pub struct Gateway {
    handle: GatewayHandle,
    edge: Edge,
    /// `[mqtt.tls]`: MQTT over TLS.
    edge_tls: Option<Edge>,
    http: HttpListener,
    /// Cluster mode: the owner side, started by `run`.
    owner_server: Option<Arc<OwnerServer>>,
    /// `[metrics] addr`: `/metrics` on its own listener.
    admin: Option<crate::http::ops::AdminListener>,
    mqtt_addr: SocketAddr,
    mqtt_tls_addr: Option<SocketAddr>,
    http_addr: SocketAddr,
}

impl Gateway {
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        // Before anything is opened or bound: plaintext on a public address
        // and TLS without its files are refused here, with the setting named.
        settings.validate()?;
        let mqtt_tls = match &settings.mqtt.tls {
            Some(t) => Some(
                crate::tls::server_config(&t.cert, &t.key, t.client_ca.as_deref(), &[])
                    .context("building the MQTT TLS configuration ([mqtt.tls])")?,
            ),
            None => None,
        };
        let http_tls = match &settings.http.tls {
            Some(t) => Some(
                crate::tls::server_config(&t.cert, &t.key, None, &[b"http/1.1"])
                    .context("building the HTTPS configuration ([http.tls])")?,
            ),
            None => None,
        };
        if settings.cluster.enabled() && settings.sqlite_path().is_some() {
            anyhow::bail!(
                "cluster mode ([cluster] nats_urls) needs a database all nodes share: set database_url = \"postgres://…\""
            );
        }
        let store = open_storage(&settings).await?;
        let key_path = settings.webhook_key_path();
        let webhook_key = Arc::new(
            WebhookKey::load_or_create(&key_path)
                .with_context(|| format!("loading the webhook key {}", key_path.display()))?,
        );
        let notifier = Notifier::new(
            store.clone(),
            webhook_key.clone(),
            settings.notifier.clone(),
        )
        .context("building the webhook client")?;
        // Nothing is connected to a process that is just starting. (In a
        // cluster the other nodes' machines are online: this node writes
        // offline only what a previous incarnation of itself held.)
        if !settings.cluster.enabled() {
            store
                .reset_presence()
                .await
                .context("resetting presence in storage")?;
        }

        let shutdown = CancellationToken::new();
        let presence = Arc::new(PresenceRegistry::new());
        let pings = Arc::new(PingTable::default());
        // The order side's intake exists before the hub that delivers to it
        // and the order service that drains it.
        let (order_intake, intake_queue) = crate::orders::intake();
        let uplinks = Arc::new(DeviceUplinks::new(
            presence.clone(),
            pings.clone(),
            order_intake,
        ));
        let node = settings
            .cluster
            .enabled()
            .then(|| crate::cluster::node_id(&settings.cluster.node_id));
        let metrics = Arc::new(crate::metrics::Metrics::for_node(node.as_deref()));
        // Service logins wait for an argon2 slot within the CONNECT deadline.
        let service_queue = Arc::new(Argon2Queue::new(
            Lane::Service,
            &settings.argon2,
            settings.mqtt.connect_timeout,
            metrics.argon2.clone(),
        ));
        let mut services = Vec::with_capacity(settings.services.len());
        for c in &settings.services {
            if c.username.bytes().all(|b| b.is_ascii_digit()) {
                anyhow::bail!(
                    "service username {:?} is all digits: it would be taken for a machine",
                    c.username
                );
            }
            let password = ConfigPassword::parse(&c.password)
                .with_context(|| format!("[[services]] {:?} password", c.username))?
                .queued(service_queue.clone());
            if !password.is_hashed() {
                warn!(
                    username = %c.username,
                    "[[services]] password is in plaintext; store `vendgate hash-password` output instead"
                );
            }
            services.push((c.username.clone(), password));
        }
        let auth = Authenticator::new(store.clone(), services)
            .count_previous_secret_uses(metrics.previous_secrets.clone());
        // Cluster mode: the hub takes epochs from the shared database and
        // queues uplink copies for the cluster client, which starts later.
        let (copier, copies) = crate::cluster::uplink_copies();
        let hooks = node.as_ref().map(|node| ClusterHooks {
            epochs: Arc::new(OwnershipEpochs::new(store.clone(), node.clone())),
            forwarder: settings
                .cluster
                .forward_uplinks
                .then(|| copier.clone() as Arc<dyn UplinkForwarder>),
        });
        let hub = Arc::new(Hub::new(
            settings.mqtt.clone(),
            presence.clone(),
            auth,
            uplinks.clone(),
            metrics.edge_timings(),
            hooks,
            shutdown.clone(),
        ));
        let edge = Edge::bind(settings.mqtt.addr, hub.clone(), None)
            .await
            .with_context(|| format!("binding the MQTT listener on {}", settings.mqtt.addr))?;
        let mqtt_addr = edge.local_addr()?;
        let edge_tls = match (&settings.mqtt.tls, mqtt_tls) {
            (Some(t), Some(config)) => Some(
                Edge::bind(t.addr, hub.clone(), Some(config))
                    .await
                    .with_context(|| format!("binding the MQTT TLS listener on {}", t.addr))?,
            ),
            _ => None,
        };
        let mqtt_tls_addr = edge_tls.as_ref().map(Edge::local_addr).transpose()?;
        let http_tcp = tokio::net::TcpListener::bind(settings.http.addr)
            .await
            .with_context(|| format!("binding the HTTP listener on {}", settings.http.addr))?;
        let http_addr = http_tcp.local_addr()?;
        let http = match http_tls {
            Some(config) => HttpListener::Tls(http_tcp, config),
            None => HttpListener::Plain(http_tcp),
        };
        let admin = crate::http::ops::AdminListener::bind(&settings).await?;
        let local = Arc::new(LocalCommands::new(hub.clone(), presence.clone(), pings));
        // Cluster mode: which machines are online on the other nodes; the
        // cluster client writes it, the fleet reads it.
        let view = Arc::new(ClusterView::default());
        let cluster = if settings.cluster.enabled() {
            let parts = ClusterParts {
                store: store.clone(),
                hub: hub.clone(),
                presence: presence.clone(),
                local: local.clone(),
                notifier: notifier.clone(),
                copies,
                view: view.clone(),
            };
            let c = Cluster::start(&settings, parts, shutdown.clone())
                .await
                .context("joining the cluster")?;
            Some(c)
        } else {
            None
        };
        let commands: Arc<dyn CommandBus> = match &cluster {
            Some(c) => c.clone(),
            None => local,
        };
        let orders = OrderService::new(
            store.clone(),
            presence.clone(),
            settings.orders.clone(),
            notifier.clone(),
            Connections {
                commands: commands.clone(),
                intake: intake_queue,
                other_nodes: cluster.as_ref().map(|c| c.other_nodes()),
                // Given before recovery, so orders given up at restart
                // count too.
                observer: metrics.orders.clone(),
            },
            shutdown.clone(),
        );
        // Answers the other nodes for the machines held here; started by
        // `run` with the other long-lived tasks.
        let owner_server = cluster
            .as_ref()
            .map(|c| OwnerServer::new(c.clone(), orders.clone()));
        orders.recover().await.context("recovering open orders")?;
        let front = Front::new(orders.clone(), cluster.clone());
        let fleet = Arc::new(Fleet::new(
            presence.clone(),
            node.map(|node| OtherNodesView { view, node }),
            store.clone(),
        ));
        let handle = GatewayHandle {
            settings: Arc::new(settings),
            store,
            hub,
            presence,
            fleet,
            commands,
            uplinks,
            orders,
            front,
            metrics,
            notifier,
            webhook_key,
            cluster,
            supervisor: Supervisor::new(shutdown.clone()),
            shutdown,
        };
        Ok(Self {
            handle,
            edge,
            edge_tls,
            http,
            owner_server,
            admin,
            mqtt_addr,
            mqtt_tls_addr,
            http_addr,
        })
    }

    pub fn mqtt_addr(&self) -> SocketAddr {
        self.mqtt_addr
    }

    /// The MQTT-over-TLS listener, when `[mqtt.tls]` is set.
    pub fn mqtt_tls_addr(&self) -> Option<SocketAddr> {
        self.mqtt_tls_addr
    }

    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// The separate metrics listener, when `[metrics] addr` is set.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().map(|a| a.local_addr())
    }

    pub fn handle(&self) -> GatewayHandle {
        self.handle.clone()
    }

    /// Run until `handle().shutdown` is cancelled.
    pub async fn run(self) -> anyhow::Result<()> {
        let h = self.handle;
        info!(mqtt = %self.mqtt_addr, mqtt_tls = ?self.mqtt_tls_addr, http = %self.http_addr, https = matches!(self.http, HttpListener::Tls(..)), "vendgate running");
        let sup = h.supervisor.clone();

        let persist_stop = CancellationToken::new();
        let persister = sup.spawn(
            "presence persister",
            crate::fleet::persister::spawn_persister(
                h.presence.clone(),
                h.store.clone(),
                h.notifier.clone(),
                persist_stop.clone(),
            )
            .map(|_| ()),
        );
        // Stops claiming at shutdown, then waits for its in-flight deliveries.
        // Observed so /readyz can tell whether it is still running.
        let notifier_task = sup.spawn(
            "webhook notifier",
            h.metrics
                .webhooks
                .clone()
                .observe(h.notifier.clone().run(h.shutdown.clone())),
        );
        let cluster_tasks: Vec<JoinHandle<()>> = h
            .cluster
            .as_ref()
            .map(|c| c.spawn())
            .unwrap_or_default()
            .into_iter()
            .chain(self.owner_server.map(|o| o.spawn()).unwrap_or_default())
            .map(|t| sup.spawn("cluster loop", t.map(|_| ())))
            .collect();
        let edge_task = sup.spawn("MQTT listener", self.edge.run());
        let edge_tls_task = self
            .edge_tls
            .map(|e| sup.spawn("MQTT TLS listener", e.run()));
        let expiry = sup.spawn(
            "order deadline sweeps",
            h.orders.spawn_deadline_sweeps().map(|_| ()),
        );
        let cancels = sup.spawn(
            "owed cancel delivery",
            h.orders.spawn_owed_delivery().map(|_| ()),
        );
        let _metrics_upkeep = sup.spawn(
            "metrics upkeep",
            h.metrics.spawn_upkeep(h.shutdown.clone()).map(|_| ()),
        );
        // Closes connections of accounts the CLI disabled or removed.
        let enforce = sup.spawn(
            "account enforcement",
            crate::edge::enforce::run(
                h.hub.clone(),
                h.store.clone(),
                h.settings
                    .services
                    .iter()
                    .map(|c| c.username.clone())
                    .collect(),
                h.shutdown.clone(),
            ),
        );
        let retention = sup.spawn(
            "retention purge",
            crate::retention::run(
                h.store.clone(),
                h.settings.retention.clone(),
                h.metrics.retention.clone(),
                h.shutdown.clone(),
            ),
        );
        let parts = h.http_parts();
        let admin_task = self
            .admin
            .map(|a| sup.spawn("metrics listener", a.spawn(parts.clone()).map(|_| ())));
        let http_task = {
            let shutdown = h.shutdown.clone();
            let app = crate::http::router(parts);
            let (l, tls) = match self.http {
                HttpListener::Plain(l) => (l, None),
                HttpListener::Tls(l, config) => (l, Some(config)),
            };
            let settings = h.settings.clone();
            let stats = h.metrics.http.clone();
            sup.spawn("HTTP listener", async move {
                let served =
                    crate::http::serve::serve(l, app, &settings.http, tls, stats, shutdown).await;
                if let Err(e) = served {
                    error!(error = %e, "HTTP server failed");
                }
            })
        };

        h.shutdown.cancelled().await;
        info!("shutting down: closing listeners and machine connections");
        // Intake first: the edge stops accepting and closes every connection;
        // each close is a presence event the persister still writes.
        if tokio::time::timeout(SHUTDOWN_STEP, edge_task)
            .await
            .is_err()
        {
            warn!("MQTT edge did not stop in time");
        }
        if let Some(t) = edge_tls_task {
            if tokio::time::timeout(SHUTDOWN_STEP, t).await.is_err() {
                warn!("MQTT TLS edge did not stop in time");
            }
        }
        if tokio::time::timeout(SHUTDOWN_STEP, http_task)
            .await
            .is_err()
        {
            warn!("HTTP server did not stop in time");
        }
        if let Some(t) = admin_task {
            let _ = tokio::time::timeout(SHUTDOWN_STEP, t).await;
        }
        let _ = expiry.await;
        let _ = cancels.await;
        h.orders.finish_inventory_writes().await;
        persist_stop.cancel();
        if tokio::time::timeout(SHUTDOWN_STEP, persister)
            .await
            .is_err()
        {
            warn!("presence writer did not stop in time");
        }
        // Events written meanwhile stay in the outbox for the next start.
        let notifier_wait = h.settings.notifier.timeout + SHUTDOWN_STEP;
        if tokio::time::timeout(notifier_wait, notifier_task)
            .await
            .is_err()
        {
            warn!("webhook notifier did not stop in time");
        }
        for t in cluster_tasks {
            let _ = tokio::time::timeout(SHUTDOWN_STEP, t).await;
        }
        // A purge batch in progress finishes before storage closes.
        for t in [enforce, retention] {
            let _ = tokio::time::timeout(SHUTDOWN_STEP, t).await;
        }
        if let Some(c) = &h.cluster {
            c.leave().await;
        } else if let Err(e) = h.store.reset_presence().await {
            // Every connection of this process is gone.
            warn!(error = %e, "could not mark machines offline at shutdown");
        }
        h.store.close().await;
        info!("vendgate stopped");
        Ok(())
    }
}

async fn open_storage(settings: &Settings) -> anyhow::Result<Arc<dyn Storage>> {
    // The SQLite path is worth naming; a PostgreSQL URL may hold a password.
    storage::open(settings)
        .await
        .with_context(|| match settings.sqlite_path() {
            Some(path) => format!("opening the database {}", path.display()),
            None => "opening the database".to_string(),
        })
}
