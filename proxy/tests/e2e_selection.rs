//! End to end: how a user chooses their environment, in the order of precedence — a
//! port pinned to an environment, the `user+env` suffix, `SetEnv=ENVGATE_ENV`, the saved
//! default, the interactive menu on a terminal, the catalogue's default without one — and
//! that no path places a user in an environment their groups do not allow.
//! Real etcd, control plane, proxies, HAProxy (one frontend per pinned port), Docker and
//! OpenSSH (in tmux for the terminal); see `support/mod.rs`.

mod support;

use std::time::Duration;

use support::{
    BUSYBOX_IMAGE, Fleet, FleetOptions, SshOutput, Tmux, WHICH, environment, eventually, landed_in,
    proxy_bin, run,
};

const MENU_TITLE: &str = "envgate: choose an environment";
const SCREEN_TIMEOUT: Duration = Duration::from_secs(60);

/// The environments of `user`'s containers, sorted.
fn container_environments(fleet: &Fleet, user: &str) -> Vec<String> {
    let mut environments: Vec<String> = fleet
        .containers(Some(user))
        .into_iter()
        .map(|c| c.environment)
        .collect();
    environments.sort();
    environments
}

fn one_fleet() -> FleetOptions {
    FleetOptions {
        proxies: 1,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pinned_port_wins_over_the_login_but_self_service_stays_reachable() {
    let fleet = Fleet::start_with(FleetOptions {
        pinned: vec!["debian".into()],
        ..Default::default()
    })
    .await;
    let pinned = fleet.pinned_port("debian");

    let out = fleet.ssh_on_port(pinned, "demo", &[], WHICH).await;
    assert_eq!(landed_in(&out), "debian", "demo's default is busybox");
    // The pin wins over the suffix and over ENVGATE_ENV (the port is the administrator's
    // "one endpoint per environment").
    let out = fleet.ssh_on_port(pinned, "demo+busybox", &[], WHICH).await;
    assert_eq!(landed_in(&out), "debian");
    let out = fleet
        .ssh_on_port(pinned, "demo", &["SetEnv=ENVGATE_ENV=busybox"], WHICH)
        .await;
    assert_eq!(landed_in(&out), "debian");
    assert_eq!(container_environments(&fleet, "demo"), ["debian"]);

    // The self-service pseudo-environment answers on the pinned port too, without a container.
    let out = fleet.ssh_on_port(pinned, "demo+envgate", &[], "envs").await;
    out.assert_success();
    assert!(out.stdout.starts_with("NAME\t"), "{out:#?}");
    let debian = out
        .stdout
        .lines()
        .find(|l| l.starts_with("debian\t"))
        .unwrap_or_else(|| panic!("debian not listed: {out:#?}"));
    assert_eq!(
        debian.split('\t').nth(2),
        Some("yes"),
        "running: {debian:?}"
    );
    assert_eq!(container_environments(&fleet, "demo"), ["debian"]);

    // The main port is not pinned.
    let out = fleet.ssh("demo", WHICH, None).await;
    assert_eq!(landed_in(&out), "busybox");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_pinned_listener_stops_the_proxy_at_start_with_the_reason() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let host_key = dir.path().join("host_ed25519");
    let keygen = std::process::Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(&host_key)
        .status()
        .expect("ssh-keygen");
    assert!(keygen.success());
    let pki = envgate_controlplane::testkit::TestPki::new().unwrap();
    let (cert, key) = pki.proxy_files("p0");
    let proxy = |pinned: &[&str], env: &[(&str, &str)]| {
        let mut argv = vec![
            proxy_bin().display().to_string(),
            "--host-key".to_string(),
            host_key.display().to_string(),
            "--tls-cert".to_string(),
            cert.display().to_string(),
            "--tls-key".to_string(),
            key.display().to_string(),
            "--tls-ca".to_string(),
            pki.ca_path().display().to_string(),
            "--listen".to_string(),
            "127.0.0.1:0".to_string(),
            "--ops-listen".to_string(),
            "127.0.0.1:0".to_string(),
        ];
        for p in pinned {
            argv.extend(["--pinned-listen".to_string(), p.to_string()]);
        }
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .chain([("RUST_BACKTRACE".to_string(), "0".to_string())])
            .collect();
        async move {
            let env: Vec<(&str, &str)> =
                env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            run(&argv, None, &env).await
        }
    };
    for (pinned, code, says) in [
        ("127.0.0.1:2223", 2, "a pinned listener is ADDR=ENVIRONMENT"),
        (
            "127.0.0.1:2223=Debian",
            2,
            "the environment name may contain only",
        ),
        ("no-port=debian", 2, "is not an address with a port"),
        (
            "127.0.0.1:2223=envgate",
            2,
            "self-service pseudo-environment",
        ),
    ] {
        let out = proxy(&[pinned], &[]).await;
        assert_eq!(out.code, Some(code), "{pinned}: {out:#?}");
        assert!(out.stderr.contains(says), "{pinned}: {out:#?}");
    }
    let out = proxy(
        &[],
        &[("ENVGATE_PINNED_LISTEN", "127.0.0.1:2223=debian,oops")],
    )
    .await;
    assert_eq!(out.code, Some(2), "{out:#?}");
    assert!(out.stderr.contains("\"oops\""), "{out:#?}");
    let twice = ["127.0.0.1:2299=debian", "127.0.0.1:2299=busybox"];
    let out = proxy(&twice, &[]).await;
    assert_eq!(out.code, Some(1), "{out:#?}");
    assert!(
        out.stderr.contains(
            "--pinned-listen 127.0.0.1:2299=busybox: 127.0.0.1:2299 is already a listen address"
        ),
        "{out:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_suffix_beats_setenv_which_beats_the_saved_default_then_the_catalogue_default() {
    let fleet = Fleet::start_with(one_fleet()).await;
    let demo = fleet.key_of("demo");
    let out = fleet
        .ssh_with_options(
            "demo+debian",
            &demo,
            &["SetEnv=ENVGATE_ENV=busybox"],
            WHICH,
            None,
        )
        .await;
    assert_eq!(landed_in(&out), "debian", "the suffix beats SetEnv");
    let out = fleet
        .ssh_with_options("demo", &demo, &["SetEnv=ENVGATE_ENV=debian"], WHICH, None)
        .await;
    assert_eq!(landed_in(&out), "debian", "SetEnv beats demo's default");

    fleet.add_user("debfan", "debian", None).await;
    let out = fleet.ssh("debfan", WHICH, None).await;
    assert_eq!(landed_in(&out), "debian", "the saved default");

    // No terminal and no default: no menu can be shown, the catalogue's default is used.
    fleet.add_user("nodefault", "", None).await;
    let out = fleet.ssh("nodefault", WHICH, None).await;
    assert_eq!(landed_in(&out), "busybox");
    assert_eq!(container_environments(&fleet, "nodefault"), ["busybox"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn groups_decide_who_may_use_an_environment_whatever_chose_it() {
    let fleet = Fleet::start_with(FleetOptions {
        pinned: vec!["staff-only".into()],
        ..one_fleet()
    })
    .await;
    let mut staff_only = environment("staff-only", BUSYBOX_IMAGE, "/bin/sh", false);
    staff_only.allowed_groups = vec!["staff".into()];
    fleet.put_environment(staff_only).await;
    let pinned = fleet.pinned_port("staff-only");

    let refused = |out: &SshOutput| {
        assert_eq!(out.code, Some(1), "{out:#?}");
        assert_eq!(out.stdout, "");
        assert_eq!(
            out.stderr_lines(),
            ["envgate: environment \"staff-only\" is not available to you"],
            "{out:#?}"
        );
    };
    refused(&fleet.ssh("demo+staff-only", "true", None).await);
    refused(
        &fleet
            .ssh_with_options(
                "demo",
                &fleet.key_of("demo"),
                &["SetEnv=ENVGATE_ENV=staff-only"],
                "true",
                None,
            )
            .await,
    );
    refused(&fleet.ssh_on_port(pinned, "demo", &[], "true").await);
    assert!(
        fleet.containers(Some("demo")).is_empty(),
        "no container for a refused user"
    );

    fleet.add_user_in_groups("boss", "", &["staff"]).await;
    let out = fleet
        .ssh("boss+staff-only", "echo in-staff-only", None)
        .await;
    out.assert_success();
    assert_eq!(out.stdout, "in-staff-only\n");
    let out = fleet.ssh_on_port(pinned, "boss", &[], "echo pinned").await;
    out.assert_success();
    assert_eq!(out.stdout, "pinned\n");
    assert_eq!(container_environments(&fleet, "boss"), ["staff-only"]);
}

/// Single quotes for `sh -c`.
fn quote(arg: &str) -> String {
    format!("'{}'", arg.replace('\'', "'\\''"))
}

/// `ssh -tt user@fleet` in a terminal of its own; when ssh ends, the pane shows
/// `ssh-exit=<status>` and stays open to be read.
fn terminal(fleet: &Fleet, user: &str) -> Tmux {
    let ssh: Vec<String> = fleet
        .ssh_terminal_argv(user)
        .iter()
        .map(|a| quote(a))
        .collect();
    let script = format!("{}; echo ssh-exit=$?; sleep 600", ssh.join(" "));
    Tmux::start(
        fleet.dir(),
        &["sh".to_string(), "-c".to_string(), script],
        100,
        30,
    )
}

/// The screen once `ready` holds for it.
async fn screen_when(tmux: &Tmux, what: &str, ready: impl Fn(&str) -> bool) -> String {
    eventually(SCREEN_TIMEOUT, what, || async {
        let screen = tmux.screen();
        if ready(&screen) {
            Ok(screen)
        } else {
            Err(screen)
        }
    })
    .await
}

async fn menu_shown(tmux: &Tmux) -> String {
    screen_when(tmux, "the menu is shown", |s| {
        s.contains(MENU_TITLE) && s.contains("Enter to start")
    })
    .await
}

/// Waits for the menu to be gone, then asks the shell which image it runs in.
async fn shell_image(tmux: &Tmux) -> String {
    screen_when(tmux, "the menu is erased", |s| !s.contains(MENU_TITLE)).await;
    tmux.type_line(&format!("{WHICH}; echo mark-$((40+2))"));
    let screen = screen_when(tmux, "the shell answers", |s| {
        s.lines().any(|l| l.trim() == "mark-42")
    })
    .await;
    let id = screen
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with("ID="))
        .unwrap_or_else(|| panic!("no ID= line: {screen}"));
    tmux.type_line("exit");
    screen_when(tmux, "ssh ends", |s| s.contains("ssh-exit=0")).await;
    id.to_string()
}

fn line_with<'a>(screen: &'a str, text: &str) -> &'a str {
    screen
        .lines()
        .find(|l| l.contains(text))
        .unwrap_or_else(|| panic!("no line with {text:?}: {screen}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_terminal_the_menu_chooses_unless_a_default_is_saved() {
    let fleet = Fleet::start_with(one_fleet()).await;
    let mut staff_only = environment("staff-only", BUSYBOX_IMAGE, "/bin/sh", false);
    staff_only.allowed_groups = vec!["staff".into()];
    fleet.put_environment(staff_only).await;

    // A saved default: straight into it, no menu.
    fleet.add_user("debfan", "debian", None).await;
    let tmux = terminal(&fleet, "debfan");
    tmux.type_line(&format!("{WHICH}; echo mark-$((40+2))"));
    let screen = screen_when(&tmux, "the shell answers", |s| {
        s.lines().any(|l| l.trim() == "mark-42")
    })
    .await;
    assert!(screen.lines().any(|l| l.trim() == "ID=debian"), "{screen}");
    assert!(!screen.contains(MENU_TITLE), "no menu expected: {screen}");
    drop(tmux);

    // No default: the menu lists what the user's groups allow, the default marked.
    fleet.add_user("chooser", "", None).await;
    let tmux = terminal(&fleet, "chooser");
    let screen = menu_shown(&tmux).await;
    assert!(
        line_with(&screen, "1. busybox").contains("(default)"),
        "{screen}"
    );
    assert!(
        !line_with(&screen, "2. debian").contains("(running)"),
        "{screen}"
    );
    assert!(!screen.contains("staff-only"), "not the user's: {screen}");
    assert!(screen.contains("↑/↓ or number, Enter to start, q to quit"));
    tmux.key("Down");
    tmux.key("Enter");
    assert_eq!(shell_image(&tmux).await, "ID=debian");
    drop(tmux);

    // A number, then Enter; the Debian container from before is marked running.
    let tmux = terminal(&fleet, "chooser");
    let screen = menu_shown(&tmux).await;
    assert!(
        line_with(&screen, "2. debian").contains("(running)"),
        "{screen}"
    );
    tmux.key("2");
    tmux.key("Enter");
    assert_eq!(shell_image(&tmux).await, "ID=debian");
    drop(tmux);

    let tmux = terminal(&fleet, "chooser");
    menu_shown(&tmux).await;
    tmux.key("1");
    tmux.key("Enter");
    assert_eq!(shell_image(&tmux).await, "ID=none");
    drop(tmux);
    assert_eq!(
        container_environments(&fleet, "chooser"),
        ["busybox", "debian"]
    );

    // Giving up: one line, exit status 130 after Ctrl-C and 1 after q, no container.
    for (user, key, status) in [("interrupter", "C-c", 130), ("quitter", "q", 1)] {
        fleet.add_user(user, "", None).await;
        let tmux = terminal(&fleet, user);
        menu_shown(&tmux).await;
        tmux.key(key);
        let screen = screen_when(&tmux, "ssh ends", |s| s.contains("ssh-exit=")).await;
        assert!(
            screen.contains(&format!("ssh-exit={status}")),
            "{key}: {screen}"
        );
        assert_eq!(
            screen
                .lines()
                .filter(|l| l.contains("envgate: no environment chosen"))
                .count(),
            1,
            "{key}: {screen}"
        );
        assert!(!screen.contains(MENU_TITLE), "menu erased: {screen}");
        assert!(fleet.containers(Some(user)).is_empty(), "{user}");
    }

    // A window change repaints the menu at the new width (the hint cut to 29 columns).
    let tmux = terminal(&fleet, "chooser");
    menu_shown(&tmux).await;
    tmux.resize(30, 20);
    screen_when(&tmux, "the menu is repainted 30 columns wide", |s| {
        s.lines()
            .any(|l| l.trim_end() == "↑/↓ or number, Enter to start")
    })
    .await;
    tmux.key("q");
    screen_when(&tmux, "ssh ends", |s| s.contains("ssh-exit=1")).await;
}
