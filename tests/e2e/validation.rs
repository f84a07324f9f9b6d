//! Bad input: every malformed request gets INVALID_ARGUMENT, and nothing is stored half-way
//! (Describe and List show no trace of it).

use tonic::Code;
use ward_tests::{ok, pb, TestServer};

use crate::{all_names, assert_code, describe, fetch, put_req};

const MAX_VALUE: usize = 64 * 1024;

/// Names outside `[a-z0-9][a-z0-9._/-]*`, ≤ 256 bytes, no `//`, `..` or trailing `/`.
fn bad_names() -> Vec<String> {
    let mut v: Vec<String> = [
        "", "A", "Upper", "upPer", "a b", " a", "a ", "-lead", ".lead", "/lead", "_lead", "a//b",
        "a/../b", "a..b", "..", "a/..", "a/", "svc/db/", "ä", "naïve", "a\u{0}b", "a\nb", "a:b",
        "a*", "a\\b", "a@b", "a+b",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    v.push("a".repeat(257));
    v.push(format!("{}/x", "b".repeat(255)));
    v
}

/// Names at the edges of the grammar that must be accepted.
fn good_edge_names() -> Vec<String> {
    vec![
        "a".into(),
        "0".into(),
        "a.b_c-d/e.f".into(),
        "x/y/z/0-9".into(),
        "a".repeat(256),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_rejected_and_leaves_no_trace() {
    let s = TestServer::start();
    let mut c = s.raw_client("admin").await;
    let mut stored: Vec<String> = Vec::new();

    // Names.
    for name in bad_names() {
        let what = format!("put name {name:?}");
        assert_code(
            c.put_secret(put_req(&name, b"v")).await,
            Code::InvalidArgument,
            &what,
        );
        let issue = pb::IssueKeyRequest {
            name: name.clone(),
            ..Default::default()
        };
        assert_code(
            c.issue_key(issue).await,
            Code::InvalidArgument,
            &format!("issue name {name:?}"),
        );
        assert_code(
            fetch(&mut c, &name, 0).await,
            Code::InvalidArgument,
            &format!("fetch name {name:?}"),
        );
        assert_code(
            describe(&mut c, &name).await,
            Code::InvalidArgument,
            &format!("describe name {name:?}"),
        );
    }
    for name in good_edge_names() {
        ok(
            c.put_secret(put_req(&name, b"v")).await,
            &format!("put good name {name:?}"),
        );
        stored.push(name);
    }

    // Values: empty and one byte over the limit are refused; the limit itself is fine.
    assert_code(
        c.put_secret(put_req("val/empty", b"")).await,
        Code::InvalidArgument,
        "empty value",
    );
    let over = vec![7u8; MAX_VALUE + 1];
    assert_code(
        c.put_secret(put_req("val/over", &over)).await,
        Code::InvalidArgument,
        "64 KiB + 1",
    );
    let far_over = vec![7u8; 1024 * 1024];
    assert_code(
        c.put_secret(put_req("val/far-over", &far_over)).await,
        Code::InvalidArgument,
        "1 MiB",
    );
    let max = vec![9u8; MAX_VALUE];
    ok(
        c.put_secret(put_req("val/max", &max)).await,
        "exactly 64 KiB",
    );
    stored.push("val/max".into());
    // An existing secret does not get a bad new version either.
    assert_code(
        c.put_secret(put_req("val/max", b"")).await,
        Code::InvalidArgument,
        "empty v2",
    );
    assert_code(
        c.put_secret(put_req("val/max", &over)).await,
        Code::InvalidArgument,
        "oversized v2",
    );
    let m = describe(&mut c, "val/max").await.unwrap();
    assert_eq!(
        (m.primary_version, m.versions.len()),
        (1, 1),
        "rejected versions stored"
    );

    // Environments.
    for env in ["qa", "PROD", "Dev", "prod ", "dev/x", "production"] {
        let req = pb::PutSecretRequest {
            environment: env.into(),
            ..put_req("env/bad", b"v")
        };
        assert_code(
            c.put_secret(req).await,
            Code::InvalidArgument,
            &format!("put env {env:?}"),
        );
        let issue = pb::IssueKeyRequest {
            name: "env/bad-key".into(),
            environment: env.into(),
            ..Default::default()
        };
        assert_code(
            c.issue_key(issue).await,
            Code::InvalidArgument,
            &format!("issue env {env:?}"),
        );
    }

    // Request ids: `[A-Za-z0-9._:-]{1,128}`.
    let long_id = "r".repeat(129);
    for id in [
        "has space",
        "a/b",
        "ä",
        "a\nb",
        "semi;colon",
        "q?",
        long_id.as_str(),
    ] {
        let req = pb::PutSecretRequest {
            request_id: id.into(),
            ..put_req("rid/bad", b"v")
        };
        assert_code(
            c.put_secret(req).await,
            Code::InvalidArgument,
            &format!("request_id {id:?}"),
        );
        let issue = pb::IssueKeyRequest {
            name: "rid/bad-key".into(),
            request_id: id.into(),
            ..Default::default()
        };
        assert_code(
            c.issue_key(issue).await,
            Code::InvalidArgument,
            &format!("issue request_id {id:?}"),
        );
    }
    let max_id = "R".repeat(128);
    for (i, id) in [max_id.as_str(), "A-z.0_9:x"].iter().enumerate() {
        let name = format!("rid/good-{i}");
        let req = pb::PutSecretRequest {
            request_id: id.to_string(),
            ..put_req(&name, b"v")
        };
        ok(c.put_secret(req).await, &format!("request_id {id:?}"));
        stored.push(name);
    }
    // A refused request does not consume its request_id.
    let refused = pb::PutSecretRequest {
        request_id: "rid-after-refusal".into(),
        ..put_req("rid/later", b"")
    };
    assert_code(
        c.put_secret(refused).await,
        Code::InvalidArgument,
        "empty value with id",
    );
    let accepted = pb::PutSecretRequest {
        request_id: "rid-after-refusal".into(),
        ..put_req("rid/later", b"now valid")
    };
    assert_eq!(
        ok(c.put_secret(accepted).await, "same id after refusal").version,
        1
    );
    stored.push("rid/later".into());

    // Scopes: `[a-z0-9:._-]{1,64}`.
    let long_scope = "s".repeat(65);
    for scope in ["", "UPPER", "a b", "a/b", long_scope.as_str()] {
        let issue = pb::IssueKeyRequest {
            name: "scope/bad".into(),
            scopes: vec!["ok:scope".into(), scope.into()],
            ..Default::default()
        };
        assert_code(
            c.issue_key(issue).await,
            Code::InvalidArgument,
            &format!("scope {scope:?}"),
        );
    }
    let issue = pb::IssueKeyRequest {
        name: "scope/good".into(),
        scopes: vec!["s".repeat(64), "a:b.c_d-e".into()],
        ..Default::default()
    };
    ok(c.issue_key(issue).await, "good scopes");
    stored.push("scope/good".into());

    // Batch size.
    let batch = |n: usize| pb::BatchFetchSecretsRequest {
        items: (0..n)
            .map(|_| pb::FetchSecretRequest {
                name: "a".into(),
                version: 0,
            })
            .collect(),
    };
    assert_code(
        c.batch_fetch_secrets(batch(101)).await,
        Code::InvalidArgument,
        "batch 101",
    );
    assert_code(
        c.batch_fetch_secrets(batch(1000)).await,
        Code::InvalidArgument,
        "batch 1000",
    );
    assert_eq!(
        ok(c.batch_fetch_secrets(batch(100)).await, "batch 100")
            .results
            .len(),
        100
    );

    // Listing: page size and page token.
    let list = |size: u32, token: &str| pb::ListSecretsRequest {
        page_size: size,
        page_token: token.into(),
        ..Default::default()
    };
    assert_code(
        c.list_secrets(list(1001, "")).await,
        Code::InvalidArgument,
        "page_size 1001",
    );
    assert_code(
        c.list_secrets(list(u32::MAX, "")).await,
        Code::InvalidArgument,
        "page_size max",
    );
    for token in ["garbage", "!!!", "AAAA", "a/b", "\u{0}"] {
        assert_code(
            c.list_secrets(list(10, token)).await,
            Code::InvalidArgument,
            &format!("page_token {token:?}"),
        );
    }
    ok(c.list_secrets(list(1000, "")).await, "page_size 1000");

    // No trace of any refused request: the listing holds exactly the accepted secrets, each
    // with one version.
    stored.sort();
    assert_eq!(all_names(&mut c).await, stored);
    for name in [
        "val/empty",
        "val/over",
        "val/far-over",
        "env/bad",
        "env/bad-key",
        "rid/bad",
        "rid/bad-key",
        "scope/bad",
    ] {
        assert_code(
            describe(&mut c, name).await,
            Code::NotFound,
            &format!("{name} left a trace"),
        );
    }
    for name in &stored {
        let m = describe(&mut c, name).await.unwrap();
        assert_eq!(m.versions.len(), 1, "{name}: versions");
    }
}
