//! [`PgServer`]: throwaway PostgreSQL 15 servers for tests. One server per
//! test process ([`PgServer::shared`]) on which each test creates a fresh
//! database, or a dedicated one ([`PgServer::start`]) that a test may stop
//! and start again (a database outage).
//!
//! The server runs `postgres` directly (not `pg_ctl`), so it is our child
//! and its whole process group goes with the fixture or its watchdog. As
//! root it runs as the `postgres` user; the data directory belongs to that
//! user. fsync is off: these databases are thrown away.

use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::process::{log_tail, Proc, Spec};
use crate::{free_port, require_binary, INSTALL_HINT};

/// Where Debian puts the server binaries.
const PG_BIN_DIRS: &[&str] = &[
    "/usr/lib/postgresql/15/bin",
    "/usr/lib/postgresql/16/bin",
    "/usr/lib/postgresql/17/bin",
];
/// initdb plus the first start, and a restart.
const START_DEADLINE: Duration = Duration::from_secs(30);

/// A PostgreSQL server for tests.
pub struct PgServer {
    port: u16,
    bin: PathBuf,
    isready: PathBuf,
    createdb: PathBuf,
    data: PathBuf,
    run: PathBuf,
    log: PathBuf,
    user: Option<(u32, u32)>,
    proc: Mutex<Option<Proc>>,
    /// Set for the process-wide server, whose Drop never runs: its watchdog
    /// removes the directory instead.
    keep_dir_for_watchdog: bool,
    dir: Mutex<Option<tempfile::TempDir>>,
}

static SHARED: OnceLock<PgServer> = OnceLock::new();
static NEXT_DB: AtomicU64 = AtomicU64::new(1);

impl PgServer {
    /// The server shared by every test of this process (started on first
    /// use; its watchdog stops it when the process exits).
    pub fn shared() -> &'static PgServer {
        SHARED.get_or_init(|| PgServer::launch(true))
    }

    /// A dedicated server for one test, stopped on Drop.
    pub fn start() -> PgServer {
        PgServer::launch(false)
    }

    fn launch(process_wide: bool) -> PgServer {
        let bin_dir = PG_BIN_DIRS
            .iter()
            .map(PathBuf::from)
            .find(|d| d.join("postgres").exists())
            .unwrap_or_else(|| {
                panic!("PostgreSQL is needed for the cluster tests: {INSTALL_HINT}")
            });
        let initdb = require_binary("initdb", &[&bin_dir.display().to_string()]);
        let dir = tempfile::Builder::new()
            .prefix("vg-pg-")
            .tempdir()
            .expect("temp dir");
        let (data, run) = (dir.path().join("data"), dir.path().join("run"));
        std::fs::create_dir_all(&run).expect("socket dir");
        let user = postgres_user();
        if let Some((uid, gid)) = user {
            // initdb creates `data` itself; the parent and the socket dir
            // must belong to the server's user.
            chown(dir.path(), uid, gid);
            chown(&run, uid, gid);
        }
        let mut cmd = Command::new(&initdb);
        cmd.arg("-D").arg(&data).args([
            "-U",
            "postgres",
            "--auth=trust",
            "-E",
            "UTF8",
            "--locale=C.UTF-8",
            "--no-sync",
        ]);
        as_user(&mut cmd, user);
        let out = cmd
            .output()
            .unwrap_or_else(|e| panic!("cannot run initdb: {e}"));
        assert!(
            out.status.success(),
            "initdb failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let s = PgServer {
            port: free_port(),
            bin: bin_dir.join("postgres"),
            isready: require_binary("pg_isready", PG_BIN_DIRS),
            createdb: require_binary("createdb", PG_BIN_DIRS),
            log: run.join("postgres.log"),
            data,
            run,
            user,
            proc: Mutex::new(None),
            keep_dir_for_watchdog: process_wide,
            dir: Mutex::new(Some(dir)),
        };
        s.start_again();
        s
    }

    /// The port it listens on (127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `postgres://postgres@127.0.0.1:{port}/{db}`.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// Creates a fresh, empty database and returns its URL.
    pub fn create_database(&self) -> String {
        let name = format!(
            "vg_{}_{}",
            std::process::id(),
            NEXT_DB.fetch_add(1, Ordering::Relaxed)
        );
        let out = Command::new(&self.createdb)
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
                &name,
            ])
            .output()
            .unwrap_or_else(|e| panic!("cannot run createdb: {e}"));
        assert!(
            out.status.success(),
            "createdb {name} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        self.url(&name)
    }

    /// Stops the server (fast shutdown: connections are closed, nothing is
    /// lost) and waits for it to exit.
    pub fn stop(&self) {
        if let Some(mut p) = self.lock().take() {
            p.terminate(libc::SIGINT, Duration::from_secs(10));
        }
    }

    /// SIGKILL the server (a crash; it recovers on the next start).
    pub fn kill(&self) {
        if let Some(mut p) = self.lock().take() {
            p.kill();
        }
    }

    /// Starts the server (again) on the same port and data, and waits until
    /// it accepts connections.
    pub fn start_again(&self) {
        let mut guard = self.lock();
        if guard.as_mut().is_some_and(Proc::running) {
            return;
        }
        let mut cmd = Command::new(&self.bin);
        cmd.arg("-D").arg(&self.data).args([
            "-c",
            "listen_addresses=127.0.0.1",
            "-p",
            &self.port.to_string(),
            "-k",
            &self.run.display().to_string(),
            "-c",
            "fsync=off",
            "-c",
            "synchronous_commit=off",
            "-c",
            "full_page_writes=off",
            "-c",
            "max_connections=400",
        ]);
        as_user(&mut cmd, self.user);
        let cleanup = self
            .keep_dir_for_watchdog
            .then(|| {
                self.dir
                    .lock()
                    .ok()
                    .and_then(|d| d.as_ref().map(|d| d.path().to_path_buf()))
            })
            .flatten();
        *guard = Some(Proc::spawn(Spec {
            name: format!("postgres :{}", self.port),
            command: cmd,
            log: self.log.clone(),
            graceful_signal: Some(libc::SIGINT),
            cleanup_dir: cleanup,
        }));
        drop(guard);
        let t = Instant::now();
        while !self.accepting() {
            let alive = self.lock().as_mut().is_some_and(Proc::running);
            if !alive || t.elapsed() > START_DEADLINE {
                panic!(
                    "PostgreSQL on port {} did not start (running: {alive}):\n{}",
                    self.port,
                    log_tail(&self.log, 30)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Whether the server accepts connections now (`pg_isready`).
    pub fn accepting(&self) -> bool {
        Command::new(&self.isready)
            .args([
                "-q",
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-t",
                "1",
            ])
            .status()
            .is_ok_and(|s| s.success())
    }

    pub fn log_tail(&self, lines: usize) -> String {
        log_tail(&self.log, lines)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Proc>> {
        self.proc
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        self.stop();
        if let Ok(mut d) = self.dir.lock() {
            d.take();
        }
    }
}

/// (uid, gid) of the `postgres` user when we are root (PostgreSQL refuses
/// to run as root); None otherwise (run as ourselves).
fn postgres_user() -> Option<(u32, u32)> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return None;
    }
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    let line = passwd
        .lines()
        .find(|l| l.starts_with("postgres:"))
        .unwrap_or_else(|| panic!("no postgres user (root cannot run PostgreSQL): {INSTALL_HINT}"));
    let f: Vec<&str> = line.split(':').collect();
    let uid = f.get(2).and_then(|v| v.parse().ok()).expect("postgres uid");
    let gid = f.get(3).and_then(|v| v.parse().ok()).expect("postgres gid");
    Some((uid, gid))
}

fn as_user(cmd: &mut Command, user: Option<(u32, u32)>) {
    use std::os::unix::process::CommandExt;
    if let Some((uid, gid)) = user {
        cmd.uid(uid).gid(gid);
        // The home of root is not readable by postgres; run from /.
        cmd.current_dir("/");
    }
}

fn chown(path: &std::path::Path, uid: u32, gid: u32) {
    std::os::unix::fs::chown(path, Some(uid), Some(gid))
        .unwrap_or_else(|e| panic!("chown {}: {e}", path.display()));
}
