//! An in-process, software-only [`KeyWrapper`] and [`MacSigner`] for unit tests of the envelope
//! and audit layers.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use rand::rngs::OsRng;
use rand::RngCore;
use zeroize::Zeroizing;

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::{HsmError, KeyWrapper, MacSigner, Mechanism};

/// Blob tag shared with the PKCS#11 AES-GCM format.
const TAG_GCM: u8 = 0x01;
/// IV length in bytes.
const IV_LEN: usize = 12;
/// GCM tag length in bytes.
const TAG_LEN: usize = 16;

/// Software AES-256-GCM master keys held in process memory, producing the same `0x01` blob
/// format and the same errors as [`crate::Pkcs11Wrapper`].
///
/// For unit tests of the envelope layer only: the master keys live in ordinary memory and die
/// with the process. Never the default, never used by the server binary or the end-to-end suite.
#[derive(Default)]
pub struct InMemoryWrapper {
    keys: Mutex<HashMap<String, Zeroizing<[u8; 32]>>>,
    mac_keys: Mutex<HashMap<String, Zeroizing<[u8; 32]>>>,
}

impl std::fmt::Debug for InMemoryWrapper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let keys = self.keys.lock().unwrap_or_else(PoisonError::into_inner);
        let mut labels: Vec<&String> = keys.keys().collect();
        labels.sort();
        f.debug_struct("InMemoryWrapper")
            .field("labels", &labels)
            .finish()
    }
}

impl InMemoryWrapper {
    /// An empty wrapper with no master keys.
    pub fn new() -> Self {
        Self::default()
    }

    fn with_key<T>(
        &self,
        label: &str,
        f: impl FnOnce(&Aes256Gcm) -> Result<T, HsmError>,
    ) -> Result<T, HsmError> {
        // The map is only ever inserted into, so a poisoned lock still guards consistent data.
        let keys = self.keys.lock().unwrap_or_else(PoisonError::into_inner);
        match keys.get(label) {
            Some(k) => f(&Aes256Gcm::new(k.as_ref().into())),
            None => Err(HsmError::MasterKeyMissing {
                label: label.to_owned(),
            }),
        }
    }
}

impl KeyWrapper for InMemoryWrapper {
    fn wrap(&self, label: &str, aad: &[u8], key: &[u8]) -> Result<Vec<u8>, HsmError> {
        self.with_key(label, |cipher| {
            let mut iv = [0u8; IV_LEN];
            OsRng.fill_bytes(&mut iv);
            let ct = cipher
                .encrypt(Nonce::from_slice(&iv), Payload { msg: key, aad })
                .map_err(|_| HsmError::Unavailable("software AES-GCM encryption failed".into()))?;
            let mut out = Vec::with_capacity(1 + IV_LEN + ct.len());
            out.push(TAG_GCM);
            out.extend_from_slice(&iv);
            out.extend_from_slice(&ct);
            Ok(out)
        })
    }

    fn unwrap(
        &self,
        label: &str,
        aad: &[u8],
        wrapped: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, HsmError> {
        self.with_key(label, |cipher| {
            if wrapped.len() < 1 + IV_LEN + TAG_LEN || wrapped[0] != TAG_GCM {
                return Err(HsmError::Integrity);
            }
            let (iv, ct) = wrapped[1..].split_at(IV_LEN);
            cipher
                .decrypt(Nonce::from_slice(iv), Payload { msg: ct, aad })
                .map(Zeroizing::new)
                .map_err(|_| HsmError::Integrity)
        })
    }

    fn has_master_key(&self, label: &str) -> Result<bool, HsmError> {
        let keys = self.keys.lock().unwrap_or_else(PoisonError::into_inner);
        Ok(keys.contains_key(label))
    }

    fn create_master_key(&self, label: &str) -> Result<(), HsmError> {
        let mut keys = self.keys.lock().unwrap_or_else(PoisonError::into_inner);
        if keys.contains_key(label) {
            return Err(HsmError::MasterKeyExists {
                label: label.to_owned(),
            });
        }
        let mut raw = Zeroizing::new([0u8; 32]);
        OsRng.fill_bytes(raw.as_mut());
        keys.insert(label.to_owned(), raw);
        Ok(())
    }

    fn mechanism(&self) -> Mechanism {
        Mechanism::AesGcm
    }
}

impl InMemoryWrapper {
    fn hmac(&self, label: &str, data: &[u8]) -> Result<Hmac<Sha256>, HsmError> {
        // The map is only ever inserted into, so a poisoned lock still guards consistent data.
        let keys = self.mac_keys.lock().unwrap_or_else(PoisonError::into_inner);
        let key = keys.get(label).ok_or_else(|| HsmError::MacKeyMissing {
            label: label.to_owned(),
        })?;
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key.as_ref())
            .map_err(|_| HsmError::Unavailable("software HMAC key rejected".into()))?;
        mac.update(data);
        Ok(mac)
    }
}

impl MacSigner for InMemoryWrapper {
    fn has_mac_key(&self, label: &str) -> Result<bool, HsmError> {
        let keys = self.mac_keys.lock().unwrap_or_else(PoisonError::into_inner);
        Ok(keys.contains_key(label))
    }

    fn create_mac_key(&self, label: &str) -> Result<(), HsmError> {
        let mut keys = self.mac_keys.lock().unwrap_or_else(PoisonError::into_inner);
        if keys.contains_key(label) {
            return Err(HsmError::MacKeyExists {
                label: label.to_owned(),
            });
        }
        let mut raw = Zeroizing::new([0u8; 32]);
        OsRng.fill_bytes(raw.as_mut());
        keys.insert(label.to_owned(), raw);
        Ok(())
    }

    fn mac(&self, label: &str, data: &[u8]) -> Result<Vec<u8>, HsmError> {
        Ok(self.hmac(label, data)?.finalize().into_bytes().to_vec())
    }

    fn verify_mac(&self, label: &str, data: &[u8], tag: &[u8]) -> Result<bool, HsmError> {
        Ok(self.hmac(label, data)?.verify_slice(tag).is_ok())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_errors() {
        let w = InMemoryWrapper::new();
        assert!(matches!(
            w.wrap("m", b"a", b"k"),
            Err(HsmError::MasterKeyMissing { .. })
        ));
        w.create_master_key("m").unwrap();
        assert!(w.has_master_key("m").unwrap());
        assert!(matches!(
            w.create_master_key("m"),
            Err(HsmError::MasterKeyExists { .. })
        ));
        let key = [7u8; 32];
        let blob = w.wrap("m", b"aad", &key).unwrap();
        assert_eq!(blob[0], 0x01);
        assert_eq!(blob.len(), 1 + 12 + 32 + 16);
        assert_eq!(w.unwrap("m", b"aad", &blob).unwrap().as_slice(), &key);
        assert!(matches!(
            w.unwrap("m", b"other", &blob),
            Err(HsmError::Integrity)
        ));
        let mut bad = blob.clone();
        bad[20] ^= 1;
        assert!(matches!(
            w.unwrap("m", b"aad", &bad),
            Err(HsmError::Integrity)
        ));
        assert!(matches!(
            w.unwrap("m", b"aad", &blob[..10]),
            Err(HsmError::Integrity)
        ));
        w.create_master_key("n").unwrap();
        assert!(matches!(
            w.unwrap("n", b"aad", &blob),
            Err(HsmError::Integrity)
        ));
    }

    #[test]
    fn macs() {
        let w = InMemoryWrapper::new();
        assert!(matches!(
            w.mac("a", b"x"),
            Err(HsmError::MacKeyMissing { .. })
        ));
        w.create_mac_key("a").unwrap();
        assert!(w.has_mac_key("a").unwrap() && !w.has_master_key("a").unwrap());
        let tag = w.mac("a", b"x").unwrap();
        assert_eq!(tag.len(), 32);
        assert!(w.verify_mac("a", b"x", &tag).unwrap());
        assert!(!w.verify_mac("a", b"y", &tag).unwrap());
        assert!(!w.verify_mac("a", b"x", &tag[..31]).unwrap());
    }
}
