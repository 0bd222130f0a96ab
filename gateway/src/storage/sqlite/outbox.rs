//! The outbox operations SQLite does its own way: claims select and lease
//! under the write lock, a replay reads why it did not apply in its own
//! transaction, and a machine event is judged before the presence write it
//! belongs to, all of a batch under the write lock.

use std::collections::HashMap;

use chrono::{DateTime, Utc};

use super::SqliteStorage;
use crate::storage::backend::{Backend, OwnOutbox};
use crate::storage::ops::accounts::write_presence;
use crate::storage::ops::outbox::candidates;
use crate::storage::outbox::{ClaimRequest, ClaimedEvent, PresenceChange, ReplayOutcome};
use crate::storage::rows::{presence_epoch, CandidateRow};
use crate::storage::run::{Run, Stmt, Transaction};
use crate::storage::sql;
use crate::storage::StorageError;

#[async_trait::async_trait]
impl OwnOutbox for SqliteStorage {
    async fn claim_events(
        &self,
        req: &ClaimRequest<'_>,
    ) -> Result<Vec<ClaimedEvent>, StorageError> {
        let now = req.now.timestamp_millis();
        let any_due: Option<(i32,)> = self
            .pooled()
            .fetch_optional(Stmt::new(sql::OUTBOX_ANY_DUE).bind(now))
            .await?;
        if any_due.is_none() || req.limit == 0 || req.per_merchant == 0 {
            return Ok(Vec::new());
        }
        // Select and lease under one write lock: a second claimer (task or
        // process) waits, then finds these events no longer due.
        let mut tx = self.begin_immediate().await?;
        let rows: Vec<CandidateRow> = tx.fetch_all(candidates(req)?).await?;
        let mut taken: HashMap<String, usize> = HashMap::new();
        let mut out = Vec::new();
        for row in rows {
            if out.len() >= req.limit {
                break;
            }
            let seq = row.seq;
            let ev = row.into_event()?;
            let n = taken.entry(ev.merchant_appid.clone()).or_default();
            if req.at_cap(&ev.merchant_appid, *n) {
                continue;
            }
            let lease = Stmt::new(sql::OUTBOX_LEASE.sqlite)
                .bind(req.lease_until.timestamp_millis())
                .bind(seq)
                .bind(now);
            if tx.execute(lease).await? == 1 {
                *n += 1;
                out.push(ev);
            }
        }
        Transaction::commit(tx).await?;
        Ok(out)
    }

    async fn replay_event(
        &self,
        merchant: &str,
        event_id: &str,
        now: DateTime<Utc>,
    ) -> Result<ReplayOutcome, StorageError> {
        let mut tx = self.begin(false).await?;
        let replay = Stmt::new(sql::REPLAY_OUTBOX)
            .bind(now.timestamp_millis())
            .bind(event_id)
            .bind(merchant);
        if tx.execute(replay).await? == 1 {
            Transaction::commit(tx).await?;
            return Ok(ReplayOutcome::Replayed);
        }
        let exists: Option<(i32,)> = tx
            .fetch_optional(
                Stmt::new(sql::OUTBOX_EVENT_EXISTS)
                    .bind(event_id)
                    .bind(merchant),
            )
            .await?;
        Transaction::rollback(tx).await?;
        Ok(ReplayOutcome::not_replayed(exists.is_some()))
    }

    async fn presence_with_events(&self, batch: &[PresenceChange]) -> Result<(), StorageError> {
        // Each event's condition reads the row its write then changes; holding
        // the write lock from the start means no other writer can change it in
        // between (and no snapshot upgrade fails).
        let mut tx = self.begin_immediate().await?;
        for c in batch {
            let w = &c.write;
            if let Some(ev) = &c.event {
                let event = Stmt::new(sql::MACHINE_EVENT_BEFORE_WRITE)
                    .bind(&ev.event_id)
                    .bind(&ev.kind)
                    .bind(&ev.body)
                    .bind(ev.created_at.timestamp_millis())
                    .bind(w.machine_no.as_str())
                    .bind(presence_epoch(w)?)
                    .bind(w.online);
                tx.execute(event).await?;
            }
            write_presence(&mut tx, w).await?;
        }
        Transaction::commit(tx).await
    }
}
