//! The runtime's lifecycle through the [`Runtime`] trait against the stateful fake API server
//! (`fake.rs`): what the reconciler, idle reaping and caps rely on, end to end over kube's
//! client. A fake, not Kubernetes (see `fake.rs`).

use std::time::Duration;

use serde_json::json;

use super::fake::FakeApiServer;
use super::*;
use crate::lifecycle::Runtime;
use crate::types::{ContainerSpec, RuntimeError};

const NS: &str = "users";

fn runtime(fake: &FakeApiServer) -> KubernetesRuntime {
    KubernetesRuntime::new(
        fake.client(NS),
        KubernetesConfig {
            namespace: NS.to_owned(),
            agent_image: "envgate-agent:test".to_owned(),
            start_timeout: Duration::from_secs(5),
            home: HomeSettings::default(),
        },
    )
}

fn spec(user: &str, environment: &str, session: Option<&str>) -> ContainerSpec {
    ContainerSpec {
        session: session.map(str::to_owned),
        cpus: 0.5,
        memory_bytes: 256 << 20,
        ..ContainerSpec::new("lab", user, environment, "envgate/busybox:latest")
    }
}

#[tokio::test]
async fn kube_fake_lifecycle_create_list_remove() {
    let fake = FakeApiServer::new();
    let runtime = runtime(&fake);
    assert_eq!(
        runtime.ensure_home("lab", "alice").await.unwrap(),
        "envgate-lab-home-alice"
    );
    assert_eq!(
        runtime.ensure_home("lab", "alice").await.unwrap(),
        "envgate-lab-home-alice"
    );
    assert_eq!(
        fake.names(NS, "persistentvolumeclaims"),
        ["envgate-lab-home-alice"]
    );

    let created = runtime
        .create_and_start(&spec("alice", "dev", None), &|_: &str| {})
        .await
        .unwrap();
    let agent = created.agent.clone().unwrap();
    assert!(agent.address.starts_with("10.244.0.") && agent.address.ends_with(":7022"));
    assert!(
        matches!(
            crate::SessionTarget::agent(&agent.address, &agent.secret),
            Ok(crate::SessionTarget::AgentTcp { .. })
        ),
        "the placement's session target is the agent over TCP"
    );
    let secret = fake
        .object(NS, "secrets", &format!("{}-agent", created.id))
        .unwrap();
    assert_eq!(
        secret["metadata"]["ownerReferences"][0]["name"],
        created.id.as_str()
    );
    assert!(runtime.is_running(&created.id).await.unwrap());

    let ephemeral = runtime
        .create_and_start(&spec("bob", "scratch", Some("s-1")), &|_: &str| {})
        .await
        .unwrap();
    let mut listed = runtime.list_managed("lab").await.unwrap();
    listed.sort_by(|a, b| a.user.cmp(&b.user));
    assert_eq!(
        listed
            .iter()
            .map(|c| (
                c.id.as_str(),
                c.user.as_str(),
                c.environment.as_str(),
                c.session.as_deref(),
                c.running
            ))
            .collect::<Vec<_>>(),
        [
            (created.id.as_str(), "alice", "dev", None, true),
            (ephemeral.id.as_str(), "bob", "scratch", Some("s-1"), true),
        ]
    );
    assert!(runtime.list_managed("other").await.unwrap().is_empty());

    runtime.remove(&created.id).await.unwrap();
    runtime.remove(&created.id).await.unwrap();
    assert!(!runtime.is_running(&created.id).await.unwrap());
    assert_eq!(
        fake.names(NS, "secrets"),
        [format!("{}-agent", ephemeral.id)]
    );
    assert_eq!(
        fake.names(NS, "persistentvolumeclaims"),
        ["envgate-lab-home-alice"],
        "homes are never removed"
    );
}

#[tokio::test]
async fn kube_fake_pods_gone_or_finished_outside_envgate_are_not_running() {
    let fake = FakeApiServer::new();
    let runtime = runtime(&fake);
    let a = runtime
        .create_and_start(&spec("alice", "dev", None), &|_: &str| {})
        .await
        .unwrap();
    let b = runtime
        .create_and_start(&spec("alice", "other", None), &|_: &str| {})
        .await
        .unwrap();
    fake.delete_outside(NS, "pods", &a.id);
    assert!(
        fake.object(NS, "secrets", &format!("{}-agent", a.id))
            .is_none(),
        "the owned secret goes with its pod"
    );
    fake.set_pod_status(NS, &b.id, json!({"phase": "Failed", "reason": "Evicted"}));
    assert!(!runtime.is_running(&a.id).await.unwrap());
    assert!(!runtime.is_running(&b.id).await.unwrap());
    let listed = runtime.list_managed("lab").await.unwrap();
    assert_eq!(listed.len(), 1);
    assert!(!listed[0].running);
}

#[tokio::test]
async fn kube_fake_a_pod_that_cannot_pull_leaves_nothing_behind() {
    let fake = FakeApiServer::new().with_pod_status(json!({
        "phase": "Pending",
        "containerStatuses": [{"name": "env", "image": "envgate/busybox:latest", "imageID": "",
            "ready": false, "restartCount": 0,
            "state": {"waiting": {"reason": "ErrImagePull",
                "message": "rpc error: code = NotFound desc = failed to pull and unpack image"}}}]
    }));
    let runtime = runtime(&fake);
    let error = runtime
        .create_and_start(&spec("alice", "dev", None), &|_: &str| {})
        .await
        .unwrap_err();
    assert_eq!(
        error,
        RuntimeError::PullFailed {
            image: "envgate/busybox:latest".to_owned(),
            reason: "rpc error: code = NotFound desc = failed to pull and unpack image".to_owned(),
        }
    );
    assert!(fake.names(NS, "pods").is_empty());
    assert!(fake.names(NS, "secrets").is_empty());
}

#[tokio::test]
async fn kube_has_no_warm_pools_and_says_why() {
    let fake = FakeApiServer::new();
    let runtime = runtime(&fake);
    let Err(why) = runtime.warm_pool() else {
        panic!("warm pools on kubernetes");
    };
    assert!(why.contains("home claim"), "{why}");
}

#[tokio::test]
async fn kube_the_runtime_calls_exactly_its_declared_api_calls() {
    // Everything the control plane does with it: homes, starts that work and fail, checks,
    // lists, removals. What it sent must be what API_CALLS (and so the Role) says.
    let fake = FakeApiServer::new();
    let runtime = runtime(&fake);
    runtime.ensure_home("lab", "alice").await.unwrap();
    let created = runtime
        .create_and_start(&spec("alice", "dev", None), &|_: &str| {})
        .await
        .unwrap();
    runtime.is_running(&created.id).await.unwrap();
    runtime.list_managed("lab").await.unwrap();
    runtime.remove(&created.id).await.unwrap();
    let failing = FakeApiServer::new().with_pod_status(json!({"phase": "Failed"}));
    runtime_calls_after_a_failed_start(&failing).await;
    let slow = FakeApiServer::new().with_pod_status(json!({"phase": "Pending"}));
    start_that_needs_the_watch(&slow).await;
    let mut calls = fake.api_calls();
    calls.extend(failing.api_calls());
    calls.extend(slow.api_calls());
    let declared: std::collections::BTreeSet<(String, String)> = API_CALLS
        .iter()
        .map(|(r, v)| ((*r).to_owned(), (*v).to_owned()))
        .collect();
    assert_eq!(calls, declared);
}

async fn runtime_calls_after_a_failed_start(fake: &FakeApiServer) {
    let runtime = runtime(fake);
    runtime
        .create_and_start(&spec("bob", "dev", None), &|_: &str| {})
        .await
        .unwrap_err();
}

/// A Pod still pending when first listed: the runtime waits on the watch, and the kubelet's
/// update arriving there is what lets the open go on.
async fn start_that_needs_the_watch(fake: &FakeApiServer) {
    let runtime = runtime(fake);
    let start = tokio::spawn(async move {
        runtime
            .create_and_start(&spec("carol", "dev", None), &|_: &str| {})
            .await
    });
    tokio::time::timeout(Duration::from_secs(10), async {
        while !fake
            .requests()
            .iter()
            .any(|r| r.query.get("watch").is_some_and(|w| w == "true"))
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the runtime opened a watch on its pending Pod");
    let name = fake.names(NS, "pods").remove(0);
    assert!(!start.is_finished(), "a pending Pod is not started");
    fake.set_pod_status(
        NS,
        &name,
        json!({"phase": "Running", "podIP": "10.244.3.3", "containerStatuses": [{
            "name": "env", "image": "i", "imageID": "", "ready": true, "restartCount": 0,
            "state": {"running": {"startedAt": "2026-12-06T02:00:01Z"}}}]}),
    );
    let created = start.await.unwrap().unwrap();
    assert_eq!(created.agent.unwrap().address, "10.244.3.3:7022");
}
