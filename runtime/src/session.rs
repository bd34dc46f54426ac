//! The proxy's seam: how a session begins in a placed container. The placement says where
//! ([`SessionTarget`]); a [`ProcessRuntime`] starts the process there and hands back its
//! input, output and controls, which the proxy pumps to and from one SSH channel the same
//! way for every runtime.

use std::path::PathBuf;
use std::pin::Pin;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use envgate_agent::client::AgentAddress;
use envgate_proto::v1 as wire;
use envgate_proto::v1::placement::Start;
use futures::Stream;
use thiserror::Error;
use tokio::io::AsyncWrite;

/// Where a session starts in its placed container: the container's `envgate-agent` (the
/// fast path, docs/agent.md) or the engine's own exec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionTarget {
    /// The agent's Unix socket on the proxy's host (Docker: bind-mounted out of the container).
    AgentUnix { path: PathBuf, secret: String },
    /// The agent over TCP, `host:port` (Kubernetes: the Pod IP).
    AgentTcp { address: String, secret: String },
    /// `docker exec` in the container: containers without the agent.
    DockerExec { container_id: String },
    /// The Kubernetes exec API in a Pod's container.
    KubernetesExec {
        namespace: String,
        pod: String,
        container: String,
    },
}

impl SessionTarget {
    /// The target of a container whose agent listens at `address` (a Unix socket path,
    /// `unix:/path`, or `host:port`) and expects `secret`.
    pub fn agent(address: &str, secret: &str) -> Result<Self, String> {
        let secret = secret.to_owned();
        Ok(match address.parse::<AgentAddress>()? {
            AgentAddress::Unix(path) => SessionTarget::AgentUnix { path, secret },
            AgentAddress::Tcp(address) => SessionTarget::AgentTcp { address, secret },
        })
    }

    /// The agent to dial, when the session starts through one.
    pub fn agent_target(&self) -> Option<AgentTarget> {
        match self {
            SessionTarget::AgentUnix { path, secret } => Some(AgentTarget {
                address: AgentAddress::Unix(path.clone()),
                secret: secret.clone(),
            }),
            SessionTarget::AgentTcp { address, secret } => Some(AgentTarget {
                address: AgentAddress::Tcp(address.clone()),
                secret: secret.clone(),
            }),
            SessionTarget::DockerExec { .. } | SessionTarget::KubernetesExec { .. } => None,
        }
    }
}

/// The wire form: `Placement.start` (envgate.proto).
impl SessionTarget {
    pub fn to_wire(&self) -> Start {
        match self.clone() {
            SessionTarget::AgentUnix { path, secret } => Start::AgentUnix(wire::AgentUnix {
                path: path.display().to_string(),
                secret,
            }),
            SessionTarget::AgentTcp { address, secret } => {
                Start::AgentTcp(wire::AgentTcp { address, secret })
            }
            SessionTarget::DockerExec { container_id } => {
                Start::DockerExec(wire::DockerExec { container_id })
            }
            SessionTarget::KubernetesExec {
                namespace,
                pod,
                container,
            } => Start::KubernetesExec(wire::KubernetesExec {
                namespace,
                pod,
                container,
            }),
        }
    }

    /// From a placement; `Err` is one line saying what is wrong with it.
    pub fn from_wire(start: Option<&Start>) -> Result<Self, String> {
        let required = |what: &str, value: &str| {
            if value.is_empty() {
                Err(format!("the placement names no {what}"))
            } else {
                Ok(value.to_owned())
            }
        };
        match start {
            None => Err(
                "the placement says nowhere to start the session (an older control plane?)".into(),
            ),
            Some(Start::AgentUnix(a)) => Ok(SessionTarget::AgentUnix {
                path: required("agent socket", &a.path)?.into(),
                secret: a.secret.clone(),
            }),
            Some(Start::AgentTcp(a)) => {
                let address = required("agent address", &a.address)?;
                match address.parse::<AgentAddress>()? {
                    AgentAddress::Tcp(address) => Ok(SessionTarget::AgentTcp {
                        address,
                        secret: a.secret.clone(),
                    }),
                    AgentAddress::Unix(_) => Err(format!("not a TCP agent address: {address:?}")),
                }
            }
            Some(Start::DockerExec(d)) => Ok(SessionTarget::DockerExec {
                container_id: required("container", &d.container_id)?,
            }),
            Some(Start::KubernetesExec(k)) => Ok(SessionTarget::KubernetesExec {
                namespace: required("namespace", &k.namespace)?,
                pod: required("pod", &k.pod)?,
                container: required("container", &k.container)?,
            }),
        }
    }
}

/// Where a container's agent listens and the secret it expects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentTarget {
    pub address: AgentAddress,
    pub secret: String,
}

#[derive(Debug, Error)]
pub enum ExecError {
    #[error("the container runtime failed: {0}")]
    Runtime(String),
    #[error("the process's exit code is not known")]
    NoExitCode,
    #[error("the container runtime did not start the process within {0:?}")]
    StartTimeout(Duration),
    /// The agent answered but could not start the process; meant for the user.
    #[error("{0}")]
    Refused(String),
    /// The container's agent cannot be reached or its connection broke.
    #[error("{0}")]
    AgentUnreachable(String),
    #[error("this runtime cannot deliver signals")]
    NoSignals,
    #[error(
        "the container runs no envgate-agent and this proxy has no Docker access (--docker-host)"
    )]
    NoDockerExec,
    /// The placement names a way in this proxy was built or started without.
    #[error("this proxy cannot start sessions through {0}")]
    Unsupported(&'static str),
}

impl From<std::io::Error> for ExecError {
    fn from(e: std::io::Error) -> Self {
        ExecError::Runtime(e.to_string())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TerminalSize {
    pub cols: u32,
    pub rows: u32,
}

/// What to run and how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessSpec {
    /// The placed container's id (pooled agent connections are keyed by it).
    pub container_id: String,
    /// Where the process starts.
    pub target: SessionTarget,
    pub command: Vec<String>,
    /// A terminal was requested: run on a tty of this size.
    pub tty: Option<TerminalSize>,
    /// The client's terminal modes for that tty (RFC 4254 opcodes); Docker exec ignores them.
    pub pty_modes: Vec<(u8, u32)>,
    /// `KEY=value`.
    pub env: Vec<String>,
    pub working_dir: Option<String>,
    /// Who to run as when there is no `account`: a name or `uid[:gid]` of the image.
    pub user: Option<String>,
    /// The user's own account, which the agent creates in the container before the first
    /// process; Docker exec runs as its bare `uid:gid`.
    pub account: Option<envgate_agent::Account>,
}

pub enum Output {
    Stdout(Bytes),
    Stderr(Bytes),
}

pub type OutputStream = Pin<Box<dyn Stream<Item = Result<Output, ExecError>> + Send>>;

/// A started process: its input, its output, and a way to steer it.
pub struct StartedProcess {
    pub stdin: Pin<Box<dyn AsyncWrite + Send>>,
    pub output: OutputStream,
    pub control: Box<dyn ProcessControl>,
}

#[async_trait]
pub trait ProcessControl: Send + Sync {
    async fn resize(&self, size: TerminalSize) -> Result<(), ExecError>;
    /// The exit code once the process has ended; `None` while it runs.
    async fn exit_code(&self) -> Result<Option<i64>, ExecError>;
    /// Delivers an SSH signal (`INT`, `TERM`, ...) to the process.
    async fn signal(&self, _name: &str) -> Result<(), ExecError> {
        Err(ExecError::NoSignals)
    }
    /// After `exit_code` returned `Some`: the signal that ended the process,
    /// when the runtime can tell (Docker exec reports only 128 + n).
    async fn exit_signal(&self) -> Option<ExitSignal> {
        None
    }
}

/// A process ended by a signal, as SSH's `exit-signal` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExitSignal {
    /// Without `SIG`, e.g. `TERM`.
    pub name: String,
    pub core_dumped: bool,
}

/// How a process ended: the shell's code (128 + n for a signal) and the
/// signal, when known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessEnd {
    pub code: i64,
    pub signal: Option<ExitSignal>,
}

/// Starts sessions' processes in placed containers.
#[async_trait]
pub trait ProcessRuntime: Send + Sync {
    /// Starts the process attached, with the initial terminal size applied.
    async fn start(&self, spec: &ProcessSpec) -> Result<StartedProcess, ExecError>;

    /// Whether the container's agent answers (connects and completes its handshake), without
    /// starting anything. A runtime that cannot tell answers `false`.
    async fn answers(&self, _container_id: &str, _agent: &AgentTarget) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_addresses_become_typed_targets() {
        let unix = SessionTarget::agent("/var/lib/envgate/agents/x/sock/agent.sock", "s").unwrap();
        assert_eq!(
            unix,
            SessionTarget::AgentUnix {
                path: "/var/lib/envgate/agents/x/sock/agent.sock".into(),
                secret: "s".into()
            }
        );
        assert_eq!(
            unix.agent_target().unwrap().address,
            AgentAddress::Unix("/var/lib/envgate/agents/x/sock/agent.sock".into())
        );
        let tcp = SessionTarget::agent("10.0.0.7:7022", "s").unwrap();
        assert_eq!(
            tcp.agent_target().unwrap().address,
            AgentAddress::Tcp("10.0.0.7:7022".into())
        );
        assert!(SessionTarget::agent("", "s").is_err());
        assert!(SessionTarget::agent("no port", "s").is_err());
        let exec = SessionTarget::DockerExec {
            container_id: "c1".into(),
        };
        assert_eq!(exec.agent_target(), None);
    }

    #[test]
    fn targets_round_trip_through_the_wire_and_bad_ones_are_refused() {
        let targets = [
            SessionTarget::AgentUnix {
                path: "/run/a.sock".into(),
                secret: "s".into(),
            },
            SessionTarget::AgentTcp {
                address: "10.0.0.7:7022".into(),
                secret: "s".into(),
            },
            SessionTarget::DockerExec {
                container_id: "c1".into(),
            },
            SessionTarget::KubernetesExec {
                namespace: "envgate".into(),
                pod: "p".into(),
                container: "user".into(),
            },
        ];
        for target in targets {
            assert_eq!(
                SessionTarget::from_wire(Some(&target.to_wire())),
                Ok(target)
            );
        }
        assert!(
            SessionTarget::from_wire(None)
                .unwrap_err()
                .contains("nowhere")
        );
        let no_port = Start::AgentTcp(wire::AgentTcp {
            address: "10.0.0.7".into(),
            secret: "s".into(),
        });
        assert!(SessionTarget::from_wire(Some(&no_port)).is_err());
        let unix_as_tcp = Start::AgentTcp(wire::AgentTcp {
            address: "/run/a.sock".into(),
            secret: "s".into(),
        });
        assert!(SessionTarget::from_wire(Some(&unix_as_tcp)).is_err());
        let empty = Start::DockerExec(wire::DockerExec::default());
        assert_eq!(
            SessionTarget::from_wire(Some(&empty)).unwrap_err(),
            "the placement names no container"
        );
    }
}
