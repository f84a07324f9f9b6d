//! The Rust SDK (`ward-client`) against the real server: round trip, errors as codes, and
//! refusal of foreign certificates.

use tonic::Code;
use ward::keyformat::ApiKey;
use ward_client::{proto, Client, RetryPolicy};
use ward_tests::{crc32c, foreign_identity, CertFiles, TestServer};

/// Puts `value` under `name` through the SDK, returning the new version.
pub async fn put_value(c: &Client, name: &str, value: &[u8]) -> Result<u64, ward_client::Error> {
    c.put_secret(proto::PutSecretRequest {
        name: name.to_owned(),
        value: value.to_vec(),
        ..Default::default()
    })
    .await
    .map(|r| r.version)
}

fn sdk_code<T: std::fmt::Debug>(r: Result<T, ward_client::Error>, code: Code, what: &str) {
    match r {
        Ok(v) => panic!("{what}: expected {code:?}, got OK {v:?}"),
        Err(e) => assert_eq!(e.code(), code, "{what}: {e}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_roundtrip() {
    let s = TestServer::start();
    let admin = s.client("admin").await;

    assert_eq!(put_value(&admin, "sdk/db", b"one").await.unwrap(), 1);
    let r = admin
        .put_secret(proto::PutSecretRequest {
            name: "sdk/db".into(),
            value: b"two".to_vec(),
            labels: crate::labels(&[("via", "sdk")]),
            ..Default::default()
        })
        .await
        .expect("put v2");
    assert_eq!((r.version, r.checksum), (2, crc32c(b"two")));

    let f = admin
        .fetch_secret("sdk/db", 0)
        .await
        .expect("fetch primary");
    assert_eq!((f.version, f.value.as_slice()), (2, &b"two"[..]));
    assert_eq!(f.state(), proto::VersionState::Primary);
    let z = admin
        .fetch_secret_zeroizing("sdk/db", 1)
        .await
        .expect("fetch v1");
    assert_eq!(z.value.as_slice(), b"one");
    assert_eq!(z.metadata.state(), proto::VersionState::Active);

    let b = admin
        .batch_fetch([("sdk/db", 1u64), ("sdk/none", 0), ("sdk/db", 0)])
        .await
        .expect("batch");
    assert_eq!(b.results.len(), 3);
    use proto::batch_fetch_result::Result as R;
    match (
        &b.results[0].result,
        &b.results[1].result,
        &b.results[2].result,
    ) {
        (Some(R::Secret(a)), Some(R::Error(e)), Some(R::Secret(c))) => {
            assert_eq!(a.value, b"one");
            assert_eq!(e.code, Code::NotFound as i32);
            assert_eq!(c.value, b"two");
        }
        other => panic!("batch results: {other:?}"),
    }

    let m = admin.describe_secret("sdk/db").await.expect("describe");
    assert_eq!(m.primary_version, 2);
    assert_eq!(m.labels.get("via").map(String::as_str), Some("sdk"));

    let k = admin
        .issue_key(proto::IssueKeyRequest {
            name: "sdk/key".into(),
            environment: "prod".into(),
            scopes: vec!["read".into()],
            ..Default::default()
        })
        .await
        .expect("issue");
    assert_eq!(
        ApiKey::parse(&k.api_key).expect("format").environment(),
        "prod"
    );

    let all = admin
        .list_all(proto::ListSecretsRequest {
            page_size: 1,
            ..Default::default()
        })
        .await
        .expect("list_all");
    let names: Vec<&str> = all.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(names, ["sdk/db", "sdk/key"]);

    // Errors carry their gRPC code.
    sdk_code(
        admin.fetch_secret("sdk/none", 0).await,
        Code::NotFound,
        "fetch missing",
    );
    sdk_code(
        admin.fetch_secret("sdk/db", 9).await,
        Code::NotFound,
        "fetch missing version",
    );
    sdk_code(
        admin.fetch_secret("Bad Name", 0).await,
        Code::InvalidArgument,
        "fetch bad name",
    );
    sdk_code(
        put_value(&admin, "sdk/empty", b"").await,
        Code::InvalidArgument,
        "empty value",
    );
    sdk_code(
        put_value(&admin, "sdk/key", b"x").await,
        Code::FailedPrecondition,
        "put on key",
    );

    let app = s.client("app").await;
    assert_eq!(
        app.fetch_secret("sdk/db", 0)
            .await
            .expect("app fetch")
            .value,
        b"two"
    );
    sdk_code(
        put_value(&app, "sdk/db", b"x").await,
        Code::PermissionDenied,
        "app put",
    );
    sdk_code(
        app.issue_key(proto::IssueKeyRequest {
            name: "sdk/app-key".into(),
            ..Default::default()
        })
        .await,
        Code::PermissionDenied,
        "app issue",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_with_foreign_certificate_gets_unavailable() {
    let s = TestServer::start();
    let admin = s.client("admin").await;
    put_value(&admin, "sdk/db", b"v").await.unwrap();

    let foreign = foreign_identity(&s.scratch_dir(), "admin");
    let files = CertFiles {
        ca: s.ca_path(),
        ..foreign
    };
    let cfg = s.client_config(&files).with_retry(RetryPolicy::none());
    match Client::connect(cfg).await {
        Err(e) => assert_eq!(e.code(), Code::Unavailable, "connect: {e}"),
        Ok(c) => {
            let e = c
                .fetch_secret("sdk/db", 0)
                .await
                .expect_err("fetch with a foreign cert");
            assert_eq!(e.code(), Code::Unavailable, "fetch: {e}");
            assert!(matches!(e, ward_client::Error::Transport(_)), "{e:?}");
            let e = put_value(&c, "sdk/foreign", b"x")
                .await
                .expect_err("put with a foreign cert");
            assert_eq!(e.code(), Code::Unavailable, "put: {e}");
        }
    }
    sdk_code(
        admin.describe_secret("sdk/foreign").await,
        Code::NotFound,
        "foreign put stored",
    );
    // Refused for the reason the SDK cannot see: the certificate's issuer is unknown.
    s.wait_for_stderr(
        "TLS handshake refused",
        1,
        std::time::Duration::from_secs(15),
    );
    let refusals = s.stderr_tail(usize::MAX);
    let refusals: Vec<&str> = refusals
        .lines()
        .filter(|l| l.contains("TLS handshake refused"))
        .collect();
    assert!(
        refusals.iter().all(|l| l.contains("UnknownIssuer")),
        "{refusals:#?}"
    );
}
