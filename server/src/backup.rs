//! Backups: the file format, the `ward.v1.Backup` service that streams a snapshot, and
//! `ward-server restore`, which turns a backup file into a fresh data directory.
//!
//! The file is the store's entries as they are on disk — keyring and index key wrapped by the
//! HSM master key, values sealed under the keyring — so it holds no plaintext and restoring it
//! is useless without the same master key(s). Layout (integers big-endian):
//!
//! ```text
//! "WARDBAK1"
//! { 0x01, u16 tree-name length, tree name, u32 key length, key, u32 value length, value }*
//! 0x00, u64 next id, u64 entry count, SHA-256 of every byte before it
//! ```
//!
//! Restore reads the whole file and checks the digest before it creates anything.

use crate::error::{Error, Result};
use crate::service::peer;
use crate::status::to_status;
use crate::store::sled_store::SledStore;
use crate::store::{Snapshot, Tree};
use crate::vault::Vault;
use sha2::{Digest, Sha256};
use std::path::Path;
use std::sync::Arc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use ward::v1::{self as pb, backup_server::Backup};

/// First bytes of every backup file.
pub const MAGIC: &[u8; 8] = b"WARDBAK1";
/// Bytes per streamed chunk.
const CHUNK: usize = 64 * 1024;
/// Largest key or value a backup may hold (far above anything Ward stores).
const MAX_ITEM: usize = 64 * 1024 * 1024;

/// Encodes a snapshot, handing out chunks of about [`CHUNK`] bytes to `emit`; stops early
/// (returning false) when `emit` does.
pub fn encode(snapshot: &Snapshot, mut emit: impl FnMut(Vec<u8>) -> bool) -> bool {
    let mut hash = Sha256::new();
    let mut buf = Vec::with_capacity(CHUNK + 1024);
    buf.extend_from_slice(MAGIC);
    let mut count = 0u64;
    let mut flush = |buf: &mut Vec<u8>, hash: &mut Sha256, all: bool| {
        if buf.len() >= CHUNK || (all && !buf.is_empty()) {
            hash.update(&buf[..]);
            emit(std::mem::take(buf))
        } else {
            true
        }
    };
    for (tree, items) in &snapshot.trees {
        let name = tree.name().as_bytes();
        for (k, v) in items {
            buf.push(1);
            buf.extend_from_slice(&(name.len() as u16).to_be_bytes());
            buf.extend_from_slice(name);
            buf.extend_from_slice(&(k.len() as u32).to_be_bytes());
            buf.extend_from_slice(k);
            buf.extend_from_slice(&(v.len() as u32).to_be_bytes());
            buf.extend_from_slice(v);
            count += 1;
            if !flush(&mut buf, &mut hash, false) {
                return false;
            }
        }
    }
    buf.push(0);
    buf.extend_from_slice(&snapshot.next_id.to_be_bytes());
    buf.extend_from_slice(&count.to_be_bytes());
    if !flush(&mut buf, &mut hash, true) {
        return false;
    }
    emit(hash.finalize().to_vec())
}

/// Decodes and verifies a whole backup file.
pub fn decode(bytes: &[u8]) -> std::result::Result<Snapshot, String> {
    let body_len = bytes
        .len()
        .checked_sub(32)
        .ok_or("not a Ward backup: too short")?;
    if !bytes.starts_with(MAGIC) {
        return Err("not a Ward backup (bad magic)".into());
    }
    let (body, digest) = bytes.split_at(body_len);
    if Sha256::digest(body).as_slice() != digest {
        return Err("backup is damaged or incomplete: its SHA-256 does not match".into());
    }
    let mut r = Reader {
        bytes: body,
        at: MAGIC.len(),
    };
    let mut trees: Vec<(Tree, Vec<crate::store::Entry>)> = Vec::new();
    let mut count = 0u64;
    loop {
        match r.u8()? {
            1 => {
                let name_len = usize::from(r.u16()?);
                let name = std::str::from_utf8(r.take(name_len)?)
                    .map_err(|_| "tree name is not text".to_string())?;
                let tree = Tree::from_name(name).ok_or_else(|| {
                    format!("backup holds tree {name:?}, unknown to this version of Ward")
                })?;
                let k = r.item()?.to_vec();
                let v = r.item()?.to_vec();
                match trees.last_mut() {
                    Some((t, items)) if *t == tree => items.push((k, v)),
                    _ => trees.push((tree, vec![(k, v)])),
                }
                count += 1;
            }
            0 => {
                let next_id = r.u64()?;
                if r.u64()? != count || r.at != body.len() {
                    return Err("backup is inconsistent: entry count or length is wrong".into());
                }
                return Ok(Snapshot { trees, next_id });
            }
            t => return Err(format!("backup is malformed: record tag {t}")),
        }
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> std::result::Result<&'a [u8], String> {
        let end = self
            .at
            .checked_add(n)
            .filter(|e| *e <= self.bytes.len())
            .ok_or("backup is truncated")?;
        let s = &self.bytes[self.at..end];
        self.at = end;
        Ok(s)
    }
    fn u8(&mut self) -> std::result::Result<u8, String> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> std::result::Result<u16, String> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> std::result::Result<u32, String> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> std::result::Result<u64, String> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_be_bytes(a))
    }
    fn item(&mut self) -> std::result::Result<&'a [u8], String> {
        let n = self.u32()? as usize;
        if n > MAX_ITEM {
            return Err("backup is malformed: item too large".into());
        }
        self.take(n)
    }
}

/// What a restore did.
#[derive(Debug)]
pub struct Restored {
    /// Entries written.
    pub entries: u64,
    /// Master-key labels the restored keyring needs on the token.
    pub master_keys: Vec<String>,
}

/// Restores the backup file `from` into `data_dir`, which must not exist or be empty. Checks
/// the whole file first, so a damaged backup creates nothing. Blocking.
pub fn restore(from: &Path, data_dir: &Path) -> std::result::Result<Restored, String> {
    let bytes = std::fs::read(from).map_err(|e| format!("cannot read {}: {e}", from.display()))?;
    let snapshot = decode(&bytes).map_err(|e| format!("{}: {e}", from.display()))?;
    if let Ok(mut entries) = std::fs::read_dir(data_dir) {
        if entries.next().is_some() {
            return Err(format!(
                "{} is not empty: restore only into a new data directory (move the old one \
                 aside first)",
                data_dir.display()
            ));
        }
    }
    crate::server::create_private_dir(data_dir)?;
    let entries = SledStore::restore_into(data_dir, &snapshot).map_err(|e| e.to_string())?;
    let mut master_keys: Vec<String> = snapshot
        .trees
        .iter()
        .filter(|(t, _)| *t == Tree::Keyring)
        .flat_map(|(_, items)| items.iter())
        .filter_map(|(_, v)| {
            crate::store::decode::<crate::unseal::KeyringEntry>("keyring entry", v).ok()
        })
        .map(|e| e.master_label)
        .collect();
    master_keys.sort();
    master_keys.dedup();
    Ok(Restored {
        entries,
        master_keys,
    })
}

/// `ward.v1.Backup` over a [`Vault`].
pub struct BackupService {
    vault: Arc<Vault>,
}

impl BackupService {
    /// A service over `vault`.
    pub fn new(vault: Arc<Vault>) -> Self {
        Self { vault }
    }
}

#[tonic::async_trait]
impl Backup for BackupService {
    type StreamBackupStream = ReceiverStream<std::result::Result<pb::BackupChunk, Status>>;

    async fn stream_backup(
        &self,
        req: Request<pb::StreamBackupRequest>,
    ) -> std::result::Result<Response<Self::StreamBackupStream>, Status> {
        let peer = peer(&req)?;
        let snapshot = self.vault.backup(&peer).await.map_err(to_status)?;
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::task::spawn_blocking(move || {
            let complete = encode(&snapshot, |data| {
                tx.blocking_send(Ok(pb::BackupChunk { data })).is_ok()
            });
            if !complete {
                tracing::info!("backup stream abandoned by the client");
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// Backups need the `admin` verb; the snapshot is durable before any of it is sent.
pub(crate) async fn durable_snapshot(store: Arc<dyn crate::store::Store>) -> Result<Snapshot> {
    let s = store.clone();
    let snapshot = tokio::task::spawn_blocking(move || s.snapshot())
        .await
        .map_err(|e| Error::Internal(format!("snapshot task: {e}")))??;
    store.sync().await?;
    Ok(snapshot)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Snapshot {
        Snapshot {
            trees: vec![
                (Tree::Secrets, vec![(b"a".to_vec(), b"1".to_vec())]),
                (
                    Tree::Versions,
                    (0..3000u32)
                        .map(|i| (i.to_be_bytes().to_vec(), vec![7u8; 100]))
                        .collect(),
                ),
                (Tree::Meta, vec![]),
            ],
            next_id: 42,
        }
    }

    #[test]
    fn round_trip_and_damage_is_refused() {
        let mut file = Vec::new();
        let mut chunks = 0;
        assert!(encode(&sample(), |c| {
            chunks += 1;
            file.extend(c);
            true
        }));
        assert!(chunks > 2, "streamed in chunks");
        let back = decode(&file).unwrap();
        assert_eq!(back.next_id, 42);
        assert_eq!(back.trees.len(), 2, "empty trees carry no records");
        assert_eq!(back.trees[1].1.len(), 3000);
        for i in [0, 9, file.len() / 2, file.len() - 40, file.len() - 1] {
            let mut bad = file.clone();
            bad[i] ^= 1;
            assert!(decode(&bad).is_err(), "flip at {i}");
        }
        for n in [0, 8, 40, file.len() - 1] {
            assert!(decode(&file[..n]).is_err(), "truncated to {n}");
        }
    }
}
