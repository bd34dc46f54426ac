//! An environment that asks for GPUs, against the real Docker engine. On a host without a GPU
//! driver (the NVIDIA Container Toolkit) the engine refuses the device request at start: the
//! runtime says so in its own words and leaves no container behind. On a host with one, the
//! container starts.

use std::process::Command;

use envgate_controlplane::model::Gpus;
use envgate_controlplane::runtime::{ContainerSpec, DockerRuntime, Runtime, RuntimeError};

const IMAGE: &str = "envgate/busybox:latest";

fn docker(args: &[&str]) -> String {
    Command::new("docker")
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

fn instance_containers(instance: &str) -> Vec<String> {
    let label = format!("label=envgate.instance={instance}");
    docker(&["ps", "-aq", "--filter", &label])
        .split_whitespace()
        .map(str::to_owned)
        .collect()
}

/// Removes the instance's containers and volumes, even when an assertion failed.
struct Cleanup(String);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let ids = instance_containers(&self.0);
        if !ids.is_empty() {
            let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
            docker(&[&["rm", "-f"][..], &ids].concat());
        }
        docker(&[
            "volume",
            "rm",
            "-f",
            &format!("envgate-{}-home-alice", self.0),
        ]);
    }
}

/// Whether this engine has a runtime that can hand out NVIDIA GPUs.
fn host_has_gpu_runtime() -> bool {
    docker(&["info", "--format", "{{json .Runtimes}}"]).contains("nvidia")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gpu_environment_starts_only_where_the_engine_can_give_gpus() {
    let instance = format!("gpu{:08x}", rand::random::<u32>());
    let _cleanup = Cleanup(instance.clone());
    let runtime = DockerRuntime::new(None);
    runtime.ensure_volume(&instance, "alice").await.unwrap();
    let spec = ContainerSpec {
        instance: instance.clone(),
        user: "alice".into(),
        environment: "cuda".into(),
        session: None,
        image: IMAGE.into(),
        env: vec![],
        working_dir: String::new(),
        cpus: 0.0,
        memory_bytes: 0,
        pids_limit: 0,
        gpus: Gpus::All,
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
