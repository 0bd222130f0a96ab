//! One child process of a fixture: spawned in its own process group with its
//! output in a log file, signalled by PID (never by name), killed on Drop,
//! and guarded by a watchdog so that nothing survives the test process, even
//! when it aborts or is SIGKILLed.
//!
//! The watchdog is a tiny `sh` per child whose stdin is a pipe held only by
//! the test process. When the test process ends in any way the kernel closes
//! that pipe, `read` returns, and the watchdog kills the child's whole
//! process group (after an optional graceful signal, for PostgreSQL) and
//! removes the child's directory if it was given one. It ignores SIGINT,
//! SIGTERM and SIGHUP, so a Ctrl-C on `cargo test` does not take it down
//! before it has done its job.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

/// The watchdog script: `$1` child PID (= its process group id), `$2` a
/// graceful signal to try first (or empty), `$3` a directory to remove
/// afterwards (or empty).
const WATCHDOG: &str = r#"trap '' INT TERM HUP
read _ignored
if [ -n "$2" ]; then
  kill "-$2" "$1" 2>/dev/null
  i=0
  while [ $i -lt 50 ] && kill -0 "$1" 2>/dev/null; do sleep 0.1; i=$((i+1)); done
fi
kill -9 -- "-$1" 2>/dev/null
kill -9 "$1" 2>/dev/null
if [ -n "$3" ]; then sleep 0.2; rm -rf -- "$3"; fi
"#;

/// How to start a guarded process.
pub struct Spec {
    /// For messages ("nats n2", "gateway gw1").
    pub name: String,
    pub command: Command,
    /// stdout and stderr go here (appended, so restarts keep history).
    pub log: PathBuf,
    /// A signal the watchdog sends first, waiting up to 5 s for the process
    /// to exit before SIGKILL (PostgreSQL: SIGINT, a fast shutdown that
    /// releases its shared memory).
    pub graceful_signal: Option<libc::c_int>,
    /// A directory the watchdog removes once the process is dead (for
    /// fixtures whose own Drop may never run, such as a process-wide
    /// server).
    pub cleanup_dir: Option<PathBuf>,
}

/// A running (or exited) guarded child.
pub struct Proc {
    name: String,
    child: Child,
    watchdog: Option<(Child, ChildStdin)>,
    log: PathBuf,
    graceful_signal: Option<libc::c_int>,
    exited: bool,
}

impl Proc {
    /// Spawns `spec.command` in a new process group, output appended to
    /// `spec.log`, plus its watchdog. Panics (naming the process) if either
    /// cannot start.
    pub fn spawn(spec: Spec) -> Proc {
        use std::os::unix::process::CommandExt;
        let Spec {
            name,
            mut command,
            log,
            graceful_signal,
            cleanup_dir,
        } = spec;
        let out = File::options()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap_or_else(|e| panic!("{name}: cannot open log {}: {e}", log.display()));
        let err = out
            .try_clone()
            .unwrap_or_else(|e| panic!("{name}: cannot open log {}: {e}", log.display()));
        command
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .process_group(0);
        let child = command
            .spawn()
            .unwrap_or_else(|e| panic!("{name}: cannot start {:?}: {e}", command.get_program()));
        let pid = child.id();
        let mut watchdog = Command::new("/bin/sh");
        watchdog
            .arg("-c")
            .arg(WATCHDOG)
            .arg("vendgate-testkit-watchdog")
            .arg(pid.to_string())
            .arg(graceful_signal.map(|s| s.to_string()).unwrap_or_default())
            .arg(
                cleanup_dir
                    .as_deref()
                    .map(|d| d.display().to_string())
                    .unwrap_or_default(),
            )
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0);
        let watchdog = match watchdog.spawn() {
            Ok(mut w) => {
                let stdin = w.stdin.take().expect("piped stdin was requested");
                (w, stdin)
            }
            Err(e) => {
                signal_group(pid, libc::SIGKILL);
                panic!("{name}: cannot start its watchdog: {e}");
            }
        };
        Proc {
            name,
            child,
            watchdog: Some(watchdog),
            log,
            graceful_signal,
            exited: false,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Whether the process is still running (a stopped process counts).
    pub fn running(&mut self) -> bool {
        if self.exited {
            return false;
        }
        match self.child.try_wait() {
            Ok(None) => true,
            _ => {
                self.exited = true;
                false
            }
        }
    }

    /// Sends `sig` to the process group (the child and anything it forked).
    pub fn signal(&mut self, sig: libc::c_int) {
        if self.running() {
            signal_group(self.pid(), sig);
        }
    }

    /// SIGSTOP: frozen, sockets open.
    pub fn stop(&mut self) {
        self.signal(libc::SIGSTOP);
    }

    /// SIGCONT after [`Proc::stop`].
    pub fn cont(&mut self) {
        self.signal(libc::SIGCONT);
    }

    /// SIGKILL the group and reap the child.
    pub fn kill(&mut self) {
        if self.running() {
            signal_group(self.pid(), libc::SIGKILL);
        }
        self.reap();
    }

    /// The graceful signal (or SIGTERM), then wait up to `grace` for the
    /// exit, then SIGKILL. Returns true if it exited by itself.
    pub fn terminate(&mut self, sig: libc::c_int, grace: Duration) -> bool {
        if !self.running() {
            self.reap();
            return true;
        }
        signal_group(self.pid(), libc::SIGCONT);
        signal_group(self.pid(), sig);
        let t = Instant::now();
        while t.elapsed() < grace {
            if !self.running() {
                self.reap();
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill();
        false
    }

    /// Waits for the child and retires the watchdog (killed first, so it
    /// cannot signal a PID that may be reused).
    fn reap(&mut self) {
        let _ = self.child.wait();
        self.exited = true;
        if let Some((mut w, stdin)) = self.watchdog.take() {
            let _ = w.kill();
            let _ = w.wait();
            drop(stdin);
        }
    }

    /// The last `lines` lines of the log.
    pub fn log_tail(&self, lines: usize) -> String {
        log_tail(&self.log, lines)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        match self.graceful_signal {
            Some(sig) => {
                self.terminate(sig, Duration::from_secs(5));
            }
            None => self.kill(),
        }
    }
}

fn signal_group(pid: u32, sig: libc::c_int) {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return;
    };
    // SAFETY: kill(2) only sends a signal; the ids are our own child's, whose
    // group we created with process_group(0) (group id = its PID). The child
    // is not reaped yet, so the PID cannot have been reused.
    unsafe {
        libc::kill(-pid, sig);
        libc::kill(pid, sig);
    }
}

/// The last `lines` lines of a file (empty when it cannot be read).
pub fn log_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read(path).unwrap_or_default();
    let text = String::from_utf8_lossy(&text);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Writes `text` to `path`, panicking with the path on failure.
pub fn write_file(path: &Path, text: &str) {
    let mut f =
        File::create(path).unwrap_or_else(|e| panic!("cannot create {}: {e}", path.display()));
    f.write_all(text.as_bytes())
        .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
}
