//! CloseSession calls that could not be delivered because no control-plane replica answered,
//! kept (a bounded number) and delivered once one does, so a session that ended during an
//! outage still starts its container's idle clock (or removes its ephemeral container). What
//! happens when the queue is full or the proxy exits first: docs/operations.md, "When the
//! control plane is down".

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::controlplane::{ControlPlane, is_unavailable, jittered_backoff};

/// Closes kept at most; past it the oldest is dropped (and counted).
pub const CAPACITY: usize = 10_000;
const RETRY_BASE: Duration = Duration::from_millis(500);
/// Short: during an outage each try is one refused connection, and the first answered one
/// also tells the Fleet stream that a replica is back.
const RETRY_CAP: Duration = Duration::from_secs(2);

/// One CloseSession to deliver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingClose {
    pub session_id: String,
    pub exit_status: i32,
    pub container_unreachable: bool,
    pub connection_id: String,
}

pub struct CloseQueue {
    pending: Mutex<VecDeque<PendingClose>>,
    capacity: usize,
    added: Notify,
}

impl Default for CloseQueue {
    fn default() -> Self {
        Self::new(CAPACITY)
    }
}

impl CloseQueue {
    pub fn new(capacity: usize) -> Self {
        Self {
            pending: Mutex::new(VecDeque::new()),
            capacity: capacity.max(1),
            added: Notify::new(),
        }
    }

    /// Keeps `close` for later; the oldest one goes when the queue is full.
    pub fn push(&self, close: PendingClose) {
        let dropped = {
            let mut pending = self.pending.lock().expect("close queue lock");
            pending.push_back(close);
            let dropped = (pending.len() > self.capacity).then(|| pending.pop_front());
            metrics::gauge!("envgate_proxy_queued_closes").set(pending.len() as f64);
            dropped.flatten()
        };
        if let Some(dropped) = dropped {
            metrics::counter!("envgate_proxy_queued_closes_dropped_total").increment(1);
            tracing::warn!(session_id = %dropped.session_id, capacity = self.capacity, "the queue of undelivered session closes is full; dropped the oldest");
        }
        self.added.notify_one();
    }

    pub fn len(&self) -> usize {
        self.pending.lock().expect("close queue lock").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn front(&self) -> Option<PendingClose> {
        self.pending
            .lock()
            .expect("close queue lock")
            .front()
            .cloned()
    }

    /// Removes `close` if it is still first (it was delivered or given up).
    fn done(&self, close: &PendingClose) {
        let mut pending = self.pending.lock().expect("close queue lock");
        if pending.front() == Some(close) {
            pending.pop_front();
        }
        metrics::gauge!("envgate_proxy_queued_closes").set(pending.len() as f64);
    }

    /// Delivers the queue in order until `shutdown`, waiting with jittered backoff (or until a
    /// replica answers another call) while the control plane is still unavailable. A close
    /// the control plane answers otherwise (delivered, or refused) leaves the queue.
    pub async fn deliver(&self, control_plane: &ControlPlane, shutdown: CancellationToken) {
        let mut failures: u32 = 0;
        loop {
            let Some(close) = self.front() else {
                tokio::select! {
                    () = self.added.notified() => continue,
                    () = shutdown.cancelled() => return,
                }
            };
            let result = tokio::select! {
                result = control_plane.close_session(
                    &close.session_id,
                    close.exit_status,
                    close.container_unreachable,
                    &close.connection_id,
                ) => result,
                () = shutdown.cancelled() => return,
            };
            match result {
                Err(status) if is_unavailable(&status) => {
                    let delay = jittered_backoff(failures, RETRY_BASE, RETRY_CAP);
                    failures = failures.saturating_add(1);
                    tracing::debug!(session_id = %close.session_id, ?delay, "control plane still unavailable; the close waits");
                    tokio::select! {
                        () = tokio::time::sleep(delay) => {}
                        // A replica answered another call: try now.
                        () = control_plane.answered() => {}
                        () = shutdown.cancelled() => return,
                    }
                }
                result => {
                    failures = 0;
                    match result {
                        Ok(()) => {
                            metrics::counter!("envgate_proxy_queued_closes_delivered_total")
                                .increment(1);
                            tracing::info!(session_id = %close.session_id, "delivered a session close kept during the outage");
                        }
                        Err(status) => {
                            tracing::warn!(session_id = %close.session_id, code = ?status.code(), error = %status.message(), "a kept session close was refused; dropped");
                        }
                    }
                    self.done(&close);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(n: u32) -> PendingClose {
        PendingClose {
            session_id: format!("s{n}"),
            exit_status: 0,
            container_unreachable: false,
            connection_id: format!("c{n}"),
        }
    }

    #[test]
    fn the_queue_is_bounded_and_drops_the_oldest() {
        let queue = CloseQueue::new(3);
        for n in 0..5 {
            queue.push(close(n));
        }
        assert_eq!(queue.len(), 3);
        assert_eq!(queue.front(), Some(close(2)));
        // `done` removes only the close it names, and only when it is first.
        queue.done(&close(4));
        assert_eq!(queue.len(), 3);
        queue.done(&close(2));
        assert_eq!(queue.front(), Some(close(3)));
    }

    #[tokio::test]
    async fn closes_wait_while_the_control_plane_is_unreachable_and_stop_on_shutdown() {
        let control_plane = crate::controlplane::unreachable_control_plane();
        let queue = std::sync::Arc::new(CloseQueue::new(10));
        queue.push(close(1));
        let shutdown = CancellationToken::new();
        let delivering = {
            let (queue, shutdown) = (queue.clone(), shutdown.clone());
            tokio::spawn(async move { queue.deliver(&control_plane, shutdown).await })
        };
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(queue.len(), 1, "kept while nothing answers");
        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(15), delivering)
            .await
            .expect("delivery stops on shutdown")
            .unwrap();
        assert_eq!(queue.len(), 1);
    }
}
