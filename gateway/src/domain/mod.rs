//! The gateway's rules with no I/O: what an order may become and what the
//! merchant is told about it. Everything above (orders, storage, the
//! cluster, HTTP) uses these types; nothing here imports them back.
//!
//! - [`order`]: the order state machine, its statuses, give-up reasons and
//!   the notices a change sends.
//! - [`webhook`]: every webhook body (`order.*` and `machine.*`), built in
//!   one place.

pub mod order;
pub mod webhook;
