//! The real agent binary on the host, driven through the client the proxy uses.

mod common;

use std::time::{Duration, Instant};

use common::{Agent, SECRET, run, within};
use envgate_agent::protocol::MAGIC;
use envgate_agent::{
    AgentClient, AgentError, ExitStatus, Program, PtyRequest, SpawnRequest, WindowSize,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn sh(cmd: &str) -> SpawnRequest {
    SpawnRequest::new(Program::Argv(vec![
        "/bin/sh".into(),
        "-c".into(),
        cmd.into(),
    ]))
}

fn with_pty(mut req: SpawnRequest, cols: u32, rows: u32) -> SpawnRequest {
    req.pty = Some(PtyRequest {
        term: "xterm".into(),
        size: WindowSize {
            cols,
            rows,
            pixel_width: 0,
            pixel_height: 0,
        },
        modes: Vec::new(),
    });
    req
}

#[tokio::test]
async fn exit_codes_are_reported() {
    let agent = Agent::start();
    let client = agent.client().await;
    assert_eq!(run(&client, sh("exit 0")).await.2, ExitStatus::Code(0));
    assert_eq!(run(&client, sh("exit 3")).await.2, ExitStatus::Code(3));
    assert_eq!(run(&client, sh("exit 255")).await.2, ExitStatus::Code(255));
    // Several processes at once over one connection.
    let (a, b, c) = tokio::join!(
        run(&client, sh("sleep 0.3; exit 7")),
        run(&client, sh("exit 8")),
        run(&client, sh("echo x"))
    );
    assert_eq!(
        (a.2, b.2, c.2),
        (
            ExitStatus::Code(7),
            ExitStatus::Code(8),
            ExitStatus::Code(0)
        )
    );
}

#[tokio::test]
async fn shell_command_and_login_shell_use_the_users_shell() {
    let agent = Agent::start();
    let client = agent.client().await;
    let (out, _, status) = run(
        &client,
        SpawnRequest::new(Program::ShellCommand("echo $0 $HOME $USER".into())),
    )
    .await;
    assert_eq!(status, ExitStatus::Code(0));
    let shell = std::fs::read_to_string("/etc/passwd")
        .unwrap()
        .lines()
        .find(|l| l.starts_with("root:"))
        .map(|l| {
            l.rsplit(':')
                .next()
                .unwrap()
                .rsplit('/')
                .next()
                .unwrap()
                .to_owned()
        })
        .unwrap();
    assert_eq!(out, format!("{shell} /root root\n"));

    let mut p = client
        .spawn(SpawnRequest::new(Program::LoginShell))
        .await
        .unwrap();
    p.stdin.write_all(b"echo login:$0\nexit 4\n").await.unwrap();
    let out = within(10, "login shell", p.stdout.read_to_vec()).await;
    assert_eq!(String::from_utf8(out).unwrap(), format!("login:-{shell}\n"));
    assert_eq!(p.wait().await.unwrap(), ExitStatus::Code(4));
}

#[tokio::test]
async fn stdin_eof_reaches_the_process() {
    let agent = Agent::start();
    let client = agent.client().await;
    let mut p = client.spawn(sh("cat; echo done")).await.unwrap();
    p.stdin.write_all(b"hello\nworld\n").await.unwrap();
    p.stdin.close().unwrap();
    let out = within(10, "cat to see EOF", p.stdout.read_to_vec()).await;
    assert_eq!(out, b"hello\nworld\ndone\n");
    assert_eq!(p.wait().await.unwrap(), ExitStatus::Code(0));
}

#[tokio::test]
async fn stderr_is_kept_apart_from_stdout() {
    let agent = Agent::start();
    let client = agent.client().await;
    let (out, err, status) = run(
        &client,
        sh("echo to-out; echo to-err >&2; echo more-out; exit 1"),
    )
    .await;
    assert_eq!(out, "to-out\nmore-out\n");
    assert_eq!(err, "to-err\n");
    assert_eq!(status, ExitStatus::Code(1));
}

#[tokio::test]
async fn environment_and_working_directory() {
    let agent = Agent::start();
    let client = agent.client().await;
    let mut req = sh(
        "echo $FOO; pwd; echo ${TERM:-none}; echo ${ENVGATE_AGENT_SECRET:-unset}; echo $FROM_IMAGE",
    );
    req.env = vec![("FOO".into(), "bar baz".into())];
    req.cwd = Some("/tmp".into());
    let (out, _, _) = run(&client, req).await;
    // The agent's own environment (the image's ENV in a container) reaches the session, its
    // own ENVGATE_AGENT_* settings do not.
    assert_eq!(out, "bar baz\n/tmp\nnone\nunset\nimage-value\n");

    let mut req = sh("true");
    req.cwd = Some("/does/not/exist".into());
    match client.spawn(req).await {
        Err(AgentError::SpawnFailed { message, .. }) => {
            assert!(message.contains("/does/not/exist"), "{message}")
        }
        other => panic!("expected a spawn failure, got {:?}", other.map(|p| p.pid)),
    }
    match client
        .spawn(SpawnRequest::new(Program::Argv(vec![
            "/no/such/program".into(),
        ])))
        .await
    {
        Err(AgentError::SpawnFailed { message, .. }) => {
            assert!(
                message.contains("/no/such/program") && message.contains("No such file"),
                "{message}"
            )
        }
        other => panic!("expected a spawn failure, got {:?}", other.map(|p| p.pid)),
    }
    // The connection is still usable after failures.
    assert_eq!(run(&client, sh("exit 0")).await.2, ExitStatus::Code(0));
}

/// Deterministic pseudo-random bytes (xorshift), so a corrupted or reordered chunk shows.
fn pattern(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

#[tokio::test]
async fn twenty_megabytes_round_trip_byte_exact() {
    let agent = Agent::start();
    let client = agent.client().await;
    let data = pattern(20 * 1024 * 1024);
    let mut p = client
        .spawn(SpawnRequest::new(Program::Argv(vec!["cat".into()])))
        .await
        .unwrap();
    let started = Instant::now();
    let mut stdin = p.stdin;
    let send = {
        let data = data.clone();
        tokio::spawn(async move {
            for chunk in data.chunks(100_000) {
                stdin.write_all(chunk).await.unwrap();
            }
            stdin.close().unwrap();
        })
    };
    let mut echoed = Vec::with_capacity(data.len());
    within(120, "20 MB through cat", p.stdout.read_to_end(&mut echoed))
        .await
        .unwrap();
    send.await.unwrap();
    assert_eq!(echoed.len(), data.len());
    assert!(echoed == data, "the echoed bytes differ from what was sent");
    assert_eq!(p.exit.wait().await.unwrap(), ExitStatus::Code(0));
    eprintln!("20 MB round trip in {:?}", started.elapsed());
}

#[tokio::test]
async fn a_slow_reader_bounds_the_agent_and_loses_nothing() {
    let agent = Agent::start();
    let client = agent.client().await;
    // 8 MB of output while the reader pauses: the agent must stop reading (window full)
    // instead of buffering, and everything must arrive once reading resumes.
    let mut p = client
        .spawn(sh("head -c 8388608 /dev/zero; echo end >&2"))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(700)).await;
    let agent_rss_kb = rss_kb(agent.child.id());
    assert!(
        agent_rss_kb < 64 * 1024,
        "agent RSS {agent_rss_kb} kB while the reader is paused"
    );
    let mut out = Vec::new();
    within(60, "8 MB output", p.stdout.read_to_end(&mut out))
        .await
        .unwrap();
    assert_eq!(out.len(), 8 * 1024 * 1024);
    assert!(out.iter().all(|b| *b == 0));
    assert_eq!(p.stderr.read_to_vec().await, b"end\n");
    assert_eq!(p.wait().await.unwrap(), ExitStatus::Code(0));
}

fn rss_kb(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap()
}

/// Reads pty output until `needle` appears; returns everything read.
async fn read_until(p: &mut envgate_agent::Process, needle: &str) -> String {
    let mut seen = String::new();
    within(10, &format!("{needle:?} on the terminal"), async {
        while !seen.contains(needle) {
            match p.stdout.recv().await {
                Some(chunk) => seen.push_str(&String::from_utf8_lossy(&chunk)),
                None => panic!("terminal closed before {needle:?}; got {seen:?}"),
            }
        }
    })
    .await;
    seen
}

#[tokio::test]
async fn pty_size_and_resize_are_seen_by_stty() {
    let agent = Agent::start();
    let client = agent.client().await;
    let mut p = client
        .spawn(with_pty(
            sh("stty size; read x; stty size; echo $TERM"),
            80,
            24,
        ))
        .await
        .unwrap();
    read_until(&mut p, "24 80").await;
    p.control
        .resize(WindowSize {
            cols: 132,
            rows: 43,
            pixel_width: 0,
            pixel_height: 0,
        })
        .unwrap();
    p.stdin.write_all(b"go\n").await.unwrap();
    let out = read_until(&mut p, "43 132").await;
    let rest =
        String::from_utf8_lossy(&within(10, "pty end", p.stdout.read_to_vec()).await).into_owned();
    assert!(
        format!("{out}{rest}").contains("xterm"),
        "TERM not set: {out}{rest}"
    );
    assert_eq!(p.wait().await.unwrap(), ExitStatus::Code(0));
    // A pty has no separate stderr.
    assert!(p.stderr.read_to_vec().await.is_empty());
}

#[tokio::test]
async fn pty_is_the_controlling_terminal() {
    let agent = Agent::start();
    let client = agent.client().await;
    let (out, _, status) = run(&client, with_pty(sh("tty; ps -o tty= -p $$"), 80, 24)).await;
    assert_eq!(status, ExitStatus::Code(0));
    let lines: Vec<&str> = out.lines().map(str::trim).collect();
    assert!(lines[0].starts_with("/dev/pts/"), "{out:?}");
    assert_eq!(
        format!("/dev/{}", lines[1]),
        lines[0],
        "ps sees no controlling tty: {out:?}"
    );
}

#[tokio::test]
async fn ctrl_c_on_the_pty_interrupts_sleep() {
    let agent = Agent::start();
    let client = agent.client().await;
    // `exec` so that no shell forks while the signal arrives: the process that receives
    // the Ctrl-C is the sleep itself.
    let mut p = client
        .spawn(with_pty(sh("echo ready; exec sleep 30"), 80, 24))
        .await
        .unwrap();
    read_until(&mut p, "ready").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let comm = std::fs::read_to_string(format!("/proc/{}/comm", p.pid)).unwrap();
    assert_eq!(comm.trim(), "sleep");
    let started = Instant::now();
    p.stdin.write_all(&[0x03]).await.unwrap();
    within(10, "Ctrl-C to end sleep", p.stdout.read_to_vec()).await;
    let status = p.wait().await.unwrap();
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(
        matches!(&status, ExitStatus::Signal { name, .. } if name == "INT"),
        "{status:?}"
    );
}

#[tokio::test]
async fn terminal_modes_are_applied() {
    let agent = Agent::start();
    let client = agent.client().await;
    let mut req = with_pty(sh("stty -a"), 80, 24);
    // ECHO off (53 = 0), VERASE = ^H (3 = 8).
    req.pty.as_mut().unwrap().modes = vec![(53, 0), (3, 8)];
    let (out, _, _) = run(&client, req).await;
    assert!(out.contains("-echo "), "{out}");
    assert!(out.contains("erase = ^H"), "{out}");
}

#[tokio::test]
async fn signals_are_delivered_and_reported() {
    let agent = Agent::start();
    let client = agent.client().await;
    let p = client
        .spawn(SpawnRequest::new(Program::Argv(vec![
            "sleep".into(),
            "30".into(),
        ])))
        .await
        .unwrap();
    p.control.signal("TERM").unwrap();
    let status = within(10, "TERM to end sleep", p.wait()).await.unwrap();
    assert_eq!(
        status,
        ExitStatus::Signal {
            number: libc::SIGTERM,
            name: "TERM".into(),
            core_dumped: false
        }
    );

    let (_, _, status) = run(&client, sh("kill -KILL $$")).await;
    assert_eq!(
        status,
        ExitStatus::Signal {
            number: libc::SIGKILL,
            name: "KILL".into(),
            core_dumped: false
        }
    );

    let p = client
        .spawn(SpawnRequest::new(Program::Argv(vec![
            "sleep".into(),
            "30".into(),
        ])))
        .await
        .unwrap();
    assert!(matches!(
        p.control.signal("NOPE"),
        Err(AgentError::UnknownSignal(_))
    ));
}

#[tokio::test]
async fn wrong_or_missing_secret_is_refused() {
    let agent = Agent::start();
    match AgentClient::connect(&agent.address(), b"wrong-secret-0123456789abcdef012").await {
        Err(AgentError::Refused(msg)) => assert!(msg.contains("authentication failed"), "{msg}"),
        Err(e) => panic!("expected a refusal, got {e}"),
        Ok(_) => panic!("a wrong secret was accepted"),
    }
    assert!(matches!(
        AgentClient::connect(&agent.address(), b"").await,
        Err(AgentError::WeakSecret)
    ));

    // A raw peer that skips the handshake and asks for a process is closed without one.
    let mut raw = tokio::net::UnixStream::connect(&agent.socket)
        .await
        .unwrap();
    let mut hello = [0u8; 4 + 1 + 4 + 8];
    within(5, "hello", raw.read_exact(&mut hello))
        .await
        .unwrap();
    assert_eq!(&hello[9..17], &MAGIC);
    let mut open = Vec::new();
    envgate_agent::protocol::Message::Open(envgate_agent::protocol::OpenProcess {
        request: sh("touch /tmp/envgate-agent-must-not-exist"),
        stdout_window: 1024,
        stderr_window: 1024,
    })
    .encode(1, &mut open);
    raw.write_all(&open).await.unwrap();
    let mut rest = Vec::new();
    within(
        5,
        "the agent to close the connection",
        raw.read_to_end(&mut rest),
    )
    .await
    .unwrap();
    assert!(!std::path::Path::new("/tmp/envgate-agent-must-not-exist").exists());

    // An anonymous peer cannot announce a big frame (the agent would have to buffer it).
    let mut raw = tokio::net::UnixStream::connect(&agent.socket)
        .await
        .unwrap();
    raw.write_all(&(64 * 1024u32).to_be_bytes()).await.unwrap();
    let mut rest = Vec::new();
    within(
        5,
        "the agent to close a peer announcing a big frame",
        raw.read_to_end(&mut rest),
    )
    .await
    .unwrap();

    // Garbage is closed too, and the agent keeps serving.
    let mut raw = tokio::net::UnixStream::connect(&agent.socket)
        .await
        .unwrap();
    raw.write_all(&[0xff; 64]).await.unwrap();
    let mut rest = Vec::new();
    within(
        5,
        "the agent to close a garbage connection",
        raw.read_to_end(&mut rest),
    )
    .await
    .unwrap();
    let client = agent.client().await;
    assert_eq!(run(&client, sh("exit 0")).await.2, ExitStatus::Code(0));
}

#[tokio::test]
async fn the_client_rejects_a_fake_agent() {
    // A user who is root in the container could replace the socket with their own listener
    // that answers the hello but cannot prove the secret.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fake.sock");
    let listener = tokio::net::UnixListener::bind(&path).unwrap();
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut buf = Vec::new();
        envgate_agent::protocol::Message::Hello {
            min_version: 1,
            max_version: 1,
            nonce: [0; 32],
        }
        .encode(0, &mut buf);
        s.write_all(&buf).await.unwrap();
        let mut auth = [0u8; 4 + 1 + 4 + 2 + 32 + 32];
        s.read_exact(&mut auth).await.unwrap();
        let mut buf = Vec::new();
        envgate_agent::protocol::Message::AuthOk { mac: [1; 32] }.encode(0, &mut buf);
        s.write_all(&buf).await.unwrap();
        tokio::time::sleep(Duration::from_secs(5)).await;
    });
    let addr = envgate_agent::AgentAddress::Unix(path);
    assert!(matches!(
        within(5, "fake agent", AgentClient::connect(&addr, SECRET)).await,
        Err(AgentError::NotAuthentic)
    ));
}

#[tokio::test]
async fn users_are_switched_from_the_passwd_file() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home-tester");
    std::fs::create_dir(&home).unwrap();
    // The home must be enterable by the test user.
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let passwd = dir.path().join("passwd");
    let group = dir.path().join("group");
    std::fs::write(
        &passwd,
        format!(
            "root:x:0:0:root:/root:/bin/sh\ntester:x:4242:4243:Test:{}:/bin/sh\n",
            home.display()
        ),
    )
    .unwrap();
    std::fs::write(
        &group,
        "root:x:0:\ntester:x:4243:\nlab:x:4250:someone,tester\nother:x:4251:someone\n",
    )
    .unwrap();
    let agent = Agent::start_with(&[
        "--passwd-file",
        passwd.to_str().unwrap(),
        "--group-file",
        group.to_str().unwrap(),
    ]);
    let client = agent.client().await;

    let mut req = SpawnRequest::new(Program::ShellCommand(
        "id -u; id -g; id -G; echo $HOME $USER; pwd".into(),
    ));
    req.user = Some("tester".into());
    let (out, err, status) = run(&client, req).await;
    assert_eq!(status, ExitStatus::Code(0), "{err}");
    let home = home.display();
    assert_eq!(
        out,
        format!("4242\n4243\n4243 4250\n{home} tester\n{home}\n")
    );

    // A numeric uid works without an entry, as with `docker exec -u`.
    let mut req = sh("id -u; id -g");
    req.user = Some("5555".into());
    assert_eq!(run(&client, req).await.0, "5555\n5555\n");

    let mut req = sh("true");
    req.user = Some("nobody-such".into());
    match client.spawn(req).await {
        Err(AgentError::SpawnFailed { message, .. }) => {
            assert!(message.contains("nobody-such"), "{message}")
        }
        other => panic!(
            "expected an unknown-user failure, got {:?}",
            other.map(|p| p.pid)
        ),
    }
}

#[tokio::test]
async fn abandoned_grandchildren_are_reaped() {
    let agent = Agent::start();
    let client = agent.client().await;
    // The background sleeps outlive their shell and are re-parented to the agent
    // (a subreaper here, PID 1 in a container).
    let (_, _, status) = run(
        &client,
        sh("for i in 1 2 3 4 5; do (sleep 0.2 >/dev/null 2>&1 &); done; exit 0"),
    )
    .await;
    assert_eq!(status, ExitStatus::Code(0));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let zombies = zombie_children(agent.child.id());
    assert!(
        zombies.is_empty(),
        "zombie children of the agent: {zombies:?}"
    );
    let children =
        std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", agent.child.id())).unwrap();
    assert!(
        children.trim().is_empty(),
        "the agent still has children: {children}"
    );
}

fn zombie_children(ppid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let after = &stat[stat.rfind(')').unwrap() + 2..];
        let mut fields = after.split_whitespace();
        let state = fields.next().unwrap();
        let parent: u32 = fields.next().unwrap().parse().unwrap();
        if parent == ppid && state == "Z" {
            out.push(pid);
        }
    }
    out
}

#[tokio::test]
async fn sigterm_is_forwarded_and_the_agent_exits() {
    let mut agent = Agent::start();
    let client = agent.client().await;
    let p = client
        .spawn(SpawnRequest::new(Program::Argv(vec![
            "sleep".into(),
            "60".into(),
        ])))
        .await
        .unwrap();
    let started = Instant::now();
    let exit = tokio::task::spawn_blocking(move || agent.terminate());
    let status = within(10, "the session to end on SIGTERM", p.wait())
        .await
        .unwrap();
    assert_eq!(
        status,
        ExitStatus::Signal {
            number: libc::SIGTERM,
            name: "TERM".into(),
            core_dumped: false
        }
    );
    let agent_exit = exit.await.unwrap();
    assert!(agent_exit.success(), "{agent_exit:?}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn dropping_a_process_hangs_it_up() {
    let agent = Agent::start();
    let client = agent.client().await;
    let mut p = client.spawn(sh("echo ready; exec sleep 60")).await.unwrap();
    let first = within(10, "ready", p.stdout.recv()).await.unwrap();
    assert_eq!(first, b"ready\n");
    let pid = p.pid;
    assert!(std::path::Path::new(&format!("/proc/{pid}")).exists());
    drop(p);
    // SIGHUP ends the sleep and the agent reaps it, so its /proc entry goes away.
    within(
        10,
        "the abandoned process to be hung up and reaped",
        async {
            while std::path::Path::new(&format!("/proc/{pid}")).exists() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        },
    )
    .await;
    assert!(!client.is_closed());
    assert!(client.ping().await.is_ok());
}

#[tokio::test]
async fn tcp_listener_serves_the_same_protocol() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let addr = format!("127.0.0.1:{port}");
    let agent = Agent::start_with(&["--listen-tcp", &addr]);
    let client = within(
        10,
        "tcp connect",
        AgentClient::connect(&addr.parse().unwrap(), SECRET),
    )
    .await
    .expect("connect over tcp");
    let (out, _, status) = run(&client, sh("echo over-tcp")).await;
    assert_eq!((out.as_str(), status), ("over-tcp\n", ExitStatus::Code(0)));
    assert!(matches!(
        AgentClient::connect(&addr.parse().unwrap(), b"another-secret-0123456789abcdef").await,
        Err(AgentError::Refused(_))
    ));
    drop(agent);
}

#[tokio::test]
async fn a_silent_peer_is_dropped_after_the_handshake_timeout() {
    let agent = Agent::start_with(&["--handshake-timeout-seconds", "1"]);
    let mut raw = tokio::net::UnixStream::connect(&agent.socket)
        .await
        .unwrap();
    let started = Instant::now();
    let mut all = Vec::new();
    within(
        5,
        "the agent to drop a silent peer",
        raw.read_to_end(&mut all),
    )
    .await
    .unwrap();
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "{:?}",
        started.elapsed()
    );
    // It sent its hello and nothing else.
    assert_eq!(&all[9..17], &MAGIC);
    assert_eq!(all.len(), 4 + 1 + 4 + 8 + 2 + 2 + 32);
}

#[tokio::test]
async fn an_unknown_channel_type_is_refused_and_the_connection_survives() {
    use envgate_agent::protocol::{Message, open_error};
    let agent = Agent::start();
    let (mut reader, mut wr) = raw_authenticated(&agent).await;
    // A channel type from the future, then a ping on the same connection.
    let mut buf = Vec::new();
    Message::OpenUnknown { channel_type: 42 }.encode(7, &mut buf);
    Message::Ping {
        payload: b"still-there".to_vec(),
    }
    .encode(0, &mut buf);
    wr.write_all(&buf).await.unwrap();
    let mut got = Vec::new();
    for _ in 0..2 {
        got.push(
            within(5, "agent answers", reader.next())
                .await
                .unwrap()
                .unwrap(),
        );
    }
    assert!(
        matches!(&got[0], (7, Message::OpenFailed { code, .. }) if *code == open_error::UNSUPPORTED),
        "{:?}",
        got[0]
    );
    assert_eq!(
        got[1],
        (
            0,
            Message::Pong {
                payload: b"still-there".to_vec()
            }
        )
    );
}

#[tokio::test]
async fn stdin_and_stdout_work_as_async_write_and_read() {
    let agent = Agent::start();
    let client = agent.client().await;
    let data = pattern(3 * 1024 * 1024 + 17);
    let p = client
        .spawn(SpawnRequest::new(Program::Argv(vec!["cat".into()])))
        .await
        .unwrap();
    let envgate_agent::Process {
        mut stdin,
        mut stdout,
        control,
        exit,
        ..
    } = p;
    assert_eq!(control.exit_status(), None);
    let send = {
        let data = data.clone();
        tokio::spawn(async move {
            tokio::io::copy(&mut &data[..], &mut stdin).await.unwrap();
            stdin.shutdown().await.unwrap();
        })
    };
    let mut echoed = Vec::new();
    within(
        60,
        "cat through AsyncWrite/AsyncRead",
        stdout.read_to_end(&mut echoed),
    )
    .await
    .unwrap();
    send.await.unwrap();
    assert!(
        echoed == data,
        "echoed {} bytes, sent {}",
        echoed.len(),
        data.len()
    );
    assert_eq!(exit.wait().await.unwrap(), ExitStatus::Code(0));
    assert_eq!(control.exit_status(), Some(ExitStatus::Code(0)));
    assert_eq!(exit.try_status().unwrap().unwrap().shell_code(), 0);
}

#[tokio::test]
async fn hundreds_of_concurrent_spawns_on_one_connection() {
    let agent = Agent::start();
    let client = agent.client().await;
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..300 {
        let client = client.clone();
        tasks.spawn(async move { run(&client, sh(&format!("echo {i}"))).await });
    }
    let mut seen = Vec::new();
    while let Some(r) = tasks.join_next().await {
        let (out, _, status) = r.unwrap();
        assert_eq!(status, ExitStatus::Code(0));
        seen.push(out.trim().parse::<u32>().unwrap());
    }
    seen.sort();
    assert_eq!(seen, (0..300).collect::<Vec<_>>());
    let elapsed = started.elapsed();
    eprintln!("300 concurrent `sh -c echo` sessions in {elapsed:?}");
    // A Docker exec alone costs ~70 ms at ~14–22 per second; the agent must do far better.
    assert!(elapsed < Duration::from_secs(10), "{elapsed:?}");
}

#[tokio::test]
async fn a_pty_session_ends_when_its_leader_exits_even_if_a_job_holds_the_terminal() {
    let agent = Agent::start();
    let client = agent.client().await;
    // The background sleep ignores SIGHUP and keeps the pty open after the shell exits.
    let started = Instant::now();
    let (out, _, status) = run(
        &client,
        with_pty(sh("trap '' HUP; sleep 20 & echo bye; exit 5"), 80, 24),
    )
    .await;
    assert!(out.contains("bye"), "{out:?}");
    assert_eq!(status, ExitStatus::Code(5));
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn the_client_learns_when_the_agent_dies() {
    let mut agent = Agent::start();
    let client = agent.client().await;
    let p = client
        .spawn(SpawnRequest::new(Program::Argv(vec![
            "sleep".into(),
            "30".into(),
        ])))
        .await
        .unwrap();
    agent.child.kill().unwrap();
    agent.child.wait().unwrap();
    match within(5, "the exit wait to fail", p.wait()).await {
        Err(AgentError::Closed(_)) => {}
        other => panic!("expected a closed connection, got {other:?}"),
    }
    assert!(client.is_closed());
    assert!(matches!(
        within(5, "spawn on a dead connection", client.spawn(sh("true"))).await,
        Err(AgentError::Closed(_))
    ));
    // The orphaned sleep is not ours to keep.
    unsafe { libc::kill(p.pid as i32, libc::SIGKILL) };
}

#[tokio::test]
async fn the_pool_shares_one_connection_per_container_and_reconnects() {
    let agent = Agent::start();
    let pool = std::sync::Arc::new(envgate_agent::AgentPool::new(Default::default()));
    let idle_sockets = agent_sockets(&agent);
    // Many logins to one container at once: one connection.
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..20 {
        let pool = pool.clone();
        let addr = agent.address();
        tasks.spawn(async move { pool.get("c1", &addr, SECRET).await.unwrap() });
    }
    let clients: Vec<AgentClient> = tasks.join_all().await;
    let connections = agent_sockets(&agent) - idle_sockets;
    assert_eq!(connections, 1, "connections to the agent: {connections}");
    assert_eq!(run(&clients[7], sh("exit 2")).await.2, ExitStatus::Code(2));
    drop(clients);

    // The container was replaced: a new agent at a new address with a new secret.
    let other = Agent::start();
    let c = pool.get("c1", &other.address(), SECRET).await.unwrap();
    assert_eq!(run(&c, sh("exit 3")).await.2, ExitStatus::Code(3));
    let wrong = pool
        .get("c1", &other.address(), b"another-secret-0123456789abcdef")
        .await;
    assert!(matches!(wrong, Err(AgentError::Refused(_))));
    pool.forget("c1");
    assert!(pool.is_empty());
}

#[tokio::test]
async fn the_pool_lets_go_of_containers_whose_connection_closed() {
    // 70 containers come and go: 35 names on each of two agents (an agent takes 64
    // connections), which then die.
    let mut agents = [Agent::start(), Agent::start()];
    let pool = envgate_agent::AgentPool::new(Default::default());
    let mut clients = Vec::new();
    for i in 0..70 {
        let address = agents[i % 2].address();
        clients.push(
            pool.get(&format!("gone-{i}"), &address, SECRET)
                .await
                .unwrap(),
        );
    }
    assert_eq!(pool.len(), 70);
    for agent in &mut agents {
        agent.child.kill().unwrap();
        agent.child.wait().unwrap();
    }
    for client in &clients {
        within(5, "the connection to notice the agent is gone", async {
            while !client.is_closed() {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        })
        .await;
    }
    // New containers keep coming; once the map has doubled since its last prune (the first
    // was at 64), the closed slots go: 56 new ones leave 56 slots, not 126.
    let other = Agent::start();
    let mut fresh = Vec::new();
    for i in 0..56 {
        fresh.push(
            pool.get(&format!("alive-{i}"), &other.address(), SECRET)
                .await
                .unwrap(),
        );
    }
    assert_eq!(pool.len(), 56, "only the live containers are left");
    assert_eq!(run(&fresh[55], sh("exit 4")).await.2, ExitStatus::Code(4));
}

/// Sockets the agent process holds (listener, runtime internals, connections).
fn agent_sockets(agent: &Agent) -> usize {
    let fds = std::fs::read_dir(format!("/proc/{}/fd", agent.child.id())).unwrap();
    let sockets: Vec<String> = fds
        .flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .map(|l| l.to_string_lossy().into_owned())
        .filter(|l| l.starts_with("socket:"))
        .collect();
    sockets.len()
}

#[test]
fn the_agent_refuses_to_start_without_a_usable_secret() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("agent.sock");
    let agent = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_envgate-agent"))
            .arg("--socket")
            .arg(&socket)
            .args(args)
            .env_remove("ENVGATE_AGENT_SECRET")
            .env_remove("ENVGATE_AGENT_SECRET_FILE")
            .output()
            .unwrap()
    };
    let out = agent(&[]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no secret"),
        "{out:?}"
    );

    let short = dir.path().join("short");
    std::fs::write(&short, "tooshort\n").unwrap();
    let out = agent(&["--secret-file", short.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("at least 16 bytes"),
        "{out:?}"
    );

    let out = agent(&[
        "--secret-file",
        dir.path().join("missing").to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cannot read the secret file"),
        "{out:?}"
    );
    assert!(!socket.exists(), "nothing may be bound with bad config");
}

/// Raw, authenticated connection to the agent (what a buggy or hostile proxy could send).
async fn raw_authenticated(
    agent: &Agent,
) -> (
    envgate_agent::protocol::FrameReader<tokio::net::unix::OwnedReadHalf>,
    tokio::net::unix::OwnedWriteHalf,
) {
    let (rd, wr) = tokio::net::UnixStream::connect(&agent.socket)
        .await
        .unwrap()
        .into_split();
    common::raw_handshake(rd, wr, 1).await
}

#[tokio::test]
async fn a_proxy_overrunning_the_stdin_window_is_disconnected() {
    use envgate_agent::protocol::{Message, OpenProcess, Stream};
    let agent = Agent::start();
    let (mut reader, mut wr) = raw_authenticated(&agent).await;
    let mut buf = Vec::new();
    Message::Open(OpenProcess {
        request: SpawnRequest::new(Program::Argv(vec!["sleep".into(), "30".into()])),
        stdout_window: 1024,
        stderr_window: 1024,
    })
    .encode(1, &mut buf);
    wr.write_all(&buf).await.unwrap();
    let Some((1, Message::OpenOk { stdin_window, .. })) =
        within(5, "open ok", reader.next()).await.unwrap()
    else {
        panic!("no OpenOk")
    };
    // `sleep` never reads: send three windows without waiting for credit. The agent can
    // legitimately re-grant only what the pipe absorbs (at most 1 MiB, as it widens its
    // pipes), so this must overrun.
    let chunk = vec![b'x'; 32 * 1024];
    let mut buf = Vec::new();
    for _ in 0..(3 * stdin_window as usize / chunk.len()) {
        Message::Data {
            stream: Stream::Stdin,
            data: chunk.clone(),
        }
        .encode(1, &mut buf);
    }
    let _ = wr.write_all(&buf).await;
    let mut error = None;
    within(10, "the agent to close the connection", async {
        while let Ok(Some((id, msg))) = reader.next().await {
            if let (0, Message::Error { message }) = (id, msg) {
                error = Some(message);
            }
        }
    })
    .await;
    let error = error.expect("an ERROR frame before the close");
    assert!(error.contains("window"), "{error}");
}

#[tokio::test]
async fn an_agent_overrunning_the_output_window_is_disconnected() {
    use envgate_agent::auth;
    use envgate_agent::protocol::{FrameReader, Message, Stream};
    // An agent taken over by root in its container, holding the right secret, that ignores
    // flow control: the proxy must not buffer what it did not grant.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rogue.sock");
    let listener = tokio::net::UnixListener::bind(&path).unwrap();
    tokio::spawn(async move {
        let (s, _) = listener.accept().await.unwrap();
        let (rd, mut wr) = s.into_split();
        let mut reader = FrameReader::new(rd);
        let nonce = auth::fresh_nonce();
        let mut buf = Vec::new();
        Message::Hello {
            min_version: 1,
            max_version: 1,
            nonce,
        }
        .encode(0, &mut buf);
        wr.write_all(&buf).await.unwrap();
        let Some((0, Message::Auth { nonce: cn, .. })) = reader.next().await.unwrap() else {
            return;
        };
        let mut buf = Vec::new();
        Message::AuthOk {
            mac: auth::agent_proof(SECRET, 1, &nonce, &cn),
        }
        .encode(0, &mut buf);
        wr.write_all(&buf).await.unwrap();
        let Some((id, Message::Open(_))) = reader.next().await.unwrap() else {
            return;
        };
        let mut buf = Vec::new();
        Message::OpenOk {
            pid: 1,
            stdin_window: 0,
        }
        .encode(id, &mut buf);
        for _ in 0..64 {
            Message::Data {
                stream: Stream::Stdout,
                data: vec![0; 32 * 1024],
            }
            .encode(id, &mut buf);
        }
        let _ = wr.write_all(&buf).await;
        tokio::time::sleep(Duration::from_secs(10)).await;
    });
    let client = AgentClient::connect(&envgate_agent::AgentAddress::Unix(path), SECRET)
        .await
        .unwrap();
    let p = client.spawn(sh("true")).await.unwrap();
    match within(5, "the client to drop the rogue agent", p.wait()).await {
        Err(AgentError::Closed(reason)) => assert!(reason.contains("window"), "{reason}"),
        other => panic!("expected the connection to be closed, got {other:?}"),
    }
    assert!(client.is_closed());
}
