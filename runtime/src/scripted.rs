//! An in-memory runtime for tests: records what was asked, and can be told to fail,
//! to be slow, or to lose containers, so placement and reaping can be tested without Docker.
//! With [`ScriptedRuntime::follow_events`] it also keeps a liveness cache from events of its
//! own, whose stream a test can break.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use futures::stream::BoxStream;
use tokio::sync::broadcast;

use crate::lifecycle::{Runtime, RuntimeKind, WarmPool};
use crate::liveness::{self, Change, Feed, Liveness, LivenessCache};
use crate::types::{
    ContainerSpec, CreatedContainer, ManagedContainer, RuntimeError, claimed_container_name,
    container_name, pool_container_name, volume_name,
};

#[derive(Debug, Clone)]
pub struct ScriptedContainer {
    pub spec: ContainerSpec,
    pub name: String,
    pub running: bool,
    pub created_at: i64,
}

#[derive(Default)]
struct State {
    next_id: u64,
    containers: BTreeMap<String, ScriptedContainer>,
    volumes: BTreeSet<String>,
    missing_images: HashSet<String>,
    fail_creates: usize,
    unavailable: bool,
    inspect_delay: Duration,
    creates: usize,
    removes: usize,
    /// Warm pools: off when set (`warm_pool` says why), failing assigns, counts.
    warm_unsupported: bool,
    fail_assigns: usize,
    warm_creates: usize,
    assigns: usize,
    inspects: usize,
    /// New subscriptions to the events fail while set.
    events_down: bool,
}

pub struct ScriptedRuntime {
    state: Mutex<State>,
    create_delay: Mutex<Duration>,
    /// While `true`, creations wait (after counting themselves in `creating`).
    held: tokio::sync::watch::Sender<bool>,
    creating: AtomicUsize,
    most_creating: AtomicUsize,
    /// Every start and stop, for the liveness cache (replaced to break its streams).
    events: Mutex<broadcast::Sender<Change>>,
    liveness: OnceLock<Arc<LivenessCache>>,
}

impl Default for ScriptedRuntime {
    fn default() -> Self {
        Self {
            state: Mutex::default(),
            create_delay: Mutex::default(),
            held: tokio::sync::watch::Sender::new(false),
            creating: AtomicUsize::new(0),
            most_creating: AtomicUsize::new(0),
            events: Mutex::new(broadcast::channel(1024).0),
            liveness: OnceLock::new(),
        }
    }
}

impl ScriptedRuntime {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn emit(&self, change: Change) {
        let _ = self
            .events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .send(change);
    }

    /// From now on [`Runtime::liveness`] answers from a cache that follows this runtime's
    /// starts and stops (`liveness::follow`, as Docker's does its events).
    pub fn follow_events(self: &Arc<Self>) {
        let cache = Arc::new(LivenessCache::default());
        let (feed, followed) = (self.clone(), cache.clone());
        tokio::spawn(async move { liveness::follow(&followed, feed.as_ref()).await });
        let _ = self.liveness.set(cache);
    }
    /// Ends every event stream now; with `down`, new subscriptions fail until called again
    /// with `false`.
    pub fn break_events(&self, down: bool) {
        self.lock().events_down = down;
        *self.events.lock().unwrap_or_else(|p| p.into_inner()) = broadcast::channel(1024).0;
    }
    /// `is_running` calls so far.
    pub fn inspects(&self) -> usize {
        self.lock().inspects
    }

    /// Creations from now on wait (inside the runtime) until `release_creates`.
    pub fn hold_creates(&self) {
        self.held.send_replace(true);
    }
    pub fn release_creates(&self) {
        self.held.send_replace(false);
    }
    /// Creations inside the runtime now (held ones included).
    pub fn creating(&self) -> usize {
        self.creating.load(Ordering::SeqCst)
    }
    /// The most creations that were ever inside the runtime at once.
    pub fn most_creating(&self) -> usize {
        self.most_creating.load(Ordering::SeqCst)
    }

    /// Every create waits this long first, to widen race windows.
    pub fn set_create_delay(&self, delay: Duration) {
        *self.create_delay.lock().unwrap_or_else(|p| p.into_inner()) = delay;
    }
    pub fn set_image_missing(&self, image: &str) {
        self.lock().missing_images.insert(image.to_owned());
    }
    /// The next `n` creates fail after the delay.
    pub fn fail_next_creates(&self, n: usize) {
        self.lock().fail_creates = n;
    }
    pub fn set_unavailable(&self, unavailable: bool) {
        self.lock().unavailable = unavailable;
    }
    /// Every `is_running` waits this long first, to widen race windows.
    pub fn set_inspect_delay(&self, delay: Duration) {
        self.lock().inspect_delay = delay;
    }
    /// Simulates a container that died or was removed behind envgate's back.
    pub fn lose(&self, id: &str) {
        self.lock().containers.remove(id);
        self.emit(Change::Stopped(id.to_owned()));
    }
    /// Simulates a container whose process exited: it still exists but is not running.
    pub fn stop(&self, id: &str) {
        if let Some(c) = self.lock().containers.get_mut(id) {
            c.running = false;
        }
        self.emit(Change::Stopped(id.to_owned()));
    }
    /// Simulates a container left over from a crashed replica.
    pub fn insert_unknown(&self, spec: ContainerSpec, created_at: i64) -> String {
        let name = container_name(&spec.instance, &spec.user, &spec.environment);
        let id = insert(&mut self.lock(), spec, name, created_at);
        self.emit(Change::Started(id.clone()));
        id
    }
    pub fn containers(&self) -> Vec<(String, ScriptedContainer)> {
        self.lock()
            .containers
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }
    pub fn volumes(&self) -> Vec<String> {
        self.lock().volumes.iter().cloned().collect()
    }
    pub fn creates(&self) -> usize {
        self.lock().creates
    }
    /// Warm-pool containers created (not counted in `creates`).
    pub fn warm_creates(&self) -> usize {
        self.lock().warm_creates
    }
    /// Warm containers handed to a user.
    pub fn assigns(&self) -> usize {
        self.lock().assigns
    }
    /// `false`: the runtime says warm pools cannot work (as Docker does when not root).
    pub fn set_warm_pools_supported(&self, supported: bool) {
        self.lock().warm_unsupported = !supported;
    }
    /// The next `n` assigns of warm containers fail (the home cannot be mounted).
    pub fn fail_next_assigns(&self, n: usize) {
        self.lock().fail_assigns = n;
    }
    pub fn removes(&self) -> usize {
        self.lock().removes
    }

    fn check_available(&self) -> Result<(), RuntimeError> {
        if self.lock().unavailable {
            Err(RuntimeError::Unavailable(
                "scripted runtime is unavailable".into(),
            ))
        } else {
            Ok(())
        }
    }

    /// A user's container (`create_and_start`) or a warm one (`create_warm`): the same
    /// checks, delay and scripted failures; counted apart, and named as each is.
    async fn create(
        &self,
        spec: &ContainerSpec,
        warm: bool,
    ) -> Result<CreatedContainer, RuntimeError> {
        self.check_available()?;
        if self.lock().missing_images.contains(&spec.image) {
            return Err(RuntimeError::ImageMissing(spec.image.clone()));
        }
        let now = self.creating.fetch_add(1, Ordering::SeqCst) + 1;
        self.most_creating.fetch_max(now, Ordering::SeqCst);
        let delay = *self.create_delay.lock().unwrap_or_else(|p| p.into_inner());
        tokio::time::sleep(delay).await;
        let _ = self.held.subscribe().wait_for(|held| !held).await;
        self.creating.fetch_sub(1, Ordering::SeqCst);
        let mut state = self.lock();
        if state.fail_creates > 0 {
            state.fail_creates -= 1;
            return Err(RuntimeError::Failed("scripted create failure".into()));
        }
        let name = if warm {
            state.warm_creates += 1;
            pool_container_name(&spec.instance, &spec.environment)
        } else {
            state.creates += 1;
            container_name(&spec.instance, &spec.user, &spec.environment)
        };
        let id = insert(&mut state, spec.clone(), name.clone(), crate::types::now());
        drop(state);
        self.emit(Change::Started(id.clone()));
        Ok(CreatedContainer {
            id,
            name,
            agent: None,
        })
    }
}

/// Adds a running container with the next id; returns the id.
fn insert(state: &mut State, spec: ContainerSpec, name: String, created_at: i64) -> String {
    state.next_id += 1;
    let id = format!("c{}", state.next_id);
    state.containers.insert(
        id.clone(),
        ScriptedContainer {
            spec,
            name,
            running: true,
            created_at,
        },
    );
    id
}

#[async_trait]
impl Runtime for ScriptedRuntime {
    fn kind(&self) -> RuntimeKind {
        RuntimeKind::Scripted
    }

    async fn ensure_home(&self, instance: &str, user: &str) -> Result<String, RuntimeError> {
        self.check_available()?;
        let name = volume_name(instance, user);
        self.lock().volumes.insert(name.clone());
        Ok(name)
    }

    async fn create_and_start(
        &self,
        spec: &ContainerSpec,
        _progress: &(dyn for<'l> Fn(&'l str) + Send + Sync),
    ) -> Result<CreatedContainer, RuntimeError> {
        self.create(spec, false).await
    }

    fn warm_pool(&self) -> Result<&dyn WarmPool, String> {
        if self.lock().warm_unsupported {
            Err("scripted: warm pools are off".into())
        } else {
            Ok(self)
        }
    }

    async fn is_running(&self, id: &str) -> Result<bool, RuntimeError> {
        self.check_available()?;
        let delay = {
            let mut state = self.lock();
            state.inspects += 1;
            state.inspect_delay
        };
        tokio::time::sleep(delay).await;
        Ok(self.lock().containers.get(id).is_some_and(|c| c.running))
    }

    async fn remove(&self, id: &str) -> Result<(), RuntimeError> {
        self.check_available()?;
        let mut state = self.lock();
        if state.containers.remove(id).is_some() {
            state.removes += 1;
        }
        drop(state);
        self.emit(Change::Stopped(id.to_owned()));
        Ok(())
    }

    fn liveness(&self) -> Option<&dyn Liveness> {
        self.liveness.get().map(|c| c.as_ref() as &dyn Liveness)
    }

    async fn list_managed(&self, instance: &str) -> Result<Vec<ManagedContainer>, RuntimeError> {
        self.check_available()?;
        Ok(self
            .lock()
            .containers
            .iter()
            .filter(|(_, c)| c.spec.instance == instance)
            .map(|(id, c)| ManagedContainer {
                id: id.clone(),
                name: c.name.clone(),
                user: c.spec.user.clone(),
                environment: c.spec.environment.clone(),
                session: c.spec.session.clone(),
                created_at: c.created_at,
                running: c.running,
            })
            .collect())
    }
}

#[async_trait]
impl WarmPool for ScriptedRuntime {
    async fn create_warm(&self, spec: &ContainerSpec) -> Result<CreatedContainer, RuntimeError> {
        self.create(spec, true).await
    }

    /// The container's spec takes the user (as if their home were mounted) and its name.
    async fn assign(
        &self,
        container: &CreatedContainer,
        spec: &ContainerSpec,
    ) -> Result<String, RuntimeError> {
        self.check_available()?;
        let mut state = self.lock();
        if state.fail_assigns > 0 {
            state.fail_assigns -= 1;
            return Err(RuntimeError::Failed("scripted assign failure".into()));
        }
        let name = claimed_container_name(
            &spec.instance,
            &spec.user,
            &spec.environment,
            &container.name,
        );
        let Some(c) = state.containers.get_mut(&container.id) else {
            return Err(RuntimeError::Failed(format!("{} is gone", container.id)));
        };
        if !c.spec.user.is_empty() {
            return Err(RuntimeError::Failed(format!(
                "{} already belongs to {}",
                container.id, c.spec.user
            )));
        }
        c.spec.user = spec.user.clone();
        c.spec.session = spec.session.clone();
        c.name = name.clone();
        state
            .volumes
            .insert(volume_name(&spec.instance, &spec.user));
        state.assigns += 1;
        Ok(name)
    }
}

#[async_trait]
impl Feed for ScriptedRuntime {
    async fn subscribe(
        &self,
    ) -> Result<BoxStream<'static, Result<Change, RuntimeError>>, RuntimeError> {
        if self.lock().events_down {
            return Err(RuntimeError::Unavailable("scripted events are down".into()));
        }
        let rx = self
            .events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .subscribe();
        Ok(futures::stream::unfold(rx, |mut rx| async move {
            match rx.recv().await {
                Ok(change) => Some((Ok(change), rx)),
                Err(broadcast::error::RecvError::Lagged(n)) => Some((
                    Err(RuntimeError::Unavailable(format!("missed {n} events"))),
                    rx,
                )),
                Err(broadcast::error::RecvError::Closed) => None,
            }
        })
        .boxed())
    }

    async fn running(&self) -> Result<Vec<String>, RuntimeError> {
        self.check_available()?;
        Ok(self
            .lock()
            .containers
            .iter()
            .filter(|(_, c)| c.running)
            .map(|(id, _)| id.clone())
            .collect())
    }
}
