//! UpdateKeyPolicy's schedule fields (issue 15): rotation_period and default_grace_period set
//! over grpcurl, honoured by the next rotation, cleared with `wardctl keys policy --no-…`, and
//! kept by an update whose mask is empty (a caller that predates them).

use std::time::{SystemTime, UNIX_EPOCH};

use tonic::Code;
use ward_tests::{pb, TestServer};

fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schedule_set_by_grpcurl_used_by_rotation_and_cleared_by_wardctl() {
    let s = TestServer::start();
    let admin = s.client("admin").await;
    let key = admin
        .issue_key(pb::IssueKeyRequest {
            name: "sched/key".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .api_key;

    let body = r#"{"name":"sched/key","policy":{"rotation_period":"3600s","default_grace_period":"600s"},"update_mask":{"paths":["rotation_period","defaultGracePeriod"]}}"#;
    let o = s.grpcurl(&["-d", body], &["ward.v1.Keys/UpdateKeyPolicy"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["policy"]["rotationPeriod"], "3600s", "{v}");
    assert_eq!(v["policy"]["defaultGracePeriod"], "600s", "{v}");

    let m = admin.describe_secret("sched/key").await.unwrap();
    assert_eq!(m.rotation_period.map(|d| d.seconds), Some(3600));
    assert_eq!(m.default_grace_period.map(|d| d.seconds), Some(600));
    let next = m
        .next_rotation_time
        .expect("a rotation is scheduled")
        .seconds;
    assert!(
        (next - now_secs() - 3600).abs() < 60,
        "next rotation {next}"
    );

    // An update with an empty mask (every usage field) leaves the schedule alone.
    admin
        .update_key_policy(pb::UpdateKeyPolicyRequest {
            name: "sched/key".into(),
            policy: Some(pb::KeyPolicy::default()),
            update_mask: None,
            request_id: String::new(),
        })
        .await
        .unwrap();
    let m = admin.describe_secret("sched/key").await.unwrap();
    assert_eq!(m.rotation_period.map(|d| d.seconds), Some(3600));
    assert_eq!(m.default_grace_period.map(|d| d.seconds), Some(600));

    // A rotation naming no grace uses the key's default grace: the old key stays valid 10 min.
    admin
        .rotate_secret(pb::RotateSecretRequest {
            name: "sched/key".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let app = s.client("app").await;
    let v = app
        .verify_key(pb::VerifyKeyRequest {
            api_key: key.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(v.result(), pb::VerifyResult::Valid, "{v:?}");
    let until = v
        .grace_until
        .expect("the old key has a grace window")
        .seconds;
    assert!((until - now_secs() - 600).abs() < 60, "grace until {until}");

    // Out of bounds: refused, nothing changed.
    let o = s.grpcurl(
        &[
            "-d",
            r#"{"name":"sched/key","policy":{"rotation_period":"10s"},"update_mask":{"paths":["rotation_period"]}}"#,
        ],
        &["ward.v1.Keys/UpdateKeyPolicy"],
    );
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("InvalidArgument"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let err = admin
        .update_key_policy(pb::UpdateKeyPolicyRequest {
            name: "sched/key".into(),
            policy: Some(pb::KeyPolicy {
                default_grace_period: Some(prost_types::Duration {
                    seconds: 400 * 86_400,
                    nanos: 0,
                }),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["default_grace_period".into()],
            }),
            request_id: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    // wardctl sets and clears them.
    let o = s.wardctl(
        &["keys", "policy", "sched/key", "--rotation-period", "30d"],
        None,
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(stdout(&o).contains("rotation"), "{}", stdout(&o));
    let m = admin.describe_secret("sched/key").await.unwrap();
    assert_eq!(m.rotation_period.map(|d| d.seconds), Some(30 * 86_400));
    let o = s.wardctl(
        &[
            "--json",
            "keys",
            "policy",
            "sched/key",
            "--no-rotation",
            "--no-default-grace",
        ],
        None,
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(v["policy"]["rotation_period"].is_null(), "{v}");
    assert!(v["policy"]["default_grace_period"].is_null(), "{v}");
    let m = admin.describe_secret("sched/key").await.unwrap();
    assert_eq!(m.rotation_period, None);
    assert_eq!(m.next_rotation_time, None);
    assert_eq!(m.default_grace_period, None);
}
