//! Put → fetch through the generated client: versions, states, metadata and batch fetch.

use tonic::Code;
use ward_tests::{crc32c, ok, pb, TestServer};

use crate::{assert_code, describe, fetch, labels, put, put_req};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_fetch_versions_and_states() {
    let s = TestServer::start();
    let mut c = s.raw_client("admin").await;
    let name = "svc/db/password";

    let v1 = b"first value".to_vec();
    let r1 = put(&mut c, name, &v1).await;
    assert_eq!(r1.name, name);
    assert_eq!(r1.version, 1);
    assert_eq!(r1.checksum, crc32c(&v1));
    assert!(r1.create_time.is_some(), "create_time missing");

    // Binary value with NUL and high bytes.
    let v2: Vec<u8> = (0..=255u8).chain([0, 0, 255]).collect();
    let r2 = put(&mut c, name, &v2).await;
    assert_eq!(r2.version, 2);
    assert_eq!(r2.checksum, crc32c(&v2));

    let primary = fetch(&mut c, name, 0).await.expect("fetch primary");
    assert_eq!(primary.name, name);
    assert_eq!(primary.version, 2);
    assert_eq!(primary.state(), pb::VersionState::Primary);
    assert_eq!(primary.value, v2);
    assert_eq!(primary.checksum, crc32c(&v2));
    assert_eq!(primary.kind(), pb::SecretKind::Static);
    assert_eq!(primary.environment, "dev");
    assert!(primary.create_time.is_some());

    let by_number = fetch(&mut c, name, 2).await.expect("fetch v2");
    assert_eq!(by_number.value, v2);
    assert_eq!(by_number.state(), pb::VersionState::Primary);

    // The previous PRIMARY stays fetchable by number during its grace period.
    let old = fetch(&mut c, name, 1).await.expect("fetch v1");
    assert_eq!(old.version, 1);
    assert_eq!(old.value, v1);
    assert_eq!(old.state(), pb::VersionState::Active);
    assert_eq!(old.checksum, crc32c(&v1));

    assert_code(fetch(&mut c, name, 3).await, Code::NotFound, "version 3");
    assert_code(
        fetch(&mut c, name, 999).await,
        Code::NotFound,
        "version 999",
    );
    assert_code(
        fetch(&mut c, "svc/missing", 0).await,
        Code::NotFound,
        "missing secret",
    );
    assert_code(
        fetch(&mut c, "svc/missing", 1).await,
        Code::NotFound,
        "missing secret v1",
    );

    let meta = describe(&mut c, name).await.expect("describe");
    assert_eq!(meta.name, name);
    assert_eq!(meta.kind(), pb::SecretKind::Static);
    assert_eq!(meta.environment, "dev");
    assert_eq!(meta.primary_version, 2);
    assert!(!meta.created_by.is_empty(), "created_by empty");
    assert!(
        meta.created_by.contains("admin"),
        "created_by {:?}",
        meta.created_by
    );
    assert_eq!(meta.owner, meta.created_by, "owner defaults to the caller");
    let states: Vec<(u64, pb::VersionState)> = meta
        .versions
        .iter()
        .map(|v| (v.version, v.state()))
        .collect();
    assert_eq!(
        states,
        vec![
            (1, pb::VersionState::Active),
            (2, pb::VersionState::Primary),
        ]
    );
    // Keyed fingerprints (32 hex characters), one per distinct value.
    assert!(meta.versions.iter().all(|v| v.fingerprint.len() == 32));
    assert_ne!(meta.versions[0].fingerprint, meta.versions[1].fingerprint);
    assert!(meta.create_time.is_some() && meta.update_time.is_some());
    assert_code(
        describe(&mut c, "svc/missing").await,
        Code::NotFound,
        "describe missing",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadata_is_stored_and_updated_as_specified() {
    let s = TestServer::start();
    let mut c = s.raw_client("admin").await;
    let name = "team-x/api/token";

    let mut req = put_req(name, b"one");
    req.environment = "prod".into();
    req.owner = "team-x".into();
    req.labels = labels(&[("tier", "gold"), ("app", "api")]);
    req.description = "the api token".into();
    ok(c.put_secret(req).await, "put with metadata");

    let m = describe(&mut c, name).await.unwrap();
    assert_eq!(m.environment, "prod");
    assert_eq!(m.owner, "team-x");
    assert_eq!(m.labels, labels(&[("tier", "gold"), ("app", "api")]));
    assert_eq!(m.description, "the api token");
    assert!(
        m.created_by.contains("admin"),
        "created_by {:?}",
        m.created_by
    );

    // Empty fields leave everything unchanged; the environment sticks to the secret.
    let r = put(&mut c, name, b"two").await;
    assert_eq!(r.version, 2);
    let m = describe(&mut c, name).await.unwrap();
    assert_eq!(m.environment, "prod");
    assert_eq!(m.owner, "team-x");
    assert_eq!(m.labels, labels(&[("tier", "gold"), ("app", "api")]));
    assert_eq!(m.description, "the api token");
    let f = fetch(&mut c, name, 0).await.unwrap();
    assert_eq!(f.environment, "prod");

    // Non-empty labels and description replace the old ones.
    let mut req = put_req(name, b"three");
    req.labels = labels(&[("tier", "silver")]);
    req.description = "rotated".into();
    ok(c.put_secret(req).await, "put v3");
    let m = describe(&mut c, name).await.unwrap();
    assert_eq!(m.labels, labels(&[("tier", "silver")]));
    assert_eq!(m.description, "rotated");
    assert_eq!(m.primary_version, 3);
    assert_eq!(m.versions.len(), 3);

    // Staging is a configured environment too.
    let mut req = put_req("team-x/staging-only", b"s");
    req.environment = "staging".into();
    ok(c.put_secret(req).await, "put staging");
    assert_eq!(
        fetch(&mut c, "team-x/staging-only", 0)
            .await
            .unwrap()
            .environment,
        "staging"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_fetch_reports_each_item_in_order() {
    let s = TestServer::start();
    let mut admin = s.raw_client("admin").await;
    put(&mut admin, "batch/a", b"a1").await;
    put(&mut admin, "batch/a", b"a2").await;
    put(&mut admin, "batch/b", b"b1").await;

    let items = [
        ("batch/a", 0u64),
        ("batch/missing", 0),
        ("batch/b", 1),
        ("batch/a", 1),
        ("batch/a", 7),
        ("Not A Name", 0),
        ("batch/a", 2),
    ];
    let req = pb::BatchFetchSecretsRequest {
        items: items
            .iter()
            .map(|(n, v)| pb::FetchSecretRequest {
                name: n.to_string(),
                version: *v,
            })
            .collect(),
    };
    for identity in ["admin", "app"] {
        let mut c = s.raw_client(identity).await;
        let resp = ok(c.batch_fetch_secrets(req.clone()).await, "batch fetch");
        assert_eq!(
            resp.results.len(),
            items.len(),
            "{identity}: one result per item"
        );
        for (r, (n, v)) in resp.results.iter().zip(items) {
            assert_eq!(
                (r.name.as_str(), r.requested_version),
                (n, v),
                "{identity}: order"
            );
        }
        let secret = |i: usize| match &resp.results[i].result {
            Some(pb::batch_fetch_result::Result::Secret(s)) => s.clone(),
            other => panic!(
                "{identity}: item {i} {:?}: expected a secret, got {other:?}",
                items[i]
            ),
        };
        let error = |i: usize| match &resp.results[i].result {
            Some(pb::batch_fetch_result::Result::Error(e)) => e.code,
            other => panic!(
                "{identity}: item {i} {:?}: expected an error, got {other:?}",
                items[i]
            ),
        };
        let a0 = secret(0);
        assert_eq!((a0.version, a0.value.as_slice()), (2, &b"a2"[..]));
        assert_eq!(a0.state(), pb::VersionState::Primary);
        assert_eq!(a0.checksum, crc32c(b"a2"));
        assert_eq!(
            error(1),
            Code::NotFound as i32,
            "{identity}: missing secret"
        );
        assert_eq!(secret(2).value, b"b1");
        let a1 = secret(3);
        assert_eq!((a1.version, a1.value.as_slice()), (1, &b"a1"[..]));
        assert_eq!(a1.state(), pb::VersionState::Active);
        assert_eq!(
            error(4),
            Code::NotFound as i32,
            "{identity}: missing version"
        );
        assert_eq!(
            error(5),
            Code::InvalidArgument as i32,
            "{identity}: bad name"
        );
        assert_eq!(secret(6).value, b"a2");
    }

    // Size limits: 100 items is fine, 101 is refused as a whole.
    let many = |n: usize| pb::BatchFetchSecretsRequest {
        items: (0..n)
            .map(|_| pb::FetchSecretRequest {
                name: "batch/b".into(),
                version: 0,
            })
            .collect(),
    };
    let resp = ok(admin.batch_fetch_secrets(many(100)).await, "batch of 100");
    assert_eq!(resp.results.len(), 100);
    assert_code(
        admin.batch_fetch_secrets(many(101)).await,
        Code::InvalidArgument,
        "batch of 101",
    );
}
