//! The Fleet stream over gRPC with a real etcd: registration, heartbeats, commands, and the
//! proxy lease that keeps sessions alive across a reconnect to another replica.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::admin_request;
use envgate_controlplane::fleet::PROXY_LEASE_TTL;
use envgate_controlplane::model::{self, ProxyRecord};
use envgate_controlplane::runtime::scripted::ScriptedRuntime;
use envgate_controlplane::store::{self, EtcdStore, Store};
use envgate_controlplane::testkit::{Etcd, TestPki};
use envgate_proto::v1::fleet_client::FleetClient;
use envgate_proto::v1::{
    FleetCommand, Heartbeat, KillSession, ProxyMessage, Register, fleet_command, proxy_message,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Streaming};

const WAIT: Duration = Duration::from_secs(10);

fn register() -> ProxyMessage {
    register_as("first")
}

/// `incarnation` stands for one proxy process. Which proxy registers is the certificate's
/// business (`attach`), not the message's.
fn register_as(incarnation: &str) -> ProxyMessage {
    ProxyMessage {
        message: Some(proxy_message::Message::Register(Register {
            address: "127.0.0.1:2200".into(),
            version: "1.0".into(),
            capacity: 100,
            incarnation: incarnation.into(),
        })),
    }
}

fn heartbeat(sessions: u32) -> ProxyMessage {
    ProxyMessage {
        message: Some(proxy_message::Message::Heartbeat(Heartbeat {
            sessions,
            connections: sessions + 1,
            draining: true,
        })),
    }
}

/// Opens a Fleet stream as proxy `id` (its certificate); dropping the sender ends it.
async fn attach(
    plane: &common::Running,
    id: &str,
    first: ProxyMessage,
) -> Result<(mpsc::Sender<ProxyMessage>, Streaming<FleetCommand>), tonic::Status> {
    let (tx, rx) = mpsc::channel(8);
    tx.send(first).await.unwrap();
    let commands = FleetClient::new(plane.proxy_channel(id).await)
        .attach(ReceiverStream::new(rx))
        .await?
        .into_inner();
    Ok((tx, commands))
}

async fn proxy_record(store: &dyn Store, id: &str) -> Option<ProxyRecord> {
    store::get_json::<ProxyRecord>(store, &model::proxy_key(id))
        .await
        .unwrap()
        .map(|v| v.value)
}

async fn until<F: AsyncFn() -> bool>(what: &str, limit: Duration, check: F) {
    let deadline = tokio::time::Instant::now() + limit;
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn etcd_store(etcd: &Etcd) -> Arc<dyn Store> {
    Arc::new(
        EtcdStore::connect(&etcd.config(), "/fleet-test/", Duration::from_secs(5))
            .await
            .unwrap(),
    )
}

/// Two control-plane replicas over one etcd (one fleet CA), and a store handle for the
/// test's own reads.
async fn two_replicas(etcd: &Etcd) -> (Arc<dyn Store>, common::Running, common::Running) {
    let store = etcd_store(etcd).await;
    let pki = Arc::new(TestPki::new().unwrap());
    let runtime = || Arc::new(ScriptedRuntime::new());
    let replica_a = common::start_with(store.clone(), runtime(), "fleet", pki.clone()).await;
    let replica_b = common::start_with(etcd_store(etcd).await, runtime(), "fleet", pki).await;
    (store, replica_a, replica_b)
}

#[tokio::test]
async fn the_first_message_must_be_register() {
    let etcd = Etcd::start().await.unwrap();
    let plane = common::start(
        etcd_store(&etcd).await,
        Arc::new(ScriptedRuntime::new()),
        "fleet",
    )
    .await;
    let err = attach(&plane, "p1", heartbeat(1))
        .await
        .expect_err("refused");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(err.message(), "the first message must be Register");
    plane.stop().await;
}

#[tokio::test]
async fn heartbeats_are_recorded_and_commands_delivered() {
    let etcd = Etcd::start().await.unwrap();
    let store = etcd_store(&etcd).await;
    let plane = common::start(store.clone(), Arc::new(ScriptedRuntime::new()), "fleet").await;
    let (tx, mut commands) = attach(&plane, "p1", register()).await.unwrap();
    until("registration", WAIT, async || {
        proxy_record(store.as_ref(), "p1").await.is_some()
    })
    .await;
    tx.send(heartbeat(7)).await.unwrap();
    until("heartbeat", WAIT, async || {
        proxy_record(store.as_ref(), "p1")
            .await
            .is_some_and(|p| p.sessions == 7 && p.connections == 8 && p.draining)
    })
    .await;

    assert_eq!(plane.plane.fleet().attached(), ["p1"]);
    let kill = FleetCommand {
        command: Some(fleet_command::Command::KillSession(KillSession {
            session_id: "s1".into(),
            message: "bye".into(),
        })),
    };
    assert!(plane.plane.fleet().send("p1", kill.clone()));
    assert!(!plane.plane.fleet().send("nobody", kill.clone()));
    let got = tokio::time::timeout(WAIT, commands.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(got, kill);

    drop(tx);
    until("detach", WAIT, async || {
        plane.plane.fleet().attached().is_empty()
    })
    .await;
    plane.stop().await;
}

/// Attaches proxy `p1` and puts `sessions/s1` under its lease, standing in for a session
/// placed through it. Dropping the returned sender (or the command stream) ends the stream.
async fn attach_with_session(
    replica: &common::Running,
    store: &dyn Store,
    message: ProxyMessage,
) -> (
    mpsc::Sender<ProxyMessage>,
    Streaming<FleetCommand>,
    ProxyRecord,
) {
    let (tx, commands) = attach(replica, "p1", message).await.unwrap();
    until("registration", WAIT, async || {
        proxy_record(store, "p1").await.is_some()
    })
    .await;
    let record = proxy_record(store, "p1").await.unwrap();
    store
        .put("sessions/s1", b"{}".to_vec(), Some(record.lease_id))
        .await
        .unwrap();
    (tx, commands, record)
}

/// A proxy that reconnects to another replica within the lease TTL keeps its lease and with
/// it the sessions placed through it; one that stays away loses them.
#[tokio::test]
async fn a_reconnecting_proxy_keeps_its_lease_and_a_vanished_one_loses_it() {
    let etcd = Etcd::start().await.unwrap();
    let (store, replica_a, replica_b) = two_replicas(&etcd).await;

    let (tx, _commands, first) = attach_with_session(&replica_a, store.as_ref(), register()).await;

    drop(tx);
    replica_a.stop().await;
    let (tx, _commands) = attach(&replica_b, "p1", register()).await.unwrap();
    until("re-registration", WAIT, async || {
        proxy_record(store.as_ref(), "p1")
            .await
            .is_some_and(|p| p.last_heartbeat_at >= first.last_heartbeat_at)
    })
    .await;
    let second = proxy_record(store.as_ref(), "p1").await.unwrap();
    assert_eq!(second.lease_id, first.lease_id, "the lease is reused");
    assert_eq!(second.registered_at, first.registered_at);

    // Kept alive by replica B past the 10 s TTL. etcd judges its leases by its own clock, which
    // no injected clock moves: only waiting out the TTL (plus a second for etcd's expiry
    // check) proves the keep-alive. The same logic runs against the in-memory store with a
    // manual clock in `fleet::tests`.
    tokio::time::sleep(PROXY_LEASE_TTL + Duration::from_secs(1)).await;
    assert!(
        store.get("sessions/s1").await.unwrap().is_some(),
        "session survived the reconnect"
    );

    // The proxy goes away for good: its record and sessions expire with the lease (etcd's
    // clock again: waited for, up to the TTL and etcd's expiry check).
    drop(tx);
    until("lease expiry", Duration::from_secs(25), async || {
        store.get("sessions/s1").await.unwrap().is_none()
            && proxy_record(store.as_ref(), "p1").await.is_none()
    })
    .await;
    replica_b.stop().await;
}

/// A proxy restarted under the same id does not adopt its predecessor's sessions: they died
/// with the old process, so they are released at once instead of blocking idle reaping.
#[tokio::test]
async fn a_restarted_proxy_releases_its_predecessors_sessions_at_once() {
    let etcd = Etcd::start().await.unwrap();
    let (store, replica_a, replica_b) = two_replicas(&etcd).await;

    let (tx, _commands, first) =
        attach_with_session(&replica_a, store.as_ref(), register_as("old")).await;
    drop(tx);

    let (_tx, _commands) = attach(&replica_b, "p1", register_as("new")).await.unwrap();
    until("the predecessor's session is released", WAIT, async || {
        store.get("sessions/s1").await.unwrap().is_none()
    })
    .await;
    let second = proxy_record(store.as_ref(), "p1").await.unwrap();
    assert_ne!(
        second.lease_id, first.lease_id,
        "a new lease for a new process"
    );
    assert_eq!(second.incarnation, "new");
    replica_a.stop().await;
    replica_b.stop().await;
}

/// Disabling a user through one replica tells proxies attached to any replica.
#[tokio::test]
async fn revocations_reach_proxies_on_every_replica() {
    use envgate_proto::admin::v1 as pb;
    use envgate_proto::admin::v1::admin_client::AdminClient;

    let etcd = Etcd::start().await.unwrap();
    let (store, replica_a, replica_b) = two_replicas(&etcd).await;
    let (_tx, mut commands) = attach(&replica_b, "p1", register()).await.unwrap();
    until("registration", WAIT, async || {
        proxy_record(store.as_ref(), "p1").await.is_some()
    })
    .await;

    AdminClient::new(replica_a.channel().await)
        .put_user(admin_request(pb::PutUserRequest {
            user: Some(pb::User {
                name: "mallory".into(),
                disabled: true,
                ..Default::default()
            }),
            password: String::new(),
            clear_password: false,
        }))
        .await
        .unwrap();

    let got = next_command(&mut commands).await;
    let expected = FleetCommand {
        command: Some(fleet_command::Command::RevokeUser(
            envgate_proto::v1::RevokeUser {
                user: "mallory".into(),
            },
        )),
    };
    assert_eq!(got, expected);
    replica_a.stop().await;
    replica_b.stop().await;
}

async fn next_command(commands: &mut Streaming<FleetCommand>) -> FleetCommand {
    tokio::time::timeout(WAIT, commands.message())
        .await
        .expect("a command in time")
        .unwrap()
        .expect("the stream is open")
}

/// DrainProxy and KillSession called on one replica reach a proxy attached to another, and a
/// command for a proxy that is between streams waits for it to attach.
#[tokio::test]
async fn admin_commands_reach_proxies_on_every_replica() {
    use envgate_proto::admin::v1 as pb;
    use envgate_proto::admin::v1::admin_client::AdminClient;
    use envgate_proto::v1::Drain;

    let etcd = Etcd::start().await.unwrap();
    let (store, replica_a, replica_b) = two_replicas(&etcd).await;
    let (tx, mut commands) = attach(&replica_b, "p1", register()).await.unwrap();
    until("registration", WAIT, async || {
        proxy_record(store.as_ref(), "p1").await.is_some()
    })
    .await;
    let session = model::SessionRecord {
        id: "s1".into(),
        user: "alice".into(),
        environment: "debian".into(),
        container_key: model::container_key("alice", "debian"),
        container_id: "c1".into(),
        proxy_id: "p1".into(),
        client_address: "192.0.2.1:5000".into(),
        connection_id: "conn1".into(),
        kind: model::SessionKind::Shell,
        started_at: model::now(),
    };
    store::put_json(store.as_ref(), &model::session_key("s1"), &session, None)
        .await
        .unwrap();

    let mut admin = AdminClient::new(replica_a.channel().await);
    admin
        .kill_session(admin_request(pb::KillSessionRequest {
            session_id: "s1".into(),
            message: "maintenance at noon".into(),
        }))
        .await
        .unwrap();
    assert_eq!(
        next_command(&mut commands).await,
        FleetCommand {
            command: Some(fleet_command::Command::KillSession(KillSession {
                session_id: "s1".into(),
                message: "maintenance at noon".into(),
            })),
        }
    );
    admin
        .drain_proxy(admin_request(pb::DrainProxyRequest {
            proxy_id: "p1".into(),
            grace_seconds: 45,
        }))
        .await
        .unwrap();
    let drain = |grace_seconds| FleetCommand {
        command: Some(fleet_command::Command::Drain(Drain { grace_seconds })),
    };
    assert_eq!(next_command(&mut commands).await, drain(45));
    assert!(
        store.range(model::COMMANDS).await.unwrap().is_empty(),
        "delivered commands are removed"
    );

    // Between streams: the command waits in etcd and is delivered on the next attach.
    drop(tx);
    drop(commands);
    until("detach", WAIT, async || {
        replica_b.plane.fleet().attached().is_empty()
    })
    .await;
    admin
        .drain_proxy(admin_request(pb::DrainProxyRequest {
            proxy_id: "p1".into(),
            grace_seconds: 0,
        }))
        .await
        .unwrap();
    assert_eq!(
        store.range(model::COMMANDS).await.unwrap().len(),
        1,
        "kept in etcd while its proxy is away"
    );
    let (_tx, mut commands) = attach(&replica_a, "p1", register()).await.unwrap();
    assert_eq!(next_command(&mut commands).await, drain(30));
    assert!(
        store.range(model::COMMANDS).await.unwrap().is_empty(),
        "delivered on attach, then removed"
    );

    let missing = admin
        .drain_proxy(admin_request(pb::DrainProxyRequest {
            proxy_id: "p9".into(),
            grace_seconds: 0,
        }))
        .await
        .expect_err("unknown proxy");
    assert_eq!(missing.code(), Code::NotFound);
    assert_eq!(missing.message(), "proxy \"p9\" not found");
    replica_a.stop().await;
    replica_b.stop().await;
}
