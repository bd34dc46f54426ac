//! The environment catalogue: the one validation every environment passes, whether it comes
//! from the admin API (`PutEnvironment`) or from the catalogue file (`--environments FILE`),
//! and the seeding of that file into etcd at start.
//!
//! The file is YAML (docs/environments.md, "The catalogue file"). It is parsed in two steps:
//! serde turns it into typed entries (unknown fields, wrong types, sizes, durations), then
//! each entry becomes a `pb::Environment` and goes through [`validate_environment`], the
//! function the admin API uses, so a file and an API call get the same verdict and the same
//! reason. Every error names the file, the entry (`environments[2] ("gpu")`) and the field.

use std::collections::HashMap;
use std::fmt;
use std::path::Path;
use std::time::Duration;

use envgate_proto::admin::v1 as pb;
use envgate_proto::names;
use envgate_proto::v1::EnvironmentMode;
use envgate_runtime::KubernetesPlacement;
use envgate_runtime::kubernetes::HomeSettings;
use envgate_runtime::kubernetes::settings::CatalogueKubernetes;
use serde::Deserialize;
use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};

use crate::error::{AdminError, ChoiceError};
use crate::model::{self, EnvironmentRecord, Gpus, Mode};
use crate::store::{self, Store, StoreError};
use crate::wire;

pub const DEFAULT_SHELL: &str = "/bin/sh";
pub const DEFAULT_IDLE_TIMEOUT_SECONDS: u32 = 900;
/// Most started, unassigned containers one environment may keep. The design's peak is a class
/// of 200–300 users arriving at once, so 300 covers a whole class; more only holds memory,
/// and a typo (3000) would ask one Docker engine for thousands of containers, which wedges it
/// (a single `docker rm` of ~700 ids already did, see `remove_containers` in deploy/local/fleet).
pub const MAX_WARM_POOL_SIZE: u32 = 300;

/// Most GPUs one container may ask for by count; the largest machines hold 8 to 16.
pub const MAX_GPU_COUNT: u32 = 64;
/// Shortest maximum lifetime: the user is warned before the end (issue #5), and a lifetime
/// shorter than a few reconciler passes could not be enforced or warned about meaningfully.
pub const MIN_MAX_LIFETIME_SECONDS: u32 = 10;
/// Docker refuses a memory limit below 6 MiB; catching it here also catches `memory: 512`
/// written as if the unit were MiB.
pub const MIN_MEMORY_BYTES: u64 = 6 * 1024 * 1024;
/// How long start-up seeding retries while etcd is unreachable before the process gives up.
pub const SEED_GIVE_UP_AFTER: Duration = Duration::from_secs(30);

const SIZE_HINT: &str = "use bytes, or a number with K, M, G, T, Ki, Mi, Gi, Ti";
const DURATION_HINT: &str = "use seconds, or a number with s, m, h, d, e.g. 90s, 15m, 1h30m";

/// Checks an environment as the admin API received it and fills in the defaults (shell,
/// mode, idle timeout). Field names in errors are the request's (`environment.cpus`).
/// `""`, or an account as `docker exec -u` takes it: a name, or `uid[:gid]`.
fn valid_run_as(run_as: &str) -> bool {
    let name = |s: &str| {
        !s.is_empty()
            && s.len() <= 32
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
            && !s.starts_with('-')
    };
    match run_as.split_once(':') {
        _ if run_as.is_empty() => true,
        None => name(run_as),
        Some((uid, gid)) => uid.parse::<u32>().is_ok() && gid.parse::<u32>().is_ok(),
    }
}

pub fn validate_environment(env: pb::Environment) -> Result<EnvironmentRecord, AdminError> {
    names::validate_environment(&env.name)
        .map_err(|e| AdminError::invalid("environment.name", e.to_string()))?;
    if env.name == names::SELF_SERVICE_ENV {
        return Err(AdminError::invalid(
            "environment.name",
            "\"envgate\" is reserved",
        ));
    }
    if env.image.trim().is_empty() {
        return Err(AdminError::invalid(
            "environment.image",
            "must not be empty",
        ));
    }
    let shell = if env.shell.is_empty() {
        DEFAULT_SHELL.to_owned()
    } else {
        env.shell
    };
    if !shell.starts_with('/') {
        return Err(AdminError::invalid(
            "environment.shell",
            "must be an absolute path",
        ));
    }
    if !env.working_dir.is_empty() && !env.working_dir.starts_with('/') {
        return Err(AdminError::invalid(
            "environment.working_dir",
            "must be an absolute path",
        ));
    }
    if !valid_run_as(&env.run_as) {
        return Err(AdminError::invalid(
            "environment.run_as",
            "must be empty (each user's own account), \"root\", an account name of the image, or uid[:gid]",
        ));
    }
    let mode = wire::requested_mode("environment.environment_mode", env.environment_mode)?;
    for (i, var) in env.env.iter().enumerate() {
        let valid = var
            .split_once('=')
            .is_some_and(|(k, _)| is_variable_name(k));
        if !valid {
            return Err(AdminError::invalid(
                format!("environment.env[{i}]"),
                "must be KEY=value",
            ));
        }
    }
    for (i, group) in env.allowed_groups.iter().enumerate() {
        if group.is_empty() || group.chars().any(char::is_whitespace) {
            return Err(AdminError::invalid(
                format!("environment.allowed_groups[{i}]"),
                "must be a non-empty word without spaces",
            ));
        }
    }
    if !env.cpus.is_finite() || env.cpus < 0.0 {
        return Err(AdminError::invalid(
            "environment.cpus",
            "must be a non-negative number",
        ));
    }
    if env.memory_bytes != 0 && env.memory_bytes < MIN_MEMORY_BYTES {
        return Err(AdminError::invalid(
            "environment.memory_bytes",
            format!(
                "must be 0 (no limit) or at least 6Mi ({MIN_MEMORY_BYTES} bytes), Docker's minimum"
            ),
        ));
    }
    if env.memory_bytes > i64::MAX as u64 {
        return Err(AdminError::invalid(
            "environment.memory_bytes",
            "is too large",
        ));
    }
    if env.pids_limit < 0 {
        return Err(AdminError::invalid(
            "environment.pids_limit",
            "must not be negative",
        ));
    }
    if env.warm_pool_size > MAX_WARM_POOL_SIZE {
        return Err(AdminError::invalid(
            "environment.warm_pool_size",
            format!("must be at most {MAX_WARM_POOL_SIZE}"),
        ));
    }
    if env.accept_env.len() > MAX_ACCEPT_ENV {
        return Err(AdminError::invalid(
            "environment.accept_env",
            format!("at most {MAX_ACCEPT_ENV} patterns"),
        ));
    }
    for (i, pattern) in env.accept_env.iter().enumerate() {
        let valid = !pattern.is_empty()
            && pattern.len() <= 64
            && pattern
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '*' | '?'));
        if !valid {
            return Err(AdminError::invalid(
                format!("environment.accept_env[{i}]"),
                "must be a variable name, or a pattern of letters, digits, _, * and ?",
            ));
        }
    }
    let gpus = gpus_from_pb(env.gpus)?;
    let kubernetes = kubernetes_from_pb(env.kubernetes)?;
    if env.max_lifetime_seconds != 0 && env.max_lifetime_seconds < MIN_MAX_LIFETIME_SECONDS {
        return Err(AdminError::invalid(
            "environment.max_lifetime_seconds",
            format!("must be 0 (no maximum) or at least {MIN_MAX_LIFETIME_SECONDS} seconds"),
        ));
    }
    Ok(EnvironmentRecord {
        name: env.name,
        description: env.description,
        image: env.image.trim().to_owned(),
        shell,
        working_dir: env.working_dir,
        run_as: env.run_as,
        env: env.env,
        mode,
        idle_timeout_seconds: if env.idle_timeout_seconds == 0 {
            DEFAULT_IDLE_TIMEOUT_SECONDS
        } else {
            env.idle_timeout_seconds
        },
        allowed_groups: env.allowed_groups,
        cpus: env.cpus,
        memory_bytes: env.memory_bytes,
        pids_limit: env.pids_limit,
        is_default: env.is_default,
        max_lifetime_seconds: env.max_lifetime_seconds,
        warm_pool_size: env.warm_pool_size,
        accept_env: env.accept_env,
        record_sessions: env.record_sessions,
        gpus,
        kubernetes,
    })
}

/// Checks the placement as the Kubernetes runtime will apply it; the error names the field
/// below `environment.kubernetes`.
fn kubernetes_from_pb(
    placement: Option<pb::KubernetesPlacement>,
) -> Result<KubernetesPlacement, AdminError> {
    let placement = placement.unwrap_or_default();
    let placement = KubernetesPlacement {
        node_selector: placement.node_selector.into_iter().collect(),
        tolerations: placement.tolerations,
        image_pull_policy: Some(placement.image_pull_policy).filter(|p| !p.is_empty()),
        image_pull_secrets: placement.image_pull_secrets,
    };
    placement.settings().map_err(|e| {
        // "tolerations[1]: toleration ...": the field, then why.
        let (field, reason) = e.split_once(": ").unwrap_or(("", &e));
        AdminError::invalid(format!("environment.kubernetes.{field}"), reason)
    })?;
    Ok(placement)
}

pub fn kubernetes_to_pb(placement: &KubernetesPlacement) -> Option<pb::KubernetesPlacement> {
    (!placement.is_empty()).then(|| pb::KubernetesPlacement {
        node_selector: placement.node_selector.clone().into_iter().collect(),
        tolerations: placement.tolerations.clone(),
        image_pull_policy: placement.image_pull_policy.clone().unwrap_or_default(),
        image_pull_secrets: placement.image_pull_secrets.clone(),
    })
}

fn gpus_from_pb(request: Option<pb::GpuRequest>) -> Result<Gpus, AdminError> {
    use pb::gpu_request::Request;
    match request.and_then(|r| r.request) {
        None | Some(Request::All(false)) => Ok(Gpus::None),
        Some(Request::All(true)) => Ok(Gpus::All),
        Some(Request::Count(0)) => Err(AdminError::invalid(
            "environment.gpus.count",
            "must be at least 1 (leave gpus out for none)",
        )),
        Some(Request::Count(n)) if n > MAX_GPU_COUNT => Err(AdminError::invalid(
            "environment.gpus.count",
            format!("must be at most {MAX_GPU_COUNT}"),
        )),
        Some(Request::Count(n)) => Ok(Gpus::Count(n)),
    }
}

pub fn gpus_to_pb(gpus: Gpus) -> Option<pb::GpuRequest> {
    use pb::gpu_request::Request;
    let request = match gpus {
        Gpus::None => return None,
        Gpus::All => Request::All(true),
        Gpus::Count(n) => Request::Count(n),
    };
    Some(pb::GpuRequest {
        request: Some(request),
    })
}

/// Most patterns one environment may list.
pub const MAX_ACCEPT_ENV: usize = 64;

/// The patterns in force for `env`.
pub fn accept_env(env: &EnvironmentRecord) -> Vec<String> {
    if env.accept_env.is_empty() {
        envgate_proto::names::DEFAULT_ACCEPT_ENV
            .iter()
            .map(|p| (*p).to_owned())
            .collect()
    } else {
        env.accept_env.clone()
    }
}

fn is_variable_name(name: &str) -> bool {
    !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Writes an environment; when it is the default, first clears the flag on every other one,
/// so the catalogue has one default. Both `PutEnvironment` and seeding save through here.
pub async fn save_environment(
    store: &dyn Store,
    record: &EnvironmentRecord,
) -> Result<(), StoreError> {
    if record.is_default {
        let others: Vec<(String, store::Versioned<EnvironmentRecord>)> =
            store::range_json(store, model::ENVIRONMENTS).await?;
        for (key, other) in others {
            if other.value.is_default && other.value.name != record.name {
                let cleared = EnvironmentRecord {
                    is_default: false,
                    ..other.value
                };
                store::put_json(store, &key, &cleared, None).await?;
            }
        }
    }
    store::put_json(store, &model::environment_key(&record.name), record, None).await?;
    Ok(())
}

/// Every environment of the catalogue in etcd, in key (so name) order.
pub async fn environments(store: &dyn Store) -> Result<Vec<EnvironmentRecord>, StoreError> {
    Ok(store::range_json(store, model::ENVIRONMENTS)
        .await?
        .into_iter()
        .map(|(_, v)| v.value)
        .collect())
}

/// The catalogue in etcd by environment name.
pub async fn environments_by_name(
    store: &dyn Store,
) -> Result<HashMap<String, EnvironmentRecord>, StoreError> {
    Ok(environments(store)
        .await?
        .into_iter()
        .map(|e| (e.name.clone(), e))
        .collect())
}

/// The names of the environments members of `groups` may use, in catalogue order.
pub fn available(catalogue: &[EnvironmentRecord], groups: &[String]) -> Vec<String> {
    catalogue
        .iter()
        .filter(|e| e.allows(groups))
        .map(|e| e.name.clone())
        .collect()
}

/// `requested` is no environment: NOT_FOUND naming the ones `groups` may use instead. The name
/// is escaped because the message ends up on the user's terminal.
pub fn unknown(catalogue: &[EnvironmentRecord], groups: &[String], requested: &str) -> ChoiceError {
    ChoiceError::UnknownEnvironment {
        requested: requested.escape_default().to_string(),
        available: available(catalogue, groups),
    }
}

/// The environment `name` of `catalogue`, when members of `groups` may use it.
pub fn choose<'c>(
    catalogue: &'c [EnvironmentRecord],
    groups: &[String],
    name: &str,
) -> Result<&'c EnvironmentRecord, ChoiceError> {
    match catalogue.iter().find(|e| e.name == name) {
        None => Err(unknown(catalogue, groups, name)),
        Some(env) if !env.allows(groups) => Err(ChoiceError::Forbidden(name.to_owned())),
        Some(env) => Ok(env),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CatalogueError {
    #[error("catalogue {path}: cannot read it: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    /// `reason` names the entry and the field: `environments[2] ("gpu"): resources.memory: …`.
    #[error("catalogue {path}: {reason}")]
    Invalid { path: String, reason: String },
}

#[derive(Debug, thiserror::Error)]
pub enum SeedError {
    #[error(
        "seeding environment \"{environment}\" from the catalogue file: etcd stayed unavailable for {} s: {source}",
        gave_up_after.as_secs()
    )]
    GaveUp {
        environment: String,
        gave_up_after: Duration,
        source: StoreError,
    },
    #[error("seeding environment \"{environment}\" from the catalogue file: {source}")]
    Store {
        environment: String,
        source: StoreError,
    },
}

/// Reads and checks a catalogue file.
pub fn load(path: &Path) -> Result<Vec<EnvironmentRecord>, CatalogueError> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| CatalogueError::Read {
        path: shown.clone(),
        source,
    })?;
    parse(&shown, &text)
}

/// Checks a catalogue's text; `origin` (a path) only names it in errors.
pub fn parse(origin: &str, text: &str) -> Result<Vec<EnvironmentRecord>, CatalogueError> {
    parse_text(text).map_err(|reason| CatalogueError::Invalid {
        path: origin.to_owned(),
        reason,
    })
}

fn parse_text(text: &str) -> Result<Vec<EnvironmentRecord>, String> {
    // A first, untyped pass: YAML syntax errors, and the entries' names for error labels.
    // It also refuses a key written twice in one mapping.
    let document: serde_yaml::Value = serde_yaml::from_str(text)
        .map_err(|e| with_entry_label(e.to_string(), |i| format!("environments[{i}]")))?;
    if document.is_null() {
        return Err("the file is empty; expected a mapping with `environments:`".to_owned());
    }
    let names: Vec<Option<String>> = document
        .get("environments")
        .and_then(serde_yaml::Value::as_sequence)
        .map(|entries| {
            entries
                .iter()
                .map(|e| e.get("name").and_then(|n| n.as_str()).map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    let label = |i: usize| match names.get(i).cloned().flatten() {
        Some(name) => format!("environments[{i}] ({name:?})"),
        None => format!("environments[{i}]"),
    };
    let file: CatalogueFile =
        serde_yaml::from_str(text).map_err(|e| with_entry_label(e.to_string(), label))?;

    let mut records: Vec<EnvironmentRecord> = Vec::with_capacity(file.environments.len());
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut default: Option<usize> = None;
    for (i, entry) in file.environments.into_iter().enumerate() {
        if let Some(first) = seen.get(&entry.name) {
            return Err(format!(
                "{}: name: {:?} is already defined by {}",
                label(i),
                entry.name,
                label(*first)
            ));
        }
        if entry.default {
            if let Some(first) = default {
                return Err(format!(
                    "{}: default: only one environment may be the default, and {} already is",
                    label(i),
                    label(first)
                ));
            }
            default = Some(i);
        }
        seen.insert(entry.name.clone(), i);
        let record = entry
            .into_record()
            .map_err(|e| format!("{}: {e}", label(i)))?;
        records.push(record);
    }
    kubernetes_home(text)?;
    Ok(records)
}

/// Reads a catalogue file's top-level `kubernetes:` block, the users' home claims
/// (docs/environments.md, "On Kubernetes"); the file is checked as `load` does. Each
/// environment's own block is part of its record.
pub fn load_kubernetes_home(path: &Path) -> Result<HomeSettings, CatalogueError> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| CatalogueError::Read {
        path: shown.clone(),
        source,
    })?;
    parse(&shown, &text)?;
    kubernetes_home(&text).map_err(|reason| CatalogueError::Invalid {
        path: shown,
        reason,
    })
}

fn kubernetes_home(text: &str) -> Result<HomeSettings, String> {
    /// Only the top-level block; `CatalogueFile` checks everything else.
    #[derive(Deserialize)]
    struct View {
        #[serde(default)]
        kubernetes: Option<CatalogueKubernetes>,
    }
    let view: View = serde_yaml::from_str(text).map_err(|e| e.to_string())?;
    view.kubernetes
        .unwrap_or_default()
        .home()
        .map_err(|e| format!("kubernetes.{e}"))
}

/// serde_yaml reports `environments[2].resources.memory: <message> at line L column C`;
/// this makes it `environments[2] ("gpu"): resources.memory: <message> at line L column C`.
fn with_entry_label(message: String, label: impl Fn(usize) -> String) -> String {
    let Some(rest) = message.strip_prefix("environments[") else {
        return message;
    };
    let Some((index, rest)) = rest.split_once(']') else {
        return message;
    };
    let Ok(index) = index.parse::<usize>() else {
        return message;
    };
    let rest = rest
        .strip_prefix(": ")
        .or_else(|| rest.strip_prefix('.'))
        .unwrap_or(rest);
    format!("{}: {rest}", label(index))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CatalogueFile {
    environments: Vec<Entry>,
    /// The Kubernetes runtime's home claims, checked by `kubernetes_home`.
    #[serde(default)]
    #[allow(dead_code)]
    kubernetes: Option<de::IgnoredAny>,
}

/// One environment as written in the file. Strings left out stay empty, which the shared
/// validation reads as "the default" (shell `/bin/sh`, working directory the user's home
/// `/home/USER`, mode persistent), exactly as for the admin API.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    name: String,
    #[serde(default)]
    description: String,
    image: String,
    #[serde(default)]
    shell: String,
    #[serde(default)]
    working_dir: String,
    /// Written `user:` in the file (`run_as` is accepted too, its name in the API).
    #[serde(default, rename = "user", alias = "run_as")]
    run_as: String,
    #[serde(default)]
    env: Variables,
    #[serde(default)]
    resources: Resources,
    /// `persistent` or `ephemeral`, the record's words (the wire's enum is for gRPC only).
    #[serde(default)]
    mode: Option<Mode>,
    idle_timeout: Option<Seconds>,
    #[serde(default)]
    max_lifetime: Seconds,
    #[serde(default)]
    warm_pool: u32,
    #[serde(default)]
    groups: Vec<String>,
    #[serde(default)]
    default: bool,
    #[serde(default)]
    accept_env: Vec<String>,
    /// Record sessions (asciicast, command log).
    #[serde(default)]
    record: bool,
    /// Where and how its Pods run on Kubernetes.
    #[serde(default)]
    kubernetes: Option<KubernetesPlacement>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Resources {
    #[serde(default)]
    cpus: f64,
    #[serde(default)]
    memory: Size,
    #[serde(default)]
    pids: i64,
    /// `all`, or a number of GPUs.
    #[serde(default)]
    gpus: Option<GpuField>,
}

/// `gpus: all` or `gpus: 2` in the file.
struct GpuField(pb::gpu_request::Request);

impl Entry {
    fn into_record(self) -> Result<EnvironmentRecord, String> {
        if self.idle_timeout.is_some_and(|t| t.0 == 0) {
            return Err(
                "idle_timeout: must be at least 1s (leave it out for the default, 15m)".to_owned(),
            );
        }
        let keys: Vec<String> = self.env.0.iter().map(|(k, _)| k.clone()).collect();
        let env = pb::Environment {
            name: self.name,
            description: self.description,
            image: self.image,
            shell: self.shell,
            working_dir: self.working_dir,
            run_as: self.run_as,
            env: self.env.0.iter().map(|(k, v)| format!("{k}={v}")).collect(),
            environment_mode: self
                .mode
                .map_or(EnvironmentMode::Unspecified, EnvironmentMode::from)
                .into(),
            idle_timeout_seconds: self.idle_timeout.map_or(0, |t| t.0),
            allowed_groups: self.groups,
            cpus: self.resources.cpus,
            memory_bytes: self.resources.memory.0,
            pids_limit: self.resources.pids,
            is_default: self.default,
            max_lifetime_seconds: self.max_lifetime.0,
            warm_pool_size: self.warm_pool,
            accept_env: self.accept_env,
            record_sessions: self.record,
            gpus: self
                .resources
                .gpus
                .map(|g| pb::GpuRequest { request: Some(g.0) }),
            kubernetes: self.kubernetes.as_ref().and_then(kubernetes_to_pb),
        };
        validate_environment(env).map_err(|e| match e {
            AdminError::Invalid { field, reason } => {
                format!("{}: {reason}", file_field(&field, &keys))
            }
            other => other.to_string(),
        })
    }
}

/// The file's name for a field the shared validation names by its API name.
fn file_field(api_field: &str, env_keys: &[String]) -> String {
    let field = api_field.strip_prefix("environment.").unwrap_or(api_field);
    let indexed = |prefix: &str| {
        field
            .strip_prefix(prefix)
            .and_then(|rest| rest.strip_suffix(']'))
            .and_then(|i| i.parse::<usize>().ok())
    };
    if let Some(i) = indexed("env[") {
        return match env_keys.get(i) {
            Some(key) => format!("env.{key}"),
            None => "env".to_owned(),
        };
    }
    if let Some(i) = indexed("allowed_groups[") {
        return format!("groups[{i}]");
    }
    match field {
        "cpus" => "resources.cpus",
        "memory_bytes" => "resources.memory",
        "pids_limit" => "resources.pids",
        "gpus.count" => "resources.gpus",
        "idle_timeout_seconds" => "idle_timeout",
        "max_lifetime_seconds" => "max_lifetime",
        "warm_pool_size" => "warm_pool",
        "allowed_groups" => "groups",
        "is_default" => "default",
        other => other,
    }
    .to_owned()
}

/// Bytes, from a plain integer or a number with a unit ("512Mi", "2G", "1.5Gi").
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Size(u64);

/// Whole seconds, from an integer or units ("90s", "15m", "8h", "1d", "1h30m").
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Seconds(u32);

/// Environment variables as a map `NAME: value`, in the file's order.
#[derive(Debug, Default)]
struct Variables(Vec<(String, String)>);

/// Parses a size with an optional K/M/G/T (powers of 1000) or Ki/Mi/Gi/Ti (powers of 1024)
/// suffix. Lower-case `m`/`g` are refused: Docker reads them as MiB/GiB, Kubernetes `m` as
/// thousandths, so either reading would surprise someone.
fn parse_size(text: &str) -> Result<u64, String> {
    let not_a_size = || format!("{text:?} is not a size ({SIZE_HINT})");
    let trimmed = text.trim();
    if trimmed.starts_with('-') {
        return Err(format!("{text:?} is negative"));
    }
    let split = trimmed
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(trimmed.len());
    let (number, unit) = trimmed.split_at(split);
    let multiplier: u128 = match unit {
        "" => 1,
        "K" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        "T" => 1_000_000_000_000,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        _ => return Err(not_a_size()),
    };
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    if whole.is_empty() || fraction.contains('.') || (number.contains('.') && fraction.is_empty()) {
        return Err(not_a_size());
    }
    if whole.len() > 20 || fraction.len() > 9 {
        return Err(format!("{text:?} is too large or too precise"));
    }
    let whole: u128 = whole.parse().map_err(|_| not_a_size())?;
    let scale = 10u128.pow(fraction.len() as u32);
    let fraction: u128 = if fraction.is_empty() {
        0
    } else {
        fraction.parse().map_err(|_| not_a_size())?
    };
    let scaled = (whole * scale + fraction) * multiplier;
    if !scaled.is_multiple_of(scale) {
        return Err(format!("{text:?} is not a whole number of bytes"));
    }
    let bytes = scaled / scale;
    if bytes > i64::MAX as u128 {
        return Err(format!("{text:?} is too large"));
    }
    Ok(bytes as u64)
}

/// Parses a duration: plain seconds ("900"), or numbers with units in the order d, h, m, s,
/// each at most once ("1h30m").
fn parse_duration(text: &str) -> Result<u32, String> {
    let not_a_duration = || format!("{text:?} is not a duration ({DURATION_HINT})");
    let trimmed = text.trim();
    if trimmed.starts_with('-') {
        return Err(format!("{text:?} is negative"));
    }
    if trimmed.is_empty() {
        return Err(not_a_duration());
    }
    let too_long = || format!("{text:?} is too long (at most {} seconds)", u32::MAX);
    if trimmed.chars().all(|c| c.is_ascii_digit()) {
        return trimmed.parse().map_err(|_| too_long());
    }
    let mut total: u64 = 0;
    let mut rest = trimmed;
    let mut previous_rank = usize::MAX;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .ok_or_else(not_a_duration)?;
        if digits == 0 {
            return Err(not_a_duration());
        }
        let (number, tail) = rest.split_at(digits);
        let unit = tail.chars().next().ok_or_else(not_a_duration)?;
        let (rank, seconds) = match unit {
            'd' => (3, 86_400u64),
            'h' => (2, 3_600),
            'm' => (1, 60),
            's' => (0, 1),
            _ => return Err(not_a_duration()),
        };
        if rank >= previous_rank {
            return Err(not_a_duration());
        }
        previous_rank = rank;
        let number: u64 = number.parse().map_err(|_| too_long())?;
        total = number
            .checked_mul(seconds)
            .and_then(|s| total.checked_add(s))
            .ok_or_else(too_long)?;
        rest = &tail[unit.len_utf8()..];
    }
    u32::try_from(total).map_err(|_| too_long())
}

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct SizeVisitor;
        impl Visitor<'_> for SizeVisitor {
            type Value = Size;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                write!(f, "a size ({SIZE_HINT})")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Size, E> {
                if v > i64::MAX as u64 {
                    return Err(E::custom(format!("{v} is too large")));
                }
                Ok(Size(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Size, E> {
                u64::try_from(v)
                    .map(Size)
                    .map_err(|_| E::custom(format!("{v} is negative")))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Size, E> {
                if v < 0.0 {
                    return Err(E::custom(format!("{v} is negative")));
                }
                if v.fract() != 0.0 || !v.is_finite() {
                    return Err(E::custom(format!("{v} is not a whole number of bytes")));
                }
                if v >= i64::MAX as f64 {
                    return Err(E::custom(format!("{v} is too large")));
                }
                Ok(Size(v as u64))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Size, E> {
                parse_size(v).map(Size).map_err(E::custom)
            }
        }
        deserializer.deserialize_any(SizeVisitor)
    }
}

impl<'de> Deserialize<'de> for GpuField {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        use pb::gpu_request::Request;
        struct GpuVisitor;
        impl Visitor<'_> for GpuVisitor {
            type Value = GpuField;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                write!(f, "all, or a number of GPUs")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<GpuField, E> {
                u32::try_from(v)
                    .map(|n| GpuField(Request::Count(n)))
                    .map_err(|_| E::custom(format!("{v} is too many GPUs")))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<GpuField, E> {
                match u64::try_from(v) {
                    Ok(v) => self.visit_u64(v),
                    Err(_) => Err(E::custom(format!("{v} is negative"))),
                }
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<GpuField, E> {
                match v.trim() {
                    "all" => Ok(GpuField(Request::All(true))),
                    _ => Err(E::custom(format!(
                        "{v:?} is not a GPU request (all, or a number of GPUs)"
                    ))),
                }
            }
        }
        deserializer.deserialize_any(GpuVisitor)
    }
}

impl<'de> Deserialize<'de> for Seconds {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct SecondsVisitor;
        impl Visitor<'_> for SecondsVisitor {
            type Value = Seconds;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                write!(f, "a duration ({DURATION_HINT})")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Seconds, E> {
                u32::try_from(v).map(Seconds).map_err(|_| {
                    E::custom(format!("{v} is too long (at most {} seconds)", u32::MAX))
                })
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Seconds, E> {
                match u64::try_from(v) {
                    Ok(v) => self.visit_u64(v),
                    Err(_) => Err(E::custom(format!("{v} is negative"))),
                }
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Seconds, E> {
                Err(E::custom(format!(
                    "{v} is not a whole number of seconds ({DURATION_HINT})"
                )))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Seconds, E> {
                parse_duration(v).map(Seconds).map_err(E::custom)
            }
        }
        deserializer.deserialize_any(SecondsVisitor)
    }
}

impl<'de> Deserialize<'de> for Variables {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct VariablesVisitor;
        impl<'de> Visitor<'de> for VariablesVisitor {
            type Value = Variables;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a map of NAME: value")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Variables, A::Error> {
                let mut vars: Vec<(String, String)> = Vec::new();
                while let Some(name) = map.next_key::<String>()? {
                    if !is_variable_name(&name) {
                        return Err(de::Error::custom(format!(
                            "{name:?} is not a variable name (letters, digits and '_')"
                        )));
                    }
                    let value = map.next_value::<Scalar>()?;
                    vars.push((name, value.0));
                }
                Ok(Variables(vars))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, _: A) -> Result<Variables, A::Error> {
                Err(de::Error::custom(
                    "must be a map of NAME: value (e.g. LANG: C.UTF-8), not a list of KEY=value",
                ))
            }
        }
        deserializer.deserialize_any(VariablesVisitor)
    }
}

/// An environment variable's value: a string, or a number or boolean written as-is.
struct Scalar(String);

impl<'de> Deserialize<'de> for Scalar {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ScalarVisitor;
        impl Visitor<'_> for ScalarVisitor {
            type Value = Scalar;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string, number or boolean")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Scalar, E> {
                Ok(Scalar(v.to_owned()))
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Scalar, E> {
                Ok(Scalar(v.to_string()))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Scalar, E> {
                Ok(Scalar(v.to_string()))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Scalar, E> {
                Ok(Scalar(v.to_string()))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Scalar, E> {
                Ok(Scalar(v.to_string()))
            }
            fn visit_unit<E: de::Error>(self) -> Result<Scalar, E> {
                Err(E::custom("needs a value (write \"\" for an empty one)"))
            }
        }
        deserializer.deserialize_any(ScalarVisitor)
    }
}

/// Writes every environment of the catalogue file into etcd, as `PutEnvironment` would.
/// Environments not in the file are left alone. While etcd is unreachable it retries with
/// backoff, for `give_up_after` at most (each call is itself bounded by the store's timeout),
/// because replicas often start while etcd is still electing a leader.
pub async fn seed(
    store: &dyn Store,
    environments: &[EnvironmentRecord],
    give_up_after: Duration,
) -> Result<(), SeedError> {
    let deadline = tokio::time::Instant::now() + give_up_after;
    let mut backoff = Duration::from_millis(100);
    for record in environments {
        loop {
            match save_environment(store, record).await {
                Ok(()) => break,
                Err(StoreError::Unavailable(reason))
                    if tokio::time::Instant::now() + backoff < deadline =>
                {
                    tracing::warn!(environment = %record.name, %reason, retry_in_ms = backoff.as_millis() as u64, "seeding the catalogue: etcd is unavailable; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
                Err(source @ StoreError::Unavailable(_)) => {
                    return Err(SeedError::GaveUp {
                        environment: record.name.clone(),
                        gave_up_after: give_up_after,
                        source,
                    });
                }
                Err(source) => {
                    return Err(SeedError::Store {
                        environment: record.name.clone(),
                        source,
                    });
                }
            }
        }
        tracing::info!(environment = %record.name, image = %record.image, "environment seeded from the catalogue file");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::store::{Compare, KeyValue, MemoryStore, StoreResult, Transaction, TxnOp};

    const FULL: &str = r#"
environments:
  - name: busybox
    description: BusyBox shell
    image: envgate/busybox:latest
    default: true
  - name: gpu
    description: CUDA for the lab
    image: " registry.example/lab/cuda:12 "
    shell: /bin/bash
    working_dir: /workspace
    user: "1000:1000"
    accept_env: [LANG, "PROJECT_*"]
    record: true
    env:
      LANG: C.UTF-8
      OMP_NUM_THREADS: 4
      DEBUG: false
      EMPTY: ""
    resources:
      cpus: 1.5
      memory: 1.5Gi
      pids: 256
      gpus: all
    mode: ephemeral
    idle_timeout: 1h30m
    max_lifetime: 8h
    warm_pool: 2
    groups: [students, staff]
"#;

    fn err(text: &str) -> String {
        parse("/etc/envgate/environments.yaml", text)
            .unwrap_err()
            .to_string()
    }

    /// A one-entry catalogue whose entry `gpu` has `extra` (indented lines) added.
    fn gpu_with(extra: &str) -> String {
        format!("environments:\n  - name: gpu\n    image: lab/cuda:12\n{extra}")
    }

    #[test]
    fn a_full_file_becomes_the_records_the_admin_api_would_store() {
        let records = parse("f", FULL).unwrap();
        assert_eq!(
            records,
            [
                EnvironmentRecord {
                    name: "busybox".into(),
                    description: "BusyBox shell".into(),
                    image: "envgate/busybox:latest".into(),
                    shell: "/bin/sh".into(),
                    working_dir: String::new(),
                    run_as: String::new(),
                    env: vec![],
                    mode: Mode::Persistent,
                    idle_timeout_seconds: 900,
                    allowed_groups: vec![],
                    cpus: 0.0,
                    memory_bytes: 0,
                    pids_limit: 0,
                    is_default: true,
                    max_lifetime_seconds: 0,
                    warm_pool_size: 0,
                    accept_env: vec![],
                    record_sessions: false,
                    gpus: Gpus::None,
                    kubernetes: KubernetesPlacement::default(),
                },
                EnvironmentRecord {
                    name: "gpu".into(),
                    description: "CUDA for the lab".into(),
                    image: "registry.example/lab/cuda:12".into(),
                    shell: "/bin/bash".into(),
                    working_dir: "/workspace".into(),
                    run_as: "1000:1000".into(),
                    env: vec![
                        "LANG=C.UTF-8".into(),
                        "OMP_NUM_THREADS=4".into(),
                        "DEBUG=false".into(),
                        "EMPTY=".into(),
                    ],
                    mode: Mode::Ephemeral,
                    idle_timeout_seconds: 5400,
                    allowed_groups: vec!["students".into(), "staff".into()],
                    cpus: 1.5,
                    memory_bytes: 1_610_612_736,
                    pids_limit: 256,
                    is_default: false,
                    max_lifetime_seconds: 28_800,
                    warm_pool_size: 2,
                    accept_env: vec!["LANG".into(), "PROJECT_*".into()],
                    record_sessions: true,
                    gpus: Gpus::All,
                    kubernetes: KubernetesPlacement::default(),
                },
            ]
        );
        // The same entry through the admin API's validation gives the same record.
        let via_api = validate_environment(pb::Environment {
            name: "busybox".into(),
            description: "BusyBox shell".into(),
            image: "envgate/busybox:latest".into(),
            is_default: true,
            ..Default::default()
        })
        .unwrap();
        assert_eq!(via_api, records[0]);
        assert!(parse("f", "environments: []\n").unwrap().is_empty());
    }

    #[test]
    fn kube_blocks_are_read_and_checked_with_their_entry() {
        let text = r#"kubernetes:
  home: {storage_class: fast, size: 50Gi}
environments:
  - name: cuda
    image: cuda:12
    resources: {gpus: 1}
    kubernetes:
      node_selector: {nvidia.com/gpu.present: "true"}
      tolerations: ["nvidia.com/gpu:NoSchedule"]
      image_pull_secrets: [lab-registry]
  - name: plain
    image: busybox
"#;
        let records = parse("f", text).unwrap();
        let home = kubernetes_home(text).unwrap();
        assert_eq!(home.storage_class.as_deref(), Some("fast"));
        assert_eq!(home.size, "50Gi");
        assert_eq!(home.access_mode, "ReadWriteOnce");
        // Each environment's block is part of its record, as the admin API stores it.
        let cuda = &records[0].kubernetes;
        assert_eq!(cuda.node_selector["nvidia.com/gpu.present"], "true");
        assert_eq!(cuda.image_pull_secrets, ["lab-registry"]);
        assert_eq!(cuda.tolerations, ["nvidia.com/gpu:NoSchedule"]);
        assert!(records[1].kubernetes.is_empty());
        let api = validate_environment(crate::admin::environment_to_pb(&records[0])).unwrap();
        assert_eq!(api.kubernetes, *cuda, "the API takes back what it gives");

        let bad = text.replace("NoSchedule", "Sometimes");
        assert_eq!(
            parse("f", &bad).unwrap_err().to_string(),
            "catalogue f: environments[0] (\"cuda\"): kubernetes.tolerations[0]: toleration \
             \"nvidia.com/gpu:Sometimes\": effect \"Sometimes\" is not NoSchedule, \
             PreferNoSchedule or NoExecute"
        );
        let bad = text.replace("50Gi", "lots");
        assert_eq!(
            parse("f", &bad).unwrap_err().to_string(),
            "catalogue f: kubernetes.home.size: \"lots\" is not a size (a whole number with Ki, \
             Mi, Gi, Ti, k, M, G or T, e.g. 20Gi)"
        );
        let bad = text.replace("image_pull_secrets", "pull_secrets");
        assert_eq!(
            parse("f", &bad).unwrap_err().to_string(),
            "catalogue f: environments[0] (\"cuda\"): kubernetes: unknown field `pull_secrets`, \
             expected one of `node_selector`, `tolerations`, `image_pull_policy`, \
             `image_pull_secrets` at line 10 column 7"
        );
    }

    #[test]
    fn unknown_fields_are_named_with_their_entry() {
        assert_eq!(
            err("environment: []\n"),
            "catalogue /etc/envgate/environments.yaml: unknown field `environment`, expected \
             `environments` or `kubernetes`"
        );
        assert_eq!(
            err(&gpu_with("    colour: red\n")),
            "catalogue /etc/envgate/environments.yaml: environments[0] (\"gpu\"): unknown field \
             `colour`, expected one of `name`, `description`, `image`, `shell`, `working_dir`, \
             `run_as`, `user`, `env`, `resources`, `mode`, `idle_timeout`, `max_lifetime`, `warm_pool`, \
             `groups`, `default`, `accept_env`, `record`, `kubernetes` at line 4 column 5"
        );
        let second = format!(
            "{}  - name: big\n    image: x\n    resources:\n      disks: 1\n",
            gpu_with("")
        );
        assert_eq!(
            err(&second),
            "catalogue /etc/envgate/environments.yaml: environments[1] (\"big\"): resources: \
             unknown field `disks`, expected one of `cpus`, `memory`, `pids`, `gpus` at line 7 \
             column 7"
        );
    }

    #[test]
    fn bad_values_get_the_precise_reason() {
        let cases: &[(&str, &str)] = &[
            (
                "    resources:\n      memory: 12XB\n",
                "environments[0] (\"gpu\"): resources.memory: \"12XB\" is not a size (use bytes, \
                 or a number with K, M, G, T, Ki, Mi, Gi, Ti) at line 5 column 15",
            ),
            (
                "    resources:\n      memory: -5\n",
                "environments[0] (\"gpu\"): resources.memory: -5 is negative at line 5 column 15",
            ),
            (
                "    resources:\n      memory: 99999999999Ti\n",
                "environments[0] (\"gpu\"): resources.memory: \"99999999999Ti\" is too large at \
                 line 5 column 15",
            ),
            (
                "    resources:\n      memory: 512\n",
                "environments[0] (\"gpu\"): resources.memory: must be 0 (no limit) or at least \
                 6Mi (6291456 bytes), Docker's minimum",
            ),
            (
                "    idle_timeout: 15x\n",
                "environments[0] (\"gpu\"): idle_timeout: \"15x\" is not a duration (use seconds, \
                 or a number with s, m, h, d, e.g. 90s, 15m, 1h30m) at line 4 column 19",
            ),
            (
                "    idle_timeout: 0\n",
                "environments[0] (\"gpu\"): idle_timeout: must be at least 1s (leave it out for \
                 the default, 15m)",
            ),
            (
                "    max_lifetime: 5s\n",
                "environments[0] (\"gpu\"): max_lifetime: must be 0 (no maximum) or at least 10 \
                 seconds",
            ),
            (
                "    warm_pool: 301\n",
                "environments[0] (\"gpu\"): warm_pool: must be at most 300",
            ),
            (
                "    shell: bash\n",
                "environments[0] (\"gpu\"): shell: must be an absolute path",
            ),
            (
                "    mode: forever\n",
                "environments[0] (\"gpu\"): mode: unknown variant `forever`, expected \
                 `persistent` or `ephemeral` at line 4 column 11",
            ),
            (
                "    groups: [\"two words\"]\n",
                "environments[0] (\"gpu\"): groups[0]: must be a non-empty word without spaces",
            ),
            (
                "    resources: {cpus: -1}\n",
                "environments[0] (\"gpu\"): resources.cpus: must be a non-negative number",
            ),
            (
                "    env: [\"LANG=C.UTF-8\"]\n",
                "environments[0] (\"gpu\"): env: must be a map of NAME: value (e.g. LANG: \
                 C.UTF-8), not a list of KEY=value at line 4 column 10",
            ),
            (
                "    env: {\"A=B\": x}\n",
                "environments[0] (\"gpu\"): env: \"A=B\" is not a variable name (letters, digits \
                 and '_') at line 4 column 10",
            ),
            (
                "    env: {A: 1, A: 2}\n",
                "environments[0]: env: duplicate entry with key \"A\" at line 4 column 10",
            ),
            (
                "    resources: {gpus: 0}\n",
                "environments[0] (\"gpu\"): resources.gpus: must be at least 1 (leave gpus out \
                 for none)",
            ),
            (
                "    resources: {gpus: 65}\n",
                "environments[0] (\"gpu\"): resources.gpus: must be at most 64",
            ),
            (
                "    resources: {gpus: -1}\n",
                "environments[0] (\"gpu\"): resources.gpus: -1 is negative at line 4 column 23",
            ),
            (
                "    resources: {gpus: two}\n",
                "environments[0] (\"gpu\"): resources.gpus: \"two\" is not a GPU request (all, or \
                 a number of GPUs) at line 4 column 23",
            ),
            (
                "    warm_pool: many\n",
                "environments[0] (\"gpu\"): warm_pool: invalid type: string \"many\", expected \
                 u32 at line 4 column 16",
            ),
        ];
        for (extra, expected) in cases {
            assert_eq!(
                err(&gpu_with(extra)),
                format!("catalogue /etc/envgate/environments.yaml: {expected}"),
                "for {extra:?}"
            );
        }
    }

    #[test]
    fn names_images_and_the_catalogue_as_a_whole() {
        let prefix = "catalogue /etc/envgate/environments.yaml: ";
        assert_eq!(
            err("environments:\n  - name: Big GPU\n    image: x\n"),
            format!(
                "{prefix}environments[0] (\"Big GPU\"): name: the environment name may contain \
                 only lowercase letters, digits and '-', and must start with a letter or digit"
            )
        );
        assert_eq!(
            err("environments:\n  - name: envgate\n    image: x\n"),
            format!("{prefix}environments[0] (\"envgate\"): name: \"envgate\" is reserved")
        );
        assert_eq!(
            err("environments:\n  - name: gpu\n    image: \"  \"\n"),
            format!("{prefix}environments[0] (\"gpu\"): image: must not be empty")
        );
        assert_eq!(
            err("environments:\n  - image: x\n"),
            format!("{prefix}environments[0]: missing field `name` at line 2 column 5")
        );
        assert_eq!(
            err(
                "environments:\n  - name: a\n    image: x\n  - name: b\n    image: y\n  - name: a\n    image: z\n"
            ),
            format!(
                "{prefix}environments[2] (\"a\"): name: \"a\" is already defined by \
                 environments[0] (\"a\")"
            )
        );
        assert_eq!(
            err(
                "environments:\n  - name: a\n    image: x\n    default: true\n  - name: b\n    image: y\n    default: true\n"
            ),
            format!(
                "{prefix}environments[1] (\"b\"): default: only one environment may be the \
                 default, and environments[0] (\"a\") already is"
            )
        );
        assert_eq!(
            err(""),
            format!("{prefix}the file is empty; expected a mapping with `environments:`")
        );
        assert!(
            err("environments: [\n").starts_with(&format!("{prefix}did not find expected node")),
            "{}",
            err("environments: [\n")
        );
    }

    #[test]
    fn sizes() {
        for (text, bytes) in [
            ("0", 0),
            ("1024", 1024),
            ("512Mi", 512 << 20),
            ("2G", 2_000_000_000),
            ("1.5Gi", 1_610_612_736),
            ("0.5K", 500),
            ("1Ti", 1 << 40),
        ] {
            assert_eq!(parse_size(text), Ok(bytes), "{text}");
        }
        let not_a_size = format!("is not a size ({SIZE_HINT})");
        for (text, reason) in [
            ("12XB", not_a_size.as_str()),
            ("512m", &not_a_size),
            ("Mi", &not_a_size),
            ("1.Gi", &not_a_size),
            ("1.2.3K", &not_a_size),
            ("-1Gi", "is negative"),
            ("1.3Ki", "is not a whole number of bytes"),
            ("9300000000G", "is too large"),
            ("123456789012345678901", "is too large or too precise"),
        ] {
            assert_eq!(parse_size(text), Err(format!("{text:?} {reason}")));
        }
    }

    #[test]
    fn durations() {
        for (text, seconds) in [
            ("0", 0),
            ("900", 900),
            ("90s", 90),
            ("15m", 900),
            ("8h", 28_800),
            ("1d", 86_400),
            ("1h30m", 5_400),
            ("1d2h3m4s", 93_784),
        ] {
            assert_eq!(parse_duration(text), Ok(seconds), "{text}");
        }
        let not_a_duration = format!("is not a duration ({DURATION_HINT})");
        let too_long = "is too long (at most 4294967295 seconds)";
        for (text, reason) in [
            ("", not_a_duration.as_str()),
            ("15x", &not_a_duration),
            ("1.5h", &not_a_duration),
            ("30m1h", &not_a_duration),
            ("1h1h", &not_a_duration),
            ("h", &not_a_duration),
            ("-5m", "is negative"),
            ("50000d", too_long),
            ("99999999999999999999s", too_long),
        ] {
            assert_eq!(parse_duration(text), Err(format!("{text:?} {reason}")));
        }
    }

    #[test]
    fn the_admin_api_names_the_new_fields() {
        let base = pb::Environment {
            name: "gpu".into(),
            image: "lab/cuda".into(),
            ..Default::default()
        };
        let e = validate_environment(pb::Environment {
            warm_pool_size: MAX_WARM_POOL_SIZE + 1,
            ..base.clone()
        })
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "environment.warm_pool_size: must be at most 300"
        );
        let e = validate_environment(pb::Environment {
            max_lifetime_seconds: 9,
            ..base.clone()
        })
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "environment.max_lifetime_seconds: must be 0 (no maximum) or at least 10 seconds"
        );
        let ok = validate_environment(pb::Environment {
            max_lifetime_seconds: 10,
            warm_pool_size: MAX_WARM_POOL_SIZE,
            ..base
        })
        .unwrap();
        assert_eq!((ok.max_lifetime_seconds, ok.warm_pool_size), (10, 300));
    }

    #[test]
    fn the_admin_api_checks_the_kubernetes_placement_field_by_field() {
        let with = |placement: pb::KubernetesPlacement| {
            validate_environment(pb::Environment {
                name: "cuda".into(),
                image: "lab/cuda".into(),
                kubernetes: Some(placement),
                ..Default::default()
            })
        };
        let good = pb::KubernetesPlacement {
            node_selector: [("nvidia.com/gpu.present".to_owned(), "true".to_owned())].into(),
            tolerations: vec!["nvidia.com/gpu:NoSchedule".into()],
            image_pull_policy: "IfNotPresent".into(),
            image_pull_secrets: vec!["lab-registry".into()],
        };
        let record = with(good.clone()).unwrap();
        assert_eq!(record.kubernetes.tolerations, ["nvidia.com/gpu:NoSchedule"]);
        assert_eq!(
            record.kubernetes.image_pull_policy.as_deref(),
            Some("IfNotPresent")
        );
        assert_eq!(kubernetes_to_pb(&record.kubernetes), Some(good.clone()));
        // An empty message is no placement at all, and reads back as none.
        let none = with(pb::KubernetesPlacement::default()).unwrap();
        assert!(none.kubernetes.is_empty());
        assert_eq!(kubernetes_to_pb(&none.kubernetes), None);
        let refused = |change: fn(&mut pb::KubernetesPlacement)| {
            let mut placement = good.clone();
            change(&mut placement);
            with(placement).unwrap_err().to_string()
        };
        assert_eq!(
            refused(|p| p.tolerations.push("gpu:Sometimes".into())),
            "environment.kubernetes.tolerations[1]: toleration \"gpu:Sometimes\": effect \
             \"Sometimes\" is not NoSchedule, PreferNoSchedule or NoExecute"
        );
        assert_eq!(
            refused(|p| p.image_pull_policy = "always".into()),
            "environment.kubernetes.image_pull_policy: \"always\" is not one of Always, \
             IfNotPresent, Never"
        );
        assert_eq!(
            refused(|p| p.image_pull_secrets = vec!["Lab Registry".into()]),
            "environment.kubernetes.image_pull_secrets[0]: \"Lab Registry\" is not a Secret name \
             (lowercase letters, digits, - and .)"
        );
        assert!(
            refused(|p| {
                p.node_selector.insert("zone".into(), "eu west".into());
            })
            .starts_with("environment.kubernetes.node_selector.zone: ")
        );
    }

    fn record(name: &str, is_default: bool) -> EnvironmentRecord {
        validate_environment(pb::Environment {
            name: name.into(),
            image: format!("lab/{name}"),
            is_default,
            ..Default::default()
        })
        .unwrap()
    }

    async fn stored(store: &dyn Store) -> Vec<(String, bool)> {
        let all: Vec<(String, store::Versioned<EnvironmentRecord>)> =
            store::range_json(store, model::ENVIRONMENTS).await.unwrap();
        all.into_iter()
            .map(|(_, r)| (r.value.image, r.value.is_default))
            .collect()
    }

    #[tokio::test]
    async fn seeding_overwrites_file_environments_and_keeps_the_others() {
        let store = MemoryStore::new();
        // Made through the admin API: `mine` (the default) and an older `busybox`.
        save_environment(&store, &record("mine", true))
            .await
            .unwrap();
        let old = EnvironmentRecord {
            image: "old/busybox".into(),
            ..record("busybox", false)
        };
        save_environment(&store, &old).await.unwrap();

        // A file without a default leaves `mine` the default.
        seed(&store, &[record("busybox", false)], Duration::from_secs(1))
            .await
            .unwrap();
        assert_eq!(
            stored(&store).await,
            [("lab/busybox".into(), false), ("lab/mine".into(), true)]
        );
        // A file naming a default takes the flag from `mine`, which survives.
        seed(
            &store,
            &[record("busybox", true), record("debian", false)],
            Duration::from_secs(1),
        )
        .await
        .unwrap();
        assert_eq!(
            stored(&store).await,
            [
                ("lab/busybox".into(), true),
                ("lab/debian".into(), false),
                ("lab/mine".into(), false)
            ]
        );
    }

    /// A memory store whose first `failures` reads and writes answer "unavailable".
    struct Flaky {
        inner: MemoryStore,
        failures: AtomicUsize,
    }

    impl Flaky {
        fn new(failures: usize) -> Self {
            Self {
                inner: MemoryStore::new(),
                failures: AtomicUsize::new(failures),
            }
        }

        fn fail(&self) -> StoreResult<()> {
            let left = self.failures.load(Ordering::SeqCst);
            if left > 0 {
                self.failures.store(left - 1, Ordering::SeqCst);
                return Err(StoreError::Unavailable(
                    "127.0.0.1:2379: connection refused".into(),
                ));
            }
            Ok(())
        }
    }

    crate::store::wrap_store!(Flaky, inner, {
        async fn get(&self, key: &str) -> StoreResult<Option<KeyValue>> {
            self.fail()?;
            self.inner.get(key).await
        }
        async fn range(&self, prefix: &str) -> StoreResult<Vec<KeyValue>> {
            self.fail()?;
            self.inner.range(prefix).await
        }
        async fn put(&self, key: &str, value: Vec<u8>, lease: Option<i64>) -> StoreResult<i64> {
            self.fail()?;
            self.inner.put(key, value, lease).await
        }
        async fn delete(&self, key: &str) -> StoreResult<bool> {
            self.fail()?;
            self.inner.delete(key).await
        }
        async fn txn(&self, compares: Vec<Compare>, ops: Vec<TxnOp>) -> StoreResult<Option<i64>> {
            self.fail()?;
            self.inner.txn(compares, ops).await
        }
        async fn txn_group(&self, group: Vec<Transaction>) -> StoreResult<Vec<Option<i64>>> {
            self.fail()?;
            self.inner.txn_group(group).await
        }
        async fn lease_revoke(&self, lease: i64) -> StoreResult<()> {
            self.inner.lease_revoke(lease).await
        }
    });

    #[tokio::test]
    async fn seeding_retries_while_etcd_is_briefly_unavailable() {
        let store = Flaky::new(3);
        seed(
            &store,
            &[record("busybox", true), record("debian", false)],
            Duration::from_secs(10),
        )
        .await
        .unwrap();
        assert_eq!(store.failures.load(Ordering::SeqCst), 0);
        assert_eq!(
            stored(&store).await,
            [("lab/busybox".into(), true), ("lab/debian".into(), false)]
        );
    }

    #[tokio::test]
    async fn seeding_gives_up_after_its_bound_with_a_clear_error() {
        let store = Arc::new(Flaky::new(usize::MAX));
        let started = std::time::Instant::now();
        let e = seed(
            store.as_ref(),
            &[record("busybox", true)],
            Duration::from_secs(1),
        )
        .await
        .unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(10));
        assert_eq!(
            e.to_string(),
            "seeding environment \"busybox\" from the catalogue file: etcd stayed unavailable \
             for 1 s: etcd is unavailable: 127.0.0.1:2379: connection refused"
        );
    }

    #[test]
    fn the_local_fleets_environments_are_limited_and_run_as_their_users() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/local/environments.yaml");
        let envs = load(&path).unwrap();
        let names: Vec<&str> = envs.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, ["busybox", "debian"]);
        for env in &envs {
            assert_eq!(
                (
                    env.cpus,
                    env.memory_bytes,
                    env.pids_limit,
                    env.run_as.as_str()
                ),
                (1.0, 1 << 30, 256, ""),
                "{}",
                env.name
            );
        }
    }

    #[test]
    fn run_as_is_an_account_or_nothing() {
        for good in [
            "", "root", "jovyan", "1000", "1000:100", "www-data", "a.b_c",
        ] {
            assert!(valid_run_as(good), "{good:?}");
        }
        for bad in [
            "root;id",
            "-u",
            "a b",
            "1000:",
            ":1000",
            "x:y",
            "root\n",
            &"a".repeat(33),
        ] {
            assert!(!valid_run_as(bad), "{bad:?}");
        }
    }
}
