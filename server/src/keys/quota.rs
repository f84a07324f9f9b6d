//! The quota ledger: each API key's remaining balance, exact across restarts and never below
//! zero under concurrency.
//!
//! Design. One entry per key, each behind its own mutex. A charge takes the entry's lock, reads
//! the balance (from memory; from the store the first time), refuses if it is short, else
//! decrements it and writes the new balance to the store — still under the lock, so two
//! charges can never be written out of order and leave a stale balance on disk. The write is a
//! plain store commit (an in-memory operation in sled, no fsync): the verifier then waits for
//! the group-commit flush that also carries the call's audit record before it answers VALID.
//! So there is no fsync per charge, concurrent verifications share one, and no VALID is ever
//! acknowledged whose charge is not on disk: after a crash the balance is exactly the limit
//! minus every acknowledged charge, or lower by charges whose reply was lost with the crash
//! (the ledger may under-admit in a crash, never over-admit).
//!
//! Refills are computed, not scheduled: the balance is replaced by `refill` whenever a period
//! boundary (counted from when the quota was set) has passed since the ledger's own period
//! start. The same stored ledger and clock give the same balance before and after a restart.
//! Setting a quota gives it an epoch above every epoch the key ever had (kept on the key's
//! policy even while it has no quota, so a quota cleared and set again never meets its old
//! ledger); a ledger from another epoch (or another incarnation of the name) is discarded and
//! the new quota starts at its limit.

use crate::clock::Millis;
use crate::error::{Error, Result};
use crate::model::keypolicy::Quota;
use crate::store::{decode, encode, Batch, Store, Tree};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

/// The stored balance of one key's quota.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerRecord {
    /// Creation time of the secret (a recreated name starts a new ledger).
    pub create_ms: Millis,
    /// The quota's epoch this ledger belongs to.
    pub epoch: u64,
    /// Units left.
    pub balance: u64,
    /// Start of the current refill period.
    pub period_start_ms: Millis,
}

/// What a charge did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Charge {
    /// Charged; the balance left.
    Charged(u64),
    /// Refused, nothing charged; the balance, and how long until the next refill.
    Exceeded(u64, Option<u64>),
}

type Slot = Arc<Mutex<Option<LedgerRecord>>>;

/// Every key's quota balance.
#[derive(Default)]
pub struct QuotaLedger {
    slots: Mutex<HashMap<Arc<str>, Slot>>,
}

impl QuotaLedger {
    /// Charges `cost` to the quota of secret `name` (created at `create_ms`) if the balance
    /// covers it. Cost 0 reports the balance and writes nothing. A failed store write charges
    /// nothing and is UNAVAILABLE.
    pub fn charge(
        &self,
        store: &dyn Store,
        name: &str,
        create_ms: Millis,
        quota: &Quota,
        cost: u64,
        now: Millis,
    ) -> Result<Charge> {
        let slot = self.slot(name);
        let mut held = slot.lock().unwrap_or_else(PoisonError::into_inner);
        let mut rec = match *held {
            Some(r) if r.create_ms == create_ms && r.epoch == quota.epoch => r,
            _ => load(store, name, create_ms, quota)?,
        };
        refill(&mut rec, quota, now);
        if rec.balance < cost {
            *held = Some(rec);
            let next = quota
                .refill_period_ms
                .map(|p| rec.period_start_ms.saturating_add(p).saturating_sub(now));
            return Ok(Charge::Exceeded(rec.balance, next));
        }
        if cost > 0 {
            rec.balance -= cost;
            let mut batch = Batch::new();
            batch.put(Tree::Quota, name.as_bytes(), encode(&rec));
            store.commit(batch).map_err(|e| {
                tracing::error!(error = %e, "quota ledger write failed");
                Error::Unavailable("quota ledger unavailable".into())
            })?;
        }
        *held = Some(rec);
        Ok(Charge::Charged(rec.balance))
    }

    /// The balance now, without charging.
    pub fn balance(
        &self,
        store: &dyn Store,
        name: &str,
        create_ms: Millis,
        quota: &Quota,
        now: Millis,
    ) -> Result<u64> {
        match self.charge(store, name, create_ms, quota, 0, now)? {
            Charge::Charged(b) | Charge::Exceeded(b, _) => Ok(b),
        }
    }

    fn slot(&self, name: &str) -> Slot {
        let mut slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(s) = slots.get(name) {
            return s.clone();
        }
        let s = Slot::default();
        slots.insert(name.into(), s.clone());
        s
    }
}

/// The stored ledger if it belongs to this quota, else a fresh one at the limit.
fn load(store: &dyn Store, name: &str, create_ms: Millis, quota: &Quota) -> Result<LedgerRecord> {
    let stored = store
        .get(Tree::Quota, name.as_bytes())?
        .map(|raw| decode::<LedgerRecord>("quota ledger", &raw))
        .transpose()?;
    Ok(match stored {
        Some(r) if r.create_ms == create_ms && r.epoch == quota.epoch => r,
        _ => LedgerRecord {
            create_ms,
            epoch: quota.epoch,
            balance: quota.limit,
            period_start_ms: quota.set_ms,
        },
    })
}

fn refill(rec: &mut LedgerRecord, quota: &Quota, now: Millis) {
    let Some(period) = quota.refill_period_ms else {
        return;
    };
    if period == 0 || now < rec.period_start_ms.saturating_add(period) {
        return;
    }
    let periods = (now - rec.period_start_ms) / period;
    rec.period_start_ms = rec
        .period_start_ms
        .saturating_add(periods.saturating_mul(period));
    rec.balance = quota.refill;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::sled_store::SledStore;

    fn quota(limit: u64, refill: u64, period: Option<u64>, epoch: u64) -> Quota {
        Quota::parse(limit, refill, period, 1_000, epoch).unwrap()
    }

    #[tokio::test]
    async fn never_below_zero_and_exact_after_reload() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path()).unwrap();
        let q = quota(5, 0, None, 1);
        let l = QuotaLedger::default();
        assert_eq!(
            l.charge(&store, "k", 7, &q, 3, 2_000).unwrap(),
            Charge::Charged(2)
        );
        assert_eq!(
            l.charge(&store, "k", 7, &q, 3, 2_000).unwrap(),
            Charge::Exceeded(2, None)
        );
        assert_eq!(
            l.charge(&store, "k", 7, &q, 0, 2_000).unwrap(),
            Charge::Charged(2)
        );
        // A new ledger object (a restart) reads the same balance from the store.
        let again = QuotaLedger::default();
        assert_eq!(again.balance(&store, "k", 7, &q, 2_000).unwrap(), 2);
        // Another incarnation of the name, or a new quota epoch, starts afresh.
        assert_eq!(again.balance(&store, "k", 8, &q, 2_000).unwrap(), 5);
        let q2 = quota(10, 0, None, 2);
        assert_eq!(
            again.charge(&store, "k", 7, &q2, 1, 2_000).unwrap(),
            Charge::Charged(9)
        );
    }

    #[tokio::test]
    async fn refill_replaces_the_balance_each_period() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path()).unwrap();
        // Set at t=1000 ms: 3 units, refilled to 2 every 10 s.
        let q = quota(3, 2, Some(10_000), 1);
        let l = QuotaLedger::default();
        assert_eq!(
            l.charge(&store, "k", 0, &q, 3, 5_000).unwrap(),
            Charge::Charged(0)
        );
        assert_eq!(
            l.charge(&store, "k", 0, &q, 1, 6_000).unwrap(),
            Charge::Exceeded(0, Some(5_000))
        );
        assert_eq!(
            l.charge(&store, "k", 0, &q, 1, 11_000).unwrap(),
            Charge::Charged(1)
        );
        // Two periods later the balance is replaced, not accumulated.
        assert_eq!(l.balance(&store, "k", 0, &q, 31_500).unwrap(), 2);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_charges_admit_exactly_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(SledStore::open(dir.path()).unwrap());
        let l = Arc::new(QuotaLedger::default());
        let q = quota(1000, 0, None, 1);
        let mut tasks = Vec::new();
        for _ in 0..16 {
            let (store, l) = (store.clone(), l.clone());
            tasks.push(tokio::task::spawn_blocking(move || {
                (0..100)
                    .filter(|_| {
                        matches!(
                            l.charge(&*store, "k", 0, &q, 1, 5).unwrap(),
                            Charge::Charged(_)
                        )
                    })
                    .count()
            }));
        }
        let mut admitted = 0;
        for t in tasks {
            admitted += t.await.unwrap();
        }
        assert_eq!(admitted, 1000);
        assert_eq!(
            QuotaLedger::default()
                .balance(&*store, "k", 0, &q, 5)
                .unwrap(),
            0
        );
    }
}
