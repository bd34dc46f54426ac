//! The real `envgate-controlplane` binary as tests start it: its files in a temporary
//! directory, a command line to build on, and a clean SIGTERM stop.

use std::net::TcpListener;
use std::process::{Output, Stdio};
use std::time::Duration;

use envgate_controlplane::pki::{self, Authority, Profile};
use envgate_controlplane::testkit::{Etcd, TestPki};
use tokio::process::{Child, Command};

pub const BIN: &str = env!("CARGO_BIN_EXE_envgate-controlplane");

/// Files the binary reads (token key, admin tokens, its TLS files, catalogues), in a
/// temporary directory.
pub struct Files {
    dir: tempfile::TempDir,
    pub pki: TestPki,
    /// `--etcd-ca`, `--etcd-cert`, `--etcd-key`.
    etcd: (String, String, String),
}

impl Files {
    /// The token key is `super::SEED`, the admin token `super::ADMIN_TOKEN`; the etcd
    /// certificates are of an etcd CA of its own (for tests without a real etcd).
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let pki_dir = dir.path().join("etcd-pki");
        let ca = Authority::ensure(&pki_dir, "etcd").unwrap();
        let profile = Profile::Client {
            common_name: "controlplane".into(),
        };
        ca.issue(&pki_dir, "controlplane", &profile).unwrap();
        let (cert, key) = pki::paths(&pki_dir, "controlplane");
        let etcd = (
            ca.cert_path().display().to_string(),
            cert.display().to_string(),
            key.display().to_string(),
        );
        Self::with_etcd_files(dir, etcd)
    }

    /// As `new`, with the client certificate of the real `etcd`.
    pub fn for_etcd(etcd: &Etcd) -> Self {
        let (ca, cert, key) = etcd.client_files();
        let files = (
            ca.display().to_string(),
            cert.display().to_string(),
            key.display().to_string(),
        );
        Self::with_etcd_files(tempfile::tempdir().unwrap(), files)
    }

    fn with_etcd_files(dir: tempfile::TempDir, etcd: (String, String, String)) -> Self {
        std::fs::write(dir.path().join("token.key"), format!("{}\n", super::SEED)).unwrap();
        std::fs::write(dir.path().join("admin-tokens"), super::admin_tokens_file()).unwrap();
        Self {
            dir,
            pki: TestPki::new().unwrap(),
            etcd,
        }
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

/// The binary with nothing but `files`' token key, admin tokens and TLS files from the
/// environment, against `etcd`, serving gRPC on 127.0.0.1:`grpc` and ops on
/// 127.0.0.1:`ops`; output piped, killed when dropped. Tests add the instance and what else
/// they exercise.
pub fn command(files: &Files, etcd: &str, grpc: u16, ops: u16) -> Command {
    let (cert, key, ca) = files.pki.server_files();
    let mut cmd = Command::new(BIN);
    cmd.env_clear()
        .env("ENVGATE_TOKEN_KEY", files.path("token.key"))
        .env("ENVGATE_ADMIN_TOKENS", files.path("admin-tokens"))
        .env("ENVGATE_TLS_CERT", cert)
        .env("ENVGATE_TLS_KEY", key)
        .env("ENVGATE_TLS_CLIENT_CA", ca)
        .env("ENVGATE_ETCD_CA", &files.etcd.0)
        .env("ENVGATE_ETCD_CERT", &files.etcd.1)
        .env("ENVGATE_ETCD_KEY", &files.etcd.2)
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
