//! Identity and policy: `app` reads but cannot write; callers without a certificate, with one
//! from a foreign CA, or with an identity the policy does not know are refused.

use std::error::Error as _;

use crate::certs::{assert_probe_refused, tls_probe, Refusal, UNKNOWN_ISSUER};
use tonic::Code;
use ward_tests::{connect_raw, foreign_identity, ok, pb, CertFiles, RawClient, TestServer};

use crate::{assert_code, describe, fetch, put, put_req};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn app_can_fetch_but_not_write() {
    let s = TestServer::start();
    let mut admin = s.raw_client("admin").await;
    put(&mut admin, "shared/db", b"db-pass").await;
    let mut app = s.raw_client("app").await;

    let f = fetch(&mut app, "shared/db", 0).await.expect("app fetch");
    assert_eq!(f.value, b"db-pass");
    let b = ok(
        app.batch_fetch_secrets(pb::BatchFetchSecretsRequest {
            items: vec![pb::FetchSecretRequest {
                name: "shared/db".into(),
                version: 1,
            }],
        })
        .await,
        "app batch fetch",
    );
    assert!(matches!(
        b.results[0].result,
        Some(pb::batch_fetch_result::Result::Secret(_))
    ));
    assert_code(
        fetch(&mut app, "shared/missing", 0).await,
        Code::NotFound,
        "app fetch missing",
    );

    assert_code(
        app.put_secret(put_req("shared/db", b"overwritten")).await,
        Code::PermissionDenied,
        "app put on existing",
    );
    assert_code(
        app.put_secret(put_req("app/new", b"v")).await,
        Code::PermissionDenied,
        "app put new",
    );
    assert_code(
        app.issue_key(pb::IssueKeyRequest {
            name: "app/key".into(),
            ..Default::default()
        })
        .await,
        Code::PermissionDenied,
        "app issue",
    );
    // Describe needs `list`, which app does not have.
    assert_code(
        describe(&mut app, "shared/db").await,
        Code::PermissionDenied,
        "app describe",
    );
    // A caller holding no `list` grant at all is refused outright (PERMISSION_DENIED, audited);
    // one with some grant sees only what it may list (checked in the server's unit tests).
    assert_code(
        app.list_secrets(pb::ListSecretsRequest::default()).await,
        Code::PermissionDenied,
        "app list",
    );

    // Nothing changed.
    let m = describe(&mut admin, "shared/db").await.unwrap();
    assert_eq!(m.versions.len(), 1);
    assert_eq!(
        fetch(&mut admin, "shared/db", 0).await.unwrap().value,
        b"db-pass"
    );
    assert_code(
        describe(&mut admin, "app/new").await,
        Code::NotFound,
        "app/new stored",
    );
    assert_code(
        describe(&mut admin, "app/key").await,
        Code::NotFound,
        "app/key stored",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_unknown_to_the_policy_is_denied() {
    let s = TestServer::start();
    let mut admin = s.raw_client("admin").await;
    put(&mut admin, "shared/db", b"db-pass").await;

    // Certificates the dev CA signed, so TLS accepts them; the policy knows neither identity.
    // The second one's subject CN is `admin`, but its URI SAN comes first: it is not admin.
    for files in [
        s.issue_dev_cert("mallory", None),
        s.issue_dev_cert("admin", Some("spiffe://elsewhere.example/eve")),
    ] {
        let mut c = s
            .raw_client_with(&files)
            .await
            .expect("TLS with a dev-CA cert");
        let who = files.cert.display().to_string();
        assert_code(
            fetch(&mut c, "shared/db", 0).await,
            Code::PermissionDenied,
            &format!("{who} fetch"),
        );
        assert_code(
            c.put_secret(put_req("shared/db", b"x")).await,
            Code::PermissionDenied,
            &format!("{who} put"),
        );
        assert_code(
            c.put_secret(put_req("mallory/new", b"x")).await,
            Code::PermissionDenied,
            &format!("{who} put new"),
        );
        assert_code(
            describe(&mut c, "shared/db").await,
            Code::PermissionDenied,
            &format!("{who} describe"),
        );
        let b = c
            .batch_fetch_secrets(pb::BatchFetchSecretsRequest {
                items: vec![pb::FetchSecretRequest {
                    name: "shared/db".into(),
                    version: 0,
                }],
            })
            .await;
        match b {
            Ok(r) => match &r.get_ref().results[0].result {
                Some(pb::batch_fetch_result::Result::Error(e)) => {
                    assert_eq!(e.code, Code::PermissionDenied as i32, "{who} batch item")
                }
                other => panic!("{who} batch item: expected PERMISSION_DENIED, got {other:?}"),
            },
            Err(st) => assert_eq!(st.code(), Code::PermissionDenied, "{who} batch"),
        }
    }
    assert_eq!(
        describe(&mut admin, "shared/db")
            .await
            .unwrap()
            .versions
            .len(),
        1
    );
    assert_code(
        describe(&mut admin, "mallory/new").await,
        Code::NotFound,
        "mallory/new stored",
    );

    // Without a URI SAN the subject CN is the identity: a new `admin` certificate is admin.
    let files = s.issue_dev_cert("admin", None);
    let mut c = s
        .raw_client_with(&files)
        .await
        .expect("TLS with a dev-CA cert");
    let f = fetch(&mut c, "shared/db", 0).await.expect("CN=admin fetch");
    assert_eq!(f.value, b"db-pass");
}

/// Asserts that a connection attempt and a first call through it fail at the transport level
/// (TLS refused), never with an answer from the service.
async fn assert_transport_refused(conn: Result<RawClient, tonic::transport::Error>, what: &str) {
    let mut c = match conn {
        Err(_) => return, // refused during the handshake
        Ok(c) => c,
    };
    // With TLS 1.3 the client finishes its side of the handshake before the server checks the
    // client certificate, so the refusal shows on the first call.
    match fetch(&mut c, "shared/db", 0).await {
        Ok(_) => panic!("{what}: call succeeded"),
        Err(st) => assert!(
            st.code() == Code::Unavailable || st.source().is_some(),
            "{what}: expected a transport failure, got a service answer {:?}: {}",
            st.code(),
            st.message()
        ),
    }
    match c.put_secret(put_req("refused/write", b"x")).await {
        Ok(_) => panic!("{what}: put succeeded"),
        Err(st) => assert!(
            st.code() == Code::Unavailable || st.source().is_some(),
            "{what}: put: expected a transport failure, got {:?}: {}",
            st.code(),
            st.message()
        ),
    }
}

/// No client certificate at all: TLS 1.3's certificate_required alert.
const NO_CERTIFICATE: Refusal = Refusal {
    log: "no certificates",
    alert: "CertificateRequired",
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_certificate_or_foreign_ca_is_refused() {
    let s = TestServer::start();
    let mut admin = s.raw_client("admin").await;
    put(&mut admin, "shared/db", b"db-pass").await;
    let ca = std::fs::read(s.ca_path()).unwrap();

    // No client certificate at all.
    assert_transport_refused(connect_raw(s.addr(), &ca, None).await, "no client cert").await;
    assert_probe_refused(&s, &s.ca_path(), None, "no client cert", NO_CERTIFICATE).await;

    // A client certificate from a foreign CA, named like the admin.
    let foreign = foreign_identity(&s.scratch_dir(), "admin");
    let presented = CertFiles {
        ca: s.ca_path(),
        ..foreign.clone()
    };
    assert_transport_refused(
        s.raw_client_with(&presented).await,
        "foreign-CA client cert",
    )
    .await;
    assert_probe_refused(
        &s,
        &presented.ca,
        Some((&presented.cert, &presented.key)),
        "foreign-CA client cert",
        UNKNOWN_ISSUER,
    )
    .await;

    // A client that trusts only the foreign CA refuses the server's certificate.
    let admin_files = s.identity_files("admin");
    let trusting_foreign = CertFiles {
        ca: foreign.ca.clone(),
        ..admin_files
    };
    assert_transport_refused(
        s.raw_client_with(&trusting_foreign).await,
        "foreign server trust",
    )
    .await;
    assert_eq!(
        tls_probe(&s, &trusting_foreign).await.1,
        Err("invalid peer certificate: UnknownIssuer".to_owned()),
        "why a client trusting only the foreign CA refuses the server"
    );

    // Nothing was written by the refused callers.
    assert_code(
        describe(&mut admin, "refused/write").await,
        Code::NotFound,
        "refused write stored",
    );
    assert_eq!(
        fetch(&mut admin, "shared/db", 0).await.unwrap().value,
        b"db-pass"
    );
}
