//! Rate limiting with GCRA (the generic cell rate algorithm, as in the governor crate): one
//! "theoretical arrival time" per key, no background refill, exact with any clock.
//!
//! Written here rather than taken from governor because each key has its own limit, which an
//! operator can change at any time, and the verifier reports the state (remaining, reset time,
//! retry-after) and reads time from Ward's [`Clock`](crate::clock::Clock) reading, so tests move
//! time instead of sleeping.
//!
//! Memory stays bounded: a key whose arrival time has passed is indistinguishable from a key
//! never seen (its whole burst is available), so such entries are dropped by a sweep at most
//! once a second. What remains is only keys used within their last burst window.

use crate::clock::Millis;
use crate::model::keypolicy::RateLimit;
use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Mutex, PoisonError};

const NS_PER_MS: u64 = 1_000_000;
/// How often idle entries are swept, at most.
const SWEEP_EVERY_MS: Millis = 1000;

/// A key's rate-limit state after a decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateState {
    /// Requests admitted at once.
    pub limit: u32,
    /// Requests that would be admitted now.
    pub remaining: u32,
    /// When the whole burst is available again.
    pub reset_ms: Millis,
}

/// The outcome of a rate-limit check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Admitted (and charged, for [`Limiters::check`]).
    Allowed(RateState),
    /// Refused; `retry_after_ms` is None when the cost exceeds the burst (never admissible).
    Limited {
        /// State now.
        state: RateState,
        /// How long until the same request would be admitted.
        retry_after_ms: Option<u64>,
    },
}

#[derive(Debug, Clone, Copy)]
struct Cell {
    limit: RateLimit,
    /// Theoretical arrival time, nanoseconds since the epoch.
    tat_ns: u64,
}

/// Per-key GCRA state.
pub struct Limiters<K> {
    inner: Mutex<Inner<K>>,
}

struct Inner<K> {
    cells: HashMap<K, Cell>,
    last_sweep_ms: Millis,
}

impl<K: Hash + Eq + Clone> Default for Limiters<K> {
    fn default() -> Self {
        Self {
            inner: Mutex::new(Inner {
                cells: HashMap::new(),
                last_sweep_ms: 0,
            }),
        }
    }
}

impl<K: Hash + Eq + Clone> Limiters<K> {
    /// Admits and charges `cost` requests for `key` under `limit`, or refuses without charging.
    /// A changed limit starts the key afresh. Cost 0 is always admitted and charges nothing.
    pub fn check(&self, key: &K, limit: RateLimit, cost: u64, now: Millis) -> Decision {
        self.decide(key, limit, cost, now, true)
    }

    /// What [`Limiters::check`] would decide, without charging.
    pub fn peek(&self, key: &K, limit: RateLimit, cost: u64, now: Millis) -> Decision {
        self.decide(key, limit, cost, now, false)
    }

    /// Entries held (for tests and metrics).
    pub fn len(&self) -> usize {
        self.lock().cells.len()
    }

    /// Whether no entry is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether `key` has live state.
    pub fn contains(&self, key: &K) -> bool {
        self.lock().cells.contains_key(key)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner<K>> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn decide(&self, key: &K, limit: RateLimit, cost: u64, now: Millis, charge: bool) -> Decision {
        let now_ns = now.saturating_mul(NS_PER_MS);
        let emission =
            (limit.period_ms.saturating_mul(NS_PER_MS) / u64::from(limit.requests)).max(1);
        let tolerance = emission.saturating_mul(u64::from(limit.burst));
        let mut inner = self.lock();
        if now.saturating_sub(inner.last_sweep_ms) >= SWEEP_EVERY_MS {
            inner.cells.retain(|_, c| c.tat_ns > now_ns);
            inner.last_sweep_ms = now;
        }
        let tat = match inner.cells.get(key) {
            Some(c) if c.limit == limit => c.tat_ns.max(now_ns),
            _ => now_ns,
        };
        let state_at = |tat: u64| RateState {
            limit: limit.burst,
            remaining: u32::try_from(
                now_ns.saturating_add(tolerance).saturating_sub(tat) / emission,
            )
            .unwrap_or(u32::MAX)
            .min(limit.burst),
            reset_ms: tat.div_ceil(NS_PER_MS),
        };
        let new_tat = tat.saturating_add(emission.saturating_mul(cost));
        if new_tat.saturating_sub(now_ns) > tolerance {
            let retry_after_ms = (cost <= u64::from(limit.burst)).then(|| {
                new_tat
                    .saturating_sub(tolerance)
                    .saturating_sub(now_ns)
                    .div_ceil(NS_PER_MS)
            });
            return Decision::Limited {
                state: state_at(tat),
                retry_after_ms,
            };
        }
        if charge && cost > 0 {
            inner.cells.insert(
                key.clone(),
                Cell {
                    limit,
                    tat_ns: new_tat,
                },
            );
        }
        Decision::Allowed(state_at(if charge { new_tat } else { tat }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::{Clock, ManualClock};

    fn limit(requests: u32, period_ms: u64, burst: u32) -> RateLimit {
        RateLimit::parse(requests, period_ms, burst).unwrap()
    }

    #[test]
    fn burst_then_retry_after_admits_again() {
        let clock = ManualClock::new(1_000_000);
        let l: Limiters<&str> = Limiters::default();
        // 10 per second, burst 3: emission interval 100 ms.
        let lim = limit(10, 1000, 3);
        for i in 0..3 {
            match l.check(&"k", lim, 1, clock.now_ms()) {
                Decision::Allowed(s) => assert_eq!(s.remaining, 2 - i),
                other => panic!("request {i}: {other:?}"),
            }
        }
        let Decision::Limited {
            state,
            retry_after_ms: Some(wait),
        } = l.check(&"k", lim, 1, clock.now_ms())
        else {
            panic!("fourth request admitted")
        };
        assert_eq!((state.remaining, state.limit), (0, 3));
        assert_eq!(wait, 100);
        assert_eq!(state.reset_ms, clock.now_ms() + 300);
        // One millisecond short is still refused; waiting retry_after admits exactly one.
        clock.advance(wait - 1);
        assert!(matches!(
            l.check(&"k", lim, 1, clock.now_ms()),
            Decision::Limited { .. }
        ));
        clock.advance(1);
        assert!(matches!(
            l.check(&"k", lim, 1, clock.now_ms()),
            Decision::Allowed(_)
        ));
        assert!(matches!(
            l.check(&"k", lim, 1, clock.now_ms()),
            Decision::Limited { .. }
        ));
    }

    #[test]
    fn sustained_rate_is_the_limit() {
        let clock = ManualClock::new(5_000);
        let l: Limiters<u8> = Limiters::default();
        let lim = limit(100, 1000, 1);
        let mut admitted = 0;
        for _ in 0..10_000 {
            if matches!(l.check(&1, lim, 1, clock.now_ms()), Decision::Allowed(_)) {
                admitted += 1;
            }
            clock.advance(1);
        }
        // 10 s at 100/s.
        assert_eq!(admitted, 1000);
    }

    #[test]
    fn cost_zero_and_oversized_costs() {
        let l: Limiters<u8> = Limiters::default();
        let lim = limit(1, 1000, 2);
        assert!(matches!(l.check(&1, lim, 2, 0), Decision::Allowed(_)));
        // Exhausted, yet a zero-cost check is admitted and charges nothing.
        assert!(matches!(l.check(&1, lim, 0, 0), Decision::Allowed(s) if s.remaining == 0));
        assert!(matches!(
            l.check(&1, lim, 3, 10_000),
            Decision::Limited {
                retry_after_ms: None,
                ..
            }
        ));
        // peek never charges.
        for _ in 0..5 {
            assert!(matches!(l.peek(&2, lim, 1, 0), Decision::Allowed(_)));
        }
        assert!(!l.contains(&2));
    }

    #[test]
    fn idle_state_is_evicted_and_a_new_limit_starts_fresh() {
        let clock = ManualClock::new(10_000);
        let l: Limiters<u32> = Limiters::default();
        let lim = limit(10, 1000, 10);
        for k in 0..1000 {
            l.check(&k, lim, 1, clock.now_ms());
        }
        assert_eq!(l.len(), 1000);
        // After 100 ms each key's single request has drained; the next call sweeps them all.
        clock.advance(SWEEP_EVERY_MS);
        l.check(&5000, lim, 1, clock.now_ms());
        assert_eq!(l.len(), 1);

        let tight = limit(1, 60_000, 1);
        assert!(matches!(
            l.check(&7, tight, 1, clock.now_ms()),
            Decision::Allowed(_)
        ));
        assert!(matches!(
            l.check(&7, tight, 1, clock.now_ms()),
            Decision::Limited { .. }
        ));
        let loose = limit(100, 1000, 100);
        assert!(matches!(
            l.check(&7, loose, 1, clock.now_ms()),
            Decision::Allowed(_)
        ));
    }
}
