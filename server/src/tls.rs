//! Transport security and caller identity: a rustls server config (TLS 1.3 only, client
//! certificates required and verified against the configured CA), and the identity taken from
//! the verified certificate — the first URI SAN (e.g. a SPIFFE id), else the subject CN.
//! The configuration is rebuilt from its files on SIGHUP or when they change
//! ([`TlsReloader`]), with optional certificate revocation lists; every open connection is
//! then checked against the new configuration and closed if its certificate no longer
//! verifies (revoked, or its CA removed), so a revocation does not wait for clients to
//! reconnect.
//!
//! URI SANs and CNs share one namespace of identities (policy globs match either). To keep a
//! CN from posing as a URI identity, a URI SAN must carry a scheme (`spiffe:`, `https:` …) and
//! a CN must not look like a URI (no `scheme:` prefix, no `://`); neither may hold a control
//! character. A connection whose certificate breaks these rules completes its handshake (the
//! certificate itself is valid) but every call on it is answered UNAUTHENTICATED, saying why.

use crate::clock::{Clock, Millis};
use crate::config::TlsConfig;
use crate::identity::Peer;
use futures::task::AtomicWaker;
use rustls::server::danger::ClientCertVerifier;
use rustls::server::WebPkiClientVerifier;
use rustls::time_provider::TimeProvider;
use rustls::{RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer, UnixTime};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tonic::transport::server::Connected;
use x509_parser::extensions::GeneralName;

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

/// A configuration and the client-certificate verifier inside it (kept to re-check the
/// certificates of open connections after a reload).
struct Built {
    config: Arc<ServerConfig>,
    /// The same, offering HTTP/1.1 too (the portal).
    web: Arc<ServerConfig>,
    verifier: Arc<dyn ClientCertVerifier>,
}

/// Builds the server's TLS configuration from the files: TLS 1.3 only, client certificates
/// required and verified against the CA bundle (validity period, clientAuth EKU, chain) and,
/// if any CRL is configured, refused when revoked or when their issuer has no CRL. Validity is
/// judged by `clock`.
fn build(files: &TlsFiles, clock: &Arc<dyn Clock>) -> Result<Built, String> {
    // The one crypto provider, passed explicitly (rustls is built without defaults, and
    // nothing is installed process-wide).
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
    let crls = load_crls(&files.crl, clock.now_ms())?;
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .with_crls(crls)
        .build()
        .map_err(|e| format!("client certificate verifier: {e}"))?;
    let time: Arc<dyn TimeProvider> = Arc::new(ClockTime(clock.clone()));
    let mut config = ServerConfig::builder_with_details(provider, time)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| format!("TLS versions: {e}"))?
        .with_client_cert_verifier(verifier.clone())
        .with_single_cert(certs, key)
        .map_err(|e| format!("server certificate and key: {e}"))?;
    // gRPC needs HTTP/2; the portal's browsers (and Playwright's certificate proxy) may speak
    // HTTP/1.1 as well. Same certificates, verifier and CRLs either way.
    let mut web = config.clone();
    web.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Built {
        config: Arc::new(config),
        web: Arc::new(web),
        verifier,
    })
}

/// Reads every CRL (PEM, or a single DER CRL), warning about any past its nextUpdate: rustls
/// still applies such a list (refusing an operator's whole fleet because a CRL was not
/// refreshed in time would be an outage), but it is a sign the CRL feed is broken.
fn load_crls(
    paths: &[PathBuf],
    now_ms: Millis,
) -> Result<Vec<CertificateRevocationListDer<'static>>, String> {
    let now = now_ms / 1000;
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
/// handshakes use the newest good configuration; after a good reload every open connection's
/// client certificate is verified again under it, and the connections it no longer accepts
/// are closed. A reload that fails (unreadable file, key not matching the certificate, key
/// readable by others, bad CRL) keeps the previous configuration and logs why.
pub struct TlsReloader {
    files: TlsFiles,
    current: RwLock<Current>,
    /// Fingerprint of the files as last loaded or attempted, so a bad edit is reported once.
    seen: Mutex<Option<[u8; 32]>>,
    /// Connections open now, to re-check after a reload.
    live: Arc<LiveSet>,
    /// Judges certificate validity (the server's clock).
    clock: Arc<dyn Clock>,
}

/// The configuration in force and its generation (bumped by every good reload).
#[derive(Clone)]
struct Current {
    built: Arc<Built>,
    generation: u64,
}

/// The application protocols a listener offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Alpn {
    /// HTTP/2 only (gRPC).
    Grpc,
    /// HTTP/2 and HTTP/1.1 (the portal).
    Web,
}

/// An acceptor over one configuration, remembering which, so a handshake that finishes after
/// a reload is re-checked under the newer one.
pub struct Acceptor {
    acceptor: tokio_rustls::TlsAcceptor,
    generation: u64,
}

impl TlsReloader {
    /// Builds the first configuration; an error here stops start-up.
    pub fn load(files: TlsFiles, clock: Arc<dyn Clock>) -> Result<Arc<Self>, String> {
        let seen = files.fingerprint().ok();
        let built = build(&files, &clock)?;
        Ok(Arc::new(Self {
            files,
            current: RwLock::new(Current {
                built: Arc::new(built),
                generation: 0,
            }),
            seen: Mutex::new(seen),
            live: Arc::default(),
            clock,
        }))
    }

    fn current(&self) -> Current {
        // A poisoned lock only means a writer panicked between two whole-value assignments.
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// An acceptor over the configuration in force now (gRPC: HTTP/2 only).
    pub fn acceptor(&self) -> Acceptor {
        self.acceptor_for(Alpn::Grpc)
    }

    /// An acceptor over the configuration in force now, offering `alpn`.
    pub fn acceptor_for(&self, alpn: Alpn) -> Acceptor {
        let current = self.current();
        let config = match alpn {
            Alpn::Grpc => current.built.config.clone(),
            Alpn::Web => current.built.web.clone(),
        };
        Acceptor {
            acceptor: tokio_rustls::TlsAcceptor::from(config),
            generation: current.generation,
        }
    }

    /// Verifies every open connection's client certificate under the configuration in force
    /// (blocking: signature checks) and closes those it refuses. Returns how many it closed.
    /// Now, by the server's clock, as rustls takes it.
    fn now(&self) -> UnixTime {
        UnixTime::since_unix_epoch(Duration::from_millis(self.clock.now_ms()))
    }

    fn recheck_connections(&self) -> usize {
        let verifier = self.current().built.verifier.clone();
        let conns: Vec<Arc<LiveConn>> = self
            .live
            .conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        let mut closed = 0;
        for conn in conns.iter().filter(|c| !c.standing.is_closed()) {
            if !conn.still_verifies(&*verifier, self.now()) {
                closed += 1;
            }
        }
        closed
    }

    /// Rebuilds from the files now (blocking file reads); `trigger` is logged. Returns whether
    /// the new configuration is in force.
    pub fn reload(&self, trigger: &str) -> bool {
        let fingerprint = self.files.fingerprint().ok();
        *self.seen.lock().unwrap_or_else(|e| e.into_inner()) = fingerprint;
        match build(&self.files, &self.clock) {
            Ok(built) => {
                {
                    let mut current = self.current.write().unwrap_or_else(|e| e.into_inner());
                    let generation = current.generation + 1;
                    *current = Current {
                        built: Arc::new(built),
                        generation,
                    };
                }
                tracing::info!(trigger, "TLS configuration reloaded; new handshakes use it");
                let closed = self.recheck_connections();
                if closed > 0 {
                    tracing::warn!(
                        closed,
                        "closed connections whose client certificate the reloaded TLS \
                         configuration refuses"
                    );
                }
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

/// The identity a verified certificate names: the first URI SAN, else the subject CN; or why
/// it names none Ward accepts (see the module header: the two kinds must not overlap).
pub fn identity_of(cert: &CertificateDer<'_>) -> Result<String, String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|e| format!("client certificate cannot be parsed: {e}"))?;
    if let Ok(Some(san)) = parsed.subject_alternative_name() {
        for name in &san.value.general_names {
            if let GeneralName::URI(uri) = name {
                return check_uri_identity(uri).map(str::to_owned);
            }
        }
    }
    let cn = parsed
        .subject()
        .iter_common_name()
        .next()
        .ok_or("client certificate names no identity (no URI SAN, no subject CN)")?;
    let cn = cn
        .as_str()
        .map_err(|_| "client certificate subject CN is not a text string".to_owned())?;
    check_cn_identity(cn).map(str::to_owned)
}

/// A URI SAN identity: a scheme, then no control character.
fn check_uri_identity(uri: &str) -> Result<&str, String> {
    check_no_control(uri, "URI SAN")?;
    if uri_scheme(uri).is_none() {
        return Err(format!(
            "client certificate URI SAN {uri:?} has no scheme (such as spiffe:); a URI \
             identity must, so it can never equal a CN identity"
        ));
    }
    Ok(uri)
}

/// A CN identity: not empty, no control character, and nothing that looks like a URI (which
/// could pose as a URI SAN identity, e.g. a SPIFFE id, in policy). The portal holds a user
/// named by a trusted SSO proxy's header to the same rule.
pub fn check_cn_identity(cn: &str) -> Result<&str, String> {
    check_no_control(cn, "subject CN")?;
    if cn.is_empty() {
        return Err("client certificate subject CN is empty".into());
    }
    if cn.contains("://") || uri_scheme(cn).is_some() {
        return Err(format!(
            "client certificate subject CN {cn:?} looks like a URI; URI identities (such as \
             SPIFFE ids) are taken only from a URI SAN: put it in the certificate's \
             subjectAltName"
        ));
    }
    Ok(cn)
}

fn check_no_control(text: &str, what: &str) -> Result<(), String> {
    match text.chars().find(|c| c.is_control()) {
        Some(c) => Err(format!(
            "client certificate {what} contains a control character (U+{:04X}); identities \
             may not",
            c as u32
        )),
        None => Ok(()),
    }
}

/// The scheme of `text` if it starts like a URI (RFC 3986: `ALPHA *( ALPHA / DIGIT / "+" /
/// "-" / "." ) ":"`).
fn uri_scheme(text: &str) -> Option<&str> {
    let (scheme, _) = text.split_once(':')?;
    let mut chars = scheme.chars();
    let first = chars.next()?;
    (first.is_ascii_alphabetic()
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.')))
    .then_some(scheme)
}

/// The connections open now, each with its certificate chain, to re-check after a reload.
#[derive(Default)]
struct LiveSet {
    conns: Mutex<HashMap<u64, Arc<LiveConn>>>,
    next_id: AtomicU64,
}

/// One open connection as the reloader sees it.
struct LiveConn {
    chain: Vec<CertificateDer<'static>>,
    identity: Arc<str>,
    addr: SocketAddr,
    standing: Arc<Standing>,
}

impl LiveConn {
    /// Whether `verifier` still accepts this connection's client certificate; if not, closes
    /// the connection (and logs why).
    fn still_verifies(&self, verifier: &dyn ClientCertVerifier, now: UnixTime) -> bool {
        let Some((end_entity, intermediates)) = self.chain.split_first() else {
            return true;
        };
        match verifier.verify_client_cert(end_entity, intermediates, now) {
            Ok(_) => true,
            Err(error) => {
                tracing::warn!(
                    identity = %self.identity,
                    addr = %self.addr,
                    %error,
                    "closing connection: its client certificate no longer verifies"
                );
                self.standing.close();
                false
            }
        }
    }
}

/// Removes a connection from the live set when it ends.
struct Registration {
    id: u64,
    live: Arc<LiveSet>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.live
            .conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.id);
    }
}

/// Whether a connection has been told to close. Reads on a closed connection fail, which
/// makes the HTTP/2 server drop it (its calls end; the client's next call needs a new
/// handshake, which the new configuration decides).
#[derive(Default)]
struct Standing {
    closed: AtomicBool,
    waker: AtomicWaker,
}

impl Standing {
    fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        self.waker.wake();
    }

    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    /// Whether closed; if not, wakes `cx` when it becomes so.
    fn poll_closed(&self, cx: &Context<'_>) -> bool {
        self.waker.register(cx.waker());
        self.is_closed()
    }
}

fn closed_error() -> io::Error {
    io::Error::new(
        io::ErrorKind::ConnectionAborted,
        "connection closed: its client certificate no longer verifies",
    )
}

/// A completed handshake.
pub enum Handshake {
    /// A caller with a usable identity: hand the connection to the gRPC server.
    Ready(TlsConn),
    /// A valid certificate whose identity Ward refuses: answer every call UNAUTHENTICATED.
    Refused(RefusedConn),
}

/// An accepted TLS connection that carries its verified peer into every request.
pub struct TlsConn {
    inner: tokio_rustls::server::TlsStream<TcpStream>,
    peer: Peer,
    standing: Arc<Standing>,
    _registration: Registration,
    /// The listener's connection slot, freed when the connection ends.
    slot: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl TlsConn {
    /// The connection, holding `slot` (of `limits.max_connections`) for its whole life.
    pub fn holding(mut self, slot: tokio::sync::OwnedSemaphorePermit) -> Self {
        self.slot = Some(slot);
        self
    }

    /// Completes the handshake and reads the identity; fails if the client presented no
    /// certificate the verifier accepted. The connection is registered with `tls`, which
    /// closes it if a later reload refuses its certificate.
    pub async fn accept(
        tls: &TlsReloader,
        acceptor: &Acceptor,
        tcp: TcpStream,
        addr: SocketAddr,
    ) -> io::Result<Handshake> {
        let _ = tcp.set_nodelay(true);
        let inner = acceptor.acceptor.accept(tcp).await?;
        let chain: Vec<CertificateDer<'static>> = inner
            .get_ref()
            .1
            .peer_certificates()
            .map(|c| c.iter().map(|c| c.clone().into_owned()).collect())
            .unwrap_or_default();
        let Some(end_entity) = chain.first() else {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "client presented no certificate",
            ));
        };
        let identity: Arc<str> = match identity_of(end_entity) {
            Ok(id) => id.into(),
            Err(reason) => {
                tracing::warn!(%addr, %reason, "client identity refused");
                return Ok(Handshake::Refused(RefusedConn {
                    inner,
                    reason: reason.into(),
                }));
            }
        };
        let standing = Arc::new(Standing::default());
        let live = Arc::new(LiveConn {
            chain,
            identity: identity.clone(),
            addr,
            standing: standing.clone(),
        });
        let id = tls.live.next_id.fetch_add(1, Ordering::Relaxed);
        tls.live
            .conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, live.clone());
        let registration = Registration {
            id,
            live: tls.live.clone(),
        };
        // A reload that landed during this handshake did not see this connection: check it
        // under the configuration in force now.
        let current = tls.current();
        if current.generation != acceptor.generation {
            live.still_verifies(&*current.built.verifier, tls.now());
        }
        Ok(Handshake::Ready(Self {
            inner,
            peer: Peer { identity, addr },
            standing,
            _registration: registration,
            slot: None,
        }))
    }
}

/// A connection whose certificate verified but names an identity Ward refuses.
pub struct RefusedConn {
    inner: tokio_rustls::server::TlsStream<TcpStream>,
    reason: Arc<str>,
}

impl RefusedConn {
    /// Answers every call on the connection with UNAUTHENTICATED and the reason, for at most
    /// `limit` (then the connection is dropped).
    pub async fn answer(self, limit: Duration) {
        let reason = self.reason;
        let svc = hyper::service::service_fn(move |_req: http::Request<hyper::body::Incoming>| {
            let status = tonic::Status::unauthenticated(reason.to_string());
            async move {
                Ok::<_, std::convert::Infallible>(
                    status.into_http::<http_body_util::Empty<bytes::Bytes>>(),
                )
            }
        });
        let conn = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .timer(hyper_util::rt::TokioTimer::new())
            .max_concurrent_streams(4)
            .serve_connection(hyper_util::rt::TokioIo::new(self.inner), svc);
        let _ = tokio::time::timeout(limit, conn).await;
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
        if self.standing.poll_closed(cx) {
            return Poll::Ready(Err(closed_error()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.standing.is_closed() {
            return Poll::Ready(Err(closed_error()));
        }
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
        if self.standing.is_closed() {
            return Poll::Ready(Err(closed_error()));
        }
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// The server's clock as rustls reads the time (handshakes and re-checks judge certificate
/// validity by the same clock as everything else).
struct ClockTime(Arc<dyn Clock>);

impl std::fmt::Debug for ClockTime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClockTime")
    }
}

impl TimeProvider for ClockTime {
    fn current_time(&self) -> Option<UnixTime> {
        Some(UnixTime::since_unix_epoch(Duration::from_millis(
            self.0.now_ms(),
        )))
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
        assert_eq!(identity_of(cert.der()).as_deref(), Ok("app"));

        let mut p = rcgen::CertificateParams::new(vec![]).unwrap();
        p.distinguished_name.push(rcgen::DnType::CommonName, "app");
        p.subject_alt_names = vec![rcgen::SanType::URI(
            rcgen::string::Ia5String::try_from("spiffe://ward/app").unwrap(),
        )];
        let cert = p.self_signed(&key).unwrap();
        assert_eq!(identity_of(cert.der()).as_deref(), Ok("spiffe://ward/app"));
    }

    #[test]
    fn uri_and_cn_identities_never_overlap() {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = |cn: &str, uri: Option<&str>| {
            let mut p = rcgen::CertificateParams::new(vec![]).unwrap();
            p.distinguished_name.push(rcgen::DnType::CommonName, cn);
            if let Some(uri) = uri {
                p.subject_alt_names = vec![rcgen::SanType::URI(
                    rcgen::string::Ia5String::try_from(uri).unwrap(),
                )];
            }
            identity_of(p.self_signed(&key).unwrap().der())
        };
        for cn in ["app", "team-a/app", "db.prod.internal", "app-1_x"] {
            assert_eq!(cert(cn, None).as_deref(), Ok(cn));
        }
        for cn in [
            "spiffe://ward/app/x",
            "spiffe:ward",
            "https://app",
            "x://y",
            "a b://c",
            "app\u{7}",
            "app\nadmin",
            "app\u{85}",
            "",
        ] {
            assert!(cert(cn, None).is_err(), "CN {cn:?} accepted");
        }
        let e = cert("spiffe://ward/app/x", None).unwrap_err();
        assert!(
            e.contains("looks like a URI") && e.contains("URI SAN"),
            "{e}"
        );
        let e = cert("app\u{7}x", None).unwrap_err();
        assert!(e.contains("control character"), "{e}");
        // The same text in a URI SAN is the identity, whatever the CN says.
        assert_eq!(
            cert("anything", Some("spiffe://ward/app/x")).as_deref(),
            Ok("spiffe://ward/app/x")
        );
        // A URI SAN without a scheme could equal a CN: refused.
        assert!(cert("admin", Some("admin")).is_err());
        assert!(cert("x", Some("spiffe://ward/\u{1b}[0m")).is_err());
    }
}
