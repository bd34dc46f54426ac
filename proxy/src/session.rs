//! One task per SSH connection owns its state: who is logged in, where the
//! session is placed, and each channel's setup and process. The russh
//! handler feeds it [`Event`]s; it answers through channel writers and the
//! session [`Handle`].
//!
//! Placement happens once per connection, on the first shell or exec; every
//! channel of the connection then runs in that container. CloseSession is
//! sent when the connection ends, however it ends.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use envgate_proto::audit::{AuditLog, Event as AuditEvent};
use envgate_proto::names::{Login, SELF_SERVICE_ENV};
use envgate_proto::ops::record_phase;
use envgate_proto::v1::placement::Start;
use envgate_proto::v1::{
    OpenSessionRequest, Placement, SessionKind, UnrecordedSession, open_session_event,
};
use futures::StreamExt;
use russh::server::{ChannelOpenHandle, Handle, Msg};
use russh::{ChannelId, ChannelOpenFailure, ChannelWriteHalf, Disconnect, Sig};
use tokio::sync::mpsc;
use tokio::task::{AbortHandle, JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::auth::{Authenticated, unix_now};
use crate::auth_cache::AuthCache;
use crate::close_queue::{CloseQueue, PendingClose};
use crate::connections::{Control, Registry};
use crate::controlplane::{ControlPlane, is_unavailable};
use crate::error::{
    ConnectionResult, exec_failure_line, logged_failure, notice_line, placement_failure_line,
    placement_result_label,
};
use crate::exec::{
    self, ChannelOutput, ExecError, Inbound, ProcessEnd, ProcessRuntime, ProcessSpec,
    SessionTarget, TerminalSize,
};
use crate::forwarded;
use crate::limits::{UserConnections, UserSlot};
use crate::menu::{self, Cancel, Preselect};
use crate::placement_cache::PlacementCache;
use crate::recording::{self, Recordings};
use crate::selfservice;
use crate::session_updates::SessionLedger;

/// What the handler tells the session task.
pub enum Event {
    Authenticated {
        login: Login,
        identity: Authenticated,
    },
    ChannelOpened {
        channel: ChannelId,
        writer: ChannelWriteHalf<Msg>,
        inbound: Arc<Inbound>,
    },
    Request {
        channel: ChannelId,
        request: ChannelRequest,
    },
    /// A `direct-tcpip` or `direct-streamlocal` channel waiting for its answer: the
    /// connection to `target` is made from inside the user's container before `reply`
    /// accepts it.
    ForwardOpened {
        channel: ChannelId,
        writer: ChannelWriteHalf<Msg>,
        inbound: Arc<Inbound>,
        target: ForwardTarget,
        reply: ChannelOpenHandle,
    },
    /// `tcpip-forward` (`ssh -R`): `answer` gets the port bound in the container, or why not.
    RemoteForward {
        address: String,
        port: u32,
        answer: tokio::sync::oneshot::Sender<Result<u32, String>>,
    },
    /// `cancel-tcpip-forward`: `answer` says whether there was such a forward.
    CancelRemoteForward {
        address: String,
        port: u32,
        answer: tokio::sync::oneshot::Sender<bool>,
    },
    ChannelClosed {
        channel: ChannelId,
    },
}

/// Where a forwarded connection goes, inside the user's container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ForwardTarget {
    Tcp(String, u16),
    Unix(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChannelRequest {
    Pty {
        term: String,
        size: TerminalSize,
        /// The client's terminal modes (erase character, signals, …): opcode, value.
        modes: Vec<(u8, u32)>,
    },
    Env {
        name: String,
        value: String,
    },
    Shell,
    Exec {
        command: String,
    },
    /// The SFTP subsystem (also what `scp` uses by default).
    Sftp,
    /// `auth-agent-req@openssh.com` (`ssh -A`): the process gets `SSH_AUTH_SOCK`.
    AgentForward,
    /// Also queued for the process by the handler, in order with the data;
    /// here it updates the size a process starting later gets, and the menu.
    WindowChange(TerminalSize),
}

/// Everything a session task needs from the proxy.
#[derive(Clone)]
pub struct SessionServices {
    pub control_plane: ControlPlane,
    pub runtime: Arc<dyn ProcessRuntime>,
    pub registry: Registry,
    /// Forgotten for a user whose token the control plane refuses (revoked, or signed by a
    /// retired key), so their next login checks the credential again.
    pub auth_cache: Arc<AuthCache>,
    /// Each user's authenticated connections (`--max-connections-per-user`).
    pub user_connections: UserConnections,
    /// Where recordings go, for environments that record sessions.
    pub recordings: Option<Arc<Recordings>>,
    /// The last placement of each user in each environment, used while the control plane is
    /// unavailable.
    pub placements: Arc<PlacementCache>,
    /// Session closes waiting for the control plane to answer again.
    pub closes: Arc<CloseQueue>,
    /// Sessions placed unrecorded, reported and ended on the Fleet stream.
    pub ledger: Arc<SessionLedger>,
    /// Where sessions started from the placement cache are recorded (the control plane
    /// records the others).
    pub audit: AuditLog,
}

pub struct ConnectionInfo {
    pub connection_id: String,
    pub client_address: String,
    /// Cuts the connection's socket when a polite close does not work.
    pub abort: CancellationToken,
    /// The environment of the `--pinned-listen` port the client came in on.
    pub pinned: Option<String>,
}

/// How long the runtime may take to start the user's process.
const PROCESS_START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a killed connection may take to see its message and close
/// before its socket is cut.
const KILL_GRACE: Duration = Duration::from_secs(2);
/// How long a connection refused over its user's cap stays open, so that its
/// client can ask for a shell or exec and be shown why; then it is closed
/// with the reason. OpenSSH asks at once after logging in.
const REFUSED_GRACE: Duration = Duration::from_secs(10);

enum PlacementState {
    NotRequested,
    Placed(Box<Placement>),
    /// From this proxy's placement cache, while the control plane was unavailable: the
    /// control plane has no record of the session, so none is closed.
    PlacedFromCache(Box<Placement>),
    Failed(tonic::Status),
}

impl PlacementState {
    fn placement(&self) -> Option<&Placement> {
        match self {
            Self::Placed(placement) | Self::PlacedFromCache(placement) => Some(placement),
            Self::NotRequested | Self::Failed(_) => None,
        }
    }
}

struct ChannelState {
    output: Arc<ChannelOutput>,
    pty: Option<(String, TerminalSize)>,
    env: Vec<(String, String)>,
    process: Option<RunningProcess>,
    /// The channel asked for the SFTP subsystem rather than a shell or a command.
    sftp: bool,
    /// Terminal modes of the pty request.
    pty_modes: Vec<(u8, u32)>,
    /// The client forwards its ssh-agent on this channel.
    agent_forward: bool,
}

impl ChannelState {
    fn new(output: Arc<ChannelOutput>) -> Self {
        Self {
            output,
            pty: None,
            env: Vec::new(),
            process: None,
            sftp: false,
            pty_modes: Vec::new(),
            agent_forward: false,
        }
    }
}

struct RunningProcess {
    /// Stops the pump when the client closes the channel first.
    task: AbortHandle,
}

/// How one channel's process ended.
struct ChannelEnd {
    exit_code: Option<i64>,
    result: ConnectionResult,
}

struct Connection {
    info: ConnectionInfo,
    services: SessionServices,
    handle: Handle,
    identity: Option<(Login, Authenticated)>,
    placement: PlacementState,
    channels: HashMap<ChannelId, ChannelState>,
    running: JoinSet<ChannelEnd>,
    first_exit: Option<i64>,
    result: ConnectionResult,
    /// A channel could not reach the container's agent: CloseSession asks for a new one.
    container_unreachable: bool,
    /// The menu (or the ListEnvironments call before it) is deciding the environment.
    choosing: Option<Choosing>,
    /// What the menu decided, taken by the next placement ("" = the control
    /// plane's default).
    chosen: Option<String>,
    /// The user's place under `--max-connections-per-user`, held while the
    /// connection lasts.
    user_slot: Option<UserSlot>,
    /// The user was over the cap: every shell and exec is answered with this.
    refused: Option<Refused>,
    /// The agent-forwarding socket in the container (`ssh -A`), once a channel asked for it;
    /// one per connection, as sshd's.
    agent_socket: Option<String>,
    /// `ssh -R` listeners in the container, by the address and port the client asked for.
    remote_forwards: HashMap<(String, u32), AbortHandle>,
}

/// A connection authenticated but refused over its user's cap.
struct Refused {
    line: String,
    /// When the connection is closed if its client has not gone by then.
    close_at: tokio::time::Instant,
}

/// The environment is being chosen on one channel's terminal.
struct Choosing {
    channel: ChannelId,
    command: Option<String>,
    /// Window changes of that channel, to repaint the menu.
    resizes: mpsc::Sender<TerminalSize>,
    /// Shells and execs requested on other channels meanwhile, started once
    /// the choice is made.
    waiting: Vec<(ChannelId, Option<String>)>,
    /// Its own task, so the connection's state stays `Sync`; aborted on drop.
    choice: JoinHandle<Choice>,
}

impl Drop for Choosing {
    fn drop(&mut self) {
        self.choice.abort();
    }
}

enum Choice {
    /// Place the session here ("" = let the control plane decide).
    Environment(String),
    /// The user gave up; the menu's channel has been told and closed.
    Cancelled(Cancel),
}

/// Resolves at `at`; never without one.
async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// The menu's decision once there is one; never while there is no menu.
async fn next_choice(choosing: &mut Option<Choosing>) -> Choice {
    match choosing {
        Some(choosing) => (&mut choosing.choice)
            .await
            .unwrap_or(Choice::Cancelled(Cancel::EndOfInput)),
        None => std::future::pending().await,
    }
}

/// Runs until the SSH connection is gone (the handler dropped its event
/// sender), then releases the placement. `control` delivers a message to
/// show the user before the connection is closed (admin kill, drain,
/// shutdown) or while it goes on (a notice).
pub async fn run(
    info: ConnectionInfo,
    services: SessionServices,
    handle: Handle,
    mut events: mpsc::Receiver<Event>,
    mut control: mpsc::Receiver<Control>,
) -> ConnectionResult {
    let mut connection = Connection {
        info,
        services,
        handle,
        identity: None,
        placement: PlacementState::NotRequested,
        channels: HashMap::new(),
        running: JoinSet::new(),
        first_exit: None,
        result: ConnectionResult::NotAuthenticated,
        container_unreachable: false,
        choosing: None,
        chosen: None,
        user_slot: None,
        refused: None,
        agent_socket: None,
        remote_forwards: HashMap::new(),
    };
    let session_started = Instant::now();
    // Closed (and exported) when dropped, before teardown starts.
    let session_span = tracing::info_span!("session");
    let mut killed = false;
    loop {
        let refused_close = connection.refused.as_ref().map(|r| r.close_at);
        tokio::select! {
            event = events.recv() => match event {
                Some(event) => connection.on_event(event).await,
                None => break,
            },
            () = sleep_until(refused_close), if !killed => {
                killed = true;
                connection.close_refused().await;
            }
            Some(end) = connection.running.join_next() => connection.on_channel_end(end),
            choice = next_choice(&mut connection.choosing) => connection.on_choice(choice).await,
            message = control.recv(), if !killed => match message {
                Some(Control::Kill(message)) => {
                    killed = true;
                    connection.kill(&message).await;
                }
                Some(Control::Notice(message)) => connection.notice(&message).await,
                None => killed = true,
            },
        }
    }
    // The connection is gone: it no longer counts for its user, keep the
    // exits already known, stop the rest.
    connection.user_slot = None;
    while let Some(end) = connection.running.try_join_next() {
        connection.on_channel_end(end);
    }
    connection.running.shutdown().await;
    drop(session_span);
    connection.release(session_started).await;
    connection.result
}

impl Connection {
    async fn on_event(&mut self, event: Event) {
        match event {
            Event::Authenticated { login, identity } => {
                match self.services.user_connections.admit(&identity.user) {
                    Ok(slot) => {
                        self.user_slot = Some(slot);
                        self.result = ConnectionResult::Ok;
                    }
                    Err(refusal) => {
                        tracing::info!(user = %refusal.user, limit = refusal.limit, "refused: too many connections for the user");
                        self.result = ConnectionResult::UserLimit;
                        self.refused = Some(Refused {
                            line: notice_line(&refusal.to_string()),
                            close_at: tokio::time::Instant::now() + REFUSED_GRACE,
                        });
                    }
                }
                self.identity = Some((login, identity));
            }
            Event::ChannelOpened {
                channel,
                writer,
                inbound,
            } => {
                let output = Arc::new(ChannelOutput::new(writer, inbound));
                self.channels.insert(channel, ChannelState::new(output));
            }
            Event::ChannelClosed { channel } => {
                if let Some(process) = self.channels.remove(&channel).and_then(|c| c.process) {
                    process.task.abort();
                }
                if let Some(choosing) = &mut self.choosing {
                    choosing.waiting.retain(|(waiting, _)| *waiting != channel);
                }
            }
            Event::Request { channel, request } => self.on_request(channel, request).await,
            Event::ForwardOpened {
                channel,
                writer,
                inbound,
                target,
                reply,
            } => {
                let output = Arc::new(ChannelOutput::new(writer, inbound));
                self.forward(channel, output, target, reply).await;
            }
            Event::RemoteForward {
                address,
                port,
                answer,
            } => {
                let bound = self.remote_forward(address, port).await;
                if let Err(reason) = &bound {
                    tracing::info!(%reason, "remote forwarding refused");
                }
                let _ = answer.send(bound);
            }
            Event::CancelRemoteForward {
                address,
                port,
                answer,
            } => {
                let found = self.remote_forwards.remove(&(address, port));
                if let Some(task) = &found {
                    task.abort();
                }
                let _ = answer.send(found.is_some());
            }
        }
    }

    /// Connects a `direct-tcpip` channel to `target`, from inside the user's container: the
    /// session is placed as for a command (the login's environment, else the default; no
    /// menu), then `envgate-agent connect` runs there as the user. The channel is accepted
    /// once it is connected, or refused with the reason the user's client prints
    /// ("open failed: connect failed: …").
    async fn forward(
        &mut self,
        channel: ChannelId,
        output: Arc<ChannelOutput>,
        target: ForwardTarget,
        reply: ChannelOpenHandle,
    ) {
        let spec = match self.forward_spec(target).await {
            Ok(spec) => spec,
            Err(reason) => return refuse_forward(reply, reason).await,
        };
        let runtime = self.services.runtime.clone();
        let task = self
            .running
            .spawn(run_forward(runtime, spec, output.clone(), reply).in_current_span());
        self.channels.insert(
            channel,
            ChannelState {
                process: Some(RunningProcess { task }),
                ..ChannelState::new(output)
            },
        );
    }

    /// The path of the connection's agent-forwarding socket in the container, starting its
    /// listener the first time (`None`, logged, when it cannot be had: the session runs
    /// without `SSH_AUTH_SOCK`, as with sshd when it fails to make one).
    async fn agent_socket(&mut self, placement: &Placement) -> Option<String> {
        if let Some(socket) = &self.agent_socket {
            return Some(socket.clone());
        }
        let spec = agent_tool(placement, &[envgate_agent::LISTEN, "unix"]);
        match forwarded::listen(self.services.runtime.as_ref(), &spec).await {
            Ok(listening) => {
                let socket = listening.ready.clone();
                tracing::info!(%socket, "agent forwarding");
                self.spawn_relay(listening, forwarded::Opener::Agent);
                self.agent_socket = Some(socket.clone());
                Some(socket)
            }
            Err(reason) => {
                tracing::warn!(%reason, "agent forwarding: no socket in the container");
                None
            }
        }
    }

    /// `ssh -R address:port`: listens in the user's container (placing the session first if
    /// nothing has) and carries each connection back; `Ok` is the port bound.
    async fn remote_forward(&mut self, address: String, port: u32) -> Result<u32, String> {
        let port16 = u16::try_from(port).map_err(|_| format!("bad port {port}"))?;
        let placement = self.placed_for_forwarding().await?;
        let recorded =
            serde_json::json!({"kind": "remote-forward", "listen": format!("{address}:{port}")});
        self.record(&placement, recorded)
            .map_err(|reason| logged_failure("the forwarding cannot be recorded", &reason))?;
        let spec = agent_tool(
            &placement,
            &[envgate_agent::LISTEN, "tcp", &address, &port16.to_string()],
        );
        let listening = forwarded::listen(self.services.runtime.as_ref(), &spec).await?;
        let bound: u32 = listening
            .ready
            .parse()
            .map_err(|_| "the listener answered nonsense".to_owned())?;
        tracing::info!(%address, port, bound, "remote forwarding");
        let opener = forwarded::Opener::Tcp {
            address: address.clone(),
            port: bound,
        };
        let task = self.spawn_relay(listening, opener);
        // A request for port 0 is cancelled by the port it got.
        self.remote_forwards.insert((address, bound), task);
        Ok(bound)
    }

    /// Carries a listener's connections back to the client for as long as the connection lasts.
    fn spawn_relay(
        &mut self,
        listening: forwarded::Listening,
        opener: forwarded::Opener,
    ) -> AbortHandle {
        let relay = forwarded::relay(listening, self.handle.clone(), opener);
        self.running.spawn(
            async move {
                relay.await;
                ChannelEnd {
                    exit_code: None,
                    result: ConnectionResult::Ok,
                }
            }
            .in_current_span(),
        )
    }

    /// Writes `event` to the session's log when its environment records sessions; `Err` is
    /// why it cannot be (then what it describes must not happen).
    fn record(&self, placement: &Placement, event: serde_json::Value) -> Result<(), String> {
        if !placement.record {
            return Ok(());
        }
        let recordings = self
            .services
            .recordings
            .as_deref()
            .ok_or("this proxy keeps no recordings (--recordings-dir)")?;
        recordings
            .log(&placement.user, &placement.session_id, event)
            .map_err(|e| e.to_string())
    }

    /// The session's placement for a forwarding, placing it first if nothing has (the
    /// login's environment, else the default; no menu, no progress lines); `Err` is the
    /// reason the forwarding is refused.
    async fn placed_for_forwarding(&mut self) -> Result<Placement, String> {
        if let Some(refused) = &self.refused {
            return Err(refused.line.clone());
        }
        if matches!(self.placement, PlacementState::NotRequested) {
            let login = self.identity.as_ref().map(|(login, _)| login);
            let named = login.and_then(|l| l.environment.clone());
            if self.info.pinned.is_none() && named.as_deref() == Some(SELF_SERVICE_ENV) {
                return Err("the envgate pseudo-environment has no network".to_owned());
            }
            let environment = self.info.pinned.clone().or(named).unwrap_or_default();
            self.placement = self.place(environment, SessionKind::Forward, None).await;
        }
        let placement = match &self.placement {
            PlacementState::Failed(status) => return Err(placement_failure_line(status)),
            placed => placed.placement().ok_or("not placed")?.clone(),
        };
        if !has_agent(&placement) {
            return Err(
                "port forwarding needs envgate-agent in the container, and this fleet runs without it"
                    .to_owned(),
            );
        }
        Ok(placement)
    }

    /// The connector to run for a forward to `host:port`, placing the session first if
    /// nothing has; `Err` is the reason the channel is refused.
    async fn forward_spec(&mut self, target: ForwardTarget) -> Result<ProcessSpec, String> {
        let placement = self.placed_for_forwarding().await?;
        tracing::info!(?target, "forwarding a connection from the container");
        let recorded = match &target {
            ForwardTarget::Tcp(host, port) => {
                serde_json::json!({"kind": "forward", "target": format!("{host}:{port}")})
            }
            ForwardTarget::Unix(path) => serde_json::json!({"kind": "forward", "target": path}),
        };
        self.record(&placement, recorded)
            .map_err(|reason| logged_failure("the forwarding cannot be recorded", &reason))?;
        Ok(match &target {
            ForwardTarget::Tcp(host, port) => agent_tool(
                &placement,
                &[envgate_agent::CONNECT, host, &port.to_string()],
            ),
            ForwardTarget::Unix(path) => {
                agent_tool(&placement, &[envgate_agent::CONNECT_UNIX, path])
            }
        })
    }

    async fn on_request(&mut self, channel: ChannelId, request: ChannelRequest) {
        let Some(state) = self.channels.get_mut(&channel) else {
            return;
        };
        match request {
            ChannelRequest::Pty { term, size, modes } => {
                state.pty = Some((term, size));
                state.pty_modes = modes;
            }
            ChannelRequest::Env { name, value } => state.env.push((name, value)),
            ChannelRequest::WindowChange(size) => {
                if let Some((_, current)) = state.pty.as_mut() {
                    *current = size;
                }
                if let Some(choosing) = self.choosing.as_ref().filter(|c| c.channel == channel) {
                    let _ = choosing.resizes.try_send(size);
                }
            }
            ChannelRequest::Shell => self.start(channel, None).await,
            ChannelRequest::Exec { command } => self.start(channel, Some(command)).await,
            ChannelRequest::Sftp => {
                state.sftp = true;
                self.start(channel, None).await;
            }
            ChannelRequest::AgentForward => state.agent_forward = true,
        }
    }

    fn on_channel_end(&mut self, end: Result<ChannelEnd, tokio::task::JoinError>) {
        let Ok(end) = end else { return };
        self.container_unreachable |= end.result == ConnectionResult::AgentUnreachable;
        if self.first_exit.is_none() {
            self.first_exit = end.exit_code;
        }
        if self.result == ConnectionResult::Ok {
            self.result = end.result;
        }
    }

    /// The environment asked for, in the order: the port's pin, the
    /// `user+env` suffix, `ENVGATE_ENV`; empty when none decided (then the
    /// user's default, the menu or the catalogue's default do). The
    /// self-service pseudo-environment is answered before this is asked.
    fn environment(&self, channel: &ChannelState) -> String {
        if let Some(pinned) = &self.info.pinned {
            return pinned.clone();
        }
        self.named(channel).unwrap_or_default().to_owned()
    }

    /// The environment the user named: the `user+env` suffix, else the
    /// channel's last `ENVGATE_ENV`.
    fn named<'a>(&'a self, channel: &'a ChannelState) -> Option<&'a str> {
        let from_login = self
            .identity
            .as_ref()
            .and_then(|(login, _)| login.environment.as_deref());
        let from_env = channel
            .env
            .iter()
            .rev()
            .find(|(k, _)| k == "ENVGATE_ENV")
            .map(|(_, v)| v.as_str());
        from_login.or(from_env)
    }

    async fn start(&mut self, channel: ChannelId, command: Option<String>) {
        let Some(state) = self.channels.get(&channel) else {
            return;
        };
        let output = state.output.clone();
        let pty = state.pty.is_some();
        if let Some(refused) = &self.refused {
            let line = refused.line.clone();
            self.fail_channel(output, line, pty);
            return;
        }
        if matches!(self.placement, PlacementState::NotRequested) {
            if self.wants_self_service(state) {
                if state.sftp {
                    let line = "envgate: the envgate pseudo-environment has no files; connect to one of your environments".to_owned();
                    self.fail_channel(output, line, pty);
                } else {
                    self.self_service(command, output, pty);
                }
                return;
            }
            if let Some(choosing) = &mut self.choosing {
                choosing.waiting.push((channel, command));
                return;
            }
            let kind = match (&command, state.sftp) {
                (_, true) => SessionKind::Sftp,
                (Some(_), false) => SessionKind::Exec,
                (None, false) => SessionKind::Shell,
            };
            let environment = match self.chosen.take() {
                Some(chosen) => chosen,
                None => {
                    let asked = self.environment(state);
                    if let (true, Some((_, size)), Some((_, identity))) =
                        (asked.is_empty(), &state.pty, &self.identity)
                    {
                        let (size, token) = (*size, identity.token.clone());
                        self.open_menu(channel, command, output, size, token);
                        return;
                    }
                    asked
                }
            };
            self.placement = self
                .place(environment, kind, Some((output.as_ref(), pty)))
                .await;
        }
        let placement = match &self.placement {
            PlacementState::Failed(status) => {
                let line = placement_failure_line(status);
                self.result = ConnectionResult::PlacementFailed(placement_result_label(status));
                self.fail_channel(output, line, pty);
                return;
            }
            placed => match placed.placement() {
                Some(placement) => placement.clone(),
                None => return,
            },
        };
        let Some(state) = self.channels.get(&channel) else {
            return;
        };
        if placement.record {
            let pty_size = state.pty.clone();
            let kind = match (&command, state.sftp) {
                (_, true) => serde_json::json!({"kind": "sftp"}),
                (Some(command), false) => serde_json::json!({"kind": "exec", "command": command}),
                (None, false) => serde_json::json!({"kind": "shell"}),
            };
            let recorded = self.record(&placement, kind).and_then(|()| {
                match (&pty_size, self.services.recordings.as_deref()) {
                    (Some((term, size)), Some(recordings)) => recordings
                        .cast(
                            &placement.user,
                            &placement.session_id,
                            channel.number(),
                            *size,
                            term,
                        )
                        .map(Some)
                        .map_err(|e| e.to_string()),
                    _ => Ok(None),
                }
            });
            match recorded {
                Ok(cast) => {
                    let _ = output.stderr_line(recording::NOTICE, pty).await;
                    if let Some(cast) = cast {
                        output.record(cast);
                    }
                }
                Err(reason) => {
                    // Unrecorded is not an option the environment left open.
                    let line = logged_failure(
                        "this environment records sessions, and the recording cannot be kept; try again later",
                        &reason,
                    );
                    self.fail_channel(output, line, pty);
                    return;
                }
            }
        }
        let Some(state) = self.channels.get_mut(&channel) else {
            return;
        };
        // With the agent in the container, file tools the image may lack still work.
        let command = match command {
            Some(c) if has_agent(&placement) => Some(file_tool_command(&c).unwrap_or(c)),
            other => other,
        };
        let mut spec = process_spec(&placement, command, state.pty.as_ref(), &state.env);
        spec.pty_modes = state.pty_modes.clone();
        if state.agent_forward
            && spec.target.agent_target().is_some()
            && let Some(socket) = self.agent_socket(&placement).await
        {
            spec.env.push(format!("SSH_AUTH_SOCK={socket}"));
        }
        let Some(state) = self.channels.get_mut(&channel) else {
            return;
        };
        if state.sftp {
            if spec.target.agent_target().is_none() {
                let line = "envgate: file transfer (sftp, scp) needs envgate-agent in the container, and this fleet runs without it".to_owned();
                self.fail_channel(output, line, pty);
                return;
            }
            spec.command = agent_command(&[envgate_agent::SFTP_SERVER]);
        }
        let runtime = self.services.runtime.clone();
        let process = run_process(runtime, spec, output, pty, self.handle.clone());
        let task = self.running.spawn(process.in_current_span());
        state.process = Some(RunningProcess { task });
    }

    /// Shows `line` on the channel's stderr and ends the channel with exit
    /// status 1; nothing runs.
    fn fail_channel(&mut self, output: Arc<ChannelOutput>, line: String, pty: bool) {
        let report = async move {
            let _ = output.stderr_line(&line, pty).await;
            let _ = output.finish(1).await;
            ChannelEnd {
                exit_code: None,
                result: ConnectionResult::Ok,
            }
        };
        self.running.spawn(report.in_current_span());
    }

    /// Whether the user asked for the `envgate` pseudo-environment, by login suffix or
    /// `ENVGATE_ENV`. Checked before anything else chooses an environment, so self-service
    /// also works on a port pinned to an environment and never shows the menu.
    fn wants_self_service(&self, channel: &ChannelState) -> bool {
        self.named(channel) == Some(SELF_SERVICE_ENV)
    }

    /// Answers a self-service command on this channel; no session is placed and no
    /// container is started.
    fn self_service(&mut self, command: Option<String>, output: Arc<ChannelOutput>, pty: bool) {
        let Some((_, identity)) = &self.identity else {
            return;
        };
        let control_plane = self.services.control_plane.clone();
        let token = identity.token.clone();
        let connection_id = self.info.connection_id.clone();
        let answer = async move {
            let reply = selfservice::run(
                &control_plane,
                &token,
                &connection_id,
                command.as_deref(),
                output.inbound(),
            )
            .await;
            selfservice::answer(&output, &reply, pty).await;
            ChannelEnd {
                exit_code: Some(i64::from(reply.exit_status)),
                result: reply.result,
            }
        };
        self.running
            .spawn(answer.instrument(tracing::info_span!("self_service")));
    }

    /// Nothing chose the environment and the user has a terminal: ask the
    /// control plane what they may use and, unless that decides it, show
    /// the menu. Runs beside the connection's events (window changes, a
    /// kill), whose loop picks the choice up in [`Connection::on_choice`].
    fn open_menu(
        &mut self,
        channel: ChannelId,
        command: Option<String>,
        output: Arc<ChannelOutput>,
        size: TerminalSize,
        token: String,
    ) {
        let control_plane = self.services.control_plane.clone();
        let connection_id = self.info.connection_id.clone();
        let (resizes, resizes_rx) = mpsc::channel(8);
        let choice = choose(
            control_plane,
            token,
            connection_id,
            output,
            size,
            resizes_rx,
        )
        .instrument(tracing::info_span!("menu"));
        self.choosing = Some(Choosing {
            channel,
            command,
            resizes,
            waiting: Vec::new(),
            choice: tokio::spawn(choice),
        });
    }

    /// Starts what waited for the choice: the menu's channel (unless the
    /// user gave up), then the others, in the order they asked.
    async fn on_choice(&mut self, choice: Choice) {
        let Some(mut choosing) = self.choosing.take() else {
            return;
        };
        let waiting = std::mem::take(&mut choosing.waiting);
        match choice {
            Choice::Environment(environment) => {
                self.chosen = Some(environment);
                self.start(choosing.channel, choosing.command.take()).await;
            }
            Choice::Cancelled(why) => {
                self.result = ConnectionResult::PlacementFailed(match why {
                    Cancel::Timeout => "menu_timeout",
                    _ => "no_environment_chosen",
                });
            }
        }
        for (channel, command) in waiting {
            self.start(channel, command).await;
        }
    }

    /// Asks the control plane for a container. Its progress lines go to the channel's stderr
    /// on a terminal (`pty`), and without one once the user has waited in the creation line.
    async fn place(
        &mut self,
        environment: String,
        kind: SessionKind,
        output: Option<(&ChannelOutput, bool)>,
    ) -> PlacementState {
        let Some((_, identity)) = &self.identity else {
            return PlacementState::Failed(tonic::Status::unauthenticated("not authenticated"));
        };
        let (user, expires_at) = (identity.user.clone(), identity.expires_at);
        let started = Instant::now();
        let request = OpenSessionRequest {
            token: identity.token.clone(),
            environment: environment.clone(),
            client_address: self.info.client_address.clone(),
            connection_id: self.info.connection_id.clone(),
            session_kind: kind.into(),
            reports_sessions: true,
        };
        let result = open_session(
            &self.services.control_plane,
            request,
            &self.info.connection_id,
            output,
        )
        .instrument(tracing::info_span!("placement"))
        .await;
        let outcome = if result.is_ok() { "ok" } else { "error" };
        record_phase(
            "placement",
            started.elapsed(),
            &[("result", outcome.to_owned())],
        );
        match result {
            Ok(placement) => {
                tracing::info!(
                    session_id = %placement.session_id,
                    environment = %placement.environment,
                    container = %placement.container_name,
                    created = placement.created,
                    "placed"
                );
                self.services
                    .registry
                    .set_session(&self.info.connection_id, &placement.session_id);
                self.services
                    .placements
                    .remember(&environment, &placement, expires_at);
                if placement.report_after_ms > 0 {
                    let session = UnrecordedSession {
                        session_id: placement.session_id.clone(),
                        user: placement.user.clone(),
                        environment: placement.environment.clone(),
                        container_id: placement.container_id.clone(),
                        session_kind: kind.into(),
                        client_address: self.info.client_address.clone(),
                        connection_id: self.info.connection_id.clone(),
                        started_at: unix_now(),
                    };
                    let report_after = Duration::from_millis(u64::from(placement.report_after_ms));
                    self.services.ledger.placed(session, report_after);
                }
                PlacementState::Placed(Box::new(placement))
            }
            Err(status) if is_unavailable(&status) => {
                tracing::warn!(code = ?status.code(), message = %status.message(), "placement failed: the control plane is unavailable; trying the placement cache");
                match self.place_from_cache(&environment, &status).await {
                    Some(placement) => PlacementState::PlacedFromCache(Box::new(placement)),
                    None => PlacementState::Failed(status),
                }
            }
            Err(status) => {
                tracing::info!(code = ?status.code(), message = %status.message(), "placement failed");
                if status.code() == tonic::Code::Unauthenticated {
                    self.services.auth_cache.revoke_user(&user);
                    self.services.placements.forget_user(&user);
                }
                PlacementState::Failed(status)
            }
        }
    }

    /// The user's last placement in `requested` on this proxy, for a session the control plane
    /// could not place (`why`): only while the user's token lives, and only when the
    /// container's agent still answers. The session gets an id of this proxy's own, and the
    /// audit log a record saying where it came from.
    async fn place_from_cache(
        &mut self,
        requested: &str,
        why: &tonic::Status,
    ) -> Option<Placement> {
        let (_, identity) = self.identity.as_ref()?;
        let now = unix_now();
        let counted = |result: &'static str| {
            metrics::counter!("envgate_proxy_placements_from_cache_total", "result" => result)
                .increment(1);
        };
        if identity.expires_at <= now {
            counted("token_expired");
            return None;
        }
        let user = identity.user.clone();
        let Some(cached) = self.services.placements.lookup(&user, requested, now) else {
            counted("no_placement");
            tracing::info!(%user, environment = %requested, "no cached placement");
            return None;
        };
        let target = session_target(&cached).agent_target()?;
        if !self
            .services
            .runtime
            .answers(&cached.container_id, &target)
            .await
        {
            counted("not_answering");
            self.services.placements.forget(&user, &cached.environment);
            return None;
        }
        counted("served");
        let placement = Placement {
            session_id: format!("cached-{}", uuid::Uuid::new_v4()),
            created: false,
            ..cached
        };
        tracing::warn!(
            session_id = %placement.session_id,
            environment = %placement.environment,
            container = %placement.container_name,
            "placed from the placement cache: the control plane is unavailable"
        );
        self.services.audit.record(AuditEvent::SessionFromCache {
            session: placement.session_id.clone(),
            user,
            environment: placement.environment.clone(),
            container: placement.container_id.clone(),
            proxy: self.services.control_plane.proxy_id().to_owned(),
            client: self.info.client_address.clone(),
            connection: self.info.connection_id.clone(),
            reason: format!("{:?}: {}", why.code(), why.message()),
        });
        self.services
            .registry
            .set_session(&self.info.connection_id, &placement.session_id);
        Some(placement)
    }

    /// Shows `message` as one `envgate:` line on every channel; the session goes on.
    async fn notice(&self, message: &str) {
        tracing::info!(%message, "notice shown");
        self.show(&notice_line(message)).await;
    }

    /// Writes `line` to every channel's terminal (stderr), all at once and
    /// for at most [`KILL_GRACE`] in all: the session's events wait meanwhile,
    /// and a client that reads nothing must not hold them up once per channel.
    async fn show(&self, line: &str) {
        let writes = self
            .channels
            .values()
            .map(|state| state.output.stderr_line(line, state.pty.is_some()));
        // A client that reads nothing misses the message.
        let _ = tokio::time::timeout(KILL_GRACE, futures::future::join_all(writes)).await;
    }

    async fn kill(&mut self, message: &str) {
        tracing::info!(%message, "closing the connection");
        self.result = ConnectionResult::Closed;
        self.close(notice_line(message)).await;
    }

    /// A connection refused over its user's cap whose client is still there
    /// after [`REFUSED_GRACE`] (one that never asked for a shell or exec).
    async fn close_refused(&mut self) {
        // Still refused: a shell or exec asked while the connection closes
        // is answered with the line too.
        if let Some(line) = self.refused.as_ref().map(|r| r.line.clone()) {
            tracing::info!("closing a connection refused over the user's cap");
            self.close(line).await;
        }
    }

    /// Shows `line` on every channel, then closes the connection with it as
    /// the reason; the socket is cut if the client does not go.
    async fn close(&mut self, line: String) {
        self.show(&line).await;
        let abort = self.info.abort.clone();
        tokio::spawn(async move {
            tokio::time::sleep(KILL_GRACE).await;
            abort.cancel();
        });
        let disconnect = self
            .handle
            .disconnect(Disconnect::ByApplication, line, "en".into());
        let _ = tokio::time::timeout(KILL_GRACE, disconnect).await;
    }

    async fn release(&mut self, session_started: Instant) {
        let exit_status = self
            .first_exit
            .and_then(|c| i32::try_from(c).ok())
            .unwrap_or(-1);
        if let Some(placement) = self.placement.placement()
            && self.container_unreachable
        {
            // Not to be tried again: the control plane replaces the container when it can.
            self.services
                .placements
                .forget(&placement.user, &placement.environment);
        }
        if let PlacementState::PlacedFromCache(placement) = &self.placement {
            record_phase("session", session_started.elapsed(), &[]);
            self.services.audit.record(AuditEvent::SessionEnd {
                session: placement.session_id.clone(),
                user: placement.user.clone(),
                environment: placement.environment.clone(),
                proxy: self.services.control_plane.proxy_id().to_owned(),
                exit_status,
                container_unreachable: self.container_unreachable,
            });
        }
        if let PlacementState::Placed(placement) = &self.placement {
            record_phase("session", session_started.elapsed(), &[]);
            if self.services.ledger.ended(
                &placement.session_id,
                exit_status,
                self.container_unreachable,
            ) {
                return;
            }
            let started = Instant::now();
            let result = self
                .services
                .control_plane
                .close_session(
                    &placement.session_id,
                    exit_status,
                    self.container_unreachable,
                    &self.info.connection_id,
                )
                .instrument(tracing::info_span!("teardown"))
                .await;
            record_phase("teardown", started.elapsed(), &[]);
            match result {
                Err(status) if is_unavailable(&status) => {
                    tracing::warn!(session_id = %placement.session_id, error = %status, "CloseSession failed: the control plane is unavailable; kept to deliver later");
                    self.services.closes.push(PendingClose {
                        session_id: placement.session_id.clone(),
                        exit_status,
                        container_unreachable: self.container_unreachable,
                        connection_id: self.info.connection_id.clone(),
                    });
                }
                Err(status) => {
                    tracing::warn!(session_id = %placement.session_id, error = %status, "CloseSession failed");
                }
                Ok(()) => {}
            }
        }
    }
}

/// The menu's side of [`Connection::open_menu`]: the list of environments,
/// the decision it allows, and the menu when it decides nothing. A failed
/// list leaves the choice to the control plane, whose placement answer then
/// tells the user what is wrong.
async fn choose(
    control_plane: ControlPlane,
    token: String,
    connection_id: String,
    output: Arc<ChannelOutput>,
    size: TerminalSize,
    mut resizes: mpsc::Receiver<TerminalSize>,
) -> Choice {
    let list = match control_plane
        .list_environments(&token, &connection_id)
        .await
    {
        Ok(list) => list,
        Err(status) => {
            tracing::warn!(code = ?status.code(), message = %status.message(), "listing the environments for the menu failed");
            return Choice::Environment(String::new());
        }
    };
    let menu = match menu::preselect(&list) {
        Preselect::Use(environment) => return Choice::Environment(environment),
        Preselect::Ask(menu) => menu,
    };
    match menu::run(menu, output.as_ref(), size, &mut resizes).await {
        Ok(environment) => Choice::Environment(environment),
        Err(why) => {
            let _ = output.stderr_line(&why.line(), true).await;
            let _ = output.finish(why.exit_status()).await;
            Choice::Cancelled(why)
        }
    }
}

async fn open_session(
    control_plane: &ControlPlane,
    request: OpenSessionRequest,
    connection_id: &str,
    output: Option<(&ChannelOutput, bool)>,
) -> Result<Placement, tonic::Status> {
    let mut stream = control_plane.open_session(request, connection_id).await?;
    loop {
        let event = stream.message().await?;
        match event.and_then(|e| e.event) {
            Some(open_session_event::Event::Progress(progress)) => {
                if let Some((output, pty)) = output
                    && (pty || progress.waited_in_line)
                {
                    let _ = output.stderr_line(&progress.message, pty).await;
                }
            }
            Some(open_session_event::Event::Placement(placement)) => return Ok(placement),
            None => {
                return Err(tonic::Status::internal(
                    "the control plane ended placement without a container",
                ));
            }
        }
    }
}

/// The remote side of a file tool, rewritten for images that may not have it:
/// - `scp -t|-f …` (what `scp -O` runs) is served by the agent's own scp, which runs the
///   image's `scp` instead when there is one;
/// - `rsync --server …` gets one clear line, rather than the shell's "not found", where the
///   image has no rsync.
///
/// `None`: run the command as it is.
fn file_tool_command(command: &str) -> Option<String> {
    let words: Vec<&str> = command.split_whitespace().collect();
    let options = words.iter().skip(1).take_while(|w| **w != "--");
    match words.first() {
        Some(&"scp") if options.clone().any(|w| *w == "-t" || *w == "-f") => Some(format!(
            "{} {}",
            envgate_agent::IN_CONTAINER,
            command.trim_start()
        )),
        Some(&"rsync") if words.get(1) == Some(&"--server") => Some(format!(
            "command -v rsync >/dev/null 2>&1 || {{ echo 'envgate: this environment has no rsync; \
             use scp or sftp, or an environment whose image has rsync' >&2; exit 127; }}; {command}"
        )),
        _ => None,
    }
}

fn process_spec(
    placement: &Placement,
    command: Option<String>,
    pty: Option<&(String, TerminalSize)>,
    client_env: &[(String, String)],
) -> ProcessSpec {
    let shell = if placement.shell.is_empty() {
        "/bin/sh".to_owned()
    } else {
        placement.shell.clone()
    };
    let command = match command {
        Some(command) => vec![shell, "-c".to_owned(), command],
        None => vec![shell, "-l".to_owned()],
    };
    let mut env = placement.env.clone();
    // What sshd sets for a login, unless the environment says otherwise.
    // The user's home volume is mounted at /home/<user>.
    if !placement.user.is_empty() {
        let user = &placement.user;
        for (name, value) in [
            ("USER", user.clone()),
            ("LOGNAME", user.clone()),
            ("HOME", format!("/home/{user}")),
        ] {
            if !env.iter().any(|e| e.starts_with(&format!("{name}="))) {
                env.push(format!("{name}={value}"));
            }
        }
    }
    // What the environment accepts of what the client sent (ENVGATE_ENV is envgate's own).
    // The control plane names the patterns; an older one sends none: sshd's usual list.
    let accepted = |name: &str| {
        let matches = |p: &str| envgate_proto::names::env_pattern_matches(p, name);
        if placement.accept_env.is_empty() {
            envgate_proto::names::DEFAULT_ACCEPT_ENV
                .iter()
                .any(|p| matches(p))
        } else {
            placement.accept_env.iter().any(|p| matches(p))
        }
    };
    for (name, value) in client_env {
        if name != "ENVGATE_ENV" && accepted(name) {
            env.push(format!("{name}={value}"));
        }
    }
    if let Some((term, _)) = pty {
        env.retain(|e| !e.starts_with("TERM="));
        env.push(format!("TERM={term}"));
    }
    let non_empty = |s: &str| (!s.is_empty()).then(|| s.to_owned());
    let account = placement.account.as_ref().map(|a| envgate_agent::Account {
        name: a.name.clone(),
        uid: a.uid,
        gid: a.gid,
        home: a.home.clone(),
    });
    ProcessSpec {
        container_id: placement.container_id.clone(),
        command,
        tty: pty.map(|(_, size)| *size),
        pty_modes: Vec::new(),
        env,
        working_dir: non_empty(&placement.working_dir),
        user: non_empty(&placement.run_as),
        account,
        target: session_target(placement),
    }
}

/// Where the placement says the session starts; a placement without a usable one falls back
/// to Docker exec in its container (which a proxy without `--docker-host` refuses clearly).
pub(crate) fn session_target(placement: &Placement) -> SessionTarget {
    match SessionTarget::from_wire(placement.start.as_ref()) {
        Ok(target) => target,
        Err(e) => {
            tracing::warn!(error = %e, "ignoring an unusable session start; using runtime exec");
            SessionTarget::DockerExec {
                container_id: placement.container_id.clone(),
            }
        }
    }
}

/// Whether the session starts through the container's agent (which file transfer, port
/// forwarding and the placement cache need).
pub(crate) fn has_agent(placement: &Placement) -> bool {
    matches!(
        placement.start,
        Some(Start::AgentUnix(_) | Start::AgentTcp(_))
    )
}

/// `envgate-agent ARGS…` in the placed container, as the session's user, without a terminal:
/// the agent binary's file-transfer and forwarding tools.
fn agent_tool(placement: &Placement, args: &[&str]) -> ProcessSpec {
    ProcessSpec {
        command: agent_command(args),
        ..process_spec(placement, None, None, &[])
    }
}

fn agent_command(args: &[&str]) -> Vec<String> {
    std::iter::once(envgate_agent::IN_CONTAINER)
        .chain(args.iter().copied())
        .map(str::to_owned)
        .collect()
}

/// How long `envgate-agent connect` may take to answer: its own connect bound, plus slack.
const FORWARD_CONNECT_WAIT: Duration =
    Duration::from_secs(envgate_agent::connect::CONNECT_TIMEOUT.as_secs() + 5);

/// One forwarded connection: start the connector, answer the channel open by its first
/// byte (connected) or its error line, then pump bytes both ways until either side ends.
async fn run_forward(
    runtime: Arc<dyn ProcessRuntime>,
    spec: ProcessSpec,
    output: Arc<ChannelOutput>,
    reply: ChannelOpenHandle,
) -> ChannelEnd {
    let end = ChannelEnd {
        exit_code: None,
        result: ConnectionResult::Ok,
    };
    let (process, first) = match connect_in_container(runtime.as_ref(), &spec).await {
        Ok(connected) => connected,
        Err(reason) => {
            refuse_forward(reply, reason).await;
            return end;
        }
    };
    reply.accept().await;
    if !first.is_empty() && output.stdout(first).await.is_err() {
        return end;
    }
    if let Err(e) = exec::pump(process, &output, false).await {
        tracing::debug!(error = %e, "forwarded connection ended with an error");
    }
    let _ = output.close().await;
    end
}

/// Starts the connector and waits for its verdict: connected (the bytes after its 0 byte),
/// or the line it printed on failing.
async fn connect_in_container(
    runtime: &dyn ProcessRuntime,
    spec: &ProcessSpec,
) -> Result<(exec::StartedProcess, bytes::Bytes), String> {
    let started = tokio::time::timeout(PROCESS_START_TIMEOUT, runtime.start(spec)).await;
    let mut process = started
        .unwrap_or(Err(ExecError::StartTimeout(PROCESS_START_TIMEOUT)))
        .map_err(|e| {
            tracing::warn!(error = %e, "starting the connector failed");
            exec_failure_line(&e)
        })?;
    let answer = tokio::time::timeout(FORWARD_CONNECT_WAIT, async {
        let mut errors = Vec::new();
        loop {
            match process.output.next().await {
                Some(Ok(exec::Output::Stdout(data))) => return Ok(data),
                Some(Ok(exec::Output::Stderr(data))) => errors.extend_from_slice(&data),
                Some(Err(e)) => return Err(e.to_string()),
                None => return Err(String::from_utf8_lossy(&errors).trim().to_owned()),
            }
        }
    })
    .await
    .unwrap_or_else(|_| Err("no answer from the container".to_owned()))?;
    match answer.first() {
        Some(0) => Ok((process, answer.slice(1..))),
        _ => Err("the connector answered nonsense".to_owned()),
    }
}

async fn refuse_forward(reply: ChannelOpenHandle, reason: String) {
    tracing::info!(%reason, "forwarded connection refused");
    reply
        .reject(ChannelOpenFailure::Other { code: 2, reason })
        .await;
}

fn exec_failure_result(e: &ExecError) -> ConnectionResult {
    match e {
        ExecError::AgentUnreachable(_) => ConnectionResult::AgentUnreachable,
        _ => ConnectionResult::ExecFailed,
    }
}

async fn run_process(
    runtime: Arc<dyn ProcessRuntime>,
    spec: ProcessSpec,
    output: Arc<ChannelOutput>,
    pty: bool,
    handle: Handle,
) -> ChannelEnd {
    let start = runtime
        .start(&spec)
        .instrument(tracing::info_span!("exec_start"));
    let started = tokio::time::timeout(PROCESS_START_TIMEOUT, start).await;
    let process = match started.unwrap_or(Err(ExecError::StartTimeout(PROCESS_START_TIMEOUT))) {
        Ok(process) => process,
        Err(e) => {
            tracing::warn!(error = %e, "starting the process failed");
            let _ = output.stderr_line(&exec_failure_line(&e), pty).await;
            let _ = output.finish(1).await;
            return ChannelEnd {
                exit_code: None,
                result: exec_failure_result(&e),
            };
        }
    };
    match exec::pump(process, &output, pty).await {
        Ok(ProcessEnd {
            code,
            signal: Some(signal),
        }) => {
            // As sshd: exit-signal instead of exit-status.
            let sent = handle
                .exit_signal_request(
                    output.id(),
                    // russh writes a signal's name as given, so `Custom`
                    // carries the standard names (`TERM`, `INT`) too.
                    Sig::Custom(signal.name),
                    signal.core_dumped,
                    String::new(),
                    String::new(),
                )
                .await;
            if sent.is_ok() {
                let _ = output.close().await;
            }
            ChannelEnd {
                exit_code: Some(code),
                result: ConnectionResult::Ok,
            }
        }
        Ok(ProcessEnd { code, signal: None }) => {
            let _ = output.finish(exec::exit_status(code)).await;
            ChannelEnd {
                exit_code: Some(code),
                result: ConnectionResult::Ok,
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "the process's end could not be observed");
            if matches!(e, ExecError::AgentUnreachable(_)) {
                let _ = output.stderr_line(&exec_failure_line(&e), pty).await;
            }
            let _ = output.finish(255).await;
            ChannelEnd {
                exit_code: None,
                result: exec_failure_result(&e),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn placement() -> Placement {
        Placement {
            container_id: "c1".into(),
            shell: "/bin/bash".into(),
            working_dir: "/home/alice".into(),
            user: "alice".into(),
            env: vec!["HOME=/home/alice".into(), "TERM=dumb".into()],
            ..Default::default()
        }
    }

    #[test]
    fn file_tools_are_rewritten_only_for_their_remote_sides() {
        assert_eq!(
            file_tool_command("scp -v -r -p -t -- 'my dir'").as_deref(),
            Some("/.envgate/agent scp -v -r -p -t -- 'my dir'")
        );
        assert_eq!(
            file_tool_command("scp -f -- a b").as_deref(),
            Some("/.envgate/agent scp -f -- a b")
        );
        let rsync = file_tool_command("rsync --server -logDtpre.iLsfxCIvu . dir/").unwrap();
        assert!(
            rsync.starts_with("command -v rsync >/dev/null 2>&1 || {"),
            "{rsync}"
        );
        assert!(
            rsync.ends_with("; rsync --server -logDtpre.iLsfxCIvu . dir/"),
            "{rsync}"
        );
        for untouched in [
            "scp a b",
            "scp -- -t",
            "ls -t",
            "rsync -a x y",
            "echo scp -t",
            "",
        ] {
            assert_eq!(file_tool_command(untouched), None, "{untouched}");
        }
    }

    #[test]
    fn exec_and_shell_commands_use_the_environments_shell() {
        let env = vec![
            ("LANG".to_owned(), "C.UTF-8".to_owned()),
            ("ENVGATE_ENV".to_owned(), "x".to_owned()),
        ];
        let spec = process_spec(&placement(), Some("echo hi".into()), None, &env);
        assert_eq!(spec.command, ["/bin/bash", "-c", "echo hi"]);
        assert_eq!(spec.tty, None);
        assert_eq!(
            spec.env,
            [
                "HOME=/home/alice",
                "TERM=dumb",
                "USER=alice",
                "LOGNAME=alice",
                "LANG=C.UTF-8"
            ]
        );
        assert_eq!(spec.working_dir.as_deref(), Some("/home/alice"));
        assert_eq!(spec.user, None);

        let size = TerminalSize { cols: 80, rows: 24 };
        let pty = ("xterm".to_owned(), size);
        let spec = process_spec(&placement(), None, Some(&pty), &[]);
        assert_eq!(spec.command, ["/bin/bash", "-l"]);
        assert_eq!(spec.tty, Some(size));
        assert_eq!(
            spec.env,
            [
                "HOME=/home/alice",
                "USER=alice",
                "LOGNAME=alice",
                "TERM=xterm"
            ]
        );

        let bare = Placement {
            env: vec![],
            ..placement()
        };
        let spec = process_spec(&bare, None, None, &[]);
        assert_eq!(
            spec.env,
            ["USER=alice", "LOGNAME=alice", "HOME=/home/alice"]
        );
    }
}
