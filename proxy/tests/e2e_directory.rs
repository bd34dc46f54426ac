//! End to end: users of an LDAP directory log in with a password through the whole fleet
//! (real `ssh` through HAProxy, a real `slapd` seeded by the test, the control plane started
//! with `--ldap-*`). Their groups decide which environments they may use, a change in the
//! directory shows at the next login, and a directory that went away fails its users clearly
//! while local users keep logging in.

mod support;

use envgate_controlplane::testkit::{LDAP_SERVICE_DN, LDAP_SERVICE_PASSWORD, LDAP_SUFFIX, Slapd};
use support::{BUSYBOX_IMAGE, Fleet, FleetOptions, environment};

/// carol (students) and dave (disabled by `shadowExpire: 1`).
fn directory() -> String {
    let person = |uid: &str, number: u32, extra: &str| {
        format!(
            "dn: uid={uid},ou=people,{LDAP_SUFFIX}\nobjectClass: inetOrgPerson\n\
             objectClass: posixAccount\nobjectClass: shadowAccount\nuid: {uid}\ncn: {uid}\n\
             sn: {uid}\nuidNumber: {number}\ngidNumber: {number}\nhomeDirectory: /home/{uid}\n\
             userPassword: {uid}-directory-pw\n{extra}\n"
        )
    };
    [
        person("carol", 10001, ""),
        person("dave", 10002, "shadowExpire: 1\n"),
        format!(
            "dn: cn=students,ou=groups,{LDAP_SUFFIX}\nobjectClass: posixGroup\ncn: students\n\
             gidNumber: 20001\nmemberUid: carol\nmemberUid: dave\n"
        ),
        format!(
            "dn: cn=staff,ou=groups,{LDAP_SUFFIX}\nobjectClass: posixGroup\ncn: staff\n\
             gidNumber: 20002\n"
        ),
    ]
    .join("\n")
}

/// Proxies cache a login's token while it has more than 30 s left (`auth_cache.rs`): a
/// shorter lifetime makes every login below ask the control plane, as the next login after
/// a cached token expired would.
const TOKEN_TTL_SECONDS: u64 = 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn directory_users_log_in_with_ssh_and_their_groups_decide() {
    let mut slapd = Slapd::start(&directory()).await.expect("slapd starts");
    let secret = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(secret.path(), format!("{LDAP_SERVICE_PASSWORD}\n")).unwrap();
    let fleet = Fleet::start_with(FleetOptions {
        proxies: 1,
        env: [
            ("ENVGATE_LDAP_URL", slapd.url()),
            ("ENVGATE_LDAP_BIND_DN", LDAP_SERVICE_DN.to_owned()),
            (
                "ENVGATE_LDAP_BIND_PASSWORD_FILE",
                secret.path().display().to_string(),
            ),
            ("ENVGATE_LDAP_BASE_DN", LDAP_SUFFIX.to_owned()),
            (
                "ENVGATE_LDAP_DISABLED_FILTER",
                "(shadowExpire=1)".to_owned(),
            ),
            ("ENVGATE_TOKEN_TTL_SECONDS", TOKEN_TTL_SECONDS.to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect(),
        ..FleetOptions::default()
    })
    .await;
    let mut lab = environment("lab", BUSYBOX_IMAGE, "/bin/sh", false);
    lab.allowed_groups = vec!["staff".into()];
    fleet.put_environment(lab).await;
    fleet.add_user("pat", "busybox", Some("local-pw")).await;

    // First login: the record is made, the session runs as carol.
    let out = fleet
        .ssh_password("carol", "carol-directory-pw", "id -un")
        .await;
    out.assert_success();
    assert_eq!(out.stdout, "carol\n");
    // students may not use the staff-only environment.
    let out = fleet
        .ssh_password("carol+lab", "carol-directory-pw", "echo in")
        .await;
    assert_ne!(out.code, Some(0), "{out:#?}");
    assert!(
        out.stderr
            .contains("envgate: environment \"lab\" is not available to you"),
        "{out:#?}"
    );

    // A wrong password and a disabled account: OpenSSH's refusal, nothing created.
    for (login, password) in [("carol", "wrong"), ("dave", "dave-directory-pw")] {
        let out = fleet.ssh_password(login, password, "echo in").await;
        assert_eq!(out.code, Some(255), "{login}: {out:#?}");
        assert!(out.stderr.contains("Permission denied"), "{out:#?}");
    }
    assert!(fleet.containers(Some("dave")).is_empty());

    // carol joins staff in the directory: her next login may use lab.
    slapd
        .modify(&format!(
            "dn: cn=staff,ou=groups,{LDAP_SUFFIX}\nchangetype: modify\nadd: memberUid\n\
             memberUid: carol\n"
        ))
        .unwrap();
    let out = fleet
        .ssh_password("carol+lab", "carol-directory-pw", "echo in")
        .await;
    out.assert_success();
    assert_eq!(out.stdout, "in\n");

    // The directory goes away: carol is refused with the reason in the audit log, and the
    // local user pat still logs in.
    slapd.kill();
    let out = fleet
        .ssh_password("carol", "carol-directory-pw", "echo in")
        .await;
    assert_eq!(out.code, Some(255), "{out:#?}");
    let reason = fleet.last_refusal("carol");
    assert!(
        reason.starts_with("the directory is unavailable; try again later (request id "),
        "{reason}"
    );
    // Typed at a keyboard-interactive prompt (OpenSSH's first choice for passwords), the
    // user reads that line too, at ssh's default log level.
    let (out, _) = fleet
        .ssh_password_prompts(
            &[
                "-o",
                "PreferredAuthentications=keyboard-interactive",
                "-o",
                "LogLevel=INFO",
            ],
            "carol",
            "carol-directory-pw",
            "echo in",
        )
        .await;
    assert_eq!(out.code, Some(255), "{out:#?}");
    assert!(
        out.stderr
            .contains("envgate: the directory is unavailable; try again later (request id "),
        "{out:#?}"
    );
    let out = fleet.ssh_password("pat", "local-pw", "echo in").await;
    out.assert_success();
}
