//! End to end: the lifecycle the reconciler runs — a container's maximum lifetime (warning,
//! then the end, home kept), the idle clock counted from the LAST session's end, orphans made
//! behind envgate's back, records whose container was deleted behind its back — and the
//! `envgate_reconcile_actions_total` counters an operator sees for each.
//!
//! Real etcd, control plane (reconciling every second), proxies, HAProxy, Docker and OpenSSH;
//! see `support/mod.rs`. (Reaping after a plain idle timeout is in `e2e_placement.rs`.)

mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use support::{BUSYBOX_IMAGE, Fleet, FleetOptions, environment, eventually};

/// `--orphan-grace-seconds` of the fleet that looks for orphans: short, yet longer than any
/// container creation takes, so a container whose record is being written is never taken.
const ORPHAN_GRACE_SECONDS: &str = "8";

/// The id of demo's one container of `env`, once there is one.
async fn container_of(fleet: &Fleet, env: &str) -> String {
    eventually(
        Duration::from_secs(30),
        &format!("demo's {env} container"),
        || async {
            let mine: Vec<_> = fleet
                .containers(Some("demo"))
                .into_iter()
                .filter(|c| c.environment == env)
                .collect();
            match mine.as_slice() {
                [one] if one.state == "running" => Ok(one.id.clone()),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await
}

/// Waits until the control plane's /metrics counts `action` at least once.
async fn assert_counted(fleet: &Fleet, action: &str) {
    let series = format!("envgate_reconcile_actions_total{{action=\"{action}\"}}");
    eventually(
        Duration::from_secs(15),
        &format!("{series} on /metrics"),
        || async {
            let text = Fleet::metrics(&fleet.controlplane_ops)
                .await
                .ok_or_else(|| "no /metrics".to_string())?;
            let count = text
                .lines()
                .find_map(|l| l.strip_prefix(series.as_str()))
                .and_then(|v| v.trim().parse::<f64>().ok());
            match count {
                Some(n) if n >= 1.0 => Ok(()),
                _ => Err(text
                    .lines()
                    .filter(|l| l.starts_with("envgate_reconcile"))
                    .collect::<Vec<_>>()
                    .join("\n")),
            }
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_at_its_maximum_lifetime_warns_then_ends_the_session_and_keeps_home() {
    let fleet = Fleet::start().await;
    let mut short = environment("short", BUSYBOX_IMAGE, "/bin/sh", false);
    // The warning is due min(300, 12/4) = 3 s before the end, at 9 s.
    short.max_lifetime_seconds = 12;
    fleet.put_environment(short).await;

    let started = Instant::now();
    let session = fleet.ssh_in_background(
        "demo+short",
        "echo kept > /home/demo/notes && echo started && sleep 60",
    );
    let first = container_of(&fleet, "short").await;
    let out = tokio::time::timeout(Duration::from_secs(50), session)
        .await
        .expect("the session ended well before its 60 s")
        .expect("ssh task");
    let ended_after = started.elapsed();
    assert_eq!(out.stdout, "started\n", "{out:#?}");
    assert_ne!(out.code, Some(0), "{out:#?}");
    let lines = out.stderr_lines();
    let warning = lines.iter().position(|l| {
        l.starts_with("envgate: environment \"short\" reaches its maximum lifetime in ")
            && l.ends_with(" UTC); save your work — your home directory is kept")
    });
    let end = support::told_at(
        &lines,
        "environment \"short\" reached its maximum lifetime (12 s); the session ends and its \
         container is removed; your home directory is kept, connect again for a fresh container",
    );
    match (warning, end) {
        (Some(w), Some(e)) => assert!(w < e, "the warning came after the end: {out:#?}"),
        _ => panic!("expected the warning, then the end: {out:#?}"),
    }
    eprintln!(
        "the 12 s container's session ended after {ended_after:?}; stderr:\n{}",
        out.stderr
    );

    fleet
        .wait_container_gone(&first, Duration::from_secs(15))
        .await;
    let records = fleet.etcd_records("containers/demo/short").await.unwrap();
    assert!(records.is_empty(), "{records:?}");
    fleet.assert_home_volume_kept("demo");

    let again = fleet.ssh("demo+short", "cat /home/demo/notes", None).await;
    again.assert_success();
    assert_eq!(again.stdout, "kept\n");
    let second = container_of(&fleet, "short").await;
    assert_ne!(
        second, first,
        "a NEW container after the end of the old one's lifetime"
    );

    assert_counted(&fleet, "warn_lifetime").await;
    assert_counted(&fleet, "reap_lifetime").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_idle_clock_starts_when_the_last_session_ends() {
    let fleet = Fleet::start().await;
    let mut brief = environment("brief", BUSYBOX_IMAGE, "/bin/sh", false);
    brief.idle_timeout_seconds = 6;
    fleet.put_environment(brief).await;

    // Two overlapping sessions; the short one ends first.
    let long = fleet.ssh_in_background("demo+brief", "echo started && sleep 12 && echo done");
    let container = container_of(&fleet, "brief").await;
    fleet.ssh("demo+brief", "true", None).await.assert_success();
    // Twice the idle timeout after the short session's end, the long one is still served.
    let long = tokio::time::timeout(Duration::from_secs(50), long)
        .await
        .expect("the long session ended")
        .expect("ssh task");
    long.assert_success();
    assert_eq!(long.stdout, "started\ndone\n");
    // Its end starts the clock: reconnecting within the idle timeout finds the same container.
    let back = fleet.ssh("demo+brief", "true", None).await;
    back.assert_success();
    assert_eq!(container_of(&fleet, "brief").await, container);

    fleet
        .wait_container_gone(&container, Duration::from_secs(30))
        .await;
    fleet.assert_home_volume_kept("demo");
    assert_counted(&fleet, "reap_idle").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orphans_and_records_of_containers_deleted_behind_envgates_back_are_cleaned() {
    let fleet = Fleet::start_with(FleetOptions {
        env: vec![(
            "ENVGATE_ORPHAN_GRACE_SECONDS".to_string(),
            ORPHAN_GRACE_SECONDS.to_string(),
        )],
        ..FleetOptions::default()
    })
    .await;

    // A record whose container was removed behind envgate's back.
    fleet.ssh("demo", "true", None).await.assert_success();
    let deleted = container_of(&fleet, "busybox").await;
    docker(&["rm", "-f", &deleted]);
    eventually(
        Duration::from_secs(15),
        "the record of the deleted container cleaned",
        || async {
            let records = fleet.etcd_records("containers/demo/busybox").await?;
            if records.is_empty() {
                Ok(())
            } else {
                Err(format!("{records:?}"))
            }
        },
    )
    .await;
    assert_counted(&fleet, "forget_missing").await;
    let out = fleet.ssh("demo", "echo back", None).await;
    out.assert_success();
    assert_eq!(out.stdout, "back\n");
    let kept = container_of(&fleet, "busybox").await;
    assert_ne!(kept, deleted);

    // A container with the fleet's labels that envgate never made.
    let orphan = docker(&[
        "run",
        "-d",
        "--label",
        "envgate.managed-by=envgate",
        "--label",
        &format!("envgate.instance={}", fleet.instance),
        "--label",
        "envgate.user=mallory",
        "--label",
        "envgate.environment=busybox",
        BUSYBOX_IMAGE,
        "sleep",
        "3600",
    ]);
    let orphan = orphan.trim().to_string();
    assert!(
        fleet
            .containers(Some("mallory"))
            .iter()
            .any(|c| c.id == orphan),
        "{orphan} not listed: {:?}",
        fleet.containers(None)
    );
    fleet
        .wait_container_gone(&orphan, Duration::from_secs(40))
        .await;
    assert_counted(&fleet, "remove_orphan").await;
    assert!(
        fleet.containers(Some("demo")).iter().any(|c| c.id == kept),
        "demo's container, which has a record, was removed too"
    );
}

/// Runs `docker args…`; panics with its stderr unless it succeeds. Returns stdout.
fn docker(args: &[&str]) -> String {
    let out = Command::new("docker")
        .args(args)
        .output()
        .expect("run docker");
    assert!(
        out.status.success(),
        "docker {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
