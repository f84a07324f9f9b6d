//! The self-describing wrapped-key formats, and wrapping and unwrapping in them under a master
//! key.
//!
//! Wrapped blob formats (byte 0 says which; unwrap dispatches on it, whatever the configured
//! mechanism):
//!
//! * `0x01 || iv (12) || ciphertext || tag (16)` — CKM_AES_GCM through C_Encrypt/C_Decrypt,
//!   random IV from the OS, the AAD passed to the HSM, 128-bit tag.
//! * `0x02 || RFC 5649 output` — CKM_AES_KEY_WRAP_PAD through C_WrapKey/C_UnwrapKey of a
//!   temporary session object whose value is `key || SHA-256(aad)`; the digest is checked in
//!   constant time after unwrapping.
//!
//! Plaintext key material is held in `Zeroizing` buffers here. Two copies are outside this
//! crate's reach: the temporary KWP object inside the HSM (destroyed right after use), and the
//! scratch buffer cryptoki's `get_attributes` reads CKA_VALUE into before copying it out.

use cryptoki::mechanism::aead::GcmParams;
use cryptoki::mechanism::Mechanism as CkMechanism;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;
use rand::rngs::OsRng;
use rand::RngCore;
use sha2::{Digest, Sha256};
use zeroize::{Zeroize, Zeroizing};

use super::keys::with_key;
use super::objects::KeyKind;
use super::token::{ct_eq, Token};
use crate::error::Op;
use crate::{HsmError, Mechanism};

/// Blob tag of the AES-GCM format.
const TAG_GCM: u8 = 0x01;
/// Blob tag of the AES key-wrap-with-padding format.
const TAG_KWP: u8 = 0x02;
/// GCM IV length in bytes.
const GCM_IV_LEN: usize = 12;
/// GCM tag length in bytes.
const GCM_TAG_LEN: usize = 16;
/// Length of the AAD digest appended to the key in the KWP format.
const AAD_DIGEST_LEN: usize = 32;

/// Wraps `key` under the master key `label` of `token`, bound to `aad`, in the format of
/// `mechanism`.
pub(super) fn wrap(
    token: &Token,
    mechanism: Mechanism,
    label: &str,
    aad: &[u8],
    key: &[u8],
) -> Result<Vec<u8>, HsmError> {
    match mechanism {
        Mechanism::AesGcm => wrap_gcm(token, label, aad, key),
        Mechanism::AesKeyWrapPad => wrap_kwp(token, label, aad, key),
    }
}

/// Unwraps a blob of either format (byte 0 says which) under the master key `label`.
pub(super) fn unwrap(
    token: &Token,
    label: &str,
    aad: &[u8],
    wrapped: &[u8],
) -> Result<Zeroizing<Vec<u8>>, HsmError> {
    match wrapped.split_first() {
        Some((&TAG_GCM, body)) => unwrap_gcm(token, label, aad, body),
        Some((&TAG_KWP, body)) => unwrap_kwp(token, label, aad, body),
        _ => Err(HsmError::Integrity),
    }
}

fn wrap_gcm(token: &Token, label: &str, aad: &[u8], key: &[u8]) -> Result<Vec<u8>, HsmError> {
    let mut iv = [0u8; GCM_IV_LEN];
    OsRng.fill_bytes(&mut iv);
    let ct = with_key(token, KeyKind::Master, label, Op::General, |s, h| {
        let mut iv_param = iv;
        let params = GcmParams::new(&mut iv_param, aad, (GCM_TAG_LEN as u64 * 8).into())?;
        s.encrypt(&CkMechanism::AesGcm(params), h, key)
    })?;
    let mut out = Vec::with_capacity(1 + GCM_IV_LEN + ct.len());
    out.push(TAG_GCM);
    out.extend_from_slice(&iv);
    out.extend_from_slice(&ct);
    Ok(out)
}

fn unwrap_gcm(
    token: &Token,
    label: &str,
    aad: &[u8],
    body: &[u8],
) -> Result<Zeroizing<Vec<u8>>, HsmError> {
    if body.len() < GCM_IV_LEN + GCM_TAG_LEN {
        return Err(HsmError::Integrity);
    }
    let (iv, ct) = body.split_at(GCM_IV_LEN);
    with_key(token, KeyKind::Master, label, Op::Unwrap, |s, h| {
        let mut iv_param = [0u8; GCM_IV_LEN];
        iv_param.copy_from_slice(iv);
        let params = GcmParams::new(&mut iv_param, aad, (GCM_TAG_LEN as u64 * 8).into())?;
        s.decrypt(&CkMechanism::AesGcm(params), h, ct)
            .map(Zeroizing::new)
    })
}

/// Overwrites the values of a template's CKA_VALUE attributes.
fn scrub(template: &mut [Attribute]) {
    for attr in template {
        if let Attribute::Value(v) = attr {
            v.zeroize();
        }
    }
}

/// A temporary session object, destroyed on drop.
struct TempObject<'s> {
    session: &'s Session,
    handle: ObjectHandle,
}

impl Drop for TempObject<'_> {
    fn drop(&mut self) {
        if let Err(e) = self.session.destroy_object(self.handle) {
            // A session object also dies with its session; nothing else to do.
            tracing::warn!(error = %e, "cannot destroy a temporary PKCS#11 object");
        }
    }
}

/// Template of the temporary generic-secret object used by the KWP format.
fn temp_key_template() -> Vec<Attribute> {
    vec![
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::GENERIC_SECRET),
        Attribute::Token(false),
        Attribute::Sensitive(false),
        Attribute::Extractable(true),
    ]
}

fn wrap_kwp(token: &Token, label: &str, aad: &[u8], key: &[u8]) -> Result<Vec<u8>, HsmError> {
    let digest = Sha256::digest(aad);
    let wrapped = with_key(token, KeyKind::Master, label, Op::General, |s, h| {
        let mut value = Vec::with_capacity(key.len() + AAD_DIGEST_LEN);
        value.extend_from_slice(key);
        value.extend_from_slice(&digest);
        let mut template = temp_key_template();
        template.push(Attribute::Value(value));
        let created = s.create_object(&template);
        scrub(&mut template);
        let temp = TempObject {
            session: s,
            handle: created?,
        };
        s.wrap_key(&CkMechanism::AesKeyWrapPad, h, temp.handle)
    })?;
    let mut out = Vec::with_capacity(1 + wrapped.len());
    out.push(TAG_KWP);
    out.extend_from_slice(&wrapped);
    Ok(out)
}

fn unwrap_kwp(
    token: &Token,
    label: &str,
    aad: &[u8],
    body: &[u8],
) -> Result<Zeroizing<Vec<u8>>, HsmError> {
    // RFC 5649 output is a whole number of 64-bit blocks, at least two.
    if body.len() < 16 || !body.len().is_multiple_of(8) {
        return Err(HsmError::Integrity);
    }
    let value = with_key(token, KeyKind::Master, label, Op::Unwrap, |s, h| {
        let handle = s.unwrap_key(&CkMechanism::AesKeyWrapPad, h, body, &temp_key_template())?;
        let temp = TempObject { session: s, handle };
        let attrs = s.get_attributes(temp.handle, &[AttributeType::Value])?;
        let mut value = None;
        for attr in attrs {
            if let Attribute::Value(v) = attr {
                value = Some(Zeroizing::new(v));
            }
        }
        Ok(value)
    })?;
    let value = value.ok_or_else(|| {
        HsmError::Unavailable("the HSM did not return the unwrapped value".into())
    })?;
    // SoftHSM 2.6's C_WrapKey zero-pads the value to a multiple of 8 bytes before RFC 5649
    // wrapping (the blob's length indicator is the padded length), so its blobs unwrap to
    // `key || digest || 0{0..7}`; a conformant HSM returns exactly `key || digest`. Accept
    // both: try the exact length first, then with up to 7 trailing zero bytes removed.
    let want = Sha256::digest(aad);
    let len = value.len();
    let shortest = AAD_DIGEST_LEN.max(len.saturating_sub(7));
    let mut key_end = None;
    for end in (shortest..=len).rev() {
        if value[end..].iter().any(|&b| b != 0) {
            break;
        }
        if ct_eq(&value[end - AAD_DIGEST_LEN..end], &want) {
            key_end = Some(end - AAD_DIGEST_LEN);
            break;
        }
    }
    let Some(key_end) = key_end else {
        tracing::debug!(token = %token.label, key = label, "AAD digest mismatch after unwrap");
        return Err(HsmError::Integrity);
    };
    Ok(Zeroizing::new(value[..key_end].to_vec()))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use crate::pkcs11::testkit::{both, with_key};
    use crate::{HsmError, KeyWrapper, Mechanism};

    #[test]
    fn round_trips_and_formats() {
        let f = with_key("t-round-trip");
        for key in [&[0x42u8; 32][..], &[1, 2, 3][..], &[9u8; 64][..]] {
            for w in both(f) {
                let blob = w.wrap("t-round-trip", b"secret/a@v1", key).unwrap();
                match w.mechanism() {
                    Mechanism::AesGcm => {
                        assert_eq!(blob[0], 0x01);
                        assert_eq!(blob.len(), 1 + 12 + key.len() + 16);
                    }
                    _ => assert_eq!(blob[0], 0x02),
                }
                // Either wrapper unwraps either format: dispatch is on byte 0.
                for u in both(f) {
                    let out = u.unwrap("t-round-trip", b"secret/a@v1", &blob).unwrap();
                    assert_eq!(out.as_slice(), key);
                }
            }
        }
        // Fresh IV every time.
        let a = f.gcm.wrap("t-round-trip", b"x", &[0; 32]).unwrap();
        let b = f.gcm.wrap("t-round-trip", b"x", &[0; 32]).unwrap();
        assert_ne!(a, b);
    }

    #[test]
    fn every_key_length_round_trips() {
        // Exercises SoftHSM's zero padding of non-multiple-of-8 KWP inputs.
        let f = with_key("t-lengths");
        for len in 0..=41usize {
            let key: Vec<u8> = (0..len)
                .map(|i| if i + 1 == len { 0 } else { i as u8 + 1 })
                .collect();
            for w in both(f) {
                let blob = w.wrap("t-lengths", b"aad", &key).unwrap();
                let out = w.unwrap("t-lengths", b"aad", &blob).unwrap();
                assert_eq!(out.as_slice(), &key[..], "{:?} len {len}", w.mechanism());
            }
        }
    }

    #[test]
    fn wrong_aad_is_integrity() {
        let f = with_key("t-aad");
        for w in both(f) {
            let blob = w.wrap("t-aad", b"name=a version=1", &[7; 32]).unwrap();
            let err = w.unwrap("t-aad", b"name=a version=2", &blob).unwrap_err();
            assert!(
                matches!(err, HsmError::Integrity),
                "{:?}: {err:?}",
                w.mechanism()
            );
            let err = w.unwrap("t-aad", b"", &blob).unwrap_err();
            assert!(
                matches!(err, HsmError::Integrity),
                "{:?}: {err:?}",
                w.mechanism()
            );
        }
    }

    #[test]
    fn modified_blob_is_integrity() {
        let f = with_key("t-flip");
        for w in both(f) {
            let blob = w.wrap("t-flip", b"aad", &[7; 32]).unwrap();
            for i in 1..blob.len() {
                let mut bad = blob.clone();
                bad[i] ^= 0x01;
                let err = w.unwrap("t-flip", b"aad", &bad).unwrap_err();
                assert!(
                    matches!(err, HsmError::Integrity),
                    "{:?} byte {i}: {err:?}",
                    w.mechanism()
                );
            }
            // Unknown tag, truncation, extension, empty.
            let mut bad = blob.clone();
            bad[0] = 0x03;
            let truncated = &blob[..blob.len() - 1];
            let mut extended = blob.clone();
            extended.extend_from_slice(&[0; 8]);
            for bad in [&bad[..], truncated, &extended[..], &blob[..1], &[][..]] {
                let err = w.unwrap("t-flip", b"aad", bad).unwrap_err();
                assert!(
                    matches!(err, HsmError::Integrity),
                    "{:?}: {err:?}",
                    w.mechanism()
                );
            }
        }
    }

    #[test]
    fn other_master_key_is_integrity() {
        let f = with_key("t-key-a");
        f.gcm.create_master_key("t-key-b").unwrap();
        for w in both(f) {
            let blob = w.wrap("t-key-a", b"aad", &[7; 32]).unwrap();
            let err = w.unwrap("t-key-b", b"aad", &blob).unwrap_err();
            assert!(
                matches!(err, HsmError::Integrity),
                "{:?}: {err:?}",
                w.mechanism()
            );
        }
    }
}
