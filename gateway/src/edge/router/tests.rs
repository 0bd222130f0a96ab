//! The router's unit tests: fan-out, take-over, persistent sessions, budgets, the deny list.

use std::time::Duration;

use super::*;

fn session(id: u64, client: &str, class: ClientClass) -> (Arc<Session>, OutboxRx) {
    let (tx, rx) = outbox(4);
    (
        Arc::new(Session::new(id, client.into(), class, false, tx)),
        rx,
    )
}

#[test]
fn machine_receives_only_subscribed_commands() {
    let r = Router::new(10);
    let m: MachineNo = "12345678".parse().unwrap();
    let (s, mut rx) = session(1, "12345678", ClientClass::Machine(m));
    r.register(s.clone());
    let t = "vend/v1/12345678/cmd/ping";
    assert_eq!(
        r.publish(t, Bytes::from_static(b"{}"), QoS::AtLeastOnce, false),
        MachineDelivery::NotSubscribed
    );
    s.subscribe("vend/v1/12345678/cmd/#", QoS::AtLeastOnce);
    assert_eq!(
        r.publish(t, Bytes::from_static(b"{}"), QoS::AtLeastOnce, false),
        MachineDelivery::Queued
    );
    assert_eq!(rx.try_recv().unwrap().qos, QoS::AtLeastOnce);
    assert_eq!(
        r.publish(
            "vend/v1/87654321/cmd/ping",
            Bytes::new(),
            QoS::AtLeastOnce,
            false
        ),
        MachineDelivery::NotConnected
    );
}

#[test]
fn take_over_kicks_old_and_stale_unregister_keeps_new() {
    let r = Router::new(10);
    let (a, _ra) = session(1, "svc", ClientClass::Service);
    let (b, _rb) = session(2, "svc", ClientClass::Service);
    assert!(!r.register(a.clone()).took_over);
    assert!(r.register(b.clone()).took_over);
    assert_eq!(a.kick_reason(), Some(KickReason::TakeOver));
    r.unregister(&a);
    assert_eq!(r.session_count(), 1);
    r.unregister(&b);
    assert_eq!(r.session_count(), 0);
}

#[test]
fn retained_set_clear_and_qos_downgrade() {
    let r = Router::new(1);
    r.publish("a/b", Bytes::from_static(b"x"), QoS::AtLeastOnce, true);
    r.publish("a/c", Bytes::from_static(b"y"), QoS::AtLeastOnce, true);
    assert_eq!(r.stats.retained_refused.load(Ordering::Relaxed), 1);
    let got = r.retained_for("a/#", QoS::AtMostOnce);
    assert_eq!(got.len(), 1);
    assert!(got[0].retain);
    assert_eq!(got[0].qos, QoS::AtMostOnce);
    r.publish("a/b", Bytes::new(), QoS::AtMostOnce, true);
    assert!(r.retained_for("#", QoS::AtLeastOnce).is_empty());
}

#[test]
fn retained_lookup_by_prefix_finds_exactly_the_matches() {
    let r = Router::new(100);
    for t in ["a/b", "a/c/d", "a/cc/d", "b/x", "é/x", "$SYS/x"] {
        r.publish(t, Bytes::from_static(b"1"), QoS::AtMostOnce, true);
    }
    let topics = |f: &str| {
        let mut v: Vec<String> = r
            .retained_for(f, QoS::AtMostOnce)
            .iter()
            .map(|o| o.topic.to_string())
            .collect();
        v.sort();
        v
    };
    assert_eq!(topics("a/+/d"), vec!["a/c/d", "a/cc/d"]);
    assert_eq!(topics("a/b"), vec!["a/b"]);
    assert_eq!(topics("é/#"), vec!["é/x"]);
    assert_eq!(
        topics("#").len(),
        5,
        "$ topics are not matched by a leading wildcard"
    );
    assert!(topics("c/#").is_empty());
}

#[test]
fn full_queue_kicks_slow_service_consumer() {
    let r = Router::new(10);
    let (s, _rx) = session(1, "svc", ClientClass::Service);
    r.register(s.clone());
    s.subscribe("#", QoS::AtMostOnce);
    r.service_subscriptions_changed(&s);
    for _ in 0..5 {
        r.publish("x", Bytes::from_static(b"1"), QoS::AtMostOnce, false);
    }
    assert_eq!(s.kick_reason(), Some(KickReason::SlowConsumer));
}

fn persistent(id: u64, client: &str) -> (Arc<Session>, OutboxRx) {
    let (tx, rx) = outbox(8);
    let s = Session::new(id, client.into(), ClientClass::Service, true, tx);
    (Arc::new(s), rx)
}

#[test]
fn persistent_session_parks_queues_bounded_and_resumes() {
    let limits = SessionLimits {
        max_queued: 2,
        ..SessionLimits::default()
    };
    let r = Router::with_limits(10, limits);
    let (a, mut rxa) = persistent(1, "svc");
    assert!(!r.register(a.clone()).session_present);
    a.subscribe("x/#", QoS::ExactlyOnce);
    r.service_subscriptions_changed(&a);
    r.close(&a, &mut rxa, Some(SessionState::default()));
    assert_eq!(r.parked_count(), 1);
    for p in ["1", "2", "3"] {
        r.publish("x/y", Bytes::from(p), QoS::AtLeastOnce, false);
    }
    // QoS 0 is not queued for an away client.
    r.publish("x/y", Bytes::from_static(b"0"), QoS::AtMostOnce, false);
    assert_eq!(r.stats.session_dropped.load(Ordering::Relaxed), 1);

    let (b, _rxb) = persistent(2, "svc");
    let reg = r.register(b.clone());
    assert!(reg.session_present);
    let got: Vec<_> = reg
        .resumed
        .queue
        .iter()
        .map(|m| m.payload.clone())
        .collect();
    assert_eq!(got, vec![Bytes::from("1"), Bytes::from("2")]);
    assert_eq!(
        b.subscriptions(),
        vec![("x/#".to_string(), QoS::ExactlyOnce)]
    );
    assert_eq!(r.parked_count(), 0);
}

#[test]
fn clean_session_discards_and_expiry_forgets() {
    let r = Router::with_limits(
        10,
        SessionLimits {
            expiry: Duration::ZERO,
            ..SessionLimits::default()
        },
    );
    let (a, mut rxa) = persistent(1, "svc");
    r.register(a.clone());
    a.subscribe("x", QoS::AtLeastOnce);
    r.close(&a, &mut rxa, Some(SessionState::default()));
    let (b, _rxb) = persistent(2, "svc");
    assert!(!r.register(b).session_present, "expired");
    assert_eq!(r.stats.sessions_expired.load(Ordering::Relaxed), 1);

    let r = Router::new(10);
    let (a, mut rxa) = persistent(1, "svc");
    r.register(a.clone());
    r.close(&a, &mut rxa, Some(SessionState::default()));
    let (tx, _rx) = outbox(4);
    let clean = Arc::new(Session::new(
        2,
        "svc".into(),
        ClientClass::Service,
        false,
        tx,
    ));
    assert!(!r.register(clean.clone()).session_present);
    assert_eq!(
        r.parked_count(),
        0,
        "clean_session = 1 discards the stored session"
    );
}

#[test]
fn filter_within_follows_the_matching_rules() {
    assert!(filter_within("secret/x", "secret/#"));
    assert!(filter_within("secret/#", "secret/#"));
    assert!(filter_within("secret", "secret/#"), "a/# matches a");
    assert!(filter_within("secret/+/y", "secret/#"));
    assert!(filter_within("a/b", "a/+"));
    assert!(filter_within("a/+", "a/+"));
    assert!(!filter_within("#", "secret/#"));
    assert!(!filter_within("+/x", "secret/#"));
    assert!(!filter_within("a/+", "a/b"));
    assert!(!filter_within("a/#", "a/+"));
    assert!(!filter_within("a/b/c", "a/+"));
    assert!(!filter_within("$SYS/x", "#"));
    assert!(filter_within("$SYS/x", "$SYS/#"));
    assert!(filter_within("x", "#"));
}

#[test]
fn denied_topics_reach_nobody_and_are_not_retained() {
    let r = Router::new(10).with_deny_filters(vec!["secret/#".into()]);
    let (s, mut rx) = session(1, "svc", ClientClass::Service);
    r.register(s.clone());
    s.subscribe("#", QoS::AtMostOnce);
    r.service_subscriptions_changed(&s);
    r.publish("secret/x", Bytes::from_static(b"1"), QoS::AtMostOnce, true);
    r.publish("open/x", Bytes::from_static(b"2"), QoS::AtMostOnce, true);
    assert_eq!(&*rx.try_recv().unwrap().topic, "open/x");
    assert!(rx.try_recv().is_err());
    assert_eq!(r.retained_for("#", QoS::AtMostOnce).len(), 1);
}

#[test]
fn subscriptions_are_capped_and_identical_filters_replace() {
    let (tx, _rx) = outbox(4);
    let s =
        Session::new(1, "svc".into(), ClientClass::Service, false, tx).with_budget(SessionBudget {
            memory: 1000,
            max_subscriptions: 2,
            max_subscription_bytes: 12,
        });
    for _ in 0..3000 {
        assert_eq!(s.try_subscribe("a/#", QoS::AtMostOnce), Ok(()));
    }
    assert_eq!(s.subscription_count(), 1, "identical filters replace");
    assert_eq!(s.memory(), 3);
    assert_eq!(s.try_subscribe("b/#", QoS::AtLeastOnce), Ok(()));
    assert_eq!(
        s.try_subscribe("c/#", QoS::AtMostOnce),
        Err(SubscribeRefusal::Count)
    );
    s.unsubscribe("b/#");
    assert_eq!(
        s.try_subscribe("long/filter/#", QoS::AtMostOnce),
        Err(SubscribeRefusal::Bytes)
    );
    assert_eq!(s.memory(), 3, "unsubscribe gives the bytes back");
}

#[test]
fn retained_store_is_capped_in_bytes_and_replay_in_budget() {
    let r = Router::new(100).with_retained_limits(RetainedLimits {
        max_entries: 100,
        max_bytes: 90,
        max_message: 40,
    });
    let big = Bytes::from(vec![b'x'; 40]);
    r.publish("t/1", big.clone(), QoS::AtMostOnce, true);
    assert_eq!(r.retained_usage(), (0, 0), "over the per-message cap");
    r.publish("t/1", Bytes::from(vec![b'x'; 30]), QoS::AtMostOnce, true);
    r.publish("t/2", Bytes::from(vec![b'x'; 30]), QoS::AtMostOnce, true);
    r.publish("t/3", Bytes::from(vec![b'x'; 30]), QoS::AtMostOnce, true);
    assert_eq!(r.retained_usage(), (2, 66), "over the total cap");
    r.publish("t/1", Bytes::from(vec![b'x'; 10]), QoS::AtMostOnce, true);
    assert_eq!(r.retained_usage(), (2, 46), "replacing adjusts the bytes");
    assert_eq!(r.stats.retained_refused.load(Ordering::Relaxed), 2);
    let all = message_cost("t/1", 10) + message_cost("t/2", 30);
    assert_eq!(
        r.retained_within("t/#", QoS::AtMostOnce, all).unwrap().1,
        all
    );
    assert!(r.retained_within("t/#", QoS::AtMostOnce, all - 1).is_none());
}

#[test]
fn a_message_over_the_budget_kicks_the_connection() {
    let r = Router::new(10);
    let (tx, _rx) = outbox(100);
    let m: MachineNo = "12345678".parse().unwrap();
    let s = Arc::new(
        Session::new(1, "12345678".into(), ClientClass::Machine(m), false, tx).with_budget(
            SessionBudget {
                memory: 300,
                max_subscriptions: 8,
                max_subscription_bytes: 1024,
            },
        ),
    );
    r.register(s.clone());
    s.subscribe("vend/v1/12345678/cmd/#", QoS::AtLeastOnce);
    let t = "vend/v1/12345678/cmd/ping";
    let p = Bytes::from(vec![b'x'; 100]);
    assert_eq!(
        r.publish(t, p.clone(), QoS::AtLeastOnce, false),
        MachineDelivery::Queued
    );
    assert_eq!(
        r.publish(t, p, QoS::AtLeastOnce, false),
        MachineDelivery::Backpressure
    );
    assert_eq!(s.kick_reason(), Some(KickReason::MemoryBudget));
    assert_eq!(r.stats.over_budget.load(Ordering::Relaxed), 1);
}

#[test]
fn service_sessions_are_keyed_by_account() {
    let r = Router::new(10);
    let (tx, _rx) = outbox(4);
    let a = Arc::new(
        Session::new(1, "dash".into(), ClientClass::Service, false, tx)
            .with_key(service_key("svc-a", "dash")),
    );
    let (tx, _rx2) = outbox(4);
    let b = Arc::new(
        Session::new(2, "dash".into(), ClientClass::Service, false, tx)
            .with_key(service_key("svc-b", "dash")),
    );
    r.register(a.clone());
    assert!(!r.register(b).took_over, "another account's id is its own");
    assert_eq!(a.kick_reason(), None);
    assert_ne!(service_key("a:b", "c"), service_key("a", "b:c"));
}

#[test]
fn overlapping_filters() {
    assert!(filters_overlap("#", "secret/x"));
    assert!(filters_overlap("a/+/c", "a/b/#"));
    assert!(filters_overlap("a/#", "a"));
    assert!(!filters_overlap("a/+", "a"));
    assert!(!filters_overlap("a/b", "a/c"));
    assert!(!filters_overlap("#", "$SYS/#"));
    assert!(filters_overlap("$SYS/+", "$SYS/#"));
}

/// Service fan-out goes through the subscription index: each publish
/// reaches exactly the services whose filters match, once each (at the
/// highest granted QoS when filters overlap), and the index follows
/// subscribe, unsubscribe, take-over and close.
#[test]
fn services_are_reached_through_the_index_exactly_once() {
    let r = Router::new(10);
    let mut rxs = Vec::new();
    let mut sessions = Vec::new();
    for i in 0..20u64 {
        let (s, rx) = session(i + 1, &format!("svc{i}"), ClientClass::Service);
        r.register(s.clone());
        s.subscribe(&format!("rr/req/{i}/+"), QoS::AtLeastOnce);
        r.service_subscriptions_changed(&s);
        sessions.push(s);
        rxs.push(rx);
    }
    // One more with overlapping filters: one copy, at the higher QoS.
    let (wide, mut wide_rx) = session(100, "wide", ClientClass::Service);
    r.register(wide.clone());
    wide.subscribe("rr/#", QoS::AtMostOnce);
    wide.subscribe("rr/req/7/+", QoS::AtLeastOnce);
    r.service_subscriptions_changed(&wide);

    r.publish(
        "rr/req/7/42",
        Bytes::from_static(b"x"),
        QoS::AtLeastOnce,
        false,
    );
    for (i, rx) in rxs.iter_mut().enumerate() {
        assert_eq!(rx.try_recv().is_ok(), i == 7, "service {i}");
    }
    assert_eq!(wide_rx.try_recv().unwrap().qos, QoS::AtLeastOnce);
    assert!(wide_rx.try_recv().is_err(), "one copy only");

    // Unsubscribed: no longer reached.
    sessions[3].unsubscribe("rr/req/3/+");
    r.service_subscriptions_changed(&sessions[3]);
    r.publish(
        "rr/req/3/1",
        Bytes::from_static(b"x"),
        QoS::AtLeastOnce,
        false,
    );
    assert!(rxs[3].try_recv().is_err());
    assert_eq!(wide_rx.try_recv().unwrap().qos, QoS::AtMostOnce);

    // Closed: forgotten by the index.
    r.close(&sessions[5], &mut rxs[5], None);
    r.publish(
        "rr/req/5/1",
        Bytes::from_static(b"x"),
        QoS::AtLeastOnce,
        false,
    );
    assert!(rxs[5].try_recv().is_err());
    assert!(wide_rx.try_recv().is_ok(), "the wide filter still matches");

    // A denied topic reaches nobody, indexed or not.
    let r = r.with_deny_filters(vec!["rr/req/9/#".into()]);
    r.publish(
        "rr/req/9/1",
        Bytes::from_static(b"x"),
        QoS::AtLeastOnce,
        false,
    );
    assert!(rxs[9].try_recv().is_err());
    assert!(wide_rx.try_recv().is_err());
}
