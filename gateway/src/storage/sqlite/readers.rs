//! The SQLite backend's pooled statements on rusqlite: a few reader threads,
//! each owning one connection, taking statements from one bounded queue.
//! Reads in WAL mode see the last commit and never wait for the writer; the
//! rarer writes that run pooled (provisioning, settings) take SQLite's
//! write lock like any other connection, waiting under the busy timeout.
//!
//! Why threads: a statement is blocking work (disk reads on a cold cache),
//! so it must not run on the async runtime's workers; a thread of our own
//! per connection keeps its prepared statements (`prepare_cached`) and
//! costs one hand-off each way per statement. (On sqlx a pooled statement
//! was that plus the pool's acquire and its ping, each a round trip to the
//! connection's worker thread.)

use std::borrow::Cow;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc::error::{SendTimeoutError, TrySendError};
use tokio::sync::{mpsc, oneshot};

use super::lite::{self, LiteConn};
use crate::storage::rows::backend;
use crate::storage::run::{LiteRow, Pooled, Row, Run, Stmt, Value};
use crate::storage::StorageError;

/// Reader threads (and connections). Two cores here; SQLite reads on a
/// warm cache take microseconds, so a few threads keep every core busy
/// while one waits for the disk.
pub(super) const READERS: usize = 4;
/// Statements waiting for a reader before callers wait for room.
const READ_QUEUE: usize = 1024;
/// Longest a caller waits for room in a full queue (nothing run then).
const SUBMIT_WAIT: Duration = Duration::from_secs(10);
/// Longest a caller waits for its statement's answer once queued: a full
/// queue's worth, each waiting at most the busy timeout, fits.
const ANSWER_WAIT: Duration = Duration::from_secs(60);

/// A statement's work on a reader's connection; it answers its caller
/// itself.
type Work = Box<dyn FnOnce(&mut LiteConn) + Send>;

/// The reader threads' queue; they stop when it is dropped (every handle
/// gone) or closed.
#[derive(Debug)]
pub struct Readers {
    /// `None` stops the thread that takes it.
    tx: mpsc::Sender<Option<Work>>,
    closed: AtomicBool,
}

impl Readers {
    /// Open [`READERS`] connections to `path` and start a thread for each.
    pub(super) fn spawn(path: &Path, busy_timeout: Duration) -> Result<Self, StorageError> {
        let (tx, rx) = mpsc::channel::<Option<Work>>(READ_QUEUE);
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..READERS {
            let conn = lite::open(path, busy_timeout).map_err(backend)?;
            let rx = rx.clone();
            std::thread::Builder::new()
                .name(format!("sqlite-reader-{i}"))
                .spawn(move || serve(LiteConn(conn), &rx))
                .map_err(backend)?;
        }
        Ok(Self {
            tx,
            closed: AtomicBool::new(false),
        })
    }

    /// Stop taking statements: those queued before still run, later ones
    /// fail; each thread closes its connection as it stops.
    pub(super) async fn close(&self) {
        if self.closed.swap(true, Ordering::SeqCst) {
            return;
        }
        for _ in 0..READERS {
            // One stop per thread, behind what is queued. A full queue that
            // does not drain in time leaves the threads to stop when the
            // last handle goes.
            if self.tx.send_timeout(None, SUBMIT_WAIT).await.is_err() {
                return;
            }
        }
    }

    /// Run `f` on a reader's connection; its answer.
    async fn run<T, F>(&self, f: F) -> Result<T, StorageError>
    where
        T: Send + 'static,
        F: FnOnce(&LiteConn) -> Result<T, StorageError> + Send + 'static,
    {
        if self.closed.load(Ordering::Relaxed) {
            return Err(closed());
        }
        let (reply, answer) = oneshot::channel();
        let work: Work = Box::new(move |conn: &mut LiteConn| {
            let _ = reply.send(f(conn));
        });
        let work = match self.tx.try_send(Some(work)) {
            Ok(()) => None,
            Err(TrySendError::Closed(_)) => return Err(closed()),
            Err(TrySendError::Full(work)) => Some(work),
        };
        if let Some(work) = work {
            match self.tx.send_timeout(work, SUBMIT_WAIT).await {
                Ok(()) => {}
                Err(SendTimeoutError::Closed(_)) => return Err(closed()),
                Err(SendTimeoutError::Timeout(_)) => {
                    return Err(StorageError::Backend(
                        format!("storage readers' queue full for {SUBMIT_WAIT:?}").into(),
                    ))
                }
            }
        }
        match tokio::time::timeout(ANSWER_WAIT, answer).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(closed()),
            Err(_) => Err(StorageError::Backend(
                format!("storage reader did not answer within {ANSWER_WAIT:?}").into(),
            )),
        }
    }
}

fn closed() -> StorageError {
    StorageError::Backend("storage readers closed".into())
}

/// A reader thread: take the next statement from the shared queue, run it.
fn serve(mut conn: LiteConn, rx: &Mutex<mpsc::Receiver<Option<Work>>>) {
    loop {
        // One thread waits in the queue at a time; the others wait for it
        // to take a statement and let go of the lock.
        let work = match rx.lock() {
            Ok(mut rx) => rx.blocking_recv(),
            Err(_) => None,
        };
        match work {
            Some(Some(work)) => work(&mut conn),
            Some(None) | None => return,
        }
    }
}

/// A statement with what it borrows copied, so that it can cross to a
/// reader thread.
fn owned(s: Stmt<'_>) -> Result<Stmt<'static>, StorageError> {
    let values = s
        .values
        .into_iter()
        .map(|v| {
            Ok(match v {
                Value::Text(t) => Value::Text(Cow::Owned(t.into_owned())),
                Value::OptText(t) => match t {
                    Some(t) => Value::Text(Cow::Owned(t.to_owned())),
                    None => Value::OptText(None),
                },
                Value::Int(n) => Value::Int(n),
                Value::OptInt(n) => Value::OptInt(n),
                Value::Int4(n) => Value::Int4(n),
                Value::OptInt4(n) => Value::OptInt4(n),
                Value::Flag(b) => Value::Flag(b),
                Value::Ints(_) | Value::Texts(_) => {
                    return Err(StorageError::Backend("SQLite binds no arrays".into()))
                }
            })
        })
        .collect::<Result<_, StorageError>>()?;
    Ok(Stmt {
        sql: Cow::Owned(s.sql.into_owned()),
        values,
        inserts: s.inserts,
    })
}

/// SQLite's pool as a [`Run`]: the reader threads, or (for code that has
/// only the sqlx pool, `Engine::pooled`) a sqlx connection of it.
#[derive(Debug)]
pub enum LitePooled<'p> {
    Sqlx(Pooled<'p, sqlx::Sqlite>),
    Readers(&'p Readers),
}

impl<'p> From<Pooled<'p, sqlx::Sqlite>> for LitePooled<'p> {
    fn from(p: Pooled<'p, sqlx::Sqlite>) -> Self {
        LitePooled::Sqlx(p)
    }
}

impl LitePooled<'_> {
    async fn rows<R: LiteRow + Send + 'static>(
        r: &Readers,
        s: Stmt<'_>,
        limit: usize,
    ) -> Result<Vec<R>, StorageError> {
        let s = owned(s)?;
        r.run(move |c| c.query_now::<R>(s, limit)).await
    }
}

#[async_trait::async_trait]
impl Run for LitePooled<'_> {
    async fn execute(&mut self, s: Stmt<'_>) -> Result<u64, StorageError> {
        match self {
            LitePooled::Sqlx(p) => p.execute(s).await,
            LitePooled::Readers(r) => {
                let s = owned(s)?;
                r.run(move |c| c.execute_now(s)).await
            }
        }
    }

    async fn fetch_all<R: Row>(&mut self, s: Stmt<'_>) -> Result<Vec<R>, StorageError> {
        match self {
            LitePooled::Sqlx(p) => p.fetch_all(s).await,
            LitePooled::Readers(r) => Self::rows(r, s, usize::MAX).await,
        }
    }

    async fn fetch_optional<R: Row>(&mut self, s: Stmt<'_>) -> Result<Option<R>, StorageError> {
        match self {
            LitePooled::Sqlx(p) => p.fetch_optional(s).await,
            LitePooled::Readers(r) => Ok(Self::rows(r, s, 1).await?.pop()),
        }
    }

    async fn fetch_one<R: Row>(&mut self, s: Stmt<'_>) -> Result<R, StorageError> {
        match self {
            LitePooled::Sqlx(p) => p.fetch_one(s).await,
            LitePooled::Readers(r) => Self::rows(r, s, 1)
                .await?
                .pop()
                .ok_or_else(|| StorageError::Backend("statement returned no row".into())),
        }
    }
}
