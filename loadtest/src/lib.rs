//! envgate-loadtest: N simultaneous `ssh host COMMAND` clients per level, as
//! in the study that measured ContainerSSH, against envgate and (in the same
//! run) a baseline such as a plain OpenSSH `sshd`. Every connection becomes a
//! record; the records become a table, CSV/JSON files and the study's figures.
//!
//! The sweep is a library function ([`sweep::run_sweep`]) so tests can drive
//! it against servers they start themselves, e.g. a fleet test:
//!
//! ```text
//! use envgate_loadtest::{ClientKind, run_sweep, users};
//! use envgate_loadtest::sweep::{Endpoint, SweepConfig, TARGET};
//!
//! let demo = users::credential("demo", Path::new(".fleet/demo_ed25519"))?;
//! let target = Endpoint { label: TARGET.into(), addr: "127.0.0.1:2222".into(), credentials: vec![demo] };
//! let mut config = SweepConfig::new(target, vec![1, 10], "date");
//! config.metrics = vec!["http://127.0.0.1:9101/metrics".into()];
//! let result = run_sweep(&config).await?;
//! assert_eq!(result.failures(), 0, "{}", envgate_loadtest::report::summary_table(&result));
//! ```

pub mod bench_doc;
pub mod client;
pub mod cost;
pub mod hold;
pub mod plot;
pub mod pool_doc;
pub mod report;
pub mod scrape;
pub mod stats;
pub mod storm;
pub mod sweep;
pub mod users;

pub use client::{ClientKind, ConnectionRecord, Credential, FailureKind};
pub use sweep::{Endpoint, SweepConfig, SweepResult, run_sweep};
