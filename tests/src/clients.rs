//! Clients of a running server: mTLS channels, the generated gRPC clients (no retries, no
//! cache, exact status codes), the SDK's configuration and client, and a plain-HTTP GET on the
//! metrics listener.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::Duration;

use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::{pb, CertFiles, TestServer};

/// The generated gRPC client over an mTLS channel: no retries, no cache, exact status codes.
pub type RawClient = pb::secrets_client::SecretsClient<Channel>;
/// The generated `ward.v1.Keys` client over an mTLS channel.
pub type KeysClient = pb::keys_client::KeysClient<Channel>;
/// Envoy's ext_authz client over an mTLS channel.
pub type AuthzClient =
    envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient<Channel>;

/// The generated `ward.v1.Audit` client over an mTLS channel.
pub type AuditClient = pb::audit_client::AuditClient<Channel>;

/// client certificate.
pub async fn connect_channel(
    addr: SocketAddr,
    ca_pem: &[u8],
    identity: Option<(&[u8], &[u8])>,
) -> Result<Channel, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca_pem))
        .domain_name("localhost");
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    Endpoint::from_shared(format!("https://{addr}"))?
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(10))
        .timeout(Duration::from_secs(30))
        .connect()
        .await
}

/// Connects the generated client over mTLS (see [`connect_channel`]).
pub async fn connect_raw(
    addr: SocketAddr,
    ca_pem: &[u8],
    identity: Option<(&[u8], &[u8])>,
) -> Result<RawClient, tonic::transport::Error> {
    let channel = connect_channel(addr, ca_pem, identity).await?;
    Ok(pb::secrets_client::SecretsClient::new(channel))
}

impl TestServer {
    /// The plain-HTTP metrics address the running server reported.
    pub fn metrics_addr(&self) -> SocketAddr {
        self.listener(crate::process::METRICS_PREFIX)
            .expect("the server printed no metrics address")
    }

    /// The portal's HTTPS address the running server reported (dev mode turns it on).
    pub fn portal_addr(&self) -> SocketAddr {
        self.listener(crate::process::PORTAL_PREFIX)
            .expect("the server printed no portal address")
    }

    fn listener(&self, prefix: &str) -> Option<SocketAddr> {
        let p = self.proc.as_ref().expect("no server running");
        p.listeners.lock().unwrap().get(prefix).copied()
    }

    /// `GET path` on the metrics listener: (status code, body).
    pub fn http_get(&self, path: &str) -> (u16, String) {
        use std::net::TcpStream;
        let mut tcp = TcpStream::connect(self.metrics_addr()).expect("connect to metrics");
        tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(
            tcp,
            "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut raw = Vec::new();
        tcp.read_to_end(&mut raw).expect("read metrics response");
        let text = String::from_utf8(raw).expect("metrics response is UTF-8");
        let (head, body) = text.split_once("\r\n\r\n").expect("HTTP response");
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .expect("HTTP status line");
        let chunked = head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked");
        (
            status,
            if chunked {
                dechunk(body)
            } else {
                body.to_owned()
            },
        )
    }

    /// The generated client connected as `identity` (`admin` or `app`).
    pub async fn raw_client(&self, identity: &str) -> RawClient {
        let files = self.identity_files(identity);
        self.raw_client_with(&files)
            .await
            .unwrap_or_else(|e| panic!("connect as {identity} to {}: {e:?}", self.addr))
    }

    /// The generated client connected with the given certificate files.
    pub async fn raw_client_with(
        &self,
        files: &CertFiles,
    ) -> Result<RawClient, tonic::transport::Error> {
        let channel = self.channel_with(files).await?;
        Ok(pb::secrets_client::SecretsClient::new(channel))
    }

    /// The generated `ward.v1.Keys` client connected as `identity`.
    pub async fn keys_client(&self, identity: &str) -> KeysClient {
        pb::keys_client::KeysClient::new(self.channel(identity).await)
    }

    /// Envoy's ext_authz client connected as `identity`.
    pub async fn authz_client(&self, identity: &str) -> AuthzClient {
        AuthzClient::new(self.channel(identity).await)
    }

    /// The generated `ward.v1.Audit` client connected as `identity`.
    pub async fn audit_client(&self, identity: &str) -> AuditClient {
        pb::audit_client::AuditClient::new(self.channel(identity).await)
    }

    /// An mTLS channel as `identity`, for the other services on the port (health, reflection).
    pub async fn channel(&self, identity: &str) -> Channel {
        self.channel_with(&self.identity_files(identity))
            .await
            .unwrap_or_else(|e| panic!("connect as {identity} to {}: {e:?}", self.addr))
    }

    /// An mTLS channel with the given certificate files.
    pub async fn channel_with(
        &self,
        files: &CertFiles,
    ) -> Result<Channel, tonic::transport::Error> {
        let ca = std::fs::read(&files.ca).unwrap();
        let cert = std::fs::read(&files.cert).unwrap();
        let key = std::fs::read(&files.key).unwrap();
        connect_channel(self.addr, &ca, Some((&cert, &key))).await
    }

    /// The SDK's configuration for `identity`'s certificate files.
    pub fn client_config(&self, files: &CertFiles) -> ward_client::ClientConfig {
        ward_client::ClientConfig::from_files(
            self.addr.to_string(),
            &files.ca,
            &files.cert,
            &files.key,
        )
        .unwrap_or_else(|e| panic!("SDK config from {files:?}: {e}"))
    }

    /// The SDK client connected as `identity` (`admin` or `app`).
    pub async fn client(&self, identity: &str) -> ward_client::Client {
        let cfg = self.client_config(&self.identity_files(identity));
        ward_client::Client::connect(cfg)
            .await
            .unwrap_or_else(|e| panic!("SDK connect as {identity} to {}: {e}", self.addr))
    }
}

/// Decodes an HTTP/1.1 chunked body.
fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].trim_start_matches("\r\n");
    }
    out
}
