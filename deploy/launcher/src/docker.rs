//! The fleet's containers, home volumes and warm containers' home slots, through the docker
//! CLI: what `fleet down` removes and what `fleet chaos` compares before and after a fault.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Runs the docker CLI; its stdout, or `None` if it could not run or failed.
fn docker(args: &[&str]) -> Option<String> {
    let output = Command::new("docker")
        .args(args)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    output
        .status
        .success()
        .then(|| String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Whether the Docker engine answers.
pub fn reachable() -> bool {
    docker(&["info", "--format", "{{.ID}}"]).is_some()
}

fn lines(text: Option<String>) -> Vec<String> {
    text.unwrap_or_default()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(str::to_owned)
        .collect()
}

/// `instance`'s containers (all states): `name user+environment state`, sorted.
pub fn containers(instance: &str) -> Vec<String> {
    let filter = format!("label=envgate.instance={instance}");
    let mut found = lines(docker(&[
        "ps",
        "-a",
        "--filter",
        &filter,
        "--format",
        "{{.Names}} {{.Label \"envgate.user\"}}+{{.Label \"envgate.environment\"}} {{.State}}",
    ]));
    found.sort();
    found
}

/// `instance`'s home volumes, sorted.
pub fn volumes(instance: &str) -> Vec<String> {
    let filter = format!("label=envgate.instance={instance}");
    let mut found = lines(docker(&["volume", "ls", "-q", "--filter", &filter]));
    found.sort();
    found
}

/// Removes `instance`'s containers, in batches: one `docker rm -f` of ~700 ids wedged Docker
/// 20.10 for a quarter of an hour; batches of 50 keep the engine answering. Returns how many.
pub fn remove_containers(instance: &str) -> usize {
    let filter = format!("label=envgate.instance={instance}");
    let ids = lines(docker(&["ps", "-aq", "--filter", &filter]));
    for batch in ids.chunks(50) {
        let mut args = vec!["rm", "-f"];
        args.extend(batch.iter().map(String::as_str));
        docker(&args);
    }
    ids.len()
}

/// Removes `instance`'s home volumes (once their containers are gone).
pub fn remove_volumes(instance: &str) {
    let ids = volumes(instance);
    for batch in ids.chunks(50) {
        let mut args = vec!["volume", "rm", "-f"];
        args.extend(batch.iter().map(String::as_str));
        docker(&args);
    }
}

/// Where the control planes keep warm containers' home slots (`ENVGATE_HOME_SLOTS_DIR`).
pub fn slots_root() -> PathBuf {
    std::env::var_os("ENVGATE_HOME_SLOTS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/lib/envgate/slots"))
}

/// The home slots of `instance`'s warm containers once their containers are gone
/// (docs/environments.md, "Warm pools"): unmount the user's home, then delete the slot only if
/// no mount point is left under it (never a recursive delete through a mounted home volume).
pub fn release_slots(root: &Path, instance: &str) {
    let dir = root.join(instance);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return;
    };
    for slot in entries.filter_map(|e| Some(e.ok()?.path())) {
        if !slot.is_dir() {
            continue;
        }
        let user = std::fs::read_to_string(slot.join("user")).unwrap_or_default();
        let user = user.trim();
        if !user.is_empty() {
            let _ = Command::new("umount")
                .arg("-l")
                .arg(slot.join("home").join(user))
                .stderr(Stdio::null())
                .status();
        }
        if mounted_under(&slot) {
            eprintln!(
                "fleet: leaving {}: something is still mounted under it",
                slot.display()
            );
        } else {
            let _ = std::fs::remove_dir_all(&slot);
        }
    }
    let _ = std::fs::remove_dir(&dir);
}

/// Whether a mount point is at or under `path` (/proc/self/mountinfo's fifth field).
fn mounted_under(path: &Path) -> bool {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    mountinfo
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .any(|point| Path::new(point).starts_with(path))
}
