//! The contract both sides of envgate share: the gRPC services, the file
//! descriptor set for reflection, and the few things that must agree on both
//! ends of a wire (token format, user-name grammar, metadata keys, telemetry).

pub mod audit;
pub mod names;
pub mod ops;
pub mod telemetry;
pub mod time;
pub mod tls;
pub mod token;

pub mod v1 {
    tonic::include_proto!("envgate.v1");
}

pub mod admin {
    pub mod v1 {
        tonic::include_proto!("envgate.admin.v1");
    }
}

/// Encoded `FileDescriptorSet` of every envgate service, for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("envgate_descriptor");

/// gRPC metadata keys.
pub mod metadata {
    /// `authorization: Bearer <admin token>` on admin calls; the token names the operator.
    pub const AUTHORIZATION: &str = "authorization";
    /// The proxy's connection id, so both sides log the same id.
    pub const CONNECTION_ID: &str = "x-envgate-connection-id";
    /// On an error status: the id under which the detail was logged; the message users see
    /// already names it.
    pub const REQUEST_ID: &str = "x-envgate-request-id";
}

/// What users read when something broke on envgate's side, and the request ids that tie such
/// a line to the log line with the detail. Both ends use these, so users see the same words
/// whichever side noticed.
pub mod failure {
    /// An outage: a store, runtime or replica that cannot be reached.
    pub const UNAVAILABLE: &str = "the service is temporarily unavailable; try again in a minute";
    /// The LDAP directory password logins are checked against cannot be reached.
    pub const DIRECTORY_UNAVAILABLE: &str = "the directory is unavailable; try again later";
    /// The auth webhook (or the identity sources together) could not answer in time.
    pub const IDENTITY_UNAVAILABLE: &str =
        "the authentication service is unavailable; try again later";
    /// No control-plane replica answers: the proxy reaches only containers it placed before
    /// (docs/operations.md, "When the control plane is down").
    pub const CONTROL_PLANE_DOWN: &str = "the control plane is unavailable; only environments that are already running can be reached right now";
    /// Anything else the user cannot act on.
    pub const INTERNAL: &str =
        "something went wrong on our side; if it keeps happening, tell your administrator";

    /// A fresh id, 8 hex digits, to log the detail under and show to the user.
    pub fn request_id() -> String {
        let mut bytes = [0u8; 4];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
            .expect("the system random source works");
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// `message (request id ID)`.
    pub fn with_request_id(message: &str, id: &str) -> String {
        format!("{message} (request id {id})")
    }
}
