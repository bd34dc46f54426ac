//! Authentication: the cache first, the control plane on a miss. The
//! handler calls this; it never decides anything about users itself.

use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use envgate_proto::audit::{AuditLog, Event, Method, Outcome};
use envgate_proto::ops::record_phase;
use russh::keys::{HashAlg, PublicKey};
use tonic::Code;

use crate::auth_cache::{AuthCache, CachedToken, Credential};
use crate::controlplane::{ControlPlane, Offered};

/// A user whose credential the control plane vouched for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authenticated {
    pub user: String,
    pub token: String,
    /// When the token expires, Unix seconds: a placement cached on this proxy is used for the
    /// user no longer than that.
    pub expires_at: i64,
    pub cache_hit: bool,
}

#[derive(Debug, Clone)]
pub enum AuthOutcome {
    Accepted(Authenticated),
    /// Wrong credential, unknown or disabled user.
    Rejected,
    /// The control plane could not answer; the client sees a rejection either way, but the
    /// log says why (and keyboard-interactive can tell the user).
    Failed(tonic::Status),
}

/// The answer to a public-key offer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OfferOutcome {
    /// The client may sign with the key.
    Acceptable,
    /// The key is not the user's, but the control plane takes certificates, and russh offers
    /// a certificate's key like a plain one: the client may sign, and only a certificate
    /// goes on to the control plane (`ConnectionHandler::auth_publickey` refuses the key).
    CertificateOnly,
    Refused,
    /// The control plane could not answer.
    Failed(String),
}

pub struct Authenticator {
    cache: Arc<AuthCache>,
    control_plane: ControlPlane,
    audit: AuditLog,
}

/// Who tried to log in, how and from where: the facts of one audit record.
#[derive(Debug, Clone)]
pub struct Attempt {
    /// The user name (or, for a malformed login name, what the client sent).
    pub user: String,
    pub client: String,
    pub connection: String,
    pub method: Method,
    /// The public key in SSH wire format, for its fingerprint.
    pub key: Option<Vec<u8>>,
}

/// `SHA256:…` as `ssh-keygen -l` prints it.
pub fn fingerprint(key: &[u8]) -> String {
    PublicKey::from_bytes(key)
        .map(|k| k.fingerprint(HashAlg::Sha256).to_string())
        .unwrap_or_else(|_| "unparsable key".to_owned())
}

pub fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

impl Authenticator {
    pub fn new(cache: Arc<AuthCache>, control_plane: ControlPlane, audit: AuditLog) -> Self {
        Self {
            cache,
            control_plane,
            audit,
        }
    }

    /// Writes a login's outcome to the audit log.
    pub fn record(
        &self,
        attempt: &Attempt,
        outcome: Outcome,
        cached: bool,
        reason: Option<String>,
    ) {
        self.audit.record(Event::Login {
            outcome,
            user: attempt.user.clone(),
            client: attempt.client.clone(),
            method: attempt.method,
            key_fingerprint: attempt.key.as_deref().map(fingerprint),
            proxy: self.control_plane.proxy_id().to_owned(),
            connection: attempt.connection.clone(),
            cached,
            reason,
        });
    }

    /// Answers a public-key *offer*: whether the client may go on to sign with `key`. A
    /// token cached for (user, key) answers at once; otherwise the control plane says whether
    /// the key is the user's, and no token is issued until the signature is verified
    /// (`public_key_verified`).
    pub async fn public_key_offered(
        &self,
        user: &str,
        key: &[u8],
        client_address: &str,
        connection_id: &str,
    ) -> OfferOutcome {
        let credential = Credential::PublicKey(key.to_vec());
        if self.cache.get(user, &credential, unix_now()).is_some() {
            return OfferOutcome::Acceptable;
        }
        let started = Instant::now();
        let result = self
            .control_plane
            .check_public_key(user, key, client_address, connection_id)
            .await;
        record_phase("auth_offer", started.elapsed(), &[]);
        match result {
            Ok(answer) if answer.acceptable => OfferOutcome::Acceptable,
            Ok(answer) if answer.certificates => OfferOutcome::CertificateOnly,
            Ok(_) => OfferOutcome::Refused,
            Err(status) => OfferOutcome::Failed(format!("{}: {}", status.code(), status.message())),
        }
    }

    /// Authenticates with a public key (wire bytes) whose signature over this SSH session
    /// russh has verified: proof that the client holds the private key. Only now may the
    /// control plane mint a token for it.
    pub async fn public_key_verified(
        &self,
        user: &str,
        key: &[u8],
        client_address: &str,
        connection_id: &str,
    ) -> AuthOutcome {
        let credential = Credential::PublicKey(key.to_vec());
        self.check(
            user,
            credential,
            Offered::PublicKey(key.to_vec()),
            client_address,
            connection_id,
        )
        .await
    }

    /// Authenticates with an OpenSSH certificate (wire bytes) whose certified key russh saw
    /// sign. Never answered from the cache: the control plane checks revocation and expiry
    /// at every login.
    pub async fn certificate_verified(
        &self,
        user: &str,
        certificate: Vec<u8>,
        client_address: &str,
        connection_id: &str,
    ) -> AuthOutcome {
        let started = Instant::now();
        let result = self
            .control_plane
            .authenticate(
                user,
                &Offered::Certificate(certificate),
                client_address,
                connection_id,
            )
            .await;
        record_phase("auth", started.elapsed(), &[("cache", "miss".to_owned())]);
        match result {
            Ok(response) => AuthOutcome::Accepted(Authenticated {
                user: response.user,
                token: response.token,
                expires_at: response.expires_at,
                cache_hit: false,
            }),
            Err(status) if status.code() == Code::Unauthenticated => AuthOutcome::Rejected,
            Err(status) => AuthOutcome::Failed(status),
        }
    }

    pub async fn password(
        &self,
        user: &str,
        password: &str,
        client_address: &str,
        connection_id: &str,
    ) -> AuthOutcome {
        let credential = self.cache.password_credential(user, password);
        self.check(
            user,
            credential,
            Offered::Password(password.to_owned()),
            client_address,
            connection_id,
        )
        .await
    }

    async fn check(
        &self,
        user: &str,
        credential: Credential,
        offered: Offered,
        client_address: &str,
        connection_id: &str,
    ) -> AuthOutcome {
        let started = Instant::now();
        if let Some(hit) = self.cache.get(user, &credential, unix_now()) {
            record_phase("auth", started.elapsed(), &[("cache", "hit".to_owned())]);
            return AuthOutcome::Accepted(Authenticated {
                user: hit.user,
                token: hit.token,
                expires_at: hit.expires_at,
                cache_hit: true,
            });
        }
        let result = self
            .control_plane
            .authenticate(user, &offered, client_address, connection_id)
            .await;
        record_phase("auth", started.elapsed(), &[("cache", "miss".to_owned())]);
        match result {
            Ok(response) => {
                let token = CachedToken {
                    token: response.token.clone(),
                    user: response.user.clone(),
                    expires_at: response.expires_at,
                };
                self.cache.insert(user, credential, token);
                AuthOutcome::Accepted(Authenticated {
                    user: response.user,
                    token: response.token,
                    expires_at: response.expires_at,
                    cache_hit: false,
                })
            }
            Err(status) if status.code() == Code::Unauthenticated => AuthOutcome::Rejected,
            Err(status) => AuthOutcome::Failed(status),
        }
    }
}
