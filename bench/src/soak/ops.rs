//! The soak's operations: each picks a slot, calls Ward and checks the answer.

use super::*;

pub(super) fn pick(slots: &[SlotLock<Slot>], r: u64) -> &SlotLock<Slot> {
    &slots[(r % slots.len() as u64) as usize]
}

pub(super) async fn fetch(shared: &Shared, client: &Client, r: u64) -> Result<(), String> {
    let slot = pick(&shared.statics, r).lock().await;
    let f = client
        .fetch_secret(slot.name("s"), 0)
        .await
        .map_err(|e| code(&e))?;
    if (f.version, f.checksum) != (slot.primary, slot.checksum) {
        return Err("WRONG_VERSION".into());
    }
    Ok(())
}

pub(super) async fn batch_fetch(shared: &Shared, client: &Client, r: u64) -> Result<(), String> {
    // Ten neighbouring slots, locked in index order (no two workers wait on each other).
    let n = shared.statics.len() as u64;
    let first = (r % (n - 9)) as usize;
    let mut slots = Vec::with_capacity(10);
    for s in &shared.statics[first..first + 10] {
        slots.push(s.lock().await);
    }
    let resp = client
        .batch_fetch(slots.iter().map(|s| (s.name("s"), 0)))
        .await
        .map_err(|e| code(&e))?;
    for (item, slot) in resp.results.iter().zip(&slots) {
        match &item.result {
            Some(ward_client::proto::batch_fetch_result::Result::Secret(f))
                if (f.version, f.checksum) == (slot.primary, slot.checksum) => {}
            Some(ward_client::proto::batch_fetch_result::Result::Error(e)) => {
                return Err(format!("item {}", code_name(tonic::Code::from(e.code))))
            }
            _ => return Err("WRONG_VERSION".into()),
        }
    }
    Ok(())
}

pub(super) async fn verify(shared: &Shared, client: &Client, r: u64) -> Result<(), String> {
    let slot = pick(&shared.keys, r).lock().await;
    let v = client
        .verify_key(VerifyKeyRequest {
            api_key: slot.key.clone(),
            required_scopes: vec!["soak".into()],
            ..Default::default()
        })
        .await
        .map_err(|e| code(&e))?;
    match v.result() {
        VerifyResult::Valid if v.version == slot.primary => Ok(()),
        VerifyResult::Valid => Err("WRONG_VERSION".into()),
        other => Err(format!("{other:?}")),
    }
}

/// A new version of a static secret, or, once it has `max_versions`, a fresh name.
pub(super) async fn put(shared: &Shared, client: &Client, r: u64) -> Result<(), String> {
    let mut slot = pick(&shared.statics, r).lock().await;
    if slot.primary >= shared.max_versions {
        retire(client, &mut slot, "s").await?;
    }
    let name = slot.name("s");
    let version = slot.primary + 1;
    let w = client
        .put_secret(PutSecretRequest {
            value: value(shared.value_size, &name, version),
            name,
            ..Default::default()
        })
        .await
        .map_err(|e| code(&e))?;
    if w.version != version {
        return Err("WRONG_VERSION".into());
    }
    (slot.primary, slot.checksum) = (w.version, w.checksum);
    Ok(())
}

/// Revokes every version of the slot's name and moves the slot to a fresh one (generation + 1,
/// no version yet).
pub(super) async fn retire(client: &Client, slot: &mut Slot, kind: &str) -> Result<(), String> {
    client
        .revoke_secret(RevokeSecretRequest {
            name: slot.name(kind),
            all_versions: true,
            reason: "soak: retired".into(),
            ..Default::default()
        })
        .await
        .map_err(|e| format!("retire {}", code(&e)))?;
    slot.generation += 1;
    (slot.primary, slot.revoked_below, slot.checksum) = (0, 1, 0);
    slot.key.clear();
    Ok(())
}

pub(super) async fn rotate(shared: &Shared, client: &Client, r: u64, op: Op) -> Result<(), String> {
    let (slots, kind) = if op == Op::RotateKey {
        (&shared.keys, "k")
    } else {
        (&shared.statics, "s")
    };
    let mut slot = pick(slots, r).lock().await;
    if slot.primary >= shared.max_versions {
        retire(client, &mut slot, kind).await?;
        return issue_or_put(shared, client, &mut slot, kind).await;
    }
    let name = slot.name(kind);
    let version = slot.primary + 1;
    let done = client
        .rotate_secret(RotateSecretRequest {
            value: if kind == "s" {
                value(shared.value_size, &name, version)
            } else {
                Vec::new()
            },
            name,
            ..Default::default()
        })
        .await
        .map_err(|e| code(&e))?;
    if done.version != version || done.previous_version != slot.primary {
        return Err("WRONG_VERSION".into());
    }
    slot.primary = done.version;
    if kind == "k" {
        slot.key = done.api_key;
    } else {
        slot.checksum = done.checksum;
    }
    Ok(())
}

/// The first version of a retired slot's fresh name.
pub(super) async fn issue_or_put(
    shared: &Shared,
    client: &Client,
    slot: &mut Slot,
    kind: &str,
) -> Result<(), String> {
    let name = slot.name(kind);
    if kind == "k" {
        let k = client
            .issue_key(IssueKeyRequest {
                name,
                scopes: vec!["soak".into()],
                ..Default::default()
            })
            .await
            .map_err(|e| code(&e))?;
        (slot.primary, slot.key) = (k.version, k.api_key);
    } else {
        let w = client
            .put_secret(PutSecretRequest {
                value: value(shared.value_size, &name, 1),
                name,
                ..Default::default()
            })
            .await
            .map_err(|e| code(&e))?;
        (slot.primary, slot.checksum) = (w.version, w.checksum);
    }
    Ok(())
}

/// Revokes the oldest version below the PRIMARY not yet revoked, if there is one.
pub(super) async fn revoke_old(
    shared: &Shared,
    client: &Client,
    r: u64,
    op: Op,
) -> Result<(), String> {
    let (slots, kind) = if op == Op::RevokeKey {
        (&shared.keys, "k")
    } else {
        (&shared.statics, "s")
    };
    let mut slot = pick(slots, r).lock().await;
    if slot.revoked_below >= slot.primary {
        return Ok(());
    }
    client
        .revoke_secret(RevokeSecretRequest {
            name: slot.name(kind),
            version: slot.revoked_below,
            reason: "soak: superseded".into(),
            ..Default::default()
        })
        .await
        .map_err(|e| code(&e))?;
    slot.revoked_below += 1;
    Ok(())
}

/// Retires a key slot and issues its fresh name.
pub(super) async fn reissue(shared: &Shared, client: &Client, r: u64) -> Result<(), String> {
    let mut slot = pick(&shared.keys, r).lock().await;
    retire(client, &mut slot, "k").await?;
    issue_or_put(shared, client, &mut slot, "k").await
}

/// Rotates the keyring every `every` until `end`.
pub(super) async fn rotate_keyring(
    shared: Arc<Shared>,
    client: Client,
    every: Duration,
    end: Instant,
) {
    let mut ticker = tokio::time::interval(every);
    ticker.tick().await;
    loop {
        ticker.tick().await;
        if Instant::now() >= end {
            return;
        }
        let started = Instant::now();
        let result = match client.rotate_keyring().await {
            Ok(r) => {
                shared.keyring_term.store(r.term, Ordering::Relaxed);
                Ok(())
            }
            Err(e) => Err(code(&e)),
        };
        shared.record(Op::RotateKeyring, started, result);
    }
}

/// Follows the audit log from its start, counting the records it receives; reopens from the
/// next sequence number if the stream ends.
pub(super) async fn follow_audit(shared: Arc<Shared>, client: Client) {
    let mut from_seq = 1;
    loop {
        let opened = client
            .stream_audit(StreamAuditRequest {
                from_seq,
                follow: true,
                ..Default::default()
            })
            .await;
        let mut stream = match opened {
            Ok(s) => s,
            Err(e) => {
                shared.record(Op::StreamAudit, Instant::now(), Err(code(&e)));
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        loop {
            match stream.message().await {
                Ok(Some(m)) => {
                    if let Some(stream_audit_response::Item::Record(r)) = m.item {
                        from_seq = r.seq + 1;
                        shared.audit_records.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Ok(None) => break,
                Err(s) => {
                    let label = code_name(s.code()).to_owned();
                    shared.record(Op::StreamAudit, Instant::now(), Err(label));
                    break;
                }
            }
        }
    }
}
