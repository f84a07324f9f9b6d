//! The server's one error type, and the one decision of which status each error carries.
//!
//! Messages are shown to the caller: they describe what was wrong with the input and never
//! carry a secret value, a data key, an API key or a PIN. Details go to the log.

use std::fmt;

/// A status code, numbered as gRPC numbers them. The domain decides the code here; the wire
/// layer (`grpc/status.rs`) only converts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(i32)]
#[non_exhaustive]
pub enum Code {
    /// Success.
    Ok = 0,
    /// Bad name, empty or oversized value, bad field.
    InvalidArgument = 3,
    /// No such secret or version.
    NotFound = 5,
    /// The name, or the request id, is taken.
    AlreadyExists = 6,
    /// The caller's identity is not allowed to do this.
    PermissionDenied = 7,
    /// Rate limit, quota or size limit.
    ResourceExhausted = 8,
    /// The version's state forbids the call (revoked, inactive, expired, wrong kind).
    FailedPrecondition = 9,
    /// Compare-and-set conflict.
    Aborted = 10,
    /// A position past the end (e.g. an audit resume point beyond the last record).
    OutOfRange = 11,
    /// A bug.
    Internal = 13,
    /// HSM, storage or audit log unavailable: the call failed closed.
    Unavailable = 14,
    /// An integrity check failed.
    DataLoss = 15,
    /// No verified identity.
    Unauthenticated = 16,
}

impl Code {
    /// The gRPC code number.
    pub fn as_i32(self) -> i32 {
        self as i32
    }

    /// The gRPC name of the code, as audit records and logs show it.
    pub fn name(self) -> &'static str {
        ward::status::code_name(self.as_i32())
    }
}

impl fmt::Display for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Everything that can go wrong in a call.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The input is malformed; the message says which field and why.
    #[error("{0}")]
    InvalidArgument(String),
    /// The named thing does not exist.
    #[error("{0} not found")]
    NotFound(String),
    /// The name or request id is taken.
    #[error("{0}")]
    AlreadyExists(String),
    /// Compare-and-set failed.
    #[error("{0}")]
    Conflict(String),
    /// The target's state or kind forbids the call.
    #[error("{0}")]
    FailedPrecondition(String),
    /// The policy does not grant this identity the verb on the target.
    #[error("{identity} may not {verb} {target}")]
    PermissionDenied {
        /// Caller identity.
        identity: String,
        /// Verb that was needed.
        verb: &'static str,
        /// Secret name (or `*` for call-level checks).
        target: String,
    },
    /// No verified client identity.
    #[error("{0}")]
    Unauthenticated(String),
    /// A size or usage limit was hit.
    #[error("{0}")]
    ResourceExhausted(String),
    /// A position past the end of what exists.
    #[error("{0}")]
    OutOfRange(String),
    /// HSM, storage or audit log unavailable.
    #[error("{0}")]
    Unavailable(String),
    /// Stored data failed an integrity check.
    #[error("{0}")]
    DataLoss(String),
    /// A bug; details are in the log.
    #[error("internal error")]
    Internal(String),
}

impl Error {
    /// The status code this error carries on the wire and in the audit log.
    pub fn code(&self) -> Code {
        match self {
            Self::InvalidArgument(_) => Code::InvalidArgument,
            Self::NotFound(_) => Code::NotFound,
            Self::AlreadyExists(_) => Code::AlreadyExists,
            Self::Conflict(_) => Code::Aborted,
            Self::FailedPrecondition(_) => Code::FailedPrecondition,
            Self::PermissionDenied { .. } => Code::PermissionDenied,
            Self::Unauthenticated(_) => Code::Unauthenticated,
            Self::ResourceExhausted(_) => Code::ResourceExhausted,
            Self::OutOfRange(_) => Code::OutOfRange,
            Self::Unavailable(_) => Code::Unavailable,
            Self::DataLoss(_) => Code::DataLoss,
            Self::Internal(_) => Code::Internal,
        }
    }

    /// Shorthand for an invalid-argument error.
    pub fn invalid(msg: impl Into<String>) -> Self {
        Self::InvalidArgument(msg.into())
    }
}

impl From<ward_hsm::HsmError> for Error {
    fn from(e: ward_hsm::HsmError) -> Self {
        use ward_hsm::HsmError as H;
        match e {
            H::Integrity => Error::DataLoss(e.to_string()),
            // Already reads "HSM unavailable: …".
            H::Unavailable(_) => {
                tracing::warn!(error = %e, "HSM call failed");
                Error::Unavailable(e.to_string())
            }
            other => {
                tracing::warn!(error = %other, "HSM call failed");
                Error::Unavailable(format!("HSM unavailable: {other}"))
            }
        }
    }
}

/// Result with the server's error.
pub type Result<T, E = Error> = std::result::Result<T, E>;
