//! API keys across their lifecycle, end to end: a rotated key overlaps with its successor for
//! the grace period (both VALID, the old one says until when), then only the new one works; a
//! revoked key is refused on the very next verification; the leak scanner tells live keys from
//! revoked ones, reports what it revokes as leaked (alerts) and revokes it. Time moves through the server's test clock.

use std::time::Duration;
use ward_client::proto::{
    IssueKeyRequest, RevokeSecretRequest, RotateSecretRequest, VerifyKeyRequest, VerifyResult,
};
use ward_tests::TestServer;

fn verify(key: &str) -> VerifyKeyRequest {
    VerifyKeyRequest {
        api_key: key.to_owned(),
        required_scopes: vec!["charges:read".into()],
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_overlaps_then_retires_and_revocation_is_immediate() {
    let s = TestServer::start_with_test_clock();
    let admin = s.client("admin").await;
    let issue = |name: &str| IssueKeyRequest {
        name: name.into(),
        scopes: vec!["charges:read".into()],
        ..Default::default()
    };
    let old = admin
        .issue_key(issue("edge/partner"))
        .await
        .unwrap()
        .api_key;
    let rotated = admin
        .rotate_secret(RotateSecretRequest {
            name: "edge/partner".into(),
            grace_period: Some(prost_types::Duration {
                seconds: 3600,
                nanos: 0,
            }),
            ..Default::default()
        })
        .await
        .unwrap();
    let new = rotated.api_key;
    assert_ne!(old, new);

    // During the overlap both keys work; the old one says until when.
    let v_old = admin.verify_key(verify(&old)).await.unwrap();
    let v_new = admin.verify_key(verify(&new)).await.unwrap();
    assert_eq!((v_old.result(), v_old.version), (VerifyResult::Valid, 1));
    assert_eq!((v_new.result(), v_new.version), (VerifyResult::Valid, 2));
    assert!(
        v_old.grace_until.is_some(),
        "the old key reports its grace_until"
    );
    assert!(v_new.grace_until.is_none());

    // After the grace period only the new key works.
    s.advance_clock(Duration::from_secs(3601));
    let v_old = admin.verify_key(verify(&old)).await.unwrap();
    assert_eq!(v_old.result(), VerifyResult::Disabled);
    assert!(!v_old.valid);
    assert_eq!(
        admin.verify_key(verify(&new)).await.unwrap().result(),
        VerifyResult::Valid
    );

    // Revocation takes effect on the very next call.
    admin
        .revoke_secret(RevokeSecretRequest {
            name: "edge/partner".into(),
            all_versions: true,
            reason: "partner offboarded".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(
        admin.verify_key(verify(&new)).await.unwrap().result(),
        VerifyResult::Revoked
    );
    assert_eq!(
        admin.verify_key(verify(&old)).await.unwrap().result(),
        VerifyResult::Revoked
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scan_revokes_a_leaked_old_version_and_leaves_the_primary_with_a_hint() {
    let s = TestServer::start_with_test_clock();
    let admin = s.client("admin").await;
    let old = admin
        .issue_key(IssueKeyRequest {
            name: "edge/leaky".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .api_key;
    let new = admin
        .rotate_secret(RotateSecretRequest {
            name: "edge/leaky".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .api_key;
    let tree = s.scratch_dir().join("repo");
    std::fs::create_dir_all(&tree).unwrap();
    std::fs::write(tree.join("config.env"), format!("OLD_KEY={old}\n")).unwrap();
    std::fs::write(tree.join("notes.md"), format!("primary: {new}\n")).unwrap();

    let dir = tree.to_str().unwrap();
    let out = s.wardctl(&["scan", "--check", "--revoke", "--yes", dir], None);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "live keys were found: {stderr}");
    assert!(stderr.contains("revoked edge/leaky@1"), "{stderr}");
    assert!(
        stderr.contains("not revoked edge/leaky@2") && stderr.contains("rotate it first"),
        "{stderr}"
    );

    // The old version is now REVOKED, on the very next call; the primary still works.
    let v = admin
        .verify_key(VerifyKeyRequest {
            api_key: old,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(v.result(), VerifyResult::Revoked);
    let v = admin
        .verify_key(VerifyKeyRequest {
            api_key: new,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(v.result(), VerifyResult::Valid);

    // A second scan reports the revoked key as dead and the primary as live.
    let out = s.wardctl(&["scan", "--check", dir], None);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("REVOKED"), "{stdout}");
    assert!(stdout.contains("LIVE"), "{stdout}");
    assert_eq!(out.status.code(), Some(3));
    // Without a terminal, --revoke refuses to act unless told --yes.
    let out = s.wardctl(&["scan", "--revoke", dir], None);
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Each live key --revoke acted on was reported leaked first: one alert per version, the
    // file and line as its location.
    let out = s.wardctl(&["alerts", "tail", "--type", "key.leak_reported"], None);
    let alerts = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(alerts.lines().count(), 2, "{alerts}");
    assert!(
        alerts.contains("edge/leaky@1") && alerts.contains("edge/leaky@2"),
        "{alerts}"
    );
    assert!(alerts.contains("config.env:1"), "{alerts}");
}
