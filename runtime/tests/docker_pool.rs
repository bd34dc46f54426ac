//! Warm containers on the real Docker engine: one is started for nobody, handed to a user by
//! mounting their home volume into it while it runs (mount propagation through a home slot),
//! and removed again — and the home volume's files survive every way a slot goes away.

mod support;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use envgate_runtime::docker::DockerRuntime;
use envgate_runtime::{ContainerSpec, Runtime, WarmPool};
use support::{Cleanup, IMAGE, SLOTS, docker, unique};

/// `sh -c script` in the container; panics with its stderr unless it succeeds.
fn exec(id: &str, script: &str) -> String {
    let out = Command::new("docker")
        .args(["exec", id, "sh", "-c", script])
        .output()
        .expect("docker exec");
    assert!(
        out.status.success(),
        "{script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn spec(instance: &str, user: &str) -> ContainerSpec {
    ContainerSpec::new(instance, user, "busybox", IMAGE)
}

fn volume_dir(instance: &str, user: &str) -> PathBuf {
    let name = format!("envgate-{instance}-home-{user}");
    PathBuf::from(docker(&["volume", "inspect", "--format", "{{.Mountpoint}}", &name]).trim())
}

/// Mount points at or below `dir`, as the host sees them.
fn mounts_under(dir: &Path) -> Vec<String> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter_map(|l| l.split(' ').nth(4).map(str::to_owned))
        .filter(|m| Path::new(m).starts_with(dir))
        .collect()
}

fn labels(id: &str) -> HashMap<String, String> {
    let json = docker(&["inspect", "--format", "{{json .Config.Labels}}", id]);
    serde_json::from_str(json.trim()).expect("labels")
}

fn pool(runtime: &DockerRuntime) -> &dyn WarmPool {
    runtime.warm_pool().expect("warm pools")
}

async fn runtime() -> DockerRuntime {
    let runtime = DockerRuntime::connect(None)
        .await
        .expect("docker is reachable")
        .with_home_slots(Some(Path::new(SLOTS)));
    if let Err(why) = runtime.warm_pool() {
        panic!("warm pools work here (root, local Docker): {why}");
    }
    runtime
}

#[tokio::test]
async fn a_claimed_warm_container_shows_only_its_users_home_and_its_removal_keeps_the_files() {
    let instance = unique("dpool");
    let _cleanup = Cleanup::new(&instance);
    let runtime = runtime().await;

    // Alice's home already holds a file (written through an earlier container).
    runtime.ensure_home(&instance, "alice").await.unwrap();
    let home = volume_dir(&instance, "alice");
    std::fs::write(home.join("kept.txt"), b"from before").unwrap();

    let warm = pool(&runtime)
        .create_warm(&spec(&instance, ""))
        .await
        .unwrap();
    let suffix = warm.name.rsplit('-').next().unwrap();
    assert!(
        suffix.len() == 8 && suffix.bytes().all(|b| b.is_ascii_hexdigit()),
        "{}",
        warm.name
    );
    assert_eq!(
        warm.name,
        format!("envgate-{instance}-pool-busybox-{suffix}")
    );
    let labels_of = labels(&warm.id);
    assert_eq!(
        labels_of.get("envgate.pool").map(String::as_str),
        Some("true")
    );
    assert!(!labels_of.contains_key("envgate.user"), "{labels_of:?}");
    assert_eq!(
        exec(&warm.id, "ls -A /home"),
        "",
        "nobody's home before the claim"
    );

    let name = pool(&runtime)
        .assign(&warm, &spec(&instance, "alice"))
        .await
        .unwrap();
    assert_eq!(name, format!("envgate-{instance}-alice-busybox-{suffix}"));
    assert_eq!(exec(&warm.id, "ls /home"), "alice\n");
    assert_eq!(exec(&warm.id, "cat /home/alice/kept.txt"), "from before");
    exec(
        &warm.id,
        "echo mine > /home/alice/new.txt && touch /home/junk && ln -s / /home/evil",
    );
    assert_eq!(std::fs::read(home.join("new.txt")).unwrap(), b"mine\n");
    let deadline = Instant::now() + Duration::from_secs(20);
    while docker(&["inspect", "--format", "{{.Name}}", &warm.id]).trim() != format!("/{name}") {
        assert!(Instant::now() < deadline, "never renamed to {name}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let listed = runtime.list_managed(&instance).await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(
        (listed[0].user.as_str(), listed[0].name.as_str()),
        ("", name.as_str())
    );

    // The hazard: the slot holds a mount of alice's volume. Removing the container removes
    // the slot, and nothing in the volume.
    let slot = Path::new(SLOTS).join(&instance).join(suffix);
    assert_eq!(
        mounts_under(&slot).len(),
        1,
        "alice's home is mounted in the slot"
    );
    runtime.remove(&warm.id).await.unwrap();
    assert!(!slot.exists(), "the slot is gone");
    assert!(mounts_under(&slot).is_empty());
    assert_eq!(
        std::fs::read(home.join("kept.txt")).unwrap(),
        b"from before"
    );
    assert_eq!(std::fs::read(home.join("new.txt")).unwrap(), b"mine\n");
    assert!(Path::new("/var/lib/docker").is_dir());
}

#[tokio::test]
async fn a_slot_left_by_a_container_removed_behind_envgates_back_is_swept_without_touching_the_home()
 {
    let instance = unique("dpool");
    let _cleanup = Cleanup::new(&instance);
    let runtime = runtime().await;
    let slot_of = |name: &str| {
        Path::new(SLOTS)
            .join(&instance)
            .join(name.rsplit('-').next().unwrap())
    };
    // Old enough for the sweep (a young slot may belong to a container being made).
    let age = |slot: &Path| {
        let status = Command::new("touch")
            .args(["-d", "2 hours ago"])
            .arg(slot)
            .status()
            .unwrap();
        assert!(status.success());
    };
    let warm = pool(&runtime)
        .create_warm(&spec(&instance, ""))
        .await
        .unwrap();
    pool(&runtime)
        .assign(&warm, &spec(&instance, "bob"))
        .await
        .unwrap();
    exec(&warm.id, "echo precious > /home/bob/thesis.tex");
    docker(&["rm", "-f", &warm.id]);
    // Carol's container is still running: its slot is as old, but it stays.
    let live = pool(&runtime)
        .create_warm(&spec(&instance, ""))
        .await
        .unwrap();
    pool(&runtime)
        .assign(&live, &spec(&instance, "carol"))
        .await
        .unwrap();

    let slot = slot_of(&warm.name);
    let live_slot = slot_of(&live.name);
    assert_eq!(
        mounts_under(&slot).len(),
        1,
        "the mount outlives the container"
    );
    age(&slot);
    age(&live_slot);
    let listed = runtime.list_managed(&instance).await.unwrap();
    assert_eq!(listed.len(), 1, "{listed:?}");
    runtime.sweep(&instance, &listed).await.unwrap();
    assert!(!slot.exists(), "the sweep removed the slot");
    assert!(mounts_under(&slot).is_empty());
    assert_eq!(
        std::fs::read(volume_dir(&instance, "bob").join("thesis.tex")).unwrap(),
        b"precious\n"
    );
    assert_eq!(
        mounts_under(&live_slot).len(),
        1,
        "carol's home stays mounted"
    );
    assert_eq!(exec(&live.id, "ls /home"), "carol\n");
}

#[tokio::test]
async fn a_remote_engine_disables_warm_pools() {
    let runtime =
        DockerRuntime::new(Some("tcp://127.0.0.1:1")).with_home_slots(Some(Path::new(SLOTS)));
    assert_eq!(
        runtime.warm_pool().err().expect("no warm pools"),
        "Docker is reached at tcp://127.0.0.1:1, and a remote engine cannot see this host's mounts"
    );
    assert_eq!(
        DockerRuntime::new(None)
            .with_home_slots(None)
            .warm_pool()
            .err()
            .expect("no warm pools"),
        "--home-slots-dir is empty"
    );
}
