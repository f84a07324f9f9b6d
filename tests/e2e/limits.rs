//! Connection and call limits (`[limits]`): connections open, TLS handshakes in progress,
//! streams per connection, calls in progress per identity, watch streams per identity and
//! versions per secret. Each test lowers one limit, reaches it, checks what the client sees
//! past it, and that the limit frees up again.

use std::future::Future;
use std::time::{Duration, Instant};

use tonic::Code;
use ward_tests::{expect_code, RawClient, TestServer};

use crate::lifecycle::{rotate_req, watch};
use crate::{assert_value, fetch, put};

const WAIT: Duration = Duration::from_secs(15);

/// A server with `key = value` set in `[limits]` for each pair.
fn server_with_limits(limits: &[(&str, &str)]) -> TestServer {
    let mut s = TestServer::start();
    for (k, v) in limits {
        s.set_limit(k, v);
    }
    s.restart();
    s
}

/// Retries `attempt` until it returns true, for up to [`WAIT`].
async fn eventually<F, Fut>(what: &str, mut attempt: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + WAIT;
    while !attempt().await {
        assert!(Instant::now() < deadline, "{what}: not within {WAIT:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Whether a new connection as admin is refused (at connect or on its first call).
async fn admin_connection_refused(s: &TestServer) -> bool {
    match s.raw_client_with(&s.identity_files("admin")).await {
        Err(_) => true,
        Ok(mut c) => fetch(&mut c, "limits/probe", 0).await.is_err_and(|st| {
            matches!(
                st.code(),
                Code::Unavailable | Code::Unknown | Code::Cancelled
            )
        }),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_the_cap_are_closed() {
    let s = server_with_limits(&[("max_connections", "2"), ("max_handshakes", "2")]);
    let mut a = s.raw_client("admin").await;
    put(&mut a, "limits/conn", b"v").await;
    let mut b = s.raw_client("app").await;
    assert_value(&mut b, "limits/conn", 1, b"v").await;

    assert!(
        admin_connection_refused(&s).await,
        "a third connection was served"
    );
    s.wait_for_stderr("limits.max_connections", 1, WAIT);
    // The open connections are untouched.
    assert_value(&mut a, "limits/conn", 1, b"v").await;
    assert_value(&mut b, "limits/conn", 1, b"v").await;

    // Once one closes, a new one gets its slot.
    drop(b);
    eventually("a connection after one closed", || async {
        !admin_connection_refused(&s).await
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshakes_past_the_cap_wait_for_a_slot() {
    let s = server_with_limits(&[("max_handshakes", "1")]);
    // A client that connects and never says hello holds the only handshake slot.
    let idle = tokio::net::TcpStream::connect(s.addr()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let files = s.identity_files("admin");
    let connecting = {
        let (addr, ca, cert, key) = (
            s.addr(),
            std::fs::read(&files.ca).unwrap(),
            std::fs::read(&files.cert).unwrap(),
            std::fs::read(&files.key).unwrap(),
        );
        tokio::spawn(async move {
            let channel = ward_tests::connect_channel(addr, &ca, Some((&cert, &key))).await?;
            Ok::<_, tonic::transport::Error>(RawClient::new(channel))
        })
    };
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        !connecting.is_finished(),
        "a handshake ran while the only slot was held"
    );
    // The slot frees when the idle client goes away; the waiting client is served then.
    drop(idle);
    let mut c = tokio::time::timeout(WAIT, connecting)
        .await
        .expect("the waiting client was not served once the slot freed")
        .unwrap()
        .expect("connect");
    put(&mut c, "limits/hs", b"v").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_per_connection_are_capped() {
    let s = server_with_limits(&[("max_concurrent_streams", "2")]);
    let mut c = s.raw_client("admin").await;
    put(&mut c, "limits/streams", b"v").await;
    let w1 = watch(&mut c.clone(), &["limits/streams"], "", &[]).await;
    let _w2 = watch(&mut c.clone(), &["limits/streams"], "", &[]).await;
    // A third call on the same connection waits for a stream (the client honours the
    // server's SETTINGS_MAX_CONCURRENT_STREAMS).
    let mut third = c.clone();
    let waiting = tokio::spawn(async move { fetch(&mut third, "limits/streams", 1).await });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        !waiting.is_finished(),
        "a third stream ran on a connection capped at two"
    );
    // Another connection is not affected.
    let mut other = s.raw_client("admin").await;
    assert_value(&mut other, "limits/streams", 1, b"v").await;
    drop(w1);
    let got = tokio::time::timeout(WAIT, waiting)
        .await
        .expect("the waiting call did not run once a stream closed")
        .unwrap()
        .expect("fetch");
    assert_eq!(got.value, b"v");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_in_progress_per_identity_are_capped() {
    let s = server_with_limits(&[("max_calls_per_identity", "2")]);
    let mut c = s.raw_client("admin").await;
    put(&mut c, "limits/calls", b"v").await;
    // Open streams are calls in progress, on whichever connection.
    let w1 = watch(&mut c, &["limits/calls"], "", &[]).await;
    let mut other = s.raw_client("admin").await;
    let _w2 = watch(&mut other, &["limits/calls"], "", &[]).await;
    let msg = expect_code(
        fetch(&mut c, "limits/calls", 1).await,
        Code::ResourceExhausted,
        "a third call of admin",
    );
    assert!(msg.contains("max_calls_per_identity"), "{msg}");
    let mut third = s.raw_client("admin").await;
    expect_code(
        fetch(&mut third, "limits/calls", 1).await,
        Code::ResourceExhausted,
        "admin on a third connection",
    );
    // Another identity has its own allowance.
    let mut app = s.raw_client("app").await;
    assert_value(&mut app, "limits/calls", 1, b"v").await;
    // Closing a stream frees its slot.
    drop(w1);
    eventually("a call once a stream closed", || {
        let mut c = c.clone();
        async move { fetch(&mut c, "limits/calls", 1).await.is_ok() }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_streams_per_identity_are_capped() {
    let s = server_with_limits(&[("max_watches_per_identity", "2")]);
    let mut c = s.raw_client("admin").await;
    put(&mut c, "limits/watch", b"v").await;
    let w1 = watch(&mut c, &["limits/watch"], "", &[]).await;
    let _w2 = watch(&mut c, &[], "limits/", &[]).await;
    let msg = expect_code(
        c.watch_secrets(ward_tests::pb::WatchSecretsRequest {
            names: vec!["limits/watch".into()],
            ..Default::default()
        })
        .await,
        Code::ResourceExhausted,
        "a third watch of admin",
    );
    assert!(msg.contains("max_watches_per_identity"), "{msg}");
    // Other calls and other identities are not affected.
    assert_value(&mut c, "limits/watch", 1, b"v").await;
    let mut app = s.raw_client("app").await;
    let _app_watch = watch(&mut app, &["limits/watch"], "", &[]).await;
    drop(w1);
    eventually("a watch once one closed", || {
        let mut c = c.clone();
        async move {
            c.watch_secrets(ward_tests::pb::WatchSecretsRequest {
                names: vec!["limits/watch".into()],
                ..Default::default()
            })
            .await
            .is_ok()
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn versions_per_secret_are_capped() {
    let s = server_with_limits(&[("max_versions_per_secret", "3")]);
    let mut c = s.raw_client("admin").await;
    for v in [b"1", b"2", b"3"] {
        put(&mut c, "limits/versions", v).await;
    }
    let msg = expect_code(
        c.put_secret(crate::put_req("limits/versions", b"4")).await,
        Code::ResourceExhausted,
        "a fourth version by put",
    );
    assert!(msg.contains("max_versions_per_secret"), "{msg}");
    expect_code(
        c.rotate_secret(rotate_req("limits/versions", b"4", None))
            .await,
        Code::ResourceExhausted,
        "a fourth version by rotation",
    );
    assert_value(&mut c, "limits/versions", 0, b"3").await;
    put(&mut c, "limits/other", b"1").await;
}

/// With a small `scan_budget`, a caller whose grants cover few of many secrets gets short (even
/// empty) ListSecrets pages, each with a token to go on, instead of one call that scans the
/// whole tree; paging still yields exactly what it may see. A prefix watch and an audit stream
/// under the same narrow grant go step by step and still deliver all of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scans_under_narrow_grants_go_by_budget() {
    let mut s = TestServer::start();
    s.set_limit("scan_budget", "4");
    let policy = s.data_dir().join("policy.toml");
    let mut text = std::fs::read_to_string(&policy).unwrap();
    text.push_str(
        "\n[[rule]]\nidentities = [\"ops\"]\nverbs = [\"list\", \"read\", \"audit\"]\n\
         secrets = [\"scan/b*\"]\n",
    );
    std::fs::write(&policy, text).unwrap();
    s.restart();
    let mut admin = s.raw_client("admin").await;
    for i in 0..20 {
        put(&mut admin, &format!("scan/a{i:02}"), b"hidden").await;
    }
    put(&mut admin, "scan/b1", b"one").await;
    put(&mut admin, "scan/b2", b"two").await;
    let mut ops = s
        .raw_client_with(&s.issue_dev_cert("ops", None))
        .await
        .unwrap();

    let list = |c: &RawClient, token: String| {
        let mut c = c.clone();
        async move {
            ward_tests::ok(
                c.list_secrets(ward_tests::pb::ListSecretsRequest {
                    name_prefix: "scan/".into(),
                    page_size: 100,
                    page_token: token,
                    ..Default::default()
                })
                .await,
                "list",
            )
        }
    };
    let first = list(&ops, String::new()).await;
    assert!(
        first.secrets.is_empty() && !first.next_page_token.is_empty(),
        "the first page scanned past the budget: {:?}",
        first.secrets.iter().map(|m| &m.name).collect::<Vec<_>>()
    );
    let (mut names, mut pages, mut token) = (Vec::new(), 1, first.next_page_token);
    while !token.is_empty() {
        let page = list(&ops, token).await;
        pages += 1;
        assert!(page.secrets.len() <= 4, "a page beyond the budget");
        names.extend(page.secrets.into_iter().map(|m| m.name));
        token = page.next_page_token;
        assert!(pages < 50, "paging never ended");
    }
    assert_eq!(names, ["scan/b1", "scan/b2"]);
    assert!(pages >= 6, "{pages} pages for 22 records at 4 per call");
    let all = crate::list_pages(
        &mut admin,
        ward_tests::pb::ListSecretsRequest {
            name_prefix: "scan/".into(),
            page_size: 100,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(all.len(), 22, "admin pages through everything");

    // A prefix watch: every visible secret, then SYNCED.
    let mut w = watch(&mut ops, &[], "scan/", &[]).await;
    let events = ward_tests::until_synced(&mut w).await;
    let rotated: Vec<_> = events
        .iter()
        .filter(|e| e.r#type() == ward_tests::pb::WatchEventType::Rotated)
        .map(|e| e.name.as_str())
        .collect();
    assert_eq!(rotated, ["scan/b1", "scan/b2"]);

    // An audit stream: the records this auditor may see, past the many it may not.
    let mut audit = ward_tests::pb::audit_client::AuditClient::new(ops_channel(&s).await);
    let (records, _) = crate::audit::read_stream(
        &mut audit,
        ward_tests::pb::StreamAuditRequest::default(),
        usize::MAX,
    )
    .await;
    let puts: Vec<_> = records
        .iter()
        .filter(|r| r.method == "PutSecret")
        .flat_map(|r| r.targets.iter().map(|t| t.name.as_str()))
        .collect();
    assert_eq!(puts, ["scan/b1", "scan/b2"]);
    assert!(records
        .iter()
        .all(|r| r.targets.iter().all(|t| t.name.starts_with("scan/b"))));
}

async fn ops_channel(s: &TestServer) -> tonic::transport::Channel {
    s.channel_with(&s.issue_dev_cert("ops", None))
        .await
        .unwrap()
}

/// `request_timeout_ms` ends a call that has no response by then with CANCELLED: here a
/// FetchSecret whose request message comes too late (a client that opens calls and sends
/// nothing would otherwise hold a handler, a stream and a per-identity slot for as long as it
/// likes). Prompt calls are unaffected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_without_a_response_in_time_end_cancelled() {
    let s = server_with_limits(&[("request_timeout_ms", "500")]);
    let mut c = s.raw_client("admin").await;
    put(&mut c, "limits/slow", b"v").await;

    let mut grpc = tonic::client::Grpc::new(s.channel("admin").await);
    grpc.ready().await.unwrap();
    let late = futures::stream::once(async {
        tokio::time::sleep(Duration::from_secs(3)).await;
        ward_tests::pb::FetchSecretRequest {
            name: "limits/slow".into(),
            version: 0,
        }
    });
    let started = Instant::now();
    let r = grpc
        .client_streaming::<_, _, ward_tests::pb::FetchSecretResponse, _>(
            tonic::Request::new(late),
            tonic::codegen::http::uri::PathAndQuery::from_static("/ward.v1.Secrets/FetchSecret"),
            tonic_prost::ProstCodec::default(),
        )
        .await;
    let msg = expect_code(r, Code::Cancelled, "a call whose request came too late");
    assert!(msg.contains("Timeout expired"), "{msg}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "the call ran for {:?}",
        started.elapsed()
    );
    assert_value(&mut c, "limits/slow", 1, b"v").await;
}

/// Opens a raw HTTP/2 connection as admin (mutual TLS, ALPN h2), for what the gRPC client will
/// not do on purpose.
async fn raw_h2(
    s: &TestServer,
) -> (
    h2::client::SendRequest<bytes::Bytes>,
    tokio::task::JoinHandle<Result<(), h2::Error>>,
) {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    let files = s.identity_files("admin");
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for ca in CertificateDer::pem_file_iter(&files.ca).unwrap() {
        roots.add(ca.unwrap()).unwrap();
    }
    let chain = CertificateDer::pem_file_iter(&files.cert)
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_file(&files.key).unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = tokio::net::TcpStream::connect(s.addr()).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    let (send, conn) = h2::client::handshake(tls).await.unwrap();
    (send, tokio::spawn(conn))
}

/// Opens `n` FetchSecret streams and resets each at once, all in one burst (HTTP/2 "rapid
/// reset"); returns whether the server then closed the connection.
async fn rapid_resets(s: &TestServer, n: usize) -> bool {
    let (mut send, conn) = raw_h2(s).await;
    for _ in 0..n {
        send = send.ready().await.unwrap();
        let req = http::Request::post(format!("https://{}/ward.v1.Secrets/FetchSecret", s.addr()))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(())
            .unwrap();
        let (_resp, mut stream) = send.send_request(req, false).unwrap();
        stream.send_reset(h2::Reason::CANCEL);
    }
    // A call after the burst: answered on a connection that is still up.
    let closed = match send.ready().await {
        Err(_) => true,
        Ok(mut send) => {
            let req =
                http::Request::post(format!("https://{}/grpc.health.v1.Health/Check", s.addr()))
                    .header("content-type", "application/grpc")
                    .header("te", "trailers")
                    .body(())
                    .unwrap();
            match send.send_request(req, false) {
                Err(_) => true,
                Ok((resp, mut body)) => {
                    let _ = body.send_data(bytes::Bytes::from_static(&[0, 0, 0, 0, 0]), true);
                    tokio::time::timeout(WAIT, resp)
                        .await
                        .expect("no answer")
                        .is_err()
                }
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(2), conn).await;
    closed
}

/// `max_pending_reset_streams` bounds how many streams a client may open and reset before the
/// server accepts them (CVE-2023-44487): past it the server sends GOAWAY and closes the
/// connection; within it the connection lives on.
#[tokio::test(flavor = "current_thread")]
async fn rapid_stream_resets_past_the_limit_close_the_connection() {
    let mut s = TestServer::start();
    assert!(
        !rapid_resets(&s, 10).await,
        "10 resets closed a connection under the default limit (20)"
    );
    s.set_limit("max_pending_reset_streams", "2");
    s.restart();
    assert!(
        rapid_resets(&s, 10).await,
        "10 rapid resets did not close a connection limited to 2"
    );
}
