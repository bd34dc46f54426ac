//! envgate-proxy: terminates SSH (russh), authenticates users through the
//! control plane with a token cache, asks the control plane where to place
//! each session, and streams the session straight into the user's container.

pub mod auth;
pub mod auth_cache;
pub mod close_queue;
pub mod config;
pub mod connections;
pub mod controlplane;
pub mod drain;
pub mod error;
pub mod exec;
pub mod fleet;
pub mod forwarded;
pub mod handler;
pub mod limits;
pub mod menu;
pub mod placement_cache;
pub mod proxy_protocol;
pub mod recording;
pub mod selfservice;
pub mod server;
pub mod session;
pub mod session_updates;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use envgate_proto::ops::{Readiness, serve_ops};
use envgate_proto::v1::Register;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::Authenticator;
use crate::auth_cache::AuthCache;
use crate::close_queue::CloseQueue;
pub use crate::config::Config;
use crate::connections::Registry;
use crate::controlplane::ControlPlane;
use crate::drain::Drain;
use crate::error::ProxyError;
use crate::exec::ProcessRuntime;
use crate::exec::agent::AgentRuntime;
use crate::fleet::FleetMember;
use crate::limits::{PreauthBudget, UserConnections};
use crate::placement_cache::PlacementCache;
use crate::server::ServerContext;
use crate::session::SessionServices;
use crate::session_updates::SessionLedger;

/// Authentication requests (refused key offers included) one connection may make.
pub const MAX_AUTH_ATTEMPTS: usize = 20;

/// After the shutdown grace, connections get this long to say goodbye.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an exiting proxy waits for its last session updates to be acknowledged: they
/// leave every 200 ms, so a replica that answers at all answers well within it.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(2);

/// A proxy whose ports are bound; [`Proxy::run`] serves them.
pub struct Proxy {
    ssh_listener: TcpListener,
    /// `--pinned-listen`: each listener with its environment.
    pinned_listeners: Vec<(TcpListener, Arc<str>)>,
    ops_listener: Option<TcpListener>,
    context: Arc<ServerContext>,
    fleet: FleetMember,
    drain: Drain,
    readiness: Readiness,
    metrics: Option<PrometheusHandle>,
    shutdown_grace: Duration,
    control_plane: ControlPlane,
    closes: Arc<CloseQueue>,
    ledger: Arc<SessionLedger>,
}

/// Binds an SSH listener on `addr`; a failure names `what` was being bound.
async fn bind(what: &'static str, addr: SocketAddr) -> Result<TcpListener, ProxyError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| ProxyError::Bind { what, addr, source })
}

impl Proxy {
    /// Binds the SSH and ops ports and builds every part; nothing is served
    /// until [`Proxy::run`]. `metrics` is the installed recorder's handle
    /// (`None` in tests, which serve no ops endpoint).
    pub async fn bind(
        config: Config,
        metrics: Option<PrometheusHandle>,
    ) -> Result<Self, ProxyError> {
        crate::config::check_listeners(config.listen, &config.pinned_listen)?;
        let docker_exec = docker_exec(config.docker_host.as_deref()).await?;
        let control_plane = ControlPlane::new(
            &config.controlplane,
            &config.tls,
            config.controlplane_server_name.as_deref(),
            config.proxy_id.clone(),
        )?;
        let ssh_listener = bind("SSH", config.listen).await?;
        let mut pinned_listeners = Vec::with_capacity(config.pinned_listen.len());
        for pinned in &config.pinned_listen {
            let listener = bind("pinned SSH", pinned.addr).await?;
            pinned_listeners.push((listener, Arc::from(pinned.environment.as_str())));
        }
        let ops_listener = match config.ops_listen {
            Some(addr) => Some(envgate_proto::ops::bind_ops(addr).await.map_err(|source| {
                ProxyError::Bind {
                    what: "ops",
                    addr,
                    source,
                }
            })?),
            None => None,
        };
        let ssh_addr = ssh_listener.local_addr()?;
        let auth_cache = Arc::new(AuthCache::new(config.auth_cache_size));
        // One placement per user and environment: as many as tokens is plenty.
        let placements = Arc::new(PlacementCache::new(config.auth_cache_size));
        let closes = Arc::new(CloseQueue::default());
        let ledger = Arc::new(SessionLedger::default());
        let registry = Registry::default();
        let readiness = Readiness::default();
        let drain = Drain::new(registry.clone(), readiness.clone());
        let ssh = russh::server::Config {
            methods: handler::methods(),
            auth_rejection_time: Duration::from_secs(1),
            // The "none" probe every client starts with is not a failure.
            auth_rejection_time_initial: Some(Duration::ZERO),
            keys: vec![config.host_key],
            // Every refused key *offer* counts here, and clients offer every key in their
            // agent: OpenSSH's 6 fails users with more than five keys. Guessing is bounded
            // by the control plane's throttle, not by this.
            max_auth_attempts: MAX_AUTH_ATTEMPTS,
            // Idle shells are legitimate; dead peers are found by keepalives.
            inactivity_timeout: None,
            keepalive_interval: Some(Duration::from_secs(30)),
            keepalive_max: 4,
            nodelay: true,
            ..Default::default()
        };
        let services = SessionServices {
            control_plane: control_plane.clone(),
            // The agent when the placement names one, else Docker exec if configured.
            runtime: Arc::new(AgentRuntime::new(docker_exec)),
            registry: registry.clone(),
            auth_cache: auth_cache.clone(),
            user_connections: UserConnections::new(config.limits.per_user),
            recordings: config
                .recordings_dir
                .clone()
                .map(|dir| Arc::new(recording::Recordings::new(dir))),
            placements: placements.clone(),
            closes: closes.clone(),
            ledger: ledger.clone(),
            audit: config.audit.clone(),
        };
        let context = Arc::new(ServerContext {
            ssh: Arc::new(ssh),
            trusted_proxies: config.trusted_proxies,
            login_grace: config.login_grace,
            connections: Arc::new(Semaphore::new(config.max_connections.max(1))),
            unauthenticated: PreauthBudget::new(
                config.limits.unauthenticated,
                config.limits.unauthenticated_per_source,
            ),
            authenticator: Arc::new(Authenticator::new(
                auth_cache.clone(),
                control_plane.clone(),
                config.audit.clone(),
            )),
            services,
        });
        let fleet = FleetMember {
            control_plane: control_plane.clone(),
            register: Register {
                address: config.advertise.unwrap_or_else(|| ssh_addr.to_string()),
                version: env!("CARGO_PKG_VERSION").to_owned(),
                capacity: u32::try_from(config.max_connections).unwrap_or(u32::MAX),
                incarnation: uuid::Uuid::new_v4().to_string(),
            },
            registry,
            auth_cache: auth_cache.clone(),
            placements,
            ledger: ledger.clone(),
            drain: drain.clone(),
            readiness: readiness.clone(),
        };
        Ok(Self {
            ssh_listener,
            pinned_listeners,
            ops_listener,
            context,
            fleet,
            drain,
            readiness,
            metrics,
            shutdown_grace: config.shutdown_grace,
            control_plane,
            closes,
            ledger,
        })
    }

    pub fn ssh_addr(&self) -> SocketAddr {
        self.ssh_listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    pub fn ops_addr(&self) -> Option<SocketAddr> {
        self.ops_listener.as_ref().and_then(|l| l.local_addr().ok())
    }

    pub fn readiness(&self) -> Readiness {
        self.readiness.clone()
    }

    /// Serves until `shutdown`, then drains: no new connections, open ones
    /// get the shutdown grace, then are told to reconnect and closed.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), ProxyError> {
        let address = self.fleet.register.address.clone();
        let background = CancellationToken::new();
        let ops = match (self.ops_listener, self.metrics) {
            (Some(listener), Some(metrics)) => Some(tokio::spawn(serve_ops(
                listener,
                metrics,
                self.readiness.clone(),
                background.clone(),
            ))),
            _ => None,
        };
        let fleet = tokio::spawn(self.fleet.run(background.clone()));
        let closes = {
            let (closes, control_plane) = (self.closes.clone(), self.control_plane.clone());
            let shutdown = background.clone();
            tokio::spawn(async move { closes.deliver(&control_plane, shutdown).await })
        };
        let tracker = TaskTracker::new();
        let mut accept = vec![tokio::spawn(server::serve(
            self.ssh_listener,
            None,
            self.context.clone(),
            tracker.clone(),
            self.drain.stop_accepting(),
        ))];
        for (listener, environment) in self.pinned_listeners {
            if let Ok(addr) = listener.local_addr() {
                tracing::info!(%addr, %environment, "pinned listener serving");
            }
            accept.push(tokio::spawn(server::serve(
                listener,
                Some(environment),
                self.context.clone(),
                tracker.clone(),
                self.drain.stop_accepting(),
            )));
        }
        tracing::info!(%address, "proxy serving");

        shutdown.cancelled().await;
        tracing::info!(grace = ?self.shutdown_grace, "shutting down");
        self.drain.begin(self.shutdown_grace);
        for accept in accept {
            let _ = accept.await;
        }
        tracker.close();
        if tokio::time::timeout(self.shutdown_grace + CLOSE_TIMEOUT, tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                left = tracker.len(),
                "connections still open after the shutdown grace"
            );
        }
        // The ends of the last sessions placed unrecorded leave on the Fleet stream.
        if !self.ledger.settle(SETTLE_TIMEOUT).await {
            tracing::warn!(
                left = self.ledger.waiting(),
                "session updates never acknowledged: their sessions' records (if any) go with this proxy's lease"
            );
        }
        background.cancel();
        let _ = fleet.await;
        let _ = closes.await;
        if !self.closes.is_empty() {
            tracing::warn!(
                left = self.closes.len(),
                "session closes never delivered: the reconciler releases those sessions with this proxy's lease"
            );
        }
        if let Some(ops) = ops {
            let _ = ops.await;
        }
        Ok(())
    }
}

/// Docker exec, for containers without the agent, only when `--docker-host` is given: with
/// the agent in every container the proxy needs no access to the engine, which is root on
/// its host.
#[cfg(feature = "docker")]
async fn docker_exec(host: Option<&str>) -> Result<Option<Arc<dyn ProcessRuntime>>, ProxyError> {
    let Some(host) = host else {
        return Ok(None);
    };
    let exec = envgate_runtime::docker::DockerExec::connect(host)
        .await
        .map_err(|e| ProxyError::Config(format!("docker at {host}: {e}")))?;
    Ok(Some(Arc::new(exec)))
}

/// Built without Docker: `--docker-host` cannot be served.
#[cfg(not(feature = "docker"))]
async fn docker_exec(host: Option<&str>) -> Result<Option<Arc<dyn ProcessRuntime>>, ProxyError> {
    match host {
        None => Ok(None),
        Some(host) => Err(ProxyError::Config(format!(
            "--docker-host {host}: this proxy was built without Docker (cargo feature `docker`)"
        ))),
    }
}
