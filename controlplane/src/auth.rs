//! The Auth service: checks a password or public key once, then hands out a short-lived
//! signed token the proxy caches, so the credential store is off the hot path. Password
//! attempts are counted before they are hashed (`throttle.rs`) and hashed on a bounded pool
//! (`hashing.rs`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{PasswordHash, PasswordHasher, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};
use envgate_proto::audit::{self, AuditLog, Event, Outcome};
use envgate_proto::token::{Claims, TokenKeys};
use envgate_proto::v1::auth_server::Auth;
use envgate_proto::v1::{
    AuthenticateRequest, AuthenticateResponse, CheckPublicKeyRequest, CheckPublicKeyResponse,
    authenticate_request,
};
use russh::keys::HashAlg;
use russh::keys::ssh_key::{Certificate, PublicKey};
use tonic::{Request, Response, Status};

use crate::error::AuthError;
use crate::guard::{self, ProxyIdentity};
use crate::hashing::HashPool;
use crate::identity::{self, SOURCE_LDAP, SOURCE_WEBHOOK, Sources};
use crate::model::{self, RevocationRecord, UserRecord};
use crate::sshca::{self, CertificateAuthority, Origin, Refusal};
use crate::store::{self, Store};
use crate::throttle::{Clock, SystemClock, Throttle, ThrottleError, ThrottlePolicy};
use crate::verified::VerifiedTokens;

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

/// argon2id hashing and checking on a bounded pool of threads (`hashing.rs`). Cheap to clone.
#[derive(Clone)]
pub struct Hasher {
    cost: HashCost,
    pool: HashPool,
}

impl Hasher {
    pub fn new(cost: HashCost, pool: HashPool) -> Self {
        Self { cost, pool }
    }

    /// A new password's PHC string (the admin API's PutUser).
    pub async fn hash(&self, password: String) -> Result<String, AuthError> {
        let cost = self.cost;
        self.pool
            .run(move || {
                let salt = SaltString::generate(&mut OsRng);
                cost.hasher()
                    .hash_password(password.as_bytes(), &salt)
                    .map(|h| h.to_string())
            })
            .await?
            .map_err(|_| AuthError::BadHash)
    }

    /// Whether `password` matches `hash`; the cost comes from the hash itself.
    async fn verify(&self, password: String, hash: String) -> Result<bool, AuthError> {
        Ok(self
            .pool
            .run(move || {
                ARGON2_MEMORY
                    .with(|memory| verify_in(password.as_bytes(), &hash, &mut memory.borrow_mut()))
            })
            .await?)
    }

    /// How many hashes were computed, for tests and the benchmark.
    pub fn computed(&self) -> u64 {
        self.pool.computed()
    }
}

thread_local! {
    /// argon2's working memory (19 MiB at the default cost), kept by each hasher thread and
    /// reused: allocating it per check left every thread's malloc arena fragmented at
    /// ~60 MiB under a storm of bad passwords.
    static ARGON2_MEMORY: std::cell::RefCell<Vec<argon2::Block>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

/// Verifies `password` against the PHC string `phc` in `memory`, which grows to the hash's
/// cost once and is kept.
fn verify_in(password: &[u8], phc: &str, memory: &mut Vec<argon2::Block>) -> bool {
    let Ok(parsed) = PasswordHash::new(phc) else {
        return false;
    };
    let (Ok(algorithm), Ok(params)) = (
        Algorithm::try_from(parsed.algorithm),
        Params::try_from(&parsed),
    ) else {
        return false;
    };
    let version = match parsed.version.map(Version::try_from) {
        None => Version::default(),
        Some(Ok(version)) => version,
        Some(Err(_)) => return false,
    };
    let (Some(salt), Some(expected)) = (parsed.salt, parsed.hash) else {
        return false;
    };
    let mut salt_bytes = [0u8; 64];
    let Ok(salt) = salt.decode_b64(&mut salt_bytes) else {
        return false;
    };
    let blocks = params.block_count();
    if memory.len() < blocks {
        memory.resize(blocks, argon2::Block::default());
    }
    let mut computed = vec![0u8; expected.len()];
    Argon2::new(algorithm, version, params)
        .hash_password_into_with_memory(password, salt, &mut computed, &mut memory[..blocks])
        .is_ok()
        && computed
            .iter()
            .zip(expected.as_bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
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

/// Whether LDAP and the webhook may speak for a user: nobody has the name yet, or they made
/// its record. A local record (the admin API's) decides alone; one made by another source
/// (a certificate) is checked as it is.
fn speaks_for(user: Option<&UserRecord>) -> bool {
    user.is_none_or(|u| u.source == SOURCE_LDAP || u.source == SOURCE_WEBHOOK)
}

pub struct Authenticator {
    store: Arc<dyn Store>,
    keys: Arc<TokenKeys>,
    /// Tokens whose signature this replica already checked (`verified.rs`).
    verified: VerifiedTokens,
    token_ttl: Duration,
    throttle: Arc<Throttle>,
    hasher: Hasher,
    /// Verified against for unknown users, so their answer takes as long as a real one.
    dummy_hash: String,
    audit: AuditLog,
    /// LDAP and the webhooks (docs/identity.md); none unless configured.
    identity: Arc<Sources>,
    /// Who certificate logins are trusted from (none by default).
    certificates: Arc<CertificateAuthority>,
}

/// How password attempts are limited: the failure counts and the hashing pool.
pub struct PasswordLimits {
    pub throttle: ThrottlePolicy,
    pub hasher: Hasher,
    pub clock: Box<dyn Clock>,
}

impl PasswordLimits {
    pub fn new(throttle: ThrottlePolicy, hasher: Hasher) -> Self {
        Self {
            throttle,
            hasher,
            clock: Box::new(SystemClock),
        }
    }
}

impl Authenticator {
    pub fn new(
        store: Arc<dyn Store>,
        keys: Arc<TokenKeys>,
        token_ttl: Duration,
        limits: PasswordLimits,
        audit: AuditLog,
    ) -> Self {
        let salt = SaltString::generate(&mut OsRng);
        let dummy_hash = limits
            .hasher
            .cost
            .hasher()
            .hash_password(b"envgate-dummy-password", &salt)
            .expect("hashing a constant succeeds")
            .to_string();
        Self {
            throttle: Arc::new(Throttle::new(store.clone(), limits.throttle, limits.clock)),
            store,
            keys,
            verified: VerifiedTokens::default(),
            token_ttl,
            hasher: limits.hasher,
            dummy_hash,
            audit,
            identity: Arc::default(),
            certificates: Arc::default(),
        }
    }

    /// Asks `sources` about users the admin API does not own (docs/identity.md, "Precedence").
    pub fn with_identity(mut self, sources: Arc<Sources>) -> Self {
        self.identity = sources;
        self
    }

    /// The environment the config webhook chooses for `user`, if one is configured and
    /// answers; a failure is logged and chooses nothing (the next rule decides).
    pub async fn configured_environment(&self, user: &str, client_address: &str) -> Option<String> {
        let webhook = self.identity.config.as_ref()?;
        match webhook.environment(user, client_address).await {
            Ok(chosen) => chosen,
            Err(e) => {
                tracing::warn!(user, error = %e, "the config webhook chose no environment");
                None
            }
        }
    }

    /// Who the webhook's `/pubkey` says holds `key` (SSH wire format), if it vouches for it.
    async fn vouched_key(
        &self,
        username: &str,
        key: &[u8],
        client_address: &str,
    ) -> Result<Option<identity::ExternalUser>, AuthError> {
        let Ok(line) = PublicKey::from_bytes(key).and_then(|k| k.to_openssh()) else {
            return Ok(None);
        };
        Ok(self
            .identity
            .check_public_key(username, &line, client_address)
            .await?)
    }

    /// A key an external source vouches for, for a user it may speak for; the provisioned
    /// record on success.
    async fn external_key(
        &self,
        username: &str,
        key: &[u8],
        client_address: &str,
    ) -> Result<Option<UserRecord>, AuthError> {
        match self.vouched_key(username, key, client_address).await? {
            Some(found) => Ok(identity::provision(self.store.as_ref(), &found).await?),
            None => Ok(None),
        }
    }

    /// Accepts certificate logins signed by `ca`'s keys, and issues certificates with it.
    pub fn with_certificates(mut self, ca: Arc<CertificateAuthority>) -> Self {
        self.certificates = ca;
        self
    }

    pub fn certificates(&self) -> &Arc<CertificateAuthority> {
        &self.certificates
    }

    pub fn audit(&self) -> &AuditLog {
        &self.audit
    }

    /// The failure counts, for the leader's sweep.
    pub fn throttle(&self) -> Arc<Throttle> {
        self.throttle.clone()
    }

    pub fn hasher(&self) -> &Hasher {
        &self.hasher
    }

    /// Answers an SSH public-key offer: whether `key` is one of `username`'s authorized keys
    /// and the user may log in. Issues nothing and never touches the failure throttle: a
    /// client offers every key it holds, and only a signature proves possession. The auth
    /// webhook is told `client_address`.
    pub async fn check_public_key(
        &self,
        username: &str,
        key: &[u8],
        client_address: &str,
    ) -> Result<bool, AuthError> {
        if envgate_proto::names::validate_user(username).is_err() {
            return Ok(false);
        }
        let user =
            store::get_json::<UserRecord>(self.store.as_ref(), &model::user_key(username)).await?;
        let user = user.map(|u| u.value);
        if user
            .as_ref()
            .is_some_and(|u| !u.disabled && key_is_authorized(key, &u.authorized_keys))
        {
            return Ok(true);
        }
        if !speaks_for(user.as_ref()) || self.identity.webhook.is_none() {
            return Ok(false);
        }
        // Asked again (from its cache) when the signature is verified; nothing is written yet.
        Ok(self
            .vouched_key(username, key, client_address)
            .await?
            .is_some())
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
            key_id: None,
            serial: None,
        });
        result
    }

    /// A certificate login (OpenSSH wire format), written to the audit log with its key id
    /// and serial and, when refused, the reason (`sshca::Refusal`). The proxy verified the
    /// client's signature with the certified key before sending it.
    pub async fn authenticate_certificate_for(
        &self,
        proxy: &str,
        username: &str,
        certificate: &[u8],
        client_address: &str,
    ) -> Result<IssuedToken, AuthError> {
        let parsed = Certificate::from_bytes(certificate).ok();
        let result = match &parsed {
            Some(cert) => {
                self.authenticate_certificate(username, cert, client_address)
                    .await
            }
            None => Err(Refusal::Unreadable.into()),
        };
        let (key_id, serial) = parsed
            .as_ref()
            .map(|c| (c.key_id().to_owned(), c.serial()))
            .unzip();
        let (outcome, reason) = match &result {
            Ok(_) => (Outcome::Success, None),
            Err(e) => {
                tracing::info!(
                    user = username,
                    client = client_address,
                    reason = %e,
                    key_id = key_id.as_deref().unwrap_or("-"),
                    serial = serial.unwrap_or_default(),
                    "certificate login refused"
                );
                (Outcome::Failure, Some(e.to_string()))
            }
        };
        self.audit.record(Event::Credential {
            outcome,
            user: username.to_owned(),
            client: client_address.to_owned(),
            method: audit::Method::Certificate,
            key_fingerprint: Some(parsed.as_ref().map_or_else(
                || "unparsable certificate".to_owned(),
                |c| c.public_key().fingerprint(HashAlg::Sha256).to_string(),
            )),
            proxy: proxy.to_owned(),
            reason,
            key_id,
            serial,
        });
        result
    }

    /// Precedence (docs/identity.md): the local user's authorized keys first, then the
    /// certificate. A certificate names a user that exists, or one an external CA may create
    /// (`--certificate-creates-users`); a disabled user is refused whatever they hold.
    async fn authenticate_certificate(
        &self,
        username: &str,
        certificate: &Certificate,
        client_address: &str,
    ) -> Result<IssuedToken, AuthError> {
        if envgate_proto::names::validate_user(username).is_err() {
            return Err(Refusal::PrincipalNotInCertificate.into());
        }
        let (user, not_before) = self.user_and_revocation(username).await?;
        let key = sshca::wire(certificate.public_key());
        if let Some(u) = &user
            && !u.disabled
            && key_is_authorized(&key, &u.authorized_keys)
        {
            return Ok(self.issue(u, not_before));
        }
        let decided = self
            .decide_certificate(username, certificate, client_address, user)
            .await;
        match decided {
            Ok(user) => Ok(self.issue(&user, not_before)),
            Err(e) => {
                if let Err(e) = self.throttle.record_failure(username, client_address).await {
                    tracing::warn!(error = %e, "recording a failed login failed");
                }
                Err(e)
            }
        }
    }

    async fn decide_certificate(
        &self,
        username: &str,
        certificate: &Certificate,
        client_address: &str,
        user: Option<UserRecord>,
    ) -> Result<UserRecord, AuthError> {
        let now = u64::try_from(model::now()).unwrap_or_default();
        let checked = self
            .certificates
            .check(certificate, username, client_address, now)?;
        if sshca::is_revoked(self.store.as_ref(), &checked.key_id).await? {
            return Err(Refusal::Revoked.into());
        }
        match (user, checked.origin, self.certificates.creates_users()) {
            (Some(u), _, _) if u.disabled => Err(Refusal::UserDisabled.into()),
            (Some(u), _, _) => Ok(u),
            (None, Origin::External, Some(creation)) => {
                let record = UserRecord {
                    name: username.to_owned(),
                    groups: creation.groups.clone(),
                    source: "certificate".to_owned(),
                    ..Default::default()
                };
                let key = model::user_key(username);
                if store::create_if_absent(self.store.as_ref(), &key, &record)
                    .await?
                    .is_some()
                {
                    tracing::info!(user = username, key_id = %checked.key_id, "user created by a certificate login");
                    return Ok(record);
                }
                // Made meanwhile (another login, the admin API): that record decides.
                match store::get_json::<UserRecord>(self.store.as_ref(), &key).await? {
                    Some(u) if !u.value.disabled => Ok(u.value),
                    Some(_) => Err(Refusal::UserDisabled.into()),
                    None => Err(Refusal::UnknownUser.into()),
                }
            }
            (None, _, _) => Err(Refusal::UnknownUser.into()),
        }
    }

    pub async fn authenticate(
        &self,
        username: &str,
        credential: Credential,
        client_address: &str,
    ) -> Result<IssuedToken, AuthError> {
        // A password attempt is counted before anything is read or hashed; a key's signature
        // was already verified by the proxy, so a key login is never held back.
        let reservation = match &credential {
            Credential::Password(_) => Some(
                self.throttle
                    .reserve(username, client_address)
                    .await
                    .map_err(|e| match e {
                        ThrottleError::Refused(refusal) => AuthError::Throttled(refusal),
                        ThrottleError::Store(s) => AuthError::Store(s),
                    })?,
            ),
            Credential::PublicKey(_) => None,
        };
        // The revocation is read beside the user, not after the credential check: a login
        // waits for one etcd round trip, not two (see `issue`). One written during the check
        // refuses this token, as it refuses any issued in its second.
        let valid = envgate_proto::names::validate_user(username).is_ok();
        let (user, not_before) = if valid {
            self.user_and_revocation(username).await?
        } else {
            (None, None)
        };
        let external = valid && speaks_for(user.as_ref());
        let accepted = match (&user, credential) {
            (_, Credential::Password(password)) if external && self.identity.checks_passwords() => {
                let checked = self
                    .identity
                    .check_password(username, &password, client_address)
                    .await;
                let provisioned = match checked {
                    Ok(Some(found)) => identity::provision(self.store.as_ref(), &found).await,
                    Ok(None) => Ok(None),
                    Err(e) => {
                        // Unless a source refused the password before another failed, nothing
                        // was checked: the attempt did not happen.
                        if !e.password_was_checked()
                            && let Some(reservation) = reservation
                        {
                            self.refund(reservation).await;
                        }
                        return Err(e.into());
                    }
                };
                match provisioned {
                    Ok(Some(record)) => {
                        if let Some(reservation) = reservation {
                            self.refund(reservation).await;
                        }
                        return Ok(self.issue(&record, not_before));
                    }
                    Ok(None) => false,
                    Err(e) => return Err(e.into()),
                }
            }
            (user, Credential::Password(password)) => {
                // Unknown users and users without a password are checked against a dummy
                // hash, so their answer takes as long as a real one.
                let hash = user
                    .as_ref()
                    .and_then(|u| u.password_hash.clone())
                    .unwrap_or_else(|| self.dummy_hash.clone());
                let has_password = user.as_ref().is_some_and(|u| u.password_hash.is_some());
                match self.hasher.verify(password, hash).await {
                    Ok(matched) => matched && has_password,
                    Err(e) => {
                        // Never hashed: the attempt did not happen.
                        if let Some(reservation) = reservation {
                            self.refund(reservation).await;
                        }
                        return Err(e);
                    }
                }
            }
            (user, Credential::PublicKey(key)) => {
                let local = user
                    .as_ref()
                    .is_some_and(|u| key_is_authorized(&key, &u.authorized_keys));
                if !local
                    && external
                    && self.identity.webhook.is_some()
                    && let Some(record) = self.external_key(username, &key, client_address).await?
                {
                    return Ok(self.issue(&record, not_before));
                }
                local
            }
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
                if reservation.is_none()
                    && let Err(e) = self.throttle.record_failure(username, client_address).await
                {
                    tracing::warn!(error = %e, "recording a failed login failed");
                }
                return Err(AuthError::Failed);
            }
        };
        if let Some(reservation) = reservation {
            self.refund(reservation).await;
        }
        Ok(self.issue(&user, not_before))
    }

    /// The user's record and the time before which their tokens are revoked, read together:
    /// a login waits for one etcd round trip, not two.
    async fn user_and_revocation(
        &self,
        username: &str,
    ) -> Result<(Option<UserRecord>, Option<i64>), AuthError> {
        let (user_key, revocation_key) =
            (model::user_key(username), model::revocation_key(username));
        let (user, revoked) = tokio::try_join!(
            store::get_json::<UserRecord>(self.store.as_ref(), &user_key),
            store::get_json::<RevocationRecord>(self.store.as_ref(), &revocation_key),
        )?;
        Ok((user.map(|v| v.value), revoked.map(|r| r.value.not_before)))
    }

    async fn refund(&self, reservation: crate::throttle::Reservation) {
        if let Err(e) = self.throttle.refund(reservation).await {
            tracing::warn!(error = %e, "refunding a login attempt failed");
        }
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
        let claims = self.verified.verify(&self.keys, token, model::now())?;
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
            .check_public_key(&req.username, &req.public_key, &req.client_address)
            .await?;
        Ok(Response::new(CheckPublicKeyResponse {
            acceptable,
            certificates: self.auth.certificates.enabled(),
        }))
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
            Some(authenticate_request::Credential::Certificate(c)) => {
                let result = self
                    .auth
                    .authenticate_certificate_for(&proxy, &req.username, &c, &req.client_address)
                    .await;
                return answer(result, started);
            }
            None => {
                return Err(AuthError::MissingCredential.into());
            }
        };
        let result = self
            .auth
            .authenticate_for(&proxy, &req.username, credential, &req.client_address)
            .await;
        answer(result, started)
    }
}

/// The Authenticate response, counted and timed.
fn answer(
    result: Result<IssuedToken, AuthError>,
    started: Instant,
) -> Result<Response<AuthenticateResponse>, Status> {
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

    /// An authenticator over a fresh store asking `sources`, with alice local (password
    /// `s3cret`).
    pub async fn with_sources(
        sources: crate::identity::Sources,
    ) -> (Arc<MemoryStore>, Authenticator) {
        let store = Arc::new(MemoryStore::new());
        let hasher = Hasher::new(TEST_COST, HashPool::new(1, 4));
        let alice = UserRecord {
            name: "alice".into(),
            password_hash: Some(hasher.hash("s3cret".into()).await.unwrap()),
            ..Default::default()
        };
        store::put_json(store.as_ref(), &model::user_key("alice"), &alice, None)
            .await
            .unwrap();
        let auth =
            authenticator(store.clone(), test_limits(2, 64)).with_identity(Arc::new(sources));
        (store, auth)
    }

    /// A password login of `user` from a fixed address: the groups of the token issued.
    pub async fn password_login(
        auth: &Authenticator,
        user: &str,
        password: &str,
    ) -> Result<Vec<String>, AuthError> {
        let issued = auth
            .authenticate(
                user,
                Credential::Password(password.into()),
                "192.0.2.7:4000",
            )
            .await?;
        Ok(auth.verify_token(&issued.token).await.unwrap().groups)
    }

    /// Cheap hashes on a pool of `threads` with room for `queue`; the clock stands still,
    /// so waits never run out by themselves.
    pub fn test_limits(threads: usize, queue: usize) -> PasswordLimits {
        PasswordLimits {
            throttle: ThrottlePolicy::default(),
            hasher: Hasher::new(TEST_COST, HashPool::new(threads, queue)),
            clock: Box::new(crate::throttle::ManualClock::at(1_000_000)),
        }
    }

    fn authenticator(store: Arc<dyn Store>, limits: PasswordLimits) -> Authenticator {
        Authenticator::new(
            store,
            test_keys(),
            Duration::from_secs(300),
            limits,
            AuditLog::in_memory(),
        )
    }

    /// alice (password `s3cret`, one key, students) and bob (disabled) in `store`.
    async fn seed(store: &dyn Store) -> PrivateKey {
        let hasher = Hasher::new(TEST_COST, HashPool::new(1, 4));
        let (key, line) = keypair();
        let alice = UserRecord {
            name: "alice".into(),
            password_hash: Some(hasher.hash("s3cret".into()).await.unwrap()),
            authorized_keys: vec![line],
            groups: vec!["students".into()],
            ..Default::default()
        };
        let bob = UserRecord {
            name: "bob".into(),
            password_hash: Some(hasher.hash("s3cret".into()).await.unwrap()),
            disabled: true,
            ..Default::default()
        };
        for user in [alice, bob] {
            store::put_json(store, &model::user_key(&user.name), &user, None)
                .await
                .unwrap();
        }
        key
    }

    async fn setup() -> (Arc<MemoryStore>, Authenticator, PrivateKey) {
        let store = Arc::new(MemoryStore::new());
        let key = seed(store.as_ref()).await;
        let auth = authenticator(store.clone(), test_limits(2, 64));
        (store, auth, key)
    }

    fn wire(key: &PrivateKey) -> Vec<u8> {
        key.public_key().to_bytes().unwrap()
    }

    /// The memory-reusing check agrees with argon2's own, at any cost, with one buffer.
    #[test]
    fn reusing_the_memory_verifies_as_argon2_does() {
        let mut memory = Vec::new();
        for cost in [
            TEST_COST,
            HashCost {
                memory_kib: 1024,
                iterations: 2,
            },
            TEST_COST,
        ] {
            let salt = SaltString::generate(&mut OsRng);
            let phc = cost
                .hasher()
                .hash_password(b"s3cret", &salt)
                .unwrap()
                .to_string();
            assert!(verify_in(b"s3cret", &phc, &mut memory));
            assert!(!verify_in(b"s3cret!", &phc, &mut memory));
            assert!(!verify_in(b"", &phc, &mut memory));
        }
        assert_eq!(memory.len(), 1024, "grown to the largest cost once");
        for broken in [
            "",
            "$argon2id$",
            "not a hash",
            "$argon2id$v=19$m=256,t=1,p=1$c2FsdA",
        ] {
            assert!(!verify_in(b"x", broken, &mut memory), "{broken:?}");
        }
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

    /// 200 wrong passwords for one user from one address, all at once: as many hash checks as
    /// the free allowance, every other attempt refused before hashing; the right password from
    /// another address still works.
    async fn a_parallel_guess_gets_only_the_free_allowance(store: Arc<dyn Store>) {
        seed(store.as_ref()).await;
        let auth = Arc::new(authenticator(store, test_limits(2, 256)));
        let attempts = (0..200).map(|i| {
            let auth = auth.clone();
            tokio::spawn(async move {
                auth.authenticate(
                    "alice",
                    Credential::Password(format!("guess{i}")),
                    &format!("192.0.2.9:{}", 1000 + i),
                )
                .await
            })
        });
        let (mut failed, mut throttled) = (0, 0);
        for attempt in futures::future::join_all(attempts).await {
            match attempt.unwrap() {
                Err(AuthError::Failed) => failed += 1,
                Err(e @ AuthError::Throttled(_)) => {
                    let status = Status::from(e);
                    assert_eq!(status.code(), tonic::Code::ResourceExhausted);
                    assert_eq!(status.message(), "too many failed attempts; retry in 1 s");
                    throttled += 1;
                }
                other => panic!("{:?}", other.map(|t| t.user)),
            }
        }
        let free = ThrottlePolicy::default().free_failures;
        assert_eq!((failed, throttled), (free, 200 - free));
        assert_eq!(auth.hasher().computed(), u64::from(free));
        // Nobody locked alice out from everywhere.
        auth.authenticate(
            "alice",
            Credential::Password("s3cret".into()),
            "198.51.100.4:1",
        )
        .await
        .expect("alice from her own address");
        assert_eq!(auth.hasher().computed(), u64::from(free) + 1);
    }

    #[tokio::test]
    async fn a_parallel_guess_gets_only_the_free_allowance_in_memory() {
        a_parallel_guess_gets_only_the_free_allowance(Arc::new(MemoryStore::new())).await;
    }

    #[tokio::test]
    async fn a_parallel_guess_gets_only_the_free_allowance_on_etcd() {
        let etcd = crate::testkit::Etcd::start().await.unwrap();
        let store =
            crate::store::EtcdStore::connect(&etcd.config(), "/throttle/", Duration::from_secs(5))
                .await
                .unwrap();
        a_parallel_guess_gets_only_the_free_allowance(Arc::new(store)).await;
    }

    /// Two replicas on one etcd count one user's failures together.
    #[tokio::test]
    async fn replicas_share_the_counts() {
        let etcd = crate::testkit::Etcd::start().await.unwrap();
        let config = etcd.config();
        let connect =
            || crate::store::EtcdStore::connect(&config, "/shared/", Duration::from_secs(5));
        let (a, b) = (connect().await.unwrap(), connect().await.unwrap());
        seed(&a).await;
        let replica_a = authenticator(Arc::new(a), test_limits(1, 8));
        let replica_b = authenticator(Arc::new(b), test_limits(1, 8));
        for (i, replica) in [&replica_a, &replica_b, &replica_a, &replica_b, &replica_a]
            .into_iter()
            .enumerate()
        {
            let result = replica
                .authenticate(
                    "alice",
                    Credential::Password(format!("x{i}")),
                    "192.0.2.1:1",
                )
                .await;
            assert!(matches!(result, Err(AuthError::Failed)), "{i}");
        }
        for replica in [&replica_b, &replica_a] {
            let result = replica
                .authenticate(
                    "alice",
                    Credential::Password("s3cret".into()),
                    "192.0.2.1:2",
                )
                .await;
            assert!(matches!(result, Err(AuthError::Throttled(_))));
        }
    }

    /// Key offers never count, and a wait earned by password guesses never holds back a key:
    /// its signature was verified, nothing is guessed.
    #[tokio::test]
    async fn keys_are_never_held_back_and_offers_never_count() {
        let (store, auth, key) = setup().await;
        let (other, _) = keypair();
        for _ in 0..100 {
            assert!(
                !auth
                    .check_public_key("alice", &wire(&other), "192.0.2.1:1")
                    .await
                    .unwrap()
            );
        }
        assert!(
            store.range("throttle/").await.unwrap().is_empty(),
            "offers leave no record"
        );
        for i in 0..6 {
            let _ = auth
                .authenticate(
                    "alice",
                    Credential::Password(format!("x{i}")),
                    "192.0.2.1:1",
                )
                .await;
        }
        assert!(matches!(
            auth.authenticate(
                "alice",
                Credential::Password("s3cret".into()),
                "192.0.2.1:1"
            )
            .await,
            Err(AuthError::Throttled(_))
        ));
        auth.authenticate("alice", Credential::PublicKey(wire(&key)), "192.0.2.1:1")
            .await
            .expect("alice's key from the same address");
    }

    /// With every hasher busy and the queue full, a password login is refused at once with a
    /// clear message; the pool serves again after.
    #[tokio::test]
    async fn a_full_hashing_pool_refuses_at_once() {
        let store = Arc::new(MemoryStore::new());
        seed(store.as_ref()).await;
        let auth = Arc::new(authenticator(store, test_limits(1, 0)));
        let attempts = (0..50).map(|i| {
            let auth = auth.clone();
            tokio::spawn(async move {
                auth.authenticate(
                    &format!("user{i}"),
                    Credential::Password("x".into()),
                    &format!("192.0.2.{i}:1"),
                )
                .await
            })
        });
        let mut busy = 0;
        for attempt in futures::future::join_all(attempts).await {
            match attempt.unwrap() {
                Err(AuthError::Failed) => {}
                Err(e @ AuthError::Hashing(_)) => {
                    let status = Status::from(e);
                    assert_eq!(status.code(), tonic::Code::ResourceExhausted);
                    assert_eq!(
                        status.message(),
                        "the server is busy checking passwords; try again in a few seconds"
                    );
                    busy += 1;
                }
                other => panic!("{:?}", other.map(|t| t.user)),
            }
        }
        assert!(busy > 0, "50 at once on one hasher without a queue");
        // Served again once the hasher is back waiting for work (it may still be on its way
        // back from the last job when the flood's answers are all in).
        let mut again = Err(AuthError::Failed);
        for _ in 0..100 {
            again = auth
                .authenticate(
                    "alice",
                    Credential::Password("s3cret".into()),
                    "192.0.2.200:1",
                )
                .await;
            if !matches!(again, Err(AuthError::Hashing(_))) {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        again.expect("served again");
    }

    /// A certificate for `key` naming `principal`, signed by `ca`, valid for an hour.
    fn certificate(ca: &PrivateKey, key: &PrivateKey, principal: &str) -> Vec<u8> {
        use russh::keys::ssh_key::certificate::{Builder, CertType};
        let now = u64::try_from(model::now()).unwrap();
        let mut builder = Builder::new(
            vec![1; 32],
            key.public_key().key_data().clone(),
            now - 60,
            now + 3600,
        )
        .unwrap();
        builder
            .cert_type(CertType::User)
            .unwrap()
            .key_id(format!("{principal}-test"))
            .unwrap()
            .valid_principal(principal)
            .unwrap();
        builder.sign(ca).unwrap().to_bytes().unwrap()
    }

    /// Precedence: the user's authorized key first (whoever signed the certificate), then the
    /// certificate; only an external CA's certificate creates a user, with the flag's groups.
    #[tokio::test]
    async fn certificates_follow_authorized_keys_and_create_users_only_from_external_cas() {
        let store = Arc::new(MemoryStore::new());
        let alice_key = seed(store.as_ref()).await;
        let (own, _) = keypair();
        let (external, _) = keypair();
        let (foreign, _) = keypair();
        let ca = CertificateAuthority::new(
            vec![own.clone()],
            vec![external.public_key().clone()],
            sshca::DEFAULT_VALIDITY,
            Some(sshca::UserCreation {
                groups: vec!["guests".into()],
            }),
        );
        let audit = AuditLog::in_memory();
        let auth = Authenticator::new(
            store.clone(),
            test_keys(),
            Duration::from_secs(300),
            test_limits(1, 8),
            audit.clone(),
        )
        .with_certificates(Arc::new(ca));
        let login = |user: &'static str, cert: Vec<u8>| {
            let auth = &auth;
            async move {
                auth.authenticate_certificate_for("p", user, &cert, "192.0.2.1:1")
                    .await
            }
        };
        // alice's own key, certified by nobody we trust: her key decides.
        login("alice", certificate(&foreign, &alice_key, "alice"))
            .await
            .expect("an authorized key is accepted first");
        let (key, _) = keypair();
        assert!(matches!(
            login("alice", certificate(&foreign, &key, "alice")).await,
            Err(AuthError::Certificate(Refusal::UntrustedCa))
        ));
        assert!(matches!(
            login("bob", certificate(&own, &key, "bob")).await,
            Err(AuthError::Certificate(Refusal::UserDisabled))
        ));
        assert!(matches!(
            login("carol", certificate(&own, &key, "carol")).await,
            Err(AuthError::Certificate(Refusal::UnknownUser))
        ));
        assert!(
            store::get_json::<UserRecord>(store.as_ref(), &model::user_key("carol"))
                .await
                .unwrap()
                .is_none()
        );
        let token = login("carol", certificate(&external, &key, "carol"))
            .await
            .expect("an external CA's certificate creates carol");
        let carol = store::get_json::<UserRecord>(store.as_ref(), &model::user_key("carol"))
            .await
            .unwrap()
            .unwrap()
            .value;
        assert_eq!(
            (carol.source.as_str(), carol.groups),
            ("certificate", vec!["guests".to_owned()])
        );
        assert_eq!(
            auth.verify_token(&token.token).await.unwrap().groups,
            ["guests"]
        );
        assert!(matches!(
            login("carol", b"garbage".to_vec()).await,
            Err(AuthError::Certificate(Refusal::Unreadable))
        ));
        let refusals: Vec<serde_json::Value> = audit
            .lines()
            .iter()
            .map(|l| serde_json::from_str(l).unwrap())
            .filter(|r: &serde_json::Value| r["outcome"] == "failure")
            .collect();
        let reasons: Vec<&str> = refusals
            .iter()
            .map(|r| r["reason"].as_str().unwrap())
            .collect();
        assert_eq!(
            reasons,
            [
                "certificate not signed by a trusted CA",
                "user disabled",
                "unknown user",
                "certificate unreadable"
            ]
        );
        assert_eq!(refusals[0]["key_id"], "alice-test");
        assert_eq!(refusals[0]["method"], "certificate");
        assert!(refusals[3].get("key_id").is_none());
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
