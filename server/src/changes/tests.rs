//! The lifecycle operations against a real vault (sled in a temp dir, in-memory key wrapper,
//! manual clock): the rules end to end inside one process, without the network.

use super::watch::{EventKind, WatchInput};
use crate::audit::AuditRecord;
use crate::clock::ManualClock;
use crate::error::Code;
use crate::model::input::{LifecycleInput, RawDuration, RawExpiration};
use crate::model::{KeyIndexEntry, SecretRecord, VersionState};
use crate::store::sled_store::SledStore;
use crate::store::{decode, version_key, Store, Tree};
use crate::testutil::Followers;
use crate::testutil::{peer, put};
use crate::vault::{DestroyInput, RevokeInput, RotateInput, SetStateInput};
use crate::vault::{IssueInput, Vault};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use ward::keyformat::ApiKey;
use zeroize::Zeroizing;

const H: u64 = 3_600_000;

struct Fixture {
    vault: Arc<Vault>,
    clock: Arc<ManualClock>,
    followers: Followers,
    _dir: tempfile::TempDir,
}

impl Fixture {
    /// One sweeper pass.
    async fn sweep(&self) -> crate::error::Result<Vec<String>> {
        self.followers.sweep.sweep(&self.vault).await
    }
}

async fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(SledStore::open(dir.path()).unwrap());
    let policy = "[[rule]]\nidentities = [\"admin\"]\nverbs = [\"*\"]\nsecrets = [\"*\"]\n\
                  [[rule]]\nidentities = [\"app\"]\nverbs = [\"read\"]\nsecrets = [\"*\"]\n";
    let (vault, clock, followers) =
        crate::testutil::followed_vault_over(store, policy, 24 * H).await;
    Fixture {
        vault,
        clock,
        followers,
        _dir: dir,
    }
}

fn secs(s: i64) -> Option<RawDuration> {
    Some(RawDuration {
        seconds: s,
        nanos: 0,
    })
}

fn issue(name: &str, lifecycle: LifecycleInput) -> IssueInput {
    IssueInput {
        name: name.into(),
        environment: String::new(),
        owner: String::new(),
        scopes: Vec::new(),
        labels: BTreeMap::new(),
        description: String::new(),
        request_id: String::new(),
        lifecycle,
    }
}

fn rotate(name: &str, value: &[u8], grace: Option<RawDuration>) -> RotateInput {
    RotateInput {
        name: name.into(),
        value: Zeroizing::new(value.to_vec()),
        grace_period: grace,
        expiration: None,
        expected_version: None,
        request_id: String::new(),
    }
}

fn revoke(name: &str, version: u64, all: bool) -> RevokeInput {
    RevokeInput {
        name: name.into(),
        version,
        all_versions: all,
        reason: "leaked in a log".into(),
        successor_version: 0,
        expected_version: None,
        request_id: String::new(),
    }
}

impl Fixture {
    fn record(&self, name: &str) -> SecretRecord {
        let raw = self
            .vault
            .store
            .get(Tree::Secrets, name.as_bytes())
            .unwrap()
            .unwrap();
        decode("secret", &raw).unwrap()
    }

    /// What a key verifier does: keyed hash → index entry → the one usability judgement.
    fn verify(&self, key: &ApiKey) -> Result<u64, Code> {
        let hash = self.vault.key_hash(key);
        let raw = self
            .vault
            .store
            .get(Tree::KeyIndex, &hash)
            .unwrap()
            .ok_or(Code::NotFound)?;
        let entry: KeyIndexEntry = decode("index", &raw).unwrap();
        let secret = self.record(&entry.name);
        secret
            .usable(entry.version, self.vault.now())
            .map(|(m, _)| m.version)
            .map_err(|e| e.code())
    }

    fn audit(&self) -> Vec<AuditRecord> {
        crate::audit::call_records(self.vault.audit())
    }
}

#[tokio::test]
async fn rotated_api_key_overlaps_for_the_grace_period() {
    let f = fixture().await;
    let admin = peer("admin");
    let k1 = f
        .vault
        .issue(&admin, issue("svc/key", LifecycleInput::default()))
        .await
        .unwrap()
        .key;
    let r = f
        .vault
        .rotate(&admin, rotate("svc/key", b"", secs(3600)))
        .await
        .unwrap();
    let k2 = r.key.expect("a rotated API key comes back");
    assert_ne!(k1.expose(), k2.expose());
    assert_eq!((r.written.version, r.replaced.version), (2, 1));
    assert_eq!(r.replaced.grace_until_ms, Some(f.vault.now() + H));

    // During the window both keys verify and both versions fetch.
    assert_eq!(f.verify(&k1), Ok(1));
    assert_eq!(f.verify(&k2), Ok(2));
    assert_eq!(
        f.vault.fetch(&admin, "svc/key", 1).await.unwrap().state,
        VersionState::Active
    );
    f.clock.advance(H - 1);
    assert_eq!(f.verify(&k1), Ok(1));

    // Afterwards only the new one, without any sweep having run.
    f.clock.advance(1);
    assert_eq!(f.verify(&k1), Err(Code::FailedPrecondition));
    assert_eq!(f.verify(&k2), Ok(2));
    let err = f.vault.fetch(&admin, "svc/key", 1).await.err().unwrap();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.to_string().contains("grace period ended"), "{err}");

    // A value for an API key, none for a STATIC secret: refused, nothing changes.
    f.vault.put(&admin, put("db", b"one")).await.unwrap();
    let before = (f.record("svc/key"), f.record("db"));
    let e = f.vault.rotate(&admin, rotate("svc/key", b"x", None)).await;
    assert_eq!(e.err().unwrap().code(), Code::InvalidArgument);
    let e = f.vault.rotate(&admin, rotate("db", b"", None)).await;
    assert_eq!(e.err().unwrap().code(), Code::InvalidArgument);
    let e = f.vault.rotate(&admin, rotate("db", b"x", secs(-1))).await;
    assert_eq!(e.err().unwrap().code(), Code::InvalidArgument);
    let e = f.vault.rotate(&admin, rotate("nope", b"x", None)).await;
    assert_eq!(e.err().unwrap().code(), Code::NotFound);
    assert_eq!((f.record("svc/key"), f.record("db")), before);
}

#[tokio::test]
async fn idempotent_rotation_returns_the_same_key() {
    let f = fixture().await;
    let admin = peer("admin");
    f.vault
        .issue(&admin, issue("k", LifecycleInput::default()))
        .await
        .unwrap();
    let mut req = rotate("k", b"", None);
    req.request_id = "rot-1".into();
    let a = f.vault.rotate(&admin, req).await.unwrap();
    let mut req = rotate("k", b"", None);
    req.request_id = "rot-1".into();
    let b = f.vault.rotate(&admin, req).await.unwrap();
    assert_eq!(a.key.unwrap().expose(), b.key.unwrap().expose());
    assert_eq!((b.written.version, b.replaced.version), (2, 1));
    assert_eq!(f.record("k").versions.len(), 2);
}

#[tokio::test]
async fn revocation_is_immediate_and_final() {
    let f = fixture().await;
    let admin = peer("admin");
    let k1 = f
        .vault
        .issue(&admin, issue("k", LifecycleInput::default()))
        .await
        .unwrap()
        .key;
    let k2 = f
        .vault
        .rotate(&admin, rotate("k", b"", None))
        .await
        .unwrap()
        .key
        .unwrap();
    f.vault.revoke(&admin, revoke("k", 1, false)).await.unwrap();
    assert_eq!(f.verify(&k1), Err(Code::FailedPrecondition));
    let err = f.vault.fetch(&admin, "k", 1).await.err().unwrap();
    assert!(err.to_string().contains("leaked in a log"), "{err}");
    assert_eq!(f.verify(&k2), Ok(2));

    // Nothing brings it back.
    let set = |state| SetStateInput {
        name: "k".into(),
        version: 1,
        state: Some(state),
        grace_period: None,
        expected_version: None,
        request_id: String::new(),
    };
    for state in [VersionState::Primary, VersionState::Active] {
        let e = f.vault.set_state(&admin, set(state)).await.err().unwrap();
        assert_eq!(e.code(), Code::FailedPrecondition);
    }
    // The PRIMARY alone needs a successor; the whole secret does not.
    let e = f.vault.revoke(&admin, revoke("k", 2, false)).await;
    assert_eq!(e.err().unwrap().code(), Code::FailedPrecondition);
    let done = f.vault.revoke(&admin, revoke("k", 0, true)).await.unwrap();
    assert_eq!((done.revoked, done.primary), (vec![2], 0));
    assert_eq!(f.verify(&k2), Err(Code::FailedPrecondition));
    let e = f.vault.rotate(&admin, rotate("k", b"", None)).await;
    assert_eq!(e.err().unwrap().code(), Code::FailedPrecondition);
    f.record("k").check_invariants().unwrap();
}

#[tokio::test]
async fn destroy_deletes_the_sealed_value_and_keeps_the_metadata() {
    let f = fixture().await;
    let admin = peer("admin");
    f.vault.put(&admin, put("db", b"one")).await.unwrap();
    f.vault.put(&admin, put("db", b"two")).await.unwrap();
    let destroy = |version, successor| DestroyInput {
        name: "db".into(),
        version,
        successor_version: successor,
        expected_version: None,
        request_id: String::new(),
    };
    let e = f.vault.destroy(&admin, destroy(2, 0)).await;
    assert_eq!(e.err().unwrap().code(), Code::FailedPrecondition);
    assert!(f
        .vault
        .store
        .get(Tree::Versions, &version_key("db", 2))
        .unwrap()
        .is_some());
    let done = f.vault.destroy(&admin, destroy(2, 1)).await.unwrap();
    assert_eq!(done.primary, 1);
    assert!(f
        .vault
        .store
        .get(Tree::Versions, &version_key("db", 2))
        .unwrap()
        .is_none());
    let d = f.vault.describe(&admin, "db").await.unwrap();
    assert_eq!(d.versions[1].state, VersionState::Destroyed);
    assert_eq!(
        &f.vault.fetch(&admin, "db", 0).await.unwrap().value[..],
        b"one"
    );
}

#[tokio::test]
async fn sweeper_rotates_keys_flags_static_secrets_and_stores_deadlines() {
    let f = fixture().await;
    let admin = peer("admin");
    let schedule = LifecycleInput {
        rotation_period: secs(3600),
        default_grace_period: secs(600),
        expiration: None,
    };
    let k1 = f
        .vault
        .issue(&admin, issue("svc/key", schedule))
        .await
        .unwrap()
        .key;
    let mut p = put("svc/db", b"one");
    p.lifecycle = schedule;
    f.vault.put(&admin, p).await.unwrap();
    assert!(f.sweep().await.unwrap().is_empty(), "nothing due yet");

    f.clock.advance(H);
    let mut changed = f.sweep().await.unwrap();
    changed.sort();
    assert_eq!(changed, ["svc/db", "svc/key"]);
    let key = f.record("svc/key");
    assert_eq!((key.primary, key.versions.len()), (2, 2));
    assert_eq!(key.life.next_rotation_ms, Some(f.vault.now() + H));
    let k2 = f.vault.fetch(&admin, "svc/key", 0).await.unwrap();
    let k2 = ApiKey::parse(std::str::from_utf8(&k2.value).unwrap()).unwrap();
    assert_eq!(f.verify(&k2), Ok(2));
    assert_eq!(f.verify(&k1), Ok(1), "old key works for the secret's grace");
    let db = f.record("svc/db");
    assert_eq!(db.versions.len(), 1, "Ward never invents a STATIC value");
    assert!(db.life.rotation_due_ms.is_some());
    assert!(f.sweep().await.unwrap().is_empty(), "flagged once");

    // The old key's grace ends: the sweeper stores it, watchers would be told.
    f.clock.advance(600_000);
    assert_eq!(f.sweep().await.unwrap(), ["svc/key"]);
    assert_eq!(
        f.record("svc/key").versions[0].state,
        VersionState::Inactive
    );

    // A new value clears the flag and restarts the schedule.
    f.vault
        .rotate(&admin, rotate("svc/db", b"two", None))
        .await
        .unwrap();
    let db = f.record("svc/db");
    assert_eq!(db.life.rotation_due_ms, None);
    assert_eq!(db.life.next_rotation_ms, Some(f.vault.now() + H));

    let methods: Vec<(String, String)> = f
        .audit()
        .into_iter()
        .filter(|r| r.identity == super::sweeper::SCHEDULER_IDENTITY)
        .map(|r| (r.method, r.targets[0].0.clone()))
        .collect();
    assert!(methods.contains(&("ScheduledRotation".into(), "svc/key".into())));
    assert!(methods.contains(&("RotationDue".into(), "svc/db".into())));
    assert!(methods.contains(&("Sweep".into(), "svc/key".into())));
}

async fn next(
    rx: &mut tokio::sync::mpsc::Receiver<crate::error::Result<super::watch::WatchEvent>>,
) -> super::watch::WatchEvent {
    tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .expect("event in time")
        .expect("stream open")
        .expect("no error")
}

#[tokio::test]
async fn watchers_get_the_difference_then_live_changes() {
    let f = fixture().await;
    let (admin, app) = (peer("admin"), peer("app"));
    f.vault.put(&admin, put("w/a", b"one")).await.unwrap();
    let mut rx = f
        .followers
        .hub
        .watch(
            &f.vault,
            &app,
            WatchInput {
                names: vec!["w/a".into()],
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let e = next(&mut rx).await;
    assert_eq!((e.kind, e.version), (EventKind::Rotated, 1));
    assert_eq!(next(&mut rx).await.kind, EventKind::Synced);

    f.vault
        .rotate(&admin, rotate("w/a", b"two", secs(60)))
        .await
        .unwrap();
    let mut got = [next(&mut rx).await, next(&mut rx).await];
    got.sort_by_key(|e| e.version);
    assert_eq!(
        got.iter().map(|e| (e.kind, e.version)).collect::<Vec<_>>(),
        [(EventKind::StateChanged, 1), (EventKind::Rotated, 2)]
    );
    f.vault
        .revoke(&admin, revoke("w/a", 1, false))
        .await
        .unwrap();
    let e = next(&mut rx).await;
    assert_eq!((e.kind, e.version), (EventKind::Revoked, 1));
    assert_eq!(e.reason, "revoked by admin: leaked in a log");

    // Closing the hub (shutdown) ends the stream with UNAVAILABLE.
    f.followers.hub.close();
    let end = tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(end.err().unwrap().code(), Code::Unavailable);

    // One audit record per watch; a denied watch is audited too.
    let denied = f
        .followers
        .hub
        .watch(
            &f.vault,
            &peer("stranger"),
            WatchInput {
                names: vec!["w/a".into()],
                ..Default::default()
            },
        )
        .await;
    assert_eq!(denied.err().unwrap().code(), Code::PermissionDenied);
    let watches: Vec<i32> = f
        .audit()
        .into_iter()
        .filter(|r| r.method == "WatchSecrets")
        .map(|r| r.code)
        .collect();
    assert_eq!(watches, [0, 7]);
}

#[tokio::test]
async fn sweeps_read_only_secrets_whose_deadline_came_and_learn_of_new_writes() {
    let f = fixture().await;
    let admin = peer("admin");
    for i in 0..50 {
        f.vault
            .put(&admin, put(&format!("plain/{i}"), b"v"))
            .await
            .unwrap();
    }
    let mut p = put("svc/expiring", b"one");
    p.lifecycle.expiration = secs(600).map(RawExpiration::Ttl);
    f.vault.put(&admin, p).await.unwrap();
    assert!(f.sweep().await.unwrap().is_empty(), "nothing due yet");
    assert_eq!(
        f.followers.sweep.len(),
        1,
        "secrets without deadlines are not tracked"
    );

    // Written after the index was built: the write path tells the sweeper.
    let mut p = put("svc/later", b"one");
    p.lifecycle.expiration = secs(300).map(RawExpiration::Ttl);
    f.vault.put(&admin, p).await.unwrap();
    f.vault
        .rotate(&admin, rotate("plain/7", b"w", secs(60)))
        .await
        .unwrap();
    assert!(f.sweep().await.unwrap().is_empty());
    assert_eq!(f.followers.sweep.len(), 3, "new expiry and a grace period");

    f.clock.advance(61_000);
    assert_eq!(f.sweep().await.unwrap(), ["plain/7"]);
    f.clock.advance(240_000);
    assert_eq!(f.sweep().await.unwrap(), ["svc/later"]);
    f.clock.advance(300_000);
    assert_eq!(f.sweep().await.unwrap(), ["svc/expiring"]);
    assert_eq!(
        f.record("svc/expiring").versions[0].state,
        VersionState::Inactive
    );
    assert!(f.sweep().await.unwrap().is_empty(), "settled once");
    assert!(f.followers.sweep.is_empty(), "nothing is pending any more");
}

/// Whenever a pass would change a secret at some time, its indexed deadline is no later than
/// that time: the index never hides work from the sweeper.
#[test]
fn the_deadline_is_never_after_the_settle_or_rotation_it_stands_for() {
    use crate::changes::sweeper::next_deadline;
    use crate::model::{Kind, SecretLife, VersionLife, VersionMeta};
    let base = 1_000_000;
    let mut checked = 0;
    for kind in [Kind::Static, Kind::ApiKey] {
        for secret_expiry in [None, Some(base + 50)] {
            for rotation in [None, Some(base + 30)] {
                for flagged in [false, true] {
                    for (state, grace) in [
                        (VersionState::Primary, None),
                        (VersionState::Active, Some(base + 20)),
                        (VersionState::Active, None),
                        (VersionState::Inactive, None),
                    ] {
                        for version_expiry in [None, Some(base + 40)] {
                            let s = SecretRecord {
                                name: "a/b".into(),
                                kind,
                                environment: "prod".into(),
                                owner: String::new(),
                                labels: BTreeMap::new(),
                                description: String::new(),
                                scopes: Vec::new(),
                                created_by: "admin".into(),
                                create_ms: base,
                                update_ms: base,
                                primary: 1,
                                versions: vec![VersionMeta {
                                    version: 1,
                                    state,
                                    create_ms: base,
                                    grace_until_ms: grace,
                                    fingerprint: [0; 16],
                                    term: 1,
                                    key_id: None,
                                    life: VersionLife {
                                        expire_ms: version_expiry,
                                        ..Default::default()
                                    },
                                }],
                                key_policy: Default::default(),
                                life: SecretLife {
                                    expire_ms: secret_expiry,
                                    next_rotation_ms: rotation,
                                    rotation_due_ms: flagged.then_some(base),
                                    ..Default::default()
                                },
                            };
                            let deadline = next_deadline(&s, base);
                            for t in (base..base + 100).step_by(5) {
                                let mut settled = s.clone();
                                let would_settle = settled.settle(t);
                                let would_rotate = rotation.is_some_and(|at| t >= at)
                                    && s.check_accepts_versions(t).is_ok()
                                    && !(kind == Kind::Static && flagged);
                                if would_settle || would_rotate {
                                    assert!(
                                        deadline.is_some_and(|d| d <= t),
                                        "{kind:?} {secret_expiry:?} {rotation:?} {flagged} \
                                         {state:?} {grace:?} {version_expiry:?}: work at {t}, \
                                         deadline {deadline:?}"
                                    );
                                    checked += 1;
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    assert!(checked > 100);
}
