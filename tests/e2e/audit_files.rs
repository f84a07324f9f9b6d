//! The audit log's segment files on disk: a torn tail after a crash is cut and nothing
//! acknowledged goes with it; damaged, truncated or missing segments stop the server at
//! start-up (exit 5) with a message that names them; a log that an earlier version kept in the
//! store is moved into segment files once, checked end to end — and an altered one is refused
//! without changing anything.

use std::collections::BTreeMap;
use std::os::unix::fs::FileExt;

use ward_tests::{segments, TestServer};

use crate::audit::{all_records, assert_verifies};
use crate::{assert_value, put};

/// A server with some history: puts, then fetches of them.
async fn with_history(n: usize) -> TestServer {
    let s = TestServer::start();
    let mut c = s.raw_client("admin").await;
    for i in 0..n {
        put(
            &mut c,
            &format!("files/{i}"),
            format!("value {i}").as_bytes(),
        )
        .await;
        assert_value(
            &mut c,
            &format!("files/{i}"),
            0,
            format!("value {i}").as_bytes(),
        )
        .await;
    }
    s
}

/// The log as the admin reads it, by sequence number → hash.
async fn hashes(s: &TestServer) -> BTreeMap<u64, Vec<u8>> {
    all_records(&mut s.audit_client("admin").await)
        .await
        .into_iter()
        .map(|r| (r.seq, r.hash))
        .collect()
}

/// The active segment of a stopped server and the offset after its last frame.
fn active_end(s: &TestServer) -> (std::path::PathBuf, u64) {
    let files = segments::read_all(&segments::audit_dir(s.data_dir()));
    let last = files.last().unwrap();
    (last.path.clone(), last.end)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_torn_tail_is_cut_and_nothing_acknowledged_goes_with_it() {
    let mut s = with_history(3).await;
    let before = hashes(&s).await;
    s.stop();
    // A crash in the middle of a group's write: a whole group frame that promises a record,
    // and half of that record.
    let (path, end) = active_end(&s);
    let mut torn = Vec::new();
    let record = vec![0x5au8; 300];
    let mut frame = Vec::new();
    frame.extend_from_slice(&[0; 4]);
    frame.extend_from_slice(&(record.len() as u32).to_le_bytes());
    frame.push(2);
    frame.extend_from_slice(&(*before.keys().last().unwrap() + 1).to_le_bytes());
    frame.extend_from_slice(&record);
    let last = *before.keys().last().unwrap();
    let group_end = end + 37 + frame.len() as u64;
    let mut group = Vec::new();
    group.extend_from_slice(&[0; 4]);
    group.extend_from_slice(&20u32.to_le_bytes());
    group.push(1);
    group.extend_from_slice(&(last + 1).to_le_bytes());
    group.extend_from_slice(&group_end.to_le_bytes());
    group.extend_from_slice(&1u32.to_le_bytes());
    group.extend_from_slice(&last.to_le_bytes());
    let crc = crc32c::crc32c(&group[4..]);
    group[..4].copy_from_slice(&crc.to_le_bytes());
    torn.extend_from_slice(&group);
    torn.extend_from_slice(&frame[..frame.len() / 2]);
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.write_all_at(&torn, end).unwrap();
    drop(f);

    s.restart();
    assert!(
        s.all_output().contains("torn write"),
        "the cut was not reported\n{}",
        s.stderr_tail(20)
    );
    let after = hashes(&s).await;
    for (seq, hash) in &before {
        assert_eq!(after.get(seq), Some(hash), "record {seq} changed or went");
    }
    let mut c = s.raw_client("admin").await;
    put(&mut c, "files/after", b"after the cut").await;
    assert_verifies(&s, "after a torn tail").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_truncated_or_missing_segments_stop_the_server_with_exit_5() {
    let mut s = with_history(3).await;
    s.stop();
    let dir = segments::audit_dir(s.data_dir());
    let path = segments::read_all(&dir)[0].path.clone();
    let original = std::fs::read(&path).unwrap();
    let expect_refusal = |s: &TestServer, what: &str, needle: &str| {
        let f = s.serve_expect_failure(&s.config_path(), &[]);
        assert_eq!(f.code, Some(5), "{what}: {}", f.stderr);
        assert!(f.stderr.contains(needle), "{what}: {}", f.stderr);
    };

    // A flipped byte in an early record (later groups follow it): not a torn tail.
    let mut bad = original.clone();
    bad[64 + 37 + 40] ^= 0x01;
    std::fs::write(&path, &bad).unwrap();
    expect_refusal(&s, "damaged record", "damaged");

    // The file cut short.
    std::fs::write(&path, &original[..original.len() / 2]).unwrap();
    expect_refusal(&s, "truncated segment", "truncated");

    // The segments gone: the store still names the records they held.
    std::fs::remove_file(&path).unwrap();
    expect_refusal(&s, "missing segments", "audit segments were deleted");

    // Put back as it was, it starts and verifies.
    std::fs::write(&path, &original).unwrap();
    s.restart();
    assert_verifies(&s, "the segment put back").await;
}

/// Puts `records` into a stopped server's store as its `audit` tree, the layout before
/// segment files (key: sequence number, value: the record as stored), with no segment files
/// and none of the marks the store keeps of them.
fn legacy_layout(s: &TestServer, records: &[(u64, Vec<u8>)]) {
    let dir = segments::audit_dir(s.data_dir());
    if dir.exists() {
        std::fs::remove_dir_all(&dir).unwrap();
    }
    let db = ward_tests::open_stopped_db(s.data_dir());
    let tree = db.open_tree("audit").unwrap();
    tree.clear().unwrap();
    for (seq, stored) in records {
        tree.insert(seq.to_be_bytes(), stored.as_slice()).unwrap();
    }
    let meta = db.open_tree("meta").unwrap();
    meta.remove("audit_applied").unwrap();
    meta.remove("audit_checkpoint").unwrap();
    db.flush().unwrap();
}

fn legacy_records(s: &TestServer) -> usize {
    let db = ward_tests::open_stopped_db(s.data_dir());
    db.open_tree("audit").unwrap().len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_kept_in_the_store_is_moved_into_segments_once_and_checked() {
    let mut s = with_history(4).await;
    let before = hashes(&s).await;
    s.stop();
    let records = segments::records(&segments::audit_dir(s.data_dir()));

    // An altered record: the move is refused and nothing changes.
    let mut altered = records.clone();
    let at = altered[3].1.len() / 2;
    altered[3].1[at] ^= 0x01;
    legacy_layout(&s, &altered);
    let f = s.serve_expect_failure(&s.config_path(), &[]);
    assert_eq!(f.code, Some(5), "{}", f.stderr);
    assert!(f.stderr.contains("cannot be moved"), "{}", f.stderr);
    assert_eq!(
        legacy_records(&s),
        records.len(),
        "the store's records were touched"
    );
    assert!(!segments::audit_dir(s.data_dir()).exists());

    // Intact: moved, checked, and the store's copy removed; the chain goes on from it.
    legacy_layout(&s, &records);
    s.restart();
    assert!(
        s.all_output()
            .contains("moved from the store into segment files"),
        "{}",
        s.stderr_tail(20)
    );
    let after = hashes(&s).await;
    for (seq, hash) in &before {
        assert_eq!(after.get(seq), Some(hash), "record {seq} changed or went");
    }
    let mut c = s.raw_client("admin").await;
    put(&mut c, "files/after-move", b"v").await;
    assert_value(&mut c, "files/0", 0, b"value 0").await;
    assert_verifies(&s, "after the move").await;
    s.stop();
    assert_eq!(
        legacy_records(&s),
        0,
        "the store still holds the old records"
    );
    assert!(!segments::records(&segments::audit_dir(s.data_dir())).is_empty());
}
