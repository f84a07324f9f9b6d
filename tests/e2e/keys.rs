//! IssueKey: the key format and checksum, uniqueness, storage as an API_KEY secret, and the
//! operations an API_KEY secret refuses.

use tonic::Code;
use ward::keyformat::{ApiKey, KeyFormatError};
use ward_tests::{ok, pb, TestServer};

use crate::{assert_code, describe, fetch, put, put_req};

fn issue_req(name: &str) -> pb::IssueKeyRequest {
    pb::IssueKeyRequest {
        name: name.to_owned(),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issued_keys_match_the_format_and_differ() {
    let s = TestServer::start();
    let mut c = s.raw_client("admin").await;

    let mut req = issue_req("keys/billing");
    req.scopes = vec!["billing:read".into(), "billing:write".into()];
    req.owner = "team-billing".into();
    req.description = "billing service key".into();
    let a = ok(c.issue_key(req).await, "issue keys/billing");
    assert_eq!(a.name, "keys/billing");
    assert_eq!(a.version, 1);
    assert!(a.create_time.is_some());
    let parsed = ApiKey::parse(&a.api_key)
        .unwrap_or_else(|e| panic!("issued key is malformed ({e}): {}", a.api_key.len()));
    assert_eq!(
        parsed.environment(),
        "dev",
        "default environment is in the key"
    );
    assert!(a.api_key.starts_with(&format!("{}_dev_", parsed.issuer())));
    assert_eq!(
        a.api_key.len(),
        parsed.issuer().len() + "_dev_".len() + ward::keyformat::BODY_LEN
    );
    // The key id is a safe-to-log identifier, not a piece of the key.
    assert!(!a.key_id.is_empty(), "key_id empty");
    assert!(
        a.key_id.chars().all(|ch| ch.is_ascii_hexdigit()),
        "key_id {:?} not hex",
        a.key_id
    );
    assert!(!a.api_key.contains(&a.key_id), "key_id is part of the key");

    // A changed character breaks the checksum.
    let mut tampered = a.api_key.clone();
    let i = tampered.len() - ward::keyformat::BODY_LEN + 5;
    let replacement = if &tampered[i..=i] == "A" { "B" } else { "A" };
    tampered.replace_range(i..=i, replacement);
    assert_eq!(ApiKey::parse(&tampered), Err(KeyFormatError::Checksum));

    // Issuing twice gives different keys.
    let b = ok(
        c.issue_key(issue_req("keys/other")).await,
        "issue keys/other",
    );
    ApiKey::parse(&b.api_key).expect("second key well-formed");
    assert_ne!(a.api_key, b.api_key);
    assert_ne!(a.key_id, b.key_id);

    // The environment appears in the key.
    let mut req = issue_req("keys/prod-key");
    req.environment = "prod".into();
    let p = ok(c.issue_key(req).await, "issue prod key");
    assert_eq!(ApiKey::parse(&p.api_key).unwrap().environment(), "prod");

    // Stored as an API_KEY secret; admin may fetch it, Describe shows metadata but no key.
    let f = fetch(&mut c, "keys/billing", 0).await.expect("fetch key");
    assert_eq!(f.kind(), pb::SecretKind::ApiKey);
    assert_eq!(f.value, a.api_key.as_bytes());
    assert_eq!(f.version, 1);
    assert_eq!(f.state(), pb::VersionState::Primary);
    let m = describe(&mut c, "keys/billing")
        .await
        .expect("describe key");
    assert_eq!(m.kind(), pb::SecretKind::ApiKey);
    assert_eq!(
        m.scopes,
        vec!["billing:read".to_string(), "billing:write".into()]
    );
    assert_eq!(m.owner, "team-billing");
    assert_eq!(m.description, "billing service key");
    assert_eq!(m.environment, "dev");
    assert_eq!(m.versions.len(), 1);
    assert_eq!(m.versions[0].key_id, a.key_id);
    let shown = format!("{m:?}");
    assert!(
        !shown.contains(&a.api_key[a.api_key.len() - 38..]),
        "Describe leaks the key"
    );
    assert_eq!(
        describe(&mut c, "keys/prod-key").await.unwrap().environment,
        "prod"
    );

    // And it is listed with its kind.
    let listed = crate::list_pages(&mut c, pb::ListSecretsRequest::default())
        .await
        .unwrap();
    let kinds: Vec<(String, pb::SecretKind)> =
        listed.iter().map(|m| (m.name.clone(), m.kind())).collect();
    assert!(
        kinds.contains(&("keys/billing".into(), pb::SecretKind::ApiKey)),
        "{kinds:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_key_secrets_refuse_reissue_and_put() {
    let s = TestServer::start();
    let mut c = s.raw_client("admin").await;
    let a = ok(c.issue_key(issue_req("keys/svc")).await, "issue");
    put(&mut c, "static/thing", b"v").await;

    assert_code(
        c.issue_key(issue_req("keys/svc")).await,
        Code::AlreadyExists,
        "issue on an existing API key",
    );
    assert_code(
        c.issue_key(issue_req("static/thing")).await,
        Code::AlreadyExists,
        "issue on an existing static secret",
    );
    assert_code(
        c.put_secret(put_req("keys/svc", b"my own value")).await,
        Code::FailedPrecondition,
        "put on an API_KEY secret",
    );

    // Nothing changed.
    let m = describe(&mut c, "keys/svc").await.unwrap();
    assert_eq!((m.primary_version, m.versions.len()), (1, 1));
    assert_eq!(
        fetch(&mut c, "keys/svc", 0).await.unwrap().value,
        a.api_key.as_bytes()
    );
    let m = describe(&mut c, "static/thing").await.unwrap();
    assert_eq!((m.kind(), m.versions.len()), (pb::SecretKind::Static, 1));
}
