//! Hub benchmark (`cargo bench -p vendgate-e2e --bench hub`): connect-to-online
//! latency, and the hub's command round trip gateway → machine → gateway
//! (`cmd/ping` → `pong`, PROTOCOL.md) at concurrency 1 and 64, no HTTP, no
//! storage. Prints figures; asserts nothing about time.

use std::sync::Arc;
use std::time::{Duration, Instant};

use vendgate_e2e::{percentile_ms, ready_sim, sim_config, TestGateway};
use vendgate_proto::machine::MachineNo;

fn report(name: &str, mut v: Vec<Duration>, elapsed: Duration) {
    v.sort();
    println!(
        "{name:<34} n={:<6} rate={:>8.0}/s p50={:>7.3}ms p90={:>7.3}ms p99={:>7.3}ms max={:>7.3}ms",
        v.len(),
        v.len() as f64 / elapsed.as_secs_f64(),
        percentile_ms(&v, 0.50),
        percentile_ms(&v, 0.90),
        percentile_ms(&v, 0.99),
        percentile_ms(&v, 1.0),
    );
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(run());
}

async fn run() {
    // One simulated machine answers thousands of pings a second here.
    let gw = TestGateway::start_with(|s| s.mqtt.machine_publish_rate = 0).await;
    let (appid, _) = gw.merchant("bench").await;

    // Connect → online, as the registry sees it, for 200 sequential connects.
    let m1 = "30000001";
    let s1 = gw.machine(&appid, m1).await;
    let mut lat = Vec::new();
    let t_all = Instant::now();
    let mut events = gw.handle.presence.subscribe();
    for _ in 0..200 {
        let t = Instant::now();
        let (c, _) = vendgate_e2e::RawClient::connect(gw.mqtt_addr, m1, Some((m1, &s1)), 30).await;
        loop {
            match events.recv().await {
                Ok(e) if e.online => break,
                Ok(_) => {}
                Err(_) => break,
            }
        }
        lat.push(t.elapsed());
        drop(c);
        loop {
            match events.recv().await {
                Ok(e) if !e.online => break,
                Ok(_) => {}
                Err(_) => break,
            }
        }
    }
    report("connect -> online", lat, t_all.elapsed());

    // Command round trip through the hub: 64 machines, pings at c=1 and c=64.
    let mut sims = Vec::new();
    let mut machines = Vec::new();
    for i in 0..64u32 {
        let m = MachineNo::from_u32(30_001_000 + i).expect("machine_no");
        let secret = gw.machine(&appid, m.as_str()).await;
        sims.push(ready_sim(&gw, sim_config(&gw, m.as_str(), &secret)).await);
        machines.push(m);
    }
    for (concurrency, total) in [(1usize, 5_000usize), (64, 50_000)] {
        let bus = gw.handle.commands.clone();
        let machines = Arc::new(machines.clone());
        let t = Instant::now();
        let mut tasks = Vec::new();
        for w in 0..concurrency {
            let bus = bus.clone();
            let machines = machines.clone();
            tasks.push(tokio::spawn(async move {
                let mut v = Vec::with_capacity(total / concurrency);
                for _ in 0..total / concurrency {
                    let t = Instant::now();
                    if bus
                        .ping(&machines[w % machines.len()], Duration::from_secs(5))
                        .await
                        .is_ok()
                    {
                        v.push(t.elapsed());
                    }
                }
                v
            }));
        }
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await.expect("worker"));
        }
        report(
            &format!("hub ping round trip c={concurrency}"),
            all,
            t.elapsed(),
        );
    }
    for s in &sims {
        s.shutdown().await;
    }
    gw.stop().await;
}
