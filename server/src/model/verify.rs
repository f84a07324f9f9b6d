//! The outcome of a verification: a value the key directory produces and the metrics and
//! wire layers count and convert.

/// The outcome of a verification.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum VerifyResult {
    /// Every check passed.
    Valid,
    /// Not a well-formed key.
    Malformed,
    /// Unknown key, or one the caller may not verify.
    NotFound,
    /// Version REVOKED or DESTROYED.
    Revoked,
    /// Past the key's expiry.
    Expired,
    /// Version INACTIVE.
    Disabled,
    /// Another environment than the verifier's.
    WrongEnvironment,
    /// Client IP outside the allowed ranges.
    ForbiddenIp,
    /// A required scope is missing.
    InsufficientScope,
    /// Over the rate limit.
    RateLimited,
    /// Quota used up.
    QuotaExceeded,
}

impl VerifyResult {
    /// Every result, in wire order.
    pub const ALL: [VerifyResult; 11] = [
        Self::Valid,
        Self::Malformed,
        Self::NotFound,
        Self::Revoked,
        Self::Expired,
        Self::Disabled,
        Self::WrongEnvironment,
        Self::ForbiddenIp,
        Self::InsufficientScope,
        Self::RateLimited,
        Self::QuotaExceeded,
    ];

    /// The wire number (`ward.v1.VerifyResult`).
    pub fn number(self) -> usize {
        match self {
            Self::Valid => 1,
            Self::Malformed => 2,
            Self::NotFound => 3,
            Self::Revoked => 4,
            Self::Expired => 5,
            Self::Disabled => 6,
            Self::WrongEnvironment => 7,
            Self::ForbiddenIp => 8,
            Self::InsufficientScope => 9,
            Self::RateLimited => 10,
            Self::QuotaExceeded => 11,
        }
    }

    /// The result with this wire number.
    pub fn from_number(n: usize) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.number() == n)
    }

    /// The name users see, e.g. `QUOTA_EXCEEDED`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Valid => "VALID",
            Self::Malformed => "MALFORMED",
            Self::NotFound => "NOT_FOUND",
            Self::Revoked => "REVOKED",
            Self::Expired => "EXPIRED",
            Self::Disabled => "DISABLED",
            Self::WrongEnvironment => "WRONG_ENVIRONMENT",
            Self::ForbiddenIp => "FORBIDDEN_IP",
            Self::InsufficientScope => "INSUFFICIENT_SCOPE",
            Self::RateLimited => "RATE_LIMITED",
            Self::QuotaExceeded => "QUOTA_EXCEEDED",
        }
    }
}
