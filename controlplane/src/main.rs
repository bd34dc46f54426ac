//! `envgate-controlplane`: parses and checks its configuration once, before binding anything,
//! then runs the control plane until SIGTERM or SIGINT.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Parser;
use envgate_controlplane::Config;
use envgate_controlplane::auth::HashCost;
use envgate_controlplane::runtime::docker::AgentSetup;
use envgate_proto::token::TokenKey;
use tokio_util::sync::CancellationToken;

/// envgate control plane: authentication, placement, container lifecycle and the admin API.
#[derive(Debug, Parser)]
#[command(name = "envgate-controlplane", version)]
struct Args {
    /// gRPC address (Auth, Sessions, Fleet, Admin, health, reflection).
    #[arg(long, env = "ENVGATE_LISTEN", default_value = "127.0.0.1:50051")]
    listen: SocketAddr,
    /// Address of /healthz, /readyz and /metrics.
    #[arg(long, env = "ENVGATE_OPS_LISTEN", default_value = "127.0.0.1:9090")]
    ops_listen: SocketAddr,
    /// etcd client URLs, comma-separated.
    #[arg(
        long,
        env = "ENVGATE_ETCD",
        default_value = "http://127.0.0.1:2379",
        value_delimiter = ','
    )]
    etcd: Vec<String>,
    /// Prefix of every etcd key this fleet uses; must end with '/'.
    #[arg(long, env = "ENVGATE_ETCD_PREFIX", default_value = "/envgate/")]
    etcd_prefix: String,
    /// File holding the 32-byte Ed25519 token signing seed as 64 hex digits (shared by all replicas).
    #[arg(long, env = "ENVGATE_TOKEN_KEY")]
    token_key: PathBuf,
    /// Lifetime of issued session tokens.
    #[arg(long, env = "ENVGATE_TOKEN_TTL_SECONDS", default_value_t = 300)]
    token_ttl_seconds: u64,
    /// File holding the admin bearer token; admin calls need `authorization: Bearer <token>`.
    #[arg(long, env = "ENVGATE_ADMIN_TOKEN_FILE")]
    admin_token_file: PathBuf,
    /// Label value on every container this fleet creates, so fleets sharing a Docker engine
    /// never touch each other's containers.
    #[arg(long, env = "ENVGATE_INSTANCE", default_value = "default")]
    instance: String,
    /// Docker endpoint, e.g. unix:///var/run/docker.sock (default: the local defaults).
    #[arg(long, env = "ENVGATE_DOCKER_HOST")]
    docker_host: Option<String>,
    /// Containers Docker may be creating at once; further first logins queue for a slot.
    /// Hundreds of racing creations (a class arriving at 9:00) slow the engine for everyone.
    #[arg(long, env = "ENVGATE_DOCKER_CREATE_CONCURRENCY", default_value_t = 8,
          value_parser = clap::value_parser!(u16).range(1..))]
    docker_create_concurrency: u16,
    /// Seconds one pull of a missing image may take before the opens waiting for it fail.
    /// Registry credentials are not supported: pre-pull private images, or log the engine in.
    #[arg(long, env = "ENVGATE_IMAGE_PULL_TIMEOUT_SECONDS", default_value_t = 600,
          value_parser = clap::value_parser!(u64).range(1..))]
    image_pull_timeout_seconds: u64,
    /// Containers one user may have at once (any environment, persistent or ephemeral);
    /// an open that needs one more is refused with a message. 0 = unlimited.
    #[arg(long, env = "ENVGATE_MAX_CONTAINERS_PER_USER", default_value_t = 5)]
    max_containers_per_user: usize,
    /// OTLP/gRPC endpoint traces are exported to (unset: none are exported).
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    otlp_endpoint: Option<String>,
    /// The STATIC envgate-agent binary (`proxy/agent/build-static`), mounted read-only into
    /// every new container as its init. Absent or empty: no agent, sessions use Docker exec.
    #[arg(long, env = "ENVGATE_AGENT_BINARY")]
    agent_binary: Option<PathBuf>,
    /// Where per-container agent directories (socket, secret) are made; root-only.
    #[arg(
        long,
        env = "ENVGATE_AGENT_DIR",
        default_value = "/var/lib/envgate/agents"
    )]
    agent_dir: PathBuf,
    /// Root of the warm containers' home slots (docs/environments.md, "Warm pools"): made a
    /// shared mount at start, so a user's home mounted here on a claim appears inside the
    /// running container. Needs root and a local Docker engine; empty: no warm pools.
    #[arg(
        long,
        env = "ENVGATE_HOME_SLOTS_DIR",
        default_value = "/var/lib/envgate/slots"
    )]
    home_slots_dir: PathBuf,
    /// Seconds between reconciler passes on the elected replica.
    #[arg(long, env = "ENVGATE_RECONCILE_INTERVAL_SECONDS", default_value_t = 5)]
    reconcile_interval_seconds: u64,
    /// A labelled container no placement record knows is removed once older than this; the
    /// grace leaves alone a container whose record is still being written.
    #[arg(long, env = "ENVGATE_ORPHAN_GRACE_SECONDS", default_value_t = 60)]
    orphan_grace_seconds: u64,
    /// YAML catalogue of environments (docs/environments.md), checked at start and written
    /// into etcd before serving; environments made through the admin API are kept.
    #[arg(long, env = "ENVGATE_ENVIRONMENTS")]
    environments: Option<PathBuf>,
    /// Log JSON lines instead of text.
    #[arg(long, env = "ENVGATE_LOG_JSON")]
    log_json: bool,
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "controlplane".to_owned())
}

fn config(args: Args) -> anyhow::Result<Config> {
    if args.etcd.iter().all(|e| e.trim().is_empty()) {
        bail!("--etcd: at least one endpoint is required");
    }
    if !args.etcd_prefix.starts_with('/') || !args.etcd_prefix.ends_with('/') {
        bail!(
            "--etcd-prefix: must start and end with '/' (got {:?})",
            args.etcd_prefix
        );
    }
    envgate_proto::names::validate_environment(&args.instance).map_err(|e| {
        anyhow::anyhow!(
            "--instance: {}",
            e.to_string().replace("environment name", "instance name")
        )
    })?;
    let key_text = std::fs::read_to_string(&args.token_key)
        .with_context(|| format!("--token-key: cannot read {}", args.token_key.display()))?;
    let token_key = TokenKey::from_hex_seed(&key_text)
        .with_context(|| format!("--token-key: {}", args.token_key.display()))?;
    let admin_token = std::fs::read_to_string(&args.admin_token_file)
        .with_context(|| {
            format!(
                "--admin-token-file: cannot read {}",
                args.admin_token_file.display()
            )
        })?
        .trim()
        .to_owned();
    if admin_token.is_empty() {
        bail!(
            "--admin-token-file: {} is empty",
            args.admin_token_file.display()
        );
    }
    if args.token_ttl_seconds == 0 || args.reconcile_interval_seconds == 0 {
        bail!("--token-ttl-seconds and --reconcile-interval-seconds must be at least 1");
    }
    let environments = match args.environments.filter(|f| !f.as_os_str().is_empty()) {
        None => Vec::new(),
        Some(file) => envgate_controlplane::catalogue::load(&file)
            .map_err(|e| anyhow::anyhow!("--environments: {e}"))?,
    };
    let home_slots_dir = Some(args.home_slots_dir).filter(|d| !d.as_os_str().is_empty());
    if let Some(dir) = &home_slots_dir {
        if !dir.is_absolute() {
            bail!("--home-slots-dir: must be an absolute path (Docker binds it)");
        }
        // Agent directories are deleted recursively; a slot holds a mounted home volume.
        if dir.starts_with(&args.agent_dir) || args.agent_dir.starts_with(dir) {
            bail!(
                "--home-slots-dir: {} must not be inside --agent-dir {} or contain it",
                dir.display(),
                args.agent_dir.display()
            );
        }
    }
    let agent = match args.agent_binary.filter(|b| !b.as_os_str().is_empty()) {
        None => None,
        Some(binary) => {
            let binary = std::fs::canonicalize(&binary)
                .with_context(|| format!("--agent-binary: cannot find {}", binary.display()))?;
            if !binary.is_file() {
                bail!("--agent-binary: {} is not a file", binary.display());
            }
            if !args.agent_dir.is_absolute() {
                bail!("--agent-dir: must be an absolute path (Docker binds it)");
            }
            Some(AgentSetup {
                binary,
                dir: args.agent_dir,
            })
        }
    };
    Ok(Config {
        listen: args.listen,
        ops_listen: args.ops_listen,
        etcd_endpoints: args
            .etcd
            .into_iter()
            .map(|e| e.trim().to_owned())
            .filter(|e| !e.is_empty())
            .collect(),
        etcd_prefix: args.etcd_prefix,
        etcd_timeout: Duration::from_secs(5),
        token_key: Arc::new(token_key),
        token_ttl: Duration::from_secs(args.token_ttl_seconds),
        admin_token,
        instance: args.instance,
        docker_host: args.docker_host,
        docker_create_concurrency: args.docker_create_concurrency.into(),
        image_pull_timeout: Duration::from_secs(args.image_pull_timeout_seconds),
        max_containers_per_user: args.max_containers_per_user,
        agent,
        home_slots_dir,
        reconcile_interval: Duration::from_secs(args.reconcile_interval_seconds),
        orphan_grace: Duration::from_secs(args.orphan_grace_seconds),
        replica_id: format!("{}-{}", hostname(), std::process::id()),
        hash_cost: HashCost::default(),
        environments,
    })
}

/// Cancels `shutdown` on the first SIGTERM or SIGINT.
fn cancel_on_signal(shutdown: CancellationToken) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
            _ = int.recv() => tracing::info!("SIGINT: shutting down"),
        }
        shutdown.cancel();
    });
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let log_json = args.log_json;
    let otlp_endpoint = args.otlp_endpoint.clone();
    let config = match config(args) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("envgate-controlplane: {e:#}");
            return ExitCode::from(2);
        }
    };
    let _telemetry = match envgate_proto::telemetry::init(
        "envgate-controlplane",
        log_json,
        otlp_endpoint.as_deref(),
    ) {
        Ok(guard) => guard,
        Err(e) => {
            eprintln!("envgate-controlplane: setting up tracing: {e}");
            return ExitCode::from(2);
        }
    };
    let metrics = envgate_proto::ops::init_metrics();
    let shutdown = CancellationToken::new();
    if let Err(e) = cancel_on_signal(shutdown.clone()) {
        eprintln!("envgate-controlplane: {e:#}");
        return ExitCode::FAILURE;
    }
    match envgate_controlplane::run(config, metrics, shutdown).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "control plane stopped");
            eprintln!("envgate-controlplane: {e}");
            ExitCode::FAILURE
        }
    }
}
