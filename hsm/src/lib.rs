//! Ward's key-encryption boundary: the master key lives in a PKCS#11 HSM and never leaves it.
//! Nothing else in the workspace names a PKCS#11 type; the server sees only [`KeyWrapper`].
#![deny(missing_docs)]

mod error;
#[cfg(feature = "insecure-memory")]
pub mod memory;
pub mod pkcs11;
pub mod softhsm;

pub use error::HsmError;
pub use pkcs11::{Pkcs11Config, Pkcs11Wrapper};

use zeroize::Zeroizing;

/// How the master key wraps key material.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Mechanism {
    /// CKM_AES_GCM through C_Encrypt/C_Decrypt: caller-chosen random 96-bit IV, AAD enforced
    /// by the HSM. Fastest on SoftHSM.
    AesGcm,
    /// CKM_AES_KEY_WRAP_PAD (RFC 5649) through C_WrapKey/C_UnwrapKey, for HSMs that refuse a
    /// caller-supplied GCM IV. RFC 5649 has no AAD, so the AAD's SHA-256 is wrapped with the
    /// key and checked on unwrap.
    AesKeyWrapPad,
}

impl std::str::FromStr for Mechanism {
    type Err = HsmError;
    fn from_str(s: &str) -> Result<Self, HsmError> {
        match s {
            "aes-gcm" => Ok(Self::AesGcm),
            "aes-key-wrap-pad" => Ok(Self::AesKeyWrapPad),
            other => Err(HsmError::Config(format!(
                "unknown mechanism {other:?} (expected aes-gcm or aes-key-wrap-pad)"
            ))),
        }
    }
}

/// Wraps and unwraps key material under a master key that stays inside the HSM.
///
/// Calls block (they talk to the device): async callers run them in `spawn_blocking`. The
/// server calls these at unseal and at keyring or master-key rotation only, never on the fetch
/// or verify path.
pub trait KeyWrapper: Send + Sync + 'static {
    /// Wraps `key` under the master key `label`, bound to `aad`. The output is
    /// self-describing (it records the mechanism) and safe to store.
    fn wrap(&self, label: &str, aad: &[u8], key: &[u8]) -> Result<Vec<u8>, HsmError>;

    /// Unwraps what [`KeyWrapper::wrap`] produced with the same `label` and `aad`. A
    /// different AAD, a different key or a modified blob fails with [`HsmError::Integrity`].
    fn unwrap(
        &self,
        label: &str,
        aad: &[u8],
        wrapped: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, HsmError>;

    /// Whether a master key with this label exists on the token.
    fn has_master_key(&self, label: &str) -> Result<bool, HsmError>;

    /// Creates a new AES-256 master key: token object, sensitive, never extractable. Fails with
    /// [`HsmError::MasterKeyExists`] if the label is taken.
    fn create_master_key(&self, label: &str) -> Result<(), HsmError>;

    /// The mechanism new wraps use.
    fn mechanism(&self) -> Mechanism;
}

/// Authenticates data with HMAC-SHA256 (CKM_SHA256_HMAC) under secret keys that stay inside the
/// HSM: whoever can read and write the server's database but not use the HSM cannot produce a
/// tag that verifies. The audit log signs its checkpoints with it.
///
/// Calls block, like [`KeyWrapper`]'s; the server makes them from a background task (signing)
/// and from VerifyAuditLog (checking), never on the fetch path.
pub trait MacSigner: Send + Sync + 'static {
    /// Whether a MAC key with this label exists on the token.
    fn has_mac_key(&self, label: &str) -> Result<bool, HsmError>;

    /// Creates a 256-bit HMAC key: token object, sensitive, never extractable, usable only to
    /// sign and verify. Fails with [`HsmError::MacKeyExists`] if the label is taken.
    fn create_mac_key(&self, label: &str) -> Result<(), HsmError>;

    /// The HMAC-SHA256 tag (32 bytes) of `data` under the key `label`
    /// ([`HsmError::MacKeyMissing`] if there is none).
    fn mac(&self, label: &str, data: &[u8]) -> Result<Vec<u8>, HsmError>;

    /// Whether `tag` is the HMAC-SHA256 of `data` under the key `label` (checked by the HSM, in
    /// constant time). A wrong tag is `Ok(false)`, not an error.
    fn verify_mac(&self, label: &str, data: &[u8], tag: &[u8]) -> Result<bool, HsmError>;
}

/// Everything the server needs from its HSM: wrapping key material and signing audit
/// checkpoints.
pub trait Hsm: KeyWrapper + MacSigner {}

impl<T: KeyWrapper + MacSigner> Hsm for T {}
