//! Retry policy: which failed calls may be repeated, and how long to wait between attempts.

use std::time::Duration;

use rand::Rng;
use tonic::Code;

use crate::error::Error;

/// How often and how patiently a safe-to-repeat call is retried.
///
/// Delays grow exponentially from `initial_backoff` and are capped at `max_backoff`; each one
/// is drawn uniformly from the upper half of its step (`[d/2, d]`), so many clients that failed
/// together do not come back together.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RetryPolicy {
    /// Attempts in total, the first included; 1 disables retries (0 is treated as 1).
    pub max_attempts: u32,
    /// Delay before the first retry.
    pub initial_backoff: Duration,
    /// Upper bound on any delay.
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 3,
            initial_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_secs(1),
        }
    }
}

impl RetryPolicy {
    /// A policy with the given attempt count and backoff bounds.
    pub fn new(max_attempts: u32, initial_backoff: Duration, max_backoff: Duration) -> Self {
        Self {
            max_attempts,
            initial_backoff,
            max_backoff,
        }
    }

    /// A policy that never retries.
    pub fn none() -> Self {
        Self {
            max_attempts: 1,
            ..Self::default()
        }
    }

    /// Attempts in total, never less than one.
    pub(crate) fn attempts(&self) -> u32 {
        self.max_attempts.max(1)
    }

    /// The delay before retry number `retry` (1 for the first retry), jittered.
    pub(crate) fn backoff(&self, retry: u32) -> Duration {
        jittered_backoff(self.initial_backoff, self.max_backoff, retry)
    }

    /// The un-jittered delay before retry number `retry`.
    #[cfg(test)]
    fn backoff_ceiling(&self, retry: u32) -> Duration {
        backoff_ceiling(self.initial_backoff, self.max_backoff, retry)
    }
}

/// The delay before the `n`th repeat (1 for the first) of something that keeps failing:
/// drawn uniformly from the upper half of [`backoff_ceiling`]. Used for call retries and for
/// the failover backoff of an endpoint.
pub(crate) fn jittered_backoff(initial: Duration, max: Duration, n: u32) -> Duration {
    let step = backoff_ceiling(initial, max, n);
    let hi = u64::try_from(step.as_micros()).unwrap_or(u64::MAX);
    let lo = hi / 2;
    if hi == 0 {
        return Duration::ZERO;
    }
    Duration::from_micros(rand::thread_rng().gen_range(lo..=hi))
}

/// The un-jittered delay before the `n`th repeat: initial · 2^(n-1), capped at `max`.
fn backoff_ceiling(initial: Duration, max: Duration, n: u32) -> Duration {
    let shift = n.saturating_sub(1).min(31);
    initial.saturating_mul(1u32 << shift).min(max)
}

/// Whether repeating a call can change what the server stores.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CallKind {
    /// Reads (fetch, batch fetch, describe, list): always safe to repeat.
    Read,
    /// A mutation the server deduplicates (non-empty `request_id`): safe to repeat.
    IdempotentWrite,
    /// A mutation without a `request_id`: a repeat could apply it twice.
    Write,
}

impl CallKind {
    /// The kind of a mutation carrying `request_id`.
    pub(crate) fn write(request_id: &str) -> Self {
        if request_id.is_empty() {
            Self::Write
        } else {
            Self::IdempotentWrite
        }
    }

    /// Whether this call may be sent more than once at all.
    pub(crate) fn may_repeat(self) -> bool {
        !matches!(self, Self::Write)
    }
}

/// Whether a call of `kind` that failed with `err` should be tried again.
///
/// UNAVAILABLE and transport failures mean the server most likely did not act, or will
/// deduplicate. DEADLINE_EXCEEDED is retried for reads only: a write may have committed after
/// the deadline, and only its request_id protects it, which UNAVAILABLE already covers. Every
/// other code is the server's considered answer and repeating it changes nothing.
pub(crate) fn is_retryable(kind: CallKind, err: &Error) -> bool {
    if !kind.may_repeat() {
        return false;
    }
    match err {
        Error::Transport(_) => true,
        Error::Status { code, .. } => match code {
            Code::Unavailable => true,
            Code::DeadlineExceeded => kind == CallKind::Read,
            _ => false,
        },
        Error::Config(_) | Error::Stale(_) => false,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn status(code: Code) -> Error {
        Error::Status {
            code,
            message: String::new(),
        }
    }

    #[test]
    fn reads_retry_on_unavailable_transport_and_deadline() {
        let k = CallKind::Read;
        assert!(is_retryable(k, &status(Code::Unavailable)));
        assert!(is_retryable(k, &Error::Transport("reset".into())));
        assert!(is_retryable(k, &status(Code::DeadlineExceeded)));
    }

    #[test]
    fn never_retry_server_verdicts() {
        for code in [
            Code::NotFound,
            Code::PermissionDenied,
            Code::InvalidArgument,
            Code::Aborted,
            Code::FailedPrecondition,
            Code::ResourceExhausted,
            Code::Internal,
            Code::Unknown,
            Code::DataLoss,
            Code::Unauthenticated,
            Code::AlreadyExists,
        ] {
            for kind in [CallKind::Read, CallKind::IdempotentWrite, CallKind::Write] {
                assert!(!is_retryable(kind, &status(code)), "{kind:?} {code:?}");
            }
        }
        assert!(!is_retryable(CallKind::Read, &Error::Config("x".into())));
    }

    #[test]
    fn writes_retry_only_with_request_id() {
        let plain = CallKind::write("");
        let dedup = CallKind::write("req-1");
        assert_eq!(plain, CallKind::Write);
        assert_eq!(dedup, CallKind::IdempotentWrite);
        assert!(!is_retryable(plain, &status(Code::Unavailable)));
        assert!(!is_retryable(plain, &Error::Transport("reset".into())));
        assert!(is_retryable(dedup, &status(Code::Unavailable)));
        assert!(is_retryable(dedup, &Error::Transport("reset".into())));
        assert!(!is_retryable(dedup, &status(Code::DeadlineExceeded)));
    }

    #[test]
    fn backoff_grows_caps_and_jitters() {
        let p = RetryPolicy::default();
        assert_eq!(p.backoff_ceiling(1), Duration::from_millis(50));
        assert_eq!(p.backoff_ceiling(2), Duration::from_millis(100));
        assert_eq!(p.backoff_ceiling(5), Duration::from_millis(800));
        assert_eq!(p.backoff_ceiling(6), Duration::from_secs(1));
        assert_eq!(p.backoff_ceiling(1000), Duration::from_secs(1));
        for retry in 1..10 {
            let d = p.backoff(retry);
            let ceiling = p.backoff_ceiling(retry);
            assert!(d <= ceiling && d >= ceiling / 2, "{retry}: {d:?}");
        }
        assert_eq!(RetryPolicy::none().attempts(), 1);
        assert_eq!(
            RetryPolicy::new(0, Duration::ZERO, Duration::ZERO).attempts(),
            1
        );
        assert_eq!(
            RetryPolicy::new(4, Duration::ZERO, Duration::ZERO).backoff(3),
            Duration::ZERO
        );
    }
}
