//! End to end: placement — one container per user+environment, reused, shared by concurrent
//! connections, never shared between users; records after the session; ephemeral and idle
//! containers go away while home volumes stay.

mod support;

use std::time::Duration;

use envgate_proto::v1::EnvironmentMode;
use support::{BUSYBOX_IMAGE, Fleet, environment, eventually};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_connection_lands_in_the_same_container() {
    let fleet = Fleet::start().await;
    let first = fleet
        .ssh("demo", "hostname; echo kept > /tmp/marker", None)
        .await;
    first.assert_success();
    let second = fleet.ssh("demo", "hostname; cat /tmp/marker", None).await;
    second.assert_success();
    let host = first.stdout.trim();
    assert!(!host.is_empty());
    assert_eq!(second.stdout, format!("{host}\nkept\n"));
    assert_eq!(fleet.containers(Some("demo")).len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_simultaneous_first_connections_share_one_container() {
    let fleet = Fleet::start().await;
    let (a, b) = tokio::join!(
        fleet.ssh("demo", "cat /proc/1/cmdline | tr '\\0' ' '; hostname", None),
        fleet.ssh("demo", "cat /proc/1/cmdline | tr '\\0' ' '; hostname", None),
    );
    a.assert_success();
    b.assert_success();
    assert_eq!(a.stdout, b.stdout);
    let containers = fleet.containers(Some("demo"));
    assert_eq!(containers.len(), 1, "{containers:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_user_never_reaches_demos_container() {
    let fleet = Fleet::start().await;
    fleet.add_user("alice", "busybox", None).await;
    fleet
        .ssh(
            "demo",
            "echo secret > /tmp/demo-secret; echo secret > /home/demo/demo-home-file",
            None,
        )
        .await
        .assert_success();
    let alice = fleet
        .ssh(
            "alice",
            "id -un; ls /tmp/demo-secret; ls /home/demo/demo-home-file; echo done",
            None,
        )
        .await;
    assert!(alice.stdout.contains("done"), "{alice:#?}");
    assert!(
        !alice.stdout.contains("demo-secret") && !alice.stdout.contains("demo-home-file"),
        "alice sees demo's files: {alice:#?}"
    );
    let demo = fleet.containers(Some("demo"));
    let alice_containers = fleet.containers(Some("alice"));
    assert_eq!(demo.len(), 1, "{demo:?}");
    assert_eq!(alice_containers.len(), 1, "{alice_containers:?}");
    assert_ne!(demo[0].id, alice_containers[0].id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_session_closes_the_container_record_stays_and_the_session_record_goes() {
    let fleet = Fleet::start().await;
    fleet.ssh("demo", "true", None).await.assert_success();
    let containers = fleet.containers(Some("demo"));
    assert_eq!(containers.len(), 1, "{containers:?}");
    eventually(Duration::from_secs(15), "no session record", || async {
        let sessions = fleet.etcd_records("sessions/").await?;
        if sessions.is_empty() {
            Ok(())
        } else {
            Err(format!("{sessions:?}"))
        }
    })
    .await;
    let records = fleet
        .etcd_records("containers/demo/busybox")
        .await
        .expect("etcd read");
    assert_eq!(records.len(), 1, "{records:?}");
    let (key, value) = &records[0];
    assert_eq!(key, "containers/demo/busybox");
    let value: serde_json::Value = serde_json::from_str(value).expect("JSON record");
    let text = value.to_string();
    assert!(
        text.contains(&containers[0].id) || text.contains(&containers[0].id[..12]),
        "record does not name container {}: {text}",
        containers[0].id
    );
}

/// A warm login writes nothing to etcd (docs/decisions.md, "Unrecorded warm logins"): the
/// container's record is left as the first login wrote it, a short session never shows, and a
/// session that lasts shows once its proxy reports it and goes when it ends. The audit log has
/// the start and the end of each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_warm_login_is_recorded_only_if_it_lasts() {
    let fleet = Fleet::start().await;
    fleet.ssh("demo", "true", None).await.assert_success();
    let record = || async {
        let records = fleet.etcd_records("containers/demo/busybox").await.unwrap();
        assert_eq!(records.len(), 1, "{records:?}");
        records[0].1.clone()
    };
    let created = record().await;
    // A write would stamp a later second into the record.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    for _ in 0..3 {
        fleet.ssh("demo", "true", None).await.assert_success();
    }
    assert_eq!(
        record().await,
        created,
        "a warm login changed the placement record"
    );

    let ssh = fleet.ssh_in_background("demo", "sleep 6");
    let started = std::time::Instant::now();
    let session = eventually(
        Duration::from_secs(15),
        "the lasting session reported",
        || async {
            match fleet.user_sessions("demo").await?.as_slice() {
                [one] => Ok(one.clone()),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await;
    assert!(
        started.elapsed() >= Duration::from_millis(1500),
        "recorded after {:?}, before its report time",
        started.elapsed()
    );
    let proxy = session["proxy_id"].as_str().unwrap_or_default().to_owned();
    assert!(
        (0..fleet.proxy_listen.len()).any(|i| fleet.proxy_id(i) == proxy),
        "{session}"
    );
    ssh.await.unwrap().assert_success();
    eventually(
        Duration::from_secs(15),
        "the ended session's record gone",
        || async {
            match fleet.user_sessions("demo").await?.as_slice() {
                [] => Ok(()),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await;
    let of_demo = |event: &str| {
        fleet
            .audit_records()
            .into_iter()
            .filter(|r| r["event"] == event && r["user"] == "demo")
            .count()
    };
    eventually(
        Duration::from_secs(10),
        "every end in the audit log",
        || async {
            match of_demo("session_end") {
                5 => Ok(()),
                ends => Err(format!("{ends} ends")),
            }
        },
    )
    .await;
    assert_eq!(of_demo("session_start"), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ephemeral_container_is_removed_after_its_session() {
    let fleet = Fleet::start().await;
    let mut scratch = environment("scratch", BUSYBOX_IMAGE, "/bin/sh", false);
    scratch.environment_mode = EnvironmentMode::Ephemeral.into();
    fleet.put_environment(scratch).await;
    let out = fleet.ssh("demo+scratch", "hostname", None).await;
    out.assert_success();
    eventually(
        Duration::from_secs(20),
        "ephemeral container removed",
        || async {
            let left: Vec<_> = fleet
                .containers(Some("demo"))
                .into_iter()
                .filter(|c| c.environment == "scratch")
                .collect();
            if left.is_empty() {
                Ok(())
            } else {
                Err(format!("{left:?}"))
            }
        },
    )
    .await;
    let records = fleet
        .etcd_records("containers/demo/scratch")
        .await
        .expect("etcd read");
    assert!(records.is_empty(), "{records:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_persistent_container_is_reaped_and_the_home_volume_stays() {
    let fleet = Fleet::start().await;
    let mut short = environment("short", BUSYBOX_IMAGE, "/bin/sh", false);
    short.idle_timeout_seconds = 3;
    fleet.put_environment(short).await;
    fleet
        .ssh("demo+short", "echo still-here > /home/demo/notes", None)
        .await
        .assert_success();
    let created = fleet.containers(Some("demo"));
    assert_eq!(created.len(), 1, "{created:?}");
    eventually(Duration::from_secs(40), "idle container reaped", || async {
        let left = fleet.containers(Some("demo"));
        if left.is_empty() {
            Ok(())
        } else {
            Err(format!("{left:?}"))
        }
    })
    .await;
    fleet.assert_home_volume_kept("demo");
    // The next login gets a new container with the same home.
    let again = fleet.ssh("demo+short", "cat /home/demo/notes", None).await;
    again.assert_success();
    assert_eq!(again.stdout, "still-here\n");
}
