//! The outbox operations PostgreSQL does its own way: claims lease with
//! `FOR UPDATE SKIP LOCKED` (claimers on several nodes never share an event
//! and never wait on each other), a replay is two statements of their own,
//! and a presence write emits its machine event exactly once per flip, with
//! the flip and its detection one statement.

use std::collections::HashMap;

use chrono::{DateTime, Utc};

use super::{locks, PgStorage};
use crate::storage::backend::{Backend, OwnOutbox};
use crate::storage::ops::accounts::write_presence;
use crate::storage::ops::outbox::candidates;
use crate::storage::outbox::{ClaimRequest, ClaimedEvent, PresenceChange, ReplayOutcome};
use crate::storage::rows::{presence_epoch, CandidateRow};
use crate::storage::run::{Run, Stmt, Transaction};
use crate::storage::sql;
use crate::storage::StorageError;

#[async_trait::async_trait]
impl OwnOutbox for PgStorage {
    async fn claim_events(
        &self,
        req: &ClaimRequest<'_>,
    ) -> Result<Vec<ClaimedEvent>, StorageError> {
        if req.limit == 0 || req.per_merchant == 0 {
            return Ok(Vec::new());
        }
        let now = req.now.timestamp_millis();
        // Read without locks: the lease takes the rows and re-checks that they
        // are still due.
        let rows: Vec<CandidateRow> = self.pooled().fetch_all(candidates(req)?).await?;
        let mut candidates = Vec::with_capacity(rows.len());
        for row in rows {
            candidates.push((row.seq, row.into_event()?));
        }
        // Waves: pick what the caps allow from the candidates in order, lease
        // the wave, and for the events another claimer got first, go on picking
        // from where the wave stopped.
        let mut taken: HashMap<String, usize> = HashMap::new();
        let mut out = Vec::new();
        let mut rest = candidates.into_iter().peekable();
        while out.len() < req.limit && rest.peek().is_some() {
            let mut wave = Vec::new();
            while out.len() + wave.len() < req.limit {
                let Some((seq, ev)) = rest.next() else {
                    break;
                };
                let n = taken.entry(ev.merchant_appid.clone()).or_default();
                if req.at_cap(&ev.merchant_appid, *n) {
                    continue;
                }
                *n += 1;
                wave.push((seq, ev));
            }
            if wave.is_empty() {
                break;
            }
            let seqs = wave.iter().map(|(seq, _)| *seq).collect();
            let leased =
                locks::lease_outbox(self, seqs, req.lease_until.timestamp_millis(), now).await?;
            for (seq, ev) in wave {
                if leased.contains(&seq) {
                    out.push(ev);
                } else if let Some(n) = taken.get_mut(&ev.merchant_appid) {
                    // Lost to another claimer: its slot is free again.
                    *n = n.saturating_sub(1);
                }
            }
        }
        Ok(out)
    }

    async fn replay_event(
        &self,
        merchant: &str,
        event_id: &str,
        now: DateTime<Utc>,
    ) -> Result<ReplayOutcome, StorageError> {
        let replay = Stmt::new(sql::REPLAY_OUTBOX)
            .bind(now.timestamp_millis())
            .bind(event_id)
            .bind(merchant);
        if self.pooled().execute(replay).await? == 1 {
            return Ok(ReplayOutcome::Replayed);
        }
        let exists = Stmt::new(sql::OUTBOX_EVENT_EXISTS)
            .bind(event_id)
            .bind(merchant);
        let found: Option<(i32,)> = self.pooled().fetch_optional(exists).await?;
        Ok(ReplayOutcome::not_replayed(found.is_some()))
    }

    async fn presence_with_events(&self, batch: &[PresenceChange]) -> Result<(), StorageError> {
        let mut tx = self.begin(false).await?;
        for c in locks::by_machine(batch, |c| &c.write.machine_no) {
            let w = &c.write;
            let Some(ev) = &c.event else {
                write_presence(&mut tx, w).await?;
                continue;
            };
            // Of two nodes writing the same offline only one sees the flip and
            // writes the event. When it does not flip (same flag, or stale), the
            // plain write still applies its epoch rule (last_seen, a take-over).
            let flip = Stmt::new(sql::presence_if_flip(w.online))
                .bind(w.machine_no.as_str())
                .bind(presence_epoch(w)?)
                .bind(w.at.timestamp_millis())
                .bind(w.online);
            let Some((merchant,)) = tx.fetch_optional::<(String,)>(flip).await? else {
                write_presence(&mut tx, w).await?;
                continue;
            };
            let event = Stmt::new(sql::MACHINE_EVENT_AFTER_FLIP)
                .bind(&ev.event_id)
                .bind(w.machine_no.as_str())
                .bind(&ev.kind)
                .bind(&ev.body)
                .bind(ev.created_at.timestamp_millis())
                .bind(&merchant);
            tx.execute(event).await?;
        }
        Transaction::commit(tx).await
    }
}
