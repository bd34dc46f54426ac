//! `envgate.v1.SelfService`: a user's own questions about their environments, asked through
//! the `user+envgate` pseudo-environment (`ssh alice+envgate@host envs|status|stop|default`)
//! and the proxy's interactive menu.
//!
//! Every call verifies the token and acts only for its subject: the keys read and written are
//! all derived from `claims.sub`, never from the request, so one user cannot see or stop
//! another's containers. Stopping goes through the reaper's own claim
//! (`Reconciler::remove_now`), so an OpenSession racing a stop still ends with a live
//! container. Home volumes are never touched.

use std::collections::HashSet;
use std::sync::Arc;

use envgate_proto::audit::Event;
use envgate_proto::names;
use envgate_proto::token::Claims;
use envgate_proto::v1::self_service_server::SelfService;
use envgate_proto::v1::{
    self as wire, CertificateAuthorityKeys, IssueCertificateRequest, IssuedCertificate,
    SelfEnvironmentRequest, SelfRequest, SetDefaultResponse, StopEnvironmentResponse,
    UserContainer, UserEnvironment, UserEnvironments, UserSession, UserStatus,
};
use tonic::{Request, Response, Status};

use crate::auth::Authenticator;
use crate::catalogue;
use crate::error::{AuthError, SelfServiceError};
use crate::model::{
    self, ContainerRecord, ContainerState, EnvironmentRecord, Mode, SessionRecord, UserRecord,
};
use crate::reconcile::{self, Reconciler};
use crate::sshca;
use crate::store::{self, Compare, Store, TxnOp, Versioned};

/// The reason logged for a user's stop (counted as the reconciler's `remove_requested`).
const STOP_REASON: &str = "stopped by its user";
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

    /// The catalogue in name order (`catalogue::environments` reads it in key order).
    async fn catalogue(&self) -> Result<Vec<EnvironmentRecord>, SelfServiceError> {
        Ok(catalogue::environments(self.store.as_ref()).await?)
    }

    /// The user's placement records, persistent and ephemeral.
    async fn containers(
        &self,
        user: &str,
    ) -> Result<Vec<(String, Versioned<ContainerRecord>)>, SelfServiceError> {
        Ok(store::range_json(self.store.as_ref(), &model::user_containers(user)).await?)
    }

    async fn sessions(&self, user: &str) -> Result<Vec<SessionRecord>, SelfServiceError> {
        self.reconciler.settle_closes().await;
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
        let user_key = model::user_key(&claims.sub);
        // Independent reads: the menu waits for one round trip, not three.
        let (catalogue, containers, user) =
            tokio::try_join!(self.catalogue(), self.containers(&claims.sub), async {
                Ok(store::get_json::<UserRecord>(self.store.as_ref(), &user_key).await?)
            },)?;
        let running: HashSet<String> = containers
            .into_iter()
            .filter(|(_, c)| c.value.state == ContainerState::Running)
            .map(|(_, c)| c.value.environment)
            .collect();
        let catalogue_default = catalogue
            .iter()
            .find(|e| e.is_default)
            .map(|e| e.name.clone())
            .unwrap_or_default();
        let environments: Vec<UserEnvironment> = catalogue
            .into_iter()
            .filter(|e| e.allows(&claims.groups))
            .map(|e| UserEnvironment {
                running: running.contains(&e.name),
                environment_mode: wire::EnvironmentMode::from(e.mode).into(),
                idle_timeout_seconds: e.idle_timeout_seconds,
                max_lifetime_seconds: e.max_lifetime_seconds,
                name: e.name,
                description: e.description,
            })
            .collect();
        let mut user_default = user
            .map(|u| u.value.default_environment)
            .unwrap_or_default();
        // What a login without an environment would get, so the menu is not shown when the
        // config webhook chooses (placement checks its answer the same way).
        if user_default.is_empty()
            && let Some(chosen) = self.auth.configured_environment(&claims.sub, "").await
            && environments
                .iter()
                .any(|e: &UserEnvironment| e.name == chosen)
        {
            user_default = chosen;
        }
        Ok(UserEnvironments {
            environments,
            user_default,
            catalogue_default,
        })
    }

    pub async fn status(&self, token: &str) -> Result<UserStatus, SelfServiceError> {
        let claims = self.auth.verify_token(token).await?;
        let (environments, mut sessions, containers) = tokio::try_join!(
            async { Ok(catalogue::environments_by_name(self.store.as_ref()).await?) },
            self.sessions(&claims.sub),
            self.containers(&claims.sub),
        )?;
        sessions.sort_by(|a, b| (a.started_at, &a.id).cmp(&(b.started_at, &b.id)));
        // The reaper's time, so what is left is what the reaper will judge.
        let now = self.reconciler.now();
        let mut containers: Vec<UserContainer> = containers
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
                session_kind: wire::SessionKind::from(s.kind).into(),
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
            let catalogue = self.catalogue().await?;
            if !catalogue.iter().any(|e| e.name == environment) {
                return Err(catalogue::unknown(&catalogue, &claims.groups, environment).into());
            }
            return Ok(StopEnvironmentResponse {
                stopped: false,
                sessions_ended: 0,
            });
        }
        let message = stop_message(&claims.sub, environment);
        let mut sessions_ended = 0;
        for key in &keys {
            sessions_ended += self.remove(key, &message).await?;
        }
        tracing::info!(user = %claims.sub, environment, containers = keys.len(), sessions_ended, "environment stopped by its user");
        Ok(StopEnvironmentResponse {
            stopped: true,
            sessions_ended,
        })
    }

    /// Removes the container under `key` through the reaper's claim (which ends its sessions
    /// with `message` after the claim, so none attaches meanwhile), retrying while a
    /// CloseSession or OpenSession moves the record on; returns how many sessions were
    /// ended. A record already gone is fine: the container is gone too (an ephemeral
    /// session's close removes its own).
    async fn remove(&self, key: &str, message: &str) -> Result<u32, SelfServiceError> {
        for _ in 0..CAS_ATTEMPTS {
            if let Some(ended) = self
                .reconciler
                .remove_now(key, STOP_REASON, Some(message))
                .await?
            {
                return Ok(ended);
            }
            if self.store.get(key).await?.is_none() {
                return Ok(0);
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
            catalogue::choose(&catalogue, &claims.groups, environment)?;
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
        Ok(catalogue::unknown(&catalogue, &claims.groups, requested).into())
    }
}

/// What the sessions a stop ends are told.
fn stop_message(user: &str, environment: &str) -> String {
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
    let ephemeral = !record.session_id.is_empty() || env.is_some_and(|e| e.mode == Mode::Ephemeral);
    let idle_seconds_left = if sessions > 0 {
        -1
    } else if ephemeral {
        // Its session is gone; the reaper removes it on its next pass.
        0
    } else {
        (record.last_active_at + reconcile::idle_timeout(env) - now).max(0)
    };
    let lifetime_seconds_left =
        reconcile::end_of_life(record, env).map_or(-1, |end| (end - now).max(0));
    UserContainer {
        environment: record.environment.clone(),
        container_state: wire::ContainerState::from(record.state).into(),
        container_name: record.container_name.clone(),
        created_at: record.created_at,
        last_active_at: record.last_active_at,
        sessions: u32::try_from(sessions).unwrap_or(u32::MAX),
        idle_seconds_left,
        lifetime_seconds_left,
    }
}

impl SelfServiceHandler {
    /// `ssh alice+envgate@host cert < key.pub`: certifies the key for the token's user (who
    /// must still exist and be enabled), and records the certificate in the audit log.
    pub async fn issue_certificate(
        &self,
        token: &str,
        public_key: &str,
    ) -> Result<IssuedCertificate, SelfServiceError> {
        let claims = self.auth.verify_token(token).await?;
        let user =
            store::get_json::<UserRecord>(self.store.as_ref(), &model::user_key(&claims.sub))
                .await?;
        match user {
            Some(u) if !u.value.disabled => {}
            Some(_) => return Err(AuthError::Failed.into()),
            None => return Err(SelfServiceError::UnknownUser(claims.sub)),
        }
        let now = u64::try_from(model::now()).unwrap_or_default();
        let issued = self
            .auth
            .certificates()
            .issue(&claims.sub, public_key, now)?;
        let cert = &issued.certificate;
        let (valid_after, valid_before) = (
            i64::try_from(cert.valid_after()).unwrap_or(i64::MAX),
            i64::try_from(cert.valid_before()).unwrap_or(i64::MAX),
        );
        tracing::info!(user = %claims.sub, key_id = cert.key_id(), "certificate issued");
        self.auth.audit().record(Event::CertificateIssued {
            user: claims.sub.clone(),
            key_id: cert.key_id().to_owned(),
            serial: cert.serial(),
            key_fingerprint: issued.key_fingerprint.clone(),
            ca_fingerprint: issued.ca_fingerprint.clone(),
            valid_after,
            valid_before,
        });
        Ok(IssuedCertificate {
            key_id: cert.key_id().to_owned(),
            serial: cert.serial(),
            valid_after,
            valid_before,
            certificate: issued.line,
        })
    }

    /// `ssh alice+envgate@host ca`: the CA keys certificate logins are trusted from.
    pub async fn certificate_authorities(
        &self,
        token: &str,
    ) -> Result<CertificateAuthorityKeys, SelfServiceError> {
        self.auth.verify_token(token).await?;
        let mut keys = CertificateAuthorityKeys::default();
        for (key, origin) in self.auth.certificates().authorities() {
            let Ok(line) = key.to_openssh() else { continue };
            match origin {
                sshca::Origin::Envgate => keys.envgate.push(line),
                sshca::Origin::External => keys.external.push(line),
            }
        }
        Ok(keys)
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

    async fn issue_certificate(
        &self,
        request: Request<IssueCertificateRequest>,
    ) -> Result<Response<IssuedCertificate>, Status> {
        let req = request.into_inner();
        Ok(Response::new(
            self.handler
                .issue_certificate(&req.token, &req.public_key)
                .await?,
        ))
    }

    async fn certificate_authorities(
        &self,
        request: Request<SelfRequest>,
    ) -> Result<Response<CertificateAuthorityKeys>, Status> {
        let req = request.into_inner();
        Ok(Response::new(
            self.handler.certificate_authorities(&req.token).await?,
        ))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::catalogue::DEFAULT_IDLE_TIMEOUT_SECONDS;
    use crate::fixtures::{World, no_progress};
    use crate::model::CommandRecord;
    use crate::placement::PlacementConfig;

    fn handler(world: &World) -> SelfServiceHandler {
        let reconciler = Arc::new(world.reconciler());
        SelfServiceHandler::new(world.store.clone(), world.auth.clone(), reconciler)
    }

    fn code(e: SelfServiceError) -> (tonic::Code, String) {
        let status = Status::from(e);
        (status.code(), status.message().to_owned())
    }

    #[tokio::test]
    async fn envs_are_the_allowed_ones_with_running_and_defaults() {
        let world = World::new().await;
        let selfservice = handler(&world);
        let envs = selfservice
            .list_environments(&world.token("alice"))
            .await
            .unwrap();
        let names: Vec<&str> = envs.environments.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, ["busybox", "scratch"], "debian is staff only");
        assert!(envs.environments.iter().all(|e| !e.running));
        assert_eq!(envs.user_default, "");
        assert_eq!(envs.catalogue_default, "busybox");
        assert_eq!(
            envs.environments[1].environment_mode(),
            wire::EnvironmentMode::Ephemeral
        );

        let placer = world.placer(PlacementConfig::default());
        placer
            .open(world.request("alice", "scratch"), &no_progress)
            .await
            .unwrap();
        let envs = selfservice
            .list_environments(&world.token("alice"))
            .await
            .unwrap();
        let running: Vec<&str> = envs
            .environments
            .iter()
            .filter(|e| e.running)
            .map(|e| e.name.as_str())
            .collect();
        assert_eq!(running, ["scratch"], "an ephemeral container counts");
        let carol = selfservice
            .list_environments(&world.token("carol"))
            .await
            .unwrap();
        assert!(carol.environments.iter().all(|e| !e.running), "not carol's");
        assert!(carol.environments.iter().any(|e| e.name == "debian"));

        let status = code(
            selfservice
                .list_environments("forged.token")
                .await
                .unwrap_err(),
        );
        assert_eq!(status.0, tonic::Code::Unauthenticated);
    }

    #[tokio::test]
    async fn status_counts_sessions_and_the_idle_clock() {
        let world = World::new().await;
        let selfservice = handler(&world);
        let placer = world.placer(PlacementConfig::default());
        let placement = placer
            .open(world.request("alice", "busybox"), &no_progress)
            .await
            .unwrap();
        let status = selfservice.status(&world.token("alice")).await.unwrap();
        assert_eq!(status.containers.len(), 1);
        let busybox = &status.containers[0];
        assert_eq!(
            (busybox.environment.as_str(), busybox.container_state()),
            ("busybox", wire::ContainerState::Running)
        );
        assert_eq!((busybox.sessions, busybox.idle_seconds_left), (1, -1));
        assert_eq!(busybox.lifetime_seconds_left, -1);
        assert_eq!(status.sessions.len(), 1);
        assert_eq!(status.sessions[0].id, placement.session_id);
        assert_eq!(status.sessions[0].session_kind(), wire::SessionKind::Shell);

        let carol = selfservice.status(&world.token("carol")).await.unwrap();
        assert!(carol.containers.is_empty() && carol.sessions.is_empty());

        placer.close(&placement.session_id).await.unwrap();
        let status = selfservice.status(&world.token("alice")).await.unwrap();
        let busybox = &status.containers[0];
        assert_eq!(busybox.sessions, 0);
        assert!(
            (890..=900).contains(&busybox.idle_seconds_left),
            "{busybox:?}"
        );
        assert!(status.sessions.is_empty());
    }

    #[test]
    fn lifetime_and_idle_left_are_counted_like_the_reaper() {
        let env = EnvironmentRecord {
            idle_timeout_seconds: 60,
            max_lifetime_seconds: 3600,
            ..Default::default()
        };
        let record = ContainerRecord {
            state: ContainerState::Running,
            created_at: 1000,
            last_active_at: 2000,
            ..crate::fixtures::abandoned_claim("alice", "busybox", "test")
        };
        let idle = container_status(&record, Some(&env), 0, 2010);
        assert_eq!(
            (idle.idle_seconds_left, idle.lifetime_seconds_left),
            (50, 2590)
        );
        let overdue = container_status(&record, Some(&env), 0, 9000);
        assert_eq!(
            (overdue.idle_seconds_left, overdue.lifetime_seconds_left),
            (0, 0)
        );
        let gone = container_status(&record, None, 0, 2010);
        assert_eq!(
            (gone.idle_seconds_left, gone.lifetime_seconds_left),
            (i64::from(DEFAULT_IDLE_TIMEOUT_SECONDS) - 10, -1),
            "a deleted environment: the reaper's default timeout"
        );
    }

    #[tokio::test]
    async fn stop_ends_the_sessions_then_removes_only_the_callers_container() {
        let world = World::new().await;
        let selfservice = Arc::new(handler(&world));
        let placer = world.placer(PlacementConfig::default());
        let alice = placer
            .open(world.request("alice", "busybox"), &no_progress)
            .await
            .unwrap();
        let carol = placer
            .open(world.request("carol", "busybox"), &no_progress)
            .await
            .unwrap();

        let untouched = selfservice
            .stop_environment(&world.token("carol"), "scratch")
            .await
            .unwrap();
        assert!(!untouched.stopped);

        let stop = {
            let selfservice = selfservice.clone();
            let token = world.token("alice");
            tokio::spawn(async move { selfservice.stop_environment(&token, "busybox").await })
        };
        // The proxy's part: it is told, shows the message and closes the session.
        let told = loop {
            let commands: Vec<(String, Versioned<CommandRecord>)> =
                store::range_json(world.store.as_ref(), "commands/")
                    .await
                    .unwrap();
            if let Some((_, command)) = commands.into_iter().next() {
                break command.value;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert_eq!(
            told,
            CommandRecord::KillSession {
                session_id: alice.session_id.clone(),
                message: stop_message("alice", "busybox"),
            }
        );
        assert!(!stop.is_finished(), "waits for the session to close");
        // Claimed before the sessions were told: nothing attaches to it meanwhile.
        let record: Versioned<ContainerRecord> = store::get_json(
            world.store.as_ref(),
            &model::container_key("alice", "busybox"),
        )
        .await
        .unwrap()
        .unwrap();
        assert_eq!(record.value.state, ContainerState::Removing);
        assert_eq!(world.runtime.containers().len(), 2);
        placer.close(&alice.session_id).await.unwrap();
        let stopped = tokio::time::timeout(Duration::from_secs(5), stop)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!((stopped.stopped, stopped.sessions_ended), (true, 1));
        assert_eq!(world.container_ids(), [carol.container_id], "carol's stays");
        assert_eq!(
            world.keys("containers/").await,
            ["containers/carol/busybox"]
        );

        let again = selfservice
            .stop_environment(&world.token("alice"), "busybox")
            .await
            .unwrap();
        assert!(!again.stopped);
        let (status, message) = code(
            selfservice
                .stop_environment(&world.token("alice"), "nope")
                .await
                .unwrap_err(),
        );
        assert_eq!(status, tonic::Code::NotFound);
        assert_eq!(
            message,
            r#"unknown environment "nope"; available: busybox, scratch"#
        );
        let (status, message) = code(
            selfservice
                .stop_environment(&world.token("alice"), "../x")
                .await
                .unwrap_err(),
        );
        assert_eq!(status, tonic::Code::NotFound);
        assert_eq!(
            message,
            r#"unknown environment "../x"; available: busybox, scratch"#
        );
    }

    #[tokio::test]
    async fn default_is_checked_then_saved_by_compare_and_swap() {
        let world = World::new().await;
        let selfservice = handler(&world);
        let token = world.token("alice");
        selfservice.set_default(&token, "scratch").await.unwrap();
        let saved: UserRecord = store::get_json(world.store.as_ref(), "users/alice")
            .await
            .unwrap()
            .unwrap()
            .value;
        assert_eq!(saved.default_environment, "scratch");
        assert_eq!(saved.groups, ["students"], "the rest of the record stays");
        let envs = selfservice.list_environments(&token).await.unwrap();
        assert_eq!(envs.user_default, "scratch");

        let (status, message) = code(selfservice.set_default(&token, "debian").await.unwrap_err());
        assert_eq!(status, tonic::Code::PermissionDenied);
        assert_eq!(message, r#"environment "debian" is not available to you"#);
        let (status, message) = code(selfservice.set_default(&token, "nope").await.unwrap_err());
        assert_eq!(status, tonic::Code::NotFound);
        assert_eq!(
            message,
            r#"unknown environment "nope"; available: busybox, scratch"#
        );
        let (_, message) = code(
            selfservice
                .set_default(&token, "x\u{1b}[2J")
                .await
                .unwrap_err(),
        );
        assert_eq!(
            message, r#"unknown environment "x\u{1b}[2J"; available: busybox, scratch"#,
            "escaped"
        );

        selfservice.set_default(&token, "").await.unwrap();
        let envs = selfservice.list_environments(&token).await.unwrap();
        assert_eq!(envs.user_default, "");

        world.store.delete("users/alice").await.unwrap();
        let (status, _) = code(
            selfservice
                .set_default(&token, "busybox")
                .await
                .unwrap_err(),
        );
        assert_eq!(status, tonic::Code::Unauthenticated);
    }
}
