//! [`NatsCluster`]: n `nats-server` processes forming one cluster on free
//! loopback ports (no JetStream: the gateway keeps state in PostgreSQL), each
//! with its HTTP monitoring port so readiness is checked on `/routez`.

use std::path::PathBuf;
use std::time::Duration;

use crate::process::{log_tail, write_file, Proc, Spec};
use crate::{free_port, probe_client, require_binary, wait_for};

/// How long a cluster (or a restarted server) may take to be fully routed.
const FORM_DEADLINE: Duration = Duration::from_secs(20);

struct Server {
    name: String,
    client: u16,
    http: u16,
    route: u16,
    config: PathBuf,
    log: PathBuf,
    proc: Option<Proc>,
}

/// A NATS cluster for one test; every server is killed on Drop.
pub struct NatsCluster {
    bin: PathBuf,
    servers: Vec<Server>,
    // Last: the servers' files go after the processes.
    dir: tempfile::TempDir,
}

impl NatsCluster {
    /// Starts `n` servers and waits until each sees the n-1 others on
    /// `/routez`. Panics when `nats-server` is missing or the cluster does
    /// not form in time (with the servers' log tails).
    pub async fn start(n: usize) -> NatsCluster {
        assert!(n >= 1, "a cluster has at least one server");
        let bin = require_binary("nats-server", &[]);
        let dir = tempfile::Builder::new()
            .prefix("vg-nats-")
            .tempdir()
            .expect("temp dir");
        let ports: Vec<(u16, u16, u16)> = (0..n)
            .map(|_| (free_port(), free_port(), free_port()))
            .collect();
        let mut servers = Vec::new();
        for (i, &(client, http, route)) in ports.iter().enumerate() {
            let name = format!("n{}", i + 1);
            let routes: Vec<String> = ports
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != i)
                .map(|(_, p)| format!("nats-route://127.0.0.1:{}", p.2))
                .collect();
            let config = dir.path().join(format!("{name}.conf"));
            write_file(
                &config,
                &format!(
                    "server_name: {name}\n\
                     listen: 127.0.0.1:{client}\n\
                     http: 127.0.0.1:{http}\n\
                     cluster {{\n  name: vendgate-test\n  listen: 127.0.0.1:{route}\n  routes: [{}]\n}}\n",
                    routes.join(", ")
                ),
            );
            servers.push(Server {
                log: dir.path().join(format!("{name}.log")),
                name,
                client,
                http,
                route,
                config,
                proc: None,
            });
        }
        let mut c = NatsCluster { bin, servers, dir };
        for i in 0..n {
            c.spawn(i);
        }
        for i in 0..n {
            c.wait_routes(i, n - 1).await;
        }
        c
    }

    fn spawn(&mut self, i: usize) {
        let s = &mut self.servers[i];
        let mut cmd = std::process::Command::new(&self.bin);
        cmd.arg("-c").arg(&s.config);
        s.proc = Some(Proc::spawn(Spec {
            name: format!("nats-server {}", s.name),
            command: cmd,
            log: s.log.clone(),
            graceful_signal: None,
            // Only if the test process dies without dropping the fixture.
            cleanup_dir: Some(self.dir.path().to_path_buf()),
        }));
    }

    pub fn len(&self) -> usize {
        self.servers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.servers.is_empty()
    }

    /// `nats://127.0.0.1:port` of every server, in order.
    pub fn urls(&self) -> Vec<String> {
        (0..self.servers.len()).map(|i| self.url(i)).collect()
    }

    pub fn url(&self, i: usize) -> String {
        format!("nats://127.0.0.1:{}", self.servers[i].client)
    }

    /// The monitoring base URL of server `i`.
    pub fn monitor_url(&self, i: usize) -> String {
        format!("http://127.0.0.1:{}", self.servers[i].http)
    }

    /// The cluster (route) port of server `i`.
    pub fn route_port(&self, i: usize) -> u16 {
        self.servers[i].route
    }

    pub fn pid(&self, i: usize) -> Option<u32> {
        self.servers[i].proc.as_ref().map(Proc::pid)
    }

    /// SIGKILL server `i`.
    pub fn kill(&mut self, i: usize) {
        if let Some(p) = self.servers[i].proc.as_mut() {
            p.kill();
        }
    }

    /// SIGSTOP server `i` (hung, its sockets open).
    pub fn stop(&mut self, i: usize) {
        if let Some(p) = self.servers[i].proc.as_mut() {
            p.stop();
        }
    }

    /// SIGCONT server `i`.
    pub fn cont(&mut self, i: usize) {
        if let Some(p) = self.servers[i].proc.as_mut() {
            p.cont();
        }
    }

    /// Kills server `i` if it still runs, starts it again on the same ports
    /// and waits until it has routes to every other running server.
    pub async fn restart(&mut self, i: usize) {
        self.kill(i);
        self.spawn(i);
        let others = (0..self.servers.len())
            .filter(|&j| j != i && self.running(j))
            .count();
        self.wait_routes(i, others).await;
    }

    /// Whether server `i`'s process runs (stopped counts as running).
    pub fn running(&mut self, i: usize) -> bool {
        self.servers[i].proc.as_mut().is_some_and(Proc::running)
    }

    /// Number of routes server `i` reports on `/routez`; None when it does
    /// not answer.
    pub async fn routes(&self, i: usize) -> Option<u64> {
        self.monitor(i, "/routez").await?["num_routes"].as_u64()
    }

    /// Client connections server `i` reports on `/varz`.
    pub async fn clients(&self, i: usize) -> Option<u64> {
        self.monitor(i, "/varz").await?["connections"].as_u64()
    }

    /// A monitoring endpoint's JSON.
    pub async fn monitor(&self, i: usize, path: &str) -> Option<serde_json::Value> {
        let r = probe_client()
            .get(format!("{}{path}", self.monitor_url(i)))
            .send()
            .await
            .ok()?;
        r.json().await.ok()
    }

    /// Waits until server `i` reports `want` routes; panics with the log
    /// tails after [`FORM_DEADLINE`].
    pub async fn wait_routes(&self, i: usize, want: usize) {
        let want = want as u64;
        let r = wait_for(FORM_DEADLINE, Duration::from_millis(50), || async move {
            self.routes(i).await == Some(want)
        })
        .await;
        if r.is_err() {
            panic!(
                "NATS server {} did not reach {want} routes within {FORM_DEADLINE:?} (has {:?})\n{}",
                self.servers[i].name,
                self.routes(i).await,
                self.log_tails(30)
            );
        }
    }

    /// The last `lines` of every server's log, labelled.
    pub fn log_tails(&self, lines: usize) -> String {
        self.servers
            .iter()
            .map(|s| {
                format!(
                    "--- {} ({}) ---\n{}\n",
                    s.name,
                    s.log.display(),
                    log_tail(&s.log, lines)
                )
            })
            .collect()
    }

    /// The directory holding configs and logs.
    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }
}
