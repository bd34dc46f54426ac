//! The proxy library in-process against a fake control plane (an in-process
//! tonic server that signs real tokens and counts calls), a real container
//! made from `envgate/busybox:latest`, and the real OpenSSH client.
//!
//! Needs Docker and the image (`deploy/local/images busybox`).

#[path = "support/proxy_v2.rs"]
mod proxy_v2;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use envgate_controlplane::testkit::TestPki;
use envgate_proto::audit::AuditLog;
use envgate_proto::token::{self, Claims, TokenKey, TokenKeys};
use envgate_proto::v1::auth_server::{Auth, AuthServer};
use envgate_proto::v1::fleet_server::{Fleet, FleetServer};
use envgate_proto::v1::sessions_server::{Sessions, SessionsServer};
use envgate_proto::v1::{
    AuthenticateRequest, AuthenticateResponse, CheckPublicKeyRequest, CheckPublicKeyResponse,
    CloseSessionRequest, CloseSessionResponse, FleetCommand, KillSession, OpenSessionEvent,
    OpenSessionRequest, Placement, Progress, ProxyMessage, RevokeUser, authenticate_request,
    fleet_command, open_session_event,
};
use envgate_proxy::config::parse_cidrs;
use envgate_proxy::limits::ConnectionLimits;
use envgate_proxy::{Config, Proxy};
use futures::Stream;
use proxy_v2::proxy_v2_header;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

const IMAGE: &str = "envgate/busybox:latest";
const SEED: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";
const SSH_TIMEOUT: Duration = Duration::from_secs(60);
/// The balancer's address in the trusted-source test (a second loopback address).
const BALANCER_IP: &str = "127.0.0.2";
/// The client address the fake balancer claims in its PROXY header.
const HEADER_CLIENT: &str = "203.0.113.9:4242";
const DEMO_PASSWORD: &str = "correct horse battery staple";
const LOGIN_GRACE: Duration = Duration::from_secs(5);
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

async fn wait_for(mut condition: impl FnMut() -> bool) {
    let wait = async {
        while !condition() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(20), wait)
        .await
        .expect("condition met in time");
}

/// What the fake control plane saw.
#[derive(Default)]
struct Seen {
    check_public_key: AtomicUsize,
    authenticate: AtomicUsize,
    open_session: AtomicUsize,
    close_session: AtomicUsize,
    registered: AtomicUsize,
    client_addresses: Mutex<Vec<String>>,
    closed_statuses: Mutex<Vec<i32>>,
}

type CommandSender = tokio::sync::mpsc::Sender<Result<FleetCommand, Status>>;

#[derive(Clone)]
struct FakeControlPlane {
    keys: Arc<TokenKeys>,
    /// user -> authorized public keys (SSH wire format)
    authorized: Arc<HashMap<String, Vec<Vec<u8>>>>,
    container_id: String,
    seen: Arc<Seen>,
    /// Sends commands down the proxy's Fleet stream.
    commands: Arc<Mutex<Option<CommandSender>>>,
    /// OpenSession refuses every token, as the control plane does a revoked one.
    refuse_tokens: Arc<std::sync::atomic::AtomicBool>,
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

#[tonic::async_trait]
impl Auth for FakeControlPlane {
    async fn check_public_key(
        &self,
        request: Request<CheckPublicKeyRequest>,
    ) -> Result<Response<CheckPublicKeyResponse>, Status> {
        self.seen.check_public_key.fetch_add(1, Ordering::SeqCst);
        let request = request.into_inner();
        let acceptable = self
            .authorized
            .get(&request.username)
            .is_some_and(|keys| keys.contains(&request.public_key));
        Ok(Response::new(CheckPublicKeyResponse {
            acceptable,
            certificates: false,
        }))
    }

    async fn authenticate(
        &self,
        request: Request<AuthenticateRequest>,
    ) -> Result<Response<AuthenticateResponse>, Status> {
        self.seen.authenticate.fetch_add(1, Ordering::SeqCst);
        let request = request.into_inner();
        self.seen
            .client_addresses
            .lock()
            .unwrap()
            .push(request.client_address.clone());
        let ok = match &request.credential {
            Some(authenticate_request::Credential::Password(password)) => {
                request.username == "demo" && password == DEMO_PASSWORD
            }
            Some(authenticate_request::Credential::PublicKey(key)) => self
                .authorized
                .get(&request.username)
                .is_some_and(|keys| keys.contains(key)),
            _ => false,
        };
        if !ok {
            return Err(Status::unauthenticated("wrong credential"));
        }
        let claims = Claims {
            sub: request.username.clone(),
            groups: vec!["students".into()],
            iat: now(),
            exp: now() + 300,
            jti: format!("t{}", self.seen.authenticate.load(Ordering::SeqCst)),
            aud: String::new(),
            kid: String::new(),
        };
        Ok(Response::new(AuthenticateResponse {
            token: self.keys.sign(claims.clone()),
            user: request.username,
            expires_at: claims.exp,
        }))
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<OpenSessionEvent, Status>> + Send>>;

#[tonic::async_trait]
impl Sessions for FakeControlPlane {
    type OpenSessionStream = EventStream;

    async fn open_session(
        &self,
        request: Request<OpenSessionRequest>,
    ) -> Result<Response<Self::OpenSessionStream>, Status> {
        // Refused before it counts as an open: the test matches opens with closes.
        if self.refuse_tokens.load(Ordering::SeqCst) {
            return Err(Status::unauthenticated("the token was revoked"));
        }
        self.seen.open_session.fetch_add(1, Ordering::SeqCst);
        let request = request.into_inner();
        let claims = self
            .keys
            .verify(&request.token, now())
            .map_err(|e| Status::unauthenticated(e.to_string()))?;
        self.seen
            .client_addresses
            .lock()
            .unwrap()
            .push(request.client_address.clone());
        // "storm": busybox, after a wait in the creation line (a cold storm).
        let waited_in_line = request.environment == "storm";
        let environment = match request.environment.as_str() {
            "" | "busybox" | "storm" => "busybox",
            // Placed in a container that does not exist (removed meanwhile).
            "gone" => "gone",
            other => {
                return Err(Status::not_found(format!(
                    "unknown environment \"{other}\"; available: busybox, debian"
                )));
            }
        };
        let queued = waited_in_line.then(|| {
            Ok(OpenSessionEvent {
                event: Some(open_session_event::Event::Progress(Progress {
                    message: "queued to start environment \"busybox\": 2 users ahead of you".into(),
                    waited_in_line,
                })),
            })
        });
        let events = queued.into_iter().chain([
            Ok(OpenSessionEvent {
                event: Some(open_session_event::Event::Progress(Progress {
                    message: "starting environment busybox".into(),
                    waited_in_line,
                })),
            }),
            Ok(OpenSessionEvent {
                event: Some(open_session_event::Event::Placement(Placement {
                    session_id: format!("s{}", self.seen.open_session.load(Ordering::SeqCst)),
                    user: claims.sub,
                    environment: environment.into(),
                    runtime_kind: envgate_proto::v1::Runtime::Docker as i32,
                    container_id: if environment == "gone" {
                        "envgate-proxytest-no-such-container".into()
                    } else {
                        self.container_id.clone()
                    },
                    container_name: "test".into(),
                    shell: "/bin/sh".into(),
                    working_dir: "/".into(),
                    env: vec!["HOME=/root".into()],
                    ..Default::default()
                })),
            }),
        ]);
        Ok(Response::new(Box::pin(tokio_stream::iter(events))))
    }

    async fn close_session(
        &self,
        request: Request<CloseSessionRequest>,
    ) -> Result<Response<CloseSessionResponse>, Status> {
        self.seen.close_session.fetch_add(1, Ordering::SeqCst);
        self.seen
            .closed_statuses
            .lock()
            .unwrap()
            .push(request.into_inner().exit_status);
        Ok(Response::new(CloseSessionResponse {}))
    }
}

#[tonic::async_trait]
impl Fleet for FakeControlPlane {
    type AttachStream = ReceiverStream<Result<FleetCommand, Status>>;

    async fn attach(
        &self,
        request: Request<Streaming<ProxyMessage>>,
    ) -> Result<Response<Self::AttachStream>, Status> {
        let mut incoming = request.into_inner();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let seen = self.seen.clone();
        *self.commands.lock().unwrap() = Some(tx);
        tokio::spawn(async move {
            while let Ok(Some(message)) = incoming.message().await {
                if let Some(envgate_proto::v1::proxy_message::Message::Register(_)) =
                    message.message
                {
                    seen.registered.fetch_add(1, Ordering::SeqCst);
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// A container for the test, removed on drop.
struct TestContainer {
    id: String,
}

impl TestContainer {
    fn start() -> Self {
        let name = format!("envgate-proxytest-{}-{}", std::process::id(), now());
        let output = Command::new("docker")
            .args(["run", "-d", "--rm", "--init", "--name", &name])
            .args(["--label", "envgate.managed-by=envgate-proxy-test"])
            .args([IMAGE, "/bin/sh", "-c", "while :; do sleep 3600; done"])
            .output()
            .expect("docker runs");
        assert!(
            output.status.success(),
            "docker run failed (build the image with deploy/local/images busybox): {}",
            String::from_utf8_lossy(&output.stderr)
        );
        Self {
            id: String::from_utf8(output.stdout).unwrap().trim().to_owned(),
        }
    }
}

impl Drop for TestContainer {
    fn drop(&mut self) {
        let _ = Command::new("docker")
            .args(["rm", "-f", &self.id])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

fn keygen(dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(name);
    let status = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", name, "-f"])
        .arg(&path)
        .status()
        .expect("ssh-keygen runs");
    assert!(status.success());
    path
}

fn public_key_wire(private: &Path) -> Vec<u8> {
    let text = std::fs::read_to_string(private.with_extension("pub")).unwrap();
    russh::keys::PublicKey::from_openssh(text.trim())
        .unwrap()
        .to_bytes()
        .unwrap()
}

struct SshRun {
    stdout: Vec<u8>,
    stderr: String,
    code: Option<i32>,
}

impl SshRun {
    fn stdout_text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
}

async fn ssh(port: u16, key: &Path, login: &str, command: &str, stdin: Option<Vec<u8>>) -> SshRun {
    ssh_with(port, key, login, command, stdin, &[]).await
}

async fn ssh_with(
    port: u16,
    key: &Path,
    login: &str,
    command: &str,
    stdin: Option<Vec<u8>>,
    extra: &[&str],
) -> SshRun {
    let mut cmd = tokio::process::Command::new("ssh");
    cmd.args([
        "-o",
        "BatchMode=yes",
        "-o",
        "StrictHostKeyChecking=no",
        "-o",
        "UserKnownHostsFile=/dev/null",
    ])
    .args([
        "-o",
        "IdentitiesOnly=yes",
        "-o",
        "LogLevel=ERROR",
        "-o",
        "ConnectTimeout=10",
    ])
    .args(extra)
    .env("TERM", "xterm-256color")
    .arg("-i")
    .arg(key)
    .args(["-p", &port.to_string(), "-l", login, "127.0.0.1"])
    // No command: a session without one (e.g. with -W).
    .args(if command.is_empty() {
        vec![]
    } else {
        vec!["--", command]
    })
    .stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .kill_on_drop(true);
    let mut child = cmd.spawn().expect("ssh runs");
    let writer = stdin.map(|data| {
        let mut pipe = child.stdin.take().unwrap();
        tokio::spawn(async move {
            let _ = pipe.write_all(&data).await;
        })
    });
    let output = tokio::time::timeout(SSH_TIMEOUT, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("ssh {login} {command:?} did not finish within {SSH_TIMEOUT:?}"))
        .unwrap();
    if let Some(writer) = writer {
        writer.await.unwrap();
    }
    SshRun {
        stdout: output.stdout,
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        code: output.status.code(),
    }
}

struct AcceptAnyHostKey;

impl russh::client::Handler for AcceptAnyHostKey {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        _key: &russh::keys::PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        Ok(true)
    }
}

/// Logs in as demo with a password (the OpenSSH client cannot in batch
/// mode) and runs `command`: its stdout and exit status, `None` if the
/// login was refused.
async fn password_exec(proxy: SocketAddr, password: &str, command: &str) -> Option<(Vec<u8>, u32)> {
    let run = async {
        let config = Arc::new(russh::client::Config::default());
        let mut session = russh::client::connect(config, proxy, AcceptAnyHostKey)
            .await
            .unwrap();
        if !session
            .authenticate_password("demo", password)
            .await
            .unwrap()
            .success()
        {
            return None;
        }
        let mut channel = session.channel_open_session().await.unwrap();
        channel.exec(true, command).await.unwrap();
        let (mut stdout, mut status) = (Vec::new(), None);
        while let Some(message) = channel.wait().await {
            match message {
                russh::ChannelMsg::Data { data } => stdout.extend_from_slice(&data),
                russh::ChannelMsg::ExitStatus { exit_status } => status = Some(exit_status),
                russh::ChannelMsg::Close => break,
                _ => {}
            }
        }
        Some((stdout, status.expect("an exit status")))
    };
    tokio::time::timeout(SSH_TIMEOUT, run)
        .await
        .expect("password session in time")
}

/// Window changes sent in a burst before each `stty size`: more than the
/// proxy ever queued for a process (8), so a size lost or applied late shows.
const DRAG_STEPS: u32 = 12;

/// Logs in as demo on a terminal of 100x30 and, for each size, sends the
/// window changes and at once (no wait in between) `stty size` with a marker:
/// what the shell printed for each, in order. The window change and the
/// keys leave in this order, so the shell must see each size before the
/// command typed after it, as with sshd.
async fn sizes_seen_right_after_resizes(proxy: SocketAddr, sizes: &[(u32, u32)]) -> Vec<String> {
    let run = async {
        let config = Arc::new(russh::client::Config::default());
        let mut session = russh::client::connect(config, proxy, AcceptAnyHostKey)
            .await
            .unwrap();
        assert!(
            session
                .authenticate_password("demo", DEMO_PASSWORD)
                .await
                .unwrap()
                .success()
        );
        let mut channel = session.channel_open_session().await.unwrap();
        channel
            .request_pty(true, "xterm", 100, 30, 0, 0, &[])
            .await
            .unwrap();
        channel.request_shell(true).await.unwrap();
        let mut screen = String::new();
        let mut seen = Vec::new();
        for (round, &(cols, rows)) in sizes.iter().enumerate() {
            // A window being dragged: a burst of changes ending at the size.
            for step in (0..DRAG_STEPS).rev() {
                let (cols, rows) = (cols + step, rows + step);
                channel.window_change(cols, rows, 0, 0).await.unwrap();
            }
            // The marker is computed by the shell, so its line is not the echo of the keys.
            let line = format!("stty size; echo size-mark-$((1000+{round}))\n");
            channel.data(line.as_bytes()).await.unwrap();
            let marker = format!("size-mark-{}", 1000 + round);
            let printed = loop {
                if let Some(at) = screen.find(&format!("\n{marker}")) {
                    let printed = screen[..at]
                        .split(['\r', '\n'])
                        .map(str::trim)
                        .rfind(|l| !l.is_empty())
                        .unwrap_or_default()
                        .to_owned();
                    // What follows the marker belongs to the next round.
                    screen.drain(..at + 1 + marker.len());
                    break printed;
                }
                match channel.wait().await {
                    Some(russh::ChannelMsg::Data { data }) => {
                        screen.push_str(&String::from_utf8_lossy(&data))
                    }
                    Some(russh::ChannelMsg::Close) | None => {
                        panic!("the shell ended before {marker}: {screen:?}")
                    }
                    Some(_) => {}
                }
            };
            seen.push(printed);
        }
        channel.data(&b"exit\n"[..]).await.unwrap();
        while let Some(message) = channel.wait().await {
            if let russh::ChannelMsg::Close = message {
                break;
            }
        }
        seen
    };
    tokio::time::timeout(SSH_TIMEOUT, run)
        .await
        .expect("the resizing session in time")
}

/// Runs `cat` with `data` as input while reading its output slowly, so the
/// client keeps sending while the proxy's output waits for its window.
async fn cat_with_slow_reader(port: u16, key: &Path, data: Vec<u8>) -> (Vec<u8>, Option<i32>) {
    let mut child = tokio::process::Command::new("ssh")
        .args(["-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no"])
        .args([
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "IdentitiesOnly=yes",
        ])
        .args(["-o", "LogLevel=ERROR", "-i"])
        .arg(key)
        .args([
            "-p",
            &port.to_string(),
            "-l",
            "demo",
            "127.0.0.1",
            "--",
            "cat",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("ssh runs");
    let mut stdin = child.stdin.take().unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let run = async {
        let writer = tokio::spawn(async move {
            let _ = stdin.write_all(&data).await;
        });
        let mut received = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = stdout.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            received.extend_from_slice(&buf[..n]);
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        writer.await.unwrap();
        (received, child.wait().await.unwrap().code())
    };
    tokio::time::timeout(SSH_TIMEOUT, run)
        .await
        .expect("the slow reader got everything in time")
}

/// A bare HTTP/1.1 GET; the whole response as text.
async fn http_get(addr: SocketAddr, path: &str) -> String {
    let fetch = async {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await.unwrap();
        String::from_utf8_lossy(&response).into_owned()
    };
    tokio::time::timeout(Duration::from_secs(10), fetch)
        .await
        .expect("ops answered in time")
}

/// A fake balancer: accepts on 127.0.0.1 and connects to the proxy from
/// BALANCER_IP, sending a PROXY v2 header that names HEADER_CLIENT.
async fn fake_balancer(proxy: SocketAddr) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            tokio::spawn(async move {
                let socket = TcpSocket::new_v4().unwrap();
                socket
                    .bind(format!("{BALANCER_IP}:0").parse().unwrap())
                    .unwrap();
                let mut upstream = socket.connect(proxy).await.unwrap();
                upstream
                    .write_all(&proxy_v2_header(HEADER_CLIENT.parse().unwrap(), proxy))
                    .await
                    .unwrap();
                let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn proxy_serves_sessions_into_a_real_container() {
    // RUST_LOG=envgate_proxy=debug shows the proxy's side when a step fails.
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = envgate_proto::telemetry::init("envgate-proxy-test", false, None);
    }
    let dir = tempfile::tempdir().unwrap();
    let host_key = keygen(dir.path(), "host_ed25519");
    let demo_key = keygen(dir.path(), "demo_ed25519");
    let stranger_key = keygen(dir.path(), "stranger_ed25519");
    let container = TestContainer::start();

    // The fake control plane.
    let seen = Arc::new(Seen::default());
    let key = TokenKey::from_hex_seed(SEED).unwrap();
    let fake = FakeControlPlane {
        keys: Arc::new(TokenKeys::new(vec![key], token::audience("inprocess")).unwrap()),
        authorized: Arc::new(HashMap::from([(
            "demo".to_owned(),
            vec![public_key_wire(&demo_key)],
        )])),
        container_id: container.id.clone(),
        seen: seen.clone(),
        commands: Arc::default(),
        refuse_tokens: Arc::default(),
    };
    let refuse_tokens = fake.refuse_tokens.clone();
    let commands = fake.commands.clone();
    let send_command = |command: fleet_command::Command| {
        let sender = commands
            .lock()
            .unwrap()
            .clone()
            .expect("the proxy is attached");
        async move {
            sender
                .send(Ok(FleetCommand {
                    command: Some(command),
                }))
                .await
                .unwrap()
        }
    };
    let cp_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let cp_addr = cp_listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    // Mutual TLS, as the real control plane serves it.
    let pki = TestPki::new().unwrap();
    let cp = tokio::spawn(
        tonic::transport::Server::builder()
            .tls_config(pki.server_tls().server_config())
            .unwrap()
            .add_service(AuthServer::new(fake.clone()))
            .add_service(SessionsServer::new(fake.clone()))
            .add_service(FleetServer::new(fake))
            .serve_with_incoming_shutdown(
                TcpListenerStream::new(cp_listener),
                stop.clone().cancelled_owned(),
            ),
    );

    // The proxy, in-process.
    let config = Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        ops_listen: Some("127.0.0.1:0".parse().unwrap()),
        controlplane: vec![format!("https://{cp_addr}")],
        host_key: Config::load_host_key(&host_key).unwrap(),
        tls: pki.proxy_tls("test-proxy"),
        controlplane_server_name: Some("localhost".into()),
        proxy_id: "test-proxy".into(),
        audit: AuditLog::in_memory(),
        trusted_proxies: parse_cidrs(BALANCER_IP).unwrap(),
        max_connections: 64,
        limits: ConnectionLimits {
            unauthenticated: 16,
            unauthenticated_per_source: 16,
            per_user: 16,
        },
        login_grace: LOGIN_GRACE,
        shutdown_grace: SHUTDOWN_GRACE,
        auth_cache_size: 128,
        // The test container runs no agent: sessions start through Docker exec.
        docker_host: Some("unix:///var/run/docker.sock".into()),
        recordings_dir: None,
        advertise: None,
        pinned_listen: Vec::new(),
    };
    // The one test in this binary owns the process's metrics recorder.
    let metrics = envgate_proto::ops::init_metrics();
    let proxy = Proxy::bind(config, Some(metrics)).await.unwrap();
    let ops_addr = proxy.ops_addr();
    let port = proxy.ssh_addr().port();
    let proxy_addr = proxy.ssh_addr();
    let readiness = proxy.readiness();
    let proxy_task = tokio::spawn(proxy.run(stop.clone()));

    // Registration with the fleet makes the proxy ready.
    let registered = async {
        while seen.registered.load(Ordering::SeqCst) == 0 || !readiness.is_ready() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), registered)
        .await
        .expect("the proxy registers");

    // `date` prints, and the first connection authenticates against the control plane.
    let run = ssh(port, &demo_key, "demo", "date", None).await;
    assert_eq!(run.code, Some(0), "date failed: {}", run.stderr);
    assert!(!run.stdout.is_empty());
    assert_eq!(seen.authenticate.load(Ordering::SeqCst), 1);

    // A second connection hits the auth cache.
    let run = ssh(port, &demo_key, "demo", "exit 7", None).await;
    assert_eq!(
        run.code,
        Some(7),
        "exit status must propagate: {}",
        run.stderr
    );
    assert_eq!(
        seen.authenticate.load(Ordering::SeqCst),
        1,
        "the second login must come from the cache"
    );

    // Input reaches the process and its EOF too.
    let run = ssh(port, &demo_key, "demo", "cat", Some(b"hi\n".to_vec())).await;
    assert_eq!(
        (run.code, run.stdout_text().as_str()),
        (Some(0), "hi\n"),
        "{}",
        run.stderr
    );

    // stdout and stderr stay apart without a terminal.
    let run = ssh(port, &demo_key, "demo", "echo out; echo err >&2", None).await;
    assert_eq!(run.stdout_text(), "out\n");
    assert_eq!(run.stderr, "err\n");
    // … except for a user who waited in the creation line: they see their place and what
    // followed, terminal or not.
    let run = ssh(
        port,
        &demo_key,
        "demo+storm",
        "echo out; echo err >&2",
        None,
    )
    .await;
    assert_eq!(run.stdout_text(), "out\n");
    assert_eq!(
        run.stderr,
        "queued to start environment \"busybox\": 2 users ahead of you\nstarting environment \
         busybox\nerr\n"
    );

    // A 20 MB round trip is byte-exact.
    let data: Vec<u8> = {
        let mut state = 0x9e3779b97f4a7c15u64;
        (0..20_000_000)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state >> 24) as u8
            })
            .collect()
    };
    let run = ssh(port, &demo_key, "demo", "cat", Some(data.clone())).await;
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert_eq!(run.stdout.len(), data.len());
    assert!(run.stdout == data, "the round trip changed the bytes");

    // A reader slower than the writer still gets every byte: input is paced
    // while output waits for the client, never deadlocked.
    let (received, code) = cat_with_slow_reader(port, &demo_key, data.clone()).await;
    assert_eq!(code, Some(0));
    assert_eq!(received.len(), data.len());
    assert!(received == data, "the slow round trip changed the bytes");

    // An unknown environment: one clear line and exit 1.
    let run = ssh(port, &demo_key, "demo+nope", "date", None).await;
    assert_eq!(run.code, Some(1));
    assert_eq!(
        run.stderr,
        "envgate: unknown environment \"nope\"; available: busybox, debian\n"
    );

    // A container that is gone: one short line with a request id (Docker's answer is for
    // the log), exit 1, the session still released.
    let closes = seen.close_session.load(Ordering::SeqCst);
    let run = ssh(port, &demo_key, "demo+gone", "date", None).await;
    assert_eq!(run.code, Some(1));
    let id = run
        .stderr
        .strip_prefix("envgate: something went wrong on our side; if it keeps happening, tell your administrator (request id ")
        .and_then(|rest| rest.strip_suffix(")\n"))
        .unwrap_or_else(|| panic!("{:?}", run.stderr));
    assert!(
        id.len() == 8 && id.chars().all(|c| c.is_ascii_hexdigit()),
        "{id}"
    );
    wait_for(|| seen.close_session.load(Ordering::SeqCst) > closes).await;

    // Sessions multiplexed over one connection share one placement.
    let control_path = dir.path().join("cm").to_string_lossy().into_owned();
    let mux = [
        "-o",
        "ControlMaster=auto",
        "-o",
        &format!("ControlPath={control_path}"),
        "-o",
        "ControlPersist=30",
    ];
    let opens = seen.open_session.load(Ordering::SeqCst);
    let run = ssh_with(port, &demo_key, "demo", "echo one", None, &mux).await;
    assert_eq!(run.stdout_text(), "one\n", "{}", run.stderr);
    let run = ssh_with(port, &demo_key, "demo", "echo two; exit 5", None, &mux).await;
    assert_eq!(
        (run.stdout_text().as_str(), run.code),
        ("two\n", Some(5)),
        "{}",
        run.stderr
    );
    assert_eq!(
        seen.open_session.load(Ordering::SeqCst),
        opens + 1,
        "one placement per connection"
    );
    let mut exit = mux.to_vec();
    exit.extend(["-O", "exit"]);
    ssh_with(port, &demo_key, "demo", "", None, &exit).await;

    // Port forwarding is refused (the reason shows with ssh -v).
    let run = ssh_with(port, &demo_key, "demo", "", None, &["-W", "127.0.0.1:22"]).await;
    assert_eq!(run.code, Some(255));
    assert!(
        run.stderr.contains("stdio forwarding failed"),
        "{}",
        run.stderr
    );

    // A bad user name is refused before any RPC.
    let before = seen.authenticate.load(Ordering::SeqCst);
    let run = ssh(port, &demo_key, "Bad..User", "date", None).await;
    assert_eq!(run.code, Some(255));
    assert!(run.stderr.contains("Permission denied"), "{}", run.stderr);
    assert_eq!(seen.authenticate.load(Ordering::SeqCst), before);

    // A wrong key is rejected and never reaches OpenSession.
    let opens = seen.open_session.load(Ordering::SeqCst);
    let run = ssh(port, &stranger_key, "demo", "date", None).await;
    assert_eq!(run.code, Some(255));
    assert!(run.stderr.contains("Permission denied"), "{}", run.stderr);
    assert_eq!(seen.open_session.load(Ordering::SeqCst), opens);

    // A PROXY header from an untrusted source is refused...
    let mut stream = TcpStream::connect(proxy_addr).await.unwrap();
    stream
        .write_all(&proxy_v2_header(HEADER_CLIENT.parse().unwrap(), proxy_addr))
        .await
        .unwrap();
    // The proxy may already have closed (and reset) the connection.
    let _ = stream.write_all(b"SSH-2.0-OpenSSH_9.2\r\n").await;
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf))
        .await
        .expect("closed in time");
    assert!(
        matches!(read, Ok(0) | Err(_)),
        "the proxy must close without speaking SSH: {read:?}"
    );
    // ...while a normal connection still works.
    let run = ssh(port, &demo_key, "demo", "echo still", None).await;
    assert_eq!(run.stdout_text(), "still\n", "{}", run.stderr);

    // From the trusted balancer, the client address comes from the header.
    let balancer = fake_balancer(proxy_addr).await;
    seen.client_addresses.lock().unwrap().clear();
    let run = ssh(
        balancer.port(),
        &demo_key,
        "demo",
        "echo via-balancer",
        None,
    )
    .await;
    assert_eq!(run.stdout_text(), "via-balancer\n", "{}", run.stderr);
    let addresses = seen.client_addresses.lock().unwrap().clone();
    assert!(!addresses.is_empty());
    assert!(
        addresses.iter().all(|a| a == HEADER_CLIENT),
        "{addresses:?}"
    );

    // Passwords: checked by the control plane once, then served from the cache.
    let before = seen.authenticate.load(Ordering::SeqCst);
    assert_eq!(
        password_exec(proxy_addr, DEMO_PASSWORD, "echo pw-ok").await,
        Some((b"pw-ok\n".to_vec(), 0))
    );
    assert_eq!(seen.authenticate.load(Ordering::SeqCst), before + 1);
    assert_eq!(
        password_exec(proxy_addr, DEMO_PASSWORD, "exit 4").await,
        Some((Vec::new(), 4))
    );
    assert_eq!(
        seen.authenticate.load(Ordering::SeqCst),
        before + 1,
        "the second password login is a cache hit"
    );
    assert_eq!(password_exec(proxy_addr, "wrong", "true").await, None);
    assert_eq!(seen.authenticate.load(Ordering::SeqCst), before + 2);

    // Terminal output is raw: bytes that look like stream headers survive.
    let run = ssh_with(
        port,
        &demo_key,
        "demo",
        "printf '\\001\\002hello\\n'; echo after",
        None,
        &["-tt"],
    )
    .await;
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert_eq!(run.stdout_text(), "\u{1}\u{2}hello\r\nafter\r\n");

    // With a terminal: TERM is passed, progress is shown on stderr, the exit status propagates.
    let run = ssh_with(
        port,
        &demo_key,
        "demo",
        "echo term=$TERM; exit 3",
        None,
        &["-tt"],
    )
    .await;
    assert_eq!(run.code, Some(3), "{}", run.stderr);
    assert!(
        run.stdout_text().contains("term=xterm-256color"),
        "stdout {:?} stderr {:?}",
        run.stdout_text(),
        run.stderr
    );
    assert!(
        run.stderr.contains("starting environment busybox"),
        "{}",
        run.stderr
    );

    // A window change takes effect before the keys typed after it (as with
    // sshd): `stty size` sent right after each resize prints the new size.
    let sizes = [
        (90, 25),
        (120, 40),
        (80, 24),
        (132, 50),
        (60, 20),
        (100, 30),
    ];
    let seen_sizes = sizes_seen_right_after_resizes(proxy_addr, &sizes).await;
    let expected: Vec<String> = sizes
        .iter()
        .map(|(cols, rows)| format!("{rows} {cols}"))
        .collect();
    assert_eq!(seen_sizes, expected);

    // When the fleet stream ends, the proxy attaches and registers again.
    commands.lock().unwrap().take();
    wait_for(|| seen.registered.load(Ordering::SeqCst) >= 2).await;
    wait_for(|| readiness.is_ready()).await;

    // RevokeUser from the fleet stream empties the user's cached tokens.
    let before = seen.authenticate.load(Ordering::SeqCst);
    send_command(fleet_command::Command::RevokeUser(RevokeUser {
        user: "demo".into(),
    }))
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let run = ssh(port, &demo_key, "demo", "true", None).await;
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert_eq!(
        seen.authenticate.load(Ordering::SeqCst),
        before + 1,
        "revoked: authenticate again"
    );

    // A token the control plane refuses at placement (revoked while this proxy's Fleet stream
    // was away, say) is forgotten: the next login checks the key again instead of reusing it.
    refuse_tokens.store(true, Ordering::SeqCst);
    let before = seen.authenticate.load(Ordering::SeqCst);
    let run = ssh(port, &demo_key, "demo", "true", None).await;
    assert_eq!(
        (run.code, run.stderr.as_str()),
        (Some(1), "envgate: the token was revoked\n")
    );
    refuse_tokens.store(false, Ordering::SeqCst);
    let run = ssh(port, &demo_key, "demo", "true", None).await;
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert_eq!(
        seen.authenticate.load(Ordering::SeqCst),
        before + 1,
        "the refused token was not reused"
    );

    // KillSession shows its message and closes that connection.
    let opens = seen.open_session.load(Ordering::SeqCst);
    let long = tokio::spawn({
        let key = demo_key.clone();
        async move { ssh(port, &key, "demo", "sleep 30", None).await }
    });
    wait_for(|| seen.open_session.load(Ordering::SeqCst) > opens).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let session_id = format!("s{}", opens + 1);
    let kill = KillSession {
        session_id,
        message: "maintenance, back soon".into(),
    };
    send_command(fleet_command::Command::KillSession(kill)).await;
    let run = tokio::time::timeout(Duration::from_secs(10), long)
        .await
        .expect("killed in time")
        .unwrap();
    assert_ne!(run.code, Some(0));
    assert!(
        run.stderr.contains("envgate: maintenance, back soon"),
        "{}",
        run.stderr
    );

    // A client that never authenticates is cut off after the login grace.
    let started = std::time::Instant::now();
    let mut idle = TcpStream::connect(proxy_addr).await.unwrap();
    idle.write_all(b"SSH-2.0-idle\r\n").await.unwrap();
    let mut sink = Vec::new();
    let closed = tokio::time::timeout(LOGIN_GRACE * 3, idle.read_to_end(&mut sink)).await;
    assert!(closed.is_ok(), "the idle connection must be closed");
    assert!(started.elapsed() >= LOGIN_GRACE - Duration::from_millis(500));

    // The ops endpoint: ready, and every phase of the connections above timed.
    let ops = ops_addr.expect("the ops endpoint is bound");
    assert!(http_get(ops, "/readyz").await.starts_with("HTTP/1.1 200"));
    assert!(http_get(ops, "/healthz").await.starts_with("HTTP/1.1 200"));
    let metrics = http_get(ops, "/metrics").await;
    for series in [
        r#"phase="accept""#,
        r#"phase="auth",cache="hit""#,
        r#"phase="auth",cache="miss""#,
        r#"phase="placement""#,
        r#"phase="exec_start",path="runtime_exec""#,
        r#"phase="session""#,
        r#"phase="teardown""#,
        r#"envgate_connections_total{result="ok"}"#,
        r#"envgate_connections_total{result="placement_unknown_environment"}"#,
        r#"envgate_connections_total{result="proxy_header_refused"}"#,
    ] {
        assert!(
            metrics.contains(series),
            "/metrics lacks {series}:\n{metrics}"
        );
    }

    // Every placed session was released, with its exit status.
    let released = async {
        while seen.close_session.load(Ordering::SeqCst)
            < seen.open_session.load(Ordering::SeqCst) - 1
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), released)
        .await
        .expect("CloseSession for each placement");
    assert!(seen.closed_statuses.lock().unwrap().contains(&7));

    // Shutdown lets sessions run for the grace period, then tells them why they close.
    let opens = seen.open_session.load(Ordering::SeqCst);
    let long = tokio::spawn({
        let key = demo_key.clone();
        async move { ssh(port, &key, "demo", "sleep 30", None).await }
    });
    wait_for(|| seen.open_session.load(Ordering::SeqCst) > opens).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = std::time::Instant::now();
    stop.cancel();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let ready = http_get(ops_addr.unwrap(), "/readyz").await;
    assert!(
        ready.starts_with("HTTP/1.1 503"),
        "a draining proxy is not ready: {ready}"
    );
    let run = tokio::time::timeout(Duration::from_secs(15), long)
        .await
        .expect("closed in time")
        .unwrap();
    assert!(started.elapsed() >= SHUTDOWN_GRACE - Duration::from_millis(200));
    assert!(
        run.stderr
            .contains("envgate: this proxy is shutting down, reconnect to continue"),
        "{}",
        run.stderr
    );
    tokio::time::timeout(Duration::from_secs(20), proxy_task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let _ = cp.await;
}
