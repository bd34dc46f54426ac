//! Throughput of one large stream through the real agent: over TCP (sealed records,
//! ChaCha20-Poly1305) against over the Unix socket (plaintext frames), in both directions,
//! rounds interleaved so both paths see the same machine load. Prints MiB/s per round, the
//! medians and their ratio; docs/benchmarks.md keeps the figures.
//!
//! `cargo bench -p envgate-agent --bench sealed_stream [-- MIB ROUNDS]` (default 256 MiB, 5).

use std::io::Write;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use envgate_agent::seal::{Keys, MAX_RECORD_PLAINTEXT, SealedReader, Side};
use envgate_agent::{AgentAddress, AgentClient, Program, SpawnRequest};
use tokio::io::AsyncReadExt;

const SECRET: &[u8] = b"bench-secret-0123456789abcdef012";

struct Agent(Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_agent(dir: &Path, port: u16) -> Agent {
    let secret = dir.join("secret");
    std::fs::write(&secret, SECRET).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_envgate-agent"))
        .arg("--socket")
        .arg(dir.join("agent.sock"))
        .arg("--secret-file")
        .arg(&secret)
        .arg("--listen-tcp")
        .arg(format!("127.0.0.1:{port}"))
        .env("ENVGATE_AGENT_LOG", "warn")
        .stdin(Stdio::null())
        .spawn()
        .expect("start envgate-agent");
    Agent(child)
}

fn sh(cmd: &str) -> SpawnRequest {
    SpawnRequest::new(Program::Argv(vec![
        "/bin/sh".into(),
        "-c".into(),
        cmd.into(),
    ]))
}

/// MiB/s of `mib` MiB of process output read by the proxy's client.
async fn download(client: &AgentClient, mib: usize) -> f64 {
    let started = Instant::now();
    let mut p = client
        .spawn(sh(&format!("head -c {}M /dev/zero", mib)))
        .await
        .expect("spawn head");
    p.stdin.close().unwrap();
    let mut total = 0usize;
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = p.stdout.read(&mut buf).await.expect("read");
        if n == 0 {
            break;
        }
        total += n;
    }
    p.wait().await.expect("exit");
    assert_eq!(total, mib << 20);
    mib as f64 / started.elapsed().as_secs_f64()
}

/// MiB/s of `mib` MiB of stdin written by the proxy's client into `cat > /dev/null`.
async fn upload(client: &AgentClient, mib: usize) -> f64 {
    let chunk = vec![0x5au8; 1 << 20];
    let started = Instant::now();
    let mut p = client
        .spawn(sh("cat > /dev/null"))
        .await
        .expect("spawn cat");
    for _ in 0..mib {
        p.stdin.write_all(&chunk).await.expect("stdin");
    }
    p.stdin.close().unwrap();
    p.wait().await.expect("exit");
    mib as f64 / started.elapsed().as_secs_f64()
}

/// MiB/s of sealing then opening `mib` MiB in memory (no sockets, no agent): the cost of
/// the AEAD itself.
async fn seal_only(mib: usize) -> f64 {
    let proxy = Keys::derive(SECRET, 3, &[1; 32], &[2; 32], Side::Proxy);
    let agent = Keys::derive(SECRET, 3, &[1; 32], &[2; 32], Side::Agent);
    let mut sealer = proxy.sealer;
    let plain = vec![0x5au8; 1 << 20];
    let started = Instant::now();
    let mut wire = Vec::with_capacity(mib * ((1 << 20) + 1024));
    for _ in 0..mib {
        sealer.seal(&plain, &mut wire).unwrap();
    }
    sealer.seal_close(&mut wire).unwrap();
    let mut reader = SealedReader::new(&wire[..], agent.opener, Vec::new());
    let mut out = vec![0u8; MAX_RECORD_PLAINTEXT];
    let mut got = 0;
    loop {
        let n = reader.read(&mut out).await.unwrap();
        if n == 0 {
            break;
        }
        got += n;
    }
    assert_eq!(got, mib << 20);
    mib as f64 / started.elapsed().as_secs_f64()
}

/// MiB/s of a bare copy of `mib` MiB through a connected socket pair (no agent, no frames):
/// how much of the difference is TCP on loopback rather than the sealing.
async fn bare_copy(tcp: bool, mib: usize) -> f64 {
    use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
    async fn copy<R, W>(mut rd: R, mut wr: W, mib: usize) -> f64
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let started = Instant::now();
        let writer = tokio::spawn(async move {
            let chunk = vec![0x5au8; 256 * 1024];
            for _ in 0..mib * 4 {
                wr.write_all(&chunk).await.unwrap();
            }
            wr.shutdown().await.unwrap();
        });
        let mut buf = vec![0u8; 64 * 1024];
        let mut total = 0;
        loop {
            let n = rd.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            total += n;
        }
        writer.await.unwrap();
        assert_eq!(total, mib << 20);
        mib as f64 / started.elapsed().as_secs_f64()
    }
    if tcp {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (b, _) = listener.accept().await.unwrap();
        copy(b, a, mib).await
    } else {
        let (a, b) = tokio::net::UnixStream::pair().unwrap();
        copy(b, a, mib).await
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let mib: usize = args.first().and_then(|a| a.parse().ok()).unwrap_or(256);
    let rounds: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(5);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let _agent = start_agent(dir.path(), port);
    let unix_addr = AgentAddress::Unix(dir.path().join("agent.sock"));
    let tcp_addr = AgentAddress::Tcp(format!("127.0.0.1:{port}"));
    rt.block_on(async {
        let connect = |a: AgentAddress| async move {
            tokio::time::timeout(Duration::from_secs(10), AgentClient::connect(&a, SECRET))
                .await
                .expect("connect within 10 s")
                .expect("connect")
        };
        let unix = connect(unix_addr).await;
        let tcp = connect(tcp_addr).await;
        println!("one stream of {mib} MiB, {rounds} rounds, interleaved; MiB/s");
        for (name, down) in [("agent -> proxy (stdout)", true), ("proxy -> agent (stdin)", false)] {
            let (mut u, mut t) = (Vec::new(), Vec::new());
            for round in 0..rounds {
                let (a, b) = if down {
                    (download(&unix, mib).await, download(&tcp, mib).await)
                } else {
                    (upload(&unix, mib).await, upload(&tcp, mib).await)
                };
                println!("  {name} round {round}: unix {a:.0}, tcp+aead {b:.0}");
                u.push(a);
                t.push(b);
            }
            let (mu, mt) = (median(u), median(t));
            println!(
                "{name}: unix median {mu:.0} MiB/s, tcp+aead median {mt:.0} MiB/s, tcp+aead / unix = {:.2}x",
                mt / mu
            );
        }
        let (mut u, mut t) = (Vec::new(), Vec::new());
        for _ in 0..rounds {
            u.push(bare_copy(false, mib).await);
            t.push(bare_copy(true, mib).await);
        }
        let (mu, mt) = (median(u), median(t));
        println!(
            "bare socket copy (no agent, no sealing): unix median {mu:.0} MiB/s, tcp median {mt:.0} MiB/s, tcp / unix = {:.2}x",
            mt / mu
        );
        let sealing: Vec<f64> = {
            let mut v = Vec::new();
            for _ in 0..rounds {
                v.push(seal_only(mib.min(64)).await);
            }
            v
        };
        println!(
            "seal + open in memory (ChaCha20-Poly1305, no sockets): median {:.0} MiB/s",
            median(sealing)
        );
        std::io::stdout().flush().unwrap();
    });
}
