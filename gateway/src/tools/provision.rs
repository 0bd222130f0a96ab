//! Provisioning commands (`vendgate merchant add`, `machine add`, `machine
//! list`, `service add`, `machine rotate-secret`, `merchant rotate-secret`)
//! and the lifecycle ones (`machine disable|enable|remove|transfer`,
//! `merchant disable|enable|set`, `service list|remove`): create accounts
//! with fresh secrets, give them new ones, or change them, in the same
//! database the running gateway reads, so no restart is needed. The running
//! gateway notices a lifecycle change within a bound stated on each command. Each secret
//! is shown exactly once, on `out` or in the secrets file; only its hash is
//! stored, except a merchant's AppSecret, which is also stored encrypted
//! under the webhook key so that webhooks can be signed with it.

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use vendgate_proto::machine::MachineNo;

use crate::secrets::{generate_appid, generate_secret, random_lower_alnum, SecretHash, WebhookKey};
use crate::storage::{MachineChange, NewMachine, NewMerchant, NewService, Storage, StorageError};

/// Random characters after "svc-" in a service username.
const SERVICE_SUFFIX_LEN: usize = 12;

/// Why a provisioning command failed. Messages are meant for the operator.
#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    #[error("unknown merchant {0:?}")]
    UnknownMerchant(String),
    #[error("unknown machine {0}")]
    UnknownMachine(MachineNo),
    #[error("grace period {0:?} is too long")]
    GraceTooLong(Duration),
    #[error("machine {0} is already provisioned")]
    DuplicateMachine(MachineNo),
    #[error("at least one machine in {first}..={last} is already provisioned; nothing was added")]
    DuplicateMachines { first: MachineNo, last: MachineNo },
    #[error("invalid notify url {0:?}: expected http://host/... or https://host/...")]
    InvalidNotifyUrl(String),
    #[error("notify url refused: {0}")]
    RefusedNotifyUrl(String),
    #[error("machine {machine} has {count} order(s) in flight (awaiting_payment, dispatching or dispensing); try again when they have ended")]
    OrdersInFlight { machine: MachineNo, count: u64 },
    #[error("unknown service account {0:?}")]
    UnknownService(String),
    #[error("the name must not be empty or contain control characters")]
    InvalidName,
    #[error("count must be at least 1")]
    ZeroCount,
    #[error("{count} machines starting at {first} would go past 99999999")]
    RangeOverflow { first: MachineNo, count: u32 },
    #[error("secrets file {} already exists; refusing to overwrite secrets issued before", .0.display())]
    SecretsFileExists(PathBuf),
    #[error("writing the secrets file {}", .path.display())]
    SecretsFile {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The account was committed, but printing its one-time secret failed.
    #[error("the account was stored, but its credentials could not be printed")]
    CredentialsNotShown(#[source] io::Error),
    #[error("writing the output")]
    Output(#[source] io::Error),
    #[error(transparent)]
    Storage(StorageError),
}

/// Create a merchant; prints `appid=…` and `appsecret=…`, one per line.
/// `key` encrypts the AppSecret's signing copy (the gateway's webhook key).
pub async fn merchant_add(
    store: &dyn Storage,
    key: &WebhookKey,
    name: &str,
    notify_url: Option<String>,
    out: &mut impl Write,
) -> Result<(), ProvisionError> {
    let name = valid_name(name)?;
    if let Some(url) = &notify_url {
        if !is_http_url(url) {
            return Err(ProvisionError::InvalidNotifyUrl(url.clone()));
        }
    }
    let appsecret = generate_secret();
    let appid = generate_appid();
    let merchant = store
        .create_merchant(NewMerchant {
            name,
            notify_url,
            appsecret_enc: Some(key.encrypt(&appid, &appsecret)),
            appid,
            appsecret_hash: SecretHash::new(&appsecret),
        })
        .await
        .map_err(ProvisionError::Storage)?;
    writeln!(out, "appid={}", merchant.appid).map_err(ProvisionError::CredentialsNotShown)?;
    writeln!(out, "appsecret={appsecret}").map_err(ProvisionError::CredentialsNotShown)?;
    out.flush().map_err(ProvisionError::CredentialsNotShown)
}

/// Provision one machine for `merchant_appid`; prints `secret=…`.
pub async fn machine_add(
    store: &dyn Storage,
    merchant_appid: &str,
    machine_no: MachineNo,
    out: &mut impl Write,
) -> Result<(), ProvisionError> {
    let secret = generate_secret();
    store
        .create_machine(NewMachine {
            machine_no,
            merchant_appid: merchant_appid.to_owned(),
            secret_hash: SecretHash::new(&secret),
        })
        .await
        .map_err(|e| match e {
            StorageError::UnknownMerchant => {
                ProvisionError::UnknownMerchant(merchant_appid.to_owned())
            }
            StorageError::Duplicate(_) => ProvisionError::DuplicateMachine(machine_no),
            e => ProvisionError::Storage(e),
        })?;
    writeln!(out, "secret={secret}").map_err(ProvisionError::CredentialsNotShown)?;
    out.flush().map_err(ProvisionError::CredentialsNotShown)
}

/// Provision `count` machines numbered from `first` upwards for
/// `merchant_appid`, all or nothing. Their secrets go to `secrets_out` as
/// `machine_no,secret` lines (mode 0600 on unix); `out` gets one summary line
/// `added=N first=… last=…`.
///
/// Order matters here: the secrets file is written and synced *before* the
/// machines are committed, so a committed machine always has its secret on
/// disk; if the commit fails the file is removed again. An existing file is
/// never overwritten, since it may hold the only copy of earlier secrets.
pub async fn machine_add_bulk(
    store: &dyn Storage,
    merchant_appid: &str,
    first: MachineNo,
    count: u32,
    secrets_out: &Path,
    out: &mut impl Write,
) -> Result<(), ProvisionError> {
    if count == 0 {
        return Err(ProvisionError::ZeroCount);
    }
    let last = first
        .to_u32()
        .checked_add(count - 1)
        .and_then(MachineNo::from_u32)
        .ok_or(ProvisionError::RangeOverflow { first, count })?;
    // Checked up front so a typo does not leave a secrets file behind; the
    // foreign key still guards the insert itself.
    if store
        .merchant(merchant_appid)
        .await
        .map_err(ProvisionError::Storage)?
        .is_none()
    {
        return Err(ProvisionError::UnknownMerchant(merchant_appid.to_owned()));
    }

    let mut lines = String::with_capacity(count as usize * 42);
    let mut machines = Vec::with_capacity(count as usize);
    for n in first.to_u32()..=last.to_u32() {
        // n runs from first to last, and `last` was built by from_u32, so
        // every n in between fits as well; skipping is unreachable.
        let Some(machine_no) = MachineNo::from_u32(n) else {
            continue;
        };
        let secret = generate_secret();
        lines.push_str(machine_no.as_str());
        lines.push(',');
        lines.push_str(&secret);
        lines.push('\n');
        machines.push(NewMachine {
            machine_no,
            merchant_appid: merchant_appid.to_owned(),
            secret_hash: SecretHash::new(&secret),
        });
    }
    let added = machines.len();

    let path = secrets_out.to_path_buf();
    let written = {
        let path = path.clone();
        tokio::task::spawn_blocking(move || write_secrets_file(&path, lines.as_bytes())).await
    };
    match written {
        Ok(Ok(())) => {}
        Ok(Err(e)) if e.kind() == io::ErrorKind::AlreadyExists => {
            return Err(ProvisionError::SecretsFileExists(path));
        }
        Ok(Err(source)) => return Err(ProvisionError::SecretsFile { path, source }),
        Err(join) => {
            return Err(ProvisionError::SecretsFile {
                path,
                source: io::Error::other(join),
            })
        }
    }

    if let Err(e) = store.create_machines(machines).await {
        // Nothing was committed, so these secrets are worthless; removing the
        // file is best effort (the error below is what the operator needs).
        let _ = std::fs::remove_file(&path);
        return Err(match e {
            StorageError::UnknownMerchant => {
                ProvisionError::UnknownMerchant(merchant_appid.to_owned())
            }
            StorageError::Duplicate(_) => ProvisionError::DuplicateMachines { first, last },
            e => ProvisionError::Storage(e),
        });
    }
    writeln!(out, "added={added} first={first} last={last}").map_err(ProvisionError::Output)?;
    out.flush().map_err(ProvisionError::Output)
}

/// One tab-separated line per machine, ordered by number:
/// `machine_no merchant online|offline last_seen state`, with `last_seen`
/// RFC 3339 or `-` and `state` one of `active`, `disabled`, `removed`
/// (removed machines stay listed: their orders refer to them).
pub async fn machine_list(store: &dyn Storage, out: &mut impl Write) -> Result<(), ProvisionError> {
    let machines = store
        .list_machines(None)
        .await
        .map_err(ProvisionError::Storage)?;
    let mut buf = io::BufWriter::new(out);
    for m in machines {
        let last_seen = m
            .last_seen
            .map(|t| t.to_rfc3339_opts(SecondsFormat::Secs, true))
            .unwrap_or_else(|| "-".to_owned());
        let presence = if m.online { "online" } else { "offline" };
        let state = if m.removed_at.is_some() {
            "removed"
        } else if m.disabled_at.is_some() {
            "disabled"
        } else {
            "active"
        };
        writeln!(
            buf,
            "{}\t{}\t{presence}\t{last_seen}\t{state}",
            m.machine_no, m.merchant_appid
        )
        .map_err(ProvisionError::Output)?;
    }
    buf.flush().map_err(ProvisionError::Output)
}

/// Create a service account; prints `username=svc-…` and `password=…`.
pub async fn service_add(
    store: &dyn Storage,
    name: &str,
    out: &mut impl Write,
) -> Result<(), ProvisionError> {
    let name = valid_name(name)?;
    let password = generate_secret();
    // The "svc-" prefix keeps a service username from ever looking like a
    // machine number (all digits), which the edge would take for a machine.
    let account = store
        .create_service(NewService {
            name,
            username: format!("svc-{}", random_lower_alnum(SERVICE_SUFFIX_LEN)),
            password_hash: SecretHash::new(&password),
        })
        .await
        .map_err(ProvisionError::Storage)?;
    writeln!(out, "username={}", account.username).map_err(ProvisionError::CredentialsNotShown)?;
    writeln!(out, "password={password}").map_err(ProvisionError::CredentialsNotShown)?;
    out.flush().map_err(ProvisionError::CredentialsNotShown)
}

/// Give `machine_no` a new secret; the one it replaces keeps working for
/// `grace` (zero: it stops at once). Prints `secret=…` and
/// `previous_valid_until=…` (RFC 3339, or `none`).
///
/// Rotating again while a grace runs drops the secret before the previous
/// one at once: at most two secrets are valid at any time, the newest and
/// the one it replaced.
pub async fn machine_rotate_secret(
    store: &dyn Storage,
    machine_no: MachineNo,
    grace: Duration,
    out: &mut impl Write,
) -> Result<(), ProvisionError> {
    let until = grace_until(grace)?;
    let secret = generate_secret();
    let found = store
        .rotate_machine_secret(&machine_no, &SecretHash::new(&secret), until)
        .await
        .map_err(ProvisionError::Storage)?;
    if !found {
        return Err(ProvisionError::UnknownMachine(machine_no));
    }
    writeln!(out, "secret={secret}").map_err(ProvisionError::CredentialsNotShown)?;
    print_until(out, until)
}

/// Give merchant `appid` a new AppSecret, with the same grace rule as
/// [`machine_rotate_secret`] for API authentication. Webhooks are signed
/// with the new AppSecret from the commit on (its encrypted copy under `key`
/// changes in the same statement), including retries of older events.
/// Prints `appid=…`, `appsecret=…` and `previous_valid_until=…`.
pub async fn merchant_rotate_secret(
    store: &dyn Storage,
    key: &WebhookKey,
    appid: &str,
    grace: Duration,
    out: &mut impl Write,
) -> Result<(), ProvisionError> {
    let until = grace_until(grace)?;
    let appsecret = generate_secret();
    let found = store
        .rotate_merchant_secret(
            appid,
            &SecretHash::new(&appsecret),
            &key.encrypt(appid, &appsecret),
            until,
        )
        .await
        .map_err(ProvisionError::Storage)?;
    if !found {
        return Err(ProvisionError::UnknownMerchant(appid.to_owned()));
    }
    writeln!(out, "appid={appid}").map_err(ProvisionError::CredentialsNotShown)?;
    writeln!(out, "appsecret={appsecret}").map_err(ProvisionError::CredentialsNotShown)?;
    print_until(out, until)
}

/// `machine disable` (`disabled`) or `machine enable`: prints
/// `machine=… state=disabled|enabled`. A disabled machine is refused at
/// CONNECT at once; a live connection is closed within
/// [`crate::edge::enforce::ENFORCE_INTERVAL`]; orders for it answer like an
/// unknown machine within [`crate::orders::OWNER_CACHE_TTL`].
pub async fn machine_set_disabled(
    store: &dyn Storage,
    machine_no: MachineNo,
    disabled: bool,
    out: &mut impl Write,
) -> Result<(), ProvisionError> {
    let found = store
        .set_machine_disabled(&machine_no, disabled.then(Utc::now))
        .await
        .map_err(ProvisionError::Storage)?;
    if !found {
        return Err(ProvisionError::UnknownMachine(machine_no));
    }
    let state = if disabled { "disabled" } else { "enabled" };
    writeln!(out, "machine={machine_no} state={state}").map_err(ProvisionError::Output)?;
    out.flush().map_err(ProvisionError::Output)
}

/// `machine remove`: refused while the machine has orders in flight;
/// otherwise its secrets are revoked (replaced by the hash of a secret
/// nobody is shown) and it is marked removed. Its orders stay, readable by
/// their merchant. Prints `machine=… state=removed`.
pub async fn machine_remove(
    store: &dyn Storage,
    machine_no: MachineNo,
    out: &mut impl Write,
) -> Result<(), ProvisionError> {
    let revoked = SecretHash::new(&generate_secret());
    match store
        .remove_machine(&machine_no, &revoked, Utc::now())
        .await
        .map_err(ProvisionError::Storage)?
    {
        MachineChange::Done => {}
        MachineChange::NotFound => return Err(ProvisionError::UnknownMachine(machine_no)),
        MachineChange::OrdersInFlight(count) => {
            return Err(ProvisionError::OrdersInFlight {
                machine: machine_no,
                count,
            })
        }
    }
    writeln!(out, "machine={machine_no} state=removed").map_err(ProvisionError::Output)?;
    out.flush().map_err(ProvisionError::Output)
}

/// `machine transfer`: give the machine to merchant `to`, refused while it
/// has orders in flight. Its past orders stay the previous owner's. The
/// order path follows within [`crate::orders::OWNER_CACHE_TTL`]. Prints
/// `machine=… merchant=…`.
pub async fn machine_transfer(
    store: &dyn Storage,
    machine_no: MachineNo,
    to: &str,
    out: &mut impl Write,
) -> Result<(), ProvisionError> {
    match store.transfer_machine(&machine_no, to).await {
        Ok(MachineChange::Done) => {}
        Ok(MachineChange::NotFound) => return Err(ProvisionError::UnknownMachine(machine_no)),
        Ok(MachineChange::OrdersInFlight(count)) => {
            return Err(ProvisionError::OrdersInFlight {
                machine: machine_no,
                count,
            })
        }
        Err(StorageError::UnknownMerchant) => {
            return Err(ProvisionError::UnknownMerchant(to.to_owned()))
        }
        Err(e) => return Err(ProvisionError::Storage(e)),
    }
    writeln!(out, "machine={machine_no} merchant={to}").map_err(ProvisionError::Output)?;
    out.flush().map_err(ProvisionError::Output)
}

/// `merchant disable` / `merchant enable`: a disabled merchant's API calls
/// are answered like a wrong AppSecret (within the storage's one-second
/// merchant cache) and its webhooks are held, not attempted, until enabled.
/// Prints `appid=… state=disabled|enabled`.
pub async fn merchant_set_disabled(
    store: &dyn Storage,
    appid: &str,
    disabled: bool,
    out: &mut impl Write,
) -> Result<(), ProvisionError> {
    let found = store
        .set_merchant_disabled(appid, disabled.then(Utc::now))
        .await
        .map_err(ProvisionError::Storage)?;
    if !found {
        return Err(ProvisionError::UnknownMerchant(appid.to_owned()));
    }
    let state = if disabled { "disabled" } else { "enabled" };
    writeln!(out, "appid={appid} state={state}").map_err(ProvisionError::Output)?;
    out.flush().map_err(ProvisionError::Output)
}

/// `merchant set --notify-url`: checked as `merchant add` checks it, and by
/// the notifier's own rules for what needs no DNS (the scheme, an IP-literal
/// host that is loopback, private, link-local or a metadata address unless
/// `allow_private`). None clears it. Prints `appid=… notify_url=…|none`.
pub async fn merchant_set_notify_url(
    store: &dyn Storage,
    appid: &str,
    notify_url: Option<&str>,
    allow_private: bool,
    out: &mut impl Write,
) -> Result<(), ProvisionError> {
    if let Some(url) = notify_url {
        if !is_http_url(url) {
            return Err(ProvisionError::InvalidNotifyUrl(url.to_owned()));
        }
        crate::notifier::target::check_url(url, allow_private)
            .map_err(|e| ProvisionError::RefusedNotifyUrl(e.0))?;
    }
    let found = store
        .set_merchant_notify_url(appid, notify_url)
        .await
        .map_err(ProvisionError::Storage)?;
    if !found {
        return Err(ProvisionError::UnknownMerchant(appid.to_owned()));
    }
    writeln!(
        out,
        "appid={appid} notify_url={}",
        notify_url.unwrap_or("none")
    )
    .map_err(ProvisionError::Output)?;
    out.flush().map_err(ProvisionError::Output)
}

/// `service list`: one tab-separated line per account, by username:
/// `username name created_at` (RFC 3339). Accounts from the config file
/// are not listed (they live there).
pub async fn service_list(store: &dyn Storage, out: &mut impl Write) -> Result<(), ProvisionError> {
    let services = store
        .list_services()
        .await
        .map_err(ProvisionError::Storage)?;
    let mut buf = io::BufWriter::new(out);
    for s in services {
        writeln!(
            buf,
            "{}\t{}\t{}",
            s.username,
            s.name,
            s.created_at.to_rfc3339_opts(SecondsFormat::Secs, true)
        )
        .map_err(ProvisionError::Output)?;
    }
    buf.flush().map_err(ProvisionError::Output)
}

/// `service remove`: the account is deleted; new CONNECTs with it are
/// refused at once and its live connections are closed within
/// [`crate::edge::enforce::ENFORCE_INTERVAL`]. Prints `username=… removed`.
pub async fn service_remove(
    store: &dyn Storage,
    username: &str,
    out: &mut impl Write,
) -> Result<(), ProvisionError> {
    let found = store
        .remove_service(username)
        .await
        .map_err(ProvisionError::Storage)?;
    if !found {
        return Err(ProvisionError::UnknownService(username.to_owned()));
    }
    writeln!(out, "username={username} state=removed").map_err(ProvisionError::Output)?;
    out.flush().map_err(ProvisionError::Output)
}

/// When a previous secret stops working; None for a zero grace.
fn grace_until(grace: Duration) -> Result<Option<DateTime<Utc>>, ProvisionError> {
    if grace.is_zero() {
        return Ok(None);
    }
    chrono::Duration::from_std(grace)
        .ok()
        .and_then(|g| Utc::now().checked_add_signed(g))
        .map(Some)
        .ok_or(ProvisionError::GraceTooLong(grace))
}

fn print_until(out: &mut impl Write, until: Option<DateTime<Utc>>) -> Result<(), ProvisionError> {
    let until = until.map_or_else(
        || "none".to_owned(),
        |t| t.to_rfc3339_opts(SecondsFormat::Secs, true),
    );
    writeln!(out, "previous_valid_until={until}").map_err(ProvisionError::CredentialsNotShown)?;
    out.flush().map_err(ProvisionError::CredentialsNotShown)
}

/// Trimmed; not empty and free of control characters (tabs and newlines would
/// break line-oriented output).
fn valid_name(name: &str) -> Result<String, ProvisionError> {
    let name = name.trim();
    if name.is_empty() || name.chars().any(char::is_control) {
        return Err(ProvisionError::InvalidName);
    }
    Ok(name.to_owned())
}

/// A deliberately small check, enough to catch typos: `http://` or
/// `https://` (any case), a non-empty host, an optional numeric port, no
/// whitespace or control characters anywhere.
fn is_http_url(url: &str) -> bool {
    if url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return false;
    }
    let lower = url.to_ascii_lowercase();
    let rest = if lower.starts_with("http://") {
        &url["http://".len()..]
    } else if lower.starts_with("https://") {
        &url["https://".len()..]
    } else {
        return false;
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let host_port = authority.rsplit('@').next().unwrap_or("");
    let (host, port) = if let Some(v6) = host_port.strip_prefix('[') {
        match v6.split_once(']') {
            Some((host, after)) => match after {
                "" => (host, None),
                p => match p.strip_prefix(':') {
                    Some(port) => (host, Some(port)),
                    None => return false,
                },
            },
            None => return false,
        }
    } else {
        match host_port.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (host_port, None),
        }
    };
    let port_ok = port.is_none_or(|p| !p.is_empty() && p.parse::<u16>().is_ok());
    // What is accepted here must also be what the notifier can parse at
    // delivery (its target check only ever runs then).
    !host.is_empty() && port_ok && url::Url::parse(url).is_ok()
}

/// Create (never overwrite) `path` with owner-only permissions, write
/// `contents` and sync it to disk.
fn write_secrets_file(path: &Path, contents: &[u8]) -> io::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(path)?;
    let result = file.write_all(contents).and_then(|()| file.sync_all());
    if result.is_err() {
        // A partial secrets file is useless; the machines are not created.
        let _ = std::fs::remove_file(path);
    }
    result
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use tempfile::TempDir;

    use super::*;
    use crate::secrets::{verify_rotating, SecretMatch};
    use crate::storage::open_sqlite;

    async fn store() -> (TempDir, Arc<dyn Storage>) {
        let dir = tempfile::tempdir().unwrap();
        let store = open_sqlite(&dir.path().join("vendgate.db")).await.unwrap();
        (dir, store)
    }

    fn no(s: &str) -> MachineNo {
        s.parse().unwrap()
    }

    /// Parse `key=value` lines.
    fn kv(out: &[u8]) -> Vec<(String, String)> {
        String::from_utf8(out.to_vec())
            .unwrap()
            .lines()
            .map(|l| {
                let (k, v) = l.split_once('=').unwrap();
                (k.to_owned(), v.to_owned())
            })
            .collect()
    }

    fn key() -> WebhookKey {
        WebhookKey::from_bytes([7; 32])
    }

    async fn add_merchant(store: &dyn Storage) -> (String, String) {
        let mut out = Vec::new();
        merchant_add(store, &key(), "Acme", None, &mut out)
            .await
            .unwrap();
        let kv = kv(&out);
        (kv[0].1.clone(), kv[1].1.clone())
    }

    #[tokio::test]
    async fn merchant_add_prints_credentials_that_verify() {
        let (_dir, store) = store().await;
        let mut out = Vec::new();
        merchant_add(
            store.as_ref(),
            &key(),
            " Acme Vending ",
            Some("https://merchant.example/hook?x=1".into()),
            &mut out,
        )
        .await
        .unwrap();
        let kv = kv(&out);
        assert_eq!(kv.len(), 2);
        assert_eq!(kv[0].0, "appid");
        assert_eq!(kv[1].0, "appsecret");
        let (appid, secret) = (&kv[0].1, &kv[1].1);
        assert!(appid.starts_with("vg") && appid.len() == 16);
        assert_eq!(secret.len(), 32);

        let m = store.merchant(appid).await.unwrap().unwrap();
        assert_eq!(m.name, "Acme Vending");
        assert_eq!(
            m.notify_url.as_deref(),
            Some("https://merchant.example/hook?x=1")
        );
        assert!(m.appsecret_hash.verify(secret));
        assert!(!m.appsecret_hash.as_str().contains(secret.as_str()));
        // The signing copy opens with the webhook key, for this merchant only.
        let enc = m.appsecret_enc.expect("encrypted AppSecret");
        assert!(!enc.contains(secret.as_str()));
        assert_eq!(key().decrypt(appid, &enc).unwrap(), *secret);
        assert!(WebhookKey::from_bytes([8; 32])
            .decrypt(appid, &enc)
            .is_err());
    }

    #[tokio::test]
    async fn merchant_add_rejects_bad_input() {
        let (_dir, store) = store().await;
        for url in [
            "ftp://x.example/",
            "http://",
            "https:///path",
            "example.com/hook",
            "http://host:port/",
            "http://host:99999/",
            "http://ho st/",
            "http://[::1/",
            "",
        ] {
            let mut out = Vec::new();
            let err = merchant_add(store.as_ref(), &key(), "Acme", Some(url.into()), &mut out)
                .await
                .unwrap_err();
            assert!(
                matches!(err, ProvisionError::InvalidNotifyUrl(_)),
                "{url}: {err}"
            );
            assert!(out.is_empty());
        }
        for name in ["", "  ", "a\tb"] {
            let err = merchant_add(store.as_ref(), &key(), name, None, &mut Vec::new())
                .await
                .unwrap_err();
            assert!(matches!(err, ProvisionError::InvalidName), "{name:?}");
        }
        assert!(store.list_merchants().await.unwrap().is_empty());
    }

    #[test]
    fn http_url_check() {
        for ok in [
            "http://a",
            "https://hooks.example.com",
            "HTTPS://hooks.example.com:8443/v1/notify",
            "http://user:pw@10.0.0.1:80/x#frag",
            "http://[::1]:8080/",
            "http://[::1]",
        ] {
            assert!(is_http_url(ok), "{ok}");
        }
        for bad in [
            "http://:80/",
            "http://host:/",
            "http://[::1]x/",
            "https://\u{7}x",
        ] {
            assert!(!is_http_url(bad), "{bad}");
        }
    }

    #[tokio::test]
    async fn machine_add_prints_a_secret_that_verifies() {
        let (_dir, store) = store().await;
        let (appid, _) = add_merchant(store.as_ref()).await;
        let mut out = Vec::new();
        machine_add(store.as_ref(), &appid, no("00000001"), &mut out)
            .await
            .unwrap();
        let kv = kv(&out);
        assert_eq!(kv.len(), 1);
        assert_eq!(kv[0].0, "secret");
        let m = store.machine(&no("00000001")).await.unwrap().unwrap();
        assert_eq!(m.merchant_appid, appid);
        assert!(m.secret_hash.verify(&kv[0].1));
        assert!(!m.online);
    }

    #[tokio::test]
    async fn machine_add_errors() {
        let (_dir, store) = store().await;
        let err = machine_add(
            store.as_ref(),
            "vgnosuchmerchant",
            no("00000001"),
            &mut Vec::new(),
        )
        .await
        .unwrap_err();
        assert!(matches!(err, ProvisionError::UnknownMerchant(ref a) if a == "vgnosuchmerchant"));
        assert_eq!(err.to_string(), "unknown merchant \"vgnosuchmerchant\"");

        let (appid, _) = add_merchant(store.as_ref()).await;
        machine_add(store.as_ref(), &appid, no("00000001"), &mut Vec::new())
            .await
            .unwrap();
        let mut out = Vec::new();
        let err = machine_add(store.as_ref(), &appid, no("00000001"), &mut out)
            .await
            .unwrap_err();
        assert!(matches!(err, ProvisionError::DuplicateMachine(m) if m == no("00000001")));
        assert_eq!(err.to_string(), "machine 00000001 is already provisioned");
        assert!(
            out.is_empty(),
            "no secret printed for a machine that was not added"
        );
    }

    fn read_secrets(path: &Path) -> Vec<(MachineNo, String)> {
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(|l| {
                let (m, s) = l.split_once(',').unwrap();
                (no(m), s.to_owned())
            })
            .collect()
    }

    #[tokio::test]
    async fn machine_add_bulk_writes_a_private_secrets_file() {
        let (dir, store) = store().await;
        let (appid, _) = add_merchant(store.as_ref()).await;
        let path = dir.path().join("secrets.csv");
        let mut out = Vec::new();
        machine_add_bulk(store.as_ref(), &appid, no("00000998"), 5, &path, &mut out)
            .await
            .unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "added=5 first=00000998 last=00001002\n"
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let secrets = read_secrets(&path);
        let nos: Vec<&str> = secrets.iter().map(|(m, _)| m.as_str()).collect();
        assert_eq!(
            nos,
            ["00000998", "00000999", "00001000", "00001001", "00001002"]
        );
        for (m, secret) in &secrets {
            let stored = store.machine(m).await.unwrap().unwrap();
            assert_eq!(stored.merchant_appid, appid);
            assert!(stored.secret_hash.verify(secret));
        }
    }

    #[tokio::test]
    async fn machine_add_bulk_is_all_or_nothing() {
        let (dir, store) = store().await;
        let (appid, _) = add_merchant(store.as_ref()).await;
        machine_add(store.as_ref(), &appid, no("00000105"), &mut Vec::new())
            .await
            .unwrap();
        let path = dir.path().join("secrets.csv");
        let mut out = Vec::new();
        let err = machine_add_bulk(store.as_ref(), &appid, no("00000100"), 10, &path, &mut out)
            .await
            .unwrap_err();
        assert!(
            matches!(err, ProvisionError::DuplicateMachines { .. }),
            "{err}"
        );
        assert_eq!(
            err.to_string(),
            "at least one machine in 00000100..=00000109 is already provisioned; nothing was added"
        );
        assert!(out.is_empty());
        assert!(!path.exists(), "secrets of machines not added are removed");
        let machines = store.list_machines(None).await.unwrap();
        assert_eq!(machines.len(), 1);
    }

    #[tokio::test]
    async fn machine_add_bulk_rejects_bad_arguments() {
        let (dir, store) = store().await;
        let (appid, _) = add_merchant(store.as_ref()).await;
        let path = dir.path().join("secrets.csv");

        let err = machine_add_bulk(
            store.as_ref(),
            &appid,
            no("00000001"),
            0,
            &path,
            &mut Vec::new(),
        )
        .await
        .unwrap_err();
        assert!(matches!(err, ProvisionError::ZeroCount));

        let err = machine_add_bulk(
            store.as_ref(),
            &appid,
            no("99999998"),
            3,
            &path,
            &mut Vec::new(),
        )
        .await
        .unwrap_err();
        assert!(matches!(err, ProvisionError::RangeOverflow { .. }), "{err}");
        // The very last numbers are fine.
        machine_add_bulk(
            store.as_ref(),
            &appid,
            no("99999998"),
            2,
            &path,
            &mut Vec::new(),
        )
        .await
        .unwrap();

        // An existing secrets file is never overwritten.
        let before = std::fs::read(&path).unwrap();
        let err = machine_add_bulk(
            store.as_ref(),
            &appid,
            no("00000001"),
            1,
            &path,
            &mut Vec::new(),
        )
        .await
        .unwrap_err();
        assert!(matches!(err, ProvisionError::SecretsFileExists(_)), "{err}");
        assert_eq!(std::fs::read(&path).unwrap(), before);
        assert!(store.machine(&no("00000001")).await.unwrap().is_none());

        let other = dir.path().join("other.csv");
        let err = machine_add_bulk(
            store.as_ref(),
            "vgnope",
            no("00000001"),
            1,
            &other,
            &mut Vec::new(),
        )
        .await
        .unwrap_err();
        assert!(matches!(err, ProvisionError::UnknownMerchant(_)), "{err}");
        assert!(!other.exists());
    }

    #[tokio::test]
    async fn machine_list_shows_presence_and_state() {
        let (_dir, store) = store().await;
        let (appid, _) = add_merchant(store.as_ref()).await;
        let mut out = Vec::new();
        machine_list(store.as_ref(), &mut out).await.unwrap();
        assert!(out.is_empty());

        for m in ["00000002", "00000001"] {
            machine_add(store.as_ref(), &appid, no(m), &mut Vec::new())
                .await
                .unwrap();
        }
        let at = chrono::DateTime::parse_from_rfc3339("2025-03-01T12:34:56.789Z")
            .unwrap()
            .with_timezone(&chrono::Utc);
        store
            .record_presence(&no("00000002"), true, 7, at)
            .await
            .unwrap();
        machine_list(store.as_ref(), &mut out).await.unwrap();
        assert_eq!(
            String::from_utf8(std::mem::take(&mut out)).unwrap(),
            format!(
                "00000001\t{appid}\toffline\t-\tactive\n\
                 00000002\t{appid}\tonline\t2025-03-01T12:34:56Z\tactive\n"
            )
        );
        machine_set_disabled(store.as_ref(), no("00000001"), true, &mut Vec::new())
            .await
            .unwrap();
        machine_remove(store.as_ref(), no("00000002"), &mut Vec::new())
            .await
            .unwrap();
        machine_list(store.as_ref(), &mut out).await.unwrap();
        let states: Vec<String> = String::from_utf8(out)
            .unwrap()
            .lines()
            .map(|l| l.rsplit('\t').next().unwrap_or("").to_owned())
            .collect();
        assert_eq!(states, ["disabled", "removed"]);
    }

    /// `machine rotate-secret` for machine 00000001; its `key=value` output.
    async fn rotate_00000001(store: &dyn Storage, grace: Duration) -> Vec<(String, String)> {
        let mut out = Vec::new();
        machine_rotate_secret(store, no("00000001"), grace, &mut out)
            .await
            .unwrap();
        kv(&out)
    }

    #[tokio::test]
    async fn machine_rotation_keeps_the_old_secret_for_the_grace_only() {
        let (_dir, store) = store().await;
        let (appid, _) = add_merchant(store.as_ref()).await;
        let mut out = Vec::new();
        machine_add(store.as_ref(), &appid, no("00000001"), &mut out)
            .await
            .unwrap();
        let first = kv(&out)[0].1.clone();

        let kv1 = rotate_00000001(store.as_ref(), Duration::from_secs(3600)).await;
        assert_eq!(kv1[0].0, "secret");
        assert_eq!(kv1[1].0, "previous_valid_until");
        let second = kv1[0].1.clone();
        let m = store.machine(&no("00000001")).await.unwrap().unwrap();
        let check = |m: &crate::storage::Machine, s: &str| {
            verify_rotating(
                Some(&m.secret_hash),
                m.previous_secret.as_ref(),
                s,
                Utc::now(),
            )
        };
        assert_eq!(check(&m, &second), SecretMatch::Current);
        assert_eq!(check(&m, &first), SecretMatch::Previous);

        // Rotating again during the grace: the first secret is gone at once.
        let third = rotate_00000001(store.as_ref(), Duration::from_secs(3600)).await[0]
            .1
            .clone();
        let m = store.machine(&no("00000001")).await.unwrap().unwrap();
        assert_eq!(check(&m, &third), SecretMatch::Current);
        assert_eq!(check(&m, &second), SecretMatch::Previous);
        assert_eq!(check(&m, &first), SecretMatch::None);

        // A grace that has already ended, as storage sees it.
        let past = Utc::now() - chrono::Duration::seconds(1);
        store
            .rotate_machine_secret(&no("00000001"), &SecretHash::new("fourth"), Some(past))
            .await
            .unwrap();
        let m = store.machine(&no("00000001")).await.unwrap().unwrap();
        assert_eq!(check(&m, "fourth"), SecretMatch::Current);
        assert_eq!(check(&m, &third), SecretMatch::None);

        // Zero grace: no previous secret at all.
        assert_eq!(
            rotate_00000001(store.as_ref(), Duration::ZERO).await[1],
            ("previous_valid_until".into(), "none".into())
        );
        let m = store.machine(&no("00000001")).await.unwrap().unwrap();
        assert!(m.previous_secret.is_none());
        assert_eq!(check(&m, "fourth"), SecretMatch::None);

        let err = machine_rotate_secret(
            store.as_ref(),
            no("00000002"),
            Duration::ZERO,
            &mut Vec::new(),
        )
        .await
        .unwrap_err();
        assert!(matches!(err, ProvisionError::UnknownMachine(_)), "{err}");
        let err = machine_rotate_secret(
            store.as_ref(),
            no("00000001"),
            Duration::MAX,
            &mut Vec::new(),
        )
        .await
        .unwrap_err();
        assert!(matches!(err, ProvisionError::GraceTooLong(_)), "{err}");
    }

    #[tokio::test]
    async fn merchant_rotation_replaces_the_signing_copy_too() {
        let (_dir, store) = store().await;
        let (appid, old) = add_merchant(store.as_ref()).await;
        let mut out = Vec::new();
        merchant_rotate_secret(
            store.as_ref(),
            &key(),
            &appid,
            Duration::from_secs(60),
            &mut out,
        )
        .await
        .unwrap();
        let kv = kv(&out);
        assert_eq!(kv[0], ("appid".into(), appid.clone()));
        assert_eq!(kv[1].0, "appsecret");
        let new = kv[1].1.clone();
        assert_ne!(new, old);
        let m = store.merchant(&appid).await.unwrap().unwrap();
        let enc = m.appsecret_enc.as_deref().unwrap();
        assert_eq!(key().decrypt(&appid, enc).unwrap(), new);
        let check = |s: &str| {
            verify_rotating(
                Some(&m.appsecret_hash),
                m.previous_appsecret.as_ref(),
                s,
                Utc::now(),
            )
        };
        assert_eq!(check(&new), SecretMatch::Current);
        assert_eq!(check(&old), SecretMatch::Previous);

        let err = merchant_rotate_secret(
            store.as_ref(),
            &key(),
            "vgnope",
            Duration::ZERO,
            &mut Vec::new(),
        )
        .await
        .unwrap_err();
        assert!(matches!(err, ProvisionError::UnknownMerchant(_)), "{err}");
    }

    /// A writer that always fails, like a closed pipe.
    struct Broken;

    impl Write for Broken {
        fn write(&mut self, _: &[u8]) -> io::Result<usize> {
            Err(io::ErrorKind::BrokenPipe.into())
        }

        fn flush(&mut self) -> io::Result<()> {
            Err(io::ErrorKind::BrokenPipe.into())
        }
    }

    #[tokio::test]
    async fn output_failures_say_what_happened() {
        let (_dir, store) = store().await;
        let err = merchant_add(store.as_ref(), &key(), "Acme", None, &mut Broken)
            .await
            .unwrap_err();
        assert!(
            matches!(err, ProvisionError::CredentialsNotShown(_)),
            "{err}"
        );
        assert_eq!(store.list_merchants().await.unwrap().len(), 1);
        let appid = store.list_merchants().await.unwrap()[0].appid.clone();
        let err = machine_add(store.as_ref(), &appid, no("00000001"), &mut Broken)
            .await
            .unwrap_err();
        assert!(
            matches!(err, ProvisionError::CredentialsNotShown(_)),
            "{err}"
        );
        let err = machine_list(store.as_ref(), &mut Broken).await.unwrap_err();
        assert!(matches!(err, ProvisionError::Output(_)), "{err}");
    }

    #[tokio::test]
    async fn service_add_prints_credentials_that_verify() {
        let (_dir, store) = store().await;
        let mut out = Vec::new();
        service_add(store.as_ref(), "billing bridge", &mut out)
            .await
            .unwrap();
        let kv = kv(&out);
        assert_eq!(kv[0].0, "username");
        assert_eq!(kv[1].0, "password");
        let (username, password) = (&kv[0].1, &kv[1].1);
        assert!(username.starts_with("svc-"));
        assert_eq!(username.len(), 4 + SERVICE_SUFFIX_LEN);
        assert!(username.parse::<MachineNo>().is_err());
        let s = store.service(username).await.unwrap().unwrap();
        assert_eq!(s.name, "billing bridge");
        assert!(s.password_hash.verify(password));

        let err = service_add(store.as_ref(), "", &mut Vec::new())
            .await
            .unwrap_err();
        assert!(matches!(err, ProvisionError::InvalidName));
    }
}
