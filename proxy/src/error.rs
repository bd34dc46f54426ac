//! The proxy's errors, and the one place that decides what a user is shown
//! and which metric label a failure counts under.

use envgate_proto::failure;
use thiserror::Error;
use tonic::Code;

#[derive(Debug, Error)]
pub enum ProxyError {
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("could not bind {what} on {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("control plane address: {0}")]
    ControlPlaneAddress(String),
    #[error("ssh: {0}")]
    Ssh(#[from] russh::Error),
    #[error("the session's input was not consumed for {0} s")]
    InputStalled(u64),
    #[error(
        "the client sent {0} MiB more input than its process took, without reading the process's output"
    )]
    InputOverflow(usize),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Why a self-service command line (`ssh alice+envgate ...`) was not understood.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum UsageError {
    #[error("unknown command \"{0}\"")]
    UnknownCommand(String),
    #[error("{0}: an environment name is required")]
    MissingEnvironment(&'static str),
    #[error("{command}: unexpected argument \"{argument}\"")]
    UnexpectedArgument {
        command: &'static str,
        argument: String,
    },
    #[error("{command}: {reason}")]
    BadEnvironment {
        command: &'static str,
        reason: envgate_proto::names::NameError,
    },
}

/// Why a connection was refused before it logged in: the budget of connections still logging
/// in (all of them, or those from one source) is spent. Decisions: docs/proxy.md, "Connection
/// limits".
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum PreauthRefusal {
    #[error("{limit} connections are already logging in (--max-unauthenticated)")]
    Global { limit: usize },
    #[error(
        "{limit} connections from {address} are already logging in (--max-unauthenticated-per-source)"
    )]
    PerSource {
        address: crate::limits::Source,
        limit: usize,
    },
}

/// An authenticated user already has `--max-connections-per-user` connections on this proxy.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error(
    "too many connections for {user} (the limit is {limit} per proxy); close some and try again"
)]
pub struct TooManyConnections {
    pub user: String,
    pub limit: usize,
}

/// What a client refused before logging in is sent instead of the SSH banner, as sshd sends
/// "Exceeded MaxStartups": OpenSSH shows it only with `-v` (it reports
/// `kex_exchange_identification: Connection closed by remote host`), other tools show it as is.
pub fn preauth_refusal_line(refusal: &PreauthRefusal) -> &'static str {
    match refusal {
        PreauthRefusal::Global { .. } => {
            "envgate: too many connections are logging in at once; try again shortly"
        }
        PreauthRefusal::PerSource { .. } => {
            "envgate: too many connections from your address are logging in at once; try again shortly"
        }
    }
}

/// Shown to users whose connection a drain or shutdown closes.
pub const DRAIN_MESSAGE: &str = "this proxy is shutting down, reconnect to continue";
/// Shown to a user whose session an admin killed without a message.
pub const DEFAULT_KILL_MESSAGE: &str = "your session was closed by an administrator";
/// The SSH disconnect reason for a client that did not log in in time.
pub const LOGIN_GRACE_MESSAGE: &str = "login grace time exceeded";

/// Why a channel other than a session is refused.
pub const UNSUPPORTED_CHANNEL: &str = "envgate does not forward X11";

/// The stderr line for a notice from envgate itself (kill, drain).
pub fn notice_line(message: &str) -> String {
    format!("envgate: {message}")
}

/// What a user reads of a failure they cannot act on: `text` and a fresh request id, under
/// which the detail is logged here (with the connection's span, so its id too).
pub fn logged_failure(text: &str, detail: &dyn std::fmt::Display) -> String {
    let id = failure::request_id();
    tracing::warn!(request_id = %id, error = %detail, "a user was shown a failure");
    format!("envgate: {}", failure::with_request_id(text, &id))
}

/// The line a user sees on stderr when placement (or a self-service call) fails. The control
/// plane's messages are written for users (e.g. `unknown environment "nope"; available:
/// busybox, debian`), and one about a failure on its side already names the request id its
/// log has the detail under. A failure this proxy noticed itself (the control plane
/// unreachable, a stream broken, an answer without a message) is logged here under a request
/// id of its own, and the user gets the same short sentence; when no replica could be reached
/// at all, the sentence says that only running environments can be reached.
pub fn placement_failure_line(status: &tonic::Status) -> String {
    let message = status.message().trim();
    let named_request = status
        .metadata()
        .get(envgate_proto::metadata::REQUEST_ID)
        .is_some();
    let meant_for_users = matches!(
        status.code(),
        Code::NotFound
            | Code::PermissionDenied
            | Code::FailedPrecondition
            | Code::ResourceExhausted
            | Code::Unauthenticated
            | Code::InvalidArgument
            | Code::Aborted
    );
    match status.code() {
        _ if named_request && !message.is_empty() => format!("envgate: {message}"),
        Code::DeadlineExceeded => {
            "envgate: starting the environment took too long; try again".to_owned()
        }
        _ if meant_for_users && !message.is_empty() => format!("envgate: {message}"),
        // No replica answered, and the placement cache had nothing that answers either.
        Code::Unavailable if crate::controlplane::is_unreachable(status) => {
            logged_failure(failure::CONTROL_PLANE_DOWN, &status_detail(status))
        }
        Code::Unavailable => logged_failure(failure::UNAVAILABLE, &status_detail(status)),
        // The connection broke mid-call (the replica died: tonic reports hyper's "h2 protocol
        // error" as Unknown, with the transport error as source): unavailable, not a bug.
        _ if std::error::Error::source(status).is_some() => {
            logged_failure(failure::UNAVAILABLE, &status_detail(status))
        }
        _ => logged_failure(failure::INTERNAL, &status_detail(status)),
    }
}

fn status_detail(status: &tonic::Status) -> String {
    match std::error::Error::source(status) {
        Some(source) => format!("{}: {} ({source})", status.code(), status.message()),
        None => format!("{}: {}", status.code(), status.message()),
    }
}

/// The line a user sees when the process could not be started in their container after
/// placement. Only the agent's refusals are written for users; the rest is logged.
pub fn exec_failure_line(error: &crate::exec::ExecError) -> String {
    use crate::exec::ExecError;
    match error {
        ExecError::Refused(message) => format!("envgate: {message}"),
        ExecError::AgentUnreachable(_) => logged_failure(
            "your environment is not answering; connect again to get a fresh one (your home directory is kept)",
            error,
        ),
        other => logged_failure(failure::INTERNAL, other),
    }
}

/// Label for `envgate_connections_total{result=...}` after a failed placement.
pub fn placement_result_label(status: &tonic::Status) -> &'static str {
    match status.code() {
        Code::Unauthenticated => "placement_unauthenticated",
        Code::NotFound => "placement_unknown_environment",
        Code::PermissionDenied => "placement_denied",
        Code::FailedPrecondition => "placement_image_missing",
        Code::ResourceExhausted => "placement_limit",
        Code::Unavailable => "placement_unavailable",
        Code::DeadlineExceeded => "placement_timeout",
        _ => "placement_error",
    }
}

/// How a connection ended, for `envgate_connections_total{result=...}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectionResult {
    /// The session ran (whatever the user's process returned).
    Ok,
    /// Never authenticated (wrong credential, gave up, or login grace).
    NotAuthenticated,
    LoginTimeout,
    /// A PROXY header from an untrusted source, or a bad/missing one from a
    /// trusted balancer.
    ProxyHeaderRefused,
    /// Refused at once: `--max-unauthenticated` connections were logging in.
    PreauthLimit,
    /// Refused at once: `--max-unauthenticated-per-source` connections from its source were
    /// logging in.
    PreauthSourceLimit,
    /// Authenticated, but the user already had `--max-connections-per-user` connections.
    UserLimit,
    PlacementFailed(&'static str),
    ExecFailed,
    /// The container's agent could not be reached (the container is then replaced).
    AgentUnreachable,
    /// Closed by a drain, shutdown or an admin kill.
    Closed,
    /// A self-service command (`user+envgate`) was answered, usage errors included.
    SelfService,
    /// A self-service command the control plane refused or could not answer.
    SelfServiceFailed,
    Error,
}

impl ConnectionResult {
    pub fn label(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::NotAuthenticated => "not_authenticated",
            Self::LoginTimeout => "login_timeout",
            Self::ProxyHeaderRefused => "proxy_header_refused",
            Self::PreauthLimit => "preauth_limit",
            Self::PreauthSourceLimit => "preauth_source_limit",
            Self::UserLimit => "user_limit",
            Self::PlacementFailed(label) => label,
            Self::ExecFailed => "exec_failed",
            Self::AgentUnreachable => "agent_unreachable",
            Self::Closed => "closed",
            Self::SelfService => "self_service",
            Self::SelfServiceFailed => "self_service_failed",
            Self::Error => "error",
        }
    }

    pub fn count(self) {
        metrics::counter!("envgate_connections_total", "result" => self.label()).increment(1);
    }

    /// Refused before the SSH handshake for a limit: in a flood there is one per attempt, so
    /// each is logged at debug level (the limits log the start and end of a flood).
    pub fn refused_before_login(self) -> bool {
        matches!(self, Self::PreauthLimit | Self::PreauthSourceLimit)
    }
}

impl From<&PreauthRefusal> for ConnectionResult {
    fn from(refusal: &PreauthRefusal) -> Self {
        match refusal {
            PreauthRefusal::Global { .. } => Self::PreauthLimit,
            PreauthRefusal::PerSource { .. } => Self::PreauthSourceLimit,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `prefix (request id XXXXXXXX)`, and the id.
    fn split_request_id<'a>(line: &'a str, prefix: &str) -> &'a str {
        let id = line
            .strip_prefix(prefix)
            .and_then(|rest| rest.strip_prefix(" (request id "))
            .and_then(|rest| rest.strip_suffix(')'))
            .unwrap_or_else(|| panic!("{line:?} is not {prefix:?} with a request id"));
        assert!(
            id.len() == 8 && id.chars().all(|c| c.is_ascii_hexdigit()),
            "{id}"
        );
        id
    }

    #[test]
    fn users_see_the_control_planes_message() {
        let status =
            tonic::Status::not_found("unknown environment \"nope\"; available: busybox, debian");
        assert_eq!(
            placement_failure_line(&status),
            "envgate: unknown environment \"nope\"; available: busybox, debian"
        );
        assert_eq!(
            placement_result_label(&status),
            "placement_unknown_environment"
        );
        // A failure the control plane logged under an id: shown as it wrote it.
        let mut status = tonic::Status::unavailable(
            "the service is temporarily unavailable; try again in a minute (request id 0a1b2c3d)",
        );
        status.metadata_mut().insert(
            envgate_proto::metadata::REQUEST_ID,
            "0a1b2c3d".parse().unwrap(),
        );
        assert_eq!(
            placement_failure_line(&status),
            "envgate: the service is temporarily unavailable; try again in a minute (request id 0a1b2c3d)"
        );
    }

    #[test]
    fn failures_noticed_by_the_proxy_get_a_request_id_and_no_internals() {
        let unreachable = tonic::Status::unavailable(
            "tcp connect error: Connection refused (os error 111) at 127.0.0.1:50051",
        );
        let line = placement_failure_line(&unreachable);
        split_request_id(
            &line,
            "envgate: the service is temporarily unavailable; try again in a minute",
        );
        // No replica reached at all (the transport error is the status's source).
        let mut unreached = tonic::Status::unavailable("tcp connect error");
        unreached.set_source(std::sync::Arc::new(std::io::Error::from(
            std::io::ErrorKind::ConnectionRefused,
        )));
        let line = placement_failure_line(&unreached);
        split_request_id(
            &line,
            "envgate: the control plane is unavailable; only environments that are already running can be reached right now",
        );
        let broken = tonic::Status::internal("h2 protocol error: stream reset");
        split_request_id(
            &placement_failure_line(&broken),
            "envgate: something went wrong on our side; if it keeps happening, tell your administrator",
        );
        // The replica died mid-call: the client's own status, the transport error its source.
        let cut = tonic::Status::from_error(Box::new(std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "h2 protocol error: error reading a body from connection",
        )));
        assert_eq!(cut.code(), Code::Unknown);
        split_request_id(
            &placement_failure_line(&cut),
            "envgate: the service is temporarily unavailable; try again in a minute",
        );
        use crate::exec::ExecError;
        let line = exec_failure_line(&ExecError::AgentUnreachable(
            "connect /var/lib/envgate/agents/x/sock: No such file".into(),
        ));
        split_request_id(
            &line,
            "envgate: your environment is not answering; connect again to get a fresh one (your home directory is kept)",
        );
        let line = exec_failure_line(&ExecError::Runtime("docker answered 409: conflict".into()));
        split_request_id(
            &line,
            "envgate: something went wrong on our side; if it keeps happening, tell your administrator",
        );
        assert_eq!(
            exec_failure_line(&ExecError::Refused("no user alice in this image".into())),
            "envgate: no user alice in this image"
        );
    }
}
