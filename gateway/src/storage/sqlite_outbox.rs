//! [`OutboxStorage`] for SQLite: claims under the write lock, attempts and
//! their effect in one transaction, listings, replays, and presence writes
//! that emit machine events.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use sqlx::sqlite::SqliteRow;
use sqlx::Row;
use vendgate_proto::machine::MachineNo;

use super::outbox::{
    Attempt, AttemptResult, ClaimRequest, ClaimedEvent, OutboxBacklog, OutboxEntry, OutboxStatus,
    OutboxStorage, PresenceChange, ReplayOutcome, WebhookAttempt,
};
use super::sqlite::{backend, from_ms, presence_epoch, write_presence, SqliteStorage};
use super::StorageError;

/// Due, pending events that are first of their key among pending ones, each
/// merchant's oldest due first and at most ?2 per merchant, oldest due first
/// overall. The NOT EXISTS probe uses `outbox_by_key`; the due filter
/// `outbox_due`.
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
    WHERE o.status = 'pending' AND o.next_attempt_at_ms <= ?1 \
      AND c.disabled_at_ms IS NULL \
      AND NOT EXISTS (SELECT 1 FROM outbox p \
                      WHERE p.order_key = o.order_key AND p.status = 'pending' AND p.seq < o.seq) \
) WHERE rn <= ?2 ORDER BY next_attempt_at_ms, seq LIMIT ?3";

const ENTRY_COLUMNS: &str = "event_id, type, status, attempts, last_error, created_at_ms, \
     next_attempt_at_ms, delivered_at_ms, order_id, machine_no";

fn to_i64(n: impl TryInto<i64>, what: &str) -> Result<i64, StorageError> {
    n.try_into()
        .map_err(|_| StorageError::Corrupt(format!("{what} out of range")))
}

fn attempts_of(row: &SqliteRow) -> Result<u32, StorageError> {
    let n: i64 = row.try_get("attempts").map_err(backend)?;
    u32::try_from(n).map_err(|_| StorageError::Corrupt("outbox.attempts".into()))
}

fn claimed(row: &SqliteRow) -> Result<ClaimedEvent, StorageError> {
    Ok(ClaimedEvent {
        event_id: row.try_get("event_id").map_err(backend)?,
        merchant_appid: row.try_get("merchant_appid").map_err(backend)?,
        order_key: row.try_get("order_key").map_err(backend)?,
        kind: row.try_get("type").map_err(backend)?,
        body: row.try_get("body").map_err(backend)?,
        attempts: attempts_of(row)?,
        created_at: from_ms(
            row.try_get("created_at_ms").map_err(backend)?,
            "outbox.created_at_ms",
        )?,
        pending_since: from_ms(
            row.try_get("pending_since_ms").map_err(backend)?,
            "outbox.pending_since_ms",
        )?,
        notify_url: row.try_get("notify_url").map_err(backend)?,
        appsecret_enc: row.try_get("appsecret_enc").map_err(backend)?,
    })
}

fn entry(row: &SqliteRow) -> Result<OutboxEntry, StorageError> {
    let status: String = row.try_get("status").map_err(backend)?;
    let status = OutboxStatus::parse(&status)
        .ok_or_else(|| StorageError::Corrupt(format!("outbox status {status:?}")))?;
    let ms = |c: &str| -> Result<Option<DateTime<Utc>>, StorageError> {
        let v: Option<i64> = row.try_get(c).map_err(backend)?;
        v.map(|v| from_ms(v, c)).transpose()
    };
    let order_id: Option<i64> = row.try_get("order_id").map_err(backend)?;
    let machine_no: Option<String> = row.try_get("machine_no").map_err(backend)?;
    Ok(OutboxEntry {
        event_id: row.try_get("event_id").map_err(backend)?,
        kind: row.try_get("type").map_err(backend)?,
        status,
        attempts: attempts_of(row)?,
        last_error: row.try_get("last_error").map_err(backend)?,
        created_at: from_ms(
            row.try_get("created_at_ms").map_err(backend)?,
            "outbox.created_at_ms",
        )?,
        // A delivered or dead event has no next attempt, whatever the
        // column still holds.
        next_attempt_at: if status == OutboxStatus::Pending {
            ms("next_attempt_at_ms")?
        } else {
            None
        },
        delivered_at: ms("delivered_at_ms")?,
        order_id: order_id
            .map(|id| {
                u64::try_from(id).map_err(|_| StorageError::Corrupt("outbox.order_id".into()))
            })
            .transpose()?,
        machine_no: machine_no
            .map(|m| {
                m.parse::<MachineNo>()
                    .map_err(|_| StorageError::Corrupt("outbox.machine_no".into()))
            })
            .transpose()?,
    })
}

#[async_trait::async_trait]
impl OutboxStorage for SqliteStorage {
    async fn claim_outbox(
        &self,
        req: &ClaimRequest<'_>,
    ) -> Result<Vec<ClaimedEvent>, StorageError> {
        let now = req.now.timestamp_millis();
        // The idle case (every poll) is a read on the partial index, without
        // taking the write lock that order writes need.
        let due: Option<i64> = sqlx::query_scalar(
            "SELECT 1 FROM outbox o JOIN merchants c ON c.appid = o.merchant_appid \
             WHERE o.status = 'pending' AND o.next_attempt_at_ms <= ? \
             AND c.disabled_at_ms IS NULL LIMIT 1",
        )
        .bind(now)
        .fetch_optional(self.pool())
        .await
        .map_err(backend)?;
        if due.is_none() || req.limit == 0 || req.per_merchant == 0 {
            return Ok(Vec::new());
        }
        // Select and lease under one write lock: a second claimer (task or
        // process) waits, then finds these events no longer due.
        let mut tx = self
            .pool()
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(backend)?;
        // Each merchant contributes at most `per_merchant` rows, of which at
        // most its in-flight count are skipped below; reading that many more
        // than `limit` still fills the batch when enough is due.
        let skipped_at_most: usize = req.in_flight.values().sum();
        let scan = req.limit.saturating_add(skipped_at_most);
        let rows = sqlx::query(CANDIDATES)
            .bind(now)
            .bind(to_i64(req.per_merchant, "per_merchant")?)
            .bind(to_i64(scan, "claim limit")?)
            .fetch_all(&mut *tx)
            .await
            .map_err(backend)?;
        let mut taken: HashMap<String, usize> = HashMap::new();
        let mut out = Vec::new();
        for row in &rows {
            if out.len() >= req.limit {
                break;
            }
            let ev = claimed(row)?;
            let busy = req.in_flight.get(&ev.merchant_appid).copied().unwrap_or(0);
            let n = taken.entry(ev.merchant_appid.clone()).or_default();
            if busy + *n >= req.per_merchant {
                continue;
            }
            let seq: i64 = row.try_get("seq").map_err(backend)?;
            let leased = sqlx::query(
                "UPDATE outbox SET next_attempt_at_ms = ? \
                 WHERE seq = ? AND status = 'pending' AND next_attempt_at_ms <= ?",
            )
            .bind(req.lease_until.timestamp_millis())
            .bind(seq)
            .bind(now)
            .execute(&mut *tx)
            .await
            .map_err(backend)?;
            if leased.rows_affected() == 1 {
                *n += 1;
                out.push(ev);
            }
        }
        tx.commit().await.map_err(backend)?;
        Ok(out)
    }

    async fn record_attempt(&self, a: &Attempt) -> Result<(), StorageError> {
        let at = a.at.timestamp_millis();
        let mut tx = self.pool().begin().await.map_err(backend)?;
        sqlx::query(
            "INSERT INTO outbox_attempts (event_id, at_ms, http_status, error) VALUES (?, ?, ?, ?)",
        )
        .bind(&a.event_id)
        .bind(at)
        .bind(a.http_status.map(i64::from))
        .bind(&a.error)
        .execute(&mut *tx)
        .await
        .map_err(backend)?;
        let (status, next_ms, delivered_ms) = match a.result {
            AttemptResult::Delivered => (OutboxStatus::Delivered, at, Some(at)),
            AttemptResult::RetryAt(t) => (OutboxStatus::Pending, t.timestamp_millis(), None),
            AttemptResult::Dead => (OutboxStatus::Dead, at, None),
        };
        sqlx::query(
            "UPDATE outbox SET attempts = attempts + 1, status = ?, next_attempt_at_ms = ?, \
             delivered_at_ms = ?, last_error = ? WHERE event_id = ? AND status = 'pending'",
        )
        .bind(status.as_str())
        .bind(next_ms)
        .bind(delivered_ms)
        .bind(&a.error)
        .bind(&a.event_id)
        .execute(&mut *tx)
        .await
        .map_err(backend)?;
        tx.commit().await.map_err(backend)
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
        // Two statements each, rather than `? IS NULL OR status = ?`, so the
        // status filter can use outbox_by_merchant (merchant, status, seq).
        let (total, rows) = match status {
            Some(st) => {
                let total: i64 = sqlx::query_scalar(
                    "SELECT COUNT(*) FROM outbox WHERE merchant_appid = ? AND status = ?",
                )
                .bind(merchant)
                .bind(st.as_str())
                .fetch_one(self.pool())
                .await
                .map_err(backend)?;
                let rows = sqlx::query(&format!(
                    "SELECT {ENTRY_COLUMNS} FROM outbox WHERE merchant_appid = ? AND status = ? \
                     ORDER BY seq LIMIT ? OFFSET ?"
                ))
                .bind(merchant)
                .bind(st.as_str())
                .bind(limit)
                .bind(offset)
                .fetch_all(self.pool())
                .await
                .map_err(backend)?;
                (total, rows)
            }
            None => {
                let total: i64 =
                    sqlx::query_scalar("SELECT COUNT(*) FROM outbox WHERE merchant_appid = ?")
                        .bind(merchant)
                        .fetch_one(self.pool())
                        .await
                        .map_err(backend)?;
                let rows = sqlx::query(&format!(
                    "SELECT {ENTRY_COLUMNS} FROM outbox WHERE merchant_appid = ? \
                     ORDER BY seq LIMIT ? OFFSET ?"
                ))
                .bind(merchant)
                .bind(limit)
                .bind(offset)
                .fetch_all(self.pool())
                .await
                .map_err(backend)?;
                (total, rows)
            }
        };
        let entries = rows.iter().map(entry).collect::<Result<Vec<_>, _>>()?;
        let total = u64::try_from(total).map_err(|_| StorageError::Corrupt("count".into()))?;
        Ok((entries, total))
    }

    async fn replay_outbox(
        &self,
        merchant: &str,
        event_id: &str,
        now: DateTime<Utc>,
    ) -> Result<ReplayOutcome, StorageError> {
        let now = now.timestamp_millis();
        let mut tx = self.pool().begin().await.map_err(backend)?;
        let done = sqlx::query(
            "UPDATE outbox SET status = 'pending', attempts = 0, last_error = NULL, \
             next_attempt_at_ms = ?1, pending_since_ms = ?1 \
             WHERE event_id = ?2 AND merchant_appid = ?3 AND status = 'dead'",
        )
        .bind(now)
        .bind(event_id)
        .bind(merchant)
        .execute(&mut *tx)
        .await
        .map_err(backend)?;
        if done.rows_affected() == 1 {
            tx.commit().await.map_err(backend)?;
            return Ok(ReplayOutcome::Replayed);
        }
        // Another merchant's event answers exactly like an absent one.
        let exists: Option<i64> =
            sqlx::query_scalar("SELECT 1 FROM outbox WHERE event_id = ? AND merchant_appid = ?")
                .bind(event_id)
                .bind(merchant)
                .fetch_optional(&mut *tx)
                .await
                .map_err(backend)?;
        tx.rollback().await.map_err(backend)?;
        Ok(if exists.is_some() {
            ReplayOutcome::NotDead
        } else {
            ReplayOutcome::NotFound
        })
    }

    async fn outbox_backlog(&self) -> Result<OutboxBacklog, StorageError> {
        let row = sqlx::query(
            "SELECT COUNT(*) AS n, MIN(created_at_ms) AS oldest FROM outbox WHERE status = 'pending'",
        )
        .fetch_one(self.pool())
        .await
        .map_err(backend)?;
        let n: i64 = row.try_get("n").map_err(backend)?;
        let oldest: Option<i64> = row.try_get("oldest").map_err(backend)?;
        Ok(OutboxBacklog {
            pending: u64::try_from(n).map_err(|_| StorageError::Corrupt("count".into()))?,
            oldest_pending: oldest
                .map(|t| from_ms(t, "outbox.created_at_ms"))
                .transpose()?,
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
             WHERE o.order_id = ? ORDER BY a.id",
        )
        .bind(id)
        .fetch_all(self.pool())
        .await
        .map_err(backend)?;
        rows.iter()
            .map(|r| {
                let status: Option<i64> = r.try_get("http_status").map_err(backend)?;
                Ok(WebhookAttempt {
                    event_id: r.try_get("event_id").map_err(backend)?,
                    kind: r.try_get("type").map_err(backend)?,
                    at: from_ms(
                        r.try_get("at_ms").map_err(backend)?,
                        "outbox_attempts.at_ms",
                    )?,
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
        // IMMEDIATE: each event's condition reads the row its write then
        // changes; holding the write lock from the start means no other
        // writer can change it in between (and no snapshot upgrade fails).
        let mut tx = self
            .pool()
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(backend)?;
        for c in batch {
            let w = &c.write;
            if let Some(ev) = &c.event {
                // Before the write, against the row as it is: the write will
                // apply (epoch rule) and flip `online`, and the merchant
                // wants notifications.
                sqlx::query(
                    "INSERT INTO outbox (event_id, merchant_appid, order_key, machine_no, type, \
                     body, created_at_ms, next_attempt_at_ms) \
                     SELECT ?1, m.merchant_appid, 'machine:' || m.machine_no, m.machine_no, ?2, \
                            ?3, ?4, ?4 \
                     FROM machines m JOIN merchants c ON c.appid = m.merchant_appid \
                     WHERE m.machine_no = ?5 AND m.presence_epoch <= ?6 AND m.online <> ?7 \
                       AND c.notify_url IS NOT NULL",
                )
                .bind(&ev.event_id)
                .bind(&ev.kind)
                .bind(&ev.body)
                .bind(ev.created_at.timestamp_millis())
                .bind(w.machine_no.as_str())
                .bind(presence_epoch(w)?)
                .bind(i64::from(w.online))
                .execute(&mut *tx)
                .await
                .map_err(backend)?;
            }
            write_presence(&mut tx, w).await?;
        }
        tx.commit().await.map_err(backend)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use chrono::TimeZone;
    use vendgate_proto::machine::MachineNo;

    use super::*;
    use crate::secrets::SecretHash;
    use crate::storage::{
        open_sqlite, MachineEvent, NewMachine, NewMerchant, NewOutboxEvent, PresenceWrite, Storage,
    };

    fn t(ms: i64) -> DateTime<Utc> {
        Utc.timestamp_millis_opt(ms).single().unwrap()
    }

    async fn open() -> (tempfile::TempDir, Arc<dyn Storage>) {
        let dir = tempfile::tempdir().unwrap();
        let store = open_sqlite(&dir.path().join("o.db")).await.unwrap();
        (dir, store)
    }

    async fn merchant(store: &dyn Storage, appid: &str, url: Option<&str>) {
        store
            .create_merchant(NewMerchant {
                name: appid.into(),
                notify_url: url.map(Into::into),
                appid: appid.into(),
                appsecret_hash: SecretHash::new("s"),
                appsecret_enc: Some(format!("enc-{appid}")),
            })
            .await
            .unwrap();
    }

    /// Writes an order event straight into the outbox (as update_order does).
    async fn put(s: &SqliteStorage, id: &str, appid: &str, key: &str, created: i64) {
        let mut tx = s.pool().begin().await.unwrap();
        super::super::sqlite_orders::insert_outbox(
            &mut tx,
            &NewOutboxEvent {
                event_id: id.into(),
                merchant_appid: appid.into(),
                order_key: key.into(),
                order_id: None,
                machine_no: None,
                kind: "order.completed".into(),
                body: format!(r#"{{"event_id":"{id}"}}"#),
                created_at: t(created),
            },
        )
        .await
        .unwrap();
        tx.commit().await.unwrap();
    }

    async fn sqlite() -> (tempfile::TempDir, SqliteStorage) {
        let dir = tempfile::tempdir().unwrap();
        let s = SqliteStorage::open(&dir.path().join("o.db")).await.unwrap();
        (dir, s)
    }

    fn ids(v: &[ClaimedEvent]) -> Vec<&str> {
        v.iter().map(|e| e.event_id.as_str()).collect()
    }

    async fn claim(
        s: &SqliteStorage,
        now: i64,
        limit: usize,
        per_merchant: usize,
        in_flight: &HashMap<String, usize>,
    ) -> Vec<ClaimedEvent> {
        s.claim_outbox(&ClaimRequest {
            now: t(now),
            lease_until: t(now + 60_000),
            limit,
            per_merchant,
            in_flight,
        })
        .await
        .unwrap()
    }

    fn attempt(id: &str, at: i64, result: AttemptResult) -> Attempt {
        Attempt {
            event_id: id.into(),
            at: t(at),
            http_status: Some(500),
            error: Some("HTTP 500".into()),
            result,
        }
    }

    #[tokio::test]
    async fn claims_respect_key_order_due_time_and_leases() {
        let (_d, s) = sqlite().await;
        merchant(&s, "vga", Some("http://a.example/")).await;
        put(&s, "e1", "vga", "order:1", 1_000).await;
        put(&s, "e2", "vga", "order:1", 1_001).await;
        put(&s, "e3", "vga", "order:2", 1_002).await;
        put(&s, "late", "vga", "order:3", 9_000).await;
        let none = HashMap::new();

        // Nothing is due before its time.
        assert!(claim(&s, 999, 10, 10, &none).await.is_empty());
        // e2 waits behind e1 (same key); `late` is not due yet.
        let got = claim(&s, 2_000, 10, 10, &none).await;
        assert_eq!(ids(&got), ["e1", "e3"]);
        assert_eq!(got[0].notify_url.as_deref(), Some("http://a.example/"));
        assert_eq!(got[0].appsecret_enc.as_deref(), Some("enc-vga"));
        assert_eq!(got[0].pending_since, t(1_000));
        // Leased: nobody gets them again, and e2 still waits behind e1.
        assert!(claim(&s, 2_001, 10, 10, &none).await.is_empty());

        // e1 fails and is retried later: e2 still waits (e1 is pending).
        s.record_attempt(&attempt("e1", 2_100, AttemptResult::RetryAt(t(5_000))))
            .await
            .unwrap();
        assert!(claim(&s, 4_999, 10, 10, &none).await.is_empty());
        let got = claim(&s, 5_000, 10, 10, &none).await;
        assert_eq!(ids(&got), ["e1"]);
        assert_eq!(got[0].attempts, 1);
        // Delivered: e2 is next of its key.
        s.record_attempt(&Attempt {
            http_status: Some(200),
            error: None,
            ..attempt("e1", 5_100, AttemptResult::Delivered)
        })
        .await
        .unwrap();
        assert_eq!(ids(&claim(&s, 5_200, 10, 10, &none).await), ["e2"]);
        // A lease that runs out (the claimer died) makes e3 due again;
        // `late` has been due for longer, so it goes first.
        assert_eq!(ids(&claim(&s, 62_003, 10, 10, &none).await), ["late", "e3"]);
    }

    #[tokio::test]
    async fn dead_events_do_not_block_their_key_and_replay_restores_order() {
        let (_d, s) = sqlite().await;
        merchant(&s, "vga", Some("http://a.example/")).await;
        merchant(&s, "vgb", Some("http://b.example/")).await;
        put(&s, "e1", "vga", "order:1", 1_000).await;
        put(&s, "e2", "vga", "order:1", 1_001).await;
        put(&s, "e3", "vga", "order:1", 1_002).await;
        let none = HashMap::new();
        assert_eq!(ids(&claim(&s, 2_000, 10, 10, &none).await), ["e1"]);
        s.record_attempt(&attempt("e1", 2_000, AttemptResult::Dead))
            .await
            .unwrap();
        // Dead does not block: e2 goes.
        assert_eq!(ids(&claim(&s, 2_001, 10, 10, &none).await), ["e2"]);

        // Replay: only a dead event, only by its merchant.
        assert_eq!(
            s.replay_outbox("vgb", "e1", t(3_000)).await.unwrap(),
            ReplayOutcome::NotFound
        );
        assert_eq!(
            s.replay_outbox("vga", "nope", t(3_000)).await.unwrap(),
            ReplayOutcome::NotFound
        );
        assert_eq!(
            s.replay_outbox("vga", "e2", t(3_000)).await.unwrap(),
            ReplayOutcome::NotDead
        );
        assert_eq!(
            s.replay_outbox("vga", "e1", t(3_000)).await.unwrap(),
            ReplayOutcome::Replayed
        );
        let (dead, total) = s
            .list_outbox("vga", Some(OutboxStatus::Dead), 0, 10)
            .await
            .unwrap();
        assert!(dead.is_empty() && total == 0);
        // e2's lease still runs: replayed e1 is due but earlier than e2,
        // which is pending — e1 is the head again. e3 waits behind both.
        let got = claim(&s, 3_000, 10, 10, &none).await;
        assert_eq!(ids(&got), ["e1"]);
        assert_eq!(got[0].attempts, 0, "attempts reset");
        assert_eq!(got[0].pending_since, t(3_000), "fresh retry budget");
    }

    #[tokio::test]
    async fn one_merchants_backlog_does_not_fill_the_batch() {
        let (_d, s) = sqlite().await;
        merchant(&s, "vga", Some("http://a.example/")).await;
        merchant(&s, "vgb", Some("http://b.example/")).await;
        for i in 0..20 {
            put(
                &s,
                &format!("a{i:02}"),
                "vga",
                &format!("order:{i}"),
                1_000 + i,
            )
            .await;
        }
        put(&s, "b0", "vgb", "order:100", 1_500).await;
        let none = HashMap::new();
        // The per-merchant cap leaves room for vgb even though vga's events
        // are older.
        let got = claim(&s, 2_000, 5, 2, &none).await;
        assert_eq!(ids(&got), ["a00", "a01", "b0"]);
        // vga has 2 in flight: at cap, nothing more for it.
        let busy = HashMap::from([("vga".to_string(), 2)]);
        assert!(claim(&s, 2_000, 5, 2, &busy).await.is_empty());
        // One slot free.
        let busy = HashMap::from([("vga".to_string(), 1)]);
        assert_eq!(ids(&claim(&s, 2_000, 5, 2, &busy).await), ["a02"]);
    }

    #[tokio::test]
    async fn concurrent_claimers_never_share_an_event() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("o.db");
        let a = Arc::new(SqliteStorage::open(&path).await.unwrap());
        let b = Arc::new(SqliteStorage::open(&path).await.unwrap());
        merchant(a.as_ref(), "vga", Some("http://a.example/")).await;
        for i in 0..200 {
            put(&a, &format!("e{i:03}"), "vga", &format!("order:{i}"), 1_000).await;
        }
        let run = |s: Arc<SqliteStorage>| {
            tokio::spawn(async move {
                let mut got = Vec::new();
                for _ in 0..50 {
                    let none = HashMap::new();
                    let batch = claim(&s, 2_000, 7, 1_000, &none).await;
                    got.extend(batch.into_iter().map(|e| e.event_id));
                }
                got
            })
        };
        let (x, y) = tokio::join!(run(a.clone()), run(b.clone()));
        let mut all = x.unwrap();
        all.extend(y.unwrap());
        let n = all.len();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), n, "an event was claimed twice");
        assert_eq!(n, 200);
    }

    #[tokio::test]
    async fn attempts_listing_backlog_and_order_timeline() {
        let (_d, s) = sqlite().await;
        merchant(&s, "vga", Some("http://a.example/")).await;
        merchant(&s, "vgb", Some("http://b.example/")).await;
        assert_eq!(s.outbox_backlog().await.unwrap(), OutboxBacklog::default());
        let mut tx = s.pool().begin().await.unwrap();
        super::super::sqlite_orders::insert_outbox(
            &mut tx,
            &NewOutboxEvent {
                event_id: "o1".into(),
                merchant_appid: "vga".into(),
                order_key: "order:77".into(),
                order_id: Some(77),
                machine_no: Some("00000007".parse().unwrap()),
                kind: "order.unknown".into(),
                body: "{}".into(),
                created_at: t(1_000),
            },
        )
        .await
        .unwrap();
        tx.commit().await.unwrap();
        put(&s, "o2", "vga", "order:78", 2_000).await;
        put(&s, "b1", "vgb", "order:79", 500).await;

        let b = s.outbox_backlog().await.unwrap();
        assert_eq!((b.pending, b.oldest_pending), (3, Some(t(500))));

        s.record_attempt(&attempt("o1", 1_100, AttemptResult::RetryAt(t(1_500))))
            .await
            .unwrap();
        s.record_attempt(&Attempt {
            event_id: "o1".into(),
            at: t(1_600),
            http_status: None,
            error: None,
            result: AttemptResult::Delivered,
        })
        .await
        .unwrap();
        // Recording on a delivered event changes nothing but the history.
        s.record_attempt(&attempt("o1", 1_700, AttemptResult::Dead))
            .await
            .unwrap();
        s.record_attempt(&attempt("o2", 2_100, AttemptResult::Dead))
            .await
            .unwrap();

        let timeline = s.order_webhook_attempts(77).await.unwrap();
        assert_eq!(timeline.len(), 3);
        assert_eq!(timeline[0].kind, "order.unknown");
        assert_eq!(timeline[0].http_status, Some(500));
        assert_eq!(timeline[0].error.as_deref(), Some("HTTP 500"));
        assert_eq!(timeline[1].at, t(1_600));
        assert!(s.order_webhook_attempts(78).await.unwrap().is_empty());
        assert!(s.order_webhook_attempts(u64::MAX).await.unwrap().is_empty());

        let (all, total) = s.list_outbox("vga", None, 0, 10).await.unwrap();
        assert_eq!(total, 2);
        let o1 = &all[0];
        assert_eq!(o1.event_id, "o1");
        assert_eq!(o1.status, OutboxStatus::Delivered);
        assert_eq!(o1.attempts, 2);
        assert_eq!(o1.last_error, None);
        assert_eq!(o1.delivered_at, Some(t(1_600)));
        assert_eq!(o1.next_attempt_at, None);
        assert_eq!(o1.order_id, Some(77));
        assert_eq!(
            o1.machine_no.map(|m| m.to_string()).as_deref(),
            Some("00000007")
        );
        let o2 = &all[1];
        assert_eq!(
            (o2.status, o2.attempts, o2.last_error.as_deref()),
            (OutboxStatus::Dead, 1, Some("HTTP 500"))
        );
        // Filter and paging.
        let (dead, total) = s
            .list_outbox("vga", Some(OutboxStatus::Dead), 0, 10)
            .await
            .unwrap();
        assert_eq!((dead.len(), total), (1, 1));
        let (page2, total) = s.list_outbox("vga", None, 1, 1).await.unwrap();
        assert_eq!((page2[0].event_id.as_str(), total), ("o2", 2));
        let (pending, _) = s
            .list_outbox("vgb", Some(OutboxStatus::Pending), 0, 10)
            .await
            .unwrap();
        assert_eq!(pending[0].next_attempt_at, Some(t(500)));
        let b = s.outbox_backlog().await.unwrap();
        assert_eq!((b.pending, b.oldest_pending), (1, Some(t(500))));
    }

    fn change(m: &str, online: bool, epoch: u64, at: i64) -> PresenceChange {
        PresenceChange {
            write: PresenceWrite {
                machine_no: m.parse::<MachineNo>().unwrap(),
                online,
                epoch,
                at: t(at),
            },
            event: Some(MachineEvent {
                event_id: format!("{m}-{epoch}-{online}"),
                kind: if online {
                    "machine.online".into()
                } else {
                    "machine.offline".into()
                },
                body: "{}".into(),
                created_at: t(at),
            }),
        }
    }

    #[tokio::test]
    async fn presence_changes_emit_events_only_when_the_flag_flips() {
        let (_d, store) = open().await;
        merchant(store.as_ref(), "vga", Some("http://a.example/")).await;
        merchant(store.as_ref(), "vgq", None).await;
        for (m, owner) in [("00000001", "vga"), ("00000002", "vgq")] {
            store
                .create_machine(NewMachine {
                    machine_no: m.parse().unwrap(),
                    merchant_appid: owner.into(),
                    secret_hash: SecretHash::new("x"),
                })
                .await
                .unwrap();
        }
        store
            .record_presence_batch_with_events(&[
                change("00000001", true, 10, 1_000),
                // Take-over while online: no event.
                change("00000001", true, 11, 1_001),
                // The old connection's late close: stale, no event.
                change("00000001", false, 10, 1_002),
                change("00000001", false, 11, 1_003),
                // Already offline: no event.
                change("00000001", false, 11, 1_004),
                // A merchant without notify_url: never an event.
                change("00000002", true, 10, 1_005),
                // An unknown machine: nothing.
                change("99999999", true, 10, 1_006),
                PresenceChange {
                    event: None,
                    ..change("00000001", true, 12, 1_007)
                },
            ])
            .await
            .unwrap();
        let (events, _) = store.list_outbox("vga", None, 0, 10).await.unwrap();
        let kinds: Vec<(&str, &str)> = events
            .iter()
            .map(|e| (e.event_id.as_str(), e.kind.as_str()))
            .collect();
        assert_eq!(
            kinds,
            [
                ("00000001-10-true", "machine.online"),
                ("00000001-11-false", "machine.offline")
            ]
        );
        assert_eq!(
            events[0].machine_no.map(|m| m.to_string()).as_deref(),
            Some("00000001")
        );
        assert!(store
            .list_outbox("vgq", None, 0, 10)
            .await
            .unwrap()
            .0
            .is_empty());
        // The writes themselves applied as record_presence_batch would.
        let m = store
            .machine(&"00000001".parse().unwrap())
            .await
            .unwrap()
            .unwrap();
        assert!(m.online && m.last_seen == Some(t(1_007)));
        assert!(
            store
                .machine(&"00000002".parse().unwrap())
                .await
                .unwrap()
                .unwrap()
                .online
        );
        // Events of one machine share one ordering key.
        let none = HashMap::new();
        let s = store.clone();
        let got = s
            .claim_outbox(&ClaimRequest {
                now: t(10_000),
                lease_until: t(70_000),
                limit: 10,
                per_merchant: 10,
                in_flight: &none,
            })
            .await
            .unwrap();
        assert_eq!(ids(&got), ["00000001-10-true"]);
        assert_eq!(got[0].order_key, "machine:00000001");
    }
}
