//! End to end: tenants are apart. Sessions run as the user's own uid (not root), with a
//! passwd entry, their home and their name in the prompt; root is an environment's explicit
//! choice; and from inside a container neither another user's container nor the host's
//! services can be reached. Real etcd, control plane, proxies, HAProxy, Docker and OpenSSH.

mod support;

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use envgate_proto::admin::v1 as admin;
use support::{BUSYBOX_IMAGE, Fleet, Tmux, environment, eventually};

/// The uid the control plane gave `user`, as the admin API shows it.
async fn uid_of(fleet: &Fleet, user: &str) -> u32 {
    let mut client = fleet.admin_client().await.expect("admin client");
    client
        .get_user(fleet.authorized(admin::GetUserRequest {
            name: user.to_owned(),
        }))
        .await
        .expect("GetUser")
        .into_inner()
        .uid
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_run_as_the_users_own_account_in_every_environment() {
    let fleet = Fleet::start().await;
    fleet.add_user("alice", "busybox", None).await;
    fleet.add_user("bob", "busybox", None).await;

    let probe = "id; echo $HOME $USER; stat -c '%u:%g' ~; touch ~/from-busybox && echo wrote";
    let alice = fleet.ssh("alice", probe, None).await;
    alice.assert_success();
    let bob = fleet.ssh("bob", "id -u", None).await;
    bob.assert_success();
    let (alice_uid, bob_uid) = (uid_of(&fleet, "alice").await, uid_of(&fleet, "bob").await);
    assert!(
        alice_uid >= 200_000 && bob_uid >= 200_000,
        "{alice_uid} {bob_uid}"
    );
    assert_ne!(alice_uid, bob_uid, "two users share a uid");
    assert_eq!(
        alice.stdout,
        format!(
            "uid={alice_uid}(alice) gid={alice_uid}(alice) groups={alice_uid}(alice)\n\
             /home/alice alice\n\
             {alice_uid}:{alice_uid}\n\
             wrote\n"
        )
    );
    assert_eq!(bob.stdout, format!("{bob_uid}\n"));

    // The same account in another image: the home's files are still the user's own.
    let debian = fleet
        .ssh(
            "alice+debian",
            "id -un; stat -c '%U' ~/from-busybox; echo more >> ~/from-busybox && echo appended",
            None,
        )
        .await;
    debian.assert_success();
    assert_eq!(debian.stdout, "alice\nalice\nappended\n");

    // Not root: the container's system files and other accounts are out of reach.
    let denied = fleet
        .ssh(
            "alice",
            "echo x >> /etc/passwd; cat /etc/shadow; kill -9 1; echo done",
            None,
        )
        .await;
    assert_eq!(denied.stdout, "done\n");
    assert_eq!(denied.stderr_lines().len(), 3, "{denied:#?}");
    for line in denied.stderr_lines() {
        assert!(
            line.contains("Permission denied") || line.contains("Operation not permitted"),
            "{line}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_prompt_names_the_user() {
    let fleet = Fleet::start().await;
    fleet.add_user("carol", "busybox", None).await;
    let tmux = Tmux::start(fleet.dir(), &fleet.ssh_terminal_argv("carol"), 100, 30);
    let screen = eventually(Duration::from_secs(30), "carol's prompt", || async {
        let screen = tmux.screen();
        if screen.contains("carol@busybox:~$") {
            Ok(screen)
        } else {
            Err(screen)
        }
    })
    .await;
    assert!(!screen.contains("I have no name"), "{screen}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn root_is_an_environments_explicit_choice() {
    let fleet = Fleet::start().await;
    let mut admin_env = environment("rootlab", BUSYBOX_IMAGE, "/bin/sh", false);
    admin_env.run_as = "root".into();
    fleet.put_environment(admin_env).await;
    let out = fleet.ssh("demo+rootlab", "id -u; echo $HOME", None).await;
    out.assert_success();
    assert_eq!(out.stdout, "0\n/home/demo\n");

    // A run_as the runtime could not pass on safely is refused by the admin API.
    let mut bad = environment("badlab", BUSYBOX_IMAGE, "/bin/sh", false);
    bad.run_as = "root;id".into();
    let err = fleet.try_put_environment(bad).await.unwrap_err();
    assert!(err.contains("environment.run_as"), "{err}");
}

/// `nc` from inside `login`'s container to each target: "open" or "closed" per line.
async fn reach_from(fleet: &Fleet, login: &str, targets: &[SocketAddr]) -> Vec<String> {
    let script: String = targets
        .iter()
        .map(|t| {
            format!(
                "if echo ping | nc -w 2 {} {} >/dev/null 2>&1; then echo open; else echo closed; fi\n",
                t.ip(),
                t.port()
            )
        })
        .collect();
    let out = fleet.ssh(login, &script, None).await;
    out.assert_success();
    out.stdout.lines().map(str::to_owned).collect()
}

/// What `login`'s container prints for `command`, one IPv4 address.
async fn address_in(fleet: &Fleet, login: &str, command: &str) -> Ipv4Addr {
    let out = fleet.ssh(login, command, None).await;
    out.assert_success();
    out.stdout
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("{login}: {command}: {:?}: {e}", out.stdout))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_reaches_neither_another_users_container_nor_the_hosts_services() {
    let fleet = Fleet::start().await;
    fleet.add_user("alice", "busybox", None).await;
    fleet.add_user("bob", "busybox", None).await;

    // Bob serves something in his container, and can reach it himself at his address.
    let _server = fleet
        .session_in_background(
            "bob",
            "while :; do echo hi | nc -l -p 7000; done",
            Duration::from_secs(30),
        )
        .await;
    let bob_ip = address_in(
        &fleet,
        "bob",
        "ip -4 -o addr show eth0 | awk '{print $4}' | cut -d/ -f1",
    )
    .await;
    let bob_service = SocketAddr::from((bob_ip, 7000));
    eventually(Duration::from_secs(15), "bob's own service", || async {
        match reach_from(&fleet, "bob", &[bob_service]).await[..] {
            [ref r] if r == "open" => Ok(()),
            ref other => Err(format!("{other:?}")),
        }
    })
    .await;

    // A service of the host's listening on every address, which the host itself reaches at
    // the user network's gateway.
    let gateway = address_in(&fleet, "alice", "ip route | awk '/^default/ {print $3}'").await;
    let listener = std::net::TcpListener::bind((Ipv4Addr::UNSPECIFIED, 0)).unwrap();
    let host_port = listener.local_addr().unwrap().port();
    assert!(
        std::net::TcpStream::connect_timeout(
            &SocketAddr::from((gateway, host_port)),
            Duration::from_secs(2)
        )
        .is_ok(),
        "the host reaches its own service at {gateway}:{host_port}"
    );
    let port_of = |addr: &str| addr.rsplit(':').next().unwrap().parse::<u16>().unwrap();
    let mut host_services = vec![
        host_port,
        port_of(&fleet.etcd_endpoint()),
        fleet.ssh_port,
        port_of(&fleet.grpc_addr),
        port_of(&fleet.controlplane_ops),
    ];
    host_services.extend(fleet.proxy_ops.iter().map(|a| port_of(a)));
    host_services.extend(fleet.proxy_listen.iter().map(|a| port_of(a)));

    let mut targets = vec![bob_service];
    targets.extend(
        host_services
            .iter()
            .map(|p| SocketAddr::from((gateway, *p))),
    );
    let seen = reach_from(&fleet, "alice", &targets).await;
    assert_eq!(
        seen,
        vec!["closed"; targets.len()],
        "from alice's container: {targets:?}"
    );
}
