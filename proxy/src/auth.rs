//! Authentication: the cache first, the control plane on a miss. The
//! handler calls this; it never decides anything about users itself.

use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use envgate_proto::ops::record_phase;
use tonic::Code;

use crate::auth_cache::{AuthCache, CachedToken, Credential};
use crate::controlplane::{ControlPlane, Offered};

/// A user whose credential the control plane vouched for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authenticated {
    pub user: String,
    pub token: String,
    pub cache_hit: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthOutcome {
    Accepted(Authenticated),
    /// Wrong credential, unknown or disabled user.
    Rejected,
    /// The control plane could not answer; the client sees a rejection
    /// either way, but the log says why.
    Failed(String),
}

pub struct Authenticator {
    cache: Arc<AuthCache>,
    control_plane: ControlPlane,
}

pub fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

impl Authenticator {
    pub fn new(cache: Arc<AuthCache>, control_plane: ControlPlane) -> Self {
        Self {
            cache,
            control_plane,
        }
    }

    /// Checks a public key (wire bytes) for `user`. The caller has verified
    /// (or will verify, for an offer) that the client holds the private key.
    pub async fn public_key(
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
                    cache_hit: false,
                })
            }
            Err(status) if status.code() == Code::Unauthenticated => AuthOutcome::Rejected,
            Err(status) => AuthOutcome::Failed(format!("{}: {}", status.code(), status.message())),
        }
    }
}
