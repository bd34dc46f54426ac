//! End to end: the trust boundary, played by an attacker. Whoever can reach the control
//! plane's port — with grpcurl, plaintext or TLS, with a foreign certificate, or with a real
//! proxy certificate of their own — gets no token, no session and no container, and cannot act
//! for another proxy. Credentials that change stop working at once, and everything that
//! happened is in the audit log.

mod support;

use std::time::Duration;

use envgate_controlplane::pki::{self, Authority, Profile};
use envgate_proto::admin::v1 as admin;
use envgate_proto::v1::fleet_client::FleetClient;
use envgate_proto::v1::sessions_client::SessionsClient;
use envgate_proto::v1::{CloseSessionRequest, ProxyMessage, Register, proxy_message};
use support::{ADMIN_NAME, Fleet, FleetOptions, SshOutput, eventually, run};
use tonic::Code;

/// What every proxy-facing call without a proxy certificate gets (grpcurl exits 64 + the
/// status code, 16 for UNAUTHENTICATED).
const NOT_A_PROXY: &str = "ERROR:\n  Code: Unauthenticated\n  Message: this service answers only envgate proxies: connect with a client certificate from the fleet CA\n";

/// The base64 of a public key file's key (what the attack in the issue sent).
fn public_key_base64(private_key: &std::path::Path) -> String {
    let line = std::fs::read_to_string(private_key.with_extension("pub"))
        .or_else(|_| std::fs::read_to_string(format!("{}.pub", private_key.display())))
        .expect("the public key file");
    line.split_whitespace().nth(1).expect("a key").to_owned()
}

/// `ssh-keygen -lf key.pub`'s fingerprint (`SHA256:…`).
async fn fingerprint(private_key: &std::path::Path) -> String {
    let public = format!("{}.pub", private_key.display());
    let out = run(&["ssh-keygen".into(), "-lf".into(), public], None, &[]).await;
    out.stdout
        .split_whitespace()
        .nth(1)
        .expect("a fingerprint")
        .to_owned()
}

/// grpcurl as an attacker runs it: `flags`, then the body, the address and the method.
async fn grpcurl(fleet: &Fleet, flags: &[String], body: &str, method: &str) -> SshOutput {
    let mut argv = vec!["grpcurl".to_string(), "-max-time".into(), "10".into()];
    argv.extend(flags.iter().cloned());
    argv.extend(["-d".to_string(), body.to_string(), fleet.grpc_addr.clone()]);
    argv.push(method.to_string());
    run(&argv, None, &[]).await
}

fn ca_flags(fleet: &Fleet) -> Vec<String> {
    vec!["-cacert".into(), fleet.pki.ca_path().display().to_string()]
}

/// `ca_flags` and a client certificate.
fn cert_flags(fleet: &Fleet, cert: &std::path::Path, key: &std::path::Path) -> Vec<String> {
    let mut flags = ca_flags(fleet);
    flags.extend([
        "-cert".into(),
        cert.display().to_string(),
        "-key".into(),
        key.display().to_string(),
    ]);
    flags
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_proxy_certificate_the_control_plane_gives_nothing() {
    let mut fleet = Fleet::start_with(FleetOptions {
        proxies: 1,
        ..FleetOptions::default()
    })
    .await;
    // A real session of demo's, so there is a session id and a container to go after.
    let session = fleet
        .session_in_background("demo", "sleep 60", Duration::from_secs(30))
        .await;
    let records = fleet.user_sessions("demo").await.unwrap();
    let session_id = records[0]["id"].as_str().unwrap().to_owned();
    let containers_before = fleet.containers(None);
    assert_eq!(containers_before.len(), 1, "{containers_before:?}");

    let key = public_key_base64(&fleet.key_of("demo"));
    let authenticate =
        format!(r#"{{"username":"demo","publicKey":"{key}","clientAddress":"203.0.113.5:4000"}}"#);
    // The attack of the issue, word for word: plaintext gets no answer at all.
    let plaintext = grpcurl(
        &fleet,
        &["-plaintext".into()],
        &authenticate,
        "envgate.v1.Auth/Authenticate",
    )
    .await;
    assert_ne!(plaintext.code, Some(0), "{plaintext:#?}");
    assert_eq!(plaintext.stdout, "", "no token: {plaintext:#?}");
    assert!(
        plaintext.stderr.starts_with("Failed to dial target host"),
        "{plaintext:#?}"
    );

    // TLS without a client certificate: refused by name, for every proxy-facing call.
    for (method, body) in [
        ("envgate.v1.Auth/Authenticate", authenticate.clone()),
        (
            "envgate.v1.Auth/CheckPublicKey",
            format!(r#"{{"username":"demo","publicKey":"{key}"}}"#),
        ),
        (
            "envgate.v1.Sessions/OpenSession",
            r#"{"token":"x","environment":"busybox"}"#.to_owned(),
        ),
        (
            "envgate.v1.Sessions/CloseSession",
            format!(r#"{{"sessionId":"{session_id}","containerUnreachable":true}}"#),
        ),
        (
            "envgate.v1.SelfService/Status",
            r#"{"token":"x"}"#.to_owned(),
        ),
    ] {
        let out = grpcurl(&fleet, &ca_flags(&fleet), &body, method).await;
        assert_eq!(
            (out.code, out.stdout.as_str(), out.stderr.as_str()),
            (Some(64 + 16), "", NOT_A_PROXY),
            "{method}: {out:#?}"
        );
    }
    let mut attach = FleetClient::new(fleet.pki.anonymous_channel(&fleet.grpc_addr).await);
    let register = ProxyMessage {
        message: Some(proxy_message::Message::Register(Register::default())),
    };
    let status = attach
        .attach(tokio_stream::iter([register]))
        .await
        .expect_err("no Fleet stream without a certificate");
    assert_eq!(status.code(), Code::Unauthenticated);

    // A client certificate from another CA, and the control plane's own server certificate
    // presented as a client's: the TLS handshake fails, nothing is answered.
    let elsewhere = tempfile::tempdir().unwrap();
    let foreign = Authority::ensure(elsewhere.path(), "fleet").unwrap();
    foreign
        .issue(
            elsewhere.path(),
            "proxy",
            &Profile::Proxy {
                id: fleet.proxy_id(0),
            },
        )
        .unwrap();
    let (foreign_cert, foreign_key) = pki::paths(elsewhere.path(), "proxy");
    let (server_cert, server_key, _) = fleet.pki.server_files();
    for (cert, key) in [(foreign_cert, foreign_key), (server_cert, server_key)] {
        let mut flags = ca_flags(&fleet);
        flags.extend([
            "-cert".into(),
            cert.display().to_string(),
            "-key".into(),
            key.display().to_string(),
        ]);
        let out = grpcurl(
            &fleet,
            &flags,
            &authenticate,
            "envgate.v1.Auth/Authenticate",
        )
        .await;
        assert_ne!(out.code, Some(0), "{cert:?}: {out:#?}");
        assert_eq!(out.stdout, "", "{cert:?}: no token: {out:#?}");
        assert!(
            !out.stderr.contains("Code: Unauthenticated"),
            "{cert:?}: refused before any service answered: {out:#?}"
        );
    }

    // Nothing happened: the session runs on, the container is there, no token was issued.
    assert_eq!(fleet.containers(None), containers_before);
    assert_eq!(fleet.user_sessions("demo").await.unwrap().len(), 1);
    assert!(
        !fleet
            .audit_records()
            .iter()
            .any(|r| r["event"] == "credential" && r["client"] == "203.0.113.5:4000"),
        "no credential was checked for the attacker"
    );
    assert!(
        fleet
            .logs()
            .contains("refused a call without a client certificate"),
        "the refusals are logged"
    );
    fleet.kill_proxy(0);
    let _ = session.await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_certificate_acts_only_for_its_own_proxy() {
    let mut fleet = Fleet::start_with(FleetOptions {
        proxies: 1,
        ..FleetOptions::default()
    })
    .await;
    let session = fleet
        .session_in_background("demo", "echo started; sleep 60", Duration::from_secs(30))
        .await;
    let records = fleet.user_sessions("demo").await.unwrap();
    let session_id = records[0]["id"].as_str().unwrap().to_owned();
    let owner = fleet.proxy_id(0);
    let proxy_record = |records: Vec<(String, String)>, id: &str| {
        records
            .into_iter()
            .find(|(k, _)| k == &format!("proxies/{id}"))
            .map(|(_, v)| serde_json::from_str::<serde_json::Value>(&v).unwrap())
    };
    let owner_before = proxy_record(fleet.etcd_records("proxies/").await.unwrap(), &owner)
        .expect("the real proxy is registered");

    // A genuine proxy certificate, but of another proxy: it may not close demo's session,
    // nor have the container replaced.
    let intruder = fleet.pki.proxy_channel(&fleet.grpc_addr, "intruder").await;
    let status = SessionsClient::new(intruder.clone())
        .close_session(CloseSessionRequest {
            session_id: session_id.clone(),
            exit_status: 0,
            container_unreachable: true,
        })
        .await
        .expect_err("another proxy's session");
    assert_eq!(status.code(), Code::PermissionDenied);
    assert_eq!(
        status.message(),
        format!(
            "session {session_id} was opened through proxy {owner}; only that proxy may close it"
        )
    );

    // Attaching registers the intruder as itself; the real proxy's record and lease stay.
    let (to_plane, outbound) = tokio::sync::mpsc::channel(4);
    to_plane
        .send(ProxyMessage {
            message: Some(proxy_message::Message::Register(Register {
                address: "127.0.0.1:1".into(),
                incarnation: "intruder".into(),
                ..Register::default()
            })),
        })
        .await
        .unwrap();
    let _stream = FleetClient::new(intruder)
        .attach(tokio_stream::wrappers::ReceiverStream::new(outbound))
        .await
        .expect("a proxy may attach as itself");
    eventually(Duration::from_secs(10), "the intruder's record", || async {
        proxy_record(fleet.etcd_records("proxies/").await?, "intruder")
            .map(|_| ())
            .ok_or_else(|| "not yet".to_string())
    })
    .await;
    let owner_after = proxy_record(fleet.etcd_records("proxies/").await.unwrap(), &owner).unwrap();
    assert_eq!(owner_after["lease_id"], owner_before["lease_id"]);
    assert_eq!(owner_after["incarnation"], owner_before["incarnation"]);

    // A fleet-CA client certificate that names no proxy (say, a stolen etcd-style client
    // certificate issued by the wrong CA by mistake) is refused by name.
    let ca = Authority::ensure(fleet.pki.dir(), "fleet").unwrap();
    ca.issue(
        fleet.pki.dir(),
        "not-a-proxy",
        &Profile::Client {
            common_name: "not-a-proxy".into(),
        },
    )
    .unwrap();
    let (cert, key) = pki::paths(fleet.pki.dir(), "not-a-proxy");
    let flags = cert_flags(&fleet, &cert, &key);
    let out = grpcurl(
        &fleet,
        &flags,
        r#"{"username":"demo","password":"x"}"#,
        "envgate.v1.Auth/Authenticate",
    )
    .await;
    assert_eq!(
        out.stderr,
        "ERROR:\n  Code: PermissionDenied\n  Message: the client certificate is not an envgate proxy's: the certificate names no envgate proxy (a URI SAN spiffe://envgate/proxy/<id>)\n",
        "{out:#?}"
    );

    // The session was never touched: it is still running, in its container.
    assert_eq!(fleet.user_sessions("demo").await.unwrap().len(), 1);
    assert_eq!(fleet.containers(None).len(), 1);
    fleet.kill_proxy(0);
    let out = session.await.unwrap();
    assert_eq!(out.stdout, "started\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_key_or_changed_password_stops_working_within_seconds() {
    let fleet = Fleet::start_with(FleetOptions {
        proxies: 1,
        ..FleetOptions::default()
    })
    .await;
    let first = fleet
        .add_user("alice", "busybox", Some("old password"))
        .await;
    let second = fleet.stranger_key();
    let keys = |paths: &[&std::path::Path]| -> Vec<String> {
        paths
            .iter()
            .map(|p| {
                std::fs::read_to_string(format!("{}.pub", p.display()))
                    .unwrap()
                    .trim()
                    .to_owned()
            })
            .collect()
    };
    let put_user = |authorized_keys: Vec<String>, password: &str| {
        let request = admin::PutUserRequest {
            user: Some(admin::User {
                name: "alice".into(),
                authorized_keys,
                groups: vec!["users".into()],
                default_environment: "busybox".into(),
                ..Default::default()
            }),
            password: password.into(),
            ..Default::default()
        };
        let fleet = &fleet;
        async move {
            fleet
                .admin_client()
                .await
                .unwrap()
                .put_user(fleet.authorized(request))
                .await
                .unwrap();
        }
    };
    put_user(keys(&[&first, &second]), "").await;
    // Both keys and the password work, and the proxy now caches a token for each.
    for key in [&first, &second] {
        fleet
            .ssh_with_key("alice", key, "true", None)
            .await
            .assert_success();
    }
    fleet
        .ssh_password("alice", "old password", "true")
        .await
        .assert_success();

    // The first key is removed: within seconds it is refused, the other still works.
    put_user(keys(&[&second]), "").await;
    eventually(
        Duration::from_secs(10),
        "the removed key refused",
        || async {
            let out = fleet.ssh_with_key("alice", &first, "true", None).await;
            if out.code == Some(255) && out.stderr.contains("Permission denied (publickey") {
                Ok(())
            } else {
                Err(format!("{out:?}"))
            }
        },
    )
    .await;
    fleet
        .ssh_with_key("alice", &second, "echo still", None)
        .await
        .assert_success();

    // A new password: the old one is refused at once, the new one works.
    put_user(keys(&[&second]), "new password").await;
    eventually(
        Duration::from_secs(10),
        "the old password refused",
        || async {
            let out = fleet.ssh_password("alice", "old password", "true").await;
            if out.code == Some(255) && out.stderr.contains("Permission denied") {
                Ok(())
            } else {
                Err(format!("{out:?}"))
            }
        },
    )
    .await;
    fleet
        .ssh_password("alice", "new password", "true")
        .await
        .assert_success();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logins_admin_calls_sessions_and_containers_are_audited() {
    let fleet = Fleet::start_with(FleetOptions {
        proxies: 1,
        ..FleetOptions::default()
    })
    .await;
    let key = fleet.key_of("demo");
    fleet.ssh("demo", "true", None).await.assert_success();
    let stranger = fleet.stranger_key();
    let refused = fleet.ssh_with_key("demo", &stranger, "true", None).await;
    assert_eq!(refused.code, Some(255), "{refused:#?}");
    let bad_admin = fleet
        .grpcurl(
            Some("authorization: Bearer not-a-token"),
            "",
            "envgate.admin.v1.Admin/ListUsers",
        )
        .await;
    assert_ne!(bad_admin.code, Some(0));

    let proxy = fleet.proxy_id(0);
    let demo_fingerprint = fingerprint(&key).await;
    let stranger_fingerprint = fingerprint(&stranger).await;
    eventually(Duration::from_secs(10), "the audit records", || async {
        let records = fleet.audit_records();
        let has = |wanted: &dyn Fn(&serde_json::Value) -> bool| records.iter().any(wanted);
        let checks = [
            (
                "demo's login",
                has(&|r| {
                    r["event"] == "login"
                        && r["outcome"] == "success"
                        && r["user"] == "demo"
                        && r["method"] == "publickey"
                        && r["key_fingerprint"] == demo_fingerprint.as_str()
                        && r["proxy"] == proxy.as_str()
                        && r["client"]
                            .as_str()
                            .is_some_and(|c| c.starts_with("127.0.0.1:"))
                }),
            ),
            (
                "the control plane's check of demo's key",
                has(&|r| {
                    r["event"] == "credential"
                        && r["outcome"] == "success"
                        && r["user"] == "demo"
                        && r["key_fingerprint"] == demo_fingerprint.as_str()
                        && r["proxy"] == proxy.as_str()
                }),
            ),
            (
                "the stranger's refused key",
                has(&|r| {
                    r["event"] == "login"
                        && r["outcome"] == "failure"
                        && r["user"] == "demo"
                        && r["key_fingerprint"] == stranger_fingerprint.as_str()
                        && r["reason"] == "no offered key is authorized"
                }),
            ),
            (
                "demo's session start",
                has(&|r| {
                    r["event"] == "session_start"
                        && r["user"] == "demo"
                        && r["environment"] == "busybox"
                        && r["proxy"] == proxy.as_str()
                }),
            ),
            (
                "demo's session end",
                has(&|r| {
                    r["event"] == "session_end" && r["user"] == "demo" && r["exit_status"] == 0
                }),
            ),
            (
                "demo's container",
                has(&|r| r["event"] == "container_create" && r["user"] == "demo"),
            ),
            (
                "the seeding admin calls, by name",
                has(&|r| {
                    r["event"] == "admin"
                        && r["admin"] == ADMIN_NAME
                        && r["method"] == "PutUser"
                        && r["target"] == "user demo"
                        && r["outcome"] == "success"
                }),
            ),
            (
                "the refused admin call",
                has(&|r| {
                    r["event"] == "admin"
                        && r["admin"] == "-"
                        && r["method"] == "ListUsers"
                        && r["outcome"] == "failure"
                        && r["error"] == "admin calls need authorization: Bearer <admin token>"
                }),
            ),
        ];
        match checks.iter().find(|(_, found)| !found) {
            None => Ok(()),
            Some((what, _)) => Err(format!("no record of {what} in {records:#?}")),
        }
    })
    .await;
}
