//! Generation and hashing of the secrets the gateway hands out: machine
//! secrets, merchant AppSecrets and service-account passwords, plus the
//! merchant appids (not secret, but not guessable either).
//!
//! # Why HMAC-SHA256 and not a slow password hash
//!
//! Every secret we ever hash is generated here with at least 128 bits from the
//! OS random generator; nobody chooses one. Brute-forcing a 128-bit random
//! value is infeasible whatever the hash costs, so a slow KDF (argon2, bcrypt)
//! would add no protection and would only add latency to every MQTT CONNECT
//! and API call (a reconnect storm of 10,000 machines would pay it 10,000
//! times). A per-secret random salt as the HMAC key still makes equal secrets
//! hash differently and rules out precomputed tables.
//!
//! Passwords a human may choose (the `[operator]` and `[[services]]` ones in
//! the configuration file) are not handled here but in [`crate::passwords`],
//! with argon2id.
//!
//! # Rotation with a grace period
//!
//! Rotating a machine secret or an AppSecret keeps the replaced secret as a
//! [`PreviousSecret`] with an expiry; [`verify_rotating`] accepts it until
//! then and says which one matched, so callers can count and log accounts
//! that have not switched yet. One previous secret at most: rotating again
//! during a grace drops the older one.
//!
//! # The one secret kept readable: merchants' AppSecrets, encrypted
//!
//! Webhooks are signed with the merchant's AppSecret (API.md), so the
//! notifier needs the secret itself, which a hash cannot give back. Each
//! merchant therefore also has an encrypted copy ([`WebhookKey`]:
//! XChaCha20-Poly1305 under a 32-byte key kept in its own file, not in the
//! database). The hash still serves every API authentication; the encrypted
//! copy is read only to sign. A stolen database alone yields neither.

use std::fmt;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;

use chacha20poly1305::aead::{Aead, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use chrono::{DateTime, Utc};
use hmac::{Hmac, Mac};
use rand::rngs::OsRng;
use rand::{Rng, RngCore};
use sha2::Sha256;
use subtle::ConstantTimeEq;

type HmacSha256 = Hmac<Sha256>;

/// Prefix of the stored form; names the scheme so another can join later.
const SCHEME: &str = "hmac-sha256";
const SALT_LEN: usize = 16;
const DIGEST_LEN: usize = 32;
/// Bytes of randomness in a generated secret (128 bits).
const SECRET_BYTES: usize = 16;
/// Random characters after the "vg" prefix of an appid.
const APPID_RANDOM_LEN: usize = 14;
const LOWER_ALNUM: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";

/// A new secret: 128 bits from the OS random generator as 32 lowercase hex
/// characters.
pub fn generate_secret() -> String {
    let mut bytes = [0u8; SECRET_BYTES];
    // `fill_bytes` panics only if the OS random source is unavailable. There
    // is no safe fallback for secrets, so that is fatal by design.
    OsRng.fill_bytes(&mut bytes);
    hex::encode(bytes)
}

/// A new merchant appid: "vg" and 14 random lowercase alphanumerics. Not a
/// secret, but random so that appids reveal nothing about how many merchants
/// there are and cannot be enumerated.
pub fn generate_appid() -> String {
    format!("vg{}", random_lower_alnum(APPID_RANDOM_LEN))
}

/// `len` characters drawn uniformly from `[a-z0-9]` with the OS generator.
pub fn random_lower_alnum(len: usize) -> String {
    (0..len)
        .map(|_| char::from(LOWER_ALNUM[OsRng.gen_range(0..LOWER_ALNUM.len())]))
        .collect()
}

/// The stored form of a secret: `hmac-sha256$<salt hex, 16 bytes>$<digest hex>`
/// where digest = HMAC-SHA256(key = salt, message = secret).
///
/// `Debug` does not show the digest, and there is deliberately no `Display`
/// and no `PartialEq` (comparing hashes is never the right check; use
/// [`SecretHash::verify`]).
#[derive(Clone)]
pub struct SecretHash {
    encoded: String,
    salt: [u8; SALT_LEN],
    digest: [u8; DIGEST_LEN],
}

/// A stored secret hash did not have the expected shape. The value itself is
/// not repeated in the message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed secret hash (expected \"{SCHEME}$<32 hex>$<64 hex>\")")]
pub struct MalformedSecretHash;

impl SecretHash {
    /// Hash `secret` under a fresh random salt.
    pub fn new(secret: &str) -> Self {
        let mut salt = [0u8; SALT_LEN];
        OsRng.fill_bytes(&mut salt);
        Self::with_salt(salt, secret)
    }

    fn with_salt(salt: [u8; SALT_LEN], secret: &str) -> Self {
        let digest = hmac_digest(&salt, secret);
        Self::from_parts(salt, digest)
    }

    fn from_parts(salt: [u8; SALT_LEN], digest: [u8; DIGEST_LEN]) -> Self {
        let encoded = format!("{SCHEME}${}${}", hex::encode(salt), hex::encode(digest));
        Self {
            encoded,
            salt,
            digest,
        }
    }

    /// Parse the stored form. Only the canonical (lowercase hex) form is
    /// accepted, so `as_str()` of a parsed hash is the input unchanged.
    pub fn parse(stored: &str) -> Result<Self, MalformedSecretHash> {
        let mut parts = stored.split('$');
        let (Some(scheme), Some(salt_hex), Some(digest_hex), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(MalformedSecretHash);
        };
        if scheme != SCHEME {
            return Err(MalformedSecretHash);
        }
        let salt = decode_lower_hex::<SALT_LEN>(salt_hex)?;
        let digest = decode_lower_hex::<DIGEST_LEN>(digest_hex)?;
        Ok(Self {
            encoded: stored.to_owned(),
            salt,
            digest,
        })
    }

    /// The stored form.
    pub fn as_str(&self) -> &str {
        &self.encoded
    }

    /// Whether `candidate` is the secret this hash was made from. The digests
    /// are compared in constant time.
    pub fn verify(&self, candidate: &str) -> bool {
        let computed = hmac_digest(&self.salt, candidate);
        computed.ct_eq(&self.digest).into()
    }
}

impl fmt::Debug for SecretHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretHash(..)")
    }
}

/// Verify `candidate` against `hash`, or, when the account is unknown
/// (`None`), against a fixed dummy hash so that an unknown id and a wrong
/// secret cost the same one HMAC and cannot be told apart by timing. Always
/// `false` for `None`.
pub fn verify_or_dummy(hash: Option<&SecretHash>, candidate: &str) -> bool {
    match hash {
        Some(h) => h.verify(candidate),
        None => {
            // All-zero salt and digest: no real secret is stored this way, and
            // the answer is forced to false anyway. `black_box` keeps the
            // optimiser from dropping the unused computation.
            let dummy = SecretHash {
                encoded: String::new(),
                salt: [0u8; SALT_LEN],
                digest: [0u8; DIGEST_LEN],
            };
            std::hint::black_box(dummy.verify(std::hint::black_box(candidate)));
            false
        }
    }
}

/// The secret a rotation replaced: still accepted until `expires_at`.
#[derive(Debug, Clone)]
pub struct PreviousSecret {
    pub hash: SecretHash,
    pub expires_at: DateTime<Utc>,
}

/// Which stored secret a candidate matched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SecretMatch {
    Current,
    /// The replaced secret, within its grace period.
    Previous,
    None,
}

impl SecretMatch {
    pub fn is_match(self) -> bool {
        self != Self::None
    }
}

/// Verify `candidate` against an account's current secret and, when that
/// fails, against the secret a rotation replaced if its grace has not ended
/// at `now` (passed in so the expiry rule is testable without waiting).
/// `current` None (unknown account) costs the same dummy HMAC as
/// [`verify_or_dummy`] and never matches.
///
/// A second HMAC is spent only on accounts in a grace period with a wrong
/// or old secret; that this is measurable tells an attacker only that a
/// rotation is under way, not any secret.
pub fn verify_rotating(
    current: Option<&SecretHash>,
    previous: Option<&PreviousSecret>,
    candidate: &str,
    now: DateTime<Utc>,
) -> SecretMatch {
    if verify_or_dummy(current, candidate) {
        return SecretMatch::Current;
    }
    match previous {
        Some(p) if current.is_some() && now < p.expires_at && p.hash.verify(candidate) => {
            SecretMatch::Previous
        }
        _ => SecretMatch::None,
    }
}

/// How often a previous secret authenticated during its grace: operators
/// watch it fall to zero before the grace ends (`/metrics`:
/// `vendgate_previous_secret_used_total{account}`), and the log names the
/// accounts, at most once a minute each ([`PreviousSecretUses::record`]).
#[derive(Debug, Default)]
pub struct PreviousSecretUses {
    /// MQTT CONNECTs of machines with their previous secret.
    pub machine: AtomicU64,
    /// Open-API requests with a merchant's previous AppSecret.
    pub merchant: AtomicU64,
    /// When each account's use was last logged.
    logged: std::sync::Mutex<std::collections::HashMap<String, std::time::Instant>>,
}

/// Which counter of [`PreviousSecretUses`] a use goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccountKind {
    Machine,
    Merchant,
}

/// One log line per account and minute: a merchant calling the API
/// hundreds of times a second with its old AppSecret must not flood the log.
const LOG_EVERY: std::time::Duration = std::time::Duration::from_secs(60);
/// Accounts remembered for log throttling; beyond it the memory is reset
/// (a few repeated lines are better than unbounded growth).
const LOGGED_MAX: usize = 10_000;

impl PreviousSecretUses {
    /// Count one use by `account`; true when it should be logged now.
    pub fn record(&self, kind: AccountKind, account: &str) -> bool {
        let counter = match kind {
            AccountKind::Machine => &self.machine,
            AccountKind::Merchant => &self.merchant,
        };
        counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let Ok(mut logged) = self.logged.lock() else {
            return true;
        };
        let now = std::time::Instant::now();
        match logged.get(account) {
            Some(at) if now.duration_since(*at) < LOG_EVERY => false,
            _ => {
                if logged.len() >= LOGGED_MAX {
                    logged.clear();
                }
                logged.insert(account.to_owned(), now);
                true
            }
        }
    }
}

/// Prefix of an encrypted secret's stored form.
const ENC_SCHEME: &str = "xc20p";
/// Bytes of a [`WebhookKey`].
pub const WEBHOOK_KEY_LEN: usize = 32;
const XNONCE_LEN: usize = 24;

/// The key-encryption key of merchants' AppSecrets (see the module docs).
/// Stored as exactly 32 raw bytes in its own file, mode 0600.
///
/// `Debug` shows nothing of the key.
#[derive(Clone)]
pub struct WebhookKey {
    cipher: XChaCha20Poly1305,
}

/// The key file could not be read or created.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    #[error("webhook key file {}: {source}", .path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("webhook key file {} must hold exactly {WEBHOOK_KEY_LEN} bytes, found {len}", .path.display())]
    WrongLength { path: PathBuf, len: usize },
}

/// An encrypted secret could not be decrypted: malformed, or made under
/// another key or for another merchant. The value is not repeated.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecryptError {
    #[error("malformed encrypted secret (expected \"{ENC_SCHEME}$<48 hex>$<hex>\")")]
    Malformed,
    #[error("encrypted secret does not open with this webhook key (another key file, or another merchant's value)")]
    WrongKey,
}

impl WebhookKey {
    pub fn from_bytes(key: [u8; WEBHOOK_KEY_LEN]) -> Self {
        Self {
            // Named in full: `KeyInit` in scope would make `Hmac::new_from_slice`
            // below ambiguous.
            cipher: <XChaCha20Poly1305 as chacha20poly1305::KeyInit>::new(&key.into()),
        }
    }

    /// A fresh random key (tests, and the first start).
    pub fn generate() -> Self {
        Self::from_bytes(random_key())
    }

    /// Read the key at `path`, or create it (32 random bytes, mode 0600) if
    /// the file does not exist. Safe against a concurrent first start of the
    /// gateway and a CLI process: the file is written under a temporary name
    /// and linked into place only when complete, and a link never replaces
    /// an existing file, so both end up with the same key.
    pub fn load_or_create(path: &Path) -> Result<Self, KeyFileError> {
        let io_err = |source| KeyFileError::Io {
            path: path.to_path_buf(),
            source,
        };
        match std::fs::File::open(path) {
            Ok(f) => return Self::read(path, f),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(e)),
        }
        if let Some(dir) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            crate::private_fs::create_dir(dir).map_err(io_err)?;
        }
        let key = random_key();
        let tmp = path.with_extension(format!("tmp-{}", random_lower_alnum(8)));
        let created = write_private_file(&tmp, &key).and_then(|()| std::fs::hard_link(&tmp, path));
        let _ = std::fs::remove_file(&tmp);
        match created {
            Ok(()) => {
                sync_parent(path);
                tracing::info!(path = %path.display(), "created a new webhook key");
                Ok(Self::from_bytes(key))
            }
            // Another process won the race: use its key.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                let f = std::fs::File::open(path).map_err(io_err)?;
                Self::read(path, f)
            }
            Err(e) => Err(io_err(e)),
        }
    }

    fn read(path: &Path, mut f: std::fs::File) -> Result<Self, KeyFileError> {
        #[cfg(unix)]
        if let Ok(meta) = f.metadata() {
            use std::os::unix::fs::PermissionsExt;
            if meta.permissions().mode() & 0o077 != 0 {
                tracing::warn!(path = %path.display(), "webhook key file is readable by others than its owner; chmod 600 it");
            }
        }
        let mut buf = Vec::with_capacity(WEBHOOK_KEY_LEN);
        // One byte more than a key, to tell "too long" from "exact".
        (&mut f)
            .take(WEBHOOK_KEY_LEN as u64 + 1)
            .read_to_end(&mut buf)
            .map_err(|source| KeyFileError::Io {
                path: path.to_path_buf(),
                source,
            })?;
        let key: [u8; WEBHOOK_KEY_LEN] =
            buf.as_slice()
                .try_into()
                .map_err(|_| KeyFileError::WrongLength {
                    path: path.to_path_buf(),
                    len: buf.len(),
                })?;
        Ok(Self::from_bytes(key))
    }

    /// Encrypt `merchant`'s AppSecret for storage:
    /// `xc20p$<nonce hex>$<ciphertext+tag hex>`, with a fresh random 192-bit
    /// nonce (large enough that random nonces never repeat in practice). The
    /// appid is bound as associated data, so a value copied onto another
    /// merchant's row does not decrypt there.
    pub fn encrypt(&self, appid: &str, secret: &str) -> String {
        let mut nonce = [0u8; XNONCE_LEN];
        OsRng.fill_bytes(&mut nonce);
        let aad = associated_data(appid);
        // Encryption fails only for messages beyond ~256 GiB; an AppSecret
        // is 32 bytes, so the empty fallback is unreachable.
        let ct = self
            .cipher
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: secret.as_bytes(),
                    aad: &aad,
                },
            )
            .unwrap_or_default();
        format!("{ENC_SCHEME}${}${}", hex::encode(nonce), hex::encode(ct))
    }

    /// The AppSecret of `appid` from its stored encrypted form.
    pub fn decrypt(&self, appid: &str, stored: &str) -> Result<String, DecryptError> {
        let mut parts = stored.split('$');
        let (Some(ENC_SCHEME), Some(nonce_hex), Some(ct_hex), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(DecryptError::Malformed);
        };
        let nonce: [u8; XNONCE_LEN] =
            decode_lower_hex(nonce_hex).map_err(|_| DecryptError::Malformed)?;
        let ct = hex::decode(ct_hex).map_err(|_| DecryptError::Malformed)?;
        let aad = associated_data(appid);
        let plain = self
            .cipher
            .decrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: &ct,
                    aad: &aad,
                },
            )
            .map_err(|_| DecryptError::WrongKey)?;
        String::from_utf8(plain).map_err(|_| DecryptError::Malformed)
    }
}

impl fmt::Debug for WebhookKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("WebhookKey(..)")
    }
}

fn associated_data(appid: &str) -> Vec<u8> {
    format!("vendgate/appsecret/v1:{appid}").into_bytes()
}

fn random_key() -> [u8; WEBHOOK_KEY_LEN] {
    let mut key = [0u8; WEBHOOK_KEY_LEN];
    OsRng.fill_bytes(&mut key);
    key
}

/// Create (never overwrite) `path` with owner-only permissions, write
/// `contents` and sync it to disk.
fn write_private_file(path: &Path, contents: &[u8]) -> io::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(path)?;
    file.write_all(contents)?;
    file.sync_all()
}

/// Make a new directory entry durable (best effort: not every platform can
/// sync a directory).
fn sync_parent(path: &Path) {
    #[cfg(unix)]
    if let Some(dir) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    #[cfg(not(unix))]
    let _ = path;
}

fn hmac_digest(salt: &[u8; SALT_LEN], message: &str) -> [u8; DIGEST_LEN] {
    // HMAC accepts keys of any length, so `new_from_slice` cannot fail here;
    // the fallback below is unreachable but keeps this free of `expect`.
    let Ok(mut mac) = HmacSha256::new_from_slice(salt) else {
        return [0u8; DIGEST_LEN];
    };
    mac.update(message.as_bytes());
    mac.finalize().into_bytes().into()
}

fn decode_lower_hex<const N: usize>(s: &str) -> Result<[u8; N], MalformedSecretHash> {
    if s.len() != 2 * N || !s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return Err(MalformedSecretHash);
    }
    let mut out = [0u8; N];
    hex::decode_to_slice(s, &mut out).map_err(|_| MalformedSecretHash)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_secret_is_32_lowercase_hex() {
        let s = generate_secret();
        assert_eq!(s.len(), 32);
        assert!(s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')));
        assert_ne!(s, generate_secret());
    }

    #[test]
    fn generated_appid_shape() {
        let a = generate_appid();
        assert_eq!(a.len(), 16);
        assert!(a.starts_with("vg"));
        assert!(a[2..].bytes().all(|b| LOWER_ALNUM.contains(&b)));
        assert_ne!(a, generate_appid());
    }

    #[test]
    fn verify_accepts_the_secret_and_rejects_others() {
        let s = generate_secret();
        let h = SecretHash::new(&s);
        assert!(h.verify(&s));
        assert!(!h.verify(&generate_secret()));
        assert!(!h.verify(""));
        assert!(!h.verify(&s[..31]));
        assert!(!h.verify(&s.to_uppercase()));
    }

    fn at(s: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(s, 0).unwrap()
    }

    #[test]
    fn rotating_accepts_the_previous_secret_only_during_its_grace() {
        let (old, new) = (generate_secret(), generate_secret());
        let current = SecretHash::new(&new);
        let previous = PreviousSecret {
            hash: SecretHash::new(&old),
            expires_at: at(1_000),
        };
        let check = |candidate: &str, now| {
            verify_rotating(Some(&current), Some(&previous), candidate, at(now))
        };
        assert_eq!(check(&new, 999), SecretMatch::Current);
        assert_eq!(check(&old, 999), SecretMatch::Previous);
        assert_eq!(check("nope", 999), SecretMatch::None);
        // The expiry instant itself is already outside the grace.
        assert_eq!(check(&old, 1_000), SecretMatch::None);
        assert_eq!(check(&old, 5_000), SecretMatch::None);
        assert_eq!(check(&new, 5_000), SecretMatch::Current);
        // No rotation: only the current secret.
        assert_eq!(
            verify_rotating(Some(&current), None, &old, at(0)),
            SecretMatch::None
        );
        // An unknown account never matches, not even a previous secret.
        assert_eq!(
            verify_rotating(None, Some(&previous), &old, at(0)),
            SecretMatch::None
        );
        assert!(SecretMatch::Previous.is_match() && !SecretMatch::None.is_match());
    }

    #[test]
    fn previous_secret_uses_count_every_use_and_log_once_a_minute() {
        let uses = PreviousSecretUses::default();
        assert!(uses.record(AccountKind::Merchant, "vga"));
        assert!(!uses.record(AccountKind::Merchant, "vga"));
        assert!(uses.record(AccountKind::Machine, "00000001"));
        assert!(uses.record(AccountKind::Merchant, "vgb"));
        let load = |a: &AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
        assert_eq!((load(&uses.merchant), load(&uses.machine)), (3, 1));
    }

    #[test]
    fn empty_secret_round_trips() {
        let h = SecretHash::new("");
        assert!(h.verify(""));
        assert!(!h.verify(" "));
    }

    #[test]
    fn stored_form_round_trips() {
        let h = SecretHash::new("s3cret");
        let stored = h.as_str();
        assert!(stored.starts_with("hmac-sha256$"));
        let parts: Vec<&str> = stored.split('$').collect();
        assert_eq!(parts.len(), 3);
        assert_eq!(parts[1].len(), 32);
        assert_eq!(parts[2].len(), 64);
        let back = SecretHash::parse(stored).unwrap();
        assert_eq!(back.as_str(), stored);
        assert!(back.verify("s3cret"));
        assert!(!back.verify("s3cret "));
    }

    #[test]
    fn known_vector() {
        // HMAC-SHA256 with a zero key of 16 bytes and message "abc",
        // cross-checked with `openssl dgst -sha256 -mac HMAC -macopt hexkey:00..00`.
        let h = SecretHash::with_salt([0u8; SALT_LEN], "abc");
        let expected = format!("hmac-sha256${}${}", "00".repeat(16), KNOWN_DIGEST);
        assert_eq!(h.as_str(), expected);
    }
    const KNOWN_DIGEST: &str = "fd7adb152c05ef80dccf50a1fa4c05d5a3ec6da95575fc312ae7c5d091836351";

    #[test]
    fn hash_differs_per_call() {
        let a = SecretHash::new("same");
        let b = SecretHash::new("same");
        assert_ne!(a.as_str(), b.as_str());
        assert!(a.verify("same") && b.verify("same"));
    }

    #[test]
    fn parse_rejects_garbage() {
        let good = SecretHash::new("x").as_str().to_owned();
        let (salt, digest) = {
            let p: Vec<&str> = good.split('$').collect();
            (p[1].to_owned(), p[2].to_owned())
        };
        let bad = [
            String::new(),
            "garbage".to_owned(),
            "hmac-sha256$$".to_owned(),
            format!("hmac-sha256${salt}"),
            format!("hmac-sha1${salt}${digest}"),
            format!("HMAC-SHA256${salt}${digest}"),
            format!("hmac-sha256${salt}${digest}$"),
            format!("hmac-sha256${}${digest}", &salt[..30]),
            format!("hmac-sha256${salt}${}", &digest[..62]),
            format!("hmac-sha256${salt}${digest}00"),
            format!("hmac-sha256${}${digest}", salt.to_uppercase()),
            format!("hmac-sha256${}zz${digest}", &salt[..30]),
            format!(" hmac-sha256${salt}${digest}"),
        ];
        for b in &bad {
            assert_eq!(
                SecretHash::parse(b).err(),
                Some(MalformedSecretHash),
                "{b:?}"
            );
        }
        assert!(SecretHash::parse(&good).is_ok());
    }

    #[test]
    fn debug_hides_the_digest() {
        let h = SecretHash::new("hunter2");
        let shown = format!("{h:?}");
        assert_eq!(shown, "SecretHash(..)");
        let digest = h.as_str().rsplit('$').next().unwrap().to_owned();
        assert!(!shown.contains(&digest));
        assert!(!format!("{:?}", Some(h)).contains(&digest));
    }

    #[test]
    fn encrypted_secret_round_trips_and_is_bound_to_key_and_appid() {
        let key = WebhookKey::generate();
        let secret = generate_secret();
        let stored = key.encrypt("vga", &secret);
        let parts: Vec<&str> = stored.split('$').collect();
        assert_eq!(parts.len(), 3);
        assert_eq!(parts[0], "xc20p");
        assert_eq!(parts[1].len(), 48);
        assert!(!stored.contains(&secret));
        assert_eq!(key.decrypt("vga", &stored).unwrap(), secret);
        // Fresh nonce every time.
        assert_ne!(key.encrypt("vga", &secret), stored);
        assert_eq!(
            key.decrypt("vgb", &stored),
            Err(DecryptError::WrongKey),
            "copied onto another merchant"
        );
        assert_eq!(
            WebhookKey::generate().decrypt("vga", &stored),
            Err(DecryptError::WrongKey)
        );
        let mut tampered = stored.clone();
        let last = tampered.pop().unwrap();
        tampered.push(if last == '0' { '1' } else { '0' });
        assert_eq!(key.decrypt("vga", &tampered), Err(DecryptError::WrongKey));
        for bad in [
            "",
            "xc20p",
            "xc20p$$",
            "hmac-sha256$00$00",
            &format!("xc20p${}$zz", "00".repeat(24)),
            &format!("xc20p${}$00", "00".repeat(23)),
            &format!("{stored}$"),
        ] {
            assert_eq!(
                key.decrypt("vga", bad),
                Err(DecryptError::Malformed),
                "{bad:?}"
            );
        }
        assert_eq!(format!("{key:?}"), "WebhookKey(..)");
    }

    #[test]
    fn key_file_is_created_private_once_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub").join("webhook.key");
        let a = WebhookKey::load_or_create(&path).unwrap();
        assert_eq!(std::fs::read(&path).unwrap().len(), WEBHOOK_KEY_LEN);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let b = WebhookKey::load_or_create(&path).unwrap();
        let stored = a.encrypt("vga", "s");
        assert_eq!(b.decrypt("vga", &stored).unwrap(), "s");
        // No temporary files left behind.
        assert_eq!(
            std::fs::read_dir(path.parent().unwrap()).unwrap().count(),
            1
        );

        std::fs::write(&path, b"short").unwrap();
        let err = WebhookKey::load_or_create(&path).unwrap_err();
        assert!(
            matches!(err, KeyFileError::WrongLength { len: 5, .. }),
            "{err}"
        );
        std::fs::write(&path, [7u8; 33]).unwrap();
        assert!(matches!(
            WebhookKey::load_or_create(&path),
            Err(KeyFileError::WrongLength { len: 33, .. })
        ));
    }

    #[test]
    fn concurrent_first_starts_agree_on_one_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("webhook.key");
        let keys: Vec<WebhookKey> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8)
                .map(|_| s.spawn(|| WebhookKey::load_or_create(&path).unwrap()))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let stored = keys[0].encrypt("vga", "same");
        for k in &keys {
            assert_eq!(k.decrypt("vga", &stored).unwrap(), "same");
        }
    }

    #[test]
    fn verify_or_dummy_is_false_for_unknown_accounts() {
        assert!(!verify_or_dummy(None, ""));
        assert!(!verify_or_dummy(None, "anything"));
        let h = SecretHash::new("right");
        assert!(verify_or_dummy(Some(&h), "right"));
        assert!(!verify_or_dummy(Some(&h), "wrong"));
    }
}
