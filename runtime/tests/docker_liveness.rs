//! The Docker runtime's liveness cache (`liveness.rs`, `docker/events.rs`) against the real
//! engine: it follows `docker kill` and `docker start` done behind its back, and while its
//! event stream is down it knows nothing (callers ask Docker), until a new subscription and
//! listing. The runtime reaches Docker through a relay on a Unix socket of the test's own, so
//! the test can cut the stream (and refuse new connections) without touching dockerd.

mod support;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use envgate_runtime::docker::DockerRuntime;
use envgate_runtime::{ContainerSpec, Liveness, Runtime};
use support::{Cleanup, IMAGE, docker, unique};
use tokio::net::{UnixListener, UnixStream};
use tokio::task::AbortHandle;

const DOCKER_SOCKET: &str = "/var/run/docker.sock";

/// Forwards every connection to Docker's socket; `cut` ends them all, `refuse` drops new ones.
struct Relay {
    path: PathBuf,
    _dir: tempfile::TempDir,
    refusing: Arc<AtomicBool>,
    connections: Arc<Mutex<Vec<AbortHandle>>>,
    accept: AbortHandle,
}

impl Relay {
    fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("docker.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let refusing = Arc::new(AtomicBool::new(false));
        let connections = Arc::new(Mutex::new(Vec::new()));
        let accept = {
            let (refusing, connections) = (refusing.clone(), connections.clone());
            tokio::spawn(async move {
                while let Ok((mut client, _)) = listener.accept().await {
                    if refusing.load(Ordering::SeqCst) {
                        continue;
                    }
                    let task = tokio::spawn(async move {
                        if let Ok(mut engine) = UnixStream::connect(DOCKER_SOCKET).await {
                            let _ = tokio::io::copy_bidirectional(&mut client, &mut engine).await;
                        }
                    });
                    connections.lock().unwrap().push(task.abort_handle());
                }
            })
            .abort_handle()
        };
        Self {
            path,
            _dir: dir,
            refusing,
            connections,
            accept,
        }
    }

    fn host(&self) -> String {
        format!("unix://{}", self.path.display())
    }

    /// Ends every connection, the event stream's included; with `refuse`, new ones too.
    fn cut(&self, refuse: bool) {
        self.refusing.store(refuse, Ordering::SeqCst);
        for connection in self.connections.lock().unwrap().drain(..) {
            connection.abort();
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut(true);
    }
}

async fn eventually(what: &str, done: impl Fn() -> bool) {
    tokio::time::timeout(Duration::from_secs(20), async {
        while !done() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("not within 20 s: {what}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_liveness_cache_follows_docker_and_knows_nothing_while_its_stream_is_down() {
    assert!(Path::new(DOCKER_SOCKET).exists(), "docker is reachable");
    let instance = unique("live");
    let _cleanup = Cleanup::new(&instance);
    let relay = Relay::start();
    let runtime = DockerRuntime::new(Some(&relay.host())).with_liveness_cache(&instance);
    let live: &dyn Liveness = runtime.liveness().expect("the cache is on");
    let mut ids = Vec::new();
    for user in ["alice", "bob"] {
        runtime.ensure_home(&instance, user).await.unwrap();
        let created = runtime
            .create_and_start(
                &ContainerSpec::new(&instance, user, "busybox", IMAGE),
                &|_: &str| {},
            )
            .await
            .unwrap();
        ids.push(created.id);
    }
    let (a, b) = (ids[0].as_str(), ids[1].as_str());
    eventually("both start events", || {
        live.known_running(a) && live.known_running(b)
    })
    .await;
    assert!(!live.known_running("0123456789ab"), "unknown: ask Docker");

    // Killed behind its back: not known to run any more, and Docker agrees.
    docker(&["kill", a]);
    eventually("the kill of a", || !live.known_running(a)).await;
    assert!(live.known_running(b));
    assert!(!runtime.is_running(a).await.unwrap());

    // The stream is cut and Docker cannot be reached: nothing is known.
    relay.cut(true);
    eventually("distrusted", || !live.known_running(b)).await;
    // Meanwhile b dies and a starts again; no event can tell.
    docker(&["kill", b]);
    docker(&["start", a]);

    // Back: a new subscription and listing, whatever was missed.
    relay.cut(false);
    eventually("resynced: a runs", || live.known_running(a)).await;
    assert!(!live.known_running(b), "b died while the stream was down");

    // Cut once more, without refusing: resubscribed at once, and following again.
    relay.cut(false);
    eventually("resynced after a cut", || live.known_running(a)).await;
    docker(&["kill", a]);
    eventually("the kill of a, after the cut", || !live.known_running(a)).await;
}
