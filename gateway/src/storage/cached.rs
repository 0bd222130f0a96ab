//! The merchant credential cache both backends keep in front of the
//! `merchants` table: API authentication reads a merchant on every request,
//! and its row changes only on a rotation, a disable or a new notify_url.
//!
//! Entries are trusted for [`TTL`] after they were read. Such a change
//! usually comes from the CLI in another process (or another node), so an
//! entry cannot be invalidated from here alone; the short TTL bounds how
//! long the change takes to reach a running gateway, and a change made by
//! this process drops its entry at once. Misses are not cached, so a
//! merchant created by the CLI is found on its first request.

use std::future::Future;
use std::time::{Duration, Instant};

use dashmap::DashMap;

use super::{Merchant, StorageError};

/// How long a cached merchant row is trusted.
pub const TTL: Duration = Duration::from_secs(1);

/// Merchants by appid with the time they were read.
#[derive(Debug, Default)]
pub struct MerchantCache {
    rows: DashMap<String, (Merchant, Instant)>,
}

impl MerchantCache {
    /// The merchant, from the cache while its entry is fresh, else from
    /// `load` (then cached if found).
    pub async fn get_or_load(
        &self,
        appid: &str,
        load: impl Future<Output = Result<Option<Merchant>, StorageError>>,
    ) -> Result<Option<Merchant>, StorageError> {
        if let Some(m) = self.rows.get(appid) {
            if m.1.elapsed() < TTL {
                return Ok(Some(m.0.clone()));
            }
        }
        let found = load.await?;
        match &found {
            Some(m) => {
                self.rows
                    .insert(m.appid.clone(), (m.clone(), Instant::now()));
            }
            None => {
                self.rows.remove(appid);
            }
        }
        Ok(found)
    }

    /// Drop a merchant after this process changed its row: this process
    /// sees the change at once, others within the TTL.
    pub fn forget(&self, appid: &str) {
        self.rows.remove(appid);
    }
}
