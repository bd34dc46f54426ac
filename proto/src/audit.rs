//! The audit log: who logged in, who administered what, which sessions ran where, which
//! containers came and went. One JSON object per line, written to its own file (`--audit-log`)
//! as soon as it happens, and also emitted as a tracing event on the target `audit`, so a log
//! shipper that only collects the process's output still gets it.
//!
//! Proxies record logins (they see every one, including those answered from their token
//! cache); the control plane records the credential checks it makes, admin calls, sessions
//! and containers. docs/security.md shows a line of each kind.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::Path;
use std::sync::{Arc, Mutex};

use serde::Serialize;

/// The tracing target audit events are emitted on.
pub const TARGET: &str = "audit";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Success,
    Failure,
}

/// How a user tried to prove who they are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Method {
    Publickey,
    Password,
    /// A password asked for by a keyboard-interactive prompt (RFC 4256).
    #[serde(rename = "keyboard-interactive")]
    KeyboardInteractive,
    /// An OpenSSH user certificate (docs/identity.md, "SSH certificates").
    Certificate,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// A login at a proxy, whatever decided it (the token cache or the control plane).
    Login {
        outcome: Outcome,
        user: String,
        client: String,
        method: Method,
        /// `SHA256:…` as `ssh-keygen -l` prints it; absent for passwords.
        #[serde(skip_serializing_if = "Option::is_none")]
        key_fingerprint: Option<String>,
        proxy: String,
        connection: String,
        /// The proxy answered from its token cache, without asking the control plane.
        cached: bool,
        #[serde(skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
    /// A credential the control plane checked for a proxy (`Auth.Authenticate`).
    Credential {
        outcome: Outcome,
        user: String,
        client: String,
        method: Method,
        #[serde(skip_serializing_if = "Option::is_none")]
        key_fingerprint: Option<String>,
        proxy: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
        /// A certificate login: the certificate's key id and serial, as `ssh-keygen -L`
        /// shows them, so an operator can find and revoke it.
        #[serde(skip_serializing_if = "Option::is_none")]
        key_id: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        serial: Option<u64>,
    },
    /// envgate's CA signed a user's public key (`ssh USER+envgate@host cert`).
    CertificateIssued {
        user: String,
        key_id: String,
        serial: u64,
        /// The certified key, `SHA256:…`.
        key_fingerprint: String,
        /// The CA key that signed, `SHA256:…`.
        ca_fingerprint: String,
        /// Unix seconds.
        valid_after: i64,
        valid_before: i64,
    },
    /// A call to the admin API, allowed or not.
    Admin {
        /// The operator's name from their admin credential; `-` when none was presented.
        admin: String,
        method: String,
        /// What the call acted on (`user alice`, `proxy p1`, …), `-` for none.
        target: String,
        outcome: Outcome,
        #[serde(skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
    SessionStart {
        session: String,
        user: String,
        environment: String,
        container: String,
        proxy: String,
        client: String,
        kind: String,
    },
    /// A session a proxy started in a container it had placed the user in before, from its
    /// own cache, because no control-plane replica answered (docs/operations.md, "When the
    /// control plane is down"). The control plane never saw it: this is its only record.
    SessionFromCache {
        /// The proxy's own id for it (`cached-…`); the control plane has no record of it.
        session: String,
        user: String,
        environment: String,
        container: String,
        proxy: String,
        client: String,
        connection: String,
        /// Why the control plane was not used (its status, for the operator).
        reason: String,
    },
    SessionEnd {
        session: String,
        user: String,
        environment: String,
        proxy: String,
        exit_status: i32,
        container_unreachable: bool,
    },
    ContainerCreate {
        user: String,
        environment: String,
        container: String,
        name: String,
        /// Created for a warm pool (no user yet).
        warm: bool,
    },
    /// A warm container handed to its user.
    ContainerAssign {
        user: String,
        environment: String,
        container: String,
        name: String,
    },
    /// By id: its create (or assign) record says whose it was.
    ContainerRemove { container: String },
}

/// The record as written: the event and when.
#[derive(Serialize)]
struct Line<'a> {
    ts: String,
    #[serde(flatten)]
    event: &'a Event,
}

enum Sink {
    /// Only the tracing event.
    Log,
    File(Mutex<File>),
    /// For tests: the lines written.
    Memory(Mutex<Vec<String>>),
}

/// Where audit records go. Cheap to clone; every clone writes to the same place.
#[derive(Clone)]
pub struct AuditLog {
    sink: Arc<Sink>,
}

impl AuditLog {
    /// Records only as tracing events (no `--audit-log`).
    pub fn log_only() -> Self {
        Self {
            sink: Arc::new(Sink::Log),
        }
    }

    /// Appends to `path` (created `0600` if missing). Several processes may append to one
    /// file: each record is a single `write` of one line to a file opened `O_APPEND`.
    pub fn to_file(path: &Path) -> io::Result<Self> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(path)?;
        Ok(Self {
            sink: Arc::new(Sink::File(Mutex::new(file))),
        })
    }

    /// What `--audit-log` asks for: a file, or only the tracing events.
    pub fn from_flag(path: Option<&Path>) -> io::Result<Self> {
        path.map_or_else(|| Ok(Self::log_only()), Self::to_file)
    }

    pub fn in_memory() -> Self {
        Self {
            sink: Arc::new(Sink::Memory(Mutex::new(Vec::new()))),
        }
    }

    /// The lines recorded so far by an [`AuditLog::in_memory`] log.
    pub fn lines(&self) -> Vec<String> {
        match &*self.sink {
            Sink::Memory(lines) => lines.lock().unwrap_or_else(|p| p.into_inner()).clone(),
            _ => Vec::new(),
        }
    }

    pub fn record(&self, event: Event) {
        let line = serde_json::to_string(&Line {
            ts: crate::time::now_rfc3339(),
            event: &event,
        })
        .expect("audit events serialize");
        tracing::info!(target: TARGET, "{line}");
        match &*self.sink {
            Sink::Log => {}
            Sink::File(file) => {
                let mut bytes = line.into_bytes();
                bytes.push(b'\n');
                let mut file = file.lock().unwrap_or_else(|p| p.into_inner());
                if let Err(e) = file.write_all(&bytes) {
                    tracing::error!(error = %e, "writing the audit log failed");
                }
            }
            Sink::Memory(lines) => lines.lock().unwrap_or_else(|p| p.into_inner()).push(line),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_are_one_json_object_per_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let log = AuditLog::to_file(&path).unwrap();
        log.record(Event::Login {
            outcome: Outcome::Failure,
            user: "alice\nforged".into(),
            client: "192.0.2.1:5000".into(),
            method: Method::Password,
            key_fingerprint: None,
            proxy: "p1".into(),
            connection: "0a1b2c3d".into(),
            cached: false,
            reason: Some("wrong credential".into()),
        });
        log.clone().record(Event::Admin {
            admin: "ops".into(),
            method: "PutUser".into(),
            target: "user alice".into(),
            outcome: Outcome::Success,
            error: None,
        });
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{text}");
        let login: serde_json::Value = serde_json::from_str(lines[0]).unwrap();
        assert_eq!(login["event"], "login");
        assert_eq!(login["outcome"], "failure");
        assert_eq!(login["method"], "password");
        // A newline in a user-supplied field cannot forge a second record.
        assert_eq!(login["user"], "alice\nforged");
        assert!(login.get("key_fingerprint").is_none());
        let admin: serde_json::Value = serde_json::from_str(lines[1]).unwrap();
        assert_eq!(admin["event"], "admin");
        assert_eq!(admin["admin"], "ops");
        assert!(admin["ts"].as_str().unwrap().ends_with('Z'));
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
