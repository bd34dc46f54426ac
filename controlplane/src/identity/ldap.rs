//! Password logins checked against an LDAP directory by search-then-bind: the service account
//! finds the user's entry and groups, then the password is checked by binding as that entry.
//! Every operation has a timeout; the user name is escaped (RFC 4515) wherever it enters a
//! filter, after the login name grammar has already refused anything but `[a-z0-9._-]`.

use std::sync::Arc;
use std::time::Duration;

use ldap3::{LdapConnAsync, LdapConnSettings, Scope, SearchEntry, ldap_escape};
use tokio_rustls::rustls;

use super::{ExternalUser, SOURCE_LDAP, SourceError, is_group_name};

/// `invalidCredentials`: the one bind result that means "wrong password".
const INVALID_CREDENTIALS: u32 = 49;

/// `--ldap-user-filter` unless configured otherwise.
pub const DEFAULT_USER_FILTER: &str = "(&(objectClass=posixAccount)(uid={user}))";
/// `--ldap-group-filter` unless configured otherwise: RFC 2307 groups (`memberUid`) and
/// `groupOfNames` (`member`) alike.
pub const DEFAULT_GROUP_FILTER: &str = "(|(memberUid={user})(member={dn}))";

/// Where and how to reach the directory (`--ldap-*`).
#[derive(Clone)]
pub struct LdapConfig {
    /// `ldap://host:port` or `ldaps://host:port`.
    pub url: String,
    /// Upgrade an `ldap://` connection with StartTLS before anything is sent.
    pub starttls: bool,
    /// Trust anchors for ldaps:// and StartTLS; `None`: ldap3's default (the system store).
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// The service account that searches; empty: an anonymous search.
    pub bind_dn: String,
    pub bind_password: String,
    pub base_dn: String,
    /// `{user}` is replaced by the escaped login name.
    pub user_filter: String,
    /// `{user}` and `{dn}` (the user's entry) are replaced, escaped.
    pub group_filter: String,
    /// The attribute of a group entry that names the envgate group.
    pub group_attribute: String,
    /// A filter that matches disabled user entries (e.g. `(shadowExpire=1)`); empty: none is.
    pub disabled_filter: String,
    /// Bound on connecting and on each operation.
    pub timeout: Duration,
}

impl LdapConfig {
    /// Checks what can be checked without the directory: the URL scheme, the filters'
    /// placeholders, StartTLS only on ldap://.
    pub fn validate(&self) -> Result<(), String> {
        let plain = self.url.starts_with("ldap://");
        if !plain && !self.url.starts_with("ldaps://") {
            return Err(format!("{:?} is not ldap:// or ldaps://", self.url));
        }
        if self.starttls && !plain {
            return Err("StartTLS upgrades an ldap:// URL; ldaps:// is TLS already".into());
        }
        if !self.user_filter.contains("{user}") {
            return Err("the user filter must contain {user}".into());
        }
        for filter in [&self.user_filter, &self.group_filter, &self.disabled_filter] {
            if !filter.is_empty() && !(filter.starts_with('(') && filter.ends_with(')')) {
                return Err(format!("{filter:?} is not an LDAP filter in parentheses"));
            }
        }
        if self.base_dn.is_empty() {
            return Err("a base DN is required".into());
        }
        Ok(())
    }
}

pub struct Ldap {
    config: LdapConfig,
}

/// What one search-then-bind found.
enum Lookup {
    Refused(&'static str),
    Accepted(Vec<String>),
}

impl Ldap {
    pub fn new(config: LdapConfig) -> Self {
        Self { config }
    }

    /// `Ok(Some)`: the directory knows `user`, the entry is not disabled and `password` binds
    /// as it. `Ok(None)`: it refused (unknown, ambiguous, disabled, wrong password).
    pub async fn check_password(
        &self,
        user: &str,
        password: &str,
    ) -> Result<Option<ExternalUser>, SourceError> {
        // An empty password would be an unauthenticated bind (RFC 4513 5.1.2), which many
        // servers answer with success: never send one.
        if password.is_empty() {
            return Ok(None);
        }
        // Bounds the whole exchange too: each operation's own timeout does not cover the time
        // between them, and StartTLS has none of its own.
        let limit = self.config.timeout * 5;
        let lookup = tokio::time::timeout(limit, self.lookup(user, password))
            .await
            .map_err(|_| SourceError::Directory(format!("no answer within {} s", limit.as_secs())))?
            .map_err(|e| SourceError::Directory(e.to_string()))?;
        match lookup {
            Lookup::Accepted(groups) => Ok(Some(ExternalUser {
                name: user.to_owned(),
                groups,
                source: SOURCE_LDAP,
            })),
            Lookup::Refused(reason) => {
                tracing::info!(user, reason, "the directory refused a login");
                Ok(None)
            }
        }
    }

    async fn lookup(&self, user: &str, password: &str) -> Result<Lookup, LookupError> {
        let c = &self.config;
        let mut settings = LdapConnSettings::new()
            .set_conn_timeout(c.timeout)
            .set_starttls(c.starttls);
        if let Some(tls) = &c.tls {
            settings = settings.set_config(tls.clone());
        }
        let (connection, mut ldap) = LdapConnAsync::with_settings(settings, &c.url).await?;
        ldap3::drive!(connection);
        ldap.with_timeout(c.timeout)
            .simple_bind(&c.bind_dn, &c.bind_password)
            .await?
            .success()
            .map_err(|e| LookupError::ServiceBind(e.to_string()))?;
        let escaped = ldap_escape(user);
        let filter = c.user_filter.replace("{user}", &escaped);
        let (entries, _) = ldap
            .with_timeout(c.timeout)
            .search(&c.base_dn, Scope::Subtree, &filter, vec!["1.1"])
            .await?
            .success()?;
        let dn = match entries.as_slice() {
            [entry] => SearchEntry::construct(entry.clone()).dn,
            [] => return Ok(Lookup::Refused("no such user in the directory")),
            _ => return Ok(Lookup::Refused("the user filter matches several entries")),
        };
        if !c.disabled_filter.is_empty() {
            let (disabled, _) = ldap
                .with_timeout(c.timeout)
                .search(&dn, Scope::Base, &c.disabled_filter, vec!["1.1"])
                .await?
                .success()?;
            if !disabled.is_empty() {
                return Ok(Lookup::Refused("the account is disabled in the directory"));
            }
        }
        let groups = if c.group_filter.is_empty() {
            Vec::new()
        } else {
            let filter = c
                .group_filter
                .replace("{user}", &escaped)
                .replace("{dn}", &ldap_escape(&dn));
            let (entries, _) = ldap
                .with_timeout(c.timeout)
                .search(
                    &c.base_dn,
                    Scope::Subtree,
                    &filter,
                    vec![c.group_attribute.as_str()],
                )
                .await?
                .success()?;
            let mut groups: Vec<String> = entries
                .into_iter()
                .filter_map(|e| {
                    SearchEntry::construct(e)
                        .attrs
                        .remove(&c.group_attribute)?
                        .into_iter()
                        .next()
                })
                .filter(|g| is_group_name(g))
                .collect();
            groups.sort();
            groups.dedup();
            groups
        };
        let bound = ldap
            .with_timeout(c.timeout)
            .simple_bind(&dn, password)
            .await?;
        let _ = ldap.unbind().await;
        match bound.rc {
            0 => Ok(Lookup::Accepted(groups)),
            INVALID_CREDENTIALS => Ok(Lookup::Refused("wrong password")),
            _ => Err(LookupError::Ldap(bound.success().unwrap_err())),
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum LookupError {
    #[error(transparent)]
    Ldap(#[from] ldap3::LdapError),
    #[error("the service account's bind was refused (check --ldap-bind-dn and its password): {0}")]
    ServiceBind(String),
}
