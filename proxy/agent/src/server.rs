//! The agent side: listeners, the per-connection handshake and frame loop, and one task per
//! process channel pumping bytes under flow control.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, UnixListener};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::{Notify, Semaphore, mpsc, watch};
use tokio::task::{AbortHandle, JoinSet};
use tracing::{debug, info, warn};

use crate::auth;
use crate::flow::Credit;
use crate::protocol::{
    AGENT_CHANNEL_BIT, BIG_CHUNK_VERSION, ExitStatus, FrameReader, MAX_DATA_CHUNK,
    MAX_DATA_CHUNK_V3, MIN_PROTOCOL_VERSION, Message, NONCE_LEN, OpenProcess, PROTOCOL_VERSION,
    ProtocolError, Stream, open_error,
};
use crate::reaper::{Children, Reaper};
use crate::seal::{Inbound, Keys, Outbound, Side};
use crate::signals::signal_number;
pub use crate::spawn::session_base_env;
use crate::spawn::{self, AccountFiles, Fd, Spawned};

/// Bytes of stdin a proxy may send ahead of the process reading them.
pub const STDIN_WINDOW: u32 = 1024 * 1024;
/// Frames queued for one connection's socket before producers wait.
const OUTBOUND_QUEUE: usize = 1024;

#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub socket: Option<PathBuf>,
    pub listen_tcp: Option<SocketAddr>,
    pub secret: Vec<u8>,
    pub accounts: AccountFiles,
    /// The environment every session starts from (see `session_base_env`).
    pub base_env: Vec<(String, String)>,
    pub max_connections: usize,
    pub max_processes_per_connection: usize,
    pub handshake_timeout: Duration,
    /// After SIGTERM: how long children get before SIGKILL.
    pub stop_timeout: Duration,
}

struct Ctx {
    config: AgentConfig,
    reaper: Arc<Reaper>,
    stopping: watch::Receiver<bool>,
}

/// Runs the agent until SIGTERM or SIGINT, then forwards the signal, waits for the
/// children (SIGKILL after `stop_timeout`) and returns the process exit code.
///
/// Must be called on a current-thread runtime (see `reaper`).
pub async fn run(config: AgentConfig) -> io::Result<i32> {
    if config.secret.len() < auth::MIN_SECRET_LEN {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("the secret must be at least {} bytes", auth::MIN_SECRET_LEN),
        ));
    }
    if config.socket.is_none() && config.listen_tcp.is_none() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "nothing to listen on: give --socket and/or --listen-tcp",
        ));
    }
    let reaper = Reaper::start()?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    // Handled (and ignored) so a stray SIGHUP cannot end the container.
    let mut sighup = signal(SignalKind::hangup())?;

    let unix = match &config.socket {
        Some(path) => Some(bind_unix(path).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("cannot listen on {}: {e}", path.display()),
            )
        })?),
        None => None,
    };
    let tcp = match config.listen_tcp {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .map_err(|e| io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}")))?,
        ),
        None => None,
    };
    info!(
        socket = ?config.socket,
        tcp = ?tcp.as_ref().and_then(|l| l.local_addr().ok()),
        pid1 = reaper.is_init(),
        version = PROTOCOL_VERSION,
        "envgate-agent ready"
    );

    let (stop_tx, stop_rx) = watch::channel(false);
    let ctx = Arc::new(Ctx {
        config: config.clone(),
        reaper: reaper.clone(),
        stopping: stop_rx,
    });
    let permits = Arc::new(Semaphore::new(config.max_connections));
    let mut connections = JoinSet::new();

    let received = loop {
        tokio::select! {
            _ = sigterm.recv() => break libc::SIGTERM,
            _ = sigint.recv() => break libc::SIGINT,
            _ = sighup.recv() => debug!("SIGHUP ignored"),
            accepted = accept_unix(&unix) => match accepted {
                Ok(stream) => admit(&permits, &mut connections, &ctx, stream, false),
                Err(e) => backoff(e).await,
            },
            accepted = accept_tcp(&tcp) => match accepted {
                Ok((stream, peer)) => {
                    debug!(%peer, "tcp connection");
                    let _ = stream.set_nodelay(true);
                    // Over TCP the frames after the handshake are sealed (`seal`): decided
                    // by the listener, never by anything the peer sends.
                    admit(&permits, &mut connections, &ctx, stream, true)
                }
                Err(e) => backoff(e).await,
            },
            Some(_) = connections.join_next() => {}
        }
    };
    drop(unix);
    drop(tcp);
    if let Some(path) = &config.socket {
        let _ = std::fs::remove_file(path);
    }
    info!(
        signal = received,
        "stopping: forwarding the signal to the container's processes"
    );
    let _ = stop_tx.send(true);
    let code = stop_children(&reaper, received, config.stop_timeout).await;
    // Let the connections send the last exit statuses.
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    Ok(code)
}

async fn stop_children(reaper: &Reaper, sig: i32, grace: Duration) -> i32 {
    reaper.signal_everyone(sig);
    let deadline = tokio::time::Instant::now() + grace;
    loop {
        let reaped = reaper.reaped();
        if reaper.reap() == Children::None {
            return 0;
        }
        if tokio::time::timeout_at(deadline, reaped).await.is_err() {
            break;
        }
    }
    warn!("children still running after {grace:?}: sending SIGKILL");
    reaper.signal_everyone(libc::SIGKILL);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    loop {
        let reaped = reaper.reaped();
        if reaper.reap() == Children::None
            || tokio::time::timeout_at(deadline, reaped).await.is_err()
        {
            return 128 + libc::SIGKILL;
        }
    }
}

fn bind_unix(path: &PathBuf) -> io::Result<UnixListener> {
    // A socket left by a previous run (container restart) is replaced; anything else is not.
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if meta.file_type().is_socket() {
            std::fs::remove_file(path)?;
        } else {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a socket", path.display()),
            ));
        }
    }
    // Bind under a temporary name and rename into place: whoever sees the path can connect,
    // and never to a socket that still has loose permissions.
    let mut tmp = path.clone().into_os_string();
    tmp.push(format!(".{}.tmp", std::process::id()));
    let tmp = PathBuf::from(tmp);
    let _ = std::fs::remove_file(&tmp);
    let listener = UnixListener::bind(&tmp)?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))?;
    std::fs::rename(&tmp, path)?;
    Ok(listener)
}

async fn accept_unix(l: &Option<UnixListener>) -> io::Result<tokio::net::UnixStream> {
    match l {
        Some(l) => l.accept().await.map(|(s, _)| s),
        None => std::future::pending().await,
    }
}

async fn accept_tcp(l: &Option<TcpListener>) -> io::Result<(tokio::net::TcpStream, SocketAddr)> {
    match l {
        Some(l) => l.accept().await,
        None => std::future::pending().await,
    }
}

async fn backoff(e: io::Error) {
    warn!(error = %e, "accept failed");
    tokio::time::sleep(Duration::from_millis(100)).await;
}

fn admit<S>(
    permits: &Arc<Semaphore>,
    set: &mut JoinSet<()>,
    ctx: &Arc<Ctx>,
    stream: S,
    sealed: bool,
) where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let Ok(permit) = permits.clone().try_acquire_owned() else {
        warn!("connection limit reached; refusing a connection");
        return;
    };
    let ctx = ctx.clone();
    set.spawn(async move {
        serve_connection(stream, ctx, sealed).await;
        drop(permit);
    });
}

/// The agent's view of one process channel.
struct Channel {
    pid: i32,
    stdin: mpsc::UnboundedSender<StdinChunk>,
    /// Stdin bytes the proxy may still send (shrinks on data, grows as we write).
    stdin_allowance: Arc<Mutex<u64>>,
    stdout_credit: Arc<Credit>,
    stderr_credit: Arc<Credit>,
    pty: Option<Fd>,
    task: Mutex<Option<AbortHandle>>,
}

enum StdinChunk {
    Data(Vec<u8>),
    Eof,
}

struct Conn {
    tx: mpsc::Sender<(u32, Message)>,
    /// The largest data frame this proxy takes (by the version it settled on).
    chunk: usize,
    channels: Mutex<HashMap<u32, Arc<Channel>>>,
    channel_ended: Notify,
}

impl Conn {
    fn channel(&self, id: u32) -> Option<Arc<Channel>> {
        self.channels
            .lock()
            .expect("channels lock")
            .get(&id)
            .cloned()
    }
    fn is_idle(&self) -> bool {
        self.channels.lock().expect("channels lock").is_empty()
    }
}

async fn serve_connection<S: AsyncRead + AsyncWrite + Send + 'static>(
    stream: S,
    ctx: Arc<Ctx>,
    sealed: bool,
) {
    let (rd, mut wr) = tokio::io::split(stream);
    let mut reader = FrameReader::new(Inbound::Plain(rd));
    // An AUTH frame is 75 bytes; nothing bigger is accepted from an anonymous peer.
    reader.set_max_frame(256);
    let (version, agent_nonce, client_nonce) = match tokio::time::timeout(
        ctx.config.handshake_timeout,
        handshake(&mut reader, &mut wr, &ctx.config.secret),
    )
    .await
    {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => {
            warn!(error = %e, "connection refused");
            return;
        }
        Err(_) => {
            warn!(
                "connection refused: no handshake within {:?}",
                ctx.config.handshake_timeout
            );
            return;
        }
    };
    debug!(version, sealed, "proxy authenticated");
    reader.set_max_frame(crate::protocol::MAX_FRAME_LEN);
    let (mut reader, wr) = if sealed {
        let keys = Keys::derive(
            &ctx.config.secret,
            version,
            &agent_nonce,
            &client_nonce,
            Side::Agent,
        );
        let (rd, received) = reader.into_parts();
        (
            FrameReader::new(rd.seal(keys.opener, received)),
            Outbound::sealed(wr, keys.sealer),
        )
    } else {
        (reader, Outbound::Plain(wr))
    };

    let (tx, rx) = mpsc::channel(OUTBOUND_QUEUE);
    let writer = tokio::spawn(write_frames(wr, rx));
    let conn = Arc::new(Conn {
        tx,
        chunk: if version >= BIG_CHUNK_VERSION {
            MAX_DATA_CHUNK_V3
        } else {
            MAX_DATA_CHUNK
        },
        channels: Mutex::new(HashMap::new()),
        channel_ended: Notify::new(),
    });
    let mut stopping_rx = ctx.stopping.clone();
    let mut stopping = *stopping_rx.borrow();

    loop {
        // Once the agent stops, a connection lives until its processes have reported.
        if stopping && conn.is_idle() {
            break;
        }
        tokio::select! {
            frame = reader.next() => match frame {
                Ok(Some((id, msg))) => {
                    if let Err(e) = handle_message(&conn, &ctx, id, msg, stopping).await {
                        warn!(error = %e, "protocol error; closing the connection");
                        let _ = conn.tx.send((0, Message::Error { message: e.to_string() })).await;
                        break;
                    }
                }
                Ok(None) => break,
                Err(e @ ProtocolError::Sealed(_)) => {
                    warn!(error = %e, "sealed connection failed; closing it");
                    let _ = conn.tx.send((0, Message::Error { message: e.to_string() })).await;
                    break;
                }
                Err(e) => {
                    debug!(error = %e, "connection read failed");
                    let _ = conn.tx.send((0, Message::Error { message: e.to_string() })).await;
                    break;
                }
            },
            _ = stopping_rx.changed(), if !stopping => stopping = true,
            _ = conn.channel_ended.notified(), if stopping => {}
        }
    }

    // The proxy is gone (or we stop): hang up whatever it still had running.
    let remaining: Vec<Arc<Channel>> = conn
        .channels
        .lock()
        .expect("channels lock")
        .drain()
        .map(|(_, c)| c)
        .collect();
    for ch in remaining {
        hang_up(&ctx.reaper, &ch);
    }
    drop(conn);
    let _ = tokio::time::timeout(Duration::from_secs(2), writer).await;
}

#[derive(Debug, thiserror::Error)]
enum HandshakeError {
    #[error("{0}")]
    Protocol(#[from] ProtocolError),
    #[error("the peer closed the connection during the handshake")]
    Closed,
    #[error("expected an auth message, got {0}")]
    Unexpected(&'static str),
    #[error("unsupported protocol version {0}")]
    Version(u16),
    #[error("authentication failed (wrong secret)")]
    BadProof,
}

async fn send_now<W: AsyncWrite + Unpin>(wr: &mut W, msg: Message) -> io::Result<()> {
    let mut buf = Vec::new();
    msg.encode(0, &mut buf);
    wr.write_all(&buf).await
}

/// The settled version and both nonces (the sealed record keys are derived from them).
type Handshake = (u16, [u8; NONCE_LEN], [u8; NONCE_LEN]);

async fn handshake<R, W>(
    reader: &mut FrameReader<R>,
    wr: &mut W,
    secret: &[u8],
) -> Result<Handshake, HandshakeError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let agent_nonce = auth::fresh_nonce();
    send_now(
        wr,
        Message::Hello {
            min_version: MIN_PROTOCOL_VERSION,
            max_version: PROTOCOL_VERSION,
            nonce: agent_nonce,
        },
    )
    .await
    .map_err(ProtocolError::from)?;
    let (version, client_nonce, mac) = match reader.next().await? {
        Some((
            0,
            Message::Auth {
                version,
                nonce,
                mac,
            },
        )) => (version, nonce, mac),
        Some(_) => return Err(HandshakeError::Unexpected("another message")),
        None => return Err(HandshakeError::Closed),
    };
    if !(MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION).contains(&version) {
        let _ = send_now(
            wr,
            Message::Error {
                message: format!("unsupported protocol version {version}"),
            },
        )
        .await;
        return Err(HandshakeError::Version(version));
    }
    let expected = auth::client_proof(secret, version, &agent_nonce, &client_nonce);
    if !auth::proofs_match(&expected, &mac) {
        let _ = send_now(
            wr,
            Message::Error {
                message: "authentication failed".into(),
            },
        )
        .await;
        return Err(HandshakeError::BadProof);
    }
    let proof = auth::agent_proof(secret, version, &agent_nonce, &client_nonce);
    send_now(wr, Message::AuthOk { mac: proof })
        .await
        .map_err(ProtocolError::from)?;
    Ok((version, agent_nonce, client_nonce))
}

async fn write_frames<W: AsyncWrite + Unpin>(
    mut wr: Outbound<W>,
    mut rx: mpsc::Receiver<(u32, Message)>,
) {
    let mut buf = Vec::with_capacity(64 * 1024);
    while let Some((id, msg)) = rx.recv().await {
        msg.encode(id, &mut buf);
        // Batch whatever else is queued into one write.
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

async fn handle_message(
    conn: &Arc<Conn>,
    ctx: &Arc<Ctx>,
    id: u32,
    msg: Message,
    stopping: bool,
) -> Result<(), ProtocolError> {
    match msg {
        Message::Ping { payload } => {
            let _ = conn.tx.send((0, Message::Pong { payload })).await;
        }
        Message::Open(open) => {
            if id == 0 || id & AGENT_CHANNEL_BIT != 0 {
                return Err(ProtocolError::Malformed(
                    "channel id not allowed for the proxy",
                ));
            }
            if conn.channel(id).is_some() {
                return Err(ProtocolError::Malformed("channel id already in use"));
            }
            let refuse = if stopping {
                Some((
                    open_error::SHUTTING_DOWN,
                    "the environment is stopping".to_owned(),
                ))
            } else if conn.channels.lock().expect("channels lock").len()
                >= ctx.config.max_processes_per_connection
            {
                Some((
                    open_error::LIMIT,
                    "too many processes on this connection".to_owned(),
                ))
            } else {
                None
            };
            match refuse {
                Some((code, message)) => {
                    let _ = conn
                        .tx
                        .send((id, Message::OpenFailed { code, message }))
                        .await;
                }
                None => open_process(conn, ctx, id, open).await,
            }
        }
        Message::OpenUnknown { channel_type } => {
            let message = format!("channel type {channel_type} is not supported by this agent");
            let code = open_error::UNSUPPORTED;
            let _ = conn
                .tx
                .send((id, Message::OpenFailed { code, message }))
                .await;
        }
        Message::Data {
            stream: Stream::Stdin,
            data,
        } => {
            let Some(ch) = conn.channel(id) else {
                return Ok(());
            };
            {
                let mut allowance = ch.stdin_allowance.lock().expect("allowance lock");
                let len = data.len() as u64;
                if len > *allowance {
                    return Err(ProtocolError::Malformed(
                        "stdin data beyond the granted window",
                    ));
                }
                *allowance -= len;
            }
            let _ = ch.stdin.send(StdinChunk::Data(data));
        }
        Message::Eof {
            stream: Stream::Stdin,
        } => {
            if let Some(ch) = conn.channel(id) {
                let _ = ch.stdin.send(StdinChunk::Eof);
            }
        }
        Message::Window { stream, increment } => {
            if let Some(ch) = conn.channel(id) {
                match stream {
                    Stream::Stdout => ch.stdout_credit.add(increment.into()),
                    Stream::Stderr => ch.stderr_credit.add(increment.into()),
                    Stream::Stdin => {
                        return Err(ProtocolError::Malformed("window for stdin from the proxy"));
                    }
                }
            }
        }
        Message::Resize(size) => {
            if let Some(pty) = conn.channel(id).and_then(|ch| ch.pty.clone()) {
                spawn::resize(&pty, &size);
            }
        }
        Message::Signal { name } => {
            if let Some(ch) = conn.channel(id) {
                match signal_number(&name) {
                    Some(sig) => ctx.reaper.signal_process(ch.pid, sig),
                    None => debug!(%name, "unknown signal name ignored"),
                }
            }
        }
        Message::Close => {
            let ch = conn.channels.lock().expect("channels lock").remove(&id);
            if let Some(ch) = ch {
                hang_up(&ctx.reaper, &ch);
                conn.channel_ended.notify_one();
            }
        }
        // The proxy's last word before it closes (it found the connection unsafe).
        Message::Error { message } if id == 0 => return Err(ProtocolError::Reported(message)),
        _ => return Err(ProtocolError::Malformed("message not valid from the proxy")),
    }
    Ok(())
}

/// The proxy gave up on the process: SIGHUP its process group (what closing a terminal
/// does) and stop pumping; the reaper still collects it.
fn hang_up(reaper: &Reaper, ch: &Channel) {
    debug!(pid = ch.pid, "hanging up");
    reaper.signal_group(ch.pid, libc::SIGHUP);
    reaper.signal_group(ch.pid, libc::SIGCONT);
    if let Some(task) = ch.task.lock().expect("task lock").take() {
        task.abort();
    }
}

async fn open_process(conn: &Arc<Conn>, ctx: &Arc<Ctx>, id: u32, open: OpenProcess) {
    let started = std::time::Instant::now();
    let spawned = match spawn::spawn(&open.request, &ctx.config.accounts, &ctx.config.base_env) {
        Ok(s) => s,
        Err(e) => {
            debug!(channel = id, error = %e.message, "spawn failed");
            let _ = conn
                .tx
                .send((
                    id,
                    Message::OpenFailed {
                        code: e.code,
                        message: e.message,
                    },
                ))
                .await;
            return;
        }
    };
    // No await between the fork and this registration (see `reaper`).
    let exit = ctx.reaper.track(spawned.pid);
    debug!(channel = id, pid = spawned.pid, elapsed = ?started.elapsed(), "spawned");

    let (stdin_tx, stdin_rx) = mpsc::unbounded_channel();
    let channel = Arc::new(Channel {
        pid: spawned.pid,
        stdin: stdin_tx,
        stdin_allowance: Arc::new(Mutex::new(STDIN_WINDOW.into())),
        stdout_credit: Arc::new(Credit::new(open.stdout_window.into())),
        stderr_credit: Arc::new(Credit::new(open.stderr_window.into())),
        pty: spawned.pty.clone(),
        task: Mutex::new(None),
    });
    conn.channels
        .lock()
        .expect("channels lock")
        .insert(id, channel.clone());
    let _ = conn
        .tx
        .send((
            id,
            Message::OpenOk {
                pid: spawned.pid as u32,
                stdin_window: STDIN_WINDOW,
            },
        ))
        .await;

    let task = tokio::spawn(run_channel(
        conn.clone(),
        id,
        channel.clone(),
        spawned,
        stdin_rx,
        exit,
    ));
    *channel.task.lock().expect("task lock") = Some(task.abort_handle());
}

async fn run_channel(
    conn: Arc<Conn>,
    id: u32,
    channel: Arc<Channel>,
    spawned: Spawned,
    stdin_rx: mpsc::UnboundedReceiver<StdinChunk>,
    exit: tokio::sync::oneshot::Receiver<ExitStatus>,
) {
    let is_pty = spawned.pty.is_some();
    let (exited_tx, exited_rx) = watch::channel(false);
    let stdin = pump_stdin(
        spawned.stdin,
        is_pty,
        stdin_rx,
        channel.stdin_allowance.clone(),
        conn.tx.clone(),
        id,
    );
    let stdout = pump_output(
        spawned.stdout,
        Stream::Stdout,
        channel.stdout_credit.clone(),
        conn.tx.clone(),
        id,
        is_pty.then(|| exited_rx.clone()),
        conn.chunk,
    );
    let stderr = async {
        match spawned.stderr {
            Some(fd) => {
                pump_output(
                    fd,
                    Stream::Stderr,
                    channel.stderr_credit.clone(),
                    conn.tx.clone(),
                    id,
                    None,
                    conn.chunk,
                )
                .await
            }
            None => {
                let _ = conn
                    .tx
                    .send((
                        id,
                        Message::Eof {
                            stream: Stream::Stderr,
                        },
                    ))
                    .await;
            }
        }
    };
    let status = async {
        let status = exit.await;
        let _ = exited_tx.send(true);
        status
    };
    let outputs = async { tokio::join!(stdout, stderr, status).2 };
    tokio::pin!(outputs);
    // stdin ends only if the channel is torn down, so `outputs` decides when we are done.
    let status = tokio::select! {
        status = &mut outputs => status,
        _ = stdin => outputs.await,
    };
    if let Ok(status) = status {
        debug!(channel = id, ?status, "process finished");
        let _ = conn.tx.send((id, Message::Exit(status))).await;
    }
    conn.channels.lock().expect("channels lock").remove(&id);
    conn.channel_ended.notify_one();
}

async fn pump_stdin(
    fd: Fd,
    is_pty: bool,
    mut rx: mpsc::UnboundedReceiver<StdinChunk>,
    allowance: Arc<Mutex<u64>>,
    tx: mpsc::Sender<(u32, Message)>,
    id: u32,
) {
    let mut fd = Some(fd);
    while let Some(chunk) = rx.recv().await {
        match chunk {
            StdinChunk::Data(data) => {
                // Once the process stops reading (EPIPE), further input is dropped but still
                // acknowledged so the proxy never stalls on it.
                if let Some(f) = &fd
                    && spawn::write_all(f, &data).await.is_err()
                {
                    fd = None;
                }
                *allowance.lock().expect("allowance lock") += data.len() as u64;
                let increment = data.len() as u32;
                if tx
                    .send((
                        id,
                        Message::Window {
                            stream: Stream::Stdin,
                            increment,
                        },
                    ))
                    .await
                    .is_err()
                {
                    return;
                }
            }
            // A pty has no half-close; the terminal stays open like with sshd.
            StdinChunk::Eof if !is_pty => fd = None,
            StdinChunk::Eof => {}
        }
    }
}

/// Sends one output stream under the proxy's credit. With a pty, processes left in the
/// background may keep the terminal open after the session leader exited: once `exited`
/// is set, only what is already buffered is sent.
async fn pump_output(
    fd: Fd,
    stream: Stream,
    credit: Arc<Credit>,
    tx: mpsc::Sender<(u32, Message)>,
    id: u32,
    mut exited: Option<watch::Receiver<bool>>,
    chunk: usize,
) {
    let mut buf = vec![0u8; chunk];
    loop {
        let Some(allowed) = credit.acquire(chunk).await else {
            return;
        };
        let read = match &mut exited {
            Some(flag) if *flag.borrow() => match spawn::try_read(&fd, &mut buf[..allowed]) {
                Ok(Some(n)) => Ok(n),
                Ok(None) => Ok(0),
                Err(e) => Err(e),
            },
            Some(flag) => {
                tokio::select! {
                    r = spawn::read_some(&fd, &mut buf[..allowed]) => r,
                    _ = flag.wait_for(|v| *v) => {
                        credit.refund(allowed);
                        continue;
                    }
                }
            }
            None => spawn::read_some(&fd, &mut buf[..allowed]).await,
        };
        match read {
            Ok(n) if n > 0 => {
                credit.refund(allowed - n);
                if tx
                    .send((
                        id,
                        Message::Data {
                            stream,
                            data: buf[..n].to_vec(),
                        },
                    ))
                    .await
                    .is_err()
                {
                    return;
                }
            }
            Ok(_) => break,
            Err(e) => {
                debug!(channel = id, ?stream, error = %e, "output read failed");
                break;
            }
        }
    }
    let _ = tx.send((id, Message::Eof { stream })).await;
}
