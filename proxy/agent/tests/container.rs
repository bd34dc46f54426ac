//! The static agent as PID 1 of a real `envgate/busybox:latest` container, the way the
//! control plane runs it: binary bind-mounted read-only, socket directory bind-mounted,
//! secret in a root-only read-only directory, envgate's capability set.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::{SECRET, run, within};
use envgate_agent::{
    Account, AgentAddress, AgentClient, ExitStatus, Program, PtyRequest, SpawnRequest, WindowSize,
};

const IMAGE: &str = "envgate/busybox:latest";
const DEBIAN: &str = "envgate/debian:latest";

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The static binary: ENVGATE_AGENT_STATIC_BIN if set (CI can build it once, in release),
/// else built by `build-static --dev` (quick incremental builds; behaviour is the same).
fn static_agent() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(bin) = std::env::var_os("ENVGATE_AGENT_STATIC_BIN") {
            return PathBuf::from(bin);
        }
        let out = Command::new(Path::new(env!("CARGO_MANIFEST_DIR")).join("build-static"))
            .arg("--dev")
            .output()
            .expect("run proxy/agent/build-static");
        assert!(
            out.status.success(),
            "build-static failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
    })
}

fn docker(args: &[&str]) -> std::process::Output {
    Command::new("docker")
        .args(args)
        .output()
        .expect("run the docker CLI")
}

fn ensure_image(image: &str) {
    if docker(&["image", "inspect", image]).status.success() {
        return;
    }
    let which = if image == DEBIAN { "debian" } else { "busybox" };
    let status = Command::new(repo_root().join("deploy/local/images"))
        .arg(which)
        .status()
        .expect("run deploy/local/images");
    assert!(status.success(), "deploy/local/images {which} failed");
}

struct Container {
    name: String,
    dir: tempfile::TempDir,
}

impl Container {
    fn start() -> Container {
        Self::start_image(IMAGE)
    }

    fn start_image(image: &str) -> Container {
        Self::start_with(image, &[])
    }

    /// `agent_args` are more flags for the agent.
    fn start_with(image: &str, agent_args: &[&str]) -> Container {
        ensure_image(image);
        let agent = static_agent();
        let dir = tempfile::tempdir().unwrap();
        let sock_dir = dir.path().join("sock");
        let secret_dir = dir.path().join("secret");
        std::fs::create_dir(&sock_dir).unwrap();
        std::fs::create_dir(&secret_dir).unwrap();
        let secret_file = secret_dir.join("secret");
        std::fs::write(&secret_file, SECRET).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&secret_file, std::fs::Permissions::from_mode(0o400)).unwrap();
        std::fs::set_permissions(&secret_dir, std::fs::Permissions::from_mode(0o700)).unwrap();

        let name = format!("envgate-agent-test-{}-{}", std::process::id(), unique());
        let mounts = [
            format!("{}:/.envgate/agent:ro", agent.display()),
            format!("{}:/run/envgate", sock_dir.display()),
            format!("{}:/run/envgate-secret:ro", secret_dir.display()),
        ];
        let mut args = vec![
            "run",
            "-d",
            "--name",
            &name,
            "--label",
            "envgate.test=envgate-agent",
            "--entrypoint",
            "/.envgate/agent",
            "--cap-drop",
            "ALL",
            "--cap-add",
            "CHOWN",
            "--cap-add",
            "DAC_OVERRIDE",
            "--cap-add",
            "FOWNER",
            "--cap-add",
            "SETUID",
            "--cap-add",
            "SETGID",
            "--cap-add",
            "KILL",
            "--security-opt",
            "no-new-privileges",
            "--pids-limit",
            "512",
            "--hostname",
            "busybox",
        ];
        for m in &mounts {
            args.push("-v");
            args.push(m);
        }
        args.extend([
            image,
            "--socket",
            "/run/envgate/agent.sock",
            "--secret-file",
            "/run/envgate-secret/secret",
            "--stop-timeout-seconds",
            "5",
        ]);
        args.extend(agent_args);
        let out = docker(&args);
        assert!(
            out.status.success(),
            "docker run: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Container { name, dir }
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("sock/agent.sock")
    }

    async fn client(&self) -> AgentClient {
        // connect() waits for the socket of a container that is still starting.
        AgentClient::connect(&AgentAddress::Unix(self.socket()), SECRET)
            .await
            .unwrap_or_else(|e| panic!("connect: {e}; logs: {}", self.logs()))
    }

    fn logs(&self) -> String {
        let out = docker(&["logs", &self.name]);
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }

    fn inspect(&self, format: &str) -> String {
        let out = docker(&["inspect", "--format", format, &self.name]);
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = docker(&["rm", "-f", &self.name]);
    }
}

fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

fn sh(cmd: &str) -> SpawnRequest {
    SpawnRequest::new(Program::ShellCommand(cmd.into()))
}

#[tokio::test]
async fn runs_as_pid_1_and_spawns_sessions() {
    let c = Container::start();
    let client = c.client().await;
    let (out, err, status) = run(
        &client,
        sh("tr '\\0' ' ' < /proc/1/cmdline; echo; echo $$ $HOME $SHELL; id -u"),
    )
    .await;
    assert_eq!(status, ExitStatus::Code(0), "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert!(
        lines[0].starts_with("/.envgate/agent --socket"),
        "PID 1 is {:?}",
        lines[0]
    );
    let fields: Vec<&str> = lines[1].split(' ').collect();
    assert_ne!(fields[0], "1");
    assert_eq!(&fields[1..], ["/root", "/bin/sh"]);
    assert_eq!(lines[2], "0");

    // The user switch uses the image's own /etc/passwd (busybox has `nobody`).
    let mut req = sh("id -u; id -g; pwd");
    req.user = Some("nobody".into());
    req.program = Program::Argv(vec!["sh".into(), "-c".into(), "id -u; id -g; pwd".into()]);
    let (out, err, _) = run(&client, req).await;
    assert_eq!(out, "65534\n65534\n/\n", "{err}");

    // A pty works inside the container too.
    let mut req = sh("tty; stty size");
    req.pty = Some(PtyRequest {
        term: "xterm".into(),
        size: WindowSize {
            cols: 100,
            rows: 30,
            pixel_width: 0,
            pixel_height: 0,
        },
        modes: vec![],
    });
    let (out, _, status) = run(&client, req).await;
    assert_eq!(status, ExitStatus::Code(0));
    assert!(
        out.starts_with("/dev/pts/") && out.contains("30 100"),
        "{out:?}"
    );
}

fn as_alice(cmd: &str) -> SpawnRequest {
    let mut req = sh(cmd);
    req.account = Some(Account {
        name: "alice".into(),
        uid: 200_001,
        gid: 200_001,
        home: "/home/alice".into(),
    });
    req
}

#[tokio::test]
async fn sessions_run_as_their_own_account_with_their_home() {
    let c = Container::start();
    let client = c.client().await;
    // A fresh home volume is root's, perhaps with files from before accounts existed.
    let (_, err, status) = run(
        &client,
        sh("mkdir -p /home/alice/old && echo hi > /home/alice/old/notes"),
    )
    .await;
    assert_eq!(status, ExitStatus::Code(0), "{err}");

    let (out, err, status) = run(
        &client,
        as_alice("id; echo $HOME $USER; pwd; stat -c '%u:%g %n' ~ ~/old/notes; touch ~/new && echo wrote"),
    )
    .await;
    assert_eq!(status, ExitStatus::Code(0), "{err}");
    assert_eq!(
        out,
        "uid=200001(alice) gid=200001(alice) groups=200001(alice)\n\
         /home/alice alice\n\
         /home/alice\n\
         200001:200001 /home/alice\n\
         200001:200001 /home/alice/old/notes\n\
         wrote\n"
    );

    // The user is no one else: root's files stay root's, and root's home is closed.
    let (out, _, status) = run(&client, as_alice("touch /etc/passwd; cat /root/x")).await;
    assert_ne!(status, ExitStatus::Code(0));
    assert_eq!(out, "");

    // Later sessions find one entry, not one per session.
    let (out, _, _) = run(
        &client,
        as_alice("grep -c '^alice:' /etc/passwd /etc/group"),
    )
    .await;
    assert_eq!(out, "/etc/passwd:1\n/etc/group:1\n");

    // The agent never creates a second root, or an entry that breaks the file's format.
    for (name, uid) in [("alice", 0), ("ev:il", 200_002), ("ev\nil", 200_003)] {
        let mut req = sh("id");
        req.account = Some(Account {
            name: name.into(),
            uid,
            gid: uid,
            home: "/home/x".into(),
        });
        let err = match client.spawn(req).await {
            Ok(_) => panic!("the account {name:?} uid {uid} was accepted"),
            Err(e) => e.to_string(),
        };
        assert!(err.contains("refusing the account"), "{err}");
    }
}

#[tokio::test]
async fn orphans_are_reaped_by_pid_1() {
    let c = Container::start();
    let client = c.client().await;
    // Each `( … &)` leaves a sleep whose parent exits at once: the kernel re-parents it to
    // PID 1, and when it ends only PID 1 can reap it.
    let (_, err, status) = run(
        &client,
        sh("for i in 1 2 3 4 5 6 7 8; do (sleep 0.3 >/dev/null 2>&1 &); done; sh -c 'sleep 0.2 & exit 0'; exit 0"),
    )
    .await;
    assert_eq!(status, ExitStatus::Code(0), "{err}");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (out, _, _) = run(&client, sh("ps -o pid,stat,comm")).await;
    assert!(
        !out.lines().skip(1).any(|l| l
            .split_whitespace()
            .nth(1)
            .is_some_and(|s| s.starts_with('Z'))),
        "zombies in the container:\n{out}"
    );
    let (out, _, _) = run(
        &client,
        sh("grep -l '^State:.*Z' /proc/[0-9]*/status; true"),
    )
    .await;
    assert_eq!(out, "", "zombie processes: {out}");
}

#[tokio::test]
async fn docker_stop_forwards_sigterm_and_ends_promptly() {
    let c = Container::start();
    let client = c.client().await;
    let p = client
        .spawn(SpawnRequest::new(Program::Argv(vec![
            "sleep".into(),
            "1000".into(),
        ])))
        .await
        .unwrap();
    let started = Instant::now();
    let name = c.name.clone();
    let stop = tokio::task::spawn_blocking(move || docker(&["stop", "-t", "10", &name]));
    let status = within(15, "the session to end on docker stop", p.wait())
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
    let out = stop.await.unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let elapsed = started.elapsed();
    // Without forwarding, PID 1 ignores SIGTERM and docker waits the full 10 s.
    assert!(
        elapsed < Duration::from_secs(5),
        "docker stop took {elapsed:?}; logs: {}",
        c.logs()
    );
    assert_eq!(
        c.inspect("{{.State.Running}} {{.State.ExitCode}}"),
        "false 0",
        "{}",
        c.logs()
    );
}

#[tokio::test]
async fn runs_in_debian_with_a_bash_login_shell() {
    let c = Container::start_image(DEBIAN);
    let client = c.client().await;
    let mut p = client
        .spawn(SpawnRequest {
            pty: Some(PtyRequest {
                term: "xterm-256color".into(),
                size: WindowSize {
                    cols: 120,
                    rows: 40,
                    pixel_width: 0,
                    pixel_height: 0,
                },
                modes: vec![],
            }),
            ..SpawnRequest::new(Program::LoginShell)
        })
        .await
        .unwrap();
    p.stdin
        .write_all(b"echo shell=$0 size=$(stty size) term=$TERM; exit 3\n")
        .await
        .unwrap();
    let out = String::from_utf8_lossy(&within(20, "bash session", p.stdout.read_to_vec()).await)
        .into_owned();
    assert!(
        out.contains("shell=-bash size=40 120 term=xterm-256color"),
        "{out:?}"
    );
    assert_eq!(p.wait().await.unwrap(), ExitStatus::Code(3));
}

/// Copies bytes both ways between a client and `upstream`, keeping a copy of everything
/// that crossed: what someone on the container network would see.
async fn tap(upstream: String) -> (String, std::sync::Arc<std::sync::Mutex<Vec<u8>>>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap().to_string();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let record = seen.clone();
    tokio::spawn(async move {
        let (client, _) = listener.accept().await.unwrap();
        let agent = tokio::net::TcpStream::connect(&upstream).await.unwrap();
        let (client_rd, client_wr) = client.into_split();
        let (agent_rd, agent_wr) = agent.into_split();
        let copy = |mut from: tokio::net::tcp::OwnedReadHalf,
                    mut to: tokio::net::tcp::OwnedWriteHalf,
                    seen: std::sync::Arc<std::sync::Mutex<Vec<u8>>>| async move {
            let mut buf = vec![0; 64 * 1024];
            while let Ok(n) = from.read(&mut buf).await {
                if n == 0 || to.write_all(&buf[..n]).await.is_err() {
                    break;
                }
                seen.lock().unwrap().extend_from_slice(&buf[..n]);
            }
            let _ = to.shutdown().await;
        };
        tokio::join!(
            copy(client_rd, agent_wr, record.clone()),
            copy(agent_rd, client_wr, record)
        );
    });
    (address, seen)
}

#[tokio::test]
async fn over_tcp_on_the_container_address_sessions_work_and_travel_sealed() {
    // As on Kubernetes: the agent listens on the container's own address and the proxy
    // dials it over the network, with no socket directory shared.
    let c = Container::start_with(IMAGE, &["--listen-tcp", "0.0.0.0:7022"]);
    let ip = c.inspect("{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}");
    assert!(!ip.is_empty(), "the container has no address");
    let (address, seen) = tap(format!("{ip}:7022")).await;
    let client = within(
        20,
        "connect over tcp",
        AgentClient::connect(&AgentAddress::Tcp(address), SECRET),
    )
    .await
    .unwrap_or_else(|e| panic!("connect: {e}; logs: {}", c.logs()));

    let (out, _, status) = run(&client, sh("echo visible-only-to-the-session; exit 7")).await;
    assert_eq!(
        (out.as_str(), status),
        ("visible-only-to-the-session\n", ExitStatus::Code(7))
    );
    // Stdin in and back out through `cat`, a few records' worth.
    let line = "the-secret-plan ".repeat(16 * 1024);
    let mut p = client
        .spawn(SpawnRequest::new(Program::Argv(vec!["cat".into()])))
        .await
        .unwrap();
    let echoed = within(30, "cat over tcp", async {
        let write = async {
            p.stdin.write_all(line.as_bytes()).await.unwrap();
            p.stdin.close().unwrap();
        };
        let ((), echoed) = tokio::join!(write, p.stdout.read_to_vec());
        echoed
    })
    .await;
    assert!(
        echoed == line.as_bytes(),
        "cat echoed {} bytes",
        echoed.len()
    );
    assert_eq!(
        within(10, "exit", p.wait()).await.unwrap(),
        ExitStatus::Code(0)
    );

    // Nothing of the session crossed the network readable: not the command, its output,
    // nor the data; only the handshake's magic is plaintext.
    let wire = seen.lock().unwrap().clone();
    assert!(wire.len() > line.len(), "the tap saw {} bytes", wire.len());
    for secret in [
        &b"visible-only-to-the-session"[..],
        b"the-secret-plan",
        b"echo ",
        SECRET,
    ] {
        assert!(
            !wire.windows(secret.len()).any(|w| w == secret),
            "{:?} crossed the network in plaintext",
            String::from_utf8_lossy(secret)
        );
    }
    assert!(wire.windows(8).any(|w| w == b"EGAGENT\n"));
}
