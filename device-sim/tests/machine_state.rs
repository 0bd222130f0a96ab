//! Tests of the pure machine logic (`MachineState`): PROTOCOL.md's machine
//! rules without a broker. Dispensing is two-phase: a `cmd/dispense` is
//! acked and held, `cmd/go` dispenses it.

use std::time::Duration;

use tokio::time::Instant;
use vendgate_proto::machine::MachineNo;
use vendgate_proto::msg::{
    self, AckMsg, CancelCmd, DispenseCmd, GoCmd, InventoryItem, OrderLine, PingCmd, PongMsg,
    ResultItem, ResultMsg, StateMsg, ERROR_NO_GO,
};
use vendgate_proto::topic::Command;
use vendgate_sim::state::{
    DEDUP_WINDOW, DEFAULT_GO_TIMEOUT, ERROR_OUT_OF_STOCK, REASON_EXPIRED, REPUBLISH_RESULTS,
};
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

fn go(order_id: u64) -> Vec<u8> {
    msg::encode(&GoCmd { order_id })
}

fn cancel(order_id: u64) -> Vec<u8> {
    msg::encode(&CancelCmd { order_id })
}

/// Phase one then phase two: the dispense command, then the gateway's go.
/// Returns what each answered.
fn order(
    m: &mut MachineState,
    order_id: u64,
    items: &[(i64, u32)],
    now: Instant,
) -> (Vec<Outgoing>, Vec<Outgoing>) {
    let acked = m.handle_command(Command::Dispense, &dispense(order_id, items), now);
    let went = m.handle_command(Command::Go, &go(order_id), now);
    (acked, went)
}

/// What an accepting machine answers a new dispense command with: the ack
/// and its go timeout, nothing dispensed.
fn held(order_id: u64) -> Vec<Outgoing> {
    vec![
        Outgoing::Ack(accepted(order_id)),
        Outgoing::GoDeadline {
            order_id,
            after: DEFAULT_GO_TIMEOUT,
        },
    ]
}

/// The answer to a `go` for an order the machine does not hold.
fn no_go(order_id: u64) -> ResultMsg {
    ResultMsg {
        order_id,
        items: vec![],
        error: Some(ERROR_NO_GO.into()),
    }
}

fn events(m: &MachineState) -> Vec<JournalEvent> {
    m.journal().iter().map(|e| e.event.clone()).collect()
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
    assert_eq!(out, held(7));
    let out = m.handle_command(Command::Go, &go(7), now);
    assert_eq!(out.len(), 2, "{out:?}");
    assert_eq!(
        out[0],
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
    let Outgoing::Inventory(inv) = &out[1] else {
        panic!("expected inventory, got {:?}", out[1])
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
    let (acked, went) = order(&mut m, 7, &[(1, 2)], now);
    let again = m.handle_command(Command::Dispense, &dispense(7, &[(1, 2)]), now);
    assert_eq!(acks(&again), acks(&acked));
    assert_eq!(results(&again), results(&went));
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
    let (_, went) = order(&mut m, 10, &[(1, 1)], now);
    // A cancel after go is ignored: not answered, nothing undone.
    assert!(m
        .handle_command(Command::Cancel, &cancel(10), now)
        .is_empty());
    let out = m.handle_command(Command::Dispense, &dispense(10, &[(1, 1)]), now);
    assert_eq!(acks(&out), vec![accepted(10)]);
    assert_eq!(results(&out), results(&went));
    assert_eq!(m.dispensed_orders(), &[10]);
    assert!(!events(&m)
        .iter()
        .any(|e| matches!(e, JournalEvent::HoldCancelled { .. })));
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
    let (_, out) = order(&mut m, 12, &[(2, 3), (99, 1), (1, 1)], now);
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
    let (_, out) = order(&mut m, 13, &[(2, 1)], now);
    assert_eq!(results(&out)[0].items[0].dispensed, 0);
    assert_eq!(stock_of(&m, 2), 0);
}

#[test]
fn same_product_on_two_lines_shares_the_stock() {
    let mut m = machine(Behaviour::Normal);
    let (_, out) = order(&mut m, 14, &[(2, 1), (2, 1)], Instant::now());
    let items = &results(&out)[0].items;
    assert_eq!(items[0].dispensed + items[1].dispensed, 1);
    assert_eq!(stock_of(&m, 2), 0);
}

#[test]
fn fail_dispenses_nothing_with_the_error() {
    let mut m = machine(Behaviour::Fail {
        error: "motor_jam".into(),
    });
    let (acked, out) = order(&mut m, 15, &[(1, 2), (2, 1)], Instant::now());
    assert_eq!(acked, held(15));
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
    let (acked, out) = order(&mut m, 16, &[(1, 5), (2, 1)], Instant::now());
    assert_eq!(acked, held(16));
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
    let (acked, went) = order(&mut m, 18, &[(1, 1)], now);
    assert_eq!(acked, held(18));
    assert!(went.is_empty(), "no result, no snapshot: {went:?}");
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
    assert_eq!(out, held(19), "acked and held, not dispensed");
    assert!(m.dispensed_orders().is_empty());
    let out = m.handle_command(Command::Go, &go(19), t0 + Duration::from_millis(600));
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
    let (acked, went) = order(&mut m, 30, &[(1, 1)], now);
    // The ack and the hold: the connection must stay up for the go.
    assert_eq!(acked, held(30));
    // On go: dispensed, then the cut once everything before is delivered;
    // no result, no snapshot.
    assert_eq!(went, vec![Outgoing::DropWhenDelivered]);
    assert_eq!(m.dispensed_orders(), &[30]);
    let late = results(&m.on_connect(now));
    assert_eq!(late.len(), 1);
    assert_eq!(late[0].order_id, 30);
    // Every order, not just the first.
    let (_, went) = order(&mut m, 31, &[(1, 1)], now);
    assert_eq!(went.last(), Some(&Outgoing::DropWhenDelivered));
}

#[test]
fn duplicate_publishes_every_ack_and_result_twice() {
    let mut m = machine(Behaviour::Duplicate);
    let (acked, went) = order(&mut m, 32, &[(1, 2)], Instant::now());
    assert_eq!(acks(&acked), vec![accepted(32), accepted(32)]);
    assert!(results(&acked).is_empty(), "nothing before the go");
    let r = results(&went);
    assert_eq!(r.len(), 2);
    assert_eq!(r[0], r[1]);
    assert_eq!(m.dispensed_orders(), &[32], "dispensed once");
    assert_eq!(stock_of(&m, 1), 8);
}

#[test]
fn malformed_sends_hostile_payloads_around_a_normal_answer() {
    let mut m = machine(Behaviour::Malformed);
    let (acked, went) = order(&mut m, 33, &[(1, 1)], Instant::now());
    // Nothing but the garbage and the ack before the go.
    assert!(results(&acked).is_empty());
    assert!(m
        .journal()
        .iter()
        .all(|e| !matches!(e.event, JournalEvent::Malformed { .. })));
    let out: Vec<Outgoing> = acked.into_iter().chain(went).collect();
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
    let (_, out) = order(&mut m, 35, &[(2, 1)], now);
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
    let (acked, _) = order(&mut m, 22, &[(1, 1)], now);
    assert_eq!(acks(&acked), vec![accepted(22)]);
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
    assert_eq!(m.malformed(), 7 * 4 + 1);
    // A malformed go is not a go.
    assert!(!events(&m)
        .iter()
        .any(|e| matches!(e, JournalEvent::GoReceived { .. })));
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

    // Refused and held orders have no result; results are re-published
    // oldest first.
    order(&mut m, 30, &[(1, 1)], now);
    m.set_behaviour(Behaviour::Refuse {
        reason: "door_open".into(),
    });
    m.handle_command(Command::Dispense, &dispense(31, &[(1, 1)]), now);
    m.set_behaviour(Behaviour::Normal);
    order(&mut m, 32, &[(1, 1)], now);
    m.handle_command(Command::Dispense, &dispense(33, &[(1, 1)]), now);
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
        order(&mut m, id, &[(1, 1)], now);
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
        order(&mut m, id, &[(1, 1)], now);
    }
    // Recent orders are still deduplicated.
    order(&mut m, n, &[(1, 1)], now);
    assert_eq!(m.dispensed_orders().len() as u64, n);
    // Order 1 fell out of the window, but the dispensed ids never do: a
    // late copy of its command is acked, never held, and its go is a repeat.
    let (acked, went) = order(&mut m, 1, &[(1, 1)], now);
    assert_eq!(acked, vec![Outgoing::Ack(accepted(1))]);
    assert!(went.is_empty(), "{went:?}");
    assert_eq!(m.dispensed_orders().len() as u64, n);
    assert!(m.held_orders().is_empty());
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

// ---- Two-phase dispense (PROTOCOL.md machine rules 2 and 3) ----

#[test]
fn ack_holds_the_order_without_dispensing() {
    let mut m = machine(Behaviour::Normal);
    let now = Instant::now();
    let out = m.handle_command(Command::Dispense, &dispense(40, &[(1, 2)]), now);
    assert_eq!(out, held(40));
    assert!(m.dispensed_orders().is_empty());
    assert!(!m.was_dispensed(40));
    assert_eq!(stock_of(&m, 1), 10, "nothing came out");
    assert_eq!(m.held_orders(), vec![40]);
    assert!(events(&m).contains(&JournalEvent::Held { order_id: 40 }));
    assert!(!events(&m)
        .iter()
        .any(|e| matches!(e, JournalEvent::Dispensed { .. })));
    // Held orders have no result to re-publish yet.
    assert!(results(&m.on_connect(now)).is_empty());
}

#[test]
fn go_dispenses_exactly_once_and_a_repeated_go_is_not_answered() {
    let mut m = machine(Behaviour::Normal);
    let now = Instant::now();
    m.handle_command(Command::Dispense, &dispense(41, &[(1, 2)]), now);
    let out = m.handle_command(Command::Go, &go(41), now);
    assert_eq!(results(&out).len(), 1);
    assert_eq!(results(&out)[0].items[0].dispensed, 2);
    assert_eq!(m.dispensed_orders(), &[41]);
    assert!(m.was_dispensed(41));
    assert!(m.held_orders().is_empty());
    assert!(events(&m).contains(&JournalEvent::GoReceived { order_id: 41 }));
    // Repeats of the go: journalled, never answered, never dispensed.
    for _ in 0..3 {
        assert!(m.handle_command(Command::Go, &go(41), now).is_empty());
    }
    let gos = events(&m)
        .iter()
        .filter(|e| matches!(e, JournalEvent::GoReceived { order_id: 41 }))
        .count();
    assert_eq!(gos, 4);
    let dispensed = events(&m)
        .iter()
        .filter(|e| matches!(e, JournalEvent::Dispensed { order_id: 41, .. }))
        .count();
    assert_eq!(dispensed, 1);
    assert_eq!(m.dispensed_orders(), &[41]);
    assert_eq!(stock_of(&m, 1), 8);
    // The go timeout of the dispensed order does nothing.
    assert!(m.go_deadline(41, now + DEFAULT_GO_TIMEOUT).is_empty());
}

#[test]
fn repeated_dispense_repeats_the_ack_while_held_and_ack_and_result_once_finished() {
    let mut m = machine(Behaviour::Normal);
    let now = Instant::now();
    m.handle_command(Command::Dispense, &dispense(42, &[(1, 1)]), now);
    // Held: the same ack, and no second timer.
    let again = m.handle_command(Command::Dispense, &dispense(42, &[(1, 1)]), now);
    assert_eq!(again, vec![Outgoing::Ack(accepted(42))]);
    let went = m.handle_command(Command::Go, &go(42), now);
    // Finished: the stored ack and result.
    let again = m.handle_command(Command::Dispense, &dispense(42, &[(1, 1)]), now);
    assert_eq!(
        again,
        vec![
            Outgoing::Ack(accepted(42)),
            Outgoing::Result(results(&went)[0].clone())
        ]
    );
    assert_eq!(m.dispensed_orders(), &[42]);
}

#[test]
fn cancel_before_go_drops_the_order_for_good() {
    let mut m = machine(Behaviour::Normal);
    let now = Instant::now();
    m.handle_command(Command::Dispense, &dispense(43, &[(1, 1)]), now);
    assert!(m
        .handle_command(Command::Cancel, &cancel(43), now)
        .is_empty());
    assert!(m.held_orders().is_empty());
    assert!(events(&m).contains(&JournalEvent::HoldCancelled { order_id: 43 }));
    // A repeated cancel is not answered and journals no second drop.
    assert!(m
        .handle_command(Command::Cancel, &cancel(43), now)
        .is_empty());
    let drops = events(&m)
        .iter()
        .filter(|e| matches!(e, JournalEvent::HoldCancelled { .. }))
        .count();
    assert_eq!(drops, 1);
    // A go that comes anyway finds nothing held: no_go, nothing out.
    let out = m.handle_command(Command::Go, &go(43), now);
    assert_eq!(out, vec![Outgoing::Result(no_go(43))]);
    // A repeated dispense is refused as expired, and stays refused.
    let out = m.handle_command(Command::Dispense, &dispense(43, &[(1, 1)]), now);
    assert_eq!(out, vec![Outgoing::Ack(refused(43, REASON_EXPIRED))]);
    let out = m.handle_command(Command::Dispense, &dispense(43, &[(1, 1)]), now);
    assert_eq!(acks(&out), vec![refused(43, REASON_EXPIRED)]);
    assert!(m.handle_command(Command::Go, &go(43), now).len() == 1);
    // Its timer does nothing either.
    assert!(m.go_deadline(43, now + DEFAULT_GO_TIMEOUT).is_empty());
    assert!(m.dispensed_orders().is_empty());
    assert!(!m.was_dispensed(43));
    assert_eq!(stock_of(&m, 1), 10);
}

#[test]
fn go_timeout_drops_the_order_with_a_no_go_result() {
    let mut m = machine(Behaviour::Normal);
    let t0 = Instant::now();
    let out = m.handle_command(Command::Dispense, &dispense(44, &[(1, 2), (2, 1)]), t0);
    assert_eq!(out, held(44));
    // Early (a stale timer): nothing.
    assert!(m
        .go_deadline(44, t0 + DEFAULT_GO_TIMEOUT - Duration::from_millis(1))
        .is_empty());
    assert_eq!(m.held_orders(), vec![44]);
    let out = m.go_deadline(44, t0 + DEFAULT_GO_TIMEOUT);
    let expected = ResultMsg {
        order_id: 44,
        items: vec![
            ResultItem {
                product_id: 1,
                quantity: 2,
                dispensed: 0,
            },
            ResultItem {
                product_id: 2,
                quantity: 1,
                dispensed: 0,
            },
        ],
        error: Some(ERROR_NO_GO.into()),
    };
    assert_eq!(out, vec![Outgoing::Result(expected.clone())]);
    assert!(events(&m).contains(&JournalEvent::NoGo { order_id: 44 }));
    assert!(m.held_orders().is_empty());
    assert!(m.dispensed_orders().is_empty());
    assert_eq!((stock_of(&m, 1), stock_of(&m, 2)), (10, 1));
    // Once only.
    assert!(m.go_deadline(44, t0 + 2 * DEFAULT_GO_TIMEOUT).is_empty());
    // A late go never dispenses it.
    let later = t0 + DEFAULT_GO_TIMEOUT + Duration::from_secs(1);
    let out = m.handle_command(Command::Go, &go(44), later);
    assert_eq!(out, vec![Outgoing::Result(no_go(44))]);
    assert!(m.dispensed_orders().is_empty());
    // The result is kept like any other: repeated with the ack, and
    // re-published after a reconnect (machine rule 4).
    let out = m.handle_command(Command::Dispense, &dispense(44, &[(1, 2), (2, 1)]), later);
    assert_eq!(
        out,
        vec![
            Outgoing::Ack(accepted(44)),
            Outgoing::Result(expected.clone())
        ]
    );
    assert_eq!(results(&m.on_connect(later)), vec![expected]);
    assert!(m.dispensed_orders().is_empty());
}

#[test]
fn go_timeout_is_configurable_and_fixed_at_the_ack() {
    let mut m = machine(Behaviour::Normal);
    m.set_go_timeout(Duration::from_millis(250));
    assert_eq!(m.go_timeout(), Duration::from_millis(250));
    let t0 = Instant::now();
    let out = m.handle_command(Command::Dispense, &dispense(45, &[(1, 1)]), t0);
    assert_eq!(
        out[1],
        Outgoing::GoDeadline {
            order_id: 45,
            after: Duration::from_millis(250)
        }
    );
    // Changing it later does not move this order's deadline.
    m.set_go_timeout(Duration::from_secs(60));
    assert_eq!(
        results(&m.go_deadline(45, t0 + Duration::from_millis(250)))[0].error,
        Some(ERROR_NO_GO.into())
    );
}

#[test]
fn go_before_its_timeout_wins() {
    let mut m = machine(Behaviour::Normal);
    let t0 = Instant::now();
    m.handle_command(Command::Dispense, &dispense(46, &[(1, 1)]), t0);
    let out = m.handle_command(Command::Go, &go(46), t0 + DEFAULT_GO_TIMEOUT / 2);
    assert_eq!(results(&out)[0].error, None);
    // The timer fires later and finds the order settled.
    assert!(m.go_deadline(46, t0 + DEFAULT_GO_TIMEOUT).is_empty());
    assert!(!events(&m)
        .iter()
        .any(|e| matches!(e, JournalEvent::NoGo { .. })));
    assert_eq!(m.dispensed_orders(), &[46]);
}

#[test]
fn go_for_an_unknown_order_answers_no_go_and_never_dispenses_it() {
    let mut m = machine(Behaviour::Normal);
    let now = Instant::now();
    let out = m.handle_command(Command::Go, &go(47), now);
    assert_eq!(out, vec![Outgoing::Result(no_go(47))]);
    let payload = out[0].publication(&m.machine_no()).unwrap().payload;
    assert_eq!(payload, br#"{"order_id":47,"items":[],"error":"no_go"}"#);
    // Every go for it gets the same answer; the answer is kept like a
    // result (it may be lost in a reconnect).
    assert_eq!(m.handle_command(Command::Go, &go(47), now), out);
    assert_eq!(results(&m.on_connect(now)), vec![no_go(47)]);
    // The command arriving late (a stalled link) is refused: the gateway
    // was told no.
    let out = m.handle_command(Command::Dispense, &dispense(47, &[(1, 1)]), now);
    assert_eq!(out, vec![Outgoing::Ack(refused(47, REASON_EXPIRED))]);
    assert!(m.dispensed_orders().is_empty());
    assert!(m.held_orders().is_empty());
    assert_eq!(stock_of(&m, 1), 10);
}

#[test]
fn go_for_a_refused_or_slow_acked_order_answers_no_go() {
    let mut m = machine(Behaviour::Refuse {
        reason: "door_open".into(),
    });
    let now = Instant::now();
    m.handle_command(Command::Dispense, &dispense(48, &[(1, 1)]), now);
    let out = m.handle_command(Command::Go, &go(48), now);
    assert_eq!(out, vec![Outgoing::Result(no_go(48))]);
    // Still the refusal it was.
    let out = m.handle_command(Command::Dispense, &dispense(48, &[(1, 1)]), now);
    assert_eq!(out, vec![Outgoing::Ack(refused(48, "door_open"))]);

    // A go before a slow ack was even sent drops the order.
    m.set_behaviour(Behaviour::SlowAck { ms: 100 });
    m.handle_command(Command::Dispense, &dispense(49, &[(1, 1)]), now);
    let out = m.handle_command(Command::Go, &go(49), now);
    assert_eq!(out, vec![Outgoing::Result(no_go(49))]);
    let out = m.resume(49, now + Duration::from_millis(100));
    assert_eq!(out, vec![Outgoing::Ack(refused(49, REASON_EXPIRED))]);
    assert!(m.dispensed_orders().is_empty());
}

#[test]
fn fail_and_partial_are_decided_at_the_ack() {
    // The behaviour in force at the ack decides how the held order comes
    // out, whatever it is when the go arrives.
    let mut m = machine(Behaviour::Fail {
        error: "motor_jam".into(),
    });
    let now = Instant::now();
    m.handle_command(Command::Dispense, &dispense(50, &[(1, 2)]), now);
    m.set_behaviour(Behaviour::Normal);
    let out = m.handle_command(Command::Go, &go(50), now);
    assert_eq!(results(&out)[0].items[0].dispensed, 0);
    assert_eq!(results(&out)[0].error.as_deref(), Some("motor_jam"));
    assert_eq!(m.dispensed_orders(), &[50]);
}

#[test]
fn ack_then_silent_keeps_a_no_go_result_to_itself() {
    let mut m = machine(Behaviour::AckThenSilent);
    let t0 = Instant::now();
    m.handle_command(Command::Dispense, &dispense(51, &[(1, 1)]), t0);
    assert!(m.go_deadline(51, t0 + DEFAULT_GO_TIMEOUT).is_empty());
    assert!(events(&m).contains(&JournalEvent::NoGo { order_id: 51 }));
    // A go for something it does not hold: silent too.
    assert!(m.handle_command(Command::Go, &go(52), t0).is_empty());
    m.set_behaviour(Behaviour::Normal);
    let late: Vec<u64> = results(&m.on_connect(t0))
        .iter()
        .map(|r| r.order_id)
        .collect();
    assert_eq!(late, vec![51, 52]);
    assert!(m.dispensed_orders().is_empty());
}

#[test]
fn ignore_go_dispenses_on_its_ack_and_ignores_go() {
    let mut m = machine(Behaviour::IgnoreGo);
    let now = Instant::now();
    let out = m.handle_command(Command::Dispense, &dispense(53, &[(1, 2)]), now);
    // The old one-phase answer: ack, result, snapshot; no hold, no timer.
    assert_eq!(out.len(), 3, "{out:?}");
    assert_eq!(out[0], Outgoing::Ack(accepted(53)));
    assert_eq!(results(&out)[0].items[0].dispensed, 2);
    assert!(matches!(out[2], Outgoing::Inventory(_)));
    assert_eq!(m.dispensed_orders(), &[53]);
    assert!(m.held_orders().is_empty());
    assert!(!events(&m)
        .iter()
        .any(|e| matches!(e, JournalEvent::Held { .. })));
    // Go and cancel change nothing and are not answered.
    assert!(m.handle_command(Command::Go, &go(53), now).is_empty());
    assert!(m
        .handle_command(Command::Cancel, &cancel(53), now)
        .is_empty());
    // Not even a go for an order it never saw.
    assert!(m.handle_command(Command::Go, &go(54), now).is_empty());
    assert!(events(&m).contains(&JournalEvent::GoReceived { order_id: 54 }));
    // Repeats are answered from memory, never dispensed again.
    let again = m.handle_command(Command::Dispense, &dispense(53, &[(1, 2)]), now);
    assert_eq!(acks(&again), vec![accepted(53)]);
    assert_eq!(results(&again), results(&out));
    assert_eq!(m.dispensed_orders(), &[53]);
    assert_eq!(stock_of(&m, 1), 8);
}

#[test]
fn reboot_before_go_forgets_the_order_and_answers_go_with_no_go() {
    let mut m = machine(Behaviour::RebootBeforeGo);
    let now = Instant::now();
    let out = m.handle_command(Command::Dispense, &dispense(55, &[(1, 1)]), now);
    // The ack, then the cut once it is delivered; no go timeout to arm.
    assert_eq!(
        out,
        vec![Outgoing::Ack(accepted(55)), Outgoing::DropWhenDelivered]
    );
    assert!(m.held_orders().is_empty());
    let ev = events(&m);
    let held_at = ev
        .iter()
        .position(|e| e == &JournalEvent::Held { order_id: 55 });
    let rebooted_at = ev.iter().position(|e| {
        e == &JournalEvent::Rebooted {
            forgotten: vec![55],
        }
    });
    assert!(
        held_at.is_some() && held_at < rebooted_at,
        "held then forgot: {ev:?}"
    );
    // Back online, the gateway's go finds nothing held.
    m.on_connect(now);
    let out = m.handle_command(Command::Go, &go(55), now);
    assert_eq!(out, vec![Outgoing::Result(no_go(55))]);
    assert!(m.dispensed_orders().is_empty());
    assert_eq!(stock_of(&m, 1), 10, "stock kept, nothing out");
    // And the late command it may still get is refused.
    m.set_behaviour(Behaviour::Normal);
    let out = m.handle_command(Command::Dispense, &dispense(55, &[(1, 1)]), now);
    assert_eq!(out, vec![Outgoing::Ack(refused(55, REASON_EXPIRED))]);
    assert!(m.dispensed_orders().is_empty());
}

#[test]
fn reboot_forgets_held_orders_only_and_stale_timers_do_nothing() {
    let mut m = machine(Behaviour::Normal);
    let t0 = Instant::now();
    order(&mut m, 56, &[(1, 1)], t0);
    m.handle_command(Command::Dispense, &dispense(57, &[(1, 1)]), t0);
    m.handle_command(Command::Cancel, &cancel(58), t0);
    assert_eq!(m.reboot(t0), vec![57]);
    assert!(m.held_orders().is_empty());
    assert_eq!(stock_of(&m, 1), 9, "stock kept");
    // Finished answers are kept.
    let again = m.handle_command(Command::Dispense, &dispense(56, &[(1, 1)]), t0);
    assert_eq!(results(&again).len(), 1);
    let again = m.handle_command(Command::Dispense, &dispense(58, &[(1, 1)]), t0);
    assert_eq!(again, vec![Outgoing::Ack(refused(58, REASON_EXPIRED))]);
    // The forgotten order's command arrives again later and is held anew;
    // the old hold's timer must not drop the new one early.
    let t1 = t0 + Duration::from_secs(5);
    assert_eq!(
        m.handle_command(Command::Dispense, &dispense(57, &[(1, 1)]), t1),
        held(57)
    );
    assert!(m.go_deadline(57, t0 + DEFAULT_GO_TIMEOUT).is_empty());
    assert_eq!(m.held_orders(), vec![57]);
    let out = m.handle_command(Command::Go, &go(57), t1);
    assert_eq!(results(&out).len(), 1);
    assert_eq!(m.dispensed_orders(), &[56, 57]);
}

#[test]
fn duplicate_and_result_after_reconnect_time_out_like_any_machine() {
    let t0 = Instant::now();
    let mut m = machine(Behaviour::Duplicate);
    m.handle_command(Command::Dispense, &dispense(59, &[(1, 1)]), t0);
    let out = m.go_deadline(59, t0 + DEFAULT_GO_TIMEOUT);
    assert_eq!(results(&out).len(), 2, "twice, as every result");
    let mut m = machine(Behaviour::ResultAfterReconnect);
    m.handle_command(Command::Dispense, &dispense(60, &[(1, 1)]), t0);
    let out = m.go_deadline(60, t0 + DEFAULT_GO_TIMEOUT);
    assert_eq!(results(&out).len(), 1);
    assert!(!out.contains(&Outgoing::DropWhenDelivered), "no go, no cut");
    assert!(m.dispensed_orders().is_empty());
}

#[test]
fn go_deadline_is_an_action_not_a_message() {
    let m = MachineNo::parse("00000042").unwrap();
    let timer = Outgoing::GoDeadline {
        order_id: 1,
        after: Duration::from_secs(1),
    };
    assert!(timer.publication(&m).is_none());
    assert!(timer.sent_event(&m).is_none());
}
