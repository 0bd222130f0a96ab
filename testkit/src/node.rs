//! [`GatewayNode`]: one `vendgate serve` process in cluster mode with a
//! generated TOML configuration (its node id, free MQTT and HTTP ports, the
//! shared database and NATS servers, short cluster timings, an operator
//! credential), logging to a file in its directory. The binary's path comes
//! from the caller: only the gateway crate's own tests have
//! `CARGO_BIN_EXE_vendgate`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::process::{log_tail, write_file, Proc, Spec};
use crate::{free_addr, probe_client};

/// Cluster and order timings, short so failures are noticed within seconds
/// in tests (the defaults in `gateway/src/config.rs` are for production).
#[derive(Debug, Clone)]
pub struct Timings {
    pub heartbeat_interval: Duration,
    pub node_dead_after: Duration,
    pub no_responders_retry: Duration,
    pub nats_ping_interval: Duration,
    pub nats_connection_timeout: Duration,
    pub owner_answer_slack: Duration,
    /// `orders.accept_timeout`.
    pub accept_timeout: Duration,
    /// `orders.dispense_timeout`.
    pub dispense_timeout: Duration,
    /// `database.acquire_timeout`: how fast an order fails (50000) with the
    /// database down.
    pub db_acquire_timeout: Duration,
}

impl Default for Timings {
    fn default() -> Self {
        Self {
            heartbeat_interval: Duration::from_millis(250),
            node_dead_after: Duration::from_secs(2),
            no_responders_retry: Duration::from_secs(1),
            nats_ping_interval: Duration::from_millis(500),
            nats_connection_timeout: Duration::from_millis(500),
            owner_answer_slack: Duration::from_secs(1),
            accept_timeout: Duration::from_secs(2),
            dispense_timeout: Duration::from_secs(4),
            db_acquire_timeout: Duration::from_secs(1),
        }
    }
}

/// What a node is started with.
#[derive(Debug, Clone)]
pub struct NodeOptions {
    pub node_id: String,
    /// `postgres://…`
    pub database_url: String,
    pub nats_urls: Vec<String>,
    /// The key that encrypts merchants' AppSecrets for webhook signing:
    /// the same file for every node (and for provisioning).
    pub webhook_key_file: PathBuf,
    /// The dashboard's operator credential (username, password ≥ 12 chars).
    pub operator: (String, String),
    /// `log.level` (RUST_LOG is not passed on).
    pub log_level: String,
    pub timings: Timings,
    /// Extra settings as `VENDGATE_SECTION__KEY` environment variables, e.g.
    /// `("VENDGATE_ORDERS__UNPAID_TIMEOUT", "2s")`.
    pub env: Vec<(String, String)>,
}

/// A `vendgate serve` process; killed on Drop.
pub struct GatewayNode {
    id: String,
    bin: PathBuf,
    dir: PathBuf,
    config: PathBuf,
    log: PathBuf,
    mqtt: SocketAddr,
    http: SocketAddr,
    env: Vec<(String, String)>,
    proc: Option<Proc>,
}

fn secs(d: Duration) -> String {
    format!("{}ms", d.as_millis())
}

impl GatewayNode {
    /// Writes the node's configuration under `parent/{node_id}/` and starts
    /// it (without waiting: see [`GatewayNode::wait_ready`]).
    pub fn start(bin: &Path, parent: &Path, opts: NodeOptions) -> GatewayNode {
        let dir = parent.join(&opts.node_id);
        std::fs::create_dir_all(&dir).expect("node dir");
        let (mqtt, http) = (free_addr(), free_addr());
        let t = &opts.timings;
        let urls: Vec<String> = opts.nats_urls.iter().map(|u| format!("{u:?}")).collect();
        let config = format!(
            "data_dir = {data:?}\n\
             database_url = {db:?}\n\
             [mqtt]\naddr = \"{mqtt}\"\n\
             [http]\naddr = \"{http}\"\nrate_limit = 0\n\
             [orders]\naccept_timeout = \"{accept}\"\ndispense_timeout = \"{dispense}\"\n\
             [notifier]\nkey_file = {key:?}\nallow_private_targets = true\n\
             backoff_base = \"100ms\"\nbackoff_cap = \"1s\"\npoll_interval = \"100ms\"\ntimeout = \"2s\"\n\
             [log]\nlevel = {level:?}\n\
             [operator]\nusername = {ou:?}\npassword = {op:?}\n\
             [database]\nacquire_timeout = \"{acquire}\"\nmax_connections = 10\n\
             [cluster]\nnats_urls = [{urls}]\nnode_id = {id:?}\n\
             heartbeat_interval = \"{hb}\"\nnode_dead_after = \"{dead}\"\n\
             no_responders_retry = \"{nr}\"\nnats_ping_interval = \"{ping}\"\n\
             nats_connection_timeout = \"{ct}\"\nowner_answer_slack = \"{slack}\"\n",
            data = dir.display().to_string(),
            db = opts.database_url,
            accept = secs(t.accept_timeout),
            dispense = secs(t.dispense_timeout),
            key = opts.webhook_key_file.display().to_string(),
            level = opts.log_level,
            ou = opts.operator.0,
            op = opts.operator.1,
            acquire = secs(t.db_acquire_timeout),
            urls = urls.join(", "),
            id = opts.node_id,
            hb = secs(t.heartbeat_interval),
            dead = secs(t.node_dead_after),
            nr = secs(t.no_responders_retry),
            ping = secs(t.nats_ping_interval),
            ct = secs(t.nats_connection_timeout),
            slack = secs(t.owner_answer_slack),
        );
        let config_path = dir.join("vendgate.toml");
        write_file(&config_path, &config);
        let mut node = GatewayNode {
            id: opts.node_id,
            bin: bin.to_path_buf(),
            log: dir.join("vendgate.log"),
            config: config_path,
            dir,
            mqtt,
            http,
            env: opts.env,
            proc: None,
        };
        node.spawn();
        node
    }

    /// A `vendgate` command on this node's configuration, with the test
    /// process's own `VENDGATE_*` variables removed (they would be read as
    /// settings) and this node's extra settings added.
    pub fn command(&self) -> Command {
        let mut cmd = Command::new(&self.bin);
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("VENDGATE_") {
                cmd.env_remove(&k);
            }
        }
        cmd.env_remove("RUST_LOG");
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        cmd.arg("--config").arg(&self.config);
        cmd
    }

    fn spawn(&mut self) {
        let mut cmd = self.command();
        cmd.arg("serve");
        self.proc = Some(Proc::spawn(Spec {
            name: format!("vendgate {}", self.id),
            command: cmd,
            log: self.log.clone(),
            graceful_signal: None,
            // Only if the test process dies without dropping the node (a
            // failing test keeps the directory for its logs).
            cleanup_dir: Some(self.dir.clone()),
        }));
    }

    /// Runs `vendgate --config … {args}` (provisioning) and returns its
    /// stdout; Err with stderr when it fails.
    pub fn cli(&self, args: &[&str]) -> Result<String, String> {
        let out = self
            .command()
            .args(args)
            .output()
            .map_err(|e| format!("cannot run vendgate: {e}"))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(format!(
                "vendgate {args:?} failed ({}): {}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn mqtt_addr(&self) -> SocketAddr {
        self.mqtt
    }

    pub fn http_addr(&self) -> SocketAddr {
        self.http
    }

    /// `http://{http_addr}`.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.http)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn config_path(&self) -> &Path {
        &self.config
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    pub fn pid(&self) -> Option<u32> {
        self.proc.as_ref().map(Proc::pid)
    }

    /// Whether the process runs (a stopped one counts).
    pub fn running(&mut self) -> bool {
        self.proc.as_mut().is_some_and(Proc::running)
    }

    /// `GET /readyz`: Some(true) on 200, Some(false) on another status,
    /// None when nothing answers.
    pub async fn readyz(&self) -> Option<bool> {
        let r = probe_client()
            .get(format!("{}/readyz", self.base_url()))
            .send()
            .await
            .ok()?;
        Some(r.status().is_success())
    }

    /// Waits until `/readyz` answers 200; panics after `limit` (or as soon
    /// as the process has exited) with the log tail.
    pub async fn wait_ready(&mut self, limit: Duration) {
        let t = tokio::time::Instant::now();
        let exited = loop {
            if !self.running() {
                break true;
            }
            if self.readyz().await == Some(true) {
                return;
            }
            if t.elapsed() > limit {
                break false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        {
            panic!(
                "gateway node {} not ready within {limit:?} (exited: {exited})\n--- {} ---\n{}",
                self.id,
                self.log.display(),
                self.log_tail(60)
            );
        }
    }

    /// SIGKILL.
    pub fn kill(&mut self) {
        if let Some(p) = self.proc.as_mut() {
            p.kill();
        }
    }

    /// SIGSTOP: frozen with its sockets open.
    pub fn stop(&mut self) {
        if let Some(p) = self.proc.as_mut() {
            p.stop();
        }
    }

    /// SIGCONT.
    pub fn cont(&mut self) {
        if let Some(p) = self.proc.as_mut() {
            p.cont();
        }
    }

    /// SIGTERM and wait (a clean shutdown), SIGKILL after `grace`.
    pub fn terminate(&mut self, grace: Duration) -> bool {
        match self.proc.as_mut() {
            Some(p) => p.terminate(libc::SIGTERM, grace),
            None => true,
        }
    }

    /// Kills the process if it runs and starts it again on the same
    /// configuration and ports (without waiting for readiness).
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// The last `lines` lines of the node's log.
    pub fn log_tail(&self, lines: usize) -> String {
        log_tail(&self.log, lines)
    }
}
