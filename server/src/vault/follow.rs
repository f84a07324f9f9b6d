//! Changes made by other replicas of a shared store: what this process keeps in memory about
//! the vault (decoded records, the keyring, the watchers and the sweeper's index) is brought
//! in line with each change the store's follow feed reports (see `Store::follow`).

use super::Vault;
use crate::envelope::keyring_aad;
use crate::envelope::SealedValue;
use crate::error::{Error, Result};
use crate::store::Tree;
use crate::unseal::{self, keyring_entries};
use std::sync::Arc;
use ward_hsm::KeyWrapper;
use zeroize::Zeroizing;

impl Vault {
    /// Brings memory in line with the changed entries (from any replica, this one included).
    /// A keyring term added elsewhere is unwrapped here (an HSM call) before this returns.
    pub async fn apply_changes(&self, changed: &[(Tree, Vec<u8>)], hsm: &Arc<dyn KeyWrapper>) {
        let mut keyring = false;
        for (tree, key) in changed {
            match tree {
                Tree::Secrets => {
                    self.records.invalidate(key);
                    for sink in &self.sinks {
                        sink.committed(key);
                        if let Ok(name) = std::str::from_utf8(key) {
                            sink.durable(name);
                        }
                    }
                }
                Tree::Keyring => keyring = true,
                _ => {}
            }
        }
        if keyring {
            if let Err(e) = self.load_new_terms(hsm).await {
                tracing::error!(error = %e, "could not load a keyring term added by another replica");
            }
        }
    }

    /// Everything may have changed (the follower fell behind): forget every decoded record
    /// and tell the watchers and the sweeper about every secret.
    pub async fn apply_everything(&self, hsm: &Arc<dyn KeyWrapper>) -> Result<()> {
        let all: Vec<(Tree, Vec<u8>)> = crate::store::scan_all(&*self.store, Tree::Secrets)?
            .into_iter()
            .map(|(name, _)| (Tree::Secrets, name))
            .collect();
        self.apply_changes(&all, hsm).await;
        self.load_new_terms(hsm).await
    }

    /// Unwraps the stored keyring terms this process does not hold yet.
    pub async fn load_new_terms(&self, hsm: &Arc<dyn KeyWrapper>) -> Result<()> {
        let _guard = self.admin_lock.lock().await;
        for e in keyring_entries(&*self.store)? {
            if self.keyring().has_term(e.term) {
                continue;
            }
            let aad = keyring_aad(e.term, &e.master_label);
            let key = unseal::unwrap(hsm, &e.master_label, aad, e.wrapped).await?;
            let next = Arc::new(self.keyring().with_term(e.term, &key)?);
            *self.keyring.write().unwrap_or_else(|e| e.into_inner()) = next;
            tracing::info!(
                term = e.term,
                "loaded a keyring term added by another replica"
            );
        }
        Ok(())
    }

    /// Opens a sealed value with the keyring. A value sealed under a term this process has not
    /// loaded yet is UNAVAILABLE (retry) while the term is on its way from another replica,
    /// DATA_LOSS (from the keyring) if the store does not know the term either.
    pub(crate) fn open_sealed(
        &self,
        name: &str,
        version: u64,
        sealed: &SealedValue,
    ) -> Result<Zeroizing<Vec<u8>>> {
        let ring = self.keyring();
        if !ring.has_term(sealed.term)
            && keyring_entries(&*self.store)?
                .iter()
                .any(|e| e.term == sealed.term)
        {
            return Err(Error::Unavailable(format!(
                "keyring term {} is still being loaded on this replica; retry",
                sealed.term
            )));
        }
        ring.open(name, version, sealed)
    }
}
