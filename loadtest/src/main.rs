//! envgate-loadtest: parses the command line and hands over to the library.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use envgate_loadtest::sweep::{COMPARE, Endpoint, SweepConfig, TARGET, run_sweep};
use envgate_loadtest::{
    ClientKind, bench_doc, cost, hold, plot, pool_doc, report, scrape, storm, users,
};

#[derive(Parser)]
#[command(
    name = "envgate-loadtest",
    version,
    about = "Concurrent-ssh load test for envgate, with an OpenSSH baseline"
)]
struct Cli {
    /// Log as JSON lines.
    #[arg(long, global = true, env = "ENVGATE_LOG_JSON")]
    log_json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run N simultaneous clients per level and report where the time goes.
    Sweep(Box<SweepArgs>),
    /// Generate ed25519 keys for N users and create the users through the admin API.
    Users(UsersArgs),
    /// Print the table and redraw the plots of an earlier sweep's output directory.
    Report(ReportArgs),
    /// Hold many idle authenticated connections and report the proxies' resident memory per connection.
    Hold(HoldArgs),
    /// Many bad password logins at once while good key logins go on; reports the control
    /// plane's memory and the good logins' times against a baseline (and with --doc, writes
    /// them into docs/benchmarks.md).
    Storm(StormArgs),
    /// The servers' CPU and etcd's work per warm login: a bounded loop of logins, less an
    /// idle window of the same length (and with --doc, written into docs/benchmarks.md).
    Cost(CostArgs),
    /// Write the results of `deploy/local/fleet bench` into the generated region of a Markdown file.
    BenchDoc(BenchDocArgs),
    /// Write the warm-pool comparison of `deploy/local/fleet bench` (the same cold sweep with
    /// the pool off and on) into its generated region of a Markdown file.
    PoolDoc(PoolDocArgs),
}

#[derive(Args)]
struct StormArgs {
    /// SSH front door (HAProxy), host:port.
    #[arg(long)]
    target: String,
    /// Bad password logins, all at once.
    #[arg(long, default_value_t = 1000)]
    bad: usize,
    /// They come from 127.0.0.2, 127.0.0.3, … (this many addresses, in turn).
    #[arg(long, default_value_t = 200)]
    sources: u8,
    /// Good users (keys and users.txt of `envgate-loadtest users`) and how many of them.
    #[arg(long)]
    key_dir: PathBuf,
    #[arg(long)]
    users: usize,
    /// Good key logins, without the storm and then during it.
    #[arg(long, default_value_t = 50)]
    good: usize,
    /// The control plane's pid (its memory is read from /proc) and /metrics URL.
    #[arg(long)]
    controlplane_pid: u32,
    #[arg(long)]
    metrics: String,
    /// Limit on each login (seconds).
    #[arg(long, default_value_t = 60)]
    timeout: u64,
    #[command(flatten)]
    publish: PublishArgs,
}

#[derive(Args)]
struct CostArgs {
    /// SSH front door (HAProxy), host:port.
    #[arg(long)]
    target: String,
    /// Users (keys and users.txt of `envgate-loadtest users`) and how many of them, in turn.
    #[arg(long)]
    key_dir: PathBuf,
    #[arg(long)]
    users: usize,
    /// Logins measured, and how many at a time.
    #[arg(long, default_value_t = 1000)]
    logins: usize,
    #[arg(long, default_value_t = 4)]
    concurrency: usize,
    #[arg(long, default_value = "true")]
    command: String,
    /// A server process to measure, LABEL=PID (repeat: proxy-1=…, controlplane=…, etcd=…,
    /// haproxy=…; a label starting with "docker" is reported apart from the fleet's total).
    #[arg(long = "process", value_parser = parse_process, required = true)]
    processes: Vec<(String, u32)>,
    /// etcd's /metrics (http:// or https://).
    #[arg(long)]
    etcd_metrics: String,
    /// For an https:// --etcd-metrics: the CA, and the client certificate and key.
    #[arg(long, requires_all = ["etcd_cert", "etcd_key"])]
    etcd_ca: Option<PathBuf>,
    #[arg(long)]
    etcd_cert: Option<PathBuf>,
    #[arg(long)]
    etcd_key: Option<PathBuf>,
    /// Limit on each login (seconds).
    #[arg(long, default_value_t = 60)]
    timeout: u64,
    #[command(flatten)]
    publish: PublishArgs,
}

/// Where a bench part's result goes.
#[derive(Args)]
struct PublishArgs {
    /// Write the result as JSON here.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Write the table into this document's generated region (with --meta lines on top).
    #[arg(long)]
    doc: Option<PathBuf>,
    #[arg(long)]
    meta: Option<PathBuf>,
}

fn parse_process(text: &str) -> Result<(String, u32), String> {
    let (label, pid) = text
        .split_once('=')
        .ok_or_else(|| format!("{text:?} is not LABEL=PID"))?;
    let pid = pid
        .parse()
        .map_err(|_| format!("{pid:?} in {text:?} is not a process id"))?;
    if label.is_empty() {
        return Err(format!("{text:?} has no label"));
    }
    Ok((label.to_owned(), pid))
}

#[derive(Args)]
struct PoolDocArgs {
    /// --out directory of the cold sweep with the warm pool off.
    #[arg(long)]
    off: PathBuf,
    /// --out directory of the same sweep with the warm pool on.
    #[arg(long)]
    on: PathBuf,
    /// `warm_pool_size` during the "on" sweep.
    #[arg(long)]
    pool_size: u32,
    /// "name: value" lines (date, machine, versions, command) listed at the top.
    #[arg(long)]
    meta: PathBuf,
    /// The document; only the pool's generated region is replaced.
    #[arg(long, default_value = "docs/benchmarks.md")]
    doc: PathBuf,
}

#[derive(Args)]
struct BenchDocArgs {
    /// --out directory of the warm sweep.
    #[arg(long)]
    warm: PathBuf,
    /// --out directory of the cold sweep.
    #[arg(long)]
    cold: PathBuf,
    /// --out file of `hold`.
    #[arg(long)]
    hold: PathBuf,
    /// "name: value" lines (date, machine, versions, command) listed at the top.
    #[arg(long)]
    meta: PathBuf,
    /// The document; only its generated region is replaced.
    #[arg(long, default_value = "docs/benchmarks.md")]
    doc: PathBuf,
    /// Path prefix of the plots, relative to the document.
    #[arg(long, default_value = "img/bench-")]
    img_prefix: String,
}

#[derive(Args)]
struct HoldArgs {
    /// SSH endpoint, HOST:PORT (HAProxy in front of the proxies).
    #[arg(long, env = "ENVGATE_LOADTEST_TARGET")]
    target: String,
    /// Spread the connections over the first N users of --key-dir.
    #[arg(long, env = "ENVGATE_LOADTEST_USERS")]
    users: usize,
    /// Directory written by `envgate-loadtest users`.
    #[arg(long, env = "ENVGATE_LOADTEST_KEY_DIR")]
    key_dir: PathBuf,
    /// Connections to open and hold.
    #[arg(long, default_value_t = 1000)]
    sessions: usize,
    /// Connections being opened at once.
    #[arg(long, default_value_t = 50)]
    parallel: usize,
    /// Process ids of the proxies whose resident memory is read, comma-separated.
    #[arg(long, value_delimiter = ',', required = true)]
    pids: Vec<u32>,
    /// Seconds between the last connection opened and the second reading.
    #[arg(long, default_value_t = 3)]
    settle_secs: u64,
    /// Limit on opening each connection (seconds).
    #[arg(long, env = "ENVGATE_LOADTEST_TIMEOUT", default_value_t = 60)]
    timeout: u64,
    /// Key exchange, as for sweep.
    #[arg(long, env = "ENVGATE_LOADTEST_KEX", default_value = envgate_loadtest::client::DEFAULT_KEX)]
    kex: String,
    /// Write the result as JSON here too.
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Args)]
struct ReportArgs {
    /// The --out directory of the sweep (summary.json and connections.json are read).
    #[arg(long, env = "ENVGATE_LOADTEST_OUT", default_value = "loadtest-out")]
    out: PathBuf,
    /// TrueType font for the plots (default: DejaVu Sans from fonts-dejavu-core).
    #[arg(long, env = "ENVGATE_LOADTEST_FONT")]
    font: Option<PathBuf>,
}

#[derive(Args)]
struct SweepArgs {
    /// SSH endpoint under test, HOST:PORT.
    #[arg(long, env = "ENVGATE_LOADTEST_TARGET")]
    target: String,
    /// Concurrency levels, comma-separated; each level's clients start together.
    #[arg(
        long,
        env = "ENVGATE_LOADTEST_LEVELS",
        value_delimiter = ',',
        default_value = "1,10,20,30,40,50,60,70,80,90,100"
    )]
    levels: Vec<u32>,
    /// Command every client runs.
    #[arg(long, env = "ENVGATE_LOADTEST_COMMAND", default_value = "date")]
    command: String,
    /// SSH client: russh (in-process, every step timed) or openssh (the `ssh` binary, turnaround only).
    #[arg(
        long,
        env = "ENVGATE_LOADTEST_CLIENT",
        value_enum,
        default_value = "russh"
    )]
    client: ClientKind,
    /// The one key exchange algorithm both client kinds offer, the same at both endpoints;
    /// "default" leaves each client its own list (OpenSSH 9 then picks sntrup761x25519 where
    /// the server has it, which costs far more CPU than curve25519).
    #[arg(long, env = "ENVGATE_LOADTEST_KEX", default_value = envgate_loadtest::client::DEFAULT_KEX)]
    kex: String,
    /// Single user to log in as (with --key).
    #[arg(
        long,
        env = "ENVGATE_LOADTEST_USER",
        conflicts_with = "users",
        requires = "key"
    )]
    user: Option<String>,
    /// Private key (OpenSSH format, unencrypted) of --user.
    #[arg(long, env = "ENVGATE_LOADTEST_KEY")]
    key: Option<PathBuf>,
    /// Spread clients over the first N users of --key-dir (DIR/users.txt lists them, DIR/<user> is each key).
    #[arg(long, env = "ENVGATE_LOADTEST_USERS", requires = "key_dir")]
    users: Option<usize>,
    /// Directory written by `envgate-loadtest users`.
    #[arg(long, env = "ENVGATE_LOADTEST_KEY_DIR")]
    key_dir: Option<PathBuf>,
    /// Every client is a different user that was never used before in this sweep
    /// (needs as many users as clients over all levels; the caller provisions them).
    #[arg(long, env = "ENVGATE_LOADTEST_FRESH_USERS")]
    fresh_users: bool,
    /// Second SSH endpoint measured in the same run, level by level (e.g. deploy/local/floor-sshd).
    #[arg(long, env = "ENVGATE_LOADTEST_COMPARE")]
    compare: Option<String>,
    /// User to log in as at --compare, with the same keys (default: the same users as the target).
    #[arg(long, env = "ENVGATE_LOADTEST_COMPARE_USER", requires = "compare")]
    compare_user: Option<String>,
    /// Prometheus /metrics URLs of the proxies and control planes, comma-separated; scraped around each level.
    #[arg(long, env = "ENVGATE_LOADTEST_METRICS", value_delimiter = ',')]
    metrics: Vec<String>,
    /// Limit on each connection, from its start until it closed (seconds).
    #[arg(long, env = "ENVGATE_LOADTEST_TIMEOUT", default_value_t = 60)]
    timeout: u64,
    /// Quiet time between runs (milliseconds).
    #[arg(long, env = "ENVGATE_LOADTEST_PAUSE_MS", default_value_t = 1000)]
    pause_ms: u64,
    /// Output directory for connections.csv/.json, summary.json and the plots.
    #[arg(long, env = "ENVGATE_LOADTEST_OUT", default_value = "loadtest-out")]
    out: PathBuf,
    /// TrueType font for the plots (default: DejaVu Sans from fonts-dejavu-core).
    #[arg(long, env = "ENVGATE_LOADTEST_FONT")]
    font: Option<PathBuf>,
    /// The `ssh` binary for --client openssh.
    #[arg(long, env = "ENVGATE_LOADTEST_SSH", default_value = "ssh")]
    ssh: PathBuf,
    /// No progress bar (it is also off when stderr is not a terminal).
    #[arg(long, env = "ENVGATE_LOADTEST_NO_PROGRESS")]
    no_progress: bool,
}

#[derive(Args)]
struct UsersArgs {
    /// Admin gRPC endpoint of the control plane.
    #[arg(
        long,
        env = "ENVGATE_LOADTEST_ADMIN",
        default_value = "https://127.0.0.1:50051"
    )]
    admin: String,
    /// The CA (PEM) that issued the control plane's certificate (the fleet CA); needed for
    /// an https:// --admin.
    #[arg(long, env = "ENVGATE_LOADTEST_ADMIN_CA")]
    admin_ca: Option<PathBuf>,
    /// File holding the operator's admin bearer token.
    #[arg(long, env = "ENVGATE_ADMIN_TOKEN_FILE")]
    admin_token_file: PathBuf,
    /// How many users to create.
    #[arg(long, env = "ENVGATE_LOADTEST_COUNT")]
    count: usize,
    /// Name prefix; users are <prefix>0001, <prefix>0002, …
    #[arg(long, env = "ENVGATE_LOADTEST_PREFIX", default_value = "lt")]
    prefix: String,
    /// Where keys and users.txt are written (existing keys are kept).
    #[arg(long, env = "ENVGATE_LOADTEST_KEY_DIR")]
    key_dir: PathBuf,
    /// Default environment of the created users (default: the catalogue's).
    #[arg(long, env = "ENVGATE_LOADTEST_ENVIRONMENT")]
    environment: Option<String>,
    /// Limit on each admin call (seconds).
    #[arg(long, env = "ENVGATE_LOADTEST_TIMEOUT", default_value_t = 10)]
    timeout: u64,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Logging only: the load generator exports no traces.
    if let Err(e) = envgate_proto::telemetry::init("envgate-loadtest", cli.log_json, None) {
        eprintln!("envgate-loadtest: cannot set up logging: {e}");
        return ExitCode::FAILURE;
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("envgate-loadtest: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Sweep(args) => sweep(*args).await,
            Command::Users(args) => create_users(args).await,
            Command::Report(args) => redraw(args),
            Command::Hold(args) => hold(args).await,
            Command::Storm(args) => storm(args).await,
            Command::Cost(args) => cost(args).await,
            Command::BenchDoc(args) => bench_doc(args),
            Command::PoolDoc(args) => pool_doc(args),
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("envgate-loadtest: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn sweep(args: SweepArgs) -> anyhow::Result<ExitCode> {
    let credentials = match (&args.user, &args.key, args.users, &args.key_dir) {
        (Some(user), Some(key), _, _) => vec![users::credential(user, key)?],
        (None, _, Some(n), Some(dir)) => users::credentials_from_dir(dir, n)?,
        _ => bail!("give either --user NAME --key FILE, or --users N --key-dir DIR"),
    };
    let compare = args.compare.as_ref().map(|addr| Endpoint {
        label: COMPARE.to_owned(),
        addr: addr.clone(),
        credentials: match &args.compare_user {
            Some(user) => users::as_user(&credentials, user),
            None => credentials.clone(),
        },
    });
    let mut config = SweepConfig::new(
        Endpoint {
            label: TARGET.to_owned(),
            addr: args.target.clone(),
            credentials,
        },
        args.levels.clone(),
        args.command.clone(),
    );
    config.compare = compare;
    config.client = args.client;
    config.kex = (args.kex != "default").then(|| args.kex.clone());
    config.timeout = Duration::from_secs(args.timeout);
    config.fresh_users = args.fresh_users;
    config.metrics = args.metrics.clone();
    config.ssh_binary = args.ssh.clone();
    config.pause = Duration::from_millis(args.pause_ms);
    config.progress = !args.no_progress;
    config.validate()?;
    // Fail on a missing font before the sweep, not after an hour of it.
    plot::register_font(args.font.as_deref())?;

    let result = run_sweep(&config).await?;
    let mut files = report::write_results(&args.out, &result)?;
    files.extend(plot::write_plots(&args.out, &result, args.font.as_deref())?);
    print!("{}", report::summary_table(&result));
    println!(
        "\nwrote {}",
        files
            .iter()
            .map(|f| f.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
    let failures = result.failures();
    if failures > 0 {
        println!("{failures} of {} connections failed", result.records.len());
        return Ok(ExitCode::from(2));
    }
    Ok(ExitCode::SUCCESS)
}

fn redraw(args: ReportArgs) -> anyhow::Result<ExitCode> {
    let result = report::read_results(&args.out)?;
    let files = plot::write_plots(&args.out, &result, args.font.as_deref())?;
    print!("{}", report::summary_table(&result));
    println!(
        "\nwrote {}",
        files
            .iter()
            .map(|f| f.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(ExitCode::SUCCESS)
}

async fn hold(args: HoldArgs) -> anyhow::Result<ExitCode> {
    let config = hold::HoldConfig {
        addr: args.target,
        credentials: users::credentials_from_dir(&args.key_dir, args.users)?,
        sessions: args.sessions,
        parallel: args.parallel,
        pids: args.pids,
        timeout: Duration::from_secs(args.timeout),
        settle: Duration::from_secs(args.settle_secs),
        kex: (args.kex != "default").then_some(args.kex),
    };
    let result = hold::hold(&config).await?;
    println!(
        "{} idle authenticated sessions: proxy RSS {} KiB -> {} KiB, {:.1} KiB per session",
        result.sessions, result.rss_before_kib, result.rss_after_kib, result.kib_per_session
    );
    if let Some(out) = &args.out {
        std::fs::write(out, serde_json::to_string_pretty(&result)?)
            .with_context(|| format!("writing {}", out.display()))?;
    }
    Ok(ExitCode::SUCCESS)
}

async fn storm(args: StormArgs) -> anyhow::Result<ExitCode> {
    let config = storm::StormConfig {
        addr: args.target,
        bad: args.bad,
        sources: (0..args.sources.max(1))
            .map(|n| std::net::IpAddr::from([127, 0, 0, n.saturating_add(2)]))
            .collect(),
        good: users::credentials_from_dir(&args.key_dir, args.users)?,
        good_logins: args.good,
        controlplane_pid: args.controlplane_pid,
        metrics: args.metrics,
        timeout: Duration::from_secs(args.timeout),
    };
    let result = storm::run(&config).await?;
    args.publish.write(&result, storm::markdown, storm::splice)
}

impl PublishArgs {
    /// Writes a bench part's result as JSON to `--out`, and its table (with the `--meta` lines
    /// on top) into its region of `--doc`, or prints the table without a `--doc`.
    fn write<T: serde::Serialize>(
        &self,
        result: &T,
        markdown: fn(&T, &[(String, String)]) -> String,
        splice: fn(&str, &str) -> String,
    ) -> anyhow::Result<ExitCode> {
        if let Some(out) = &self.out {
            std::fs::write(out, serde_json::to_string_pretty(result)?)
                .with_context(|| format!("writing {}", out.display()))?;
        }
        let meta = match &self.meta {
            Some(path) => read_meta(path)?,
            None => Vec::new(),
        };
        let generated = markdown(result, &meta);
        match &self.doc {
            Some(doc) => write_doc(doc, &generated, splice),
            None => {
                println!("{generated}");
                Ok(ExitCode::SUCCESS)
            }
        }
    }
}

async fn cost(args: CostArgs) -> anyhow::Result<ExitCode> {
    let etcd_tls = match (&args.etcd_ca, &args.etcd_cert, &args.etcd_key) {
        (Some(ca), Some(cert), Some(key)) => Some(
            scrape::ClientTls::from_pem_files(ca, cert, key)
                .map_err(|e| anyhow::anyhow!("etcd client certificate: {e}"))?,
        ),
        _ => None,
    };
    let config = cost::CostConfig {
        addr: args.target,
        credentials: users::credentials_from_dir(&args.key_dir, args.users)?,
        command: args.command,
        logins: args.logins,
        concurrency: args.concurrency,
        processes: args.processes,
        etcd_metrics: args.etcd_metrics,
        etcd_tls,
        timeout: Duration::from_secs(args.timeout),
    };
    let result = cost::run(&config).await?;
    args.publish.write(&result, cost::markdown, cost::splice)
}

fn read_text(path: &Path) -> anyhow::Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

/// The "name: value" lines of a bench run's meta file (date, machine, versions, command).
fn read_meta(path: &Path) -> anyhow::Result<Vec<(String, String)>> {
    Ok(read_text(path)?
        .lines()
        .filter_map(|l| l.split_once(": "))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect())
}

/// Puts `generated` into its region of the document at `doc` (`splice` knows the markers),
/// creating the document if it is missing, and prints what was written.
fn write_doc(
    doc: &Path,
    generated: &str,
    splice: fn(&str, &str) -> String,
) -> anyhow::Result<ExitCode> {
    // Only a missing document starts empty: one that cannot be read (not UTF-8, no
    // permission) must not be overwritten with the generated region alone.
    let text = match std::fs::read_to_string(doc) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        read => read.with_context(|| format!("reading {}", doc.display()))?,
    };
    std::fs::write(doc, splice(&text, generated))
        .with_context(|| format!("writing {}", doc.display()))?;
    println!("{generated}\nwrote {}", doc.display());
    Ok(ExitCode::SUCCESS)
}

fn bench_doc(args: BenchDocArgs) -> anyhow::Result<ExitCode> {
    let warm = report::read_results(&args.warm)?;
    let cold = report::read_results(&args.cold)?;
    let memory: hold::HoldResult = serde_json::from_str(&read_text(&args.hold)?)
        .with_context(|| format!("parsing {}", args.hold.display()))?;
    let meta = read_meta(&args.meta)?;
    let generated = bench_doc::render(&bench_doc::BenchRun {
        meta: &meta,
        warm: &warm,
        cold: &cold,
        memory: &memory,
        img_prefix: &args.img_prefix,
    });
    write_doc(&args.doc, &generated, bench_doc::splice)
}

fn pool_doc(args: PoolDocArgs) -> anyhow::Result<ExitCode> {
    let off = report::read_results(&args.off)?;
    let on = report::read_results(&args.on)?;
    let meta = read_meta(&args.meta)?;
    let generated = pool_doc::render(&pool_doc::PoolRun {
        meta: &meta,
        off: &off,
        on: &on,
        pool_size: args.pool_size,
    });
    write_doc(&args.doc, &generated, pool_doc::splice)
}

async fn create_users(args: UsersArgs) -> anyhow::Result<ExitCode> {
    let token = users::read_admin_token(&args.admin_token_file)?;
    let ca = match &args.admin_ca {
        Some(path) => Some(
            std::fs::read(path)
                .with_context(|| format!("--admin-ca: cannot read {}", path.display()))?,
        ),
        None => None,
    };
    let created = users::generate(&args.key_dir, &args.prefix, args.count)
        .with_context(|| format!("writing keys to {}", args.key_dir.display()))?;
    users::create_users(
        &args.admin,
        ca.as_deref(),
        &token,
        &created,
        args.environment.as_deref(),
        Duration::from_secs(args.timeout),
    )
    .await?;
    println!(
        "created {} users ({} … {}); keys and users.txt in {}",
        created.len(),
        created.first().map(|u| u.0.as_str()).unwrap_or("-"),
        created.last().map(|u| u.0.as_str()).unwrap_or("-"),
        args.key_dir.display()
    );
    Ok(ExitCode::SUCCESS)
}
