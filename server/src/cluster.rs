//! Replicas on a shared etcd store (wiring, beside `server`): the replica's id, opening the
//! etcd backend, and the follower that brings this process's memory in line with every change
//! the store reports — the key directory first (so a revocation is refused here as soon as
//! this replica reads it), then decoded records, watchers, the sweeper's index and the keyring.

use crate::keys::directory::DirectoryStore;
use crate::store::etcd::{Changed, EtcdStore, ReplicaInfo};
use crate::vault::Vault;
use rand::{rngs::OsRng, RngCore};
use std::path::Path;
use std::sync::Arc;
use tokio::sync::broadcast::{error::RecvError, Receiver};
use ward_hsm::KeyWrapper;

/// File (in `data_dir`) holding the replica's id: its registry entry and its audit marks.
const REPLICA_ID_FILE: &str = "replica-id";

/// This replica's id: read from `data_dir`, or made (random) and kept there on first start.
pub fn replica_id(data_dir: &Path) -> Result<String, String> {
    let path = data_dir.join(REPLICA_ID_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let id = text.trim().to_owned();
            let valid = |b: u8| b.is_ascii_alphanumeric() || b == b'-';
            if id.is_empty() || id.len() > 64 || !id.bytes().all(valid) {
                return Err(format!(
                    "{} does not hold a replica id (1 to 64 of a-z A-Z 0-9 -)",
                    path.display()
                ));
            }
            Ok(id)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut bytes = [0u8; 8];
            OsRng.fill_bytes(&mut bytes);
            let id = hex::encode(bytes);
            let tmp = data_dir.join(format!("{REPLICA_ID_FILE}.tmp"));
            std::fs::write(&tmp, format!("{id}\n"))
                .and_then(|_| std::fs::rename(&tmp, &path))
                .map_err(|e| format!("{}: {e}", path.display()))?;
            Ok(id)
        }
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

/// Opens the etcd backend named by `[store.etcd]` as replica `id`.
pub async fn open(
    cfg: &crate::config::Config,
    id: &str,
    started_ms: u64,
) -> Result<Arc<EtcdStore>, String> {
    let etcd = cfg
        .store
        .etcd
        .as_ref()
        .ok_or_else(|| "store.backend = \"etcd\" needs [store.etcd]".to_string())?;
    let info = ReplicaInfo {
        id: id.to_owned(),
        address: String::new(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        started_ms,
    };
    EtcdStore::open(etcd, info)
        .await
        .map(Arc::new)
        .map_err(|e| e.to_string())
}

/// Follows the store's changes until the feed closes: each batch goes to the key directory,
/// then to the vault (records, watchers, sweeper, keyring). A follower that fell behind
/// re-reads everything.
pub async fn follow(
    mut feed: Receiver<Changed>,
    directory: Arc<DirectoryStore>,
    vault: Arc<Vault>,
    hsm: Arc<dyn KeyWrapper>,
) {
    loop {
        match feed.recv().await {
            Ok(changed) => {
                directory.apply_changes(&changed);
                vault.apply_changes(&changed, &hsm).await;
            }
            Err(RecvError::Lagged(missed)) => {
                tracing::warn!(
                    missed,
                    "fell behind the store's changes; re-reading everything"
                );
                if let Err(e) = directory.apply_everything() {
                    tracing::error!(error = %e, "could not re-read the key directory");
                }
                if let Err(e) = vault.apply_everything(&hsm).await {
                    tracing::error!(error = %e, "could not re-read the vault's records");
                }
            }
            Err(RecvError::Closed) => return,
        }
    }
}
