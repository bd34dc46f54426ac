//! Processes started with Docker exec (bollard): create, start attached,
//! size the terminal, read the exit code when the output ends.

use std::time::Instant;

use async_trait::async_trait;
use bollard::Docker;
use bollard::container::LogOutput;
use bollard::exec::{CreateExecOptions, ResizeExecOptions, StartExecOptions, StartExecResults};
use envgate_proto::ops::record_phase;
use futures::StreamExt;

use super::{
    ExecError, Output, ProcessControl, ProcessRuntime, ProcessSpec, StartedProcess, TerminalSize,
};

/// Output chunks read from the attach stream at once.
const OUTPUT_CAPACITY: usize = 32 * 1024;

pub struct DockerRuntime {
    docker: Docker,
}

impl DockerRuntime {
    pub fn new(docker: Docker) -> Self {
        Self { docker }
    }
}

#[async_trait]
impl ProcessRuntime for DockerRuntime {
    async fn start(&self, spec: &ProcessSpec) -> Result<StartedProcess, ExecError> {
        let started = Instant::now();
        let options = CreateExecOptions {
            attach_stdin: Some(true),
            attach_stdout: Some(true),
            attach_stderr: Some(true),
            tty: Some(spec.tty.is_some()),
            env: Some(spec.env.clone()),
            cmd: Some(spec.command.clone()),
            working_dir: spec.working_dir.clone(),
            user: spec.user.clone(),
            ..Default::default()
        };
        let exec = self.docker.create_exec(&spec.container_id, options).await?;
        let start = StartExecOptions {
            detach: false,
            tty: spec.tty.is_some(),
            output_capacity: Some(OUTPUT_CAPACITY),
        };
        let StartExecResults::Attached { output, input } =
            self.docker.start_exec(&exec.id, Some(start)).await?
        else {
            return Err(ExecError::Runtime(
                "docker started the exec detached".into(),
            ));
        };
        let control = DockerExec {
            docker: self.docker.clone(),
            exec_id: exec.id,
        };
        // A client without a terminal of its own reports 0x0; keep Docker's default then.
        if let Some(size) = spec.tty.filter(|s| s.cols > 0 && s.rows > 0) {
            control.resize(size).await?;
        }
        record_phase(
            "exec_start",
            started.elapsed(),
            &[("path", "runtime_exec".to_owned())],
        );
        let output = output.filter_map(|item| async move {
            match item {
                Ok(LogOutput::StdOut { message } | LogOutput::Console { message }) => {
                    Some(Ok(Output::Stdout(message)))
                }
                Ok(LogOutput::StdErr { message }) => Some(Ok(Output::Stderr(message))),
                Ok(LogOutput::StdIn { .. }) => None,
                Err(e) => Some(Err(ExecError::from(e))),
            }
        });
        Ok(StartedProcess {
            stdin: input,
            output: Box::pin(output),
            control: Box::new(control),
        })
    }
}

struct DockerExec {
    docker: Docker,
    exec_id: String,
}

#[async_trait]
impl ProcessControl for DockerExec {
    async fn resize(&self, size: TerminalSize) -> Result<(), ExecError> {
        let clamp = |n: u32| u16::try_from(n.max(1)).unwrap_or(u16::MAX);
        let options = ResizeExecOptions {
            width: clamp(size.cols),
            height: clamp(size.rows),
        };
        Ok(self.docker.resize_exec(&self.exec_id, options).await?)
    }

    async fn exit_code(&self) -> Result<Option<i64>, ExecError> {
        let inspect = self.docker.inspect_exec(&self.exec_id).await?;
        if inspect.running == Some(true) {
            return Ok(None);
        }
        Ok(inspect.exit_code)
    }
}
