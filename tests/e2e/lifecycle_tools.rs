//! Key lifecycle, continued: bad input (exact codes, nothing changed), the SDK cache while the
//! server is away, and the lifecycle through `wardctl` and `grpcurl`.

use std::process::Output;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use tokio::sync::broadcast;
use tonic::Code;
use ward::keyformat::ApiKey;
use ward_client::{Cache, CacheConfig, CacheEvent, TimeSource};
use ward_tests::{expect_code, ok, pb, RawClient, TestServer};

use crate::lifecycle::{destroy_req, revoke_req, rotate_req, secs, state_req};
use crate::{assert_value, describe, fetch, put, put_req};

/// Every secret's full metadata: equal snapshots mean nothing changed (update times, states,
/// reasons, versions).
async fn snapshot(c: &mut RawClient, names: &[&str]) -> Vec<pb::SecretMetadata> {
    let mut out = Vec::new();
    for n in names {
        out.push(describe(c, n).await.expect("describe"));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_bad_input_gets_a_clear_status_and_changes_nothing() {
    let s = TestServer::start();
    let mut c = s.raw_client("admin").await;
    let mut app = s.raw_client("app").await;
    // st: v1 INACTIVE, v2 REVOKED, v3 ACTIVE, v4 PRIMARY. key: an API key. gone: revoked.
    for v in ["one", "two", "three", "four"] {
        put(&mut c, "bad/st", v.as_bytes()).await;
    }
    ok(
        c.set_version_state(state_req("bad/st", 1, pb::VersionState::Inactive))
            .await,
        "retire v1",
    );
    ok(
        c.revoke_secret(revoke_req("bad/st", 2, "test")).await,
        "revoke v2",
    );
    ok(
        c.issue_key(pb::IssueKeyRequest {
            name: "bad/key".into(),
            ..Default::default()
        })
        .await,
        "issue",
    );
    put(&mut c, "bad/gone", b"x").await;
    ok(
        c.revoke_secret(revoke_req("bad/gone", 0, "test")).await,
        "revoke all",
    );
    let names = ["bad/st", "bad/key", "bad/gone"];
    let before = snapshot(&mut c, &names).await;

    let dur = |seconds: i64, nanos: i32| Some(prost_types::Duration { seconds, nanos });
    let rot = |name: &str, value: &[u8]| rotate_req(name, value, None);
    let with_grace = |g: Option<prost_types::Duration>| pb::RotateSecretRequest {
        grace_period: g,
        ..rot("bad/st", b"five")
    };
    let with_expiry = |e: pb::rotate_secret_request::Expiration| pb::RotateSecretRequest {
        expiration: Some(e),
        ..rot("bad/st", b"five")
    };
    let rotations: Vec<(&str, pb::RotateSecretRequest, Code)> = vec![
        (
            "rotate a missing secret",
            rot("bad/none", b"v"),
            Code::NotFound,
        ),
        (
            "rotate a revoked secret",
            rot("bad/gone", b"v"),
            Code::FailedPrecondition,
        ),
        (
            "a value for an API key",
            rot("bad/key", b"v"),
            Code::InvalidArgument,
        ),
        (
            "no value for a STATIC secret",
            rot("bad/st", b""),
            Code::InvalidArgument,
        ),
        (
            "negative grace",
            with_grace(dur(-1, 0)),
            Code::InvalidArgument,
        ),
        (
            "negative grace nanos",
            with_grace(dur(0, -5)),
            Code::InvalidArgument,
        ),
        (
            "absurd grace",
            with_grace(dur(366 * 86_400, 0)),
            Code::InvalidArgument,
        ),
        (
            "malformed nanos",
            with_grace(dur(1, 2_000_000_000)),
            Code::InvalidArgument,
        ),
        (
            "expiry in the past",
            with_expiry(pb::rotate_secret_request::Expiration::ExpireTime(
                prost_types::Timestamp {
                    seconds: 1_000_000_000,
                    nanos: 0,
                },
            )),
            Code::InvalidArgument,
        ),
        (
            "negative ttl",
            with_expiry(pb::rotate_secret_request::Expiration::Ttl(
                prost_types::Duration {
                    seconds: -60,
                    nanos: 0,
                },
            )),
            Code::InvalidArgument,
        ),
        (
            "stale expected_version",
            pb::RotateSecretRequest {
                expected_version: Some(3),
                ..rot("bad/st", b"five")
            },
            Code::Aborted,
        ),
        (
            "oversized value",
            rot("bad/st", &vec![1u8; 64 * 1024 + 1]),
            Code::InvalidArgument,
        ),
        ("bad name", rot("Bad Name", b"v"), Code::InvalidArgument),
    ];
    for (what, req, code) in rotations {
        expect_code(c.rotate_secret(req).await, code, what);
        assert_eq!(
            snapshot(&mut c, &names).await,
            before,
            "{what} changed something"
        );
    }
    expect_code(
        app.rotate_secret(rot("bad/st", b"five")).await,
        Code::PermissionDenied,
        "rotate without the verb",
    );

    let set = |version: u64, state: i32| pb::SetVersionStateRequest {
        name: "bad/st".into(),
        version,
        state,
        ..Default::default()
    };
    use pb::VersionState as S;
    let states: Vec<(&str, pb::SetVersionStateRequest, Code)> = vec![
        (
            "promote a REVOKED version",
            set(2, S::Primary as i32),
            Code::FailedPrecondition,
        ),
        (
            "re-activate a REVOKED version",
            set(2, S::Active as i32),
            Code::FailedPrecondition,
        ),
        (
            "promote an INACTIVE version",
            set(1, S::Primary as i32),
            Code::FailedPrecondition,
        ),
        (
            "retire the PRIMARY",
            set(4, S::Inactive as i32),
            Code::FailedPrecondition,
        ),
        (
            "ACTIVE on the PRIMARY",
            set(4, S::Active as i32),
            Code::FailedPrecondition,
        ),
        (
            "state REVOKED",
            set(3, S::Revoked as i32),
            Code::InvalidArgument,
        ),
        (
            "state DESTROYED",
            set(3, S::Destroyed as i32),
            Code::InvalidArgument,
        ),
        ("state UNSPECIFIED", set(3, 0), Code::InvalidArgument),
        ("unknown state", set(3, 42), Code::InvalidArgument),
        ("version 0", set(0, S::Active as i32), Code::InvalidArgument),
        ("missing version", set(99, S::Active as i32), Code::NotFound),
        (
            "ACTIVE with grace 0",
            pb::SetVersionStateRequest {
                grace_period: secs(0),
                ..set(3, S::Active as i32)
            },
            Code::InvalidArgument,
        ),
        (
            "INACTIVE with a grace",
            pb::SetVersionStateRequest {
                grace_period: secs(60),
                ..set(3, S::Inactive as i32)
            },
            Code::InvalidArgument,
        ),
        (
            "state on a revoked secret",
            pb::SetVersionStateRequest {
                name: "bad/gone".into(),
                ..set(1, S::Active as i32)
            },
            Code::FailedPrecondition,
        ),
    ];
    for (what, req, code) in states {
        expect_code(c.set_version_state(req).await, code, what);
        assert_eq!(
            snapshot(&mut c, &names).await,
            before,
            "{what} changed something"
        );
    }

    let destroys: Vec<(&str, pb::DestroyVersionRequest, Code)> = vec![
        (
            "destroy the PRIMARY without a successor",
            destroy_req("bad/st", 4, 0),
            Code::FailedPrecondition,
        ),
        (
            "an INACTIVE successor",
            destroy_req("bad/st", 4, 1),
            Code::FailedPrecondition,
        ),
        (
            "a REVOKED successor",
            destroy_req("bad/st", 4, 2),
            Code::FailedPrecondition,
        ),
        (
            "itself as successor",
            destroy_req("bad/st", 4, 4),
            Code::InvalidArgument,
        ),
        (
            "a successor for a non-PRIMARY",
            destroy_req("bad/st", 3, 1),
            Code::InvalidArgument,
        ),
        (
            "a missing successor",
            destroy_req("bad/st", 4, 9),
            Code::NotFound,
        ),
        (
            "version 0",
            destroy_req("bad/st", 0, 0),
            Code::InvalidArgument,
        ),
        (
            "a missing version",
            destroy_req("bad/st", 9, 0),
            Code::NotFound,
        ),
        (
            "a missing secret",
            destroy_req("bad/none", 1, 0),
            Code::NotFound,
        ),
    ];
    for (what, req, code) in destroys {
        expect_code(c.destroy_version(req).await, code, what);
        assert_eq!(
            snapshot(&mut c, &names).await,
            before,
            "{what} changed something"
        );
    }
    expect_code(
        app.destroy_version(destroy_req("bad/st", 3, 0)).await,
        Code::PermissionDenied,
        "destroy without the verb",
    );

    let revokes: Vec<(&str, pb::RevokeSecretRequest, Code)> = vec![
        (
            "no reason",
            revoke_req("bad/st", 3, ""),
            Code::InvalidArgument,
        ),
        (
            "a reason with a newline",
            revoke_req("bad/st", 3, "a\nb"),
            Code::InvalidArgument,
        ),
        (
            "an overlong reason",
            revoke_req("bad/st", 3, &"r".repeat(257)),
            Code::InvalidArgument,
        ),
        (
            "neither version nor all",
            pb::RevokeSecretRequest {
                all_versions: false,
                ..revoke_req("bad/st", 0, "r")
            },
            Code::InvalidArgument,
        ),
        (
            "version and all",
            pb::RevokeSecretRequest {
                all_versions: true,
                ..revoke_req("bad/st", 3, "r")
            },
            Code::InvalidArgument,
        ),
        (
            "the PRIMARY alone",
            revoke_req("bad/st", 4, "r"),
            Code::FailedPrecondition,
        ),
        (
            "twice",
            revoke_req("bad/st", 2, "r"),
            Code::FailedPrecondition,
        ),
        (
            "a revoked secret again",
            revoke_req("bad/gone", 0, "r"),
            Code::FailedPrecondition,
        ),
        (
            "a missing version",
            revoke_req("bad/st", 9, "r"),
            Code::NotFound,
        ),
        (
            "a missing secret",
            revoke_req("bad/none", 1, "r"),
            Code::NotFound,
        ),
    ];
    for (what, req, code) in revokes {
        expect_code(c.revoke_secret(req).await, code, what);
        assert_eq!(
            snapshot(&mut c, &names).await,
            before,
            "{what} changed something"
        );
    }

    // Lifecycle fields of PutSecret and IssueKey are checked the same way.
    let puts: Vec<(&str, pb::PutSecretRequest)> = vec![
        (
            "rotation period under a minute",
            pb::PutSecretRequest {
                rotation_period: secs(10),
                ..put_req("bad/st", b"five")
            },
        ),
        (
            "negative default grace",
            pb::PutSecretRequest {
                default_grace_period: secs(-1),
                ..put_req("bad/st", b"five")
            },
        ),
        (
            "secret expiry in the past",
            pb::PutSecretRequest {
                expiration: Some(pb::put_secret_request::Expiration::ExpireTime(
                    prost_types::Timestamp {
                        seconds: 5,
                        nanos: 0,
                    },
                )),
                ..put_req("bad/st", b"five")
            },
        ),
    ];
    for (what, req) in puts {
        expect_code(c.put_secret(req).await, Code::InvalidArgument, what);
        assert_eq!(
            snapshot(&mut c, &names).await,
            before,
            "{what} changed something"
        );
    }
    expect_code(
        c.issue_key(pb::IssueKeyRequest {
            name: "bad/new-key".into(),
            rotation_period: secs(3650 * 86_400 + 1),
            ..Default::default()
        })
        .await,
        Code::InvalidArgument,
        "absurd rotation period",
    );
    expect_code(
        describe(&mut c, "bad/new-key").await,
        Code::NotFound,
        "refused IssueKey created nothing",
    );
}

/// A monotonic clock the test moves by hand.
struct ManualTime {
    base: Instant,
    offset: Mutex<Duration>,
}

impl ManualTime {
    fn advance(&self, d: Duration) {
        *self.offset.lock().unwrap() += d;
    }
}

impl TimeSource for ManualTime {
    fn now(&self) -> Instant {
        self.base + *self.offset.lock().unwrap()
    }
}

async fn wait_for(
    rx: &mut broadcast::Receiver<CacheEvent>,
    what: &str,
    want: impl Fn(&CacheEvent) -> bool,
) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Ok(e)) if want(&e) => return,
            Ok(Ok(_)) | Ok(Err(broadcast::error::RecvError::Lagged(_))) => {}
            Ok(Err(e)) => panic!("cache events closed waiting for {what}: {e}"),
            Err(_) => panic!("no cache event {what} within 15 s"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_cache_follows_rotation_and_serves_offline_for_a_bounded_time() {
    let mut s = TestServer::start();
    let mut admin = s.raw_client("admin").await;
    let name = "cache/db";
    put(&mut admin, name, b"one").await;

    let time = Arc::new(ManualTime {
        base: Instant::now(),
        offset: Mutex::new(Duration::ZERO),
    });
    let cfg = CacheConfig::new()
        .with_max_stale(Duration::from_secs(30))
        .with_time_source(time.clone())
        .with_reconnect_backoff(Duration::from_millis(20), Duration::from_millis(200));
    let cache = Cache::new(s.client("app").await, cfg);
    let mut events = cache.subscribe();
    assert_eq!(cache.get(name).await.unwrap().value(), b"one");
    wait_for(&mut events, "Synced", |e| matches!(e, CacheEvent::Synced)).await;
    assert!(cache.is_synced());

    // A rotation reaches the application by itself: no polling, no restart.
    ok(
        admin
            .rotate_secret(rotate_req(name, b"two", Some(3600)))
            .await,
        "rotate",
    );
    wait_for(&mut events, "ROTATED 2", |e| {
        matches!(e, CacheEvent::Changed(ev) if ev.r#type() == pb::WatchEventType::Rotated && ev.version == 2)
    })
    .await;
    let got = cache.get(name).await.unwrap();
    assert_eq!((got.version, got.value()), (2, &b"two"[..]));
    assert_eq!(cache.get_version(name, 1).await.unwrap().value(), b"one");

    // The server goes away: what the cache holds is served, for max_stale and no longer.
    drop(admin);
    s.stop();
    wait_for(&mut events, "Disconnected", |e| {
        matches!(e, CacheEvent::Disconnected(_))
    })
    .await;
    assert!(!cache.is_synced());
    assert_eq!(cache.get(name).await.unwrap().value(), b"two");
    time.advance(Duration::from_secs(29));
    assert_eq!(cache.get(name).await.unwrap().value(), b"two");
    time.advance(Duration::from_secs(2));
    let err = cache.get(name).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err}");
    assert!(matches!(err, ward_client::Error::Stale(_)), "{err:?}");
    assert!(err.to_string().contains("max_stale"), "{err}");
    // A name it never held is the server's error as usual.
    assert!(!matches!(
        cache.get("cache/other").await.unwrap_err(),
        ward_client::Error::Stale(_)
    ));

    // The server is back: the cache reconnects, resends what it holds, and serves again.
    s.restart_on_same_port();
    wait_for(&mut events, "Synced again", |e| {
        matches!(e, CacheEvent::Synced)
    })
    .await;
    assert_eq!(cache.get(name).await.unwrap().value(), b"two");
    let mut admin = s.raw_client("admin").await;
    let mut req = revoke_req(name, 2, "bad build");
    req.successor_version = 1;
    ok(admin.revoke_secret(req).await, "revoke v2, v1 succeeding");
    wait_for(
        &mut events,
        "REVOKED 2",
        |e| matches!(e, CacheEvent::Changed(ev) if ev.r#type() == pb::WatchEventType::Revoked),
    )
    .await;
    let got = cache.get(name).await.unwrap();
    assert_eq!((got.version, got.value()), (1, &b"one"[..]));
    assert_eq!(
        cache.get_version(name, 2).await.unwrap_err().code(),
        Code::FailedPrecondition
    );
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn success(o: &Output, what: &str) -> String {
    assert!(
        o.status.success(),
        "{what}: exit {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        o.status,
        stdout(o),
        stderr(o)
    );
    stdout(o)
}

fn failure(o: &Output, exit: i32, code: &str, what: &str) {
    assert_eq!(o.status.code(), Some(exit), "{what}: {}", stderr(o));
    assert!(stderr(o).contains(code), "{what}: {}", stderr(o));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wardctl_lifecycle_commands() {
    let s = TestServer::start();
    let mut c = s.raw_client("admin").await;

    // An API key with a schedule, rotated by hand: the new key alone on stdout.
    let out = success(
        &s.wardctl(
            &[
                "issue",
                "cli/key",
                "--rotation-period",
                "30d",
                "--default-grace",
                "1h",
            ],
            None,
        ),
        "issue",
    );
    let k1 = out.trim().to_owned();
    let m = describe(&mut c, "cli/key").await.unwrap();
    assert_eq!(m.rotation_period, secs(30 * 86_400));
    assert_eq!(m.default_grace_period, secs(3600));
    let o = s.wardctl(&["rotate", "cli/key"], None);
    let k2 = success(&o, "rotate key").trim().to_owned();
    ApiKey::parse(&k2).expect("rotate prints the new key");
    assert_ne!(k1, k2);
    assert!(
        stderr(&o).contains("version 1 stays ACTIVE until"),
        "{}",
        stderr(&o)
    );
    assert_value(&mut c, "cli/key", 0, k2.as_bytes()).await;
    assert_value(&mut c, "cli/key", 1, k1.as_bytes()).await;

    // STATIC: the value on stdin.
    success(&s.wardctl(&["put", "cli/db"], Some(b"one")), "put");
    let out = success(
        &s.wardctl(&["rotate", "cli/db", "--grace", "0"], Some(b"two")),
        "rotate static",
    );
    assert!(
        out.starts_with("cli/db version 2 ") && out.contains("version 1 retired"),
        "{out}"
    );
    assert_value(&mut c, "cli/db", 0, b"two").await;
    let j: serde_json::Value = serde_json::from_str(&success(
        &s.wardctl(&["--json", "rotate", "cli/db"], Some(b"three")),
        "rotate --json",
    ))
    .unwrap();
    assert_eq!(
        (j["version"].as_u64(), j["previous_version"].as_u64()),
        (Some(3), Some(2))
    );
    assert!(j.get("api_key").is_none(), "{j}");

    // state: roll back to 2, retire 3.
    let out = success(
        &s.wardctl(&["state", "cli/db", "2", "primary"], None),
        "rollback",
    );
    assert_eq!(
        out.trim(),
        "cli/db version 2 is PRIMARY; primary now version 2"
    );
    success(
        &s.wardctl(&["state", "cli/db", "3", "inactive"], None),
        "retire 3",
    );

    // watch --once: what differs from what I hold, then SYNCED.
    let out = success(
        &s.wardctl(
            &["watch", "cli/db", "--held", "cli/db@3:primary", "--once"],
            None,
        ),
        "watch --once",
    );
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines,
        [
            "ROTATED\tcli/db\t2\tPRIMARY\tset by admin",
            "STATE_CHANGED\tcli/db\t3\tINACTIVE\tset by admin",
            "SYNCED\t\t0\tUNSPECIFIED\t",
        ],
        "{out}"
    );
    let out = success(
        &s.wardctl(&["--json", "watch", "--prefix", "cli/", "--once"], None),
        "watch --json",
    );
    let types: Vec<String> = out
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).expect("one JSON object per line");
            v["type"].as_str().unwrap().to_owned()
        })
        .collect();
    assert_eq!(types, ["ROTATED", "ROTATED", "SYNCED"]);

    // revoke and destroy.
    let out = success(
        &s.wardctl(
            &[
                "revoke",
                "cli/db",
                "--version",
                "1",
                "--reason",
                "rotated out",
            ],
            None,
        ),
        "revoke",
    );
    assert!(
        out.contains("revoked version(s) 1; primary now version 2"),
        "{out}"
    );
    success(&s.wardctl(&["destroy", "cli/db", "3"], None), "destroy");
    let out = success(&s.wardctl(&["describe", "cli/db"], None), "describe");
    for want in [
        "REVOKED",
        "DESTROYED",
        "revoked by admin: rotated out",
        "NOTE",
    ] {
        assert!(out.contains(want), "describe lacks {want:?}:\n{out}");
    }
    assert_code_states(&mut c).await;

    // Failures: exit 1 with the server's code, 2 for usage; nothing changes.
    let before = describe(&mut c, "cli/db").await.unwrap();
    failure(
        &s.wardctl(&["destroy", "cli/db", "2"], None),
        1,
        "FAILED_PRECONDITION",
        "destroy PRIMARY",
    );
    failure(
        &s.wardctl(&["rotate", "cli/key"], Some(b"x")),
        1,
        "INVALID_ARGUMENT",
        "value for a key",
    );
    failure(
        &s.wardctl(&["rotate", "cli/db"], None),
        1,
        "INVALID_ARGUMENT",
        "no value",
    );
    failure(
        &s.wardctl(&["revoke", "cli/db", "--version", "2"], None),
        2,
        "--reason",
        "no reason",
    );
    failure(
        &s.wardctl(&["state", "cli/db", "1", "revoked"], None),
        2,
        "revoke",
        "state revoked",
    );
    failure(
        &s.wardctl_as("app", &["revoke", "cli/db", "--all", "--reason", "x"], None),
        1,
        "PERMISSION_DENIED",
        "app revokes",
    );
    assert_eq!(describe(&mut c, "cli/db").await.unwrap(), before);
}

async fn assert_code_states(c: &mut RawClient) {
    let m = describe(c, "cli/db").await.unwrap();
    let states: Vec<_> = m.versions.iter().map(|v| v.state()).collect();
    use pb::VersionState as S;
    assert_eq!(states, [S::Revoked, S::Primary, S::Destroyed]);
    expect_code(fetch(c, "cli/db", 1).await, Code::FailedPrecondition, "v1");
}

fn b64(data: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(data)
}

/// grpcurl prints each message of a stream as its own JSON document.
fn json_docs(o: &Output, what: &str) -> Vec<serde_json::Value> {
    let out = success(o, what);
    serde_json::Deserializer::from_str(&out)
        .into_iter::<serde_json::Value>()
        .map(|d| d.unwrap_or_else(|e| panic!("{what}: not JSON ({e}):\n{out}")))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcurl_lifecycle_through_reflection() {
    let s = TestServer::start();
    let methods = success(
        &s.grpcurl(&[], &["describe", "ward.v1.Secrets"]),
        "describe",
    );
    for m in [
        "RotateSecret",
        "RevokeSecret",
        "SetVersionState",
        "DestroyVersion",
        "WatchSecrets",
    ] {
        assert!(methods.contains(m), "{m} not described:\n{methods}");
    }
    let mut c = s.raw_client("admin").await;
    put(&mut c, "ops/db", b"one").await;

    let call = |method: &str, body: serde_json::Value| {
        json_docs(
            &s.grpcurl(
                &["-d", &body.to_string()],
                &[&format!("ward.v1.Secrets/{method}")],
            ),
            method,
        )
    };
    let r = &call(
        "RotateSecret",
        serde_json::json!({"name": "ops/db", "value": b64(b"two"), "gracePeriod": "3600s"}),
    )[0];
    assert_eq!(
        (r["version"].as_str(), r["previousVersion"].as_str()),
        (Some("2"), Some("1")),
        "{r}"
    );
    assert!(r["previousGraceUntil"].is_string(), "{r}");
    assert_value(&mut c, "ops/db", 0, b"two").await;

    let r = &call(
        "SetVersionState",
        serde_json::json!({"name": "ops/db", "version": 1, "state": "VERSION_STATE_INACTIVE"}),
    )[0];
    assert_eq!(r["state"], "VERSION_STATE_INACTIVE", "{r}");

    let r = &call(
        "RevokeSecret",
        serde_json::json!({"name": "ops/db", "version": 1, "reason": "grpcurl test"}),
    )[0];
    assert_eq!(r["revokedVersions"], serde_json::json!(["1"]), "{r}");

    let events = call(
        "WatchSecrets",
        serde_json::json!({
            "names": ["ops/db"],
            "held": [{"name": "ops/db", "versions": [{"version": 1, "state": "VERSION_STATE_ACTIVE"}]}],
            "syncOnly": true
        }),
    );
    let types: Vec<(&str, &str)> = events
        .iter()
        .map(|e| {
            (
                e["type"].as_str().unwrap(),
                e["version"].as_str().unwrap_or("0"),
            )
        })
        .collect();
    assert_eq!(
        types,
        [
            ("WATCH_EVENT_TYPE_REVOKED", "1"),
            ("WATCH_EVENT_TYPE_ROTATED", "2"),
            ("WATCH_EVENT_TYPE_SYNCED", "0")
        ]
    );
    assert_eq!(events[0]["reason"], "revoked by admin: grpcurl test");

    let r = &call(
        "DestroyVersion",
        serde_json::json!({"name": "ops/db", "version": 1}),
    )[0];
    assert_eq!(r["primaryVersion"], "2", "{r}");
    let refused = s.grpcurl(
        &["-d", r#"{"name":"ops/db","version":2}"#],
        &["ward.v1.Secrets/DestroyVersion"],
    );
    assert!(!refused.status.success());
    assert!(
        stderr(&refused).contains("FailedPrecondition"),
        "{}",
        stderr(&refused)
    );

    // An API key's rotation returns the new key.
    ok(
        c.issue_key(pb::IssueKeyRequest {
            name: "ops/key".into(),
            ..Default::default()
        })
        .await,
        "issue",
    );
    let r = &call("RotateSecret", serde_json::json!({"name": "ops/key"}))[0];
    let key = r["apiKey"]
        .as_str()
        .unwrap_or_else(|| panic!("no apiKey: {r}"));
    ApiKey::parse(key).expect("well-formed key");
    assert_eq!(
        fetch(&mut c, "ops/key", 0).await.unwrap().value,
        key.as_bytes()
    );
}
