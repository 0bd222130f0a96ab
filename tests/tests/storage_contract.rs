//! The storage contract, written once and run against both backends: every
//! behaviour of [`Storage`] the gateway relies on, to the error variant, for
//! SQLite (a temp file) and PostgreSQL (a fresh database on the shared test
//! server, see `vendgate_e2e::pg`). `contract!` turns each `async fn x(db)`
//! into `sqlite::x` and `postgres::x`. Concurrency cases use two storage
//! handles on one database, as two gateway nodes (or a gateway and the CLI)
//! would.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, TimeZone, Utc};
use serde_json::json;
use vendgate::domain::order::{Line, Status};
use vendgate::secrets::SecretHash;
use vendgate::storage::{
    self, Attempt, AttemptResult, ClaimRequest, ClaimedEvent, Due, MachineEvent, NewMachine,
    NewMerchant, NewOrder, NewOutboxEvent, NewService, NodeRow, OrderChange, OrderEvent,
    OrderQuery, OutboxBacklog, OutboxStatus, Ownership, PresenceChange, PresenceWrite,
    ReplayOutcome, Storage, StorageError,
};
use vendgate::Settings;
use vendgate_e2e::pg::PgServer;
use vendgate_proto::machine::MachineNo;
use vendgate_proto::msg::InventoryItem;

/// One database for a test, and the way to open more handles on it.
struct Db {
    settings: Settings,
    store: Arc<dyn Storage>,
    _dir: tempfile::TempDir,
}

impl Db {
    async fn sqlite() -> Db {
        let dir = tempfile::tempdir().expect("temp dir");
        let settings = Settings::for_tests(dir.path());
        Db::open(settings, dir).await
    }

    async fn postgres() -> Db {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut settings = Settings::for_tests(dir.path());
        settings.database_url = PgServer::shared_async().await.create_database().await;
        Db::open(settings, dir).await
    }

    async fn open(settings: Settings, dir: tempfile::TempDir) -> Db {
        let store = storage::open(&settings).await.expect("open storage");
        Db {
            settings,
            store,
            _dir: dir,
        }
    }

    /// Another handle on the same database (another node, or the CLI).
    async fn another(&self) -> Arc<dyn Storage> {
        storage::open(&self.settings)
            .await
            .expect("open storage again")
    }
}

macro_rules! contract {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name(super::Db::sqlite().await).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name(super::Db::postgres().await).await;
                }
            )*
        }
    };
}

contract!(
    merchants_round_trip_and_duplicates,
    merchant_notify_url_set_and_cleared,
    machines_round_trip_listing_and_errors,
    bulk_machines_all_or_nothing,
    services_round_trip_and_duplicates,
    secret_rotation,
    presence_epoch_rule,
    presence_batch_and_reset,
    presence_events_only_on_flips,
    outbox_key_order_due_time_and_leases,
    outbox_dead_events_and_replay,
    outbox_per_merchant_cap,
    outbox_attempts_listing_backlog_timeline,
    orders_insert_read_and_duplicates,
    orders_compare_and_set,
    orders_refunds_unpaid_counts_and_timeline,
    orders_acceptance_only_before_accept_by,
    orders_timeline_extra_events_are_capped,
    orders_listed_newest_first_filtered_and_paged,
    inventories_replace_snapshots,
    ownership_epochs,
    nodes_heartbeats_reaping_orphans,
    sweeps_claim_with_leases,
    pending_cancels_and_open_orders,
    concurrent_sweeps_never_share_an_order,
    concurrent_outbox_claims_never_share_an_event,
    concurrent_take_ownership_distinct_epochs,
    concurrent_offline_writes_emit_one_event,
    concurrent_compare_and_set_has_one_winner,
    concurrent_reapers_get_each_node_once,
    ping_and_close,
    machine_disable_remove_transfer,
    merchant_disable_holds_webhooks_and_notify_url,
    services_list_and_remove,
    export_pages_in_creation_order,
    retention_purges_in_batches_and_keeps_protected,
    retention_purges_finished_webhook_rows,
);

// ---------------------------------------------------------------- helpers

fn t(ms: i64) -> DateTime<Utc> {
    Utc.timestamp_millis_opt(ms).single().expect("valid ms")
}

fn no(s: &str) -> MachineNo {
    s.parse().expect("machine_no")
}

async fn merchant(s: &dyn Storage, appid: &str, url: Option<&str>) {
    s.create_merchant(NewMerchant {
        name: format!("merchant {appid}"),
        notify_url: url.map(Into::into),
        appid: appid.into(),
        appsecret_hash: SecretHash::new("appsecret"),
        appsecret_enc: Some(format!("enc-{appid}")),
    })
    .await
    .expect("merchant");
}

fn new_machine(m: &str, merchant: &str) -> NewMachine {
    NewMachine {
        machine_no: no(m),
        merchant_appid: merchant.into(),
        secret_hash: SecretHash::new(&format!("secret-{m}")),
    }
}

/// Merchant vga (with a notify_url) and machines `ms` of it.
async fn machines(s: &dyn Storage, ms: &[&str]) {
    merchant(s, "vga", Some("http://a.example/")).await;
    for m in ms {
        s.create_machine(new_machine(m, "vga"))
            .await
            .expect("machine");
    }
}

fn line(dispensed: u32) -> Line {
    Line {
        product_id: 7,
        quantity: 2,
        dispensed,
        unit_price: 150,
    }
}

fn ev(kind: &str, at: i64) -> OrderEvent {
    OrderEvent {
        at: t(at),
        kind: kind.into(),
        detail: json!({ "kind": kind, "n": at }),
    }
}

fn new_order(id: u64, m: &str, status: Status, pay_deadline: i64) -> NewOrder {
    NewOrder {
        order_id: id,
        merchant_appid: "vga".into(),
        machine_no: no(m),
        out_trade_no: None,
        request_fingerprint: None,
        pay_later: false,
        status,
        lines: vec![line(0)],
        amount: 300,
        created_at: t(1_000),
        pay_deadline: Some(t(pay_deadline)),
        accept_by: None,
    }
}

async fn order(s: &dyn Storage, id: u64, m: &str, status: Status, pay_deadline: i64) {
    s.insert_order(
        &new_order(id, m, status, pay_deadline),
        &ev("created", 1_000),
    )
    .await
    .expect("insert order");
}

fn change(status: Status, cancel_pending: bool, at: i64) -> OrderChange {
    OrderChange {
        status,
        lines: vec![line(0)],
        error: None,
        result_applied: false,
        refund_amount: 0,
        dispense_deadline: Some(t(at + 1_000)),
        cancel_pending,
        accept_by: None,
        only_before_accept_by: None,
        at: t(at),
    }
}

async fn to(s: &dyn Storage, id: u64, from: Status, c: OrderChange) -> bool {
    let at = c.at.timestamp_millis();
    s.update_order(id, from, &c, &ev(c.status.as_str(), at), &[])
        .await
        .expect("update order")
}

/// An outbox event of order `order_id` (key `order:{order_id}`), written as
/// the gateway writes them: with an order change (here one that keeps the
/// status). The order is created (machine 00000001) on first use.
async fn put(s: &dyn Storage, event_id: &str, appid: &str, order_id: u64, created: i64) {
    if s.order(order_id).await.expect("order").is_none() {
        s.insert_order(
            &NewOrder {
                merchant_appid: appid.into(),
                ..new_order(order_id, "00000001", Status::AwaitingPayment, 1 << 40)
            },
            &ev("created", created),
        )
        .await
        .expect("insert order");
    }
    let outbox = NewOutboxEvent {
        event_id: event_id.into(),
        merchant_appid: appid.into(),
        order_key: format!("order:{order_id}"),
        order_id: Some(order_id),
        machine_no: Some(no("00000001")),
        kind: "order.completed".into(),
        body: format!(r#"{{"event_id":"{event_id}"}}"#),
        created_at: t(created),
    };
    let c = change(Status::AwaitingPayment, false, created);
    assert!(s
        .update_order(
            order_id,
            Status::AwaitingPayment,
            &c,
            &ev("noted", created),
            std::slice::from_ref(&outbox)
        )
        .await
        .expect("update with outbox"));
}

/// Merchants vga and vgb (both notified) and machine 00000001 of vga.
async fn outbox_setup(s: &dyn Storage) {
    merchant(s, "vga", Some("http://a.example/")).await;
    merchant(s, "vgb", Some("http://b.example/")).await;
    s.create_machine(new_machine("00000001", "vga"))
        .await
        .expect("machine");
}

fn ids(v: &[ClaimedEvent]) -> Vec<&str> {
    v.iter().map(|e| e.event_id.as_str()).collect()
}

async fn claim(
    s: &dyn Storage,
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
    .expect("claim")
}

fn failed(id: &str, at: i64, result: AttemptResult) -> Attempt {
    Attempt {
        event_id: id.into(),
        at: t(at),
        http_status: Some(500),
        error: Some("HTTP 500".into()),
        result,
    }
}

fn presence(m: &str, online: bool, epoch: u64, at: i64) -> PresenceChange {
    PresenceChange {
        write: PresenceWrite {
            machine_no: no(m),
            online,
            epoch,
            at: t(at),
        },
        event: Some(MachineEvent {
            event_id: format!("{m}-{epoch}-{online}-{at}"),
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

async fn epoch_of(s: &dyn Storage, m: &str) -> u64 {
    s.ownership(Some(&[no(m)])).await.expect("ownership")[0].epoch
}

fn order_ids(v: &[storage::StoredOrder]) -> Vec<u64> {
    v.iter().map(|o| o.order_id).collect()
}

// --------------------------------------------------------------- accounts

async fn merchant_notify_url_set_and_cleared(db: Db) {
    let s = db.store.as_ref();
    merchant(s, "vga", None).await;
    merchant(s, "vgb", Some("https://b.example/")).await;
    // Read first, so a cached row would show if the write did not clear it.
    assert!(s
        .merchant("vga")
        .await
        .unwrap()
        .unwrap()
        .notify_url
        .is_none());
    assert!(s
        .set_notify_url("vga", Some("https://a.example/h"))
        .await
        .unwrap());
    let a = s.merchant("vga").await.unwrap().unwrap();
    assert_eq!(a.notify_url.as_deref(), Some("https://a.example/h"));
    // Nothing else of the row changed, nor any other merchant.
    assert!(a.appsecret_hash.verify("appsecret"));
    assert_eq!(
        (a.name.as_str(), a.appsecret_enc.as_deref()),
        ("merchant vga", Some("enc-vga"))
    );
    let b = s.merchant("vgb").await.unwrap().unwrap();
    assert_eq!(b.notify_url.as_deref(), Some("https://b.example/"));
    // Another handle (another node, or the CLI) sees it too.
    let other = db.another().await;
    assert_eq!(
        other
            .merchant("vga")
            .await
            .unwrap()
            .unwrap()
            .notify_url
            .as_deref(),
        Some("https://a.example/h")
    );
    assert!(s.set_notify_url("vga", None).await.unwrap());
    assert!(s
        .merchant("vga")
        .await
        .unwrap()
        .unwrap()
        .notify_url
        .is_none());
    assert!(!s
        .set_notify_url("nobody", Some("https://x.example/"))
        .await
        .unwrap());
    assert!(s.merchant("nobody").await.unwrap().is_none());
}

async fn merchants_round_trip_and_duplicates(db: Db) {
    let s = db.store.as_ref();
    merchant(s, "vgb", Some("https://hooks.example/n")).await;
    merchant(s, "vga", None).await;
    let b = s.merchant("vgb").await.unwrap().unwrap();
    assert_eq!((b.appid.as_str(), b.name.as_str()), ("vgb", "merchant vgb"));
    assert_eq!(b.notify_url.as_deref(), Some("https://hooks.example/n"));
    assert_eq!(b.appsecret_enc.as_deref(), Some("enc-vgb"));
    assert!(b.appsecret_hash.verify("appsecret"));
    assert!(b.previous_appsecret.is_none());
    assert!(s
        .merchant("vga")
        .await
        .unwrap()
        .unwrap()
        .notify_url
        .is_none());
    assert!(s.merchant("vgc").await.unwrap().is_none());
    let all: Vec<String> = s
        .list_merchants()
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.appid)
        .collect();
    assert_eq!(all, ["vga", "vgb"]);
    // Byte order, as SQLite compares: upper case before lower case.
    merchant(s, "Vgz", None).await;
    let all: Vec<String> = s
        .list_merchants()
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.appid)
        .collect();
    assert_eq!(all, ["Vgz", "vga", "vgb"]);

    let err = s
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

async fn machines_round_trip_listing_and_errors(db: Db) {
    let s = db.store.as_ref();
    let err = s
        .create_machine(new_machine("00000001", "vgnope"))
        .await
        .unwrap_err();
    assert!(matches!(err, StorageError::UnknownMerchant), "{err:?}");
    merchant(s, "vga", None).await;
    merchant(s, "vgb", None).await;
    let created = s
        .create_machine(new_machine("00000002", "vga"))
        .await
        .unwrap();
    assert!(!created.online);
    s.create_machine(new_machine("00000001", "vgb"))
        .await
        .unwrap();
    s.create_machine(new_machine("00000010", "vga"))
        .await
        .unwrap();
    let read = s.machine(&no("00000002")).await.unwrap().unwrap();
    assert_eq!(read.merchant_appid, "vga");
    assert!(read.secret_hash.verify("secret-00000002"));
    assert!(!read.online && read.last_seen.is_none() && read.online_since.is_none());
    assert_eq!(read.created_at, created.created_at);
    assert!(read.previous_secret.is_none());
    assert!(s.machine(&no("00000003")).await.unwrap().is_none());
    let list = move |m: Option<&'static str>| async move {
        s.list_machines(m)
            .await
            .unwrap()
            .iter()
            .map(|m| m.machine_no.to_string())
            .collect::<Vec<_>>()
    };
    assert_eq!(list(None).await, ["00000001", "00000002", "00000010"]);
    assert_eq!(list(Some("vga")).await, ["00000002", "00000010"]);
    assert!(list(Some("vgz")).await.is_empty());
    // Taken, whichever merchant asks.
    for owner in ["vga", "vgb"] {
        let err = s
            .create_machine(new_machine("00000001", owner))
            .await
            .unwrap_err();
        assert!(matches!(err, StorageError::Duplicate("machine")), "{err:?}");
    }
}

async fn bulk_machines_all_or_nothing(db: Db) {
    let s = db.store.as_ref();
    merchant(s, "vga", None).await;
    s.create_machine(new_machine("00000500", "vga"))
        .await
        .unwrap();
    let ms: Vec<NewMachine> = (1..=1000)
        .map(|n| new_machine(MachineNo::from_u32(n).unwrap().as_str(), "vga"))
        .collect();
    let err = s.create_machines(ms).await.unwrap_err();
    assert!(matches!(err, StorageError::Duplicate("machine")), "{err:?}");
    assert_eq!(s.list_machines(None).await.unwrap().len(), 1);
    let err = s
        .create_machines(vec![
            new_machine("00000001", "vga"),
            new_machine("00000002", "vga"),
            new_machine("00000001", "vga"),
        ])
        .await
        .unwrap_err();
    assert!(matches!(err, StorageError::Duplicate("machine")), "{err:?}");
    let err = s
        .create_machines(vec![
            new_machine("00000001", "vga"),
            new_machine("00000002", "vgnope"),
        ])
        .await
        .unwrap_err();
    assert!(matches!(err, StorageError::UnknownMerchant), "{err:?}");
    assert_eq!(s.list_machines(None).await.unwrap().len(), 1);
    s.create_machines(Vec::new()).await.unwrap();
    let ms: Vec<NewMachine> = (1..=2000)
        .map(|n| new_machine(MachineNo::from_u32(n + 1000).unwrap().as_str(), "vga"))
        .collect();
    s.create_machines(ms).await.unwrap();
    let all = s.list_machines(Some("vga")).await.unwrap();
    assert_eq!(all.len(), 2001);
    assert!(all[1].secret_hash.verify("secret-00001001"));
}

async fn services_round_trip_and_duplicates(db: Db) {
    let s = db.store.as_ref();
    let created = s
        .create_service(NewService {
            name: "billing".into(),
            username: "svc-abc".into(),
            password_hash: SecretHash::new("pw"),
        })
        .await
        .unwrap();
    let read = s.service("svc-abc").await.unwrap().unwrap();
    assert_eq!(
        (read.username.as_str(), read.name.as_str()),
        ("svc-abc", "billing")
    );
    assert_eq!(read.created_at, created.created_at);
    assert!(read.password_hash.verify("pw"));
    assert!(s.service("svc-nope").await.unwrap().is_none());
    let err = s
        .create_service(NewService {
            name: "other".into(),
            username: "svc-abc".into(),
            password_hash: SecretHash::new("pw2"),
        })
        .await
        .unwrap_err();
    assert!(matches!(err, StorageError::Duplicate("service")), "{err:?}");
}

async fn secret_rotation(db: Db) {
    let s = db.store.as_ref();
    machines(s, &["00000001"]).await;
    let m = no("00000001");
    // With a grace: the old secret becomes the previous one.
    assert!(s
        .rotate_machine_secret(&m, &SecretHash::new("two"), Some(t(5_000)))
        .await
        .unwrap());
    let row = s.machine(&m).await.unwrap().unwrap();
    assert!(row.secret_hash.verify("two"));
    let prev = row.previous_secret.expect("previous secret");
    assert!(prev.hash.verify("secret-00000001"));
    assert_eq!(prev.expires_at, t(5_000));
    // Again within the grace: the one just replaced is the previous one.
    assert!(s
        .rotate_machine_secret(&m, &SecretHash::new("three"), Some(t(6_000)))
        .await
        .unwrap());
    let prev = s
        .machine(&m)
        .await
        .unwrap()
        .unwrap()
        .previous_secret
        .unwrap();
    assert!(prev.hash.verify("two") && !prev.hash.verify("secret-00000001"));
    // Without: only the new one is valid.
    assert!(s
        .rotate_machine_secret(&m, &SecretHash::new("four"), None)
        .await
        .unwrap());
    let row = s.machine(&m).await.unwrap().unwrap();
    assert!(row.secret_hash.verify("four") && row.previous_secret.is_none());
    assert!(!s
        .rotate_machine_secret(&no("99999999"), &SecretHash::new("x"), None)
        .await
        .unwrap());

    // Merchants: the cached row is replaced at once in this process.
    let before = s.merchant("vga").await.unwrap().unwrap();
    assert!(before.appsecret_hash.verify("appsecret"));
    assert!(s
        .rotate_merchant_secret("vga", &SecretHash::new("new"), "enc-new", Some(t(9_000)))
        .await
        .unwrap());
    let after = s.merchant("vga").await.unwrap().unwrap();
    assert!(after.appsecret_hash.verify("new"));
    assert_eq!(after.appsecret_enc.as_deref(), Some("enc-new"));
    let prev = after.previous_appsecret.unwrap();
    assert!(prev.hash.verify("appsecret"));
    assert_eq!(prev.expires_at, t(9_000));
    assert!(s
        .rotate_merchant_secret("vga", &SecretHash::new("newer"), "enc-newer", None)
        .await
        .unwrap());
    assert!(s
        .merchant("vga")
        .await
        .unwrap()
        .unwrap()
        .previous_appsecret
        .is_none());
    assert!(!s
        .rotate_merchant_secret("vgnope", &SecretHash::new("x"), "e", None)
        .await
        .unwrap());
    // Another process's rotation reaches this one within the cache's TTL:
    // another handle sees it at once (its own cache is empty).
    let other = db.another().await;
    assert!(other
        .merchant("vga")
        .await
        .unwrap()
        .unwrap()
        .appsecret_hash
        .verify("newer"));
}

// --------------------------------------------------------------- presence

async fn presence_epoch_rule(db: Db) {
    let s = db.store.as_ref();
    machines(s, &["00000001"]).await;
    let m = no("00000001");
    let state = move || async move {
        let r = s.machine(&m).await.unwrap().unwrap();
        (r.online, r.online_since, r.last_seen)
    };
    s.record_presence(&m, true, 10, t(1_000)).await.unwrap();
    assert_eq!(state().await, (true, Some(t(1_000)), Some(t(1_000))));
    // The same connection re-announced: online_since kept.
    s.record_presence(&m, true, 10, t(1_500)).await.unwrap();
    assert_eq!(state().await, (true, Some(t(1_000)), Some(t(1_500))));
    // Take-over by 11, then the late close of 10: ignored.
    s.record_presence(&m, true, 11, t(2_000)).await.unwrap();
    s.record_presence(&m, false, 10, t(2_001)).await.unwrap();
    assert_eq!(state().await, (true, Some(t(2_000)), Some(t(2_000))));
    // A stale online write too.
    s.record_presence(&m, true, 9, t(2_002)).await.unwrap();
    assert_eq!(state().await, (true, Some(t(2_000)), Some(t(2_000))));
    s.record_presence(&m, false, 11, t(3_000)).await.unwrap();
    assert_eq!(state().await, (false, None, Some(t(3_000))));
    s.record_presence(&m, true, 12, t(4_000)).await.unwrap();
    assert_eq!(state().await, (true, Some(t(4_000)), Some(t(4_000))));
    // An offline write with a newer epoch than stored wins.
    s.record_presence(&m, false, 13, t(5_000)).await.unwrap();
    assert_eq!(state().await, (false, None, Some(t(5_000))));
    // Unknown machines are ignored; epochs beyond i64 are refused.
    s.record_presence(&no("99999999"), true, 1, t(1))
        .await
        .unwrap();
    assert!(s.machine(&no("99999999")).await.unwrap().is_none());
    let err = s
        .record_presence(&m, true, u64::MAX, t(1))
        .await
        .unwrap_err();
    assert!(matches!(err, StorageError::Backend(_)), "{err:?}");
}

async fn presence_batch_and_reset(db: Db) {
    let s = db.store.as_ref();
    machines(s, &["00000001", "00000002"]).await;
    let w = |m: &str, online, epoch, at| PresenceWrite {
        machine_no: no(m),
        online,
        epoch,
        at: t(at),
    };
    // Applied in order, per machine, with the epoch rule.
    s.record_presence_batch(&[
        w("00000002", true, 1_000_000, 2_000),
        w("00000001", true, 5, 1_000),
        w("00000001", false, 4, 1_001),
        w("00000001", true, 6, 1_002),
        w("00000099", true, 6, 1_003),
    ])
    .await
    .unwrap();
    let one = s.machine(&no("00000001")).await.unwrap().unwrap();
    assert!(one.online && one.online_since == Some(t(1_002)));
    s.record_presence_batch(&[]).await.unwrap();

    s.reset_presence().await.unwrap();
    for m in s.list_machines(None).await.unwrap() {
        assert!(!m.online && m.online_since.is_none(), "{}", m.machine_no);
        assert!(m.last_seen.is_some(), "last_seen is history, kept");
    }
    // Epochs reset: the next process's small epochs win.
    s.record_presence(&no("00000002"), true, 5, t(3_000))
        .await
        .unwrap();
    assert!(s.machine(&no("00000002")).await.unwrap().unwrap().online);
    assert_eq!(epoch_of(s, "00000001").await, 0);
}

async fn presence_events_only_on_flips(db: Db) {
    let s = db.store.as_ref();
    merchant(s, "vga", Some("http://a.example/")).await;
    merchant(s, "vgq", None).await;
    s.create_machine(new_machine("00000001", "vga"))
        .await
        .unwrap();
    s.create_machine(new_machine("00000002", "vgq"))
        .await
        .unwrap();
    s.record_presence_batch_with_events(&[
        presence("00000001", true, 10, 1_000),
        // Take-over while online: no event.
        presence("00000001", true, 11, 1_001),
        // The old connection's late close: stale, no event.
        presence("00000001", false, 10, 1_002),
        presence("00000001", false, 11, 1_003),
        // Already offline: no event.
        presence("00000001", false, 11, 1_004),
        // A merchant without notify_url: never an event.
        presence("00000002", true, 10, 1_005),
        // Unknown machine: nothing.
        presence("99999999", true, 10, 1_006),
        PresenceChange {
            event: None,
            ..presence("00000001", true, 12, 1_007)
        },
    ])
    .await
    .unwrap();
    let (events, total) = s.list_outbox("vga", None, 0, 10).await.unwrap();
    let kinds: Vec<(&str, &str)> = events
        .iter()
        .map(|e| (e.event_id.as_str(), e.kind.as_str()))
        .collect();
    assert_eq!(
        kinds,
        [
            ("00000001-10-true-1000", "machine.online"),
            ("00000001-11-false-1003", "machine.offline")
        ]
    );
    assert_eq!(total, 2);
    assert_eq!(events[0].machine_no, Some(no("00000001")));
    assert_eq!(events[0].order_id, None);
    assert!(s
        .list_outbox("vgq", None, 0, 10)
        .await
        .unwrap()
        .0
        .is_empty());
    let m = s.machine(&no("00000001")).await.unwrap().unwrap();
    assert!(m.online && m.last_seen == Some(t(1_007)));
    assert!(s.machine(&no("00000002")).await.unwrap().unwrap().online);
    // One machine's events share one key, delivered in order.
    let got = claim(s, 10_000, 10, 10, &HashMap::new()).await;
    assert_eq!(ids(&got), ["00000001-10-true-1000"]);
    assert_eq!(got[0].order_key, "machine:00000001");
}

// ----------------------------------------------------------------- outbox

async fn outbox_key_order_due_time_and_leases(db: Db) {
    let s = db.store.as_ref();
    outbox_setup(s).await;
    put(s, "e1", "vga", 1, 1_000).await;
    put(s, "e2", "vga", 1, 1_001).await;
    put(s, "e3", "vga", 2, 1_002).await;
    put(s, "late", "vga", 3, 9_000).await;
    let none = HashMap::new();
    assert!(claim(s, 999, 10, 10, &none).await.is_empty());
    let got = claim(s, 2_000, 10, 10, &none).await;
    assert_eq!(ids(&got), ["e1", "e3"]);
    let e1 = &got[0];
    assert_eq!(e1.notify_url.as_deref(), Some("http://a.example/"));
    assert_eq!(e1.appsecret_enc.as_deref(), Some("enc-vga"));
    assert_eq!((e1.created_at, e1.pending_since), (t(1_000), t(1_000)));
    assert_eq!((e1.attempts, e1.kind.as_str()), (0, "order.completed"));
    assert_eq!(e1.body, r#"{"event_id":"e1"}"#);
    assert_eq!(
        (e1.merchant_appid.as_str(), e1.order_key.as_str()),
        ("vga", "order:1")
    );
    // Leased: nobody gets them again; e2 still waits behind e1.
    assert!(claim(s, 2_001, 10, 10, &none).await.is_empty());
    s.record_attempt(&failed("e1", 2_100, AttemptResult::RetryAt(t(5_000))))
        .await
        .unwrap();
    assert!(claim(s, 4_999, 10, 10, &none).await.is_empty());
    let got = claim(s, 5_000, 10, 10, &none).await;
    assert_eq!(ids(&got), ["e1"]);
    assert_eq!(got[0].attempts, 1);
    s.record_attempt(&Attempt {
        http_status: Some(200),
        error: None,
        ..failed("e1", 5_100, AttemptResult::Delivered)
    })
    .await
    .unwrap();
    assert_eq!(ids(&claim(s, 5_200, 10, 10, &none).await), ["e2"]);
    // A lease that runs out makes e3 due again; `late` has waited longer.
    assert_eq!(ids(&claim(s, 62_003, 10, 10, &none).await), ["late", "e3"]);
    // Nothing when asked for nothing.
    assert!(claim(s, 999_999, 0, 10, &none).await.is_empty());
    assert!(claim(s, 999_999, 10, 0, &none).await.is_empty());
}

async fn outbox_dead_events_and_replay(db: Db) {
    let s = db.store.as_ref();
    outbox_setup(s).await;
    put(s, "e1", "vga", 1, 1_000).await;
    put(s, "e2", "vga", 1, 1_001).await;
    put(s, "e3", "vga", 1, 1_002).await;
    let none = HashMap::new();
    assert_eq!(ids(&claim(s, 2_000, 10, 10, &none).await), ["e1"]);
    s.record_attempt(&failed("e1", 2_000, AttemptResult::Dead))
        .await
        .unwrap();
    // Dead does not block its key.
    assert_eq!(ids(&claim(s, 2_001, 10, 10, &none).await), ["e2"]);
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
    // e1, earlier and pending again, is the head; e3 waits behind both.
    let got = claim(s, 3_000, 10, 10, &none).await;
    assert_eq!(ids(&got), ["e1"]);
    assert_eq!(got[0].attempts, 0, "attempts reset");
    assert_eq!(got[0].pending_since, t(3_000), "fresh retry budget");
}

async fn outbox_per_merchant_cap(db: Db) {
    let s = db.store.as_ref();
    outbox_setup(s).await;
    for i in 0..20 {
        put(s, &format!("a{i:02}"), "vga", 100 + i, 1_000 + i as i64).await;
    }
    put(s, "b0", "vgb", 200, 1_500).await;
    let none = HashMap::new();
    assert_eq!(
        ids(&claim(s, 2_000, 5, 2, &none).await),
        ["a00", "a01", "b0"]
    );
    let busy = HashMap::from([("vga".to_string(), 2)]);
    assert!(claim(s, 2_000, 5, 2, &busy).await.is_empty());
    let busy = HashMap::from([("vga".to_string(), 1)]);
    assert_eq!(ids(&claim(s, 2_000, 5, 2, &busy).await), ["a02"]);
    // The limit caps the batch.
    assert_eq!(
        ids(&claim(s, 2_000, 3, 100, &none).await),
        ["a03", "a04", "a05"]
    );
}

async fn outbox_attempts_listing_backlog_timeline(db: Db) {
    let s = db.store.as_ref();
    outbox_setup(s).await;
    assert_eq!(s.outbox_backlog().await.unwrap(), OutboxBacklog::default());
    put(s, "b1", "vgb", 79, 500).await;
    put(s, "o1", "vga", 77, 1_000).await;
    put(s, "o2", "vga", 78, 2_000).await;
    let b = s.outbox_backlog().await.unwrap();
    assert_eq!((b.pending, b.oldest_pending), (3, Some(t(500))));
    s.record_attempt(&failed("o1", 1_100, AttemptResult::RetryAt(t(1_500))))
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
    // An attempt on a delivered event changes nothing but the history.
    s.record_attempt(&failed("o1", 1_700, AttemptResult::Dead))
        .await
        .unwrap();
    s.record_attempt(&failed("o2", 2_100, AttemptResult::Dead))
        .await
        .unwrap();
    let timeline = s.order_webhook_attempts(77).await.unwrap();
    assert_eq!(timeline.len(), 3);
    assert_eq!(timeline[0].event_id, "o1");
    assert_eq!(timeline[0].kind, "order.completed");
    assert_eq!(timeline[0].http_status, Some(500));
    assert_eq!(timeline[0].error.as_deref(), Some("HTTP 500"));
    assert_eq!((timeline[1].at, timeline[1].http_status), (t(1_600), None));
    assert!(s.order_webhook_attempts(79).await.unwrap().is_empty());
    assert!(s.order_webhook_attempts(u64::MAX).await.unwrap().is_empty());

    let (all, total) = s.list_outbox("vga", None, 0, 10).await.unwrap();
    assert_eq!(total, 2);
    let o1 = &all[0];
    assert_eq!(o1.event_id, "o1");
    assert_eq!(
        (o1.status, o1.attempts, o1.last_error.clone()),
        (OutboxStatus::Delivered, 2, None)
    );
    assert_eq!(
        (o1.delivered_at, o1.next_attempt_at),
        (Some(t(1_600)), None)
    );
    assert_eq!(
        (o1.order_id, o1.machine_no),
        (Some(77), Some(no("00000001")))
    );
    assert_eq!(o1.created_at, t(1_000));
    let o2 = &all[1];
    assert_eq!(
        (o2.status, o2.attempts, o2.last_error.as_deref()),
        (OutboxStatus::Dead, 1, Some("HTTP 500"))
    );
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

// ----------------------------------------------------------------- orders

async fn orders_listed_newest_first_filtered_and_paged(db: Db) {
    let s = db.store.as_ref();
    machines(s, &["00000001", "00000002"]).await;
    merchant(s, "vgb", None).await;
    s.create_machine(new_machine("00000009", "vgb"))
        .await
        .unwrap();
    // Orders 1..=6 of vga created at 1_000, 2_000, …; 4 and 5 at the same
    // instant (the order id breaks the tie); 7 is vgb's.
    let at = [0, 1_000, 2_000, 3_000, 4_000, 4_000, 6_000];
    for id in 1..=6u64 {
        let m = if id % 2 == 0 { "00000002" } else { "00000001" };
        let status = if id <= 3 {
            Status::AwaitingPayment
        } else {
            Status::Dispatching
        };
        s.insert_order(
            &NewOrder {
                out_trade_no: Some(format!("T-{id}")),
                created_at: t(at[id as usize]),
                ..new_order(id, m, status, 1 << 40)
            },
            &ev("created", at[id as usize]),
        )
        .await
        .unwrap();
    }
    s.insert_order(
        &NewOrder {
            merchant_appid: "vgb".into(),
            out_trade_no: Some("T-1".into()),
            created_at: t(5_000),
            ..new_order(7, "00000009", Status::AwaitingPayment, 1 << 40)
        },
        &ev("created", 5_000),
    )
    .await
    .unwrap();
    let q = |f: &dyn Fn(&mut OrderQuery)| {
        let mut q = OrderQuery {
            merchant_appid: "vga".into(),
            limit: 100,
            ..OrderQuery::default()
        };
        f(&mut q);
        q
    };
    let list = |q: OrderQuery| async move {
        let (orders, total) = s.list_orders(&q).await.unwrap();
        (
            orders.into_iter().map(|o| o.order_id).collect::<Vec<_>>(),
            total,
        )
    };
    assert_eq!(list(q(&|_| {})).await, (vec![6, 5, 4, 3, 2, 1], 6));
    // Whole stored orders, lines included.
    let (first, _) = s.list_orders(&q(&|q| q.limit = 1)).await.unwrap();
    assert_eq!(first, vec![s.order(6).await.unwrap().unwrap()]);
    // Pages: the total counts every match.
    assert_eq!(
        list(q(&|q| {
            q.limit = 2;
            q.offset = 2
        }))
        .await,
        (vec![4, 3], 6)
    );
    assert_eq!(list(q(&|q| q.offset = 6)).await, (vec![], 6));
    // from inclusive, to exclusive.
    assert_eq!(
        list(q(&|q| q.from = Some(t(4_000)))).await,
        (vec![6, 5, 4], 3)
    );
    assert_eq!(
        list(q(&|q| q.to = Some(t(4_000)))).await,
        (vec![3, 2, 1], 3)
    );
    assert_eq!(
        list(q(&|q| {
            q.from = Some(t(2_000));
            q.to = Some(t(6_000))
        }))
        .await,
        (vec![5, 4, 3, 2], 4)
    );
    assert_eq!(
        list(q(&|q| q.status = Some(Status::AwaitingPayment))).await,
        (vec![3, 2, 1], 3)
    );
    assert_eq!(
        list(q(&|q| q.machine_no = Some(no("00000002")))).await,
        (vec![6, 4, 2], 3)
    );
    assert_eq!(
        list(q(&|q| {
            q.machine_no = Some(no("00000001"));
            q.status = Some(Status::Dispatching);
            q.limit = 1
        }))
        .await,
        (vec![5], 1)
    );
    assert_eq!(
        list(q(&|q| q.out_trade_no = Some("T-1".into()))).await,
        (vec![1], 1)
    );
    // Another merchant's orders are never listed, whatever the filter.
    assert_eq!(
        list(q(&|q| q.machine_no = Some(no("00000009")))).await,
        (vec![], 0)
    );
    let (theirs, n) = s
        .list_orders(&OrderQuery {
            merchant_appid: "vgb".into(),
            limit: 100,
            ..OrderQuery::default()
        })
        .await
        .unwrap();
    assert_eq!((theirs.len(), theirs[0].order_id, n), (1, 7, 1));
    assert_eq!(
        list(OrderQuery {
            merchant_appid: "nobody".into(),
            limit: 100,
            ..OrderQuery::default()
        })
        .await,
        (vec![], 0)
    );
}

async fn orders_insert_read_and_duplicates(db: Db) {
    let s = db.store.as_ref();
    machines(s, &["00000001"]).await;
    let o = NewOrder {
        out_trade_no: Some("T-1".into()),
        request_fingerprint: Some("fp".into()),
        pay_later: true,
        lines: vec![
            line(0),
            Line {
                product_id: 9,
                quantity: 1,
                dispensed: 0,
                unit_price: 99,
            },
        ],
        ..new_order(1, "00000001", Status::AwaitingPayment, 50_000)
    };
    s.insert_order(&o, &ev("created", 1_000)).await.unwrap();
    let read = s.order(1).await.unwrap().unwrap();
    assert_eq!(read.order_id, 1);
    assert_eq!(read.merchant_appid, "vga");
    assert_eq!(read.machine_no, no("00000001"));
    assert_eq!(read.out_trade_no.as_deref(), Some("T-1"));
    assert_eq!(read.request_fingerprint.as_deref(), Some("fp"));
    assert!(read.pay_later && !read.result_applied);
    assert_eq!(read.status, Status::AwaitingPayment);
    assert_eq!(read.lines, o.lines);
    assert_eq!((read.amount, read.refund_amount), (300, 0));
    assert_eq!((read.created_at, read.updated_at), (t(1_000), t(1_000)));
    assert_eq!(read.pay_deadline, Some(t(50_000)));
    assert!(read.dispense_deadline.is_none() && read.refunded_at.is_none());
    assert!(read.error.is_none());
    assert_eq!(
        s.order_by_out_trade_no("vga", "T-1").await.unwrap(),
        Some(read)
    );
    assert!(s
        .order_by_out_trade_no("vga", "T-2")
        .await
        .unwrap()
        .is_none());
    assert!(s.order(2).await.unwrap().is_none());
    assert!(s.order(u64::MAX).await.unwrap().is_none());

    let err = s
        .insert_order(
            &NewOrder {
                out_trade_no: None,
                ..o.clone()
            },
            &ev("created", 1),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, StorageError::Duplicate("order")), "{err:?}");
    let err = s
        .insert_order(
            &NewOrder {
                order_id: 2,
                ..o.clone()
            },
            &ev("created", 1),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(err, StorageError::Duplicate("out_trade_no")),
        "{err:?}"
    );
    // Nothing of the refused order was kept.
    assert!(s.order(2).await.unwrap().is_none());
    assert!(s.order_events(2).await.unwrap().is_empty());
    // Another merchant may use the same out_trade_no.
    merchant(s, "vgb", None).await;
    s.insert_order(
        &NewOrder {
            order_id: 3,
            merchant_appid: "vgb".into(),
            ..o.clone()
        },
        &ev("created", 1),
    )
    .await
    .unwrap();
    let err = s
        .insert_order(
            &NewOrder {
                order_id: 4,
                merchant_appid: "vgnope".into(),
                out_trade_no: None,
                ..o.clone()
            },
            &ev("created", 1),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, StorageError::UnknownMerchant), "{err:?}");
    let err = s
        .insert_order(
            &NewOrder {
                order_id: 5,
                machine_no: no("00000077"),
                out_trade_no: None,
                ..o
            },
            &ev("created", 1),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, StorageError::UnknownMerchant), "{err:?}");
}

async fn orders_compare_and_set(db: Db) {
    let s = db.store.as_ref();
    outbox_setup(s).await;
    order(s, 1, "00000001", Status::Dispatching, 9_000).await;
    let c = OrderChange {
        status: Status::PartiallyDispensed,
        lines: vec![line(1)],
        error: Some("jam".into()),
        result_applied: true,
        refund_amount: 150,
        dispense_deadline: Some(t(7_000)),
        cancel_pending: false,
        accept_by: None,
        only_before_accept_by: None,
        at: t(5_000),
    };
    let outbox = NewOutboxEvent {
        event_id: "ev-1".into(),
        merchant_appid: "vga".into(),
        order_key: "order:1".into(),
        order_id: Some(1),
        machine_no: Some(no("00000001")),
        kind: "order.partially_dispensed".into(),
        body: "{}".into(),
        created_at: t(5_000),
    };
    // From a status the order is not in: nothing written.
    assert!(!s
        .update_order(
            1,
            Status::Dispensing,
            &c,
            &ev("result", 5_000),
            std::slice::from_ref(&outbox)
        )
        .await
        .unwrap());
    assert_eq!(s.order_events(1).await.unwrap().len(), 1);
    assert_eq!(s.outbox_backlog().await.unwrap().pending, 0);
    assert!(!s
        .update_order(404, Status::Dispatching, &c, &ev("result", 5_000), &[])
        .await
        .unwrap());
    // From its status: everything, atomically.
    assert!(s
        .update_order(
            1,
            Status::Dispatching,
            &c,
            &ev("result", 5_000),
            std::slice::from_ref(&outbox)
        )
        .await
        .unwrap());
    let o = s.order(1).await.unwrap().unwrap();
    assert_eq!(o.status, Status::PartiallyDispensed);
    assert_eq!(o.lines, vec![line(1)]);
    assert_eq!(o.error.as_deref(), Some("jam"));
    assert!(o.result_applied);
    assert_eq!(o.refund_amount, 150);
    assert_eq!(o.dispense_deadline, Some(t(7_000)));
    assert_eq!(o.updated_at, t(5_000));
    let events = s.order_events(1).await.unwrap();
    assert_eq!(events.len(), 2);
    assert_eq!(events[1], ev("result", 5_000));
    let (out, _) = s.list_outbox("vga", None, 0, 10).await.unwrap();
    assert_eq!(out[0].event_id, "ev-1");
    // The same change again: the status moved on.
    assert!(!s
        .update_order(1, Status::Dispatching, &c, &ev("result", 5_001), &[])
        .await
        .unwrap());
    // An outbox event id used twice fails the change as a whole.
    let err = s
        .update_order(
            1,
            Status::PartiallyDispensed,
            &OrderChange {
                status: Status::Completed,
                ..c.clone()
            },
            &ev("again", 6_000),
            std::slice::from_ref(&outbox),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, StorageError::Backend(_)), "{err:?}");
    assert_eq!(
        s.order(1).await.unwrap().unwrap().status,
        Status::PartiallyDispensed
    );
    assert_eq!(s.order_events(1).await.unwrap().len(), 2);
}

async fn orders_refunds_unpaid_counts_and_timeline(db: Db) {
    let s = db.store.as_ref();
    machines(s, &["00000001", "00000002"]).await;
    merchant(s, "vgb", None).await;
    s.create_machine(new_machine("00000003", "vgb"))
        .await
        .unwrap();
    order(s, 1, "00000001", Status::AwaitingPayment, 9_000).await;
    order(s, 2, "00000001", Status::AwaitingPayment, 9_000).await;
    order(s, 3, "00000002", Status::AwaitingPayment, 9_000).await;
    order(s, 4, "00000002", Status::Dispatching, 9_000).await;
    s.insert_order(
        &NewOrder {
            merchant_appid: "vgb".into(),
            ..new_order(5, "00000003", Status::AwaitingPayment, 9_000)
        },
        &ev("created", 1_000),
    )
    .await
    .unwrap();
    assert_eq!(
        s.count_unpaid("vga", &no("00000001")).await.unwrap(),
        (3, 2)
    );
    assert_eq!(
        s.count_unpaid("vga", &no("00000002")).await.unwrap(),
        (3, 1)
    );
    assert_eq!(
        s.count_unpaid("vgb", &no("00000009")).await.unwrap(),
        (1, 0)
    );

    // Refunds: only where owed, once.
    assert!(!s
        .mark_refunded(4, t(6_000), &ev("refunded", 6_000))
        .await
        .unwrap());
    assert!(
        to(
            s,
            4,
            Status::Dispatching,
            OrderChange {
                refund_amount: 300,
                ..change(Status::Failed, false, 5_000)
            }
        )
        .await
    );
    assert!(s
        .mark_refunded(4, t(6_000), &ev("refunded", 6_000))
        .await
        .unwrap());
    assert!(!s
        .mark_refunded(4, t(7_000), &ev("refunded", 7_000))
        .await
        .unwrap());
    assert!(!s
        .mark_refunded(404, t(7_000), &ev("refunded", 7_000))
        .await
        .unwrap());
    let o = s.order(4).await.unwrap().unwrap();
    assert_eq!((o.refunded_at, o.updated_at), (Some(t(6_000)), t(6_000)));

    s.append_order_event(4, &ev("note", 8_000)).await.unwrap();
    let kinds: Vec<String> = s
        .order_events(4)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.kind)
        .collect();
    assert_eq!(kinds, ["created", "failed", "refunded", "note"]);
    assert_eq!(s.order_events(4).await.unwrap()[3], ev("note", 8_000));
    assert!(s.order_events(404).await.unwrap().is_empty());

    let open = s
        .orders_in_status(&[Status::AwaitingPayment, Status::Failed])
        .await
        .unwrap();
    assert_eq!(order_ids(&open), [1, 2, 3, 4, 5]);
    assert_eq!(
        order_ids(&s.orders_in_status(&[Status::Failed]).await.unwrap()),
        [4]
    );
    assert!(s.orders_in_status(&[]).await.unwrap().is_empty());
    assert!(s
        .orders_in_status(&[Status::Unknown])
        .await
        .unwrap()
        .is_empty());
}

async fn inventories_replace_snapshots(db: Db) {
    let s = db.store.as_ref();
    machines(s, &["00000001", "00000002"]).await;
    let item = |product_id, stock, price| InventoryItem {
        product_id,
        stock,
        price,
    };
    assert!(s.inventories().await.unwrap().is_empty());
    s.put_inventory(
        &no("00000001"),
        &[item(1, 5, 100), item(2, 0, 250)],
        t(1_000),
    )
    .await
    .unwrap();
    s.put_inventories(
        &[
            (no("00000002"), vec![item(7, 3, 10)]),
            // Replaces the snapshot above: product 2 is gone.
            (no("00000001"), vec![item(1, 4, 100), item(3, 9, 50)]),
        ],
        t(2_000),
    )
    .await
    .unwrap();
    let mut all = s.inventories().await.unwrap();
    all.sort_by(|x, y| x.0.as_str().cmp(y.0.as_str()));
    for (_, items) in &mut all {
        items.sort_by_key(|i| i.product_id);
    }
    assert_eq!(
        all,
        [
            (no("00000001"), vec![item(1, 4, 100), item(3, 9, 50)]),
            (no("00000002"), vec![item(7, 3, 10)]),
        ]
    );
    // An empty snapshot empties it.
    s.put_inventory(&no("00000002"), &[], t(3_000))
        .await
        .unwrap();
    assert_eq!(s.inventories().await.unwrap().len(), 1);
    // An unknown machine fails the write.
    assert!(s
        .put_inventory(&no("00000099"), &[item(1, 1, 1)], t(3_000))
        .await
        .is_err());
}

// ---------------------------------------------------------------- cluster

async fn ownership_epochs(db: Db) {
    let s = db.store.as_ref();
    machines(s, &["00000002", "00000001", "00000003"]).await;
    let m = no("00000001");
    let e1 = s.take_ownership(&m, "n1", t(1_000)).await.unwrap().unwrap();
    let e2 = s.take_ownership(&m, "n2", t(2_000)).await.unwrap().unwrap();
    assert!(e2 > e1, "{e1} then {e2}");
    // The online flag is left to the presence write at the new epoch (which
    // emits machine.online when it flips the flag).
    assert_eq!(
        s.ownership(Some(&[m])).await.unwrap(),
        [Ownership {
            machine_no: m,
            epoch: e2,
            node: Some("n2".into()),
            online: false
        }]
    );
    let row = s.machine(&m).await.unwrap().unwrap();
    assert_eq!((row.online, row.last_seen), (false, Some(t(2_000))));
    s.record_presence(&m, true, e2, t(2_000)).await.unwrap();
    // The loser's late offline write (older epoch) is stale.
    s.record_presence(&m, false, e1, t(2_500)).await.unwrap();
    assert!(s.machine(&m).await.unwrap().unwrap().online);
    // The owner's own writes at its epoch apply.
    s.record_presence(&m, true, e2, t(2_600)).await.unwrap();
    let row = s.machine(&m).await.unwrap().unwrap();
    assert_eq!(
        (row.online_since, row.last_seen),
        (Some(t(2_000)), Some(t(2_600)))
    );
    assert_eq!(
        s.take_ownership(&no("99999999"), "n1", t(1)).await.unwrap(),
        None
    );

    let all = s.ownership(None).await.unwrap();
    let nos: Vec<&str> = all.iter().map(|o| o.machine_no.as_str()).collect();
    assert_eq!(nos, ["00000001", "00000002", "00000003"]);
    assert_eq!(
        all[1],
        Ownership {
            machine_no: no("00000002"),
            epoch: 0,
            node: None,
            online: false
        }
    );
    let some = s
        .ownership(Some(&[no("00000003"), no("99999999"), no("00000001")]))
        .await
        .unwrap();
    let nos: Vec<&str> = some.iter().map(|o| o.machine_no.as_str()).collect();
    assert_eq!(nos, ["00000001", "00000003"]);
    assert!(s.ownership(Some(&[])).await.unwrap().is_empty());
}

async fn nodes_heartbeats_reaping_orphans(db: Db) {
    let s = db.store.as_ref();
    machines(s, &["00000001", "00000002", "00000003"]).await;
    assert!(s
        .register_node("n1", "i1", t(1_000))
        .await
        .unwrap()
        .is_empty());
    assert!(s
        .register_node("n2", "j1", t(1_000))
        .await
        .unwrap()
        .is_empty());
    let e1 = s
        .take_ownership(&no("00000001"), "n1", t(1_100))
        .await
        .unwrap()
        .unwrap();
    let e2 = s
        .take_ownership(&no("00000002"), "n1", t(1_100))
        .await
        .unwrap()
        .unwrap();
    let e3 = s
        .take_ownership(&no("00000003"), "n2", t(1_100))
        .await
        .unwrap()
        .unwrap();
    // The presence writes that follow each take-over.
    for (m, e) in [("00000001", e1), ("00000002", e2), ("00000003", e3)] {
        s.record_presence(&no(m), true, e, t(1_100)).await.unwrap();
    }
    // One of n1's machines went offline on its own.
    s.record_presence(&no("00000002"), false, e2, t(1_200))
        .await
        .unwrap();
    assert!(s.node_heartbeat("n1", "i1", t(2_000)).await.unwrap());
    assert!(!s.node_heartbeat("n1", "other", t(2_000)).await.unwrap());
    assert!(!s.node_heartbeat("n9", "i1", t(2_000)).await.unwrap());
    assert_eq!(
        s.nodes().await.unwrap(),
        [
            NodeRow {
                node_id: "n1".into(),
                incarnation: "i1".into(),
                started_at: t(1_000),
                heartbeat_at: t(2_000),
                online_machines: 1
            },
            NodeRow {
                node_id: "n2".into(),
                incarnation: "j1".into(),
                started_at: t(1_000),
                heartbeat_at: t(1_000),
                online_machines: 1
            }
        ]
    );
    assert!(s.orphaned_machines(10).await.unwrap().is_empty());

    // n2 stopped heartbeating: reaped once; its machine is orphaned.
    assert_eq!(s.reap_nodes(t(1_500)).await.unwrap(), ["n2"]);
    assert!(s.reap_nodes(t(1_500)).await.unwrap().is_empty());
    assert!(!s.node_heartbeat("n2", "j1", t(3_000)).await.unwrap());
    assert_eq!(
        s.orphaned_machines(10).await.unwrap(),
        [(no("00000003"), e3)]
    );
    assert!(s.orphaned_machines(0).await.unwrap().is_empty());
    // The caller writes it offline at that epoch: no longer orphaned.
    s.record_presence(&no("00000003"), false, e3, t(3_100))
        .await
        .unwrap();
    assert!(s.orphaned_machines(10).await.unwrap().is_empty());

    // n1 restarts under the same id: its previous incarnation's online
    // machines come back; the old incarnation's heartbeat fails.
    let left = s.register_node("n1", "i2", t(4_000)).await.unwrap();
    assert_eq!(left, [(no("00000001"), e1)]);
    assert!(!s.node_heartbeat("n1", "i1", t(4_001)).await.unwrap());
    assert!(s.node_heartbeat("n1", "i2", t(4_001)).await.unwrap());
    let nodes = s.nodes().await.unwrap();
    assert_eq!(nodes.len(), 1);
    assert_eq!(
        (nodes[0].incarnation.as_str(), nodes[0].started_at),
        ("i2", t(4_000))
    );
}

async fn sweeps_claim_with_leases(db: Db) {
    let s = db.store.as_ref();
    machines(s, &["00000001"]).await;
    order(s, 1, "00000001", Status::AwaitingPayment, 5_000).await;
    order(s, 2, "00000001", Status::AwaitingPayment, 4_000).await;
    order(s, 3, "00000001", Status::AwaitingPayment, 9_000).await;
    let claim = move |now: i64, limit: usize| async move {
        order_ids(
            &s.claim_due_orders(Due::Unpaid, t(now), t(now + 60_000), limit)
                .await
                .unwrap(),
        )
    };
    assert!(claim(3_999, 10).await.is_empty());
    assert_eq!(claim(6_000, 1).await, [2]);
    assert_eq!(claim(6_000, 10).await, [1]);
    assert!(claim(7_000, 10).await.is_empty());
    // The leases ran out (no compare-and-set happened): due again.
    assert_eq!(claim(66_000, 10).await, [2, 1, 3]);
    let full = s
        .claim_due_orders(Due::Unpaid, t(200_000), t(260_000), 10)
        .await
        .unwrap();
    assert_eq!(order_ids(&full), [2, 1, 3]);
    assert_eq!(full[0].lines, vec![line(0)]);
    assert_eq!(full[0].status, Status::AwaitingPayment);

    // The other kinds.
    assert!(
        to(
            s,
            2,
            Status::AwaitingPayment,
            change(Status::Dispatching, false, 10_000)
        )
        .await
    );
    assert!(
        to(
            s,
            1,
            Status::AwaitingPayment,
            change(Status::Dispatching, false, 10_000)
        )
        .await
    );
    assert!(
        to(
            s,
            1,
            Status::Dispatching,
            change(Status::Dispensing, false, 11_000)
        )
        .await
    );
    let stale = s
        .claim_due_orders(
            Due::StaleDispatch {
                updated_before: t(10_001),
            },
            t(300_000),
            t(360_000),
            10,
        )
        .await
        .unwrap();
    assert_eq!(order_ids(&stale), [2]);
    assert!(s
        .claim_due_orders(
            Due::StaleDispatch {
                updated_before: t(10_000),
            },
            t(300_000),
            t(360_000),
            10,
        )
        .await
        .unwrap()
        .is_empty());
    // Order 1's dispense deadline is 12,000.
    assert!(s
        .claim_due_orders(Due::DispenseDeadline, t(11_999), t(70_000), 10)
        .await
        .unwrap()
        .is_empty());
    let late = s
        .claim_due_orders(Due::DispenseDeadline, t(300_000), t(360_000), 10)
        .await
        .unwrap();
    assert_eq!(order_ids(&late), [1]);
    assert_eq!(late[0].dispense_deadline, Some(t(12_000)));
    assert!(s
        .claim_due_orders(Due::DispenseDeadline, t(300_000), t(360_000), 10)
        .await
        .unwrap()
        .is_empty());
    assert!(s
        .claim_due_orders(Due::Unpaid, t(900_000), t(960_000), 0)
        .await
        .unwrap()
        .is_empty());
}

async fn pending_cancels_and_open_orders(db: Db) {
    let s = db.store.as_ref();
    machines(s, &["00000001", "00000002"]).await;
    for id in 1..=4 {
        order(s, id, "00000001", Status::Dispatching, 9_000).await;
    }
    order(s, 5, "00000002", Status::AwaitingPayment, 9_000).await;
    order(s, 6, "00000001", Status::AwaitingPayment, 9_000).await;
    // 2 then 1 give up owing a cancel; 3 fails without owing one.
    assert!(
        to(
            s,
            2,
            Status::Dispatching,
            change(Status::Failed, true, 2_000)
        )
        .await
    );
    assert!(
        to(
            s,
            1,
            Status::Dispatching,
            change(Status::Failed, true, 3_000)
        )
        .await
    );
    assert!(
        to(
            s,
            3,
            Status::Dispatching,
            change(Status::Failed, false, 4_000)
        )
        .await
    );
    assert!(
        to(
            s,
            4,
            Status::Dispatching,
            change(Status::Dispensing, false, 4_000)
        )
        .await
    );
    assert_eq!(s.pending_cancels(&no("00000001")).await.unwrap(), [2, 1]);
    assert!(s.pending_cancels(&no("00000002")).await.unwrap().is_empty());
    s.cancel_delivered(2).await.unwrap();
    s.cancel_delivered(2).await.unwrap();
    s.cancel_delivered(999).await.unwrap();
    s.cancel_delivered(u64::MAX).await.unwrap();
    assert_eq!(s.pending_cancels(&no("00000001")).await.unwrap(), [1]);
    // Every change sets the flag to its value: a later change without a
    // cancel owed clears it.
    assert!(to(s, 1, Status::Failed, change(Status::Unknown, false, 5_000)).await);
    assert!(s.pending_cancels(&no("00000001")).await.unwrap().is_empty());

    let open: Vec<(u64, Status)> = s
        .open_orders(&no("00000001"))
        .await
        .unwrap()
        .iter()
        .map(|o| (o.order_id, o.status))
        .collect();
    assert_eq!(
        open,
        [(4, Status::Dispensing), (6, Status::AwaitingPayment)]
    );
    assert_eq!(
        order_ids(&s.open_orders(&no("00000002")).await.unwrap()),
        [5]
    );
    assert!(s.open_orders(&no("00000003")).await.unwrap().is_empty());
}

// ------------------------------------------------------------ concurrency

async fn concurrent_sweeps_never_share_an_order(db: Db) {
    let (a, b) = (db.store.clone(), db.another().await);
    machines(a.as_ref(), &["00000001"]).await;
    for id in 1..=60 {
        order(
            a.as_ref(),
            id,
            "00000001",
            Status::AwaitingPayment,
            1_000 + id as i64,
        )
        .await;
    }
    let sweep = |s: Arc<dyn Storage>| {
        tokio::spawn(async move {
            let mut got = Vec::new();
            for _ in 0..20 {
                let batch = s
                    .claim_due_orders(Due::Unpaid, t(5_000), t(65_000), 4)
                    .await
                    .unwrap();
                got.extend(batch.into_iter().map(|o| o.order_id));
            }
            got
        })
    };
    let (x, y) = tokio::join!(sweep(a.clone()), sweep(b.clone()));
    let mut all = x.unwrap();
    all.extend(y.unwrap());
    let n = all.len();
    all.sort_unstable();
    all.dedup();
    assert_eq!(all.len(), n, "an order was claimed twice");
    assert_eq!(n, 60);
}

async fn concurrent_outbox_claims_never_share_an_event(db: Db) {
    let (a, b) = (db.store.clone(), db.another().await);
    outbox_setup(a.as_ref()).await;
    for i in 0..120 {
        let appid = if i % 3 == 0 { "vgb" } else { "vga" };
        put(a.as_ref(), &format!("e{i:03}"), appid, 1_000 + i, 1_000).await;
    }
    let run = |s: Arc<dyn Storage>| {
        tokio::spawn(async move {
            let mut got = Vec::new();
            for _ in 0..40 {
                let none = HashMap::new();
                let batch = claim(s.as_ref(), 2_000, 5, 1_000, &none).await;
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
    assert_eq!(n, 120);
}

async fn concurrent_take_ownership_distinct_epochs(db: Db) {
    let (a, b) = (db.store.clone(), db.another().await);
    machines(a.as_ref(), &["00000001"]).await;
    let take = |s: Arc<dyn Storage>, node: &'static str| {
        tokio::spawn(async move {
            let mut mine = Vec::new();
            for i in 0..25 {
                mine.push(
                    s.take_ownership(&no("00000001"), node, t(1_000 + i))
                        .await
                        .unwrap()
                        .unwrap(),
                );
            }
            mine
        })
    };
    let (x, y, z) = tokio::join!(
        take(a.clone(), "n1"),
        take(b.clone(), "n2"),
        take(a.clone(), "n3")
    );
    let (x, y, z) = (x.unwrap(), y.unwrap(), z.unwrap());
    for mine in [&x, &y, &z] {
        assert!(mine.windows(2).all(|w| w[0] < w[1]), "{mine:?}");
    }
    let mut all: Vec<u64> = x.iter().chain(&y).chain(&z).copied().collect();
    all.sort_unstable();
    all.dedup();
    assert_eq!(all.len(), 75, "two takers got one epoch");
    let max = all[74];
    let own = &a.ownership(Some(&[no("00000001")])).await.unwrap()[0];
    assert_eq!(own.epoch, max);
    // The owner is whoever got the largest epoch.
    let winner = if x.contains(&max) {
        "n1"
    } else if y.contains(&max) {
        "n2"
    } else {
        "n3"
    };
    assert_eq!(own.node.as_deref(), Some(winner));
}

async fn concurrent_offline_writes_emit_one_event(db: Db) {
    let (a, b) = (db.store.clone(), db.another().await);
    machines(a.as_ref(), &["00000001", "00000002"]).await;
    for round in 0..15u64 {
        let epoch = 10 + round;
        let at = 1_000 * (round as i64 + 1);
        a.record_presence_batch_with_events(&[
            presence("00000001", true, epoch, at),
            presence("00000002", true, epoch, at),
        ])
        .await
        .unwrap();
        // Two nodes (say, the owner and a reaper) write the same offline at
        // once, each with its own event id, in opposite machine orders.
        let write = |s: Arc<dyn Storage>, who: &'static str, rev: bool| {
            tokio::spawn(async move {
                let mut batch: Vec<PresenceChange> = ["00000001", "00000002"]
                    .iter()
                    .map(|m| {
                        let mut c = presence(m, false, epoch, at + 1);
                        if let Some(e) = &mut c.event {
                            e.event_id = format!("{}-{who}", e.event_id);
                        }
                        c
                    })
                    .collect();
                if rev {
                    batch.reverse();
                }
                s.record_presence_batch_with_events(&batch).await.unwrap();
            })
        };
        let (x, y) = tokio::join!(write(a.clone(), "a", false), write(b.clone(), "b", true));
        x.unwrap();
        y.unwrap();
    }
    let (events, total) = a.list_outbox("vga", None, 0, 1_000).await.unwrap();
    let offline = events
        .iter()
        .filter(|e| e.kind == "machine.offline")
        .count();
    let online = events.iter().filter(|e| e.kind == "machine.online").count();
    assert_eq!((online, offline), (30, 30), "one event per flip");
    assert_eq!(total, 60);
    for m in ["00000001", "00000002"] {
        assert!(!a.machine(&no(m)).await.unwrap().unwrap().online);
    }
}

async fn concurrent_compare_and_set_has_one_winner(db: Db) {
    let (a, b) = (db.store.clone(), db.another().await);
    machines(a.as_ref(), &["00000001"]).await;
    for id in 1..=20 {
        order(a.as_ref(), id, "00000001", Status::AwaitingPayment, 9_000).await;
    }
    // Expiry on one node, payment on another, for every order.
    let run = |s: Arc<dyn Storage>, to_status: Status| {
        tokio::spawn(async move {
            let mut won = Vec::new();
            for id in 1..=20 {
                let c = change(to_status, false, 5_000);
                if s.update_order(
                    id,
                    Status::AwaitingPayment,
                    &c,
                    &ev(to_status.as_str(), 5_000),
                    &[],
                )
                .await
                .unwrap()
                {
                    won.push(id);
                }
            }
            won
        })
    };
    let (x, y) = tokio::join!(
        run(a.clone(), Status::Expired),
        run(b.clone(), Status::Dispatching)
    );
    let (x, y) = (x.unwrap(), y.unwrap());
    assert_eq!(x.len() + y.len(), 20, "each order changed exactly once");
    for id in 1..=20u64 {
        let o = a.order(id).await.unwrap().unwrap();
        let want = if x.contains(&id) {
            Status::Expired
        } else {
            Status::Dispatching
        };
        assert_eq!(o.status, want);
        assert_eq!(a.order_events(id).await.unwrap().len(), 2);
    }
}

async fn concurrent_reapers_get_each_node_once(db: Db) {
    let (a, b) = (db.store.clone(), db.another().await);
    for i in 0..30 {
        a.register_node(&format!("n{i:02}"), "x", t(1_000))
            .await
            .unwrap();
    }
    a.register_node("alive", "x", t(9_000)).await.unwrap();
    let reap =
        |s: Arc<dyn Storage>| tokio::spawn(async move { s.reap_nodes(t(5_000)).await.unwrap() });
    let (x, y) = tokio::join!(reap(a.clone()), reap(b.clone()));
    let mut all = x.unwrap();
    all.extend(y.unwrap());
    let n = all.len();
    all.sort();
    all.dedup();
    assert_eq!((all.len(), n), (30, 30));
    assert_eq!(a.nodes().await.unwrap().len(), 1);
}

async fn ping_and_close(db: Db) {
    let s = db.store.clone();
    s.ping().await.unwrap();
    s.close().await;
    let err = s.ping().await.unwrap_err();
    assert!(matches!(err, StorageError::Backend(_)), "{err:?}");
    let err = s.merchant("vga").await.unwrap_err();
    assert!(matches!(err, StorageError::Backend(_)), "{err:?}");
}

// ------------------------------------------------------------ open, PG only

#[tokio::test]
async fn unknown_database_schemes_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut settings = Settings::for_tests(dir.path());
    settings.database_url = "mysql://user:hunter2@db/vend".into();
    let err = storage::open(&settings).await.err().expect("refused");
    let chain = format!("{:#}", anyhow::Error::from(err));
    assert!(chain.contains("\"mysql\""), "{chain}");
    assert!(!chain.contains("hunter2"), "{chain}");
}

#[tokio::test]
async fn postgres_concurrent_first_opens_migrate_once() {
    let url = PgServer::shared_async().await.create_database().await;
    let dir = tempfile::tempdir().unwrap();
    let mut settings = Settings::for_tests(dir.path());
    settings.database_url = url;
    let opens = (0..6).map(|_| {
        let settings = settings.clone();
        tokio::spawn(async move { storage::open(&settings).await.map(|_| ()) })
    });
    for o in opens.collect::<Vec<_>>() {
        o.await.unwrap().unwrap();
    }
    // And once more on the migrated database.
    let s = storage::open(&settings).await.unwrap();
    merchant(s.as_ref(), "vga", None).await;
}

#[tokio::test]
async fn postgres_down_fails_fast_and_recovers() {
    let server = PgServer::dedicated().await;
    let dir = tempfile::tempdir().unwrap();
    let mut settings = Settings::for_tests(dir.path());
    settings.database_url = server.create_database().await;
    settings.database.acquire_timeout = Duration::from_secs(1);
    let s = storage::open(&settings).await.unwrap();
    machines(s.as_ref(), &["00000001"]).await;

    server.stop().await;
    for _ in 0..3 {
        let started = Instant::now();
        let err = s.machine(&no("00000001")).await.unwrap_err();
        assert!(matches!(err, StorageError::Backend(_)), "{err:?}");
        let err = s.ping().await.unwrap_err();
        assert!(matches!(err, StorageError::Backend(_)), "{err:?}");
        let took = started.elapsed();
        assert!(took < Duration::from_secs(5), "{took:?}");
    }
    // Opening fails within the timeout too.
    let started = Instant::now();
    assert!(storage::open(&settings).await.is_err());
    assert!(started.elapsed() < Duration::from_secs(5));

    server.start().await;
    s.ping().await.unwrap();
    assert!(s.machine(&no("00000001")).await.unwrap().is_some());
}

/// The acceptance compare-and-set: `dispatching → dispensing` succeeds only
/// while the stored `accept_by` is later than the given instant, and never
/// twice; a refund keeps what was refunded apart from what is owed.
async fn orders_acceptance_only_before_accept_by(db: Db) {
    let s = db.store.as_ref();
    outbox_setup(s).await;
    for id in [1, 2] {
        s.insert_order(
            &NewOrder {
                accept_by: Some(t(4_000)),
                ..new_order(id, "00000001", Status::Dispatching, 9_000)
            },
            &ev("created", 1_000),
        )
        .await
        .unwrap();
    }
    let accept = |before: i64| OrderChange {
        only_before_accept_by: Some(t(before)),
        accept_by: Some(t(4_000)),
        ..change(Status::Dispensing, false, before)
    };
    let cas = |id: u64, c: OrderChange| async move {
        s.update_order(id, Status::Dispatching, &c, &ev("accepted", 0), &[])
            .await
            .unwrap()
    };
    // At or past accept_by: refused, nothing written.
    assert!(!cas(1, accept(4_000)).await);
    assert_eq!(
        s.order(1).await.unwrap().unwrap().status,
        Status::Dispatching
    );
    // Before it: the acceptance is recorded, once.
    assert!(cas(2, accept(3_999)).await);
    assert!(!cas(2, accept(3_999)).await);
    let o = s.order(2).await.unwrap().unwrap();
    assert_eq!(
        (o.status, o.accept_by),
        (Status::Dispensing, Some(t(4_000)))
    );
    // The give-up of order 1 needs no deadline condition.
    assert!(
        to(
            s,
            1,
            Status::Dispatching,
            change(Status::Rejected, true, 5_000)
        )
        .await
    );
    // Refund recorded: refunded_amount keeps what was owed then.
    assert!(
        to(
            s,
            2,
            Status::Dispensing,
            OrderChange {
                refund_amount: 300,
                ..change(Status::Unknown, false, 6_000)
            }
        )
        .await
    );
    assert!(s
        .mark_refunded(2, t(7_000), &ev("refunded", 7_000))
        .await
        .unwrap());
    let o = s.order(2).await.unwrap().unwrap();
    assert_eq!((o.refund_amount, o.refunded_amount), (300, 300));
    assert!(
        to(
            s,
            2,
            Status::Unknown,
            OrderChange {
                refund_amount: 0,
                result_applied: true,
                ..change(Status::Completed, false, 8_000)
            }
        )
        .await
    );
    let o = s.order(2).await.unwrap().unwrap();
    assert_eq!((o.refund_amount, o.refunded_amount), (0, 300));
}

/// Events beside status changes are capped per order; the ones past the cap
/// are counted on the order, status changes are always kept.
async fn orders_timeline_extra_events_are_capped(db: Db) {
    let s = db.store.as_ref();
    outbox_setup(s).await;
    order(s, 1, "00000001", Status::Dispatching, 9_000).await;
    let extra = vendgate::storage::MAX_EXTRA_EVENTS;
    for i in 0..extra + 5 {
        s.append_order_event(1, &ev("cancel_sent", 2_000 + i))
            .await
            .unwrap();
    }
    assert!(
        to(
            s,
            1,
            Status::Dispatching,
            change(Status::Rejected, false, 9_000)
        )
        .await
    );
    let events = s.order_events(1).await.unwrap();
    // created + the capped extras + the status change.
    assert_eq!(events.len() as i64, 1 + extra + 1);
    assert_eq!(events.last().map(|e| e.kind.as_str()), Some("rejected"));
    assert_eq!(s.order(1).await.unwrap().unwrap().events_dropped, 5);
}

// ---------------------------------------------------------------- lifecycle

async fn machine_disable_remove_transfer(db: Db) {
    let s = db.store.as_ref();
    machines(s, &["00000001", "00000002"]).await;
    merchant(s, "vgb", None).await;

    assert!(s
        .set_machine_disabled(&no("00000001"), Some(t(5_000)))
        .await
        .unwrap());
    let m = s.machine(&no("00000001")).await.unwrap().unwrap();
    assert_eq!(m.disabled_at, Some(t(5_000)));
    assert!(!m.is_active());
    assert_eq!(s.blocked_machines().await.unwrap(), vec![no("00000001")]);
    assert!(s.set_machine_disabled(&no("00000001"), None).await.unwrap());
    assert!(s
        .machine(&no("00000001"))
        .await
        .unwrap()
        .unwrap()
        .is_active());
    assert!(s.blocked_machines().await.unwrap().is_empty());
    assert!(!s
        .set_machine_disabled(&no("00000009"), Some(t(1)))
        .await
        .unwrap());

    // An order in flight blocks removal and transfer.
    order(s, 10, "00000001", Status::Dispatching, 1 << 40).await;
    let revoked = SecretHash::new("nobody-knows");
    assert_eq!(
        s.remove_machine(&no("00000001"), &revoked, t(6_000))
            .await
            .unwrap(),
        storage::MachineChange::OrdersInFlight(1)
    );
    assert_eq!(
        s.transfer_machine(&no("00000001"), "vgb").await.unwrap(),
        storage::MachineChange::OrdersInFlight(1)
    );
    assert!(s
        .machine(&no("00000001"))
        .await
        .unwrap()
        .unwrap()
        .is_active());

    // Transfer: to an existing merchant only.
    assert!(matches!(
        s.transfer_machine(&no("00000002"), "vgnope").await,
        Err(StorageError::UnknownMerchant)
    ));
    assert_eq!(
        s.transfer_machine(&no("00000002"), "vgb").await.unwrap(),
        storage::MachineChange::Done
    );
    assert_eq!(
        s.machine(&no("00000002"))
            .await
            .unwrap()
            .unwrap()
            .merchant_appid,
        "vgb"
    );
    assert_eq!(
        s.transfer_machine(&no("00000009"), "vgb").await.unwrap(),
        storage::MachineChange::NotFound
    );

    // Once the order is final: removed, secrets revoked, history kept.
    assert!(
        to(
            s,
            10,
            Status::Dispatching,
            change(Status::Failed, false, 7_000)
        )
        .await
    );
    s.rotate_machine_secret(
        &no("00000001"),
        &SecretHash::new("second"),
        Some(t(4_000_000_000_000)),
    )
    .await
    .unwrap();
    assert_eq!(
        s.remove_machine(&no("00000001"), &revoked, t(8_000))
            .await
            .unwrap(),
        storage::MachineChange::Done
    );
    let m = s.machine(&no("00000001")).await.unwrap().unwrap();
    assert_eq!(m.removed_at, Some(t(8_000)));
    assert!(m.secret_hash.verify("nobody-knows"));
    assert!(!m.secret_hash.verify("secret-00000001"));
    assert!(
        m.previous_secret.is_none(),
        "the previous secret is revoked too"
    );
    assert_eq!(s.blocked_machines().await.unwrap(), vec![no("00000001")]);
    let o = s.order(10).await.unwrap().expect("history kept");
    assert_eq!(o.merchant_appid, "vga");
    assert_eq!(
        s.remove_machine(&no("00000001"), &revoked, t(9_000))
            .await
            .unwrap(),
        storage::MachineChange::NotFound
    );
    assert!(!s.set_machine_disabled(&no("00000001"), None).await.unwrap());
    assert_eq!(
        s.transfer_machine(&no("00000001"), "vgb").await.unwrap(),
        storage::MachineChange::NotFound
    );
    // Another handle (the CLI's process) sees the same.
    let other = db.another().await;
    assert!(other
        .machine(&no("00000001"))
        .await
        .unwrap()
        .unwrap()
        .removed_at
        .is_some());
}

async fn merchant_disable_holds_webhooks_and_notify_url(db: Db) {
    let s = db.store.as_ref();
    outbox_setup(s).await;
    put(s, "e1", "vga", 1, 1_000).await;
    put(s, "e2", "vgb", 2, 1_000).await;
    assert!(s
        .set_merchant_disabled("vga", Some(t(1_500)))
        .await
        .unwrap());
    assert_eq!(
        s.merchant("vga").await.unwrap().unwrap().disabled_at,
        Some(t(1_500))
    );
    let none = HashMap::new();
    // vga's event is held; vgb's goes.
    assert_eq!(ids(&claim(s, 2_000, 10, 10, &none).await), ["e2"]);
    assert!(claim(s, 3_000, 10, 10, &none).await.is_empty());
    assert!(s.set_merchant_disabled("vga", None).await.unwrap());
    assert!(s
        .merchant("vga")
        .await
        .unwrap()
        .unwrap()
        .disabled_at
        .is_none());
    assert_eq!(ids(&claim(s, 4_000, 10, 10, &none).await), ["e1"]);
    assert!(!s.set_merchant_disabled("vgnope", None).await.unwrap());

    assert!(s
        .set_merchant_notify_url("vga", Some("https://new.example/h"))
        .await
        .unwrap());
    assert_eq!(
        s.merchant("vga")
            .await
            .unwrap()
            .unwrap()
            .notify_url
            .as_deref(),
        Some("https://new.example/h")
    );
    assert!(s.set_merchant_notify_url("vga", None).await.unwrap());
    assert!(s
        .merchant("vga")
        .await
        .unwrap()
        .unwrap()
        .notify_url
        .is_none());
    assert!(!s.set_merchant_notify_url("vgnope", None).await.unwrap());
}

async fn services_list_and_remove(db: Db) {
    let s = db.store.as_ref();
    for u in ["svc-b", "svc-a"] {
        s.create_service(NewService {
            name: format!("name {u}"),
            username: u.into(),
            password_hash: SecretHash::new("pw"),
        })
        .await
        .unwrap();
    }
    let listed: Vec<String> = s
        .list_services()
        .await
        .unwrap()
        .into_iter()
        .map(|a| a.username)
        .collect();
    assert_eq!(listed, ["svc-a", "svc-b"]);
    assert!(s.remove_service("svc-a").await.unwrap());
    assert!(!s.remove_service("svc-a").await.unwrap());
    assert!(s.service("svc-a").await.unwrap().is_none());
    assert_eq!(s.list_services().await.unwrap().len(), 1);
}

async fn export_pages_in_creation_order(db: Db) {
    let s = db.store.as_ref();
    machines(s, &["00000001"]).await;
    merchant(s, "vgb", None).await;
    s.create_machine(new_machine("00000002", "vgb"))
        .await
        .unwrap();
    // Two orders share a creation time: the order id breaks the tie.
    for (id, created, m, appid) in [
        (5u64, 3_000, "00000001", "vga"),
        (3, 2_000, "00000001", "vga"),
        (4, 2_000, "00000002", "vgb"),
        (1, 1_000, "00000001", "vga"),
        (9, 9_000, "00000001", "vga"),
    ] {
        s.insert_order(
            &NewOrder {
                merchant_appid: appid.into(),
                machine_no: no(m),
                created_at: t(created),
                ..new_order(id, m, Status::Completed, 1 << 40)
            },
            &ev("created", created),
        )
        .await
        .unwrap();
    }
    let mut seen = Vec::new();
    let mut after = None;
    loop {
        let page = s
            .export_orders(&storage::OrderPage {
                from: t(1_000),
                to: t(9_000),
                merchant: None,
                after,
                limit: 2,
            })
            .await
            .unwrap();
        seen.extend(page.iter().map(|o| o.order_id));
        match page.last() {
            Some(o) if page.len() == 2 => after = Some((o.created_at, o.order_id)),
            _ => break,
        }
    }
    assert_eq!(seen, [1, 3, 4, 5], "[from, to), by (created_at, order_id)");
    let vgb = s
        .export_orders(&storage::OrderPage {
            from: t(0),
            to: t(10_000),
            merchant: Some("vgb"),
            after: None,
            limit: 10,
        })
        .await
        .unwrap();
    assert_eq!(vgb.len(), 1);
    assert_eq!(vgb[0].order_id, 4);
    assert_eq!(vgb[0].lines, vec![line(0)]);
}

async fn retention_purges_in_batches_and_keeps_protected(db: Db) {
    let s = db.store.as_ref();
    machines(s, &["00000001"]).await;
    let old = 2_000;
    // Plain final orders, old: purged.
    for id in [1, 2, 3] {
        order(s, id, "00000001", Status::Dispensing, 1 << 40).await;
        assert!(
            to(
                s,
                id,
                Status::Dispensing,
                change(Status::Completed, false, old)
            )
            .await
        );
    }
    // Protected: unknown; rejected with goods out; refund owed; cancel owed.
    order(s, 4, "00000001", Status::Dispensing, 1 << 40).await;
    assert!(
        to(
            s,
            4,
            Status::Dispensing,
            change(Status::Unknown, false, old)
        )
        .await
    );
    order(s, 5, "00000001", Status::Dispatching, 1 << 40).await;
    let rejected_out = OrderChange {
        lines: vec![line(1)],
        result_applied: true,
        ..change(Status::Rejected, false, old)
    };
    assert!(to(s, 5, Status::Dispatching, rejected_out).await);
    order(s, 6, "00000001", Status::Dispensing, 1 << 40).await;
    let refund_owed = OrderChange {
        lines: vec![line(1)],
        result_applied: true,
        refund_amount: 150,
        ..change(Status::PartiallyDispensed, false, old)
    };
    assert!(to(s, 6, Status::Dispensing, refund_owed).await);
    order(s, 7, "00000001", Status::Dispatching, 1 << 40).await;
    assert!(
        to(
            s,
            7,
            Status::Dispatching,
            change(Status::Rejected, true, old)
        )
        .await
    );
    // Not final, recent, or with a webhook still pending: kept.
    order(s, 8, "00000001", Status::Dispensing, 1 << 40).await;
    order(s, 9, "00000001", Status::Dispensing, 1 << 40).await;
    assert!(
        to(
            s,
            9,
            Status::Dispensing,
            change(Status::Completed, false, 900_000)
        )
        .await
    );
    put(s, "pending-10", "vga", 10, old).await;
    assert!(
        to(
            s,
            10,
            Status::AwaitingPayment,
            change(Status::Expired, false, old)
        )
        .await
    );
    // A rejected order without goods out is not protected.
    order(s, 11, "00000001", Status::Dispatching, 1 << 40).await;
    assert!(
        to(
            s,
            11,
            Status::Dispatching,
            change(Status::Rejected, false, old)
        )
        .await
    );

    let rule = storage::OrderPurge {
        before: t(500_000),
        protected_before: t(1_000),
        limit: 2,
    };
    let first = s.purge_orders(&rule).await.unwrap();
    assert_eq!(first.orders, 2, "at most one batch");
    assert!(first.order_events >= 4, "their timelines go too: {first:?}");
    let second = s.purge_orders(&rule).await.unwrap();
    assert_eq!(second.orders, 2);
    assert_eq!(
        s.purge_orders(&rule).await.unwrap(),
        storage::Purged::default()
    );
    for id in [1, 2, 3, 11] {
        assert!(s.order(id).await.unwrap().is_none(), "order {id} purged");
        assert!(s.order_events(id).await.unwrap().is_empty());
    }
    for id in [4, 5, 6, 7, 8, 9, 10] {
        assert!(s.order(id).await.unwrap().is_some(), "order {id} kept");
    }

    // Past the protection too: the protected ones go, the rest stay.
    let later = storage::OrderPurge {
        protected_before: t(500_000),
        limit: 100,
        ..rule
    };
    assert_eq!(s.purge_orders(&later).await.unwrap().orders, 4);
    for id in [8, 9, 10] {
        assert!(s.order(id).await.unwrap().is_some(), "order {id} kept");
    }
    assert!(s.database_size().await.unwrap() > 0);
}

async fn retention_purges_finished_webhook_rows(db: Db) {
    let s = db.store.as_ref();
    outbox_setup(s).await;
    put(s, "delivered", "vga", 1, 1_000).await;
    put(s, "dead", "vga", 2, 1_000).await;
    put(s, "pending", "vga", 3, 1_000).await;
    put(s, "recent", "vga", 4, 50_000).await;
    let none = HashMap::new();
    assert_eq!(claim(s, 60_000, 10, 10, &none).await.len(), 4);
    s.record_attempt(&Attempt {
        http_status: Some(200),
        error: None,
        ..failed("delivered", 60_001, AttemptResult::Delivered)
    })
    .await
    .unwrap();
    s.record_attempt(&failed("dead", 60_001, AttemptResult::Dead))
        .await
        .unwrap();
    s.record_attempt(&Attempt {
        http_status: Some(200),
        error: None,
        ..failed("recent", 60_001, AttemptResult::Delivered)
    })
    .await
    .unwrap();
    s.record_attempt(&failed(
        "pending",
        60_001,
        AttemptResult::RetryAt(t(90_000)),
    ))
    .await
    .unwrap();
    let first = s.purge_webhooks(t(10_000), 1).await.unwrap();
    assert_eq!(first.webhooks, 1, "one batch of one");
    assert_eq!(s.purge_webhooks(t(10_000), 10).await.unwrap().webhooks, 1);
    assert_eq!(s.purge_webhooks(t(10_000), 10).await.unwrap().webhooks, 0);
    // The pending and the recent rows are left.
    let left: Vec<String> = s
        .list_outbox("vga", None, 0, 100)
        .await
        .unwrap()
        .0
        .into_iter()
        .map(|e| e.event_id)
        .collect();
    assert_eq!(left.len(), 2, "{left:?}");
}
