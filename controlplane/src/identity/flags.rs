//! The identity sources' command-line flags, flattened into the control plane's own. Every
//! source is off unless its URL is given.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio_rustls::rustls;

use super::ldap::{DEFAULT_GROUP_FILTER, DEFAULT_USER_FILTER};
use super::{AuthWebhook, ConfigWebhook, Ldap, LdapConfig, Sources, WebhookConfig, tls_trusting};

/// Debian's bundle of the system's trusted CAs, trusted by the webhooks without a CA file.
const SYSTEM_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

#[derive(Debug, clap::Args)]
pub struct IdentityFlags {
    /// LDAP directory password logins are checked against by search-then-bind, for names the
    /// admin API does not own (docs/identity.md): ldap://host:port or ldaps://host:port.
    /// Unset: no LDAP.
    #[arg(long, env = "ENVGATE_LDAP_URL")]
    pub ldap_url: Option<String>,
    /// Upgrade the ldap:// connection with StartTLS before binding.
    #[arg(long, env = "ENVGATE_LDAP_STARTTLS")]
    pub ldap_starttls: bool,
    /// CA certificates (PEM) trusted for ldaps:// and StartTLS; unset: the system's.
    #[arg(long, env = "ENVGATE_LDAP_CA_FILE")]
    pub ldap_ca_file: Option<PathBuf>,
    /// The service account that searches for users and groups; empty: anonymous search.
    #[arg(long, env = "ENVGATE_LDAP_BIND_DN", default_value = "")]
    pub ldap_bind_dn: String,
    /// File holding the service account's password (one line).
    #[arg(long, env = "ENVGATE_LDAP_BIND_PASSWORD_FILE")]
    pub ldap_bind_password_file: Option<PathBuf>,
    /// Where users and groups are searched (subtree), e.g. dc=lab,dc=example.
    #[arg(long, env = "ENVGATE_LDAP_BASE_DN", default_value = "")]
    pub ldap_base_dn: String,
    /// Finds the user's entry; {user} is the login name, escaped (RFC 4515). Exactly one entry
    /// must match.
    #[arg(long, env = "ENVGATE_LDAP_USER_FILTER", default_value = DEFAULT_USER_FILTER)]
    pub ldap_user_filter: String,
    /// Finds the user's groups; {user} is the login name and {dn} the user's entry, escaped.
    /// Their names become envgate groups (environments' allowed_groups). Empty: no groups.
    #[arg(long, env = "ENVGATE_LDAP_GROUP_FILTER", default_value = DEFAULT_GROUP_FILTER)]
    pub ldap_group_filter: String,
    /// The group entries' attribute that names the envgate group.
    #[arg(long, env = "ENVGATE_LDAP_GROUP_ATTRIBUTE", default_value = "cn")]
    pub ldap_group_attribute: String,
    /// A filter matching disabled user entries, checked against the user's entry, e.g.
    /// (shadowExpire=1) or (pwdAccountLockedTime=*); a match refuses the login. Empty: none.
    #[arg(long, env = "ENVGATE_LDAP_DISABLED_FILTER", default_value = "")]
    pub ldap_disabled_filter: String,
    /// Seconds connecting and each LDAP operation may take.
    #[arg(long, env = "ENVGATE_LDAP_TIMEOUT", default_value_t = 3,
          value_parser = clap::value_parser!(u64).range(1..=30))]
    pub ldap_timeout: u64,
    /// ContainerSSH-compatible auth webhook: password and public-key checks are POSTed to
    /// <URL>/password and <URL>/pubkey (after local users and LDAP). https:// only. Unset: none.
    #[arg(long, env = "ENVGATE_AUTH_WEBHOOK_URL")]
    pub auth_webhook_url: Option<String>,
    /// CA certificates (PEM) trusted for the webhooks; unset: the system's.
    #[arg(long, env = "ENVGATE_AUTH_WEBHOOK_CA_FILE")]
    pub auth_webhook_ca_file: Option<PathBuf>,
    /// Seconds one webhook request may take, connecting included (not retried).
    #[arg(long, env = "ENVGATE_AUTH_WEBHOOK_TIMEOUT", default_value_t = 2,
          value_parser = clap::value_parser!(u64).range(1..=8))]
    pub auth_webhook_timeout: u64,
    /// Further attempts after a connection error or a 5xx, with exponential backoff from
    /// 100 ms; a 4xx or "success": false is an answer and never retried.
    #[arg(long, env = "ENVGATE_AUTH_WEBHOOK_RETRIES", default_value_t = 2,
          value_parser = clap::value_parser!(u32).range(0..=5))]
    pub auth_webhook_retries: u32,
    /// ContainerSSH-compatible config webhook: chooses the environment of a login that names
    /// none and has no saved default, from {"config": {"envgate": {"environment": NAME}}}.
    /// https:// only; uses the auth webhook's CA file, timeout and retries. Unset: none.
    #[arg(long, env = "ENVGATE_CONFIG_WEBHOOK_URL")]
    pub config_webhook_url: Option<String>,
}

impl IdentityFlags {
    /// The configured sources; positive webhook answers are cached for `token_ttl`.
    pub fn sources(self, token_ttl: Duration) -> Result<Sources, String> {
        let given = |url: &Option<String>| {
            url.as_deref()
                .filter(|u| !u.trim().is_empty())
                .map(str::to_owned)
        };
        let ldap = match given(&self.ldap_url) {
            None => None,
            Some(url) => {
                let bind_password = match &self.ldap_bind_password_file {
                    Some(path) => std::fs::read_to_string(path)
                        .map_err(|e| format!("--ldap-bind-password-file: {}: {e}", path.display()))?
                        .trim_end_matches(['\r', '\n'])
                        .to_owned(),
                    None => String::new(),
                };
                let tls = match &self.ldap_ca_file {
                    Some(path) => {
                        Some(tls_trusting(path).map_err(|e| format!("--ldap-ca-file: {e}"))?)
                    }
                    None => None,
                };
                let config = LdapConfig {
                    url,
                    starttls: self.ldap_starttls,
                    tls,
                    bind_dn: self.ldap_bind_dn,
                    bind_password,
                    base_dn: self.ldap_base_dn,
                    user_filter: self.ldap_user_filter,
                    group_filter: self.ldap_group_filter,
                    group_attribute: self.ldap_group_attribute,
                    disabled_filter: self.ldap_disabled_filter,
                    timeout: Duration::from_secs(self.ldap_timeout),
                };
                config.validate().map_err(|e| format!("--ldap-*: {e}"))?;
                Some(Ldap::new(config))
            }
        };
        let auth_url = given(&self.auth_webhook_url);
        let config_url = given(&self.config_webhook_url);
        let tls = if auth_url.is_some() || config_url.is_some() {
            let path = self
                .auth_webhook_ca_file
                .clone()
                .unwrap_or_else(|| PathBuf::from(SYSTEM_CA_BUNDLE));
            Some(webhook_tls(&path)?)
        } else {
            None
        };
        let endpoint = |flag: &str, url: &str, tls: Arc<rustls::ClientConfig>| {
            Ok::<_, String>(WebhookConfig {
                url: WebhookConfig::parse_url(url).map_err(|e| format!("{flag}: {e}"))?,
                tls,
                timeout: Duration::from_secs(self.auth_webhook_timeout),
                retries: self.auth_webhook_retries,
            })
        };
        let webhook = match (&auth_url, &tls) {
            (Some(url), Some(tls)) => Some(AuthWebhook::new(
                endpoint("--auth-webhook-url", url, tls.clone())?,
                token_ttl,
            )),
            _ => None,
        };
        let config = match (&config_url, &tls) {
            (Some(url), Some(tls)) => Some(ConfigWebhook::new(endpoint(
                "--config-webhook-url",
                url,
                tls.clone(),
            )?)),
            _ => None,
        };
        Ok(Sources {
            ldap,
            webhook,
            config,
        })
    }
}

fn webhook_tls(path: &Path) -> Result<Arc<rustls::ClientConfig>, String> {
    tls_trusting(path).map_err(|e| format!("--auth-webhook-ca-file: {e}"))
}
