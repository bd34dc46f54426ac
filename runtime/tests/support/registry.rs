//! A minimal Docker Registry (HTTP API v2) on 127.0.0.1, for tests that pull.
//!
//! Docker treats registries on 127.0.0.0/8 as insecure, so plain HTTP on a free loopback port
//! is enough (the engine tries TLS first; that handshake is read as a bad request and the
//! connection closed, and the engine falls back to HTTP). The one image served is made from the
//! locally present `envgate/busybox:latest` (`docker save`) plus one small layer holding
//! `/envgate-pulled` with a marker text, so its id is new and the engine really downloads it.
//! Layers are gzipped and every digest computed here, as a real registry serves them.
//!
//! Shared by `runtime/tests/docker_pull.rs` and the proxy's e2e tests
//! (`#[path = ...] mod registry;`); it needs only tokio, serde_json, tempfile and the
//! `docker`, `tar`, `gzip` and `sha256sum` commands.

#![allow(dead_code)]

use std::collections::HashMap;
use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const MANIFEST_TYPE: &str = "application/vnd.docker.distribution.manifest.v2+json";
const CONFIG_TYPE: &str = "application/vnd.docker.container.image.v1+json";
const LAYER_TYPE: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
const BASE_IMAGE: &str = "envgate/busybox:latest";

/// What the registry serves and how.
pub struct Options {
    /// e.g. `envgate-test/pulled`.
    pub repository: String,
    pub tag: String,
    /// Held before answering each layer blob, so a pull lasts long enough for concurrent
    /// opens to meet it.
    pub layer_delay: Duration,
}

#[derive(Default)]
struct Counts {
    manifests: AtomicUsize,
}

struct Content {
    repository: String,
    tag: String,
    manifest: Vec<u8>,
    manifest_digest: String,
    /// digest → (bytes, is a layer)
    blobs: HashMap<String, (Vec<u8>, bool)>,
    layer_delay: Duration,
}

/// A running registry; stops when dropped.
pub struct Registry {
    pub addr: SocketAddr,
    /// `127.0.0.1:<port>/<repository>:<tag>`, as an environment's image.
    pub image: String,
    /// The text of `/envgate-pulled` in the image.
    pub marker: String,
    counts: Arc<Counts>,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl Registry {
    pub async fn start(options: Options) -> Registry {
        let marker = format!("pulled {}:{}", options.repository, options.tag);
        let content = tokio::task::spawn_blocking({
            let marker = marker.clone();
            move || build(options, &marker)
        })
        .await
        .expect("building the test image")
        .unwrap_or_else(|e| panic!("building the test image: {e}"));
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let image = format!("{addr}/{}:{}", content.repository, content.tag);
        let counts = Arc::new(Counts::default());
        let content = Arc::new(content);
        let server = tokio::spawn({
            let counts = counts.clone();
            async move {
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        continue;
                    };
                    tokio::spawn(serve(stream, content.clone(), counts.clone()));
                }
            }
        });
        Registry {
            addr,
            image,
            marker,
            counts,
            server,
        }
    }

    /// GET and HEAD requests of the manifest so far.
    pub fn manifest_requests(&self) -> usize {
        self.counts.manifests.load(Ordering::SeqCst)
    }
}

/// A loopback address nothing listens on: a registry that is not there.
pub fn closed_address() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("local addr")
}

/// Removes an image this test pulled (by its unique reference; a missing one is fine).
pub fn remove_image(reference: &str) {
    let _ = Command::new("docker")
        .args(["image", "rm", "-f", reference])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// Whether the engine has `reference`.
pub fn image_present(reference: &str) -> bool {
    Command::new("docker")
        .args(["image", "inspect", reference])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn run(argv: &[&str], stdin: Option<&[u8]>) -> Result<Vec<u8>, String> {
    let mut child = Command::new(argv[0])
        .args(&argv[1..])
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("{}: {e}", argv[0]))?;
    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().expect("stdin piped");
        let input = input.to_vec();
        // Written from another thread so a large input cannot deadlock against stdout.
        std::thread::spawn(move || {
            let _ = pipe.write_all(&input);
        });
    }
    let out = child
        .wait_with_output()
        .map_err(|e| format!("{}: {e}", argv[0]))?;
    if !out.status.success() {
        return Err(format!(
            "{argv:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(out.stdout)
}

fn sha256(bytes: &[u8]) -> Result<String, String> {
    let out = run(&["sha256sum"], Some(bytes))?;
    let hex = String::from_utf8_lossy(&out)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned();
    if hex.len() != 64 {
        return Err(format!("sha256sum printed {hex:?}"));
    }
    Ok(format!("sha256:{hex}"))
}

fn gzip(bytes: &[u8]) -> Result<Vec<u8>, String> {
    run(&["gzip", "-n", "-c"], Some(bytes))
}

fn read(path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))
}

/// `envgate/busybox:latest` plus a marker layer, as manifest, config and gzipped layers.
fn build(options: Options, marker: &str) -> Result<Content, String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let saved = dir.path().join("saved");
    std::fs::create_dir(&saved).map_err(|e| e.to_string())?;
    let archive = run(&["docker", "save", BASE_IMAGE], None)?;
    run(
        &["tar", "-x", "-C", &saved.display().to_string()],
        Some(&archive),
    )?;
    let manifest: serde_json::Value =
        serde_json::from_slice(&read(&saved.join("manifest.json"))?).map_err(|e| e.to_string())?;
    let entry = &manifest[0];
    let config_path = entry["Config"].as_str().ok_or("manifest.json: no Config")?;
    let mut config: serde_json::Value =
        serde_json::from_slice(&read(&saved.join(config_path))?).map_err(|e| e.to_string())?;
    let mut layer_tars = Vec::new();
    for layer in entry["Layers"]
        .as_array()
        .ok_or("manifest.json: no Layers")?
    {
        let path = layer
            .as_str()
            .ok_or("manifest.json: a layer is not a path")?;
        layer_tars.push(read(&saved.join(path))?);
    }

    let extra = dir.path().join("extra");
    std::fs::create_dir(&extra).map_err(|e| e.to_string())?;
    std::fs::write(extra.join("envgate-pulled"), marker).map_err(|e| e.to_string())?;
    layer_tars.push(run(
        &[
            "tar",
            "--owner=0",
            "--group=0",
            "--numeric-owner",
            "-c",
            "-C",
            &extra.display().to_string(),
            "envgate-pulled",
        ],
        None,
    )?);

    let mut blobs = HashMap::new();
    let mut diff_ids = Vec::new();
    let mut layers = Vec::new();
    for tar in &layer_tars {
        diff_ids.push(serde_json::Value::String(sha256(tar)?));
        let gz = gzip(tar)?;
        let digest = sha256(&gz)?;
        layers.push(serde_json::json!({
            "mediaType": LAYER_TYPE,
            "size": gz.len(),
            "digest": digest,
        }));
        blobs.insert(digest, (gz, true));
    }
    config["rootfs"] = serde_json::json!({ "type": "layers", "diff_ids": diff_ids });
    if let Some(history) = config["history"].as_array_mut() {
        history.push(serde_json::json!({
            "created": "2026-01-01T00:00:00Z",
            "created_by": "envgate test registry: the marker layer",
        }));
    }
    let config = serde_json::to_vec(&config).map_err(|e| e.to_string())?;
    let config_digest = sha256(&config)?;
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": MANIFEST_TYPE,
        "config": { "mediaType": CONFIG_TYPE, "size": config.len(), "digest": config_digest },
        "layers": layers,
    }))
    .map_err(|e| e.to_string())?;
    blobs.insert(config_digest, (config, false));
    Ok(Content {
        repository: options.repository,
        tag: options.tag,
        manifest_digest: sha256(&manifest)?,
        manifest,
        blobs,
        layer_delay: options.layer_delay,
    })
}

/// One request per connection (`Connection: close`), which the engine's client handles.
async fn serve(mut stream: TcpStream, content: Arc<Content>, counts: Arc<Counts>) {
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    let read_head = async {
        while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 64 * 1024 {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => head.extend_from_slice(&buf[..n]),
            }
            // A TLS ClientHello (0x16 ...) never ends a header: refuse it at once, so the
            // engine falls back to plain HTTP without waiting.
            if !head[0].is_ascii_uppercase() {
                return false;
            }
        }
        true
    };
    if !matches!(
        tokio::time::timeout(Duration::from_secs(10), read_head).await,
        Ok(true)
    ) {
        return;
    }
    let text = String::from_utf8_lossy(&head);
    let mut parts = text.lines().next().unwrap_or_default().split_whitespace();
    let (Some(method), Some(target)) = (parts.next(), parts.next()) else {
        // Not HTTP (the engine's TLS attempt): drop the connection.
        return;
    };
    let path = target.split('?').next().unwrap_or_default();
    let head_only = method == "HEAD";
    let (status, content_type, digest, body, delay) = route(&content, &counts, path);
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let mut response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         Docker-Distribution-API-Version: registry/2.0\r\nConnection: close\r\n",
        body.len()
    );
    if let Some(digest) = digest {
        response.push_str(&format!("Docker-Content-Digest: {digest}\r\n"));
    }
    response.push_str("\r\n");
    let mut bytes = response.into_bytes();
    if !head_only {
        bytes.extend_from_slice(&body);
    }
    let _ = stream.write_all(&bytes).await;
    let _ = stream.shutdown().await;
}

type Answer = (
    &'static str,
    &'static str,
    Option<String>,
    Vec<u8>,
    Duration,
);

fn route(content: &Content, counts: &Counts, path: &str) -> Answer {
    let not_found = |code: &str| -> Answer {
        let body = format!(r#"{{"errors":[{{"code":"{code}","message":"{path}"}}]}}"#);
        (
            "404 Not Found",
            "application/json",
            None,
            body.into_bytes(),
            Duration::ZERO,
        )
    };
    if path == "/v2/" || path == "/v2" {
        return (
            "200 OK",
            "application/json",
            None,
            b"{}".to_vec(),
            Duration::ZERO,
        );
    }
    let prefix = format!("/v2/{}/", content.repository);
    let Some(rest) = path.strip_prefix(&prefix) else {
        return not_found("NAME_UNKNOWN");
    };
    if let Some(reference) = rest.strip_prefix("manifests/") {
        counts.manifests.fetch_add(1, Ordering::SeqCst);
        if reference == content.tag || reference == content.manifest_digest {
            return (
                "200 OK",
                MANIFEST_TYPE,
                Some(content.manifest_digest.clone()),
                content.manifest.clone(),
                Duration::ZERO,
            );
        }
        return not_found("MANIFEST_UNKNOWN");
    }
    if let Some(digest) = rest.strip_prefix("blobs/") {
        if let Some((bytes, layer)) = content.blobs.get(digest) {
            let delay = if *layer {
                content.layer_delay
            } else {
                Duration::ZERO
            };
            return (
                "200 OK",
                "application/octet-stream",
                Some(digest.to_owned()),
                bytes.clone(),
                delay,
            );
        }
        return not_found("BLOB_UNKNOWN");
    }
    not_found("UNSUPPORTED")
}
