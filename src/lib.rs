//! Ward's wire API: the generated gRPC types and services, the file descriptor set served by
//! reflection, the API-key format shared by the server, the SDK and the leak scanner, and the
//! names of gRPC status codes.
#![deny(missing_docs)]

pub mod keyformat;
pub mod status;

/// Generated types and services of package `ward.v1`.
#[allow(missing_docs, clippy::all)]
pub mod v1 {
    tonic::include_proto!("ward.v1");
}

/// Encoded `FileDescriptorSet` of every Ward proto, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/ward_descriptor.bin"));

/// Encoded `FileDescriptorSet` of Envoy's external authorization API
/// (`envoy.service.auth.v3.Authorization`, with everything it imports), which Ward also
/// serves, for gRPC server reflection.
pub const ENVOY_AUTHZ_FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/envoy_authz_descriptor.bin"));
