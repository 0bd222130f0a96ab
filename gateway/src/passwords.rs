//! Passwords a human may choose: the `[operator]` password and the
//! `[[services]]` passwords of the configuration file. They are verified
//! against an argon2id PHC string (`$argon2id$v=19$m=…`), which
//! `vendgate hash-password` produces.
//!
//! # Why argon2 here and HMAC-SHA256 elsewhere
//!
//! Secrets the gateway generates (machine secrets, AppSecrets, provisioned
//! service passwords) carry 128 random bits: no hash cost makes them easier
//! or harder to guess, so they get a fast salted HMAC ([`crate::secrets`]).
//! A password a person picked may be guessable from a list; a memory-hard
//! hash makes each guess against a leaked configuration file expensive.
//!
//! # Plaintext is still accepted, with a warning
//!
//! Existing deployments (and the environment-variable override) set these
//! passwords in clear; refusing them would stop a gateway at upgrade. A value
//! that does not start with `$argon2` is therefore taken as plaintext and
//! start-up logs a warning naming the setting. A value that starts with
//! `$argon2` but does not parse is an error, never a plaintext password.
//!
//! # Cost at run time, and the waiting line
//!
//! One argon2id verification with the default parameters takes tens of
//! milliseconds and 19 MiB. It runs on the blocking pool behind an
//! [`Argon2Queue`]: a few checks at once, a short bounded waiting line, and a
//! bound on the wait. A login that finds the line full or waits too long is
//! answered [`Busy`] at once rather than queueing, so a burst of wrong
//! passwords can use neither the async workers nor unbounded memory, and
//! cannot make an honest login wait past its caller's deadline (an MQTT
//! CONNECT's `connect_timeout`). Dashboard sign-ins and MQTT service logins
//! have a queue each ([`Lane`]): a flood of one does not delay the other.
//! The slot is held by the blocking task itself, so a caller that gives up
//! (its future dropped) does not free a slot while its hash still runs.
//!
//! After a success the password is remembered as a salted HMAC, so a service
//! that reconnects (or an operator who logs in again) pays the argon2 cost
//! once per process, without queueing.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use tokio::sync::Semaphore;

use crate::config::Argon2Settings;
use crate::secrets::SecretHash;

/// Which logins share an [`Argon2Queue`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lane {
    /// Operator sign-ins to the dashboard.
    Dashboard,
    /// `[[services]]` MQTT logins.
    Service,
}

impl Lane {
    pub const ALL: [Self; 2] = [Self::Dashboard, Self::Service];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Dashboard => "dashboard",
            Self::Service => "service",
        }
    }
}

/// No argon2 slot within the wait bound, or the waiting line is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("password checks are busy; try again shortly")]
pub struct Busy;

/// Counters of the argon2 queues, for metrics.
#[derive(Debug, Default)]
pub struct Argon2Stats {
    /// Checks answered [`Busy`], by [`Lane`].
    pub busy: [AtomicU64; 2],
}

/// Bounded argon2 verification for one [`Lane`] (see the module docs).
#[derive(Debug)]
pub struct Argon2Queue {
    lane: Lane,
    slots: Arc<Semaphore>,
    waiting: AtomicUsize,
    max_waiting: usize,
    max_wait: Duration,
    stats: Arc<Argon2Stats>,
}

/// Leaves the waiting line when dropped (a slot was found, or the wait ended).
struct InLine<'a>(&'a AtomicUsize);

impl Drop for InLine<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Argon2Queue {
    /// A lane with `settings`' concurrency and line; its wait bound is
    /// `max_wait` (the caller's deadline: the dashboard's `argon2.max_wait`,
    /// an MQTT login's `connect_timeout`).
    pub fn new(
        lane: Lane,
        settings: &Argon2Settings,
        max_wait: Duration,
        stats: Arc<Argon2Stats>,
    ) -> Self {
        Self {
            lane,
            slots: Arc::new(Semaphore::new(settings.concurrency.max(1))),
            waiting: AtomicUsize::new(0),
            max_waiting: settings.max_waiting,
            max_wait,
            stats,
        }
    }

    /// Verify `candidate` against `phc` on the blocking pool once a slot is
    /// free; [`Busy`] when none is within the bounds.
    async fn verify(&self, phc: Arc<str>, candidate: &str) -> Result<bool, Busy> {
        let slot = match self.slots.clone().try_acquire_owned() {
            Ok(slot) => slot,
            Err(_) => {
                if self.waiting.fetch_add(1, Ordering::Relaxed) >= self.max_waiting {
                    self.waiting.fetch_sub(1, Ordering::Relaxed);
                    return Err(self.busy());
                }
                let _in_line = InLine(&self.waiting);
                match tokio::time::timeout(self.max_wait, self.slots.clone().acquire_owned()).await
                {
                    Ok(Ok(slot)) => slot,
                    // Timed out, or (never: it is not closed) the semaphore closed.
                    _ => return Err(self.busy()),
                }
            }
        };
        let owned = candidate.to_owned();
        let ok = tokio::task::spawn_blocking(move || {
            let _slot = slot;
            verify_phc(&phc, &owned)
        })
        .await
        .unwrap_or(false);
        Ok(ok)
    }

    fn busy(&self) -> Busy {
        self.stats.busy[self.lane as usize].fetch_add(1, Ordering::Relaxed);
        Busy
    }
}

/// The queue of passwords parsed without one (the CLI, unit tests).
static DEFAULT_QUEUE: LazyLock<Arc<Argon2Queue>> = LazyLock::new(|| {
    Arc::new(Argon2Queue::new(
        Lane::Service,
        &Argon2Settings::default(),
        Duration::from_secs(5),
        Arc::default(),
    ))
});

/// Shortest password `hash-password` accepts (the dashboard's minimum, which
/// can no longer be checked once only the hash is configured).
pub const MIN_LEN: usize = 12;

/// A configured password could not be used. The value is never repeated.
#[derive(Debug, thiserror::Error)]
pub enum PasswordError {
    #[error("not a valid argon2 PHC string (make one with `vendgate hash-password`): {0}")]
    BadHash(argon2::password_hash::Error),
    /// PHC strings may legally omit the salt and the hash output; such a
    /// value could never verify a password, so it is refused up front.
    #[error(
        "argon2 PHC string without a salt or hash output (make one with `vendgate hash-password`)"
    )]
    Incomplete,
    #[error("the password must have at least {MIN_LEN} characters")]
    TooShort,
    #[error("hashing the password: {0}")]
    Hashing(argon2::password_hash::Error),
}

/// A password from the configuration, ready to verify. `Debug` shows only
/// whether it is hashed.
pub struct ConfigPassword {
    kind: Kind,
    /// The last candidate that verified against an argon2 hash, as an HMAC
    /// under a fresh salt (see the module docs).
    remembered: Mutex<Option<SecretHash>>,
    /// Where argon2 checks of this password wait for a slot.
    queue: Arc<Argon2Queue>,
}

enum Kind {
    /// A validated argon2 PHC string.
    Argon2(Arc<str>),
    /// A plaintext password, kept only as an HMAC in memory.
    Plain(SecretHash),
}

impl ConfigPassword {
    /// Parse a configured value: an argon2 PHC string, or plaintext.
    pub fn parse(configured: &str) -> Result<Self, PasswordError> {
        let kind = if looks_hashed(configured) {
            let parsed = PasswordHash::new(configured).map_err(PasswordError::BadHash)?;
            if parsed.salt.is_none() || parsed.hash.is_none() {
                return Err(PasswordError::Incomplete);
            }
            Kind::Argon2(Arc::from(configured))
        } else {
            Kind::Plain(SecretHash::new(configured))
        };
        Ok(Self {
            kind,
            remembered: Mutex::new(None),
            queue: DEFAULT_QUEUE.clone(),
        })
    }

    /// Check this password's argon2 candidates through `queue` (its lane).
    pub fn queued(mut self, queue: Arc<Argon2Queue>) -> Self {
        self.queue = queue;
        self
    }

    /// Whether the configured value is a hash (false: plaintext, warn).
    pub fn is_hashed(&self) -> bool {
        matches!(self.kind, Kind::Argon2(_))
    }

    /// Whether `candidate` is the password; false also when the check was
    /// [`Busy`] (see [`Self::check`]).
    pub async fn verify(&self, candidate: &str) -> bool {
        self.check(candidate).await.unwrap_or(false)
    }

    /// Whether `candidate` is the password, or [`Busy`] when its argon2
    /// check found no slot within the queue's bounds. Constant-time for
    /// plaintext; for a hash, remembered successes are constant-time HMAC
    /// checks and anything else is a full argon2 verification on the
    /// blocking pool.
    pub async fn check(&self, candidate: &str) -> Result<bool, Busy> {
        let phc = match &self.kind {
            Kind::Plain(h) => return Ok(h.verify(candidate)),
            Kind::Argon2(phc) => phc.clone(),
        };
        if self.remembered_matches(candidate) {
            return Ok(true);
        }
        let ok = self.queue.verify(phc, candidate).await?;
        if ok {
            if let Ok(mut r) = self.remembered.lock() {
                *r = Some(SecretHash::new(candidate));
            }
        }
        Ok(ok)
    }

    fn remembered_matches(&self, candidate: &str) -> bool {
        self.remembered
            .lock()
            .ok()
            .and_then(|r| r.as_ref().map(|h| h.verify(candidate)))
            .unwrap_or(false)
    }
}

impl std::fmt::Debug for ConfigPassword {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.is_hashed() {
            "ConfigPassword(argon2)"
        } else {
            "ConfigPassword(plaintext)"
        })
    }
}

/// Whether a configured value is meant as a hash (and must parse as one).
pub fn looks_hashed(configured: &str) -> bool {
    configured.starts_with("$argon2")
}

/// The argon2id PHC string of `password` (default parameters: 19 MiB, 2
/// passes, 1 lane; a fresh 16-byte salt), for `vendgate hash-password`.
pub fn hash_password(password: &str) -> Result<String, PasswordError> {
    if password.chars().count() < MIN_LEN {
        return Err(PasswordError::TooShort);
    }
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(PasswordError::Hashing)
}

/// Verify against a PHC string with the parameters it names.
fn verify_phc(phc: &str, candidate: &str) -> bool {
    match PasswordHash::new(phc) {
        Ok(parsed) => Argon2::default()
            .verify_password(candidate.as_bytes(), &parsed)
            .is_ok(),
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_is_argon2id_with_a_fresh_salt() {
        let a = hash_password("correct horse battery").unwrap();
        let b = hash_password("correct horse battery").unwrap();
        assert!(a.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{a}");
        assert_ne!(a, b, "salted");
        assert!(matches!(
            hash_password("short"),
            Err(PasswordError::TooShort)
        ));
    }

    #[tokio::test]
    async fn argon2_hash_verifies_only_its_password() {
        let p = ConfigPassword::parse(&hash_password("correct horse battery").unwrap()).unwrap();
        assert!(p.is_hashed());
        assert!(!p.verify("correct horse batter").await);
        assert!(!p.verify("").await);
        assert!(p.verify("correct horse battery").await);
        // Remembered now; a wrong one still fails after a success.
        assert!(p.verify("correct horse battery").await);
        assert!(!p.verify("Correct horse battery").await);
        assert_eq!(format!("{p:?}"), "ConfigPassword(argon2)");
    }

    #[tokio::test]
    async fn a_known_phc_string_verifies() {
        // Made once with `vendgate hash-password`, so a change of the
        // parameters or encoding that breaks existing config files shows here.
        let phc = "$argon2id$v=19$m=19456,t=2,p=1$NPg+rFgFJe8u1vBXVFcfig$\
                   U3EbfOSXZ4qDC27Wnd+AGXJRNZrHqcRd6E0EJcW5W6k";
        let p = ConfigPassword::parse(phc).unwrap();
        assert!(p.verify("hunter2hunter2").await);
        assert!(!p.verify("hunter2hunter3").await);
    }

    #[tokio::test]
    async fn plaintext_still_works_and_says_so() {
        let p = ConfigPassword::parse("hunter2hunter2").unwrap();
        assert!(!p.is_hashed());
        assert!(p.verify("hunter2hunter2").await);
        assert!(!p.verify("hunter2hunter").await);
        assert_eq!(format!("{p:?}"), "ConfigPassword(plaintext)");
    }

    #[tokio::test]
    async fn a_full_line_answers_busy_at_once_and_a_long_wait_times_out() {
        let settings = Argon2Settings {
            concurrency: 1,
            max_waiting: 1,
            max_wait: Duration::from_secs(60),
        };
        let stats = Arc::new(Argon2Stats::default());
        let queue = Arc::new(Argon2Queue::new(
            Lane::Dashboard,
            &settings,
            Duration::from_secs(60),
            stats.clone(),
        ));
        let p = Arc::new(
            ConfigPassword::parse(&hash_password("correct horse battery").unwrap())
                .unwrap()
                .queued(queue.clone()),
        );
        // Hold the only slot, then fill the line of one.
        let held = queue.slots.clone().acquire_owned().await.unwrap();
        let waiter = tokio::spawn({
            let p = p.clone();
            async move { p.check("correct horse battery").await }
        });
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while queue.waiting.load(Ordering::Relaxed) == 0 {
            assert!(tokio::time::Instant::now() < deadline, "the waiter queues");
            tokio::task::yield_now().await;
        }
        assert_eq!(p.check("wrong password here").await, Err(Busy), "line full");
        assert_eq!(
            stats.busy[Lane::Dashboard as usize].load(Ordering::Relaxed),
            1
        );
        drop(held);
        assert_eq!(waiter.await.unwrap(), Ok(true), "the waiter gets the slot");
        // Remembered now: no slot needed even while one is held.
        let _held = queue.slots.clone().acquire_owned().await.unwrap();
        assert_eq!(p.check("correct horse battery").await, Ok(true));

        // A wait longer than the bound is Busy, not a wrong password.
        let short = Arc::new(Argon2Queue::new(
            Lane::Service,
            &settings,
            Duration::from_millis(50),
            stats.clone(),
        ));
        let q = ConfigPassword::parse(&hash_password("correct horse battery").unwrap())
            .unwrap()
            .queued(short.clone());
        let _held = short.slots.clone().acquire_owned().await.unwrap();
        assert_eq!(q.check("correct horse battery").await, Err(Busy));
        assert!(!q.verify("correct horse battery").await, "busy reads as no");
        assert_eq!(
            stats.busy[Lane::Service as usize].load(Ordering::Relaxed),
            2
        );
    }

    #[test]
    fn a_broken_hash_is_an_error_not_plaintext() {
        for bad in ["$argon2id$", "$argon2id$v=19$m=19456,t=2,p=1$!!$??"] {
            let err = ConfigPassword::parse(bad).unwrap_err();
            assert!(matches!(err, PasswordError::BadHash(_)), "{bad}: {err}");
            assert!(!err.to_string().contains(bad));
        }
        // Well-formed PHC, but nothing to verify against.
        for incomplete in [
            "$argon2id$v=19$m=19456,t=2,p=1",
            "$argon2id$v=19$m=19456,t=2,p=1$c29tZXNhbHRzb21lc2FsdA",
        ] {
            let err = ConfigPassword::parse(incomplete).unwrap_err();
            assert!(
                matches!(err, PasswordError::Incomplete),
                "{incomplete}: {err}"
            );
        }
    }
}
