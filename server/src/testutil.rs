//! Fixtures shared by the unit tests: a vault over a real store, an in-memory key wrapper
//! (for unit tests only; the server and the end-to-end suite always use PKCS#11) and a clock
//! the test moves.

use crate::audit::{AuditLog, AuditSettings};
use crate::changes::sweeper::SweepIndex;
use crate::changes::watch::WatchHub;
use crate::clock::{Clock, ManualClock};
use crate::identity::Peer;
use crate::model::input::LifecycleInput;
use crate::policy::Policy;
use crate::store::Store;
use crate::unseal::unseal;
use crate::vault::{PutInput, Settings, Vault};
use std::collections::BTreeMap;
use std::sync::Arc;
use ward_hsm::memory::InMemoryWrapper;
use ward_hsm::{KeyWrapper, MacSigner};
use zeroize::Zeroizing;

/// A vault over `store`: keyring unsealed by an in-memory master key, an audit log signed by
/// an in-memory MAC key, environments dev and prod, `policy` (TOML) and a replaced PRIMARY's
/// grace of `grace_ms`. The clock starts at 1,000,000 ms.
pub(crate) async fn vault_over(
    store: Arc<dyn Store>,
    policy: &str,
    grace_ms: u64,
) -> (Arc<Vault>, Arc<ManualClock>) {
    let (vault, clock, _) = followed_vault_over(store, policy, grace_ms).await;
    (vault, clock)
}

/// [`vault_over`], with a watch hub and a sweeper index following its changes.
pub(crate) async fn followed_vault_over(
    store: Arc<dyn Store>,
    policy: &str,
    grace_ms: u64,
) -> (Arc<Vault>, Arc<ManualClock>, Followers) {
    let hsm = InMemoryWrapper::new();
    hsm.create_master_key("m").unwrap();
    hsm.create_mac_key("ward-audit-1").unwrap();
    let hsm = Arc::new(hsm);
    let wrapper: Arc<dyn KeyWrapper> = hsm.clone();
    let clock = Arc::new(ManualClock::new(1_000_000));
    let (keyring, index) = unseal(&store, &wrapper, "m", clock.now_ms()).await.unwrap();
    let audit = AuditLog::open(
        store.clone(),
        &audit_dir(),
        clock.clone(),
        hsm,
        test_audit_settings(),
    )
    .await
    .unwrap();
    let settings = Settings {
        issuer: "ward".into(),
        environments: vec!["dev".into(), "prod".into()],
        default_environment: "dev".into(),
        max_value_bytes: 1024,
        max_batch: 10,
        grace_ms,
        max_versions_per_secret: 1000,
        max_watches_per_identity: 256,
        scan_budget: 10_000,
    };
    let followers = Followers {
        hub: Arc::new(WatchHub::new(settings.max_watches_per_identity)),
        sweep: Arc::new(SweepIndex::default()),
    };
    let vault = Vault::new(
        store,
        audit,
        keyring,
        index,
        Policy::parse(policy).unwrap(),
        clock.clone(),
        settings,
        vec![followers.hub.clone(), followers.sweep.clone()],
    );
    (Arc::new(vault), clock, followers)
}

/// A policy that grants `admin` every verb on every secret, and nobody anything else.
pub(crate) const ADMIN_ONLY_POLICY: &str = r#"
    [[rule]]
    identities = ["admin"]
    verbs = ["*"]
    secrets = ["*"]
"#;

/// A fresh directory for a test's audit segments (left in the temporary directory: the log
/// may outlive the test's own handles).
pub(crate) fn audit_dir() -> std::path::PathBuf {
    tempfile::Builder::new()
        .prefix("ward-unit-audit-")
        .tempdir()
        .map(tempfile::TempDir::keep)
        .unwrap()
        .join("audit")
}

/// The default audit settings with the smallest segments (unit tests make many logs).
pub(crate) fn test_audit_settings() -> AuditSettings {
    AuditSettings {
        segment_bytes: crate::audit::MIN_SEGMENT_SIZE,
        ..AuditSettings::default()
    }
}

/// What follows a test vault's changes.
pub(crate) struct Followers {
    /// Watch streams.
    pub hub: Arc<WatchHub>,
    /// The sweeper's deadline index.
    pub sweep: Arc<SweepIndex>,
}

/// A caller `identity` from a loopback address.
pub(crate) fn peer(identity: &str) -> Peer {
    Peer {
        identity: identity.into(),
        addr: "127.0.0.1:1".parse().unwrap(),
    }
}

/// PutSecret of `value` under `name`, every other field empty.
pub(crate) fn put(name: &str, value: &[u8]) -> PutInput {
    PutInput {
        name: name.into(),
        value: Zeroizing::new(value.to_vec()),
        environment: String::new(),
        owner: String::new(),
        labels: BTreeMap::new(),
        description: String::new(),
        expected_version: None,
        request_id: String::new(),
        lifecycle: LifecycleInput::default(),
    }
}
