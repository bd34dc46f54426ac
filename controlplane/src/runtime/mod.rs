//! The container-runtime seam, from the `envgate-runtime` crate: placement, warm pools and
//! the reconciler only see its [`Runtime`] trait. Docker (`envgate_runtime::docker`) is the
//! implementation; the scripted in-memory one serves unit tests. `audited.rs` wraps any of
//! them so every container made, handed over or removed reaches the audit log.

pub mod audited;

pub use envgate_runtime::docker::{self, DockerRuntime, slots};
#[cfg(any(test, feature = "testkit"))]
pub use envgate_runtime::scripted;
pub use envgate_runtime::{
    AgentEndpoint, ContainerSpec, CreatedContainer, Liveness, ManagedContainer, Runtime,
    RuntimeError, RuntimeKind, WarmPool, is_running_cached, labels,
};
pub use envgate_runtime::{
    claimed_container_name, container_name, name_suffix, pool_container_name, volume_name,
};
