//! The Docker runtime (bollard). Every container gets the envgate labels, the user's home
//! volume, and the hardening the security model requires (no-new-privileges, all capabilities
//! dropped but the few a root shell needs, a pids limit, memory/CPU limits when configured).

use std::collections::HashMap;
use std::future::Future;
use std::time::Duration;

use tokio::sync::OnceCell;

use async_trait::async_trait;
use bollard::Docker;
use bollard::errors::Error as BollardError;
use bollard::models::{
    ContainerCreateBody, ContainerSummaryStateEnum, HostConfig, VolumeCreateRequest,
};
use bollard::query_parameters::{
    CreateContainerOptions, ListContainersOptions, RemoveContainerOptions, StartContainerOptions,
};

use super::{
    ContainerSpec, CreatedContainer, ManagedContainer, Runtime, RuntimeError, container_name,
    labels, volume_name,
};

/// Bound on each Docker API call; creation on a loaded engine can take seconds.
const CALL_TIMEOUT: Duration = Duration::from_secs(60);
/// Default pids limit when the environment sets none.
pub const DEFAULT_PIDS_LIMIT: i64 = 512;
/// Capabilities kept so a root shell can still manage files and switch users.
const CAP_ADD: &[&str] = &[
    "CHOWN",
    "DAC_OVERRIDE",
    "FOWNER",
    "SETUID",
    "SETGID",
    "KILL",
];
/// Keeps the container alive without a service inside; exits promptly on `docker stop`.
const KEEP_ALIVE: &[&str] = &[
    "/bin/sh",
    "-c",
    "trap 'exit 0' TERM; while :; do sleep 3600 & wait $!; done",
];

pub struct DockerRuntime {
    host: Option<String>,
    docker: OnceCell<Docker>,
}

impl DockerRuntime {
    /// Does no I/O: the engine is reached on first use, so a control plane started while Docker
    /// is down still serves, answers UNAVAILABLE, and recovers once the engine is back.
    pub fn new(host: Option<&str>) -> Self {
        Self {
            host: host.map(str::to_owned),
            docker: OnceCell::new(),
        }
    }

    /// Reaches the engine now; for callers that want to fail early.
    pub async fn connect(host: Option<&str>) -> Result<Self, RuntimeError> {
        let runtime = Self::new(host);
        runtime.docker().await?;
        Ok(runtime)
    }

    /// The client, connected on first success. The API version is negotiated so an older
    /// engine (this project's CI runs API 1.41) is spoken to in its own version.
    pub async fn docker(&self) -> Result<&Docker, RuntimeError> {
        self.docker
            .get_or_try_init(|| async {
                let docker = match &self.host {
                    Some(host) => Docker::connect_with_host(host),
                    None => Docker::connect_with_local_defaults(),
                }
                .map_err(unavailable)?;
                bounded("negotiate version", docker.negotiate_version()).await
            })
            .await
    }
}

fn unavailable(e: BollardError) -> RuntimeError {
    RuntimeError::Unavailable(format!("docker is unavailable: {e}"))
}

fn is_not_found(e: &BollardError) -> bool {
    matches!(
        e,
        BollardError::DockerResponseServerError {
            status_code: 404,
            ..
        }
    )
}

/// Server-side errors are failures of this request; anything else means the engine is not
/// reachable.
fn classify(e: BollardError) -> RuntimeError {
    match e {
        BollardError::DockerResponseServerError {
            status_code,
            message,
        } => RuntimeError::Failed(format!("docker answered {status_code}: {message}")),
        other => unavailable(other),
    }
}

/// Bounds a call in time; the caller classifies the engine's answer.
async fn within<T>(
    what: &str,
    call: impl Future<Output = Result<T, BollardError>>,
) -> Result<Result<T, BollardError>, RuntimeError> {
    tokio::time::timeout(CALL_TIMEOUT, call).await.map_err(|_| {
        RuntimeError::Unavailable(format!(
            "docker is unavailable: {what} took longer than {} s",
            CALL_TIMEOUT.as_secs()
        ))
    })
}

async fn bounded<T>(
    what: &str,
    call: impl Future<Output = Result<T, BollardError>>,
) -> Result<T, RuntimeError> {
    within(what, call).await?.map_err(classify)
}

fn container_labels(spec: &ContainerSpec) -> HashMap<String, String> {
    let mut out = HashMap::from([
        (
            labels::MANAGED_BY.to_owned(),
            labels::MANAGED_BY_VALUE.to_owned(),
        ),
        (labels::INSTANCE.to_owned(), spec.instance.clone()),
        (labels::USER.to_owned(), spec.user.clone()),
        (labels::ENVIRONMENT.to_owned(), spec.environment.clone()),
    ]);
    if let Some(session) = &spec.session {
        out.insert(labels::SESSION.to_owned(), session.clone());
    }
    out
}

fn host_config(spec: &ContainerSpec, volume: &str) -> HostConfig {
    HostConfig {
        init: Some(true),
        security_opt: Some(vec!["no-new-privileges".to_owned()]),
        cap_drop: Some(vec!["ALL".to_owned()]),
        cap_add: Some(CAP_ADD.iter().map(|c| (*c).to_owned()).collect()),
        pids_limit: Some(if spec.pids_limit > 0 {
            spec.pids_limit
        } else {
            DEFAULT_PIDS_LIMIT
        }),
        memory: (spec.memory_bytes > 0)
            .then(|| i64::try_from(spec.memory_bytes).unwrap_or(i64::MAX)),
        nano_cpus: (spec.cpus > 0.0).then_some((spec.cpus * 1e9) as i64),
        binds: Some(vec![format!("{volume}:/home/{}", spec.user)]),
        ..HostConfig::default()
    }
}

#[async_trait]
impl Runtime for DockerRuntime {
    fn name(&self) -> &'static str {
        "docker"
    }

    async fn ensure_volume(&self, instance: &str, user: &str) -> Result<String, RuntimeError> {
        let name = volume_name(instance, user);
        // Creating an existing volume is a no-op in Docker, so this is idempotent.
        let request = VolumeCreateRequest {
            name: Some(name.clone()),
            labels: Some(HashMap::from([
                (
                    labels::MANAGED_BY.to_owned(),
                    labels::MANAGED_BY_VALUE.to_owned(),
                ),
                (labels::INSTANCE.to_owned(), instance.to_owned()),
                (labels::USER.to_owned(), user.to_owned()),
            ])),
            ..VolumeCreateRequest::default()
        };
        bounded("create volume", self.docker().await?.create_volume(request)).await?;
        Ok(name)
    }

    async fn create_and_start(
        &self,
        spec: &ContainerSpec,
    ) -> Result<CreatedContainer, RuntimeError> {
        let docker = self.docker().await?;
        match within("inspect image", docker.inspect_image(&spec.image)).await? {
            Ok(_) => {}
            Err(e) if is_not_found(&e) => {
                return Err(RuntimeError::ImageMissing(spec.image.clone()));
            }
            Err(e) => return Err(classify(e)),
        }
        // The caller ensured the volume (see `Runtime::ensure_volume`).
        let volume = volume_name(&spec.instance, &spec.user);
        let name = container_name(&spec.instance, &spec.user, &spec.environment);
        let body = ContainerCreateBody {
            image: Some(spec.image.clone()),
            cmd: Some(KEEP_ALIVE.iter().map(|s| (*s).to_owned()).collect()),
            labels: Some(container_labels(spec)),
            hostname: Some(spec.environment.clone()),
            env: (!spec.env.is_empty()).then(|| spec.env.clone()),
            working_dir: (!spec.working_dir.is_empty()).then(|| spec.working_dir.clone()),
            host_config: Some(host_config(spec, &volume)),
            ..ContainerCreateBody::default()
        };
        let options = CreateContainerOptions {
            name: Some(name.clone()),
            ..Default::default()
        };
        let created = bounded(
            "create container",
            docker.create_container(Some(options), body),
        )
        .await?;
        if let Err(e) = bounded(
            "start container",
            docker.start_container(&created.id, None::<StartContainerOptions>),
        )
        .await
        {
            // Leave nothing half-made behind.
            if let Err(cleanup) = self.remove(&created.id).await {
                tracing::warn!(container = %created.id, error = %cleanup, "removing a container that failed to start");
            }
            return Err(e);
        }
        Ok(CreatedContainer {
            id: created.id,
            name,
        })
    }

    async fn is_running(&self, id: &str) -> Result<bool, RuntimeError> {
        let docker = self.docker().await?;
        match within("inspect container", docker.inspect_container(id, None)).await? {
            Ok(info) => Ok(info.state.and_then(|s| s.running).unwrap_or(false)),
            Err(e) if is_not_found(&e) => Ok(false),
            Err(e) => Err(classify(e)),
        }
    }

    async fn remove(&self, id: &str) -> Result<(), RuntimeError> {
        let options = RemoveContainerOptions {
            force: true,
            ..Default::default()
        };
        let docker = self.docker().await?;
        match within(
            "remove container",
            docker.remove_container(id, Some(options)),
        )
        .await?
        {
            Ok(()) => Ok(()),
            Err(e) if is_not_found(&e) => Ok(()),
            // 409: a removal is already in progress, which is what we want.
            Err(BollardError::DockerResponseServerError {
                status_code: 409, ..
            }) => Ok(()),
            Err(e) => Err(classify(e)),
        }
    }

    async fn list_managed(&self, instance: &str) -> Result<Vec<ManagedContainer>, RuntimeError> {
        let filters = HashMap::from([(
            "label".to_owned(),
            vec![
                format!("{}={}", labels::MANAGED_BY, labels::MANAGED_BY_VALUE),
                format!("{}={instance}", labels::INSTANCE),
            ],
        )]);
        let options = ListContainersOptions {
            all: true,
            filters: Some(filters),
            ..Default::default()
        };
        let list = bounded(
            "list containers",
            self.docker().await?.list_containers(Some(options)),
        )
        .await?;
        Ok(list
            .into_iter()
            .filter_map(|c| {
                let labels_of = c.labels.unwrap_or_default();
                Some(ManagedContainer {
                    id: c.id?,
                    name: c
                        .names
                        .and_then(|n| n.into_iter().next())
                        .map(|n| n.trim_start_matches('/').to_owned())
                        .unwrap_or_default(),
                    user: labels_of.get(labels::USER).cloned().unwrap_or_default(),
                    environment: labels_of
                        .get(labels::ENVIRONMENT)
                        .cloned()
                        .unwrap_or_default(),
                    session: labels_of.get(labels::SESSION).cloned(),
                    created_at: c.created.unwrap_or(0),
                    running: c.state == Some(ContainerSummaryStateEnum::RUNNING),
                })
            })
            .collect())
    }
}
