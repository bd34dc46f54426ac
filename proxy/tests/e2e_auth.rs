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

const KEYBOARD_INTERACTIVE: &[&str] = &["-o", "PreferredAuthentications=keyboard-interactive"];

/// The latest login record of `user` in the audit log.
fn last_login(fleet: &Fleet, user: &str) -> serde_json::Value {
    fleet
        .audit_records()
        .into_iter()
        .rfind(|r| r["event"] == "login" && r["user"] == user)
        .expect("a login record")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyboard_interactive_asks_once_for_the_password_and_checks_it_as_one() {
    let fleet = Fleet::start().await;
    fleet
        .add_user("pat", "busybox", Some("correct horse"))
        .await;
    fleet.add_user("kim", "busybox", None).await;

    let (out, prompts) = fleet
        .ssh_password_prompts(KEYBOARD_INTERACTIVE, "pat", "correct horse", "echo in")
        .await;
    out.assert_success();
    assert_eq!(out.stdout, "in\n");
    // One prompt, as sshd shows with PAM; ssh puts the login in front of it.
    assert_eq!(prompts.lines().count(), 1, "{prompts:?}");
    assert!(prompts.contains("Password:"), "{prompts:?}");
    let record = last_login(&fleet, "pat");
    assert_eq!(
        (&record["outcome"], &record["method"]),
        (&"success".into(), &"keyboard-interactive".into()),
        "{record}"
    );

    let (out, _) = fleet
        .ssh_password_prompts(KEYBOARD_INTERACTIVE, "pat", "wrong horse", "echo in")
        .await;
    assert_denied(&out);
    let record = last_login(&fleet, "pat");
    assert_eq!(
        (&record["outcome"], &record["method"]),
        (&"failure".into(), &"keyboard-interactive".into()),
        "{record}"
    );
    // A user without a password gets nowhere with one, whatever is typed.
    let (out, _) = fleet
        .ssh_password_prompts(KEYBOARD_INTERACTIVE, "kim", "", "echo in")
        .await;
    assert_denied(&out);
    assert!(
        fleet.containers(Some("kim")).is_empty(),
        "{:?}",
        fleet.containers(Some("kim"))
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

const BAD_LOGINS: &[&str] = &[
    "",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", // 40 characters
    "de\u{1}mo",                                // a control character
    "a+b+c",
    "+x",
    "demo+",
    "Demo",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_user_names_are_refused_and_the_proxy_serves_the_next_user() {
    let mut fleet = Fleet::start().await;
    let key = fleet.key_of("demo");
    // Byte for byte on the wire (OpenSSH refuses control characters before sending them).
    for login in BAD_LOGINS {
        let accepted = fleet.raw_publickey_login(login, &key).await;
        assert!(
            !matches!(accepted, Ok(true)),
            "login {login:?} was accepted"
        );
    }
    // What an OpenSSH user sees for the names it does send.
    for login in BAD_LOGINS.iter().filter(|l| !l.contains('\u{1}')) {
        let out = fleet.ssh_with_key(login, &key, "echo in", None).await;
        assert_ne!(out.code, Some(0), "login {login:?} got in: {out:#?}");
        assert!(!out.stdout.contains("in"), "login {login:?}: {out:#?}");
        assert!(
            out.stderr.contains("Permission denied"),
            "login {login:?} was not refused cleanly: {out:#?}"
        );
    }
    assert!(
        fleet.containers(None).is_empty(),
        "{:?}",
        fleet.containers(None)
    );
    assert!(fleet.proxy_alive(0) && fleet.proxy_alive(1));
    let out = fleet.ssh("demo", "echo still-serving", None).await;
    out.assert_success();
    assert_eq!(out.stdout, "still-serving\n");
}
