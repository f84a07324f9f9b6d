//! Verification of the audit log: structure, hashes and links of every record in a range, the
//! HSM signature of every checkpoint in it, and that checkpoints and the log's start are where
//! they must be. Reports the first broken record and why.

use super::{AuditLog, Checkpoint, Event, Stored};
use crate::error::{Error, Result};
use std::collections::VecDeque;
use ward_hsm::HsmError;

/// Records read per storage scan.
const CHUNK: usize = 512;
/// Recent record hashes kept for checking checkpoints without re-reading.
const RECENT: usize = 4096;
/// Records that may be appended while a checkpoint is being signed, beyond `3 × every`.
pub const GAP_SLACK: u64 = 1024;

/// What is wrong with a broken record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Problem {
    /// The stored bytes are not a record.
    Undecodable,
    /// The record's contents do not match its stored hash: it was edited.
    Altered,
    /// The record stored at this position carries another sequence number: records were
    /// reordered or moved.
    Misplaced,
    /// The record (or a run starting with it) is not in the log: deleted.
    Missing,
    /// The record's `prev_hash` is not the hash of the record before it: something before it
    /// was replaced.
    Unlinked,
    /// A checkpoint's HSM signature does not verify: forged or altered.
    CheckpointForged,
    /// A checkpoint's signature is good but the record it signs now hashes differently: the
    /// log up to that record was rewritten and re-chained.
    CheckpointMismatch,
    /// A checkpoint signs a record that is not after the previous checkpoint's, or not before
    /// itself: an old checkpoint was replayed.
    CheckpointOrder,
    /// More records than the checkpoint interval allows follow a checkpoint without another:
    /// checkpoints were removed (or the HSM was unreachable for that long).
    Unsigned,
}

impl Problem {
    /// A short stable name (`ALTERED`, `MISSING`, …).
    pub fn name(self) -> &'static str {
        match self {
            Problem::Undecodable => "UNDECODABLE",
            Problem::Altered => "ALTERED",
            Problem::Misplaced => "MISPLACED",
            Problem::Missing => "MISSING",
            Problem::Unlinked => "UNLINKED",
            Problem::CheckpointForged => "CHECKPOINT_FORGED",
            Problem::CheckpointMismatch => "CHECKPOINT_MISMATCH",
            Problem::CheckpointOrder => "CHECKPOINT_ORDER",
            Problem::Unsigned => "UNSIGNED",
        }
    }
}

/// The first broken record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Broken {
    /// Its sequence number.
    pub seq: u64,
    /// What is wrong.
    pub problem: Problem,
    /// Why, in words.
    pub reason: String,
}

/// The result of checking a range.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Verification {
    /// First sequence number checked.
    pub from: u64,
    /// Last sequence number checked.
    pub to: u64,
    /// Chained records checked.
    pub records_checked: u64,
    /// Checkpoints whose signature and signed hash verified.
    pub checkpoints_verified: u64,
    /// Highest sequence number a verified checkpoint covers (0: none).
    pub signed_through: u64,
    /// Lowest sequence number kept.
    pub oldest: u64,
    /// Highest durable sequence number when the check began.
    pub head: u64,
    /// The first problem found, if any.
    pub first_broken: Option<Broken>,
}

impl Verification {
    /// Whether nothing was found broken.
    pub fn ok(&self) -> bool {
        self.first_broken.is_none()
    }
}

/// Running state of one verification.
struct Walk {
    expected: u64,
    prev: Option<[u8; 32]>,
    recent: VecDeque<(u64, [u8; 32])>,
    last_covered: Option<u64>,
    /// `every` of the segment being walked (signed by the checkpoint that opened it).
    every: u64,
    /// Where the first unsigned run starts counting (whole-log checks only).
    gap_base: Option<u64>,
    newest_prune: Option<u64>,
}

impl AuditLog {
    /// Checks records `from..=to` (0: the oldest kept, the durable head). HSM or storage
    /// trouble is an error (nothing could be concluded); a broken log is a result.
    pub async fn verify(&self, from: u64, to: u64) -> Result<Verification> {
        let head = self.durable_head();
        let oldest = self.oldest();
        let mut v = Verification {
            oldest,
            head,
            ..Default::default()
        };
        if head == 0 {
            return Ok(v);
        }
        if from > head {
            return Err(Error::invalid(format!(
                "from_seq {from} is beyond the end of the audit log ({head})"
            )));
        }
        if to != 0 && to < from {
            return Err(Error::invalid(format!(
                "to_seq {to} is before from_seq {from}"
            )));
        }
        let whole = from <= oldest;
        v.from = from.max(oldest);
        v.to = if to == 0 { head } else { to.min(head) };
        let mut w = Walk {
            expected: v.from,
            prev: None,
            recent: VecDeque::with_capacity(RECENT),
            last_covered: None,
            every: self.settings().checkpoint_every,
            gap_base: None,
            newest_prune: None,
        };
        if !whole {
            // Check the link into the range from the record before it, which is kept (the
            // range starts after the oldest record): without it the range's first link would go
            // unchecked.
            let before = v.from - 1;
            let problem = match self.read(before, 1)?.pop() {
                Some((seq, stored)) if seq == before => match stored {
                    Ok(Stored { hash, intact, .. }) if intact => {
                        w.prev = Some(hash);
                        None
                    }
                    Ok(_) => Some((Problem::Altered, format!("record {before} was altered: its contents do not match its stored hash"))),
                    Err(e) => Some((Problem::Undecodable, format!("record {before}: {e}"))),
                },
                _ => Some((Problem::Missing, format!("record {before} is missing"))),
            };
            if let Some((problem, reason)) = problem {
                v.first_broken = Some(Broken {
                    seq: before,
                    problem,
                    reason,
                });
                return Ok(v);
            }
        }
        if let Some(b) = self.walk(&mut v, &mut w, whole).await? {
            v.first_broken = Some(b);
            return Ok(v);
        }
        if whole {
            v.first_broken = start_problem(&v, &w);
        }
        if whole && v.first_broken.is_none() && v.to == head && v.oldest > 1 {
            // Pruning cuts only up to a record a checkpoint signs, and that checkpoint comes
            // after it, so a pruned log always holds a signature over its first record. A log
            // whose start was deleted and replaced by a forged chain (with a forged prune
            // record, and no checkpoint, which cannot be forged) has none.
            if v.signed_through < v.oldest {
                v.first_broken = Some(Broken {
                    seq: v.oldest,
                    problem: Problem::Unsigned,
                    reason: format!(
                        "the log starts at record {} (pruned), but no checkpoint in it signs a \
                         record from there on: pruning keeps the checkpoint over the first \
                         record it keeps, so the start of the log was replaced",
                        v.oldest
                    ),
                });
            }
        }
        let signed = w.last_covered.or(w.gap_base);
        if let Some(signed) = signed.filter(|_| v.first_broken.is_none() && v.to == head) {
            let limit = 3 * w.every + GAP_SLACK;
            if head - signed > limit {
                v.first_broken = Some(Broken {
                    seq: signed + limit + 1,
                    problem: Problem::Unsigned,
                    reason: format!(
                        "{} records after {signed} are not covered by any checkpoint (one is due \
                         every {} records): checkpoints were removed, or the HSM was unreachable",
                        head - signed,
                        w.every
                    ),
                });
            }
        }
        Ok(v)
    }

    async fn walk(
        &self,
        v: &mut Verification,
        w: &mut Walk,
        whole: bool,
    ) -> Result<Option<Broken>> {
        let broken = |seq, problem, reason: String| {
            Ok(Some(Broken {
                seq,
                problem,
                reason,
            }))
        };
        loop {
            let chunk = self.read(w.expected, CHUNK)?;
            let exhausted = chunk.len() < CHUNK;
            for (seq, stored) in chunk {
                if seq > v.to {
                    return Ok(None);
                }
                if seq != w.expected {
                    let which = if seq - w.expected == 1 {
                        format!("record {} is missing", w.expected)
                    } else {
                        format!("records {}..{} are missing", w.expected, seq - 1)
                    };
                    return broken(w.expected, Problem::Missing, which);
                }
                let (record, hash) = match stored {
                    Err(e) => {
                        return broken(seq, Problem::Undecodable, format!("record {seq}: {e}"))
                    }
                    Ok(Stored {
                        record,
                        hash,
                        intact,
                    }) => {
                        if !intact {
                            return broken(
                                seq,
                                Problem::Altered,
                                format!("record {seq} was altered: its contents do not match its stored hash"),
                            );
                        }
                        (record, hash)
                    }
                };
                if record.seq != seq {
                    return broken(
                        seq,
                        Problem::Misplaced,
                        format!(
                            "the record stored at {seq} is record {}: records were reordered or moved",
                            record.seq
                        ),
                    );
                }
                let link_ok = match w.prev {
                    Some(p) => record.prev_hash == p,
                    // The chain's first record starts from the genesis hash, and only it: a
                    // pruned log's first record links to a deleted record, never to genesis
                    // (a chain restarting from genesis is a forged log laid over the old one).
                    None if seq == 1 => record.prev_hash == super::GENESIS,
                    None => record.prev_hash != super::GENESIS,
                };
                if !link_ok {
                    return broken(
                        seq,
                        Problem::Unlinked,
                        format!(
                            "record {seq} does not follow record {}: its prev_hash differs from that record's hash",
                            seq - 1
                        ),
                    );
                }
                if whole && w.gap_base.is_none() {
                    w.gap_base = Some(seq - 1);
                }
                match &record.event {
                    Event::Checkpoint(c) => {
                        if let Some(b) = self.check_checkpoint(seq, c, v, w).await? {
                            return Ok(Some(b));
                        }
                    }
                    Event::Prune { below } => w.newest_prune = Some(*below),
                    Event::Call | Event::Change | Event::Void { .. } | Event::Alert(_) => {}
                }
                v.records_checked += 1;
                w.prev = Some(hash);
                if w.recent.len() == RECENT {
                    w.recent.pop_front();
                }
                w.recent.push_back((seq, hash));
                w.expected = seq + 1;
            }
            if exhausted {
                break;
            }
        }
        if w.expected <= v.to {
            let which = format!("records {}..{} are missing", w.expected, v.to);
            return broken(w.expected, Problem::Missing, which);
        }
        Ok(None)
    }

    async fn check_checkpoint(
        &self,
        seq: u64,
        c: &Checkpoint,
        v: &mut Verification,
        w: &mut Walk,
    ) -> Result<Option<Broken>> {
        let broken = |problem, reason: String| {
            Ok(Some(Broken {
                seq,
                problem,
                reason,
            }))
        };
        if c.covers_seq >= seq || w.last_covered.is_some_and(|l| c.covers_seq <= l) {
            return broken(
                Problem::CheckpointOrder,
                format!(
                    "checkpoint {seq} signs record {}, which is not between the previous checkpoint's record and itself",
                    c.covers_seq
                ),
            );
        }
        let gap_from = w.last_covered.or(w.gap_base);
        if let Some(from) = gap_from {
            let limit = 3 * w.every + GAP_SLACK;
            if c.covers_seq - from > limit {
                return Ok(Some(Broken {
                    seq: from + limit + 1,
                    problem: Problem::Unsigned,
                    reason: format!(
                        "records {}..{} are not covered by any checkpoint (one is due every {} records): checkpoints were removed, or the HSM was unreachable",
                        from + 1,
                        c.covers_seq,
                        w.every
                    ),
                }));
            }
        }
        let message = Checkpoint::message(c.covers_seq, &c.covers_hash, c.every);
        let (signer, label, tag) = (self.signer().clone(), c.key_label.clone(), c.mac.clone());
        let verdict =
            tokio::task::spawn_blocking(move || signer.verify_mac(&label, &message, &tag))
                .await
                .map_err(|e| Error::Internal(format!("HSM task: {e}")))?;
        match verdict {
            Ok(true) => {}
            Ok(false) => {
                return broken(
                    Problem::CheckpointForged,
                    format!("checkpoint {seq}: the HSM signature does not verify (forged or altered checkpoint)"),
                )
            }
            Err(HsmError::MacKeyMissing { label }) => {
                return broken(
                    Problem::CheckpointForged,
                    format!("checkpoint {seq} claims HSM key {label:?}, which the token does not hold"),
                )
            }
            Err(e) => return Err(e.into()),
        }
        let actual = match w.recent.iter().rev().find(|(s, _)| *s == c.covers_seq) {
            Some((_, h)) => Some(*h),
            // Pruned: the signature alone vouches for what came before.
            None if c.covers_seq < v.oldest => None,
            None => match self.read(c.covers_seq, 1)?.pop() {
                Some((s, Ok(Stored { hash, .. }))) if s == c.covers_seq => Some(hash),
                _ => Some([0xff; 32]),
            },
        };
        if actual.is_some_and(|h| h != c.covers_hash) {
            return broken(
                Problem::CheckpointMismatch,
                format!(
                    "checkpoint {seq}: record {} no longer has the hash the HSM signed: the log up to it was rewritten",
                    c.covers_seq
                ),
            );
        }
        v.checkpoints_verified += 1;
        v.signed_through = v.signed_through.max(c.covers_seq);
        w.last_covered = Some(c.covers_seq);
        w.every = c.every.max(1);
        Ok(None)
    }
}

/// Whether the log starts where it must: at record 1, or where the newest prune record says.
fn start_problem(v: &Verification, w: &Walk) -> Option<Broken> {
    let first = v.oldest;
    match w.newest_prune {
        Some(below) if first > below => Some(Broken {
            seq: below,
            problem: Problem::Missing,
            reason: format!(
                "records {below}..{} are missing: the newest prune record keeps everything from {below}",
                first - 1
            ),
        }),
        None if first > 1 => Some(Broken {
            seq: 1,
            problem: Problem::Missing,
            reason: format!(
                "records 1..{} are missing and no prune record accounts for them",
                first - 1
            ),
        }),
        _ => None,
    }
}
