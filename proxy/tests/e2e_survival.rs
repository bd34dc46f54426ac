//! End to end: the data plane survives the control plane (docs/operations.md, "When the
//! control plane is down"). With every control-plane replica SIGKILLed, a user whose container
//! runs still gets in through the proxy's token and placement caches, for as long as their
//! token lives; nobody and nothing else does, and the control plane takes over again when it
//! is back.

mod support;

use std::time::{Duration, Instant};

use envgate_proto::failure::CONTROL_PLANE_DOWN;
use support::{
    Fleet, FleetOptions, SshOutput, assert_no_internals, eventually, http_get, request_id_in,
};

/// Tokens live this long in these tests; the proxy stops using one 30 s before it expires
/// (`auth_cache::EXPIRY_MARGIN_SECONDS`), so the caches serve for 30 s after a login.
const TOKEN_TTL: u64 = 60;
const EXPIRY_MARGIN: u64 = 30;

fn short_tokens() -> FleetOptions {
    FleetOptions {
        // One proxy: the caches are per proxy (docs/operations.md).
        proxies: 1,
        controlplanes: 2,
        controlplane_args: vec!["--token-ttl-seconds".into(), TOKEN_TTL.to_string()],
        ..FleetOptions::default()
    }
}

fn assert_refused_login(out: &SshOutput) {
    assert_eq!(out.code, Some(255), "{out:#?}");
    assert_eq!(out.stdout, "", "{out:#?}");
    assert!(out.stderr.contains("Permission denied"), "{out:#?}");
}

/// The one `envgate:` line of a placement that could not be made, with its request id.
fn assert_control_plane_down_line(out: &SshOutput) {
    assert_eq!(out.code, Some(1), "{out:#?}");
    let lines = out.stderr_lines();
    assert_eq!(lines.len(), 1, "{out:#?}");
    request_id_in(lines[0], &format!("envgate: {CONTROL_PLANE_DOWN}"));
    assert_no_internals(lines[0]);
}

/// demo gets in, into the container whose `hostname` printed `before`.
async fn assert_gets_in_again(fleet: &Fleet, before: &SshOutput) {
    let out = fleet.ssh("demo", "echo survived; hostname", None).await;
    out.assert_success();
    assert_eq!(
        out.stdout,
        format!("survived\n{}", before.stdout),
        "{out:#?}"
    );
}

/// The value of the Prometheus sample `name{labels}` (0 when absent).
async fn metric(fleet: &Fleet, sample: &str) -> f64 {
    let body = Fleet::metrics(&fleet.proxy_ops[0])
        .await
        .unwrap_or_default();
    body.lines()
        .find_map(|l| l.strip_prefix(sample)?.trim().parse().ok())
        .unwrap_or(0.0)
}

fn audit_events(fleet: &Fleet, event: &str) -> Vec<serde_json::Value> {
    fleet
        .audit_records()
        .into_iter()
        .filter(|r| r["event"] == event)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_containers_stay_reachable_while_no_replica_answers() {
    let mut fleet = Fleet::start_with(short_tokens()).await;
    // Bob exists, but has never logged in through this proxy.
    fleet.add_user("bob", "busybox", None).await;
    let before = fleet.ssh("demo", "hostname", None).await;
    before.assert_success();
    let logged_in_at = Instant::now();
    eventually(
        Duration::from_secs(20),
        "the first session closed",
        || async {
            match fleet.user_sessions("demo").await?.len() {
                0 => Ok(()),
                n => Err(format!("{n} sessions")),
            }
        },
    )
    .await;
    // A session that runs across the kill and ends during the outage.
    let across = fleet
        .session_in_background(
            "demo",
            "echo started; sleep 6; echo ended",
            Duration::from_secs(20),
        )
        .await;
    fleet.kill_controlplane(0);
    fleet.kill_controlplane(1);
    let killed_at = Instant::now();

    // demo's container runs: demo gets in, into the same container.
    assert_gets_in_again(&fleet, &before).await;
    eprintln!(
        "first login after the kill succeeded {:.1} s after it",
        killed_at.elapsed().as_secs_f64()
    );
    let cached = audit_events(&fleet, "session_from_cache");
    assert_eq!(cached.len(), 1, "{cached:#?}");
    assert_eq!(cached[0]["user"], "demo");
    assert_eq!(cached[0]["environment"], "busybox");
    assert!(
        cached[0]["session"]
            .as_str()
            .is_some_and(|s| s.starts_with("cached-")),
        "{cached:#?}"
    );
    assert_eq!(
        metric(
            &fleet,
            "envgate_proxy_placements_from_cache_total{result=\"served\"}"
        )
        .await,
        1.0
    );

    // Another environment of the same user: nothing runs there, one clear line.
    let out = fleet.ssh("demo+debian", "echo in", None).await;
    assert_control_plane_down_line(&out);
    // A key that is not demo's, and a user the proxy has no token for: refused as ever.
    let stranger = fleet.stranger_key();
    assert_refused_login(&fleet.ssh_with_key("demo", &stranger, "echo in", None).await);
    assert_refused_login(&fleet.ssh("bob", "echo in", None).await);
    // Written when the connection ends, a moment after ssh gave up.
    eventually(Duration::from_secs(10), "bob's refusal audited", || async {
        match fleet.last_refusal("bob") {
            reason if reason.contains("control plane") => Ok(()),
            reason => Err(reason),
        }
    })
    .await;

    // The session that ran across the kill ended normally; its end is kept for later. It was
    // a warm login, placed unrecorded and recorded from its proxy's report (docs/decisions.md,
    // "Unrecorded warm logins"), so its end waits as a session update (a recorded session's
    // would wait as a CloseSession: `close_queue.rs`).
    let out = tokio::time::timeout(Duration::from_secs(30), across)
        .await
        .expect("the session ends")
        .expect("ssh task");
    out.assert_success();
    assert_eq!(out.stdout, "started\nended\n");
    eventually(Duration::from_secs(30), "the end kept", || async {
        match metric(&fleet, "envgate_proxy_session_updates_waiting").await {
            1.0 => Ok(()),
            other => Err(format!("{other} waiting")),
        }
    })
    .await;

    // Well past the re-attach grace the proxy is still in the balancer.
    tokio::time::sleep(Duration::from_secs(8).saturating_sub(killed_at.elapsed())).await;
    assert_eq!(
        http_get(&fleet.proxy_ops[0], "/readyz").await.map(|r| r.0),
        Some(200)
    );

    // Once the token is past its use, the cached path ends: no token, no login.
    let lapse = Duration::from_secs(TOKEN_TTL - EXPIRY_MARGIN + 1);
    tokio::time::sleep(lapse.saturating_sub(logged_in_at.elapsed())).await;
    assert_refused_login(&fleet.ssh("demo", "echo in", None).await);
    assert_eq!(audit_events(&fleet, "session_from_cache").len(), 1);

    // A replica back: the kept end is delivered (the session's record goes), and logins take
    // the normal path again.
    fleet.restart_controlplane(0).await;
    eventually(Duration::from_secs(30), "the end delivered", || async {
        let waiting = metric(&fleet, "envgate_proxy_session_updates_waiting").await;
        let sessions = fleet.user_sessions("demo").await?.len();
        if waiting == 0.0 && sessions == 0 {
            Ok(())
        } else {
            Err(format!("{waiting} waiting, {sessions} sessions recorded"))
        }
    })
    .await;
    // The first logins may still be served from the cache while the proxy re-registers.
    let starts = audit_events(&fleet, "session_start").len();
    eventually(
        Duration::from_secs(30),
        "a login placed by the control plane",
        || async {
            let out = fleet.ssh("demo", "hostname", None).await;
            if out.code != Some(0) || out.stdout != before.stdout {
                return Err(format!("{out:#?}"));
            }
            match audit_events(&fleet, "session_start").len() - starts {
                0 => Err("served from the cache".to_owned()),
                _ => Ok(()),
            }
        },
    )
    .await;
}

/// etcd gone, the control plane up: placement answers "unavailable" too, and the proxy rides
/// it out the same way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_containers_stay_reachable_while_etcd_is_down() {
    // One replica, whose log has the detail of the line below.
    let mut fleet = Fleet::start_with(FleetOptions {
        proxies: 1,
        ..FleetOptions::default()
    })
    .await;
    let before = fleet.ssh("demo", "hostname", None).await;
    before.assert_success();
    fleet.kill_etcd();
    assert_gets_in_again(&fleet, &before).await;
    assert_eq!(audit_events(&fleet, "session_from_cache").len(), 1);
    // Nothing runs in debian: the control plane's own line, with its request id.
    let out = fleet.ssh("demo+debian", "true", None).await;
    assert_eq!(out.code, Some(1), "{out:#?}");
    let lines = out.stderr_lines();
    assert_eq!(lines.len(), 1, "{out:#?}");
    let id = request_id_in(lines[0], support::UNAVAILABLE_LINE);
    assert_no_internals(lines[0]);
    // The replica writes its log line as it answers; the file may lag a moment.
    eventually(Duration::from_secs(10), "the detail logged", || async {
        match fleet.log_line_with("controlplane", id) {
            line if line.contains("etcd is unavailable") => Ok(()),
            line => Err(line),
        }
    })
    .await;
}
