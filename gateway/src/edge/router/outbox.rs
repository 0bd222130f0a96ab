//! The queue that carries messages from the router to one connection's
//! task, and the message it carries: bounded, one consumer, and small
//! when idle.
//!
//! Why not `tokio::sync::mpsc`: its channel state is cache-line padded and
//! allocates a block of 32 slots up front, about 700 bytes per connection
//! before a single message, which at 10,000 idle machines is a third of the
//! hub's memory. This queue is one small allocation (a lock, an empty
//! `VecDeque`, the consumer's waker); slots are allocated only while
//! messages wait, and a drained queue gives a grown buffer back. The
//! consumer polls it ([`Receiver::poll_recv`]) rather than holding a
//! waiting future, so an idle connection's task carries no waiter state.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use tokio::sync::mpsc::error::{TryRecvError, TrySendError};

use bytes::Bytes;
use rumqttc::mqttbytes::QoS;

/// Slots a drained queue may keep (pointers), so a connection receiving a
/// steady trickle does not reallocate per message while an idle one holds
/// almost nothing.
const KEEP_SLOTS: usize = 8;

/// One message on its way to one client.
#[derive(Debug, Clone)]
pub struct Outbound {
    pub topic: Arc<str>,
    pub payload: Bytes,
    pub qos: QoS,
    pub retain: bool,
    /// Fired when the client acknowledges this message (QoS 1 PUBACK).
    pub receipt: Option<Receipt>,
}

/// Tells a sender that its QoS 1 message reached the client: the machine's
/// PUBACK, not the moment it was queued.
#[derive(Debug, Clone)]
pub struct Receipt(Arc<std::sync::Mutex<Option<tokio::sync::oneshot::Sender<()>>>>);

impl Receipt {
    pub fn new() -> (Self, tokio::sync::oneshot::Receiver<()>) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        (Self(Arc::new(std::sync::Mutex::new(Some(tx)))), rx)
    }

    pub fn fire(&self) {
        let tx = self.0.lock().ok().and_then(|mut t| t.take());
        if let Some(tx) = tx {
            let _ = tx.send(());
        }
    }
}

impl Outbound {
    /// What this message counts against its connection's memory budget.
    pub fn cost(&self) -> usize {
        message_cost(&self.topic, self.payload.len())
    }
}

/// Bytes a queued message is charged: topic, payload and the bookkeeping
/// around them (the box, the packet, the queue slot).
pub fn message_cost(topic: &str, payload_len: usize) -> usize {
    const OVERHEAD: usize = 64;
    topic.len() + payload_len + OVERHEAD
}

#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    /// Messages queued at most.
    cap: usize,
}

#[derive(Debug, Default)]
struct State {
    queue: VecDeque<Box<Outbound>>,
    closed: bool,
    /// The consumer, when it found the queue empty: woken (and forgotten)
    /// by the next message or by closing. Set under the same lock the
    /// producer checks, so no wake-up is lost in between.
    waker: Option<Waker>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Every critical section is one push, pop or flag: a panic while
        // holding the lock cannot leave the queue inconsistent.
        match self.state.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }
}

/// The router's end: [`Sender::try_send`] never waits.
#[derive(Debug)]
pub struct Sender(Arc<Shared>);

/// The connection's end.
#[derive(Debug)]
pub struct Receiver(Arc<Shared>);

/// A queue of at most `cap` (≥ 1) messages.
pub fn outbox(cap: usize) -> (Sender, Receiver) {
    let shared = Arc::new(Shared {
        state: Mutex::new(State::default()),
        cap: cap.max(1),
    });
    (Sender(shared.clone()), Receiver(shared))
}

impl Sender {
    /// Queue `msg`, or give it back: `Full` at the bound, `Closed` once the
    /// receiver closed or was dropped.
    pub fn try_send(&self, msg: Box<Outbound>) -> Result<(), TrySendError<Box<Outbound>>> {
        let mut st = self.0.lock();
        if st.closed {
            return Err(TrySendError::Closed(msg));
        }
        if st.queue.len() >= self.0.cap {
            return Err(TrySendError::Full(msg));
        }
        st.queue.push_back(msg);
        // Only a consumer that found the queue empty is woken, once: it
        // drains everything queued before it waits again.
        let waker = st.waker.take();
        drop(st);
        if let Some(w) = waker {
            w.wake();
        }
        Ok(())
    }
}

impl Receiver {
    /// The next message without waiting: `Empty`, or `Disconnected` once
    /// closed and drained.
    pub fn try_recv(&mut self) -> Result<Box<Outbound>, TryRecvError> {
        let mut st = self.0.lock();
        match st.queue.pop_front() {
            Some(m) => {
                if st.queue.is_empty() && st.queue.capacity() > KEEP_SLOTS {
                    st.queue = VecDeque::new();
                }
                Ok(m)
            }
            None if st.closed => Err(TryRecvError::Disconnected),
            None => Err(TryRecvError::Empty),
        }
    }

    /// The next message, or Pending with `cx`'s waker kept for the next
    /// one; Ready(None) once closed and drained. A message is taken only
    /// when this returns it.
    pub fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<Box<Outbound>>> {
        let mut st = self.0.lock();
        match st.queue.pop_front() {
            Some(m) => {
                if st.queue.is_empty() && st.queue.capacity() > KEEP_SLOTS {
                    st.queue = VecDeque::new();
                }
                Poll::Ready(Some(m))
            }
            None if st.closed => Poll::Ready(None),
            None => {
                if !st.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                    st.waker = Some(cx.waker().clone());
                }
                Poll::Pending
            }
        }
    }

    /// The next message; None once closed and drained.
    pub async fn recv(&mut self) -> Option<Box<Outbound>> {
        std::future::poll_fn(|cx| self.poll_recv(cx)).await
    }

    /// Refuse further messages; those already queued can still be taken.
    pub fn close(&mut self) {
        let waker = {
            let mut st = self.0.lock();
            st.closed = true;
            st.waker.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use rumqttc::mqttbytes::QoS;

    fn msg(n: u8) -> Box<Outbound> {
        Box::new(Outbound {
            topic: Arc::from("t"),
            payload: Bytes::from(vec![n]),
            qos: QoS::AtMostOnce,
            retain: false,
            receipt: None,
        })
    }

    #[tokio::test]
    async fn bounded_in_order_and_closable() {
        let (tx, mut rx) = outbox(2);
        tx.try_send(msg(1)).unwrap();
        tx.try_send(msg(2)).unwrap();
        assert!(matches!(tx.try_send(msg(3)), Err(TrySendError::Full(_))));
        assert_eq!(rx.recv().await.unwrap().payload[0], 1);
        assert_eq!(rx.try_recv().unwrap().payload[0], 2);
        assert!(matches!(rx.try_recv(), Err(TryRecvError::Empty)));
        tx.try_send(msg(4)).unwrap();
        rx.close();
        assert!(matches!(tx.try_send(msg(5)), Err(TrySendError::Closed(_))));
        assert_eq!(rx.recv().await.unwrap().payload[0], 4);
        assert!(rx.recv().await.is_none());
    }

    #[tokio::test]
    async fn a_waiting_consumer_is_woken() {
        let (tx, mut rx) = outbox(4);
        let got = tokio::spawn(async move { rx.recv().await.map(|m| m.payload[0]) });
        tokio::task::yield_now().await;
        tx.try_send(msg(7)).unwrap();
        assert_eq!(got.await.unwrap(), Some(7));
        assert!(matches!(tx.try_send(msg(8)), Err(TrySendError::Closed(_))));
    }

    #[test]
    fn a_drained_queue_gives_back_a_grown_buffer() {
        let (tx, mut rx) = outbox(100);
        for i in 0..50 {
            tx.try_send(msg(i)).unwrap();
        }
        while rx.try_recv().is_ok() {}
        assert_eq!(rx.0.lock().queue.capacity(), 0);
    }
}
