//! Open-loop load: operations are issued at a fixed rate whatever the server does, and each
//! one's latency counts from when it was *due*, not from when a worker got round to sending it.
//! A closed-loop run (a worker waits for each answer before its next call) slows its own
//! offered load down when the server slows, so its percentiles hide the queueing a real client
//! population sees ("coordinated omission"); an open-loop run shows it.
//!
//! The pacer wakes at the timer's resolution (about a millisecond) and issues every operation
//! whose due time has passed, each as its own task. At most [`MAX_IN_FLIGHT`] are outstanding:
//! an operation due while that many are still waiting is not sent and is counted under
//! `OVERLOAD` — the offered rate was more than the server could absorb.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, Semaphore};

use crate::stats::{Summary, WorkerStats};
use crate::workload::{ErrorLabel, Workload};

/// Most operations outstanding at once before new ones are counted as `OVERLOAD`.
pub const MAX_IN_FLIGHT: usize = 4096;

/// One open-loop run: its rate and its windows.
#[derive(Debug, Clone)]
pub struct Paced {
    /// Workload name, for messages.
    pub name: &'static str,
    /// Operations issued per second.
    pub rate: f64,
    /// Unmeasured time first (operations due in it are sent but not counted).
    pub warmup: Duration,
    /// Measured time.
    pub duration: Duration,
    /// Bound on one call; a call past it counts as `DEADLINE_EXCEEDED`.
    pub call_timeout: Duration,
}

/// Drives `workload` at `paced.rate` operations per second over `clients` (round-robin; setup
/// already done) and summarises what was measured. `ops_per_sec` in the summary is the rate
/// achieved (answered OK within the window), to compare with the rate offered.
pub async fn drive<W: Workload>(
    workload: W,
    paced: &Paced,
    clients: &[W::Client],
) -> Result<Summary, String> {
    if !(paced.rate.is_finite() && paced.rate > 0.0) {
        return Err(format!(
            "{}: rate {} is not a positive number",
            paced.name, paced.rate
        ));
    }
    eprintln!(
        "ward-bench: {} open loop at {:.0} ops/s, warmup {:?}, measuring {:?}",
        paced.name, paced.rate, paced.warmup, paced.duration
    );
    let workload = Arc::new(workload);
    let slots = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let (tx, mut rx) = mpsc::unbounded_channel::<Result<Duration, ErrorLabel>>();
    let interval = Duration::from_secs_f64(1.0 / paced.rate);
    let start = Instant::now();
    let warm_end = start + paced.warmup;
    let end = warm_end + paced.duration;
    let mut overload = 0u64;
    let mut seq = 0u64;
    loop {
        let due = start + interval.mul_f64(seq as f64);
        if due >= end {
            break;
        }
        let now = Instant::now();
        if due > now {
            tokio::time::sleep_until(tokio::time::Instant::from_std(due)).await;
        }
        let counted = due >= warm_end;
        match slots.clone().try_acquire_owned() {
            Ok(slot) => {
                let (workload, tx) = (workload.clone(), tx.clone());
                let client = clients[seq as usize % clients.len()].clone();
                let timeout = paced.call_timeout;
                tokio::spawn(async move {
                    let result = tokio::time::timeout(timeout, workload.op(&client, 0, seq)).await;
                    let latency = due.elapsed();
                    drop(slot);
                    if counted {
                        let _ = tx.send(match result {
                            Ok(Ok(())) => Ok(latency),
                            Ok(Err(label)) => Err(label),
                            Err(_) => Err("DEADLINE_EXCEEDED"),
                        });
                    }
                });
            }
            Err(_) if counted => overload += 1,
            Err(_) => {}
        }
        seq += 1;
    }
    drop(tx);
    // Every call is bounded by its timeout, so the stragglers finish by themselves.
    let mut stats = WorkerStats::new();
    while let Some(r) = rx.recv().await {
        match r {
            Ok(latency) => stats.ok(latency),
            Err(label) => stats.error(label),
        }
    }
    for _ in 0..overload {
        stats.error("OVERLOAD");
    }
    Ok(Summary::merge(vec![stats], paced.duration))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use tokio::sync::Mutex;

    /// A fake server: every call takes a shared lock (so calls queue behind each other) and
    /// holds it for `hold(seq)`.
    struct Queue {
        lock: Mutex<()>,
        hold: fn(u64) -> Duration,
    }

    impl Workload for Queue {
        type Client = ();

        async fn setup(&self, _: &()) -> Result<(), String> {
            Ok(())
        }

        async fn op(&self, _: &(), _: usize, seq: u64) -> Result<(), ErrorLabel> {
            let _held = self.lock.lock().await;
            let hold = (self.hold)(seq);
            if !hold.is_zero() {
                tokio::time::sleep(hold).await;
            }
            Ok(())
        }
    }

    fn paced(rate: f64, duration_ms: u64, timeout_ms: u64) -> Paced {
        Paced {
            name: "test",
            rate,
            warmup: Duration::from_millis(100),
            duration: Duration::from_millis(duration_ms),
            call_timeout: Duration::from_millis(timeout_ms),
        }
    }

    #[tokio::test]
    async fn offers_the_rate_whatever_the_answers() {
        let q = Queue {
            lock: Mutex::new(()),
            hold: |_| Duration::ZERO,
        };
        let s = drive(q, &paced(500.0, 1000, 1000), &[()]).await.unwrap();
        // 500 due in the measured second; the timer's resolution may shift a few across the
        // window's edges.
        assert!((480..=520).contains(&s.ops), "{} ops", s.ops);
        assert_eq!(s.error_count(), 0);
    }

    #[tokio::test]
    async fn a_stall_shows_in_the_calls_queued_behind_it() {
        // One call holds the server for 300 ms a third into the window. A closed loop would
        // record that one slow call; the ~150 calls due meanwhile waited too, and count from
        // when they were due.
        let q = Queue {
            lock: Mutex::new(()),
            hold: |seq| {
                if seq == 150 {
                    Duration::from_millis(300)
                } else {
                    Duration::ZERO
                }
            },
        };
        let s = drive(q, &paced(500.0, 1000, 2000), &[()]).await.unwrap();
        assert!(s.p50_us < 50_000, "p50 {} µs", s.p50_us);
        assert!(s.p99_us >= 200_000, "p99 {} µs", s.p99_us);
    }

    #[tokio::test]
    async fn more_than_the_server_absorbs_is_counted_as_overload() {
        // Every call holds the lock 10 ms: at most 100/s are answered, 20,000/s are offered, and
        // a call waits up to 1 s, so more than MAX_IN_FLIGHT are soon outstanding.
        let q = Queue {
            lock: Mutex::new(()),
            hold: |_| Duration::from_millis(10),
        };
        let s = drive(q, &paced(20_000.0, 400, 1000), &[()]).await.unwrap();
        let overload = s.errors.get("OVERLOAD").copied().unwrap_or(0);
        assert!(overload > 0, "{:?}", s.errors);
        assert!(s.ops < 200, "{} answered", s.ops);
    }

    #[tokio::test]
    async fn a_rate_of_zero_is_refused() {
        let q = Queue {
            lock: Mutex::new(()),
            hold: |_| Duration::ZERO,
        };
        assert!(drive(q, &paced(0.0, 100, 100), &[()]).await.is_err());
    }
}
