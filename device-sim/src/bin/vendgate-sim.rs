//! `vendgate-sim`: the command-line entry point; the logic lives in
//! `vendgate_sim::cli`.

use std::process::ExitCode;

use clap::Parser;
use vendgate_sim::cli::{self, Cli};

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    cli::init_tracing(cli.command.default_log_filter());
    match cli::run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "vendgate-sim failed");
            ExitCode::FAILURE
        }
    }
}
