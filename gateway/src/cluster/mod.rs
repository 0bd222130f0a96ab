//! Cluster mode: several identical gateway nodes behind a TCP load
//! balancer, talking over NATS, sharing state in PostgreSQL
//! (docs/scale-out.md). This module owns everything a node does *because*
//! other nodes exist:
//!
//! - **Ownership.** The node holding a machine's MQTT connection owns it.
//!   Each accepted CONNECT takes a cluster-wide epoch from the database
//!   ([`crate::storage::ClusterStorage::take_ownership`]) and the node
//!   announces it on NATS; a node still holding an older connection of that
//!   machine closes it at once. Stale closes, acks and commands carry old
//!   epochs and change nothing.
//! - **Requests to the owner.** The owner subscribes to one subject per
//!   connection (`{prefix}.own.{machine}.{epoch}`); orders, payments,
//!   commands and pings for a machine held elsewhere are NATS requests on
//!   it. "No responders" right after a move is retried briefly. A request
//!   whose answer never comes is settled from the database like a missing
//!   ack: never by sending the dispense again.
//! - **The cluster view** ([`view`]): who is online on which node, from the
//!   nodes' presence notes and a periodic database re-read.
//! - **Liveness.** Nodes heartbeat into the database and on NATS; a node
//!   silent for `node_dead_after` is reaped by another, which writes its
//!   machines offline (with their webhooks). A node that finds itself
//!   reaped (it was frozen) closes its connections and registers again.
//! - **Uplink copies** to the other nodes' hubs, for service clients.

pub mod view;
pub mod wire;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use anyhow::Context;
use async_trait::async_trait;
use base64::Engine;
use bytes::Bytes;
use chrono::Utc;
use dashmap::DashMap;
use futures::StreamExt;
use rumqttc::mqttbytes::QoS;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use vendgate_proto::machine::MachineNo;
use vendgate_proto::topic::Command;

use crate::commands::{CommandBus, DeliveryError, LocalCommands};
use crate::config::Settings;
use crate::domain::order::GiveUp;
use crate::domain::order::{Line, Status};
use crate::domain::webhook::machine_event;
use crate::edge::{EpochSource, Hub, UplinkForwarder};
use crate::notifier::Notifier;
use crate::orders::inventory::StockView;
use crate::orders::{OrderError, OrderService, PlaceRequest, RemoteMachines};
use crate::presence::{PresenceEvent, PresenceRegistry};
use crate::storage::{PresenceChange, PresenceWrite, Storage};
use view::{ClusterView, Heartbeat, PresenceNote};
use wire::{OwnerReply, OwnerRequest, PlaceOnOwner, Released, Subjects};

/// Uplink copies waiting for NATS; beyond, copies are dropped and counted.
const UPLINK_QUEUE: usize = 16 * 1024;
/// Re-read ownership from the database every this many heartbeats.
const RESYNC_EVERY: u32 = 2;
/// Most orphaned machines written offline per heartbeat.
const REAP_BATCH: usize = 2000;

/// Counters of cluster traffic (exported by the metrics module).
#[derive(Debug, Default)]
pub struct ClusterStats {
    pub forwarded: AtomicU64,
    pub forward_lost: AtomicU64,
    pub no_responder_retries: AtomicU64,
    pub served: AtomicU64,
    pub takeovers_closed: AtomicU64,
    pub fenced: AtomicU64,
    pub machines_reaped: AtomicU64,
    pub uplinks_out: AtomicU64,
    pub uplinks_in: AtomicU64,
    pub uplinks_dropped: AtomicU64,
}

/// What asking the owner came to.
enum Asked {
    Reply(OwnerReply),
    /// The machine is connected here now.
    Local,
    /// Not online anywhere (or no owner answered within the retry window).
    Offline,
    /// The request left but no answer came in time.
    Lost,
}

/// A forwarded uplink on its way to NATS.
struct UplinkCopy {
    topic: String,
    payload: Bytes,
    qos: QoS,
    retain: bool,
}

pub struct Cluster {
    node: String,
    incarnation: String,
    settings: crate::config::ClusterSettings,
    subjects: Subjects,
    nats: async_nats::Client,
    store: Arc<dyn Storage>,
    hub: Arc<Hub>,
    presence: Arc<PresenceRegistry>,
    local: Arc<LocalCommands>,
    orders: OnceLock<Arc<OrderService>>,
    notifier: Arc<Notifier>,
    pub view: ClusterView,
    /// Owner subscriptions of the connections held here: (epoch, stop).
    serving: DashMap<MachineNo, (u64, CancellationToken)>,
    uplinks: mpsc::Sender<UplinkCopy>,
    uplinks_rx: std::sync::Mutex<Option<mpsc::Receiver<UplinkCopy>>>,
    pub stats: ClusterStats,
    shutdown: CancellationToken,
    me: Weak<Cluster>,
}

impl Cluster {
    /// Connect to NATS (in the background: the node starts, and `/readyz`
    /// says whether NATS is reachable) and register this node.
    pub async fn start(
        settings: &Settings,
        store: Arc<dyn Storage>,
        hub: Arc<Hub>,
        presence: Arc<PresenceRegistry>,
        local: Arc<LocalCommands>,
        notifier: Arc<Notifier>,
        shutdown: CancellationToken,
    ) -> anyhow::Result<Arc<Self>> {
        let c = &settings.cluster;
        let node = node_id(&c.node_id);
        let incarnation = format!("{:016x}", rand::random::<u64>());
        let wait = settings.orders.accept_timeout + c.owner_answer_slack;
        let mut opts = async_nats::ConnectOptions::new()
            .name(format!("vendgate-{node}"))
            .ping_interval(c.nats_ping_interval)
            .connection_timeout(c.nats_connection_timeout)
            .request_timeout(Some(wait))
            .max_reconnects(None)
            .retry_on_initial_connect()
            // Never wait long between reconnect attempts: every second
            // without NATS is a second of 30002 for machines elsewhere.
            .reconnect_delay_callback(|attempt| {
                Duration::from_millis((attempt as u64 * 50).min(500))
            })
            .event_callback(|e| async move {
                match e {
                    async_nats::Event::Connected => info!("NATS connected"),
                    async_nats::Event::Disconnected => warn!("NATS disconnected"),
                    other => debug!(event = %other, "NATS event"),
                }
            });
        if let (Some(u), Some(p)) = (&c.nats_user, &c.nats_password) {
            opts = opts.user_and_password(u.clone(), p.clone());
        }
        let nats = opts
            .connect(c.nats_urls.as_slice())
            .await
            .context("configuring the NATS client ([cluster] nats_urls)")?;
        let (uplinks, uplinks_rx) = mpsc::channel(UPLINK_QUEUE);
        let cluster = Arc::new_cyclic(|me| Self {
            node,
            incarnation,
            settings: c.clone(),
            subjects: Subjects::new(&c.subject_prefix),
            nats,
            store,
            hub,
            presence,
            local,
            orders: OnceLock::new(),
            notifier,
            view: ClusterView::default(),
            serving: DashMap::new(),
            uplinks,
            uplinks_rx: std::sync::Mutex::new(Some(uplinks_rx)),
            stats: ClusterStats::default(),
            shutdown,
            me: me.clone(),
        });
        cluster.register().await.context("registering this node")?;
        info!(node = %cluster.node, incarnation = %cluster.incarnation, "cluster node registered");
        Ok(cluster)
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    /// Machine `m` if it is online on another node than this one.
    pub fn remote(&self, m: &MachineNo) -> Option<view::Remote> {
        self.view.remote(m, &self.node)
    }

    /// Every machine online on another node than this one.
    pub fn remote_online(&self) -> Vec<(MachineNo, view::Remote)> {
        self.view.remote_online(&self.node)
    }

    /// Whether the NATS connection is up (for `/readyz`).
    pub fn nats_connected(&self) -> bool {
        self.nats.connection_state() == async_nats::connection::State::Connected
    }

    /// The order service, once built (it needs this cluster as its bus).
    pub fn attach_orders(&self, orders: Arc<OrderService>) {
        let _ = self.orders.set(orders);
    }

    /// Register (again) under a new incarnation; connections a previous
    /// incarnation held are written offline.
    async fn register(&self) -> anyhow::Result<()> {
        let stale = self
            .store
            .register_node(&self.node, &self.incarnation, Utc::now())
            .await?;
        if !stale.is_empty() {
            info!(
                machines = stale.len(),
                "machines a previous incarnation of this node held: offline"
            );
            self.write_offline(&stale, "node_restarted").await;
        }
        Ok(())
    }

    /// Write machines offline at their epochs (the epoch rule leaves any
    /// that reconnected meanwhile alone) with their webhooks, and tell the
    /// other nodes.
    async fn write_offline(&self, machines: &[(MachineNo, u64)], reason: &str) {
        let now = Utc::now();
        let batch: Vec<PresenceChange> = machines
            .iter()
            .map(|(m, epoch)| PresenceChange {
                write: PresenceWrite {
                    machine_no: *m,
                    online: false,
                    epoch: *epoch,
                    at: now,
                },
                event: Some(machine_event(*m, false, Some(reason), now, now)),
            })
            .collect();
        for chunk in batch.chunks(1024) {
            if let Err(e) = self.store.record_presence_batch_with_events(chunk).await {
                warn!(error = %e, "could not write machines offline");
                return;
            }
        }
        self.notifier.wake();
        for (m, epoch) in machines {
            let note = PresenceNote {
                machine_no: *m,
                online: false,
                epoch: *epoch,
                node: String::new(),
                at: now,
            };
            self.view.apply(&note);
            self.publish_json(self.subjects.presence(), &note).await;
        }
    }

    async fn publish_json<T: serde::Serialize>(&self, subject: String, body: &T) {
        match serde_json::to_vec(body) {
            Ok(b) => {
                if let Err(e) = self.nats.publish(subject, b.into()).await {
                    debug!(error = %e, "NATS publish failed");
                }
            }
            Err(e) => warn!(error = %e, "cannot encode a cluster message"),
        }
    }

    /// Start the background tasks; they end at shutdown.
    pub fn spawn(self: &Arc<Self>) -> Vec<JoinHandle<()>> {
        let mut tasks = vec![
            tokio::spawn(self.clone().local_presence()),
            tokio::spawn(self.clone().remote_presence()),
            tokio::spawn(self.clone().liveness()),
            tokio::spawn(self.clone().heartbeats_in()),
            tokio::spawn(self.clone().released_in()),
        ];
        if self.settings.forward_uplinks {
            tasks.push(tokio::spawn(self.clone().uplinks_in()));
            let rx = self.uplinks_rx.lock().ok().and_then(|mut r| r.take());
            if let Some(rx) = rx {
                tasks.push(tokio::spawn(self.clone().uplinks_out(rx)));
            }
        }
        tasks
    }

    /// Changes of this node's connections: announce them, serve requests
    /// for the machines held here, rebuild an arriving machine's stock.
    async fn local_presence(self: Arc<Self>) {
        let mut rx = self.presence.subscribe();
        loop {
            let ev = tokio::select! {
                _ = self.shutdown.cancelled() => return,
                ev = rx.recv() => ev,
            };
            match ev {
                Ok(ev) => self.local_change(ev).await,
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    warn!(missed = n, "cluster presence lagged; resynchronising");
                    for p in self.presence.snapshot() {
                        let serving = self.serving.get(&p.machine_no).map(|s| s.0);
                        if p.online && serving != Some(p.epoch) {
                            self.local_change(PresenceEvent {
                                machine_no: p.machine_no,
                                online: true,
                                epoch: p.epoch,
                                at: Utc::now(),
                                reason: None,
                                took_over: false,
                            })
                            .await;
                        } else if !p.online && serving.is_some() {
                            self.local_change(PresenceEvent {
                                machine_no: p.machine_no,
                                online: false,
                                epoch: p.epoch,
                                at: Utc::now(),
                                reason: p.last_offline_reason,
                                took_over: false,
                            })
                            .await;
                        }
                    }
                }
                Err(_) => return,
            }
        }
    }

    async fn local_change(&self, ev: PresenceEvent) {
        let note = PresenceNote {
            machine_no: ev.machine_no,
            online: ev.online,
            epoch: ev.epoch,
            node: self.node.clone(),
            at: ev.at,
        };
        let m = ev.machine_no;
        // Arriving from another node (or first seen): its reservations were
        // that node's memory. A reconnect to this same node keeps ours,
        // which include jobs queued here and not yet stored.
        let arriving = self.view.node_of(&m).as_deref() != Some(self.node.as_str());
        self.view.apply(&note);
        if ev.online {
            self.serve(m, ev.epoch);
            if let (true, Some(orders)) = (arriving, self.orders.get()) {
                let orders = orders.clone();
                tokio::spawn(async move { orders.adopt(m).await });
            }
        } else {
            if let Some((_, (_, stop))) = self
                .serving
                .remove_if(&m, |_, (epoch, _)| *epoch == ev.epoch)
            {
                stop.cancel();
            }
        }
        self.publish_json(self.subjects.presence(), &note).await;
    }

    /// Subscribe to the owner subject of this connection of `m` and answer
    /// its requests until the connection ends.
    fn serve(&self, m: MachineNo, epoch: u64) {
        let Some(me) = self.me.upgrade() else { return };
        let stop = CancellationToken::new();
        if let Some(old) = self.serving.insert(m, (epoch, stop.clone())) {
            old.1.cancel();
        }
        tokio::spawn(async move {
            let subject = me.subjects.owner(&m, epoch);
            let mut sub = match me.nats.subscribe(subject).await {
                Ok(s) => s,
                Err(e) => {
                    warn!(machine_no = %m, error = %e, "cannot subscribe to the machine's owner subject");
                    return;
                }
            };
            loop {
                let msg = tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = me.shutdown.cancelled() => break,
                    msg = sub.next() => msg,
                };
                let Some(msg) = msg else { break };
                let me = me.clone();
                tokio::spawn(async move { me.answer(m, epoch, msg).await });
            }
            // Dropping the subscriber unsubscribes.
        });
    }

    /// Answer one request for the connection (m, epoch) held here.
    async fn answer(&self, m: MachineNo, epoch: u64, msg: async_nats::Message) {
        let Some(reply) = msg.reply.clone() else {
            return;
        };
        self.stats.served.fetch_add(1, Ordering::Relaxed);
        let answer = if self.presence.online_epoch(&m) != Some(epoch) {
            OwnerReply::Moved
        } else {
            match serde_json::from_slice::<OwnerRequest>(&msg.payload) {
                Ok(req) => self.execute(m, req).await,
                Err(e) => {
                    warn!(machine_no = %m, error = %e, "undecodable owner request");
                    OwnerReply::failed(&OrderError::Internal)
                }
            }
        };
        self.publish_json(reply.to_string(), &answer).await;
    }

    async fn execute(&self, m: MachineNo, req: OwnerRequest) -> OwnerReply {
        let failed = |error| OwnerReply::failed(&error);
        // The owner answers `owner_answer_slack` before the requester stops
        // waiting, so that "no answer" can only mean the owner died or the
        // answer was lost, never "still deciding".
        let by = |wait_ms: u64| {
            Instant::now()
                + Duration::from_millis(wait_ms).saturating_sub(self.settings.owner_answer_slack)
        };
        match req {
            OwnerRequest::Place(p) => {
                let Some(orders) = self.orders.get() else {
                    return failed(OrderError::Internal);
                };
                let req = PlaceRequest {
                    merchant: p.merchant,
                    machine_no: m,
                    lines: p.lines,
                    out_trade_no: p.out_trade_no,
                    pay_later: p.pay_later,
                    answer_by: by(p.wait_ms),
                    forwarded: Some(crate::orders::Forwarded {
                        order_id: p.order_id,
                    }),
                };
                match orders.place(req).await {
                    Ok(order_id) => OwnerReply::Placed { order_id },
                    Err(e) => failed(e),
                }
            }
            OwnerRequest::Pay {
                merchant,
                order_id,
                wait_ms,
            } => {
                let Some(orders) = self.orders.get() else {
                    return failed(OrderError::Internal);
                };
                match orders
                    .pay_with(&merchant, order_id, by(wait_ms), true)
                    .await
                {
                    Ok(order_id) => OwnerReply::Placed { order_id },
                    Err(e) => failed(e),
                }
            }
            OwnerRequest::Command {
                suffix,
                payload,
                confirm_ms,
            } => {
                let Some(command) = Command::ALL.into_iter().find(|c| c.suffix() == suffix) else {
                    return OwnerReply::NotDelivered {
                        error: "unknown command".into(),
                    };
                };
                let Ok(payload) = base64::engine::general_purpose::STANDARD.decode(payload) else {
                    return OwnerReply::NotDelivered {
                        error: "bad payload".into(),
                    };
                };
                let payload = Bytes::from(payload);
                let sent = match confirm_ms {
                    Some(ms) => {
                        self.local
                            .send_confirmed(&m, command, payload, Duration::from_millis(ms))
                            .await
                    }
                    None => self.local.send(&m, command, payload).await,
                };
                match sent {
                    Ok(()) => OwnerReply::Delivered,
                    Err(e) => OwnerReply::NotDelivered {
                        error: delivery_name(e).into(),
                    },
                }
            }
            OwnerRequest::Stock => match self.orders.get() {
                Some(orders) => OwnerReply::Stock {
                    items: orders.inventory.view(&m),
                },
                None => OwnerReply::NotDelivered {
                    error: "starting".into(),
                },
            },
            OwnerRequest::Ping { timeout_ms } => {
                match self.local.ping(&m, Duration::from_millis(timeout_ms)).await {
                    Ok(rtt) => OwnerReply::Pong {
                        rtt_us: u64::try_from(rtt.as_micros()).unwrap_or(u64::MAX),
                    },
                    Err(e) => OwnerReply::NotDelivered {
                        error: delivery_name(e).into(),
                    },
                }
            }
        }
    }

    /// Send `req` to the node holding machine `m`, retrying "no responders"
    /// (the owner's subscription is not visible yet, or the machine just
    /// moved and the view has not caught up) for `no_responders_retry`.
    async fn ask(&self, m: &MachineNo, req: &OwnerRequest, wait: Duration) -> Asked {
        let body: Bytes = match serde_json::to_vec(req) {
            Ok(b) => b.into(),
            Err(_) => return Asked::Offline,
        };
        let give_up = Instant::now() + self.settings.no_responders_retry;
        let mut backoff = Duration::from_millis(5);
        loop {
            if self.presence.is_online(m) {
                return Asked::Local;
            }
            let Some(owner) = self.remote(m) else {
                return Asked::Offline;
            };
            let request = async_nats::Request::new()
                .payload(body.clone())
                .timeout(Some(wait));
            match self
                .nats
                .send_request(self.subjects.owner(m, owner.epoch), request)
                .await
            {
                Ok(msg) => match serde_json::from_slice::<OwnerReply>(&msg.payload) {
                    Ok(OwnerReply::Moved) => {}
                    Ok(reply) => return Asked::Reply(reply),
                    Err(_) => return Asked::Lost,
                },
                Err(e) if e.kind() == async_nats::RequestErrorKind::TimedOut => {
                    return Asked::Lost;
                }
                // No responders, or NATS unreachable right now.
                Err(e) => {
                    debug!(machine_no = %m, error = %e, "owner request not delivered; retrying")
                }
            }
            if Instant::now() >= give_up {
                return Asked::Offline;
            }
            self.stats
                .no_responder_retries
                .fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_millis(100));
        }
    }

    /// The owner's answer about order `order_id` never came: it died with
    /// the request, or only the answer was lost (or the caller went away,
    /// `why`). Settle from the database, exactly as for a missing ack, and
    /// never by sending the order again.
    async fn settle_lost(
        &self,
        order_id: u64,
        req: Option<&PlaceRequest>,
        why: GiveUp,
        answer_by: Instant,
    ) -> Result<u64, OrderError> {
        self.stats.forward_lost.fetch_add(1, Ordering::Relaxed);
        let Some(orders) = self.orders.get() else {
            return Err(OrderError::NotAccepted);
        };
        let stored = match self.store.order(order_id).await {
            Ok(o) => o,
            // Nothing known; the order's `accept_by` passes before anyone
            // could accept it for this request.
            Err(_) => return Err(OrderError::NotAccepted),
        };
        match (stored, req) {
            // Not stored (yet): record it given up first, so a paused owner
            // cannot start it later.
            (None, Some(req)) => orders.record_lost(req, order_id, why, answer_by).await,
            (None, None) => Err(OrderError::NotAccepted),
            (Some(o), _) => orders.give_up_lost(o, why, answer_by).await,
        }
    }

    /// Heartbeats, reaping dead nodes, and re-reading ownership.
    async fn liveness(self: Arc<Self>) {
        let every = self
            .settings
            .heartbeat_interval
            .max(Duration::from_millis(100));
        let dead_after = self.settings.node_dead_after;
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Since when our own heartbeats have been succeeding: a node reaps
        // others only after it has itself been healthy for `dead_after`, so
        // when the database comes back after an outage the first node to
        // see it does not declare all the others dead.
        let mut healthy_since: Option<Instant> = None;
        let mut n: u32 = 0;
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            n = n.wrapping_add(1);
            let now = Utc::now();
            match self
                .store
                .node_heartbeat(&self.node, &self.incarnation, now)
                .await
            {
                Ok(true) => {
                    healthy_since.get_or_insert_with(Instant::now);
                }
                Ok(false) => {
                    // Another node declared us dead (we were frozen or cut
                    // off) and wrote our machines offline: our connections
                    // are stale. Close them; they come back with new epochs.
                    self.stats.fenced.fetch_add(1, Ordering::Relaxed);
                    let closed = self.hub.kick_all_machines();
                    warn!(closed, "this node was declared dead by the cluster; closed its machine connections and registering again");
                    healthy_since = None;
                    if let Err(e) = self.register().await {
                        warn!(error = %e, "registering again failed");
                    }
                    continue;
                }
                Err(e) => {
                    healthy_since = None;
                    warn!(error = %e, "node heartbeat failed");
                }
            }
            let hb = Heartbeat {
                node: self.node.clone(),
                incarnation: self.incarnation.clone(),
                machines: self.presence.online_count() as u64,
            };
            self.view.heard(hb.clone());
            self.publish_json(self.subjects.heartbeat(), &hb).await;
            if healthy_since.is_some_and(|t| t.elapsed() >= dead_after) {
                self.reap(now, dead_after).await;
            }
            if n.is_multiple_of(RESYNC_EVERY) {
                match self.store.ownership(None).await {
                    Ok(rows) => self.view.resync(&rows),
                    Err(e) => debug!(error = %e, "ownership re-read failed"),
                }
            }
        }
    }

    async fn reap(&self, now: chrono::DateTime<Utc>, dead_after: Duration) {
        let dead_before =
            now - chrono::Duration::from_std(dead_after).unwrap_or(chrono::Duration::MAX);
        match self.store.reap_nodes(dead_before).await {
            Ok(nodes) => {
                for n in nodes {
                    warn!(node = %n, "node declared dead: no heartbeat");
                }
            }
            Err(e) => {
                debug!(error = %e, "reaping nodes failed");
                return;
            }
        }
        match self.store.orphaned_machines(REAP_BATCH).await {
            Ok(orphans) if !orphans.is_empty() => {
                self.stats
                    .machines_reaped
                    .fetch_add(orphans.len() as u64, Ordering::Relaxed);
                info!(machines = orphans.len(), "machines of dead nodes: offline");
                self.write_offline(&orphans, "node_lost").await;
            }
            Ok(_) => {}
            Err(e) => debug!(error = %e, "reading orphaned machines failed"),
        }
    }

    /// Other nodes' presence notes: the view, and closing a connection
    /// here that another node took over.
    async fn remote_presence(self: Arc<Self>) {
        let Some(mut sub) = self.subscribe(self.subjects.presence()).await else {
            return;
        };
        loop {
            let msg = tokio::select! {
                _ = self.shutdown.cancelled() => return,
                msg = sub.next() => msg,
            };
            let Some(msg) = msg else { return };
            let Ok(note) = serde_json::from_slice::<PresenceNote>(&msg.payload) else {
                continue;
            };
            if note.node == self.node {
                continue;
            }
            self.view.apply(&note);
            if note.online {
                let here = self.presence.online_epoch(&note.machine_no);
                if here.is_some_and(|e| e < note.epoch) {
                    let closed = self.hub.kick_machine(&note.machine_no);
                    self.stats
                        .takeovers_closed
                        .fetch_add(closed as u64, Ordering::Relaxed);
                    info!(machine_no = %note.machine_no, to = %note.node, "machine taken over by another node; closed its connection here");
                }
            }
        }
    }

    async fn heartbeats_in(self: Arc<Self>) {
        let Some(mut sub) = self.subscribe(self.subjects.heartbeat()).await else {
            return;
        };
        loop {
            let msg = tokio::select! {
                _ = self.shutdown.cancelled() => return,
                msg = sub.next() => msg,
            };
            let Some(msg) = msg else { return };
            if let Ok(hb) = serde_json::from_slice::<Heartbeat>(&msg.payload) {
                self.view.heard(hb);
            }
        }
    }

    async fn released_in(self: Arc<Self>) {
        let Some(mut sub) = self.subscribe(self.subjects.released()).await else {
            return;
        };
        loop {
            let msg = tokio::select! {
                _ = self.shutdown.cancelled() => return,
                msg = sub.next() => msg,
            };
            let Some(msg) = msg else { return };
            let Ok(r) = serde_json::from_slice::<Released>(&msg.payload) else {
                continue;
            };
            if self.presence.is_online(&r.machine_no) {
                if let Some(orders) = self.orders.get() {
                    orders.inventory.release(r.machine_no, &r.lines);
                }
            }
        }
    }

    async fn uplinks_in(self: Arc<Self>) {
        let Some(mut sub) = self.subscribe(self.subjects.uplinks()).await else {
            return;
        };
        loop {
            let msg = tokio::select! {
                _ = self.shutdown.cancelled() => return,
                msg = sub.next() => msg,
            };
            let Some(msg) = msg else { return };
            let Some(h) = msg.headers.as_ref() else {
                continue;
            };
            let get = |k: &str| h.get(k).map(|v| v.as_str().to_string());
            if get(wire::H_NODE).as_deref() == Some(self.node.as_str()) {
                continue;
            }
            let Some(topic) = get(wire::H_TOPIC) else {
                continue;
            };
            // Only machine uplinks travel: anything else is not ours to
            // publish into the hub.
            if !matches!(
                vendgate_proto::topic::parse(&topic),
                Some(vendgate_proto::topic::Topic::Uplink(..))
            ) {
                continue;
            }
            let qos = match get(wire::H_QOS).as_deref() {
                Some("0") => QoS::AtMostOnce,
                Some("2") => QoS::ExactlyOnce,
                _ => QoS::AtLeastOnce,
            };
            let retain = get(wire::H_RETAIN).as_deref() == Some("1");
            self.stats.uplinks_in.fetch_add(1, Ordering::Relaxed);
            self.hub.publish(&topic, msg.payload, qos, retain);
        }
    }

    async fn uplinks_out(self: Arc<Self>, mut rx: mpsc::Receiver<UplinkCopy>) {
        let subject = self.subjects.uplinks();
        loop {
            let copy = tokio::select! {
                _ = self.shutdown.cancelled() => return,
                c = rx.recv() => c,
            };
            let Some(c) = copy else { return };
            let mut h = async_nats::HeaderMap::new();
            h.insert(wire::H_TOPIC, c.topic.as_str());
            h.insert(wire::H_NODE, self.node.as_str());
            h.insert(
                wire::H_QOS,
                match c.qos {
                    QoS::AtMostOnce => "0",
                    QoS::AtLeastOnce => "1",
                    QoS::ExactlyOnce => "2",
                },
            );
            h.insert(wire::H_RETAIN, if c.retain { "1" } else { "0" });
            if self
                .nats
                .publish_with_headers(subject.clone(), h, c.payload)
                .await
                .is_ok()
            {
                self.stats.uplinks_out.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    async fn subscribe(&self, subject: String) -> Option<async_nats::Subscriber> {
        match self.nats.subscribe(subject.clone()).await {
            Ok(s) => Some(s),
            Err(e) => {
                warn!(%subject, error = %e, "NATS subscribe failed");
                None
            }
        }
    }

    /// Stock figures of machine `m` from the node holding it (stock and
    /// reservations live there); None when it is not held elsewhere or
    /// does not answer within `wait`.
    pub async fn remote_stock(&self, m: &MachineNo, wait: Duration) -> Option<Vec<StockView>> {
        if self.presence.is_online(m) || self.remote(m).is_none() {
            return None;
        }
        match self.ask(m, &OwnerRequest::Stock, wait).await {
            Asked::Reply(OwnerReply::Stock { items }) => Some(items),
            _ => None,
        }
    }

    /// Each node's machine count as its heartbeats say (live nodes only).
    pub fn node_machines(&self) -> std::collections::HashMap<String, u64> {
        self.view.live_nodes(self.settings.node_dead_after)
    }

    /// Shutdown, after the edge closed every connection: tell the other
    /// nodes at once that this node's machines are gone (their presence
    /// notes would otherwise wait for the database re-read), stop serving,
    /// and flush NATS.
    pub async fn leave(&self) {
        let held: Vec<(MachineNo, u64)> = self
            .serving
            .iter()
            .map(|e| (*e.key(), e.value().0))
            .collect();
        let now = Utc::now();
        for (m, epoch) in held {
            if let Some((_, (_, stop))) = self.serving.remove(&m) {
                stop.cancel();
            }
            let note = PresenceNote {
                machine_no: m,
                online: false,
                epoch,
                node: self.node.clone(),
                at: now,
            };
            self.publish_json(self.subjects.presence(), &note).await;
        }
        let _ = tokio::time::timeout(Duration::from_secs(2), self.nats.flush()).await;
    }
}

fn delivery_name(e: DeliveryError) -> &'static str {
    match e {
        DeliveryError::NotConnected => "not_connected",
        DeliveryError::NotSubscribed => "not_subscribed",
        DeliveryError::Backpressure => "backpressure",
        DeliveryError::Timeout => "timeout",
    }
}

fn delivery_from(name: &str) -> DeliveryError {
    match name {
        "not_subscribed" => DeliveryError::NotSubscribed,
        "backpressure" => DeliveryError::Backpressure,
        "timeout" => DeliveryError::Timeout,
        _ => DeliveryError::NotConnected,
    }
}

/// `[cluster] node_id`, or the host name.
pub fn node_id(configured: &str) -> String {
    if !configured.is_empty() {
        return configured.to_string();
    }
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "vendgate".into())
}

#[async_trait]
impl EpochSource for Cluster {
    async fn acquire(&self, machine_no: MachineNo) -> Option<u64> {
        match self
            .store
            .take_ownership(&machine_no, &self.node, Utc::now())
            .await
        {
            Ok(e) => e,
            Err(e) => {
                warn!(%machine_no, error = %e, "cannot take the machine's epoch");
                None
            }
        }
    }
}

impl UplinkForwarder for Cluster {
    fn forward(&self, topic: &str, payload: &Bytes, qos: QoS, retain: bool) {
        let copy = UplinkCopy {
            topic: topic.to_string(),
            payload: payload.clone(),
            qos,
            retain,
        };
        if self.uplinks.try_send(copy).is_err() {
            self.stats.uplinks_dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

#[async_trait]
impl RemoteMachines for Cluster {
    fn is_remote(&self, m: &MachineNo) -> bool {
        self.remote(m).is_some()
    }

    fn answer_slack(&self) -> Duration {
        self.settings.owner_answer_slack
    }

    async fn place(&self, req: &PlaceRequest, order_id: u64) -> Result<u64, OrderError> {
        self.stats.forwarded.fetch_add(1, Ordering::Relaxed);
        let wait = req.answer_by.saturating_duration_since(Instant::now());
        // The caller going away before the answer gives the order up.
        let mut gone = CallerGone {
            cluster: self.me.clone(),
            order_id,
            req: Some(req.clone()),
        };
        let body = OwnerRequest::Place(PlaceOnOwner {
            order_id,
            merchant: req.merchant.clone(),
            machine_no: req.machine_no,
            lines: req.lines.clone(),
            out_trade_no: req.out_trade_no.clone(),
            pay_later: req.pay_later,
            wait_ms: u64::try_from(wait.as_millis()).unwrap_or(u64::MAX),
        });
        let asked = self.ask(&req.machine_no, &body, wait).await;
        gone.req = None;
        match asked {
            Asked::Reply(OwnerReply::Placed { order_id }) => Ok(order_id),
            Asked::Reply(OwnerReply::Failed { code, reason }) => {
                Err(wire::order_error(code, reason))
            }
            Asked::Reply(_) => Err(OrderError::NotAccepted),
            Asked::Local => match self.orders.get() {
                // It moved here meanwhile: the local path.
                Some(orders) => orders.place(req.clone()).await,
                None => Err(OrderError::Internal),
            },
            Asked::Offline => Err(OrderError::Offline),
            Asked::Lost => {
                self.settle_lost(order_id, Some(req), GiveUp::OwnerLost, req.answer_by)
                    .await
            }
        }
    }

    async fn pay(
        &self,
        m: &MachineNo,
        merchant: &str,
        order_id: u64,
        answer_by: Instant,
    ) -> Result<u64, OrderError> {
        self.stats.forwarded.fetch_add(1, Ordering::Relaxed);
        let wait = answer_by.saturating_duration_since(Instant::now());
        let body = OwnerRequest::Pay {
            merchant: merchant.to_string(),
            order_id,
            wait_ms: u64::try_from(wait.as_millis()).unwrap_or(u64::MAX),
        };
        match self.ask(m, &body, wait).await {
            Asked::Reply(OwnerReply::Placed { order_id }) => Ok(order_id),
            Asked::Reply(OwnerReply::Failed { code, reason }) => {
                Err(wire::order_error(code, reason))
            }
            Asked::Reply(_) => Err(OrderError::NotAccepted),
            Asked::Local => match self.orders.get() {
                Some(orders) => orders.pay(merchant, order_id, answer_by).await,
                None => Err(OrderError::Internal),
            },
            Asked::Offline => Err(OrderError::Offline),
            Asked::Lost => match self.store.order(order_id).await {
                // The owner never paid it: it stays unpaid.
                Ok(Some(o)) if o.status == Status::AwaitingPayment => Err(OrderError::Offline),
                _ => {
                    self.settle_lost(order_id, None, GiveUp::OwnerLost, answer_by)
                        .await
                }
            },
        }
    }

    fn released(&self, m: &MachineNo, lines: &[Line]) {
        let Some(me) = self.me.upgrade() else { return };
        let r = Released {
            machine_no: *m,
            lines: lines.to_vec(),
        };
        tokio::spawn(async move { me.publish_json(me.subjects.released(), &r).await });
    }
}

#[async_trait]
impl CommandBus for Cluster {
    async fn send(
        &self,
        machine_no: &MachineNo,
        command: Command,
        payload: Bytes,
    ) -> Result<(), DeliveryError> {
        self.command(machine_no, command, payload, None).await
    }

    async fn send_confirmed(
        &self,
        machine_no: &MachineNo,
        command: Command,
        payload: Bytes,
        within: Duration,
    ) -> Result<(), DeliveryError> {
        self.command(machine_no, command, payload, Some(within))
            .await
    }

    async fn ping(
        &self,
        machine_no: &MachineNo,
        timeout: Duration,
    ) -> Result<Duration, DeliveryError> {
        if self.presence.is_online(machine_no) {
            return self.local.ping(machine_no, timeout).await;
        }
        let body = OwnerRequest::Ping {
            timeout_ms: u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
        };
        match self
            .ask(machine_no, &body, timeout + Duration::from_millis(500))
            .await
        {
            Asked::Reply(OwnerReply::Pong { rtt_us }) => Ok(Duration::from_micros(rtt_us)),
            Asked::Reply(OwnerReply::NotDelivered { error }) => Err(delivery_from(&error)),
            Asked::Reply(_) | Asked::Offline => Err(DeliveryError::NotConnected),
            Asked::Local => self.local.ping(machine_no, timeout).await,
            Asked::Lost => Err(DeliveryError::Timeout),
        }
    }
}

impl Cluster {
    /// A command to machine `m` wherever it is connected; with `confirm`,
    /// delivered means acknowledged by the machine within that time.
    async fn command(
        &self,
        machine_no: &MachineNo,
        command: Command,
        payload: Bytes,
        confirm: Option<Duration>,
    ) -> Result<(), DeliveryError> {
        let local = |payload| async move {
            match confirm {
                Some(w) => {
                    self.local
                        .send_confirmed(machine_no, command, payload, w)
                        .await
                }
                None => self.local.send(machine_no, command, payload).await,
            }
        };
        if self.presence.is_online(machine_no) {
            return local(payload).await;
        }
        let body = OwnerRequest::Command {
            suffix: command.suffix().to_string(),
            payload: base64::engine::general_purpose::STANDARD.encode(&payload),
            confirm_ms: confirm.map(|w| u64::try_from(w.as_millis()).unwrap_or(u64::MAX)),
        };
        let wait = Duration::from_secs(2) + confirm.unwrap_or_default();
        match self.ask(machine_no, &body, wait).await {
            Asked::Reply(OwnerReply::Delivered) => Ok(()),
            Asked::Reply(OwnerReply::NotDelivered { error }) => Err(delivery_from(&error)),
            Asked::Reply(_) | Asked::Offline => Err(DeliveryError::NotConnected),
            Asked::Local => local(payload).await,
            Asked::Lost => Err(DeliveryError::Timeout),
        }
    }
}

/// Cluster mode's caller-gone rule for a forwarded order: if the request is
/// dropped (its merchant's connection closed) while the owner decides, the
/// order is given up in storage — before its acceptance is recorded, the
/// owner's acceptance compare-and-set then fails and it sends a cancel
/// instead of `go`.
struct CallerGone {
    cluster: Weak<Cluster>,
    order_id: u64,
    req: Option<PlaceRequest>,
}

impl Drop for CallerGone {
    fn drop(&mut self) {
        let (Some(req), Some(cluster)) = (self.req.take(), self.cluster.upgrade()) else {
            return;
        };
        let order_id = self.order_id;
        // Bounded like the request it replaces.
        let answer_by = Instant::now() + cluster.settings.owner_answer_slack;
        tokio::spawn(async move {
            let _ = cluster
                .settle_lost(order_id, Some(&req), GiveUp::CallerGone, answer_by)
                .await;
        });
    }
}
