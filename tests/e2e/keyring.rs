//! Keyring and master-key rotation, online: fetches keep working throughout, new versions use
//! the new term, and after a restart everything decrypts under the new master key, which is the
//! only label the keyring refers to.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use tonic::Code;
use ward_tests::TestServer;

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

    // A load of fetches runs through every rotation.
    let stop = Arc::new(AtomicBool::new(false));
    let (oks, failures) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut workers = Vec::new();
    for w in 0..8 {
        let (client, values) = (s.client("app").await, values.clone());
        let (stop, oks, failures) = (stop.clone(), oks.clone(), failures.clone());
        workers.push(tokio::spawn(async move {
            let mut i = w;
            while !stop.load(Ordering::Relaxed) {
                let (name, value) = &values[i % values.len()];
                match client.fetch_secret(name.clone(), 0).await {
                    Ok(r) if r.value == value.as_bytes() => oks.fetch_add(1, Ordering::Relaxed),
                    other => {
                        eprintln!("fetch {name} during rotation: {other:?}");
                        failures.fetch_add(1, Ordering::Relaxed)
                    }
                };
                i += 1;
            }
        }));
    }
    let term2 = admin.rotate_keyring().await.unwrap();
    assert_eq!(
        (term2.term, term2.master_key_label.as_str()),
        (2, "ward-master-1")
    );
    let rotated = admin.rotate_master_key("").await.unwrap();
    assert_eq!(rotated.previous_label, "ward-master-1");
    assert_eq!(rotated.master_key_label, "ward-master-2");
    assert_eq!(rotated.terms_rewrapped, 2);
    let term3 = admin.rotate_keyring().await.unwrap();
    assert_eq!(
        (term3.term, term3.master_key_label.as_str()),
        (3, "ward-master-2")
    );
    tokio::time::sleep(std::time::Duration::from_millis(300)).await; // let the load run on
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.unwrap();
    }
    assert_eq!(
        failures.load(Ordering::Relaxed),
        0,
        "fetches failed during rotation"
    );
    assert!(oks.load(Ordering::Relaxed) > 0);

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

    // After a restart (serve, not dev) everything decrypts under the new label alone.
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

    // A label already on the token is refused, and nothing changes.
    let err = admin.rotate_master_key("ward-master-1").await.unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists, "{err}");
    let err = admin.rotate_master_key("bad label!").await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");
    assert_eq!(
        admin.describe_keyring().await.unwrap().master_key_label,
        "ward-master-2"
    );
}
