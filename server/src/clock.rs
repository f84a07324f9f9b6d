//! Time as a parameter: every deadline is judged against a [`Clock`], so tests control time
//! instead of sleeping.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch.
pub type Millis = u64;

/// A source of the current time.
pub trait Clock: Send + Sync + 'static {
    /// Now, in milliseconds since the Unix epoch.
    fn now_ms(&self) -> Millis;
}

/// The system's wall clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> Millis {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0)
    }
}

/// A clock that moves only when told to, for tests.
#[derive(Debug, Default)]
pub struct ManualClock(AtomicU64);

impl ManualClock {
    /// A clock standing at `ms`.
    pub fn new(ms: Millis) -> Self {
        Self(AtomicU64::new(ms))
    }

    /// Moves the clock forward by `ms`.
    pub fn advance(&self, ms: Millis) {
        self.0.fetch_add(ms, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> Millis {
        self.0.load(Ordering::SeqCst)
    }
}

/// Converts milliseconds since the epoch to a protobuf timestamp.
pub fn to_timestamp(ms: Millis) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: (ms / 1000) as i64,
        nanos: ((ms % 1000) * 1_000_000) as i32,
    }
}

/// `ms` as an RFC 3339 UTC time with millisecond precision, e.g. `2025-01-31T23:59:59.250Z`,
/// for messages people read.
pub fn rfc3339(ms: Millis) -> String {
    let secs = ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm), in unsigned form:
    // `ms` is never before the epoch.
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        ms % 1000
    )
}

/// TEST ONLY. The system clock shifted by an offset (milliseconds, may be negative) read from
/// a file on every reading, so an end-to-end test can move a running server's time forward
/// without sleeping. Used only when the configuration names the file (`[testing]
/// clock_file`); the server then logs a warning at start. Never use it in production: whoever
/// can write the file controls every deadline.
#[derive(Debug)]
pub struct FileOffsetClock {
    path: std::path::PathBuf,
    /// The last offset read successfully, used if a later read fails (a test rewriting the
    /// file non-atomically must not make time jump back to zero).
    last: std::sync::atomic::AtomicI64,
}

impl FileOffsetClock {
    /// A clock over `path`, which must exist and hold an integer (the offset in ms).
    pub fn open(path: &std::path::Path) -> Result<Self, String> {
        let offset = read_offset(path)?;
        Ok(Self {
            path: path.to_owned(),
            last: std::sync::atomic::AtomicI64::new(offset),
        })
    }
}

fn read_offset(path: &std::path::Path) -> Result<i64, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("test clock file {}: {e}", path.display()))?;
    text.trim().parse::<i64>().map_err(|_| {
        format!(
            "test clock file {}: expected an offset in milliseconds (an integer)",
            path.display()
        )
    })
}

impl Clock for FileOffsetClock {
    fn now_ms(&self) -> Millis {
        let offset = match read_offset(&self.path) {
            Ok(o) => {
                self.last.store(o, Ordering::SeqCst);
                o
            }
            Err(e) => {
                tracing::warn!(error = %e, "test clock: keeping the last offset");
                self.last.load(Ordering::SeqCst)
            }
        };
        SystemClock.now_ms().saturating_add_signed(offset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_formats_utc() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(951_782_400_123), "2000-02-29T00:00:00.123Z");
        assert_eq!(rfc3339(1_735_689_599_250), "2024-12-31T23:59:59.250Z");
        assert_eq!(rfc3339(4_107_542_400_000), "2100-03-01T00:00:00.000Z");
    }

    #[test]
    fn file_offset_clock_follows_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("clock");
        assert!(
            FileOffsetClock::open(&path).is_err(),
            "missing file accepted"
        );
        std::fs::write(&path, "soon").unwrap();
        assert!(FileOffsetClock::open(&path).is_err(), "garbage accepted");
        std::fs::write(&path, "0\n").unwrap();
        let c = FileOffsetClock::open(&path).unwrap();
        let base = c.now_ms();
        std::fs::write(&path, "3600000").unwrap();
        let moved = c.now_ms();
        assert!(
            moved >= base + 3_600_000 && moved < base + 3_660_000,
            "{base} {moved}"
        );
        // An unreadable file keeps the last offset rather than jumping back.
        std::fs::write(&path, "").unwrap();
        assert!(c.now_ms() >= base + 3_600_000);
    }
}
