//! The SSH accept loop and one connection's life: its place among the
//! connections logging in (or the refusal), PROXY header (or the refusal of
//! one), the SSH session with its login-grace timer, the session task, and
//! the result metric.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use envgate_proto::ops::record_phase;
use rand::Rng;
use russh::Disconnect;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::auth::Authenticator;
use crate::config::{Cidr, is_trusted};
use crate::error::{ConnectionResult, LOGIN_GRACE_MESSAGE, PreauthRefusal, preauth_refusal_line};
use crate::handler::ConnectionHandler;
use crate::limits::{PreauthBudget, PreauthSlot};
use crate::proxy_protocol::{self, Command};
use crate::session::{self, ConnectionInfo, SessionServices};

/// How long a trusted balancer has to send its PROXY header.
pub const PROXY_HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// How long to look at the first bytes of an untrusted connection for a
/// PROXY signature. SSH clients send their banner at once; one that waits
/// for ours is served after this.
const PEEK_WINDOW: Duration = Duration::from_secs(2);
/// How long a connection told to go away may take before it is cut.
const ABORT_DELAY: Duration = Duration::from_secs(1);
/// How long the session task may take to release the placement after the
/// connection ended.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(30);

pub struct ServerContext {
    pub ssh: Arc<russh::server::Config>,
    pub trusted_proxies: Vec<Cidr>,
    /// From accept to authenticated.
    pub login_grace: Duration,
    /// One permit per connection served, shared by every accept loop (the
    /// main listener and the pinned ones), so `--max-connections` bounds
    /// them together.
    pub connections: Arc<Semaphore>,
    /// The connections not logged in yet, shared by every accept loop too.
    pub unauthenticated: PreauthBudget,
    pub authenticator: Arc<Authenticator>,
    pub services: SessionServices,
}

/// Accepts connections until `stop` is cancelled. Each connection runs as a
/// task on `tracker`, holding one of the context's connection permits; the
/// loop waits for a permit before accepting, so excess clients queue in the
/// kernel's backlog instead of costing memory here. A connection past the
/// budget of connections logging in is refused here, before any task or
/// SSH. On a pinned listener every connection carries `pinned`, its
/// environment.
pub async fn serve(
    listener: TcpListener,
    pinned: Option<Arc<str>>,
    context: Arc<ServerContext>,
    tracker: TaskTracker,
    stop: CancellationToken,
) {
    let permits = context.connections.clone();
    let mut backoff = Duration::from_millis(10);
    loop {
        let permit = tokio::select! {
            permit = permits.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
            () = stop.cancelled() => return,
        };
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = stop.cancelled() => return,
        };
        let (socket, peer) = match accepted {
            Ok(accepted) => {
                backoff = Duration::from_millis(10);
                accepted
            }
            Err(e) => {
                // Typically EMFILE: wait for connections to end, then retry.
                tracing::warn!(error = %e, ?backoff, "accept failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        let preauth = match context.unauthenticated.enter() {
            Ok(slot) => slot,
            Err(refusal) => {
                refuse(&socket, &refusal);
                ConnectionResult::from(&refusal).count();
                continue;
            }
        };
        let context = context.clone();
        let connection_id = format!("{:08x}", rand::thread_rng().r#gen::<u32>());
        let span = tracing::info_span!("connection", id = %connection_id, peer = %peer, pinned = pinned.as_deref());
        let pinned = pinned.clone();
        tracker.spawn(
            async move {
                let result =
                    serve_connection(socket, peer, connection_id, pinned, context, preauth).await;
                result.count();
                if result.refused_before_login() {
                    tracing::debug!(result = result.label(), "connection closed");
                } else {
                    tracing::info!(result = result.label(), "connection closed");
                }
                drop(permit);
            }
            .instrument(span),
        );
    }
}

/// Answers a connection refused before logging in with one line instead of
/// the SSH banner, then it is closed (when dropped). Nothing waits: the line
/// is written only if the socket takes it at once, and what the client has
/// already sent is read away first, so the close is a FIN after the line
/// rather than a reset that could destroy it.
fn refuse(socket: &TcpStream, refusal: &PreauthRefusal) {
    let mut discard = [0u8; 4096];
    let _ = socket.try_read(&mut discard);
    let line = format!("{}\r\n", preauth_refusal_line(refusal));
    let _ = socket.try_write(line.as_bytes());
}

/// Works out the real client address: from the PROXY header for trusted
/// balancers (which must send one), the socket otherwise (which must not).
async fn client_address(
    socket: &mut TcpStream,
    peer: SocketAddr,
    trusted: &[Cidr],
) -> Result<SocketAddr, ConnectionResult> {
    if is_trusted(trusted, peer.ip()) {
        let header =
            tokio::time::timeout(PROXY_HEADER_TIMEOUT, proxy_protocol::read_header(socket)).await;
        return match header {
            Ok(Ok(header)) => match (header.command, header.source) {
                (Command::Proxy, Some(source)) => Ok(source),
                _ => Ok(peer),
            },
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "bad PROXY header from a trusted balancer");
                Err(ConnectionResult::ProxyHeaderRefused)
            }
            Err(_) => {
                tracing::warn!(
                    "no PROXY header from a trusted balancer within {PROXY_HEADER_TIMEOUT:?}"
                );
                Err(ConnectionResult::ProxyHeaderRefused)
            }
        };
    }
    let deadline = tokio::time::Instant::now() + PEEK_WINDOW;
    let mut prefix = [0u8; proxy_protocol::SIGNATURE.len()];
    loop {
        let peeked = tokio::time::timeout_at(deadline, socket.peek(&mut prefix)).await;
        let n = match peeked {
            Err(_) => return Ok(peer),
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "connection failed before the SSH banner");
                return Err(ConnectionResult::Error);
            }
            Ok(Ok(0)) => return Err(ConnectionResult::Error),
            Ok(Ok(n)) => n,
        };
        match proxy_protocol::looks_like_proxy_header(&prefix[..n]) {
            Some(true) => {
                tracing::warn!(
                    "refused a PROXY header from an untrusted source (not in --trusted-proxies)"
                );
                return Err(ConnectionResult::ProxyHeaderRefused);
            }
            Some(false) => return Ok(peer),
            // A prefix of a signature: wait for the rest.
            None if n == prefix.len() => return Ok(peer),
            None => {
                if tokio::time::Instant::now() >= deadline {
                    return Ok(peer);
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    }
}

/// Serves one connection holding `preauth`, its place among the connections
/// logging in, until the user has logged in.
async fn serve_connection(
    mut socket: TcpStream,
    peer: SocketAddr,
    connection_id: String,
    pinned: Option<Arc<str>>,
    context: Arc<ServerContext>,
    mut preauth: PreauthSlot,
) -> ConnectionResult {
    let accepted = Instant::now();
    // The whole way in (PROXY header, banner, key exchange, authentication)
    // has one deadline, as sshd's LoginGraceTime.
    let login_deadline = tokio::time::Instant::now() + context.login_grace;
    let client = match client_address(&mut socket, peer, &context.trusted_proxies)
        .instrument(tracing::info_span!("accept"))
        .await
    {
        Ok(client) => client,
        Err(result) => return result,
    };
    if let Err(refusal) = preauth.attribute(client.ip()) {
        refuse(&socket, &refusal);
        return ConnectionResult::from(&refusal);
    }
    let mut preauth = Some(preauth);
    if client != peer {
        tracing::info!(%client, "client address from PROXY header");
    }
    let _ = socket.set_nodelay(true);
    record_phase("accept", accepted.elapsed(), &[]);

    let (events_tx, events_rx) = mpsc::channel(64);
    let (kill_tx, kill_rx) = mpsc::channel(4);
    let _registration = context.services.registry.register(&connection_id, kill_tx);
    let authenticated = CancellationToken::new();
    let handler = ConnectionHandler::new(
        connection_id.clone(),
        client.to_string(),
        context.authenticator.clone(),
        events_tx,
        authenticated.clone(),
    );
    let abort = CancellationToken::new();
    let socket = AbortableStream::new(socket, abort.clone());
    let running = tokio::time::timeout_at(
        login_deadline,
        russh::server::run_stream(context.ssh.clone(), socket, handler),
    );
    let mut running = match running.await {
        Ok(Ok(running)) => running,
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "SSH handshake failed");
            return ConnectionResult::Error;
        }
        Err(_) => return ConnectionResult::LoginTimeout,
    };
    let handle = running.handle();
    let info = ConnectionInfo {
        connection_id,
        client_address: client.to_string(),
        abort: abort.clone(),
        pinned: pinned.map(|env| env.to_string()),
    };
    let session_task = tokio::spawn(
        session::run(
            info,
            context.services.clone(),
            handle.clone(),
            events_rx,
            kill_rx,
        )
        .in_current_span(),
    );

    let grace = tokio::time::sleep_until(login_deadline);
    tokio::pin!(grace);
    let mut waiting_for_login = true;
    let mut timed_out = false;
    let ended = loop {
        tokio::select! {
            ended = &mut running => break ended,
            () = authenticated.cancelled(), if waiting_for_login => {
                waiting_for_login = false;
                // Logged in: no longer counted among the connections logging in.
                drop(preauth.take());
            }
            () = &mut grace, if waiting_for_login => {
                waiting_for_login = false;
                timed_out = true;
                tracing::info!("not authenticated within the login grace time");
                // Mid key exchange russh cannot send the disconnect; cut the
                // connection if it has not ended shortly after.
                let abort = abort.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(ABORT_DELAY).await;
                    abort.cancel();
                });
                let _ = tokio::time::timeout(
                    ABORT_DELAY,
                    handle.disconnect(Disconnect::ByApplication, LOGIN_GRACE_MESSAGE.into(), "en".into()),
                )
                .await;
            }
        }
    };
    if let Err(e) = ended {
        tracing::debug!(error = %e, "SSH session ended with an error");
    }
    // Gone without logging in: its place is free before the session task is awaited.
    drop(preauth);
    drop(handle);
    let result = match tokio::time::timeout(RELEASE_TIMEOUT, session_task).await {
        Ok(Ok(result)) => result,
        Ok(Err(e)) => {
            tracing::error!(error = %e, "session task failed");
            ConnectionResult::Error
        }
        Err(_) => {
            tracing::warn!("releasing the session took longer than {RELEASE_TIMEOUT:?}");
            ConnectionResult::Error
        }
    };
    if timed_out {
        ConnectionResult::LoginTimeout
    } else {
        result
    }
}

/// A socket that fails every read and write once `abort` is cancelled, so a
/// connection can be cut even when russh's loop cannot act on a disconnect
/// (during key exchange, or while it waits to hand over input).
pub struct AbortableStream {
    inner: TcpStream,
    aborted: Pin<Box<WaitForCancellationFutureOwned>>,
}

impl AbortableStream {
    pub fn new(inner: TcpStream, abort: CancellationToken) -> Self {
        Self {
            inner,
            aborted: Box::pin(abort.cancelled_owned()),
        }
    }

    fn check(&mut self, cx: &mut Context<'_>) -> Result<(), std::io::Error> {
        match self.aborted.as_mut().poll(cx) {
            Poll::Ready(()) => Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionAborted,
                "connection closed by envgate",
            )),
            Poll::Pending => Ok(()),
        }
    }
}

impl AsyncRead for AbortableStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        self.check(cx)?;
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for AbortableStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.check(cx)?;
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.check(cx)?;
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
