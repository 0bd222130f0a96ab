//! Order benchmark (`cargo bench -p vendgate-e2e --bench orders`): `POST
//! /orders` end to end (HTTP in → durable order → machine accept → HTTP out)
//! at concurrency 1 and 64 against an in-process gateway with a SQLite file
//! and 64 simulated machines. Prints figures; asserts nothing about time.

use std::sync::Arc;
use std::time::{Duration, Instant};

use vendgate_e2e::{percentile_ms, ready_sim, sim_config, Api, TestGateway};
use vendgate_proto::machine::MachineNo;
use vendgate_proto::msg::InventoryItem;

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(run());
}

async fn run() {
    let gw = TestGateway::start_with(|s| {
        s.http.rate_limit = 0;
        // One simulated machine answers thousands of commands a second here.
        s.mqtt.machine_publish_rate = 0;
    })
    .await;
    let (appid, appsecret) = gw.merchant("bench").await;
    let mut sims = Vec::new();
    let mut machines = Vec::new();
    for i in 0..64u32 {
        let m = MachineNo::from_u32(40_000_000 + i).expect("machine_no");
        let secret = gw.machine(&appid, m.as_str()).await;
        let mut c = sim_config(&gw, m.as_str(), &secret);
        c.inventory = vec![InventoryItem {
            product_id: 1,
            stock: 1_000_000,
            price: 100,
        }];
        sims.push(ready_sim(&gw, c).await);
        machines.push(m);
    }
    let api = Arc::new(Api::new(&gw, &appid, &appsecret));
    for (concurrency, duration) in [
        (1usize, Duration::from_secs(5)),
        (64, Duration::from_secs(10)),
    ] {
        let t = Instant::now();
        let mut tasks = Vec::new();
        for w in 0..concurrency {
            let api = api.clone();
            let m = machines[w % machines.len()];
            tasks.push(tokio::spawn(async move {
                let mut ok = Vec::new();
                let mut errors = 0u64;
                while t.elapsed() < duration {
                    let s = Instant::now();
                    let v = api.order(m.as_str(), &[(1, 1)]).await;
                    if v["code"] == 0 {
                        ok.push(s.elapsed());
                    } else {
                        errors += 1;
                    }
                }
                (ok, errors)
            }));
        }
        let mut all = Vec::new();
        let mut errors = 0;
        for task in tasks {
            let (ok, e) = task.await.expect("worker");
            all.extend(ok);
            errors += e;
        }
        let elapsed = t.elapsed();
        all.sort();
        println!(
            "POST /orders c={concurrency:<3} ok={:<6} errors={errors:<4} rate={:>7.0}/s p50={:>7.3}ms p90={:>7.3}ms p99={:>7.3}ms max={:>7.3}ms",
            all.len(),
            all.len() as f64 / elapsed.as_secs_f64(),
            percentile_ms(&all, 0.5),
            percentile_ms(&all, 0.9),
            percentile_ms(&all, 0.99),
            percentile_ms(&all, 1.0),
        );
    }
    for s in &sims {
        s.shutdown().await;
    }
    gw.stop().await;
}
