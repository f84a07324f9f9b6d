//! The transport: one tonic service per file, each converting through [`wire`], taking the
//! caller from the verified connection ([`peer`]) and mapping errors through [`status`]; the
//! tower layers around them ([`limits`], [`catch_panic`]). Nothing below this folder imports
//! it, and no decision is made here: every call goes to the domain (vault/, keys/, audit/, alerts/).

pub mod admin;
pub mod alerts;
pub mod audit;
pub mod backup;
pub mod catch_panic;
pub mod extauthz;
pub mod keys;
pub mod limits;
pub mod secrets;
pub mod status;
pub mod wire;

use crate::identity::Peer;
use tonic::{Request, Status};

/// The verified caller of a request. Every connection is mutual TLS, so a request without a
/// peer can only be a bug; refuse it rather than guess.
pub fn peer<T>(req: &Request<T>) -> Result<Peer, Status> {
    req.extensions()
        .get::<Peer>()
        .cloned()
        .ok_or_else(|| Status::unauthenticated("no verified client certificate"))
}

/// Every gRPC path served here, for the bounded `method` label of the RPC metrics.
pub fn served_methods() -> std::collections::HashSet<String> {
    let mut out: std::collections::HashSet<String> = [
        "/grpc.health.v1.Health/Check",
        "/grpc.health.v1.Health/Watch",
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        "/envoy.service.auth.v3.Authorization/Check",
    ]
    .into_iter()
    .map(str::to_owned)
    .collect();
    if let Ok(fds) =
        <prost_types::FileDescriptorSet as prost::Message>::decode(ward::FILE_DESCRIPTOR_SET)
    {
        for f in fds.file {
            let package = f.package.unwrap_or_default();
            for svc in f.service {
                for m in svc.method {
                    out.insert(format!(
                        "/{package}.{}/{}",
                        svc.name.as_deref().unwrap_or_default(),
                        m.name.as_deref().unwrap_or_default()
                    ));
                }
            }
        }
    }
    out
}
