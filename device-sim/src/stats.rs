//! Latency statistics for the load tools: an HdrHistogram of durations and
//! the percentile summary every report prints (p50/p90/p99/p99.9/max in ms).

use std::time::Duration;

use hdrhistogram::Histogram;
use serde::{Serialize, Serializer};

/// Smallest latency told apart, in the histogram's unit (microseconds).
const LOWEST_US: u64 = 1;
/// Largest latency recorded exactly; anything longer is clamped to it
/// (an hour is far beyond every timeout of the tools).
const HIGHEST_US: u64 = 3_600_000_000;
/// Significant decimal digits kept: values are exact to 0.1 %.
const SIGNIFICANT_DIGITS: u8 = 3;

/// A histogram of latencies with microsecond resolution.
#[derive(Debug, Clone)]
pub struct LatencyHistogram {
    hist: Histogram<u64>,
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        Self::new()
    }
}

impl LatencyHistogram {
    pub fn new() -> Self {
        // Constants that hdrhistogram accepts (low ≥ 1, high ≥ 2 × low,
        // sigfig ≤ 5), checked by every test that builds a histogram.
        let hist = Histogram::new_with_bounds(LOWEST_US, HIGHEST_US, SIGNIFICANT_DIGITS)
            .expect("constant histogram bounds are valid");
        Self { hist }
    }

    /// Records one latency; durations beyond an hour count as an hour.
    pub fn record(&mut self, latency: Duration) {
        let us = u64::try_from(latency.as_micros())
            .unwrap_or(u64::MAX)
            .clamp(LOWEST_US, HIGHEST_US);
        // Within the bounds by the clamp above, so this cannot fail.
        let _ = self.hist.record(us);
    }

    /// Adds every value of `other` (e.g. one worker's histogram).
    pub fn merge(&mut self, other: &LatencyHistogram) {
        // Same bounds on both sides, so nothing can fall out of range.
        let _ = self.hist.add(&other.hist);
    }

    /// How many latencies were recorded.
    pub fn len(&self) -> u64 {
        self.hist.len()
    }

    pub fn is_empty(&self) -> bool {
        self.hist.is_empty()
    }

    /// The latency at quantile `q` (0.0 ..= 1.0) in milliseconds: the
    /// smallest value that `q` of all recorded values are at or below.
    /// 0 when empty.
    pub fn quantile_ms(&self, q: f64) -> f64 {
        if self.hist.is_empty() {
            return 0.0;
        }
        us_to_ms(self.hist.value_at_quantile(q.clamp(0.0, 1.0)))
    }

    /// The largest recorded latency in milliseconds; 0 when empty.
    pub fn max_ms(&self) -> f64 {
        if self.hist.is_empty() {
            return 0.0;
        }
        us_to_ms(self.hist.max())
    }

    /// The arithmetic mean in milliseconds; 0 when empty.
    pub fn mean_ms(&self) -> f64 {
        if self.hist.is_empty() {
            return 0.0;
        }
        self.hist.mean() / 1_000.0
    }

    /// The percentiles every report shows.
    pub fn summary(&self) -> LatencySummary {
        LatencySummary {
            count: self.len(),
            mean_ms: self.mean_ms(),
            p50_ms: self.quantile_ms(0.50),
            p90_ms: self.quantile_ms(0.90),
            p99_ms: self.quantile_ms(0.99),
            p999_ms: self.quantile_ms(0.999),
            max_ms: self.max_ms(),
        }
    }
}

fn us_to_ms(us: u64) -> f64 {
    // Latencies stay far below 2^53 µs, so the conversion is exact.
    us as f64 / 1_000.0
}

/// Percentiles of one histogram, in milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct LatencySummary {
    pub count: u64,
    pub mean_ms: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
}

impl std::fmt::Display for LatencySummary {
    /// `p50=0.31ms p90=0.52ms p99=1.20ms p99.9=3.10ms max=4.00ms`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "p50={:.2}ms p90={:.2}ms p99={:.2}ms p99.9={:.2}ms max={:.2}ms",
            self.p50_ms, self.p90_ms, self.p99_ms, self.p999_ms, self.max_ms
        )
    }
}

/// Events per second; 0 for an empty interval.
pub fn rate(events: u64, elapsed: Duration) -> f64 {
    let secs = elapsed.as_secs_f64();
    if secs > 0.0 {
        events as f64 / secs
    } else {
        0.0
    }
}

/// Serializes a duration as fractional seconds (for `elapsed_s` fields).
pub fn serialize_secs<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// Within the histogram's 0.1 % precision (plus one microsecond).
    fn assert_near(actual: f64, expected: f64) {
        let tolerance = expected * 0.001 + 0.001;
        assert!(
            (actual - expected).abs() <= tolerance,
            "{actual} is not within {tolerance} of {expected}"
        );
    }

    #[test]
    fn percentiles_of_one_to_a_hundred_ms() {
        let mut h = LatencyHistogram::new();
        for n in 1..=100 {
            h.record(ms(n));
        }
        let s = h.summary();
        assert_eq!(s.count, 100);
        assert_near(s.p50_ms, 50.0);
        assert_near(s.p90_ms, 90.0);
        assert_near(s.p99_ms, 99.0);
        assert_near(s.p999_ms, 100.0);
        assert_near(s.max_ms, 100.0);
        assert_near(s.mean_ms, 50.5);
    }

    #[test]
    fn percentiles_of_a_skewed_distribution() {
        // 990 fast answers and 10 slow ones: p99 is still fast, p99.9 slow.
        let mut h = LatencyHistogram::new();
        for _ in 0..990 {
            h.record(Duration::from_micros(500));
        }
        for _ in 0..10 {
            h.record(ms(200));
        }
        let s = h.summary();
        assert_near(s.p50_ms, 0.5);
        assert_near(s.p99_ms, 0.5);
        assert_near(s.p999_ms, 200.0);
        assert_near(s.max_ms, 200.0);
    }

    #[test]
    fn merge_adds_counts() {
        let mut a = LatencyHistogram::new();
        let mut b = LatencyHistogram::new();
        for n in 1..=50 {
            a.record(ms(n));
        }
        for n in 51..=100 {
            b.record(ms(n));
        }
        a.merge(&b);
        assert_eq!(a.len(), 100);
        assert_near(a.quantile_ms(0.5), 50.0);
        assert_near(a.max_ms(), 100.0);
    }

    #[test]
    fn empty_and_extreme_values() {
        let mut h = LatencyHistogram::new();
        assert!(h.is_empty());
        assert_eq!(h.summary(), LatencySummary::default());
        // Sub-microsecond and absurdly long latencies are clamped, not lost.
        h.record(Duration::ZERO);
        h.record(Duration::from_secs(10 * 3600));
        assert_eq!(h.len(), 2);
        assert_near(h.quantile_ms(0.0), 0.001);
        assert_near(h.max_ms(), 3_600_000.0);
    }

    #[test]
    fn rate_handles_zero_time() {
        assert_eq!(rate(10, Duration::ZERO), 0.0);
        assert_near(rate(500, ms(250)), 2000.0);
    }
}
