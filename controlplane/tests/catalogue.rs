//! The environment catalogue: `PutEnvironment` checks the warm pool and maximum lifetime, and
//! the real `envgate-controlplane` binary seeds its `--environments` file into a real etcd,
//! keeps environments made through the admin API, and refuses a bad file before serving.

mod common;

use std::time::Duration;

use common::admin_request;
use common::binary::{Files, finish, free_port, terminate};
use envgate_controlplane::store::EtcdStore;
use envgate_controlplane::testkit::Etcd;
use envgate_proto::admin::v1 as pb;
use envgate_proto::admin::v1::admin_client::AdminClient;
use envgate_proto::v1::EnvironmentMode;
use tokio::process::{Child, Command};
use tonic::Code;
use tonic::transport::Channel;

async fn list(admin: &mut AdminClient<Channel>) -> Vec<pb::Environment> {
    admin
        .list_environments(admin_request(pb::ListEnvironmentsRequest {}))
        .await
        .expect("ListEnvironments")
        .into_inner()
        .environments
}

#[tokio::test]
async fn put_environment_checks_the_warm_pool_and_the_maximum_lifetime() {
    let (_etcd, plane) = common::with_etcd("catalogue").await;
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
            .put_environment(admin_request(pb::PutEnvironmentRequest {
                environment: Some(environment),
            }))
            .await
            .unwrap_err();
        assert_eq!(
            (status.code(), status.message()),
            (Code::InvalidArgument, expected)
        );
    }
    assert!(list(&mut admin).await.is_empty(), "nothing was saved");

    let saved = admin
        .put_environment(admin_request(pb::PutEnvironmentRequest {
            environment: Some(pb::Environment {
                warm_pool_size: 300,
                max_lifetime_seconds: 10,
                ..base.clone()
            }),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (saved.warm_pool_size, saved.max_lifetime_seconds),
        (300, 10)
    );
    assert_eq!(list(&mut admin).await, [saved]);
    plane.stop().await;
}

/// The control plane with `ENVGATE_ENVIRONMENTS=catalogue` (the variable the Kubernetes
/// manifest sets).
fn controlplane(files: &Files, etcd: &str, grpc: u16, catalogue: &str) -> Command {
    let mut cmd = common::binary::command(files, etcd, grpc, free_port());
    cmd.env("ENVGATE_ENVIRONMENTS", catalogue).args([
        "--instance",
        "catbin",
        "--etcd-prefix",
        "/catbin/",
    ]);
    cmd
}

/// Starts the binary on `catalogue`, which it must refuse before serving: exit status 2
/// within 10 s. Its stderr.
async fn refused(files: &Files, etcd: &str, grpc: u16, catalogue: &str) -> String {
    let child = controlplane(files, etcd, grpc, catalogue).spawn().unwrap();
    let out = finish(child, Duration::from_secs(10)).await;
    assert_eq!(out.status.code(), Some(2));
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// An admin client once the binary's gRPC port answers.
async fn admin_of(files: &Files, grpc: u16, child: &mut Child) -> AdminClient<Channel> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let addr = format!("127.0.0.1:{grpc}");
        if let Ok(channel) = files.pki.connect(&addr, None).await {
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
    let files = Files::for_etcd(&etcd);
    let catalogue = files.write("environments.yaml", CATALOGUE);
    let grpc = free_port();
    let mut child = controlplane(&files, &etcd.endpoint(), grpc, &catalogue)
        .spawn()
        .unwrap();
    let mut admin = admin_of(&files, grpc, &mut child).await;
    let seeded = list(&mut admin).await;
    let tiny = pb::Environment {
        name: "tiny".into(),
        description: "a small one".into(),
        image: "envgate/busybox:latest".into(),
        shell: "/bin/sh".into(),
        env: vec!["GREETING=hi".into()],
        environment_mode: EnvironmentMode::Ephemeral.into(),
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
        environment_mode: EnvironmentMode::Persistent.into(),
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
            .put_environment(admin_request(pb::PutEnvironmentRequest {
                environment: Some(environment),
            }))
            .await
            .unwrap();
    }
    terminate(child).await;

    // At the next start the file wins for its own environments; `mine` stays, no longer
    // the default because the file names one.
    let mut child = controlplane(&files, &etcd.endpoint(), grpc, &catalogue)
        .spawn()
        .unwrap();
    let mut admin = admin_of(&files, grpc, &mut child).await;
    let after = list(&mut admin).await;
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
    let files = Files::for_etcd(&etcd);
    let bad = files.write(
        "environments.yaml",
        "environments:\n  - name: busybox\n    image: envgate/busybox:latest\n  \
         - name: gpu\n    image: lab/cuda\n    resources:\n      memory: 12XB\n",
    );
    let grpc = free_port();
    let stderr = refused(&files, &etcd.endpoint(), grpc, &bad).await;
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
    let stderr = refused(&files, &etcd.endpoint(), grpc, &missing).await;
    assert_eq!(
        stderr.trim_end(),
        format!(
            "envgate-controlplane: --environments: catalogue {missing}: cannot read it: \
             No such file or directory (os error 2)"
        )
    );

    // Nothing of the bad file reached etcd.
    let store = EtcdStore::connect(&etcd.config(), "/catbin/", Duration::from_secs(5))
        .await
        .unwrap();
    assert!(
        envgate_controlplane::store::Store::range(&store, "environments/")
            .await
            .unwrap()
            .is_empty()
    );
}
