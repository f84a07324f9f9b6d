//! Envelope encryption: the keyring (keys wrapped by the HSM master key, unwrapped once at
//! unseal), a fresh data key (DEK) per secret version, and the associated data that binds
//! every ciphertext to the name, version and term it belongs to.
//!
//! No HSM call happens here: fetch and verify use only the unsealed keyring in memory.

use crate::error::{Error, Result};
use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use hmac::{Hmac, Mac};
use rand::{rngs::OsRng, RngCore};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use std::collections::BTreeMap;
use zeroize::Zeroizing;

/// Bytes in every symmetric key here (AES-256, HMAC-SHA256).
pub const KEY_LEN: usize = 32;
const NONCE_LEN: usize = 12;

/// The stored form of one version's value: its wrapped DEK and the ciphertext. Holds no
/// plaintext; safe to store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SealedValue {
    /// Keyring term whose key wraps the DEK.
    pub term: u32,
    /// Nonce of the DEK wrap.
    pub dek_nonce: [u8; NONCE_LEN],
    /// The DEK, AES-256-GCM under the keyring key (ciphertext and tag).
    pub wrapped_dek: Vec<u8>,
    /// Nonce of the value encryption.
    pub value_nonce: [u8; NONCE_LEN],
    /// The value, AES-256-GCM under the DEK (ciphertext and tag).
    pub ciphertext: Vec<u8>,
}

/// The unsealed keyring: every term's key, in memory only, zeroized on drop.
pub struct Keyring {
    terms: BTreeMap<u32, Aes256Gcm>,
    current: u32,
}

impl Keyring {
    /// A keyring from unwrapped term keys. `keys` must not be empty.
    pub fn new(keys: Vec<(u32, Zeroizing<Vec<u8>>)>) -> Result<Self> {
        let mut terms = BTreeMap::new();
        for (term, key) in keys {
            let cipher = Aes256Gcm::new_from_slice(&key).map_err(|_| {
                Error::DataLoss(format!("keyring term {term} has a key of the wrong length"))
            })?;
            terms.insert(term, cipher);
        }
        let current = *terms
            .keys()
            .next_back()
            .ok_or_else(|| Error::Internal("empty keyring".into()))?;
        Ok(Self { terms, current })
    }

    /// This keyring plus a new current `term`. The old terms stay, so every existing version
    /// still opens.
    pub fn extended(&self, term: u32, key: &[u8]) -> Result<Self> {
        if term <= self.current {
            return Err(Error::Internal(format!("keyring term {term} is not new")));
        }
        self.with_term(term, key)
    }

    /// This keyring plus `term` (a term another replica added); the newest term is current.
    pub fn with_term(&self, term: u32, key: &[u8]) -> Result<Self> {
        let cipher = Aes256Gcm::new_from_slice(key)
            .map_err(|_| Error::Internal("keyring key length".into()))?;
        let mut terms = self.terms.clone();
        terms.insert(term, cipher);
        Ok(Self {
            terms,
            current: self.current.max(term),
        })
    }

    /// Whether `term` is loaded.
    pub fn has_term(&self, term: u32) -> bool {
        self.terms.contains_key(&term)
    }

    /// The term new versions are sealed under.
    pub fn current_term(&self) -> u32 {
        self.current
    }

    /// Encrypts `value` for `name` at `version` under a fresh DEK wrapped by the current term.
    pub fn seal(&self, name: &str, version: u64, value: &[u8]) -> Result<SealedValue> {
        let term = self.current;
        let kek = &self.terms[&term];
        let dek = Zeroizing::new(random_key());
        let value_nonce = random_nonce();
        let ciphertext = Aes256Gcm::new_from_slice(&dek[..])
            .map_err(|_| Error::Internal("DEK length".into()))?
            .encrypt(
                Nonce::from_slice(&value_nonce),
                Payload {
                    msg: value,
                    aad: &value_aad(name, version),
                },
            )
            .map_err(|_| Error::Internal("value encryption failed".into()))?;
        let dek_nonce = random_nonce();
        let wrapped_dek = kek
            .encrypt(
                Nonce::from_slice(&dek_nonce),
                Payload {
                    msg: &dek[..],
                    aad: &dek_aad(name, version, term),
                },
            )
            .map_err(|_| Error::Internal("DEK wrap failed".into()))?;
        Ok(SealedValue {
            term,
            dek_nonce,
            wrapped_dek,
            value_nonce,
            ciphertext,
        })
    }

    /// Decrypts a sealed value, recomputing the associated data from `name` and `version`
    /// (never from the stored record): a ciphertext moved elsewhere fails with DATA_LOSS.
    pub fn open(
        &self,
        name: &str,
        version: u64,
        sealed: &SealedValue,
    ) -> Result<Zeroizing<Vec<u8>>> {
        let integrity = || {
            Error::DataLoss(format!(
                "integrity check failed for {name} version {version}: stored ciphertext does not \
                 belong here"
            ))
        };
        let kek = self.terms.get(&sealed.term).ok_or_else(|| {
            Error::DataLoss(format!(
                "{name} version {version} refers to unknown keyring term {}",
                sealed.term
            ))
        })?;
        let dek = Zeroizing::new(
            kek.decrypt(
                Nonce::from_slice(&sealed.dek_nonce),
                Payload {
                    msg: &sealed.wrapped_dek,
                    aad: &dek_aad(name, version, sealed.term),
                },
            )
            .map_err(|_| integrity())?,
        );
        let plain = Aes256Gcm::new_from_slice(&dek)
            .map_err(|_| integrity())?
            .decrypt(
                Nonce::from_slice(&sealed.value_nonce),
                Payload {
                    msg: &sealed.ciphertext,
                    aad: &value_aad(name, version),
                },
            )
            .map_err(|_| integrity())?;
        Ok(Zeroizing::new(plain))
    }
}

/// The index key: HMAC-SHA256 key under which API keys and request fingerprints are hashed.
/// Wrapped by the master key like the keyring, and unchanged when the keyring rotates, so
/// lookups never need a decryption.
pub struct IndexKey(Hmac<Sha256>);

impl IndexKey {
    /// An index key from its unwrapped bytes.
    pub fn new(key: &[u8]) -> Result<Self> {
        <Hmac<Sha256> as Mac>::new_from_slice(key)
            .map(Self)
            .map_err(|_| Error::Internal("index key length".into()))
    }

    /// Keyed hash of `parts`, each length-prefixed so that no two inputs collide.
    pub fn hash(&self, domain: &str, parts: &[&[u8]]) -> [u8; 32] {
        let mut mac = self.0.clone();
        mac.update(domain.as_bytes());
        for p in parts {
            mac.update(&(p.len() as u64).to_be_bytes());
            mac.update(p);
        }
        mac.finalize().into_bytes().into()
    }
}

impl IndexKey {
    /// The key for one purpose derived from the index key: HMAC-SHA256(index key, `label`).
    /// Derived at unseal and held only in memory; like the index key it survives keyring
    /// rotations, so nothing stored under it needs rewriting when the keyring turns.
    pub fn derive(&self, label: &str) -> DerivedKey {
        DerivedKey(Zeroizing::new(self.hash(label, &[])))
    }
}

/// Label of the key that authenticates stored records (see `store::sealed`).
pub const RECORD_MAC_LABEL: &str = "ward/record-mac/v1";
/// Label of the key of value fingerprints (see [`DerivedKey::fingerprint`]).
pub const FINGERPRINT_LABEL: &str = "ward/value-fingerprint/v1";

/// A MAC key derived from the index key ([`IndexKey::derive`]); its bytes live in zeroizing
/// memory, and each MAC keys a fresh HMAC from them (two extra SHA-256 blocks, ~0.1 µs).
pub struct DerivedKey(Zeroizing<[u8; KEY_LEN]>);

impl DerivedKey {
    fn hmac(&self) -> Hmac<Sha256> {
        // HMAC takes a key of any length: this cannot fail.
        <Hmac<Sha256> as Mac>::new_from_slice(&self.0[..]).unwrap_or_else(|_| unreachable!())
    }

    fn absorb(mac: &mut Hmac<Sha256>, parts: &[&[u8]]) {
        for p in parts {
            mac.update(&(p.len() as u64).to_be_bytes());
            mac.update(p);
        }
    }

    /// HMAC-SHA256 of `parts`, each length-prefixed so that no two inputs collide.
    pub fn mac(&self, parts: &[&[u8]]) -> [u8; 32] {
        let mut mac = self.hmac();
        Self::absorb(&mut mac, parts);
        mac.finalize().into_bytes().into()
    }

    /// Whether `tag` is the MAC of `parts` (compared in constant time).
    pub fn verify(&self, parts: &[&[u8]], tag: &[u8]) -> bool {
        let mut mac = self.hmac();
        Self::absorb(&mut mac, parts);
        mac.verify_slice(tag).is_ok()
    }

    /// The keyed fingerprint of a secret's value: the first 16 bytes of the MAC over the name
    /// and the value. Shown by DescribeSecret in place of a bare checksum, which anyone with
    /// the `list` verb (or a copy of the database) could brute-force offline for a
    /// low-entropy value; without this key nothing can be tested against it. Equal values of
    /// one secret have equal fingerprints (a rotation that kept the value shows); equal values
    /// of two secrets do not.
    pub fn fingerprint(&self, name: &str, value: &[u8]) -> [u8; 16] {
        let mac = self.mac(&[name.as_bytes(), value]);
        let mut out = [0u8; 16];
        out.copy_from_slice(&mac[..16]);
        out
    }
}

/// A fresh random 256-bit key from the OS CSPRNG.
pub fn random_key() -> [u8; KEY_LEN] {
    let mut k = [0u8; KEY_LEN];
    OsRng.fill_bytes(&mut k);
    k
}

fn random_nonce() -> [u8; NONCE_LEN] {
    let mut n = [0u8; NONCE_LEN];
    OsRng.fill_bytes(&mut n);
    n
}

/// Length-prefixed encoding of a context, so distinct contexts never share an encoding.
fn context(tag: &str, name: &str, version: u64, extra: &[u8]) -> Vec<u8> {
    let mut aad = Vec::with_capacity(tag.len() + name.len() + 24 + extra.len());
    aad.extend_from_slice(tag.as_bytes());
    aad.extend_from_slice(&(name.len() as u32).to_be_bytes());
    aad.extend_from_slice(name.as_bytes());
    aad.extend_from_slice(&version.to_be_bytes());
    aad.extend_from_slice(extra);
    aad
}

fn value_aad(name: &str, version: u64) -> Vec<u8> {
    context("ward/value/v1\0", name, version, &[])
}

fn dek_aad(name: &str, version: u64, term: u32) -> Vec<u8> {
    context("ward/dek/v1\0", name, version, &term.to_be_bytes())
}

/// AAD for a keyring term's key wrapped by the master key `label`.
pub fn keyring_aad(term: u32, label: &str) -> Vec<u8> {
    context("ward/keyring/v1\0", label, u64::from(term), &[])
}

/// AAD for the index key wrapped by the master key `label`.
pub fn index_key_aad(label: &str) -> Vec<u8> {
    context("ward/index-key/v1\0", label, 0, &[])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring() -> Keyring {
        Keyring::new(vec![(1, Zeroizing::new(random_key().to_vec()))]).unwrap()
    }

    #[test]
    fn round_trip() {
        let k = ring();
        let s = k.seal("db/pw", 3, b"hunter2").unwrap();
        assert_eq!(&k.open("db/pw", 3, &s).unwrap()[..], b"hunter2");
        assert!(!s.ciphertext.windows(7).any(|w| w == b"hunter2"));
    }

    #[test]
    fn moved_ciphertext_fails() {
        let k = ring();
        let s = k.seal("a", 1, b"v").unwrap();
        assert!(matches!(k.open("b", 1, &s), Err(Error::DataLoss(_))));
        assert!(matches!(k.open("a", 2, &s), Err(Error::DataLoss(_))));
        let mut t = s.clone();
        t.term = 2;
        assert!(matches!(k.open("a", 1, &t), Err(Error::DataLoss(_))));
        let mut t = s.clone();
        t.ciphertext[0] ^= 1;
        assert!(matches!(k.open("a", 1, &t), Err(Error::DataLoss(_))));
    }

    #[test]
    fn derived_keys_are_distinct_and_verify() {
        let index = IndexKey::new(&random_key()).unwrap();
        let (a, b) = (
            index.derive(RECORD_MAC_LABEL),
            index.derive(FINGERPRINT_LABEL),
        );
        let tag = a.mac(&[b"secrets", b"db/pw", b"body"]);
        assert!(a.verify(&[b"secrets", b"db/pw", b"body"], &tag));
        assert!(!b.verify(&[b"secrets", b"db/pw", b"body"], &tag));
        assert!(!a.verify(&[b"secrets", b"db/pw2", b"body"], &tag));
        assert!(!a.verify(&[b"secretsdb/pw", b"", b"body"], &tag));
        assert!(!a.verify(&[b"secrets", b"db/pw", b"body"], &tag[..31]));
        assert_eq!(b.fingerprint("a", b"v"), b.fingerprint("a", b"v"));
        assert_ne!(b.fingerprint("a", b"v"), b.fingerprint("b", b"v"));
        assert_ne!(b.fingerprint("a", b"v"), b.fingerprint("a", b"w"));
        // Same labels from another index key: other keys.
        let other = IndexKey::new(&random_key()).unwrap();
        assert_ne!(
            other.derive(FINGERPRINT_LABEL).fingerprint("a", b"v"),
            b.fingerprint("a", b"v")
        );
    }

    #[test]
    fn contexts_do_not_collide() {
        assert_ne!(value_aad("ab", 1), value_aad("a", 1));
        assert_ne!(dek_aad("a", 1, 1), dek_aad("a", 1, 2));
    }
}
