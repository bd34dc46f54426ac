//! End to end: failed logins, counted across the fleet, slow a guesser down without locking
//! anyone out. Real `ssh` through HAProxy; the source address is what HAProxy reports
//! (`ssh -b 127.0.0.x`).

mod support;

use support::{Fleet, FleetOptions, run};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn six_keys_in_an_agent_never_lock_their_user_out() {
    let fleet = Fleet::start_with(FleetOptions {
        proxies: 1,
        ..FleetOptions::default()
    })
    .await;
    // A real ssh-agent holding five keys nobody authorized, then demo's: the client offers
    // them in that order on every login.
    let mut keys: Vec<_> = (0..5).map(|_| fleet.stranger_key()).collect();
    keys.push(fleet.key_of("demo"));
    let agent = fleet.ssh_agent(&keys).await;
    for attempt in 0..3 {
        let mut argv = fleet.ssh_agent_argv("demo", &agent.socket);
        argv.push("echo in".into());
        let out = run(&argv, None, &[]).await;
        assert_eq!(
            (out.code, out.stdout.as_str()),
            (Some(0), "in\n"),
            "login {attempt}: {out:#?}"
        );
    }
    // Fifteen refused offers, and not one failure counted.
    assert_eq!(fleet.etcd_records("throttle/").await.unwrap(), Vec::new());
}

/// The reason the latest failed login of `user` from `ip` was refused, from the audit log.
fn last_refusal(fleet: &Fleet, user: &str, ip: &str) -> Option<String> {
    fleet
        .audit_records()
        .into_iter()
        .filter(|r| {
            r["event"] == "login"
                && r["outcome"] == "failure"
                && r["user"] == user
                && r["client"]
                    .as_str()
                    .is_some_and(|c| c.starts_with(&format!("{ip}:")))
        })
        .filter_map(|r| r["reason"].as_str().map(str::to_owned))
        .next_back()
}

/// The wait the reason names (`… retry in N s`), if it is a throttling refusal.
fn wait_of(reason: &str) -> Option<u64> {
    reason
        .strip_suffix(" s")?
        .strip_prefix("too many failed attempts; retry in ")?
        .parse()
        .ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_password_guesser_is_slowed_down_and_the_user_still_gets_in_from_elsewhere() {
    // One free failure, so the doubling waits (1, 2, 4, 8 s …) show within a few guesses;
    // each refused password also costs the guesser SSH's one-second rejection delay.
    let fleet = Fleet::start_with(FleetOptions {
        proxies: 1,
        env: vec![("ENVGATE_AUTH_FREE_FAILURES".into(), "1".into())],
        ..FleetOptions::default()
    })
    .await;
    fleet
        .add_user("alice", "busybox", Some("the right one"))
        .await;
    let from = |ip: &'static str| ["-b", ip];
    // Guess from 127.0.0.3 until the control plane makes that address wait at least 4 s.
    let mut waited = None;
    // Every other guess is typed at a keyboard-interactive prompt: both count alike.
    for guess in 0..12 {
        let method = match guess % 2 {
            0 => "PreferredAuthentications=password",
            _ => "PreferredAuthentications=keyboard-interactive",
        };
        let out = fleet
            .ssh_password_with_options(
                &["-b", "127.0.0.3", "-o", method],
                "alice",
                &format!("guess{guess}"),
                "true",
            )
            .await;
        assert_eq!(out.code, Some(255), "{out:#?}");
        let reason = last_refusal(&fleet, "alice", "127.0.0.3").unwrap_or_default();
        if let Some(wait) = wait_of(&reason).filter(|w| *w >= 4) {
            waited = Some(wait);
            break;
        }
    }
    let waited = waited.expect("the guesses are slowed down");
    assert!(waited <= 16, "the wait doubles from 1 s: {waited}");
    // Now even the right password is refused there, before it is checked …
    let out = fleet
        .ssh_password_with_options(&from("127.0.0.3"), "alice", "the right one", "true")
        .await;
    assert_eq!(out.code, Some(255), "{out:#?}");
    assert!(out.stderr.contains("Permission denied"), "{out:#?}");
    let reason = last_refusal(&fleet, "alice", "127.0.0.3").unwrap();
    assert!(wait_of(&reason).is_some(), "{reason}");
    // … while alice, from her own address, gets in at once.
    let out = fleet
        .ssh_password_with_options(&from("127.0.0.4"), "alice", "the right one", "echo in")
        .await;
    assert_eq!(
        (out.code, out.stdout.as_str()),
        (Some(0), "in\n"),
        "{out:#?}"
    );
}
