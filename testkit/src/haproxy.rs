//! [`Haproxy`] in front of gateway nodes, configured as a deployment would
//! be: an MQTT frontend (TCP, leastconn, sticky on the MQTT client id,
//! invalid MQTT rejected) and an HTTP frontend (round robin), both checking
//! each node's `/readyz` every 500 ms and cutting the MQTT sessions of a node
//! marked down, so its machines reconnect to the others. A stats page tells
//! the tests which servers are up and how many sessions each holds.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::process::{log_tail, write_file, Proc, Spec};
use crate::{free_addr, probe_client, require_binary, wait_for};

/// One gateway node as haproxy sees it.
#[derive(Debug, Clone)]
pub struct Backend {
    /// Server name in the config and the stats (e.g. the node id).
    pub name: String,
    pub mqtt: SocketAddr,
    pub http: SocketAddr,
}

/// A server's line in the stats.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerStat {
    /// "UP", "DOWN", "UP 1/2", "no check", …
    pub status: String,
    /// Current sessions.
    pub sessions: u64,
}

/// A running haproxy; killed on Drop.
pub struct Haproxy {
    mqtt: SocketAddr,
    http: SocketAddr,
    stats: SocketAddr,
    backends: Vec<Backend>,
    log: PathBuf,
    proc: Proc,
    _dir: tempfile::TempDir,
}

/// MQTT and HTTP backends' names in the config.
pub const MQTT_BACKEND: &str = "mqtt_nodes";
pub const HTTP_BACKEND: &str = "http_nodes";

impl Haproxy {
    /// Starts haproxy in front of `backends` and waits until it answers its
    /// stats page. Does not wait for the backends to be up (see
    /// [`Haproxy::wait_up`]).
    pub async fn start(backends: &[Backend]) -> Haproxy {
        let bin = require_binary("haproxy", &[]);
        let dir = tempfile::Builder::new()
            .prefix("vg-haproxy-")
            .tempdir()
            .expect("temp dir");
        let (mqtt, http, stats) = (free_addr(), free_addr(), free_addr());
        let mut mqtt_servers = String::new();
        let mut http_servers = String::new();
        for b in backends {
            mqtt_servers.push_str(&format!(
                "    server {} {} check port {}\n",
                b.name,
                b.mqtt,
                b.http.port()
            ));
            http_servers.push_str(&format!("    server {} {} check\n", b.name, b.http));
        }
        // `timeout client/server` far above any machine keep alive used in
        // tests (idle MQTT connections must not be cut by the proxy);
        // `timeout check` short so a frozen node fails its check quickly.
        let config = format!(
            "global\n\
             \x20   maxconn 4000\n\
             defaults\n\
             \x20   timeout connect 1s\n\
             \x20   timeout client 10m\n\
             \x20   timeout server 10m\n\
             \x20   timeout check 1s\n\
             \x20   option redispatch\n\
             \x20   retries 2\n\
             frontend mqtt_in\n\
             \x20   mode tcp\n\
             \x20   bind {mqtt}\n\
             \x20   option clitcpka\n\
             \x20   tcp-request inspect-delay 5s\n\
             \x20   tcp-request content reject unless {{ req.payload(0,0),mqtt_is_valid }}\n\
             \x20   default_backend {MQTT_BACKEND}\n\
             backend {MQTT_BACKEND}\n\
             \x20   mode tcp\n\
             \x20   balance leastconn\n\
             \x20   option srvtcpka\n\
             \x20   stick-table type string len 64 size 100k expire 2h\n\
             \x20   stick on req.payload(0,0),mqtt_field_value(connect,client_identifier)\n\
             \x20   option httpchk GET /readyz\n\
             \x20   default-server inter 500ms fall 2 rise 1 on-marked-down shutdown-sessions\n\
             {mqtt_servers}\
             frontend http_in\n\
             \x20   mode http\n\
             \x20   bind {http}\n\
             \x20   timeout client 60s\n\
             \x20   default_backend {HTTP_BACKEND}\n\
             backend {HTTP_BACKEND}\n\
             \x20   mode http\n\
             \x20   balance roundrobin\n\
             \x20   timeout server 60s\n\
             \x20   option httpchk GET /readyz\n\
             \x20   default-server inter 500ms fall 2 rise 1\n\
             {http_servers}\
             listen stats\n\
             \x20   mode http\n\
             \x20   bind {stats}\n\
             \x20   stats enable\n\
             \x20   stats uri /stats\n\
             \x20   stats refresh 1s\n"
        );
        let cfg = dir.path().join("haproxy.cfg");
        write_file(&cfg, &config);
        let log = dir.path().join("haproxy.log");
        let mut cmd = std::process::Command::new(bin);
        // -db: foreground, no daemon (so it stays our child); -W off.
        cmd.arg("-db").arg("-f").arg(&cfg);
        let proc = Proc::spawn(Spec {
            name: "haproxy".into(),
            command: cmd,
            log: log.clone(),
            graceful_signal: None,
            // Only if the test process dies without dropping the fixture.
            cleanup_dir: Some(dir.path().to_path_buf()),
        });
        let mut h = Haproxy {
            mqtt,
            http,
            stats,
            backends: backends.to_vec(),
            log,
            proc,
            _dir: dir,
        };
        let ready = wait_for(
            Duration::from_secs(10),
            Duration::from_millis(30),
            || async { h.stats().await.is_some() },
        )
        .await;
        if ready.is_err() || !h.proc.running() {
            panic!(
                "haproxy did not start:\n{config}\n--- log ---\n{}",
                h.log_tail(40)
            );
        }
        h
    }

    /// Where machines connect.
    pub fn mqtt_addr(&self) -> SocketAddr {
        self.mqtt
    }

    /// Where merchants' HTTP requests go.
    pub fn http_addr(&self) -> SocketAddr {
        self.http
    }

    pub fn backends(&self) -> &[Backend] {
        &self.backends
    }

    /// Every server's status and sessions, keyed by (backend, server).
    pub async fn stats(&self) -> Option<HashMap<(String, String), ServerStat>> {
        let r = probe_client()
            .get(format!("http://{}/stats;csv", self.stats))
            .send()
            .await
            .ok()?;
        let text = r.text().await.ok()?;
        let mut lines = text.lines();
        let header: Vec<&str> = lines.next()?.trim_start_matches("# ").split(',').collect();
        let col = |name: &str| header.iter().position(|h| *h == name);
        let (px, sv, scur, status) = (col("pxname")?, col("svname")?, col("scur")?, col("status")?);
        let mut out = HashMap::new();
        for l in lines {
            let f: Vec<&str> = l.split(',').collect();
            let (Some(p), Some(s)) = (f.get(px), f.get(sv)) else {
                continue;
            };
            if *s == "FRONTEND" || *s == "BACKEND" {
                continue;
            }
            out.insert(
                (p.to_string(), s.to_string()),
                ServerStat {
                    status: f.get(status).unwrap_or(&"").to_string(),
                    sessions: f.get(scur).and_then(|v| v.parse().ok()).unwrap_or(0),
                },
            );
        }
        Some(out)
    }

    /// Current MQTT sessions per server name (machines held through the
    /// proxy by each node).
    pub async fn mqtt_sessions(&self) -> HashMap<String, u64> {
        self.stats()
            .await
            .unwrap_or_default()
            .into_iter()
            .filter(|((b, _), _)| b == MQTT_BACKEND)
            .map(|((_, s), st)| (s, st.sessions))
            .collect()
    }

    /// Whether `server` is UP in both backends.
    pub async fn is_up(&self, server: &str) -> bool {
        let Some(st) = self.stats().await else {
            return false;
        };
        [MQTT_BACKEND, HTTP_BACKEND].iter().all(|b| {
            st.get(&(b.to_string(), server.to_string()))
                .is_some_and(|s| s.status.starts_with("UP"))
        })
    }

    /// Whether `server` is DOWN in both backends.
    pub async fn is_down(&self, server: &str) -> bool {
        let Some(st) = self.stats().await else {
            return false;
        };
        [MQTT_BACKEND, HTTP_BACKEND].iter().all(|b| {
            st.get(&(b.to_string(), server.to_string()))
                .is_some_and(|s| s.status.starts_with("DOWN"))
        })
    }

    /// Waits until every server in `servers` is UP in both backends; panics
    /// after `limit` with the stats and the log tail.
    pub async fn wait_up(&self, servers: &[&str], limit: Duration) {
        let r = wait_for(limit, Duration::from_millis(50), || async {
            for s in servers {
                if !self.is_up(s).await {
                    return false;
                }
            }
            true
        })
        .await;
        if r.is_err() {
            panic!(
                "haproxy: servers {servers:?} not all UP within {limit:?}: {:?}\n{}",
                self.stats().await,
                self.log_tail(30)
            );
        }
    }

    /// Waits until `server` is DOWN in both backends.
    pub async fn wait_down(&self, server: &str, limit: Duration) {
        let r = wait_for(limit, Duration::from_millis(50), || async {
            self.is_down(server).await
        })
        .await;
        if r.is_err() {
            panic!(
                "haproxy: server {server} not DOWN within {limit:?}: {:?}",
                self.stats().await
            );
        }
    }

    pub fn log_tail(&self, lines: usize) -> String {
        log_tail(&self.log, lines)
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }
}
