//! End to end: the HA shape `deploy/local/fleet up` runs (three etcd members, two
//! control-plane replicas). Under a stream of real `ssh` logins through HAProxy, losing
//! either replica (the leader too) or one etcd member of three costs at most the logins in
//! flight at that moment, and every login that starts after it succeeds; losing the leader moves background work (reaping) to the other
//! replica within 10 s.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use support::{Fleet, FleetOptions, SshOutput, environment, eventually, run};

/// What `deploy/local/fleet up` runs.
fn ha_shape() -> FleetOptions {
    FleetOptions {
        etcd_members: 3,
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

/// The replica that leads, once exactly one does.
async fn leader(fleet: &Fleet) -> usize {
    eventually(Duration::from_secs(30), "one replica leads", || async {
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
    .await
}

/// One `ssh demo date` of the stream.
struct Login {
    started: Instant,
    ended: Instant,
    out: SshOutput,
}

impl Login {
    fn ok(&self) -> bool {
        self.out.code == Some(0) && !self.out.stdout.is_empty()
    }
}

/// Concurrent clients looping `ssh demo date` through HAProxy.
const CLIENTS: usize = 3;
/// Bound on the logins of one client.
const MAX_LOGINS: usize = 200;

/// Runs `CLIENTS` clients looping logins; `fault` strikes after `before`, the stream goes on
/// for `after` more. Returns the moment of the fault and every login, in start order.
async fn logins_across(
    fleet: &mut Fleet,
    before: Duration,
    after: Duration,
    fault: impl FnOnce(&mut Fleet),
) -> (Instant, Vec<Login>) {
    let mut argv = fleet.ssh_key_argv("demo", &fleet.key_of("demo"));
    argv.push("date".to_owned());
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let (argv, stop) = (argv.clone(), stop.clone());
            tokio::spawn(async move {
                let mut logins = Vec::new();
                while !stop.load(Ordering::Relaxed) && logins.len() < MAX_LOGINS {
                    let started = Instant::now();
                    let out = run(&argv, None, &[]).await;
                    logins.push(Login {
                        started,
                        ended: Instant::now(),
                        out,
                    });
                }
                logins
            })
        })
        .collect();
    tokio::time::sleep(before).await;
    let at = Instant::now();
    fault(fleet);
    tokio::time::sleep(after).await;
    stop.store(true, Ordering::Relaxed);
    let mut logins = Vec::new();
    for client in clients {
        logins.extend(client.await.expect("a client task"));
    }
    logins.sort_by_key(|l| l.started);
    (at, logins)
}

/// Prints what the stream saw around the fault at `at`; returns the failed logins.
fn report<'a>(what: &str, at: Instant, logins: &'a [Login]) -> Vec<&'a Login> {
    let failed: Vec<&Login> = logins.iter().filter(|l| !l.ok()).collect();
    let after = logins.iter().filter(|l| l.started >= at).count();
    let last_failure = failed
        .iter()
        .map(|l| l.ended.saturating_duration_since(at))
        .max();
    let started: Vec<String> = failed
        .iter()
        .map(|l| match l.started.checked_duration_since(at) {
            Some(after) => format!("+{after:.2?}"),
            None => format!("-{:.2?}", at - l.started),
        })
        .collect();
    let mut lines: Vec<String> = failed
        .iter()
        .flat_map(|l| l.out.stderr_lines())
        .map(str::to_owned)
        .collect();
    lines.sort();
    lines.dedup();
    eprintln!(
        "{what}: {} logins by {CLIENTS} clients ({after} started after the fault), {} failed; \
         started at {started:?} from the fault, the last ended {last_failure:.2?} after it; \
         error lines: {lines:?}",
        logins.len(),
        failed.len(),
    );
    for line in &lines {
        support::assert_no_internals(line);
    }
    failed
}

/// Every failed login was in flight when the fault struck (started before it), so at most
/// one per client; every login started after it succeeded.
fn assert_only_in_flight_failed(what: &str, at: Instant, failed: &[&Login]) {
    assert!(failed.len() <= CLIENTS, "{what}: too many failures");
    for login in failed {
        assert!(
            login.started < at,
            "{what}: a login started {:?} after the fault failed: {:#?}",
            login.started - at,
            login.out
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkilling_the_leading_replica_fails_at_most_the_logins_in_flight() {
    let mut fleet = Fleet::start_with(ha_shape()).await;
    let leader = leader(&fleet).await;
    let (at, logins) = logins_across(
        &mut fleet,
        Duration::from_secs(3),
        Duration::from_secs(12),
        |fleet| fleet.kill_controlplane(leader),
    )
    .await;
    let failed = report(&format!("leading replica {leader} SIGKILLed"), at, &logins);
    assert_only_in_flight_failed("leader killed", at, &failed);
    assert!(logins.iter().filter(|l| l.started > at).count() >= CLIENTS);
    // The survivor takes the lead and the fleet goes on with one replica.
    let survivor = 1 - leader;
    eventually(Duration::from_secs(15), "the survivor leads", || async {
        if leads(&fleet.replica_ops[survivor]).await {
            Ok(())
        } else {
            Err("not yet".to_owned())
        }
    })
    .await;
    assert!(
        fleet.proxy_alive(0) && fleet.proxy_alive(1),
        "{}",
        fleet.logs()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkilling_the_other_replica_fails_at_most_the_logins_in_flight() {
    let mut fleet = Fleet::start_with(ha_shape()).await;
    let follower = 1 - leader(&fleet).await;
    let (at, logins) = logins_across(
        &mut fleet,
        Duration::from_secs(3),
        Duration::from_secs(12),
        |fleet| fleet.kill_controlplane(follower),
    )
    .await;
    let failed = report(
        &format!("replica {follower} (not leading) SIGKILLed"),
        at,
        &logins,
    );
    assert_only_in_flight_failed("follower killed", at, &failed);
    assert!(
        fleet.proxy_alive(0) && fleet.proxy_alive(1),
        "{}",
        fleet.logs()
    );
}

/// One etcd member of three SIGKILLed, the leading one (its loss costs an election, the worst
/// one member can do): the control planes move to the other members (`store::etcd`), so no
/// login that starts after it fails. A write in flight on the old leader at that moment is
/// lost with it, and etcd cannot say whether it was applied; the control plane does not send
/// such a write again, so the login it was for fails with the unavailable line when its
/// 5 s request timeout ends. Measured: 0 or 1 such login of ~190.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkilling_one_etcd_member_of_three_fails_at_most_the_logins_in_flight() {
    let mut fleet = Fleet::start_with(ha_shape()).await;
    let member = fleet.etcd_leader().await;
    let (at, logins) = logins_across(
        &mut fleet,
        Duration::from_secs(3),
        Duration::from_secs(12),
        |fleet| fleet.kill_etcd_member(member),
    )
    .await;
    let failed = report(
        &format!("etcd leader (member {member}) SIGKILLed"),
        at,
        &logins,
    );
    assert_only_in_flight_failed("etcd member killed", at, &failed);
    for login in &failed {
        assert!(
            login.out.stderr.contains(support::UNAVAILABLE_LINE),
            "{:#?}",
            login.out
        );
    }
    // It comes back with its data and rejoins; the cluster has a leader again.
    fleet.restart_etcd_member(member).await;
    fleet.etcd_leader().await;
    fleet.ssh("demo", "date", None).await.assert_success();
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
async fn sigkilling_the_replica_holding_the_proxies_streams_keeps_them_in_haproxy() {
    // Logins go on until well after the kill: past the proxies re-attaching their Fleet
    // streams to the survivor and HAProxy's health checks (bounded by MAX_LOGINS).
    const KILL_AFTER: usize = 5;
    const AFTER_KILL: Duration = Duration::from_secs(15);
    const MAX_LOGINS: usize = 400;
    let mut fleet = Fleet::start_with(FleetOptions {
        controlplanes: 2,
        ..FleetOptions::default()
    })
    .await;
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
    let mut fleet = Fleet::start_with(FleetOptions {
        controlplanes: 2,
        ..FleetOptions::default()
    })
    .await;
    let mut brief = environment("brief", support::BUSYBOX_IMAGE, "/bin/sh", false);
    brief.idle_timeout_seconds = 2;
    fleet.put_environment(brief).await;

    let leader = leader(&fleet).await;
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
