//! What reaches the disk: no plaintext value, API key or webhook secret anywhere under the data
//! dir (nor in the server's output, nor in what the audit, watch, backup and alert streams and
//! the webhooks send) after every RPC has run, and a ciphertext moved to another name or version
//! fails with DATA_LOSS.

use std::path::Path;

use base64::Engine;
use envoy_types::pb::envoy::service::auth::v3::{
    attribute_context, AttributeContext, CheckRequest,
};
use prost::Message;
use tonic::Code;
use ward_tests::{
    files_containing, next_event, ok, pb, random_hex, until_synced, RawClient, TestServer,
    WebhookReceiver,
};

use crate::rpcs::assert_every_rpc_served;
use crate::{assert_value, fetch, put};

/// Asserts that no file under `dir` holds any of `needles` (labelled for the message).
fn assert_not_on_disk(dir: &Path, needles: &[(&str, &[u8])], when: &str) {
    // The scanner finds things that are there: the dev certificates are plain PEM.
    assert!(
        !files_containing(dir, b"-----BEGIN CERTIFICATE-----").is_empty(),
        "scanner self-check failed"
    );
    for (what, needle) in needles {
        let hits = files_containing(dir, needle);
        assert!(hits.is_empty(), "{when}: {what} found in {hits:?}");
    }
}

/// The server's log filter for the leak test: everything at debug, Ward's own crates at trace.
const VERBOSE: (&str, &str) = ("WARD_LOG", "debug,ward_server=trace,ward_hsm=trace");

/// The middle line of a PEM file's base64 body: present in any copy of the key material.
fn pem_body_line(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap();
    let body: Vec<&str> = text.lines().filter(|l| !l.starts_with("-----")).collect();
    body[body.len() / 2].to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_plaintext_or_api_key_on_disk_or_in_logs() {
    // Verbose logging (WARD_LOG, the variable the server reads) makes a leak into a log line
    // more likely to show; every RPC runs, on the dev path and on the serve path.
    let mut s = TestServer::start_with_env(&[VERBOSE]);
    // A webhook, so that the Alerts RPCs all run (TestWebhook needs one); its secret file lives
    // outside the data dir, and the secret must reach neither the data dir nor a log.
    let rx = WebhookReceiver::start();
    let hook_dir = tempfile::tempdir().unwrap();
    let secret_file = hook_dir.path().join("webhook.secret");
    rx.write_secret(&secret_file);
    s.stop();
    s.append_config(&format!(
        "[[alerts.webhooks]]\nurl = \"{}\"\nsecret_file = \"{}\"\n",
        rx.url(),
        secret_file.display()
    ));
    s.restart_dev_with_env(&[VERBOSE]);
    let mut c = s.raw_client("admin").await;

    let value = format!("PLAINTEXT-CANARY-{}", random_hex(40));
    let value2 = format!("SECOND-CANARY-{}", random_hex(40));
    put(&mut c, "leak/a", value.as_bytes()).await;
    put(&mut c, "leak/a", value2.as_bytes()).await;
    // A large value made of the canary repeated: compression or paging would not hide it.
    let big = value.repeat(2000);
    put(&mut c, "leak/big", &big.as_bytes()[..60_000]).await;
    let key_dev = ok(
        c.issue_key(pb::IssueKeyRequest {
            name: "leak/key".into(),
            ..Default::default()
        })
        .await,
        "issue",
    )
    .api_key;
    let key_prod = ok(
        c.issue_key(pb::IssueKeyRequest {
            name: "leak/key-prod".into(),
            environment: "prod".into(),
            request_id: "leak-issue-1".into(),
            ..Default::default()
        })
        .await,
        "issue prod",
    )
    .api_key;
    // Exercise the read paths too (they must not log values), and the refusals.
    assert_value(&mut c, "leak/a", 1, value.as_bytes()).await;
    assert_eq!(
        fetch(&mut c, "leak/key", 0).await.unwrap().value,
        key_dev.as_bytes()
    );
    ok(
        c.batch_fetch_secrets(pb::BatchFetchSecretsRequest {
            items: ["leak/a", "leak/key-prod", "leak/missing"]
                .iter()
                .map(|n| pb::FetchSecretRequest {
                    name: n.to_string(),
                    version: 0,
                })
                .collect(),
        })
        .await,
        "batch",
    );
    ok(
        c.describe_secret(pb::DescribeSecretRequest {
            name: "leak/key".into(),
        })
        .await,
        "describe",
    );
    ok(
        c.list_secrets(pb::ListSecretsRequest::default()).await,
        "list",
    );
    let mut app = s.raw_client("app").await;
    let denied = app
        .put_secret(crate::put_req("leak/a", value.as_bytes()))
        .await;
    assert_eq!(denied.unwrap_err().code(), Code::PermissionDenied);
    let admin = s.client("admin").await;
    admin.rotate_keyring().await.unwrap();
    admin.rotate_master_key("").await.unwrap();
    admin.describe_keyring().await.unwrap();
    // A rotation returns a new key and verification receives keys: neither may log one.
    let key_rotated = admin
        .rotate_secret(pb::RotateSecretRequest {
            name: "leak/key".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .api_key;
    for k in [&key_rotated, &key_dev, &key_prod] {
        admin
            .verify_key(pb::VerifyKeyRequest {
                api_key: k.clone(),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    put(&mut c, "leak/after-rotation", value2.as_bytes()).await;
    let life = lifecycle_and_the_other_services(&s, &mut c, &key_dev).await;
    // Alerts: a leak report whose location quotes the key, the alert stream, a signed test
    // event to the webhook.
    let mut alerts = pb::alerts_client::AlertsClient::new(s.channel("admin").await);
    let leak = ok(
        alerts
            .report_leak(pb::ReportLeakRequest {
                api_key: key_prod.clone(),
                location: format!("https://paste.example/raw?k={key_prod}"),
                source: "leak test".into(),
                ..Default::default()
            })
            .await,
        "report leak",
    );
    assert!(leak.found);
    let mut stream = ok(
        alerts.watch_alerts(pb::WatchAlertsRequest::default()).await,
        "watch alerts",
    );
    let mut alert_bytes = Vec::new();
    while let Some(m) = stream.message().await.unwrap() {
        alert_bytes.extend(m.encode_to_vec());
    }
    assert!(!alert_bytes.is_empty(), "the leak report is an alert");
    let sent = ok(
        alerts
            .test_webhook(pb::TestWebhookRequest { url: rx.url() })
            .await,
        "test webhook",
    );
    assert!(sent.delivered, "{sent:?}");
    rx.wait_until(std::time::Duration::from_secs(20), |ds| {
        ds.iter().any(|d| d.kind() == "key.leak_reported")
    });
    let webhook_bytes: Vec<u8> = rx
        .attempts()
        .iter()
        .flat_map(|d| d.raw_body.clone().into_bytes())
        .collect();
    // Every RPC in the descriptor sets answered OK at least once: a new RPC is either exercised
    // here or fails this test.
    assert_every_rpc_served(&s, |code| code == "OK", "leak test");
    drop((c, app, admin));

    let body = |k: &str| k[k.len() - ward::keyformat::BODY_LEN..].to_owned();
    let (body_dev, body_prod, body_rotated) = (body(&key_dev), body(&key_prod), body(&key_rotated));
    let pin = std::fs::read_to_string(s.data_dir().join("hsm.pin")).unwrap();
    let pin = pin.trim().to_owned();
    let tls = s.data_dir().join("tls");
    let needles: Vec<(&str, Vec<u8>)> = vec![
        ("plaintext value", value.clone().into_bytes()),
        ("second plaintext value", value2.clone().into_bytes()),
        ("dev API key", key_dev.clone().into_bytes()),
        ("prod API key", key_prod.clone().into_bytes()),
        ("dev API key body", body_dev.clone().into_bytes()),
        ("prod API key body", body_prod.clone().into_bytes()),
        ("rotated API key", key_rotated.clone().into_bytes()),
        ("rotated API key body", body_rotated.clone().into_bytes()),
        ("lifecycle value 1", life.values[0].clone().into_bytes()),
        ("lifecycle value 2", life.values[1].clone().into_bytes()),
        (
            "lifecycle rotated value",
            life.values[2].clone().into_bytes(),
        ),
        ("webhook secret", rx.secret_text.as_bytes()[6..].to_vec()),
    ];
    // What the audit stream, the watch stream and the backup handed out holds none of it.
    for (what, needle) in &needles {
        for (from, bytes) in [
            ("StreamAudit", &life.audit_bytes),
            ("WatchSecrets", &life.watch_bytes),
            ("StreamBackup", &life.backup_bytes),
            ("WatchAlerts", &alert_bytes),
            ("the webhooks", &webhook_bytes),
        ] {
            assert!(
                !bytes.windows(needle.len()).any(|w| w == &needle[..]),
                "{what} in what {from} sent"
            );
        }
    }
    let needle_refs: Vec<(&str, &[u8])> = needles.iter().map(|(w, n)| (*w, &n[..])).collect();

    s.stop();
    assert_not_on_disk(s.data_dir(), &needle_refs, "after stop");

    // sled may rewrite its files on start-up (recovery, compaction): scan again.
    s.restart_with_env(&[VERBOSE]);
    let mut c = s.raw_client("admin").await;
    assert_value(&mut c, "leak/a", 0, value2.as_bytes()).await;
    assert_eq!(
        fetch(&mut c, "leak/key-prod", 0).await.unwrap().value,
        key_prod.as_bytes()
    );
    drop(c);
    s.stop();
    assert_not_on_disk(s.data_dir(), &needle_refs, "after restart");

    // The logs: the values and keys, in plain, hex and base64 (grpcurl's JSON form), the PIN
    // and the private keys' material.
    let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
    let mut log_needles: Vec<(String, String)> = Vec::new();
    for (what, n) in &needles {
        let text = String::from_utf8(n.clone()).unwrap();
        log_needles.push((format!("{what} (hex)"), hex_of(n)));
        let encoded = b64(n);
        log_needles.push((format!("{what} (base64)"), encoded[..40].to_owned()));
        log_needles.push((what.to_string(), text));
    }
    log_needles.push(("HSM PIN".into(), pin));
    for key in ["server.key", "admin.key", "app.key", "ca.key"] {
        log_needles.push((format!("private key {key}"), pem_body_line(&tls.join(key))));
    }
    let output = s.all_output();
    assert!(
        output.contains("DEBUG"),
        "the server did not log at debug level; the scan would prove nothing"
    );
    for (what, needle) in &log_needles {
        assert!(
            !output.contains(needle.as_str()),
            "{what} appears in the server's output"
        );
    }
}

/// What [`lifecycle_and_the_other_services`] used and received.
struct Lifecycle {
    /// The values put and rotated in under `leak/life`.
    values: [String; 3],
    /// Every StreamAudit response, encoded.
    audit_bytes: Vec<u8>,
    /// Every WatchSecrets event, encoded.
    watch_bytes: Vec<u8>,
    /// The backup file.
    backup_bytes: Vec<u8>,
}

/// Runs the RPCs the rest of the leak test does not: the lifecycle (rotate a STATIC secret,
/// revoke, set-state, destroy, watch), the Keys, Audit and Backup services and Envoy's Check.
async fn lifecycle_and_the_other_services(
    s: &TestServer,
    c: &mut RawClient,
    api_key: &str,
) -> Lifecycle {
    let values = [
        format!("LIFE-ONE-CANARY-{}", random_hex(40)),
        format!("LIFE-TWO-CANARY-{}", random_hex(40)),
        format!("LIFE-ROTATED-CANARY-{}", random_hex(40)),
    ];
    let mut watch = ok(
        c.watch_secrets(pb::WatchSecretsRequest {
            name_prefix: "leak/".into(),
            ..Default::default()
        })
        .await,
        "watch",
    );
    let mut events = until_synced(&mut watch).await;
    put(c, "leak/life", values[0].as_bytes()).await;
    put(c, "leak/life", values[1].as_bytes()).await;
    ok(
        c.rotate_secret(pb::RotateSecretRequest {
            name: "leak/life".into(),
            value: values[2].clone().into_bytes(),
            ..Default::default()
        })
        .await,
        "rotate a static secret",
    );
    ok(
        c.revoke_secret(pb::RevokeSecretRequest {
            name: "leak/life".into(),
            version: 1,
            reason: "leak test".into(),
            ..Default::default()
        })
        .await,
        "revoke v1",
    );
    ok(
        c.set_version_state(pb::SetVersionStateRequest {
            name: "leak/life".into(),
            version: 2,
            state: pb::VersionState::Inactive as i32,
            ..Default::default()
        })
        .await,
        "set v2 inactive",
    );
    ok(
        c.destroy_version(pb::DestroyVersionRequest {
            name: "leak/life".into(),
            version: 2,
            ..Default::default()
        })
        .await,
        "destroy v2",
    );
    // put, put, rotate, revoke, set-state, destroy: one event each.
    for _ in 0..6 {
        events.push(next_event(&mut watch).await);
    }
    drop(watch);

    let mut keys = s.keys_client("admin").await;
    ok(
        keys.update_key_policy(pb::UpdateKeyPolicyRequest {
            name: "leak/key".into(),
            policy: Some(pb::KeyPolicy {
                scopes: vec!["orders:read".into()],
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["scopes".into()],
            }),
            ..Default::default()
        })
        .await,
        "update key policy",
    );
    ok(
        keys.get_key_usage(pb::GetKeyUsageRequest {
            name: "leak/key".into(),
            version: 0,
        })
        .await,
        "get key usage",
    );
    let mut envoy = s.authz_client("admin").await;
    ok(envoy.check(check_request(api_key)).await, "ext_authz Check");

    let mut audit = s.audit_client("admin").await;
    let mut stream = ok(
        audit.stream_audit(pb::StreamAuditRequest::default()).await,
        "stream audit",
    );
    let mut audit_bytes = Vec::new();
    while let Some(r) = stream.message().await.expect("audit stream") {
        audit_bytes.extend(r.encode_to_vec());
    }
    assert!(!audit_bytes.is_empty(), "the audit stream sent nothing");
    let v = ok(
        audit
            .verify_audit_log(pb::VerifyAuditLogRequest::default())
            .await,
        "verify audit log",
    );
    assert!(v.ok, "audit log: {v:?}");

    let mut backup = pb::backup_client::BackupClient::new(s.channel("admin").await);
    let mut chunks = ok(
        backup.stream_backup(pb::StreamBackupRequest {}).await,
        "stream backup",
    );
    let mut backup_bytes = Vec::new();
    while let Some(chunk) = chunks.message().await.expect("backup stream") {
        backup_bytes.extend(chunk.data);
    }
    assert!(
        backup_bytes.len() > 1000,
        "the backup is {} bytes",
        backup_bytes.len()
    );

    Lifecycle {
        values,
        audit_bytes,
        watch_bytes: events.iter().flat_map(|e| e.encode_to_vec()).collect(),
        backup_bytes,
    }
}

/// An ext_authz request presenting `api_key` as a bearer token.
fn check_request(api_key: &str) -> CheckRequest {
    CheckRequest {
        attributes: Some(AttributeContext {
            request: Some(attribute_context::Request {
                http: Some(attribute_context::HttpRequest {
                    method: "GET".into(),
                    path: "/orders".into(),
                    headers: [("authorization".to_string(), format!("Bearer {api_key}"))].into(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
    }
}

fn hex_of(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The `versions` tree key for `name` at `version`.
fn version_key(name: &str, version: u64) -> Vec<u8> {
    let mut k = name.as_bytes().to_vec();
    k.push(0);
    k.extend_from_slice(&version.to_be_bytes());
    k
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ciphertext_moved_to_another_name_or_version_is_data_loss() {
    let mut s = TestServer::start();
    let mut c = s.raw_client("admin").await;
    put(&mut c, "tamper/x", b"x-one").await;
    put(&mut c, "tamper/x", b"x-two").await;
    put(&mut c, "tamper/y", b"y-one").await;
    put(&mut c, "tamper/z", b"z-one").await;
    put(&mut c, "tamper/z", b"z-two").await;
    drop(c);
    s.stop();

    {
        let db = ward_tests::open_stopped_db(s.data_dir());
        let versions = db.open_tree("versions").unwrap();
        let get = |name: &str, v: u64| {
            versions
                .get(version_key(name, v))
                .unwrap()
                .unwrap_or_else(|| panic!("no record for {name}@{v} in tree `versions` (layout differs from the contract)"))
        };
        // Another name, same version: y@1's blob onto x@1.
        versions
            .insert(version_key("tamper/x", 1), get("tamper/y", 1))
            .unwrap();
        // Same name, another version: z@2's blob onto z@1.
        versions
            .insert(version_key("tamper/z", 1), get("tamper/z", 2))
            .unwrap();
        db.flush().unwrap();
    }

    s.restart();
    let mut c = s.raw_client("admin").await;
    for (name, v) in [("tamper/x", 1), ("tamper/z", 1)] {
        let r = fetch(&mut c, name, v).await;
        match r {
            Ok(got) => panic!(
                "{name}@{v}: moved ciphertext decrypted (got {} bytes, version {})",
                got.value.len(),
                got.version
            ),
            Err(st) => assert_eq!(st.code(), Code::DataLoss, "{name}@{v}: {}", st.message()),
        }
    }
    // Per item in a batch too.
    let b = ok(
        c.batch_fetch_secrets(pb::BatchFetchSecretsRequest {
            items: vec![
                pb::FetchSecretRequest {
                    name: "tamper/x".into(),
                    version: 1,
                },
                pb::FetchSecretRequest {
                    name: "tamper/y".into(),
                    version: 1,
                },
            ],
        })
        .await,
        "batch",
    );
    match &b.results[0].result {
        Some(pb::batch_fetch_result::Result::Error(e)) => assert_eq!(e.code, Code::DataLoss as i32),
        other => panic!("batch tamper/x@1: expected DATA_LOSS, got {other:?}"),
    }
    assert!(matches!(
        b.results[1].result,
        Some(pb::batch_fetch_result::Result::Secret(_))
    ));

    // Untouched records still decrypt.
    assert_value(&mut c, "tamper/x", 2, b"x-two").await;
    assert_value(&mut c, "tamper/x", 0, b"x-two").await;
    assert_value(&mut c, "tamper/y", 1, b"y-one").await;
    assert_value(&mut c, "tamper/z", 2, b"z-two").await;
}
