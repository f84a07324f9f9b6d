//! The portal's web security, in one place: the response headers every page carries (CSP
//! without inline script, no framing, no caching), the SameSite=Strict session cookie, the
//! CSRF token bound to that cookie and the caller's identity, the same-origin check on every
//! POST, and form decoding. Pages and actions never build a response head themselves.
//!
//! Why both a token and an Origin check: SameSite=Strict keeps the cookie off cross-site
//! requests in current browsers, the Origin check refuses a cross-site POST even where a
//! browser sends the cookie anyway, and the token (an HMAC of the session and identity under a
//! key that lives only in this process) refuses a forged form from a same-site page that
//! cannot read ours.

use bytes::Bytes;
use hmac::{Hmac, Mac};
use http::header::{self, HeaderMap, HeaderValue};
use http::{Response, StatusCode};
use http_body_util::Full;
use rand::{rngs::OsRng, RngCore};
use sha2::Sha256;
use std::collections::BTreeMap;

/// Name of the session cookie (`__Host-`: Secure, no Domain, Path=/, so no sibling host can
/// set or shadow it).
pub const SESSION_COOKIE: &str = "__Host-ward_portal";
/// Largest form body read.
pub const MAX_FORM_BYTES: usize = 64 * 1024;

const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
                   connect-src 'self'; form-action 'self'; base-uri 'none'; \
                   frame-ancestors 'none'";

/// A response body.
pub type Body = Full<Bytes>;

/// The process's CSRF key: tokens do not survive a restart (a form loaded before one is
/// refused after it, and the page says to reload).
pub struct Csrf {
    key: [u8; 32],
}

impl Default for Csrf {
    /// A fresh random key.
    fn default() -> Self {
        let mut key = [0u8; 32];
        OsRng.fill_bytes(&mut key);
        Self { key }
    }
}

impl Csrf {
    fn mac(&self, session: &str, identity: &str) -> Hmac<Sha256> {
        // HMAC takes a key of any length; the key here is always 32 bytes.
        let mut m = <Hmac<Sha256> as Mac>::new_from_slice(&self.key)
            .unwrap_or_else(|_| unreachable!("HMAC accepts every key length"));
        m.update(b"ward-portal-csrf\0");
        m.update(session.as_bytes());
        m.update(b"\0");
        m.update(identity.as_bytes());
        m
    }

    /// The token forms carry for this session and identity.
    pub fn token(&self, session: &str, identity: &str) -> String {
        hex::encode(self.mac(session, identity).finalize().into_bytes())
    }

    /// Whether `token` is this session's and identity's (constant-time).
    pub fn check(&self, session: &str, identity: &str, token: &str) -> bool {
        match hex::decode(token) {
            Ok(raw) => self.mac(session, identity).verify_slice(&raw).is_ok(),
            Err(_) => false,
        }
    }
}

/// A new session id (random, 128 bits).
pub fn new_session() -> String {
    let mut raw = [0u8; 16];
    OsRng.fill_bytes(&mut raw);
    hex::encode(raw)
}

/// The session cookie's value, if the request carries a well-formed one.
pub fn session_of(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == SESSION_COOKIE)
        .map(|(_, v)| v.to_owned())
        .filter(|v| v.len() == 32 && v.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// Whether a state-changing request comes from the portal's own pages: the browser says so
/// (`Origin` equal to `https://` + the request's host; `Sec-Fetch-Site`, when sent, is
/// `same-origin`). A request without `Origin` is refused: every browser this portal supports
/// sends it on POST.
pub fn same_origin(headers: &HeaderMap, host: Option<&str>) -> bool {
    if let Some(site) = headers.get("sec-fetch-site") {
        if site.as_bytes() != b"same-origin" {
            return false;
        }
    }
    let (Some(origin), Some(host)) = (headers.get(header::ORIGIN), host) else {
        return false;
    };
    origin.to_str().ok() == Some(&format!("https://{host}"))
}

/// A decoded form (the last value wins for a repeated field, except through [`Form::all`]).
#[derive(Debug, Default)]
pub struct Form {
    pairs: Vec<(String, String)>,
}

impl Form {
    /// Decodes an `application/x-www-form-urlencoded` body.
    pub fn parse(body: &[u8]) -> Self {
        Self {
            pairs: form_urlencoded::parse(body).into_owned().collect(),
        }
    }

    /// A field's value, trimmed; empty when absent.
    pub fn get(&self, name: &str) -> &str {
        self.pairs
            .iter()
            .rev()
            .find(|(k, _)| k == name)
            .map_or("", |(_, v)| v.trim())
    }

    /// Every value of a field, each trimmed, empty ones dropped.
    pub fn all(&self, name: &str) -> Vec<String> {
        self.pairs
            .iter()
            .filter(|(k, _)| k == name)
            .map(|(_, v)| v.trim().to_owned())
            .filter(|v| !v.is_empty())
            .collect()
    }

    /// A whitespace- or comma-separated list field.
    pub fn list(&self, name: &str) -> Vec<String> {
        self.get(name)
            .split(|c: char| c == ',' || c.is_whitespace())
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect()
    }
}

/// The query string's parameters.
pub fn query(uri: &http::Uri) -> BTreeMap<String, String> {
    uri.query()
        .map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
        .unwrap_or_default()
}

/// A response with every security header the portal sends, and the session cookie when
/// `set_session` names a new one.
pub fn respond(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
    set_session: Option<&str>,
) -> Response<Body> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    // Not `no-referrer`: under it Chromium sends `Origin: null` on the portal's own form
    // posts, which the origin check must refuse. No URL here carries a secret.
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    h.insert(
        header::STRICT_TRANSPORT_SECURITY,
        HeaderValue::from_static("max-age=31536000"),
    );
    h.insert(
        "cross-origin-opener-policy",
        HeaderValue::from_static("same-origin"),
    );
    h.insert(
        "cross-origin-resource-policy",
        HeaderValue::from_static("same-origin"),
    );
    if let Some(session) = set_session {
        let cookie =
            format!("{SESSION_COOKIE}={session}; Path=/; Secure; HttpOnly; SameSite=Strict");
        if let Ok(v) = HeaderValue::from_str(&cookie) {
            h.insert(header::SET_COOKIE, v);
        }
    }
    r
}

/// An HTML page.
pub fn html(status: StatusCode, page: maud::Markup, set_session: Option<&str>) -> Response<Body> {
    respond(
        status,
        "text/html; charset=utf-8",
        page.into_string(),
        set_session,
    )
}

/// A 303 redirect to a path of the portal (after a POST: reloading the next page never
/// repeats the action).
pub fn see_other(path: &str) -> Response<Body> {
    let mut r = respond(StatusCode::SEE_OTHER, "text/plain", "", None);
    if let Ok(v) = HeaderValue::from_str(path) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    r
}

/// A link to a portal path with a query (names are percent-encoded).
pub fn link(path: &str, params: &[(&str, &str)]) -> String {
    let q: String = form_urlencoded::Serializer::new(String::new())
        .extend_pairs(params)
        .finish();
    if q.is_empty() {
        path.to_owned()
    } else {
        format!("{path}?{q}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csrf_tokens_bind_session_and_identity() {
        let c = Csrf::default();
        let t = c.token("s1", "alice");
        assert!(c.check("s1", "alice", &t));
        assert!(!c.check("s2", "alice", &t));
        assert!(!c.check("s1", "bob", &t));
        assert!(!c.check("s1", "alice", "zz"));
        assert!(
            !Csrf::default().check("s1", "alice", &t),
            "another process's key"
        );
    }

    #[test]
    fn origin_must_be_this_host() {
        let mut h = HeaderMap::new();
        assert!(!same_origin(&h, Some("127.0.0.1:8444")), "no Origin");
        h.insert(
            header::ORIGIN,
            HeaderValue::from_static("https://127.0.0.1:8444"),
        );
        assert!(same_origin(&h, Some("127.0.0.1:8444")));
        assert!(!same_origin(&h, Some("127.0.0.1:9999")));
        h.insert("sec-fetch-site", HeaderValue::from_static("cross-site"));
        assert!(!same_origin(&h, Some("127.0.0.1:8444")));
        h.insert(
            header::ORIGIN,
            HeaderValue::from_static("https://evil.example"),
        );
        h.insert("sec-fetch-site", HeaderValue::from_static("same-origin"));
        assert!(!same_origin(&h, Some("127.0.0.1:8444")));
    }

    #[test]
    fn session_cookie_is_parsed_strictly() {
        let mut h = HeaderMap::new();
        let id = new_session();
        h.insert(
            header::COOKIE,
            HeaderValue::from_str(&format!("a=b; {SESSION_COOKIE}={id}")).unwrap(),
        );
        assert_eq!(session_of(&h), Some(id));
        h.insert(
            header::COOKIE,
            HeaderValue::from_str(&format!("{SESSION_COOKIE}=../x")).unwrap(),
        );
        assert_eq!(session_of(&h), None);
    }

    #[test]
    fn every_response_carries_the_security_headers() {
        let r = respond(StatusCode::OK, "text/plain", "x", Some("ab"));
        let h = r.headers();
        assert!(h[header::CONTENT_SECURITY_POLICY]
            .to_str()
            .unwrap()
            .contains("frame-ancestors 'none'"));
        assert!(!h[header::CONTENT_SECURITY_POLICY]
            .to_str()
            .unwrap()
            .contains("unsafe-inline"));
        assert_eq!(h[header::CACHE_CONTROL], "no-store");
        assert!(h[header::SET_COOKIE]
            .to_str()
            .unwrap()
            .contains("SameSite=Strict"));
    }
}
