//! Replicas on a shared etcd store (wiring, beside `server`): opening the etcd backend, and the follower that brings this process's memory in line with every change
//! the store reports — the key directory first (so a revocation is refused here as soon as
//! this replica reads it), then decoded records, watchers, the sweeper's index and the keyring.

use crate::keys::directory::DirectoryStore;
use crate::store::etcd::{Changed, EtcdStore, ReplicaInfo};
use crate::vault::Vault;
use std::sync::Arc;
use tokio::sync::broadcast::{error::RecvError, Receiver};
use ward_hsm::KeyWrapper;

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
