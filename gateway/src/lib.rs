//! Vendgate: a device gateway for vending machines.
//!
//! # Layout
//!
//! - [`config`]: typed settings (defaults ← file ← `VENDGATE_*` env ← flags).
//! - [`telemetry`]: tracing set-up.
//! - [`startup`]: `Gateway::build` binds everything, `Gateway::run` until shutdown.
//! - [`edge`]: the machine-facing MQTT 3.1.1 server (auth, ACL, keep alive, routing).
//! - [`presence`]: who is online, with connection epochs.
//! - [`uplink`]: what the gateway does with each machine uplink.
//! - [`orders`]: the order service around a pure state machine, inventory and reservations.
//! - [`front`]: placing and paying here, or on the node holding the machine (cluster mode).
//! - [`commands`]: the command-delivery seam (local connection now, NATS later).
//! - [`storage`]: the storage trait and its SQLite implementation.
//! - [`secrets`]: generation and hashing of machine, merchant and service secrets.
//! - [`passwords`]: argon2id verification of the human-chosen passwords in the configuration.
//! - [`private_fs`]: owner-only modes for the data directory, database and key files.
//! - [`provision`]: the `vendgate merchant|machine|service` commands (add, list,
//!   rotate-secret, disable, enable, remove, transfer, set).
//! - [`http`]: the HTTP listener (plain or HTTPS).
//! - [`tls`]: rustls server configurations from PEM files, client-certificate identity.
//! - [`notifier`]: webhook delivery from the outbox.
//! - [`retention`]: the background purge of old orders and webhook rows.
//! - [`export`]: `vendgate export orders`, paged CSV or JSON lines.
//! - [`metrics`]: Prometheus exposition, operator counters and observers.
//! - [`top`]: `vendgate top`, a terminal view of a running gateway's metrics.
//! - [`cli`]: the `vendgate` command line.
//! - [`demo`]: `vendgate demo`, the gateway with simulated machines in one process.
//! - `fuzzing` (hidden): bodies of the fuzz targets and hostile-input tests (docs/fuzzing.md).

pub mod app;
pub mod cluster;
pub mod commands;
pub mod config;
pub mod domain;
pub mod edge;
pub mod fleet;
pub mod front;
#[doc(hidden)]
pub mod fuzzing;
pub mod http;
pub mod metrics;
pub mod notifier;
pub mod orders;
pub mod passwords;
pub mod presence;
pub mod private_fs;
pub mod retention;
pub mod secrets;
pub mod storage;
pub mod telemetry;
pub mod tls;
pub mod tools;
pub mod uplink;

pub use app::{Gateway, GatewayHandle};
pub use config::Settings;
