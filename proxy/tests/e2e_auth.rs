//! End to end: who gets in. Wrong credentials and bad user names are refused the way OpenSSH
//! refuses them, create nothing, and do not disturb the next user.

mod support;

use support::Fleet;

fn assert_denied(out: &support::SshOutput) {
    assert_eq!(out.code, Some(255), "{out:#?}");
    assert!(out.stderr.contains("Permission denied"), "{out:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_right_password_logs_in() {
    let fleet = Fleet::start().await;
    fleet
        .add_user("pat", "busybox", Some("correct horse"))
        .await;
    let out = fleet.ssh_password("pat", "correct horse", "echo in").await;
    out.assert_success();
    assert_eq!(out.stdout, "in\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_password_is_permission_denied_and_creates_nothing() {
    let fleet = Fleet::start().await;
    fleet
        .add_user("pat", "busybox", Some("correct horse"))
        .await;
    let out = fleet.ssh_password("pat", "wrong horse", "echo in").await;
    assert_denied(&out);
    assert!(
        fleet.containers(None).is_empty(),
        "{:?}",
        fleet.containers(None)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_key_is_permission_denied_and_creates_nothing() {
    let fleet = Fleet::start().await;
    let stranger = fleet.stranger_key();
    let out = fleet.ssh_with_key("demo", &stranger, "echo in", None).await;
    assert_denied(&out);
    assert!(
        fleet.containers(None).is_empty(),
        "{:?}",
        fleet.containers(None)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_user_names_are_refused_and_the_proxy_serves_the_next_user() {
    let fleet = Fleet::start().await;
    let key = fleet.key_of("demo");
    let too_long = "a".repeat(40);
    for login in ["", too_long.as_str(), "de\u{1}mo", "a+b+c", "+x", "demo+"] {
        let out = fleet.ssh_with_key(login, &key, "echo in", None).await;
        assert_ne!(out.code, Some(0), "login {login:?} got in: {out:#?}");
        assert!(!out.stdout.contains("in"), "login {login:?}: {out:#?}");
        assert!(
            out.stderr.contains("Permission denied") || out.stderr.contains("invalid"),
            "login {login:?} was not refused cleanly: {out:#?}"
        );
    }
    assert!(
        fleet.containers(None).is_empty(),
        "{:?}",
        fleet.containers(None)
    );
    let out = fleet.ssh("demo", "echo still-serving", None).await;
    out.assert_success();
    assert_eq!(out.stdout, "still-serving\n");
}
