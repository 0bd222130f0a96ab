//! The client side: this node's NATS link to the others, built before the
//! order service and needing nothing of it. It holds the view of which
//! machines are online where, asks the node holding a machine to place an
//! order, take a payment, run a command or report stock (retrying "no
//! responders" briefly), takes epochs for new connections, and carries the
//! background tasks of [`super::liveness`] and [`super::copies`].

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;

use anyhow::Context;
use async_trait::async_trait;
use base64::Engine;
use bytes::Bytes;
use dashmap::DashMap;
use futures::StreamExt;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use vendgate_proto::machine::MachineNo;
use vendgate_proto::topic::Command;

use super::copies::{UplinkCopies, UplinkCopy};
use super::wire::{self, OwnerReply, OwnerRequest, PlaceOnOwner, Released, Subjects};
use super::{node_id, ClusterStats};
use crate::config::Settings;
use crate::domain::order::Line;
use crate::edge::Hub;
use crate::fleet::presence::PresenceRegistry;
use crate::fleet::view::{self, ClusterView};
use crate::link::commands::{CommandBus, DeliveryError, LocalCommands};
use crate::notifier::Notifier;
use crate::orders::inventory::StockView;
use crate::orders::{OrderError, OtherNodes, PlaceRequest, StockElsewhere};
use crate::storage::Storage;

/// What asking the node that holds a machine came to.
#[derive(Debug)]
pub enum OwnerAnswer<T> {
    /// Its answer.
    Answered(T),
    /// The machine is connected here now: do it here.
    HeldHere,
    /// Not online anywhere (or no owner answered within the retry window).
    NotHeld,
    /// The request left but no answer came in time.
    NoAnswer,
}

/// What the cluster client is built from.
pub struct ClusterParts {
    pub store: Arc<dyn Storage>,
    /// Where other nodes' uplink copies are published, and machines taken
    /// over elsewhere are kicked.
    pub hub: Arc<Hub>,
    pub presence: Arc<PresenceRegistry>,
    /// Commands for machines held here, asked for by other nodes.
    pub local: Arc<LocalCommands>,
    pub notifier: Arc<Notifier>,
    /// The receiving end of the hub's uplink copies ([`super::uplink_copies`]).
    pub copies: UplinkCopies,
    /// The cluster view this client keeps up to date.
    pub view: Arc<ClusterView>,
}

/// This node's link to the cluster.
pub struct Cluster {
    pub(super) node: String,
    pub(super) incarnation: String,
    pub(super) settings: crate::config::ClusterSettings,
    pub(super) subjects: Subjects,
    pub(super) nats: async_nats::Client,
    pub(super) store: Arc<dyn Storage>,
    pub(super) hub: Arc<Hub>,
    pub(super) presence: Arc<PresenceRegistry>,
    pub(super) local: Arc<LocalCommands>,
    pub(super) notifier: Arc<Notifier>,
    /// Which machines are online on which node (shared with `Fleet`).
    pub view: Arc<ClusterView>,
    /// The connections held here, by epoch, as announced to the other
    /// nodes (see [`Self::leave`]).
    pub(super) held: DashMap<MachineNo, u64>,
    /// The copies the hub's `UplinkCopier` queued, until [`Self::spawn`]
    /// starts publishing them.
    uplinks_rx: std::sync::Mutex<Option<mpsc::Receiver<UplinkCopy>>>,
    /// Shared with the hub's `UplinkCopier`, which counts dropped copies.
    pub stats: Arc<ClusterStats>,
    pub(super) shutdown: CancellationToken,
    me: Weak<Cluster>,
}

impl Cluster {
    /// Connect to NATS (in the background: the node starts, and `/readyz`
    /// says whether NATS is reachable) and register this node.
    pub async fn start(
        settings: &Settings,
        parts: ClusterParts,
        shutdown: CancellationToken,
    ) -> anyhow::Result<Arc<Self>> {
        let ClusterParts {
            store,
            hub,
            presence,
            local,
            notifier,
            copies,
            view,
        } = parts;
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
        let UplinkCopies {
            rx: uplinks_rx,
            stats,
        } = copies;
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
            notifier,
            view,
            held: DashMap::new(),
            uplinks_rx: std::sync::Mutex::new(Some(uplinks_rx)),
            stats,
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

    /// What the order service is told of the other nodes.
    pub fn other_nodes(self: &Arc<Self>) -> OtherNodes {
        OtherNodes {
            stock: self.clone(),
            answer_slack: self.settings.owner_answer_slack,
        }
    }

    /// How much longer than `accept_timeout` a requester waits for the
    /// owning node's answer.
    pub fn answer_slack(&self) -> Duration {
        self.settings.owner_answer_slack
    }

    /// Whether machine `m` is online on another node.
    pub fn held_elsewhere(&self, m: &MachineNo) -> bool {
        self.remote(m).is_some()
    }

    pub(super) async fn publish_json<T: serde::Serialize>(&self, subject: String, body: &T) {
        match serde_json::to_vec(body) {
            Ok(b) => {
                if let Err(e) = self.nats.publish(subject, b.into()).await {
                    debug!(error = %e, "NATS publish failed");
                }
            }
            Err(e) => warn!(error = %e, "cannot encode a cluster message"),
        }
    }

    /// Start the background tasks of the client side; they end at shutdown.
    /// (The owner side's are [`super::OwnerServer::spawn`].)
    pub fn spawn(self: &Arc<Self>) -> Vec<JoinHandle<()>> {
        let mut tasks = vec![
            tokio::spawn(self.clone().remote_presence()),
            tokio::spawn(self.clone().liveness()),
            tokio::spawn(self.clone().heartbeats_in()),
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

    /// The next message of `sub`; None at shutdown or when the
    /// subscription ends (the loops that read one stop there).
    pub(super) async fn next_message(
        &self,
        sub: &mut async_nats::Subscriber,
    ) -> Option<async_nats::Message> {
        tokio::select! {
            _ = self.shutdown.cancelled() => None,
            msg = sub.next() => msg,
        }
    }

    pub(super) async fn subscribe(&self, subject: String) -> Option<async_nats::Subscriber> {
        match self.nats.subscribe(subject.clone()).await {
            Ok(s) => Some(s),
            Err(e) => {
                warn!(%subject, error = %e, "NATS subscribe failed");
                None
            }
        }
    }

    /// Send `req` to the node holding machine `m`, retrying "no responders"
    /// (the owner's subscription is not visible yet, or the machine just
    /// moved and the view has not caught up) for `no_responders_retry`.
    async fn ask(
        &self,
        m: &MachineNo,
        req: &OwnerRequest,
        wait: Duration,
    ) -> OwnerAnswer<OwnerReply> {
        let body: Bytes = match serde_json::to_vec(req) {
            Ok(b) => b.into(),
            Err(_) => return OwnerAnswer::NotHeld,
        };
        let give_up = Instant::now() + self.settings.no_responders_retry;
        let mut backoff = Duration::from_millis(5);
        loop {
            if self.presence.is_online(m) {
                return OwnerAnswer::HeldHere;
            }
            let Some(owner) = self.remote(m) else {
                return OwnerAnswer::NotHeld;
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
                    Ok(reply) => return OwnerAnswer::Answered(reply),
                    Err(_) => return OwnerAnswer::NoAnswer,
                },
                Err(e) if e.kind() == async_nats::RequestErrorKind::TimedOut => {
                    return OwnerAnswer::NoAnswer;
                }
                // No responders, or NATS unreachable right now.
                Err(e) => {
                    debug!(machine_no = %m, error = %e, "owner request not delivered; retrying")
                }
            }
            if Instant::now() >= give_up {
                return OwnerAnswer::NotHeld;
            }
            self.stats
                .no_responder_retries
                .fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_millis(100));
        }
    }

    /// Have the node holding `req`'s machine place the order under
    /// `order_id` (it runs its local path, and answers `owner_answer_slack`
    /// before `req.answer_by`).
    pub async fn place_on_owner(
        &self,
        req: &PlaceRequest,
        order_id: u64,
    ) -> OwnerAnswer<Result<u64, OrderError>> {
        self.stats.forwarded.fetch_add(1, Ordering::Relaxed);
        let wait = req.answer_by.saturating_duration_since(Instant::now());
        let body = OwnerRequest::Place(PlaceOnOwner {
            order_id,
            merchant: req.merchant.clone(),
            machine_no: req.machine_no,
            lines: req.lines.clone(),
            out_trade_no: req.out_trade_no.clone(),
            pay_later: req.pay_later,
            wait_ms: u64::try_from(wait.as_millis()).unwrap_or(u64::MAX),
        });
        order_answer(self.ask(&req.machine_no, &body, wait).await)
    }

    /// Have the node holding machine `m` dispatch a paid `pay_later` order.
    pub async fn pay_on_owner(
        &self,
        m: &MachineNo,
        merchant: &str,
        order_id: u64,
        answer_by: Instant,
    ) -> OwnerAnswer<Result<u64, OrderError>> {
        self.stats.forwarded.fetch_add(1, Ordering::Relaxed);
        let wait = answer_by.saturating_duration_since(Instant::now());
        let body = OwnerRequest::Pay {
            merchant: merchant.to_string(),
            order_id,
            wait_ms: u64::try_from(wait.as_millis()).unwrap_or(u64::MAX),
        };
        order_answer(self.ask(m, &body, wait).await)
    }

    /// Stock figures of machine `m` from the node holding it (stock and
    /// reservations live there); None when it is not held elsewhere or
    /// does not answer within `wait`.
    pub async fn remote_stock(&self, m: &MachineNo, wait: Duration) -> Option<Vec<StockView>> {
        if self.presence.is_online(m) || self.remote(m).is_none() {
            return None;
        }
        match self.ask(m, &OwnerRequest::Stock, wait).await {
            OwnerAnswer::Answered(OwnerReply::Stock { items }) => Some(items),
            _ => None,
        }
    }

    /// Each node's machine count as its heartbeats say (live nodes only).
    pub fn node_machines(&self) -> std::collections::HashMap<String, u64> {
        self.view.live_nodes(self.settings.node_dead_after)
    }

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
            OwnerAnswer::Answered(OwnerReply::Delivered) => Ok(()),
            OwnerAnswer::Answered(OwnerReply::NotDelivered { error }) => {
                Err(wire::delivery_from(&error))
            }
            OwnerAnswer::Answered(_) | OwnerAnswer::NotHeld => Err(DeliveryError::NotConnected),
            OwnerAnswer::HeldHere => local(payload).await,
            OwnerAnswer::NoAnswer => Err(DeliveryError::Timeout),
        }
    }
}

/// An order's answer from the owner's reply.
fn order_answer(a: OwnerAnswer<OwnerReply>) -> OwnerAnswer<Result<u64, OrderError>> {
    match a {
        OwnerAnswer::Answered(OwnerReply::Placed { order_id }) => {
            OwnerAnswer::Answered(Ok(order_id))
        }
        OwnerAnswer::Answered(OwnerReply::Failed { code, reason }) => {
            OwnerAnswer::Answered(Err(wire::order_error(code, reason)))
        }
        OwnerAnswer::Answered(_) => OwnerAnswer::Answered(Err(OrderError::NotAccepted)),
        OwnerAnswer::HeldHere => OwnerAnswer::HeldHere,
        OwnerAnswer::NotHeld => OwnerAnswer::NotHeld,
        OwnerAnswer::NoAnswer => OwnerAnswer::NoAnswer,
    }
}

impl StockElsewhere for Cluster {
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
            OwnerAnswer::Answered(OwnerReply::Pong { rtt_us }) => Ok(Duration::from_micros(rtt_us)),
            OwnerAnswer::Answered(OwnerReply::NotDelivered { error }) => {
                Err(wire::delivery_from(&error))
            }
            OwnerAnswer::Answered(_) | OwnerAnswer::NotHeld => Err(DeliveryError::NotConnected),
            OwnerAnswer::HeldHere => self.local.ping(machine_no, timeout).await,
            OwnerAnswer::NoAnswer => Err(DeliveryError::Timeout),
        }
    }
}
