//! `envgate-agent`: the container's init and the proxy's process spawner.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Parser;
use envgate_agent::AccountFiles;
use envgate_agent::server::{self, AgentConfig};

/// Runs as PID 1 in a user container: reaps zombies, forwards SIGTERM/SIGINT to the
/// container's processes, and starts session processes for authenticated envgate proxies.
#[derive(Debug, Parser)]
#[command(name = "envgate-agent", version)]
struct Args {
    /// Unix socket to serve the proxy on (inside a directory bind-mounted from the host).
    #[arg(long, env = "ENVGATE_AGENT_SOCKET")]
    socket: Option<PathBuf>,

    /// Also (or only) serve on this TCP address, e.g. 0.0.0.0:7022 in a Kubernetes pod.
    #[arg(long, env = "ENVGATE_AGENT_LISTEN_TCP")]
    listen_tcp: Option<SocketAddr>,

    /// File holding the per-container secret (at least 16 bytes; surrounding whitespace is
    /// ignored). Keep it readable by root only. Without it the secret is taken from the
    /// ENVGATE_AGENT_SECRET environment variable.
    #[arg(long, env = "ENVGATE_AGENT_SECRET_FILE")]
    secret_file: Option<PathBuf>,

    /// Account database used for user switching (parsed directly, no NSS).
    #[arg(long, env = "ENVGATE_AGENT_PASSWD_FILE", default_value = "/etc/passwd")]
    passwd_file: PathBuf,

    /// Group database used for supplementary groups.
    #[arg(long, env = "ENVGATE_AGENT_GROUP_FILE", default_value = "/etc/group")]
    group_file: PathBuf,

    /// Authenticated proxy connections served at once.
    #[arg(long, env = "ENVGATE_AGENT_MAX_CONNECTIONS", default_value_t = 64)]
    max_connections: usize,

    /// Processes one proxy connection may have running at once.
    #[arg(long, env = "ENVGATE_AGENT_MAX_PROCESSES", default_value_t = 1024)]
    max_processes: usize,

    /// A connection that has not authenticated within this time is closed.
    #[arg(
        long,
        env = "ENVGATE_AGENT_HANDSHAKE_TIMEOUT_SECONDS",
        default_value_t = 10
    )]
    handshake_timeout_seconds: u64,

    /// After SIGTERM/SIGINT, how long the container's processes get before SIGKILL
    /// (keep it under `docker stop`'s timeout, 10 s by default).
    #[arg(long, env = "ENVGATE_AGENT_STOP_TIMEOUT_SECONDS", default_value_t = 8)]
    stop_timeout_seconds: u64,

    /// Log as JSON lines.
    #[arg(long, env = "ENVGATE_AGENT_LOG_JSON")]
    log_json: bool,
}

const SECRET_ENV: &str = "ENVGATE_AGENT_SECRET";

fn read_secret(file: Option<&PathBuf>) -> anyhow::Result<Vec<u8>> {
    let raw = match file {
        Some(path) => std::fs::read(path)
            .with_context(|| format!("cannot read the secret file {}", path.display()))?,
        None => match std::env::var_os(SECRET_ENV) {
            Some(v) => v.into_encoded_bytes(),
            None => bail!(
                "no secret: give --secret-file (or ENVGATE_AGENT_SECRET_FILE) or set {SECRET_ENV}"
            ),
        },
    };
    let secret = raw.trim_ascii().to_vec();
    if secret.len() < envgate_agent::auth::MIN_SECRET_LEN {
        bail!(
            "the secret must be at least {} bytes",
            envgate_agent::auth::MIN_SECRET_LEN
        );
    }
    Ok(secret)
}

/// glibc's malloc gives blocks from 128 KiB up their own mappings and hands freed memory back
/// to the kernel past 128 KiB, moving both limits as it goes. The agent's traffic is a stream of
/// 256 KiB buffers (file reads, frames), so each one was mapped, faulted in page by page and
/// unmapped again: 650 000 page faults and most of the CPU of a 1 GiB SFTP download. Fixed
/// limits keep those buffers in the heap and a few MiB of freed memory for the next ones.
#[cfg(target_env = "gnu")]
fn keep_buffers_mapped() {
    // SAFETY: mallopt only sets allocator parameters; called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 8 << 20);
    }
}

fn main() {
    #[cfg(target_env = "gnu")]
    keep_buffers_mapped();
    // Started by the agent itself as a session's SFTP subsystem: no flags, no logs (stderr
    // reaches the user's client).
    if std::env::args_os().nth(1).as_deref() == Some(envgate_agent::SFTP_SERVER.as_ref()) {
        let served = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .and_then(|runtime| runtime.block_on(envgate_agent::sftp::serve()));
        if let Err(e) = served {
            eprintln!("envgate sftp-server: {e}");
            std::process::exit(1);
        }
        return;
    }
    // The tools the proxy runs through the agent as the session's user: `scp -O`'s remote
    // side (`scp.rs`) and one forwarded connection (`connect.rs`).
    let tool: Option<fn(&[String]) -> i32> = match std::env::args_os().nth(1) {
        Some(a) if a == envgate_agent::SCP => Some(envgate_agent::scp::main),
        Some(a) if a == envgate_agent::CONNECT => Some(envgate_agent::connect::main),
        Some(a) if a == envgate_agent::CONNECT_UNIX => Some(envgate_agent::connect::main_unix),
        Some(a) if a == envgate_agent::LISTEN => Some(envgate_agent::listen::main),
        _ => None,
    };
    if let Some(tool) = tool {
        let args: Vec<String> = std::env::args_os()
            .skip(2)
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        std::process::exit(tool(&args));
    }
    let args = Args::parse();
    // One clear line for bad config or a failed start, then a non-zero exit.
    if let Err(e) = run(args) {
        eprintln!("envgate-agent: {e:#}");
        std::process::exit(2);
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_from_env("ENVGATE_AGENT_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    if args.log_json {
        logs.json().init();
    } else {
        logs.init();
    }

    let secret = read_secret(args.secret_file.as_ref())?;
    let config = AgentConfig {
        socket: args.socket,
        listen_tcp: args.listen_tcp,
        secret,
        base_env: server::session_base_env(std::env::vars()),
        accounts: AccountFiles {
            passwd: args.passwd_file,
            group: args.group_file,
        },
        max_connections: args.max_connections.max(1),
        max_processes_per_connection: args.max_processes.max(1),
        handshake_timeout: Duration::from_secs(args.handshake_timeout_seconds.max(1)),
        stop_timeout: Duration::from_secs(args.stop_timeout_seconds),
    };
    // Single-threaded on purpose: see the reaper's note on fork/registration ordering, and
    // one thread keeps PID 1 small in every container.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let code = runtime.block_on(server::run(config))?;
    std::process::exit(code)
}
