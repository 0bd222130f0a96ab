//! Scenario files: TOML that assigns a [`Behaviour`] (and optionally a
//! connection flapping schedule, starting stock and go timeout) to each
//! machine of a fleet, by machine number ranges or by deterministic, seeded
//! shares.
//!
//! ```toml
//! seed = 42                          # makes `share` assignment repeatable
//! default = { kind = "normal" }      # optional; `normal` when left out
//!
//! [[rule]]                           # first matching rule wins
//! machines = "10000000-10000099"     # or ["10000001", "10000005-10000009"]
//! behaviour = { kind = "refuse", reason = "door_open" }
//!
//! [[rule]]
//! share = 0.1                        # 10 % of the machines
//! behaviour = { kind = "slow-ack", ms = 2000 }
//! flap = { period_ms = 5000 }        # drop the connection every 5 s
//! stock = [{ product_id = 1, stock = 2, price = 350 }]  # starting stock
//! go_timeout_ms = 500                # hold an acked order this long for `go`
//!
//! # optional, top level: every machine drops at once and returns at once
//! storm = { after_ms = 1000, down_ms = 2000, period_ms = 30000 }
//! # optional, top level: starting stock of machines whose rule sets none
//! stock = [{ product_id = 1, stock = 10, price = 350 }]
//! # optional, top level: go timeout of machines whose rule sets none
//! # (default: the fleet's, 10 s unless `--go-timeout` says otherwise)
//! go_timeout_ms = 10000
//! ```
//!
//! Top-level keys (`seed`, `default`, `storm`, `stock`, `go_timeout_ms`)
//! must come before the first `[[rule]]` (TOML puts later keys inside that
//! rule).
//!
//! # Shares
//!
//! Each machine draws one number `u` in `[0, 1)` from a generator seeded by
//! `seed` and its machine number, so the draw does not depend on which other
//! machines run or in what order. The `share` rules split `[0, 1)` into
//! consecutive intervals in file order (0.1 then 0.2 match `u < 0.1` and
//! `0.1 ≤ u < 0.3`), so shares never overlap and must add up to at most 1.
//! A machine matched by an earlier `machines` rule keeps that rule.

use std::fmt;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use vendgate_proto::machine::MachineNo;

use vendgate_proto::msg::InventoryItem;

use crate::behaviour::Behaviour;
use crate::sim::SimHandle;

/// A scenario file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Toml(#[from] toml::de::Error),
    #[error("rule {rule}: {message}")]
    Rule { rule: usize, message: String },
    /// A top-level key (`storm`, `stock`) that cannot be used.
    #[error("{0}")]
    Invalid(String),
}

/// A parsed, validated scenario.
#[derive(Debug, Clone, PartialEq)]
pub struct Scenario {
    pub seed: u64,
    pub default: Behaviour,
    pub rules: Vec<Rule>,
    /// A reconnect storm for every machine of the fleet.
    pub storm: Option<Storm>,
    /// Starting stock of machines whose rule sets none (`None`: the fleet's
    /// own, e.g. `--products`).
    pub stock: Option<Vec<InventoryItem>>,
    /// Go timeout of machines whose rule sets none (`None`: the fleet's
    /// own, e.g. `--go-timeout`).
    pub go_timeout: Option<Duration>,
}

/// A reconnect storm: every machine's socket is cut at once (no DISCONNECT,
/// so every will fires, like a power or network outage), and after `down`
/// every machine reconnects at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Storm {
    /// From the start of the schedules to the first drop.
    pub after: Duration,
    /// How long every machine stays away.
    pub down: Duration,
    /// From one return to the next drop; `None`: one storm only.
    pub period: Option<Duration>,
}

/// One `[[rule]]`: who it selects and what they do.
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    pub selector: Selector,
    pub behaviour: Behaviour,
    /// Drop the connection (no DISCONNECT, so the will fires) every period;
    /// the machine reconnects by itself after its backoff.
    pub flap: Option<Duration>,
    /// Starting stock of the machines of this rule.
    pub stock: Option<Vec<InventoryItem>>,
    /// Go timeout of the machines of this rule.
    pub go_timeout: Option<Duration>,
}

/// Which machines a rule selects.
#[derive(Debug, Clone, PartialEq)]
pub enum Selector {
    /// Inclusive ranges of machine numbers (a single machine is `n..=n`).
    Machines(Vec<(u32, u32)>),
    /// The draws in `[from, to)`: a share of `to - from` of all machines.
    Share { from: f64, to: f64 },
}

/// What a scenario assigns one machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assignment {
    pub behaviour: Behaviour,
    pub flap: Option<Duration>,
    /// Starting stock (`None`: the fleet's own).
    pub stock: Option<Vec<InventoryItem>>,
    /// How long the machine holds an acked order waiting for `go` (`None`:
    /// the fleet's own).
    pub go_timeout: Option<Duration>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawScenario {
    #[serde(default)]
    seed: u64,
    #[serde(default)]
    default: Behaviour,
    #[serde(default, rename = "rule")]
    rules: Vec<RawRule>,
    storm: Option<RawStorm>,
    stock: Option<Vec<InventoryItem>>,
    go_timeout_ms: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStorm {
    after_ms: u64,
    down_ms: u64,
    period_ms: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    machines: Option<OneOrMany>,
    share: Option<f64>,
    behaviour: Behaviour,
    flap: Option<RawFlap>,
    stock: Option<Vec<InventoryItem>>,
    go_timeout_ms: Option<u64>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFlap {
    period_ms: u64,
}

impl Scenario {
    /// Reads and parses a scenario file.
    pub fn load(path: impl AsRef<Path>) -> Result<Self, ScenarioError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| ScenarioError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text)
    }

    /// Parses and validates scenario TOML.
    pub fn parse(text: &str) -> Result<Self, ScenarioError> {
        let raw: RawScenario = toml::from_str(text)?;
        let mut rules = Vec::with_capacity(raw.rules.len());
        let mut shared = 0.0_f64;
        for (i, r) in raw.rules.into_iter().enumerate() {
            let rule = i + 1;
            let err = |message: String| ScenarioError::Rule { rule, message };
            let selector = match (r.machines, r.share) {
                (Some(m), None) => {
                    let items = match m {
                        OneOrMany::One(s) => vec![s],
                        OneOrMany::Many(v) => v,
                    };
                    if items.is_empty() {
                        return Err(err("`machines` is empty".into()));
                    }
                    let ranges = items
                        .iter()
                        .map(|s| parse_range(s))
                        .collect::<Result<Vec<_>, _>>()
                        .map_err(err)?;
                    Selector::Machines(ranges)
                }
                (None, Some(share)) => {
                    if !(0.0..=1.0).contains(&share) {
                        return Err(err(format!("share {share} is not between 0 and 1")));
                    }
                    let from = shared;
                    shared += share;
                    if shared > 1.0 + 1e-9 {
                        return Err(err(format!("shares add up to {shared}, more than 1")));
                    }
                    Selector::Share { from, to: shared }
                }
                _ => return Err(err("give exactly one of `machines` or `share`".into())),
            };
            let flap = match r.flap {
                Some(RawFlap { period_ms: 0 }) => {
                    return Err(err("flap period_ms must be above 0".into()))
                }
                Some(f) => Some(Duration::from_millis(f.period_ms)),
                None => None,
            };
            if let Some(stock) = &r.stock {
                check_stock(stock).map_err(err)?;
            }
            let go_timeout = go_timeout(r.go_timeout_ms).map_err(err)?;
            rules.push(Rule {
                selector,
                behaviour: r.behaviour,
                flap,
                stock: r.stock,
                go_timeout,
            });
        }
        if let Some(stock) = &raw.stock {
            check_stock(stock).map_err(ScenarioError::Invalid)?;
        }
        let go_timeout = go_timeout(raw.go_timeout_ms).map_err(ScenarioError::Invalid)?;
        let storm = match raw.storm {
            None => None,
            Some(RawStorm {
                period_ms: Some(0), ..
            }) => {
                return Err(ScenarioError::Invalid(
                    "storm period_ms must be above 0".into(),
                ))
            }
            Some(st) => Some(Storm {
                after: Duration::from_millis(st.after_ms),
                down: Duration::from_millis(st.down_ms),
                period: st.period_ms.map(Duration::from_millis),
            }),
        };
        Ok(Scenario {
            seed: raw.seed,
            default: raw.default,
            rules,
            storm,
            stock: raw.stock,
            go_timeout,
        })
    }

    /// The behaviour and schedule of one machine: the first matching rule,
    /// else the default. Pure: the same scenario always answers the same.
    pub fn assignment_for(&self, machine_no: MachineNo) -> Assignment {
        let n = machine_no.to_u32();
        let draw = unit_draw(self.seed, n);
        self.rules
            .iter()
            .find(|r| match &r.selector {
                Selector::Machines(ranges) => ranges.iter().any(|&(a, b)| (a..=b).contains(&n)),
                Selector::Share { from, to } => *from <= draw && draw < *to,
            })
            .map(|r| Assignment {
                behaviour: r.behaviour.clone(),
                flap: r.flap,
                stock: r.stock.clone().or_else(|| self.stock.clone()),
                go_timeout: r.go_timeout.or(self.go_timeout),
            })
            .unwrap_or_else(|| Assignment {
                behaviour: self.default.clone(),
                flap: None,
                stock: self.stock.clone(),
                go_timeout: self.go_timeout,
            })
    }

    /// The behaviour of one machine (see [`assignment_for`](Self::assignment_for)).
    pub fn behaviour_for(&self, machine_no: MachineNo) -> Behaviour {
        self.assignment_for(machine_no).behaviour
    }

    /// Starts the schedules of these machines until `cancel`: each machine
    /// with a `flap` period has its connection dropped every period, and the
    /// `storm`, if any, takes all of them down and back at once.
    /// Behaviours and stock are not touched here; give them at spawn time.
    pub fn start_schedules(
        &self,
        handles: &[SimHandle],
        cancel: &CancellationToken,
    ) -> Vec<JoinHandle<()>> {
        let storm = self.storm.map(|storm| {
            let (all, cancel) = (handles.to_vec(), cancel.clone());
            tokio::spawn(async move {
                tokio::select! {
                    () = cancel.cancelled() => {}
                    () = run_storm(storm, &all) => {}
                }
            })
        });
        handles
            .iter()
            .filter_map(|h| {
                let period = self.assignment_for(h.machine_no()).flap?;
                let (h, cancel) = (h.clone(), cancel.clone());
                Some(tokio::spawn(async move {
                    let mut tick = tokio::time::interval(period);
                    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    tick.tick().await;
                    loop {
                        tokio::select! {
                            () = cancel.cancelled() => return,
                            _ = tick.tick() => h.drop_connection(),
                        }
                    }
                }))
            })
            .chain(storm)
            .collect()
    }
}

/// Takes every machine down (power cut: no DISCONNECT) and back, at once,
/// once or every `period`. Cancelled by dropping the future.
async fn run_storm(storm: Storm, all: &[SimHandle]) {
    tokio::time::sleep(storm.after).await;
    loop {
        // `kill` only aborts the machine's connection task: a few
        // microseconds each, so thousands drop within one scheduler pass.
        for h in all {
            h.kill().await;
        }
        tracing::info!(machines = all.len(), "storm: every machine dropped");
        tokio::time::sleep(storm.down).await;
        for h in all {
            h.revive();
        }
        tracing::info!(machines = all.len(), "storm: every machine reconnecting");
        match storm.period {
            Some(p) => tokio::time::sleep(p).await,
            None => return,
        }
    }
}

/// A `go_timeout_ms`, which must be above 0 when given.
fn go_timeout(ms: Option<u64>) -> Result<Option<Duration>, String> {
    match ms {
        Some(0) => Err("go_timeout_ms must be above 0".into()),
        ms => Ok(ms.map(Duration::from_millis)),
    }
}

/// Stock lines must name distinct positive products with a price.
fn check_stock(stock: &[InventoryItem]) -> Result<(), String> {
    for (i, item) in stock.iter().enumerate() {
        if item.product_id <= 0 || item.price < 0 {
            return Err(format!(
                "stock: product_id must be above 0 and price not negative ({item:?})"
            ));
        }
        if stock
            .iter()
            .take(i)
            .any(|o| o.product_id == item.product_id)
        {
            return Err(format!("stock: product {} listed twice", item.product_id));
        }
    }
    Ok(())
}

impl fmt::Display for Scenario {
    /// A one-line summary for logs: seed, rule count, default.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "seed={} rules={} default={}",
            self.seed,
            self.rules.len(),
            self.default
        )
    }
}

/// `"10000000"` or `"10000000-10000099"` (inclusive).
fn parse_range(s: &str) -> Result<(u32, u32), String> {
    let one = |t: &str| {
        t.trim()
            .parse::<MachineNo>()
            .map(|m| m.to_u32())
            .map_err(|_| format!("{t:?} is not an 8-digit machine number"))
    };
    let (a, b) = match s.split_once('-') {
        Some((a, b)) => (one(a)?, one(b)?),
        None => {
            let n = one(s)?;
            (n, n)
        }
    };
    if a > b {
        return Err(format!("range {s:?} runs backwards"));
    }
    Ok((a, b))
}

/// A uniform number in `[0, 1)` from SplitMix64 seeded by `seed` and the
/// machine number: deterministic per machine, independent of the others.
fn unit_draw(seed: u64, machine: u32) -> f64 {
    let mut z = seed ^ u64::from(machine).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    for _ in 0..2 {
        z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut x = z;
        x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z = x ^ (x >> 31);
    }
    // The top 53 bits fill an f64 mantissa exactly.
    (z >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(n: u32) -> MachineNo {
        format!("{n:08}").parse().unwrap()
    }

    #[test]
    fn ranges_lists_and_first_match() {
        let s = Scenario::parse(
            r#"
            [[rule]]
            machines = "10000000-10000009"
            behaviour = { kind = "refuse", reason = "door_open" }
            [[rule]]
            machines = ["10000005", "10000020-10000021"]
            behaviour = { kind = "never-ack" }
            "#,
        )
        .unwrap();
        let refuse = Behaviour::Refuse {
            reason: "door_open".into(),
        };
        assert_eq!(s.behaviour_for(m(10_000_000)), refuse);
        assert_eq!(s.behaviour_for(m(10_000_005)), refuse, "first rule wins");
        assert_eq!(s.behaviour_for(m(10_000_009)), refuse);
        assert_eq!(s.behaviour_for(m(10_000_010)), Behaviour::Normal);
        assert_eq!(s.behaviour_for(m(10_000_021)), Behaviour::NeverAck);
        assert_eq!(s.behaviour_for(m(10_000_022)), Behaviour::Normal);
    }

    #[test]
    fn default_and_flap() {
        let s = Scenario::parse(
            r#"
            default = { kind = "fail", error = "motor_jam" }
            [[rule]]
            machines = "10000001"
            behaviour = { kind = "normal" }
            flap = { period_ms = 250 }
            "#,
        )
        .unwrap();
        let a = s.assignment_for(m(10_000_001));
        assert_eq!(a.behaviour, Behaviour::Normal);
        assert_eq!(a.flap, Some(Duration::from_millis(250)));
        let b = s.assignment_for(m(10_000_002));
        assert_eq!(
            b.behaviour,
            Behaviour::Fail {
                error: "motor_jam".into()
            }
        );
        assert_eq!(b.flap, None);
    }

    #[test]
    fn shares_are_deterministic_and_close_to_their_size() {
        let text = r#"
            seed = 7
            [[rule]]
            share = 0.1
            behaviour = { kind = "never-ack" }
            [[rule]]
            share = 0.3
            behaviour = { kind = "ack-then-silent" }
        "#;
        let s = Scenario::parse(text).unwrap();
        let again = Scenario::parse(text).unwrap();
        let (mut never, mut silent) = (0, 0);
        for n in 10_000_000..10_010_000 {
            let b = s.behaviour_for(m(n));
            assert_eq!(b, again.behaviour_for(m(n)));
            match b {
                Behaviour::NeverAck => never += 1,
                Behaviour::AckThenSilent => silent += 1,
                _ => {}
            }
        }
        assert!((800..1200).contains(&never), "{never}");
        assert!((2700..3300).contains(&silent), "{silent}");
        // Another seed picks other machines.
        let other = Scenario::parse(&text.replace("seed = 7", "seed = 8")).unwrap();
        let differ = (10_000_000..10_000_200)
            .filter(|&n| other.behaviour_for(m(n)) != s.behaviour_for(m(n)))
            .count();
        assert!(differ > 0);
    }

    #[test]
    fn rejects_bad_files() {
        let bad = [
            "[[rule]]\nbehaviour = { kind = \"normal\" }",
            "[[rule]]\nshare = 0.5\nmachines = \"10000000\"\nbehaviour = { kind = \"normal\" }",
            "[[rule]]\nshare = 1.5\nbehaviour = { kind = \"normal\" }",
            "[[rule]]\nshare = 0.6\nbehaviour = { kind = \"normal\" }\n\
             [[rule]]\nshare = 0.6\nbehaviour = { kind = \"normal\" }",
            "[[rule]]\nmachines = \"123\"\nbehaviour = { kind = \"normal\" }",
            "[[rule]]\nmachines = \"10000009-10000001\"\nbehaviour = { kind = \"normal\" }",
            "[[rule]]\nmachines = \"10000000\"\nbehaviour = { kind = \"sleepy\" }",
            "[[rule]]\nmachines = \"10000000\"\nbehaviour = { kind = \"normal\" }\n\
             flap = { period_ms = 0 }",
            "sede = 1",
        ];
        for text in bad {
            assert!(Scenario::parse(text).is_err(), "accepted: {text}");
        }
        assert!(Scenario::parse("").unwrap().rules.is_empty());
    }

    #[test]
    fn storm_and_stock() {
        let s = Scenario::parse(
            r#"
            storm = { after_ms = 100, down_ms = 200 }
            stock = [{ product_id = 1, stock = 3, price = 350 }]
            [[rule]]
            machines = "10000001"
            behaviour = { kind = "normal" }
            stock = [{ product_id = 2, stock = 1, price = 200 }]
            [[rule]]
            machines = "10000002"
            behaviour = { kind = "half-open", ms = 5000 }
            "#,
        )
        .unwrap();
        assert_eq!(
            s.storm,
            Some(Storm {
                after: Duration::from_millis(100),
                down: Duration::from_millis(200),
                period: None
            })
        );
        let stock = |n| s.assignment_for(m(n)).stock.unwrap()[0].product_id;
        assert_eq!(stock(10_000_001), 2, "the rule's own stock");
        assert_eq!(stock(10_000_002), 1, "the top-level stock");
        assert_eq!(stock(10_000_003), 1, "the default gets it too");
        assert_eq!(
            s.behaviour_for(m(10_000_002)),
            Behaviour::HalfOpen { ms: 5000 }
        );
        assert_eq!(s.go_timeout, None);
        assert_eq!(s.assignment_for(m(10_000_001)).go_timeout, None);
        for bad in [
            "storm = { after_ms = 1, down_ms = 1, period_ms = 0 }",
            "storm = { after_ms = 1 }",
            "stock = [{ product_id = 0, stock = 1, price = 1 }]",
            "stock = [{ product_id = 1, stock = -1, price = 1 }]",
            "stock = [{ product_id = 1, stock = 1, price = 1 }, { product_id = 1, stock = 2, price = 1 }]",
            "go_timeout_ms = 0",
            "[[rule]]\nmachines = \"10000000\"\nbehaviour = { kind = \"normal\" }\ngo_timeout_ms = 0",
        ] {
            assert!(Scenario::parse(bad).is_err(), "accepted: {bad}");
        }
    }

    #[test]
    fn go_timeout_per_rule_and_top_level() {
        let s = Scenario::parse(
            r#"
            go_timeout_ms = 3000
            [[rule]]
            machines = "10000001"
            behaviour = { kind = "ignore-go" }
            go_timeout_ms = 250
            [[rule]]
            machines = "10000002"
            behaviour = { kind = "reboot-before-go" }
            "#,
        )
        .unwrap();
        let a = s.assignment_for(m(10_000_001));
        assert_eq!(a.behaviour, Behaviour::IgnoreGo);
        assert_eq!(a.go_timeout, Some(Duration::from_millis(250)));
        let b = s.assignment_for(m(10_000_002));
        assert_eq!(b.behaviour, Behaviour::RebootBeforeGo);
        assert_eq!(b.go_timeout, Some(Duration::from_secs(3)), "top level");
        assert_eq!(
            s.assignment_for(m(10_000_003)).go_timeout,
            Some(Duration::from_secs(3)),
            "the default gets it too"
        );
    }

    #[test]
    fn every_shipped_scenario_parses() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios");
        let mut count = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                let s = Scenario::load(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                assert!(!s.rules.is_empty(), "{}: no rules", path.display());
                count += 1;
            }
        }
        assert!(count >= 14, "only {count} scenario files");
    }
}
