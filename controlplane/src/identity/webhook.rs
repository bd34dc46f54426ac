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
