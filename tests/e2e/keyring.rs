//! Keyring and master-key rotation, online: fetches keep working throughout (raw clients, so
//! no retry or cache can hide a failure), new versions use the new term, and once the old master
//! key is deleted from the token everything still decrypts after a restart, under the new
//! master key alone.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tonic::Code;
use ward_tests::TestServer;

/// Successful fetches each quiet phase (before, between and after the rotations) must see.
const PER_PHASE: u64 = 50;

/// The fetch load's tally. Phase 2k is quiet (k rotations done, none running); phase 2k + 1 is
/// rotation k + 1 in progress.
#[derive(Default)]
struct Load {
    phase: AtomicUsize,
    /// Fetches that started and ended within each quiet phase, and returned the right value.
    quiet_oks: [AtomicU64; 4],
    /// All fetches that returned the right value.
    oks: AtomicU64,
    failures: Mutex<Vec<String>>,
    stop: AtomicBool,
}

impl Load {
    /// Waits until the current quiet phase has seen [`PER_PHASE`] good fetches, then moves on
    /// to the rotation that follows it.
    async fn next_rotation(&self) {
        let phase = self.phase.load(Ordering::SeqCst);
        assert_eq!(phase % 2, 0, "not in a quiet phase");
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.quiet_oks[phase / 2].load(Ordering::SeqCst) < PER_PHASE {
            assert!(
                Instant::now() < deadline,
                "phase {phase}: too few fetches ({:?})",
                self.failures.lock().unwrap()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.phase.store(phase + 1, Ordering::SeqCst);
    }

    /// The rotation is done: a new quiet phase starts.
    fn rotated(&self) {
        self.phase.fetch_add(1, Ordering::SeqCst);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn master_key_rotation_under_fetch_load() {
    let mut s = TestServer::start();
    let admin = s.client("admin").await;
    let mut values = Vec::new();
    for i in 0..20 {
        let (name, value) = (
            format!("rot/s{i}"),
            format!("value-{i}-{}", ward_tests::random_hex(8)),
        );
        admin
            .put_secret(ward_client::proto::PutSecretRequest {
                name: name.clone(),
                value: value.clone().into_bytes(),
                ..Default::default()
            })
            .await
            .unwrap();
        values.push((name, value));
    }
    let before = admin.describe_keyring().await.unwrap();
    assert_eq!(before.current_term, 1);
    assert_eq!(before.master_key_label, "ward-master-1");
    assert_eq!(before.master_key_wraps, 2, "term 1 and the index key");
    let old_master = s.master_key_objects();
    assert_eq!(old_master.len(), 1, "one master key on the token");

    // A load of fetches runs through every rotation, on the generated client: one call, one
    // answer, nothing retried or cached.
    let load = Arc::new(Load::default());
    let mut workers = Vec::new();
    for w in 0..8 {
        let (mut client, values, load) = (s.raw_client("app").await, values.clone(), load.clone());
        workers.push(tokio::spawn(async move {
            let mut i = w;
            while !load.stop.load(Ordering::SeqCst) {
                let (name, value) = &values[i % values.len()];
                let started = load.phase.load(Ordering::SeqCst);
                let r = crate::fetch(&mut client, name, 0).await;
                let ended = load.phase.load(Ordering::SeqCst);
                match r {
                    Ok(r) if r.value == value.as_bytes() => {
                        load.oks.fetch_add(1, Ordering::SeqCst);
                        if started == ended && started % 2 == 0 {
                            load.quiet_oks[started / 2].fetch_add(1, Ordering::SeqCst);
                        }
                    }
                    other => load.failures.lock().unwrap().push(format!(
                        "fetch {name} in phase {started}..{ended}: {:?}",
                        other.map(|_| "a wrong value")
                    )),
                }
                i += 1;
            }
        }));
    }
    load.next_rotation().await;
    let term2 = admin.rotate_keyring().await.unwrap();
    load.rotated();
    assert_eq!(
        (term2.term, term2.master_key_label.as_str()),
        (2, "ward-master-1")
    );
    load.next_rotation().await;
    let rotated = admin.rotate_master_key("").await.unwrap();
    load.rotated();
    assert_eq!(rotated.previous_label, "ward-master-1");
    assert_eq!(rotated.master_key_label, "ward-master-2");
    assert_eq!(rotated.terms_rewrapped, 2);
    load.next_rotation().await;
    let term3 = admin.rotate_keyring().await.unwrap();
    load.rotated();
    assert_eq!(
        (term3.term, term3.master_key_label.as_str()),
        (3, "ward-master-2")
    );
    // The last quiet phase: the load runs on after the rotations too.
    let deadline = Instant::now() + Duration::from_secs(60);
    while load.quiet_oks[3].load(Ordering::SeqCst) < PER_PHASE {
        assert!(
            Instant::now() < deadline,
            "too few fetches after the rotations"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    load.stop.store(true, Ordering::SeqCst);
    for w in workers {
        w.await.unwrap();
    }
    let failures = load.failures.lock().unwrap().clone();
    assert!(
        failures.is_empty(),
        "{} fetches failed during rotation: {failures:#?}",
        failures.len()
    );
    eprintln!(
        "{} fetches during the rotations; quiet phases: {:?}",
        load.oks.load(Ordering::SeqCst),
        load.quiet_oks
    );

    // New versions are sealed under the newest term.
    admin
        .put_secret(ward_client::proto::PutSecretRequest {
            name: "rot/after".into(),
            value: b"after-rotation".to_vec(),
            ..Default::default()
        })
        .await
        .unwrap();
    let meta = admin.describe_secret("rot/after").await.unwrap();
    assert_eq!(meta.versions[0].keyring_term, 3);

    // The old master key leaves the token; after a restart (serve, not dev) everything
    // decrypts under the new one alone.
    let masters = s.master_key_objects();
    assert_eq!(masters.len(), 2, "the new master key is on the token");
    assert!(
        masters.contains(&old_master[0]),
        "the old one too, until deleted"
    );
    s.stop();
    s.delete_token_object(&old_master[0]);
    assert_eq!(s.master_key_objects().len(), 1);
    s.restart();
    let admin = s.client("admin").await;
    for (name, value) in &values {
        assert_eq!(
            admin.fetch_secret(name.clone(), 0).await.unwrap().value,
            value.as_bytes()
        );
    }
    assert_eq!(
        admin.fetch_secret("rot/after", 0).await.unwrap().value,
        b"after-rotation"
    );
    let after = admin.describe_keyring().await.unwrap();
    assert_eq!(after.current_term, 3);
    assert_eq!(after.master_key_label, "ward-master-2");
    assert!(
        after
            .terms
            .iter()
            .all(|t| t.master_key_label == "ward-master-2"),
        "{after:?}"
    );
    assert_eq!(
        after.master_key_wraps,
        3 + 1,
        "terms 1-2 and index rewrapped, term 3 new"
    );

    // Through wardctl as well, and only for admins.
    let out = s.wardctl(&["--json", "admin", "keyring"], None);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let k: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(k["master_key_label"], "ward-master-2");
    let out = s.wardctl_as("app", &["admin", "rotate-keyring"], None);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("PERMISSION_DENIED"));
    let app = s.client("app").await;
    assert_eq!(
        app.rotate_master_key("").await.unwrap_err().code(),
        Code::PermissionDenied
    );

    // The object deleted was ward-master-1: its label is free again.
    let again = admin.rotate_master_key("ward-master-1").await.unwrap();
    assert_eq!(
        (
            again.previous_label.as_str(),
            again.master_key_label.as_str()
        ),
        ("ward-master-2", "ward-master-1")
    );
    let (name, value) = &values[0];
    assert_eq!(
        admin.fetch_secret(name.clone(), 0).await.unwrap().value,
        value.as_bytes()
    );

    // A label already on the token is refused, and nothing changes.
    let err = admin.rotate_master_key("ward-master-2").await.unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists, "{err}");
    let err = admin.rotate_master_key("bad label!").await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");
    assert_eq!(
        admin.describe_keyring().await.unwrap().master_key_label,
        "ward-master-1"
    );
}
