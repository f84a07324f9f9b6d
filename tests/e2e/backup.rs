//! Backup and restore: `wardctl admin backup FILE` while writers keep writing, more writes,
//! then `ward-server restore` into a fresh data dir finds exactly the backed-up state — a
//! consistent cut (each writer's versions are a prefix of what it wrote), nothing written
//! after the backup, the keyring as it was, the audit log up to the same cut with its chain
//! intact — and the restored vault takes writes again, continuing the chain.

use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tonic::Code;
use ward_tests::{files_containing, ok, pb, run_tool, server_bin, TestServer};

use crate::audit::all_records;
use crate::{assert_value, describe, fetch, put};

/// The successful `method` record of `name`@`version` in `records`.
fn record_of<'a>(
    records: &'a [pb::AuditRecord],
    method: &str,
    name: &str,
    version: u64,
) -> Option<&'a pb::AuditRecord> {
    records.iter().find(|r| {
        r.method == method
            && r.code == Code::Ok as i32
            && r.targets
                .iter()
                .any(|t| t.name == name && t.version == version)
    })
}

/// `ward-server restore --config DIR/ward.toml --from FILE`.
fn restore(s: &TestServer, from: &std::path::Path) -> std::process::Output {
    let mut cmd = Command::new(server_bin());
    cmd.args(["restore", "--config"])
        .arg(s.config_path())
        .arg("--from")
        .arg(from);
    run_tool(cmd, None)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_during_writes_restores_exactly_the_snapshot() {
    const WRITERS: usize = 3;
    let mut s = TestServer::start();
    let mut c = s.raw_client("admin").await;
    let canary = format!("BACKUP-CANARY-{}", ward_tests::random_hex(24));
    for i in 0..20 {
        put(
            &mut c,
            &format!("pre/s{i}"),
            format!("{canary}-{i}").as_bytes(),
        )
        .await;
    }
    put(&mut c, "pre/s0", b"pre-v2").await;
    let key = ok(
        c.issue_key(pb::IssueKeyRequest {
            name: "pre/key".into(),
            ..Default::default()
        })
        .await,
        "issue",
    )
    .api_key;
    let admin = s.client("admin").await;
    admin.rotate_keyring().await.unwrap();
    put(&mut c, "pre/after-rotation", b"sealed under term 2").await;
    let ring_before = admin.describe_keyring().await.unwrap();

    // Writers run through the backup, each on its own name, so what a consistent cut holds is
    // known: a prefix of each writer's sequence.
    let stop = Arc::new(AtomicBool::new(false));
    let sent: Arc<Mutex<Vec<Vec<Vec<u8>>>>> = Arc::new(Mutex::new(vec![Vec::new(); WRITERS]));
    let acked: Arc<Mutex<Vec<usize>>> = Arc::new(Mutex::new(vec![0; WRITERS]));
    let mut tasks = Vec::new();
    for w in 0..WRITERS {
        let mut wc = s.raw_client("admin").await;
        let (stop, sent, acked) = (stop.clone(), sent.clone(), acked.clone());
        tasks.push(tokio::spawn(async move {
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                let value = format!("writer-{w}-{i}").into_bytes();
                sent.lock().unwrap()[w].push(value.clone());
                let r = wc
                    .put_secret(crate::put_req(&format!("during/w{w}"), &value))
                    .await;
                let v = ok(r, "concurrent put").version;
                assert_eq!(v as usize, i + 1, "writer {w}: versions in order");
                acked.lock().unwrap()[w] = i + 1;
                i += 1;
            }
        }));
    }
    tokio::time::sleep(std::time::Duration::from_millis(150)).await;
    let acked_before: Vec<usize> = acked.lock().unwrap().clone();
    // Every record up to here is durable before the backup begins, so it is in the backup.
    let head_before = admin.verify_audit_log(0, 0).await.unwrap().head_seq;
    let file = s.scratch_dir().join("vault.backup");
    let out = {
        let cmd = s.wardctl_command();
        let f = s.identity_files("admin");
        let addr = s.addr().to_string();
        let file = file.clone();
        tokio::task::spawn_blocking(move || {
            let mut cmd = cmd;
            cmd.args(["--addr", &addr, "--ca"])
                .arg(&f.ca)
                .arg("--cert")
                .arg(&f.cert)
                .arg("--key")
                .arg(&f.key)
                .args(["admin", "backup"])
                .arg(&file);
            run_tool(cmd, None)
        })
        .await
        .unwrap()
    };
    assert!(
        out.status.success(),
        "wardctl admin backup: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Written after the backup finished: must not come back.
    put(&mut c, "post/new", b"after the backup").await;
    put(&mut c, "pre/s1", b"pre/s1 v2, after the backup").await;
    admin.rotate_keyring().await.unwrap();
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    let sent = sent.lock().unwrap().clone();
    assert!(
        acked_before.iter().all(|n| *n > 0),
        "writers had not started"
    );
    // The log as it was before the restore: whole, and holding the backup's own record.
    let mut a = s.audit_client("admin").await;
    let v = ok(
        a.verify_audit_log(pb::VerifyAuditLogRequest::default())
            .await,
        "VerifyAuditLog",
    );
    assert!(v.ok, "audit log before the restore: {v:?}");
    let before = all_records(&mut a).await;
    let backup_seq = before
        .iter()
        .find(|r| r.method == "StreamBackup" && r.code == Code::Ok as i32)
        .expect("the backup's audit record")
        .seq;
    drop(a);

    // The file: private, and sealed (no plaintext in it).
    let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "backup file mode {mode:o}");
    assert!(
        files_containing(&s.scratch_dir(), canary.as_bytes()).is_empty(),
        "plaintext in the backup"
    );
    assert!(
        files_containing(&s.scratch_dir(), key.as_bytes()).is_empty(),
        "API key in the backup"
    );
    // wardctl refuses to overwrite it.
    let again = s.wardctl(&["admin", "backup", file.to_str().unwrap()], None);
    assert_eq!(again.status.code(), Some(2), "overwrote an existing backup");

    // Restore into a fresh data dir.
    drop((c, admin));
    s.stop();
    let data = s.data_dir().join("data");
    std::fs::rename(&data, s.scratch_dir().join("data-before-restore")).unwrap();
    // A damaged backup is refused and creates nothing.
    let mut bad = std::fs::read(&file).unwrap();
    let mid = bad.len() / 2;
    bad[mid] ^= 0x01;
    let bad_file = s.scratch_dir().join("damaged.backup");
    std::fs::write(&bad_file, bad).unwrap();
    let o = restore(&s, &bad_file);
    assert_eq!(
        o.status.code(),
        Some(4),
        "damaged backup: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(String::from_utf8_lossy(&o.stderr).contains("SHA-256"));
    assert!(!data.exists(), "a refused restore created the data dir");
    let o = restore(&s, &file);
    assert!(
        o.status.success(),
        "restore: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("ward-master-1"),
        "restore names the master key it needs: {}",
        String::from_utf8_lossy(&o.stdout)
    );
    // Only into an empty data dir.
    let o = restore(&s, &file);
    assert_eq!(o.status.code(), Some(4), "restore over a data dir");

    s.restart();
    let mut c = s.raw_client("admin").await;
    for i in 2..20 {
        assert_value(
            &mut c,
            &format!("pre/s{i}"),
            0,
            format!("{canary}-{i}").as_bytes(),
        )
        .await;
    }
    assert_value(&mut c, "pre/s0", 2, b"pre-v2").await;
    assert_value(&mut c, "pre/after-rotation", 1, b"sealed under term 2").await;
    assert_eq!(
        fetch(&mut c, "pre/key", 0).await.unwrap().value,
        key.as_bytes()
    );
    // Nothing from after the backup.
    assert_eq!(describe(&mut c, "pre/s1").await.unwrap().primary_version, 1);
    let gone = describe(&mut c, "post/new").await;
    assert_eq!(
        gone.unwrap_err().code(),
        Code::NotFound,
        "post-backup secret restored"
    );
    // Each writer's versions are a prefix of what it sent, at least as long as what was
    // acknowledged before the backup began.
    for (w, values) in sent.iter().enumerate() {
        let m = describe(&mut c, &format!("during/w{w}")).await.unwrap();
        let n = m.primary_version as usize;
        assert!(
            n >= acked_before[w],
            "writer {w}: {n} restored < {} acked before",
            acked_before[w]
        );
        assert_eq!(m.versions.len(), n, "writer {w}: version gaps");
        for v in 1..=n {
            assert_value(&mut c, &format!("during/w{w}"), v as u64, &values[v - 1]).await;
        }
    }
    let admin = s.client("admin").await;
    let ring = admin.describe_keyring().await.unwrap();
    assert_eq!(
        ring.current_term, ring_before.current_term,
        "keyring as backed up"
    );

    // The audit log: intact, and exactly the backed-up prefix of the old one.
    let mut a = s.audit_client("admin").await;
    let v = ok(
        a.verify_audit_log(pb::VerifyAuditLogRequest::default())
            .await,
        "VerifyAuditLog",
    );
    assert!(v.ok && v.oldest_seq == 1, "restored audit log: {v:?}");
    let restored = all_records(&mut a).await;
    let seqs: Vec<u64> = restored.iter().map(|r| r.seq).collect();
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>(), "seqs");
    // The backup's audit head: the last record the restored log shares with the old one.
    let head = restored
        .iter()
        .zip(&before)
        .take_while(|(r, b)| r.hash == b.hash)
        .count();
    assert!(
        head > 0 && head < restored.len() && head as u64 >= head_before,
        "restored audit head {head}: the log before the backup began ended at {head_before}"
    );
    assert!(
        (head as u64) < backup_seq,
        "the restored log holds the backup's own record or later ones (head {head}, backup \
         record {backup_seq})"
    );
    eprintln!(
        "backup test: log at {head_before} when the backup began, backup cut at record \
         {head}, the backup's own record {backup_seq}, {} records in the old log",
        before.len()
    );
    // Every record after the head is the restored server's own, chained onto the head.
    let first_new = &restored[head];
    assert_eq!(first_new.prev_hash, restored[head - 1].hash);
    let old_hashes: std::collections::HashSet<&[u8]> =
        before.iter().map(|r| r.hash.as_slice()).collect();
    assert!(
        restored[head..]
            .iter()
            .all(|r| !old_hashes.contains(r.hash.as_slice())),
        "a record from after the backup came back"
    );
    // Everything written before the backup has its record, and the data is the same cut as the
    // log: each writer's restored version is the last one the log up to the head records.
    let (cut, _) = restored.split_at(head);
    for i in 0..20 {
        assert!(record_of(cut, "PutSecret", &format!("pre/s{i}"), 1).is_some());
    }
    assert!(record_of(cut, "PutSecret", "pre/s0", 2).is_some());
    assert!(record_of(cut, "IssueKey", "pre/key", 1).is_some());
    assert!(record_of(cut, "PutSecret", "pre/after-rotation", 1).is_some());
    assert!(record_of(cut, "PutSecret", "pre/s1", 2).is_none());
    assert!(
        cut.iter()
            .all(|r| r.targets.iter().all(|t| t.name != "post/new")),
        "post/new is in the restored log"
    );
    for w in 0..WRITERS {
        let name = format!("during/w{w}");
        let n = describe(&mut c, &name).await.unwrap().primary_version;
        assert!(
            record_of(cut, "PutSecret", &name, n).is_some(),
            "{name}@{n}"
        );
        // A write in flight when the backup was taken has its record in the cut (records are
        // written before their changes) and a void record after it: not applied.
        let voided = |seq: u64| {
            restored
                .iter()
                .any(|r| r.kind == pb::AuditRecordKind::Void as i32 && r.voided_seq == seq)
        };
        assert!(
            record_of(cut, "PutSecret", &name, n + 1).is_none_or(|r| voided(r.seq)),
            "{name}@{}: in the log, not in the data",
            n + 1
        );
    }

    // The restored vault takes writes, continues the numbering and the chain.
    assert_eq!(put(&mut c, "pre/s1", b"v2 after restore").await.version, 2);
    put(&mut c, "post/restored", b"new").await;
    admin.rotate_keyring().await.unwrap();
    drop((c, admin, a));
    s.restart();
    let mut c = s.raw_client("admin").await;
    assert_value(&mut c, "pre/s1", 2, b"v2 after restore").await;
    let mut a = s.audit_client("admin").await;
    let after = all_records(&mut a).await;
    assert!(
        after[..restored.len()]
            .iter()
            .zip(&restored)
            .all(|(x, r)| x.hash == r.hash),
        "the restored log changed"
    );
    let put_seq = record_of(&after, "PutSecret", "pre/s1", 2)
        .expect("the put after the restore is audited")
        .seq;
    assert!(put_seq > head as u64);
    // A checkpoint (made at start-up, over the log as the restored server left it) signs it.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let v = ok(
            a.verify_audit_log(pb::VerifyAuditLogRequest::default())
                .await,
            "VerifyAuditLog",
        );
        assert!(v.ok, "audit log after the restore: {v:?}");
        if v.signed_through_seq >= put_seq {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no checkpoint over record {put_seq}: {v:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// One entry of a backup file: tree name, key, value.
type BackupEntry = (String, Vec<u8>, Vec<u8>);

/// The entries of a backup file and the bytes after them (end marker, next id, count,
/// signature; without the trailing SHA-256).
fn backup_entries(file: &[u8]) -> (Vec<BackupEntry>, Vec<u8>) {
    let body = &file[..file.len() - 32];
    let mut at = 8;
    let mut take = |n: usize| {
        let s = &body[at..at + n];
        at += n;
        s
    };
    let mut entries = Vec::new();
    loop {
        if take(1)[0] == 0 {
            break;
        }
        let n = u16::from_be_bytes(take(2).try_into().unwrap()) as usize;
        let tree = String::from_utf8(take(n).to_vec()).unwrap();
        let n = u32::from_be_bytes(take(4).try_into().unwrap()) as usize;
        let key = take(n).to_vec();
        let n = u32::from_be_bytes(take(4).try_into().unwrap()) as usize;
        entries.push((tree, key, take(n).to_vec()));
    }
    (entries, body[at - 1..].to_vec())
}

/// Rebuilds a backup file from entries and trailer, with a fresh SHA-256 (what an attacker
/// who edits a backup does, so that it is not merely "damaged").
fn backup_file(magic: &[u8], entries: &[BackupEntry], trailer: &[u8]) -> Vec<u8> {
    use sha2::{Digest, Sha256};
    let mut f = magic.to_vec();
    for (tree, key, value) in entries {
        f.push(1);
        f.extend_from_slice(&(tree.len() as u16).to_be_bytes());
        f.extend_from_slice(tree.as_bytes());
        f.extend_from_slice(&(key.len() as u32).to_be_bytes());
        f.extend_from_slice(key);
        f.extend_from_slice(&(value.len() as u32).to_be_bytes());
        f.extend_from_slice(value);
    }
    f.extend_from_slice(trailer);
    let digest = Sha256::digest(&f);
    f.extend_from_slice(&digest);
    f
}

/// A backup is signed in the HSM: an edited one (digest recomputed) is refused by restore
/// and creates nothing; the genuine one restores.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edited_backup_is_refused_by_restore() {
    let mut s = TestServer::start();
    let mut c = s.raw_client("admin").await;
    ok(
        c.put_secret(pb::PutSecretRequest {
            environment: "prod".into(),
            ..crate::put_req("bak/prod-only", b"prod value")
        })
        .await,
        "put",
    );
    drop(c);
    let file = s.scratch_dir().join("signed.backup");
    let o = s.wardctl(&["admin", "backup", file.to_str().unwrap()], None);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    s.stop();
    let data = s.data_dir().join("data");
    std::fs::rename(&data, s.scratch_dir().join("data-before-restore")).unwrap();

    let original = std::fs::read(&file).unwrap();
    let (mut entries, trailer) = backup_entries(&original);
    assert_eq!(
        backup_file(&original[..8], &entries, &trailer),
        original,
        "the test's reading of the format"
    );
    // Relabel the prod secret as dev, as someone holding the backup file would.
    let (_, _, value) = entries
        .iter_mut()
        .find(|(t, k, _)| t == "secrets" && k == b"bak/prod-only")
        .expect("the secret's record in the backup");
    let at = value.windows(5).position(|w| w == b"\x04prod").unwrap();
    value.splice(at..at + 5, b"\x03dev".iter().copied());
    let edited = s.scratch_dir().join("edited.backup");
    std::fs::write(&edited, backup_file(&original[..8], &entries, &trailer)).unwrap();
    let o = restore(&s, &edited);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(4), "edited backup restored: {stderr}");
    assert!(stderr.contains("signature does not verify"), "{stderr}");
    assert!(!data.exists(), "a refused restore created the data dir");

    let o = restore(&s, &file);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    s.restart();
    let mut c = s.raw_client("admin").await;
    let f = fetch(&mut c, "bak/prod-only", 0).await.unwrap();
    assert_eq!(
        (f.value.as_slice(), f.environment.as_str()),
        (&b"prod value"[..], "prod")
    );
}
