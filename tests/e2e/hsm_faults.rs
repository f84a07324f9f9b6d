//! The HSM failing while the server runs, for real: the SoftHSM token's directory is moved away
//! under the running server and later put back. Calls that need the HSM fail UNAVAILABLE with a
//! message that names it; fetch, put, issue, rotate and verify keep working from the unsealed
//! keyring, and their audit records keep being written; checkpoint signing warns and retries.
//! Once the token is back the same process serves every call again, and after a restart
//! everything decrypts. A token that refuses the PIN when the server reconnects is not tried
//! again (a real HSM may lock itself after repeated failures) until a restart.

use std::process::Command;
use std::time::{Duration, Instant};

use tonic::{Code, Status};
use ward_tests::{move_entries, ok, pb, run_tool, AuditClient, TestServer};

use crate::{assert_value, put};

type AdminClient = pb::admin_client::AdminClient<tonic::transport::Channel>;

/// Asserts `r` failed UNAVAILABLE with a message that names the HSM and not the PIN.
fn assert_hsm_unavailable<T: std::fmt::Debug>(r: Result<T, Status>, pin: &str, what: &str) {
    let status = r.expect_err(&format!("{what} succeeded with the HSM gone"));
    assert_eq!(status.code(), Code::Unavailable, "{what}: {status:?}");
    assert!(
        status.message().contains("HSM"),
        "{what}: the message should name the HSM: {:?}",
        status.message()
    );
    assert!(!status.message().contains(pin), "{what}: the PIN is shown");
}

async fn verify_log(audit: &mut AuditClient) -> Result<pb::VerifyAuditLogResponse, Status> {
    audit
        .verify_audit_log(pb::VerifyAuditLogRequest::default())
        .await
        .map(|r| r.into_inner())
}

/// Waits until VerifyAuditLog passes with a checkpoint signed at or after record `seq`.
async fn wait_signed_through(audit: &mut AuditClient, seq: u64, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let v = verify_log(audit)
            .await
            .unwrap_or_else(|e| panic!("{what}: VerifyAuditLog: {e:?}"));
        assert!(v.ok, "{what}: the log does not verify: {v:?}");
        if v.signed_through_seq >= seq {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: no checkpoint signed record {seq} within 30 s: {v:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The value of an unlabelled metric.
fn metric(s: &TestServer, name: &str) -> String {
    let (status, text) = s.http_get("/metrics");
    assert_eq!(status, 200);
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .unwrap_or_else(|| panic!("no {name} in /metrics"))
        .to_owned()
}

async fn verify_key_valid(keys: &mut ward_tests::KeysClient, key: &str, what: &str) {
    let v = ok(
        keys.verify_key(pb::VerifyKeyRequest {
            api_key: key.to_owned(),
            ..Default::default()
        })
        .await,
        what,
    );
    assert!(v.valid, "{what}: {v:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_hsm_that_fails_while_serving_fails_closed_and_recovers_without_a_restart() {
    let mut s = TestServer::start();
    s.append_config("[audit]\ncheckpoint_interval = \"200ms\"");
    s.restart();
    let pin = std::fs::read_to_string(s.data_dir().join("hsm.pin")).unwrap();
    let pin = pin.trim().to_owned();
    let mut c = s.raw_client("admin").await;
    let mut admin: AdminClient = pb::admin_client::AdminClient::new(s.channel("admin").await);
    let mut audit = s.audit_client("admin").await;
    let mut keys = s.keys_client("admin").await;

    put(&mut c, "hsm/a", b"before").await;
    let key = ok(
        c.issue_key(pb::IssueKeyRequest {
            name: "hsm/key".into(),
            ..Default::default()
        })
        .await,
        "issue",
    )
    .api_key;
    verify_key_valid(&mut keys, &key, "verify before").await;
    let head = verify_log(&mut audit).await.unwrap().head_seq;
    wait_signed_through(&mut audit, head, "before the fault").await;

    // The token goes away under the running server.
    let (_, tokendir) = s.softhsm_paths();
    let aside = s.scratch_dir().join("token-aside");
    move_entries(&tokendir, &aside);
    let warned = s.count_in_stderr("audit checkpoint failed; will retry");

    assert_hsm_unavailable(
        admin.rotate_keyring(pb::RotateKeyringRequest {}).await,
        &pin,
        "RotateKeyring",
    );
    assert_hsm_unavailable(
        admin
            .rotate_master_key(pb::RotateMasterKeyRequest::default())
            .await,
        &pin,
        "RotateMasterKey",
    );
    // Not "forged": the log is fine, the HSM that vouches for it is not there.
    assert_hsm_unavailable(verify_log(&mut audit).await, &pin, "VerifyAuditLog");
    // A second round fails the same way (nothing half-recovered in between).
    assert_hsm_unavailable(
        admin.rotate_keyring(pb::RotateKeyringRequest {}).await,
        &pin,
        "RotateKeyring again",
    );

    // The data path does not need the HSM.
    let from = verify_log_head(&s).await;
    assert_value(&mut c, "hsm/a", 1, b"before").await;
    put(&mut c, "hsm/a", b"during").await;
    put(&mut c, "hsm/b", b"during").await;
    assert_value(&mut c, "hsm/a", 2, b"during").await;
    verify_key_valid(&mut keys, &key, "verify during").await;
    // Issuing and rotating need no HSM either: new data keys are wrapped by the keyring.
    let issued = ok(
        c.issue_key(pb::IssueKeyRequest {
            name: "hsm/key-during".into(),
            ..Default::default()
        })
        .await,
        "IssueKey during the outage",
    )
    .api_key;
    verify_key_valid(&mut keys, &issued, "verify a key issued during").await;
    let rotated_key = ok(
        c.rotate_secret(pb::RotateSecretRequest {
            name: "hsm/key".into(),
            ..Default::default()
        })
        .await,
        "RotateSecret of an API key during the outage",
    )
    .api_key;
    verify_key_valid(&mut keys, &rotated_key, "verify a key rotated during").await;
    // The old key stays valid for the grace period.
    verify_key_valid(&mut keys, &key, "verify the old key during its grace").await;
    ok(
        c.rotate_secret(pb::RotateSecretRequest {
            name: "hsm/a".into(),
            value: b"rotated during".to_vec(),
            ..Default::default()
        })
        .await,
        "RotateSecret of a static secret during the outage",
    );
    assert_value(&mut c, "hsm/a", 3, b"rotated during").await;
    let records = crate::audit::all_records(&mut audit).await;
    for (method, target) in [
        ("FetchSecret", "hsm/a"),
        ("PutSecret", "hsm/b"),
        ("VerifyKey", "hsm/key"),
        ("IssueKey", "hsm/key-during"),
        ("RotateSecret", "hsm/key"),
        ("RotateSecret", "hsm/a"),
    ] {
        assert!(
            records.iter().any(|r| r.seq > from
                && r.method == method
                && r.code == Code::Ok as i32
                && r.targets.iter().any(|t| t.name == target)),
            "no audit record of {method} {target} during the outage"
        );
    }
    assert!(
        records
            .iter()
            .any(|r| r.method == "RotateKeyring" && r.code == Code::Unavailable as i32),
        "the refused RotateKeyring was not audited"
    );

    // Checkpoint signing fails, says so, and keeps trying.
    s.wait_for_stderr(
        "audit checkpoint failed; will retry",
        warned + 2,
        Duration::from_secs(30),
    );
    assert_eq!(metric(&s, "ward_hsm_up"), "0");
    // Liveness is not the HSM: restarting now could not unseal.
    assert_eq!(s.http_get("/healthz"), (200, "ok\n".to_owned()));

    // The token comes back: the same process serves everything again.
    move_entries(&aside, &tokendir);
    let term = ok(
        admin.rotate_keyring(pb::RotateKeyringRequest {}).await,
        "RotateKeyring after the HSM returned",
    );
    assert_eq!(term.term, 2, "{term:?}");
    put(&mut c, "hsm/c", b"after").await;
    let head = verify_log(&mut audit)
        .await
        .expect("VerifyAuditLog")
        .head_seq;
    wait_signed_through(&mut audit, head, "after the HSM returned").await;
    let rotated = ok(
        admin
            .rotate_master_key(pb::RotateMasterKeyRequest::default())
            .await,
        "RotateMasterKey after the HSM returned",
    );
    assert_eq!(rotated.master_key_label, "ward-master-2", "{rotated:?}");
    assert_eq!(metric(&s, "ward_hsm_up"), "1");
    assert!(s.count_in_stderr("PKCS#11 token reconnected") >= 1);

    // A restart finds everything, under the new master key.
    drop((c, admin, audit, keys));
    s.restart();
    let mut c = s.raw_client("admin").await;
    for (name, version, value) in [
        ("hsm/a", 1, &b"before"[..]),
        ("hsm/a", 2, b"during"),
        ("hsm/a", 3, b"rotated during"),
        ("hsm/b", 1, b"during"),
        ("hsm/c", 1, b"after"),
        ("hsm/key-during", 1, issued.as_bytes()),
        ("hsm/key", 2, rotated_key.as_bytes()),
    ] {
        assert_value(&mut c, name, version, value).await;
    }
    let mut keys = s.keys_client("admin").await;
    for (k, what) in [
        (&key, "verify after restart"),
        (
            &issued,
            "verify the key issued during the outage after restart",
        ),
        (
            &rotated_key,
            "verify the key rotated during the outage after restart",
        ),
    ] {
        verify_key_valid(&mut keys, k, what).await;
    }
    let v = verify_log(&mut s.audit_client("admin").await)
        .await
        .unwrap();
    assert!(v.ok && v.checkpoints_verified > 0, "{v:?}");
    assert!(
        !s.all_output().contains(&pin),
        "the PIN is in the server's output"
    );
}

/// The newest audit record now (read through a fresh connection, so nothing else moves it).
async fn verify_log_head(s: &TestServer) -> u64 {
    let records = crate::audit::all_records(&mut s.audit_client("admin").await).await;
    records.last().map_or(0, |r| r.seq)
}

/// The label of the server's SoftHSM token, from SoftHSM itself.
pub fn token_label(s: &TestServer) -> String {
    let (conf, _) = s.softhsm_paths();
    let mut cmd = Command::new("softhsm2-util");
    cmd.arg("--show-slots").env("SOFTHSM2_CONF", &conf);
    let slots = run_tool(cmd, None);
    let slots = String::from_utf8_lossy(&slots.stdout).into_owned();
    slots
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Label:"))
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or_else(|| panic!("no labelled token in:\n{slots}"))
        .to_owned()
}

/// Creates an empty token labelled `label` with user PIN `pin` in the server's SoftHSM token
/// directory.
pub fn init_token(s: &TestServer, label: &str, pin: &str) {
    let (conf, _) = s.softhsm_paths();
    let mut cmd = Command::new("softhsm2-util");
    cmd.args([
        "--init-token",
        "--free",
        "--label",
        label,
        "--so-pin",
        "so-pin-5678",
        "--pin",
        pin,
    ])
    .env("SOFTHSM2_CONF", &conf);
    let o = run_tool(cmd, None);
    assert!(
        o.status.success(),
        "softhsm2-util --init-token: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// How many stderr lines contain every one of `needles`.
fn lines_with(s: &TestServer, needles: &[&str]) -> usize {
    s.stderr_tail(usize::MAX)
        .lines()
        .filter(|l| needles.iter().all(|n| l.contains(n)))
        .count()
}

/// docs/operating.md: "A PIN the token refuses on reconnect is not retried (an HSM may lock
/// the token after repeated failures): fix it and restart." The token goes away and a token
/// with the same label but another PIN takes its place: the reconnect is refused once, later
/// calls fail without logging in again (even once the real token is back), the data path keeps
/// working, and a restart serves everything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pin_refused_on_reconnect_is_not_retried_until_a_restart() {
    const REFUSED: [&str; 2] = [
        "cannot reconnect the PKCS#11 token",
        "the PIN does not open token",
    ];
    let mut s = TestServer::start();
    let pin = std::fs::read_to_string(s.data_dir().join("hsm.pin")).unwrap();
    let pin = pin.trim().to_owned();
    let label = token_label(&s);
    let mut c = s.raw_client("admin").await;
    let mut admin: AdminClient = pb::admin_client::AdminClient::new(s.channel("admin").await);
    put(&mut c, "pin/a", b"before").await;

    // The real token goes; a token with its label and another PIN appears.
    let (_, tokendir) = s.softhsm_paths();
    let aside = s.scratch_dir().join("token-aside");
    move_entries(&tokendir, &aside);
    init_token(&s, &label, "another-pin-4242");

    // Calls that need the HSM fail UNAVAILABLE, saying the PIN is refused (not what it is).
    for attempt in 1..=5 {
        let status = admin
            .rotate_keyring(pb::RotateKeyringRequest {})
            .await
            .expect_err("RotateKeyring with the PIN refused");
        assert_eq!(
            status.code(),
            Code::Unavailable,
            "attempt {attempt}: {status:?}"
        );
        assert!(!status.message().contains(&pin), "the PIN is shown");
        if attempt > 1 {
            assert!(
                status.message().starts_with("HSM unavailable: ")
                    && status.message().contains("PIN"),
                "attempt {attempt}: {:?}",
                status.message()
            );
        }
    }
    s.wait_for_stderr(REFUSED[1], 1, Duration::from_secs(15));
    assert_eq!(
        lines_with(&s, &REFUSED),
        1,
        "the refused PIN was tried again\n{}",
        s.stderr_tail(40)
    );
    // The data path does not need the HSM.
    put(&mut c, "pin/a", b"during").await;
    assert_value(&mut c, "pin/a", 2, b"during").await;

    // The real token back: still not retried in this process.
    for e in std::fs::read_dir(&tokendir).unwrap() {
        std::fs::remove_dir_all(e.unwrap().path()).unwrap();
    }
    move_entries(&aside, &tokendir);
    let status = admin
        .rotate_keyring(pb::RotateKeyringRequest {})
        .await
        .expect_err("RotateKeyring after the token came back, without a restart");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(status.message().contains("PIN"), "{:?}", status.message());
    assert_eq!(
        lines_with(&s, &REFUSED),
        1,
        "the refused PIN was tried again"
    );

    // A restart logs in again and serves everything.
    drop((c, admin));
    s.restart();
    let mut admin: AdminClient = pb::admin_client::AdminClient::new(s.channel("admin").await);
    ok(
        admin.rotate_keyring(pb::RotateKeyringRequest {}).await,
        "RotateKeyring after a restart",
    );
    let mut c = s.raw_client("admin").await;
    assert_value(&mut c, "pin/a", 1, b"before").await;
    assert_value(&mut c, "pin/a", 2, b"during").await;
    assert!(
        !s.all_output().contains(&pin),
        "the PIN is in the server's output"
    );
}
