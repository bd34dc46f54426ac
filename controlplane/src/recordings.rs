//! Session recordings as operators read them (`Admin/ListRecordings`, `GetRecording`). The
//! proxies write them under `<dir>/<user>/` (`proxy/src/recording.rs`): a directory every
//! proxy and replica mounts (the local fleet's `.fleet/recordings`, a ReadWriteMany volume
//! on Kubernetes).

use std::path::{Path, PathBuf};

use envgate_proto::admin::v1 as pb;

use crate::error::AdminError;

/// Largest recording `GetRecording` returns in one answer; a larger one is fetched from the
/// directory itself.
pub const MAX_FETCH: u64 = 64 << 20;

fn user_dir(dir: &Path, user: &str) -> Result<PathBuf, AdminError> {
    envgate_proto::names::validate_user(user)
        .map_err(|e| AdminError::invalid("user", e.to_string()))?;
    Ok(dir.join(user))
}

fn configured(dir: Option<&Path>) -> Result<&Path, AdminError> {
    dir.ok_or_else(|| {
        AdminError::Precondition(
            "this control plane keeps no recordings: start it with --recordings-dir, the directory the proxies write them to".into(),
        )
    })
}

/// A recording's file name as the proxies make them: `SESSION.log` or `SESSION-N.cast`.
fn valid_name(name: &str) -> bool {
    let stem = name
        .strip_suffix(".cast")
        .or_else(|| name.strip_suffix(".log"));
    stem.is_some_and(|s| {
        !s.is_empty() && s.len() <= 80 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    })
}

fn info(user: &str, name: String, meta: &std::fs::Metadata) -> pb::RecordingInfo {
    let modified = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_secs() as i64);
    pb::RecordingInfo {
        user: user.to_owned(),
        name,
        size: meta.len(),
        modified: envgate_proto::time::rfc3339(modified, None),
    }
}

pub fn list(dir: Option<&Path>, user: &str) -> Result<Vec<pb::RecordingInfo>, AdminError> {
    let path = user_dir(configured(dir)?, user)?;
    let entries = match std::fs::read_dir(&path) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => {
            return Err(AdminError::Precondition(format!(
                "cannot read {}: {e}",
                path.display()
            )));
        }
    };
    let mut found: Vec<(std::time::SystemTime, pb::RecordingInfo)> = entries
        .flatten()
        .filter_map(|entry| {
            let name = entry.file_name().to_str()?.to_owned();
            let meta = entry.metadata().ok().filter(|m| m.is_file())?;
            valid_name(&name).then(|| {
                (
                    meta.modified().unwrap_or(std::time::UNIX_EPOCH),
                    info(user, name, &meta),
                )
            })
        })
        .collect();
    found.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.name.cmp(&b.1.name)));
    Ok(found.into_iter().map(|(_, info)| info).collect())
}

pub fn get(dir: Option<&Path>, user: &str, name: &str) -> Result<pb::Recording, AdminError> {
    let path = user_dir(configured(dir)?, user)?;
    if !valid_name(name) {
        return Err(AdminError::invalid(
            "name",
            "not a recording's name (SESSION.log or SESSION-N.cast, as ListRecordings shows)",
        ));
    }
    let file = path.join(name);
    let meta = match std::fs::metadata(&file) {
        Ok(meta) if meta.is_file() => meta,
        _ => {
            return Err(AdminError::NotFound(format!(
                "recording {name:?} of user {user:?}"
            )));
        }
    };
    if meta.len() > MAX_FETCH {
        return Err(AdminError::Precondition(format!(
            "recording {name:?} is {} MiB, more than one answer carries ({} MiB): copy {} instead",
            meta.len() >> 20,
            MAX_FETCH >> 20,
            file.display()
        )));
    }
    let content = std::fs::read(&file)
        .map_err(|e| AdminError::Precondition(format!("cannot read {}: {e}", file.display())))?;
    Ok(pb::Recording {
        info: Some(info(user, name.to_owned(), &meta)),
        content,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_users_cannot_leave_the_directory() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("alice")).unwrap();
        std::fs::write(dir.path().join("alice/abc-1.cast"), "cast").unwrap();
        std::fs::write(dir.path().join("secret.log"), "not alice's").unwrap();
        let d = Some(dir.path());
        assert_eq!(list(d, "alice").unwrap().len(), 1);
        assert_eq!(get(d, "alice", "abc-1.cast").unwrap().content, b"cast");
        for bad in ["../secret.log", "abc-1.cast/..", "x.txt", ".log", "a/b.log"] {
            assert!(
                matches!(get(d, "alice", bad), Err(AdminError::Invalid { .. })),
                "{bad}"
            );
        }
        assert!(matches!(
            get(d, "..", "secret.log"),
            Err(AdminError::Invalid { .. })
        ));
        assert!(matches!(
            get(d, "alice", "nope.log"),
            Err(AdminError::NotFound(_))
        ));
        assert_eq!(list(d, "bob").unwrap(), Vec::new());
        assert!(matches!(
            list(None, "alice"),
            Err(AdminError::Precondition(_))
        ));
    }
}
