//! Pulling a missing image on demand, against the real Docker engine and a registry served on
//! loopback by the test itself (`common/registry.rs`): the progress lines, one pull shared by
//! concurrent creations, and clear failures (no registry, a pull past its time limit) that
//! leave no container behind.

mod support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use envgate_runtime::docker::DockerRuntime;
use envgate_runtime::{ContainerSpec, Runtime, RuntimeError};
use support::registry::{self, Options, Registry};
use support::{Cleanup, docker, instance_containers, unique};

fn spec(instance: &str, user: &str, image: &str) -> ContainerSpec {
    ContainerSpec::new(instance, user, "pulled", image)
}

type Lines = Arc<Mutex<Vec<String>>>;

fn recorder() -> (Lines, impl Fn(&str) + Send + Sync) {
    let lines = Lines::default();
    let sink = lines.clone();
    (lines, move |line: &str| {
        sink.lock().unwrap().push(line.to_owned())
    })
}

async fn registry(layer_delay: Duration) -> Registry {
    Registry::start(Options {
        repository: "envgate-test/pulled".into(),
        tag: unique("cp-"),
        layer_delay,
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_image_is_pulled_with_progress_then_runs() {
    let registry = registry(Duration::from_millis(2500)).await;
    let instance = unique("pull");
    let _cleanup = Cleanup {
        instance: instance.clone(),
        images: vec![registry.image.clone()],
    };
    assert!(!registry::image_present(&registry.image));
    let runtime = DockerRuntime::new(None);
    runtime.ensure_home(&instance, "alice").await.unwrap();
    let (lines, progress) = recorder();
    let created = tokio::time::timeout(
        Duration::from_secs(120),
        runtime.create_and_start(&spec(&instance, "alice", &registry.image), &progress),
    )
    .await
    .expect("the pull and creation finish in time")
    .expect("the image is pulled and the container started");

    let lines = lines.lock().unwrap().clone();
    assert_eq!(
        lines.first().map(String::as_str),
        Some(format!("pulling image {} …", registry.image).as_str()),
        "{lines:?}"
    );
    let done = lines.last().expect("a done line");
    assert!(
        done.starts_with(&format!("pulled image {} in ", registry.image))
            && done.contains("layers"),
        "{lines:?}"
    );
    // Everything between is a throttled summary of the same pull.
    for line in &lines[1..lines.len() - 1] {
        assert!(
            line.starts_with(&format!("pulling image {} … ", registry.image))
                && line.contains("layers"),
            "{lines:?}"
        );
    }
    assert!(registry.manifest_requests() >= 1);
    assert!(registry::image_present(&registry.image));
    assert!(runtime.is_running(&created.id).await.unwrap());
    let marker = docker(&["exec", &created.id, "cat", "/envgate-pulled"]);
    assert_eq!(marker, registry.marker);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_creations_share_one_pull() {
    // Long enough that all ten creations meet the pull while it is under way.
    let registry = registry(Duration::from_secs(3)).await;
    let instance = unique("pull");
    let _cleanup = Cleanup {
        instance: instance.clone(),
        images: vec![registry.image.clone()],
    };
    let runtime = Arc::new(DockerRuntime::new(None));
    let users: Vec<String> = (0..10).map(|i| format!("user{i}")).collect();
    for user in &users {
        runtime.ensure_home(&instance, user).await.unwrap();
    }
    let creations: Vec<_> = users
        .iter()
        .map(|user| {
            let runtime = runtime.clone();
            let spec = spec(&instance, user, &registry.image);
            tokio::spawn(async move {
                let (lines, progress) = recorder();
                let created = runtime.create_and_start(&spec, &progress).await;
                let lines = lines.lock().unwrap().clone();
                (created, lines)
            })
        })
        .collect();
    let mut ids = Vec::new();
    for creation in creations {
        let (created, lines) = tokio::time::timeout(Duration::from_secs(180), creation)
            .await
            .expect("every creation finishes in time")
            .unwrap();
        let created = created.expect("every creation succeeds");
        // Every waiter, the one that started the pull or one that joined it, is told.
        assert_eq!(
            lines.first(),
            Some(&format!("pulling image {} …", registry.image)),
            "{lines:?}"
        );
        assert!(
            lines
                .last()
                .is_some_and(|l| l.starts_with(&format!("pulled image {} in ", registry.image))),
            "{lines:?}"
        );
        ids.push(created.id);
    }
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 10);
    // One pull: the engine asks for the manifest once (a HEAD before the GET at most).
    assert!(
        registry.manifest_requests() <= 2,
        "{} manifest requests",
        registry.manifest_requests()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registry_that_is_not_there_fails_clearly_and_leaves_nothing() {
    let image = format!("{}/nope:1", registry::closed_address());
    let instance = unique("pull");
    let _cleanup = Cleanup {
        instance: instance.clone(),
        images: vec![image.clone()],
    };
    let runtime = DockerRuntime::new(None);
    runtime.ensure_home(&instance, "alice").await.unwrap();
    let (lines, progress) = recorder();
    let err = runtime
        .create_and_start(&spec(&instance, "alice", &image), &progress)
        .await
        .unwrap_err();
    match &err {
        RuntimeError::PullFailed {
            image: failed,
            reason,
        } => {
            assert_eq!(failed, &image);
            assert!(reason.contains("connection refused"), "{reason}");
        }
        other => panic!("unexpected: {other:?}"),
    }
    assert!(
        err.to_string()
            .starts_with(&format!("cannot pull image {image}: ")),
        "{err}"
    );
    assert_eq!(
        lines.lock().unwrap().as_slice(),
        [format!("pulling image {image} …")]
    );
    assert!(instance_containers(&instance).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pull_past_its_time_limit_fails_and_the_next_open_tries_again() {
    let registry = registry(Duration::from_secs(6)).await;
    let instance = unique("pull");
    let _cleanup = Cleanup {
        instance: instance.clone(),
        images: vec![registry.image.clone()],
    };
    let runtime = DockerRuntime::new(None).with_pull_timeout(Duration::from_secs(1));
    runtime.ensure_home(&instance, "alice").await.unwrap();
    let (_, progress) = recorder();
    let spec = spec(&instance, "alice", &registry.image);
    let err = runtime
        .create_and_start(&spec, &progress)
        .await
        .unwrap_err();
    assert_eq!(
        err,
        RuntimeError::PullFailed {
            image: registry.image.clone(),
            reason: "no result within 1 s".into(),
        }
    );
    assert!(instance_containers(&instance).is_empty());
    // The failed pull is forgotten: the next creation starts a pull of its own.
    let before = registry.manifest_requests();
    // It may run into the same time limit; what counts is that it asked the registry again.
    let _ = runtime.create_and_start(&spec, &progress).await;
    assert!(registry.manifest_requests() > before);
}
