//! The environment catalogue: `PutEnvironment` checks the warm pool and maximum lifetime, and
//! the real `envgate-controlplane` binary seeds its `--environments` file into a real etcd,
//! keeps environments made through the admin API, and refuses a bad file before serving.

mod common;

use std::net::TcpListener;
use std::process::{Output, Stdio};
use std::sync::Arc;
use std::time::Duration;

use envgate_controlplane::runtime::scripted::ScriptedRuntime;
use envgate_controlplane::store::EtcdStore;
use envgate_controlplane::testkit::Etcd;
use envgate_proto::admin::v1 as pb;
use envgate_proto::admin::v1::admin_client::AdminClient;
use tokio::process::{Child, Command};
use tonic::Code;
use tonic::transport::Channel;

const BIN: &str = env!("CARGO_BIN_EXE_envgate-controlplane");
const BINARY_ADMIN_TOKEN: &str = "catalogue-admin";

fn authorized<T>(token: &str, message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    let value = format!("Bearer {token}").parse().expect("ASCII token");
    request
        .metadata_mut()
        .insert(envgate_proto::metadata::AUTHORIZATION, value);
    request
}

async fn list(admin: &mut AdminClient<Channel>, token: &str) -> Vec<pb::Environment> {
    admin
        .list_environments(authorized(token, pb::ListEnvironmentsRequest {}))
        .await
        .expect("ListEnvironments")
        .into_inner()
        .environments
}

#[tokio::test]
async fn put_environment_checks_the_warm_pool_and_the_maximum_lifetime() {
    let etcd = Etcd::start().await.expect("etcd starts");
    let store = EtcdStore::connect(&[etcd.endpoint()], "/catalogue/", Duration::from_secs(5))
        .await
        .unwrap();
    let plane = common::start(
        Arc::new(store),
        Arc::new(ScriptedRuntime::new()),
        "catalogue",
    )
    .await;
    let mut admin = AdminClient::new(plane.channel().await);
    let base = pb::Environment {
        name: "lab".into(),
        image: "envgate/busybox:latest".into(),
        ..Default::default()
    };
    let cases = [
        (
            pb::Environment {
                warm_pool_size: 301,
                ..base.clone()
            },
            "environment.warm_pool_size: must be at most 300",
        ),
        (
            pb::Environment {
                max_lifetime_seconds: 9,
                ..base.clone()
            },
            "environment.max_lifetime_seconds: must be 0 (no maximum) or at least 10 seconds",
        ),
        (
            pb::Environment {
                memory_bytes: 512,
                ..base.clone()
            },
            "environment.memory_bytes: must be 0 (no limit) or at least 6Mi (6291456 bytes), \
             Docker's minimum",
        ),
    ];
    for (environment, expected) in cases {
        let status = admin
            .put_environment(authorized(
                common::ADMIN_TOKEN,
                pb::PutEnvironmentRequest {
                    environment: Some(environment),
                },
            ))
            .await
            .unwrap_err();
        assert_eq!(
            (status.code(), status.message()),
            (Code::InvalidArgument, expected)
        );
    }
    assert!(
        list(&mut admin, common::ADMIN_TOKEN).await.is_empty(),
        "nothing was saved"
    );

    let saved = admin
        .put_environment(authorized(
            common::ADMIN_TOKEN,
            pb::PutEnvironmentRequest {
                environment: Some(pb::Environment {
                    warm_pool_size: 300,
                    max_lifetime_seconds: 10,
                    ..base.clone()
                }),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (saved.warm_pool_size, saved.max_lifetime_seconds),
        (300, 10)
    );
    assert_eq!(list(&mut admin, common::ADMIN_TOKEN).await, [saved]);
    plane.stop().await;
}

/// Files the binary reads, in a temporary directory.
struct Files {
    dir: tempfile::TempDir,
}

impl Files {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("token.key"), format!("{}\n", common::SEED)).unwrap();
        std::fs::write(
            dir.path().join("admin.token"),
            format!("{BINARY_ADMIN_TOKEN}\n"),
        )
        .unwrap();
        Self { dir }
    }

    fn path(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }

    fn write(&self, name: &str, text: &str) -> String {
        std::fs::write(self.dir.path().join(name), text).unwrap();
        self.path(name)
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The control plane with `ENVGATE_ENVIRONMENTS=catalogue` (the variable the Kubernetes
/// manifest sets).
fn controlplane(files: &Files, etcd: &str, grpc: u16, catalogue: &str) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.env_clear()
        .env("ENVGATE_TOKEN_KEY", files.path("token.key"))
        .env("ENVGATE_ADMIN_TOKEN_FILE", files.path("admin.token"))
        .env("ENVGATE_ENVIRONMENTS", catalogue)
        .args([
            "--instance",
            "catbin",
            "--etcd",
            etcd,
            "--etcd-prefix",
            "/catbin/",
        ])
        .args(["--listen", &format!("127.0.0.1:{grpc}")])
        .args(["--ops-listen", &format!("127.0.0.1:{}", free_port())])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    cmd
}

async fn finish(child: Child, limit: Duration) -> Output {
    tokio::time::timeout(limit, child.wait_with_output())
        .await
        .expect("exits in time")
        .unwrap()
}

/// An admin client once the binary's gRPC port answers.
async fn admin_of(grpc: u16, child: &mut Child) -> AdminClient<Channel> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let endpoint = Channel::from_shared(format!("http://127.0.0.1:{grpc}"))
            .unwrap()
            .connect_timeout(Duration::from_secs(2))
            .timeout(Duration::from_secs(10));
        if let Ok(channel) = endpoint.connect().await {
            return AdminClient::new(channel);
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("the control plane exited: {status}");
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the control plane never served"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn terminate(child: Child) {
    let pid = child.id().expect("running").to_string();
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(killed.success());
    let out = finish(child, Duration::from_secs(15)).await;
    assert!(
        out.status.success(),
        "{:?}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

const CATALOGUE: &str = r#"
environments:
  - name: busybox
    description: BusyBox shell
    image: envgate/busybox:latest
    default: true
  - name: tiny
    description: a small one
    image: envgate/busybox:latest
    env: { GREETING: hi }
    resources: { cpus: 0.5, memory: 64Mi, pids: 128 }
    mode: ephemeral
    idle_timeout: 90s
    max_lifetime: 1h
    groups: [students]
"#;

#[tokio::test]
async fn the_binary_seeds_its_file_and_keeps_what_the_admin_api_made() {
    let etcd = Etcd::start().await.expect("etcd starts");
    let files = Files::new();
    let catalogue = files.write("environments.yaml", CATALOGUE);
    let grpc = free_port();
    let mut child = controlplane(&files, &etcd.endpoint(), grpc, &catalogue)
        .spawn()
        .unwrap();
    let mut admin = admin_of(grpc, &mut child).await;
    let seeded = list(&mut admin, BINARY_ADMIN_TOKEN).await;
    let tiny = pb::Environment {
        name: "tiny".into(),
        description: "a small one".into(),
        image: "envgate/busybox:latest".into(),
        shell: "/bin/sh".into(),
        env: vec!["GREETING=hi".into()],
        mode: "ephemeral".into(),
        idle_timeout_seconds: 90,
        allowed_groups: vec!["students".into()],
        cpus: 0.5,
        memory_bytes: 64 << 20,
        pids_limit: 128,
        max_lifetime_seconds: 3600,
        ..Default::default()
    };
    let busybox = pb::Environment {
        name: "busybox".into(),
        description: "BusyBox shell".into(),
        image: "envgate/busybox:latest".into(),
        shell: "/bin/sh".into(),
        mode: "persistent".into(),
        idle_timeout_seconds: 900,
        is_default: true,
        ..Default::default()
    };
    assert_eq!(seeded, [busybox.clone(), tiny.clone()]);

    // An operator adds `mine` as the default and edits the file's `tiny` through the API.
    for environment in [
        pb::Environment {
            name: "mine".into(),
            image: "envgate/debian:latest".into(),
            is_default: true,
            ..Default::default()
        },
        pb::Environment {
            description: "edited".into(),
            ..tiny.clone()
        },
    ] {
        admin
            .put_environment(authorized(
                BINARY_ADMIN_TOKEN,
                pb::PutEnvironmentRequest {
                    environment: Some(environment),
                },
            ))
            .await
            .unwrap();
    }
    terminate(child).await;

    // At the next start the file wins for its own environments; `mine` stays, no longer
    // the default because the file names one.
    let mut child = controlplane(&files, &etcd.endpoint(), grpc, &catalogue)
        .spawn()
        .unwrap();
    let mut admin = admin_of(grpc, &mut child).await;
    let after = list(&mut admin, BINARY_ADMIN_TOKEN).await;
    let names: Vec<(&str, &str, bool)> = after
        .iter()
        .map(|e| (e.name.as_str(), e.description.as_str(), e.is_default))
        .collect();
    assert_eq!(
        names,
        [
            ("busybox", "BusyBox shell", true),
            ("mine", "", false),
            ("tiny", "a small one", false)
        ]
    );
    terminate(child).await;
}

#[tokio::test]
async fn a_bad_file_stops_the_binary_before_it_serves() {
    let etcd = Etcd::start().await.expect("etcd starts");
    let files = Files::new();
    let bad = files.write(
        "environments.yaml",
        "environments:\n  - name: busybox\n    image: envgate/busybox:latest\n  \
         - name: gpu\n    image: lab/cuda\n    resources:\n      memory: 12XB\n",
    );
    let grpc = free_port();
    let child = controlplane(&files, &etcd.endpoint(), grpc, &bad)
        .spawn()
        .unwrap();
    let out = finish(child, Duration::from_secs(10)).await;
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        stderr.trim_end(),
        format!(
            "envgate-controlplane: --environments: catalogue {bad}: environments[1] (\"gpu\"): \
             resources.memory: \"12XB\" is not a size (use bytes, or a number with K, M, G, T, \
             Ki, Mi, Gi, Ti) at line 7 column 15"
        )
    );
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", grpc)).is_err(),
        "nothing listens"
    );

    let missing = files.path("nowhere.yaml");
    let child = controlplane(&files, &etcd.endpoint(), grpc, &missing)
        .spawn()
        .unwrap();
    let out = finish(child, Duration::from_secs(10)).await;
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.starts_with(&format!(
            "envgate-controlplane: --environments: catalogue {missing}: cannot read it: "
        )),
        "{stderr}"
    );

    // Nothing of the bad file reached etcd.
    let store = EtcdStore::connect(&[etcd.endpoint()], "/catbin/", Duration::from_secs(5))
        .await
        .unwrap();
    assert!(
        envgate_controlplane::store::Store::range(&store, "environments/")
            .await
            .unwrap()
            .is_empty()
    );
}
