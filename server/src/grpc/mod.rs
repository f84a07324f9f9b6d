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
