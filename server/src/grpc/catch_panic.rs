//! A panic in a gRPC handler becomes an INTERNAL answer with an audit record, not a reset
//! stream with none.
//!
//! Without this, a handler's panic unwinds out of hyper's per-stream task: the client sees the
//! stream reset (which Envoy's `failure_mode_allow` turns into "allowed"), and the call leaves
//! no audit record (reproduced with a non-ASCII `authorization` header to ext_authz `Check`).
//! [`CatchPanicLayer`] wraps every service on the gRPC listener: a panic while the handler
//! decides its answer is caught, the call is audited (identity, peer, method, code INTERNAL),
//! and the client gets a plain gRPC INTERNAL status. The panic's text never leaves the server
//! and is not logged either: a panic message can quote its input (a string slicing panic
//! quotes the string — there, the API key), so only the method and the panic's location are
//! logged ([`install_hook`]).
//!
//! Panics inside a streaming response's body (after the handler has answered) end that stream;
//! its call was audited when it was opened.

use super::status::to_status;
use crate::audit::AuditRecord;
use crate::error::Code;
use crate::identity::Peer;
use crate::vault::Vault;
use futures::future::BoxFuture;
use futures::FutureExt;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::task::{Context, Poll};

/// The answer's message: says nothing about the panic.
const MESSAGE: &str = "internal error; the call was audited and logged";

/// Replaces the default panic hook with one that logs where a panic happened, not its message
/// (which may quote input such as an API key). Call once at start-up.
pub fn install_hook() {
    std::panic::set_hook(Box::new(|info| {
        let location = info
            .location()
            .map(|l| format!("{}:{}", l.file(), l.line()))
            .unwrap_or_default();
        tracing::error!(
            thread = std::thread::current().name().unwrap_or("unnamed"),
            "panicked at {location} (message withheld: it may quote its input)"
        );
    }));
}

/// Layer for the gRPC server builder: see the module docs.
#[derive(Clone)]
pub struct CatchPanicLayer {
    vault: Arc<Vault>,
}

impl CatchPanicLayer {
    /// Audits caught panics in `vault`'s audit log.
    pub fn new(vault: Arc<Vault>) -> Self {
        Self { vault }
    }
}

impl<S> tower_layer::Layer<S> for CatchPanicLayer {
    type Service = CatchPanic<S>;
    fn layer(&self, inner: S) -> Self::Service {
        CatchPanic {
            inner,
            vault: self.vault.clone(),
        }
    }
}

/// The service [`CatchPanicLayer`] wraps around the router.
#[derive(Clone)]
pub struct CatchPanic<S> {
    inner: S,
    vault: Arc<Vault>,
}

impl<S, B, RB> tower_service::Service<http::Request<B>> for CatchPanic<S>
where
    S: tower_service::Service<http::Request<B>, Response = http::Response<RB>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    RB: Default + Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let peer = req.extensions().get::<Peer>().cloned();
        let method = method_name(req.uri().path());
        let vault = self.vault.clone();
        let inner = &mut self.inner;
        let called = std::panic::catch_unwind(AssertUnwindSafe(move || inner.call(req)));
        Box::pin(async move {
            let outcome = match called {
                Ok(fut) => AssertUnwindSafe(fut).catch_unwind().await,
                Err(panic) => Err(panic),
            };
            match outcome {
                Ok(answer) => answer,
                // The payload is dropped unread (see the module docs).
                Err(_payload) => Ok(answer_panic(&vault, peer, method).await),
            }
        })
    }
}

/// The RPC's method name as audit records give it (`Check`, `FetchSecret`): the path's last
/// segment when it looks like a method name, else `unknown` — the path is the client's to
/// choose, and a record must not carry arbitrary text.
fn method_name(path: &str) -> String {
    let method = path.rsplit('/').next().unwrap_or_default();
    let plausible = !method.is_empty()
        && method.len() <= 64
        && method
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_');
    if plausible { method } else { "unknown" }.to_owned()
}

/// Audits the call as INTERNAL and answers it so; if the audit record cannot be written, the
/// answer is the audit log's outage (nothing is answered before its record is durable).
async fn answer_panic<RB: Default>(
    vault: &Vault,
    peer: Option<Peer>,
    method: String,
) -> http::Response<RB> {
    // Every connection is mutual TLS, so the peer is always there; should it not be, the call
    // is still recorded, under an empty identity.
    let peer = peer.unwrap_or_else(|| Peer {
        identity: Arc::from(""),
        addr: std::net::SocketAddr::from(([0, 0, 0, 0], 0)),
    });
    tracing::error!(method, identity = %peer.identity, "handler panicked; answered INTERNAL");
    let mut rec = AuditRecord::new(&peer, &method, vault.now());
    rec.code = Code::Internal.as_i32();
    match vault.audit().append(rec).await {
        Ok(()) => tonic::Status::internal(MESSAGE).into_http(),
        Err(e) => to_status(e).into_http(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::sled_store::SledStore;
    use crate::store::Store;
    use tower_layer::Layer;
    use tower_service::Service;

    fn request(path: &str, peer: bool) -> http::Request<()> {
        let mut req = http::Request::builder().uri(path).body(()).unwrap();
        if peer {
            req.extensions_mut().insert(Peer {
                identity: "edge".into(),
                addr: "127.0.0.1:4000".parse().unwrap(),
            });
        }
        req
    }

    #[tokio::test]
    async fn a_panic_is_answered_internal_and_audited() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(SledStore::open(dir.path()).unwrap());
        let (vault, _clock) =
            crate::testutil::vault_over(store.clone(), crate::testutil::ADMIN_ONLY_POLICY, 1000)
                .await;
        let handler = tower::service_fn(|req: http::Request<()>| async move {
            if req.uri().path().contains("/Check") {
                let header = String::from("Bearer\u{e9}ward_dev_secret");
                // The bug this layer was written for: a byte slice inside a character.
                std::hint::black_box(&header[..7]);
            }
            Ok::<_, std::convert::Infallible>(http::Response::new(String::from("fine")))
        });
        let mut svc = CatchPanicLayer::new(vault.clone()).layer(handler);

        let res = svc
            .call(request("/envoy.service.auth.v3.Authorization/Check", true))
            .await
            .unwrap();
        let status = tonic::Status::from_header_map(res.headers()).unwrap();
        assert_eq!(status.code(), tonic::Code::Internal);
        assert!(!status.message().contains("secret"), "{status:?}");
        assert!(!status.message().contains("boundary"), "{status:?}");
        assert!(res.body().is_empty());
        // Not a panic: passed through untouched.
        let res = svc.call(request("/x/Other", true)).await.unwrap();
        assert_eq!(res.body(), "fine");
        // A panic without a peer, on an odd path: still audited, under a bounded name.
        let res = svc
            .call(request("/x/%C3%A9/Check%20", false))
            .await
            .unwrap();
        let status = tonic::Status::from_header_map(res.headers()).unwrap();
        assert_eq!(status.code(), tonic::Code::Internal);

        let audited: Vec<(String, String, i32)> = crate::audit::call_records(vault.audit())
            .into_iter()
            .map(|r| (r.method, r.identity, r.code))
            .collect();
        let internal = Code::Internal.as_i32();
        assert_eq!(
            audited,
            vec![
                ("Check".to_owned(), "edge".to_owned(), internal),
                ("unknown".to_owned(), String::new(), internal),
            ]
        );
    }
}
