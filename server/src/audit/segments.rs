//! The audit log's files: fixed-size, preallocated, append-only segment files under
//! `data_dir/audit/`, one appender, group `fdatasync`.
//!
//! # Layout
//!
//! A segment is named after the sequence number of its first record (`{first:020}.seg`) and
//! is exactly `segment_size` bytes, allocated when it is created (so appending never needs
//! space, nor a metadata update, until the next segment). Integers are little-endian.
//!
//! ```text
//! header  (64 bytes at 0)      "WARDAUD1" u32 version=1 u64 first_seq u64 segment_size
//!                              zeros… u32 crc32c(bytes 0..60)
//! frames  (from 64)            u32 crc32c(rest of the frame) u32 len u8 type u64 seq
//!                              len bytes of payload
//!   type 1 (group):            payload = u64 end offset of the group's last frame
//!                              u32 records, u64 the highest record durable when the
//!                              group was written; seq = the group's first record
//!   type 2 (record):           payload = the record as stored (body || H(body))
//! zeros                        where nothing was written yet (len 0: the end)
//! footer  (64 bytes at size-64, once sealed)
//!                              "WARDEND1" u64 last_seq [32] last_hash u64 end offset
//!                              zeros… u32 crc32c(bytes 0..60)
//! ```
//!
//! # Writing
//!
//! Records are appended to a buffer under the caller's lock (no I/O). [`Segments::sync`]
//! writes the buffered records as one *group* — a group frame naming where the group ends and
//! how far the log was durable when it was written, then its records — with one `write`, then
//! `fdatasync`s the file outside the write lock. Up to [`SYNCS`] syncs run at once (the kernel
//! merges concurrent cache flushes); a sync makes durable everything written before it started.
//! When the next group does not fit, the segment is sealed (footer, `fdatasync`) and a new one
//! is created (`.tmp`, allocated, header, `fsync`, renamed, directory `fsync`).
//!
//! # Recovery
//!
//! Sealed segments must have their header and footer, and follow one another without a gap
//! (footer's last sequence number + 1 = the next segment's first). In the last segment,
//! groups are read until the zeros. An invalid frame in a group is a torn write — a crash
//! before that group's `fdatasync` returned, so none of it was acknowledged — and the log is
//! cut at the group, unless a later group says it was written after the damaged group's records
//! were durable: that is damage to acknowledged records, and opening fails. Anything else
//! wrong — a missing, truncated or renamed segment, a bad header or footer — fails opening
//! with a message that names the file.

use crate::faults::Faults;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};

const HEADER_MAGIC: &[u8; 8] = b"WARDAUD1";
const FOOTER_MAGIC: &[u8; 8] = b"WARDEND1";
const VERSION: u32 = 1;
/// Header and footer size.
const EDGE: u64 = 64;
/// crc, len, type, seq.
const FRAME_HEADER: usize = 4 + 4 + 1 + 8;
/// A group frame's payload: end offset, record count, the durable point when it was written.
const GROUP_PAYLOAD: usize = 8 + 4 + 8;
const GROUP_FRAME: usize = FRAME_HEADER + GROUP_PAYLOAD;
const TYPE_GROUP: u8 = 1;
const TYPE_RECORD: u8 = 2;
/// One index entry per this many records of a segment.
const INDEX_EVERY: u64 = 128;
/// Bytes read per read call when scanning.
const READ_CHUNK: usize = 256 * 1024;
/// Smallest segment allowed: the largest record (bounded to about 70 KiB) must fit twice.
pub const MIN_SEGMENT_SIZE: u64 = 256 * 1024;

/// Why the segment files cannot be used.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SegmentError {
    /// Reading or writing failed (full disk, I/O error): the log is unavailable.
    #[error("audit log I/O: {0}")]
    Io(String),
    /// The files are damaged, missing or not a log: refuse, and say which and why.
    #[error("audit log damaged: {0}")]
    Damaged(String),
}

fn io_err(what: impl std::fmt::Display, e: io::Error) -> SegmentError {
    SegmentError::Io(format!("{what}: {e}"))
}

fn damaged(path: &Path, why: impl std::fmt::Display) -> SegmentError {
    SegmentError::Damaged(format!("{}: {why}", path.display()))
}

/// One segment file.
struct Segment {
    first: u64,
    path: PathBuf,
    file: File,
    /// Its size, as its header says: the configured size when it was created, which may
    /// since have changed (a new size applies to new segments only).
    size: u64,
    /// Readers read frames up to here: the end of the last durable group (of the footer's
    /// end once sealed).
    end: AtomicU64,
    /// Sparse index (seq, frame offset), every [`INDEX_EVERY`] records; kept as records are
    /// written, built on first read for a segment found sealed at start-up.
    index: Mutex<Option<Vec<(u64, u64)>>>,
}

/// Records appended and not yet written.
#[derive(Default)]
struct Pending {
    /// Their frames, back to back.
    buf: Vec<u8>,
    /// (seq, start of its frame in `buf`).
    bounds: Vec<(u64, usize)>,
    /// Set after a failed write or sync: nothing is accepted until [`Segments::recover`].
    failed: bool,
}

/// The writing end, under its lock (held for writes and rolls, never for an `fdatasync`).
struct Disk {
    /// Offset after the last group written to the active (last) segment.
    written: u64,
    /// The last record written (seq, hash).
    last: Option<(u64, [u8; 32])>,
    /// Where the last durable group ends: (the segment's first record, offset).
    durable_at: (u64, u64),
}

/// The segment files of one log.
pub struct Segments {
    dir: PathBuf,
    size: u64,
    list: RwLock<Vec<Arc<Segment>>>,
    pending: Mutex<Pending>,
    disk: Mutex<Disk>,
    /// Highest durable sequence number (0: none).
    durable: AtomicU64,
    /// Highest sequence number an `fdatasync` in flight (or done) will make durable.
    covered: AtomicU64,
    /// Told when `durable` moves or a write fails.
    woken: tokio::sync::watch::Sender<()>,
    /// Groups written and synced at once (see [`Segments::sync`]).
    syncs: Arc<tokio::sync::Semaphore>,
    /// Whether the log needs [`Segments::recover`] before the next append.
    failed: AtomicBool,
    /// Counts [`Segments::recover`]s: records buffered before one are gone.
    reopened: AtomicU64,
    faults: Faults,
}

/// `fdatasync`s in flight at once. The kernel merges concurrent cache flushes, so a few
/// overlapping syncs make far more records durable per second than one at a time.
const SYNCS: usize = 4;

/// What opening found at the end of the log.
#[derive(Debug, Clone, Default)]
pub struct Tail {
    /// The last record (seq, payload as stored), if any.
    pub last: Option<(u64, Vec<u8>)>,
    /// Bytes cut from a torn tail (0: none).
    pub cut_bytes: u64,
}

/// A record read back: its sequence number and stored bytes, or why they cannot be read.
pub type RawRecord = (u64, Result<Vec<u8>, String>);

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn segment_name(first: u64) -> String {
    format!("{first:020}.seg")
}

fn parse_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(".seg")?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// The hash a stored record carries (its last 32 bytes).
fn stored_hash(payload: &[u8]) -> [u8; 32] {
    let mut h = [0u8; 32];
    if payload.len() >= 32 {
        h.copy_from_slice(&payload[payload.len() - 32..]);
    }
    h
}

fn put_frame(kind: u8, seq: u64, payload: &[u8], out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(&[0; 4]);
    // Payloads are bounded far below 4 GiB (records are at most ~70 KiB).
    let len = u32::try_from(payload.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&len.to_le_bytes());
    out.push(kind);
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(payload);
    let crc = crc32c::crc32c(&out[start + 4..]);
    out[start..start + 4].copy_from_slice(&crc.to_le_bytes());
}

fn group_frame(first: u64, end: u64, count: u32, durable_through: u64) -> Vec<u8> {
    let mut payload = Vec::with_capacity(GROUP_PAYLOAD);
    payload.extend_from_slice(&end.to_le_bytes());
    payload.extend_from_slice(&count.to_le_bytes());
    payload.extend_from_slice(&durable_through.to_le_bytes());
    let mut out = Vec::with_capacity(GROUP_FRAME);
    put_frame(TYPE_GROUP, first, &payload, &mut out);
    out
}

/// A frame found in a buffer.
#[derive(Debug, Clone, Copy)]
struct Frame {
    kind: u8,
    seq: u64,
    /// Whole frame length.
    len: usize,
}

impl Frame {
    fn payload<'b>(&self, at: &'b [u8]) -> &'b [u8] {
        &at[FRAME_HEADER..self.len]
    }
}

#[derive(Debug)]
enum Parsed {
    Frame(Frame),
    /// Zeros: nothing was written here.
    End,
    /// The buffer holds too few bytes; this many are needed.
    Short(usize),
    Invalid(&'static str),
}

/// Parses the frame at the start of `b`, which may extend `room` bytes in the file.
fn parse_frame(b: &[u8], room: u64) -> Parsed {
    if (room as usize) < FRAME_HEADER && room < FRAME_HEADER as u64 {
        return if b.iter().all(|&x| x == 0) {
            Parsed::End
        } else {
            Parsed::Invalid("bytes after the last frame")
        };
    }
    if b.len() < FRAME_HEADER {
        return Parsed::Short(FRAME_HEADER);
    }
    let crc = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    let len = u32::from_le_bytes([b[4], b[5], b[6], b[7]]) as usize;
    if crc == 0 && len == 0 && b[8] == 0 {
        return Parsed::End;
    }
    let kind = b[8];
    if kind != TYPE_GROUP && kind != TYPE_RECORD {
        return Parsed::Invalid("unknown frame type");
    }
    let total = FRAME_HEADER + len;
    if total as u64 > room {
        return Parsed::Invalid("frame runs past the end of the segment");
    }
    if b.len() < total {
        return Parsed::Short(total);
    }
    if crc32c::crc32c(&b[4..total]) != crc {
        return Parsed::Invalid("frame checksum mismatch");
    }
    let mut seq = [0u8; 8];
    seq.copy_from_slice(&b[9..17]);
    Parsed::Frame(Frame {
        kind,
        seq: u64::from_le_bytes(seq),
        len: total,
    })
}

/// Reads the frames of a file in chunks.
struct Cursor<'a> {
    file: &'a File,
    /// File offset of `buf[0]`.
    base: u64,
    buf: Vec<u8>,
    pos: usize,
    /// Frames end at or before this offset.
    limit: u64,
}

impl<'a> Cursor<'a> {
    fn new(file: &'a File, at: u64, limit: u64) -> Self {
        Self {
            file,
            base: at,
            buf: Vec::new(),
            pos: 0,
            limit,
        }
    }

    fn offset(&self) -> u64 {
        self.base + self.pos as u64
    }

    /// Makes `need` bytes available at `pos` (fewer at the limit).
    fn fill(&mut self, need: usize) -> io::Result<()> {
        if self.buf.len() - self.pos >= need {
            return Ok(());
        }
        let at = self.offset();
        let n = (need.max(READ_CHUNK) as u64).min(self.limit.saturating_sub(at)) as usize;
        let mut buf = vec![0u8; n];
        self.file.read_exact_at(&mut buf, at)?;
        self.base = at;
        self.buf = buf;
        self.pos = 0;
        Ok(())
    }

    /// The frame at the cursor (its bytes are [`Cursor::here`]), without moving.
    fn peek(&mut self) -> io::Result<Parsed> {
        let room = self.limit.saturating_sub(self.offset());
        if room == 0 {
            return Ok(Parsed::End);
        }
        self.fill(FRAME_HEADER)?;
        loop {
            match parse_frame(&self.buf[self.pos..], room) {
                Parsed::Short(n) if self.buf.len() - self.pos < n => self.fill(n)?,
                Parsed::Short(_) => return Ok(Parsed::Invalid("frame cut short")),
                other => return Ok(other),
            }
        }
    }

    fn here(&self) -> &[u8] {
        &self.buf[self.pos..]
    }

    fn skip(&mut self, n: usize) {
        self.pos += n;
    }
}

fn read_edge(file: &File, at: u64, path: &Path, what: &str) -> Result<[u8; 64], SegmentError> {
    let mut b = [0u8; 64];
    file.read_exact_at(&mut b, at)
        .map_err(|e| damaged(path, format!("cannot read its {what}: {e}")))?;
    let crc = u32::from_le_bytes([b[60], b[61], b[62], b[63]]);
    if crc32c::crc32c(&b[..60]) != crc {
        return Err(damaged(path, format!("its {what} is damaged (checksum)")));
    }
    Ok(b)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(x)
}

fn seal_edge(mut b: [u8; 64]) -> [u8; 64] {
    let crc = crc32c::crc32c(&b[..60]);
    b[60..].copy_from_slice(&crc.to_le_bytes());
    b
}

fn header(first: u64, size: u64) -> [u8; 64] {
    let mut b = [0u8; 64];
    b[..8].copy_from_slice(HEADER_MAGIC);
    b[8..12].copy_from_slice(&VERSION.to_le_bytes());
    b[12..20].copy_from_slice(&first.to_le_bytes());
    b[20..28].copy_from_slice(&size.to_le_bytes());
    seal_edge(b)
}

fn footer(last_seq: u64, last_hash: &[u8; 32], end: u64) -> [u8; 64] {
    let mut b = [0u8; 64];
    b[..8].copy_from_slice(FOOTER_MAGIC);
    b[8..16].copy_from_slice(&last_seq.to_le_bytes());
    b[16..48].copy_from_slice(last_hash);
    b[48..56].copy_from_slice(&end.to_le_bytes());
    seal_edge(b)
}

/// Opens segment `first` and checks its header and that it still has the size it was
/// created with. Returns the file and that size.
fn open_segment(path: &Path, first: u64) -> Result<(File, u64), SegmentError> {
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
fn read_footer(file: &File, path: &Path) -> Result<(u64, [u8; 32], u64), SegmentError> {
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
struct Active {
    /// End of the last whole group.
    end: u64,
    index: Vec<(u64, u64)>,
    /// The last record (seq, stored bytes).
    last: Option<(u64, Vec<u8>)>,
    /// Bytes of torn tail cut.
    cut: u64,
}

/// Reads the active segment to its end; a torn last group is cut (see the module docs).
fn recover_active(file: &File, path: &Path, first: u64) -> Result<Active, SegmentError> {
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
fn torn(
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
/// to [`SYNCS`] overlap) do not count, since a crash can tear an earlier group and keep a later
/// one; a read asks for the next group at all.
fn find_group(
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
fn zero_from(file: &File, from: u64) -> io::Result<()> {
    let len = file.metadata()?.len();
    file.set_len(from)?;
    file.set_len(len)?;
    allocate(file, len)?;
    file.sync_all()
}

fn allocate(file: &File, len: u64) -> io::Result<()> {
    let len = i64::try_from(len).map_err(|_| io::Error::other("segment too large"))?;
    nix::fcntl::posix_fallocate(file, 0, len).map_err(io::Error::from)
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Reads the segments in `dir`: the sealed ones' headers and footers, the active one whole.
fn load(dir: &Path) -> Result<(Vec<Arc<Segment>>, Disk, Tail), SegmentError> {
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

/// Reads up to `limit` records from `from` to `through` out of one segment.
fn read_range(
    seg: &Segment,
    from: u64,
    limit: usize,
    through: u64,
) -> Result<Vec<RawRecord>, SegmentError> {
    let io = |e: io::Error| io_err(seg.path.display(), e);
    let end = seg.end.load(Ordering::Acquire);
    let start = {
        let mut index = lock(&seg.index);
        if index.is_none() {
            *index = Some(build_index(seg, end).map_err(io)?);
        }
        let idx = index.as_deref().unwrap_or_default();
        match idx.partition_point(|(s, _)| *s <= from) {
            0 => EDGE,
            n => idx[n - 1].1,
        }
    };
    let mut c = Cursor::new(&seg.file, start, end);
    let mut out = Vec::new();
    let mut expect: Option<u64> = None;
    while out.len() < limit {
        let at = c.offset();
        match c.peek().map_err(io)? {
            Parsed::End => break,
            Parsed::Frame(f) if f.kind == TYPE_GROUP => c.skip(f.len),
            Parsed::Frame(f) => {
                if f.seq > through {
                    break;
                }
                if f.seq >= from {
                    out.push((f.seq, Ok(f.payload(c.here()).to_vec())));
                }
                expect = Some(f.seq + 1);
                c.skip(f.len);
            }
            Parsed::Invalid(why) => {
                let seq = expect.unwrap_or(from.max(seg.first));
                if seq < from {
                    // The damage lies before the records asked for: go on from the next
                    // whole group if `from` is in it or after it (never answer a record
                    // before `from`, nor fail a read that does not reach the damage).
                    let next =
                        find_group(&seg.file, at + 1, end, |first, _| first >= seq).map_err(io)?;
                    if let Some((off, first)) = next.filter(|(_, first)| *first <= from) {
                        c = Cursor::new(&seg.file, off, end);
                        expect = Some(first);
                        continue;
                    }
                }
                out.push((
                    seq.max(from),
                    Err(format!("{} offset {at}: {why}", seg.path.display())),
                ));
                break;
            }
            Parsed::Short(_) => break,
        }
    }
    Ok(out)
}

fn build_index(seg: &Segment, end: u64) -> io::Result<Vec<(u64, u64)>> {
    let mut c = Cursor::new(&seg.file, EDGE, end);
    let mut index = Vec::new();
    loop {
        let at = c.offset();
        match c.peek()? {
            Parsed::Frame(f) => {
                if f.kind == TYPE_RECORD && (f.seq.is_multiple_of(INDEX_EVERY) || index.is_empty())
                {
                    index.push((f.seq, at));
                }
                c.skip(f.len);
            }
            // Damage is reported by the read that reaches it.
            _ => return Ok(index),
        }
    }
}

impl Segments {
    /// Opens (or creates) the log in `dir`: checks every segment's header and footer and that
    /// they follow one another, reads the last one to its end and cuts a torn tail.
    pub fn open(dir: &Path, size: u64) -> Result<(Arc<Self>, Tail), SegmentError> {
        if size < MIN_SEGMENT_SIZE {
            return Err(SegmentError::Damaged(format!(
                "segment size {size} is below the minimum {MIN_SEGMENT_SIZE}"
            )));
        }
        let (list, disk, tail) = load(dir)?;
        let durable = disk.last.map_or(0, |(s, _)| s);
        Ok((
            Arc::new(Self {
                dir: dir.to_owned(),
                size,
                list: RwLock::new(list),
                pending: Mutex::new(Pending::default()),
                disk: Mutex::new(disk),
                durable: AtomicU64::new(durable),
                covered: AtomicU64::new(durable),
                woken: tokio::sync::watch::channel(()).0,
                syncs: Arc::new(tokio::sync::Semaphore::new(SYNCS)),
                failed: AtomicBool::new(false),
                reopened: AtomicU64::new(0),
                faults: Faults::from_env(),
            }),
            tail,
        ))
    }

    /// The directory of the segment files.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether a write failed since the log was last (re)opened.
    pub fn failed(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }

    /// Appends record `seq` (the next one) to the buffer; [`Segments::sync`] writes it. No
    /// I/O. Refused while the log has failed.
    pub fn append(&self, seq: u64, stored: &[u8]) -> Result<(), SegmentError> {
        let mut p = lock(&self.pending);
        if p.failed {
            return Err(SegmentError::Io(
                "an earlier audit write failed; the log is being reopened".into(),
            ));
        }
        let at = p.buf.len();
        p.bounds.push((seq, at));
        put_frame(TYPE_RECORD, seq, stored, &mut p.buf);
        Ok(())
    }

    /// Waits until record `through` (appended) is durable. If no `fdatasync` in flight
    /// covers it, writes what is buffered as one group and syncs it; up to [`SYNCS`] groups are
    /// synced at once, so callers that arrive during a sync start the next one instead of
    /// waiting for it. Everything written before an `fdatasync` starts is durable when it
    /// returns, so a sync moves the durable point to the last record written before it.
    pub async fn sync(self: &Arc<Self>, through: u64) -> Result<(), SegmentError> {
        let mut woken = self.woken.subscribe();
        let reopened = self.reopened.load(Ordering::Acquire);
        loop {
            if self.durable() >= through {
                return Ok(());
            }
            if self.failed() || self.reopened.load(Ordering::Acquire) != reopened {
                return Err(SegmentError::Io(
                    "the audit write failed; the log is being reopened".into(),
                ));
            }
            if self.covered.load(Ordering::Acquire) >= through {
                // A sync in flight covers it.
                let _ = woken.changed().await;
                continue;
            }
            let permit = tokio::select! {
                p = self.syncs.clone().acquire_owned() => p
                    .map_err(|_| SegmentError::Io("audit log closed".into()))?,
                _ = woken.changed() => continue,
            };
            if self.durable() >= through || self.covered.load(Ordering::Acquire) >= through {
                continue;
            }
            let this = self.clone();
            tokio::task::spawn_blocking(move || {
                let _permit = permit;
                this.write_and_sync()
            })
            .await
            .map_err(|e| SegmentError::Io(format!("audit sync task: {e}")))??;
        }
    }

    /// Writes and syncs what is buffered, from a blocking context (start-up: migration and
    /// restore).
    pub fn sync_blocking(&self) -> Result<(), SegmentError> {
        self.write_and_sync()
    }

    /// Writes the buffered records (one group per segment they go to) and `fdatasync`s the
    /// active segment, outside the write lock.
    fn write_and_sync(&self) -> Result<(), SegmentError> {
        let (active, covered, at) = {
            let mut disk = lock(&self.disk);
            self.write_pending(&mut disk).map_err(|e| self.fail(e))?;
            let Some((covered, _)) = disk.last else {
                return Ok(());
            };
            let active = self
                .list
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .last()
                .cloned();
            let Some(active) = active else {
                return Ok(());
            };
            self.covered.fetch_max(covered, Ordering::AcqRel);
            let at = (active.first, disk.written);
            (active, covered, at)
        };
        if covered <= self.durable() {
            return Ok(());
        }
        active
            .file
            .sync_data()
            .map_err(|e| self.fail(io_err(active.path.display(), e)))?;
        {
            let mut disk = lock(&self.disk);
            if at > disk.durable_at {
                disk.durable_at = at;
            }
        }
        self.durable.fetch_max(covered, Ordering::AcqRel);
        self.woken.send_replace(());
        Ok(())
    }

    /// The highest durable sequence number (0: none).
    pub fn durable(&self) -> u64 {
        self.durable.load(Ordering::Acquire)
    }

    /// The lowest sequence number kept (0: empty).
    pub fn oldest(&self) -> u64 {
        match self
            .list
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .first()
        {
            Some(s) if self.durable() >= s.first => s.first,
            _ => 0,
        }
    }

    /// Number of segment files.
    pub fn count(&self) -> usize {
        self.list
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// The first sequence number of the segment holding `seq`.
    pub fn segment_start(&self, seq: u64) -> u64 {
        let list = self.list.read().unwrap_or_else(PoisonError::into_inner);
        match list.partition_point(|s| s.first <= seq) {
            0 => 0,
            n => list[n - 1].first,
        }
    }

    /// Up to `limit` durable records from `from` through `through`, in order. A damaged
    /// frame ends the read with an error at the sequence number it should hold.
    pub fn read(
        &self,
        from: u64,
        limit: usize,
        through: u64,
    ) -> Result<Vec<RawRecord>, SegmentError> {
        let list: Vec<Arc<Segment>> = self
            .list
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let through = through.min(self.durable());
        let start = list.partition_point(|s| s.first <= from).saturating_sub(1);
        let mut out = Vec::new();
        for seg in &list[start..] {
            if out.len() >= limit || seg.first > through {
                break;
            }
            let from = out
                .last()
                .map_or(from, |(s, _): &RawRecord| s + 1)
                .max(seg.first);
            let more = read_range(seg, from, limit - out.len(), through)?;
            let broken = more.last().is_some_and(|(_, r)| r.is_err());
            out.extend(more);
            if broken {
                break;
            }
        }
        Ok(out)
    }

    /// Deletes every whole segment whose records all come before `below` (never the active
    /// one). Returns the first sequence number kept.
    pub fn remove_below(&self, below: u64) -> Result<u64, SegmentError> {
        let doomed: Vec<Arc<Segment>> = {
            let mut list = self.list.write().unwrap_or_else(PoisonError::into_inner);
            let keep_from = list
                .iter()
                .rposition(|s| s.first <= below)
                .unwrap_or(0)
                .min(list.len().saturating_sub(1));
            list.drain(..keep_from).collect()
        };
        for seg in &doomed {
            std::fs::remove_file(&seg.path).map_err(|e| io_err(seg.path.display(), e))?;
        }
        if !doomed.is_empty() {
            sync_dir(&self.dir).map_err(|e| io_err(self.dir.display(), e))?;
        }
        Ok(self.oldest())
    }

    /// After a failed write: drops what was buffered, zeros what was written after the last
    /// durable group, and reopens the files as at start-up. Returns the tail found.
    pub fn recover(&self) -> Result<Tail, SegmentError> {
        // No sync may be in flight: one finishing later would claim records zeroed here.
        let Ok(_all) = self.syncs.clone().try_acquire_many_owned(SYNCS as u32) else {
            return Err(SegmentError::Io("an audit sync is in progress".into()));
        };
        {
            let disk = lock(&self.disk);
            let list = self.list.read().unwrap_or_else(PoisonError::into_inner);
            if let Some(active) = list.last() {
                let from = if disk.durable_at.0 == active.first {
                    disk.durable_at.1
                } else {
                    EDGE
                };
                zero_from(&active.file, from).map_err(|e| io_err(active.path.display(), e))?;
            }
        }
        let (list, disk, tail) = load(&self.dir)?;
        let durable = disk.last.map_or(0, |(s, _)| s);
        self.durable.store(durable, Ordering::Release);
        self.covered.store(durable, Ordering::Release);
        *self.list.write().unwrap_or_else(PoisonError::into_inner) = list;
        *lock(&self.disk) = disk;
        *lock(&self.pending) = Pending::default();
        self.reopened.fetch_add(1, Ordering::AcqRel);
        self.failed.store(false, Ordering::Release);
        self.woken.send_replace(());
        Ok(tail)
    }

    fn fail(&self, e: SegmentError) -> SegmentError {
        lock(&self.pending).failed = true;
        self.failed.store(true, Ordering::Release);
        self.woken.send_replace(());
        tracing::error!(error = %e, "audit log write failed; calls fail closed until it reopens");
        e
    }

    /// Writes the buffered records as groups, rolling to a new segment when one is full.
    /// Called with the write lock (`disk`) held.
    fn write_pending(&self, disk: &mut Disk) -> Result<(), SegmentError> {
        let (buf, bounds) = {
            let mut p = lock(&self.pending);
            if p.failed {
                return Err(SegmentError::Io("an earlier audit write failed".into()));
            }
            (std::mem::take(&mut p.buf), std::mem::take(&mut p.bounds))
        };
        if bounds.is_empty() {
            return Ok(());
        }
        self.write_groups(disk, &buf, &bounds)
    }

    fn write_groups(
        &self,
        disk: &mut Disk,
        buf: &[u8],
        bounds: &[(u64, usize)],
    ) -> Result<(), SegmentError> {
        let frame_end = |k: usize| bounds.get(k + 1).map_or(buf.len(), |b| b.1);
        let mut i = 0;
        while i < bounds.len() {
            let active = self
                .list
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .last()
                .cloned();
            let Some(active) = active else {
                self.roll(disk, bounds[i].0, None)?;
                continue;
            };
            // The active segment's own size: the configured one may have changed since it
            // was created.
            let room = (active.size - EDGE).saturating_sub(disk.written);
            let mut j = i;
            let mut bytes = GROUP_FRAME as u64;
            while j < bounds.len() {
                let len = (frame_end(j) - bounds[j].1) as u64;
                if bytes + len > room {
                    break;
                }
                bytes += len;
                j += 1;
            }
            if j == i {
                if disk.written == EDGE {
                    return Err(SegmentError::Io(format!(
                        "record {} does not fit in an empty segment of {} bytes",
                        bounds[i].0, active.size
                    )));
                }
                self.roll(disk, bounds[i].0, Some(&active))?;
                continue;
            }
            let start = disk.written;
            let end = start + bytes;
            let body = &buf[bounds[i].1..frame_end(j - 1)];
            let mut out = group_frame(bounds[i].0, end, (j - i) as u32, self.durable());
            out.extend_from_slice(body);
            if let Some(e) = self.faults.audit_write_error() {
                return Err(io_err(active.path.display(), e));
            }
            active
                .file
                .write_all_at(&out, start)
                .map_err(|e| io_err(active.path.display(), e))?;
            if let Some(index) = lock(&active.index).as_mut() {
                for (seq, at) in &bounds[i..j] {
                    if seq.is_multiple_of(INDEX_EVERY) || index.is_empty() {
                        let offset = start + GROUP_FRAME as u64 + (at - bounds[i].1) as u64;
                        index.push((*seq, offset));
                    }
                }
            }
            let last = &buf[bounds[j - 1].1..frame_end(j - 1)];
            disk.written = end;
            disk.last = Some((bounds[j - 1].0, stored_hash(&last[FRAME_HEADER..])));
            active.end.store(end, Ordering::Release);
            i = j;
        }
        Ok(())
    }

    /// Creates the segment that starts at record `first` and, if there is one, seals the
    /// active segment (in that order: a crash between the two leaves an empty new segment
    /// and an unsealed old one, which opening undoes).
    fn roll(
        &self,
        disk: &mut Disk,
        first: u64,
        active: Option<&Arc<Segment>>,
    ) -> Result<(), SegmentError> {
        self.check_space()?;
        let path = self.dir.join(segment_name(first));
        let tmp = self.dir.join(format!("{}.tmp", segment_name(first)));
        let made = (|| {
            use std::os::unix::fs::OpenOptionsExt;
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)?;
            allocate(&file, self.size)?;
            file.write_all_at(&header(first, self.size), 0)?;
            file.sync_all()?;
            std::fs::rename(&tmp, &path)?;
            sync_dir(&self.dir)?;
            Ok(file)
        })();
        let file = match made {
            Ok(f) => f,
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                return Err(io_err(path.display(), e));
            }
        };
        if let Some(old) = active {
            let (last_seq, last_hash) = disk.last.unwrap_or((0, [0; 32]));
            old.file
                .write_all_at(&footer(last_seq, &last_hash, disk.written), old.size - EDGE)
                .and_then(|()| old.file.sync_data())
                .map_err(|e| io_err(old.path.display(), e))?;
        }
        self.list
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .push(Arc::new(Segment {
                first,
                path,
                file,
                size: self.size,
                end: AtomicU64::new(EDGE),
                index: Mutex::new(Some(Vec::new())),
            }));
        disk.written = EDGE;
        tracing::debug!(first, "audit segment started");
        Ok(())
    }

    /// Refuses to start a segment unless the disk keeps `min_free_bytes` besides it.
    fn check_space(&self) -> Result<(), SegmentError> {
        let free = match self.faults.free_bytes() {
            Some(f) => f,
            None => {
                let st = nix::sys::statvfs::statvfs(&self.dir).map_err(|e| {
                    SegmentError::Io(format!("statvfs {}: {e}", self.dir.display()))
                })?;
                (st.blocks_available() as u64).saturating_mul(st.fragment_size() as u64)
            }
        };
        if free < self.size {
            return Err(SegmentError::Io(format!(
                "disk nearly full: {free} bytes free under {}, a new audit segment needs {}",
                self.dir.display(),
                self.size
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
#[path = "segment_tests.rs"]
mod tests;
