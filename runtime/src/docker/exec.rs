//! Processes started with Docker exec: create, start attached, size the
//! terminal, read the exit code when the output ends.
//!
//! Without a terminal the attach stream multiplexes stdout and stderr in
//! frames, which bollard decodes. With a terminal it is one raw byte stream,
//! and bollard's decoder takes any read that begins with a byte 0x00–0x02
//! for a frame header, losing output (`printf '\001x'` on a terminal loses
//! bytes). So terminal execs are started here, over the engine's socket,
//! with the stream left raw.

use std::path::PathBuf;
use std::pin::Pin;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bollard::Docker;
use bollard::container::LogOutput;
use bollard::exec::{CreateExecOptions, ResizeExecOptions, StartExecOptions, StartExecResults};
use bytes::Bytes;
use envgate_proto::ops::record_phase;
use futures::StreamExt;
use http_body_util::{BodyExt, Full};
use hyper::header::{CONNECTION, CONTENT_TYPE, HOST, UPGRADE};
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::net::{TcpStream, UnixStream};

use crate::session::{
    ExecError, Output, OutputStream, ProcessControl, ProcessRuntime, ProcessSpec, SessionTarget,
    StartedProcess, TerminalSize,
};

impl From<bollard::errors::Error> for ExecError {
    fn from(e: bollard::errors::Error) -> Self {
        ExecError::Runtime(e.to_string())
    }
}

/// Bound on each call to the engine (bollard's request timeout) and on
/// connecting at start.
const DOCKER_TIMEOUT: Duration = Duration::from_secs(10);
/// Output chunks read from the attach stream at once.
const OUTPUT_CAPACITY: usize = 32 * 1024;

/// Where the Docker engine listens, for the raw terminal attach.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DockerEndpoint {
    Unix(PathBuf),
    /// `host:port`
    Tcp(String),
}

impl DockerEndpoint {
    /// Parses `unix:///path`, `/path`, `tcp://host:port` or `http://host:port`.
    pub fn parse(url: &str) -> Result<Self, String> {
        if let Some(path) = url.strip_prefix("unix://") {
            return Ok(Self::Unix(PathBuf::from(path)));
        }
        if url.starts_with('/') {
            return Ok(Self::Unix(PathBuf::from(url)));
        }
        for scheme in ["tcp://", "http://"] {
            if let Some(rest) = url.strip_prefix(scheme) {
                return Ok(Self::Tcp(rest.trim_end_matches('/').to_owned()));
            }
        }
        Err(format!(
            "unsupported docker host {url:?} (use unix:///path, tcp://host:port or http://host:port)"
        ))
    }
}

/// Starts processes with Docker exec (the proxy's `--docker-host`).
pub struct DockerExec {
    docker: Docker,
    endpoint: DockerEndpoint,
}

impl DockerExec {
    /// Connects to the engine at `host` and agrees on an API version it
    /// speaks (an engine may be older than bollard's default version).
    pub async fn connect(host: &str) -> Result<Self, ExecError> {
        let endpoint = DockerEndpoint::parse(host).map_err(ExecError::Runtime)?;
        let timeout = DOCKER_TIMEOUT.as_secs();
        let docker = match &endpoint {
            DockerEndpoint::Unix(path) => Docker::connect_with_unix(
                &path.to_string_lossy(),
                timeout,
                bollard::API_DEFAULT_VERSION,
            )?,
            DockerEndpoint::Tcp(addr) => Docker::connect_with_http(
                &format!("http://{addr}"),
                timeout,
                bollard::API_DEFAULT_VERSION,
            )?,
        };
        let docker = tokio::time::timeout(DOCKER_TIMEOUT, docker.negotiate_version())
            .await
            .map_err(|_| ExecError::Runtime(format!("no answer within {DOCKER_TIMEOUT:?}")))??;
        Ok(Self { docker, endpoint })
    }

    /// `POST /exec/{id}/start` upgraded to a raw two-way stream.
    async fn start_raw(
        &self,
        exec_id: &str,
    ) -> Result<
        (
            Pin<Box<dyn AsyncRead + Send>>,
            Pin<Box<dyn AsyncWrite + Send>>,
        ),
        ExecError,
    > {
        let version = self.docker.client_version();
        let request = Request::post(format!(
            "/v{}.{}/exec/{exec_id}/start",
            version.major_version, version.minor_version
        ))
        .header(HOST, "docker")
        .header(CONTENT_TYPE, "application/json")
        .header(CONNECTION, "Upgrade")
        .header(UPGRADE, "tcp")
        .body(Full::new(Bytes::from_static(
            br#"{"Detach":false,"Tty":true}"#,
        )))
        .map_err(|e| ExecError::Runtime(e.to_string()))?;
        let response = match &self.endpoint {
            DockerEndpoint::Unix(path) => {
                send_upgrade(UnixStream::connect(path).await?, request).await?
            }
            DockerEndpoint::Tcp(addr) => {
                send_upgrade(TcpStream::connect(addr).await?, request).await?
            }
        };
        let upgraded = hyper::upgrade::on(response)
            .await
            .map_err(|e| ExecError::Runtime(e.to_string()))?;
        let (read, write) = tokio::io::split(TokioIo::new(upgraded));
        Ok((Box::pin(read), Box::pin(write)))
    }
}

async fn send_upgrade<S>(
    stream: S,
    request: Request<Full<Bytes>>,
) -> Result<hyper::Response<hyper::body::Incoming>, ExecError>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let runtime = |e: hyper::Error| ExecError::Runtime(e.to_string());
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(runtime)?;
    tokio::spawn(async move {
        if let Err(e) = connection.with_upgrades().await {
            tracing::debug!(error = %e, "docker attach connection ended");
        }
    });
    let response = sender.send_request(request).await.map_err(runtime)?;
    if response.status() != StatusCode::SWITCHING_PROTOCOLS {
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        return Err(ExecError::Runtime(format!(
            "docker refused to attach ({status}): {}",
            String::from_utf8_lossy(&body).trim()
        )));
    }
    Ok(response)
}

/// A raw terminal stream as output chunks.
fn raw_output(read: Pin<Box<dyn AsyncRead + Send>>) -> OutputStream {
    let chunks = futures::stream::unfold(read, |mut read| async move {
        let mut buf = vec![0u8; OUTPUT_CAPACITY];
        match read.read(&mut buf).await {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((Ok(Output::Stdout(Bytes::from(buf))), read))
            }
            // The stream is over either way; say why once.
            Err(e) => Some((Err(ExecError::from(e)), read)),
        }
    });
    // Stop after the first error.
    let mut failed = false;
    Box::pin(chunks.take_while(move |item| {
        let go = !failed;
        failed |= item.is_err();
        futures::future::ready(go)
    }))
}

#[async_trait]
impl ProcessRuntime for DockerExec {
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
            // Docker exec has no passwd entry to add: the account's bare uid:gid.
            user: spec
                .account
                .as_ref()
                .map(|a| format!("{}:{}", a.uid, a.gid))
                .or_else(|| spec.user.clone()),
            ..Default::default()
        };
        let container = match &spec.target {
            SessionTarget::DockerExec { container_id } => container_id,
            // Docker exec works in a container whether or not its agent runs.
            SessionTarget::AgentUnix { .. } | SessionTarget::AgentTcp { .. } => &spec.container_id,
            SessionTarget::KubernetesExec { .. } => {
                return Err(ExecError::Unsupported("Kubernetes exec"));
            }
        };
        let exec = self.docker.create_exec(container, options).await?;
        let (stdin, output): (_, OutputStream) = if spec.tty.is_some() {
            let (read, write) = self.start_raw(&exec.id).await?;
            (write, raw_output(read))
        } else {
            let start = StartExecOptions {
                detach: false,
                tty: false,
                output_capacity: Some(OUTPUT_CAPACITY),
            };
            let StartExecResults::Attached { output, input } =
                self.docker.start_exec(&exec.id, Some(start)).await?
            else {
                return Err(ExecError::Runtime(
                    "docker started the exec detached".into(),
                ));
            };
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
            (input, Box::pin(output))
        };
        let control = ExecControl {
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
        Ok(StartedProcess {
            stdin,
            output,
            control: Box::new(control),
        })
    }
}

struct ExecControl {
    docker: Docker,
    exec_id: String,
}

#[async_trait]
impl ProcessControl for ExecControl {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_hosts_parse() {
        assert_eq!(
            DockerEndpoint::parse("unix:///var/run/docker.sock"),
            Ok(DockerEndpoint::Unix("/var/run/docker.sock".into()))
        );
        assert_eq!(
            DockerEndpoint::parse("/run/d.sock"),
            Ok(DockerEndpoint::Unix("/run/d.sock".into()))
        );
        assert_eq!(
            DockerEndpoint::parse("tcp://127.0.0.1:2375"),
            Ok(DockerEndpoint::Tcp("127.0.0.1:2375".into()))
        );
        assert_eq!(
            DockerEndpoint::parse("http://h:1/"),
            Ok(DockerEndpoint::Tcp("h:1".into()))
        );
        assert!(DockerEndpoint::parse("ssh://x").is_err());
    }

    #[tokio::test]
    async fn raw_terminal_output_keeps_every_byte() {
        let bytes: &[u8] = b"\x01\x02\x00hello\r\n\x1b[0m";
        let output = raw_output(Box::pin(bytes));
        let chunks: Vec<_> = output.collect().await;
        let mut all = Vec::new();
        for chunk in chunks {
            match chunk.unwrap() {
                Output::Stdout(data) => all.extend_from_slice(&data),
                Output::Stderr(_) => panic!("a terminal has one stream"),
            }
        }
        assert_eq!(all, bytes);
    }
}
