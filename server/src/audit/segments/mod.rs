//! The audit log's files: fixed-size, preallocated, append-only segment files under
//! `data_dir/audit/`, one appender, group `fdatasync`.
//!
//! # Layout
//!
//! A segment is named after the sequence number of its first record (`{first:020}.seg`) and
//! is exactly `segment_size` bytes, written with zeros when it is created (so appending never needs
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
//! is created (`.tmp`, filled with zeros, header, `fsync`, renamed, directory `fsync`).
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

mod format;
mod recovery;
#[cfg(test)]
mod tests;

use crate::faults::Faults;
use format::*;
use recovery::{find_group, load, sync_dir, write_zeros, zero_from};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};

pub use format::MIN_SEGMENT_SIZE;

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

/// The hash a stored record carries (its last 32 bytes; zeros if it is shorter).
pub(crate) fn stored_hash(payload: &[u8]) -> [u8; 32] {
    let mut h = [0u8; 32];
    if payload.len() >= 32 {
        h.copy_from_slice(&payload[payload.len() - 32..]);
    }
    h
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

    /// The segment being written (none before the first record).
    fn active(&self) -> Option<Arc<Segment>> {
        self.list
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .last()
            .cloned()
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
            let active = self.active();
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
            let active = self.active();
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
            write_zeros(&file, 0, self.size)?;
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
            None => crate::store::free_bytes(&self.dir).map_err(SegmentError::Io)?,
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
