//! Starting, stopping, killing and restarting each part of a fleet, and waiting for it.
//!
//! Process names (logs `NAME.log`, pid files `NAME.pid`): `etcd-I` for member I,
//! `controlplane` for replica 0 and `controlplane-R` for the others, `proxy-N`, `haproxy`,
//! `slapd`. Proxies are numbered by the caller (the tests from 0, `fleet up` from 1).

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use envgate_proto::tls::TlsFiles;

use crate::haproxy::{self, BACKEND, Route, Server};
use crate::probe;
use crate::process::{self, Process};
use crate::spec::HOST;
use crate::{Error, Spec};

/// The etcd prefix of every record the control planes write.
pub const ETCD_PREFIX: &str = "/envgate/";
/// How often a wait probes.
const POLL: Duration = Duration::from_millis(200);

struct Member {
    client_port: u16,
    peer_port: u16,
    process: Option<Process>,
}

struct Replica {
    grpc: String,
    ops: String,
    process: Option<Process>,
}

struct Proxy {
    listen: String,
    ops: String,
    /// One listener per pinned environment, in `Spec::pinned` order.
    pinned: Vec<String>,
    process: Option<Process>,
}

/// A fleet's processes. Field order is drop order: HAProxy and the proxies go before the
/// control planes, and those before etcd.
pub struct Launcher {
    haproxy: Option<Process>,
    /// HAProxy processes replaced by a soft reload, finishing their connections.
    old_haproxies: Vec<Process>,
    proxies: BTreeMap<usize, Proxy>,
    controlplanes: Vec<Replica>,
    slapd: Option<Process>,
    etcd: Vec<Member>,
    /// HAProxy's SSH port and its port for each pinned environment.
    haproxy_port: u16,
    haproxy_pinned: Vec<u16>,
    /// The proxies HAProxy sends connections to.
    serving: Vec<usize>,
    spec: Spec,
}

impl Launcher {
    /// A fleet of `spec` with nothing running yet; the ports of etcd, the control planes and
    /// HAProxy are settled now (the proxies' when each is first started).
    pub fn new(spec: Spec) -> Result<Launcher, Error> {
        if spec.etcd_members == 0 || spec.controlplanes == 0 {
            return Err(Error::Failed(
                "a fleet needs at least one etcd member and one control-plane replica".into(),
            ));
        }
        let etcd = (0..spec.etcd_members)
            .map(|i| {
                let (client_port, peer_port) = spec.ports.etcd(i)?;
                Ok(Member {
                    client_port,
                    peer_port,
                    process: None,
                })
            })
            .collect::<Result<_, Error>>()?;
        let controlplanes = (0..spec.controlplanes)
            .map(|r| {
                let (grpc, ops) = spec.ports.controlplane(r)?;
                Ok(Replica {
                    grpc: format!("{HOST}:{grpc}"),
                    ops: format!("{HOST}:{ops}"),
                    process: None,
                })
            })
            .collect::<Result<_, Error>>()?;
        let (haproxy_port, haproxy_pinned) = spec.ports.haproxy(spec.pinned.len())?;
        Ok(Launcher {
            haproxy: None,
            old_haproxies: Vec::new(),
            proxies: BTreeMap::new(),
            controlplanes,
            slapd: None,
            etcd,
            haproxy_port,
            haproxy_pinned,
            serving: Vec::new(),
            spec,
        })
    }

    /// The fleet of `spec` (fixed ports) as an earlier run left it: every process whose pid
    /// file names a live one, and every proxy with a pid file (running or not).
    pub fn adopt(spec: Spec) -> Result<Launcher, Error> {
        let mut launcher = Launcher::new(spec)?;
        for i in 0..launcher.etcd.len() {
            launcher.etcd[i].process = launcher.find(&etcd_name(i), "etcd");
        }
        for r in 0..launcher.controlplanes.len() {
            launcher.controlplanes[r].process =
                launcher.find(&controlplane_name(r), "envgate-controlplane");
        }
        for n in launcher.known_proxies() {
            launcher.add_proxy(n)?;
            let process = launcher.find(&proxy_name(n), "envgate-proxy");
            launcher.proxy_mut(n)?.process = process;
        }
        launcher.haproxy = launcher.find("haproxy", "haproxy");
        launcher.slapd = launcher.find("slapd", "slapd");
        Ok(launcher)
    }

    fn find(&self, name: &str, program: &str) -> Option<Process> {
        Process::adopt(name, program, &self.log_path(name), &self.pid_file(name))
    }

    /// Proxies with a pid file in `run/`, ascending.
    fn known_proxies(&self) -> Vec<usize> {
        let mut found: Vec<usize> = std::fs::read_dir(&self.spec.run)
            .into_iter()
            .flatten()
            .filter_map(|e| {
                let name = e.ok()?.file_name().into_string().ok()?;
                name.strip_prefix("proxy-")?
                    .strip_suffix(".pid")?
                    .parse()
                    .ok()
            })
            .collect();
        found.sort_unstable();
        found
    }

    pub fn spec(&self) -> &Spec {
        &self.spec
    }

    pub fn log_path(&self, name: &str) -> PathBuf {
        self.spec.logs.join(format!("{name}.log"))
    }

    pub fn pid_file(&self, name: &str) -> PathBuf {
        self.spec.run.join(format!("{name}.pid"))
    }

    pub fn haproxy_socket(&self) -> PathBuf {
        self.spec.run.join("haproxy.sock")
    }

    pub fn haproxy_cfg(&self) -> PathBuf {
        self.spec.dir.join("haproxy.cfg")
    }

    // ---- addresses ----------------------------------------------------------------------

    /// Every member's client URL (`https://127.0.0.1:port`), as `--etcd` takes them.
    pub fn etcd_endpoints(&self) -> Vec<String> {
        self.etcd
            .iter()
            .map(|m| format!("https://{HOST}:{}", m.client_port))
            .collect()
    }

    /// The member that leads the etcd cluster now, as the members themselves report it.
    pub async fn etcd_leader(&self) -> Option<usize> {
        let tls = self.etcd_tls().ok()?;
        for (i, endpoint) in self.etcd_endpoints().iter().enumerate() {
            let status = async {
                probe::etcd_client(std::slice::from_ref(endpoint), &tls)
                    .await?
                    .status()
                    .await
            };
            if let Ok(Ok(status)) = tokio::time::timeout(probe::PROBE_TIMEOUT, status).await
                && status
                    .header()
                    .is_some_and(|h| h.member_id() == status.leader())
            {
                return Some(i);
            }
        }
        None
    }

    pub fn etcd_peer_port(&self, member: usize) -> u16 {
        self.etcd[member].peer_port
    }

    /// The etcd CA and the control planes' client certificate.
    pub fn etcd_tls(&self) -> Result<TlsFiles, Error> {
        let (ca, cert, key) = self.spec.etcd_client_files();
        TlsFiles::load(&cert, &key, &ca).map_err(|e| Error::Failed(e.to_string()))
    }

    /// `127.0.0.1:port` of each replica's gRPC server.
    pub fn controlplane_grpc(&self) -> Vec<String> {
        self.controlplanes.iter().map(|r| r.grpc.clone()).collect()
    }

    /// `127.0.0.1:port` of each replica's ops endpoint.
    pub fn controlplane_ops(&self) -> Vec<String> {
        self.controlplanes.iter().map(|r| r.ops.clone()).collect()
    }

    /// Proxy `n`'s SSH listener, ops endpoint and pinned listeners.
    pub fn proxy_addresses(&self, n: usize) -> Option<(String, String, Vec<String>)> {
        let proxy = self.proxies.get(&n)?;
        Some((
            proxy.listen.clone(),
            proxy.ops.clone(),
            proxy.pinned.clone(),
        ))
    }

    pub fn proxy_id(&self, n: usize) -> String {
        format!("{}{n}", self.spec.proxy_id_prefix)
    }

    /// The proxies started so far (running or not), ascending.
    pub fn proxies(&self) -> Vec<usize> {
        self.proxies.keys().copied().collect()
    }

    pub fn haproxy_port(&self) -> u16 {
        self.haproxy_port
    }

    /// HAProxy's port for pinned environment `k` (`Spec::pinned` order).
    pub fn haproxy_pinned_port(&self, k: usize) -> u16 {
        self.haproxy_pinned[k]
    }

    /// Every process name of the fleet, in start order.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = (0..self.etcd.len()).map(etcd_name).collect();
        if self.slapd.is_some() {
            names.push("slapd".into());
        }
        names.extend((0..self.controlplanes.len()).map(controlplane_name));
        names.extend(self.proxies.keys().map(|n| proxy_name(*n)));
        names.push("haproxy".into());
        names
    }

    fn slot(&mut self, name: &str) -> Option<&mut Option<Process>> {
        if name == "haproxy" {
            return Some(&mut self.haproxy);
        }
        if name == "slapd" {
            return Some(&mut self.slapd);
        }
        if let Some(i) = name.strip_prefix("etcd-") {
            return Some(&mut self.etcd.get_mut(i.parse::<usize>().ok()?)?.process);
        }
        if let Some(n) = name.strip_prefix("proxy-") {
            return Some(&mut self.proxies.get_mut(&n.parse().ok()?)?.process);
        }
        let r = match name.strip_prefix("controlplane") {
            Some("") => 0,
            Some(r) => r.strip_prefix('-')?.parse().ok()?,
            None => return None,
        };
        Some(&mut self.controlplanes.get_mut(r)?.process)
    }

    /// The process called `name`, if started or found.
    pub fn process(&mut self, name: &str) -> Option<&mut Process> {
        self.slot(name)?.as_mut()
    }

    pub fn alive(&mut self, name: &str) -> bool {
        self.process(name).is_some_and(Process::alive)
    }

    /// SIGKILL, as a crash would.
    pub fn kill(&mut self, name: &str) {
        if let Some(process) = self.process(name) {
            process.kill();
        }
    }

    /// Sends `signal` to `name` (e.g. `libc::SIGTERM`: a proxy drains).
    pub fn signal(&mut self, name: &str, signal: i32) {
        if let Some(process) = self.process(name) {
            process.signal(signal);
        }
    }

    /// SIGTERM: a proxy drains, anything else shuts down.
    pub fn terminate(&mut self, name: &str) {
        self.signal(name, libc::SIGTERM);
    }

    /// SIGTERM, `grace` to exit, then SIGKILL.
    pub async fn stop(&mut self, name: &str, grace: Duration) {
        if let Some(slot) = self.slot(name)
            && let Some(mut process) = slot.take()
        {
            if process.alive() {
                eprintln!("fleet: stopping {name} (pid {})", process.pid());
            }
            process.stop(grace).await;
        }
    }

    /// SIGKILLs everything, HAProxy first and etcd last.
    pub fn kill_all(&mut self) {
        for name in self.names().into_iter().rev() {
            self.kill(&name);
        }
        for old in &mut self.old_haproxies {
            old.kill();
        }
    }

    /// Stops everything in order (`fleet down`): HAProxy (and HAProxy processes left over
    /// from reloads), the proxies (draining), the control planes, slapd, etcd.
    pub async fn stop_all(&mut self) {
        self.stop("haproxy", Duration::from_secs(10)).await;
        let cfg = self.haproxy_cfg().display().to_string();
        for pid in process::pids_with_argument("haproxy", &cfg) {
            eprintln!("fleet: stopping HAProxy left over from a reload (pid {pid})");
            // SAFETY: kill(2) of a pid just found running haproxy with this fleet's config.
            unsafe {
                libc::kill(pid as libc::pid_t, libc::SIGTERM);
            }
        }
        let grace = self.spec.shutdown_grace + Duration::from_secs(5);
        // All proxies drain at once, each within its grace.
        for n in self.proxies() {
            self.signal(&proxy_name(n), libc::SIGTERM);
        }
        for n in self.proxies() {
            self.stop(&proxy_name(n), grace).await;
            let _ = std::fs::remove_file(self.pid_file(&proxy_name(n)));
        }
        for r in 0..self.controlplanes.len() {
            self.stop(&controlplane_name(r), Duration::from_secs(15))
                .await;
        }
        self.stop("slapd", Duration::from_secs(10)).await;
        for i in 0..self.etcd.len() {
            self.stop(&etcd_name(i), Duration::from_secs(15)).await;
        }
    }

    // ---- waiting ------------------------------------------------------------------------

    /// Polls `probe` until it succeeds, for at most `Spec::wait`; fails early if `name` died.
    pub async fn wait_for<F, Fut>(
        &mut self,
        name: &str,
        what: &str,
        mut probe: F,
    ) -> Result<(), Error>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<(), String>>,
    {
        let deadline = Instant::now() + self.spec.wait;
        loop {
            let last = match probe().await {
                Ok(()) => return Ok(()),
                Err(e) => e,
            };
            if !self.alive(name) {
                return Err(Error::Exited {
                    name: name.to_owned(),
                    what: what.to_owned(),
                    log: self.log_tail(name),
                });
            }
            if Instant::now() > deadline {
                return Err(Error::NotReady {
                    what: what.to_owned(),
                    seconds: self.spec.wait.as_secs(),
                    last,
                    log: self.log_tail(name),
                });
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// The last lines of `name`'s log, headed with its path, for error messages.
    pub fn log_tail(&self, name: &str) -> String {
        let path = self.log_path(name);
        format!(
            "----- {name} ({}) -----\n{}",
            path.display(),
            process::log_tail(&path, 40)
        )
    }

    fn spawn(&mut self, name: &str, command: Command) -> Result<Process, Error> {
        Process::spawn(
            name,
            command,
            &self.log_path(name),
            &self.pid_file(name),
            self.spec.detach,
        )
    }

    // ---- etcd ---------------------------------------------------------------------------

    /// etcd member `i`: TLS to clients and peers, client certificates required both ways.
    fn etcd_command(&self, i: usize) -> Command {
        let pki = self.spec.pki_dir();
        let url = |port: u16| format!("https://{HOST}:{port}");
        let cluster: Vec<String> = self
            .etcd
            .iter()
            .enumerate()
            .map(|(j, m)| format!("{}={}", etcd_name(j), url(m.peer_port)))
            .collect();
        let member = &self.etcd[i];
        let mut command = Command::new(&self.spec.etcd_binary);
        command
            .arg("--name")
            .arg(etcd_name(i))
            .arg("--data-dir")
            .arg(self.spec.dir.join(etcd_name(i)))
            .arg("--listen-client-urls")
            .arg(url(member.client_port))
            .arg("--advertise-client-urls")
            .arg(url(member.client_port))
            .arg("--listen-peer-urls")
            .arg(url(member.peer_port))
            .arg("--initial-advertise-peer-urls")
            .arg(url(member.peer_port))
            .arg("--initial-cluster")
            .arg(cluster.join(","))
            .arg("--initial-cluster-token")
            .arg(&self.spec.instance)
            .arg("--client-cert-auth")
            .arg("--trusted-ca-file")
            .arg(pki.join("etcd-ca.crt"))
            .arg("--cert-file")
            .arg(pki.join("etcd-server.crt"))
            .arg("--key-file")
            .arg(pki.join("etcd-server.key"))
            .arg("--peer-client-cert-auth")
            .arg("--peer-trusted-ca-file")
            .arg(pki.join("etcd-ca.crt"))
            .arg("--peer-cert-file")
            .arg(pki.join("etcd-server.crt"))
            .arg("--peer-key-file")
            .arg(pki.join("etcd-server.key"))
            // Every login writes (docs/scaling.md): an hour of history, not all of it.
            .args(["--auto-compaction-mode", "periodic"])
            .args(["--auto-compaction-retention", "1h"])
            .args(["--log-level", "warn"]);
        command
    }

    /// Starts every member not running, then waits until each answers a read (a quorum).
    pub async fn start_etcd(&mut self) -> Result<(), Error> {
        for i in 0..self.etcd.len() {
            self.spawn_etcd_member(i)?;
        }
        for i in 0..self.etcd.len() {
            self.wait_etcd_member(i).await?;
        }
        Ok(())
    }

    /// Starts member `i` if it is not running (again, after a kill: it rejoins with its data)
    /// and waits until it answers.
    pub async fn start_etcd_member(&mut self, i: usize) -> Result<(), Error> {
        self.spawn_etcd_member(i)?;
        self.wait_etcd_member(i).await
    }

    fn spawn_etcd_member(&mut self, i: usize) -> Result<(), Error> {
        let name = etcd_name(i);
        if self.alive(&name) {
            return Ok(());
        }
        eprintln!(
            "fleet: starting {name} on {HOST}:{} (TLS, client certificates; peers on {})",
            self.etcd[i].client_port, self.etcd[i].peer_port
        );
        let process = self.spawn(&name, self.etcd_command(i))?;
        self.etcd[i].process = Some(process);
        Ok(())
    }

    async fn wait_etcd_member(&mut self, i: usize) -> Result<(), Error> {
        let tls = self.etcd_tls()?;
        let endpoint = self.etcd_endpoints()[i].clone();
        self.wait_for(&etcd_name(i), &etcd_name(i), || {
            probe::etcd_reads(&endpoint, &tls)
        })
        .await
    }

    // ---- control planes -----------------------------------------------------------------

    fn controlplane_command(&self, r: usize) -> Command {
        let spec = &self.spec;
        let pki = spec.pki_dir();
        let (etcd_ca, etcd_cert, etcd_key) = spec.etcd_client_files();
        let replica = &self.controlplanes[r];
        let mut command = Command::new(spec.bin_dir.join("envgate-controlplane"));
        command
            .arg("--listen")
            .arg(&replica.grpc)
            .arg("--ops-listen")
            .arg(&replica.ops)
            .arg("--tls-cert")
            .arg(pki.join("controlplane.crt"))
            .arg("--tls-key")
            .arg(pki.join("controlplane.key"))
            .arg("--tls-client-ca")
            .arg(spec.fleet_ca())
            .arg("--etcd")
            .arg(self.etcd_endpoints().join(","))
            .arg("--etcd-prefix")
            .arg(ETCD_PREFIX)
            .arg("--etcd-ca")
            .arg(etcd_ca)
            .arg("--etcd-cert")
            .arg(etcd_cert)
            .arg("--etcd-key")
            .arg(etcd_key)
            .arg("--token-key")
            .arg(spec.token_key())
            .arg("--admin-tokens")
            .arg(spec.admin_tokens())
            .arg("--audit-log")
            .arg(&spec.audit_log)
            .arg("--recordings-dir")
            .arg(spec.dir.join("recordings"))
            .arg("--instance")
            .arg(&spec.instance);
        if let Some(environments) = &spec.environments {
            command.arg("--environments").arg(environments);
        }
        if let Some(agent) = &spec.agent {
            command
                .arg("--agent-binary")
                .arg(agent)
                .arg("--agent-dir")
                .arg(spec.dir.join("agents"));
        }
        command
            .args(&spec.controlplane_args)
            .envs(spec.env.iter().map(|(k, v)| (k, v)));
        command
    }

    /// Starts every replica not running, then waits until each is ready.
    pub async fn start_controlplanes(&mut self) -> Result<(), Error> {
        for r in 0..self.controlplanes.len() {
            self.spawn_controlplane(r)?;
        }
        for r in 0..self.controlplanes.len() {
            self.wait_controlplane(r).await?;
        }
        Ok(())
    }

    /// Starts replica `r` if it is not running and waits until it is ready.
    pub async fn start_controlplane(&mut self, r: usize) -> Result<(), Error> {
        self.spawn_controlplane(r)?;
        self.wait_controlplane(r).await
    }

    fn spawn_controlplane(&mut self, r: usize) -> Result<(), Error> {
        let name = controlplane_name(r);
        if self.alive(&name) {
            return Ok(());
        }
        let replica = &self.controlplanes[r];
        eprintln!(
            "fleet: starting {name} (gRPC {}, ops {})",
            replica.grpc, replica.ops
        );
        let process = self.spawn(&name, self.controlplane_command(r))?;
        self.controlplanes[r].process = Some(process);
        Ok(())
    }

    async fn wait_controlplane(&mut self, r: usize) -> Result<(), Error> {
        let ops = self.controlplanes[r].ops.clone();
        let name = controlplane_name(r);
        self.wait_for(&name, &name, || probe::http_ok(&ops, "/readyz"))
            .await
    }

    // ---- proxies ------------------------------------------------------------------------

    fn add_proxy(&mut self, n: usize) -> Result<(), Error> {
        if !self.proxies.contains_key(&n) {
            let (ssh, ops, pinned) = self.spec.ports.proxy(n, self.spec.pinned.len())?;
            self.proxies.insert(
                n,
                Proxy {
                    listen: format!("{HOST}:{ssh}"),
                    ops: format!("{HOST}:{ops}"),
                    pinned: pinned.iter().map(|p| format!("{HOST}:{p}")).collect(),
                    process: None,
                },
            );
        }
        Ok(())
    }

    fn proxy_mut(&mut self, n: usize) -> Result<&mut Proxy, Error> {
        self.proxies
            .get_mut(&n)
            .ok_or_else(|| Error::Failed(format!("proxy-{n} was never started")))
    }

    fn proxy_command(&self, n: usize, cert: PathBuf, key: PathBuf) -> Command {
        let spec = &self.spec;
        let proxy = &self.proxies[&n];
        let controlplanes: Vec<String> = self
            .controlplanes
            .iter()
            .map(|r| format!("https://{}", r.grpc))
            .collect();
        let mut command = Command::new(spec.bin_dir.join("envgate-proxy"));
        command
            .arg("--listen")
            .arg(&proxy.listen)
            .arg("--ops-listen")
            .arg(&proxy.ops);
        for (addr, environment) in proxy.pinned.iter().zip(&spec.pinned) {
            command
                .arg("--pinned-listen")
                .arg(format!("{addr}={environment}"));
        }
        command
            .arg("--controlplane")
            .arg(controlplanes.join(","))
            .arg("--tls-cert")
            .arg(cert)
            .arg("--tls-key")
            .arg(key)
            .arg("--tls-ca")
            .arg(spec.fleet_ca())
            .arg("--host-key")
            .arg(spec.host_key())
            .arg("--audit-log")
            .arg(&spec.audit_log)
            .arg("--recordings-dir")
            .arg(spec.dir.join("recordings"))
            .arg("--trusted-proxies")
            .arg("127.0.0.1/32")
            .arg("--shutdown-grace-seconds")
            .arg(spec.shutdown_grace.as_secs().to_string());
        // Without the agent, sessions start through Docker exec: only then does a proxy get
        // Docker.
        if spec.agent.is_none() {
            command
                .arg("--docker-host")
                .arg("unix:///var/run/docker.sock");
        }
        command.envs(spec.env.iter().map(|(k, v)| (k, v)));
        command
    }

    /// Starts proxy `n` if it is not running (its ports are settled on its first start);
    /// does not wait (`wait_proxy`).
    pub fn spawn_proxy(&mut self, n: usize) -> Result<(), Error> {
        let name = proxy_name(n);
        if self.alive(&name) {
            return Ok(());
        }
        self.add_proxy(n)?;
        let (cert, key) = self.spec.proxy_certificate(&self.proxy_id(n))?;
        let proxy = &self.proxies[&n];
        eprintln!(
            "fleet: starting {name} (SSH {}, ops {}{})",
            proxy.listen,
            proxy.ops,
            proxy
                .pinned
                .iter()
                .zip(&self.spec.pinned)
                .map(|(addr, env)| format!(", {env} {addr}"))
                .collect::<String>()
        );
        let process = self.spawn(&name, self.proxy_command(n, cert, key))?;
        self.proxy_mut(n)?.process = Some(process);
        Ok(())
    }

    /// Waits until proxy `n` is ready (`/readyz`: attached to a control plane).
    pub async fn wait_proxy(&mut self, n: usize) -> Result<(), Error> {
        let ops = self.proxy_mut(n)?.ops.clone();
        let name = proxy_name(n);
        self.wait_for(&name, &name, || probe::http_ok(&ops, "/readyz"))
            .await
    }

    // ---- HAProxy ------------------------------------------------------------------------

    /// The proxies HAProxy sends connections to (from the next write of its configuration).
    pub fn set_serving(&mut self, proxies: Vec<usize>) {
        self.serving = proxies;
    }

    pub fn serving(&self) -> &[usize] {
        &self.serving
    }

    fn routes(&self) -> Vec<Route> {
        let server = |n: usize, prefix: &str, listen: &String| Server {
            name: format!("{prefix}proxy-{n}"),
            listen: listen.clone(),
            ops_port: port_of(&self.proxies[&n].ops),
        };
        let serving: Vec<usize> = self
            .serving
            .iter()
            .copied()
            .filter(|n| self.proxies.contains_key(n))
            .collect();
        let mut routes = vec![Route {
            frontend: "ssh".into(),
            backend: BACKEND.into(),
            port: self.haproxy_port,
            servers: serving
                .iter()
                .map(|n| server(*n, "", &self.proxies[n].listen))
                .collect(),
        }];
        for (k, environment) in self.spec.pinned.iter().enumerate() {
            routes.push(Route {
                frontend: format!("ssh_{environment}"),
                backend: format!("envgate_pinned_{environment}"),
                port: self.haproxy_pinned[k],
                servers: serving
                    .iter()
                    .map(|n| server(*n, "pinned-", &self.proxies[n].pinned[k]))
                    .collect(),
            });
        }
        routes
    }

    /// Writes haproxy.cfg for the serving proxies, checked by `haproxy -c` first.
    pub fn write_haproxy_cfg(&self) -> Result<PathBuf, Error> {
        let cfg = haproxy::config(&self.haproxy_socket(), &self.routes());
        let path = self.haproxy_cfg();
        let new = path.with_extension("cfg.new");
        std::fs::write(&new, cfg).map_err(Error::io(format!("write {}", new.display())))?;
        let check = Command::new("haproxy")
            .args(["-c", "-q", "-f"])
            .arg(&new)
            .output()
            .map_err(Error::io("run haproxy -c"))?;
        if !check.status.success() {
            return Err(Error::Failed(format!(
                "the generated {} is invalid: {}",
                new.display(),
                String::from_utf8_lossy(&check.stderr).trim()
            )));
        }
        std::fs::rename(&new, &path).map_err(Error::io(format!("write {}", path.display())))?;
        Ok(path)
    }

    /// Writes haproxy.cfg and starts HAProxy if it is not running; waits until it listens.
    pub async fn start_haproxy(&mut self) -> Result<(), Error> {
        if self.alive("haproxy") {
            return Ok(());
        }
        let cfg = self.write_haproxy_cfg()?;
        eprintln!("fleet: starting HAProxy on {HOST}:{}", self.haproxy_port);
        let mut command = Command::new("haproxy");
        command.arg("-db").arg("-f").arg(cfg);
        let process = self.spawn("haproxy", command)?;
        self.haproxy = Some(process);
        let addr = format!("{HOST}:{}", self.haproxy_port);
        self.wait_for("haproxy", "HAProxy", || probe::tcp_open(&addr))
            .await
    }

    /// A soft reload: a new HAProxy takes the listening sockets over the stats socket (`-x`)
    /// and tells the old one to finish its connections and exit (`-sf`); established
    /// sessions are untouched. Starts HAProxy if it is not running.
    pub async fn reload_haproxy(&mut self) -> Result<(), Error> {
        if !self.alive("haproxy") {
            return self.start_haproxy().await;
        }
        let cfg = self.write_haproxy_cfg()?;
        let old = self.haproxy.take().expect("alive");
        eprintln!("fleet: soft-reloading HAProxy (old pid {})", old.pid());
        let mut command = Command::new("haproxy");
        command
            .arg("-db")
            .arg("-f")
            .arg(cfg)
            .arg("-x")
            .arg(self.haproxy_socket())
            .arg("-sf")
            .arg(old.pid().to_string());
        let new = self.spawn("haproxy", command)?;
        let new_pid = new.pid();
        self.old_haproxies.push(old);
        self.haproxy = Some(new);
        let socket = self.haproxy_socket();
        self.wait_for("haproxy", "the reloaded HAProxy", || async {
            match haproxy::pid(&socket).await {
                Some(pid) if pid == new_pid => Ok(()),
                other => Err(format!("stats socket answers for pid {other:?}")),
            }
        })
        .await
    }

    /// Waits until HAProxy's health checks see every serving proxy UP.
    pub async fn wait_haproxy_sees_all(&mut self) -> Result<(), Error> {
        let socket = self.haproxy_socket();
        let want = self.serving.len();
        self.wait_for("haproxy", "HAProxy's health checks", || async {
            let statuses = haproxy::statuses(&socket, BACKEND)
                .await
                .ok_or("no answer on the stats socket")?;
            let up = statuses.iter().filter(|(_, s)| s == "UP").count();
            if up >= want {
                Ok(())
            } else {
                Err(format!("{up} of {want} proxies UP: {statuses:?}"))
            }
        })
        .await
    }

    // ---- slapd --------------------------------------------------------------------------

    /// Starts `directory`'s slapd if it is not running and waits until it answers a bind.
    pub async fn start_slapd(&mut self, directory: &crate::ldap::Directory) -> Result<(), Error> {
        if self.alive("slapd") {
            return Ok(());
        }
        eprintln!("fleet: starting slapd on {}", directory.url());
        let process = self.spawn("slapd", directory.command())?;
        self.slapd = Some(process);
        self.wait_for("slapd", "slapd", || async { directory.ready() })
            .await
    }
}

pub fn etcd_name(i: usize) -> String {
    format!("etcd-{i}")
}

pub fn controlplane_name(r: usize) -> String {
    match r {
        0 => "controlplane".to_owned(),
        r => format!("controlplane-{r}"),
    }
}

pub fn proxy_name(n: usize) -> String {
    format!("proxy-{n}")
}

fn port_of(addr: &str) -> u16 {
    addr.rsplit_once(':')
        .and_then(|(_, p)| p.parse().ok())
        .unwrap_or_default()
}
