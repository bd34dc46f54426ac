//! Starts an in-process control plane on 127.0.0.1:0 for integration tests.

#![allow(dead_code)]

pub mod binary;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use envgate_controlplane::auth::HashCost;
use envgate_controlplane::runtime::Runtime;
use envgate_controlplane::runtime::scripted::ScriptedRuntime;
use envgate_controlplane::store::{EtcdStore, Store};
use envgate_controlplane::testkit::Etcd;
use envgate_controlplane::{Config, ControlPlane};
use envgate_proto::token::TokenKey;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

pub const SEED: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";
pub const ADMIN_TOKEN: &str = "test-admin-token";

pub struct Running {
    pub addr: SocketAddr,
    pub plane: Arc<ControlPlane>,
    pub shutdown: CancellationToken,
    server: tokio::task::JoinHandle<()>,
}

impl Running {
    pub async fn channel(&self) -> Channel {
        tokio::time::timeout(
            Duration::from_secs(5),
            Channel::from_shared(format!("http://{}", self.addr))
                .unwrap()
                .connect(),
        )
        .await
        .expect("connect in time")
        .expect("connect")
    }

    pub async fn stop(self) {
        self.shutdown.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(10), self.server).await;
    }
}

pub fn config(instance: &str) -> Config {
    Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        ops_listen: "127.0.0.1:0".parse().unwrap(),
        etcd_endpoints: vec![],
        etcd_prefix: "/envgate/".into(),
        etcd_timeout: Duration::from_secs(5),
        token_key: Arc::new(TokenKey::from_hex_seed(SEED).unwrap()),
        token_ttl: Duration::from_secs(300),
        admin_token: ADMIN_TOKEN.into(),
        instance: instance.into(),
        docker_host: None,
        docker_create_concurrency: 8,
        image_pull_timeout: Duration::from_secs(600),
        max_containers_per_user: 0,
        agent: None,
        home_slots_dir: None,
        reconcile_interval: Duration::from_secs(1),
        orphan_grace: Duration::from_secs(60),
        replica_id: "test-replica".into(),
        hash_cost: HashCost {
            memory_kib: 256,
            iterations: 1,
        },
        environments: Vec::new(),
    }
}

pub async fn start(store: Arc<dyn Store>, runtime: Arc<dyn Runtime>, instance: &str) -> Running {
    let plane = Arc::new(ControlPlane::new(store, runtime, &config(instance)));
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
        &[etcd.endpoint()],
        &format!("/{instance}/"),
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    let plane = start(Arc::new(store), Arc::new(ScriptedRuntime::new()), instance).await;
    (etcd, plane)
}
