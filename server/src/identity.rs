//! Who is calling. A leaf: the transport makes a [`Peer`] from the verified client certificate
//! (tls.rs), and authorization, the domain and the audit log take it from there.

use std::net::SocketAddr;
use std::sync::Arc;

/// Who is calling: taken from the verified client certificate, never from the request.
#[derive(Debug, Clone)]
pub struct Peer {
    /// Identity: first URI SAN, else subject CN.
    pub identity: Arc<str>,
    /// Remote address.
    pub addr: SocketAddr,
}
