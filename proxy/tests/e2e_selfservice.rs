//! End to end: the `envgate` pseudo-environment (`ssh demo+envgate envs|status|stop|default`)
//! through HAProxy and the real OpenSSH client, against the real control plane, etcd and
//! Docker — what the user reads, the exit status, and the containers and records left.

mod support;

use std::time::Duration;

use serde_json::Value;
use support::{Fleet, SshOutput, WHICH, eventually, landed_in};

const WAIT: Duration = Duration::from_secs(30);

/// `ssh demo+envgate <command>`.
async fn envgate(fleet: &Fleet, user: &str, command: &str) -> SshOutput {
    fleet.ssh(&format!("{user}+envgate"), command, None).await
}

/// `ssh demo+envgate <command> --json`, which must succeed; its document.
async fn envgate_json(fleet: &Fleet, user: &str, command: &str) -> Value {
    let out = envgate(fleet, user, &format!("{command} --json")).await;
    out.assert_success();
    serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("{command} --json printed no JSON ({e}): {out:#?}"))
}

/// The rows of a tab-separated table under its `header` line (up to the next blank line).
fn table<'a>(text: &'a str, header: &str) -> Vec<Vec<&'a str>> {
    let mut lines = text.lines().skip_while(|l| !l.starts_with(header));
    assert!(lines.next().is_some(), "no {header:?} table in {text:?}");
    lines
        .take_while(|l| !l.is_empty())
        .map(|l| l.split('\t').collect())
        .collect()
}

/// The row whose first column is `first`.
fn row<'a>(rows: &[Vec<&'a str>], first: &str) -> Option<Vec<&'a str>> {
    rows.iter().find(|r| r.first() == Some(&first)).cloned()
}

/// A restricted environment demo's group (`users`) does not allow.
async fn put_staff_only(fleet: &Fleet) {
    let mut staff = support::environment("staffonly", support::BUSYBOX_IMAGE, "/bin/sh", false);
    staff.allowed_groups = vec!["staff".to_string()];
    fleet.put_environment(staff).await;
}

/// The keys of `user`'s placement records in etcd.
async fn container_records(fleet: &Fleet, user: &str) -> Vec<String> {
    fleet
        .etcd_records(&format!("containers/{user}/"))
        .await
        .expect("etcd read")
        .into_iter()
        .map(|(k, _)| k)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envs_lists_the_allowed_catalogue_marking_default_and_running() {
    let fleet = Fleet::start().await;
    put_staff_only(&fleet).await;

    let out = envgate(&fleet, "demo", "envs").await;
    out.assert_success();
    assert!(
        out.stdout
            .starts_with("NAME\tDEFAULT\tRUNNING\tMODE\tIDLE_TIMEOUT\tMAX_LIFETIME\tDESCRIPTION\n"),
        "{out:#?}"
    );
    let rows = table(&out.stdout, "NAME\t");
    let names: Vec<&str> = rows.iter().map(|r| r[0]).collect();
    assert_eq!(names, ["busybox", "debian"], "staffonly is not listed");
    let busybox = row(&rows, "busybox").expect("busybox row");
    assert_eq!(busybox[1], "yours", "demo's saved default: {busybox:?}");
    assert_eq!(busybox[2], "no");
    assert_eq!(busybox[6], "e2e busybox", "the description comes last");
    assert_eq!(row(&rows, "debian").expect("debian")[2], "no");

    fleet
        .ssh("demo+debian", "true", None)
        .await
        .assert_success();
    let out = envgate(&fleet, "demo", "envs").await;
    out.assert_success();
    let rows = table(&out.stdout, "NAME\t");
    let debian = row(&rows, "debian").expect("debian row");
    assert_eq!((debian[1], debian[2]), ("-", "yes"), "{debian:?}");
    assert_eq!(row(&rows, "busybox").expect("busybox")[2], "no");
    // What a script does with it.
    let running: Vec<&str> = rows
        .iter()
        .filter(|r| r[2] == "yes")
        .map(|r| r[0])
        .collect();
    assert_eq!(running, ["debian"]);

    let doc = envgate_json(&fleet, "demo", "envs").await;
    assert_eq!(doc["user_default"], "busybox");
    assert_eq!(doc["catalogue_default"], "busybox");
    let envs = doc["environments"].as_array().expect("environments");
    let names: Vec<&str> = envs.iter().filter_map(|e| e["name"].as_str()).collect();
    assert_eq!(names, ["busybox", "debian"]);
    assert_eq!(envs[0]["user_default"], true);
    assert_eq!(envs[0]["running"], false);
    assert_eq!(envs[1]["running"], true);
    assert_eq!(envs[1]["mode"], "persistent");
    assert!(
        envs[1]["idle_timeout_seconds"].as_u64().unwrap_or(0) > 0,
        "{doc}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_containers_sessions_and_idle_time_left() {
    let fleet = Fleet::start().await;
    let idle_timeout =
        envgate_json(&fleet, "demo", "envs").await["environments"][0]["idle_timeout_seconds"]
            .as_i64()
            .expect("busybox's idle timeout");

    let out = envgate(&fleet, "demo", "status").await;
    out.assert_success();
    assert!(table(&out.stdout, "ENVIRONMENT\t").is_empty(), "{out:#?}");
    assert!(table(&out.stdout, "SESSION\t").is_empty(), "{out:#?}");

    let ssh = fleet.session_in_background("demo", "sleep 30", WAIT).await;
    let out = envgate(&fleet, "demo", "status").await;
    out.assert_success();
    let containers = table(&out.stdout, "ENVIRONMENT\t");
    assert_eq!(containers.len(), 1, "{out:#?}");
    let busybox = &containers[0];
    assert_eq!(&busybox[..5], ["busybox", "running", "1", "in-use", "-"]);
    let docker = fleet.containers(Some("demo"));
    assert_eq!(busybox[6], docker[0].name, "the container's name");
    let sessions = table(&out.stdout, "SESSION\t");
    assert_eq!(sessions.len(), 1, "{out:#?}");
    let recorded = fleet.user_sessions("demo").await.expect("sessions");
    assert_eq!(sessions[0][0], recorded[0]["id"].as_str().expect("id"));
    assert_eq!(&sessions[0][1..3], ["busybox", "exec"]);

    let doc = envgate_json(&fleet, "demo", "status").await;
    assert_eq!(doc["containers"][0]["sessions"], 1);
    assert_eq!(doc["containers"][0]["idle_seconds_left"], -1);
    assert_eq!(doc["containers"][0]["lifetime_seconds_left"], -1);
    assert_eq!(doc["sessions"][0]["id"], recorded[0]["id"]);
    assert_eq!(doc["sessions"][0]["environment"], "busybox");

    // The client goes away: the session closes and the idle clock starts.
    ssh.abort();
    let _ = ssh.await;
    let left = eventually(WAIT, "the idle clock started", || async {
        let doc = envgate_json(&fleet, "demo", "status").await;
        let container = &doc["containers"][0];
        match (
            container["sessions"].as_u64(),
            container["idle_seconds_left"].as_i64(),
        ) {
            (Some(0) | None, Some(left))
                if left >= 0 && doc["sessions"].as_array().is_some_and(Vec::is_empty) =>
            {
                Ok(left)
            }
            _ => Err(doc.to_string()),
        }
    })
    .await;
    assert!(left > 0 && left <= idle_timeout, "{left} of {idle_timeout}");
    let out = envgate(&fleet, "demo", "status").await;
    out.assert_success();
    let busybox = table(&out.stdout, "ENVIRONMENT\t").remove(0);
    assert_eq!(busybox[2], "0");
    let text_left: i64 = busybox[3].parse().expect("seconds left as a number");
    assert!(text_left > 0 && text_left <= idle_timeout, "{busybox:?}");
    assert!(table(&out.stdout, "SESSION\t").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_ends_the_sessions_removes_the_container_and_keeps_home() {
    let fleet = Fleet::start().await;
    fleet
        .ssh("demo", "echo x > ~/keep", None)
        .await
        .assert_success();
    let before = fleet.containers(Some("demo"));
    assert_eq!(before.len(), 1, "{before:?}");

    let ssh = fleet
        .session_in_background("demo", "echo started; sleep 60", WAIT)
        .await;
    let out = envgate(&fleet, "demo", "stop busybox").await;
    out.assert_success();
    assert_eq!(
        out.stdout,
        "stopped busybox (1 session ended); your home directory is kept\n"
    );
    support::assert_told(
        ssh,
        WAIT,
        "environment \"busybox\" was stopped (ssh demo+envgate stop busybox); your home directory is kept",
    )
    .await;
    assert!(
        fleet.containers(Some("demo")).is_empty(),
        "gone from Docker"
    );
    assert!(
        container_records(&fleet, "demo").await.is_empty(),
        "gone from etcd"
    );
    fleet.assert_home_volume_kept("demo");

    let out = fleet.ssh("demo", "cat keep", None).await;
    out.assert_success();
    assert_eq!(out.stdout, "x\n");
    let after = fleet.containers(Some("demo"));
    assert_eq!(after.len(), 1, "{after:?}");
    assert_ne!(after[0].id, before[0].id, "a new container");

    // Stopping what is not running is an answer, not an error.
    let out = envgate(&fleet, "demo", "stop debian").await;
    out.assert_success();
    assert_eq!(out.stdout, "debian is not running; nothing to stop\n");
    let doc = envgate_json(&fleet, "demo", "stop busybox").await;
    assert_eq!(doc["stopped"], true);
    assert_eq!(doc["sessions_ended"], 0);
    let out = envgate(&fleet, "demo", "stop busybox").await;
    out.assert_success();
    assert_eq!(out.stdout, "busybox is not running; nothing to stop\n");
    assert!(fleet.containers(Some("demo")).is_empty());

    let out = envgate(&fleet, "demo", "stop nope").await;
    assert_eq!(out.code, Some(1), "{out:#?}");
    assert_eq!(
        out.stderr_lines(),
        ["envgate: unknown environment \"nope\"; available: busybox, debian"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_is_saved_refused_and_cleared() {
    let fleet = Fleet::start().await;
    put_staff_only(&fleet).await;
    assert_eq!(landed_in(&fleet.ssh("demo", WHICH, None).await), "busybox");

    let out = envgate(&fleet, "demo", "default debian").await;
    out.assert_success();
    assert_eq!(out.stdout, "your default environment is now debian\n");
    assert_eq!(landed_in(&fleet.ssh("demo", WHICH, None).await), "debian");
    let users = fleet.etcd_records("users/demo").await.expect("etcd");
    let record: Value = serde_json::from_str(&users[0].1).expect("user record");
    assert_eq!(record["default_environment"], "debian");
    assert!(
        record["authorized_keys"]
            .as_array()
            .is_some_and(|k| !k.is_empty()),
        "the rest of the record is kept: {record}"
    );

    let out = envgate(&fleet, "demo", "default nope").await;
    assert_eq!(out.code, Some(1), "{out:#?}");
    assert_eq!(
        out.stderr_lines(),
        ["envgate: unknown environment \"nope\"; available: busybox, debian"]
    );
    let out = envgate(&fleet, "demo", "default staffonly").await;
    assert_eq!(out.code, Some(1), "{out:#?}");
    assert_eq!(
        out.stderr_lines(),
        ["envgate: environment \"staffonly\" is not available to you"]
    );
    assert_eq!(
        envgate_json(&fleet, "demo", "envs").await["user_default"],
        "debian",
        "refusals change nothing"
    );

    let out = envgate(&fleet, "demo", "default --clear").await;
    out.assert_success();
    assert_eq!(
        envgate_json(&fleet, "demo", "envs").await["user_default"],
        ""
    );
    assert_eq!(
        landed_in(&fleet.ssh("demo", WHICH, None).await),
        "busybox",
        "the catalogue's default again"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_help_setenv_and_no_container_for_self_service() {
    let fleet = Fleet::start().await;
    fleet.add_user("fresh", "", None).await;

    let out = envgate(&fleet, "fresh", "frobnicate").await;
    assert_eq!(out.code, Some(2), "{out:#?}");
    let lines = out.stderr_lines();
    assert_eq!(lines.len(), 1, "{out:#?}");
    assert!(
        lines[0]
            .starts_with("envgate: unknown command \"frobnicate\"; usage: ssh USER+envgate envs"),
        "{out:#?}"
    );
    assert!(out.stdout.is_empty());
    let out = envgate(&fleet, "fresh", "stop").await;
    assert_eq!(out.code, Some(2), "{out:#?}");

    // No command: a shell request, answered with the help.
    let out = envgate(&fleet, "fresh", "").await;
    out.assert_success();
    assert!(out.stdout.contains("  envs [--json]"), "{out:#?}");
    assert!(out.stdout.contains("  default --clear"), "{out:#?}");
    assert_eq!(envgate(&fleet, "fresh", "help").await.stdout, out.stdout);

    let out = fleet
        .ssh_with_options(
            "fresh",
            &fleet.key_of("fresh"),
            &["SetEnv=ENVGATE_ENV=envgate"],
            "envs",
            None,
        )
        .await;
    out.assert_success();
    let rows = table(&out.stdout, "NAME\t");
    assert_eq!(
        row(&rows, "busybox").expect("busybox")[1],
        "catalogue",
        "fresh has no default of their own: {out:#?}"
    );
    let plain = out.stdout;

    // On a terminal the lines end as the terminal needs them.
    let out = fleet
        .ssh_with_options(
            "fresh+envgate",
            &fleet.key_of("fresh"),
            &["RequestTTY=force"],
            "envs",
            None,
        )
        .await;
    out.assert_success();
    assert_eq!(
        out.stdout,
        plain.replace('\n', "\r\n"),
        "the same table as without a terminal, each line ending in CR LF"
    );

    for command in [
        "envs",
        "status --json",
        "stop busybox",
        "default debian",
        "default --clear",
    ] {
        envgate(&fleet, "fresh", command).await.assert_success();
    }
    assert!(
        fleet.containers(Some("fresh")).is_empty(),
        "no container in Docker"
    );
    assert!(
        container_records(&fleet, "fresh").await.is_empty(),
        "no placement record"
    );
    assert!(fleet.user_sessions("fresh").await.expect("etcd").is_empty());
    assert!(
        !fleet.volume_exists(&fleet.home_volume("fresh")),
        "not even a home volume"
    );

    // Counted as self-service connections on the proxies.
    fleet.wait_connections_counted("self_service", WAIT).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_see_and_stop_only_their_own_containers() {
    let fleet = Fleet::start().await;
    fleet.add_user("bob", "busybox", None).await;
    let demo_session = fleet
        .session_in_background("demo", "echo started; sleep 40", WAIT)
        .await;
    let demo_container = fleet.containers(Some("demo"));
    assert_eq!(demo_container.len(), 1);

    let bob = envgate_json(&fleet, "bob", "status").await;
    assert_eq!(bob["containers"], Value::Array(vec![]), "{bob}");
    assert_eq!(bob["sessions"], Value::Array(vec![]), "{bob}");
    let doc = envgate_json(&fleet, "bob", "envs").await;
    assert!(
        doc["environments"]
            .as_array()
            .expect("environments")
            .iter()
            .all(|e| e["running"] == false),
        "demo's container is not bob's: {doc}"
    );

    fleet.ssh("bob", "true", None).await.assert_success();
    let bob = envgate_json(&fleet, "bob", "status").await;
    let names: Vec<&str> = bob["containers"]
        .as_array()
        .expect("containers")
        .iter()
        .filter_map(|c| c["container_name"].as_str())
        .collect();
    assert_eq!(names, [fleet.containers(Some("bob"))[0].name.as_str()]);
    assert_eq!(
        bob["sessions"],
        Value::Array(vec![]),
        "demo's session is not bob's"
    );

    let stopped = envgate_json(&fleet, "bob", "stop busybox").await;
    assert_eq!(stopped["stopped"], true);
    assert_eq!(
        stopped["sessions_ended"], 0,
        "demo's session was not touched"
    );
    assert!(fleet.containers(Some("bob")).is_empty());
    assert_eq!(
        fleet.containers(Some("demo")),
        demo_container,
        "demo's survives"
    );
    assert_eq!(
        container_records(&fleet, "demo").await,
        ["containers/demo/busybox"]
    );
    assert!(!demo_session.is_finished(), "demo's session goes on");

    let demo = envgate_json(&fleet, "demo", "status").await;
    assert_eq!(
        demo["containers"].as_array().map(Vec::len),
        Some(1),
        "{demo}"
    );
    assert_eq!(demo["containers"][0]["sessions"], 1, "{demo}");
    demo_session.abort();
}
