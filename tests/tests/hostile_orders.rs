//! Hostile load on the order side from a stolen machine credential: what
//! the machine sends can neither grow an order's history nor the database
//! without bound, nor set a negative price, and an honest machine keeps
//! getting its orders through. Real sockets, a real database.

use std::sync::atomic::Ordering;
use std::time::Duration;

use serde_json::{json, Value};
use vendgate_e2e::*;
use vendgate_proto::machine::MachineNo;

const STOLEN: &str = "40000001";
const HONEST: &str = "40000002";

fn code(v: &Value) -> i64 {
    v["code"].as_i64().expect("code")
}

#[tokio::test]
async fn a_stolen_machine_cannot_grow_order_history_or_set_negative_prices() {
    let gw = TestGateway::start_with(|s| {
        s.orders.accept_timeout = Duration::from_secs(1);
        s.orders.request_timeout = Duration::from_secs(2);
        // The flood below is within the machine's packet rate, so that
        // every message reaches the order side (the rate is tested apart).
        s.mqtt.machine_publish_rate = 1000;
        s.mqtt.machine_publish_burst = 1000;
    })
    .await;
    let (appid, secret) = gw.merchant("shop").await;
    let stolen_secret = gw.machine(&appid, STOLEN).await;
    let honest_secret = gw.machine(&appid, HONEST).await;
    let api = Api::new(&gw, &appid, &secret);
    let attacker = hand_machine(&gw, STOLEN, &stolen_secret, 10, 350).await;
    let honest = ready_sim(&gw, sim_config(&gw, HONEST, &honest_secret)).await;

    // An order the attacker never answers: given up, 30002.
    let v = api.order(STOLEN, &[(1, 1)]).await;
    assert_eq!(code(&v), 30002, "{v}");
    let stolen_no: MachineNo = STOLEN.parse().expect("machine_no");
    let id = gw
        .handle
        .store
        .open_orders(&stolen_no)
        .await
        .expect("orders")
        .first()
        .map(|o| o.order_id);
    assert!(id.is_none(), "the given-up order holds nothing");
    let rejected = gw
        .handle
        .store
        .orders_in_status(&[vendgate::domain::order::Status::Rejected])
        .await
        .expect("orders");
    let id = rejected.first().expect("the rejected order").order_id;

    let stats = &gw.handle.orders.stats;
    let (dups, unmatched, malformed) = (
        stats.duplicate_device_messages.load(Ordering::Relaxed),
        stats.rejected_device_messages.load(Ordering::Relaxed),
        stats.malformed_device_messages.load(Ordering::Relaxed),
    );
    // 100 late acceptances of the given-up order (each answered with a
    // cancel, each cancel a timeline event) and 100 results for orders that
    // do not exist, each with 8 KB of attacker text.
    let junk = "x".repeat(8 * 1024);
    let topic = |s: &str| format!("vend/v1/{STOLEN}/{s}");
    for i in 0..100u64 {
        attacker
            .client
            .publish(
                topic("ack"),
                rumqttc::QoS::AtLeastOnce,
                false,
                json!({ "order_id": id, "accepted": true }).to_string(),
            )
            .await
            .expect("ack queued");
        attacker
            .client
            .publish(
                topic("result"),
                rumqttc::QoS::AtLeastOnce,
                false,
                json!({ "order_id": 9_000_000 + i, "items": [], "error": junk }).to_string(),
            )
            .await
            .expect("result queued");
    }
    // A snapshot with a negative price.
    attacker
        .client
        .publish(
            topic("inventory"),
            rumqttc::QoS::AtLeastOnce,
            false,
            r#"{"items":[{"product_id":1,"stock":10,"price":-350}]}"#,
        )
        .await
        .expect("inventory queued");

    wait_until("every hostile message handled", || {
        stats.duplicate_device_messages.load(Ordering::Relaxed) >= dups + 100
            && stats.rejected_device_messages.load(Ordering::Relaxed) >= unmatched + 100
            && stats.malformed_device_messages.load(Ordering::Relaxed) > malformed
    })
    .await;
    // Every late ack's cancel is on its way; the timeline keeps at most
    // MAX_EXTRA_EVENTS of them and counts the rest.
    let store = gw.handle.store.clone();
    let cap = vendgate::storage::MAX_EXTRA_EVENTS;
    wait_until_async("the cancels' events counted", || {
        let store = store.clone();
        async move {
            let o = store.order(id).await.ok().flatten();
            let kept = store.order_events(id).await.unwrap_or_default().len() as i64;
            o.is_some_and(|o| kept + o.events_dropped >= 100)
        }
    })
    .await;
    let events = store.order_events(id).await.expect("events");
    let status_changes = events
        .iter()
        .filter(|e| matches!(e.kind.as_str(), "created" | "not_accepted"))
        .count() as i64;
    assert!(
        events.len() as i64 <= cap + status_changes,
        "{} events kept",
        events.len()
    );
    assert!(
        events
            .iter()
            .all(|e| !e.detail.to_string().contains("xxxxxxxx")),
        "no attacker text stored"
    );
    let o = api.get(&format!("/orders/{id}")).await;
    assert_eq!(o["data"]["status"], "rejected");
    assert!(o["data"]["events_dropped"].as_i64().unwrap_or(0) > 0, "{o}");
    // The negative price changed nothing: the last good snapshot stands.
    let stock = gw.handle.orders.inventory.view(&stolen_no);
    assert!(stock.iter().all(|i| i.price == 350), "{stock:?}");

    // The honest machine's orders go through as ever.
    let v = api.order(HONEST, &[(1, 1)]).await;
    assert_eq!(code(&v), 0, "{v}");
    let id = v["data"]["order_id"].as_u64().expect("id");
    api.wait_status(id, "completed").await;
    assert!(honest.was_dispensed(id));
    gw.stop().await;
}
