//! End to end: admission control for container creation. With `--create-concurrency 1`,
//! several users who have never logged in connect at once, half of them on terminals, half
//! running a command without one: every login succeeds, Docker never creates two of their
//! containers at once, and those who waited in line were told their place on stderr before
//! their environment started, terminal or not. Without a terminal, a user who did not wait
//! sees no progress at all (stderr stays the command's own).
//!
//! Real etcd, control plane, proxies, HAProxy, Docker and OpenSSH; see `support/mod.rs` and
//! docs/operations.md ("Many first logins at once").

mod support;

use std::process::Command;

use support::{Fleet, FleetOptions, run};

const USERS: usize = 6;
/// Rounds of new users, until one round had someone wait in line. Six at once behind one
/// slot have always queued here; a round in which nobody waited proves nothing, so another
/// round is tried rather than passing vacuously.
const ROUNDS: usize = 3;

const QUEUED: &str = "queued to start environment \"busybox\": ";
const STARTING: &str = "starting environment \"busybox\" …";

/// Nanoseconds since the epoch of a Docker timestamp (`2026-12-05T22:50:01.123456789Z`).
fn docker_time(stamp: &str) -> i128 {
    let parse = |s: &str| -> i128 { s.parse().unwrap_or_else(|_| panic!("{stamp}")) };
    let (date, time) = stamp
        .trim()
        .trim_end_matches('Z')
        .split_once('T')
        .unwrap_or_else(|| panic!("{stamp}"));
    let d: Vec<i128> = date.split('-').map(parse).collect();
    let (clock, fraction) = time.split_once('.').unwrap_or((time, "0"));
    let t: Vec<i128> = clock.split(':').map(parse).collect();
    let nanos = parse(&format!("{fraction:0<9}")[..9]);
    // Days from civil (H. Hinnant), for a year of the Gregorian calendar.
    let (y, m) = if d[1] <= 2 {
        (d[0] - 1, d[1] + 9)
    } else {
        (d[0], d[1] - 3)
    };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * m + 2) / 5 + d[2] - 1;
    let days = era * 146_097 + yoe * 365 + yoe / 4 - yoe / 100 + doy - 719_468;
    ((days * 86_400 + t[0] * 3600 + t[1] * 60 + t[2]) * 1_000_000_000) + nanos
}

/// When Docker created and started container `id`.
fn created_and_started(id: &str) -> (i128, i128) {
    let out = Command::new("docker")
        .args([
            "inspect",
            "--format",
            "{{.Created}} {{.State.StartedAt}}",
            id,
        ])
        .output()
        .expect("docker inspect");
    let text = String::from_utf8_lossy(&out.stdout);
    let (created, started) = text
        .trim()
        .split_once(' ')
        .unwrap_or_else(|| panic!("docker inspect {id}: {text}"));
    (docker_time(created), docker_time(started))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_users_beyond_the_creation_limit_wait_in_line_told_their_place_and_all_get_in() {
    let fleet = Fleet::start_with(FleetOptions {
        controlplane_args: vec!["--create-concurrency".into(), "1".into()],
        ..FleetOptions::default()
    })
    .await;
    let mut queued_anyone = false;
    let mut windows = Vec::new();
    for round in 0..ROUNDS {
        let users: Vec<String> = (0..USERS).map(|i| format!("new{round}x{i}")).collect();
        for user in &users {
            fleet.add_user(user, "busybox", None).await;
        }
        let terminal = |i: usize| i % 2 == 0;
        let logins = users.iter().enumerate().map(|(i, user)| {
            let mut argv = if terminal(i) {
                fleet.ssh_terminal_argv(user)
            } else {
                fleet.ssh_key_argv(user, &fleet.key_of(user))
            };
            argv.push("id -un".into());
            async move { run(&argv, None, &[]).await }
        });
        let outputs = futures::future::join_all(logins).await;
        for (i, (user, out)) in users.iter().zip(&outputs).enumerate() {
            out.assert_success();
            assert_eq!(out.stdout.trim(), user.as_str(), "{out:#?}");
            let lines = out.stderr_lines();
            let starting = lines.iter().position(|l| l.trim_end() == STARTING);
            let waited = lines.iter().any(|l| l.starts_with(QUEUED));
            assert_eq!(
                starting.is_some(),
                terminal(i) || waited,
                "{user} (terminal: {}) was told it starts, or not, wrongly: {lines:?}",
                terminal(i)
            );
            if !terminal(i) && !waited {
                assert_eq!(lines, Vec::<&str>::new(), "{user} without a terminal");
            }
            for (at, line) in lines.iter().enumerate() {
                let Some(place) = line.trim_end().strip_prefix(QUEUED) else {
                    continue;
                };
                queued_anyone = true;
                assert!(
                    place == "you are next"
                        || place == "1 user ahead of you"
                        || place
                            .strip_suffix(" users ahead of you")
                            .and_then(|n| n.parse::<usize>().ok())
                            .is_some_and(|n| (2..USERS).contains(&n)),
                    "{user}: {line:?}"
                );
                assert!(
                    Some(at) < starting,
                    "{user} was told its place after it started: {lines:?}"
                );
            }
        }
        for user in &users {
            let [container] = fleet
                .containers(Some(user))
                .try_into()
                .unwrap_or_else(|c| panic!("{user} should have one container: {c:?}"));
            windows.push((user.clone(), created_and_started(&container.id)));
        }
        if queued_anyone {
            break;
        }
    }
    assert!(
        queued_anyone,
        "{ROUNDS} rounds of {USERS} new users behind one creation slot, and nobody waited"
    );
    // One slot: Docker never had two of these containers between "created" and "started".
    windows.sort_by_key(|(_, (created, _))| *created);
    for pair in windows.windows(2) {
        let [(a, (_, a_started)), (b, (b_created, _))] = pair else {
            unreachable!()
        };
        assert!(
            a_started <= b_created,
            "{b}'s container was created before {a}'s had started"
        );
    }
}
