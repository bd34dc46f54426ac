//! The control plane's `Runtime` on Kubernetes: `envgate_runtime::kubernetes`, seen through
//! this crate's trait until placement calls the runtime crate's trait directly.

use async_trait::async_trait;
use envgate_runtime::Runtime as _;
use envgate_runtime::kubernetes::KubernetesRuntime;

use super::{ContainerSpec, CreatedContainer, ManagedContainer, Runtime, RuntimeError};

pub struct Kubernetes(pub KubernetesRuntime);

#[async_trait]
impl Runtime for Kubernetes {
    fn name(&self) -> &'static str {
        "kubernetes"
    }

    async fn ensure_volume(&self, instance: &str, user: &str) -> Result<String, RuntimeError> {
        self.0.ensure_home(instance, user).await.map_err(Into::into)
    }

    async fn create_and_start(
        &self,
        spec: &ContainerSpec,
        progress: &(dyn for<'l> Fn(&'l str) + Send + Sync),
    ) -> Result<CreatedContainer, RuntimeError> {
        envgate_runtime::Runtime::create_and_start(&self.0, spec, progress).await
    }

    async fn is_running(&self, id: &str) -> Result<bool, RuntimeError> {
        envgate_runtime::Runtime::is_running(&self.0, id).await
    }

    async fn remove(&self, id: &str) -> Result<(), RuntimeError> {
        envgate_runtime::Runtime::remove(&self.0, id).await
    }

    async fn list_managed(&self, instance: &str) -> Result<Vec<ManagedContainer>, RuntimeError> {
        self.0.list_managed(instance).await
    }

    fn warm_pool_support(&self) -> Result<(), String> {
        self.0.warm_pool().map(|_| ())
    }
}
