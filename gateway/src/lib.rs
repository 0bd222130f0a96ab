//! Vendgate: a device gateway for vending machines.
//!
//! # Layout, from the top down (a module imports only those below it)
//!
//! - [`tools`]: the `vendgate` command line, provisioning, `top`, `demo`, export.
//! - [`app`]: builds every part in order, supervises the long-lived tasks,
//!   shuts down in order; readiness and the metrics exposition.
//! - [`http`]: the merchant open API, the dashboard, operator endpoints.
//! - [`front`]: placing and paying here, or on the node holding the machine.
//! - [`orders`]: the order service around the pure state machine.
//! - [`cluster`]: cluster mode: the NATS client, the owner server, liveness.
//! - [`fleet`]: presence (this node and the cluster view), its persister.
//! - [`link`]: commands down to machines and uplinks up from them.
//! - [`notifier`]: webhook delivery from the outbox.
//! - [`retention`]: the background purge of old orders and webhook rows.
//! - [`metrics`]: counters, observers and the Prometheus exposition.
//! - [`edge`]: the machine-facing MQTT 3.1.1 server (auth, ACL, keep alive, routing).
//! - [`storage`]: the storage trait, SQLite and PostgreSQL.
//! - [`domain`]: the order state machine and webhook bodies (pure).
//! - [`config`], [`secrets`], [`passwords`], [`tls`], [`private_fs`],
//!   [`telemetry`]: settings, secret hashing and encryption, argon2 for
//!   configured passwords, rustls, owner-only files, tracing.
//! - `fuzzing` (hidden): bodies of the fuzz targets and hostile-input tests (docs/fuzzing.md).

pub mod app;
pub mod cluster;
pub mod config;
pub mod domain;
pub mod edge;
pub mod fleet;
pub mod front;
#[doc(hidden)]
pub mod fuzzing;
pub mod http;
pub mod link;
pub mod metrics;
pub mod notifier;
pub mod orders;
pub mod passwords;
pub mod private_fs;
pub mod retention;
pub mod secrets;
pub mod storage;
pub mod telemetry;
pub mod tls;
pub mod tools;

pub use app::{Gateway, GatewayHandle};
pub use config::Settings;
