//! Lifecycle and key-policy fields as received (durations, times, expiries, reasons), and their
//! parsing into checked values. The service layer copies wire fields into the raw types here;
//! nothing else reads them unparsed.

use crate::clock::Millis;
use crate::error::{Error, Result};
use crate::model::SecretRecord;
use serde::Serialize;

/// Longest grace period: a year.
pub const MAX_GRACE_MS: u64 = 365 * DAY_MS;
/// Shortest rotation period: a minute.
pub const MIN_ROTATION_MS: u64 = 60_000;
/// Longest rotation period: ten years.
pub const MAX_ROTATION_MS: u64 = 3650 * DAY_MS;
/// Furthest expiry from now: a hundred years.
pub const MAX_EXPIRY_AHEAD_MS: u64 = 36_500 * DAY_MS;
/// Longest revocation reason, in bytes.
pub const MAX_REASON: usize = 256;
const DAY_MS: u64 = 86_400_000;

/// A duration as received (`google.protobuf.Duration`'s fields), not yet checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct RawDuration {
    /// Whole seconds (may be negative on the wire).
    pub seconds: i64,
    /// Nanoseconds, 0..1e9 when well-formed.
    pub nanos: i32,
}

/// An expiry as received: an absolute time, or a time to live from now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum RawExpiration {
    /// `google.protobuf.Timestamp` fields.
    At {
        /// Seconds since the epoch.
        seconds: i64,
        /// Nanoseconds.
        nanos: i32,
    },
    /// Time to live from the server's now; zero removes an expiry.
    Ttl(RawDuration),
}

/// The lifecycle policy fields of PutSecret and IssueKey, as received.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct LifecycleInput {
    /// Scheduled rotation period; zero turns it off.
    pub rotation_period: Option<RawDuration>,
    /// Grace period for a replaced PRIMARY when a call names none.
    pub default_grace_period: Option<RawDuration>,
    /// Expiry of the whole secret.
    pub expiration: Option<RawExpiration>,
}

/// A checked lifecycle policy change: each `Some` replaces the secret's setting.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LifecyclePolicy {
    /// `Some(None)` turns scheduled rotation off.
    pub rotation_period_ms: Option<Option<u64>>,
    /// New default grace period.
    pub grace_ms: Option<u64>,
    /// `Some(None)` removes the expiry.
    pub expire_ms: Option<Option<Millis>>,
}

impl LifecyclePolicy {
    /// Checks every field, judging expiries against `now`.
    pub fn parse(input: &LifecycleInput, now: Millis) -> Result<Self> {
        let rotation_period_ms = input
            .rotation_period
            .map(|d| rotation_period("rotation_period", d))
            .transpose()?;
        let grace_ms = input
            .default_grace_period
            .map(|d| grace("default_grace_period", d))
            .transpose()?;
        let expire_ms = input.expiration.map(|e| expiry(e, now)).transpose()?;
        Ok(Self {
            rotation_period_ms,
            grace_ms,
            expire_ms,
        })
    }

    /// Applies the change to `secret`. A new rotation period counts from `now`.
    pub fn apply(&self, secret: &mut SecretRecord, now: Millis) {
        if let Some(period) = self.rotation_period_ms {
            secret.life.rotation_period_ms = period;
            secret.life.next_rotation_ms = period.map(|p| now.saturating_add(p));
            secret.life.rotation_due_ms = None;
        }
        if let Some(g) = self.grace_ms {
            secret.life.grace_ms = Some(g);
        }
        if let Some(e) = self.expire_ms {
            secret.life.expire_ms = e;
        }
    }
}

/// A duration in milliseconds; negative or malformed durations are refused.
pub fn millis(field: &str, d: RawDuration) -> Result<u64> {
    if d.seconds < 0 || d.nanos < 0 {
        return Err(Error::invalid(format!("{field} is negative")));
    }
    if d.nanos >= 1_000_000_000 {
        return Err(Error::invalid(format!(
            "{field}: nanos must be below 1000000000"
        )));
    }
    (d.seconds as u64)
        .checked_mul(1000)
        .and_then(|ms| ms.checked_add(d.nanos as u64 / 1_000_000))
        .ok_or_else(|| Error::invalid(format!("{field} is out of range")))
}

/// A key-policy period (rate-limit period, quota refill) in milliseconds, rounded up so that a
/// period is never shortened, and saturating; negative or malformed durations are refused.
pub fn period_ms(field: &str, d: RawDuration) -> Result<u64> {
    if d.seconds < 0 || !(0..1_000_000_000).contains(&d.nanos) {
        return Err(Error::invalid(format!(
            "{field} must be a positive duration"
        )));
    }
    let secs = u64::try_from(d.seconds).unwrap_or(u64::MAX);
    Ok(secs
        .saturating_mul(1000)
        .saturating_add((d.nanos as u64).div_ceil(1_000_000)))
}

/// A time in milliseconds since the epoch (a key policy's expiry); before 1970 is invalid.
pub fn time_ms(field: &str, seconds: i64, nanos: i32) -> Result<Millis> {
    if seconds < 0 || !(0..1_000_000_000).contains(&nanos) {
        return Err(Error::invalid(format!(
            "{field} is not a valid time after 1970"
        )));
    }
    Ok((seconds as u64)
        .saturating_mul(1000)
        .saturating_add(nanos as u64 / 1_000_000))
}

/// A grace period: 0 (retire at once) up to a year.
pub fn grace(field: &str, d: RawDuration) -> Result<u64> {
    let ms = millis(field, d)?;
    if ms > MAX_GRACE_MS {
        return Err(Error::invalid(format!(
            "{field} of {}s exceeds the limit of 365 days",
            ms / 1000
        )));
    }
    Ok(ms)
}

/// A rotation period: a minute to ten years, or 0 (None) to turn scheduled rotation off.
pub fn rotation_period(field: &str, d: RawDuration) -> Result<Option<u64>> {
    match millis(field, d)? {
        0 => Ok(None),
        ms if (MIN_ROTATION_MS..=MAX_ROTATION_MS).contains(&ms) => Ok(Some(ms)),
        ms => Err(Error::invalid(format!(
            "{field} of {}s is outside 60s to 3650 days (0s turns scheduled rotation off)",
            ms / 1000
        ))),
    }
}

/// An expiry: a future time within a hundred years, or a TTL (0: no expiry).
pub fn expiry(e: RawExpiration, now: Millis) -> Result<Option<Millis>> {
    let at = match e {
        RawExpiration::Ttl(d) => match millis("ttl", d)? {
            0 => return Ok(None),
            ms => now.checked_add(ms),
        },
        RawExpiration::At { seconds, nanos } => {
            if seconds < 0 || !(0..1_000_000_000).contains(&nanos) {
                return Err(Error::invalid("expire_time is malformed or before 1970"));
            }
            let at = (seconds as u64)
                .checked_mul(1000)
                .and_then(|ms| ms.checked_add(nanos as u64 / 1_000_000))
                .ok_or_else(|| Error::invalid("expire_time is out of range"))?;
            if at <= now {
                return Err(Error::invalid(format!(
                    "expire_time {} is not in the future (server time {})",
                    crate::clock::rfc3339(at),
                    crate::clock::rfc3339(now)
                )));
            }
            Some(at)
        }
    };
    match at {
        Some(at) if at - now <= MAX_EXPIRY_AHEAD_MS => Ok(Some(at)),
        _ => Err(Error::invalid("expiry is more than 100 years away")),
    }
}

/// A revocation reason: 1 to 256 bytes, no control characters.
pub fn reason(s: &str) -> Result<String> {
    if s.trim().is_empty() {
        return Err(Error::invalid("reason is required"));
    }
    if s.len() > MAX_REASON {
        return Err(Error::invalid(format!(
            "reason is longer than {MAX_REASON} bytes"
        )));
    }
    if s.chars().any(char::is_control) {
        return Err(Error::invalid("reason contains control characters"));
    }
    Ok(s.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Code;

    #[test]
    fn key_policy_periods_round_up_and_times_start_in_1970() {
        assert_eq!(period_ms("x", d(1, 500_000)).unwrap(), 1001);
        assert!(period_ms("x", d(-1, 0)).is_err());
        assert!(period_ms("x", d(0, 1_000_000_000)).is_err());
        assert_eq!(time_ms("t", 2, 5_000_000).unwrap(), 2005);
        assert!(time_ms("t", -5, 0).is_err());
    }

    fn d(seconds: i64, nanos: i32) -> RawDuration {
        RawDuration { seconds, nanos }
    }

    #[test]
    fn durations() {
        assert_eq!(millis("g", d(2, 500_000_000)).unwrap(), 2500);
        for bad in [d(-1, 0), d(0, -1), d(0, 1_000_000_000), d(i64::MAX, 0)] {
            assert_eq!(millis("g", bad).unwrap_err().code(), Code::InvalidArgument);
        }
        assert_eq!(grace("g", d(0, 0)).unwrap(), 0);
        assert_eq!(grace("g", d(365 * 86_400, 0)).unwrap(), MAX_GRACE_MS);
        assert!(grace("g", d(365 * 86_400 + 1, 0)).is_err());
        assert_eq!(rotation_period("r", d(0, 0)).unwrap(), None);
        assert_eq!(rotation_period("r", d(60, 0)).unwrap(), Some(60_000));
        assert!(rotation_period("r", d(59, 0)).is_err());
        assert!(rotation_period("r", d(3651 * 86_400, 0)).is_err());
    }

    #[test]
    fn expiries() {
        let now = 1_000_000;
        assert_eq!(expiry(RawExpiration::Ttl(d(0, 0)), now).unwrap(), None);
        assert_eq!(
            expiry(RawExpiration::Ttl(d(10, 0)), now).unwrap(),
            Some(now + 10_000)
        );
        let at = |s: i64| RawExpiration::At {
            seconds: s,
            nanos: 0,
        };
        assert_eq!(expiry(at(2000), now).unwrap(), Some(2_000_000));
        for bad in [at(1000), at(10), at(-5), at(i64::MAX)] {
            assert!(expiry(bad, now).is_err(), "{bad:?}");
        }
        assert!(expiry(RawExpiration::Ttl(d(200 * 365 * 86_400, 0)), now).is_err());
    }

    #[test]
    fn reasons() {
        assert_eq!(reason("leaked in a log").unwrap(), "leaked in a log");
        for bad in ["", "  ", "a\nb", &"x".repeat(257)] {
            assert!(reason(bad).is_err(), "{bad:?}");
        }
    }
}
