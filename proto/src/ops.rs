//! Metrics and the operations HTTP endpoint (`/healthz`, `/readyz`,
//! `/metrics`) that both binaries serve the same way.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio_util::sync::CancellationToken;

/// Histogram of the time spent in each phase of a connection, labelled
/// `phase` (accept, auth, placement, container_create, exec_start, session,
/// teardown) and further labels where a phase has variants.
pub const PHASE_METRIC: &str = "envgate_phase_duration_seconds";

const PHASE_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0, 300.0, 3600.0,
];

/// Installs the Prometheus recorder for the `metrics` facade.
pub fn init_metrics() -> PrometheusHandle {
    PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Full(PHASE_METRIC.to_owned()), PHASE_BUCKETS)
        .expect("buckets are not empty")
        .install_recorder()
        .expect("the metrics recorder is installed once, at start")
}

/// Records one phase duration.
pub fn record_phase(phase: &'static str, elapsed: Duration, labels: &[(&'static str, String)]) {
    let mut all = vec![("phase", phase.to_owned())];
    all.extend(labels.iter().cloned());
    let labels: Vec<metrics::Label> = all
        .into_iter()
        .map(|(k, v)| metrics::Label::new(k, v))
        .collect();
    metrics::histogram!(PHASE_METRIC, labels).record(elapsed.as_secs_f64());
}

/// Whether the process should receive new work. `/readyz` answers 503 while
/// it is false (starting, draining, lost its backend).
#[derive(Clone, Default)]
pub struct Readiness(Arc<AtomicBool>);

impl Readiness {
    pub fn set(&self, ready: bool) {
        self.0.store(ready, Ordering::Relaxed);
    }
    pub fn is_ready(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

#[derive(Clone)]
struct OpsState {
    metrics: PrometheusHandle,
    readiness: Readiness,
}

/// Serves `/healthz` (the process is up), `/readyz` (it takes new work) and
/// `/metrics` (Prometheus text) until `shutdown` is cancelled.
pub async fn serve_ops(
    listener: tokio::net::TcpListener,
    metrics: PrometheusHandle,
    readiness: Readiness,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route(
            "/metrics",
            get(|State(s): State<OpsState>| async move { s.metrics.render() }),
        )
        .with_state(OpsState { metrics, readiness });
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
}

async fn readyz(State(s): State<OpsState>) -> (StatusCode, &'static str) {
    if s.readiness.is_ready() {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    }
}

/// Binds the ops listener; a helper so both binaries report the same error.
pub async fn bind_ops(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await
}
