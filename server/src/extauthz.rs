//! Envoy's external authorization API (`envoy.service.auth.v3.Authorization/Check`) on Ward's
//! gRPC listener, so an Envoy gateway can require a Ward API key on its routes.
//!
//! The presented key comes from `authorization: Bearer <key>` or else `x-api-key`; the route's
//! `context_extensions` may name `scopes` (space- or comma-separated), `environment`,
//! `endpoint` and `cost`; the client IP is the request's source address. The check is the
//! same verification as VerifyKey (and audited as `Check`). Allowed: OK, with
//! `x-ward-key-owner` and `x-ward-key-name` set on the upstream request (overwriting anything
//! the client sent) and the key's header removed. Denied: 401 for a key that is not good
//! (malformed, unknown, revoked, expired, disabled), 403 for a good key used where it may not
//! be (environment, IP, scope), 429 with Retry-After for rate limit and quota. The denial
//! body never says which, so a client cannot probe whether a key exists. Ward's own faults
//! and outages are gRPC errors, which Envoy treats per its `failure_mode_allow`.

use crate::keys::{Keys, VerifyInput, VerifyResult};
use crate::service::peer;
use crate::status::to_status;
use envoy_types::ext_authz::v3::pb::{
    Authorization, CheckRequest, CheckResponse, HeaderAppendAction, HttpStatusCode,
};
use envoy_types::ext_authz::v3::{
    CheckRequestExt, CheckResponseExt, DeniedHttpResponseBuilder, OkHttpResponseBuilder,
};
use std::sync::Arc;
use tonic::{Request, Response, Status};
use zeroize::Zeroizing;

/// Header set on allowed requests: the key's owner.
pub const OWNER_HEADER: &str = "x-ward-key-owner";
/// Header set on allowed requests: the secret holding the key.
pub const NAME_HEADER: &str = "x-ward-key-name";
/// The alternative header a key may come in.
pub const API_KEY_HEADER: &str = "x-api-key";

/// `envoy.service.auth.v3.Authorization` over the verifier.
pub struct ExtAuthzService {
    keys: Arc<Keys>,
}

impl ExtAuthzService {
    /// A service over `keys`.
    pub fn new(keys: Arc<Keys>) -> Self {
        Self { keys }
    }
}

/// The presented key and the header it came in.
fn presented_key(req: &CheckRequest) -> Option<(Zeroizing<String>, &'static str)> {
    let headers = req.get_client_headers()?;
    if let Some(v) = headers.get("authorization") {
        let v = v.trim();
        if v.len() > 7 && v[..7].eq_ignore_ascii_case("bearer ") {
            return Some((Zeroizing::new(v[7..].trim().to_owned()), "authorization"));
        }
    }
    headers
        .get(API_KEY_HEADER)
        .map(|v| (Zeroizing::new(v.trim().to_owned()), API_KEY_HEADER))
}

#[tonic::async_trait]
impl Authorization for ExtAuthzService {
    async fn check(&self, req: Request<CheckRequest>) -> Result<Response<CheckResponse>, Status> {
        let peer = peer(&req)?;
        let r = req.into_inner();
        let (api_key, header) = presented_key(&r).unwrap_or_default();
        let ext = r
            .attributes
            .as_ref()
            .map(|a| a.context_extensions.clone())
            .unwrap_or_default();
        let scopes = ext
            .get("scopes")
            .map(|s| {
                s.split([' ', ','])
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default();
        let cost = match ext.get("cost") {
            Some(c) => Some(c.parse::<u64>().map_err(|_| {
                Status::invalid_argument("context_extensions.cost is not a number")
            })?),
            None => None,
        };
        // An address Envoy reports that is not an IP (a pipe, an internal listener) is no IP.
        let client_ip = r
            .get_client_address()
            .filter(|a| a.parse::<std::net::IpAddr>().is_ok())
            .cloned()
            .unwrap_or_default();
        let input = VerifyInput {
            api_key,
            required_scopes: scopes,
            client_ip,
            cost,
            environment: ext.get("environment").cloned().unwrap_or_default(),
            endpoint: ext.get("endpoint").cloned().unwrap_or_default(),
        };
        let v = self
            .keys
            .verify(&peer, input, "Check")
            .await
            .map_err(to_status)?;

        if v.valid() {
            // A VALID verdict always carries the key's facts; should that ever not hold, fail
            // rather than allow with empty headers.
            let Some(key) = v.key else {
                return Err(to_status(crate::error::Error::Internal(
                    "VALID verdict without key facts".into(),
                )));
            };
            let mut ok = OkHttpResponseBuilder::new();
            let overwrite = Some(HeaderAppendAction::OverwriteIfExistsOrAdd);
            ok.add_header(OWNER_HEADER, key.owner, overwrite, false)
                .add_header(NAME_HEADER, key.name, overwrite, false);
            if !header.is_empty() {
                ok.remove_header(header);
            }
            let mut resp = CheckResponse::with_status(Status::ok("allowed"));
            resp.set_http_response(ok);
            return Ok(Response::new(resp));
        }

        let (status, http, body) = match v.result {
            VerifyResult::WrongEnvironment
            | VerifyResult::ForbiddenIp
            | VerifyResult::InsufficientScope => (
                Status::permission_denied("forbidden"),
                HttpStatusCode::Forbidden,
                "forbidden\n",
            ),
            VerifyResult::RateLimited | VerifyResult::QuotaExceeded => (
                Status::resource_exhausted("too many requests"),
                HttpStatusCode::TooManyRequests,
                "too many requests\n",
            ),
            _ => (
                Status::unauthenticated("invalid API key"),
                HttpStatusCode::Unauthorized,
                "invalid API key\n",
            ),
        };
        let mut denied = DeniedHttpResponseBuilder::new();
        denied.set_http_status(http).set_body(body);
        if http == HttpStatusCode::Unauthorized {
            denied.add_header("www-authenticate", "Bearer", None, false);
        }
        if let Some(ms) = v.retry_after_ms {
            denied.add_header(
                "retry-after",
                ms.div_ceil(1000).max(1).to_string(),
                None,
                false,
            );
        }
        let mut resp = CheckResponse::with_status(status);
        resp.set_http_response(denied);
        Ok(Response::new(resp))
    }
}
