//! End to end: two control-plane replicas over one etcd. Losing one under a stream of logins
//! costs at most the login in flight to it; losing the leader moves background work (reaping)
//! to the other within 10 s.

mod support;

use std::time::{Duration, Instant};

use support::{Fleet, FleetOptions, environment, eventually};

fn two_replicas() -> FleetOptions {
    FleetOptions {
        controlplanes: 2,
        ..FleetOptions::default()
    }
}

/// Whether the replica at `ops` says it leads the reconciler (`envgate_reconcile_leader 1`).
async fn leads(ops: &str) -> bool {
    Fleet::metrics(ops).await.is_some_and(|body| {
        body.lines()
            .any(|l| l.starts_with("envgate_reconcile_leader") && l.trim_end().ends_with(" 1"))
    })
}

/// The replica the most proxies' Fleet streams are attached to, from the replicas' logs:
/// killing it makes those proxies re-attach, which must not take them out of HAProxy.
fn busiest_replica(fleet: &Fleet) -> usize {
    let attached = |log: &str| {
        std::fs::read_to_string(fleet.dir().join(log))
            .unwrap_or_default()
            .matches("proxy attached")
            .count()
    };
    let counts = [attached("controlplane.log"), attached("controlplane-1.log")];
    eprintln!("Fleet streams attached per replica: {counts:?}");
    usize::from(counts[1] > counts[0])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkilling_a_control_plane_replica_fails_at_most_the_login_in_flight() {
    // Logins go on until well after the kill: past the proxies re-attaching their Fleet
    // streams to the survivor and HAProxy's health checks (bounded by MAX_LOGINS).
    const KILL_AFTER: usize = 5;
    const AFTER_KILL: Duration = Duration::from_secs(15);
    const MAX_LOGINS: usize = 400;
    let mut fleet = Fleet::start_with(two_replicas()).await;
    let mut failures = Vec::new();
    let mut killed_at: Option<Instant> = None;
    let mut logins = 0;
    let mut victim = 0;
    while logins < MAX_LOGINS && killed_at.is_none_or(|at| at.elapsed() < AFTER_KILL) {
        if logins == KILL_AFTER {
            victim = busiest_replica(&fleet);
            fleet.kill_controlplane(victim);
            killed_at = Some(Instant::now());
        }
        let out = fleet.ssh("demo", "date", None).await;
        if out.code != Some(0) || out.stdout.is_empty() {
            failures.push((logins, out));
        }
        logins += 1;
    }
    let elapsed = killed_at.expect("the replica was killed").elapsed();
    eprintln!(
        "replica {victim} (holding the most Fleet streams) SIGKILLed under {logins} sequential logins: {} failed {:?}; {} logins in {elapsed:?} after the kill",
        failures.len(),
        failures.iter().map(|(i, _)| i).collect::<Vec<_>>(),
        logins - KILL_AFTER
    );
    // The loop is sequential, so at most one login was in flight when the replica died.
    assert!(
        failures.len() <= 1 && failures.iter().all(|(i, _)| *i == KILL_AFTER),
        "logins failed after a replica died: {failures:#?}"
    );
    assert!(
        fleet.proxy_alive(0) && fleet.proxy_alive(1),
        "{}",
        fleet.logs()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_the_leader_dies_another_replica_reaps_within_10_seconds() {
    let mut fleet = Fleet::start_with(two_replicas()).await;
    let mut brief = environment("brief", support::BUSYBOX_IMAGE, "/bin/sh", false);
    brief.idle_timeout_seconds = 2;
    fleet.put_environment(brief).await;

    let leader = eventually(Duration::from_secs(30), "one replica leads", || async {
        let mut leading = Vec::new();
        for (i, ops) in fleet.replica_ops.iter().enumerate() {
            if leads(ops).await {
                leading.push(i);
            }
        }
        match leading.as_slice() {
            [one] => Ok(*one),
            other => Err(format!("leaders: {other:?}")),
        }
    })
    .await;
    let follower = 1 - leader;

    fleet.ssh("demo+brief", "true", None).await.assert_success();
    let container = fleet
        .containers(Some("demo"))
        .into_iter()
        .find(|c| c.environment == "brief")
        .expect("demo's brief container");
    fleet.kill_controlplane(leader);
    let killed = Instant::now();

    let follower_ops = fleet.replica_ops[follower].clone();
    eventually(
        Duration::from_secs(10),
        "the other replica leads",
        || async {
            if leads(&follower_ops).await {
                Ok(())
            } else {
                Err("not yet".to_string())
            }
        },
    )
    .await;
    let took_over = killed.elapsed();
    // The container idles out 2 s after its session; the new leader must reap it by then plus
    // its 10 s to take over.
    fleet
        .wait_container_gone(&container.id, Duration::from_secs(12))
        .await;
    eprintln!(
        "leader SIGKILLed: replica {follower} led after {took_over:?}, reaped after {:?}",
        killed.elapsed()
    );
    let records = fleet.etcd_records("containers/").await.unwrap();
    assert!(records.is_empty(), "{records:?}");
}
