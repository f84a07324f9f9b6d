//! Stored-record decoding: the first byte picks what the bytes are read as — one of the records
//! Ward keeps in sled (postcard behind a format byte), an audit record (its own hashed
//! encoding), or a sealed value opened under a fixed keyring. Anything unreadable must be
//! DATA_LOSS, never a panic. What reads must re-encode to a fixed point; an audit record must
//! re-encode to exactly the body it was read from, with the hash and `intact` flag that body
//! gives; a sealed value may open only to the plaintext sealed for its name and version.
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde::de::DeserializeOwned;
use serde::Serialize;
use sha2::{Digest, Sha256};
use std::fmt::Debug;
use ward_fuzz::{fields, join, refused, write_seeds};
use ward_server::audit::{self, AuditRecord, Checkpoint, Event, Stored, UsageFact};
use ward_server::envelope::{Keyring, SealedValue};
use ward_server::error::Code;
use ward_server::model::keypolicy::{Cidr, KeyPolicy, Quota, RateLimit};
use ward_server::keys::quota::LedgerRecord;
use ward_server::vault::usage::VersionUsage;
use ward_server::model::{
    KeyIndexEntry, Kind, RequestRecord, Revocation, SecretLife, SecretRecord, StateReason,
    VersionLife, VersionMeta, VersionState,
};
use ward_server::store::{decode, encode};
use ward_server::unseal::{KeyringEntry, WrappedIndexKey};
use zeroize::Zeroizing;

/// A time to judge deadlines at.
const NOW: u64 = 1_700_000_000_000;

const KINDS: [&str; 10] = [
    "secret",
    "envelope",
    "request_record",
    "key_index",
    "keyring_entry",
    "index_key",
    "quota_ledger",
    "key_usage",
    "usage_fact",
    "audit",
];

fuzz_target!(
    init: {
        write_seeds(seeds());
    },
    |data: &[u8]| {
        let Some((&selector, bytes)) = data.split_first() else {
            return;
        };
        match usize::from(selector) % KINDS.len() {
            0 => {
                if let Some(s) = same::<SecretRecord>("secret", bytes) {
                    secret(s);
                }
            }
            1 => envelope(bytes),
            2 => drop(same::<RequestRecord>("request record", bytes)),
            3 => drop(same::<KeyIndexEntry>("key index entry", bytes)),
            4 => drop(stable::<KeyringEntry>("keyring entry", bytes)),
            5 => drop(stable::<WrappedIndexKey>("index key", bytes)),
            6 => drop(same::<LedgerRecord>("quota ledger", bytes)),
            7 => drop(same::<VersionUsage>("key usage", bytes)),
            8 => drop(same::<UsageFact>("usage fact", bytes)),
            _ => audit_record(bytes),
        }
    }
);

/// Decodes a stored record: DATA_LOSS or a value whose encoding is a fixed point.
fn stable<T: Serialize + DeserializeOwned>(what: &str, bytes: &[u8]) -> Option<(T, T)> {
    match decode::<T>(what, bytes) {
        Err(e) => {
            refused(e, Code::DataLoss);
            None
        }
        Ok(v) => {
            let encoded = encode(&v);
            let again: T = decode(what, &encoded).expect("a re-encoded record decodes");
            assert_eq!(encode(&again), encoded, "{what}: encoding is not stable");
            Some((v, again))
        }
    }
}

/// [`stable`], and the value read back equals the one first read.
fn same<T: Serialize + DeserializeOwned + PartialEq + Debug>(
    what: &str,
    bytes: &[u8],
) -> Option<T> {
    let (v, again) = stable::<T>(what, bytes)?;
    assert_eq!(again, v);
    Some(v)
}

/// What every read path asks of a secret record read from storage.
fn secret(mut s: SecretRecord) {
    for v in s.versions.clone() {
        let standing = s.standing(&v, NOW);
        let _ = standing.explain();
        match s.usable(v.version, NOW) {
            Ok((_, state)) => assert!(matches!(
                state,
                VersionState::Primary | VersionState::Active
            )),
            Err(e) => assert!(
                matches!(e.code(), Code::FailedPrecondition | Code::NotFound),
                "{e:?}"
            ),
        }
    }
    let _ = s.usable(0, NOW);
    // Settling writes the states in force; settling again at the same time changes nothing.
    s.settle(NOW);
    for v in &s.versions {
        assert_eq!(s.standing(v, NOW).state, v.state);
    }
    assert!(!s.settle(NOW), "settle is not idempotent");
}

/// The fixed keyring the envelope seeds are sealed under (term 1, then term 2 current).
fn keyring() -> Keyring {
    let ring = Keyring::new(vec![(1, Zeroizing::new(vec![7u8; 32]))]).expect("keyring");
    ring.extended(2, &[9u8; 32]).expect("keyring term 2")
}

/// The only plaintext a value sealed for `name` at `version` may open to.
fn plaintext(name: &[u8], version: u64) -> Vec<u8> {
    let mut p = b"value of ".to_vec();
    p.extend_from_slice(name);
    p.extend_from_slice(&version.to_be_bytes());
    p
}

/// Input: version (8 bytes, big-endian), then name, 0x00, stored sealed value.
fn envelope(bytes: &[u8]) {
    if bytes.len() < 8 {
        return;
    }
    let (v, rest) = bytes.split_at(8);
    let version = u64::from_be_bytes(v.try_into().expect("8 bytes"));
    let parts = fields(rest, 2);
    let (Ok(name), stored) = (std::str::from_utf8(parts[0]), parts[1]) else {
        return;
    };
    let Some(sealed) = same::<SealedValue>("sealed value", stored) else {
        return;
    };
    match keyring().open(name, version, &sealed) {
        Ok(plain) => assert_eq!(&plain[..], &plaintext(name.as_bytes(), version)[..]),
        Err(e) => refused(e, Code::DataLoss),
    }
}

fn audit_record(stored: &[u8]) {
    match audit::decode(stored) {
        Err(e) => drop(e.to_string()),
        Ok(Stored {
            record,
            hash,
            intact,
        }) => {
            let (body, stored_hash) = stored.split_at(stored.len() - 32);
            assert_eq!(
                record.body(),
                body,
                "the record does not re-encode to its body"
            );
            assert_eq!(hash, <[u8; 32]>::from(Sha256::digest(body)));
            assert_eq!(intact, stored_hash == hash);
            if intact {
                assert_eq!(record.encode(), (stored.to_vec(), hash));
            }
        }
    }
}

fn seeds() -> Vec<(String, Vec<u8>)> {
    let version = |n: u64, state, reason| VersionMeta {
        version: n,
        state,
        create_ms: NOW - 1000 * n,
        grace_until_ms: (state == VersionState::Active).then_some(NOW + 500),
        fingerprint: [0xde; 16],
        term: 1,
        key_id: Some(format!("{n:016x}")),
        life: VersionLife {
            expire_ms: Some(NOW + 10_000),
            changed_ms: Some(NOW - 10),
            reason,
            replaced: Some(n.saturating_sub(1)),
        },
    };
    let secret = SecretRecord {
        name: "payments/api-key".into(),
        kind: Kind::ApiKey,
        environment: "prod".into(),
        owner: "team".into(),
        labels: [("tier".to_owned(), "1".to_owned())].into(),
        description: "billing".into(),
        scopes: vec!["billing:read".into()],
        created_by: "spiffe://admin".into(),
        create_ms: NOW - 5000,
        update_ms: NOW - 10,
        primary: 3,
        versions: vec![
            version(
                1,
                VersionState::Revoked,
                Some(StateReason::Revoked {
                    by: "admin".into(),
                    reason: "leaked".into(),
                }),
            ),
            version(
                2,
                VersionState::Active,
                Some(StateReason::Replaced { by_version: 3 }),
            ),
            version(3, VersionState::Primary, None),
        ],
        key_policy: KeyPolicy {
            allowed_cidrs: ["10.0.0.0/8", "::1"]
                .iter()
                .filter_map(|c| Cidr::parse(c).ok())
                .collect(),
            rate_limit: RateLimit::parse(10, 1000, 5).ok(),
            quota: Quota::parse(100, 50, Some(60_000), NOW, 1).ok(),
            quota_epoch: 1,
        },
        life: SecretLife {
            rotation_period_ms: Some(86_400_000),
            next_rotation_ms: Some(NOW + 1),
            rotation_due_ms: None,
            grace_ms: Some(60_000),
            expire_ms: Some(NOW + 100_000),
            revoked: Some(Revocation {
                by: "admin".into(),
                reason: "rotated out".into(),
                time_ms: NOW,
            }),
        },
    };
    let mut out = vec![(0, encode(&secret))];
    let ring = keyring();
    for (name, v) in [("payments/api-key", 3u64), ("a", 1)] {
        if let Ok(sealed) = ring.seal(name, v, &plaintext(name.as_bytes(), v)) {
            let mut input = v.to_be_bytes().to_vec();
            input.extend(join(&[name.as_bytes(), &encode(&sealed)]));
            out.push((1, input));
        }
    }
    out.push((
        2,
        encode(&RequestRecord {
            method: "PutSecret".into(),
            fingerprint: [3; 32],
            name: "a/b".into(),
            version: 2,
        }),
    ));
    out.push((
        3,
        encode(&KeyIndexEntry {
            name: "keys/x".into(),
            version: 1,
        }),
    ));
    out.push((
        4,
        encode(&KeyringEntry {
            term: 2,
            master_label: "ward-master-1".into(),
            wrapped: vec![1; 60],
            create_ms: NOW,
        }),
    ));
    out.push((
        5,
        encode(&WrappedIndexKey {
            master_label: "ward-master-1".into(),
            wrapped: vec![2; 60],
        }),
    ));
    out.push((
        6,
        encode(&LedgerRecord {
            create_ms: NOW,
            epoch: 2,
            balance: 99,
            period_start_ms: NOW,
        }),
    ));
    out.push((
        7,
        encode(&VersionUsage {
            results: vec![5, 0, 1],
            endpoints: [("/v1/charge".to_owned(), 4)].into(),
            last_used_ms: Some(NOW),
            last_client_ip: "10.1.2.3".into(),
            total: 6,
        }),
    ));
    out.push((
        8,
        encode(&UsageFact {
            last_used_ms: NOW,
            seq: 42,
        }),
    ));
    let mut call = AuditRecord::system("BatchFetchSecrets", NOW, Event::Call);
    call.seq = 7;
    call.identity = "spiffe://prod/app".into();
    call.peer = "127.0.0.1:4000".into();
    call.targets = vec![("a/b".into(), 1), ("c".into(), 0)];
    call.target_codes = vec![0, 5];
    call.request_id = "r1".into();
    call.prev_hash = [1; 32];
    let mut checkpoint = AuditRecord::system(
        audit::CHECKPOINT_METHOD,
        NOW,
        Event::Checkpoint(Checkpoint {
            covers_seq: 7,
            covers_hash: [2; 32],
            every: 1000,
            key_label: "ward-audit-1".into(),
            mac: vec![4; 32],
        }),
    );
    checkpoint.seq = 8;
    let mut prune = AuditRecord::system(audit::PRUNE_METHOD, NOW, Event::Prune { below: 5 });
    prune.seq = 9;
    for r in [call, checkpoint, prune] {
        out.push((9, r.encode().0));
    }
    out.push((9, vec![1, 0, 0]));
    out.into_iter()
        .enumerate()
        .map(|(i, (kind, bytes))| {
            let mut input = vec![kind as u8];
            input.extend(bytes);
            (format!("{}-{i}", KINDS[kind]), input)
        })
        .collect()
}
