//! Pulling a missing image on demand. A class arriving at 9:00 on a host that lacks the image
//! must cost ONE pull, not one per user: every open waiting for the same image inside this
//! replica follows the same pull, and each gets the same throttled progress lines. The pull
//! runs in its own task, so a user who disconnects does not cancel it for the others.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bollard::Docker;
use bollard::errors::Error as BollardError;
use bollard::models::CreateImageInfo;
use bollard::query_parameters::CreateImageOptions;
use futures::StreamExt;
use tokio::sync::watch;
use tracing::Instrument;

use super::{classify, is_not_found, unavailable, within};
use crate::types::RuntimeError;

/// At most one progress line per waiter this often, between the start and the done line.
const PROGRESS_EVERY: Duration = Duration::from_secs(2);

/// What a pull's followers see.
#[derive(Debug, Clone, Default)]
struct PullStatus {
    /// e.g. "2/5 layers, 41 MB of 120 MB"; empty until the first layer shows up.
    summary: String,
    /// Set once the pull ended: the done summary, or why it failed.
    outcome: Option<Result<String, RuntimeError>>,
}

/// Single-flight image pulls, bounded in time.
pub(super) struct ImagePuller {
    /// Pulls under way, by image reference; an entry goes when its pull ends, so a failed
    /// pull is tried afresh by the next open.
    pulls: Arc<Mutex<HashMap<String, watch::Receiver<PullStatus>>>>,
    timeout: Duration,
}

impl ImagePuller {
    pub(super) fn new(timeout: Duration) -> Self {
        Self {
            pulls: Arc::default(),
            timeout,
        }
    }

    /// Returns once `image` is present, pulling it first when the engine lacks it.
    pub(super) async fn ensure(
        &self,
        docker: &Docker,
        image: &str,
        progress: &(dyn Fn(&str) + Send + Sync),
    ) -> Result<(), RuntimeError> {
        match within("inspect image", docker.inspect_image(image)).await? {
            Ok(_) => return Ok(()),
            Err(e) if is_not_found(&e) => {}
            Err(e) => return Err(classify(e)),
        }
        let status = self.follow(docker, image);
        progress(&format!("pulling image {image} …"));
        wait(status, image, progress).await
    }

    /// The pull of `image` under way, or a new one.
    fn follow(&self, docker: &Docker, image: &str) -> watch::Receiver<PullStatus> {
        let mut pulls = self.pulls.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(status) = pulls.get(image) {
            return status.clone();
        }
        let (tx, rx) = watch::channel(PullStatus::default());
        pulls.insert(image.to_owned(), rx.clone());
        let registry = self.pulls.clone();
        let docker = docker.clone();
        let image = image.to_owned();
        let timeout = self.timeout;
        let span = tracing::info_span!("image_pull", image = %image);
        tokio::spawn(
            async move {
                let started = Instant::now();
                tracing::info!("pulling a missing image");
                let outcome = match tokio::time::timeout(timeout, pull(&docker, &image, &tx)).await
                {
                    Ok(outcome) => outcome,
                    Err(_) => Err(RuntimeError::PullFailed {
                        image: image.clone(),
                        reason: format!("no result within {} s", timeout.as_secs()),
                    }),
                };
                match &outcome {
                    Ok(done) => {
                        tracing::info!(elapsed_ms = started.elapsed().as_millis() as u64, %done, "image pulled")
                    }
                    Err(e) => tracing::warn!(error = %e, "image pull failed"),
                }
                registry
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&image);
                tx.send_modify(|s| s.outcome = Some(outcome));
            }
            .instrument(span),
        );
        rx
    }
}

/// Follows a pull to its end, showing at most one summary line every `PROGRESS_EVERY`.
async fn wait(
    mut status: watch::Receiver<PullStatus>,
    image: &str,
    progress: &(dyn Fn(&str) + Send + Sync),
) -> Result<(), RuntimeError> {
    let started = Instant::now();
    let mut shown_at = Instant::now();
    let mut shown = String::new();
    loop {
        {
            let now = status.borrow_and_update();
            match &now.outcome {
                Some(Ok(done)) => {
                    progress(&format!(
                        "pulled image {image} in {} s ({done})",
                        started.elapsed().as_secs()
                    ));
                    return Ok(());
                }
                Some(Err(e)) => return Err(e.clone()),
                None => {}
            }
            if shown_at.elapsed() >= PROGRESS_EVERY
                && !now.summary.is_empty()
                && now.summary != shown
            {
                progress(&format!("pulling image {image} … {}", now.summary));
                shown.clone_from(&now.summary);
                shown_at = Instant::now();
            }
        }
        let next_line = PROGRESS_EVERY.saturating_sub(shown_at.elapsed());
        match tokio::time::timeout(next_line.max(Duration::from_millis(100)), status.changed())
            .await
        {
            Ok(Ok(())) | Err(_) => {}
            Ok(Err(_)) => {
                return Err(RuntimeError::PullFailed {
                    image: image.to_owned(),
                    reason: "the pull ended without a result".to_owned(),
                });
            }
        }
    }
}

/// Streams one `docker pull`, publishing the layer summary as it goes.
async fn pull(
    docker: &Docker,
    image: &str,
    status: &watch::Sender<PullStatus>,
) -> Result<String, RuntimeError> {
    let (from_image, tag) = split_reference(image);
    let options = CreateImageOptions {
        from_image: Some(from_image),
        tag: Some(tag),
        ..Default::default()
    };
    let mut stream = docker.create_image(Some(options), None, None);
    let mut layers = Layers::default();
    while let Some(item) = stream.next().await {
        let info = item.map_err(|e| pull_failure(image, e))?;
        if layers.observe(&info) {
            let summary = layers.summary();
            status.send_modify(|s| s.summary = summary);
        }
    }
    Ok(layers.done())
}

/// The engine's own reason is the most useful thing to show ("connection refused",
/// "manifest unknown", "pull access denied ..."); failing to reach the engine is not the
/// image's fault.
fn pull_failure(image: &str, e: BollardError) -> RuntimeError {
    match e {
        BollardError::DockerResponseServerError { message, .. } => RuntimeError::PullFailed {
            image: image.to_owned(),
            reason: message.trim().to_owned(),
        },
        BollardError::DockerStreamError { error } => RuntimeError::PullFailed {
            image: image.to_owned(),
            reason: error.trim().to_owned(),
        },
        other => unavailable(other),
    }
}

/// `name[:tag]` or `name[:tag]@digest` → (`name`, tag or digest), as the engine's
/// `fromImage` and `tag` want them. No tag means `latest`: an empty tag would make the engine
/// pull every tag of the repository. A colon before the last `/` is a registry port
/// (`127.0.0.1:5000/lab/py`), not a tag.
pub(super) fn split_reference(image: &str) -> (String, String) {
    if let Some((name, digest)) = image.split_once('@') {
        return (split_tag(name).0.to_owned(), digest.to_owned());
    }
    let (name, tag) = split_tag(image);
    (name.to_owned(), tag.unwrap_or("latest").to_owned())
}

fn split_tag(name: &str) -> (&str, Option<&str>) {
    let last_component = name.rfind('/').map_or(0, |slash| slash + 1);
    match name[last_component..].rfind(':') {
        Some(colon) => {
            let at = last_component + colon;
            (&name[..at], Some(&name[at + 1..]))
        }
        None => (name, None),
    }
}

#[derive(Debug, Default, Clone, Copy)]
struct Layer {
    downloaded: u64,
    size: u64,
    done: bool,
}

/// Per-layer accounting of the engine's pull messages.
#[derive(Debug, Default)]
struct Layers {
    /// In the order the engine announced them.
    order: Vec<String>,
    layers: HashMap<String, Layer>,
}

impl Layers {
    /// Takes one message; `true` when the summary may have changed. Messages without a
    /// layer id ("Pulling from …", "Digest: …", "Status: …") are not layers.
    fn observe(&mut self, info: &CreateImageInfo) -> bool {
        let (Some(id), Some(status)) = (&info.id, &info.status) else {
            return false;
        };
        let detail = info.progress_detail.as_ref();
        let current = detail
            .and_then(|d| d.current)
            .and_then(|c| u64::try_from(c).ok());
        let total = detail
            .and_then(|d| d.total)
            .and_then(|t| u64::try_from(t).ok());
        let known = matches!(
            status.as_str(),
            "Pulling fs layer"
                | "Waiting"
                | "Downloading"
                | "Verifying Checksum"
                | "Download complete"
                | "Extracting"
                | "Pull complete"
                | "Already exists"
        );
        if !known {
            return false;
        }
        if !self.layers.contains_key(id) {
            self.order.push(id.clone());
        }
        let layer = self.layers.entry(id.clone()).or_default();
        match status.as_str() {
            "Downloading" => {
                if let Some(total) = total.filter(|t| *t > 0) {
                    layer.size = total;
                }
                layer.downloaded = current.unwrap_or(layer.downloaded).min(layer.size);
            }
            "Verifying Checksum" | "Download complete" | "Extracting" => {
                layer.downloaded = layer.size;
            }
            "Pull complete" | "Already exists" => {
                layer.downloaded = layer.size;
                layer.done = true;
            }
            _ => {}
        }
        true
    }

    /// "5 layers, 120 MB", for the done line.
    fn done(&self) -> String {
        let size: u64 = self.layers.values().map(|l| l.size).sum();
        match (self.order.len(), size) {
            (0, _) => "no layer was missing".to_owned(),
            (n, 0) => format!("{n} layers"),
            (n, size) => format!("{n} layers, {}", bytes(size)),
        }
    }

    /// "2/5 layers, 41 MB of 120 MB" (sizes only once the engine reported some).
    fn summary(&self) -> String {
        let done = self.layers.values().filter(|l| l.done).count();
        let mut line = format!("{done}/{} layers", self.order.len());
        let size: u64 = self.layers.values().map(|l| l.size).sum();
        if size > 0 {
            let downloaded: u64 = self.layers.values().map(|l| l.downloaded).sum();
            line.push_str(&format!(", {} of {}", bytes(downloaded), bytes(size)));
        }
        line
    }
}

/// Decimal units, as `docker pull` shows them.
fn bytes(n: u64) -> String {
    const UNITS: [(&str, f64); 3] = [("GB", 1e9), ("MB", 1e6), ("kB", 1e3)];
    for (unit, scale) in UNITS {
        let value = n as f64 / scale;
        if value >= 1.0 {
            return if value >= 10.0 {
                format!("{value:.0} {unit}")
            } else {
                format!("{value:.1} {unit}")
            };
        }
    }
    format!("{n} B")
}

#[cfg(test)]
mod tests {
    use bollard::models::ProgressDetail;

    use super::*;

    #[test]
    fn references_split_into_name_and_tag_or_digest() {
        let cases = [
            ("busybox", ("busybox", "latest")),
            ("busybox:1.36", ("busybox", "1.36")),
            ("envgate/busybox:latest", ("envgate/busybox", "latest")),
            ("127.0.0.1:5000/lab/py", ("127.0.0.1:5000/lab/py", "latest")),
            ("127.0.0.1:5000/lab/py:3", ("127.0.0.1:5000/lab/py", "3")),
            (
                "registry.example.org:443/x/y@sha256:abc",
                ("registry.example.org:443/x/y", "sha256:abc"),
            ),
            (
                "localhost:5000/x/y:1@sha256:abc",
                ("localhost:5000/x/y", "sha256:abc"),
            ),
        ];
        for (image, (name, tag)) in cases {
            assert_eq!(
                split_reference(image),
                (name.to_owned(), tag.to_owned()),
                "{image}"
            );
        }
    }

    fn message(id: &str, status: &str, current: i64, total: i64) -> CreateImageInfo {
        CreateImageInfo {
            id: Some(id.to_owned()),
            status: Some(status.to_owned()),
            progress_detail: Some(ProgressDetail {
                current: Some(current),
                total: Some(total),
            }),
            error_detail: None,
        }
    }

    #[test]
    fn the_summary_counts_layers_and_bytes() {
        let mut layers = Layers::default();
        assert!(!layers.observe(&message("3", "Pulling from lab/py", 0, 0)));
        assert!(layers.observe(&message("a", "Pulling fs layer", 0, 0)));
        assert!(layers.observe(&message("b", "Pulling fs layer", 0, 0)));
        assert!(layers.observe(&message("c", "Already exists", 0, 0)));
        assert_eq!(layers.summary(), "1/3 layers");
        layers.observe(&message("a", "Downloading", 20_000_000, 80_000_000));
        layers.observe(&message("b", "Downloading", 1_000_000, 40_000_000));
        assert_eq!(layers.summary(), "1/3 layers, 21 MB of 120 MB");
        layers.observe(&message("a", "Download complete", 0, 0));
        layers.observe(&message("a", "Pull complete", 0, 0));
        assert_eq!(layers.summary(), "2/3 layers, 81 MB of 120 MB");
        assert!(!layers.observe(&message("", "Status: Downloaded newer image", 0, 0)));
    }

    #[test]
    fn sizes_read_like_docker_pull() {
        assert_eq!(bytes(0), "0 B");
        assert_eq!(bytes(812_000), "812 kB");
        assert_eq!(bytes(1_234_567), "1.2 MB");
        assert_eq!(bytes(41_000_000), "41 MB");
        assert_eq!(bytes(2_500_000_000), "2.5 GB");
    }
}
