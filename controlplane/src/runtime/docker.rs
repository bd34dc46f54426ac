//! The Docker runtime (bollard). Every container gets the envgate labels, the user's home
//! volume, and the hardening the security model requires (no-new-privileges, all capabilities
//! dropped but the few a root shell needs, a pids limit, memory/CPU limits when configured).

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::sync::{OnceCell, Semaphore};

use async_trait::async_trait;
use bollard::Docker;
use bollard::errors::Error as BollardError;
use bollard::models::{
    ContainerCreateBody, ContainerSummaryStateEnum, HostConfig, VolumeCreateRequest,
};
use bollard::query_parameters::{
    CreateContainerOptions, ListContainersOptions, RemoveContainerOptions, StartContainerOptions,
};

use super::{
    AgentEndpoint, ContainerSpec, CreatedContainer, ManagedContainer, Runtime, RuntimeError,
    container_name, labels, volume_name,
};

mod pull;

/// Bound on each Docker API call; creation on a loaded engine can take seconds.
const CALL_TIMEOUT: Duration = Duration::from_secs(60);
/// Default pids limit when the environment sets none.
pub const DEFAULT_PIDS_LIMIT: i64 = 512;
/// Capabilities kept so a root shell can still manage files and switch users.
const CAP_ADD: &[&str] = &[
    "CHOWN",
    "DAC_OVERRIDE",
    "FOWNER",
    "SETUID",
    "SETGID",
    "KILL",
];
/// Keeps the container alive without a service inside; exits promptly on `docker stop`.
const KEEP_ALIVE: &[&str] = &[
    "/bin/sh",
    "-c",
    "trap 'exit 0' TERM; while :; do sleep 3600 & wait $!; done",
];

/// Where the agent lives inside a container (docs/agent.md, "Running it").
const AGENT_IN_CONTAINER: &str = "/.envgate/agent";
const AGENT_SOCKET_DIR: &str = "/run/envgate";
const AGENT_SECRET_DIR: &str = "/run/envgate-secret";
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
        let suffix = container_name.rsplit('-').next().unwrap_or(container_name);
        self.dir.join(instance).join(suffix)
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

/// Containers created at once unless configured otherwise.
pub const DEFAULT_CREATE_CONCURRENCY: usize = 8;
/// Bound on one pull of a missing image unless configured otherwise.
pub const DEFAULT_PULL_TIMEOUT: Duration = Duration::from_secs(600);

pub struct DockerRuntime {
    host: Option<String>,
    docker: OnceCell<Docker>,
    agent: Option<AgentSetup>,
    /// Bounds concurrent creations: hundreds of racing `create`+`start` calls slow the engine
    /// down for everyone (and past the call timeout), while a short queue keeps it at its
    /// best rate and lets each opener finish in arrival order.
    creations: Semaphore,
    /// Missing images are pulled once per replica, however many opens wait for them.
    puller: pull::ImagePuller,
}

impl DockerRuntime {
    /// Does no I/O: the engine is reached on first use, so a control plane started while Docker
    /// is down still serves, answers UNAVAILABLE, and recovers once the engine is back.
    pub fn new(host: Option<&str>) -> Self {
        Self {
            host: host.map(str::to_owned),
            docker: OnceCell::new(),
            agent: None,
            creations: Semaphore::new(DEFAULT_CREATE_CONCURRENCY),
            puller: pull::ImagePuller::new(DEFAULT_PULL_TIMEOUT),
        }
    }

    /// Bounds each pull of a missing image (a pull past it fails the opens waiting for it).
    pub fn with_pull_timeout(mut self, timeout: Duration) -> Self {
        self.puller = pull::ImagePuller::new(timeout);
        self
    }

    /// At most `limit` (at least 1) containers are being created at any moment.
    pub fn with_create_concurrency(mut self, limit: usize) -> Self {
        self.creations = Semaphore::new(limit.max(1));
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

    /// The client, connected on first success. The API version is negotiated so an older
    /// engine (this project's CI runs API 1.41) is spoken to in its own version.
    pub async fn docker(&self) -> Result<&Docker, RuntimeError> {
        self.docker
            .get_or_try_init(|| async {
                let docker = match &self.host {
                    Some(host) => Docker::connect_with_host(host),
                    None => Docker::connect_with_local_defaults(),
                }
                .map_err(unavailable)?;
                bounded("negotiate version", docker.negotiate_version()).await
            })
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
        let _slot = self
            .creations
            .acquire()
            .await
            .expect("the creation semaphore is never closed");
        let docker = self.docker().await?;
        let agent = entrypoint.is_some();
        let body = ContainerCreateBody {
            image: Some(spec.image.clone()),
            entrypoint,
            cmd: Some(cmd),
            labels: Some(container_labels(spec)),
            hostname: Some(spec.environment.clone()),
            env: (!spec.env.is_empty()).then(|| spec.env.clone()),
            working_dir: (!spec.working_dir.is_empty()).then(|| spec.working_dir.clone()),
            host_config: Some(host_config(spec, binds, agent)),
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
        binds: Some(binds),
        ..HostConfig::default()
    }
}

#[async_trait]
impl Runtime for DockerRuntime {
    fn name(&self) -> &'static str {
        "docker"
    }

    async fn ensure_volume(&self, instance: &str, user: &str) -> Result<String, RuntimeError> {
        let name = volume_name(instance, user);
        // Creating an existing volume is a no-op in Docker, so this is idempotent.
        let request = VolumeCreateRequest {
            name: Some(name.clone()),
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
        bounded("create volume", self.docker().await?.create_volume(request)).await?;
        Ok(name)
    }

    async fn create_and_start(
        &self,
        spec: &ContainerSpec,
        progress: &(dyn for<'l> Fn(&'l str) + Send + Sync),
    ) -> Result<CreatedContainer, RuntimeError> {
        let docker = self.docker().await?;
        // Before taking a creation slot: a long pull must not hold up other images' creations.
        self.puller.ensure(docker, &spec.image, progress).await?;
        // The caller ensured the volume (see `Runtime::ensure_volume`).
        let volume = volume_name(&spec.instance, &spec.user);
        let name = container_name(&spec.instance, &spec.user, &spec.environment);
        let mut binds = vec![format!("{volume}:/home/{}", spec.user)];
        let (agent, entrypoint, cmd) = match &self.agent {
            Some(setup) => {
                let dir = setup.container_dir(&spec.instance, &name);
                let (endpoint, agent_binds) = setup.prepare(&dir).map_err(|e| {
                    remove_agent_dir(&dir);
                    RuntimeError::Failed(format!(
                        "cannot prepare the agent directory {}: {e}",
                        dir.display()
                    ))
                })?;
                binds.extend(agent_binds);
                let cmd = [
                    "--socket",
                    &format!("{AGENT_SOCKET_DIR}/agent.sock"),
                    "--secret-file",
                    &format!("{AGENT_SECRET_DIR}/secret"),
                ]
                .map(str::to_owned)
                .to_vec();
                (
                    Some((endpoint, dir)),
                    Some(vec![AGENT_IN_CONTAINER.to_owned()]),
                    cmd,
                )
            }
            None => (
                None,
                None,
                KEEP_ALIVE.iter().map(|s| (*s).to_owned()).collect(),
            ),
        };
        let created = self.create_named(spec, &name, binds, entrypoint, cmd).await;
        match (created, agent) {
            (Ok(id), agent) => Ok(CreatedContainer {
                id,
                name,
                agent: agent.map(|(endpoint, _)| endpoint),
            }),
            (Err(e), agent) => {
                if let Some((_, dir)) = agent {
                    remove_agent_dir(&dir);
                }
                Err(e)
            }
        }
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
        // The agent directory is found from the container's name and instance label.
        let agent_dir = match &self.agent {
            Some(setup) => {
                let docker = self.docker().await?;
                match within("inspect container", docker.inspect_container(id, None)).await? {
                    Ok(info) => {
                        let name = info.name.unwrap_or_default();
                        let instance = info
                            .config
                            .and_then(|c| c.labels)
                            .and_then(|l| l.get(labels::INSTANCE).cloned());
                        instance.map(|i| setup.container_dir(&i, name.trim_start_matches('/')))
                    }
                    Err(e) if is_not_found(&e) => None,
                    Err(e) => return Err(classify(e)),
                }
            }
            None => None,
        };
        self.remove_container(id).await?;
        if let Some(dir) = agent_dir {
            remove_agent_dir(&dir);
        }
        Ok(())
    }

    async fn list_managed(&self, instance: &str) -> Result<Vec<ManagedContainer>, RuntimeError> {
        let filters = HashMap::from([(
            "label".to_owned(),
            vec![
                format!("{}={}", labels::MANAGED_BY, labels::MANAGED_BY_VALUE),
                format!("{}={instance}", labels::INSTANCE),
            ],
        )]);
        let options = ListContainersOptions {
            all: true,
            filters: Some(filters),
            ..Default::default()
        };
        let list = bounded(
            "list containers",
            self.docker().await?.list_containers(Some(options)),
        )
        .await?;
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

    async fn sweep(&self, instance: &str, live: &[ManagedContainer]) -> Result<(), RuntimeError> {
        let Some(setup) = &self.agent else {
            return Ok(());
        };
        let keep: HashSet<PathBuf> = live
            .iter()
            .map(|c| setup.container_dir(instance, &c.name))
            .collect();
        let entries = match std::fs::read_dir(setup.dir.join(instance)) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => {
                return Err(RuntimeError::Failed(format!(
                    "reading agent directories: {e}"
                )));
            }
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let old = entry
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age >= SWEEP_GRACE);
            if old && !keep.contains(&path) {
                tracing::info!(dir = %path.display(), "removing the agent directory of a container that is gone");
                remove_agent_dir(&path);
            }
        }
        Ok(())
    }
}
