//! Starts the real `envgate-agent` binary in a temporary directory.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use envgate_agent::auth;
use envgate_agent::protocol::{FrameReader, Message};
use envgate_agent::{AgentAddress, AgentClient, ExitStatus, SpawnRequest};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

pub const SECRET: &[u8] = b"test-secret-0123456789abcdef0123";

pub struct Agent {
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub child: Child,
    /// `host:port` of `--listen-tcp`, for `start_tcp`.
    pub tcp: Option<String>,
}

impl Agent {
    pub fn start() -> Agent {
        Self::start_with(&[])
    }

    /// `extra` are more flags for the agent.
    pub fn start_with(extra: &[&str]) -> Agent {
        Self::spawn(extra, false)
    }

    /// Also listens on TCP (`tcp_address`), and writes its log to `log()` instead of the
    /// test's stderr, so a test can check what the agent reported.
    pub fn start_tcp() -> Agent {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let address = format!("127.0.0.1:{port}");
        let mut agent = Self::spawn(&["--listen-tcp", &address], true);
        agent.tcp = Some(address);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "the agent did not listen on TCP within 10 s"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        agent
    }

    fn spawn(extra: &[&str], logged: bool) -> Agent {
        let dir = tempfile::tempdir().expect("temp dir");
        let socket = dir.path().join("agent.sock");
        let secret_file = dir.path().join("secret");
        std::fs::write(&secret_file, [SECRET, b"\n"].concat()).unwrap();
        let stderr = if logged {
            Stdio::from(std::fs::File::create(dir.path().join("agent.log")).unwrap())
        } else {
            Stdio::inherit()
        };
        let child = Command::new(env!("CARGO_BIN_EXE_envgate-agent"))
            .arg("--socket")
            .arg(&socket)
            .arg("--secret-file")
            .arg(&secret_file)
            .args(extra)
            .env("ENVGATE_AGENT_LOG", "debug")
            .env("ENVGATE_AGENT_SECRET", "must-not-leak-into-sessions")
            .env("FROM_IMAGE", "image-value")
            .env("TERM", "agent-term")
            .stdin(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("start envgate-agent");
        let agent = Agent {
            dir,
            socket,
            child,
            tcp: None,
        };
        agent.wait_for_socket();
        agent
    }

    fn wait_for_socket(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.socket.exists() {
            assert!(
                Instant::now() < deadline,
                "the agent did not create its socket within 10 s"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// What the agent logged (only for `start_tcp`).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.path("agent.log")).unwrap_or_default()
    }

    /// Waits (bounded) until the agent's log contains `needle`; returns the log. Async, so
    /// the test's own tasks (a relay, the client) keep running meanwhile.
    pub async fn wait_for_log(&self, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let log = self.log();
            if log.contains(needle) {
                return log;
            }
            assert!(
                Instant::now() < deadline,
                "the agent did not log {needle:?} within 10 s; its log:\n{log}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn address(&self) -> AgentAddress {
        AgentAddress::Unix(self.socket.clone())
    }

    pub async fn client(&self) -> AgentClient {
        AgentClient::connect(&self.address(), SECRET)
            .await
            .expect("connect to the agent")
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// SIGTERM, then waits for the exit (bounded).
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "the agent did not exit within 15 s of SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

pub fn exists(p: &Path) -> bool {
    p.exists()
}

/// Bounds every await in the tests.
pub async fn within<T>(secs: u64, what: &str, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(secs), f)
        .await
        .unwrap_or_else(|_| panic!("timed out: {what}"))
}

/// A raw connection over `rd`/`wr` that passed the agent's handshake at protocol `version`,
/// for frames a buggy or hostile proxy that holds the secret could send.
pub async fn raw_handshake<R, W>(rd: R, mut wr: W, version: u16) -> (FrameReader<R>, W)
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut reader = FrameReader::new(rd);
    let Some((0, Message::Hello { nonce, .. })) = within(5, "hello", reader.next()).await.unwrap()
    else {
        panic!("no hello")
    };
    let client_nonce = auth::fresh_nonce();
    let mac = auth::client_proof(SECRET, version, &nonce, &client_nonce);
    let mut buf = Vec::new();
    Message::Auth {
        version,
        nonce: client_nonce,
        mac,
    }
    .encode(0, &mut buf);
    wr.write_all(&buf).await.unwrap();
    assert!(matches!(
        within(5, "auth ok", reader.next()).await.unwrap(),
        Some((0, Message::AuthOk { .. }))
    ));
    (reader, wr)
}

/// Runs `req` to completion with stdin closed; returns (stdout, stderr, status).
pub async fn run(client: &AgentClient, req: SpawnRequest) -> (String, String, ExitStatus) {
    within(20, "process to finish", async {
        let mut p = client.spawn(req).await.expect("spawn");
        p.stdin.close().unwrap();
        let (out, err) = tokio::join!(p.stdout.read_to_vec(), p.stderr.read_to_vec());
        let status = p.wait().await.expect("exit status");
        (
            String::from_utf8(out).unwrap(),
            String::from_utf8(err).unwrap(),
            status,
        )
    })
    .await
}
