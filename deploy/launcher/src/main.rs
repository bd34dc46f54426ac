//! `envgate-fleet`: the local fleet's processes, for `deploy/local/fleet` (which installs,
//! builds and then calls this). Processes it starts outlive it (detached, pid files under
//! `run/`); each run finds them again there. docs/local-fleet.md.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use envgate_fleet::ldap::Directory;
use envgate_fleet::{Bases, HOST, Launcher, Ports, Spec, admin::Admin, docker, keys, proxy_name};

/// Most proxies `up` and `scale` run.
const MAX_PROXIES: usize = 50;
/// What `up` exits with when `--if-up` finds the fleet not (fully) running.
const NOT_UP: u8 = 3;

/// A whole envgate fleet on this machine: etcd, control planes, proxies, HAProxy.
#[derive(Debug, Parser)]
#[command(name = "envgate-fleet", version)]
struct Cli {
    #[command(flatten)]
    layout: Layout,
    #[command(subcommand)]
    command: Action,
}

/// Where the fleet lives and what it is made of (`deploy/local/fleet` passes them all).
#[derive(Debug, clap::Args)]
struct Layout {
    /// State: keys, certificates, etcd data, logs/, run/ (pid files), haproxy.cfg.
    #[arg(long)]
    dir: PathBuf,
    /// Where envgate-controlplane and envgate-proxy are.
    #[arg(long)]
    bin_dir: PathBuf,
    #[arg(long, default_value = "fleet")]
    instance: String,
    #[arg(long, default_value_t = 3)]
    etcd_members: usize,
    #[arg(long, default_value_t = 2)]
    controlplanes: usize,
    /// Member I: client port BASE+2I, peer port BASE+2I+1.
    #[arg(long, default_value_t = 2379)]
    etcd_port: u16,
    /// Replica R: gRPC on BASE+R.
    #[arg(long, default_value_t = 50051)]
    controlplane_port: u16,
    /// Replica R: ops (/readyz, /metrics) on BASE+R.
    #[arg(long, default_value_t = 9090)]
    controlplane_ops_port: u16,
    /// Proxy N: SSH on BASE+N.
    #[arg(long, default_value_t = 2200)]
    proxy_port: u16,
    /// Proxy N: ops on BASE+N.
    #[arg(long, default_value_t = 9100)]
    proxy_ops_port: u16,
    /// Proxy N: the pinned environment's listener on BASE+N.
    #[arg(long, default_value_t = 2400)]
    proxy_pinned_port: u16,
    #[arg(long, default_value_t = 2222)]
    haproxy_port: u16,
    #[arg(long, default_value_t = 2223)]
    haproxy_pinned_port: u16,
    /// The environment of HAProxy's second port.
    #[arg(long, default_value = "debian")]
    pinned: String,
    /// The static agent containers run (none: sessions start through Docker exec).
    #[arg(long)]
    agent: Option<PathBuf>,
    /// The catalogue the control planes seed (--environments).
    #[arg(long)]
    environments: Option<PathBuf>,
    #[arg(long, default_value_t = 30)]
    shutdown_grace_seconds: u64,
    /// How long each part gets to become healthy.
    #[arg(long, default_value_t = 60)]
    wait_seconds: u64,
    /// `up --ldap`: slapd's port.
    #[arg(long, default_value_t = 3389)]
    ldap_port: u16,
    /// `up --ldap`: what the directory is seeded from.
    #[arg(long, default_value = "deploy/local/directory.ldif")]
    directory_ldif: PathBuf,
}

#[derive(Debug, Subcommand)]
enum Action {
    /// Start what is not running; with everything up, say so and change nothing.
    Up {
        /// Proxies (default: as many as haproxy.cfg was last written for, else 2).
        #[arg(long)]
        proxies: Option<usize>,
        /// Also a seeded slapd, and the control planes check passwords there.
        #[arg(long)]
        ldap: bool,
        /// Only say whether the fleet is up: exit 0 (and print so) if it is, 3 if not.
        #[arg(long)]
        if_up: bool,
    },
    /// Stop everything, remove the fleet's containers (keys and home volumes are kept).
    Down {
        /// Also remove the fleet's home volumes (the benchmarks start cold).
        #[arg(long)]
        volumes: bool,
    },
    /// Processes, proxies registered with the control plane, containers.
    Status,
    /// Run N proxies: start new ones or drain surplus ones; soft-reload HAProxy.
    Scale { proxies: usize },
    /// On a running fleet: kill or cut off each component in turn under a loop of logins and
    /// report what each fault cost (docs/reliability.md).
    Chaos {
        /// Only a proxy and the leading replica killed, 2 `ssh` and 2 loadtest clients: the CI
        /// subset.
        #[arg(long)]
        fast: bool,
        /// Write the table into this file's generated region (docs/reliability.md).
        #[arg(long)]
        doc: Option<PathBuf>,
        /// A line about the run (date, commit, machine) put above the table.
        #[arg(long, default_value = "")]
        meta: String,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let spec = spec(&cli.layout);
    let result = match cli.command {
        Action::Up {
            proxies,
            ldap,
            if_up,
        } => up(spec, &cli.layout, proxies, ldap, if_up).await,
        Action::Down { volumes } => down(spec, &cli.layout, volumes).await,
        Action::Status => status(spec, &cli.layout).await,
        Action::Scale { proxies } => scale(spec, proxies).await,
        Action::Chaos { fast, doc, meta } => chaos(spec, fast, doc, &meta).await,
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("fleet: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn spec(layout: &Layout) -> Spec {
    let mut spec = Spec::new(&layout.instance, layout.dir.clone(), layout.bin_dir.clone());
    spec.logs = layout.dir.join("logs");
    spec.run = layout.dir.join("run");
    spec.audit_log = spec.logs.join("audit.jsonl");
    spec.etcd_members = layout.etcd_members;
    spec.controlplanes = layout.controlplanes;
    spec.ports = Ports::Fixed(Bases {
        etcd: layout.etcd_port,
        controlplane_grpc: layout.controlplane_port,
        controlplane_ops: layout.controlplane_ops_port,
        proxy_ssh: layout.proxy_port,
        proxy_ops: layout.proxy_ops_port,
        proxy_pinned: layout.proxy_pinned_port,
        haproxy: layout.haproxy_port,
        haproxy_pinned: layout.haproxy_pinned_port,
    });
    spec.proxy_id_prefix = format!("{}-proxy-", layout.instance);
    spec.agent = layout.agent.clone();
    spec.environments = layout.environments.clone();
    spec.pinned = vec![layout.pinned.clone()];
    spec.shutdown_grace = Duration::from_secs(layout.shutdown_grace_seconds);
    spec.wait = Duration::from_secs(layout.wait_seconds);
    spec.detach = true;
    // envgate's SSH user CA (docs/identity.md, "SSH certificates"): on by default here.
    spec.controlplane_args = vec!["--user-ca-key".into(), user_ca(&spec).display().to_string()];
    spec
}

fn user_ca(spec: &Spec) -> PathBuf {
    spec.pki_dir().join("user-ca")
}

fn demo_key(spec: &Spec) -> PathBuf {
    spec.dir.join("demo_ed25519")
}

/// The proxies haproxy.cfg was last written for (0: never written).
fn configured_proxies(launcher: &Launcher) -> usize {
    std::fs::read_to_string(launcher.haproxy_cfg())
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with("    server proxy-"))
        .count()
}

fn check_count(proxies: usize) -> anyhow::Result<()> {
    anyhow::ensure!(
        (1..=MAX_PROXIES).contains(&proxies),
        "the number of proxies must be 1..{MAX_PROXIES}, not {proxies}"
    );
    Ok(())
}

/// Everything of a fleet of `proxies` proxies runs.
fn fully_up(launcher: &mut Launcher, directory: &Directory, proxies: usize) -> bool {
    let mut names: Vec<String> = launcher
        .names()
        .into_iter()
        .filter(|n| !n.starts_with("proxy-") && n != "slapd")
        .collect();
    names.extend((1..=proxies).map(proxy_name));
    if directory.enabled() {
        names.push("slapd".into());
    }
    names.iter().all(|name| launcher.alive(name))
}

async fn up(
    spec: Spec,
    layout: &Layout,
    proxies: Option<usize>,
    ldap: bool,
    if_up: bool,
) -> anyhow::Result<u8> {
    if let Some(proxies) = proxies {
        check_count(proxies)?;
    }
    let mut spec = spec;
    let directory = Directory::of(&spec, layout.ldap_port);
    let wants_ldap = ldap || directory.enabled();
    if wants_ldap {
        spec.controlplane_args.extend(directory.controlplane_args());
    }
    let mut launcher = Launcher::adopt(spec)?;
    // The fleet's size is what haproxy.cfg was last written for (up or scale), so a proxy
    // that crashed is started again rather than forgotten.
    let configured = configured_proxies(&launcher);
    if let Some(proxies) = proxies
        && configured > 0
        && proxies != configured
        && launcher.alive("haproxy")
    {
        anyhow::bail!(
            "fleet already runs with {configured} proxies; use 'deploy/local/fleet scale {proxies}'"
        );
    }
    let proxies = proxies.unwrap_or(if configured > 0 { configured } else { 2 });
    let ldap_turned_on = ldap && !directory.enabled();
    if !ldap_turned_on && fully_up(&mut launcher, &directory, proxies) {
        let spec = launcher.spec();
        eprintln!(
            "fleet: fleet already up (etcd x{}, control plane x{}, {proxies} proxies, HAProxy); nothing changed",
            spec.etcd_members, spec.controlplanes
        );
        print_access(&launcher, &directory);
        return Ok(0);
    }
    if if_up {
        return Ok(NOT_UP);
    }
    // --ldap on a fleet that runs without it: the control planes restart with the LDAP flags.
    if ldap_turned_on {
        directory.enable(true)?;
        for r in 0..launcher.spec().controlplanes {
            launcher
                .stop(
                    &envgate_fleet::controlplane_name(r),
                    Duration::from_secs(15),
                )
                .await;
        }
    }
    let spec = launcher.spec().clone();
    spec.ensure_keys()?;
    keys::ssh_keygen(&demo_key(&spec), "demo@envgate-fleet")?;
    keys::ssh_keygen(&user_ca(&spec), "envgate-fleet-user-ca")?;
    launcher.start_etcd().await?;
    if wants_ldap {
        directory.ensure_seeded(&layout.directory_ldif)?;
        launcher.start_slapd(&directory).await?;
    }
    launcher.start_controlplanes().await?;
    for n in 1..=proxies {
        launcher.spawn_proxy(n)?;
    }
    for n in 1..=proxies {
        launcher.wait_proxy(n).await?;
    }
    launcher.set_serving((1..=proxies).collect());
    launcher.write_haproxy_cfg()?;
    launcher.start_haproxy().await?;
    launcher.wait_haproxy_sees_all().await?;
    create_demo_user(&launcher).await?;
    print_access(&launcher, &directory);
    Ok(0)
}

/// The user demo (key `demo_ed25519`), default environment busybox; the environments come
/// from the catalogue file the control planes seed.
async fn create_demo_user(launcher: &Launcher) -> anyhow::Result<()> {
    let spec = launcher.spec();
    eprintln!("fleet: creating user demo");
    let key = std::fs::read_to_string(demo_key(spec).with_extension("pub"))?;
    let mut admin = Admin::connect(spec, &launcher.controlplane_grpc()[0]).await?;
    admin.put_user("demo", &key, "busybox").await?;
    Ok(())
}

/// `path` relative to the current directory when it is under it.
fn shown(path: &Path) -> String {
    std::env::current_dir()
        .ok()
        .and_then(|cwd| path.strip_prefix(cwd).ok().map(Path::to_path_buf))
        .unwrap_or_else(|| path.to_path_buf())
        .display()
        .to_string()
}

fn print_access(launcher: &Launcher, directory: &Directory) {
    let spec = launcher.spec();
    let port = launcher.haproxy_port();
    let pinned_port = launcher.haproxy_pinned_port(0);
    let pinned = &spec.pinned[0];
    let key = shown(&demo_key(spec));
    let grpc = &launcher.controlplane_grpc()[0];
    println!(
        "\nenvgate fleet is up.\n  \
         ssh:   ssh -i {key} -p {port} demo@{HOST}\n         \
         (demo+debian@{HOST} for the Debian environment)\n         \
         ssh -i {key} -p {pinned_port} demo@{HOST} lands in {pinned} (a port pinned to it)\n  \
         cert:  ssh -i {key} -p {port} demo+envgate@{HOST} cert < KEY.pub > KEY-cert.pub\n         \
         (an OpenSSH certificate for that key, valid 16 h; \"demo+envgate@{HOST} ca\" prints the CA key)\n  \
         admin: grpcurl -cacert {ca} -H \"authorization: Bearer $(cat {token})\" \\\n           \
         {grpc} envgate.admin.v1.Admin/ListUsers\n         \
         (every replica answers: {replicas})\n  \
         audit: {audit}\n  \
         stop:  deploy/local/fleet down",
        ca = shown(&spec.fleet_ca()),
        token = shown(&spec.admin_token_file()),
        replicas = launcher.controlplane_grpc().join(", "),
        audit = shown(&spec.audit_log),
    );
    if directory.enabled() {
        let url = directory.url();
        println!(
            "  ldap:  slapd on {url} (deploy/local/directory.ldif); log in with a password:\n         \
             ssh -p {port} ada@{HOST}      (password ada-password; group students)\n         \
             ssh -p {port} grace@{HOST}    (password grace-password; students, staff)\n         \
             linus (linus-password) is disabled in the directory and refused\n         \
             change it: ldapmodify -x -H {url} -D cn=admin,{suffix} -w admin-password",
            suffix = envgate_fleet::ldap::SUFFIX
        );
    }
}

async fn down(spec: Spec, layout: &Layout, volumes: bool) -> anyhow::Result<u8> {
    let directory = Directory::of(&spec, layout.ldap_port);
    let mut launcher = Launcher::adopt(spec)?;
    launcher.stop_all().await;
    directory.enable(false)?;
    let spec = launcher.spec();
    if docker::reachable() {
        let removed = docker::remove_containers(&spec.instance);
        if removed > 0 {
            eprintln!("fleet: removed {removed} fleet container(s)");
        }
        // Their agent directories (socket, secret) and home slots go with them.
        let _ = std::fs::remove_dir_all(spec.dir.join("agents"));
        docker::release_slots(&docker::slots_root(), &spec.instance);
        if volumes {
            docker::remove_volumes(&spec.instance);
        }
    }
    if volumes {
        eprintln!("fleet: fleet is down (containers and home volumes removed)");
    } else {
        eprintln!("fleet: fleet is down (keys and home volumes kept)");
    }
    Ok(0)
}

async fn status(spec: Spec, layout: &Layout) -> anyhow::Result<u8> {
    let directory = Directory::of(&spec, layout.ldap_port);
    let mut launcher = Launcher::adopt(spec)?;
    println!("processes:");
    for name in launcher.names() {
        if name == "slapd" && !directory.enabled() {
            continue;
        }
        let state = if launcher.alive(&name) {
            let pid = launcher.process(&name).map(|p| p.pid()).unwrap_or_default();
            format!("running (pid {pid})")
        } else {
            "not running".to_owned()
        };
        println!("  {name:<16} {state}");
    }
    println!("proxies registered with the control plane:");
    let mut answered = false;
    for grpc in launcher.controlplane_grpc() {
        let Ok(mut admin) = Admin::connect(launcher.spec(), &grpc).await else {
            continue;
        };
        if let Ok(proxies) = admin.list_proxies().await {
            for p in proxies {
                println!(
                    "  {:<20} {:<16} sessions {:>4}  connections {:>4}{}",
                    p.id,
                    p.address,
                    p.sessions,
                    p.connections,
                    if p.draining { "  draining" } else { "" }
                );
            }
            answered = true;
            break;
        }
    }
    if !answered {
        println!("  (no control plane answers)");
    }
    let instance = &launcher.spec().instance;
    println!("containers (label envgate.instance={instance}):");
    if docker::reachable() {
        for line in docker::containers(instance) {
            println!("  {line}");
        }
    } else {
        println!("  (Docker not reachable)");
    }
    Ok(0)
}

async fn scale(spec: Spec, want: usize) -> anyhow::Result<u8> {
    check_count(want)?;
    let mut launcher = Launcher::adopt(spec)?;
    let any_controlplane = (0..launcher.spec().controlplanes)
        .any(|r| launcher.alive(&envgate_fleet::controlplane_name(r)));
    anyhow::ensure!(
        any_controlplane && launcher.alive("haproxy"),
        "fleet is not up; run 'deploy/local/fleet up' first"
    );
    for n in 1..=want {
        launcher.spawn_proxy(n)?;
    }
    for n in 1..=want {
        launcher.wait_proxy(n).await?;
    }
    // Take surplus proxies out of HAProxy before draining them, so no new session lands there.
    launcher.set_serving((1..=want).collect());
    launcher.reload_haproxy().await?;
    let surplus: Vec<usize> = launcher
        .proxies()
        .into_iter()
        .filter(|n| *n > want)
        .collect();
    let grace = launcher.spec().shutdown_grace;
    for n in &surplus {
        eprintln!(
            "fleet: draining proxy-{n} (SIGTERM; sessions get {}s)",
            grace.as_secs()
        );
        launcher.signal(&proxy_name(*n), libc::SIGTERM);
    }
    for n in &surplus {
        launcher
            .stop(&proxy_name(*n), grace + Duration::from_secs(5))
            .await;
    }
    launcher.wait_haproxy_sees_all().await?;
    eprintln!("fleet: fleet runs {want} proxies");
    Ok(0)
}

const CHAOS_BEGIN: &str = "<!-- fleet chaos: generated from here -->";
const CHAOS_END: &str = "<!-- fleet chaos: generated up to here -->";

async fn chaos(spec: Spec, fast: bool, doc: Option<PathBuf>, meta: &str) -> anyhow::Result<u8> {
    use envgate_fleet::chaos::{self, Fault, Plan};
    let mut launcher = Launcher::adopt(spec)?;
    let proxies: Vec<usize> = launcher.proxies();
    anyhow::ensure!(
        !proxies.is_empty() && launcher.alive("haproxy"),
        "the chaos fleet is not up"
    );
    launcher.set_serving(proxies);
    let plan = if fast {
        Plan {
            faults: Fault::FAST.to_vec(),
            clients: 2,
            before: Duration::from_secs(2),
            after: Duration::from_secs(10),
            down_for: Duration::from_secs(3),
        }
    } else {
        Plan {
            faults: Fault::ALL.to_vec(),
            clients: 3,
            before: Duration::from_secs(3),
            after: Duration::from_secs(20),
            down_for: Duration::from_secs(5),
        }
    };
    let keys = launcher.spec().dir.join("chaos-keys");
    chaos::prepare(&launcher, plan.clients, &keys).await?;
    let outcomes = chaos::run(&mut launcher, &plan, &keys).await?;
    let table = chaos::table(&outcomes);
    println!("{table}");
    if let Some(doc) = doc {
        let text = format!(
            "- {meta}\n- {} `ssh` clients and {} loadtest clients (russh), each a user of its own \
             looping `USER date` through HAProxy; \
             the fault {} s into the loop, the part down (or cut off) for {} s, then started \
             again; the loop goes on to {} s after the fault. HA shape: 3 etcd members, 2 \
             control-plane replicas, {} proxies.\n\n{table}",
            plan.clients,
            plan.clients,
            plan.before.as_secs(),
            plan.down_for.as_secs(),
            plan.after.as_secs(),
            launcher.proxies().len(),
        );
        chaos::write_region(&doc, CHAOS_BEGIN, CHAOS_END, &text)?;
    }
    let damaged: Vec<String> = outcomes
        .iter()
        .flat_map(|o| o.lost.iter().chain(&o.duplicated).cloned())
        .collect();
    anyhow::ensure!(damaged.is_empty(), "lost or duplicated: {damaged:?}");
    if fast {
        for o in &outcomes {
            anyhow::ensure!(
                o.failed <= 2 * plan.clients,
                "{}: {} logins failed, more than the {} in flight",
                o.fault.describe(),
                o.failed,
                2 * plan.clients
            );
        }
    }
    Ok(0)
}
