//! Backups: StreamBackup's durable, audited snapshot of the store (`admin` verb), the file
//! format ([`format`]) and `ward-server restore`, which turns a backup file into a fresh data
//! directory.

pub mod format;

use super::Vault;
use crate::audit::AuditRecord;
use crate::error::{Error, Result};
use crate::harden::create_private_dir;
use crate::identity::Peer;
use crate::store::sled_store::SledStore;
use crate::store::{Snapshot, Store, Tree};
use format::decode;
use std::path::Path;
use std::sync::Arc;
use ward_hsm::MacSigner;

impl Vault {
    /// A consistent, durable snapshot of the whole store for `ward.v1.Backup` (`admin` verb).
    /// Audited like a read: nothing is released unless its audit record is durable.
    pub async fn backup(&self, peer: &Peer) -> Result<Snapshot> {
        let rec = AuditRecord::new(peer, "StreamBackup", self.now());
        let result = match self.authorize_admin(peer) {
            Ok(()) => durable_snapshot(self.store.clone()).await,
            Err(e) => Err(e),
        };
        self.finish_read(rec, result).await
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
/// the whole file first — its digest, then its signature in the HSM (`signer`) — so a
/// damaged or edited backup creates nothing. Blocking.
pub fn restore(
    from: &Path,
    data_dir: &Path,
    signer: &dyn MacSigner,
) -> std::result::Result<Restored, String> {
    let bytes = std::fs::read(from).map_err(|e| format!("cannot read {}: {e}", from.display()))?;
    let file = decode(&bytes).map_err(|e| format!("{}: {e}", from.display()))?;
    file.verify(signer)
        .map_err(|e| format!("{}: {e}", from.display()))?;
    let snapshot = file.snapshot;
    if let Ok(mut entries) = std::fs::read_dir(data_dir) {
        if entries.next().is_some() {
            return Err(format!(
                "{} is not empty: restore only into a new data directory (move the old one \
                 aside first)",
                data_dir.display()
            ));
        }
    }
    create_private_dir(data_dir)?;
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

/// A snapshot of the store, durable before any of it is sent.
pub(crate) async fn durable_snapshot(store: Arc<dyn Store>) -> Result<Snapshot> {
    let s = store.clone();
    let snapshot = tokio::task::spawn_blocking(move || s.snapshot())
        .await
        .map_err(|e| Error::Internal(format!("snapshot task: {e}")))??;
    store.sync().await?;
    Ok(snapshot)
}
