//! Smoke test of `vendgate-sim load` against a real test gateway: two seconds
//! of orders from 8 workers over 4 simulated machines; every order placed is
//! answered, and the answers add up over their codes. No timing assertions.

use std::time::Duration;

use vendgate_e2e::{ready_sim, sim_config, TestGateway};
use vendgate_proto::machine::MachineNo;
use vendgate_proto::msg::InventoryItem;
use vendgate_sim::load::{load, LoadOptions, LoadStop};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_for_two_seconds_counts_add_up() {
    let gw = TestGateway::start_with(|s| {
        s.http.rate_limit = 0;
        // One simulated machine answers thousands of commands a second here.
        s.mqtt.machine_publish_rate = 0;
    })
    .await;
    let (appid, appsecret) = gw.merchant("load").await;
    let mut sims = Vec::new();
    let mut machines = Vec::new();
    for i in 0..4u32 {
        let m = MachineNo::from_u32(70_000_000 + i).unwrap();
        let secret = gw.machine(&appid, m.as_str()).await;
        let mut c = sim_config(&gw, m.as_str(), &secret);
        c.inventory = vec![InventoryItem {
            product_id: 1,
            stock: 100_000,
            price: 100,
        }];
        sims.push(ready_sim(&gw, c).await);
        machines.push(m);
    }
    let mut opts = LoadOptions::new(
        format!("http://{}", gw.http_addr),
        appid,
        appsecret,
        machines,
    );
    opts.concurrency = 8;
    opts.stop = LoadStop::Duration(Duration::from_secs(2));
    let report = load(opts).await.expect("load runs");
    let by_code: u64 = report.codes.values().sum();
    assert!(report.placed > 0);
    assert_eq!(report.placed, report.answered);
    assert_eq!(report.answered, by_code);
    assert_eq!(report.ok, report.codes.get(&0).copied().unwrap_or(0));
    // Every accepted order exists in the gateway.
    let dispensed: usize = sims.iter().map(|s| s.dispensed_orders().len()).sum();
    assert!(
        dispensed as u64 >= report.ok.saturating_sub(8),
        "accepted orders reach the machines"
    );
    for s in &sims {
        s.shutdown().await;
    }
    gw.stop().await;
}
