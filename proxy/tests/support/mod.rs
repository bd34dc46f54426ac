//! The end-to-end harness: a whole envgate fleet per test, made of the real binaries.
//!
//! `Fleet::start` has the fleet launcher (`envgate_fleet`, the one `deploy/local/fleet` uses)
//! run a private etcd (one member, or a cluster), the real `envgate-controlplane` and
//! `envgate-proxy` binaries from the target directory, and a real HAProxy (mode tcp,
//! send-proxy-v2, `/readyz` health checks) on free 127.0.0.1 ports in a temporary directory. Each fleet has its own `--instance`, so tests run in parallel on the
//! one Docker engine without seeing each other's containers; on drop every process is killed
//! and the instance's containers and home volumes are removed.
//!
//! Tests talk to the fleet the way users and operators do: the OpenSSH client through
//! HAProxy, the admin gRPC API, `docker ps`, and reads of the etcd records.

// Each e2e test binary uses a different part of this module.
#![allow(dead_code)]

pub mod proxy_v2;

use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use envgate_controlplane::testkit::TestPki;
use envgate_fleet::{Launcher, Spec, docker, haproxy, probe};
use envgate_proto::admin::v1 as admin;
use tokio::io::AsyncWriteExt;
use tonic::transport::Channel;

pub use envgate_fleet::probe::http_get;

/// Longest any single `ssh` invocation may take before the test fails.
pub const SSH_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the fleet's processes get to become ready.
const START_TIMEOUT: Duration = Duration::from_secs(45);
/// Bound on one admin RPC.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound on one etcd read.
const ETCD_TIMEOUT: Duration = Duration::from_secs(5);
/// The etcd prefix the control plane is started with.
pub use envgate_fleet::ETCD_PREFIX;

/// The operator's name the fleet's admin token carries (the audit log shows it).
pub const ADMIN_NAME: &str = "e2e-admin";

pub const BUSYBOX_IMAGE: &str = "envgate/busybox:latest";
pub const DEBIAN_IMAGE: &str = "envgate/debian:latest";

/// How a test wants its fleet.
#[derive(Debug, Clone)]
pub struct FleetOptions {
    pub proxies: usize,
    /// `--reconcile-interval-seconds` of the control plane.
    pub reconcile_interval_seconds: u64,
    /// `--docker-host` of the control plane; `None` = the local engine.
    pub docker_host: Option<String>,
    /// Create the standard catalogue (busybox default, debian) and the user `demo`.
    pub seed: bool,
    /// Extra environment of the control plane and every proxy (e.g. `OTEL_EXPORTER_OTLP_ENDPOINT`).
    pub env: Vec<(String, String)>,
    /// Containers run `envgate-agent` (`--agent-binary`, the fast data path); `false`: the
    /// control plane has no agent and sessions use Docker exec.
    pub agent: bool,
    /// Control-plane replicas (same etcd and keys); every proxy is given all of them.
    pub controlplanes: usize,
    /// etcd cluster members; every replica is given all of them. 1 keeps a test fast; HA
    /// tests take 3 (the loss of one keeps a quorum).
    pub etcd_members: usize,
    /// `--shutdown-grace-seconds` of every proxy.
    pub shutdown_grace_seconds: u64,
    /// A catalogue file (YAML, docs/environments.md) written to the fleet's directory and
    /// given to every control-plane replica as `--environments`; seeded before `seed` runs.
    pub environments_yaml: Option<String>,
    /// Environments with a pinned port: every proxy gets a `--pinned-listen` for each, and
    /// HAProxy a frontend of its own (`Fleet::pinned_port`).
    pub pinned: Vec<String>,
    /// Extra arguments of every control-plane replica (e.g. `--user-ca-key FILE`).
    pub controlplane_args: Vec<String>,
}

impl Default for FleetOptions {
    fn default() -> Self {
        FleetOptions {
            proxies: 2,
            reconcile_interval_seconds: 1,
            docker_host: None,
            seed: true,
            env: Vec::new(),
            agent: true,
            controlplanes: 1,
            etcd_members: 1,
            shutdown_grace_seconds: 2,
            environments_yaml: None,
            pinned: Vec::new(),
            controlplane_args: Vec::new(),
        }
    }
}

/// What one `ssh` run showed its user.
#[derive(Debug, Clone)]
pub struct SshOutput {
    /// stdout exactly as received, for binary comparisons.
    pub stdout_bytes: Vec<u8>,
    pub stdout: String,
    pub stderr: String,
    /// The exit status of the `ssh` client (`None`: killed by a signal).
    pub code: Option<i32>,
}

impl SshOutput {
    /// Panics with everything the user saw unless the command exited 0.
    pub fn assert_success(&self) -> &Self {
        assert_eq!(self.code, Some(0), "ssh failed: {self:#?}");
        self
    }

    /// Non-empty stderr lines.
    pub fn stderr_lines(&self) -> Vec<&str> {
        self.stderr
            .lines()
            .filter(|l| !l.trim().is_empty())
            .collect()
    }
}

/// A container of this fleet's instance, as `docker ps` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerInfo {
    pub id: String,
    pub name: String,
    pub user: String,
    pub environment: String,
    pub state: String,
}

/// The test client trusts whatever host key the fleet presents (it made that key itself).
pub struct AcceptAnyHostKey;

impl russh::client::Handler for AcceptAnyHostKey {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        _key: &russh::keys::PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        Ok(true)
    }
}

/// A running fleet. See the module documentation.
pub struct Fleet {
    pub instance: String,
    pub options: FleetOptions,
    /// The SSH port of HAProxy, the only way in for users.
    pub ssh_port: u16,
    /// `127.0.0.1:port` of the control plane's gRPC server.
    pub grpc_addr: String,
    /// `127.0.0.1:port` of the control plane's ops endpoint.
    pub controlplane_ops: String,
    /// gRPC and ops addresses of every control-plane replica; `[0]` is the one above.
    pub replica_grpc: Vec<String>,
    pub replica_ops: Vec<String>,
    /// `127.0.0.1:port` of each proxy's SSH listener (behind HAProxy).
    pub proxy_listen: Vec<String>,
    /// `127.0.0.1:port` of each proxy's ops endpoint.
    pub proxy_ops: Vec<String>,
    /// HAProxy's port for each pinned environment.
    pinned_ports: HashMap<String, u16>,
    admin_token: String,
    /// The fleet CA, the control plane's server certificate and the proxies' certificates.
    pub pki: TestPki,
    keys: Mutex<HashMap<String, PathBuf>>,
    /// Every process; all are killed when it drops, before the directory holding their
    /// logs goes.
    launcher: Launcher,
    dir: tempfile::TempDir,
}

impl Fleet {
    /// A fleet with two proxies, the standard catalogue and the user `demo`.
    pub async fn start() -> Fleet {
        Self::start_with(FleetOptions::default()).await
    }

    pub async fn start_with(options: FleetOptions) -> Fleet {
        // Ports are picked free and bound a moment later by the processes; a test running
        // beside this one may take one in between, and the process that lost the port exits
        // (its log's tail may show only a backtrace). Such a start is tried again; a failure
        // that is not a race fails every time and is reported below.
        for _ in 0..2 {
            match Self::try_start(options.clone()).await {
                Ok(fleet) => return fleet,
                Err(e)
                    if e.contains("Address already in use")
                        || e.contains("exited while waiting") =>
                {
                    eprintln!("a port was taken meanwhile; starting the fleet again: {e}");
                }
                Err(e) => panic!("the e2e fleet did not start: {e}"),
            }
        }
        match Self::try_start(options).await {
            Ok(fleet) => fleet,
            Err(e) => panic!("the e2e fleet did not start: {e}"),
        }
    }

    /// The launcher's description of this test's fleet: processes attached to the test,
    /// ports picked free, everything in `dir`.
    fn spec(options: &FleetOptions, instance: &str, dir: &Path) -> Result<Spec, String> {
        let bin_dir = controlplane_bin()
            .parent()
            .expect("the target directory")
            .to_path_buf();
        let mut spec = Spec::new(instance, dir.to_path_buf(), bin_dir);
        spec.etcd_members = options.etcd_members;
        spec.controlplanes = options.controlplanes;
        spec.admin_name = ADMIN_NAME.to_owned();
        spec.agent = if options.agent {
            Some(agent_static_bin()?)
        } else {
            None
        };
        if let Some(yaml) = &options.environments_yaml {
            let file = dir.join("environments.yaml");
            std::fs::write(&file, yaml).map_err(|e| format!("write {file:?}: {e}"))?;
            spec.environments = Some(file);
        }
        spec.pinned = options.pinned.clone();
        spec.shutdown_grace = Duration::from_secs(options.shutdown_grace_seconds);
        spec.wait = START_TIMEOUT;
        spec.env = vec![("RUST_LOG".to_owned(), "info".to_owned())];
        spec.env.extend(options.env.iter().cloned());
        spec.controlplane_args = vec![
            "--reconcile-interval-seconds".to_owned(),
            options.reconcile_interval_seconds.to_string(),
        ];
        if let Some(docker_host) = &options.docker_host {
            spec.controlplane_args
                .extend(["--docker-host".to_owned(), docker_host.clone()]);
        }
        spec.controlplane_args
            .extend(options.controlplane_args.iter().cloned());
        Ok(spec)
    }

    async fn try_start(options: FleetOptions) -> Result<Fleet, String> {
        ensure_images()?;
        let controlplane_bin = controlplane_bin();
        if !controlplane_bin.exists() {
            return Err(format!(
                "{} is missing: build it first (`cargo build --workspace --bins`; \
                 `deploy/local/fleet test` does this)",
                controlplane_bin.display()
            ));
        }
        let dir = tempfile::Builder::new()
            .prefix("envgate-e2e-")
            .tempdir()
            .map_err(|e| e.to_string())?;
        let instance = format!("e2e{:08x}", rand::random::<u32>());
        let spec = Self::spec(&options, &instance, dir.path())?;
        spec.ensure_keys().map_err(|e| e.to_string())?;
        let admin_token = spec.admin_token().map_err(|e| e.to_string())?;
        let pki = TestPki::open(&spec.pki_dir()).map_err(|e| format!("the fleet PKI: {e}"))?;
        let mut launcher = Launcher::new(spec).map_err(|e| e.to_string())?;
        launcher.start_etcd().await.map_err(|e| e.to_string())?;
        launcher
            .start_controlplanes()
            .await
            .map_err(|e| e.to_string())?;
        let replica_grpc = launcher.controlplane_grpc();
        let replica_ops = launcher.controlplane_ops();
        let mut fleet = Fleet {
            instance,
            options: options.clone(),
            ssh_port: 0,
            grpc_addr: replica_grpc[0].clone(),
            controlplane_ops: replica_ops[0].clone(),
            replica_grpc,
            replica_ops,
            proxy_listen: Vec::new(),
            proxy_ops: Vec::new(),
            pinned_ports: HashMap::new(),
            admin_token,
            pki,
            keys: Mutex::new(HashMap::new()),
            launcher,
            dir,
        };
        fleet.wait_admin_api().await?;
        if options.seed {
            fleet.seed().await?;
        }
        for i in 0..options.proxies {
            fleet.launcher.spawn_proxy(i).map_err(|e| e.to_string())?;
        }
        for i in 0..options.proxies {
            fleet
                .launcher
                .wait_proxy(i)
                .await
                .map_err(|e| e.to_string())?;
        }
        fleet.note_proxies();
        fleet.launcher.set_serving((0..options.proxies).collect());
        fleet
            .launcher
            .start_haproxy()
            .await
            .map_err(|e| e.to_string())?;
        fleet.ssh_port = fleet.launcher.haproxy_port();
        for (k, environment) in options.pinned.iter().enumerate() {
            fleet
                .pinned_ports
                .insert(environment.clone(), fleet.launcher.haproxy_pinned_port(k));
        }
        Ok(fleet)
    }

    /// `proxy_listen` and `proxy_ops` from the proxies started so far.
    fn note_proxies(&mut self) {
        let (listen, ops): (Vec<String>, Vec<String>) = self
            .launcher
            .proxies()
            .into_iter()
            .filter_map(|i| self.launcher.proxy_addresses(i))
            .map(|(listen, ops, _)| (listen, ops))
            .unzip();
        self.proxy_listen = listen;
        self.proxy_ops = ops;
    }

    /// What `deploy/local/fleet scale` does: proxies `0..n` serve. New ones are started and
    /// ready before HAProxy is soft-reloaded with them; surplus ones leave HAProxy's
    /// configuration first (the old HAProxy process finishes its connections) and are then
    /// SIGTERMed, and this returns once they have drained and exited.
    pub async fn scale(&mut self, n: usize) -> Result<(), String> {
        let before = self.launcher.serving().len();
        for i in before..n {
            self.launcher.spawn_proxy(i).map_err(|e| e.to_string())?;
            self.launcher
                .wait_proxy(i)
                .await
                .map_err(|e| e.to_string())?;
        }
        self.note_proxies();
        self.launcher.set_serving((0..n).collect());
        self.launcher
            .reload_haproxy()
            .await
            .map_err(|e| e.to_string())?;
        let grace = Duration::from_secs(self.options.shutdown_grace_seconds + 10);
        for i in n..before {
            self.terminate_proxy(i);
        }
        for i in n..before {
            let deadline = Instant::now() + grace;
            while self.proxy_exit(i).is_none() {
                if Instant::now() > deadline {
                    return Err(format!(
                        "proxy-{i} did not drain within {grace:?}\n{}",
                        self.logs()
                    ));
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        Ok(())
    }

    /// Waits until the control plane's store answers through the admin API.
    async fn wait_admin_api(&self) -> Result<(), String> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            match self.list_environments().await {
                Ok(_) => return Ok(()),
                Err(e) if Instant::now() > deadline => {
                    return Err(format!("admin API not answering: {e}\n{}", self.logs()));
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }

    /// HAProxy's health-check status of proxy `index` in the main backend (`UP`, `DOWN`,
    /// `UP 1/2` while a check is failing, …), from `show stat`.
    pub async fn haproxy_status(&self, index: usize) -> Option<String> {
        let name = envgate_fleet::proxy_name(index);
        haproxy::statuses(&self.launcher.haproxy_socket(), haproxy::BACKEND)
            .await?
            .into_iter()
            .find(|(server, _)| *server == name)
            .map(|(_, status)| status)
    }

    /// The standard catalogue: `busybox` (catalogue default) and `debian`, and the user `demo`
    /// whose default is busybox.
    async fn seed(&self) -> Result<(), String> {
        self.try_put_environment(environment("busybox", BUSYBOX_IMAGE, "/bin/sh", true))
            .await?;
        self.try_put_environment(environment("debian", DEBIAN_IMAGE, "/bin/bash", false))
            .await?;
        self.try_add_user("demo", "busybox", None, &["users"])
            .await?;
        Ok(())
    }

    // ---- admin API -------------------------------------------------------------------

    /// An admin client over a fresh channel (TLS, no client certificate: an operator).
    pub async fn admin_client(&self) -> Result<admin::admin_client::AdminClient<Channel>, String> {
        let channel = tokio::time::timeout(ADMIN_TIMEOUT, self.pki.connect(&self.grpc_addr, None))
            .await
            .map_err(|_| "connect to the admin API timed out".to_string())??;
        Ok(admin::admin_client::AdminClient::new(channel))
    }

    /// Proxy `i`'s id: the one its certificate names.
    pub fn proxy_id(&self, i: usize) -> String {
        format!("{}-p{i}", self.instance)
    }

    /// The audit log every process of the fleet appends to (JSON lines).
    /// Where the proxies write session recordings and the control plane reads them.
    pub fn recordings_dir(&self) -> PathBuf {
        self.dir.path().join("recordings")
    }

    /// etcd's client URL (`https://127.0.0.1:port`).
    pub fn etcd_endpoint(&self) -> String {
        self.launcher.etcd_endpoints()[0].clone()
    }

    pub fn audit_log(&self) -> PathBuf {
        self.dir.path().join("audit.jsonl")
    }

    /// The reason the latest failed login of `user` was given, from the audit log ("" if none).
    pub fn last_refusal(&self, user: &str) -> String {
        self.audit_records()
            .into_iter()
            .rfind(|r| r["event"] == "login" && r["outcome"] == "failure" && r["user"] == user)
            .and_then(|r| r["reason"].as_str().map(str::to_owned))
            .unwrap_or_default()
    }

    /// The audit records so far, parsed.
    pub fn audit_records(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.audit_log())
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
            .collect()
    }

    /// Wraps `message` in a request that carries the admin bearer token.
    pub fn authorized<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        let value = format!("Bearer {}", self.admin_token)
            .parse()
            .expect("ASCII bearer token");
        request
            .metadata_mut()
            .insert(envgate_proto::metadata::AUTHORIZATION, value);
        request
    }

    /// Runs the real `grpcurl -cacert <fleet CA>` against the control plane, as an operator
    /// does: `header` (e.g. the result of `bearer_header`) if given, `-d body` if not empty,
    /// then `method`.
    pub async fn grpcurl(&self, header: Option<&str>, body: &str, method: &str) -> SshOutput {
        let mut argv = vec![
            "grpcurl".to_string(),
            "-cacert".to_string(),
            self.pki.ca_path().display().to_string(),
        ];
        if let Some(header) = header {
            argv.extend(["-H".to_string(), header.to_string()]);
        }
        if !body.is_empty() {
            argv.extend(["-d".to_string(), body.to_string()]);
        }
        argv.push(self.grpc_addr.clone());
        argv.extend(method.split_whitespace().map(str::to_string));
        run(&argv, None, &[]).await
    }

    /// `authorization: Bearer <the fleet's admin token>`, as grpcurl's `-H` takes it.
    pub fn bearer_header(&self) -> String {
        format!("authorization: Bearer {}", self.admin_token)
    }

    pub async fn list_environments(&self) -> Result<Vec<admin::Environment>, String> {
        let mut client = self.admin_client().await?;
        let response = client
            .list_environments(self.authorized(admin::ListEnvironmentsRequest {}))
            .await
            .map_err(|s| format!("ListEnvironments: {s}"))?;
        Ok(response.into_inner().environments)
    }

    pub async fn try_put_environment(&self, env: admin::Environment) -> Result<(), String> {
        let mut client = self.admin_client().await?;
        client
            .put_environment(self.authorized(admin::PutEnvironmentRequest {
                environment: Some(env),
            }))
            .await
            .map_err(|s| format!("PutEnvironment: {s}"))?;
        Ok(())
    }

    pub async fn put_environment(&self, env: admin::Environment) {
        if let Err(e) = self.try_put_environment(env).await {
            panic!("{e}");
        }
    }

    async fn try_add_user(
        &self,
        name: &str,
        default_environment: &str,
        password: Option<&str>,
        groups: &[&str],
    ) -> Result<PathBuf, String> {
        let key = self.dir.path().join(format!("{name}_ed25519"));
        if !key.exists() {
            keygen(&key)?;
        }
        let public = std::fs::read_to_string(key.with_extension("pub"))
            .map_err(|e| e.to_string())?
            .trim()
            .to_string();
        let mut client = self.admin_client().await?;
        client
            .put_user(self.authorized(admin::PutUserRequest {
                user: Some(admin::User {
                    name: name.to_string(),
                    authorized_keys: vec![public],
                    groups: groups.iter().map(|g| g.to_string()).collect(),
                    default_environment: default_environment.to_string(),
                    ..Default::default()
                }),
                password: password.unwrap_or_default().to_string(),
                clear_password: false,
            }))
            .await
            .map_err(|s| format!("PutUser {name}: {s}"))?;
        self.keys
            .lock()
            .expect("keys lock")
            .insert(name.to_string(), key.clone());
        Ok(key)
    }

    /// Creates (or replaces) a user with a fresh key pair; returns the private key's path.
    pub async fn add_user(
        &self,
        name: &str,
        default_environment: &str,
        password: Option<&str>,
    ) -> PathBuf {
        match self
            .try_add_user(name, default_environment, password, &["users"])
            .await
        {
            Ok(key) => key,
            Err(e) => panic!("{e}"),
        }
    }

    /// Like `add_user` (no password), in `groups` instead of just `users`; an empty
    /// `default_environment` leaves the user without a saved default.
    pub async fn add_user_in_groups(
        &self,
        name: &str,
        default_environment: &str,
        groups: &[&str],
    ) -> PathBuf {
        match self
            .try_add_user(name, default_environment, None, groups)
            .await
        {
            Ok(key) => key,
            Err(e) => panic!("{e}"),
        }
    }

    /// HAProxy's port for a pinned environment (`FleetOptions::pinned`).
    pub fn pinned_port(&self, environment: &str) -> u16 {
        match self.pinned_ports.get(environment) {
            Some(port) => *port,
            None => panic!("{environment:?} is not in FleetOptions::pinned"),
        }
    }

    /// A fresh key pair no user has; returns the private key's path.
    pub fn stranger_key(&self) -> PathBuf {
        let key = self
            .dir
            .path()
            .join(format!("stranger-{:08x}_ed25519", rand::random::<u32>()));
        keygen(&key).expect("ssh-keygen");
        key
    }

    /// The private key of a user made by this harness (`demo` is always there).
    pub fn key_of(&self, user: &str) -> PathBuf {
        self.keys
            .lock()
            .expect("keys lock")
            .get(user)
            .cloned()
            .unwrap_or_else(|| panic!("no key for user {user:?}; add_user it first"))
    }

    // ---- ssh ---------------------------------------------------------------------------

    /// The OpenSSH options every run uses: no user config, no agent, no host key prompts.
    fn ssh_base_args(&self) -> Vec<String> {
        [
            "-F",
            "/dev/null",
            "-p",
            &self.ssh_port.to_string(),
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "GlobalKnownHostsFile=/dev/null",
            "-o",
            "LogLevel=ERROR",
            "-o",
            "ConnectTimeout=10",
            "-o",
            "IdentityAgent=none",
            "-o",
            "ServerAliveInterval=5",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }

    /// The argv of an `ssh` that logs in as `login` (user or user+env) with `key`.
    pub fn ssh_key_argv(&self, login: &str, key: &Path) -> Vec<String> {
        let mut argv = vec!["ssh".to_string()];
        argv.extend(self.ssh_base_args());
        argv.extend(
            [
                "-o",
                "BatchMode=yes",
                "-o",
                "IdentitiesOnly=yes",
                "-o",
                "PasswordAuthentication=no",
                "-o",
                "KbdInteractiveAuthentication=no",
                "-i",
            ]
            .iter()
            .map(|s| s.to_string()),
        );
        argv.push(key.display().to_string());
        argv.push("-l".to_string());
        argv.push(login.to_string());
        argv.push("--".to_string());
        argv.push("127.0.0.1".to_string());
        argv
    }

    /// `sftp` or `scp` (by `program`) with the options of `ssh_key_argv` and the key of the
    /// user before any `+` in `login`; the caller adds the operands (`login@127.0.0.1:…`).
    pub fn file_tool_argv(&self, program: &str, login: &str) -> Vec<String> {
        let user = login.split('+').next().unwrap_or(login);
        let ssh = self.ssh_key_argv(login, &self.key_of(user));
        // ssh's options, but the port is -P, and no -l, --, or host.
        let mut argv = vec![program.to_string()];
        let options = &ssh[1..ssh.len() - 4];
        for pair in options.chunks(2) {
            argv.push(if pair[0] == "-p" {
                "-P".to_string()
            } else {
                pair[0].clone()
            });
            argv.push(pair[1].clone());
        }
        argv
    }

    /// `ssh -tt login` with the key of the user before any `+`: a terminal session whatever
    /// ssh's own stdin is (a tmux pane, or a pipe).
    pub fn ssh_terminal_argv(&self, login: &str) -> Vec<String> {
        let user = login.split('+').next().unwrap_or(login);
        let mut argv = self.ssh_key_argv(login, &self.key_of(user));
        argv.insert(1, "-tt".to_string());
        argv
    }

    /// `ssh_key_argv` through another of HAProxy's ports (e.g. a pinned one).
    pub fn ssh_key_argv_on_port(&self, port: u16, login: &str, key: &Path) -> Vec<String> {
        let mut argv = self.ssh_key_argv(login, key);
        if let Some(at) = argv.iter().position(|a| a == "-p") {
            argv[at + 1] = port.to_string();
        }
        argv
    }

    /// `ssh login command` on `port` with the key of the user before any `+` and extra
    /// `-o` options.
    pub async fn ssh_on_port(
        &self,
        port: u16,
        login: &str,
        options: &[&str],
        command: &str,
    ) -> SshOutput {
        let user = login.split('+').next().unwrap_or(login);
        let argv = self.ssh_key_argv_on_port(port, login, &self.key_of(user));
        run(&with_options_and_command(argv, options, command), None, &[]).await
    }

    /// `ssh login command` with the key of the user before any `+`, stdin from `stdin`.
    pub async fn ssh(&self, login: &str, command: &str, stdin: Option<&[u8]>) -> SshOutput {
        let user = login.split('+').next().unwrap_or(login);
        let key = self.key_of(user);
        self.ssh_with_key(login, &key, command, stdin).await
    }

    pub async fn ssh_with_key(
        &self,
        login: &str,
        key: &Path,
        command: &str,
        stdin: Option<&[u8]>,
    ) -> SshOutput {
        self.ssh_with_options(login, key, &[], command, stdin).await
    }

    /// Like `ssh_with_key`, with extra `-o` options (e.g. `SetEnv=ENVGATE_ENV=debian`).
    pub async fn ssh_with_options(
        &self,
        login: &str,
        key: &Path,
        options: &[&str],
        command: &str,
        stdin: Option<&[u8]>,
    ) -> SshOutput {
        let argv = self.ssh_key_argv(login, key);
        run(
            &with_options_and_command(argv, options, command),
            stdin,
            &[],
        )
        .await
    }

    /// Starts `ssh login command` (the key of the user before any `+`) in the background, as
    /// a user in another terminal would.
    pub fn ssh_in_background(
        &self,
        login: &str,
        command: &str,
    ) -> tokio::task::JoinHandle<SshOutput> {
        let user = login.split('+').next().unwrap_or(login);
        let mut argv = self.ssh_key_argv(login, &self.key_of(user));
        argv.push(command.to_string());
        tokio::spawn(async move { run(&argv, None, &[]).await })
    }

    /// `ssh_in_background`, returned once the user's one session is recorded in etcd
    /// (within `timeout`), so the session is running.
    pub async fn session_in_background(
        &self,
        login: &str,
        command: &str,
        timeout: Duration,
    ) -> tokio::task::JoinHandle<SshOutput> {
        let user = login.split('+').next().unwrap_or(login);
        // A session that closed a moment ago may still have its record (its delete rides on
        // the next write, docs/decisions.md): wait until the one record is a new one.
        let ids = |sessions: Vec<serde_json::Value>| -> Vec<serde_json::Value> {
            sessions.into_iter().map(|s| s["id"].clone()).collect()
        };
        let before = ids(self.user_sessions(user).await.unwrap_or_default());
        let ssh = self.ssh_in_background(login, command);
        eventually(timeout, &format!("{user}'s session recorded"), || async {
            let now = ids(self.user_sessions(user).await?);
            if now.len() == 1 && !before.contains(&now[0]) {
                Ok(())
            } else {
                Err(format!("{now:?}"))
            }
        })
        .await;
        ssh
    }

    /// `user`'s session records in etcd.
    pub async fn user_sessions(&self, user: &str) -> Result<Vec<serde_json::Value>, String> {
        Ok(self
            .etcd_records("sessions/")
            .await?
            .into_iter()
            .filter_map(|(_, v)| serde_json::from_str::<serde_json::Value>(&v).ok())
            .filter(|s| s["user"] == user)
            .collect())
    }

    /// Sends `len` random bytes through `cat` in `demo`'s container and checks that they come
    /// back byte for byte (flow control end to end).
    pub async fn assert_cat_round_trip(&self, len: usize) {
        let data: Vec<u8> = (0..len).map(|_| rand::random::<u8>()).collect();
        let out = self.ssh("demo", "cat", Some(&data)).await;
        assert_eq!(out.code, Some(0), "stderr: {}", out.stderr);
        assert_eq!(out.stdout_bytes.len(), data.len());
        assert!(out.stdout_bytes == data, "the bytes that came back differ");
    }

    /// `ssh login command` with password authentication only (through SSH_ASKPASS).
    pub async fn ssh_password(&self, login: &str, password: &str, command: &str) -> SshOutput {
        self.ssh_password_with_options(&[], login, password, command)
            .await
    }

    /// `ssh_password` with extra `ssh` arguments (e.g. `-b 127.0.0.2`, another source
    /// address as HAProxy reports it). Options in `extra` come first, so they win (ssh takes
    /// an option's first value).
    pub async fn ssh_password_with_options(
        &self,
        extra: &[&str],
        login: &str,
        password: &str,
        command: &str,
    ) -> SshOutput {
        self.ssh_password_prompts(extra, login, password, command)
            .await
            .0
    }

    /// `ssh_password_with_options`, and the prompts `ssh` showed (one per line), as the
    /// askpass program was given them.
    pub async fn ssh_password_prompts(
        &self,
        extra: &[&str],
        login: &str,
        password: &str,
        command: &str,
    ) -> (SshOutput, String) {
        let name = format!("askpass-{:08x}", rand::random::<u32>());
        let askpass = self.dir.path().join(format!("{name}.sh"));
        let prompts = self.dir.path().join(format!("{name}.prompts"));
        std::fs::write(
            &askpass,
            format!(
                "#!/bin/sh\nprintf '%s\\n' \"$1\" >>'{}'\nprintf '%s\\n' '{}'\n",
                prompts.display(),
                password.replace('\'', "'\\''")
            ),
        )
        .expect("write askpass");
        set_mode(&askpass, 0o700);
        let mut argv = vec!["ssh".to_string()];
        argv.extend(extra.iter().map(|s| s.to_string()));
        argv.extend(self.ssh_base_args());
        argv.extend(
            [
                "-o",
                "BatchMode=no",
                "-o",
                "PubkeyAuthentication=no",
                "-o",
                "PreferredAuthentications=password",
                "-o",
                "NumberOfPasswordPrompts=1",
                "-l",
                login,
                "--",
                "127.0.0.1",
                command,
            ]
            .iter()
            .map(|s| s.to_string()),
        );
        let askpass = askpass.display().to_string();
        let out = run(
            &argv,
            None,
            &[
                ("SSH_ASKPASS", askpass.as_str()),
                ("SSH_ASKPASS_REQUIRE", "force"),
                ("DISPLAY", ":0"),
            ],
        )
        .await;
        (out, std::fs::read_to_string(prompts).unwrap_or_default())
    }

    /// A public-key login with russh's client, which (unlike OpenSSH) sends any user name
    /// byte for byte, control characters included. `Ok(true)` if the server accepted it.
    pub async fn raw_publickey_login(&self, login: &str, key: &Path) -> Result<bool, String> {
        let key = russh::keys::load_secret_key(key, None).map_err(|e| e.to_string())?;
        let key = russh::keys::PrivateKeyWithHashAlg::new(std::sync::Arc::new(key), None);
        let config = std::sync::Arc::new(russh::client::Config::default());
        let addr = ("127.0.0.1", self.ssh_port);
        let attempt = async {
            let mut session = russh::client::connect(config, addr, AcceptAnyHostKey)
                .await
                .map_err(|e| format!("connect: {e}"))?;
            let result = session
                .authenticate_publickey(login, key)
                .await
                .map_err(|e| format!("authenticate: {e}"))?;
            let _ = session
                .disconnect(russh::Disconnect::ByApplication, "", "en")
                .await;
            Ok(result.success())
        };
        tokio::time::timeout(SSH_TIMEOUT, attempt)
            .await
            .map_err(|_| format!("login {login:?} did not finish within {SSH_TIMEOUT:?}"))?
    }

    // ---- faults ------------------------------------------------------------------------

    /// SIGKILLs proxy `index` (no drain, no goodbye), as a crash would.
    pub fn kill_proxy(&mut self, index: usize) {
        self.launcher.kill(&envgate_fleet::proxy_name(index));
    }

    /// SIGTERMs proxy `index`: it drains (the harness starts proxies with a 2 s grace).
    pub fn terminate_proxy(&mut self, index: usize) {
        let name = envgate_fleet::proxy_name(index);
        assert!(self.launcher.alive(&name), "{name} is not running");
        self.launcher.terminate(&name);
    }

    /// SIGKILLs every etcd member: the store is gone.
    pub fn kill_etcd(&mut self) {
        for member in 0..self.options.etcd_members {
            self.kill_etcd_member(member);
        }
    }

    /// SIGKILLs etcd member `member` (`FleetOptions::etcd_members`).
    pub fn kill_etcd_member(&mut self, member: usize) {
        self.launcher.kill(&envgate_fleet::etcd_name(member));
    }

    /// Starts etcd member `member` again (it rejoins with its data) and waits until it
    /// answers.
    pub async fn restart_etcd_member(&mut self, member: usize) {
        if let Err(e) = self.launcher.start_etcd_member(member).await {
            panic!("etcd member {member} did not come back: {e}");
        }
    }

    /// The etcd member that leads the cluster now.
    pub async fn etcd_leader(&self) -> usize {
        eventually(Duration::from_secs(10), "an etcd leader", || async {
            self.launcher
                .etcd_leader()
                .await
                .ok_or_else(|| "no member says it leads".to_owned())
        })
        .await
    }

    /// SIGKILLs control-plane replica `index` (0 is `grpc_addr`'s).
    pub fn kill_controlplane(&mut self, index: usize) {
        self.launcher.kill(&envgate_fleet::controlplane_name(index));
    }

    /// Starts control-plane replica `index` again and waits until it is ready.
    pub async fn restart_controlplane(&mut self, index: usize) {
        if let Err(e) = self.launcher.start_controlplane(index).await {
            panic!("control-plane replica {index} did not come back: {e}");
        }
    }

    pub fn controlplane_alive(&mut self) -> bool {
        self.launcher.alive(&envgate_fleet::controlplane_name(0))
    }

    pub fn proxy_alive(&mut self, index: usize) -> bool {
        self.launcher.alive(&envgate_fleet::proxy_name(index))
    }

    /// The exit status of proxy `index` if it has exited.
    pub fn proxy_exit(&mut self, index: usize) -> Option<std::process::ExitStatus> {
        self.launcher
            .process(&envgate_fleet::proxy_name(index))?
            .exit_status()
    }

    /// Everything the control plane and the proxies logged so far, without the terminal
    /// colours tracing writes (`reason=…` reads as the operator's `grep` sees it in a pager).
    pub fn full_logs(&self) -> String {
        let text: String = self
            .launcher
            .names()
            .iter()
            .filter(|n| n.starts_with("controlplane") || n.starts_with("proxy-"))
            .map(|name| self.log_of(name))
            .collect();
        let mut plain = String::with_capacity(text.len());
        let mut chars = text.chars();
        while let Some(c) = chars.next() {
            if c == '\u{1b}' {
                // CSI: ESC [ parameters final-byte.
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            } else {
                plain.push(c);
            }
        }
        plain
    }

    /// A client of the control plane with a proxy's identity (id `id`), to ask it what only
    /// proxies may, as a misbehaving or skewed proxy would.
    pub fn proxy_client(&self, id: &str) -> envgate_proxy::controlplane::ControlPlane {
        envgate_proxy::controlplane::ControlPlane::new(
            &[format!("https://{}", self.grpc_addr)],
            &self.pki.proxy_tls(id),
            None,
            id.into(),
        )
        .expect("a control-plane client")
    }

    /// The last lines of every process's log, for failure messages.
    pub fn logs(&self) -> String {
        self.launcher
            .names()
            .iter()
            .map(|name| self.launcher.log_tail(name) + "\n")
            .collect()
    }

    // ---- observation -------------------------------------------------------------------

    /// This instance's containers (all states), optionally only those of `user`.
    pub fn containers(&self, user: Option<&str>) -> Vec<ContainerInfo> {
        let mut args = vec![
            "ps".to_string(),
            "-a".to_string(),
            "--no-trunc".to_string(),
            "--filter".to_string(),
            format!("label=envgate.instance={}", self.instance),
            "--format".to_string(),
            "{{.ID}}\t{{.Names}}\t{{.Label \"envgate.user\"}}\t{{.Label \"envgate.environment\"}}\t{{.State}}"
                .to_string(),
        ];
        if let Some(user) = user {
            args.push("--filter".to_string());
            args.push(format!("label=envgate.user={user}"));
        }
        docker(&args)
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|line| {
                let mut f = line.split('\t').map(str::to_string);
                ContainerInfo {
                    id: f.next().unwrap_or_default(),
                    name: f.next().unwrap_or_default(),
                    user: f.next().unwrap_or_default(),
                    environment: f.next().unwrap_or_default(),
                    state: f.next().unwrap_or_default(),
                }
            })
            .collect()
    }

    /// Waits (at most `timeout`) until `docker ps` no longer shows the container `id`.
    pub async fn wait_container_gone(&self, id: &str, timeout: Duration) {
        eventually(timeout, &format!("container {id} removed"), || async {
            let left = self.containers(None);
            if left.iter().any(|c| c.id == id) {
                Err(format!("{left:?}"))
            } else {
                Ok(())
            }
        })
        .await;
    }

    /// The name of `user`'s home volume in this instance.
    pub fn home_volume(&self, user: &str) -> String {
        format!("envgate-{}-home-{user}", self.instance)
    }

    pub fn volume_exists(&self, name: &str) -> bool {
        Command::new("docker")
            .args(["volume", "inspect", name])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    /// Panics unless `user`'s home volume is still there (after their container went).
    pub fn assert_home_volume_kept(&self, user: &str) {
        let volume = self.home_volume(user);
        assert!(
            self.volume_exists(&volume),
            "home volume {volume} was removed"
        );
    }

    /// Waits until some proxy's /metrics counts a connection that ended with `result`
    /// (`envgate_connections_total{result="…"}`).
    pub async fn wait_connections_counted(&self, result: &str, timeout: Duration) {
        let label = format!("result=\"{result}\"");
        eventually(
            timeout,
            &format!("a connection counted as {result}"),
            || async {
                for ops in &self.proxy_ops {
                    let body = Fleet::metrics(ops).await.unwrap_or_default();
                    if body
                        .lines()
                        .any(|l| l.starts_with("envgate_connections_total{") && l.contains(&label))
                    {
                        return Ok(());
                    }
                }
                Err(format!("no envgate_connections_total{{{label}}}"))
            },
        )
        .await;
    }

    /// Every etcd key under `ETCD_PREFIX` + `prefix`, without `ETCD_PREFIX`, with its value.
    pub async fn etcd_records(&self, prefix: &str) -> Result<Vec<(String, String)>, String> {
        let tls = self.launcher.etcd_tls().map_err(|e| e.to_string())?;
        let endpoints = self.launcher.etcd_endpoints();
        let full = format!("{ETCD_PREFIX}{prefix}");
        let read = async {
            let mut client = probe::etcd_client(&endpoints, &tls).await?;
            client
                .get(full, Some(etcd_client::GetOptions::new().with_prefix()))
                .await
        };
        let response = tokio::time::timeout(ETCD_TIMEOUT, read)
            .await
            .map_err(|_| "etcd read timed out".to_string())?
            .map_err(|e| format!("etcd read: {e}"))?;
        Ok(response
            .kvs()
            .iter()
            .map(|kv| {
                let key = String::from_utf8_lossy(kv.key());
                let key = key.strip_prefix(ETCD_PREFIX).unwrap_or(&key).to_string();
                (key, String::from_utf8_lossy(kv.value()).into_owned())
            })
            .collect())
    }

    /// Reads a proxy's or the control plane's Prometheus text.
    pub async fn metrics(ops_addr: &str) -> Option<String> {
        match http_get(ops_addr, "/metrics").await {
            Some((200, body)) => Some(body),
            _ => None,
        }
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// `--agent-dir` of the control plane: `<instance>/<container suffix>/{sock,secret}`.
    pub fn agent_dir(&self) -> PathBuf {
        self.dir.path().join("agents")
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "e2e fleet {} (dir {}):\n{}",
                self.instance,
                self.dir.path().display(),
                self.logs()
            );
        }
        // Stop the writers before removing what they manage, so nothing is recreated.
        self.launcher.kill_all();
        docker::remove_containers(&self.instance);
        docker::remove_volumes(&self.instance);
    }
}

/// Prints `ID=debian` in the Debian image; the BusyBox image has no `/etc/os-release`.
pub const WHICH: &str = "grep ^ID= /etc/os-release 2>/dev/null || echo ID=none";

/// The image (`debian` or `busybox`) a successful `WHICH` ran in.
pub fn landed_in(out: &SshOutput) -> &str {
    assert_eq!(out.code, Some(0), "ssh failed: {out:#?}");
    match out.stdout.trim() {
        "ID=debian" => "debian",
        "ID=none" => "busybox",
        other => panic!("neither image: {other:?} ({out:#?})"),
    }
}

/// An environment with the defaults the control plane fills in for the rest.
pub fn environment(name: &str, image: &str, shell: &str, is_default: bool) -> admin::Environment {
    admin::Environment {
        name: name.to_string(),
        description: format!("e2e {name}"),
        image: image.to_string(),
        shell: shell.to_string(),
        is_default,
        ..Default::default()
    }
}

/// A session started with `echo started; …` ended early (within `timeout`) with exactly the
/// notice it was given (see `told_at`).
pub async fn assert_told(ssh: tokio::task::JoinHandle<SshOutput>, timeout: Duration, notice: &str) {
    let out = tokio::time::timeout(timeout, ssh)
        .await
        .expect("the session ended early")
        .expect("ssh task");
    assert_eq!(out.stdout, "started\n", "{out:#?}");
    assert_ne!(out.code, Some(0), "{out:#?}");
    assert!(
        told_at(&out.stderr_lines(), notice).is_some(),
        "expected the notice {notice:?}: {out:#?}"
    );
}

/// The last of `lines` (stderr) that shows exactly `envgate: {notice}`: the stderr line the
/// proxy wrote, or OpenSSH's `Received disconnect from HOST port N:11: envgate: {notice}`.
pub fn told_at(lines: &[&str], notice: &str) -> Option<usize> {
    let line = format!("envgate: {notice}");
    let disconnect = format!(":11: {line}");
    lines.iter().rposition(|l| {
        *l == line || (l.starts_with("Received disconnect from ") && l.ends_with(&disconnect))
    })
}

/// An `ssh_key_argv` with `-o option` for each of `options` (before the `-- host` at its
/// end) and `command` (none if empty) after it.
fn with_options_and_command(mut argv: Vec<String>, options: &[&str], command: &str) -> Vec<String> {
    let at = argv.len() - 2;
    for (i, option) in options.iter().enumerate() {
        argv.insert(at + 2 * i, "-o".to_string());
        argv.insert(at + 2 * i + 1, option.to_string());
    }
    if !command.is_empty() {
        argv.push(command.to_string());
    }
    argv
}

/// Polls `probe` every 200 ms until it returns `Ok`, for at most `timeout`; panics with what
/// was being waited for and the last thing seen.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        match probe().await {
            Ok(value) => return value,
            Err(last) if Instant::now() >= deadline => {
                panic!("{what}: still not true after {timeout:?}; last seen: {last}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// Runs `argv` with `stdin` (or none) under `SSH_TIMEOUT`.
pub async fn run(argv: &[String], stdin: Option<&[u8]>, env: &[(&str, &str)]) -> SshOutput {
    let mut command = tokio::process::Command::new(&argv[0]);
    command
        .args(&argv[1..])
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    for (key, value) in env {
        command.env(key, value);
    }
    let mut child = command
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {argv:?}: {e}"));
    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().expect("piped stdin");
        let input = input.to_vec();
        tokio::spawn(async move {
            // The remote side may exit before reading everything; that is not our failure.
            let _ = pipe.write_all(&input).await;
            let _ = pipe.shutdown().await;
        });
    }
    let output = match tokio::time::timeout(SSH_TIMEOUT, child.wait_with_output()).await {
        Ok(Ok(output)) => output,
        Ok(Err(e)) => panic!("waiting for {argv:?}: {e}"),
        Err(_) => panic!("{argv:?} did not finish within {SSH_TIMEOUT:?}"),
    };
    SshOutput {
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stdout_bytes: output.stdout,
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        code: output.status.code(),
    }
}

pub fn proxy_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_envgate-proxy"))
}

/// The control plane binary sits beside the proxy's in the same target directory.
pub fn controlplane_bin() -> PathBuf {
    proxy_bin().with_file_name("envgate-controlplane")
}

/// The static agent: `ENVGATE_AGENT_STATIC_BIN` (set by `deploy/local/fleet test`), else
/// what `proxy/agent/build-static` leaves in `target/`.
pub fn agent_static_bin() -> Result<PathBuf, String> {
    let path = std::env::var_os("ENVGATE_AGENT_STATIC_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target/envgate-agent-static"));
    if path.is_file() {
        Ok(path)
    } else {
        Err(format!(
            "the static envgate-agent {} is missing: run `proxy/agent/build-static` or set \
             ENVGATE_AGENT_STATIC_BIN (`deploy/local/fleet test` does this)",
            path.display()
        ))
    }
}

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("proxy/ has a parent")
        .to_path_buf()
}

/// Builds the local images with `deploy/local/images` if one is missing (idempotent).
fn ensure_images() -> Result<(), String> {
    let present = |image: &str| {
        Command::new("docker")
            .args(["image", "inspect", image])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if present(BUSYBOX_IMAGE) && present(DEBIAN_IMAGE) {
        return Ok(());
    }
    let script = repo_root().join("deploy/local/images");
    let status = Command::new(&script)
        .arg("all")
        .status()
        .map_err(|e| format!("run {}: {e}", script.display()))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("{} all failed: {status}", script.display()))
    }
}

fn keygen(path: &Path) -> Result<(), String> {
    let status = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "envgate-e2e", "-f"])
        .arg(path)
        .stdin(Stdio::null())
        .status()
        .map_err(|e| format!("ssh-keygen: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("ssh-keygen failed: {status}"))
    }
}

fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

/// Runs the docker CLI and returns its stdout ("" if it failed).
fn docker(args: &[String]) -> String {
    Command::new("docker")
        .args(args)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

pub fn free_port() -> Result<u16, String> {
    envgate_fleet::free_port().map_err(|e| e.to_string())
}

/// A tmux server of its own, for tests that need a real terminal around `ssh -tt`.
pub struct Tmux {
    socket: PathBuf,
}

impl Tmux {
    /// Starts `argv` in a detached tmux session `width` x `height`.
    pub fn start(dir: &Path, argv: &[String], width: u16, height: u16) -> Tmux {
        let tmux = Tmux {
            socket: dir.join(format!("tmux-{:08x}.sock", rand::random::<u32>())),
        };
        let mut args = vec![
            "new-session".to_string(),
            "-d".to_string(),
            "-s".to_string(),
            "e2e".to_string(),
            "-x".to_string(),
            width.to_string(),
            "-y".to_string(),
            height.to_string(),
            "--".to_string(),
        ];
        args.extend(argv.iter().cloned());
        tmux.command(&args);
        tmux
    }

    fn command(&self, args: &[String]) -> String {
        let output = Command::new("tmux")
            .arg("-S")
            .arg(&self.socket)
            .args(args)
            .env("TERM", "xterm-256color")
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("tmux {args:?}: {e}"));
        assert!(
            output.status.success(),
            "tmux {args:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// Types `text` followed by Enter.
    pub fn type_line(&self, text: &str) {
        self.command(&[
            "send-keys".to_string(),
            "-t".to_string(),
            "e2e".to_string(),
            "-l".to_string(),
            text.to_string(),
        ]);
        self.command(&[
            "send-keys".to_string(),
            "-t".to_string(),
            "e2e".to_string(),
            "Enter".to_string(),
        ]);
    }

    /// Presses one key, in tmux's names (`C-c`).
    pub fn key(&self, key: &str) {
        self.command(&[
            "send-keys".to_string(),
            "-t".to_string(),
            "e2e".to_string(),
            key.to_string(),
        ]);
    }

    /// The visible screen plus scrollback.
    pub fn screen(&self) -> String {
        self.command(&[
            "capture-pane".to_string(),
            "-p".to_string(),
            "-J".to_string(),
            "-S".to_string(),
            "-200".to_string(),
            "-t".to_string(),
            "e2e".to_string(),
        ])
    }

    pub fn resize(&self, width: u16, height: u16) {
        self.command(&[
            "resize-window".to_string(),
            "-t".to_string(),
            "e2e".to_string(),
            "-x".to_string(),
            width.to_string(),
            "-y".to_string(),
            height.to_string(),
        ]);
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .arg("-S")
            .arg(&self.socket)
            .arg("kill-server")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// SHA-256 of `text` in hex, as the admin tokens file holds a token.
pub fn sha256_hex(data: impl AsRef<[u8]>) -> String {
    ring::digest::digest(&ring::digest::SHA256, data.as_ref())
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

impl Fleet {
    /// The argv of an `ssh` that logs in as `login` with whatever keys the ssh-agent at
    /// `agent_socket` holds, offered in the agent's order (no `-i`).
    pub fn ssh_agent_argv(&self, login: &str, agent_socket: &Path) -> Vec<String> {
        let mut argv = vec!["ssh".to_string()];
        let agent = format!("IdentityAgent={}", agent_socket.display());
        argv.extend(self.ssh_base_args().into_iter().map(|a| {
            if a == "IdentityAgent=none" {
                agent.clone()
            } else {
                a
            }
        }));
        argv.extend(
            [
                "-o",
                "BatchMode=yes",
                "-o",
                "PasswordAuthentication=no",
                "-o",
                "KbdInteractiveAuthentication=no",
                "-l",
                login,
                "--",
                "127.0.0.1",
            ]
            .iter()
            .map(|s| s.to_string()),
        );
        argv
    }
}

impl Fleet {
    /// The whole log of one process of the fleet (`controlplane`, `proxy-0`, …).
    pub fn log_of(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("{name}.log"))).unwrap_or_default()
    }

    /// The line of `process`'s log that names request id `id` (empty if none).
    pub fn log_line_with(&self, process: &str, id: &str) -> String {
        self.log_of(process)
            .lines()
            .find(|l| l.contains(id))
            .unwrap_or_default()
            .to_owned()
    }
}

/// A line users read for a failure on envgate's side: `text (request id XXXXXXXX)`; returns
/// the id, panicking with the line when it is anything else.
pub fn request_id_in<'a>(line: &'a str, text: &str) -> &'a str {
    let id = line
        .strip_prefix(text)
        .and_then(|rest| rest.strip_prefix(" (request id "))
        .and_then(|rest| rest.strip_suffix(')'))
        .unwrap_or_else(|| panic!("{line:?} is not {text:?} with a request id"));
    assert!(
        id.len() == 8 && id.chars().all(|c| c.is_ascii_hexdigit()),
        "{line:?}"
    );
    id
}

/// What users read when envgate is down somewhere.
pub const UNAVAILABLE_LINE: &str =
    "envgate: the service is temporarily unavailable; try again in a minute";

/// The words of envgate's internals a user must never read.
pub fn assert_no_internals(line: &str) {
    for word in [
        "grpc",
        "tonic",
        "etcd",
        "tcp",
        "docker",
        "Transport",
        "os error",
        "127.0.0.1",
    ] {
        assert!(
            !line.to_lowercase().contains(&word.to_lowercase()),
            "{word:?} leaks in {line:?}"
        );
    }
}

/// A real ssh-agent on a socket in the fleet's directory; killed when dropped.
pub struct SshAgent {
    pub socket: PathBuf,
    pid: String,
}

impl Drop for SshAgent {
    fn drop(&mut self) {
        let _ = std::process::Command::new("kill").arg(&self.pid).status();
    }
}

impl Fleet {
    /// Starts an ssh-agent holding `keys`, added in that order (the order a client offers
    /// them in).
    pub async fn ssh_agent(&self, keys: &[PathBuf]) -> SshAgent {
        let socket = self.dir().join(format!("agent-{}.sock", keys.len()));
        let socket_arg = socket.display().to_string();
        let agent = run(
            &["ssh-agent".into(), "-a".into(), socket_arg.clone()],
            None,
            &[],
        )
        .await;
        assert_eq!(agent.code, Some(0), "{agent:#?}");
        let pid = agent
            .stdout
            .split("SSH_AGENT_PID=")
            .nth(1)
            .and_then(|rest| rest.split(';').next())
            .expect("ssh-agent prints its pid")
            .to_owned();
        let agent = SshAgent { socket, pid };
        for key in keys {
            let added = run(
                &["ssh-add".into(), "-q".into(), key.display().to_string()],
                None,
                &[("SSH_AUTH_SOCK", socket_arg.as_str())],
            )
            .await;
            assert_eq!(added.code, Some(0), "{added:#?}");
        }
        agent
    }
}

/// `argv` (a program and its arguments) with `options` right after the program.
pub fn with_options(mut argv: Vec<String>, options: &[&str]) -> Vec<String> {
    for (i, option) in options.iter().enumerate() {
        argv.insert(1 + i, (*option).to_owned());
    }
    argv
}
