//! A [`Runtime`] that writes every container it creates, hands over or removes to the audit
//! log, whichever part of the control plane asked (placement, warm pools, the reconciler):
//! one place, so no path can forget it.

use std::sync::Arc;

use async_trait::async_trait;
use envgate_proto::audit::{AuditLog, Event};

use super::{
    ContainerSpec, CreatedContainer, Liveness, ManagedContainer, Runtime, RuntimeError,
    RuntimeKind, WarmPool,
};

pub struct Audited {
    inner: Arc<dyn Runtime>,
    audit: AuditLog,
}

impl Audited {
    pub fn new(inner: Arc<dyn Runtime>, audit: AuditLog) -> Self {
        Self { inner, audit }
    }

    fn inner_pool(&self) -> Result<&dyn WarmPool, RuntimeError> {
        self.inner.warm_pool().map_err(RuntimeError::Failed)
    }

    fn created(&self, spec: &ContainerSpec, container: &CreatedContainer, warm: bool) {
        self.audit.record(Event::ContainerCreate {
            user: spec.user.clone(),
            environment: spec.environment.clone(),
            container: container.id.clone(),
            name: container.name.clone(),
            warm,
        });
    }
}

#[async_trait]
impl Runtime for Audited {
    fn kind(&self) -> RuntimeKind {
        self.inner.kind()
    }

    async fn ensure_home(&self, instance: &str, user: &str) -> Result<String, RuntimeError> {
        self.inner.ensure_home(instance, user).await
    }

    async fn create_and_start(
        &self,
        spec: &ContainerSpec,
        progress: &(dyn for<'l> Fn(&'l str) + Send + Sync),
    ) -> Result<CreatedContainer, RuntimeError> {
        let created = self.inner.create_and_start(spec, progress).await?;
        self.created(spec, &created, false);
        Ok(created)
    }

    async fn is_running(&self, id: &str) -> Result<bool, RuntimeError> {
        self.inner.is_running(id).await
    }

    async fn remove(&self, id: &str) -> Result<(), RuntimeError> {
        self.inner.remove(id).await?;
        self.audit.record(Event::ContainerRemove {
            container: id.to_owned(),
        });
        Ok(())
    }

    async fn list_managed(&self, instance: &str) -> Result<Vec<ManagedContainer>, RuntimeError> {
        self.inner.list_managed(instance).await
    }

    /// The inner runtime's cache: liveness checks are not audited.
    fn liveness(&self) -> Option<&dyn Liveness> {
        self.inner.liveness()
    }

    /// The inner runtime's warm pools, audited here.
    fn warm_pool(&self) -> Result<&dyn WarmPool, String> {
        self.inner.warm_pool().map(|_| self as &dyn WarmPool)
    }

    async fn sweep(&self, instance: &str, live: &[ManagedContainer]) -> Result<(), RuntimeError> {
        self.inner.sweep(instance, live).await
    }
}

#[async_trait]
impl WarmPool for Audited {
    async fn create_warm(&self, spec: &ContainerSpec) -> Result<CreatedContainer, RuntimeError> {
        let created = self.inner_pool()?.create_warm(spec).await?;
        self.created(spec, &created, true);
        Ok(created)
    }

    async fn assign(
        &self,
        container: &CreatedContainer,
        spec: &ContainerSpec,
    ) -> Result<String, RuntimeError> {
        let name = self.inner_pool()?.assign(container, spec).await?;
        self.audit.record(Event::ContainerAssign {
            user: spec.user.clone(),
            environment: spec.environment.clone(),
            container: container.id.clone(),
            name: name.clone(),
        });
        Ok(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::scripted::ScriptedRuntime;

    #[tokio::test]
    async fn creates_and_removes_are_recorded_and_failures_are_not() {
        let audit = AuditLog::in_memory();
        let scripted = Arc::new(ScriptedRuntime::new());
        let runtime = Audited::new(scripted.clone(), audit.clone());
        let spec = crate::fixtures::alices_busybox("t");
        let created = runtime
            .create_and_start(&spec, &|_: &str| {})
            .await
            .unwrap();
        runtime.remove(&created.id).await.unwrap();
        scripted.set_unavailable(true);
        assert!(
            runtime
                .create_and_start(&spec, &|_: &str| {})
                .await
                .is_err()
        );
        let lines: Vec<serde_json::Value> = audit
            .lines()
            .iter()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert_eq!(lines[0]["event"], "container_create");
        assert_eq!(lines[0]["user"], "alice");
        assert_eq!(lines[0]["container"], created.id.as_str());
        assert_eq!(lines[0]["warm"], false);
        assert_eq!(lines[1]["event"], "container_remove");
        assert_eq!(lines[1]["container"], created.id.as_str());
    }
}
