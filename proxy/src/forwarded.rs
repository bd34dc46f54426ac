//! Connections made *to* the user's container and carried back over their SSH connection:
//! `ssh -A` (the agent socket) and `ssh -R` (a listening port). `envgate-agent listen` runs
//! in the container as the user; its stdout and stdin carry each accepted connection as
//! frames (`envgate_agent::mux`), and here each becomes an SSH channel towards the client.

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use envgate_agent::mux::{Frame, FrameBuffer, FrameKind};
use futures::StreamExt;
use russh::ChannelMsg;
use russh::server::Handle;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

use crate::exec::{Output, ProcessRuntime, ProcessSpec, StartedProcess};

/// How long the listener may take to say it is listening.
const READY_WAIT: Duration = Duration::from_secs(15);

/// What each accepted connection becomes on the client's side.
#[derive(Debug, Clone)]
pub enum Opener {
    /// `auth-agent@openssh.com`, to the user's own ssh-agent.
    Agent,
    /// `forwarded-tcpip` for the `-R` the client asked for at `address:port`.
    Tcp { address: String, port: u32 },
}

/// A listener that said it is listening: its process, what it said (the bound port, or the
/// socket's path), and whatever followed in the same read.
pub struct Listening {
    process: StartedProcess,
    pub ready: String,
    buffer: FrameBuffer,
}

/// Starts `spec` (an `envgate-agent listen …`) and waits for its `Ready`; `Err` is the line
/// it printed on failing, or why it could not start.
pub async fn listen(runtime: &dyn ProcessRuntime, spec: &ProcessSpec) -> Result<Listening, String> {
    let mut process = tokio::time::timeout(READY_WAIT, runtime.start(spec))
        .await
        .map_err(|_| "the container did not start the listener in time".to_owned())?
        .map_err(|e| e.to_string())?;
    let mut buffer = FrameBuffer::default();
    let mut errors = Vec::new();
    let ready = tokio::time::timeout(READY_WAIT, async {
        loop {
            match process.output.next().await {
                Some(Ok(Output::Stdout(data))) => {
                    buffer.push(&data);
                    match buffer.next_frame() {
                        Ok(Some(frame)) if frame.kind == FrameKind::Ready => {
                            return Ok(String::from_utf8_lossy(&frame.payload).into_owned());
                        }
                        Ok(Some(_)) | Err(_) => {
                            return Err("the listener answered nonsense".to_owned());
                        }
                        Ok(None) => {}
                    }
                }
                Some(Ok(Output::Stderr(data))) => errors.extend_from_slice(&data),
                Some(Err(e)) => return Err(e.to_string()),
                None => return Err(String::from_utf8_lossy(&errors).trim().to_owned()),
            }
        }
    })
    .await
    .map_err(|_| "the listener did not answer".to_owned())??;
    Ok(Listening {
        process,
        ready,
        buffer,
    })
}

/// Carries the listener's connections until it ends (the user's connection closing ends it).
pub async fn relay(listening: Listening, handle: Handle, opener: Opener) {
    let Listening {
        process,
        mut buffer,
        ..
    } = listening;
    let StartedProcess {
        mut stdin,
        output: mut listener_output,
        control: _control,
    } = process;
    let (to_listener, mut frames_out) = mpsc::channel::<Frame>(64);
    let writer = tokio::spawn(async move {
        while let Some(frame) = frames_out.recv().await {
            if stdin.write_all(&frame.encode()).await.is_err() || stdin.flush().await.is_err() {
                return;
            }
        }
    });
    let mut connections: HashMap<u32, mpsc::Sender<Frame>> = HashMap::new();
    'output: loop {
        loop {
            let frame = match buffer.next_frame() {
                Ok(Some(frame)) => frame,
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "the listener's stream is not frames; closing it");
                    break 'output;
                }
            };
            match frame.kind {
                FrameKind::Accept => {
                    let (tx, rx) = mpsc::channel(16);
                    connections.insert(frame.conn, tx);
                    let peer = String::from_utf8_lossy(&frame.payload).into_owned();
                    tokio::spawn(connection(
                        handle.clone(),
                        opener.clone(),
                        frame.conn,
                        peer,
                        rx,
                        to_listener.clone(),
                    ));
                }
                FrameKind::Data | FrameKind::Eof | FrameKind::Close => {
                    let closing = frame.kind == FrameKind::Close;
                    if let Some(tx) = connections.get(&frame.conn) {
                        let _ = tx.send(frame.clone()).await;
                    }
                    if closing {
                        connections.remove(&frame.conn);
                    }
                }
                FrameKind::Ready => {}
            }
        }
        match listener_output.next().await {
            Some(Ok(Output::Stdout(data))) => buffer.push(&data),
            Some(Ok(Output::Stderr(data))) => {
                tracing::debug!(stderr = %String::from_utf8_lossy(&data), "listener");
            }
            Some(Err(_)) | None => break,
        }
    }
    writer.abort();
}

/// One accepted connection: an SSH channel to the client, bytes both ways.
async fn connection(
    handle: Handle,
    opener: Opener,
    conn: u32,
    peer: String,
    mut from_listener: mpsc::Receiver<Frame>,
    to_listener: mpsc::Sender<Frame>,
) {
    let opened = match &opener {
        Opener::Agent => handle.channel_open_agent().await,
        Opener::Tcp { address, port } => {
            let (peer_ip, peer_port) = peer
                .rsplit_once(':')
                .map(|(ip, port)| {
                    (
                        ip.trim_matches(['[', ']']).to_owned(),
                        port.parse().unwrap_or(0),
                    )
                })
                .unwrap_or_default();
            handle
                .channel_open_forwarded_tcpip(address.clone(), *port, peer_ip, peer_port)
                .await
        }
    };
    let channel = match opened {
        Ok(channel) => channel,
        Err(e) => {
            tracing::info!(?opener, error = %e, "the client refused a forwarded connection");
            let _ = to_listener
                .send(Frame::new(FrameKind::Close, conn, Vec::new()))
                .await;
            return;
        }
    };
    let (mut read, write) = channel.split();
    loop {
        tokio::select! {
            frame = from_listener.recv() => match frame {
                Some(Frame { kind: FrameKind::Data, payload, .. }) => {
                    if write.data_bytes(Bytes::from(payload)).await.is_err() {
                        break;
                    }
                }
                Some(Frame { kind: FrameKind::Eof, .. }) => {
                    let _ = write.eof().await;
                }
                _ => break,
            },
            message = read.wait() => match message {
                Some(ChannelMsg::Data { data }) => {
                    for piece in data.chunks(envgate_agent::mux::MAX_PAYLOAD) {
                        if to_listener.send(Frame::new(FrameKind::Data, conn, piece.to_vec())).await.is_err() {
                            break;
                        }
                    }
                }
                Some(ChannelMsg::Eof) => {
                    let _ = to_listener.send(Frame::new(FrameKind::Eof, conn, Vec::new())).await;
                }
                Some(ChannelMsg::Close) | None => break,
                Some(_) => {}
            },
        }
    }
    let _ = write.close().await;
    let _ = to_listener
        .send(Frame::new(FrameKind::Close, conn, Vec::new()))
        .await;
}
