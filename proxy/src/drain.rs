//! Graceful drain, shared by SIGTERM and the control plane's Drain command:
//! stop accepting, report not-ready so the balancer sends no new work, let
//! sessions go on for a grace period, then tell each user and close.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use envgate_proto::ops::Readiness;
use tokio_util::sync::CancellationToken;

use crate::connections::Registry;
use crate::error::DRAIN_MESSAGE;

#[derive(Clone)]
pub struct Drain {
    stop_accepting: CancellationToken,
    draining: Arc<AtomicBool>,
    registry: Registry,
    readiness: Readiness,
}

impl Drain {
    pub fn new(registry: Registry, readiness: Readiness) -> Self {
        Self {
            stop_accepting: CancellationToken::new(),
            draining: Arc::default(),
            registry,
            readiness,
        }
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Cancelled when the proxy must stop accepting connections.
    pub fn stop_accepting(&self) -> CancellationToken {
        self.stop_accepting.clone()
    }

    /// Starts draining: connections still open after `grace` are closed with
    /// [`DRAIN_MESSAGE`]. Calling it again (SIGTERM during a drain) starts
    /// another timer; the earlier one to fire closes them.
    pub fn begin(&self, grace: Duration) {
        self.draining.store(true, Ordering::Relaxed);
        self.readiness.set(false);
        self.stop_accepting.cancel();
        let registry = self.registry.clone();
        tokio::spawn(async move {
            tokio::time::sleep(grace).await;
            let closed = registry.kill_all(DRAIN_MESSAGE);
            if closed > 0 {
                tracing::info!(
                    closed,
                    "drain grace over, closing the remaining connections"
                );
            }
        });
    }
}
