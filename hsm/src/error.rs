//! The crate's one error type, and the one place where PKCS#11 return codes become it.

use cryptoki::context::Function;
use cryptoki::error::{Error as CkError, RvError};

/// Everything that can go wrong at the key-encryption boundary. Messages never carry key
/// material or a PIN; raw PKCS#11 detail goes to the log at `debug`/`warn`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HsmError {
    /// The configuration is unusable (bad path, conflicting module, bad value).
    #[error("HSM configuration: {0}")]
    Config(String),
    /// The PKCS#11 shared library could not be loaded.
    #[error("cannot load PKCS#11 module {path}: {detail}")]
    ModuleLoad {
        /// Path of the module that failed to load.
        path: String,
        /// What the loader said.
        detail: String,
    },
    /// No initialised token carries this label.
    #[error("no token labelled {label:?} (create it first)")]
    TokenNotFound {
        /// The token label that was looked for.
        label: String,
    },
    /// The PIN was rejected by the token.
    #[error("the PIN does not open token {label:?}")]
    BadPin {
        /// Label of the token that refused the PIN.
        label: String,
    },
    /// No master key with this label exists on the token.
    #[error("master key {label:?} not found on the token")]
    MasterKeyMissing {
        /// The master-key label that was looked for.
        label: String,
    },
    /// A master key with this label already exists.
    #[error("master key {label:?} already exists")]
    MasterKeyExists {
        /// The master-key label that is taken.
        label: String,
    },
    /// No audit MAC key with this label exists on the token.
    #[error("MAC key {label:?} not found on the token")]
    MacKeyMissing {
        /// The MAC-key label that was looked for.
        label: String,
    },
    /// A MAC key with this label already exists.
    #[error("MAC key {label:?} already exists")]
    MacKeyExists {
        /// The MAC-key label that is taken.
        label: String,
    },
    /// Authentication of a wrapped key failed (wrong key, wrong AAD, or modified blob).
    #[error("integrity check failed: wrapped key does not match its master key or context")]
    Integrity,
    /// The HSM could not serve the request (device, session or library failure).
    #[error("HSM unavailable: {0}")]
    Unavailable(String),
    /// The HSM does not support a mechanism or function this crate needs.
    #[error("not supported by this HSM: {0}")]
    Unsupported(String),
}

/// What kind of operation produced a PKCS#11 error; decides how ambiguous codes are read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Op {
    /// Anything that is not a decryption or unwrap of caller-supplied data.
    General,
    /// C_Decrypt / C_UnwrapKey on a stored blob: failures of the data mean integrity loss.
    Unwrap,
}

/// The `CKR_…` name of a return code (`PinIncorrect` → `CKR_PIN_INCORRECT`).
pub(crate) fn ckr_name(rv: RvError) -> String {
    match rv {
        RvError::VendorDefined(code) => format!("CKR_VENDOR_DEFINED({code:#x})"),
        RvError::UnknownErrorCode(code) => format!("CKR_UNKNOWN({code:#x})"),
        other => {
            let camel = format!("{other:?}");
            let mut out = String::with_capacity(camel.len() + 12);
            out.push_str("CKR");
            for c in camel.chars() {
                if c.is_ascii_uppercase() {
                    out.push('_');
                }
                out.push(c.to_ascii_uppercase());
            }
            out
        }
    }
}

/// The return code inside a cryptoki error, if it is a PKCS#11 return code at all.
pub(crate) fn rv_of(err: &CkError) -> Option<RvError> {
    match err {
        CkError::Pkcs11(rv, _) => Some(*rv),
        _ => None,
    }
}

/// Translates a cryptoki error from an operation on token `token` into an [`HsmError`],
/// logging the raw detail. This is the only place PKCS#11 codes are interpreted.
pub(crate) fn map_err(err: CkError, token: &str, op: Op) -> HsmError {
    match err {
        CkError::Pkcs11(rv, func) => {
            let name = ckr_name(rv);
            let where_ = format!("{name} from C_{func:?}");
            match rv {
                RvError::PinIncorrect | RvError::PinLenRange | RvError::PinInvalid => {
                    tracing::debug!(token, code = %name, function = ?func, "PIN rejected");
                    HsmError::BadPin {
                        label: token.to_owned(),
                    }
                }
                RvError::GeneralError
                | RvError::EncryptedDataInvalid
                | RvError::EncryptedDataLenRange
                | RvError::WrappedKeyInvalid
                | RvError::WrappedKeyLenRange
                    if op == Op::Unwrap && reads_the_blob(func) =>
                {
                    tracing::debug!(token, code = %name, function = ?func, "unwrap rejected the blob");
                    HsmError::Integrity
                }
                RvError::MechanismInvalid | RvError::MechanismParamInvalid => {
                    tracing::warn!(token, code = %name, function = ?func, "mechanism refused");
                    HsmError::Unsupported(where_)
                }
                _ => {
                    tracing::warn!(token, code = %name, function = ?func, detail = %rv, "PKCS#11 call failed");
                    HsmError::Unavailable(where_)
                }
            }
        }
        CkError::NotSupported => {
            tracing::warn!(token, "cryptoki does not support the operation");
            HsmError::Unsupported("operation not supported by the cryptoki wrapper".into())
        }
        CkError::NullFunctionPointer => {
            tracing::warn!(token, "PKCS#11 module lacks a function");
            HsmError::Unsupported("the module does not implement a required function".into())
        }
        CkError::MissingSymbol(sym) => {
            tracing::warn!(token, symbol = sym, "PKCS#11 module lacks a symbol");
            HsmError::Unsupported(format!("the module lacks {sym}"))
        }
        CkError::LibraryLoading(e) => {
            tracing::warn!(token, error = %e, "PKCS#11 library error");
            HsmError::Unavailable(format!("library error: {e}"))
        }
        other => {
            tracing::warn!(token, error = %other, "cryptoki error");
            HsmError::Unavailable(format!("cryptoki: {other}"))
        }
    }
}

/// Whether `func` is the step of a decryption or unwrap that reads the stored blob, the one
/// whose failure speaks about the data. A failure to start the operation (C_DecryptInit: the
/// key handle, the session) is the HSM's, and must not read as a damaged blob.
fn reads_the_blob(func: Function) -> bool {
    matches!(
        func,
        Function::Decrypt | Function::DecryptUpdate | Function::DecryptFinal | Function::UnwrapKey
    )
}

/// Translates a failure to load or initialise the module at `path`.
pub(crate) fn module_load(path: &std::path::Path, err: CkError) -> HsmError {
    let detail = match &err {
        CkError::Pkcs11(rv, func) => format!("{} from C_{func:?}", ckr_name(*rv)),
        other => other.to_string(),
    };
    tracing::warn!(path = %path.display(), error = %err, "cannot load PKCS#11 module");
    HsmError::ModuleLoad {
        path: path.display().to_string(),
        detail,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn ckr_names() {
        assert_eq!(ckr_name(RvError::PinIncorrect), "CKR_PIN_INCORRECT");
        assert_eq!(ckr_name(RvError::GeneralError), "CKR_GENERAL_ERROR");
        assert_eq!(
            ckr_name(RvError::SessionHandleInvalid),
            "CKR_SESSION_HANDLE_INVALID"
        );
    }

    #[test]
    fn mapping() {
        let e = |rv| CkError::Pkcs11(rv, Function::Decrypt);
        assert!(matches!(
            map_err(e(RvError::PinIncorrect), "t", Op::General),
            HsmError::BadPin { .. }
        ));
        assert!(matches!(
            map_err(e(RvError::GeneralError), "t", Op::Unwrap),
            HsmError::Integrity
        ));
        assert!(matches!(
            map_err(e(RvError::WrappedKeyInvalid), "t", Op::Unwrap),
            HsmError::Integrity
        ));
        match map_err(e(RvError::GeneralError), "t", Op::General) {
            HsmError::Unavailable(m) => assert!(m.contains("CKR_GENERAL_ERROR"), "{m}"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            map_err(e(RvError::MechanismInvalid), "t", Op::General),
            HsmError::Unsupported(_)
        ));
        match map_err(e(RvError::DeviceRemoved), "t", Op::Unwrap) {
            HsmError::Unavailable(m) => assert!(m.contains("CKR_DEVICE_REMOVED"), "{m}"),
            other => panic!("{other:?}"),
        }
        // A general error while starting a decryption is the HSM failing, not a bad blob.
        match map_err(
            CkError::Pkcs11(RvError::GeneralError, Function::DecryptInit),
            "t",
            Op::Unwrap,
        ) {
            HsmError::Unavailable(m) => assert!(m.contains("C_DecryptInit"), "{m}"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            map_err(
                CkError::Pkcs11(RvError::WrappedKeyInvalid, Function::UnwrapKey),
                "t",
                Op::Unwrap
            ),
            HsmError::Integrity
        ));
    }
}
