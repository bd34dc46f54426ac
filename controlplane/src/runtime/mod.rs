//! The container-runtime seam. Placement and the reconciler only see this trait; Docker
//! (`docker.rs`) is the first implementation, a scripted in-memory one serves unit tests.

use async_trait::async_trait;

pub mod audited;
pub mod docker;
pub mod kubernetes;
#[cfg(any(test, feature = "testkit"))]
pub mod scripted;
pub mod slots;

pub use docker::DockerRuntime;

pub use envgate_runtime::{
    AgentEndpoint, ContainerSpec, CreatedContainer, ManagedContainer, RuntimeError, labels,
};
pub use envgate_runtime::{
    claimed_container_name, container_name, name_suffix, pool_container_name, stale_dirs,
    volume_name,
};

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
