//! `envgate.admin.v1.Admin`: users, the environment catalogue, sessions, containers and
//! proxies. Every call passes `guard::AdminGuard` first and is written to the audit log with
//! the operator's name, its target and its outcome. Commands for a proxy (drain, kill a
//! session) go through etcd (`fleet::send_command`), so they reach it whichever replica its
//! Fleet stream is attached to.

use std::collections::HashMap;
use std::sync::Arc;

use envgate_proto::admin::v1 as pb;
use envgate_proto::admin::v1::admin_server::Admin;
use envgate_proto::audit::{AuditLog, Event, Outcome};
use envgate_proto::names;
use envgate_proto::v1 as wire;
use russh::keys::HashAlg;
use russh::keys::ssh_key::PublicKey;
use tonic::{Request, Response, Status};

use crate::auth::Hasher;
use crate::catalogue;
use crate::error::AdminError;
use crate::fleet;
use crate::guard::{AdminIdentity, method_of};
use crate::model::{
    self, CommandRecord, ContainerRecord, ContainerState, EnvironmentRecord, ProxyRecord,
    RevocationRecord, SessionRecord, UserRecord,
};
use crate::reconcile::Reconciler;
use crate::recordings;
use crate::sshca::{self, CertificateAuthority, CertificateRevocationRecord};
use crate::store::{self, Store};
use crate::uids;

/// DrainProxy's grace when the request leaves it at 0: the proxy's `--shutdown-grace-seconds`
/// default, so an admin drain and a SIGTERM give sessions the same time.
const DEFAULT_DRAIN_GRACE_SECONDS: u32 = 30;
const MAX_DRAIN_GRACE_SECONDS: u32 = 86_400;
/// What users see when their container is stopped or deleted and the request gave no message.
const CONTAINER_STOPPED_MESSAGE: &str = "your container was stopped by an administrator";

pub struct AdminService {
    store: Arc<dyn Store>,
    reconciler: Arc<Reconciler>,
    hasher: Hasher,
    audit: AuditLog,
    recordings: Option<std::path::PathBuf>,
    certificates: Arc<CertificateAuthority>,
}

impl AdminService {
    /// Answers ListRecordings and GetRecording from `dir` (where the proxies write them).
    pub fn with_recordings(mut self, dir: Option<std::path::PathBuf>) -> Self {
        self.recordings = dir;
        self
    }

    /// Answers ListCertificateAuthorities from `ca`.
    pub fn with_certificates(mut self, ca: Arc<CertificateAuthority>) -> Self {
        self.certificates = ca;
        self
    }

    pub fn new(
        store: Arc<dyn Store>,
        reconciler: Arc<Reconciler>,
        hasher: Hasher,
        audit: AuditLog,
    ) -> Self {
        Self {
            store,
            reconciler,
            hasher,
            audit,
            recordings: None,
            certificates: Arc::default(),
        }
    }

    /// Runs one admin call and writes it to the audit log: who (from `AdminGuard`), the
    /// method, `target` (what the request names) and the outcome.
    async fn audited<Q, T>(
        &self,
        request: Request<Q>,
        target: impl FnOnce(&Q) -> String,
        handle: impl AsyncFnOnce(Q) -> Result<T, Status>,
    ) -> Result<Response<T>, Status> {
        let admin = request
            .extensions()
            .get::<AdminIdentity>()
            .map_or_else(|| "-".to_owned(), |a| a.0.clone());
        let method = method_of(&request);
        let message = request.into_inner();
        let target = target(&message);
        let result = handle(message).await;
        let (outcome, error) = match &result {
            Ok(_) => (Outcome::Success, None),
            Err(status) => (Outcome::Failure, Some(status.message().to_owned())),
        };
        tracing::info!(%admin, %method, %target, ?outcome, "admin call");
        self.audit.record(Event::Admin {
            admin,
            method,
            target,
            outcome,
            error,
        });
        result.map(Response::new)
    }

    async fn drain_proxy(&self, req: pb::DrainProxyRequest) -> Result<(), AdminError> {
        if req.proxy_id.is_empty() {
            return Err(AdminError::invalid("proxy_id", "required"));
        }
        if req.grace_seconds > MAX_DRAIN_GRACE_SECONDS {
            return Err(AdminError::invalid(
                "grace_seconds",
                format!("at most {MAX_DRAIN_GRACE_SECONDS}"),
            ));
        }
        let key = model::proxy_key(&req.proxy_id);
        if self.store.get(&key).await?.is_none() {
            return Err(AdminError::NotFound(format!("proxy {:?}", req.proxy_id)));
        }
        let grace_seconds = match req.grace_seconds {
            0 => DEFAULT_DRAIN_GRACE_SECONDS,
            g => g,
        };
        let command = CommandRecord::Drain { grace_seconds };
        fleet::send_command(self.store.as_ref(), &req.proxy_id, &command).await?;
        Ok(())
    }

    async fn kill_session(&self, req: pb::KillSessionRequest) -> Result<(), AdminError> {
        if req.session_id.is_empty() {
            return Err(AdminError::invalid("session_id", "required"));
        }
        let message = one_line("message", req.message)?;
        let session = store::get_json::<SessionRecord>(
            self.store.as_ref(),
            &model::session_key(&req.session_id),
        )
        .await?
        .ok_or_else(|| AdminError::NotFound(format!("session {:?}", req.session_id)))?
        .value;
        let command = CommandRecord::KillSession {
            session_id: session.id,
            message,
        };
        fleet::send_command(self.store.as_ref(), &session.proxy_id, &command).await?;
        Ok(())
    }

    /// The placement-record key of the existing container named by `container`, and the
    /// message its users see (the default one when `message` is empty).
    async fn named_container(
        &self,
        container: Option<pb::ContainerRef>,
        message: String,
    ) -> Result<(String, String), AdminError> {
        let container = container.ok_or_else(|| AdminError::invalid("container", "required"))?;
        names::validate_user(&container.user)
            .map_err(|e| AdminError::invalid("container.user", e.to_string()))?;
        names::validate_environment(&container.environment)
            .map_err(|e| AdminError::invalid("container.environment", e.to_string()))?;
        let mut message = one_line("message", message)?;
        if message.is_empty() {
            CONTAINER_STOPPED_MESSAGE.clone_into(&mut message);
        }
        let key = if container.session_id.is_empty() {
            model::container_key(&container.user, &container.environment)
        } else {
            model::ephemeral_container_key(
                &container.user,
                &container.environment,
                &container.session_id,
            )
        };
        if self.store.get(&key).await?.is_none() {
            return Err(AdminError::NotFound(format!("container {key:?}")));
        }
        Ok((key, message))
    }

    async fn status(&self) -> Result<pb::StatusResponse, AdminError> {
        let store = self.store.as_ref();
        let proxies: Vec<(String, store::Versioned<ProxyRecord>)> =
            store::range_json(store, model::PROXIES).await?;
        let containers: Vec<(String, store::Versioned<ContainerRecord>)> =
            store::range_json(store, model::CONTAINERS).await?;
        let count = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
        let in_state = |state: ContainerState| {
            count(
                containers
                    .iter()
                    .filter(|(_, c)| c.value.state == state)
                    .count(),
            )
        };
        Ok(pb::StatusResponse {
            proxies: count(proxies.len()),
            proxies_draining: count(proxies.iter().filter(|(_, p)| p.value.draining).count()),
            connections: proxies.iter().map(|(_, p)| p.value.connections).sum(),
            sessions: count(store.range(model::SESSIONS).await?.len()),
            containers_running: in_state(ContainerState::Running),
            containers_creating: in_state(ContainerState::Creating),
            containers_removing: in_state(ContainerState::Removing),
            users: count(store.range(model::USERS).await?.len()),
            environments: count(store.range(model::ENVIRONMENTS).await?.len()),
            warm_containers: count(store.range(model::POOL).await?.len()),
        })
    }

    /// Refuses the user's existing tokens from now on. Every replica watches `revocations/`
    /// and tells its attached proxies to drop the user from their caches
    /// (`fleet::forward_revocations`).
    async fn revoke(&self, user: &str) -> Result<(), AdminError> {
        // +1: tokens issued earlier in this same second are refused too.
        let record = RevocationRecord {
            not_before: model::now() + 1,
        };
        store::put_json(
            self.store.as_ref(),
            &model::revocation_key(user),
            &record,
            None,
        )
        .await?;
        tracing::info!(user, "tokens revoked");
        Ok(())
    }

    async fn put_user(&self, req: pb::PutUserRequest) -> Result<pb::User, AdminError> {
        let user = req
            .user
            .ok_or_else(|| AdminError::invalid("user", "required"))?;
        validate_user(&user)?;
        if !req.password.is_empty() && req.clear_password {
            return Err(AdminError::invalid(
                "password",
                "cannot be set and cleared at once",
            ));
        }
        let key = model::user_key(&user.name);
        let existing = store::get_json::<UserRecord>(self.store.as_ref(), &key)
            .await?
            .map(|v| v.value);
        let password_set = !req.password.is_empty();
        let password_hash = if req.clear_password {
            None
        } else if password_set {
            Some(self.hasher.hash(req.password).await?)
        } else {
            existing.as_ref().and_then(|e| e.password_hash.clone())
        };
        let record = UserRecord {
            name: user.name,
            password_hash,
            authorized_keys: user
                .authorized_keys
                .iter()
                .map(|k| k.trim().to_owned())
                .collect(),
            groups: user.groups,
            default_environment: user.default_environment,
            disabled: user.disabled,
            // Written by an operator, the record is local from now on.
            source: String::new(),
        };
        store::put_json(self.store.as_ref(), &key, &record, None).await?;
        if let Some(existing) = &existing
            && let Some(why) = credentials_changed(existing, &record, password_set)
        {
            // Tokens are cached by proxies for minutes: without this, a removed key or a
            // changed password would keep working until they expired.
            tracing::info!(user = %record.name, why, "credentials changed");
            self.revoke(&record.name).await?;
        } else if record.disabled {
            self.revoke(&record.name).await?;
        }
        let uid = uids::get(self.store.as_ref(), &record.name).await?;
        Ok(user_to_pb(&record, uid))
    }

    async fn put_environment(
        &self,
        env: Option<pb::Environment>,
    ) -> Result<pb::Environment, AdminError> {
        let env = env.ok_or_else(|| AdminError::invalid("environment", "required"))?;
        let record = catalogue::validate_environment(env)?;
        catalogue::save_environment(self.store.as_ref(), &record).await?;
        tracing::info!(environment = %record.name, image = %record.image, "environment saved");
        Ok(environment_to_pb(&record))
    }

    async fn list_containers(
        &self,
        req: pb::ListContainersRequest,
    ) -> Result<Vec<pb::Container>, AdminError> {
        self.reconciler.settle_closes().await;
        let sessions: Vec<(String, store::Versioned<SessionRecord>)> =
            store::range_json(self.store.as_ref(), model::SESSIONS).await?;
        let mut counts: HashMap<String, u32> = HashMap::new();
        for (_, s) in sessions {
            *counts.entry(s.value.container_key).or_default() += 1;
        }
        let records: Vec<(String, store::Versioned<ContainerRecord>)> =
            store::range_json(self.store.as_ref(), model::CONTAINERS).await?;
        Ok(records
            .into_iter()
            .filter(|(_, r)| req.user.is_empty() || r.value.user == req.user)
            .filter(|(_, r)| req.environment.is_empty() || r.value.environment == req.environment)
            .map(|(key, r)| {
                let r = r.value;
                pb::Container {
                    sessions: counts.get(&key).copied().unwrap_or(0),
                    user: r.user,
                    environment: r.environment,
                    runtime_kind: envgate_runtime::RuntimeKind::from_name(&r.runtime)
                        .map_or(envgate_proto::v1::Runtime::Unspecified, |k| k.to_wire())
                        as i32,
                    container_id: r.container_id,
                    container_name: r.container_name,
                    container_state: wire::ContainerState::from(r.state).into(),
                    created_at: r.created_at,
                    last_active_at: r.last_active_at,
                    session_id: r.session_id,
                }
            })
            .collect())
    }
}

/// Why the user's existing tokens must stop working after an update, if they must: a new or
/// cleared password, a removed key, changed groups (tokens carry them) or a disabled user.
fn credentials_changed(
    before: &UserRecord,
    after: &UserRecord,
    password_set: bool,
) -> Option<&'static str> {
    let key_data = |line: &String| {
        PublicKey::from_openssh(line.trim())
            .ok()
            .map(|k| k.key_data().clone())
    };
    let kept: Vec<_> = after.authorized_keys.iter().filter_map(key_data).collect();
    if password_set || (before.password_hash.is_some() && after.password_hash.is_none()) {
        Some("password changed")
    } else if before
        .authorized_keys
        .iter()
        .filter_map(key_data)
        .any(|k| !kept.contains(&k))
    {
        Some("key removed")
    } else if before.groups != after.groups {
        Some("groups changed")
    } else if after.disabled {
        Some("disabled")
    } else {
        None
    }
}

/// A message shown on the user's terminal: one line, no control characters.
fn one_line(field: &str, message: String) -> Result<String, AdminError> {
    if message.chars().any(char::is_control) {
        return Err(AdminError::invalid(
            field,
            "must be one line without control characters",
        ));
    }
    Ok(message.trim().to_owned())
}

fn validate_user(user: &pb::User) -> Result<(), AdminError> {
    names::validate_user(&user.name)
        .map_err(|e| AdminError::invalid("user.name", e.to_string()))?;
    for (i, line) in user.authorized_keys.iter().enumerate() {
        if PublicKey::from_openssh(line.trim()).is_err() {
            return Err(AdminError::invalid(
                format!("user.authorized_keys[{i}]"),
                "not an OpenSSH public key",
            ));
        }
    }
    for (i, group) in user.groups.iter().enumerate() {
        if !crate::identity::is_group_name(group) {
            return Err(AdminError::invalid(
                format!("user.groups[{i}]"),
                "must be a non-empty word without spaces",
            ));
        }
    }
    if !user.default_environment.is_empty() {
        names::validate_environment(&user.default_environment)
            .map_err(|e| AdminError::invalid("user.default_environment", e.to_string()))?;
    }
    Ok(())
}

pub(crate) fn environment_to_pb(e: &EnvironmentRecord) -> pb::Environment {
    pb::Environment {
        name: e.name.clone(),
        description: e.description.clone(),
        image: e.image.clone(),
        shell: e.shell.clone(),
        working_dir: e.working_dir.clone(),
        run_as: e.run_as.clone(),
        env: e.env.clone(),
        environment_mode: wire::EnvironmentMode::from(e.mode).into(),
        idle_timeout_seconds: e.idle_timeout_seconds,
        allowed_groups: e.allowed_groups.clone(),
        cpus: e.cpus,
        memory_bytes: e.memory_bytes,
        pids_limit: e.pids_limit,
        is_default: e.is_default,
        max_lifetime_seconds: e.max_lifetime_seconds,
        warm_pool_size: e.warm_pool_size,
        accept_env: e.accept_env.clone(),
        record_sessions: e.record_sessions,
        gpus: catalogue::gpus_to_pb(e.gpus),
        kubernetes: catalogue::kubernetes_to_pb(&e.kubernetes),
    }
}

/// Never carries the password hash, only whether one is set.
fn user_to_pb(u: &UserRecord, uid: Option<u32>) -> pb::User {
    pb::User {
        uid: uid.unwrap_or(0),
        name: u.name.clone(),
        authorized_keys: u.authorized_keys.clone(),
        groups: u.groups.clone(),
        default_environment: u.default_environment.clone(),
        disabled: u.disabled,
        has_password: u.password_hash.is_some(),
        source: u.source.clone(),
    }
}

fn user_target(name: &str) -> String {
    format!("user {name}")
}

fn environment_target(name: &str) -> String {
    format!("environment {name}")
}

fn container_target(container: Option<&pb::ContainerRef>) -> String {
    container.map_or_else(
        || "-".to_owned(),
        |c| format!("container {}+{}", c.user, c.environment),
    )
}

fn everything<Q>(_: &Q) -> String {
    "-".to_owned()
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn list_users(
        &self,
        request: Request<pb::ListUsersRequest>,
    ) -> Result<Response<pb::ListUsersResponse>, Status> {
        self.audited(request, everything, async |_| {
            let users: Vec<(String, store::Versioned<UserRecord>)> =
                store::range_json(self.store.as_ref(), model::USERS).await?;
            let uids: HashMap<String, u32> =
                uids::all(self.store.as_ref()).await?.into_iter().collect();
            let users = users
                .iter()
                .map(|(_, u)| user_to_pb(&u.value, uids.get(&u.value.name).copied()))
                .collect();
            Ok(pb::ListUsersResponse { users })
        })
        .await
    }

    async fn get_user(
        &self,
        request: Request<pb::GetUserRequest>,
    ) -> Result<Response<pb::User>, Status> {
        self.audited(
            request,
            |r| user_target(&r.name),
            async |r| {
                let name = r.name;
                let user =
                    store::get_json::<UserRecord>(self.store.as_ref(), &model::user_key(&name))
                        .await?
                        .ok_or_else(|| AdminError::NotFound(format!("user {name:?}")))?;
                let uid = uids::get(self.store.as_ref(), &name).await?;
                Ok(user_to_pb(&user.value, uid))
            },
        )
        .await
    }

    async fn put_user(
        &self,
        request: Request<pb::PutUserRequest>,
    ) -> Result<Response<pb::User>, Status> {
        self.audited(
            request,
            |r| user_target(r.user.as_ref().map_or("-", |u| u.name.as_str())),
            async |r| Ok(self.put_user(r).await?),
        )
        .await
    }

    async fn delete_user(
        &self,
        request: Request<pb::DeleteUserRequest>,
    ) -> Result<Response<pb::DeleteUserResponse>, Status> {
        self.audited(
            request,
            |r| user_target(&r.name),
            async |r| {
                let name = r.name;
                names::validate_user(&name)
                    .map_err(|e| AdminError::invalid("name", e.to_string()))?;
                if self.store.delete(&model::user_key(&name)).await? {
                    self.revoke(&name).await?;
                    tracing::info!(user = %name, "user deleted");
                }
                Ok(pb::DeleteUserResponse {})
            },
        )
        .await
    }

    async fn list_environments(
        &self,
        request: Request<pb::ListEnvironmentsRequest>,
    ) -> Result<Response<pb::ListEnvironmentsResponse>, Status> {
        self.audited(request, everything, async |_| {
            let envs: Vec<(String, store::Versioned<EnvironmentRecord>)> =
                store::range_json(self.store.as_ref(), model::ENVIRONMENTS).await?;
            let environments = envs
                .iter()
                .map(|(_, e)| environment_to_pb(&e.value))
                .collect();
            Ok(pb::ListEnvironmentsResponse { environments })
        })
        .await
    }

    async fn put_environment(
        &self,
        request: Request<pb::PutEnvironmentRequest>,
    ) -> Result<Response<pb::Environment>, Status> {
        self.audited(
            request,
            |r| environment_target(r.environment.as_ref().map_or("-", |e| e.name.as_str())),
            async |r| Ok(self.put_environment(r.environment).await?),
        )
        .await
    }

    async fn delete_environment(
        &self,
        request: Request<pb::DeleteEnvironmentRequest>,
    ) -> Result<Response<pb::DeleteEnvironmentResponse>, Status> {
        self.audited(
            request,
            |r| environment_target(&r.name),
            async |r| {
                names::validate_environment(&r.name)
                    .map_err(|e| AdminError::invalid("name", e.to_string()))?;
                self.store.delete(&model::environment_key(&r.name)).await?;
                Ok(pb::DeleteEnvironmentResponse {})
            },
        )
        .await
    }

    async fn list_sessions(
        &self,
        request: Request<pb::ListSessionsRequest>,
    ) -> Result<Response<pb::ListSessionsResponse>, Status> {
        self.audited(request, everything, async |filter| {
            self.reconciler.settle_closes().await;
            let sessions: Vec<(String, store::Versioned<SessionRecord>)> =
                store::range_json(self.store.as_ref(), model::SESSIONS).await?;
            let sessions = sessions
                .into_iter()
                .map(|(_, s)| s.value)
                .filter(|s| filter.user.is_empty() || s.user == filter.user)
                .filter(|s| filter.environment.is_empty() || s.environment == filter.environment)
                .filter(|s| filter.proxy_id.is_empty() || s.proxy_id == filter.proxy_id)
                .map(|s| pb::Session {
                    id: s.id,
                    user: s.user,
                    environment: s.environment,
                    container_id: s.container_id,
                    proxy_id: s.proxy_id,
                    client_address: s.client_address,
                    session_kind: wire::SessionKind::from(s.kind).into(),
                    started_at: s.started_at,
                })
                .collect();
            Ok(pb::ListSessionsResponse { sessions })
        })
        .await
    }

    async fn list_containers(
        &self,
        request: Request<pb::ListContainersRequest>,
    ) -> Result<Response<pb::ListContainersResponse>, Status> {
        self.audited(request, everything, async |r| {
            let containers = self.list_containers(r).await?;
            Ok(pb::ListContainersResponse { containers })
        })
        .await
    }

    async fn list_proxies(
        &self,
        request: Request<pb::ListProxiesRequest>,
    ) -> Result<Response<pb::ListProxiesResponse>, Status> {
        self.audited(request, everything, async |_| {
            let proxies: Vec<(String, store::Versioned<ProxyRecord>)> =
                store::range_json(self.store.as_ref(), model::PROXIES).await?;
            let proxies = proxies
                .into_iter()
                .map(|(_, p)| p.value)
                .map(|p| pb::Proxy {
                    id: p.id,
                    address: p.address,
                    version: p.version,
                    draining: p.draining,
                    sessions: p.sessions,
                    connections: p.connections,
                    registered_at: p.registered_at,
                    last_heartbeat_at: p.last_heartbeat_at,
                })
                .collect();
            Ok(pb::ListProxiesResponse { proxies })
        })
        .await
    }

    async fn drain_proxy(
        &self,
        request: Request<pb::DrainProxyRequest>,
    ) -> Result<Response<pb::DrainProxyResponse>, Status> {
        self.audited(
            request,
            |r| format!("proxy {}", r.proxy_id),
            async |r| {
                self.drain_proxy(r).await?;
                Ok(pb::DrainProxyResponse {})
            },
        )
        .await
    }

    async fn kill_session(
        &self,
        request: Request<pb::KillSessionRequest>,
    ) -> Result<Response<pb::KillSessionResponse>, Status> {
        self.audited(
            request,
            |r| format!("session {}", r.session_id),
            async |r| {
                self.kill_session(r).await?;
                Ok(pb::KillSessionResponse {})
            },
        )
        .await
    }

    async fn stop_container(
        &self,
        request: Request<pb::StopContainerRequest>,
    ) -> Result<Response<pb::StopContainerResponse>, Status> {
        self.audited(
            request,
            |r| container_target(r.container.as_ref()),
            async |r| {
                let (key, message) = self.named_container(r.container, r.message).await?;
                let sessions_ended =
                    fleet::command_container_sessions(self.store.as_ref(), &key, |session_id| {
                        CommandRecord::KillSession {
                            session_id,
                            message: message.clone(),
                        }
                    })
                    .await
                    .map_err(AdminError::from)?;
                Ok(pb::StopContainerResponse { sessions_ended })
            },
        )
        .await
    }

    async fn delete_container(
        &self,
        request: Request<pb::DeleteContainerRequest>,
    ) -> Result<Response<pb::DeleteContainerResponse>, Status> {
        self.audited(
            request,
            |r| container_target(r.container.as_ref()),
            async |r| {
                let (key, message) = self.named_container(r.container, r.message).await?;
                // The reaper's claim first, then the sessions are ended (and given a moment
                // to show the message), then the container goes.
                let Some(sessions_ended) = self
                    .reconciler
                    .remove_now(&key, "deleted by an administrator", Some(&message))
                    .await
                    .map_err(AdminError::from)?
                else {
                    return Err(AdminError::Changed(format!("container {key:?}")).into());
                };
                Ok(pb::DeleteContainerResponse { sessions_ended })
            },
        )
        .await
    }

    async fn revoke_user_tokens(
        &self,
        request: Request<pb::RevokeUserTokensRequest>,
    ) -> Result<Response<pb::RevokeUserTokensResponse>, Status> {
        self.audited(
            request,
            |r| user_target(&r.user),
            async |r| {
                let user = r.user;
                names::validate_user(&user)
                    .map_err(|e| AdminError::invalid("user", e.to_string()))?;
                if self.store.get(&model::user_key(&user)).await?.is_none() {
                    return Err(AdminError::NotFound(format!("user {user:?}")).into());
                }
                self.revoke(&user).await?;
                Ok(pb::RevokeUserTokensResponse {})
            },
        )
        .await
    }

    async fn status(
        &self,
        request: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        self.audited(request, everything, async |_| Ok(self.status().await?))
            .await
    }

    async fn list_recordings(
        &self,
        request: Request<pb::ListRecordingsRequest>,
    ) -> Result<Response<pb::ListRecordingsResponse>, Status> {
        self.audited(
            request,
            |r| user_target(&r.user),
            async |r| {
                let recordings = recordings::list(self.recordings.as_deref(), &r.user)?;
                Ok(pb::ListRecordingsResponse { recordings })
            },
        )
        .await
    }

    async fn get_recording(
        &self,
        request: Request<pb::GetRecordingRequest>,
    ) -> Result<Response<pb::Recording>, Status> {
        self.audited(
            request,
            |r| format!("recording {}/{}", r.user, r.name),
            async |r| {
                Ok(recordings::get(
                    self.recordings.as_deref(),
                    &r.user,
                    &r.name,
                )?)
            },
        )
        .await
    }

    async fn list_certificate_authorities(
        &self,
        request: Request<pb::ListCertificateAuthoritiesRequest>,
    ) -> Result<Response<pb::ListCertificateAuthoritiesResponse>, Status> {
        self.audited(request, everything, async |_| {
            let authorities = self
                .certificates
                .authorities()
                .into_iter()
                .enumerate()
                .map(|(i, (key, origin))| pb::CertificateAuthority {
                    public_key: key.to_openssh().unwrap_or_default(),
                    fingerprint: key.fingerprint(HashAlg::Sha256).to_string(),
                    origin: origin.as_str().to_owned(),
                    signing: i == 0 && origin == sshca::Origin::Envgate,
                })
                .collect();
            Ok(pb::ListCertificateAuthoritiesResponse { authorities })
        })
        .await
    }

    async fn revoke_certificate(
        &self,
        request: Request<pb::RevokeCertificateRequest>,
    ) -> Result<Response<pb::CertificateRevocation>, Status> {
        let admin = request
            .extensions()
            .get::<AdminIdentity>()
            .map_or_else(|| "-".to_owned(), |a| a.0.clone());
        self.audited(
            request,
            |r| format!("certificate {:?}", r.key_id),
            async |r| {
                if r.key_id.is_empty() || r.key_id.len() > 1024 {
                    return Err(AdminError::invalid(
                        "key_id",
                        "required, at most 1024 bytes (as ssh-keygen -L shows it)",
                    )
                    .into());
                }
                let record = CertificateRevocationRecord {
                    key_id: r.key_id,
                    reason: one_line("reason", r.reason)?,
                    revoked_at: model::now(),
                    revoked_by: admin,
                };
                sshca::revoke(self.store.as_ref(), &record).await?;
                Ok(revocation_message(record))
            },
        )
        .await
    }

    async fn list_certificate_revocations(
        &self,
        request: Request<pb::ListCertificateRevocationsRequest>,
    ) -> Result<Response<pb::ListCertificateRevocationsResponse>, Status> {
        self.audited(request, everything, async |_| {
            let revocations = sshca::revocations(self.store.as_ref())
                .await?
                .into_iter()
                .map(revocation_message)
                .collect();
            Ok(pb::ListCertificateRevocationsResponse { revocations })
        })
        .await
    }
}

fn revocation_message(record: CertificateRevocationRecord) -> pb::CertificateRevocation {
    pb::CertificateRevocation {
        key_id: record.key_id,
        reason: record.reason,
        revoked_at: record.revoked_at,
        revoked_by: record.revoked_by,
    }
}
