//! `fleet chaos`: each component killed (SIGKILL) or cut off the network in turn, under a
//! bounded loop of logins through HAProxy by real `ssh` clients and as many loadtest clients
//! (`envgate-loadtest`'s russh client, one user each as well); for each fault the failed logins, their
//! distinct error lines, the time until logins succeed again, and whether a container or home
//! volume was lost or duplicated (Docker and etcd compared before and after).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use envgate_loadtest::client::{Job, russh as loadtest};

use crate::{Error, Launcher, controlplane_name, docker, etcd_name, probe, proxy_name};

/// How long one `ssh` may take.
const SSH_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a client waits after a failed login before the next.
const RETRY_PAUSE: Duration = Duration::from_millis(200);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    KillProxy,
    KillReplica,
    KillLeader,
    KillEtcdMember,
    KillHaproxy,
    CutReplica,
    CutEtcdMember,
}

impl Fault {
    pub const ALL: [Fault; 7] = [
        Fault::KillProxy,
        Fault::KillReplica,
        Fault::KillLeader,
        Fault::KillEtcdMember,
        Fault::KillHaproxy,
        Fault::CutReplica,
        Fault::CutEtcdMember,
    ];
    /// What CI runs.
    pub const FAST: [Fault; 2] = [Fault::KillProxy, Fault::KillLeader];

    pub fn describe(self) -> &'static str {
        match self {
            Fault::KillProxy => "`kill -9` a proxy (started again after the pause)",
            Fault::KillReplica => "`kill -9` the replica that does not lead",
            Fault::KillLeader => "`kill -9` the leading replica",
            Fault::KillEtcdMember => "`kill -9` the etcd leader (one member of three)",
            Fault::KillHaproxy => "`kill -9` HAProxy, started again after the pause",
            Fault::CutReplica => "network cut: every packet to the leading replica's ports dropped",
            Fault::CutEtcdMember => {
                "network cut: every packet to or from the etcd leader's client and peer ports dropped"
            }
        }
    }
}

/// How a run goes.
pub struct Plan {
    pub faults: Vec<Fault>,
    /// Clients looping logins, each as a user of its own: this many `ssh` clients and as many
    /// loadtest clients.
    pub clients: usize,
    /// Logins before the fault, and how long the loop goes on after it.
    pub before: Duration,
    pub after: Duration,
    /// How long a killed part stays down, or a cut lasts.
    pub down_for: Duration,
}

/// What one fault cost.
pub struct Outcome {
    pub fault: Fault,
    pub logins: usize,
    pub failed: usize,
    /// Of those, by the loadtest's clients (the rest by `ssh`).
    pub loadtest_logins: usize,
    pub loadtest_failed: usize,
    pub lines: Vec<String>,
    /// From the fault to the end of the last failed login (`None`: nothing failed).
    pub recovery: Option<Duration>,
    pub lost: Vec<String>,
    pub duplicated: Vec<String>,
}

struct Login {
    ended: Instant,
    ok: bool,
    stderr: String,
    by_loadtest: bool,
}

/// What the fleet holds that a fault must not lose or double: containers (user+environment),
/// home volumes, and the placement records in etcd.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Holdings {
    containers: Vec<String>,
    volumes: Vec<String>,
    records: Vec<String>,
}

async fn holdings(launcher: &Launcher) -> Holdings {
    let instance = &launcher.spec().instance;
    // Users' containers: a warm pool's (no user yet) come and go by design.
    let containers = docker::containers(instance)
        .into_iter()
        .filter_map(|line| line.split(' ').nth(1).map(str::to_owned))
        .filter(|owner| !owner.starts_with('+'))
        .collect();
    let mut records = Vec::new();
    if let Ok(tls) = launcher.etcd_tls() {
        let read = async {
            let mut client = probe::etcd_client(&launcher.etcd_endpoints(), &tls).await?;
            let prefix = format!("{}containers/", crate::ETCD_PREFIX);
            client
                .get(
                    prefix.clone(),
                    Some(
                        etcd_client::GetOptions::new()
                            .with_prefix()
                            .with_keys_only(),
                    ),
                )
                .await
        };
        if let Ok(Ok(response)) = tokio::time::timeout(Duration::from_secs(10), read).await {
            records = response
                .kvs()
                .iter()
                .map(|kv| String::from_utf8_lossy(kv.key()).into_owned())
                .collect();
        }
    }
    records.sort();
    Holdings {
        containers,
        volumes: docker::volumes(instance),
        records,
    }
}

/// Users `chaos-1`… (one per `ssh` client and one per loadtest client) with keys in `dir`,
/// each with its container started, so every fault meets running containers.
pub async fn prepare(launcher: &Launcher, clients: usize, dir: &Path) -> Result<(), Error> {
    std::fs::create_dir_all(dir).map_err(Error::io(format!("mkdir {}", dir.display())))?;
    let mut admin =
        crate::admin::Admin::connect(launcher.spec(), &launcher.controlplane_grpc()[0]).await?;
    for c in 1..=2 * clients {
        let user = format!("chaos-{c}");
        let key = dir.join(&user);
        crate::keys::ssh_keygen(&key, &user)?;
        let public = std::fs::read_to_string(key.with_extension("pub"))
            .map_err(Error::io(format!("read {}.pub", key.display())))?;
        admin.put_user(&user, &public, "busybox").await?;
        let (ok, stderr) = ssh(launcher.haproxy_port(), &user, &key).await;
        if !ok {
            return Err(Error::Failed(format!(
                "{user}'s first login failed: {stderr}"
            )));
        }
    }
    Ok(())
}

/// One `ssh USER date` through HAProxy: whether it printed the date, and its stderr.
async fn ssh(port: u16, user: &str, key: &Path) -> (bool, String) {
    let mut command = tokio::process::Command::new("ssh");
    command
        .args(["-F", "/dev/null", "-p", &port.to_string()])
        .args([
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
        ])
        .args([
            "-o",
            "LogLevel=ERROR",
            "-o",
            "BatchMode=yes",
            "-o",
            "IdentitiesOnly=yes",
        ])
        .args(["-o", "IdentityAgent=none", "-o", "ConnectTimeout=10", "-i"])
        .arg(key)
        .args(["-l", user, "127.0.0.1", "date"])
        .stdin(Stdio::null())
        .kill_on_drop(true);
    match tokio::time::timeout(SSH_TIMEOUT, command.output()).await {
        Ok(Ok(out)) => (
            out.status.success() && !out.stdout.is_empty(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ),
        Ok(Err(e)) => (false, format!("ssh did not run: {e}")),
        Err(_) => (false, format!("ssh did not finish within {SSH_TIMEOUT:?}")),
    }
}

/// One login by the loadtest's russh client (`date`, as the `ssh` clients run): whether it
/// succeeded, and the failure as the loadtest reports it (the server's stderr line included).
async fn loadtest_login(port: u16, user: &str, key: &Path) -> (bool, String) {
    let config = match loadtest::config(Some(envgate_loadtest::client::DEFAULT_KEX)) {
        Ok(config) => config,
        Err(e) => return (false, format!("the loadtest client cannot start: {e}")),
    };
    let credential = match envgate_loadtest::users::credential(user, key) {
        Ok(credential) => credential,
        Err(e) => {
            return (
                false,
                format!("the loadtest client cannot read {user}'s key: {e}"),
            );
        }
    };
    let job = Job {
        addr: format!("127.0.0.1:{port}"),
        credential,
        command: "date".into(),
        timeout: SSH_TIMEOUT,
        kex: Some(envgate_loadtest::client::DEFAULT_KEX.into()),
    };
    let outcome = loadtest::run(&job, config).await;
    match (outcome.failure, outcome.exit_status) {
        (Some(f), _) => (false, f.detail),
        (None, Some(0)) => (outcome.output_bytes > 0, String::new()),
        (None, status) => (false, format!("exit status {status:?}")),
    }
}

/// The replica that says it leads (`envgate_reconcile_leader 1`).
async fn leading_replica(launcher: &Launcher) -> Option<usize> {
    for (r, ops) in launcher.controlplane_ops().iter().enumerate() {
        if let Some((200, body)) = probe::http_get(ops, "/metrics").await
            && body
                .lines()
                .any(|l| l.starts_with("envgate_reconcile_leader") && l.trim_end().ends_with(" 1"))
        {
            return Some(r);
        }
    }
    None
}

/// iptables rules dropping every packet to or from `ports` on loopback, removed on drop.
struct Cut {
    rules: Vec<Vec<String>>,
}

impl Cut {
    fn new(ports: &[u16]) -> Result<Cut, Error> {
        let mut cut = Cut { rules: Vec::new() };
        for port in ports {
            for direction in ["--dport", "--sport"] {
                let rule: Vec<String> = ["INPUT", "-i", "lo", "-p", "tcp", direction]
                    .iter()
                    .map(|s| s.to_string())
                    .chain([port.to_string(), "-j".into(), "DROP".into()])
                    .collect();
                iptables("-I", &rule)?;
                cut.rules.push(rule);
            }
        }
        Ok(cut)
    }
}

impl Drop for Cut {
    fn drop(&mut self) {
        for rule in &self.rules {
            if let Err(e) = iptables("-D", rule) {
                eprintln!("fleet chaos: could not remove an iptables rule: {e}");
            }
        }
    }
}

fn iptables(action: &str, rule: &[String]) -> Result<(), Error> {
    let output = Command::new("iptables")
        .arg(action)
        .args(rule)
        .output()
        .map_err(Error::io("run iptables"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(Error::Failed(format!(
            "iptables {action} {}: {}",
            rule.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        )))
    }
}

/// Strikes `fault`; returns what undoes it (a network cut) and which process to start again.
async fn strike(
    launcher: &mut Launcher,
    fault: Fault,
) -> Result<(Option<Cut>, Option<String>), Error> {
    let leader = leading_replica(launcher).await.unwrap_or(0);
    let etcd_leader = launcher.etcd_leader().await.unwrap_or(0);
    let port = |addr: &String| {
        addr.rsplit_once(':')
            .and_then(|(_, p)| p.parse::<u16>().ok())
            .unwrap_or_default()
    };
    let killed = |name: String, launcher: &mut Launcher| {
        eprintln!("fleet chaos: SIGKILL {name}");
        launcher.kill(&name);
        Ok((None, Some(name)))
    };
    match fault {
        Fault::KillProxy => killed(proxy_name(launcher.proxies()[0]), launcher),
        Fault::KillReplica => killed(controlplane_name(1 - leader.min(1)), launcher),
        Fault::KillLeader => killed(controlplane_name(leader), launcher),
        Fault::KillEtcdMember => killed(etcd_name(etcd_leader), launcher),
        Fault::KillHaproxy => killed("haproxy".to_owned(), launcher),
        Fault::CutReplica => {
            let ports = [
                port(&launcher.controlplane_grpc()[leader]),
                port(&launcher.controlplane_ops()[leader]),
            ];
            eprintln!(
                "fleet chaos: cutting {} off ({ports:?})",
                controlplane_name(leader)
            );
            Ok((Some(Cut::new(&ports)?), None))
        }
        Fault::CutEtcdMember => {
            let client = port(&launcher.etcd_endpoints()[etcd_leader]);
            let ports = [client, launcher.etcd_peer_port(etcd_leader)];
            eprintln!(
                "fleet chaos: cutting {} off ({ports:?})",
                etcd_name(etcd_leader)
            );
            Ok((Some(Cut::new(&ports)?), None))
        }
    }
}

/// Starts `name` again, as `fleet up` would.
async fn restart(launcher: &mut Launcher, name: &str) -> Result<(), Error> {
    eprintln!("fleet chaos: starting {name} again");
    if name == "haproxy" {
        return launcher.start_haproxy().await;
    }
    if let Some(i) = name.strip_prefix("etcd-") {
        return launcher.start_etcd_member(i.parse().unwrap_or(0)).await;
    }
    if let Some(n) = name.strip_prefix("proxy-") {
        let n = n.parse().unwrap_or(0);
        launcher.spawn_proxy(n)?;
        return launcher.wait_proxy(n).await;
    }
    let r = name
        .strip_prefix("controlplane-")
        .and_then(|r| r.parse().ok())
        .unwrap_or(0);
    launcher.start_controlplane(r).await
}

/// Runs `plan` on the fleet of `launcher` (users made by `prepare`, keys in `keys`).
pub async fn run(launcher: &mut Launcher, plan: &Plan, keys: &Path) -> Result<Vec<Outcome>, Error> {
    let mut outcomes = Vec::new();
    for &fault in &plan.faults {
        let before = holdings(launcher).await;
        let port = launcher.haproxy_port();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        // Users 1..=clients log in with `ssh`, the next as many with the loadtest's client.
        let clients: Vec<_> = (1..=2 * plan.clients)
            .map(|c| {
                let user = format!("chaos-{c}");
                let key: PathBuf = keys.join(&user);
                let stop = stop.clone();
                let by_loadtest = c > plan.clients;
                tokio::spawn(async move {
                    let mut logins = Vec::new();
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) && logins.len() < 500 {
                        let (ok, stderr) = if by_loadtest {
                            loadtest_login(port, &user, &key).await
                        } else {
                            ssh(port, &user, &key).await
                        };
                        logins.push(Login {
                            ended: Instant::now(),
                            ok,
                            stderr,
                            by_loadtest,
                        });
                        // A user whose login failed tries again a moment later, not at once
                        // (a refused connection fails in milliseconds).
                        if !ok {
                            tokio::time::sleep(RETRY_PAUSE).await;
                        }
                    }
                    logins
                })
            })
            .collect();
        tokio::time::sleep(plan.before).await;
        let at = Instant::now();
        let (cut, killed) = strike(launcher, fault).await?;
        tokio::time::sleep(plan.down_for).await;
        drop(cut);
        if let Some(name) = &killed {
            restart(launcher, name).await?;
        }
        let rest = plan.after.saturating_sub(at.elapsed());
        tokio::time::sleep(rest).await;
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let mut logins = Vec::new();
        for client in clients {
            logins.extend(client.await.unwrap_or_default());
        }
        // Let the fleet settle (a restarted part re-registers) before comparing.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let after = holdings(launcher).await;
        outcomes.push(outcome(fault, at, &logins, &before, &after));
        let last = outcomes.last().expect("pushed");
        eprintln!(
            "fleet chaos: {}: {} of {} logins failed, recovered in {}",
            fault.describe(),
            last.failed,
            last.logins,
            last.recovery
                .map(|d| format!("{:.1} s", d.as_secs_f64()))
                .unwrap_or_else(|| "-".into())
        );
    }
    Ok(outcomes)
}

fn outcome(
    fault: Fault,
    at: Instant,
    logins: &[Login],
    before: &Holdings,
    after: &Holdings,
) -> Outcome {
    let failed: Vec<&Login> = logins.iter().filter(|l| !l.ok).collect();
    let mut lines: Vec<String> = failed
        .iter()
        .flat_map(|l| l.stderr.lines())
        .filter(|l| !l.trim().is_empty())
        // One line per kind: the request id differs on every line.
        .map(|l| match l.split_once(" (request id ") {
            Some((text, _)) => format!("{text} (request id …)"),
            None => l.to_owned(),
        })
        .collect();
    lines.sort();
    lines.dedup();
    let recovery = failed
        .iter()
        .map(|l| l.ended.saturating_duration_since(at))
        .max();
    let mut lost = Vec::new();
    let mut duplicated = Vec::new();
    for (what, before, after) in [
        ("container", &before.containers, &after.containers),
        ("volume", &before.volumes, &after.volumes),
        ("record", &before.records, &after.records),
    ] {
        let count = |list: &Vec<String>| {
            let mut counts: BTreeMap<String, usize> = BTreeMap::new();
            for item in list {
                *counts.entry(item.clone()).or_default() += 1;
            }
            counts
        };
        let (was, is) = (count(before), count(after));
        for (item, n) in &was {
            if !is.contains_key(item) {
                lost.push(format!("{what} {item}"));
            } else if is[item] > *n {
                duplicated.push(format!("{what} {item}"));
            }
        }
        for (item, n) in &is {
            if *n > 1 && !was.contains_key(item) {
                duplicated.push(format!("{what} {item}"));
            }
        }
    }
    Outcome {
        fault,
        logins: logins.len(),
        failed: failed.len(),
        loadtest_logins: logins.iter().filter(|l| l.by_loadtest).count(),
        loadtest_failed: failed.iter().filter(|l| l.by_loadtest).count(),
        lines,
        recovery,
        lost,
        duplicated,
    }
}

/// The results as a Markdown table.
pub fn table(outcomes: &[Outcome]) -> String {
    let mut out = String::from(
        "| fault | logins failed | error lines users saw | logins fail until | containers, volumes, records lost / duplicated |\n|---|---|---|---|---|\n",
    );
    for o in outcomes {
        let lines = if o.lines.is_empty() {
            "—".to_owned()
        } else {
            o.lines
                .iter()
                .map(|l| format!("`{}`", l.replace('|', "\\|")))
                .collect::<Vec<_>>()
                .join("<br>")
        };
        let recovery = o
            .recovery
            .map(|d| format!("{:.1} s after the fault", d.as_secs_f64()))
            .unwrap_or_else(|| "—".to_owned());
        let damage = if o.lost.is_empty() && o.duplicated.is_empty() {
            "none / none".to_owned()
        } else {
            format!("{:?} / {:?}", o.lost, o.duplicated)
        };
        out.push_str(&format!(
            "| {} | {} of {} (`ssh` {} of {}, loadtest {} of {}) | {lines} | {recovery} | {damage} |\n",
            o.fault.describe(),
            o.failed,
            o.logins,
            o.failed - o.loadtest_failed,
            o.logins - o.loadtest_logins,
            o.loadtest_failed,
            o.loadtest_logins,
        ));
    }
    out
}

/// Replaces the region between `begin` and `end` of `doc` with `text`.
pub fn write_region(doc: &Path, begin: &str, end: &str, text: &str) -> Result<(), Error> {
    let current =
        std::fs::read_to_string(doc).map_err(Error::io(format!("read {}", doc.display())))?;
    let (Some(from), Some(to)) = (current.find(begin), current.find(end)) else {
        return Err(Error::Failed(format!(
            "{} has no region {begin} … {end}",
            doc.display()
        )));
    };
    let updated = format!("{}{begin}\n{text}{}", &current[..from], &current[to..]);
    std::fs::write(doc, updated).map_err(Error::io(format!("write {}", doc.display())))
}
