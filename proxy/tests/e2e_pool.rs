//! End to end: warm pools. The control plane keeps started, unassigned containers per
//! environment; 20 brand-new users arriving at once each get one of them (20 distinct
//! containers, none created while they wait), with their own home and nobody else's, and the
//! pool refills behind them. A home written through an earlier, cold container is there in
//! a warm one; with no pool nothing is pre-started.
//!
//! Real etcd, control plane (as root, next to the local Docker engine, so warm pools are on),
//! proxies, HAProxy, Docker and OpenSSH; see `support/mod.rs` and docs/environments.md
//! ("Warm pools").

mod support;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use support::{BUSYBOX_IMAGE, Fleet, environment, eventually};

/// The control plane's default `--home-slots-dir`.
const SLOTS: &str = "/var/lib/envgate/slots";
const USERS: usize = 20;
/// Filling a pool of 20 with agent containers on a busy 2-core machine.
const FILL_TIMEOUT: Duration = Duration::from_secs(180);

/// Declared BEFORE the fleet, so it runs after the fleet's own cleanup (which kills the
/// control plane and removes the containers): removes warm containers whose creation was
/// still under way in Docker, and releases the home slots the killed control plane could
/// not, unmounting the homes without deleting through them.
struct SlotCleanup(Option<String>);

impl Drop for SlotCleanup {
    fn drop(&mut self) {
        let Some(instance) = &self.0 else { return };
        // A refill the killed control plane had sent to Docker still completes after the
        // fleet's sweep; give it a moment, then remove what it made.
        std::thread::sleep(Duration::from_secs(3));
        let label = format!("label=envgate.instance={instance}");
        if let Ok(out) = Command::new("docker")
            .args(["ps", "-aq", "--filter", &label])
            .output()
        {
            let ids = String::from_utf8_lossy(&out.stdout);
            let ids: Vec<&str> = ids.split_whitespace().collect();
            if !ids.is_empty() {
                let _ = Command::new("docker")
                    .args(["rm", "-f"])
                    .args(&ids)
                    .output();
            }
        }
        let dir = Path::new(SLOTS).join(instance);
        if let Ok(entries) = std::fs::read_dir(&dir) {
            for entry in entries.flatten() {
                envgate_controlplane::runtime::slots::release(&entry.path());
            }
        }
        let _ = std::fs::remove_dir(&dir);
    }
}

fn with_pool(name: &str, size: u32) -> envgate_proto::admin::v1::Environment {
    let mut env = environment(name, BUSYBOX_IMAGE, "/bin/sh", false);
    env.warm_pool_size = size;
    env
}

/// Container id → name of the warm containers in `env`'s pool, from etcd.
async fn pool_of(fleet: &Fleet, env: &str) -> Result<HashMap<String, String>, String> {
    let records = fleet.etcd_records(&format!("pool/{env}/")).await?;
    records
        .iter()
        .map(|(key, value)| {
            let v: serde_json::Value =
                serde_json::from_str(value).map_err(|e| format!("{key}: {e}"))?;
            Ok((
                v["container_id"].as_str().unwrap_or_default().to_string(),
                v["container_name"].as_str().unwrap_or_default().to_string(),
            ))
        })
        .collect()
}

/// Waits until `env`'s pool holds `size` containers that Docker shows running.
async fn full_pool(fleet: &Fleet, env: &str, size: usize) -> HashMap<String, String> {
    eventually(
        FILL_TIMEOUT,
        &format!("{size} warm containers of {env}"),
        || async {
            let pool = pool_of(fleet, env).await?;
            let running: HashSet<String> = fleet
                .containers(None)
                .into_iter()
                .filter(|c| c.state == "running")
                .map(|c| c.id)
                .collect();
            let live = pool.keys().filter(|id| running.contains(*id)).count();
            if pool.len() == size && live == size {
                Ok(pool)
            } else {
                Err(format!(
                    "{} in the pool, {live} of them running",
                    pool.len()
                ))
            }
        },
    )
    .await
}

/// The container id in `user`'s placement record for `env`.
async fn record_of(fleet: &Fleet, user: &str, env: &str) -> String {
    let records = fleet
        .etcd_records(&format!("containers/{user}/{env}"))
        .await
        .expect("etcd");
    let [(_, value)] = records.as_slice() else {
        panic!("{user} should have one {env} record: {records:?}");
    };
    let v: serde_json::Value = serde_json::from_str(value).expect("JSON record");
    v["container_id"].as_str().unwrap_or_default().to_string()
}

/// The container was started for a warm pool (`envgate.pool=true`; labels outlive the claim).
fn was_pooled(id: &str) -> bool {
    let out = Command::new("docker")
        .args([
            "inspect",
            "--format",
            "{{index .Config.Labels \"envgate.pool\"}}",
            id,
        ])
        .output()
        .expect("docker inspect");
    String::from_utf8_lossy(&out.stdout).trim() == "true"
}

/// Where `user`'s home volume keeps its files on this host.
fn volume_dir(fleet: &Fleet, user: &str) -> PathBuf {
    let out = Command::new("docker")
        .args(["volume", "inspect", "--format", "{{.Mountpoint}}"])
        .arg(fleet.home_volume(user))
        .output()
        .expect("docker volume inspect");
    assert!(out.status.success(), "{user}'s home volume exists");
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_new_users_at_once_get_twenty_distinct_warm_containers_and_the_pool_refills() {
    let mut slots = SlotCleanup(None);
    let fleet = Fleet::start().await;
    slots.0 = Some(fleet.instance.clone());
    fleet.put_environment(with_pool("lab", USERS as u32)).await;
    let users: Vec<String> = (0..USERS).map(|i| format!("student{i:02}")).collect();
    for user in &users {
        fleet.add_user(user, "lab", None).await;
    }
    let warm = full_pool(&fleet, "lab", USERS).await;

    let runs = users
        .iter()
        .map(|user| fleet.ssh(user, "echo \"$HOME\"; ls /home; touch ~/mine; id -un", None));
    let outputs = futures::future::join_all(runs).await;

    let mut claimed = HashSet::new();
    for (user, out) in users.iter().zip(&outputs) {
        out.assert_success();
        assert_eq!(
            out.stdout,
            format!("/home/{user}\n{user}\n{user}\n"),
            "{user} sees their own home and no one else's, as themselves"
        );
        let id = record_of(&fleet, user, "lab").await;
        // From the pool read before, or (a late claimer) one the refill started since: either
        // way pre-started for the pool, never created while its user waited.
        assert!(
            warm.contains_key(&id) || was_pooled(&id),
            "{user}'s {id} was not a warm container"
        );
        assert!(claimed.insert(id), "two users got the same container");
        assert!(
            volume_dir(&fleet, user).join("mine").is_file(),
            "{user}'s file is in their home volume"
        );
    }
    assert_eq!(claimed.len(), USERS);

    // Each claimed container carries its user's name in `docker ps` (renamed after the claim).
    eventually(
        Duration::from_secs(30),
        "claimed containers renamed",
        || async {
            let names: HashSet<String> = fleet
                .containers(None)
                .into_iter()
                .filter(|c| claimed.contains(&c.id))
                .map(|c| c.name)
                .collect();
            let missing: Vec<&String> = users
                .iter()
                .filter(|u| {
                    !names
                        .iter()
                        .any(|n| n.starts_with(&format!("envgate-{}-{u}-lab-", fleet.instance)))
                })
                .collect();
            if missing.is_empty() {
                Ok(())
            } else {
                Err(format!("not renamed for {missing:?}; names {names:?}"))
            }
        },
    )
    .await;

    let metrics = Fleet::metrics(&fleet.controlplane_ops)
        .await
        .expect("control plane metrics");
    let hits =
        format!("envgate_warm_pool_claims_total{{environment=\"lab\",result=\"hit\"}} {USERS}");
    assert!(
        metrics.lines().any(|l| l == hits),
        "no line {hits} in:\n{metrics}"
    );

    // The pool refills behind them, with new containers.
    let refilled = full_pool(&fleet, "lab", USERS).await;
    assert!(refilled.keys().all(|id| !claimed.contains(id)));

    // A home written through a cold container, since deleted, is there in a warm one.
    fleet.add_user("carla", "busybox", None).await;
    fleet
        .ssh("carla", "echo chapter one > ~/thesis.txt", None)
        .await
        .assert_success();
    let cold = record_of(&fleet, "carla", "busybox").await;
    fleet
        .ssh("carla+envgate", "stop busybox", None)
        .await
        .assert_success();
    fleet
        .wait_container_gone(&cold, Duration::from_secs(60))
        .await;
    let pool = pool_of(&fleet, "lab").await.expect("etcd");
    let out = fleet
        .ssh("carla+lab", "cat ~/thesis.txt; ls /home", None)
        .await;
    out.assert_success();
    assert_eq!(out.stdout, "chapter one\ncarla\n");
    let id = record_of(&fleet, "carla", "lab").await;
    assert!(
        pool.contains_key(&id),
        "carla's lab container came from the pool"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_no_warm_pool_nothing_is_prestarted() {
    let mut slots = SlotCleanup(None);
    let fleet = Fleet::start().await;
    slots.0 = Some(fleet.instance.clone());
    // The pool gauge is set by every reconcile pass: once it reads 0 a pass has run.
    eventually(Duration::from_secs(30), "a reconcile pass", || async {
        let text = Fleet::metrics(&fleet.controlplane_ops)
            .await
            .ok_or("no metrics")?;
        if text
            .lines()
            .any(|l| l == "envgate_warm_pool_containers{environment=\"busybox\"} 0")
        {
            Ok(())
        } else {
            Err("no envgate_warm_pool_containers for busybox yet".to_string())
        }
    })
    .await;
    assert!(fleet.etcd_records("pool/").await.expect("etcd").is_empty());
    assert!(
        fleet.containers(None).is_empty(),
        "{:?}",
        fleet.containers(None)
    );
}
