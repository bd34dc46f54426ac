//! End to end: what a user sees in a session — output, exit status, stdin, stderr, terminal.
//! Real etcd, control plane, proxies, HAProxy, Docker and OpenSSH; see `support/mod.rs`.

mod support;

use std::time::Duration;

use support::{Fleet, Tmux, eventually};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn date_prints_a_date_and_exits_zero() {
    let fleet = Fleet::start().await;
    let out = fleet.ssh("demo", "date -u +%Y-%m-%dT%H:%M:%S", None).await;
    out.assert_success();
    let printed = out.stdout.trim();
    assert_eq!(printed.len(), 19, "not a date: {printed:?}");
    let year: u32 = printed[..4].parse().expect("year");
    assert!((2024..3000).contains(&year), "odd year in {printed:?}");
    assert_eq!(&printed[4..5], "-");
    assert_eq!(&printed[10..11], "T");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_status_of_the_command_is_the_exit_status_of_ssh() {
    let fleet = Fleet::start().await;
    let out = fleet.ssh("demo", "exit 7", None).await;
    assert_eq!(out.code, Some(7), "{out:#?}");
    assert_eq!(out.stdout, "");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stdin_reaches_the_command_and_eof_ends_it() {
    let fleet = Fleet::start().await;
    let out = fleet.ssh("demo", "cat", Some(b"hi\n")).await;
    out.assert_success();
    assert_eq!(out.stdout, "hi\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_megabytes_round_trip_byte_for_byte() {
    Fleet::start()
        .await
        .assert_cat_round_trip(8 * 1024 * 1024)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stderr_stays_apart_from_stdout() {
    let fleet = Fleet::start().await;
    let out = fleet
        .ssh("demo", "echo to-out; echo to-err >&2; echo more-out", None)
        .await;
    out.assert_success();
    assert_eq!(out.stdout, "to-out\nmore-out\n");
    assert_eq!(out.stderr, "to-err\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminal_session_sees_its_size_and_resizes() {
    let fleet = Fleet::start().await;
    let argv = fleet.ssh_terminal_argv("demo");
    let tmux = Tmux::start(fleet.dir(), &argv, 100, 30);

    // `stty size` prints "rows columns" of the terminal the remote shell is attached to; the
    // marker is computed by the shell, so it appears only once the output is all on screen.
    tmux.type_line("stty size; tty; echo mark-$((40+2))");
    let screen = screen_after_marker(&tmux, "mark-42").await;
    assert!(screen.lines().any(|l| l.trim() == "30 100"), "{screen}");
    assert!(
        screen.lines().any(|l| l.trim().starts_with("/dev/pts/")),
        "the shell has no terminal: {screen}"
    );

    // The proxy applies a window change before the keys typed after it (as sshd), so the
    // first `stty size` after the resize already answers with the new size.
    tmux.resize(90, 25);
    tmux.type_line("stty size; echo mark-$((50+2))");
    let screen = screen_after_marker(&tmux, "mark-52").await;
    let answer = screen
        .lines()
        .map(str::trim)
        .take_while(|l| *l != "mark-52")
        .filter(|l| !l.is_empty())
        .last()
        .unwrap_or_default();
    assert_eq!(answer, "25 90", "{screen}");
}

/// The screen once a line reads exactly `marker`.
async fn screen_after_marker(tmux: &Tmux, marker: &str) -> String {
    eventually(
        Duration::from_secs(30),
        &format!("the shell prints {marker}"),
        || async {
            let screen = tmux.screen();
            if screen.lines().any(|l| l.trim() == marker) {
                Ok(screen)
            } else {
                Err(screen)
            }
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_clients_terminal_modes_reach_the_remote_terminal() {
    let fleet = Fleet::start().await;
    // The user's own terminal erases with ^H and interrupts with ^G (not the defaults, ^? and
    // ^C); ssh sends those modes with its pty request.
    let ssh: Vec<String> = fleet
        .ssh_terminal_argv("demo+debian")
        .iter()
        .map(|a| format!("'{a}'"))
        .collect();
    let argv = vec![
        "sh".to_string(),
        "-c".to_string(),
        format!("stty erase '^H' intr '^G'; exec {}", ssh.join(" ")),
    ];
    let tmux = Tmux::start(fleet.dir(), &argv, 120, 30);
    tmux.type_line(
        "stty -a | tr ';' '\\n' | grep -E '^ ?(erase|intr) =' | tr -d ' '; echo mark-$((60+2))",
    );
    let screen = screen_after_marker(&tmux, "mark-62").await;
    assert!(screen.lines().any(|l| l.trim() == "intr=^G"), "{screen}");
    assert!(screen.lines().any(|l| l.trim() == "erase=^H"), "{screen}");
}
