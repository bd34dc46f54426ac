//! End to end: a ContainerSSH-style auth webhook and config webhook (a real HTTPS server
//! started by the test, `testkit::WebhookServer`) decide logins made with OpenSSH through
//! HAProxy: a password, a public key, the environment of a login that names none, and a
//! webhook that went away while local users keep logging in.

mod support;

use envgate_controlplane::testkit::WebhookServer;
use support::{Fleet, FleetOptions};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_webhook_decides_passwords_and_keys_and_chooses_the_environment() {
    let hook = WebhookServer::start()
        .await
        .expect("the webhook server starts");
    let fleet = Fleet::start_with(FleetOptions {
        proxies: 1,
        env: vec![
            ("ENVGATE_AUTH_WEBHOOK_URL".into(), hook.auth_url()),
            (
                "ENVGATE_AUTH_WEBHOOK_CA_FILE".into(),
                hook.ca_path().display().to_string(),
            ),
            ("ENVGATE_CONFIG_WEBHOOK_URL".into(), hook.config_url()),
        ],
        ..FleetOptions::default()
    })
    .await;
    hook.accept_password("dora", "hook-pw", &["students"]);
    hook.accept_password("lee", "lee-pw", &[]);
    hook.choose_environment("dora", "debian");
    let key = fleet.stranger_key();
    let line = std::fs::read_to_string(format!("{}.pub", key.display())).unwrap();
    hook.accept_key("kai", &line, &[]);

    // A password the webhook accepts; the config webhook chose debian for her.
    let out = fleet
        .ssh_password(
            "dora",
            "hook-pw",
            "id -un; cat /etc/debian_version >/dev/null && echo debian",
        )
        .await;
    out.assert_success();
    assert_eq!(out.stdout, "dora\ndebian\n");
    let (path, request) = hook.requests()[0].clone();
    assert_eq!(path, "/auth/password");
    assert_eq!(request["username"], "dora");
    assert!(
        request["remoteAddress"]
            .as_str()
            .is_some_and(|a| a.starts_with("127.0.0.1:")),
        "{request}"
    );
    // Naming an environment wins over the webhook.
    let out = fleet
        .ssh_password(
            "dora+busybox",
            "hook-pw",
            "test -e /etc/debian_version || echo busybox",
        )
        .await;
    out.assert_success();
    assert_eq!(out.stdout, "busybox\n");

    // A wrong password: OpenSSH's refusal.
    let out = fleet.ssh_password("dora", "wrong", "echo in").await;
    assert_eq!(out.code, Some(255), "{out:#?}");
    assert!(out.stderr.contains("Permission denied"), "{out:#?}");

    // A key the webhook's /pubkey vouches for; no config answer: the catalogue's default.
    let out = fleet.ssh_with_key("kai", &key, "id -un", None).await;
    out.assert_success();
    assert_eq!(out.stdout, "kai\n");

    // The webhook goes away: lee (never logged in, so in no cache) is refused with the reason
    // in the audit log; demo (local, key) and pat (local, password) still log in.
    fleet.add_user("pat", "busybox", Some("local-pw")).await;
    drop(hook);
    let out = fleet.ssh_password("lee", "lee-pw", "echo in").await;
    assert_eq!(out.code, Some(255), "{out:#?}");
    let reason = fleet.last_refusal("lee");
    assert!(
        reason
            .starts_with("the authentication service is unavailable; try again later (request id "),
        "{reason}"
    );
    fleet.ssh("demo", "echo in", None).await.assert_success();
    fleet
        .ssh_password("pat", "local-pw", "echo in")
        .await
        .assert_success();
}
