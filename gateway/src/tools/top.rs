//! `vendgate top`: a terminal view of a running gateway for an operator on
//! the box. It scrapes the gateway's `/metrics` (the same numbers Prometheus
//! sees), redraws with plain ANSI escapes every interval and turns counters
//! into rates from successive scrapes. `--once` prints one frame (no
//! escapes) and exits, for scripts and tests.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::io::Write as _;
use std::time::Duration;

use anyhow::Context;
use tokio::time::Instant;

use crate::edge::stats::PATTERNS;

/// Longest a scrape may take.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(5);

/// One scrape: series (name and sorted `k=v` labels) → value.
#[derive(Debug, Clone)]
pub struct Sample {
    at: Instant,
    values: HashMap<(String, String), f64>,
}

impl Sample {
    /// Parse the text format leniently: comments and lines that do not
    /// parse are skipped (this is a viewer, not a validator).
    pub fn parse(text: &str) -> Self {
        let mut values = HashMap::new();
        for line in text.lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let Some((series, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let Ok(value) = value.parse::<f64>() else {
                continue;
            };
            let (name, labels) = match series.split_once('{') {
                Some((n, rest)) => (n, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            let mut pairs: Vec<&str> = split_labels(labels);
            pairs.sort_unstable();
            values.insert((name.to_string(), pairs.join(",")), value);
        }
        Self {
            at: Instant::now(),
            values,
        }
    }

    /// `name{labels}` where `labels` is `k="v"` pairs in sorted order.
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let mut pairs: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
        pairs.sort_unstable();
        self.values
            .get(&(name.to_string(), pairs.join(",")))
            .copied()
            .unwrap_or(0.0)
    }

    /// Every `label` value of `name`'s series with its value.
    fn by_label(&self, name: &str, label: &str) -> BTreeMap<String, f64> {
        let prefix = format!("{label}=\"");
        let mut out = BTreeMap::new();
        for ((n, labels), v) in &self.values {
            if n != name {
                continue;
            }
            for pair in split_labels(labels) {
                if let Some(val) = pair.strip_prefix(&prefix) {
                    *out.entry(val.trim_end_matches('"').to_string())
                        .or_insert(0.0) += v;
                }
            }
        }
        out
    }
}

/// Split `a="x",b="y"` at commas outside quotes.
fn split_labels(s: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let (mut start, mut quoted, mut escaped) = (0, false, false);
    for (i, c) in s.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' => escaped = true,
            '"' => quoted = !quoted,
            ',' if !quoted => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if start < s.len() {
        out.push(&s[start..]);
    }
    out
}

async fn scrape(client: &reqwest::Client, url: &str) -> anyhow::Result<Sample> {
    let text = client
        .get(url)
        .timeout(SCRAPE_TIMEOUT)
        .send()
        .await
        .with_context(|| format!("scraping {url}"))?
        .error_for_status()
        .with_context(|| format!("scraping {url}"))?
        .text()
        .await
        .context("reading the metrics")?;
    Ok(Sample::parse(&text))
}

fn human_bytes(b: f64) -> String {
    let units = ["B", "KiB", "MiB", "GiB"];
    let mut v = b;
    let mut i = 0;
    while v >= 1024.0 && i < units.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    format!("{v:.1} {}", units[i])
}

fn human_duration(s: f64) -> String {
    let s = s.max(0.0) as u64;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m {}s", s / 60, s % 60),
        3600..=86_399 => format!("{}h {}m", s / 3600, (s % 3600) / 60),
        _ => format!("{}d {}h", s / 86_400, (s % 86_400) / 3600),
    }
}

/// A histogram quantile from its cumulative buckets (upper bound of the
/// bucket holding the q-th observation), as Grafana's approximation would.
fn quantile(s: &Sample, name: &str, q: f64) -> Option<f64> {
    let bucket = format!("{name}_bucket");
    let mut buckets: Vec<(f64, f64)> = s
        .values
        .iter()
        .filter(|((n, _), _)| *n == bucket)
        .filter_map(|((_, l), v)| {
            let le = l.strip_prefix("le=\"")?.trim_end_matches('"');
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((le, *v))
        })
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    let total = buckets.last()?.1;
    if total <= 0.0 {
        return None;
    }
    buckets
        .iter()
        .find(|(_, c)| *c >= q * total)
        .map(|(le, _)| *le)
}

fn ms(v: Option<f64>) -> String {
    match v {
        Some(v) if v.is_finite() => format!("≤{:.0} ms", v * 1000.0),
        Some(_) => "> max".into(),
        None => "–".into(),
    }
}

/// One frame of the view. Rates need a previous sample; without one they
/// show as `–`.
pub fn render(url: &str, cur: &Sample, prev: Option<&Sample>) -> String {
    let dt = prev.map(|p| cur.at.duration_since(p.at).as_secs_f64());
    let rate = |name: &str, labels: &[(&str, &str)]| -> String {
        match (prev, dt) {
            (Some(p), Some(dt)) if dt > 0.0 => {
                let d = (cur.get(name, labels) - p.get(name, labels)).max(0.0);
                format!("{:.1}", d / dt)
            }
            _ => "–".into(),
        }
    };
    let mut o = String::new();
    let version = cur
        .by_label("vendgate_build_info", "version")
        .into_keys()
        .next()
        .unwrap_or_else(|| "?".into());
    let _ = writeln!(
        o,
        "vendgate top  {url}  version {version}  up {}",
        human_duration(cur.get("vendgate_uptime_seconds", &[]))
    );
    let cpu = match (prev, dt) {
        (Some(p), Some(dt)) if dt > 0.0 => format!(
            "{:.1}%",
            100.0
                * (cur.get("process_cpu_seconds_total", &[])
                    - p.get("process_cpu_seconds_total", &[]))
                .max(0.0)
                / dt
        ),
        _ => "–".into(),
    };
    let _ = writeln!(
        o,
        "process      rss {}  cpu {cpu}  open fds {:.0}",
        human_bytes(cur.get("process_resident_memory_bytes", &[])),
        cur.get("process_open_fds", &[]),
    );
    let _ = writeln!(o);
    let _ = writeln!(
        o,
        "machines online {:>7.0}   provisioned {:.0}   flapping {:.0}   mqtt sessions {:.0}",
        cur.get("vendgate_machines_online", &[]),
        cur.get("vendgate_machines_provisioned", &[]),
        cur.get("vendgate_machines_flapping", &[]),
        cur.get("vendgate_mqtt_sessions", &[]),
    );
    let dis = cur.by_label("vendgate_mqtt_disconnects_total", "reason");
    let dis: Vec<String> = dis
        .iter()
        .filter(|(_, v)| **v > 0.0)
        .map(|(k, v)| format!("{k} {v:.0}"))
        .collect();
    let _ = writeln!(
        o,
        "connections  connects/s {}   disconnects: {}",
        rate("vendgate_mqtt_connects_total", &[("class", "machine")]),
        if dis.is_empty() {
            "none".into()
        } else {
            dis.join(", ")
        }
    );
    let _ = writeln!(
        o,
        "anomalies    malformed {:.0}   acl violations {:.0}   slow consumers {:.0}",
        cur.by_label("vendgate_mqtt_malformed_total", "kind")
            .values()
            .sum::<f64>(),
        cur.get("vendgate_mqtt_acl_violations_total", &[]),
        cur.get("vendgate_mqtt_slow_consumers_total", &[]),
    );
    let _ = writeln!(o);
    let _ = writeln!(
        o,
        "{:<26} {:>9} {:>9} {:>12} {:>12}",
        "topic pattern", "in/s", "out/s", "in total", "out total"
    );
    for p in PATTERNS {
        let i = [("pattern", p), ("direction", "in")];
        let out = [("pattern", p), ("direction", "out")];
        let _ = writeln!(
            o,
            "{:<26} {:>9} {:>9} {:>12.0} {:>12.0}",
            p,
            rate("vendgate_mqtt_messages_total", &i),
            rate("vendgate_mqtt_messages_total", &out),
            cur.get("vendgate_mqtt_messages_total", &i),
            cur.get("vendgate_mqtt_messages_total", &out),
        );
    }
    let _ = writeln!(o);
    let outcomes: Vec<String> = [
        "completed",
        "partially_dispensed",
        "failed",
        "rejected",
        "expired",
        "unknown",
    ]
    .iter()
    .map(|k| {
        format!(
            "{k} {:.0}",
            cur.get("vendgate_orders_total", &[("outcome", k)])
        )
    })
    .collect();
    let _ = writeln!(o, "orders       {}", outcomes.join("   "));
    let codes: Vec<String> = cur
        .by_label("vendgate_order_requests_total", "code")
        .iter()
        .filter(|(_, v)| **v > 0.0)
        .map(|(k, v)| format!("{k}:{v:.0}"))
        .collect();
    let _ = writeln!(
        o,
        "POST /orders {}/s   answers {}   p50 {}  p99 {}   queued {:.0}",
        rate("vendgate_order_request_duration_seconds_count", &[]),
        if codes.is_empty() {
            "none".into()
        } else {
            codes.join(" ")
        },
        ms(quantile(
            cur,
            "vendgate_order_request_duration_seconds",
            0.5
        )),
        ms(quantile(
            cur,
            "vendgate_order_request_duration_seconds",
            0.99
        )),
        cur.get("vendgate_order_queue_depth", &[]),
    );
    let _ = writeln!(
        o,
        "machines     accept p50 {}  p99 {}   dispense p50 {}  p99 {}",
        ms(quantile(
            cur,
            "vendgate_machine_accept_latency_seconds",
            0.5
        )),
        ms(quantile(
            cur,
            "vendgate_machine_accept_latency_seconds",
            0.99
        )),
        ms(quantile(
            cur,
            "vendgate_machine_dispense_duration_seconds",
            0.5
        )),
        ms(quantile(
            cur,
            "vendgate_machine_dispense_duration_seconds",
            0.99
        )),
    );
    let _ =
        writeln!(
        o,
        "webhooks     backlog {:.0}   oldest {}   delivered {:.0}   failed {:.0}   gave up {:.0}",
        cur.get("vendgate_webhook_outbox_backlog", &[]),
        human_duration(cur.get("vendgate_webhook_outbox_oldest_age_seconds", &[])),
        cur.get("vendgate_webhook_deliveries_total", &[("result", "delivered")]),
        cur.get("vendgate_webhook_deliveries_total", &[("result", "failed")]),
        cur.get("vendgate_webhook_deliveries_total", &[("result", "gave_up")]),
    );
    o
}

/// Scrape once and render (no rates).
pub async fn frame(url: &str) -> anyhow::Result<String> {
    let client = reqwest::Client::new();
    let s = scrape(&client, url).await?;
    Ok(render(url, &s, None))
}

/// Redraw every `interval` until Ctrl-C; a failed scrape is shown and retried.
pub async fn run(url: &str, interval: Duration) -> anyhow::Result<()> {
    let client = reqwest::Client::new();
    let mut prev: Option<Sample> = None;
    let mut stdout = std::io::stdout();
    loop {
        let body = match scrape(&client, url).await {
            Ok(s) => {
                let f = render(url, &s, prev.as_ref());
                prev = Some(s);
                f
            }
            Err(e) => format!("vendgate top  {url}\n\n{e:#}\n(retrying)\n"),
        };
        // Home + clear screen, then the frame; Ctrl-C to quit.
        let _ = write!(
            stdout,
            "\x1b[H\x1b[2J{body}\n(refresh {interval:?}; Ctrl-C quits)\n"
        );
        let _ = stdout.flush();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => return Ok(()),
            _ = tokio::time::sleep(interval) => {}
        }
    }
}

/// The `/metrics` URL of the gateway these settings describe: the admin
/// listener when configured, else the HTTP listener; an unspecified bind
/// address (0.0.0.0 / ::) is reached on loopback.
pub fn default_url(settings: &crate::config::Settings) -> String {
    let mut addr = settings.metrics.addr.unwrap_or(settings.http.addr);
    if addr.ip().is_unspecified() {
        addr.set_ip(if addr.is_ipv4() {
            std::net::Ipv4Addr::LOCALHOST.into()
        } else {
            std::net::Ipv6Addr::LOCALHOST.into()
        });
    }
    format!("http://{addr}/metrics")
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"# TYPE vendgate_machines_online gauge
vendgate_machines_online 3
vendgate_mqtt_messages_total{pattern="vend/v1/+/ack",direction="in"} 10
vendgate_mqtt_disconnects_total{class="machine",reason="clean"} 2
vendgate_mqtt_disconnects_total{class="service",reason="clean"} 1
vendgate_build_info{version="9.9.9"} 1
h_bucket{le="0.1"} 1
h_bucket{le="1"} 9
h_bucket{le="+Inf"} 10
garbage line
"#;

    #[test]
    fn parses_and_renders() {
        let s = Sample::parse(TEXT);
        assert_eq!(s.get("vendgate_machines_online", &[]), 3.0);
        assert_eq!(
            s.get(
                "vendgate_mqtt_messages_total",
                &[("direction", "in"), ("pattern", "vend/v1/+/ack")]
            ),
            10.0
        );
        assert_eq!(
            s.by_label("vendgate_mqtt_disconnects_total", "reason")["clean"],
            3.0
        );
        assert_eq!(quantile(&s, "h", 0.5), Some(1.0));
        assert_eq!(quantile(&s, "h", 0.05), Some(0.1));
        assert_eq!(quantile(&s, "h", 1.0), Some(f64::INFINITY));
        let f = render("http://x/metrics", &s, None);
        assert!(f.contains("version 9.9.9"), "{f}");
        assert!(f.contains("machines online       3"), "{f}");
        assert!(f.contains("clean 3"), "{f}");
    }

    #[test]
    fn default_url_reaches_loopback() {
        let mut s = crate::config::Settings::default();
        assert_eq!(default_url(&s), "http://127.0.0.1:8080/metrics");
        s.metrics.addr = Some("[::]:9100".parse().unwrap());
        assert_eq!(default_url(&s), "http://[::1]:9100/metrics");
    }
}
