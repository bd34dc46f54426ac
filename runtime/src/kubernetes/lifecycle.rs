//! [`KubernetesRuntime`] behind the control plane's [`Runtime`] seam: placement, the
//! reconciler, idle reaping, lifetimes and per-user caps call it exactly as they call Docker.

use async_trait::async_trait;

use super::{Failure, KubernetesRuntime, PodSpecInput};
use crate::lifecycle::{Runtime, RuntimeKind};
use crate::types::{
    AgentEndpoint, ContainerSpec, CreatedContainer, Gpus, ManagedContainer, RuntimeError,
};

/// Why warm pools are off on Kubernetes (reported once at start, as on a Docker host without
/// home slots).
pub const NO_WARM_POOLS: &str = "the kubernetes runtime has no warm pools: a Pod's volumes are \
     fixed when it is created, so a Pod started before its user is known could never get that \
     user's home claim";

impl From<Failure> for RuntimeError {
    fn from(failure: Failure) -> Self {
        match failure {
            Failure::Unavailable(line) => RuntimeError::Unavailable(line),
            Failure::Failed(line) => RuntimeError::Failed(line),
            // The control plane tells the user which environment's image it was, and logs
            // the kubelet's reason (as for a Docker pull).
            Failure::PullFailed { image, reason, .. } => RuntimeError::PullFailed { image, reason },
        }
    }
}

/// The spec's Kubernetes reading; `gpus: all` has no meaning on a cluster (a node's GPUs are
/// counted resources), and a Pod needs its user for its home.
pub fn pod_input(spec: &ContainerSpec) -> Result<PodSpecInput, RuntimeError> {
    let gpus = match spec.gpus {
        Gpus::None => 0,
        Gpus::Count(n) => n,
        Gpus::All => {
            return Err(RuntimeError::Failed(format!(
                "environment {:?}: gpus: all has no meaning on Kubernetes; give a number of GPUs",
                spec.environment
            )));
        }
    };
    if spec.user.is_empty() {
        return Err(RuntimeError::Failed(NO_WARM_POOLS.to_owned()));
    }
    // Checked when the environment was stored; a record written some other way still gets
    // one line rather than a Pod the API server refuses.
    let settings = spec.kubernetes.settings().map_err(|e| {
        RuntimeError::Failed(format!(
            "environment {:?}: kubernetes.{e}",
            spec.environment
        ))
    })?;
    Ok(PodSpecInput {
        instance: spec.instance.clone(),
        user: spec.user.clone(),
        environment: spec.environment.clone(),
        session: spec.session.clone(),
        image: spec.image.clone(),
        env: spec.env.clone(),
        working_dir: spec.working_dir.clone(),
        cpus: spec.cpus,
        memory_bytes: spec.memory_bytes,
        gpus,
        settings,
    })
}

#[async_trait]
impl Runtime for KubernetesRuntime {
    fn kind(&self) -> RuntimeKind {
        RuntimeKind::Kubernetes
    }

    async fn ensure_home(&self, instance: &str, user: &str) -> Result<String, RuntimeError> {
        Ok(KubernetesRuntime::ensure_home(self, instance, user).await?)
    }

    async fn create_and_start(
        &self,
        spec: &ContainerSpec,
        progress: &(dyn for<'l> Fn(&'l str) + Send + Sync),
    ) -> Result<CreatedContainer, RuntimeError> {
        let input = pod_input(spec)?;
        let started = self.start(&input, progress).await?;
        Ok(CreatedContainer {
            id: started.name.clone(),
            name: started.name,
            agent: Some(AgentEndpoint {
                address: started.agent_address,
                secret: started.secret,
            }),
        })
    }

    async fn is_running(&self, id: &str) -> Result<bool, RuntimeError> {
        Ok(KubernetesRuntime::is_running(self, id).await?)
    }

    async fn remove(&self, id: &str) -> Result<(), RuntimeError> {
        Ok(KubernetesRuntime::remove(self, id).await?)
    }

    async fn list_managed(&self, instance: &str) -> Result<Vec<ManagedContainer>, RuntimeError> {
        Ok(self
            .list(instance)
            .await?
            .into_iter()
            .map(|pod| ManagedContainer {
                id: pod.name.clone(),
                name: pod.name,
                user: pod.user,
                environment: pod.environment,
                session: pod.session,
                created_at: pod.created_at,
                running: pod.running,
            })
            .collect())
    }

    fn warm_pool(&self) -> Result<&dyn crate::lifecycle::WarmPool, String> {
        Err(NO_WARM_POOLS.to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(gpus: Gpus, user: &str) -> ContainerSpec {
        ContainerSpec {
            gpus,
            ..ContainerSpec::new("lab", user, "cuda", "cuda:12")
        }
    }

    #[test]
    fn kube_gpus_all_and_warm_specs_are_refused_with_a_line() {
        assert_eq!(
            pod_input(&spec(Gpus::All, "alice"))
                .unwrap_err()
                .to_string(),
            "environment \"cuda\": gpus: all has no meaning on Kubernetes; give a number of GPUs"
        );
        assert_eq!(pod_input(&spec(Gpus::Count(2), "alice")).unwrap().gpus, 2);
        assert_eq!(
            pod_input(&spec(Gpus::None, "")).unwrap_err().to_string(),
            NO_WARM_POOLS
        );
    }

    #[test]
    fn kube_the_specs_placement_is_checked_and_carried_to_the_pod() {
        let placed = |tolerations: &[&str]| {
            pod_input(&ContainerSpec {
                kubernetes: crate::KubernetesPlacement {
                    node_selector: [("accelerator".to_owned(), "a100".to_owned())].into(),
                    tolerations: tolerations.iter().map(|t| (*t).to_owned()).collect(),
                    image_pull_policy: Some("Never".to_owned()),
                    image_pull_secrets: vec!["lab-registry".to_owned()],
                },
                ..spec(Gpus::Count(1), "alice")
            })
        };
        let settings = placed(&["nvidia.com/gpu:NoSchedule"]).unwrap().settings;
        assert_eq!(settings.node_selector["accelerator"], "a100");
        assert_eq!(
            settings.tolerations[0].effect.as_deref(),
            Some("NoSchedule")
        );
        assert_eq!(settings.image_pull_policy.as_deref(), Some("Never"));
        assert_eq!(settings.image_pull_secrets, ["lab-registry"]);
        assert_eq!(
            placed(&["gpu:Sometimes"]).unwrap_err().to_string(),
            "environment \"cuda\": kubernetes.tolerations[0]: toleration \"gpu:Sometimes\": effect \
             \"Sometimes\" is not NoSchedule, PreferNoSchedule or NoExecute"
        );
    }
}
