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
