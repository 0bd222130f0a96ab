//! A throwaway PostgreSQL 15 for tests: one server per test process
//! ([`PgServer::shared`]) with a fresh database per test
//! ([`PgServer::create_database`]), or a dedicated server a test may stop and
//! start ([`PgServer::dedicated`]). With `VENDGATE_TEST_PG_URL` set, the
//! shared server is that one instead (databases are created on it and left
//! there).
//!
//! A spawned server is stopped and its directory removed when the test
//! process exits, however it exits (a panic, a failed assertion, SIGKILL): a
//! watchdog shell, started first, holds the read end of a pipe whose write
//! end only this process has; when the process is gone the read sees EOF and
//! the watchdog runs `pg_ctl stop -m immediate` and `rm -rf`.
//!
//! (Moved here from the e2e crate's harness, which re-exports it, so the
//! cluster tests of the gateway crate share it.)

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

/// Where Debian's `postgresql-15` puts the server binaries.
const BIN: &str = "/usr/lib/postgresql/15/bin";
const MISSING: &str = "PostgreSQL 15 is needed for this test: run `cargo xtask test`, which \
                       installs what the test suite needs (as root; otherwise it prints the \
                       command), or: apt-get install -y postgresql";
/// Set to `postgres://…` to use that server instead of spawning one.
pub const URL_ENV: &str = "VENDGATE_TEST_PG_URL";

/// Servers spawned by this process (their directories' names).
static SPAWNED: AtomicU64 = AtomicU64::new(0);

/// A PostgreSQL server for tests.
pub struct PgServer {
    target: Target,
    /// Databases created so far (their names).
    next_db: AtomicU64,
}

enum Target {
    /// `VENDGATE_TEST_PG_URL`: someone else's server.
    External {
        url: String,
    },
    Spawned(Spawned),
}

struct Spawned {
    /// `data/` (the cluster) and `run/` (socket, log), owned by postgres.
    dir: PathBuf,
    port: u16,
    /// Running as root: the binaries run as `postgres` (initdb refuses root).
    as_postgres: bool,
    /// Whether this is the per-process shared server (never stopped by a test).
    shared: bool,
    /// The watchdog, whose stdin is the pipe (see the module docs).
    watchdog: Mutex<Option<Child>>,
}

impl PgServer {
    /// The server of this test process, started on first use (about a
    /// second; blocking: from async code prefer [`PgServer::shared_async`]).
    /// Safe to call from many tests at once.
    pub fn shared() -> &'static PgServer {
        static SHARED: OnceLock<PgServer> = OnceLock::new();
        SHARED.get_or_init(|| match std::env::var(URL_ENV) {
            Ok(url) if !url.is_empty() => PgServer {
                target: Target::External { url },
                next_db: AtomicU64::new(0),
            },
            _ => PgServer::spawn(true),
        })
    }

    /// [`PgServer::shared`] without blocking the caller's runtime thread.
    pub async fn shared_async() -> &'static PgServer {
        blocking(PgServer::shared).await
    }

    /// A server of its own (always spawned, even with `VENDGATE_TEST_PG_URL`
    /// set), for tests that stop and start PostgreSQL; stopped and removed
    /// on drop.
    pub async fn dedicated() -> PgServer {
        blocking(|| PgServer::spawn(false)).await
    }

    /// A new, empty database on this server; returns its URL.
    pub async fn create_database(&self) -> String {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        // Unique on a server shared by several test processes (and hosts).
        let name = format!(
            "vg_{}_{nanos}_{}",
            std::process::id(),
            self.next_db.fetch_add(1, Ordering::Relaxed)
        );
        let admin = self.url_of(None);
        let out = tokio::process::Command::new(bin("psql"))
            .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", &admin, "-c"])
            .arg(format!("CREATE DATABASE {name}"))
            .env("PGCONNECT_TIMEOUT", "10")
            .output()
            .await
            .unwrap_or_else(|e| panic!("{MISSING} (running psql: {e})"));
        check(&out, "CREATE DATABASE");
        self.url_of(Some(&name))
    }

    /// The URL of database `db` (None: the server's own, for admin work).
    pub fn url_of(&self, db: Option<&str>) -> String {
        match &self.target {
            Target::External { url } => match db {
                Some(db) => with_database(url, db),
                None => url.clone(),
            },
            Target::Spawned(s) => format!(
                "postgres://postgres@127.0.0.1:{}/{}",
                s.port,
                db.unwrap_or("postgres")
            ),
        }
    }

    /// Stop a dedicated server (fast shutdown: connections are closed).
    pub async fn stop(&self) {
        let s = self.own("stop");
        let data = s.dir.join("data");
        let out = s
            .pg_ctl_async(&[
                "-D",
                path_str(&data),
                "-m",
                "fast",
                "-w",
                "-t",
                "30",
                "stop",
            ])
            .await;
        check(&out, "pg_ctl stop");
    }

    /// Start a dedicated server again, on the same port.
    pub async fn start(&self) {
        let s = self.own("start");
        let out = s.pg_ctl_async(&s.start_args(s.port)).await;
        check(&out, "pg_ctl start");
    }

    /// The server's log file (None for an external server).
    pub fn log_path(&self) -> Option<PathBuf> {
        match &self.target {
            Target::Spawned(s) => Some(s.dir.join("run/pg.log")),
            Target::External { .. } => None,
        }
    }

    /// The last `lines` lines of the server's log (empty for an external
    /// server).
    pub fn log_tail(&self, lines: usize) -> String {
        self.log_path()
            .map(|p| crate::process::log_tail(&p, lines))
            .unwrap_or_default()
    }

    fn own(&self, what: &str) -> &Spawned {
        match &self.target {
            Target::Spawned(s) if !s.shared => s,
            _ => panic!("PgServer::{what} is for a dedicated server (PgServer::dedicated)"),
        }
    }

    /// initdb and start in a fresh directory, with the watchdog.
    fn spawn(shared: bool) -> PgServer {
        for b in ["initdb", "pg_ctl", "postgres", "psql"] {
            assert!(bin(b).exists(), "{MISSING}");
        }
        let as_postgres = fs::metadata("/proc/self")
            .map(|m| m.uid() == 0)
            .unwrap_or(false);
        let dir = std::env::temp_dir().join(format!(
            "vendgate-pg-{}-{}",
            std::process::id(),
            SPAWNED.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("run")).expect("creating the PostgreSQL temp dir");
        let s = Spawned {
            watchdog: Mutex::new(Some(watchdog(&dir, as_postgres))),
            dir,
            port: 0,
            as_postgres,
            shared,
        };
        if as_postgres {
            let out = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(&s.dir)
                .output()
                .expect("chown");
            check(&out, "chown to postgres");
        }
        let data = s.dir.join("data");
        let out = s.run(
            &bin("initdb"),
            &[
                "-D",
                path_str(&data),
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--locale=C.UTF-8",
            ],
        );
        check(&out, "initdb");
        // A free port can be taken by someone else between our probe and
        // the server's bind: try a few.
        let mut last = None;
        for _ in 0..5 {
            let port = crate::free_port();
            let out = s.run(&bin("pg_ctl"), &s.start_args(port));
            if out.status.success() {
                return PgServer {
                    target: Target::Spawned(Spawned { port, ..s }),
                    next_db: AtomicU64::new(0),
                };
            }
            last = Some(out);
        }
        let log = fs::read_to_string(s.dir.join("run/pg.log")).unwrap_or_default();
        panic!(
            "PostgreSQL did not start: {:?}\n{log}",
            last.map(|o| String::from_utf8_lossy(&o.stderr).into_owned())
        );
    }
}

impl Spawned {
    fn start_args(&self, port: u16) -> Vec<String> {
        let run = self.dir.join("run");
        vec![
            "-D".into(),
            path_str(&self.dir.join("data")).into(),
            "-l".into(),
            path_str(&run.join("pg.log")).into(),
            "-w".into(),
            "-t".into(),
            "30".into(),
            "-o".into(),
            // Many tests at once, each with a gateway pool: more than the
            // default 100 connections.
            format!(
                "-c listen_addresses=127.0.0.1 -p {port} -k {} -c fsync=on -c max_connections=400",
                path_str(&run)
            ),
            "start".into(),
        ]
    }

    fn run<S: AsRef<std::ffi::OsStr>>(&self, program: &Path, args: &[S]) -> Output {
        run_pg(program, args, &self.dir, self.as_postgres)
    }

    async fn pg_ctl_async(&self, args: &[impl ToString]) -> Output {
        let (dir, as_postgres) = (self.dir.clone(), self.as_postgres);
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        blocking(move || run_pg(&bin("pg_ctl"), &args, &dir, as_postgres)).await
    }
}

/// Run a PostgreSQL binary in `dir`, as postgres when we are root.
fn run_pg<S: AsRef<std::ffi::OsStr>>(
    program: &Path,
    args: &[S],
    dir: &Path,
    as_postgres: bool,
) -> Output {
    let mut c = if as_postgres {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    };
    // pg_ctl sends the server's output to the log (-l), so no child of the
    // server holds these pipes open after pg_ctl returns.
    c.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("{MISSING} (running {}: {e})", program.display()))
}

impl Drop for PgServer {
    fn drop(&mut self) {
        if let Target::Spawned(s) = &self.target {
            let child = s.watchdog.lock().ok().and_then(|mut w| w.take());
            if let Some(mut child) = child {
                // EOF on its stdin: it stops the server and removes the
                // directory; wait for that, so nothing is left behind.
                drop(child.stdin.take());
                let _ = child.wait();
            }
        }
    }
}

/// The watchdog: blocks reading a pipe from this process, then cleans up.
/// In a process group of its own, so a Ctrl-C to the test run does not kill
/// it before it has cleaned up.
fn watchdog(dir: &Path, as_postgres: bool) -> Child {
    let as_user = if as_postgres {
        "runuser -u postgres -- "
    } else {
        ""
    };
    let script = format!(
        "cat >/dev/null; \
         if [ -f \"$1/data/postmaster.pid\" ]; then \
           {as_user}\"$2\" -D \"$1/data\" -m immediate -w -t 30 stop >/dev/null 2>&1; \
         fi; rm -rf \"$1\""
    );
    Command::new("sh")
        .arg("-c")
        .arg(script)
        .arg("vendgate-pg-watchdog")
        .arg(dir)
        .arg(bin("pg_ctl"))
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .expect("starting the PostgreSQL watchdog")
}

/// The URL of this gateway data directory's database: created on the shared
/// server on first use and remembered in the directory, so a gateway
/// restarted on the same directory finds its data again.
pub async fn database_for_dir(dir: &Path) -> String {
    let file = dir.join("postgres-url");
    if let Ok(url) = tokio::fs::read_to_string(&file).await {
        return url.trim().to_string();
    }
    let url = PgServer::shared_async().await.create_database().await;
    tokio::fs::write(&file, &url)
        .await
        .expect("remembering the test database");
    url
}

/// Run `f` off the runtime's threads; its panic (say, the message that
/// PostgreSQL is missing) becomes the caller's.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    match tokio::task::spawn_blocking(f).await {
        Ok(v) => v,
        Err(e) => match e.try_into_panic() {
            Ok(panic) => std::panic::resume_unwind(panic),
            Err(e) => panic!("PostgreSQL set-up task failed: {e}"),
        },
    }
}

fn bin(name: &str) -> PathBuf {
    Path::new(BIN).join(name)
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("temp paths are UTF-8")
}

fn check(out: &Output, what: &str) {
    assert!(
        out.status.success(),
        "{what} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `url` with its database replaced by `db` (query parameters kept).
fn with_database(url: &str, db: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let authority = base.find("://").map_or(0, |i| i + 3);
    let path = base[authority..]
        .find('/')
        .map_or(base.len(), |i| authority + i);
    let mut out = format!("{}/{db}", &base[..path]);
    if let Some(q) = query {
        out.push('?');
        out.push_str(q);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::with_database;

    #[test]
    fn database_replaced_in_urls() {
        assert_eq!(
            with_database("postgres://u:p@h:5432/base?sslmode=disable", "x"),
            "postgres://u:p@h:5432/x?sslmode=disable"
        );
        assert_eq!(with_database("postgres://h", "x"), "postgres://h/x");
        assert_eq!(
            with_database("postgresql://h:1/", "x"),
            "postgresql://h:1/x"
        );
    }
}
