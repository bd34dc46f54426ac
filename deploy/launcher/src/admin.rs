//! The operator's side of the admin API, for what `fleet up` and `fleet status` ask.

use std::time::Duration;

use envgate_proto::admin::v1 as api;
use tonic::transport::Channel;

use crate::{Error, Spec};

/// Bound on connecting and on one call.
const TIMEOUT: Duration = Duration::from_secs(10);

/// An admin client of the replica at `addr` (TLS against the fleet CA, no client
/// certificate: an operator), and the bearer token to send.
pub struct Admin {
    client: api::admin_client::AdminClient<Channel>,
    token: String,
}

impl Admin {
    pub async fn connect(spec: &Spec, addr: &str) -> Result<Admin, Error> {
        let ca = std::fs::read(spec.fleet_ca())
            .map_err(Error::io(format!("read {}", spec.fleet_ca().display())))?;
        let failed = |e: String| Error::Failed(format!("the admin API at {addr}: {e}"));
        let tls = tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(ca))
            .domain_name("localhost");
        let endpoint = tonic::transport::Endpoint::from_shared(format!("https://{addr}"))
            .map_err(|e| failed(e.to_string()))?
            .tls_config(tls)
            .map_err(|e| failed(e.to_string()))?
            .connect_timeout(TIMEOUT)
            .timeout(TIMEOUT);
        let channel = tokio::time::timeout(TIMEOUT, endpoint.connect())
            .await
            .map_err(|_| failed("connect timed out".into()))?
            .map_err(|e| failed(e.to_string()))?;
        Ok(Admin {
            client: api::admin_client::AdminClient::new(channel),
            token: spec.admin_token()?,
        })
    }

    fn authorized<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        let value = format!("Bearer {}", self.token)
            .parse()
            .expect("a hex token is ASCII");
        request
            .metadata_mut()
            .insert(envgate_proto::metadata::AUTHORIZATION, value);
        request
    }

    /// Creates or replaces `name` with one authorized key, in group `users`.
    pub async fn put_user(
        &mut self,
        name: &str,
        public_key: &str,
        default_environment: &str,
    ) -> Result<(), Error> {
        let request = self.authorized(api::PutUserRequest {
            user: Some(api::User {
                name: name.to_owned(),
                authorized_keys: vec![public_key.trim().to_owned()],
                groups: vec!["users".into()],
                default_environment: default_environment.to_owned(),
                ..Default::default()
            }),
            ..Default::default()
        });
        self.client
            .put_user(request)
            .await
            .map_err(|s| Error::Failed(format!("PutUser {name}: {}", s.message())))?;
        Ok(())
    }

    pub async fn list_proxies(&mut self) -> Result<Vec<api::Proxy>, Error> {
        let request = self.authorized(api::ListProxiesRequest {});
        Ok(self
            .client
            .list_proxies(request)
            .await
            .map_err(|s| Error::Failed(format!("ListProxies: {}", s.message())))?
            .into_inner()
            .proxies)
    }
}
