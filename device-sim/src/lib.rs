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
//! - [`cli`]: the `vendgate-sim` command line.

pub mod behaviour;
pub mod cli;
pub mod journal;
pub mod sim;
pub mod state;

pub use behaviour::Behaviour;
pub use journal::{JournalEntry, JournalEvent};
pub use sim::{SimConfig, SimHandle, SimMachine};
pub use state::{MachineState, Outgoing};
