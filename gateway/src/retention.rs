//! Retention: a background purge of finished orders (with their lines,
//! timeline and webhook rows) and of delivered or dead webhook rows, past
//! the ages `[retention]` sets, and the database size for the metrics.
//!
//! Presence history is not stored (a machine row holds only its latest
//! presence; `machine.online`/`offline` webhooks are webhook rows), so there
//! is nothing else to purge.
//!
//! Each batch is one short transaction of at most `batch_size` rows, with
//! `batch_pause` between batches, so the order path never waits long for
//! the write lock (SQLite) or for row locks (PostgreSQL, where rows being
//! updated are skipped and left for the next run). Orders that may still
//! matter to money or stock are kept at least `protected_orders`
//! ([`crate::storage::lifecycle::OrderPurge`]).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::RetentionSettings;
use crate::storage::{OrderPurge, Purged, Storage, StorageError};

/// How often the database size is measured for the metrics.
const SIZE_INTERVAL: Duration = Duration::from_secs(60);

/// Kinds of purged rows, the `kind` label of the metric.
pub const KINDS: [&str; 3] = ["orders", "order_events", "webhooks"];

/// What the purge did so far, for the metrics.
#[derive(Debug, Default)]
pub struct RetentionStats {
    /// Rows purged, by [`KINDS`] index.
    pub purged: [AtomicU64; 3],
    /// Bytes, as last measured (0 before the first measurement).
    pub database_size: AtomicU64,
    /// Batches that committed.
    pub batches: AtomicU64,
}

impl RetentionStats {
    fn add(&self, p: &Purged) {
        self.purged[0].fetch_add(p.orders, Ordering::Relaxed);
        self.purged[1].fetch_add(p.order_events, Ordering::Relaxed);
        self.purged[2].fetch_add(p.webhooks, Ordering::Relaxed);
    }
}

/// `now - age`, or None when `age` is 0 (keep forever) or too large.
fn cutoff(now: DateTime<Utc>, age: Duration) -> Option<DateTime<Utc>> {
    if age.is_zero() {
        return None;
    }
    chrono::Duration::from_std(age)
        .ok()
        .and_then(|a| now.checked_sub_signed(a))
}

/// One run: purge in batches until nothing is left past the cutoffs (or
/// `stop` fires). Returns the total.
pub async fn purge(
    store: &dyn Storage,
    s: &RetentionSettings,
    now: DateTime<Utc>,
    stats: &RetentionStats,
    stop: &CancellationToken,
) -> Result<Purged, StorageError> {
    let mut total = Purged::default();
    let pause = || async {
        tokio::select! {
            _ = stop.cancelled() => {}
            _ = tokio::time::sleep(s.batch_pause) => {}
        }
    };
    if let Some(before) = cutoff(now, s.orders) {
        // Protected orders go at the later of the two ages.
        let protected_before = cutoff(now, s.protected_orders.max(s.orders)).unwrap_or(before);
        let rule = OrderPurge {
            before,
            protected_before: protected_before.min(before),
            limit: s.batch_size,
        };
        while !stop.is_cancelled() {
            let p = store.purge_orders(&rule).await?;
            stats.add(&p);
            stats.batches.fetch_add(1, Ordering::Relaxed);
            total.orders += p.orders;
            total.order_events += p.order_events;
            total.webhooks += p.webhooks;
            if p.orders < s.batch_size as u64 {
                break;
            }
            pause().await;
        }
    }
    if let Some(before) = cutoff(now, s.webhooks) {
        while !stop.is_cancelled() {
            let p = store.purge_webhooks(before, s.batch_size).await?;
            stats.add(&p);
            stats.batches.fetch_add(1, Ordering::Relaxed);
            total.webhooks += p.webhooks;
            if p.webhooks < s.batch_size as u64 {
                break;
            }
            pause().await;
        }
    }
    Ok(total)
}

async fn measure(store: &dyn Storage, stats: &RetentionStats) {
    match store.database_size().await {
        Ok(n) => stats.database_size.store(n, Ordering::Relaxed),
        Err(e) => warn!(error = %e, "measuring the database size failed"),
    }
}

/// Purge every `interval` (the first run soon after start) and measure the
/// database every minute, until `shutdown`; a batch in progress finishes.
pub async fn run(
    store: Arc<dyn Storage>,
    s: RetentionSettings,
    stats: Arc<RetentionStats>,
    shutdown: CancellationToken,
) {
    let mut next_purge = tokio::time::Instant::now() + s.interval.min(SIZE_INTERVAL);
    loop {
        measure(store.as_ref(), &stats).await;
        if tokio::time::Instant::now() >= next_purge {
            match purge(store.as_ref(), &s, Utc::now(), &stats, &shutdown).await {
                Ok(p) if p != Purged::default() => {
                    info!(
                        orders = p.orders,
                        order_events = p.order_events,
                        webhooks = p.webhooks,
                        "retention purge"
                    );
                    measure(store.as_ref(), &stats).await;
                }
                Ok(_) => {}
                // Tried again at the next interval.
                Err(e) => warn!(error = %e, "retention purge failed"),
            }
            next_purge = tokio::time::Instant::now() + s.interval;
        }
        let wake = next_purge.min(tokio::time::Instant::now() + SIZE_INTERVAL);
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep_until(wake) => {}
        }
    }
}
