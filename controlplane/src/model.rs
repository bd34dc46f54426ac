//! The JSON records kept in etcd, and the keys they live under (relative to the prefix).

use serde::{Deserialize, Serialize};

pub fn user_key(user: &str) -> String {
    format!("users/{user}")
}
pub fn environment_key(env: &str) -> String {
    format!("environments/{env}")
}
/// The placement record of a persistent container.
pub fn container_key(user: &str, env: &str) -> String {
    format!("containers/{user}/{env}")
}
/// The placement record of an ephemeral container, owned by one session.
pub fn ephemeral_container_key(user: &str, env: &str, session: &str) -> String {
    format!("containers/{user}/{env}/{session}")
}
/// A warm, unassigned container of `env`, claimed in one transaction (see `placement`).
pub fn pool_key(env: &str, container_id: &str) -> String {
    format!("pool/{env}/{container_id}")
}
pub fn environment_pool(env: &str) -> String {
    format!("pool/{env}/")
}
pub fn user_containers(user: &str) -> String {
    format!("containers/{user}/")
}
pub fn session_key(id: &str) -> String {
    format!("sessions/{id}")
}
pub fn proxy_key(id: &str) -> String {
    format!("proxies/{id}")
}
pub fn revocation_key(user: &str) -> String {
    format!("revocations/{user}")
}
/// A command on its way to one proxy (see `fleet::relay_commands`).
pub fn command_key(proxy_id: &str, command_id: &str) -> String {
    format!("commands/{proxy_id}/{command_id}")
}
pub fn proxy_commands(proxy_id: &str) -> String {
    format!("commands/{proxy_id}/")
}
pub const USERS: &str = "users/";
pub const ENVIRONMENTS: &str = "environments/";
pub const CONTAINERS: &str = "containers/";
pub const POOL: &str = "pool/";
pub const SESSIONS: &str = "sessions/";
pub const PROXIES: &str = "proxies/";
pub const REVOCATIONS: &str = "revocations/";
pub const COMMANDS: &str = "commands/";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct UserRecord {
    pub name: String,
    /// argon2id PHC string; `None` means key-only login.
    #[serde(default)]
    pub password_hash: Option<String>,
    /// OpenSSH authorized_keys lines.
    #[serde(default)]
    pub authorized_keys: Vec<String>,
    #[serde(default)]
    pub groups: Vec<String>,
    #[serde(default)]
    pub default_environment: String,
    #[serde(default)]
    pub disabled: bool,
    /// Which identity source made the record (docs/identity.md): empty for the admin API,
    /// else `ldap`, `webhook` or `certificate`, which keep it up to date on each login.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub source: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// One container per user+environment, kept for `idle_timeout_seconds` after the last
    /// session.
    #[default]
    Persistent,
    /// One container per session, removed when the session closes.
    Ephemeral,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Persistent => "persistent",
            Mode::Ephemeral => "ephemeral",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct EnvironmentRecord {
    pub name: String,
    #[serde(default)]
    pub description: String,
    pub image: String,
    pub shell: String,
    #[serde(default)]
    pub working_dir: String,
    #[serde(default)]
    pub run_as: String,
    #[serde(default)]
    pub env: Vec<String>,
    #[serde(default)]
    pub mode: Mode,
    pub idle_timeout_seconds: u32,
    /// Empty: everyone may use it.
    #[serde(default)]
    pub allowed_groups: Vec<String>,
    /// 0 = the control plane's default.
    #[serde(default)]
    pub cpus: f64,
    #[serde(default)]
    pub memory_bytes: u64,
    #[serde(default)]
    pub pids_limit: i64,
    #[serde(default)]
    pub is_default: bool,
    /// Seconds a container may live at all; 0 = no maximum.
    #[serde(default)]
    pub max_lifetime_seconds: u32,
    /// Started, unassigned containers the leader keeps ready; 0 = none.
    #[serde(default)]
    pub warm_pool_size: u32,
    /// Client variables accepted (patterns); empty: `names::DEFAULT_ACCEPT_ENV`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub accept_env: Vec<String>,
    /// Sessions are recorded (asciicast, command log).
    #[serde(default)]
    pub record_sessions: bool,
    #[serde(default, skip_serializing_if = "Gpus::is_none")]
    pub gpus: Gpus,
    /// Where and how its Pods run on Kubernetes (checked when stored).
    #[serde(default, skip_serializing_if = "KubernetesPlacement::is_empty")]
    pub kubernetes: KubernetesPlacement,
}

pub use envgate_runtime::{Gpus, KubernetesPlacement};

impl EnvironmentRecord {
    pub fn allows(&self, groups: &[String]) -> bool {
        self.allowed_groups.is_empty() || self.allowed_groups.iter().any(|g| groups.contains(g))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ContainerState {
    /// A replica claimed the record and is creating the container.
    Creating,
    Running,
    /// The reaper claimed the record and is removing the container.
    Removing,
}

impl ContainerState {
    pub fn as_str(self) -> &'static str {
        match self {
            ContainerState::Creating => "creating",
            ContainerState::Running => "running",
            ContainerState::Removing => "removing",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerRecord {
    pub user: String,
    pub environment: String,
    pub runtime: String,
    /// Empty while `creating`.
    #[serde(default)]
    pub container_id: String,
    #[serde(default)]
    pub container_name: String,
    pub state: ContainerState,
    /// Unix seconds when the state last changed; a `creating` or `removing` record older than
    /// the placement timeout is stale (its replica died) and may be taken over.
    pub state_since: i64,
    pub created_at: i64,
    pub last_active_at: i64,
    /// Ephemeral containers: the owning session.
    #[serde(default)]
    pub session_id: String,
    /// The replica that set the current state, for logs.
    #[serde(default)]
    pub owner: String,
    /// Where the container's agent listens; empty: no agent (runtime exec).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub agent_address: String,
    /// The agent's per-container secret (hex), handed only to proxies in placements; kept
    /// here so every replica can answer (see docs/agent-security.md).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub agent_secret: String,
    /// Unix seconds when its sessions were told the maximum lifetime nears; 0: not yet. Set
    /// by CAS, once, so a repeated pass or a new leader never warns twice.
    #[serde(default)]
    pub lifetime_warned_at: i64,
    /// The uid its user's sessions run as (see `uids`); set by the placement that creates,
    /// claims or first attaches to it. `None` only in records from before uids existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
}

/// A started container waiting in an environment's warm pool, under `pool/{env}/{id}`.
/// Deleting this key (in the same transaction that writes the user's placement record)
/// is what claims it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolRecord {
    pub environment: String,
    /// The image it was started from; a container of an image the catalogue no longer
    /// names is drained from the pool.
    pub image: String,
    pub container_id: String,
    pub container_name: String,
    pub created_at: i64,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub agent_address: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub agent_secret: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionRecord {
    pub id: String,
    pub user: String,
    pub environment: String,
    /// The key of the placement record this session keeps alive.
    pub container_key: String,
    pub container_id: String,
    pub proxy_id: String,
    #[serde(default)]
    pub client_address: String,
    #[serde(default)]
    pub connection_id: String,
    #[serde(default)]
    pub kind: SessionKind,
    pub started_at: i64,
}

/// What a session runs, for the record. Stored as the word the proxy sent before the wire
/// had an enum (`shell`, `exec`, `sftp`, `forward`, or `""` when not said), so records of
/// either version read the same.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum SessionKind {
    Shell,
    Exec,
    Sftp,
    /// A port forwarding that came before any shell or command.
    Forward,
    /// Not said (an older proxy), or a word this version does not know.
    #[default]
    #[serde(rename = "", other)]
    Unspecified,
}

impl SessionKind {
    /// The stored word, which the audit log shows too.
    pub fn as_str(self) -> &'static str {
        match self {
            SessionKind::Shell => "shell",
            SessionKind::Exec => "exec",
            SessionKind::Sftp => "sftp",
            SessionKind::Forward => "forward",
            SessionKind::Unspecified => "",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProxyRecord {
    pub id: String,
    pub address: String,
    pub version: String,
    pub capacity: u32,
    pub draining: bool,
    pub sessions: u32,
    pub connections: u32,
    pub registered_at: i64,
    pub last_heartbeat_at: i64,
    /// The lease this record and the proxy's sessions are attached to.
    pub lease_id: i64,
    /// The proxy process that holds the lease (see `Register.incarnation`).
    #[serde(default)]
    pub incarnation: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevocationRecord {
    /// Tokens issued before this Unix second are refused.
    pub not_before: i64,
}

/// An admin command for one proxy, written by whichever replica took the admin call and
/// delivered by the replica the proxy's Fleet stream is attached to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum CommandRecord {
    Drain { grace_seconds: u32 },
    KillSession { session_id: String, message: String },
    Notice { session_id: String, message: String },
}

/// Unix seconds now.
pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records as the version before the wire enums wrote them: they must read unchanged,
    /// and write back the same words.
    #[test]
    fn records_written_before_the_wire_enums_still_read() {
        let session = r#"{"id":"s1","user":"alice","environment":"busybox",
            "container_key":"containers/alice/busybox","container_id":"c1","proxy_id":"p1",
            "client_address":"192.0.2.1:40000","connection_id":"conn","kind":"sftp",
            "started_at":1764176589}"#;
        let record: SessionRecord = serde_json::from_str(session).unwrap();
        assert_eq!(record.kind, SessionKind::Sftp);
        assert_eq!(serde_json::to_value(&record).unwrap()["kind"], "sftp");
        for (written, kind) in [
            (r#""kind":"shell","#, SessionKind::Shell),
            (r#""kind":"exec","#, SessionKind::Exec),
            (r#""kind":"forward","#, SessionKind::Forward),
            (r#""kind":"","#, SessionKind::Unspecified),
            (r#""kind":"x11","#, SessionKind::Unspecified),
            ("", SessionKind::Unspecified),
        ] {
            let json = session.replace(r#""kind":"sftp","#, written);
            let record: SessionRecord = serde_json::from_str(&json).unwrap();
            assert_eq!(record.kind, kind, "{written}");
            assert_eq!(
                serde_json::to_value(&record).unwrap()["kind"],
                kind.as_str()
            );
        }

        let environment: EnvironmentRecord = serde_json::from_str(
            r#"{"name":"scratch","image":"busybox","shell":"/bin/sh","mode":"ephemeral",
                "idle_timeout_seconds":900}"#,
        )
        .unwrap();
        assert_eq!(environment.mode, Mode::Ephemeral);
        assert_eq!(
            serde_json::to_value(&environment).unwrap()["mode"],
            "ephemeral"
        );
        let unsaid: EnvironmentRecord = serde_json::from_str(
            r#"{"name":"b","image":"busybox","shell":"/bin/sh","idle_timeout_seconds":900}"#,
        )
        .unwrap();
        assert_eq!(unsaid.mode, Mode::Persistent);

        for (word, state) in [
            ("creating", ContainerState::Creating),
            ("running", ContainerState::Running),
            ("removing", ContainerState::Removing),
        ] {
            let container: ContainerRecord = serde_json::from_str(&format!(
                r#"{{"user":"alice","environment":"busybox","runtime":"docker",
                    "container_id":"c1","container_name":"envgate-alice-busybox",
                    "state":"{word}","state_since":1,"created_at":1,"last_active_at":1}}"#
            ))
            .unwrap();
            assert_eq!(container.state, state);
            assert_eq!(serde_json::to_value(&container).unwrap()["state"], word);
            assert_eq!(state.as_str(), word);
        }
    }
}
