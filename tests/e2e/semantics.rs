//! Compare-and-set (`expected_version`) and idempotent retries (`request_id`).

use tonic::Code;
use ward_tests::{ok, pb, TestServer};

use crate::{assert_code, assert_value, describe, put, put_req};

fn cas(name: &str, value: &[u8], expected: u64) -> pb::PutSecretRequest {
    pb::PutSecretRequest {
        expected_version: Some(expected),
        ..put_req(name, value)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compare_and_set() {
    let s = TestServer::start();
    let mut c = s.raw_client("admin").await;
    let name = "cas/counter";

    // Only a secret that exists at version N can be written with expected_version N.
    assert_code(
        c.put_secret(cas(name, b"x", 3)).await,
        Code::Aborted,
        "expected 3 on a missing secret",
    );
    assert_code(
        describe(&mut c, name).await,
        Code::NotFound,
        "nothing created",
    );

    let r = ok(
        c.put_secret(cas(name, b"one", 0)).await,
        "create with expected 0",
    );
    assert_eq!(r.version, 1);
    assert_code(
        c.put_secret(cas(name, b"again", 0)).await,
        Code::Aborted,
        "expected 0 on an existing secret",
    );
    let r = ok(c.put_secret(cas(name, b"two", 1)).await, "expected 1");
    assert_eq!(r.version, 2);
    assert_code(
        c.put_secret(cas(name, b"stale", 1)).await,
        Code::Aborted,
        "stale expected 1",
    );
    assert_code(
        c.put_secret(cas(name, b"future", 5)).await,
        Code::Aborted,
        "expected 5",
    );
    // Without expected_version the write is unconditional.
    assert_eq!(put(&mut c, name, b"three").await.version, 3);

    let m = describe(&mut c, name).await.unwrap();
    assert_eq!(m.primary_version, 3);
    assert_eq!(m.versions.len(), 3, "aborted writes left versions behind");
    assert_value(&mut c, name, 0, b"three").await;
    assert_value(&mut c, name, 2, b"two").await;

    // Concurrent CAS writers on the same version: exactly one wins.
    let mut tasks = Vec::new();
    for i in 0..8 {
        let mut c = c.clone();
        tasks.push(tokio::spawn(async move {
            c.put_secret(cas("cas/counter", format!("racer {i}").as_bytes(), 3))
                .await
                .map(|r| r.into_inner().version)
        }));
    }
    let mut won = Vec::new();
    for t in tasks {
        match t.await.unwrap() {
            Ok(v) => won.push(v),
            Err(st) => assert_eq!(st.code(), Code::Aborted, "losing racer: {}", st.message()),
        }
    }
    assert_eq!(won, vec![4], "exactly one CAS racer wins, with version 4");
    assert_eq!(describe(&mut c, name).await.unwrap().versions.len(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotent_put_and_issue() {
    let s = TestServer::start();
    let mut c = s.raw_client("admin").await;
    let with_id = |name: &str, value: &[u8], id: &str| pb::PutSecretRequest {
        request_id: id.to_owned(),
        ..put_req(name, value)
    };

    let first = ok(
        c.put_secret(with_id("idem/a", b"v1", "req-1")).await,
        "first",
    );
    assert_eq!(first.version, 1);
    // Same request again: the first result, nothing new stored.
    let again = ok(
        c.put_secret(with_id("idem/a", b"v1", "req-1")).await,
        "retry",
    );
    assert_eq!(again.version, first.version);
    assert_eq!(again.checksum, first.checksum);
    assert_eq!(again.name, first.name);
    assert_eq!(describe(&mut c, "idem/a").await.unwrap().versions.len(), 1);

    // A different request under the same id.
    assert_code(
        c.put_secret(with_id("idem/a", b"other", "req-1")).await,
        Code::AlreadyExists,
        "same id, other value",
    );
    assert_code(
        c.put_secret(with_id("idem/b", b"v1", "req-1")).await,
        Code::AlreadyExists,
        "same id, other name",
    );
    assert_code(
        describe(&mut c, "idem/b").await,
        Code::NotFound,
        "idem/b not created",
    );

    // The secret moves on; a late retry still gets the first result and stores nothing.
    assert_eq!(put(&mut c, "idem/a", b"v2").await.version, 2);
    let late = ok(
        c.put_secret(with_id("idem/a", b"v1", "req-1")).await,
        "late retry",
    );
    assert_eq!(late.version, 1);
    let m = describe(&mut c, "idem/a").await.unwrap();
    assert_eq!((m.primary_version, m.versions.len()), (2, 2));
    assert_value(&mut c, "idem/a", 0, b"v2").await;

    // A new id is a new write.
    let next = ok(
        c.put_secret(with_id("idem/a", b"v3", "req-2")).await,
        "new id",
    );
    assert_eq!(next.version, 3);

    // Concurrent retries of one request: one write, one answer.
    let mut tasks = Vec::new();
    for _ in 0..6 {
        let mut c = c.clone();
        tasks.push(tokio::spawn(async move {
            c.put_secret(pb::PutSecretRequest {
                request_id: "req-concurrent".into(),
                ..put_req("idem/c", b"same")
            })
            .await
            .map(|r| r.into_inner().version)
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap().expect("concurrent retry"), 1);
    }
    assert_eq!(describe(&mut c, "idem/c").await.unwrap().versions.len(), 1);

    // IssueKey: a retry returns the same key.
    let issue = |name: &str, id: &str| pb::IssueKeyRequest {
        name: name.to_owned(),
        request_id: id.to_owned(),
        ..Default::default()
    };
    let k1 = ok(c.issue_key(issue("idem/key", "issue-1")).await, "issue");
    let k2 = ok(
        c.issue_key(issue("idem/key", "issue-1")).await,
        "issue retry",
    );
    assert_eq!(k1.api_key, k2.api_key, "retry returns the same api_key");
    assert_eq!((k1.version, &k1.key_id), (k2.version, &k2.key_id));
    assert_eq!(
        describe(&mut c, "idem/key").await.unwrap().versions.len(),
        1
    );
    assert_code(
        c.issue_key(issue("idem/key2", "issue-1")).await,
        Code::AlreadyExists,
        "same id, other key name",
    );
    assert_code(
        describe(&mut c, "idem/key2").await,
        Code::NotFound,
        "idem/key2 not created",
    );
    // Without the id the name is taken.
    assert_code(
        c.issue_key(issue("idem/key", "")).await,
        Code::AlreadyExists,
        "reissue without id",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_ids_are_scoped_to_the_caller() {
    let mut s = TestServer::start();
    // A second writer identity, granted by the policy file dev mode wrote.
    let policy = s.data_dir().join("policy.toml");
    let mut text = std::fs::read_to_string(&policy).unwrap();
    text.push_str("\n[[rule]]\nidentities = [\"ops\"]\nverbs = [\"read\", \"write\", \"list\"]\nsecrets = [\"*\"]\n");
    std::fs::write(&policy, text).unwrap();
    s.restart();
    let ops_files = s.issue_dev_cert("ops", None);
    let mut admin = s.raw_client("admin").await;
    let mut ops = s.raw_client_with(&ops_files).await.expect("connect as ops");

    let req = |value: &[u8]| pb::PutSecretRequest {
        request_id: "shared-id".into(),
        ..put_req("scope/a", value)
    };
    let a = ok(admin.put_secret(req(b"from admin")).await, "admin put");
    assert_eq!(a.version, 1);
    // The same id from another identity is another request, not a conflict or a replay.
    let o = ok(ops.put_secret(req(b"from ops")).await, "ops put, same id");
    assert_eq!(o.version, 2);
    assert_eq!(
        ok(ops.put_secret(req(b"from ops")).await, "ops retry").version,
        2
    );
    assert_eq!(
        ok(admin.put_secret(req(b"from admin")).await, "admin retry").version,
        1
    );
    assert_code(
        admin.put_secret(req(b"from ops")).await,
        Code::AlreadyExists,
        "admin, same id, ops's payload",
    );
    let m = describe(&mut admin, "scope/a").await.unwrap();
    assert_eq!(m.versions.len(), 2);
    assert_value(&mut admin, "scope/a", 2, b"from ops").await;
}
