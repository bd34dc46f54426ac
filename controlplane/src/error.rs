//! The control plane's error kinds, and the one place they become gRPC statuses.

use envgate_proto::failure::{self, request_id, with_request_id};
use tonic::{Code, Status};

use crate::reconcile::ReconcileError;
use crate::runtime::RuntimeError;
use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// Deliberately the same for unknown users, wrong credentials and disabled users, so a
    /// caller cannot probe which users exist.
    #[error("authentication failed")]
    Failed,
    #[error(transparent)]
    Throttled(#[from] crate::throttle::Refusal),
    #[error("the token is not valid: {0}")]
    BadToken(#[from] envgate_proto::token::TokenError),
    #[error("the token was revoked")]
    Revoked,
    /// The hashing pool is full (fail fast) or stopped.
    #[error(transparent)]
    Hashing(#[from] crate::hashing::HashError),
    #[error("the password hash could not be computed")]
    BadHash,
    #[error("credential: a password or public key is required")]
    MissingCredential,
    #[error(transparent)]
    Store(#[from] StoreError),
    /// LDAP or the auth webhook could not answer; local users are not affected.
    #[error(transparent)]
    Source(#[from] crate::identity::SourceError),
    /// A certificate login refused; the reason is the audit record's, the caller gets
    /// `Failed`'s message (`sshca::Refusal`).
    #[error(transparent)]
    Certificate(#[from] crate::sshca::Refusal),
}

/// Why the environment a user named is not theirs to use: the same refusal, word for word,
/// whether they named it when connecting (OpenSession) or in a SelfService call.
#[derive(Debug, thiserror::Error)]
pub enum ChoiceError {
    #[error("unknown environment \"{requested}\"; available: {}", list(available))]
    UnknownEnvironment {
        requested: String,
        available: Vec<String>,
    },
    #[error("environment \"{0}\" is not available to you")]
    Forbidden(String),
}

#[derive(Debug, thiserror::Error)]
pub enum PlacementError {
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error(transparent)]
    Caller(#[from] CallerError),
    #[error(transparent)]
    Choice(#[from] ChoiceError),
    #[error(
        "no environment was chosen and there is no default; available: {}",
        list(available)
    )]
    NoEnvironment { available: Vec<String> },
    #[error("proxy not registered: {0}")]
    ProxyNotRegistered(String),
    #[error("image {image} for environment \"{environment}\" is not available on this host")]
    ImageMissing { image: String, environment: String },
    #[error("environment \"{environment}\": cannot pull image {image}: {reason}")]
    PullFailed {
        environment: String,
        image: String,
        reason: String,
    },
    #[error("environment \"{environment}\" needs GPUs, and this host cannot give them: {reason}")]
    NoGpus { environment: String, reason: String },
    /// The user's containers (any state, any mode) reached `--max-containers-per-user`.
    #[error(
        "you already have {count} {} running (the limit is {limit}): {}; stop one with: ssh {user}+envgate@<host> stop ENV",
        if *count == 1 { "environment" } else { "environments" },
        list(environments)
    )]
    TooManyContainers {
        user: String,
        count: usize,
        limit: usize,
        environments: Vec<String>,
    },
    /// The message names the runtime, e.g. "docker is unavailable: ...".
    #[error("{0}")]
    RuntimeUnavailable(String),
    #[error("creating the container failed: {0}")]
    RuntimeFailed(String),
    #[error("timed out placing the session after {0} s")]
    Timeout(u64),
    /// The caller went away while waiting for a creation slot; nobody reads this.
    #[error("the client went away while waiting for its container")]
    CallerGone,
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl PlacementError {
    pub fn from_runtime(e: RuntimeError, environment: &str) -> Self {
        match e {
            RuntimeError::Unavailable(m) => PlacementError::RuntimeUnavailable(m),
            RuntimeError::ImageMissing(image) => PlacementError::ImageMissing {
                image,
                environment: environment.to_owned(),
            },
            RuntimeError::PullFailed { image, reason } => PlacementError::PullFailed {
                environment: environment.to_owned(),
                image,
                reason,
            },
            RuntimeError::NoGpus(reason) => PlacementError::NoGpus {
                environment: environment.to_owned(),
                reason,
            },
            RuntimeError::Failed(m) => PlacementError::RuntimeFailed(m),
        }
    }
}

/// Why a caller may not use a proxy-facing service (`guard::ProxyGuard`) or act on a record.
#[derive(Debug, thiserror::Error)]
pub enum CallerError {
    #[error(
        "this service answers only envgate proxies: connect with a client certificate from the fleet CA"
    )]
    NoCertificate,
    #[error("the client certificate is not an envgate proxy's: {0}")]
    NotAProxy(envgate_proto::tls::IdentityError),
    /// A proxy acting on a session another proxy opened.
    #[error("session {session} was opened through proxy {owner}; only that proxy may close it")]
    NotYourSession { session: String, owner: String },
}

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("admin calls need authorization: Bearer <admin token>")]
    TokenRequired,
    /// `field` names the offending request field, e.g. `user.authorized_keys[1]`.
    #[error("{field}: {reason}")]
    Invalid { field: String, reason: String },
    #[error("{0} not found")]
    NotFound(String),
    /// The record changed while the call worked on it; calling again is safe.
    #[error("{0} changed meanwhile; try again")]
    Changed(String),
    #[error(transparent)]
    Remove(#[from] ReconcileError),
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The call cannot be answered as the control plane is set up, or as things are.
    #[error("{0}")]
    Precondition(String),
}

impl AdminError {
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        AdminError::Invalid {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    #[error("the first message must be Register")]
    NotRegistered,
    #[error("no Register within {0} s")]
    RegisterTimeout(u64),
    #[error(transparent)]
    Stream(#[from] Status),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Errors of the SelfService calls a user makes about their own environments.
#[derive(Debug, thiserror::Error)]
pub enum SelfServiceError {
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error(transparent)]
    Choice(#[from] ChoiceError),
    /// The token is valid but its user was deleted since.
    #[error("user \"{0}\" no longer exists")]
    UnknownUser(String),
    /// The record kept changing under the call; calling again is safe.
    #[error("{0} kept changing; try again")]
    Changed(String),
    #[error(transparent)]
    Remove(#[from] ReconcileError),
    #[error(transparent)]
    Store(#[from] StoreError),
    /// `cert` was asked for a key envgate will not certify, or it has no CA key.
    #[error(transparent)]
    Issue(#[from] crate::sshca::IssueError),
}

fn list(items: &[String]) -> String {
    if items.is_empty() {
        "none".to_owned()
    } else {
        items.join(", ")
    }
}

/// A failure the caller cannot act on: the detail is logged under a fresh request id, and the
/// status says only what users may read ([`failure`]) plus that id, also in the metadata
/// `x-envgate-request-id`. The log line is in the call's span, which names the proxy's
/// connection id, so an operator finds both. Operators calling the admin API get the same
/// answer and find the detail the same way.
fn internal(code: Code, detail: &dyn std::fmt::Display) -> Status {
    let id = request_id();
    tracing::warn!(request_id = %id, error = %detail, "request failed");
    let message = if code == Code::Unavailable {
        failure::UNAVAILABLE
    } else {
        failure::INTERNAL
    };
    tagged(Status::new(code, with_request_id(message, &id)), &id)
}

fn tagged(mut status: Status, id: &str) -> Status {
    if let Ok(value) = id.parse() {
        status
            .metadata_mut()
            .insert(envgate_proto::metadata::REQUEST_ID, value);
    }
    status
}

fn store_code(e: &StoreError) -> Code {
    match e {
        StoreError::Unavailable(_) | StoreError::LeaseNotFound(_) => Code::Unavailable,
        StoreError::Corrupt { .. } => Code::Internal,
    }
}

fn store_status(e: &StoreError) -> Status {
    internal(store_code(e), e)
}

fn choice_status(e: &ChoiceError) -> Status {
    match e {
        ChoiceError::UnknownEnvironment { .. } => Status::not_found(e.to_string()),
        ChoiceError::Forbidden(_) => Status::permission_denied(e.to_string()),
    }
}

/// A removal through the reconciler's claim (admin delete, a user's stop) that failed.
fn remove_code(e: &ReconcileError) -> Code {
    match e {
        ReconcileError::Store(s) => store_code(s),
        ReconcileError::Runtime(_) => Code::Unavailable,
    }
}

fn auth_status(e: &AuthError) -> Status {
    match e {
        AuthError::Failed | AuthError::BadToken(_) | AuthError::Revoked => {
            Status::unauthenticated(e.to_string())
        }
        AuthError::MissingCredential => Status::invalid_argument(e.to_string()),
        AuthError::Throttled(_) | AuthError::Hashing(crate::hashing::HashError::Busy) => {
            Status::resource_exhausted(e.to_string())
        }
        AuthError::Hashing(_) | AuthError::BadHash => internal(Code::Internal, e),
        AuthError::Store(s) => store_status(s),
        AuthError::Source(source) => {
            let id = request_id();
            tracing::warn!(request_id = %id, error = %source, "an identity source could not answer");
            let message = if source.is_directory() {
                failure::DIRECTORY_UNAVAILABLE
            } else {
                failure::IDENTITY_UNAVAILABLE
            };
            tagged(Status::unavailable(with_request_id(message, &id)), &id)
        }
        AuthError::Certificate(_) => Status::unauthenticated(AuthError::Failed.to_string()),
    }
}

impl From<AuthError> for Status {
    fn from(e: AuthError) -> Self {
        auth_status(&e)
    }
}

impl From<PlacementError> for Status {
    fn from(e: PlacementError) -> Self {
        let code = match &e {
            PlacementError::Auth(a) => return auth_status(a),
            PlacementError::Caller(c) => return caller_status(c),
            PlacementError::Store(s) => return store_status(s),
            PlacementError::Choice(c) => return choice_status(c),
            PlacementError::NoEnvironment { .. } => Code::NotFound,
            PlacementError::ImageMissing { .. } => Code::FailedPrecondition,
            // The registry's answer is for the log; the user learns which image it was.
            PlacementError::PullFailed {
                environment, image, ..
            } => {
                let id = request_id();
                tracing::warn!(request_id = %id, error = %e, "pulling an image failed");
                let message = format!(
                    "environment \"{environment}\" cannot start: its image {image} could not be pulled"
                );
                return tagged(
                    Status::failed_precondition(with_request_id(&message, &id)),
                    &id,
                );
            }
            // The engine's answer is for the log; the user learns it is not their doing.
            PlacementError::NoGpus { environment, .. } => {
                let id = request_id();
                tracing::warn!(request_id = %id, error = %e, "an environment asks for GPUs this host cannot give");
                let message = format!(
                    "environment \"{environment}\" needs GPUs, and this host has none to give; tell your administrator"
                );
                return tagged(
                    Status::failed_precondition(with_request_id(&message, &id)),
                    &id,
                );
            }
            PlacementError::TooManyContainers { .. } => Code::ResourceExhausted,
            PlacementError::Timeout(_) => Code::DeadlineExceeded,
            PlacementError::CallerGone => Code::Cancelled,
            PlacementError::ProxyNotRegistered(_) | PlacementError::RuntimeUnavailable(_) => {
                return internal(Code::Unavailable, &e);
            }
            PlacementError::RuntimeFailed(_) => return internal(Code::Internal, &e),
        };
        Status::new(code, e.to_string())
    }
}

fn caller_status(e: &CallerError) -> Status {
    match e {
        CallerError::NoCertificate => Status::unauthenticated(e.to_string()),
        CallerError::NotAProxy(_) | CallerError::NotYourSession { .. } => {
            Status::permission_denied(e.to_string())
        }
    }
}

impl From<CallerError> for Status {
    fn from(e: CallerError) -> Self {
        caller_status(&e)
    }
}

impl From<AdminError> for Status {
    fn from(e: AdminError) -> Self {
        match &e {
            AdminError::TokenRequired => Status::unauthenticated(e.to_string()),
            AdminError::Invalid { .. } => Status::invalid_argument(e.to_string()),
            AdminError::NotFound(_) => Status::not_found(e.to_string()),
            AdminError::Changed(_) => Status::aborted(e.to_string()),
            AdminError::Remove(r) => internal(remove_code(r), r),
            AdminError::Auth(a) => auth_status(a),
            AdminError::Store(s) => store_status(s),
            AdminError::Precondition(_) => Status::failed_precondition(e.to_string()),
        }
    }
}

impl From<SelfServiceError> for Status {
    fn from(e: SelfServiceError) -> Self {
        match &e {
            SelfServiceError::Auth(a) => auth_status(a),
            SelfServiceError::Choice(c) => choice_status(c),
            SelfServiceError::UnknownUser(_) => Status::unauthenticated(e.to_string()),
            SelfServiceError::Changed(_) => Status::aborted(e.to_string()),
            SelfServiceError::Remove(r) => internal(remove_code(r), r),
            SelfServiceError::Store(s) => store_status(s),
            SelfServiceError::Issue(crate::sshca::IssueError::NoCaKey) => {
                Status::failed_precondition(e.to_string())
            }
            SelfServiceError::Issue(crate::sshca::IssueError::Signing(_)) => {
                internal(Code::Internal, &e)
            }
            SelfServiceError::Issue(_) => Status::invalid_argument(e.to_string()),
        }
    }
}

impl From<StoreError> for Status {
    fn from(e: StoreError) -> Self {
        store_status(&e)
    }
}

impl From<FleetError> for Status {
    fn from(e: FleetError) -> Self {
        match e {
            FleetError::NotRegistered => Status::invalid_argument(e.to_string()),
            FleetError::RegisterTimeout(_) => Status::deadline_exceeded(e.to_string()),
            FleetError::Stream(status) => status,
            FleetError::Store(s) => store_status(&s),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request_id_of(status: &Status) -> String {
        let id = status
            .metadata()
            .get(envgate_proto::metadata::REQUEST_ID)
            .expect("a request id")
            .to_str()
            .unwrap()
            .to_owned();
        assert_eq!(id.len(), 8);
        assert!(id.chars().all(|c| c.is_ascii_hexdigit()), "{id}");
        id
    }

    #[test]
    fn outages_reach_callers_as_one_sentence_and_a_request_id() {
        let store = StoreError::Unavailable(
            "grpc request error: code: 'The service is currently unavailable', message: \"tcp connect error\"".into(),
        );
        for status in [
            Status::from(PlacementError::Store(StoreError::Unavailable("x".into()))),
            Status::from(store),
            Status::from(PlacementError::RuntimeUnavailable(
                "docker is unavailable: error trying to connect".into(),
            )),
            Status::from(PlacementError::ProxyNotRegistered("p1".into())),
            Status::from(SelfServiceError::Store(StoreError::LeaseNotFound(7))),
        ] {
            assert_eq!(status.code(), Code::Unavailable);
            let id = request_id_of(&status);
            assert_eq!(
                status.message(),
                format!(
                    "the service is temporarily unavailable; try again in a minute (request id {id})"
                )
            );
        }
        let status = Status::from(PlacementError::RuntimeFailed(
            "docker answered 500: oops".into(),
        ));
        let id = request_id_of(&status);
        assert_eq!(status.code(), Code::Internal);
        assert_eq!(
            status.message(),
            format!(
                "something went wrong on our side; if it keeps happening, tell your administrator (request id {id})"
            )
        );
    }

    #[test]
    fn a_failed_pull_names_the_image_but_not_the_registrys_answer() {
        let status = Status::from(PlacementError::PullFailed {
            environment: "py".into(),
            image: "registry.lab/py:3".into(),
            reason: "Get \"https://registry.lab/v2/\": dial tcp 10.0.0.9:443: i/o timeout".into(),
        });
        let id = request_id_of(&status);
        assert_eq!(status.code(), Code::FailedPrecondition);
        assert_eq!(
            status.message(),
            format!(
                "environment \"py\" cannot start: its image registry.lab/py:3 could not be pulled (request id {id})"
            )
        );
    }

    #[test]
    fn missing_gpus_are_explained_without_the_engines_answer() {
        let status = Status::from(PlacementError::NoGpus {
            environment: "cuda".into(),
            reason: "could not select device driver \"\" with capabilities: [[gpu]]".into(),
        });
        let id = request_id_of(&status);
        assert_eq!(status.code(), Code::FailedPrecondition);
        assert_eq!(
            status.message(),
            format!(
                "environment \"cuda\" needs GPUs, and this host has none to give; tell your administrator (request id {id})"
            )
        );
    }

    #[test]
    fn messages_meant_for_users_are_kept_and_carry_no_request_id() {
        let status = Status::from(PlacementError::Choice(ChoiceError::UnknownEnvironment {
            requested: "nope".into(),
            available: vec!["busybox".into(), "debian".into()],
        }));
        assert_eq!(status.code(), Code::NotFound);
        assert_eq!(
            status.message(),
            "unknown environment \"nope\"; available: busybox, debian"
        );
        assert!(
            status
                .metadata()
                .get(envgate_proto::metadata::REQUEST_ID)
                .is_none()
        );
        let throttled = Status::from(AuthError::Throttled(crate::throttle::Refusal::User {
            retry_after_secs: 4,
        }));
        assert_eq!(
            throttled.message(),
            "too many failed attempts; retry in 4 s"
        );
    }
}
