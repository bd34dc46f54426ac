//! The proxy side: one authenticated connection per container agent, multiplexing any
//! number of processes.
//!
//! ```no_run
//! # async fn demo() -> Result<(), envgate_agent::client::AgentError> {
//! use envgate_agent::client::{AgentAddress, AgentClient};
//! use envgate_agent::protocol::{Program, SpawnRequest};
//! let agent = AgentClient::connect(&AgentAddress::Unix("/run/envgate/c1/agent.sock".into()), b"0123456789abcdef0123456789abcdef").await?;
//! let mut process = agent.spawn(SpawnRequest::new(Program::ShellCommand("date".into()))).await?;
//! while let Some(chunk) = process.stdout.recv().await { print!("{}", String::from_utf8_lossy(&chunk)); }
//! let status = process.wait().await?;
//! # Ok(()) }
//! ```

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::str::FromStr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::{Notify, mpsc, oneshot};

use crate::auth;
use crate::flow::Credit;
use crate::protocol::{
    ACCOUNT_VERSION, AGENT_CHANNEL_BIT, ExitStatus, FrameReader, MAX_DATA_CHUNK,
    MIN_PROTOCOL_VERSION, Message, NONCE_LEN, OpenProcess, PROTOCOL_VERSION, ProtocolError,
    SpawnRequest, Stream, WindowSize,
};
use crate::seal::{Inbound, Keys, Outbound, Side};
use crate::signals::signal_number;

/// Where an agent listens: its Unix socket (Docker: a host directory bind-mounted into the
/// container) or a TCP address (Kubernetes: the pod IP).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentAddress {
    Unix(PathBuf),
    Tcp(String),
}

impl FromStr for AgentAddress {
    type Err = String;
    /// `unix:/path`, `/path`, `tcp:host:port` or `host:port`.
    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(p) = s.strip_prefix("unix:") {
            return Ok(AgentAddress::Unix(p.into()));
        }
        if s.starts_with('/') {
            return Ok(AgentAddress::Unix(s.into()));
        }
        let t = s.strip_prefix("tcp:").unwrap_or(s);
        if t.rsplit_once(':')
            .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok())
        {
            Ok(AgentAddress::Tcp(t.to_owned()))
        } else {
            Err(format!(
                "not an agent address (unix:/path or host:port): {s:?}"
            ))
        }
    }
}

impl fmt::Display for AgentAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AgentAddress::Unix(p) => write!(f, "unix:{}", p.display()),
            AgentAddress::Tcp(a) => write!(f, "tcp:{a}"),
        }
    }
}

#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// Bounds connect + handshake.
    pub connect_timeout: Duration,
    /// Bounds the wait for the agent's answer to a spawn.
    pub spawn_timeout: Duration,
    /// Bytes of stdout (and, separately, stderr) the agent may send ahead of the reader.
    pub output_window: u32,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        ConnectOptions {
            connect_timeout: Duration::from_secs(10),
            spawn_timeout: Duration::from_secs(10),
            output_window: 1024 * 1024,
        }
    }
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum AgentError {
    #[error("cannot connect to the agent at {address}: {message}")]
    Connect { address: String, message: String },
    #[error("timed out {0}")]
    Timeout(&'static str),
    #[error("the agent refused the connection: {0}")]
    Refused(String),
    #[error("the peer at the agent address could not prove it holds the container secret")]
    NotAuthentic,
    #[error(
        "the agent speaks protocol versions {min}..={max}; this proxy speaks {MIN_PROTOCOL_VERSION}..={PROTOCOL_VERSION}"
    )]
    Version { min: u16, max: u16 },
    #[error("agent protocol error: {0}")]
    Protocol(String),
    #[error("the agent connection is closed: {0}")]
    Closed(String),
    /// The agent could not start the process; `message` is meant for the user.
    #[error("{message}")]
    SpawnFailed { code: u8, message: String },
    #[error("the secret must be at least {} bytes", auth::MIN_SECRET_LEN)]
    WeakSecret,
    #[error("unknown signal {0:?}")]
    UnknownSignal(String),
}

impl From<ProtocolError> for AgentError {
    fn from(e: ProtocolError) -> Self {
        AgentError::Protocol(e.to_string())
    }
}

type BoxRead = Box<dyn AsyncRead + Send + Unpin>;
type BoxWrite = Box<dyn AsyncWrite + Send + Unpin>;

/// A cheap-to-clone handle on one agent connection. The connection closes when the last
/// clone and the last `Process` part are dropped; the agent then hangs up what is left.
#[derive(Clone)]
pub struct AgentClient {
    shared: Arc<Shared>,
}

struct Shared {
    tx: mpsc::UnboundedSender<(u32, Message)>,
    /// Ends the writer without waiting for every handle to go (the connection is unsafe).
    stop: Arc<Notify>,
    state: Mutex<State>,
    next_channel: AtomicU32,
    options: ConnectOptions,
    version: u16,
}

#[derive(Default)]
struct State {
    channels: HashMap<u32, ChannelState>,
    pings: HashMap<u64, oneshot::Sender<()>>,
    next_ping: u64,
    closed: Option<String>,
}

struct ChannelState {
    opened: Option<oneshot::Sender<Result<u32, AgentError>>>,
    stdout: Option<mpsc::UnboundedSender<Vec<u8>>>,
    stderr: Option<mpsc::UnboundedSender<Vec<u8>>>,
    /// Output bytes the agent may still send, per stream; a violation closes the connection
    /// (a compromised agent must not make the proxy buffer without bound).
    stdout_allowance: u64,
    stderr_allowance: u64,
    stdin_credit: Arc<Credit>,
    exit: Arc<ExitCell>,
}

impl AgentClient {
    pub async fn connect(address: &AgentAddress, secret: &[u8]) -> Result<Self, AgentError> {
        Self::connect_with(address, secret, ConnectOptions::default()).await
    }

    pub async fn connect_with(
        address: &AgentAddress,
        secret: &[u8],
        options: ConnectOptions,
    ) -> Result<Self, AgentError> {
        if secret.len() < auth::MIN_SECRET_LEN {
            return Err(AgentError::WeakSecret);
        }
        let deadline = options.connect_timeout;
        let (rd, mut wr) = tokio::time::timeout(deadline, open_stream_when_ready(address))
            .await
            .map_err(|_| AgentError::Timeout("connecting to the agent"))??;
        let mut reader = FrameReader::new(Inbound::Plain(rd));
        let (version, agent_nonce, client_nonce) =
            tokio::time::timeout(deadline, client_handshake(&mut reader, &mut wr, secret))
                .await
                .map_err(|_| AgentError::Timeout("waiting for the agent handshake"))??;
        // Over TCP every later frame is sealed (`seal`). Decided by the transport we dialled,
        // never by anything in the stream, so nobody on the path can turn it off.
        let (reader, wr) = match address {
            AgentAddress::Tcp(_) => {
                let keys = Keys::derive(secret, version, &agent_nonce, &client_nonce, Side::Proxy);
                let (rd, received) = reader.into_parts();
                (
                    FrameReader::new(rd.seal(keys.opener, received)),
                    Outbound::sealed(wr, keys.sealer),
                )
            }
            AgentAddress::Unix(_) => (reader, Outbound::Plain(wr)),
        };

        let (tx, rx) = mpsc::unbounded_channel();
        let stop = Arc::new(Notify::new());
        let shared = Arc::new(Shared {
            tx,
            stop: stop.clone(),
            state: Mutex::new(State::default()),
            next_channel: AtomicU32::new(1),
            options,
            version,
        });
        tokio::spawn(write_frames(wr, rx, stop));
        tokio::spawn(demux(reader, Arc::downgrade(&shared)));
        Ok(AgentClient { shared })
    }

    pub fn protocol_version(&self) -> u16 {
        self.shared.version
    }

    /// True once the connection failed or the agent closed it; the caller should reconnect.
    pub fn is_closed(&self) -> bool {
        self.shared
            .state
            .lock()
            .expect("client lock")
            .closed
            .is_some()
    }

    /// Round trip through the agent; a liveness check for pooled connections.
    pub async fn ping(&self) -> Result<Duration, AgentError> {
        let started = Instant::now();
        let (tx, rx) = oneshot::channel();
        let id = {
            let mut st = self.shared.state.lock().expect("client lock");
            if let Some(reason) = &st.closed {
                return Err(AgentError::Closed(reason.clone()));
            }
            st.next_ping += 1;
            let id = st.next_ping;
            st.pings.insert(id, tx);
            id
        };
        self.shared.send(
            0,
            Message::Ping {
                payload: id.to_be_bytes().to_vec(),
            },
        )?;
        match tokio::time::timeout(self.shared.options.spawn_timeout, rx).await {
            Ok(Ok(())) => Ok(started.elapsed()),
            Ok(Err(_)) => Err(self.shared.closed_error()),
            Err(_) => Err(AgentError::Timeout(
                "waiting for the agent to answer a ping",
            )),
        }
    }

    /// Starts a process in the container. Errors the agent reports (unknown user, program
    /// not found, …) come back as `AgentError::SpawnFailed` with a message for the user.
    pub async fn spawn(&self, mut request: SpawnRequest) -> Result<Process, AgentError> {
        let shared = &self.shared;
        if shared.version < ACCOUNT_VERSION
            && let Some(account) = request.account.take()
        {
            // An agent from before accounts (a container started by an older release): the
            // same uid and gid, without the passwd entry.
            request.user = Some(format!("{}:{}", account.uid, account.gid));
        }
        let id = shared.next_channel.fetch_add(1, Ordering::Relaxed);
        if id >= AGENT_CHANNEL_BIT {
            return Err(AgentError::Closed(
                "channel ids exhausted; reconnect".into(),
            ));
        }
        let window = shared.options.output_window;
        let (open_tx, open_rx) = oneshot::channel();
        let exit = Arc::new(ExitCell::default());
        let (stdout_tx, stdout_rx) = mpsc::unbounded_channel();
        let (stderr_tx, stderr_rx) = mpsc::unbounded_channel();
        let stdin_credit = Arc::new(Credit::new(0));
        {
            let mut st = shared.state.lock().expect("client lock");
            if let Some(reason) = &st.closed {
                return Err(AgentError::Closed(reason.clone()));
            }
            st.channels.insert(
                id,
                ChannelState {
                    opened: Some(open_tx),
                    stdout: Some(stdout_tx),
                    stderr: Some(stderr_tx),
                    stdout_allowance: window.into(),
                    stderr_allowance: window.into(),
                    stdin_credit: stdin_credit.clone(),
                    exit: exit.clone(),
                },
            );
        }
        // From here on, dropping the handle tells the agent to give up on the channel.
        let handle = Arc::new(ChannelHandle {
            shared: shared.clone(),
            id,
        });
        shared.send(
            id,
            Message::Open(OpenProcess {
                request,
                stdout_window: window,
                stderr_window: window,
            }),
        )?;
        let pid = match tokio::time::timeout(shared.options.spawn_timeout, open_rx).await {
            Ok(Ok(Ok(pid))) => pid,
            Ok(Ok(Err(e))) => return Err(e),
            Ok(Err(_)) => return Err(shared.closed_error()),
            Err(_) => {
                return Err(AgentError::Timeout(
                    "waiting for the agent to start the process",
                ));
            }
        };
        let threshold = (window / 4).max(1);
        let output = |stream, rx| ProcessOutput {
            handle: handle.clone(),
            stream,
            rx,
            chunk: Vec::new(),
            pos: 0,
            ungranted: 0,
            threshold,
        };
        Ok(Process {
            pid,
            stdin: ProcessStdin {
                handle: handle.clone(),
                credit: stdin_credit,
                eof_sent: false,
                acquiring: None,
            },
            stdout: output(Stream::Stdout, stdout_rx),
            stderr: output(Stream::Stderr, stderr_rx),
            control: ProcessControl {
                handle: handle.clone(),
                exit: exit.clone(),
            },
            exit: ProcessExit { handle, cell: exit },
        })
    }
}

impl Shared {
    fn send(&self, id: u32, msg: Message) -> Result<(), AgentError> {
        self.tx.send((id, msg)).map_err(|_| self.closed_error())
    }

    fn closed_error(&self) -> AgentError {
        let st = self.state.lock().expect("client lock");
        AgentError::Closed(
            st.closed
                .clone()
                .unwrap_or_else(|| "the connection ended".into()),
        )
    }

    /// Gives output credit back to the agent.
    fn grant(&self, id: u32, stream: Stream, n: u64) {
        if n == 0 {
            return;
        }
        let mut st = self.state.lock().expect("client lock");
        if let Some(ch) = st.channels.get_mut(&id) {
            match stream {
                Stream::Stdout => ch.stdout_allowance += n,
                Stream::Stderr => ch.stderr_allowance += n,
                Stream::Stdin => return,
            }
            let _ = self.tx.send((
                id,
                Message::Window {
                    stream,
                    increment: n.min(u32::MAX.into()) as u32,
                },
            ));
        }
    }

    /// Handles one frame from the agent; an error closes the connection.
    fn dispatch(&self, id: u32, msg: Message) -> Result<(), String> {
        let mut st = self.state.lock().expect("client lock");
        match msg {
            Message::Pong { payload } => {
                if let Ok(bytes) = <[u8; 8]>::try_from(payload.as_slice())
                    && let Some(tx) = st.pings.remove(&u64::from_be_bytes(bytes))
                {
                    let _ = tx.send(());
                }
            }
            Message::Error { message } => return Err(format!("the agent reported: {message}")),
            Message::OpenOk { pid, stdin_window } => {
                if let Some(ch) = st.channels.get_mut(&id) {
                    ch.stdin_credit.add(stdin_window.into());
                    if let Some(tx) = ch.opened.take() {
                        let _ = tx.send(Ok(pid));
                    }
                }
            }
            Message::OpenFailed { code, message } => {
                if let Some(mut ch) = st.channels.remove(&id)
                    && let Some(tx) = ch.opened.take()
                {
                    let _ = tx.send(Err(AgentError::SpawnFailed { code, message }));
                }
            }
            Message::Data { stream, data } => {
                let Some(ch) = st.channels.get_mut(&id) else {
                    return Ok(());
                };
                let len = data.len() as u64;
                let (allowance, sink) = match stream {
                    Stream::Stdout => (&mut ch.stdout_allowance, &ch.stdout),
                    Stream::Stderr => (&mut ch.stderr_allowance, &ch.stderr),
                    Stream::Stdin => return Err("the agent sent stdin data".into()),
                };
                if len > *allowance {
                    return Err("the agent sent more output than its window allows".into());
                }
                *allowance -= len;
                let Some(sink) = sink else {
                    return Err("the agent sent output after end of stream".into());
                };
                if sink.send(data).is_err() {
                    // Nobody reads this stream any more: discard and keep the process flowing.
                    *allowance += len;
                    let _ = self.tx.send((
                        id,
                        Message::Window {
                            stream,
                            increment: len as u32,
                        },
                    ));
                }
            }
            Message::Eof { stream } => {
                if let Some(ch) = st.channels.get_mut(&id) {
                    match stream {
                        Stream::Stdout => ch.stdout = None,
                        Stream::Stderr => ch.stderr = None,
                        Stream::Stdin => return Err("the agent sent stdin EOF".into()),
                    }
                }
            }
            Message::Window {
                stream: Stream::Stdin,
                increment,
            } => {
                if let Some(ch) = st.channels.get(&id) {
                    ch.stdin_credit.add(increment.into());
                }
            }
            Message::Exit(status) => {
                if let Some(ch) = st.channels.remove(&id) {
                    ch.stdin_credit.close();
                    ch.exit.set(Ok(status));
                }
            }
            other => return Err(format!("unexpected message from the agent: {other:?}")),
        }
        Ok(())
    }

    fn fail_all(&self, reason: String) {
        let mut st = self.state.lock().expect("client lock");
        if st.closed.is_none() {
            st.closed = Some(reason.clone());
        }
        for (_, mut ch) in st.channels.drain() {
            ch.stdin_credit.close();
            ch.exit.set(Err(AgentError::Closed(reason.clone())));
            if let Some(tx) = ch.opened.take() {
                let _ = tx.send(Err(AgentError::Closed(reason.clone())));
            }
        }
        st.pings.clear();
    }
}

/// A container that was just started may not be listening yet: retry "not there yet"
/// errors (the caller bounds the whole wait).
async fn open_stream_when_ready(address: &AgentAddress) -> Result<(BoxRead, BoxWrite), AgentError> {
    loop {
        match open_stream(address).await {
            Err(ConnectError { error, retry: true }) => {
                tracing::debug!(%address, %error, "agent not listening yet; retrying");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(ConnectError { error, .. }) => {
                return Err(AgentError::Connect {
                    address: address.to_string(),
                    message: error.to_string(),
                });
            }
            Ok(halves) => return Ok(halves),
        }
    }
}

struct ConnectError {
    error: io::Error,
    retry: bool,
}

async fn open_stream(address: &AgentAddress) -> Result<(BoxRead, BoxWrite), ConnectError> {
    let err = |error: io::Error| {
        let retry = matches!(
            error.kind(),
            io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
        );
        ConnectError { error, retry }
    };
    match address {
        AgentAddress::Unix(path) => {
            let (r, w) = tokio::net::UnixStream::connect(path)
                .await
                .map_err(err)?
                .into_split();
            Ok((Box::new(r), Box::new(w)))
        }
        AgentAddress::Tcp(addr) => {
            let s = tokio::net::TcpStream::connect(addr.as_str())
                .await
                .map_err(err)?;
            let _ = s.set_nodelay(true);
            let (r, w) = s.into_split();
            Ok((Box::new(r), Box::new(w)))
        }
    }
}

/// The settled version and both nonces (the sealed record keys are derived from them).
type Handshake = (u16, [u8; NONCE_LEN], [u8; NONCE_LEN]);

async fn client_handshake(
    reader: &mut FrameReader<Inbound<BoxRead>>,
    wr: &mut BoxWrite,
    secret: &[u8],
) -> Result<Handshake, AgentError> {
    let (min, max, agent_nonce) = match reader.next().await? {
        Some((
            0,
            Message::Hello {
                min_version,
                max_version,
                nonce,
            },
        )) => (min_version, max_version, nonce),
        Some(_) => return Err(AgentError::Protocol("expected the agent's hello".into())),
        None => {
            return Err(AgentError::Closed(
                "the agent closed the connection before its hello".into(),
            ));
        }
    };
    let version = max.min(PROTOCOL_VERSION);
    if version < min || version < MIN_PROTOCOL_VERSION {
        return Err(AgentError::Version { min, max });
    }
    let client_nonce = auth::fresh_nonce();
    let mac = auth::client_proof(secret, version, &agent_nonce, &client_nonce);
    let mut buf = Vec::new();
    Message::Auth {
        version,
        nonce: client_nonce,
        mac,
    }
    .encode(0, &mut buf);
    wr.write_all(&buf)
        .await
        .map_err(|e| AgentError::Closed(e.to_string()))?;
    match reader.next().await? {
        Some((0, Message::AuthOk { mac })) => {
            if auth::proofs_match(
                &auth::agent_proof(secret, version, &agent_nonce, &client_nonce),
                &mac,
            ) {
                Ok((version, agent_nonce, client_nonce))
            } else {
                Err(AgentError::NotAuthentic)
            }
        }
        Some((0, Message::Error { message })) => Err(AgentError::Refused(message)),
        Some(_) => Err(AgentError::Protocol(
            "expected the agent's auth answer".into(),
        )),
        None => Err(AgentError::Refused(
            "the agent closed the connection".into(),
        )),
    }
}

async fn write_frames(
    mut wr: Outbound<BoxWrite>,
    mut rx: mpsc::UnboundedReceiver<(u32, Message)>,
    stop: Arc<Notify>,
) {
    let mut buf = Vec::with_capacity(64 * 1024);
    loop {
        // Biased: what was queued before the stop (the last `Error`) still goes out.
        let (id, msg) = tokio::select! {
            biased;
            next = rx.recv() => match next {
                Some(next) => next,
                None => break,
            },
            // Dropping the socket without the sealed close: the agent ends the connection.
            _ = stop.notified() => return,
        };
        msg.encode(id, &mut buf);
        while buf.len() < 256 * 1024 {
            match rx.try_recv() {
                Ok((id, msg)) => msg.encode(id, &mut buf),
                Err(_) => break,
            }
        }
        if wr.write_all(&buf).await.is_err() {
            return;
        }
        buf.clear();
    }
    wr.close().await;
}

/// Holds only a weak reference, so dropping every handle closes the connection.
async fn demux(mut reader: FrameReader<Inbound<BoxRead>>, shared: Weak<Shared>) {
    let reason = loop {
        match reader.next().await {
            Ok(Some((id, msg))) => {
                let Some(shared) = shared.upgrade() else {
                    return;
                };
                if let Err(reason) = shared.dispatch(id, msg) {
                    break reason;
                }
            }
            Ok(None) => break "the agent closed the connection".to_owned(),
            Err(e @ ProtocolError::Sealed(_)) => {
                // Tell the agent why (its direction may be intact) and stop writing at once.
                let reason = e.to_string();
                if let Some(shared) = shared.upgrade() {
                    tracing::warn!(error = %reason, "sealed agent connection failed; closing it");
                    let _ = shared.tx.send((
                        0,
                        Message::Error {
                            message: reason.clone(),
                        },
                    ));
                    shared.stop.notify_one();
                }
                break reason;
            }
            Err(e) => break e.to_string(),
        }
    };
    if let Some(shared) = shared.upgrade() {
        // Stop the writer too so the agent sees us go.
        shared.fail_all(reason);
    }
}

/// Shared by a process's parts; when the last one goes before the exit was seen, the agent
/// is told to hang the process up.
struct ChannelHandle {
    shared: Arc<Shared>,
    id: u32,
}

impl Drop for ChannelHandle {
    fn drop(&mut self) {
        let removed = self
            .shared
            .state
            .lock()
            .expect("client lock")
            .channels
            .remove(&self.id);
        if removed.is_some() {
            let _ = self.shared.tx.send((self.id, Message::Close));
        }
    }
}

/// A process running in the container. The parts are public so a session can move them
/// into separate tasks (stdin pump, stdout pump, window changes, exit wait).
pub struct Process {
    pub pid: u32,
    pub stdin: ProcessStdin,
    pub stdout: ProcessOutput,
    /// Always empty with a pty: the terminal merges everything into stdout.
    pub stderr: ProcessOutput,
    pub control: ProcessControl,
    pub exit: ProcessExit,
}

impl Process {
    pub async fn wait(&self) -> Result<ExitStatus, AgentError> {
        self.exit.wait().await
    }
}

pub struct ProcessStdin {
    handle: Arc<ChannelHandle>,
    credit: Arc<Credit>,
    eof_sent: bool,
    /// `AsyncWrite` only: the credit wait in progress.
    acquiring: Option<Pin<Box<dyn Future<Output = Option<usize>> + Send + Sync>>>,
}

impl ProcessStdin {
    /// Sends all of `data`, waiting for the agent's window as needed. Fails once the process
    /// has exited or the connection is gone.
    pub async fn write_all(&mut self, mut data: &[u8]) -> Result<(), AgentError> {
        if self.eof_sent {
            return Err(AgentError::Closed("stdin was already closed".into()));
        }
        while !data.is_empty() {
            let Some(n) = self.credit.acquire(data.len().min(MAX_DATA_CHUNK)).await else {
                return Err(AgentError::Closed(
                    "the process has exited or the connection is gone".into(),
                ));
            };
            self.handle.shared.send(
                self.handle.id,
                Message::Data {
                    stream: Stream::Stdin,
                    data: data[..n].to_vec(),
                },
            )?;
            data = &data[n..];
        }
        Ok(())
    }

    /// Sends end-of-file (the process reads EOF once it consumed what was sent). Also done on drop.
    pub fn close(&mut self) -> Result<(), AgentError> {
        if !self.eof_sent {
            self.eof_sent = true;
            self.handle.shared.send(
                self.handle.id,
                Message::Eof {
                    stream: Stream::Stdin,
                },
            )?;
        }
        Ok(())
    }
}

/// For `tokio::io::copy` and friends: `poll_write` sends what the agent's window allows,
/// `poll_shutdown` sends EOF. `poll_flush` is immediate (frames are queued in order).
impl AsyncWrite for ProcessStdin {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let this = &mut *self;
        if this.eof_sent {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "stdin was already closed",
            )));
        }
        let acquiring = this.acquiring.get_or_insert_with(|| {
            let credit = this.credit.clone();
            Box::pin(async move { credit.acquire(MAX_DATA_CHUNK).await })
        });
        let granted = ready!(acquiring.as_mut().poll(cx));
        this.acquiring = None;
        let Some(granted) = granted else {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "the process has exited or the connection is gone",
            )));
        };
        let n = granted.min(buf.len());
        this.credit.refund(granted - n);
        let data = buf[..n].to_vec();
        match this.handle.shared.send(
            this.handle.id,
            Message::Data {
                stream: Stream::Stdin,
                data,
            },
        ) {
            Ok(()) => Poll::Ready(Ok(n)),
            Err(e) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                e.to_string(),
            ))),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(
            self.close()
                .map_err(|e| io::Error::new(io::ErrorKind::BrokenPipe, e.to_string())),
        )
    }
}

impl Drop for ProcessStdin {
    fn drop(&mut self) {
        let _ = self.close();
    }
}

/// stdout or stderr. Either read chunks with `recv` or use it as an `AsyncRead`.
pub struct ProcessOutput {
    handle: Arc<ChannelHandle>,
    stream: Stream,
    rx: mpsc::UnboundedReceiver<Vec<u8>>,
    chunk: Vec<u8>,
    pos: usize,
    ungranted: u64,
    threshold: u32,
}

impl ProcessOutput {
    /// The next chunk, or `None` at end of stream.
    pub async fn recv(&mut self) -> Option<Vec<u8>> {
        if self.pos < self.chunk.len() {
            let rest = self.chunk.split_off(self.pos);
            self.chunk.clear();
            self.pos = 0;
            self.consumed(rest.len());
            return Some(rest);
        }
        let chunk = self.rx.recv().await?;
        self.consumed(chunk.len());
        Some(chunk)
    }

    /// Everything up to end of stream.
    pub async fn read_to_vec(&mut self) -> Vec<u8> {
        let mut all = Vec::new();
        while let Some(chunk) = self.recv().await {
            all.extend_from_slice(&chunk);
        }
        all
    }

    fn consumed(&mut self, n: usize) {
        self.ungranted += n as u64;
        if self.ungranted >= u64::from(self.threshold) {
            self.handle
                .shared
                .grant(self.handle.id, self.stream, self.ungranted);
            self.ungranted = 0;
        }
    }
}

impl AsyncRead for ProcessOutput {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.pos >= this.chunk.len() {
            match ready!(this.rx.poll_recv(cx)) {
                Some(chunk) => {
                    this.chunk = chunk;
                    this.pos = 0;
                }
                None => return Poll::Ready(Ok(())),
            }
        }
        let n = buf.remaining().min(this.chunk.len() - this.pos);
        buf.put_slice(&this.chunk[this.pos..this.pos + n]);
        this.pos += n;
        this.consumed(n);
        Poll::Ready(Ok(()))
    }
}

impl Drop for ProcessOutput {
    fn drop(&mut self) {
        // Return the credit of everything not consumed, or the process could block forever
        // writing to a stream nobody reads.
        self.rx.close();
        let mut unread = self.ungranted + (self.chunk.len() - self.pos) as u64;
        while let Ok(chunk) = self.rx.try_recv() {
            unread += chunk.len() as u64;
        }
        self.handle
            .shared
            .grant(self.handle.id, self.stream, unread);
    }
}

/// Window changes and signals; cheap to clone.
#[derive(Clone)]
pub struct ProcessControl {
    handle: Arc<ChannelHandle>,
    exit: Arc<ExitCell>,
}

impl ProcessControl {
    /// The exit status if the process has ended (and its output with it), without waiting.
    pub fn exit_status(&self) -> Option<ExitStatus> {
        self.exit.get().and_then(Result::ok)
    }

    /// TIOCSWINSZ on the pty (ignored by the agent for a process without one).
    pub fn resize(&self, size: WindowSize) -> Result<(), AgentError> {
        self.handle
            .shared
            .send(self.handle.id, Message::Resize(size))
    }

    /// An SSH signal name (`INT`, `TERM`, `KILL`, … with or without `SIG`).
    pub fn signal(&self, name: &str) -> Result<(), AgentError> {
        if signal_number(name).is_none() {
            return Err(AgentError::UnknownSignal(name.to_owned()));
        }
        self.handle.shared.send(
            self.handle.id,
            Message::Signal {
                name: name.to_owned(),
            },
        )
    }
}

/// Waits for the exit; cheap to clone.
#[derive(Clone)]
pub struct ProcessExit {
    handle: Arc<ChannelHandle>,
    cell: Arc<ExitCell>,
}

impl ProcessExit {
    /// The exit status; the agent sends it after the process's output has ended.
    pub async fn wait(&self) -> Result<ExitStatus, AgentError> {
        let _keep_channel = &self.handle;
        self.cell.wait().await
    }

    /// `None` while the process runs.
    pub fn try_status(&self) -> Option<Result<ExitStatus, AgentError>> {
        self.cell.get()
    }
}

/// Set once: the exit status, or why it will never come.
#[derive(Default)]
struct ExitCell {
    value: Mutex<Option<Result<ExitStatus, AgentError>>>,
    notify: tokio::sync::Notify,
}

impl ExitCell {
    fn set(&self, value: Result<ExitStatus, AgentError>) {
        let mut v = self.value.lock().expect("exit lock");
        if v.is_none() {
            *v = Some(value);
        }
        drop(v);
        self.notify.notify_waiters();
    }

    fn get(&self) -> Option<Result<ExitStatus, AgentError>> {
        self.value.lock().expect("exit lock").clone()
    }

    async fn wait(&self) -> Result<ExitStatus, AgentError> {
        loop {
            let notified = self.notify.notified();
            if let Some(v) = self.get() {
                return v;
            }
            notified.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handles_can_move_between_tasks() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<AgentClient>();
        send_sync::<Process>();
        send_sync::<ProcessStdin>();
        send_sync::<ProcessOutput>();
        send_sync::<ProcessControl>();
        send_sync::<ProcessExit>();
    }

    #[test]
    fn addresses_parse() {
        assert_eq!(
            "/run/a.sock".parse::<AgentAddress>().unwrap(),
            AgentAddress::Unix("/run/a.sock".into())
        );
        assert_eq!(
            "unix:rel.sock".parse::<AgentAddress>().unwrap(),
            AgentAddress::Unix("rel.sock".into())
        );
        assert_eq!(
            "10.0.0.5:7000".parse::<AgentAddress>().unwrap(),
            AgentAddress::Tcp("10.0.0.5:7000".into())
        );
        assert_eq!(
            "tcp:[::1]:7000".parse::<AgentAddress>().unwrap(),
            AgentAddress::Tcp("[::1]:7000".into())
        );
        assert!("nonsense".parse::<AgentAddress>().is_err());
    }
}
