//! One simulated user: connect, authenticate, run the command, read its
//! output and exit status, disconnect — and the record of how long each step
//! took or why it failed.
//!
//! Two kinds of client do this. The in-process russh client sees every step
//! and times each one; the OpenSSH client spawns the real `ssh` binary, as the
//! study did, and can only time the whole turnaround.

pub mod openssh;
pub mod russh;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// Which SSH client drives the connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum ClientKind {
    /// In-process russh client: every phase timed, hundreds of connections
    /// from one process.
    Russh,
    /// The real `ssh` binary, one process per connection: turnaround and exit
    /// status only.
    Openssh,
}

impl ClientKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ClientKind::Russh => "russh",
            ClientKind::Openssh => "openssh",
        }
    }
}

/// The step a connection was in when it finished or failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Step {
    /// TCP connect.
    Connect,
    /// SSH version exchange and key exchange.
    Handshake,
    /// Public-key authentication.
    Auth,
    /// Channel open and exec, until the first output byte.
    Exec,
    /// Reading output until the exit status arrives.
    Output,
    /// Disconnect until the server closed the connection.
    Close,
    /// The OpenSSH client: one opaque step from spawn to exit.
    Process,
}

/// Why a connection did not end with exit status 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureKind {
    /// Nothing listens on the target port.
    ConnectRefused,
    /// Any other TCP connect error.
    ConnectError,
    /// A step did not finish within `--timeout`.
    Timeout,
    /// The SSH version or key exchange failed, or the server closed early.
    HandshakeFailed,
    /// The server refused the key.
    AuthRejected,
    /// Opening the session channel or the exec request was refused or broke.
    ChannelError,
    /// The command exited with a non-zero status.
    NonZeroExit,
    /// The command was killed by a signal.
    ExitSignal,
    /// The channel closed without an exit status.
    NoExitStatus,
    /// The client itself failed (spawning `ssh`, an unclassified `ssh` error).
    ClientError,
}

impl FailureKind {
    pub fn as_str(self) -> &'static str {
        match self {
            FailureKind::ConnectRefused => "connect_refused",
            FailureKind::ConnectError => "connect_error",
            FailureKind::Timeout => "timeout",
            FailureKind::HandshakeFailed => "handshake_failed",
            FailureKind::AuthRejected => "auth_rejected",
            FailureKind::ChannelError => "channel_error",
            FailureKind::NonZeroExit => "non_zero_exit",
            FailureKind::ExitSignal => "exit_signal",
            FailureKind::NoExitStatus => "no_exit_status",
            FailureKind::ClientError => "client_error",
        }
    }
}

/// A classified failure: what went wrong, in which step, and the text that
/// explains it (an error message or the first line of stderr).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure {
    pub kind: FailureKind,
    pub step: Step,
    pub detail: String,
}

impl Failure {
    pub fn new(kind: FailureKind, step: Step, detail: impl Into<String>) -> Self {
        Failure {
            kind,
            step,
            detail: detail.into(),
        }
    }

    pub fn timeout(step: Step) -> Self {
        Failure::new(
            FailureKind::Timeout,
            step,
            format!("no progress within the timeout during {step:?}"),
        )
    }
}

/// The login a client uses at one endpoint.
#[derive(Clone, Debug)]
pub struct Credential {
    pub user: String,
    pub key_path: PathBuf,
    /// The parsed key, shared by every client using it (russh client only).
    pub key: Arc<::russh::keys::PrivateKey>,
}

/// What one client has to do.
#[derive(Clone, Debug)]
pub struct Job {
    /// `host:port`.
    pub addr: String,
    pub credential: Credential,
    pub command: String,
    /// Limit on the whole connection, from its start to the end of close.
    pub timeout: Duration,
    /// The only key exchange algorithm to offer (`None`: the client's own list).
    pub kex: Option<String>,
}

/// Key exchange pinned by default: supported by OpenSSH's sshd and by russh
/// servers alike, so both endpoints of a comparison do the same work (left to
/// their defaults, OpenSSH 9 picks sntrup761x25519, about 70 ms of CPU per
/// client here, and russh picks mlkem768x25519).
pub const DEFAULT_KEX: &str = "curve25519-sha256";

/// Step boundaries of one connection, as offsets from its start. A boundary
/// is set once; later steps can only end after earlier ones, so the derived
/// durations are never negative.
#[derive(Clone, Debug)]
pub struct Timeline {
    started: Instant,
    marks: Vec<(Step, Duration)>,
}

impl Timeline {
    pub fn start() -> Self {
        Timeline {
            started: Instant::now(),
            marks: Vec::with_capacity(6),
        }
    }

    pub fn started(&self) -> Instant {
        self.started
    }

    /// Marks the end of `step` now.
    pub fn mark(&mut self, step: Step) {
        if self.end_of(step).is_none() {
            self.marks.push((step, self.started.elapsed()));
        }
    }

    /// Offset at which `step` ended.
    pub fn end_of(&self, step: Step) -> Option<Duration> {
        self.marks.iter().find(|(s, _)| *s == step).map(|(_, d)| *d)
    }

    /// How long `step` took: from the end of the previous marked step (or the
    /// start) to its own end.
    pub fn duration_of(&self, step: Step) -> Option<Duration> {
        let index = self.marks.iter().position(|(s, _)| *s == step)?;
        let end = self.marks[index].1;
        let begin = if index == 0 {
            Duration::ZERO
        } else {
            self.marks[index - 1].1
        };
        Some(end.saturating_sub(begin))
    }

    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }
}

/// What a client reports back.
#[derive(Clone, Debug)]
pub struct Outcome {
    pub timeline: Timeline,
    pub total: Duration,
    pub exit_status: Option<u32>,
    pub output_bytes: u64,
    pub failure: Option<Failure>,
}

/// One row of the results: one connection of one level at one endpoint.
/// Durations are milliseconds; a step that was not reached (or that the
/// client kind cannot see) is empty.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ConnectionRecord {
    /// `target` or `compare`.
    pub endpoint: String,
    pub level: u32,
    /// Index of the client within its level, 0-based.
    pub index: u32,
    pub client: ClientKind,
    pub user: String,
    /// How long after the start barrier released this client began.
    pub start_offset_ms: f64,
    pub tcp_connect_ms: Option<f64>,
    pub handshake_ms: Option<f64>,
    pub auth_ms: Option<f64>,
    /// Channel open + exec until the first output byte (or the exit status,
    /// for a command that prints nothing).
    pub first_byte_ms: Option<f64>,
    /// From the first output byte until the exit status.
    pub exit_wait_ms: Option<f64>,
    /// From the disconnect until the server closed the connection.
    pub close_ms: Option<f64>,
    /// Start to end: the turnaround a user waits.
    pub total_ms: f64,
    pub exit_status: Option<u32>,
    pub output_bytes: u64,
    pub failure: Option<FailureKind>,
    pub failure_step: Option<Step>,
    pub failure_detail: String,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

impl ConnectionRecord {
    pub fn from_outcome(
        endpoint: &str,
        level: u32,
        index: u32,
        client: ClientKind,
        user: &str,
        start_offset: Duration,
        outcome: &Outcome,
    ) -> Self {
        let t = &outcome.timeline;
        let step = |s| t.duration_of(s).map(ms);
        ConnectionRecord {
            endpoint: endpoint.to_owned(),
            level,
            index,
            client,
            user: user.to_owned(),
            start_offset_ms: ms(start_offset),
            tcp_connect_ms: step(Step::Connect),
            handshake_ms: step(Step::Handshake),
            auth_ms: step(Step::Auth),
            first_byte_ms: step(Step::Exec),
            exit_wait_ms: step(Step::Output),
            close_ms: step(Step::Close),
            total_ms: ms(outcome.total),
            exit_status: outcome.exit_status,
            output_bytes: outcome.output_bytes,
            failure: outcome.failure.as_ref().map(|f| f.kind),
            failure_step: outcome.failure.as_ref().map(|f| f.step),
            failure_detail: outcome
                .failure
                .as_ref()
                .map(|f| f.detail.clone())
                .unwrap_or_default(),
        }
    }

    pub fn succeeded(&self) -> bool {
        self.failure.is_none()
    }

    /// The client-side step durations in order, with their names.
    pub fn steps(&self) -> [(&'static str, Option<f64>); 6] {
        [
            ("tcp_connect", self.tcp_connect_ms),
            ("handshake", self.handshake_ms),
            ("auth", self.auth_ms),
            ("first_byte", self.first_byte_ms),
            ("exit_wait", self.exit_wait_ms),
            ("close", self.close_ms),
        ]
    }
}

/// Keeps the first line of a diagnostic, trimmed and bounded, for a record.
pub(crate) fn first_line(text: &str) -> String {
    let line = text
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("");
    line.chars().take(200).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeline_durations_follow_marks() {
        let mut t = Timeline::start();
        std::thread::sleep(Duration::from_millis(5));
        t.mark(Step::Connect);
        std::thread::sleep(Duration::from_millis(5));
        t.mark(Step::Handshake);
        t.mark(Step::Connect); // a second mark of the same step is ignored
        let connect = t.duration_of(Step::Connect).unwrap();
        let handshake = t.duration_of(Step::Handshake).unwrap();
        assert!(connect >= Duration::from_millis(5));
        assert!(handshake >= Duration::from_millis(5));
        assert_eq!(t.end_of(Step::Handshake).unwrap(), connect + handshake);
        assert!(t.end_of(Step::Connect).unwrap() <= t.end_of(Step::Handshake).unwrap());
        assert_eq!(t.duration_of(Step::Auth), None);
    }

    #[test]
    fn first_line_skips_blank_lines_and_bounds_length() {
        assert_eq!(
            first_line("\n  envgate: no such env \nmore"),
            "envgate: no such env"
        );
        assert_eq!(first_line(&"x".repeat(500)).len(), 200);
        assert_eq!(first_line(""), "");
    }
}
