//! End to end: choosing an environment with `user+env`, the user's default, unknown names.

mod support;

use support::Fleet;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plus_debian_runs_debian() {
    let fleet = Fleet::start().await;
    let out = fleet.ssh("demo+debian", "cat /etc/os-release", None).await;
    out.assert_success();
    assert!(
        out.stdout.contains("ID=debian") && out.stdout.contains("bookworm"),
        "not Debian bookworm: {}",
        out.stdout
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plus_busybox_runs_busybox() {
    let fleet = Fleet::start().await;
    let out = fleet
        .ssh(
            "demo+busybox",
            "readlink /bin/sh; test ! -e /etc/os-release && echo no-os-release",
            None,
        )
        .await;
    out.assert_success();
    assert_eq!(out.stdout, "/bin/busybox\nno-os-release\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_suffix_uses_the_users_default_environment() {
    let fleet = Fleet::start().await;
    // demo's default is busybox; a user whose default is debian lands in Debian.
    fleet.add_user("debby", "debian", None).await;
    let demo = fleet.ssh("demo", "readlink /bin/sh", None).await;
    demo.assert_success();
    assert_eq!(demo.stdout, "/bin/busybox\n");
    let debby = fleet
        .ssh("debby", "grep -c bookworm /etc/os-release", None)
        .await;
    debby.assert_success();
    assert_ne!(debby.stdout.trim(), "0");
    let containers = fleet.containers(Some("debby"));
    assert_eq!(containers.len(), 1, "{containers:?}");
    assert_eq!(containers[0].environment, "debian");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn setenv_envgate_env_chooses_the_environment() {
    let fleet = Fleet::start().await;
    let out = fleet
        .ssh_with_options(
            "demo",
            &fleet.key_of("demo"),
            &["SetEnv=ENVGATE_ENV=debian"],
            "grep -c bookworm /etc/os-release",
            None,
        )
        .await;
    out.assert_success();
    assert_ne!(out.stdout.trim(), "0");
    let containers = fleet.containers(Some("demo"));
    assert_eq!(containers.len(), 1, "{containers:?}");
    assert_eq!(containers[0].environment, "debian");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_environment_gets_one_line_listing_the_environments() {
    let fleet = Fleet::start().await;
    let out = fleet.ssh("demo+nope", "true", None).await;
    assert_eq!(out.code, Some(1), "{out:#?}");
    assert_eq!(
        out.stderr_lines(),
        ["envgate: unknown environment \"nope\"; available: busybox, debian"],
        "{out:#?}"
    );
    assert!(fleet.containers(Some("demo")).is_empty());
}

/// An environment from the control plane's `--environments` file, not the admin API.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_environment_from_the_catalogue_file_is_reachable_with_its_variables() {
    let fleet = Fleet::start_with(support::FleetOptions {
        environments_yaml: Some(
            "environments:\n  \
             - name: tiny\n    \
               description: a file-defined BusyBox\n    \
               image: envgate/busybox:latest\n    \
               env: { GREETING: hi }\n"
                .to_owned(),
        ),
        ..Default::default()
    })
    .await;
    let out = fleet.ssh("demo+tiny", "echo \"$GREETING\"", None).await;
    out.assert_success();
    assert_eq!(out.stdout, "hi\n");
    let containers = fleet.containers(Some("demo"));
    assert_eq!(containers.len(), 1, "{containers:?}");
    assert_eq!(containers[0].environment, "tiny");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_environment_takes_the_client_variables_it_accepts() {
    let fleet = Fleet::start().await;
    let mut project = support::environment("project", support::BUSYBOX_IMAGE, "/bin/sh", false);
    project.accept_env = vec!["PROJECT_*".into(), "LANG".into()];
    fleet.put_environment(project).await;
    let sent = ["SetEnv=PROJECT_ID=42 LANG=C.UTF-8 LC_ALL=C SECRET_TOKEN=x"];
    let show = r#"echo "${PROJECT_ID-unset} ${LANG-unset} ${LC_ALL-unset} ${SECRET_TOKEN-unset}""#;
    let key = fleet.key_of("demo");

    // The environment's own list: the project's variables and LANG, nothing else.
    let out = fleet
        .ssh_with_options("demo+project", &key, &sent, show, None)
        .await;
    out.assert_success();
    assert_eq!(out.stdout, "42 C.UTF-8 unset unset\n");

    // An environment that names none takes sshd's usual list (LANG, LC_*, TERM, TZ, COLORTERM).
    let out = fleet
        .ssh_with_options("demo", &key, &sent, show, None)
        .await;
    out.assert_success();
    assert_eq!(out.stdout, "unset C.UTF-8 C unset\n");

    // A pattern that is not one is refused by the admin API.
    let mut bad = support::environment("badenv", support::BUSYBOX_IMAGE, "/bin/sh", false);
    bad.accept_env = vec!["LD_*;rm".into()];
    let err = fleet.try_put_environment(bad).await.unwrap_err();
    assert!(err.contains("environment.accept_env[0]"), "{err}");
}
