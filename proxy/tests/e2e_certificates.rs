//! End to end: envgate as an SSH certificate authority. Users get certificates over plain ssh
//! (`ssh demo+envgate@host cert < key.pub`), `ssh-keygen -L` shows what was issued, and the
//! real OpenSSH client logs in with a certificate alone; certificates from an external CA
//! (`ssh-keygen -s`) are accepted when the operator trusts it. Each refusal (foreign CA,
//! expired, wrong principal, revoked key id, unknown or disabled user) is checked for the
//! reason in the control plane's audit record or, where russh refuses first, the proxy's log.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

use envgate_proto::admin::v1 as admin;
use support::{Fleet, FleetOptions, SshOutput, run, with_options};

fn keygen(path: &Path, args: &[&str]) {
    let out = Command::new("ssh-keygen")
        .args(["-q", "-N", "", "-C", "e2e", "-f"])
        .arg(path)
        .args(args)
        .output()
        .expect("ssh-keygen runs");
    assert!(out.status.success(), "ssh-keygen {args:?}: {out:?}");
}

fn ed25519(dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(name);
    keygen(&path, &["-t", "ed25519"]);
    path
}

fn public(key: &Path) -> String {
    std::fs::read_to_string(format!("{}.pub", key.display())).unwrap()
}

/// `ssh-keygen -s CA -I ID -n PRINCIPALS [-V VALIDITY] [-O OPTION] KEY.pub`, as an external CA
/// (step-ca, Vault) would sign; returns the certificate's path.
fn sign(ca: &Path, key: &Path, id: &str, principals: &str, extra: &[&str]) -> PathBuf {
    let out = Command::new("ssh-keygen")
        .args(["-q", "-s"])
        .arg(ca)
        .args(["-I", id, "-n", principals])
        .args(extra)
        .arg(format!("{}.pub", key.display()))
        .output()
        .expect("ssh-keygen -s runs");
    assert!(out.status.success(), "ssh-keygen -s: {out:?}");
    PathBuf::from(format!("{}-cert.pub", key.display()))
}

/// `ssh-keygen -L -f CERT`.
fn describe(cert: &Path) -> String {
    let out = Command::new("ssh-keygen")
        .args(["-L", "-f"])
        .arg(cert)
        .output()
        .expect("ssh-keygen -L runs");
    assert!(out.status.success(), "ssh-keygen -L: {out:?}");
    String::from_utf8(out.stdout).unwrap()
}

/// `ssh-keygen -l -f KEY.pub`: `256 SHA256:… comment (ED25519)`.
fn fingerprint(key: &Path) -> String {
    let out = Command::new("ssh-keygen")
        .args(["-l", "-f"])
        .arg(format!("{}.pub", key.display()))
        .output()
        .expect("ssh-keygen -l runs");
    String::from_utf8(out.stdout)
        .unwrap()
        .split_whitespace()
        .nth(1)
        .unwrap()
        .to_owned()
}

/// Logs in as `login` with `key` and `cert` only (the key itself is nobody's authorized key).
async fn ssh_with_cert(fleet: &Fleet, login: &str, key: &Path, cert: &Path) -> SshOutput {
    let option = format!("CertificateFile={}", cert.display());
    fleet
        .ssh_with_options(login, key, &[&option], "echo in", None)
        .await
}

fn assert_denied(out: &SshOutput) {
    assert_eq!(out.code, Some(255), "{out:#?}");
    assert!(out.stderr.contains("Permission denied"), "{out:#?}");
}

/// The control plane's credential record of the certificate login with `key_id`.
fn credential(fleet: &Fleet, key_id: &str) -> serde_json::Value {
    let records = fleet.audit_records();
    records
        .iter()
        .rev()
        .find(|r| r["event"] == "credential" && r["key_id"] == key_id)
        .cloned()
        .unwrap_or_else(|| panic!("no credential record for {key_id:?}: {records:#?}"))
}

fn assert_refused(fleet: &Fleet, out: &SshOutput, key_id: &str, reason: &str) {
    assert_denied(out);
    let record = credential(fleet, key_id);
    assert_eq!(record["outcome"], "failure", "{record}");
    assert_eq!(record["method"], "certificate", "{record}");
    assert_eq!(record["reason"], reason, "{record}");
    assert!(record["serial"].is_u64(), "{record}");
    assert!(
        fleet.full_logs().contains(&format!("reason={reason}")),
        "the control plane logs the refusal: {}",
        fleet.logs()
    );
}

struct Cas {
    dir: tempfile::TempDir,
    new: PathBuf,
    old: PathBuf,
    external: PathBuf,
    foreign: PathBuf,
}

fn cas() -> Cas {
    let dir = tempfile::tempdir().unwrap();
    let new = ed25519(dir.path(), "ca_new");
    let old = ed25519(dir.path(), "ca_old");
    let external = ed25519(dir.path(), "ca_external");
    let foreign = ed25519(dir.path(), "ca_foreign");
    Cas {
        dir,
        new,
        old,
        external,
        foreign,
    }
}

/// envgate signs with `new`, still trusts `old` (a rotation under way) and the operator's
/// external CA; users an external certificate names are created in `students`.
async fn fleet_with(cas: &Cas) -> Fleet {
    let trusted = cas.dir.path().join("trusted_user_ca_keys");
    std::fs::write(&trusted, public(&cas.external)).unwrap();
    Fleet::start_with(FleetOptions {
        proxies: 1,
        controlplane_args: vec![
            "--user-ca-key".into(),
            format!("{},{}", cas.new.display(), cas.old.display()),
            "--trusted-user-ca-keys".into(),
            trusted.display().to_string(),
            "--certificate-creates-users".into(),
            "--certificate-user-groups".into(),
            "students".into(),
        ],
        ..FleetOptions::default()
    })
    .await
}

/// `ssh demo+envgate@… cert < KEY.pub > KEY-issued.pub` (not `KEY-cert.pub`, which ssh would
/// pick up by itself); returns the certificate's path.
async fn issue(fleet: &Fleet, key: &Path) -> PathBuf {
    let out = fleet
        .ssh("demo+envgate", "cert", Some(public(key).as_bytes()))
        .await;
    out.assert_success();
    let cert = PathBuf::from(format!("{}-issued.pub", key.display()));
    std::fs::write(&cert, &out.stdout).unwrap();
    cert
}

fn key_id_of(description: &str) -> String {
    let line = description
        .lines()
        .find_map(|l| l.trim().strip_prefix("Key ID: "))
        .unwrap_or_else(|| panic!("no Key ID in {description}"));
    line.trim_matches('"').to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_issued_over_ssh_is_what_ssh_keygen_shows_and_logs_in_alone() {
    let cas = cas();
    let fleet = fleet_with(&cas).await;
    let keys = tempfile::tempdir().unwrap();
    let laptop = ed25519(keys.path(), "laptop");

    let cert = issue(&fleet, &laptop).await;
    let text = describe(&cert);
    assert!(
        text.contains("Type: ssh-ed25519-cert-v01@openssh.com user certificate"),
        "{text}"
    );
    assert!(
        text.contains(&format!("Signing CA: ED25519 {}", fingerprint(&cas.new))),
        "the first --user-ca-key signs: {text}"
    );
    let key_id = key_id_of(&text);
    assert!(key_id.starts_with("demo@envgate serial "), "{text}");
    let serial: u64 = key_id.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(text.contains(&format!("Serial: {serial}")), "{text}");
    let principals: Vec<&str> = text
        .lines()
        .skip_while(|l| !l.contains("Principals:"))
        .skip(1)
        .take_while(|l| !l.contains("Critical Options:"))
        .map(str::trim)
        .collect();
    assert_eq!(principals, ["demo"], "{text}");
    assert!(text.contains("Critical Options: (none)"), "{text}");
    let extensions: Vec<&str> = text
        .lines()
        .skip_while(|l| !l.contains("Extensions:"))
        .skip(1)
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    assert_eq!(
        extensions,
        [
            "permit-agent-forwarding",
            "permit-port-forwarding",
            "permit-pty"
        ],
        "{text}"
    );
    // Valid: from 2026-12-05T19:00:00 to 2026-12-06T11:01:00 — 16 h and the minute of
    // backdating.
    let valid = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Valid: from "))
        .unwrap_or_else(|| panic!("{text}"));
    let (from, to) = valid.split_once(" to ").unwrap();
    let seconds = |t: &str| {
        let out = Command::new("date")
            .args(["-d", t, "+%s"])
            .output()
            .unwrap();
        String::from_utf8(out.stdout)
            .unwrap()
            .trim()
            .parse::<i64>()
            .unwrap()
    };
    assert_eq!(seconds(to) - seconds(from), 16 * 3600 + 60, "{text}");
    let issued = fleet
        .audit_records()
        .into_iter()
        .find(|r| r["event"] == "certificate_issued")
        .expect("the issue is audited");
    assert_eq!(issued["user"], "demo");
    assert_eq!(issued["key_id"], key_id.as_str());
    assert_eq!(issued["serial"], serial);
    assert_eq!(issued["key_fingerprint"], fingerprint(&laptop).as_str());
    assert_eq!(issued["ca_fingerprint"], fingerprint(&cas.new).as_str());

    // The laptop key is in nobody's authorized_keys: the certificate alone logs in.
    let out = ssh_with_cert(&fleet, "demo", &laptop, &cert).await;
    out.assert_success();
    assert_eq!(out.stdout, "in\n");
    let record = credential(&fleet, &key_id);
    assert_eq!(record["outcome"], "success", "{record}");
    assert_eq!(record["serial"], serial);
    assert_eq!(record["key_fingerprint"], fingerprint(&laptop).as_str());
    // The key without its certificate is still nobody's: the proxy lets the client sign (it
    // might have been a certificate's) and refuses it itself, so the control plane checks no
    // credential and counts no failure.
    let checks = |fleet: &Fleet| {
        fleet
            .audit_records()
            .iter()
            .filter(|r| r["event"] == "credential")
            .count()
    };
    let before = checks(&fleet);
    assert_denied(&fleet.ssh_with_key("demo", &laptop, "echo in", None).await);
    assert_eq!(checks(&fleet), before);
    // The proxy records the refusal when the connection ends.
    let laptop_fingerprint = fingerprint(&laptop);
    support::eventually(
        std::time::Duration::from_secs(5),
        "the proxy's login failure",
        || async {
            let records = fleet.audit_records();
            records
                .iter()
                .any(|r| {
                    r["event"] == "login"
                        && r["outcome"] == "failure"
                        && r["reason"] == "no offered key is authorized"
                        && r["key_fingerprint"] == laptop_fingerprint.as_str()
                })
                .then_some(())
                .ok_or_else(|| format!("{records:#?}"))
        },
    )
    .await;

    // `ca` prints every trusted CA key, envgate's signing key first.
    let out = fleet.ssh("demo+envgate", "ca", None).await;
    out.assert_success();
    let lines: Vec<&str> = out.stdout.lines().collect();
    let key_part = |key: &Path| {
        let text = public(key);
        let mut words = text.split_whitespace();
        format!("{} {}", words.next().unwrap(), words.next().unwrap())
    };
    assert_eq!(lines.len(), 3, "{out:#?}");
    for (line, ca) in lines.iter().zip([&cas.new, &cas.old, &cas.external]) {
        assert!(
            line.starts_with(&key_part(ca)),
            "{line} vs {}",
            key_part(ca)
        );
    }
    // The admin API lists the same keys; the first signs.
    let listed = fleet
        .grpcurl(
            Some(&fleet.bearer_header()),
            "",
            "envgate.admin.v1.Admin/ListCertificateAuthorities",
        )
        .await;
    listed.assert_success();
    let listed: serde_json::Value = serde_json::from_str(&listed.stdout).unwrap();
    let authorities = listed["authorities"].as_array().unwrap();
    assert_eq!(authorities.len(), 3, "{listed}");
    assert_eq!(
        authorities[0]["fingerprint"],
        fingerprint(&cas.new).as_str()
    );
    assert_eq!(authorities[0]["signing"], true);
    assert_eq!(
        authorities[1]["fingerprint"],
        fingerprint(&cas.old).as_str()
    );
    assert_eq!(authorities[2]["origin"], "external");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn external_and_old_cas_log_in_and_every_refusal_says_why() {
    let cas = cas();
    let fleet = fleet_with(&cas).await;
    let keys = tempfile::tempdir().unwrap();
    let key = |name: &str| ed25519(keys.path(), name);

    // The operator's external CA (ssh-keygen -s, as step-ca or Vault would sign).
    let k = key("ext");
    let cert = sign(
        &cas.external,
        &k,
        "vault-demo-1",
        "demo",
        &["-V", "-5m:+1h"],
    );
    ssh_with_cert(&fleet, "demo", &k, &cert)
        .await
        .assert_success();
    assert_eq!(credential(&fleet, "vault-demo-1")["outcome"], "success");

    // Rotation: a certificate from the old key, still trusted second, logs in.
    let k = key("old");
    let cert = sign(&cas.old, &k, "demo@envgate serial 1", "demo", &[]);
    ssh_with_cert(&fleet, "demo", &k, &cert)
        .await
        .assert_success();

    // A CA nobody configured; somebody else's certificate; a critical option envgate does not
    // enforce; a source address the client is not at.
    let refusals: [(&Path, &str, &str, &[&str], &str); 4] = [
        (
            &cas.foreign,
            "foreign-1",
            "demo",
            &[],
            "certificate not signed by a trusted CA",
        ),
        (
            &cas.external,
            "wrong-principal-1",
            "root,admin",
            &[],
            "principal not in certificate",
        ),
        (
            &cas.external,
            "forced-1",
            "demo",
            &["-O", "force-command=/bin/true"],
            "certificate critical option \"force-command\" not supported",
        ),
        (
            &cas.external,
            "elsewhere-1",
            "demo",
            &["-O", "source-address=192.0.2.0/24"],
            "client address not allowed by the certificate's source-address",
        ),
    ];
    for (ca, id, principals, extra, reason) in refusals {
        let k = key(id);
        let cert = sign(ca, &k, id, principals, extra);
        let out = ssh_with_cert(&fleet, "demo", &k, &cert).await;
        assert_refused(&fleet, &out, id, reason);
    }
    let k = key("here");
    let cert = sign(
        &cas.external,
        &k,
        "here-1",
        "demo",
        &["-O", "source-address=127.0.0.0/8"],
    );
    ssh_with_cert(&fleet, "demo", &k, &cert)
        .await
        .assert_success();

    // Extensions are enforced as sshd does: without permit-pty no terminal, without
    // permit-port-forwarding no -W (the user sees why).
    let terminal = async |key: &Path, cert: &Path| {
        let option = format!("CertificateFile={}", cert.display());
        let mut argv = with_options(fleet.ssh_key_argv("demo", key), &["-tt", "-o", &option]);
        argv.push("test -t 0 && echo tty || echo notty".into());
        run(&argv, None, &[]).await
    };
    let k = key("bare");
    let bare = sign(&cas.external, &k, "bare-1", "demo", &["-O", "clear"]);
    // ssh -tt gives up when the terminal is refused, as it does with sshd.
    let out = terminal(&k, &bare).await;
    assert_eq!((out.code, out.stdout.as_str()), (Some(255), ""), "{out:#?}");
    assert!(
        out.stderr.contains("PTY allocation request failed"),
        "{out:#?}"
    );
    let option = format!("CertificateFile={}", bare.display());
    let argv = with_options(
        fleet.ssh_key_argv("demo", &k),
        &["-o", &option, "-o", "LogLevel=INFO", "-W", "127.0.0.1:8080"],
    );
    let out = run(&argv, Some(b""), &[]).await;
    assert_eq!(out.code, Some(255), "{out:#?}");
    assert!(
        out.stderr
            .contains("port forwarding is not permitted by your certificate"),
        "{out:#?}"
    );
    // Without permit-agent-forwarding, `ssh -A` gives the session no agent socket.
    let agent = fleet.ssh_agent(std::slice::from_ref(&k)).await;
    let mut argv = with_options(fleet.ssh_agent_argv("demo", &agent.socket), &["-A"]);
    argv.push("echo \"${SSH_AUTH_SOCK-none}\"".into());
    let out = run(&argv, None, &[]).await;
    assert_eq!(out.stdout, "none\n", "{out:#?}");
    assert!(
        fleet
            .full_logs()
            .contains("extension=\"permit-agent-forwarding\""),
        "{}",
        fleet.logs()
    );
    let k = key("pty");
    let pty = sign(
        &cas.external,
        &k,
        "pty-1",
        "demo",
        &["-O", "clear", "-O", "permit-pty"],
    );
    let out = terminal(&k, &pty).await;
    assert_eq!(out.stdout.trim(), "tty", "{out:#?}");

    // Expired: russh refuses it before anyone is asked and logs why.
    let k = key("expired");
    let cert = sign(
        &cas.new,
        &k,
        "expired-1",
        "demo",
        &["-V", "20200101:20200102"],
    );
    let out = ssh_with_cert(&fleet, "demo", &k, &cert).await;
    assert_denied(&out);
    assert!(
        fleet
            .full_logs()
            .contains("Certificate is expired or not yet valid"),
        "{}",
        fleet.logs()
    );
    // A proxy whose clock lags (or lies) forwards it anyway: the control plane refuses it.
    let bytes = std::fs::read_to_string(&cert).unwrap();
    let wire = russh::keys::Certificate::from_openssh(bytes.trim())
        .unwrap()
        .to_bytes()
        .unwrap();
    let refused = fleet
        .proxy_client(&fleet.proxy_id(0))
        .authenticate(
            "demo",
            &envgate_proxy::controlplane::Offered::Certificate(wire),
            "127.0.0.1:1",
            "c",
        )
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated);
    assert_eq!(refused.message(), "authentication failed");
    assert_eq!(
        credential(&fleet, "expired-1")["reason"],
        "certificate expired"
    );

    // envgate's own certificates name only users it has; an external one may create one.
    let k = key("ghost");
    let cert = sign(&cas.new, &k, "ghost-1", "ghost", &[]);
    let out = ssh_with_cert(&fleet, "ghost", &k, &cert).await;
    assert_refused(&fleet, &out, "ghost-1", "unknown user");
    let k = key("newbie");
    let cert = sign(&cas.external, &k, "newbie-1", "newbie", &[]);
    ssh_with_cert(&fleet, "newbie", &k, &cert)
        .await
        .assert_success();
    let records = fleet.etcd_records("users/newbie").await.unwrap();
    let user: serde_json::Value = serde_json::from_str(&records[0].1).unwrap();
    assert_eq!(user["source"], "certificate", "{user}");
    assert_eq!(user["groups"], serde_json::json!(["students"]), "{user}");

    // Revoked by key id through the admin API: refused from then on.
    let k = key("revoked");
    let cert = issue(&fleet, &k).await;
    let key_id = key_id_of(&describe(&cert));
    ssh_with_cert(&fleet, "demo", &k, &cert)
        .await
        .assert_success();
    let body = serde_json::json!({"keyId": key_id, "reason": "laptop lost"}).to_string();
    let out = fleet
        .grpcurl(
            Some(&fleet.bearer_header()),
            &body,
            "envgate.admin.v1.Admin/RevokeCertificate",
        )
        .await;
    out.assert_success();
    let out = ssh_with_cert(&fleet, "demo", &k, &cert).await;
    assert_refused(&fleet, &out, &key_id, "certificate key id revoked");
    let out = fleet
        .grpcurl(
            Some(&fleet.bearer_header()),
            "",
            "envgate.admin.v1.Admin/ListCertificateRevocations",
        )
        .await;
    out.assert_success();
    let listed: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(
        listed["revocations"][0]["keyId"],
        key_id.as_str(),
        "{listed}"
    );
    assert_eq!(listed["revocations"][0]["reason"], "laptop lost");
    assert_eq!(listed["revocations"][0]["revokedBy"], support::ADMIN_NAME);

    // A disabled user is refused whatever certificate they hold.
    let k = key("disabled");
    let cert = issue(&fleet, &k).await;
    let key_id = key_id_of(&describe(&cert));
    let mut client = fleet.admin_client().await.unwrap();
    let mut demo = client
        .get_user(fleet.authorized(admin::GetUserRequest {
            name: "demo".into(),
        }))
        .await
        .unwrap()
        .into_inner();
    demo.disabled = true;
    client
        .put_user(fleet.authorized(admin::PutUserRequest {
            user: Some(demo),
            ..Default::default()
        }))
        .await
        .unwrap();
    let out = ssh_with_cert(&fleet, "demo", &k, &cert).await;
    assert_refused(&fleet, &out, &key_id, "user disabled");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cert_refuses_bad_keys_in_one_line_and_without_a_ca_key_says_so() {
    let cas = cas();
    let fleet = fleet_with(&cas).await;
    let keys = tempfile::tempdir().unwrap();
    let weak = keys.path().join("weak");
    keygen(&weak, &["-t", "rsa", "-b", "1024"]);
    let cert = |input: Vec<u8>| {
        let fleet = &fleet;
        async move { fleet.ssh("demo+envgate", "cert", Some(&input)).await }
    };
    let cases: [(Vec<u8>, &str); 4] = [
        (
            public(&weak).into_bytes(),
            "envgate: 1024-bit RSA keys are not certified; use an ed25519 key (ssh-keygen -t ed25519)",
        ),
        (
            b"hello\n".to_vec(),
            "envgate: expected one OpenSSH public key line on stdin (e.g. ~/.ssh/id_ed25519.pub)",
        ),
        (
            std::fs::read(&weak).unwrap(),
            "envgate: expected one OpenSSH public key line on stdin (e.g. ~/.ssh/id_ed25519.pub)",
        ),
        (
            vec![b'A'; 9000],
            "envgate: cert: stdin has more than 8192 bytes; give it one public key (cert < ~/.ssh/id_ed25519.pub)",
        ),
    ];
    for (input, line) in cases {
        let out = cert(input).await;
        assert_eq!(out.code, Some(1), "{out:#?}");
        assert_eq!(out.stdout, "", "{out:#?}");
        assert_eq!(out.stderr_lines(), [line], "{out:#?}");
    }
    let out = fleet.ssh("demo+envgate", "help", None).await;
    assert!(out.stdout.contains("cert < KEY.pub"), "{out:#?}");
    drop(fleet);

    // A fleet without --user-ca-key issues nothing, trusts no certificate, and plain keys
    // log in as before.
    let fleet = Fleet::start_with(FleetOptions {
        proxies: 1,
        ..FleetOptions::default()
    })
    .await;
    let k = ed25519(keys.path(), "plain");
    let out = fleet
        .ssh("demo+envgate", "cert", Some(public(&k).as_bytes()))
        .await;
    assert_eq!(out.code, Some(1), "{out:#?}");
    assert_eq!(
        out.stderr_lines(),
        ["envgate: this server issues no certificates (it has no --user-ca-key)"]
    );
    let cert = sign(&cas.new, &k, "nobody-trusts-1", "demo", &[]);
    let out = ssh_with_cert(&fleet, "demo", &k, &cert).await;
    assert_denied(&out);
    fleet.ssh("demo", "echo in", None).await.assert_success();
}
