//! A small world for unit tests: memory store, scripted runtime, a catalogue, users and a
//! registered proxy.

use std::sync::Arc;
use std::time::Duration;

use envgate_proto::token::Claims;
use envgate_proto::v1::Placement;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::auth::Authenticator;
use crate::auth::tests::{test_keys, test_limits};
use crate::clock::{Clock, ManualClock, SystemClock};
use crate::error::PlacementError;
use crate::model::{
    self, CommandRecord, ContainerRecord, ContainerState, EnvironmentRecord, Mode, ProxyRecord,
    SessionKind, UserRecord,
};
use crate::placement::{OpenRequest, PlacementConfig, Placer};
use crate::reconcile::{ReconcileConfig, Reconciler};
use crate::runtime::ContainerSpec;
use crate::runtime::scripted::ScriptedRuntime;
use crate::store::{self, MemoryStore, Store};

pub const PROXY: &str = "proxy-1";

pub struct World {
    pub store: Arc<MemoryStore>,
    pub runtime: Arc<ScriptedRuntime>,
    pub auth: Arc<Authenticator>,
    pub lease: i64,
    /// What its placers and reconcilers judge time by (`SystemClock` unless
    /// [`World::with_manual_clock`]); the store's leases follow the system's.
    pub clock: Arc<dyn Clock>,
}

/// What creating alice's busybox container in `instance` asks of the runtime.
pub fn alices_busybox(instance: &str) -> ContainerSpec {
    ContainerSpec::new(instance, "alice", "busybox", "envgate/busybox:latest")
}

/// A `creating` claim an hour old, left by replica `owner` that died mid-way.
pub fn abandoned_claim(user: &str, environment: &str, owner: &str) -> ContainerRecord {
    let long_ago = model::now() - 3600;
    ContainerRecord {
        user: user.into(),
        environment: environment.into(),
        runtime: "scripted".into(),
        container_id: String::new(),
        container_name: String::new(),
        state: ContainerState::Creating,
        state_since: long_ago,
        created_at: long_ago,
        last_active_at: long_ago,
        session_id: String::new(),
        owner: owner.into(),
        agent_address: String::new(),
        agent_secret: String::new(),
        lifetime_warned_at: 0,
        uid: None,
    }
}

/// Placement as configured, but an open gives up after 20 s rather than 120 s.
pub fn fast() -> PlacementConfig {
    PlacementConfig {
        deadline: Duration::from_secs(20),
        ..PlacementConfig::default()
    }
}

/// The reconciler of the tests: instance `default`, a 100 ms interval, the usual grace times.
pub fn reconcile_config() -> ReconcileConfig {
    ReconcileConfig {
        instance: "default".into(),
        replica_id: "test".into(),
        interval: Duration::from_millis(100),
        stale_after: Duration::from_secs(90),
        orphan_grace: Duration::from_secs(60),
    }
}

pub fn environment(name: &str, mode: Mode) -> EnvironmentRecord {
    EnvironmentRecord {
        name: name.into(),
        image: format!("envgate/{name}:latest"),
        shell: "/bin/sh".into(),
        mode,
        idle_timeout_seconds: 900,
        ..Default::default()
    }
}

impl World {
    pub async fn new() -> World {
        let store = Arc::new(MemoryStore::new());
        let mut busybox = environment("busybox", Mode::Persistent);
        busybox.is_default = true;
        let mut debian = environment("debian", Mode::Persistent);
        debian.allowed_groups = vec!["staff".into()];
        let scratch = environment("scratch", Mode::Ephemeral);
        for env in [busybox, debian, scratch] {
            store::put_json(
                store.as_ref(),
                &model::environment_key(&env.name),
                &env,
                None,
            )
            .await
            .unwrap();
        }
        for (name, groups) in [("alice", vec!["students"]), ("carol", vec!["staff"])] {
            let user = UserRecord {
                name: name.into(),
                groups: groups.into_iter().map(String::from).collect(),
                ..Default::default()
            };
            store::put_json(store.as_ref(), &model::user_key(name), &user, None)
                .await
                .unwrap();
        }
        let lease = store.lease_grant(Duration::from_secs(600)).await.unwrap();
        let proxy = ProxyRecord {
            id: PROXY.into(),
            address: "127.0.0.1:2200".into(),
            version: "test".into(),
            capacity: 100,
            draining: false,
            sessions: 0,
            connections: 0,
            registered_at: model::now(),
            last_heartbeat_at: model::now(),
            lease_id: lease,
            incarnation: String::new(),
        };
        store::put_json(
            store.as_ref(),
            &model::proxy_key(PROXY),
            &proxy,
            Some(lease),
        )
        .await
        .unwrap();
        let auth = Arc::new(Authenticator::new(
            store.clone(),
            test_keys(),
            Duration::from_secs(300),
            test_limits(2, 64),
            envgate_proto::audit::AuditLog::in_memory(),
        ));
        World {
            store,
            runtime: Arc::new(ScriptedRuntime::new()),
            auth,
            lease,
            clock: Arc::new(SystemClock),
        }
    }

    /// A world whose placers and reconcilers judge time by the returned clock, which stands
    /// still at the system's time until the test advances it.
    pub async fn with_manual_clock() -> (World, Arc<ManualClock>) {
        let clock = Arc::new(ManualClock::starting_now());
        let world = World {
            clock: clock.clone(),
            ..World::new().await
        };
        (world, clock)
    }

    pub fn placer(&self, config: PlacementConfig) -> Arc<Placer> {
        self.placer_over(self.store.clone(), config)
    }

    /// A placer that reaches this world's store through `store` (one that counts, say).
    pub fn placer_over(&self, store: Arc<dyn Store>, config: PlacementConfig) -> Arc<Placer> {
        Arc::new(
            Placer::new(store, self.runtime.clone(), self.auth.clone(), config)
                .with_clock(self.clock.clone()),
        )
    }

    /// A reconciler over this world, configured as [`reconcile_config`].
    pub fn reconciler(&self) -> Reconciler {
        Reconciler::new(self.store.clone(), self.runtime.clone(), reconcile_config())
            .with_clock(self.clock.clone())
    }

    /// Starts `requests` at once, alternately on two "replicas" (placers with `config` over
    /// this one store), so only the store's transactions keep them apart. The handles are in
    /// the order of `requests`.
    pub fn open_on_two_replicas(
        &self,
        config: PlacementConfig,
        requests: Vec<OpenRequest>,
    ) -> Vec<JoinHandle<Result<Placement, PlacementError>>> {
        let replicas = [self.placer(config.clone()), self.placer(config)];
        requests
            .into_iter()
            .enumerate()
            .map(|(i, request)| {
                let placer = replicas[i % 2].clone();
                tokio::spawn(async move { placer.open(request, &no_progress).await })
            })
            .collect()
    }

    pub fn token(&self, user: &str) -> String {
        let groups = if user == "carol" {
            vec!["staff".into()]
        } else {
            vec!["students".into()]
        };
        let now = model::now();
        test_keys().sign(Claims {
            sub: user.into(),
            groups,
            iat: now,
            exp: now + 300,
            jti: "t".into(),
            aud: String::new(),
            kid: String::new(),
        })
    }

    pub fn request(&self, user: &str, environment: &str) -> OpenRequest {
        OpenRequest {
            token: self.token(user),
            environment: environment.into(),
            proxy_id: PROXY.into(),
            client_address: "192.0.2.1:40000".into(),
            connection_id: "conn".into(),
            kind: SessionKind::Shell,
            caller_gone: CancellationToken::new(),
            waited_in_line: Default::default(),
            reports_sessions: false,
        }
    }

    /// Changes the record stored under `key`, which must exist, behind everyone's back.
    async fn edit<T: Serialize + DeserializeOwned>(&self, key: &str, change: impl FnOnce(&mut T)) {
        let mut value: T = store::get_json(self.store.as_ref(), key)
            .await
            .unwrap()
            .unwrap()
            .value;
        change(&mut value);
        store::put_json(self.store.as_ref(), key, &value, None)
            .await
            .unwrap();
    }

    /// Changes one environment of the catalogue.
    pub async fn update_environment(
        &self,
        name: &str,
        change: impl FnOnce(&mut EnvironmentRecord),
    ) {
        self.edit(&model::environment_key(name), change).await;
    }

    /// Changes one placement record behind everyone's back (to age it, say).
    pub async fn edit_record(&self, key: &str, change: impl FnOnce(&mut ContainerRecord)) {
        self.edit(key, change).await;
    }

    pub async fn record(&self, key: &str) -> Option<ContainerRecord> {
        store::get_json(self.store.as_ref(), key)
            .await
            .unwrap()
            .map(|v| v.value)
    }

    /// The commands queued for proxies (`fleet::send_command`), by key.
    pub async fn commands(&self) -> Vec<(String, CommandRecord)> {
        store::range_json(self.store.as_ref(), model::COMMANDS)
            .await
            .unwrap()
            .into_iter()
            .map(|(key, v)| (key, v.value))
            .collect()
    }

    /// The ids of the containers the runtime has, in id order.
    pub fn container_ids(&self) -> Vec<String> {
        self.runtime
            .containers()
            .into_iter()
            .map(|(id, _)| id)
            .collect()
    }

    pub async fn keys(&self, prefix: &str) -> Vec<String> {
        self.store
            .range(prefix)
            .await
            .unwrap()
            .into_iter()
            .map(|kv| kv.key)
            .collect()
    }
}

pub fn no_progress(_: &str) {}
