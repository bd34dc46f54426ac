//! The real `envgate-controlplane` binary: clear exits on bad config or a dead etcd, and a
//! clean start (ready, serving) and SIGTERM shutdown against a real etcd and Docker.

use std::net::TcpListener;
use std::process::{Output, Stdio};
use std::time::Duration;

use envgate_controlplane::testkit::Etcd;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};

const BIN: &str = env!("CARGO_BIN_EXE_envgate-controlplane");
const SEED: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";

struct Files {
    dir: tempfile::TempDir,
}

impl Files {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("token.key"), format!("{SEED}\n")).unwrap();
        std::fs::write(dir.path().join("admin.token"), "s3cret-admin\n").unwrap();
        Self { dir }
    }
    fn path(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn command(files: &Files, etcd: &str, grpc: u16, ops: u16) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.env_clear()
        .env("ENVGATE_TOKEN_KEY", files.path("token.key"))
        .env("ENVGATE_ADMIN_TOKEN_FILE", files.path("admin.token"))
        .env("ENVGATE_INSTANCE", "bintest")
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

async fn finish(child: Child, limit: Duration) -> Output {
    tokio::time::timeout(limit, child.wait_with_output())
        .await
        .expect("exits in time")
        .unwrap()
}

async fn http_get(port: u16, path: &str) -> Option<String> {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut response = String::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_string(&mut response))
        .await
        .ok()?
        .ok()?;
    Some(response)
}

#[tokio::test]
async fn bad_config_exits_2_naming_the_flag() {
    let files = Files::new();
    let mut cmd = command(&files, "http://127.0.0.1:1", free_port(), free_port());
    cmd.env("ENVGATE_TOKEN_KEY", files.path("missing.key"));
    let out = finish(cmd.spawn().unwrap(), Duration::from_secs(10)).await;
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--token-key: cannot read"), "{stderr}");

    let mut cmd = command(&files, "http://127.0.0.1:1", free_port(), free_port());
    cmd.args(["--instance", "Not Valid"]);
    let out = finish(cmd.spawn().unwrap(), Duration::from_secs(10)).await;
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--instance: the instance name may contain only"),
        "{stderr}"
    );
}

#[tokio::test]
async fn a_dead_etcd_is_a_clear_startup_error() {
    let files = Files::new();
    let dead = format!("http://127.0.0.1:{}", free_port());
    let mut cmd = command(&files, &dead, free_port(), free_port());
    let out = finish(cmd.spawn().unwrap(), Duration::from_secs(30)).await;
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("etcd is unavailable") && stderr.contains(&dead),
        "{stderr}"
    );
}

#[tokio::test]
async fn starts_ready_and_stops_cleanly_on_sigterm() {
    let etcd = Etcd::start().await.unwrap();
    let files = Files::new();
    let (grpc, ops) = (free_port(), free_port());
    let child = command(&files, &etcd.endpoint(), grpc, ops)
        .spawn()
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        if http_get(ops, "/readyz")
            .await
            .is_some_and(|r| r.starts_with("HTTP/1.1 200"))
        {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "never became ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(http_get(ops, "/healthz").await.unwrap().contains("ok"));
    assert!(
        tokio::net::TcpStream::connect(("127.0.0.1", grpc))
            .await
            .is_ok(),
        "gRPC port open"
    );

    let pid = child.id().unwrap().to_string();
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
