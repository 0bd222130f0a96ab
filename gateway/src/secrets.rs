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
//! The one exception is a service password set in the configuration file by an
//! operator; that file is trusted and its passwords are expected to be
//! generated too.

use std::fmt;

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
    fn verify_or_dummy_is_false_for_unknown_accounts() {
        assert!(!verify_or_dummy(None, ""));
        assert!(!verify_or_dummy(None, "anything"));
        let h = SecretHash::new("right");
        assert!(verify_or_dummy(Some(&h), "right"));
        assert!(!verify_or_dummy(Some(&h), "wrong"));
    }
}
