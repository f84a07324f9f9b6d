//! Key lifecycle against the real server: rotation with an overlap window, revocation through
//! every path (fetch, SDK cache, watcher), scheduled rotation, watch catch-up, destruction.
//! Time moves through the server's test-only clock file, never by sleeping.

use std::time::Duration;

use tokio::sync::broadcast;
use tonic::Code;
use ward::keyformat::ApiKey;
use ward_client::{Cache, CacheConfig, CacheEvent};
use ward_tests::{
    expect_code, files_containing, next_event, ok, pb, random_hex, until_synced, RawClient,
    TestServer,
};

use crate::{assert_value, describe, fetch, put};

pub fn secs(s: i64) -> Option<prost_types::Duration> {
    Some(prost_types::Duration {
        seconds: s,
        nanos: 0,
    })
}

pub fn rotate_req(name: &str, value: &[u8], grace: Option<i64>) -> pb::RotateSecretRequest {
    pb::RotateSecretRequest {
        name: name.to_owned(),
        value: value.to_vec(),
        grace_period: grace.and_then(secs),
        ..Default::default()
    }
}

pub fn revoke_req(name: &str, version: u64, reason: &str) -> pb::RevokeSecretRequest {
    pb::RevokeSecretRequest {
        name: name.to_owned(),
        version,
        all_versions: version == 0,
        reason: reason.to_owned(),
        ..Default::default()
    }
}

pub fn state_req(name: &str, version: u64, state: pb::VersionState) -> pb::SetVersionStateRequest {
    pb::SetVersionStateRequest {
        name: name.to_owned(),
        version,
        state: state as i32,
        ..Default::default()
    }
}

pub fn destroy_req(name: &str, version: u64, successor: u64) -> pb::DestroyVersionRequest {
    pb::DestroyVersionRequest {
        name: name.to_owned(),
        version,
        successor_version: successor,
        ..Default::default()
    }
}

/// Opens a watch on `names` holding `held` ((name, version, state) triples).
pub async fn watch(
    c: &mut RawClient,
    names: &[&str],
    prefix: &str,
    held: &[(&str, u64, pb::VersionState)],
) -> tonic::Streaming<pb::WatchEvent> {
    let mut secrets: Vec<pb::HeldSecret> = Vec::new();
    for (name, version, state) in held {
        let v = pb::HeldVersion {
            version: *version,
            state: *state as i32,
        };
        match secrets.iter_mut().find(|h| h.name == *name) {
            Some(h) => h.versions.push(v),
            None => secrets.push(pb::HeldSecret {
                name: name.to_string(),
                versions: vec![v],
            }),
        }
    }
    ok(
        c.watch_secrets(pb::WatchSecretsRequest {
            names: names.iter().map(|n| n.to_string()).collect(),
            name_prefix: prefix.to_owned(),
            held: secrets,
            sync_only: false,
        })
        .await,
        "open watch",
    )
}

/// (type, name, version) of each event.
pub fn summary(events: &[pb::WatchEvent]) -> Vec<(pb::WatchEventType, String, u64)> {
    events
        .iter()
        .map(|e| (e.r#type(), e.name.clone(), e.version))
        .collect()
}

/// Waits (at most 10 s) for a cache event matching `want`.
pub async fn cache_event(
    rx: &mut broadcast::Receiver<CacheEvent>,
    what: &str,
    want: impl Fn(&CacheEvent) -> bool,
) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Ok(e)) if want(&e) => return,
            Ok(Ok(_)) | Ok(Err(broadcast::error::RecvError::Lagged(_))) => {}
            Ok(Err(e)) => panic!("cache events closed while waiting for {what}: {e}"),
            Err(_) => panic!("no cache event {what} within 10 s"),
        }
    }
}

fn changed(e: &CacheEvent, kind: pb::WatchEventType, version: u64) -> bool {
    matches!(e, CacheEvent::Changed(ev) if ev.r#type() == kind && ev.version == version)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_overlaps_for_the_grace_period_then_only_the_new_version_works() {
    let s = TestServer::start_with_test_clock();
    let mut c = s.raw_client("admin").await;
    let mut app = s.raw_client("app").await;
    let name = "life/key";

    let k1 = ok(
        c.issue_key(pb::IssueKeyRequest {
            name: name.into(),
            ..Default::default()
        })
        .await,
        "issue",
    );
    let r = ok(
        c.rotate_secret(rotate_req(name, b"", Some(3600))).await,
        "rotate",
    );
    assert_eq!((r.version, r.previous_version), (2, 1));
    ApiKey::parse(&r.api_key).expect("the rotated key is well-formed");
    assert_ne!(r.api_key, k1.api_key);
    assert_ne!(r.key_id, k1.key_id);
    assert!(r.previous_grace_until.is_some());

    // During the window both versions work, each holding the key it was issued as, and both
    // keys stay indexed (Describe shows both key ids; VerifyKey judges them by these states).
    let v1 = fetch(&mut app, name, 1)
        .await
        .expect("v1 during the window");
    assert_eq!(v1.value, k1.api_key.as_bytes());
    assert_eq!(v1.state(), pb::VersionState::Active);
    assert_eq!(v1.grace_until, r.previous_grace_until);
    let v2 = fetch(&mut app, name, 0).await.expect("primary");
    assert_eq!((v2.version, v2.value.as_slice()), (2, r.api_key.as_bytes()));
    let m = describe(&mut c, name).await.unwrap();
    assert_eq!(
        m.versions
            .iter()
            .map(|v| (v.state(), v.key_id.as_str(), v.state_reason.as_str()))
            .collect::<Vec<_>>(),
        [
            (
                pb::VersionState::Active,
                k1.key_id.as_str(),
                "replaced by version 2"
            ),
            (pb::VersionState::Primary, r.key_id.as_str(), "")
        ]
    );

    // (A minute of margin: real time passes between calls on a busy machine.)
    s.advance_clock(Duration::from_secs(3540));
    assert!(
        fetch(&mut app, name, 1).await.is_ok(),
        "last minute of the window"
    );
    s.advance_clock(Duration::from_secs(60));
    let msg = expect_code(
        fetch(&mut app, name, 1).await,
        Code::FailedPrecondition,
        "v1 after the window",
    );
    assert!(msg.contains("INACTIVE: grace period ended"), "{msg}");
    assert_eq!(fetch(&mut app, name, 0).await.unwrap().version, 2);
    let m = describe(&mut c, name).await.unwrap();
    assert_eq!(m.versions[0].state(), pb::VersionState::Inactive);

    // STATIC: grace 0 retires the old value at once; rollback promotes an ACTIVE version.
    put(&mut c, "life/db", b"one").await;
    let r = ok(
        c.rotate_secret(rotate_req("life/db", b"two", Some(0)))
            .await,
        "rotate grace 0",
    );
    assert_eq!((r.version, r.previous_grace_until), (2, None));
    expect_code(
        fetch(&mut c, "life/db", 1).await,
        Code::FailedPrecondition,
        "retired at once",
    );
    ok(
        c.rotate_secret(rotate_req("life/db", b"three", None)).await,
        "rotate with the server's default grace",
    );
    let st = ok(
        c.set_version_state(state_req("life/db", 2, pb::VersionState::Primary))
            .await,
        "rollback to 2",
    );
    assert_eq!(
        (st.state(), st.primary_version),
        (pb::VersionState::Primary, 2)
    );
    assert_value(&mut c, "life/db", 0, b"two").await;
    assert_eq!(
        fetch(&mut c, "life/db", 3).await.unwrap().state(),
        pb::VersionState::Active
    );

    // A version's own expiry, enforced when read.
    let mut req = rotate_req("life/db", b"four", None);
    req.expiration = Some(pb::rotate_secret_request::Expiration::Ttl(
        secs(600).unwrap(),
    ));
    let r = ok(c.rotate_secret(req).await, "rotate with ttl");
    let f = fetch(&mut c, "life/db", 0).await.unwrap();
    assert_eq!(f.version, r.version);
    assert!(f.expire_time.is_some());
    s.advance_clock(Duration::from_secs(600));
    let msg = expect_code(
        fetch(&mut c, "life/db", 0).await,
        Code::FailedPrecondition,
        "expired version",
    );
    assert!(msg.contains("expired"), "{msg}");
    let m = describe(&mut c, "life/db").await.unwrap();
    let last = m.versions.last().unwrap();
    assert_eq!(
        (last.state(), last.state_reason.as_str()),
        (pb::VersionState::Inactive, "expired")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_takes_effect_on_the_next_call_everywhere() {
    let s = TestServer::start();
    let mut admin = s.raw_client("admin").await;
    let mut app = s.raw_client("app").await;
    let name = "rev/db";
    put(&mut admin, name, b"one").await;
    put(&mut admin, name, b"two").await;

    // An application's SDK cache, and another client watching, both as `app` (read only).
    let cache = Cache::new(s.client("app").await, CacheConfig::new());
    let mut events = cache.subscribe();
    assert_eq!(cache.get(name).await.unwrap().value(), b"two");
    assert_eq!(cache.get_version(name, 1).await.unwrap().value(), b"one");
    cache_event(&mut events, "Synced", |e| matches!(e, CacheEvent::Synced)).await;
    let mut w = watch(
        &mut app,
        &[name],
        "",
        &[
            (name, 1, pb::VersionState::Active),
            (name, 2, pb::VersionState::Primary),
        ],
    )
    .await;
    assert_eq!(until_synced(&mut w).await.len(), 1, "nothing differs yet");

    let r = ok(
        admin
            .revoke_secret(revoke_req(name, 1, "leaked in a build log"))
            .await,
        "revoke v1",
    );
    assert_eq!((r.revoked_versions, r.primary_version), (vec![1], 2));
    // The very next call fails, and says why.
    let msg = expect_code(
        fetch(&mut app, name, 1).await,
        Code::FailedPrecondition,
        "fetch revoked v1",
    );
    assert!(
        msg.contains("REVOKED") && msg.contains("leaked in a build log"),
        "{msg}"
    );
    // The watcher is told.
    let e = next_event(&mut w).await;
    assert_eq!(
        (e.r#type(), e.version, e.state()),
        (pb::WatchEventType::Revoked, 1, pb::VersionState::Revoked)
    );
    assert!(e.reason.contains("leaked in a build log"), "{}", e.reason);
    // The cache drops it (no server call needed to know) and refuses it from then on.
    cache_event(&mut events, "REVOKED v1", |e| {
        changed(e, pb::WatchEventType::Revoked, 1)
    })
    .await;
    let err = cache.get_version(name, 1).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err}");
    assert_eq!(cache.get(name).await.unwrap().value(), b"two");

    // Revoking the PRIMARY alone needs a successor; the whole secret does not.
    expect_code(
        admin.revoke_secret(revoke_req(name, 2, "x")).await,
        Code::FailedPrecondition,
        "revoke the PRIMARY alone",
    );
    let r = ok(
        admin
            .revoke_secret(revoke_req(name, 0, "compromised"))
            .await,
        "revoke all",
    );
    assert_eq!((r.revoked_versions, r.primary_version), (vec![2], 0));
    expect_code(
        fetch(&mut app, name, 0).await,
        Code::FailedPrecondition,
        "fetch after revoking all",
    );
    assert_eq!(
        next_event(&mut w).await.r#type(),
        pb::WatchEventType::Revoked
    );
    cache_event(&mut events, "REVOKED v2", |e| {
        changed(e, pb::WatchEventType::Revoked, 2)
    })
    .await;
    let err = cache.get(name).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err}");

    let m = describe(&mut admin, name).await.unwrap();
    assert!(
        m.revoked && m.revoke_reason.contains("compromised"),
        "{m:?}"
    );
    assert!(m
        .versions
        .iter()
        .all(|v| v.state() == pb::VersionState::Revoked));
    // Nothing brings it back, and it takes no new version.
    expect_code(
        admin
            .set_version_state(state_req(name, 2, pb::VersionState::Primary))
            .await,
        Code::FailedPrecondition,
        "promote a revoked version",
    );
    expect_code(
        admin.put_secret(crate::put_req(name, b"three")).await,
        Code::FailedPrecondition,
        "put onto a revoked secret",
    );
    expect_code(
        admin.rotate_secret(rotate_req(name, b"three", None)).await,
        Code::FailedPrecondition,
        "rotate a revoked secret",
    );
    assert_eq!(
        describe(&mut admin, name).await.unwrap(),
        m,
        "refusals changed it"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduled_rotation_fires_when_due() {
    let s = TestServer::start_with_test_clock();
    let mut c = s.raw_client("admin").await;
    let k1 = ok(
        c.issue_key(pb::IssueKeyRequest {
            name: "sched/key".into(),
            rotation_period: secs(3600),
            default_grace_period: secs(600),
            ..Default::default()
        })
        .await,
        "issue with a schedule",
    );
    ok(
        c.put_secret(pb::PutSecretRequest {
            rotation_period: secs(3600),
            ..crate::put_req("sched/db", b"static one")
        })
        .await,
        "put with a schedule",
    );
    let m = describe(&mut c, "sched/key").await.unwrap();
    assert_eq!(m.rotation_period, secs(3600));
    assert!(m.next_rotation_time.is_some() && !m.rotation_due);

    let mut w = watch(&mut c, &[], "sched/", &[]).await;
    let first = until_synced(&mut w).await;
    assert_eq!(
        summary(&first),
        [
            (pb::WatchEventType::Rotated, "sched/db".into(), 1),
            (pb::WatchEventType::Rotated, "sched/key".into(), 1),
            (pb::WatchEventType::Synced, String::new(), 0),
        ]
    );

    s.advance_clock(Duration::from_secs(3600));
    let (mut rotated, mut due) = (false, false);
    while !(rotated && due) {
        let e = next_event(&mut w).await;
        match (e.r#type(), e.name.as_str()) {
            (pb::WatchEventType::Rotated, "sched/key") => {
                assert_eq!(e.version, 2);
                rotated = true;
            }
            (pb::WatchEventType::RotationDue, "sched/db") => due = true,
            (pb::WatchEventType::StateChanged, "sched/key") => assert_eq!(e.version, 1),
            other => panic!("unexpected event {other:?}: {e:?}"),
        }
    }
    // The new key works and is a real key; the old one overlaps for the secret's grace.
    let new = fetch(&mut c, "sched/key", 0).await.unwrap();
    assert_eq!(new.version, 2);
    let text = String::from_utf8(new.value).unwrap();
    ApiKey::parse(&text).expect("the scheduled key is well-formed");
    assert_ne!(text, k1.api_key);
    let old = fetch(&mut c, "sched/key", 1).await.unwrap();
    assert_eq!(
        (old.state(), old.value),
        (pb::VersionState::Active, k1.api_key.clone().into_bytes())
    );
    // Ward never invents a STATIC value: the secret is flagged instead.
    let m = describe(&mut c, "sched/db").await.unwrap();
    assert!(m.rotation_due);
    assert_eq!(m.versions.len(), 1);

    // The old key's grace ends on the clock; watchers hear of it.
    s.advance_clock(Duration::from_secs(600));
    let e = next_event(&mut w).await;
    assert_eq!(
        (e.r#type(), e.name.as_str(), e.version, e.state()),
        (
            pb::WatchEventType::StateChanged,
            "sched/key",
            1,
            pb::VersionState::Inactive
        )
    );
    assert_eq!(e.reason, "grace period ended");

    // A new value clears the flag and restarts the schedule.
    ok(
        c.rotate_secret(rotate_req("sched/db", b"static two", None))
            .await,
        "rotate the STATIC secret",
    );
    let m = describe(&mut c, "sched/db").await.unwrap();
    assert!(!m.rotation_due);
    assert!(m.next_rotation_time.unwrap().seconds > new.create_time.unwrap().seconds);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnecting_watcher_ends_up_with_the_current_versions() {
    let s = TestServer::start();
    let mut admin = s.raw_client("admin").await;
    let mut app = s.raw_client("app").await;
    let name = "watch/a";
    put(&mut admin, name, b"v1").await;

    let mut w = watch(&mut app, &[name], "", &[]).await;
    let first = until_synced(&mut w).await;
    assert_eq!(
        summary(&first)[0],
        (pb::WatchEventType::Rotated, name.into(), 1)
    );
    drop(w);

    // While the client is away: two rotations, a revocation and a destruction.
    ok(
        admin.rotate_secret(rotate_req(name, b"v2", None)).await,
        "v2",
    );
    ok(
        admin.rotate_secret(rotate_req(name, b"v3", None)).await,
        "v3",
    );
    ok(
        admin.revoke_secret(revoke_req(name, 1, "old")).await,
        "revoke v1",
    );
    ok(
        admin.destroy_version(destroy_req(name, 2, 0)).await,
        "destroy v2",
    );

    // It comes back saying what it holds, and learns exactly what it needs.
    let mut w = watch(
        &mut app,
        &[name],
        "",
        &[(name, 1, pb::VersionState::Primary)],
    )
    .await;
    let events = until_synced(&mut w).await;
    assert_eq!(
        summary(&events),
        [
            (pb::WatchEventType::Revoked, name.into(), 1),
            (pb::WatchEventType::Rotated, name.into(), 3),
            (pb::WatchEventType::Synced, String::new(), 0),
        ]
    );
    let current = events[1].secret.as_ref().expect("metadata");
    assert_eq!(current.primary_version, 3);
    assert!(current.owner.is_empty(), "watchers get no owner");
    assert_value(&mut app, name, current.primary_version, b"v3").await;

    // Then changes stream live.
    ok(
        admin.rotate_secret(rotate_req(name, b"v4", Some(0))).await,
        "v4",
    );
    let mut live = vec![next_event(&mut w).await, next_event(&mut w).await];
    live.sort_by_key(|e| e.version);
    assert_eq!(
        summary(&live),
        [
            (pb::WatchEventType::StateChanged, name.into(), 3),
            (pb::WatchEventType::Rotated, name.into(), 4),
        ]
    );

    // Watching needs read on each named secret; bad requests are refused up front.
    let stranger = s.issue_dev_cert("stranger", None);
    let mut stranger = s.raw_client_with(&stranger).await.unwrap();
    expect_code(
        stranger
            .watch_secrets(pb::WatchSecretsRequest {
                names: vec![name.into()],
                ..Default::default()
            })
            .await,
        Code::PermissionDenied,
        "watch without read",
    );
    for (what, req) in [
        (
            "bad name",
            pb::WatchSecretsRequest {
                names: vec!["Bad Name".into()],
                ..Default::default()
            },
        ),
        (
            "names and prefix",
            pb::WatchSecretsRequest {
                names: vec![name.into()],
                name_prefix: "watch/".into(),
                ..Default::default()
            },
        ),
        (
            "held version 0",
            pb::WatchSecretsRequest {
                names: vec![name.into()],
                held: vec![pb::HeldSecret {
                    name: name.into(),
                    versions: vec![pb::HeldVersion {
                        version: 0,
                        state: 0,
                    }],
                }],
                ..Default::default()
            },
        ),
    ] {
        expect_code(app.watch_secrets(req).await, Code::InvalidArgument, what);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destroyed_versions_are_unrecoverable_and_still_described() {
    let mut s = TestServer::start();
    let mut c = s.raw_client("admin").await;
    let name = "gone/db";
    let canary = format!("DESTROY-CANARY-{}", random_hex(32));
    put(&mut c, name, canary.as_bytes()).await;
    put(&mut c, name, b"keep").await;
    ok(
        c.rotate_secret(rotate_req(name, b"third", None)).await,
        "v3",
    );

    // Destroying the PRIMARY needs a successor; nothing changes without one.
    let before = describe(&mut c, name).await.unwrap();
    expect_code(
        c.destroy_version(destroy_req(name, 3, 0)).await,
        Code::FailedPrecondition,
        "destroy the PRIMARY alone",
    );
    assert_eq!(describe(&mut c, name).await.unwrap(), before);

    let d = ok(
        c.destroy_version(destroy_req(name, 1, 0)).await,
        "destroy v1",
    );
    assert_eq!((d.version, d.primary_version), (1, 3));
    let msg = expect_code(
        fetch(&mut c, name, 1).await,
        Code::FailedPrecondition,
        "fetch destroyed",
    );
    assert!(msg.contains("DESTROYED"), "{msg}");
    let d = ok(
        c.destroy_version(destroy_req(name, 3, 2)).await,
        "destroy the PRIMARY, v2 succeeding",
    );
    assert_eq!(d.primary_version, 2);
    assert_value(&mut c, name, 0, b"keep").await;
    expect_code(
        c.destroy_version(destroy_req(name, 1, 0)).await,
        Code::FailedPrecondition,
        "destroy twice",
    );
    let m = describe(&mut c, name).await.unwrap();
    let states: Vec<_> = m.versions.iter().map(|v| v.state()).collect();
    assert_eq!(
        states,
        [
            pb::VersionState::Destroyed,
            pb::VersionState::Primary,
            pb::VersionState::Destroyed
        ]
    );
    assert_eq!(m.versions[0].state_reason, "destroyed by admin");
    assert_eq!(
        m.versions[0].fingerprint.len(),
        32,
        "metadata kept for the record"
    );
    drop(c);

    // The sealed values (wrapped data key and ciphertext) are gone from the store, and stay
    // gone after a restart. (sled may keep the removed bytes in a log segment until it
    // rewrites that segment; they are still sealed under the keyring. docs/security.md.)
    s.stop();
    {
        let db = ward_tests::open_stopped_db(s.data_dir());
        let versions = db.open_tree("versions").unwrap();
        let key = |v: u64| {
            let mut k = name.as_bytes().to_vec();
            k.push(0);
            k.extend_from_slice(&v.to_be_bytes());
            k
        };
        assert!(
            versions.get(key(1)).unwrap().is_none(),
            "v1 sealed value kept"
        );
        assert!(
            versions.get(key(3)).unwrap().is_none(),
            "v3 sealed value kept"
        );
        assert!(versions.get(key(2)).unwrap().is_some());
    }
    assert!(
        files_containing(s.data_dir(), canary.as_bytes()).is_empty(),
        "plaintext on disk"
    );
    s.restart();
    let mut c = s.raw_client("admin").await;
    expect_code(
        fetch(&mut c, name, 1).await,
        Code::FailedPrecondition,
        "destroyed after restart",
    );
    assert_value(&mut c, name, 0, b"keep").await;
}
