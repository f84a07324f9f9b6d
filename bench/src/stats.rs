//! Per-worker latency and error recording, merged into one report at the end of a run.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use serde_json::{json, Value};

use crate::workload::ErrorLabel;

/// Latencies reserved per worker up front, so recording does not reallocate in the timed loop
/// at ordinary rates (256 KiB per worker).
const PREALLOCATED: usize = 1 << 16;

/// What one worker measured: successful latencies in microseconds, and failures by label.
#[derive(Debug)]
pub struct WorkerStats {
    /// Latency of each successful operation, in microseconds (saturating at ~71 minutes).
    pub latencies_us: Vec<u32>,
    /// Failed operations by label.
    pub errors: HashMap<ErrorLabel, u64>,
}

impl WorkerStats {
    /// Empty stats with room for [`PREALLOCATED`] latencies.
    pub fn new() -> Self {
        Self {
            latencies_us: Vec::with_capacity(PREALLOCATED),
            errors: HashMap::new(),
        }
    }

    /// Records a successful operation.
    pub fn ok(&mut self, latency: Duration) {
        self.latencies_us
            .push(u32::try_from(latency.as_micros()).unwrap_or(u32::MAX));
    }

    /// Records a failed operation.
    pub fn error(&mut self, label: ErrorLabel) {
        *self.errors.entry(label).or_default() += 1;
    }
}

/// The summary of a run.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    /// Successful operations in the timed window.
    pub ops: u64,
    /// Failed operations in the timed window, by label.
    pub errors: BTreeMap<String, u64>,
    /// Length of the timed window (until the last operation in it finished).
    pub elapsed: Duration,
    /// Successful operations per second.
    pub ops_per_sec: f64,
    /// Median latency, microseconds.
    pub p50_us: u32,
    /// 99th-percentile latency, microseconds.
    pub p99_us: u32,
    /// 99.9th-percentile latency, microseconds.
    pub p999_us: u32,
    /// Largest latency, microseconds.
    pub max_us: u32,
    /// Mean latency, microseconds.
    pub mean_us: f64,
}

impl Summary {
    /// Merges every worker's stats.
    pub fn merge(workers: Vec<WorkerStats>, elapsed: Duration) -> Self {
        let mut all = Vec::with_capacity(workers.iter().map(|w| w.latencies_us.len()).sum());
        let mut errors = BTreeMap::new();
        for w in workers {
            all.extend_from_slice(&w.latencies_us);
            for (label, n) in w.errors {
                *errors.entry(label.to_owned()).or_default() += n;
            }
        }
        all.sort_unstable();
        let ops = all.len() as u64;
        let secs = elapsed.as_secs_f64();
        Self {
            ops,
            errors,
            elapsed,
            ops_per_sec: if secs > 0.0 { ops as f64 / secs } else { 0.0 },
            p50_us: percentile(&all, 0.50),
            p99_us: percentile(&all, 0.99),
            p999_us: percentile(&all, 0.999),
            max_us: all.last().copied().unwrap_or(0),
            mean_us: if all.is_empty() {
                0.0
            } else {
                all.iter().map(|&v| f64::from(v)).sum::<f64>() / all.len() as f64
            },
        }
    }

    /// Failed operations in total.
    pub fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }

    /// The summary as JSON, latencies in microseconds.
    pub fn to_json(&self) -> Value {
        json!({
            "ops": self.ops,
            "errors": self.error_count(),
            "errors_by_code": self.errors,
            "elapsed_secs": self.elapsed.as_secs_f64(),
            "ops_per_sec": self.ops_per_sec,
            "latency_us": {
                "p50": self.p50_us,
                "p99": self.p99_us,
                "p999": self.p999_us,
                "max": self.max_us,
                "mean": self.mean_us,
            },
        })
    }
}

/// The nearest-rank percentile `p` (0..=1) of sorted values; 0 when there are none.
pub fn percentile(sorted: &[u32], p: f64) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = (p * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_nearest_rank() {
        let v: Vec<u32> = (1..=100).collect();
        assert_eq!(percentile(&v, 0.50), 50);
        assert_eq!(percentile(&v, 0.99), 99);
        assert_eq!(percentile(&v, 1.0), 100);
        assert_eq!(percentile(&v, 0.0), 1);
        assert_eq!(percentile(&[7], 0.99), 7);
        assert_eq!(percentile(&[], 0.5), 0);
    }

    #[test]
    fn merge_workers() {
        let mut a = WorkerStats::new();
        let mut b = WorkerStats::new();
        for us in [300, 100] {
            a.ok(Duration::from_micros(us));
        }
        b.ok(Duration::from_micros(200));
        b.ok(Duration::from_secs(10_000)); // saturates
        a.error("UNAVAILABLE");
        b.error("UNAVAILABLE");
        b.error("NOT_FOUND");
        let s = Summary::merge(vec![a, b], Duration::from_secs(2));
        assert_eq!(s.ops, 4);
        assert_eq!(s.ops_per_sec, 2.0);
        assert_eq!(s.p50_us, 200);
        assert_eq!(s.max_us, u32::MAX);
        assert_eq!(s.error_count(), 3);
        assert_eq!(s.errors["UNAVAILABLE"], 2);
        let j = s.to_json();
        assert_eq!(j["errors_by_code"]["NOT_FOUND"], 1);
        assert_eq!(j["latency_us"]["p50"], 200);
    }

    #[test]
    fn empty_run() {
        let s = Summary::merge(vec![WorkerStats::new()], Duration::ZERO);
        assert_eq!((s.ops, s.p99_us, s.max_us), (0, 0, 0));
        assert_eq!(s.ops_per_sec, 0.0);
    }
}
