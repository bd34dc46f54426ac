//! Starts an in-process control plane on 127.0.0.1:0 for integration tests.

#![allow(dead_code)]

pub mod binary;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use envgate_controlplane::auth::HashCost;
use envgate_controlplane::clock::{Clock, SystemClock};
use envgate_controlplane::guard::AdminTokens;
use envgate_controlplane::runtime::Runtime;
use envgate_controlplane::runtime::docker::network::UserNetwork;
use envgate_controlplane::runtime::scripted::ScriptedRuntime;
use envgate_controlplane::store::{EtcdConfig, EtcdStore, Store};
use envgate_controlplane::testkit::{Etcd, TestPki};
use envgate_controlplane::throttle::ThrottlePolicy;
use envgate_controlplane::{Config, ControlPlane};
use envgate_proto::audit::AuditLog;
use envgate_proto::token::{self, TokenKey, TokenKeys};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

pub const SEED: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";
pub const ADMIN_TOKEN: &str = "test-admin-token";
/// The name `ADMIN_TOKEN` carries in the audit log.
pub const ADMIN_NAME: &str = "test-admin";
/// The proxy `Running::channel` speaks as.
pub const PROXY: &str = "p1";

/// The admin tokens file: `ADMIN_NAME` with `ADMIN_TOKEN`.
pub fn admin_tokens_file() -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, ADMIN_TOKEN.as_bytes());
    let hex: String = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    format!("{ADMIN_NAME} sha256:{hex}\n")
}

/// A token for `user` as the control plane of `instance` signs it (key `SEED`).
pub fn token(instance: &str, user: &str) -> String {
    let key = TokenKey::from_hex_seed(SEED).unwrap();
    let keys = TokenKeys::new(vec![key], token::audience(instance)).unwrap();
    let now = envgate_controlplane::model::now();
    keys.sign(token::Claims {
        sub: user.into(),
        groups: vec![],
        iat: now,
        exp: now + 60,
        jti: "j".into(),
        aud: String::new(),
        kid: String::new(),
    })
}

pub struct Running {
    pub addr: SocketAddr,
    pub plane: Arc<ControlPlane>,
    pub shutdown: CancellationToken,
    pub pki: Arc<TestPki>,
    /// What the control plane wrote to its audit log.
    pub audit: AuditLog,
    server: tokio::task::JoinHandle<()>,
}

impl Running {
    /// A channel as proxy `PROXY` (admin calls work on it too, with the admin token).
    pub async fn channel(&self) -> Channel {
        self.proxy_channel(PROXY).await
    }

    pub async fn proxy_channel(&self, id: &str) -> Channel {
        self.pki.proxy_channel(&self.addr.to_string(), id).await
    }

    /// TLS without a client certificate: an operator, or anyone who can reach the port.
    pub async fn anonymous_channel(&self) -> Channel {
        self.pki.anonymous_channel(&self.addr.to_string()).await
    }

    pub async fn stop(self) {
        self.shutdown.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(10), self.server).await;
    }
}

pub fn config(instance: &str, pki: &TestPki, audit: AuditLog) -> Config {
    let key = TokenKey::from_hex_seed(SEED).unwrap();
    Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        ops_listen: "127.0.0.1:0".parse().unwrap(),
        etcd: EtcdConfig {
            endpoints: vec![],
            tls: None,
        },
        etcd_prefix: "/envgate/".into(),
        etcd_timeout: Duration::from_secs(5),
        tls: pki.server_tls(),
        token_keys: Arc::new(TokenKeys::new(vec![key], token::audience(instance)).unwrap()),
        token_ttl: Duration::from_secs(300),
        admin_tokens: Arc::new(AdminTokens::parse(&admin_tokens_file()).unwrap()),
        audit,
        instance: instance.into(),
        docker_host: None,
        create_concurrency: 8,
        recordings_dir: None,
        docker_network: Some(UserNetwork::default()),
        image_pull_timeout: Duration::from_secs(600),
        max_containers_per_user: 0,
        agent: None,
        home_slots_dir: None,
        kubernetes: None,
        reconcile_interval: Duration::from_secs(1),
        orphan_grace: Duration::from_secs(60),
        replica_id: "test-replica".into(),
        hash_cost: HashCost {
            memory_kib: 256,
            iterations: 1,
        },
        hash_threads: 2,
        hash_queue: 32,
        throttle: ThrottlePolicy::default(),
        environments: Vec::new(),
        identity: Default::default(),
        certificates: Default::default(),
        clock: Arc::new(SystemClock),
    }
}

pub async fn start(store: Arc<dyn Store>, runtime: Arc<dyn Runtime>, instance: &str) -> Running {
    start_with(store, runtime, instance, Arc::new(TestPki::new().unwrap())).await
}

/// `start` with the fleet CA `pki` (replicas of one fleet share it).
pub async fn start_with(
    store: Arc<dyn Store>,
    runtime: Arc<dyn Runtime>,
    instance: &str,
    pki: Arc<TestPki>,
) -> Running {
    start_configured(store, runtime, instance, pki, |_| {}).await
}

/// `start` on `clock`, which the test advances instead of sleeping past timeouts.
pub async fn start_with_clock(
    store: Arc<dyn Store>,
    runtime: Arc<dyn Runtime>,
    instance: &str,
    clock: Arc<dyn Clock>,
) -> Running {
    let pki = Arc::new(TestPki::new().unwrap());
    start_configured(store, runtime, instance, pki, |config| config.clock = clock).await
}

async fn start_configured(
    store: Arc<dyn Store>,
    runtime: Arc<dyn Runtime>,
    instance: &str,
    pki: Arc<TestPki>,
    edit: impl FnOnce(&mut Config),
) -> Running {
    let audit = AuditLog::in_memory();
    let mut config = config(instance, &pki, audit.clone());
    edit(&mut config);
    let plane = Arc::new(ControlPlane::new(store, runtime, &config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let server = {
        let plane = plane.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            plane.serve(listener, shutdown).await.expect("server runs");
        })
    };
    Running {
        addr,
        plane,
        shutdown,
        pki,
        audit,
        server,
    }
}

/// `message` carrying the admin token, as every Admin call must.
pub fn admin_request<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    let value = format!("Bearer {ADMIN_TOKEN}")
        .parse()
        .expect("ASCII token");
    request
        .metadata_mut()
        .insert(envgate_proto::metadata::AUTHORIZATION, value);
    request
}

/// A fresh etcd and a control plane on it (keys under `/{instance}/`) with a scripted
/// runtime: for tests of the API, not of containers.
pub async fn with_etcd(instance: &str) -> (Etcd, Running) {
    let etcd = Etcd::start().await.expect("etcd starts");
    let store = EtcdStore::connect(
        &etcd.config(),
        &format!("/{instance}/"),
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    let plane = start(Arc::new(store), Arc::new(ScriptedRuntime::new()), instance).await;
    (etcd, plane)
}
