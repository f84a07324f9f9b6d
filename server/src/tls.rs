//! Transport security and caller identity: a rustls server config (TLS 1.3 only, client
//! certificates required and verified against the configured CA), and the identity taken from
//! the verified certificate — the first URI SAN (e.g. a SPIFFE id), else the subject CN.
//! The configuration is rebuilt from its files on SIGHUP or when they change
//! ([`TlsReloader`]), with optional certificate revocation lists.

use crate::config::TlsConfig;
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};
use sha2::{Digest, Sha256};
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tonic::transport::server::Connected;
use x509_parser::extensions::GeneralName;

/// Who is calling: taken from the verified client certificate, never from the request.
#[derive(Debug, Clone)]
pub struct Peer {
    /// Identity: first URI SAN, else subject CN.
    pub identity: Arc<str>,
    /// Remote address.
    pub addr: SocketAddr,
}

/// The files a TLS configuration is built from (PEM; CRLs PEM or DER).
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// Server certificate chain.
    pub cert: PathBuf,
    /// Server private key (must be private to the server's user: mode 0600 or 0400).
    pub key: PathBuf,
    /// CA bundle client certificates must chain to.
    pub client_ca: PathBuf,
    /// Revocation lists of the client CAs.
    pub crl: Vec<PathBuf>,
}

impl TlsFiles {
    /// The files named by the `[tls]` table.
    pub fn from_config(tls: &TlsConfig) -> Self {
        Self {
            cert: tls.cert.clone(),
            key: tls.key.clone(),
            client_ca: tls.client_ca.clone(),
            crl: tls.crl.clone(),
        }
    }

    fn all(&self) -> impl Iterator<Item = &Path> {
        [&self.cert, &self.key, &self.client_ca]
            .into_iter()
            .chain(&self.crl)
            .map(PathBuf::as_path)
    }

    /// A digest of every file's contents: what the watcher compares to notice a change (file
    /// times are too coarse and lie after a copy that preserves them).
    fn fingerprint(&self) -> io::Result<[u8; 32]> {
        let mut h = Sha256::new();
        for p in self.all() {
            let bytes = std::fs::read(p)?;
            h.update((bytes.len() as u64).to_be_bytes());
            h.update(&bytes);
        }
        Ok(h.finalize().into())
    }
}

/// Builds the server's TLS configuration from the files: TLS 1.3 only, client certificates
/// required and verified against the CA bundle (validity period, clientAuth EKU, chain) and,
/// if any CRL is configured, refused when revoked or when their issuer has no CRL.
pub fn server_config(files: &TlsFiles) -> Result<Arc<ServerConfig>, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let (cert, key, client_ca) = (&files.cert, &files.key, &files.client_ca);
    let certs = CertificateDer::pem_file_iter(cert)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("server certificate {}: {e}", cert.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "server certificate {} holds no certificate",
            cert.display()
        ));
    }
    crate::harden::check_private_file(key, "server private key")?;
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| format!("server key {}: {e}", key.display()))?;
    let mut roots = RootCertStore::empty();
    for ca in CertificateDer::pem_file_iter(client_ca)
        .map_err(|e| format!("client CA {}: {e}", client_ca.display()))?
    {
        let ca = ca.map_err(|e| format!("client CA {}: {e}", client_ca.display()))?;
        roots
            .add(ca)
            .map_err(|e| format!("client CA {}: {e}", client_ca.display()))?;
    }
    if roots.is_empty() {
        return Err(format!(
            "client CA {} holds no certificate",
            client_ca.display()
        ));
    }
    let crls = load_crls(&files.crl)?;
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .with_crls(crls)
        .build()
        .map_err(|e| format!("client certificate verifier: {e}"))?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| format!("TLS versions: {e}"))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)
        .map_err(|e| format!("server certificate and key: {e}"))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// Reads every CRL (PEM, or a single DER CRL), warning about any past its nextUpdate: rustls
/// still applies such a list (refusing an operator's whole fleet because a CRL was not
/// refreshed in time would be an outage), but it is a sign the CRL feed is broken.
fn load_crls(paths: &[PathBuf]) -> Result<Vec<CertificateRevocationListDer<'static>>, String> {
    let now = crate::clock::Clock::now_ms(&crate::clock::SystemClock) / 1000;
    let mut out = Vec::new();
    for p in paths {
        let bytes = std::fs::read(p).map_err(|e| format!("CRL {}: {e}", p.display()))?;
        let mut crls = CertificateRevocationListDer::pem_slice_iter(&bytes)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("CRL {}: {e}", p.display()))?;
        if crls.is_empty() && bytes.first() == Some(&0x30) {
            crls.push(CertificateRevocationListDer::from(bytes.clone()));
        }
        if crls.is_empty() {
            return Err(format!("CRL {} holds no revocation list", p.display()));
        }
        for crl in &crls {
            let (_, parsed) = x509_parser::parse_x509_crl(crl.as_ref())
                .map_err(|e| format!("CRL {}: {e}", p.display()))?;
            if let Some(next) = parsed.next_update() {
                if next.timestamp() < now as i64 {
                    tracing::warn!(
                        crl = %p.display(),
                        next_update = %next,
                        "CRL is past its nextUpdate; refresh it"
                    );
                }
            }
        }
        out.extend(crls);
    }
    Ok(out)
}

/// The TLS configuration in force, rebuilt from the files on SIGHUP or when they change. New
/// handshakes use the newest good configuration; established connections keep theirs. A
/// reload that fails (unreadable file, key not matching the certificate, key readable by
/// others, bad CRL) keeps the previous configuration and logs why.
pub struct TlsReloader {
    files: TlsFiles,
    current: RwLock<Arc<ServerConfig>>,
    /// Fingerprint of the files as last loaded or attempted, so a bad edit is reported once.
    seen: Mutex<Option<[u8; 32]>>,
}

impl TlsReloader {
    /// Builds the first configuration; an error here stops start-up.
    pub fn load(files: TlsFiles) -> Result<Arc<Self>, String> {
        let seen = files.fingerprint().ok();
        let config = server_config(&files)?;
        Ok(Arc::new(Self {
            files,
            current: RwLock::new(config),
            seen: Mutex::new(seen),
        }))
    }

    /// An acceptor over the configuration in force now.
    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        // A poisoned lock only means a writer panicked between two whole-Arc assignments.
        let config = self
            .current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        tokio_rustls::TlsAcceptor::from(config)
    }

    /// Rebuilds from the files now (blocking file reads); `trigger` is logged. Returns whether
    /// the new configuration is in force.
    pub fn reload(&self, trigger: &str) -> bool {
        let fingerprint = self.files.fingerprint().ok();
        *self.seen.lock().unwrap_or_else(|e| e.into_inner()) = fingerprint;
        match server_config(&self.files) {
            Ok(config) => {
                *self.current.write().unwrap_or_else(|e| e.into_inner()) = config;
                tracing::info!(trigger, "TLS configuration reloaded; new handshakes use it");
                true
            }
            Err(error) => {
                tracing::error!(
                    trigger,
                    %error,
                    "TLS reload failed; keeping the previous configuration"
                );
                false
            }
        }
    }

    /// Reloads if any file's contents changed since the last attempt. A file that cannot be
    /// read (e.g. mid-replacement) is looked at again on the next poll.
    fn reload_if_changed(&self) {
        let Ok(now) = self.files.fingerprint() else {
            return;
        };
        let changed = *self.seen.lock().unwrap_or_else(|e| e.into_inner()) != Some(now);
        if changed {
            self.reload("file change");
        }
    }

    /// Reloads on SIGHUP and, if `poll` is set, whenever the files change; runs for the
    /// process's life.
    pub fn spawn_watcher(self: &Arc<Self>, poll: Option<Duration>) {
        let me = self.clone();
        tokio::spawn(async move {
            use tokio::signal::unix::{signal, SignalKind};
            let mut hup = match signal(SignalKind::hangup()) {
                Ok(s) => Some(s),
                Err(e) => {
                    tracing::error!(error = %e, "cannot watch SIGHUP; TLS reload on signal is off");
                    None
                }
            };
            let mut tick = poll.map(|p| {
                let mut t = tokio::time::interval(p);
                t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                t
            });
            loop {
                let hangup = async {
                    match hup.as_mut() {
                        Some(h) => h.recv().await,
                        None => std::future::pending().await,
                    }
                };
                let ticked = async {
                    match tick.as_mut() {
                        Some(t) => t.tick().await,
                        None => std::future::pending().await,
                    }
                };
                let on_signal = tokio::select! {
                    _ = hangup => true,
                    _ = ticked => false,
                };
                let me = me.clone();
                let _ = tokio::task::spawn_blocking(move || {
                    if on_signal {
                        me.reload("SIGHUP");
                    } else {
                        me.reload_if_changed();
                    }
                })
                .await;
            }
        });
    }
}

/// The identity a verified certificate names: the first URI SAN, else the subject CN.
pub fn identity_of(cert: &CertificateDer<'_>) -> Option<String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    if let Ok(Some(san)) = parsed.subject_alternative_name() {
        for name in &san.value.general_names {
            if let GeneralName::URI(uri) = name {
                return Some((*uri).to_owned());
            }
        }
    }
    let cn = parsed
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .map(str::to_owned);
    cn
}

/// An accepted TLS connection that carries its verified peer into every request.
pub struct TlsConn {
    inner: tokio_rustls::server::TlsStream<TcpStream>,
    peer: Peer,
}

impl TlsConn {
    /// Completes the handshake and reads the identity; fails if the client presented no
    /// certificate the verifier accepted or the certificate names no identity.
    pub async fn accept(
        acceptor: &tokio_rustls::TlsAcceptor,
        tcp: TcpStream,
        addr: SocketAddr,
    ) -> io::Result<Self> {
        let _ = tcp.set_nodelay(true);
        let inner = acceptor.accept(tcp).await?;
        let identity = inner
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|certs| certs.first())
            .and_then(identity_of)
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::PermissionDenied,
                    "client certificate names no identity (no URI SAN, no CN)",
                )
            })?;
        Ok(Self {
            inner,
            peer: Peer {
                identity: identity.into(),
                addr,
            },
        })
    }
}

impl Connected for TlsConn {
    type ConnectInfo = Peer;
    fn connect_info(&self) -> Peer {
        self.peer.clone()
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_prefers_uri_san_then_cn() {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::new(vec![]).unwrap();
        p.distinguished_name.push(rcgen::DnType::CommonName, "app");
        let cert = p.self_signed(&key).unwrap();
        assert_eq!(identity_of(cert.der()).as_deref(), Some("app"));

        let mut p = rcgen::CertificateParams::new(vec![]).unwrap();
        p.distinguished_name.push(rcgen::DnType::CommonName, "app");
        p.subject_alt_names = vec![rcgen::SanType::URI(
            rcgen::string::Ia5String::try_from("spiffe://ward/app").unwrap(),
        )];
        let cert = p.self_signed(&key).unwrap();
        assert_eq!(
            identity_of(cert.der()).as_deref(),
            Some("spiffe://ward/app")
        );
    }
}
