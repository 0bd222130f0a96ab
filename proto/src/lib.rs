//! The vendgate wire contract, shared by the gateway, the device simulator and the tests.
//!
//! This crate does no I/O and depends on no runtime, so every side of the
//! contract can use it and it can be tested in isolation.
//!
//! # Layout
//!
//! - [`machine`]: the 8-digit machine number (`MachineNo`).
//! - [`topic`]: MQTT topic builders and parsers for `vend/v1/{machine_no}/…`,
//!   plus MQTT 3.1.1 topic/filter validity and matching helpers.
//! - [`msg`]: the JSON payloads of PROTOCOL.md and their bounded decoder.
//! - [`codes`]: the API error codes of API.md, in one table.

pub mod codes;
pub mod machine;
pub mod msg;
pub mod topic;

pub use codes::ErrorCode;
pub use machine::{InvalidMachineNo, MachineNo};
