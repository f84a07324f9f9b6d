//! The bytes of a segment file: header, frames and footer (see the parent module for the
//! layout), and a cursor that reads frames from a file in chunks.

use super::{damaged, SegmentError};
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

pub(super) const HEADER_MAGIC: &[u8; 8] = b"WARDAUD1";
pub(super) const FOOTER_MAGIC: &[u8; 8] = b"WARDEND1";
pub(super) const VERSION: u32 = 1;
/// Header and footer size.
pub(super) const EDGE: u64 = 64;
/// crc, len, type, seq.
pub(super) const FRAME_HEADER: usize = 4 + 4 + 1 + 8;
/// A group frame's payload: end offset, record count, the durable point when it was written.
pub(super) const GROUP_PAYLOAD: usize = 8 + 4 + 8;
pub(super) const GROUP_FRAME: usize = FRAME_HEADER + GROUP_PAYLOAD;
pub(super) const TYPE_GROUP: u8 = 1;
pub(super) const TYPE_RECORD: u8 = 2;
/// One index entry per this many records of a segment.
pub(super) const INDEX_EVERY: u64 = 128;
/// Bytes read per read call when scanning.
pub(super) const READ_CHUNK: usize = 256 * 1024;
/// Smallest segment allowed (a bound of `audit.segment_bytes`).
pub use crate::config::MIN_SEGMENT_SIZE;

pub(super) fn put_frame(kind: u8, seq: u64, payload: &[u8], out: &mut Vec<u8>) {
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

pub(super) fn group_frame(first: u64, end: u64, count: u32, durable_through: u64) -> Vec<u8> {
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
pub(super) struct Frame {
    pub(super) kind: u8,
    pub(super) seq: u64,
    /// Whole frame length.
    pub(super) len: usize,
}

impl Frame {
    pub(super) fn payload<'b>(&self, at: &'b [u8]) -> &'b [u8] {
        &at[FRAME_HEADER..self.len]
    }
}

#[derive(Debug)]
pub(super) enum Parsed {
    Frame(Frame),
    /// Zeros: nothing was written here.
    End,
    /// The buffer holds too few bytes; this many are needed.
    Short(usize),
    Invalid(&'static str),
}

/// Parses the frame at the start of `b`, which may extend `room` bytes in the file.
pub(super) fn parse_frame(b: &[u8], room: u64) -> Parsed {
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
pub(super) struct Cursor<'a> {
    pub(super) file: &'a File,
    /// File offset of `buf[0]`.
    pub(super) base: u64,
    pub(super) buf: Vec<u8>,
    pub(super) pos: usize,
    /// Frames end at or before this offset.
    pub(super) limit: u64,
}

impl<'a> Cursor<'a> {
    pub(super) fn new(file: &'a File, at: u64, limit: u64) -> Self {
        Self {
            file,
            base: at,
            buf: Vec::new(),
            pos: 0,
            limit,
        }
    }

    pub(super) fn offset(&self) -> u64 {
        self.base + self.pos as u64
    }

    /// Makes `need` bytes available at `pos` (fewer at the limit).
    pub(super) fn fill(&mut self, need: usize) -> io::Result<()> {
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
    pub(super) fn peek(&mut self) -> io::Result<Parsed> {
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

    pub(super) fn here(&self) -> &[u8] {
        &self.buf[self.pos..]
    }

    pub(super) fn skip(&mut self, n: usize) {
        self.pos += n;
    }
}

pub(super) fn read_edge(
    file: &File,
    at: u64,
    path: &Path,
    what: &str,
) -> Result<[u8; 64], SegmentError> {
    let mut b = [0u8; 64];
    file.read_exact_at(&mut b, at)
        .map_err(|e| damaged(path, format!("cannot read its {what}: {e}")))?;
    let crc = u32::from_le_bytes([b[60], b[61], b[62], b[63]]);
    if crc32c::crc32c(&b[..60]) != crc {
        return Err(damaged(path, format!("its {what} is damaged (checksum)")));
    }
    Ok(b)
}

pub(super) fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(x)
}

pub(super) fn seal_edge(mut b: [u8; 64]) -> [u8; 64] {
    let crc = crc32c::crc32c(&b[..60]);
    b[60..].copy_from_slice(&crc.to_le_bytes());
    b
}

pub(super) fn header(first: u64, size: u64) -> [u8; 64] {
    let mut b = [0u8; 64];
    b[..8].copy_from_slice(HEADER_MAGIC);
    b[8..12].copy_from_slice(&VERSION.to_le_bytes());
    b[12..20].copy_from_slice(&first.to_le_bytes());
    b[20..28].copy_from_slice(&size.to_le_bytes());
    seal_edge(b)
}

pub(super) fn footer(last_seq: u64, last_hash: &[u8; 32], end: u64) -> [u8; 64] {
    let mut b = [0u8; 64];
    b[..8].copy_from_slice(FOOTER_MAGIC);
    b[8..16].copy_from_slice(&last_seq.to_le_bytes());
    b[16..48].copy_from_slice(last_hash);
    b[48..56].copy_from_slice(&end.to_le_bytes());
    seal_edge(b)
}
