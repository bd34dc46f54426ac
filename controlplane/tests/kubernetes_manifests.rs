//! `deploy/kubernetes/`: every manifest parses into the Kubernetes API's own types, and the
//! references between them agree — selectors and labels, Service target ports and container
//! ports, probes, secrets and config maps and the kustomize generators that make them,
//! service accounts, the autoscaler's target, cert-manager's issuers and certificates and the
//! network policies — and every `ENVGATE_*` variable is a real option of the binary it
//! configures. cert-manager's kinds are not in `k8s-openapi`; the fields the checks need are
//! read into structs of their own.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::{
    ConfigMap, Container, Namespace, PersistentVolumeClaim, PodTemplateSpec, Service,
    ServiceAccount,
};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::Deserialize;

fn manifests_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/kubernetes")
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Kustomization {
    resources: Vec<String>,
    #[serde(default)]
    secret_generator: Vec<Generator>,
    #[serde(default)]
    config_map_generator: Vec<Generator>,
    #[serde(default)]
    images: Vec<Image>,
}

#[derive(Deserialize)]
struct Generator {
    name: String,
    #[serde(default)]
    files: Vec<String>,
    #[serde(default)]
    literals: Vec<String>,
}

impl Generator {
    /// The keys of the generated object: `key=path` / `key=value`, or a file's base name.
    fn keys(&self) -> BTreeSet<String> {
        self.files
            .iter()
            .chain(&self.literals)
            .map(|entry| match entry.split_once('=') {
                Some((key, _)) => key.to_owned(),
                None => entry.rsplit('/').next().unwrap_or(entry).to_owned(),
            })
            .collect()
    }
}

#[derive(Deserialize)]
struct Image {
    name: String,
}

/// cert-manager's `Issuer`: a CA backed by a certificate's secret, or self-signed.
#[derive(Deserialize)]
struct Issuer {
    metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    spec: IssuerSpec,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct IssuerSpec {
    ca: Option<IssuerCa>,
    self_signed: Option<serde_yaml::Value>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct IssuerCa {
    secret_name: String,
}

/// cert-manager's `Certificate`.
#[derive(Deserialize)]
struct Certificate {
    metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    spec: CertificateSpec,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct CertificateSpec {
    secret_name: String,
    #[serde(default, rename = "isCA")]
    is_ca: bool,
    #[serde(default)]
    usages: Vec<String>,
    issuer_ref: IssuerRef,
}

#[derive(Deserialize)]
struct IssuerRef {
    name: String,
    kind: String,
}

/// The files cert-manager writes into a certificate's secret (and its CSI volumes).
const CERTIFICATE_FILES: [&str; 3] = ["tls.crt", "tls.key", "ca.crt"];
const CSI_DRIVER: &str = "csi.cert-manager.io";

/// A pod-owning workload, reduced to what the references need.
struct Workload {
    kind: &'static str,
    name: String,
    selector: BTreeMap<String, String>,
    template: PodTemplateSpec,
}

impl Workload {
    fn labels(&self) -> BTreeMap<String, String> {
        self.template
            .metadata
            .as_ref()
            .and_then(|m| m.labels.clone())
            .unwrap_or_default()
    }

    fn containers(&self) -> &[Container] {
        self.template
            .spec
            .as_ref()
            .map_or(&[], |s| s.containers.as_slice())
    }
}

#[derive(Default)]
struct Manifests {
    kustomization: Option<Kustomization>,
    namespaces: Vec<Namespace>,
    services: Vec<Service>,
    workloads: Vec<Workload>,
    service_accounts: Vec<ServiceAccount>,
    autoscalers: Vec<HorizontalPodAutoscaler>,
    disruption_budgets: Vec<PodDisruptionBudget>,
    config_maps: Vec<ConfigMap>,
    issuers: Vec<Issuer>,
    certificates: Vec<Certificate>,
    network_policies: Vec<NetworkPolicy>,
    claims: Vec<PersistentVolumeClaim>,
    roles: Vec<Role>,
    role_bindings: Vec<RoleBinding>,
}

fn parse<T: serde::de::DeserializeOwned>(file: &str, doc: serde_yaml::Value) -> T {
    serde_yaml::from_value(doc).unwrap_or_else(|e| panic!("{file}: {e}"))
}

fn name_of(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> String {
    meta.name.clone().expect("every object has a name")
}

fn load() -> Manifests {
    let dir = manifests_dir();
    let text = std::fs::read_to_string(dir.join("kustomization.yaml")).unwrap();
    let kustomization: Kustomization = serde_yaml::from_str(&text).unwrap();
    let mut manifests = Manifests::default();
    let listed: BTreeSet<String> = kustomization.resources.iter().cloned().collect();
    let on_disk: BTreeSet<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".yaml") && n != "kustomization.yaml")
        .collect();
    assert_eq!(
        listed, on_disk,
        "kustomization resources vs the manifests on disk"
    );
    for file in &kustomization.resources {
        let text = std::fs::read_to_string(dir.join(file)).unwrap();
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let doc = serde_yaml::Value::deserialize(doc).unwrap();
            let kind = doc["kind"].as_str().unwrap_or_default().to_owned();
            match kind.as_str() {
                "Namespace" => manifests.namespaces.push(parse(file, doc)),
                "Service" => manifests.services.push(parse(file, doc)),
                "ServiceAccount" => manifests.service_accounts.push(parse(file, doc)),
                "HorizontalPodAutoscaler" => manifests.autoscalers.push(parse(file, doc)),
                "PodDisruptionBudget" => manifests.disruption_budgets.push(parse(file, doc)),
                "ConfigMap" => manifests.config_maps.push(parse(file, doc)),
                "Issuer" => manifests.issuers.push(parse(file, doc)),
                "Certificate" => manifests.certificates.push(parse(file, doc)),
                "NetworkPolicy" => manifests.network_policies.push(parse(file, doc)),
                "PersistentVolumeClaim" => manifests.claims.push(parse(file, doc)),
                "Role" => manifests.roles.push(parse(file, doc)),
                "RoleBinding" => manifests.role_bindings.push(parse(file, doc)),
                "Deployment" => {
                    let d: Deployment = parse(file, doc);
                    let spec = d.spec.expect("a Deployment has a spec");
                    manifests.workloads.push(Workload {
                        kind: "Deployment",
                        name: name_of(&d.metadata),
                        selector: spec.selector.match_labels.unwrap_or_default(),
                        template: spec.template,
                    });
                }
                "StatefulSet" => {
                    let s: StatefulSet = parse(file, doc);
                    let spec = s.spec.expect("a StatefulSet has a spec");
                    manifests.workloads.push(Workload {
                        kind: "StatefulSet",
                        name: name_of(&s.metadata),
                        selector: spec.selector.match_labels.unwrap_or_default(),
                        template: spec.template,
                    });
                }
                other => panic!("{file}: no check knows the kind {other:?}; add one"),
            }
        }
    }
    manifests.kustomization = Some(kustomization);
    manifests
}

fn selects(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    !selector.is_empty() && selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

#[test]
fn every_manifest_parses_and_the_references_agree() {
    let m = load();
    let kustomization = m.kustomization.as_ref().unwrap();
    // envgate's own, and the user Pods' (users.yaml).
    assert_eq!(m.namespaces.len(), 2);

    // Workloads select their own pods.
    for w in &m.workloads {
        assert!(
            selects(&w.selector, &w.labels()),
            "{} {}: selector {:?} vs template labels {:?}",
            w.kind,
            w.name,
            w.selector,
            w.labels()
        );
    }

    // Services select a workload, and their target ports are its container ports.
    for service in &m.services {
        let name = name_of(&service.metadata);
        let spec = service.spec.as_ref().unwrap();
        let selector = spec.selector.clone().unwrap_or_default();
        let targets: Vec<&Workload> = m
            .workloads
            .iter()
            .filter(|w| selects(&selector, &w.labels()))
            .collect();
        assert!(!targets.is_empty(), "Service {name} selects no workload");
        for port in spec.ports.as_deref().unwrap_or_default() {
            for w in &targets {
                let found = w
                    .containers()
                    .iter()
                    .flat_map(|c| c.ports.iter().flatten())
                    .any(|p| match &port.target_port {
                        Some(IntOrString::String(n)) => p.name.as_deref() == Some(n.as_str()),
                        Some(IntOrString::Int(n)) => p.container_port == *n,
                        None => p.container_port == port.port,
                    });
                assert!(
                    found,
                    "Service {name} port {:?} has no container port in {}",
                    port.name, w.name
                );
            }
        }
    }

    // Secrets come from a generator or are a cert-manager certificate's.
    let secrets: BTreeMap<&str, BTreeSet<String>> = kustomization
        .secret_generator
        .iter()
        .map(|g| (g.name.as_str(), g.keys()))
        .chain(m.certificates.iter().map(|c| {
            let files = CERTIFICATE_FILES.iter().map(|f| (*f).to_owned()).collect();
            (c.spec.secret_name.as_str(), files)
        }))
        .collect();
    // Config maps come from a generator or a manifest of their own (catalogue.yaml).
    let config_maps: BTreeMap<&str, BTreeSet<String>> = kustomization
        .config_map_generator
        .iter()
        .map(|g| (g.name.as_str(), g.keys()))
        .chain(m.config_maps.iter().map(|c| {
            let name = c.metadata.name.as_deref().expect("every object has a name");
            (
                name,
                c.data.iter().flatten().map(|(k, _)| k.clone()).collect(),
            )
        }))
        .collect();
    let accounts: BTreeSet<String> = m
        .service_accounts
        .iter()
        .map(|a| name_of(&a.metadata))
        .collect();
    let images: BTreeSet<&str> = kustomization
        .images
        .iter()
        .map(|i| i.name.as_str())
        .collect();

    for w in &m.workloads {
        let pod = w.template.spec.as_ref().unwrap();
        if let Some(account) = &pod.service_account_name {
            assert!(
                accounts.contains(account),
                "{}: no ServiceAccount {account}",
                w.name
            );
        }
        // Secret volumes come from a generator, config map volumes from a generator or a
        // manifest; remember which files each mount offers.
        let mut mounted_files: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        let volumes = pod.volumes.as_deref().unwrap_or_default();
        for c in w.containers() {
            for mount in c.volume_mounts.as_deref().unwrap_or_default() {
                let volume = volumes.iter().find(|v| v.name == mount.name);
                let claim_template = w.kind == "StatefulSet";
                assert!(
                    volume.is_some() || claim_template,
                    "{}: mount of unknown volume {}",
                    w.name,
                    mount.name
                );
                if let Some(secret) = volume.and_then(|v| v.secret.as_ref()) {
                    let secret_name = secret.secret_name.as_deref().unwrap_or_default();
                    let keys = secrets.get(secret_name).unwrap_or_else(|| {
                        panic!("{}: secret {secret_name} is not generated", w.name)
                    });
                    mounted_files.insert(mount.mount_path.clone(), keys.clone());
                }
                if let Some(csi) = volume.and_then(|v| v.csi.as_ref()) {
                    assert_eq!(csi.driver, CSI_DRIVER, "{}: CSI volume", w.name);
                    let files = CERTIFICATE_FILES.iter().map(|f| (*f).to_owned()).collect();
                    mounted_files.insert(mount.mount_path.clone(), files);
                }
                if let Some(claim) = volume.and_then(|v| v.persistent_volume_claim.as_ref()) {
                    let found = m
                        .claims
                        .iter()
                        .find(|c| name_of(&c.metadata) == claim.claim_name)
                        .unwrap_or_else(|| {
                            panic!("{}: claim {} does not exist", w.name, claim.claim_name)
                        });
                    // Shared by every replica of every workload that mounts it.
                    let modes = found
                        .spec
                        .as_ref()
                        .and_then(|s| s.access_modes.clone())
                        .unwrap_or_default();
                    assert_eq!(
                        modes,
                        ["ReadWriteMany"],
                        "{}: claim {}",
                        w.name,
                        claim.claim_name
                    );
                }
                if let Some(config_map) = volume.and_then(|v| v.config_map.as_ref()) {
                    let keys = config_maps
                        .get(config_map.name.as_str())
                        .unwrap_or_else(|| {
                            panic!("{}: config map {} does not exist", w.name, config_map.name)
                        });
                    mounted_files.insert(mount.mount_path.clone(), keys.clone());
                }
            }
        }
        for c in w.containers() {
            let ports: BTreeSet<&str> = c
                .ports
                .iter()
                .flatten()
                .filter_map(|p| p.name.as_deref())
                .collect();
            for probe in [&c.readiness_probe, &c.liveness_probe]
                .into_iter()
                .flatten()
            {
                if let Some(get) = &probe.http_get
                    && let IntOrString::String(port) = &get.port
                {
                    assert!(
                        ports.contains(port.as_str()),
                        "{}/{}: probe port {port}",
                        w.name,
                        c.name
                    );
                }
            }
            for env in c.env.iter().flatten() {
                if let Some(from) = env
                    .value_from
                    .as_ref()
                    .and_then(|f| f.config_map_key_ref.as_ref())
                {
                    let keys = config_maps.get(from.name.as_str()).unwrap_or_else(|| {
                        panic!("{}: config map {} is not generated", w.name, from.name)
                    });
                    assert!(
                        keys.contains(&from.key),
                        "{}: {} has no key {}",
                        w.name,
                        from.name,
                        from.key
                    );
                }
                // A file path under a secret or config map mount names a file it has.
                if let Some(value) = &env.value
                    && let Some((dir, file)) = value.rsplit_once('/')
                    && let Some(keys) = mounted_files.get(dir)
                {
                    assert!(
                        keys.contains(file),
                        "{}: {}={value}: the volume at {dir} has {keys:?}",
                        w.name,
                        env.name
                    );
                }
            }
            if let Some(image) = &c.image
                && image.starts_with("envgate/")
            {
                assert!(
                    images.contains(image.as_str()),
                    "{}: image {image} not in kustomization images",
                    w.name
                );
            }
        }
    }

    check_certificates(&m);
    for policy in &m.network_policies {
        let spec = policy.spec.as_ref().unwrap();
        if policy.metadata.namespace.as_deref() == Some(USERS_NAMESPACE) {
            check_user_pod_policy(&m, policy);
            continue;
        }
        let selected: Vec<&Workload> = m
            .workloads
            .iter()
            .filter(|w| {
                selects(
                    &spec
                        .pod_selector
                        .as_ref()
                        .and_then(|s| s.match_labels.clone())
                        .unwrap_or_default(),
                    &w.labels(),
                )
            })
            .collect();
        assert!(
            !selected.is_empty(),
            "NetworkPolicy {} selects nothing",
            name_of(&policy.metadata)
        );
        for rule in spec.ingress.iter().flatten() {
            for peer in rule.from.iter().flatten() {
                let labels = peer
                    .pod_selector
                    .as_ref()
                    .and_then(|s| s.match_labels.clone())
                    .unwrap_or_default();
                assert!(
                    m.workloads.iter().any(|w| selects(&labels, &w.labels())),
                    "NetworkPolicy {}: a peer selects no pod",
                    name_of(&policy.metadata)
                );
            }
            for port in rule.ports.iter().flatten() {
                if let Some(IntOrString::String(name)) = &port.port {
                    assert!(
                        selected.iter().all(|w| w
                            .containers()
                            .iter()
                            .flat_map(|c| c.ports.iter().flatten())
                            .any(|p| p.name.as_deref() == Some(name))),
                        "NetworkPolicy {}: port {name} is not a port of every selected pod",
                        name_of(&policy.metadata)
                    );
                }
            }
        }
    }

    for hpa in &m.autoscalers {
        let target = &hpa.spec.as_ref().unwrap().scale_target_ref;
        assert!(
            m.workloads
                .iter()
                .any(|w| w.kind == target.kind && w.name == target.name),
            "HPA targets a missing {} {}",
            target.kind,
            target.name
        );
    }
    for pdb in &m.disruption_budgets {
        let selector = pdb
            .spec
            .as_ref()
            .and_then(|s| s.selector.as_ref())
            .and_then(|s| s.match_labels.clone())
            .unwrap_or_default();
        assert!(
            m.workloads.iter().any(|w| selects(&selector, &w.labels())),
            "PDB {} selects nothing",
            name_of(&pdb.metadata)
        );
    }
}

/// The certificates and the trust domains they make: each certificate's issuer exists, each CA
/// issuer is backed by a CA certificate, the control plane's server certificate and the
/// proxies' CSI certificates come from one issuer (the fleet CA), and etcd's certificates and
/// the control plane's etcd client certificate from another, so no proxy certificate opens
/// etcd.
fn check_certificates(m: &Manifests) {
    let issuer = |name: &str| {
        m.issuers
            .iter()
            .find(|i| i.metadata.name.as_deref() == Some(name))
            .unwrap_or_else(|| panic!("no Issuer {name}"))
    };
    for cert in &m.certificates {
        assert_eq!(cert.spec.issuer_ref.kind, "Issuer");
        let by = issuer(&cert.spec.issuer_ref.name);
        assert!(
            cert.spec.is_ca == by.spec.self_signed.is_some(),
            "{}: CAs (and only they) come from the self-signed issuer",
            name_of(&cert.metadata)
        );
    }
    for i in &m.issuers {
        if let Some(ca) = &i.spec.ca {
            assert!(
                m.certificates
                    .iter()
                    .any(|c| c.spec.is_ca && c.spec.secret_name == ca.secret_name),
                "Issuer {}: no CA certificate writes {}",
                name_of(&i.metadata),
                ca.secret_name
            );
        }
    }
    let issuer_of_secret = |secret: &str| {
        m.certificates
            .iter()
            .find(|c| c.spec.secret_name == secret)
            .map(|c| (c.spec.issuer_ref.name.clone(), c.spec.usages.clone()))
            .unwrap_or_else(|| panic!("no Certificate writes the secret {secret}"))
    };
    let pod_secrets = |image: &str| -> Vec<String> {
        m.workloads
            .iter()
            .filter(|w| {
                w.containers()
                    .iter()
                    .any(|c| c.image.as_deref() == Some(image))
            })
            .flat_map(|w| w.template.spec.as_ref().unwrap().volumes.iter().flatten())
            .filter_map(|v| v.secret.as_ref()?.secret_name.clone())
            .collect()
    };
    let controlplane = pod_secrets("envgate/controlplane");
    let (fleet, server_usages) = issuer_of_secret(
        controlplane
            .iter()
            .find(|s| s.as_str() == "envgate-controlplane-tls")
            .expect("the control plane mounts its server certificate"),
    );
    assert!(server_usages.contains(&"server auth".to_owned()));
    let (etcd_client_issuer, client_usages) = issuer_of_secret("envgate-controlplane-etcd");
    assert!(controlplane.contains(&"envgate-controlplane-etcd".to_owned()));
    assert_eq!(client_usages, ["client auth", "digital signature"]);
    let (etcd_issuer, _) = issuer_of_secret("etcd-tls");
    assert_eq!(
        etcd_client_issuer, etcd_issuer,
        "etcd trusts the control plane's certificate"
    );
    assert_ne!(fleet, etcd_issuer, "the fleet CA must not be etcd's CA");
    // Each proxy pod gets its own certificate, from the fleet CA, naming it.
    let proxy = m
        .workloads
        .iter()
        .find(|w| {
            w.containers()
                .iter()
                .any(|c| c.image.as_deref() == Some("envgate/proxy"))
        })
        .expect("a proxy workload");
    let csi = proxy
        .template
        .spec
        .as_ref()
        .unwrap()
        .volumes
        .iter()
        .flatten()
        .find_map(|v| v.csi.as_ref())
        .expect("the proxy's certificate is a CSI volume");
    let attributes = csi.volume_attributes.clone().unwrap_or_default();
    assert_eq!(attributes["csi.cert-manager.io/issuer-name"], fleet);
    assert_eq!(
        attributes["csi.cert-manager.io/uri-sans"],
        format!("{}${{POD_NAME}}", envgate_proto::tls::PROXY_URI_PREFIX)
    );
    assert_eq!(
        attributes["csi.cert-manager.io/key-usages"],
        "client auth,digital signature"
    );
}

/// `envgate-controlplane --help` (or the proxy's) lists `[env: NAME=]` for every option.
fn env_options(binary: &Path) -> BTreeSet<String> {
    let out = std::process::Command::new(binary)
        .arg("--help")
        .output()
        .unwrap_or_else(|e| panic!("{}: {e}", binary.display()));
    String::from_utf8_lossy(&out.stdout)
        .split("[env: ")
        .skip(1)
        .filter_map(|rest| rest.split_once('=').map(|(name, _)| name.to_owned()))
        .collect()
}

#[test]
fn every_envgate_variable_is_an_option_of_its_binary() {
    let controlplane = PathBuf::from(env!("CARGO_BIN_EXE_envgate-controlplane"));
    let proxy = controlplane.with_file_name("envgate-proxy");
    assert!(
        proxy.is_file(),
        "{} is missing: build it first (`cargo build -p envgate-proxy`)",
        proxy.display()
    );
    let m = load();
    for w in &m.workloads {
        for c in w.containers() {
            let binary = match c.image.as_deref() {
                Some("envgate/controlplane") => &controlplane,
                Some("envgate/proxy") => &proxy,
                _ => continue,
            };
            let known = env_options(binary);
            assert!(
                known.contains("ENVGATE_LISTEN"),
                "{}: no options read from --help",
                binary.display()
            );
            for env in c
                .env
                .iter()
                .flatten()
                .filter(|e| e.name.starts_with("ENVGATE_"))
            {
                assert!(
                    known.contains(&env.name),
                    "{}/{}: {} is not an option of {}",
                    w.name,
                    c.name,
                    env.name,
                    binary.display()
                );
            }
        }
    }
}

/// The control plane's `ENVGATE_ENVIRONMENTS` names a file of a mounted config map, and that
/// file is a catalogue the control plane's own parser accepts (a bad one would stop every
/// replica at start).
#[test]
fn the_control_planes_catalogue_is_mounted_and_valid() {
    let m = load();
    let controlplane = m
        .workloads
        .iter()
        .flat_map(|w| w.containers().iter().map(move |c| (w, c)))
        .find(|(_, c)| c.image.as_deref() == Some("envgate/controlplane"))
        .expect("a control-plane container");
    let (workload, container) = controlplane;
    let path = container
        .env
        .iter()
        .flatten()
        .find(|e| e.name == "ENVGATE_ENVIRONMENTS")
        .and_then(|e| e.value.clone())
        .expect("the control plane sets ENVGATE_ENVIRONMENTS");
    let (dir, file) = path.rsplit_once('/').expect("an absolute path");
    let mount = container
        .volume_mounts
        .iter()
        .flatten()
        .find(|v| v.mount_path == dir)
        .unwrap_or_else(|| panic!("nothing is mounted at {dir}"));
    let volume = workload
        .template
        .spec
        .as_ref()
        .and_then(|s| s.volumes.as_ref())
        .and_then(|vs| vs.iter().find(|v| v.name == mount.name))
        .unwrap_or_else(|| panic!("no volume {}", mount.name));
    let config_map = volume
        .config_map
        .as_ref()
        .unwrap_or_else(|| panic!("volume {} is not a config map", mount.name));
    let text = m
        .config_maps
        .iter()
        .find(|c| c.metadata.name.as_deref() == Some(config_map.name.as_str()))
        .and_then(|c| c.data.as_ref())
        .and_then(|d| d.get(file))
        .unwrap_or_else(|| panic!("config map {} has no {file}", config_map.name));
    let origin = format!("config map {} key {file}", config_map.name);
    let environments =
        envgate_controlplane::catalogue::parse(&origin, text).unwrap_or_else(|e| panic!("{e}"));
    assert!(!environments.is_empty(), "{origin} defines no environment");
    assert_eq!(
        environments.iter().filter(|e| e.is_default).count(),
        1,
        "{origin}: users without a choice need a default"
    );
}

/// The namespace user Pods run in (users.yaml); the control plane's ENVGATE_KUBE_NAMESPACE.
const USERS_NAMESPACE: &str = "envgate-users";

/// The user Pods' policy selects the labels the runtime gives every Pod, opens the agent's
/// port, and only to the proxies in envgate's namespace.
fn check_user_pod_policy(m: &Manifests, policy: &NetworkPolicy) {
    let name = name_of(&policy.metadata);
    let spec = policy.spec.as_ref().unwrap();
    let selector = spec
        .pod_selector
        .as_ref()
        .and_then(|s| s.match_labels.clone())
        .unwrap_or_default();
    let pod_labels =
        envgate_runtime::kubernetes::objects::placement_labels("lab", "alice", "dev", None);
    assert!(
        selects(&selector, &pod_labels),
        "NetworkPolicy {name}: selects no user Pod ({pod_labels:?})"
    );
    let rules = spec.ingress.as_deref().unwrap_or_default();
    assert_eq!(
        rules.len(),
        1,
        "NetworkPolicy {name}: one rule, for the proxies"
    );
    let ports: Vec<_> = rules[0].ports.iter().flatten().collect();
    assert_eq!(
        ports.iter().map(|p| p.port.clone()).collect::<Vec<_>>(),
        [Some(IntOrString::Int(i32::from(
            envgate_runtime::kubernetes::AGENT_PORT
        )))],
        "NetworkPolicy {name}: only the agent's port"
    );
    let proxy = m
        .workloads
        .iter()
        .find(|w| w.name == "envgate-proxy")
        .expect("the proxy Deployment");
    for peer in rules[0].from.iter().flatten() {
        let pods = peer
            .pod_selector
            .as_ref()
            .and_then(|s| s.match_labels.clone())
            .unwrap_or_default();
        let namespaces = peer
            .namespace_selector
            .as_ref()
            .and_then(|s| s.match_labels.clone())
            .unwrap_or_default();
        assert!(
            selects(&pods, &proxy.labels()),
            "NetworkPolicy {name}: a peer is not the proxies"
        );
        assert_eq!(
            namespaces
                .get("kubernetes.io/metadata.name")
                .map(String::as_str),
            Some("envgate"),
            "NetworkPolicy {name}: the proxies are in envgate's namespace"
        );
    }
}

/// The Role in the user namespace grants exactly the (resource, verb) pairs the Kubernetes
/// runtime calls (`API_CALLS`, itself checked against the requests the runtime makes in
/// `runtime/src/kubernetes/fake_tests.rs`): a call the Role lacks fails here, as does a
/// right the runtime does not use. It is bound to the control plane's account, which the
/// control plane's pods use with a token, pointed at that namespace.
#[test]
fn kube_role_grants_exactly_what_the_runtime_calls() {
    let m = load();
    let role = m
        .roles
        .iter()
        .find(|r| r.metadata.namespace.as_deref() == Some(USERS_NAMESPACE))
        .expect("a Role in the user namespace");
    let role_name = name_of(&role.metadata);
    let mut granted = BTreeSet::new();
    for rule in role.rules.iter().flatten() {
        assert_eq!(
            rule.api_groups.as_deref(),
            Some(&[String::new()][..]),
            "Role {role_name}: only the core API group"
        );
        assert!(
            rule.resource_names.is_none() && rule.non_resource_urls.is_none(),
            "Role {role_name}: plain resource rules"
        );
        for resource in rule.resources.iter().flatten() {
            for verb in &rule.verbs {
                assert_ne!(verb, "*", "Role {role_name}: no wildcard verbs");
                granted.insert((resource.clone(), verb.clone()));
            }
        }
    }
    let called: BTreeSet<(String, String)> = envgate_runtime::kubernetes::API_CALLS
        .iter()
        .map(|(r, v)| ((*r).to_owned(), (*v).to_owned()))
        .collect();
    assert_eq!(
        granted, called,
        "Role {role_name} vs the Kubernetes runtime's API_CALLS"
    );
    assert!(
        !granted.iter().any(|(r, _)| r == "pods/exec"),
        "sessions reach the agent over TCP, never exec"
    );
    assert!(
        m.roles.len() == 1,
        "the control plane needs one Role; any other grants more than the runtime calls"
    );

    let binding = m
        .role_bindings
        .iter()
        .find(|b| b.role_ref.name == role_name && b.role_ref.kind == "Role")
        .expect("a RoleBinding of the Role");
    assert_eq!(binding.metadata.namespace.as_deref(), Some(USERS_NAMESPACE));
    let subjects = binding.subjects.as_deref().unwrap_or_default();
    assert_eq!(subjects.len(), 1);
    assert_eq!(
        (
            subjects[0].kind.as_str(),
            subjects[0].name.as_str(),
            subjects[0].namespace.as_deref()
        ),
        ("ServiceAccount", "envgate-controlplane", Some("envgate"))
    );
    assert!(
        m.service_accounts
            .iter()
            .any(|a| name_of(&a.metadata) == "envgate-controlplane"),
        "the bound account exists"
    );
    assert!(
        m.namespaces
            .iter()
            .any(|n| name_of(&n.metadata) == USERS_NAMESPACE),
        "the user namespace is made"
    );

    let (workload, container) = m
        .workloads
        .iter()
        .flat_map(|w| w.containers().iter().map(move |c| (w, c)))
        .find(|(_, c)| c.image.as_deref() == Some("envgate/controlplane"))
        .expect("a control-plane container");
    let env = |name: &str| {
        container
            .env
            .iter()
            .flatten()
            .find(|e| e.name == name)
            .and_then(|e| e.value.clone())
    };
    assert_eq!(env("ENVGATE_RUNTIME").as_deref(), Some("kubernetes"));
    assert_eq!(
        env("ENVGATE_KUBE_NAMESPACE").as_deref(),
        Some(USERS_NAMESPACE)
    );
    assert_eq!(env("ENVGATE_KUBE_IN_CLUSTER").as_deref(), Some("true"));
    let agent_image = env("ENVGATE_KUBE_AGENT_IMAGE").expect("an agent image");
    assert!(
        m.kustomization
            .as_ref()
            .unwrap()
            .images
            .iter()
            .any(|i| i.name == agent_image),
        "the agent image {agent_image} is in the kustomization's images"
    );
    let pod = workload.template.spec.as_ref().unwrap();
    assert_eq!(
        pod.service_account_name.as_deref(),
        Some("envgate-controlplane")
    );
    assert_eq!(
        pod.automount_service_account_token,
        Some(true),
        "the control plane needs its token to call the API"
    );
    let proxy = m
        .workloads
        .iter()
        .find(|w| w.name == "envgate-proxy")
        .and_then(|w| w.template.spec.as_ref())
        .expect("the proxy Deployment");
    assert_eq!(
        proxy.automount_service_account_token,
        Some(false),
        "proxies never call the API"
    );
}
