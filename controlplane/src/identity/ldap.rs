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
            let parenthesised = filter.starts_with('(') && filter.ends_with(')');
            if !filter.is_empty() && !parenthesised {
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

/// Against a real `slapd` started by each test (`testkit::Slapd`), through the
/// `Authenticator` as the Auth service calls it.
#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use tonic::Status;

    use super::*;
    use crate::auth::Authenticator;
    use crate::auth::tests::{password_login as login, with_sources};
    use crate::error::AuthError;
    use crate::identity::Sources;
    use crate::model::{self, EnvironmentRecord, UserRecord};
    use crate::store::{self, MemoryStore, Store};
    use crate::testkit::{LDAP_SERVICE_DN, LDAP_SERVICE_PASSWORD, LDAP_SUFFIX, Slapd};

    /// carol (students), dave (disabled), erin (admins, a groupOfNames), and an `alice` whom
    /// the admin API also has: the local record must win.
    fn directory() -> String {
        let person = |uid: &str, number: u32, password: &str, extra: &str| {
            format!(
                "dn: uid={uid},ou=people,{LDAP_SUFFIX}\nobjectClass: inetOrgPerson\n\
                 objectClass: posixAccount\nobjectClass: shadowAccount\nuid: {uid}\ncn: {uid}\n\
                 sn: {uid}\nuidNumber: {number}\ngidNumber: {number}\nhomeDirectory: /home/{uid}\n\
                 userPassword: {password}\n{extra}\n"
            )
        };
        [
            person("carol", 10001, "carol-pw", ""),
            person("dave", 10002, "dave-pw", "shadowExpire: 1\n"),
            person("erin", 10003, "erin-pw", ""),
            person("alice", 10004, "directory-pw", ""),
            format!(
                "dn: cn=students,ou=groups,{LDAP_SUFFIX}\nobjectClass: posixGroup\ncn: students\n\
                 gidNumber: 20001\nmemberUid: carol\nmemberUid: dave\n"
            ),
            format!(
                "dn: cn=staff,ou=groups,{LDAP_SUFFIX}\nobjectClass: posixGroup\ncn: staff\n\
                 gidNumber: 20002\nmemberUid: erin\n"
            ),
            format!(
                "dn: cn=admins,ou=groups,{LDAP_SUFFIX}\nobjectClass: groupOfNames\ncn: admins\n\
                 member: uid=erin,ou=people,{LDAP_SUFFIX}\n"
            ),
        ]
        .join("\n")
    }

    fn config(slapd: &Slapd) -> LdapConfig {
        LdapConfig {
            url: slapd.url(),
            starttls: false,
            tls: None,
            bind_dn: LDAP_SERVICE_DN.into(),
            bind_password: LDAP_SERVICE_PASSWORD.into(),
            base_dn: LDAP_SUFFIX.into(),
            user_filter: DEFAULT_USER_FILTER.into(),
            group_filter: DEFAULT_GROUP_FILTER.into(),
            group_attribute: "cn".into(),
            disabled_filter: "(shadowExpire=1)".into(),
            timeout: Duration::from_secs(2),
        }
    }

    /// An authenticator asking `ldap`, with alice local (password `s3cret`).
    async fn setup(ldap: LdapConfig) -> (Arc<MemoryStore>, Authenticator) {
        with_sources(Sources {
            ldap: Some(Ldap::new(ldap)),
            ..Sources::default()
        })
        .await
    }

    async fn record(store: &dyn Store, user: &str) -> Option<UserRecord> {
        store::get_json::<UserRecord>(store, &model::user_key(user))
            .await
            .unwrap()
            .map(|r| r.value)
    }

    #[tokio::test]
    async fn directory_users_log_in_by_search_then_bind_and_get_a_record() {
        let slapd = Slapd::start(&directory()).await.unwrap();
        let (store, auth) = setup(config(&slapd)).await;
        assert_eq!(
            login(&auth, "carol", "carol-pw").await.unwrap(),
            ["students"]
        );
        let carol = record(store.as_ref(), "carol").await.unwrap();
        assert_eq!(
            (
                carol.source.as_str(),
                carol.groups.as_slice(),
                carol.password_hash
            ),
            ("ldap", ["students".to_owned()].as_slice(), None),
            "made on first login, without the password"
        );
        // Groups by memberUid and by member={dn}.
        assert_eq!(
            login(&auth, "erin", "erin-pw").await.unwrap(),
            ["admins", "staff"]
        );
        for (user, password, why) in [
            ("carol", "wrong", "a bad password"),
            ("carol", "", "an empty password (an unauthenticated bind)"),
            ("dave", "dave-pw", "a disabled account"),
            ("nobody", "carol-pw", "an unknown user"),
        ] {
            let err = login(&auth, user, password).await.unwrap_err();
            assert!(matches!(err, AuthError::Failed), "{why}: {err:?}");
            assert_eq!(Status::from(err).code(), tonic::Code::Unauthenticated);
        }
        assert!(record(store.as_ref(), "dave").await.is_none());
        // A local record decides alone: the directory's password for "alice" is no way in.
        assert!(matches!(
            login(&auth, "alice", "directory-pw").await,
            Err(AuthError::Failed)
        ));
        assert_eq!(
            login(&auth, "alice", "s3cret").await.unwrap(),
            Vec::<String>::new()
        );
        assert_eq!(record(store.as_ref(), "alice").await.unwrap().source, "");
    }

    #[tokio::test]
    async fn a_group_change_takes_effect_on_the_next_login() {
        let slapd = Slapd::start(&directory()).await.unwrap();
        let (store, auth) = setup(config(&slapd)).await;
        let catalogue = vec![
            EnvironmentRecord {
                name: "busybox".into(),
                ..Default::default()
            },
            EnvironmentRecord {
                name: "gpu".into(),
                allowed_groups: vec!["staff".into()],
                ..Default::default()
            },
        ];
        let groups = login(&auth, "carol", "carol-pw").await.unwrap();
        assert_eq!(
            crate::catalogue::available(&catalogue, &groups),
            ["busybox"]
        );
        slapd
            .modify(&format!(
                "dn: cn=staff,ou=groups,{LDAP_SUFFIX}\nchangetype: modify\nadd: memberUid\n\
                 memberUid: carol\n\ndn: cn=students,ou=groups,{LDAP_SUFFIX}\n\
                 changetype: modify\ndelete: memberUid\nmemberUid: carol\n"
            ))
            .unwrap();
        let groups = login(&auth, "carol", "carol-pw").await.unwrap();
        assert_eq!(groups, ["staff"]);
        assert_eq!(
            crate::catalogue::available(&catalogue, &groups),
            ["busybox", "gpu"]
        );
        assert_eq!(
            record(store.as_ref(), "carol").await.unwrap().groups,
            ["staff"]
        );
    }

    #[tokio::test]
    async fn a_dead_directory_fails_clearly_and_local_users_still_log_in() {
        let mut slapd = Slapd::start(&directory()).await.unwrap();
        let (_, auth) = setup(config(&slapd)).await;
        slapd.kill();
        let started = Instant::now();
        let err = login(&auth, "carol", "carol-pw").await.unwrap_err();
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
        assert!(matches!(err, AuthError::Source(_)), "{err:?}");
        let status = Status::from(err);
        assert_eq!(status.code(), tonic::Code::Unavailable);
        let id = status
            .metadata()
            .get(envgate_proto::metadata::REQUEST_ID)
            .unwrap()
            .to_str()
            .unwrap()
            .to_owned();
        assert_eq!(
            status.message(),
            format!("the directory is unavailable; try again later (request id {id})")
        );
        assert_eq!(
            login(&auth, "alice", "s3cret").await.unwrap(),
            Vec::<String>::new()
        );
        // A port whose connections the kernel completes but nobody ever reads (a listener
        // that never accepts, on loopback) is bounded too.
        let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let (_, auth) = setup(LdapConfig {
            url: format!("ldap://{}", silent.local_addr().unwrap()),
            timeout: Duration::from_secs(1),
            ..config(&slapd)
        })
        .await;
        let started = Instant::now();
        assert!(matches!(
            login(&auth, "carol", "carol-pw").await,
            Err(AuthError::Source(_))
        ));
        assert!(
            started.elapsed() < Duration::from_secs(6),
            "{:?}",
            started.elapsed()
        );
    }

    /// A directory that accepts connections but never answers (frozen with SIGSTOP) fails
    /// the login within the configured timeouts; thawed, it serves again.
    #[tokio::test]
    async fn a_hanging_directory_fails_in_time() {
        let slapd = Slapd::start(&directory()).await.unwrap();
        let (_, auth) = setup(LdapConfig {
            timeout: Duration::from_secs(1),
            ..config(&slapd)
        })
        .await;
        slapd.freeze(true);
        let started = Instant::now();
        let result = login(&auth, "carol", "carol-pw").await;
        let took = started.elapsed();
        slapd.freeze(false);
        assert!(matches!(result, Err(AuthError::Source(_))), "{result:?}");
        assert!(took < Duration::from_secs(3), "{took:?}");
        assert_eq!(
            login(&auth, "carol", "carol-pw").await.unwrap(),
            ["students"]
        );
    }

    #[tokio::test]
    async fn filter_metacharacters_never_widen_the_search() {
        let slapd = Slapd::start(&directory()).await.unwrap();
        let (_, auth) = setup(config(&slapd)).await;
        // The login name grammar refuses them before any source is asked.
        for user in ["*", "carol)(uid=*", "*)(|(uid=*", "carol*", "\\2a"] {
            assert!(
                matches!(login(&auth, user, "carol-pw").await, Err(AuthError::Failed)),
                "{user}"
            );
        }
        // And the directory client escapes them anyway: a name that is a filter matches
        // nobody, where unescaped it would match carol (or everyone).
        let ldap = Ldap::new(config(&slapd));
        for user in ["*", "carol)(uid=*", "c*", "carol)(|(uid=*"] {
            assert_eq!(
                ldap.check_password(user, "carol-pw").await.unwrap(),
                None,
                "{user}"
            );
        }
        assert!(
            ldap.check_password("carol", "carol-pw")
                .await
                .unwrap()
                .is_some()
        );
    }

    #[tokio::test]
    async fn starttls_is_verified_against_the_configured_ca() {
        let slapd = Slapd::start(&directory()).await.unwrap();
        let tls = crate::identity::tls_trusting(&slapd.ca_path()).unwrap();
        let (_, auth) = setup(LdapConfig {
            starttls: true,
            tls: Some(tls),
            ..config(&slapd)
        })
        .await;
        assert_eq!(
            login(&auth, "carol", "carol-pw").await.unwrap(),
            ["students"]
        );
        // A CA that did not issue slapd's certificate: nothing is sent, the login fails as an
        // outage, not as a wrong password.
        let foreign = crate::testkit::TestPki::new().unwrap();
        let (_, auth) = setup(LdapConfig {
            starttls: true,
            tls: Some(crate::identity::tls_trusting(&foreign.ca_path()).unwrap()),
            ..config(&slapd)
        })
        .await;
        assert!(matches!(
            login(&auth, "carol", "carol-pw").await,
            Err(AuthError::Source(_))
        ));
    }

    #[test]
    fn configurations_are_checked_before_use() {
        let good = LdapConfig {
            url: "ldap://127.0.0.1:389".into(),
            starttls: false,
            tls: None,
            bind_dn: String::new(),
            bind_password: String::new(),
            base_dn: LDAP_SUFFIX.into(),
            user_filter: DEFAULT_USER_FILTER.into(),
            group_filter: DEFAULT_GROUP_FILTER.into(),
            group_attribute: "cn".into(),
            disabled_filter: String::new(),
            timeout: Duration::from_secs(1),
        };
        assert_eq!(good.validate(), Ok(()));
        for (bad, why) in [
            (
                LdapConfig {
                    url: "http://x".into(),
                    ..good.clone()
                },
                "not ldap://",
            ),
            (
                LdapConfig {
                    url: "ldaps://x".into(),
                    starttls: true,
                    ..good.clone()
                },
                "StartTLS",
            ),
            (
                LdapConfig {
                    user_filter: "(uid=alice)".into(),
                    ..good.clone()
                },
                "{user}",
            ),
            (
                LdapConfig {
                    disabled_filter: "shadowExpire=1".into(),
                    ..good.clone()
                },
                "parentheses",
            ),
            (
                LdapConfig {
                    base_dn: String::new(),
                    ..good.clone()
                },
                "base DN",
            ),
        ] {
            let err = bad.validate().unwrap_err();
            assert!(err.contains(why), "{err}");
        }
    }
}
