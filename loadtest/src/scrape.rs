//! Reads the proxies' and control plane's Prometheus `/metrics` before and
//! after a level, so the server-side time per phase can be set beside what the
//! client saw.
//!
//! Only `_sum` and `_count` of `envgate_phase_duration_seconds` are used: their
//! deltas give the mean of exactly the observations made during the level,
//! whether the exporter renders the metric as a histogram or a summary.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::{
    self,
    pki_types::pem::PemObject,
    pki_types::{CertificateDer, PrivateKeyDer, ServerName},
};

pub use envgate_proto::ops::PHASE_METRIC;

/// The connection counter whose per-result deltas are reported too.
pub const CONNECTIONS_METRIC: &str = "envgate_connections_total";

const MAX_BODY: usize = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ScrapeError {
    #[error("metrics URL {0:?} is not of the form http://host:port/path")]
    BadUrl(String),
    #[error("scraping {url}: {message}")]
    Fetch { url: String, message: String },
    #[error("scraping {url}: no answer within {timeout:?}")]
    Timeout { url: String, timeout: Duration },
}

/// One sample line of the Prometheus text format.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// Parses Prometheus text exposition format; comments, blank lines and lines
/// that do not parse are skipped (one bad line must not lose a level).
pub fn parse(text: &str) -> Vec<Sample> {
    text.lines().filter_map(parse_line).collect()
}

fn parse_line(line: &str) -> Option<Sample> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let (name, labels, rest) = match line.find('{') {
        Some(open) if line[..open].find(' ').is_none() => {
            let (labels, after) = parse_labels(&line[open + 1..])?;
            (&line[..open], labels, after)
        }
        _ => {
            let (name, rest) = line.split_once([' ', '\t'])?;
            (name, BTreeMap::new(), rest)
        }
    };
    let value = rest.split_whitespace().next()?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().ok()?,
    };
    Some(Sample {
        name: name.to_owned(),
        labels,
        value,
    })
}

/// Parses `a="x",b="y\"z"}` and returns the labels and the text after `}`.
fn parse_labels(mut s: &str) -> Option<(BTreeMap<String, String>, &str)> {
    let mut labels = BTreeMap::new();
    loop {
        s = s.trim_start_matches([' ', ',']);
        if let Some(rest) = s.strip_prefix('}') {
            return Some((labels, rest));
        }
        let eq = s.find('=')?;
        let key = s[..eq].trim().to_owned();
        s = s[eq + 1..].trim_start().strip_prefix('"')?;
        let mut value = String::new();
        let mut chars = s.char_indices();
        let end = loop {
            let (i, c) = chars.next()?;
            match c {
                '\\' => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    other => value.push(other),
                },
                '"' => break i,
                c => value.push(c),
            }
        };
        labels.insert(key, value);
        s = &s[end + 1..];
    }
}

/// Running totals of the phase histogram, keyed by phase and the other labels
/// (rendered `k=v,k=v`, empty when there are none).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Totals {
    pub phases: BTreeMap<(String, String), (f64, f64)>,
    pub connections: BTreeMap<String, f64>,
}

impl Totals {
    /// Adds one scrape's samples (several processes add up).
    pub fn add(&mut self, samples: &[Sample]) {
        for s in samples {
            if let Some(kind) = s.name.strip_prefix(PHASE_METRIC) {
                let Some(phase) = s.labels.get("phase") else {
                    continue;
                };
                let rest: Vec<String> = s
                    .labels
                    .iter()
                    .filter(|(k, _)| !matches!(k.as_str(), "phase" | "le" | "quantile"))
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect();
                let entry = self
                    .phases
                    .entry((phase.clone(), rest.join(",")))
                    .or_insert((0.0, 0.0));
                match kind {
                    "_sum" => entry.0 += s.value,
                    "_count" => entry.1 += s.value,
                    _ => {}
                }
            } else if s.name == CONNECTIONS_METRIC {
                let result = s.labels.get("result").cloned().unwrap_or_default();
                *self.connections.entry(result).or_insert(0.0) += s.value;
            }
        }
    }
}

/// Mean server-side time of one phase (and label set) during one level.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PhaseMean {
    pub phase: String,
    /// The phase's other labels, `k=v,k=v` (e.g. `cache=hit`).
    pub labels: String,
    /// Observations during the level.
    pub count: f64,
    pub mean_ms: f64,
}

impl PhaseMean {
    /// `phase` or `phase{labels}`, for tables and legends.
    pub fn key(&self) -> String {
        if self.labels.is_empty() {
            self.phase.clone()
        } else {
            format!("{}{{{}}}", self.phase, self.labels)
        }
    }
}

/// Per-phase means of what was observed between two scrapes; phases with no
/// new observation are left out. A counter that went down (a restarted
/// process) is treated as starting from zero.
pub fn delta_means(before: &Totals, after: &Totals) -> Vec<PhaseMean> {
    let mut means = Vec::new();
    for (key, &(sum_after, count_after)) in &after.phases {
        let (sum_before, count_before) = before.phases.get(key).copied().unwrap_or((0.0, 0.0));
        let (sum, count) = if count_after < count_before {
            (sum_after, count_after)
        } else {
            (sum_after - sum_before, count_after - count_before)
        };
        if count > 0.0 {
            means.push(PhaseMean {
                phase: key.0.clone(),
                labels: key.1.clone(),
                count,
                mean_ms: sum / count * 1000.0,
            });
        }
    }
    means
}

/// Per-result increase of `envgate_connections_total` between two scrapes.
pub fn connection_deltas(before: &Totals, after: &Totals) -> BTreeMap<String, f64> {
    after
        .connections
        .iter()
        .map(|(result, &v)| {
            let b = before.connections.get(result).copied().unwrap_or(0.0);
            (result.clone(), if v < b { v } else { v - b })
        })
        .filter(|(_, d)| *d > 0.0)
        .collect()
}

/// Scrapes every URL and adds them up. Fails if any URL fails: a partial sum
/// would silently under-count a phase.
pub async fn scrape_all(urls: &[String], timeout: Duration) -> Result<Totals, ScrapeError> {
    let bodies = futures::future::join_all(urls.iter().map(|u| fetch(u, timeout))).await;
    let mut totals = Totals::default();
    for body in bodies {
        totals.add(&parse(&body?));
    }
    Ok(totals)
}

/// `GET url` over plain HTTP/1.1 (the ops endpoints speak nothing else).
pub async fn fetch(url: &str, timeout: Duration) -> Result<String, ScrapeError> {
    fetch_with(url, timeout, None).await
}

/// A client certificate and the CA to check the server against, for an `https://` metrics
/// URL that asks for a client certificate (etcd started with `--client-cert-auth` serves its
/// `/metrics` only so).
#[derive(Clone)]
pub struct ClientTls(Arc<rustls::ClientConfig>);

impl ClientTls {
    /// From PEM files: the CA certificate, the client certificate and its key.
    pub fn from_pem_files(ca: &Path, cert: &Path, key: &Path) -> Result<Self, String> {
        let read_certs = |path: &Path| {
            CertificateDer::pem_file_iter(path)
                .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                .map_err(|e| format!("{}: {e}", path.display()))
        };
        let mut roots = rustls::RootCertStore::empty();
        for ca in read_certs(ca)? {
            roots.add(ca).map_err(|e| e.to_string())?;
        }
        let key =
            PrivateKeyDer::from_pem_file(key).map_err(|e| format!("{}: {e}", key.display()))?;
        let config = rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_client_auth_cert(read_certs(cert)?, key)
            .map_err(|e| e.to_string())?;
        Ok(Self(Arc::new(config)))
    }
}

/// `GET url` over HTTP/1.1, or over TLS with `tls` for an `https://` URL.
pub async fn fetch_with(
    url: &str,
    timeout: Duration,
    tls: Option<&ClientTls>,
) -> Result<String, ScrapeError> {
    let bad = || ScrapeError::BadUrl(url.to_owned());
    let (rest, tls, default_port) =
        match (url.strip_prefix("http://"), url.strip_prefix("https://")) {
            (Some(rest), _) => (rest, None, 80),
            (None, Some(rest)) => (rest, Some(tls.ok_or_else(bad)?), 443),
            (None, None) => return Err(bad()),
        };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/metrics"),
    };
    if authority.is_empty() {
        return Err(bad());
    }
    let addr = if authority.contains(':') {
        authority.to_owned()
    } else {
        format!("{authority}:{default_port}")
    };
    let host = authority
        .rsplit_once(':')
        .map_or(authority, |(host, _)| host)
        .to_owned();
    let fail = |message: String| ScrapeError::Fetch {
        url: url.to_owned(),
        message,
    };
    let head = format!(
        "GET {path} HTTP/1.1\r\nHost: {authority}\r\nAccept: text/plain\r\nConnection: close\r\n\r\n"
    );
    let request = async {
        let stream = TcpStream::connect(&addr)
            .await
            .map_err(|e| fail(e.to_string()))?;
        let raw = match tls {
            None => exchange(stream, &head).await,
            Some(tls) => {
                let name = ServerName::try_from(host).map_err(|e| fail(e.to_string()))?;
                let stream = TlsConnector::from(tls.0.clone())
                    .connect(name, stream)
                    .await
                    .map_err(|e| fail(e.to_string()))?;
                exchange(stream, &head).await
            }
        }
        .map_err(|e| fail(e.to_string()))?;
        parse_response(&raw).map_err(fail)
    };
    tokio::time::timeout(timeout, request)
        .await
        .map_err(|_| ScrapeError::Timeout {
            url: url.to_owned(),
            timeout,
        })?
}

/// Writes the request head, reads the response to the end of the connection.
async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    head: &str,
) -> std::io::Result<Vec<u8>> {
    stream.write_all(head.as_bytes()).await?;
    let mut raw = Vec::new();
    let read = (&mut stream)
        .take(MAX_BODY as u64)
        .read_to_end(&mut raw)
        .await;
    match read {
        Ok(_) => Ok(raw),
        // A TLS server that closes without close_notify still sent the whole response.
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !raw.is_empty() => Ok(raw),
        Err(e) => Err(e),
    }
}

/// Splits an HTTP/1.1 response read to the end of the connection; decodes a
/// chunked body.
fn parse_response(raw: &[u8]) -> Result<String, String> {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or("the response has no header end")?;
    let head = String::from_utf8_lossy(&raw[..split]);
    let body = &raw[split + 4..];
    let status_line = head.lines().next().unwrap_or("");
    let status = status_line.split_whitespace().nth(1).unwrap_or("");
    if status != "200" {
        return Err(format!("HTTP status {status_line:?}"));
    }
    let chunked = head.lines().any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    let body = if chunked {
        dechunk(body)?
    } else {
        body.to_vec()
    };
    String::from_utf8(body).map_err(|_| "the body is not UTF-8".to_owned())
}

fn dechunk(mut body: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    loop {
        let line_end = body
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or("truncated chunk size")?;
        let size_text = String::from_utf8_lossy(&body[..line_end]);
        let size_text = size_text.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_text, 16)
            .map_err(|_| format!("bad chunk size {size_text:?}"))?;
        body = &body[line_end + 2..];
        if size == 0 {
            return Ok(out);
        }
        if body.len() < size {
            return Err("truncated chunk".to_owned());
        }
        out.extend_from_slice(&body[..size]);
        body = body.get(size + 2..).ok_or("truncated chunk end")?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BEFORE: &str = r#"
# HELP envgate_phase_duration_seconds time per phase
# TYPE envgate_phase_duration_seconds histogram
envgate_phase_duration_seconds_bucket{phase="auth",cache="hit",le="0.005"} 3
envgate_phase_duration_seconds_bucket{phase="auth",cache="hit",le="+Inf"} 4
envgate_phase_duration_seconds_sum{phase="auth",cache="hit"} 0.010
envgate_phase_duration_seconds_count{phase="auth",cache="hit"} 4
envgate_phase_duration_seconds_sum{phase="placement"} 1.5
envgate_phase_duration_seconds_count{phase="placement"} 3
envgate_connections_total{result="ok"} 7
other_metric 12
"#;

    const AFTER: &str = r#"
envgate_phase_duration_seconds_sum{phase="auth",cache="hit"} 0.030
envgate_phase_duration_seconds_count{phase="auth",cache="hit"} 14
envgate_phase_duration_seconds_sum{cache="miss",phase="auth"} 0.4
envgate_phase_duration_seconds_count{cache="miss",phase="auth"} 2
envgate_phase_duration_seconds_sum{phase="placement"} 1.5
envgate_phase_duration_seconds_count{phase="placement"} 3
envgate_connections_total{result="ok"} 17
envgate_connections_total{result="auth_failed"} 1
"#;

    #[test]
    fn parses_names_labels_values_and_escapes() {
        let samples =
            parse("a_total 3\nb{x=\"1\",y=\"q\\\"uote, }\"} 2.5e-3 1700000000\n# c 1\nbad line{\n");
        assert_eq!(samples.len(), 2);
        assert_eq!(
            samples[0],
            Sample {
                name: "a_total".into(),
                labels: BTreeMap::new(),
                value: 3.0
            }
        );
        assert_eq!(samples[1].name, "b");
        assert_eq!(samples[1].labels["x"], "1");
        assert_eq!(samples[1].labels["y"], "q\"uote, }");
        assert_eq!(samples[1].value, 0.0025);
        assert_eq!(parse("x{le=\"+Inf\"} +Inf")[0].value, f64::INFINITY);
    }

    #[test]
    fn delta_means_by_phase_and_labels() {
        let mut before = Totals::default();
        before.add(&parse(BEFORE));
        let mut after = Totals::default();
        after.add(&parse(AFTER));
        let means = delta_means(&before, &after);
        assert_eq!(means.len(), 2, "placement saw nothing new: {means:?}");
        let hit = means.iter().find(|m| m.labels == "cache=hit").unwrap();
        assert_eq!(hit.phase, "auth");
        assert_eq!(hit.count, 10.0);
        assert!((hit.mean_ms - 2.0).abs() < 1e-9, "{hit:?}");
        let miss = means.iter().find(|m| m.labels == "cache=miss").unwrap();
        assert!((miss.mean_ms - 200.0).abs() < 1e-9);
        assert_eq!(miss.key(), "auth{cache=miss}");
        let conns = connection_deltas(&before, &after);
        assert_eq!(conns["ok"], 10.0);
        assert_eq!(conns["auth_failed"], 1.0);
    }

    #[test]
    fn several_sources_add_up_and_restarts_count_from_zero() {
        let mut before = Totals::default();
        before.add(&parse(BEFORE));
        before.add(&parse(BEFORE));
        assert_eq!(
            before.phases[&("auth".into(), "cache=hit".into())],
            (0.02, 8.0)
        );
        let mut restarted = Totals::default();
        restarted.add(&parse("envgate_phase_duration_seconds_sum{phase=\"placement\"} 0.2\nenvgate_phase_duration_seconds_count{phase=\"placement\"} 1\n"));
        let means = delta_means(&before, &restarted);
        assert_eq!(means.len(), 1);
        assert!((means[0].mean_ms - 200.0).abs() < 1e-9);
    }

    #[test]
    fn http_responses_plain_and_chunked() {
        let plain = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\na 1\n\n";
        assert_eq!(parse_response(plain).unwrap(), "a 1\n\n");
        let chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\na 1\n\r\n3\r\nb 2\r\n0\r\n\r\n";
        assert_eq!(parse_response(chunked).unwrap(), "a 1\nb 2");
        assert!(parse_response(b"HTTP/1.1 503 Service Unavailable\r\n\r\n").is_err());
    }

    #[tokio::test]
    async fn fetches_from_a_live_http_server() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut buf = vec![0u8; 1024];
            let n = socket.read(&mut buf).await.unwrap();
            assert!(String::from_utf8_lossy(&buf[..n]).starts_with("GET /metrics HTTP/1.1"));
            let body = "envgate_phase_duration_seconds_sum{phase=\"auth\"} 1\nenvgate_phase_duration_seconds_count{phase=\"auth\"} 4\n";
            let reply = format!(
                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            );
            socket.write_all(reply.as_bytes()).await.unwrap();
        });
        let totals = scrape_all(&[format!("http://{addr}/metrics")], Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(totals.phases[&("auth".into(), String::new())], (1.0, 4.0));
        server.await.unwrap();
        let err = fetch(&format!("http://{addr}/metrics"), Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(matches!(err, ScrapeError::Fetch { .. }), "{err}");
        assert!(matches!(
            fetch("ftp://x", Duration::from_secs(1)).await,
            Err(ScrapeError::BadUrl(_))
        ));
    }
}
