//! The objects envgate asks Kubernetes for, as pure functions of what is to run: the Pod, the
//! user's home claim and the agent's Secret. Kept free of I/O so every field the API server
//! receives is checked by unit tests, and the client code only sends what these return.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EmptyDirVolumeSource, EnvVar, LocalObjectReference,
    PersistentVolumeClaim, PersistentVolumeClaimSpec, PersistentVolumeClaimVolumeSource, Pod,
    PodSpec, ResourceRequirements, Secret, SecretVolumeSource, SecurityContext, Toleration, Volume,
    VolumeMount, VolumeResourceRequirements,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};

use super::names;
use super::{HomeSettings, PodSettings};
use crate::types::{AGENT_IN_CONTAINER, AGENT_SECRET_DIR, CAP_ADD};

/// Label keys: the Docker runtime's, so operators and `list` read both the same way.
pub mod labels {
    pub const MANAGED_BY: &str = "envgate.managed-by";
    pub const MANAGED_BY_VALUE: &str = "envgate";
    pub const INSTANCE: &str = "envgate.instance";
    pub const USER: &str = "envgate.user";
    pub const ENVIRONMENT: &str = "envgate.environment";
    pub const SESSION: &str = "envgate.session";
    /// `home` on a user's home claim, `agent-secret` on an agent Secret; Pods have none.
    pub const ROLE: &str = "envgate.role";
}

/// Annotation keys carrying the exact values a label cannot hold (a label value must start
/// and end with a letter or digit; a user name may start with `_`).
pub mod annotations {
    pub const USER: &str = "envgate.user";
    pub const SESSION: &str = "envgate.session";
}

/// Where the agent lives in the user's container, as on Docker (docs/agent.md).
pub const AGENT_DIR: &str = "/.envgate";
/// Where the agent image keeps the static binary the init container copies.
pub const AGENT_IN_IMAGE: &str = "/envgate-agent";
/// The user's container in the Pod (the init container is `envgate-agent-install`).
pub const MAIN_CONTAINER: &str = "env";
pub const INSTALL_CONTAINER: &str = "envgate-agent-install";
/// The agent forwards SIGTERM and waits 8 s (its `--stop-timeout-seconds`) before SIGKILL.
const TERMINATION_GRACE_SECONDS: i64 = 10;
const VOLUME_AGENT: &str = "envgate-agent";
const VOLUME_SECRET: &str = "envgate-agent-secret";
const VOLUME_HOME: &str = "home";
/// The key of the agent secret in its Secret, and the file name it is mounted as.
pub const SECRET_KEY: &str = "secret";

/// GPUs a Pod asks for, as the NVIDIA device plugin names them.
pub const GPU_RESOURCE: &str = "nvidia.com/gpu";

/// What one Pod runs: the runtime-neutral part of a placement plus its Kubernetes settings.
#[derive(Debug, Clone, PartialEq)]
pub struct PodRequest<'a> {
    pub instance: &'a str,
    pub user: &'a str,
    pub environment: &'a str,
    pub session: Option<&'a str>,
    pub image: &'a str,
    /// `NAME=value`.
    pub env: &'a [String],
    pub working_dir: &'a str,
    /// 0 = no limit.
    pub cpus: f64,
    /// 0 = no limit.
    pub memory_bytes: u64,
    /// 0 = none.
    pub gpus: u32,
    pub pod_name: &'a str,
    pub secret_name: &'a str,
    pub home_claim: &'a str,
    pub agent_image: &'a str,
    pub agent_port: u16,
    pub settings: &'a PodSettings,
}

/// The labels every object of one placement carries (selection by `list`).
pub fn placement_labels(
    instance: &str,
    user: &str,
    environment: &str,
    session: Option<&str>,
) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::from([
        (
            labels::MANAGED_BY.to_owned(),
            labels::MANAGED_BY_VALUE.to_owned(),
        ),
        (labels::INSTANCE.to_owned(), instance.to_owned()),
        (labels::USER.to_owned(), names::label_value(user)),
        (labels::ENVIRONMENT.to_owned(), environment.to_owned()),
    ]);
    if let Some(session) = session {
        labels.insert(labels::SESSION.to_owned(), names::label_value(session));
    }
    labels
}

fn placement_annotations(user: &str, session: Option<&str>) -> BTreeMap<String, String> {
    let mut annotations = BTreeMap::from([(annotations::USER.to_owned(), user.to_owned())]);
    if let Some(session) = session {
        annotations.insert(annotations::SESSION.to_owned(), session.to_owned());
    }
    annotations
}

/// CPU in millicores, so `0.5` is `500m` and never a float the API server would round.
pub fn cpu_quantity(cpus: f64) -> Quantity {
    Quantity(format!("{}m", (cpus * 1000.0).round() as u64))
}

/// The Pod: an init container copies the static agent from the agent image into an
/// `emptyDir`, and the user's image then runs it as PID 1 listening on TCP, so any image works
/// (even one without a shell or libc). The agent reads its secret from a read-only Secret
/// volume; the user's home is their claim at `/home/<user>`.
pub fn pod(req: &PodRequest<'_>) -> Pod {
    let agent_mount = |read_only: bool| VolumeMount {
        name: VOLUME_AGENT.to_owned(),
        mount_path: AGENT_DIR.to_owned(),
        read_only: Some(read_only),
        ..VolumeMount::default()
    };
    let mut limits = BTreeMap::new();
    if req.cpus > 0.0 {
        limits.insert("cpu".to_owned(), cpu_quantity(req.cpus));
    }
    if req.memory_bytes > 0 {
        limits.insert("memory".to_owned(), Quantity(req.memory_bytes.to_string()));
    }
    if req.gpus > 0 {
        limits.insert(GPU_RESOURCE.to_owned(), Quantity(req.gpus.to_string()));
    }
    // Requests equal limits: the Pod gets what the catalogue promises (Guaranteed QoS when
    // both CPU and memory are set) and the scheduler places it where that fits.
    let resources = (!limits.is_empty()).then(|| ResourceRequirements {
        requests: Some(limits.clone()),
        limits: Some(limits),
        ..ResourceRequirements::default()
    });
    let env: Vec<EnvVar> = req
        .env
        .iter()
        .map(|pair| {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            EnvVar {
                name: name.to_owned(),
                value: Some(value.to_owned()),
                ..EnvVar::default()
            }
        })
        .collect();
    let install = Container {
        name: INSTALL_CONTAINER.to_owned(),
        image: Some(req.agent_image.to_owned()),
        image_pull_policy: Some("IfNotPresent".to_owned()),
        command: Some(vec![
            "cp".to_owned(),
            AGENT_IN_IMAGE.to_owned(),
            AGENT_IN_CONTAINER.to_owned(),
        ]),
        volume_mounts: Some(vec![agent_mount(false)]),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".to_owned()]),
                ..Capabilities::default()
            }),
            ..SecurityContext::default()
        }),
        ..Container::default()
    };
    let main = Container {
        name: MAIN_CONTAINER.to_owned(),
        image: Some(req.image.to_owned()),
        image_pull_policy: req.settings.image_pull_policy.clone(),
        command: Some(vec![AGENT_IN_CONTAINER.to_owned()]),
        args: Some(vec![
            "--listen-tcp".to_owned(),
            format!("0.0.0.0:{}", req.agent_port),
            "--secret-file".to_owned(),
            format!("{AGENT_SECRET_DIR}/{SECRET_KEY}"),
        ]),
        ports: Some(vec![ContainerPort {
            name: Some("agent".to_owned()),
            container_port: i32::from(req.agent_port),
            protocol: Some("TCP".to_owned()),
            ..ContainerPort::default()
        }]),
        env: (!env.is_empty()).then_some(env),
        working_dir: (!req.working_dir.is_empty()).then(|| req.working_dir.to_owned()),
        resources,
        volume_mounts: Some(vec![
            agent_mount(true),
            VolumeMount {
                name: VOLUME_SECRET.to_owned(),
                mount_path: AGENT_SECRET_DIR.to_owned(),
                read_only: Some(true),
                ..VolumeMount::default()
            },
            VolumeMount {
                name: VOLUME_HOME.to_owned(),
                mount_path: format!("/home/{}", req.user),
                ..VolumeMount::default()
            },
        ]),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".to_owned()]),
                add: Some(CAP_ADD.iter().map(|c| (*c).to_owned()).collect()),
            }),
            ..SecurityContext::default()
        }),
        ..Container::default()
    };
    let volumes = vec![
        Volume {
            name: VOLUME_AGENT.to_owned(),
            empty_dir: Some(EmptyDirVolumeSource::default()),
            ..Volume::default()
        },
        Volume {
            name: VOLUME_SECRET.to_owned(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(req.secret_name.to_owned()),
                default_mode: Some(0o400),
                ..SecretVolumeSource::default()
            }),
            ..Volume::default()
        },
        Volume {
            name: VOLUME_HOME.to_owned(),
            persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                claim_name: req.home_claim.to_owned(),
                read_only: Some(false),
            }),
            ..Volume::default()
        },
    ];
    let settings = req.settings;
    Pod {
        metadata: ObjectMeta {
            name: Some(req.pod_name.to_owned()),
            labels: Some(placement_labels(
                req.instance,
                req.user,
                req.environment,
                req.session,
            )),
            annotations: Some(placement_annotations(req.user, req.session)),
            ..ObjectMeta::default()
        },
        spec: Some(PodSpec {
            hostname: Some(req.environment.to_owned()),
            init_containers: Some(vec![install]),
            containers: vec![main],
            volumes: Some(volumes),
            // A Pod whose agent exits is over: the reconciler sees it not running and
            // removes it, as a stopped Docker container.
            restart_policy: Some("Never".to_owned()),
            termination_grace_period_seconds: Some(TERMINATION_GRACE_SECONDS),
            // The user's shell must not hold envgate's (or anyone's) API credentials.
            automount_service_account_token: Some(false),
            enable_service_links: Some(false),
            node_selector: (!settings.node_selector.is_empty())
                .then(|| settings.node_selector.clone()),
            tolerations: (!settings.tolerations.is_empty()).then(|| settings.tolerations.clone()),
            image_pull_secrets: (!settings.image_pull_secrets.is_empty()).then(|| {
                settings
                    .image_pull_secrets
                    .iter()
                    .map(|name| LocalObjectReference { name: name.clone() })
                    .collect()
            }),
            ..PodSpec::default()
        }),
        status: None,
    }
}

/// The agent's Secret, made before its Pod (a Pod whose secret volume is missing waits in
/// the kubelet's mount back-off) and owned by the Pod once that exists, so Kubernetes' garbage
/// collector removes it with the Pod.
pub fn agent_secret(
    name: &str,
    instance: &str,
    user: &str,
    environment: &str,
    session: Option<&str>,
    secret: &str,
) -> Secret {
    let mut labels = placement_labels(instance, user, environment, session);
    labels.insert(labels::ROLE.to_owned(), "agent-secret".to_owned());
    Secret {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            labels: Some(labels),
            annotations: Some(placement_annotations(user, session)),
            ..ObjectMeta::default()
        },
        data: Some(BTreeMap::from([(
            SECRET_KEY.to_owned(),
            ByteString(secret.as_bytes().to_vec()),
        )])),
        immutable: Some(true),
        type_: Some("Opaque".to_owned()),
        ..Secret::default()
    }
}

/// The owner reference that hands `secret` to the Pod `pod_name` (uid from the created Pod).
pub fn owned_by_pod(pod_name: &str, pod_uid: &str) -> OwnerReference {
    OwnerReference {
        api_version: "v1".to_owned(),
        kind: "Pod".to_owned(),
        name: pod_name.to_owned(),
        uid: pod_uid.to_owned(),
        block_owner_deletion: Some(false),
        controller: Some(false),
    }
}

/// The user's home claim: one per user and instance, never removed by envgate (as the Docker
/// volume).
pub fn home_claim(
    name: &str,
    instance: &str,
    user: &str,
    home: &HomeSettings,
) -> PersistentVolumeClaim {
    let labels = BTreeMap::from([
        (
            labels::MANAGED_BY.to_owned(),
            labels::MANAGED_BY_VALUE.to_owned(),
        ),
        (labels::INSTANCE.to_owned(), instance.to_owned()),
        (labels::USER.to_owned(), names::label_value(user)),
        (labels::ROLE.to_owned(), "home".to_owned()),
    ]);
    PersistentVolumeClaim {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            labels: Some(labels),
            annotations: Some(BTreeMap::from([(
                annotations::USER.to_owned(),
                user.to_owned(),
            )])),
            ..ObjectMeta::default()
        },
        spec: Some(PersistentVolumeClaimSpec {
            access_modes: Some(vec![home.access_mode.clone()]),
            storage_class_name: home.storage_class.clone(),
            resources: Some(VolumeResourceRequirements {
                requests: Some(BTreeMap::from([(
                    "storage".to_owned(),
                    Quantity(home.size.clone()),
                )])),
                ..VolumeResourceRequirements::default()
            }),
            ..PersistentVolumeClaimSpec::default()
        }),
        status: None,
    }
}

/// A toleration as written in the catalogue: `key=value:Effect`, `key:Effect` (any value,
/// operator `Exists`) or `key=value` (any effect).
pub fn parse_toleration(text: &str) -> Result<Toleration, String> {
    let (rest, effect) = match text.rsplit_once(':') {
        Some((rest, effect)) => (rest, Some(effect)),
        None => (text, None),
    };
    if let Some(effect) = effect
        && !matches!(effect, "NoSchedule" | "PreferNoSchedule" | "NoExecute")
    {
        return Err(format!(
            "toleration {text:?}: effect {effect:?} is not NoSchedule, PreferNoSchedule or NoExecute"
        ));
    }
    let (key, value) = match rest.split_once('=') {
        Some((key, value)) => (key, Some(value)),
        None => (rest, None),
    };
    if key.is_empty() || !names::is_qualified_name(key) {
        return Err(format!(
            "toleration {text:?}: {key:?} is not a label key (letters, digits, -, _, ., an optional prefix/)"
        ));
    }
    if let Some(value) = value
        && !names::is_label_value(value)
    {
        return Err(format!(
            "toleration {text:?}: {value:?} is not a label value (at most 63 letters, digits, -, _, .)"
        ));
    }
    Ok(Toleration {
        key: Some(key.to_owned()),
        operator: Some(if value.is_some() { "Equal" } else { "Exists" }.to_owned()),
        value: value.map(str::to_owned),
        effect: effect.map(str::to_owned),
        toleration_seconds: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> PodSettings {
        PodSettings {
            node_selector: BTreeMap::from([("gpu".to_owned(), "a100".to_owned())]),
            tolerations: vec![parse_toleration("nvidia.com/gpu:NoSchedule").unwrap()],
            image_pull_policy: Some("Always".to_owned()),
            image_pull_secrets: vec!["lab-registry".to_owned()],
        }
    }

    fn request<'a>(settings: &'a PodSettings, env: &'a [String]) -> PodRequest<'a> {
        PodRequest {
            instance: "lab",
            user: "_alice",
            environment: "cuda",
            session: None,
            image: "registry.lab/cuda:12",
            env,
            working_dir: "/home/_alice",
            cpus: 1.5,
            memory_bytes: 2 << 30,
            gpus: 2,
            pod_name: "envgate-lab-alice-cuda-0a1b2c3d",
            secret_name: "envgate-lab-alice-cuda-0a1b2c3d-agent",
            home_claim: "envgate-lab-home-alice-1f2e3d4c",
            agent_image: "registry.lab/envgate-agent:0.1",
            agent_port: 7022,
            settings,
        }
    }

    #[test]
    fn kube_pod_runs_the_agent_from_an_init_container_and_empty_dir() {
        let settings = settings();
        let env = vec!["LANG=C.UTF-8".to_owned(), "EMPTY".to_owned()];
        let pod = pod(&request(&settings, &env));
        let spec = pod.spec.unwrap();
        let init = &spec.init_containers.unwrap()[0];
        assert_eq!(
            init.image.as_deref(),
            Some("registry.lab/envgate-agent:0.1")
        );
        assert_eq!(
            init.command.as_deref().unwrap(),
            ["cp", "/envgate-agent", "/.envgate/agent"]
        );
        let main = &spec.containers[0];
        assert_eq!(main.command.as_deref().unwrap(), ["/.envgate/agent"]);
        assert_eq!(
            main.args.as_deref().unwrap(),
            [
                "--listen-tcp",
                "0.0.0.0:7022",
                "--secret-file",
                "/run/envgate-secret/secret"
            ]
        );
        let volumes = spec.volumes.unwrap();
        assert!(volumes[0].empty_dir.is_some());
        assert_eq!(
            volumes[1].secret.as_ref().unwrap().secret_name.as_deref(),
            Some("envgate-lab-alice-cuda-0a1b2c3d-agent")
        );
        assert_eq!(
            volumes[1].secret.as_ref().unwrap().default_mode,
            Some(0o400)
        );
        assert_eq!(
            volumes[2]
                .persistent_volume_claim
                .as_ref()
                .unwrap()
                .claim_name,
            "envgate-lab-home-alice-1f2e3d4c"
        );
        let mounts = main.volume_mounts.as_ref().unwrap();
        assert_eq!(
            mounts
                .iter()
                .map(|m| (m.mount_path.as_str(), m.read_only))
                .collect::<Vec<_>>(),
            [
                ("/.envgate", Some(true)),
                ("/run/envgate-secret", Some(true)),
                ("/home/_alice", None)
            ]
        );
        assert_eq!(
            main.env.as_ref().unwrap()[1].value.as_deref(),
            Some(""),
            "a variable without = is set empty"
        );
        assert_eq!(spec.automount_service_account_token, Some(false));
        assert_eq!(spec.restart_policy.as_deref(), Some("Never"));
    }

    #[test]
    fn kube_pod_limits_gpus_placement_and_pull_settings_come_from_the_environment() {
        let settings = settings();
        let pod = pod(&request(&settings, &[]));
        let spec = pod.spec.unwrap();
        let main = &spec.containers[0];
        let resources = main.resources.as_ref().unwrap();
        let limits = resources.limits.as_ref().unwrap();
        assert_eq!(limits["cpu"].0, "1500m");
        assert_eq!(limits["memory"].0, (2u64 << 30).to_string());
        assert_eq!(limits["nvidia.com/gpu"].0, "2");
        assert_eq!(resources.requests.as_ref(), Some(limits));
        assert_eq!(main.image_pull_policy.as_deref(), Some("Always"));
        assert_eq!(spec.node_selector.unwrap()["gpu"], "a100");
        assert_eq!(
            spec.image_pull_secrets.unwrap()[0].name,
            "lab-registry".to_owned()
        );
        let toleration = &spec.tolerations.unwrap()[0];
        assert_eq!(toleration.key.as_deref(), Some("nvidia.com/gpu"));
        assert_eq!(toleration.operator.as_deref(), Some("Exists"));
        assert_eq!(toleration.effect.as_deref(), Some("NoSchedule"));
        let caps = main
            .security_context
            .as_ref()
            .unwrap()
            .capabilities
            .as_ref()
            .unwrap();
        assert_eq!(caps.drop.as_deref().unwrap(), ["ALL"]);
        assert_eq!(caps.add.as_deref().unwrap(), CAP_ADD);
    }

    #[test]
    fn kube_pod_without_limits_asks_for_nothing() {
        let settings = PodSettings::default();
        let mut req = request(&settings, &[]);
        req.cpus = 0.0;
        req.memory_bytes = 0;
        req.gpus = 0;
        let pod = pod(&req);
        let spec = pod.spec.unwrap();
        assert_eq!(spec.containers[0].resources, None);
        assert_eq!(spec.containers[0].image_pull_policy, None);
        assert_eq!(spec.node_selector, None);
        assert_eq!(spec.tolerations, None);
        assert_eq!(spec.image_pull_secrets, None);
    }

    #[test]
    fn kube_labels_mirror_docker_and_annotations_keep_exact_names() {
        let settings = settings();
        let mut req = request(&settings, &[]);
        req.session = Some("s-1");
        let meta = pod(&req).metadata;
        let labels = meta.labels.unwrap();
        assert_eq!(labels["envgate.managed-by"], "envgate");
        assert_eq!(labels["envgate.instance"], "lab");
        assert_eq!(labels["envgate.environment"], "cuda");
        assert_eq!(labels["envgate.session"], "s-1");
        assert!(names::is_label_value(&labels["envgate.user"]));
        let annotations = meta.annotations.unwrap();
        assert_eq!(annotations["envgate.user"], "_alice");
        assert_eq!(annotations["envgate.session"], "s-1");
    }

    #[test]
    fn kube_cpu_is_whole_millicores() {
        assert_eq!(cpu_quantity(0.5).0, "500m");
        assert_eq!(cpu_quantity(2.0).0, "2000m");
        assert_eq!(cpu_quantity(0.0015).0, "2m");
    }

    #[test]
    fn kube_secret_is_immutable_and_labelled() {
        let secret = agent_secret("p-agent", "lab", "bob", "dev", None, "ab12");
        assert_eq!(secret.data.unwrap()["secret"].0, b"ab12");
        assert_eq!(secret.immutable, Some(true));
        assert_eq!(
            secret.metadata.labels.unwrap()["envgate.role"],
            "agent-secret"
        );
        let owner = owned_by_pod("p", "uid-1");
        assert_eq!((owner.kind.as_str(), owner.uid.as_str()), ("Pod", "uid-1"));
    }

    #[test]
    fn kube_home_claim_carries_storage_class_size_and_access_mode() {
        let home = HomeSettings {
            storage_class: Some("fast-rwx".to_owned()),
            size: "20Gi".to_owned(),
            access_mode: "ReadWriteMany".to_owned(),
        };
        let claim = home_claim("envgate-lab-home-bob", "lab", "bob", &home);
        let spec = claim.spec.unwrap();
        assert_eq!(spec.storage_class_name.as_deref(), Some("fast-rwx"));
        assert_eq!(spec.access_modes.unwrap(), ["ReadWriteMany"]);
        assert_eq!(
            spec.resources.unwrap().requests.unwrap()["storage"].0,
            "20Gi"
        );
        assert_eq!(claim.metadata.labels.unwrap()["envgate.role"], "home");
    }

    #[test]
    fn kube_tolerations_parse_or_say_why_not() {
        let t = parse_toleration("dedicated=gpu:NoExecute").unwrap();
        assert_eq!(
            (
                t.key.as_deref(),
                t.operator.as_deref(),
                t.value.as_deref(),
                t.effect.as_deref()
            ),
            (
                Some("dedicated"),
                Some("Equal"),
                Some("gpu"),
                Some("NoExecute")
            )
        );
        let t = parse_toleration("dedicated=gpu").unwrap();
        assert_eq!(t.effect, None);
        assert_eq!(
            parse_toleration("dedicated=gpu:Sometimes").unwrap_err(),
            "toleration \"dedicated=gpu:Sometimes\": effect \"Sometimes\" is not NoSchedule, \
             PreferNoSchedule or NoExecute"
        );
        assert!(parse_toleration(":NoSchedule").is_err());
        assert!(parse_toleration("a b=c").is_err());
        assert!(parse_toleration("k=-bad-").is_err());
    }
}
