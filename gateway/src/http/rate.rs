//! Per-merchant request rate limit (token bucket): a merchant over its rate
//! gets 10003 and nothing else happens; other merchants are unaffected.

use std::sync::Mutex;
use std::time::Instant;

use dashmap::DashMap;

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    last: Instant,
}

#[derive(Debug)]
pub struct RateLimiter {
    per_sec: f64,
    burst: f64,
    buckets: DashMap<String, Mutex<Bucket>>,
}

impl RateLimiter {
    /// `per_sec` = 0 disables the limit.
    pub fn new(per_sec: u32, burst: u32) -> Self {
        Self {
            per_sec: f64::from(per_sec),
            burst: f64::from(burst.max(1)),
            buckets: DashMap::new(),
        }
    }

    /// Take one token for `key`; false when the bucket is empty.
    pub fn allow(&self, key: &str) -> bool {
        if self.per_sec <= 0.0 {
            return true;
        }
        let now = Instant::now();
        let entry = self.buckets.entry(key.to_string()).or_insert_with(|| {
            Mutex::new(Bucket {
                tokens: self.burst,
                last: now,
            })
        });
        let mut b = match entry.lock() {
            Ok(b) => b,
            Err(p) => p.into_inner(),
        };
        let refill = now.duration_since(b.last).as_secs_f64() * self.per_sec;
        b.tokens = (b.tokens + refill).min(self.burst);
        b.last = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_refuse_per_key() {
        let r = RateLimiter::new(1, 3);
        assert!((0..3).all(|_| r.allow("a")));
        assert!(!r.allow("a"));
        assert!(r.allow("b"), "other merchants are unaffected");
        assert!(RateLimiter::new(0, 0).allow("x"), "0 disables");
    }
}
