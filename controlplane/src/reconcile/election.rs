//! Leader election: one replica at a time runs the reconciler's passes. It campaigns under a
//! lease it keeps alive, leads until the lease is lost or it is shut down, then resigns.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::Reconciler;
use crate::store::{Leadership, Store};

/// TTL of the leadership lease; a dead leader is replaced within about this long (the
/// issue asks for 10 s, and a pass may have to run after the takeover).
const LEADER_LEASE_TTL: Duration = Duration::from_secs(6);
const LEADER_KEEP_ALIVE: Duration = Duration::from_secs(2);
const ELECTION: &str = "reconciler";

impl Reconciler {
    /// Campaigns for leadership and reconciles every interval while leading, until `shutdown`.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        while !shutdown.is_cancelled() {
            let lease = match self.store.lease_grant(LEADER_LEASE_TTL).await {
                Ok(lease) => lease,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot grant the election lease; retrying");
                    if sleep_or_shutdown(self.config.interval, &shutdown).await {
                        return;
                    }
                    continue;
                }
            };
            let leadership = tokio::select! {
                won = self.store.campaign(ELECTION, &self.config.replica_id, lease) => won,
                () = keep_lease(self.store.as_ref(), lease) => {
                    tracing::warn!("election lease lost while campaigning");
                    continue;
                }
                () = shutdown.cancelled() => {
                    let _ = self.store.lease_revoke(lease).await;
                    return;
                }
            };
            let leadership = match leadership {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!(error = %e, "campaign failed; retrying");
                    let _ = self.store.lease_revoke(lease).await;
                    if sleep_or_shutdown(self.config.interval, &shutdown).await {
                        return;
                    }
                    continue;
                }
            };
            tracing::info!(replica = %self.config.replica_id, "leading the reconciler");
            metrics::gauge!("envgate_reconcile_leader").set(1.0);
            tokio::select! {
                () = self.lead(&shutdown) => {}
                () = keep_lease(self.store.as_ref(), lease) => {
                    tracing::warn!("leadership lease lost; campaigning again");
                }
            }
            metrics::gauge!("envgate_reconcile_leader").set(0.0);
            self.step_down(leadership).await;
        }
    }

    async fn step_down(&self, leadership: Leadership) {
        let lease = leadership.lease;
        if let Err(e) = self.store.resign(leadership).await {
            tracing::debug!(error = %e, "resign failed; revoking the lease instead");
        }
        let _ = self.store.lease_revoke(lease).await;
    }
}

/// Keeps `lease` alive; returns once it is gone.
async fn keep_lease(store: &dyn Store, lease: i64) {
    loop {
        tokio::time::sleep(LEADER_KEEP_ALIVE).await;
        match store.lease_keep_alive(lease).await {
            Ok(true) => {}
            Ok(false) => return,
            // A blip; if it lasts past the TTL the next answer is `false`.
            Err(e) => tracing::warn!(error = %e, "election lease keep-alive failed"),
        }
    }
}

/// Returns true when shut down.
pub(super) async fn sleep_or_shutdown(duration: Duration, shutdown: &CancellationToken) -> bool {
    tokio::select! {
        () = tokio::time::sleep(duration) => false,
        () = shutdown.cancelled() => true,
    }
}
