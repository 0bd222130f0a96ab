//! Webhook notifier: delivers the outbox to merchants' `notify_url`s
//! (API.md "Notifications"). Event rows are written by the order and
//! presence paths in the same transaction as the change they describe.

use rand::RngCore;

/// A fresh event id: `evt_` + 128 random bits in hex.
pub fn new_event_id() -> String {
    let mut b = [0u8; 16];
    rand::rngs::OsRng.fill_bytes(&mut b);
    format!("evt_{}", hex::encode(b))
}
