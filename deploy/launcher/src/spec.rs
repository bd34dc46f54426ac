//! What a fleet is made of and where it lives.

use std::net::TcpListener;
use std::path::PathBuf;
use std::time::Duration;

use crate::Error;

/// A fleet: how many of each part, their ports and directories, and the flags they get.
#[derive(Debug, Clone)]
pub struct Spec {
    /// `--instance` of the control planes: the label of the fleet's containers and volumes.
    pub instance: String,
    /// Keys (`pki/`, `host_ed25519`, `token.key`, `admin.token`), `haproxy.cfg`, etcd's data
    /// (`etcd-N/`), `agents/`, `recordings/`.
    pub dir: PathBuf,
    /// `NAME.log` of each process.
    pub logs: PathBuf,
    /// `NAME.pid` of each process and HAProxy's stats socket.
    pub run: PathBuf,
    /// Where `envgate-controlplane` and `envgate-proxy` are.
    pub bin_dir: PathBuf,
    pub etcd_binary: PathBuf,
    /// etcd cluster members (1 or 3 make sense: 3 survive the loss of one).
    pub etcd_members: usize,
    /// Control-plane replicas; every proxy is given all of them.
    pub controlplanes: usize,
    pub ports: Ports,
    /// Proxy `n`'s id (its certificate's) is this followed by `n`.
    pub proxy_id_prefix: String,
    /// The operator the admin token in `admin.token` belongs to.
    pub admin_name: String,
    /// The static agent (`--agent-binary`); `None`: sessions start through Docker exec, and
    /// then the proxies get `--docker-host`.
    pub agent: Option<PathBuf>,
    /// The catalogue file (`--environments`).
    pub environments: Option<PathBuf>,
    /// More flags for every control-plane replica (e.g. `--ldap-*`, `--user-ca-key`).
    pub controlplane_args: Vec<String>,
    /// Environment of every envgate process (e.g. `RUST_LOG`).
    pub env: Vec<(String, String)>,
    /// Environments with a port of their own: a `--pinned-listen` on every proxy and an
    /// HAProxy frontend each.
    pub pinned: Vec<String>,
    /// `--shutdown-grace-seconds` of every proxy.
    pub shutdown_grace: Duration,
    /// How long each part gets to become healthy.
    pub wait: Duration,
    /// Processes outlive the launcher (`fleet up`) rather than die with it (tests).
    pub detach: bool,
    pub audit_log: PathBuf,
}

/// Where the parts listen, all on 127.0.0.1.
#[derive(Debug, Clone)]
pub enum Ports {
    /// Picked free when each part is first started (tests running side by side).
    Free,
    /// Fixed, from these bases (`deploy/local/fleet`: what users type stays the same).
    Fixed(Bases),
}

/// Member `i` of etcd: client `etcd + 2i`, peer `etcd + 2i + 1`. Replica `r`: gRPC
/// `controlplane_grpc + r`, ops `controlplane_ops + r`. Proxy `n`: SSH `proxy_ssh + n`, ops
/// `proxy_ops + n`, pinned environment `k` at `proxy_pinned + 100k + n`. HAProxy: `haproxy`,
/// pinned environment `k` at `haproxy_pinned + k`.
#[derive(Debug, Clone, Copy)]
pub struct Bases {
    pub etcd: u16,
    pub controlplane_grpc: u16,
    pub controlplane_ops: u16,
    pub proxy_ssh: u16,
    pub proxy_ops: u16,
    pub proxy_pinned: u16,
    pub haproxy: u16,
    pub haproxy_pinned: u16,
}

pub const HOST: &str = "127.0.0.1";

impl Ports {
    pub(crate) fn etcd(&self, member: usize) -> Result<(u16, u16), Error> {
        match self {
            Ports::Free => Ok((free_port()?, free_port()?)),
            Ports::Fixed(b) => Ok((offset(b.etcd, 2 * member)?, offset(b.etcd, 2 * member + 1)?)),
        }
    }

    pub(crate) fn controlplane(&self, replica: usize) -> Result<(u16, u16), Error> {
        match self {
            Ports::Free => Ok((free_port()?, free_port()?)),
            Ports::Fixed(b) => Ok((
                offset(b.controlplane_grpc, replica)?,
                offset(b.controlplane_ops, replica)?,
            )),
        }
    }

    /// Proxy `n`: SSH, ops and one port per pinned environment.
    pub(crate) fn proxy(&self, n: usize, pinned: usize) -> Result<(u16, u16, Vec<u16>), Error> {
        match self {
            Ports::Free => Ok((
                free_port()?,
                free_port()?,
                (0..pinned).map(|_| free_port()).collect::<Result<_, _>>()?,
            )),
            Ports::Fixed(b) => Ok((
                offset(b.proxy_ssh, n)?,
                offset(b.proxy_ops, n)?,
                (0..pinned)
                    .map(|k| offset(b.proxy_pinned, 100 * k + n))
                    .collect::<Result<_, _>>()?,
            )),
        }
    }

    /// HAProxy: the SSH port and one per pinned environment.
    pub(crate) fn haproxy(&self, pinned: usize) -> Result<(u16, Vec<u16>), Error> {
        match self {
            Ports::Free => Ok((
                free_port()?,
                (0..pinned).map(|_| free_port()).collect::<Result<_, _>>()?,
            )),
            Ports::Fixed(b) => Ok((
                b.haproxy,
                (0..pinned)
                    .map(|k| offset(b.haproxy_pinned, k))
                    .collect::<Result<_, _>>()?,
            )),
        }
    }
}

fn offset(base: u16, by: usize) -> Result<u16, Error> {
    u16::try_from(by)
        .ok()
        .and_then(|by| base.checked_add(by))
        .ok_or_else(|| Error::Failed(format!("port {base} + {by} is past 65535")))
}

/// A port free on 127.0.0.1 now. Another process may take it before ours binds it; the
/// harness starts such a fleet again (`Error::Exited`).
pub fn free_port() -> Result<u16, Error> {
    let listener = TcpListener::bind((HOST, 0)).map_err(Error::io("bind 127.0.0.1:0"))?;
    Ok(listener
        .local_addr()
        .map_err(Error::io("bind 127.0.0.1:0"))?
        .port())
}

impl Spec {
    /// A spec with the launcher's defaults: one etcd member, one replica, ports picked free,
    /// logs and pid files in `dir`, attached processes.
    pub fn new(instance: &str, dir: PathBuf, bin_dir: PathBuf) -> Spec {
        Spec {
            instance: instance.to_owned(),
            logs: dir.clone(),
            run: dir.clone(),
            audit_log: dir.join("audit.jsonl"),
            dir,
            bin_dir,
            etcd_binary: PathBuf::from("/usr/bin/etcd"),
            etcd_members: 1,
            controlplanes: 1,
            ports: Ports::Free,
            proxy_id_prefix: format!("{instance}-p"),
            admin_name: "fleet-admin".to_owned(),
            agent: None,
            environments: None,
            controlplane_args: Vec::new(),
            env: Vec::new(),
            pinned: Vec::new(),
            shutdown_grace: Duration::from_secs(30),
            wait: Duration::from_secs(60),
            detach: false,
        }
    }
}
