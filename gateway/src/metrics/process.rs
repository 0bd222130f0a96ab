//! Process basics read from `/proc/self` at scrape time (Linux): resident
//! memory, CPU seconds, open file descriptors and start time, under the
//! conventional `process_*` names so stock Grafana panels work. Elsewhere the
//! values are simply absent.

use std::fmt::Write as _;

/// Linux reports CPU times in clock ticks of `USER_HZ`, which is 100 on every
/// architecture the kernel exposes to user space (it is ABI, not `HZ`); using
/// the constant avoids a libc dependency for `sysconf(_SC_CLK_TCK)`.
const TICKS_PER_SECOND: f64 = 100.0;

/// One reading; `None` where the platform or `/proc` did not tell.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ProcessStats {
    pub resident_bytes: Option<u64>,
    pub cpu_seconds: Option<f64>,
    pub open_fds: Option<u64>,
    pub start_time_unix: Option<f64>,
}

impl ProcessStats {
    pub fn read() -> Self {
        let stat = std::fs::read_to_string("/proc/self/stat").ok();
        let fields = stat.as_deref().and_then(stat_fields);
        let cpu_seconds = fields.as_ref().and_then(|f| {
            // Fields after "(comm) ": state is index 0, utime 11, stime 12.
            let utime: u64 = f.get(11)?.parse().ok()?;
            let stime: u64 = f.get(12)?.parse().ok()?;
            Some((utime + stime) as f64 / TICKS_PER_SECOND)
        });
        let start_time_unix = fields.as_ref().and_then(|f| {
            let ticks: u64 = f.get(19)?.parse().ok()?;
            let btime = boot_time()?;
            Some(btime as f64 + ticks as f64 / TICKS_PER_SECOND)
        });
        let resident_bytes = std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| vm_rss_bytes(&s));
        let open_fds = std::fs::read_dir("/proc/self/fd")
            .ok()
            .map(|d| d.count() as u64);
        Self {
            resident_bytes,
            cpu_seconds,
            open_fds,
            start_time_unix,
        }
    }

    /// The exposition lines of the values that are present.
    pub fn render(&self, out: &mut String) {
        fn emit(out: &mut String, name: &str, kind: &str, help: &str, v: Option<f64>) {
            if let Some(v) = v {
                let _ = writeln!(
                    out,
                    "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}"
                );
            }
        }
        emit(
            out,
            "process_resident_memory_bytes",
            "gauge",
            "Resident memory size in bytes.",
            self.resident_bytes.map(|b| b as f64),
        );
        emit(
            out,
            "process_cpu_seconds_total",
            "counter",
            "Total user and system CPU time spent in seconds.",
            self.cpu_seconds,
        );
        emit(
            out,
            "process_open_fds",
            "gauge",
            "Number of open file descriptors.",
            self.open_fds.map(|n| n as f64),
        );
        emit(
            out,
            "process_start_time_seconds",
            "gauge",
            "Start time of the process since unix epoch in seconds.",
            self.start_time_unix,
        );
    }
}

/// The whitespace-separated fields after the `(comm)` of `/proc/self/stat`.
/// The command name may contain spaces and parentheses, so split at the last
/// `)`.
fn stat_fields(stat: &str) -> Option<Vec<&str>> {
    let (_, rest) = stat.rsplit_once(')')?;
    Some(rest.split_whitespace().collect())
}

fn vm_rss_bytes(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

fn boot_time() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/stat").ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("btime "))
        .and_then(|v| v.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_formats() {
        let stat =
            "42 (my (odd) name) S 1 42 42 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 4 0 1000 0 0";
        let f = stat_fields(stat).unwrap();
        assert_eq!(f[0], "S");
        assert_eq!(f[11], "250");
        assert_eq!(f[12], "50");
        assert_eq!(f[19], "1000");
        assert_eq!(
            vm_rss_bytes("Name:\tx\nVmRSS:\t  1234 kB\n"),
            Some(1234 * 1024)
        );
        assert_eq!(vm_rss_bytes("Name:\tx\n"), None);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn reads_this_process() {
        let p = ProcessStats::read();
        assert!(p.resident_bytes.unwrap() > 0);
        assert!(p.open_fds.unwrap() > 0);
        assert!(p.start_time_unix.unwrap() > 1_500_000_000.0);
        let mut out = String::new();
        p.render(&mut out);
        assert!(out.contains("# TYPE process_cpu_seconds_total counter"));
    }
}
