//! Unit tests of the SQLite backend.

use std::sync::Arc;
use std::time::Instant;

use chrono::TimeZone;
use tempfile::TempDir;

use chrono::{DateTime, Utc};
use vendgate_proto::machine::MachineNo;

use super::*;
use crate::secrets::SecretHash;
use crate::storage::{open_sqlite, Merchant, NewMachine, NewMerchant, NewService, Storage};

async fn open() -> (TempDir, Arc<dyn Storage>) {
    let dir = tempfile::tempdir().unwrap();
    let store = open_sqlite(&dir.path().join("vendgate.db")).await.unwrap();
    (dir, store)
}

fn no(s: &str) -> MachineNo {
    s.parse().unwrap()
}

fn t(ms: i64) -> DateTime<Utc> {
    Utc.timestamp_millis_opt(ms).unwrap()
}

async fn merchant(store: &dyn Storage, appid: &str) -> Merchant {
    store
        .create_merchant(NewMerchant {
            name: format!("merchant {appid}"),
            notify_url: Some("https://hooks.example/n".into()),
            appid: appid.into(),
            appsecret_hash: SecretHash::new("appsecret"),
            appsecret_enc: Some(format!("enc-{appid}")),
        })
        .await
        .unwrap()
}

fn new_machine(m: &str, merchant: &str) -> NewMachine {
    NewMachine {
        machine_no: no(m),
        merchant_appid: merchant.into(),
        secret_hash: SecretHash::new(&format!("secret-{m}")),
    }
}

#[tokio::test]
async fn open_creates_parent_directories_and_reopens() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a/b/vendgate.db");
    let store = open_sqlite(&path).await.unwrap();
    merchant(store.as_ref(), "vgone").await;
    store.close().await;
    assert!(path.exists());
    // Reopening runs the migrations again as a no-op and keeps the data.
    let store = open_sqlite(&path).await.unwrap();
    assert!(store.merchant("vgone").await.unwrap().is_some());
}

#[tokio::test]
async fn connection_settings() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStorage::open(&dir.path().join("x.db")).await.unwrap();
    let mut conn = store.pool().acquire().await.unwrap();
    let mode: String = sqlx::query_scalar("PRAGMA journal_mode")
        .fetch_one(&mut *conn)
        .await
        .unwrap();
    assert_eq!(mode, "wal");
    let sync: i64 = sqlx::query_scalar("PRAGMA synchronous")
        .fetch_one(&mut *conn)
        .await
        .unwrap();
    assert_eq!(sync, 2, "FULL");
    let fk: i64 = sqlx::query_scalar("PRAGMA foreign_keys")
        .fetch_one(&mut *conn)
        .await
        .unwrap();
    assert_eq!(fk, 1);
    let busy: i64 = sqlx::query_scalar("PRAGMA busy_timeout")
        .fetch_one(&mut *conn)
        .await
        .unwrap();
    assert_eq!(busy, 5000);
}

#[tokio::test]
async fn merchant_round_trip() {
    let (_dir, store) = open().await;
    let created = merchant(store.as_ref(), "vgb").await;
    merchant(store.as_ref(), "vga").await;
    let read = store.merchant("vgb").await.unwrap().unwrap();
    assert_eq!(read.appid, "vgb");
    assert_eq!(read.name, "merchant vgb");
    assert_eq!(read.notify_url.as_deref(), Some("https://hooks.example/n"));
    assert_eq!(read.created_at, created.created_at);
    assert_eq!(
        read.appsecret_hash.as_str(),
        created.appsecret_hash.as_str()
    );
    assert!(read.appsecret_hash.verify("appsecret"));
    assert!(store.merchant("vgc").await.unwrap().is_none());
    let all: Vec<String> = store
        .list_merchants()
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.appid)
        .collect();
    assert_eq!(all, ["vga", "vgb"]);
    // No notify_url round-trips as None.
    store
        .create_merchant(NewMerchant {
            name: "n".into(),
            notify_url: None,
            appid: "vgn".into(),
            appsecret_hash: SecretHash::new("s"),
            appsecret_enc: None,
        })
        .await
        .unwrap();
    assert!(store
        .merchant("vgn")
        .await
        .unwrap()
        .unwrap()
        .notify_url
        .is_none());
}

#[tokio::test]
async fn duplicate_merchant() {
    let (_dir, store) = open().await;
    merchant(store.as_ref(), "vga").await;
    let err = store
        .create_merchant(NewMerchant {
            name: "again".into(),
            notify_url: None,
            appid: "vga".into(),
            appsecret_hash: SecretHash::new("x"),
            appsecret_enc: None,
        })
        .await
        .unwrap_err();
    assert!(
        matches!(err, StorageError::Duplicate("merchant")),
        "{err:?}"
    );
}

#[tokio::test]
async fn machine_round_trip_and_listing() {
    let (_dir, store) = open().await;
    merchant(store.as_ref(), "vga").await;
    merchant(store.as_ref(), "vgb").await;
    let created = store
        .create_machine(new_machine("00000002", "vga"))
        .await
        .unwrap();
    assert!(!created.online);
    store
        .create_machine(new_machine("00000001", "vgb"))
        .await
        .unwrap();
    store
        .create_machine(new_machine("00000010", "vga"))
        .await
        .unwrap();

    let read = store.machine(&no("00000002")).await.unwrap().unwrap();
    assert_eq!(read.machine_no, no("00000002"));
    assert_eq!(read.merchant_appid, "vga");
    assert!(read.secret_hash.verify("secret-00000002"));
    assert!(!read.online);
    assert!(read.last_seen.is_none() && read.online_since.is_none());
    assert_eq!(read.created_at, created.created_at);
    assert!(store.machine(&no("00000003")).await.unwrap().is_none());

    let all: Vec<String> = store
        .list_machines(None)
        .await
        .unwrap()
        .iter()
        .map(|m| m.machine_no.to_string())
        .collect();
    assert_eq!(all, ["00000001", "00000002", "00000010"]);
    let a: Vec<String> = store
        .list_machines(Some("vga"))
        .await
        .unwrap()
        .iter()
        .map(|m| m.machine_no.to_string())
        .collect();
    assert_eq!(a, ["00000002", "00000010"]);
    assert!(store.list_machines(Some("vgz")).await.unwrap().is_empty());
}

#[tokio::test]
async fn machine_errors() {
    let (_dir, store) = open().await;
    let err = store
        .create_machine(new_machine("00000001", "vgnope"))
        .await
        .unwrap_err();
    assert!(matches!(err, StorageError::UnknownMerchant), "{err:?}");

    merchant(store.as_ref(), "vga").await;
    merchant(store.as_ref(), "vgb").await;
    store
        .create_machine(new_machine("00000001", "vga"))
        .await
        .unwrap();
    // Taken, whichever merchant asks.
    for owner in ["vga", "vgb"] {
        let err = store
            .create_machine(new_machine("00000001", owner))
            .await
            .unwrap_err();
        assert!(matches!(err, StorageError::Duplicate("machine")), "{err:?}");
    }
}

#[tokio::test]
async fn bulk_insert_of_10000_in_one_transaction() {
    let (_dir, store) = open().await;
    merchant(store.as_ref(), "vga").await;
    let ms: Vec<NewMachine> = (1..=10_000)
        .map(|n| NewMachine {
            machine_no: MachineNo::from_u32(n).unwrap(),
            merchant_appid: "vga".into(),
            secret_hash: SecretHash::new(&crate::secrets::generate_secret()),
        })
        .collect();
    let started = Instant::now();
    store.create_machines(ms).await.unwrap();
    let took = started.elapsed();
    eprintln!("bulk insert of 10000 machines took {took:?}");
    assert!(took < Duration::from_secs(5), "{took:?}");
    let all = store.list_machines(Some("vga")).await.unwrap();
    assert_eq!(all.len(), 10_000);
    assert_eq!(all[0].machine_no.as_str(), "00000001");
    assert_eq!(all[9_999].machine_no.as_str(), "00010000");
}

#[tokio::test]
async fn bulk_insert_is_all_or_nothing() {
    let (_dir, store) = open().await;
    merchant(store.as_ref(), "vga").await;
    store
        .create_machine(new_machine("00000500", "vga"))
        .await
        .unwrap();

    // Clashes with a stored machine half-way through.
    let ms: Vec<NewMachine> = (1..=1000)
        .map(|n| new_machine(MachineNo::from_u32(n).unwrap().as_str(), "vga"))
        .collect();
    let err = store.create_machines(ms).await.unwrap_err();
    assert!(matches!(err, StorageError::Duplicate("machine")), "{err:?}");
    assert_eq!(store.list_machines(None).await.unwrap().len(), 1);

    // Repeats a number within the batch.
    let ms = vec![
        new_machine("00000001", "vga"),
        new_machine("00000002", "vga"),
        new_machine("00000001", "vga"),
    ];
    let err = store.create_machines(ms).await.unwrap_err();
    assert!(matches!(err, StorageError::Duplicate("machine")), "{err:?}");

    // Unknown merchant at the end.
    let ms = vec![
        new_machine("00000001", "vga"),
        new_machine("00000002", "vgnope"),
    ];
    let err = store.create_machines(ms).await.unwrap_err();
    assert!(matches!(err, StorageError::UnknownMerchant), "{err:?}");
    assert_eq!(store.list_machines(None).await.unwrap().len(), 1);

    // The pool is still usable after the rolled-back transactions.
    store
        .create_machines(vec![new_machine("00000001", "vga")])
        .await
        .unwrap();
    store.create_machines(Vec::new()).await.unwrap();
    assert_eq!(store.list_machines(None).await.unwrap().len(), 2);
}

#[tokio::test]
async fn service_round_trip_and_duplicate() {
    let (_dir, store) = open().await;
    let created = store
        .create_service(NewService {
            name: "billing".into(),
            username: "svc-abc".into(),
            password_hash: SecretHash::new("pw"),
        })
        .await
        .unwrap();
    let read = store.service("svc-abc").await.unwrap().unwrap();
    assert_eq!(read.username, "svc-abc");
    assert_eq!(read.name, "billing");
    assert_eq!(read.created_at, created.created_at);
    assert!(read.password_hash.verify("pw"));
    assert!(store.service("svc-nope").await.unwrap().is_none());
    let err = store
        .create_service(NewService {
            name: "other".into(),
            username: "svc-abc".into(),
            password_hash: SecretHash::new("pw2"),
        })
        .await
        .unwrap_err();
    assert!(matches!(err, StorageError::Duplicate("service")), "{err:?}");
}

#[tokio::test]
async fn record_presence_epoch_guard() {
    let (_dir, store) = open().await;
    merchant(store.as_ref(), "vga").await;
    store
        .create_machine(new_machine("00000001", "vga"))
        .await
        .unwrap();
    let m = no("00000001");
    let state = |s: &Arc<dyn Storage>| {
        let s = s.clone();
        async move {
            let r = s.machine(&no("00000001")).await.unwrap().unwrap();
            (r.online, r.online_since, r.last_seen)
        }
    };

    // Connection with epoch 10 comes online.
    store.record_presence(&m, true, 10, t(1_000)).await.unwrap();
    assert_eq!(state(&store).await, (true, Some(t(1_000)), Some(t(1_000))));

    // The same connection re-announced (resync): online_since is kept.
    store.record_presence(&m, true, 10, t(1_500)).await.unwrap();
    assert_eq!(state(&store).await, (true, Some(t(1_000)), Some(t(1_500))));

    // Take-over by epoch 11, then the late close of epoch 10: ignored.
    store.record_presence(&m, true, 11, t(2_000)).await.unwrap();
    store
        .record_presence(&m, false, 10, t(2_001))
        .await
        .unwrap();
    assert_eq!(state(&store).await, (true, Some(t(2_000)), Some(t(2_000))));

    // A stale online write is ignored too.
    store.record_presence(&m, true, 9, t(2_002)).await.unwrap();
    assert_eq!(state(&store).await, (true, Some(t(2_000)), Some(t(2_000))));

    // The current connection closes: offline wins.
    store
        .record_presence(&m, false, 11, t(3_000))
        .await
        .unwrap();
    assert_eq!(state(&store).await, (false, None, Some(t(3_000))));

    // A newer connection wins again.
    store.record_presence(&m, true, 12, t(4_000)).await.unwrap();
    assert_eq!(state(&store).await, (true, Some(t(4_000)), Some(t(4_000))));

    // An offline write with a newer epoch than stored also wins.
    store
        .record_presence(&m, false, 13, t(5_000))
        .await
        .unwrap();
    assert_eq!(state(&store).await, (false, None, Some(t(5_000))));

    // Unknown machines are ignored; epochs beyond i64 are refused.
    store
        .record_presence(&no("99999999"), true, 1, t(1))
        .await
        .unwrap();
    assert!(store.machine(&no("99999999")).await.unwrap().is_none());
    assert!(store
        .record_presence(&m, true, u64::MAX, t(1))
        .await
        .is_err());
}

#[tokio::test]
async fn reset_presence_marks_everything_offline_and_resets_epochs() {
    let (_dir, store) = open().await;
    merchant(store.as_ref(), "vga").await;
    for m in ["00000001", "00000002"] {
        store.create_machine(new_machine(m, "vga")).await.unwrap();
    }
    // Epochs of a process whose clock was ahead.
    store
        .record_presence(&no("00000001"), true, 1_000_000, t(1_000))
        .await
        .unwrap();
    store
        .record_presence(&no("00000002"), true, 2_000_000, t(2_000))
        .await
        .unwrap();

    store.reset_presence().await.unwrap();
    for m in store.list_machines(None).await.unwrap() {
        assert!(!m.online, "{}", m.machine_no);
        assert!(m.online_since.is_none());
        assert!(m.last_seen.is_some(), "last_seen is history, kept");
    }
    // The next process's epochs win even if smaller than the old ones.
    store
        .record_presence(&no("00000001"), true, 5, t(3_000))
        .await
        .unwrap();
    assert!(
        store
            .machine(&no("00000001"))
            .await
            .unwrap()
            .unwrap()
            .online
    );
}

#[tokio::test]
async fn ping_and_close() {
    let (_dir, store) = open().await;
    store.ping().await.unwrap();
    store.close().await;
    assert!(matches!(store.ping().await, Err(StorageError::Backend(_))));
}

#[tokio::test]
async fn two_pools_on_one_file_see_each_other() {
    // The running gateway and a CLI process, each with its own pool.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("shared.db");
    let (gateway, cli) = tokio::join!(open_sqlite(&path), open_sqlite(&path));
    let (gateway, cli) = (gateway.unwrap(), cli.unwrap());

    merchant(cli.as_ref(), "vga").await;
    cli.create_machine(new_machine("00000001", "vga"))
        .await
        .unwrap();
    let seen = gateway.machine(&no("00000001")).await.unwrap().unwrap();
    assert!(seen.secret_hash.verify("secret-00000001"));

    gateway
        .record_presence(&no("00000001"), true, 1, t(1_000))
        .await
        .unwrap();
    assert!(cli.machine(&no("00000001")).await.unwrap().unwrap().online);

    // Concurrent writers from both pools queue on the lock instead of failing.
    let a = {
        let s = gateway.clone();
        tokio::spawn(async move {
            for e in 2..200u64 {
                s.record_presence(&no("00000001"), e % 2 == 0, e, t(1_000 + e as i64))
                    .await
                    .unwrap();
            }
        })
    };
    let b = {
        let s = cli.clone();
        tokio::spawn(async move {
            let ms: Vec<NewMachine> = (100..1100)
                .map(|n| new_machine(MachineNo::from_u32(n).unwrap().as_str(), "vga"))
                .collect();
            s.create_machines(ms).await.unwrap();
            s.ping().await.unwrap();
        })
    };
    a.await.unwrap();
    b.await.unwrap();
    assert_eq!(gateway.list_machines(None).await.unwrap().len(), 1001);
    let m = cli.machine(&no("00000001")).await.unwrap().unwrap();
    assert!(!m.online, "epoch 199 (odd) was an offline write");
    assert_eq!(m.last_seen, Some(t(1_199)));
}

#[tokio::test]
async fn concurrent_first_opens_of_a_fresh_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fresh.db");
    let opens = (0..6).map(|_| {
        let path = path.clone();
        tokio::spawn(async move { SqliteStorage::open(&path).await })
    });
    for o in opens.collect::<Vec<_>>() {
        o.await.unwrap().unwrap();
    }
}

#[tokio::test]
async fn corrupt_rows_are_reported_not_panicked_on() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStorage::open(&dir.path().join("x.db")).await.unwrap();
    merchant(&store, "vga").await;
    store
        .create_machine(new_machine("00000001", "vga"))
        .await
        .unwrap();
    sqlx::query("UPDATE machines SET secret_hash = 'plaintext!'")
        .execute(store.pool())
        .await
        .unwrap();
    let err = store.machine(&no("00000001")).await.unwrap_err();
    match err {
        StorageError::Corrupt(msg) => {
            assert!(msg.contains("machines.secret_hash"), "{msg}");
            assert!(!msg.contains("plaintext!"), "{msg}");
        }
        e => panic!("{e:?}"),
    }
}

// ClusterStorage: tests/tests/storage_contract.rs, against both backends.

mod outbox {

    use std::sync::Arc;

    use chrono::TimeZone;
    use vendgate_proto::machine::MachineNo;

    use std::collections::HashMap;

    use chrono::{DateTime, Utc};

    use super::super::SqliteStorage;
    use crate::secrets::SecretHash;
    use crate::storage::{
        open_sqlite, Attempt, AttemptResult, ClaimRequest, ClaimedEvent, MachineEvent, NewMachine,
        NewMerchant, NewOutboxEvent, OutboxBacklog, OutboxStatus, OutboxStorage, PresenceChange,
        PresenceWrite, ReplayOutcome, Storage,
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

    /// Writes one outbox row straight into the table (as update_order does).
    async fn insert_outbox(s: &SqliteStorage, o: &NewOutboxEvent) {
        sqlx::query(crate::storage::sql::INSERT_OUTBOX)
            .bind(&o.event_id)
            .bind(&o.merchant_appid)
            .bind(&o.order_key)
            .bind(o.order_id.map(|id| id as i64))
            .bind(o.machine_no.map(|m| m.as_str().to_string()))
            .bind(&o.kind)
            .bind(&o.body)
            .bind(o.created_at.timestamp_millis())
            .execute(s.pool())
            .await
            .unwrap();
    }

    /// Writes an order event straight into the outbox (as update_order does).
    async fn put(s: &SqliteStorage, id: &str, appid: &str, key: &str, created: i64) {
        insert_outbox(
            s,
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
        .await;
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
        insert_outbox(
            &s,
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
        .await;
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
