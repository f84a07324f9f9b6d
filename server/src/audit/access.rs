//! Reading the log: who may, which records they see, and a reader that follows the log from
//! storage at the consumer's pace. Each Audit call is itself audited (one record, durable
//! before anything is returned).
//!
//! A reader never holds up the vault: writers only bump a `watch` channel (the durable head);
//! the reader scans storage from its own position whenever it has room to send, so a consumer
//! that stops reading costs one parked task and its HTTP/2 window, nothing else. Scans run off
//! the async workers, at most `scan_budget` records at a time, so a caller whose filters or
//! grants match few of many records never holds a worker.

use super::{AuditLog, AuditRecord, Event, Stored, Verification};
use crate::clock::Clock;
use crate::error::{Error, Result};
use crate::identity::Peer;
use crate::policy::{glob, Policy, Verb};
use std::collections::VecDeque;
use std::sync::Arc;
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};

/// Records read per storage scan.
const CHUNK: usize = 256;
/// Longest identity filter.
const MAX_IDENTITY_FILTER: usize = 1024;
/// Longest method filter.
const MAX_METHOD_FILTER: usize = 128;

pub use ward::status::code_name;

/// Which outcomes a stream shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Every record.
    Any,
    /// Only successes.
    Ok,
    /// Only failures (any code but OK).
    Error,
    /// Only this code.
    Code(i32),
}

impl Outcome {
    /// Parses `""` (any), `OK`, `ERROR` or a gRPC code name such as `PERMISSION_DENIED`
    /// (case-insensitive).
    pub fn parse(s: &str) -> Result<Self> {
        let upper = s.trim().to_ascii_uppercase();
        match upper.as_str() {
            "" => Ok(Outcome::Any),
            "OK" => Ok(Outcome::Ok),
            "ERROR" => Ok(Outcome::Error),
            name => ward::status::code_number(name)
                .map(Outcome::Code)
                .ok_or_else(|| {
                    Error::invalid(format!(
                        "outcome {}: expected OK, ERROR or a gRPC code name such as \
                         PERMISSION_DENIED",
                        crate::model::excerpt(s)
                    ))
                }),
        }
    }

    fn matches(self, code: i32) -> bool {
        match self {
            Outcome::Any => true,
            Outcome::Ok => code == 0,
            Outcome::Error => code != 0,
            Outcome::Code(c) => code == c,
        }
    }
}

/// What a StreamAudit caller asked for.
#[derive(Debug, Clone)]
pub struct StreamQuery {
    /// First sequence number wanted (0: see `last`).
    pub from_seq: u64,
    /// With `from_seq` 0: the last this many records, the call's own record included (0: from
    /// the oldest kept).
    pub last: u32,
    /// Keep streaming records as they become durable.
    pub follow: bool,
    /// Glob on the caller identity (empty: any).
    pub identity: String,
    /// Only records touching a secret whose name starts with this (empty: any).
    pub name_prefix: String,
    /// Only this method (empty: any).
    pub method: String,
    /// Only these outcomes (see [`Outcome::parse`]).
    pub outcome: String,
}

/// One thing a stream delivers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamItem {
    /// A record, with its hash.
    Record(Box<AuditRecord>, [u8; 32]),
    /// Records `from..=to` cannot be delivered.
    Gap {
        /// First missing sequence number.
        from: u64,
        /// Last missing sequence number.
        to: u64,
        /// True when retention deleted them; false when they are missing or unreadable
        /// (VerifyAuditLog says why).
        pruned: bool,
    },
}

/// The Audit calls' domain: authorization, their own audit records, streams and verification.
pub struct AuditAccess {
    log: Arc<AuditLog>,
    policy: Policy,
    clock: Arc<dyn Clock>,
    streams: Arc<Semaphore>,
    scan_budget: usize,
}

impl AuditAccess {
    /// Access to `log` under `policy`, with at most `max_streams` open streams.
    pub fn new(
        log: Arc<AuditLog>,
        policy: Policy,
        clock: Arc<dyn Clock>,
        max_streams: usize,
    ) -> Self {
        Self {
            log,
            policy,
            clock,
            streams: Arc::new(Semaphore::new(max_streams)),
            scan_budget: crate::config::Limits::default().scan_budget,
        }
    }

    /// Reads at most `budget` records per scan step of a stream (`limits.scan_budget`).
    pub fn with_scan_budget(mut self, budget: usize) -> Self {
        self.scan_budget = budget.max(1);
        self
    }

    /// The log.
    pub fn log(&self) -> &Arc<AuditLog> {
        &self.log
    }

    /// Opens a stream. The call's own record is durable before the first item is read.
    pub async fn stream(&self, peer: &Peer, q: StreamQuery) -> Result<StreamReader> {
        self.stream_for(peer, "StreamAudit", q).await
    }

    /// [`AuditAccess::stream`] for another RPC that reads the log (WatchAlerts), audited
    /// under that RPC's `method`.
    pub async fn stream_for(
        &self,
        peer: &Peer,
        method: &str,
        q: StreamQuery,
    ) -> Result<StreamReader> {
        let mut rec = AuditRecord::new(peer, method, self.clock.now_ms());
        let result = self.open_stream(peer, q);
        rec.code = result.as_ref().map_or_else(|e| e.code().as_i32(), |_| 0);
        self.log.append(rec).await?;
        result
    }

    fn open_stream(&self, peer: &Peer, q: StreamQuery) -> Result<StreamReader> {
        let everything = self.policy.grants_everywhere(&peer.identity, Verb::Audit);
        if !everything && !self.policy.grants_any(&peer.identity, Verb::Audit) {
            return Err(denied(peer));
        }
        if q.identity.len() > MAX_IDENTITY_FILTER {
            return Err(Error::invalid("identity filter longer than 1024 bytes"));
        }
        if q.name_prefix.len() > crate::model::MAX_NAME_LEN {
            return Err(Error::invalid("name_prefix longer than 256 bytes"));
        }
        if q.method.len() > MAX_METHOD_FILTER {
            return Err(Error::invalid("method filter longer than 128 bytes"));
        }
        let outcome = Outcome::parse(&q.outcome)?;
        if q.from_seq != 0 && q.last != 0 {
            return Err(Error::invalid("give from_seq or last, not both"));
        }
        let head = self.log.durable_head();
        if q.from_seq > head + 1 {
            return Err(Error::OutOfRange(format!(
                "from_seq {} is beyond the end of the audit log (the next record will be {})",
                q.from_seq,
                head + 1
            )));
        }
        let oldest = self.log.oldest().max(1);
        let next = match (q.from_seq, q.last) {
            (0, 0) => oldest,
            // The last `n` records, this call's own (head + 1) included.
            (0, n) => (head + 2).saturating_sub(u64::from(n)).max(oldest),
            (from, _) => from,
        };
        let permit = self.streams.clone().try_acquire_owned().map_err(|_| {
            Error::ResourceExhausted("too many audit streams are open; try again later".into())
        })?;
        Ok(StreamReader {
            scan: Arc::new(Scan {
                log: self.log.clone(),
                visibility: Visibility {
                    policy: self.policy.clone(),
                    identity: peer.identity.to_string(),
                    everything,
                },
                outcome,
                query: q.clone(),
                budget: self.scan_budget,
            }),
            head: self.log.subscribe(),
            next,
            follow: q.follow,
            pending: VecDeque::new(),
            _permit: permit,
        })
    }

    /// Verifies records `from..=to` (0: the whole log). Needs `audit` on every secret.
    pub async fn verify(&self, peer: &Peer, from: u64, to: u64) -> Result<Verification> {
        let mut rec = AuditRecord::new(peer, "VerifyAuditLog", self.clock.now_ms());
        let result = if self.policy.grants_everywhere(&peer.identity, Verb::Audit) {
            self.log.verify(from, to).await
        } else {
            Err(denied(peer))
        };
        rec.code = result.as_ref().map_or_else(|e| e.code().as_i32(), |_| 0);
        self.log.append(rec).await?;
        result
    }
}

fn denied(peer: &Peer) -> Error {
    Error::PermissionDenied {
        identity: peer.identity.to_string(),
        verb: Verb::Audit.name(),
        target: "*".into(),
    }
}

/// Which records a caller may see: all with `audit` on `*`, otherwise calls and alerts whose
/// every target its `audit` grants cover in every environment (records do not carry the targets'
/// environments, and `audit` is never granted per environment; records without a secret need
/// `audit` on `*`).
struct Visibility {
    policy: Policy,
    identity: String,
    everything: bool,
}

impl Visibility {
    fn shows(&self, r: &AuditRecord) -> bool {
        self.everything
            || (!r.targets.is_empty()
                && r.targets.iter().all(|(name, _)| {
                    self.policy
                        .allows_in_every_environment(&self.identity, Verb::Audit, name)
                }))
    }
}

/// Reads the log for one stream, from storage, at the consumer's pace.
pub struct StreamReader {
    scan: Arc<Scan>,
    head: watch::Receiver<u64>,
    next: u64,
    follow: bool,
    pending: VecDeque<StreamItem>,
    _permit: OwnedSemaphorePermit,
}

impl StreamReader {
    /// The next item; `None` once caught up when not following. Waits for new durable records
    /// when following.
    pub async fn next(&mut self) -> Result<Option<StreamItem>> {
        loop {
            if let Some(item) = self.pending.pop_front() {
                return Ok(Some(item));
            }
            let head = *self.head.borrow_and_update();
            if self.next > head {
                if !self.follow {
                    return Ok(None);
                }
                if self.head.changed().await.is_err() {
                    return Err(Error::Unavailable("the audit log closed".into()));
                }
                continue;
            }
            self.fill(head).await?;
        }
    }

    /// Reads on towards `head` into `pending`, off the async workers: until something is found
    /// or the scan budget is spent (the next call goes on from there).
    async fn fill(&mut self, head: u64) -> Result<()> {
        let (scan, from) = (self.scan.clone(), self.next);
        let (items, next) = tokio::task::spawn_blocking(move || scan.read(from, head))
            .await
            .unwrap_or_else(|e| Err(Error::Internal(format!("audit read task: {e}"))))?;
        self.pending.extend(items);
        self.next = next;
        Ok(())
    }
}

/// What one stream reads and shows; shared with its blocking scan steps.
struct Scan {
    log: Arc<AuditLog>,
    visibility: Visibility,
    outcome: Outcome,
    query: StreamQuery,
    budget: usize,
}

impl Scan {
    /// Items from `next` towards `head`, reading chunk after chunk until one yields an item
    /// or `budget` records were examined; and the sequence number to go on from (blocking).
    fn read(&self, mut next: u64, head: u64) -> Result<(Vec<StreamItem>, u64)> {
        let mut items = Vec::new();
        let mut examined = 0;
        while items.is_empty() && examined < self.budget && next <= head {
            examined += self.chunk(&mut next, head, &mut items)?;
        }
        Ok((items, next))
    }

    /// Reads the next chunk up to `head` into `items`; returns how many records it examined.
    fn chunk(&self, next: &mut u64, head: u64, items: &mut Vec<StreamItem>) -> Result<usize> {
        let oldest = self.log.oldest();
        if *next < oldest {
            items.push(StreamItem::Gap {
                from: *next,
                to: oldest - 1,
                pruned: true,
            });
            *next = oldest;
            return Ok(0);
        }
        let chunk = self.log.read(*next, CHUNK.min(self.budget))?;
        if chunk.is_empty() {
            // Durable records that are gone: pruned meanwhile, or deleted.
            let oldest = self.log.oldest();
            let to = if oldest > *next { oldest - 1 } else { head };
            items.push(StreamItem::Gap {
                from: *next,
                to,
                pruned: oldest > *next,
            });
            *next = to + 1;
            return Ok(0);
        }
        let examined = chunk.len();
        for (seq, stored) in chunk {
            if seq > *next {
                items.push(StreamItem::Gap {
                    from: *next,
                    to: seq - 1,
                    pruned: seq <= self.log.oldest(),
                });
            }
            *next = seq + 1;
            match stored {
                Ok(Stored { record, hash, .. }) => {
                    if self.wants(&record) {
                        items.push(StreamItem::Record(record, hash));
                    }
                }
                Err(_) => items.push(StreamItem::Gap {
                    from: seq,
                    to: seq,
                    pruned: false,
                }),
            }
        }
        Ok(examined)
    }

    fn wants(&self, r: &AuditRecord) -> bool {
        let q = &self.query;
        self.visibility.shows(r)
            && (q.identity.is_empty() || glob(&q.identity, &r.identity))
            && (q.method.is_empty() || q.method == r.method)
            && (q.name_prefix.is_empty()
                || r.targets.iter().any(|(n, _)| n.starts_with(&q.name_prefix)))
            && self.outcome.matches(r.code)
            && (r.event.is_call()
                || matches!(r.event, Event::Alert(_))
                || self.visibility.everything)
    }
}
