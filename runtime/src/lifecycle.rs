//! The control plane's seam: the lifecycle of user containers. Placement, warm pools and the
//! reconciler only see [`Runtime`]; an engine (Docker today) implements it. Warm pools are an
//! optional capability ([`WarmPool`]), reached through [`Runtime::warm_pool`]; so is a cache of
//! which containers run, fed by the engine's events ([`Runtime::liveness`], `liveness.rs`).

use std::fmt;

use async_trait::async_trait;

use crate::liveness::Liveness;
use crate::types::{ContainerSpec, CreatedContainer, ManagedContainer, RuntimeError};

/// Which engine runs user containers; reported in placements and the admin API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RuntimeKind {
    Docker,
    Kubernetes,
    /// The in-memory runtime of unit tests (`scripted`).
    Scripted,
}

impl RuntimeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            RuntimeKind::Docker => "docker",
            RuntimeKind::Kubernetes => "kubernetes",
            RuntimeKind::Scripted => "scripted",
        }
    }
}

impl RuntimeKind {
    /// The kind a record names (`as_str`); `None` for a name no runtime has.
    pub fn from_name(name: &str) -> Option<Self> {
        [
            RuntimeKind::Docker,
            RuntimeKind::Kubernetes,
            RuntimeKind::Scripted,
        ]
        .into_iter()
        .find(|k| k.as_str() == name)
    }

    /// As the wire contract names it.
    pub fn to_wire(self) -> envgate_proto::v1::Runtime {
        use envgate_proto::v1::Runtime as Wire;
        match self {
            RuntimeKind::Docker => Wire::Docker,
            RuntimeKind::Kubernetes => Wire::Kubernetes,
            RuntimeKind::Scripted => Wire::Scripted,
        }
    }
}

impl fmt::Display for RuntimeKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The life of user containers: made, found, checked, removed. Every call is bounded by the
/// implementation (a network wait has a timeout); errors say in one line what failed.
#[async_trait]
pub trait Runtime: Send + Sync + 'static {
    /// The engine, as reported in placements.
    fn kind(&self) -> RuntimeKind;
    /// Makes the user's home storage if missing (a Docker volume, a claim on Kubernetes);
    /// returns its name. Never removed by envgate.
    async fn ensure_home(&self, instance: &str, user: &str) -> Result<String, RuntimeError>;
    /// Creates and starts a container; on failure nothing is left behind. The user's home
    /// must exist (`ensure_home`). Callers bound how many run at once (the control plane's
    /// admission). `progress` gets lines for the user while it waits (an image pull),
    /// throttled by the runtime. (The explicit `for<'l>` keeps `async_trait` from tying the
    /// line's lifetime to the call's.)
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
    /// Removes per-container state outside the containers (agent directories, home slots)
    /// left by containers of `instance` that are no longer in `live` (removed outside envgate,
    /// or by a replica that died). Runtimes that keep none need not implement it.
    async fn sweep(&self, _instance: &str, _live: &[ManagedContainer]) -> Result<(), RuntimeError> {
        Ok(())
    }
    /// Warm pools, when this runtime can start containers before their user is known and
    /// hand them over later; else why not (one line for operators). Decided once, at start.
    fn warm_pool(&self) -> Result<&dyn WarmPool, String> {
        Err(format!("the {} runtime has no warm pools", self.kind()))
    }
    /// What the engine's event stream says runs, when this runtime follows one; callers that
    /// check liveness on a hot path ask it first and call [`Runtime::is_running`] only when
    /// it does not know. `None`: always ask.
    fn liveness(&self) -> Option<&dyn Liveness> {
        None
    }
}

/// Whether `id` runs: from the runtime's liveness cache when it knows, else from the engine.
pub async fn is_running_cached(runtime: &dyn Runtime, id: &str) -> Result<bool, RuntimeError> {
    if runtime.liveness().is_some_and(|l| l.known_running(id)) {
        return Ok(true);
    }
    runtime.is_running(id).await
}

/// Containers started before their user is known, handed over at a claim.
#[async_trait]
pub trait WarmPool: Send + Sync {
    /// Creates and starts a warm-pool container of `spec.environment` that belongs to nobody
    /// yet (`spec.user` is empty); on failure nothing is left behind.
    async fn create_warm(&self, spec: &ContainerSpec) -> Result<CreatedContainer, RuntimeError>;
    /// Hands the running warm container `container` to `spec.user`, making it what
    /// `create_and_start(spec)` would have made: their home (created if missing) appears at
    /// `/home/<user>` in it, and no one else's does. Returns the name the container carries
    /// from now on (the rename itself may finish later).
    async fn assign(
        &self,
        container: &CreatedContainer,
        spec: &ContainerSpec,
    ) -> Result<String, RuntimeError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_round_trip_through_their_names() {
        for kind in [
            RuntimeKind::Docker,
            RuntimeKind::Kubernetes,
            RuntimeKind::Scripted,
        ] {
            assert_eq!(RuntimeKind::from_name(kind.as_str()), Some(kind));
        }
        assert_eq!(RuntimeKind::from_name("podman"), None);
        assert_eq!(
            RuntimeKind::Docker.to_wire().as_str_name(),
            "RUNTIME_DOCKER"
        );
    }
}
