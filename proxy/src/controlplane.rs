//! The gRPC client for the control plane: one load-balanced channel over
//! every `--controlplane` URL, mutual TLS with this proxy's certificate (which
//! is also how the control plane knows which proxy is calling), a deadline on
//! every call, and retries with jittered backoff where a retry is safe
//! (Authenticate, CloseSession).
//!
//! A replica that cannot be reached leaves the balancer until it can again
//! (`watch_replicas`): tonic's balancer keeps an endpoint whose connection was refused and,
//! as it has no requests pending, prefers it, so with one of two replicas SIGKILLed most calls
//! went to the dead one and a login could use up its retries there. This is how Kubernetes
//! Services treat an endpoint that fails its probe.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use envgate_proto::metadata::CONNECTION_ID;
use envgate_proto::tls::TlsFiles;
use envgate_proto::v1::auth_client::AuthClient;
use envgate_proto::v1::fleet_client::FleetClient;
use envgate_proto::v1::self_service_client::SelfServiceClient;
use envgate_proto::v1::sessions_client::SessionsClient;
use envgate_proto::v1::{
    AuthenticateRequest, AuthenticateResponse, CertificateAuthorityKeys, CheckPublicKeyRequest,
    CheckPublicKeyResponse, CloseSessionRequest, IssueCertificateRequest, IssuedCertificate,
    OpenSessionEvent, OpenSessionRequest, SelfEnvironmentRequest, SelfRequest,
    StopEnvironmentResponse, UserEnvironments, UserStatus, authenticate_request,
};
use rand::Rng;
use tokio::sync::Notify;
use tonic::transport::channel::Change;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request, Status, Streaming};

use crate::error::ProxyError;

pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
pub const AUTHENTICATE_DEADLINE: Duration = Duration::from_secs(10);
/// Placement may create a container (and, on a real deployment, pull an image).
pub const OPEN_SESSION_DEADLINE: Duration = Duration::from_secs(150);
pub const CLOSE_SESSION_DEADLINE: Duration = Duration::from_secs(10);
/// SelfService reads and the saved default.
pub const SELF_SERVICE_DEADLINE: Duration = Duration::from_secs(10);
/// StopEnvironment waits for the ended sessions to close, then removes the container.
pub const STOP_ENVIRONMENT_DEADLINE: Duration = Duration::from_secs(60);
const RETRY_ATTEMPTS: u32 = 4;
/// After no replica has been reached for this long, a call is tried once: retrying only delays
/// the proxy's fallback on its caches (docs/operations.md, "When the control plane is down").
/// Shorter outages (a replica failing over) keep every retry.
const OUTAGE_AFTER: Duration = Duration::from_secs(5);
const RETRY_BASE: Duration = Duration::from_millis(100);

/// A credential the user proved: a password, or a public key whose signature over this SSH
/// session the proxy verified.
#[derive(Debug, Clone)]
pub enum Offered {
    PublicKey(Vec<u8>),
    Password(String),
    /// An OpenSSH certificate (wire format) whose certified key signed.
    Certificate(Vec<u8>),
}

#[derive(Clone)]
pub struct ControlPlane {
    channel: Channel,
    proxy_id: String,
    /// Woken whenever a call is answered, so that a Fleet stream waiting out its backoff
    /// re-attaches as soon as a replica is back (`FleetMember::run`).
    answered: Arc<Notify>,
    /// Since when no call reached a replica; `None` while they answer.
    unreached_since: Arc<Mutex<Option<Instant>>>,
}

impl ControlPlane {
    /// Builds a lazily connecting, balanced channel; nothing is dialled yet. Every URL must be
    /// `https://`: the control plane answers only over mutual TLS, and `tls` is this proxy's
    /// identity there. `server_name` overrides the name checked in the control plane's
    /// certificate (default: each URL's host).
    pub fn new(
        urls: &[String],
        tls: &TlsFiles,
        server_name: Option<&str>,
        proxy_id: String,
    ) -> Result<Self, ProxyError> {
        if urls.is_empty() {
            return Err(ProxyError::ControlPlaneAddress(
                "no control plane URL given".into(),
            ));
        }
        let mut endpoints = Vec::with_capacity(urls.len());
        for url in urls {
            let bad = |why: String| ProxyError::ControlPlaneAddress(format!("{url}: {why}"));
            let endpoint = Endpoint::from_shared(url.clone()).map_err(|e| bad(e.to_string()))?;
            if endpoint.uri().scheme_str() != Some("https") {
                return Err(bad(
                    "must be https:// (the control plane speaks mutual TLS only)".into(),
                ));
            }
            let host = endpoint.uri().host().unwrap_or_default();
            let name = server_name
                .unwrap_or(host.trim_matches(['[', ']']))
                .to_owned();
            let endpoint = endpoint
                .tls_config(tls.client_config(&name))
                .map_err(|e| bad(e.to_string()))?
                .connect_timeout(CONNECT_TIMEOUT)
                .tcp_nodelay(true)
                .http2_keep_alive_interval(Duration::from_secs(20))
                .keep_alive_timeout(Duration::from_secs(10));
            endpoints.push(endpoint);
        }
        let (channel, changes) = Channel::balance_channel(endpoints.len());
        for (i, endpoint) in endpoints.iter().enumerate() {
            // The channel has room for every endpoint: this cannot fail.
            let _ = changes.try_send(Change::Insert(i, endpoint.clone()));
        }
        tokio::spawn(watch_replicas(endpoints, changes));
        Ok(Self {
            channel,
            proxy_id,
            answered: Arc::new(Notify::new()),
            unreached_since: Arc::default(),
        })
    }

    pub fn proxy_id(&self) -> &str {
        &self.proxy_id
    }

    /// Resolves when a call made after this one started is answered by a replica (whatever
    /// the answer).
    pub async fn answered(&self) {
        self.answered.notified().await;
    }

    /// A replica answered (a call, or the Fleet stream registered): the outage, if any, is
    /// over, and those waiting in [`ControlPlane::answered`] are woken.
    pub fn mark_answered(&self) {
        *self.unreached_since.lock().expect("outage lock") = None;
        self.answered.notify_waiters();
    }

    /// Retries `call` as [`with_retries_when`] does (only once during an outage longer than
    /// [`OUTAGE_AFTER`]), and keeps track of whether replicas answer.
    async fn call<T, F, Fut>(
        &self,
        what: &'static str,
        retry: impl Fn(&Status) -> bool,
        call: F,
    ) -> Result<T, Status>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, Status>>,
    {
        let outage = self
            .unreached_since
            .lock()
            .expect("outage lock")
            .is_some_and(|since| since.elapsed() >= OUTAGE_AFTER);
        let attempts = if outage { 1 } else { RETRY_ATTEMPTS };
        let result = with_retries_when(what, attempts, retry, call).await;
        match &result {
            Err(status) if is_unreachable(status) => {
                self.unreached_since
                    .lock()
                    .expect("outage lock")
                    .get_or_insert_with(Instant::now);
            }
            _ => self.mark_answered(),
        }
        result
    }

    pub fn fleet_client(&self) -> FleetClient<Channel> {
        FleetClient::new(self.channel.clone())
    }

    pub async fn authenticate(
        &self,
        username: &str,
        offered: &Offered,
        client_address: &str,
        connection_id: &str,
    ) -> Result<AuthenticateResponse, Status> {
        let credential = match offered {
            Offered::PublicKey(key) => authenticate_request::Credential::PublicKey(key.clone()),
            Offered::Certificate(cert) => {
                authenticate_request::Credential::Certificate(cert.clone())
            }
            Offered::Password(password) => {
                authenticate_request::Credential::Password(password.clone())
            }
        };
        let message = AuthenticateRequest {
            username: username.to_owned(),
            credential: Some(credential),
            client_address: client_address.to_owned(),
        };
        self.call("Authenticate", is_retriable, || {
            let mut client = AuthClient::new(self.channel.clone());
            let request = request(message.clone(), AUTHENTICATE_DEADLINE, connection_id);
            async move { deadline(AUTHENTICATE_DEADLINE, client.authenticate(request)).await }
        })
        .await
    }

    /// Whether `key` (SSH wire format) may log in as `username`, and whether certificates
    /// may: the answer to an SSH key offer. Issues no token; a refusal is not a failed
    /// attempt.
    pub async fn check_public_key(
        &self,
        username: &str,
        key: &[u8],
        client_address: &str,
        connection_id: &str,
    ) -> Result<CheckPublicKeyResponse, Status> {
        let message = CheckPublicKeyRequest {
            username: username.to_owned(),
            public_key: key.to_vec(),
            client_address: client_address.to_owned(),
        };
        self.call("CheckPublicKey", is_retriable, || {
            let mut client = AuthClient::new(self.channel.clone());
            let request = request(message.clone(), AUTHENTICATE_DEADLINE, connection_id);
            async move { deadline(AUTHENTICATE_DEADLINE, client.check_public_key(request)).await }
        })
        .await
    }

    /// Starts placement; the stream yields progress and ends with the placement.
    /// Retried only when the control plane could not be reached at all
    /// (the request never got to it), so placement is not started twice.
    pub async fn open_session(
        &self,
        message: OpenSessionRequest,
        connection_id: &str,
    ) -> Result<Streaming<OpenSessionEvent>, Status> {
        self.call("OpenSession", is_unreachable, || {
            let mut client = SessionsClient::new(self.channel.clone());
            let request = request(message.clone(), OPEN_SESSION_DEADLINE, connection_id);
            async move { deadline(OPEN_SESSION_DEADLINE, client.open_session(request)).await }
        })
        .await
    }

    pub async fn close_session(
        &self,
        session_id: &str,
        exit_status: i32,
        container_unreachable: bool,
        connection_id: &str,
    ) -> Result<(), Status> {
        let message = CloseSessionRequest {
            session_id: session_id.to_owned(),
            exit_status,
            container_unreachable,
        };
        self.call("CloseSession", is_retriable, || {
            let mut client = SessionsClient::new(self.channel.clone());
            let request = request(message.clone(), CLOSE_SESSION_DEADLINE, connection_id);
            async move {
                deadline(CLOSE_SESSION_DEADLINE, client.close_session(request))
                    .await
                    .map(|_| ())
            }
        })
        .await
    }
}

impl ControlPlane {
    /// The environments the token's user may use (the self-service `envs` and the menu).
    pub async fn list_environments(
        &self,
        token: &str,
        connection_id: &str,
    ) -> Result<UserEnvironments, Status> {
        let message = SelfRequest {
            token: token.to_owned(),
        };
        self.call("ListEnvironments", is_retriable, || {
            let mut client = SelfServiceClient::new(self.channel.clone());
            let request = request(message.clone(), SELF_SERVICE_DEADLINE, connection_id);
            async move { deadline(SELF_SERVICE_DEADLINE, client.list_environments(request)).await }
        })
        .await
    }

    /// The token's user's containers and sessions.
    pub async fn status(&self, token: &str, connection_id: &str) -> Result<UserStatus, Status> {
        let message = SelfRequest {
            token: token.to_owned(),
        };
        self.call("Status", is_retriable, || {
            let mut client = SelfServiceClient::new(self.channel.clone());
            let request = request(message.clone(), SELF_SERVICE_DEADLINE, connection_id);
            async move { deadline(SELF_SERVICE_DEADLINE, client.status(request)).await }
        })
        .await
    }

    /// Removes the user's container for `environment`. Retried only when the request
    /// never reached the control plane, so the answer describes the one stop that ran.
    pub async fn stop_environment(
        &self,
        token: &str,
        environment: &str,
        connection_id: &str,
    ) -> Result<StopEnvironmentResponse, Status> {
        let message = SelfEnvironmentRequest {
            token: token.to_owned(),
            environment: environment.to_owned(),
        };
        self.call("StopEnvironment", is_unreachable, || {
            let mut client = SelfServiceClient::new(self.channel.clone());
            let request = request(message.clone(), STOP_ENVIRONMENT_DEADLINE, connection_id);
            async move {
                deadline(STOP_ENVIRONMENT_DEADLINE, client.stop_environment(request)).await
            }
        })
        .await
    }

    /// Certifies `public_key` (one OpenSSH line) for the token's user. Not retried once
    /// it reached the control plane: each call issues a certificate with a new serial.
    pub async fn issue_certificate(
        &self,
        token: &str,
        public_key: &str,
        connection_id: &str,
    ) -> Result<IssuedCertificate, Status> {
        let message = IssueCertificateRequest {
            token: token.to_owned(),
            public_key: public_key.to_owned(),
        };
        self.call("IssueCertificate", is_unreachable, || {
            let mut client = SelfServiceClient::new(self.channel.clone());
            let request = request(message.clone(), SELF_SERVICE_DEADLINE, connection_id);
            async move { deadline(SELF_SERVICE_DEADLINE, client.issue_certificate(request)).await }
        })
        .await
    }

    /// The SSH user CA keys certificate logins are trusted from.
    pub async fn certificate_authorities(
        &self,
        token: &str,
        connection_id: &str,
    ) -> Result<CertificateAuthorityKeys, Status> {
        let message = SelfRequest {
            token: token.to_owned(),
        };
        self.call("CertificateAuthorities", is_retriable, || {
            let mut client = SelfServiceClient::new(self.channel.clone());
            let request = request(message.clone(), SELF_SERVICE_DEADLINE, connection_id);
            async move {
                deadline(
                    SELF_SERVICE_DEADLINE,
                    client.certificate_authorities(request),
                )
                .await
            }
        })
        .await
    }

    /// Saves the user's default environment ("" clears it).
    pub async fn set_default(
        &self,
        token: &str,
        environment: &str,
        connection_id: &str,
    ) -> Result<(), Status> {
        let message = SelfEnvironmentRequest {
            token: token.to_owned(),
            environment: environment.to_owned(),
        };
        self.call("SetDefault", is_retriable, || {
            let mut client = SelfServiceClient::new(self.channel.clone());
            let request = request(message.clone(), SELF_SERVICE_DEADLINE, connection_id);
            async move {
                deadline(SELF_SERVICE_DEADLINE, client.set_default(request))
                    .await
                    .map(|_| ())
            }
        })
        .await
    }
}

fn request<T>(message: T, timeout: Duration, connection_id: &str) -> Request<T> {
    let mut request = Request::new(message);
    request.set_timeout(timeout);
    envgate_proto::telemetry::inject_context(request.metadata_mut());
    if let Ok(value) = connection_id.parse() {
        request.metadata_mut().insert(CONNECTION_ID, value);
    }
    request
}

/// Bounds a call locally too: `grpc-timeout` only helps once the request is
/// on the wire, not while the channel is still connecting.
async fn deadline<T>(
    limit: Duration,
    call: impl Future<Output = Result<tonic::Response<T>, Status>>,
) -> Result<T, Status> {
    match tokio::time::timeout(limit, call).await {
        Ok(result) => result.map(tonic::Response::into_inner),
        Err(_) => Err(Status::deadline_exceeded(format!(
            "no answer from the control plane within {limit:?}"
        ))),
    }
}

/// What is retried for calls that may safely run twice: UNAVAILABLE (the replica is down or
/// unreachable), and a failure of the connection itself that tonic reports as UNKNOWN
/// "transport error" (it carries the local error as its source; a status a replica sent
/// never does). Full-jitter exponential backoff; every other status is final.
fn is_retriable(status: &Status) -> bool {
    status.code() == Code::Unavailable
        || (status.code() == Code::Unknown && std::error::Error::source(status).is_some())
}

/// How often each replica's port is probed.
const PROBE_INTERVAL: Duration = Duration::from_millis(500);

/// Keeps in the balancer (which starts with all of them) the replicas that accept a TCP
/// connection, probed every `PROBE_INTERVAL`, or all of them when none does, so that calls then fail at once with
/// "unavailable" rather than wait for one. Ends when the channel is gone.
async fn watch_replicas(
    endpoints: Vec<Endpoint>,
    changes: tokio::sync::mpsc::Sender<Change<usize, Endpoint>>,
) {
    let mut balanced = vec![true; endpoints.len()];
    loop {
        tokio::time::sleep(PROBE_INTERVAL).await;
        let mut reachable = Vec::with_capacity(endpoints.len());
        for endpoint in &endpoints {
            let authority = endpoint
                .uri()
                .authority()
                .map(|a| match a.port() {
                    Some(_) => a.to_string(),
                    None => format!("{a}:443"),
                })
                .unwrap_or_default();
            let connect = tokio::net::TcpStream::connect(authority);
            reachable.push(matches!(
                tokio::time::timeout(PROBE_INTERVAL, connect).await,
                Ok(Ok(_))
            ));
        }
        let wanted = if reachable.contains(&true) {
            reachable
        } else {
            vec![true; endpoints.len()]
        };
        for (i, endpoint) in endpoints.iter().enumerate() {
            let change = match (balanced[i], wanted[i]) {
                (false, true) => Change::Insert(i, endpoint.clone()),
                (true, false) => Change::Remove(i),
                _ => continue,
            };
            if changes.send(change).await.is_err() {
                return;
            }
            balanced[i] = wanted[i];
        }
        if changes.is_closed() {
            return;
        }
    }
}

/// Whether the call failed before it reached the control plane (connection
/// refused, no route): such statuses carry the transport error as source,
/// while the control plane's own UNAVAILABLE (e.g. Docker down) does not.
pub fn is_unreachable(status: &Status) -> bool {
    status.code() == Code::Unavailable && std::error::Error::source(status).is_some()
}

/// Whether the control plane could not do the call for want of something (a replica, its
/// store, its runtime), or the connection to it broke, rather than refusing it: the class of
/// failure a proxy rides out from its caches and by keeping closes for later
/// (docs/operations.md, "When the control plane is down").
pub fn is_unavailable(status: &Status) -> bool {
    status.code() == Code::Unavailable || std::error::Error::source(status).is_some()
}

async fn with_retries_when<T, F, Fut>(
    what: &'static str,
    attempts: u32,
    retry: impl Fn(&Status) -> bool,
    mut call: F,
) -> Result<T, Status>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, Status>>,
{
    let mut attempt = 0;
    loop {
        match call().await {
            Err(status) if retry(&status) && attempt + 1 < attempts => {
                let delay = jittered_backoff(attempt, RETRY_BASE, Duration::from_secs(2));
                tracing::warn!(call = what, attempt, ?delay, error = %status.message(), "control plane unavailable, retrying");
                tokio::time::sleep(delay).await;
                attempt += 1;
            }
            other => return other,
        }
    }
}

/// A random delay between half and all of min(cap, base * 2^attempt), so
/// many proxies that lost the control plane at once do not retry in lockstep.
pub fn jittered_backoff(attempt: u32, base: Duration, cap: Duration) -> Duration {
    let ceiling = base.saturating_mul(1u32 << attempt.min(16)).min(cap);
    let millis = ceiling.as_millis().max(1) as u64;
    Duration::from_millis(rand::thread_rng().gen_range(millis / 2..=millis))
}

/// A client of a control plane on a loopback port nothing listens on.
#[cfg(test)]
pub(crate) fn unreachable_control_plane() -> ControlPlane {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
    let addr = listener.local_addr().expect("its address");
    drop(listener);
    let pki = envgate_controlplane::testkit::TestPki::new().expect("a test PKI");
    ControlPlane::new(
        &[format!("https://{addr}")],
        &pki.proxy_tls("p"),
        None,
        "p".into(),
    )
    .expect("a valid address")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        let base = Duration::from_millis(100);
        let cap = Duration::from_secs(2);
        for _ in 0..50 {
            assert!(jittered_backoff(0, base, cap) <= base);
            assert!(jittered_backoff(3, base, cap) <= Duration::from_millis(800));
            assert!(jittered_backoff(30, base, cap) <= cap);
        }
    }

    #[tokio::test]
    async fn only_unavailable_and_broken_connections_are_retried() {
        let mut calls = 0;
        let result: Result<(), Status> =
            with_retries_when("test", RETRY_ATTEMPTS, is_retriable, || {
                calls += 1;
                async { Err(Status::unauthenticated("no")) }
            })
            .await;
        assert_eq!(result.unwrap_err().code(), Code::Unauthenticated);
        assert_eq!(calls, 1);
        // A replica's own UNKNOWN is final too.
        assert!(!is_retriable(&Status::unknown("a replica's answer")));
        // The connection failing under the call is not.
        let broken = Status::from_error(Box::new(std::io::Error::from(
            std::io::ErrorKind::ConnectionReset,
        )));
        assert_eq!(broken.code(), Code::Unknown);
        assert!(is_retriable(&broken));

        let mut calls = 0;
        let result: Result<u32, Status> =
            with_retries_when("test", RETRY_ATTEMPTS, is_retriable, || {
                calls += 1;
                let n = calls;
                async move {
                    if n < 3 {
                        Err(Status::unavailable("down"))
                    } else {
                        Ok(n)
                    }
                }
            })
            .await;
        assert_eq!(result.unwrap(), 3);
    }

    #[tokio::test]
    async fn a_long_outage_is_tried_once_per_call_until_a_replica_answers() {
        let control_plane = unreachable_control_plane();
        let unreachable = || {
            let mut status = Status::unavailable("tcp connect error");
            status.set_source(Arc::new(std::io::Error::from(
                std::io::ErrorKind::ConnectionRefused,
            )));
            status
        };
        let attempts = |calls: std::sync::Arc<std::sync::atomic::AtomicU32>| {
            let control_plane = control_plane.clone();
            async move {
                let _ = control_plane
                    .call("test", is_retriable, || {
                        calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        let status = unreachable();
                        async move { Err::<(), _>(status) }
                    })
                    .await;
                calls.load(std::sync::atomic::Ordering::SeqCst)
            }
        };
        assert_eq!(
            attempts(Arc::default()).await,
            RETRY_ATTEMPTS,
            "a blip is retried"
        );
        *control_plane.unreached_since.lock().unwrap() = Instant::now().checked_sub(OUTAGE_AFTER);
        assert_eq!(attempts(Arc::default()).await, 1, "an outage is not");
        let answered = control_plane
            .call("test", is_retriable, || async { Ok(()) })
            .await;
        assert!(answered.is_ok());
        assert_eq!(attempts(Arc::default()).await, RETRY_ATTEMPTS, "it is over");
    }

    #[test]
    fn only_https_control_planes_are_accepted() {
        let pki = envgate_controlplane::testkit::TestPki::new().unwrap();
        let tls = pki.proxy_tls("p");
        let error = ControlPlane::new(&["http://127.0.0.1:50051".into()], &tls, None, "p".into())
            .err()
            .unwrap();
        assert_eq!(
            error.to_string(),
            "control plane address: http://127.0.0.1:50051: must be https:// (the control plane speaks mutual TLS only)"
        );
    }

    #[tokio::test]
    async fn an_unreachable_control_plane_is_unavailable_quickly() {
        let control_plane = unreachable_control_plane();
        let started = std::time::Instant::now();
        let status = control_plane
            .authenticate("u", &Offered::Password("x".into()), "", "c")
            .await
            .unwrap_err();
        assert!(is_unreachable(&status), "{status:?}");
        assert!(
            started.elapsed() < Duration::from_secs(8),
            "retries are bounded"
        );
        assert!(!is_unreachable(&Status::unavailable(
            "docker is unavailable"
        )));
        assert!(is_unavailable(&status));
        assert!(is_unavailable(&Status::unavailable("etcd is unavailable")));
        assert!(!is_unavailable(&Status::permission_denied(
            "not your session"
        )));
        assert!(!is_unavailable(&Status::deadline_exceeded(
            "placement took too long"
        )));
    }
}
