//! The real `envgate-controlplane` binary as tests start it: its files in a temporary
//! directory, a command line to build on, and a clean SIGTERM stop.

use std::net::TcpListener;
use std::process::{Output, Stdio};
use std::time::Duration;

use tokio::process::{Child, Command};

pub const BIN: &str = env!("CARGO_BIN_EXE_envgate-controlplane");

/// Files the binary reads (token key, admin token, catalogues), in a temporary directory.
pub struct Files {
    dir: tempfile::TempDir,
}

impl Files {
    /// The token key is `super::SEED`, the admin token `super::ADMIN_TOKEN`.
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("token.key"), format!("{}\n", super::SEED)).unwrap();
        std::fs::write(
            dir.path().join("admin.token"),
            format!("{}\n", super::ADMIN_TOKEN),
        )
        .unwrap();
        Self { dir }
    }

    pub fn path(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }

    /// Writes `text` to `name`; its path.
    pub fn write(&self, name: &str, text: &str) -> String {
        std::fs::write(self.dir.path().join(name), text).unwrap();
        self.path(name)
    }
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The binary with nothing but `files`' token key and admin token from the environment,
/// against `etcd`, serving gRPC on 127.0.0.1:`grpc` and ops on 127.0.0.1:`ops`; output
/// piped, killed when dropped. Tests add the instance and what else they exercise.
pub fn command(files: &Files, etcd: &str, grpc: u16, ops: u16) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.env_clear()
        .env("ENVGATE_TOKEN_KEY", files.path("token.key"))
        .env("ENVGATE_ADMIN_TOKEN_FILE", files.path("admin.token"))
        .args(["--etcd", etcd])
        .args([
            "--listen",
            &format!("127.0.0.1:{grpc}"),
            "--ops-listen",
            &format!("127.0.0.1:{ops}"),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    cmd
}

/// Its output once it exits; panics if that takes longer than `limit`.
pub async fn finish(child: Child, limit: Duration) -> Output {
    tokio::time::timeout(limit, child.wait_with_output())
        .await
        .expect("exits in time")
        .unwrap()
}

/// SIGTERM, then a clean exit (status 0) within 15 s.
pub async fn terminate(child: Child) {
    let pid = child.id().expect("running").to_string();
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(killed.success());
    let out = finish(child, Duration::from_secs(15)).await;
    assert!(
        out.status.success(),
        "{:?}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}
