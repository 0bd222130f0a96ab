//! Connection limits of the edge: how many connections may be open at once
//! and how fast new ones are admitted, per source address first and then for
//! the whole listener (token buckets, so one host's connect flood is refused
//! before it spends the tokens every machine reconnects through);
//! failed-authentication throttling per source address and per username
//! (brute-force protection that expires, so the real machine is never
//! locked out for good); each machine's packet rate, kept across its
//! reconnects; and the per-address limiter of refusal log lines. Every map
//! here is bounded.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use vendgate_proto::machine::MachineNo;

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
    /// Over `max_connections_per_address`.
    AddressConnections,
    /// Over `accept_rate_per_address`.
    AddressRate,
}

impl Rejection {
    pub const ALL: [Self; 4] = [
        Self::MaxConnections,
        Self::AcceptRate,
        Self::AddressConnections,
        Self::AddressRate,
    ];

    /// The `reason` label of `vendgate_mqtt_connections_rejected_total`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::MaxConnections => "max_connections",
            Self::AcceptRate => "accept_rate",
            Self::AddressConnections => "address_connections",
            Self::AddressRate => "address_rate",
        }
    }
}

/// Tokens refilled at a steady rate up to a burst; each paced event takes some.
#[derive(Debug, Clone, Copy)]
struct TokenBucket {
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    fn full(burst: f64, now: Instant) -> Self {
        Self {
            tokens: burst,
            last: now,
        }
    }

    fn refill(&mut self, per_sec: f64, burst: f64, now: Instant) {
        let refill = now.saturating_duration_since(self.last).as_secs_f64() * per_sec;
        self.tokens = (self.tokens + refill).min(burst);
        self.last = now;
    }

    /// Take `n` tokens if there are that many (after refilling).
    fn take(&mut self, per_sec: f64, burst: f64, n: f64, now: Instant) -> bool {
        self.refill(per_sec, burst, now);
        if self.tokens >= n {
            self.tokens -= n;
            true
        } else {
            false
        }
    }

    /// Whether the bucket would be full now: it remembers nothing, so its
    /// entry can be forgotten.
    fn is_idle(&self, per_sec: f64, burst: f64, now: Instant) -> bool {
        let refill = now.saturating_duration_since(self.last).as_secs_f64() * per_sec;
        self.tokens + refill >= burst
    }
}

/// Limits of one source address at accept (`mqtt.*_per_address`).
#[derive(Debug, Clone, Copy, Default)]
pub struct AddressLimits {
    /// Open connections; 0 disables.
    pub max_connections: usize,
    /// New connections per second; 0 disables.
    pub per_sec: u32,
    pub burst: u32,
    /// Addresses tracked at most.
    pub max_tracked: usize,
}

#[derive(Debug)]
struct AddressEntry {
    live: usize,
    bucket: TokenBucket,
}

/// Admission of new connections: per source address (IPv6: per /64) first,
/// then the open-connection cap and the accept rate of the whole listener.
/// Shared by the plain and the TLS listener.
#[derive(Debug)]
pub struct AcceptGate {
    max: usize,
    live: AtomicUsize,
    per_sec: f64,
    burst: f64,
    bucket: Mutex<TokenBucket>,
    address: AddressLimits,
    addresses: Mutex<HashMap<IpAddr, AddressEntry>>,
}

/// One admitted connection; dropping it frees its place (and its place
/// under its address's cap).
#[derive(Debug)]
pub struct ConnSlot {
    gate: Arc<AcceptGate>,
    /// The tracked address key, if the address was tracked.
    address: Option<IpAddr>,
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        self.gate.live.fetch_sub(1, Ordering::Relaxed);
        if let Some(ip) = self.address {
            if let Some(e) = lock(&self.gate.addresses).get_mut(&ip) {
                e.live = e.live.saturating_sub(1);
            }
        }
    }
}

impl AcceptGate {
    /// `max` or `per_sec` 0 disables that limit. No per-address limits.
    pub fn new(max: usize, per_sec: u32, burst: u32) -> Self {
        Self::with_address_limits(max, per_sec, burst, AddressLimits::default())
    }

    pub fn with_address_limits(
        max: usize,
        per_sec: u32,
        burst: u32,
        address: AddressLimits,
    ) -> Self {
        let burst = f64::from(burst.max(1));
        Self {
            max,
            live: AtomicUsize::new(0),
            per_sec: f64::from(per_sec),
            burst,
            bucket: Mutex::new(TokenBucket::full(burst, Instant::now())),
            address,
            addresses: Mutex::new(HashMap::new()),
        }
    }

    /// Open connections now (before and after CONNECT).
    pub fn live(&self) -> usize {
        self.live.load(Ordering::Relaxed)
    }

    /// Source addresses tracked now (for tests and metrics).
    pub fn tracked_addresses(&self) -> usize {
        lock(&self.addresses).len()
    }

    /// Admit a just-accepted connection whose source address is unknown.
    pub fn admit(self: &Arc<Self>) -> Result<ConnSlot, Rejection> {
        self.admit_global(None)
    }

    /// Admit a just-accepted connection from `peer`, or say why not. The
    /// address's own limits come first, so one host's flood is refused
    /// before it spends the listener's shared tokens; each cap is checked
    /// before its rate so a refusal over a cap spends no token.
    pub fn admit_from(self: &Arc<Self>, peer: IpAddr) -> Result<ConnSlot, Rejection> {
        let a = self.address;
        if a.max_connections == 0 && a.per_sec == 0 {
            return self.admit_global(None);
        }
        let key = address_key(peer);
        let now = Instant::now();
        let (per_sec, burst) = (f64::from(a.per_sec), f64::from(a.burst.max(1)));
        let tracked = {
            let mut map = lock(&self.addresses);
            if !map.contains_key(&key) && map.len() >= a.max_tracked {
                // Forget addresses with no connection and a full bucket:
                // they would be admitted exactly as a new entry is.
                map.retain(|_, e| e.live > 0 || !e.bucket.is_idle(per_sec, burst, now));
            }
            if map.contains_key(&key) || map.len() < a.max_tracked {
                let e = map.entry(key).or_insert_with(|| AddressEntry {
                    live: 0,
                    bucket: TokenBucket::full(burst, now),
                });
                if a.max_connections > 0 && e.live >= a.max_connections {
                    return Err(Rejection::AddressConnections);
                }
                if a.per_sec > 0 && !e.bucket.take(per_sec, burst, 1.0, now) {
                    return Err(Rejection::AddressRate);
                }
                e.live += 1;
                true
            } else {
                // Every tracked address is busy (a distributed flood): the
                // new one goes untracked rather than memory growing; the
                // listener-wide limits still apply to it.
                false
            }
        };
        self.admit_global(tracked.then_some(key))
    }

    fn admit_global(self: &Arc<Self>, address: Option<IpAddr>) -> Result<ConnSlot, Rejection> {
        let n = self.live.fetch_add(1, Ordering::Relaxed);
        // From here the slot's drop undoes both counts, refused or not.
        let slot = ConnSlot {
            gate: self.clone(),
            address,
        };
        if self.max > 0 && n >= self.max {
            return Err(Rejection::MaxConnections);
        }
        if self.per_sec > 0.0
            && !lock(&self.bucket).take(self.per_sec, self.burst, 1.0, Instant::now())
        {
            return Err(Rejection::AcceptRate);
        }
        Ok(slot)
    }
}

/// A keyed set of token buckets with a bounded number of keys: entries whose
/// bucket has refilled (they remember nothing) are pruned when the map is
/// full; if it is still full, a new key is answered `when_full`.
#[derive(Debug)]
struct KeyedBuckets<K> {
    per_sec: f64,
    burst: f64,
    max_tracked: usize,
    when_full: bool,
    map: Mutex<HashMap<K, TokenBucket>>,
}

impl<K: std::hash::Hash + Eq> KeyedBuckets<K> {
    fn new(per_sec: f64, burst: f64, max_tracked: usize, when_full: bool) -> Self {
        Self {
            per_sec,
            burst,
            max_tracked,
            when_full,
            map: Mutex::new(HashMap::new()),
        }
    }

    fn take(&self, key: K, now: Instant) -> bool {
        let mut map = lock(&self.map);
        if !map.contains_key(&key) && map.len() >= self.max_tracked {
            let (p, b) = (self.per_sec, self.burst);
            map.retain(|_, e| !e.is_idle(p, b, now));
            if map.len() >= self.max_tracked {
                return self.when_full;
            }
        }
        map.entry(key)
            .or_insert_with(|| TokenBucket::full(self.burst, now))
            .take(self.per_sec, self.burst, 1.0, now)
    }
}

/// Refusal log lines per source address: a few at once, then one per
/// interval, so a flood of refused CONNECTs cannot flood the log (the
/// metrics still count every refusal). Lines not written are counted.
#[derive(Debug)]
pub struct LogGate {
    buckets: KeyedBuckets<IpAddr>,
    pub suppressed: AtomicU64,
}

/// Lines one address may log at once.
const LOG_BURST: f64 = 5.0;
/// Then one line per this many seconds.
const LOG_EVERY_SECS: f64 = 10.0;

impl LogGate {
    pub fn new(max_tracked: usize) -> Self {
        Self {
            // Full: log nothing for new addresses (the counters still count).
            buckets: KeyedBuckets::new(1.0 / LOG_EVERY_SECS, LOG_BURST, max_tracked.max(1), false),
            suppressed: AtomicU64::new(0),
        }
    }

    /// May a refusal from `peer` be logged now?
    pub fn allow(&self, peer: IpAddr) -> bool {
        let ok = self.buckets.take(address_key(peer), Instant::now());
        if !ok {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
        }
        ok
    }
}

/// The packet-rate bucket of one machine, shared by its connections (a
/// take-over or reconnect finds it as it was left).
#[derive(Debug)]
pub struct MachineBucket {
    per_sec: f64,
    burst: f64,
    state: Mutex<TokenBucket>,
}

impl MachineBucket {
    /// Spend `n` tokens (at least one); false when the machine is over its
    /// rate. A rate of 0 disables the limit.
    pub fn take(&self, n: usize) -> bool {
        if self.per_sec <= 0.0 {
            return true;
        }
        let n = n.max(1) as f64;
        lock(&self.state).take(self.per_sec, self.burst, n, Instant::now())
    }
}

/// Packet-rate buckets by machine, so the rate survives reconnects. Only
/// authenticated machines get one, and entries no connection holds whose
/// bucket is full are forgotten when the map reaches its bound.
#[derive(Debug)]
pub struct MachineRates {
    per_sec: f64,
    burst: f64,
    max_tracked: usize,
    map: Mutex<HashMap<MachineNo, Arc<MachineBucket>>>,
}

impl MachineRates {
    /// `per_sec` 0 disables the limit.
    pub fn new(per_sec: u32, burst: u32, max_tracked: usize) -> Self {
        Self {
            per_sec: f64::from(per_sec),
            burst: f64::from(burst.max(1)),
            max_tracked: max_tracked.max(1),
            map: Mutex::new(HashMap::new()),
        }
    }

    /// The bucket of machine `m`.
    pub fn bucket(&self, m: MachineNo) -> Arc<MachineBucket> {
        let mut map = lock(&self.map);
        if let Some(b) = map.get(&m) {
            return b.clone();
        }
        let now = Instant::now();
        if map.len() >= self.max_tracked {
            let (p, b) = (self.per_sec, self.burst);
            map.retain(|_, e| Arc::strong_count(e) > 1 || !lock(&e.state).is_idle(p, b, now));
        }
        let b = Arc::new(MachineBucket {
            per_sec: self.per_sec,
            burst: self.burst,
            state: Mutex::new(TokenBucket::full(self.burst, now)),
        });
        if map.len() < self.max_tracked {
            map.insert(m, b.clone());
        }
        b
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

/// One key's failed CONNECTs in the current window, and its block.
#[derive(Debug, Clone)]
struct FailureRecord {
    failures: u32,
    window_start: Instant,
    last_failure: Instant,
    blocked_until: Option<Instant>,
    /// Blocks so far; each doubles the next cooldown up to the cap.
    strikes: u32,
}

impl FailureRecord {
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
struct FailureTable<K> {
    max_failures: u32,
    entries: Mutex<HashMap<K, FailureRecord>>,
}

impl<K: std::hash::Hash + Eq + Clone> FailureTable<K> {
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
        let e = map
            .entry(key.clone())
            .or_insert_with(|| FailureRecord::new(now));
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
/// block (never from an address block). The exemption is not a free pass
/// for everyone behind that address (a carrier NAT or proxy holds many
/// clients): failures are also counted per (address, username), with the
/// username's threshold, and that pair's own block applies to the exempt
/// address. So guessing from elsewhere cannot lock the machine out, and
/// guessing from its own address is throttled as any guessing is.
/// Certificate-authenticated connections are not throttled at all: nothing
/// can be guessed there.
#[derive(Debug)]
pub struct AuthThrottle {
    settings: AuthThrottleSettings,
    addresses: FailureTable<IpAddr>,
    usernames: FailureTable<String>,
    pairs: FailureTable<(IpAddr, String)>,
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
            addresses: FailureTable::new(settings.max_failures_per_address),
            usernames: FailureTable::new(settings.max_failures_per_username),
            pairs: FailureTable::new(settings.max_failures_per_username),
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
        if !self.usernames.blocked(&user, now) {
            return None;
        }
        let exempt = lock(&self.last_good).get(&user) == Some(&ip);
        if !exempt || self.pairs.blocked(&(ip, user), now) {
            return Some(ThrottleScope::Username);
        }
        None
    }

    /// A CONNECT failed on its credentials.
    pub fn failed(&self, ip: IpAddr, username: Option<&str>, now: Instant) {
        let ip = address_key(ip);
        self.addresses.fail(&self.settings, &ip, now);
        if let Some(u) = username.and_then(username_key) {
            self.usernames.fail(&self.settings, &u, now);
            self.pairs.fail(&self.settings, &(ip, u), now);
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
        self.pairs.forget(&(ip, username.to_string()));
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
    fn exemption_does_not_cover_guessing_from_the_same_address() {
        let t = AuthThrottle::new(settings());
        let nat: IpAddr = "192.0.2.1".parse().unwrap();
        let elsewhere: IpAddr = "198.51.100.7".parse().unwrap();
        let now = Instant::now();
        t.succeeded(nat, A);
        // Someone else behind the machine's NAT guesses its secret.
        t.failed(nat, Some(A), now);
        t.failed(nat, Some(A), now);
        assert_eq!(
            t.check(nat, Some(A), now),
            Some(ThrottleScope::Username),
            "the pair's own block applies to the exempt address"
        );
        // Guessing only from elsewhere leaves the exempt address free.
        let t = AuthThrottle::new(settings());
        t.succeeded(nat, A);
        t.failed(elsewhere, Some(A), now);
        t.failed(elsewhere, Some(A), now);
        assert_eq!(t.check(nat, Some(A), now), None);
        assert!(t.check(elsewhere, Some(A), now).is_some());
    }

    #[test]
    fn per_address_limits_come_first_and_are_bounded() {
        let limits = AddressLimits {
            max_connections: 2,
            per_sec: 1,
            burst: 3,
            max_tracked: 2,
        };
        let g = Arc::new(AcceptGate::with_address_limits(0, 1, 100, limits));
        let attacker: IpAddr = "127.0.0.2".parse().unwrap();
        let honest: IpAddr = "127.0.0.1".parse().unwrap();
        let a1 = g.admit_from(attacker).unwrap();
        let _a2 = g.admit_from(attacker).unwrap();
        assert_eq!(
            g.admit_from(attacker).unwrap_err(),
            Rejection::AddressConnections
        );
        drop(a1);
        let _a3 = g.admit_from(attacker).unwrap();
        // The burst of 3 is spent (looped: a stalled thread may earn a token).
        let refused = (0..1000).find_map(|_| g.admit_from(attacker).err());
        assert!(matches!(
            refused,
            Some(Rejection::AddressRate | Rejection::AddressConnections)
        ));
        assert!(
            g.admit_from(honest).is_ok(),
            "another address is not refused"
        );
        // IPv6 /64 is one address.
        let v6a: IpAddr = "2001:db8::1".parse().unwrap();
        let v6b: IpAddr = "2001:db8::2".parse().unwrap();
        let g = Arc::new(AcceptGate::with_address_limits(
            0,
            0,
            0,
            AddressLimits {
                max_connections: 1,
                per_sec: 0,
                burst: 0,
                max_tracked: 10,
            },
        ));
        let _v = g.admit_from(v6a).unwrap();
        assert_eq!(
            g.admit_from(v6b).unwrap_err(),
            Rejection::AddressConnections
        );
        // Bounded: with every tracked address busy, new ones go untracked.
        let g = Arc::new(AcceptGate::with_address_limits(0, 0, 0, limits));
        let held: Vec<_> = (1..=5u8)
            .map(|i| g.admit_from(IpAddr::from([10, 0, 0, i])).unwrap())
            .collect();
        assert_eq!(g.tracked_addresses(), 2);
        drop(held);
        assert_eq!(g.live(), 0);
    }

    #[test]
    fn machine_bucket_survives_reconnects_and_log_gate_limits_lines() {
        let rates = MachineRates::new(1, 10, 100);
        let m: MachineNo = A.parse().unwrap();
        let b = rates.bucket(m);
        assert!(b.take(10), "the burst");
        drop(b);
        // A new connection of the same machine finds the bucket spent.
        assert!(!rates.bucket(m).take(5));
        let other: MachineNo = "87654321".parse().unwrap();
        assert!(rates.bucket(other).take(5));

        let gate = LogGate::new(10);
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let allowed = (0..100).filter(|_| gate.allow(ip)).count();
        assert!((5..=6).contains(&allowed), "{allowed}");
        assert!(gate.suppressed.load(Ordering::Relaxed) >= 94);
        assert!(gate.allow("192.0.2.2".parse().unwrap()));
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
