//! An auth webhook and a config webhook in ContainerSSH's JSON shapes, so a lab migrating
//! from ContainerSSH keeps its auth server (docs/identity.md has the field-by-field table).
//!
//! Password and public-key checks are POSTed to `<url>/password` and `<url>/pubkey`; the
//! answer's `success` decides. Each request has a timeout; a connection error or a 5xx is
//! retried a bounded number of times with exponential backoff (ContainerSSH sleeps a fixed
//! 10 s), while a 4xx or `success: false` is an answer. Positive answers are cached for at
//! most the token lifetime.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{Request, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::{self, pki_types::ServerName};

use super::{AnswerCache, ExternalUser, SOURCE_WEBHOOK, SourceError, is_group_name};

/// The largest answer read; anything longer is a broken server.
const MAX_ANSWER_BYTES: usize = 64 * 1024;
/// The first retry's delay; each further one doubles it.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
/// The metadata key whose value (comma-separated) sets the user's envgate groups.
pub const GROUPS_METADATA: &str = "envgate_groups";

/// One webhook endpoint (`--auth-webhook-*` or `--config-webhook-*`).
#[derive(Clone)]
pub struct WebhookConfig {
    /// `https://host[:port][/path]`.
    pub url: Uri,
    pub tls: Arc<rustls::ClientConfig>,
    /// Bound on each request, connecting included.
    pub timeout: Duration,
    /// Further attempts after a connection error or a 5xx.
    pub retries: u32,
}

impl WebhookConfig {
    /// Parses `url`, which must be https:// with a host.
    pub fn parse_url(url: &str) -> Result<Uri, String> {
        let uri: Uri = url.parse().map_err(|e| format!("{url:?}: {e}"))?;
        if uri.scheme_str() != Some("https") {
            return Err(format!(
                "{url:?} is not https:// (the requests carry passwords and decide logins)"
            ));
        }
        if uri.host().is_none_or(str::is_empty) {
            return Err(format!("{url:?} has no host"));
        }
        if uri.query().is_some() {
            return Err(format!("{url:?}: a query string is not supported"));
        }
        Ok(uri)
    }

    /// This endpoint's URL with `suffix` appended to its path (`/password`, `/pubkey`).
    fn endpoint(&self, suffix: &str) -> Uri {
        let path = self.url.path().trim_end_matches('/');
        let authority = self.url.authority().map(|a| a.as_str()).unwrap_or_default();
        format!("https://{authority}{path}{suffix}")
            .parse()
            .unwrap_or_else(|_| self.url.clone())
    }
}

/// A small HTTPS JSON client: one connection per request (logins are rare next to their
/// cache), a timeout on each, retries with backoff on what may pass.
struct Client {
    config: WebhookConfig,
    what: &'static str,
}

/// Why one attempt failed.
enum Failure {
    /// Worth another attempt: no connection, TLS refused, a broken exchange.
    Transient(String),
    /// Not worth one: the endpoint took longer than the timeout.
    TimedOut,
}

impl Client {
    fn error(&self, detail: String) -> SourceError {
        SourceError::Webhook(format!("{} {}: {detail}", self.what, self.config.url))
    }

    /// POSTs `body` to `uri`; the status and body of the first answer that is not a 5xx.
    async fn post(&self, uri: &Uri, body: Vec<u8>) -> Result<(StatusCode, Bytes), SourceError> {
        let body = Bytes::from(body);
        let mut last = String::new();
        for attempt in 0..=self.config.retries {
            if attempt > 0 {
                let delay = FIRST_BACKOFF * 2u32.saturating_pow(attempt - 1);
                let jittered = delay.mul_f64(0.5 + rand::random::<f64>() / 2.0);
                tokio::time::sleep(jittered).await;
            }
            match tokio::time::timeout(self.config.timeout, self.post_once(uri, body.clone()))
                .await
                .unwrap_or(Err(Failure::TimedOut))
            {
                Ok((status, _)) if status.is_server_error() => {
                    last = format!("answered {status}");
                }
                Ok(answer) => return Ok(answer),
                Err(Failure::Transient(e)) => last = e,
                Err(Failure::TimedOut) => {
                    return Err(self.error(format!(
                        "no answer within {} ms",
                        self.config.timeout.as_millis()
                    )));
                }
            }
            tracing::debug!(webhook = self.what, attempt, error = %last, "webhook attempt failed");
        }
        Err(self.error(format!("{last} ({} attempts)", self.config.retries + 1)))
    }

    async fn post_once(&self, uri: &Uri, body: Bytes) -> Result<(StatusCode, Bytes), Failure> {
        let transient =
            |what: &str, e: &dyn std::fmt::Display| Failure::Transient(format!("{what}: {e}"));
        let host = uri.host().unwrap_or_default();
        let bare_host = host.trim_start_matches('[').trim_end_matches(']');
        let port = uri.port_u16().unwrap_or(443);
        let tcp = TcpStream::connect((bare_host, port))
            .await
            .map_err(|e| transient("connecting", &e))?;
        let name =
            ServerName::try_from(bare_host.to_owned()).map_err(|e| transient("server name", &e))?;
        let tls = TlsConnector::from(self.config.tls.clone())
            .connect(name, tcp)
            .await
            .map_err(|e| transient("TLS", &e))?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| transient("HTTP", &e))?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        let authority = uri.authority().map(|a| a.as_str()).unwrap_or(host);
        let request = Request::post(uri.path())
            .header(hyper::header::HOST, authority)
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .header(hyper::header::ACCEPT, "application/json")
            .body(Full::new(body))
            .map_err(|e| transient("request", &e))?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| transient("HTTP", &e))?;
        let status = response.status();
        let body = Limited::new(response.into_body(), MAX_ANSWER_BYTES)
            .collect()
            .await
            .map_err(|e| transient("reading the answer", &e))?
            .to_bytes();
        Ok((status, body))
    }
}

/// ContainerSSH's `metadata` entries: `{"name": {"value": "...", "sensitive": false}}`.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct MetadataValue {
    #[serde(default)]
    pub value: String,
    #[serde(default)]
    pub sensitive: bool,
}

/// The fields every ContainerSSH auth request carries (`ConnectionAuthPendingMetadata`).
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct Connection<'a> {
    username: &'a str,
    remote_address: &'a str,
    connection_id: String,
    client_version: &'a str,
}

impl<'a> Connection<'a> {
    fn new(username: &'a str, remote_address: &'a str) -> Self {
        Self {
            username,
            remote_address,
            // The control plane does not see the proxy's connection id here; a fresh one per
            // check still lets the server correlate its own logs.
            connection_id: uuid::Uuid::new_v4().simple().to_string(),
            client_version: "",
        }
    }
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct PasswordRequest<'a> {
    #[serde(flatten)]
    connection: Connection<'a>,
    password_base64: String,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct PublicKeyRequest<'a> {
    #[serde(flatten)]
    connection: Connection<'a>,
    /// authorized_keys format.
    public_key: &'a str,
}

/// ContainerSSH's `AuthResponseBody`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct AuthAnswer {
    success: bool,
    #[serde(default)]
    authenticated_username: String,
    #[serde(default)]
    metadata: std::collections::HashMap<String, MetadataValue>,
}

/// The auth webhook (`--auth-webhook-url`).
pub struct AuthWebhook {
    client: Client,
    cache: AnswerCache,
}

impl AuthWebhook {
    /// Positive answers are cached for `cache_ttl` (the token lifetime).
    pub fn new(config: WebhookConfig, cache_ttl: Duration) -> Self {
        Self {
            client: Client {
                config,
                what: "auth webhook",
            },
            cache: AnswerCache::new(cache_ttl),
        }
    }

    pub async fn password(
        &self,
        user: &str,
        password: &str,
        client_address: &str,
    ) -> Result<Option<ExternalUser>, SourceError> {
        let credential = [b"password:".as_slice(), password.as_bytes()].concat();
        let request = PasswordRequest {
            connection: Connection::new(user, client_address),
            password_base64: base64::engine::general_purpose::STANDARD.encode(password),
        };
        self.ask("/password", user, &credential, &request).await
    }

    /// `key` is an authorized_keys line (`ssh-ed25519 AAAA…`).
    pub async fn public_key(
        &self,
        user: &str,
        key: &str,
        client_address: &str,
    ) -> Result<Option<ExternalUser>, SourceError> {
        let credential = [b"publickey:".as_slice(), key.as_bytes()].concat();
        let request = PublicKeyRequest {
            connection: Connection::new(user, client_address),
            public_key: key,
        };
        self.ask("/pubkey", user, &credential, &request).await
    }

    async fn ask(
        &self,
        path: &str,
        user: &str,
        credential: &[u8],
        request: &impl Serialize,
    ) -> Result<Option<ExternalUser>, SourceError> {
        if let Some(hit) = self.cache.get(user, credential) {
            return Ok(Some(hit));
        }
        let body = serde_json::to_vec(request).expect("requests serialize");
        let (status, answer) = self
            .client
            .post(&self.client.config.endpoint(path), body)
            .await?;
        if !status.is_success() {
            tracing::info!(user, %status, "the auth webhook refused a login");
            return Ok(None);
        }
        let answer: AuthAnswer = serde_json::from_slice(&answer).map_err(|e| {
            self.client
                .error(format!("answered {status} with no AuthResponseBody: {e}"))
        })?;
        if !answer.success {
            return Ok(None);
        }
        if !answer.authenticated_username.is_empty() && answer.authenticated_username != user {
            tracing::warn!(
                user,
                authenticated = %answer.authenticated_username,
                "the auth webhook answered for another user name; envgate does not rename users, refused"
            );
            return Ok(None);
        }
        let groups = answer
            .metadata
            .get(GROUPS_METADATA)
            .map(|v| {
                let mut groups: Vec<String> = v
                    .value
                    .split(',')
                    .map(str::trim)
                    .filter(|g| is_group_name(g))
                    .map(str::to_owned)
                    .collect();
                groups.sort();
                groups.dedup();
                groups
            })
            .unwrap_or_default();
        let found = ExternalUser {
            name: user.to_owned(),
            groups,
            source: SOURCE_WEBHOOK,
        };
        self.cache.insert(user, credential, found.clone());
        Ok(Some(found))
    }
}

/// ContainerSSH's config request (`ConnectionAuthenticatedMetadata`).
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct ConfigRequest<'a> {
    #[serde(flatten)]
    connection: Connection<'a>,
    authenticated_username: &'a str,
}

/// ContainerSSH's `ConfigResponseBody`; envgate reads only `config.envgate.environment`.
#[derive(Debug, Default, Deserialize)]
struct ConfigAnswer {
    #[serde(default)]
    config: ConfigSection,
}

#[derive(Debug, Default, Deserialize)]
struct ConfigSection {
    #[serde(default)]
    envgate: EnvgateSection,
}

#[derive(Debug, Default, Deserialize)]
struct EnvgateSection {
    #[serde(default)]
    environment: String,
}

/// The config webhook (`--config-webhook-url`): chooses the environment of a login that named
/// none.
pub struct ConfigWebhook {
    client: Client,
}

impl ConfigWebhook {
    pub fn new(config: WebhookConfig) -> Self {
        Self {
            client: Client {
                config,
                what: "config webhook",
            },
        }
    }

    /// The environment the webhook chose for `user` (`None`: it chose none).
    pub async fn environment(
        &self,
        user: &str,
        client_address: &str,
    ) -> Result<Option<String>, SourceError> {
        let request = ConfigRequest {
            connection: Connection::new(user, client_address),
            authenticated_username: user,
        };
        let body = serde_json::to_vec(&request).expect("requests serialize");
        let (status, answer) = self.client.post(&self.client.config.url, body).await?;
        if !status.is_success() {
            return Err(self.client.error(format!("answered {status}")));
        }
        let answer: ConfigAnswer = serde_json::from_slice(&answer).map_err(|e| {
            self.client
                .error(format!("answered {status} with no ConfigResponseBody: {e}"))
        })?;
        Ok(Some(answer.config.envgate.environment).filter(|e| !e.is_empty()))
    }
}

/// Against a real HTTPS server (axum over tokio-rustls, a certificate from a test CA) that
/// counts the requests it answers, through the `Authenticator` as the Auth service calls it.
#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use envgate_proto::audit::AuditLog;
    use tonic::Status;

    use super::*;
    use crate::auth::tests::{
        keypair, password_login as login, test_keys, test_limits, with_sources,
    };
    use crate::auth::{Authenticator, Credential};
    use crate::error::AuthError;
    use crate::fixtures::{World, fast, no_progress};
    use crate::identity::{Sources, tls_trusting};
    use crate::model::{self, UserRecord};
    use crate::store::{self, MemoryStore};
    use crate::testkit::{TestPki, WebhookServer};

    /// ContainerSSH's auth server, as a lab would have written it: dora's password is
    /// `hook-pw` and her groups come in the metadata; eve is answered under another name,
    /// frank with a 401; carol and alice are given debian by the config webhook.
    async fn serve() -> WebhookServer {
        let server = WebhookServer::start().await.unwrap();
        server.accept_password("dora", "hook-pw", &["students", "gpu"]);
        server.answer_as("eve", "root");
        server.answer_status("frank", 401);
        server.choose_environment("carol", "debian");
        server.choose_environment("alice", "debian");
        server
    }

    fn endpoint(url: &str, ca: &std::path::Path, timeout: Duration, retries: u32) -> WebhookConfig {
        WebhookConfig {
            url: WebhookConfig::parse_url(url).unwrap(),
            tls: tls_trusting(ca).unwrap(),
            timeout,
            retries,
        }
    }

    /// An authenticator asking the auth webhook at `server`'s `/hook`, with alice local
    /// (password `s3cret`).
    async fn setup(
        url: &str,
        ca: &std::path::Path,
        timeout: Duration,
        retries: u32,
    ) -> (Arc<MemoryStore>, Authenticator) {
        let webhook = AuthWebhook::new(
            endpoint(url, ca, timeout, retries),
            Duration::from_secs(300),
        );
        with_sources(Sources {
            webhook: Some(webhook),
            ..Sources::default()
        })
        .await
    }

    #[tokio::test]
    async fn the_answer_decides_in_containerssh_shapes() {
        let server = serve().await;
        let (store, auth) = setup(
            &server.auth_url(),
            &server.ca_path(),
            Duration::from_secs(2),
            2,
        )
        .await;
        assert_eq!(
            login(&auth, "dora", "hook-pw").await.unwrap(),
            ["gpu", "students"]
        );
        let request = server.requests()[0].1.clone();
        assert_eq!(request["username"], "dora");
        assert_eq!(request["passwordBase64"], "aG9vay1wdw==");
        assert_eq!(request["remoteAddress"], "192.0.2.7:4000");
        assert!(request["connectionId"].as_str().unwrap().len() >= 5);
        let dora = store::get_json::<UserRecord>(store.as_ref(), &model::user_key("dora"))
            .await
            .unwrap()
            .unwrap()
            .value;
        assert_eq!((dora.source.as_str(), dora.groups.len()), ("webhook", 2));
        for (user, password, why) in [
            ("dora", "wrong", "success: false"),
            ("frank", "any", "a 401 is an answer"),
            ("eve", "any", "an answer for another user name"),
        ] {
            let before = server.hits();
            let err = login(&auth, user, password).await.unwrap_err();
            assert!(matches!(err, AuthError::Failed), "{why}: {err:?}");
            assert_eq!(
                server.hits(),
                before + 1,
                "{why}: asked once, never retried"
            );
        }
        // The local alice decides alone: the webhook is not even asked for her.
        let before = server.hits();
        assert!(matches!(
            login(&auth, "alice", "hook-pw").await,
            Err(AuthError::Failed)
        ));
        assert!(login(&auth, "alice", "s3cret").await.is_ok());
        assert_eq!(server.hits(), before);
    }

    #[tokio::test]
    async fn a_positive_answer_is_cached_and_a_refusal_is_not() {
        let server = serve().await;
        let (_, auth) = setup(
            &server.auth_url(),
            &server.ca_path(),
            Duration::from_secs(2),
            0,
        )
        .await;
        login(&auth, "dora", "hook-pw").await.unwrap();
        assert_eq!(server.hits(), 1);
        login(&auth, "dora", "hook-pw").await.unwrap();
        assert_eq!(server.hits(), 1, "the second login made no request");
        let _ = login(&auth, "dora", "wrong").await;
        let _ = login(&auth, "dora", "wrong").await;
        assert_eq!(server.hits(), 3, "each refusal was asked for");
    }

    #[tokio::test]
    async fn errors_are_retried_with_backoff_but_only_so_often() {
        let server = serve().await;
        let (_, auth) = setup(
            &server.auth_url(),
            &server.ca_path(),
            Duration::from_secs(2),
            2,
        )
        .await;
        server.fail_next(2);
        assert!(login(&auth, "dora", "hook-pw").await.is_ok());
        assert_eq!(server.hits(), 3, "two 500s, then the answer");
        // Always 500: three attempts, then a clear outage.
        let (_, auth) = setup(
            &server.auth_url(),
            &server.ca_path(),
            Duration::from_secs(2),
            2,
        )
        .await;
        server.fail_next(100);
        let err = login(&auth, "dora", "hook-pw").await.unwrap_err();
        assert_eq!(server.hits(), 6);
        let status = Status::from(err);
        assert_eq!(status.code(), tonic::Code::Unavailable);
        assert!(
            status.message().starts_with(
                "the authentication service is unavailable; try again later (request id "
            ),
            "{}",
            status.message()
        );
    }

    #[tokio::test]
    async fn a_slow_or_dead_webhook_fails_in_time_and_local_users_still_log_in() {
        let server = serve().await;
        server.set_slow(true);
        let (_, auth) = setup(
            &server.auth_url(),
            &server.ca_path(),
            Duration::from_secs(1),
            2,
        )
        .await;
        let started = Instant::now();
        assert!(matches!(
            login(&auth, "dora", "hook-pw").await,
            Err(AuthError::Source(_))
        ));
        assert!(
            started.elapsed() < Duration::from_millis(2500),
            "{:?}",
            started.elapsed()
        );
        assert_eq!(server.hits(), 1, "a timeout is not retried");
        assert!(login(&auth, "alice", "s3cret").await.is_ok());
        // Nothing listens any more: bounded retries, then the same clear failure.
        let (_, auth) = setup(
            &server.auth_url(),
            &server.ca_path(),
            Duration::from_secs(1),
            2,
        )
        .await;
        drop(server);
        let started = Instant::now();
        let err = login(&auth, "dora", "hook-pw").await.unwrap_err();
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
        assert_eq!(Status::from(err).code(), tonic::Code::Unavailable);
        assert!(login(&auth, "alice", "s3cret").await.is_ok());
    }

    #[tokio::test]
    async fn a_certificate_from_another_ca_is_refused() {
        let server = serve().await;
        let other = TestPki::new().unwrap();
        let (_, auth) = setup(
            &server.auth_url(),
            &other.ca_path(),
            Duration::from_secs(1),
            0,
        )
        .await;
        assert!(matches!(
            login(&auth, "dora", "hook-pw").await,
            Err(AuthError::Source(_))
        ));
        assert_eq!(
            server.hits(),
            0,
            "no request was sent to a server not proven by the CA"
        );
        drop(other);
        // Plain http:// is refused at start.
        assert!(WebhookConfig::parse_url("http://127.0.0.1:1/hook").is_err());
    }

    #[tokio::test]
    async fn public_keys_are_asked_of_pubkey() {
        let server = serve().await;
        let (key, line) = keypair();
        server.accept_key("dora", &line, &["students"]);
        let (_, auth) = setup(
            &server.auth_url(),
            &server.ca_path(),
            Duration::from_secs(2),
            0,
        )
        .await;
        let wire = key.public_key().to_bytes().unwrap();
        assert!(
            auth.check_public_key("dora", &wire, "192.0.2.7:1")
                .await
                .unwrap()
        );
        let issued = auth
            .authenticate("dora", Credential::PublicKey(wire.clone()), "192.0.2.7:1")
            .await
            .unwrap();
        assert_eq!(issued.user, "dora");
        assert_eq!(
            server.hits(),
            1,
            "the offer's answer was reused for the login"
        );
        let request = server.requests()[0].1.clone();
        assert!(
            request["publicKey"]
                .as_str()
                .unwrap()
                .starts_with("ssh-ed25519 ")
        );
        let (other, _) = keypair();
        let other = other.public_key().to_bytes().unwrap();
        assert!(
            !auth
                .check_public_key("dora", &other, "192.0.2.7:1")
                .await
                .unwrap()
        );
        assert!(matches!(
            auth.authenticate("dora", Credential::PublicKey(other), "192.0.2.7:1")
                .await,
            Err(AuthError::Failed)
        ));
    }

    #[tokio::test]
    async fn the_config_webhook_chooses_among_the_allowed_environments() {
        let server = serve().await;
        let mut world = World::new().await;
        world.auth = Arc::new(
            Authenticator::new(
                world.store.clone(),
                test_keys(),
                Duration::from_secs(300),
                test_limits(2, 64),
                AuditLog::in_memory(),
            )
            .with_identity(Arc::new(Sources {
                config: Some(ConfigWebhook::new(endpoint(
                    &server.config_url(),
                    &server.ca_path(),
                    Duration::from_secs(2),
                    0,
                ))),
                ..Sources::default()
            })),
        );
        let placer = world.placer(fast());
        // carol (staff) may use debian: the webhook's choice.
        let placed = placer
            .open(world.request("carol", ""), &no_progress)
            .await
            .unwrap();
        assert_eq!(placed.environment, "debian");
        assert_eq!(server.hits(), 1);
        // alice (students) may not: the catalogue's default instead.
        let placed = placer
            .open(world.request("alice", ""), &no_progress)
            .await
            .unwrap();
        assert_eq!(placed.environment, "busybox");
        // A named environment always wins, without asking.
        let placed = placer
            .open(world.request("carol", "busybox"), &no_progress)
            .await
            .unwrap();
        assert_eq!(placed.environment, "busybox");
        assert_eq!(server.hits(), 2);
        // The webhook gone: the catalogue's default, not a failed login.
        drop(server);
        let placed = placer
            .open(world.request("carol", ""), &no_progress)
            .await
            .unwrap();
        assert_eq!(placed.environment, "busybox");
    }

    /// Guesses through the webhook count as any password's: past the free allowance they are
    /// refused before the webhook is asked.
    #[tokio::test]
    async fn webhook_guesses_share_the_password_throttle() {
        let server = serve().await;
        let (_, auth) = setup(
            &server.auth_url(),
            &server.ca_path(),
            Duration::from_secs(2),
            0,
        )
        .await;
        let free = crate::throttle::ThrottlePolicy::default().free_failures as usize;
        for i in 0..free {
            assert!(matches!(
                login(&auth, "dora", &format!("guess{i}")).await,
                Err(AuthError::Failed)
            ));
        }
        assert_eq!(server.hits(), free);
        assert!(matches!(
            login(&auth, "dora", "hook-pw").await,
            Err(AuthError::Throttled(_))
        ));
        assert_eq!(
            server.hits(),
            free,
            "a throttled attempt never reaches the webhook"
        );
    }

    /// LDAP is asked first and the webhook after it; the webhook still answers while the
    /// directory is down, and a user neither accepts fails as an outage, not as a wrong
    /// password, while the directory is down.
    #[tokio::test]
    async fn the_directory_first_then_the_webhook() {
        use crate::identity::ldap::{DEFAULT_GROUP_FILTER, DEFAULT_USER_FILTER};
        use crate::identity::{Ldap, LdapConfig};
        use crate::testkit::{LDAP_SERVICE_DN, LDAP_SERVICE_PASSWORD, LDAP_SUFFIX, Slapd};
        let mut slapd = Slapd::start(&format!(
            "dn: uid=carol,ou=people,{LDAP_SUFFIX}\nobjectClass: inetOrgPerson\n\
             objectClass: posixAccount\nuid: carol\ncn: carol\nsn: carol\nuidNumber: 10001\n\
             gidNumber: 10001\nhomeDirectory: /home/carol\nuserPassword: carol-pw\n"
        ))
        .await
        .unwrap();
        let server = serve().await;
        let store = Arc::new(MemoryStore::new());
        let auth = Authenticator::new(
            store.clone(),
            test_keys(),
            Duration::from_secs(300),
            test_limits(2, 64),
            AuditLog::in_memory(),
        )
        .with_identity(Arc::new(Sources {
            ldap: Some(Ldap::new(LdapConfig {
                url: slapd.url(),
                starttls: false,
                tls: None,
                bind_dn: LDAP_SERVICE_DN.into(),
                bind_password: LDAP_SERVICE_PASSWORD.into(),
                base_dn: LDAP_SUFFIX.into(),
                user_filter: DEFAULT_USER_FILTER.into(),
                group_filter: DEFAULT_GROUP_FILTER.into(),
                group_attribute: "cn".into(),
                disabled_filter: String::new(),
                timeout: Duration::from_secs(2),
            })),
            webhook: Some(AuthWebhook::new(
                endpoint(
                    &server.auth_url(),
                    &server.ca_path(),
                    Duration::from_secs(2),
                    0,
                ),
                Duration::from_secs(300),
            )),
            ..Sources::default()
        }));
        let source = |user: &'static str| {
            let store = store.clone();
            async move {
                store::get_json::<UserRecord>(store.as_ref(), &model::user_key(user))
                    .await
                    .unwrap()
                    .unwrap()
                    .value
                    .source
            }
        };
        login(&auth, "carol", "carol-pw").await.unwrap();
        assert_eq!((source("carol").await, server.hits()), ("ldap".into(), 0));
        login(&auth, "dora", "hook-pw").await.unwrap();
        assert_eq!((source("dora").await, server.hits()), ("webhook".into(), 1));
        // The webhook down: a password the directory refused still counts as a failure, so an
        // outage lets no guesser past the throttle.
        let free = crate::throttle::ThrottlePolicy::default().free_failures as usize;
        drop(server);
        for i in 0..free {
            let err = login(&auth, "carol", &format!("guess{i}"))
                .await
                .unwrap_err();
            let status = Status::from(err);
            assert_eq!(status.code(), tonic::Code::Unavailable);
            assert!(
                status
                    .message()
                    .starts_with("the authentication service is unavailable"),
                "{}",
                status.message()
            );
        }
        assert!(matches!(
            login(&auth, "carol", "carol-pw").await,
            Err(AuthError::Throttled(_))
        ));
        // The directory down too: the webhook's cached answer still lets dora in; carol (from
        // an address the guesses did not slow down) fails as an outage.
        slapd.kill();
        login(&auth, "dora", "hook-pw")
            .await
            .expect("the webhook's cached answer without the directory");
        let err = auth
            .authenticate(
                "carol",
                Credential::Password("carol-pw".into()),
                "198.51.100.1:1",
            )
            .await
            .err()
            .unwrap();
        let status = Status::from(err);
        assert_eq!(status.code(), tonic::Code::Unavailable);
        assert!(
            status.message().starts_with("the directory is unavailable"),
            "{}",
            status.message()
        );
    }
}
