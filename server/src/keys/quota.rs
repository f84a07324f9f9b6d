//! The quota ledger: each API key's remaining balance, exact across restarts and replicas and
//! never below zero under concurrency.
//!
//! Design. The stored ledger (tree `quota`) holds the units nobody has taken yet. A process
//! takes units from it in *blocks* with a guarded store write, then spends them from memory:
//! a charge that its held units cover writes nothing. With the embedded store the block is 1
//! (every charge takes exactly its cost, so the stored balance is exact at every moment);
//! replicas on etcd take `store.etcd.quota_block` units at a time, so most verifications make
//! no etcd call. Units are taken before they are spent, so the sum of VALID answers across
//! every process never exceeds the quota: a crash loses at most the unspent units each process
//! held (under-admission, never over-admission), and a clean shutdown gives them back
//! ([`QuotaLedger::give_back`]). Each key's state sits behind its own mutex, and every take is
//! a compare-and-set on the stored ledger, retried when another process took first.
//!
//! The verifier waits for the durability of what a charge wrote (and the call's audit
//! record) before it answers VALID: no VALID is acknowledged whose units are not durably
//! taken.
//!
//! Refills are computed, not scheduled: the balance is replaced by `refill` whenever a period
//! boundary (counted from when the quota was set) has passed since the ledger's own period
//! start; units held from an earlier period are dropped with it. The same stored ledger and
//! clock give the same balance before and after a restart. Setting a quota gives it an epoch
//! above every epoch the key ever had (kept on the key's policy even while it has no quota,
//! so a quota cleared and set again never meets its old ledger); a ledger from another epoch
//! (or another incarnation of the name) is discarded and the new quota starts at its limit.

use crate::clock::Millis;
use crate::error::{Error, Result};
use crate::model::keypolicy::Quota;
use crate::store::{decode, encode, Batch, Store, StoreError, Tree};
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
    /// Units left (not yet taken by any process).
    pub balance: u64,
    /// Start of the current refill period.
    pub period_start_ms: Millis,
}

/// What a charge did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Charge {
    /// Charged; the balance left (as this process sees it).
    Charged(u64),
    /// Refused, nothing charged; the balance, and how long until the next refill.
    Exceeded(u64, Option<u64>),
}

/// Units this process has taken from one ledger and not spent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Held {
    create_ms: Millis,
    epoch: u64,
    period_start_ms: Millis,
    units: u64,
}

impl Held {
    fn belongs_to(&self, rec: &LedgerRecord) -> bool {
        self.create_ms == rec.create_ms
            && self.epoch == rec.epoch
            && self.period_start_ms == rec.period_start_ms
    }
}

type Slot = Arc<Mutex<Option<Held>>>;

/// Most attempts of one take when other processes keep taking first.
const TAKE_ATTEMPTS: usize = 16;

/// Every key's quota balance.
pub struct QuotaLedger {
    slots: Mutex<HashMap<Arc<str>, Slot>>,
    /// Units taken from the stored ledger at a time (at least the charge's cost).
    block: u64,
}

impl Default for QuotaLedger {
    /// Takes exactly what each charge costs (one process on its own store).
    fn default() -> Self {
        Self::with_block(1)
    }
}

impl QuotaLedger {
    /// A ledger that takes `block` units at a time (1: exactly each charge's cost).
    pub fn with_block(block: u64) -> Self {
        Self {
            slots: Mutex::default(),
            block: block.max(1),
        }
    }

    /// Charges `cost` to the quota of secret `name` (created at `create_ms`) if the units held
    /// here and the stored balance cover it. Cost 0 reports the balance and writes nothing. A
    /// failed store write charges nothing and is UNAVAILABLE.
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
        for _ in 0..TAKE_ATTEMPTS {
            let (raw, mut rec) = load(store, name, create_ms, quota)?;
            refill(&mut rec, quota, now);
            let mine = match *held {
                Some(h) if h.belongs_to(&rec) => h.units,
                _ => 0,
            };
            if mine >= cost {
                if cost > 0 {
                    *held = Some(Held {
                        units: mine - cost,
                        ..holding(&rec)
                    });
                }
                return Ok(Charge::Charged(rec.balance + mine - cost));
            }
            let need = cost - mine;
            if rec.balance < need {
                let next = quota
                    .refill_period_ms
                    .map(|p| rec.period_start_ms.saturating_add(p).saturating_sub(now));
                return Ok(Charge::Exceeded(rec.balance + mine, next));
            }
            let take = rec.balance.min(need.max(self.block));
            rec.balance -= take;
            let mut batch = Batch::new();
            batch.guard(Tree::Quota, name.as_bytes(), raw);
            batch.put(Tree::Quota, name.as_bytes(), encode(&rec));
            match store.commit(batch) {
                Ok(()) => {
                    *held = Some(Held {
                        units: mine + take - cost,
                        ..holding(&rec)
                    });
                    return Ok(Charge::Charged(rec.balance + mine + take - cost));
                }
                // Another process took first: read what it left and try again.
                Err(StoreError::Conflict) => continue,
                Err(e) => {
                    tracing::error!(error = %e, "quota ledger write failed");
                    return Err(Error::Unavailable("quota ledger unavailable".into()));
                }
            }
        }
        Err(Error::Unavailable(
            "quota ledger busy: other replicas kept changing it; retry".into(),
        ))
    }

    /// The balance now (what nobody has taken plus what this process holds), without
    /// charging.
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

    /// Returns every unspent unit this process holds to the stored ledgers (at shutdown: the
    /// next process, or another replica, can spend them). Units of a ledger that moved on (a
    /// new period, epoch or incarnation) are dropped. Returns the units given back.
    pub fn give_back(&self, store: &dyn Store) -> Result<u64> {
        let slots: Vec<(Arc<str>, Slot)> = self
            .slots
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let mut returned = 0;
        for (name, slot) in slots {
            let mut held = slot.lock().unwrap_or_else(PoisonError::into_inner);
            let Some(h) = *held else { continue };
            if h.units == 0 {
                continue;
            }
            for _ in 0..TAKE_ATTEMPTS {
                let raw = store.get(Tree::Quota, name.as_bytes())?;
                let Some(mut rec) = raw
                    .as_deref()
                    .map(|r| decode::<LedgerRecord>("quota ledger", r))
                    .transpose()?
                    .filter(|r| h.belongs_to(r))
                else {
                    break;
                };
                rec.balance = rec.balance.saturating_add(h.units);
                let mut batch = Batch::new();
                batch.guard(Tree::Quota, name.as_bytes(), raw);
                batch.put(Tree::Quota, name.as_bytes(), encode(&rec));
                match store.commit(batch) {
                    Ok(()) => {
                        returned += h.units;
                        break;
                    }
                    Err(StoreError::Conflict) => continue,
                    Err(e) => return Err(e.into()),
                }
            }
            *held = None;
        }
        Ok(returned)
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

/// No units held yet of ledger `rec`.
fn holding(rec: &LedgerRecord) -> Held {
    Held {
        create_ms: rec.create_ms,
        epoch: rec.epoch,
        period_start_ms: rec.period_start_ms,
        units: 0,
    }
}

/// The stored bytes (for the guard) and the ledger if it belongs to this quota, else a fresh
/// one at the limit.
fn load(
    store: &dyn Store,
    name: &str,
    create_ms: Millis,
    quota: &Quota,
) -> Result<(Option<Vec<u8>>, LedgerRecord)> {
    let raw = store.get(Tree::Quota, name.as_bytes())?;
    let stored = raw
        .as_deref()
        .map(|r| decode::<LedgerRecord>("quota ledger", r))
        .transpose()?;
    let rec = match stored {
        Some(r) if r.create_ms == create_ms && r.epoch == quota.epoch => r,
        _ => LedgerRecord {
            create_ms,
            epoch: quota.epoch,
            balance: quota.limit,
            period_start_ms: quota.set_ms,
        },
    };
    Ok((raw, rec))
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

    /// `tasks` threads, spread over `ledgers`, each charging 1 unit `each` times to key "k":
    /// how many were admitted.
    async fn admit_concurrently(
        store: &Arc<SledStore>,
        ledgers: &[Arc<QuotaLedger>],
        q: Quota,
        tasks: usize,
        each: usize,
    ) -> usize {
        let mut running = Vec::new();
        for i in 0..tasks {
            let (store, l) = (store.clone(), ledgers[i % ledgers.len()].clone());
            running.push(tokio::task::spawn_blocking(move || {
                (0..each)
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
        for t in running {
            admitted += t.await.unwrap();
        }
        admitted
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn replicas_taking_blocks_never_over_admit_and_give_back() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(SledStore::open(dir.path()).unwrap());
        // Three "replicas" over one store, each taking 10 units at a time.
        let ledgers: Vec<Arc<QuotaLedger>> = (0..3)
            .map(|_| Arc::new(QuotaLedger::with_block(10)))
            .collect();
        let q = quota(95, 0, None, 1);
        let admitted = admit_concurrently(&store, &ledgers, q, 12, 20).await;
        assert!(admitted <= 95, "over-admitted: {admitted}");
        // Stranded on other replicas: at most a block each, minus what fits.
        assert!(admitted >= 95 - 2 * 10, "admitted only {admitted}");
        for l in &ledgers {
            l.give_back(&*store).unwrap();
        }
        assert_eq!(
            QuotaLedger::default()
                .balance(&*store, "k", 0, &q, 5)
                .unwrap(),
            95 - admitted as u64,
            "every unspent unit went back"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_charges_admit_exactly_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(SledStore::open(dir.path()).unwrap());
        let q = quota(1000, 0, None, 1);
        let admitted =
            admit_concurrently(&store, &[Arc::new(QuotaLedger::default())], q, 16, 100).await;
        assert_eq!(admitted, 1000);
        assert_eq!(
            QuotaLedger::default()
                .balance(&*store, "k", 0, &q, 5)
                .unwrap(),
            0
        );
    }
}
