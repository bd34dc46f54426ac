//! envgate-proxy: parses its configuration, builds the proxy and runs it
//! until SIGTERM or SIGINT.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use envgate_proto::audit::AuditLog;
use envgate_proto::tls::TlsFiles;
use envgate_proxy::config::{Cidr, PinnedListen, parse_cidrs, parse_pinned};
use envgate_proxy::limits::ConnectionLimits;
use envgate_proxy::{Config, Proxy};
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;

/// The envgate SSH proxy: users ssh here (usually through HAProxy) and land
/// in their own container.
#[derive(Parser, Debug)]
#[command(name = "envgate-proxy", version)]
struct Args {
    /// SSH listen address.
    #[arg(long, env = "ENVGATE_LISTEN", default_value = "127.0.0.1:2200")]
    listen: SocketAddr,
    /// Address of /healthz, /readyz and /metrics.
    #[arg(long, env = "ENVGATE_OPS_LISTEN", default_value = "127.0.0.1:9100")]
    ops_listen: SocketAddr,
    /// Control plane URLs, comma-separated (https://host:port; mutual TLS only).
    #[arg(
        long,
        env = "ENVGATE_CONTROLPLANE",
        default_value = "https://127.0.0.1:50051",
        value_delimiter = ','
    )]
    controlplane: Vec<String>,
    /// OpenSSH private key (ed25519) used as the host key; every replica shares it.
    #[arg(long, env = "ENVGATE_HOST_KEY")]
    host_key: PathBuf,
    /// This proxy's client certificate (PEM) from the fleet CA; the URI SAN
    /// `spiffe://envgate/proxy/<id>` in it is the proxy's id in the fleet.
    #[arg(long, env = "ENVGATE_TLS_CERT")]
    tls_cert: PathBuf,
    /// The key of --tls-cert (PEM).
    #[arg(long, env = "ENVGATE_TLS_KEY")]
    tls_key: PathBuf,
    /// The fleet CA (PEM) the control plane's certificate is checked against.
    #[arg(long, env = "ENVGATE_TLS_CA")]
    tls_ca: PathBuf,
    /// The name the control plane's certificate must carry (default: each URL's host).
    #[arg(long, env = "ENVGATE_CONTROLPLANE_SERVER_NAME")]
    controlplane_server_name: Option<String>,
    /// Append login records (who, from where, how, with which key, the outcome) to this
    /// file as JSON lines; they are also logged on the target `audit` either way.
    #[arg(long, env = "ENVGATE_AUDIT_LOG")]
    audit_log: Option<PathBuf>,
    /// Balancer addresses (comma-separated IPs or CIDRs) whose connections must
    /// start with a PROXY v2 header; from any other source a PROXY header is refused.
    #[arg(long, env = "ENVGATE_TRUSTED_PROXIES", default_value = "", value_parser = parse_cidr_list)]
    trusted_proxies: CidrList,
    /// Most connections served at once; more wait in the listen backlog.
    #[arg(long, env = "ENVGATE_MAX_CONNECTIONS", default_value_t = 4096)]
    max_connections: usize,
    /// Most connections not logged in yet, on all listeners together (sshd's MaxStartups, as
    /// a hard cap): more are refused at once, before the SSH handshake. Logged-in connections
    /// do not count. Default: a quarter of --max-connections (1024).
    #[arg(long, env = "ENVGATE_MAX_UNAUTHENTICATED", value_parser = at_least_one)]
    max_unauthenticated: Option<usize>,
    /// Most connections not logged in yet from one source (sshd's PerSourceMaxStartups): the
    /// client's IPv4 address, or its IPv6 /64, from the PROXY header behind a balancer.
    #[arg(
        long,
        env = "ENVGATE_MAX_UNAUTHENTICATED_PER_SOURCE",
        default_value_t = 256,
        value_parser = at_least_one
    )]
    max_unauthenticated_per_source: usize,
    /// Most logged-in connections of one user on this proxy; more are told so and closed.
    #[arg(
        long,
        env = "ENVGATE_MAX_CONNECTIONS_PER_USER",
        default_value_t = 50,
        value_parser = at_least_one
    )]
    max_connections_per_user: usize,
    /// Seconds a client has from connecting to being logged in (sshd's LoginGraceTime).
    #[arg(long, env = "ENVGATE_LOGIN_GRACE_SECONDS", default_value_t = 30)]
    login_grace_seconds: u64,
    /// Seconds open sessions may continue after SIGTERM before they are closed.
    #[arg(long, env = "ENVGATE_SHUTDOWN_GRACE_SECONDS", default_value_t = 30)]
    shutdown_grace_seconds: u64,
    /// Most cached authentication tokens.
    #[arg(long, env = "ENVGATE_AUTH_CACHE_SIZE", default_value_t = 65536)]
    auth_cache_size: usize,
    /// The Docker engine's socket (unix:///path), for containers without envgate-agent,
    /// whose sessions start through Docker exec. Unset: this proxy has no Docker access and
    /// serves only containers that run the agent (the default deployment).
    #[arg(long, env = "ENVGATE_DOCKER_HOST")]
    docker_host: Option<String>,
    /// Where session recordings are written, for environments that record sessions: a
    /// directory every proxy and the control plane share (docs/operations.md, "Session
    /// recordings"). Unset: sessions of such environments are refused with a line.
    #[arg(long, env = "ENVGATE_RECORDINGS_DIR")]
    recordings_dir: Option<PathBuf>,
    /// Address reported to the control plane (default: the listen address).
    #[arg(long, env = "ENVGATE_ADVERTISE")]
    advertise: Option<String>,
    /// An extra SSH listener pinned to one environment, ADDR=ENV (repeatable; the
    /// variable takes a comma-separated list): every login there lands in ENV, whatever
    /// the user name or ENVGATE_ENV ask for (`user+envgate` self-service excepted).
    #[arg(long, env = "ENVGATE_PINNED_LISTEN", value_name = "ADDR=ENV", value_parser = parse_pinned_list)]
    pinned_listen: Vec<PinnedList>,
    /// OTLP/gRPC endpoint traces are exported to (unset: none are exported).
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    otlp_endpoint: Option<String>,
    /// Log JSON lines instead of text.
    #[arg(long, env = "ENVGATE_LOG_JSON")]
    log_json: bool,
}

fn at_least_one(text: &str) -> Result<usize, String> {
    match text.trim().parse::<usize>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err(format!("{text:?} is not a whole number of at least 1")),
    }
}

#[derive(Debug, Clone)]
struct CidrList(Vec<Cidr>);

fn parse_cidr_list(text: &str) -> Result<CidrList, String> {
    parse_cidrs(text).map(CidrList)
}

#[derive(Debug, Clone)]
struct PinnedList(Vec<PinnedListen>);

fn parse_pinned_list(text: &str) -> Result<PinnedList, String> {
    parse_pinned(text).map(PinnedList)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let _telemetry = envgate_proto::telemetry::init(
        "envgate-proxy",
        args.log_json,
        args.otlp_endpoint.as_deref(),
    )
    .context("setting up tracing")?;
    let host_key = Config::load_host_key(&args.host_key)?;
    let tls = TlsFiles::load(&args.tls_cert, &args.tls_key, &args.tls_ca)
        .context("--tls-cert/--tls-key/--tls-ca")?;
    let proxy_id = tls.proxy_id(&args.tls_cert).context("--tls-cert")?;
    if let Some(host) = &args.docker_host {
        envgate_proto::tls::check_docker_host(host)
            .map_err(|e| anyhow::anyhow!("--docker-host: {e}"))?;
    }
    let audit = AuditLog::from_flag(args.audit_log.as_deref())
        .context("--audit-log: cannot open the file")?;
    let config = Config {
        listen: args.listen,
        ops_listen: Some(args.ops_listen),
        controlplane: args
            .controlplane
            .into_iter()
            .map(|u| u.trim().to_owned())
            .filter(|u| !u.is_empty())
            .collect(),
        host_key,
        tls,
        controlplane_server_name: args.controlplane_server_name,
        proxy_id,
        audit,
        trusted_proxies: args.trusted_proxies.0,
        max_connections: args.max_connections,
        limits: ConnectionLimits {
            unauthenticated: args
                .max_unauthenticated
                .unwrap_or((args.max_connections / 4).max(1)),
            unauthenticated_per_source: args.max_unauthenticated_per_source,
            per_user: args.max_connections_per_user,
        },
        login_grace: Duration::from_secs(args.login_grace_seconds),
        shutdown_grace: Duration::from_secs(args.shutdown_grace_seconds),
        auth_cache_size: args.auth_cache_size,
        docker_host: args.docker_host,
        recordings_dir: args.recordings_dir,
        advertise: args.advertise,
        pinned_listen: args.pinned_listen.into_iter().flat_map(|p| p.0).collect(),
    };
    let metrics = envgate_proto::ops::init_metrics();
    let proxy = Proxy::bind(config, Some(metrics))
        .await
        .context("starting envgate-proxy")?;
    tracing::info!(ssh = %proxy.ssh_addr(), ops = ?proxy.ops_addr(), "bound");

    let shutdown = CancellationToken::new();
    let mut terminate =
        signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let on_signal = shutdown.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = terminate.recv() => tracing::info!("SIGTERM"),
            _ = interrupt.recv() => tracing::info!("SIGINT"),
        }
        on_signal.cancel();
    });
    proxy.run(shutdown).await.context("running envgate-proxy")?;
    Ok(())
}
