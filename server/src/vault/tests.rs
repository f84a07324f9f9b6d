//! Unit tests of the vault: grace periods, environment grants, issued keys, audit records.

use super::*;
use crate::audit::AuditRecord;
use crate::clock::ManualClock;
use crate::error::Code;
use crate::model::input::LifecycleInput;
use crate::model::KeyIndexEntry;
use crate::store::sled_store::SledStore;
use crate::testutil::{peer, put};

const POLICY: &str = r#"
    [[rule]]
    identities = ["admin"]
    verbs = ["*"]
    secrets = ["*"]
    [[rule]]
    identities = ["app"]
    verbs = ["read", "list"]
    secrets = ["app/*"]
    environments = ["prod"]
"#;

struct Fixture {
    vault: Arc<Vault>,
    clock: Arc<ManualClock>,
    _dir: tempfile::TempDir,
}

async fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(SledStore::open(dir.path()).unwrap());
    let (vault, clock) = crate::testutil::vault_over(store, POLICY, 60_000).await;
    Fixture {
        vault,
        clock,
        _dir: dir,
    }
}

#[tokio::test]
async fn replaced_primary_stays_active_until_grace_ends() {
    let f = fixture().await;
    let admin = peer("admin");
    f.vault.put(&admin, put("db", b"one")).await.unwrap();
    f.vault.put(&admin, put("db", b"two")).await.unwrap();
    let old = f.vault.fetch(&admin, "db", 1).await.unwrap();
    assert_eq!(
        (old.state, &old.value[..]),
        (VersionState::Active, &b"one"[..])
    );
    assert_eq!(
        &f.vault.fetch(&admin, "db", 0).await.unwrap().value[..],
        b"two"
    );

    f.clock.advance(60_000);
    let err = f.vault.fetch(&admin, "db", 1).await.err().unwrap();
    assert_eq!(err.code(), Code::FailedPrecondition);
    let d = f.vault.describe(&admin, "db").await.unwrap();
    assert_eq!(d.versions[0].state, VersionState::Inactive);
}

#[tokio::test]
async fn environment_scoped_grants() {
    let f = fixture().await;
    let (admin, app) = (peer("admin"), peer("app"));
    let mut p = put("app/prod-db", b"x");
    p.environment = "prod".into();
    f.vault.put(&admin, p).await.unwrap();
    f.vault.put(&admin, put("app/dev-db", b"y")).await.unwrap();
    assert!(f.vault.fetch(&app, "app/prod-db", 0).await.is_ok());
    let denied = f.vault.fetch(&app, "app/dev-db", 0).await.err().unwrap();
    assert_eq!(denied.code(), Code::PermissionDenied);
    // Outside its globs the caller cannot even learn whether a name exists.
    let denied = f.vault.fetch(&app, "nope", 0).await.err().unwrap();
    assert_eq!(denied.code(), Code::PermissionDenied);
    let page = f.vault.list(&app, ListInput::default()).await.unwrap();
    let names: Vec<_> = page.secrets.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["app/prod-db"]);
}

#[tokio::test]
async fn issued_key_is_stored_encrypted_and_indexed() {
    let f = fixture().await;
    let admin = peer("admin");
    let issued = f
        .vault
        .issue(
            &admin,
            IssueInput {
                name: "svc/key".into(),
                environment: "prod".into(),
                owner: String::new(),
                scopes: vec!["read:users".into()],
                labels: BTreeMap::new(),
                description: String::new(),
                request_id: String::new(),
                lifecycle: LifecycleInput::default(),
            },
        )
        .await
        .unwrap();
    assert_eq!(issued.key.environment(), "prod");
    let hash = f.vault.key_hash(&issued.key);
    let entry = f.vault.store.get(Tree::KeyIndex, &hash).unwrap().unwrap();
    let entry: KeyIndexEntry = decode("index", &entry).unwrap();
    assert_eq!((entry.name.as_str(), entry.version), ("svc/key", 1));
    let fetched = f.vault.fetch(&admin, "svc/key", 0).await.unwrap();
    assert_eq!(&fetched.value[..], issued.key.expose().as_bytes());
    // Putting a value onto an API key is refused.
    let err = f
        .vault
        .put(&admin, put("svc/key", b"x"))
        .await
        .err()
        .unwrap();
    assert_eq!(err.code(), Code::FailedPrecondition);
}

#[tokio::test]
async fn every_call_leaves_one_audit_record_without_values() {
    let f = fixture().await;
    let (admin, app) = (peer("admin"), peer("app"));
    f.vault
        .put(&admin, put("db", b"super-secret-value"))
        .await
        .unwrap();
    f.vault.fetch(&admin, "db", 0).await.unwrap();
    let _ = f.vault.put(&app, put("db", b"x")).await;
    let _ = f.vault.fetch(&admin, "missing", 0).await;
    let records: Vec<AuditRecord> = crate::audit::call_records(f.vault.audit());
    let summary: Vec<_> = records
        .iter()
        .map(|r| (r.method.as_str(), r.code))
        .collect();
    assert_eq!(
        summary,
        [
            ("PutSecret", 0),
            ("FetchSecret", 0),
            ("PutSecret", 7),
            ("FetchSecret", 5)
        ]
    );
    for (_, v) in f.vault.audit().export().unwrap() {
        assert!(!v.windows(18).any(|w| w == b"super-secret-value"));
    }
}

#[tokio::test]
async fn an_idempotent_replay_is_audited_too() {
    let f = fixture().await;
    let admin = peer("admin");
    let mut p = put("db", b"v");
    p.request_id = "once".into();
    let first = f.vault.put(&admin, p).await.unwrap();
    let mut p = put("db", b"v");
    p.request_id = "once".into();
    let again = f.vault.put(&admin, p).await.unwrap();
    assert_eq!(first.version, again.version);
    let records: Vec<AuditRecord> = crate::audit::call_records(f.vault.audit());
    let puts: Vec<_> = records
        .iter()
        .map(|r| (r.method.as_str(), r.request_id.as_str(), r.targets[0].1))
        .collect();
    assert_eq!(puts, [("PutSecret", "once", 1), ("PutSecret", "once", 1)]);
    assert_eq!(f.vault.audit().durable_head(), 2);
}
