//! `envgate-agent listen tcp ADDR PORT` and `listen unix`: a listener in the container for
//! `ssh -R` (TCP) and `ssh -A` (the agent socket), run as the session's user. Every
//! connection it accepts is carried to the proxy over this process's stdin and stdout as
//! [`Frame`]s, and the proxy opens an SSH channel for each (`forwarded-tcpip`,
//! `auth-agent@openssh.com`).
//!
//! `listen unix` makes a private directory (`/tmp/envgate-ssh-XXXXXX`, mode 0700, the
//! user's) holding `agent.sock`, as sshd makes `/tmp/ssh-XXXX/agent.PID`; it is removed when
//! the listener ends. Other users of the container cannot enter it.

use std::collections::HashMap;
use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::path::PathBuf;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

use crate::mux::{Frame, FrameKind, MAX_PAYLOAD};

/// Connections one listener carries at once; past it new ones are closed at once.
const MAX_CONNECTIONS: usize = 256;

enum Listener {
    Tcp(tokio::net::TcpListener),
    Unix(tokio::net::UnixListener, PathBuf),
}

type Writer = Box<dyn AsyncWrite + Unpin + Send>;

impl Listener {
    async fn accept(&self) -> io::Result<(Box<dyn AsyncRead + Unpin + Send>, Writer, String)> {
        Ok(match self {
            Listener::Tcp(l) => {
                let (stream, peer) = l.accept().await?;
                let (r, w) = stream.into_split();
                (Box::new(r), Box::new(w), peer.to_string())
            }
            Listener::Unix(l, _) => {
                let (stream, _) = l.accept().await?;
                let (r, w) = stream.into_split();
                (Box::new(r), Box::new(w), String::new())
            }
        })
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, dir) = self {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

async fn bind(args: &[String]) -> Result<(Listener, String), String> {
    match args {
        [kind, addr, port] if kind == "tcp" => {
            let port: u16 = port.parse().map_err(|_| format!("bad port {port:?}"))?;
            // "" and "localhost" as sshd's GatewayPorts=no: the container's loopback; any
            // other address as given (the container's own interfaces, "0.0.0.0").
            let host = match addr.as_str() {
                "" | "localhost" => "127.0.0.1",
                other => other,
            };
            let listener = tokio::net::TcpListener::bind((host, port))
                .await
                .map_err(|e| format!("cannot listen on {host}:{port}: {}", reason(&e)))?;
            let bound = listener.local_addr().map_err(|e| e.to_string())?.port();
            Ok((Listener::Tcp(listener), bound.to_string()))
        }
        [kind] if kind == "unix" => {
            let dir = private_dir().map_err(|e| format!("cannot make the agent directory: {e}"))?;
            let path = dir.join("agent.sock");
            let listener = tokio::net::UnixListener::bind(&path).map_err(|e| {
                let _ = std::fs::remove_dir_all(&dir);
                format!("cannot listen on {}: {}", path.display(), reason(&e))
            })?;
            // Only the user, as sshd's socket; the directory already keeps others out.
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600));
            Ok((Listener::Unix(listener, dir), path.display().to_string()))
        }
        _ => Err("usage: envgate-agent listen tcp ADDR PORT | listen unix".into()),
    }
}

fn reason(e: &io::Error) -> String {
    let text = e.to_string();
    match text.find(" (os error") {
        Some(at) => text[..at].to_owned(),
        None => text,
    }
}

/// `/tmp/envgate-ssh-XXXXXX`, made with mode 0700 (fails rather than reuse one).
fn private_dir() -> io::Result<PathBuf> {
    for _ in 0..16 {
        let suffix: String = (0..6)
            .map(|_| {
                let n = rand_byte() % 36;
                char::from_digit(u32::from(n), 36).unwrap_or('x')
            })
            .collect();
        let dir = PathBuf::from(format!("/tmp/envgate-ssh-{suffix}"));
        match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
    Err(io::Error::other("no free directory name"))
}

fn rand_byte() -> u8 {
    let mut b = [0u8];
    // getrandom cannot fail for one byte once the pool is initialised; 0 is a fine fallback.
    // SAFETY: writes one byte into `b`.
    unsafe { libc::getrandom(b.as_mut_ptr().cast(), 1, 0) };
    b[0]
}

/// Runs as `listen` with `args`; returns the exit status.
pub fn main(args: &[String]) -> i32 {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("{e}");
            return 1;
        }
    };
    runtime.block_on(async {
        let (listener, ready) = match bind(args).await {
            Ok(bound) => bound,
            Err(message) => {
                eprintln!("{message}");
                return 1;
            }
        };
        serve(listener, ready).await;
        0
    })
}

async fn serve(listener: Listener, ready: String) {
    let (out_tx, mut out_rx) = mpsc::channel::<Frame>(64);
    let mut stdout = tokio::io::stdout();
    let writer = tokio::spawn(async move {
        while let Some(frame) = out_rx.recv().await {
            if frame.write(&mut stdout).await.is_err() {
                return;
            }
        }
    });
    if out_tx
        .send(Frame::new(FrameKind::Ready, 0, ready.into_bytes()))
        .await
        .is_err()
    {
        return;
    }
    let mut writers: HashMap<u32, Writer> = HashMap::new();
    let mut readers: HashMap<u32, tokio::task::AbortHandle> = HashMap::new();
    // Frames from the proxy on a task of their own: reading one is not cancel safe, and the
    // loop below also waits for connections.
    let (in_tx, mut in_rx) = mpsc::channel::<Frame>(64);
    let reader = tokio::spawn(async move {
        let mut stdin = tokio::io::stdin();
        while let Ok(Some(frame)) = Frame::read(&mut stdin).await {
            if in_tx.send(frame).await.is_err() {
                return;
            }
        }
    });
    let mut next = 0u32;
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((mut read, write, peer)) = accepted else {
                    // Out of descriptors, say: wait a little rather than spin.
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                };
                if writers.len() >= MAX_CONNECTIONS {
                    continue;
                }
                next = next.wrapping_add(1).max(1);
                let id = next;
                writers.insert(id, write);
                let tx = out_tx.clone();
                let task = tokio::spawn(async move {
                    if tx.send(Frame::new(FrameKind::Accept, id, peer.into_bytes())).await.is_err() {
                        return;
                    }
                    let mut buf = vec![0; MAX_PAYLOAD];
                    loop {
                        match read.read(&mut buf).await {
                            Ok(0) | Err(_) => {
                                let _ = tx.send(Frame::new(FrameKind::Eof, id, Vec::new())).await;
                                return;
                            }
                            Ok(n) => {
                                if tx.send(Frame::new(FrameKind::Data, id, buf[..n].to_vec())).await.is_err() {
                                    return;
                                }
                            }
                        }
                    }
                });
                readers.insert(id, task.abort_handle());
            }
            frame = in_rx.recv() => {
                // The proxy went away (or spoke nonsense): everything ends.
                let Some(frame) = frame else { break };
                match frame.kind {
                    FrameKind::Data => {
                        let failed = match writers.get_mut(&frame.conn) {
                            Some(w) => w.write_all(&frame.payload).await.is_err(),
                            None => false,
                        };
                        if failed {
                            writers.remove(&frame.conn);
                        }
                    }
                    FrameKind::Eof => {
                        if let Some(w) = writers.get_mut(&frame.conn) {
                            let _ = w.shutdown().await;
                        }
                    }
                    FrameKind::Close => {
                        writers.remove(&frame.conn);
                        if let Some(reader) = readers.remove(&frame.conn) {
                            reader.abort();
                        }
                    }
                    FrameKind::Ready | FrameKind::Accept => break,
                }
            }
        }
    }
    for task in readers.values() {
        task.abort();
    }
    reader.abort();
    drop(out_tx);
    writer.abort();
    drop(listener);
}
