//! Tests of the pure machine logic (`MachineState`): PROTOCOL.md's machine
//! rules without a broker.

use std::time::Duration;

use tokio::time::Instant;
use vendgate_proto::machine::MachineNo;
use vendgate_proto::msg::{
    self, AckMsg, CancelCmd, DispenseCmd, InventoryItem, OrderLine, PingCmd, PongMsg, ResultItem,
    ResultMsg, StateMsg,
};
use vendgate_proto::topic::Command;
use vendgate_sim::state::{DEDUP_WINDOW, ERROR_OUT_OF_STOCK, REASON_EXPIRED, REPUBLISH_RESULTS};
use vendgate_sim::{Behaviour, JournalEvent, MachineState, Outgoing};

fn machine(behaviour: Behaviour) -> MachineState {
    MachineState::new(
        MachineNo::parse("12345678").unwrap(),
        "1.4.2",
        vec![
            InventoryItem {
                product_id: 1,
                stock: 10,
                price: 350,
            },
            InventoryItem {
                product_id: 2,
                stock: 1,
                price: 200,
            },
        ],
        behaviour,
    )
}

fn dispense(order_id: u64, items: &[(i64, u32)]) -> Vec<u8> {
    msg::encode(&DispenseCmd {
        order_id,
        items: items
            .iter()
            .map(|&(product_id, quantity)| OrderLine {
                product_id,
                quantity,
            })
            .collect(),
        ttl_ms: 10_000,
    })
}

fn acks(out: &[Outgoing]) -> Vec<AckMsg> {
    out.iter()
        .filter_map(|o| match o {
            Outgoing::Ack(a) => Some(a.clone()),
            _ => None,
        })
        .collect()
}

fn results(out: &[Outgoing]) -> Vec<ResultMsg> {
    out.iter()
        .filter_map(|o| match o {
            Outgoing::Result(r) => Some(r.clone()),
            _ => None,
        })
        .collect()
}

fn accepted(order_id: u64) -> AckMsg {
    AckMsg {
        order_id,
        accepted: true,
        reason: None,
    }
}

fn refused(order_id: u64, reason: &str) -> AckMsg {
    AckMsg {
        order_id,
        accepted: false,
        reason: Some(reason.into()),
    }
}

fn stock_of(m: &MachineState, product_id: i64) -> u32 {
    m.stock()
        .iter()
        .find(|s| s.product_id == product_id)
        .map_or(0, |s| s.stock)
}

#[test]
fn normal_order_acks_dispenses_reports_and_snapshots() {
    let mut m = machine(Behaviour::Normal);
    let now = Instant::now();
    let out = m.handle_command(Command::Dispense, &dispense(7, &[(1, 2)]), now);
    assert_eq!(out.len(), 3, "{out:?}");
    assert_eq!(out[0], Outgoing::Ack(accepted(7)));
    assert_eq!(
        out[1],
        Outgoing::Result(ResultMsg {
            order_id: 7,
            items: vec![ResultItem {
                product_id: 1,
                quantity: 2,
                dispensed: 2
            }],
            error: None,
        })
    );
    let Outgoing::Inventory(inv) = &out[2] else {
        panic!("expected inventory, got {:?}", out[2])
    };
    assert_eq!(inv.items[0].stock, 8);
    assert_eq!(stock_of(&m, 1), 8);
    assert_eq!(m.dispensed_orders(), &[7]);
    assert!(m
        .journal()
        .iter()
        .any(|e| matches!(e.event, JournalEvent::DispenseReceived(_))));
}

#[test]
fn repeated_command_is_answered_from_memory_and_dispensed_once() {
    let mut m = machine(Behaviour::Normal);
    let now = Instant::now();
    let first = m.handle_command(Command::Dispense, &dispense(7, &[(1, 2)]), now);
    let again = m.handle_command(Command::Dispense, &dispense(7, &[(1, 2)]), now);
    assert_eq!(acks(&again), acks(&first));
    assert_eq!(results(&again), results(&first));
    assert_eq!(m.dispensed_orders(), &[7]);
    assert_eq!(stock_of(&m, 1), 8);
    // A repeat with a different body is still the same order.
    let other_body = m.handle_command(Command::Dispense, &dispense(7, &[(1, 5)]), now);
    assert_eq!(acks(&other_body), vec![accepted(7)]);
    assert_eq!(m.dispensed_orders(), &[7]);
}

#[test]
fn refusal_is_repeated_even_after_behaviour_changes() {
    let mut m = machine(Behaviour::Refuse {
        reason: "door_open".into(),
    });
    let now = Instant::now();
    let out = m.handle_command(Command::Dispense, &dispense(8, &[(1, 1)]), now);
    assert_eq!(out, vec![Outgoing::Ack(refused(8, "door_open"))]);
    m.set_behaviour(Behaviour::Normal);
    let out = m.handle_command(Command::Dispense, &dispense(8, &[(1, 1)]), now);
    assert_eq!(out, vec![Outgoing::Ack(refused(8, "door_open"))]);
    assert!(m.dispensed_orders().is_empty());
    assert_eq!(stock_of(&m, 1), 10);
}

#[test]
fn cancel_before_dispense_refuses_as_expired() {
    let mut m = machine(Behaviour::Normal);
    let now = Instant::now();
    assert!(m
        .handle_command(
            Command::Cancel,
            &msg::encode(&CancelCmd { order_id: 9 }),
            now
        )
        .is_empty());
    let out = m.handle_command(Command::Dispense, &dispense(9, &[(1, 1)]), now);
    assert_eq!(out, vec![Outgoing::Ack(refused(9, REASON_EXPIRED))]);
    // And stays refused.
    let out = m.handle_command(Command::Dispense, &dispense(9, &[(1, 1)]), now);
    assert_eq!(acks(&out), vec![refused(9, REASON_EXPIRED)]);
    assert!(m.dispensed_orders().is_empty());
}

#[test]
fn cancel_after_dispense_changes_nothing() {
    let mut m = machine(Behaviour::Normal);
    let now = Instant::now();
    m.handle_command(Command::Dispense, &dispense(10, &[(1, 1)]), now);
    m.handle_command(
        Command::Cancel,
        &msg::encode(&CancelCmd { order_id: 10 }),
        now,
    );
    let out = m.handle_command(Command::Dispense, &dispense(10, &[(1, 1)]), now);
    assert_eq!(acks(&out), vec![accepted(10)]);
    assert_eq!(m.dispensed_orders(), &[10]);
}

#[test]
fn zero_ttl_is_expired() {
    let mut m = machine(Behaviour::Normal);
    let cmd = msg::encode(&DispenseCmd {
        order_id: 11,
        items: vec![OrderLine {
            product_id: 1,
            quantity: 1,
        }],
        ttl_ms: 0,
    });
    let out = m.handle_command(Command::Dispense, &cmd, Instant::now());
    assert_eq!(out, vec![Outgoing::Ack(refused(11, REASON_EXPIRED))]);
    assert!(m.dispensed_orders().is_empty());
}

#[test]
fn shortfall_reports_out_of_stock_and_stock_never_goes_negative() {
    let mut m = machine(Behaviour::Normal);
    let now = Instant::now();
    // Product 2 has 1 in stock, product 99 does not exist.
    let out = m.handle_command(
        Command::Dispense,
        &dispense(12, &[(2, 3), (99, 1), (1, 1)]),
        now,
    );
    let result = &results(&out)[0];
    assert_eq!(
        result.items,
        vec![
            ResultItem {
                product_id: 2,
                quantity: 3,
                dispensed: 1
            },
            ResultItem {
                product_id: 99,
                quantity: 1,
                dispensed: 0
            },
            ResultItem {
                product_id: 1,
                quantity: 1,
                dispensed: 1
            },
        ]
    );
    assert_eq!(result.error.as_deref(), Some(ERROR_OUT_OF_STOCK));
    assert_eq!(stock_of(&m, 2), 0);
    // Empty now: nothing comes out, stock stays at zero.
    let out = m.handle_command(Command::Dispense, &dispense(13, &[(2, 1)]), now);
    assert_eq!(results(&out)[0].items[0].dispensed, 0);
    assert_eq!(stock_of(&m, 2), 0);
}

#[test]
fn same_product_on_two_lines_shares_the_stock() {
    let mut m = machine(Behaviour::Normal);
    let out = m.handle_command(
        Command::Dispense,
        &dispense(14, &[(2, 1), (2, 1)]),
        Instant::now(),
    );
    let items = &results(&out)[0].items;
    assert_eq!(items[0].dispensed + items[1].dispensed, 1);
    assert_eq!(stock_of(&m, 2), 0);
}

#[test]
fn fail_dispenses_nothing_with_the_error() {
    let mut m = machine(Behaviour::Fail {
        error: "motor_jam".into(),
    });
    let out = m.handle_command(
        Command::Dispense,
        &dispense(15, &[(1, 2), (2, 1)]),
        Instant::now(),
    );
    assert_eq!(acks(&out), vec![accepted(15)]);
    let result = &results(&out)[0];
    assert!(result.items.iter().all(|i| i.dispensed == 0));
    assert_eq!(result.error.as_deref(), Some("motor_jam"));
    assert_eq!(stock_of(&m, 1), 10);
    // The attempt counts as the order's one dispense.
    assert_eq!(m.dispensed_orders(), &[15]);
}

#[test]
fn partial_dispenses_less_than_requested() {
    let mut m = machine(Behaviour::Partial {
        error: "motor_jam".into(),
    });
    let out = m.handle_command(
        Command::Dispense,
        &dispense(16, &[(1, 5), (2, 1)]),
        Instant::now(),
    );
    let result = &results(&out)[0];
    assert_eq!(result.items[0].dispensed, 2);
    assert_eq!(result.items[1].dispensed, 0);
    assert_eq!(result.error.as_deref(), Some("motor_jam"));
    let total: u32 = result.items.iter().map(|i| i.dispensed).sum();
    let requested: u32 = result.items.iter().map(|i| i.quantity).sum();
    assert!(total < requested);
    assert_eq!(stock_of(&m, 1), 8);
}

#[test]
fn never_ack_records_but_does_not_answer() {
    let mut m = machine(Behaviour::NeverAck);
    let out = m.handle_command(Command::Dispense, &dispense(17, &[(1, 1)]), Instant::now());
    assert!(out.is_empty());
    assert!(m
        .journal()
        .iter()
        .any(|e| matches!(&e.event, JournalEvent::DispenseReceived(c) if c.order_id == 17)));
    assert!(m.dispensed_orders().is_empty());
    // Pings are still answered.
    let out = m.handle_command(
        Command::Ping,
        &msg::encode(&PingCmd { id: 3 }),
        Instant::now(),
    );
    assert_eq!(out, vec![Outgoing::Pong(PongMsg { id: 3 })]);
    // Once healthy, the retried command is answered normally.
    m.set_behaviour(Behaviour::Normal);
    let out = m.handle_command(Command::Dispense, &dispense(17, &[(1, 1)]), Instant::now());
    assert_eq!(acks(&out), vec![accepted(17)]);
}

#[test]
fn ack_then_silent_dispenses_but_withholds_the_result_until_healthy() {
    let mut m = machine(Behaviour::AckThenSilent);
    let now = Instant::now();
    let out = m.handle_command(Command::Dispense, &dispense(18, &[(1, 1)]), now);
    assert_eq!(out, vec![Outgoing::Ack(accepted(18))]);
    assert_eq!(m.dispensed_orders(), &[18]);
    assert!(results(&m.on_connect(now)).is_empty());
    let repeat = m.handle_command(Command::Dispense, &dispense(18, &[(1, 1)]), now);
    assert_eq!(repeat, vec![Outgoing::Ack(accepted(18))]);
    // Healthy again: the next connect re-publishes the stored result.
    m.set_behaviour(Behaviour::Normal);
    let late = results(&m.on_connect(now));
    assert_eq!(late.len(), 1);
    assert_eq!(late[0].order_id, 18);
    assert_eq!(m.dispensed_orders(), &[18]);
}

#[test]
fn slow_ack_defers_then_dispenses_within_ttl() {
    let mut m = machine(Behaviour::SlowAck { ms: 500 });
    let t0 = Instant::now();
    let out = m.handle_command(Command::Dispense, &dispense(19, &[(1, 1)]), t0);
    assert_eq!(
        out,
        vec![Outgoing::Defer {
            order_id: 19,
            after: Duration::from_millis(500)
        }]
    );
    // A repeat while deferred gets no second answer.
    assert!(m
        .handle_command(Command::Dispense, &dispense(19, &[(1, 1)]), t0)
        .is_empty());
    let out = m.resume(19, t0 + Duration::from_millis(500));
    assert_eq!(acks(&out), vec![accepted(19)]);
    assert_eq!(results(&out).len(), 1);
    assert_eq!(m.dispensed_orders(), &[19]);
    // Resuming again does nothing.
    assert!(m.resume(19, t0 + Duration::from_secs(1)).is_empty());
}

#[test]
fn slow_ack_cancelled_or_past_ttl_is_expired() {
    let mut m = machine(Behaviour::SlowAck { ms: 500 });
    let t0 = Instant::now();
    m.handle_command(Command::Dispense, &dispense(20, &[(1, 1)]), t0);
    m.handle_command(
        Command::Cancel,
        &msg::encode(&CancelCmd { order_id: 20 }),
        t0,
    );
    let out = m.resume(20, t0 + Duration::from_millis(500));
    assert_eq!(out, vec![Outgoing::Ack(refused(20, REASON_EXPIRED))]);

    let short_ttl = msg::encode(&DispenseCmd {
        order_id: 21,
        items: vec![OrderLine {
            product_id: 1,
            quantity: 1,
        }],
        ttl_ms: 100,
    });
    m.handle_command(Command::Dispense, &short_ttl, t0);
    let out = m.resume(21, t0 + Duration::from_millis(500));
    assert_eq!(out, vec![Outgoing::Ack(refused(21, REASON_EXPIRED))]);
    assert!(m.dispensed_orders().is_empty());
    assert_eq!(stock_of(&m, 1), 10);
}

#[test]
fn result_after_reconnect_acks_then_cuts_and_publishes_on_connect() {
    let mut m = machine(Behaviour::ResultAfterReconnect);
    let now = Instant::now();
    let out = m.handle_command(Command::Dispense, &dispense(30, &[(1, 1)]), now);
    // The ack, then the cut once it is delivered; no result, no snapshot.
    assert_eq!(
        out,
        vec![Outgoing::Ack(accepted(30)), Outgoing::DropWhenDelivered]
    );
    assert_eq!(m.dispensed_orders(), &[30]);
    let late = results(&m.on_connect(now));
    assert_eq!(late.len(), 1);
    assert_eq!(late[0].order_id, 30);
    // Every order, not just the first.
    let out = m.handle_command(Command::Dispense, &dispense(31, &[(1, 1)]), now);
    assert_eq!(out.last(), Some(&Outgoing::DropWhenDelivered));
}

#[test]
fn duplicate_publishes_every_ack_and_result_twice() {
    let mut m = machine(Behaviour::Duplicate);
    let out = m.handle_command(Command::Dispense, &dispense(32, &[(1, 2)]), Instant::now());
    assert_eq!(acks(&out), vec![accepted(32), accepted(32)]);
    let r = results(&out);
    assert_eq!(r.len(), 2);
    assert_eq!(r[0], r[1]);
    assert_eq!(m.dispensed_orders(), &[32], "dispensed once");
    assert_eq!(stock_of(&m, 1), 8);
}

#[test]
fn malformed_sends_hostile_payloads_around_a_normal_answer() {
    let mut m = machine(Behaviour::Malformed);
    let out = m.handle_command(Command::Dispense, &dispense(33, &[(1, 1)]), Instant::now());
    let machine_no = m.machine_no();
    let raw: Vec<_> = out
        .iter()
        .filter(|o| matches!(o, Outgoing::Raw { .. }))
        .filter_map(|o| o.publication(&machine_no))
        .collect();
    assert!(raw.len() >= 15, "{raw:?}");
    assert!(raw.iter().all(|p| p.topic.starts_with("vend/v1/12345678/")));
    // Each hostile payload fits the protocol's payload cap.
    assert!(raw.iter().all(|p| p.payload.len() <= msg::MAX_PAYLOAD));
    // The real answer is intact: one accepted ack before the ill-fitting
    // results, one full result.
    assert_eq!(acks(&out), vec![accepted(33)]);
    let ack_at = out.iter().position(|o| matches!(o, Outgoing::Ack(_)));
    let last_raw = out.iter().rposition(|o| matches!(o, Outgoing::Raw { .. }));
    assert!(ack_at < last_raw, "some hostile results follow the ack");
    assert_eq!(results(&out).len(), 1);
    assert_eq!(results(&out)[0].items[0].dispensed, 1);
    assert!(matches!(
        Outgoing::Raw {
            suffix: "ack".into(),
            payload: vec![]
        }
        .sent_event(&machine_no),
        Some(JournalEvent::RawSent { .. })
    ));
}

#[test]
fn half_open_stalls_once_without_answering() {
    let mut m = machine(Behaviour::HalfOpen { ms: 1_234 });
    let now = Instant::now();
    let out = m.handle_command(Command::Dispense, &dispense(34, &[(1, 1)]), now);
    assert_eq!(out, vec![Outgoing::Stall(Duration::from_millis(1_234))]);
    assert!(m.dispensed_orders().is_empty());
    assert_eq!(m.behaviour(), &Behaviour::Normal);
    let out = m.handle_command(Command::Dispense, &dispense(34, &[(1, 1)]), now);
    assert_eq!(acks(&out), vec![accepted(34)]);
}

#[test]
fn local_sale_lowers_stock_without_a_snapshot() {
    let mut m = machine(Behaviour::Normal);
    let now = Instant::now();
    assert_eq!(m.sell_locally(2, 5, now), 1, "only one in stock");
    assert_eq!(stock_of(&m, 2), 0);
    let out = m.handle_command(Command::Dispense, &dispense(35, &[(2, 1)]), now);
    let r = results(&out);
    assert_eq!(r[0].items[0].dispensed, 0);
    assert_eq!(r[0].error.as_deref(), Some(ERROR_OUT_OF_STOCK));
}

#[test]
fn drop_connection_happens_once_without_answering() {
    let mut m = machine(Behaviour::DropConnection);
    let now = Instant::now();
    let out = m.handle_command(Command::Dispense, &dispense(22, &[(1, 1)]), now);
    assert_eq!(out, vec![Outgoing::DropConnection]);
    assert!(m.dispensed_orders().is_empty());
    assert_eq!(m.behaviour(), &Behaviour::Normal);
    let out = m.handle_command(Command::Dispense, &dispense(22, &[(1, 1)]), now);
    assert_eq!(acks(&out), vec![accepted(22)]);
    assert_eq!(m.dispensed_orders(), &[22]);
}

#[test]
fn malformed_payloads_are_counted_and_ignored() {
    let mut m = machine(Behaviour::Normal);
    let now = Instant::now();
    let junk: [&[u8]; 7] = [
        b"",
        b"not json",
        b"{}",
        b"{\"order_id\":\"1\",\"items\":[],\"ttl_ms\":1}",
        b"{\"order_id\":-1,\"items\":[],\"ttl_ms\":1}",
        b"[1,2,3]",
        &[0xff, 0xfe, 0x00],
    ];
    for payload in junk {
        for kind in Command::ALL {
            assert!(m.handle_command(kind, payload, now).is_empty());
        }
    }
    let too_big = vec![b' '; msg::MAX_PAYLOAD + 1];
    assert!(m.handle_command(Command::Ping, &too_big, now).is_empty());
    assert_eq!(m.malformed(), 7 * 3 + 1);
    assert!(m.dispensed_orders().is_empty());
    // Still working afterwards.
    let out = m.handle_command(Command::Ping, b"{\"id\":5,\"extra\":true}", now);
    assert_eq!(out, vec![Outgoing::Pong(PongMsg { id: 5 })]);
}

#[test]
fn on_connect_announces_subscribes_snapshots_and_republishes() {
    let mut m = machine(Behaviour::Normal);
    let now = Instant::now();
    let out = m.on_connect(now);
    assert_eq!(out[0], Outgoing::Subscribe("vend/v1/12345678/cmd/#".into()));
    assert_eq!(
        out[1],
        Outgoing::State(StateMsg {
            online: true,
            firmware: Some("1.4.2".into())
        })
    );
    assert!(matches!(out[2], Outgoing::Inventory(_)));
    assert_eq!(out.len(), 3);
    let state = out[1].publication(&m.machine_no()).unwrap();
    assert_eq!(state.topic, "vend/v1/12345678/state");
    assert!(state.retain);
    assert_eq!(state.payload, br#"{"online":true,"firmware":"1.4.2"}"#);

    // Refused orders have no result; results are re-published oldest first.
    m.handle_command(Command::Dispense, &dispense(30, &[(1, 1)]), now);
    m.set_behaviour(Behaviour::Refuse {
        reason: "door_open".into(),
    });
    m.handle_command(Command::Dispense, &dispense(31, &[(1, 1)]), now);
    m.set_behaviour(Behaviour::Normal);
    m.handle_command(Command::Dispense, &dispense(32, &[(1, 1)]), now);
    let ids: Vec<u64> = results(&m.on_connect(now))
        .iter()
        .map(|r| r.order_id)
        .collect();
    assert_eq!(ids, vec![30, 32]);
}

#[test]
fn republishing_is_bounded_to_the_most_recent_results() {
    let mut m = machine(Behaviour::Normal);
    m.refill(vec![InventoryItem {
        product_id: 1,
        stock: 1_000,
        price: 350,
    }]);
    let now = Instant::now();
    for id in 1..=100 {
        m.handle_command(Command::Dispense, &dispense(id, &[(1, 1)]), now);
    }
    let ids: Vec<u64> = m.recent_results().iter().map(|r| r.order_id).collect();
    assert_eq!(ids.len(), REPUBLISH_RESULTS);
    assert_eq!(ids.first(), Some(&(100 - REPUBLISH_RESULTS as u64 + 1)));
    assert_eq!(ids.last(), Some(&100));
}

#[test]
fn dedup_window_is_bounded() {
    let mut m = machine(Behaviour::Normal);
    m.refill(vec![InventoryItem {
        product_id: 1,
        stock: 10_000,
        price: 350,
    }]);
    let now = Instant::now();
    let n = DEDUP_WINDOW as u64 + 10;
    for id in 1..=n {
        m.handle_command(Command::Dispense, &dispense(id, &[(1, 1)]), now);
    }
    // Recent orders are still deduplicated.
    m.handle_command(Command::Dispense, &dispense(n, &[(1, 1)]), now);
    assert_eq!(m.dispensed_orders().len() as u64, n);
}

#[test]
fn refill_replaces_stock_and_publishes_it() {
    let mut m = machine(Behaviour::Normal);
    let items = vec![InventoryItem {
        product_id: 5,
        stock: 3,
        price: 100,
    }];
    let out = m.refill(items.clone());
    let Outgoing::Inventory(inv) = &out[0] else {
        panic!("expected inventory")
    };
    assert_eq!(inv.items, items);
    assert_eq!(m.stock(), &items[..]);
}

#[test]
fn publications_use_the_protocol_topics() {
    let m = MachineNo::parse("00000042").unwrap();
    let ack = Outgoing::Ack(accepted(1)).publication(&m).unwrap();
    assert_eq!(ack.topic, "vend/v1/00000042/ack");
    assert!(!ack.retain);
    assert_eq!(ack.payload, br#"{"order_id":1,"accepted":true}"#);
    let pong = Outgoing::Pong(PongMsg { id: 9 }).publication(&m).unwrap();
    assert_eq!(pong.topic, "vend/v1/00000042/pong");
    assert!(Outgoing::DropConnection.publication(&m).is_none());
    assert!(Outgoing::Subscribe("x".into()).publication(&m).is_none());
}
