//! The chain, its verification, pruning and the stream reader, over a real sled store and the
//! in-memory HSM stand-in.

use super::*;
use crate::clock::{Clock, ManualClock};
use crate::policy::Policy;
use crate::store::sled_store::SledStore;
use crate::store::{Batch, Store, StoreError, Tree};
use std::sync::Arc;
use std::time::Duration;
use ward_hsm::memory::InMemoryWrapper;
use ward_hsm::MacSigner;

const DAY_MS: u64 = 86_400_000;

struct Fx {
    log: Arc<AuditLog>,
    store: Arc<dyn Store>,
    clock: Arc<ManualClock>,
    _dir: tempfile::TempDir,
}

async fn setup(every: u64) -> Fx {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(SledStore::open(dir.path()).unwrap());
    let hsm = InMemoryWrapper::new();
    hsm.create_mac_key("audit-key").unwrap();
    let clock = Arc::new(ManualClock::new(100 * DAY_MS));
    let settings = AuditSettings {
        checkpoint_every: every,
        checkpoint_interval: Duration::from_secs(3600),
        key_label: "audit-key".into(),
        retention: Duration::from_secs(10 * 86_400),
        prune_interval: Duration::from_secs(3600),
    };
    let log = AuditLog::open(store.clone(), clock.clone(), Arc::new(hsm), settings).unwrap();
    Fx {
        log,
        store,
        clock,
        _dir: dir,
    }
}

fn peer(identity: &str) -> Peer {
    Peer {
        identity: identity.into(),
        addr: "10.0.0.1:5000".parse().unwrap(),
    }
}

fn call(fx: &Fx, identity: &str, method: &str, name: &str, code: i32) -> AuditRecord {
    let mut r = AuditRecord::new(&peer(identity), method, fx.clock.now_ms());
    if !name.is_empty() {
        r.targets.push((name.into(), 1));
    }
    r.code = code;
    r
}

/// Appends `n` calls, a checkpoint after every `cp` of them (0: none).
async fn calls(fx: &Fx, n: usize, cp: usize) {
    for i in 0..n {
        fx.log
            .append(call(fx, "admin", "FetchSecret", &format!("s/{i}"), 0))
            .await
            .unwrap();
        if cp > 0 && (i + 1) % cp == 0 {
            fx.log.checkpoint().await.unwrap();
        }
    }
}

fn raw(fx: &Fx, seq: u64) -> Vec<u8> {
    fx.store
        .get(Tree::Audit, &record_key(seq))
        .unwrap()
        .unwrap()
}

fn put_raw(fx: &Fx, seq: u64, value: Option<Vec<u8>>) {
    let mut b = Batch::new();
    match value {
        Some(v) => b.put(Tree::Audit, record_key(seq).to_vec(), v),
        None => b.remove(Tree::Audit, record_key(seq).to_vec()),
    }
    fx.store.commit(b).unwrap();
}

fn record_at(fx: &Fx, seq: u64) -> AuditRecord {
    *decode(&raw(fx, seq)).unwrap().record
}

fn broken(v: &Verification) -> (u64, Problem) {
    let b = v.first_broken.as_ref().expect("verification found nothing");
    (b.seq, b.problem)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_appends_and_conflicts_form_one_gapless_chain() {
    let fx = Arc::new(setup(1000).await);
    let mut tasks = Vec::new();
    for t in 0..8 {
        let fx = fx.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..40 {
                let rec = call(&fx, &format!("id{t}"), "FetchSecret", &format!("n{i}"), 0);
                fx.log.append(rec).await.unwrap();
                // A write whose guard fails: no record, and the head does not move.
                let mut b = Batch::new();
                b.guard(Tree::Secrets, b"never".to_vec(), Some(b"x".to_vec()));
                let mut rec = call(&fx, "admin", "PutSecret", "never", 0);
                assert!(matches!(
                    fx.log.commit(b, &mut rec).await,
                    Err(StoreError::Conflict)
                ));
                assert_eq!(rec.seq, 0, "a record that is not in the log has no number");
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(fx.log.durable_head(), 320);
    let v = fx.log.verify(0, 0).await.unwrap();
    assert!(v.ok(), "{v:?}");
    assert_eq!((v.from, v.to, v.records_checked), (1, 320, 320));
    let all = fx.store.scan(Tree::Audit, b"", b"", 1000).unwrap();
    let seqs: Vec<u64> = all.iter().map(|(k, _)| key_seq(k).unwrap()).collect();
    assert_eq!(seqs, (1..=320).collect::<Vec<_>>());
    assert_eq!(record_at(&fx, 1).prev_hash, GENESIS);
}

#[tokio::test]
async fn an_edited_deleted_or_reordered_record_is_reported_where_it_is() {
    for case in ["edit", "edit-hash", "delete", "reorder", "garbage"] {
        let fx = setup(5).await;
        calls(&fx, 20, 5).await;
        assert!(fx.log.verify(0, 0).await.unwrap().ok());
        let k = 9;
        match case {
            "edit" => {
                // Replace the secret name inside the stored record, same length.
                let mut v = raw(&fx, k);
                let at = v.windows(3).position(|w| w == b"s/7").unwrap();
                v[at..at + 3].copy_from_slice(b"x/7");
                put_raw(&fx, k, Some(v));
            }
            "edit-hash" => {
                let mut v = raw(&fx, k);
                let last = v.len() - 1;
                v[last] ^= 1;
                put_raw(&fx, k, Some(v));
            }
            "delete" => put_raw(&fx, k, None),
            "reorder" => {
                let (a, b) = (raw(&fx, k), raw(&fx, k + 1));
                put_raw(&fx, k, Some(b));
                put_raw(&fx, k + 1, Some(a));
            }
            _ => put_raw(&fx, k, Some(vec![2, 0, 1])),
        }
        let v = fx.log.verify(0, 0).await.unwrap();
        let want = match case {
            "edit" | "edit-hash" => Problem::Altered,
            "delete" => Problem::Missing,
            "reorder" => Problem::Misplaced,
            _ => Problem::Undecodable,
        };
        assert_eq!(broken(&v), (k, want), "{case}: {v:?}");
        // A range that ends before the damage is fine; one that starts after it checks the
        // link into its first record.
        assert!(fx.log.verify(1, k - 1).await.unwrap().ok(), "{case}");
    }
}

/// Rewrites record `k` with `edit` and re-chains everything after it (updating checkpoint
/// records' signed hash too when `update_signed`), as someone with write access to the
/// database but not to the HSM could.
fn rechain_from(fx: &Fx, k: u64, edit: impl FnOnce(&mut AuditRecord), update_signed: bool) {
    let mut edit = Some(edit);
    let head = fx.log.durable_head();
    let mut prev = record_at(fx, k - 1).encode().1;
    let mut forged_hashes = std::collections::HashMap::new();
    for seq in k..=head {
        let mut r = record_at(fx, seq);
        if let Some(edit) = edit.take().filter(|_| seq == k) {
            edit(&mut r);
        }
        r.prev_hash = prev;
        if let Event::Checkpoint(c) = &mut r.event {
            if update_signed {
                if let Some(h) = forged_hashes.get(&c.covers_seq) {
                    c.covers_hash = *h;
                }
            }
        }
        let (stored, hash) = r.encode();
        forged_hashes.insert(seq, hash);
        put_raw(fx, seq, Some(stored));
        prev = hash;
    }
}

#[tokio::test]
async fn a_rechained_forgery_fails_at_the_signed_checkpoint() {
    for update_signed in [false, true] {
        let fx = setup(5).await;
        calls(&fx, 20, 5).await;
        // Checkpoints sit after every fifth call: at 6, 12, 18, 24.
        let cps: Vec<u64> = (1..=fx.log.durable_head())
            .filter(|s| matches!(record_at(&fx, *s).event, Event::Checkpoint(_)))
            .collect();
        assert_eq!(cps, [6, 12, 18, 24]);
        rechain_from(&fx, 8, |r| r.identity = "nobody".into(), update_signed);
        let v = fx.log.verify(0, 0).await.unwrap();
        let want = if update_signed {
            Problem::CheckpointForged
        } else {
            Problem::CheckpointMismatch
        };
        assert_eq!(broken(&v), (12, want), "{v:?}");
        assert_eq!(v.checkpoints_verified, 1);
        assert_eq!(v.signed_through, 5);
    }
}

#[tokio::test]
async fn replayed_or_removed_checkpoints_are_reported() {
    // Replay: copy the first checkpoint's signed part into a later one.
    let fx = setup(5).await;
    calls(&fx, 10, 5).await;
    let first = match record_at(&fx, 6).event {
        Event::Checkpoint(c) => c,
        _ => panic!("no checkpoint at 6"),
    };
    rechain_from(&fx, 12, |r| r.event = Event::Checkpoint(first), false);
    let v = fx.log.verify(0, 0).await.unwrap();
    assert_eq!(broken(&v), (12, Problem::CheckpointOrder), "{v:?}");

    // Removal: more than 3 × every + slack records without a checkpoint.
    let fx = setup(2).await;
    let n = (3 * 2 + verify::GAP_SLACK + 10) as usize;
    let mut last = None;
    for i in 0..n {
        let mut r = call(&fx, "admin", "FetchSecret", &format!("s/{i}"), 0);
        fx.log.commit(Batch::new(), &mut r).await.unwrap();
        last = Some(r);
    }
    fx.log.synced(&last.unwrap()).await.unwrap();
    let v = fx.log.verify(0, 0).await.unwrap();
    let limit = 3 * 2 + verify::GAP_SLACK;
    assert_eq!(broken(&v), (limit + 1, Problem::Unsigned), "{v:?}");
    // A late checkpoint cannot vouch for the run before it (an HSM outage and removed
    // checkpoints look alike); what follows it verifies.
    fx.log.checkpoint().await.unwrap();
    assert_eq!(
        broken(&fx.log.verify(0, 0).await.unwrap()).1,
        Problem::Unsigned
    );
    assert!(fx.log.verify(n as u64 - 5, 0).await.unwrap().ok());
}

#[tokio::test]
async fn a_checkpoint_signed_with_another_key_is_forged() {
    let fx = setup(5).await;
    calls(&fx, 5, 5).await;
    rechain_from(
        &fx,
        6,
        |r| {
            if let Event::Checkpoint(c) = &mut r.event {
                c.key_label = "no-such-key".into();
            }
        },
        false,
    );
    let v = fx.log.verify(0, 0).await.unwrap();
    assert_eq!(broken(&v), (6, Problem::CheckpointForged), "{v:?}");
}

#[tokio::test]
async fn pruning_keeps_retention_and_a_verifiable_start() {
    let fx = setup(5).await;
    calls(&fx, 12, 5).await; // 1..=5, cp 6 (covers 5), 7..=11, cp 12 (covers 11), 13, 14
    fx.clock.advance(4 * DAY_MS);
    calls(&fx, 3, 0).await; // 15..=17
                            // Nothing is older than 10 days yet.
    assert_eq!(fx.log.prune().await.unwrap().deleted, 0);

    fx.clock.advance(7 * DAY_MS); // 1..=14 are 11 days old, 15..=17 are 7.
    let report = fx.log.prune().await.unwrap();
    // Cut at record 11, the newest one a checkpoint older than the cutoff signs.
    assert_eq!(
        report,
        PruneReport {
            deleted: 10,
            oldest: 11
        }
    );
    assert_eq!(fx.log.oldest(), 11);
    let head = fx.log.durable_head();
    assert!(matches!(
        record_at(&fx, head).event,
        Event::Prune { below: 11 }
    ));
    let v = fx.log.verify(0, 0).await.unwrap();
    assert!(v.ok(), "{v:?}");
    assert_eq!(v.from, 11);
    // Nothing left to prune.
    assert_eq!(fx.log.prune().await.unwrap().deleted, 0);

    // Cutting more off the start than the prune record accounts for is found.
    put_raw(&fx, 11, None);
    put_raw(&fx, 12, None);
    let reopened = AuditLog::open(
        fx.store.clone(),
        fx.clock.clone(),
        fx.log.signer().clone(),
        fx.log.settings().clone(),
    )
    .unwrap();
    let v = reopened.verify(0, 0).await.unwrap();
    assert_eq!(broken(&v), (11, Problem::Missing), "{v:?}");

    // So is a log cut without any prune record.
    let fx = setup(5).await;
    calls(&fx, 7, 5).await;
    put_raw(&fx, 1, None);
    let reopened = AuditLog::open(
        fx.store.clone(),
        fx.clock.clone(),
        fx.log.signer().clone(),
        fx.log.settings().clone(),
    )
    .unwrap();
    assert_eq!(
        broken(&reopened.verify(0, 0).await.unwrap()),
        (1, Problem::Missing)
    );
}

fn query(from_seq: u64, follow: bool) -> StreamQuery {
    StreamQuery {
        from_seq,
        last: 0,
        follow,
        identity: String::new(),
        name_prefix: String::new(),
        method: String::new(),
        outcome: String::new(),
    }
}

async fn drain(r: &mut StreamReader) -> Vec<StreamItem> {
    let mut out = Vec::new();
    while let Some(item) = r.next().await.unwrap() {
        out.push(item);
    }
    out
}

fn seqs(items: &[StreamItem]) -> Vec<u64> {
    items
        .iter()
        .filter_map(|i| match i {
            StreamItem::Record(r, _) => Some(r.seq),
            StreamItem::Gap { .. } => None,
        })
        .collect()
}

const POLICY: &str = r#"
    [[rule]]
    identities = ["admin"]
    verbs = ["*"]
    secrets = ["*"]
    [[rule]]
    identities = ["pay-auditor"]
    verbs = ["audit"]
    secrets = ["pay/*"]
"#;

#[tokio::test]
async fn streams_resume_filter_and_see_only_what_they_may() {
    let fx = setup(1000).await;
    let access = AuditAccess::new(
        fx.log.clone(),
        Policy::parse(POLICY).unwrap(),
        fx.clock.clone(),
        100,
    );
    let admin = peer("admin");
    fx.log
        .append(call(&fx, "admin", "PutSecret", "pay/db", 0))
        .await
        .unwrap();
    fx.log
        .append(call(&fx, "app", "FetchSecret", "pay/db", 7))
        .await
        .unwrap();
    fx.log
        .append(call(&fx, "app", "FetchSecret", "hr/db", 0))
        .await
        .unwrap();
    fx.log
        .append(call(&fx, "admin", "ListSecrets", "", 0))
        .await
        .unwrap();

    // Whole log (its own StreamAudit record, 5, is durable before reading starts).
    let mut r = access.stream(&admin, query(0, false)).await.unwrap();
    assert_eq!(seqs(&drain(&mut r).await), [1, 2, 3, 4, 5]);
    // Resume after 2: exactly the later ones.
    let mut r = access.stream(&admin, query(3, false)).await.unwrap();
    assert_eq!(seqs(&drain(&mut r).await), [3, 4, 5, 6]);
    // Filters.
    let mut q = query(0, false);
    q.identity = "ap?".into();
    q.outcome = "error".into();
    let mut r = access.stream(&admin, q).await.unwrap();
    assert_eq!(seqs(&drain(&mut r).await), [2]);
    let mut q = query(0, false);
    q.name_prefix = "hr/".into();
    q.method = "FetchSecret".into();
    let mut r = access.stream(&admin, q).await.unwrap();
    assert_eq!(seqs(&drain(&mut r).await), [3]);
    let mut q = query(0, false);
    q.method = "NoSuchMethod".into();
    let mut r = access.stream(&admin, q).await.unwrap();
    assert!(drain(&mut r).await.is_empty());
    // `last`.
    let mut q = query(0, false);
    q.last = 2;
    let head = fx.log.durable_head();
    let mut r = access.stream(&admin, q).await.unwrap();
    assert_eq!(seqs(&drain(&mut r).await), [head, head + 1]);

    // A narrower grant sees the records of its secrets only.
    let mut r = access
        .stream(&peer("pay-auditor"), query(0, false))
        .await
        .unwrap();
    assert_eq!(seqs(&drain(&mut r).await), [1, 2]);
    // No grant, bad input, too far: refused, and each refusal is itself a record.
    let before = fx.log.durable_head();
    let err = access
        .stream(&peer("app"), query(0, false))
        .await
        .err()
        .unwrap();
    assert_eq!(err.code(), Code::PermissionDenied);
    let err = access
        .stream(&admin, query(before + 5, false))
        .await
        .err()
        .unwrap();
    assert_eq!(err.code(), Code::OutOfRange);
    let mut q = query(0, false);
    q.outcome = "MAYBE".into();
    assert_eq!(
        access.stream(&admin, q).await.err().unwrap().code(),
        Code::InvalidArgument
    );
    let err = access
        .verify(&peer("pay-auditor"), 0, 0)
        .await
        .err()
        .unwrap();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert_eq!(fx.log.durable_head(), before + 4);
    let last = record_at(&fx, before + 4);
    assert_eq!(
        (last.method.as_str(), last.identity.as_str(), last.code),
        ("VerifyAuditLog", "pay-auditor", 7)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_wakes_on_durable_records_and_is_told_about_pruning() {
    let fx = setup(1000).await;
    let access = Arc::new(AuditAccess::new(
        fx.log.clone(),
        Policy::parse(POLICY).unwrap(),
        fx.clock.clone(),
        1,
    ));
    let mut r = access.stream(&peer("admin"), query(0, true)).await.unwrap();
    assert!(matches!(r.next().await.unwrap(), Some(StreamItem::Record(ref x, _)) if x.seq == 1));
    // The second stream is refused: max_streams = 1.
    let err = access
        .stream(&peer("admin"), query(0, true))
        .await
        .err()
        .unwrap();
    assert_eq!(err.code(), Code::ResourceExhausted);
    // Record 2 is the refused stream's.
    assert!(matches!(r.next().await.unwrap(), Some(StreamItem::Record(ref x, _)) if x.seq == 2));
    let waiting = tokio::spawn(async move {
        let item = r.next().await.unwrap();
        (r, item)
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!waiting.is_finished(), "the follower did not wait");
    fx.log
        .append(call(&fx, "admin", "FetchSecret", "a", 0))
        .await
        .unwrap();
    let (r, item) = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .unwrap()
        .unwrap();
    assert!(matches!(item, Some(StreamItem::Record(ref x, _)) if x.seq == 3));
    drop(r);

    // A reader asking for pruned records gets a gap first.
    calls(&fx, 5, 5).await;
    fx.clock.advance(11 * DAY_MS);
    calls(&fx, 1, 0).await;
    let pruned = fx.log.prune().await.unwrap();
    assert!(pruned.deleted > 0);
    let mut r = access
        .stream(&peer("admin"), query(1, false))
        .await
        .unwrap();
    let items = drain(&mut r).await;
    assert_eq!(
        items[0],
        StreamItem::Gap {
            from: 1,
            to: pruned.oldest - 1,
            pruned: true
        }
    );
    assert_eq!(seqs(&items)[0], pruned.oldest);
}

#[tokio::test]
async fn successful_reads_leave_usage_facts() {
    let fx = setup(1000).await;
    let mut r = call(&fx, "app", "BatchFetchSecrets", "db", 0);
    r.targets = vec![("db".into(), 2), ("db".into(), 3), ("gone".into(), 0)];
    r.target_codes = vec![0, 9, 5];
    fx.log.append(r).await.unwrap();
    fx.clock.advance(1000);
    fx.log
        .append(call(&fx, "app", "FetchSecret", "db", 0))
        .await
        .unwrap();
    // Writes and refusals are not uses.
    fx.log
        .append(call(&fx, "admin", "PutSecret", "db", 0))
        .await
        .unwrap();
    fx.log
        .append(call(&fx, "app", "FetchSecret", "other", 7))
        .await
        .unwrap();
    // Within a minute of the last write a use is not written again; after it, it is.
    fx.clock.advance(30_000);
    fx.log
        .append(call(&fx, "app", "FetchSecret", "db", 0))
        .await
        .unwrap();
    assert_eq!(fx.log.usage("db").unwrap()[0].1.seq, 2);
    fx.clock.advance(30_000);
    fx.log
        .append(call(&fx, "app", "FetchSecret", "db", 0))
        .await
        .unwrap();
    let now = fx.clock.now_ms();
    let usage = fx.log.usage("db").unwrap();
    assert_eq!(
        usage,
        [
            (
                1,
                UsageFact {
                    last_used_ms: now,
                    seq: 6
                }
            ),
            (
                2,
                UsageFact {
                    last_used_ms: now - 61_000,
                    seq: 1
                }
            ),
        ]
    );
    assert!(fx.log.usage("other").unwrap().is_empty());
    assert!(fx.log.usage("gone").unwrap().is_empty());
}

#[tokio::test]
async fn the_head_survives_a_restart() {
    let fx = setup(5).await;
    calls(&fx, 2, 0).await;
    let again = AuditLog::open(
        fx.store.clone(),
        fx.clock.clone(),
        fx.log.signer().clone(),
        fx.log.settings().clone(),
    )
    .unwrap();
    assert_eq!(again.durable_head(), 2);
    again
        .append(call(&fx, "admin", "FetchSecret", "b", 0))
        .await
        .unwrap();
    assert!(again.checkpoint().await.unwrap().is_some());
    assert!(again.checkpoint().await.unwrap().is_none());
    let v = again.verify(0, 0).await.unwrap();
    assert!(v.ok(), "{v:?}");
    assert_eq!((v.records_checked, v.checkpoints_verified), (4, 1));
    assert_eq!(record_at(&fx, 3).prev_hash, record_at(&fx, 2).encode().1);
}

/// The downgrade the unchained format 1 allowed: the signed start of the log replaced by
/// "legacy" records, and a forged tail chained from genesis after them. Format 1 is no longer
/// a record, and a chain may start from genesis only at record 1.
#[tokio::test]
async fn a_tail_rechained_from_genesis_after_legacy_records_is_refused() {
    let fx = setup(5).await;
    calls(&fx, 7, 0).await;
    fx.log.checkpoint().await.unwrap();
    let head = fx.log.durable_head();
    for seq in 1..=head - 2 {
        put_raw(&fx, seq, Some(vec![1, 0, 0, 0]));
    }
    let mut prev = GENESIS;
    for seq in head - 1..=head {
        let mut r = record_at(&fx, seq);
        r.identity = "forger".into();
        r.prev_hash = prev;
        let (stored, hash) = r.encode();
        put_raw(&fx, seq, Some(stored));
        prev = hash;
    }
    let v = fx.log.verify(0, 0).await.unwrap();
    let b = v.first_broken.expect("the downgraded log verified");
    assert_eq!(
        (b.seq, b.problem),
        (1, Problem::Undecodable),
        "{}",
        b.reason
    );
    // Checked from the forged tail on, the link into it fails.
    let v = fx.log.verify(head - 1, 0).await.unwrap();
    let b = v.first_broken.expect("the forged tail verified");
    assert_eq!(b.seq, head - 2, "{}", b.reason);
    // The same tail over deleted records (a log that looks pruned) may not restart from genesis.
    for seq in 1..=head - 2 {
        put_raw(&fx, seq, None);
    }
    let reopen = || {
        AuditLog::open(
            fx.store.clone(),
            fx.clock.clone(),
            fx.log.signer().clone(),
            fx.log.settings().clone(),
        )
        .unwrap()
    };
    let b = reopen().verify(0, 0).await.unwrap().first_broken.unwrap();
    assert_eq!(
        (b.seq, b.problem),
        (head - 1, Problem::Unlinked),
        "{}",
        b.reason
    );
    // Nor start from anything else, with a forged prune record to account for the deleted
    // prefix: a pruned log keeps a checkpoint over its first record, and a forger has none.
    let mut prune = AuditRecord::system(
        PRUNE_METHOD,
        fx.clock.now_ms(),
        Event::Prune { below: head - 1 },
    );
    prune.seq = head - 1;
    prune.prev_hash = [7; 32];
    let (stored, hash) = prune.encode();
    put_raw(&fx, head - 1, Some(stored));
    let mut last = call(&fx, "forger", "FetchSecret", "s/0", 0);
    last.seq = head;
    last.prev_hash = hash;
    put_raw(&fx, head, Some(last.encode().0));
    let v = reopen().verify(0, 0).await.unwrap();
    let b = v.first_broken.expect("a forged pruned log verified");
    assert_eq!(
        (b.seq, b.problem),
        (head - 1, Problem::Unsigned),
        "{}",
        b.reason
    );
}

#[tokio::test]
async fn a_garbled_last_record_is_reported_not_fatal() {
    let fx = setup(5).await;
    calls(&fx, 3, 0).await;
    put_raw(&fx, 3, Some(b"garbage".to_vec()));
    let log = AuditLog::open(
        fx.store.clone(),
        fx.clock.clone(),
        fx.log.signer().clone(),
        fx.log.settings().clone(),
    )
    .unwrap();
    log.append(call(&fx, "admin", "FetchSecret", "a", 0))
        .await
        .unwrap();
    assert_eq!(
        broken(&log.verify(0, 0).await.unwrap()),
        (3, Problem::Undecodable)
    );
}

/// Writers contending on one compare-and-set key, many at once, so that their commits are
/// combined: every increment that was acknowledged is counted exactly once (no
/// lost update between parts of one combined commit), and the chain holds exactly one record
/// per acknowledged write, gapless.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn combined_writes_keep_compare_and_set_and_the_chain() {
    let fx = Arc::new(setup(1000).await);
    let tasks: Vec<_> = (0..8)
        .map(|t| {
            let fx = fx.clone();
            tokio::spawn(async move {
                let mut done = 0u64;
                let mut conflicts = 0u64;
                while done < 30 {
                    let current = fx.store.get(Tree::Meta, b"counter").unwrap();
                    let n = current
                        .as_deref()
                        .map_or(0, |v| u64::from_be_bytes(v.try_into().unwrap()));
                    let mut b = Batch::new();
                    b.guard(Tree::Meta, b"counter".to_vec(), current);
                    b.put(
                        Tree::Meta,
                        b"counter".to_vec(),
                        (n + 1).to_be_bytes().to_vec(),
                    );
                    b.put(Tree::Meta, format!("own-{t}-{done}").into_bytes(), vec![1]);
                    let mut rec = call(&fx, &format!("id{t}"), "PutSecret", "counter", 0);
                    match fx.log.commit(b, &mut rec).await {
                        Ok(()) => {
                            assert!(rec.seq > 0);
                            done += 1;
                        }
                        Err(StoreError::Conflict) => {
                            assert_eq!(rec.seq, 0);
                            conflicts += 1;
                        }
                        Err(e) => panic!("{e}"),
                    }
                }
                conflicts
            })
        })
        .collect();
    let mut conflicts = 0;
    for t in tasks {
        conflicts += t.await.unwrap();
    }
    let counter = fx.store.get(Tree::Meta, b"counter").unwrap().unwrap();
    assert_eq!(u64::from_be_bytes(counter.try_into().unwrap()), 240);
    assert_eq!(
        fx.store.scan(Tree::Meta, b"own-", b"", 1000).unwrap().len(),
        240
    );
    let all = fx.store.scan(Tree::Audit, b"", b"", 1000).unwrap();
    let seqs: Vec<u64> = all.iter().map(|(k, _)| key_seq(k).unwrap()).collect();
    assert_eq!(seqs, (1..=240).collect::<Vec<_>>(), "{conflicts} conflicts");
    fx.store.sync().await.unwrap();
    let mut last = call(&fx, "admin", "FetchSecret", "counter", 0);
    last.code = 0;
    fx.log.append(last).await.unwrap();
    let v = fx.log.verify(0, 0).await.unwrap();
    assert!(v.ok(), "{v:?}");
    assert_eq!(v.records_checked, 241);
}

#[test]
fn outcome_filters_parse_and_refusals_quote_only_an_excerpt() {
    assert_eq!(Outcome::parse("").unwrap(), Outcome::Any);
    assert_eq!(Outcome::parse(" error ").unwrap(), Outcome::Error);
    assert_eq!(
        Outcome::parse("permission_denied").unwrap(),
        Outcome::Code(7)
    );
    // Found by the fuzz target `request`: the filter was quoted whole into the message, and a
    // large one broke the reply's headers.
    let e = Outcome::parse(&"\u{7}".repeat(100_000)).unwrap_err();
    assert_eq!(e.code(), crate::error::Code::InvalidArgument);
    assert!(e.to_string().len() < 512, "{:.80}", e.to_string());
}
