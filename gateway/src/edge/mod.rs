//! The device edge: the gateway's own MQTT 3.1.1 server for machines and
//! service clients. It owns the listeners, authentication, the topic ACL,
//! keep alive and routing, and hands machine uplinks to the gateway's
//! handlers. docs/decisions/rumqttd.md says why the edge is ours rather
//! than rumqttd's; docs/edge.md what it conforms to and its bounds.
//!
//! Three words name its parts: an [`Edge`] is one bound listener; the
//! [`Hub`] is the broker state every listener feeds (settings, limits,
//! presence, counters); the [`Router`] is the routing table inside the hub
//! (sessions, subscriptions, retained messages).
//!
//! - `conn`: one connection's task: handshake, session loop, close.
//! - `router`: sessions, subscriptions, retained messages, fan-out.
//! - `acl`: who a client is and which topics it may touch.
//! - `auth`: CONNECT credentials (password or client certificate).
//! - `enforce`: closes live connections of disabled or removed accounts.
//! - `limits`: connection caps and accept rates (per source address, then
//!   global), failed-auth throttling, machines' packet rates, refusal-log
//!   rate.
//! - `stream`: plain or TLS byte stream, read on readiness.

mod acl;
pub mod auth;
mod conn;
pub mod enforce;
pub mod limits;
pub mod router;
pub mod stats;
mod stream;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use rumqttc::mqttbytes::QoS;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};
use vendgate_proto::machine::MachineNo;
use vendgate_proto::topic::{self, Command, Uplink};

use crate::config::MqttSettings;
use crate::fleet::presence::PresenceRegistry;
use auth::Authenticator;
use limits::{
    AcceptGate, AddressLimits, AuthThrottle, LogGate, MachineRates, Rejection, ThrottleScope,
};
use router::{ClientClass, MachineDelivery, Router};

/// Receives every uplink a machine publishes on one of its protocol topics,
/// after the ACL. Called on the connection's task: implementations must not
/// block (hand work to a channel or a spawned task).
pub trait UplinkHandler: Send + Sync + 'static {
    fn on_uplink(&self, machine_no: MachineNo, epoch: u64, kind: Uplink, payload: &Bytes);
}

/// Where a machine connection's epoch comes from in cluster mode: a
/// cluster-wide counter (PostgreSQL), so connections to different nodes are
/// ordered. Without one the local presence registry numbers them.
#[async_trait::async_trait]
pub trait EpochSource: Send + Sync + 'static {
    /// The machine's CONNECT was accepted here; None refuses it (the
    /// database cannot be reached: the machine retries, possibly elsewhere).
    async fn acquire(&self, machine_no: MachineNo) -> Option<u64>;
}

/// Cluster mode: where the hub takes machine epochs from and where it
/// copies uplinks, given when the hub is built.
pub struct ClusterHooks {
    pub epochs: Arc<dyn EpochSource>,
    /// None: uplinks stay on this node (`[cluster] forward_uplinks = false`).
    pub forwarder: Option<Arc<dyn UplinkForwarder>>,
}

/// Receives every machine uplink the edge routed, to copy it to the other
/// nodes' hubs (cluster mode). Must not block.
pub trait UplinkForwarder: Send + Sync + 'static {
    fn forward(&self, topic: &str, payload: &Bytes, qos: QoS, retain: bool);
}

/// Counters of the edge (exported as Prometheus metrics by the metrics module).
#[derive(Debug, Default)]
pub struct EdgeStats {
    pub connections_accepted: AtomicU64,
    pub connect_refused: AtomicU64,
    pub acl_violations: AtomicU64,
    pub malformed: AtomicU64,
    pub keep_alive_timeouts: AtomicU64,
    /// SUBSCRIBE filters refused by `mqtt.deny_filters`.
    pub denied_subscriptions: AtomicU64,
    /// Machines disconnected for exceeding `mqtt.machine_publish_rate`.
    pub rate_limited: AtomicU64,
    pub messages_in: AtomicU64,
    pub bytes_in: AtomicU64,
    pub messages_out: AtomicU64,
    pub bytes_out: AtomicU64,
    /// Messages and bytes per topic pattern and direction.
    pub topics: crate::edge::stats::TopicStats,
    /// Connects, disconnects by reason, refused CONNECTs.
    pub connections: crate::edge::stats::ConnectionStats,
    /// Dispense round-trip histograms (given at construction).
    pub timings: crate::edge::stats::Timings,
    /// True while the accept loop runs (`/readyz`).
    pub accepting: std::sync::atomic::AtomicBool,
    /// Connections closed at accept: over `max_connections`.
    pub rejected_max_connections: AtomicU64,
    /// Connections closed at accept: over `accept_rate`.
    pub rejected_accept_rate: AtomicU64,
    /// Connections closed at accept by the per-address limits:
    /// `max_connections_per_address`, `accept_rate_per_address`.
    pub rejected_address_connections: AtomicU64,
    pub rejected_address_rate: AtomicU64,
    /// SUBSCRIBE filters refused by the session's subscription limits.
    pub subscriptions_refused: AtomicU64,
    /// Connections closed for exceeding their memory budget.
    pub memory_budget: AtomicU64,
    /// Connections without a CONNECT (or TLS handshake) in `connect_timeout`.
    pub connect_timeouts: AtomicU64,
    /// TLS handshakes that failed (bad or untrusted client certificate,
    /// plaintext on the TLS port, protocol errors).
    pub tls_handshake_failures: AtomicU64,
    /// Packets over `max_packet_size` (the connection is closed).
    pub oversized_packets: AtomicU64,
    /// CONNECTs refused by the failed-auth throttle, by [`ThrottleScope`].
    pub auth_throttled: [AtomicU64; 2],
}

impl EdgeStats {
    pub fn rejected(&self, r: Rejection) {
        let c = match r {
            Rejection::MaxConnections => &self.rejected_max_connections,
            Rejection::AcceptRate => &self.rejected_accept_rate,
            Rejection::AddressConnections => &self.rejected_address_connections,
            Rejection::AddressRate => &self.rejected_address_rate,
        };
        c.fetch_add(1, Ordering::Relaxed);
    }

    pub fn throttled(&self, scope: ThrottleScope) -> u64 {
        self.auth_throttled[scope as usize].load(Ordering::Relaxed)
    }
}

/// A copy of the counters, for tests and the CLI.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub struct EdgeStatsSnapshot {
    pub connections_accepted: u64,
    pub connect_refused: u64,
    pub acl_violations: u64,
    pub malformed: u64,
    pub keep_alive_timeouts: u64,
    pub messages_in: u64,
    pub messages_out: u64,
    pub slow_consumers: u64,
    pub sessions: u64,
}

/// The broker state that every listener ([`Edge`]) feeds and every
/// connection shares: settings, authentication, limits, presence, counters,
/// and the [`Router`] that routes between sessions.
pub struct Hub {
    pub(crate) settings: MqttSettings,
    pub router: Router,
    pub presence: Arc<PresenceRegistry>,
    pub(crate) auth: Authenticator,
    pub(crate) uplinks: Arc<dyn UplinkHandler>,
    pub stats: EdgeStats,
    /// Open-connection cap and accept rate, shared by both listeners.
    pub gate: Arc<AcceptGate>,
    pub(crate) throttle: AuthThrottle,
    /// Refusal log lines per source address.
    pub log_gate: LogGate,
    /// Machines' packet-rate buckets, kept across their reconnects.
    pub machine_rates: MachineRates,
    conn_ids: AtomicU64,
    pub(crate) shutdown: CancellationToken,
    /// Cluster mode: epochs from the cluster, uplinks copied to other nodes.
    pub(crate) epochs: Option<Arc<dyn EpochSource>>,
    pub(crate) forwarder: Option<Arc<dyn UplinkForwarder>>,
}

impl Hub {
    pub fn new(
        settings: MqttSettings,
        presence: Arc<PresenceRegistry>,
        auth: Authenticator,
        uplinks: Arc<dyn UplinkHandler>,
        timings: stats::Timings,
        cluster: Option<ClusterHooks>,
        shutdown: CancellationToken,
    ) -> Self {
        let (epochs, forwarder) = match cluster {
            Some(c) => (Some(c.epochs), c.forwarder),
            None => (None, None),
        };
        Self {
            router: Router::with_limits(
                settings.max_retained,
                router::SessionLimits {
                    max_queued: settings.session_max_queued,
                    machine_max_queued: settings.machine_session_max_queued,
                    expiry: settings.session_expiry,
                    max_parked_bytes: settings.service_connection_memory,
                },
            )
            .with_retained_limits(router::RetainedLimits {
                max_entries: settings.max_retained,
                max_bytes: settings.max_retained_bytes,
                max_message: settings.max_retained_message_size,
            })
            .with_deny_filters(settings.deny_filters.clone()),
            gate: Arc::new(AcceptGate::with_address_limits(
                settings.max_connections,
                settings.accept_rate,
                settings.accept_burst,
                AddressLimits {
                    max_connections: settings.max_connections_per_address,
                    per_sec: settings.accept_rate_per_address,
                    burst: settings.accept_burst_per_address,
                    max_tracked: settings.max_tracked_addresses,
                },
            )),
            throttle: AuthThrottle::new(settings.auth_throttle.clone()),
            log_gate: LogGate::new(settings.max_tracked_addresses),
            machine_rates: MachineRates::new(
                settings.machine_publish_rate,
                settings.machine_publish_burst,
                settings.auth_throttle.max_tracked,
            ),
            settings,
            presence,
            auth,
            uplinks,
            stats: EdgeStats {
                timings,
                ..EdgeStats::default()
            },
            conn_ids: AtomicU64::new(1),
            shutdown,
            epochs,
            forwarder,
        }
    }

    /// Close the connection(s) of machine `m` (another node took it over,
    /// or this node was fenced). Returns how many were closed.
    pub fn kick_machine(&self, m: &MachineNo) -> usize {
        self.router
            .kick_where(|c| matches!(c, ClientClass::Machine(x) if x == m))
    }

    /// Close every machine connection (this node was declared dead: the
    /// machines reconnect and take new epochs).
    pub fn kick_all_machines(&self) -> usize {
        self.router
            .kick_where(|c| matches!(c, ClientClass::Machine(_)))
    }

    fn next_conn_id(&self) -> u64 {
        self.conn_ids.fetch_add(1, Ordering::Relaxed)
    }

    /// Publish a message from the gateway itself (commands, gateway topics).
    pub fn publish(
        &self,
        topic_name: &str,
        payload: Bytes,
        qos: QoS,
        retain: bool,
    ) -> MachineDelivery {
        self.stats.messages_in.fetch_add(1, Ordering::Relaxed);
        self.router.publish(topic_name, payload, qos, retain)
    }

    /// Send a command to a machine at QoS 1. Service clients subscribed to the
    /// command topic see it too (read-only observers).
    pub fn send_command(
        &self,
        machine_no: &MachineNo,
        command: Command,
        payload: Bytes,
    ) -> MachineDelivery {
        self.publish(
            &topic::command(machine_no, command),
            payload,
            QoS::AtLeastOnce,
            false,
        )
    }

    /// [`Hub::send_command`]; `receipt` fires when the machine acknowledges it.
    pub fn send_command_with_receipt(
        &self,
        machine_no: &MachineNo,
        command: Command,
        payload: Bytes,
        receipt: router::Receipt,
    ) -> MachineDelivery {
        self.stats.messages_in.fetch_add(1, Ordering::Relaxed);
        self.router.publish_with_receipt(
            &topic::command(machine_no, command),
            payload,
            QoS::AtLeastOnce,
            false,
            Some(receipt),
        )
    }

    pub fn stats(&self) -> EdgeStatsSnapshot {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        EdgeStatsSnapshot {
            connections_accepted: l(&self.stats.connections_accepted),
            connect_refused: l(&self.stats.connect_refused),
            acl_violations: l(&self.stats.acl_violations),
            malformed: l(&self.stats.malformed),
            keep_alive_timeouts: l(&self.stats.keep_alive_timeouts),
            messages_in: l(&self.stats.messages_in),
            messages_out: l(&self.stats.messages_out),
            slow_consumers: l(&self.router.stats.slow_consumers),
            sessions: self.router.session_count() as u64,
        }
    }
}

/// One bound listener (plain, or TLS with `tls`) feeding the shared [`Hub`];
/// `run` accepts until shutdown. The gateway binds one or two (plain, TLS).
pub struct Edge {
    listener: TcpListener,
    hub: Arc<Hub>,
    tasks: TaskTracker,
    tls: Option<tokio_rustls::TlsAcceptor>,
}

impl Edge {
    pub async fn bind(
        addr: SocketAddr,
        hub: Arc<Hub>,
        tls: Option<Arc<rustls::ServerConfig>>,
    ) -> std::io::Result<Self> {
        let listener = TcpListener::bind(addr).await?;
        Ok(Self {
            listener,
            hub,
            tasks: TaskTracker::new(),
            tls: tls.map(tokio_rustls::TlsAcceptor::from),
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Accept connections until the hub's shutdown token fires, then wait for
    /// every connection task to finish (they observe the same token).
    pub async fn run(self) {
        let shutdown = self.hub.shutdown.clone();
        self.hub.stats.accepting.store(true, Ordering::Relaxed);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                r = self.listener.accept() => match r {
                    Ok((stream, peer)) => {
                        // Over the cap or the rate: close at once (dropping
                        // the socket), before any task or buffer exists.
                        let slot = match self.hub.gate.admit_from(peer.ip()) {
                            Ok(s) => s,
                            Err(r) => {
                                self.hub.stats.rejected(r);
                                debug!(%peer, reason = ?r, "MQTT connection refused at accept");
                                continue;
                            }
                        };
                        let hub = self.hub.clone();
                        let tasks = self.tasks.clone();
                        let tls = self.tls.clone();
                        self.tasks.spawn(conn::serve(hub, stream, peer, tls, slot, tasks));
                    }
                    Err(e) => {
                        // EMFILE and friends: back off briefly instead of spinning.
                        warn!(error = %e, "MQTT accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    }
                }
            }
        }
        self.hub.stats.accepting.store(false, Ordering::Relaxed);
        drop(self.listener);
        self.tasks.close();
        self.tasks.wait().await;
        info!("MQTT edge stopped");
    }
}
