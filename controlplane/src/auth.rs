//! The Auth service: checks a password or public key once, then hands out a short-lived
//! signed token the proxy caches, so the credential store is off the hot path.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};
use envgate_proto::audit::{self, AuditLog, Event, Outcome};
use envgate_proto::token::{Claims, TokenKeys};
use envgate_proto::v1::auth_server::Auth;
use envgate_proto::v1::{
    AuthenticateRequest, AuthenticateResponse, CheckPublicKeyRequest, CheckPublicKeyResponse,
    authenticate_request,
};
use russh::keys::HashAlg;
use russh::keys::ssh_key::PublicKey;
use tonic::{Request, Response, Status};

use crate::error::AuthError;
use crate::guard::{self, ProxyIdentity};
use crate::model::{self, RevocationRecord, UserRecord};
use crate::store::{self, Store};

/// Failures allowed per user and per source address within `FAILURE_WINDOW`.
pub const MAX_FAILURES: usize = 10;
pub const FAILURE_WINDOW: Duration = Duration::from_secs(60);
/// Tracked keys beyond which idle entries are dropped, so a scan of many user names cannot
/// grow the table without bound.
const THROTTLE_TABLE_LIMIT: usize = 10_000;

pub enum Credential {
    Password(String),
    /// SSH wire format (RFC 4253 section 6.6), whose possession the proxy verified.
    PublicKey(Vec<u8>),
}

impl Credential {
    fn method(&self) -> audit::Method {
        match self {
            Credential::Password(_) => audit::Method::Password,
            Credential::PublicKey(_) => audit::Method::Publickey,
        }
    }

    /// `SHA256:…`, as `ssh-keygen -l` prints it, for the audit log.
    fn fingerprint(&self) -> Option<String> {
        match self {
            Credential::Password(_) => None,
            Credential::PublicKey(key) => Some(
                PublicKey::from_bytes(key)
                    .map(|k| k.fingerprint(HashAlg::Sha256).to_string())
                    .unwrap_or_else(|_| "unparsable key".to_owned()),
            ),
        }
    }
}

pub struct IssuedToken {
    pub token: String,
    pub user: String,
    pub expires_at: i64,
}

/// argon2id cost. Verification reads the cost from the stored hash, so changing it only
/// affects new hashes.
#[derive(Clone, Copy, Debug)]
pub struct HashCost {
    pub memory_kib: u32,
    pub iterations: u32,
}

impl Default for HashCost {
    /// argon2's recommended defaults (19 MiB, 2 passes).
    fn default() -> Self {
        Self {
            memory_kib: Params::DEFAULT_M_COST,
            iterations: Params::DEFAULT_T_COST,
        }
    }
}

impl HashCost {
    fn hasher(self) -> Argon2<'static> {
        let params = Params::new(self.memory_kib, self.iterations, 1, None)
            .expect("argon2 cost parameters are within bounds");
        Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
    }
}

/// Hashes a password with argon2id on the blocking pool (it takes tens of milliseconds).
pub async fn hash_password(password: String, cost: HashCost) -> Result<String, AuthError> {
    tokio::task::spawn_blocking(move || {
        let salt = SaltString::generate(&mut OsRng);
        cost.hasher()
            .hash_password(password.as_bytes(), &salt)
            .map(|h| h.to_string())
            .map_err(|_| AuthError::Hashing)
    })
    .await
    .map_err(|_| AuthError::Hashing)?
}

async fn verify_password(password: String, hash: String) -> bool {
    tokio::task::spawn_blocking(move || {
        PasswordHash::new(&hash)
            .map(|parsed| {
                Argon2::default()
                    .verify_password(password.as_bytes(), &parsed)
                    .is_ok()
            })
            .unwrap_or(false)
    })
    .await
    .unwrap_or(false)
}

/// Whether `key` (SSH wire format) is one of the user's authorized keys.
pub fn key_is_authorized(key: &[u8], authorized: &[String]) -> bool {
    let Ok(offered) = PublicKey::from_bytes(key) else {
        return false;
    };
    authorized
        .iter()
        .filter_map(|line| PublicKey::from_openssh(line.trim()).ok())
        .any(|k| k.key_data() == offered.key_data())
}

/// Recent failures per user and per source address (in memory: a replica only throttles
/// what it sees, which still bounds a guesser to `replicas × MAX_FAILURES` per window).
#[derive(Default)]
pub struct Throttle {
    failures: Mutex<HashMap<String, VecDeque<Instant>>>,
}

impl Throttle {
    /// `Err(seconds to wait)` when either the user or the address is over the limit.
    pub fn check(&self, keys: &[String]) -> Result<(), u64> {
        let now = Instant::now();
        let mut failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        let mut wait = None::<Duration>;
        for key in keys {
            if let Some(times) = failures.get_mut(key) {
                while times
                    .front()
                    .is_some_and(|t| now.duration_since(*t) >= FAILURE_WINDOW)
                {
                    times.pop_front();
                }
                if times.len() >= MAX_FAILURES {
                    let oldest = *times.front().expect("non-empty when over the limit");
                    let left = FAILURE_WINDOW.saturating_sub(now.duration_since(oldest));
                    wait = Some(wait.map_or(left, |w| w.max(left)));
                }
            }
        }
        match wait {
            Some(w) => Err(w.as_secs().max(1)),
            None => Ok(()),
        }
    }

    pub fn record_failure(&self, keys: &[String]) {
        let now = Instant::now();
        let mut failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        if failures.len() > THROTTLE_TABLE_LIMIT {
            failures.retain(|_, times| {
                times
                    .back()
                    .is_some_and(|t| now.duration_since(*t) < FAILURE_WINDOW)
            });
        }
        for key in keys {
            let times = failures.entry(key.clone()).or_default();
            times.push_back(now);
            if times.len() > MAX_FAILURES {
                times.pop_front();
            }
        }
    }
}

fn throttle_keys(user: &str, client_address: &str) -> Vec<String> {
    let mut keys = vec![format!("user:{user}")];
    if !client_address.is_empty() {
        let host = client_address
            .parse::<SocketAddr>()
            .map(|a| a.ip().to_string())
            .unwrap_or_else(|_| client_address.to_owned());
        keys.push(format!("addr:{host}"));
    }
    keys
}

pub struct Authenticator {
    store: Arc<dyn Store>,
    keys: Arc<TokenKeys>,
    token_ttl: Duration,
    throttle: Throttle,
    /// Verified against for unknown users, so their answer takes as long as a real one.
    dummy_hash: String,
    audit: AuditLog,
}

impl Authenticator {
    pub fn new(
        store: Arc<dyn Store>,
        keys: Arc<TokenKeys>,
        token_ttl: Duration,
        cost: HashCost,
        audit: AuditLog,
    ) -> Self {
        let salt = SaltString::generate(&mut OsRng);
        let dummy_hash = cost
            .hasher()
            .hash_password(b"envgate-dummy-password", &salt)
            .expect("hashing a constant succeeds")
            .to_string();
        Self {
            store,
            keys,
            token_ttl,
            throttle: Throttle::default(),
            dummy_hash,
            audit,
        }
    }

    /// Answers an SSH public-key offer: whether `key` is one of `username`'s authorized keys
    /// and the user may log in. Issues nothing and never touches the failure throttle: a
    /// client offers every key it holds, and only a signature proves possession.
    pub async fn check_public_key(&self, username: &str, key: &[u8]) -> Result<bool, AuthError> {
        if envgate_proto::names::validate_user(username).is_err() {
            return Ok(false);
        }
        let user =
            store::get_json::<UserRecord>(self.store.as_ref(), &model::user_key(username)).await?;
        Ok(user
            .is_some_and(|u| !u.value.disabled && key_is_authorized(key, &u.value.authorized_keys)))
    }

    /// `authenticate`, written to the audit log with the proxy that asked.
    pub async fn authenticate_for(
        &self,
        proxy: &str,
        username: &str,
        credential: Credential,
        client_address: &str,
    ) -> Result<IssuedToken, AuthError> {
        let (method, key_fingerprint) = (credential.method(), credential.fingerprint());
        let result = self
            .authenticate(username, credential, client_address)
            .await;
        let (outcome, reason) = match &result {
            Ok(_) => (Outcome::Success, None),
            Err(e) => (Outcome::Failure, Some(e.to_string())),
        };
        self.audit.record(Event::Credential {
            outcome,
            user: username.to_owned(),
            client: client_address.to_owned(),
            method,
            key_fingerprint,
            proxy: proxy.to_owned(),
            reason,
        });
        result
    }

    pub async fn authenticate(
        &self,
        username: &str,
        credential: Credential,
        client_address: &str,
    ) -> Result<IssuedToken, AuthError> {
        let keys = throttle_keys(username, client_address);
        self.throttle
            .check(&keys)
            .map_err(|retry_after_secs| AuthError::Throttled { retry_after_secs })?;
        // The revocation is read beside the user, not after the credential check: a login
        // waits for one etcd round trip, not two (see `issue`). One written during the check
        // refuses this token, as it refuses any issued in its second.
        let (user, not_before) = match envgate_proto::names::validate_user(username) {
            Ok(()) => {
                let (user_key, revocation_key) =
                    (model::user_key(username), model::revocation_key(username));
                let (user, revoked) = tokio::try_join!(
                    store::get_json::<UserRecord>(self.store.as_ref(), &user_key),
                    store::get_json::<RevocationRecord>(self.store.as_ref(), &revocation_key),
                )?;
                (user.map(|v| v.value), revoked.map(|r| r.value.not_before))
            }
            Err(_) => (None, None),
        };
        let accepted = match (&user, credential) {
            (Some(user), Credential::Password(password)) => match &user.password_hash {
                Some(hash) => verify_password(password, hash.clone()).await,
                None => {
                    verify_password(password, self.dummy_hash.clone()).await;
                    false
                }
            },
            (None, Credential::Password(password)) => {
                verify_password(password, self.dummy_hash.clone()).await;
                false
            }
            (Some(user), Credential::PublicKey(key)) => {
                key_is_authorized(&key, &user.authorized_keys)
            }
            (None, Credential::PublicKey(_)) => false,
        };
        let user = match user {
            Some(user) if accepted && !user.disabled => user,
            other => {
                let reason = match other {
                    None => "unknown user",
                    Some(u) if u.disabled => "user disabled",
                    Some(_) => "wrong credential",
                };
                tracing::info!(
                    user = username,
                    client = client_address,
                    reason,
                    "authentication refused"
                );
                self.throttle.record_failure(&keys);
                return Err(AuthError::Failed);
            }
        };
        Ok(self.issue(&user, not_before))
    }

    /// Claims are stamped to the second and a revocation refuses its own second too, so a
    /// token issued right after one carries `not_before` as its `iat`: otherwise the user's
    /// next login would get a token the control plane already refuses (and proxies cache).
    fn issue(&self, user: &UserRecord, not_before: Option<i64>) -> IssuedToken {
        let iat = model::now().max(not_before.unwrap_or(i64::MIN));
        let exp = iat + i64::try_from(self.token_ttl.as_secs()).unwrap_or(i64::MAX / 2);
        let claims = Claims {
            sub: user.name.clone(),
            groups: user.groups.clone(),
            iat,
            exp,
            jti: uuid::Uuid::new_v4().to_string(),
            aud: String::new(),
            kid: String::new(),
        };
        IssuedToken {
            token: self.keys.sign(claims),
            user: user.name.clone(),
            expires_at: exp,
        }
    }

    /// Checks signature, expiry and the user's revocation time.
    pub async fn verify_token(&self, token: &str) -> Result<Claims, AuthError> {
        let claims = self.keys.verify(token, model::now())?;
        let revoked = store::get_json::<RevocationRecord>(
            self.store.as_ref(),
            &model::revocation_key(&claims.sub),
        )
        .await?;
        if revoked.is_some_and(|r| claims.iat < r.value.not_before) {
            return Err(AuthError::Revoked);
        }
        Ok(claims)
    }
}

pub struct AuthService {
    auth: Arc<Authenticator>,
}

impl AuthService {
    pub fn new(auth: Arc<Authenticator>) -> Self {
        Self { auth }
    }
}

#[tonic::async_trait]
impl Auth for AuthService {
    async fn check_public_key(
        &self,
        request: Request<CheckPublicKeyRequest>,
    ) -> Result<Response<CheckPublicKeyResponse>, Status> {
        let req = request.into_inner();
        let acceptable = self
            .auth
            .check_public_key(&req.username, &req.public_key)
            .await?;
        Ok(Response::new(CheckPublicKeyResponse { acceptable }))
    }

    async fn authenticate(
        &self,
        request: Request<AuthenticateRequest>,
    ) -> Result<Response<AuthenticateResponse>, Status> {
        let started = Instant::now();
        let ProxyIdentity(proxy) = guard::proxy_of(&request)?;
        let req = request.into_inner();
        let credential = match req.credential {
            Some(authenticate_request::Credential::Password(p)) => Credential::Password(p),
            Some(authenticate_request::Credential::PublicKey(k)) => Credential::PublicKey(k),
            None => {
                return Err(AuthError::MissingCredential.into());
            }
        };
        let result = self
            .auth
            .authenticate_for(&proxy, &req.username, credential, &req.client_address)
            .await;
        let outcome = if result.is_ok() { "ok" } else { "refused" };
        metrics::counter!("envgate_controlplane_auth_total", "result" => outcome).increment(1);
        metrics::histogram!("envgate_controlplane_auth_seconds")
            .record(started.elapsed().as_secs_f64());
        let issued = result?;
        Ok(Response::new(AuthenticateResponse {
            token: issued.token,
            user: issued.user,
            expires_at: issued.expires_at,
        }))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::store::MemoryStore;
    use russh::keys::ssh_key::PrivateKey;
    use russh::keys::ssh_key::private::Ed25519Keypair;

    pub const SEED: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";
    /// Cheap hashes keep debug-build tests fast; verification reads the cost from the hash.
    pub const TEST_COST: HashCost = HashCost {
        memory_kib: 256,
        iterations: 1,
    };

    pub fn test_keys() -> Arc<TokenKeys> {
        let key = envgate_proto::token::TokenKey::from_hex_seed(SEED).unwrap();
        Arc::new(TokenKeys::new(vec![key], envgate_proto::token::audience("test")).unwrap())
    }

    pub fn keypair() -> (PrivateKey, String) {
        let key = PrivateKey::from(Ed25519Keypair::from_seed(&rand::random::<[u8; 32]>()));
        let line = key.public_key().to_openssh().unwrap();

        (key, line)
    }

    async fn setup() -> (Arc<MemoryStore>, Authenticator, PrivateKey) {
        let store = Arc::new(MemoryStore::new());
        let (key, line) = keypair();
        let alice = UserRecord {
            name: "alice".into(),
            password_hash: Some(hash_password("s3cret".into(), TEST_COST).await.unwrap()),
            authorized_keys: vec![line],
            groups: vec!["students".into()],
            ..Default::default()
        };
        let bob = UserRecord {
            name: "bob".into(),
            password_hash: Some(hash_password("s3cret".into(), TEST_COST).await.unwrap()),
            disabled: true,
            ..Default::default()
        };
        for user in [alice, bob] {
            store::put_json(store.as_ref(), &model::user_key(&user.name), &user, None)
                .await
                .unwrap();
        }
        let auth = Authenticator::new(
            store.clone(),
            test_keys(),
            Duration::from_secs(300),
            TEST_COST,
            AuditLog::in_memory(),
        );
        (store, auth, key)
    }

    fn wire(key: &PrivateKey) -> Vec<u8> {
        key.public_key().to_bytes().unwrap()
    }

    #[tokio::test]
    async fn passwords_are_checked() {
        let (_, auth, _) = setup().await;
        let ok = auth
            .authenticate("alice", Credential::Password("s3cret".into()), "10.0.0.1:5")
            .await
            .unwrap();
        assert_eq!(ok.user, "alice");
        let claims = auth.verify_token(&ok.token).await.unwrap();
        assert_eq!(
            (claims.sub.as_str(), claims.groups.as_slice()),
            ("alice", ["students".to_owned()].as_slice())
        );
        assert!(matches!(
            auth.authenticate("alice", Credential::Password("wrong".into()), "10.0.0.1:5")
                .await,
            Err(AuthError::Failed)
        ));
    }

    #[tokio::test]
    async fn keys_are_matched_by_key_data() {
        let (_, auth, key) = setup().await;
        assert!(
            auth.authenticate("alice", Credential::PublicKey(wire(&key)), "")
                .await
                .is_ok()
        );
        let (other, _) = keypair();
        assert!(matches!(
            auth.authenticate("alice", Credential::PublicKey(wire(&other)), "")
                .await,
            Err(AuthError::Failed)
        ));
        assert!(matches!(
            auth.authenticate("alice", Credential::PublicKey(b"garbage".to_vec()), "")
                .await,
            Err(AuthError::Failed)
        ));
    }

    #[tokio::test]
    async fn unknown_and_disabled_users_are_refused_alike() {
        let (_, auth, key) = setup().await;
        for (user, credential) in [
            ("nobody", Credential::Password("s3cret".into())),
            ("nobody", Credential::PublicKey(wire(&key))),
            ("bob", Credential::Password("s3cret".into())),
            ("Not A Name", Credential::Password("x".into())),
        ] {
            let err = auth.authenticate(user, credential, "").await.err().unwrap();
            assert_eq!(
                Status::from(err).code(),
                tonic::Code::Unauthenticated,
                "{user}"
            );
        }
    }

    #[tokio::test]
    async fn repeated_failures_are_throttled_per_user_and_per_address() {
        let (_, auth, _) = setup().await;
        for i in 0..MAX_FAILURES {
            let addr = format!("10.0.0.{i}:22");
            assert!(matches!(
                auth.authenticate("alice", Credential::Password("wrong".into()), &addr)
                    .await,
                Err(AuthError::Failed)
            ));
        }
        // Now even the right password from a fresh address is refused for this user.
        let err = auth
            .authenticate("alice", Credential::Password("s3cret".into()), "10.9.9.9:1")
            .await
            .err()
            .unwrap();
        let status = Status::from(err);
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        assert!(
            status.message().contains("retry in"),
            "{}",
            status.message()
        );

        // Per address: many users guessed from one address.
        for i in 0..MAX_FAILURES {
            let _ = auth
                .authenticate(
                    &format!("u{i}"),
                    Credential::Password("x".into()),
                    "192.0.2.7:1000",
                )
                .await;
        }
        let err = auth
            .authenticate("nobody", Credential::Password("x".into()), "192.0.2.7:2000")
            .await
            .err()
            .unwrap();
        assert!(matches!(err, AuthError::Throttled { .. }), "{err}");
    }

    #[tokio::test]
    async fn tokens_are_refused_when_forged_expired_or_revoked() {
        let (store, auth, _) = setup().await;
        let issued = auth
            .authenticate("alice", Credential::Password("s3cret".into()), "")
            .await
            .unwrap();
        assert!(matches!(
            auth.verify_token("nonsense").await,
            Err(AuthError::BadToken(_))
        ));
        let expired = test_keys().sign(Claims {
            sub: "alice".into(),
            groups: vec![],
            iat: 1,
            exp: 2,
            jti: "x".into(),
            aud: String::new(),
            kid: String::new(),
        });
        assert!(matches!(
            auth.verify_token(&expired).await,
            Err(AuthError::BadToken(_))
        ));

        let revocation = RevocationRecord {
            not_before: model::now() + 1,
        };
        store::put_json(
            store.as_ref(),
            &model::revocation_key("alice"),
            &revocation,
            None,
        )
        .await
        .unwrap();
        let err = auth.verify_token(&issued.token).await.err().unwrap();
        assert!(matches!(err, AuthError::Revoked));
        assert_eq!(Status::from(err).code(), tonic::Code::Unauthenticated);

        // Logging in again right away (the revocation's own second) yields a usable token.
        let fresh = auth
            .authenticate("alice", Credential::Password("s3cret".into()), "")
            .await
            .unwrap();
        auth.verify_token(&fresh.token)
            .await
            .expect("a token issued after the revocation is accepted");
    }
}
