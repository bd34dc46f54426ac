//! End to end: the limits on who may hold a proxy's connections (docs/proxy.md, "Connection
//! limits"). An attacker who opens connections and never logs in, from one source or from
//! many, is refused at once past the budget of connections logging in, before any SSH, while
//! users from elsewhere and users already logged in keep working; a user past the per-user cap
//! is told so in one line; a client flooding a channel with env requests gets failures and
//! keeps a working session.
//!
//! Each fleet has one proxy, so every connection meets the same limits.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use russh::client::{Handle, Msg};
use russh::{Channel, ChannelMsg};
use support::proxy_v2::proxy_v2_header;
use support::{AcceptAnyHostKey, Fleet, FleetOptions, SshOutput, eventually, run};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Bound on every wait in these tests.
const WAIT: Duration = Duration::from_secs(20);
/// What a connection past the per-source budget receives instead of an SSH banner.
const SOURCE_REFUSAL: &str =
    "envgate: too many connections from your address are logging in at once; try again shortly\r\n";
/// What a connection past the global budget receives instead of an SSH banner.
const GLOBAL_REFUSAL: &str =
    "envgate: too many connections are logging in at once; try again shortly\r\n";
/// The source address of the legitimate user in another place (HAProxy puts it in the PROXY
/// header; the attacker connects from 127.0.0.1).
const ELSEWHERE: &str = "BindAddress=127.0.0.2";

/// One proxy with `env` (its `ENVGATE_*` flags), and a login grace far longer than any test,
/// so the attacker's idle connections stay until the test closes them.
async fn fleet_with(env: &[(&str, &str)]) -> Fleet {
    let mut env: Vec<(String, String)> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    env.push(("ENVGATE_LOGIN_GRACE_SECONDS".into(), "600".into()));
    Fleet::start_with(FleetOptions {
        proxies: 1,
        env,
        ..FleetOptions::default()
    })
    .await
}

/// An attacker's connection to `addr`: with a PROXY v2 header naming `claimed` as the client
/// when given (as the trusted balancer would send it), then it reads the proxy's SSH banner
/// and sends nothing more, holding its place among the connections logging in.
async fn idle_connection(addr: &str, claimed: Option<SocketAddr>) -> TcpStream {
    try_idle_connection(addr, claimed)
        .await
        .unwrap_or_else(|received| panic!("closed before the SSH banner: {received:?}"))
}

/// As [`idle_connection`], or what the proxy sent before it closed the connection.
async fn try_idle_connection(addr: &str, claimed: Option<SocketAddr>) -> Result<TcpStream, String> {
    let open = async {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        if let Some(claimed) = claimed {
            let header = proxy_v2_header(claimed, stream.peer_addr().unwrap());
            stream.write_all(&header).await.expect("send the header");
        }
        let mut banner = Vec::new();
        let mut byte = [0u8; 1];
        while !banner.ends_with(b"\r\n") {
            let n = stream.read(&mut byte).await.expect("read the banner");
            if n == 0 {
                return Err(String::from_utf8_lossy(&banner).into_owned());
            }
            banner.push(byte[0]);
        }
        assert!(banner.starts_with(b"SSH-2.0-"), "{banner:?}");
        Ok(stream)
    };
    tokio::time::timeout(WAIT, open)
        .await
        .expect("the SSH banner in time")
}

/// `count` idle connections from 127.0.0.1 through HAProxy, and how many attempts the proxy
/// refused on the way. Under load HAProxy may give up on a connect and retry it (`retries`):
/// for a moment the proxy counts the abandoned attempt too, and the last place is refused.
/// As a real attacker would, this waits for that place to come back and connects again.
async fn hold_places(fleet: &Fleet, haproxy: &str, count: usize) -> (Vec<TcpStream>, u32) {
    let mut held = Vec::new();
    let mut refused = 0;
    while held.len() < count {
        match try_idle_connection(haproxy, None).await {
            Ok(stream) => held.push(stream),
            Err(received) => {
                assert_eq!(received, SOURCE_REFUSAL);
                refused += 1;
                assert!(
                    refused <= 3,
                    "refused {refused} times while holding {count}"
                );
            }
        }
        wait_series(fleet, UNAUTHENTICATED, &held.len().to_string()).await;
    }
    (held, refused)
}

/// Everything a connection to `addr` receives until the proxy closes it, the connection
/// sending only the PROXY header naming `claimed` (if given).
async fn refused_connection(addr: &str, claimed: Option<SocketAddr>) -> String {
    let refused = async {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        if let Some(claimed) = claimed {
            let header = proxy_v2_header(claimed, stream.peer_addr().unwrap());
            stream.write_all(&header).await.expect("send the header");
        }
        let mut received = Vec::new();
        stream
            .read_to_end(&mut received)
            .await
            .expect("closed with a FIN, not a reset");
        String::from_utf8(received).expect("text")
    };
    tokio::time::timeout(WAIT, refused)
        .await
        .expect("refused and closed in time")
}

/// What OpenSSH shows when the connection is closed before the SSH banner.
fn assert_closed_before_ssh(out: &SshOutput) {
    assert_eq!(out.code, Some(255), "{out:#?}");
    assert_eq!(out.stdout, "", "{out:#?}");
    assert!(
        out.stderr.starts_with("kex_exchange_identification: "),
        "{out:#?}"
    );
}

/// The value of one exact series (`name{labels}`) on the proxy's /metrics.
async fn series(fleet: &Fleet, series: &str) -> Option<String> {
    let body = Fleet::metrics(&fleet.proxy_ops[0]).await?;
    body.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .map(str::to_owned)
}

async fn wait_series(fleet: &Fleet, name: &str, value: &str) {
    eventually(WAIT, &format!("{name} {value}"), || async {
        match series(fleet, name).await {
            Some(seen) if seen == value => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
}

const UNAUTHENTICATED: &str = "envgate_unauthenticated_connections";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_flood_from_one_source_is_refused_while_users_elsewhere_log_in() {
    let fleet = fleet_with(&[
        ("ENVGATE_MAX_UNAUTHENTICATED", "20"),
        ("ENVGATE_MAX_UNAUTHENTICATED_PER_SOURCE", "3"),
    ])
    .await;
    let haproxy = format!("127.0.0.1:{}", fleet.ssh_port);
    let key = fleet.key_of("demo");

    // The attacker holds its source's three places, through the real balancer.
    let (attacker, refused_while_holding) = hold_places(&fleet, &haproxy, 3).await;

    // Its fourth connection gets one line instead of the SSH banner, and is closed.
    assert_eq!(refused_connection(&haproxy, None).await, SOURCE_REFUSAL);
    // So does anyone else at that address: OpenSSH reports the closed connection.
    assert_closed_before_ssh(&fleet.ssh("demo", "echo never", None).await);

    // A user at another address logs in and works.
    let out = fleet
        .ssh_with_options("demo", &key, &[ELSEWHERE], "echo in", None)
        .await;
    out.assert_success();
    assert_eq!(out.stdout, "in\n");
    wait_series(
        &fleet,
        r#"envgate_connections_total{result="preauth_source_limit"}"#,
        &(2 + refused_while_holding).to_string(),
    )
    .await;
    // Logged in, that user no longer counts; the attacker still holds its three.
    wait_series(&fleet, UNAUTHENTICATED, "3").await;

    // Once the attacker's connections are gone, its address may connect again.
    drop(attacker);
    wait_series(&fleet, UNAUTHENTICATED, "0").await;
    let out = fleet.ssh("demo", "echo again", None).await;
    out.assert_success();
    assert_eq!(out.stdout, "again\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_from_many_sources_fills_the_global_budget_but_not_for_users_logged_in() {
    let fleet = fleet_with(&[("ENVGATE_MAX_UNAUTHENTICATED", "4")]).await;
    let key = fleet.key_of("demo");
    let proxy = fleet.proxy_listen[0].clone();

    // A user logged in before the flood, with a connection kept for more sessions.
    let control_path = format!("ControlPath={}", fleet.dir().join("cm").display());
    let master = [
        "ControlMaster=yes",
        control_path.as_str(),
        "ControlPersist=120",
    ];
    let out = fleet
        .ssh_with_options("demo", &key, &master, "echo first", None)
        .await;
    out.assert_success();
    assert_eq!(out.stdout, "first\n");
    wait_series(&fleet, UNAUTHENTICATED, "0").await;

    // The attacker connects from four addresses (through a trusted balancer's PROXY header):
    // all four get in, so the logged-in connection holds none of the four places.
    let mut attacker = Vec::new();
    for n in 1..=4 {
        let claimed = format!("198.51.100.{n}:40000").parse().unwrap();
        attacker.push(idle_connection(&proxy, Some(claimed)).await);
    }
    wait_series(&fleet, UNAUTHENTICATED, "4").await;

    // The next connection is refused before its PROXY header is even read.
    assert_eq!(refused_connection(&proxy, None).await, GLOBAL_REFUSAL);
    // A new login from anywhere is refused while the budget is spent...
    assert_closed_before_ssh(
        &fleet
            .ssh_with_options("demo", &key, &[ELSEWHERE], "echo never", None)
            .await,
    );
    // ...but the user logged in keeps working: a new session on the connection they have.
    let mux = ["ControlMaster=no", control_path.as_str()];
    let out = fleet
        .ssh_with_options("demo", &key, &mux, "echo still-working", None)
        .await;
    out.assert_success();
    assert_eq!(out.stdout, "still-working\n");
    // Both refusals are counted. At least: under load a client may get through to the
    // proxy a second time (HAProxy's `retries`) and be refused again, so not exactly.
    eventually(WAIT, "two refusals counted", || async {
        let name = r#"envgate_connections_total{result="preauth_limit"}"#;
        match series(&fleet, name)
            .await
            .and_then(|v| v.parse::<u64>().ok())
        {
            Some(n) if n >= 2 => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;

    // One place frees: a new login succeeds.
    attacker.pop();
    wait_series(&fleet, UNAUTHENTICATED, "3").await;
    let out = fleet
        .ssh_with_options("demo", &key, &[ELSEWHERE], "echo new-login", None)
        .await;
    out.assert_success();
    assert_eq!(out.stdout, "new-login\n");

    let mut exit = fleet.ssh_key_argv("demo", &key);
    exit.splice(
        1..1,
        ["-O", "exit", "-o", control_path.as_str()].map(String::from),
    );
    run(&exit, None, &[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_past_the_per_user_cap_is_told_so_and_other_users_are_not() {
    let fleet = fleet_with(&[
        ("ENVGATE_MAX_CONNECTIONS_PER_USER", "2"),
        ("ENVGATE_LOG_JSON", "true"),
    ])
    .await;
    let key = fleet.key_of("demo");
    let first = fleet.ssh_in_background("demo", "sleep 300");
    let second = fleet.ssh_in_background("demo", "sleep 300");
    eventually(WAIT, "demo's two sessions recorded", || async {
        match fleet.user_sessions("demo").await?.len() {
            2 => Ok(()),
            n => Err(format!("{n} sessions")),
        }
    })
    .await;

    let line = "envgate: too many connections for demo (the limit is 2 per proxy); \
                close some and try again";
    let refused = fleet.ssh("demo", "echo never", None).await;
    assert_eq!(refused.code, Some(1), "{refused:#?}");
    assert_eq!(refused.stdout, "", "the command never ran: {refused:#?}");
    assert_eq!(refused.stderr_lines(), [line], "{refused:#?}");
    wait_series(
        &fleet,
        r#"envgate_connections_total{result="user_limit"}"#,
        "1",
    )
    .await;
    let log = std::fs::read_to_string(fleet.dir().join("proxy-0.log")).expect("the proxy's log");
    let logged: Vec<serde_json::Value> = log
        .lines()
        .filter_map(|line| serde_json::from_str(line).ok())
        .filter(|record: &serde_json::Value| {
            record["message"] == "refused: too many connections for the user"
        })
        .collect();
    assert_eq!(logged.len(), 1, "{log}");
    assert_eq!(
        (&logged[0]["level"], &logged[0]["user"], &logged[0]["limit"]),
        (&"INFO".into(), &"demo".into(), &2.into()),
        "{log}"
    );

    // A refused connection that asks for no session cannot stay: it is closed with the line.
    let idle = fleet
        .ssh_with_options("demo", &key, &["SessionType=none"], "", None)
        .await;
    assert_eq!(idle.code, Some(255), "{idle:#?}");
    assert!(
        idle.stderr_lines()
            .iter()
            .any(|l| l.starts_with("Received disconnect from ")
                && l.ends_with(&format!(":11: {line}"))),
        "{idle:#?}"
    );

    // Another user is not affected.
    fleet.add_user("bob", "busybox", None).await;
    let out = fleet.ssh("bob", "echo bob-in", None).await;
    out.assert_success();
    assert_eq!(out.stdout, "bob-in\n");

    // Once one of demo's connections is gone, demo gets in again.
    first.abort();
    eventually(WAIT, "demo's first session closed", || async {
        match fleet.user_sessions("demo").await?.len() {
            1 => Ok(()),
            n => Err(format!("{n} sessions")),
        }
    })
    .await;
    let out = fleet.ssh("demo", "echo again", None).await;
    out.assert_success();
    assert_eq!(out.stdout, "again\n");
    second.abort();
}

/// Logs `user` in with russh's client through HAProxy.
async fn russh_login(fleet: &Fleet, user: &str) -> Handle<AcceptAnyHostKey> {
    let key = russh::keys::load_secret_key(fleet.key_of(user), None).expect("the key");
    let key = russh::keys::PrivateKeyWithHashAlg::new(Arc::new(key), None);
    let config = Arc::new(russh::client::Config::default());
    let addr = ("127.0.0.1", fleet.ssh_port);
    let connect = russh::client::connect(config, addr, AcceptAnyHostKey);
    let mut session = tokio::time::timeout(WAIT, connect)
        .await
        .expect("connected in time")
        .expect("connect");
    let auth = tokio::time::timeout(WAIT, session.authenticate_publickey(user, key))
        .await
        .expect("authenticated in time")
        .expect("authenticate");
    assert!(auth.success(), "{user} logs in");
    session
}

/// Sends one env request asking for a reply; whether the proxy took it.
async fn set_env(channel: &mut Channel<Msg>, name: &str, value: &str) -> bool {
    channel.set_env(true, name, value).await.expect("send");
    let reply = async {
        loop {
            match channel.wait().await {
                Some(ChannelMsg::Success) => return true,
                Some(ChannelMsg::Failure) => return false,
                Some(_) => continue,
                None => panic!("the channel closed"),
            }
        }
    };
    tokio::time::timeout(WAIT, reply)
        .await
        .expect("a reply in time")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn env_requests_past_the_caps_fail_and_the_session_still_works() {
    let fleet = fleet_with(&[]).await;
    let session = russh_login(&fleet, "demo").await;
    let mut channel = session.channel_open_session().await.expect("a channel");

    // Too large a value or name is refused.
    assert!(!set_env(&mut channel, "TZ", &"x".repeat(4097)).await);
    assert!(!set_env(&mut channel, &format!("LC_{}", "N".repeat(62)), "C").await);
    // At the limits, taken.
    assert!(set_env(&mut channel, "LANG", "C.UTF-8").await);
    assert!(set_env(&mut channel, "LC_PAPER", &"p".repeat(4096)).await);
    // A thousand more: 30 taken (32 in all), the rest refused.
    let mut taken = Vec::new();
    for n in 0..1000 {
        taken.push(set_env(&mut channel, &format!("LC_X{n}"), &format!("v{n}")).await);
    }
    assert_eq!(
        taken,
        (0..1000).map(|n| n < 30).collect::<Vec<_>>(),
        "the first 30 are taken, then every one is refused"
    );

    // The session still works, with what was taken.
    let command = r#"echo "${TZ-unset} $(env | grep -c '^LC_X') ${#LC_PAPER} $LANG""#;
    channel.exec(true, command).await.expect("exec");
    let run = async {
        let (mut stdout, mut status) = (Vec::new(), None);
        while let Some(message) = channel.wait().await {
            match message {
                ChannelMsg::Data { data } => stdout.extend_from_slice(&data),
                ChannelMsg::ExitStatus { exit_status } => status = Some(exit_status),
                ChannelMsg::Close => break,
                _ => {}
            }
        }
        (String::from_utf8_lossy(&stdout).into_owned(), status)
    };
    let (stdout, status) = tokio::time::timeout(WAIT, run).await.expect("ran in time");
    assert_eq!(
        (stdout.as_str(), status),
        ("unset 30 4096 C.UTF-8\n", Some(0))
    );

    // OpenSSH sends SetEnv without asking for replies: a value too large is left out and the
    // session goes on.
    let key = fleet.key_of("demo");
    let set_env = format!("SetEnv=TZ={} LC_TIME=C.UTF-8", "x".repeat(4097));
    let out = fleet
        .ssh_with_options(
            "demo",
            &key,
            &[set_env.as_str()],
            "echo ${TZ-unset} $LC_TIME",
            None,
        )
        .await;
    out.assert_success();
    assert_eq!(out.stdout, "unset C.UTF-8\n");
}
