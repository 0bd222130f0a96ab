//! The link between the gateway's services and its machines, over the edge:
//! commands going down and uplinks coming up.
//!
//! - [`commands`]: `CommandBus` (send, send with PUBACK receipt, ping); the
//!   local implementation over this node's hub. The cluster implements the
//!   same trait over NATS.
//! - [`uplinks`]: what each machine uplink becomes after the edge's ACL:
//!   presence (`state`), ping answers (`pong`), and the order side
//!   (`inventory`, `ack`, `result`).

pub mod commands;
pub mod uplinks;
