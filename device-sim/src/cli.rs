//! The `vendgate-sim` command line: one subcommand per way of running
//! machines or load (`run`, `fleet`, `rr`, `load`). Argument parsing and
//! printing live here; the work is in the library modules.

use std::io::IsTerminal as _;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use tracing_subscriber::EnvFilter;
use vendgate_proto::machine::MachineNo;
use vendgate_proto::msg::InventoryItem;

use crate::behaviour::Behaviour;
use crate::fleet::{Fleet, FleetOptions, DEFAULT_CONNECT_RATE};
use crate::load::{LoadOptions, LoadStop, ProductLine};
use crate::rr::RrOptions;
use crate::scenario::Scenario;
use crate::sim::{SimConfig, SimMachine};
use crate::{load, process, rr, secrets_file};

/// Stock of a machine started without `--products`.
const DEFAULT_PRODUCTS: &str = "1:20:350,2:20:200,3:20:500";
/// `--go-timeout` when not given: [`crate::state::DEFAULT_GO_TIMEOUT`].
const DEFAULT_GO_TIMEOUT: &str = "10s";

/// Simulated vending machines for vendgate.
#[derive(Debug, Parser)]
#[command(name = "vendgate-sim", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Commands,
}

#[derive(Debug, Subcommand)]
pub enum Commands {
    /// Run one machine until Ctrl-C, logging every command and answer.
    Run(RunArgs),
    /// Run many machines from a secrets file in one process until Ctrl-C.
    Fleet(FleetArgs),
    /// Measure bare MQTT request/response round trips through a broker.
    Rr(RrArgs),
    /// Place orders through the HTTP open API and report latency and codes.
    Load(LoadArgs),
}

impl Commands {
    /// The log filter used when `RUST_LOG` is not set: a fleet of thousands
    /// would otherwise log every connect and answer.
    pub fn default_log_filter(&self) -> &'static str {
        match self {
            Commands::Run(_) => "info",
            Commands::Fleet(_) | Commands::Rr(_) | Commands::Load(_) => "warn",
        }
    }
}

/// Options of `vendgate-sim run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// The gateway's MQTT listener, HOST:PORT.
    #[arg(long, env = "VENDGATE_SIM_GATEWAY", default_value = "127.0.0.1:1883")]
    pub gateway: String,
    /// The machine's 8-digit number.
    #[arg(long)]
    pub machine_no: MachineNo,
    /// The machine's secret (prefer the environment variable: arguments are
    /// visible to other users in the process list).
    #[arg(long, env = "VENDGATE_SIM_SECRET", hide_env_values = true)]
    pub secret: String,
    /// normal, refuse[:REASON], fail[:ERROR], partial[:ERROR], never-ack,
    /// ack-then-silent, slow-ack[:MS], drop-connection,
    /// result-after-reconnect, duplicate, malformed, half-open[:MS],
    /// ignore-go or reboot-before-go (see the scenario files in
    /// `device-sim/scenarios/` for what each does).
    #[arg(long, default_value = "normal")]
    pub behaviour: Behaviour,
    /// How long an acked order is held waiting for `cmd/go` (or
    /// `cmd/cancel`) before the machine drops it with a `no_go` result,
    /// e.g. 10s, 500ms.
    #[arg(long, default_value = DEFAULT_GO_TIMEOUT, value_parser = parse_go_timeout)]
    pub go_timeout: Duration,
    /// The CONNECT's clean session flag (`--clean-session false` asks for a
    /// persistent session, which PROTOCOL.md's machines do not).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub clean_session: bool,
    /// MQTT keep alive in seconds (the protocol allows 5–60).
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=65535))]
    pub keep_alive: u64,
    /// Initial stock as PRODUCT_ID:STOCK:PRICE_FEN, comma separated.
    #[arg(long, default_value = DEFAULT_PRODUCTS, value_parser = parse_products)]
    pub products: Products,
    /// Firmware version reported in the state message.
    #[arg(long, default_value = concat!("vendgate-sim/", env!("CARGO_PKG_VERSION")))]
    pub firmware: String,
}

/// Options of `vendgate-sim fleet`.
#[derive(Debug, Args)]
pub struct FleetArgs {
    /// The gateway's MQTT listener, HOST:PORT.
    #[arg(long, env = "VENDGATE_SIM_GATEWAY", default_value = "127.0.0.1:1883")]
    pub gateway: String,
    /// `machine_no,secret` lines, as `vendgate machine add --count N
    /// --first M --secrets-out FILE` writes them.
    #[arg(long)]
    pub secrets: PathBuf,
    /// Run at most this many machines (default: all selected).
    #[arg(long)]
    pub machines: Option<usize>,
    /// Skip machines numbered below this.
    #[arg(long, default_value_t = 10_000_000, value_parser = clap::value_parser!(u32).range(0..=99_999_999))]
    pub first: u32,
    /// Machines started per second (0: all at once).
    #[arg(long, default_value_t = DEFAULT_CONNECT_RATE)]
    pub connect_rate: u32,
    /// MQTT keep alive in seconds.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=65535))]
    pub keep_alive: u64,
    /// How every machine answers orders (see `run --help`).
    #[arg(long, default_value = "normal", conflicts_with = "scenario")]
    pub behaviour: Behaviour,
    /// How long every machine holds an acked order waiting for `cmd/go`
    /// (see `run --help`); a scenario's `go_timeout_ms` overrides it.
    #[arg(long, default_value = DEFAULT_GO_TIMEOUT, value_parser = parse_go_timeout)]
    pub go_timeout: Duration,
    /// The CONNECT's clean session flag of every machine.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub clean_session: bool,
    /// A scenario file (TOML, see `device-sim/scenarios/`) assigning
    /// behaviours, flapping schedules and starting stock per machine, and
    /// optionally a reconnect storm of the whole fleet, instead of one
    /// `--behaviour` for all.
    #[arg(long)]
    pub scenario: Option<PathBuf>,
    /// Initial stock of every machine, PRODUCT_ID:STOCK:PRICE_FEN, comma
    /// separated.
    #[arg(long, default_value = DEFAULT_PRODUCTS, value_parser = parse_products)]
    pub products: Products,
}

/// Options of `vendgate-sim rr`.
#[derive(Debug, Args)]
pub struct RrArgs {
    /// Any MQTT 3.1.1 broker, HOST:PORT.
    #[arg(long, default_value = "127.0.0.1:1883")]
    pub broker: String,
    #[arg(long)]
    pub username: Option<String>,
    /// Prefer the environment variable: arguments are visible to other
    /// users in the process list.
    #[arg(long, env = "VENDGATE_SIM_RR_PASSWORD", hide_env_values = true)]
    pub password: Option<String>,
    /// Requests outstanding at any time.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=65535))]
    pub concurrency: u64,
    /// Requester connections; the concurrency is split over them (so it
    /// must be at least this).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=1024))]
    pub requesters: u64,
    /// Responder connections: 1 (subscribed to every request topic) or as
    /// many as requesters (each subscribed to its own requester's topic).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=1024))]
    pub responders: u64,
    /// Requests in all.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub count: u64,
    /// Payload bytes per request.
    #[arg(long, default_value_t = 64)]
    pub payload: usize,
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(0..=2))]
    pub qos: u8,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Options of `vendgate-sim load`.
#[derive(Debug, Args)]
pub struct LoadArgs {
    /// The gateway's HTTP address, e.g. http://127.0.0.1:8080.
    #[arg(long, env = "VENDGATE_SIM_API")]
    pub api: String,
    #[arg(long, env = "VENDGATE_SIM_APPID")]
    pub appid: String,
    /// Prefer the environment variable: arguments are visible to other
    /// users in the process list.
    #[arg(long, env = "VENDGATE_SIM_APPSECRET", hide_env_values = true)]
    pub appsecret: String,
    /// A `machine_no,secret` file, or machine numbers separated by commas.
    #[arg(long)]
    pub machines: String,
    /// Workers, each with one order outstanding.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    pub concurrency: u64,
    /// Place orders for this long (e.g. 30s, 2m).
    #[arg(long, value_parser = humantime::parse_duration, required_unless_present = "count", conflicts_with = "count")]
    pub duration: Option<Duration>,
    /// Place this many orders.
    #[arg(long)]
    pub count: Option<u64>,
    /// The products of every order, PRODUCT_ID:QUANTITY, comma separated.
    #[arg(long, default_value = "1:1", value_parser = load::parse_product_lines)]
    pub products: ProductLines,
    /// Also poll each accepted order until it finishes dispensing and
    /// report time-to-completion.
    #[arg(long)]
    pub completion: bool,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// A parsed `--products` list of `load`.
pub type ProductLines = Vec<ProductLine>;

/// A parsed `--products` list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Products(pub Vec<InventoryItem>);

/// Parses `1:10:350,2:5:200` into inventory items.
pub fn parse_products(s: &str) -> Result<Products, String> {
    s.split(',')
        .filter(|part| !part.trim().is_empty())
        .map(|part| {
            let fields: Vec<&str> = part.trim().split(':').collect();
            let [id, stock, price] = fields[..] else {
                return Err(format!("{part:?} is not PRODUCT_ID:STOCK:PRICE"));
            };
            let num_err = |what: &str| format!("{part:?}: {what} is not a valid number");
            Ok(InventoryItem {
                product_id: id.parse().map_err(|_| num_err("product id"))?,
                stock: stock.parse().map_err(|_| num_err("stock"))?,
                price: price.parse().map_err(|_| num_err("price"))?,
            })
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Products)
}

/// Parses a go timeout (`10s`, `500ms`); it must be above 0.
pub fn parse_go_timeout(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| e.to_string())?;
    if d.is_zero() {
        return Err("the go timeout must be above 0".into());
    }
    Ok(d)
}

/// Logs to stderr, filtered by `RUST_LOG` (default `default_filter`, see
/// [`Commands::default_log_filter`]).
pub fn init_tracing(default_filter: &str) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    // Colours only on a terminal, so redirected logs stay greppable.
    let ansi = std::io::stderr().is_terminal();
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .init();
}

/// Runs the parsed command line to completion.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Commands::Run(args) => run_one(args).await,
        Commands::Fleet(args) => run_fleet(args).await,
        Commands::Rr(args) => run_rr(args).await,
        Commands::Load(args) => run_load(args).await,
    }
}

async fn run_one(args: RunArgs) -> anyhow::Result<()> {
    let config = SimConfig {
        gateway: args.gateway,
        machine_no: args.machine_no,
        secret: args.secret,
        keep_alive: Duration::from_secs(args.keep_alive),
        firmware: args.firmware,
        inventory: args.products.0,
        behaviour: args.behaviour,
        go_timeout: args.go_timeout,
        clean_session: args.clean_session,
    };
    info!(?config, "starting machine");
    let machine = SimMachine::spawn(config);
    wait_for_stop().await.context("waiting for Ctrl-C")?;
    info!("stopping: sending DISCONNECT");
    machine.shutdown().await;
    Ok(())
}

async fn run_fleet(args: FleetArgs) -> anyhow::Result<()> {
    let machines: Vec<(MachineNo, String)> = secrets_file::read(&args.secrets)?
        .into_iter()
        .filter(|(m, _)| m.to_u32() >= args.first)
        .take(args.machines.unwrap_or(usize::MAX))
        .collect();
    let n = machines.len();
    if n == 0 {
        anyhow::bail!(
            "{}: no machine numbered {} or above",
            args.secrets.display(),
            args.first
        );
    }
    if let Some(wanted) = args.machines.filter(|&w| w > n) {
        warn!(wanted, found = n, "fewer machines in the secrets file");
    }
    // One socket per machine, plus a few for the runtime itself.
    if let Some(limit) = process::open_files_limit().filter(|&l| l < n as u64 + 64) {
        warn!(
            limit,
            machines = n,
            "open files limit too low for the fleet; raise it with `ulimit -n`"
        );
    }
    let options = FleetOptions {
        connect_rate: args.connect_rate,
        keep_alive: Duration::from_secs(args.keep_alive),
        behaviour: args.behaviour,
        inventory: args.products.0,
        go_timeout: args.go_timeout,
        clean_session: args.clean_session,
        ..FleetOptions::default()
    };
    let scenario = args
        .scenario
        .as_deref()
        .map(Scenario::load)
        .transpose()
        .context("loading the scenario")?;
    let rss_before = process::resident_bytes();
    let schedules = CancellationToken::new();
    let fleet = match &scenario {
        Some(s) => {
            info!(scenario = %s, "applying scenario");
            let fleet = Fleet::spawn_scenario(args.gateway, machines, options, s);
            s.start_schedules(fleet.handles(), &schedules);
            fleet
        }
        None => Fleet::spawn(args.gateway, machines, options),
    };
    // Stops the flapping schedules when the fleet stops, early return or not.
    let _schedules = schedules.drop_guard();
    {
        let stop = wait_for_stop();
        tokio::pin!(stop);
        let all = fleet.wait_all_connected(Duration::MAX);
        tokio::pin!(all);
        let mut all_connected = false;
        let mut last = None;
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tokio::select! {
                r = &mut stop => {
                    r.context("waiting for Ctrl-C")?;
                    break;
                }
                r = &mut all, if !all_connected => {
                    all_connected = true;
                    // Without a deadline the wait only ends with success.
                    if let Ok(took) = r {
                        println!("all {n} connected in {:.2}s", took.as_secs_f64());
                        report_rss(rss_before, n);
                    }
                }
                _ = tick.tick() => {
                    // Every second while connecting; afterwards only when
                    // something changed (a drop, a reconnect).
                    let p = fleet.progress();
                    let counts = (p.started, p.connected, p.failed);
                    if !all_connected || last != Some(counts) {
                        eprintln!("{p}");
                    }
                    last = Some(counts);
                }
            }
        }
    }
    eprintln!("stopping: disconnecting {n} machines");
    fleet.shutdown().await;
    Ok(())
}

/// Prints the fleet's memory cost per machine to stderr.
fn report_rss(before: Option<u64>, machines: usize) {
    let (Some(before), Some(after)) = (before, process::resident_bytes()) else {
        return;
    };
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    let per_machine = after.saturating_sub(before) as f64 / machines as f64 / 1024.0;
    eprintln!(
        "rss before={:.1}MiB after={:.1}MiB per machine={per_machine:.1}KiB",
        mib(before),
        mib(after)
    );
}

async fn run_rr(args: RrArgs) -> anyhow::Result<()> {
    let opts = RrOptions {
        username: args.username,
        password: args.password,
        // Bounded to 65,535 by the parser.
        concurrency: usize::try_from(args.concurrency).unwrap_or(usize::MAX),
        // Bounded to 1,024 by the parser.
        requesters: usize::try_from(args.requesters).unwrap_or(usize::MAX),
        responders: usize::try_from(args.responders).unwrap_or(usize::MAX),
        count: args.count,
        payload: args.payload,
        qos: args.qos,
        ..RrOptions::new(args.broker)
    };
    let report = rr::rr(opts).await?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!("{report}");
    }
    Ok(())
}

async fn run_load(args: LoadArgs) -> anyhow::Result<()> {
    let machines = load::parse_machines(&args.machines)?;
    let stop = match (args.duration, args.count) {
        (Some(d), _) => LoadStop::Duration(d),
        (None, Some(n)) => LoadStop::Count(n),
        // clap requires one of the two.
        (None, None) => anyhow::bail!("give --duration or --count"),
    };
    let cancel = CancellationToken::new();
    let on_stop = cancel.clone();
    tokio::spawn(async move {
        if wait_for_stop().await.is_ok() {
            eprintln!("stopping: waiting for outstanding answers");
            on_stop.cancel();
        }
    });
    let opts = LoadOptions {
        // Bounded to 100,000 by the parser.
        concurrency: usize::try_from(args.concurrency).unwrap_or(usize::MAX),
        stop,
        products: args.products,
        completion: args.completion,
        progress: true,
        cancel,
        ..LoadOptions::new(args.api, args.appid, args.appsecret, machines)
    };
    let report = load::load(opts).await?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!("{report}");
    }
    Ok(())
}

/// Resolves on Ctrl-C, or SIGTERM on Unix (how service managers stop us).
async fn wait_for_stop() -> std::io::Result<()> {
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            r = tokio::signal::ctrl_c() => r,
            _ = term.recv() => Ok(()),
        }
    }
    #[cfg(not(unix))]
    {
        tokio::signal::ctrl_c().await
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn parses_run() {
        let cli = Cli::try_parse_from([
            "vendgate-sim",
            "run",
            "--gateway",
            "127.0.0.1:1884",
            "--machine-no",
            "00000001",
            "--secret",
            "s",
            "--behaviour",
            "refuse:maintenance",
            "--products",
            "1:10:350, 2:5:200",
        ])
        .unwrap();
        let Commands::Run(args) = cli.command else {
            panic!("parsed as another command");
        };
        assert_eq!(args.machine_no.as_str(), "00000001");
        assert_eq!(
            args.behaviour,
            Behaviour::Refuse {
                reason: "maintenance".into()
            }
        );
        assert_eq!(args.products.0.len(), 2);
        assert_eq!(
            args.products.0[1],
            InventoryItem {
                product_id: 2,
                stock: 5,
                price: 200
            }
        );
        assert_eq!(args.keep_alive, 30);
        assert_eq!(args.go_timeout, crate::state::DEFAULT_GO_TIMEOUT);
        assert!(args.clean_session);
    }

    #[test]
    fn parses_go_timeout_and_clean_session() {
        let cli = Cli::try_parse_from([
            "vendgate-sim",
            "run",
            "--machine-no",
            "00000001",
            "--secret",
            "s",
            "--behaviour",
            "reboot-before-go",
            "--go-timeout",
            "750ms",
            "--clean-session",
            "false",
        ])
        .unwrap();
        let Commands::Run(args) = cli.command else {
            panic!("parsed as another command");
        };
        assert_eq!(args.behaviour, Behaviour::RebootBeforeGo);
        assert_eq!(args.go_timeout, Duration::from_millis(750));
        assert!(!args.clean_session);
        let cli = Cli::try_parse_from([
            "vendgate-sim",
            "fleet",
            "--secrets",
            "s.csv",
            "--behaviour",
            "ignore-go",
            "--go-timeout",
            "2s",
        ])
        .unwrap();
        let Commands::Fleet(args) = cli.command else {
            panic!("parsed as another command");
        };
        assert_eq!(args.behaviour, Behaviour::IgnoreGo);
        assert_eq!(args.go_timeout, Duration::from_secs(2));
        assert!(args.clean_session);
    }

    #[test]
    fn rejects_bad_arguments() {
        let base = ["vendgate-sim", "run", "--secret", "s"];
        let with = |extra: &[&str]| Cli::try_parse_from(base.iter().chain(extra)).is_err();
        assert!(with(&["--machine-no", "1234567"]));
        assert!(with(&["--machine-no", "12345678", "--behaviour", "sleepy"]));
        assert!(with(&["--machine-no", "12345678", "--products", "1:10"]));
        assert!(with(&[
            "--machine-no",
            "12345678",
            "--products",
            "1:-1:350"
        ]));
        assert!(with(&["--machine-no", "12345678", "--keep-alive", "0"]));
        assert!(with(&["--machine-no", "12345678", "--go-timeout", "0s"]));
        assert!(with(&["--machine-no", "12345678", "--go-timeout", "soon"]));
        assert!(with(&[
            "--machine-no",
            "12345678",
            "--clean-session",
            "maybe"
        ]));
    }

    #[test]
    fn fleet_takes_a_scenario_instead_of_a_behaviour() {
        let base = ["vendgate-sim", "fleet", "--secrets", "s.csv"];
        let parse = |extra: &[&str]| Cli::try_parse_from(base.iter().chain(extra));
        let cli = parse(&["--scenario", "scenarios/mixed.toml"]).unwrap();
        let Commands::Fleet(args) = cli.command else {
            panic!("parsed as another command");
        };
        assert_eq!(
            args.scenario.as_deref(),
            Some(std::path::Path::new("scenarios/mixed.toml"))
        );
        assert!(parse(&["--scenario", "x.toml", "--behaviour", "never-ack"]).is_err());
    }
}
