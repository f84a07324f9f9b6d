//! The SDK against an in-process mock of the Secrets service, over real mutual TLS with rcgen
//! certificates: the client side end to end, without the real server.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod mock;

use std::time::Duration;

use tonic::Code;

use ward_client::proto::{
    batch_fetch_result, DescribeSecretRequest, IssueKeyRequest, ListSecretsRequest, SecretKind,
    VersionState,
};
use ward_client::{Client, Error, RetryPolicy};

use mock::{fast_retry, put_req, start, Pki};

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
