//! Opening the segment files: checking every header and footer and that the segments follow
//! one another, reading the active segment to its end, and telling a torn tail (cut) from
//! damage (refused) — see the parent module.

use super::format::*;
use super::{damaged, io_err, read_range, stored_hash, Disk, Segment, SegmentError, Tail};
use super::{parse_name, segment_name};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

/// Opens segment `first` and checks its header and that it still has the size it was
/// created with. Returns the file and that size.
pub(super) fn open_segment(path: &Path, first: u64) -> Result<(File, u64), SegmentError> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| io_err(path.display(), e))?;
    let len = file
        .metadata()
        .map_err(|e| io_err(path.display(), e))?
        .len();
    let h = read_edge(&file, 0, path, "header")?;
    if &h[..8] != HEADER_MAGIC || u32::from_le_bytes([h[8], h[9], h[10], h[11]]) != VERSION {
        return Err(damaged(path, "not a Ward audit segment"));
    }
    if u64_at(&h, 12) != first {
        return Err(damaged(
            path,
            format!("its header says it starts at record {}", u64_at(&h, 12)),
        ));
    }
    let made = u64_at(&h, 20);
    if len != made || made < MIN_SEGMENT_SIZE {
        return Err(damaged(
            path,
            format!("{len} bytes, but it was created with {made}: truncated or extended"),
        ));
    }
    Ok((file, made))
}

/// The footer of a sealed segment: (last seq, last hash, end of frames).
pub(super) fn read_footer(file: &File, path: &Path) -> Result<(u64, [u8; 32], u64), SegmentError> {
    let len = file
        .metadata()
        .map_err(|e| io_err(path.display(), e))?
        .len();
    let f = read_edge(file, len - EDGE, path, "footer (it is not sealed)")?;
    if &f[..8] != FOOTER_MAGIC {
        return Err(damaged(path, "no footer: the segment was not sealed"));
    }
    let mut hash = [0u8; 32];
    hash.copy_from_slice(&f[16..48]);
    Ok((u64_at(&f, 8), hash, u64_at(&f, 48)))
}

/// What reading the active segment found.
pub(super) struct Active {
    /// End of the last whole group.
    pub(super) end: u64,
    pub(super) index: Vec<(u64, u64)>,
    /// The last record (seq, stored bytes).
    pub(super) last: Option<(u64, Vec<u8>)>,
    /// Bytes of torn tail cut.
    pub(super) cut: u64,
}

/// Reads the active segment to its end; a torn last group is cut (see the module docs).
pub(super) fn recover_active(file: &File, path: &Path, first: u64) -> Result<Active, SegmentError> {
    let len = file
        .metadata()
        .map_err(|e| io_err(path.display(), e))?
        .len();
    let limit = len - EDGE;
    let mut c = Cursor::new(file, EDGE, limit);
    let mut a = Active {
        end: EDGE,
        index: Vec::new(),
        last: None,
        cut: 0,
    };
    let mut next = first;
    let io = |e: io::Error| io_err(path.display(), e);
    loop {
        let group_at = c.offset();
        let group = match c.peek().map_err(io)? {
            Parsed::End => return Ok(a),
            Parsed::Frame(f) if f.kind == TYPE_GROUP => f,
            _ => return torn(file, path, a, group_at, group_at + 1, next),
        };
        let payload = group.payload(c.here());
        let end = u64_at(payload, 0);
        let count = u32::from_le_bytes([payload[8], payload[9], payload[10], payload[11]]);
        if end > limit || end <= group_at {
            return torn(file, path, a, group_at, group_at + 1, next);
        }
        c.skip(group.len);
        let mut index = Vec::new();
        let mut group_last = None;
        for _ in 0..count {
            let at = c.offset();
            match c.peek().map_err(io)? {
                // Whole frames only; whether the records follow one another is the chain's
                // business (VerifyAuditLog reports a missing or misplaced record there).
                Parsed::Frame(f) if f.kind == TYPE_RECORD && at + (f.len as u64) <= end => {
                    if f.seq.is_multiple_of(INDEX_EVERY) || (a.index.is_empty() && index.is_empty())
                    {
                        index.push((f.seq, at));
                    }
                    group_last = Some((f.seq, f.payload(c.here()).to_vec()));
                    c.skip(f.len);
                }
                _ => return torn(file, path, a, group_at, end, next),
            }
        }
        if c.offset() != end {
            return torn(file, path, a, group_at, end, next);
        }
        if let Some((seq, payload)) = group_last {
            next = seq + 1;
            a.last = Some((seq, payload));
        }
        a.index.extend(index);
        a.end = end;
    }
}

/// The group at `at` is not whole: if another group follows (searched from `from`), records
/// that were durable are damaged; otherwise the group was torn by a crash during its write —
/// so its `fdatasync` never returned and none of it was acknowledged — and it is cut.
pub(super) fn torn(
    file: &File,
    path: &Path,
    mut a: Active,
    at: u64,
    from: u64,
    next: u64,
) -> Result<Active, SegmentError> {
    let limit = file
        .metadata()
        .map_err(|e| io_err(path.display(), e))?
        .len()
        - EDGE;
    // Only a group written after these records were durable proves them acknowledged.
    let later = find_group(file, from, limit, |_, durable_through| {
        durable_through >= next
    })
    .map_err(|e| io_err(path.display(), e))?;
    if let Some((off, seq)) = later {
        return Err(damaged(
            path,
            format!(
                "the group at offset {at} (from record {next}) is damaged, and a later group \
                 (record {seq}, offset {off}) follows it: records that were durable were altered"
            ),
        ));
    }
    zero_from(file, at).map_err(|e| io_err(path.display(), e))?;
    a.cut = limit - at;
    a.end = at;
    Ok(a)
}

/// Looks from `from` on for a valid group frame that `accept(first record, durable point when
/// it was written)` takes: (its offset, its first record). Recovery asks for one written after
/// the damaged records were durable — groups written while they were still being synced (up
/// to [`SYNCS`](super::SYNCS) overlap) do not count, since a crash can tear an earlier group and keep a later
/// one; a read asks for the next group at all.
pub(super) fn find_group(
    file: &File,
    from: u64,
    limit: u64,
    accept: impl Fn(u64, u64) -> bool,
) -> io::Result<Option<(u64, u64)>> {
    let mut at = from;
    while at + (GROUP_FRAME as u64) <= limit {
        let n = (READ_CHUNK as u64 + GROUP_FRAME as u64).min(limit - at) as usize;
        let mut buf = vec![0u8; n];
        file.read_exact_at(&mut buf, at)?;
        for i in 0..n.saturating_sub(GROUP_FRAME - 1) {
            let b = &buf[i..];
            if b[8] != TYPE_GROUP || b[4..8] != (GROUP_PAYLOAD as u32).to_le_bytes() {
                continue;
            }
            if let Parsed::Frame(f) = parse_frame(&b[..GROUP_FRAME], GROUP_FRAME as u64) {
                if accept(f.seq, u64_at(&b[FRAME_HEADER..], 12)) {
                    return Ok(Some((at + i as u64, f.seq)));
                }
            }
        }
        at += n.saturating_sub(GROUP_FRAME - 1).max(1) as u64;
    }
    Ok(None)
}

/// Zeros everything from `from` to the end (footer space included) and keeps it allocated.
pub(super) fn zero_from(file: &File, from: u64) -> io::Result<()> {
    let len = file.metadata()?.len();
    write_zeros(file, from, len)?;
    file.sync_all()
}

/// Writes zeros over `[from, to)`. Segments are filled with written zeros, not merely
/// allocated: writing into allocated-but-unwritten extents makes every `fdatasync` journal the
/// extents' conversion too (measured here: 0.55 ms per write and `fdatasync` against 0.30 ms).
pub(super) fn write_zeros(file: &File, from: u64, to: u64) -> io::Result<()> {
    const CHUNK: usize = 1 << 20;
    let zeros = vec![0u8; CHUNK];
    let mut at = from;
    while at < to {
        let n = (to - at).min(CHUNK as u64) as usize;
        file.write_all_at(&zeros[..n], at)?;
        at += n as u64;
    }
    Ok(())
}

pub(super) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Reads the segments in `dir`: the sealed ones' headers and footers, the active one whole.
pub(super) fn load(dir: &Path) -> Result<(Vec<Arc<Segment>>, Disk, Tail), SegmentError> {
    crate::harden::create_private_dir(dir).map_err(SegmentError::Io)?;
    let mut firsts = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| io_err(dir.display(), e))? {
        let entry = entry.map_err(|e| io_err(dir.display(), e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.ends_with(".seg.tmp") {
            // A segment whose creation a crash interrupted: never used.
            std::fs::remove_file(entry.path()).map_err(|e| io_err(name, e))?;
            continue;
        }
        match parse_name(&name) {
            Some(first) => firsts.push(first),
            None => {
                return Err(damaged(
                    &entry.path(),
                    "unexpected file in the audit directory",
                ))
            }
        }
    }
    firsts.sort_unstable();
    if let [.., before, last] = firsts[..] {
        // A roll interrupted after the new segment was made and before the old one was
        // sealed: the new one is empty and the old one has no footer. Undo the roll.
        let path = dir.join(segment_name(last));
        let prev = dir.join(segment_name(before));
        let (prev_file, _) = open_segment(&prev, before)?;
        if read_footer(&prev_file, &prev).is_err()
            && recover_active(&open_segment(&path, last)?.0, &path, last)?
                .last
                .is_none()
        {
            std::fs::remove_file(&path).map_err(|e| io_err(path.display(), e))?;
            sync_dir(dir).map_err(|e| io_err(dir.display(), e))?;
            firsts.pop();
            tracing::warn!(segment = %path.display(), "removed a segment whose roll a crash interrupted");
        }
    }
    let mut list = Vec::with_capacity(firsts.len() + 1);
    let mut disk = Disk {
        written: EDGE,
        last: None,
        durable_at: (0, EDGE),
    };
    let mut tail = Tail::default();
    for (i, &first) in firsts.iter().enumerate() {
        let path = dir.join(segment_name(first));
        let (file, size) = open_segment(&path, first)?;
        if let Some((seq, _)) = disk.last {
            if seq + 1 != first {
                return Err(damaged(
                    &path,
                    format!(
                        "starts at record {first}, but the segment before it ends at record {seq}: \
                         a segment is missing or was replaced"
                    ),
                ));
            }
        } else if i > 0 {
            return Err(damaged(&path, "follows an empty sealed segment"));
        }
        if i + 1 < firsts.len() {
            let (last_seq, last_hash, end) = read_footer(&file, &path)?;
            if last_seq < first {
                return Err(damaged(&path, "its footer names no record"));
            }
            disk.last = Some((last_seq, last_hash));
            list.push(Arc::new(Segment {
                first,
                path,
                file,
                size,
                end: AtomicU64::new(end),
                index: Mutex::new(None),
            }));
        } else {
            let a = recover_active(&file, &path, first)?;
            if a.cut > 0 {
                tracing::warn!(segment = %path.display(), offset = a.end, "cut a torn audit log tail (a crash during a write that was never acknowledged)");
            }
            disk.written = a.end;
            disk.durable_at = (first, a.end);
            match &a.last {
                Some((seq, payload)) => disk.last = Some((*seq, stored_hash(payload))),
                None if i > 0 => {
                    // An empty active segment: the last record is the sealed one's.
                    let prev = &list[i - 1];
                    let seq = disk.last.map(|(s, _)| s).unwrap_or(0);
                    tail.last = read_range(prev, seq, 1, seq)?
                        .pop()
                        .and_then(|(s, r)| r.ok().map(|p| (s, p)));
                }
                None => {}
            }
            if a.last.is_some() {
                tail.last = a.last.clone();
            }
            tail.cut_bytes = a.cut;
            list.push(Arc::new(Segment {
                first,
                path,
                file,
                size,
                end: AtomicU64::new(a.end),
                index: Mutex::new(Some(a.index)),
            }));
        }
    }
    Ok((list, disk, tail))
}
