//! The self-service developer portal: server-rendered pages over HTTPS where a developer
//! lists, creates, rolls, restricts and revokes the API keys they may manage, and watches their
//! use. Another front door beside grpc/, with the same rules: the caller comes from the
//! verified client certificate (same CA, CRLs and identity string as gRPC, through tls.rs), or
//! from a trusted SSO proxy's header; every action is the vault's or the key verifier's domain
//! call under the same policy, audited with that identity. The portal decides nothing about
//! keys; it converts forms, calls the domain and renders the answer.
//!
//! Files: this one routes; [`web`] (security headers, cookie, CSRF, forms), [`view`] (the
//! page frame, errors), [`pages`] (the GET pages),
//! [`actions`] (form → domain call), [`chart`] (the usage SVG), [`reveal`] (a new key shown
//! once), [`trail`] (a key's audit trail and the chain check).

pub mod actions;
pub mod chart;
pub mod pages;
pub mod reveal;
pub mod trail;
pub mod view;
pub mod web;

use crate::audit::AuditAccess;
use crate::config::PortalConfig;
use crate::identity::Peer;
use crate::keys::Keys;
use crate::tls::{check_cn_identity, TlsConn};
use crate::vault::Vault;
use bytes::Bytes;
use futures::StreamExt;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;
use tonic::transport::server::Connected;
use web::{Body, Csrf, Form};

/// Longest time one request may take (reading the form included).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest wait for a request head (HTTP/1.1), and the HTTP/2 keep-alive ping's period and
/// answer time.
const HEADER_TIMEOUT: Duration = Duration::from_secs(15);

/// The portal's settings, from `[portal]`.
#[derive(Debug, Clone)]
pub struct PortalSettings {
    /// Header naming the user behind a trusted SSO proxy.
    pub identity_header: Option<http::HeaderName>,
    /// Certificate identities allowed to set it.
    pub trusted_proxies: Vec<String>,
    /// Longest expiry of a key created here, in milliseconds.
    pub max_key_lifetime_ms: u64,
}

impl PortalSettings {
    /// From the configuration (already validated).
    pub fn from_config(c: &PortalConfig) -> Self {
        Self {
            identity_header: c
                .identity_header
                .as_deref()
                .and_then(|h| http::HeaderName::from_bytes(h.as_bytes()).ok()),
            trusted_proxies: c.trusted_proxies.clone(),
            max_key_lifetime_ms: u64::try_from(c.max_key_lifetime.as_millis()).unwrap_or(u64::MAX),
        }
    }
}

/// The portal: the domain it calls and its own small state.
pub struct Portal {
    vault: Arc<Vault>,
    keys: Arc<Keys>,
    audit: Arc<AuditAccess>,
    settings: PortalSettings,
    csrf: Csrf,
    reveals: reveal::Reveals,
}

/// One request as the pages and actions see it: who, from which session, and its CSRF token.
pub struct Caller {
    /// The caller, as the domain sees it.
    pub peer: Peer,
    /// The session id (from the cookie, or new).
    pub session: String,
    /// Whether the session is new (the response sets the cookie).
    pub new_session: bool,
    /// The token this caller's forms carry.
    pub csrf: String,
}

impl Portal {
    /// A portal over the vault and the key verifier.
    pub fn new(
        vault: Arc<Vault>,
        keys: Arc<Keys>,
        audit: Arc<AuditAccess>,
        settings: PortalSettings,
    ) -> Self {
        Self {
            vault,
            keys,
            audit,
            settings,
            csrf: Csrf::default(),
            reveals: reveal::Reveals::default(),
        }
    }

    /// Serves every connection `incoming` yields (each already past mutual TLS) until it ends.
    pub async fn serve(
        self: Arc<Self>,
        mut incoming: impl futures::Stream<Item = Result<TlsConn, std::io::Error>> + Unpin,
    ) {
        while let Some(conn) = incoming.next().await {
            let Ok(conn) = conn else { continue };
            let portal = self.clone();
            tokio::spawn(async move {
                let peer = conn.connect_info();
                let svc = hyper::service::service_fn(move |req| {
                    let (portal, peer) = (portal.clone(), peer.clone());
                    async move {
                        let answer =
                            tokio::time::timeout(REQUEST_TIMEOUT, portal.handle(&peer, req)).await;
                        Ok::<_, Infallible>(answer.unwrap_or_else(|_| {
                            portal.error(StatusCode::REQUEST_TIMEOUT, "request timed out")
                        }))
                    }
                });
                let mut builder = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                );
                // A client that trickles its request head (or holds an idle HTTP/2
                // connection) does not keep a connection slot for ever.
                builder
                    .http1()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(HEADER_TIMEOUT);
                builder
                    .http2()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .max_concurrent_streams(32)
                    .keep_alive_interval(HEADER_TIMEOUT)
                    .keep_alive_timeout(HEADER_TIMEOUT);
                let served = builder
                    .serve_connection(hyper_util::rt::TokioIo::new(conn), svc)
                    .await;
                if let Err(e) = served {
                    tracing::debug!(error = %e, "portal connection ended");
                }
            });
        }
    }

    /// Answers one request.
    pub async fn handle(&self, conn: &Peer, req: Request<Incoming>) -> Response<Body> {
        let peer = match self.caller_of(conn, req.headers()) {
            Ok(p) => p,
            Err((status, why)) => {
                tracing::warn!(identity = %conn.identity, addr = %conn.addr, why, "portal request refused");
                return self.error(status, why);
            }
        };
        let (session, new_session) = match web::session_of(req.headers()) {
            Some(s) => (s, false),
            None => (web::new_session(), true),
        };
        let caller = Caller {
            csrf: self.csrf.token(&session, &peer.identity),
            peer,
            session,
            new_session,
        };
        let path = req.uri().path().to_owned();
        let query = web::query(req.uri());
        let method = req.method().clone();
        if method == Method::POST {
            let host = req
                .headers()
                .get(http::header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_owned)
                .or_else(|| req.uri().authority().map(|a| a.to_string()));
            if !web::same_origin(req.headers(), host.as_deref()) {
                return self.refuse_post(&caller, "cross-site request refused");
            }
            let form = match Limited::new(req.into_body(), web::MAX_FORM_BYTES)
                .collect()
                .await
            {
                Ok(b) => Form::parse(&b.to_bytes()),
                Err(_) => return self.error(StatusCode::PAYLOAD_TOO_LARGE, "form too large"),
            };
            if caller.new_session
                || !self
                    .csrf
                    .check(&caller.session, &caller.peer.identity, form.get("csrf"))
            {
                return self.refuse_post(
                    &caller,
                    "the form expired or did not come from this portal: reload the page",
                );
            }
            return self.post(&caller, &path, &form).await;
        }
        if method != Method::GET && method != Method::HEAD {
            return self.error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed");
        }
        match path.as_str() {
            "/static/htmx.min.js" => static_file("text/javascript", HTMX),
            "/static/portal.js" => static_file("text/javascript", PORTAL_JS),
            "/static/portal.css" => static_file("text/css", PORTAL_CSS),
            _ => self.get(&caller, &path, &query).await,
        }
    }

    /// Answers a GET of a page.
    async fn get(
        &self,
        caller: &Caller,
        path: &str,
        query: &std::collections::BTreeMap<String, String>,
    ) -> Response<Body> {
        let name = query.get("name").map(String::as_str).unwrap_or("");
        let page = match path {
            "/" => return web::see_other("/keys"),
            "/keys" => pages::keys_page(self, caller).await,
            "/new" => Ok(pages::new_page(self, caller)),
            "/reveal" => Ok(pages::reveal_page(self, caller)),
            "/key" => pages::key_page(self, caller, name, None).await,
            "/audit" => trail::page(self, caller, name).await,
            _ => return self.error(StatusCode::NOT_FOUND, "no such page"),
        };
        match page {
            Ok(p) => web::html(
                StatusCode::OK,
                p,
                caller.new_session.then_some(caller.session.as_str()),
            ),
            Err(e) => view::error_response(e),
        }
    }

    /// Answers a POST whose origin and CSRF token were checked. A change answers with a
    /// redirect (a reload never repeats it); a preview or a chain check with its page.
    async fn post(&self, caller: &Caller, path: &str, form: &Form) -> Response<Body> {
        let done = match path {
            "/keys" => actions::create(self, caller, form).await,
            "/roll" => actions::roll(self, caller, form).await,
            "/revoke" => actions::revoke(self, caller, form).await,
            "/policy" if form.get("action") == "preview" => {
                return match actions::edit_preview(self, caller, form).await {
                    Ok(page) => web::html(StatusCode::OK, page, None),
                    Err(e) => view::error_response(e),
                }
            }
            "/policy" => actions::update_policy(self, caller, form).await,
            "/verify-chain" => return trail::verify(self, caller, form).await,
            _ => return self.error(StatusCode::NOT_FOUND, "no such page"),
        };
        match done {
            Ok(next) => web::see_other(&next),
            Err(e) => view::error_response(e),
        }
    }

    /// The caller: the certificate's identity, or the user a trusted proxy names.
    fn caller_of(
        &self,
        conn: &Peer,
        headers: &http::HeaderMap,
    ) -> Result<Peer, (StatusCode, &'static str)> {
        let Some(name) = &self.settings.identity_header else {
            return Ok(conn.clone());
        };
        let trusted = self
            .settings
            .trusted_proxies
            .iter()
            .any(|p| **p == *conn.identity);
        match (trusted, headers.get(name)) {
            (false, None) => Ok(conn.clone()),
            (false, Some(_)) => Err((
                StatusCode::FORBIDDEN,
                "identity header sent by a client that is not a trusted proxy",
            )),
            (true, None) => Err((StatusCode::UNAUTHORIZED, "the SSO proxy named no user")),
            (true, Some(v)) => {
                let user = v
                    .to_str()
                    .ok()
                    .filter(|u| u.len() <= 256)
                    .and_then(|u| check_cn_identity(u).ok())
                    .ok_or((
                        StatusCode::BAD_REQUEST,
                        "the SSO proxy's user is not a valid identity",
                    ))?;
                Ok(Peer {
                    identity: user.into(),
                    addr: conn.addr,
                })
            }
        }
    }

    fn refuse_post(&self, caller: &Caller, why: &'static str) -> Response<Body> {
        tracing::warn!(identity = %caller.peer.identity, why, "portal POST refused");
        self.error(StatusCode::FORBIDDEN, why)
    }

    /// An error page (no session needed, nothing of the caller's in it).
    pub fn error(&self, status: StatusCode, message: &str) -> Response<Body> {
        web::html(status, view::error_page(status, message), None)
    }

    /// The vault.
    pub fn vault(&self) -> &Arc<Vault> {
        &self.vault
    }

    /// The key verifier (usage reports).
    pub fn keys(&self) -> &Arc<Keys> {
        &self.keys
    }

    /// Audit log access (the trail, the chain check).
    pub fn audit(&self) -> &Arc<AuditAccess> {
        &self.audit
    }

    /// The settings.
    pub fn settings(&self) -> &PortalSettings {
        &self.settings
    }

    /// Keys waiting to be shown once.
    pub fn reveals(&self) -> &reveal::Reveals {
        &self.reveals
    }
}

/// The vendored htmx (2.0.4, 0BSD: static/htmx-LICENSE.txt).
const HTMX: &[u8] = include_bytes!("static/htmx-2.0.4.min.js");
const PORTAL_JS: &[u8] = include_bytes!("static/portal.js");
const PORTAL_CSS: &[u8] = include_bytes!("static/portal.css");

fn static_file(content_type: &'static str, body: &'static [u8]) -> Response<Body> {
    web::respond(StatusCode::OK, content_type, Bytes::from_static(body), None)
}
