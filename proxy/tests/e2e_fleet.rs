//! End to end: the fleet under faults — a proxy SIGKILLed under a session, PROXY headers from
//! the wrong place or malformed — with real etcd, control plane, proxies, HAProxy and OpenSSH.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use support::proxy_v2::proxy_v2_header;
use support::{Fleet, FleetOptions, SshOutput, eventually};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const WAIT: Duration = Duration::from_secs(20);
/// The control plane's proxy lease (10 s) plus a heartbeat and slack.
const LEASE_EXPIRY: Duration = Duration::from_secs(30);

/// Starts `echo started; sleep 50` as demo; returns the running ssh once its session is in etcd.
async fn long_session(fleet: &Fleet) -> tokio::task::JoinHandle<SshOutput> {
    fleet
        .session_in_background("demo", "echo started; sleep 50", WAIT)
        .await
}

fn session_field(record: &str, field: &str) -> String {
    let value: serde_json::Value = serde_json::from_str(record).expect("session record JSON");
    value[field].as_str().unwrap_or_default().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_proxys_sessions_expire_and_the_user_lands_in_the_same_container() {
    let mut fleet = Fleet::start().await;
    let ssh = long_session(&fleet).await;
    let sessions = fleet.etcd_records("sessions/").await.unwrap();
    let proxy_id = session_field(&sessions[0].1, "proxy_id");
    let container_id = session_field(&sessions[0].1, "container_id");
    let index = (0..fleet.proxy_listen.len())
        .find(|i| proxy_id == format!("{}-p{i}", fleet.instance))
        .unwrap_or_else(|| panic!("session on an unknown proxy {proxy_id}"));

    fleet.kill_proxy(index);
    let out = tokio::time::timeout(WAIT, ssh)
        .await
        .expect("the connection dropped with its proxy")
        .expect("ssh task");
    assert_ne!(out.code, Some(0), "{out:#?}");

    // Nobody closed the session: it goes when the dead proxy's lease runs out.
    eventually(LEASE_EXPIRY, "the dead proxy's records expire", || async {
        let sessions = fleet.etcd_records("sessions/").await?;
        let proxy = fleet.etcd_records(&format!("proxies/{proxy_id}")).await?;
        if sessions.is_empty() && proxy.is_empty() {
            Ok(())
        } else {
            Err(format!("sessions {sessions:?}, proxy {proxy:?}"))
        }
    })
    .await;

    fleet.ssh("demo", "true", None).await.assert_success();
    let containers = fleet.containers(Some("demo"));
    assert_eq!(
        containers.iter().map(|c| c.id.as_str()).collect::<Vec<_>>(),
        [container_id.as_str()],
        "the same container, still the only one"
    );
    // Its close is committed a moment after the client has gone (docs/decisions.md, "The
    // cost of a login").
    eventually(WAIT, "the new session closed cleanly", || async {
        let sessions = fleet.etcd_records("sessions/").await?;
        if sessions.is_empty() {
            Ok(())
        } else {
            Err(format!("{sessions:?}"))
        }
    })
    .await;
}

/// Connects to `proxy` from `local_ip`, sends `bytes` and an SSH banner, and returns what
/// came back before the proxy closed (a refusal closes without a byte, not even a banner).
async fn refused_bytes(local_ip: &str, proxy: SocketAddr, bytes: &[u8]) -> Vec<u8> {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket
        .bind(format!("{local_ip}:0").parse().unwrap())
        .unwrap();
    let mut stream = tokio::time::timeout(WAIT, socket.connect(proxy))
        .await
        .expect("connect in time")
        .expect("connect");
    // The proxy may already have closed (and reset) the connection: not our failure.
    let _ = stream.write_all(bytes).await;
    let _ = stream.write_all(b"SSH-2.0-OpenSSH_9.2\r\n").await;
    let mut received = Vec::new();
    let read = tokio::time::timeout(WAIT, stream.read_to_end(&mut received))
        .await
        .expect("the proxy closes in time");
    assert!(
        read.is_ok() || received.is_empty(),
        "{read:?} after {received:?}"
    );
    received
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_headers_from_untrusted_addresses_or_garbled_are_refused_without_harm() {
    let fleet = Fleet::start_with(FleetOptions {
        proxies: 1,
        ..FleetOptions::default()
    })
    .await;
    let proxy: SocketAddr = fleet.proxy_listen[0].parse().unwrap();
    // A session through HAProxy that lives across everything below.
    let bystander = fleet.ssh_in_background("demo", "echo started; sleep 4; echo finished");

    // The proxies trust 127.0.0.1 (HAProxy) only; 127.0.0.2 is any other host.
    let spoofed = proxy_v2_header("203.0.113.9:4444".parse().unwrap(), proxy);
    let answer = refused_bytes("127.0.0.2", proxy, &spoofed).await;
    assert!(
        answer.is_empty(),
        "an untrusted PROXY header got an answer: {answer:?}"
    );
    // From the trusted address, whatever is not a valid PROXY v2 header is refused.
    let mut truncated = spoofed.clone();
    truncated.truncate(14);
    let mut bad_family = spoofed.clone();
    bad_family[13] = 0x77;
    for garbage in [
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n".to_vec(),
        b"GET / HTTP/1.0\r\n\r\n".to_vec(),
        truncated,
        bad_family,
        vec![0u8; 4096],
    ] {
        let answer = refused_bytes("127.0.0.1", proxy, &garbage).await;
        assert!(
            answer.is_empty(),
            "garbage {:?} got an answer: {answer:?}",
            &garbage[..garbage.len().min(16)]
        );
    }

    let out = tokio::time::timeout(WAIT, bystander)
        .await
        .expect("the bystander session finished")
        .expect("ssh task");
    assert_eq!(out.stdout, "started\nfinished\n", "{out:#?}");
    assert_eq!(out.code, Some(0), "{out:#?}");
    let out = fleet.ssh("demo", "echo after", None).await;
    assert_eq!(out.stdout, "after\n", "{out:#?}");
}

/// Sequential logins running `argv` until `stop`; returns (logins, failures).
async fn login_loop(
    argv: Vec<String>,
    stop: tokio_util::sync::CancellationToken,
) -> (usize, Vec<SshOutput>) {
    const MAX_LOGINS: usize = 2000;
    let mut logins = 0;
    let mut failures = Vec::new();
    while logins < MAX_LOGINS && !stop.is_cancelled() {
        let out = support::run(&argv, None, &[]).await;
        if out.code != Some(0) || out.stdout.is_empty() {
            failures.push(out);
        }
        logins += 1;
    }
    (logins, failures)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scaling_2_to_4_to_1_under_logins_drops_no_one() {
    const GRACE_SECONDS: u64 = 15;
    let mut fleet = Fleet::start_with(FleetOptions {
        shutdown_grace_seconds: GRACE_SECONDS,
        ..FleetOptions::default()
    })
    .await;
    // demo logs in over and over; carol holds the long sessions.
    let carol = fleet.add_user("carol", "busybox", None).await;
    let mut demo_date = fleet.ssh_key_argv("demo", &fleet.key_of("demo"));
    demo_date.push("date".to_string());
    let mut carol_long = fleet.ssh_key_argv("carol", &carol);
    carol_long.push("echo started; sleep 6; echo finished".to_string());
    let stop = tokio_util::sync::CancellationToken::new();
    let logins = tokio::spawn(login_loop(demo_date, stop.clone()));

    fleet.scale(4).await.expect("scale to 4");
    // One long session per proxy (leastconn spreads them), so most run on proxies that are
    // about to drain.
    let long: Vec<_> = (0..4)
        .map(|_| {
            let argv = carol_long.clone();
            tokio::spawn(async move { support::run(&argv, None, &[]).await })
        })
        .collect();
    let drained = eventually(WAIT, "four long sessions placed", || async {
        let sessions = fleet.etcd_records("sessions/").await?;
        let long_on: Vec<String> = sessions
            .iter()
            .filter(|(_, r)| session_field(r, "user") == "carol")
            .map(|(_, r)| session_field(r, "proxy_id"))
            .collect();
        let on_drained = long_on.iter().filter(|p| !p.ends_with("-p0")).count();
        if long_on.len() == 4 && on_drained >= 1 {
            Ok(on_drained)
        } else {
            Err(format!("sessions on {long_on:?}"))
        }
    })
    .await;

    let drained_at = std::time::Instant::now();
    fleet.scale(1).await.expect("scale to 1");
    for session in long {
        let out = session.await.expect("ssh task");
        assert_eq!(out.stdout, "started\nfinished\n", "{out:#?}");
        assert_eq!(out.code, Some(0), "{out:#?}");
    }
    let drain_took = drained_at.elapsed();
    assert!(
        drain_took < Duration::from_secs(GRACE_SECONDS),
        "the drained proxies' sessions finished within the grace period: {drain_took:?}"
    );
    // Logins go on against the one proxy left, then the loop stops.
    fleet.ssh("demo", "true", None).await.assert_success();
    stop.cancel();
    let (count, failures) = logins.await.expect("login loop");
    eprintln!(
        "scale 2→4→1: {count} logins, {} failed; {drained} long sessions on drained proxies, drained in {drain_took:?}",
        failures.len()
    );
    assert!(count > 10, "the loop ran: {count}");
    assert!(failures.is_empty(), "{failures:#?}");
}
