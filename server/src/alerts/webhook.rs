//! One webhook endpoint: its signing secrets and one signed delivery over HTTP/1.1, following
//! the Standard Webhooks specification (<https://www.standardwebhooks.com/>):
//!
//! ```text
//! webhook-id:        msg_…                 the same on every attempt of one message
//! webhook-timestamp: 1700000000            seconds, of this attempt
//! webhook-signature: v1,<base64 HMAC-SHA256(secret, id "." timestamp "." body)> [v1,… …]
//! ```
//!
//! The secret file holds one `whsec_<base64>` secret per line; each signs, so an endpoint can
//! rotate its secret (verify with either) without a window of failed deliveries. Secrets live
//! in zeroizing memory and are never printed. HTTPS goes through rustls (ring, the one
//! provider) with the endpoint's CA bundle or the system's; plain HTTP only to loopback. Every
//! step of a delivery (connect, TLS, response) is bounded by one timeout.

use crate::config::{WebhookConfig, WebhookUrl};
use base64::Engine;
use bytes::Bytes;
use hmac::{Hmac, Mac};
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use sha2::Sha256;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use zeroize::Zeroizing;

/// The system CA bundle used when an endpoint names none (Debian's).
const SYSTEM_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";
/// Prefix of a Standard Webhooks secret.
const SECRET_PREFIX: &str = "whsec_";
/// Shortest secret accepted, in bytes (the specification asks for 24 to 64).
const MIN_SECRET_BYTES: usize = 24;

/// A signing secret. Not printable.
pub struct Secret(Zeroizing<Vec<u8>>);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(…)")
    }
}

impl Secret {
    /// Parses `whsec_<base64>`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let b64 = text
            .trim()
            .strip_prefix(SECRET_PREFIX)
            .ok_or("a webhook secret starts with whsec_")?;
        let bytes = Zeroizing::new(
            base64::engine::general_purpose::STANDARD
                .decode(b64)
                .map_err(|_| "a webhook secret is whsec_ followed by base64")?,
        );
        if bytes.len() < MIN_SECRET_BYTES {
            return Err(format!(
                "a webhook secret must hold at least {MIN_SECRET_BYTES} bytes"
            ));
        }
        Ok(Self(bytes))
    }

    /// Reads a secret file: one secret per non-empty line.
    pub fn load(path: &Path) -> Result<Vec<Self>, String> {
        let text = Zeroizing::new(
            std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read secret_file {}: {e}", path.display()))?,
        );
        let secrets = text
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(Self::parse)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("secret_file {}: {e}", path.display()))?;
        if secrets.is_empty() {
            return Err(format!("secret_file {} holds no secret", path.display()));
        }
        Ok(secrets)
    }

    fn sign(&self, id: &str, timestamp: u64, body: &str) -> String {
        // HMAC takes a key of any length; the invariant is only that `new_from_slice` accepts
        // every length for HMAC, so this never fails.
        let mut mac = match Hmac::<Sha256>::new_from_slice(&self.0) {
            Ok(m) => m,
            Err(_) => return String::new(),
        };
        mac.update(id.as_bytes());
        mac.update(b".");
        mac.update(timestamp.to_string().as_bytes());
        mac.update(b".");
        mac.update(body.as_bytes());
        format!(
            "v1,{}",
            base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
        )
    }
}

/// The `webhook-signature` header: one `v1,` signature per secret, space-separated.
pub fn signature(secrets: &[Secret], id: &str, timestamp: u64, body: &str) -> String {
    secrets
        .iter()
        .map(|s| s.sign(id, timestamp, body))
        .collect::<Vec<_>>()
        .join(" ")
}

/// How an attempt went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attempt {
    /// The endpoint answered 2xx.
    Delivered(u16),
    /// It answered something else.
    Refused(u16),
    /// It could not be reached, or did not answer in time.
    Failed(String),
}

/// A configured endpoint.
pub struct Endpoint {
    /// The URL as configured (the endpoint's name).
    pub url: String,
    target: WebhookUrl,
    secrets: Vec<Secret>,
    events: Vec<String>,
    tls: Option<Arc<rustls::ClientConfig>>,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("url", &self.url)
            .field("events", &self.events)
            .finish_non_exhaustive()
    }
}

impl Endpoint {
    /// Loads an endpoint's secrets and TLS roots.
    pub fn from_config(w: &WebhookConfig) -> Result<Self, String> {
        let target = WebhookUrl::parse(&w.url)?;
        let secrets = Secret::load(&w.secret_file)?;
        let tls = if target.tls {
            let ca = w.ca_file.clone().unwrap_or_else(|| SYSTEM_CA_BUNDLE.into());
            Some(client_config(&ca)?)
        } else {
            None
        };
        Ok(Self {
            url: w.url.clone(),
            target,
            secrets,
            events: w.events.clone(),
            tls,
        })
    }

    /// Whether this endpoint takes events of type `kind`.
    pub fn wants(&self, kind: &str) -> bool {
        self.events
            .iter()
            .any(|p| crate::config::alerts::pattern_matches(p, kind))
    }

    /// `host:port`, for logs (the path may carry a token; it is not logged).
    pub fn host(&self) -> String {
        format!("{}:{}", self.target.host, self.target.port)
    }

    /// Posts `body` once, signed for `id` at `timestamp` (seconds), within `timeout`.
    pub async fn send(&self, id: &str, body: &str, timestamp: u64, timeout: Duration) -> Attempt {
        let sig = signature(&self.secrets, id, timestamp, body);
        match tokio::time::timeout(timeout, self.post(id, body, timestamp, sig)).await {
            Ok(Ok(status)) if (200..300).contains(&status) => Attempt::Delivered(status),
            Ok(Ok(status)) => Attempt::Refused(status),
            Ok(Err(e)) => Attempt::Failed(e),
            Err(_) => Attempt::Failed(format!("no answer within {timeout:?}")),
        }
    }

    async fn post(&self, id: &str, body: &str, timestamp: u64, sig: String) -> Result<u16, String> {
        let t = &self.target;
        let tcp = TcpStream::connect((t.host.as_str(), t.port))
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let _ = tcp.set_nodelay(true);
        let req = hyper::Request::post(t.path.as_str())
            .header(hyper::header::HOST, t.host.as_str())
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .header(hyper::header::USER_AGENT, "ward-webhooks")
            .header("webhook-id", id)
            .header("webhook-timestamp", timestamp.to_string())
            .header("webhook-signature", sig)
            .body(Full::new(Bytes::from(body.to_owned())))
            .map_err(|e| format!("request: {e}"))?;
        match &self.tls {
            None => request(tcp, req).await,
            Some(cfg) => {
                let name = ServerName::try_from(t.host.clone())
                    .map_err(|_| format!("{:?} is not a valid TLS server name", t.host))?;
                let tls = tokio_rustls::TlsConnector::from(cfg.clone())
                    .connect(name, tcp)
                    .await
                    .map_err(|e| format!("TLS: {e}"))?;
                request(tls, req).await
            }
        }
    }
}

async fn request<S>(io: S, req: hyper::Request<Full<Bytes>>) -> Result<u16, String>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(|e| format!("HTTP: {e}"))?;
    let conn = tokio::spawn(conn);
    let result = sender
        .send_request(req)
        .await
        .map(|r| r.status().as_u16())
        .map_err(|e| format!("HTTP: {e}"));
    conn.abort();
    result
}

fn client_config(ca: &Path) -> Result<Arc<rustls::ClientConfig>, String> {
    let mut roots = rustls::RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(ca)
        .map_err(|e| format!("cannot read CA bundle {}: {e}", ca.display()))?;
    for c in certs {
        let c = c.map_err(|e| format!("CA bundle {}: {e}", ca.display()))?;
        // A bundle may hold certificates rustls cannot use; the others still count.
        let _ = roots.add(c);
    }
    if roots.is_empty() {
        return Err(format!(
            "CA bundle {} holds no usable certificate",
            ca.display()
        ));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signs_as_the_specification_example() {
        // The example of the Standard Webhooks specification's reference libraries.
        let secret = Secret::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let id = "msg_p5jXN8AQM9LWM0D4loKWxJek";
        let ts = 1_614_265_330;
        let body = r#"{"test": 2432232314}"#;
        assert_eq!(
            secret.sign(id, ts, body),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
        let other = Secret::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSwMfKQ9r8GKYqr").unwrap();
        let both = signature(&[secret, other], id, ts, body);
        let parts: Vec<&str> = both.split(' ').collect();
        assert_eq!(parts.len(), 2);
        assert_eq!(parts[0], "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
        assert_ne!(parts[0], parts[1]);
        assert_eq!(
            format!(
                "{:?}",
                Secret::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap()
            ),
            "Secret(…)"
        );
    }

    #[test]
    fn bad_secrets_are_refused() {
        assert!(Secret::parse("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").is_err());
        assert!(Secret::parse("whsec_!!!").is_err());
        assert!(Secret::parse("whsec_c2hvcnQ=").is_err());
    }
}
