//! The real `envgate-controlplane` binary: clear exits on bad config or a dead etcd, and a
//! clean start (ready, serving) and SIGTERM shutdown against a real etcd and Docker.

mod common;

use std::time::Duration;

use common::binary::{Files, finish, free_port, terminate};
use envgate_controlplane::testkit::Etcd;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;

fn command(files: &Files, etcd: &str, grpc: u16, ops: u16) -> Command {
    let mut cmd = common::binary::command(files, etcd, grpc, ops);
    cmd.env("ENVGATE_INSTANCE", "bintest");
    cmd
}

async fn http_get(port: u16, path: &str) -> Option<String> {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut response = String::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_string(&mut response))
        .await
        .ok()?
        .ok()?;
    Some(response)
}

#[tokio::test]
async fn bad_config_exits_2_naming_the_flag() {
    let files = Files::new();
    let mut cmd = command(&files, "https://127.0.0.1:1", free_port(), free_port());
    cmd.env("ENVGATE_TOKEN_KEY", files.path("missing.key"));
    let out = finish(cmd.spawn().unwrap(), Duration::from_secs(10)).await;
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--token-key: cannot read"), "{stderr}");

    let mut cmd = command(&files, "https://127.0.0.1:1", free_port(), free_port());
    cmd.args(["--instance", "Not Valid"]);
    let out = finish(cmd.spawn().unwrap(), Duration::from_secs(10)).await;
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--instance: the instance name may contain only"),
        "{stderr}"
    );
}

/// A bad LDAP or webhook setting stops the binary at start with one line naming the flag,
/// before anything is bound or any login is tried.
#[tokio::test]
async fn bad_identity_source_flags_exit_2_naming_the_flag() {
    let files = Files::new();
    for (args, expected) in [
        (
            vec![
                "--ldap-url",
                "http://ldap.example",
                "--ldap-base-dn",
                "dc=x",
            ],
            "envgate-controlplane: --ldap-*: \"http://ldap.example\" is not ldap:// or ldaps://\n",
        ),
        (
            vec![
                "--ldap-url",
                "ldaps://ldap.example",
                "--ldap-starttls",
                "--ldap-base-dn",
                "dc=x",
            ],
            "envgate-controlplane: --ldap-*: StartTLS upgrades an ldap:// URL; ldaps:// is TLS already\n",
        ),
        (
            vec![
                "--ldap-url",
                "ldap://ldap.example",
                "--ldap-base-dn",
                "dc=x",
                "--ldap-user-filter",
                "(uid=alice)",
            ],
            "envgate-controlplane: --ldap-*: the user filter must contain {user}\n",
        ),
        (
            vec![
                "--auth-webhook-url",
                "http://hook.example/auth",
                "--auth-webhook-ca-file",
                "/etc/ssl/certs/ca-certificates.crt",
            ],
            "envgate-controlplane: --auth-webhook-url: \"http://hook.example/auth\" is not https:// (the requests carry passwords and decide logins)\n",
        ),
    ] {
        let mut cmd = command(&files, "https://127.0.0.1:1", free_port(), free_port());
        cmd.args(&args);
        let out = finish(cmd.spawn().unwrap(), Duration::from_secs(10)).await;
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert_eq!(String::from_utf8_lossy(&out.stderr), expected, "{args:?}");
    }
    let mut cmd = command(&files, "https://127.0.0.1:1", free_port(), free_port());
    cmd.args([
        "--ldap-url",
        "ldap://ldap.example",
        "--ldap-base-dn",
        "dc=x",
    ]);
    cmd.arg("--ldap-bind-password-file")
        .arg(files.path("missing.password"));
    let out = finish(cmd.spawn().unwrap(), Duration::from_secs(10)).await;
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.starts_with("envgate-controlplane: --ldap-bind-password-file: ")
            && stderr.lines().count() == 1,
        "{stderr}"
    );
}

/// The SSH user CA flags are checked at start, each refusal naming its flag and file.
#[tokio::test]
async fn bad_user_ca_flags_exit_2_naming_the_flag() {
    let files = Files::new();
    let public = files.write(
        "ca.pub",
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl ca\n",
    );
    let rsa = files.path("rsa_ca");
    let keygen = std::process::Command::new("ssh-keygen")
        .args(["-q", "-t", "rsa", "-b", "2048", "-N", "", "-f", &rsa])
        .status()
        .unwrap();
    assert!(keygen.success());
    let garbage = files.write("garbage", "ssh-ed25519 ???\n");
    let cases: [(Vec<&str>, String); 6] = [
        (
            vec!["--user-ca-key", &public],
            format!("--user-ca-key: {public}: not an OpenSSH private key"),
        ),
        (
            vec!["--user-ca-key", &rsa],
            format!(
                "--user-ca-key: {rsa}: the CA key must be ed25519 (ssh-keygen -t ed25519), not ssh-rsa"
            ),
        ),
        (
            vec!["--trusted-user-ca-keys", &garbage],
            format!("--trusted-user-ca-keys: {garbage}: line 1: not an OpenSSH public key"),
        ),
        (
            vec!["--user-cert-validity", "16x"],
            "--user-cert-validity: \"16x\": the unit must be s, m, h or d".to_owned(),
        ),
        (
            vec!["--certificate-creates-users"],
            "--certificate-creates-users needs --trusted-user-ca-keys".to_owned(),
        ),
        (
            vec![
                "--trusted-user-ca-keys",
                &public,
                "--certificate-user-groups",
                "x",
            ],
            "--certificate-user-groups is only used with --certificate-creates-users".to_owned(),
        ),
    ];
    for (args, expected) in cases {
        let mut cmd = command(&files, "https://127.0.0.1:1", free_port(), free_port());
        cmd.args(&args);
        let out = finish(cmd.spawn().unwrap(), Duration::from_secs(10)).await;
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.starts_with(&format!("envgate-controlplane: {expected}")),
            "{args:?}: {stderr}"
        );
    }
}

/// The hops that must be encrypted cannot be configured in the clear: a plaintext etcd URL
/// and a Docker engine over TCP stop the binary before it binds anything.
#[tokio::test]
async fn plaintext_etcd_and_docker_over_tcp_are_refused_at_start() {
    let files = Files::new();
    for (etcd, extra, expected) in [
        (
            "http://127.0.0.1:2379",
            vec![],
            "envgate-controlplane: --etcd: http://127.0.0.1:2379 is not https://; etcd holds every credential and is reached over TLS only\n",
        ),
        (
            "https://127.0.0.1:1",
            vec!["--docker-host", "tcp://127.0.0.1:2375"],
            "envgate-controlplane: --docker-host: tcp://127.0.0.1:2375 is not a unix:// socket; Docker over TCP is not supported (its API is root on the host)\n",
        ),
    ] {
        let mut cmd = command(&files, etcd, free_port(), free_port());
        cmd.args(extra);
        let out = finish(cmd.spawn().unwrap(), Duration::from_secs(10)).await;
        assert_eq!(out.status.code(), Some(2));
        assert_eq!(String::from_utf8_lossy(&out.stderr), expected);
    }
    // A TLS file that is not there is named, too.
    let mut cmd = command(&files, "https://127.0.0.1:1", free_port(), free_port());
    cmd.env("ENVGATE_TLS_CERT", files.path("missing.crt"));
    let out = finish(cmd.spawn().unwrap(), Duration::from_secs(10)).await;
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.starts_with(&format!(
            "envgate-controlplane: --tls-cert/--tls-key/--tls-client-ca: cannot read {}:",
            files.path("missing.crt")
        )),
        "{stderr}"
    );
}

/// `--runtime kubernetes` is named by `--help`, and its flags are checked before anything is
/// bound or any API server is called, each refusal one line naming the flag.
#[tokio::test]
async fn kube_runtime_flags_are_checked_at_start() {
    let files = Files::new();
    let help = std::process::Command::new(env!("CARGO_BIN_EXE_envgate-controlplane"))
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(
        help.contains("--runtime <RUNTIME>")
            && help.contains("[possible values: docker, kubernetes]"),
        "{help}"
    );
    std::fs::write(files.path("kubeconfig"), "clusters: [not: a kubeconfig").unwrap();
    let kubeconfig = files.path("kubeconfig");
    for (extra, expected) in [
        (
            vec!["--runtime", "kubernetes"],
            "envgate-controlplane: --kube-agent-image: required with --runtime kubernetes (an image with the static agent at /envgate-agent)\n".to_owned(),
        ),
        (
            vec!["--runtime", "kubernetes", "--kube-agent-image", "a", "--kube-namespace", "Users"],
            "envgate-controlplane: --kube-namespace: \"Users\" is not a namespace name (lowercase letters, digits and -)\n".to_owned(),
        ),
        (
            vec!["--runtime", "kubernetes", "--kube-agent-image", "a", "--kubeconfig", &kubeconfig],
            format!("envgate-controlplane: --kubeconfig: {kubeconfig}: "),
        ),
    ] {
        let mut cmd = command(&files, "https://127.0.0.1:1", free_port(), free_port());
        cmd.args(&extra);
        let out = finish(cmd.spawn().unwrap(), Duration::from_secs(10)).await;
        assert_eq!(out.status.code(), Some(2), "{extra:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.starts_with(&expected), "{extra:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
    }
    let mut cmd = command(&files, "https://127.0.0.1:1", free_port(), free_port());
    cmd.args(["--runtime", "podman"]);
    let out = finish(cmd.spawn().unwrap(), Duration::from_secs(10)).await;
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("invalid value 'podman' for '--runtime <RUNTIME>'"),
        "{stderr}"
    );
}

#[tokio::test]
async fn a_dead_etcd_is_a_clear_startup_error() {
    let files = Files::new();
    let dead = format!("https://127.0.0.1:{}", free_port());
    let mut cmd = command(&files, &dead, free_port(), free_port());
    let out = finish(cmd.spawn().unwrap(), Duration::from_secs(30)).await;
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("etcd is unavailable") && stderr.contains(&dead),
        "{stderr}"
    );
}

#[tokio::test]
async fn starts_ready_and_stops_cleanly_on_sigterm() {
    let etcd = Etcd::start().await.unwrap();
    let files = Files::for_etcd(&etcd);
    let (grpc, ops) = (free_port(), free_port());
    let child = command(&files, &etcd.endpoint(), grpc, ops)
        .spawn()
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        if http_get(ops, "/readyz")
            .await
            .is_some_and(|r| r.starts_with("HTTP/1.1 200"))
        {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "never became ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(http_get(ops, "/healthz").await.unwrap().contains("ok"));
    assert!(
        tokio::net::TcpStream::connect(("127.0.0.1", grpc))
            .await
            .is_ok(),
        "gRPC port open"
    );

    terminate(child).await;
}
