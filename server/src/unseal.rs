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

/// Meta key of the wrapped index key.
pub(crate) const INDEX_KEY: &[u8] = b"index_key";

/// Most key-material wraps one master key may make under AES-GCM. Random 96-bit IVs must stay
/// far below 2^32 invocations per key (NIST SP 800-38D); Ward stops at 2^30 and asks for a
/// master-key rotation. Wraps are O(keyring terms), so reaching it means something is wrong.
pub const MASTER_KEY_WRAP_LIMIT: u64 = 1 << 30;

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

/// Every keyring entry, in term order.
pub fn keyring_entries(store: &dyn Store) -> Result<Vec<KeyringEntry>> {
    store
        .scan(Tree::Keyring, b"", b"", usize::MAX)?
        .iter()
        .map(|(_, v)| decode::<KeyringEntry>("keyring entry", v))
        .collect()
}

/// The wrapped index key, if the store has one.
pub fn index_key_entry(store: &dyn Store) -> Result<Option<WrappedIndexKey>> {
    store
        .get(Tree::Meta, INDEX_KEY)?
        .map(|raw| decode("index key", &raw))
        .transpose()
}

/// Master-key labels the stored keyring and index key are wrapped under (empty for a new
/// store). These, not the config's label, are what start-up must find on the token.
pub fn referenced_labels(store: &dyn Store) -> Result<Vec<String>> {
    let mut labels: Vec<String> = keyring_entries(store)?
        .into_iter()
        .map(|e| e.master_label)
        .collect();
    labels.extend(index_key_entry(store)?.map(|i| i.master_label));
    labels.sort();
    labels.dedup();
    Ok(labels)
}

fn wraps_key(label: &str) -> Vec<u8> {
    [b"wraps/".as_slice(), label.as_bytes()].concat()
}

/// How many wraps the master key `label` has made, and the stored bytes (for a guard).
pub fn wrap_count(store: &dyn Store, label: &str) -> Result<(u64, Option<Vec<u8>>)> {
    let raw = store.get(Tree::Meta, &wraps_key(label))?;
    let count = match raw.as_deref() {
        None => 0,
        Some(b) => u64::from_be_bytes(
            b.try_into()
                .map_err(|_| Error::DataLoss("stored wrap count is corrupt".into()))?,
        ),
    };
    Ok((count, raw))
}

/// Refuses `n` more wraps under `label` if that would pass the GCM bound; otherwise stages the
/// new count in `batch` (guarded, so the count can never be lost to a race).
pub fn charge_wraps(
    store: &dyn Store,
    batch: &mut Batch,
    hsm: &dyn KeyWrapper,
    label: &str,
    n: u64,
) -> Result<()> {
    let (count, raw) = wrap_count(store, label)?;
    let next = count.saturating_add(n);
    if hsm.mechanism() == ward_hsm::Mechanism::AesGcm && next > MASTER_KEY_WRAP_LIMIT {
        return Err(Error::FailedPrecondition(format!(
            "master key {label:?} has made {count} AES-GCM wraps; the bound is \
             {MASTER_KEY_WRAP_LIMIT}: rotate the master key"
        )));
    }
    batch.guard(Tree::Meta, wraps_key(label), raw);
    batch.put(Tree::Meta, wraps_key(label), next.to_be_bytes().to_vec());
    Ok(())
}

/// Unwraps the keyring and index key, creating both under `master_label` if the store has
/// none yet.
pub async fn unseal(
    store: &Arc<dyn Store>,
    hsm: &Arc<dyn KeyWrapper>,
    master_label: &str,
    now: Millis,
) -> Result<(Keyring, IndexKey)> {
    let entries = keyring_entries(&**store)?;
    let (entries, index) = match (entries.is_empty(), index_key_entry(&**store)?) {
        (true, None) => match create(store, hsm, master_label, now).await {
            // Another replica of a shared store created them first: use those.
            Err(Error::Conflict(_)) => {
                match (keyring_entries(&**store)?, index_key_entry(&**store)?) {
                    (entries, Some(index)) if !entries.is_empty() => (entries, index),
                    _ => {
                        return Err(Error::Unavailable(
                            "the keyring is being created by another replica; retry".into(),
                        ))
                    }
                }
            }
            other => other?,
        },
        (false, Some(index)) => (entries, index),
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
    let term_key = Zeroizing::new(random_key().to_vec());
    let index_key = Zeroizing::new(random_key().to_vec());
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
    charge_wraps(&**store, &mut batch, &**hsm, label, 2)?;
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

/// Wraps `key` under the master key `label` (an HSM call, off the async workers).
pub(crate) async fn wrap(
    hsm: &Arc<dyn KeyWrapper>,
    label: &str,
    aad: Vec<u8>,
    key: Zeroizing<Vec<u8>>,
) -> Result<Vec<u8>> {
    let (hsm, label) = (hsm.clone(), label.to_owned());
    tokio::task::spawn_blocking(move || hsm.wrap(&label, &aad, &key[..]))
        .await
        .map_err(|e| Error::Internal(format!("HSM task: {e}")))?
        .map_err(Error::from)
}

/// Unwraps a key wrapped under `label` (an HSM call, off the async workers).
pub(crate) async fn unwrap(
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
