//! Self-tests of the fixtures: a NATS cluster forms, routes messages between
//! servers and survives a kill and a restart; haproxy routes MQTT by client
//! id and moves a down node's sessions elsewhere; the relay moves and holds
//! connections; PostgreSQL starts, creates databases, stops and starts; and
//! a test process that aborts leaves no process behind.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use vendgate_testkit::{wait_for, Backend, Haproxy, NatsCluster, PgServer, Relay};

const LIMIT: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------- NATS

/// A bare NATS protocol client: enough to subscribe and publish.
struct Nats {
    s: TcpStream,
    buf: Vec<u8>,
}

impl Nats {
    async fn connect(url: &str) -> Nats {
        let addr = url.trim_start_matches("nats://");
        let mut s = TcpStream::connect(addr).await.expect("connect to NATS");
        s.write_all(b"CONNECT {\"verbose\":false}\r\nPING\r\n")
            .await
            .expect("write");
        let mut n = Nats { s, buf: Vec::new() };
        assert!(n.read_until("PONG").await, "NATS PONG");
        n
    }

    async fn send(&mut self, text: &str) {
        self.s.write_all(text.as_bytes()).await.expect("write");
    }

    /// Reads until the buffer contains `what` (answering server PINGs);
    /// false after 2 s.
    async fn read_until(&mut self, what: &str) -> bool {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        loop {
            let text = String::from_utf8_lossy(&self.buf).to_string();
            if text.contains(what) {
                self.buf.clear();
                return true;
            }
            if text.contains("PING\r\n") {
                self.buf.clear();
                let _ = self.s.write_all(b"PONG\r\n").await;
            }
            let mut chunk = [0u8; 4096];
            match tokio::time::timeout_at(deadline, self.s.read(&mut chunk)).await {
                Ok(Ok(n)) if n > 0 => self.buf.extend_from_slice(&chunk[..n]),
                _ => return false,
            }
        }
    }
}

/// A message published on server `from` reaches a subscriber on `to`.
async fn delivers(c: &NatsCluster, from: usize, to: usize, subject: &str) -> bool {
    let mut sub = Nats::connect(&c.url(to)).await;
    sub.send(&format!("SUB {subject} 1\r\nPING\r\n")).await;
    assert!(sub.read_until("PONG").await);
    let mut publ = Nats::connect(&c.url(from)).await;
    // Interest crosses the route within milliseconds; publish until seen.
    let deadline = tokio::time::Instant::now() + LIMIT;
    while tokio::time::Instant::now() < deadline {
        publ.send(&format!("PUB {subject} 2\r\nhi\r\n")).await;
        if tokio::time::timeout(Duration::from_millis(200), sub.read_until("MSG "))
            .await
            .unwrap_or(false)
        {
            return true;
        }
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_cluster_forms_routes_messages_and_survives_kill_and_restart() {
    let mut c = NatsCluster::start(3).await;
    assert_eq!(c.urls().len(), 3);
    for i in 0..3 {
        assert_eq!(c.routes(i).await, Some(2), "server {i} routes");
    }
    assert!(delivers(&c, 0, 2, "t.a").await, "n1 → n3");

    c.kill(1);
    assert!(!c.running(1));
    c.wait_routes(0, 1).await;
    c.wait_routes(2, 1).await;
    assert_eq!(c.routes(1).await, None, "a killed server does not answer");
    assert!(delivers(&c, 2, 0, "t.b").await, "n3 → n1 with n2 dead");

    c.restart(1).await;
    for i in 0..3 {
        c.wait_routes(i, 2).await;
    }
    assert!(delivers(&c, 1, 0, "t.c").await, "restarted n2 → n1");

    // Frozen: its monitoring port does not answer; after SIGCONT it does,
    // with its routes.
    c.stop(2);
    assert_eq!(c.routes(2).await, None, "a stopped server does not answer");
    c.cont(2);
    c.wait_routes(2, 2).await;
}

// ---------------------------------------------------------------- haproxy

/// A connection's client id and whether it is still open.
type Conns = Arc<Mutex<Vec<(String, Arc<AtomicBool>)>>>;

/// A fake gateway node: an MQTT listener that records the client id of
/// every CONNECT (and answers CONNACK), and an HTTP listener whose
/// `/readyz` answers 200 or 503.
#[derive(Clone)]
struct FakeNode {
    mqtt: SocketAddr,
    http: SocketAddr,
    ready: Arc<AtomicBool>,
    /// (client id, still open) per connection.
    conns: Conns,
}

impl FakeNode {
    async fn start() -> FakeNode {
        let m = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let h = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let n = FakeNode {
            mqtt: m.local_addr().unwrap(),
            http: h.local_addr().unwrap(),
            ready: Arc::new(AtomicBool::new(true)),
            conns: Arc::default(),
        };
        let me = n.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = m.accept().await {
                let me = me.clone();
                tokio::spawn(async move {
                    let Some(id) = read_connect(&mut s).await else {
                        return;
                    };
                    let open = Arc::new(AtomicBool::new(true));
                    me.conns.lock().unwrap().push((id, open.clone()));
                    let _ = s.write_all(&[0x20, 0x02, 0x00, 0x00]).await;
                    let mut b = [0u8; 256];
                    while matches!(s.read(&mut b).await, Ok(n) if n > 0) {}
                    open.store(false, Ordering::SeqCst);
                });
            }
        });
        let ready = n.ready.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = h.accept().await {
                let ready = ready.clone();
                tokio::spawn(async move {
                    let mut b = [0u8; 1024];
                    let _ = s.read(&mut b).await;
                    let status = if ready.load(Ordering::SeqCst) {
                        "200 OK"
                    } else {
                        "503 Service Unavailable"
                    };
                    let _ = s
                        .write_all(
                            format!("HTTP/1.1 {status}\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok")
                                .as_bytes(),
                        )
                        .await;
                });
            }
        });
        n
    }

    fn open_ids(&self) -> Vec<String> {
        self.conns
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, o)| o.load(Ordering::SeqCst))
            .map(|(id, _)| id.clone())
            .collect()
    }

    fn all_ids(&self) -> Vec<String> {
        self.conns
            .lock()
            .unwrap()
            .iter()
            .map(|(id, _)| id.clone())
            .collect()
    }
}

/// Reads one MQTT CONNECT and returns its client id.
async fn read_connect(s: &mut TcpStream) -> Option<String> {
    let mut head = [0u8; 1];
    s.read_exact(&mut head).await.ok()?;
    if head[0] != 0x10 {
        return None;
    }
    let (mut len, mut shift) = (0usize, 0);
    loop {
        let mut b = [0u8; 1];
        s.read_exact(&mut b).await.ok()?;
        len |= usize::from(b[0] & 0x7f) << shift;
        shift += 7;
        if b[0] & 0x80 == 0 {
            break;
        }
    }
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).await.ok()?;
    // 2+4 "MQTT", level, flags, keep alive (2): payload from byte 10.
    let n = usize::from(*body.get(10)?) << 8 | usize::from(*body.get(11)?);
    Some(String::from_utf8_lossy(body.get(12..12 + n)?).into_owned())
}

/// A minimal MQTT 3.1.1 CONNECT for `client_id`.
fn connect_packet(client_id: &str) -> Vec<u8> {
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 60];
    body.extend_from_slice(&(client_id.len() as u16).to_be_bytes());
    body.extend_from_slice(client_id.as_bytes());
    let mut p = vec![0x10, body.len() as u8];
    p.extend(body);
    p
}

/// Connects through haproxy as `client_id`; the stream after CONNACK.
async fn mqtt_connect(addr: SocketAddr, client_id: &str) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(&connect_packet(client_id)).await.unwrap();
    let mut ack = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut ack))
        .await
        .expect("CONNACK in time")
        .expect("CONNACK");
    assert_eq!(ack, [0x20, 0x02, 0x00, 0x00]);
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn haproxy_routes_mqtt_by_client_id_and_moves_sessions_off_a_down_node() {
    let (a, b) = (FakeNode::start().await, FakeNode::start().await);
    let h = Haproxy::start(&[
        Backend {
            name: "a".into(),
            mqtt: a.mqtt,
            http: a.http,
        },
        Backend {
            name: "b".into(),
            mqtt: b.mqtt,
            http: b.http,
        },
    ])
    .await;
    h.wait_up(&["a", "b"], LIMIT).await;

    // Invalid MQTT is refused before reaching any node.
    let mut junk = TcpStream::connect(h.mqtt_addr()).await.unwrap();
    junk.write_all(b"GET / HTTP/1.0\r\n\r\n").await.unwrap();
    let mut b1 = [0u8; 16];
    let r = tokio::time::timeout(Duration::from_secs(5), junk.read(&mut b1)).await;
    assert!(matches!(r, Ok(Ok(0)) | Ok(Err(_))), "junk closed: {r:?}");

    // Six ids, leastconn: both nodes get some; the same id lands on the
    // same node every time (sticky), even after reconnecting.
    let ids: Vec<String> = (0..6).map(|i| format!("1000000{i}")).collect();
    let mut streams = HashMap::new();
    for id in &ids {
        streams.insert(id.clone(), mqtt_connect(h.mqtt_addr(), id).await);
    }
    let on = |n: &FakeNode, id: &str| n.open_ids().iter().any(|x| x == id);
    let home: HashMap<String, &str> = ids
        .iter()
        .map(|id| (id.clone(), if on(&a, id) { "a" } else { "b" }))
        .collect();
    assert!(
        home.values().any(|v| *v == "a") && home.values().any(|v| *v == "b"),
        "{home:?}"
    );
    let sessions = h.mqtt_sessions().await;
    assert_eq!(sessions.values().sum::<u64>(), 6, "{sessions:?}");
    for id in &ids {
        drop(streams.remove(id));
        let s = mqtt_connect(h.mqtt_addr(), id).await;
        let node = if home[id] == "a" { &a } else { &b };
        wait_for(LIMIT, Duration::from_millis(10), || async { on(node, id) })
            .await
            .unwrap_or_else(|_| panic!("{id} back on {}", home[id]));
        streams.insert(id.clone(), s);
    }

    // Node a fails its /readyz: haproxy marks it down and cuts its MQTT
    // sessions; the same ids reconnect to b.
    a.ready.store(false, Ordering::SeqCst);
    let t = tokio::time::Instant::now();
    h.wait_down("a", LIMIT).await;
    let on_a: Vec<String> = ids.iter().filter(|id| home[*id] == "a").cloned().collect();
    wait_for(LIMIT, Duration::from_millis(10), || async {
        a.open_ids().is_empty()
    })
    .await
    .expect("a's sessions cut");
    println!(
        "haproxy: node marked down and its sessions cut after {:?}",
        t.elapsed()
    );
    for id in &on_a {
        let s = mqtt_connect(h.mqtt_addr(), id).await;
        wait_for(LIMIT, Duration::from_millis(10), || async { on(&b, id) })
            .await
            .unwrap_or_else(|_| panic!("{id} re-homed on b"));
        streams.insert(id.clone(), s);
    }
    // a comes back: new ids may go there again; the moved ids' entries now
    // point at b, so they stay there on a reconnect.
    a.ready.store(true, Ordering::SeqCst);
    h.wait_up(&["a", "b"], LIMIT).await;
    let before = a.all_ids().len();
    let id = &on_a[0];
    drop(streams.remove(id));
    let _s = mqtt_connect(h.mqtt_addr(), id).await;
    wait_for(LIMIT, Duration::from_millis(10), || async {
        on(&a, id) || on(&b, id)
    })
    .await
    .expect("reconnected");
    println!(
        "haproxy: after node a came back, {id} reconnected to {} (stick entry {})",
        if on(&a, id) { "a" } else { "b" },
        if on(&b, id) { "moved with it" } else { "kept" }
    );
    assert!(a.all_ids().len() >= before);
}

// ---------------------------------------------------------------- relay

/// A server that accepts connections and reports, per connection, whether
/// it is still open; `close_all` closes them.
#[derive(Clone)]
struct Sink {
    addr: SocketAddr,
    open: Arc<Mutex<Vec<tokio::sync::oneshot::Sender<()>>>>,
}

impl Sink {
    async fn start() -> Sink {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let s = Sink {
            addr: l.local_addr().unwrap(),
            open: Arc::default(),
        };
        let me = s.clone();
        tokio::spawn(async move {
            while let Ok((mut c, _)) = l.accept().await {
                let (tx, rx) = tokio::sync::oneshot::channel();
                me.open.lock().unwrap().push(tx);
                tokio::spawn(async move {
                    let mut b = [0u8; 64];
                    tokio::select! {
                        _ = rx => {}
                        _ = async { while matches!(c.read(&mut b).await, Ok(n) if n > 0) {} } => {}
                    }
                });
            }
        });
        s
    }

    fn close_all(&self) {
        for tx in self.open.lock().unwrap().drain(..) {
            let _ = tx.send(());
        }
    }

    fn connections(&self) -> usize {
        self.open.lock().unwrap().len()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_switches_targets_and_holds_the_old_connection_until_the_node_closes_it() {
    let (a, b) = (Sink::start().await, Sink::start().await);
    let relay = Relay::start(a.addr).await;
    let mut c = TcpStream::connect(relay.addr()).await.unwrap();
    c.write_all(b"x").await.unwrap();
    wait_for(LIMIT, Duration::from_millis(5), || async {
        a.connections() == 1
    })
    .await
    .unwrap();
    relay.switch(b.addr, true);
    let mut buf = [0u8; 8];
    let r = tokio::time::timeout(LIMIT, c.read(&mut buf))
        .await
        .expect("cut in time");
    assert!(matches!(r, Ok(0) | Err(_)), "client side cut");
    wait_for(LIMIT, Duration::from_millis(5), || async {
        relay.held_open() == 1
    })
    .await
    .unwrap();
    let _c2 = TcpStream::connect(relay.addr()).await.unwrap();
    wait_for(LIMIT, Duration::from_millis(5), || async {
        b.connections() == 1
    })
    .await
    .unwrap();
    assert!(relay.stale_closes().is_empty());
    a.close_all();
    assert!(relay.wait_stale_closes(1, LIMIT).await, "stale close seen");
    assert_eq!(relay.stale_closes()[0].target, a.addr);
    assert_eq!(relay.held_open(), 0);
}

// ---------------------------------------------------------------- PostgreSQL

fn psql(url: &str, sql: &str) -> Result<String, String> {
    let out = std::process::Command::new("/usr/lib/postgresql/15/bin/psql")
        .args(["-X", "-d", url, "-tAc", sql])
        .env("PGCONNECT_TIMEOUT", "3")
        .output()
        .map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_creates_databases_and_stops_and_starts() {
    let pg = PgServer::dedicated().await;
    let url = pg.create_database().await;
    assert_eq!(psql(&url, "select 1+1").unwrap(), "2");
    psql(&url, "create table t(x int); insert into t values (7)").unwrap();
    pg.stop().await;
    assert!(psql(&url, "select 1").is_err(), "stopped");
    pg.start().await;
    assert_eq!(psql(&url, "select x from t").unwrap(), "7", "data survives");
    let other = pg.create_database().await;
    assert_ne!(other, url);
    assert!(
        pg.log_tail(5).contains("database system is ready"),
        "{}",
        pg.log_tail(20)
    );
    // The shared server is a different one.
    let shared = PgServer::shared_async().await;
    assert_ne!(shared.url_of(None), pg.url_of(None));
    let u = shared.create_database().await;
    assert_eq!(psql(&u, "select 3").unwrap(), "3");
}

// ---------------------------------------------------------------- watchdog

const PIDFILE_ENV: &str = "VENDGATE_TESTKIT_ABORT_PIDFILE";

/// Run by `a_test_process_that_aborts_leaves_no_process_behind` as a child
/// test process: starts fixtures, writes their PIDs, then aborts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "helper: run by a_test_process_that_aborts_leaves_no_process_behind"]
async fn abort_child() {
    let Ok(pidfile) = std::env::var(PIDFILE_ENV) else {
        return;
    };
    let nats = NatsCluster::start(2).await;
    let db = PgServer::shared_async().await.create_database().await;
    let h = Haproxy::start(&[]).await;
    let pids: Vec<String> = [nats.pid(0), nats.pid(1), Some(h.pid())]
        .into_iter()
        .flatten()
        .map(|p| p.to_string())
        .chain([format!("pgurl:{db}")])
        .collect();
    std::fs::write(&pidfile, pids.join("\n")).unwrap();
    std::process::abort();
}

fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // State after the parenthesised command: Z is a zombie (dead).
        Ok(s) => s
            .rsplit(')')
            .next()
            .is_some_and(|r| !r.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_test_process_that_aborts_leaves_no_process_behind() {
    let dir = tempfile::tempdir().unwrap();
    let pidfile = dir.path().join("pids");
    let status = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["abort_child", "--exact", "--ignored", "--nocapture"])
        .env(PIDFILE_ENV, &pidfile)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(!status.success(), "the child aborted");
    let text = std::fs::read_to_string(&pidfile).expect("the child wrote its PIDs");
    let mut pids = Vec::new();
    let mut pg_url = None;
    for l in text.lines() {
        match l.strip_prefix("pgurl:") {
            Some(u) => pg_url = Some(u.to_string()),
            None => pids.push(l.parse::<u32>().unwrap()),
        }
    }
    assert_eq!(pids.len(), 3, "{text}");
    let t = std::time::Instant::now();
    wait_for(LIMIT, Duration::from_millis(50), || {
        let pids = pids.clone();
        async move { pids.iter().all(|p| !alive(*p)) }
    })
    .await
    .unwrap_or_else(|_| {
        panic!(
            "processes left behind: {:?}",
            pids.iter().filter(|p| alive(**p)).collect::<Vec<_>>()
        )
    });
    // The child's PostgreSQL (its process-wide server) stops too.
    let url = pg_url.expect("pg url");
    wait_for(LIMIT, Duration::from_millis(100), || {
        let url = url.clone();
        async move { psql(&url, "select 1").is_err() }
    })
    .await
    .expect("the aborted process's PostgreSQL stopped");
    println!(
        "watchdog: everything gone {:?} after the abort",
        t.elapsed()
    );
}
