//! End to end: the fast data path. Containers run `envgate-agent` as their init and sessions
//! start through it (issue 6); without an agent the proxy falls back to Docker exec. Real
//! etcd, control plane, proxies, HAProxy, Docker and OpenSSH; see `support/mod.rs`. The rest
//! of the e2e suite runs on the agent path too (it is the harness default).

mod support;

use std::time::Duration;

use envgate_agent::{AgentClient, AgentError, client::AgentAddress};
use support::{
    AcceptAnyHostKey, BUSYBOX_IMAGE, Fleet, FleetOptions, Tmux, environment, eventually,
};

/// The agent's address and secret from `user`'s placement record in etcd.
async fn agent_of(fleet: &Fleet, user: &str) -> (String, String) {
    let records = fleet
        .etcd_records(&format!("containers/{user}/"))
        .await
        .expect("etcd records");
    let (_, json) = records.first().expect("a placement record");
    let record: serde_json::Value = serde_json::from_str(json).expect("record json");
    let field = |name: &str| record[name].as_str().unwrap_or_default().to_string();
    (field("agent_address"), field("agent_secret"))
}

/// `exec_start` samples per `path` label in one proxy's metrics.
async fn exec_start_count(ops: &str, path: &str) -> u64 {
    let body = Fleet::metrics(ops).await.expect("proxy /metrics");
    body.lines()
        .filter(|l| l.contains("_count{") && l.contains("phase=\"exec_start\""))
        .filter(|l| l.contains(&format!("path=\"{path}\"")))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// Waits (bounded) until the terminal shows `text`. The tests type `$((…))` so that the
/// text appears only in the output, never in the echo of the typed line.
async fn screen_shows(tmux: &Tmux, text: &str) {
    eventually(Duration::from_secs(30), text, || async {
        let screen = tmux.screen();
        if screen.contains(text) {
            Ok(())
        } else {
            Err(screen)
        }
    })
    .await;
}

fn one_proxy() -> FleetOptions {
    FleetOptions {
        proxies: 1,
        ..FleetOptions::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_start_through_the_agent_with_the_users_home() {
    let fleet = Fleet::start_with(one_proxy()).await;
    let out = fleet
        .ssh(
            "demo",
            "echo $HOME $USER; pwd; tr '\\0' ' ' < /proc/1/cmdline",
            None,
        )
        .await;
    out.assert_success();
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(lines[0], "/home/demo demo", "{out:#?}");
    assert_eq!(lines[1], "/home/demo", "{out:#?}");
    assert!(
        lines[2].starts_with("/.envgate/agent --socket /run/envgate/agent.sock"),
        "PID 1 is not the agent: {out:#?}"
    );
    assert_eq!(exec_start_count(&fleet.proxy_ops[0], "agent").await, 1);
    assert_eq!(
        exec_start_count(&fleet.proxy_ops[0], "runtime_exec").await,
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_megabytes_round_trip_byte_for_byte() {
    Fleet::start()
        .await
        .assert_cat_round_trip(20 * 1024 * 1024)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctrl_c_interrupts_a_remote_sleep() {
    let fleet = Fleet::start().await;
    let argv = fleet.ssh_terminal_argv("demo");
    let tmux = Tmux::start(fleet.dir(), &argv, 100, 30);
    tmux.type_line("echo ready-$((6*7))");
    screen_shows(&tmux, "ready-42").await;
    tmux.type_line("sleep 1000; echo after-sleep-$?");
    // Let the shell start the sleep before the interrupt.
    tokio::time::sleep(Duration::from_millis(500)).await;
    tmux.key("C-c");
    // Typed after the interrupt: it only runs if the sleep is gone and the shell lives on.
    tmux.type_line("echo still-$((40+2))");
    screen_shows(&tmux, "still-42").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signal_killed_process_reports_the_signal() {
    let fleet = Fleet::start().await;
    // sshd reports `exit-signal`; OpenSSH's client then has no exit status and exits 255.
    let out = fleet.ssh("demo", "echo before; kill -KILL $$", None).await;
    assert_eq!(out.stdout, "before\n", "{out:#?}");
    assert_eq!(out.code, Some(255), "{out:#?}");
    // The shell that runs the command sees the signal as 128 + 9.
    let out = fleet
        .ssh("demo", "sh -c 'kill -TERM $$'; echo status-$?", None)
        .await;
    out.assert_success();
    assert_eq!(out.stdout, "status-143\n", "{out:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ssh_signal_request_reaches_the_process() {
    // OpenSSH's client cannot send `signal` requests; russh's can.
    let fleet = Fleet::start().await;
    let key = russh::keys::load_secret_key(fleet.key_of("demo"), None).expect("demo's key");
    let key = russh::keys::PrivateKeyWithHashAlg::new(std::sync::Arc::new(key), None);
    let config = std::sync::Arc::new(russh::client::Config::default());
    let run = async {
        let mut session =
            russh::client::connect(config, ("127.0.0.1", fleet.ssh_port), AcceptAnyHostKey)
                .await
                .expect("connect");
        let auth = session
            .authenticate_publickey("demo", key)
            .await
            .expect("authenticate");
        assert!(auth.success());
        let mut channel = session.channel_open_session().await.expect("session");
        channel
            .exec(true, "echo ready; exec sleep 1000")
            .await
            .expect("exec");
        let mut seen = Vec::new();
        let mut signalled = false;
        while let Some(message) = channel.wait().await {
            match message {
                russh::ChannelMsg::Data { data } => {
                    seen.extend_from_slice(&data);
                    if !signalled && seen.ends_with(b"ready\n") {
                        signalled = true;
                        channel.signal(russh::Sig::USR1).await.expect("signal");
                    }
                }
                russh::ChannelMsg::ExitSignal { signal_name, .. } => return Some(signal_name),
                russh::ChannelMsg::ExitStatus { exit_status } => {
                    panic!("exit status {exit_status} instead of a signal")
                }
                _ => {}
            }
        }
        None
    };
    let signal = tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .expect("the session ended within a minute");
    assert!(
        matches!(signal, Some(russh::Sig::USR1)),
        "the process did not die of the USR1 sent to it: {signal:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abandoned_children_leave_no_zombies() {
    let fleet = Fleet::start().await;
    // The shell starts children and exits at once; they are re-parented to PID 1 (the agent).
    let out = fleet
        .ssh(
            "demo",
            "sh -c 'sleep 1 & sleep 1 & sleep 1 & exit 0'; echo spawned",
            None,
        )
        .await;
    out.assert_success();
    eventually(
        Duration::from_secs(30),
        "no <defunct> process is left",
        || async {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let out = fleet
                .ssh(
                    "demo",
                    "grep -l '^State:.*Z' /proc/[0-9]*/status 2>/dev/null | wc -l; cat /proc/[0-9]*/comm",
                    None,
                )
                .await;
            // The sleeps are gone (a zombie keeps its comm) and nothing is defunct.
            let zombies = out.stdout.lines().next().map(str::trim);
            if zombies == Some("0") && !out.stdout.lines().any(|l| l == "sleep") {
                Ok(())
            } else {
                Err(format!("{out:#?}"))
            }
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_or_missing_secret_is_refused() {
    let fleet = Fleet::start().await;
    fleet.ssh("demo", "true", None).await.assert_success();
    let (address, secret) = agent_of(&fleet, "demo").await;
    assert_eq!(secret.len(), 64, "a 32-byte hex secret");
    let address: AgentAddress = address.parse().expect("agent address");

    let right = AgentClient::connect(&address, secret.as_bytes()).await;
    assert!(right.is_ok(), "the right secret is accepted");

    let wrong = AgentClient::connect(&address, b"0123456789abcdef0123456789abcdef").await;
    assert!(
        matches!(wrong, Err(AgentError::Refused(_))),
        "a wrong secret: {:?}",
        wrong.err()
    );

    // A peer without the secret cannot get past the hello: whatever it sends, the agent
    // closes the connection.
    let AgentAddress::Unix(path) = &address else {
        panic!("Docker agents listen on a Unix socket: {address}");
    };
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut raw = tokio::net::UnixStream::connect(path)
        .await
        .expect("connect");
    raw.write_all(&[0, 0, 0, 5, 0x05, 0, 0, 0, 0])
        .await
        .expect("send a ping without authenticating");
    let mut all = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(15), raw.read_to_end(&mut all)).await;
    assert!(read.is_ok(), "the agent kept an unauthenticated peer");
    assert!(
        !all.windows(4).any(|w| w == [0, 0, 0, 0x06]),
        "the agent answered a ping before authentication"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_users_container_cannot_reach_this_agent() {
    let fleet = Fleet::start().await;
    let bob = fleet.add_user("bob", "busybox", None).await;
    fleet.ssh("demo", "true", None).await.assert_success();
    let (demo_socket, demo_secret) = agent_of(&fleet, "demo").await;

    // Inside bob's container: bob (not root there) cannot even open his own agent's
    // directory, and the host directory of demo's agent does not exist.
    let probe = format!(
        "ls -a /run/envgate; test -e {demo_socket} && echo demo-visible; \
         find / -xdev -type s 2>/dev/null; echo probe-done"
    );
    let out = fleet.ssh_with_key("bob", &bob, &probe, None).await;
    out.assert_success();
    assert_eq!(out.stdout, "probe-done\n", "{out:#?}");
    assert_eq!(
        out.stderr,
        "ls: can't open '/run/envgate': Permission denied\n"
    );

    // And bob's agent refuses demo's secret, so nobody can be redirected across.
    let (bob_socket, _) = agent_of(&fleet, "bob").await;
    assert_ne!(bob_socket, demo_socket);
    let crossed = AgentClient::connect(
        &bob_socket.parse().expect("address"),
        demo_secret.as_bytes(),
    )
    .await;
    assert!(
        matches!(crossed, Err(AgentError::Refused(_))),
        "{:?}",
        crossed.err()
    );

    // Root in an environment that opts into it sees only its own container's socket.
    let mut rootlab = environment("rootlab", BUSYBOX_IMAGE, "/bin/sh", false);
    rootlab.run_as = "root".into();
    fleet.put_environment(rootlab).await;
    let out = fleet.ssh_with_key("bob+rootlab", &bob, &probe, None).await;
    out.assert_success();
    assert_eq!(out.stdout, ".\n..\nagent.sock\nprobe-done\n", "{out:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_agent_is_a_clear_error_for_its_user_only_and_the_container_is_replaced() {
    let fleet = Fleet::start().await;
    let bob = fleet.add_user("bob", "busybox", None).await;
    fleet
        .ssh("demo", "echo kept > /home/demo/file", None)
        .await
        .assert_success();
    let before = fleet.containers(Some("demo"));
    assert_eq!(before.len(), 1, "{before:?}");

    let demo_session = fleet.ssh("demo", "echo started; sleep 1000", None);
    let bob_session = fleet.ssh_with_key("bob", &bob, "sleep 4; echo bob-ok", None);
    let killer = async {
        // Both sessions are running; kill demo's agent from the host.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let pid = std::process::Command::new("docker")
            .args(["inspect", "-f", "{{.State.Pid}}", &before[0].id])
            .output()
            .expect("docker inspect");
        let pid = String::from_utf8_lossy(&pid.stdout).trim().to_string();
        let status = std::process::Command::new("kill")
            .args(["-KILL", &pid])
            .status()
            .expect("kill");
        assert!(status.success(), "kill -KILL {pid}");
    };
    let (demo, bob, ()) = tokio::join!(demo_session, bob_session, killer);
    assert_eq!(demo.stdout, "started\n", "{demo:#?}");
    assert!(
        demo.stderr.contains(
            "envgate: your environment is not answering; connect again to get a fresh one (your home directory is kept) (request id "
        ),
        "{demo:#?}"
    );
    assert_eq!(demo.code, Some(255), "{demo:#?}");
    bob.assert_success();
    assert_eq!(bob.stdout, "bob-ok\n");

    let after = fleet.ssh("demo", "cat /home/demo/file", None).await;
    after.assert_success();
    assert_eq!(after.stdout, "kept\n");
    let running: Vec<_> = fleet
        .containers(Some("demo"))
        .into_iter()
        .filter(|c| c.state == "running")
        .collect();
    assert_eq!(running.len(), 1, "{running:?}");
    assert_ne!(
        running[0].id, before[0].id,
        "the container was not replaced"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_agent_sessions_use_docker_exec() {
    let fleet = Fleet::start_with(FleetOptions {
        agent: false,
        ..one_proxy()
    })
    .await;
    let out = fleet
        .ssh("demo", "echo $HOME; id -u; echo err >&2; exit 3", Some(b""))
        .await;
    assert_eq!(out.code, Some(3), "{out:#?}");
    // Not root there either: the user's own uid (the first this fleet gave out), bare.
    assert_eq!(out.stdout, "/home/demo\n200000\n");
    assert_eq!(out.stderr, "err\n");
    let (address, secret) = agent_of(&fleet, "demo").await;
    assert_eq!((address.as_str(), secret.as_str()), ("", ""));
    assert_eq!(
        exec_start_count(&fleet.proxy_ops[0], "runtime_exec").await,
        1
    );
    assert_eq!(exec_start_count(&fleet.proxy_ops[0], "agent").await, 0);
}
