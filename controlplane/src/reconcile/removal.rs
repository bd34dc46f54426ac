//! Container removal: claim the record, end its sessions with a message and give the proxies
//! a moment to show it, remove the container, delete the record; and forgetting a record whose
//! container is gone.

use std::sync::Mutex;
use std::time::Duration;

use super::{Action, ReconcileError, Reconciler, count};
use crate::fleet;
use crate::model::{self, CommandRecord, ContainerRecord, ContainerState};
use crate::store::{self, Compare, TxnOp, Versioned};

/// How long removing an over-age container waits for the proxies to end its sessions, so
/// users read why before the container goes; a dead proxy's sessions are not waited for longer.
const SESSION_END_GRACE: Duration = Duration::from_secs(3);

impl Reconciler {
    /// Removes the container recorded under `key` now, as the idle reaper would: the record is
    /// claimed first (so an OpenSession racing it still gets a live container, and no session
    /// attaches to the doomed one), then its sessions are ended with `message` (if given) and
    /// given a moment to show it. `None` if there was no record or it changed first; else how
    /// many sessions were ended. Counted as `remove_requested`; `reason` goes to the log.
    pub async fn remove_now(
        &self,
        key: &str,
        reason: &'static str,
        message: Option<&str>,
    ) -> Result<Option<u32>, ReconcileError> {
        self.settle_closes().await;
        match store::get_json::<ContainerRecord>(self.store.as_ref(), key).await? {
            Some(record) => {
                self.remove(key, &record, Action::RemoveRequested, reason, message)
                    .await
            }
            None => Ok(None),
        }
    }

    /// CAS the record to `removing`, end its sessions with `end_sessions` as their message
    /// (if given), remove the container, delete the record. `None` when the record changed
    /// first (an OpenSession won the race); else how many sessions were ended.
    pub(super) async fn remove(
        &self,
        key: &str,
        record: &Versioned<ContainerRecord>,
        action: Action,
        reason: &str,
        end_sessions: Option<&str>,
    ) -> Result<Option<u32>, ReconcileError> {
        let r = &record.value;
        let removing = ContainerRecord {
            state: ContainerState::Removing,
            state_since: self.clock.now(),
            owner: self.config.replica_id.clone(),
            ..r.clone()
        };
        let claim = self
            .store
            .txn(
                vec![Compare::revision(key, record.mod_revision)],
                vec![TxnOp::put_json(key, &removing, None)],
            )
            .await?;
        let Some(revision) = claim else {
            tracing::debug!(key, reason, "record changed; not removing");
            return Ok(None);
        };
        let ended = match end_sessions {
            Some(message) => self.end_sessions(key, message).await,
            None => 0,
        };
        if !r.container_id.is_empty() {
            self.runtime.remove(&r.container_id).await?;
        }
        self.store
            .txn(
                vec![Compare::revision(key, revision)],
                vec![TxnOp::delete(key)],
            )
            .await?;
        count(action.label());
        tracing::info!(action = action.label(), container = %r.container_name, id = %r.container_id, user = %r.user, environment = %r.environment, sessions_ended = ended, reason, "container removed");
        Ok(Some(ended))
    }

    /// Asks the proxies to end every session on `key` with `message`, then waits (at most
    /// `SESSION_END_GRACE`) until they have, so the message reaches the user before the
    /// container's removal cuts the session short; returns how many were asked. Best effort:
    /// the removal goes on anyway.
    async fn end_sessions(&self, key: &str, message: &str) -> u32 {
        let asked = Mutex::new(Vec::new());
        let sent = fleet::command_container_sessions(self.store.as_ref(), key, |session_id| {
            asked
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(model::session_key(&session_id));
            CommandRecord::KillSession {
                session_id,
                message: message.to_owned(),
            }
        })
        .await;
        let sent = match sent {
            Ok(sent) => sent,
            Err(e) => {
                tracing::warn!(key, error = %e, "asking proxies to end the sessions failed; removing anyway");
                return 0;
            }
        };
        let mut open = asked.into_inner().unwrap_or_else(|p| p.into_inner());
        let deadline = tokio::time::Instant::now() + SESSION_END_GRACE;
        while !open.is_empty() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let mut still = Vec::with_capacity(open.len());
            for session in open {
                if !matches!(self.store.get(&session).await, Ok(None)) {
                    still.push(session);
                }
            }
            open = still;
        }
        if !open.is_empty() {
            tracing::info!(
                key,
                sessions = open.len(),
                "sessions still open after the grace; removing anyway"
            );
        }
        sent
    }

    /// The recorded container stopped or vanished: remove what is left of it and delete the
    /// record (if unchanged), so the next OpenSession creates a fresh one.
    pub(super) async fn forget_missing(
        &self,
        key: &str,
        record: &Versioned<ContainerRecord>,
    ) -> Result<bool, ReconcileError> {
        let r = &record.value;
        self.runtime.remove(&r.container_id).await?;
        let done = self
            .store
            .txn(
                vec![Compare::revision(key, record.mod_revision)],
                vec![TxnOp::delete(key)],
            )
            .await?
            .is_some();
        if done {
            let action = Action::ForgetMissing;
            count(action.label());
            tracing::info!(action = action.label(), container = %r.container_name, id = %r.container_id, user = %r.user, environment = %r.environment, reason = "container stopped or gone", "placement record deleted");
        }
        Ok(done)
    }
}
