//! Placement: which container serves a session (the Sessions service).
//!
//! The placement record `containers/{user}/{env}` is the single source of truth. It moves
//! `creating → running → removing → (deleted)` only through compare-and-swap on its
//! `mod_revision`, so concurrent opens on any number of replicas agree on one container, and an
//! open racing the idle reaper either refreshes the record first (the reaper's CAS then fails)
//! or sees it `removing` and waits for it to go.
//!
//! A new container is made only with a slot from the replica's admission control
//! (`admission.rs`), taken BEFORE the `creating` claim is written: a user waiting in line holds
//! no record that could go stale meanwhile, and once let in looks again (a warm container may
//! have come, or another open of theirs made the container).
//!
//! A warm login costs etcd one write: the transaction that refreshes the record and writes
//! the session under the proxy's lease. Its close is not a write of its own: a session that
//! lived less than [`PlacementConfig::touch_after`] (the record's `last_active_at` from its
//! open is then near enough) has its record deleted inside the next open's transaction
//! (`ClosedSessions`), or by one transaction for every close of a quiet moment. A longer
//! session's close refreshes `last_active_at` too, in a transaction of its own. Opens that
//! commit while the previous one is on its way to etcd share one write (`store::group`): at
//! most one write per warm login, fewer when logins come together.
//!
//! A proxy that reports its sessions (`OpenSessionRequest.reports_sessions`) gets a warm
//! login placed with no write at all when its container's idle clock was started recently
//! and has far to run ([`Placer::may_leave_unrecorded`]): the session is recorded only if it
//! lasts [`REPORT_AFTER`], by the proxy's report on its Fleet stream ([`Placer::apply_updates`]),
//! and its end comes the same way. docs/decisions.md, "Unrecorded warm logins".

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use envgate_proto::audit::{AuditLog, Event};
use envgate_proto::ops::record_phase;
use envgate_proto::token::Claims;
use envgate_proto::v1::sessions_server::Sessions;
use envgate_proto::v1::{
    Account, CloseSessionRequest, CloseSessionResponse, OpenSessionEvent, OpenSessionRequest,
    Placement, Progress, SessionEnd, SessionUpdate, open_session_event,
};
use futures::{Stream, StreamExt};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use tracing::Instrument;

use crate::admission::{self, Admission, Class, Permit};
use crate::auth::Authenticator;
use crate::catalogue;
use crate::clock::{Clock, SystemClock};
use crate::error::{CallerError, PlacementError};
use crate::guard::{self, ProxyIdentity};
use crate::locks::KeyedLocks;
use crate::model::{
    self, ContainerRecord, ContainerState, EnvironmentRecord, Mode, ProxyRecord, SessionKind,
    SessionRecord, UserRecord,
};
use crate::pool::{self, Claim, WarmPools};
use crate::reconcile;
use crate::runtime::{self, ContainerSpec, Runtime, RuntimeKind};
use crate::store::{self, Compare, GroupCommit, Store, StoreError, TxnOp, Versioned};
use crate::uids;
use envgate_runtime::SessionTarget;

#[derive(Debug, Clone)]
pub struct PlacementConfig {
    /// Written as a label on every container, so fleets sharing an engine stay apart.
    pub instance: String,
    /// Identifies this replica in records it claims, for logs.
    pub replica_id: String,
    /// Upper bound on one OpenSession, waiting included, except the wait in line for a
    /// creation slot (bounded by the creations ahead, each bounded itself).
    pub deadline: Duration,
    /// A `creating` or `removing` record older than this is left over from a replica that
    /// died mid-way, and may be taken over.
    pub stale_after: Duration,
    /// Placement records (containers, any state and mode) one user may have before an open
    /// that needs a new container is refused; 0 = unlimited. Reuse is never refused.
    pub max_containers_per_user: usize,
    /// A persistent session that lived longer than this (or than a tenth of its environment's
    /// idle timeout, if less) refreshes its container's `last_active_at` when it closes; a
    /// shorter one leaves the time of its open, and its close rides on another write.
    pub touch_after: Duration,
}

/// How long a session placed unrecorded runs before its proxy reports it (and it is recorded).
pub const REPORT_AFTER: Duration = Duration::from_secs(2);
/// A session is left unrecorded only while its container's idle timeout has at least this
/// long to run: ample for the proxy's report to arrive (after [`REPORT_AFTER`], or after a
/// re-attach when a replica died) before the reaper could see the container idle.
const UNRECORDED_SLACK_SECONDS: i64 = 60;

/// `--max-containers-per-user` unless configured otherwise.
pub const DEFAULT_MAX_CONTAINERS_PER_USER: usize = 5;

impl Default for PlacementConfig {
    fn default() -> Self {
        Self {
            instance: "default".into(),
            replica_id: "controlplane".into(),
            deadline: Duration::from_secs(120),
            stale_after: Duration::from_secs(90),
            max_containers_per_user: DEFAULT_MAX_CONTAINERS_PER_USER,
            touch_after: Duration::from_secs(60),
        }
    }
}

pub struct OpenRequest {
    pub token: String,
    pub environment: String,
    pub proxy_id: String,
    pub client_address: String,
    pub connection_id: String,
    pub kind: SessionKind,
    /// Cancelled when the caller went away: an open still waiting in line for a creation slot
    /// leaves the line, and no container is made for it.
    pub caller_gone: CancellationToken,
    /// Set once the open had to wait in line for a creation slot (see `Progress`).
    pub waited_in_line: Arc<AtomicBool>,
    /// The proxy reports sessions placed unrecorded (`OpenSessionRequest.reports_sessions`).
    pub reports_sessions: bool,
}

/// The local lock new users' uid allocations queue on (not a container key: those have a `/`).
const UID_ALLOCATION: &str = "uid allocation";

/// How often at most a user waiting in line is told their new place.
const QUEUE_LINE_EVERY: Duration = Duration::from_secs(2);

pub struct Placer {
    store: Arc<dyn Store>,
    runtime: Arc<dyn Runtime>,
    auth: Arc<Authenticator>,
    config: PlacementConfig,
    locks: KeyedLocks,
    pools: WarmPools,
    /// Persistent sessions this replica opened less than `touch_after` ago, so their close
    /// needs no read.
    recent: Mutex<HashMap<String, Recent>>,
    closed: Arc<ClosedSessions>,
    /// The opens' transactions, grouped: one etcd write for the opens of a busy moment.
    group: Arc<GroupCommit>,
    _flusher: tokio_util::sync::DropGuard,
    admission: Arc<Admission>,
    /// Stamps records and judges their age (`clock.rs`).
    clock: Arc<dyn Clock>,
}

/// What closing a session this replica placed needs to know.
struct Recent {
    session: SessionRecord,
    opened: Instant,
    /// Past this age its close refreshes the container's idle clock.
    touch_after: Duration,
}

/// Session records waiting to be deleted: the next open's transaction takes them along, and
/// whatever is still here [`FLUSH_AFTER`] after the first arrived goes in one transaction.
/// Each close waits for its delete to be committed, so a replica that dies loses none (the
/// proxy retries the close elsewhere).
#[derive(Default)]
pub struct ClosedSessions {
    pending: Mutex<Vec<PendingDelete>>,
    arrived: tokio::sync::Notify,
}

struct PendingDelete {
    key: String,
    done: tokio::sync::oneshot::Sender<Result<(), String>>,
}

/// How long a closed session's delete waits for an open to carry it.
const FLUSH_AFTER: Duration = Duration::from_millis(200);
/// Deletes carried by one open's transaction, at most.
const CARRIED_AT_MOST: usize = 64;

impl ClosedSessions {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<PendingDelete>> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues the delete of `key` and waits until a transaction has committed it.
    async fn delete(&self, key: String) -> Result<(), StoreError> {
        let (done, committed) = tokio::sync::oneshot::channel();
        self.lock().push(PendingDelete { key, done });
        self.arrived.notify_one();
        match committed.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(StoreError::Unavailable(e)),
            Err(_) => Err(StoreError::Unavailable(
                "the control plane is shutting down".into(),
            )),
        }
    }

    fn take(&self, at_most: usize) -> Vec<PendingDelete> {
        let mut pending = self.lock();
        let n = pending.len().min(at_most);
        pending.drain(..n).collect()
    }

    /// Deletes no transaction committed go back to wait for the next one.
    fn put_back(&self, deletes: Vec<PendingDelete>) {
        if !deletes.is_empty() {
            self.lock().extend(deletes);
            self.arrived.notify_one();
        }
    }

    fn ops(deletes: &[PendingDelete]) -> Vec<TxnOp> {
        deletes.iter().map(|d| TxnOp::delete(&d.key)).collect()
    }

    fn committed(deletes: Vec<PendingDelete>) {
        for d in deletes {
            let _ = d.done.send(Ok(()));
        }
    }

    /// Deletes what no open carried within `FLUSH_AFTER`.
    async fn flush_forever(self: Arc<Self>, store: Arc<dyn Store>) {
        loop {
            self.arrived.notified().await;
            tokio::time::sleep(FLUSH_AFTER).await;
            self.settle(store.as_ref()).await;
        }
    }

    /// Deletes every queued session now, in one transaction per batch. Whoever is about to
    /// read sessions for a user or an operator (`status`, `stop`, `ListSessions`, the
    /// reconciler's pass) calls it first, so a session that closed is not shown as open while
    /// its delete waits for a ride.
    pub async fn settle(&self, store: &dyn Store) {
        loop {
            let batch = self.take(CARRIED_AT_MOST * 4);
            if batch.is_empty() {
                return;
            }
            match store.txn(vec![], Self::ops(&batch)).await {
                Ok(_) => Self::committed(batch),
                Err(e) => {
                    tracing::warn!(sessions = batch.len(), error = %e, "deleting closed sessions failed");
                    for d in batch {
                        let _ = d.done.send(Err(e.to_string()));
                    }
                }
            }
        }
    }
}

/// Facts fixed at the start of one open.
struct Context<'a> {
    claims: &'a Claims,
    env: &'a EnvironmentRecord,
    session: SessionRecord,
    lease: i64,
    /// Moved later by the time spent in line for a creation slot. Never locked across an await.
    deadline: Mutex<Instant>,
    progress: &'a (dyn Fn(&str) + Send + Sync),
    caller_gone: CancellationToken,
    waited_in_line: Arc<AtomicBool>,
    reports_sessions: bool,
    /// Set when the open was served by a warm container (the "warm" placement outcome).
    warm: AtomicBool,
    /// The user's uid, looked up (or allocated) by the first step that needs it.
    uid: tokio::sync::OnceCell<u32>,
}

enum Step {
    Placed(Box<Placement>),
    Retry,
}

impl Placer {
    pub fn new(
        store: Arc<dyn Store>,
        runtime: Arc<dyn Runtime>,
        auth: Arc<Authenticator>,
        config: PlacementConfig,
    ) -> Self {
        let closed = Arc::new(ClosedSessions::default());
        let group = Arc::new(GroupCommit::new(store.clone(), store::group::GROUP_AT_MOST));
        let stop = tokio_util::sync::CancellationToken::new();
        let flusher = closed.clone().flush_forever(store.clone());
        let stopped = stop.clone();
        tokio::spawn(
            async move {
                tokio::select! {
                    () = flusher => {}
                    () = stopped.cancelled() => {}
                }
            }
            .instrument(tracing::info_span!("closed_sessions")),
        );
        let (committer, stopped) = (group.clone().run(), stop.clone());
        tokio::spawn(
            async move {
                tokio::select! {
                    () = committer => {}
                    () = stopped.cancelled() => {}
                }
            }
            .instrument(tracing::info_span!("group_commit")),
        );
        let admission = Admission::new(admission::default_limit());
        Self {
            pools: WarmPools::new(
                store.clone(),
                runtime.clone(),
                &config.instance,
                admission.clone(),
            ),
            store,
            runtime,
            auth,
            config,
            locks: KeyedLocks::default(),
            recent: Mutex::new(HashMap::new()),
            closed,
            group,
            _flusher: stop.drop_guard(),
            admission,
            clock: Arc::new(SystemClock),
        }
    }

    /// Stamps records and judges their age by `clock` (tests advance a `ManualClock`), the
    /// pools' claims included.
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.pools = self.pools.with_clock(clock.clone());
        self.clock = clock;
        self
    }

    /// Creations wait for a slot of `admission` (the replica's, shared with the pool refills).
    pub fn with_admission(mut self, admission: Arc<Admission>) -> Self {
        self.pools = self.pools.with_admission(admission.clone());
        self.admission = admission;
        self
    }

    /// Places a session, calling `progress` with lines for the user while it waits.
    pub async fn open(
        &self,
        req: OpenRequest,
        progress: &(dyn Fn(&str) + Send + Sync),
    ) -> Result<Placement, PlacementError> {
        let started = Instant::now();
        // Three independent etcd reads on every connection's path: one round trip, not three.
        // Their errors still come in this order (who, what, through which proxy).
        let proxy_key = model::proxy_key(&req.proxy_id);
        let (claims, catalogue, proxy) = tokio::join!(
            self.auth.verify_token(&req.token),
            catalogue::environments(self.store.as_ref()),
            store::get_json::<ProxyRecord>(self.store.as_ref(), &proxy_key),
        );
        let claims = claims?;
        let env = self
            .resolve_environment(&claims, &catalogue?, &req.environment, &req.client_address)
            .await?;
        let proxy =
            proxy?.ok_or_else(|| PlacementError::ProxyNotRegistered(req.proxy_id.clone()))?;
        let session = SessionRecord {
            id: uuid::Uuid::new_v4().to_string(),
            user: claims.sub.clone(),
            environment: env.name.clone(),
            container_key: String::new(),
            container_id: String::new(),
            proxy_id: req.proxy_id,
            client_address: req.client_address,
            connection_id: req.connection_id,
            kind: req.kind,
            started_at: self.clock.now(),
        };
        let cx = Context {
            claims: &claims,
            env: &env,
            session,
            lease: proxy.value.lease_id,
            deadline: Mutex::new(started + self.config.deadline),
            progress,
            caller_gone: req.caller_gone,
            waited_in_line: req.waited_in_line,
            reports_sessions: req.reports_sessions,
            warm: AtomicBool::new(false),
            uid: tokio::sync::OnceCell::new(),
        };
        let result = match env.mode {
            Mode::Persistent => self.place_persistent(&cx).await,
            Mode::Ephemeral => self.place_ephemeral(&cx).await,
        };
        let outcome = match &result {
            Ok(_) if cx.warm.load(Ordering::Relaxed) => "warm",
            Ok(p) if p.created => "created",
            Ok(_) => "reused",
            Err(_) => "error",
        };
        record_phase(
            "placement",
            started.elapsed(),
            &[("outcome", outcome.to_owned())],
        );
        if let Ok(placement) = &result
            && env.mode == Mode::Persistent
            && placement.report_after_ms == 0
        {
            self.remember(placement, &cx);
        }
        result
    }

    /// The queue of closed sessions' deletes, for readers that must not see them open.
    pub fn closed_sessions(&self) -> Arc<ClosedSessions> {
        self.closed.clone()
    }

    /// Keeps what the close of a persistent session needs, and forgets sessions too old to
    /// close without a read anyway (so the map holds about `touch_after` of opens).
    fn remember(&self, placement: &Placement, cx: &Context<'_>) {
        let recent = Recent {
            session: SessionRecord {
                container_key: model::container_key(&cx.claims.sub, &cx.env.name),
                container_id: placement.container_id.clone(),
                ..cx.session.clone()
            },
            opened: Instant::now(),
            touch_after: self.touch_after(cx.env),
        };
        let mut map = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        map.retain(|_, r| r.opened.elapsed() < r.touch_after);
        map.insert(recent.session.id.clone(), recent);
    }

    /// How long a session of `env` lives before its close refreshes the container's idle clock
    /// (and, the other way round, how old that clock may be for an open not to refresh it).
    fn touch_after(&self, env: &EnvironmentRecord) -> Duration {
        let idle_tenth = Duration::from_secs(u64::from(env.idle_timeout_seconds) / 10);
        self.config.touch_after.min(idle_tenth)
    }

    /// Whether a warm open may leave `record` and the session unwritten: the idle clock was
    /// started less than `touch_after` ago (as an open that writes would have started it,
    /// give or take that), and the reaper cannot see the container idle for at least
    /// [`UNRECORDED_SLACK_SECONDS`], by which time the proxy has reported the session if it
    /// still runs. The uid must be in the record already (else this open writes it).
    fn may_leave_unrecorded(&self, env: &EnvironmentRecord, record: &ContainerRecord) -> bool {
        let now = self.clock.now();
        let since = now - record.last_active_at;
        record.uid.is_some()
            && (0..self.touch_after(env).as_secs() as i64).contains(&since)
            && record.last_active_at + reconcile::idle_timeout(Some(env)) - now
                >= UNRECORDED_SLACK_SECONDS
    }

    /// requested → the user's default → the config webhook's choice (if it is one the user's
    /// groups allow) → the catalogue default; then the group check.
    async fn resolve_environment(
        &self,
        claims: &Claims,
        catalogue: &[EnvironmentRecord],
        requested: &str,
        client_address: &str,
    ) -> Result<EnvironmentRecord, PlacementError> {
        let name = if !requested.is_empty() {
            if envgate_proto::names::validate_environment(requested).is_err() {
                return Err(catalogue::unknown(catalogue, &claims.groups, requested).into());
            }
            requested.to_owned()
        } else {
            let user: Option<Versioned<UserRecord>> =
                store::get_json(self.store.as_ref(), &model::user_key(&claims.sub)).await?;
            let saved = user
                .map(|u| u.value.default_environment)
                .filter(|d| !d.is_empty());
            let chosen = match saved {
                Some(saved) => Some(saved),
                None => {
                    self.configured_environment(claims, catalogue, client_address)
                        .await
                }
            };
            match chosen.or_else(|| {
                catalogue
                    .iter()
                    .find(|e| e.is_default)
                    .map(|e| e.name.clone())
            }) {
                Some(name) => name,
                None => {
                    return Err(PlacementError::NoEnvironment {
                        available: catalogue::available(catalogue, &claims.groups),
                    });
                }
            }
        };
        Ok(catalogue::choose(catalogue, &claims.groups, &name)?.clone())
    }

    /// The config webhook's choice, when it names an environment the user's groups allow; any
    /// other answer is logged and chooses nothing.
    async fn configured_environment(
        &self,
        claims: &Claims,
        catalogue: &[EnvironmentRecord],
        client_address: &str,
    ) -> Option<String> {
        let chosen = self
            .auth
            .configured_environment(&claims.sub, client_address)
            .await?;
        match catalogue::choose(catalogue, &claims.groups, &chosen) {
            Ok(env) => Some(env.name.clone()),
            Err(e) => {
                tracing::warn!(user = %claims.sub, environment = %chosen, error = %e, "the config webhook chose an environment the user may not use; ignored");
                None
            }
        }
    }

    fn check_deadline(&self, cx: &Context<'_>) -> Result<(), PlacementError> {
        if Instant::now() >= deadline(cx) {
            Err(PlacementError::Timeout(self.config.deadline.as_secs()))
        } else {
            Ok(())
        }
    }

    async fn place_persistent(&self, cx: &Context<'_>) -> Result<Placement, PlacementError> {
        let key = model::container_key(&cx.claims.sub, &cx.env.name);
        let _local = self.locks.lock(&key).await;
        let mut told_waiting = false;
        // A creation slot, once waited for; kept across a retry, dropped when not needed.
        let mut slot: Option<Permit> = None;
        loop {
            self.check_deadline(cx)?;
            let record: Option<Versioned<ContainerRecord>> =
                store::get_json(self.store.as_ref(), &key).await?;
            let step = match record {
                None => match self.place_warm(cx, &key, "").await? {
                    Some(step) => step,
                    None => match slot.take() {
                        // In line first, then look again: things may have changed meanwhile.
                        None => {
                            slot = Some(self.admit(cx).await?);
                            Step::Retry
                        }
                        Some(permit) => {
                            let claim = self.creating_record(cx, "").await?;
                            match store::create_if_absent(self.store.as_ref(), &key, &claim).await?
                            {
                                Some(revision) => {
                                    self.create(cx, &key, claim, revision, permit).await?
                                }
                                None => {
                                    slot = Some(permit);
                                    Step::Retry
                                }
                            }
                        }
                    },
                },
                Some(v) if v.value.state == ContainerState::Running => {
                    self.attach_running(cx, &key, v).await?
                }
                Some(v) if self.is_stale(&v.value) => match slot.take() {
                    None => {
                        slot = Some(self.admit(cx).await?);
                        Step::Retry
                    }
                    Some(permit) => self.take_over(cx, &key, v, permit).await?,
                },
                Some(v) => {
                    // Another replica is making it: our slot is someone else's turn.
                    slot = None;
                    if !told_waiting {
                        (cx.progress)(&format!("waiting for environment \"{}\" …", cx.env.name));
                        told_waiting = true;
                    }
                    self.wait_for_change(cx, &key, &v).await?;
                    Step::Retry
                }
            };
            if let Step::Placed(placement) = step {
                return Ok(*placement);
            }
        }
    }

    async fn place_ephemeral(&self, cx: &Context<'_>) -> Result<Placement, PlacementError> {
        let key = model::ephemeral_container_key(&cx.claims.sub, &cx.env.name, &cx.session.id);
        let lost = || PlacementError::RuntimeFailed(format!("lost the claim on {key}"));
        match self.place_warm(cx, &key, &cx.session.id).await? {
            Some(Step::Placed(placement)) => return Ok(*placement),
            Some(Step::Retry) => return Err(lost()),
            None => {}
        }
        let slot = self.admit(cx).await?;
        // A warm container may have come while this one waited in line.
        match self.place_warm(cx, &key, &cx.session.id).await? {
            Some(Step::Placed(placement)) => return Ok(*placement),
            Some(Step::Retry) => return Err(lost()),
            None => {}
        }
        let claim = self.creating_record(cx, &cx.session.id).await?;
        let revision = store::create_if_absent(self.store.as_ref(), &key, &claim)
            .await?
            .ok_or_else(|| StoreError::Unavailable(format!("session id collision on {key}")))?;
        match self.create(cx, &key, claim, revision, slot).await? {
            Step::Placed(placement) => Ok(*placement),
            // Only a takeover of a stale claim can beat us, and a fresh session id is never stale.
            Step::Retry => Err(lost()),
        }
    }

    /// Serves the open from the environment's warm pool (see `pool`): claim (one txn), the
    /// user limit, hand-over (the home mounted), then the usual commit. `None`: no warm
    /// container could be had (the pool is empty or the hand-over failed, and was undone):
    /// the caller creates one.
    async fn place_warm(
        &self,
        cx: &Context<'_>,
        key: &str,
        session_id: &str,
    ) -> Result<Option<Step>, PlacementError> {
        let template = self.creating_record(cx, session_id).await?;
        let claimed = match self.pools.claim(cx.env, key, &template).await? {
            Claim::Miss => return Ok(None),
            Claim::RecordExists => return Ok(Some(Step::Retry)),
            Claim::Claimed(claimed) => claimed,
        };
        if let Err(e) = self.check_user_limit(cx, key, claimed.revision).await {
            // The container is still unused: it goes back to the pool.
            self.pools.give_back(key, &claimed).await?;
            return Err(e);
        }
        let running = match self.pools.assign(cx.env, &claimed).await {
            Ok(running) => running,
            Err(e) => {
                tracing::warn!(container = %claimed.record.container_name, user = %claimed.record.user, environment = %cx.env.name, error = %e, "handing over a warm container failed; removing it and creating one instead");
                self.remove_quietly(&claimed.record.container_id).await;
                self.release_claim(key, claimed.revision).await;
                return Ok(None);
            }
        };
        match self.commit(cx, key, claimed.revision, &running).await {
            Ok(Some(placement)) => {
                cx.warm.store(true, Ordering::Relaxed);
                Ok(Some(Step::Placed(Box::new(Placement {
                    created: true,
                    ..placement
                }))))
            }
            Ok(None) => {
                // Taken over as stale while we were slow: theirs wins.
                self.remove_quietly(&running.container_id).await;
                Ok(Some(Step::Retry))
            }
            Err(e) => {
                self.remove_quietly(&running.container_id).await;
                self.release_claim(key, claimed.revision).await;
                Err(e)
            }
        }
    }

    /// The uid the user's sessions run as (see `uids`), once per open. New users get theirs
    /// one at a time on this replica: 300 first logins at once would otherwise all race the
    /// one counter's compare-and-swap, each lost race a round trip, before anyone is placed.
    async fn uid(&self, cx: &Context<'_>) -> Result<u32, PlacementError> {
        let user = &cx.claims.sub;
        Ok(*cx
            .uid
            .get_or_try_init(|| async {
                if let Some(uid) = uids::get(self.store.as_ref(), user).await? {
                    return Ok(uid);
                }
                let _one_at_a_time = self.locks.lock(UID_ALLOCATION).await;
                uids::ensure(self.store.as_ref(), user).await
            })
            .await?)
    }

    async fn creating_record(
        &self,
        cx: &Context<'_>,
        session_id: &str,
    ) -> Result<ContainerRecord, PlacementError> {
        let uid = self.uid(cx).await?;
        let now = self.clock.now();
        Ok(ContainerRecord {
            user: cx.claims.sub.clone(),
            environment: cx.env.name.clone(),
            runtime: self.runtime.kind().as_str().to_owned(),
            container_id: String::new(),
            container_name: String::new(),
            state: ContainerState::Creating,
            state_since: now,
            created_at: now,
            last_active_at: now,
            session_id: session_id.to_owned(),
            owner: self.config.replica_id.clone(),
            agent_address: String::new(),
            agent_secret: String::new(),
            lifetime_warned_at: 0,
            uid: Some(uid),
        })
    }

    /// Refuses a new container once the user has `max_containers_per_user` others. Called
    /// with our own `creating` claim already written at `revision` (a cold create or a warm
    /// claim), which makes it exact across replicas: a claim counts every other record that
    /// is not `creating`, plus the `creating` claims older than itself, so of two racing
    /// claims the younger always counts the older, and no more than the limit proceed.
    async fn check_user_limit(
        &self,
        cx: &Context<'_>,
        key: &str,
        revision: i64,
    ) -> Result<(), PlacementError> {
        let limit = self.config.max_containers_per_user;
        if limit == 0 {
            return Ok(());
        }
        let records = self
            .store
            .range(&model::user_containers(&cx.claims.sub))
            .await?;
        let mut counted: Vec<String> = Vec::new();
        for kv in records.iter().filter(|kv| kv.key != key) {
            match store::decode::<ContainerRecord>(kv) {
                Ok(v) if v.value.state == ContainerState::Creating && v.mod_revision > revision => {
                }
                Ok(v) => counted.push(v.value.environment),
                // Unreadable, but still somebody's container: count it.
                Err(_) => counted.push(kv.key.clone()),
            }
        }
        if counted.len() < limit {
            return Ok(());
        }
        counted.sort();
        let mut environments: Vec<(String, usize)> = Vec::new();
        for name in counted.iter() {
            match environments.last_mut() {
                Some((last, n)) if last == name => *n += 1,
                _ => environments.push((name.clone(), 1)),
            }
        }
        tracing::info!(user = %cx.claims.sub, environment = %cx.env.name, count = counted.len(), limit, "container limit reached");
        Err(PlacementError::TooManyContainers {
            user: cx.claims.sub.clone(),
            count: counted.len(),
            limit,
            environments: environments
                .into_iter()
                .map(|(name, n)| {
                    if n == 1 {
                        name
                    } else {
                        format!("{name} ×{n}")
                    }
                })
                .collect(),
        })
    }

    fn is_stale(&self, record: &ContainerRecord) -> bool {
        let age = self.clock.now() - record.state_since;
        age >= i64::try_from(self.config.stale_after.as_secs()).unwrap_or(i64::MAX)
    }

    /// Waits in this replica's line for a creation slot, telling the user their place as it
    /// changes (at most every `QUEUE_LINE_EVERY`). The wait does not count against the
    /// placement deadline. A caller that goes away leaves the line.
    async fn admit(&self, cx: &Context<'_>) -> Result<Permit, PlacementError> {
        let started = Instant::now();
        let name = &cx.env.name;
        let mut last_line: Option<Instant> = None;
        let waiting = |ahead: usize| {
            if last_line.is_some_and(|at| at.elapsed() < QUEUE_LINE_EVERY) {
                return;
            }
            last_line = Some(Instant::now());
            cx.waited_in_line.store(true, Ordering::Relaxed);
            (cx.progress)(&queue_line(name, ahead));
        };
        let permit = tokio::select! {
            permit = self.admission.acquire(Class::User, waiting) => permit,
            () = cx.caller_gone.cancelled() => {
                tracing::info!(user = %cx.claims.sub, environment = %name, "the client went away while waiting for a creation slot");
                return Err(PlacementError::CallerGone);
            }
        };
        let waited = started.elapsed();
        record_phase("create_queue", waited, &[]);
        let mut deadline = cx.deadline.lock().unwrap_or_else(|p| p.into_inner());
        *deadline += waited;
        Ok(permit)
    }

    /// We hold the `creating` claim at `revision` and a creation slot: make the container
    /// (the slot goes once it is made), then in ONE txn mark the record running and attach the
    /// session to the proxy's lease. Any failure removes what was made and releases the claim.
    async fn create(
        &self,
        cx: &Context<'_>,
        key: &str,
        claim: ContainerRecord,
        revision: i64,
        slot: Permit,
    ) -> Result<Step, PlacementError> {
        if let Err(e) = self.check_user_limit(cx, key, revision).await {
            self.release_claim(key, revision).await;
            return Err(e);
        }
        (cx.progress)(&format!("starting environment \"{}\" …", cx.env.name));
        let session = (!claim.session_id.is_empty()).then_some(claim.session_id.as_str());
        let spec = ContainerSpec {
            working_dir: working_dir(cx.env, &cx.claims.sub),
            ..pool::container_spec(&self.config.instance, cx.env, &cx.claims.sub, session)
        };
        let started = Instant::now();
        let created = match self.runtime.ensure_home(&spec.instance, &spec.user).await {
            Ok(_) => self.runtime.create_and_start(&spec, cx.progress).await,
            Err(e) => Err(e),
        };
        drop(slot);
        let outcome = if created.is_ok() { "ok" } else { "error" };
        record_phase(
            "container_create",
            started.elapsed(),
            &[("outcome", outcome.to_owned())],
        );
        let created = match created {
            Ok(created) => created,
            Err(e) => {
                tracing::warn!(user = %spec.user, environment = %spec.environment, error = %e, "container creation failed");
                self.release_claim(key, revision).await;
                return Err(PlacementError::from_runtime(e, &cx.env.name));
            }
        };
        tracing::info!(container = %created.id, name = %created.name, user = %spec.user, environment = %spec.environment, "container created");
        let now = self.clock.now();
        let (agent_address, agent_secret) = created
            .agent
            .clone()
            .map(|a| (a.address, a.secret))
            .unwrap_or_default();
        let running = ContainerRecord {
            container_id: created.id.clone(),
            container_name: created.name.clone(),
            agent_address,
            agent_secret,
            state: ContainerState::Running,
            state_since: now,
            last_active_at: now,
            ..claim
        };
        match self.commit(cx, key, revision, &running).await {
            Ok(Some(placement)) => Ok(Step::Placed(Box::new(Placement {
                created: true,
                ..placement
            }))),
            Ok(None) => {
                // Someone took the claim over as stale while we were slow: theirs wins.
                self.remove_quietly(&created.id).await;
                Ok(Step::Retry)
            }
            Err(e) => {
                self.remove_quietly(&created.id).await;
                self.release_claim(key, revision).await;
                Err(e)
            }
        }
    }

    async fn attach_running(
        &self,
        cx: &Context<'_>,
        key: &str,
        current: Versioned<ContainerRecord>,
    ) -> Result<Step, PlacementError> {
        // Past its maximum lifetime it is as good as gone: attaching would let a user keep a
        // container alive forever by reconnecting.
        let over_age = reconcile::end_of_life(&current.value, Some(cx.env))
            .is_some_and(|end| self.clock.now() >= end);
        // The engine's event stream usually knows (no Docker call per login).
        let alive = !over_age
            && runtime::is_running_cached(self.runtime.as_ref(), &current.value.container_id)
                .await
                .map_err(|e| PlacementError::from_runtime(e, &cx.env.name))?;
        if !alive {
            tracing::info!(container = %current.value.container_id, key, over_age, "recorded container is not running or past its maximum lifetime; replacing it");
            // A stopped container would otherwise linger until the orphan sweep.
            self.remove_quietly(&current.value.container_id).await;
            self.release_claim(key, current.mod_revision).await;
            return Ok(Step::Retry);
        }
        if cx.reports_sessions && self.may_leave_unrecorded(cx.env, &current.value) {
            let session = SessionRecord {
                container_key: key.to_owned(),
                container_id: current.value.container_id.clone(),
                ..cx.session.clone()
            };
            let placement = Placement {
                report_after_ms: REPORT_AFTER.as_millis() as u32,
                ..self.placement(cx, &current.value, &session)
            };
            return Ok(Step::Placed(Box::new(placement)));
        }
        // A container from before uids existed gets its user's uid at the next login.
        let uid = match current.value.uid {
            Some(uid) => uid,
            None => self.uid(cx).await?,
        };
        let touched = ContainerRecord {
            last_active_at: self.clock.now(),
            uid: Some(uid),
            ..current.value
        };
        Ok(
            match self.commit(cx, key, current.mod_revision, &touched).await? {
                Some(placement) => Step::Placed(Box::new(placement)),
                None => Step::Retry,
            },
        )
    }

    /// A `creating`/`removing` record whose replica died: claim it by CAS and start over,
    /// with the creation slot the caller waited for.
    async fn take_over(
        &self,
        cx: &Context<'_>,
        key: &str,
        stale: Versioned<ContainerRecord>,
        slot: Permit,
    ) -> Result<Step, PlacementError> {
        tracing::warn!(key, state = stale.value.state.as_str(), owner = %stale.value.owner, "taking over a stale placement record");
        if !stale.value.container_id.is_empty()
            && let Err(e) = self.runtime.remove(&stale.value.container_id).await
        {
            return Err(PlacementError::from_runtime(e, &cx.env.name));
        }
        let claim = self.creating_record(cx, &stale.value.session_id).await?;
        let taken = self
            .store
            .txn(
                vec![Compare::revision(key, stale.mod_revision)],
                vec![TxnOp::put_json(key, &claim, None)],
            )
            .await?;
        match taken {
            Some(revision) => self.create(cx, key, claim, revision, slot).await,
            None => Ok(Step::Retry),
        }
    }

    /// The ONE txn that makes a placement real: record at `revision` → `record`, plus the
    /// session under the proxy's lease. `Ok(None)` when the record changed meanwhile.
    async fn commit(
        &self,
        cx: &Context<'_>,
        key: &str,
        revision: i64,
        record: &ContainerRecord,
    ) -> Result<Option<Placement>, PlacementError> {
        let session = SessionRecord {
            container_key: key.to_owned(),
            container_id: record.container_id.clone(),
            ..cx.session.clone()
        };
        // Sessions closed meanwhile ride along (blind deletes: they cannot fail the compare).
        let carried = self.closed.take(CARRIED_AT_MOST);
        let mut ops = vec![
            TxnOp::put_json(key, record, None),
            TxnOp::put_json(model::session_key(&session.id), &session, Some(cx.lease)),
        ];
        ops.extend(ClosedSessions::ops(&carried));
        let result = self
            .group
            .txn(vec![Compare::revision(key, revision)], ops)
            .await;
        if matches!(result, Ok(Some(_))) {
            ClosedSessions::committed(carried);
        } else {
            self.closed.put_back(carried);
        }
        match result {
            Ok(Some(_)) => Ok(Some(self.placement(cx, record, &session))),
            Ok(None) => Ok(None),
            Err(StoreError::LeaseNotFound(_)) => {
                Err(PlacementError::ProxyNotRegistered(session.proxy_id.clone()))
            }
            Err(e) => Err(e.into()),
        }
    }

    fn placement(
        &self,
        cx: &Context<'_>,
        record: &ContainerRecord,
        session: &SessionRecord,
    ) -> Placement {
        Placement {
            session_id: session.id.clone(),
            user: session.user.clone(),
            environment: session.environment.clone(),
            runtime_kind: RuntimeKind::from_name(&record.runtime).map_or(
                envgate_proto::v1::Runtime::Unspecified,
                RuntimeKind::to_wire,
            ) as i32,
            start: Some(session_target(record).to_wire()),
            container_id: record.container_id.clone(),
            container_name: record.container_name.clone(),
            shell: cx.env.shell.clone(),
            working_dir: working_dir(cx.env, &session.user),
            run_as: cx.env.run_as.clone(),
            account: own_account(cx.env, record),
            accept_env: catalogue::accept_env(cx.env),
            record: cx.env.record_sessions,
            persistent: cx.env.mode == Mode::Persistent,
            env: cx.env.env.clone(),
            created: false,
            report_after_ms: 0,
        }
    }

    /// Waits (bounded) until the record at `current` changes or could have gone stale.
    async fn wait_for_change(
        &self,
        cx: &Context<'_>,
        key: &str,
        current: &Versioned<ContainerRecord>,
    ) -> Result<(), PlacementError> {
        let mut changes = self
            .store
            .watch(key, false, current.mod_revision + 1)
            .await?;
        let until_stale = Duration::from_secs(
            u64::try_from(
                current.value.state_since + self.config.stale_after.as_secs() as i64
                    - self.clock.now(),
            )
            .unwrap_or(0),
        );
        let until_deadline = deadline(cx).saturating_duration_since(Instant::now());
        let wait = until_stale
            .min(until_deadline)
            .max(Duration::from_millis(100));
        // A timeout or a watch error both mean: look again.
        let _ = tokio::time::timeout(wait, changes.next()).await;
        Ok(())
    }

    /// Deletes the record if it is still at `revision`; best effort, the reaper is the backstop.
    async fn release_claim(&self, key: &str, revision: i64) {
        let released = self
            .store
            .txn(
                vec![Compare::revision(key, revision)],
                vec![TxnOp::delete(key)],
            )
            .await;
        if let Err(e) = released {
            tracing::warn!(key, error = %e, "releasing a placement claim failed; the reconciler will clean up");
        }
    }

    async fn remove_quietly(&self, id: &str) {
        if let Err(e) = self.runtime.remove(id).await {
            tracing::warn!(container = %id, error = %e, "removing a container failed; the reconciler will retry");
        }
    }

    /// Ends a session. Idempotent: an unknown session id is fine. Persistent containers
    /// get `last_active_at = now` (their idle clock starts); ephemeral ones are removed.
    pub async fn close(&self, session_id: &str) -> Result<(), PlacementError> {
        self.close_with(session_id, None, false).await.map(|_| ())
    }

    /// `close` on behalf of `proxy` (`None`: the control plane itself), which must be the
    /// proxy that opened the session. With `unreachable` (the proxy could not reach the
    /// container's agent) the session's container is removed as an ephemeral one would be, so
    /// the next open creates a new one; the home volume stays. Returns the closed session.
    pub async fn close_with(
        &self,
        session_id: &str,
        proxy: Option<&str>,
        unreachable: bool,
    ) -> Result<Option<SessionRecord>, PlacementError> {
        let skey = model::session_key(session_id);
        let recent = self
            .recent
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(session_id);
        if let Some(recent) = recent {
            if let Some(proxy) = proxy
                && recent.session.proxy_id != proxy
            {
                let owner = recent.session.proxy_id.clone();
                self.recent
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(session_id.to_owned(), recent);
                return Err(CallerError::NotYourSession {
                    session: session_id.to_owned(),
                    owner,
                }
                .into());
            }
            if !unreachable && recent.opened.elapsed() < recent.touch_after {
                self.closed.delete(skey).await?;
                return Ok(Some(recent.session));
            }
        }
        let Some(session) = store::get_json::<SessionRecord>(self.store.as_ref(), &skey).await?
        else {
            return Ok(None);
        };
        if let Some(proxy) = proxy
            && session.value.proxy_id != proxy
        {
            return Err(CallerError::NotYourSession {
                session: session_id.to_owned(),
                owner: session.value.proxy_id.clone(),
            }
            .into());
        }
        self.close_record(&skey, &session.value, unreachable)
            .await?;
        Ok(Some(session.value))
    }

    async fn close_record(
        &self,
        skey: &str,
        session: &SessionRecord,
        unreachable: bool,
    ) -> Result<(), PlacementError> {
        let session_id = session.id.as_str();
        let ckey = session.container_key.clone();
        for _ in 0..16 {
            let record: Option<Versioned<ContainerRecord>> =
                store::get_json(self.store.as_ref(), &ckey).await?;
            let Some(record) = record else {
                self.store.delete(skey).await?;
                return Ok(());
            };
            let owned = record.value.session_id == session_id
                || (unreachable
                    && record.value.state == ContainerState::Running
                    && record.value.container_id == session.container_id);
            let next = if owned {
                ContainerRecord {
                    state: ContainerState::Removing,
                    state_since: self.clock.now(),
                    owner: self.config.replica_id.clone(),
                    ..record.value.clone()
                }
            } else if record.value.state == ContainerState::Running
                && record.value.container_id == session.container_id
            {
                ContainerRecord {
                    last_active_at: self.clock.now(),
                    ..record.value.clone()
                }
            } else {
                // The record moved on to another container: nothing to refresh.
                self.store.delete(skey).await?;
                return Ok(());
            };
            let ops = vec![TxnOp::put_json(&ckey, &next, None), TxnOp::delete(skey)];
            let Some(revision) = self
                .store
                .txn(vec![Compare::revision(&ckey, record.mod_revision)], ops)
                .await?
            else {
                continue;
            };
            if owned {
                self.runtime
                    .remove(&next.container_id)
                    .await
                    .map_err(|e| PlacementError::from_runtime(e, &next.environment))?;
                self.store
                    .txn(
                        vec![Compare::revision(&ckey, revision)],
                        vec![TxnOp::delete(&ckey)],
                    )
                    .await?;
                let reason = if unreachable {
                    "its agent was unreachable"
                } else {
                    "ephemeral session closed"
                };
                tracing::info!(container = %next.container_id, user = %next.user, reason, "container removed");
            }
            return Ok(());
        }
        Err(StoreError::Unavailable(format!(
            "{ckey} kept changing; could not close {session_id}"
        ))
        .into())
    }

    /// Applies, in order, what proxy `proxy_id` says became of sessions it was given
    /// unrecorded: one that lasted is recorded under the proxy's `lease` if its container is
    /// still the user's; one that ended is closed as CloseSession closes a recorded one when
    /// it may have left a trace (it was reported, it lived long enough to refresh the idle
    /// clock, or its container was unreachable), and otherwise needs nothing. Applying an
    /// update twice changes nothing. An update that does not describe a session is logged
    /// and skipped, so it cannot hold up the rest. Returns the sessions that ended, for the
    /// audit log; an error (etcd unavailable) means none of it counts as applied.
    pub async fn apply_updates(
        &self,
        proxy_id: &str,
        lease: i64,
        updates: &[SessionUpdate],
    ) -> Result<Vec<(SessionRecord, SessionEnd)>, PlacementError> {
        let mut lasting = Vec::new();
        let mut ended = Vec::new();
        for update in updates {
            let session = match unrecorded_session(proxy_id, update) {
                Ok(session) => session,
                Err(why) => {
                    tracing::warn!(
                        proxy = proxy_id,
                        sequence = update.sequence,
                        why,
                        "ignoring a session update"
                    );
                    continue;
                }
            };
            match update.end {
                None => {
                    if let Some(op) = self.record_lasting(&session, lease).await? {
                        lasting.push(op);
                    }
                }
                Some(end) => {
                    // Its report, if in this batch, is written before its end is applied.
                    self.put_lasting(&mut lasting).await?;
                    self.close_unrecorded(&session, &end).await?;
                    ended.push((session, end));
                }
            }
        }
        self.put_lasting(&mut lasting).await?;
        Ok(ended)
    }

    /// The put recording `session`, if its container is still the user's running one.
    async fn record_lasting(
        &self,
        session: &SessionRecord,
        lease: i64,
    ) -> Result<Option<TxnOp>, PlacementError> {
        let record: Option<Versioned<ContainerRecord>> =
            store::get_json(self.store.as_ref(), &session.container_key).await?;
        let current = record.is_some_and(|r| {
            r.value.state == ContainerState::Running && r.value.container_id == session.container_id
        });
        if !current {
            tracing::info!(session = %session.id, container = %session.container_id, "a reported session's container is no longer the user's; not recorded");
            return Ok(None);
        }
        let key = model::session_key(&session.id);
        Ok(Some(TxnOp::put_json(&key, session, Some(lease))))
    }

    async fn put_lasting(&self, lasting: &mut Vec<TxnOp>) -> Result<(), PlacementError> {
        while !lasting.is_empty() {
            let batch: Vec<TxnOp> = lasting
                .drain(..lasting.len().min(CARRIED_AT_MOST))
                .collect();
            self.store.txn(vec![], batch).await?;
        }
        Ok(())
    }

    /// Applies the end of a session placed unrecorded: as CloseSession's when the session
    /// may have left a trace, else nothing.
    async fn close_unrecorded(
        &self,
        session: &SessionRecord,
        end: &SessionEnd,
    ) -> Result<(), PlacementError> {
        let skey = model::session_key(&session.id);
        if end.reported
            && let Some(recorded) =
                store::get_json::<SessionRecord>(self.store.as_ref(), &skey).await?
            && recorded.value.proxy_id != session.proxy_id
        {
            tracing::warn!(session = %session.id, proxy = %session.proxy_id, owner = %recorded.value.proxy_id, "a proxy ended another proxy's session; ignored");
            return Ok(());
        }
        let lived = self.clock.now() - session.started_at;
        // One that was never reported lived less than its report time, shorter than any
        // `touch_after` of an environment that places unrecorded (a minute of idle timeout at
        // least, a tenth of it 6 s): only a late end needs the catalogue.
        let refreshes = lived >= REPORT_AFTER.as_secs() as i64 && {
            let catalogue = catalogue::environments(self.store.as_ref()).await?;
            let touch_after = catalogue
                .iter()
                .find(|e| e.name == session.environment)
                .map_or(self.config.touch_after, |env| self.touch_after(env));
            lived >= touch_after.as_secs() as i64
        };
        if end.container_unreachable || refreshes {
            self.close_record(&skey, session, end.container_unreachable)
                .await
        } else if end.reported {
            // As a short recorded session's close: its delete rides with others.
            Ok(self.closed.delete(skey).await?)
        } else {
            Ok(())
        }
    }
}

/// The session record an update from `proxy_id` describes, or why it describes none.
fn unrecorded_session(proxy_id: &str, update: &SessionUpdate) -> Result<SessionRecord, String> {
    let Some(s) = &update.session else {
        return Err("no session in the update".into());
    };
    envgate_proto::names::validate_user(&s.user).map_err(|e| e.to_string())?;
    envgate_proto::names::validate_environment(&s.environment).map_err(|e| e.to_string())?;
    if s.session_id.is_empty() || s.session_id.len() > 64 || s.container_id.is_empty() {
        return Err("no session id or container id".into());
    }
    Ok(SessionRecord {
        id: s.session_id.clone(),
        user: s.user.clone(),
        environment: s.environment.clone(),
        container_key: model::container_key(&s.user, &s.environment),
        container_id: s.container_id.clone(),
        proxy_id: proxy_id.to_owned(),
        client_address: s.client_address.clone(),
        connection_id: s.connection_id.clone(),
        kind: SessionKind::from(s.session_kind()),
        started_at: s.started_at,
    })
}

fn deadline(cx: &Context<'_>) -> Instant {
    *cx.deadline.lock().unwrap_or_else(|p| p.into_inner())
}

/// What a user waiting in line for a creation slot reads.
fn queue_line(environment: &str, ahead: usize) -> String {
    match ahead {
        0 => format!("queued to start environment \"{environment}\": you are next"),
        1 => format!("queued to start environment \"{environment}\": 1 user ahead of you"),
        n => format!("queued to start environment \"{environment}\": {n} users ahead of you"),
    }
}

/// The user's own account, for an environment that runs sessions as its users (no `run_as`);
/// its home is where the home volume is mounted.
fn own_account(env: &EnvironmentRecord, record: &ContainerRecord) -> Option<Account> {
    let uid = record.uid.filter(|_| env.run_as.is_empty())?;
    Some(Account {
        name: record.user.clone(),
        uid,
        gid: uid,
        home: format!("/home/{}", record.user),
    })
}

fn working_dir(env: &EnvironmentRecord, user: &str) -> String {
    if env.working_dir.is_empty() {
        format!("/home/{user}")
    } else {
        env.working_dir.clone()
    }
}

pub struct SessionsService {
    placer: Arc<Placer>,
    audit: AuditLog,
}

impl SessionsService {
    pub fn new(placer: Arc<Placer>, audit: AuditLog) -> Self {
        Self { placer, audit }
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<OpenSessionEvent, Status>> + Send>>;

#[tonic::async_trait]
impl Sessions for SessionsService {
    type OpenSessionStream = EventStream;

    async fn open_session(
        &self,
        request: Request<OpenSessionRequest>,
    ) -> Result<Response<EventStream>, Status> {
        let ProxyIdentity(proxy_id) = guard::proxy_of(&request)?;
        let req = request.into_inner();
        let span = tracing::info_span!(
            "open_session",
            connection = %req.connection_id,
            proxy = %proxy_id,
            environment = %req.environment,
        );
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let placer = self.placer.clone();
        let audit = self.audit.clone();
        let task = async move {
            // Fires when the proxy drops the stream (its client went away): an open still in
            // line for a creation slot leaves it.
            let caller_gone = CancellationToken::new();
            let progress_tx = tx.clone();
            let waited_in_line = Arc::new(AtomicBool::new(false));
            let waited = waited_in_line.clone();
            let progress = move |line: &str| {
                let event = open_session_event::Event::Progress(Progress {
                    message: line.to_owned(),
                    waited_in_line: waited.load(Ordering::Relaxed),
                });
                // Progress is advisory: a full or closed channel just drops the line.
                let _ = progress_tx.try_send(Ok(OpenSessionEvent { event: Some(event) }));
            };
            let kind = SessionKind::from(req.session_kind());
            let open = OpenRequest {
                token: req.token,
                environment: req.environment,
                proxy_id: proxy_id.clone(),
                client_address: req.client_address.clone(),
                connection_id: req.connection_id,
                kind,
                caller_gone: caller_gone.clone(),
                waited_in_line,
                reports_sessions: req.reports_sessions,
            };
            // The open runs to its end either way; the stream's closing only tells it.
            let open = placer.open(open, &progress);
            tokio::pin!(open);
            let placed = tokio::select! {
                placed = &mut open => placed,
                () = tx.closed() => {
                    caller_gone.cancel();
                    open.await
                }
            };
            match placed {
                Ok(placement) => {
                    let session_id = placement.session_id.clone();
                    tracing::info!(session = %session_id, user = %placement.user, container = %placement.container_id, created = placement.created, "session placed");
                    audit.record(Event::SessionStart {
                        session: session_id.clone(),
                        user: placement.user.clone(),
                        environment: placement.environment.clone(),
                        container: placement.container_id.clone(),
                        proxy: proxy_id,
                        client: req.client_address,
                        kind: kind.as_str().to_owned(),
                    });
                    let event = open_session_event::Event::Placement(placement);
                    if tx
                        .send(Ok(OpenSessionEvent { event: Some(event) }))
                        .await
                        .is_err()
                    {
                        // The proxy went away before hearing the answer: undo the session.
                        if let Err(e) = placer.close(&session_id).await {
                            tracing::warn!(session = %session_id, error = %e, "closing an unclaimed session");
                        }
                    }
                }
                Err(e) => {
                    tracing::info!(error = %e, "placement refused");
                    let _ = tx.send(Err(Status::from(e))).await;
                }
            }
        };
        // Its own task, so a placement finishes (or is undone) even if the caller goes away.
        tokio::spawn(task.instrument(span));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn close_session(
        &self,
        request: Request<CloseSessionRequest>,
    ) -> Result<Response<CloseSessionResponse>, Status> {
        let ProxyIdentity(proxy_id) = guard::proxy_of(&request)?;
        let req = request.into_inner();
        let closed = self
            .placer
            .close_with(&req.session_id, Some(&proxy_id), req.container_unreachable)
            .await?;
        if let Some(session) = closed {
            self.audit.record(Event::SessionEnd {
                session: session.id,
                user: session.user,
                environment: session.environment,
                proxy: proxy_id,
                exit_status: req.exit_status,
                container_unreachable: req.container_unreachable,
            });
        }
        Ok(Response::new(CloseSessionResponse {}))
    }
}

/// Where a session in `record`'s container starts: its agent, else the engine's exec.
fn session_target(record: &ContainerRecord) -> SessionTarget {
    if !record.agent_address.is_empty() {
        match SessionTarget::agent(&record.agent_address, &record.agent_secret) {
            Ok(target) => return target,
            Err(e) => {
                tracing::warn!(container = %record.container_id, error = %e, "unusable agent address in a record; sessions use runtime exec")
            }
        }
    }
    SessionTarget::DockerExec {
        container_id: record.container_id.clone(),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{HashMap, HashSet};

    use super::*;
    use crate::fixtures::{PROXY, World, abandoned_claim, fast, no_progress};

    #[tokio::test]
    async fn concurrent_first_opens_share_one_container() {
        let world = World::new().await;
        world.runtime.set_create_delay(Duration::from_millis(200));
        // Two "replicas" sharing one store: the local lock and the store CAS both matter.
        let requests = (0..20).map(|_| world.request("alice", "busybox")).collect();
        let opens = world.open_on_two_replicas(fast(), requests);
        let mut containers = HashSet::new();
        let mut created = 0;
        for open in opens {
            let placement = open.await.unwrap().expect("placed");
            containers.insert(placement.container_id.clone());
            created += usize::from(placement.created);
            assert_eq!(placement.shell, "/bin/sh");
            assert_eq!(placement.working_dir, "/home/alice");
        }
        assert_eq!(containers.len(), 1, "{containers:?}");
        assert_eq!((created, world.runtime.creates()), (1, 1));
        assert_eq!(world.keys("sessions/").await.len(), 20);
        assert_eq!(
            world.keys("containers/").await,
            ["containers/alice/busybox"]
        );
    }

    #[tokio::test]
    async fn the_runtime_gets_the_environments_kubernetes_placement() {
        let world = World::new().await;
        let placement = crate::model::KubernetesPlacement {
            node_selector: [("accelerator".to_owned(), "a100".to_owned())].into(),
            tolerations: vec!["nvidia.com/gpu:NoSchedule".to_owned()],
            image_pull_policy: Some("IfNotPresent".to_owned()),
            image_pull_secrets: vec!["lab-registry".to_owned()],
        };
        let wanted = placement.clone();
        world
            .update_environment("busybox", move |e| e.kubernetes = placement)
            .await;
        let placer = world.placer(fast());
        for environment in ["busybox", "scratch"] {
            placer
                .open(world.request("alice", environment), &no_progress)
                .await
                .unwrap();
        }
        let specs: HashMap<String, _> = world
            .runtime
            .containers()
            .into_iter()
            .map(|(_, c)| (c.spec.environment.clone(), c.spec.kubernetes))
            .collect();
        assert_eq!(specs["busybox"], wanted);
        assert!(specs["scratch"].is_empty());
    }

    #[tokio::test]
    async fn environment_resolution_and_refusals() {
        let world = World::new().await;
        let placer = world.placer(fast());
        let default = placer
            .open(world.request("alice", ""), &no_progress)
            .await
            .unwrap();
        assert_eq!(default.environment, "busybox");

        let err = placer
            .open(world.request("alice", "nope"), &no_progress)
            .await
            .unwrap_err();
        let status = Status::from(err);
        assert_eq!(status.code(), tonic::Code::NotFound);
        assert_eq!(
            status.message(),
            r#"unknown environment "nope"; available: busybox, scratch"#
        );

        let err = placer
            .open(world.request("alice", "x\u{1b}[2J"), &no_progress)
            .await
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            r#"unknown environment "x\u{1b}[2J"; available: busybox, scratch"#
        );

        let err = placer
            .open(world.request("alice", "debian"), &no_progress)
            .await
            .unwrap_err();
        assert_eq!(Status::from(err).code(), tonic::Code::PermissionDenied);
        let staff = placer
            .open(world.request("carol", "debian"), &no_progress)
            .await
            .unwrap();
        assert_eq!(staff.environment, "debian");

        let mut request = world.request("alice", "busybox");
        request.token = "forged.token".into();
        let err = placer.open(request, &no_progress).await.unwrap_err();
        assert_eq!(Status::from(err).code(), tonic::Code::Unauthenticated);

        let mut request = world.request("alice", "busybox");
        request.proxy_id = "ghost".into();
        let status = Status::from(placer.open(request, &no_progress).await.unwrap_err());
        assert_eq!(status.code(), tonic::Code::Unavailable);
        // An unregistered proxy is an outage of the fleet, not the user's doing: the detail
        // is logged, the user reads the short sentence.
        assert!(
            status.message().starts_with(
                "the service is temporarily unavailable; try again in a minute (request id "
            ),
            "{}",
            status.message()
        );

        // The three are read at once, but answered in order: who, then what, then where.
        let nowhere = || OpenRequest {
            proxy_id: "ghost".into(),
            ..world.request("alice", "nope")
        };
        let status = Status::from(placer.open(nowhere(), &no_progress).await.unwrap_err());
        assert_eq!(status.code(), tonic::Code::NotFound);
        let forged = OpenRequest {
            token: "forged.token".into(),
            ..nowhere()
        };
        let status = Status::from(placer.open(forged, &no_progress).await.unwrap_err());
        assert_eq!(status.code(), tonic::Code::Unauthenticated);
    }

    #[tokio::test]
    async fn failed_creation_leaves_nothing_behind() {
        let world = World::new().await;
        let placer = world.placer(fast());
        world.runtime.fail_next_creates(1);
        let err = placer
            .open(world.request("alice", "busybox"), &no_progress)
            .await
            .unwrap_err();
        assert_eq!(Status::from(err).code(), tonic::Code::Internal);
        assert!(world.keys("containers/").await.is_empty());
        assert!(world.keys("sessions/").await.is_empty());
        assert!(world.runtime.containers().is_empty());

        world.runtime.set_image_missing("envgate/busybox:latest");
        let status = Status::from(
            placer
                .open(world.request("alice", "busybox"), &no_progress)
                .await
                .unwrap_err(),
        );
        assert_eq!(status.code(), tonic::Code::FailedPrecondition);
        assert_eq!(
            status.message(),
            r#"image envgate/busybox:latest for environment "busybox" is not available on this host"#
        );
        assert!(world.keys("containers/").await.is_empty());

        world.runtime.set_unavailable(true);
        let status = Status::from(
            placer
                .open(world.request("alice", "scratch"), &no_progress)
                .await
                .unwrap_err(),
        );
        assert_eq!(status.code(), tonic::Code::Unavailable);
        assert!(world.keys("containers/").await.is_empty());
    }

    #[tokio::test]
    async fn ephemeral_containers_live_for_one_session() {
        let world = World::new().await;
        let placer = world.placer(fast());
        let a = placer
            .open(world.request("alice", "scratch"), &no_progress)
            .await
            .unwrap();
        let b = placer
            .open(world.request("alice", "scratch"), &no_progress)
            .await
            .unwrap();
        assert_ne!(a.container_id, b.container_id);
        assert!(a.created && b.created);
        // Proxies never place a session in it again from their cache.
        assert!(!a.persistent && !b.persistent);
        placer.close(&a.session_id).await.unwrap();
        assert_eq!(
            world.container_ids().as_slice(),
            std::slice::from_ref(&b.container_id)
        );
        assert_eq!(
            world.keys("containers/").await,
            [format!("containers/alice/scratch/{}", b.session_id)]
        );
        assert_eq!(
            world.keys("sessions/").await,
            [format!("sessions/{}", b.session_id)]
        );
        placer
            .close(&a.session_id)
            .await
            .expect("closing twice is fine");
        placer
            .close("never-existed")
            .await
            .expect("unknown sessions are fine");
    }

    #[tokio::test]
    async fn a_session_that_could_not_reach_the_agent_gets_its_container_replaced() {
        let world = World::new().await;
        let placer = world.placer(fast());
        let first = placer
            .open(world.request("alice", "busybox"), &no_progress)
            .await
            .unwrap();
        placer
            .close_with(&first.session_id, None, true)
            .await
            .unwrap();
        assert!(world.runtime.containers().is_empty(), "the container stays");
        assert!(world.keys("containers/").await.is_empty());
        let next = placer
            .open(world.request("alice", "busybox"), &no_progress)
            .await
            .unwrap();
        assert!(next.created);
        assert_ne!(next.container_id, first.container_id);
    }

    #[tokio::test]
    async fn closing_a_persistent_session_starts_the_idle_clock() {
        let world = World::new().await;
        // Every session counts as long: its close refreshes the idle clock.
        let placer = world.placer(PlacementConfig {
            touch_after: Duration::ZERO,
            ..fast()
        });
        let placement = placer
            .open(world.request("alice", "busybox"), &no_progress)
            .await
            .unwrap();
        assert!(placement.persistent);
        let key = model::container_key("alice", "busybox");
        world.edit_record(&key, |r| r.last_active_at = 1).await;
        placer.close(&placement.session_id).await.unwrap();
        let after = world.record(&key).await.unwrap();
        assert!(after.last_active_at >= model::now() - 1);
        assert_eq!(after.state, ContainerState::Running);
        assert!(world.keys("sessions/").await.is_empty());
        assert_eq!(
            world.runtime.containers().len(),
            1,
            "persistent containers outlive sessions"
        );
    }

    #[tokio::test]
    async fn a_vanished_or_stopped_container_is_replaced() {
        let world = World::new().await;
        let placer = world.placer(fast());
        let first = placer
            .open(world.request("alice", "busybox"), &no_progress)
            .await
            .unwrap();
        world.runtime.lose(&first.container_id);
        let second = placer
            .open(world.request("alice", "busybox"), &no_progress)
            .await
            .unwrap();
        assert_ne!(first.container_id, second.container_id);
        assert!(second.created);

        world.runtime.stop(&second.container_id);
        let third = placer
            .open(world.request("alice", "busybox"), &no_progress)
            .await
            .unwrap();
        assert!(third.created);
        assert_eq!(
            world.container_ids().as_slice(),
            std::slice::from_ref(&third.container_id),
            "the stopped one is removed"
        );
    }

    #[tokio::test]
    async fn a_stale_claim_is_taken_over_and_a_fresh_one_waited_for() {
        let world = World::new().await;
        let key = model::container_key("alice", "busybox");
        let mut stuck = abandoned_claim("alice", "busybox", "dead-replica");
        store::put_json(world.store.as_ref(), &key, &stuck, None)
            .await
            .unwrap();
        let placer = world.placer(fast());
        let placement = placer
            .open(world.request("alice", "busybox"), &no_progress)
            .await
            .unwrap();
        assert!(placement.created);

        // A fresh claim by another replica: the open waits, then attaches once it is running.
        store::put_json(
            world.store.as_ref(),
            &key,
            &{
                stuck.state_since = model::now();
                stuck.clone()
            },
            None,
        )
        .await
        .unwrap();
        let lines = Arc::new(Mutex::new(Vec::<String>::new()));
        let waiter = {
            let placer = placer.clone();
            let request = world.request("alice", "busybox");
            let lines = lines.clone();
            tokio::spawn(async move {
                let progress = move |l: &str| lines.lock().unwrap().push(l.to_owned());
                placer.open(request, &progress).await
            })
        };
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!waiter.is_finished());
        let running = ContainerRecord {
            state: ContainerState::Running,
            container_id: placement.container_id.clone(),
            ..stuck
        };
        store::put_json(world.store.as_ref(), &key, &running, None)
            .await
            .unwrap();
        let attached = tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(attached.container_id, placement.container_id);
        assert!(!attached.created);
        assert_eq!(
            lines.lock().unwrap().as_slice(),
            [r#"waiting for environment "busybox" …"#]
        );
    }

    /// The property the fleet's capacity rests on (docs/benchmarks.md, "Cost of a login"): a
    /// warm login — the user's container running, logins arriving while others close — costs
    /// etcd one write request and no read: the catalogue, revocation, user, proxy and
    /// placement records come from the watch cache. Its close rides on the next open's
    /// transaction.
    #[tokio::test]
    async fn a_warm_login_costs_one_etcd_write() {
        use crate::store::CachedStore;
        use crate::store::counting::CountingStore;
        let world = World::new().await;
        let counting = Arc::new(CountingStore::new(world.store.clone()));
        let store: Arc<dyn Store> =
            Arc::new(CachedStore::new(counting.clone(), crate::WATCH_CACHED));
        let auth = Arc::new(Authenticator::new(
            store.clone(),
            crate::auth::tests::test_keys(),
            Duration::from_secs(300),
            crate::auth::tests::test_limits(2, 64),
            envgate_proto::audit::AuditLog::in_memory(),
        ));
        let placer = Placer::new(store, world.runtime.clone(), auth, fast());
        let first = placer
            .open(world.request("alice", ""), &no_progress)
            .await
            .unwrap();
        assert!(first.created);
        let mut open = first.session_id;
        let before = counting.counts();
        const LOGINS: usize = 20;
        for _ in 0..LOGINS {
            // The previous session closes while the next login is placed.
            let (closed, next) = tokio::join!(
                placer.close(&open),
                placer.open(world.request("alice", ""), &no_progress)
            );
            closed.unwrap();
            let next = next.unwrap();
            assert!(!next.created);
            open = next.session_id;
        }
        let spent = counting.counts();
        let (writes, reads) = (spent.writes - before.writes, spent.reads - before.reads);
        assert!(
            writes <= LOGINS,
            "{writes} etcd writes for {LOGINS} warm logins"
        );
        assert_eq!(reads, 0, "{reads} etcd reads for {LOGINS} warm logins");
        // Every closed session is gone; the open one is there.
        assert_eq!(world.keys("sessions/").await, [model::session_key(&open)]);
        // A quiet moment: the last close goes in a transaction of its own, soon.
        placer.close(&open).await.unwrap();
        assert!(world.keys("sessions/").await.is_empty());
    }

    /// Alice's login to busybox through a proxy that reports its sessions.
    async fn open_reporting(placer: &Placer, world: &World) -> Placement {
        let request = OpenRequest {
            reports_sessions: true,
            ..world.request("alice", "busybox")
        };
        placer.open(request, &no_progress).await.unwrap()
    }

    fn update(sequence: u64, placement: &Placement, end: Option<SessionEnd>) -> SessionUpdate {
        SessionUpdate {
            sequence,
            session: Some(envgate_proto::v1::UnrecordedSession {
                session_id: placement.session_id.clone(),
                user: placement.user.clone(),
                environment: placement.environment.clone(),
                container_id: placement.container_id.clone(),
                started_at: model::now(),
                ..Default::default()
            }),
            end,
        }
    }

    fn ended(reported: bool) -> Option<SessionEnd> {
        Some(SessionEnd {
            exit_status: 0,
            container_unreachable: false,
            reported,
        })
    }

    /// A proxy that reports its sessions: a warm login writes nothing, one that ends within
    /// its report time never reaches etcd, and one that lasts is recorded from the report,
    /// then closed from its end.
    #[tokio::test]
    async fn warm_logins_of_a_reporting_proxy_are_recorded_only_if_they_last() {
        use crate::store::counting::CountingStore;
        let world = World::new().await;
        let counting = Arc::new(CountingStore::new(world.store.clone()));
        let placer = world.placer_over(counting.clone(), fast());
        // The first login makes the container: recorded as always.
        let first = open_reporting(&placer, &world).await;
        assert!(first.created);
        assert_eq!(first.report_after_ms, 0);
        placer.close(&first.session_id).await.unwrap();
        placer.closed_sessions().settle(world.store.as_ref()).await;
        let before = counting.counts();
        let short = open_reporting(&placer, &world).await;
        let long = open_reporting(&placer, &world).await;
        assert_eq!(short.report_after_ms, REPORT_AFTER.as_millis() as u32);
        assert_eq!(long.container_id, first.container_id);
        assert_eq!(
            counting.counts().writes,
            before.writes,
            "a warm login wrote"
        );
        assert!(world.keys("sessions/").await.is_empty());
        // `short` ends before its report; `long` is reported.
        let updates = [update(1, &short, ended(false)), update(2, &long, None)];
        let gone = placer
            .apply_updates(PROXY, world.lease, &updates)
            .await
            .unwrap();
        assert_eq!(gone.len(), 1);
        assert_eq!(gone[0].0.id, short.session_id);
        assert_eq!(
            world.keys("sessions/").await,
            [model::session_key(&long.session_id)]
        );
        let recorded: SessionRecord =
            store::get_json(world.store.as_ref(), &model::session_key(&long.session_id))
                .await
                .unwrap()
                .unwrap()
                .value;
        assert_eq!(recorded.proxy_id, PROXY);
        assert_eq!(
            recorded.container_key,
            model::container_key("alice", "busybox")
        );
        // The same updates again (a stream that broke before the acknowledgement): no change.
        placer
            .apply_updates(PROXY, world.lease, &updates)
            .await
            .unwrap();
        assert_eq!(
            world.keys("sessions/").await,
            [model::session_key(&long.session_id)]
        );
        // Another proxy cannot end it; its own end removes the record.
        let theirs = [update(3, &long, ended(true))];
        placer
            .apply_updates("proxy-2", world.lease, &theirs)
            .await
            .unwrap();
        assert_eq!(world.keys("sessions/").await.len(), 1);
        placer
            .apply_updates(PROXY, world.lease, &theirs)
            .await
            .unwrap();
        assert!(world.keys("sessions/").await.is_empty());
        let record = world
            .record(&model::container_key("alice", "busybox"))
            .await
            .unwrap();
        assert_eq!(
            record.state,
            ContainerState::Running,
            "persistent containers stay"
        );
    }

    /// A reported session that ends after `touch_after` starts its container's idle clock at
    /// its end, as the close of a recorded one does.
    #[tokio::test]
    async fn the_end_of_a_long_unrecorded_session_starts_the_idle_clock() {
        let (world, clock) = World::with_manual_clock().await;
        let placer = world.placer(fast());
        let key = model::container_key("alice", "busybox");
        open_reporting(&placer, &world).await;
        let warm = open_reporting(&placer, &world).await;
        assert!(warm.report_after_ms > 0);
        let opened = world.record(&key).await.unwrap().last_active_at;
        let mut lasting = update(1, &warm, None);
        lasting.session.as_mut().unwrap().started_at = clock.now();
        placer
            .apply_updates(PROXY, world.lease, &[lasting.clone()])
            .await
            .unwrap();
        clock.advance(Duration::from_secs(61));
        let end = SessionUpdate {
            sequence: 2,
            end: ended(true),
            ..lasting
        };
        placer
            .apply_updates(PROXY, world.lease, &[end])
            .await
            .unwrap();
        let record = world.record(&key).await.unwrap();
        assert_eq!(record.last_active_at, opened + 61);
        assert!(
            !world
                .keys("sessions/")
                .await
                .contains(&model::session_key(&warm.session_id))
        );
    }

    /// When recording is needed anyway, or could not be counted on, the open writes: a proxy
    /// that does not report, an idle clock old enough to refresh, or one with too little of
    /// the idle timeout left for a report to arrive before the reaper looks.
    #[tokio::test]
    async fn an_open_writes_when_it_cannot_leave_the_session_unrecorded() {
        let world = World::new().await;
        let placer = world.placer(fast());
        let key = model::container_key("alice", "busybox");
        open_reporting(&placer, &world).await;
        let silent = placer
            .open(world.request("alice", "busybox"), &no_progress)
            .await
            .unwrap();
        assert_eq!(silent.report_after_ms, 0);
        world.edit_record(&key, |r| r.last_active_at -= 61).await;
        let stale_clock = open_reporting(&placer, &world).await;
        assert_eq!(stale_clock.report_after_ms, 0);
        assert!(world.record(&key).await.unwrap().last_active_at >= model::now() - 1);
        // An idle timeout under a minute: too little time for a report to arrive for sure.
        world
            .update_environment("busybox", |e| e.idle_timeout_seconds = 59)
            .await;
        let short_idle = open_reporting(&placer, &world).await;
        assert_eq!(short_idle.report_after_ms, 0);
        world
            .update_environment("busybox", |e| e.idle_timeout_seconds = 900)
            .await;
        let unrecorded = open_reporting(&placer, &world).await;
        assert!(unrecorded.report_after_ms > 0);
        let sessions = world.keys("sessions/").await;
        for recorded in [&silent, &stale_clock, &short_idle] {
            assert!(sessions.contains(&model::session_key(&recorded.session_id)));
        }
        assert!(!sessions.contains(&model::session_key(&unrecorded.session_id)));
    }

    /// What a proxy reports is checked against the placement records: a session whose
    /// container is no longer the user's is not recorded, an update that describes no session
    /// is skipped without holding up the rest, and an unreachable container is replaced as
    /// CloseSession would replace it.
    #[tokio::test]
    async fn reports_are_checked_and_an_unreachable_unrecorded_session_replaces_its_container() {
        let world = World::new().await;
        let placer = world.placer(fast());
        let key = model::container_key("alice", "busybox");
        let first = open_reporting(&placer, &world).await;
        let warm = open_reporting(&placer, &world).await;
        assert!(warm.report_after_ms > 0);
        let elsewhere = Placement {
            container_id: "not-alices".into(),
            ..warm.clone()
        };
        let mut nameless = update(2, &warm, None);
        nameless.session.as_mut().unwrap().user = "../etc".into();
        let updates = [
            update(1, &elsewhere, None),
            nameless,
            SessionUpdate {
                sequence: 3,
                ..SessionUpdate::default()
            },
        ];
        let gone = placer
            .apply_updates(PROXY, world.lease, &updates)
            .await
            .unwrap();
        assert!(gone.is_empty());
        // Only the first login's session, recorded by its open.
        assert_eq!(
            world.keys("sessions/").await,
            [model::session_key(&first.session_id)]
        );
        let unreachable = Some(SessionEnd {
            exit_status: -1,
            container_unreachable: true,
            reported: false,
        });
        placer
            .apply_updates(PROXY, world.lease, &[update(4, &warm, unreachable)])
            .await
            .unwrap();
        assert!(
            world.record(&key).await.is_none(),
            "the record of an unreachable container goes"
        );
        assert!(
            world.runtime.containers().is_empty(),
            "and so does its container"
        );
        let next = open_reporting(&placer, &world).await;
        assert!(next.created);
    }

    /// Two replicas, each reading placement records from its own watch cache, serve one
    /// user's logins in turn and at once: a record one of them read before the other's write
    /// reached it fails the transaction's compare and is read again, so every login lands in
    /// the one container.
    #[tokio::test]
    async fn replicas_reading_placements_from_their_caches_agree_on_one_container() {
        use crate::store::CachedStore;
        let world = World::new().await;
        let replicas: Vec<Arc<Placer>> = (0..2)
            .map(|_| {
                let store: Arc<dyn Store> =
                    Arc::new(CachedStore::new(world.store.clone(), crate::WATCH_CACHED));
                Arc::new(Placer::new(
                    store,
                    world.runtime.clone(),
                    world.auth.clone(),
                    fast(),
                ))
            })
            .collect();
        let mut containers = HashSet::new();
        for i in 0..6 {
            let placed = replicas[i % 2]
                .open(world.request("alice", "busybox"), &no_progress)
                .await
                .unwrap();
            containers.insert(placed.container_id);
        }
        let together: Vec<_> = (0..8)
            .map(|i| {
                let (placer, request) =
                    (replicas[i % 2].clone(), world.request("alice", "busybox"));
                tokio::spawn(async move { placer.open(request, &no_progress).await })
            })
            .collect();
        for open in together {
            containers.insert(open.await.unwrap().unwrap().container_id);
        }
        assert_eq!(containers.len(), 1, "{containers:?}");
        assert_eq!(world.runtime.creates(), 1);
        // Gone behind everyone's back: the next open on either replica replaces it, once.
        let gone = containers.into_iter().next().unwrap();
        world.runtime.lose(&gone);
        let (a, b) = tokio::join!(
            replicas[0].open(world.request("alice", "busybox"), &no_progress),
            replicas[1].open(world.request("alice", "busybox"), &no_progress),
        );
        let (a, b) = (a.unwrap(), b.unwrap());
        assert_eq!(a.container_id, b.container_id);
        assert_ne!(a.container_id, gone);
        assert_eq!(world.runtime.creates(), 2);
    }

    /// With a runtime that follows its engine's events, a warm login asks the engine nothing;
    /// while the event stream is down every login asks, and a container that stopped is
    /// replaced either way.
    #[tokio::test]
    async fn warm_logins_ask_the_engine_only_when_its_events_do_not_say_it_runs() {
        let world = World::new().await;
        world.runtime.follow_events();
        let placer = world.placer(fast());
        let first = placer
            .open(world.request("alice", "busybox"), &no_progress)
            .await
            .unwrap();
        let liveness = world.runtime.liveness().expect("follows events");
        until("the start event applied", || {
            liveness.known_running(&first.container_id)
        })
        .await;
        let asked = world.runtime.inspects();
        for _ in 0..3 {
            let again = placer
                .open(world.request("alice", "busybox"), &no_progress)
                .await
                .unwrap();
            assert_eq!(again.container_id, first.container_id);
        }
        assert_eq!(world.runtime.inspects(), asked, "no inspect per warm login");

        // The stream breaks and cannot be had again: every login asks the engine.
        world.runtime.break_events(true);
        until("distrusted", || {
            !liveness.known_running(&first.container_id)
        })
        .await;
        placer
            .open(world.request("alice", "busybox"), &no_progress)
            .await
            .unwrap();
        assert_eq!(world.runtime.inspects(), asked + 1);
        world.runtime.stop(&first.container_id);
        let replaced = placer
            .open(world.request("alice", "busybox"), &no_progress)
            .await
            .unwrap();
        assert_ne!(replaced.container_id, first.container_id);

        // Back: resynced from a listing, trusted again.
        world.runtime.break_events(false);
        until("resynced", || {
            liveness.known_running(&replaced.container_id)
        })
        .await;
        let asked = world.runtime.inspects();
        placer
            .open(world.request("alice", "busybox"), &no_progress)
            .await
            .unwrap();
        assert_eq!(world.runtime.inspects(), asked);
        // A stop the stream reports is believed at once: the engine is asked, and says so.
        world.runtime.stop(&replaced.container_id);
        until("the stop event applied", || {
            !liveness.known_running(&replaced.container_id)
        })
        .await;
        let third = placer
            .open(world.request("alice", "busybox"), &no_progress)
            .await
            .unwrap();
        assert_ne!(third.container_id, replaced.container_id);
        assert_eq!(world.runtime.creates(), 3);
    }

    /// A placer whose creations wait in a line of `limit` slots.
    fn admitting(world: &World, limit: usize) -> (Arc<Placer>, Arc<Admission>) {
        let admission = Admission::new(limit);
        let placer = Placer::new(
            world.store.clone(),
            world.runtime.clone(),
            world.auth.clone(),
            fast(),
        )
        .with_admission(admission.clone());
        (Arc::new(placer), admission)
    }

    /// Lets spawned opens run until `done` holds.
    async fn until(what: &str, done: impl Fn() -> bool) {
        tokio::time::timeout(Duration::from_secs(10), async {
            while !done() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("{what}"));
    }

    /// The progress lines an open was shown, and the open.
    type Recorded = (
        Arc<Mutex<Vec<String>>>,
        tokio::task::JoinHandle<Result<Placement, PlacementError>>,
    );

    /// Opens for `user` in a task, recording the progress lines it was shown.
    fn open_recording(placer: &Arc<Placer>, request: OpenRequest) -> Recorded {
        let lines = Arc::new(Mutex::new(Vec::new()));
        let placer = placer.clone();
        let record = lines.clone();
        let task = tokio::spawn(async move {
            let progress = move |l: &str| record.lock().unwrap().push(l.to_owned());
            placer.open(request, &progress).await
        });
        (lines, task)
    }

    #[tokio::test]
    async fn new_users_beyond_the_limit_wait_in_line_told_their_place_and_all_get_in() {
        let world = World::new().await;
        let (placer, admission) = admitting(&world, 2);
        world.runtime.hold_creates();
        let opens: Vec<_> = (0..6)
            .map(|i| open_recording(&placer, world.request(&format!("student{i}"), "busybox")))
            .collect();
        until("two creating, four in line", || {
            world.runtime.creating() == 2 && admission.waiting() == 4
        })
        .await;
        let first_lines: Vec<Option<String>> = opens
            .iter()
            .map(|(lines, _)| lines.lock().unwrap().first().cloned())
            .collect();
        let mut queued: Vec<String> = first_lines
            .iter()
            .flatten()
            .filter(|l| l.starts_with("queued"))
            .cloned()
            .collect();
        queued.sort();
        assert_eq!(
            queued,
            [
                r#"queued to start environment "busybox": 1 user ahead of you"#,
                r#"queued to start environment "busybox": 2 users ahead of you"#,
                r#"queued to start environment "busybox": 3 users ahead of you"#,
                r#"queued to start environment "busybox": you are next"#,
            ],
            "{first_lines:?}"
        );
        assert_eq!(
            first_lines.iter().flatten().count(),
            6,
            "the two let in at once were told they start"
        );
        world.runtime.release_creates();
        for (lines, open) in opens {
            let placement = open.await.unwrap().expect("placed");
            assert!(placement.created);
            let lines = lines.lock().unwrap();
            assert_eq!(
                lines.last().map(String::as_str),
                Some(r#"starting environment "busybox" …"#),
                "{lines:?}"
            );
        }
        assert_eq!(world.runtime.creates(), 6);
        assert_eq!(
            world.runtime.most_creating(),
            2,
            "never more than the limit"
        );
        assert_eq!((admission.running(), admission.waiting()), (0, 0));
    }

    #[tokio::test]
    async fn forty_new_users_at_once_get_forty_distinct_uids() {
        let world = World::new().await;
        let placer = world.placer(fast());
        let opens: Vec<_> = (0..40)
            .map(|i| open_recording(&placer, world.request(&format!("new{i}"), "busybox")).1)
            .collect();
        let mut uids = HashSet::new();
        for open in opens {
            let placement = open.await.unwrap().expect("placed");
            let uid = placement.account.expect("runs as its user").uid;
            assert!(uids.insert(uid), "uid {uid} given twice");
        }
        let first = uids::FIRST_UID;
        assert_eq!(uids, (first..first + 40).collect::<HashSet<u32>>());
    }

    #[tokio::test]
    async fn a_client_gone_while_in_line_leaves_it_and_gets_no_container() {
        let world = World::new().await;
        let (placer, admission) = admitting(&world, 1);
        world.runtime.hold_creates();
        let (_, first) = open_recording(&placer, world.request("alice", "busybox"));
        until("alice creating", || world.runtime.creating() == 1).await;
        let leaving = world.request("bob", "busybox");
        let gone = leaving.caller_gone.clone();
        let (_, bob) = open_recording(&placer, leaving);
        until("bob in line", || admission.waiting() == 1).await;
        let (carol_lines, carol) = open_recording(&placer, world.request("carol", "busybox"));
        until("carol in line", || admission.waiting() == 2).await;
        assert_eq!(
            carol_lines.lock().unwrap().as_slice(),
            [r#"queued to start environment "busybox": 1 user ahead of you"#]
        );
        gone.cancel();
        let err = bob.await.unwrap().unwrap_err();
        assert!(matches!(err, PlacementError::CallerGone), "{err}");
        assert_eq!(admission.waiting(), 1, "bob left the line");
        world.runtime.release_creates();
        first.await.unwrap().expect("alice placed");
        carol.await.unwrap().expect("carol placed");
        assert_eq!(world.runtime.creates(), 2);
        assert_eq!(
            world.keys("containers/").await,
            ["containers/alice/busybox", "containers/carol/busybox"],
            "nothing was claimed or made for bob"
        );
        assert!(
            world
                .runtime
                .containers()
                .iter()
                .all(|(_, c)| c.spec.user != "bob")
        );
    }

    fn limited(max_containers_per_user: usize) -> PlacementConfig {
        PlacementConfig {
            max_containers_per_user,
            ..fast()
        }
    }

    #[tokio::test]
    async fn the_per_user_cap_refuses_a_new_container_but_never_reuse() {
        let world = World::new().await;
        let placer = world.placer(limited(1));
        let first = placer
            .open(world.request("alice", "busybox"), &no_progress)
            .await
            .unwrap();
        let again = placer
            .open(world.request("alice", "busybox"), &no_progress)
            .await
            .unwrap();
        assert_eq!(again.container_id, first.container_id);
        let status = Status::from(
            placer
                .open(world.request("alice", "scratch"), &no_progress)
                .await
                .unwrap_err(),
        );
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        assert_eq!(
            status.message(),
            "you already have 1 environment running (the limit is 1): busybox; \
             stop one with: ssh alice+envgate@<host> stop ENV"
        );
        let records = store::range_json::<ContainerRecord>(
            world.store.as_ref(),
            &model::user_containers("alice"),
        )
        .await
        .unwrap();
        assert_eq!(records.len(), 1, "{records:?}");
        assert_eq!(world.runtime.creates(), 1);
        // Another user is not affected.
        placer
            .open(world.request("carol", "busybox"), &no_progress)
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn racing_first_opens_never_exceed_the_cap() {
        let world = World::new().await;
        world.runtime.set_create_delay(Duration::from_millis(100));
        let requests = (0..8).map(|_| world.request("alice", "scratch")).collect();
        let opens = world.open_on_two_replicas(limited(2), requests);
        let mut placed = 0;
        let mut refused = 0;
        for open in opens {
            match open.await.unwrap() {
                Ok(_) => placed += 1,
                Err(PlacementError::TooManyContainers { limit: 2, .. }) => refused += 1,
                Err(other) => panic!("unexpected: {other}"),
            }
        }
        assert_eq!((placed, refused), (2, 6));
        assert_eq!(world.runtime.creates(), 2);
        let records = store::range_json::<ContainerRecord>(
            world.store.as_ref(),
            &model::user_containers("alice"),
        )
        .await
        .unwrap();
        assert_eq!(records.len(), 2, "{records:?}");
    }
}
