//! Failure classification of the russh client against an in-process russh
//! server that misbehaves on purpose: the command names the misbehaviour.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use envgate_loadtest::client::{Credential, Job, Step};
use envgate_loadtest::{FailureKind, client};
use russh::keys::PrivateKey;
use russh::keys::ssh_key::private::Ed25519Keypair;
use russh::server::{self, Auth, ChannelOpenHandle, Msg, Session};
use russh::{Channel, ChannelId, MethodKind, MethodSet, Sig};
use tokio::net::TcpListener;

/// Behaves according to the exec'd command.
struct Scripted;

impl server::Handler for Scripted {
    type Error = russh::Error;

    async fn auth_publickey(
        &mut self,
        user: &str,
        _key: russh::server::VerifiedPublicKey<'_>,
    ) -> Result<Auth, Self::Error> {
        Ok(if user == "nobody" {
            Auth::reject()
        } else {
            Auth::Accept
        })
    }

    async fn channel_open_session(
        &mut self,
        _channel: Channel<Msg>,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        reply.accept().await;
        Ok(())
    }

    async fn exec_request(
        &mut self,
        channel: ChannelId,
        data: &[u8],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        match data {
            b"refuse" => {
                session.channel_failure(channel)?;
                return Ok(());
            }
            b"hang" => {
                session.channel_success(channel)?;
                return Ok(());
            }
            _ => session.channel_success(channel)?,
        }
        match data {
            b"ok" => {
                session.data(channel, &b"hello\n"[..])?;
                session.exit_status_request(channel, 0)?;
            }
            b"silent" => session.exit_status_request(channel, 0)?,
            b"envgate-error" => {
                session.extended_data(
                    channel,
                    1,
                    &b"envgate: unknown environment \"nope\"; available: busybox\n"[..],
                )?;
                session.exit_status_request(channel, 1)?;
            }
            b"signal" => session.exit_signal_request(channel, Sig::KILL, false, "killed", "en")?,
            _ => {} // "no-exit": just close
        }
        session.eof(channel)?;
        session.close(channel)?;
        Ok(())
    }
}

async fn scripted_server() -> String {
    scripted_server_with(russh::Preferred::default()).await
}

async fn scripted_server_with(preferred: russh::Preferred) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let mut config = server::Config {
        keys: vec![PrivateKey::from(Ed25519Keypair::from_seed(&[9; 32]))],
        auth_rejection_time: Duration::from_millis(10),
        auth_rejection_time_initial: Some(Duration::ZERO),
        preferred,
        ..Default::default()
    };
    config.methods = MethodSet::from(&[MethodKind::PublicKey][..]);
    let config = Arc::new(config);
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            let config = config.clone();
            tokio::spawn(async move {
                if let Ok(session) = server::run_stream(config, socket, Scripted).await {
                    let _ = session.await;
                }
            });
        }
    });
    addr
}

fn job(addr: &str, user: &str, command: &str) -> Job {
    let key = PrivateKey::from(Ed25519Keypair::from_seed(&[3; 32]));
    Job {
        addr: addr.into(),
        credential: Credential {
            user: user.into(),
            key_path: PathBuf::from("/unused"),
            key: Arc::new(key),
        },
        command: command.into(),
        timeout: Duration::from_secs(2),
        kex: None,
    }
}

async fn run(addr: &str, user: &str, command: &str) -> client::Outcome {
    client::russh::run(
        &job(addr, user, command),
        client::russh::config(None).unwrap(),
    )
    .await
}

#[tokio::test]
async fn successful_runs_time_every_step() {
    let addr = scripted_server().await;
    let ok = run(&addr, "demo", "ok").await;
    assert!(ok.failure.is_none(), "{:?}", ok.failure);
    assert_eq!(ok.exit_status, Some(0));
    assert_eq!(ok.output_bytes, 6);
    let t = &ok.timeline;
    let steps = [
        Step::Connect,
        Step::Handshake,
        Step::Auth,
        Step::Exec,
        Step::Output,
        Step::Close,
    ];
    let ends: Vec<Duration> = steps
        .iter()
        .map(|s| t.end_of(*s).unwrap_or_else(|| panic!("{s:?} not marked")))
        .collect();
    assert!(
        ends.windows(2).all(|w| w[0] <= w[1]),
        "steps end in order: {ends:?}"
    );
    assert!(*ends.last().unwrap() <= ok.total);

    // A command that prints nothing still gets a first-byte mark (its exit status).
    let silent = run(&addr, "demo", "silent").await;
    assert!(silent.failure.is_none());
    assert_eq!(silent.output_bytes, 0);
    assert!(silent.timeline.end_of(Step::Exec).is_some());
}

#[tokio::test]
async fn each_failure_is_classified_with_its_step() {
    let addr = scripted_server().await;
    let cases = [
        ("nobody", "ok", FailureKind::AuthRejected, Step::Auth),
        ("demo", "refuse", FailureKind::ChannelError, Step::Exec),
        ("demo", "no-exit", FailureKind::NoExitStatus, Step::Exec),
        ("demo", "signal", FailureKind::ExitSignal, Step::Output),
        (
            "demo",
            "envgate-error",
            FailureKind::NonZeroExit,
            Step::Output,
        ),
        ("demo", "hang", FailureKind::Timeout, Step::Exec),
    ];
    for (user, command, kind, step) in cases {
        let outcome = run(&addr, user, command).await;
        let failure = outcome
            .failure
            .unwrap_or_else(|| panic!("{command} should fail"));
        assert_eq!(
            (failure.kind, failure.step),
            (kind, step),
            "{command}: {}",
            failure.detail
        );
        assert!(
            outcome.total < Duration::from_secs(4),
            "{command} stayed within the timeout"
        );
    }
    let envgate = run(&addr, "demo", "envgate-error").await.failure.unwrap();
    assert_eq!(
        envgate.detail,
        "exit status 1: envgate: unknown environment \"nope\"; available: busybox"
    );
}

#[tokio::test]
async fn broken_and_silent_servers() {
    // Accepts TCP and closes at once: the SSH handshake fails.
    let closer = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let closer_addr = closer.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        while let Ok((socket, _)) = closer.accept().await {
            drop(socket);
        }
    });
    let closed = run(&closer_addr, "demo", "ok").await.failure.unwrap();
    assert_eq!(
        (closed.kind, closed.step),
        (FailureKind::HandshakeFailed, Step::Handshake),
        "{}",
        closed.detail
    );

    // Accepts TCP and never speaks: the handshake times out.
    let mute = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mute_addr = mute.local_addr().unwrap().to_string();
    let held = tokio::spawn(async move {
        let mut sockets = Vec::new();
        while let Ok((socket, _)) = mute.accept().await {
            sockets.push(socket);
        }
    });
    let outcome = run(&mute_addr, "demo", "ok").await;
    let silent = outcome.failure.unwrap();
    assert_eq!(
        (silent.kind, silent.step),
        (FailureKind::Timeout, Step::Handshake)
    );
    assert!(outcome.total >= Duration::from_secs(2) && outcome.total < Duration::from_secs(4));
    held.abort();
}

#[tokio::test]
async fn the_key_exchange_can_be_pinned() {
    // A server that only speaks ML-KEM: a client pinned to curve25519 cannot
    // agree with it, a client with russh's defaults can.
    let preferred = russh::Preferred {
        kex: vec![
            russh::kex::MLKEM768X25519_SHA256,
            russh::kex::EXTENSION_SUPPORT_AS_SERVER,
            russh::kex::EXTENSION_OPENSSH_STRICT_KEX_AS_SERVER,
        ]
        .into(),
        ..Default::default()
    };
    let addr = scripted_server_with(preferred).await;
    let pinned = client::russh::config(Some(client::DEFAULT_KEX)).unwrap();
    let failure = client::russh::run(&job(&addr, "demo", "ok"), pinned)
        .await
        .failure
        .unwrap();
    assert_eq!(
        (failure.kind, failure.step),
        (FailureKind::HandshakeFailed, Step::Handshake),
        "{}",
        failure.detail
    );
    assert!(run(&addr, "demo", "ok").await.failure.is_none());
    assert!(client::russh::config(Some("no-such-kex")).is_err());
}
