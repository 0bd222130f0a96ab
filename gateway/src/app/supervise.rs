//! Supervision of the long-lived tasks (listeners, the notifier, sweeps,
//! the presence persister, cluster loops): one that ends while the gateway
//! is meant to be running is logged, counted and fails `/readyz`, so a
//! load balancer stops sending to a node that silently stopped doing part
//! of its job.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};

use futures::FutureExt;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::error;

/// Watches the tasks spawned through it.
pub struct Supervisor {
    /// Names of the tasks that ended before shutdown (bounded by the tasks
    /// spawned at start-up, a fixed set).
    ended: Mutex<Vec<&'static str>>,
    shutdown: CancellationToken,
}

impl Supervisor {
    pub fn new(shutdown: CancellationToken) -> Arc<Self> {
        Arc::new(Self {
            ended: Mutex::new(Vec::new()),
            shutdown,
        })
    }

    /// Spawn the long-lived task `name`. Ending before shutdown (returning
    /// or panicking) is recorded; ending after it is the plan.
    pub fn spawn<F>(self: &Arc<Self>, name: &'static str, task: F) -> JoinHandle<()>
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let me = self.clone();
        tokio::spawn(async move {
            let panicked = AssertUnwindSafe(task).catch_unwind().await.is_err();
            if !me.shutdown.is_cancelled() {
                error!(
                    task = name,
                    panicked, "a long-lived task ended while the gateway runs; /readyz now fails"
                );
                if let Ok(mut e) = me.ended.lock() {
                    e.push(name);
                }
            }
        })
    }

    /// The tasks that ended before shutdown.
    pub fn ended(&self) -> Vec<&'static str> {
        self.ended.lock().map(|e| e.clone()).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_task_ending_early_is_recorded_and_one_ending_at_shutdown_is_not() {
        let shutdown = CancellationToken::new();
        let sup = Supervisor::new(shutdown.clone());
        sup.spawn("returns", async {}).await.unwrap();
        sup.spawn("panics", async { panic!("boom") }).await.unwrap();
        assert_eq!(sup.ended(), vec!["returns", "panics"]);
        let stop = shutdown.clone();
        let waits = sup.spawn("waits", async move { stop.cancelled().await });
        shutdown.cancel();
        waits.await.unwrap();
        assert_eq!(sup.ended(), vec!["returns", "panics"]);
    }
}
