//! The runtime conformance suite (`envgate_runtime::conformance`) against the real Docker
//! engine: with warm pools (home slots, as the control plane runs here) and without.

mod support;

use std::path::Path;

use async_trait::async_trait;
use envgate_runtime::Runtime;
use envgate_runtime::conformance::{self, Harness};
use envgate_runtime::docker::DockerRuntime;
use support::registry;
use support::{Cleanup, IMAGE, SLOTS, docker, unique};

struct Docker {
    instance: String,
}

#[async_trait]
impl Harness for Docker {
    fn instance(&self) -> String {
        self.instance.clone()
    }

    fn image(&self) -> String {
        IMAGE.into()
    }

    /// Nothing listens there: the pull fails at once.
    fn missing_image(&self) -> String {
        format!("{}/envgate-missing:1", registry::closed_address())
    }

    async fn stop_outside(&self, id: &str) {
        docker(&["stop", "--time", "1", id]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_docker_runtime_conforms() {
    let instance = unique("conf");
    let _cleanup = Cleanup::new(&instance);
    let runtime = DockerRuntime::connect(None)
        .await
        .expect("docker is reachable")
        .with_home_slots(Some(Path::new(SLOTS)));
    assert!(runtime.warm_pool().is_ok(), "warm pools work here");
    conformance::run(&runtime, &Docker { instance }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_docker_runtime_without_warm_pools_conforms() {
    let instance = unique("conf");
    let _cleanup = Cleanup::new(&instance);
    let runtime = DockerRuntime::connect(None)
        .await
        .expect("docker is reachable")
        .with_home_slots(None);
    assert!(runtime.warm_pool().is_err());
    conformance::run(&runtime, &Docker { instance }).await;
}
