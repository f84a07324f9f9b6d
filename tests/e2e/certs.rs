//! Certificates: bad client certificates fail the TLS handshake itself; a CRL refuses a revoked
//! client certificate; the server certificate, key, client CA bundle and CRLs reload on SIGHUP
//! and on file change without disturbing established connections whose certificate still
//! verifies, and closing those whose certificate no longer does (revoked, CA removed); a bad
//! reload keeps the previous configuration; a CA is rotated with an overlap, as docs/operating.md
//! describes; connections are bounded in age; and a certificate whose CN looks like a URI, or
//! whose identity holds a control character, names no identity.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tonic::Code;
use ward_tests::{
    expect_code, foreign_identity, replace_file, CertFiles, RawClient, TestCa, TestServer,
};

use crate::{assert_value, fetch, put};

const RELOADED: &str = "TLS configuration reloaded";
const RELOAD_FAILED: &str = "TLS reload failed";
const REFUSED: &str = "TLS handshake refused";
const CLOSING: &str = "closing connection: its client certificate no longer verifies";
const WAIT: Duration = Duration::from_secs(15);

/// Why the server refuses a client certificate: the text its `TLS handshake refused` log line
/// carries (rustls's verifier error), and the TLS alert the client receives.
#[derive(Debug, Clone, Copy)]
pub struct Refusal {
    /// In the server's log line, e.g. `UnknownIssuer`, `Revoked`, `certificate expired`.
    pub log: &'static str,
    /// The alert rustls sends the client, as its `Debug` name, e.g. `UnknownCA`.
    pub alert: &'static str,
}

/// Chains to no CA in the client CA bundle.
pub const UNKNOWN_ISSUER: Refusal = Refusal {
    log: "UnknownIssuer",
    alert: "UnknownCA",
};
/// Revoked by a configured CRL.
pub const REVOKED: Refusal = Refusal {
    log: "Revoked",
    alert: "CertificateRevoked",
};

/// Asserts that connecting with `files` is refused by the server in the TLS handshake for
/// `why`: a gRPC client never gets an answer from the service, a raw TLS client receives
/// `why.alert`, and every `TLS handshake refused` line the attempts caused names `why.log`.
pub async fn assert_refused(s: &TestServer, files: &CertFiles, what: &str, why: Refusal) {
    if let Ok(mut c) = s.raw_client_with(files).await {
        // With TLS 1.3 the client finishes its side of the handshake before the server checks
        // the client certificate, so the refusal shows on the first call.
        match fetch(&mut c, "certs/probe", 0).await {
            Ok(_) => panic!("{what}: call succeeded"),
            Err(st) => assert!(
                matches!(
                    st.code(),
                    Code::Unavailable | Code::Unknown | Code::Cancelled
                ),
                "{what}: expected a transport failure, got a service answer {:?}: {}",
                st.code(),
                st.message()
            ),
        }
    }
    assert_probe_refused(s, &files.ca, Some((&files.cert, &files.key)), what, why).await;
}

/// Asserts that a bare TLS client trusting `ca` and presenting `identity` (cert, key; `None`:
/// no certificate) receives `why.alert`, and that the server's refusal line for that very
/// connection (its client port; the log may colour the field names) names `why.log`.
pub async fn assert_probe_refused(
    s: &TestServer,
    ca: &Path,
    identity: Option<(&Path, &Path)>,
    what: &str,
    why: Refusal,
) {
    // Only lines logged from here on: an earlier connection may have had the same port.
    let from = s.count_in_stderr("");
    let (local, alert) = tls_probe_as(s, ca, identity).await;
    assert_eq!(
        alert,
        Err(format!("received fatal alert: {}", why.alert)),
        "{what}: the alert the client received"
    );
    let mine = format!("{local} ");
    let deadline = std::time::Instant::now() + WAIT;
    let line = loop {
        let found = s
            .stderr_tail(usize::MAX)
            .lines()
            .skip(from)
            .find(|l| l.contains(&mine) && l.contains(REFUSED))
            .map(str::to_owned);
        if let Some(line) = found {
            break line;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{what}: no {REFUSED:?} line for {local} within {WAIT:?}\n{}",
            s.stderr_tail(20)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(
        line.contains(why.log),
        "{what}: the refusal does not say {:?}: {line}",
        why.log
    );
}

/// [`tls_probe_as`] with the CA and client certificate of `files`.
pub async fn tls_probe(
    s: &TestServer,
    files: &CertFiles,
) -> (std::net::SocketAddr, Result<(), String>) {
    tls_probe_as(s, &files.ca, Some((&files.cert, &files.key))).await
}

/// Opens a bare TLS 1.3 connection (ALPN h2) trusting `ca` and presenting `identity` (cert,
/// key; `None`: no certificate), sends the HTTP/2 preface and reads the answer. Returns the connection's local address (the server logs it) and `Ok(())` if the
/// server answers, else the client-side error (a refused client certificate shows as
/// `received fatal alert: …`, a server certificate the client does not trust as `invalid peer
/// certificate: …`).
pub async fn tls_probe_as(
    s: &TestServer,
    ca: &Path,
    identity: Option<(&Path, &Path)>,
) -> (std::net::SocketAddr, Result<(), String>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (local, tls) = tls_connect(s, ca, identity).await;
    let mut tls = match tls {
        Ok(tls) => tls,
        Err(e) => return (local, Err(e)),
    };
    let exchange = async {
        tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
            .await?;
        tls.flush().await?;
        let mut buf = [0u8; 64];
        match tls.read(&mut buf).await? {
            0 => Err(std::io::Error::other("closed without an answer")),
            _ => Ok(()),
        }
    };
    let answer = match tokio::time::timeout(WAIT, exchange).await {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(_) => Err("no answer".into()),
    };
    (local, answer)
}

/// Opens a bare TLS 1.3 connection (ALPN h2) to the server, trusting `ca` and presenting
/// `identity` (cert, key; `None`: no certificate): its local address (the server logs it) and
/// the stream, or the client-side error of the handshake.
pub async fn tls_connect(
    s: &TestServer,
    ca: &Path,
    identity: Option<(&Path, &Path)>,
) -> (
    std::net::SocketAddr,
    Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>, String>,
) {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for ca in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(ca.unwrap()).unwrap();
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots);
    let mut config = match identity {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => {
            let chain = CertificateDer::pem_file_iter(cert)
                .unwrap()
                .collect::<Result<Vec<_>, _>>()
                .unwrap();
            let key = PrivateKeyDer::from_pem_file(key).unwrap();
            builder.with_client_auth_cert(chain, key).unwrap()
        }
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = tokio::net::TcpStream::connect(s.addr()).await.unwrap();
    let local = tcp.local_addr().unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .map_err(|e| e.to_string());
    (local, tls)
}

/// Asserts that a call on a connection the server closed failed at the transport level.
fn assert_transport_failure<T: std::fmt::Debug>(r: Result<T, tonic::Status>, what: &str) {
    match r {
        Ok(v) => panic!("{what}: the call on a closed connection succeeded: {v:?}"),
        Err(st) => assert!(
            matches!(
                st.code(),
                Code::Unavailable | Code::Unknown | Code::Cancelled
            ),
            "{what}: expected a transport failure, got {:?}: {}",
            st.code(),
            st.message()
        ),
    }
}

/// Asserts that `files` connect and get the service's answer; returns the client.
pub async fn assert_accepted(s: &TestServer, files: &CertFiles, what: &str) -> RawClient {
    let mut c = s
        .raw_client_with(files)
        .await
        .unwrap_or_else(|e| panic!("{what}: connect: {e:?}"));
    match fetch(&mut c, "certs/probe", 0).await {
        Ok(_) => {}
        Err(st) => assert_eq!(
            st.code(),
            Code::NotFound,
            "{what}: expected the service's answer, got {:?}: {}",
            st.code(),
            st.message()
        ),
    }
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_client_certificates_fail_the_handshake() {
    let s = TestServer::start();
    let date = rcgen::date_time_ymd;
    let expired = s.issue_dev_cert_with("admin", |p| {
        p.not_before = date(2020, 1, 1);
        p.not_after = date(2021, 1, 1);
    });
    let not_yet = s.issue_dev_cert_with("admin", |p| {
        p.not_before = date(2090, 1, 1);
        p.not_after = date(2091, 1, 1);
    });
    let server_eku = s.issue_dev_cert_with("admin", |p| {
        p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    });
    const EXPIRED: Refusal = Refusal {
        log: "certificate expired",
        alert: "CertificateExpired",
    };
    // rustls's alert for "not currently valid" is certificate_expired too (RFC 8446).
    const NOT_YET_VALID: Refusal = Refusal {
        log: "not valid yet",
        alert: "CertificateExpired",
    };
    const SERVER_EKU: Refusal = Refusal {
        log: "extended key usage",
        alert: "UnsupportedCertificate",
    };
    let foreign = CertFiles {
        ca: s.ca_path(),
        ..foreign_identity(&s.scratch_dir(), "admin")
    };
    assert_refused(&s, &expired, "expired", EXPIRED).await;
    assert_refused(&s, &not_yet, "not yet valid", NOT_YET_VALID).await;
    assert_refused(&s, &server_eku, "serverAuth EKU", SERVER_EKU).await;
    assert_refused(&s, &foreign, "foreign CA", UNKNOWN_ISSUER).await;

    // The same name with a good certificate is admin.
    let good = s.issue_dev_cert_with("admin", |_| {});
    let mut c = assert_accepted(&s, &good, "valid dev-CA certificate").await;
    put(&mut c, "certs/ok", b"fine").await;
}

/// DIR/ward.toml with extra lines at the top of its `[tls]` table.
fn with_tls_lines(s: &TestServer, lines: &str) {
    s.edit_config(|t| {
        assert!(t.contains("[tls]\n"), "no [tls] table in ward.toml");
        t.replacen("[tls]\n", &format!("[tls]\n{lines}\n"), 1)
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_certificate_is_refused_once_the_crl_changes() {
    let mut s = TestServer::start();
    let crl = s.data_dir().join("tls").join("crl.pem");
    replace_file(&crl, s.dev_crl(1, &[]).as_bytes(), 0o644);
    with_tls_lines(&s, "crl = [\"tls/crl.pem\"]\nreload_interval_ms = 100");
    s.restart();

    let good = s.issue_dev_cert_with("admin", |p| p.serial_number = Some(1001u64.into()));
    let doomed = s.issue_dev_cert_with("admin", |p| p.serial_number = Some(1002u64.into()));
    let mut good_conn = assert_accepted(&s, &good, "not revoked").await;
    let mut doomed_conn = assert_accepted(&s, &doomed, "not revoked yet").await;
    put(&mut doomed_conn, "certs/crl", b"before").await;

    // Revoke 1002 by replacing the CRL file: the watcher notices the change, no signal.
    let reloads = s.count_in_stderr(RELOADED);
    replace_file(&crl, s.dev_crl(2, &[1002]).as_bytes(), 0o644);
    s.wait_for_stderr(RELOADED, reloads + 1, WAIT);
    assert_refused(&s, &doomed, "revoked", REVOKED).await;
    assert_accepted(&s, &good, "other certificate after the CRL change").await;
    put(&mut good_conn, "certs/crl", b"good").await;
    // The connection established before the revocation is closed by the reload: its next call
    // fails, and its channel cannot reconnect with the revoked certificate.
    s.wait_for_stderr(CLOSING, 1, WAIT);
    assert_eq!(
        s.count_in_stderr(CLOSING),
        1,
        "only the revoked connection is closed"
    );
    assert_transport_failure(
        fetch(&mut doomed_conn, "certs/crl", 0).await,
        "revoked, open",
    );
    assert_value(&mut good_conn, "certs/crl", 2, b"good").await;

    // A broken CRL is reported and the previous configuration stays in force.
    let failures = s.count_in_stderr(RELOAD_FAILED);
    replace_file(
        &crl,
        b"-----BEGIN X509 CRL-----\nbm90IGEgQ1JM\n-----END X509 CRL-----\n",
        0o644,
    );
    s.wait_for_stderr(RELOAD_FAILED, failures + 1, WAIT);
    assert_refused(&s, &doomed, "revoked, after a bad CRL", REVOKED).await;
    assert_accepted(&s, &good, "good, after a bad CRL").await;

    // At start-up too: the revoked certificate is refused, the other accepted.
    replace_file(&crl, s.dev_crl(3, &[1002]).as_bytes(), 0o644);
    drop((good_conn, doomed_conn));
    s.restart();
    assert_refused(&s, &doomed, "revoked, after restart", REVOKED).await;
    assert_accepted(&s, &good, "good, after restart").await;
}

/// Runs fetches through `conn` until `stop`; counts failures.
fn spawn_load(
    conn: RawClient,
    stop: Arc<AtomicBool>,
    oks: Arc<AtomicU64>,
    failures: Arc<AtomicU64>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut c = conn;
        while !stop.load(Ordering::Relaxed) {
            match fetch(&mut c, "certs/rot", 1).await {
                Ok(f) if f.value == b"established" => oks.fetch_add(1, Ordering::Relaxed),
                other => {
                    eprintln!("fetch on the established connection: {other:?}");
                    failures.fetch_add(1, Ordering::Relaxed)
                }
            };
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ca_rotation_with_overlap_on_sighup_keeps_established_connections() {
    let mut s = TestServer::start();
    let tls = s.data_dir().join("tls");
    let old_ca = std::fs::read_to_string(tls.join("ca.pem")).unwrap();
    // Clients keep trusting tls/ca.pem for the server; the client CA bundle is its own file.
    // Polling off: every reload here is the SIGHUP's doing.
    std::fs::write(tls.join("client-ca.pem"), &old_ca).unwrap();
    s.edit_config(|t| {
        t.replace(
            "client_ca = \"tls/ca.pem\"",
            "client_ca = \"tls/client-ca.pem\"",
        )
    });
    with_tls_lines(&s, "reload_interval_ms = 0");
    s.restart();

    let mut est = s.raw_client("admin").await;
    put(&mut est, "certs/rot", b"established").await;
    let stop = Arc::new(AtomicBool::new(false));
    let (oks, failures) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let load = spawn_load(est.clone(), stop.clone(), oks.clone(), failures.clone());

    let new_ca = TestCa::new("Ward CA 2");
    let scratch = s.scratch_dir();
    let new_ca_file = scratch.join("new-ca.pem");
    std::fs::write(&new_ca_file, &new_ca.pem).unwrap();
    let (cert, key) = new_ca.client_cert("admin");
    let new_admin = s.write_client_files("admin", &cert, &key);
    let old_admin = s.identity_files("admin");
    let hup = |s: &TestServer| {
        let n = s.count_in_stderr(RELOADED);
        s.signal("HUP");
        s.wait_for_stderr(RELOADED, n + 1, WAIT);
    };

    // Before: the new CA's clients are strangers.
    assert_refused(
        &s,
        &new_admin,
        "new-CA client before the overlap",
        UNKNOWN_ISSUER,
    )
    .await;

    // 1. Overlap: the client CA bundle holds both CAs.
    replace_file(
        &tls.join("client-ca.pem"),
        format!("{old_ca}{}", new_ca.pem).as_bytes(),
        0o644,
    );
    hup(&s);
    assert_accepted(&s, &new_admin, "new-CA client during the overlap").await;
    assert_accepted(&s, &old_admin, "old-CA client during the overlap").await;

    // 2. The server's own certificate moves to the new CA.
    let (server_cert, server_key) = new_ca.server_cert();
    replace_file(&tls.join("server.key"), server_key.as_bytes(), 0o600);
    replace_file(&tls.join("server.pem"), server_cert.as_bytes(), 0o644);
    hup(&s);
    let trusting_new = |f: &CertFiles| CertFiles {
        ca: new_ca_file.clone(),
        ..f.clone()
    };
    // A client trusting only the old CA refuses the new server certificate, for that reason.
    assert!(
        s.raw_client_with(&old_admin).await.is_err() || {
            // Some clients report the server-certificate failure on the first call instead.
            let mut c = s.raw_client_with(&old_admin).await.unwrap();
            fetch(&mut c, "certs/probe", 0).await.is_err()
        },
        "a client trusting only the old CA accepted the new server certificate"
    );
    assert_eq!(
        tls_probe(&s, &old_admin).await.1,
        Err("invalid peer certificate: UnknownIssuer".to_owned()),
        "why a client trusting only the old CA refuses the new server certificate"
    );
    assert_accepted(
        &s,
        &trusting_new(&old_admin),
        "old-CA client, new server cert",
    )
    .await;
    assert_accepted(
        &s,
        &trusting_new(&new_admin),
        "new-CA client, new server cert",
    )
    .await;

    // The established connection (an old-CA client, old server certificate) never noticed the
    // overlap or the new server certificate.
    stop.store(true, Ordering::Relaxed);
    load.await.unwrap();
    assert_eq!(
        failures.load(Ordering::Relaxed),
        0,
        "calls on the established connection failed"
    );
    assert!(oks.load(Ordering::Relaxed) > 0, "no load ran");
    assert_value(&mut est, "certs/rot", 1, b"established").await;

    // 3. End of the overlap: only the new CA's clients get in, and the reload closes the
    //    connections of old-CA clients that are still open.
    let mut during = assert_accepted(&s, &trusting_new(&new_admin), "new-CA client, open").await;
    replace_file(&tls.join("client-ca.pem"), new_ca.pem.as_bytes(), 0o644);
    hup(&s);
    s.wait_for_stderr(CLOSING, 1, WAIT);
    assert_transport_failure(fetch(&mut est, "certs/rot", 1).await, "old-CA client, open");
    assert_value(&mut during, "certs/rot", 1, b"established").await;
    assert_refused(
        &s,
        &trusting_new(&old_admin),
        "old-CA client after the overlap",
        UNKNOWN_ISSUER,
    )
    .await;
    assert_accepted(
        &s,
        &trusting_new(&new_admin),
        "new-CA client after the overlap",
    )
    .await;

    // 4. Bad edits are refused and the configuration in force stays: garbage in the bundle,
    //    then a private key that others could read.
    let failed = s.count_in_stderr(RELOAD_FAILED);
    replace_file(&tls.join("client-ca.pem"), b"not a certificate", 0o644);
    s.signal("HUP");
    s.wait_for_stderr(RELOAD_FAILED, failed + 1, WAIT);
    replace_file(&tls.join("client-ca.pem"), new_ca.pem.as_bytes(), 0o644);
    replace_file(&tls.join("server.key"), server_key.as_bytes(), 0o644);
    s.signal("HUP");
    s.wait_for_stderr("accessible to group or others", 1, WAIT);
    assert_accepted(&s, &trusting_new(&new_admin), "after refused reloads").await;
    assert_refused(
        &s,
        &trusting_new(&old_admin),
        "old CA, after refused reloads",
        UNKNOWN_ISSUER,
    )
    .await;

    // A restart refuses the world-readable key outright (exit 2), and serves once it is fixed.
    drop(est);
    s.stop();
    let f = s.serve_expect_failure(&s.config_path(), &[]);
    assert_eq!(f.code, Some(2), "{}", f.stderr);
    assert!(f.stderr.contains("server private key"), "{}", f.stderr);
    replace_file(&tls.join("server.key"), server_key.as_bytes(), 0o600);
    s.restart();
    let mut c = assert_accepted(&s, &trusting_new(&new_admin), "after restart").await;
    assert_value(&mut c, "certs/rot", 1, b"established").await;
}

/// URI SANs and CNs share one namespace of identities, so a CN that looks like a URI (with no
/// URI SAN) must not become one: otherwise anyone who can get a certificate with a chosen CN
/// would hold the grants of a SPIFFE id. Such a certificate, one whose identity holds a control
/// character, and a URI SAN without a scheme are valid TLS but every call on them is
/// UNAUTHENTICATED, saying why, even where the policy grants the text.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uri_looking_cn_and_control_characters_are_not_identities() {
    let mut s = TestServer::start();
    let policy = s.data_dir().join("policy.toml");
    let mut text = std::fs::read_to_string(&policy).unwrap();
    text.push_str(
        "\n[[rule]]\nidentities = [\"spiffe:*\", \"app?x\", \"app*\", \"x\", \"admin*\"]\n\
         verbs = [\"read\"]\nsecrets = [\"*\"]\n",
    );
    std::fs::write(&policy, text).unwrap();
    s.restart();
    let mut admin = s.raw_client("admin").await;
    put(&mut admin, "certs/id", b"granted").await;

    let cases: [(&str, Option<&str>, &str); 6] = [
        ("spiffe://ward/app/x", None, "looks like a URI"),
        ("spiffe:ward", None, "looks like a URI"),
        ("app\u{7}x", None, "control character"),
        ("admin\r\nx", None, "control character"),
        ("x", Some("admin"), "has no scheme"),
        ("x", Some("spiffe://ward/\u{1b}[0m"), "control character"),
    ];
    for (cn, san, why) in cases {
        let what = format!("CN {cn:?}, URI SAN {san:?}");
        let files = s.issue_dev_cert(cn, san);
        let mut c = s
            .raw_client_with(&files)
            .await
            .unwrap_or_else(|e| panic!("{what}: the TLS handshake itself must succeed: {e:?}"));
        let msg = expect_code(
            fetch(&mut c, "certs/id", 0).await,
            Code::Unauthenticated,
            &what,
        );
        assert!(msg.contains(why), "{what}: message {msg:?} lacks {why:?}");
        // Every service on the connection, not only the vault's.
        let mut health = tonic_health::pb::health_client::HealthClient::new(
            s.channel_with(&files).await.unwrap(),
        );
        let r = health
            .check(tonic_health::pb::HealthCheckRequest::default())
            .await;
        expect_code(r, Code::Unauthenticated, &format!("{what}: health"));
    }
    assert!(s.count_in_stderr("client identity refused") >= 6);

    // The same URI in a URI SAN is the identity, whatever the CN says.
    let files = s.issue_dev_cert("spiffe://ward/app/x", Some("spiffe://ward/app/x"));
    let mut c = s.raw_client_with(&files).await.unwrap();
    assert_value(&mut c, "certs/id", 1, b"granted").await;
}

/// `[tls] max_connection_age` ends every connection after that long (GOAWAY, then a forced
/// close after `max_connection_age_grace`): an open watch stream ends and the client must
/// reconnect, presenting its certificate again; new calls on the channel reconnect by
/// themselves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_are_closed_at_their_maximum_age() {
    let mut s = TestServer::start();
    with_tls_lines(
        &s,
        "max_connection_age = \"2s\"\nmax_connection_age_grace = \"500ms\"",
    );
    s.restart();
    let mut c = s.raw_client("admin").await;
    put(&mut c, "certs/age", b"v").await;
    let opened = std::time::Instant::now();
    let mut watch = crate::lifecycle::watch(&mut c, &["certs/age"], "", &[]).await;
    ward_tests::until_synced(&mut watch).await;
    let ended = tokio::time::timeout(Duration::from_secs(20), watch.message()).await;
    match ended {
        Err(_) => panic!("the watch stream outlived max_connection_age by 18 s"),
        Ok(Ok(Some(e))) => panic!("unexpected watch event {e:?}"),
        Ok(_) => {}
    }
    let age = opened.elapsed();
    assert!(
        age >= Duration::from_millis(1500),
        "the stream ended after {age:?}, before the connection's age"
    );
    // The channel reconnects for the next call. A call racing the connection's close may be
    // cancelled (tonic then reconnects); the SDK retries that, so the test does too, briefly.
    for attempt in 1.. {
        match fetch(&mut c, "certs/age", 1).await {
            Ok(f) => {
                assert_eq!(f.value, b"v");
                break;
            }
            Err(e) if attempt < 5 && matches!(e.code(), Code::Cancelled | Code::Unavailable) => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("fetch after the connection's age, attempt {attempt}: {e:?}"),
        }
    }
}
