//! The `vendgate` command line and the tools around a gateway: nothing
//! below imports them.
//!
//! - [`cli`]: the `vendgate` command line.
//! - [`provision`]: `vendgate merchant|machine|service` (add, list,
//!   rotate-secret, disable, enable, remove, transfer, set).
//! - [`top`]: `vendgate top`, a terminal view of a running gateway's metrics.
//! - [`demo`]: `vendgate demo`, the gateway with simulated machines in one
//!   process.
//! - [`export`]: `vendgate export orders`, paged CSV or JSON lines.

pub mod cli;
pub mod demo;
pub mod export;
pub mod provision;
pub mod top;
