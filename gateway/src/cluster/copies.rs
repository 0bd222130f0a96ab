//! Uplink copies: every machine uplink this node's hub receives is copied
//! to the other nodes' hubs over NATS (`[cluster] forward_uplinks`), so a
//! service client connected to any node sees every machine.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use rumqttc::mqttbytes::QoS;
use tokio::sync::mpsc;

use super::{wire, Cluster, ClusterStats};
use crate::edge::UplinkForwarder;

/// Uplink copies waiting for NATS; beyond, copies are dropped and counted.
pub(super) const UPLINK_QUEUE: usize = 16 * 1024;

/// A forwarded uplink on its way to NATS.
pub(super) struct UplinkCopy {
    topic: String,
    payload: Bytes,
    qos: QoS,
    retain: bool,
}

impl Cluster {
    pub(super) async fn uplinks_in(self: Arc<Self>) {
        let Some(mut sub) = self.subscribe(self.subjects.uplinks()).await else {
            return;
        };
        while let Some(msg) = self.next_message(&mut sub).await {
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

    pub(super) async fn uplinks_out(self: Arc<Self>, mut rx: mpsc::Receiver<UplinkCopy>) {
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
}

/// The sending end of uplink copies: the hub is given it at construction
/// (its `UplinkForwarder`), before the cluster client exists.
pub struct UplinkCopier {
    tx: mpsc::Sender<UplinkCopy>,
    stats: Arc<ClusterStats>,
}

/// The receiving end, which the cluster client publishes to NATS.
pub struct UplinkCopies {
    pub(super) rx: mpsc::Receiver<UplinkCopy>,
    pub(super) stats: Arc<ClusterStats>,
}

/// The two ends of the uplink copies' queue ([`UPLINK_QUEUE`] copies at
/// most), sharing the cluster's counters.
pub fn uplink_copies() -> (Arc<UplinkCopier>, UplinkCopies) {
    let (tx, rx) = mpsc::channel(UPLINK_QUEUE);
    let stats = Arc::new(ClusterStats::default());
    (
        Arc::new(UplinkCopier {
            tx,
            stats: stats.clone(),
        }),
        UplinkCopies { rx, stats },
    )
}

impl UplinkForwarder for UplinkCopier {
    fn forward(&self, topic: &str, payload: &Bytes, qos: QoS, retain: bool) {
        let copy = UplinkCopy {
            topic: topic.to_string(),
            payload: payload.clone(),
            qos,
            retain,
        };
        if self.tx.try_send(copy).is_err() {
            self.stats.uplinks_dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}
