//! What the control plane asks of a runtime and gets back, with no engine in it: container
//! specifications, the containers found, errors, the labels every envgate container carries,
//! and the names envgate gives containers and homes.

use std::collections::{BTreeMap, HashSet};
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Label keys shared with the proxy and operators (Docker labels; Kubernetes labels mirror
/// them).
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

/// Linux capabilities a user's container keeps on every runtime, so a root shell can still
/// manage files and switch users; all others are dropped (the e2e tests check a session's
/// effective set against this list).
pub const CAP_ADD: &[&str] = &[
    "CHOWN",
    "DAC_OVERRIDE",
    "FOWNER",
    "SETUID",
    "SETGID",
    "KILL",
];

/// Where the agent lives in a user's container on every runtime (docs/agent.md).
pub const AGENT_IN_CONTAINER: &str = "/.envgate/agent";
pub const AGENT_SECRET_DIR: &str = "/run/envgate-secret";

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

/// The host's GPUs a container gets (the catalogue's `gpus:`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Gpus {
    #[default]
    None,
    All,
    Count(u32),
}

impl Gpus {
    pub fn is_none(&self) -> bool {
        *self == Gpus::None
    }
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
    /// Where and how the container runs on Kubernetes; other runtimes ignore it.
    pub kubernetes: KubernetesPlacement,
}

/// Where and how an environment's Pods run on Kubernetes, as an operator writes it (the
/// catalogue file's per-environment `kubernetes:` block, the admin API's
/// `Environment.kubernetes`) and as the environment's record keeps it. The Kubernetes runtime
/// checks it (`kubernetes::settings`) and applies it; other runtimes ignore it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KubernetesPlacement {
    /// Node labels a Pod's node must carry.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    /// `key[=value]:Effect`, one toleration each.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<String>,
    /// `Always`, `IfNotPresent` or `Never`; `None`: the cluster's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_pull_policy: Option<String>,
    /// Secrets in the users' namespace holding registry credentials.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub image_pull_secrets: Vec<String>,
}

impl KubernetesPlacement {
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

impl ContainerSpec {
    /// `user`'s container of `environment` from `image` in `instance`: no session, no
    /// environment variables, no limits. Set the other fields with struct update syntax.
    pub fn new(instance: &str, user: &str, environment: &str, image: &str) -> Self {
        Self {
            instance: instance.into(),
            user: user.into(),
            environment: environment.into(),
            session: None,
            image: image.into(),
            env: Vec::new(),
            working_dir: String::new(),
            cpus: 0.0,
            memory_bytes: 0,
            pids_limit: 0,
            gpus: Gpus::None,
            kubernetes: KubernetesPlacement::default(),
        }
    }
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

/// Unix seconds now.
pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
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
pub fn stale_dirs(
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

/// `envgate-<instance>-home-<user>`: the user's home storage (a Docker volume; a claim on
/// Kubernetes).
pub fn volume_name(instance: &str, user: &str) -> String {
    format!("envgate-{instance}-home-{user}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claimed_warm_containers_keep_their_suffix() {
        let pool = pool_container_name("default", "busybox");
        assert!(pool.starts_with("envgate-default-pool-busybox-"), "{pool}");
        let claimed = claimed_container_name("default", "alice", "busybox", &pool);
        assert_eq!(name_suffix(&claimed), name_suffix(&pool));
        assert!(claimed.starts_with("envgate-default-alice-busybox-"));
        assert_eq!(
            volume_name("default", "alice"),
            "envgate-default-home-alice"
        );
    }

    #[test]
    fn young_and_kept_directories_are_not_stale() {
        let dir = tempfile::tempdir().unwrap();
        let old = dir.path().join("old");
        let kept = dir.path().join("kept");
        std::fs::create_dir(&old).unwrap();
        std::fs::create_dir(&kept).unwrap();
        let keep = HashSet::from([kept.clone()]);
        assert_eq!(
            stale_dirs(dir.path(), &keep, Duration::ZERO).unwrap(),
            [old]
        );
        assert!(
            stale_dirs(dir.path(), &keep, Duration::from_secs(3600))
                .unwrap()
                .is_empty()
        );
        assert!(
            stale_dirs(&dir.path().join("missing"), &keep, Duration::ZERO)
                .unwrap()
                .is_empty()
        );
    }
}
