//! envgate control plane: authentication, placement, container lifecycle, the proxy fleet
//! registry and the admin API. State lives in etcd; `main.rs` only parses config and calls `run`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use envgate_proto::admin::v1::admin_server::AdminServer;
use envgate_proto::audit::AuditLog;
use envgate_proto::ops::{Readiness, serve_ops};
use envgate_proto::tls::TlsFiles;
use envgate_proto::token::TokenKeys;
use envgate_proto::v1::auth_server::AuthServer;
use envgate_proto::v1::fleet_server::FleetServer;
use envgate_proto::v1::self_service_server::SelfServiceServer;
use envgate_proto::v1::sessions_server::SessionsServer;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;

pub mod admin;
pub mod admission;
pub mod auth;
pub mod catalogue;
pub mod clock;
pub mod error;
#[cfg(test)]
mod fixtures;
pub mod fleet;
pub mod guard;
pub mod hashing;
pub mod identity;
mod locks;
pub mod model;
pub mod pki;
pub mod placement;
pub mod pool;
pub mod reconcile;
pub mod recordings;
pub mod runtime;
pub mod selfservice;
pub mod sshca;
pub mod store;
pub mod throttle;
pub mod uids;
mod verified;
pub mod wire;

#[cfg(any(test, feature = "testkit"))]
pub mod testkit;

use crate::admin::AdminService;
use crate::admission::Admission;
use crate::auth::{AuthService, Authenticator, HashCost, Hasher, PasswordLimits};
use crate::clock::Clock;
use crate::fleet::{FleetRegistry, FleetService};
use crate::guard::{AdminGuard, AdminTokens, ProxyGuard};
use crate::hashing::HashPool;
use crate::placement::{PlacementConfig, Placer, SessionsService};
use crate::reconcile::{ReconcileConfig, Reconciler};
use crate::runtime::audited::Audited;
use crate::runtime::docker::AgentSetup;
use crate::runtime::docker::network::UserNetwork;
use crate::runtime::{DockerRuntime, Runtime, RuntimeError};
use crate::selfservice::{SelfServiceHandler, SelfServiceService};
use crate::store::{CachedStore, EtcdConfig, EtcdStore, Store, StoreError};
use crate::throttle::ThrottlePolicy;

/// Everything the control plane needs, parsed and checked once at start.
pub struct Config {
    pub listen: SocketAddr,
    pub ops_listen: SocketAddr,
    /// etcd's endpoints and the control plane's TLS identity towards it.
    pub etcd: EtcdConfig,
    pub etcd_prefix: String,
    /// Bound on each etcd call.
    pub etcd_timeout: Duration,
    /// The gRPC server's certificate and the fleet CA that issues proxies' certificates.
    pub tls: TlsFiles,
    /// Token signing keys (the first signs) and the audience of this fleet's tokens.
    pub token_keys: Arc<TokenKeys>,
    pub token_ttl: Duration,
    /// The operators allowed on the admin API, by name.
    pub admin_tokens: Arc<AdminTokens>,
    /// Where audit records go (`--audit-log`).
    pub audit: AuditLog,
    pub instance: String,
    pub docker_host: Option<String>,
    /// Containers Docker may be creating at once.
    pub create_concurrency: usize,
    /// Where the proxies write session recordings (`--recordings-dir`), for the admin API.
    pub recordings_dir: Option<PathBuf>,
    /// The network user containers join (`--docker-network`, `--host-firewall`); `None`:
    /// Docker's default bridge.
    pub docker_network: Option<UserNetwork>,
    /// Bound on one pull of a missing image.
    pub image_pull_timeout: Duration,
    /// Containers one user may have at once (0 = unlimited); see `PlacementConfig`.
    pub max_containers_per_user: usize,
    /// `Some`: containers run `envgate-agent` as their init (the fast data path).
    pub agent: Option<AgentSetup>,
    /// Root of the warm containers' home slots (`envgate_runtime::docker::slots`); `None`: no warm pools.
    pub home_slots_dir: Option<PathBuf>,
    /// `Some`: user containers are Pods (`--runtime kubernetes`); the Docker fields above are
    /// then unused. `None`: Docker.
    pub kubernetes: Option<KubernetesSetup>,
    pub reconcile_interval: Duration,
    /// Age before an unknown labelled container counts as an orphan (`--orphan-grace-seconds`).
    pub orphan_grace: Duration,
    /// Names this replica in election values and record owners.
    pub replica_id: String,
    pub hash_cost: HashCost,
    /// Password hashes computed at once, and how many more may wait (`hashing.rs`).
    pub hash_threads: usize,
    pub hash_queue: usize,
    /// How failed password logins are slowed down (`throttle.rs`).
    pub throttle: ThrottlePolicy,
    /// The checked catalogue file (`--environments`), written into etcd before serving.
    pub environments: Vec<model::EnvironmentRecord>,
    /// LDAP, the auth webhook and the config webhook (`--ldap-*`, `--*-webhook-*`); each off
    /// unless configured.
    pub identity: Arc<identity::Sources>,
    /// SSH user certificates: envgate's CA keys and the external CAs trusted
    /// (`--user-ca-key`, `--trusted-user-ca-keys`); the default trusts none.
    pub certificates: Arc<sshca::CertificateAuthority>,
    /// The wall clock placement, the reconciler and the login throttle judge time by
    /// (`clock.rs`): `SystemClock`, or a `ManualClock` tests advance.
    pub clock: Arc<dyn Clock>,
}

/// The Kubernetes runtime's configuration (`--runtime kubernetes`, the `--kube-*` flags and
/// the catalogue's `kubernetes:` blocks).
#[derive(Debug, Clone)]
pub struct KubernetesSetup {
    pub client: envgate_runtime::kubernetes::ClientSource,
    pub config: envgate_runtime::kubernetes::KubernetesConfig,
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot start: {0}")]
    Store(#[from] StoreError),
    #[error("cannot start: {0}")]
    Runtime(#[from] RuntimeError),
    #[error("cannot start: {0}")]
    Seed(#[from] catalogue::SeedError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("gRPC server failed: {0}")]
    Serve(#[from] tonic::transport::Error),
    #[error("ops endpoint failed: {0}")]
    Ops(std::io::Error),
    #[error("reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
}

/// The prefixes every login reads, answered from memory kept current by a watch
/// (`store::cached`): the catalogue, revocations, users and the proxies' records, which change
/// rarely, and the placement records, which change at every login but are read at every login
/// too: one watch event per write costs etcd less than one linearizable range per login, and a
/// record read from memory is still checked by the compare of the transaction that follows.
pub const WATCH_CACHED: &[&str] = &[
    model::ENVIRONMENTS,
    model::REVOCATIONS,
    model::USERS,
    model::PROXIES,
    model::CONTAINERS,
];

/// The assembled services over one store and one runtime.
pub struct ControlPlane {
    store: Arc<dyn Store>,
    auth: Arc<Authenticator>,
    placer: Arc<Placer>,
    fleet: Arc<FleetRegistry>,
    reconciler: Arc<Reconciler>,
    admin_guard: AdminGuard,
    hasher: Hasher,
    tls: TlsFiles,
    audit: AuditLog,
    recordings_dir: Option<PathBuf>,
}

impl ControlPlane {
    pub fn new(store: Arc<dyn Store>, runtime: Arc<dyn Runtime>, config: &Config) -> Self {
        let store: Arc<dyn Store> = Arc::new(CachedStore::new(store, WATCH_CACHED));
        let runtime: Arc<dyn Runtime> = Arc::new(Audited::new(runtime, config.audit.clone()));
        let hasher = Hasher::new(
            config.hash_cost,
            HashPool::new(config.hash_threads, config.hash_queue),
        );
        let auth = Arc::new(
            Authenticator::new(
                store.clone(),
                config.token_keys.clone(),
                config.token_ttl,
                PasswordLimits {
                    clock: Box::new(config.clock.clone()),
                    ..PasswordLimits::new(config.throttle, hasher.clone())
                },
                config.audit.clone(),
            )
            .with_identity(config.identity.clone())
            .with_certificates(config.certificates.clone()),
        );
        let placement = PlacementConfig {
            instance: config.instance.clone(),
            replica_id: config.replica_id.clone(),
            max_containers_per_user: config.max_containers_per_user,
            ..PlacementConfig::default()
        };
        // One line for this replica's creations: users' first logins and pool refills.
        let admission = Admission::new(config.create_concurrency);
        let placer = Arc::new(
            Placer::new(
                store.clone(),
                runtime.clone(),
                auth.clone(),
                placement.clone(),
            )
            .with_clock(config.clock.clone())
            .with_admission(admission.clone()),
        );
        let reconciler = Arc::new(
            Reconciler::new(
                store.clone(),
                runtime,
                ReconcileConfig {
                    instance: config.instance.clone(),
                    replica_id: config.replica_id.clone(),
                    interval: config.reconcile_interval,
                    stale_after: placement.stale_after,
                    orphan_grace: config.orphan_grace,
                },
            )
            .with_clock(config.clock.clone())
            .with_throttle(auth.throttle())
            .with_admission(admission)
            .with_closed_sessions(placer.closed_sessions()),
        );
        Self {
            store,
            auth,
            placer,
            fleet: Arc::new(FleetRegistry::default()),
            reconciler,
            admin_guard: AdminGuard::new(config.admin_tokens.clone(), config.audit.clone()),
            hasher,
            tls: config.tls.clone(),
            audit: config.audit.clone(),
            recordings_dir: config.recordings_dir.clone(),
        }
    }

    pub fn reconciler(&self) -> Arc<Reconciler> {
        self.reconciler.clone()
    }

    pub fn fleet(&self) -> Arc<FleetRegistry> {
        self.fleet.clone()
    }

    /// Serves every gRPC service on `listener` until `shutdown`.
    pub async fn serve(
        &self,
        listener: TcpListener,
        shutdown: CancellationToken,
    ) -> Result<(), RunError> {
        let (health, health_service) = tonic_health::server::health_reporter();
        health.set_serving::<AuthServer<AuthService>>().await;
        health
            .set_serving::<SessionsServer<SessionsService>>()
            .await;
        health.set_serving::<FleetServer<FleetService>>().await;
        health.set_serving::<AdminServer<AdminService>>().await;
        health
            .set_serving::<SelfServiceServer<SelfServiceService>>()
            .await;
        let reflection = || {
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(envgate_proto::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        };
        let admin = AdminService::new(
            self.store.clone(),
            self.reconciler.clone(),
            self.hasher.clone(),
            self.audit.clone(),
        )
        .with_recordings(self.recordings_dir.clone())
        .with_certificates(self.auth.certificates().clone());
        let forwarding = shutdown.child_token();
        tokio::spawn(fleet::forward_revocations(
            self.store.clone(),
            self.fleet.clone(),
            forwarding.clone(),
        ));
        tokio::spawn(fleet::relay_commands(
            self.store.clone(),
            self.fleet.clone(),
            forwarding.clone(),
        ));
        let _stop_forwarding = forwarding.drop_guard();
        tonic::transport::Server::builder()
            .tls_config(self.tls.server_config())?
            // A proxy host that dies without closing its connection must not keep its Fleet
            // stream, and so its lease and sessions, alive forever.
            .http2_keepalive_interval(Some(Duration::from_secs(10)))
            .http2_keepalive_timeout(Some(Duration::from_secs(5)))
            .tcp_keepalive(Some(Duration::from_secs(30)))
            .concurrency_limit_per_connection(1024)
            .trace_fn(envgate_proto::telemetry::rpc_span)
            .layer(tower::util::MapRequestLayer::new(guard::mark_path))
            .add_service(health_service)
            .add_service(reflection().build_v1()?)
            .add_service(reflection().build_v1alpha()?)
            .add_service(AuthServer::with_interceptor(
                AuthService::new(self.auth.clone()),
                ProxyGuard,
            ))
            .add_service(SessionsServer::with_interceptor(
                SessionsService::new(self.placer.clone(), self.audit.clone()),
                ProxyGuard,
            ))
            .add_service(SelfServiceServer::with_interceptor(
                SelfServiceService::new(Arc::new(SelfServiceHandler::new(
                    self.store.clone(),
                    self.auth.clone(),
                    self.reconciler.clone(),
                ))),
                ProxyGuard,
            ))
            .add_service(FleetServer::with_interceptor(
                FleetService::new(
                    self.store.clone(),
                    self.fleet.clone(),
                    self.placer.clone(),
                    self.audit.clone(),
                    shutdown.clone(),
                ),
                ProxyGuard,
            ))
            .add_service(AdminServer::with_interceptor(
                admin,
                self.admin_guard.clone(),
            ))
            .serve_with_incoming_shutdown(
                TcpListenerStream::new(listener),
                shutdown.cancelled_owned(),
            )
            .await?;
        Ok(())
    }
}

/// Connects etcd and Docker, then serves gRPC, the ops endpoint and the elected reconciler
/// until `shutdown` is cancelled.
pub async fn run(
    config: Config,
    metrics: PrometheusHandle,
    shutdown: CancellationToken,
) -> Result<(), RunError> {
    let readiness = Readiness::default();
    let store: Arc<dyn Store> =
        Arc::new(EtcdStore::connect(&config.etcd, &config.etcd_prefix, config.etcd_timeout).await?);
    // Before any port is bound: a replica serves only once the file's catalogue is in etcd.
    catalogue::seed(
        store.as_ref(),
        &config.environments,
        catalogue::SEED_GIVE_UP_AFTER,
    )
    .await?;
    let runtime: Arc<dyn Runtime> = match &config.kubernetes {
        Some(setup) => {
            let client = envgate_runtime::kubernetes::client(&setup.client)
                .await
                .map_err(RuntimeError::from)?;
            tracing::info!(namespace = %setup.config.namespace, "user containers are Kubernetes Pods");
            Arc::new(envgate_runtime::kubernetes::KubernetesRuntime::new(
                client,
                setup.config.clone(),
            ))
        }
        None => Arc::new(
            DockerRuntime::new(config.docker_host.as_deref())
                .with_agent(config.agent.clone())
                .with_network(config.docker_network.clone())
                .with_pull_timeout(config.image_pull_timeout)
                .with_home_slots(config.home_slots_dir.as_deref())
                .with_liveness_cache(&config.instance),
        ),
    };
    let plane = ControlPlane::new(store, runtime, &config);

    let grpc = TcpListener::bind(config.listen)
        .await
        .map_err(|source| RunError::Bind {
            addr: config.listen,
            source,
        })?;
    let ops = envgate_proto::ops::bind_ops(config.ops_listen)
        .await
        .map_err(|source| RunError::Bind {
            addr: config.ops_listen,
            source,
        })?;
    tracing::info!(grpc = %config.listen, ops = %config.ops_listen, instance = %config.instance, replica = %config.replica_id, "control plane listening");

    let ops_task = tokio::spawn(serve_ops(ops, metrics, readiness.clone(), shutdown.clone()));
    let reconciler = tokio::spawn(plane.reconciler().run(shutdown.clone()));
    readiness.set(true);
    let served = plane.serve(grpc, shutdown.clone()).await;
    readiness.set(false);
    shutdown.cancel();
    if let Err(e) = reconciler.await {
        tracing::warn!(error = %e, "reconciler task ended abnormally");
    }
    match ops_task.await {
        Ok(Err(e)) => return Err(RunError::Ops(e)),
        Err(e) => tracing::warn!(error = %e, "ops task ended abnormally"),
        Ok(Ok(())) => {}
    }
    served
}
