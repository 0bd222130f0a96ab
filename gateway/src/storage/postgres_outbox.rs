//! [`OutboxStorage`] for PostgreSQL: claims with `FOR UPDATE SKIP LOCKED`
//! (claimers on several nodes never share an event and never wait on each
//! other), attempts and their effect in one transaction, listings, replays,
//! and presence writes that emit machine events exactly once per flip.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use sqlx::postgres::PgRow;
use sqlx::Row;

use super::outbox::{
    Attempt, AttemptResult, ClaimRequest, ClaimedEvent, OutboxBacklog, OutboxEntry, OutboxStatus,
    OutboxStorage, PresenceChange, ReplayOutcome, WebhookAttempt,
};
use super::postgres::{
    by_machine, get_machine_no, get_ms, get_opt_ms, get_u64, pg_error, to_i64, write_presence,
    write_presence_if_flip, PgStorage,
};
use super::sqlite::backend;
use super::StorageError;

/// Due, pending events that are first of their key among pending ones, each
/// merchant's oldest due first and at most $2 per merchant, oldest due first
/// overall (the same selection as SQLite's). Read without locks: the lease
/// below takes the rows and re-checks that they are still due.
/// Events of a disabled merchant are held: never claimed, so never
/// attempted, until it is enabled again.
const CANDIDATES: &str = "\
SELECT seq, event_id, merchant_appid, order_key, type, body, attempts, created_at_ms, \
       pending_since_ms, notify_url, appsecret_enc FROM ( \
    SELECT o.seq, o.event_id, o.merchant_appid, o.order_key, o.type, o.body, o.attempts, \
           o.created_at_ms, COALESCE(o.pending_since_ms, o.created_at_ms) AS pending_since_ms, \
           o.next_attempt_at_ms, c.notify_url, c.appsecret_enc, \
           ROW_NUMBER() OVER (PARTITION BY o.merchant_appid \
                              ORDER BY o.next_attempt_at_ms, o.seq) AS rn \
    FROM outbox o JOIN merchants c ON c.appid = o.merchant_appid \
    WHERE o.status = 'pending' AND o.next_attempt_at_ms <= $1 \
      AND c.disabled_at_ms IS NULL \
      AND NOT EXISTS (SELECT 1 FROM outbox p \
                      WHERE p.order_key = o.order_key AND p.status = 'pending' AND p.seq < o.seq) \
) AS due WHERE rn <= $2 ORDER BY next_attempt_at_ms, seq LIMIT $3";

/// Lease the given events that are still due and not being leased by
/// another claimer right now (SKIP LOCKED: skipped, not waited for). A row
/// another claimer leased meanwhile is re-checked after its lock and is no
/// longer due.
const LEASE: &str = "\
UPDATE outbox SET next_attempt_at_ms = $1 WHERE seq IN ( \
    SELECT seq FROM outbox WHERE seq = ANY($2) AND status = 'pending' \
      AND next_attempt_at_ms <= $3 FOR UPDATE SKIP LOCKED) \
RETURNING seq";

const ENTRY_COLUMNS: &str = "event_id, type, status, attempts, last_error, created_at_ms, \
     next_attempt_at_ms, delivered_at_ms, order_id, machine_no";

fn attempts_of(row: &PgRow) -> Result<u32, StorageError> {
    let n: i64 = row.try_get("attempts").map_err(backend)?;
    u32::try_from(n).map_err(|_| StorageError::Corrupt("outbox.attempts".into()))
}

fn claimed(row: &PgRow) -> Result<ClaimedEvent, StorageError> {
    Ok(ClaimedEvent {
        event_id: row.try_get("event_id").map_err(backend)?,
        merchant_appid: row.try_get("merchant_appid").map_err(backend)?,
        order_key: row.try_get("order_key").map_err(backend)?,
        kind: row.try_get("type").map_err(backend)?,
        body: row.try_get("body").map_err(backend)?,
        attempts: attempts_of(row)?,
        created_at: get_ms(row, "created_at_ms")?,
        pending_since: get_ms(row, "pending_since_ms")?,
        notify_url: row.try_get("notify_url").map_err(backend)?,
        appsecret_enc: row.try_get("appsecret_enc").map_err(backend)?,
    })
}

fn entry(row: &PgRow) -> Result<OutboxEntry, StorageError> {
    let status: String = row.try_get("status").map_err(backend)?;
    let status = OutboxStatus::parse(&status)
        .ok_or_else(|| StorageError::Corrupt(format!("outbox status {status:?}")))?;
    let machine_no: Option<String> = row.try_get("machine_no").map_err(backend)?;
    Ok(OutboxEntry {
        event_id: row.try_get("event_id").map_err(backend)?,
        kind: row.try_get("type").map_err(backend)?,
        status,
        attempts: attempts_of(row)?,
        last_error: row.try_get("last_error").map_err(backend)?,
        created_at: get_ms(row, "created_at_ms")?,
        // A delivered or dead event has no next attempt, whatever the column
        // still holds.
        next_attempt_at: if status == OutboxStatus::Pending {
            get_opt_ms(row, "next_attempt_at_ms")?
        } else {
            None
        },
        delivered_at: get_opt_ms(row, "delivered_at_ms")?,
        order_id: row
            .try_get::<Option<i64>, _>("order_id")
            .map_err(backend)?
            .map(|id| {
                u64::try_from(id).map_err(|_| StorageError::Corrupt("outbox.order_id".into()))
            })
            .transpose()?,
        machine_no: match machine_no {
            Some(_) => Some(get_machine_no(row, "machine_no")?),
            None => None,
        },
    })
}

#[async_trait::async_trait]
impl OutboxStorage for PgStorage {
    async fn claim_outbox(
        &self,
        req: &ClaimRequest<'_>,
    ) -> Result<Vec<ClaimedEvent>, StorageError> {
        if req.limit == 0 || req.per_merchant == 0 {
            return Ok(Vec::new());
        }
        let now = req.now.timestamp_millis();
        // Each merchant contributes at most `per_merchant` rows, of which at
        // most its in-flight count are skipped below; reading that many more
        // than `limit` still fills the batch when enough is due.
        let skipped_at_most: usize = req.in_flight.values().sum();
        let scan = req.limit.saturating_add(skipped_at_most);
        let rows = sqlx::query(CANDIDATES)
            .bind(now)
            .bind(to_i64(req.per_merchant, "per_merchant")?)
            .bind(to_i64(scan, "claim limit")?)
            .fetch_all(self.pool())
            .await
            .map_err(pg_error)?;
        let mut candidates = Vec::with_capacity(rows.len());
        for row in &rows {
            let seq: i64 = row.try_get("seq").map_err(backend)?;
            candidates.push((seq, claimed(row)?));
        }
        // Waves: pick what the caps allow from the candidates in order, lease
        // the wave, and for the events another claimer got first, go on
        // picking from where the wave stopped.
        let mut taken: HashMap<String, usize> = HashMap::new();
        let mut out = Vec::new();
        let mut rest = candidates.into_iter().peekable();
        while out.len() < req.limit && rest.peek().is_some() {
            let mut wave = Vec::new();
            while out.len() + wave.len() < req.limit {
                let Some((seq, ev)) = rest.next() else {
                    break;
                };
                let busy = req.in_flight.get(&ev.merchant_appid).copied().unwrap_or(0);
                let n = taken.entry(ev.merchant_appid.clone()).or_default();
                if busy + *n >= req.per_merchant {
                    continue;
                }
                *n += 1;
                wave.push((seq, ev));
            }
            if wave.is_empty() {
                break;
            }
            let seqs: Vec<i64> = wave.iter().map(|(s, _)| *s).collect();
            let leased: Vec<i64> = sqlx::query_scalar(LEASE)
                .bind(req.lease_until.timestamp_millis())
                .bind(&seqs)
                .bind(now)
                .fetch_all(self.pool())
                .await
                .map_err(pg_error)?;
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

    async fn record_attempt(&self, a: &Attempt) -> Result<(), StorageError> {
        let at = a.at.timestamp_millis();
        let mut tx = self.pool().begin().await.map_err(pg_error)?;
        sqlx::query(
            "INSERT INTO outbox_attempts (event_id, at_ms, http_status, error) \
             VALUES ($1, $2, $3, $4)",
        )
        .bind(&a.event_id)
        .bind(at)
        .bind(a.http_status.map(i32::from))
        .bind(&a.error)
        .execute(&mut *tx)
        .await
        .map_err(pg_error)?;
        let (status, next_ms, delivered_ms) = match a.result {
            AttemptResult::Delivered => (OutboxStatus::Delivered, at, Some(at)),
            AttemptResult::RetryAt(t) => (OutboxStatus::Pending, t.timestamp_millis(), None),
            AttemptResult::Dead => (OutboxStatus::Dead, at, None),
        };
        sqlx::query(
            "UPDATE outbox SET attempts = attempts + 1, status = $1, next_attempt_at_ms = $2, \
             delivered_at_ms = $3, last_error = $4 WHERE event_id = $5 AND status = 'pending'",
        )
        .bind(status.as_str())
        .bind(next_ms)
        .bind(delivered_ms)
        .bind(&a.error)
        .bind(&a.event_id)
        .execute(&mut *tx)
        .await
        .map_err(pg_error)?;
        tx.commit().await.map_err(pg_error)
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
        // `$2::text IS NULL OR …` would keep PostgreSQL from using
        // outbox_by_merchant for the status filter: two statements each.
        let (total, rows) = match status {
            Some(st) => {
                let total = sqlx::query(
                    "SELECT COUNT(*) AS n FROM outbox WHERE merchant_appid = $1 AND status = $2",
                )
                .bind(merchant)
                .bind(st.as_str())
                .fetch_one(self.pool())
                .await
                .map_err(pg_error)?;
                let rows = sqlx::query(&format!(
                    "SELECT {ENTRY_COLUMNS} FROM outbox WHERE merchant_appid = $1 AND status = $2 \
                     ORDER BY seq LIMIT $3 OFFSET $4"
                ))
                .bind(merchant)
                .bind(st.as_str())
                .bind(limit)
                .bind(offset)
                .fetch_all(self.pool())
                .await
                .map_err(pg_error)?;
                (total, rows)
            }
            None => {
                let total =
                    sqlx::query("SELECT COUNT(*) AS n FROM outbox WHERE merchant_appid = $1")
                        .bind(merchant)
                        .fetch_one(self.pool())
                        .await
                        .map_err(pg_error)?;
                let rows = sqlx::query(&format!(
                    "SELECT {ENTRY_COLUMNS} FROM outbox WHERE merchant_appid = $1 \
                     ORDER BY seq LIMIT $2 OFFSET $3"
                ))
                .bind(merchant)
                .bind(limit)
                .bind(offset)
                .fetch_all(self.pool())
                .await
                .map_err(pg_error)?;
                (total, rows)
            }
        };
        let entries = rows.iter().map(entry).collect::<Result<Vec<_>, _>>()?;
        Ok((entries, get_u64(&total, "n")?))
    }

    async fn replay_outbox(
        &self,
        merchant: &str,
        event_id: &str,
        now: DateTime<Utc>,
    ) -> Result<ReplayOutcome, StorageError> {
        let now = now.timestamp_millis();
        let done = sqlx::query(
            "UPDATE outbox SET status = 'pending', attempts = 0, last_error = NULL, \
             next_attempt_at_ms = $1, pending_since_ms = $1 \
             WHERE event_id = $2 AND merchant_appid = $3 AND status = 'dead'",
        )
        .bind(now)
        .bind(event_id)
        .bind(merchant)
        .execute(self.pool())
        .await
        .map_err(pg_error)?;
        if done.rows_affected() == 1 {
            return Ok(ReplayOutcome::Replayed);
        }
        // Another merchant's event answers exactly like an absent one.
        let exists: Option<i32> =
            sqlx::query_scalar("SELECT 1 FROM outbox WHERE event_id = $1 AND merchant_appid = $2")
                .bind(event_id)
                .bind(merchant)
                .fetch_optional(self.pool())
                .await
                .map_err(pg_error)?;
        Ok(if exists.is_some() {
            ReplayOutcome::NotDead
        } else {
            ReplayOutcome::NotFound
        })
    }

    async fn outbox_backlog(&self) -> Result<OutboxBacklog, StorageError> {
        let row = sqlx::query(
            "SELECT COUNT(*) AS n, MIN(created_at_ms) AS oldest FROM outbox \
             WHERE status = 'pending'",
        )
        .fetch_one(self.pool())
        .await
        .map_err(pg_error)?;
        Ok(OutboxBacklog {
            pending: get_u64(&row, "n")?,
            oldest_pending: get_opt_ms(&row, "oldest")?,
        })
    }

    async fn order_webhook_attempts(
        &self,
        order_id: u64,
    ) -> Result<Vec<WebhookAttempt>, StorageError> {
        let Ok(id) = i64::try_from(order_id) else {
            return Ok(Vec::new());
        };
        let rows = sqlx::query(
            "SELECT a.event_id, o.type, a.at_ms, a.http_status, a.error \
             FROM outbox o JOIN outbox_attempts a ON a.event_id = o.event_id \
             WHERE o.order_id = $1 ORDER BY a.id",
        )
        .bind(id)
        .fetch_all(self.pool())
        .await
        .map_err(pg_error)?;
        rows.iter()
            .map(|r| {
                let status: Option<i32> = r.try_get("http_status").map_err(backend)?;
                Ok(WebhookAttempt {
                    event_id: r.try_get("event_id").map_err(backend)?,
                    kind: r.try_get("type").map_err(backend)?,
                    at: get_ms(r, "at_ms")?,
                    http_status: status
                        .map(|s| {
                            u16::try_from(s).map_err(|_| {
                                StorageError::Corrupt("outbox_attempts.http_status".into())
                            })
                        })
                        .transpose()?,
                    error: r.try_get("error").map_err(backend)?,
                })
            })
            .collect()
    }

    async fn record_presence_batch_with_events(
        &self,
        batch: &[PresenceChange],
    ) -> Result<(), StorageError> {
        let mut tx = self.pool().begin().await.map_err(pg_error)?;
        // Machine order: the lock order (see `by_machine`).
        for c in by_machine(batch, |c| &c.write.machine_no) {
            let w = &c.write;
            let Some(ev) = &c.event else {
                write_presence(&mut tx, w).await?;
                continue;
            };
            // The flip and its detection are one statement, so of two nodes
            // writing the same offline only one sees the flip and writes the
            // event. When it does not flip (same flag, or stale), the plain
            // write still applies its epoch rule (last_seen, a take-over).
            let Some(merchant) = write_presence_if_flip(&mut tx, w).await? else {
                write_presence(&mut tx, w).await?;
                continue;
            };
            // After the machine row's UPDATE, under its lock: events of one
            // machine get their seq in commit order.
            sqlx::query(
                "INSERT INTO outbox (event_id, merchant_appid, order_key, machine_no, type, \
                 body, created_at_ms, next_attempt_at_ms) \
                 SELECT $1, c.appid, 'machine:' || $2, $2, $3, $4, $5, $5 \
                 FROM merchants c WHERE c.appid = $6 AND c.notify_url IS NOT NULL",
            )
            .bind(&ev.event_id)
            .bind(w.machine_no.as_str())
            .bind(&ev.kind)
            .bind(&ev.body)
            .bind(ev.created_at.timestamp_millis())
            .bind(&merchant)
            .execute(&mut *tx)
            .await
            .map_err(pg_error)?;
        }
        tx.commit().await.map_err(pg_error)
    }
}
