//! The Kubernetes runtime (kube-rs): one Pod per user and environment (per session for
//! ephemeral environments) in one namespace, the user's home on a PersistentVolumeClaim per
//! user, the agent as the Pod's PID 1 on TCP, its secret in a Kubernetes Secret. Readiness is
//! read from a watch on the one Pod, never by polling.
//!
//! A placement's id is the Pod's name. The objects themselves are built by pure functions in
//! `objects.rs`; `status.rs` turns a Pod's status into one line for the user. Every API call
//! this module makes is listed in [`API_CALLS`], which the manifest test compares with the
//! Role in `deploy/kubernetes/rbac.yaml`.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod, Secret, Toleration};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::watcher;
use kube::{Api, Client};

#[cfg(any(test, feature = "testkit"))]
pub mod fake;
mod lifecycle;
pub mod names;
pub mod objects;
pub mod settings;
pub mod status;

#[cfg(test)]
mod conformance_tests;
#[cfg(test)]
mod fake_tests;
#[cfg(test)]
mod mock_tests;

pub use lifecycle::{NO_WARM_POOLS, pod_input};
use status::Progress;

/// Every (resource, verb) this runtime asks the API server for: the Role must grant exactly
/// these (`controlplane/tests/kubernetes_manifests.rs` checks both ways).
pub const API_CALLS: &[(&str, &str)] = &[
    ("persistentvolumeclaims", "create"),
    ("persistentvolumeclaims", "get"),
    ("pods", "create"),
    ("pods", "delete"),
    ("pods", "get"),
    ("pods", "list"),
    ("pods", "watch"),
    ("secrets", "create"),
    ("secrets", "delete"),
    ("secrets", "patch"),
];

/// Bound on one API call (a watch is bounded by the start timeout instead).
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a Pod may take from creation to a running agent (scheduling, pulls) by default.
pub const DEFAULT_START_TIMEOUT: Duration = Duration::from_secs(600);
/// The port the agent listens on in every Pod.
pub const AGENT_PORT: u16 = 7022;

/// An environment's placement settings: its checked [`KubernetesPlacement`](crate::KubernetesPlacement).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PodSettings {
    pub node_selector: BTreeMap<String, String>,
    pub tolerations: Vec<Toleration>,
    /// `Always`, `IfNotPresent` or `Never`; `None`: the cluster's default.
    pub image_pull_policy: Option<String>,
    /// Secrets in the namespace holding registry credentials.
    pub image_pull_secrets: Vec<String>,
}

/// The users' home claims, from the catalogue's top-level `kubernetes.home` block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HomeSettings {
    /// `None`: the cluster's default storage class.
    pub storage_class: Option<String>,
    /// A Kubernetes quantity, e.g. `10Gi`.
    pub size: String,
    /// `ReadWriteOnce` (all of one user's Pods then share a node), `ReadWriteMany` or
    /// `ReadWriteOncePod` (one Pod per user at a time).
    pub access_mode: String,
}

impl Default for HomeSettings {
    fn default() -> Self {
        Self {
            storage_class: None,
            size: "10Gi".to_owned(),
            access_mode: "ReadWriteOnce".to_owned(),
        }
    }
}

/// Everything the runtime needs besides the client.
#[derive(Debug, Clone, PartialEq)]
pub struct KubernetesConfig {
    pub namespace: String,
    /// An image with the static agent at `/envgate-agent` and a `cp` (docs/operations.md).
    pub agent_image: String,
    pub start_timeout: Duration,
    pub home: HomeSettings,
}

/// Where the client's configuration comes from (control-plane flags).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientSource {
    /// The Pod's service account (`KUBERNETES_SERVICE_HOST`, the mounted token).
    InCluster,
    /// A kubeconfig file, and optionally one of its contexts.
    Kubeconfig {
        path: PathBuf,
        context: Option<String>,
    },
    /// kube's inference: `$KUBECONFIG`, `~/.kube/config`, then in-cluster.
    Infer,
}

/// Connects the client; fails with one line when the configuration is unusable.
pub async fn client(source: &ClientSource) -> Result<Client, Failure> {
    let config = match source {
        ClientSource::InCluster => kube::Config::incluster()
            .map_err(|e| Failure::Unavailable(format!("kubernetes in-cluster config: {e}")))?,
        ClientSource::Kubeconfig { path, context } => {
            let kubeconfig = kube::config::Kubeconfig::read_from(path).map_err(|e| {
                Failure::Unavailable(format!("kubeconfig {}: {}", path.display(), first_line(&e)))
            })?;
            let options = kube::config::KubeConfigOptions {
                context: context.clone(),
                ..Default::default()
            };
            kube::Config::from_custom_kubeconfig(kubeconfig, &options)
                .await
                .map_err(|e| {
                    Failure::Unavailable(format!(
                        "kubeconfig {}: {}",
                        path.display(),
                        first_line(&e)
                    ))
                })?
        }
        ClientSource::Infer => kube::Config::infer()
            .await
            .map_err(|e| Failure::Unavailable(format!("kubernetes config: {e}")))?,
    };
    Client::try_from(config).map_err(|e| Failure::Unavailable(format!("kubernetes client: {e}")))
}

/// Why a call failed, in the runtime-neutral shape the runtime trait maps to its errors.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Failure {
    /// The API server cannot be reached or refused our credentials.
    #[error("{0}")]
    Unavailable(String),
    /// One line for the user (a timeout, a rejected object, a container that exits).
    #[error("{0}")]
    Failed(String),
    /// The user's image cannot be pulled (`reason`: the kubelet's); `line` is for the user.
    #[error("{line}")]
    PullFailed {
        image: String,
        reason: String,
        line: String,
    },
}

/// A Pod that runs its agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartedPod {
    pub name: String,
    /// `<pod IP>:<agent port>`.
    pub agent_address: String,
    /// Hex, as in the Secret.
    pub secret: String,
}

/// A Pod carrying this instance's labels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListedPod {
    pub name: String,
    pub user: String,
    pub environment: String,
    pub session: Option<String>,
    /// Unix seconds.
    pub created_at: i64,
    pub running: bool,
}

/// What to start: the runtime-neutral spec's fields this runtime uses.
#[derive(Debug, Clone, PartialEq)]
pub struct PodSpecInput {
    pub instance: String,
    pub user: String,
    pub environment: String,
    pub session: Option<String>,
    pub image: String,
    pub env: Vec<String>,
    pub working_dir: String,
    pub cpus: f64,
    pub memory_bytes: u64,
    /// 0 = none. "All GPUs" has no meaning on a cluster; the caller rejects it.
    pub gpus: u32,
    /// The environment's placement, checked.
    pub settings: PodSettings,
}

pub struct KubernetesRuntime {
    client: Client,
    config: KubernetesConfig,
}

impl KubernetesRuntime {
    pub fn new(client: Client, config: KubernetesConfig) -> Self {
        Self { client, config }
    }

    pub fn config(&self) -> &KubernetesConfig {
        &self.config
    }

    fn pods(&self) -> Api<Pod> {
        Api::namespaced(self.client.clone(), &self.config.namespace)
    }

    fn secrets(&self) -> Api<Secret> {
        Api::namespaced(self.client.clone(), &self.config.namespace)
    }

    fn claims(&self) -> Api<PersistentVolumeClaim> {
        Api::namespaced(self.client.clone(), &self.config.namespace)
    }

    /// Makes the user's home claim if missing (one that exists is reused, also when another
    /// replica made it a moment ago); returns its name. Never removed by envgate.
    pub async fn ensure_home(&self, instance: &str, user: &str) -> Result<String, Failure> {
        let name = names::home_claim_name(instance, user);
        let claims = self.claims();
        if bounded("read the home claim", claims.get_opt(&name))
            .await?
            .is_some()
        {
            return Ok(name);
        }
        let claim = objects::home_claim(&name, instance, user, &self.config.home);
        match within(
            "create the home claim",
            claims.create(&PostParams::default(), &claim),
        )
        .await?
        {
            Ok(_) => Ok(name),
            Err(e) if status_code(&e) == Some(409) => Ok(name),
            Err(e) => Err(classify("create the home claim", e)),
        }
    }

    /// Creates the Pod (and its Secret) and waits on a watch until the agent runs; on any
    /// failure nothing is left behind. `progress` gets a line whenever what it waits for
    /// changes (no node fits yet, the image is being pulled).
    pub async fn start(
        &self,
        input: &PodSpecInput,
        progress: &(dyn for<'l> Fn(&'l str) + Send + Sync),
    ) -> Result<StartedPod, Failure> {
        let suffix = format!("{:08x}", rand::random::<u32>());
        let pod_name = names::pod_name(&input.instance, &input.user, &input.environment, &suffix);
        let secret_name = names::secret_name(&pod_name);
        let home_claim = names::home_claim_name(&input.instance, &input.user);
        let secret: String = rand::random::<[u8; 32]>()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let pod = objects::pod(&objects::PodRequest {
            instance: &input.instance,
            user: &input.user,
            environment: &input.environment,
            session: input.session.as_deref(),
            image: &input.image,
            env: &input.env,
            working_dir: &input.working_dir,
            cpus: input.cpus,
            memory_bytes: input.memory_bytes,
            gpus: input.gpus,
            pod_name: &pod_name,
            secret_name: &secret_name,
            home_claim: &home_claim,
            agent_image: &self.config.agent_image,
            agent_port: AGENT_PORT,
            settings: &input.settings,
        });
        let secret_object = objects::agent_secret(
            &secret_name,
            &input.instance,
            &input.user,
            &input.environment,
            input.session.as_deref(),
            &secret,
        );
        match within(
            "create the agent secret",
            self.secrets()
                .create(&PostParams::default(), &secret_object),
        )
        .await?
        {
            Ok(_) => {}
            Err(e) if status_code(&e) == Some(409) => {
                return Err(Failure::Failed(format!(
                    "the agent secret {secret_name} already exists; not reusing a secret envgate did not just make"
                )));
            }
            Err(e) => return Err(classify("create the agent secret", e)),
        }
        let created = match within(
            "create the pod",
            self.pods().create(&PostParams::default(), &pod),
        )
        .await
        {
            Ok(Ok(created)) => created,
            Ok(Err(e)) => {
                self.delete_secret(&secret_name).await;
                if status_code(&e) == Some(409) {
                    return Err(Failure::Failed(format!(
                        "pod {pod_name} already exists; try again"
                    )));
                }
                return Err(classify(
                    &format!("environment {:?}: create the pod", input.environment),
                    e,
                ));
            }
            Err(e) => {
                self.delete_secret(&secret_name).await;
                return Err(e);
            }
        };
        let uid = created.metadata.uid.clone().unwrap_or_default();
        if let Err(e) = self.hand_secret_to_pod(&secret_name, &pod_name, &uid).await {
            self.remove(&pod_name).await.ok();
            return Err(e);
        }
        match self
            .wait_running(&pod_name, &input.environment, progress)
            .await
        {
            Ok(ip) => Ok(StartedPod {
                name: pod_name,
                agent_address: agent_address(&ip),
                secret,
            }),
            Err(e) => {
                if let Err(cleanup) = self.remove(&pod_name).await {
                    tracing::warn!(pod = %pod_name, error = %cleanup, "removing a pod that did not start");
                }
                Err(e)
            }
        }
    }

    /// The Secret becomes the Pod's dependant, so the garbage collector removes it with the Pod
    /// even when the Pod is deleted by someone else.
    async fn hand_secret_to_pod(
        &self,
        secret_name: &str,
        pod_name: &str,
        uid: &str,
    ) -> Result<(), Failure> {
        let patch = serde_json::json!({
            "metadata": {"ownerReferences": [objects::owned_by_pod(pod_name, uid)]}
        });
        within(
            "hand the agent secret to its pod",
            self.secrets()
                .patch(secret_name, &PatchParams::default(), &Patch::Merge(&patch)),
        )
        .await?
        .map(|_| ())
        .map_err(|e| classify("hand the agent secret to its pod", e))
    }

    /// Follows the one Pod on a watch until its agent runs, it fails for good, or the start
    /// timeout passes; returns its IP.
    async fn wait_running(
        &self,
        pod_name: &str,
        environment: &str,
        progress: &(dyn for<'l> Fn(&'l str) + Send + Sync),
    ) -> Result<String, Failure> {
        let config = watcher::Config::default().fields(&format!("metadata.name={pod_name}"));
        let mut events = watcher::watcher(self.pods(), config).boxed();
        let mut last_line: Option<String> = None;
        let follow = async {
            while let Some(event) = events.try_next().await.map_err(|e| {
                Failure::Unavailable(format!(
                    "environment {environment:?}: watching pod {pod_name}: {e}"
                ))
            })? {
                let pod = match event {
                    watcher::Event::Apply(pod) | watcher::Event::InitApply(pod) => pod,
                    watcher::Event::Delete(_) => {
                        return Err(Failure::Failed(format!(
                            "environment {environment:?}: pod {pod_name} was deleted while starting"
                        )));
                    }
                    watcher::Event::Init | watcher::Event::InitDone => continue,
                };
                match status::progress(&pod, environment) {
                    Progress::Running { ip } => return Ok(ip),
                    Progress::Failed(line) => return Err(Failure::Failed(line)),
                    Progress::ImageFailed {
                        image,
                        reason,
                        line,
                    } => {
                        return Err(Failure::PullFailed {
                            image,
                            reason,
                            line,
                        });
                    }
                    Progress::Waiting(line) => {
                        if let Some(line) = line
                            && last_line.as_deref() != Some(line.as_str())
                        {
                            progress(&line);
                            last_line = Some(line);
                        }
                    }
                }
            }
            Err(Failure::Unavailable(format!(
                "environment {environment:?}: the watch on pod {pod_name} ended"
            )))
        };
        match tokio::time::timeout(self.config.start_timeout, follow).await {
            Ok(result) => result,
            Err(_) => Err(Failure::Failed(format!(
                "environment {environment:?}: pod {pod_name} did not start within {}s ({})",
                self.config.start_timeout.as_secs(),
                last_line.as_deref().unwrap_or("still pending")
            ))),
        }
    }

    /// `false` when the Pod is gone, finished, or being deleted.
    pub async fn is_running(&self, name: &str) -> Result<bool, Failure> {
        let pod = bounded("read the pod", self.pods().get_opt(name)).await?;
        Ok(pod.is_some_and(|pod| pod_running(&pod)))
    }

    /// Deletes the Pod and its Secret; either being gone already is fine.
    pub async fn remove(&self, name: &str) -> Result<(), Failure> {
        match within(
            "delete the pod",
            self.pods().delete(name, &DeleteParams::default()),
        )
        .await?
        {
            Ok(_) => {}
            Err(e) if status_code(&e) == Some(404) => {}
            Err(e) => return Err(classify("delete the pod", e)),
        }
        // The garbage collector would remove it too; deleting it now leaves no secret behind
        // if the owner reference was never set (a replica that died mid-creation).
        self.delete_secret(&names::secret_name(name)).await;
        Ok(())
    }

    async fn delete_secret(&self, name: &str) {
        match within(
            "delete the agent secret",
            self.secrets().delete(name, &DeleteParams::default()),
        )
        .await
        {
            Ok(Ok(_)) => {}
            Ok(Err(e)) if status_code(&e) == Some(404) => {}
            Ok(Err(e)) => tracing::warn!(secret = %name, error = %e, "deleting an agent secret"),
            Err(e) => tracing::warn!(secret = %name, error = %e, "deleting an agent secret"),
        }
    }

    /// Every Pod labelled with `instance`, running or not.
    pub async fn list(&self, instance: &str) -> Result<Vec<ListedPod>, Failure> {
        let selector = format!(
            "{}={},{}={instance}",
            objects::labels::MANAGED_BY,
            objects::labels::MANAGED_BY_VALUE,
            objects::labels::INSTANCE
        );
        let pods = bounded(
            "list pods",
            self.pods().list(&ListParams::default().labels(&selector)),
        )
        .await?;
        Ok(pods
            .items
            .iter()
            .filter_map(|pod| {
                let meta = &pod.metadata;
                let labels = meta.labels.as_ref()?;
                let annotations = meta.annotations.clone().unwrap_or_default();
                Some(ListedPod {
                    name: meta.name.clone()?,
                    user: annotations
                        .get(objects::annotations::USER)
                        .or_else(|| labels.get(objects::labels::USER))
                        .cloned()
                        .unwrap_or_default(),
                    environment: labels
                        .get(objects::labels::ENVIRONMENT)
                        .cloned()
                        .unwrap_or_default(),
                    session: annotations
                        .get(objects::annotations::SESSION)
                        .or_else(|| labels.get(objects::labels::SESSION))
                        .cloned(),
                    created_at: meta
                        .creation_timestamp
                        .as_ref()
                        .map_or(0, |t| t.0.as_second()),
                    running: pod_running(pod),
                })
            })
            .collect())
    }
}

/// `ip:port`, with an IPv6 address in brackets (the agent address parser splits at the last
/// colon).
fn agent_address(ip: &str) -> String {
    if ip.contains(':') {
        format!("[{ip}]:{AGENT_PORT}")
    } else {
        format!("{ip}:{AGENT_PORT}")
    }
}

/// Running and not being deleted.
fn pod_running(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_none()
        && pod
            .status
            .as_ref()
            .and_then(|s| s.phase.as_deref())
            .is_some_and(|phase| phase == "Running")
}

fn status_code(e: &kube::Error) -> Option<u16> {
    match e {
        kube::Error::Api(status) => Some(status.code),
        _ => None,
    }
}

/// One line: the API server's own message for a refusal, "unavailable" for transport errors.
fn classify(what: &str, e: kube::Error) -> Failure {
    match e {
        kube::Error::Api(status) if status.code == 401 || status.code == 403 => {
            Failure::Unavailable(format!(
                "kubernetes refused to {what}: {} (check the control plane's Role)",
                status.message
            ))
        }
        kube::Error::Api(status) if status.code >= 500 => {
            Failure::Unavailable(format!("kubernetes cannot {what}: {}", status.message))
        }
        kube::Error::Api(status) => {
            Failure::Failed(format!("kubernetes refused to {what}: {}", status.message))
        }
        other => Failure::Unavailable(format!(
            "kubernetes is unavailable ({what}): {}",
            first_line(&other)
        )),
    }
}

/// Errors that quote YAML or a response span lines; a user and a log line get the first.
fn first_line(e: &dyn std::fmt::Display) -> String {
    e.to_string().lines().next().unwrap_or_default().to_owned()
}

/// Bounds a call; its error is classified.
async fn bounded<T>(
    what: &str,
    call: impl Future<Output = Result<T, kube::Error>>,
) -> Result<T, Failure> {
    within(what, call).await?.map_err(|e| classify(what, e))
}

/// Bounds a call, leaving its own error to the caller.
async fn within<T>(what: &str, call: impl Future<Output = T>) -> Result<T, Failure> {
    tokio::time::timeout(CALL_TIMEOUT, call).await.map_err(|_| {
        Failure::Unavailable(format!(
            "kubernetes did not answer within {}s ({what})",
            CALL_TIMEOUT.as_secs()
        ))
    })
}
