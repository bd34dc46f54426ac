//! Placement end to end over gRPC with a real etcd and the real Docker engine: a proxy
//! attaches, authenticates a user by key, opens sessions concurrently; the container that
//! appears is checked as Docker sees it, then reaped when idle while the home volume stays.

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use bollard::Docker;
use bollard::query_parameters::{ListContainersOptions, RemoveContainerOptions};
use envgate_controlplane::clock::ManualClock;
use envgate_controlplane::model::{self, EnvironmentRecord, Mode, UserRecord};
use envgate_controlplane::runtime::DockerRuntime;
use envgate_controlplane::store::{self, EtcdStore, Store};
use envgate_controlplane::testkit::Etcd;
use envgate_proto::v1::auth_client::AuthClient;
use envgate_proto::v1::fleet_client::FleetClient;
use envgate_proto::v1::sessions_client::SessionsClient;
use envgate_proto::v1::{
    AuthenticateRequest, CloseSessionRequest, OpenSessionRequest, Placement, ProxyMessage,
    Register, SessionKind, authenticate_request, open_session_event, proxy_message,
};
use russh::keys::ssh_key::PrivateKey;
use russh::keys::ssh_key::private::Ed25519Keypair;
use tonic::Code;
use tonic::transport::Channel;

const IMAGE: &str = "envgate/busybox:latest";
/// The proxy `common::Running::channel` speaks as (its certificate names it).
const PROXY: &str = common::PROXY;

/// Removes whatever this test's instance left in Docker, even when an assertion failed.
struct Cleanup {
    docker: Docker,
    instance: String,
    volume: String,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let docker = self.docker.clone();
        let instance = self.instance.clone();
        let volume = self.volume.clone();
        let cleanup = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let filters = HashMap::from([(
                    "label".to_owned(),
                    vec![format!("envgate.instance={instance}")],
                )]);
                let options = ListContainersOptions {
                    all: true,
                    filters: Some(filters),
                    ..Default::default()
                };
                for c in docker
                    .list_containers(Some(options))
                    .await
                    .unwrap_or_default()
                {
                    let force = RemoveContainerOptions {
                        force: true,
                        ..Default::default()
                    };
                    let _ = docker
                        .remove_container(&c.id.unwrap_or_default(), Some(force))
                        .await;
                }
                let _ = docker
                    .remove_volume(
                        &volume,
                        None::<bollard::query_parameters::RemoveVolumeOptions>,
                    )
                    .await;
            });
        });
        let _ = cleanup.join();
    }
}

async fn image_available(docker: &Docker) -> bool {
    if docker.inspect_image(IMAGE).await.is_ok() {
        return true;
    }
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/local/images");
    if !script.exists() {
        return false;
    }
    let built = tokio::process::Command::new(&script)
        .arg("busybox")
        .status();
    matches!(tokio::time::timeout(Duration::from_secs(300), built).await, Ok(Ok(s)) if s.success())
        && docker.inspect_image(IMAGE).await.is_ok()
}

async fn open(
    channel: Channel,
    token: String,
    environment: &str,
) -> Result<Placement, tonic::Status> {
    let mut sessions = SessionsClient::new(channel);
    let request = OpenSessionRequest {
        token,
        environment: environment.into(),
        client_address: "127.0.0.1:50000".into(),
        connection_id: "c".into(),
        session_kind: SessionKind::Exec.into(),
        ..Default::default()
    };
    let mut events = sessions.open_session(request).await?.into_inner();
    while let Some(event) = tokio::time::timeout(Duration::from_secs(120), events.message())
        .await
        .map_err(|_| tonic::Status::deadline_exceeded("no event"))??
    {
        match event.event {
            Some(open_session_event::Event::Placement(p)) => return Ok(p),
            Some(open_session_event::Event::Progress(_)) | None => {}
        }
    }
    Err(tonic::Status::internal("stream ended without a placement"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_opens_share_one_hardened_container_that_is_reaped_when_idle() {
    let runtime = DockerRuntime::connect(None)
        .await
        .expect("Docker must be running for this test (deploy/local/fleet test starts it)");
    let docker = runtime.docker().await.unwrap().clone();
    assert!(
        image_available(&docker).await,
        "{IMAGE} is missing and deploy/local/images could not build it"
    );
    let instance = format!("t{:08x}", rand::random::<u32>());
    let _cleanup = Cleanup {
        docker: docker.clone(),
        instance: instance.clone(),
        volume: format!("envgate-{instance}-home-alice"),
    };

    let etcd = Etcd::start().await.expect("etcd starts");
    let store: Arc<dyn Store> = Arc::new(
        EtcdStore::connect(&etcd.config(), "/envgate/", Duration::from_secs(5))
            .await
            .unwrap(),
    );
    let key = PrivateKey::from(Ed25519Keypair::from_seed(&[7; 32]));
    let alice = UserRecord {
        name: "alice".into(),
        authorized_keys: vec![key.public_key().to_openssh().unwrap()],
        groups: vec!["students".into()],
        ..Default::default()
    };
    store::put_json(store.as_ref(), &model::user_key("alice"), &alice, None)
        .await
        .unwrap();
    let busybox = EnvironmentRecord {
        name: "busybox".into(),
        image: IMAGE.into(),
        shell: "/bin/sh".into(),
        mode: Mode::Persistent,
        idle_timeout_seconds: 900,
        is_default: true,
        ..Default::default()
    };
    store::put_json(
        store.as_ref(),
        &model::environment_key("busybox"),
        &busybox,
        None,
    )
    .await
    .unwrap();
    let missing = EnvironmentRecord {
        name: "missing".into(),
        // Not on this host, and its registry (a closed loopback port) refuses at once: tests
        // send nothing beyond loopback.
        image: "127.0.0.1:1/envgate/missing:latest".into(),
        ..busybox.clone()
    };
    store::put_json(
        store.as_ref(),
        &model::environment_key("missing"),
        &missing,
        None,
    )
    .await
    .unwrap();

    // Idle time is judged by this clock: the test advances it instead of sleeping.
    let clock = Arc::new(ManualClock::starting_now());
    let plane =
        common::start_with_clock(store.clone(), Arc::new(runtime), &instance, clock.clone()).await;
    let channel = plane.channel().await;

    // A proxy attaches and stays attached for the whole test.
    let (to_plane, outbound) = tokio::sync::mpsc::channel(4);
    to_plane
        .send(ProxyMessage {
            message: Some(proxy_message::Message::Register(Register {
                address: "127.0.0.1:2200".into(),
                version: "test".into(),
                capacity: 10,
                incarnation: "test".into(),
            })),
        })
        .await
        .unwrap();
    let _commands = FleetClient::new(channel.clone())
        .attach(tokio_stream::wrappers::ReceiverStream::new(outbound))
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while store.get(&model::proxy_key(PROXY)).await.unwrap().is_none() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "proxy never registered"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let token = AuthClient::new(channel.clone())
        .authenticate(AuthenticateRequest {
            username: "alice".into(),
            credential: Some(authenticate_request::Credential::PublicKey(
                key.public_key().to_bytes().unwrap(),
            )),
            client_address: "127.0.0.1:50000".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .token;

    let opens: Vec<_> = (0..8)
        .map(|_| tokio::spawn(open(channel.clone(), token.clone(), "busybox")))
        .collect();
    let mut placements = Vec::new();
    for open in opens {
        placements.push(open.await.unwrap().expect("placed"));
    }
    let ids: HashSet<&str> = placements.iter().map(|p| p.container_id.as_str()).collect();
    assert_eq!(ids.len(), 1, "{ids:?}");
    assert_eq!(placements.iter().filter(|p| p.created).count(), 1);
    let id = placements[0].container_id.clone();
    assert!(
        placements[0]
            .container_name
            .starts_with(&format!("envgate-{instance}-alice-busybox-"))
    );

    let info = docker.inspect_container(&id, None).await.unwrap();
    assert_eq!(info.state.as_ref().and_then(|s| s.running), Some(true));
    let labels = info.config.as_ref().and_then(|c| c.labels.clone()).unwrap();
    for (k, v) in [
        ("envgate.managed-by", "envgate"),
        ("envgate.instance", instance.as_str()),
        ("envgate.user", "alice"),
        ("envgate.environment", "busybox"),
    ] {
        assert_eq!(labels.get(k).map(String::as_str), Some(v), "label {k}");
    }
    let host = info.host_config.as_ref().unwrap();
    assert_eq!(host.init, Some(true));
    assert_eq!(
        host.security_opt.as_deref(),
        Some(&["no-new-privileges".to_owned()][..])
    );
    assert_eq!(host.cap_drop.as_deref(), Some(&["ALL".to_owned()][..]));
    let mut caps = host.cap_add.clone().unwrap();
    caps.sort();
    assert_eq!(
        caps,
        [
            "CHOWN",
            "DAC_OVERRIDE",
            "FOWNER",
            "KILL",
            "SETGID",
            "SETUID"
        ]
    );
    assert_eq!(host.pids_limit, Some(512));
    let mounts = info.mounts.unwrap_or_default();
    let home = mounts
        .iter()
        .find(|m| m.destination.as_deref() == Some("/home/alice"))
        .expect("home mounted");
    assert_eq!(
        home.name.as_deref(),
        Some(format!("envgate-{instance}-home-alice").as_str())
    );

    // A missing image is pulled; with no registry reachable that is a clear FAILED_PRECONDITION
    // naming the environment and the image (Docker's reason is logged under the request id),
    // with nothing left behind.
    let status = open(channel.clone(), token.clone(), "missing")
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert!(
        status.message().starts_with(
            r#"environment "missing" cannot start: its image 127.0.0.1:1/envgate/missing:latest could not be pulled (request id "#
        ),
        "{}",
        status.message()
    );
    assert!(
        store
            .get(&model::container_key("alice", "missing"))
            .await
            .unwrap()
            .is_none()
    );

    // Close every session; after the 900 s idle timeout the reaper removes the container.
    let mut sessions = SessionsClient::new(channel.clone());
    for p in &placements {
        sessions
            .close_session(CloseSessionRequest {
                session_id: p.session_id.clone(),
                exit_status: 0,
                container_unreachable: false,
            })
            .await
            .unwrap();
    }
    let reconciler = plane.plane.reconciler();
    clock.advance(Duration::from_secs(899));
    let actions = reconciler.reconcile().await.unwrap();
    assert_eq!(actions.reaped_idle, 0, "idle for 899 of 900 s: {actions:?}");
    docker
        .inspect_container(&id, None)
        .await
        .expect("a container idle for less than its timeout stays");
    clock.advance(Duration::from_secs(1));
    let actions = reconciler.reconcile().await.unwrap();
    assert_eq!(actions.reaped_idle, 1, "{actions:?}");
    let gone = docker.inspect_container(&id, None).await;
    assert!(
        matches!(
            gone,
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404,
                ..
            })
        ),
        "container still exists: {gone:?}"
    );
    assert!(
        store
            .get(&model::container_key("alice", "busybox"))
            .await
            .unwrap()
            .is_none()
    );
    docker
        .inspect_volume(&format!("envgate-{instance}-home-alice"))
        .await
        .expect("the home volume survives reaping");
    plane.stop().await;
}
