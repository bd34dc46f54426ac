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

mod election;
mod lifetime;
mod removal;
#[cfg(test)]
mod tests;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::admission::{self, Admission};
use crate::catalogue;
use crate::clock::{Clock, SystemClock};
use crate::model::{self, ContainerRecord, ContainerState, ProxyRecord, SessionRecord};
use crate::placement::ClosedSessions;
use crate::pool::{ClaimWatch, WarmPools};
use crate::runtime::{Runtime, RuntimeError};
use crate::store::{self, Compare, Store, StoreError, TxnOp, Versioned};
use crate::throttle::Throttle;

use election::sleep_or_shutdown;
use lifetime::max_lifetime;
pub use lifetime::{end_of_life, idle_timeout, warning_lead};

/// How often the leader deletes expired login-failure records (`throttle.rs`).
const THROTTLE_SWEEP_INTERVAL: Duration = Duration::from_secs(60);
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
    /// Judges idle timeouts, lifetimes and stale claims (`clock.rs`).
    clock: Arc<dyn Clock>,
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
            clock: Arc::new(SystemClock),
        }
    }

    /// Judges time by `clock` (tests advance a `ManualClock`), the pools' claims included.
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.pools = self.pools.with_clock(clock.clone());
        self.clock = clock;
        self
    }

    /// Warm-pool refills take their slots from `admission` (the replica's, shared with
    /// placement), behind every user waiting for a creation.
    pub fn with_admission(mut self, admission: Arc<Admission>) -> Self {
        self.pools = self.pools.with_admission(admission);
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

    /// Unix seconds by the clock this reconciler judges time by.
    pub fn now(&self) -> i64 {
        self.clock.now()
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
        let now = self.clock.now();
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
        let now = self.clock.now();
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
