//! Property and table tests of the wire contract: message round trips,
//! machine-number validation, topic building/parsing and MQTT filter rules.

use proptest::prelude::*;
use vendgate_proto::machine::MachineNo;
use vendgate_proto::msg::{self, *};
use vendgate_proto::topic::{self, Command, Topic, Uplink};

fn machine_no() -> impl Strategy<Value = MachineNo> {
    (0u32..100_000_000).prop_map(|n| MachineNo::from_u32(n).unwrap())
}

fn opt_text() -> impl Strategy<Value = Option<String>> {
    proptest::option::of(any::<String>())
}

fn order_line() -> impl Strategy<Value = OrderLine> {
    (any::<i64>(), any::<u32>()).prop_map(|(product_id, quantity)| OrderLine {
        product_id,
        quantity,
    })
}

fn result_item() -> impl Strategy<Value = ResultItem> {
    (any::<i64>(), any::<u32>(), any::<u32>()).prop_map(|(product_id, quantity, dispensed)| {
        ResultItem {
            product_id,
            quantity,
            dispensed,
        }
    })
}

fn inventory_item() -> impl Strategy<Value = InventoryItem> {
    (any::<i64>(), any::<u32>(), any::<i64>()).prop_map(|(product_id, stock, price)| {
        InventoryItem {
            product_id,
            stock,
            price,
        }
    })
}

fn round_trip<T>(v: &T)
where
    T: serde::Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug,
{
    let bytes = msg::encode(v);
    let back: T = msg::decode(&bytes).unwrap();
    assert_eq!(&back, v);
}

proptest! {
    #[test]
    fn state_round_trips(online in any::<bool>(), firmware in opt_text()) {
        round_trip(&StateMsg { online, firmware });
    }

    #[test]
    fn inventory_round_trips(items in proptest::collection::vec(inventory_item(), 0..8)) {
        round_trip(&InventoryMsg { items });
    }

    #[test]
    fn dispense_round_trips(
        order_id in any::<u64>(),
        items in proptest::collection::vec(order_line(), 0..8),
        ttl_ms in any::<u64>(),
    ) {
        round_trip(&DispenseCmd { order_id, items, ttl_ms });
    }

    #[test]
    fn small_commands_round_trip(order_id in any::<u64>(), id in any::<u64>()) {
        round_trip(&CancelCmd { order_id });
        round_trip(&PingCmd { id });
        round_trip(&PongMsg { id });
    }

    #[test]
    fn ack_round_trips(order_id in any::<u64>(), accepted in any::<bool>(), reason in opt_text()) {
        round_trip(&AckMsg { order_id, accepted, reason });
    }

    #[test]
    fn result_round_trips(
        order_id in any::<u64>(),
        items in proptest::collection::vec(result_item(), 0..8),
        error in opt_text(),
    ) {
        round_trip(&ResultMsg { order_id, items, error });
    }

    #[test]
    fn machine_no_accepts_exactly_eight_ascii_digits(s in any::<String>()) {
        let expected = s.len() == 8 && s.bytes().all(|b| b.is_ascii_digit());
        prop_assert_eq!(MachineNo::parse(&s).is_ok(), expected);
    }

    #[test]
    fn machine_no_accepts_near_misses_correctly(s in "[0-9٣０-９a ]{6,10}") {
        let expected = s.len() == 8 && s.bytes().all(|b| b.is_ascii_digit());
        prop_assert_eq!(MachineNo::parse(&s).is_ok(), expected);
    }

    #[test]
    fn machine_no_round_trips(s in "[0-9]{8}") {
        let m = MachineNo::parse(&s).unwrap();
        prop_assert_eq!(m.as_str(), s.as_str());
        prop_assert_eq!(MachineNo::from_u32(m.to_u32()), Some(m));
        let json = serde_json::to_string(&m).unwrap();
        prop_assert_eq!(serde_json::from_str::<MachineNo>(&json).unwrap(), m);
    }

    #[test]
    fn topics_round_trip(m in machine_no()) {
        for u in Uplink::ALL {
            let t = topic::uplink(&m, u);
            prop_assert_eq!(topic::parse(&t), Some(Topic::Uplink(m, u)));
            prop_assert_eq!(topic::machine_of(&t), Some(m));
            prop_assert!(topic::valid_publish_topic(&t));
            prop_assert!(topic::filter_within_prefix(&t, &topic::machine_prefix(&m)));
        }
        for c in Command::ALL {
            let t = topic::command(&m, c);
            prop_assert_eq!(topic::parse(&t), Some(Topic::Command(m, c)));
            prop_assert!(topic::filter_matches(&topic::command_filter(&m), &t));
            prop_assert_eq!(Topic::Command(m, c).machine(), m);
        }
    }

    #[test]
    fn filter_matching_never_panics(f in "[a/+#é$\u{0}]{0,12}", t in "[a/é$+]{0,12}") {
        let _ = topic::filter_matches(&f, &t);
        let _ = topic::filter_within_prefix(&f, "a/");
        let _ = topic::valid_filter(&f);
    }

    #[test]
    fn a_topic_matches_itself_as_a_filter(t in "[a-cé$]{0,3}(/[a-cé$]{0,3}){0,3}") {
        prop_assume!(!t.is_empty());
        prop_assert!(topic::filter_matches(&t, &t));
    }
}

#[test]
fn decode_ignores_unknown_fields() {
    let d: DispenseCmd = msg::decode(
        br#"{"order_id":5,"extra":{"nested":[1,2]},"items":[{"product_id":1,"quantity":2,"x":true}],"ttl_ms":0,"v":2}"#,
    )
    .unwrap();
    assert_eq!(
        d,
        DispenseCmd {
            order_id: 5,
            items: vec![OrderLine {
                product_id: 1,
                quantity: 2
            }],
            ttl_ms: 0
        }
    );
    let s: StateMsg = msg::decode(br#"{"online":true,"firmware":"1.4.2","uptime":3}"#).unwrap();
    assert_eq!(s.firmware.as_deref(), Some("1.4.2"));
    let p: PingCmd = msg::decode(br#"{"id":42,"sent_at":"x"}"#).unwrap();
    assert_eq!(p.id, 42);
}

#[test]
fn parse_rejects_near_misses() {
    for t in [
        "",
        "vend/v1/12345678",
        "vend/v1/12345678/",
        "vend/v1/12345678/ack/",
        "vend/v1/12345678/ack/x",
        "vend/v1/12345678/ACK",
        "vend/v1/12345678/cmd",
        "vend/v1/12345678/cmd/",
        "vend/v1/12345678/cmd/dispense/x",
        "vend/v1/12345678/dispense",
        "vend/v1/1234567/ack",
        "vend/v1/123456789/ack",
        "vend/v1/1234567a/ack",
        "vend/v1/+/ack",
        "vend/v2/12345678/ack",
        "/vend/v1/12345678/ack",
        "vend/v1//12345678/ack",
        "Vend/v1/12345678/ack",
        "vend/v1/١٢٣٤٥٦٧٨/ack",
    ] {
        assert_eq!(topic::parse(t), None, "{t:?}");
    }
}

#[test]
fn filter_matches_table() {
    let cases: &[(&str, &str, bool)] = &[
        ("a/b", "a/b", true),
        ("a/b", "a/c", false),
        ("a/+", "a/b", true),
        ("a/+", "a/", true),
        ("a/+", "a", false),
        ("a/+", "a/b/c", false),
        ("a/#", "a", true),
        ("a/#", "a/b/c", true),
        ("a/#", "ab", false),
        ("#", "a/b", true),
        ("#", "/", true),
        ("+/+", "/", true),
        ("/+", "/x", true),
        ("+", "/x", false),
        ("#", "$SYS/x", false),
        ("+/x", "$SYS/x", false),
        ("$SYS/#", "$SYS/x", true),
        ("$SYS/+", "$SYS/x", true),
        ("a/$x", "a/$x", true),
        ("+/x", "a/$x", false),
        ("é/x", "é/x", true),
        ("+/x", "é/x", true),
        ("e/x", "é/x", false),
        ("é/+", "é/ü", true),
        ("#", "é/x", true),
        ("é", "é/x", false),
        (
            "vend/v1/12345678/cmd/#",
            "vend/v1/12345678/cmd/dispense",
            true,
        ),
        (
            "vend/v1/12345678/cmd/#",
            "vend/v1/12345679/cmd/dispense",
            false,
        ),
        ("vend/v1/+/ack", "vend/v1/12345678/ack", true),
        // Invalid filters and topics match nothing.
        ("a/#/b", "a/x/b", false),
        ("a+", "a+", false),
        ("a/+", "a/+", false),
        ("", "", false),
        ("a", "", false),
    ];
    for &(f, t, want) in cases {
        assert_eq!(topic::filter_matches(f, t), want, "{f:?} vs {t:?}");
    }
}

#[test]
fn filter_within_prefix_table() {
    let p = "vend/v1/12345678/";
    let cases: &[(&str, bool)] = &[
        ("vend/v1/12345678/cmd/#", true),
        ("vend/v1/12345678/#", true),
        ("vend/v1/12345678/+", true),
        ("vend/v1/12345678/+/x", true),
        ("vend/v1/12345678/state", true),
        ("vend/v1/12345678/", true),
        ("vend/v1/12345678//#", true),
        ("vend/v1/12345678", false),
        ("vend/v1/+/cmd", false),
        ("vend/v1/+/cmd/#", false),
        ("vend/v1/#", false),
        ("vend/+/12345678/cmd", false),
        ("#", false),
        ("+/v1/12345678/cmd", false),
        ("vend/v1/12345679/cmd/#", false),
        ("vend/v1/123456789/cmd", false),
        ("vend/v1/12345678/a#", false),
        ("", false),
    ];
    for &(f, want) in cases {
        assert_eq!(topic::filter_within_prefix(f, p), want, "{f:?}");
    }
    // A prefix ending inside a level.
    assert!(topic::filter_within_prefix("vend/v1/123/x", "vend/v1/12"));
    assert!(!topic::filter_within_prefix("vend/v1/+/x", "vend/v1/12"));
    assert!(!topic::filter_within_prefix("vend/v1/#", "vend/v1/12"));
}

proptest! {
    /// Soundness: if a filter is within the prefix, no topic it matches lies
    /// outside it (except the documented parent-level exception of `#`).
    #[test]
    fn within_prefix_is_sound(
        f in "(a|b|\\+)(/(a|b|\\+|)){0,3}(/#)?",
        t in "(a|b|)(/(a|b|)){0,4}",
    ) {
        let prefix = "a/b/";
        if topic::filter_within_prefix(&f, prefix) && topic::filter_matches(&f, &t) {
            prop_assert!(t.starts_with(prefix) || t == "a/b", "{} matched {}", f, t);
        }
    }
}
