//! The SDK against an in-process mock of the Secrets service, over real mutual TLS with rcgen
//! certificates: the client side end to end, without the real server.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod mock;

use std::net::SocketAddr;
use std::time::Duration;

use tonic::Code;

use ward_client::proto::{
    batch_fetch_result, DescribeSecretRequest, IssueKeyRequest, ListSecretsRequest, SecretKind,
    VersionState,
};
use ward_client::{Client, Error, RetryPolicy};

use mock::{fast_retry, put_req, start, Mock, Pki};

// ---------------------------------------------------------------------------------------------
// SDK

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_round_trip() {
    let pki = Pki::new();
    let (addr, mock) = start(&pki).await;
    let client = Client::connect(pki.config(addr, "admin")).await.unwrap();

    let put = client
        .put_secret(put_req("app/db", b"s3cret"))
        .await
        .unwrap();
    assert_eq!((put.name.as_str(), put.version), ("app/db", 1));
    assert_eq!(put.checksum, crc32c::crc32c(b"s3cret"));
    client
        .put_secret(put_req("app/db", b"s3cret-2"))
        .await
        .unwrap();

    let got = client.fetch_secret("app/db", 0).await.unwrap();
    assert_eq!((got.version, got.value.as_slice()), (2, &b"s3cret-2"[..]));
    let old = client.fetch_secret_zeroizing("app/db", 1).await.unwrap();
    assert_eq!(old.value.as_slice(), b"s3cret");
    assert!(old.metadata.value.is_empty());
    assert_eq!(old.metadata.state, VersionState::Inactive as i32);

    let batch = client
        .batch_fetch(vec![("app/db", 1), ("missing", 0)])
        .await
        .unwrap();
    assert_eq!(batch.results.len(), 2);
    assert!(matches!(
        &batch.results[0].result,
        Some(batch_fetch_result::Result::Secret(s)) if s.value == b"s3cret"
    ));
    assert!(matches!(
        &batch.results[1].result,
        Some(batch_fetch_result::Result::Error(e)) if e.code == Code::NotFound as i32
    ));

    // A full batch of maximum-size values is larger than tonic's default 4 MiB message limit.
    let big = vec![7u8; 64 * 1024];
    client.put_secret(put_req("app/big", &big)).await.unwrap();
    let batch = client.batch_fetch(vec![("app/big", 0); 100]).await.unwrap();
    assert_eq!(batch.results.len(), 100);

    let meta = client.describe_secret("app/db").await.unwrap();
    assert_eq!(meta.primary_version, 2);
    assert_eq!(meta.versions.len(), 2);

    let key = client
        .issue_key(IssueKeyRequest {
            name: "app/key".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(key.api_key.starts_with("ward_dev_"));

    for i in 0..5 {
        client
            .put_secret(put_req(&format!("list/{i}"), b"v"))
            .await
            .unwrap();
    }
    let page = client
        .list_secrets(ListSecretsRequest {
            page_size: 2,
            name_prefix: "list/".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(page.secrets.len(), 2);
    assert_eq!(page.next_page_token, "list/1");
    let all = client
        .list_all(ListSecretsRequest {
            page_size: 2,
            name_prefix: "list/".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let names: Vec<_> = all.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(names, ["list/0", "list/1", "list/2", "list/3", "list/4"]);
    assert_eq!(mock.calls("ListSecrets"), 4);

    // raw() reaches the same server with the generated client.
    let raw = client
        .raw()
        .describe_secret(DescribeSecretRequest {
            name: "app/key".into(),
        })
        .await
        .unwrap();
    assert_eq!(raw.into_inner().kind, SecretKind::ApiKey as i32);
    assert!(mock.all_had_client_cert());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_retries_only_what_is_safe() {
    let pki = Pki::new();
    let (addr, mock) = start(&pki).await;
    let cfg = pki.config(addr, "admin").with_retry(fast_retry());
    let client = Client::connect(cfg).await.unwrap();
    client.put_secret(put_req("r/a", b"v")).await.unwrap();

    // A read survives two UNAVAILABLEs within three attempts...
    mock.fail_next(2);
    client.fetch_secret("r/a", 0).await.unwrap();
    assert_eq!(mock.calls("FetchSecret"), 3);
    // ...but not three.
    mock.fail_next(3);
    let err = client.fetch_secret("r/a", 0).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    assert_eq!(mock.calls("FetchSecret"), 6);

    // A write without request_id is sent once.
    mock.fail_next(1);
    let err = client.put_secret(put_req("r/b", b"v")).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    assert_eq!(mock.calls("PutSecret"), 2);

    // With a request_id it is retried, and applied once.
    mock.fail_next(1);
    let mut req = put_req("r/b", b"v");
    req.request_id = "req-1".into();
    let first = client.put_secret(req.clone()).await.unwrap();
    assert_eq!(mock.calls("PutSecret"), 4);
    let again = client.put_secret(req).await.unwrap();
    assert_eq!(first, again);
    assert_eq!(
        client.describe_secret("r/b").await.unwrap().versions.len(),
        1
    );

    // Server verdicts are final.
    let before = mock.calls("FetchSecret");
    let err = client.fetch_secret("nope", 0).await.unwrap_err();
    assert_eq!(
        err,
        Error::Status {
            code: Code::NotFound,
            message: "secret nope not found".into()
        }
    );
    assert_eq!(mock.calls("FetchSecret"), before + 1);
    let err = client.fetch_secret("forbidden/x", 0).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    let mut cas = put_req("r/a", b"w");
    cas.expected_version = Some(7);
    let err = client.put_secret(cas).await.unwrap_err();
    assert_eq!(err.code(), Code::Aborted);

    // A slow read times out per attempt and is retried: three attempts of 200 ms.
    let quick = Client::connect(
        pki.config(addr, "admin")
            .with_retry(fast_retry())
            .with_timeout(Duration::from_millis(200)),
    )
    .await
    .unwrap();
    let before = mock.calls("FetchSecret");
    let started = std::time::Instant::now();
    let err = quick.fetch_secret("slow/x", 0).await.unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err}");
    assert_eq!(mock.calls("FetchSecret"), before + 3);
    assert!(started.elapsed() < Duration::from_secs(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_rejects_corrupt_values() {
    let pki = Pki::new();
    let (addr, _mock) = start(&pki).await;
    let client = Client::connect(pki.config(addr, "admin")).await.unwrap();
    client.put_secret(put_req("corrupt/a", b"v")).await.unwrap();
    client.put_secret(put_req("fine", b"v")).await.unwrap();

    let err = client.fetch_secret("corrupt/a", 0).await.unwrap_err();
    assert_eq!(err.code(), Code::DataLoss);
    let batch = client
        .batch_fetch([("corrupt/a", 0), ("fine", 0)])
        .await
        .unwrap();
    assert!(matches!(
        &batch.results[0].result,
        Some(batch_fetch_result::Result::Error(e)) if e.code == Code::DataLoss as i32
    ));
    assert!(matches!(
        &batch.results[1].result,
        Some(batch_fetch_result::Result::Secret(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_tls_checks() {
    let pki = Pki::new();
    let (addr, _mock) = start(&pki).await;

    // The server name override is what gets verified: right name connects, wrong one fails.
    let ok = pki.config(addr, "admin").with_server_name("localhost");
    Client::connect(ok).await.unwrap();
    let wrong = pki
        .config(addr, "admin")
        .with_server_name("elsewhere.test")
        .with_retry(RetryPolicy::none());
    let err = Client::connect(wrong).await.unwrap_err();
    assert!(matches!(err, Error::Transport(_)), "{err:?}");
    assert_eq!(err.code(), Code::Unavailable);

    // A client certificate from another CA is refused by the server.
    let stranger = pki.config(addr, "stranger").with_retry(RetryPolicy::none());
    let result = match Client::connect(stranger).await {
        Ok(c) => c.fetch_secret("x", 0).await.map(drop),
        Err(e) => Err(e),
    };
    let err = result.unwrap_err();
    assert!(matches!(err, Error::Transport(_)), "{err:?}");

    // Nothing listening: a transport error naming the address.
    let dead = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead_addr = dead.local_addr().unwrap();
    drop(dead);
    let cfg = pki
        .config(dead_addr, "admin")
        .with_retry(RetryPolicy::none());
    let err = Client::connect(cfg).await.unwrap_err();
    assert!(matches!(err, Error::Transport(_)), "{err:?}");
    assert!(err.to_string().contains(&dead_addr.to_string()), "{err}");
}

// ---------------------------------------------------------------------------------------------
// Failover between endpoints

/// A client over both mocks (first `a`), with fast retries and the given failover backoff.
async fn pair_client(pki: &Pki, a: SocketAddr, b: SocketAddr, backoff: Duration) -> Client {
    let cfg = pki
        .config_for(&format!("{a},{b}"), "admin")
        .with_retry(fast_retry())
        .with_failover_backoff(backoff, backoff);
    assert_eq!(cfg.endpoints().len(), 2);
    Client::connect(cfg).await.unwrap()
}

/// Two mocks with the same CA, each holding `name` (each mock is its own store).
async fn two_mocks(pki: &Pki, name: &str) -> ((SocketAddr, Mock), (SocketAddr, Mock)) {
    let pair = (start(pki).await, start(pki).await);
    for addr in [pair.0 .0, pair.1 .0] {
        let single = Client::connect(pki.config(addr, "admin")).await.unwrap();
        single.put_secret(put_req(name, b"v")).await.unwrap();
    }
    pair
}

fn healthy(c: &Client) -> Vec<bool> {
    c.endpoints().iter().map(|e| e.healthy).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_fails_over_only_what_is_safe_to_repeat() {
    let pki = Pki::new();
    let ((a, ma), (b, mb)) = two_mocks(&pki, "f/db").await;
    let hour = Duration::from_secs(3600);

    // A read whose endpoint fails is answered by the other, with no error, and the failed
    // endpoint is tried last from then on.
    let reader = pair_client(&pki, a, b, hour).await;
    reader.fetch_secret("f/db", 0).await.unwrap();
    assert_eq!((ma.calls("FetchSecret"), mb.calls("FetchSecret")), (1, 0));
    ma.fail_next(1);
    reader.fetch_secret("f/db", 0).await.unwrap();
    assert_eq!((ma.calls("FetchSecret"), mb.calls("FetchSecret")), (2, 1));
    assert_eq!(healthy(&reader), [false, true]);
    assert_eq!(reader.endpoints()[0].consecutive_failures, 1);
    reader.fetch_secret("f/db", 0).await.unwrap();
    assert_eq!((ma.calls("FetchSecret"), mb.calls("FetchSecret")), (2, 2));

    // A write without request_id is sent once: its failure is returned, not resent elsewhere.
    let writer = pair_client(&pki, a, b, hour).await;
    ma.fail_next(1);
    let err = writer
        .put_secret(put_req("f/once", b"v"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err}");
    assert_eq!((ma.calls("PutSecret"), mb.calls("PutSecret")), (2, 1));
    // The next one goes to the healthy endpoint.
    writer.put_secret(put_req("f/once", b"v")).await.unwrap();
    assert_eq!((ma.calls("PutSecret"), mb.calls("PutSecret")), (2, 2));

    // With a request_id it is retried on the other endpoint, at once.
    let dedup = pair_client(&pki, a, b, hour).await;
    ma.fail_next(1);
    let mut req = put_req("f/dedup", b"v");
    req.request_id = "failover-1".into();
    let put = dedup.put_secret(req).await.unwrap();
    assert_eq!(put.version, 1);
    assert_eq!((ma.calls("PutSecret"), mb.calls("PutSecret")), (3, 3));
    let on_b = Client::connect(pki.config(b, "admin")).await.unwrap();
    assert_eq!(
        on_b.describe_secret("f/dedup")
            .await
            .unwrap()
            .versions
            .len(),
        1
    );

    // Both failing: the retry budget (3 attempts) is spent across them, then the error shows.
    let both = pair_client(&pki, a, b, hour).await;
    let before = (ma.calls("FetchSecret"), mb.calls("FetchSecret"));
    ma.set_down(true);
    mb.set_down(true);
    let err = both.fetch_secret("f/db", 0).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err}");
    assert_eq!(
        (ma.calls("FetchSecret"), mb.calls("FetchSecret")),
        (before.0 + 2, before.1 + 1)
    );
    assert_eq!(healthy(&both), [false, false]);
    // Any answer makes an endpoint healthy again, even one tried last.
    mb.set_down(false);
    both.fetch_secret("f/db", 0).await.unwrap();
    assert_eq!(healthy(&both), [false, true]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_prefers_a_recovered_endpoint_only_after_it_answers_a_probe() {
    let pki = Pki::new();
    let ((a, ma), (b, mb)) = two_mocks(&pki, "p/db").await;
    let client = pair_client(&pki, a, b, Duration::from_millis(20)).await;
    ma.set_down(true);
    client.fetch_secret("p/db", 0).await.unwrap();
    assert_eq!(healthy(&client), [false, true]);

    // While `a` stays down its probes fail, and every call goes to `b`.
    let a_fetches = ma.calls("FetchSecret");
    let mut b_fetches = mb.calls("FetchSecret");
    for _ in 0..500 {
        if ma.calls("Check") >= 3 {
            break;
        }
        client.fetch_secret("p/db", 0).await.unwrap();
        b_fetches += 1;
        assert_eq!(mb.calls("FetchSecret"), b_fetches);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        ma.calls("Check") >= 3,
        "no probes of the endpoint that is down"
    );
    assert_eq!(ma.calls("FetchSecret"), a_fetches);
    assert!(!client.endpoints()[0].healthy);
    assert!(client.endpoints()[0].consecutive_failures >= 3);

    // Back up: a probe (started by a call, which itself goes to `b`) finds it SERVING, and
    // from then on calls go to `a` again.
    ma.set_down(false);
    for _ in 0..500 {
        if client.endpoints()[0].healthy {
            break;
        }
        client.fetch_secret("p/db", 0).await.unwrap();
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(healthy(&client), [true, true]);
    let before = (ma.calls("FetchSecret"), mb.calls("FetchSecret"));
    client.fetch_secret("p/db", 0).await.unwrap();
    assert_eq!(
        (ma.calls("FetchSecret"), mb.calls("FetchSecret")),
        (before.0 + 1, before.1)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_connects_to_the_first_endpoint_that_answers() {
    let pki = Pki::new();
    let (b, mb) = start(&pki).await;
    let dead = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = dead.local_addr().unwrap();
    drop(dead);

    let cfg = pki
        .config_for(&format!("{a},{b}"), "admin")
        .with_retry(RetryPolicy::none());
    let client = Client::connect(cfg.clone()).await.unwrap();
    assert_eq!(healthy(&client), [false, true]);
    client.put_secret(put_req("c/x", b"v")).await.unwrap();
    assert_eq!(mb.calls("PutSecret"), 1);

    // None answers: one error naming every endpoint.
    let cfg = cfg.with_endpoints([
        a.to_string(),
        a.to_string().replace("127.0.0.1", "localhost"),
    ]);
    let err = Client::connect(cfg.unwrap()).await.unwrap_err();
    assert!(matches!(err, Error::Transport(_)), "{err:?}");
    let text = err.to_string();
    assert!(text.contains("cannot connect to any endpoint"), "{text}");
    assert!(
        text.contains(&format!("https://127.0.0.1:{}", a.port()))
            && text.contains(&format!("https://localhost:{}", a.port())),
        "{text}"
    );
}
