//! The contract both sides of envgate share: the gRPC services, the file
//! descriptor set for reflection, and the few things that must agree on both
//! ends of a wire (token format, user-name grammar, metadata keys, telemetry).

pub mod audit;
pub mod names;
pub mod ops;
pub mod telemetry;
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
}
