//! Warm pools: started, unassigned containers per environment, so a user with no container
//! gets one in milliseconds instead of waiting for Docker (300 students at 9:00).
//!
//! A warm container is listed under `pool/{env}/{id}` (`model::PoolRecord`). Claiming it is
//! ONE etcd transaction: the pool key is still at the revision we read and the user's
//! placement record is absent → delete the pool key and write the placement record
//! (`creating`, with the container's id). Two opens, on any replicas, can therefore never get
//! the same container, and a container is never both in the pool and someone's. Then the
//! runtime hands it over (`WarmPool::assign`: the user's home is mounted into it, see
//! `envgate_runtime::docker::slots`), and placement commits it as usual.
//!
//! The elected reconciler keeps each pool at its target of containers of the environment's
//! current image: it refills what was claimed (woken by the claim itself, not only on its
//! interval) and drains what no longer fits (target lowered, environment deleted, image
//! changed, container gone) by deleting the pool key with a CAS first, so a concurrent claim
//! wins or the drain does, never both.
//!
//! The target follows demand (`Demand`): the environment's `warm_pool_size`, grown to the
//! claims seen over the last `DEMAND_WINDOW` when logins drain the pool faster than that, at
//! most `DEMAND_GROWTH_LIMIT` times the size. Refills go through the replica's admission
//! control (`admission.rs`) as its lowest class, as fast as the engine allows once no user
//! waits for a creation of their own.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use rand::Rng;
use tokio::sync::Notify;

use crate::admission::{Admission, Class};
use crate::clock::{Clock, SystemClock};
use crate::model::{self, ContainerRecord, ContainerState, EnvironmentRecord, PoolRecord};
use crate::reconcile;
use crate::runtime::{
    AgentEndpoint, ContainerSpec, CreatedContainer, ManagedContainer, Runtime, RuntimeError,
};
use crate::store::{self, Compare, KeyValue, Store, StoreError, TxnOp, Versioned};

/// Claim transactions one open tries before it creates a container instead; each failed one
/// means another open took that entry (the pool is read again after each), so this bounds the
/// wait behind a crowd.
const CLAIM_ATTEMPTS: usize = 16;
/// How long a warm claim counts as demand, and so how long a pool grown by a crowd stays
/// grown once the claims stop: about one class arriving, not a day.
const DEMAND_WINDOW: Duration = Duration::from_secs(300);
/// A pool grows with demand to at most this many times its `warm_pool_size`.
const DEMAND_GROWTH_LIMIT: usize = 4;
/// Pause before watching the pool again after the watch failed.
const REWATCH_AFTER: Duration = Duration::from_secs(1);

/// A warm container taken out of the pool for one open; the placement record at `revision`
/// is `creating` with its id.
#[derive(Debug, Clone)]
pub struct Claimed {
    pub revision: i64,
    pub record: ContainerRecord,
    pub entry: PoolRecord,
}

/// What a claim came to.
#[derive(Debug)]
pub enum Claim {
    Claimed(Box<Claimed>),
    /// The placement record appeared meanwhile (another open made it): look at it again.
    RecordExists,
    /// No warm container could be had: create one.
    Miss,
}

/// Claims and refills warm pools over one store and runtime.
pub struct WarmPools {
    store: Arc<dyn Store>,
    runtime: Arc<dyn Runtime>,
    instance: String,
    admission: Arc<Admission>,
    demand: Arc<Demand>,
    /// Stamps claims and refills (`clock.rs`).
    clock: Arc<dyn Clock>,
}

/// Warm claims per environment over the last `DEMAND_WINDOW`, fleet-wide: the leader's
/// `ClaimWatch` sees every pool key deleted in etcd, on any replica, at no extra cost, and
/// tells the leader's own drains apart. In memory: a new leader starts from the configured
/// sizes. Never locked across an await.
#[derive(Default)]
pub struct Demand {
    state: Mutex<DemandState>,
}

#[derive(Default)]
struct DemandState {
    claims: HashMap<String, VecDeque<Instant>>,
    /// Pool keys this leader is deleting itself (drains), which are not demand.
    draining: HashSet<String>,
}

impl Demand {
    fn lock(&self) -> std::sync::MutexGuard<'_, DemandState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A warm container of `environment` was claimed at `at`.
    pub fn claimed(&self, environment: &str, at: Instant) {
        self.lock()
            .claims
            .entry(environment.to_owned())
            .or_default()
            .push_back(at);
    }

    /// The pool key `key` was deleted at `at`: a claim, unless it is one of our drains.
    /// Returns whether it was a claim.
    fn deleted(&self, key: &str, at: Instant) -> bool {
        if self.lock().draining.remove(key) {
            return false;
        }
        let Some(environment) = key
            .strip_prefix(model::POOL)
            .and_then(|rest| rest.split('/').next())
        else {
            return false;
        };
        self.claimed(environment, at);
        true
    }

    fn draining(&self, key: &str) {
        self.lock().draining.insert(key.to_owned());
    }

    /// How many warm containers `env` should have at `now`: its `warm_pool_size`, or the
    /// claims of the last `DEMAND_WINDOW` when there were more, at most
    /// `DEMAND_GROWTH_LIMIT` times the size.
    pub fn target(&self, env: &EnvironmentRecord, now: Instant) -> usize {
        let size = env.warm_pool_size as usize;
        let mut state = self.lock();
        let Some(claims) = state.claims.get_mut(&env.name) else {
            return size;
        };
        while claims
            .front()
            .is_some_and(|at| now.saturating_duration_since(*at) >= DEMAND_WINDOW)
        {
            claims.pop_front();
        }
        claims.len().clamp(size, size * DEMAND_GROWTH_LIMIT)
    }
}

/// What one refill pass did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PoolActions {
    pub refilled: usize,
    pub drained: usize,
}

/// The container an environment's containers are made from, for `user` (empty: a warm one);
/// placement's cold creation uses it too (with the user's home as the default working
/// directory), so a warm container gets the same image, variables and limits.
pub fn container_spec(
    instance: &str,
    env: &EnvironmentRecord,
    user: &str,
    session: Option<&str>,
) -> ContainerSpec {
    ContainerSpec {
        instance: instance.to_owned(),
        user: user.to_owned(),
        environment: env.name.clone(),
        session: session.map(str::to_owned),
        image: env.image.clone(),
        env: env.env.clone(),
        working_dir: env.working_dir.clone(),
        cpus: env.cpus,
        memory_bytes: env.memory_bytes,
        pids_limit: env.pids_limit,
        gpus: env.gpus,
        kubernetes: env.kubernetes.clone(),
    }
}

impl WarmPools {
    /// Refills take their slots from `admission`, shared with placement's creations.
    pub fn new(
        store: Arc<dyn Store>,
        runtime: Arc<dyn Runtime>,
        instance: &str,
        admission: Arc<Admission>,
    ) -> Self {
        Self {
            store,
            runtime,
            instance: instance.to_owned(),
            admission,
            demand: Arc::default(),
            clock: Arc::new(SystemClock),
        }
    }

    /// Stamps claims and refills by `clock` (tests advance a `ManualClock`).
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// Refills take their slots from `admission` (the replica's, shared with placement).
    pub fn with_admission(mut self, admission: Arc<Admission>) -> Self {
        self.admission = admission;
        self
    }

    /// The claims the pools' targets follow (fed by `ClaimWatch`).
    pub fn demand(&self) -> Arc<Demand> {
        self.demand.clone()
    }

    /// Takes a random warm container of `env` for the placement record `key`, written as
    /// `template` (`creating`) with the container's id, created now (lifetimes count from
    /// the claim). `Miss` when the environment has no pool or it is empty.
    pub async fn claim(
        &self,
        env: &EnvironmentRecord,
        key: &str,
        template: &ContainerRecord,
    ) -> Result<Claim, StoreError> {
        if env.warm_pool_size == 0 || self.runtime.warm_pool().is_err() {
            return Ok(Claim::Miss);
        }
        let mut attempts = 0;
        let mut entries = self.entries(env).await?;
        while attempts < CLAIM_ATTEMPTS && !entries.is_empty() {
            attempts += 1;
            let pick = rand::thread_rng().gen_range(0..entries.len());
            let (pool_key, entry) = entries.swap_remove(pick);
            let now = self.clock.now();
            let record = ContainerRecord {
                container_id: entry.value.container_id.clone(),
                container_name: entry.value.container_name.clone(),
                agent_address: entry.value.agent_address.clone(),
                agent_secret: entry.value.agent_secret.clone(),
                state: ContainerState::Creating,
                state_since: now,
                created_at: now,
                last_active_at: now,
                ..template.clone()
            };
            let taken = self
                .store
                .txn(
                    vec![
                        Compare::revision(&pool_key, entry.mod_revision),
                        Compare::absent(key),
                    ],
                    vec![
                        TxnOp::delete(&pool_key),
                        TxnOp::put_json(key, &record, None),
                    ],
                )
                .await?;
            if let Some(revision) = taken {
                tracing::info!(container = %record.container_name, id = %record.container_id, user = %record.user, environment = %env.name, "warm container claimed");
                return Ok(Claim::Claimed(Box::new(Claimed {
                    revision,
                    record,
                    entry: entry.value,
                })));
            }
            // Either our record appeared or another open took the entry. In a crowd the list
            // read before is mostly taken by now: read what the pool holds now, in the same
            // round trip as the record.
            let (record, now_pooled) = tokio::try_join!(self.store.get(key), self.entries(env))?;
            if record.is_some() {
                return Ok(Claim::RecordExists);
            }
            entries = now_pooled;
        }
        metrics::counter!("envgate_warm_pool_claims_total", "environment" => env.name.clone(), "result" => "miss").increment(1);
        tracing::debug!(environment = %env.name, attempts, "no warm container to claim");
        Ok(Claim::Miss)
    }

    /// Puts an unused claim back: the pool entry returns and the placement record goes, in one
    /// transaction (if the record is still ours). For an open refused after its claim.
    pub async fn give_back(&self, key: &str, claimed: &Claimed) -> Result<(), StoreError> {
        let pool_key = model::pool_key(&claimed.entry.environment, &claimed.entry.container_id);
        let returned = self
            .store
            .txn(
                vec![Compare::revision(key, claimed.revision)],
                vec![
                    TxnOp::delete(key),
                    TxnOp::put_json(&pool_key, &claimed.entry, None),
                ],
            )
            .await?;
        if returned.is_none() {
            tracing::warn!(key, container = %claimed.record.container_id, "a returned warm claim had changed; the reconciler will clean up");
        }
        Ok(())
    }

    /// Hands the claimed container to its user (their home mounted) and returns its
    /// `running` record to commit. On an error the caller removes the container and releases
    /// the claim (as after a failed creation), and creates a container instead.
    pub async fn assign(
        &self,
        env: &EnvironmentRecord,
        claimed: &Claimed,
    ) -> Result<ContainerRecord, RuntimeError> {
        let record = &claimed.record;
        let session = (!record.session_id.is_empty()).then_some(record.session_id.as_str());
        let spec = container_spec(&self.instance, env, &record.user, session);
        let container = CreatedContainer {
            id: record.container_id.clone(),
            name: record.container_name.clone(),
            agent: (!record.agent_address.is_empty()).then(|| AgentEndpoint {
                address: record.agent_address.clone(),
                secret: record.agent_secret.clone(),
            }),
        };
        // A warm container that died since the last pass must not be handed out.
        let handed = match self.runtime.is_running(&container.id).await {
            Ok(true) => match self.runtime.warm_pool() {
                Ok(pool) => pool.assign(&container, &spec).await,
                Err(why) => Err(RuntimeError::Failed(why)),
            },
            Ok(false) => Err(RuntimeError::Failed(format!(
                "warm container {} is not running",
                container.name
            ))),
            Err(e) => Err(e),
        };
        let outcome = if handed.is_ok() { "hit" } else { "miss" };
        metrics::counter!("envgate_warm_pool_claims_total", "environment" => env.name.clone(), "result" => outcome).increment(1);
        let name = handed?;
        let now = self.clock.now();
        Ok(ContainerRecord {
            container_name: name,
            state: ContainerState::Running,
            state_since: now,
            last_active_at: now,
            ..record.clone()
        })
    }

    /// The pool entries of `env` that are of its current image, with their keys.
    async fn entries(
        &self,
        env: &EnvironmentRecord,
    ) -> Result<Vec<(String, Versioned<PoolRecord>)>, StoreError> {
        Ok(decode_all(
            self.store
                .range(&model::environment_pool(&env.name))
                .await?,
        )
        .into_iter()
        .filter(|(_, v)| v.value.image == env.image)
        .collect())
    }

    /// Every pool's container ids, read BEFORE the placement records by the orphan sweep:
    /// a claim moves an id from the pool to a record in one transaction, so reading in this
    /// order sees every id in one or the other.
    pub async fn pooled_ids(&self) -> Result<HashSet<String>, StoreError> {
        Ok(self
            .store
            .range(model::POOL)
            .await?
            .iter()
            .filter_map(|kv| store::decode::<PoolRecord>(kv).ok())
            .map(|v| v.value.container_id)
            .collect())
    }

    /// One refill pass (leader only, idempotent): drains entries that no longer fit, then
    /// creates what each environment's pool lacks of its target (`Demand`). `containers` is
    /// the runtime's listing taken before this pass read anything.
    pub async fn reconcile(
        &self,
        containers: &[ManagedContainer],
        environments: &HashMap<String, EnvironmentRecord>,
    ) -> Result<PoolActions, StoreError> {
        let supported = self.runtime.warm_pool().is_ok();
        let running: HashSet<&str> = containers
            .iter()
            .filter(|c| c.running)
            .map(|c| c.id.as_str())
            .collect();
        let raw = self.store.range(model::POOL).await?;
        let mut actions = PoolActions::default();
        // Unreadable entries: drop the key; the container becomes an orphan and is swept.
        for kv in &raw {
            if store::decode::<PoolRecord>(kv).is_err()
                && self
                    .store
                    .txn(
                        vec![Compare::revision(&kv.key, kv.mod_revision)],
                        vec![TxnOp::delete(&kv.key)],
                    )
                    .await?
                    .is_some()
            {
                tracing::warn!(key = %kv.key, "dropped an unreadable pool record");
            }
        }
        let now = Instant::now();
        let targets: HashMap<&str, usize> = environments
            .values()
            .map(|e| (e.name.as_str(), self.demand.target(e, now)))
            .collect();
        let mut kept: HashMap<String, usize> = HashMap::new();
        let mut seen: HashSet<String> = HashSet::new();
        for (key, entry) in decode_all(raw) {
            let p = &entry.value;
            seen.insert(p.environment.clone());
            let env = environments.get(&p.environment);
            let have = kept.get(&p.environment).copied().unwrap_or(0);
            let reason = match env {
                _ if !supported => Some("warm pools are disabled"),
                None => Some("environment deleted"),
                Some(e) if e.image != p.image => Some("image changed"),
                Some(e) if have >= targets.get(e.name.as_str()).copied().unwrap_or(0) => {
                    Some("pool target lowered")
                }
                Some(_) if !running.contains(p.container_id.as_str()) => {
                    // Double-check: it may have been created after the listing.
                    match self.runtime.is_running(&p.container_id).await {
                        Ok(true) => None,
                        Ok(false) => Some("container gone"),
                        Err(e) => {
                            tracing::warn!(container = %p.container_name, error = %e, "checking a warm container failed");
                            None
                        }
                    }
                }
                Some(_) => None,
            };
            match reason {
                None => *kept.entry(p.environment.clone()).or_default() += 1,
                Some(reason) => {
                    actions.drained += usize::from(self.drain(&key, &entry, reason).await?)
                }
            }
        }
        if supported {
            for env in environments.values() {
                let target = targets.get(env.name.as_str()).copied().unwrap_or(0);
                if target > env.warm_pool_size as usize {
                    tracing::debug!(environment = %env.name, target, size = env.warm_pool_size, "warm pool grown with demand");
                }
                metrics::gauge!("envgate_warm_pool_target", "environment" => env.name.clone())
                    .set(target as f64);
                let missing = target.saturating_sub(kept.get(&env.name).copied().unwrap_or(0));
                if missing > 0 {
                    let made = self.refill(env, missing).await;
                    actions.refilled += made;
                    *kept.entry(env.name.clone()).or_default() += made;
                }
            }
        }
        for name in environments.keys().chain(seen.iter()) {
            let count = kept.get(name).copied().unwrap_or(0);
            metrics::gauge!("envgate_warm_pool_containers", "environment" => name.clone())
                .set(count as f64);
        }
        Ok(actions)
    }

    /// Deletes the pool entry if it is unchanged (a claim may have just taken it: then it is
    /// someone's now and stays), then removes its container.
    async fn drain(
        &self,
        key: &str,
        entry: &Versioned<PoolRecord>,
        reason: &'static str,
    ) -> Result<bool, StoreError> {
        let p = &entry.value;
        // Before the delete, so the claim watch never takes it for a claim.
        self.demand.draining(key);
        let taken = self
            .store
            .txn(
                vec![Compare::revision(key, entry.mod_revision)],
                vec![TxnOp::delete(key)],
            )
            .await;
        if !matches!(taken, Ok(Some(_))) {
            // Not ours to delete (claimed meanwhile) or not deleted: not a drain.
            self.demand.lock().draining.remove(key);
        }
        if taken?.is_none() {
            return Ok(false);
        }
        if let Err(e) = self.runtime.remove(&p.container_id).await {
            // Not in the pool any more and in no record: the orphan sweep removes it.
            reconcile::count_failure();
            tracing::warn!(container = %p.container_name, error = %e, "removing a drained warm container failed");
        }
        reconcile::count("drain_pool");
        tracing::info!(container = %p.container_name, id = %p.container_id, environment = %p.environment, reason, "warm container drained");
        Ok(true)
    }

    /// Creates up to `missing` warm containers of `env`, as many at once as admission control
    /// lets refills have, and lists each in the pool; stops at the first failure (it would
    /// likely repeat). Returns how many were added.
    async fn refill(&self, env: &EnvironmentRecord, missing: usize) -> usize {
        let failed = AtomicBool::new(false);
        let spec = container_spec(&self.instance, env, "", None);
        futures::stream::iter(0..missing)
            .map(|_| self.refill_one(env, &spec, &failed))
            .buffer_unordered(self.admission.limit())
            .filter(|added| futures::future::ready(*added))
            .count()
            .await
    }

    async fn refill_one(
        &self,
        env: &EnvironmentRecord,
        spec: &ContainerSpec,
        failed: &AtomicBool,
    ) -> bool {
        if failed.load(Ordering::Relaxed) {
            return false;
        }
        let slot = self.admission.acquire(Class::Refill, |_| {}).await;
        if failed.load(Ordering::Relaxed) {
            return false;
        }
        let created = match self.runtime.warm_pool() {
            Ok(pool) => pool.create_warm(spec).await,
            Err(why) => Err(RuntimeError::Failed(why)),
        };
        drop(slot);
        let created = match created {
            Ok(created) => created,
            Err(e) => {
                if !failed.swap(true, Ordering::Relaxed) {
                    reconcile::count_failure();
                    tracing::warn!(environment = %env.name, error = %e, "creating a warm container failed; retrying next pass");
                }
                return false;
            }
        };
        let (agent_address, agent_secret) = created
            .agent
            .map(|a| (a.address, a.secret))
            .unwrap_or_default();
        let entry = PoolRecord {
            environment: env.name.clone(),
            image: env.image.clone(),
            container_id: created.id.clone(),
            container_name: created.name.clone(),
            created_at: self.clock.now(),
            agent_address,
            agent_secret,
        };
        let key = model::pool_key(&env.name, &created.id);
        match store::create_if_absent(self.store.as_ref(), &key, &entry).await {
            Ok(Some(_)) => {
                reconcile::count("refill_pool");
                tracing::info!(container = %created.name, id = %created.id, environment = %env.name, reason = "pool below its size", "warm container added");
                true
            }
            other => {
                if let Err(e) = &other {
                    tracing::warn!(key, error = %e, "listing a warm container failed; removing it");
                }
                if let Err(e) = self.runtime.remove(&created.id).await {
                    tracing::warn!(container = %created.id, error = %e, "removing an unlisted warm container failed");
                }
                false
            }
        }
    }
}

/// Decodes pool records, skipping unreadable ones (the reconciler drops them).
fn decode_all(kvs: Vec<KeyValue>) -> Vec<(String, Versioned<PoolRecord>)> {
    kvs.iter()
        .filter_map(|kv| store::decode(kv).ok().map(|v| (kv.key.clone(), v)))
        .collect()
}

/// Wakes the elected reconciler when a warm container leaves a pool (its key is deleted:
/// a claim, on any replica), so the pool refills now rather than at the next interval, and
/// counts the claim in `Demand`. Stops when dropped.
pub struct ClaimWatch {
    notify: Arc<Notify>,
    task: tokio::task::JoinHandle<()>,
}

impl ClaimWatch {
    pub fn start(store: Arc<dyn Store>, demand: Arc<Demand>) -> Self {
        let notify = Arc::new(Notify::new());
        let wake = notify.clone();
        let task = tokio::spawn(async move {
            loop {
                match store.watch(model::POOL, true, 0).await {
                    Ok(mut events) => {
                        while let Some(event) = events.next().await {
                            match event {
                                Ok(e) if e.kind == store::WatchEventKind::Delete => {
                                    if demand.deleted(&e.key, Instant::now()) {
                                        wake.notify_one()
                                    }
                                }
                                Ok(_) => {}
                                Err(e) => {
                                    tracing::debug!(error = %e, "pool watch ended");
                                    break;
                                }
                            }
                        }
                    }
                    Err(e) => tracing::debug!(error = %e, "cannot watch the pools"),
                }
                tokio::time::sleep(REWATCH_AFTER).await;
            }
        });
        Self { notify, task }
    }

    /// Returns once a warm container left a pool since the last call.
    pub async fn claimed(&self) {
        self.notify.notified().await;
    }
}

impl Drop for ClaimWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::catalogue;
    use crate::fixtures::{World, fast, no_progress, reconcile_config};
    use crate::placement::PlacementConfig;
    use crate::reconcile::{ReconcileConfig, Reconciler};

    fn pools(world: &World) -> WarmPools {
        WarmPools::new(
            world.store.clone(),
            world.runtime.clone(),
            "default",
            Admission::new(4),
        )
    }

    async fn set_pool(world: &World, env: &str, size: u32, image: Option<&str>) {
        world
            .update_environment(env, |e| {
                e.warm_pool_size = size;
                if let Some(image) = image {
                    e.image = image.into();
                }
            })
            .await;
    }

    /// One refill pass as the leader runs it: the runtime listed first.
    async fn pass(world: &World) -> PoolActions {
        let containers = world.runtime.list_managed("default").await.unwrap();
        let environments = catalogue::environments_by_name(world.store.as_ref())
            .await
            .unwrap();
        pools(world)
            .reconcile(&containers, &environments)
            .await
            .unwrap()
    }

    async fn pool_entries(world: &World, env: &str) -> Vec<PoolRecord> {
        store::range_json::<PoolRecord>(world.store.as_ref(), &model::environment_pool(env))
            .await
            .unwrap()
            .into_iter()
            .map(|(_, v)| v.value)
            .collect()
    }

    #[tokio::test]
    async fn twenty_new_users_at_once_take_twenty_distinct_warm_containers() {
        let world = World::new().await;
        set_pool(&world, "busybox", 20, None).await;
        assert_eq!(
            pass(&world).await,
            PoolActions {
                refilled: 20,
                drained: 0
            }
        );
        let warm: HashSet<String> = pool_entries(&world, "busybox")
            .await
            .into_iter()
            .map(|p| p.container_id)
            .collect();
        assert_eq!(warm.len(), 20);
        // Two "replicas" over one store: only the claim transaction keeps them apart.
        let requests = (0..20)
            .map(|i| world.request(&format!("student{i}"), "busybox"))
            .collect();
        let opens = world.open_on_two_replicas(fast(), requests);
        let mut got = HashSet::new();
        for (i, open) in opens.into_iter().enumerate() {
            let placement = open.await.unwrap().expect("placed");
            assert_eq!(placement.user, format!("student{i}"));
            assert!(
                warm.contains(&placement.container_id),
                "{} was not in the pool",
                placement.container_id
            );
            assert_eq!(
                placement.container_name,
                format!(
                    "envgate-default-student{i}-busybox-{}",
                    placement.container_name.rsplit('-').next().unwrap()
                )
            );
            got.insert(placement.container_id);
        }
        assert_eq!(got, warm, "20 distinct containers, each claimed once");
        assert!(pool_entries(&world, "busybox").await.is_empty());
        assert_eq!(world.runtime.creates(), 0, "nobody waited for a creation");
        assert_eq!(world.runtime.assigns(), 20);
        for (id, container) in world.runtime.containers() {
            let record = world
                .record(&model::container_key(&container.spec.user, "busybox"))
                .await
                .expect("the claimer's record");
            assert_eq!(record.container_id, id);
            assert_eq!(record.state, ContainerState::Running);
        }
        // The pool refills behind them.
        assert_eq!(pass(&world).await.refilled, 20);
        assert_eq!(pool_entries(&world, "busybox").await.len(), 20);
    }

    #[tokio::test]
    async fn an_empty_pool_or_none_falls_back_to_creating() {
        let world = World::new().await;
        set_pool(&world, "busybox", 2, None).await;
        let placer = world.placer(fast());
        let cold = placer
            .open(world.request("alice", "busybox"), &no_progress)
            .await
            .unwrap();
        assert!(cold.created);
        assert_eq!((world.runtime.creates(), world.runtime.assigns()), (1, 0));

        // Ephemeral environments claim too, and fall back the same way.
        set_pool(&world, "scratch", 1, None).await;
        pass(&world).await;
        let warm = placer
            .open(world.request("carol", "scratch"), &no_progress)
            .await
            .unwrap();
        assert_eq!(world.runtime.assigns(), 1);
        let cold = placer
            .open(world.request("carol", "scratch"), &no_progress)
            .await
            .unwrap();
        assert_ne!(warm.container_id, cold.container_id);
        assert_eq!((world.runtime.creates(), world.runtime.assigns()), (2, 1));
        // The claimed ephemeral container goes with its session, like a created one.
        placer.close(&warm.session_id).await.unwrap();
        assert!(!world.container_ids().contains(&warm.container_id));
    }

    /// Gives `env` a pool of one and fills it; returns the warm container's id.
    async fn one_warm_container(world: &World, env: &str) -> String {
        set_pool(world, env, 1, None).await;
        pass(world).await;
        pool_entries(world, env).await[0].container_id.clone()
    }

    #[tokio::test]
    async fn a_failed_hand_over_removes_the_container_frees_the_claim_and_creates() {
        let world = World::new().await;
        let warm = one_warm_container(&world, "busybox").await;
        world.runtime.fail_next_assigns(1);
        let placement = world
            .placer(fast())
            .open(world.request("alice", "busybox"), &no_progress)
            .await
            .unwrap();
        assert!(placement.created);
        assert_ne!(placement.container_id, warm);
        assert_eq!(world.runtime.creates(), 1);
        assert_eq!(
            world.container_ids().as_slice(),
            std::slice::from_ref(&placement.container_id),
            "the warm one is gone"
        );
        assert!(pool_entries(&world, "busybox").await.is_empty());
        let record = world
            .record(&model::container_key("alice", "busybox"))
            .await
            .unwrap();
        assert_eq!(record.container_id, placement.container_id);
    }

    #[tokio::test]
    async fn a_warm_container_that_died_since_the_last_pass_is_not_handed_out() {
        let world = World::new().await;
        let dead = one_warm_container(&world, "busybox").await;
        world.runtime.stop(&dead);
        let placement = world
            .placer(fast())
            .open(world.request("alice", "busybox"), &no_progress)
            .await
            .unwrap();
        assert_ne!(placement.container_id, dead);
        assert_eq!((world.runtime.creates(), world.runtime.assigns()), (1, 0));
        assert!(!world.container_ids().contains(&dead));
    }

    #[tokio::test]
    async fn a_user_at_the_limit_gives_the_warm_container_back() {
        let world = World::new().await;
        let placer = world.placer(PlacementConfig {
            max_containers_per_user: 1,
            ..fast()
        });
        placer
            .open(world.request("alice", "busybox"), &no_progress)
            .await
            .unwrap();
        set_pool(&world, "scratch", 2, None).await;
        pass(&world).await;
        let before = pool_entries(&world, "scratch").await;
        let err = placer
            .open(world.request("alice", "scratch"), &no_progress)
            .await
            .unwrap_err();
        assert_eq!(
            tonic::Status::from(err).code(),
            tonic::Code::ResourceExhausted
        );
        let mut after = pool_entries(&world, "scratch").await;
        after.sort_by(|a, b| a.container_id.cmp(&b.container_id));
        let mut before = before;
        before.sort_by(|a, b| a.container_id.cmp(&b.container_id));
        assert_eq!(after, before, "both warm containers are still in the pool");
        assert_eq!(world.runtime.containers().len(), 3);
        assert_eq!(
            world.keys("containers/").await,
            ["containers/alice/busybox"]
        );
    }

    #[tokio::test]
    async fn refill_makes_exactly_what_is_missing_and_drain_what_no_longer_fits() {
        let world = World::new().await;
        set_pool(&world, "busybox", 3, None).await;
        assert_eq!(pass(&world).await.refilled, 3);
        assert_eq!(pass(&world).await, PoolActions::default(), "idempotent");
        world
            .placer(fast())
            .open(world.request("alice", "busybox"), &no_progress)
            .await
            .unwrap();
        assert_eq!(
            pass(&world).await,
            PoolActions {
                refilled: 1,
                drained: 0
            }
        );
        assert_eq!(world.runtime.warm_creates(), 4);

        // A container lost behind envgate's back is replaced.
        let lost = pool_entries(&world, "busybox").await[0]
            .container_id
            .clone();
        world.runtime.lose(&lost);
        assert_eq!(
            pass(&world).await,
            PoolActions {
                refilled: 1,
                drained: 1
            }
        );

        set_pool(&world, "busybox", 1, None).await;
        assert_eq!(pass(&world).await.drained, 2);
        assert_eq!(pool_entries(&world, "busybox").await.len(), 1);

        set_pool(&world, "busybox", 1, Some("envgate/busybox:v2")).await;
        assert_eq!(
            pass(&world).await,
            PoolActions {
                refilled: 1,
                drained: 1
            }
        );
        let entries = pool_entries(&world, "busybox").await;
        assert_eq!(entries.len(), 1);
        assert_eq!(entries[0].image, "envgate/busybox:v2");

        set_pool(&world, "busybox", 0, None).await;
        assert_eq!(pass(&world).await.drained, 1);
        // Only alice's claimed container is left.
        assert_eq!(world.runtime.containers().len(), 1);
        assert!(world.keys("pool/").await.is_empty());
    }

    #[tokio::test]
    async fn a_deleted_environment_or_disabled_pools_drain_and_size_zero_starts_nothing() {
        let world = World::new().await;
        for _ in 0..2 {
            assert_eq!(pass(&world).await, PoolActions::default());
        }
        assert_eq!(
            world.runtime.warm_creates(),
            0,
            "no pool, nothing pre-started"
        );

        set_pool(&world, "debian", 2, None).await;
        assert_eq!(pass(&world).await.refilled, 2);
        world
            .store
            .delete(&model::environment_key("debian"))
            .await
            .unwrap();
        assert_eq!(pass(&world).await.drained, 2);

        set_pool(&world, "busybox", 2, None).await;
        assert_eq!(pass(&world).await.refilled, 2);
        world.runtime.set_warm_pools_supported(false);
        assert_eq!(
            pass(&world).await,
            PoolActions {
                refilled: 0,
                drained: 2
            }
        );
        assert!(world.runtime.containers().is_empty());
        let cold = world
            .placer(fast())
            .open(world.request("alice", "busybox"), &no_progress)
            .await
            .unwrap();
        assert!(cold.created);
        assert_eq!(world.runtime.assigns(), 0);
    }

    #[tokio::test]
    async fn the_orphan_sweep_leaves_warm_containers_alone() {
        let world = World::new().await;
        set_pool(&world, "busybox", 2, None).await;
        let reconciler = Reconciler::new(
            world.store.clone(),
            world.runtime.clone(),
            ReconcileConfig {
                orphan_grace: Duration::ZERO,
                ..reconcile_config()
            },
        );
        let first = reconciler.reconcile().await.unwrap();
        assert_eq!(first.refilled_pool, 2);
        let second = reconciler.reconcile().await.unwrap();
        assert_eq!(second.removed_orphans, 0);
        assert_eq!(second.refilled_pool, 0);
        assert_eq!(world.runtime.containers().len(), 2);
    }

    #[test]
    fn demand_grows_the_target_within_bounds_and_fades_after_the_window() {
        let demand = Demand::default();
        let env = EnvironmentRecord {
            name: "busybox".into(),
            warm_pool_size: 10,
            ..EnvironmentRecord::default()
        };
        let start = Instant::now();
        assert_eq!(
            demand.target(&env, start),
            10,
            "no claims: the configured size"
        );
        for _ in 0..25 {
            demand.claimed("busybox", start);
        }
        demand.claimed("other", start);
        assert_eq!(demand.target(&env, start), 25, "a window's claims");
        for _ in 0..100 {
            demand.claimed("busybox", start + Duration::from_secs(60));
        }
        assert_eq!(
            demand.target(&env, start + Duration::from_secs(60)),
            40,
            "at most four times the size"
        );
        assert_eq!(
            demand.target(&env, start + DEMAND_WINDOW + Duration::from_secs(1)),
            40,
            "the older claims left the window, the newer are still 100"
        );
        assert_eq!(
            demand.target(&env, start + DEMAND_WINDOW + Duration::from_secs(61)),
            10,
            "back to the size once the window is past"
        );
        let none = EnvironmentRecord {
            warm_pool_size: 0,
            ..env
        };
        demand.claimed("busybox", start + DEMAND_WINDOW * 2);
        assert_eq!(
            demand.target(&none, start + DEMAND_WINDOW * 2),
            0,
            "no pool stays no pool"
        );
    }

    #[test]
    fn the_leaders_own_drains_are_not_demand() {
        let demand = Demand::default();
        let now = Instant::now();
        let drained = model::pool_key("busybox", "c1");
        demand.draining(&drained);
        assert!(!demand.deleted(&drained, now));
        assert!(demand.deleted(&model::pool_key("busybox", "c2"), now));
        assert!(demand.deleted(&drained, now), "a key is a drain only once");
        let env = EnvironmentRecord {
            name: "busybox".into(),
            warm_pool_size: 1,
            ..EnvironmentRecord::default()
        };
        assert_eq!(demand.target(&env, now), 2);
    }

    #[tokio::test]
    async fn a_pool_drained_faster_than_its_size_refills_to_the_demand() {
        let world = World::new().await;
        let pools = pools(&world);
        set_pool(&world, "busybox", 2, None).await;
        let environments = || async {
            catalogue::environments_by_name(world.store.as_ref())
                .await
                .unwrap()
        };
        let pass = || async {
            let containers = world.runtime.list_managed("default").await.unwrap();
            pools
                .reconcile(&containers, &environments().await)
                .await
                .unwrap()
        };
        assert_eq!(pass().await.refilled, 2);
        // Five claims within the window (as the claim watch reports them) for a pool of 2.
        for _ in 0..5 {
            pools.demand().claimed("busybox", Instant::now());
        }
        assert_eq!(pass().await.refilled, 3, "grown to the demand: 5");
        assert_eq!(pool_entries(&world, "busybox").await.len(), 5);
        for _ in 0..20 {
            pools.demand().claimed("busybox", Instant::now());
        }
        assert_eq!(pass().await.refilled, 3, "at most 4 × 2");
        assert_eq!(pool_entries(&world, "busybox").await.len(), 8);
        assert_eq!(pass().await, PoolActions::default(), "idempotent");
    }

    #[tokio::test]
    async fn a_claim_wakes_the_leader() {
        let world = World::new().await;
        let watch = ClaimWatch::start(world.store.clone(), Arc::default());
        set_pool(&world, "busybox", 1, None).await;
        pass(&world).await;
        // The watch may still be starting: claim until it has seen one.
        let woke = tokio::time::timeout(Duration::from_secs(10), async {
            let placer = world.placer(fast());
            for i in 0.. {
                let claimed = tokio::select! {
                    () = watch.claimed() => return,
                    placed = placer.open(world.request(&format!("u{i}"), "busybox"), &no_progress) => placed,
                };
                claimed.unwrap();
                pass(&world).await;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
        assert!(woke.is_ok(), "no wake-up after claims");
    }
}
