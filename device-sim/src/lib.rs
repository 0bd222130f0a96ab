//! Vendgate device simulator: vending machines that speak PROTOCOL.md over
//! MQTT, for integration tests, demos and load.
//!
//! # Layout
//!
//! - [`behaviour`]: how a machine answers orders (normal, refuse, fail, …).
//! - [`state`]: the pure machine: commands in, messages out, stock, dedup.
//! - [`journal`]: what a machine received, sent and dispensed, for tests.
//! - [`sim`]: the MQTT connection (rumqttc) and the [`SimHandle`] that
//!   steers and observes a running machine.
//! - [`fleet`]: thousands of machines in one process, started at a bounded
//!   rate ([`Fleet`]).
//! - [`scenario`]: TOML files assigning behaviours to machines of a fleet.
//! - [`secrets_file`]: the `machine_no,secret` files of bulk provisioning.
//! - [`rr`]: bare MQTT request/response round trips through any broker.
//! - [`load`]: orders placed through the HTTP open API, with latency and
//!   answer codes.
//! - [`stats`]: latency histograms and percentiles for the tools above.
//! - [`process`]: resident memory and file limits of this process.
//! - [`cli`]: the `vendgate-sim` command line.

pub mod behaviour;
pub mod cli;
pub mod fleet;
pub mod journal;
pub mod load;
pub mod process;
pub mod rr;
pub mod scenario;
pub mod secrets_file;
pub mod sim;
pub mod state;
pub mod stats;

pub use behaviour::Behaviour;
pub use fleet::{Fleet, FleetOptions};
pub use journal::{JournalEntry, JournalEvent};
pub use load::{load, LoadOptions, LoadReport};
pub use rr::{rr, RrOptions, RrReport};
pub use scenario::Scenario;
pub use sim::{SimConfig, SimHandle, SimMachine};
pub use state::{MachineState, Outgoing};
