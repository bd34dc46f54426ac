//! End to end: limits. The per-user container cap refuses a new container with a message that
//! says what to do, never refuses reuse, and lets the user in again once a container is gone;
//! an environment's CPU, memory and pids limits, no-new-privileges and the kept capabilities
//! are what a session sees inside its container; a burst of processes past the pids limit
//! fails without harming the container.

mod support;

use std::path::Path;
use std::time::Duration;

use envgate_controlplane::runtime::docker::CAP_ADD;
use envgate_proto::admin::v1 as admin;
use support::{BUSYBOX_IMAGE, Fleet, FleetOptions, environment, eventually};

const WAIT: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_per_user_cap_refuses_a_new_container_with_what_to_do() {
    let fleet = Fleet::start_with(FleetOptions {
        env: vec![("ENVGATE_MAX_CONTAINERS_PER_USER".into(), "1".into())],
        ..FleetOptions::default()
    })
    .await;
    fleet.ssh("demo", "true", None).await.assert_success();
    let busybox = fleet.containers(Some("demo"));
    assert_eq!(busybox.len(), 1, "{busybox:?}");

    let refused = fleet.ssh("demo+debian", "echo never", None).await;
    assert_eq!(refused.code, Some(1), "{refused:#?}");
    assert_eq!(refused.stdout, "", "the command never ran: {refused:#?}");
    assert_eq!(
        refused.stderr_lines(),
        [
            "envgate: you already have 1 environment running (the limit is 1): busybox; \
             stop one with: ssh demo+envgate@<host> stop ENV"
        ],
        "{refused:#?}"
    );
    assert_eq!(
        fleet.containers(Some("demo")),
        busybox,
        "no debian container"
    );
    assert!(
        fleet
            .etcd_records("containers/demo/debian")
            .await
            .expect("etcd read")
            .is_empty()
    );
    // The refusal is counted by a proxy.
    fleet
        .wait_connections_counted("placement_limit", WAIT)
        .await;

    // Reusing the container the user has is never refused.
    fleet.ssh("demo", "true", None).await.assert_success();
    assert_eq!(fleet.containers(Some("demo")), busybox);

    // Once it is gone, the other environment gets its container.
    let mut client = fleet.admin_client().await.expect("admin client");
    client
        .delete_container(fleet.authorized(admin::DeleteContainerRequest {
            container: Some(admin::ContainerRef {
                user: "demo".into(),
                environment: "busybox".into(),
                session_id: String::new(),
            }),
            message: String::new(),
        }))
        .await
        .expect("DeleteContainer");
    fleet
        .ssh("demo+debian", "true", None)
        .await
        .assert_success();
    let now = fleet.containers(Some("demo"));
    assert_eq!(now.len(), 1, "{now:?}");
    assert_eq!(now[0].environment, "debian");
}

/// Linux capability numbers (`linux/capability.h`) of the names Docker takes.
fn capability_bit(name: &str) -> u32 {
    const NAMES: [&str; 41] = [
        "CHOWN",
        "DAC_OVERRIDE",
        "DAC_READ_SEARCH",
        "FOWNER",
        "FSETID",
        "KILL",
        "SETGID",
        "SETUID",
        "SETPCAP",
        "LINUX_IMMUTABLE",
        "NET_BIND_SERVICE",
        "NET_BROADCAST",
        "NET_ADMIN",
        "NET_RAW",
        "IPC_LOCK",
        "IPC_OWNER",
        "SYS_MODULE",
        "SYS_RAWIO",
        "SYS_CHROOT",
        "SYS_PTRACE",
        "SYS_PACCT",
        "SYS_ADMIN",
        "SYS_BOOT",
        "SYS_NICE",
        "SYS_RESOURCE",
        "SYS_TIME",
        "SYS_TTY_CONFIG",
        "MKNOD",
        "LEASE",
        "AUDIT_WRITE",
        "AUDIT_CONTROL",
        "SETFCAP",
        "MAC_OVERRIDE",
        "MAC_ADMIN",
        "SYSLOG",
        "WAKE_ALARM",
        "BLOCK_SUSPEND",
        "AUDIT_READ",
        "PERFMON",
        "BPF",
        "CHECKPOINT_RESTORE",
    ];
    match NAMES.iter().position(|n| *n == name) {
        Some(bit) => bit as u32,
        None => panic!("unknown capability {name}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_environments_limits_are_visible_inside_and_hold() {
    let fleet = Fleet::start().await;
    let mut limited = environment("limited", BUSYBOX_IMAGE, "/bin/sh", false);
    limited.cpus = 0.5;
    limited.memory_bytes = 268_435_456;
    limited.pids_limit = 64;
    // Root, to show what the most a session can have is.
    limited.run_as = "root".into();
    fleet.put_environment(limited).await;

    // The machine's cgroup version decides which files a container sees.
    let (files, expected) = if Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
        (
            "/sys/fs/cgroup/memory.max /sys/fs/cgroup/pids.max /sys/fs/cgroup/cpu.max",
            "268435456\n64\n50000 100000\n",
        )
    } else {
        (
            "/sys/fs/cgroup/memory/memory.limit_in_bytes /sys/fs/cgroup/pids/pids.max \
             /sys/fs/cgroup/cpu/cpu.cfs_quota_us /sys/fs/cgroup/cpu/cpu.cfs_period_us",
            "268435456\n64\n50000\n100000\n",
        )
    };
    let cgroup = fleet
        .ssh("demo+limited", &format!("cat {files}"), None)
        .await;
    cgroup.assert_success();
    assert_eq!(cgroup.stdout, expected, "{cgroup:#?}");

    let status = fleet
        .ssh(
            "demo+limited",
            "id -u; grep -E '^(NoNewPrivs|CapEff):' /proc/self/status",
            None,
        )
        .await;
    status.assert_success();
    let mask: u64 = CAP_ADD.iter().map(|c| 1u64 << capability_bit(c)).sum();
    assert_eq!(
        status.stdout.split_whitespace().collect::<Vec<_>>(),
        ["0", "CapEff:", &format!("{mask:016x}"), "NoNewPrivs:", "1"],
        "a root session keeps exactly {CAP_ADD:?} and cannot gain privileges: {status:#?}"
    );
    // A session as the user's own account (the default) has none of them.
    let own = fleet
        .ssh(
            "demo",
            "grep -E '^(CapEff|NoNewPrivs):' /proc/self/status",
            None,
        )
        .await;
    own.assert_success();
    assert_eq!(
        own.stdout.split_whitespace().collect::<Vec<_>>(),
        ["CapEff:", "0000000000000000", "NoNewPrivs:", "1"],
        "{own:#?}"
    );

    // A burst of 100 background processes runs into the pids limit: the shell cannot fork
    // past it, and says so.
    let container = fleet.containers(Some("demo"));
    let burst = fleet
        .ssh(
            "demo+limited",
            "for i in $(seq 100); do sleep 5 & echo $i; done",
            None,
        )
        .await;
    assert_ne!(burst.code, Some(0), "{burst:#?}");
    assert!(
        burst.stderr.contains("can't fork")
            || burst.stderr.contains("Resource temporarily unavailable"),
        "{burst:#?}"
    );
    // stdout is exactly the numbers of the processes started, in order, then nothing.
    let started: Vec<&str> = burst.stdout.lines().collect();
    let last = started.len();
    assert!((1..64).contains(&last), "started {last} of 100: {burst:#?}");
    let counted: Vec<String> = (1..=last).map(|i| i.to_string()).collect();
    assert_eq!(started, counted, "{burst:#?}");

    // The container is unharmed: once the sleeps end, the same container serves again.
    eventually(
        WAIT,
        "a session in the same container after the burst",
        || async {
            let out = fleet.ssh("demo+limited", "echo alive", None).await;
            if out.code == Some(0) && out.stdout == "alive\n" {
                Ok(())
            } else {
                Err(format!("{out:#?}"))
            }
        },
    )
    .await;
    assert_eq!(fleet.containers(Some("demo")), container);
}
