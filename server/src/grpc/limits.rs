//! Connection and call limits that no single service can enforce: how many connections and
//! handshakes the listener admits ([`ConnLimits`]), and how many calls one identity may have
//! in progress across all its connections ([`IdentityCallsLayer`], RESOURCE_EXHAUSTED past
//! it, counted by [`PerIdentity`]). The HTTP/2 knobs (streams per connection, reset-stream
//! limits, keepalive, connection age, request timeout) are set on the server builder from the
//! same `[limits]` and `[tls]` tables; docs/configuration.md lists them all.

use super::status::to_status;
use crate::config::Config;
use crate::error::Error;
use crate::identity::Peer;
use crate::metrics;
use crate::slots::{IdentitySlot, PerIdentity};
use crate::store::Store;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Refuses every call (UNAVAILABLE, saying why) while the store says what this process holds
/// may be out of date ([`Store::fresh`]): a replica cut off from a shared store sends its
/// callers to another. For `tonic::service::InterceptorLayer`.
pub fn refuse_when_stale(
    store: Arc<dyn Store>,
) -> impl FnMut(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> + Clone {
    move |req| match store.fresh() {
        Ok(()) => Ok(req),
        Err(e) => {
            metrics::global().count_stale_refusal();
            Err(tonic::Status::unavailable(e.to_string()))
        }
    }
}

/// The listener's limits: connections open, handshakes in progress, handshake time.
#[derive(Debug, Clone)]
pub struct ConnLimits {
    /// Connections open at once (a permit is held for a connection's whole life).
    pub connections: Arc<Semaphore>,
    /// Most connections, for messages.
    pub max_connections: usize,
    /// Handshakes in progress at once.
    pub handshakes: Arc<Semaphore>,
    /// How long a handshake may take.
    pub handshake_timeout: Duration,
}

impl ConnLimits {
    /// Limits from `[limits]`.
    pub fn from_config(cfg: &Config) -> Self {
        Self::new(
            cfg.limits.max_connections,
            cfg.limits.max_handshakes,
            Duration::from_millis(cfg.limits.handshake_timeout_ms),
        )
    }

    /// Limits with the given values.
    pub fn new(max_connections: usize, max_handshakes: usize, handshake_timeout: Duration) -> Self {
        Self {
            connections: Arc::new(Semaphore::new(max_connections)),
            max_connections,
            handshakes: Arc::new(Semaphore::new(max_handshakes)),
            handshake_timeout,
        }
    }

    /// A connection slot, or None when `max_connections` are open.
    pub fn try_connection(&self) -> Option<OwnedSemaphorePermit> {
        self.connections.clone().try_acquire_owned().ok()
    }

    /// Waits for a handshake slot (the accept loop stops accepting meanwhile, so new clients
    /// wait in the kernel's listen backlog rather than in memory).
    pub async fn handshake_slot(&self) -> Option<OwnedSemaphorePermit> {
        self.handshakes.clone().acquire_owned().await.ok()
    }
}

impl Default for ConnLimits {
    /// The defaults of `[limits]`.
    fn default() -> Self {
        let l = crate::config::Limits::default();
        Self::new(
            l.max_connections,
            l.max_handshakes,
            Duration::from_millis(l.handshake_timeout_ms),
        )
    }
}

/// Caps the calls one identity has in progress (until its response body ends, so an open
/// stream counts) at `max`; past it the call is answered RESOURCE_EXHAUSTED before any
/// service sees it.
#[derive(Debug, Clone)]
pub struct IdentityCallsLayer {
    max: usize,
    book: Arc<PerIdentity>,
}

impl IdentityCallsLayer {
    /// At most `max` calls in progress per identity.
    pub fn new(max: usize) -> Self {
        Self {
            max,
            book: Arc::default(),
        }
    }
}

impl<S> tower_layer::Layer<S> for IdentityCallsLayer {
    type Service = IdentityCalls<S>;
    fn layer(&self, inner: S) -> Self::Service {
        IdentityCalls {
            inner,
            max: self.max,
            book: self.book.clone(),
        }
    }
}

/// The service [`IdentityCallsLayer`] wraps around the router.
#[derive(Debug, Clone)]
pub struct IdentityCalls<S> {
    inner: S,
    max: usize,
    book: Arc<PerIdentity>,
}

type HttpResponse = http::Response<tonic::body::Body>;

impl<S, B> tower_service::Service<http::Request<B>> for IdentityCalls<S>
where
    S: tower_service::Service<http::Request<B>, Response = HttpResponse>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = HttpResponse;
    type Error = S::Error;
    type Future = futures::future::BoxFuture<'static, Result<HttpResponse, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        // No peer means no verified identity; the service refuses such a call itself.
        let guard = match req.extensions().get::<Peer>() {
            None => None,
            Some(peer) => match self.book.enter(&peer.identity, self.max) {
                Some(g) => Some(g),
                None => {
                    let status = to_status(Error::ResourceExhausted(format!(
                        "{} already has {} calls in progress (limits.max_calls_per_identity); \
                         retry after some finish",
                        peer.identity, self.max
                    )));
                    return Box::pin(futures::future::ready(Ok(status.into_http())));
                }
            },
        };
        let fut = self.inner.call(req);
        Box::pin(async move {
            let resp = fut.await?;
            Ok(match guard {
                None => resp,
                Some(guard) => resp.map(|body| tonic::body::Body::new(Guarded { body, guard })),
            })
        })
    }
}

/// A response body that holds its call's slot until it ends.
struct Guarded {
    body: tonic::body::Body,
    guard: IdentitySlot,
}

impl hyper::body::Body for Guarded {
    type Data = bytes::Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        let _ = &self.guard;
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}
