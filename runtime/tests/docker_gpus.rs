//! An environment that asks for GPUs, against the real Docker engine. On a host without a GPU
//! driver (the NVIDIA Container Toolkit) the engine refuses the device request at start: the
//! runtime says so in its own words and leaves no container behind. On a host with one, the
//! container starts.

mod support;

use envgate_runtime::docker::DockerRuntime;
use envgate_runtime::{ContainerSpec, Gpus, Runtime, RuntimeError};
use support::{Cleanup, IMAGE, docker, instance_containers, unique};

/// Whether this engine has a runtime that can hand out NVIDIA GPUs.
fn host_has_gpu_runtime() -> bool {
    docker(&["info", "--format", "{{json .Runtimes}}"]).contains("nvidia")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gpu_environment_starts_only_where_the_engine_can_give_gpus() {
    let instance = unique("gpu");
    let _cleanup = Cleanup::new(&instance);
    let runtime = DockerRuntime::new(None);
    runtime.ensure_home(&instance, "alice").await.unwrap();
    let spec = ContainerSpec {
        gpus: Gpus::All,
        ..ContainerSpec::new(&instance, "alice", "cuda", IMAGE)
    };
    let result = runtime.create_and_start(&spec, &|_: &str| {}).await;
    if host_has_gpu_runtime() {
        let created = result.expect("a host with the NVIDIA runtime starts a GPU container");
        runtime.remove(&created.id).await.unwrap();
        return;
    }
    match result {
        Err(RuntimeError::NoGpus(reason)) => {
            assert!(
                reason.contains("could not select device driver"),
                "{reason}"
            )
        }
        other => panic!("expected NoGpus from an engine without a GPU driver, got {other:?}"),
    }
    assert_eq!(
        instance_containers(&instance),
        Vec::<String>::new(),
        "the container that could not start was removed"
    );
}
