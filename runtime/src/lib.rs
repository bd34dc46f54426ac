//! envgate's container runtimes behind two small seams:
//!
//! - [`Runtime`] (`lifecycle.rs`): the control plane's side. Containers are created, listed,
//!   inspected and removed; a user's home storage is made; warm pools are an optional
//!   capability ([`Runtime::warm_pool`]) that a runtime may lack, and so is a liveness cache
//!   fed by the engine's events ([`Runtime::liveness`], `liveness.rs`).
//! - [`ProcessRuntime`] (`session.rs`): the proxy's side. A session begins in a placed
//!   container at a [`SessionTarget`]: its agent (Unix socket or TCP), or the engine's exec.
//!
//! The types both sides share (`types.rs`) carry no engine. Engines live in modules of their
//! own behind cargo features (`docker`, `kubernetes`), so a build without them links none of their code.
//! `scripted` (feature `testkit`) is an in-memory runtime for unit tests, and `conformance`
//! (also `testkit`) the behaviours every lifecycle implementation must show.

#[cfg(any(test, feature = "testkit"))]
pub mod conformance;
#[cfg(feature = "docker")]
pub mod docker;
#[cfg(feature = "kubernetes")]
pub mod kubernetes;
pub mod lifecycle;
pub mod liveness;
#[cfg(any(test, feature = "testkit"))]
pub mod scripted;
pub mod session;
pub mod types;

pub use lifecycle::{Runtime, RuntimeKind, WarmPool, is_running_cached};
pub use liveness::{Liveness, LivenessCache};
pub use session::{
    AgentTarget, ExecError, ExitSignal, Output, OutputStream, ProcessControl, ProcessEnd,
    ProcessRuntime, ProcessSpec, SessionTarget, StartedProcess, TerminalSize,
};
pub use types::{
    AgentEndpoint, ContainerSpec, CreatedContainer, Gpus, KubernetesPlacement, ManagedContainer,
    RuntimeError, claimed_container_name, container_name, labels, name_suffix, now,
    pool_container_name, stale_dirs, volume_name,
};
