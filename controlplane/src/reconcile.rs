//! The reconciler: one elected replica compares placement records with the runtime every
//! interval and converges them — reaps idle containers, forgets records whose container is
//! gone, clears claims left by dead replicas and removes containers no record knows.
//!
//! Each pass is idempotent and every state change is a CAS on the record's `mod_revision`, so
//! an OpenSession racing the reaper either refreshes the record first (the reaper's CAS fails
//! and it moves on) or finds it `removing` and waits for it to go. Home volumes are never
//! touched.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::model::{self, ContainerRecord, ContainerState, EnvironmentRecord, SessionRecord};
use crate::runtime::{Runtime, RuntimeError};
use crate::store::{self, Compare, Leadership, Store, StoreError, TxnOp, Versioned};

/// Fallback idle timeout when the environment was deleted from the catalogue.
const DEFAULT_IDLE_TIMEOUT: i64 = 900;
/// TTL of the leadership lease; a dead leader is replaced within about this long (the
/// issue asks for 10 s, and a pass may have to run after the takeover).
const LEADER_LEASE_TTL: Duration = Duration::from_secs(6);
const LEADER_KEEP_ALIVE: Duration = Duration::from_secs(2);
const ELECTION: &str = "reconciler";

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

/// What one pass did, for logs and tests.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Actions {
    pub reaped_idle: usize,
    pub reaped_ephemeral: usize,
    pub forgot_stopped: usize,
    pub cleared_stale: usize,
    pub removed_orphans: usize,
}

pub struct Reconciler {
    store: Arc<dyn Store>,
    runtime: Arc<dyn Runtime>,
    config: ReconcileConfig,
}

impl Reconciler {
    pub fn new(store: Arc<dyn Store>, runtime: Arc<dyn Runtime>, config: ReconcileConfig) -> Self {
        Self {
            store,
            runtime,
            config,
        }
    }

    /// One pass over all records and containers.
    pub async fn reconcile(&self) -> Result<Actions, ReconcileError> {
        // The runtime is listed before the records are read, so every container in the list
        // that has a record at all has it in the records we read.
        let containers = self.runtime.list_managed(&self.config.instance).await?;
        let records: Vec<(String, Versioned<ContainerRecord>)> =
            store::range_json(self.store.as_ref(), model::CONTAINERS).await?;
        let sessions: Vec<(String, Versioned<SessionRecord>)> =
            store::range_json(self.store.as_ref(), model::SESSIONS).await?;
        let environments: HashMap<String, EnvironmentRecord> =
            store::range_json::<EnvironmentRecord>(self.store.as_ref(), model::ENVIRONMENTS)
                .await?
                .into_iter()
                .map(|(_, v)| (v.value.name.clone(), v.value))
                .collect();
        let mut in_use: HashMap<&str, usize> = HashMap::new();
        for (_, s) in &sessions {
            *in_use.entry(s.value.container_key.as_str()).or_default() += 1;
        }
        let running: HashSet<&str> = containers
            .iter()
            .filter(|c| c.running)
            .map(|c| c.id.as_str())
            .collect();
        let now = model::now();
        let stale_after = secs(self.config.stale_after);
        let mut actions = Actions::default();

        for (key, record) in &records {
            let r = &record.value;
            let result = match r.state {
                ContainerState::Creating | ContainerState::Removing
                    if now - r.state_since >= stale_after =>
                {
                    self.remove(key, record, "stale claim").await.map(|done| {
                        actions.cleared_stale += usize::from(done);
                    })
                }
                ContainerState::Creating | ContainerState::Removing => Ok(()),
                ContainerState::Running if !running.contains(r.container_id.as_str()) => {
                    // Double-check: the container may have been created after the listing.
                    match self.runtime.is_running(&r.container_id).await {
                        Ok(true) => Ok(()),
                        Ok(false) => self.forget_stopped(key, record).await.map(|done| {
                            actions.forgot_stopped += usize::from(done);
                        }),
                        Err(e) => Err(e.into()),
                    }
                }
                ContainerState::Running if in_use.get(key.as_str()).copied().unwrap_or(0) > 0 => {
                    Ok(())
                }
                ContainerState::Running if !r.session_id.is_empty() => {
                    // Its session vanished (the proxy died and its lease expired).
                    self.remove(key, record, "ephemeral session gone")
                        .await
                        .map(|done| {
                            actions.reaped_ephemeral += usize::from(done);
                        })
                }
                ContainerState::Running => {
                    let idle_timeout = environments
                        .get(&r.environment)
                        .map(|e| i64::from(e.idle_timeout_seconds))
                        .unwrap_or(DEFAULT_IDLE_TIMEOUT);
                    if now >= r.last_active_at + idle_timeout {
                        self.remove(key, record, "idle timeout").await.map(|done| {
                            actions.reaped_idle += usize::from(done);
                        })
                    } else {
                        Ok(())
                    }
                }
            };
            if let Err(e) = result {
                metrics::counter!("envgate_reconcile_failures_total").increment(1);
                tracing::warn!(key, error = %e, "reconciling a placement record failed");
            }
        }

        let known: HashSet<&str> = records
            .iter()
            .map(|(_, r)| r.value.container_id.as_str())
            .collect();
        let grace = secs(self.config.orphan_grace);
        for container in &containers {
            if known.contains(container.id.as_str()) || now - container.created_at < grace {
                continue;
            }
            match self.runtime.remove(&container.id).await {
                Ok(()) => {
                    actions.removed_orphans += 1;
                    count("remove_orphan");
                    tracing::info!(container = %container.name, user = %container.user, reason = "no placement record", "container removed");
                }
                Err(e) => {
                    metrics::counter!("envgate_reconcile_failures_total").increment(1);
                    tracing::warn!(container = %container.name, error = %e, "removing an orphan failed");
                }
            }
        }
        if let Err(e) = self.runtime.sweep(&self.config.instance, &containers).await {
            metrics::counter!("envgate_reconcile_failures_total").increment(1);
            tracing::warn!(error = %e, "sweeping per-container host state failed");
        }
        Ok(actions)
    }

    /// Removes the container recorded under `key` now, as the idle reaper would (same claim,
    /// so an OpenSession racing it still gets a live container). False if there was no record
    /// or it changed first.
    pub async fn remove_now(
        &self,
        key: &str,
        reason: &'static str,
    ) -> Result<bool, ReconcileError> {
        match store::get_json::<ContainerRecord>(self.store.as_ref(), key).await? {
            Some(record) => self.remove(key, &record, reason).await,
            None => Ok(false),
        }
    }

    /// CAS the record to `removing`, remove the container, delete the record. Returns false
    /// when the record changed first (an OpenSession won the race).
    async fn remove(
        &self,
        key: &str,
        record: &Versioned<ContainerRecord>,
        reason: &'static str,
    ) -> Result<bool, ReconcileError> {
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
            return Ok(false);
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
        count(reason);
        tracing::info!(container = %r.container_name, id = %r.container_id, user = %r.user, environment = %r.environment, reason, "container removed");
        Ok(true)
    }

    /// The recorded container stopped or vanished: remove what is left of it and delete the
    /// record (if unchanged), so the next OpenSession creates a fresh one.
    async fn forget_stopped(
        &self,
        key: &str,
        record: &Versioned<ContainerRecord>,
    ) -> Result<bool, ReconcileError> {
        self.runtime.remove(&record.value.container_id).await?;
        let done = self
            .store
            .txn(
                vec![Compare::revision(key, record.mod_revision)],
                vec![TxnOp::delete(key)],
            )
            .await?
            .is_some();
        if done {
            count("forget_stopped");
            tracing::info!(container = %record.value.container_name, user = %record.value.user, reason = "container stopped or gone", "placement record deleted");
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
        loop {
            match self.reconcile().await {
                Ok(actions) if actions != Actions::default() => {
                    tracing::info!(?actions, "reconcile pass");
                }
                Ok(_) => {}
                Err(e) => {
                    metrics::counter!("envgate_reconcile_failures_total").increment(1);
                    tracing::warn!(error = %e, "reconcile pass failed; retrying next interval");
                }
            }
            if sleep_or_shutdown(self.config.interval, shutdown).await {
                return;
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

fn count(action: &'static str) {
    metrics::counter!("envgate_reconcile_actions_total", "action" => action).increment(1);
}

fn secs(d: Duration) -> i64 {
    i64::try_from(d.as_secs()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{World, abandoned_claim, alices_busybox, no_progress};
    use crate::placement::PlacementConfig;

    fn config() -> ReconcileConfig {
        ReconcileConfig {
            instance: "default".into(),
            replica_id: "test".into(),
            interval: Duration::from_millis(100),
            stale_after: Duration::from_secs(90),
            orphan_grace: Duration::from_secs(60),
        }
    }

    fn reconciler(world: &World) -> Reconciler {
        Reconciler::new(world.store.clone(), world.runtime.clone(), config())
    }

    async fn age_record(world: &World, key: &str, seconds: i64) {
        let mut record: ContainerRecord = store::get_json(world.store.as_ref(), key)
            .await
            .unwrap()
            .unwrap()
            .value;
        record.last_active_at -= seconds;
        record.state_since -= seconds;
        store::put_json(world.store.as_ref(), key, &record, None)
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn idle_containers_are_reaped_after_their_timeout_but_volumes_stay() {
        let world = World::new().await;
        let placer = world.placer(PlacementConfig::default());
        let reaper = reconciler(&world);
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
        let reaper = reconciler(&world);
        let placement = placer
            .open(world.request("alice", "busybox"), &no_progress)
            .await
            .unwrap();
        world.runtime.lose(&placement.container_id);
        assert_eq!(reaper.reconcile().await.unwrap().forgot_stopped, 1);
        assert!(world.keys("containers/").await.is_empty());

        let placement = placer
            .open(world.request("alice", "busybox"), &no_progress)
            .await
            .unwrap();
        world.runtime.stop(&placement.container_id);
        assert_eq!(reaper.reconcile().await.unwrap().forgot_stopped, 1);
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
        let reaper = reconciler(&world);
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
        let left: HashSet<String> = world
            .runtime
            .containers()
            .into_iter()
            .map(|(id, _)| id)
            .collect();
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
            reconciler(&world)
                .reconcile()
                .await
                .unwrap()
                .reaped_ephemeral,
            1
        );
        assert!(world.runtime.containers().is_empty());
        assert!(world.keys("containers/").await.is_empty());
    }

    /// Whoever wins, the user must never be handed a container the reaper removed.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_open_racing_the_reaper_always_gets_a_live_container() {
        let world = World::new().await;
        let placer = world.placer(PlacementConfig::default());
        let reaper = Arc::new(reconciler(&world));
        let key = model::container_key("alice", "busybox");
        let (mut open_won, mut reaper_won) = (0, 0);
        for round in 0..30u64 {
            let first = placer
                .open(world.request("alice", "busybox"), &no_progress)
                .await
                .unwrap();
            placer.close(&first.session_id).await.unwrap();
            age_record(&world, &key, 10_000).await;
            world
                .runtime
                .set_inspect_delay(Duration::from_millis(round % 4));
            // Alternate head starts so both orders happen, besides close interleavings.
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
            if actions.reaped_idle == 1 {
                reaper_won += 1
            } else {
                open_won += 1
            }
            let live: Vec<String> = world
                .runtime
                .containers()
                .into_iter()
                .map(|(id, _)| id)
                .collect();
            assert!(
                live.contains(&placement.container_id),
                "round {round}: handed a removed container"
            );
            let record: ContainerRecord = store::get_json(world.store.as_ref(), &key)
                .await
                .unwrap()
                .unwrap()
                .value;
            assert_eq!(
                (record.state, record.container_id.as_str()),
                (ContainerState::Running, placement.container_id.as_str())
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
    async fn the_elected_loop_reconciles_until_shutdown() {
        let world = World::new().await;
        let reaper = Arc::new(reconciler(&world));
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
}
