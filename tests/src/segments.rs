//! The audit log's segment files, read and written from their documented format
//! (docs/security.md, "Audit segment files") by code of the test suite's own: the tamper,
//! crash and migration tests play an attacker (or a disk) that edits them.

use std::path::{Path, PathBuf};

const HEADER_MAGIC: &[u8; 8] = b"WARDAUD1";
const FOOTER_MAGIC: &[u8; 8] = b"WARDEND1";
const EDGE: usize = 64;
const FRAME_HEADER: usize = 17;

/// One segment file as found.
#[derive(Debug, Clone)]
pub struct SegmentFile {
    /// Its path.
    pub path: PathBuf,
    /// The first record, from its name.
    pub first: u64,
    /// Its records: (sequence number in the frame, stored record bytes).
    pub records: Vec<(u64, Vec<u8>)>,
    /// Whether it has a footer (sealed).
    pub sealed: bool,
    /// Offset after its last frame.
    pub end: u64,
}

/// The audit directory of a stopped server's data directory.
pub fn audit_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("data").join("audit")
}

fn le32(b: &[u8]) -> u32 {
    u32::from_le_bytes(b[..4].try_into().unwrap())
}

fn le64(b: &[u8]) -> u64 {
    u64::from_le_bytes(b[..8].try_into().unwrap())
}

/// Every segment file in `dir`, in order, with its records. Panics on anything that is not
/// the documented format (these are the test's own files, from a stopped server).
pub fn read_all(dir: &Path) -> Vec<SegmentFile> {
    let mut files: Vec<(u64, PathBuf)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter_map(|p| {
            let name = p.file_name()?.to_str()?.strip_suffix(".seg")?.to_owned();
            Some((name.parse().ok()?, p))
        })
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|(first, path)| read_one(&path, first))
        .collect()
}

fn read_one(path: &Path, first: u64) -> SegmentFile {
    let bytes = std::fs::read(path).unwrap();
    assert_eq!(&bytes[..8], HEADER_MAGIC, "{}", path.display());
    assert_eq!(
        crc32c::crc32c(&bytes[..60]),
        le32(&bytes[60..]),
        "header crc"
    );
    assert_eq!(le64(&bytes[12..]), first, "header first seq");
    let footer = &bytes[bytes.len() - EDGE..];
    let sealed = &footer[..8] == FOOTER_MAGIC;
    let mut records = Vec::new();
    let mut at = EDGE;
    let limit = bytes.len() - EDGE;
    while at + FRAME_HEADER <= limit {
        let crc = le32(&bytes[at..]);
        let len = le32(&bytes[at + 4..]) as usize;
        let kind = bytes[at + 8];
        if crc == 0 && len == 0 && kind == 0 {
            break;
        }
        let end = at + FRAME_HEADER + len;
        assert_eq!(
            crc32c::crc32c(&bytes[at + 4..end]),
            crc,
            "frame crc at {at}"
        );
        let seq = le64(&bytes[at + 9..]);
        if kind == 2 {
            records.push((seq, bytes[at + FRAME_HEADER..end].to_vec()));
        } else {
            assert_eq!(kind, 1, "frame type at {at}");
        }
        at = end;
    }
    SegmentFile {
        path: path.to_owned(),
        first,
        records,
        sealed,
        end: at as u64,
    }
}

/// Every record of the log in `dir`, in file order.
pub fn records(dir: &Path) -> Vec<(u64, Vec<u8>)> {
    read_all(dir).into_iter().flat_map(|s| s.records).collect()
}

fn frame(kind: u8, seq: u64, payload: &[u8], out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.push(kind);
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(payload);
    let crc = crc32c::crc32c(&out[start + 4..]);
    out[start..start + 4].copy_from_slice(&crc.to_le_bytes());
}

/// Replaces the log in `dir` with `records` (frame sequence number, stored bytes), in one
/// active segment of `size` bytes named after the first, one group per record — what an
/// attacker who can write the disk (but not use the HSM) can produce.
pub fn rewrite(dir: &Path, records: &[(u64, Vec<u8>)], size: usize) {
    for s in read_all(dir) {
        std::fs::remove_file(&s.path).unwrap();
    }
    let first = records.first().map_or(1, |r| r.0);
    let mut b = vec![0u8; EDGE];
    b[..8].copy_from_slice(HEADER_MAGIC);
    b[8..12].copy_from_slice(&1u32.to_le_bytes());
    b[12..20].copy_from_slice(&first.to_le_bytes());
    b[20..28].copy_from_slice(&(size as u64).to_le_bytes());
    let crc = crc32c::crc32c(&b[..60]);
    b[60..64].copy_from_slice(&crc.to_le_bytes());
    for (seq, stored) in records {
        let mut rec = Vec::new();
        frame(2, *seq, stored, &mut rec);
        let end = (b.len() + FRAME_HEADER + 20 + rec.len()) as u64;
        let mut group = end.to_le_bytes().to_vec();
        group.extend_from_slice(&1u32.to_le_bytes());
        // Written once everything before it was durable.
        group.extend_from_slice(&seq.saturating_sub(1).to_le_bytes());
        frame(1, *seq, &group, &mut b);
        b.extend_from_slice(&rec);
    }
    assert!(b.len() + EDGE <= size, "records do not fit in one segment");
    b.resize(size, 0);
    let path = dir.join(format!("{first:020}.seg"));
    std::fs::write(&path, b).unwrap();
}
