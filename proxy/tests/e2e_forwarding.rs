//! End to end: `ssh -W`, `-L` and `-D` with the real OpenSSH client through HAProxy. The
//! connection is made from inside the user's own container, as the user, so `127.0.0.1`
//! is the container's loopback; another user's container and the host's services stay out
//! of reach, each refusal with its reason.

mod support;

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use support::{Fleet, eventually, run, with_options};
use tokio::io::AsyncReadExt;

/// A server in `login`'s container on port 8080 answering every connection with `greeting`.
async fn serve_inside(
    fleet: &Fleet,
    login: &str,
    greeting: &str,
) -> tokio::task::JoinHandle<support::SshOutput> {
    fleet
        .session_in_background(
            login,
            &format!("while :; do echo {greeting} | nc -l -p 8080; done"),
            Duration::from_secs(30),
        )
        .await
}

/// `ssh -W target` as `login`, stdin closed: what came back. At ssh's default log level, as
/// users have it, so a refused open shows its reason (ssh takes an option's first value).
async fn through(fleet: &Fleet, login: &str, target: &str) -> support::SshOutput {
    let argv = fleet.ssh_key_argv(login, &fleet.key_of(login.split('+').next().unwrap()));
    let argv = with_options(argv, &["-o", "LogLevel=INFO", "-W", target]);
    run(&argv, Some(b""), &[]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn w_and_l_and_d_reach_the_containers_own_loopback() {
    let fleet = Fleet::start().await;
    let _server = serve_inside(&fleet, "demo", "hello-from-inside").await;

    let out = eventually(
        Duration::from_secs(15),
        "ssh -W to the container's 8080",
        || async {
            let out = through(&fleet, "demo", "127.0.0.1:8080").await;
            if out.stdout == "hello-from-inside\n" {
                Ok(out)
            } else {
                Err(format!("{out:?}"))
            }
        },
    )
    .await;
    assert_eq!(out.code, Some(0), "{out:#?}");

    // -L and -D: a local port on this machine, the far end in the container.
    let local = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let (l_port, d_port) = (local.local_addr().unwrap().port(), {
        let d = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        d.local_addr().unwrap().port()
    });
    drop(local);
    let argv = with_options(
        fleet.ssh_key_argv("demo", &fleet.key_of("demo")),
        &[
            "-N",
            "-o",
            "ExitOnForwardFailure=yes",
            "-L",
            &format!("{l_port}:localhost:8080"),
            "-D",
            &format!("127.0.0.1:{d_port}"),
        ],
    );
    let mut tunnel = tokio::process::Command::new(&argv[0])
        .args(&argv[1..])
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let greeting = eventually(Duration::from_secs(20), "ssh -L forwards", || async {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", l_port))
            .await
            .map_err(|e| e.to_string())?;
        let mut got = String::new();
        tokio::time::timeout(Duration::from_secs(5), stream.read_to_string(&mut got))
            .await
            .map_err(|_| "no answer".to_string())?
            .map_err(|e| e.to_string())?;
        if got.is_empty() {
            Err("empty".into())
        } else {
            Ok(got)
        }
    })
    .await;
    assert_eq!(greeting, "hello-from-inside\n");

    // SOCKS4a through -D, by name: "localhost" is resolved inside the container.
    let socks = run(
        &[
            "socat".to_string(),
            "-".to_string(),
            format!("SOCKS4A:127.0.0.1:localhost:8080,socksport={d_port}"),
        ],
        Some(b""),
        &[],
    )
    .await;
    assert_eq!(socks.stdout, "hello-from-inside\n", "{socks:#?}");

    // Bytes both ways, byte-exact: an echo server in the container.
    // (A second session of demo's; the -W below retries until it listens.)
    let _echo = fleet.ssh_in_background("demo", "while :; do nc -l -p 8081 -e cat; done");
    let data: Vec<u8> = (0..512 * 1024u32)
        .map(|i| (i * 7 + i / 255) as u8)
        .collect();
    let argv = with_options(
        fleet.ssh_key_argv("demo", &fleet.key_of("demo")),
        &["-W", "127.0.0.1:8081"],
    );
    let echoed = eventually(Duration::from_secs(15), "the echo server", || async {
        let out = run(&argv, Some(&data), &[]).await;
        if out.stdout_bytes.len() == data.len() {
            Ok(out)
        } else {
            Err(format!(
                "{} bytes back; {}",
                out.stdout_bytes.len(),
                out.stderr
            ))
        }
    })
    .await;
    assert!(echoed.stdout_bytes == data, "the echo differs");
    let _ = tunnel.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwards_to_other_users_or_the_host_are_refused_with_the_reason() {
    let fleet = Fleet::start().await;
    fleet.add_user("bob", "busybox", None).await;
    let _bobs = serve_inside(&fleet, "bob", "bobs-secret").await;
    let bob_ip = fleet
        .ssh(
            "bob",
            "ip -4 -o addr show eth0 | awk '{print $4}' | cut -d/ -f1",
            None,
        )
        .await
        .stdout
        .trim()
        .to_owned();
    let gateway: Ipv4Addr = fleet
        .ssh("demo", "ip route | awk '/^default/ {print $3}'", None)
        .await
        .stdout
        .trim()
        .parse()
        .expect("the container's gateway");
    // A service of the host's on every address: reachable from the host itself.
    let host_service = std::net::TcpListener::bind((Ipv4Addr::UNSPECIFIED, 0)).unwrap();
    let host_port = host_service.local_addr().unwrap().port();
    assert!(
        std::net::TcpStream::connect_timeout(
            &SocketAddr::from((gateway, host_port)),
            Duration::from_secs(2)
        )
        .is_ok()
    );
    let etcd_port = fleet.etcd_endpoint().rsplit(':').next().unwrap().to_owned();

    let (bobs_target, host_target, etcd_target) = (
        format!("{bob_ip}:8080"),
        format!("{gateway}:{host_port}"),
        format!("{gateway}:{etcd_port}"),
    );
    let nothing = through(&fleet, "demo", "127.0.0.1:1");
    let bobs = through(&fleet, "demo", &bobs_target);
    let host = through(&fleet, "demo", &host_target);
    let etcd = through(&fleet, "demo", &etcd_target);
    let (nothing, bobs, host, etcd) = tokio::join!(nothing, bobs, host, etcd);

    let refusal = |out: &support::SshOutput| {
        assert_eq!(out.code, Some(255), "{out:#?}");
        assert_eq!(out.stdout, "", "{out:#?}");
        out.stderr_lines()
            .iter()
            .find(|l| l.contains("open failed"))
            .map(|l| l.to_string())
            .unwrap_or_else(|| panic!("{out:#?}"))
    };
    assert_eq!(
        refusal(&nothing),
        "channel 0: open failed: connect failed: 127.0.0.1:1: Connection refused"
    );
    for (out, target) in [
        (&bobs, format!("{bob_ip}:8080")),
        (&host, format!("{gateway}:{host_port}")),
        (&etcd, format!("{gateway}:{etcd_port}")),
    ] {
        assert_eq!(
            refusal(out),
            format!("channel 0: open failed: connect failed: {target}: no answer within 10 s")
        );
    }

    // Nonsense targets are refused before anything runs.
    let bad = through(&fleet, "demo", "127.0.0.1:0").await;
    assert_eq!(bad.code, Some(255), "{bad:#?}");
}

/// What VS Code Remote-SSH does: `ssh -T -D PORT host bash` with its install script on stdin;
/// the script starts a server on the remote loopback and prints `listeningOn==PORT==`; the
/// editor then reaches that port through the SOCKS proxy, while the first session stays
/// open. Here the "server" is an echo service and the shell is the image's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_vs_code_remote_ssh_sequence_works() {
    let fleet = Fleet::start().await;
    let socks_port = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap().port()
    };
    let mut argv = with_options(
        fleet.ssh_key_argv("demo", &fleet.key_of("demo")),
        &["-T", "-D", &socks_port.to_string()],
    );
    argv.push("sh".to_string());
    let mut ssh = tokio::process::Command::new(&argv[0])
        .args(&argv[1..])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stdin = ssh.stdin.take().unwrap();
    tokio::io::AsyncWriteExt::write_all(
        &mut stdin,
        b"echo platform=$(uname -s)\n\
          (while :; do nc -l -p 34567 -e cat; done) >/dev/null 2>&1 &\n\
          echo listeningOn==34567==\n",
    )
    .await
    .unwrap();
    let mut stdout = tokio::io::BufReader::new(ssh.stdout.take().unwrap());
    let mut lines = Vec::new();
    while !lines
        .iter()
        .any(|l: &String| l.starts_with("listeningOn=="))
    {
        let mut line = String::new();
        let n = tokio::time::timeout(
            Duration::from_secs(30),
            tokio::io::AsyncBufReadExt::read_line(&mut stdout, &mut line),
        )
        .await
        .expect("the script's output in time")
        .unwrap();
        assert_ne!(n, 0, "the session ended early: {lines:?}");
        lines.push(line.trim().to_owned());
    }
    assert_eq!(lines, ["platform=Linux", "listeningOn==34567=="]);

    // The editor's connection to its server, through the SOCKS proxy, byte-exact.
    let echoed = eventually(Duration::from_secs(15), "the server through -D", || async {
        let out = run(
            &[
                "socat".to_string(),
                "-".to_string(),
                format!("SOCKS4A:127.0.0.1:127.0.0.1:34567,socksport={socks_port}"),
            ],
            Some(b"hello vscode\n"),
            &[],
        )
        .await;
        if out.stdout == "hello vscode\n" {
            Ok(out)
        } else {
            Err(format!("{out:?}"))
        }
    })
    .await;
    assert_eq!(echoed.code, Some(0));
    drop(stdin);
    let _ = ssh.kill().await;
}

/// `ssh -L port:/path.sock` (direct-streamlocal): to a Unix socket in the container, with the
/// user's permissions. The agent's own socket is root's: the user is refused with the reason,
/// root (in an environment that opts into it) reaches it and reads the agent's hello.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unix_socket_forwards_follow_the_users_permissions() {
    let fleet = Fleet::start().await;
    let mut rootlab = support::environment("rootlab", support::BUSYBOX_IMAGE, "/bin/sh", false);
    rootlab.run_as = "root".into();
    fleet.put_environment(rootlab).await;

    let tunnel = |login: &'static str, port: u16| {
        let argv = with_options(
            fleet.ssh_key_argv(login, &fleet.key_of("demo")),
            &[
                "-o",
                "LogLevel=INFO",
                "-N",
                "-L",
                &format!("{port}:/run/envgate/agent.sock"),
            ],
        );
        tokio::process::Command::new(&argv[0])
            .args(&argv[1..])
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap()
    };
    let free_port = || {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap().port()
    };

    let root_port = free_port();
    let _root = tunnel("demo+rootlab", root_port);
    let hello = eventually(
        Duration::from_secs(20),
        "root's forward to the agent socket",
        || async {
            let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", root_port))
                .await
                .map_err(|e| e.to_string())?;
            let mut got = vec![0; 17];
            tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut got))
                .await
                .map_err(|_| "no hello".to_string())?
                .map_err(|e| e.to_string())?;
            Ok(got)
        },
    )
    .await;
    assert_eq!(&hello[9..], b"EGAGENT\n", "the agent's hello: {hello:?}");

    let user_port = free_port();
    let mut user = tunnel("demo", user_port);
    eventually(
        Duration::from_secs(20),
        "the user's forward is refused",
        || async {
            let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", user_port))
                .await
                .map_err(|e| e.to_string())?;
            let mut got = Vec::new();
            let _ =
                tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut got)).await;
            if got.is_empty() {
                Ok(())
            } else {
                Err(format!("{got:?}"))
            }
        },
    )
    .await;
    let _ = user.kill().await;
    let mut stderr = String::new();
    user.stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .await
        .unwrap();
    assert!(
        stderr.contains("open failed: connect failed: /run/envgate/agent.sock: Permission denied"),
        "{stderr}"
    );
}

/// `ssh -A`: inside the container, `ssh-add -l` lists the keys of the user's own agent, and
/// a signature made in the container is made by that agent. The socket is the user's, in a
/// directory only they can enter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_forwarding_reaches_the_users_own_agent() {
    let fleet = Fleet::start().await;
    let agent = fleet
        .ssh_agent(&[fleet.key_of("demo"), fleet.stranger_key()])
        .await;
    let socket = agent.socket.clone();
    let socket_arg = socket.display().to_string();
    let local = run(
        &["ssh-add".into(), "-l".into()],
        None,
        &[("SSH_AUTH_SOCK", socket_arg.as_str())],
    )
    .await;

    let mut argv = with_options(fleet.ssh_agent_argv("demo+debian", &socket), &["-A"]);
    argv.push(
        "ssh-add -l; stat -c '%U %a' \"$SSH_AUTH_SOCK\" \"$(dirname \"$SSH_AUTH_SOCK\")\"; \
         echo signed > msg; ssh-add -L | head -1 > key.pub; \
         ssh-keygen -Y sign -n file -f key.pub msg >/dev/null 2>&1 && head -1 msg.sig"
            .to_string(),
    );
    let out = run(&argv, None, &[]).await;
    out.assert_success();
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(lines[..2].join("\n"), local.stdout.trim_end(), "{out:#?}");
    assert_eq!(lines[2..4], ["demo 600", "demo 700"], "{out:#?}");
    assert_eq!(lines[4], "-----BEGIN SSH SIGNATURE-----", "{out:#?}");

    // `ssh -T` from inside to another host logs in with the forwarded agent: the container
    // holds no private key. The other host is a plain sshd on this machine that accepts only
    // demo's key, reached through a `-R` forward of the same connection.
    let other = OtherHost::start(&fleet.key_of("demo")).await;
    let mut argv = with_options(
        fleet.ssh_agent_argv("demo+debian", &socket),
        &["-A", "-R", &format!("2200:127.0.0.1:{}", other.port)],
    );
    argv.push(format!(
        "ls ~/.ssh/id_* 2>/dev/null; ssh -T -p 2200 -o BatchMode=yes -o StrictHostKeyChecking=no \
         -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR {}@127.0.0.1 'echo far side $((6 * 7))'",
        other.user
    ));
    let out = run(&argv, None, &[]).await;
    assert_eq!(
        (out.code, out.stdout.as_str()),
        (Some(0), "far side 42\n"),
        "{out:#?}"
    );

    // Without -A there is no socket.
    let mut argv = fleet.ssh_agent_argv("demo+debian", &socket);
    argv.push("echo \"${SSH_AUTH_SOCK-none}\"".to_string());
    let out = run(&argv, None, &[]).await;
    assert_eq!(out.stdout, "none\n", "{out:#?}");
}

/// A plain OpenSSH sshd on this machine (`deploy/local/floor-sshd`), accepting only the key
/// given: "another host" for an `ssh` run inside a container. Stopped when dropped.
struct OtherHost {
    dir: tempfile::TempDir,
    port: u16,
    user: String,
}

impl OtherHost {
    async fn start(key: &std::path::Path) -> OtherHost {
        let dir = tempfile::tempdir().unwrap();
        let port = support::free_port().unwrap();
        let script = support::repo_root().join("deploy/local/floor-sshd");
        let argv = [
            script.display().to_string(),
            "start".into(),
            "--dir".into(),
            dir.path().display().to_string(),
            "--port".into(),
            port.to_string(),
            "--keys".into(),
            format!("{}.pub", key.display()),
        ];
        let out = run(&argv, None, &[]).await;
        out.assert_success();
        // "127.0.0.1:PORT USER"
        let user = out.stdout.split_whitespace().nth(1).unwrap().to_owned();
        OtherHost { dir, port, user }
    }
}

impl Drop for OtherHost {
    fn drop(&mut self) {
        let script = support::repo_root().join("deploy/local/floor-sshd");
        let _ = std::process::Command::new(script)
            .args(["stop", "--dir"])
            .arg(self.dir.path())
            .output();
    }
}

/// `ssh -R`: the listener is in the user's container (on its loopback), each connection to it
/// reaches the client's side. A port that cannot be had is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_forwards_listen_in_the_container() {
    let fleet = Fleet::start().await;
    // The client's side: a service on this machine.
    let laptop = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let laptop_port = laptop.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = laptop.accept().await {
            let _ = tokio::io::AsyncWriteExt::write_all(&mut stream, b"from-the-laptop\n").await;
        }
    });
    let argv = with_options(
        fleet.ssh_key_argv("demo", &fleet.key_of("demo")),
        &[
            "-N",
            "-o",
            "ExitOnForwardFailure=yes",
            "-R",
            &format!("9000:127.0.0.1:{laptop_port}"),
        ],
    );
    let _tunnel = tokio::process::Command::new(&argv[0])
        .args(&argv[1..])
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let inside = eventually(
        Duration::from_secs(20),
        "the container's port 9000",
        || async {
            let out = fleet
                .ssh("demo", "nc 127.0.0.1 9000 </dev/null", None)
                .await;
            if out.stdout == "from-the-laptop\n" {
                Ok(out)
            } else {
                Err(format!("{out:?}"))
            }
        },
    )
    .await;
    assert_eq!(inside.code, Some(0));

    // A port already taken in the container (by the tunnel above): refused, and ssh says so.
    let mut argv = with_options(
        fleet.ssh_key_argv("demo", &fleet.key_of("demo")),
        &[
            "-o",
            "ExitOnForwardFailure=yes",
            "-R",
            &format!("9000:127.0.0.1:{laptop_port}"),
        ],
    );
    argv.push("true".to_string());
    let out = run(&argv, None, &[]).await;
    assert_eq!(out.code, Some(255), "{out:#?}");
    assert!(
        out.stderr
            .contains("remote port forwarding failed for listen port 9000"),
        "{out:#?}"
    );
}
