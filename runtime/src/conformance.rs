//! The behaviours every [`Runtime`] must show, whatever its engine: run against the scripted
//! runtime (`scripted.rs`, this crate's unit tests) and against real Docker
//! (`tests/docker_conformance.rs`). Placement, warm pools and the reconciler rest on exactly
//! these. An engine gives the suite its runtime as `&dyn Runtime` and a small [`Harness`] for
//! what the trait cannot do (an image it cannot get, a container stopped behind its back).

use std::collections::HashSet;

use async_trait::async_trait;

use crate::lifecycle::Runtime;
use crate::types::{ContainerSpec, CreatedContainer, ManagedContainer, RuntimeError, volume_name};

/// What the suite needs besides the runtime.
#[async_trait]
pub trait Harness: Send + Sync {
    /// An instance name of this run only: the suite's containers are all there is in it.
    fn instance(&self) -> String;
    /// An image the runtime starts at once (present, or pulled quickly).
    fn image(&self) -> String;
    /// An image the runtime cannot get; creating from it must fail.
    fn missing_image(&self) -> String;
    /// Stops container `id` outside envgate, as a crash or an operator would.
    async fn stop_outside(&self, id: &str);
}

/// Every case below, one after the other.
pub async fn run(runtime: &dyn Runtime, harness: &dyn Harness) {
    homes_are_made_once(runtime, harness).await;
    created_containers_run_and_are_listed(runtime, harness).await;
    removal_is_idempotent(runtime, harness).await;
    unknown_containers_are_not_running(runtime, harness).await;
    a_missing_image_fails_and_leaves_nothing(runtime, harness).await;
    stopped_containers_are_listed_as_stopped(runtime, harness).await;
    warm_containers_are_handed_over(runtime, harness).await;
}

/// The spec of `user`'s container of the suite's environment.
pub fn spec(harness: &dyn Harness, user: &str, session: Option<&str>) -> ContainerSpec {
    ContainerSpec {
        session: session.map(Into::into),
        env: vec!["ENVGATE_CONFORMANCE=1".into()],
        ..ContainerSpec::new(&harness.instance(), user, "conformance", &harness.image())
    }
}

fn no_progress(_: &str) {}

/// Starts alice's container of the suite's environment (for `session`, when given).
async fn start(
    runtime: &dyn Runtime,
    harness: &dyn Harness,
    session: Option<&str>,
) -> CreatedContainer {
    runtime
        .create_and_start(&spec(harness, "alice", session), &no_progress)
        .await
        .unwrap()
}

async fn listed(runtime: &dyn Runtime, instance: &str) -> Vec<ManagedContainer> {
    runtime
        .list_managed(instance)
        .await
        .expect("list_managed answers")
}

async fn ids(runtime: &dyn Runtime, instance: &str) -> HashSet<String> {
    listed(runtime, instance)
        .await
        .into_iter()
        .map(|c| c.id)
        .collect()
}

pub async fn homes_are_made_once(runtime: &dyn Runtime, harness: &dyn Harness) {
    let instance = harness.instance();
    let first = runtime.ensure_home(&instance, "alice").await.unwrap();
    assert_eq!(first, volume_name(&instance, "alice"));
    let again = runtime.ensure_home(&instance, "alice").await.unwrap();
    assert_eq!(again, first, "ensure_home is idempotent");
    let bob = runtime.ensure_home(&instance, "bob").await.unwrap();
    assert_ne!(bob, first, "each user has a home of their own");
}

pub async fn created_containers_run_and_are_listed(runtime: &dyn Runtime, harness: &dyn Harness) {
    let instance = harness.instance();
    runtime.ensure_home(&instance, "alice").await.unwrap();
    let persistent = start(runtime, harness, None).await;
    let ephemeral = start(runtime, harness, Some("s-1")).await;
    assert_ne!(persistent.id, ephemeral.id);
    assert!(
        persistent
            .name
            .starts_with(&format!("envgate-{instance}-alice-conformance-")),
        "{}",
        persistent.name
    );
    assert!(runtime.is_running(&persistent.id).await.unwrap());
    let all = listed(runtime, &instance).await;
    let find = |id: &str| all.iter().find(|c| c.id == id).cloned();
    let p = find(&persistent.id).expect("the persistent container is listed");
    assert_eq!(
        (
            p.user.as_str(),
            p.environment.as_str(),
            p.session.as_deref()
        ),
        ("alice", "conformance", None)
    );
    assert!(p.running);
    assert_eq!(p.name, persistent.name);
    assert!(p.created_at > 0, "creation time is known");
    let e = find(&ephemeral.id).expect("the ephemeral container is listed");
    assert_eq!(e.session.as_deref(), Some("s-1"));
    // Another instance's listing is not this one's.
    let other = format!("{instance}x");
    assert!(listed(runtime, &other).await.is_empty());
    for id in [&persistent.id, &ephemeral.id] {
        runtime.remove(id).await.unwrap();
    }
    assert!(ids(runtime, &instance).await.is_empty());
}

pub async fn removal_is_idempotent(runtime: &dyn Runtime, harness: &dyn Harness) {
    let instance = harness.instance();
    runtime.ensure_home(&instance, "alice").await.unwrap();
    let created = start(runtime, harness, None).await;
    runtime.remove(&created.id).await.unwrap();
    assert!(!runtime.is_running(&created.id).await.unwrap());
    runtime
        .remove(&created.id)
        .await
        .expect("removing a container already gone is fine");
    assert!(!ids(runtime, &instance).await.contains(&created.id));
}

pub async fn unknown_containers_are_not_running(runtime: &dyn Runtime, _harness: &dyn Harness) {
    assert!(
        !runtime
            .is_running("envgate-conformance-never-created")
            .await
            .unwrap()
    );
}

pub async fn a_missing_image_fails_and_leaves_nothing(
    runtime: &dyn Runtime,
    harness: &dyn Harness,
) {
    let instance = harness.instance();
    runtime.ensure_home(&instance, "alice").await.unwrap();
    let before = ids(runtime, &instance).await;
    let spec = ContainerSpec {
        image: harness.missing_image(),
        ..spec(harness, "alice", None)
    };
    let error = runtime
        .create_and_start(&spec, &no_progress)
        .await
        .expect_err("an image the runtime cannot get");
    assert!(
        matches!(
            &error,
            RuntimeError::ImageMissing(_) | RuntimeError::PullFailed { .. }
        ),
        "{error:?}"
    );
    assert!(
        error.to_string().contains(&spec.image),
        "the line names the image: {error}"
    );
    assert_eq!(
        ids(runtime, &instance).await,
        before,
        "a failed creation leaves nothing behind"
    );
}

pub async fn stopped_containers_are_listed_as_stopped(
    runtime: &dyn Runtime,
    harness: &dyn Harness,
) {
    let instance = harness.instance();
    runtime.ensure_home(&instance, "alice").await.unwrap();
    let created = start(runtime, harness, None).await;
    harness.stop_outside(&created.id).await;
    assert!(!runtime.is_running(&created.id).await.unwrap());
    let found = listed(runtime, &instance)
        .await
        .into_iter()
        .find(|c| c.id == created.id)
        .expect("a stopped container is still listed");
    assert!(!found.running);
    runtime.remove(&created.id).await.unwrap();
    assert!(!ids(runtime, &instance).await.contains(&created.id));
}

/// Only for runtimes with warm pools; the others must say why not.
pub async fn warm_containers_are_handed_over(runtime: &dyn Runtime, harness: &dyn Harness) {
    let pool = match runtime.warm_pool() {
        Ok(pool) => pool,
        Err(why) => {
            assert!(
                !why.trim().is_empty(),
                "a runtime without warm pools says why"
            );
            return;
        }
    };
    let instance = harness.instance();
    let warm = pool.create_warm(&spec(harness, "", None)).await.unwrap();
    assert!(runtime.is_running(&warm.id).await.unwrap());
    let found = listed(runtime, &instance)
        .await
        .into_iter()
        .find(|c| c.id == warm.id)
        .expect("a warm container is listed");
    assert_eq!(found.user, "", "a warm container belongs to nobody");
    let name = pool
        .assign(&warm, &spec(harness, "carol", None))
        .await
        .unwrap();
    assert!(
        name.starts_with(&format!("envgate-{instance}-carol-conformance-")),
        "{name}"
    );
    assert!(runtime.is_running(&warm.id).await.unwrap());
    runtime.remove(&warm.id).await.unwrap();
    assert!(!ids(runtime, &instance).await.contains(&warm.id));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scripted::ScriptedRuntime;

    struct Scripted<'a>(&'a ScriptedRuntime);

    #[async_trait]
    impl Harness for Scripted<'_> {
        fn instance(&self) -> String {
            "conformance".into()
        }
        fn image(&self) -> String {
            "envgate/busybox:latest".into()
        }
        fn missing_image(&self) -> String {
            let image = "envgate/missing:latest";
            self.0.set_image_missing(image);
            image.into()
        }
        async fn stop_outside(&self, id: &str) {
            self.0.stop(id);
        }
    }

    #[tokio::test]
    async fn the_scripted_runtime_conforms() {
        let runtime = ScriptedRuntime::new();
        run(&runtime, &Scripted(&runtime)).await;
        assert_eq!(runtime.warm_creates(), 1, "the warm-pool case ran");
    }

    #[tokio::test]
    async fn the_scripted_runtime_without_warm_pools_conforms() {
        let runtime = ScriptedRuntime::new();
        runtime.set_warm_pools_supported(false);
        run(&runtime, &Scripted(&runtime)).await;
        assert_eq!(runtime.warm_creates(), 0);
    }
}
