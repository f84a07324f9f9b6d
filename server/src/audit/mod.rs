//! The tamper-evident audit log: one record per call, allowed or denied, success or failure,
//! in one gapless hash chain with checkpoints signed inside the HSM.
//!
//! # What is recorded
//!
//! Sequence number, time, caller identity (from its certificate), peer address, method, the
//! secrets touched (name, version; 0 when none applies) with a per-target outcome where a call
//! answers per item, the outcome (gRPC code), the client's request id and, for API keys, the
//! non-reversible key id — never a value, a data key or an API key.
//!
//! Caller input is recorded before it is validated (a refusal is audited too), so it is bounded
//! where records are written ([`AuditRecord::bound_input`]): a target is kept as received only
//! if it is written like a name (or a watched prefix), a request id or identity only if it is
//! short, printable text, and none if it is an API key; anything else is kept as its first 16
//! characters, its length and the first 16 hex digits of its SHA-256. The targets of a refused call take at
//! most 4 KiB, those of an answered call at most 64 KiB; the rest are summed up in one last
//! target. A caller with no grant cannot make the log keep (and fsync, and retain) its input.
//!
//! # Where records live
//!
//! Each node keeps its own log in append-only segment files under `data_dir/audit/`
//! ([`segments`]: framing, group `fdatasync`, torn-tail recovery), apart from the store. A
//! read's record is durable before anything is returned ([`AuditLog::append`]); concurrent
//! calls share one `fdatasync`. If the record cannot be written the call fails UNAVAILABLE.
//!
//! # Writes and their records agree after any crash
//!
//! A change's record (kind *change*) is made durable **before** the change is committed to the
//! store, and the commit moves the store's applied mark (`meta/audit_applied`) to that record's
//! sequence number ([`AuditLog::commit`]). Changes are committed one group at a time, in
//! sequence order. So:
//!
//! - nothing is in the store without its record (the record came first);
//! - nothing is answered without its record durable (the answer waits for the store's sync,
//!   which comes after);
//! - a change record whose commit failed gets a *void* record (kind 5, naming it, with the
//!   reason) before any later commit; one whose commit a crash (or a store failure that lost
//!   it) interrupted lies after the applied mark, and at start-up (or before the next commit)
//!   every change record after the mark without a void gets one. The mark then moves to the
//!   head. A change record is therefore applied exactly when no void record names it.
//!
//! At start-up the log must reach every record the store names — the applied mark, and the
//! newest checkpoint (`meta/audit_checkpoint`: its sequence number and hash) — or the server
//! refuses to start (exit 5): segments were deleted, cut or replaced.
//!
//! # The chain
//!
//! Record `n` carries `prev_hash = H(n-1)` (`H(0)` is 32 zero bytes), and `H(n)` is the SHA-256
//! of record `n`'s canonical body. Sequence numbers come from the chain head, under one lock
//! held while the record is staged, so they are strictly consecutive; the `fdatasync` happens
//! after the lock is released, so concurrent calls share one.
//!
//! # Canonical encoding (format 2)
//!
//! Integers are big-endian; `str` and `bytes` are a u32 length followed by that many bytes
//! (strings UTF-8); `[32]` is 32 raw bytes. The body of a record is
//!
//! ```text
//! u8    format = 2
//! u64   seq
//! u64   time_ms              milliseconds since the Unix epoch
//! [32]  prev_hash
//! u8    kind                 0 call, 1 checkpoint, 2 prune, 3 alert, 4 change, 5 void
//! str   identity
//! str   peer
//! str   method
//! u32   n, then n × (str name, u64 version)          targets
//! u32   m, then m × i32                              per-target codes (m = 0: all share `code`)
//! i32   code                 gRPC code of the outcome
//! str   request_id
//! str   key_id
//! kind 1 (checkpoint): u64 covers_seq, [32] covers_hash, u64 every, str key_label, bytes mac
//! kind 2 (prune):      u64 pruned_below
//! kind 3 (alert):      str type, str id, str data
//! kind 4 (change):     nothing more (a call whose store change follows its record)
//! kind 5 (void):       u64 voided_seq (the change record whose change was not applied)
//! ```
//!
//! and nothing after it. A record is stored as `body || H(body)` (one frame of a segment file):
//! the stored hash makes an edit of a record show at that record, and the next record's
//! `prev_hash` makes a recomputed one show at the link.
//!
//! An alert record (method [`ALERT_METHOD`], identity [`SERVER_IDENTITY`]) names the secret
//! concerned as its target and the key id as `key_id`; `type` is the event type (e.g.
//! `key.new_network`), `id` the `webhook-id` its deliveries carry, `data` the JSON object of
//! the webhook body's `data` (names, environment, details: never a key or a value).
//!
//! # Checkpoints
//!
//! Every `checkpoint_every` records or `checkpoint_interval` (whichever comes first), a
//! background task reads the head `(X, H(X))` and asks the HSM for
//! `mac = HMAC-SHA256(key, "ward.audit.checkpoint.v1" || u64 X || H(X) || u64 every)` under a
//! non-extractable key; the result is appended to the chain as a checkpoint record. Whoever can
//! write the database but not use the HSM can rewrite and re-chain records, but not produce a
//! checkpoint over the new hashes, nor remove checkpoints without leaving more than
//! `3 × every + 1024` records unsigned, which verification reports (an HSM outage that long
//! looks the same).
//!
//! # Retention
//!
//! Pruning deletes whole prefixes only, up to a record `X` that a checkpoint signs, and only
//! when every record before `X` is older than the retention period; it first appends a prune
//! record naming `X`, so a log that starts later than its newest prune record says was cut.
//!
//! # Usage facts
//!
//! Successful reads ([`USE_METHODS`]) also note `usage[name, version] = (time, seq)` in memory;
//! a background task writes the facts to the store every few seconds (a fetch makes no store
//! write), and a stale-key report reads them without scanning the log. A crash loses at most
//! the last few seconds of facts, which only makes a version look unused a little longer.

pub use segments::MIN_SEGMENT_SIZE;

mod access;
mod log;
mod migrate;
pub mod segments;
#[cfg(test)]
mod tests;
mod verify;

pub use crate::config::AuditSettings;
pub use access::{code_name, AuditAccess, Outcome, StreamItem, StreamQuery, StreamReader};
pub use log::{AuditLog, PruneReport, UsageFact, APPLIED_MARK, CHECKPOINT_MARK};
pub use migrate::import;
pub use verify::{Broken, Problem, Verification};

use crate::clock::Millis;
use crate::error::Code;
use crate::identity::Peer;
use sha2::{Digest, Sha256};
use ward::keyformat::ApiKey;

/// Format byte of chained records. Format 1 (unchained postcard records from before the chain)
/// is refused like any unknown format: accepting it let whoever can write the database
/// downgrade the start of the log to unverifiable records and restart the chain from genesis
/// after them. There were no deployments to migrate.
pub const FORMAT: u8 = 2;
/// `prev_hash` of the first record of a chain.
pub const GENESIS: [u8; 32] = [0; 32];
/// Identity of the records the log writes about itself (checkpoints, pruning).
pub const SERVER_IDENTITY: &str = "ward-server";
/// Method name of checkpoint records.
pub const CHECKPOINT_METHOD: &str = "AuditCheckpoint";
/// Method name of prune records.
pub const PRUNE_METHOD: &str = "AuditPrune";
/// Method name of void records.
pub const VOID_METHOD: &str = "ChangeNotApplied";
/// Method name of alert records.
pub const ALERT_METHOD: &str = "Alert";
/// Methods whose successful targets count as a use of that secret version (the API-key
/// verification RPC belongs here too).
pub const USE_METHODS: &[&str] = &["FetchSecret", "BatchFetchSecrets"];
/// Domain separation of the signed checkpoint message.
const CHECKPOINT_DOMAIN: &[u8] = b"ward.audit.checkpoint.v1";

/// What a record is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A call to the vault.
    Call,
    /// An HSM-signed checkpoint over the chain up to a record.
    Checkpoint(Checkpoint),
    /// Records before `below` were deleted by retention.
    Prune {
        /// First sequence number kept.
        below: u64,
    },
    /// An alert Ward raised about a key or secret.
    Alert(AlertEvent),
    /// A call that changes the store: its change is committed after this record is durable,
    /// and applied unless a [`Event::Void`] record names it.
    Change,
    /// The change of record `seq` was not applied (the record's `code` says why).
    Void {
        /// The change record.
        seq: u64,
    },
}

impl Event {
    /// Whether the record is about a call (a read, a refusal or a change).
    pub fn is_call(&self) -> bool {
        matches!(self, Event::Call | Event::Change)
    }
}

/// The alert-specific part of an alert record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AlertEvent {
    /// Event type, e.g. `key.new_network`.
    pub kind: String,
    /// The `webhook-id` of its deliveries.
    pub id: String,
    /// The webhook body's `data` object, as JSON text.
    pub data: String,
}

/// The signed part of a checkpoint record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    /// The record whose hash is signed.
    pub covers_seq: u64,
    /// That record's hash.
    pub covers_hash: [u8; 32],
    /// The checkpoint interval in records when this checkpoint was made (signed).
    pub every: u64,
    /// Label of the HSM key that made `mac`.
    pub key_label: String,
    /// HMAC-SHA256 over [`Checkpoint::message`].
    pub mac: Vec<u8>,
}

impl Checkpoint {
    /// The bytes the HSM signs.
    pub fn message(covers_seq: u64, covers_hash: &[u8; 32], every: u64) -> Vec<u8> {
        let mut m = Vec::with_capacity(CHECKPOINT_DOMAIN.len() + 48);
        m.extend_from_slice(CHECKPOINT_DOMAIN);
        m.extend_from_slice(&covers_seq.to_be_bytes());
        m.extend_from_slice(covers_hash);
        m.extend_from_slice(&every.to_be_bytes());
        m
    }
}

/// One audited event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditRecord {
    /// Sequence number (consecutive from 1; also the record's key).
    pub seq: u64,
    /// When the call was decided.
    pub time_ms: Millis,
    /// Caller identity from its certificate.
    pub identity: String,
    /// Caller address.
    pub peer: String,
    /// RPC method name.
    pub method: String,
    /// Secrets touched: (name, version; 0 when none applies).
    pub targets: Vec<(String, u64)>,
    /// Per-target outcomes, for calls that answer per item; empty when all share `code`.
    pub target_codes: Vec<i32>,
    /// Outcome as a gRPC code number.
    pub code: i32,
    /// Client-supplied idempotency key, if any.
    pub request_id: String,
    /// API keys: the non-reversible key id.
    pub key_id: String,
    /// Hash of the previous record ([`GENESIS`] for the first).
    pub prev_hash: [u8; 32],
    /// What the record is about.
    pub event: Event,
    /// Store generation the record was committed under (not part of the record).
    pub(crate) generation: u64,
}

impl AuditRecord {
    /// A record for a call by `peer` to `method`, outcome not yet known.
    pub fn new(peer: &Peer, method: &str, now: Millis) -> Self {
        Self {
            seq: 0,
            time_ms: now,
            identity: peer.identity.to_string(),
            peer: peer.addr.to_string(),
            method: method.to_owned(),
            targets: Vec::new(),
            target_codes: Vec::new(),
            code: Code::Ok.as_i32(),
            request_id: String::new(),
            key_id: String::new(),
            prev_hash: GENESIS,
            event: Event::Call,
            generation: 0,
        }
    }

    /// A record the log writes about itself.
    pub fn system(method: &str, now: Millis, event: Event) -> Self {
        Self {
            identity: SERVER_IDENTITY.to_owned(),
            peer: String::new(),
            event,
            ..Self::new_bare(method, now)
        }
    }

    fn new_bare(method: &str, now: Millis) -> Self {
        Self {
            seq: 0,
            time_ms: now,
            identity: String::new(),
            peer: String::new(),
            method: method.to_owned(),
            targets: Vec::new(),
            target_codes: Vec::new(),
            code: Code::Ok.as_i32(),
            request_id: String::new(),
            key_id: String::new(),
            prev_hash: GENESIS,
            event: Event::Call,
            generation: 0,
        }
    }

    /// The outcome of target `i`: its own code if the call answered per item, else the call's.
    pub fn target_code(&self, i: usize) -> i32 {
        self.target_codes.get(i).copied().unwrap_or(self.code)
    }

    /// Bounds what the caller supplied (see the module documentation). Runs on every record
    /// as it is written, so no path can store unbounded input.
    pub(crate) fn bound_input(&mut self) {
        self.identity = as_received(&self.identity, MAX_IDENTITY_FIELD);
        self.method = as_received(&self.method, MAX_METHOD_FIELD);
        self.request_id = as_received(&self.request_id, MAX_REQUEST_ID_FIELD);
        let budget = if self.code == Code::Ok.as_i32() {
            MAX_TARGET_BYTES
        } else {
            MAX_REFUSED_TARGET_BYTES
        };
        let mut used = 0;
        let mut kept = self.targets.len();
        for (i, (name, _)) in self.targets.iter_mut().enumerate() {
            *name = target_as_received(name);
            used += name.len() + 12;
            if used > budget {
                kept = i;
                break;
            }
        }
        if kept < self.targets.len() {
            let dropped = self.targets.split_off(kept);
            let mut h = Sha256::new();
            for (name, version) in &dropped {
                h.update((name.len() as u64).to_be_bytes());
                h.update(name.as_bytes());
                h.update(version.to_be_bytes());
            }
            let digest: [u8; 32] = h.finalize().into();
            self.targets.push((
                format!(
                    "… {} more targets, sha256:{}",
                    dropped.len(),
                    hex::encode(&digest[..8])
                ),
                0,
            ));
            if !self.target_codes.is_empty() {
                let rest = self
                    .target_codes
                    .split_off(kept.min(self.target_codes.len()));
                self.target_codes
                    .push(rest.into_iter().find(|c| *c != 0).unwrap_or(0));
            }
        }
    }

    /// The canonical body (see the module documentation).
    pub fn body(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(160 + 32 * self.targets.len());
        b.push(FORMAT);
        b.extend_from_slice(&self.seq.to_be_bytes());
        b.extend_from_slice(&self.time_ms.to_be_bytes());
        b.extend_from_slice(&self.prev_hash);
        b.push(match self.event {
            Event::Call => 0,
            Event::Checkpoint(_) => 1,
            Event::Prune { .. } => 2,
            Event::Alert(_) => 3,
            Event::Change => 4,
            Event::Void { .. } => 5,
        });
        put_str(&mut b, &self.identity);
        put_str(&mut b, &self.peer);
        put_str(&mut b, &self.method);
        put_len(&mut b, self.targets.len());
        for (name, version) in &self.targets {
            put_str(&mut b, name);
            b.extend_from_slice(&version.to_be_bytes());
        }
        put_len(&mut b, self.target_codes.len());
        for c in &self.target_codes {
            b.extend_from_slice(&c.to_be_bytes());
        }
        b.extend_from_slice(&self.code.to_be_bytes());
        put_str(&mut b, &self.request_id);
        put_str(&mut b, &self.key_id);
        match &self.event {
            Event::Call => {}
            Event::Checkpoint(c) => {
                b.extend_from_slice(&c.covers_seq.to_be_bytes());
                b.extend_from_slice(&c.covers_hash);
                b.extend_from_slice(&c.every.to_be_bytes());
                put_str(&mut b, &c.key_label);
                put_bytes(&mut b, &c.mac);
            }
            Event::Prune { below } => b.extend_from_slice(&below.to_be_bytes()),
            Event::Alert(a) => {
                put_str(&mut b, &a.kind);
                put_str(&mut b, &a.id);
                put_str(&mut b, &a.data);
            }
            Event::Change => {}
            Event::Void { seq } => b.extend_from_slice(&seq.to_be_bytes()),
        }
        b
    }

    /// What is stored (`body || H(body)`) and the record's hash `H(body)`.
    pub fn encode(&self) -> (Vec<u8>, [u8; 32]) {
        let mut stored = self.body();
        let hash: [u8; 32] = Sha256::digest(&stored).into();
        stored.extend_from_slice(&hash);
        (stored, hash)
    }
}

/// Longest identity kept as received (a certificate's URI SAN can be long).
const MAX_IDENTITY_FIELD: usize = 1024;
/// Longest method kept as received.
const MAX_METHOD_FIELD: usize = 128;
/// Longest request id kept as received (a valid one is at most 128 bytes).
const MAX_REQUEST_ID_FIELD: usize = 128;
/// Bytes of targets an answered call may record.
const MAX_TARGET_BYTES: usize = 64 * 1024;
/// Bytes of targets a refused call may record.
const MAX_REFUSED_TARGET_BYTES: usize = 4 * 1024;

/// `s` itself if it is at most `max` bytes of text without control characters and is not an
/// API key (a key pasted into the wrong field must not land in the log); otherwise
/// [`digested`].
fn as_received(s: &str, max: usize) -> String {
    if s.len() <= max && !s.chars().any(char::is_control) && ApiKey::parse(s).is_err() {
        s.to_owned()
    } else {
        digested(s)
    }
}

/// A target as received: kept only if it is written in the alphabet of names and name
/// prefixes (`[a-z0-9._/-]`, and `*` for a watched prefix) and is no longer than one;
/// anything else is bad input, recorded as [`digested`].
fn target_as_received(name: &str) -> String {
    let name_like = name.len() <= crate::model::MAX_NAME_LEN + 1
        && name
            .bytes()
            .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'.' | b'_' | b'/' | b'-' | b'*'));
    if name_like && ApiKey::parse(name).is_err() {
        name.to_owned()
    } else {
        digested(name)
    }
}

/// Bad or oversized input as the log keeps it: its first 16 characters (escaped), its length
/// and the first 16 hex digits of its SHA-256 — enough to recognise it, never enough to keep
/// it, nor most of an API key pasted into the wrong field.
fn digested(s: &str) -> String {
    let head: String = s.chars().take(16).collect();
    let digest = Sha256::digest(s.as_bytes());
    format!(
        "{head:?}… ({} bytes) sha256:{}",
        s.len(),
        hex::encode(&digest[..8])
    )
}

/// A stored record, read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    /// The record as decoded.
    pub record: Box<AuditRecord>,
    /// `H(body)`, computed from the stored body.
    pub hash: [u8; 32],
    /// Whether the stored hash equals the computed one.
    pub intact: bool,
}

/// Why stored bytes are not a record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct DecodeError(String);

/// The key of record `seq` in tree `audit`.
pub fn record_key(seq: u64) -> [u8; 8] {
    seq.to_be_bytes()
}

/// The sequence number a key of tree `audit` stands for.
pub fn key_seq(key: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(key.try_into().ok()?))
}

/// Decodes stored bytes strictly: anything malformed, truncated or trailing is an error.
pub fn decode(stored: &[u8]) -> Result<Stored, DecodeError> {
    match stored.first() {
        Some(&FORMAT) => {}
        Some(f) => return Err(DecodeError(format!("unknown record format {f}"))),
        None => return Err(DecodeError("empty record".into())),
    }
    if stored.len() < 33 {
        return Err(DecodeError("record too short".into()));
    }
    let (body, stored_hash) = stored.split_at(stored.len() - 32);
    let mut r = Reader(&body[1..]);
    let seq = r.u64()?;
    let time_ms = r.u64()?;
    let prev_hash = r.hash()?;
    let kind = r.u8()?;
    let identity = r.str()?;
    let peer = r.str()?;
    let method = r.str()?;
    let n = r.len()?;
    let mut targets = Vec::with_capacity(n.min(1024));
    for _ in 0..n {
        let name = r.str()?;
        targets.push((name, r.u64()?));
    }
    let m = r.len()?;
    let mut target_codes = Vec::with_capacity(m.min(1024));
    for _ in 0..m {
        target_codes.push(r.i32()?);
    }
    let code = r.i32()?;
    let request_id = r.str()?;
    let key_id = r.str()?;
    let event = match kind {
        0 => Event::Call,
        1 => Event::Checkpoint(Checkpoint {
            covers_seq: r.u64()?,
            covers_hash: r.hash()?,
            every: r.u64()?,
            key_label: r.str()?,
            mac: r.bytes()?.to_vec(),
        }),
        2 => Event::Prune { below: r.u64()? },
        3 => Event::Alert(AlertEvent {
            kind: r.str()?,
            id: r.str()?,
            data: r.str()?,
        }),
        4 => Event::Change,
        5 => Event::Void { seq: r.u64()? },
        k => return Err(DecodeError(format!("unknown record kind {k}"))),
    };
    if !r.0.is_empty() {
        return Err(DecodeError(format!("{} bytes after the record", r.0.len())));
    }
    let hash: [u8; 32] = Sha256::digest(body).into();
    Ok(Stored {
        record: Box::new(AuditRecord {
            seq,
            time_ms,
            identity,
            peer,
            method,
            targets,
            target_codes,
            code,
            request_id,
            key_id,
            prev_hash,
            event,
            generation: 0,
        }),
        hash,
        intact: hash[..] == stored_hash[..],
    })
}

fn put_len(b: &mut Vec<u8>, n: usize) {
    // Every length here is bounded far below 4 GiB (names, identities, batch sizes).
    b.extend_from_slice(&u32::try_from(n).unwrap_or(u32::MAX).to_be_bytes());
}

fn put_str(b: &mut Vec<u8>, s: &str) {
    put_bytes(b, s.as_bytes());
}

fn put_bytes(b: &mut Vec<u8>, v: &[u8]) {
    put_len(b, v.len());
    b.extend_from_slice(v);
}

/// A cursor over untrusted bytes.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.0.len() < n {
            return Err(DecodeError("record truncated".into()));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.array::<1>()?[0])
    }

    fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_be_bytes(self.array()?))
    }

    fn i32(&mut self) -> Result<i32, DecodeError> {
        Ok(i32::from_be_bytes(self.array()?))
    }

    fn len(&mut self) -> Result<usize, DecodeError> {
        Ok(u32::from_be_bytes(self.array()?) as usize)
    }

    fn hash(&mut self) -> Result<[u8; 32], DecodeError> {
        self.array()
    }

    fn bytes(&mut self) -> Result<&'a [u8], DecodeError> {
        let n = self.len()?;
        self.take(n)
    }

    fn str(&mut self) -> Result<String, DecodeError> {
        let b = self.bytes()?;
        String::from_utf8(b.to_vec()).map_err(|_| DecodeError("a string is not UTF-8".into()))
    }
}

/// The call records of `log`, in order (for unit tests elsewhere).
#[cfg(test)]
pub(crate) fn call_records(log: &AuditLog) -> Vec<AuditRecord> {
    log.read(1, usize::MAX)
        .unwrap_or_default()
        .into_iter()
        .filter_map(|(_, r)| match r {
            Ok(Stored { record, .. }) if record.event.is_call() => Some(*record),
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod encoding_tests {
    use super::*;

    fn sample() -> AuditRecord {
        let peer = Peer {
            identity: "admin".into(),
            addr: "127.0.0.1:4000".parse().unwrap(),
        };
        let mut r = AuditRecord::new(&peer, "BatchFetchSecrets", 1_700_000_000_123);
        r.seq = 42;
        r.prev_hash = [7; 32];
        r.targets = vec![("db/pw".into(), 3), ("nope".into(), 0)];
        r.target_codes = vec![0, 5];
        r.request_id = "req-1".into();
        r
    }

    #[test]
    fn canonical_body_is_as_documented() {
        let r = sample();
        let mut want = vec![2u8];
        want.extend_from_slice(&42u64.to_be_bytes());
        want.extend_from_slice(&1_700_000_000_123u64.to_be_bytes());
        want.extend_from_slice(&[7; 32]);
        want.push(0);
        for s in ["admin", "127.0.0.1:4000", "BatchFetchSecrets"] {
            want.extend_from_slice(&(s.len() as u32).to_be_bytes());
            want.extend_from_slice(s.as_bytes());
        }
        want.extend_from_slice(&2u32.to_be_bytes());
        want.extend_from_slice(&5u32.to_be_bytes());
        want.extend_from_slice(b"db/pw");
        want.extend_from_slice(&3u64.to_be_bytes());
        want.extend_from_slice(&4u32.to_be_bytes());
        want.extend_from_slice(b"nope");
        want.extend_from_slice(&0u64.to_be_bytes());
        want.extend_from_slice(&2u32.to_be_bytes());
        want.extend_from_slice(&0i32.to_be_bytes());
        want.extend_from_slice(&5i32.to_be_bytes());
        want.extend_from_slice(&0i32.to_be_bytes());
        want.extend_from_slice(&5u32.to_be_bytes());
        want.extend_from_slice(b"req-1");
        want.extend_from_slice(&0u32.to_be_bytes());
        assert_eq!(r.body(), want);
        let (stored, hash) = r.encode();
        assert_eq!(hash, <[u8; 32]>::from(Sha256::digest(&want)));
        assert_eq!(&stored[..want.len()], &want[..]);
        assert_eq!(&stored[want.len()..], &hash[..]);
    }

    #[test]
    fn caller_input_is_bounded_before_it_is_written() {
        let huge = "a".repeat(4 << 20);
        let mut r = sample();
        r.targets = vec![(huge.clone(), 0), ("db/pw".into(), 1), ("x\ny".into(), 0)];
        r.target_codes = vec![];
        r.request_id = huge.clone();
        r.identity = format!("evil\r\n{huge}");
        r.code = Code::InvalidArgument.as_i32();
        r.bound_input();
        assert!(r.encode().0.len() < 1024, "{}", r.encode().0.len());
        assert_eq!(r.targets[1], ("db/pw".to_string(), 1));
        assert!(
            r.targets[0].0.contains("(4194304 bytes) sha256:"),
            "{:?}",
            r.targets[0]
        );
        assert!(
            r.targets[2].0.starts_with("\"x\\ny\"… (3 bytes) sha256:"),
            "{:?}",
            r.targets[2]
        );
        // An API key in a name or request id field is not kept, nor most of it.
        let key = ApiKey::generate("ward", "prod").unwrap();
        let mut k = sample();
        k.targets = vec![(key.expose().to_owned(), 0), ("App/Db".into(), 0)];
        k.target_codes = vec![];
        k.request_id = key.expose().to_owned();
        k.bound_input();
        let body = &key.expose()[10..];
        for kept in [&k.targets[0].0, &k.request_id] {
            assert!(kept.contains("sha256:"), "{kept}");
            assert!(!kept.contains(&body[6..12]), "{kept}");
        }
        assert!(k.targets[1].0.contains("sha256:"), "{:?}", k.targets[1]);
        assert!(!r.identity.contains('\n') && !r.identity.contains('\r'));
        // Many valid names on a refused call: at most 4 KiB of them, then one summary.
        let mut r = sample();
        r.targets = (0..1000).map(|i| (format!("team/{i:0>200}"), 0)).collect();
        r.target_codes = vec![];
        r.code = Code::PermissionDenied.as_i32();
        r.bound_input();
        assert!(r.targets.len() < 25, "{}", r.targets.len());
        assert!(r.targets.last().unwrap().0.starts_with("… "));
        assert!(r.encode().0.len() < 5 * 1024);
        // The same names on an answered call fit in 64 KiB less; the codes stay aligned.
        let mut r = sample();
        r.targets = (0..1000).map(|i| (format!("team/{i:0>200}"), 0)).collect();
        r.target_codes = (0..1000).map(|i| if i == 900 { 5 } else { 0 }).collect();
        r.code = 0;
        r.bound_input();
        assert_eq!(r.targets.len(), r.target_codes.len());
        assert_eq!(*r.target_codes.last().unwrap(), 5);
        assert!(r.encode().0.len() < 70 * 1024);
    }

    #[test]
    fn every_kind_round_trips() {
        let call = sample();
        let mut cp = AuditRecord::system(
            CHECKPOINT_METHOD,
            5,
            Event::Checkpoint(Checkpoint {
                covers_seq: 41,
                covers_hash: [9; 32],
                every: 100,
                key_label: "ward-audit-1".into(),
                mac: vec![1, 2, 3],
            }),
        );
        cp.seq = 43;
        let mut prune = AuditRecord::system(PRUNE_METHOD, 6, Event::Prune { below: 40 });
        prune.seq = 44;
        let mut alert = AuditRecord::system(
            ALERT_METHOD,
            7,
            Event::Alert(AlertEvent {
                kind: "key.new_network".into(),
                id: "msg_0123456789abcdef".into(),
                data: r#"{"network":"10.1.2.0/24"}"#.into(),
            }),
        );
        alert.seq = 45;
        alert.targets = vec![("app/key".into(), 2)];
        alert.key_id = "00ff00ff00ff00ff".into();
        for r in [call, cp, prune, alert] {
            let (stored, hash) = r.encode();
            let back = decode(&stored).unwrap();
            assert_eq!(*back.record, r);
            assert_eq!(back.hash, hash);
            assert!(back.intact);
        }
    }

    #[test]
    fn edits_are_detected_and_garbage_refused() {
        let (stored, _) = sample().encode();
        // Any change to the body breaks the stored hash (or the decoding).
        for i in 0..stored.len() {
            let mut bad = stored.clone();
            bad[i] ^= 0x20;
            if let Ok(back) = decode(&bad) {
                assert!(!back.intact, "byte {i}");
            }
        }
        assert!(decode(&stored[..stored.len() - 1]).is_err());
        let mut long = stored.clone();
        long.insert(stored.len() - 32, 0);
        assert!(decode(&long).is_err());
        assert!(decode(&[]).is_err());
        assert!(decode(&[9, 1, 2]).is_err());
        // The unchained format 1 is not a record: no downgrade to unverifiable records.
        assert!(decode(&[1, 0, 0]).is_err());
        // A huge length prefix does not allocate or panic.
        let mut huge = vec![2u8];
        huge.extend_from_slice(&[0; 48]);
        huge.push(0);
        huge.extend_from_slice(&u32::MAX.to_be_bytes());
        huge.extend_from_slice(&[0; 32]);
        assert!(decode(&huge).is_err());
    }
}
