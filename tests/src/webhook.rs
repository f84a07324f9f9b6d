//! A real HTTP(S) webhook receiver for the alert tests: it listens on loopback, records every
//! delivery attempt, answers 200 while "up" and 503 while "down", and checks each signature
//! with its own implementation of the Standard Webhooks specification (HMAC-SHA256 written out
//! here over `sha2`, not the server's code): `webhook-signature` holds space-separated
//! `v1,<base64>` entries, one of which must be the HMAC of `id.timestamp.body` under the
//! `whsec_` secret, and the timestamp must be within five minutes of the receiver's clock
//! (plus the test clock's offset).

use base64::Engine;
use sha2::{Digest, Sha256};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Tolerance of the timestamp check, as the specification recommends.
const TOLERANCE_SECS: i64 = 300;

/// One delivery attempt, as received.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// `webhook-id`.
    pub id: String,
    /// `webhook-timestamp`.
    pub timestamp: i64,
    /// The body as received.
    pub raw_body: String,
    /// The body, parsed (Null if it was not JSON).
    pub body: serde_json::Value,
    /// One of the signatures verified, and the timestamp was within tolerance.
    pub signature_ok: bool,
    /// How many `v1,` signatures the header carried.
    pub signatures: usize,
    /// What the receiver answered.
    pub answered: u16,
}

impl Delivery {
    /// The event type (`type` of the body).
    pub fn kind(&self) -> &str {
        self.body["type"].as_str().unwrap_or_default()
    }
}

struct Shared {
    tls: Option<Arc<rustls::ServerConfig>>,
    secrets: Vec<Vec<u8>>,
    up: AtomicBool,
    clock_offset_secs: AtomicI64,
    seen: Mutex<Vec<Delivery>>,
    stop: AtomicBool,
}

/// The receiver; stops listening when dropped.
pub struct WebhookReceiver {
    addr: SocketAddr,
    shared: Arc<Shared>,
    /// The secret file's text (`whsec_…`).
    pub secret_text: String,
    /// With HTTPS: the CA (PEM) the server must trust for it.
    pub ca_pem: Option<String>,
}

impl WebhookReceiver {
    /// Listens on 127.0.0.1 (plain HTTP) with a fresh random secret; up.
    pub fn start() -> Self {
        Self::listen(None)
    }

    /// Listens on 127.0.0.1 over HTTPS, with a certificate for 127.0.0.1 issued by `ca`.
    pub fn start_tls(ca: &crate::TestCa) -> Self {
        use rustls_pki_types::pem::PemObject;
        let (cert, key) = ca.server_cert();
        let certs = rustls_pki_types::CertificateDer::pem_slice_iter(cert.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = rustls_pki_types::PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap();
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
        let mut rx = Self::listen(Some(Arc::new(config)));
        rx.ca_pem = Some(ca.pem.clone());
        rx
    }

    fn listen(tls: Option<Arc<rustls::ServerConfig>>) -> Self {
        let mut secret = [0u8; 32];
        rand::Rng::fill(&mut rand::thread_rng(), &mut secret[..]);
        let secret_text = format!(
            "whsec_{}",
            base64::engine::general_purpose::STANDARD.encode(secret)
        );
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the webhook receiver");
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared {
            tls,
            secrets: vec![secret.to_vec()],
            up: AtomicBool::new(true),
            clock_offset_secs: AtomicI64::new(0),
            seen: Mutex::new(Vec::new()),
            stop: AtomicBool::new(false),
        });
        let s = shared.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if s.stop.load(Ordering::SeqCst) {
                    return;
                }
                if let Ok(conn) = conn {
                    let s = s.clone();
                    std::thread::spawn(move || {
                        let _ = conn.set_read_timeout(Some(Duration::from_secs(10)));
                        match &s.tls {
                            None => serve(conn, &s),
                            Some(cfg) => {
                                let Ok(tls) = rustls::ServerConnection::new(cfg.clone()) else {
                                    return;
                                };
                                serve(rustls::StreamOwned::new(tls, conn), &s)
                            }
                        }
                    });
                }
            }
        });
        Self {
            addr,
            shared,
            secret_text,
            ca_pem: None,
        }
    }

    /// The URL to configure.
    pub fn url(&self) -> String {
        let scheme = if self.shared.tls.is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://{}/hooks/ward", self.addr)
    }

    /// Writes the secret file the server reads.
    pub fn write_secret(&self, path: &Path) {
        std::fs::write(path, format!("{}\n", self.secret_text)).unwrap();
    }

    /// Answer 200 (up) or 503 (down).
    pub fn set_up(&self, up: bool) {
        self.shared.up.store(up, Ordering::SeqCst);
    }

    /// The server's clock runs this far ahead (its test clock).
    pub fn set_clock_offset(&self, d: Duration) {
        self.shared
            .clock_offset_secs
            .store(d.as_secs() as i64, Ordering::SeqCst);
    }

    /// Every attempt so far, in arrival order.
    pub fn attempts(&self) -> Vec<Delivery> {
        self.shared.seen.lock().unwrap().clone()
    }

    /// The attempts answered 200.
    pub fn accepted(&self) -> Vec<Delivery> {
        self.attempts()
            .into_iter()
            .filter(|d| d.answered == 200)
            .collect()
    }

    /// Waits until `done(attempts)` holds (panics after `timeout`, showing what arrived).
    pub fn wait_until(
        &self,
        timeout: Duration,
        done: impl Fn(&[Delivery]) -> bool,
    ) -> Vec<Delivery> {
        let start = Instant::now();
        loop {
            let seen = self.attempts();
            if done(&seen) {
                return seen;
            }
            assert!(
                start.elapsed() < timeout,
                "webhook receiver: condition not met within {timeout:?}; received {:#?}",
                seen.iter()
                    .map(|d| (d.kind().to_owned(), d.id.clone(), d.answered))
                    .collect::<Vec<_>>()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The accepted deliveries of type `kind`.
    pub fn accepted_of(&self, kind: &str) -> Vec<Delivery> {
        self.accepted()
            .into_iter()
            .filter(|d| d.kind() == kind)
            .collect()
    }
}

impl Drop for WebhookReceiver {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr);
    }
}

fn serve(conn: impl Read + Write, s: &Shared) {
    let mut reader = BufReader::new(conn);
    let mut line = String::new();
    if reader.read_line(&mut line).is_err() || !line.starts_with("POST ") {
        return;
    }
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).unwrap_or(0) == 0 {
            return;
        }
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.push((k.trim().to_ascii_lowercase(), v.trim().to_owned()));
        }
    }
    let header = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    };
    let len: usize = header("content-length").parse().unwrap_or(0);
    let mut body = vec![0u8; len];
    if reader.read_exact(&mut body).is_err() {
        return;
    }
    let raw_body = String::from_utf8_lossy(&body).into_owned();
    let id = header("webhook-id");
    let timestamp: i64 = header("webhook-timestamp").parse().unwrap_or(0);
    let sig_header = header("webhook-signature");
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
        + s.clock_offset_secs.load(Ordering::SeqCst);
    let signed = format!("{id}.{timestamp}.{raw_body}");
    let expected: Vec<String> = s
        .secrets
        .iter()
        .map(|k| {
            base64::engine::general_purpose::STANDARD.encode(hmac_sha256(k, signed.as_bytes()))
        })
        .collect();
    let given: Vec<&str> = sig_header
        .split(' ')
        .filter_map(|e| e.strip_prefix("v1,"))
        .collect();
    let signature_ok = (now - timestamp).abs() <= TOLERANCE_SECS
        && given.iter().any(|g| expected.iter().any(|e| e == g));
    let answered = if s.up.load(Ordering::SeqCst) {
        200
    } else {
        503
    };
    s.seen.lock().unwrap().push(Delivery {
        id,
        timestamp,
        body: serde_json::from_str(&raw_body).unwrap_or(serde_json::Value::Null),
        raw_body,
        signature_ok,
        signatures: given.len(),
        answered,
    });
    let reason = if answered == 200 {
        "OK"
    } else {
        "Service Unavailable"
    };
    let conn = reader.get_mut();
    let _ = write!(
        conn,
        "HTTP/1.1 {answered} {reason}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
    );
    let _ = conn.flush();
}

/// HMAC-SHA256 (RFC 2104), written out: H((K ^ opad) || H((K ^ ipad) || m)).
fn hmac_sha256(key: &[u8], msg: &[u8]) -> [u8; 32] {
    let mut k = [0u8; 64];
    if key.len() > 64 {
        k[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        k[..key.len()].copy_from_slice(key);
    }
    let mut inner = Sha256::new();
    inner.update(k.map(|b| b ^ 0x36));
    inner.update(msg);
    let mut outer = Sha256::new();
    outer.update(k.map(|b| b ^ 0x5c));
    outer.update(inner.finalize());
    outer.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hmac_matches_rfc_4231_case_2() {
        let mac = hmac_sha256(b"Jefe", b"what do ya want for nothing?");
        assert_eq!(
            mac.iter().map(|b| format!("{b:02x}")).collect::<String>(),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}
