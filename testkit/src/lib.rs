//! Real-process fixtures for vendgate's cluster tests.
//!
//! # Layout
//!
//! - [`process`]: one guarded child process (own process group, log file,
//!   signals by PID, killed on Drop, a watchdog that kills it when the test
//!   process dies however it dies).
//! - [`nats`]: [`NatsCluster`], n `nats-server`s forming one cluster.
//! - [`haproxy`]: [`Haproxy`] in front of gateway nodes (MQTT sticky on the
//!   client id, HTTP round robin, `/readyz` health checks).
//! - [`pg`]: [`PgServer`], throwaway PostgreSQL servers (one per test
//!   process with a database per test, or a dedicated one to stop and start).
//! - [`node`]: [`GatewayNode`], the `vendgate` binary with a generated
//!   cluster configuration.
//! - [`relay`]: [`Relay`], a switchable TCP relay to move a machine between
//!   nodes without restarting the simulated machine.
//!
//! Every fixture panics with an install hint when the binary it needs is
//! missing (`cargo xtask test` installs them all): the cluster tests never
//! skip silently.

pub mod haproxy;
pub mod nats;
pub mod node;
pub mod pg;
pub mod process;
pub mod relay;

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use haproxy::{Backend, Haproxy};
pub use nats::NatsCluster;
pub use node::{GatewayNode, NodeOptions, Timings};
pub use pg::PgServer;
pub use relay::Relay;

/// What installs the engines the tests need, for the panic messages: the
/// README's test command, or the packages by hand.
pub const INSTALL_HINT: &str = "run `cargo xtask test`, which installs what the test suite needs \
     (as root; otherwise it prints the command), or: apt-get install -y nats-server postgresql haproxy";

/// Panics with "<name> is needed for the cluster tests: apt-get install …"
/// unless `nats-server`, `haproxy` and PostgreSQL 15 are all installed, so a
/// cluster test fails at once and clearly rather than half-way.
pub fn require_cluster_binaries() {
    require_binary("nats-server", &[]);
    require_binary("haproxy", &[]);
    let pg = Path::new("/usr/lib/postgresql/15/bin");
    if !["postgres", "initdb", "pg_ctl", "psql"]
        .iter()
        .all(|b| is_executable(&pg.join(b)))
    {
        panic!("PostgreSQL 15 is needed for the cluster tests: {INSTALL_HINT}");
    }
}

/// A free loopback TCP port for a server a fixture starts.
///
/// Not one the kernel picks for port 0: that comes from the ephemeral range,
/// which is also where every outgoing connection's local port comes from,
/// so between releasing it and the server binding it, some connection (a
/// NATS route dialling, a client) can take it ("address already in use" was
/// seen). Instead a random port below the ephemeral range, checked by
/// binding it, and never handed out twice by this process.
pub fn free_port() -> u16 {
    use std::collections::hash_map::RandomState;
    use std::collections::HashSet;
    use std::hash::BuildHasher;
    use std::sync::Mutex;
    static GIVEN: Mutex<Option<HashSet<u16>>> = Mutex::new(None);
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| {
            s.split_whitespace()
                .next()
                .and_then(|p| p.parse::<u16>().ok())
        })
        .unwrap_or(32768);
    let (low, high) = (10_000u16, ephemeral_low.saturating_sub(1));
    if high > low + 1000 {
        let mut given = GIVEN
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let given = given.get_or_insert_with(HashSet::new);
        let seed = RandomState::new();
        for i in 0u32..10_000 {
            let r = seed.hash_one((std::process::id(), i));
            let port = low + u16::try_from(r % u64::from(high - low)).unwrap_or(0);
            if given.contains(&port) {
                continue;
            }
            if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
                given.insert(port);
                return port;
            }
        }
    }
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// A free loopback address.
pub fn free_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port()))
}

/// The path of `name`, looked up in `PATH` and then in `extra_dirs`;
/// panics with "<name> is needed for the cluster tests: run `cargo xtask
/// test` … apt-get install …" when it is nowhere.
#[track_caller]
pub fn require_binary(name: &str, extra_dirs: &[&str]) -> PathBuf {
    find_binary(name, extra_dirs)
        .unwrap_or_else(|| panic!("{name} is needed for the cluster tests: {INSTALL_HINT}"))
}

/// The path of `name` (a tool some test drives, outside the cluster
/// fixtures); panics naming `cargo xtask test` and the Debian `packages`
/// to install by hand when it is missing, so the test fails rather than
/// skips.
#[track_caller]
pub fn require_tool(name: &str, purpose: &str, packages: &str) -> PathBuf {
    find_binary(name, &[]).unwrap_or_else(|| {
        panic!(
            "{name} is needed for {purpose}: run `cargo xtask test`, which installs what the \
             test suite needs (as root; otherwise it prints the command), or: \
             apt-get install -y {packages}"
        )
    })
}

/// `name` in `PATH`, `extra_dirs` or the sbin directories.
fn find_binary(name: &str, extra_dirs: &[&str]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(extra_dirs.iter().map(PathBuf::from))
        .chain(["/usr/sbin", "/sbin", "/usr/local/sbin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Waits until `cond` holds, re-checking every `every`; Err with the time
/// waited at the deadline.
pub async fn wait_for<F, Fut>(limit: Duration, every: Duration, mut cond: F) -> Result<(), Duration>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let t = tokio::time::Instant::now();
    loop {
        if cond().await {
            return Ok(());
        }
        if t.elapsed() >= limit {
            return Err(t.elapsed());
        }
        tokio::time::sleep(every).await;
    }
}

/// A short-timeout HTTP client for the fixtures' own probes.
pub fn probe_client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .connect_timeout(Duration::from_secs(1))
        .pool_max_idle_per_host(0)
        .build()
        .expect("HTTP client")
}
