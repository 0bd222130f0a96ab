//! Unit tests of the SQLite backend: what is SQLite's own (the file, its
//! connection settings, several processes on one file, bulk speed, corrupt
//! rows). The behaviour both backends share is the contract suite's
//! (`tests/tests/storage_contract.rs`).

use std::sync::Arc;
use std::time::Instant;

use chrono::{DateTime, TimeZone, Utc};
use tempfile::TempDir;
use vendgate_proto::machine::MachineNo;

use super::*;
use crate::secrets::SecretHash;
use crate::storage::{open_sqlite, Merchant, NewMerchant};

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

/// What `storage_contract::merchants_round_trip_and_duplicates` does not
/// check: the creation time and the stored hash come back as written.
#[tokio::test]
async fn merchant_created_at_and_hash_round_trip() {
    let (_dir, store) = open().await;
    let created = merchant(store.as_ref(), "vgb").await;
    let read = store.merchant("vgb").await.unwrap().unwrap();
    assert_eq!(read.created_at, created.created_at);
    assert_eq!(
        read.appsecret_hash.as_str(),
        created.appsecret_hash.as_str()
    );
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
