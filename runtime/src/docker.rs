//! The Docker runtime (bollard), all of envgate's Docker code: container lifecycle and warm
//! pools for the control plane (here, `pull.rs`, `network.rs`, `slots.rs`) and Docker exec for
//! the proxy (`exec.rs`). Every container gets the envgate labels, the user's home
//! volume, and the hardening the security model requires (no-new-privileges, all capabilities
//! dropped but the few a root shell needs, a pids limit, memory/CPU limits when configured).

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::sync::OnceCell;

use async_trait::async_trait;
use bollard::Docker;
use bollard::errors::Error as BollardError;
use bollard::models::{
    ContainerCreateBody, ContainerSummaryStateEnum, DeviceRequest, HostConfig, Volume,
    VolumeCreateRequest,
};
use bollard::query_parameters::{
    CreateContainerOptions, ListContainersOptions, RemoveContainerOptions, RenameContainerOptions,
    StartContainerOptions,
};

use crate::lifecycle::{Runtime, RuntimeKind, WarmPool};
use crate::liveness::{self, Liveness, LivenessCache};
use crate::types::{
    AGENT_IN_CONTAINER, AGENT_SECRET_DIR, AgentEndpoint, ContainerSpec, CreatedContainer, Gpus,
    ManagedContainer, RuntimeError, claimed_container_name, container_name, labels, name_suffix,
    pool_container_name, stale_dirs, volume_name,
};
use slots::HomeSlots;

pub mod events;
pub mod exec;
pub mod network;
mod pull;
pub mod slots;

pub use crate::types::CAP_ADD;
pub use exec::DockerExec;

use network::UserNetwork;

/// Bound on each Docker API call; creation on a loaded engine can take seconds.
const CALL_TIMEOUT: Duration = Duration::from_secs(60);
/// Default pids limit when the environment sets none.
pub const DEFAULT_PIDS_LIMIT: i64 = 512;
/// Keeps the container alive without a service inside; exits promptly on `docker stop`.
const KEEP_ALIVE: &[&str] = &[
    "/bin/sh",
    "-c",
    "trap 'exit 0' TERM; while :; do sleep 3600 & wait $!; done",
];

/// Where the agent's socket lives inside a container (docs/agent.md, "Running it").
const AGENT_SOCKET_DIR: &str = "/run/envgate";
/// Per-container agent directories younger than this are never swept: their container may be
/// being created right now.
const SWEEP_GRACE: Duration = Duration::from_secs(600);

/// How containers get `envgate-agent` as their init.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentSetup {
    /// The static agent binary on the host (`proxy/agent/build-static`), mounted read-only.
    pub binary: PathBuf,
    /// Per-container directories live in `<dir>/<instance>/<container name suffix>/`, each
    /// with `sock/` (the agent's socket) and `secret/secret`; all root-only.
    pub dir: PathBuf,
}

impl AgentSetup {
    /// `<dir>/<instance>/<the container name's random suffix>`: short, because the socket
    /// path inside it must fit in 107 bytes.
    fn container_dir(&self, instance: &str, container_name: &str) -> PathBuf {
        self.dir.join(instance).join(name_suffix(container_name))
    }

    /// Makes the container's directory with a fresh secret; returns the endpoint and binds.
    fn prepare(&self, dir: &Path) -> std::io::Result<(AgentEndpoint, Vec<String>)> {
        let mut builder = std::fs::DirBuilder::new();
        builder.recursive(true).mode(0o700);
        builder.create(dir.join("sock"))?;
        builder.create(dir.join("secret"))?;
        let secret: String = rand::random::<[u8; 32]>()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o400)
            .open(dir.join("secret/secret"))?
            .write_all(secret.as_bytes())?;
        let binds = vec![
            format!("{}:{AGENT_IN_CONTAINER}:ro", self.binary.display()),
            format!("{}:{AGENT_SOCKET_DIR}", dir.join("sock").display()),
            format!("{}:{AGENT_SECRET_DIR}:ro", dir.join("secret").display()),
        ];
        let endpoint = AgentEndpoint {
            address: dir.join("sock/agent.sock").display().to_string(),
            secret,
        };
        Ok((endpoint, binds))
    }
}

fn remove_agent_dir(dir: &Path) {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            tracing::warn!(dir = %dir.display(), error = %e, "removing an agent directory failed")
        }
    }
}

/// A new container's agent (endpoint, host directory, binds), if any, and its command.
type AgentParts = (Option<(AgentEndpoint, PathBuf, Vec<String>)>, Vec<String>);

/// Bound on one pull of a missing image unless configured otherwise.
pub const DEFAULT_PULL_TIMEOUT: Duration = Duration::from_secs(600);

pub struct DockerRuntime {
    host: Option<String>,
    docker: OnceCell<Docker>,
    agent: Option<AgentSetup>,
    /// Missing images are pulled once per replica, however many opens wait for them.
    puller: pull::ImagePuller,
    /// Where warm containers' homes are mounted (`slots.rs`), or why warm pools are off.
    slots: Result<HomeSlots, String>,
    /// The network user containers join (`None`: Docker's default bridge, not isolated).
    network: Option<UserNetwork>,
    /// Set once the network was made and checked (retried on the next creation after a failure).
    network_ready: OnceCell<()>,
    /// Which containers run, from Docker's event stream (`with_liveness_cache`).
    liveness: Option<FollowedLiveness>,
}

/// A liveness cache and the task that feeds it, stopped when the runtime is dropped.
struct FollowedLiveness {
    cache: std::sync::Arc<LivenessCache>,
    follower: tokio::task::JoinHandle<()>,
}

impl Drop for FollowedLiveness {
    fn drop(&mut self) {
        self.follower.abort();
    }
}

impl DockerRuntime {
    /// Does no I/O: the engine is reached on first use, so a control plane started while Docker
    /// is down still serves, answers UNAVAILABLE, and recovers once the engine is back.
    pub fn new(host: Option<&str>) -> Self {
        Self {
            host: host.map(str::to_owned),
            docker: OnceCell::new(),
            agent: None,
            puller: pull::ImagePuller::new(DEFAULT_PULL_TIMEOUT),
            slots: Err("no home slots directory is configured".into()),
            network: Some(UserNetwork::default()),
            network_ready: OnceCell::new(),
            liveness: None,
        }
    }

    /// Follows Docker's events about `instance`'s containers (in a task of its own, from now
    /// on), so [`Runtime::liveness`] answers "it runs" without an inspect; must be called
    /// within a Tokio runtime. See `liveness.rs` for when the cache is trusted.
    pub fn with_liveness_cache(mut self, instance: &str) -> Self {
        let cache = std::sync::Arc::new(LivenessCache::default());
        let feed = events::DockerFeed::new(self.host.as_deref(), instance);
        let followed = cache.clone();
        let follower = tokio::spawn(async move { liveness::follow(&followed, &feed).await });
        self.liveness = Some(FollowedLiveness { cache, follower });
        self
    }

    /// The network user containers join; `None` leaves them on Docker's default bridge, where
    /// they can reach each other and the host (a warning says so).
    pub fn with_network(mut self, network: Option<UserNetwork>) -> Self {
        if network.is_none() {
            tracing::warn!(
                "user containers are on Docker's default bridge: they can reach each other and this host's services"
            );
        }
        self.network = network;
        self
    }

    /// Makes sure the user network exists, isolates, and is firewalled from the host, before
    /// the first container joins it. A failure fails that creation and is tried again next
    /// time: a container is never started less isolated than configured.
    async fn ensure_network(&self, docker: &Docker) -> Result<Option<&str>, RuntimeError> {
        let Some(network) = &self.network else {
            return Ok(None);
        };
        self.network_ready
            .get_or_try_init(|| network.ensure(docker))
            .await?;
        Ok(Some(&network.name))
    }

    /// Enables warm pools with home slots under `root` (see `slots.rs`) when this host allows
    /// it: the control plane runs as root, next to a local Docker engine, and can make `root`
    /// a shared mount. Otherwise warm pools stay off; either way one line says so.
    pub fn with_home_slots(mut self, root: Option<&Path>) -> Self {
        let remote = self
            .host
            .as_deref()
            .filter(|h| !h.starts_with("unix://") && !h.starts_with('/'));
        self.slots = match (root, remote) {
            (None, _) => Err("--home-slots-dir is empty".into()),
            (Some(_), Some(host)) => Err(format!(
                "Docker is reached at {host}, and a remote engine cannot see this host's mounts"
            )),
            (Some(root), None) => HomeSlots::prepare(root),
        };
        match &self.slots {
            Ok(slots) => {
                tracing::info!(slots = %slots.root().display(), "warm pools enabled: homes are mounted into warm containers through home slots")
            }
            Err(reason) => {
                tracing::warn!(%reason, "warm pools are disabled: environments' warm_pool_size is ignored and every first login creates its container")
            }
        }
        metrics::gauge!("envgate_warm_pools_enabled").set(if self.slots.is_ok() {
            1.0
        } else {
            0.0
        });
        self
    }

    /// Where warm containers' homes are mounted, or why warm pools are off.
    fn slots(&self) -> Result<&HomeSlots, RuntimeError> {
        self.slots
            .as_ref()
            .map_err(|reason| RuntimeError::Failed(format!("warm pools are disabled: {reason}")))
    }

    /// Creates `user`'s home volume if it is missing and returns it. Creating an existing
    /// volume is a no-op in Docker that answers with the volume (its mount point included), so
    /// this is idempotent and one call.
    async fn home_volume(&self, instance: &str, user: &str) -> Result<Volume, RuntimeError> {
        let name = volume_name(instance, user);
        let request = VolumeCreateRequest {
            name: Some(name),
            labels: Some(HashMap::from([
                (
                    labels::MANAGED_BY.to_owned(),
                    labels::MANAGED_BY_VALUE.to_owned(),
                ),
                (labels::INSTANCE.to_owned(), instance.to_owned()),
                (labels::USER.to_owned(), user.to_owned()),
            ])),
            ..VolumeCreateRequest::default()
        };
        bounded("create volume", self.docker().await?.create_volume(request)).await
    }

    /// Creates and starts `name` with its home bind `home` and, when configured, the agent as
    /// its init (its directory, binds and command); a user's container and a warm one alike.
    /// On failure nothing is left of the agent's directory.
    async fn create_with_agent(
        &self,
        spec: &ContainerSpec,
        name: String,
        home: String,
    ) -> Result<CreatedContainer, RuntimeError> {
        let mut binds = vec![home];
        let (agent, cmd) = self.agent_parts(&spec.instance, &name)?;
        let entrypoint = agent.as_ref().map(|(_, _, agent_binds)| {
            binds.extend(agent_binds.iter().cloned());
            vec![AGENT_IN_CONTAINER.to_owned()]
        });
        match self.create_named(spec, &name, binds, entrypoint, cmd).await {
            Ok(id) => Ok(CreatedContainer {
                id,
                name,
                agent: agent.map(|(endpoint, _, _)| endpoint),
            }),
            Err(e) => {
                if let Some((_, dir, _)) = agent {
                    remove_agent_dir(&dir);
                }
                Err(e)
            }
        }
    }

    /// The agent's endpoint, directory and binds for a new container `name`, and the command
    /// (`None`: no agent, the keep-alive loop). The caller removes the directory if the
    /// container is not made.
    fn agent_parts(&self, instance: &str, name: &str) -> Result<AgentParts, RuntimeError> {
        let Some(setup) = &self.agent else {
            return Ok((None, KEEP_ALIVE.iter().map(|s| (*s).to_owned()).collect()));
        };
        let dir = setup.container_dir(instance, name);
        let (endpoint, binds) = setup.prepare(&dir).map_err(|e| {
            remove_agent_dir(&dir);
            RuntimeError::Failed(format!(
                "cannot prepare the agent directory {}: {e}",
                dir.display()
            ))
        })?;
        let cmd = [
            "--socket",
            &format!("{AGENT_SOCKET_DIR}/agent.sock"),
            "--secret-file",
            &format!("{AGENT_SECRET_DIR}/secret"),
        ]
        .map(str::to_owned)
        .to_vec();
        Ok((Some((endpoint, dir, binds)), cmd))
    }

    /// Bounds each pull of a missing image (a pull past it fails the opens waiting for it).
    pub fn with_pull_timeout(mut self, timeout: Duration) -> Self {
        self.puller = pull::ImagePuller::new(timeout);
        self
    }

    /// Containers created from now on run `envgate-agent` as their init (`None`: they keep
    /// a shell loop and sessions start through Docker exec).
    pub fn with_agent(mut self, agent: Option<AgentSetup>) -> Self {
        self.agent = agent;
        self
    }

    /// Reaches the engine now; for callers that want to fail early.
    pub async fn connect(host: Option<&str>) -> Result<Self, RuntimeError> {
        let runtime = Self::new(host);
        runtime.docker().await?;
        Ok(runtime)
    }

    /// The client, connected on first success (`connect`).
    pub async fn docker(&self) -> Result<&Docker, RuntimeError> {
        self.docker
            .get_or_try_init(|| connect(self.host.as_deref()))
            .await
    }

    /// Creates and starts `name`; a container that fails to start is removed again.
    async fn create_named(
        &self,
        spec: &ContainerSpec,
        name: &str,
        binds: Vec<String>,
        entrypoint: Option<Vec<String>>,
        cmd: Vec<String>,
    ) -> Result<String, RuntimeError> {
        let docker = self.docker().await?;
        let network = self.ensure_network(docker).await?;
        let agent = entrypoint.is_some();
        let body = ContainerCreateBody {
            image: Some(spec.image.clone()),
            entrypoint,
            cmd: Some(cmd),
            labels: Some(container_labels(spec)),
            hostname: Some(spec.environment.clone()),
            env: (!spec.env.is_empty()).then(|| spec.env.clone()),
            working_dir: (!spec.working_dir.is_empty()).then(|| spec.working_dir.clone()),
            host_config: Some(HostConfig {
                network_mode: network.map(str::to_owned),
                ..host_config(spec, binds, agent)
            }),
            ..ContainerCreateBody::default()
        };
        let options = CreateContainerOptions {
            name: Some(name.to_owned()),
            ..Default::default()
        };
        let created = bounded(
            "create container",
            docker.create_container(Some(options), body),
        )
        .await?;
        if let Err(e) = bounded(
            "start container",
            docker.start_container(&created.id, None::<StartContainerOptions>),
        )
        .await
        {
            // Leave nothing half-made behind.
            if let Err(cleanup) = self.remove_container(&created.id).await {
                tracing::warn!(container = %created.id, error = %cleanup, "removing a container that failed to start");
            }
            if spec.gpus != Gpus::None && is_missing_gpu_driver(&e) {
                return Err(RuntimeError::NoGpus(e.to_string()));
            }
            return Err(e);
        }
        Ok(created.id)
    }

    async fn remove_container(&self, id: &str) -> Result<(), RuntimeError> {
        let options = RemoveContainerOptions {
            force: true,
            ..Default::default()
        };
        let docker = self.docker().await?;
        match within(
            "remove container",
            docker.remove_container(id, Some(options)),
        )
        .await?
        {
            Ok(()) => Ok(()),
            Err(e) if is_not_found(&e) => Ok(()),
            // 409: a removal is already in progress, which is what we want.
            Err(BollardError::DockerResponseServerError {
                status_code: 409, ..
            }) => Ok(()),
            Err(e) => Err(classify(e)),
        }
    }
}

/// A client of the engine at `host` (`None`: the local defaults), in the engine's API version
/// (this project's CI runs API 1.41).
async fn connect(host: Option<&str>) -> Result<Docker, RuntimeError> {
    let docker = match host {
        Some(host) => Docker::connect_with_host(host),
        None => Docker::connect_with_local_defaults(),
    }
    .map_err(unavailable)?;
    bounded("negotiate version", docker.negotiate_version()).await
}

/// The label filter of `instance`'s containers.
fn managed_filter(instance: &str) -> HashMap<String, Vec<String>> {
    HashMap::from([(
        "label".to_owned(),
        vec![
            format!("{}={}", labels::MANAGED_BY, labels::MANAGED_BY_VALUE),
            format!("{}={instance}", labels::INSTANCE),
        ],
    )])
}

/// Every container of `instance`, running or not.
async fn list_managed_with(
    docker: &Docker,
    instance: &str,
) -> Result<Vec<ManagedContainer>, RuntimeError> {
    let options = ListContainersOptions {
        all: true,
        filters: Some(managed_filter(instance)),
        ..Default::default()
    };
    let list = bounded("list containers", docker.list_containers(Some(options))).await?;
    Ok(list
        .into_iter()
        .filter_map(|c| {
            let labels_of = c.labels.unwrap_or_default();
            Some(ManagedContainer {
                id: c.id?,
                name: c
                    .names
                    .and_then(|n| n.into_iter().next())
                    .map(|n| n.trim_start_matches('/').to_owned())
                    .unwrap_or_default(),
                user: labels_of.get(labels::USER).cloned().unwrap_or_default(),
                environment: labels_of
                    .get(labels::ENVIRONMENT)
                    .cloned()
                    .unwrap_or_default(),
                session: labels_of.get(labels::SESSION).cloned(),
                created_at: c.created.unwrap_or(0),
                running: c.state == Some(ContainerSummaryStateEnum::RUNNING),
            })
        })
        .collect())
}

fn unavailable(e: BollardError) -> RuntimeError {
    RuntimeError::Unavailable(format!("docker is unavailable: {e}"))
}

fn is_not_found(e: &BollardError) -> bool {
    matches!(
        e,
        BollardError::DockerResponseServerError {
            status_code: 404,
            ..
        }
    )
}

/// Server-side errors are failures of this request; anything else means the engine is not
/// reachable.
fn classify(e: BollardError) -> RuntimeError {
    match e {
        BollardError::DockerResponseServerError {
            status_code,
            message,
        } => RuntimeError::Failed(format!("docker answered {status_code}: {message}")),
        other => unavailable(other),
    }
}

/// Bounds a call in time; the caller classifies the engine's answer.
async fn within<T>(
    what: &str,
    call: impl Future<Output = Result<T, BollardError>>,
) -> Result<Result<T, BollardError>, RuntimeError> {
    tokio::time::timeout(CALL_TIMEOUT, call).await.map_err(|_| {
        RuntimeError::Unavailable(format!(
            "docker is unavailable: {what} took longer than {} s",
            CALL_TIMEOUT.as_secs()
        ))
    })
}

async fn bounded<T>(
    what: &str,
    call: impl Future<Output = Result<T, BollardError>>,
) -> Result<T, RuntimeError> {
    within(what, call).await?.map_err(classify)
}

fn container_labels(spec: &ContainerSpec) -> HashMap<String, String> {
    let mut out = HashMap::from([
        (
            labels::MANAGED_BY.to_owned(),
            labels::MANAGED_BY_VALUE.to_owned(),
        ),
        (labels::INSTANCE.to_owned(), spec.instance.clone()),
        (labels::USER.to_owned(), spec.user.clone()),
        (labels::ENVIRONMENT.to_owned(), spec.environment.clone()),
    ]);
    if let Some(session) = &spec.session {
        out.insert(labels::SESSION.to_owned(), session.clone());
    }
    if spec.user.is_empty() {
        out.remove(labels::USER);
        out.insert(labels::POOL.to_owned(), "true".to_owned());
    }
    out
}

fn host_config(spec: &ContainerSpec, binds: Vec<String>, agent: bool) -> HostConfig {
    HostConfig {
        // The agent is the init when there is one; else Docker's (tini) reaps.
        init: Some(!agent),
        security_opt: Some(vec!["no-new-privileges".to_owned()]),
        cap_drop: Some(vec!["ALL".to_owned()]),
        cap_add: Some(CAP_ADD.iter().map(|c| (*c).to_owned()).collect()),
        pids_limit: Some(if spec.pids_limit > 0 {
            spec.pids_limit
        } else {
            DEFAULT_PIDS_LIMIT
        }),
        memory: (spec.memory_bytes > 0)
            .then(|| i64::try_from(spec.memory_bytes).unwrap_or(i64::MAX)),
        nano_cpus: (spec.cpus > 0.0).then_some((spec.cpus * 1e9) as i64),
        device_requests: gpu_request(spec.gpus).map(|r| vec![r]),
        binds: Some(binds),
        ..HostConfig::default()
    }
}

/// What `docker run --gpus all` (or `--gpus N`) sends: no driver named, so the engine picks
/// the one with the `gpu` capability (the NVIDIA Container Toolkit's).
fn gpu_request(gpus: Gpus) -> Option<DeviceRequest> {
    let count = match gpus {
        Gpus::None => return None,
        Gpus::All => -1,
        Gpus::Count(n) => i64::from(n),
    };
    Some(DeviceRequest {
        driver: Some(String::new()),
        count: Some(count),
        capabilities: Some(vec![vec!["gpu".to_owned()]]),
        ..DeviceRequest::default()
    })
}

/// The engine's refusal of a device request it has no driver for (at start, not create).
fn is_missing_gpu_driver(e: &RuntimeError) -> bool {
    matches!(e, RuntimeError::Failed(m) if m.contains("could not select device driver"))
}

#[async_trait]
impl Runtime for DockerRuntime {
    fn kind(&self) -> RuntimeKind {
        RuntimeKind::Docker
    }

    async fn ensure_home(&self, instance: &str, user: &str) -> Result<String, RuntimeError> {
        Ok(self.home_volume(instance, user).await?.name)
    }

    async fn create_and_start(
        &self,
        spec: &ContainerSpec,
        progress: &(dyn for<'l> Fn(&'l str) + Send + Sync),
    ) -> Result<CreatedContainer, RuntimeError> {
        let docker = self.docker().await?;
        // Before taking a creation slot: a long pull must not hold up other images' creations.
        self.puller.ensure(docker, &spec.image, progress).await?;
        // The caller ensured the volume (see `Runtime::ensure_home`).
        let volume = volume_name(&spec.instance, &spec.user);
        let name = container_name(&spec.instance, &spec.user, &spec.environment);
        let home = format!("{volume}:/home/{}", spec.user);
        self.create_with_agent(spec, name, home).await
    }

    fn warm_pool(&self) -> Result<&dyn WarmPool, String> {
        self.slots
            .as_ref()
            .map(|_| self as &dyn WarmPool)
            .map_err(Clone::clone)
    }

    async fn is_running(&self, id: &str) -> Result<bool, RuntimeError> {
        let docker = self.docker().await?;
        match within("inspect container", docker.inspect_container(id, None)).await? {
            Ok(info) => Ok(info.state.and_then(|s| s.running).unwrap_or(false)),
            Err(e) if is_not_found(&e) => Ok(false),
            Err(e) => Err(classify(e)),
        }
    }

    async fn remove(&self, id: &str) -> Result<(), RuntimeError> {
        // The agent directory and home slot are found from the container's name and instance
        // label: (instance, name).
        let owner = if self.agent.is_some() || self.slots.is_ok() {
            let docker = self.docker().await?;
            match within("inspect container", docker.inspect_container(id, None)).await? {
                Ok(info) => {
                    let name = info.name.unwrap_or_default();
                    let instance = info
                        .config
                        .and_then(|c| c.labels)
                        .and_then(|l| l.get(labels::INSTANCE).cloned());
                    instance.map(|i| (i, name.trim_start_matches('/').to_owned()))
                }
                Err(e) if is_not_found(&e) => None,
                Err(e) => return Err(classify(e)),
            }
        } else {
            None
        };
        self.remove_container(id).await?;
        if let Some((instance, name)) = owner {
            // The home slot first: it unmounts the user's home and never deletes through it.
            if let Some(dir) = self
                .slots
                .as_ref()
                .ok()
                .and_then(|s| s.container_dir(&instance, &name))
            {
                slots::release(&dir);
            }
            if let Some(setup) = &self.agent {
                remove_agent_dir(&setup.container_dir(&instance, &name));
            }
        }
        Ok(())
    }

    async fn list_managed(&self, instance: &str) -> Result<Vec<ManagedContainer>, RuntimeError> {
        list_managed_with(self.docker().await?, instance).await
    }

    fn liveness(&self) -> Option<&dyn Liveness> {
        self.liveness
            .as_ref()
            .map(|l| l.cache.as_ref() as &dyn Liveness)
    }

    async fn sweep(&self, instance: &str, live: &[ManagedContainer]) -> Result<(), RuntimeError> {
        if let Ok(slots) = &self.slots {
            let keep: HashSet<PathBuf> = live
                .iter()
                .filter_map(|c| slots.container_dir(instance, &c.name))
                .collect();
            slots.sweep(instance, &keep, SWEEP_GRACE);
        }
        let Some(setup) = &self.agent else {
            return Ok(());
        };
        let keep: HashSet<PathBuf> = live
            .iter()
            .map(|c| setup.container_dir(instance, &c.name))
            .collect();
        let stale = stale_dirs(&setup.dir.join(instance), &keep, SWEEP_GRACE)
            .map_err(|e| RuntimeError::Failed(format!("reading agent directories: {e}")))?;
        for path in stale {
            tracing::info!(dir = %path.display(), "removing the agent directory of a container that is gone");
            remove_agent_dir(&path);
        }
        Ok(())
    }
}

#[async_trait]
impl WarmPool for DockerRuntime {
    async fn create_warm(&self, spec: &ContainerSpec) -> Result<CreatedContainer, RuntimeError> {
        let slots = self.slots()?;
        let docker = self.docker().await?;
        self.puller
            .ensure(docker, &spec.image, &|_: &str| {})
            .await?;
        let name = pool_container_name(&spec.instance, &spec.environment);
        let dir = slots.container_dir(&spec.instance, &name).ok_or_else(|| {
            RuntimeError::Failed(format!("no home slot for instance {:?}", spec.instance))
        })?;
        let home = slots.create(&dir).map_err(|e| {
            slots::release(&dir);
            RuntimeError::Failed(format!("cannot make the home slot {}: {e}", dir.display()))
        })?;
        self.create_with_agent(spec, name, home)
            .await
            .inspect_err(|_| slots::release(&dir))
    }

    async fn assign(
        &self,
        container: &CreatedContainer,
        spec: &ContainerSpec,
    ) -> Result<String, RuntimeError> {
        let slots = self.slots()?;
        let dir = slots
            .container_dir(&spec.instance, &container.name)
            .ok_or_else(|| RuntimeError::Failed(format!("{} has no home slot", container.name)))?;
        let volume = self.home_volume(&spec.instance, &spec.user).await?;
        let mountpoint = volume.mountpoint;
        if mountpoint.is_empty() {
            return Err(RuntimeError::Failed(format!(
                "volume {} has no mount point on this host",
                volume.name
            )));
        }
        let docker = self.docker().await?;
        slots
            .mount_home(&dir, &spec.user, Path::new(&mountpoint))
            .map_err(|e| {
                RuntimeError::Failed(format!(
                    "cannot mount {}'s home into {}: {e}",
                    spec.user, container.name
                ))
            })?;
        // Only for `docker ps`: the etcd record says whose container it is, so the rename
        // stays off the user's wait.
        let name = claimed_container_name(
            &spec.instance,
            &spec.user,
            &spec.environment,
            &container.name,
        );
        let (docker, id, new_name) = (docker.clone(), container.id.clone(), name.clone());
        tokio::spawn(async move {
            let options = RenameContainerOptions { name: new_name };
            if let Err(e) = bounded("rename container", docker.rename_container(&id, options)).await
            {
                tracing::warn!(container = %id, error = %e, "renaming a claimed warm container failed");
            }
        });
        Ok(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alices_busybox(instance: &str) -> ContainerSpec {
        ContainerSpec::new(instance, "alice", "busybox", "envgate/busybox:latest")
    }

    fn device_requests(gpus: Gpus) -> Option<Vec<DeviceRequest>> {
        let spec = ContainerSpec {
            gpus,
            ..alices_busybox("t")
        };
        host_config(&spec, Vec::new(), true).device_requests
    }

    #[test]
    fn gpus_become_the_device_request_docker_run_gpus_sends() {
        assert_eq!(device_requests(Gpus::None), None);
        let all = &device_requests(Gpus::All).unwrap()[0];
        assert_eq!(all.count, Some(-1));
        assert_eq!(all.driver.as_deref(), Some(""));
        assert_eq!(all.capabilities, Some(vec![vec!["gpu".to_owned()]]));
        assert_eq!(all.device_ids, None);
        let two = &device_requests(Gpus::Count(2)).unwrap()[0];
        assert_eq!(two.count, Some(2));
        assert_eq!(two.capabilities, all.capabilities);
        // The body Docker receives: the engine's own field names.
        let json = serde_json::to_value(host_config(
            &ContainerSpec {
                gpus: Gpus::Count(2),
                ..alices_busybox("t")
            },
            Vec::new(),
            true,
        ))
        .unwrap();
        assert_eq!(
            json["DeviceRequests"],
            serde_json::json!([{"Driver": "", "Count": 2, "Capabilities": [["gpu"]]}])
        );
    }

    #[test]
    fn only_the_missing_driver_answer_means_no_gpus() {
        let refusal = RuntimeError::Failed(
            "docker answered 500: could not select device driver \"\" with capabilities: [[gpu]]"
                .into(),
        );
        assert!(is_missing_gpu_driver(&refusal));
        assert!(!is_missing_gpu_driver(&RuntimeError::Failed(
            "docker answered 500: OCI runtime create failed".into()
        )));
        assert!(!is_missing_gpu_driver(&RuntimeError::Unavailable(
            "docker is unavailable: could not select device driver".into()
        )));
    }
}
