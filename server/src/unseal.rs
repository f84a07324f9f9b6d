//! Unseal: at start-up, load the wrapped keyring and index key from the store and unwrap them
//! through the HSM, once. On the very first start (empty store) create them. After this, no
//! fetch or verify needs the HSM.

use crate::clock::Millis;
use crate::envelope::{index_key_aad, keyring_aad, random_key, IndexKey, Keyring};
use crate::error::{Error, Result};
use crate::store::{decode, encode, Batch, Store, Tree};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use ward_hsm::KeyWrapper;
use zeroize::Zeroizing;

const INDEX_KEY: &[u8] = b"index_key";

/// A keyring term's key as stored: wrapped by a master key.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KeyringEntry {
    /// Term number.
    pub term: u32,
    /// Label of the master key that wraps it.
    pub master_label: String,
    /// The wrapped key (HSM output).
    pub wrapped: Vec<u8>,
    /// When the term was created.
    pub create_ms: Millis,
}

/// The index key as stored: wrapped by a master key.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WrappedIndexKey {
    /// Label of the master key that wraps it.
    pub master_label: String,
    /// The wrapped key.
    pub wrapped: Vec<u8>,
}

/// Unwraps the keyring and index key, creating both under `master_label` if the store has
/// none yet.
pub async fn unseal(
    store: &Arc<dyn Store>,
    hsm: &Arc<dyn KeyWrapper>,
    master_label: &str,
    now: Millis,
) -> Result<(Keyring, IndexKey)> {
    let entries = store.scan(Tree::Keyring, b"", b"", usize::MAX)?;
    let index_raw = store.get(Tree::Meta, INDEX_KEY)?;
    let (entries, index) = match (entries.is_empty(), index_raw) {
        (true, None) => create(store, hsm, master_label, now).await?,
        (false, Some(raw)) => {
            let entries = entries
                .iter()
                .map(|(_, v)| decode::<KeyringEntry>("keyring entry", v))
                .collect::<Result<Vec<_>>>()?;
            (entries, decode::<WrappedIndexKey>("index key", &raw)?)
        }
        _ => {
            return Err(Error::DataLoss(
                "the store holds a keyring without an index key, or the reverse".into(),
            ))
        }
    };
    let mut keys = Vec::with_capacity(entries.len());
    for e in entries {
        let aad = keyring_aad(e.term, &e.master_label);
        let key = unwrap(hsm, &e.master_label, aad, e.wrapped).await?;
        keys.push((e.term, key));
    }
    let index_key = unwrap(
        hsm,
        &index.master_label,
        index_key_aad(&index.master_label),
        index.wrapped,
    )
    .await?;
    Ok((Keyring::new(keys)?, IndexKey::new(&index_key)?))
}

async fn create(
    store: &Arc<dyn Store>,
    hsm: &Arc<dyn KeyWrapper>,
    label: &str,
    now: Millis,
) -> Result<(Vec<KeyringEntry>, WrappedIndexKey)> {
    let term_key = Zeroizing::new(random_key());
    let index_key = Zeroizing::new(random_key());
    let entry = KeyringEntry {
        term: 1,
        master_label: label.to_owned(),
        wrapped: wrap(hsm, label, keyring_aad(1, label), term_key).await?,
        create_ms: now,
    };
    let index = WrappedIndexKey {
        master_label: label.to_owned(),
        wrapped: wrap(hsm, label, index_key_aad(label), index_key).await?,
    };
    let mut batch = Batch::new();
    batch.guard(Tree::Keyring, 1u32.to_be_bytes().to_vec(), None);
    batch.guard(Tree::Meta, INDEX_KEY, None);
    batch.put(Tree::Keyring, 1u32.to_be_bytes().to_vec(), encode(&entry));
    batch.put(Tree::Meta, INDEX_KEY, encode(&index));
    store.commit(batch)?;
    store.sync().await?;
    tracing::info!(
        master_key = label,
        "created keyring term 1 and the index key"
    );
    Ok((vec![entry], index))
}

async fn wrap(
    hsm: &Arc<dyn KeyWrapper>,
    label: &str,
    aad: Vec<u8>,
    key: Zeroizing<[u8; 32]>,
) -> Result<Vec<u8>> {
    let (hsm, label) = (hsm.clone(), label.to_owned());
    tokio::task::spawn_blocking(move || hsm.wrap(&label, &aad, &key[..]))
        .await
        .map_err(|e| Error::Internal(format!("HSM task: {e}")))?
        .map_err(Error::from)
}

async fn unwrap(
    hsm: &Arc<dyn KeyWrapper>,
    label: &str,
    aad: Vec<u8>,
    wrapped: Vec<u8>,
) -> Result<Zeroizing<Vec<u8>>> {
    let (hsm, label) = (hsm.clone(), label.to_owned());
    tokio::task::spawn_blocking(move || hsm.unwrap(&label, &aad, &wrapped))
        .await
        .map_err(|e| Error::Internal(format!("HSM task: {e}")))?
        .map_err(Error::from)
}
