//! Keys on an open token, by label: finding one (through the handle cache, telling "absent"
//! from "lost"), running an operation with one, and creating one.

use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::Mechanism as CkMechanism;
use cryptoki::object::{Attribute, AttributeType, ObjectHandle};
use cryptoki::session::Session;

use super::objects::KeyKind;
use super::session::Pooled;
use super::token::Token;
use crate::error::{rv_of, Op};
use crate::HsmError;

/// Checks a master-key label.
fn check_key_label(label: &str) -> Result<(), HsmError> {
    if label.is_empty() {
        return Err(HsmError::Config("master-key label is empty".into()));
    }
    Ok(())
}

/// Whether a key of `kind` labelled `label` exists on the token.
pub(super) fn exists(token: &Token, kind: KeyKind, label: &str) -> Result<bool, HsmError> {
    check_key_label(label)?;
    token.call(true, || {
        let mut s = token.acquire()?;
        Ok(find(token, &mut s, kind, label, false)?.is_some())
    })
}

/// Finds the key of `kind` labelled `label`, from the cache or the token. `Ok(None)` if
/// absent.
pub(super) fn find(
    token: &Token,
    s: &mut Pooled<'_>,
    kind: KeyKind,
    label: &str,
    use_cache: bool,
) -> Result<Option<ObjectHandle>, HsmError> {
    if use_cache {
        if let Some(h) = token.keys.cached(kind, label) {
            return Ok(Some(h));
        }
    }
    let query = kind.query(label);
    let mut found = match s.session()?.find_objects(&query) {
        Ok(f) => f,
        Err(e) => return Err(s.fail(e, Op::General)),
    };
    if found.is_empty() {
        // Private objects are invisible when logged out: make sure "absent" means absent.
        token.ensure_logged_in(s.session()?)?;
        found = match s.session()?.find_objects(&query) {
            Ok(f) => f,
            Err(e) => return Err(s.fail(e, Op::General)),
        };
    }
    match found.as_slice() {
        [] => {
            token.keys.forget(kind, label);
            confirm_absent(token, s, kind, label)?;
            Ok(None)
        }
        [h] => {
            token.keys.remember(kind, label, *h);
            Ok(Some(*h))
        }
        _ => Err(HsmError::Config(format!(
            "more than one {} is labelled {label:?}",
            kind.noun()
        ))),
    }
}

/// Decides whether an empty C_FindObjects means the key is absent or the token is failing.
/// SoftHSM 2.6 answers a search with an empty list (not an error) once its token files are
/// gone, so "absent" is believed only if the key was never seen here, the token still
/// answers C_GetTokenInfo, and every key seen so far is still found. Otherwise the HSM is
/// unavailable, which matters: a missing audit key would read as a forged checkpoint.
fn confirm_absent(
    token: &Token,
    s: &Pooled<'_>,
    kind: KeyKind,
    label: &str,
) -> Result<(), HsmError> {
    let lost = |kind: KeyKind, label: &str| {
        HsmError::Unavailable(format!(
            "{} {label:?}, found earlier, is no longer visible on token {:?} (the HSM \
             is unreachable or lost its storage)",
            kind.noun(),
            token.label
        ))
    };
    if token.keys.has_seen(kind, label) {
        return Err(lost(kind, label));
    }
    let session = s.session()?;
    let slot = session
        .get_session_info()
        .map_err(|e| s.fail(e, Op::General))?
        .slot_id();
    token
        .pkcs11
        .get_token_info(slot)
        .map_err(|e| s.fail(e, Op::General))?;
    for (k, l) in token.keys.seen() {
        let found = session
            .find_objects(&k.query(&l))
            .map_err(|e| s.fail(e, Op::General))?;
        if found.is_empty() {
            return Err(lost(k, &l));
        }
    }
    Ok(())
}

/// Runs `f` with a pooled session and the handle of the key of `kind` labelled `label`,
/// refreshing a stale cached handle once, and reconnecting once if the HSM failed.
pub(super) fn with_key<T>(
    token: &Token,
    kind: KeyKind,
    label: &str,
    op: Op,
    mut f: impl FnMut(&Session, ObjectHandle) -> Result<T, CkError>,
) -> Result<T, HsmError> {
    check_key_label(label)?;
    token.call(true, || {
        let mut s = token.acquire()?;
        let from_cache = token.keys.cached(kind, label).is_some();
        let handle = find(token, &mut s, kind, label, true)?.ok_or_else(|| kind.missing(label))?;
        match f(s.session()?, handle) {
            Ok(v) => Ok(v),
            Err(e)
                if from_cache
                    && matches!(
                        rv_of(&e),
                        Some(RvError::KeyHandleInvalid | RvError::ObjectHandleInvalid)
                    ) =>
            {
                tracing::debug!(token = %token.label, key = label, "stale key handle; looking it up again");
                token.keys.forget(kind, label);
                let handle =
                    find(token, &mut s, kind, label, false)?.ok_or_else(|| kind.missing(label))?;
                let r = f(s.session()?, handle);
                r.map_err(|e| s.fail(e, op))
            }
            Err(e) => Err(s.fail(e, op)),
        }
    })
}

/// Generates a token key of `kind` labelled `label`, with every other PKCS#11 call of the
/// process excluded (see [`OPS`](super::context::OPS)), and reads its attributes back. Not
/// retried after a fault: the key may have been made before the failure.
pub(super) fn create(token: &Token, kind: KeyKind, label: &str) -> Result<(), HsmError> {
    check_key_label(label)?;
    token.call(false, || create_once(token, kind, label))
}

fn create_once(token: &Token, kind: KeyKind, label: &str) -> Result<(), HsmError> {
    let mut s = token.acquire_exclusive()?;
    if find(token, &mut s, kind, label, false)?.is_some() {
        return Err(kind.exists(label));
    }
    let mechanism = match kind {
        KeyKind::Master => CkMechanism::AesKeyGen,
        KeyKind::Mac => CkMechanism::GenericSecretKeyGen,
    };
    let generated = s.session()?.generate_key(&mechanism, &kind.template(label));
    let handle = generated.map_err(|e| s.fail(e, Op::General))?;
    // Read the policy back: a key that is not sensitive and non-extractable (or cannot do
    // its job) must not be used, whatever the token did with the template.
    let wanted = kind.template(label);
    let types: Vec<AttributeType> = wanted.iter().map(Attribute::attribute_type).collect();
    let stored = s.session()?.get_attributes(handle, &types);
    let stored = match stored {
        Ok(a) => a,
        Err(e) => return Err(s.fail(e, Op::General)),
    };
    let noun = kind.noun();
    if let Some(bad) = wanted.iter().find(|w| !stored.contains(w)) {
        tracing::warn!(token = %token.label, key = label, attribute = ?bad.attribute_type(), "new {noun} lacks a required attribute; destroying it");
        if let Err(e) = s.session()?.destroy_object(handle) {
            tracing::warn!(token = %token.label, key = label, error = %e, "cannot destroy the faulty {noun}");
        }
        return Err(HsmError::Unavailable(format!(
            "the token stored {noun} {label:?} without {:?}; it was destroyed, try again",
            bad.attribute_type()
        )));
    }
    token.keys.remember(kind, label, handle);
    tracing::info!(token = %token.label, key = label, "{noun} created");
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::pkcs11::objects::master_key_template;
    use crate::pkcs11::testkit::{both, fixture, with_key};
    use crate::{KeyWrapper, MacSigner};
    use cryptoki::object::AttributeInfo;

    #[test]
    fn unknown_label_is_missing() {
        let f = fixture();
        for w in both(f) {
            assert!(!w.has_master_key("t-nope").unwrap());
            let err = w.wrap("t-nope", b"aad", &[1; 32]).unwrap_err();
            assert!(matches!(err, HsmError::MasterKeyMissing { ref label } if label == "t-nope"));
            let blob = [&[0x01][..], &[0u8; 60][..]].concat();
            let err = w.unwrap("t-nope", b"aad", &blob).unwrap_err();
            assert!(matches!(err, HsmError::MasterKeyMissing { .. }), "{err:?}");
        }
    }

    #[test]
    fn creating_twice_is_exists() {
        let f = with_key("t-twice");
        assert!(f.kwp.has_master_key("t-twice").unwrap());
        let err = f.kwp.create_master_key("t-twice").unwrap_err();
        assert!(matches!(err, HsmError::MasterKeyExists { ref label } if label == "t-twice"));
        assert_eq!(err.to_string(), "master key \"t-twice\" already exists");
    }

    #[test]
    fn master_key_is_sensitive_and_not_extractable() {
        let f = with_key("t-attrs");
        let mut s = f.gcm.token.acquire().unwrap();
        let h = find(&f.gcm.token, &mut s, KeyKind::Master, "t-attrs", false)
            .unwrap()
            .unwrap();
        let session = s.session().unwrap();
        let attrs = session
            .get_attributes(
                h,
                &[
                    AttributeType::Sensitive,
                    AttributeType::Extractable,
                    AttributeType::AlwaysSensitive,
                    AttributeType::NeverExtractable,
                    AttributeType::Token,
                    AttributeType::Private,
                    AttributeType::ValueLen,
                    AttributeType::Value,
                ],
            )
            .unwrap();
        let has = |a: &Attribute| attrs.iter().any(|b| b == a);
        assert!(has(&Attribute::Sensitive(true)), "{attrs:?}");
        assert!(has(&Attribute::Extractable(false)), "{attrs:?}");
        assert!(has(&Attribute::AlwaysSensitive(true)), "{attrs:?}");
        assert!(has(&Attribute::NeverExtractable(true)), "{attrs:?}");
        assert!(has(&Attribute::Token(true)), "{attrs:?}");
        assert!(has(&Attribute::Private(true)), "{attrs:?}");
        assert!(has(&Attribute::ValueLen(32.into())), "{attrs:?}");
        assert!(
            !attrs.iter().any(|a| matches!(a, Attribute::Value(_))),
            "CKA_VALUE was returned"
        );
        let info = session
            .get_attribute_info(h, &[AttributeType::Value])
            .unwrap();
        assert!(matches!(info[..], [AttributeInfo::Sensitive]), "{info:?}");
        // The key cannot be made extractable or wrapped out either.
        assert!(session
            .update_attributes(h, &[Attribute::Extractable(true)])
            .is_err());
        assert!(session.wrap_key(&CkMechanism::AesKeyWrapPad, h, h).is_err());
    }

    #[test]
    fn stale_handle_is_refreshed() {
        let f = with_key("t-stale");
        let old_blob = f.gcm.wrap("t-stale", b"aad", &[5; 32]).unwrap();
        // Replace the key behind the wrapper's back: the cached handle goes stale. Keep every
        // other call out meanwhile, as create_master_key does (see OPS).
        {
            let mut s = f.gcm.token.acquire_exclusive().unwrap();
            let h = find(&f.gcm.token, &mut s, KeyKind::Master, "t-stale", false)
                .unwrap()
                .unwrap();
            let session = s.session().unwrap();
            session.destroy_object(h).unwrap();
            session
                .generate_key(&CkMechanism::AesKeyGen, &master_key_template("t-stale"))
                .unwrap();
        }
        for w in both(f) {
            let blob = w.wrap("t-stale", b"aad", &[6; 32]).unwrap();
            assert_eq!(
                w.unwrap("t-stale", b"aad", &blob).unwrap().as_slice(),
                &[6; 32]
            );
            let err = w.unwrap("t-stale", b"aad", &old_blob).unwrap_err();
            assert!(matches!(err, HsmError::Integrity), "{err:?}");
        }
    }

    #[test]
    fn mac_keys_sign_and_verify_inside_the_token() {
        let f = fixture();
        assert!(!f.gcm.has_mac_key("t-mac").unwrap());
        let err = f.gcm.mac("t-mac", b"data").unwrap_err();
        assert!(matches!(err, HsmError::MacKeyMissing { ref label } if label == "t-mac"));
        f.gcm.create_mac_key("t-mac").unwrap();
        assert!(f.kwp.has_mac_key("t-mac").unwrap());
        let err = f.kwp.create_mac_key("t-mac").unwrap_err();
        assert!(matches!(err, HsmError::MacKeyExists { .. }), "{err:?}");
        // A master key of the same label is a different object.
        assert!(!f.gcm.has_master_key("t-mac").unwrap());

        let tag = f.gcm.mac("t-mac", b"checkpoint 7").unwrap();
        assert_eq!(tag.len(), 32);
        assert_eq!(
            f.kwp.mac("t-mac", b"checkpoint 7").unwrap(),
            tag,
            "HMAC is deterministic"
        );
        assert!(f.gcm.verify_mac("t-mac", b"checkpoint 7", &tag).unwrap());
        assert!(!f.gcm.verify_mac("t-mac", b"checkpoint 8", &tag).unwrap());
        let mut bad = tag.clone();
        bad[0] ^= 1;
        assert!(!f.gcm.verify_mac("t-mac", b"checkpoint 7", &bad).unwrap());
        assert!(!f
            .gcm
            .verify_mac("t-mac", b"checkpoint 7", &tag[..16])
            .unwrap());
        // Another key gives another tag.
        f.gcm.create_mac_key("t-mac-2").unwrap();
        assert!(!f.gcm.verify_mac("t-mac-2", b"checkpoint 7", &tag).unwrap());

        // The key never leaves the token.
        let mut s = f.gcm.token.acquire().unwrap();
        let h = find(&f.gcm.token, &mut s, KeyKind::Mac, "t-mac", false)
            .unwrap()
            .unwrap();
        let session = s.session().unwrap();
        let attrs = session
            .get_attributes(
                h,
                &[
                    AttributeType::Sensitive,
                    AttributeType::Extractable,
                    AttributeType::NeverExtractable,
                    AttributeType::Token,
                    AttributeType::Value,
                ],
            )
            .unwrap();
        let has = |a: &Attribute| attrs.iter().any(|b| b == a);
        assert!(has(&Attribute::Sensitive(true)), "{attrs:?}");
        assert!(has(&Attribute::Extractable(false)), "{attrs:?}");
        assert!(has(&Attribute::NeverExtractable(true)), "{attrs:?}");
        assert!(has(&Attribute::Token(true)), "{attrs:?}");
        assert!(!attrs.iter().any(|a| matches!(a, Attribute::Value(_))));
    }
}
