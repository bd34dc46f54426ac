//! Health probes, each bounded: HTTP on an ops port, a TCP connect, an etcd read over TLS,
//! a question to HAProxy's stats socket.

use std::path::Path;
use std::time::Duration;

use envgate_proto::tls::TlsFiles;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Bound on one probe.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// `GET path` over HTTP/1.0 within 2 s: the status and body.
pub async fn http_get(addr: &str, path: &str) -> Option<(u16, String)> {
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
        stream
            .write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
            .await
            .ok()?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await.ok()?;
        let text = String::from_utf8_lossy(&response).into_owned();
        let status = text.split_whitespace().nth(1)?.parse().ok()?;
        let body = text
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        Some((status, body))
    };
    tokio::time::timeout(PROBE_TIMEOUT, exchange)
        .await
        .ok()
        .flatten()
}

/// `Ok` when `GET path` on `addr` answers 200.
pub async fn http_ok(addr: &str, path: &str) -> Result<(), String> {
    match http_get(addr, path).await {
        Some((200, _)) => Ok(()),
        other => Err(format!("GET {path} on {addr}: {other:?}")),
    }
}

/// `Ok` when something accepts a TCP connection on `addr`.
pub async fn tcp_open(addr: &str) -> Result<(), String> {
    match tokio::time::timeout(PROBE_TIMEOUT, tokio::net::TcpStream::connect(addr)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(format!("connect {addr}: {e}")),
        Err(_) => Err(format!("connect {addr}: timed out")),
    }
}

/// An etcd client over TLS with a client certificate, to `endpoints`.
pub async fn etcd_client(
    endpoints: &[String],
    tls: &TlsFiles,
) -> Result<etcd_client::Client, etcd_client::Error> {
    let options = etcd_client::ConnectOptions::new()
        .with_connect_timeout(PROBE_TIMEOUT)
        .with_timeout(Duration::from_secs(5))
        .with_tls(
            etcd_client::TlsOptions::new()
                .ca_certificate(etcd_client::Certificate::from_pem(&tls.ca))
                .identity(etcd_client::Identity::from_pem(&tls.cert, &tls.key)),
        );
    etcd_client::Client::connect(endpoints, Some(options)).await
}

/// `Ok` when the etcd member at `endpoint` answers a (linearizable, so quorum-backed) read.
pub async fn etcd_reads(endpoint: &str, tls: &TlsFiles) -> Result<(), String> {
    let read = async {
        let mut client = etcd_client(&[endpoint.to_owned()], tls).await?;
        client.get("envgate-fleet-probe", None).await
    };
    match tokio::time::timeout(PROBE_TIMEOUT * 3, read).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(format!("etcd {endpoint}: {e}")),
        Err(_) => Err(format!("etcd {endpoint}: timed out")),
    }
}

/// HAProxy's answer to `command` on its stats socket, within 2 s.
pub async fn haproxy_ask(socket: &Path, command: &str) -> Option<String> {
    let ask = async {
        let mut stream = tokio::net::UnixStream::connect(socket).await.ok()?;
        stream
            .write_all(format!("{command}\n").as_bytes())
            .await
            .ok()?;
        let mut answer = String::new();
        stream.read_to_string(&mut answer).await.ok()?;
        Some(answer)
    };
    tokio::time::timeout(PROBE_TIMEOUT, ask)
        .await
        .ok()
        .flatten()
}
