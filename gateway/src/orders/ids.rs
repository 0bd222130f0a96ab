//! Order ids: positive, unique across restarts, never reused, and not a
//! sequence another merchant can walk.
//!
//! Scheme: `(milliseconds since 2025-01-01) << 12 | 12 random bits`, made
//! strictly increasing within the process. That stays below 2^53 until about
//! 2094, so JavaScript clients read ids exactly; uniqueness across processes
//! and clock steps is enforced by the database's primary key (a collision is
//! retried with a fresh id).

use std::sync::Mutex;

use rand::Rng;

/// 2025-01-01T00:00:00Z in unix milliseconds.
const EPOCH_MS: i64 = 1_735_689_600_000;
const RANDOM_BITS: u32 = 12;

#[derive(Debug, Default)]
pub struct OrderIds {
    last: Mutex<u64>,
}

impl OrderIds {
    pub fn next(&self) -> u64 {
        let now = chrono::Utc::now().timestamp_millis();
        let ms = u64::try_from(now.saturating_sub(EPOCH_MS))
            .unwrap_or(0)
            .max(1);
        let random: u64 = rand::thread_rng().gen_range(0..(1u64 << RANDOM_BITS));
        let candidate = (ms << RANDOM_BITS) | random;
        let mut last = match self.last.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        let id = if candidate > *last {
            candidate
        } else {
            *last + 1
        };
        *last = id;
        id
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_increase_are_positive_and_fit_javascript() {
        let g = OrderIds::default();
        let mut prev = 0;
        for _ in 0..10_000 {
            let id = g.next();
            assert!(id > prev);
            assert!(id < (1u64 << 53));
            prev = id;
        }
    }
}
