//! The PKCS#11 master-key wrapper: the process-wide library context, per-token pools of
//! logged-in sessions, master-key lookup and the self-describing wrapped-key formats.
//!
//! Where each concern lives:
//!
//! * `context.rs` — the library, loaded and initialised once per process, and the lock every
//!   call takes;
//! * `session.rs` — a token's fixed pool of sessions and logging in;
//! * `token.rs` — the registry of open tokens, their health and the reconnect;
//! * `objects.rs` — the kinds of key kept on a token, their templates, the handle cache;
//! * `keys.rs` — finding, using and creating those keys by label;
//! * `formats.rs` — the wrapped blob formats (AES-GCM and AES-KWP);
//! * `init_token.rs` — creating a token, for dev mode and tests.
//!
//! Wrapped blobs are self-describing: byte 0 says which format, and unwrap dispatches on it,
//! whatever the configured mechanism (see `formats.rs`).
//!
//! Process-wide state: PKCS#11 may be initialised once per process, and the login state of a
//! token is shared by every session the process has on it (closing the last one logs out). So
//! the library context lives in a `static`, and each token opened is kept, with its session
//! pool, in a process-wide registry for the life of the process (or until [`finalize`]). A
//! second [`Pkcs11Wrapper::open`] of the same token shares that pool; its PIN is checked
//! against the one that opened the token without calling C_Login again.
//!
//! Faults at runtime: a call that fails because the HSM could not serve it marks its token
//! faulted, and the next call reconnects — every session closed, the library finalised and
//! initialised again, every open token's pool reopened and logged in — before it runs (see
//! `reconnect` in `token.rs`). So a server survives its HSM going away and coming back without
//! a restart.
//!
//! Concurrency: wraps, unwraps and MACs run in parallel, one pooled session each. Creating a
//! master or MAC key, opening a token, initialising one and reconnecting exclude every other
//! call of the process for their (short) duration, because SoftHSM 2.6 mishandles token-object
//! creation under concurrency (and a reconnect closes every session).
//!
//! Besides master keys the token holds HMAC keys ([`MacSigner`]): CKK_GENERIC_SECRET, 256 bits,
//! made with CKM_GENERIC_SECRET_KEY_GEN, used with CKM_SHA256_HMAC through C_Sign/C_Verify.

mod context;
mod formats;
mod init_token;
mod keys;
mod objects;
mod session;
#[cfg(test)]
mod testkit;
mod token;

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use cryptoki::error::RvError;
use cryptoki::mechanism::{Mechanism as CkMechanism, MechanismType};
use zeroize::Zeroizing;

use self::context::ops_exclusive;
use self::objects::KeyKind;
use self::token::{check_token_label, Token};
use crate::error::{rv_of, Op};
use crate::{HsmError, KeyWrapper, MacSigner, Mechanism};

/// How many sessions [`Pkcs11Config::new`] asks for.
pub const DEFAULT_SESSIONS: usize = 4;

/// How to reach the HSM: module, token, PIN, wrapping mechanism and session-pool size.
#[derive(Clone)]
pub struct Pkcs11Config {
    /// Path of the PKCS#11 shared library.
    pub module: PathBuf,
    /// Label of the token that holds the master keys (never a slot number).
    pub token_label: String,
    /// User PIN of the token.
    pub pin: Zeroizing<String>,
    /// Mechanism new wraps use.
    pub mechanism: Mechanism,
    /// Size of the session pool (at least 1; values below are raised to 1).
    pub sessions: usize,
}

impl Pkcs11Config {
    /// A configuration with AES-GCM and [`DEFAULT_SESSIONS`] sessions.
    pub fn new(
        module: impl Into<PathBuf>,
        token_label: impl Into<String>,
        pin: Zeroizing<String>,
    ) -> Self {
        Self {
            module: module.into(),
            token_label: token_label.into(),
            pin,
            mechanism: Mechanism::AesGcm,
            sessions: DEFAULT_SESSIONS,
        }
    }
}

impl fmt::Debug for Pkcs11Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pkcs11Config")
            .field("module", &self.module)
            .field("token_label", &self.token_label)
            .field("pin", &"<redacted>")
            .field("mechanism", &self.mechanism)
            .field("sessions", &self.sessions)
            .finish()
    }
}

/// Closes every pooled session and finalises the PKCS#11 library (C_Finalize).
///
/// Call it once at shutdown; it waits for calls in flight to finish. Afterwards every
/// wrapper call, `open` and `init_token` fails with [`HsmError::Unavailable`]: the library
/// cannot be initialised again in this process. Does nothing if the library was never loaded.
pub fn finalize() -> Result<(), HsmError> {
    context::finalize(token::close_all)
}

/// A [`KeyWrapper`] whose master keys live on a PKCS#11 token (SoftHSM or a real HSM).
///
/// Cheap to share: every call borrows a session from the token's pool and blocks until one is
/// free. Async callers run the calls in `spawn_blocking`.
pub struct Pkcs11Wrapper {
    token: Arc<Token>,
    mechanism: Mechanism,
}

impl fmt::Debug for Pkcs11Wrapper {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pkcs11Wrapper")
            .field("token", &self.token.label)
            .field("mechanism", &self.mechanism)
            .finish()
    }
}

impl Pkcs11Wrapper {
    /// Opens the token `cfg.token_label` (loading and initialising the module on first use) and
    /// logs in; a second open of the same token in this process shares its session pool (its
    /// `sessions` setting is then ignored) after checking its PIN against the first one.
    pub fn open(cfg: Pkcs11Config) -> Result<Self, HsmError> {
        check_token_label(&cfg.token_label)?;
        let ctx = context::context(&cfg.module)?;
        // Opening a token and checking its mechanisms exclude every other PKCS#11 call.
        let _ops = ops_exclusive();
        let token = token::open(ctx, &cfg.token_label, &cfg.pin, cfg.sessions.max(1))?;
        let wrapper = Self {
            token,
            mechanism: cfg.mechanism,
        };
        wrapper.check_mechanism()?;
        Ok(wrapper)
    }

    /// Creates and initialises a new token labelled `label` on a free slot, with an SO PIN and
    /// a User PIN, entirely through PKCS#11 (no PIN on a command line).
    ///
    /// Fails with [`HsmError::Config`] if a token with that label already exists or no slot is
    /// free. Loads and initialises the module like [`Pkcs11Wrapper::open`].
    pub fn init_token(
        module: &Path,
        label: &str,
        so_pin: &str,
        user_pin: &str,
    ) -> Result<(), HsmError> {
        init_token::init_token(module, label, so_pin, user_pin)
    }

    /// Fails with [`HsmError::Unsupported`] if the token lacks the configured mechanism.
    fn check_mechanism(&self) -> Result<(), HsmError> {
        let wanted = match self.mechanism {
            Mechanism::AesGcm => MechanismType::AES_GCM,
            Mechanism::AesKeyWrapPad => MechanismType::AES_KEY_WRAP_PAD,
        };
        if self.token.offers(wanted)? {
            Ok(())
        } else {
            Err(HsmError::Unsupported(format!(
                "token {:?} does not offer {wanted}",
                self.token.label
            )))
        }
    }
}

impl KeyWrapper for Pkcs11Wrapper {
    fn wrap(&self, label: &str, aad: &[u8], key: &[u8]) -> Result<Vec<u8>, HsmError> {
        formats::wrap(&self.token, self.mechanism, label, aad, key)
    }

    fn unwrap(
        &self,
        label: &str,
        aad: &[u8],
        wrapped: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, HsmError> {
        formats::unwrap(&self.token, label, aad, wrapped)
    }

    fn has_master_key(&self, label: &str) -> Result<bool, HsmError> {
        keys::exists(&self.token, KeyKind::Master, label)
    }

    fn create_master_key(&self, label: &str) -> Result<(), HsmError> {
        keys::create(&self.token, KeyKind::Master, label)
    }

    fn mechanism(&self) -> Mechanism {
        self.mechanism
    }
}

impl MacSigner for Pkcs11Wrapper {
    fn has_mac_key(&self, label: &str) -> Result<bool, HsmError> {
        keys::exists(&self.token, KeyKind::Mac, label)
    }

    fn create_mac_key(&self, label: &str) -> Result<(), HsmError> {
        keys::create(&self.token, KeyKind::Mac, label)
    }

    fn mac(&self, label: &str, data: &[u8]) -> Result<Vec<u8>, HsmError> {
        keys::with_key(&self.token, KeyKind::Mac, label, Op::General, |s, h| {
            s.sign(&CkMechanism::Sha256Hmac, h, data)
        })
    }

    fn verify_mac(&self, label: &str, data: &[u8], tag: &[u8]) -> Result<bool, HsmError> {
        keys::with_key(
            &self.token,
            KeyKind::Mac,
            label,
            Op::General,
            |s, h| match s.verify(&CkMechanism::Sha256Hmac, h, data, tag) {
                Ok(()) => Ok(true),
                Err(e)
                    if matches!(
                        rv_of(&e),
                        Some(RvError::SignatureInvalid | RvError::SignatureLenRange)
                    ) =>
                {
                    Ok(false)
                }
                Err(e) => Err(e),
            },
        )
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::testkit::cfg;
    use super::*;

    #[test]
    fn config_debug_hides_pin() {
        let c = cfg(Path::new("/m.so"), "tok", "hunter2-pin", Mechanism::AesGcm);
        let s = format!("{c:?}");
        assert!(!s.contains("hunter2"), "{s}");
        assert!(s.contains("<redacted>"));
    }
}
