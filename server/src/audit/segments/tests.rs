//! The segment files on their own: framing across rolls, reads from anywhere, torn-tail
//! recovery, refusal of damaged or missing files, interrupted rolls, retention by whole
//! segments and recovery after a failed write.

use super::*;
use std::path::Path;

const SIZE: u64 = MIN_SEGMENT_SIZE;
/// Payload of most test records: about a dozen fill a segment.
const LEN: usize = 20_000;

/// Record `seq`'s payload: `len` non-zero bytes that depend on `seq` (the last 32 are the
/// "hash" the segment files keep of the last record).
fn payload(seq: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| 1 + ((seq as usize * 31 + i * 7) % 251) as u8)
        .collect()
}

/// Appends `seqs`, each a group of its own (`per_group` 1) or `per_group` to a sync.
fn write(s: &Segments, seqs: std::ops::RangeInclusive<u64>, len: usize, per_group: u64) {
    for seq in seqs {
        s.append(seq, &payload(seq, len)).unwrap();
        if seq % per_group == 0 {
            s.sync_blocking().unwrap();
        }
    }
    s.sync_blocking().unwrap();
}

/// A new directory for a log (removed when the first value is dropped).
fn scratch() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("audit");
    (dir, d)
}

fn open(dir: &Path) -> (Arc<Segments>, Tail) {
    Segments::open(dir, SIZE).unwrap()
}

fn refused(dir: &Path) -> String {
    match Segments::open(dir, SIZE) {
        Err(SegmentError::Damaged(m)) => m,
        Err(e) => panic!("refused as {e}, not as damaged"),
        Ok(_) => panic!("damaged segment files were opened"),
    }
}

/// Opening is refused with a message naming segment `first` and saying `why`.
fn refused_naming(dir: &Path, first: u64, why: &str) {
    let m = refused(dir);
    assert!(m.contains(&segment_name(first)) && m.contains(why), "{m}");
}

fn firsts(dir: &Path) -> Vec<u64> {
    let mut out: Vec<u64> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| parse_name(e.unwrap().file_name().to_str().unwrap()).unwrap())
        .collect();
    out.sort_unstable();
    out
}

fn path(dir: &Path, first: u64) -> PathBuf {
    dir.join(segment_name(first))
}

/// Every record, checked to be `from..=to` with the payloads written (`len` each).
fn assert_records(s: &Segments, from: u64, to: u64, len: usize) {
    let all = s.read(from, usize::MAX, u64::MAX).unwrap();
    let seqs: Vec<u64> = all.iter().map(|(q, _)| *q).collect();
    assert_eq!(seqs, (from..=to).collect::<Vec<_>>());
    for (seq, r) in all {
        assert_eq!(r.unwrap(), payload(seq, len), "record {seq}");
    }
}

/// Offset just past the last non-zero byte before the footer: the end of what was written
/// into an active segment (payloads have no zero bytes at their end).
fn written_end(file: &Path) -> u64 {
    let bytes = std::fs::read(file).unwrap();
    let body = &bytes[..bytes.len() - EDGE as usize];
    (body.iter().rposition(|b| *b != 0).unwrap() + 1) as u64
}

fn xor_at(file: &Path, at: u64, mask: u8) {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(file)
        .unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, at).unwrap();
    b[0] ^= mask;
    f.write_all_at(&b, at).unwrap();
}

#[test]
fn records_round_trip_across_rolls_and_read_from_anywhere() {
    let (_dir, d) = scratch();
    let (s, tail) = open(&d);
    assert!(tail.last.is_none());
    assert_eq!((s.durable(), s.oldest(), s.count()), (0, 0, 0));
    // Single groups, then groups of 5 that straddle rolls.
    write(&s, 1..=30, LEN, 1);
    write(&s, 31..=60, LEN, 5);
    assert_eq!(s.durable(), 60);
    let segs = firsts(&d);
    assert!(segs.len() >= 4, "{segs:?}");
    assert_eq!(s.count(), segs.len());
    assert_eq!(segs[0], 1);
    for w in segs.windows(2) {
        assert_eq!(s.segment_start(w[1] - 1), w[0]);
        assert_eq!(s.segment_start(w[1]), w[1]);
    }
    // Every start, with limits that end inside a segment, at its boundary or beyond.
    for from in 1..=60 {
        for limit in [1usize, 7, 13, 100] {
            let got = s.read(from, limit, u64::MAX).unwrap();
            let want: Vec<u64> = (from..=60).take(limit).collect();
            assert_eq!(got.iter().map(|(q, _)| *q).collect::<Vec<_>>(), want);
            for (seq, r) in got {
                assert_eq!(r.unwrap(), payload(seq, LEN));
            }
        }
    }
    // `through` bounds a read; nothing past the durable head is returned.
    let got = s.read(10, 100, 25).unwrap();
    assert_eq!(got.last().unwrap().0, 25);
    assert!(s.read(61, 10, u64::MAX).unwrap().is_empty());
    // Reopened: the same records, the last one as the tail, appends continue.
    drop(s);
    let (s, tail) = open(&d);
    assert_eq!(tail.last, Some((60, payload(60, LEN))));
    assert_eq!(tail.cut_bytes, 0);
    assert_records(&s, 1, 60, LEN);
    write(&s, 61..=70, LEN, 3);
    drop(s);
    let (s, _) = open(&d);
    assert_records(&s, 1, 70, LEN);
    assert!(firsts(&d).starts_with(&segs));
}

#[test]
fn a_torn_last_group_is_cut_and_the_log_continues() {
    for garble in ["last record", "group frame"] {
        let (_dir, d) = scratch();
        let (s, _) = open(&d);
        write(&s, 1..=20, LEN, 1);
        // The last group: 21..=23, written by one sync.
        for seq in 21..=23 {
            s.append(seq, &payload(seq, 1000)).unwrap();
        }
        s.sync_blocking().unwrap();
        drop(s);
        let active = path(&d, *firsts(&d).last().unwrap());
        let end = written_end(&active);
        let group_at = end - 3 * (FRAME_HEADER as u64 + 1000) - GROUP_FRAME as u64;
        match garble {
            // A crash while the group was written: its last bytes never reached the disk.
            "last record" => {
                let f = OpenOptions::new().write(true).open(&active).unwrap();
                f.write_all_at(&[0u8; 100], end - 100).unwrap();
            }
            _ => xor_at(&active, group_at + 20, 0x40),
        }
        let (mut s, tail) = open(&d);
        assert!(tail.cut_bytes > 0, "{garble}");
        // The torn group is cut whole (none of it was acknowledged); every group before it
        // stays.
        let head = s.durable();
        assert_eq!(head, 20, "{garble}");
        assert_eq!(tail.last.as_ref().map(|(q, _)| *q), Some(head));
        let all = s.read(1, usize::MAX, u64::MAX).unwrap();
        assert_eq!(all.len() as u64, head);
        assert!(all.iter().all(|(_, r)| r.is_ok()));
        // The log continues from there (in the same segment, then in new ones), and every
        // record written since survives the next openings.
        for (to, len) in [(26, 1000), (40, LEN)] {
            let from = s.durable() + 1;
            for seq in from..=to {
                s.append(seq, &payload(seq, len)).unwrap();
                s.sync_blocking().unwrap();
            }
            drop(s);
            for _ in 0..2 {
                let (again, tail) = open(&d);
                assert_eq!((again.durable(), tail.cut_bytes), (to, 0), "{garble}");
                let all = again.read(1, usize::MAX, u64::MAX).unwrap();
                assert_eq!(all.len() as u64, to, "{garble}");
                for (seq, r) in all.into_iter().skip(head as usize) {
                    let len = if seq <= 26 { 1000 } else { LEN };
                    assert_eq!(r.unwrap(), payload(seq, len), "{garble}: record {seq}");
                }
            }
            s = open(&d).0;
        }
    }
}

#[test]
fn a_damaged_record_before_a_later_group_is_refused() {
    let (_dir, d) = scratch();
    let (s, _) = open(&d);
    write(&s, 1..=5, 1000, 1);
    drop(s);
    let file = path(&d, 1);
    // Record 3's payload: groups 4 and 5 follow it.
    let record3 = EDGE + 2 * (GROUP_FRAME + FRAME_HEADER + 1000) as u64 + GROUP_FRAME as u64;
    xor_at(&file, record3 + FRAME_HEADER as u64 + 500, 1);
    let m = refused(&d);
    assert!(m.contains(&segment_name(1)), "{m}");
    assert!(m.contains("record 3"), "{m}");
    // Nothing was cut: the bytes are still there for an investigation.
    let five = EDGE + 5 * (GROUP_FRAME + FRAME_HEADER + 1000) as u64;
    assert_eq!(written_end(&file), five);
}

/// Appends records of [`LEN`] one at a time to an empty log until the second segment starts;
/// returns its first record.
fn until_second_segment(s: &Segments) -> u64 {
    let mut seq = 0;
    loop {
        seq += 1;
        s.append(seq, &payload(seq, LEN)).unwrap();
        s.sync_blocking().unwrap();
        if s.count() == 2 {
            return seq;
        }
    }
}

/// A log of several segments (1.., then more), closed.
fn several(d: &Path) -> Vec<u64> {
    let (s, _) = open(d);
    write(&s, 1..=50, LEN, 1);
    drop(s);
    let f = firsts(d);
    assert!(f.len() >= 4, "{f:?}");
    f
}

#[test]
fn missing_cut_unsealed_or_foreign_segments_are_refused_by_name() {
    // A missing middle segment.
    let (_dir, d) = scratch();
    let f = several(&d);
    std::fs::remove_file(path(&d, f[1])).unwrap();
    refused_naming(&d, f[2], "missing");

    // A truncated sealed segment (cut at the end, or to a few records).
    for keep in [SIZE - 1, SIZE / 2] {
        let (_dir, d) = scratch();
        let f = several(&d);
        let file = OpenOptions::new().write(true).open(path(&d, f[1])).unwrap();
        file.set_len(keep).unwrap();
        refused_naming(&d, f[1], "truncated");
    }

    // A sealed segment without its footer (not the last one, and not an interrupted roll:
    // the segment after it holds records).
    let (_dir, d) = scratch();
    let f = several(&d);
    let file = OpenOptions::new().write(true).open(path(&d, f[1])).unwrap();
    file.write_all_at(&[0u8; 64], SIZE - EDGE).unwrap();
    refused_naming(&d, f[1], "footer");
    // A footer edited (its checksum fails).
    let (_dir, d) = scratch();
    let f = several(&d);
    xor_at(&path(&d, f[0]), SIZE - EDGE + 9, 1);
    refused_naming(&d, f[0], "footer");

    // A bad header: edited, or another file's header (renamed), or not a segment at all.
    for case in ["edited", "renamed", "foreign"] {
        let (_dir, d) = scratch();
        let f = several(&d);
        let victim = path(&d, f[2]);
        match case {
            "edited" => xor_at(&victim, 13, 1),
            "renamed" => {
                std::fs::remove_file(&victim).unwrap();
                std::fs::copy(path(&d, f[1]), &victim).unwrap();
            }
            _ => {
                let file = OpenOptions::new().write(true).open(&victim).unwrap();
                file.write_all_at(&[b'x'; 64], 0).unwrap();
            }
        }
        let m = refused(&d);
        assert!(m.contains(&segment_name(f[2])), "{case}: {m}");
    }

    // A stray file in the directory.
    let (_dir, d) = scratch();
    several(&d);
    std::fs::write(d.join("notes.txt"), b"hi").unwrap();
    assert!(refused(&d).contains("notes.txt"));
}

#[test]
fn an_interrupted_roll_is_undone_and_a_finished_one_kept() {
    let (_dir, d) = scratch();
    let f = several(&d);
    let last = *f.last().unwrap();
    // A crash after the new segment was made and before the old one was sealed (the active
    // segment has no footer yet): an empty segment after it, and a leftover `.tmp`.
    let new = path(&d, 51);
    {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&new)
            .unwrap();
        file.set_len(SIZE).unwrap();
        file.write_all_at(&header(51, SIZE), 0).unwrap();
    }
    std::fs::write(d.join(format!("{}.tmp", segment_name(52))), b"").unwrap();
    let (s, tail) = open(&d);
    assert!(!new.exists(), "the half-made segment was kept");
    assert_eq!(*firsts(&d).last().unwrap(), last);
    assert_eq!((s.durable(), tail.last.map(|(q, _)| q)), (50, Some(50)));
    // The log continues, rolls again properly, and reopens whole.
    write(&s, 51..=80, LEN, 2);
    drop(s);
    let (s, _) = open(&d);
    assert_records(&s, 1, 80, LEN);
    drop(s);

    // A roll that finished (old segment sealed, new one empty): kept, and appended to.
    let (_dir, d) = scratch();
    let (s, _) = open(&d);
    let before = until_second_segment(&s);
    drop(s);
    // Make the second segment empty again: as if the crash came right after the roll.
    let second = path(&d, before);
    let file = OpenOptions::new().write(true).open(&second).unwrap();
    file.write_all_at(&vec![0u8; LEN + 100], EDGE).unwrap();
    drop(file);
    let (s, tail) = open(&d);
    assert_eq!(firsts(&d), [1, before]);
    assert_eq!(s.durable(), before - 1);
    assert_eq!(tail.last, Some((before - 1, payload(before - 1, LEN))));
    s.append(before, &payload(before, LEN)).unwrap();
    s.sync_blocking().unwrap();
    drop(s);
    let (s, _) = open(&d);
    assert_records(&s, 1, before, LEN);
}

#[test]
fn retention_removes_whole_segments_never_the_active_one() {
    let (_dir, d) = scratch();
    let f = several(&d);
    let (s, _) = open(&d);
    // Below the first segment's end: nothing.
    assert_eq!(s.remove_below(f[1] - 1).unwrap(), 1);
    assert_eq!(firsts(&d), f);
    // Inside the second segment: only the first goes.
    assert_eq!(s.remove_below(f[1] + 1).unwrap(), f[1]);
    assert_eq!(firsts(&d), f[1..]);
    assert_eq!(s.oldest(), f[1]);
    assert_records(&s, f[1], 50, LEN);
    assert!(s.read(1, 5, u64::MAX).unwrap()[0].0 == f[1]);
    // Exactly at a segment's start: the ones before it.
    assert_eq!(s.remove_below(f[2]).unwrap(), f[2]);
    assert_eq!(firsts(&d), f[2..]);
    // Everything: the active segment stays, and the log goes on.
    let active = *f.last().unwrap();
    assert_eq!(s.remove_below(u64::MAX).unwrap(), active);
    assert_eq!(firsts(&d), [active]);
    write(&s, 51..=55, LEN, 1);
    drop(s);
    let (s, _) = open(&d);
    assert_eq!(s.oldest(), active);
    assert_records(&s, active, 55, LEN);
}

#[test]
fn recovery_after_a_failed_write_drops_what_was_not_durable() {
    let (_dir, d) = scratch();
    let (s, _) = open(&d);
    write(&s, 1..=3, LEN, 1);
    // Record 5 cannot be written (larger than a segment): record 4's group is written and
    // sealed into its segment when the log rolls for record 5, which then fails; record 6,
    // buffered behind it, is not written. Until the log recovers, only 3 counts as durable.
    s.append(4, &payload(4, LEN)).unwrap();
    s.append(5, &payload(5, SIZE as usize)).unwrap();
    s.append(6, &payload(6, LEN)).unwrap();
    assert!(matches!(s.sync_blocking(), Err(SegmentError::Io(_))));
    assert!(s.failed());
    assert_eq!(s.durable(), 3);
    // Nothing is accepted until the log recovers.
    assert!(matches!(
        s.append(5, &payload(5, LEN)),
        Err(SegmentError::Io(_))
    ));
    let tail = s.recover().unwrap();
    assert!(!s.failed());
    assert_eq!(tail.last, Some((4, payload(4, LEN))));
    assert_eq!(s.durable(), 4);
    assert_records(&s, 1, 4, LEN);
    // The chain goes on from 5.
    write(&s, 5..=20, LEN, 1);
    drop(s);
    let (s, tail) = open(&d);
    assert_eq!(tail.cut_bytes, 0);
    assert_records(&s, 1, 20, LEN);
}

#[test]
fn sizes_below_the_minimum_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    assert!(matches!(
        Segments::open(&dir.path().join("audit"), SIZE - 1),
        Err(SegmentError::Damaged(_))
    ));
}

#[test]
fn many_small_records_are_found_through_the_index() {
    // More than INDEX_EVERY records to a segment, in groups of 7: reads start from index
    // entries inside segments, written as records arrive, rebuilt on reopening.
    let (_dir, d) = scratch();
    let (s, _) = open(&d);
    let n = 3000;
    write(&s, 1..=n, 200, 7);
    assert!(s.count() >= 2, "{}", s.count());
    let check = |s: &Segments| {
        for from in (1..=n).step_by(37).chain([127, 128, 129, 255, 256, 257, n]) {
            let got = s.read(from, 3, u64::MAX).unwrap();
            let want: Vec<u64> = (from..=n).take(3).collect();
            assert_eq!(got.iter().map(|(q, _)| *q).collect::<Vec<_>>(), want);
            for (seq, r) in got {
                assert_eq!(r.unwrap(), payload(seq, 200));
            }
        }
    };
    check(&s);
    drop(s);
    let (s, _) = open(&d);
    check(&s);
}

#[test]
fn a_torn_first_group_of_a_segment_leaves_the_sealed_one_as_the_tail() {
    let (_dir, d) = scratch();
    let (s, _) = open(&d);
    let first = until_second_segment(&s);
    drop(s);
    // The new segment's only group loses its last bytes (a crash during its write).
    let second = path(&d, first);
    let end = written_end(&second);
    let f = OpenOptions::new().write(true).open(&second).unwrap();
    f.write_all_at(&[0u8; 10], end - 10).unwrap();
    drop(f);
    let (s, tail) = open(&d);
    assert!(tail.cut_bytes > 0);
    assert_eq!(s.durable(), first - 1);
    assert_eq!(tail.last, Some((first - 1, payload(first - 1, LEN))));
    write(&s, first..=first + 5, LEN, 1);
    drop(s);
    let (s, tail) = open(&d);
    assert_eq!(tail.cut_bytes, 0);
    assert_records(&s, 1, first + 5, LEN);
    assert_eq!(firsts(&d), [1, first]);
}

#[test]
fn a_changed_segment_size_applies_to_new_segments_only() {
    // `audit.segment_bytes` changed between two runs, up or down, while the active segment
    // is partly (or more than the new size) full.
    for (old, new, before) in [(SIZE, 2 * SIZE, 5), (2 * SIZE, SIZE, 20)] {
        let (_dir, d) = scratch();
        let (s, _) = Segments::open(&d, old).unwrap();
        write(&s, 1..=before, LEN, 1);
        drop(s);
        let (s, _) = Segments::open(&d, new).unwrap();
        write(&s, before + 1..=60, LEN, 1);
        drop(s);
        let (s, tail) = Segments::open(&d, new).unwrap();
        assert_eq!(tail.cut_bytes, 0);
        assert_records(&s, 1, 60, LEN);
        let sizes: Vec<u64> = firsts(&d)
            .iter()
            .map(|f| std::fs::metadata(path(&d, *f)).unwrap().len())
            .collect();
        assert_eq!(sizes[0], old, "{sizes:?}");
        assert!(sizes[1..].iter().all(|s| *s == new), "{sizes:?}");
    }
}

#[test]
fn an_edited_record_in_a_sealed_segment_is_reported_by_the_read_that_reaches_it() {
    let (_dir, d) = scratch();
    let f = several(&d);
    // Record 3 of the first (sealed) segment: one group per record of LEN bytes.
    let frame = (GROUP_FRAME + FRAME_HEADER + LEN) as u64;
    let record3 = EDGE + 2 * frame + GROUP_FRAME as u64;
    xor_at(&path(&d, 1), record3 + FRAME_HEADER as u64 + 10, 4);
    // Opening checks sealed segments' edges only; the read stops at the damage and says
    // where it is.
    let (s, _) = open(&d);
    let got = s.read(1, usize::MAX, u64::MAX).unwrap();
    assert_eq!(got.len(), 3);
    assert!(got[..2].iter().all(|(_, r)| r.is_ok()));
    let (seq, r) = &got[2];
    let why = r.as_ref().unwrap_err();
    assert_eq!(*seq, 3);
    assert!(
        why.contains(&segment_name(1)) && why.contains("checksum"),
        "{why}"
    );
    // Reads that start after it are not affected; one that starts at it fails there.
    assert_records(&s, 4, 50, LEN);
    assert_eq!(s.read(f[1], 1, u64::MAX).unwrap()[0].0, f[1]);
    let at3 = s.read(3, 5, u64::MAX).unwrap();
    assert_eq!(at3.len(), 1);
    assert_eq!(at3[0].0, 3);
    assert!(at3[0].1.is_err());
    drop(s);

    // Groups of five: a read that starts inside the damaged group fails at its start, not
    // before it; one that starts in the next group reads on.
    let (_dir, d) = scratch();
    let (s, _) = open(&d);
    write(&s, 1..=30, LEN, 5);
    drop(s);
    assert!(firsts(&d).len() > 1);
    let record2 = EDGE + (GROUP_FRAME + FRAME_HEADER + LEN) as u64;
    xor_at(&path(&d, 1), record2 + FRAME_HEADER as u64 + 10, 4);
    let (s, _) = open(&d);
    let got = s.read(4, 10, u64::MAX).unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].0, 4);
    assert!(got[0].1.is_err());
    assert_records(&s, 6, 30, LEN);
}
