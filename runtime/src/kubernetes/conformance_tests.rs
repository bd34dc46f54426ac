//! The runtime conformance suite (`crate::conformance`, also run on Docker and the scripted
//! runtime) against the Kubernetes runtime over the **fake** API server (`fake.rs`): the
//! behaviours placement and the reconciler rest on, through kube's real client, its watcher
//! and the runtime's own requests. Not a real cluster (docs/operations.md says what a first
//! run on one must confirm).

use std::time::Duration;

use async_trait::async_trait;
use serde_json::json;

use super::fake::FakeApiServer;
use super::{HomeSettings, KubernetesConfig, KubernetesRuntime};
use crate::conformance::{self, Harness};

const NS: &str = "envgate-users";

struct FakeCluster(FakeApiServer);

#[async_trait]
impl Harness for FakeCluster {
    fn instance(&self) -> String {
        "kubeconformance".to_owned()
    }
    fn image(&self) -> String {
        "envgate/busybox:latest".to_owned()
    }
    fn missing_image(&self) -> String {
        let image = "registry.invalid/envgate/missing:latest";
        self.0.image_missing(image);
        image.to_owned()
    }
    async fn stop_outside(&self, id: &str) {
        // What the kubelet reports once the agent (PID 1) exited: the Pod is over.
        self.0.set_pod_status(
            NS,
            id,
            json!({"phase": "Failed", "reason": "Error", "containerStatuses": [{
                "name": "env", "image": "envgate/busybox:latest", "imageID": "", "ready": false,
                "restartCount": 0, "state": {"terminated": {"exitCode": 137, "reason": "Error"}}}]}),
        );
    }
}

#[tokio::test]
async fn kube_conformance_over_the_fake_api_server() {
    let fake = FakeApiServer::new();
    let runtime = KubernetesRuntime::new(
        fake.client(NS),
        KubernetesConfig {
            namespace: NS.to_owned(),
            agent_image: "envgate/agent:test".to_owned(),
            start_timeout: Duration::from_secs(30),
            home: HomeSettings::default(),
        },
    );
    conformance::run(&runtime, &FakeCluster(fake.clone())).await;
    // Everything the suite made is gone but the homes, which envgate never removes.
    assert!(
        fake.names(NS, "pods").is_empty(),
        "{:?}",
        fake.names(NS, "pods")
    );
    assert!(fake.names(NS, "secrets").is_empty());
    assert!(!fake.names(NS, "persistentvolumeclaims").is_empty());
}
