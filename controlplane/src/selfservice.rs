//! `envgate.v1.SelfService`: a user's own questions about their environments, asked through
//! the `user+envgate` pseudo-environment (`ssh alice+envgate@host envs|status|stop|default`)
//! and the proxy's interactive menu.
//!
//! Every call verifies the token and acts only for its subject: the keys read and written are
//! all derived from `claims.sub`, never from the request, so one user cannot see or stop
//! another's containers. Stopping goes through the reaper's own claim
//! (`Reconciler::remove_now`), so an OpenSession racing a stop still ends with a live
//! container. Home volumes are never touched.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use envgate_proto::names;
use envgate_proto::token::Claims;
use envgate_proto::v1::self_service_server::SelfService;
use envgate_proto::v1::{
    SelfEnvironmentRequest, SelfRequest, SetDefaultResponse, StopEnvironmentResponse,
    UserContainer, UserEnvironment, UserEnvironments, UserSession, UserStatus,
};
use tonic::{Request, Response, Status};

use crate::admin::DEFAULT_IDLE_TIMEOUT_SECONDS;
use crate::auth::Authenticator;
use crate::error::SelfServiceError;
use crate::fleet;
use crate::model::{
    self, CommandRecord, ContainerRecord, ContainerState, EnvironmentRecord, Mode, SessionRecord,
    UserRecord,
};
use crate::reconcile::Reconciler;
use crate::store::{self, Compare, Store, TxnOp, Versioned};

/// The reason logged and counted (`envgate_reconcile_actions_total`) for a user's stop.
const STOP_REASON: &str = "stopped by its user";
/// How long a stop waits for the proxies to show the stop message and close the sessions it
/// ended before the container goes. Removing it first would cut the sessions' processes, and
/// the user would see them die instead of being told why. A proxy closes a killed
/// connection within its 2 s kill grace, so this is only reached when a proxy is gone.
const SESSIONS_CLOSE_WAIT: Duration = Duration::from_secs(5);
const SESSIONS_POLL: Duration = Duration::from_millis(100);
/// Attempts at a compare-and-swap (user record, container removal) before giving up.
const CAS_ATTEMPTS: usize = 8;

pub struct SelfServiceHandler {
    store: Arc<dyn Store>,
    auth: Arc<Authenticator>,
    reconciler: Arc<Reconciler>,
}

impl SelfServiceHandler {
    pub fn new(
        store: Arc<dyn Store>,
        auth: Arc<Authenticator>,
        reconciler: Arc<Reconciler>,
    ) -> Self {
        Self {
            store,
            auth,
            reconciler,
        }
    }

    async fn catalogue(&self) -> Result<Vec<EnvironmentRecord>, SelfServiceError> {
        let mut catalogue: Vec<EnvironmentRecord> =
            store::range_json(self.store.as_ref(), model::ENVIRONMENTS)
                .await?
                .into_iter()
                .map(|(_, v)| v.value)
                .collect();
        catalogue.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(catalogue)
    }

    /// The user's placement records, persistent and ephemeral.
    async fn containers(
        &self,
        user: &str,
    ) -> Result<Vec<(String, Versioned<ContainerRecord>)>, SelfServiceError> {
        Ok(store::range_json(self.store.as_ref(), &model::user_containers(user)).await?)
    }

    async fn sessions(&self, user: &str) -> Result<Vec<SessionRecord>, SelfServiceError> {
        let sessions: Vec<(String, Versioned<SessionRecord>)> =
            store::range_json(self.store.as_ref(), model::SESSIONS).await?;
        Ok(sessions
            .into_iter()
            .map(|(_, s)| s.value)
            .filter(|s| s.user == user)
            .collect())
    }

    pub async fn list_environments(
        &self,
        token: &str,
    ) -> Result<UserEnvironments, SelfServiceError> {
        let claims = self.auth.verify_token(token).await?;
        let catalogue = self.catalogue().await?;
        let running: HashSet<String> = self
            .containers(&claims.sub)
            .await?
            .into_iter()
            .filter(|(_, c)| c.value.state == ContainerState::Running)
            .map(|(_, c)| c.value.environment)
            .collect();
        let user: Option<Versioned<UserRecord>> =
            store::get_json(self.store.as_ref(), &model::user_key(&claims.sub)).await?;
        let catalogue_default = catalogue
            .iter()
            .find(|e| e.is_default)
            .map(|e| e.name.clone())
            .unwrap_or_default();
        let environments = catalogue
            .into_iter()
            .filter(|e| e.allows(&claims.groups))
            .map(|e| UserEnvironment {
                running: running.contains(&e.name),
                mode: e.mode.as_str().to_owned(),
                idle_timeout_seconds: e.idle_timeout_seconds,
                max_lifetime_seconds: e.max_lifetime_seconds,
                name: e.name,
                description: e.description,
            })
            .collect();
        Ok(UserEnvironments {
            environments,
            user_default: user
                .map(|u| u.value.default_environment)
                .unwrap_or_default(),
            catalogue_default,
        })
    }

    pub async fn status(&self, token: &str) -> Result<UserStatus, SelfServiceError> {
        let claims = self.auth.verify_token(token).await?;
        let environments: HashMap<String, EnvironmentRecord> = self
            .catalogue()
            .await?
            .into_iter()
            .map(|e| (e.name.clone(), e))
            .collect();
        let mut sessions = self.sessions(&claims.sub).await?;
        sessions.sort_by(|a, b| (a.started_at, &a.id).cmp(&(b.started_at, &b.id)));
        let now = model::now();
        let mut containers: Vec<UserContainer> = self
            .containers(&claims.sub)
            .await?
            .into_iter()
            .map(|(key, record)| {
                let open = sessions.iter().filter(|s| s.container_key == key).count();
                container_status(
                    &record.value,
                    environments.get(&record.value.environment),
                    open,
                    now,
                )
            })
            .collect();
        containers
            .sort_by(|a, b| (&a.environment, a.created_at).cmp(&(&b.environment, b.created_at)));
        let sessions = sessions
            .into_iter()
            .map(|s| UserSession {
                id: s.id,
                environment: s.environment,
                client_address: s.client_address,
                kind: s.kind,
                started_at: s.started_at,
                proxy_id: s.proxy_id,
            })
            .collect();
        Ok(UserStatus {
            containers,
            sessions,
        })
    }

    /// Ends the sessions in the user's container(s) for `environment` and removes them.
    pub async fn stop_environment(
        &self,
        token: &str,
        environment: &str,
    ) -> Result<StopEnvironmentResponse, SelfServiceError> {
        let claims = self.auth.verify_token(token).await?;
        if names::validate_environment(environment).is_err() {
            return Err(self.unknown(&claims, environment).await?);
        }
        let persistent = model::container_key(&claims.sub, environment);
        let ephemeral = format!("{persistent}/");
        let keys: Vec<String> = self
            .containers(&claims.sub)
            .await?
            .into_iter()
            .map(|(key, _)| key)
            .filter(|key| *key == persistent || key.starts_with(&ephemeral))
            .collect();
        if keys.is_empty() {
            // A container of an environment since deleted from the catalogue can still be
            // stopped above; nothing to stop in one that never existed is a typo.
            if !self
                .catalogue()
                .await?
                .iter()
                .any(|e| e.name == environment)
            {
                return Err(self.unknown(&claims, environment).await?);
            }
            return Ok(StopEnvironmentResponse {
                stopped: false,
                sessions_ended: 0,
            });
        }
        let message = stop_message(&claims.sub, environment);
        let mut sessions_ended = 0;
        for key in &keys {
            sessions_ended +=
                fleet::command_container_sessions(self.store.as_ref(), key, |session_id| {
                    CommandRecord::KillSession {
                        session_id,
                        message: message.clone(),
                    }
                })
                .await?;
        }
        if sessions_ended > 0 {
            self.wait_sessions_closed(&keys).await?;
        }
        for key in &keys {
            self.remove(key).await?;
        }
        tracing::info!(user = %claims.sub, environment, containers = keys.len(), sessions_ended, "environment stopped by its user");
        Ok(StopEnvironmentResponse {
            stopped: true,
            sessions_ended,
        })
    }

    /// Waits (bounded) until no session is attached to any of `keys`.
    async fn wait_sessions_closed(&self, keys: &[String]) -> Result<(), SelfServiceError> {
        let deadline = Instant::now() + SESSIONS_CLOSE_WAIT;
        loop {
            let sessions: Vec<(String, Versioned<SessionRecord>)> =
                store::range_json(self.store.as_ref(), model::SESSIONS).await?;
            let open = sessions
                .iter()
                .filter(|(_, s)| keys.contains(&s.value.container_key))
                .count();
            if open == 0 {
                return Ok(());
            }
            if Instant::now() >= deadline {
                tracing::warn!(
                    open,
                    "sessions still open after the stop message; removing the container anyway"
                );
                return Ok(());
            }
            tokio::time::sleep(SESSIONS_POLL).await;
        }
    }

    /// Removes the container under `key` through the reaper's claim, retrying while a
    /// CloseSession or OpenSession moves the record on. A record already gone is fine: the
    /// container is gone too (an ephemeral session's close removes its own).
    async fn remove(&self, key: &str) -> Result<(), SelfServiceError> {
        for _ in 0..CAS_ATTEMPTS {
            if self.reconciler.remove_now(key, STOP_REASON).await? {
                return Ok(());
            }
            if self.store.get(key).await?.is_none() {
                return Ok(());
            }
        }
        Err(SelfServiceError::Changed(format!("container {key:?}")))
    }

    /// Saves `environment` as the user's default ("" clears it).
    pub async fn set_default(
        &self,
        token: &str,
        environment: &str,
    ) -> Result<(), SelfServiceError> {
        let claims = self.auth.verify_token(token).await?;
        if !environment.is_empty() {
            let catalogue = self.catalogue().await?;
            match catalogue.iter().find(|e| e.name == environment) {
                None => return Err(unknown_environment(&claims, &catalogue, environment)),
                Some(env) if !env.allows(&claims.groups) => {
                    return Err(SelfServiceError::Forbidden(environment.to_owned()));
                }
                Some(_) => {}
            }
        }
        let key = model::user_key(&claims.sub);
        for _ in 0..CAS_ATTEMPTS {
            let Some(current) = store::get_json::<UserRecord>(self.store.as_ref(), &key).await?
            else {
                return Err(SelfServiceError::UnknownUser(claims.sub.clone()));
            };
            if current.value.default_environment == environment {
                return Ok(());
            }
            let updated = UserRecord {
                default_environment: environment.to_owned(),
                ..current.value
            };
            let written = self
                .store
                .txn(
                    vec![Compare::revision(&key, current.mod_revision)],
                    vec![TxnOp::put_json(&key, &updated, None)],
                )
                .await?;
            if written.is_some() {
                tracing::info!(user = %claims.sub, default = environment, "default environment saved by its user");
                return Ok(());
            }
        }
        Err(SelfServiceError::Changed(format!("user {:?}", claims.sub)))
    }

    async fn unknown(
        &self,
        claims: &Claims,
        requested: &str,
    ) -> Result<SelfServiceError, SelfServiceError> {
        let catalogue = self.catalogue().await?;
        Ok(unknown_environment(claims, &catalogue, requested))
    }
}

/// NOT_FOUND naming what the user may use instead; the name is escaped because the message
/// ends up on the user's terminal.
fn unknown_environment(
    claims: &Claims,
    catalogue: &[EnvironmentRecord],
    requested: &str,
) -> SelfServiceError {
    SelfServiceError::UnknownEnvironment {
        requested: requested.escape_default().to_string(),
        available: catalogue
            .iter()
            .filter(|e| e.allows(&claims.groups))
            .map(|e| e.name.clone())
            .collect(),
    }
}

/// What the sessions a stop ends are told.
pub fn stop_message(user: &str, environment: &str) -> String {
    format!(
        "environment \"{environment}\" was stopped (ssh {user}+envgate stop {environment}); your home directory is kept"
    )
}

/// One container as its user sees it. `env` is `None` when the environment was deleted from
/// the catalogue; the reaper then uses the default idle timeout, and so does this.
fn container_status(
    record: &ContainerRecord,
    env: Option<&EnvironmentRecord>,
    sessions: usize,
    now: i64,
) -> UserContainer {
    let idle_timeout = env.map_or(DEFAULT_IDLE_TIMEOUT_SECONDS, |e| e.idle_timeout_seconds);
    let ephemeral = !record.session_id.is_empty() || env.is_some_and(|e| e.mode == Mode::Ephemeral);
    let idle_seconds_left = if sessions > 0 {
        -1
    } else if ephemeral {
        // Its session is gone; the reaper removes it on its next pass.
        0
    } else {
        (record.last_active_at + i64::from(idle_timeout) - now).max(0)
    };
    let lifetime_seconds_left = match env.map_or(0, |e| e.max_lifetime_seconds) {
        0 => -1,
        max => (record.created_at + i64::from(max) - now).max(0),
    };
    UserContainer {
        environment: record.environment.clone(),
        state: record.state.as_str().to_owned(),
        container_name: record.container_name.clone(),
        created_at: record.created_at,
        last_active_at: record.last_active_at,
        sessions: u32::try_from(sessions).unwrap_or(u32::MAX),
        idle_seconds_left,
        lifetime_seconds_left,
    }
}

/// The gRPC face of [`SelfServiceHandler`].
pub struct SelfServiceService {
    handler: Arc<SelfServiceHandler>,
}

impl SelfServiceService {
    pub fn new(handler: Arc<SelfServiceHandler>) -> Self {
        Self { handler }
    }
}

#[tonic::async_trait]
impl SelfService for SelfServiceService {
    async fn list_environments(
        &self,
        request: Request<SelfRequest>,
    ) -> Result<Response<UserEnvironments>, Status> {
        let req = request.into_inner();
        Ok(Response::new(
            self.handler.list_environments(&req.token).await?,
        ))
    }

    async fn status(&self, request: Request<SelfRequest>) -> Result<Response<UserStatus>, Status> {
        let req = request.into_inner();
        Ok(Response::new(self.handler.status(&req.token).await?))
    }

    async fn stop_environment(
        &self,
        request: Request<SelfEnvironmentRequest>,
    ) -> Result<Response<StopEnvironmentResponse>, Status> {
        let req = request.into_inner();
        Ok(Response::new(
            self.handler
                .stop_environment(&req.token, &req.environment)
                .await?,
        ))
    }

    async fn set_default(
        &self,
        request: Request<SelfEnvironmentRequest>,
    ) -> Result<Response<SetDefaultResponse>, Status> {
        let req = request.into_inner();
        self.handler
            .set_default(&req.token, &req.environment)
            .await?;
        Ok(Response::new(SetDefaultResponse {}))
    }
}
