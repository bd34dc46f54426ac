//! envgate control plane: authentication, placement, container lifecycle, the proxy fleet
//! registry and the admin API. State lives in etcd; `main.rs` only parses config and calls `run`.

pub mod admin;
pub mod auth;
pub mod error;
#[cfg(test)]
mod fixtures;
pub mod fleet;
pub mod model;
pub mod placement;
pub mod reconcile;
pub mod runtime;
pub mod store;

#[cfg(any(test, feature = "testkit"))]
pub mod testkit;
