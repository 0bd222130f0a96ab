//! The `vendgate` command line: `serve`, `config`, `hash-password`, the
//! provisioning and lifecycle commands that work against the running
//! gateway's database (no restart), and `export`.
//! `--config` and `--data-dir` are accepted anywhere on the command line.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use vendgate_proto::machine::MachineNo;

use super::provision;
use crate::app::Gateway;
use crate::config::{Overrides, Settings};
use crate::secrets::WebhookKey;
use crate::{storage, telemetry};

#[derive(Debug, Parser)]
#[command(
    name = "vendgate",
    version,
    about = "Device gateway for vending machines"
)]
pub struct Cli {
    /// Configuration file (TOML).
    #[arg(long, global = true, env = "VENDGATE_CONFIG")]
    pub config: Option<PathBuf>,
    /// Data directory (database and state).
    #[arg(long, global = true)]
    pub data_dir: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Cmd,
}

#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// Run the gateway.
    Serve {
        /// Machine-facing MQTT listener, e.g. 0.0.0.0:1883.
        #[arg(long)]
        mqtt_addr: Option<SocketAddr>,
        /// HTTP listener, e.g. 0.0.0.0:8080.
        #[arg(long)]
        http_addr: Option<SocketAddr>,
    },
    /// Print the effective settings (secrets redacted).
    Config,
    /// A refreshing terminal view of a running gateway's metrics.
    Top {
        /// The gateway's metrics URL; default from the settings
        /// (`[metrics] addr`, else the HTTP listener, on loopback).
        #[arg(long)]
        url: Option<String>,
        /// Refresh interval, e.g. 2s.
        #[arg(long, default_value = "2s", value_parser = humantime_serde::re::humantime::parse_duration)]
        interval: std::time::Duration,
        /// Print one frame and exit.
        #[arg(long)]
        once: bool,
    },
    /// Run the gateway with a demo merchant and three simulated machines, and
    /// print a curl command that places an order.
    Demo {
        #[arg(long)]
        mqtt_addr: Option<SocketAddr>,
        #[arg(long)]
        http_addr: Option<SocketAddr>,
    },
    /// Merchants (API credentials).
    #[command(subcommand)]
    Merchant(MerchantCmd),
    /// Machines (MQTT credentials).
    #[command(subcommand)]
    Machine(MachineCmd),
    /// Service accounts (trusted MQTT integrations, read-only under vend/v1/).
    #[command(subcommand)]
    Service(ServiceCmd),
    /// Read a password (one line) from stdin and print its argon2id hash, for
    /// `[operator] password` or a `[[services]]` password in the config file.
    HashPassword,
    /// Export records for audits, to stdout.
    #[command(subcommand)]
    Export(ExportCmd),
}

#[derive(Debug, Subcommand)]
pub enum ExportCmd {
    /// Orders created in [--from, --to), oldest first, as CSV or JSON lines.
    Orders {
        /// RFC 3339, e.g. 2026-01-01T00:00:00Z (inclusive).
        #[arg(long)]
        from: chrono::DateTime<chrono::FixedOffset>,
        /// RFC 3339 (exclusive).
        #[arg(long)]
        to: chrono::DateTime<chrono::FixedOffset>,
        #[arg(long, value_enum, default_value = "csv")]
        format: crate::tools::export::Format,
        /// Only this merchant's orders.
        #[arg(long)]
        merchant: Option<String>,
    },
}

/// How long a replaced secret keeps working after `rotate-secret`.
const DEFAULT_GRACE: &str = "24h";

fn parse_grace(s: &str) -> Result<std::time::Duration, String> {
    // "0" alone means no grace; humantime wants a unit otherwise.
    if s.trim() == "0" {
        return Ok(std::time::Duration::ZERO);
    }
    humantime_serde::re::humantime::parse_duration(s).map_err(|e| e.to_string())
}

#[derive(Debug, Subcommand)]
pub enum MerchantCmd {
    /// Create a merchant; prints appid and appsecret once.
    Add {
        #[arg(long)]
        name: String,
        #[arg(long)]
        notify_url: Option<String>,
    },
    /// Give a merchant a new AppSecret (printed once). The old one keeps
    /// authenticating for the grace period; webhooks are signed with the new
    /// one at once. Rotating again during a grace ends the older secret.
    RotateSecret {
        #[arg(long)]
        appid: String,
        /// How long the old AppSecret keeps working, e.g. 24h, 30m, 0.
        #[arg(long, default_value = DEFAULT_GRACE, value_parser = parse_grace)]
        grace: std::time::Duration,
    },
    /// Refuse the merchant's API calls (as a wrong AppSecret) and hold its
    /// webhooks, until enabled.
    Disable {
        #[arg(long)]
        appid: String,
    },
    /// Undo `disable`; held webhooks are delivered.
    Enable {
        #[arg(long)]
        appid: String,
    },
    /// Change a merchant's settings.
    Set {
        #[arg(long)]
        appid: String,
        /// New webhook URL (http or https; private addresses refused unless
        /// notifier.allow_private_targets).
        #[arg(long, required_unless_present = "clear_notify_url")]
        notify_url: Option<String>,
        /// Remove the webhook URL (events then go dead: nowhere to deliver).
        #[arg(long, conflicts_with = "notify_url")]
        clear_notify_url: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum MachineCmd {
    /// Provision a machine (prints its secret once), or `--count N --first M
    /// --secrets-out FILE` for many.
    Add {
        #[arg(long)]
        merchant: String,
        #[arg(long, conflicts_with_all = ["count", "first", "secrets_out"])]
        machine_no: Option<MachineNo>,
        #[arg(long, requires_all = ["first", "secrets_out"])]
        count: Option<u32>,
        #[arg(long)]
        first: Option<MachineNo>,
        #[arg(long)]
        secrets_out: Option<PathBuf>,
    },
    /// One line per machine: machine_no, merchant, online|offline, last seen.
    List,
    /// Give a machine a new secret (printed once). The old one keeps
    /// authenticating for the grace period. Rotating again during a grace
    /// ends the older secret.
    RotateSecret {
        #[arg(long)]
        machine: MachineNo,
        /// How long the old secret keeps working, e.g. 24h, 30m, 0.
        #[arg(long, default_value = DEFAULT_GRACE, value_parser = parse_grace)]
        grace: std::time::Duration,
    },
    /// Refuse the machine at CONNECT, close its connection (within 2 s) and
    /// answer its orders like an unknown machine's, until enabled.
    Disable {
        #[arg(long)]
        machine: MachineNo,
    },
    /// Undo `disable`.
    Enable {
        #[arg(long)]
        machine: MachineNo,
    },
    /// Revoke the machine's secrets for good, keeping its order history.
    /// Refused while it has orders in flight.
    Remove {
        #[arg(long)]
        machine: MachineNo,
    },
    /// Give the machine to another merchant. Refused while it has orders in
    /// flight; its past orders stay the old merchant's.
    Transfer {
        #[arg(long)]
        machine: MachineNo,
        /// The new merchant's appid.
        #[arg(long)]
        merchant: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum ServiceCmd {
    /// Create a service account; prints username and password once.
    Add {
        #[arg(long)]
        name: String,
    },
    /// One line per provisioned account: username, name, created.
    List,
    /// Delete an account; its live connections are closed within 2 s.
    Remove {
        #[arg(long)]
        username: String,
    },
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("vendgate: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vendgate: {e:#}");
            ExitCode::FAILURE
        }
    }
}

pub async fn run(cli: Cli) -> anyhow::Result<()> {
    if let Cmd::HashPassword = cli.command {
        // Needs no settings: it may run before any config file exists.
        return hash_password(std::io::stdin().lock(), &mut std::io::stdout());
    }
    let mut overrides = Overrides {
        data_dir: cli.data_dir.clone(),
        ..Overrides::default()
    };
    if let Cmd::Serve {
        mqtt_addr,
        http_addr,
    }
    | Cmd::Demo {
        mqtt_addr,
        http_addr,
    } = &cli.command
    {
        overrides.mqtt_addr = *mqtt_addr;
        overrides.http_addr = *http_addr;
    }
    let settings = Settings::load(cli.config.as_deref(), &overrides)?;
    match cli.command {
        Cmd::Serve { .. } => serve(settings).await,
        Cmd::Demo { .. } => {
            telemetry::init(&settings.log);
            crate::tools::demo::run(settings, wait_for_signal()).await
        }
        Cmd::Config => {
            print!("{}", settings.redacted_toml());
            Ok(())
        }
        Cmd::Top {
            url,
            interval,
            once,
        } => {
            let url = url.unwrap_or_else(|| crate::tools::top::default_url(&settings));
            if once {
                print!("{}", crate::tools::top::frame(&url).await?);
                Ok(())
            } else {
                crate::tools::top::run(&url, interval).await
            }
        }
        Cmd::Merchant(MerchantCmd::Add { name, notify_url }) => {
            let store = open(&settings).await?;
            // The same key file as the gateway's (same --data-dir/--config),
            // created here if this runs before the gateway's first start.
            let key_path = settings.webhook_key_path();
            let key = WebhookKey::load_or_create(&key_path)
                .with_context(|| format!("loading the webhook key {}", key_path.display()))?;
            let mut out = std::io::stdout();
            provision::merchant_add(store.as_ref(), &key, &name, notify_url, &mut out).await?;
            Ok(())
        }
        Cmd::Machine(MachineCmd::Add {
            merchant,
            machine_no,
            count,
            first,
            secrets_out,
        }) => {
            let store = open(&settings).await?;
            let mut out = std::io::stdout();
            match (machine_no, count, first, secrets_out) {
                (Some(m), None, None, None) => {
                    provision::machine_add(store.as_ref(), &merchant, m, &mut out).await?
                }
                (None, Some(n), Some(first), Some(path)) => {
                    provision::machine_add_bulk(
                        store.as_ref(),
                        &merchant,
                        first,
                        n,
                        &path,
                        &mut out,
                    )
                    .await?
                }
                _ => anyhow::bail!("give --machine-no, or --count with --first and --secrets-out"),
            }
            Ok(())
        }
        Cmd::Machine(MachineCmd::List) => {
            let store = open(&settings).await?;
            let mut out = std::io::stdout();
            provision::machine_list(store.as_ref(), &mut out).await?;
            Ok(())
        }
        Cmd::Merchant(MerchantCmd::RotateSecret { appid, grace }) => {
            let store = open(&settings).await?;
            let key_path = settings.webhook_key_path();
            let key = WebhookKey::load_or_create(&key_path)
                .with_context(|| format!("loading the webhook key {}", key_path.display()))?;
            let mut out = std::io::stdout();
            provision::merchant_rotate_secret(store.as_ref(), &key, &appid, grace, &mut out)
                .await?;
            Ok(())
        }
        Cmd::Machine(MachineCmd::RotateSecret { machine, grace }) => {
            let store = open(&settings).await?;
            let mut out = std::io::stdout();
            provision::machine_rotate_secret(store.as_ref(), machine, grace, &mut out).await?;
            Ok(())
        }
        Cmd::HashPassword => hash_password(std::io::stdin().lock(), &mut std::io::stdout()),
        Cmd::Service(ServiceCmd::Add { name }) => {
            let store = open(&settings).await?;
            let mut out = std::io::stdout();
            provision::service_add(store.as_ref(), &name, &mut out).await?;
            Ok(())
        }
        Cmd::Service(ServiceCmd::List) => {
            let store = open(&settings).await?;
            provision::service_list(store.as_ref(), &mut std::io::stdout()).await?;
            Ok(())
        }
        Cmd::Service(ServiceCmd::Remove { username }) => {
            let store = open(&settings).await?;
            provision::service_remove(store.as_ref(), &username, &mut std::io::stdout()).await?;
            Ok(())
        }
        Cmd::Machine(MachineCmd::Disable { machine }) => {
            let store = open(&settings).await?;
            provision::machine_set_disabled(store.as_ref(), machine, true, &mut std::io::stdout())
                .await?;
            Ok(())
        }
        Cmd::Machine(MachineCmd::Enable { machine }) => {
            let store = open(&settings).await?;
            provision::machine_set_disabled(store.as_ref(), machine, false, &mut std::io::stdout())
                .await?;
            Ok(())
        }
        Cmd::Machine(MachineCmd::Remove { machine }) => {
            let store = open(&settings).await?;
            provision::machine_remove(store.as_ref(), machine, &mut std::io::stdout()).await?;
            Ok(())
        }
        Cmd::Machine(MachineCmd::Transfer { machine, merchant }) => {
            let store = open(&settings).await?;
            provision::machine_transfer(store.as_ref(), machine, &merchant, &mut std::io::stdout())
                .await?;
            Ok(())
        }
        Cmd::Merchant(MerchantCmd::Disable { appid }) => {
            let store = open(&settings).await?;
            provision::merchant_set_disabled(store.as_ref(), &appid, true, &mut std::io::stdout())
                .await?;
            Ok(())
        }
        Cmd::Merchant(MerchantCmd::Enable { appid }) => {
            let store = open(&settings).await?;
            provision::merchant_set_disabled(store.as_ref(), &appid, false, &mut std::io::stdout())
                .await?;
            Ok(())
        }
        Cmd::Merchant(MerchantCmd::Set {
            appid,
            notify_url,
            clear_notify_url: _,
        }) => {
            let store = open(&settings).await?;
            provision::merchant_set_notify_url(
                store.as_ref(),
                &appid,
                notify_url.as_deref(),
                settings.notifier.allow_private_targets,
                &mut std::io::stdout(),
            )
            .await?;
            Ok(())
        }
        Cmd::Export(ExportCmd::Orders {
            from,
            to,
            format,
            merchant,
        }) => {
            let store = open(&settings).await?;
            // Locked and buffered: one write per many rows; each page is
            // flushed before the next is read.
            let stdout = std::io::stdout();
            let mut out = std::io::BufWriter::new(stdout.lock());
            let n = crate::tools::export::orders(
                store.as_ref(),
                from.with_timezone(&chrono::Utc),
                to.with_timezone(&chrono::Utc),
                merchant.as_deref(),
                format,
                &mut out,
            )
            .await?;
            eprintln!("exported {n} orders");
            Ok(())
        }
    }
}

/// `vendgate hash-password`: the first line of `input` (its line ending
/// removed, nothing else trimmed) hashed with argon2id, on `out`.
pub fn hash_password(mut input: impl std::io::BufRead, out: &mut impl Write) -> anyhow::Result<()> {
    let mut line = String::new();
    input
        .read_line(&mut line)
        .context("reading the password from stdin")?;
    let password = line
        .strip_suffix('\n')
        .map(|l| l.strip_suffix('\r').unwrap_or(l))
        .unwrap_or(&line);
    anyhow::ensure!(!password.is_empty(), "no password on stdin");
    let phc = crate::passwords::hash_password(password)?;
    writeln!(out, "{phc}").context("writing the hash")?;
    Ok(())
}

async fn open(settings: &Settings) -> anyhow::Result<std::sync::Arc<dyn storage::Storage>> {
    Ok(storage::open(settings).await?)
}

async fn serve(settings: Settings) -> anyhow::Result<()> {
    telemetry::init(&settings.log);
    let settings_https = settings.http.tls.is_some();
    let gateway = Gateway::build(settings).await?;
    eprintln!(
        "vendgate listening: mqtt={}{} http={}{}{}",
        gateway.mqtt_addr(),
        gateway
            .mqtt_tls_addr()
            .map(|a| format!(" mqtt+tls={a}"))
            .unwrap_or_default(),
        gateway.http_addr(),
        if settings_https { " (https)" } else { "" },
        gateway
            .metrics_addr()
            .map(|a| format!(" metrics={a}"))
            .unwrap_or_default()
    );
    let shutdown = gateway.handle().shutdown.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        shutdown.cancel();
    });
    gateway.run().await
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
