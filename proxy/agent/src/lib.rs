//! envgate-agent runs as PID 1 in every user container and starts session processes on the
//! proxy's request, so a session start costs a fork instead of a Docker exec (~70 ms, and
//! only ~14–22 per second per engine).
//!
//! The crate is both sides of the wire: [`server`] is the agent (the `envgate-agent`
//! binary), [`client`] is what the proxy links. [`protocol`] is the frame format both speak;
//! `docs/agent.md` describes it and `docs/agent-security.md` the trust model.

pub mod auth;
pub mod client;
pub mod connect;
mod flow;
pub mod listen;
pub mod mux;
mod passwd;
pub mod pool;
pub mod protocol;
mod reaper;
pub mod scp;
pub mod seal;
pub mod server;
pub mod sftp;
pub mod signals;
mod spawn;
mod termios;

pub use client::{AgentAddress, AgentClient, AgentError, ConnectOptions, Process};
pub use pool::AgentPool;
pub use protocol::{Account, ExitStatus, Program, PtyRequest, SpawnRequest, WindowSize};
pub use spawn::AccountFiles;

/// Where the agent binary is in a container (mounted read-only by the runtime); the proxy
/// runs `IN_CONTAINER sftp-server` from there for the SFTP subsystem.
pub const IN_CONTAINER: &str = "/.envgate/agent";
/// The argument that makes the binary an SFTP server on stdin and stdout ([`sftp`]).
pub const SFTP_SERVER: &str = "sftp-server";
/// The argument that makes the binary the remote side of `scp -O` ([`scp`]).
pub const SCP: &str = "scp";
/// The argument that makes the binary one forwarded TCP connection ([`connect`]).
pub const CONNECT: &str = "connect";
/// The same for a Unix socket in the container.
pub const CONNECT_UNIX: &str = "connect-unix";
/// The argument that makes the binary a listener for `ssh -R` and `ssh -A` ([`listen`]).
pub const LISTEN: &str = "listen";
