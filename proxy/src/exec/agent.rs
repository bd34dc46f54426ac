//! Processes started by the container's `envgate-agent` (docs/agent.md): one
//! pooled connection per container, a spawn is one round trip on it. A
//! process whose placement names no agent goes to the fallback runtime
//! (Docker exec).

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use envgate_agent::WindowSize;
use envgate_agent::client::{ConnectOptions, ProcessControl as AgentProcessControl};
use envgate_agent::client::{ProcessExit as AgentExit, ProcessOutput};
use envgate_agent::{AgentError, AgentPool, ExitStatus, Program, PtyRequest, SpawnRequest};
use envgate_proto::ops::record_phase;
use futures::StreamExt;

use super::{
    ExecError, ExitSignal, Output, OutputStream, ProcessControl, ProcessRuntime, ProcessSpec,
    StartedProcess, TerminalSize,
};

/// Connect + handshake; the agent binds its socket within milliseconds of the
/// container starting, so this only runs out when the agent is gone.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long `exit_code` waits for the agent's EXIT, which follows the end of
/// the output at once.
const EXIT_WAIT: Duration = Duration::from_millis(200);

pub use envgate_runtime::session::AgentTarget;

pub struct AgentRuntime {
    agents: AgentPool,
    /// Docker exec, for containers without the agent; `None`: such containers are refused.
    fallback: Option<Arc<dyn ProcessRuntime>>,
}

impl AgentRuntime {
    pub fn new(fallback: Option<Arc<dyn ProcessRuntime>>) -> Self {
        Self {
            agents: AgentPool::new(ConnectOptions {
                connect_timeout: CONNECT_TIMEOUT,
                ..ConnectOptions::default()
            }),
            fallback,
        }
    }
}

fn agent_error(e: AgentError) -> ExecError {
    match e {
        AgentError::SpawnFailed { message, .. } => ExecError::Refused(message),
        other => ExecError::AgentUnreachable(other.to_string()),
    }
}

/// The agent's request for a spec. The command is run as given (the
/// environment's shell with `-c` or `-l`), as on the Docker path.
fn spawn_request(spec: &ProcessSpec) -> SpawnRequest {
    let mut request = SpawnRequest::new(Program::Argv(spec.command.clone()));
    request.user = spec.user.clone();
    request.account = spec.account.clone();
    request.cwd = spec.working_dir.clone();
    request.env = spec
        .env
        .iter()
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    request.pty = spec.tty.map(|size| PtyRequest {
        term: request
            .env
            .iter()
            .rev()
            .find(|(k, _)| k == "TERM")
            .map_or_else(|| "xterm".to_owned(), |(_, v)| v.clone()),
        size: window(size),
        modes: spec.pty_modes.clone(),
    });
    request
}

/// A client without a terminal of its own reports 0x0; the agent keeps its
/// default (80x24) then.
fn window(size: TerminalSize) -> WindowSize {
    let default = |n: u32, d: u32| if n == 0 { d } else { n };
    WindowSize {
        cols: default(size.cols, 80),
        rows: default(size.rows, 24),
        ..WindowSize::default()
    }
}

fn chunks(output: ProcessOutput, wrap: fn(Bytes) -> Output) -> OutputStream {
    Box::pin(futures::stream::unfold(output, move |mut o| async move {
        o.recv().await.map(|c| (Ok(wrap(Bytes::from(c))), o))
    }))
}

#[async_trait]
impl ProcessRuntime for AgentRuntime {
    async fn start(&self, spec: &ProcessSpec) -> Result<StartedProcess, ExecError> {
        let Some(target) = &spec.target.agent_target() else {
            return match &self.fallback {
                Some(fallback) => fallback.start(spec).await,
                None => Err(ExecError::NoDockerExec),
            };
        };
        let started = Instant::now();
        let client = self
            .agents
            .get(
                &spec.container_id,
                &target.address,
                target.secret.as_bytes(),
            )
            .await
            .map_err(agent_error)?;
        let process = client
            .spawn(spawn_request(spec))
            .await
            .map_err(agent_error)?;
        record_phase(
            "exec_start",
            started.elapsed(),
            &[("path", "agent".to_owned())],
        );
        let output = futures::stream::select(
            chunks(process.stdout, Output::Stdout),
            chunks(process.stderr, Output::Stderr),
        );
        Ok(StartedProcess {
            stdin: Box::pin(process.stdin),
            output: output.boxed(),
            control: Box::new(AgentControl {
                control: process.control,
                exit: process.exit,
            }),
        })
    }

    async fn answers(&self, container_id: &str, agent: &AgentTarget) -> bool {
        match self
            .agents
            .get(container_id, &agent.address, agent.secret.as_bytes())
            .await
        {
            Ok(_) => true,
            Err(e) => {
                tracing::info!(container = %container_id, error = %e, "the container's agent does not answer");
                false
            }
        }
    }
}

struct AgentControl {
    control: AgentProcessControl,
    exit: AgentExit,
}

impl AgentControl {
    async fn status(&self) -> Result<Option<ExitStatus>, ExecError> {
        match tokio::time::timeout(EXIT_WAIT, self.exit.wait()).await {
            Ok(Ok(status)) => Ok(Some(status)),
            Ok(Err(e)) => Err(agent_error(e)),
            Err(_) => Ok(None),
        }
    }
}

#[async_trait]
impl ProcessControl for AgentControl {
    async fn resize(&self, size: TerminalSize) -> Result<(), ExecError> {
        self.control.resize(window(size)).map_err(agent_error)
    }

    async fn exit_code(&self) -> Result<Option<i64>, ExecError> {
        Ok(self.status().await?.map(|s| i64::from(s.shell_code())))
    }

    async fn signal(&self, name: &str) -> Result<(), ExecError> {
        self.control.signal(name).map_err(agent_error)
    }

    async fn exit_signal(&self) -> Option<ExitSignal> {
        match self.exit.try_status() {
            Some(Ok(ExitStatus::Signal {
                name, core_dumped, ..
            })) => Some(ExitSignal { name, core_dumped }),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exec::SessionTarget;

    /// A proxy started without `--docker-host` has no Docker access at all: a container
    /// without the agent is refused with the reason, and nothing dials an engine.
    #[tokio::test]
    async fn without_docker_access_a_container_without_agent_is_refused() {
        let runtime = AgentRuntime::new(None);
        let spec = ProcessSpec {
            container_id: "c1".into(),
            command: vec!["/bin/sh".into()],
            tty: None,
            pty_modes: Vec::new(),
            env: Vec::new(),
            working_dir: None,
            user: None,
            account: None,
            target: SessionTarget::DockerExec {
                container_id: "c1".into(),
            },
        };
        let error = runtime.start(&spec).await.err().expect("refused");
        assert!(matches!(error, ExecError::NoDockerExec));
        assert_eq!(
            error.to_string(),
            "the container runs no envgate-agent and this proxy has no Docker access (--docker-host)"
        );
    }

    #[test]
    fn specs_become_spawn_requests() {
        let spec = ProcessSpec {
            container_id: "c1".into(),
            command: vec!["/bin/sh".into(), "-c".into(), "echo hi".into()],
            tty: Some(TerminalSize { cols: 0, rows: 0 }),
            pty_modes: Vec::new(),
            env: vec!["HOME=/home/alice".into(), "TERM=vt100".into()],
            working_dir: Some("/home/alice".into()),
            user: None,
            account: None,
            target: SessionTarget::DockerExec {
                container_id: "c1".into(),
            },
        };
        let request = spawn_request(&spec);
        assert_eq!(
            request.program,
            Program::Argv(vec!["/bin/sh".into(), "-c".into(), "echo hi".into()])
        );
        assert_eq!(
            request.env,
            [
                ("HOME".to_owned(), "/home/alice".to_owned()),
                ("TERM".to_owned(), "vt100".to_owned())
            ]
        );
        assert_eq!(request.cwd.as_deref(), Some("/home/alice"));
        let pty = request.pty.unwrap();
        assert_eq!(pty.term, "vt100");
        assert_eq!((pty.size.cols, pty.size.rows), (80, 24));
    }
}
