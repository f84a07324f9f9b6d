//! Narrow grants, end to end (issue 11): an environment-limited rule grants nothing vault-wide,
//! a caller without a grant on (name, environment) gets one answer whatever exists, owners are
//! bound to their caller, and refused input does not grow the audit log.

use std::time::Duration;

use tonic::Code;
use ward_tests::{ok, pb, CertFiles, TestServer};

use crate::{assert_code, describe, fetch, put, put_req};

/// Adds `rule` (TOML) to the dev policy and restarts.
fn add_rule(s: &mut TestServer, rule: &str) {
    let path = s.data_dir().join("policy.toml");
    let mut text = std::fs::read_to_string(&path).unwrap();
    text.push_str("\n[[rule]]\n");
    text.push_str(rule);
    text.push('\n');
    std::fs::write(&path, text).unwrap();
    s.restart();
}

fn put_in(name: &str, env: &str, value: &[u8]) -> pb::PutSecretRequest {
    pb::PutSecretRequest {
        environment: env.into(),
        ..put_req(name, value)
    }
}

/// A server whose policy gives a dev team every verb on every secret, but only in dev, and
/// holds the prod secret `pay/db`; the team's certificate files.
async fn dev_team_and_a_prod_secret() -> (TestServer, CertFiles) {
    let mut s = TestServer::start();
    add_rule(
        &mut s,
        r#"identities = ["spiffe://ward/team-dev/*"]
verbs = ["*"]
secrets = ["*"]
environments = ["dev"]"#,
    );
    let mut admin = s.raw_client("admin").await;
    ok(
        admin
            .put_secret(put_in("pay/db", "prod", b"prod-pass"))
            .await,
        "admin put prod",
    );
    let files = s.issue_dev_cert("team-dev-ci", Some("spiffe://ward/team-dev/ci"));
    (s, files)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_environment_limited_rule_grants_nothing_vault_wide() {
    let (mut s, files) = dev_team_and_a_prod_secret().await;
    let mut admin = s.raw_client("admin").await;
    ok(
        admin
            .put_secret(put_in("pay/dev-db", "dev", b"dev-pass"))
            .await,
        "admin put dev",
    );
    let channel = s.channel_with(&files).await.expect("connect as team-dev");
    let mut dev = pb::secrets_client::SecretsClient::new(channel.clone());

    // What the rule does grant still works.
    assert_eq!(
        fetch(&mut dev, "pay/dev-db", 0)
            .await
            .expect("dev fetch")
            .value,
        b"dev-pass"
    );
    assert_code(
        fetch(&mut dev, "pay/db", 0).await,
        Code::PermissionDenied,
        "dev fetch of a prod secret",
    );

    let mut backup = pb::backup_client::BackupClient::new(channel.clone());
    let streamed = match backup.stream_backup(pb::StreamBackupRequest {}).await {
        Err(e) => Err(e),
        Ok(r) => r.into_inner().message().await.map(|_| ()),
    };
    assert_code(streamed, Code::PermissionDenied, "dev StreamBackup");
    let mut adm = pb::admin_client::AdminClient::new(channel.clone());
    assert_code(
        adm.rotate_master_key(pb::RotateMasterKeyRequest::default())
            .await,
        Code::PermissionDenied,
        "dev RotateMasterKey",
    );
    assert_code(
        adm.rotate_keyring(pb::RotateKeyringRequest {}).await,
        Code::PermissionDenied,
        "dev RotateKeyring",
    );
    assert_code(
        adm.describe_keyring(pb::DescribeKeyringRequest {}).await,
        Code::PermissionDenied,
        "dev DescribeKeyring",
    );
    let mut audit = pb::audit_client::AuditClient::new(channel);
    assert_code(
        audit
            .verify_audit_log(pb::VerifyAuditLogRequest::default())
            .await,
        Code::PermissionDenied,
        "dev VerifyAuditLog",
    );
    let streamed = match audit.stream_audit(pb::StreamAuditRequest::default()).await {
        Err(e) => Err(e),
        Ok(r) => r.into_inner().message().await.map(|_| ()),
    };
    assert_code(streamed, Code::PermissionDenied, "dev StreamAudit");

    // Naming admin or audit in a rule that lists environments is refused at start-up.
    for verb in ["admin", "audit"] {
        let path = s.data_dir().join("policy.toml");
        let before = std::fs::read_to_string(&path).unwrap();
        std::fs::write(
            &path,
            format!(
                "{before}\n[[rule]]\nidentities = [\"ops\"]\nverbs = [\"{verb}\"]\n\
                 secrets = [\"*\"]\nenvironments = [\"prod\"]\n"
            ),
        )
        .unwrap();
        let failed = s
            .try_restart()
            .expect_err("a policy granting a vault-wide verb per env");
        assert_eq!(failed.code, Some(2), "{}", failed.stderr);
        assert!(
            failed.stderr.contains("vault-wide") && failed.stderr.contains(verb),
            "{}",
            failed.stderr
        );
        std::fs::write(&path, before).unwrap();
    }
    s.restart();
    assert_eq!(
        fetch(&mut s.raw_client("admin").await, "pay/db", 0)
            .await
            .expect("admin fetch after the refused policies")
            .value,
        b"prod-pass"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partial_grant_gets_one_answer_whatever_exists() {
    let (s, files) = dev_team_and_a_prod_secret().await;
    let mut admin = s.raw_client("admin").await;
    let mut issued = pb::IssueKeyRequest {
        name: "pay/key".into(),
        environment: "prod".into(),
        ..Default::default()
    };
    ok(
        admin.issue_key(issued.clone()).await,
        "admin issue prod key",
    );
    let channel = s.channel_with(&files).await.expect("connect as team-dev");
    let mut dev = pb::secrets_client::SecretsClient::new(channel.clone());
    let mut keys = pb::keys_client::KeysClient::new(channel);

    // For each call: the answer for a prod secret and for a name that does not exist.
    let mut answers: Vec<(&str, Code, String, Code, String)> = Vec::new();
    let mut record = |what, exists: tonic::Status, missing: tonic::Status| {
        answers.push((
            what,
            exists.code(),
            exists
                .message()
                .replace("pay/db", "NAME")
                .replace("pay/key", "NAME"),
            missing.code(),
            missing.message().replace("pay/nothing", "NAME"),
        ));
    };
    for (name, missing) in [("pay/db", "pay/nothing"), ("pay/key", "pay/nothing")] {
        record(
            "fetch",
            fetch(&mut dev, name, 0).await.unwrap_err(),
            fetch(&mut dev, missing, 0).await.unwrap_err(),
        );
        record(
            "describe",
            describe(&mut dev, name).await.unwrap_err(),
            describe(&mut dev, missing).await.unwrap_err(),
        );
        let revoke = |n: &str| pb::RevokeSecretRequest {
            name: n.into(),
            all_versions: true,
            reason: "probe".into(),
            ..Default::default()
        };
        record(
            "revoke",
            dev.revoke_secret(revoke(name)).await.unwrap_err(),
            dev.revoke_secret(revoke(missing)).await.unwrap_err(),
        );
        let rotate = |n: &str| pb::RotateSecretRequest {
            name: n.into(),
            value: b"x".to_vec(),
            ..Default::default()
        };
        record(
            "rotate",
            dev.rotate_secret(rotate(name)).await.unwrap_err(),
            dev.rotate_secret(rotate(missing)).await.unwrap_err(),
        );
        let destroy = |n: &str| pb::DestroyVersionRequest {
            name: n.into(),
            version: 1,
            ..Default::default()
        };
        record(
            "destroy",
            dev.destroy_version(destroy(name)).await.unwrap_err(),
            dev.destroy_version(destroy(missing)).await.unwrap_err(),
        );
        let usage = |n: &str| pb::GetKeyUsageRequest {
            name: n.into(),
            ..Default::default()
        };
        record(
            "usage",
            keys.get_key_usage(usage(name)).await.unwrap_err(),
            keys.get_key_usage(usage(missing)).await.unwrap_err(),
        );
        let put_cas = |n: &str| pb::PutSecretRequest {
            expected_version: Some(7),
            environment: "dev".into(),
            ..put_req(n, b"v")
        };
        if name == "pay/db" {
            // A CAS put on a prod name tells neither its version nor its environment.
            let e = dev.put_secret(put_cas(name)).await.unwrap_err();
            assert_eq!(e.code(), Code::PermissionDenied, "put cas: {e:?}");
        }
    }
    for (what, ec, em, mc, mm) in &answers {
        assert_eq!(
            (ec, em),
            (mc, mm),
            "{what}: a prod secret and a missing one are told apart"
        );
        assert_eq!(*ec, Code::PermissionDenied, "{what}: {em}");
    }

    // IssueKey of a name taken in prod: not ALREADY_EXISTS.
    issued.environment = "dev".into();
    let e = dev.issue_key(issued.clone()).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    // The admin, whose grant covers every environment, is told the truth.
    assert_code(
        admin.issue_key(issued).await,
        Code::AlreadyExists,
        "admin reissue",
    );
    assert_code(
        fetch(&mut admin, "pay/nothing", 0).await,
        Code::NotFound,
        "admin fetch missing",
    );

    // A watch on a prod name opens like a watch on a missing one and shows nothing of it.
    let mut watch = ok(
        dev.watch_secrets(pb::WatchSecretsRequest {
            names: vec!["pay/db".into(), "pay/nothing".into()],
            ..Default::default()
        })
        .await,
        "dev watch",
    );
    let events = tokio::time::timeout(
        Duration::from_secs(10),
        ward_tests::until_synced(&mut watch),
    )
    .await
    .expect("the watch syncs");
    assert!(
        !format!("{events:?}").contains("pay/db"),
        "the watch showed a prod secret: {events:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn owners_are_one_line_and_bound_to_the_caller() {
    let mut s = TestServer::start();
    add_rule(
        &mut s,
        r#"identities = ["ops"]
verbs = ["write", "issue", "read", "list"]
secrets = ["*"]"#,
    );
    let mut ops = s
        .raw_client_with(&s.issue_dev_cert("ops", None))
        .await
        .expect("connect as ops");
    let mut admin = s.raw_client("admin").await;

    let owned = |name: &str, owner: &str| pb::PutSecretRequest {
        owner: owner.into(),
        ..put_req(name, b"v")
    };
    for bad in ["team\r\nx-injected: 1", "a\nb", "nul\0", "tab\there"] {
        assert_code(
            admin.put_secret(owned("own/a", bad)).await,
            Code::InvalidArgument,
            &format!("owner {bad:?}"),
        );
        assert_code(
            admin
                .issue_key(pb::IssueKeyRequest {
                    name: "own/key".into(),
                    owner: bad.into(),
                    ..Default::default()
                })
                .await,
            Code::InvalidArgument,
            &format!("key owner {bad:?}"),
        );
    }
    // ops may own what it writes, but may not name another owner.
    ok(ops.put_secret(owned("own/ops", "ops")).await, "ops owns");
    let e = ops
        .put_secret(owned("own/ops", "team-payments"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("owner"), "{e:?}");
    assert_code(
        ops.issue_key(pb::IssueKeyRequest {
            name: "own/ops-key".into(),
            owner: "team-payments".into(),
            ..Default::default()
        })
        .await,
        Code::PermissionDenied,
        "ops issue for another owner",
    );
    assert_eq!(describe(&mut admin, "own/ops").await.unwrap().owner, "ops");
    // An admin may name any owner.
    ok(
        admin.put_secret(owned("own/team", "team-payments")).await,
        "admin names an owner",
    );
    assert_eq!(
        describe(&mut admin, "own/team").await.unwrap().owner,
        "team-payments"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_input_does_not_grow_the_audit_log() {
    let s = TestServer::start();
    let mut admin = s.raw_client("admin").await;
    put(&mut admin, "big/seed", b"v").await;
    let stranger = s.issue_dev_cert("stranger", None);
    let mut c = s.raw_client_with(&stranger).await.expect("connect");
    let db = s.data_dir().join("data");
    let size = || {
        ward_tests::files_under(&db)
            .iter()
            .map(|f| f.metadata().unwrap().len())
            .sum::<u64>()
    };
    let before = size();
    // Names and request ids of 1 MiB from a caller with no grant at all (under the 4 MiB
    // message limit, so they reach the server).
    let huge = "a".repeat(1 << 20);
    for _ in 0..8 {
        let r = pb::PutSecretRequest {
            request_id: huge.clone(),
            ..put_req(&huge, b"v")
        };
        assert!(c.put_secret(r).await.is_err());
        assert!(fetch(&mut c, &huge, 0).await.is_err());
    }
    let watch = c
        .watch_secrets(pb::WatchSecretsRequest {
            names: (0..1000).map(|i| format!("team/{i:0>250}")).collect(),
            ..Default::default()
        })
        .await;
    let refused = match watch {
        Err(e) => e,
        Ok(r) => r.into_inner().message().await.expect_err("a refused watch"),
    };
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    let grown = size().saturating_sub(before);
    // 17 refused calls of up to 1 MiB each: without bounds that is 16+ MiB of records.
    assert!(grown < 2 << 20, "the store grew by {grown} bytes");

    // The refusals are audited, as an excerpt and a hash.
    let mut audit = s.audit_client("admin").await;
    let records = crate::audit::all_records(&mut audit).await;
    let refused: Vec<_> = records
        .iter()
        .filter(|r| r.identity == "stranger" && r.method == "PutSecret")
        .collect();
    assert_eq!(refused.len(), 8);
    let target = &refused[0].targets[0].name;
    assert!(
        target.len() < 200 && target.contains("sha256:") && target.contains("1048576 bytes"),
        "{target}"
    );
    assert!(
        refused[0].request_id.len() < 200,
        "{}",
        refused[0].request_id
    );
    let watch = records
        .iter()
        .find(|r| r.identity == "stranger" && r.method == "WatchSecrets")
        .expect("the refused watch is audited");
    let bytes: usize = watch.targets.iter().map(|t| t.name.len()).sum();
    assert!(bytes <= 4096, "{bytes} bytes of targets");
    assert!(watch.targets.last().unwrap().name.contains("more targets"));
}
