//! The reconciler: one elected replica compares placement records with the runtime every
//! interval and converges them — reaps idle containers and containers past their maximum
//! lifetime (warning their sessions first), forgets records whose container is gone, clears
//! claims left by dead replicas, removes containers no record knows, and notices sessions that
//! vanished with their proxy's lease.
//!
//! Each pass is idempotent and every state change is a CAS on the record's `mod_revision`, so
//! an OpenSession racing the reaper either refreshes the record first (the reaper's CAS fails
//! and it moves on) or finds it `removing` and waits for it to go. Home volumes are never
//! touched. Every action is counted in `envgate_reconcile_actions_total{action}` under the
//! stable labels of [`Action::label`] and logged with its container, user, environment and
//! reason.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::admission::{self, Admission};
use crate::catalogue;
use crate::fleet;
use crate::model::{
    self, CommandRecord, ContainerRecord, ContainerState, EnvironmentRecord, ProxyRecord,
    SessionRecord,
};
use crate::placement::ClosedSessions;
use crate::pool::{ClaimWatch, WarmPools};
use crate::runtime::{Runtime, RuntimeError};
use crate::store::{self, Compare, Leadership, Store, StoreError, TxnOp, Versioned};
use crate::throttle::Throttle;

/// Fallback idle timeout when the environment was deleted from the catalogue: the default an
/// environment gets when it sets none.
const DEFAULT_IDLE_TIMEOUT: i64 = catalogue::DEFAULT_IDLE_TIMEOUT_SECONDS as i64;
/// TTL of the leadership lease; a dead leader is replaced within about this long (the
/// issue asks for 10 s, and a pass may have to run after the takeover).
const LEADER_LEASE_TTL: Duration = Duration::from_secs(6);
const LEADER_KEEP_ALIVE: Duration = Duration::from_secs(2);
const ELECTION: &str = "reconciler";
/// How often the leader deletes expired login-failure records (`throttle.rs`).
const THROTTLE_SWEEP_INTERVAL: Duration = Duration::from_secs(60);
/// The lifetime warning comes at most this long before the end (a quarter of the lifetime
/// when that is shorter, see [`warning_lead`]).
const MAX_WARNING_LEAD: i64 = 300;
/// How long removing an over-age container waits for the proxies to end its sessions, so
/// users read why before the container goes; a dead proxy's sessions are not waited for longer.
const SESSION_END_GRACE: Duration = Duration::from_secs(3);
/// Over-age containers removed concurrently within one pass (each may wait `SESSION_END_GRACE`).
const LIFETIME_REMOVALS_AT_ONCE: usize = 16;

#[derive(Debug, Clone)]
pub struct ReconcileConfig {
    pub instance: String,
    pub replica_id: String,
    pub interval: Duration,
    /// A `creating`/`removing` record older than this belongs to a dead replica.
    pub stale_after: Duration,
    /// A container with no record is removed only when older than this, so one being
    /// created right now (its record not yet written) is left alone.
    pub orphan_grace: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
}

/// What the reconciler does. The labels are a stable interface: dashboards and alerts
/// select on them (docs/environments.md, "Lifecycle").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// A persistent container idle for its environment's idle timeout.
    ReapIdle,
    /// A container past its environment's maximum lifetime; its sessions are ended.
    ReapLifetime,
    /// The sessions of a container near its maximum lifetime are told so, once.
    WarnLifetime,
    /// An ephemeral container whose session vanished without closing it.
    RemoveEphemeral,
    /// A record whose container stopped or is gone.
    ForgetMissing,
    /// A `creating`/`removing` claim left by a replica that died.
    ClearStale,
    /// A labelled container no record knows.
    RemoveOrphan,
    /// A session that vanished with its proxy's lease (not closed by CloseSession).
    ReleaseSessions,
    /// A removal asked for outside the passes (admin DeleteContainer, a user's `stop`).
    RemoveRequested,
}

impl Action {
    pub fn label(self) -> &'static str {
        match self {
            Action::ReapIdle => "reap_idle",
            Action::ReapLifetime => "reap_lifetime",
            Action::WarnLifetime => "warn_lifetime",
            Action::RemoveEphemeral => "remove_ephemeral",
            Action::ForgetMissing => "forget_missing",
            Action::ClearStale => "clear_stale",
            Action::RemoveOrphan => "remove_orphan",
            Action::ReleaseSessions => "release_sessions",
            Action::RemoveRequested => "remove_requested",
        }
    }
}

/// What one pass did, for logs and tests.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Actions {
    pub reaped_idle: usize,
    pub reaped_lifetime: usize,
    pub warned_lifetime: usize,
    pub removed_ephemeral: usize,
    pub forgot_missing: usize,
    pub cleared_stale: usize,
    pub removed_orphans: usize,
    pub released_sessions: usize,
    /// Warm containers added to and removed from pools (`pool.rs`).
    pub refilled_pool: usize,
    pub drained_pool: usize,
}

impl Actions {
    fn add(&mut self, action: Action) {
        let field = match action {
            Action::ReapIdle => &mut self.reaped_idle,
            Action::ReapLifetime => &mut self.reaped_lifetime,
            Action::WarnLifetime => &mut self.warned_lifetime,
            Action::RemoveEphemeral => &mut self.removed_ephemeral,
            Action::ForgetMissing => &mut self.forgot_missing,
            Action::ClearStale => &mut self.cleared_stale,
            Action::RemoveOrphan => &mut self.removed_orphans,
            Action::ReleaseSessions => &mut self.released_sessions,
            Action::RemoveRequested => return,
        };
        *field += 1;
    }
}

/// What the previous pass of this leadership saw: a session gone since, whose proxy's lease
/// is gone too, vanished with the lease instead of being closed.
struct Seen {
    sessions: HashMap<String, SessionRecord>,
    /// Proxy id → the lease its record (and its sessions) lived on.
    proxy_leases: HashMap<String, i64>,
}

pub struct Reconciler {
    store: Arc<dyn Store>,
    runtime: Arc<dyn Runtime>,
    config: ReconcileConfig,
    /// Never held across an await.
    seen: Mutex<Option<Seen>>,
    pools: WarmPools,
    /// Failure counts whose stale records the leader deletes now and then.
    throttle: Option<Arc<Throttle>>,
    /// Sessions closed on this replica whose records wait to be deleted (`placement`).
    closed: Option<Arc<ClosedSessions>>,
}

impl Reconciler {
    pub fn new(store: Arc<dyn Store>, runtime: Arc<dyn Runtime>, config: ReconcileConfig) -> Self {
        Self {
            pools: WarmPools::new(
                store.clone(),
                runtime.clone(),
                &config.instance,
                Admission::new(admission::default_limit()),
            ),
            store,
            runtime,
            config,
            seen: Mutex::new(None),
            throttle: None,
            closed: None,
        }
    }

    /// Warm-pool refills take their slots from `admission` (the replica's, shared with
    /// placement), behind every user waiting for a creation.
    pub fn with_admission(mut self, admission: Arc<Admission>) -> Self {
        self.pools = WarmPools::new(
            self.store.clone(),
            self.runtime.clone(),
            &self.config.instance,
            admission,
        );
        self
    }

    /// Also sweeps `throttle`'s expired records while leading.
    pub fn with_throttle(mut self, throttle: Arc<Throttle>) -> Self {
        self.throttle = Some(throttle);
        self
    }

    /// Settles this replica's closed sessions before reading sessions (see `settle_closes`).
    pub fn with_closed_sessions(mut self, closed: Arc<ClosedSessions>) -> Self {
        self.closed = Some(closed);
        self
    }

    /// Deletes the records of sessions that closed on this replica and wait for a ride, so
    /// what reads sessions next (a pass, `stop`, `status`, `ListSessions`) sees them closed.
    pub async fn settle_closes(&self) {
        if let Some(closed) = &self.closed {
            closed.settle(self.store.as_ref()).await;
        }
    }

    fn seen(&self) -> std::sync::MutexGuard<'_, Option<Seen>> {
        self.seen.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// One pass over all records and containers.
    pub async fn reconcile(&self) -> Result<Actions, ReconcileError> {
        self.settle_closes().await;
        // The runtime is listed before the records are read, so every container in the list
        // that has a record at all has it in the records we read.
        let containers = self.runtime.list_managed(&self.config.instance).await?;
        // Before the records: a claim moves a container from a pool to a record in one
        // transaction, so reading in this order sees every warm or claimed id.
        let pooled = self.pools.pooled_ids().await?;
        let mut records: Vec<(String, Versioned<ContainerRecord>)> =
            store::range_json(self.store.as_ref(), model::CONTAINERS).await?;
        let sessions: Vec<(String, Versioned<SessionRecord>)> =
            store::range_json(self.store.as_ref(), model::SESSIONS).await?;
        let proxy_leases: HashMap<String, i64> =
            store::range_json::<ProxyRecord>(self.store.as_ref(), model::PROXIES)
                .await?
                .into_iter()
                .map(|(_, v)| (v.value.id, v.value.lease_id))
                .collect();
        let environments = catalogue::environments_by_name(self.store.as_ref()).await?;
        let mut in_use: HashMap<String, usize> = HashMap::new();
        for (_, s) in &sessions {
            *in_use.entry(s.value.container_key.clone()).or_default() += 1;
        }
        let running: HashSet<&str> = containers
            .iter()
            .filter(|c| c.running)
            .map(|c| c.id.as_str())
            .collect();
        let now = model::now();
        let stale_after = secs(self.config.stale_after);
        let mut actions = Actions::default();

        self.release_sessions(sessions, proxy_leases, &in_use, &mut records, &mut actions)
            .await;

        let mut over_age = Vec::new();
        for (key, record) in &records {
            let r = &record.value;
            let env = environments.get(&r.environment);
            let max_lifetime = max_lifetime(env);
            let end_of_life = end_of_life(r, env);
            let attached = in_use.get(key).copied().unwrap_or(0);
            let result = match r.state {
                ContainerState::Creating | ContainerState::Removing
                    if now - r.state_since >= stale_after =>
                {
                    let reason = "claim left by a replica that died";
                    self.remove(key, record, Action::ClearStale, reason, None)
                        .await
                        .map(|ended| ended.map(|_| Action::ClearStale))
                }
                ContainerState::Creating | ContainerState::Removing => Ok(None),
                ContainerState::Running if !running.contains(r.container_id.as_str()) => {
                    // Double-check: the container may have been created after the listing.
                    match self.runtime.is_running(&r.container_id).await {
                        Ok(true) => Ok(None),
                        Ok(false) => self
                            .forget_missing(key, record)
                            .await
                            .map(|done| done.then_some(Action::ForgetMissing)),
                        Err(e) => Err(e.into()),
                    }
                }
                ContainerState::Running if end_of_life.is_some_and(|end| now >= end) => {
                    over_age.push((key.clone(), record.clone(), max_lifetime));
                    Ok(None)
                }
                ContainerState::Running if attached > 0 => match end_of_life {
                    Some(end)
                        if r.lifetime_warned_at == 0 && now >= end - warning_lead(max_lifetime) =>
                    {
                        self.warn_lifetime(key, record, end)
                            .await
                            .map(|done| done.then_some(Action::WarnLifetime))
                    }
                    _ => Ok(None),
                },
                ContainerState::Running if !r.session_id.is_empty() => {
                    // Its session vanished (the proxy died and its lease expired).
                    let reason = "its session vanished";
                    self.remove(key, record, Action::RemoveEphemeral, reason, None)
                        .await
                        .map(|ended| ended.map(|_| Action::RemoveEphemeral))
                }
                ContainerState::Running => {
                    if now >= r.last_active_at + idle_timeout(env) {
                        self.remove(key, record, Action::ReapIdle, "idle timeout", None)
                            .await
                            .map(|ended| ended.map(|_| Action::ReapIdle))
                    } else {
                        Ok(None)
                    }
                }
            };
            match result {
                Ok(Some(action)) => actions.add(action),
                Ok(None) => {}
                Err(e) => {
                    count_failure();
                    tracing::warn!(key, error = %e, "reconciling a placement record failed");
                }
            }
        }

        // Over-age containers a few at a time: each waits for its sessions to be ended.
        let reaped: Vec<(String, Result<bool, ReconcileError>)> = futures::stream::iter(over_age)
            .map(|(key, record, max_lifetime)| self.reap_over_age(key, record, max_lifetime))
            .buffer_unordered(LIFETIME_REMOVALS_AT_ONCE)
            .collect()
            .await;
        for (key, removed) in reaped {
            match removed {
                Ok(true) => actions.add(Action::ReapLifetime),
                Ok(false) => {}
                Err(e) => {
                    count_failure();
                    tracing::warn!(key, error = %e, "removing an over-age container failed");
                }
            }
        }

        let known: HashSet<&str> = records
            .iter()
            .map(|(_, r)| r.value.container_id.as_str())
            .chain(pooled.iter().map(String::as_str))
            .collect();
        let grace = secs(self.config.orphan_grace);
        for container in &containers {
            if known.contains(container.id.as_str()) || now - container.created_at < grace {
                continue;
            }
            match self.runtime.remove(&container.id).await {
                Ok(()) => {
                    actions.add(Action::RemoveOrphan);
                    count(Action::RemoveOrphan.label());
                    tracing::info!(action = Action::RemoveOrphan.label(), container = %container.name, id = %container.id, user = %container.user, environment = %container.environment, reason = "no placement record", "container removed");
                }
                Err(e) => {
                    count_failure();
                    tracing::warn!(container = %container.name, error = %e, "removing an orphan failed");
                }
            }
        }
        if let Err(e) = self.runtime.sweep(&self.config.instance, &containers).await {
            count_failure();
            tracing::warn!(error = %e, "sweeping per-container host state failed");
        }
        let pool = self.pools.reconcile(&containers, &environments).await?;
        actions.refilled_pool += pool.refilled;
        actions.drained_pool += pool.drained;
        Ok(actions)
    }

    /// Sessions end by CloseSession, which starts their container's idle clock. A proxy that
    /// dies takes its sessions with its lease instead, and nothing would start the clock: the
    /// idle timeout would count from the session's start. So: a session the previous pass saw
    /// that is gone now, while its proxy's lease is gone too (the record expired, or a
    /// restarted proxy revoked its predecessor's lease), is counted and logged once, and its
    /// persistent container, if no session is left on it, starts its idle clock now. The
    /// first pass of a leadership has nothing to compare with and releases nothing.
    async fn release_sessions(
        &self,
        sessions: Vec<(String, Versioned<SessionRecord>)>,
        proxy_leases: HashMap<String, i64>,
        in_use: &HashMap<String, usize>,
        records: &mut [(String, Versioned<ContainerRecord>)],
        actions: &mut Actions,
    ) {
        let sessions: HashMap<String, SessionRecord> = sessions
            .into_iter()
            .map(|(_, v)| (v.value.id.clone(), v.value))
            .collect();
        let Some(previous) = self.seen().replace(Seen {
            sessions: sessions.clone(),
            proxy_leases: proxy_leases.clone(),
        }) else {
            return;
        };
        let mut idle_from_now = HashSet::new();
        for (id, session) in previous.sessions {
            let proxy = session.proxy_id.as_str();
            let lease_gone = match (previous.proxy_leases.get(proxy), proxy_leases.get(proxy)) {
                (_, None) => true,
                (Some(before), Some(now)) => before != now,
                (None, Some(_)) => false,
            };
            if sessions.contains_key(&id) || !lease_gone {
                continue;
            }
            actions.add(Action::ReleaseSessions);
            count(Action::ReleaseSessions.label());
            tracing::info!(action = Action::ReleaseSessions.label(), proxy, session = %id, container = %session.container_id, user = %session.user, environment = %session.environment, reason = "its proxy's lease expired", "session released");
            if in_use.get(&session.container_key).copied().unwrap_or(0) == 0 {
                idle_from_now.insert(session.container_key);
            }
        }
        let now = model::now();
        for (key, record) in records.iter_mut() {
            // Ephemeral containers go in this pass anyway.
            if !idle_from_now.contains(key.as_str())
                || record.value.state != ContainerState::Running
                || !record.value.session_id.is_empty()
            {
                continue;
            }
            let touched = ContainerRecord {
                last_active_at: now,
                ..record.value.clone()
            };
            let written = self
                .store
                .txn(
                    vec![Compare::revision(key.as_str(), record.mod_revision)],
                    vec![TxnOp::put_json(key.as_str(), &touched, None)],
                )
                .await;
            match written {
                Ok(Some(mod_revision)) => {
                    *record = Versioned {
                        value: touched,
                        mod_revision,
                    }
                }
                // Whoever changed it (an open, the reaper) has its own idea of its activity.
                Ok(None) => {}
                Err(e) => {
                    count_failure();
                    tracing::warn!(key = %key, error = %e, "starting the idle clock of a released container failed");
                }
            }
        }
    }

    /// Ends the sessions of a container past its maximum lifetime, telling them why, and
    /// removes it.
    async fn reap_over_age(
        &self,
        key: String,
        record: Versioned<ContainerRecord>,
        max_lifetime: i64,
    ) -> (String, Result<bool, ReconcileError>) {
        let message = end_message(&record.value.environment, max_lifetime);
        let removed = self
            .remove(
                &key,
                &record,
                Action::ReapLifetime,
                "max lifetime",
                Some(&message),
            )
            .await
            .map(|ended| ended.is_some());
        (key, removed)
    }

    /// Marks the record warned (CAS, so at most once whoever leads), then shows every session
    /// on it a notice. A failure after the mark loses the warning rather than risk a second.
    async fn warn_lifetime(
        &self,
        key: &str,
        record: &Versioned<ContainerRecord>,
        end_of_life: i64,
    ) -> Result<bool, ReconcileError> {
        let r = &record.value;
        let now = model::now();
        let warned = ContainerRecord {
            lifetime_warned_at: now,
            ..r.clone()
        };
        let marked = self
            .store
            .txn(
                vec![Compare::revision(key, record.mod_revision)],
                vec![TxnOp::put_json(key, &warned, None)],
            )
            .await?;
        if marked.is_none() {
            tracing::debug!(key, "record changed; warning next pass");
            return Ok(false);
        }
        let message = warning_message(&r.environment, end_of_life - now, end_of_life);
        let told = fleet::command_container_sessions(self.store.as_ref(), key, |session_id| {
            CommandRecord::Notice {
                session_id,
                message: message.clone(),
            }
        })
        .await?;
        count(Action::WarnLifetime.label());
        tracing::info!(action = Action::WarnLifetime.label(), container = %r.container_name, id = %r.container_id, user = %r.user, environment = %r.environment, sessions = told, ends_at = end_of_life, reason = "max lifetime near", "sessions warned");
        Ok(true)
    }

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
    async fn remove(
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
            state_since: model::now(),
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
    async fn forget_missing(
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

    async fn lead(&self, shutdown: &CancellationToken) {
        // What a previous leadership saw may be long out of date.
        *self.seen() = None;
        // A claim wakes the next pass early, so its pool refills at once.
        let claims = ClaimWatch::start(self.store.clone(), self.pools.demand());
        let mut next_sweep = tokio::time::Instant::now();
        loop {
            if let Some(throttle) = &self.throttle
                && tokio::time::Instant::now() >= next_sweep
            {
                next_sweep += THROTTLE_SWEEP_INTERVAL;
                match throttle.sweep().await {
                    Ok(0) => {}
                    Ok(removed) => tracing::info!(removed, "expired login-failure records removed"),
                    Err(e) => tracing::warn!(error = %e, "sweeping login-failure records failed"),
                }
            }
            match self.reconcile().await {
                Ok(actions) if actions != Actions::default() => {
                    tracing::info!(?actions, "reconcile pass");
                }
                Ok(_) => {}
                Err(e) => {
                    count_failure();
                    tracing::warn!(error = %e, "reconcile pass failed; retrying next interval");
                }
            }
            tokio::select! {
                stop = sleep_or_shutdown(self.config.interval, shutdown) => if stop {
                    return;
                },
                () = claims.claimed() => {}
            }
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
async fn sleep_or_shutdown(duration: Duration, shutdown: &CancellationToken) -> bool {
    tokio::select! {
        () = tokio::time::sleep(duration) => false,
        () = shutdown.cancelled() => true,
    }
}

/// Counts one action of the reconciler (its passes and the pools it keeps) under its label.
pub(crate) fn count(action: &'static str) {
    metrics::counter!("envgate_reconcile_actions_total", "action" => action).increment(1);
}

/// Counts one thing the reconciler failed to do (it tries again next pass).
pub(crate) fn count_failure() {
    metrics::counter!("envgate_reconcile_failures_total").increment(1);
}

fn secs(d: Duration) -> i64 {
    i64::try_from(d.as_secs()).unwrap_or(i64::MAX)
}

/// The idle timeout the reaper applies to a container of `env` (`None`: the environment was
/// deleted from the catalogue).
pub fn idle_timeout(env: Option<&EnvironmentRecord>) -> i64 {
    env.map_or(DEFAULT_IDLE_TIMEOUT, |e| i64::from(e.idle_timeout_seconds))
}

/// `env`'s maximum lifetime in seconds; 0: none (also for a deleted environment).
fn max_lifetime(env: Option<&EnvironmentRecord>) -> i64 {
    env.map_or(0, |e| i64::from(e.max_lifetime_seconds))
}

/// When `record`'s container reaches its environment's maximum lifetime (counted from its
/// creation, or its claim from a warm pool); `None` when there is no maximum.
pub fn end_of_life(record: &ContainerRecord, env: Option<&EnvironmentRecord>) -> Option<i64> {
    let max_lifetime = max_lifetime(env);
    (max_lifetime > 0).then_some(record.created_at + max_lifetime)
}

/// How long before the end of its maximum lifetime a container's sessions are warned:
/// `min(300 s, max_lifetime / 4)`, so a short lifetime is not warned about from its start.
pub fn warning_lead(max_lifetime: i64) -> i64 {
    (max_lifetime / 4).min(MAX_WARNING_LEAD)
}

/// The notice shown `warning_lead` before the end, e.g. `environment "busybox" reaches its
/// maximum lifetime in 4 min (at 17:42 UTC); save your work — your home directory is kept`.
fn warning_message(environment: &str, left: i64, end_of_life: i64) -> String {
    let left = left.max(0);
    format!(
        "environment \"{environment}\" reaches its maximum lifetime in {} (at {} UTC); save your work — your home directory is kept",
        span(left),
        clock(end_of_life, left < 120),
    )
}

/// Why an over-age container's sessions end. ASCII only: OpenSSH prints it again in its
/// "Received disconnect" line, escaping anything else.
fn end_message(environment: &str, max_lifetime: i64) -> String {
    format!(
        "environment \"{environment}\" reached its maximum lifetime ({}); the session ends and its container is removed; your home directory is kept, connect again for a fresh container",
        span(max_lifetime)
    )
}

/// `45 s`, `4 min`, `2 h`, `1 h 30 min`.
fn span(seconds: i64) -> String {
    if seconds < 120 {
        return format!("{seconds} s");
    }
    let minutes = (seconds + 30) / 60;
    match (minutes / 60, minutes % 60) {
        (0, m) => format!("{m} min"),
        (h, 0) => format!("{h} h"),
        (h, m) => format!("{h} h {m} min"),
    }
}

/// The UTC time of day of a Unix second, `17:42` or `17:42:09`.
fn clock(unix: i64, with_seconds: bool) -> String {
    let day = unix.rem_euclid(86_400);
    let (h, m, s) = (day / 3600, day % 3600 / 60, day % 60);
    if with_seconds {
        format!("{h:02}:{m:02}:{s:02}")
    } else {
        format!("{h:02}:{m:02}")
    }
}

#[cfg(test)]
mod tests {
    use envgate_proto::v1::Placement;

    use super::*;
    use crate::fixtures::{World, abandoned_claim, alices_busybox, no_progress};
    use crate::placement::{PlacementConfig, Placer};

    async fn age_record(world: &World, key: &str, seconds: i64) {
        world
            .edit_record(key, |r| {
                r.last_active_at -= seconds;
                r.state_since -= seconds;
            })
            .await;
    }

    /// Thirty rounds of an open of alice's busybox racing a reconcile pass. Each round she
    /// opens and closes it, `make_due` (given its key and the round) makes it due for
    /// removal, then the open and the pass race with head starts alternating so both orders
    /// happen (besides close interleavings). After each, her record must be `running` with
    /// the container she got, and `check` sees the round and what she got; `removed` reads
    /// from the pass's actions whether it removed the container. Both must win some rounds.
    async fn race_the_reaper(
        world: &World,
        make_due: impl AsyncFn(&str, u64),
        removed: impl Fn(&Actions) -> usize,
        check: impl Fn(u64, &Placement),
    ) {
        let placer = world.placer(PlacementConfig::default());
        let reaper = Arc::new(world.reconciler());
        let key = model::container_key("alice", "busybox");
        let (mut open_won, mut reaper_won) = (0, 0);
        for round in 0..30u64 {
            let first = placer
                .open(world.request("alice", "busybox"), &no_progress)
                .await
                .unwrap();
            placer.close(&first.session_id).await.unwrap();
            make_due(&key, round).await;
            let (open_delay, reap_delay) = match round % 3 {
                0 => (0, 0),
                1 => (0, 20),
                _ => (20, 0),
            };
            let reaping = {
                let reaper = reaper.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(reap_delay)).await;
                    reaper.reconcile().await
                })
            };
            tokio::time::sleep(Duration::from_millis(open_delay)).await;
            let placement = placer
                .open(world.request("alice", "busybox"), &no_progress)
                .await
                .unwrap();
            let actions = reaping.await.unwrap().unwrap();
            if removed(&actions) == 1 {
                reaper_won += 1
            } else {
                open_won += 1
            }
            check(round, &placement);
            let record = world.record(&key).await.unwrap();
            assert_eq!(
                (record.state, record.container_id.as_str()),
                (ContainerState::Running, placement.container_id.as_str()),
                "round {round}"
            );
            placer.close(&placement.session_id).await.unwrap();
        }
        println!("open won {open_won} rounds, reaper won {reaper_won}");
        assert!(
            open_won > 0 && reaper_won > 0,
            "both orders must be exercised"
        );
    }

    #[tokio::test]
    async fn idle_containers_are_reaped_after_their_timeout_but_volumes_stay() {
        let world = World::new().await;
        // The aged record stands for a session open for hours: its close starts the clock.
        let placer = world.placer(PlacementConfig {
            touch_after: Duration::ZERO,
            ..PlacementConfig::default()
        });
        let reaper = world.reconciler();
        let key = model::container_key("alice", "busybox");
        let placement = placer
            .open(world.request("alice", "busybox"), &no_progress)
            .await
            .unwrap();

        age_record(&world, &key, 10_000).await;
        assert_eq!(
            reaper.reconcile().await.unwrap(),
            Actions::default(),
            "a session is attached"
        );

        placer.close(&placement.session_id).await.unwrap();
        assert_eq!(
            reaper.reconcile().await.unwrap(),
            Actions::default(),
            "idle for 0 of 900 s"
        );

        age_record(&world, &key, 899).await;
        assert_eq!(
            reaper.reconcile().await.unwrap(),
            Actions::default(),
            "idle for 899 of 900 s"
        );
        age_record(&world, &key, 1).await;
        let actions = reaper.reconcile().await.unwrap();
        assert_eq!(
            actions,
            Actions {
                reaped_idle: 1,
                ..Actions::default()
            }
        );
        assert!(world.runtime.containers().is_empty());
        assert!(world.keys("containers/").await.is_empty());
        assert_eq!(world.runtime.volumes(), ["envgate-default-home-alice"]);
    }

    #[tokio::test]
    async fn records_without_containers_and_stale_claims_are_cleared() {
        let world = World::new().await;
        let placer = world.placer(PlacementConfig::default());
        let reaper = world.reconciler();
        let placement = placer
            .open(world.request("alice", "busybox"), &no_progress)
            .await
            .unwrap();
        world.runtime.lose(&placement.container_id);
        assert_eq!(reaper.reconcile().await.unwrap().forgot_missing, 1);
        assert!(world.keys("containers/").await.is_empty());

        let placement = placer
            .open(world.request("alice", "busybox"), &no_progress)
            .await
            .unwrap();
        world.runtime.stop(&placement.container_id);
        assert_eq!(reaper.reconcile().await.unwrap().forgot_missing, 1);
        assert!(
            world.runtime.containers().is_empty(),
            "the stopped container is removed"
        );
        assert!(world.keys("containers/").await.is_empty());

        let stale = abandoned_claim("carol", "debian", "dead");
        let key = model::container_key("carol", "debian");
        store::put_json(world.store.as_ref(), &key, &stale, None)
            .await
            .unwrap();
        let fresh = ContainerRecord {
            state_since: model::now(),
            ..stale
        };
        let fresh_key = model::container_key("carol", "busybox");
        store::put_json(world.store.as_ref(), &fresh_key, &fresh, None)
            .await
            .unwrap();
        assert_eq!(reaper.reconcile().await.unwrap().cleared_stale, 1);
        assert_eq!(world.keys("containers/").await, [fresh_key]);
    }

    #[tokio::test]
    async fn orphans_of_this_instance_are_removed_after_a_grace_period() {
        let world = World::new().await;
        let reaper = world.reconciler();
        let old = world
            .runtime
            .insert_unknown(alices_busybox("default"), model::now() - 3600);
        let young = world
            .runtime
            .insert_unknown(alices_busybox("default"), model::now());
        let foreign = world
            .runtime
            .insert_unknown(alices_busybox("other-fleet"), model::now() - 3600);
        assert_eq!(reaper.reconcile().await.unwrap().removed_orphans, 1);
        let left: HashSet<String> = world.container_ids().into_iter().collect();
        assert_eq!(left, HashSet::from([young, foreign]));
        assert!(!left.contains(&old));
    }

    #[tokio::test]
    async fn ephemeral_containers_whose_session_vanished_are_removed() {
        let world = World::new().await;
        let placer = world.placer(PlacementConfig::default());
        placer
            .open(world.request("alice", "scratch"), &no_progress)
            .await
            .unwrap();
        // The proxy dies: its lease expires and takes the session with it.
        world.store.lease_revoke(world.lease).await.unwrap();
        assert!(world.keys("sessions/").await.is_empty());
        assert_eq!(
            world
                .reconciler()
                .reconcile()
                .await
                .unwrap()
                .removed_ephemeral,
            1
        );
        assert!(world.runtime.containers().is_empty());
        assert!(world.keys("containers/").await.is_empty());
    }

    /// Whoever wins, the user must never be handed a container the reaper removed.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_open_racing_the_reaper_always_gets_a_live_container() {
        let world = World::new().await;
        race_the_reaper(
            &world,
            async |key, round| {
                age_record(&world, key, 10_000).await;
                world
                    .runtime
                    .set_inspect_delay(Duration::from_millis(round % 4));
            },
            |actions| actions.reaped_idle,
            |round, placement| {
                assert!(
                    world.container_ids().contains(&placement.container_id),
                    "round {round}: handed a removed container"
                );
            },
        )
        .await;
    }

    #[tokio::test]
    async fn the_elected_loop_reconciles_until_shutdown() {
        let world = World::new().await;
        let reaper = Arc::new(world.reconciler());
        let shutdown = CancellationToken::new();
        let running = tokio::spawn(reaper.clone().run(shutdown.clone()));
        let spec = alices_busybox("default");
        world.runtime.insert_unknown(spec, model::now() - 3600);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while !world.runtime.containers().is_empty() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the leader never reconciled"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(5), running)
            .await
            .unwrap()
            .unwrap();
        assert!(
            world.keys("election/").await.is_empty(),
            "leadership released on shutdown"
        );
    }

    /// (session id, message) of each KillSession the test's "proxy" obeyed.
    type Obeyed = Arc<Mutex<Vec<(String, String)>>>;

    /// Plays the proxies' part in KillSession: closes every session it is told to end, as a
    /// proxy does once it has shown the message; returns the commands it obeyed.
    fn obey_kills(world: &World, placer: Arc<Placer>) -> (tokio::task::JoinHandle<()>, Obeyed) {
        let store = world.store.clone();
        let obeyed = Arc::new(Mutex::new(Vec::new()));
        let log = obeyed.clone();
        let task = tokio::spawn(async move {
            loop {
                let commands: Vec<(String, Versioned<CommandRecord>)> =
                    store::range_json(store.as_ref(), model::COMMANDS)
                        .await
                        .unwrap();
                for (key, command) in commands {
                    if let CommandRecord::KillSession {
                        session_id,
                        message,
                    } = command.value
                    {
                        store.delete(&key).await.unwrap();
                        placer.close(&session_id).await.unwrap();
                        log.lock().unwrap().push((session_id, message));
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
        (task, obeyed)
    }

    async fn age_created(world: &World, key: &str, seconds: i64) {
        world.edit_record(key, |r| r.created_at -= seconds).await;
    }

    #[test]
    fn the_warning_comes_a_quarter_of_the_lifetime_before_the_end_but_at_most_5_minutes() {
        assert_eq!(warning_lead(12), 3);
        assert_eq!(warning_lead(1000), 250);
        assert_eq!(warning_lead(1200), 300);
        assert_eq!(warning_lead(8 * 3600), 300);
        let end = 17 * 3600 + 42 * 60 + 9;
        assert_eq!(
            warning_message("busybox", 240, end),
            "environment \"busybox\" reaches its maximum lifetime in 4 min (at 17:42 UTC); save your work — your home directory is kept"
        );
        assert_eq!(
            warning_message("short", 3, end),
            "environment \"short\" reaches its maximum lifetime in 3 s (at 17:42:09 UTC); save your work — your home directory is kept"
        );
        assert_eq!(span(7200), "2 h");
        assert_eq!(span(5400), "1 h 30 min");
    }

    #[tokio::test]
    async fn the_lifetime_warning_is_sent_once_to_each_session_and_never_without_sessions() {
        let world = World::new().await;
        world
            .update_environment("busybox", |e| e.max_lifetime_seconds = 1000)
            .await;
        let placer = world.placer(PlacementConfig::default());
        let reaper = world.reconciler();
        let a = placer
            .open(world.request("alice", "busybox"), &no_progress)
            .await
            .unwrap();
        let b = placer
            .open(world.request("alice", "busybox"), &no_progress)
            .await
            .unwrap();
        let carols = placer
            .open(world.request("carol", "busybox"), &no_progress)
            .await
            .unwrap();
        placer.close(&carols.session_id).await.unwrap();
        let alice = model::container_key("alice", "busybox");
        let carol = model::container_key("carol", "busybox");

        // The warning is due from 1000 - 250 = 750 s of age (a second of slack for the time
        // the test itself takes).
        for key in [&alice, &carol] {
            age_created(&world, key, 748).await;
        }
        assert_eq!(reaper.reconcile().await.unwrap(), Actions::default());
        assert!(world.commands().await.is_empty());

        for key in [&alice, &carol] {
            age_created(&world, key, 2).await;
        }
        assert_eq!(
            reaper.reconcile().await.unwrap(),
            Actions {
                warned_lifetime: 1,
                ..Actions::default()
            }
        );
        assert_eq!(
            reaper.reconcile().await.unwrap(),
            Actions::default(),
            "a repeated pass warns no one again"
        );
        assert_eq!(
            world.reconciler().reconcile().await.unwrap(),
            Actions::default(),
            "nor does a new leader"
        );

        let mut notices: Vec<(String, String)> = world
            .commands()
            .await
            .into_iter()
            .map(|(_, command)| match command {
                CommandRecord::Notice {
                    session_id,
                    message,
                } => (session_id, message),
                other => panic!("not a notice: {other:?}"),
            })
            .collect();
        notices.sort();
        let mut expected = vec![a.session_id.clone(), b.session_id.clone()];
        expected.sort();
        assert_eq!(
            notices.iter().map(|(s, _)| s.clone()).collect::<Vec<_>>(),
            expected,
            "one notice per session of alice's container, none for carol's"
        );
        for (_, message) in &notices {
            assert!(
                message.starts_with(
                    "environment \"busybox\" reaches its maximum lifetime in 4 min (at "
                ) && message.ends_with(" UTC); save your work — your home directory is kept"),
                "{message}"
            );
        }
        let warned = world.record(&alice).await.unwrap().lifetime_warned_at;
        assert!(warned >= model::now() - 1, "{warned}");
        assert_eq!(world.record(&carol).await.unwrap().lifetime_warned_at, 0);
        assert_eq!(world.runtime.containers().len(), 2, "nothing removed yet");
    }

    #[tokio::test]
    async fn at_the_maximum_lifetime_sessions_are_ended_and_the_container_removed() {
        let world = World::new().await;
        for env in ["busybox", "scratch"] {
            world
                .update_environment(env, |e| e.max_lifetime_seconds = 1000)
                .await;
        }
        let placer = world.placer(PlacementConfig::default());
        let reaper = world.reconciler();
        let mut sessions = Vec::new();
        for env in ["busybox", "busybox", "scratch"] {
            let placement = placer
                .open(world.request("alice", env), &no_progress)
                .await
                .unwrap();
            sessions.push(placement.session_id);
        }
        let (proxy, obeyed) = obey_kills(&world, placer.clone());
        let keys = world.keys("containers/").await;
        assert_eq!(keys.len(), 2, "{keys:?}");

        for key in &keys {
            age_created(&world, key, 999).await;
        }
        let before = reaper.reconcile().await.unwrap();
        assert_eq!(before.reaped_lifetime, 0, "{before:?}");
        assert_eq!(world.runtime.containers().len(), 2);
        assert!(obeyed.lock().unwrap().is_empty());

        for key in &keys {
            age_created(&world, key, 1).await;
        }
        assert_eq!(
            reaper.reconcile().await.unwrap(),
            Actions {
                reaped_lifetime: 2,
                ..Actions::default()
            }
        );
        proxy.abort();
        assert!(world.runtime.containers().is_empty());
        assert!(world.keys("containers/").await.is_empty());
        assert!(world.keys("sessions/").await.is_empty());
        assert_eq!(world.runtime.volumes(), ["envgate-default-home-alice"]);
        let mut ended: Vec<(String, String)> = obeyed.lock().unwrap().clone();
        ended.sort();
        sessions.sort();
        assert_eq!(
            ended.iter().map(|(s, _)| s.clone()).collect::<Vec<_>>(),
            sessions
        );
        for (_, message) in &ended {
            assert!(
                message.contains("reached its maximum lifetime (17 min)")
                    && message.contains("your home directory is kept"),
                "{message}"
            );
        }
        assert_eq!(
            reaper.reconcile().await.unwrap(),
            Actions::default(),
            "nothing is removed twice"
        );
    }

    #[tokio::test]
    async fn an_open_never_attaches_to_a_container_past_its_maximum_lifetime() {
        let world = World::new().await;
        world
            .update_environment("busybox", |e| e.max_lifetime_seconds = 1000)
            .await;
        let placer = world.placer(PlacementConfig::default());
        let key = model::container_key("alice", "busybox");
        let first = placer
            .open(world.request("alice", "busybox"), &no_progress)
            .await
            .unwrap();
        placer.close(&first.session_id).await.unwrap();

        // A second short of its end (less one for the time the test itself takes).
        age_created(&world, &key, 998).await;
        let young = placer
            .open(world.request("alice", "busybox"), &no_progress)
            .await
            .unwrap();
        assert_eq!(
            (young.container_id.as_str(), young.created),
            (first.container_id.as_str(), false)
        );
        placer.close(&young.session_id).await.unwrap();

        age_created(&world, &key, 2).await;
        let fresh = placer
            .open(world.request("alice", "busybox"), &no_progress)
            .await
            .unwrap();
        assert!(fresh.created);
        assert_ne!(fresh.container_id, first.container_id);
        assert_eq!(
            world.container_ids().as_slice(),
            std::slice::from_ref(&fresh.container_id),
            "the old one is removed"
        );
        let record = world.record(&key).await.unwrap();
        assert_eq!(record.container_id, fresh.container_id);
        assert!(record.created_at >= model::now() - 1);
    }

    /// Whoever wins, the user must never be handed the over-age container being removed.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_open_racing_the_lifetime_removal_always_gets_a_live_container() {
        let world = World::new().await;
        world
            .update_environment("busybox", |e| e.max_lifetime_seconds = 1000)
            .await;
        race_the_reaper(
            &world,
            async |key, _| age_created(&world, key, 10_000).await,
            |actions| actions.reaped_lifetime,
            |round, placement| {
                assert!(
                    placement.created,
                    "round {round}: attached to an over-age container"
                );
                assert_eq!(
                    world.container_ids().as_slice(),
                    std::slice::from_ref(&placement.container_id),
                    "round {round}: handed a removed container, or the old one is left"
                );
            },
        )
        .await;
    }

    #[tokio::test]
    async fn sessions_released_with_their_proxys_lease_are_counted_once_and_start_the_idle_clock() {
        let world = World::new().await;
        let placer = world.placer(PlacementConfig::default());
        let reaper = world.reconciler();
        let key = model::container_key("alice", "busybox");
        placer
            .open(world.request("alice", "busybox"), &no_progress)
            .await
            .unwrap();
        let closed = placer
            .open(world.request("alice", "busybox"), &no_progress)
            .await
            .unwrap();
        // Its sessions have run for hours.
        world
            .edit_record(&key, |r| r.last_active_at -= 10_000)
            .await;
        assert_eq!(reaper.reconcile().await.unwrap(), Actions::default());

        placer.close(&closed.session_id).await.unwrap();
        world
            .edit_record(&key, |r| r.last_active_at -= 10_000)
            .await;
        assert_eq!(
            reaper.reconcile().await.unwrap(),
            Actions::default(),
            "a session closed by its proxy is not a released one"
        );

        // The proxy dies: its lease expires and takes the other session with it.
        world.store.lease_revoke(world.lease).await.unwrap();
        assert_eq!(
            reaper.reconcile().await.unwrap(),
            Actions {
                released_sessions: 1,
                ..Actions::default()
            },
            "released, and idle for 0 s rather than 10 000"
        );
        let record = world.record(&key).await.unwrap();
        assert!(record.last_active_at >= model::now() - 1);
        assert_eq!(world.runtime.containers().len(), 1);
        assert_eq!(
            reaper.reconcile().await.unwrap(),
            Actions::default(),
            "counted once"
        );
        assert_eq!(
            world.reconciler().reconcile().await.unwrap(),
            Actions::default(),
            "a new leader neither counts it again nor reaps"
        );
    }
}
