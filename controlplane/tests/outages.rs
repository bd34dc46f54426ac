//! What a user sees when a backend is down: UNAVAILABLE, promptly, with one sentence and the
//! request id the detail was logged under (never the backend's own error).

mod common;

use std::sync::Arc;
use std::time::Duration;

use envgate_controlplane::model::{self, EnvironmentRecord, ProxyRecord};
use envgate_controlplane::runtime::scripted::ScriptedRuntime;
use envgate_controlplane::store::{self, EtcdStore, Store};
use envgate_controlplane::testkit::Etcd;
use envgate_proto::v1::OpenSessionRequest;
use envgate_proto::v1::sessions_client::SessionsClient;
use tonic::Code;

async fn open_status(plane: &common::Running) -> tonic::Status {
    let request = OpenSessionRequest {
        token: common::token("outage", "alice"),
        environment: "busybox".into(),
        ..Default::default()
    };
    let mut client = SessionsClient::new(plane.channel().await);
    let call = async {
        let mut events = client.open_session(request).await?.into_inner();
        while events.message().await?.is_some() {}
        Err::<(), _>(tonic::Status::internal("the stream ended without an error"))
    };
    tokio::time::timeout(Duration::from_secs(20), call)
        .await
        .expect("answers in time")
        .unwrap_err()
}

async fn seeded() -> (Etcd, Arc<dyn Store>) {
    let etcd = Etcd::start().await.unwrap();
    let store: Arc<dyn Store> = Arc::new(
        EtcdStore::connect(&etcd.config(), "/outage/", Duration::from_secs(2))
            .await
            .unwrap(),
    );
    let env = EnvironmentRecord {
        name: "busybox".into(),
        image: "envgate/busybox:latest".into(),
        shell: "/bin/sh".into(),
        idle_timeout_seconds: 900,
        ..Default::default()
    };
    store::put_json(
        store.as_ref(),
        &model::environment_key("busybox"),
        &env,
        None,
    )
    .await
    .unwrap();
    let lease = store.lease_grant(Duration::from_secs(60)).await.unwrap();
    let proxy = ProxyRecord {
        id: "p1".into(),
        address: String::new(),
        version: String::new(),
        capacity: 1,
        draining: false,
        sessions: 0,
        connections: 0,
        registered_at: 0,
        last_heartbeat_at: 0,
        lease_id: lease,
        incarnation: String::new(),
    };
    store::put_json(store.as_ref(), &model::proxy_key("p1"), &proxy, Some(lease))
        .await
        .unwrap();
    (etcd, store)
}

/// The status says the one sentence users read, and the request id its metadata carries.
fn assert_unavailable_with_request_id(status: &tonic::Status) {
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    let id = status
        .metadata()
        .get(envgate_proto::metadata::REQUEST_ID)
        .expect("a request id")
        .to_str()
        .unwrap();
    assert_eq!(
        status.message(),
        format!("the service is temporarily unavailable; try again in a minute (request id {id})")
    );
}

#[tokio::test]
async fn etcd_down_is_unavailable_with_a_request_id() {
    let (mut etcd, store) = seeded().await;
    let plane = common::start(store, Arc::new(ScriptedRuntime::new()), "outage").await;
    etcd.kill();
    let status = open_status(&plane).await;
    assert_unavailable_with_request_id(&status);
    plane.stop().await;
}

#[tokio::test]
async fn runtime_down_is_unavailable_with_a_request_id() {
    let (_etcd, store) = seeded().await;
    let runtime = Arc::new(ScriptedRuntime::new());
    runtime.set_unavailable(true);
    let plane = common::start(store.clone(), runtime, "outage").await;
    let status = open_status(&plane).await;
    assert_unavailable_with_request_id(&status);
    assert!(
        store.range(model::CONTAINERS).await.unwrap().is_empty(),
        "no record left behind"
    );
    plane.stop().await;
}
