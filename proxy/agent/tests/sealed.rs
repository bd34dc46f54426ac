//! Agent connections over TCP are sealed after the handshake (`seal`): the real agent
//! binary on loopback TCP, the proxy's client, and a man in the middle (a TCP relay in the
//! test) that alters, drops, replays, reorders, reflects or truncates records. Every attack
//! must end the connection with a clear error on both sides and never start a process the
//! proxy did not ask for.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::{Agent, SECRET, raw_handshake, run, within};
use envgate_agent::auth;
use envgate_agent::protocol::{
    FrameReader, Message, NONCE_LEN, OpenProcess, PROTOCOL_VERSION, Stream,
};
use envgate_agent::{AgentAddress, AgentClient, AgentError, ConnectOptions, ExitStatus};
use envgate_agent::{Program, SpawnRequest};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Mutex, mpsc};

fn sh(cmd: &str) -> SpawnRequest {
    SpawnRequest::new(Program::Argv(vec![
        "/bin/sh".into(),
        "-c".into(),
        cmd.into(),
    ]))
}

fn tcp(agent: &Agent) -> AgentAddress {
    AgentAddress::Tcp(agent.tcp.clone().expect("a TCP agent"))
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 % 251) as u8).collect()
}

#[tokio::test]
async fn a_session_over_tcp_works_end_to_end() {
    let agent = Agent::start_tcp();
    let client = within(10, "connect", AgentClient::connect(&tcp(&agent), SECRET))
        .await
        .expect("connect over tcp");
    let (out, err, status) = run(&client, sh("echo out; echo err >&2; exit 3")).await;
    assert_eq!(
        (out.as_str(), err.as_str(), status),
        ("out\n", "err\n", ExitStatus::Code(3))
    );

    // Eight megabytes through `cat` and back: many records each way, byte exact.
    let data = pattern(8 * 1024 * 1024 + 13);
    let mut p = client.spawn(sh("exec cat")).await.expect("spawn cat");
    let (written, echoed) = within(60, "8 MiB through cat", async {
        let writer = async {
            p.stdin.write_all(&data).await.expect("stdin");
            p.stdin.close().expect("eof");
        };
        let ((), echoed) = tokio::join!(writer, p.stdout.read_to_vec());
        (data.len(), echoed)
    })
    .await;
    assert_eq!(echoed.len(), written);
    assert!(echoed == data, "the echo differs from what was sent");
    assert_eq!(
        within(10, "exit", p.wait()).await.unwrap(),
        ExitStatus::Code(0)
    );
    assert!(client.ping().await.is_ok());
    // The agent saw nothing wrong.
    let log = agent.log();
    assert!(log.contains("sealed=true"), "{log}");
    assert!(!log.contains("sealed connection failed"), "{log}");
}

#[tokio::test]
async fn a_wrong_secret_is_still_refused_over_tcp() {
    let agent = Agent::start_tcp();
    match AgentClient::connect(&tcp(&agent), b"wrong-secret-0123456789abcdef012").await {
        Err(AgentError::Refused(msg)) => assert!(msg.contains("authentication failed"), "{msg}"),
        Err(e) => panic!("expected a refusal, got {e}"),
        Ok(_) => panic!("a wrong secret was accepted"),
    }
    agent.wait_for_log("wrong secret").await;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dir {
    ToAgent,
    ToProxy,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Attack {
    /// Flip one bit in the ciphertext of record 0.
    Flip,
    /// Leave record 0 out.
    Drop,
    /// Send record 0 twice.
    Replay,
    /// Hold record 0 back and send it after record 1.
    Reorder,
    /// Send record 0 back to where it came from.
    Reflect,
    /// Send half of record 0, then cut both directions.
    Truncate,
}

/// A TCP relay between the proxy's client and the agent that parses the stream into units
/// (`len: u32 BE | body`: the handshake frames and the sealed records have the same outer
/// shape) and applies `attack` to the first sealed record in `dir`. It reports every sealed
/// record it handled in either direction on `events`, so the test can act in order.
struct Relay {
    address: AgentAddress,
    events: mpsc::UnboundedReceiver<(Dir, usize)>,
}

impl Relay {
    async fn start(agent: &str, dir: Dir, attack: Attack) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = AgentAddress::Tcp(listener.local_addr().unwrap().to_string());
        let agent = agent.to_owned();
        let (tx, events) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let (proxy, _) = listener.accept().await.unwrap();
            let upstream = TcpStream::connect(&agent).await.unwrap();
            let (proxy_rd, proxy_wr) = proxy.into_split();
            let (agent_rd, agent_wr) = upstream.into_split();
            let proxy_wr = Arc::new(Mutex::new(proxy_wr));
            let agent_wr = Arc::new(Mutex::new(agent_wr));
            // The proxy sends one handshake frame (AUTH), the agent two (HELLO, AUTH_OK).
            let to_agent = pump(
                proxy_rd,
                agent_wr.clone(),
                proxy_wr.clone(),
                Dir::ToAgent,
                1,
                (dir == Dir::ToAgent).then_some(attack),
                tx.clone(),
            );
            let to_proxy = pump(
                agent_rd,
                proxy_wr.clone(),
                agent_wr.clone(),
                Dir::ToProxy,
                2,
                (dir == Dir::ToProxy).then_some(attack),
                tx,
            );
            tokio::join!(to_agent, to_proxy);
        });
        Relay { address, events }
    }

    async fn wait_for(&mut self, dir: Dir, index: usize) {
        within(10, "the relay to pass a record", async {
            while let Some(event) = self.events.recv().await {
                if event == (dir, index) {
                    return;
                }
            }
            panic!("the relay ended before record {index} {dir:?}");
        })
        .await
    }
}

async fn read_unit(rd: &mut OwnedReadHalf) -> Option<Vec<u8>> {
    let mut header = [0u8; 4];
    rd.read_exact(&mut header).await.ok()?;
    let len = u32::from_be_bytes(header) as usize;
    let mut unit = header.to_vec();
    unit.resize(4 + len, 0);
    rd.read_exact(&mut unit[4..]).await.ok()?;
    Some(unit)
}

async fn send(to: &Mutex<OwnedWriteHalf>, bytes: &[u8]) {
    let _ = to.lock().await.write_all(bytes).await;
}

async fn pump(
    mut from: OwnedReadHalf,
    to: Arc<Mutex<OwnedWriteHalf>>,
    back: Arc<Mutex<OwnedWriteHalf>>,
    dir: Dir,
    handshake_units: usize,
    attack: Option<Attack>,
    events: mpsc::UnboundedSender<(Dir, usize)>,
) {
    for _ in 0..handshake_units {
        let Some(unit) = read_unit(&mut from).await else {
            return;
        };
        send(&to, &unit).await;
    }
    let mut held = None;
    let mut index = 0;
    while let Some(mut record) = read_unit(&mut from).await {
        match (attack, index) {
            (Some(Attack::Flip), 0) => {
                record[8] ^= 0x01;
                send(&to, &record).await;
            }
            (Some(Attack::Drop), 0) => {}
            (Some(Attack::Replay), 0) => {
                send(&to, &record).await;
                send(&to, &record).await;
            }
            (Some(Attack::Reorder), 0) => held = Some(record),
            (Some(Attack::Reorder), 1) => {
                send(&to, &record).await;
                send(&to, &held.take().expect("record 0 held")).await;
            }
            (Some(Attack::Reflect), 0) => send(&back, &record).await,
            (Some(Attack::Truncate), 0) => {
                send(&to, &record[..record.len() / 2]).await;
                let _ = to.lock().await.shutdown().await;
                let _ = back.lock().await.shutdown().await;
                let _ = events.send((dir, index));
                return;
            }
            _ => send(&to, &record).await,
        }
        let _ = events.send((dir, index));
        index += 1;
    }
    let _ = to.lock().await.shutdown().await;
}

/// What the proxy saw: the results of a spawn and of a ping sent after the attacked record.
struct Outcome {
    spawn: Result<(), AgentError>,
    ping: Result<(), AgentError>,
}

impl Outcome {
    fn errors(&self) -> String {
        format!("spawn: {:?}; ping: {:?}", self.spawn, self.ping)
    }
}

/// Connects through a relay that attacks record 0 in `dir`, starts a process that appends a
/// line to `runs` and then waits on stdin, and after the relay handled record 0 sends a
/// ping (record 1 in both directions).
async fn attacked_session(agent: &Agent, dir: Dir, attack: Attack, runs: &Path) -> Outcome {
    let mut relay = Relay::start(agent.tcp.as_deref().unwrap(), dir, attack).await;
    let options = ConnectOptions {
        spawn_timeout: Duration::from_secs(10),
        ..ConnectOptions::default()
    };
    let client = within(
        10,
        "connect through the relay",
        AgentClient::connect_with(&relay.address, SECRET, options),
    )
    .await
    .expect("the handshake itself is not attacked");
    let cmd = format!("echo run >> {}; exec cat", runs.display());
    let spawn = async {
        let process = client.spawn(sh(&cmd)).await?;
        // Started: the session must still end, with the error.
        match within(10, "the session to end", process.wait()).await {
            Err(e) => Err(e),
            Ok(status) => Err(AgentError::Protocol(format!(
                "the process ran to its end: {status:?}"
            ))),
        }
    };
    let ping = async {
        relay.wait_for(dir, 0).await;
        client.ping().await.map(|_| ())
    };
    let (spawn, ping) = within(20, "the attacked session", async {
        tokio::join!(spawn, ping)
    })
    .await;
    Outcome { spawn, ping }
}

fn lines(path: &Path) -> usize {
    std::fs::read_to_string(path).map_or(0, |s| s.lines().count())
}

async fn check_attack(dir: Dir, attack: Attack, proxy_says: &str, agent_says: &str) {
    let agent = Agent::start_tcp();
    let runs = agent.path("runs");
    let outcome = attacked_session(&agent, dir, attack, &runs).await;
    let what = format!("{attack:?} {dir:?}");
    assert!(outcome.ping.is_err(), "{what}: {}", outcome.errors());
    let spawn_error = outcome
        .spawn
        .as_ref()
        .expect_err("the session must end")
        .to_string();
    assert!(
        spawn_error.contains(proxy_says),
        "{what}: the proxy should say {proxy_says:?}: {}",
        outcome.errors()
    );
    let log = agent.wait_for_log(agent_says).await;
    // An OPEN that was altered, dropped, held back, sent back or cut never starts the
    // process; a replayed one does not start it twice. (When the OPEN got through, the
    // process may or may not have written its line before the agent hung it up.)
    let most = match (dir, attack) {
        (Dir::ToAgent, Attack::Replay) | (Dir::ToProxy, _) => 1,
        (Dir::ToAgent, _) => 0,
    };
    assert!(
        lines(&runs) <= most,
        "{what}: {} processes started",
        lines(&runs)
    );
    // The agent hung up what the connection had started, and keeps serving others.
    let client = within(
        10,
        "a fresh connection",
        AgentClient::connect(&tcp(&agent), SECRET),
    )
    .await
    .expect("the agent still serves");
    assert_eq!(run(&client, sh("exit 0")).await.2, ExitStatus::Code(0));
    assert!(!log.contains("panicked"), "{log}");
}

const FORGED: &str = "a sealed frame failed authentication";

#[tokio::test]
async fn a_flipped_byte_closes_the_connection_on_both_sides() {
    check_attack(Dir::ToAgent, Attack::Flip, FORGED, FORGED).await;
    check_attack(Dir::ToProxy, Attack::Flip, FORGED, FORGED).await;
}

#[tokio::test]
async fn a_dropped_record_closes_the_connection_on_both_sides() {
    check_attack(Dir::ToAgent, Attack::Drop, FORGED, FORGED).await;
    check_attack(Dir::ToProxy, Attack::Drop, FORGED, FORGED).await;
}

#[tokio::test]
async fn a_replayed_record_closes_the_connection_and_runs_nothing_twice() {
    check_attack(Dir::ToAgent, Attack::Replay, FORGED, FORGED).await;
    check_attack(Dir::ToProxy, Attack::Replay, FORGED, FORGED).await;
}

#[tokio::test]
async fn reordered_records_close_the_connection_on_both_sides() {
    check_attack(Dir::ToAgent, Attack::Reorder, FORGED, FORGED).await;
    check_attack(Dir::ToProxy, Attack::Reorder, FORGED, FORGED).await;
}

#[tokio::test]
async fn a_record_sent_back_to_its_sender_closes_the_connection() {
    check_attack(Dir::ToAgent, Attack::Reflect, FORGED, FORGED).await;
    check_attack(Dir::ToProxy, Attack::Reflect, FORGED, FORGED).await;
}

#[tokio::test]
async fn a_truncated_record_closes_the_connection_on_both_sides() {
    // The side that got half a record says so; the other sees its peer cut off.
    check_attack(
        Dir::ToAgent,
        Attack::Truncate,
        "without its sealed close",
        "in the middle of a sealed record",
    )
    .await;
    check_attack(
        Dir::ToProxy,
        Attack::Truncate,
        "in the middle of a sealed record",
        "without its sealed close",
    )
    .await;
}

/// The handshake over TCP done by hand, with the right secret: what a compromised peer that
/// holds the secret but ignores the sealing could do.
async fn raw_handshake_as_proxy(address: &str) -> (FrameReader<OwnedReadHalf>, OwnedWriteHalf) {
    let (rd, wr) = TcpStream::connect(address).await.unwrap().into_split();
    raw_handshake(rd, wr, PROTOCOL_VERSION).await
}

#[tokio::test]
async fn a_proxy_sending_plaintext_after_the_handshake_over_tcp_is_refused() {
    let agent = Agent::start_tcp();
    let runs = agent.path("runs");
    let (reader, mut wr) = raw_handshake_as_proxy(agent.tcp.as_deref().unwrap()).await;
    let mut open = Vec::new();
    Message::Open(OpenProcess {
        request: sh(&format!("echo run >> {}", runs.display())),
        stdout_window: 1024,
        stderr_window: 1024,
    })
    .encode(1, &mut open);
    wr.write_all(&open).await.unwrap();
    // The agent answers with a sealed error (unreadable here) and closes.
    let (mut rd, _) = reader.into_parts();
    let mut rest = Vec::new();
    within(5, "the agent to close", rd.read_to_end(&mut rest))
        .await
        .unwrap();
    agent.wait_for_log(FORGED).await;
    assert_eq!(lines(&runs), 0, "a plaintext OPEN started a process");
}

#[tokio::test]
async fn an_agent_sending_plaintext_after_the_handshake_over_tcp_is_refused() {
    // A listener that holds the secret (proves it correctly) but then speaks plaintext, as
    // the Unix-socket protocol does: the client must not accept its frames.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = AgentAddress::Tcp(listener.local_addr().unwrap().to_string());
    let (got_tx, got_rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        let (rd, mut wr) = stream.into_split();
        let mut reader = FrameReader::new(rd);
        let agent_nonce = [9u8; NONCE_LEN];
        let mut buf = Vec::new();
        Message::Hello {
            min_version: 1,
            max_version: PROTOCOL_VERSION,
            nonce: agent_nonce,
        }
        .encode(0, &mut buf);
        wr.write_all(&buf).await.unwrap();
        let Ok(Some((0, Message::Auth { version, nonce, .. }))) = reader.next().await else {
            panic!("no auth")
        };
        let mut buf = Vec::new();
        Message::AuthOk {
            mac: auth::agent_proof(SECRET, version, &agent_nonce, &nonce),
        }
        .encode(0, &mut buf);
        // Plaintext right behind the handshake, in the same write.
        Message::Data {
            stream: Stream::Stdout,
            data: b"injected".to_vec(),
        }
        .encode(1, &mut buf);
        wr.write_all(&buf).await.unwrap();
        // What the client sends back before it goes: a sealed record, then the end.
        let (mut rd, _) = reader.into_parts();
        let mut rest = Vec::new();
        let _ = rd.read_to_end(&mut rest).await;
        let _ = got_tx.send(rest);
    });
    let client = within(5, "connect", AgentClient::connect(&address, SECRET))
        .await
        .expect("the handshake is right");
    let error = match within(5, "the client to refuse", client.ping()).await {
        Err(e) => e.to_string(),
        Ok(_) => panic!("the fake agent answered a sealed ping"),
    };
    assert!(error.contains(FORGED), "{error}");
    assert!(client.is_closed());
    let sent_back = within(5, "the client to close", got_rx).await.unwrap();
    // One sealed record (the error for the agent), not plaintext.
    assert!(!sent_back.is_empty());
    assert!(!String::from_utf8_lossy(&sent_back).contains("sealed frame"));
}
