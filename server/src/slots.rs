//! Counts of things in progress per identity (calls, watch streams), each capped by its
//! caller: the transport caps calls per identity (`limits`), the watch hub its streams. A leaf:
//! imports nothing from the crate.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Things in progress (calls, streams) per identity, each capped. Entries exist only while an
/// identity has something in progress, so the map is bounded by what is open.
#[derive(Debug, Default)]
pub struct PerIdentity {
    calls: Mutex<HashMap<Arc<str>, usize>>,
}

impl PerIdentity {
    /// A slot for `identity` if it has fewer than `max` in progress; the slot is freed when the
    /// guard is dropped.
    pub fn enter(self: &Arc<Self>, identity: &Arc<str>, max: usize) -> Option<IdentitySlot> {
        let mut calls = self.calls.lock().unwrap_or_else(|e| e.into_inner());
        let n = calls.entry(identity.clone()).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(IdentitySlot {
            book: self.clone(),
            identity: identity.clone(),
        })
    }
}

/// One thing in progress for an identity; dropping it frees the slot.
#[derive(Debug)]
pub struct IdentitySlot {
    book: Arc<PerIdentity>,
    identity: Arc<str>,
}

impl Drop for IdentitySlot {
    fn drop(&mut self) {
        let mut calls = self.book.calls.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = calls.get_mut(&self.identity) {
            *n -= 1;
            if *n == 0 {
                calls.remove(&self.identity);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_slots_are_counted_and_freed() {
        let book = Arc::new(PerIdentity::default());
        let (a, b): (Arc<str>, Arc<str>) = ("a".into(), "b".into());
        let g1 = book.enter(&a, 2).unwrap();
        let g2 = book.enter(&a, 2).unwrap();
        assert!(book.enter(&a, 2).is_none(), "a third call for a");
        let g3 = book.enter(&b, 2).unwrap();
        drop(g1);
        let g4 = book.enter(&a, 2).unwrap();
        drop((g2, g3, g4));
        assert!(
            book.calls.lock().unwrap().is_empty(),
            "no entry outlives its calls"
        );
    }
}
