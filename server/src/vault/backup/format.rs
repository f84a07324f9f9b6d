//! The backup file format.
//!
//! The file is the store's entries as they are on disk — keyring and index key wrapped by the
//! HSM master key, values sealed under the keyring, secret records and key-index entries with
//! their MACs — so it holds no plaintext and restoring it is useless without the same master
//! key(s). Layout (integers big-endian):
//!
//! ```text
//! "WARDBAK2"
//! { 0x01, u16 tree-name length, tree name, u32 key length, key, u32 value length, value }*
//! 0x00, u64 reserved (0), u64 entry count                      (the body ends here)
//! u16 key-label length, key label, u16 signature length, signature
//! SHA-256 of every byte before it
//! ```
//!
//! The signature is the HMAC-SHA256 the HSM computes, under its non-extractable audit
//! checkpoint key (`key label`), over `"ward.backup.v1" || SHA-256(body)`: an unkeyed digest
//! alone would let whoever can edit a backup relabel, un-revoke or re-scope what it restores
//! and recompute the digest. The trailing SHA-256 still tells a damaged file (a flipped bit, a
//! cut) from an edited one. Restore reads the whole file, checks the digest and then the
//! signature in the HSM before it creates anything.

use crate::store::{Snapshot, Tree};
use sha2::{Digest, Sha256};
use ward_hsm::{HsmError, MacSigner};

/// First bytes of every backup file.
pub const MAGIC: &[u8; 8] = b"WARDBAK2";
/// The u64 after the last entry: reserved, written as 0 (files written before 2026-12-03 hold
/// a store id counter there, which restore ignores).
const RESERVED: u64 = 0;
/// Bytes per streamed chunk.
const CHUNK: usize = 64 * 1024;
/// Largest key or value a backup may hold (far above anything Ward stores).
const MAX_ITEM: usize = 64 * 1024 * 1024;
/// Domain separation of the signed message (the same HSM key signs audit checkpoints, whose
/// message starts differently).
const SIGNATURE_DOMAIN: &[u8] = b"ward.backup.v1";

/// A backup's signature: which HSM key made it, and the tag.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signature {
    /// Label of the HSM MAC key.
    pub key_label: String,
    /// HMAC-SHA256 over [`signed_message`].
    pub mac: Vec<u8>,
}

/// The bytes the HSM signs for a backup whose body hashes to `body_digest`.
pub fn signed_message(body_digest: &[u8; 32]) -> Vec<u8> {
    [SIGNATURE_DOMAIN, body_digest.as_slice()].concat()
}

/// Signs with the HSM key `label` (a blocking HSM call).
pub fn hsm_signer<'a>(
    signer: &'a dyn MacSigner,
    label: &'a str,
) -> impl FnOnce(&[u8; 32]) -> std::result::Result<Signature, String> + 'a {
    move |digest| {
        let mac = signer
            .mac(label, &signed_message(digest))
            .map_err(|e| format!("the HSM could not sign the backup: {e}"))?;
        Ok(Signature {
            key_label: label.to_owned(),
            mac,
        })
    }
}

/// Encodes a snapshot, handing out chunks of about [`CHUNK`] bytes to `emit`, and has `sign`
/// sign the body's digest before the trailer. `Ok(false)` when `emit` stopped early; an error
/// when signing failed (nothing after the body was sent: the file is incomplete).
pub fn encode(
    snapshot: &Snapshot,
    sign: impl FnOnce(&[u8; 32]) -> std::result::Result<Signature, String>,
    mut emit: impl FnMut(Vec<u8>) -> bool,
) -> std::result::Result<bool, String> {
    let mut hash = Sha256::new();
    let mut buf = Vec::with_capacity(CHUNK + 1024);
    buf.extend_from_slice(MAGIC);
    let mut count = 0u64;
    let mut flush = |buf: &mut Vec<u8>, hash: &mut Sha256, all: bool| {
        if buf.len() >= CHUNK || (all && !buf.is_empty()) {
            hash.update(&buf[..]);
            emit(std::mem::take(buf))
        } else {
            true
        }
    };
    for (tree, items) in &snapshot.trees {
        let name = tree.name().as_bytes();
        for (k, v) in items {
            buf.push(1);
            buf.extend_from_slice(&(name.len() as u16).to_be_bytes());
            buf.extend_from_slice(name);
            buf.extend_from_slice(&(k.len() as u32).to_be_bytes());
            buf.extend_from_slice(k);
            buf.extend_from_slice(&(v.len() as u32).to_be_bytes());
            buf.extend_from_slice(v);
            count += 1;
            if !flush(&mut buf, &mut hash, false) {
                return Ok(false);
            }
        }
    }
    buf.push(0);
    buf.extend_from_slice(&RESERVED.to_be_bytes());
    buf.extend_from_slice(&count.to_be_bytes());
    // The body's digest, before anything of the trailer is hashed.
    let mut body = hash.clone();
    body.update(&buf[..]);
    let signature = sign(&body.finalize().into())?;
    put_short(&mut buf, signature.key_label.as_bytes())?;
    put_short(&mut buf, &signature.mac)?;
    if !flush(&mut buf, &mut hash, true) {
        return Ok(false);
    }
    Ok(emit(hash.finalize().to_vec()))
}

fn put_short(buf: &mut Vec<u8>, item: &[u8]) -> std::result::Result<(), String> {
    let n = u16::try_from(item.len()).map_err(|_| "signature field too long".to_string())?;
    buf.extend_from_slice(&n.to_be_bytes());
    buf.extend_from_slice(item);
    Ok(())
}

/// A backup file read back: its snapshot, and the signature still to check
/// ([`BackupFile::verify`]).
#[derive(Debug)]
pub struct BackupFile {
    /// What the backup holds.
    pub snapshot: Snapshot,
    /// The signature it carries.
    pub signature: Signature,
    /// SHA-256 of its body (what the signature covers).
    pub body_digest: [u8; 32],
}

impl BackupFile {
    /// Checks the signature in the HSM: refuses an edited backup, or one signed by a key this
    /// HSM does not hold, saying which.
    pub fn verify(&self, signer: &dyn MacSigner) -> std::result::Result<(), String> {
        let label = &self.signature.key_label;
        match signer.verify_mac(
            label,
            &signed_message(&self.body_digest),
            &self.signature.mac,
        ) {
            Ok(true) => Ok(()),
            Ok(false) => Err(format!(
                "backup signature does not verify under HSM key {label:?}: the file was edited \
                 after it was made (or made by another vault); refusing to restore it"
            )),
            Err(HsmError::MacKeyMissing { .. }) => Err(format!(
                "backup is signed with HSM key {label:?}, which the token does not hold; \
                 refusing to restore a backup whose signature cannot be checked"
            )),
            Err(e) => Err(format!("cannot check the backup's signature: {e}")),
        }
    }
}

/// Decodes a whole backup file and checks its digest (not yet its signature: see
/// [`BackupFile::verify`]).
pub fn decode(bytes: &[u8]) -> std::result::Result<BackupFile, String> {
    let body_len = bytes
        .len()
        .checked_sub(32)
        .ok_or("not a Ward backup: too short")?;
    if bytes.starts_with(b"WARDBAK1") {
        return Err(
            "backup is in the unsigned format 1, which restore no longer accepts: take a new \
             backup"
                .into(),
        );
    }
    if !bytes.starts_with(MAGIC) {
        return Err("not a Ward backup (bad magic)".into());
    }
    let (body, digest) = bytes.split_at(body_len);
    if Sha256::digest(body).as_slice() != digest {
        return Err("backup is damaged or incomplete: its SHA-256 does not match".into());
    }
    let mut r = Reader {
        bytes: body,
        at: MAGIC.len(),
    };
    let mut trees: Vec<(Tree, Vec<crate::store::Entry>)> = Vec::new();
    let mut count = 0u64;
    loop {
        match r.u8()? {
            1 => {
                let name_len = usize::from(r.u16()?);
                let name = std::str::from_utf8(r.take(name_len)?)
                    .map_err(|_| "tree name is not text".to_string())?;
                let tree = Tree::from_name(name).ok_or_else(|| {
                    format!("backup holds tree {name:?}, unknown to this version of Ward")
                })?;
                let k = r.item()?.to_vec();
                let v = r.item()?.to_vec();
                match trees.last_mut() {
                    Some((t, items)) if *t == tree => items.push((k, v)),
                    _ => trees.push((tree, vec![(k, v)])),
                }
                count += 1;
            }
            0 => {
                // Reserved (written as 0): older files carry a store id counter here,
                // which nothing reads any more.
                r.u64()?;
                if r.u64()? != count {
                    return Err("backup is inconsistent: entry count is wrong".into());
                }
                let body_digest: [u8; 32] = Sha256::digest(&body[..r.at]).into();
                let label_len = usize::from(r.u16()?);
                let key_label = std::str::from_utf8(r.take(label_len)?)
                    .map_err(|_| "signature key label is not text".to_string())?
                    .to_owned();
                let mac_len = usize::from(r.u16()?);
                let mac = r.take(mac_len)?.to_vec();
                if r.at != body.len() {
                    return Err("backup is inconsistent: bytes after the signature".into());
                }
                return Ok(BackupFile {
                    snapshot: Snapshot { trees },
                    signature: Signature { key_label, mac },
                    body_digest,
                });
            }
            t => return Err(format!("backup is malformed: record tag {t}")),
        }
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> std::result::Result<&'a [u8], String> {
        let end = self
            .at
            .checked_add(n)
            .filter(|e| *e <= self.bytes.len())
            .ok_or("backup is truncated")?;
        let s = &self.bytes[self.at..end];
        self.at = end;
        Ok(s)
    }
    fn u8(&mut self) -> std::result::Result<u8, String> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> std::result::Result<u16, String> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> std::result::Result<u32, String> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> std::result::Result<u64, String> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_be_bytes(a))
    }
    fn item(&mut self) -> std::result::Result<&'a [u8], String> {
        let n = self.u32()? as usize;
        if n > MAX_ITEM {
            return Err("backup is malformed: item too large".into());
        }
        self.take(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Snapshot {
        Snapshot {
            trees: vec![
                (Tree::Secrets, vec![(b"a".to_vec(), b"1".to_vec())]),
                (
                    Tree::Versions,
                    (0..3000u32)
                        .map(|i| (i.to_be_bytes().to_vec(), vec![7u8; 100]))
                        .collect(),
                ),
                (Tree::Meta, vec![]),
            ],
        }
    }

    fn signer() -> ward_hsm::memory::InMemoryWrapper {
        let hsm = ward_hsm::memory::InMemoryWrapper::new();
        hsm.create_mac_key("audit").unwrap();
        hsm
    }

    fn file_of(snapshot: &Snapshot, hsm: &dyn MacSigner) -> (Vec<u8>, usize) {
        let mut file = Vec::new();
        let mut chunks = 0;
        assert!(encode(snapshot, hsm_signer(hsm, "audit"), |c| {
            chunks += 1;
            file.extend(c);
            true
        })
        .unwrap());
        (file, chunks)
    }

    #[test]
    fn round_trip_and_damage_is_refused() {
        let hsm = signer();
        let (file, chunks) = file_of(&sample(), &hsm);
        assert!(chunks > 2, "streamed in chunks");
        let back = decode(&file).unwrap();
        back.verify(&hsm).unwrap();
        assert_eq!(back.signature.key_label, "audit");
        let back = back.snapshot;
        assert_eq!(back.trees.len(), 2, "empty trees carry no records");
        assert_eq!(back.trees[1].1.len(), 3000);
        for i in [0, 9, file.len() / 2, file.len() - 40, file.len() - 1] {
            let mut bad = file.clone();
            bad[i] ^= 1;
            assert!(decode(&bad).is_err(), "flip at {i}");
        }
        for n in [0, 8, 40, file.len() - 1] {
            assert!(decode(&file[..n]).is_err(), "truncated to {n}");
        }
    }

    /// An edit with the digest recomputed decodes, and then fails its signature; so does a
    /// backup signed by another HSM, or under a key this one does not hold.
    #[test]
    fn edited_backups_fail_their_signature() {
        let hsm = signer();
        let (file, _) = file_of(&sample(), &hsm);
        let redigest = |mut f: Vec<u8>| {
            let n = f.len() - 32;
            let d = Sha256::digest(&f[..n]);
            f[n..].copy_from_slice(&d);
            f
        };
        // The secret record's value "1" becomes "2".
        let at = MAGIC.len() + 1 + 2 + "secrets".len() + 4 + 1 + 4;
        assert_eq!(file[at], b'1');
        let mut edited = file.clone();
        edited[at] = b'2';
        let edited = redigest(edited);
        let back = decode(&edited).unwrap();
        let e = back.verify(&hsm).unwrap_err();
        assert!(e.contains("signature does not verify"), "{e}");
        // Unedited, the signature holds; another HSM's key of the same label refuses it.
        decode(&file).unwrap().verify(&hsm).unwrap();
        let e = decode(&file).unwrap().verify(&signer()).unwrap_err();
        assert!(e.contains("does not verify"), "{e}");
        let bare = ward_hsm::memory::InMemoryWrapper::new();
        let e = decode(&file).unwrap().verify(&bare).unwrap_err();
        assert!(e.contains("does not hold"), "{e}");
        // The old unsigned format is refused outright.
        let mut v1 = file.clone();
        v1[..8].copy_from_slice(b"WARDBAK1");
        assert!(decode(&redigest(v1)).unwrap_err().contains("unsigned"));
    }

    #[test]
    fn a_failed_signature_stops_the_stream_before_the_trailer() {
        let mut sent = 0;
        let r = encode(
            &sample(),
            |_| Err("HSM down".into()),
            |c| {
                sent += c.len();
                true
            },
        );
        assert_eq!(r.unwrap_err(), "HSM down");
        assert!(sent > 0);
    }
}
