//! Hostile input never crashes or corrupts (issue 7): the fuzz targets'
//! bodies (`vendgate::fuzzing`) run on stable over (a) every committed file
//! of every corpus directory in `fuzz/corpus/` (seeds and every crash ever
//! found) and (b) a bounded number of proptest-generated inputs. The
//! gateway-backed targets run against one real gateway per test (real
//! SQLite in a temp dir, loopback TCP, simulated machines).

use std::path::PathBuf;

use proptest::prelude::*;
use vendgate::fuzzing::{self, Harness};

/// Every file of `fuzz/corpus/<target>/`, sorted so failures name the same
/// input on every run.
fn corpus(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("corpus {}: {e}", dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "corpus {} is empty", dir.display());
    files
        .into_iter()
        .map(|p| {
            let data = std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            (p.display().to_string(), data)
        })
        .collect()
}

/// Run `f` over a corpus, naming the input that fails.
fn run_corpus(target: &str, f: impl Fn(&[u8])) {
    for (name, data) in corpus(target) {
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(&data)));
        assert!(r.is_ok(), "{target}: corpus input {name} failed");
    }
}

/// Cases per proptest; `PROPTEST_CASES` raises it for a longer local run.
fn config(cases: u32) -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(cases);
    ProptestConfig {
        cases,
        // Shrinking restarts cases against a live gateway; the failing input
        // is printed either way.
        max_shrink_iters: 64,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

#[test]
fn mqtt_decode_corpus() {
    run_corpus("mqtt_decode", fuzzing::mqtt_decode);
}

#[test]
fn edge_session_corpus() {
    let h = Harness::new();
    run_corpus("edge_session", |d| h.edge_session(d));
}

#[test]
fn device_payload_corpus() {
    let h = Harness::new();
    run_corpus("device_payload", |d| h.device_payload(d));
}

#[test]
fn http_api_corpus() {
    let h = Harness::new();
    run_corpus("http_api", |d| h.http_api(d));
}

proptest! {
    #![proptest_config(config(2000))]
    #[test]
    fn mqtt_decode_arbitrary(data in proptest::collection::vec(any::<u8>(), 0..512)) {
        fuzzing::mqtt_decode(&data);
    }
}

/// Arbitrary bytes, most of them prefixed with a real packet header so the
/// decoder gets past the first byte.
fn mqtt_stream() -> impl Strategy<Value = Vec<u8>> {
    (
        any::<u8>(),
        proptest::collection::vec(
            (
                prop_oneof![
                    Just(0x10u8),
                    Just(0x30),
                    Just(0x32),
                    Just(0x34),
                    Just(0x62),
                    Just(0x82),
                    Just(0xa2),
                    Just(0xc0),
                    Just(0xe0),
                    any::<u8>()
                ],
                proptest::collection::vec(any::<u8>(), 0..40),
            ),
            0..6,
        ),
    )
        .prop_map(|(mode, packets)| {
            let mut out = vec![mode];
            for (header, body) in packets {
                out.push(header);
                // A remaining length that matches the body most of the time.
                out.push(u8::try_from(body.len()).unwrap_or(0x7f));
                out.extend(body);
            }
            out
        })
}

#[test]
fn edge_session_arbitrary() {
    let h = Harness::new();
    proptest!(config(64), |(data in mqtt_stream())| {
        h.edge_session(&data);
    });
}

#[test]
fn device_payload_arbitrary() {
    let h = Harness::new();
    proptest!(config(48), |(data in proptest::collection::vec(any::<u8>(), 0..96))| {
        h.device_payload(&data);
    });
}

#[test]
fn http_api_arbitrary() {
    let h = Harness::new();
    proptest!(config(128), |(data in proptest::collection::vec(any::<u8>(), 0..160))| {
        h.http_api(&data);
    });
}

/// The `device_payload` finding end to end: a real simulated machine reports
/// each line of an order that repeats a product; the order must complete
/// (it used to be refused and go `unknown` with a full refund).
#[test]
fn repeated_product_lines_complete_on_a_real_machine() {
    use vendgate::domain::order::Status;
    use vendgate::orders::PlaceRequest;
    let h = Harness::new();
    h.block_on(async {
        let id = h
            .handle
            .orders
            .place_here(PlaceRequest {
                merchant: h.merchant().to_owned(),
                machine_no: h.shop_machine(),
                lines: vec![(1, 1), (1, 2)],
                out_trade_no: None,
                pay_later: false,
                answer_by: vendgate::orders::answer_by(&h.handle.settings.orders),
            })
            .await
            .expect("order accepted");
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(15);
        loop {
            let o = h
                .handle
                .store
                .order(id)
                .await
                .expect("storage")
                .expect("order");
            if o.status == Status::Completed {
                assert_eq!(o.refund_amount, 0);
                assert!(
                    o.lines.iter().all(|l| l.dispensed == l.quantity),
                    "{:?}",
                    o.lines
                );
                break;
            }
            assert!(
                !o.status.is_final() && o.status != Status::Unknown,
                "order ended {:?} ({:?})",
                o.status,
                o.error
            );
            assert!(
                tokio::time::Instant::now() < deadline,
                "order still {:?}",
                o.status
            );
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    });
}

#[test]
fn reachability_follows_the_state_machine() {
    use vendgate::domain::order::Status::*;
    assert!(fuzzing::reachable(Dispatching, Completed));
    assert!(fuzzing::reachable(Dispensing, Dispensing));
    assert!(!fuzzing::reachable(Completed, Dispensing));
    assert!(!fuzzing::reachable(Rejected, Completed));
    assert!(!fuzzing::reachable(Dispatching, Expired));
}
