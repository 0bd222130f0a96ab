//! The SQLite group-commit writer: one task owning one connection that runs
//! concurrent write jobs in one transaction and one fsync, each job in its own
//! SAVEPOINT, answering every caller only after the COMMIT has returned.
//!
//! Why: with `synchronous = FULL` every commit waits for an fsync, and SQLite
//! has one writer at a time anyway. Under load, separate transactions queue
//! on the write lock (and on the busy handler's sleeps) and each pays its own
//! fsync; here they queue on a channel instead and share one. There is no
//! timer: while one batch commits, the next one gathers, so at low load a job
//! commits alone at once and at high load batches grow by themselves.
//!
//! Guarantees:
//! - a job's `Ok` reaches its caller only after the transaction holding its
//!   writes has committed (and so been fsync'd): acknowledged means durable;
//! - a job that fails is rolled back to its savepoint and only its caller
//!   sees the error; the rest of the batch commits;
//! - if the batch itself cannot commit, every caller of that batch gets the
//!   error (nothing of it is on disk);
//! - [`Writer::close`] lets every job queued before it finish and commit.
//!
//! Group commit is a detail of the SQLite backend: the [`Storage`] trait
//! stays a plain "one call, one transaction" contract that a pooled database
//! implements directly.
//!
//! [`Storage`]: super::Storage

use futures::future::BoxFuture;
use sqlx::sqlite::SqliteConnection;
use sqlx::Connection;
use tokio::sync::{mpsc, oneshot};
use tracing::error;

use super::sqlite::backend;
use super::StorageError;

/// Most jobs in one transaction: bounds how long one commit holds SQLite's
/// write lock (other processes, readers' checkpoints) and the batch's memory.
pub(super) const MAX_BATCH: usize = 256;
/// Jobs waiting for the writer before callers wait for room (backpressure).
const QUEUE: usize = 4096;

/// A write job: runs on the writer's connection inside a savepoint. Returns
/// the operation's answer (`update_order`'s compare-and-set, say; `true` for
/// plain writes).
type Work = Box<
    dyn for<'c> FnOnce(&'c mut SqliteConnection) -> BoxFuture<'c, Result<bool, StorageError>>
        + Send,
>;

struct Job {
    work: Work,
    reply: oneshot::Sender<Result<bool, StorageError>>,
}

enum Msg {
    Job(Job),
    /// Commit what was queued before, then stop.
    Close(oneshot::Sender<()>),
}

/// The handle: cheap to share; the task ends on [`Writer::close`] or when
/// every handle is dropped.
#[derive(Debug)]
pub(super) struct Writer {
    tx: mpsc::Sender<Msg>,
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
    /// Start the writer task on `conn` (a connection of its own, not one of
    /// the read pool's).
    pub(super) fn spawn(conn: SqliteConnection) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(run(conn, rx));
        Self { tx }
    }

    /// Run `work` in the next group commit; answers after the commit.
    pub(super) async fn write<F>(&self, work: F) -> Result<bool, StorageError>
    where
        F: for<'c> FnOnce(&'c mut SqliteConnection) -> BoxFuture<'c, Result<bool, StorageError>>
            + Send
            + 'static,
    {
        let (reply, answer) = oneshot::channel();
        let job = Job {
            work: Box::new(work),
            reply,
        };
        self.tx.send(Msg::Job(job)).await.map_err(|_| closed())?;
        // A dropped reply means the writer stopped before running the job:
        // nothing of it was written.
        answer.await.unwrap_or_else(|_| Err(closed()))
    }

    /// Commit everything queued so far, then stop; later writes fail with
    /// `Backend`. Idempotent.
    pub(super) async fn close(&self) {
        let (done, wait) = oneshot::channel();
        if self.tx.send(Msg::Close(done)).await.is_ok() {
            let _ = wait.await;
        }
    }
}

async fn run(mut conn: SqliteConnection, mut rx: mpsc::Receiver<Msg>) {
    let mut batch: Vec<Job> = Vec::with_capacity(MAX_BATCH);
    loop {
        let mut close = None;
        match rx.recv().await {
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
            commit_batch(&mut conn, &mut batch).await;
        }
        if let Some(done) = close {
            // Refuse what comes after the close: senders see a closed
            // channel, queued-after jobs are dropped unanswered (their
            // callers get `Backend`, nothing of theirs was written).
            rx.close();
            let _ = conn.close().await;
            let _ = done.send(());
            return;
        }
    }
    let _ = conn.close().await;
}

/// One transaction for the whole batch; answers every job.
async fn commit_batch(conn: &mut SqliteConnection, batch: &mut Vec<Job>) {
    let (works, replies): (Vec<Work>, Vec<_>) = batch.drain(..).map(|j| (j.work, j.reply)).unzip();
    let n = works.len();
    match run_batch(conn, works).await {
        Ok(results) => {
            for (reply, r) in replies.into_iter().zip(results) {
                let _ = reply.send(r);
            }
        }
        Err(e) => {
            // The transaction rolled back (sqlx rolls back a dropped
            // transaction): nothing of this batch is durable, so no job of
            // it may be answered Ok, not even those that had succeeded.
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

/// BEGIN, one savepoint per job, COMMIT. Err only when the transaction as a
/// whole failed; a job's own failure is in its slot of the Ok vector.
async fn run_batch(
    conn: &mut SqliteConnection,
    works: Vec<Work>,
) -> Result<Vec<Result<bool, StorageError>>, StorageError> {
    let mut results = Vec::with_capacity(works.len());
    // IMMEDIATE takes the write lock up front (waiting out another process's
    // writer under the busy timeout) instead of failing on the read-to-write
    // upgrade half-way through the batch.
    let mut tx = conn.begin_with("BEGIN IMMEDIATE").await.map_err(backend)?;
    for work in works {
        // A nested sqlx transaction is a SAVEPOINT.
        let mut sp = tx.begin().await.map_err(backend)?;
        let r = work(&mut sp).await;
        if r.is_ok() {
            sp.commit().await.map_err(backend)?;
        } else {
            // If even the rollback to the savepoint fails, the transaction
            // is unusable: the whole batch fails.
            sp.rollback().await.map_err(backend)?;
        }
        results.push(r);
    }
    tx.commit().await.map_err(backend)?;
    Ok(results)
}
