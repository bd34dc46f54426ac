//! End to end: failures a user meets — a proxy crashing, Docker or etcd down, an image that is
//! not there — end with one clear `envgate:` line and never leave records or a crashed process.

mod support;

use std::time::{Duration, Instant};

use support::{
    Fleet, FleetOptions, UNAVAILABLE_LINE, assert_no_internals, environment, eventually,
    request_id_in,
};

fn assert_one_envgate_line(out: &support::SshOutput) -> &str {
    assert_ne!(out.code, Some(0), "{out:#?}");
    assert_ne!(out.code, None, "ssh was killed: {out:#?}");
    let lines = out.stderr_lines();
    assert_eq!(lines.len(), 1, "expected one stderr line: {out:#?}");
    assert!(lines[0].starts_with("envgate: "), "{out:#?}");
    lines[0]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_proxy_is_killed_the_next_ssh_still_works() {
    let mut fleet = Fleet::start().await;
    fleet.ssh("demo", "true", None).await.assert_success();
    fleet.kill_proxy(0);
    for attempt in 0..3 {
        let out = fleet.ssh("demo", "echo alive", None).await;
        assert_eq!(out.code, Some(0), "attempt {attempt}: {out:#?}");
        assert_eq!(out.stdout, "alive\n");
    }
    assert!(fleet.proxy_alive(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_proxy_tells_its_sessions_and_exits() {
    let mut fleet = Fleet::start_with(FleetOptions {
        proxies: 1,
        ..FleetOptions::default()
    })
    .await;
    let mut argv = fleet.ssh_key_argv("demo", &fleet.key_of("demo"));
    argv.push("echo started; sleep 50".to_string());
    let session = tokio::spawn(async move { support::run(&argv, None, &[]).await });
    // Drain only once the session runs, so it is a running session that gets told.
    eventually(Duration::from_secs(20), "a session record", || async {
        let sessions = fleet.etcd_records("sessions/").await?;
        if sessions.is_empty() {
            Err("none yet".to_string())
        } else {
            Ok(())
        }
    })
    .await;
    let drained_at = Instant::now();
    fleet.terminate_proxy(0);
    let out = session.await.expect("ssh task");
    // The harness gives proxies a 2 s shutdown grace; the session must not run its 50 s.
    assert!(
        drained_at.elapsed() < Duration::from_secs(20),
        "the session outlived the drain: {out:#?}"
    );
    assert_eq!(out.stdout, "started\n");
    assert_ne!(out.code, Some(0), "{out:#?}");
    assert!(out.stderr.contains("shutting down"), "{out:#?}");
    let deadline = Instant::now() + Duration::from_secs(20);
    while fleet.proxy_exit(0).is_none() {
        assert!(Instant::now() < deadline, "the drained proxy did not exit");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_unreachable_is_one_clear_line_and_leaves_no_record() {
    let mut fleet = Fleet::start_with(FleetOptions {
        docker_host: Some("unix:///nonexistent/envgate-e2e/docker.sock".to_string()),
        ..FleetOptions::default()
    })
    .await;
    let out = fleet.ssh("demo", "true", None).await;
    let line = assert_one_envgate_line(&out);
    let id = request_id_in(line, UNAVAILABLE_LINE);
    assert_no_internals(line);
    // The operator finds the detail under the id the user was shown.
    let detail = fleet.log_line_with("controlplane", id);
    assert!(detail.contains("docker is unavailable"), "{detail:?}");
    eventually(
        Duration::from_secs(15),
        "no container or session record",
        || async {
            let containers = fleet.etcd_records("containers/").await?;
            let sessions = fleet.etcd_records("sessions/").await?;
            if containers.is_empty() && sessions.is_empty() {
                Ok(())
            } else {
                Err(format!("{containers:?} {sessions:?}"))
            }
        },
    )
    .await;
    assert!(fleet.controlplane_alive());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_image_is_one_clear_line() {
    let fleet = Fleet::start().await;
    // Its registry is a closed loopback port: the pull fails at once, and nothing leaves loopback.
    let image = format!(
        "127.0.0.1:1/envgate/missing-{:08x}:latest",
        rand::random::<u32>()
    );
    fleet
        .put_environment(environment("ghost", &image, "/bin/sh", false))
        .await;
    let out = fleet.ssh("demo+ghost", "true", None).await;
    let line = assert_one_envgate_line(&out);
    // Not here and no registry reachable: which image, in one line; the registry's answer is
    // in the log under the request id.
    let id = request_id_in(
        line,
        &format!(
            "envgate: environment \"ghost\" cannot start: its image {image} could not be pulled"
        ),
    );
    let detail = fleet.log_line_with("controlplane", id);
    assert!(detail.contains("cannot pull image"), "{detail:?}");
    assert!(
        fleet.containers(None).is_empty(),
        "{:?}",
        fleet.containers(None)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_down_is_one_clear_line_and_nothing_crashes() {
    // One proxy, so the token cached by the first login is there for the second one and the
    // second login reaches placement, which needs etcd. Another environment than the one
    // running: the running one is still reached (e2e_survival).
    let mut fleet = Fleet::start_with(FleetOptions {
        proxies: 1,
        ..FleetOptions::default()
    })
    .await;
    fleet.ssh("demo", "true", None).await.assert_success();
    fleet.kill_etcd();
    let out = fleet.ssh("demo+debian", "true", None).await;
    let line = assert_one_envgate_line(&out);
    let id = request_id_in(line, UNAVAILABLE_LINE);
    assert_no_internals(line);
    let detail = fleet.log_line_with("controlplane", id);
    assert!(detail.contains("etcd is unavailable"), "{detail:?}");
    assert!(
        fleet.controlplane_alive(),
        "control plane died\n{}",
        fleet.logs()
    );
    assert!(fleet.proxy_alive(0), "the proxy died\n{}", fleet.logs());
    // Still serving: the same answer again, not a hang or a crash.
    let again = fleet.ssh("demo+debian", "true", None).await;
    assert_one_envgate_line(&again);
}

/// The control plane gone altogether: the proxy noticed, so the proxy logs the detail under a
/// request id of its own, and the user reads that only running environments can be reached.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_control_plane_is_one_clear_line_with_the_proxys_request_id() {
    // One proxy, so the second login is a token-cache hit and reaches placement; in another
    // environment than the one running, which is still reached (e2e_survival).
    let mut fleet = Fleet::start_with(FleetOptions {
        proxies: 1,
        ..FleetOptions::default()
    })
    .await;
    fleet.ssh("demo", "true", None).await.assert_success();
    fleet.kill_controlplane(0);
    let out = fleet.ssh("demo+debian", "true", None).await;
    let line = assert_one_envgate_line(&out);
    let id = request_id_in(
        line,
        &format!("envgate: {}", envgate_proto::failure::CONTROL_PLANE_DOWN),
    );
    assert_no_internals(line);
    let detail = fleet.log_line_with("proxy-0", id);
    assert!(detail.contains("tcp connect error"), "{detail:?}");
    assert!(fleet.proxy_alive(0), "the proxy died\n{}", fleet.logs());
}
