//! Backups: StreamBackup's durable, audited snapshot of the store and the audit log (`admin`
//! verb), the file format ([`format`]) and `ward-server restore`, which turns a backup file
//! into a fresh data directory.
//!
//! The audit records travel as the entries of tree `audit` (key: sequence number), as they did
//! when the log lived in the store, so the format is unchanged and older backups restore the
//! same way. They are read after the store's snapshot, through the log's durable head: every
//! change in the snapshot had its record durable before its commit, so the backup holds the
//! record of everything it holds. Change records after the snapshot's applied mark (changes in
//! flight) are voided when the restored server starts.

pub mod format;

use super::Vault;
use crate::audit::AuditRecord;
use crate::error::{Error, Result};
use crate::harden::create_private_dir;
use crate::identity::Peer;
use crate::store::etcd::{EtcdConfig, EtcdStore};
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
            Ok(()) => self.snapshot_with_audit().await,
            Err(e) => Err(e),
        };
        self.finish_read(rec, result).await
    }
}

impl Vault {
    async fn snapshot_with_audit(&self) -> Result<Snapshot> {
        let mut snapshot = durable_snapshot(self.store.clone()).await?;
        // The backup carries this node's audit log, so its marks, under their plain names.
        crate::store::move_node_keys(&mut snapshot, self.audit.settings().node.as_deref(), None);
        let audit = self.audit.clone();
        let records = tokio::task::spawn_blocking(move || audit.export())
            .await
            .map_err(|e| Error::Internal(format!("audit export task: {e}")))??;
        match snapshot.trees.iter_mut().find(|(t, _)| *t == Tree::Audit) {
            Some((_, entries)) => *entries = records,
            None => snapshot.trees.push((Tree::Audit, records)),
        }
        Ok(snapshot)
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

/// Restores the backup file `from` into `data_dir`, which must not exist or be empty: the
/// store (sled in `data_dir`, or the empty prefix of the etcd cluster `etcd`), and the audit records into segment files of `segment_bytes` under `data_dir/audit`
/// (the restored server continues the chain). Checks the whole file first — its digest, then
/// its signature in the HSM (`signer`) — so a damaged or edited backup creates nothing.
/// Blocking; not on an async worker.
pub fn restore(
    from: &Path,
    data_dir: &Path,
    segment_bytes: u64,
    signer: &dyn MacSigner,
    etcd: Option<&EtcdConfig>,
) -> std::result::Result<Restored, String> {
    let bytes = std::fs::read(from).map_err(|e| format!("cannot read {}: {e}", from.display()))?;
    let file = decode(&bytes).map_err(|e| format!("{}: {e}", from.display()))?;
    file.verify(signer)
        .map_err(|e| format!("{}: {e}", from.display()))?;
    let mut snapshot = file.snapshot;
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
    let audit: Vec<_> = snapshot
        .trees
        .iter_mut()
        .filter(|(t, _)| *t == Tree::Audit)
        .flat_map(|(_, entries)| std::mem::take(entries))
        .collect();
    let records = crate::audit::import(&data_dir.join("audit"), segment_bytes, &audit)
        .map_err(|e| e.to_string())?;
    let stored = match etcd {
        None => SledStore::restore_into(data_dir, &snapshot),
        // The restored log's marks become this replica's own.
        Some(cfg) => {
            let node = crate::store::etcd::replica_id(data_dir)?;
            crate::store::move_node_keys(&mut snapshot, None, Some(&node));
            EtcdStore::restore_into(cfg, &snapshot)
        }
    };
    let entries = stored.map_err(|e| e.to_string())? + records;
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
