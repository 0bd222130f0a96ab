//! CONNECT authentication: decides whether a client is a machine (client id =
//! username = machine_no, password = its secret, or a verified client
//! certificate whose subject CN is the machine_no) or a service account, and
//! answers with the MQTT 3.1.1 CONNACK code otherwise. Secrets are compared
//! in constant time and never logged. During a rotation's grace period a
//! machine's previous secret is accepted too, and counted.

use std::collections::HashMap;
use std::sync::Arc;

use rumqttc::mqttbytes::v4::{ConnectReturnCode, Login};
use vendgate_proto::machine::MachineNo;

use super::acl::ClientClass;
use crate::passwords::ConfigPassword;
use crate::secrets::{
    verify_or_dummy, verify_rotating, AccountKind, PreviousSecretUses, SecretMatch,
};
use crate::storage::Storage;

/// Looks credentials up in storage (provisioned, rotated, disabled and
/// removed with the CLI while the gateway runs, so no cache that would need
/// invalidating: a change takes effect at the next CONNECT) and in config.
/// Connections already open are closed by the edge's periodic check
/// (`edge::enforce`).
pub struct Authenticator {
    store: Arc<dyn Storage>,
    config_services: HashMap<String, ConfigPassword>,
    previous_uses: Arc<PreviousSecretUses>,
}

/// Why a CONNECT was refused, for logs and metrics (never the secret).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    NoCredentials,
    UnknownMachine,
    WrongSecret,
    ClientIdMismatch,
    BadClientId,
    UnknownService,
    StorageUnavailable,
    /// A verified client certificate whose CN is not a machine number.
    BadCertificate,
    /// The right secret, but the machine is disabled (`vendgate machine
    /// disable`). Answered like a wrong secret.
    Disabled,
    /// The password check found no argon2 slot in time: not a wrong
    /// password, so not counted as one.
    Busy,
}

impl Refusal {
    pub fn code(self) -> ConnectReturnCode {
        match self {
            Self::BadClientId => ConnectReturnCode::BadClientId,
            Self::StorageUnavailable | Self::Busy => ConnectReturnCode::ServiceUnavailable,
            // An unknown account and a wrong secret look the same from outside.
            _ => ConnectReturnCode::NotAuthorized,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::NoCredentials => "no_credentials",
            Self::UnknownMachine => "unknown_machine",
            Self::WrongSecret => "wrong_secret",
            Self::ClientIdMismatch => "client_id_mismatch",
            Self::BadClientId => "bad_client_id",
            Self::UnknownService => "unknown_service",
            Self::StorageUnavailable => "storage_unavailable",
            Self::Busy => "busy",
            Self::BadCertificate => "bad_certificate",
            Self::Disabled => "disabled",
        }
    }

    /// Counts towards failed-auth throttling: every refusal a client can
    /// provoke without the secret, including those decided before the
    /// password is looked at (a machine-shaped client id with a service
    /// username), so none of them is free to repeat. Only storage trouble
    /// (ours), a client-id mismatch after the right secret (the holder of
    /// the secret, misconfigured) and a disabled machine (its retries would
    /// otherwise throttle its neighbours behind the same address) are not
    /// counted.
    pub fn is_credential_failure(self) -> bool {
        !matches!(
            self,
            Self::StorageUnavailable | Self::ClientIdMismatch | Self::Busy | Self::Disabled
        )
    }
}

impl Authenticator {
    /// `config_services` are (username, password) pairs from settings,
    /// parsed by start-up (argon2 PHC strings or plaintext).
    pub fn new(store: Arc<dyn Storage>, config_services: Vec<(String, ConfigPassword)>) -> Self {
        Self {
            store,
            config_services: config_services.into_iter().collect(),
            previous_uses: Arc::default(),
        }
    }

    /// Count machine CONNECTs with a previous secret into `uses` (metrics).
    pub fn count_previous_secret_uses(mut self, uses: Arc<PreviousSecretUses>) -> Self {
        self.previous_uses = uses;
        self
    }

    /// `cert_cn`: the subject CN of the client certificate the TLS handshake
    /// verified against `mqtt.tls.client_ca`, if any. It then decides alone.
    pub async fn authenticate(
        &self,
        client_id: &str,
        login: Option<&Login>,
        cert_cn: Option<&str>,
    ) -> Result<ClientClass, Refusal> {
        if let Some(cn) = cert_cn {
            return self.authenticate_certificate(client_id, login, cn).await;
        }
        let Some(login) = login else {
            return Err(Refusal::NoCredentials);
        };
        // A username that is a machine number is a machine; service usernames
        // can never take that shape (refused at provisioning and in config).
        if let Ok(machine_no) = login.username.parse::<MachineNo>() {
            // A removed machine is unknown (its secrets were revoked too).
            let stored = self
                .store
                .machine(&machine_no)
                .await
                .map_err(|_| Refusal::StorageUnavailable)?
                .filter(|m| m.removed_at.is_none());
            let matched = verify_rotating(
                stored.as_ref().map(|m| &m.secret_hash),
                stored.as_ref().and_then(|m| m.previous_secret.as_ref()),
                &login.password,
                chrono::Utc::now(),
            );
            let Some(stored) = stored else {
                return Err(Refusal::UnknownMachine);
            };
            if !matched.is_match() {
                return Err(Refusal::WrongSecret);
            }
            if client_id != login.username {
                return Err(Refusal::ClientIdMismatch);
            }
            if stored.disabled_at.is_some() {
                return Err(Refusal::Disabled);
            }
            if matched == SecretMatch::Previous {
                // Operators finish a rotation by checking who still uses
                // the old secret before the grace ends.
                if self
                    .previous_uses
                    .record(AccountKind::Machine, machine_no.as_str())
                {
                    tracing::info!(
                    machine_no = %machine_no,
                    grace_until = %stored.previous_secret.as_ref().map(|p| p.expires_at.to_rfc3339()).unwrap_or_default(),
                    "machine connected with its previous secret (rotation grace period)"
                    );
                }
            }
            return Ok(ClientClass::Machine(machine_no));
        }
        if looks_like_machine_id(&login.username) {
            // Digits but not exactly eight: a malformed machine number.
            verify_or_dummy(None, &login.password);
            return Err(Refusal::UnknownMachine);
        }
        // A service must not be able to take over a machine's session.
        if client_id.parse::<MachineNo>().is_ok() {
            return Err(Refusal::BadClientId);
        }
        let ok = if let Some(p) = self.config_services.get(&login.username) {
            p.check(&login.password).await.map_err(|_| Refusal::Busy)?
        } else {
            let stored = self
                .store
                .service(&login.username)
                .await
                .map_err(|_| Refusal::StorageUnavailable)?;
            let ok = verify_or_dummy(stored.as_ref().map(|s| &s.password_hash), &login.password);
            if stored.is_none() {
                return Err(Refusal::UnknownService);
            }
            ok
        };
        if ok {
            Ok(ClientClass::Service)
        } else {
            Err(Refusal::WrongSecret)
        }
    }
}

impl Authenticator {
    /// A machine by certificate: the CN is an 8-digit machine_no that is
    /// provisioned now, not removed and not disabled (removing or disabling
    /// the machine revokes the certificate's use),
    /// and the client id, and the username if one is sent, are that number.
    /// A password, if sent, is not needed and not checked.
    async fn authenticate_certificate(
        &self,
        client_id: &str,
        login: Option<&Login>,
        cn: &str,
    ) -> Result<ClientClass, Refusal> {
        let Ok(machine_no) = cn.parse::<MachineNo>() else {
            return Err(Refusal::BadCertificate);
        };
        if client_id != cn || login.is_some_and(|l| !l.username.is_empty() && l.username != cn) {
            return Err(Refusal::ClientIdMismatch);
        }
        let stored = self
            .store
            .machine(&machine_no)
            .await
            .map_err(|_| Refusal::StorageUnavailable)?;
        match stored {
            Some(m) if m.removed_at.is_none() => {
                if m.disabled_at.is_some() {
                    return Err(Refusal::Disabled);
                }
            }
            _ => return Err(Refusal::UnknownMachine),
        }
        Ok(ClientClass::Machine(machine_no))
    }
}

fn looks_like_machine_id(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())
}
