//! The one-time move of a log that an earlier version kept in the store (tree `audit`) into
//! segment files: copy every record as stored (their hashes do not change), check the copy
//! end to end, switch to it, then delete the old records.
//!
//! Crash-safe by order: the copy is built in `audit.migrating/` and renamed to `audit/` only
//! once it is complete, durable and checked; the store's records are deleted after that. A
//! crash before the rename leaves the old log in charge (the next start builds the copy
//! again); after it, the next start finds `audit/` and finishes deleting the old records.

use super::segments::Segments;
use super::{decode, key_seq, Checkpoint, Event, Stored, GENESIS};
use crate::error::{Error, Result};
use crate::store::{Batch, Store, Tree};
use std::path::Path;
use ward_hsm::MacSigner;

/// Records copied per store scan.
const CHUNK: usize = 4096;

/// Moves the store's `audit` tree into segment files in `dir`, if it holds records. Blocking.
pub(super) fn from_store(
    store: &dyn Store,
    dir: &Path,
    segment_bytes: u64,
    signer: &dyn MacSigner,
) -> Result<()> {
    if store.scan(Tree::Audit, b"", b"", 1)?.is_empty() {
        return Ok(());
    }
    let moved = dir.exists();
    if !moved {
        let building = dir.with_extension("migrating");
        if building.exists() {
            std::fs::remove_dir_all(&building)
                .map_err(|e| Error::Unavailable(format!("{}: {e}", building.display())))?;
        }
        let copied = match copy(store, &building, segment_bytes, signer) {
            Ok(n) => n,
            Err(e) => {
                // A refused (or failed) copy changes nothing: no partial copy is left behind
                // (its segments are allocated whole, up to the size of the old log).
                let _ = std::fs::remove_dir_all(&building);
                return Err(e);
            }
        };
        std::fs::rename(&building, dir)
            .map_err(|e| Error::Unavailable(format!("{}: {e}", dir.display())))?;
        if let Some(parent) = dir.parent() {
            std::fs::File::open(parent)
                .and_then(|d| d.sync_all())
                .map_err(|e| Error::Unavailable(format!("{}: {e}", parent.display())))?;
        }
        tracing::info!(
            records = copied,
            dir = %dir.display(),
            "audit log moved from the store into segment files and checked"
        );
    }
    let mut deleted = 0u64;
    loop {
        let keys: Vec<Vec<u8>> = store
            .scan(Tree::Audit, b"", b"", CHUNK)?
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        if keys.is_empty() {
            break;
        }
        let mut batch = Batch::new();
        deleted += keys.len() as u64;
        for k in keys {
            batch.remove(Tree::Audit, k);
        }
        store.commit(batch)?;
    }
    tracing::info!(
        records = deleted,
        "old audit records removed from the store"
    );
    Ok(())
}

/// Copies every record into new segments in `dir`, checking as it goes that the records are
/// whole, consecutive and linked and that every checkpoint's HSM signature verifies. Returns
/// the number of records.
fn copy(store: &dyn Store, dir: &Path, segment_bytes: u64, signer: &dyn MacSigner) -> Result<u64> {
    let (segments, _) =
        Segments::open(dir, segment_bytes).map_err(|e| Error::Unavailable(e.to_string()))?;
    let refuse = |seq: u64, why: String| {
        Err(Error::DataLoss(format!(
            "the audit log in the store cannot be moved to segment files: record {seq} {why}. \
             Nothing was changed; run VerifyAuditLog on the previous version, or restore a backup"
        )))
    };
    let mut from = Vec::new();
    let mut prev: Option<(u64, [u8; 32])> = None;
    let mut count = 0u64;
    loop {
        let chunk = store.scan(Tree::Audit, b"", &from, CHUNK)?;
        let Some((last_key, _)) = chunk.last() else {
            break;
        };
        let mut next = last_key.clone();
        next.push(0);
        let n = chunk.len();
        for (key, value) in chunk {
            let Some(seq) = key_seq(&key) else {
                return refuse(0, "has a key that is not a sequence number".into());
            };
            let Stored {
                record,
                hash,
                intact,
            } = match decode(&value) {
                Ok(s) => s,
                Err(e) => return refuse(seq, format!("does not decode ({e})")),
            };
            if !intact || record.seq != seq {
                return refuse(seq, "was altered".into());
            }
            let linked = match prev {
                Some((p, h)) => p + 1 == seq && record.prev_hash == h,
                None => (seq == 1) == (record.prev_hash == GENESIS),
            };
            if !linked {
                return refuse(seq, "does not follow the record before it".into());
            }
            if let Event::Checkpoint(c) = &record.event {
                let message = Checkpoint::message(c.covers_seq, &c.covers_hash, c.every);
                if !signer
                    .verify_mac(&c.key_label, &message, &c.mac)
                    .unwrap_or(false)
                {
                    return refuse(
                        seq,
                        "is a checkpoint whose HSM signature does not verify".into(),
                    );
                }
            }
            segments
                .append(seq, &value)
                .map_err(|e| Error::Unavailable(e.to_string()))?;
            prev = Some((seq, hash));
            count += 1;
        }
        segments
            .sync_blocking()
            .map_err(|e| Error::Unavailable(e.to_string()))?;
        if n < CHUNK {
            break;
        }
        from = next;
    }
    Ok(count)
}

/// Writes `records` (as the backup file carries them: key = sequence number, value = the
/// record as stored) into new segment files in `dir`, for a restore. Returns how many.
/// Blocking.
pub fn import(dir: &Path, segment_bytes: u64, records: &[crate::store::Entry]) -> Result<u64> {
    if dir.exists() {
        return Err(Error::invalid(format!(
            "{} already exists: restore only into a new data directory",
            dir.display()
        )));
    }
    let (segments, _) =
        Segments::open(dir, segment_bytes).map_err(|e| Error::Unavailable(e.to_string()))?;
    for (i, (key, value)) in records.iter().enumerate() {
        let seq = key_seq(key).ok_or_else(|| {
            Error::DataLoss("an audit entry's key is not a sequence number".into())
        })?;
        segments
            .append(seq, value)
            .map_err(|e| Error::Unavailable(e.to_string()))?;
        if i % CHUNK == CHUNK - 1 {
            segments
                .sync_blocking()
                .map_err(|e| Error::Unavailable(e.to_string()))?;
        }
    }
    segments
        .sync_blocking()
        .map_err(|e| Error::Unavailable(e.to_string()))?;
    Ok(records.len() as u64)
}
