//! Key management, online: adding keyring terms and rotating the HSM master key. Both hold the
//! admin lock so two rotations never interleave, and neither disturbs fetches: a new term is
//! installed by swapping the keyring Arc after it is durable, and a master-key rotation changes
//! only how the (unchanged) keyring keys are wrapped on disk.

use super::Vault;
use crate::audit::AuditRecord;
use crate::clock::Millis;
use crate::envelope::{index_key_aad, keyring_aad, random_key};
use crate::error::{Error, Result};
use crate::identity::Peer;
use crate::policy::Verb;
use crate::store::{encode, Batch, Tree};
use crate::unseal::{
    self, charge_wraps, index_key_entry, keyring_entries, wrap_count, KeyringEntry,
    WrappedIndexKey, INDEX_KEY, MASTER_KEY_WRAP_LIMIT,
};
use std::sync::Arc;
use ward_hsm::{HsmError, KeyWrapper};
use zeroize::Zeroizing;

/// A keyring term as described to operators.
#[derive(Debug, Clone)]
pub struct TermInfo {
    /// Term number.
    pub term: u32,
    /// Master key wrapping it.
    pub master_label: String,
    /// Creation time.
    pub create_ms: Millis,
}

/// Result of a master-key rotation.
#[derive(Debug, Clone)]
pub struct MasterKeyRotation {
    /// Label that wrapped the keyring before.
    pub previous_label: String,
    /// Label that wraps it now.
    pub label: String,
    /// Terms rewrapped.
    pub terms: u32,
}

/// The keyring's state.
#[derive(Debug, Clone)]
pub struct KeyringInfo {
    /// Term new versions use.
    pub current_term: u32,
    /// Every term.
    pub terms: Vec<TermInfo>,
    /// Master key wrapping them.
    pub master_label: String,
    /// Wraps made by that master key.
    pub wraps: u64,
    /// The bound on wraps.
    pub wrap_limit: u64,
}

impl Vault {
    /// Adds a keyring term for new versions (one HSM wrap).
    pub async fn rotate_keyring(&self, peer: &Peer, hsm: &Arc<dyn KeyWrapper>) -> Result<TermInfo> {
        let rec = AuditRecord::new(peer, "RotateKeyring", self.now());
        let result = self.rotate_keyring_inner(peer, hsm).await;
        self.finish_admin(rec, result).await
    }

    async fn rotate_keyring_inner(
        &self,
        peer: &Peer,
        hsm: &Arc<dyn KeyWrapper>,
    ) -> Result<TermInfo> {
        self.authorize_admin(peer)?;
        let _guard = self.admin_lock.lock().await;
        let entries = keyring_entries(&*self.store)?;
        let label = current_label(&entries)?;
        let term = entries.last().map_or(1, |e| e.term + 1);
        let mut batch = Batch::new();
        charge_wraps(&*self.store, &mut batch, &**hsm, &label, 1)?;
        let key = Zeroizing::new(random_key().to_vec());
        let wrapped = unseal::wrap(hsm, &label, keyring_aad(term, &label), key.clone()).await?;
        let entry = KeyringEntry {
            term,
            master_label: label.clone(),
            wrapped,
            create_ms: self.now(),
        };
        batch.guard(Tree::Keyring, term.to_be_bytes().to_vec(), None);
        batch.put(Tree::Keyring, term.to_be_bytes().to_vec(), encode(&entry));
        let mut rec = AuditRecord::new(peer, "RotateKeyring", self.now());
        self.commit_with_audit(batch, &mut rec).await?;
        self.store.sync().await.map_err(|e| {
            tracing::error!(error = %e, "keyring term not durable");
            Error::Unavailable("storage unavailable: new keyring term not confirmed durable".into())
        })?;
        // Only a durable term may seal new versions.
        let extended = Arc::new(self.keyring().extended(term, &key)?);
        *self.keyring.write().unwrap_or_else(|e| e.into_inner()) = extended;
        tracing::info!(term, master_key = %label, "keyring rotated");
        Ok(TermInfo {
            term,
            master_label: label,
            create_ms: entry.create_ms,
        })
    }

    /// Creates a new master key and rewraps every keyring term and the index key under it.
    pub async fn rotate_master_key(
        &self,
        peer: &Peer,
        hsm: &Arc<dyn KeyWrapper>,
        new_label: &str,
    ) -> Result<MasterKeyRotation> {
        let rec = AuditRecord::new(peer, "RotateMasterKey", self.now());
        let result = self.rotate_master_key_inner(peer, hsm, new_label).await;
        self.finish_admin(rec, result).await
    }

    async fn rotate_master_key_inner(
        &self,
        peer: &Peer,
        hsm: &Arc<dyn KeyWrapper>,
        requested: &str,
    ) -> Result<MasterKeyRotation> {
        self.authorize_admin(peer)?;
        if !requested.is_empty() {
            check_label(requested)?;
        }
        let _guard = self.admin_lock.lock().await;
        let entries = keyring_entries(&*self.store)?;
        let previous = current_label(&entries)?;
        let index = index_key_entry(&*self.store)?
            .ok_or_else(|| Error::DataLoss("the store holds no index key".into()))?;
        let label = if requested.is_empty() {
            next_free_label(hsm, &previous).await?
        } else if requested == previous {
            return Err(Error::invalid(format!(
                "{requested:?} is already the master key"
            )));
        } else {
            requested.to_owned()
        };

        let mut batch = Batch::new();
        charge_wraps(
            &*self.store,
            &mut batch,
            &**hsm,
            &label,
            entries.len() as u64 + 1,
        )?;
        {
            let (hsm, label) = (hsm.clone(), label.clone());
            tokio::task::spawn_blocking(move || hsm.create_master_key(&label))
                .await
                .map_err(|e| Error::Internal(format!("HSM task: {e}")))?
                .map_err(|e| match e {
                    HsmError::MasterKeyExists { label } => Error::AlreadyExists(format!(
                        "master key {label:?} already exists on the token; choose a new label"
                    )),
                    other => other.into(),
                })?;
        }
        tracing::info!(label = %label, "created master key");

        for old in &entries {
            let key = unseal::unwrap(
                hsm,
                &old.master_label,
                keyring_aad(old.term, &old.master_label),
                old.wrapped.clone(),
            )
            .await?;
            let new = KeyringEntry {
                wrapped: unseal::wrap(hsm, &label, keyring_aad(old.term, &label), key).await?,
                master_label: label.clone(),
                ..old.clone()
            };
            let k = old.term.to_be_bytes().to_vec();
            batch.guard(Tree::Keyring, k.clone(), Some(encode(old)));
            batch.put(Tree::Keyring, k, encode(&new));
        }
        let key = unseal::unwrap(
            hsm,
            &index.master_label,
            index_key_aad(&index.master_label),
            index.wrapped.clone(),
        )
        .await?;
        let new_index = WrappedIndexKey {
            master_label: label.clone(),
            wrapped: unseal::wrap(hsm, &label, index_key_aad(&label), key).await?,
        };
        batch.guard(Tree::Meta, INDEX_KEY, Some(encode(&index)));
        batch.put(Tree::Meta, INDEX_KEY, encode(&new_index));

        let mut rec = AuditRecord::new(peer, "RotateMasterKey", self.now());
        self.commit_with_audit(batch, &mut rec).await?;
        self.store.sync().await.map_err(|e| {
            tracing::error!(error = %e, "master-key rotation not durable");
            Error::Unavailable("storage unavailable: rotation not confirmed durable".into())
        })?;
        tracing::info!(previous = %previous, label = %label, terms = entries.len(), "master key rotated");
        Ok(MasterKeyRotation {
            previous_label: previous,
            label,
            terms: entries.len() as u32,
        })
    }

    /// The keyring's terms, master key and wrap count.
    pub async fn describe_keyring(&self, peer: &Peer) -> Result<KeyringInfo> {
        let rec = AuditRecord::new(peer, "DescribeKeyring", self.now());
        let result = (|| {
            self.authorize_admin(peer)?;
            let entries = keyring_entries(&*self.store)?;
            let master_label = current_label(&entries)?;
            let (wraps, _) = wrap_count(&*self.store, &master_label)?;
            Ok(KeyringInfo {
                current_term: self.keyring().current_term(),
                terms: entries
                    .into_iter()
                    .map(|e| TermInfo {
                        term: e.term,
                        master_label: e.master_label,
                        create_ms: e.create_ms,
                    })
                    .collect(),
                master_label,
                wraps,
                wrap_limit: MASTER_KEY_WRAP_LIMIT,
            })
        })();
        self.finish_read(rec, result).await
    }

    /// Admin calls need the `admin` verb on every secret in every environment: a rule granting
    /// it on `*` without an environment list (a backup or a master-key rotation covers them all).
    pub(super) fn authorize_admin(&self, peer: &Peer) -> Result<()> {
        if self.policy.grants_everywhere(&peer.identity, Verb::Admin) {
            Ok(())
        } else {
            Err(Error::PermissionDenied {
                identity: peer.identity.to_string(),
                verb: Verb::Admin.name(),
                target: "*".into(),
            })
        }
    }

    /// Success was committed with its audit record inside the operation; a failure is
    /// recorded here.
    async fn finish_admin<T>(&self, rec: AuditRecord, result: Result<T>) -> Result<T> {
        match result {
            Ok(v) => Ok(v),
            Err(e) => self.finish_write(rec, Err(e)).await,
        }
    }
}

/// The label wrapping the keyring now (every term carries the same one after a rotation).
fn current_label(entries: &[KeyringEntry]) -> Result<String> {
    entries
        .last()
        .map(|e| e.master_label.clone())
        .ok_or_else(|| Error::DataLoss("the store holds no keyring".into()))
}

fn check_label(label: &str) -> Result<()> {
    if label.is_empty()
        || label.len() > 32
        || !label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return Err(Error::invalid(
            "invalid new_label: use 1 to 32 characters of A-Z a-z 0-9 . _ -",
        ));
    }
    Ok(())
}

/// `ward-master-1` → `ward-master-2` (or `label-2`), skipping labels already on the token.
async fn next_free_label(hsm: &Arc<dyn KeyWrapper>, current: &str) -> Result<String> {
    let (stem, n) = match current.rsplit_once('-') {
        Some((stem, n)) if n.parse::<u64>().is_ok() => {
            (stem.to_owned(), n.parse::<u64>().unwrap_or(1))
        }
        _ => (current.to_owned(), 1),
    };
    for next in n + 1..n + 100 {
        let candidate = format!("{stem}-{next}");
        if check_label(&candidate).is_err() {
            break;
        }
        let (h, c) = (hsm.clone(), candidate.clone());
        let taken = tokio::task::spawn_blocking(move || h.has_master_key(&c))
            .await
            .map_err(|e| Error::Internal(format!("HSM task: {e}")))??;
        if !taken {
            return Ok(candidate);
        }
    }
    Err(Error::invalid(format!(
        "cannot derive a free label from {current:?}; name one in new_label"
    )))
}
