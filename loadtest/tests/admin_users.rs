//! `users`: keys on disk, users created through a real gRPC Admin server
//! (in-process, recording what it was sent) with the bearer token.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use envgate_loadtest::users;
use envgate_proto::admin::v1::admin_server::{Admin, AdminServer};
use envgate_proto::admin::v1::*;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Response, Status};

const TOKEN: &str = "t0ken";

/// Answers PutUser like the control plane's contract says (bearer checked,
/// user echoed back) and records it; every other call is refused.
#[derive(Default)]
struct RecordingAdmin {
    put: Arc<Mutex<Vec<User>>>,
}

fn check_bearer<T>(request: &Request<T>) -> Result<(), Status> {
    let expected = format!("Bearer {TOKEN}");
    match request
        .metadata()
        .get(envgate_proto::metadata::AUTHORIZATION)
    {
        Some(v) if v.to_str().ok() == Some(expected.as_str()) => Ok(()),
        _ => Err(Status::unauthenticated("admin token missing or wrong")),
    }
}

fn refused<T>() -> Result<Response<T>, Status> {
    Err(Status::unimplemented("not used by the load test"))
}

#[tonic::async_trait]
impl Admin for RecordingAdmin {
    async fn put_user(&self, request: Request<PutUserRequest>) -> Result<Response<User>, Status> {
        check_bearer(&request)?;
        let user = request
            .into_inner()
            .user
            .ok_or_else(|| Status::invalid_argument("no user"))?;
        self.put.lock().unwrap().push(user.clone());
        Ok(Response::new(user))
    }
    async fn list_users(
        &self,
        _: Request<ListUsersRequest>,
    ) -> Result<Response<ListUsersResponse>, Status> {
        refused()
    }
    async fn get_user(&self, _: Request<GetUserRequest>) -> Result<Response<User>, Status> {
        refused()
    }
    async fn delete_user(
        &self,
        _: Request<DeleteUserRequest>,
    ) -> Result<Response<DeleteUserResponse>, Status> {
        refused()
    }
    async fn list_environments(
        &self,
        _: Request<ListEnvironmentsRequest>,
    ) -> Result<Response<ListEnvironmentsResponse>, Status> {
        refused()
    }
    async fn put_environment(
        &self,
        _: Request<PutEnvironmentRequest>,
    ) -> Result<Response<Environment>, Status> {
        refused()
    }
    async fn delete_environment(
        &self,
        _: Request<DeleteEnvironmentRequest>,
    ) -> Result<Response<DeleteEnvironmentResponse>, Status> {
        refused()
    }
    async fn list_sessions(
        &self,
        _: Request<ListSessionsRequest>,
    ) -> Result<Response<ListSessionsResponse>, Status> {
        refused()
    }
    async fn list_containers(
        &self,
        _: Request<ListContainersRequest>,
    ) -> Result<Response<ListContainersResponse>, Status> {
        refused()
    }
    async fn list_proxies(
        &self,
        _: Request<ListProxiesRequest>,
    ) -> Result<Response<ListProxiesResponse>, Status> {
        refused()
    }
    async fn drain_proxy(
        &self,
        _: Request<DrainProxyRequest>,
    ) -> Result<Response<DrainProxyResponse>, Status> {
        refused()
    }
    async fn kill_session(
        &self,
        _: Request<KillSessionRequest>,
    ) -> Result<Response<KillSessionResponse>, Status> {
        refused()
    }
    async fn stop_container(
        &self,
        _: Request<StopContainerRequest>,
    ) -> Result<Response<StopContainerResponse>, Status> {
        refused()
    }
    async fn delete_container(
        &self,
        _: Request<DeleteContainerRequest>,
    ) -> Result<Response<DeleteContainerResponse>, Status> {
        refused()
    }
    async fn revoke_user_tokens(
        &self,
        _: Request<RevokeUserTokensRequest>,
    ) -> Result<Response<RevokeUserTokensResponse>, Status> {
        refused()
    }
    async fn status(&self, _: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        refused()
    }
    async fn list_recordings(
        &self,
        _: Request<envgate_proto::admin::v1::ListRecordingsRequest>,
    ) -> Result<Response<envgate_proto::admin::v1::ListRecordingsResponse>, Status> {
        refused()
    }
    async fn get_recording(
        &self,
        _: Request<envgate_proto::admin::v1::GetRecordingRequest>,
    ) -> Result<Response<envgate_proto::admin::v1::Recording>, Status> {
        refused()
    }
    async fn list_certificate_authorities(
        &self,
        _: Request<envgate_proto::admin::v1::ListCertificateAuthoritiesRequest>,
    ) -> Result<Response<envgate_proto::admin::v1::ListCertificateAuthoritiesResponse>, Status>
    {
        refused()
    }
    async fn revoke_certificate(
        &self,
        _: Request<envgate_proto::admin::v1::RevokeCertificateRequest>,
    ) -> Result<Response<envgate_proto::admin::v1::CertificateRevocation>, Status> {
        refused()
    }
    async fn list_certificate_revocations(
        &self,
        _: Request<envgate_proto::admin::v1::ListCertificateRevocationsRequest>,
    ) -> Result<Response<envgate_proto::admin::v1::ListCertificateRevocationsResponse>, Status>
    {
        refused()
    }
}

#[tokio::test]
async fn users_are_created_with_their_keys_and_the_bearer_token() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let admin = RecordingAdmin::default();
    let put = admin.put.clone();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(AdminServer::new(admin))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );

    let dir = tempfile::tempdir().unwrap();
    let created = users::generate(dir.path(), "lt", 3).unwrap();
    let timeout = Duration::from_secs(10);
    users::create_users(&url, None, TOKEN, &created, Some("busybox"), timeout)
        .await
        .unwrap();
    {
        let put = put.lock().unwrap();
        let names: Vec<&str> = put.iter().map(|u| u.name.as_str()).collect();
        assert_eq!(names, ["lt0001", "lt0002", "lt0003"]);
        for (user, (_, public)) in put.iter().zip(&created) {
            assert_eq!(user.authorized_keys, vec![public.clone()]);
            assert_eq!(user.default_environment, "busybox");
            assert!(!user.disabled);
        }
    }

    let err = users::create_users(&url, None, "wrong", &created, None, timeout)
        .await
        .unwrap_err();
    match err {
        users::UsersError::Admin { user, status } => {
            assert_eq!(user, "lt0001");
            assert_eq!(status.code(), tonic::Code::Unauthenticated);
        }
        other => panic!("expected an admin error, got {other}"),
    }
    assert_eq!(
        put.lock().unwrap().len(),
        3,
        "nothing created with a wrong token"
    );
    server.abort();

    // Nothing listens any more: a clear connect error, within the timeout.
    let _ = server.await;
    let err = users::create_users(&url, None, TOKEN, &created, None, Duration::from_secs(2))
        .await
        .unwrap_err();
    assert!(matches!(err, users::UsersError::Connect { .. }), "{err}");
}
