//! The `vendgate-sim` command line: one subcommand per way of running
//! machines (`run` for one machine today; fleet and load tools slot in as
//! further subcommands).

use std::io::IsTerminal as _;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use tracing::info;
use tracing_subscriber::EnvFilter;
use vendgate_proto::machine::MachineNo;
use vendgate_proto::msg::InventoryItem;

use crate::behaviour::Behaviour;
use crate::sim::{SimConfig, SimMachine};

/// Stock of a machine started without `--products`.
const DEFAULT_PRODUCTS: &str = "1:20:350,2:20:200,3:20:500";

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
    /// ack-then-silent, slow-ack[:MS] or drop-connection.
    #[arg(long, default_value = "normal")]
    pub behaviour: Behaviour,
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

/// Logs to stderr, filtered by `RUST_LOG` (default `info`).
pub fn init_tracing() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
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
    };
    info!(?config, "starting machine");
    let machine = SimMachine::spawn(config);
    wait_for_stop().await.context("waiting for Ctrl-C")?;
    info!("stopping: sending DISCONNECT");
    machine.shutdown().await;
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
        let Commands::Run(args) = cli.command;
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
    }
}
