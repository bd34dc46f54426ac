//! One launcher for a whole envgate fleet on one machine: an etcd cluster, control-plane
//! replicas, proxies and HAProxy in front, all on loopback, every hop TLS.
//!
//! Both `deploy/local/fleet` (through the `envgate-fleet` binary) and the e2e harness
//! (`proxy/tests/support`) start their fleets with it, so a fleet is described, keyed and
//! started in one place. A [`Spec`] says what to run and where; a [`Launcher`] starts, stops,
//! kills and restarts each part and waits (bounded) until each is healthy. The tests' fleets
//! are attached (killed with the test); `fleet up`'s are detached and found again from their
//! pid files by the next run (`process`).

pub mod admin;
pub mod chaos;
pub mod docker;
pub mod haproxy;
pub mod keys;
pub mod ldap;
pub mod probe;
pub mod process;

mod launcher;
mod spec;

pub use launcher::{ETCD_PREFIX, Launcher, controlplane_name, etcd_name, proxy_name};
pub use spec::{Bases, HOST, Ports, Spec, free_port};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// Said so the e2e harness can recognise a start that lost a port race and try again.
    #[error("{name} exited while waiting for {what}\n{log}")]
    Exited {
        name: String,
        what: String,
        log: String,
    },
    #[error("{what} not ready after {seconds}s: {last}\n{log}")]
    NotReady {
        what: String,
        seconds: u64,
        last: String,
        log: String,
    },
    #[error("{0}")]
    Failed(String),
}

impl Error {
    /// For `map_err`: an I/O error while doing `what`.
    pub fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
        let what = what.into();
        move |source| Error::Io { what, source }
    }
}
