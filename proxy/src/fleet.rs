//! The proxy's standing `Fleet.Attach` stream: register, heartbeat every few
//! seconds with live counts, obey commands (drain, kill a session, revoke a
//! user's cached tokens), and reconnect with jittered backoff when the
//! stream breaks.

use std::sync::Arc;
use std::time::{Duration, Instant};

use envgate_proto::ops::Readiness;
use envgate_proto::v1::{
    FleetCommand, Heartbeat, ProxyMessage, Register, SessionUpdates, fleet_command, proxy_message,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::Code;

use crate::auth_cache::AuthCache;
use crate::connections::Registry;
use crate::controlplane::{ControlPlane, jittered_backoff};
use crate::drain::Drain;
use crate::error::DEFAULT_KILL_MESSAGE;
use crate::placement_cache::PlacementCache;
use crate::session_updates::SessionLedger;

pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(3);
/// How often the session updates that came meanwhile leave, together (`session_updates.rs`).
const UPDATES_INTERVAL: Duration = Duration::from_millis(200);
/// A stream that lived this long counts as having been up (see `FleetMember::run`).
const STABLE_STREAM: Duration = HEARTBEAT_INTERVAL;
/// How long a proxy whose stream ended stays ready while it re-attaches; well inside the
/// control plane's 10 s proxy lease, so its record never lapses meanwhile.
const REATTACH_GRACE: Duration = Duration::from_secs(5);
const ATTACH_TIMEOUT: Duration = Duration::from_secs(10);
const BACKOFF_BASE: Duration = Duration::from_millis(500);
const BACKOFF_CAP: Duration = Duration::from_secs(30);
/// The backoff's cap while no replica answers at all: each try is one refused connection.
const OUTAGE_PROBE_CAP: Duration = Duration::from_secs(5);

pub struct FleetMember {
    pub control_plane: ControlPlane,
    pub register: Register,
    pub registry: Registry,
    pub auth_cache: Arc<AuthCache>,
    pub placements: Arc<PlacementCache>,
    pub ledger: Arc<SessionLedger>,
    pub drain: Drain,
    pub readiness: Readiness,
}

impl FleetMember {
    /// Keeps the stream up until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut failures: u32 = 0;
        // Set when a stream that was up ended; cleared by the next registration.
        let mut detached_since: Option<Instant> = None;
        let mut registered_once = false;
        loop {
            let mut attached_at = None;
            let result = self.attach_once(&shutdown, &mut attached_at).await;
            // No replica answered (rather than one refusing the stream).
            let unanswered = match &result {
                Ok(()) => false,
                Err(status) => matches!(status.code(), Code::Unavailable | Code::DeadlineExceeded),
            };
            if let Err(status) = result {
                tracing::warn!(code = ?status.code(), error = %status.message(), "fleet stream failed");
            }
            registered_once |= attached_at.is_some();
            if shutdown.is_cancelled() {
                self.readiness.set(false);
                return;
            }
            // A stream that was registered and then ended (typically its control-plane
            // replica died) is re-attached to any replica, and the proxy stays ready for
            // REATTACH_GRACE meanwhile: its record and lease outlive the stream by the control
            // plane's lease TTL, so placement goes on working. Turning unready at once took
            // every proxy attached to that replica out of HAProxy together (e2e_ha), also
            // when the replica died a moment after the proxy attached. The grace counts from
            // the first end after a stable stream, so a stream that keeps ending at once
            // still turns the proxy unready after it.
            if let Some(at) = attached_at {
                let stable = at.elapsed() >= STABLE_STREAM;
                if stable || detached_since.is_none() {
                    detached_since = Some(Instant::now());
                }
                if stable {
                    failures = 0;
                    continue;
                }
            }
            failures = failures.saturating_add(1);
            let delay = if detached_since.is_some_and(|at| at.elapsed() < REATTACH_GRACE) {
                // The balancer may still pick the dead replica for a moment: retry soon.
                jittered_backoff(0, BACKOFF_BASE / 4, BACKOFF_CAP)
            } else {
                // A proxy that was registered stays ready while no replica answers: it still
                // serves users whose containers run, from its caches, and every proxy would
                // lose the control plane together, leaving the balancer none
                // (docs/decisions.md). One refused, or never registered, is not ready.
                let outage = registered_once && unanswered;
                if !outage {
                    self.readiness.set(false);
                }
                // During an outage the stream is also the probe that notices a replica is
                // back, so it is tried more often than a stream that is refused.
                let cap = if outage {
                    OUTAGE_PROBE_CAP
                } else {
                    BACKOFF_CAP
                };
                jittered_backoff(failures, BACKOFF_BASE, cap)
            };
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                // A replica answered another call: it is back, re-attach now rather than
                // after the rest of a backoff of up to BACKOFF_CAP.
                () = self.control_plane.answered() => {}
                () = shutdown.cancelled() => return,
            }
        }
    }

    /// One stream's life; `attached_at` is set when it registered. `Ok` when it ended cleanly.
    async fn attach_once(
        &self,
        shutdown: &CancellationToken,
        attached_at: &mut Option<Instant>,
    ) -> Result<(), tonic::Status> {
        let (tx, rx) = mpsc::channel(8);
        let register = ProxyMessage {
            message: Some(proxy_message::Message::Register(self.register.clone())),
        };
        tx.send(register)
            .await
            .map_err(|_| tonic::Status::internal("fleet sender closed"))?;
        let mut client = self.control_plane.fleet_client();
        let attached = tokio::time::timeout(ATTACH_TIMEOUT, client.attach(ReceiverStream::new(rx)))
            .await
            .map_err(|_| tonic::Status::deadline_exceeded("Fleet.Attach did not answer"))??;
        let mut commands = attached.into_inner();
        tracing::info!(proxy_id = %self.control_plane.proxy_id(), "registered with the control plane");
        *attached_at = Some(Instant::now());
        self.control_plane.mark_answered();
        self.readiness.set(!self.drain.is_draining());
        let mut ticker = tokio::time::interval(HEARTBEAT_INTERVAL);
        ticker.tick().await;
        // A new stream gets every update the last one's replica did not acknowledge.
        let mut sent = 0;
        let mut updates = tokio::time::interval(UPDATES_INTERVAL);
        updates.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = updates.tick() => {
                    self.ledger.report_due(Instant::now());
                    let batch = self.ledger.after(sent);
                    if let Some(last) = batch.last() {
                        sent = last.sequence;
                        let message = ProxyMessage {
                            message: Some(proxy_message::Message::SessionUpdates(SessionUpdates { updates: batch })),
                        };
                        if tx.send(message).await.is_err() {
                            return Ok(());
                        }
                    }
                }
                _ = ticker.tick() => {
                    let (connections, sessions) = self.registry.counts();
                    let heartbeat = Heartbeat {
                        sessions: u32::try_from(sessions).unwrap_or(u32::MAX),
                        connections: u32::try_from(connections).unwrap_or(u32::MAX),
                        draining: self.drain.is_draining(),
                    };
                    let message = ProxyMessage { message: Some(proxy_message::Message::Heartbeat(heartbeat)) };
                    if tx.send(message).await.is_err() {
                        return Ok(());
                    }
                    self.readiness.set(!self.drain.is_draining());
                }
                command = commands.message() => match command? {
                    Some(command) => self.obey(command),
                    None => return Ok(()),
                },
                () = shutdown.cancelled() => return Ok(()),
            }
        }
    }

    fn obey(&self, command: FleetCommand) {
        match command.command {
            Some(fleet_command::Command::Drain(drain)) => {
                tracing::info!(grace_seconds = drain.grace_seconds, "drain requested");
                self.drain
                    .begin(Duration::from_secs(u64::from(drain.grace_seconds)));
            }
            Some(fleet_command::Command::KillSession(kill)) => {
                let message = if kill.message.trim().is_empty() {
                    DEFAULT_KILL_MESSAGE
                } else {
                    kill.message.trim()
                };
                let found = self.registry.kill_session(&kill.session_id, message);
                tracing::info!(session_id = %kill.session_id, found, "kill session requested");
            }
            Some(fleet_command::Command::Notice(notice)) => {
                let found = self
                    .registry
                    .notify_session(&notice.session_id, notice.message.trim());
                tracing::info!(session_id = %notice.session_id, found, "notice requested");
            }
            Some(fleet_command::Command::RevokeUser(revoke)) => {
                let dropped = self.auth_cache.revoke_user(&revoke.user);
                let placements = self.placements.forget_user(&revoke.user);
                tracing::info!(user = %revoke.user, dropped, placements, "revoked cached tokens and placements");
            }
            Some(fleet_command::Command::SessionUpdatesApplied(applied)) => {
                self.ledger.applied(applied.through_sequence);
            }
            None => tracing::debug!("empty fleet command"),
        }
    }
}
