//! Replicas on a shared etcd store (wiring, beside `server`): joining (the replica's id, the
//! etcd backend) and leaving, and the follower that brings this process's memory in line with every change
//! the store reports — the key directory first (so a revocation is refused here as soon as
//! this replica reads it), then decoded records, watchers, the sweeper's index and the keyring.

use crate::config::Config;
use crate::harden::create_private_dir;
use crate::keys::directory::DirectoryStore;
use crate::keys::Keys;
use crate::store::etcd::{replica_id, Changed, EtcdStore, ReplicaInfo};
use crate::vault::Vault;
use std::sync::Arc;
use tokio::sync::broadcast::{error::RecvError, Receiver};
use ward_hsm::KeyWrapper;

/// This process as a replica of a shared store: its id and the store.
pub struct Replica {
    /// The replica's id (its registry entry, its node keys).
    pub id: String,
    /// The etcd store.
    pub store: Arc<EtcdStore>,
}

/// Joins the cluster named by `[store.etcd]` (None with the embedded store): the replica's
/// id from `data_dir` (made on first start), the store loaded, the registry entry written.
pub async fn join(cfg: &Config, started_ms: u64) -> Result<Option<Replica>, String> {
    let Some(etcd) = cfg.store.etcd() else {
        return Ok(None);
    };
    create_private_dir(&cfg.data_dir)?;
    let id = replica_id(&cfg.data_dir)?;
    let info = ReplicaInfo {
        id: id.clone(),
        address: String::new(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        started_ms,
    };
    let store = EtcdStore::open(&etcd.store_config(), info)
        .await
        .map_err(|e| e.to_string())?;
    Ok(Some(Replica {
        id,
        store: Arc::new(store),
    }))
}

impl Replica {
    /// Leaves the cluster at shutdown: the quota units `keys` holds go back to the ledgers,
    /// then the lease is revoked (registry entry and leadership go at once).
    pub async fn leave(&self, keys: &Arc<Keys>) {
        let k = keys.clone();
        match tokio::task::spawn_blocking(move || k.give_back_quota()).await {
            Ok(Ok(n)) if n > 0 => tracing::info!(units = n, "quota units given back to the ledger"),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "could not give quota units back; they are lost (under-admission)")
            }
            _ => {}
        }
        self.store.leave().await;
    }
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
