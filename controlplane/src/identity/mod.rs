//! External identity sources: an LDAP directory and an auth webhook compatible with
//! ContainerSSH's (docs/identity.md). Each is off unless configured. The `Authenticator` asks
//! them only for names the admin API does not own: a local record (`source == ""`) decides
//! alone. A source that accepts a user creates or refreshes their record (`provision`), so
//! placement, self-service and the admin API see LDAP and webhook users like any other.

mod flags;
pub mod ldap;
pub mod webhook;

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_rustls::rustls;

use crate::model::{self, UserRecord};
use crate::store::{self, Compare, Store, StoreError, TxnOp};

pub use flags::IdentityFlags;
pub use ldap::{Ldap, LdapConfig};
pub use webhook::{AuthWebhook, ConfigWebhook, WebhookConfig};

/// `UserRecord::source` of records the directory keeps.
pub const SOURCE_LDAP: &str = "ldap";
/// `UserRecord::source` of records the auth webhook keeps.
pub const SOURCE_WEBHOOK: &str = "webhook";

/// The longest one login may spend on external sources together, under the proxy's 10 s
/// deadline for an Authenticate call: past it the login fails as "unavailable".
pub const EXTERNAL_DEADLINE: Duration = Duration::from_secs(8);

/// A rustls client configuration trusting exactly the CA certificates in `path` (PEM).
pub fn tls_trusting(path: &Path) -> Result<Arc<rustls::ClientConfig>, String> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("{}: {e}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no PEM certificate in it", path.display()));
    }
    for cert in certs {
        roots
            .add(cert)
            .map_err(|e| format!("{}: {e}", path.display()))?;
    }
    // The process's provider: ring, the only one compiled in (../shared/DEPENDENCIES.md).
    let config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// Compare-and-swap attempts at a user record before the login gives up.
const CAS_ATTEMPTS: usize = 8;

/// What may be a group name: a non-empty word without spaces or control characters (the admin
/// API's rule; a directory's or webhook's group that breaks it is dropped).
pub fn is_group_name(group: &str) -> bool {
    !group.is_empty() && !group.chars().any(|c| c.is_whitespace() || c.is_control())
}

/// A user an external source vouched for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExternalUser {
    pub name: String,
    /// envgate groups (which environments the user may use).
    pub groups: Vec<String>,
    /// `ldap` or `webhook`.
    pub source: &'static str,
}

/// A source could not answer (down, slow, misconfigured, or an answer that makes no sense).
/// The detail is for the log; users read only which kind of source it was.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("LDAP: {0}")]
    Directory(String),
    #[error("auth webhook: {0}")]
    Webhook(String),
    #[error("no answer from the identity sources within {} s", EXTERNAL_DEADLINE.as_secs())]
    Deadline,
    /// One source could not answer after another had refused the password: the password was
    /// checked, so the attempt counts as a failure (a guesser gains nothing from an outage).
    #[error("{0} (and another source refused the password)")]
    AfterRefusal(Box<SourceError>),
}

impl SourceError {
    /// Whether the outage was the directory's (users are told which kind of source it was).
    pub fn is_directory(&self) -> bool {
        match self {
            SourceError::Directory(_) => true,
            SourceError::AfterRefusal(inner) => inner.is_directory(),
            _ => false,
        }
    }

    /// Whether some source checked the password and refused it before this outage.
    pub fn password_was_checked(&self) -> bool {
        matches!(self, SourceError::AfterRefusal(_))
    }
}

/// The configured sources; `Default` is none at all.
#[derive(Default)]
pub struct Sources {
    pub ldap: Option<Ldap>,
    pub webhook: Option<AuthWebhook>,
    pub config: Option<ConfigWebhook>,
}

impl Sources {
    /// Whether a password can be checked anywhere but in a local record.
    pub fn checks_passwords(&self) -> bool {
        self.ldap.is_some() || self.webhook.is_some()
    }

    /// LDAP first, then the webhook. `Ok(None)`: every source that answered refused. A
    /// source that could not answer does not stop the next one; if none accepted and one was
    /// down, the login fails as unavailable rather than as a wrong password.
    pub async fn check_password(
        &self,
        user: &str,
        password: &str,
        client_address: &str,
    ) -> Result<Option<ExternalUser>, SourceError> {
        let check = async {
            let (mut outage, mut refused) = (None, false);
            if let Some(ldap) = &self.ldap {
                match ldap.check_password(user, password).await {
                    Ok(Some(found)) => return Ok(Some(found)),
                    Ok(None) => refused = true,
                    Err(e) => outage = Some(e),
                }
            }
            if let Some(webhook) = &self.webhook {
                match webhook.password(user, password, client_address).await {
                    Ok(Some(found)) => return Ok(Some(found)),
                    Ok(None) => refused = true,
                    Err(e) => outage = outage.or(Some(e)),
                }
            }
            match outage {
                None => Ok(None),
                Some(e) if refused => Err(SourceError::AfterRefusal(Box::new(e))),
                Some(e) => Err(e),
            }
        };
        deadline(check).await
    }

    /// The webhook's `/pubkey` (LDAP does not hold keys here). `key` is an authorized_keys
    /// line.
    pub async fn check_public_key(
        &self,
        user: &str,
        key: &str,
        client_address: &str,
    ) -> Result<Option<ExternalUser>, SourceError> {
        match &self.webhook {
            Some(webhook) => deadline(webhook.public_key(user, key, client_address)).await,
            None => Ok(None),
        }
    }
}

async fn deadline<T>(
    check: impl Future<Output = Result<T, SourceError>>,
) -> Result<T, SourceError> {
    tokio::time::timeout(EXTERNAL_DEADLINE, check)
        .await
        .unwrap_or(Err(SourceError::Deadline))
}

/// Creates or refreshes `found`'s record: its source and groups as the source said, enabled.
/// Written by compare-and-swap, and a local record (made by the admin API meanwhile) is never
/// overwritten: `Ok(None)` then, and the login is refused. Keys and the saved default
/// environment of an existing record are kept.
pub async fn provision(
    store: &dyn Store,
    found: &ExternalUser,
) -> Result<Option<UserRecord>, StoreError> {
    let key = model::user_key(&found.name);
    for _ in 0..CAS_ATTEMPTS {
        let current = store::get_json::<UserRecord>(store, &key).await?;
        let (compare, base) = match current {
            Some(c) if c.value.source.is_empty() => return Ok(None),
            Some(c) => (Compare::revision(&key, c.mod_revision), c.value),
            None => (Compare::absent(&key), UserRecord::default()),
        };
        let updated = UserRecord {
            name: found.name.clone(),
            groups: found.groups.clone(),
            source: found.source.to_owned(),
            disabled: false,
            password_hash: None,
            ..base.clone()
        };
        if updated == base {
            return Ok(Some(updated));
        }
        let written = store
            .txn(vec![compare], vec![TxnOp::put_json(&key, &updated, None)])
            .await?;
        if written.is_some() {
            tracing::info!(user = %found.name, source = found.source, groups = ?found.groups, "user record provisioned");
            return Ok(Some(updated));
        }
    }
    Err(StoreError::Unavailable(format!(
        "user {:?} kept changing while a login refreshed it",
        found.name
    )))
}

/// Positive answers of an external source, keyed by user and a salted hash of the credential
/// (the password itself is never kept), each for at most `ttl` (the token lifetime): within it
/// a proxy whose own cache missed does not cost the source a request. Refusals are not cached,
/// so a user who fixes a typo is not held back. Bounded: when full, expired entries go first,
/// then everything.
pub struct AnswerCache {
    ttl: Duration,
    salt: [u8; 16],
    entries: Mutex<HashMap<CacheKey, (Instant, ExternalUser)>>,
}

/// A user name and the salted SHA-256 of a credential.
type CacheKey = (String, [u8; 32]);

/// Entries one cache holds at most.
const CACHE_CAPACITY: usize = 10_000;

impl AnswerCache {
    pub fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            salt: rand::random(),
            entries: Mutex::default(),
        }
    }

    fn key(&self, user: &str, credential: &[u8]) -> CacheKey {
        let mut context = ring::digest::Context::new(&ring::digest::SHA256);
        context.update(&self.salt);
        context.update(credential);
        let mut hash = [0u8; 32];
        hash.copy_from_slice(context.finish().as_ref());
        (user.to_owned(), hash)
    }

    pub fn get(&self, user: &str, credential: &[u8]) -> Option<ExternalUser> {
        let key = self.key(user, credential);
        let mut entries = self.entries.lock().expect("cache lock");
        match entries.get(&key) {
            Some((expires, found)) if *expires > Instant::now() => Some(found.clone()),
            Some(_) => {
                entries.remove(&key);
                None
            }
            None => None,
        }
    }

    pub fn insert(&self, user: &str, credential: &[u8], found: ExternalUser) {
        if self.ttl.is_zero() {
            return;
        }
        let key = self.key(user, credential);
        let now = Instant::now();
        let mut entries = self.entries.lock().expect("cache lock");
        if entries.len() >= CACHE_CAPACITY {
            entries.retain(|_, (expires, _)| *expires > now);
            if entries.len() >= CACHE_CAPACITY {
                entries.clear();
            }
        }
        entries.insert(key, (now + self.ttl, found));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemoryStore;

    fn found(groups: &[&str]) -> ExternalUser {
        ExternalUser {
            name: "carol".into(),
            groups: groups.iter().map(|g| g.to_string()).collect(),
            source: SOURCE_LDAP,
        }
    }

    #[tokio::test]
    async fn provisioning_creates_refreshes_and_never_takes_a_local_record() {
        let store = MemoryStore::new();
        let made = provision(&store, &found(&["students"])).await.unwrap();
        assert_eq!(made.unwrap().groups, ["students"]);
        // The user saved a default meanwhile; a refresh keeps it and replaces the groups.
        let key = model::user_key("carol");
        let mut record = store::get_json::<UserRecord>(&store, &key)
            .await
            .unwrap()
            .unwrap()
            .value;
        record.default_environment = "debian".into();
        record.disabled = true;
        store::put_json(&store, &key, &record, None).await.unwrap();
        let refreshed = provision(&store, &found(&["staff"]))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            (
                refreshed.groups.as_slice(),
                refreshed.default_environment.as_str(),
                refreshed.disabled,
                refreshed.source.as_str()
            ),
            (["staff".to_owned()].as_slice(), "debian", false, "ldap")
        );
        // An admin made "carol" local: the directory no longer speaks for her.
        record.source = String::new();
        store::put_json(&store, &key, &record, None).await.unwrap();
        assert_eq!(provision(&store, &found(&["staff"])).await.unwrap(), None);
        let kept = store::get_json::<UserRecord>(&store, &key)
            .await
            .unwrap()
            .unwrap()
            .value;
        assert_eq!(kept, record);
    }

    #[test]
    fn the_cache_keys_by_credential_and_forgets_after_its_lifetime() {
        let cache = AnswerCache::new(Duration::from_millis(50));
        cache.insert("carol", b"right", found(&[]));
        assert!(cache.get("carol", b"right").is_some());
        assert!(cache.get("carol", b"wrong").is_none());
        assert!(cache.get("dave", b"right").is_none());
        std::thread::sleep(Duration::from_millis(60));
        assert!(cache.get("carol", b"right").is_none());
        let off = AnswerCache::new(Duration::ZERO);
        off.insert("carol", b"right", found(&[]));
        assert!(off.get("carol", b"right").is_none());
    }
}
