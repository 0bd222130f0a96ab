//! The webhook outbox operations (attempts, replay, listings), written once for every `Backend`; claims are each engine's own.

use crate::storage::backend::Backend;
use crate::storage::outbox::*;
use crate::storage::rows::{
    attempt_effect, to_i64, to_u64, BacklogRow, EntryRow, WebhookAttemptRow,
};
use crate::storage::run::{Run, Stmt, Transaction};
use crate::storage::{sql, StorageError};
use chrono::{DateTime, Utc};

/// The candidates a claim picks from ([`super::sql::OUTBOX_CANDIDATES`]).
pub(crate) fn candidates<'a>(req: &ClaimRequest<'_>) -> Result<Stmt<'a>, StorageError> {
    Ok(Stmt::new(sql::OUTBOX_CANDIDATES)
        .bind(req.now.timestamp_millis())
        .bind(to_i64(req.per_merchant, "per_merchant")?)
        .bind(to_i64(req.scan(), "claim limit")?))
}

#[async_trait::async_trait]
impl<B: Backend> OutboxStorage for B {
    async fn claim_outbox(
        &self,
        req: &ClaimRequest<'_>,
    ) -> Result<Vec<ClaimedEvent>, StorageError> {
        self.claim_events(req).await
    }

    async fn record_attempt(&self, a: &Attempt) -> Result<(), StorageError> {
        let mut tx = self.begin(false).await?;
        let insert = Stmt::new(sql::INSERT_ATTEMPT)
            .bind(&a.event_id)
            .bind(a.at.timestamp_millis())
            .bind(a.http_status.map(i32::from))
            .bind(&a.error);
        tx.execute(insert).await?;
        let (status, next_ms, delivered_ms) = attempt_effect(a);
        let apply = Stmt::new(sql::APPLY_ATTEMPT)
            .bind(status.as_str())
            .bind(next_ms)
            .bind(delivered_ms)
            .bind(&a.error)
            .bind(&a.event_id);
        tx.execute(apply).await?;
        tx.commit().await
    }

    async fn list_outbox(
        &self,
        merchant: &str,
        status: Option<OutboxStatus>,
        offset: u64,
        limit: u64,
    ) -> Result<(Vec<OutboxEntry>, u64), StorageError> {
        let offset = to_i64(offset, "offset")?;
        let limit = to_i64(limit, "limit")?;
        let (count, page) = match status {
            Some(st) => (
                Stmt::new(sql::OUTBOX_COUNT_IN_STATUS)
                    .bind(merchant)
                    .bind(st.as_str()),
                Stmt::new(sql::OUTBOX_PAGE_IN_STATUS)
                    .bind(merchant)
                    .bind(st.as_str()),
            ),
            None => (
                Stmt::new(sql::OUTBOX_COUNT).bind(merchant),
                Stmt::new(sql::OUTBOX_PAGE).bind(merchant),
            ),
        };
        let (total,): (i64,) = self.pooled().fetch_one(count).await?;
        let rows = self
            .pooled()
            .fetch_all::<EntryRow>(page.bind(limit).bind(offset))
            .await?;
        let entries = rows
            .into_iter()
            .map(EntryRow::into_entry)
            .collect::<Result<Vec<_>, _>>()?;
        Ok((entries, to_u64(total, "outbox count")?))
    }

    async fn replay_outbox(
        &self,
        merchant: &str,
        event_id: &str,
        now: DateTime<Utc>,
    ) -> Result<ReplayOutcome, StorageError> {
        self.replay_event(merchant, event_id, now).await
    }

    async fn outbox_backlog(&self) -> Result<OutboxBacklog, StorageError> {
        self.pooled()
            .fetch_one::<BacklogRow>(Stmt::new(sql::OUTBOX_BACKLOG))
            .await?
            .into_backlog()
    }

    async fn order_webhook_attempts(
        &self,
        order_id: u64,
    ) -> Result<Vec<WebhookAttempt>, StorageError> {
        let Ok(id) = i64::try_from(order_id) else {
            return Ok(Vec::new());
        };
        self.pooled()
            .fetch_all::<WebhookAttemptRow>(Stmt::new(sql::ORDER_WEBHOOK_ATTEMPTS).bind(id))
            .await?
            .into_iter()
            .map(WebhookAttemptRow::into_attempt)
            .collect()
    }

    async fn record_presence_batch_with_events(
        &self,
        batch: &[PresenceChange],
    ) -> Result<(), StorageError> {
        self.presence_with_events(batch).await
    }
}
