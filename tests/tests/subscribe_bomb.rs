//! The SUBSCRIBE amplification attack against a real gateway over loopback
//! TCP, with the default limits: a machine with a stolen credential fills
//! its retained uplinks, then sends SUBSCRIBE packets whose filters replay
//! them (thousands of copies of one filter, and the most distinct filters
//! its session may hold, over and over), never reads, and reconnects to do
//! it again. The gateway's peak memory stays under a ceiling and a second,
//! honest machine keeps answering commands throughout.
//!
//! A test binary of its own, with one test, so that the process's peak RSS
//! (`VmHWM`, which includes the in-process gateway) is this attack's alone.

use std::time::{Duration, Instant};

use rumqttc::mqttbytes::v4::{ConnectReturnCode, Packet, Publish, Subscribe, SubscribeFilter};
use rumqttc::mqttbytes::QoS;
use vendgate_e2e::{percentile_ms, ready_sim, sim_config, RawClient, TestGateway};
use vendgate_proto::machine::MachineNo;

const ATTACKER: &str = "30000001";
const HONEST: &str = "30000002";
/// Peak RSS of the whole test process (gateway, simulator and attacker).
/// Measured: 31 MB before the attack, 34 MB peak (debug build, 2 vCPUs);
/// the attack without its bounds took a release gateway to 4.4 GB.
const RSS_CEILING_MB: u64 = 256;
/// How much the peak may grow over the figure before the attack.
const RSS_GROWTH_MB: u64 = 96;
/// As long as the reported attack ran.
const ATTACK_FOR: Duration = Duration::from_secs(6);

fn proc_status_kb(field: &str) -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    s.lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("{field} in /proc/self/status"))
}

fn subscribe(pkid: u16, filters: impl IntoIterator<Item = String>) -> Packet {
    let filters: Vec<SubscribeFilter> = filters
        .into_iter()
        .map(|f| SubscribeFilter::new(f, QoS::AtMostOnce))
        .collect();
    Packet::Subscribe(Subscribe { pkid, filters })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribe_bomb_keeps_memory_bounded_and_commands_flowing() {
    let gw = TestGateway::start().await;
    let (appid, _) = gw.merchant("m").await;
    let secret = gw.machine(&appid, ATTACKER).await;
    let honest_secret = gw.machine(&appid, HONEST).await;
    let _sim = ready_sim(&gw, sim_config(&gw, HONEST, &honest_secret)).await;

    // The attacker retains the largest payload each of its five uplinks may
    // keep (mqtt.max_retained_message_size, 32 KiB with the topic), and
    // tries a 60 KB payload that is not JSON, which is not kept at all.
    let (mut a, code) =
        RawClient::connect(gw.mqtt_addr, ATTACKER, Some((ATTACKER, &secret)), 60).await;
    assert_eq!(code, Some(ConnectReturnCode::Success));
    let uplinks = ["state", "inventory", "pong", "ack", "result"];
    for u in uplinks {
        let topic = format!("vend/v1/{ATTACKER}/{u}");
        let body = format!(r#"{{"x":"{}"}}"#, "a".repeat(32 * 1024 - topic.len() - 8));
        let mut p = Publish::new(&topic, QoS::AtMostOnce, body);
        p.retain = true;
        a.send(Packet::Publish(p)).await;
    }
    let mut junk = Publish::new(
        format!("vend/v1/{ATTACKER}/inventory"),
        QoS::AtLeastOnce,
        vec![b'z'; 60_000],
    );
    junk.retain = true;
    junk.pkid = 1;
    a.send(Packet::Publish(junk)).await;
    assert!(matches!(a.recv().await, Some(Packet::PubAck(_))));
    let router = &gw.handle.hub.router;
    assert_eq!(
        router
            .stats
            .retained_refused
            .load(std::sync::atomic::Ordering::Relaxed),
        1,
        "the payload that is not JSON is not retained"
    );
    let kept = router.retained_for(&format!("vend/v1/{ATTACKER}/#"), QoS::AtMostOnce);
    assert_eq!(kept.len(), 5);
    assert!(kept.iter().all(|m| m.payload.starts_with(b"{")));
    drop(a);

    // The honest machine is pinged throughout; every ping must succeed.
    let honest: MachineNo = HONEST.parse().unwrap();
    let commands = gw.handle.commands.clone();
    let stop = tokio_util::sync::CancellationToken::new();
    let pinger = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut rtts = Vec::new();
            while !stop.is_cancelled() {
                let rtt = commands
                    .ping(&honest, Duration::from_secs(5))
                    .await
                    .expect("the honest machine answers during the attack");
                rtts.push(rtt);
                // The operator's cadence (20/s), within the machine's
                // packet rate; not synchronisation.
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            rtts
        })
    };

    let rss_before = proc_status_kb("VmRSS:");
    let started = Instant::now();
    let mut subscribes = 0u32;
    let (mut refused_connects, mut closed) = (0u32, 0u32);
    let mut round = 0u32;
    while started.elapsed() < ATTACK_FOR {
        round += 1;
        let (mut c, code) =
            RawClient::connect(gw.mqtt_addr, ATTACKER, Some((ATTACKER, &secret)), 60).await;
        match code {
            Some(ConnectReturnCode::Success) => {}
            // The machine's packet bucket is spent (reconnecting does not
            // refill it), or its address is over its connect rate.
            Some(ConnectReturnCode::ServiceUnavailable) | None => {
                refused_connects += 1;
                continue;
            }
            other => panic!("unexpected CONNACK {other:?}"),
        }
        if round.is_multiple_of(2) {
            // One SUBSCRIBE of 3,000 copies of one filter (60 KB).
            c.send(subscribe(
                1,
                (0..3000).map(|_| format!("vend/v1/{ATTACKER}/#")),
            ))
            .await;
            subscribes += 1;
        } else {
            // The eight distinct filters its session may hold, each
            // replaying the retained uplinks, three times over.
            let filters = [
                "#",
                "+",
                "+/#",
                "state",
                "inventory",
                "pong",
                "ack",
                "result",
            ]
            .map(|f| format!("vend/v1/{ATTACKER}/{f}"));
            for pkid in 1..=3 {
                c.send(subscribe(pkid, filters.clone())).await;
                subscribes += 1;
            }
        }
        // Never reads: the gateway must close it by itself.
        assert!(
            c.closed().await,
            "round {round}: the attacker is disconnected"
        );
        closed += 1;
    }
    let attack = started.elapsed();
    stop.cancel();
    let mut rtts = pinger.await.expect("pinger");
    rtts.sort();

    let hwm = proc_status_kb("VmHWM:");
    let stats = &gw.handle.hub.stats;
    let load = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
    println!(
        "subscribe bomb: {subscribes} SUBSCRIBE packets in {round} rounds over {attack:.2?} \
         ({:.0}/s; {closed} connections closed, {refused_connects} CONNECTs refused); \
         rate_limited={} memory_budget={}; RSS before {} MB, peak {} MB; honest pings {} \
         (p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms)",
        f64::from(subscribes) / attack.as_secs_f64(),
        load(&stats.rate_limited),
        load(&stats.memory_budget),
        rss_before / 1024,
        hwm / 1024,
        rtts.len(),
        percentile_ms(&rtts, 0.5),
        percentile_ms(&rtts, 0.99),
        percentile_ms(&rtts, 1.0),
    );
    assert!(
        load(&stats.rate_limited) >= 1,
        "the 3,000-filter SUBSCRIBE is over the packet rate"
    );
    assert!(
        load(&stats.memory_budget) >= 1,
        "the replays hit the memory budget"
    );
    assert!(
        !rtts.is_empty(),
        "the honest machine was pinged during the attack"
    );
    assert!(
        hwm / 1024 < RSS_CEILING_MB,
        "peak RSS {} MB over the {RSS_CEILING_MB} MB ceiling",
        hwm / 1024
    );
    assert!(
        hwm.saturating_sub(rss_before) / 1024 < RSS_GROWTH_MB,
        "peak RSS grew {} MB during the attack",
        hwm.saturating_sub(rss_before) / 1024
    );
    gw.stop().await;
}
