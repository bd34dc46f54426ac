use envgate_proto::v1::Placement;

use super::*;
use crate::fixtures::{World, abandoned_claim, alices_busybox, no_progress};
use crate::model::CommandRecord;
use crate::placement::{PlacementConfig, Placer};

async fn age_record(world: &World, key: &str, seconds: i64) {
    world
        .edit_record(key, |r| {
            r.last_active_at -= seconds;
            r.state_since -= seconds;
        })
        .await;
}

/// Thirty rounds of an open of alice's busybox racing a reconcile pass. Each round she
/// opens and closes it, `make_due` (given its key and the round) makes it due for
/// removal, then the open and the pass race with head starts alternating so both orders
/// happen (besides close interleavings). After each, her record must be `running` with
/// the container she got, and `check` sees the round and what she got; `removed` reads
/// from the pass's actions whether it removed the container. Both must win some rounds.
async fn race_the_reaper(
    world: &World,
    make_due: impl AsyncFn(&str, u64),
    removed: impl Fn(&Actions) -> usize,
    check: impl Fn(u64, &Placement),
) {
    let placer = world.placer(PlacementConfig::default());
    let reaper = Arc::new(world.reconciler());
    let key = model::container_key("alice", "busybox");
    let (mut open_won, mut reaper_won) = (0, 0);
    for round in 0..30u64 {
        let first = placer
            .open(world.request("alice", "busybox"), &no_progress)
            .await
            .unwrap();
        placer.close(&first.session_id).await.unwrap();
        make_due(&key, round).await;
        let (open_delay, reap_delay) = match round % 3 {
            0 => (0, 0),
            1 => (0, 20),
            _ => (20, 0),
        };
        let reaping = {
            let reaper = reaper.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(reap_delay)).await;
                reaper.reconcile().await
            })
        };
        tokio::time::sleep(Duration::from_millis(open_delay)).await;
        let placement = placer
            .open(world.request("alice", "busybox"), &no_progress)
            .await
            .unwrap();
        let actions = reaping.await.unwrap().unwrap();
        if removed(&actions) == 1 {
            reaper_won += 1
        } else {
            open_won += 1
        }
        check(round, &placement);
        let record = world.record(&key).await.unwrap();
        assert_eq!(
            (record.state, record.container_id.as_str()),
            (ContainerState::Running, placement.container_id.as_str()),
            "round {round}"
        );
        placer.close(&placement.session_id).await.unwrap();
    }
    println!("open won {open_won} rounds, reaper won {reaper_won}");
    assert!(
        open_won > 0 && reaper_won > 0,
        "both orders must be exercised"
    );
}

#[tokio::test]
async fn idle_containers_are_reaped_after_their_timeout_but_volumes_stay() {
    let (world, clock) = World::with_manual_clock().await;
    // A session open for hours: its close starts the idle clock.
    let placer = world.placer(PlacementConfig {
        touch_after: Duration::ZERO,
        ..PlacementConfig::default()
    });
    let reaper = world.reconciler();
    let placement = placer
        .open(world.request("alice", "busybox"), &no_progress)
        .await
        .unwrap();

    clock.advance(Duration::from_secs(10_000));
    assert_eq!(
        reaper.reconcile().await.unwrap(),
        Actions::default(),
        "a session is attached"
    );

    placer.close(&placement.session_id).await.unwrap();
    assert_eq!(
        reaper.reconcile().await.unwrap(),
        Actions::default(),
        "idle for 0 of 900 s"
    );

    clock.advance(Duration::from_secs(899));
    assert_eq!(
        reaper.reconcile().await.unwrap(),
        Actions::default(),
        "idle for 899 of 900 s"
    );
    clock.advance(Duration::from_secs(1));
    let actions = reaper.reconcile().await.unwrap();
    assert_eq!(
        actions,
        Actions {
            reaped_idle: 1,
            ..Actions::default()
        }
    );
    assert!(world.runtime.containers().is_empty());
    assert!(world.keys("containers/").await.is_empty());
    assert_eq!(world.runtime.volumes(), ["envgate-default-home-alice"]);
}

#[tokio::test]
async fn records_without_containers_and_stale_claims_are_cleared() {
    let world = World::new().await;
    let placer = world.placer(PlacementConfig::default());
    let reaper = world.reconciler();
    let placement = placer
        .open(world.request("alice", "busybox"), &no_progress)
        .await
        .unwrap();
    world.runtime.lose(&placement.container_id);
    assert_eq!(reaper.reconcile().await.unwrap().forgot_missing, 1);
    assert!(world.keys("containers/").await.is_empty());

    let placement = placer
        .open(world.request("alice", "busybox"), &no_progress)
        .await
        .unwrap();
    world.runtime.stop(&placement.container_id);
    assert_eq!(reaper.reconcile().await.unwrap().forgot_missing, 1);
    assert!(
        world.runtime.containers().is_empty(),
        "the stopped container is removed"
    );
    assert!(world.keys("containers/").await.is_empty());

    let stale = abandoned_claim("carol", "debian", "dead");
    let key = model::container_key("carol", "debian");
    store::put_json(world.store.as_ref(), &key, &stale, None)
        .await
        .unwrap();
    let fresh = ContainerRecord {
        state_since: model::now(),
        ..stale
    };
    let fresh_key = model::container_key("carol", "busybox");
    store::put_json(world.store.as_ref(), &fresh_key, &fresh, None)
        .await
        .unwrap();
    assert_eq!(reaper.reconcile().await.unwrap().cleared_stale, 1);
    assert_eq!(world.keys("containers/").await, [fresh_key]);
}

#[tokio::test]
async fn orphans_of_this_instance_are_removed_after_a_grace_period() {
    let world = World::new().await;
    let reaper = world.reconciler();
    let old = world
        .runtime
        .insert_unknown(alices_busybox("default"), model::now() - 3600);
    let young = world
        .runtime
        .insert_unknown(alices_busybox("default"), model::now());
    let foreign = world
        .runtime
        .insert_unknown(alices_busybox("other-fleet"), model::now() - 3600);
    assert_eq!(reaper.reconcile().await.unwrap().removed_orphans, 1);
    let left: HashSet<String> = world.container_ids().into_iter().collect();
    assert_eq!(left, HashSet::from([young, foreign]));
    assert!(!left.contains(&old));
}

#[tokio::test]
async fn ephemeral_containers_whose_session_vanished_are_removed() {
    let world = World::new().await;
    let placer = world.placer(PlacementConfig::default());
    placer
        .open(world.request("alice", "scratch"), &no_progress)
        .await
        .unwrap();
    // The proxy dies: its lease expires and takes the session with it.
    world.store.lease_revoke(world.lease).await.unwrap();
    assert!(world.keys("sessions/").await.is_empty());
    assert_eq!(
        world
            .reconciler()
            .reconcile()
            .await
            .unwrap()
            .removed_ephemeral,
        1
    );
    assert!(world.runtime.containers().is_empty());
    assert!(world.keys("containers/").await.is_empty());
}

/// Whoever wins, the user must never be handed a container the reaper removed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_racing_the_reaper_always_gets_a_live_container() {
    let world = World::new().await;
    race_the_reaper(
        &world,
        async |key, round| {
            age_record(&world, key, 10_000).await;
            world
                .runtime
                .set_inspect_delay(Duration::from_millis(round % 4));
        },
        |actions| actions.reaped_idle,
        |round, placement| {
            assert!(
                world.container_ids().contains(&placement.container_id),
                "round {round}: handed a removed container"
            );
        },
    )
    .await;
}

#[tokio::test]
async fn the_elected_loop_reconciles_until_shutdown() {
    let world = World::new().await;
    let reaper = Arc::new(world.reconciler());
    let shutdown = CancellationToken::new();
    let running = tokio::spawn(reaper.clone().run(shutdown.clone()));
    let spec = alices_busybox("default");
    world.runtime.insert_unknown(spec, model::now() - 3600);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !world.runtime.containers().is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the leader never reconciled"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(5), running)
        .await
        .unwrap()
        .unwrap();
    assert!(
        world.keys("election/").await.is_empty(),
        "leadership released on shutdown"
    );
}

/// (session id, message) of each KillSession the test's "proxy" obeyed.
type Obeyed = Arc<Mutex<Vec<(String, String)>>>;

/// Plays the proxies' part in KillSession: closes every session it is told to end, as a
/// proxy does once it has shown the message; returns the commands it obeyed.
fn obey_kills(world: &World, placer: Arc<Placer>) -> (tokio::task::JoinHandle<()>, Obeyed) {
    let store = world.store.clone();
    let obeyed = Arc::new(Mutex::new(Vec::new()));
    let log = obeyed.clone();
    let task = tokio::spawn(async move {
        loop {
            let commands: Vec<(String, Versioned<CommandRecord>)> =
                store::range_json(store.as_ref(), model::COMMANDS)
                    .await
                    .unwrap();
            for (key, command) in commands {
                if let CommandRecord::KillSession {
                    session_id,
                    message,
                } = command.value
                {
                    store.delete(&key).await.unwrap();
                    placer.close(&session_id).await.unwrap();
                    log.lock().unwrap().push((session_id, message));
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    (task, obeyed)
}

async fn age_created(world: &World, key: &str, seconds: i64) {
    world.edit_record(key, |r| r.created_at -= seconds).await;
}

#[tokio::test]
async fn the_lifetime_warning_is_sent_once_to_each_session_and_never_without_sessions() {
    let (world, clock) = World::with_manual_clock().await;
    world
        .update_environment("busybox", |e| e.max_lifetime_seconds = 1000)
        .await;
    let placer = world.placer(PlacementConfig::default());
    let reaper = world.reconciler();
    let a = placer
        .open(world.request("alice", "busybox"), &no_progress)
        .await
        .unwrap();
    let b = placer
        .open(world.request("alice", "busybox"), &no_progress)
        .await
        .unwrap();
    let carols = placer
        .open(world.request("carol", "busybox"), &no_progress)
        .await
        .unwrap();
    placer.close(&carols.session_id).await.unwrap();
    let alice = model::container_key("alice", "busybox");
    let carol = model::container_key("carol", "busybox");

    // The warning is due from 1000 - 250 = 750 s of age.
    clock.advance(Duration::from_secs(749));
    assert_eq!(reaper.reconcile().await.unwrap(), Actions::default());
    assert!(world.commands().await.is_empty());

    clock.advance(Duration::from_secs(1));
    assert_eq!(
        reaper.reconcile().await.unwrap(),
        Actions {
            warned_lifetime: 1,
            ..Actions::default()
        }
    );
    assert_eq!(
        reaper.reconcile().await.unwrap(),
        Actions::default(),
        "a repeated pass warns no one again"
    );
    assert_eq!(
        world.reconciler().reconcile().await.unwrap(),
        Actions::default(),
        "nor does a new leader"
    );

    let mut notices: Vec<(String, String)> = world
        .commands()
        .await
        .into_iter()
        .map(|(_, command)| match command {
            CommandRecord::Notice {
                session_id,
                message,
            } => (session_id, message),
            other => panic!("not a notice: {other:?}"),
        })
        .collect();
    notices.sort();
    let mut expected = vec![a.session_id.clone(), b.session_id.clone()];
    expected.sort();
    assert_eq!(
        notices.iter().map(|(s, _)| s.clone()).collect::<Vec<_>>(),
        expected,
        "one notice per session of alice's container, none for carol's"
    );
    for (_, message) in &notices {
        assert!(
            message
                .starts_with("environment \"busybox\" reaches its maximum lifetime in 4 min (at ")
                && message.ends_with(" UTC); save your work — your home directory is kept"),
            "{message}"
        );
    }
    let warned = world.record(&alice).await.unwrap().lifetime_warned_at;
    assert_eq!(warned, clock.now());
    assert_eq!(world.record(&carol).await.unwrap().lifetime_warned_at, 0);
    assert_eq!(world.runtime.containers().len(), 2, "nothing removed yet");
}

#[tokio::test]
async fn at_the_maximum_lifetime_sessions_are_ended_and_the_container_removed() {
    let (world, clock) = World::with_manual_clock().await;
    for env in ["busybox", "scratch"] {
        world
            .update_environment(env, |e| e.max_lifetime_seconds = 1000)
            .await;
    }
    let placer = world.placer(PlacementConfig::default());
    let reaper = world.reconciler();
    let mut sessions = Vec::new();
    for env in ["busybox", "busybox", "scratch"] {
        let placement = placer
            .open(world.request("alice", env), &no_progress)
            .await
            .unwrap();
        sessions.push(placement.session_id);
    }
    let (proxy, obeyed) = obey_kills(&world, placer.clone());
    let keys = world.keys("containers/").await;
    assert_eq!(keys.len(), 2, "{keys:?}");

    clock.advance(Duration::from_secs(999));
    let before = reaper.reconcile().await.unwrap();
    assert_eq!(before.reaped_lifetime, 0, "{before:?}");
    assert_eq!(world.runtime.containers().len(), 2);
    assert!(obeyed.lock().unwrap().is_empty());

    clock.advance(Duration::from_secs(1));
    assert_eq!(
        reaper.reconcile().await.unwrap(),
        Actions {
            reaped_lifetime: 2,
            ..Actions::default()
        }
    );
    proxy.abort();
    assert!(world.runtime.containers().is_empty());
    assert!(world.keys("containers/").await.is_empty());
    assert!(world.keys("sessions/").await.is_empty());
    assert_eq!(world.runtime.volumes(), ["envgate-default-home-alice"]);
    let mut ended: Vec<(String, String)> = obeyed.lock().unwrap().clone();
    ended.sort();
    sessions.sort();
    assert_eq!(
        ended.iter().map(|(s, _)| s.clone()).collect::<Vec<_>>(),
        sessions
    );
    for (_, message) in &ended {
        assert!(
            message.contains("reached its maximum lifetime (17 min)")
                && message.contains("your home directory is kept"),
            "{message}"
        );
    }
    assert_eq!(
        reaper.reconcile().await.unwrap(),
        Actions::default(),
        "nothing is removed twice"
    );
}

#[tokio::test]
async fn an_open_never_attaches_to_a_container_past_its_maximum_lifetime() {
    let (world, clock) = World::with_manual_clock().await;
    world
        .update_environment("busybox", |e| e.max_lifetime_seconds = 1000)
        .await;
    let placer = world.placer(PlacementConfig::default());
    let key = model::container_key("alice", "busybox");
    let first = placer
        .open(world.request("alice", "busybox"), &no_progress)
        .await
        .unwrap();
    placer.close(&first.session_id).await.unwrap();

    // A second short of its end.
    clock.advance(Duration::from_secs(999));
    let young = placer
        .open(world.request("alice", "busybox"), &no_progress)
        .await
        .unwrap();
    assert_eq!(
        (young.container_id.as_str(), young.created),
        (first.container_id.as_str(), false)
    );
    placer.close(&young.session_id).await.unwrap();

    clock.advance(Duration::from_secs(1));
    let fresh = placer
        .open(world.request("alice", "busybox"), &no_progress)
        .await
        .unwrap();
    assert!(fresh.created);
    assert_ne!(fresh.container_id, first.container_id);
    assert_eq!(
        world.container_ids().as_slice(),
        std::slice::from_ref(&fresh.container_id),
        "the old one is removed"
    );
    let record = world.record(&key).await.unwrap();
    assert_eq!(record.container_id, fresh.container_id);
    assert_eq!(record.created_at, clock.now());
}

/// Whoever wins, the user must never be handed the over-age container being removed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_racing_the_lifetime_removal_always_gets_a_live_container() {
    let world = World::new().await;
    world
        .update_environment("busybox", |e| e.max_lifetime_seconds = 1000)
        .await;
    race_the_reaper(
        &world,
        async |key, _| age_created(&world, key, 10_000).await,
        |actions| actions.reaped_lifetime,
        |round, placement| {
            assert!(
                placement.created,
                "round {round}: attached to an over-age container"
            );
            assert_eq!(
                world.container_ids().as_slice(),
                std::slice::from_ref(&placement.container_id),
                "round {round}: handed a removed container, or the old one is left"
            );
        },
    )
    .await;
}

#[tokio::test]
async fn sessions_released_with_their_proxys_lease_are_counted_once_and_start_the_idle_clock() {
    let (world, clock) = World::with_manual_clock().await;
    let placer = world.placer(PlacementConfig::default());
    let reaper = world.reconciler();
    let key = model::container_key("alice", "busybox");
    placer
        .open(world.request("alice", "busybox"), &no_progress)
        .await
        .unwrap();
    let closed = placer
        .open(world.request("alice", "busybox"), &no_progress)
        .await
        .unwrap();
    // Its sessions have run for hours.
    clock.advance(Duration::from_secs(10_000));
    assert_eq!(reaper.reconcile().await.unwrap(), Actions::default());

    placer.close(&closed.session_id).await.unwrap();
    clock.advance(Duration::from_secs(10_000));
    assert_eq!(
        reaper.reconcile().await.unwrap(),
        Actions::default(),
        "a session closed by its proxy is not a released one"
    );

    // The proxy dies: its lease expires and takes the other session with it.
    world.store.lease_revoke(world.lease).await.unwrap();
    assert_eq!(
        reaper.reconcile().await.unwrap(),
        Actions {
            released_sessions: 1,
            ..Actions::default()
        },
        "released, and idle for 0 s rather than 10 000"
    );
    let record = world.record(&key).await.unwrap();
    assert_eq!(record.last_active_at, clock.now());
    assert_eq!(world.runtime.containers().len(), 1);
    assert_eq!(
        reaper.reconcile().await.unwrap(),
        Actions::default(),
        "counted once"
    );
    assert_eq!(
        world.reconciler().reconcile().await.unwrap(),
        Actions::default(),
        "a new leader neither counts it again nor reaps"
    );
}
