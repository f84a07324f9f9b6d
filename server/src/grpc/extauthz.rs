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

use super::peer;
use super::status::to_status;
use crate::error::{Error, Result};
use crate::keys::{Keys, VerifyInput, VerifyResult};
use envoy_types::ext_authz::v3::pb::{
    Authorization, CheckRequest, CheckResponse, HeaderAppendAction, HttpStatusCode,
};
use envoy_types::ext_authz::v3::{
    CheckRequestExt, CheckResponseExt, DeniedHttpResponseBuilder, OkHttpResponseBuilder,
};
use std::collections::HashMap;
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

/// Parses what a Check request asks into the verifier's input, and names the header the key
/// came in (empty when none). No I/O; the verifier validates the fields themselves.
///
/// Header values are arbitrary UTF-8 (Envoy passes non-ASCII bytes on): they are split on
/// characters, never sliced at byte offsets — slicing `v[..7]` panicked on a value whose
/// seventh byte fell inside a multi-byte character, resetting the stream unaudited.
pub fn check_input(req: &CheckRequest) -> Result<(VerifyInput, &'static str)> {
    let (api_key, header) = req
        .get_client_headers()
        .and_then(presented_key)
        .unwrap_or_default();
    let none = HashMap::new();
    let ext = req
        .attributes
        .as_ref()
        .map_or(&none, |a| &a.context_extensions);
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
        Some(c) => Some(
            c.parse::<u64>()
                .map_err(|_| Error::invalid("context_extensions.cost is not a number"))?,
        ),
        None => None,
    };
    // An address Envoy reports that is not an IP (a pipe, an internal listener) is no IP.
    let client_ip = req
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
    Ok((input, header))
}

/// The presented key and the header it came in: `authorization: Bearer <key>` (scheme in any
/// case), else `x-api-key`.
fn presented_key(headers: &HashMap<String, String>) -> Option<(Zeroizing<String>, &'static str)> {
    if let Some(token) = headers.get("authorization").and_then(|v| bearer_token(v)) {
        return Some((Zeroizing::new(token.to_owned()), "authorization"));
    }
    headers
        .get(API_KEY_HEADER)
        .map(|v| (Zeroizing::new(v.trim().to_owned()), API_KEY_HEADER))
}

/// The token of a `Bearer <token>` credential (RFC 6750: scheme, one or more spaces, token),
/// or None for another scheme or no token.
fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

#[tonic::async_trait]
impl Authorization for ExtAuthzService {
    async fn check(&self, req: Request<CheckRequest>) -> Result<Response<CheckResponse>, Status> {
        let peer = peer(&req)?;
        let (input, header) = match check_input(req.get_ref()) {
            Ok(parsed) => parsed,
            Err(e) => return Err(to_status(self.keys.refuse(&peer, "Check", e).await)),
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
                return Err(to_status(Error::Internal(
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

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::service::auth::v3::{attribute_context, AttributeContext};

    fn with_headers(headers: &[(&str, &str)]) -> CheckRequest {
        CheckRequest {
            attributes: Some(AttributeContext {
                request: Some(attribute_context::Request {
                    http: Some(attribute_context::HttpRequest {
                        headers: headers
                            .iter()
                            .map(|(k, v)| (k.to_string(), v.to_string()))
                            .collect(),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
        }
    }

    fn key_of(headers: &[(&str, &str)]) -> (String, &'static str) {
        let (input, header) = check_input(&with_headers(headers)).unwrap();
        (input.api_key.to_string(), header)
    }

    #[test]
    fn bearer_and_x_api_key_headers() {
        let k = |s: &str| s.to_owned();
        assert_eq!(
            key_of(&[("authorization", "Bearer abc")]),
            (k("abc"), "authorization")
        );
        assert_eq!(
            key_of(&[("authorization", "  bEaReR   abc  ")]),
            (k("abc"), "authorization")
        );
        // Another scheme, or no token: the x-api-key header, if any.
        assert_eq!(
            key_of(&[("authorization", "Basic abc"), ("x-api-key", " xyz ")]),
            (k("xyz"), API_KEY_HEADER)
        );
        assert_eq!(key_of(&[("authorization", "Bearer ")]), (k(""), ""));
        assert_eq!(key_of(&[]), (k(""), ""));
    }

    #[test]
    fn non_ascii_headers_are_parsed_not_sliced() {
        // Each of these panicked in `v[..7]` (byte 7 inside a multi-byte character).
        for v in [
            "Bearer\u{e9}abcdef",
            "\u{e9}\u{e9}\u{e9}\u{e9}xyz",
            "Bea\u{1f511}rer x",
        ] {
            let (key, header) = key_of(&[("authorization", v)]);
            assert_eq!((key.as_str(), header), ("", ""), "{v:?}");
        }
        assert_eq!(
            key_of(&[("authorization", "Bearer cl\u{e9}")]),
            ("cl\u{e9}".to_owned(), "authorization")
        );
    }

    #[test]
    fn context_extensions_and_client_address() {
        let mut req = with_headers(&[("x-api-key", "k")]);
        let attrs = req.attributes.as_mut().unwrap();
        attrs.context_extensions = [
            ("scopes", "a:read, b:write"),
            ("cost", "7"),
            ("environment", "prod"),
            ("endpoint", "/orders"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let (input, _) = check_input(&req).unwrap();
        assert_eq!(input.required_scopes, vec!["a:read", "b:write"]);
        assert_eq!(input.cost, Some(7));
        assert_eq!(
            (input.environment.as_str(), input.endpoint.as_str()),
            ("prod", "/orders")
        );
        assert_eq!(input.client_ip, "");
        let attrs = req.attributes.as_mut().unwrap();
        attrs
            .context_extensions
            .insert("cost".into(), "lots".into());
        let Err(err) = check_input(&req) else {
            panic!("a cost that is not a number was accepted");
        };
        assert_eq!(err.code(), crate::error::Code::InvalidArgument);
    }
}
