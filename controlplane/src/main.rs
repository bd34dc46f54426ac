//! `envgate-controlplane`: parses and checks its configuration once, before binding anything,
//! then runs the control plane until SIGTERM or SIGINT. `envgate-controlplane pki …` makes
//! the fleet's certificates instead (`pki.rs`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use envgate_controlplane::Config;
use envgate_controlplane::auth::HashCost;
use envgate_controlplane::clock::SystemClock;
use envgate_controlplane::guard::AdminTokens;
use envgate_controlplane::identity::IdentityFlags;
use envgate_controlplane::pki::{Authority, Profile};
use envgate_controlplane::runtime::docker::AgentSetup;
use envgate_controlplane::runtime::docker::network::{DEFAULT_NETWORK, HostFirewall, UserNetwork};
use envgate_controlplane::sshca::{self, CertificateAuthority, UserCreation};
use envgate_controlplane::store::EtcdConfig;
use envgate_controlplane::throttle::ThrottlePolicy;
use envgate_proto::audit::AuditLog;
use envgate_proto::tls::TlsFiles;
use envgate_proto::token::{self, TokenKey, TokenKeys};
use tokio_util::sync::CancellationToken;

/// `envgate-controlplane pki`: makes the fleet's TLS certificates (idempotent: what exists and
/// stays valid for 30 more days is kept). Prints each file written.
#[derive(Debug, Parser)]
#[command(
    name = "envgate-controlplane pki",
    bin_name = "envgate-controlplane pki",
    version
)]
struct PkiCli {
    /// Directory of the CAs and certificates (`<ca>-ca.crt`, `<name>.crt`, `<name>.key`).
    #[arg(long)]
    dir: PathBuf,
    #[command(subcommand)]
    what: PkiCommand,
}

#[derive(Debug, Subcommand)]
enum PkiCommand {
    /// A CA, e.g. `fleet` (control plane and proxies) or `etcd` (etcd and its clients).
    Ca { name: String },
    /// A TLS server certificate for these DNS names and IP addresses (comma-separated).
    Server {
        #[arg(long)]
        ca: String,
        #[arg(long)]
        name: String,
        #[arg(long, value_delimiter = ',', required = true)]
        san: Vec<String>,
    },
    /// An etcd member's certificate: server to clients and peers, client to peers.
    Peer {
        #[arg(long)]
        ca: String,
        #[arg(long)]
        name: String,
        #[arg(long, value_delimiter = ',', required = true)]
        san: Vec<String>,
    },
    /// A TLS client certificate with this common name (the control plane towards etcd).
    Client {
        #[arg(long)]
        ca: String,
        #[arg(long)]
        name: String,
    },
    /// A proxy's client certificate naming it `spiffe://envgate/proxy/<ID>`; written as
    /// `proxy-<ID>.crt` and `.key`.
    Proxy {
        #[arg(long)]
        ca: String,
        #[arg(long)]
        id: String,
    },
}

/// envgate control plane: authentication, placement, container lifecycle and the admin API.
/// (`envgate-controlplane pki --help`: the fleet's certificates.)
#[derive(Debug, Parser)]
#[command(name = "envgate-controlplane", version)]
struct Args {
    /// gRPC address (Auth, Sessions, Fleet, Admin, health, reflection), TLS only.
    #[arg(long, env = "ENVGATE_LISTEN", default_value = "127.0.0.1:50051")]
    listen: SocketAddr,
    /// The gRPC server's certificate (PEM), issued by the fleet CA.
    #[arg(long, env = "ENVGATE_TLS_CERT")]
    tls_cert: PathBuf,
    /// The key of --tls-cert (PEM).
    #[arg(long, env = "ENVGATE_TLS_KEY")]
    tls_key: PathBuf,
    /// The fleet CA (PEM): proxies must present a client certificate it issued, naming them
    /// `spiffe://envgate/proxy/<id>`.
    #[arg(long, env = "ENVGATE_TLS_CLIENT_CA")]
    tls_client_ca: PathBuf,
    /// Address of /healthz, /readyz and /metrics.
    #[arg(long, env = "ENVGATE_OPS_LISTEN", default_value = "127.0.0.1:9090")]
    ops_listen: SocketAddr,
    /// etcd client URLs, comma-separated; https:// only (etcd holds every credential).
    #[arg(
        long,
        env = "ENVGATE_ETCD",
        default_value = "https://127.0.0.1:2379",
        value_delimiter = ','
    )]
    etcd: Vec<String>,
    /// The CA that issued etcd's certificate (PEM).
    #[arg(long, env = "ENVGATE_ETCD_CA")]
    etcd_ca: PathBuf,
    /// The control plane's client certificate towards etcd (PEM), from the etcd CA.
    #[arg(long, env = "ENVGATE_ETCD_CERT")]
    etcd_cert: PathBuf,
    /// The key of --etcd-cert (PEM).
    #[arg(long, env = "ENVGATE_ETCD_KEY")]
    etcd_key: PathBuf,
    /// Prefix of every etcd key this fleet uses; must end with '/'.
    #[arg(long, env = "ENVGATE_ETCD_PREFIX", default_value = "/envgate/")]
    etcd_prefix: String,
    /// Files holding 32-byte Ed25519 token keys as 64 hex digits, comma-separated (shared by
    /// all replicas): the first signs new tokens, every one is accepted, so a key is rotated
    /// by adding the new one after the old, moving it first, then dropping the old.
    #[arg(
        long,
        env = "ENVGATE_TOKEN_KEY",
        value_delimiter = ',',
        required = true
    )]
    token_key: Vec<PathBuf>,
    /// Lifetime of issued session tokens.
    #[arg(long, env = "ENVGATE_TOKEN_TTL_SECONDS", default_value_t = 300)]
    token_ttl_seconds: u64,
    /// The operators' admin tokens, one `NAME sha256:HEX` line each (HEX: the SHA-256 of the
    /// token); admin calls need `authorization: Bearer <token>`, and the audit log names NAME.
    #[arg(long, env = "ENVGATE_ADMIN_TOKENS")]
    admin_tokens: PathBuf,
    /// Append audit records (logins, admin calls, sessions, containers) to this file as JSON
    /// lines; they are also logged on the target `audit` either way.
    #[arg(long, env = "ENVGATE_AUDIT_LOG")]
    audit_log: Option<PathBuf>,
    /// Label value on every container this fleet creates, so fleets sharing a Docker engine
    /// never touch each other's containers.
    #[arg(long, env = "ENVGATE_INSTANCE", default_value = "default")]
    instance: String,
    /// The Docker engine's socket, unix:///path (default: the local defaults). Docker over
    /// TCP is not offered: its API is root on the host and would need TLS client certificates.
    #[arg(long, env = "ENVGATE_DOCKER_HOST")]
    docker_host: Option<String>,
    /// Where user containers run: `docker` (one engine, the --docker-* and --agent-* flags) or
    /// `kubernetes` (Pods in --kube-namespace, the --kube-* flags; docs/operations.md).
    #[arg(long, env = "ENVGATE_RUNTIME", value_enum, default_value = "docker")]
    runtime: RuntimeChoice,
    /// Kubernetes: the namespace user Pods, their agent Secrets and home claims live in.
    #[arg(long, env = "ENVGATE_KUBE_NAMESPACE", default_value = "envgate-users")]
    kube_namespace: String,
    /// Kubernetes: the image holding the static agent at /envgate-agent (and a `cp`), which
    /// each Pod's init container copies into the user's container.
    #[arg(long, env = "ENVGATE_KUBE_AGENT_IMAGE")]
    kube_agent_image: Option<String>,
    /// Kubernetes: a kubeconfig file (unset: in-cluster with --kube-in-cluster, else
    /// $KUBECONFIG, ~/.kube/config, then in-cluster).
    #[arg(long, env = "ENVGATE_KUBECONFIG", conflicts_with = "kube_in_cluster")]
    kubeconfig: Option<PathBuf>,
    /// Kubernetes: the kubeconfig context (unset: its current one).
    #[arg(long, env = "ENVGATE_KUBE_CONTEXT", requires = "kubeconfig")]
    kube_context: Option<String>,
    /// Kubernetes: use the Pod's service account (the control plane runs in the cluster).
    #[arg(long, env = "ENVGATE_KUBE_IN_CLUSTER")]
    kube_in_cluster: bool,
    /// Kubernetes: seconds from creating a Pod to its agent running (scheduling and image
    /// pulls included) before the open fails with what it waited for.
    #[arg(long, env = "ENVGATE_KUBE_START_TIMEOUT_SECONDS", default_value_t = 600,
          value_parser = clap::value_parser!(u64).range(1..))]
    kube_start_timeout_seconds: u64,
    /// Containers this replica creates at once (first logins and warm-pool refills); further
    /// first logins wait in line and are told their place. Hundreds of racing creations (a
    /// class arriving at 9:00) slow the engine for everyone. Default: twice the cores, between
    /// 2 and 16. Per replica: replicas sharing one engine add up (docs/operations.md).
    #[arg(long, env = "ENVGATE_CREATE_CONCURRENCY",
          value_parser = clap::value_parser!(u16).range(1..))]
    create_concurrency: Option<u16>,
    /// Where the proxies write session recordings (their --recordings-dir, shared): the admin
    /// API's ListRecordings and GetRecording read them there. Unset: those calls say so.
    #[arg(long, env = "ENVGATE_RECORDINGS_DIR")]
    recordings_dir: Option<PathBuf>,
    /// The Docker network user containers join. envgate makes it if missing, as a bridge with
    /// traffic between containers off, so no user reaches another's container; an existing
    /// network that allows that traffic is refused. Empty: Docker's default bridge (no
    /// isolation; a warning says so).
    #[arg(long, env = "ENVGATE_DOCKER_NETWORK", default_value = DEFAULT_NETWORK)]
    docker_network: String,
    /// How user containers are kept from this host's services (etcd, the control plane, the
    /// Docker API, ops ports): `iptables` drops everything from the user network's bridge to
    /// the host (needs root and iptables); `off` leaves it to your own firewall.
    #[arg(
        long,
        env = "ENVGATE_HOST_FIREWALL",
        value_enum,
        default_value = "iptables"
    )]
    host_firewall: HostFirewall,
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
    /// envgate's SSH user CA keys: unencrypted OpenSSH ed25519 private keys (`ssh-keygen -t
    /// ed25519 -N '' -f FILE`), comma-separated or repeated, the same on every replica. The
    /// first signs the certificates `ssh USER+envgate@HOST cert` issues; every one is trusted
    /// for logins, so a key is rotated by adding the new one second, moving it first, and
    /// dropping the old once its last certificate expired (docs/operations.md). Unset: no
    /// certificates are issued.
    #[arg(long, env = "ENVGATE_USER_CA_KEY", value_delimiter = ',')]
    user_ca_key: Vec<PathBuf>,
    /// External SSH user CAs whose certificates log users in, like sshd's TrustedUserCAKeys:
    /// a file of OpenSSH public keys, one a line (step-ca, Vault, `ssh-keygen -s`). Unset:
    /// only envgate's own CA keys are trusted.
    #[arg(long, env = "ENVGATE_TRUSTED_USER_CA_KEYS")]
    trusted_user_ca_keys: Option<PathBuf>,
    /// How long the certificates envgate issues are valid: a number with s, m, h or d.
    #[arg(long, env = "ENVGATE_USER_CERT_VALIDITY", default_value = "16h")]
    user_cert_validity: String,
    /// A certificate from an external CA (--trusted-user-ca-keys) that names an unknown user
    /// creates that user (source "certificate", groups from --certificate-user-groups) at
    /// their first login. Off: such a certificate is refused as "unknown user". envgate's own
    /// certificates never create users: it certifies only users it has.
    #[arg(long, env = "ENVGATE_CERTIFICATE_CREATES_USERS")]
    certificate_creates_users: bool,
    /// The groups of users created by --certificate-creates-users, comma-separated.
    #[arg(long, env = "ENVGATE_CERTIFICATE_USER_GROUPS", value_delimiter = ',')]
    certificate_user_groups: Vec<String>,
    /// Password hashes (argon2id, ~19 MiB each) computed at once; 0: one per CPU.
    #[arg(long, env = "ENVGATE_PASSWORD_HASH_THREADS", default_value_t = 0)]
    password_hash_threads: usize,
    /// Password checks that may wait for a hasher; past that a login is refused at once
    /// ("the server is busy checking passwords").
    #[arg(long, env = "ENVGATE_PASSWORD_HASH_QUEUE", default_value_t = 32)]
    password_hash_queue: usize,
    /// Failed passwords per user and source address before each attempt must wait (1 s,
    /// doubling with every further failure).
    #[arg(long, env = "ENVGATE_AUTH_FREE_FAILURES", default_value_t = 5,
          value_parser = clap::value_parser!(u32).range(1..))]
    auth_free_failures: u32,
    /// The longest such wait.
    #[arg(long, env = "ENVGATE_AUTH_MAX_DELAY_SECONDS", default_value_t = 900)]
    auth_max_delay_seconds: u64,
    /// A user and source without failures for this long start afresh.
    #[arg(long, env = "ENVGATE_AUTH_QUIET_RESET_SECONDS", default_value_t = 900)]
    auth_quiet_reset_seconds: u64,
    /// Failed logins one source address (an IPv6 /64) may have across all users per window;
    /// a whole class behind one NAT address must fit.
    #[arg(long, env = "ENVGATE_AUTH_SOURCE_BUDGET", default_value_t = 600,
          value_parser = clap::value_parser!(u32).range(1..))]
    auth_source_budget: u32,
    #[arg(long, env = "ENVGATE_AUTH_SOURCE_WINDOW_SECONDS", default_value_t = 600,
          value_parser = clap::value_parser!(u64).range(1..))]
    auth_source_window_seconds: u64,
    /// Log JSON lines instead of text.
    #[arg(long, env = "ENVGATE_LOG_JSON")]
    log_json: bool,
    /// LDAP and the ContainerSSH-compatible webhooks (docs/identity.md).
    #[command(flatten)]
    identity: IdentityFlags,
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
    let keys = args
        .token_key
        .iter()
        .map(|path| {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("--token-key: cannot read {}", path.display()))?;
            TokenKey::from_hex_seed(&text)
                .with_context(|| format!("--token-key: {}", path.display()))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let token_keys =
        TokenKeys::new(keys, token::audience(&args.instance)).context("--token-key")?;
    let admin_tokens = AdminTokens::load(&args.admin_tokens)
        .with_context(|| format!("--admin-tokens: {}", args.admin_tokens.display()))?;
    let tls = TlsFiles::load(&args.tls_cert, &args.tls_key, &args.tls_client_ca)
        .context("--tls-cert/--tls-key/--tls-client-ca")?;
    let etcd_endpoints: Vec<String> = args
        .etcd
        .iter()
        .map(|e| e.trim().to_owned())
        .filter(|e| !e.is_empty())
        .collect();
    if let Some(plain) = etcd_endpoints.iter().find(|e| !e.starts_with("https://")) {
        bail!(
            "--etcd: {plain} is not https://; etcd holds every credential and is reached over TLS only"
        );
    }
    let etcd_tls = TlsFiles::load(&args.etcd_cert, &args.etcd_key, &args.etcd_ca)
        .context("--etcd-cert/--etcd-key/--etcd-ca")?;
    if let Some(host) = &args.docker_host {
        envgate_proto::tls::check_docker_host(host)
            .map_err(|e| anyhow::anyhow!("--docker-host: {e}"))?;
    }
    let audit = AuditLog::from_flag(args.audit_log.as_deref())
        .context("--audit-log: cannot open the file")?;
    if args.token_ttl_seconds == 0 || args.reconcile_interval_seconds == 0 {
        bail!("--token-ttl-seconds and --reconcile-interval-seconds must be at least 1");
    }
    let catalogue_file = args.environments.filter(|f| !f.as_os_str().is_empty());
    let environments = match &catalogue_file {
        None => Vec::new(),
        Some(file) => envgate_controlplane::catalogue::load(file)
            .map_err(|e| anyhow::anyhow!("--environments: {e}"))?,
    };
    let kubernetes = match args.runtime {
        RuntimeChoice::Docker => None,
        RuntimeChoice::Kubernetes => Some(kubernetes_setup(
            KubeFlags {
                namespace: args.kube_namespace,
                agent_image: args.kube_agent_image,
                kubeconfig: args.kubeconfig,
                context: args.kube_context,
                in_cluster: args.kube_in_cluster,
                start_timeout: Duration::from_secs(args.kube_start_timeout_seconds),
            },
            catalogue_file.as_deref(),
            &environments,
        )?),
    };
    let identity = args
        .identity
        .sources(Duration::from_secs(args.token_ttl_seconds))
        .map_err(|e| anyhow::anyhow!(e))?;
    let certificates = certificate_authority(
        &args.user_ca_key,
        args.trusted_user_ca_keys.as_deref(),
        &args.user_cert_validity,
        args.certificate_creates_users,
        &args.certificate_user_groups,
    )?;
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
        etcd: EtcdConfig {
            endpoints: etcd_endpoints,
            tls: Some(etcd_tls),
        },
        etcd_prefix: args.etcd_prefix,
        etcd_timeout: Duration::from_secs(5),
        tls,
        token_keys: Arc::new(token_keys),
        token_ttl: Duration::from_secs(args.token_ttl_seconds),
        admin_tokens: Arc::new(admin_tokens),
        audit,
        instance: args.instance,
        docker_host: args.docker_host,
        create_concurrency: args
            .create_concurrency
            .map_or_else(envgate_controlplane::admission::default_limit, usize::from),
        recordings_dir: args.recordings_dir,
        docker_network: (!args.docker_network.is_empty()).then_some(UserNetwork {
            name: args.docker_network,
            host_firewall: args.host_firewall,
        }),
        image_pull_timeout: Duration::from_secs(args.image_pull_timeout_seconds),
        max_containers_per_user: args.max_containers_per_user,
        agent,
        home_slots_dir,
        kubernetes,
        reconcile_interval: Duration::from_secs(args.reconcile_interval_seconds),
        orphan_grace: Duration::from_secs(args.orphan_grace_seconds),
        replica_id: format!("{}-{}", hostname(), std::process::id()),
        hash_cost: HashCost::default(),
        hash_threads: match args.password_hash_threads {
            0 => std::thread::available_parallelism().map_or(2, usize::from),
            n => n,
        },
        hash_queue: args.password_hash_queue,
        throttle: ThrottlePolicy {
            free_failures: args.auth_free_failures,
            first_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(args.auth_max_delay_seconds.max(1)),
            quiet_reset: Duration::from_secs(args.auth_quiet_reset_seconds.max(1)),
            source_budget: args.auth_source_budget,
            source_window: Duration::from_secs(args.auth_source_window_seconds),
        },
        environments,
        identity: Arc::new(identity),
        certificates: Arc::new(certificates),
        clock: Arc::new(SystemClock),
    })
}

/// The SSH user CA flags, read and checked (docs/identity.md, "SSH certificates").
fn certificate_authority(
    own: &[PathBuf],
    trusted: Option<&std::path::Path>,
    validity: &str,
    creates_users: bool,
    groups: &[String],
) -> anyhow::Result<CertificateAuthority> {
    let own = own
        .iter()
        .filter(|p| !p.as_os_str().is_empty())
        .map(|path| {
            sshca::load_private_key(path)
                .map_err(|e| anyhow::anyhow!("--user-ca-key: {}: {e}", path.display()))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let external = match trusted.filter(|p| !p.as_os_str().is_empty()) {
        None => Vec::new(),
        Some(path) => sshca::load_trusted_keys(path)
            .map_err(|e| anyhow::anyhow!("--trusted-user-ca-keys: {}: {e}", path.display()))?,
    };
    let validity = sshca::parse_validity(validity)
        .map_err(|e| anyhow::anyhow!("--user-cert-validity: {e}"))?;
    let groups: Vec<String> = groups
        .iter()
        .map(|g| g.trim().to_owned())
        .filter(|g| !g.is_empty())
        .collect();
    if creates_users && external.is_empty() {
        bail!(
            "--certificate-creates-users needs --trusted-user-ca-keys (only external CAs create users)"
        );
    }
    if !groups.is_empty() && !creates_users {
        bail!("--certificate-user-groups is only used with --certificate-creates-users");
    }
    let creation = creates_users.then_some(UserCreation { groups });
    Ok(CertificateAuthority::new(own, external, validity, creation))
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

/// `envgate-controlplane pki …`: one CA or certificate, printed as the files written.
fn pki(dir: &std::path::Path, what: PkiCommand) -> anyhow::Result<()> {
    let (ca, name, profile) = match what {
        PkiCommand::Ca { name } => {
            let ca = Authority::ensure(dir, &name)?;
            println!("{}", ca.cert_path().display());
            return Ok(());
        }
        PkiCommand::Server { ca, name, san } => (ca, name, Profile::Server { sans: san }),
        PkiCommand::Peer { ca, name, san } => (ca, name, Profile::Peer { sans: san }),
        PkiCommand::Client { ca, name } => {
            (ca, name.clone(), Profile::Client { common_name: name })
        }
        PkiCommand::Proxy { ca, id } => (ca, format!("proxy-{id}"), Profile::Proxy { id }),
    };
    let authority = Authority::ensure(dir, &ca)?;
    authority.issue(dir, &name, &profile)?;
    let (cert, key) = envgate_controlplane::pki::paths(dir, &name);
    println!("{}\n{}", cert.display(), key.display());
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    // `pki` is a tool beside the server, not a mode of it: the server's flags (several
    // required) do not apply to it, so it is parsed on its own.
    let mut argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if argv.get(1).is_some_and(|a| a == "pki") {
        argv.remove(1);
        let cli = PkiCli::parse_from(argv);
        return match pki(&cli.dir, cli.what) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("envgate-controlplane pki: {e:#}");
                ExitCode::from(2)
            }
        };
    }
    let args = Args::parse_from(argv);
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

/// Where user containers run (`--runtime`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum RuntimeChoice {
    Docker,
    Kubernetes,
}

/// The `--kube-*` flags.
struct KubeFlags {
    namespace: String,
    agent_image: Option<String>,
    kubeconfig: Option<PathBuf>,
    context: Option<String>,
    in_cluster: bool,
    start_timeout: Duration,
}

/// Checks the Kubernetes flags and the catalogue's `kubernetes:` blocks before anything is
/// bound; every refusal is one line naming the flag or the environment.
fn kubernetes_setup(
    flags: KubeFlags,
    catalogue_file: Option<&std::path::Path>,
    environments: &[envgate_controlplane::model::EnvironmentRecord],
) -> anyhow::Result<envgate_controlplane::KubernetesSetup> {
    use envgate_runtime::kubernetes::{ClientSource, KubernetesConfig, settings};
    if !settings::is_dns_subdomain(&flags.namespace) || flags.namespace.contains('.') {
        bail!(
            "--kube-namespace: {:?} is not a namespace name (lowercase letters, digits and -)",
            flags.namespace
        );
    }
    let Some(agent_image) = flags.agent_image.filter(|i| !i.trim().is_empty()) else {
        bail!(
            "--kube-agent-image: required with --runtime kubernetes (an image with the static agent at /envgate-agent)"
        );
    };
    if let Some(env) = environments
        .iter()
        .find(|e| e.gpus == envgate_controlplane::model::Gpus::All)
    {
        bail!(
            "--environments: environment {:?}: gpus: all has no meaning on Kubernetes; give a number of GPUs",
            env.name
        );
    }
    let home = match catalogue_file {
        Some(file) => envgate_controlplane::catalogue::load_kubernetes_home(file)
            .map_err(|e| anyhow::anyhow!("--environments: {e}"))?,
        None => Default::default(),
    };
    if let Some(path) = &flags.kubeconfig {
        kube::config::Kubeconfig::read_from(path).map_err(|e| {
            // The YAML parser's message spans lines (a caret under the spot); one is enough.
            let e = e.to_string();
            let line = e.lines().next().unwrap_or_default();
            anyhow::anyhow!("--kubeconfig: {}: {line}", path.display())
        })?;
    }
    let client = match (flags.kubeconfig, flags.in_cluster) {
        (Some(path), _) => ClientSource::Kubeconfig {
            path,
            context: flags.context,
        },
        (None, true) => ClientSource::InCluster,
        (None, false) => ClientSource::Infer,
    };
    Ok(envgate_controlplane::KubernetesSetup {
        client,
        config: KubernetesConfig {
            namespace: flags.namespace,
            agent_image,
            start_timeout: flags.start_timeout,
            home,
        },
    })
}
