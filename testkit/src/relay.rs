//! [`Relay`]: a TCP relay on loopback whose target can be switched, so a
//! simulated machine (which keeps its gateway address for life) can be moved
//! from one gateway node to another without losing its journal, stock or
//! dedup memory.
//!
//! A switch cuts the machine's side of every current connection; the
//! machine reconnects through the relay to the new target. With `hold_old`
//! the upstream side of the old connection is kept open (and drained), as
//! when a machine's network path changes and its old TCP connection lingers
//! half-dead at the old node: the old node then has a stale connection that
//! only the cluster's take-over can close. The relay records when each held
//! connection is closed by the node.
//!
//! [`Relay::pause`] holds what the gateway sends the machine (bytes are
//! kept, in order) until [`Relay::resume`]: a mobile link that stalls, then
//! delivers late.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// A held (stale) upstream connection that the node closed.
#[derive(Debug, Clone, Copy)]
pub struct StaleClose {
    /// The node it was connected to.
    pub target: SocketAddr,
    /// When the relay switched away from it.
    pub held_at: Instant,
    /// When the node closed it.
    pub closed_at: Instant,
}

#[derive(Default)]
struct State {
    target: Option<SocketAddr>,
    /// Upstream connections held open after a switch, not yet closed.
    held: usize,
    stale_closes: Vec<StaleClose>,
    accepted: u64,
    tasks: Vec<JoinHandle<()>>,
}

struct Inner {
    state: Mutex<State>,
    /// (generation, hold_old): a new generation cuts every connection of the
    /// older ones.
    generation: watch::Sender<(u64, bool)>,
    /// Bumped on every change of `state` worth waiting for.
    changed: watch::Sender<u64>,
    /// True while gateway → machine bytes are held back.
    paused: watch::Sender<bool>,
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn bump(&self) {
        self.changed.send_modify(|v| *v += 1);
    }
}

/// A switchable TCP relay; every connection and task ends on Drop.
pub struct Relay {
    addr: SocketAddr,
    inner: Arc<Inner>,
    accept: JoinHandle<()>,
}

impl Relay {
    /// Listens on a free loopback port, relaying to `target`.
    pub async fn start(target: SocketAddr) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind relay");
        let addr = listener.local_addr().expect("relay address");
        let inner = Arc::new(Inner {
            state: Mutex::new(State {
                target: Some(target),
                ..State::default()
            }),
            generation: watch::Sender::new((0, false)),
            changed: watch::Sender::new(0),
            paused: watch::Sender::new(false),
        });
        let accept = tokio::spawn(accept_loop(listener, Arc::clone(&inner)));
        Relay {
            addr,
            inner,
            accept,
        }
    }

    /// Where the machine connects.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `host:port` for `SimConfig::gateway`.
    pub fn gateway(&self) -> String {
        self.addr.to_string()
    }

    pub fn target(&self) -> Option<SocketAddr> {
        self.inner.lock().target
    }

    /// Relays new connections to `target` and cuts the current ones; with
    /// `hold_old` their upstream side stays open until the node closes it.
    pub fn switch(&self, target: SocketAddr, hold_old: bool) {
        self.inner.lock().target = Some(target);
        self.inner
            .generation
            .send_modify(|(g, h)| (*g, *h) = (*g + 1, hold_old));
    }

    /// Cuts the current connections (both sides) without changing the
    /// target: a network blip.
    pub fn cut(&self) {
        let t = self.target();
        if let Some(t) = t {
            self.switch(t, false);
        }
    }

    /// Refuses new connections (closes them at once) until the next
    /// [`Relay::switch`], and cuts the current ones.
    pub fn blackhole(&self) {
        self.inner.lock().target = None;
        self.inner
            .generation
            .send_modify(|(g, h)| (*g, *h) = (*g + 1, false));
    }

    /// Holds every byte the gateway sends the machine (current and new
    /// connections) until [`Relay::resume`]; the machine's own bytes still
    /// pass. Nothing is dropped.
    pub fn pause(&self) {
        self.inner.paused.send_replace(true);
    }

    /// Delivers what [`Relay::pause`] held, in order, and passes bytes again.
    pub fn resume(&self) {
        self.inner.paused.send_replace(false);
    }

    /// Held upstream connections the nodes have not closed yet.
    pub fn held_open(&self) -> usize {
        self.inner.lock().held
    }

    /// Held connections the nodes closed, in order.
    pub fn stale_closes(&self) -> Vec<StaleClose> {
        self.inner.lock().stale_closes.clone()
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> u64 {
        self.inner.lock().accepted
    }

    /// Waits until the nodes have closed `n` held connections in total;
    /// false after `limit`.
    pub async fn wait_stale_closes(&self, n: usize, limit: Duration) -> bool {
        let mut rx = self.inner.changed.subscribe();
        let deadline = Instant::now() + limit;
        loop {
            rx.borrow_and_update();
            if self.inner.lock().stale_closes.len() >= n {
                return true;
            }
            if tokio::time::timeout_at(deadline, rx.changed())
                .await
                .is_err()
            {
                return false;
            }
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.accept.abort();
        for t in self.inner.lock().tasks.drain(..) {
            t.abort();
        }
    }
}

async fn accept_loop(listener: TcpListener, inner: Arc<Inner>) {
    loop {
        let Ok((down, _)) = listener.accept().await else {
            continue;
        };
        let task = tokio::spawn(serve(down, Arc::clone(&inner)));
        let mut st = inner.lock();
        st.accepted += 1;
        st.tasks.retain(|t| !t.is_finished());
        st.tasks.push(task);
    }
}

/// Waits until the generation moves past `mine`; returns its hold flag.
async fn next_generation(rx: &mut watch::Receiver<(u64, bool)>, mine: u64) -> bool {
    loop {
        let (g, hold) = *rx.borrow_and_update();
        if g != mine {
            return hold;
        }
        if rx.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

async fn serve(mut down: TcpStream, inner: Arc<Inner>) {
    let mut rx = inner.generation.subscribe();
    let mine = rx.borrow_and_update().0;
    let Some(target) = inner.lock().target else {
        return;
    };
    let Ok(mut up) = TcpStream::connect(target).await else {
        return;
    };
    let _ = up.set_nodelay(true);
    let _ = down.set_nodelay(true);
    let mut paused = inner.paused.subscribe();
    let hold = {
        let (mut down_r, mut down_w) = down.split();
        let (mut up_r, mut up_w) = up.split();
        // Gateway → machine, held while paused.
        let to_machine = async {
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                let n = match up_r.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                if paused.wait_for(|p| !*p).await.is_err() {
                    return;
                }
                if down_w.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        };
        let to_gateway = tokio::io::copy(&mut down_r, &mut up_w);
        tokio::select! {
            _ = to_machine => return,
            _ = to_gateway => return,
            hold = next_generation(&mut rx, mine) => hold,
        }
    };
    drop(down);
    if !hold {
        return;
    }
    let held_at = Instant::now();
    inner.lock().held += 1;
    inner.bump();
    // Drain until the node closes it (or the relay is dropped).
    let mut buf = [0u8; 4096];
    loop {
        match up.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
    let closed_at = Instant::now();
    {
        let mut st = inner.lock();
        st.held -= 1;
        st.stale_closes.push(StaleClose {
            target,
            held_at,
            closed_at,
        });
    }
    inner.bump();
}
