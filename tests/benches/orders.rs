//! Order benchmark (`cargo bench -p vendgate-e2e --bench orders`): `POST
//! /orders` end to end (HTTP in → durable order → machine accept → HTTP out)
//! at concurrency 1 and 64 against an in-process gateway and 64 simulated
//! machines, on each backend of `VENDGATE_BENCH_BACKENDS` in turn (default
//! `sqlite,postgres`: both in one run, so their figures compare; PostgreSQL
//! is the test fixture's server, or `VENDGATE_TEST_PG_URL`'s). Prints
//! figures, and for PostgreSQL what the orders cost the database (commits,
//! and statements when `pg_stat_statements` is loaded); asserts nothing
//! about time.

use std::sync::Arc;
use std::time::{Duration, Instant};

use sqlx::{Connection, PgConnection};
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
    let backends =
        std::env::var("VENDGATE_BENCH_BACKENDS").unwrap_or_else(|_| "sqlite,postgres".into());
    let mut at_64 = Vec::new();
    for name in backends.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        let postgres = match name {
            "sqlite" => false,
            "postgres" => true,
            other => panic!("VENDGATE_BENCH_BACKENDS: {other:?} is neither sqlite nor postgres"),
        };
        at_64.push((name.to_string(), bench(name, postgres).await));
    }
    if let [(a, ra), .., (b, rb)] = at_64.as_slice() {
        println!("c=64: {b} / {a} = {:.2}×", rb / ra);
    }
}

/// PostgreSQL's counters for one database: commits (read-only ones too),
/// and the statements clients sent (`pg_stat_statements`' top-level calls
/// in it, BEGIN and COMMIT included, not the foreign key checks a statement
/// runs; None without the extension, which must be loaded and created in
/// `template1` for the fresh test databases to have it).
async fn pg_counters(url: &str) -> (i64, Option<i64>) {
    let mut c = PgConnection::connect(url)
        .await
        .expect("counters connection");
    let (commits,): (i64,) = sqlx::query_as(
        "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()",
    )
    .fetch_one(&mut c)
    .await
    .expect("pg_stat_database");
    let statements: Option<(Option<i64>,)> = sqlx::query_as(
        "SELECT sum(calls)::bigint FROM pg_stat_statements WHERE toplevel \
         AND dbid = (SELECT oid FROM pg_database WHERE datname = current_database())",
    )
    .fetch_optional(&mut c)
    .await
    .ok()
    .flatten();
    let _ = c.close().await;
    (commits, statements.and_then(|(n,)| n))
}

/// One backend's runs; its orders per second at c=64.
async fn bench(name: &str, postgres: bool) -> f64 {
    let gw = TestGateway::start_on(postgres, tempfile::tempdir().expect("temp dir"), |s| {
        s.http.rate_limit = 0;
        // One simulated machine answers thousands of commands a second here.
        s.mqtt.machine_publish_rate = 0;
    })
    .await;
    let pg_url = postgres.then(|| {
        std::fs::read_to_string(gw.dir.path().join("postgres-url"))
            .expect("the test database's URL")
            .trim()
            .to_string()
    });
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
    let mut rate_64 = 0.0;
    let mut orders = 0u64;
    for (concurrency, duration) in [
        (1usize, Duration::from_secs(5)),
        (64, Duration::from_secs(10)),
    ] {
        let before = match &pg_url {
            Some(url) => pg_counters(url).await.1,
            None => None,
        };
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
        let rate = all.len() as f64 / elapsed.as_secs_f64();
        orders += all.len() as u64;
        if concurrency == 64 {
            rate_64 = rate;
        }
        let statements = match (&pg_url, before) {
            (Some(url), Some(b)) => pg_counters(url).await.1.map(|a| {
                format!(
                    " statements/order={:.1}",
                    (a - b) as f64 / all.len().max(1) as f64
                )
            }),
            _ => None,
        };
        println!(
            "{name:<8} POST /orders c={concurrency:<3} ok={:<6} errors={errors:<4} rate={:>7.0}/s p50={:>7.3}ms p90={:>7.3}ms p99={:>7.3}ms max={:>7.3}ms",
            all.len(),
            rate,
            percentile_ms(&all, 0.5),
            percentile_ms(&all, 0.9),
            percentile_ms(&all, 0.99),
            percentile_ms(&all, 1.0),
        );
        if let Some(s) = statements {
            println!("{name:<8}   {s} (the gateway's background work included)");
        }
    }
    for s in &sims {
        s.shutdown().await;
    }
    gw.stop().await;
    if let Some(url) = &pg_url {
        // Read after the gateway stopped: a session reports its counters
        // when it ends (or a second after its last report), so only now are
        // they complete. Over the whole run: set-up included (a few hundred
        // commits against thousands of orders).
        let (commits, _) = pg_counters(url).await;
        println!(
            "{name:<8}   commits/order={:.2} (both runs, set-up and background work included)",
            commits as f64 / orders.max(1) as f64
        );
    }
    rate_64
}
