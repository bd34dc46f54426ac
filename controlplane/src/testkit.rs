//! Test helpers shared with other crates through the `testkit` feature.
//!
//! Tests that need etcd start their own: a real `/usr/bin/etcd` in a temporary data directory
//! on free loopback ports, so tests never depend on a shared daemon or on each other's state.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long `Etcd::start` waits for the new etcd to answer a read.
const START_TIMEOUT: Duration = Duration::from_secs(15);
/// Bound on each connect/get attempt while waiting.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// Free ports are picked by binding port 0 and releasing it, which another process may grab
/// before etcd binds it; a start that loses that race is retried with fresh ports.
const START_ATTEMPTS: usize = 3;

#[derive(Debug, thiserror::Error)]
pub enum EtcdStartError {
    #[error("etcd binary {0} not found")]
    BinaryMissing(PathBuf),
    #[error("I/O error while starting etcd: {0}")]
    Io(#[from] std::io::Error),
    #[error("etcd did not start: {0}")]
    NotReady(String),
}

/// A private etcd server for one test. Killed (and its data directory removed) on drop.
pub struct Etcd {
    child: Option<Child>,
    endpoint: String,
    // Held so the data directory lives exactly as long as the server.
    _data_dir: tempfile::TempDir,
}

impl Etcd {
    /// Starts `/usr/bin/etcd` and returns once a client can read from it.
    pub async fn start() -> Result<Etcd, EtcdStartError> {
        Self::start_with_binary(Path::new("/usr/bin/etcd")).await
    }

    pub async fn start_with_binary(binary: &Path) -> Result<Etcd, EtcdStartError> {
        if !binary.exists() {
            return Err(EtcdStartError::BinaryMissing(binary.to_path_buf()));
        }
        let mut last_error = String::new();
        for _ in 0..START_ATTEMPTS {
            match Self::start_once(binary).await {
                Ok(etcd) => return Ok(etcd),
                Err(EtcdStartError::NotReady(reason)) => last_error = reason,
                Err(other) => return Err(other),
            }
        }
        Err(EtcdStartError::NotReady(last_error))
    }

    async fn start_once(binary: &Path) -> Result<Etcd, EtcdStartError> {
        let data_dir = tempfile::Builder::new().prefix("envgate-etcd-").tempdir()?;
        let client_port = free_port()?;
        let peer_port = free_port()?;
        let client_url = format!("http://127.0.0.1:{client_port}");
        let peer_url = format!("http://127.0.0.1:{peer_port}");
        let log_path = data_dir.path().join("etcd.log");
        let log = std::fs::File::create(&log_path)?;
        let child = Command::new(binary)
            .arg("--name")
            .arg("default")
            .arg("--data-dir")
            .arg(data_dir.path().join("data"))
            .arg("--listen-client-urls")
            .arg(&client_url)
            .arg("--advertise-client-urls")
            .arg(&client_url)
            .arg("--listen-peer-urls")
            .arg(&peer_url)
            .arg("--initial-advertise-peer-urls")
            .arg(&peer_url)
            .arg("--initial-cluster")
            .arg(format!("default={peer_url}"))
            .arg("--log-level")
            .arg("error")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        let mut etcd = Etcd {
            child: Some(child),
            endpoint: client_url,
            _data_dir: data_dir,
        };
        match etcd.wait_ready().await {
            Ok(()) => Ok(etcd),
            Err(reason) => {
                etcd.kill();
                let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                let tail: String = log.lines().rev().take(5).collect::<Vec<_>>().join(" | ");
                Err(EtcdStartError::NotReady(format!("{reason}; log: {tail}")))
            }
        }
    }

    async fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + START_TIMEOUT;
        let mut last_error = String::from("no attempt made");
        while Instant::now() < deadline {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                return Err(format!("etcd exited early with {status}"));
            }
            match tokio::time::timeout(PROBE_TIMEOUT, probe(&self.endpoint)).await {
                Ok(Ok(())) => return Ok(()),
                Ok(Err(e)) => last_error = e.to_string(),
                Err(_) => last_error = "probe timed out".to_string(),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Err(format!(
            "no answer within {}s: {last_error}",
            START_TIMEOUT.as_secs()
        ))
    }

    /// The client URL, e.g. `http://127.0.0.1:41234`.
    pub fn endpoint(&self) -> String {
        self.endpoint.clone()
    }

    /// Stops the server now (SIGKILL) and reaps it; a later drop does nothing more.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
    }
}

async fn probe(endpoint: &str) -> Result<(), etcd_client::Error> {
    let mut client = etcd_client::Client::connect([endpoint], None).await?;
    client.get("envgate-testkit-probe", None).await?;
    Ok(())
}

fn free_port() -> std::io::Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn etcd_answers_and_stops_on_kill() {
        let mut etcd = Etcd::start().await.expect("etcd starts");
        let mut client = etcd_client::Client::connect([etcd.endpoint()], None)
            .await
            .expect("connect");
        client.put("k", "v", None).await.expect("put");
        let got = client.get("k", None).await.expect("get");
        assert_eq!(got.kvs()[0].value(), b"v");
        etcd.kill();
        let after = tokio::time::timeout(Duration::from_secs(5), async {
            let mut c = etcd_client::Client::connect([etcd.endpoint()], None).await?;
            c.get("k", None).await
        })
        .await;
        assert!(!matches!(after, Ok(Ok(_))), "etcd still answers after kill");
    }
}
