//! Webhook figures for operators. Delivery counters live in the notifier
//! (`NotifierStats`) and the backlog in storage (`Notifier::backlog`); this
//! module names their `result` labels and tracks whether the notifier's task
//! runs, for `/readyz` (start-up wraps the task with [`WebhookObserver::observe`]).

use std::future::Future;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

use crate::notifier::NotifierStats;

/// Result of one delivery attempt, the `result` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeliveryResult {
    /// The merchant answered 2xx.
    Delivered,
    /// The attempt failed (network error, timeout, non-2xx, refused target);
    /// it will be retried.
    Failed,
    /// The event ran out of attempts (dead, replayable).
    GaveUp,
}

impl DeliveryResult {
    pub const ALL: [Self; 3] = [Self::Delivered, Self::Failed, Self::GaveUp];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Delivered => "delivered",
            Self::Failed => "failed",
            Self::GaveUp => "gave_up",
        }
    }

    /// The notifier's count of this result.
    pub fn count(self, stats: &NotifierStats) -> u64 {
        let a = match self {
            Self::Delivered => &stats.delivered,
            Self::Failed => &stats.failed_attempts,
            Self::GaveUp => &stats.dead,
        };
        a.load(Ordering::Relaxed)
    }
}

/// Whether the notifier runs, as `/readyz` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotifierState {
    /// Not started (yet), or not part of this gateway.
    Absent,
    Running,
    /// Its task ended (shutdown, or it died).
    Stopped,
}

/// See the module docs.
#[derive(Debug, Default)]
pub struct WebhookObserver {
    /// 0: never started, 1: running, 2: stopped.
    state: AtomicU8,
}

/// Marks the notifier stopped however its task ends, panics included.
struct StoppedOnDrop(Arc<WebhookObserver>);

impl Drop for StoppedOnDrop {
    fn drop(&mut self) {
        self.0.set_running(false);
    }
}

impl WebhookObserver {
    /// Run the notifier's task `fut`, reporting it running until it ends.
    pub async fn observe<F: Future<Output = ()>>(self: Arc<Self>, fut: F) {
        self.set_running(true);
        let _guard = StoppedOnDrop(self);
        fut.await;
    }

    /// The notifier's task started (true) or ended (false).
    pub fn set_running(&self, running: bool) {
        self.state
            .store(if running { 1 } else { 2 }, Ordering::Relaxed);
    }

    pub fn state(&self) -> NotifierState {
        match self.state.load(Ordering::Relaxed) {
            0 => NotifierState::Absent,
            1 => NotifierState::Running,
            _ => NotifierState::Stopped,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn observe_tracks_the_task() {
        let w = Arc::new(WebhookObserver::default());
        assert_eq!(w.state(), NotifierState::Absent);
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(w.clone().observe(async move {
            let _ = rx.await;
        }));
        tokio::task::yield_now().await;
        while w.state() == NotifierState::Absent {
            tokio::task::yield_now().await;
        }
        assert_eq!(w.state(), NotifierState::Running);
        let _ = tx.send(());
        let _ = task.await;
        assert_eq!(w.state(), NotifierState::Stopped);
        // A task that dies counts as stopped too.
        let task = tokio::spawn(w.clone().observe(async { panic!("boom") }));
        assert!(task.await.is_err());
        assert_eq!(w.state(), NotifierState::Stopped);
    }
}
