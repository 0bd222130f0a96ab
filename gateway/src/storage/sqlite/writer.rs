//! The SQLite group-commit writer: one dedicated thread owning one rusqlite
//! connection that runs concurrent write jobs in one transaction and one
//! fsync, each job in its own SAVEPOINT, answering every caller only after
//! the COMMIT has returned.
//!
//! Why group commit: with `synchronous = FULL` every commit waits for an
//! fsync, and SQLite has one writer at a time anyway. Under load, separate
//! transactions queue on the write lock (and on the busy handler's sleeps)
//! and each pays its own fsync; here they queue on a channel instead and
//! share one. There is no timer: while one batch commits, the next one
//! gathers, so at low load a job commits alone at once and at high load
//! batches grow by themselves.
//!
//! Why a thread of its own: a job's statements run on the thread that owns
//! the connection, with statements prepared once (`prepare_cached`), and
//! nothing is handed over per statement. (On sqlx each statement was a
//! round trip to the connection's worker thread: two context switches and
//! futex wake-ups per statement, some fifteen per order.) A caller hands
//! over once (the job, on a bounded queue) and is woken once (its answer,
//! on a oneshot).
//!
//! Guarantees:
//! - a job's `Ok` reaches its caller only after the transaction holding its
//!   writes has committed (and so been fsync'd): acknowledged means durable;
//! - a job that fails is rolled back to its savepoint and only its caller
//!   sees the error; the rest of the batch commits;
//! - if the batch itself cannot commit (or SQLite rolled the transaction
//!   back under a job), every caller of that batch gets the error (nothing
//!   of it is on disk);
//! - [`Writer::close`] lets every job queued before it finish and commit;
//! - every wait is bounded: a caller waits at most [`SUBMIT_WAIT`] for room
//!   in the queue (nothing written if it fails) and [`ANSWER_WAIT`] for its
//!   answer (then the outcome is unknown, and the error says so).
//!
//! A job runs on the writer thread and holds it: it must await nothing but
//! its connection (whose futures are ready at once, see `lite`), or every
//! other writer waits with it.
//!
//! Group commit is a detail of the SQLite backend: the [`Storage`] trait
//! stays a plain "one call, one transaction" contract that a pooled database
//! implements directly.
//!
//! [`Storage`]: crate::storage::Storage

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use rusqlite::Connection;
use tokio::sync::mpsc::error::{SendTimeoutError, TrySendError};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, error};

use super::lite::LiteConn;
use crate::storage::rows::backend;
use crate::storage::StorageError;

/// Most jobs in one transaction: bounds how long one commit holds SQLite's
/// write lock (other processes, readers' checkpoints) and the batch's memory.
pub(super) const MAX_BATCH: usize = 256;
/// Jobs waiting for the writer before callers wait for room (backpressure).
const QUEUE: usize = 4096;
/// Longest a caller waits for room in a full queue; then its write fails
/// with nothing written.
pub(super) const SUBMIT_WAIT: Duration = Duration::from_secs(10);
/// Longest a caller waits for its answer once queued: a full queue's worth
/// of batches, each waiting out another process's lock (busy timeout),
/// fits many times over. Past it the write may still commit later.
pub(super) const ANSWER_WAIT: Duration = Duration::from_secs(60);

/// A write job: runs on the writer's connection inside a savepoint. Returns
/// the operation's answer (`update_order`'s compare-and-set, say; `true` for
/// plain writes).
type Work =
    Box<dyn for<'c> FnOnce(&'c mut LiteConn) -> BoxFuture<'c, Result<bool, StorageError>> + Send>;

struct Job {
    work: Work,
    reply: oneshot::Sender<Result<bool, StorageError>>,
}

enum Msg {
    Job(Job),
    /// Commit what was queued before, then stop.
    Close(oneshot::Sender<()>),
}

/// The handle: cheap to share; the thread ends on [`Writer::close`] or when
/// every handle is dropped.
#[derive(Debug)]
pub(super) struct Writer {
    tx: mpsc::Sender<Msg>,
    stats: Arc<WriterStats>,
}

/// What the writer has committed so far (jobs / batches = the batching).
#[derive(Debug, Default)]
struct WriterStats {
    batches: AtomicU64,
    jobs: AtomicU64,
}

impl std::fmt::Debug for Msg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Msg::Job(_) => "Job",
            Msg::Close(_) => "Close",
        })
    }
}

fn closed() -> StorageError {
    StorageError::Backend("storage writer closed".into())
}

impl Writer {
    /// Start the writer thread on `conn` (a connection of its own).
    pub(super) fn spawn(conn: Connection) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel(QUEUE);
        let stats = Arc::new(WriterStats::default());
        let thread_stats = stats.clone();
        std::thread::Builder::new()
            .name("sqlite-writer".into())
            .spawn(move || run(LiteConn(conn), rx, thread_stats))?;
        Ok(Self { tx, stats })
    }

    /// Committed batches and jobs.
    #[cfg(test)]
    fn stats(&self) -> &WriterStats {
        &self.stats
    }

    /// Messages waiting for the writer.
    #[cfg(test)]
    fn queued(&self) -> usize {
        self.tx.max_capacity() - self.tx.capacity()
    }

    /// Queue `msg`, waiting at most [`SUBMIT_WAIT`] for room.
    async fn submit(&self, msg: Msg) -> Result<(), StorageError> {
        // No timer while there is room (the common case).
        let msg = match self.tx.try_send(msg) {
            Ok(()) => return Ok(()),
            Err(TrySendError::Closed(_)) => return Err(closed()),
            Err(TrySendError::Full(msg)) => msg,
        };
        match self.tx.send_timeout(msg, SUBMIT_WAIT).await {
            Ok(()) => Ok(()),
            Err(SendTimeoutError::Closed(_)) => Err(closed()),
            Err(SendTimeoutError::Timeout(_)) => Err(StorageError::Backend(
                format!("storage writer queue full for {SUBMIT_WAIT:?}; nothing written").into(),
            )),
        }
    }

    /// Run `work` in the next group commit; answers after the commit.
    pub(super) async fn write<F>(&self, work: F) -> Result<bool, StorageError>
    where
        F: for<'c> FnOnce(&'c mut LiteConn) -> BoxFuture<'c, Result<bool, StorageError>>
            + Send
            + 'static,
    {
        let (reply, answer) = oneshot::channel();
        let job = Job {
            work: Box::new(work),
            reply,
        };
        self.submit(Msg::Job(job)).await?;
        match tokio::time::timeout(ANSWER_WAIT, answer).await {
            Ok(Ok(r)) => r,
            // A dropped reply means the writer stopped before running the
            // job: nothing of it was written.
            Ok(Err(_)) => Err(closed()),
            Err(_) => Err(StorageError::Backend(
                format!("storage writer did not answer within {ANSWER_WAIT:?}; the write may still commit").into(),
            )),
        }
    }

    /// [`Writer::write`] for a job with an answer of its own: the answer
    /// reaches the caller only if the job's writes committed, and an `Err`
    /// from the job means it was rolled back.
    pub(super) async fn write_value<T, F>(&self, work: F) -> Result<T, StorageError>
    where
        T: Send + 'static,
        F: for<'c> FnOnce(&'c mut LiteConn) -> BoxFuture<'c, Result<T, StorageError>>
            + Send
            + 'static,
    {
        let (tx, mut rx) = oneshot::channel();
        self.write(move |conn| {
            Box::pin(async move {
                let v = work(conn).await?;
                let _ = tx.send(v);
                Ok(true)
            })
        })
        .await?;
        rx.try_recv()
            .map_err(|_| StorageError::Backend("storage writer lost a job's answer".into()))
    }

    /// Commit everything queued so far, then stop; later writes fail with
    /// `Backend`. Idempotent.
    pub(super) async fn close(&self) {
        let (done, wait) = oneshot::channel();
        if self.submit(Msg::Close(done)).await.is_ok() {
            // Bounded like a write's answer: what is queued commits first.
            if tokio::time::timeout(ANSWER_WAIT, wait).await.is_err() {
                error!("storage writer did not close within {ANSWER_WAIT:?}");
                return;
            }
            // How well batching worked over the process's life.
            debug!(
                batches = self.stats.batches.load(Ordering::Relaxed),
                jobs = self.stats.jobs.load(Ordering::Relaxed),
                "group-commit writer closed"
            );
        }
    }
}

/// The writer thread: gather a batch, commit it, answer it, again.
fn run(mut conn: LiteConn, mut rx: mpsc::Receiver<Msg>, stats: Arc<WriterStats>) {
    let mut batch: Vec<Job> = Vec::with_capacity(MAX_BATCH);
    loop {
        let mut close = None;
        // Not inside a runtime: this thread is the writer's own.
        match rx.blocking_recv() {
            Some(Msg::Job(j)) => batch.push(j),
            Some(Msg::Close(done)) => close = Some(done),
            None => break,
        }
        // Take whatever else is already waiting: that is the group.
        while close.is_none() && batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(Msg::Job(j)) => batch.push(j),
                Ok(Msg::Close(done)) => close = Some(done),
                Err(_) => break,
            }
        }
        if !batch.is_empty() {
            commit_batch(&mut conn, &mut batch, &stats);
        }
        if let Some(done) = close {
            // Refuse what comes after the close: senders see a closed
            // channel, queued-after jobs are dropped unanswered with the
            // receiver (their callers get `Backend`, nothing of theirs was
            // written). The connection closes before the answer, so the
            // file is released when `close` returns.
            rx.close();
            drop(rx);
            drop(conn);
            let _ = done.send(());
            return;
        }
    }
}

/// One transaction for the whole batch; counts it if it committed, then
/// answers every job.
fn commit_batch(conn: &mut LiteConn, batch: &mut Vec<Job>, stats: &WriterStats) {
    let (works, replies): (Vec<Work>, Vec<_>) = batch.drain(..).map(|j| (j.work, j.reply)).unzip();
    let n = works.len();
    match run_batch(conn, works) {
        Ok(results) => {
            // Counted before anyone is answered, so an answered caller
            // sees its batch counted.
            stats.batches.fetch_add(1, Ordering::Relaxed);
            stats.jobs.fetch_add(n as u64, Ordering::Relaxed);
            for (reply, r) in replies.into_iter().zip(results) {
                let _ = reply.send(r);
            }
        }
        Err(e) => {
            // Whatever the batch wrote is undone: nothing of it is durable,
            // so no job of it may be answered Ok, not even those that had
            // succeeded.
            if !conn.0.is_autocommit() {
                if let Err(e) = conn.0.execute_batch("ROLLBACK") {
                    error!(error = %e, "rolling back a failed group commit");
                }
            }
            error!(error = %e, jobs = n, "group commit failed");
            let why = e.to_string();
            for reply in replies {
                let _ = reply.send(Err(StorageError::Backend(
                    format!("group commit failed: {why}").into(),
                )));
            }
        }
    }
}

/// One of the writer's own statements (BEGIN, SAVEPOINT, …), prepared once.
fn control(conn: &LiteConn, sql: &str) -> Result<(), StorageError> {
    conn.0
        .prepare_cached(sql)
        .and_then(|mut st| st.raw_execute())
        .map(drop)
        .map_err(backend)
}

/// A job's work, run to its end on this thread. Its futures are ready at
/// once (see the module doc); `block_on` only parks if a job awaits
/// something else. A job that panics fails alone, like a job that returns
/// an error (rolled back to its savepoint): otherwise the panic would end
/// this thread and every later write of the process would fail.
fn run_job(conn: &mut LiteConn, work: Work) -> Result<bool, StorageError> {
    let run = std::panic::AssertUnwindSafe(|| futures::executor::block_on(work(conn)));
    std::panic::catch_unwind(run).unwrap_or_else(|_| {
        error!("a storage write job panicked; it is rolled back");
        Err(StorageError::Backend("storage write job panicked".into()))
    })
}

/// SQLite rolls a whole transaction back by itself on some errors (a full
/// disk, an I/O error, out of memory): then the batch is lost, and a later
/// SAVEPOINT would silently open a new transaction.
fn still_open(conn: &LiteConn) -> Result<(), StorageError> {
    if conn.0.is_autocommit() {
        return Err(StorageError::Backend(
            "SQLite rolled the group-commit transaction back".into(),
        ));
    }
    Ok(())
}

/// BEGIN, one savepoint per job, COMMIT. Err only when the transaction as a
/// whole failed; a job's own failure is in its slot of the Ok vector.
fn run_batch(
    conn: &mut LiteConn,
    mut works: Vec<Work>,
) -> Result<Vec<Result<bool, StorageError>>, StorageError> {
    let mut results = Vec::with_capacity(works.len());
    // IMMEDIATE takes the write lock up front (waiting out another process's
    // writer under the busy timeout) instead of failing on the read-to-write
    // upgrade half-way through the batch.
    control(conn, "BEGIN IMMEDIATE")?;
    if works.len() == 1 {
        // A job alone (the common case at low load) needs no savepoint: its
        // failure rolls back the transaction, which holds nothing else. Two
        // statements fewer per write.
        if let Some(work) = works.pop() {
            let r = run_job(conn, work);
            if r.is_ok() {
                still_open(conn)?;
                control(conn, "COMMIT")?;
            } else if !conn.0.is_autocommit() {
                control(conn, "ROLLBACK")?;
            }
            return Ok(vec![r]);
        }
    }
    for work in works {
        control(conn, "SAVEPOINT job")?;
        let r = run_job(conn, work);
        still_open(conn)?;
        if r.is_ok() {
            control(conn, "RELEASE job")?;
        } else {
            // ROLLBACK TO keeps the savepoint open; RELEASE ends it. If
            // either fails, the transaction is unusable: the whole batch
            // fails.
            control(conn, "ROLLBACK TO job")?;
            control(conn, "RELEASE job")?;
        }
        results.push(r);
    }
    control(conn, "COMMIT")?;
    Ok(results)
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use super::*;
    use crate::storage::run::{Run, Stmt};

    const DEADLINE: Duration = Duration::from_secs(10);

    fn connect(path: &Path) -> Connection {
        super::super::lite::open(path, Duration::from_secs(5)).unwrap()
    }

    async fn setup() -> (tempfile::TempDir, PathBuf, Arc<Writer>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.db");
        let c = Connection::open(&path).unwrap();
        c.execute_batch("PRAGMA journal_mode = WAL; CREATE TABLE t (v INTEGER NOT NULL UNIQUE)")
            .unwrap();
        drop(c);
        let w = Arc::new(Writer::spawn(connect(&path)).unwrap());
        (dir, path, w)
    }

    async fn insert(w: &Writer, v: i64) -> Result<bool, StorageError> {
        w.write(move |c| {
            Box::pin(async move {
                c.execute(Stmt::new("INSERT INTO t (v) VALUES ($1)").bind(v))
                    .await?;
                Ok(true)
            })
        })
        .await
    }

    /// Values in `t`, read through a connection of its own: only committed
    /// rows are visible there.
    async fn committed(path: &Path) -> Vec<i64> {
        let c = connect(path);
        let mut st = c.prepare("SELECT v FROM t ORDER BY v").unwrap();
        let v = st
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<Vec<i64>, _>>()
            .unwrap();
        v
    }

    #[tokio::test]
    async fn a_job_that_panics_fails_alone_and_the_writer_goes_on() {
        let (_dir, path, w) = setup().await;
        let panicking = w.write(|_c| Box::pin(async move { panic!("a bug in a job") }));
        assert!(tokio::time::timeout(DEADLINE, panicking)
            .await
            .expect("answered")
            .is_err());
        assert!(insert(&w, 7).await.expect("the next write commits"));
        assert_eq!(committed(&path).await, vec![7]);
    }

    /// Occupy the writer with a job that waits for the returned sender, so
    /// that what is sent meanwhile queues up as the next batch.
    async fn hold(w: &Arc<Writer>) -> (oneshot::Sender<()>, tokio::task::JoinHandle<()>) {
        let (go, wait) = oneshot::channel::<()>();
        let (started_tx, started) = oneshot::channel::<()>();
        let w2 = w.clone();
        let held = tokio::spawn(async move {
            w2.write(move |_| {
                Box::pin(async move {
                    let _ = started_tx.send(());
                    let _ = wait.await;
                    Ok(true)
                })
            })
            .await
            .unwrap();
        });
        tokio::time::timeout(DEADLINE, started)
            .await
            .unwrap()
            .unwrap();
        (go, held)
    }

    async fn wait_queued(w: &Writer, n: usize) {
        tokio::time::timeout(DEADLINE, async {
            while w.queued() < n {
                tokio::task::yield_now().await;
            }
        })
        .await
        .unwrap();
    }

    fn spawn_insert(
        w: &Arc<Writer>,
        v: i64,
    ) -> tokio::task::JoinHandle<Result<bool, StorageError>> {
        let w = w.clone();
        tokio::spawn(async move { insert(&w, v).await })
    }

    #[tokio::test]
    async fn concurrent_writes_share_one_commit() {
        let (_dir, path, w) = setup().await;
        let (go, held) = hold(&w).await;
        let calls: Vec<_> = (0..10).map(|v| spawn_insert(&w, v)).collect();
        wait_queued(&w, 10).await;
        go.send(()).unwrap();
        held.await.unwrap();
        for c in calls {
            assert!(c.await.unwrap().unwrap());
        }
        // The held job alone, then the ten together.
        assert_eq!(w.stats().batches.load(Ordering::Relaxed), 2);
        assert_eq!(w.stats().jobs.load(Ordering::Relaxed), 11);
        assert_eq!(committed(&path).await, (0..10).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn a_failing_job_rolls_back_alone() {
        let (_dir, path, w) = setup().await;
        let (go, held) = hold(&w).await;
        let ok1 = spawn_insert(&w, 1);
        wait_queued(&w, 1).await;
        // Writes a row, then fails: the row must not survive.
        let failing = tokio::spawn({
            let w = w.clone();
            async move {
                w.write(|c| {
                    Box::pin(async move {
                        c.execute(Stmt::new("INSERT INTO t (v) VALUES (2)")).await?;
                        Err(StorageError::Duplicate("test"))
                    })
                })
                .await
            }
        });
        wait_queued(&w, 2).await;
        // A constraint violation inside the batch: also rolled back alone.
        let dup = spawn_insert(&w, 1);
        wait_queued(&w, 3).await;
        let ok3 = spawn_insert(&w, 3);
        wait_queued(&w, 4).await;
        go.send(()).unwrap();
        held.await.unwrap();
        assert!(ok1.await.unwrap().unwrap());
        assert!(matches!(
            failing.await.unwrap(),
            Err(StorageError::Duplicate("test"))
        ));
        assert!(matches!(dup.await.unwrap(), Err(StorageError::Backend(_))));
        assert!(ok3.await.unwrap().unwrap());
        assert_eq!(w.stats().batches.load(Ordering::Relaxed), 2);
        assert_eq!(committed(&path).await, vec![1, 3]);
    }

    #[tokio::test]
    async fn a_failing_job_alone_leaves_nothing() {
        let (_dir, path, w) = setup().await;
        assert!(insert(&w, 1).await.unwrap());
        // Alone in its batch (no savepoint): the whole transaction rolls back.
        assert!(matches!(insert(&w, 1).await, Err(StorageError::Backend(_))));
        assert!(insert(&w, 2).await.unwrap());
        assert_eq!(committed(&path).await, vec![1, 2]);
    }

    #[tokio::test]
    async fn every_acknowledged_write_is_committed() {
        let (_dir, path, w) = setup().await;
        for v in 0..5 {
            assert!(insert(&w, v).await.unwrap());
            // Seen by another connection: committed, not merely written
            // inside the writer's open transaction.
            assert_eq!(committed(&path).await, (0..=v).collect::<Vec<_>>());
        }
        // And still there after the writer is gone and the file reopened.
        w.close().await;
        assert_eq!(committed(&path).await, (0..5).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn close_commits_what_was_queued_and_refuses_the_rest() {
        let (_dir, path, w) = setup().await;
        let (go, held) = hold(&w).await;
        let calls: Vec<_> = (0..5).map(|v| spawn_insert(&w, v)).collect();
        wait_queued(&w, 5).await;
        let closing = tokio::spawn({
            let w = w.clone();
            async move { w.close().await }
        });
        wait_queued(&w, 6).await;
        go.send(()).unwrap();
        held.await.unwrap();
        tokio::time::timeout(DEADLINE, closing)
            .await
            .unwrap()
            .unwrap();
        for c in calls {
            assert!(c.await.unwrap().unwrap());
        }
        assert_eq!(committed(&path).await, (0..5).collect::<Vec<_>>());
        assert!(matches!(insert(&w, 9).await, Err(StorageError::Backend(_))));
        // Closing twice is harmless.
        w.close().await;
    }
}
