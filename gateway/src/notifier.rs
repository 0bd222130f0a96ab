//! Webhook notifier: delivers the outbox to merchants' `notify_url`s
//! (API.md "Notifications"). Event rows are written by the order and
//! presence paths in the same transaction as the change they describe; this
//! module only reads them, POSTs them signed, and records every attempt.
//!
//! - **At least once, in order per key**: an event is claimed only when it
//!   is the first pending event of its `order_key` (storage/outbox.rs), and
//!   it stays pending until a 2xx answer, so event N+1 of an order never
//!   leaves while N may still be retried. A crash mid-delivery leaves the
//!   event leased; it is retried when the lease runs out.
//! - **Retries**: any non-2xx, timeout or connection error retries after an
//!   exponential backoff with full jitter (a random wait up to
//!   min(cap, base × 2^(n-1))) until `retry_for` has passed since the event
//!   became pending; then it is dead with its last error, and the merchant
//!   can replay it.
//! - **Isolation**: at most `per_merchant_concurrency` deliveries per
//!   merchant and `concurrency` in all, so a slow or dead merchant holds
//!   only its own slots; claims never give one event to two workers.
//! - **Signature**: `Vendgate-Signature: t=<unix s>,v1=<hex HMAC-SHA256 of
//!   "t.body" keyed by the AppSecret>`; the AppSecret comes from its
//!   encrypted copy (secrets.rs).
//! - **Targets** are checked at every delivery ([`target`]).

pub mod target;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use hmac::{Hmac, Mac};
use rand::Rng;
use sha2::Sha256;
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::config::NotifierSettings;
use crate::secrets::WebhookKey;
use crate::storage::{
    Attempt, AttemptResult, ClaimRequest, ClaimedEvent, OutboxBacklog, Storage, StorageError,
};
use target::{GuardedResolver, RefusedTarget};

/// The `Vendgate-Signature` header value for `body` sent at unix time `t`.
pub fn signature(app_secret: &str, t: i64, body: &str) -> String {
    // HMAC takes keys of any length, so `new_from_slice` cannot fail; the
    // fallback keeps this free of `expect` (and would never verify).
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(app_secret.as_bytes()) else {
        return format!("t={t},v1=");
    };
    mac.update(t.to_string().as_bytes());
    mac.update(b".");
    mac.update(body.as_bytes());
    format!("t={t},v1={}", hex::encode(mac.finalize().into_bytes()))
}

/// Counters (exported by the metrics module).
#[derive(Debug, Default)]
pub struct NotifierStats {
    pub delivered: AtomicU64,
    pub failed_attempts: AtomicU64,
    pub dead: AtomicU64,
    pub refused_targets: AtomicU64,
}

/// Largest part of a merchant's answer read (and ignored); reading it lets
/// the connection be reused.
const MAX_ANSWER: usize = 64 * 1024;
/// Extra time a claim's lease gives beyond the attempt timeout, for
/// recording the attempt. Also how long the events a dead node had claimed
/// wait beyond the timeout before another node retries them: short, since
/// recording an attempt is one small transaction.
const LEASE_MARGIN: Duration = Duration::from_secs(5);
/// Longest wait after a failed claim (storage trouble) before trying again.
const CLAIM_ERROR_PAUSE: Duration = Duration::from_secs(1);

/// How one attempt failed.
#[derive(Debug)]
enum Failure {
    /// Retry later.
    Retry {
        http_status: Option<u16>,
        /// What is stored and shown to the merchant (`last_error`, the
        /// order timeline): a category, never a host name or an address,
        /// which would tell the merchant about the gateway's network.
        error: String,
        /// The full cause, for the gateway's own log.
        detail: String,
        refused: bool,
    },
    /// Retrying cannot help until an operator acts (no notify_url, nothing
    /// to sign with): dead now, replayable.
    Permanent(String),
}

/// The notifier. Build with [`Notifier::new`], run with [`Notifier::run`].
pub struct Notifier {
    store: Arc<dyn Storage>,
    key: Arc<WebhookKey>,
    settings: NotifierSettings,
    client: reqwest::Client,
    wake: Notify,
    pub stats: NotifierStats,
}

impl Notifier {
    pub fn new(
        store: Arc<dyn Storage>,
        key: Arc<WebhookKey>,
        settings: NotifierSettings,
    ) -> anyhow::Result<Arc<Self>> {
        let client = reqwest::Client::builder()
            // Addresses come from the guarded resolver only (see `target`).
            .dns_resolver(Arc::new(GuardedResolver {
                allow_private: settings.allow_private_targets,
            }))
            // A proxy would pick the address itself, past the guard.
            .no_proxy()
            // A redirect could point anywhere; a 3xx is a failed attempt.
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(settings.timeout)
            .timeout(settings.timeout)
            .pool_max_idle_per_host(settings.per_merchant_concurrency.max(1))
            .pool_idle_timeout(Duration::from_secs(60))
            .user_agent(concat!("vendgate-webhook/", env!("CARGO_PKG_VERSION")))
            .build()?;
        if settings.allow_private_targets {
            warn!("notifier.allow_private_targets is on: webhooks may reach private and loopback addresses");
        }
        Ok(Arc::new(Self {
            store,
            key,
            settings,
            client,
            wake: Notify::new(),
            stats: NotifierStats::default(),
        }))
    }

    /// Look at the outbox now rather than at the next poll (call after
    /// writing events). A wake while the notifier is busy is kept, not lost.
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// Pending events and the oldest one's creation, for metrics.
    pub async fn backlog(&self) -> Result<OutboxBacklog, StorageError> {
        self.store.outbox_backlog().await
    }

    /// Deliver until `shutdown` fires; then stop claiming, give in-flight
    /// deliveries their timeout to finish and record, and return.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let per_merchant = self.settings.per_merchant_concurrency.max(1);
        let global = self.settings.concurrency.max(1);
        let lease = self.settings.timeout + LEASE_MARGIN;
        // In-flight deliveries by merchant, and which merchant each task
        // serves (so a panicked task still gives its slot back).
        let mut in_flight: HashMap<String, usize> = HashMap::new();
        let mut owners: HashMap<tokio::task::Id, String> = HashMap::new();
        // Every delivery is a task here, so its length is the global count
        // (finished but not yet joined tasks count until joined: a slot is
        // reused a moment late, never early).
        let mut tasks: JoinSet<()> = JoinSet::new();
        info!("webhook notifier running");
        loop {
            let free = global.saturating_sub(tasks.len());
            let mut pause = self.settings.poll_interval;
            if free > 0 {
                let now = Utc::now();
                let req = ClaimRequest {
                    now,
                    lease_until: now
                        + chrono::Duration::from_std(lease)
                            .unwrap_or_else(|_| chrono::Duration::seconds(60)),
                    limit: free,
                    per_merchant,
                    in_flight: &in_flight,
                };
                match self.store.claim_outbox(&req).await {
                    Ok(batch) => {
                        for ev in batch {
                            let merchant = ev.merchant_appid.clone();
                            *in_flight.entry(merchant.clone()).or_default() += 1;
                            let me = self.clone();
                            let handle = tasks.spawn(async move { me.attempt(ev).await });
                            owners.insert(handle.id(), merchant);
                        }
                    }
                    Err(e) => {
                        warn!(error = %e, "claiming webhook events failed");
                        pause = pause.max(CLAIM_ERROR_PAUSE);
                    }
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(pause) => {}
                Some(done) = tasks.join_next_with_id(), if !tasks.is_empty() => {
                    finished(done, &mut owners, &mut in_flight);
                }
            }
        }
        // Each delivery is bounded by its timeout; recording takes little.
        let drain = self.settings.timeout + Duration::from_secs(5);
        let drained = tokio::time::timeout(drain, async {
            while let Some(done) = tasks.join_next_with_id().await {
                finished(done, &mut owners, &mut in_flight);
            }
        })
        .await;
        if drained.is_err() {
            warn!(
                left = tasks.len(),
                "webhook deliveries still running at shutdown were abandoned; they are retried after their lease"
            );
            tasks.abort_all();
        }
        info!("webhook notifier stopped");
    }

    /// One attempt at one claimed event, recorded whatever happens.
    async fn attempt(&self, ev: ClaimedEvent) {
        let outcome = self.deliver(&ev).await;
        let at = Utc::now();
        let attempt = match outcome {
            Ok(status) => {
                self.stats.delivered.fetch_add(1, Ordering::Relaxed);
                debug!(event_id = %ev.event_id, appid = %ev.merchant_appid, status, "webhook delivered");
                Attempt {
                    event_id: ev.event_id.clone(),
                    at,
                    http_status: Some(status),
                    error: None,
                    result: AttemptResult::Delivered,
                }
            }
            Err(Failure::Retry {
                http_status,
                error,
                detail,
                refused,
            }) => {
                self.stats.failed_attempts.fetch_add(1, Ordering::Relaxed);
                if refused {
                    self.stats.refused_targets.fetch_add(1, Ordering::Relaxed);
                }
                let result = after_failure(&self.settings, &ev, at);
                match result {
                    AttemptResult::Dead => {
                        self.stats.dead.fetch_add(1, Ordering::Relaxed);
                        warn!(event_id = %ev.event_id, appid = %ev.merchant_appid, attempts = ev.attempts + 1, error = %error, %detail, "webhook dead: retries exhausted");
                    }
                    _ => {
                        debug!(event_id = %ev.event_id, appid = %ev.merchant_appid, error = %error, %detail, "webhook attempt failed; will retry");
                    }
                }
                Attempt {
                    event_id: ev.event_id.clone(),
                    at,
                    http_status,
                    error: Some(error),
                    result,
                }
            }
            Err(Failure::Permanent(error)) => {
                self.stats.dead.fetch_add(1, Ordering::Relaxed);
                warn!(event_id = %ev.event_id, appid = %ev.merchant_appid, error = %error, "webhook dead: cannot be delivered");
                Attempt {
                    event_id: ev.event_id.clone(),
                    at,
                    http_status: None,
                    error: Some(error),
                    result: AttemptResult::Dead,
                }
            }
        };
        if let Err(e) = self.store.record_attempt(&attempt).await {
            // The lease runs out and the event is tried again: at least once.
            warn!(event_id = %ev.event_id, error = %e, "webhook attempt not recorded");
        }
    }

    /// POST the event; Ok(status) on 2xx.
    async fn deliver(&self, ev: &ClaimedEvent) -> Result<u16, Failure> {
        let Some(url) = ev.notify_url.as_deref() else {
            return Err(Failure::Permanent(
                "the merchant has no notify_url; set one, then replay".into(),
            ));
        };
        let Some(enc) = ev.appsecret_enc.as_deref() else {
            return Err(Failure::Permanent(
                "cannot sign: the merchant has no encrypted AppSecret (it was created before \
                 webhook signing)"
                    .into(),
            ));
        };
        let secret = self.key.decrypt(&ev.merchant_appid, enc).map_err(|e| {
            Failure::Permanent(format!("cannot sign: the merchant's AppSecret: {e}"))
        })?;
        let url = target::check_url(url, self.settings.allow_private_targets).map_err(|e| {
            Failure::Retry {
                http_status: None,
                error: ErrorCategory::BlockedAddress.as_str().into(),
                detail: e.to_string(),
                refused: true,
            }
        })?;
        let t = Utc::now().timestamp();
        let request = self
            .client
            .post(url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header("Vendgate-Event-Id", &ev.event_id)
            .header("Vendgate-Signature", signature(&secret, t, &ev.body))
            .body(ev.body.clone());
        // The client's timeout covers the request; this one also covers
        // reading the answer, so a merchant trickling bytes cannot hold a
        // slot longer.
        let timeout = self.settings.timeout;
        let sent = tokio::time::timeout(timeout, async {
            let mut answer = request.send().await?;
            let status = answer.status().as_u16();
            let mut read = 0usize;
            while read < MAX_ANSWER {
                match answer.chunk().await? {
                    Some(c) => read += c.len(),
                    None => break,
                }
            }
            Ok::<u16, reqwest::Error>(status)
        })
        .await;
        match sent {
            Err(_) => Err(Failure::Retry {
                http_status: None,
                error: ErrorCategory::Timeout.as_str().into(),
                detail: format!("timed out after {}", humanize(timeout)),
                refused: false,
            }),
            Ok(Err(e)) => {
                let refused = refused_in(&e);
                let (category, detail) = match &refused {
                    Some(r) => (ErrorCategory::BlockedAddress, r.to_string()),
                    None => (ErrorCategory::of(&e), error_chain(&e.without_url())),
                };
                Err(Failure::Retry {
                    http_status: None,
                    error: category.as_str().into(),
                    detail,
                    refused: refused.is_some(),
                })
            }
            Ok(Ok(status)) if (200..300).contains(&status) => Ok(status),
            Ok(Ok(status)) => Err(Failure::Retry {
                http_status: Some(status),
                // Redirects are not followed: a 3xx is a failure too.
                error: format!("http_{status}"),
                detail: format!("HTTP {status}"),
                refused: false,
            }),
        }
    }
}

/// What a failed attempt shows the merchant: a fixed word, never the
/// client library's text (which names hosts and addresses), plus
/// `http_{status}` for answers that were not 2xx.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCategory {
    /// The target is not a public address (the SSRF guard), or no address.
    BlockedAddress,
    Timeout,
    /// DNS, TCP or TLS did not get to a connection.
    ConnectFailed,
    /// The connection broke while sending or reading.
    RequestFailed,
}

impl ErrorCategory {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::BlockedAddress => "blocked_address",
            Self::Timeout => "timeout",
            Self::ConnectFailed => "connect_failed",
            Self::RequestFailed => "request_failed",
        }
    }

    fn of(e: &reqwest::Error) -> Self {
        if e.is_timeout() {
            Self::Timeout
        } else if e.is_connect() {
            Self::ConnectFailed
        } else {
            Self::RequestFailed
        }
    }
}

/// A stored `last_error` as the API shows it. Attempts recorded before
/// errors were stored as categories hold the client's text, with host names
/// and addresses in it; they are shown as their category.
pub fn shown_error(stored: &str) -> String {
    let known = [
        ErrorCategory::BlockedAddress,
        ErrorCategory::Timeout,
        ErrorCategory::ConnectFailed,
        ErrorCategory::RequestFailed,
    ];
    if known.iter().any(|c| c.as_str() == stored)
        || stored
            .strip_prefix("http_")
            .is_some_and(|n| n.len() == 3 && n.bytes().all(|b| b.is_ascii_digit()))
        || stored.starts_with("cannot sign: ")
        || stored.starts_with("the merchant has no notify_url")
    {
        return stored.to_string();
    }
    if let Some(n) = stored
        .strip_prefix("HTTP ")
        .and_then(|r| r.get(..3))
        .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
    {
        return format!("http_{n}");
    }
    let category = if stored.starts_with("refused target:") {
        ErrorCategory::BlockedAddress
    } else if stored.starts_with("timed out") {
        ErrorCategory::Timeout
    } else {
        ErrorCategory::RequestFailed
    };
    category.as_str().to_string()
}

fn finished(
    done: Result<(tokio::task::Id, ()), tokio::task::JoinError>,
    owners: &mut HashMap<tokio::task::Id, String>,
    in_flight: &mut HashMap<String, usize>,
) {
    let id = match done {
        Ok((id, ())) => id,
        Err(e) => {
            if e.is_panic() {
                warn!("a webhook delivery task panicked; its event is retried after the lease");
            }
            e.id()
        }
    };
    if let Some(merchant) = owners.remove(&id) {
        if let Some(n) = in_flight.get_mut(&merchant) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                in_flight.remove(&merchant);
            }
        }
    }
}

/// Retry after a random share of the backoff ceiling, but not past the end
/// of the budget (so the last attempt happens at its end); dead once the
/// budget, counted from when the event became pending, is spent.
fn after_failure(s: &NotifierSettings, ev: &ClaimedEvent, now: DateTime<Utc>) -> AttemptResult {
    let next = now + to_chrono(backoff(s, ev.attempts + 1));
    let Some(deadline) = ev.pending_since.checked_add_signed(to_chrono(s.retry_for)) else {
        return AttemptResult::RetryAt(next);
    };
    if now >= deadline {
        return AttemptResult::Dead;
    }
    AttemptResult::RetryAt(next.min(deadline))
}

/// Full jitter: uniform in [0, min(cap, base × 2^(failures-1))].
fn backoff(s: &NotifierSettings, failures: u32) -> Duration {
    let ceiling = backoff_ceiling(s.backoff_base, s.backoff_cap, failures);
    let ms = u64::try_from(ceiling.as_millis()).unwrap_or(u64::MAX);
    Duration::from_millis(rand::thread_rng().gen_range(0..=ms))
}

/// min(cap, base × 2^(failures-1)), without overflow.
fn backoff_ceiling(base: Duration, cap: Duration, failures: u32) -> Duration {
    let shift = failures.saturating_sub(1).min(31);
    base.checked_mul(1u32 << shift).unwrap_or(cap).min(cap)
}

fn to_chrono(d: Duration) -> chrono::Duration {
    chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX)
}

fn humanize(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}

/// The guard's refusal, if that is what failed the request.
fn refused_in(e: &reqwest::Error) -> Option<RefusedTarget> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(r) = err.downcast_ref::<RefusedTarget>() {
            return Some(r.clone());
        }
        cur = err.source();
    }
    None
}

/// An error and its causes on one line ("a: b: c"), without repeats.
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        let s = err.to_string();
        if !parts.iter().any(|p| p.contains(&s)) {
            parts.push(s);
        }
        cur = err.source();
    }
    parts.join(": ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_matches_a_known_vector() {
        // echo -n '1700000000.{"a":1}' | openssl dgst -sha256 -hmac secret
        assert_eq!(
            signature("secret", 1_700_000_000, r#"{"a":1}"#),
            "t=1700000000,v1=49f24e537407743fa4a0242bb63b94b9a47ee99cbbe071ccd8a22550ae411686"
        );
    }

    #[test]
    fn errors_are_shown_as_categories_never_hosts() {
        for (stored, shown) in [
            ("http_503", "http_503"),
            ("connect_failed", "connect_failed"),
            ("HTTP 500", "http_500"),
            ("HTTP 302 (redirects are not followed)", "http_302"),
            (
                "refused target: billing.corp.internal resolves only to 10.0.0.7 (private)",
                "blocked_address",
            ),
            ("timed out after 10s", "timeout"),
            (
                "error sending request: client error (Connect): tcp connect error: \
                 Connection refused (os error 111) for billing.corp.internal",
                "request_failed",
            ),
            (
                "cannot sign: the merchant has no encrypted AppSecret",
                "cannot sign: the merchant has no encrypted AppSecret",
            ),
        ] {
            assert_eq!(shown_error(stored), shown, "{stored}");
        }
    }

    #[test]
    fn backoff_ceiling_doubles_to_the_cap() {
        let s = Duration::from_secs;
        let c = |n| backoff_ceiling(s(1), s(3600), n);
        assert_eq!([c(1), c(2), c(3), c(4)], [s(1), s(2), s(4), s(8)]);
        assert_eq!(c(12), s(2048));
        assert_eq!(c(13), s(3600));
        assert_eq!(c(u32::MAX), s(3600));
        assert_eq!(
            backoff_ceiling(Duration::from_millis(50), Duration::from_millis(200), 5),
            Duration::from_millis(200)
        );
    }

    fn claimed(attempts: u32, pending_since: DateTime<Utc>) -> ClaimedEvent {
        ClaimedEvent {
            event_id: "evt".into(),
            merchant_appid: "vga".into(),
            order_key: "order:1".into(),
            kind: "order.completed".into(),
            body: "{}".into(),
            attempts,
            created_at: pending_since,
            pending_since,
            notify_url: None,
            appsecret_enc: None,
        }
    }

    #[test]
    fn retries_last_the_whole_budget_then_die() {
        let n = NotifierSettings {
            retry_for: Duration::from_secs(25 * 3600),
            backoff_base: Duration::from_secs(1),
            backoff_cap: Duration::from_secs(3600),
            ..NotifierSettings::default()
        };
        let start = Utc::now();
        // Early failures retry within their jittered ceiling.
        for attempts in 0..10u32 {
            let AttemptResult::RetryAt(t) = after_failure(&n, &claimed(attempts, start), start)
            else {
                panic!("retries");
            };
            let ceiling = backoff_ceiling(
                Duration::from_secs(1),
                Duration::from_secs(3600),
                attempts + 1,
            );
            assert!(t >= start && t <= start + to_chrono(ceiling), "{attempts}");
        }
        // Near the end the next try is at the end, not after it.
        let near_end = start + chrono::Duration::hours(25) - chrono::Duration::seconds(5);
        match after_failure(&n, &claimed(40, start), near_end) {
            AttemptResult::RetryAt(t) => assert!(t <= start + chrono::Duration::hours(25)),
            other => panic!("{other:?}"),
        }
        // At the end: dead.
        let end = start + chrono::Duration::hours(25);
        assert_eq!(
            after_failure(&n, &claimed(41, start), end),
            AttemptResult::Dead
        );
    }

    #[test]
    fn error_chains_read_on_one_line() {
        #[derive(Debug, thiserror::Error)]
        #[error("outer")]
        struct Outer(#[source] std::io::Error);
        let e = Outer(std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            "connection refused",
        ));
        assert_eq!(error_chain(&e), "outer: connection refused");
    }
}
