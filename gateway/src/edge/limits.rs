//! Connection limits of the edge: how many connections may be open at once,
//! how fast new ones are admitted (a token bucket, so a connect flood cannot
//! exhaust the handshake and authentication path), and failed-authentication
//! throttling per source address and per username (brute-force protection
//! that expires, so the real machine is never locked out for good).

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use crate::config::AuthThrottleSettings;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The state behind these locks stays consistent between statements, so a
    // panic elsewhere does not make it unusable.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Why a new connection was closed at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    MaxConnections,
    AcceptRate,
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    last: Instant,
}

/// Admission of new connections: the open-connection cap and the accept
/// rate. Shared by the plain and the TLS listener.
#[derive(Debug)]
pub struct AcceptGate {
    max: usize,
    live: AtomicUsize,
    per_sec: f64,
    burst: f64,
    bucket: Mutex<Bucket>,
}

/// One admitted connection; dropping it frees its place.
#[derive(Debug)]
pub struct ConnSlot(Arc<AcceptGate>);

impl Drop for ConnSlot {
    fn drop(&mut self) {
        self.0.live.fetch_sub(1, Ordering::Relaxed);
    }
}

impl AcceptGate {
    /// `max` or `per_sec` 0 disables that limit.
    pub fn new(max: usize, per_sec: u32, burst: u32) -> Self {
        let burst = f64::from(burst.max(1));
        Self {
            max,
            live: AtomicUsize::new(0),
            per_sec: f64::from(per_sec),
            burst,
            bucket: Mutex::new(Bucket {
                tokens: burst,
                last: Instant::now(),
            }),
        }
    }

    /// Open connections now (before and after CONNECT).
    pub fn live(&self) -> usize {
        self.live.load(Ordering::Relaxed)
    }

    /// Admit a just-accepted connection, or say why not. The cap is checked
    /// first so a refused connection over the cap does not spend a token.
    pub fn admit(self: &Arc<Self>) -> Result<ConnSlot, Rejection> {
        let n = self.live.fetch_add(1, Ordering::Relaxed);
        let slot = ConnSlot(self.clone());
        if self.max > 0 && n >= self.max {
            return Err(Rejection::MaxConnections);
        }
        if self.per_sec > 0.0 {
            let now = Instant::now();
            let mut b = lock(&self.bucket);
            let refill = now.duration_since(b.last).as_secs_f64() * self.per_sec;
            b.tokens = (b.tokens + refill).min(self.burst);
            b.last = now;
            if b.tokens < 1.0 {
                return Err(Rejection::AcceptRate);
            }
            b.tokens -= 1.0;
        }
        Ok(slot)
    }
}

/// Which key of the throttle refused a CONNECT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThrottleScope {
    Address,
    Username,
}

impl ThrottleScope {
    pub const ALL: [Self; 2] = [Self::Address, Self::Username];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Address => "address",
            Self::Username => "username",
        }
    }
}

#[derive(Debug, Clone)]
struct Entry {
    failures: u32,
    window_start: Instant,
    last_failure: Instant,
    blocked_until: Option<Instant>,
    /// Blocks so far; each doubles the next cooldown up to the cap.
    strikes: u32,
}

impl Entry {
    fn new(now: Instant) -> Self {
        Self {
            failures: 0,
            window_start: now,
            last_failure: now,
            blocked_until: None,
            strikes: 0,
        }
    }

    fn blocked(&self, now: Instant) -> bool {
        self.blocked_until.is_some_and(|t| now < t)
    }
}

/// Failure counts of one kind of key.
#[derive(Debug)]
struct Table<K> {
    max_failures: u32,
    entries: Mutex<HashMap<K, Entry>>,
}

impl<K: std::hash::Hash + Eq + Clone> Table<K> {
    fn new(max_failures: u32) -> Self {
        Self {
            max_failures,
            entries: Mutex::new(HashMap::new()),
        }
    }

    fn blocked(&self, key: &K, now: Instant) -> bool {
        self.max_failures > 0 && lock(&self.entries).get(key).is_some_and(|e| e.blocked(now))
    }

    fn fail(&self, s: &AuthThrottleSettings, key: &K, now: Instant) {
        if self.max_failures == 0 {
            return;
        }
        let mut map = lock(&self.entries);
        if !map.contains_key(key) && map.len() >= s.max_tracked {
            // Forget entries that neither block nor remember recent strikes.
            let forget = s.window + s.max_cooldown;
            map.retain(|_, e| e.blocked(now) || now.duration_since(e.last_failure) < forget);
            if map.len() >= s.max_tracked {
                // Still full (a distributed attack): new keys go untracked
                // rather than memory growing; tracked ones stay throttled.
                return;
            }
        }
        let e = map.entry(key.clone()).or_insert_with(|| Entry::new(now));
        if now.duration_since(e.last_failure) >= s.window + s.max_cooldown {
            // Quiet for long enough: earlier blocks are forgiven.
            e.strikes = 0;
        }
        if now.duration_since(e.window_start) >= s.window {
            e.failures = 0;
            e.window_start = now;
        }
        e.failures += 1;
        e.last_failure = now;
        if e.failures >= self.max_failures {
            let factor = 1u32.checked_shl(e.strikes.min(16)).unwrap_or(u32::MAX);
            let cooldown = s.cooldown.saturating_mul(factor).min(s.max_cooldown);
            e.blocked_until = Some(now + cooldown);
            e.strikes = e.strikes.saturating_add(1);
            e.failures = 0;
            e.window_start = now;
        }
    }

    fn forget(&self, key: &K) {
        lock(&self.entries).remove(key);
    }
}

/// Failed-authentication throttling. Attempts refused by the throttle are
/// not failures (they never reach the password check), so a real machine
/// retrying with its right password is let in once the cooldown ends.
///
/// A username blocked by someone else's guessing would keep its real machine
/// out for as long as the guessing goes on, so the address that last
/// authenticated as a username successfully is exempt from that username's
/// block (never from an address block). Certificate-authenticated
/// connections are not throttled at all: nothing can be guessed there.
#[derive(Debug)]
pub struct AuthThrottle {
    settings: AuthThrottleSettings,
    addresses: Table<IpAddr>,
    usernames: Table<String>,
    /// Last address each username authenticated from. Written on success
    /// only, so bounded by the provisioned accounts.
    last_good: Mutex<HashMap<String, IpAddr>>,
}

/// IPv6 clients usually own a whole /64: throttle the prefix, not the address.
fn address_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let s = v6.segments();
            IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
        }
        v4 => v4,
    }
}

/// Usernames longer than this are not tracked by name (no account has such a
/// name, and 100,000 tracked 64 KiB names would be gigabytes); their
/// failures still count against the address.
const MAX_TRACKED_USERNAME: usize = 256;

fn username_key(u: &str) -> Option<String> {
    (u.len() <= MAX_TRACKED_USERNAME).then(|| u.to_string())
}

impl AuthThrottle {
    pub fn new(settings: AuthThrottleSettings) -> Self {
        Self {
            addresses: Table::new(settings.max_failures_per_address),
            usernames: Table::new(settings.max_failures_per_username),
            settings,
            last_good: Mutex::new(HashMap::new()),
        }
    }

    /// Is a CONNECT from `ip` for `username` refused right now?
    pub fn check(&self, ip: IpAddr, username: Option<&str>, now: Instant) -> Option<ThrottleScope> {
        let ip = address_key(ip);
        if self.addresses.blocked(&ip, now) {
            return Some(ThrottleScope::Address);
        }
        let user = username_key(username?)?;
        if self.usernames.blocked(&user, now) && lock(&self.last_good).get(&user) != Some(&ip) {
            return Some(ThrottleScope::Username);
        }
        None
    }

    /// A CONNECT failed on its credentials.
    pub fn failed(&self, ip: IpAddr, username: Option<&str>, now: Instant) {
        self.addresses.fail(&self.settings, &address_key(ip), now);
        if let Some(u) = username.and_then(username_key) {
            self.usernames.fail(&self.settings, &u, now);
        }
    }

    /// A CONNECT authenticated: the username's failures are forgotten (only
    /// the holder of its secret gets here), the address's are not (one
    /// address may hold both an attacker and a real machine).
    pub fn succeeded(&self, ip: IpAddr, username: &str) {
        let ip = address_key(ip);
        let mut good = lock(&self.last_good);
        if good.get(username) != Some(&ip) {
            good.insert(username.to_string(), ip);
        }
        drop(good);
        self.usernames.forget(&username.to_string());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn settings() -> AuthThrottleSettings {
        AuthThrottleSettings {
            max_failures_per_address: 4,
            max_failures_per_username: 2,
            window: Duration::from_secs(60),
            cooldown: Duration::from_secs(10),
            max_cooldown: Duration::from_secs(25),
            max_tracked: 3,
        }
    }

    const A: &str = "12345678";

    #[test]
    fn username_block_grows_is_capped_and_expires() {
        let t = AuthThrottle::new(settings());
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let t0 = Instant::now();
        t.failed(ip, Some(A), t0);
        assert_eq!(t.check(ip, Some(A), t0), None, "one failure is not a block");
        t.failed(ip, Some(A), t0);
        assert_eq!(t.check(ip, Some(A), t0), Some(ThrottleScope::Username));
        assert_eq!(
            t.check(ip, Some("87654321"), t0),
            None,
            "other usernames free"
        );
        let t1 = t0 + Duration::from_secs(10);
        assert_eq!(t.check(ip, Some(A), t1), None, "first cooldown: 10 s");
        t.failed(ip, Some(A), t1);
        t.failed(ip, Some(A), t1);
        assert!(t.check(ip, Some(A), t1 + Duration::from_secs(19)).is_some());
        let t2 = t1 + Duration::from_secs(20);
        assert_eq!(t.check(ip, Some(A), t2), None, "second: doubled to 20 s");
        t.failed(ip, Some(A), t2);
        t.failed(ip, Some(A), t2);
        assert!(t.check(ip, Some(A), t2 + Duration::from_secs(24)).is_some());
        assert_eq!(
            t.check(ip, Some(A), t2 + Duration::from_secs(25)),
            None,
            "third: capped at 25 s, not 40"
        );
    }

    #[test]
    fn last_good_address_is_exempt_from_its_usernames_block() {
        let t = AuthThrottle::new(settings());
        let home: IpAddr = "192.0.2.1".parse().unwrap();
        let attacker: IpAddr = "198.51.100.7".parse().unwrap();
        let now = Instant::now();
        t.succeeded(home, A);
        t.failed(attacker, Some(A), now);
        t.failed(attacker, Some(A), now);
        assert_eq!(
            t.check(attacker, Some(A), now),
            Some(ThrottleScope::Username)
        );
        assert_eq!(
            t.check(home, Some(A), now),
            None,
            "the real machine gets in"
        );
        // A success forgets the username's failures.
        t.succeeded(home, A);
        assert_eq!(t.check(attacker, Some(A), now), None);
    }

    #[test]
    fn address_block_covers_every_username_and_ipv6_prefix() {
        let t = AuthThrottle::new(settings());
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let same_64: IpAddr = "2001:db8:1:2::ffff".parse().unwrap();
        let now = Instant::now();
        for u in ["u1", "u2", "u3", "u4"] {
            t.failed(a, Some(u), now);
        }
        assert_eq!(
            t.check(same_64, Some("u9"), now),
            Some(ThrottleScope::Address)
        );
        assert_eq!(t.check(same_64, None, now), Some(ThrottleScope::Address));
        let other: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(t.check(other, Some("u9"), now), None);
    }

    #[test]
    fn tracking_is_bounded() {
        let t = AuthThrottle::new(settings());
        let now = Instant::now();
        for i in 0..10u8 {
            t.failed(IpAddr::from([10, 0, 0, i]), None, now);
        }
        assert!(lock(&t.addresses.entries).len() <= 3);
        // Huge usernames are not kept as keys; the address still counts.
        let long = "x".repeat(MAX_TRACKED_USERNAME + 1);
        let ip: IpAddr = "192.0.2.9".parse().unwrap();
        let t = AuthThrottle::new(settings());
        for _ in 0..4 {
            t.failed(ip, Some(&long), now);
        }
        assert!(lock(&t.usernames.entries).is_empty());
        assert_eq!(t.check(ip, Some(&long), now), Some(ThrottleScope::Address));
    }

    #[test]
    fn accept_gate_cap_and_rate() {
        let g = Arc::new(AcceptGate::new(2, 0, 0));
        let a = g.admit().unwrap();
        let _b = g.admit().unwrap();
        assert_eq!(g.admit().unwrap_err(), Rejection::MaxConnections);
        drop(a);
        let _c = g.admit().expect("a closed connection frees its place");
        assert_eq!(g.live(), 2);

        // A rate of 1/s with a burst of 3: admits soon run out of tokens
        // (looped, so a stalled test thread that earns a token still ends).
        let g = Arc::new(AcceptGate::new(0, 1, 3));
        let mut held = Vec::new();
        let refused = (0..1000).find_map(|_| match g.admit() {
            Ok(s) => {
                held.push(s);
                None
            }
            Err(e) => Some(e),
        });
        assert_eq!(refused, Some(Rejection::AcceptRate));
        assert!(held.len() >= 3, "the burst is admitted");
        drop(held);
        assert_eq!(g.live(), 0);
    }
}
