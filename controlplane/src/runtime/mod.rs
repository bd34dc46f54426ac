//! The container-runtime seam. Placement and the reconciler only see this trait; Docker
//! (`docker.rs`) is the first implementation, a scripted in-memory one serves unit tests.

use std::collections::HashSet;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;

use crate::model::Gpus;

pub mod audited;
pub mod docker;
#[cfg(any(test, feature = "testkit"))]
pub mod scripted;
pub mod slots;

pub use docker::DockerRuntime;

/// Docker label keys shared with the proxy and operators.
pub mod labels {
    pub const MANAGED_BY: &str = "envgate.managed-by";
    pub const MANAGED_BY_VALUE: &str = "envgate";
    pub const INSTANCE: &str = "envgate.instance";
    pub const USER: &str = "envgate.user";
    pub const ENVIRONMENT: &str = "envgate.environment";
    pub const SESSION: &str = "envgate.session";
    /// `true` on a warm-pool container. Labels cannot change, so a claimed one keeps it and
    /// has no user label: its placement record in etcd says whose it is.
    pub const POOL: &str = "envgate.pool";
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RuntimeError {
    /// The runtime cannot be reached; the message names it ("docker is unavailable: ...").
    #[error("{0}")]
    Unavailable(String),
    /// The image is not present and cannot be pulled.
    #[error("image {0} is not available on this host")]
    ImageMissing(String),
    /// The engine could not pull a missing image; `reason` is the engine's own.
    #[error("cannot pull image {image}: {reason}")]
    PullFailed { image: String, reason: String },
    /// The container asks for GPUs and the engine has no driver that gives them; `reason`
    /// is the engine's own.
    #[error("this host cannot give containers GPUs: {0}")]
    NoGpus(String),
    #[error("{0}")]
    Failed(String),
}

/// What to run for one user+environment (or one session, for ephemeral environments).
#[derive(Debug, Clone, PartialEq)]
pub struct ContainerSpec {
    pub instance: String,
    /// Empty for a warm-pool container, which belongs to nobody until claimed.
    pub user: String,
    pub environment: String,
    /// Set for ephemeral containers.
    pub session: Option<String>,
    pub image: String,
    pub env: Vec<String>,
    pub working_dir: String,
    /// 0 = no limit.
    pub cpus: f64,
    /// 0 = no limit.
    pub memory_bytes: u64,
    pub pids_limit: i64,
    pub gpus: Gpus,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreatedContainer {
    pub id: String,
    pub name: String,
    /// Set when the container runs `envgate-agent` as its init.
    pub agent: Option<AgentEndpoint>,
}

/// How a proxy reaches a container's agent (see `docs/agent.md`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentEndpoint {
    /// The agent's Unix socket on the host, or `host:port`.
    pub address: String,
    /// Hex; the agent reads it from a file only root in that container can read.
    pub secret: String,
}

/// A container carrying this instance's labels, as found in the runtime.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManagedContainer {
    pub id: String,
    pub name: String,
    pub user: String,
    pub environment: String,
    pub session: Option<String>,
    /// Unix seconds.
    pub created_at: i64,
    pub running: bool,
}

#[async_trait]
pub trait Runtime: Send + Sync + 'static {
    /// "docker" or "kubernetes", as reported in placements.
    fn name(&self) -> &'static str;
    /// Creates the user's home volume if missing; returns its name. Never removed by envgate.
    async fn ensure_volume(&self, instance: &str, user: &str) -> Result<String, RuntimeError>;
    /// Creates and starts a container; on failure nothing is left behind. The user's home
    /// volume must exist (`ensure_volume`). Callers bound how many run at once (`admission`). `progress` gets lines for the user while it waits
    /// (an image pull), throttled by the runtime. (The explicit `for<'l>` keeps `async_trait`
    /// from tying the line's lifetime to the call's.)
    async fn create_and_start(
        &self,
        spec: &ContainerSpec,
        progress: &(dyn for<'l> Fn(&'l str) + Send + Sync),
    ) -> Result<CreatedContainer, RuntimeError>;
    /// `false` when stopped or gone.
    async fn is_running(&self, id: &str) -> Result<bool, RuntimeError>;
    /// Removes the container (stopping it first); a container already gone is fine.
    async fn remove(&self, id: &str) -> Result<(), RuntimeError>;
    /// Every container labelled with `instance`, running or not.
    async fn list_managed(&self, instance: &str) -> Result<Vec<ManagedContainer>, RuntimeError>;
    /// `Ok` when this runtime can start containers before their user is known and hand them
    /// over later (warm pools); `Err` says why not. Decided once, at start.
    fn warm_pool_support(&self) -> Result<(), String> {
        Err(format!("the {} runtime has no warm pools", self.name()))
    }
    /// Creates and starts a warm-pool container of `spec.environment` that belongs to nobody
    /// yet (`spec.user` is empty); on failure nothing is left behind.
    async fn create_warm(&self, spec: &ContainerSpec) -> Result<CreatedContainer, RuntimeError> {
        Err(RuntimeError::Failed(format!(
            "the {} runtime has no warm pools ({})",
            self.name(),
            spec.environment
        )))
    }
    /// Hands the running warm container `container` to `spec.user`, making it what
    /// `create_and_start(spec)` would have made: their home volume (created if missing)
    /// appears at `/home/<user>` in it, and no one else's does. Returns the name the container
    /// carries from now on (the rename itself may finish later).
    async fn assign(
        &self,
        container: &CreatedContainer,
        spec: &ContainerSpec,
    ) -> Result<String, RuntimeError> {
        let _ = container;
        Err(RuntimeError::Failed(format!(
            "the {} runtime has no warm pools ({})",
            self.name(),
            spec.environment
        )))
    }
    /// Removes per-container host state (agent directories, home slots) left by containers of
    /// `instance` that are no longer in `live` (removed outside envgate, or by a replica that
    /// died).
    async fn sweep(&self, _instance: &str, _live: &[ManagedContainer]) -> Result<(), RuntimeError> {
        Ok(())
    }
}

/// `envgate-<instance>-<user>-<env>-<8 random hex>`.
pub fn container_name(instance: &str, user: &str, environment: &str) -> String {
    let suffix: u32 = rand::random();
    name_with_suffix(instance, user, environment, &format!("{suffix:08x}"))
}

/// `envgate-<instance>-pool-<env>-<8 random hex>`: a warm container before its claim.
pub fn pool_container_name(instance: &str, environment: &str) -> String {
    container_name(instance, "pool", environment)
}

/// The name a claimed warm container is renamed to: the usual one, same random suffix.
pub fn claimed_container_name(
    instance: &str,
    user: &str,
    environment: &str,
    pool_name: &str,
) -> String {
    name_with_suffix(instance, user, environment, name_suffix(pool_name))
}

/// The random suffix of a container name envgate made (a claimed warm container keeps its
/// pool name's), which names its per-container host directories.
pub fn name_suffix(container_name: &str) -> &str {
    container_name.rsplit('-').next().unwrap_or(container_name)
}

/// The entries of `dir` older than `grace` and not in `keep`: per-container host directories
/// (agent directories, home slots) whose container is gone. Younger ones are left alone, as
/// their container may be being created right now. A missing `dir` has none.
pub(crate) fn stale_dirs(
    dir: &Path,
    keep: &HashSet<PathBuf>,
    grace: Duration,
) -> io::Result<Vec<PathBuf>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    Ok(entries
        .flatten()
        .filter(|entry| {
            entry
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age >= grace)
        })
        .map(|entry| entry.path())
        .filter(|path| !keep.contains(path))
        .collect())
}

fn name_with_suffix(instance: &str, user: &str, environment: &str, suffix: &str) -> String {
    format!("envgate-{instance}-{user}-{environment}-{suffix}")
}

/// `envgate-<instance>-home-<user>`.
pub fn volume_name(instance: &str, user: &str) -> String {
    format!("envgate-{instance}-home-{user}")
}
