//! envgate-loadtest: N simultaneous `ssh host COMMAND` clients per level, as
//! in the study that measured ContainerSSH, against envgate and (in the same
//! run) a baseline such as a plain OpenSSH `sshd`. Every connection becomes a
//! record; the records become a table, CSV/JSON files and the study's figures.
//!
//! The sweep is a library function ([`sweep::run_sweep`]) so tests can drive
//! it against servers they start themselves.

pub mod client;
pub mod plot;
pub mod report;
pub mod scrape;
pub mod stats;
pub mod sweep;
pub mod users;

pub use client::{ClientKind, ConnectionRecord, Credential, FailureKind};
pub use sweep::{Endpoint, SweepConfig, SweepResult, run_sweep};
