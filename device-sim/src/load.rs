//! `load`: places orders through the open API (`POST /orders` of API.md)
//! with a fixed number of workers, and reports throughput, answers by
//! envelope `code` and latency percentiles; optionally also how long
//! accepted orders take to finish dispensing.
//!
//! Each worker loops: take the next machine (round robin over all workers),
//! POST one order, record the latency and the answer's code. Several
//! workers may hit one machine at once; the gateway queues per machine.
//! Every placed order is answered exactly once, with its envelope code or
//! one of the tool's own negative codes, so `placed == answered == Σ codes`.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use vendgate_proto::machine::MachineNo;

use crate::secrets_file;
use crate::stats::{self, LatencyHistogram, LatencySummary};

/// The code counted for a request that got no HTTP answer (connect error,
/// reset, timeout).
pub const CODE_TRANSPORT_ERROR: i64 = -1;
/// The code counted for an HTTP answer that is not an envelope (no JSON
/// body with an integer `code`).
pub const CODE_BAD_ANSWER: i64 = -2;
/// The open API's base path under the server URL (API.md "Conventions").
const BASE_PATH: &str = "/api/openapi/v1";
/// Between two polls of an order's status (`--completion`); also the
/// resolution of the time-to-completion figures.
const COMPLETION_POLL: Duration = Duration::from_millis(20);
/// An order still dispensing after this long is reported as timed out.
const COMPLETION_DEADLINE: Duration = Duration::from_secs(60);
/// Order statuses that are not final yet.
const PENDING_STATUSES: [&str; 2] = ["dispatching", "dispensing"];

/// When a run stops placing orders.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoadStop {
    /// Place orders for this long, then wait for the outstanding answers.
    Duration(Duration),
    /// Place exactly this many orders.
    Count(u64),
}

/// One line of an order, as `POST /orders` takes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ProductLine {
    pub product_id: i64,
    pub quantity: u32,
}

/// What to run.
#[derive(Clone)]
pub struct LoadOptions {
    /// The gateway's HTTP address, e.g. `http://127.0.0.1:8080`; the API's
    /// base path is added unless the URL already ends with it. Plain HTTP
    /// only (the simulator is built without TLS).
    pub api: String,
    pub appid: String,
    pub appsecret: String,
    /// Machines to order from, round robin.
    pub machines: Vec<MachineNo>,
    /// Workers, each with one request outstanding.
    pub concurrency: usize,
    pub stop: LoadStop,
    /// The `products` of every order.
    pub products: Vec<ProductLine>,
    /// Poll each accepted order until it leaves `dispensing` and report
    /// time-to-completion.
    pub completion: bool,
    /// Print a progress line to stderr every second.
    pub progress: bool,
    /// Per HTTP request.
    pub request_timeout: Duration,
    /// Stops placing orders early (Ctrl-C); the report covers what ran.
    pub cancel: CancellationToken,
}

impl LoadOptions {
    /// 64 workers placing 1,000 orders of one product 1 each, no
    /// completion tracking, no progress output, 30 s request timeout.
    pub fn new(
        api: impl Into<String>,
        appid: impl Into<String>,
        appsecret: impl Into<String>,
        machines: Vec<MachineNo>,
    ) -> Self {
        Self {
            api: api.into(),
            appid: appid.into(),
            appsecret: appsecret.into(),
            machines,
            concurrency: 64,
            stop: LoadStop::Count(1_000),
            products: vec![ProductLine {
                product_id: 1,
                quantity: 1,
            }],
            completion: false,
            progress: false,
            request_timeout: Duration::from_secs(30),
            cancel: CancellationToken::new(),
        }
    }
}

impl std::fmt::Debug for LoadOptions {
    /// Like a derived `Debug`, but the AppSecret is never printed.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadOptions")
            .field("api", &self.api)
            .field("appid", &self.appid)
            .field("appsecret", &"<redacted>")
            .field("machines", &self.machines.len())
            .field("concurrency", &self.concurrency)
            .field("stop", &self.stop)
            .field("products", &self.products)
            .field("completion", &self.completion)
            .finish()
    }
}

/// The outcome of a run. Latencies in milliseconds.
#[derive(Debug, Clone, Serialize)]
pub struct LoadReport {
    /// Orders sent.
    pub placed: u64,
    /// Orders answered (always equal to `placed`, and to the sum of
    /// `codes`).
    pub answered: u64,
    /// Answers with code 0.
    pub ok: u64,
    /// From the first order until the last answer.
    #[serde(rename = "elapsed_s", serialize_with = "stats::serialize_secs")]
    pub elapsed: Duration,
    /// Answers per second.
    pub throughput: f64,
    /// Answers by envelope code; [`CODE_TRANSPORT_ERROR`] and
    /// [`CODE_BAD_ANSWER`] for requests without an envelope.
    pub codes: BTreeMap<i64, u64>,
    /// Of `POST /orders`, whatever the answer.
    pub latency: LatencySummary,
    /// With [`LoadOptions::completion`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub completion: Option<CompletionReport>,
}

/// How accepted orders ended (`--completion`).
#[derive(Debug, Clone, Default, Serialize)]
pub struct CompletionReport {
    /// Accepted orders whose status was polled.
    pub polled: u64,
    /// Still pending after the deadline, or never readable.
    pub timed_out: u64,
    /// Final status by name (`completed`, `failed`, …).
    pub statuses: BTreeMap<String, u64>,
    /// From sending `POST /orders` until a poll saw a final status
    /// (resolution: the 20 ms poll interval).
    pub latency: LatencySummary,
}

impl std::fmt::Display for LoadReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "placed={} answered={} ok={} elapsed={:.2}s throughput={:.1}/s",
            self.placed,
            self.answered,
            self.ok,
            self.elapsed.as_secs_f64(),
            self.throughput
        )?;
        let codes: Vec<String> = self
            .codes
            .iter()
            .map(|(code, n)| format!("{code}={n}"))
            .collect();
        writeln!(f, "codes {}", codes.join(" "))?;
        write!(f, "latency {}", self.latency)?;
        if let Some(c) = &self.completion {
            let statuses: Vec<String> = c
                .statuses
                .iter()
                .map(|(status, n)| format!("{status}={n}"))
                .collect();
            write!(
                f,
                "\ncompletion polled={} timed_out={} {}\ncompletion latency {}",
                c.polled,
                c.timed_out,
                statuses.join(" "),
                c.latency
            )?;
        }
        Ok(())
    }
}

/// Reads `--machines`: a `machine_no,secret` file if one exists at that
/// path, else a comma-separated list of machine numbers.
pub fn parse_machines(arg: &str) -> anyhow::Result<Vec<MachineNo>> {
    let path = Path::new(arg);
    let machines = if path.is_file() {
        secrets_file::read(path)?
            .into_iter()
            .map(|(m, _)| m)
            .collect()
    } else {
        arg.split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| {
                MachineNo::parse(s).with_context(|| {
                    format!("{s:?} is neither a file nor an 8-digit machine number")
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()?
    };
    if machines.is_empty() {
        bail!("no machines in {arg:?}");
    }
    Ok(machines)
}

/// Parses `--products` of `load`: `PRODUCT_ID:QUANTITY`, comma separated.
pub fn parse_product_lines(s: &str) -> Result<Vec<ProductLine>, String> {
    let lines = s
        .split(',')
        .map(str::trim)
        .filter(|part| !part.is_empty())
        .map(|part| {
            let (id, quantity) = part
                .split_once(':')
                .ok_or_else(|| format!("{part:?} is not PRODUCT_ID:QUANTITY"))?;
            Ok(ProductLine {
                product_id: id
                    .trim()
                    .parse()
                    .map_err(|_| format!("{part:?}: product id is not a number"))?,
                quantity: quantity
                    .trim()
                    .parse()
                    .map_err(|_| format!("{part:?}: quantity is not a number"))?,
            })
        })
        .collect::<Result<Vec<_>, String>>()?;
    if lines.is_empty() {
        return Err("no products".to_owned());
    }
    Ok(lines)
}

/// The open API's base URL for `api`.
fn base_url(api: &str) -> anyhow::Result<String> {
    let api = api.trim_end_matches('/');
    if api.starts_with("https://") {
        bail!("{api}: HTTPS is not supported (vendgate-sim is built without TLS)");
    }
    if !api.starts_with("http://") {
        bail!("{api}: the API URL must start with http://");
    }
    Ok(if api.ends_with(BASE_PATH) {
        api.to_owned()
    } else {
        format!("{api}{BASE_PATH}")
    })
}

/// The answer envelope of API.md; only what the tool reads.
#[derive(Debug, Deserialize)]
struct Envelope {
    code: i64,
    #[serde(default)]
    data: EnvelopeData,
}

#[derive(Debug, Default, Deserialize)]
struct EnvelopeData {
    #[serde(default)]
    order_id: Option<u64>,
    #[serde(default)]
    status: Option<String>,
}

/// Everything the workers share.
struct Ctx {
    client: reqwest::Client,
    base: String,
    opts: LoadOptions,
    /// Next machine, modulo the number of machines.
    next_machine: AtomicUsize,
    /// Orders handed out so far (for `LoadStop::Count`).
    tickets: AtomicU64,
    placed: AtomicU64,
    answered: AtomicU64,
    ok: AtomicU64,
    deadline: Option<Instant>,
    /// Completion pollers, and where they report.
    pollers: TaskTracker,
    completions: mpsc::UnboundedSender<Completion>,
}

/// What one worker measured.
#[derive(Default)]
struct WorkerTally {
    hist: LatencyHistogram,
    codes: BTreeMap<i64, u64>,
}

/// How one accepted order ended.
struct Completion {
    /// `None` when it was still pending at the deadline.
    status: Option<String>,
    took: Duration,
}

/// Places orders until `opts.stop` (or `opts.cancel`) and reports.
pub async fn load(opts: LoadOptions) -> anyhow::Result<LoadReport> {
    if opts.machines.is_empty() {
        bail!("no machines to order from");
    }
    if opts.concurrency == 0 {
        bail!("concurrency must be at least 1");
    }
    if opts.products.is_empty() {
        bail!("an order needs at least one product");
    }
    let base = base_url(&opts.api)?;
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(opts.concurrency)
        .tcp_nodelay(true)
        .timeout(opts.request_timeout)
        .build()
        .context("building the HTTP client")?;
    let started = Instant::now();
    let deadline = match opts.stop {
        LoadStop::Duration(d) => Some(started.checked_add(d).context("duration too long")?),
        LoadStop::Count(_) => None,
    };
    let (completions, mut completion_rx) = mpsc::unbounded_channel();
    let ctx = Arc::new(Ctx {
        client,
        base,
        next_machine: AtomicUsize::new(0),
        tickets: AtomicU64::new(0),
        placed: AtomicU64::new(0),
        answered: AtomicU64::new(0),
        ok: AtomicU64::new(0),
        deadline,
        pollers: TaskTracker::new(),
        completions,
        opts,
    });

    let progress_stop = CancellationToken::new();
    if ctx.opts.progress {
        tokio::spawn(print_progress(Arc::clone(&ctx), progress_stop.clone()));
    }
    let workers: Vec<_> = (0..ctx.opts.concurrency)
        .map(|_| tokio::spawn(worker(Arc::clone(&ctx))))
        .collect();
    let mut hist = LatencyHistogram::new();
    let mut codes: BTreeMap<i64, u64> = BTreeMap::new();
    for w in workers {
        // A worker only ends by panicking if a bug lets it; its orders are
        // then missing from the report, which the invariant check catches.
        if let Ok(tally) = w.await {
            hist.merge(&tally.hist);
            for (code, n) in tally.codes {
                *codes.entry(code).or_default() += n;
            }
        }
    }
    let elapsed = started.elapsed();
    progress_stop.cancel();

    let completion = if ctx.opts.completion {
        ctx.pollers.close();
        ctx.pollers.wait().await;
        let mut report = CompletionReport::default();
        let mut latency = LatencyHistogram::new();
        while let Ok(c) = completion_rx.try_recv() {
            report.polled += 1;
            match c.status {
                Some(status) => {
                    latency.record(c.took);
                    *report.statuses.entry(status).or_default() += 1;
                }
                None => report.timed_out += 1,
            }
        }
        report.latency = latency.summary();
        Some(report)
    } else {
        None
    };

    let placed = ctx.placed.load(Ordering::Relaxed);
    let answered = ctx.answered.load(Ordering::Relaxed);
    let counted: u64 = codes.values().sum();
    if placed != answered || answered != counted {
        bail!("internal error: placed={placed} answered={answered} counted={counted}");
    }
    Ok(LoadReport {
        placed,
        answered,
        ok: ctx.ok.load(Ordering::Relaxed),
        elapsed,
        throughput: stats::rate(answered, elapsed),
        codes,
        latency: hist.summary(),
        completion,
    })
}

/// One worker: one order outstanding at a time until the run stops.
async fn worker(ctx: Arc<Ctx>) -> WorkerTally {
    let mut tally = WorkerTally::default();
    loop {
        if ctx.opts.cancel.is_cancelled() {
            break;
        }
        match (ctx.opts.stop, ctx.deadline) {
            (LoadStop::Count(n), _) => {
                if ctx.tickets.fetch_add(1, Ordering::Relaxed) >= n {
                    break;
                }
            }
            (LoadStop::Duration(_), Some(deadline)) => {
                if Instant::now() >= deadline {
                    break;
                }
            }
            (LoadStop::Duration(_), None) => break,
        }
        let i = ctx.next_machine.fetch_add(1, Ordering::Relaxed) % ctx.opts.machines.len();
        let machine_no = ctx.opts.machines[i];
        ctx.placed.fetch_add(1, Ordering::Relaxed);
        let sent = Instant::now();
        let (code, order_id) = place(&ctx, machine_no).await;
        tally.hist.record(sent.elapsed());
        *tally.codes.entry(code).or_default() += 1;
        if code == 0 {
            ctx.ok.fetch_add(1, Ordering::Relaxed);
        }
        ctx.answered.fetch_add(1, Ordering::Relaxed);
        if let (true, 0, Some(order_id)) = (ctx.opts.completion, code, order_id) {
            ctx.pollers
                .spawn(poll_completion(Arc::clone(&ctx), order_id, sent));
        }
    }
    tally
}

/// POSTs one order; the answer's code and order id.
async fn place(ctx: &Ctx, machine_no: MachineNo) -> (i64, Option<u64>) {
    #[derive(Serialize)]
    struct Body<'a> {
        machine_no: MachineNo,
        products: &'a [ProductLine],
    }
    let request = ctx
        .client
        .post(format!("{}/orders", ctx.base))
        .header("Appid", &ctx.opts.appid)
        .header("AppSecret", &ctx.opts.appsecret)
        .json(&Body {
            machine_no,
            products: &ctx.opts.products,
        });
    match fetch_envelope(request).await {
        Ok(envelope) => (envelope.code, envelope.data.order_id),
        Err(code) => (code, None),
    }
}

/// Sends a request and reads its envelope, whatever the HTTP status (in
/// `http_status = "mirror"` mode errors come with 4xx/5xx and the same
/// body); the tool's negative code when there is none.
async fn fetch_envelope(request: reqwest::RequestBuilder) -> Result<Envelope, i64> {
    let response = request.send().await.map_err(|_| CODE_TRANSPORT_ERROR)?;
    let body = response.bytes().await.map_err(|_| CODE_TRANSPORT_ERROR)?;
    serde_json::from_slice(&body).map_err(|_| CODE_BAD_ANSWER)
}

/// Polls `GET /orders/{id}` until the order leaves `dispatching` and
/// `dispensing`, then reports its status and the time since `sent`.
async fn poll_completion(ctx: Arc<Ctx>, order_id: u64, sent: Instant) {
    let give_up = sent + COMPLETION_DEADLINE;
    let url = format!("{}/orders/{order_id}", ctx.base);
    let status = loop {
        let request = ctx
            .client
            .get(&url)
            .header("Appid", &ctx.opts.appid)
            .header("AppSecret", &ctx.opts.appsecret);
        if let Ok(Envelope {
            code: 0,
            data:
                EnvelopeData {
                    status: Some(status),
                    ..
                },
        }) = fetch_envelope(request).await
        {
            if !PENDING_STATUSES.contains(&status.as_str()) {
                break Some(status);
            }
        }
        if Instant::now() + COMPLETION_POLL >= give_up || ctx.opts.cancel.is_cancelled() {
            break None;
        }
        tokio::time::sleep(COMPLETION_POLL).await;
    };
    let _ = ctx.completions.send(Completion {
        status,
        took: sent.elapsed(),
    });
}

/// `placed=… ok=… rate=…/s elapsed=…s` on stderr every second.
async fn print_progress(ctx: Arc<Ctx>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The first tick is immediate.
    tick.tick().await;
    let started = Instant::now();
    let (mut last_answered, mut last_at) = (0, started);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let now = Instant::now();
        let answered = ctx.answered.load(Ordering::Relaxed);
        eprintln!(
            "placed={} ok={} rate={:.0}/s elapsed={:.0}s",
            ctx.placed.load(Ordering::Relaxed),
            ctx.ok.load(Ordering::Relaxed),
            stats::rate(answered - last_answered, now - last_at),
            (now - started).as_secs_f64()
        );
        (last_answered, last_at) = (answered, now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_urls() {
        assert_eq!(
            base_url("http://127.0.0.1:8080").unwrap(),
            "http://127.0.0.1:8080/api/openapi/v1"
        );
        assert_eq!(
            base_url("http://h:1/api/openapi/v1/").unwrap(),
            "http://h:1/api/openapi/v1"
        );
        assert!(base_url("https://h").is_err());
        assert!(base_url("h:80").is_err());
    }

    #[test]
    fn product_lines() {
        assert_eq!(
            parse_product_lines("1:1, 2:3").unwrap(),
            vec![
                ProductLine {
                    product_id: 1,
                    quantity: 1
                },
                ProductLine {
                    product_id: 2,
                    quantity: 3
                }
            ]
        );
        assert!(parse_product_lines("1").is_err());
        assert!(parse_product_lines("1:x").is_err());
        assert!(parse_product_lines("1:-1").is_err());
        assert!(parse_product_lines("").is_err());
    }

    #[test]
    fn machine_lists_and_files() {
        let list = parse_machines("10000000, 10000001,").unwrap();
        assert_eq!(list.len(), 2);
        assert_eq!(list[1].as_str(), "10000001");
        assert!(parse_machines("1000000").is_err());
        assert!(parse_machines("").is_err());

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secrets.csv");
        std::fs::write(&path, "# fleet\n10000005,s\n10000006,t\n").unwrap();
        let from_file = parse_machines(path.to_str().unwrap()).unwrap();
        assert_eq!(from_file.len(), 2);
        assert_eq!(from_file[0].as_str(), "10000005");
    }

    #[test]
    fn envelopes_without_data_parse() {
        let e: Envelope =
            serde_json::from_str(r#"{"code":30002,"message":"x","data":{}}"#).unwrap();
        assert_eq!(e.code, 30002);
        assert_eq!(e.data.order_id, None);
        let e: Envelope = serde_json::from_str(r#"{"code":0,"data":{"order_id":7}}"#).unwrap();
        assert_eq!(e.data.order_id, Some(7));
        assert!(serde_json::from_str::<Envelope>(r#"{"message":"no code"}"#).is_err());
    }

    #[test]
    fn debug_hides_the_secret() {
        let opts = LoadOptions::new("http://h:1", "app", "hunter2", vec![]);
        assert!(!format!("{opts:?}").contains("hunter2"));
    }
}
