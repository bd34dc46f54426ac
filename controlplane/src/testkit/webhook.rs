//! A ContainerSSH-style auth and config webhook server for tests: HTTPS (axum over
//! tokio-rustls, a certificate for 127.0.0.1 from a CA of its own) on a free loopback port,
//! answering from a table the test fills, and counting what it is asked.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{StatusCode, Uri};
use axum::routing::post;
use base64::Engine;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};

use super::TestPki;

/// How long a slow server takes to answer.
pub const SLOW_ANSWER: Duration = Duration::from_secs(3);

/// Who the server accepts, and how.
#[derive(Default)]
struct Table {
    passwords: HashMap<String, String>,
    keys: HashMap<String, String>,
    groups: HashMap<String, String>,
    environments: HashMap<String, String>,
    /// Accepted, but as `authenticatedUsername` another name.
    renamed: HashMap<String, String>,
    /// Answered with this HTTP status instead.
    statuses: HashMap<String, u16>,
}

#[derive(Default)]
struct Behaviour {
    hits: AtomicUsize,
    fail_first: AtomicUsize,
    slow: AtomicBool,
    requests: Mutex<Vec<(String, Value)>>,
    table: Mutex<Table>,
}

/// The server; stops on drop (nothing listens on its port then).
pub struct WebhookServer {
    base: String,
    behaviour: Arc<Behaviour>,
    pki: TestPki,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for WebhookServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl WebhookServer {
    /// Serves `POST /auth/password`, `POST /auth/pubkey` and `POST /config`.
    pub async fn start() -> std::io::Result<WebhookServer> {
        let pki = TestPki::new().map_err(std::io::Error::other)?;
        let (cert, key, _) = pki.server_files();
        let certs = CertificateDer::pem_file_iter(&cert)
            .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
            .map_err(std::io::Error::other)?;
        let key = PrivateKeyDer::from_pem_file(&key).map_err(std::io::Error::other)?;
        let tls = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .map_err(std::io::Error::other)?;
        let acceptor = TlsAcceptor::from(Arc::new(tls));
        let behaviour = Arc::new(Behaviour::default());
        let router = axum::Router::new()
            .route("/auth/password", post(answer))
            .route("/auth/pubkey", post(answer))
            .route("/config", post(answer))
            .with_state(behaviour.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (acceptor, router) = (acceptor.clone(), router.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let service = hyper_util::service::TowerToHyperService::new(router);
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        Ok(WebhookServer {
            base: format!("https://127.0.0.1:{port}"),
            behaviour,
            pki,
            task,
        })
    }

    /// `--auth-webhook-url`.
    pub fn auth_url(&self) -> String {
        format!("{}/auth", self.base)
    }

    /// `--config-webhook-url`.
    pub fn config_url(&self) -> String {
        format!("{}/config", self.base)
    }

    /// `--auth-webhook-ca-file`: the CA that issued the server's certificate.
    pub fn ca_path(&self) -> PathBuf {
        self.pki.ca_path()
    }

    /// Requests answered (or failed on purpose) so far.
    pub fn hits(&self) -> usize {
        self.behaviour.hits.load(Ordering::SeqCst)
    }

    /// Every request so far: its path and JSON body.
    pub fn requests(&self) -> Vec<(String, Value)> {
        self.behaviour.requests.lock().expect("lock").clone()
    }

    /// The next `n` requests are answered 500.
    pub fn fail_next(&self, n: usize) {
        self.behaviour.fail_first.store(n, Ordering::SeqCst);
    }

    /// Answers take [`SLOW_ANSWER`] from now on (or not).
    pub fn set_slow(&self, slow: bool) {
        self.behaviour.slow.store(slow, Ordering::SeqCst);
    }

    fn table(&self) -> std::sync::MutexGuard<'_, Table> {
        self.behaviour.table.lock().expect("lock")
    }

    /// `/password` says yes to `user` with `password`, giving `groups` (as
    /// `metadata.envgate_groups`).
    pub fn accept_password(&self, user: &str, password: &str, groups: &[&str]) {
        let mut table = self.table();
        table.passwords.insert(user.into(), password.into());
        table.groups.insert(user.into(), groups.join(","));
    }

    /// `/pubkey` says yes to `user` with `key` (an authorized_keys line; its comment is
    /// ignored).
    pub fn accept_key(&self, user: &str, key: &str, groups: &[&str]) {
        let key = key.split_whitespace().take(2).collect::<Vec<_>>().join(" ");
        let mut table = self.table();
        table.keys.insert(user.into(), key);
        table.groups.insert(user.into(), groups.join(","));
    }

    /// `/config` chooses `environment` for `user`.
    pub fn choose_environment(&self, user: &str, environment: &str) {
        self.table()
            .environments
            .insert(user.into(), environment.into());
    }

    /// `user` is accepted whatever the credential, but as `authenticatedUsername` `other`.
    pub fn answer_as(&self, user: &str, other: &str) {
        self.table().renamed.insert(user.into(), other.into());
    }

    /// Requests about `user` are answered with HTTP `status` and no body.
    pub fn answer_status(&self, user: &str, status: u16) {
        self.table().statuses.insert(user.into(), status);
    }
}

/// Answers as a ContainerSSH auth/config server would (libcontainerssh `auth/protocol.go`,
/// `config/protocol.go`).
async fn answer(
    State(behaviour): State<Arc<Behaviour>>,
    uri: Uri,
    body: axum::body::Bytes,
) -> (StatusCode, String) {
    behaviour.hits.fetch_add(1, Ordering::SeqCst);
    let request: Value = serde_json::from_slice(&body).unwrap_or_default();
    behaviour
        .requests
        .lock()
        .expect("lock")
        .push((uri.path().to_owned(), request.clone()));
    if behaviour.slow.load(Ordering::SeqCst) {
        tokio::time::sleep(SLOW_ANSWER).await;
    }
    if behaviour
        .fail_first
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
    {
        return (StatusCode::INTERNAL_SERVER_ERROR, "{}".into());
    }
    let user = request["username"].as_str().unwrap_or_default();
    let table = behaviour.table.lock().expect("lock");
    if let Some(status) = table.statuses.get(user) {
        let status = StatusCode::from_u16(*status).unwrap_or(StatusCode::BAD_REQUEST);
        return (status, String::new());
    }
    let metadata = json!({"envgate_groups": {
        "value": table.groups.get(user).cloned().unwrap_or_default(),
        "sensitive": false,
    }});
    let body = match uri.path() {
        "/auth/password" | "/auth/pubkey" if table.renamed.contains_key(user) => {
            json!({"success": true, "authenticatedUsername": table.renamed[user]})
        }
        "/auth/password" => {
            let password = request["passwordBase64"]
                .as_str()
                .and_then(|p| base64::engine::general_purpose::STANDARD.decode(p).ok())
                .unwrap_or_default();
            let accepted = table
                .passwords
                .get(user)
                .is_some_and(|p| p.as_bytes() == password.as_slice());
            json!({"success": accepted, "authenticatedUsername": user, "metadata": metadata})
        }
        "/auth/pubkey" => {
            let key = request["publicKey"].as_str().unwrap_or_default();
            let key = key.split_whitespace().take(2).collect::<Vec<_>>().join(" ");
            let accepted = table.keys.get(user).is_some_and(|k| *k == key);
            json!({"success": accepted, "authenticatedUsername": user, "metadata": metadata})
        }
        _ => match table.environments.get(user) {
            Some(environment) => json!({"config": {"envgate": {"environment": environment}}}),
            None => json!({"config": {}}),
        },
    };
    (StatusCode::OK, body.to_string())
}
