//! Restarts: `serve` and `dev` reuse the token, keyring, certificates and data; every
//! acknowledged write survives `kill -9`.

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ward_tests::{ok, pb, TestServer};

use crate::{assert_value, describe, fetch, put};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_reuses_token_keyring_and_data() {
    let mut s = TestServer::start();
    let dir = s.data_dir().to_path_buf();
    for f in [
        "hsm.pin",
        "policy.toml",
        "ward.toml",
        "tls/ca.pem",
        "tls/ca.key",
        "tls/server.pem",
        "tls/server.key",
        "tls/admin.pem",
        "tls/admin.key",
        "tls/app.pem",
        "tls/app.key",
    ] {
        assert!(dir.join(f).is_file(), "dev mode did not create {f}");
    }
    assert!(
        dir.join("softhsm").is_dir(),
        "dev mode did not create softhsm/"
    );
    assert!(dir.join("data").is_dir(), "dev mode did not create data/");
    let mode = std::fs::metadata(dir.join("hsm.pin"))
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600, "hsm.pin mode {mode:o}");
    let snapshot = |names: &[&str]| -> Vec<Vec<u8>> {
        names
            .iter()
            .map(|f| std::fs::read(dir.join(f)).unwrap())
            .collect()
    };
    let reused = [
        "tls/ca.pem",
        "tls/server.pem",
        "tls/admin.pem",
        "tls/app.pem",
        "hsm.pin",
        "ward.toml",
    ];
    let before = snapshot(&reused);

    let mut c = s.raw_client("admin").await;
    let big: Vec<u8> = (0..60_000u32).map(|i| (i % 253) as u8).collect();
    put(&mut c, "keep/a", b"a-one").await;
    put(&mut c, "keep/a", b"a-two").await;
    put(&mut c, "keep/a", b"a-three").await;
    put(&mut c, "keep/big", &big).await;
    let key = ok(
        c.issue_key(pb::IssueKeyRequest {
            name: "keep/key".into(),
            ..Default::default()
        })
        .await,
        "issue",
    );
    let meta_before = describe(&mut c, "keep/a").await.unwrap();
    drop(c);

    // The production path: serve --config DIR/ward.toml.
    let status = s.stop();
    assert!(
        status.success(),
        "SIGTERM should end the server cleanly, got {status:?}"
    );
    s.restart();
    let mut c = s.raw_client("admin").await;
    assert_value(&mut c, "keep/a", 0, b"a-three").await;
    assert_value(&mut c, "keep/a", 1, b"a-one").await;
    assert_value(&mut c, "keep/a", 2, b"a-two").await;
    assert_value(&mut c, "keep/big", 0, &big).await;
    assert_eq!(
        fetch(&mut c, "keep/key", 0).await.unwrap().value,
        key.api_key.as_bytes()
    );
    let mut meta_after = describe(&mut c, "keep/a").await.unwrap();
    // The fetches above are new uses; everything else about the versions is as it was.
    for v in &mut meta_after.versions {
        assert!(
            v.last_read_time.take().is_some(),
            "fetch not recorded as a use"
        );
    }
    assert_eq!(
        meta_after.versions, meta_before.versions,
        "version metadata changed"
    );
    assert_eq!(meta_after.created_by, meta_before.created_by);
    // Numbering continues.
    assert_eq!(put(&mut c, "keep/a", b"a-four").await.version, 4);
    drop(c);

    // The PIN from the environment overrides the config's pin file.
    let pin = std::fs::read_to_string(dir.join("hsm.pin")).unwrap();
    s.restart_with_env(&[("WARD_HSM_PIN", pin.trim())]);
    let mut c = s.raw_client("app").await;
    assert_value(&mut c, "keep/a", 4, b"a-four").await;
    drop(c);

    // Dev mode again on the same dir reuses everything instead of re-creating it.
    s.restart_dev();
    assert_eq!(
        snapshot(&reused),
        before,
        "dev mode re-created files it should reuse"
    );
    let mut c = s.raw_client("admin").await;
    assert_value(&mut c, "keep/a", 0, b"a-four").await;
    assert_value(&mut c, "keep/big", 1, &big).await;
    assert_eq!(
        fetch(&mut c, "keep/key", 0).await.unwrap().value,
        key.api_key.as_bytes()
    );
}

/// What a writer saw acknowledged.
#[derive(Debug, Clone)]
struct Ack {
    name: String,
    version: u64,
    value: Vec<u8>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_kill_9() {
    const WRITERS: usize = 8;
    const MIN_ACKS: usize = 200;
    let mut s = TestServer::start();
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(AtomicUsize::new(0));

    let mut tasks = Vec::new();
    for w in 0..WRITERS {
        let client = s.client("admin").await;
        let (stop, acked) = (stop.clone(), acked.clone());
        tasks.push(tokio::spawn(async move {
            let mut acks = Vec::new();
            let mut errors = 0usize;
            let mut i = 0usize;
            while !stop.load(Ordering::Relaxed) {
                // Own names (several versions each) plus one name every writer shares.
                let name = if i % 4 == 3 {
                    "crash/shared".to_string()
                } else {
                    format!("crash/w{w}/k{}", i % 5)
                };
                let value = format!("writer {w} write {i}").into_bytes();
                i += 1;
                match crate::sdk::put_value(&client, &name, &value).await {
                    Ok(version) => {
                        acks.push(Ack {
                            name,
                            version,
                            value,
                        });
                        acked.fetch_add(1, Ordering::Relaxed);
                    }
                    // Once the server is gone every call fails; stop soon after.
                    Err(_) => {
                        errors += 1;
                        if errors > 3 {
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            }
            (acks, errors)
        }));
    }

    let deadline = Instant::now() + Duration::from_secs(60);
    while acked.load(Ordering::Relaxed) < MIN_ACKS {
        assert!(
            Instant::now() < deadline,
            "only {} writes acknowledged in 60 s\n{}",
            acked.load(Ordering::Relaxed),
            s.stderr_tail(30)
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Writers are still going: the kill lands with requests in flight.
    s.kill9();
    stop.store(true, Ordering::Relaxed);
    let mut acks = Vec::new();
    let mut cut_off = 0;
    for t in tasks {
        let (a, errors) = t.await.unwrap();
        acks.extend(a);
        cut_off += usize::from(errors > 0);
    }
    assert!(acks.len() >= MIN_ACKS);
    eprintln!(
        "kill -9 after {} acknowledged writes; {cut_off} of {WRITERS} writers saw the crash",
        acks.len()
    );

    // Two acknowledgements of the same version must be the same write.
    let mut seen: HashMap<(String, u64), Vec<u8>> = HashMap::new();
    for a in &acks {
        if let Some(prev) = seen.insert((a.name.clone(), a.version), a.value.clone()) {
            panic!(
                "{}@{} acknowledged twice, for {:?} and {:?}",
                a.name,
                a.version,
                String::from_utf8_lossy(&prev),
                String::from_utf8_lossy(&a.value)
            );
        }
    }

    s.restart();
    let mut c = s.raw_client("admin").await;
    let mut lost = Vec::new();
    for a in &acks {
        match fetch(&mut c, &a.name, a.version).await {
            Ok(got) if got.value == a.value => {}
            Ok(got) => lost.push(format!(
                "{}@{}: expected {:?}, got {:?}",
                a.name,
                a.version,
                String::from_utf8_lossy(&a.value),
                String::from_utf8_lossy(&got.value)
            )),
            Err(st) => lost.push(format!(
                "{}@{}: {:?} {}",
                a.name,
                a.version,
                st.code(),
                st.message()
            )),
        }
    }
    assert!(
        lost.is_empty(),
        "{} of {} acknowledged writes lost after kill -9:\n{}",
        lost.len(),
        acks.len(),
        lost.join("\n")
    );
    // The primary of each name is at least its newest acknowledged version.
    let mut newest: HashMap<&str, u64> = HashMap::new();
    for a in &acks {
        let e = newest.entry(a.name.as_str()).or_default();
        *e = (*e).max(a.version);
    }
    for (name, v) in newest {
        let m = describe(&mut c, name).await.unwrap();
        assert!(
            m.primary_version >= v,
            "{name}: primary {} < acked {v}",
            m.primary_version
        );
    }
    // And the server keeps working after the crash.
    assert!(put(&mut c, "crash/after", b"ok").await.version == 1);
}
