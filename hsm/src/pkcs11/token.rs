//! The tokens this process has opened: each found by label, logged in once, with its session
//! pool and key cache, kept in a process-wide registry; and the reconnect that rebuilds them
//! all after the HSM failed.

use std::sync::{Arc, Mutex};

use cryptoki::context::Pkcs11;
use cryptoki::mechanism::MechanismType;
use cryptoki::session::Session;
use cryptoki::slot::Slot;
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use super::context::{
    finalized_error, is_finalized, loaded, lock, ops_exclusive, ops_shared, Context, OpsGuard,
};
use super::objects::KeyCache;
use super::session::{ensure_logged_in, login_user, Pool, Pooled};
use crate::error::{map_err, Op};
use crate::HsmError;

/// Longest token label PKCS#11 can store (CK_TOKEN_INFO.label is 32 bytes, blank padded).
const MAX_TOKEN_LABEL: usize = 32;

/// Tokens opened by this process, each with its session pool. Kept until finalisation.
static TOKENS: Mutex<Vec<Arc<Token>>> = Mutex::new(Vec::new());

/// Checks a token label: PKCS#11 stores at most 32 bytes, blank padded.
pub(super) fn check_token_label(label: &str) -> Result<(), HsmError> {
    if label.is_empty() || label.len() > MAX_TOKEN_LABEL || label.ends_with(' ') {
        return Err(HsmError::Config(format!(
            "token label {label:?} must be 1 to {MAX_TOKEN_LABEL} bytes and not end in a space"
        )));
    }
    Ok(())
}

/// The slot whose initialised token carries `label`, from a fresh slot list.
pub(super) fn find_slot(pkcs11: &Pkcs11, label: &str) -> Result<Option<Slot>, HsmError> {
    let mut found = None;
    let slots = pkcs11
        .get_slots_with_token()
        .map_err(|e| map_err(e, label, Op::General))?;
    for slot in slots {
        let info = pkcs11
            .get_token_info(slot)
            .map_err(|e| map_err(e, label, Op::General))?;
        if info.token_initialized() && info.label() == label {
            if found.is_some() {
                return Err(HsmError::Config(format!(
                    "more than one token is labelled {label:?}"
                )));
            }
            found = Some(slot);
        }
    }
    Ok(found)
}

/// Digest used to compare PINs in constant time.
fn pin_digest(pin: &str) -> Zeroizing<[u8; 32]> {
    Zeroizing::new(Sha256::digest(pin.as_bytes()).into())
}

/// Constant-time equality of two byte strings (the lengths are not secret).
pub(super) fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

/// Whether an error means the HSM could not serve the call (as opposed to an answer about the
/// input: integrity, PIN, missing key, unsupported mechanism). Such a failure leaves the
/// connection suspect, so the token is reconnected before its next use.
fn is_fault(e: &HsmError) -> bool {
    matches!(e, HsmError::Unavailable(_))
}

/// Whether a token's connection can be used as it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Health {
    /// Sessions open and logged in.
    Up,
    /// A call failed for lack of the HSM: reconnect before the next use.
    Faulted,
    /// Reconnecting was refused for the PIN. Not retried: a real HSM counts failed logins and
    /// may lock the token; the PIN only changes with a restart anyway.
    PinRejected,
}

/// An opened, logged-in token of this process.
pub(super) struct Token {
    pub(super) label: String,
    pub(super) pkcs11: Pkcs11,
    /// The PIN that logged this process in; used to log in again after a reconnect and to check
    /// the PIN of later `open`s of the same token.
    pin: Zeroizing<String>,
    /// How many sessions the pool holds when the token is up.
    sessions: usize,
    pool: Pool,
    health: Mutex<Health>,
    /// The token's keys known to this process.
    pub(super) keys: KeyCache,
}

/// Opens the token `label` of the library `ctx` (`sessions` sessions, logged in with `pin`),
/// or, if this process has it open already, checks `pin` against the PIN that opened it and
/// shares it. Called with [`OPS`](super::context::OPS) held exclusively.
pub(super) fn open(
    ctx: &Context,
    label: &str,
    pin: &Zeroizing<String>,
    sessions: usize,
) -> Result<Arc<Token>, HsmError> {
    let mut tokens = lock(&TOKENS);
    match tokens.iter().find(|t| t.label == label) {
        Some(t) => {
            // Never call C_Login again here: the process is already logged in, and
            // SoftHSM 2.6 then answers CKR_USER_ALREADY_LOGGED_IN without looking at the
            // PIN (so any PIN would pass), while another HSM might count a failure against
            // the token's shared login. Compare with the PIN that did log in instead.
            if !ct_eq(pin_digest(pin).as_ref(), pin_digest(&t.pin).as_ref()) {
                tracing::debug!(token = %label, "PIN differs from the one that opened the token");
                return Err(HsmError::BadPin {
                    label: label.to_owned(),
                });
            }
            tracing::debug!(token = %label, "sharing the session pool of an open token");
            Ok(Arc::clone(t))
        }
        None => {
            let t = Arc::new(Token::open(&ctx.pkcs11, label, pin, sessions)?);
            tokens.push(Arc::clone(&t));
            Ok(t)
        }
    }
}

/// Closes the session pool of every open token and forgets them all (at finalisation).
pub(super) fn close_all() {
    let tokens = std::mem::take(&mut *lock(&TOKENS));
    for token in &tokens {
        token.pool.close();
    }
    drop(tokens);
}

impl Token {
    /// Opens a token by label: `sessions` RW sessions, logged in as User once.
    fn open(
        pkcs11: &Pkcs11,
        label: &str,
        pin: &Zeroizing<String>,
        sessions: usize,
    ) -> Result<Self, HsmError> {
        let token = Self {
            label: label.to_owned(),
            pkcs11: pkcs11.clone(),
            pin: pin.clone(),
            sessions,
            pool: Pool::new(),
            health: Mutex::new(Health::Faulted),
            keys: KeyCache::new(),
        };
        token.connect()?;
        tracing::info!(token = label, sessions, "PKCS#11 token opened");
        Ok(token)
    }

    /// Finds the token, opens its sessions, logs in and fills the pool; records the outcome in
    /// `health`. Called with [`OPS`](super::context::OPS) held exclusively (or before the
    /// token is shared).
    fn connect(&self) -> Result<(), HsmError> {
        match self.open_sessions() {
            Ok(sessions) => {
                self.pool.refill(sessions);
                *lock(&self.health) = Health::Up;
                Ok(())
            }
            Err(e) => {
                *lock(&self.health) = if matches!(e, HsmError::BadPin { .. }) {
                    Health::PinRejected
                } else {
                    Health::Faulted
                };
                Err(e)
            }
        }
    }

    fn open_sessions(&self) -> Result<Vec<Session>, HsmError> {
        let label = &self.label;
        let slot = find_slot(&self.pkcs11, label)?.ok_or_else(|| HsmError::TokenNotFound {
            label: label.clone(),
        })?;
        let mut opened = Vec::with_capacity(self.sessions);
        for _ in 0..self.sessions.max(1) {
            opened.push(
                self.pkcs11
                    .open_rw_session(slot)
                    .map_err(|e| map_err(e, label, Op::General))?,
            );
        }
        // Login state belongs to the application, not the session: once is enough.
        login_user(&opened[0], label, &self.pin)?;
        Ok(opened)
    }

    /// Whether the token offers `mechanism`.
    pub(super) fn offers(&self, mechanism: MechanismType) -> Result<bool, HsmError> {
        let slot =
            find_slot(&self.pkcs11, &self.label)?.ok_or_else(|| HsmError::TokenNotFound {
                label: self.label.clone(),
            })?;
        let list = self
            .pkcs11
            .get_mechanism_list(slot)
            .map_err(|e| map_err(e, &self.label, Op::General))?;
        Ok(list.contains(&mechanism))
    }

    /// Logs in again on `s` unless it already sees the token as User.
    pub(super) fn ensure_logged_in(&self, s: &Session) -> Result<(), HsmError> {
        ensure_logged_in(s, &self.label, &self.pin)
    }

    /// Makes sure the token can be used: reconnects first if an earlier call faulted.
    fn ready(&self) -> Result<(), HsmError> {
        let health = *lock(&self.health);
        match health {
            Health::Up => Ok(()),
            Health::PinRejected => Err(HsmError::BadPin {
                label: self.label.clone(),
            }),
            Health::Faulted => reconnect(self),
        }
    }

    /// Marks the token for reconnection before its next use.
    fn fault(&self, why: &HsmError) {
        let mut health = lock(&self.health);
        if *health == Health::Up {
            *health = Health::Faulted;
            tracing::warn!(token = %self.label, error = %why, "HSM fault; the token will be reconnected before its next use");
        }
    }

    /// Borrows a session for an ordinary call (shared hold on
    /// [`OPS`](super::context::OPS)).
    pub(super) fn acquire(&self) -> Result<Pooled<'_>, HsmError> {
        self.acquire_with(ops_shared())
    }

    /// Borrows a session with every other PKCS#11 call of the process excluded.
    pub(super) fn acquire_exclusive(&self) -> Result<Pooled<'_>, HsmError> {
        self.acquire_with(ops_exclusive())
    }

    fn acquire_with(&self, ops: OpsGuard) -> Result<Pooled<'_>, HsmError> {
        // OPS is always taken before a pooled session, so an exclusive holder only waits for
        // shared holders to return their sessions, never the other way round.
        self.pool.lend(&self.label, ops)
    }

    /// Runs one HSM operation. If an earlier call left the token faulted, reconnects first. If
    /// this one fails for lack of the HSM, marks the token faulted and, when `retry` is set
    /// (operations that are safe to repeat), reconnects and tries once more: after the HSM
    /// comes back, the first call is the one that finds the old connection dead, and it should
    /// not fail for that.
    pub(super) fn call<T>(
        &self,
        retry: bool,
        mut op: impl FnMut() -> Result<T, HsmError>,
    ) -> Result<T, HsmError> {
        self.ready()?;
        match op() {
            Err(e) if is_fault(&e) => {
                self.fault(&e);
                if !retry {
                    return Err(e);
                }
                self.ready()?;
                let again = op();
                if let Err(e) = &again {
                    if is_fault(e) {
                        self.fault(e);
                    }
                }
                again
            }
            other => other,
        }
    }
}

/// Rebuilds the PKCS#11 connection of the process after `token` faulted: closes every session,
/// finalises and re-initialises the library, then reopens and logs in the pool of every open
/// token. A lighter repair is not enough for SoftHSM 2.6: once a token's files go missing it
/// marks the token and its objects invalid for good, and only C_Initialize reads the token
/// directory afresh (measured; see docs/reliability.md). A hardware HSM whose link dropped needs
/// new sessions and object handles, which this gives it too.
///
/// Excludes every other PKCS#11 call of the process meanwhile. Returns how `token` fared.
fn reconnect(token: &Token) -> Result<(), HsmError> {
    let _ops = ops_exclusive();
    if is_finalized() {
        return Err(finalized_error());
    }
    // Another caller may have reconnected while this one waited for OPS.
    let health = *lock(&token.health);
    match health {
        Health::Up => return Ok(()),
        Health::PinRejected => {
            return Err(HsmError::BadPin {
                label: token.label.clone(),
            })
        }
        Health::Faulted => {}
    }
    let Some(ctx) = loaded() else {
        return Err(HsmError::Unavailable(
            "the PKCS#11 library is not loaded".into(),
        ));
    };
    let tokens: Vec<Arc<Token>> = lock(&TOKENS).clone();
    // Close every session before C_Finalize: session handle numbers start over after
    // C_Initialize, and dropping a stale Session later would close whichever new session got
    // its number. Every session is idle here (lent ones hold OPS shared).
    for t in &tokens {
        for s in t.pool.drain() {
            if let Err(e) = s.close() {
                tracing::debug!(token = %t.label, error = %e, "closing a session before reconnecting");
            }
        }
        t.keys.forget_handles();
        let mut health = lock(&t.health);
        if *health == Health::Up {
            *health = Health::Faulted;
        }
    }
    ctx.restart()
        .map_err(|e| map_err(e, &token.label, Op::General))?;
    let mut outcome = Ok(());
    for t in &tokens {
        if *lock(&t.health) == Health::PinRejected {
            continue;
        }
        let r = t.connect().map_err(|e| match e {
            HsmError::TokenNotFound { label } => HsmError::Unavailable(format!(
                "token {label:?} is not present (the HSM is unreachable or lost its storage)"
            )),
            other => other,
        });
        match &r {
            Ok(()) => tracing::info!(token = %t.label, "PKCS#11 token reconnected"),
            Err(e) => {
                tracing::warn!(token = %t.label, error = %e, "cannot reconnect the PKCS#11 token")
            }
        }
        if std::ptr::eq(Arc::as_ptr(t), token) {
            outcome = r;
        }
    }
    outcome
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::pkcs11::testkit::{
        both, cfg, fixture, with_key, Fixture, PIN_TOKEN, SO_PIN, TOKEN, USER_PIN,
    };
    use crate::pkcs11::Pkcs11Wrapper;
    use crate::{KeyWrapper, MacSigner, Mechanism};

    /// Tokens the fault tests break (each its own, so the others' keys stay put).
    const FAULT_TOKENS: [&str; 2] = ["ward-fault-dir", "ward-fault-objects"];

    #[test]
    fn bad_pin() {
        let f = fixture();
        // First login on a token: the token itself rejects the PIN (CKR_PIN_INCORRECT).
        let err = Pkcs11Wrapper::open(cfg(&f.module, PIN_TOKEN, "wrong-pin", Mechanism::AesGcm))
            .unwrap_err();
        assert!(
            matches!(err, HsmError::BadPin { ref label } if label == PIN_TOKEN),
            "{err:?}"
        );
        assert!(!err.to_string().contains("wrong-pin"));
        let ok =
            Pkcs11Wrapper::open(cfg(&f.module, PIN_TOKEN, USER_PIN, Mechanism::AesGcm)).unwrap();
        ok.create_master_key("t-pin").unwrap();

        // Token already open in this process: the PIN is checked against the one that
        // logged in, and the shared sessions stay logged in.
        for token in [TOKEN, PIN_TOKEN] {
            let err = Pkcs11Wrapper::open(cfg(&f.module, token, "wrong-pin", Mechanism::AesGcm))
                .unwrap_err();
            assert!(
                matches!(err, HsmError::BadPin { ref label } if label == token),
                "{err:?}"
            );
        }
        let blob = ok.wrap("t-pin", b"aad", &[3; 32]).unwrap();
        assert_eq!(
            ok.unwrap("t-pin", b"aad", &blob).unwrap().as_slice(),
            &[3; 32]
        );
        f.gcm.create_master_key("t-pin-main").unwrap();
        let blob = f.gcm.wrap("t-pin-main", b"aad", &[4; 32]).unwrap();
        assert_eq!(
            f.kwp
                .unwrap("t-pin-main", b"aad", &blob)
                .unwrap()
                .as_slice(),
            &[4; 32]
        );
    }

    #[test]
    fn unknown_token_and_module() {
        let f = fixture();
        let err = Pkcs11Wrapper::open(cfg(&f.module, "no-such-token", USER_PIN, Mechanism::AesGcm))
            .unwrap_err();
        assert!(matches!(err, HsmError::TokenNotFound { .. }), "{err:?}");
        let err = Pkcs11Wrapper::init_token(&f.module, TOKEN, SO_PIN, USER_PIN).unwrap_err();
        assert!(matches!(err, HsmError::Config(_)), "{err:?}");
        // A different module than the one this process loaded.
        let other = std::env::current_exe().unwrap();
        let err = Pkcs11Wrapper::open(cfg(&other, TOKEN, USER_PIN, Mechanism::AesGcm)).unwrap_err();
        assert!(matches!(err, HsmError::Config(_)), "{err:?}");
        let err = Pkcs11Wrapper::open(cfg(&f.module, &"x".repeat(33), USER_PIN, Mechanism::AesGcm))
            .unwrap_err();
        assert!(matches!(err, HsmError::Config(_)), "{err:?}");
    }

    /// Creates token `label` and returns a wrapper on it and its directory under `tokens` (the
    /// one whose token.object holds the label; tests in one process create tokens at once).
    fn fault_token(f: &Fixture, label: &str) -> (Pkcs11Wrapper, PathBuf) {
        Pkcs11Wrapper::init_token(&f.module, label, SO_PIN, USER_PIN).unwrap();
        let dir = std::fs::read_dir(&f.tokens)
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| {
                std::fs::read(p.join("token.object"))
                    .is_ok_and(|b| b.windows(label.len()).any(|w| w == label.as_bytes()))
            })
            .expect("init_token made a token directory");
        let w = Pkcs11Wrapper::open(cfg(&f.module, label, USER_PIN, Mechanism::AesGcm)).unwrap();
        (w, dir)
    }

    /// Every operation on `w` fails UNAVAILABLE: none reports a missing key, a forged tag or a
    /// damaged blob, and no message shows the PIN.
    fn assert_all_unavailable(w: &Pkcs11Wrapper, blob: &[u8], tag: &[u8], what: &str) {
        let results: Vec<(&str, Result<(), HsmError>)> = vec![
            ("wrap", w.wrap("t-fault", b"aad", &[1; 32]).map(drop)),
            ("unwrap", w.unwrap("t-fault", b"aad", blob).map(drop)),
            ("mac", w.mac("t-fault-mac", b"cp").map(drop)),
            (
                "verify_mac",
                w.verify_mac("t-fault-mac", b"cp", tag).map(drop),
            ),
            ("has_master_key", w.has_master_key("t-fault").map(drop)),
            (
                "has_master_key(new)",
                w.has_master_key("t-fault-new").map(drop),
            ),
            (
                "has_mac_key(new)",
                w.has_mac_key("t-fault-mac-new").map(drop),
            ),
            ("create_master_key", w.create_master_key("t-fault-new")),
        ];
        for (op, r) in results {
            match r {
                Err(HsmError::Unavailable(m)) => {
                    assert!(!m.contains(USER_PIN), "{what} {op}: {m}")
                }
                other => panic!("{what} {op}: expected Unavailable, got {other:?}"),
            }
        }
    }

    /// The token is back: every operation works on the same wrapper, old blobs and tags too,
    /// and an integrity failure is still one.
    fn assert_recovered(w: &Pkcs11Wrapper, blob: &[u8], tag: &[u8], what: &str) {
        assert_eq!(
            w.unwrap("t-fault", b"aad", blob).unwrap().as_slice(),
            &[9; 32],
            "{what}"
        );
        assert!(w.verify_mac("t-fault-mac", b"cp", tag).unwrap(), "{what}");
        assert_eq!(w.mac("t-fault-mac", b"cp").unwrap(), tag, "{what}");
        let fresh = w.wrap("t-fault", b"aad", &[2; 32]).unwrap();
        assert_eq!(
            w.unwrap("t-fault", b"aad", &fresh).unwrap().as_slice(),
            &[2; 32]
        );
        let err = w.unwrap("t-fault", b"other aad", blob).unwrap_err();
        assert!(matches!(err, HsmError::Integrity), "{what}: {err:?}");
        assert!(w.has_master_key("t-fault").unwrap(), "{what}");
        assert!(!w.has_master_key("t-fault-never").unwrap(), "{what}");
    }

    #[test]
    fn a_token_whose_directory_goes_away_fails_unavailable_and_recovers() {
        let f = fixture();
        let (w, dir) = fault_token(f, FAULT_TOKENS[0]);
        w.create_master_key("t-fault").unwrap();
        w.create_mac_key("t-fault-mac").unwrap();
        let blob = w.wrap("t-fault", b"aad", &[9; 32]).unwrap();
        let tag = w.mac("t-fault-mac", b"cp").unwrap();

        // SoftHSM then fails C_GetTokenInfo (CKR_GENERAL_ERROR), finds nothing, and calls the
        // cached handles invalid; a reconnect no longer lists the token.
        let aside = f
            .tokens
            .with_file_name(format!("aside-{}", FAULT_TOKENS[0]));
        std::fs::rename(&dir, &aside).unwrap();
        assert_all_unavailable(&w, &blob, &tag, "token directory gone");
        assert_all_unavailable(&w, &blob, &tag, "token directory still gone");
        std::fs::rename(&aside, &dir).unwrap();
        assert_recovered(&w, &blob, &tag, "token directory back");
        w.create_master_key("t-fault-new").unwrap();

        // The fixture's token was reconnected along the way; its wrappers notice nothing.
        let f = with_key("t-fault-bystander");
        for u in both(f) {
            let b = u.wrap("t-fault-bystander", b"x", &[4; 32]).unwrap();
            assert_eq!(
                u.unwrap("t-fault-bystander", b"x", &b).unwrap().as_slice(),
                &[4; 32]
            );
        }
    }

    #[test]
    fn a_token_whose_key_files_go_away_fails_unavailable_and_recovers() {
        let f = fixture();
        let (w, dir) = fault_token(f, FAULT_TOKENS[1]);
        w.create_master_key("t-fault").unwrap();
        w.create_mac_key("t-fault-mac").unwrap();
        let blob = w.wrap("t-fault", b"aad", &[9; 32]).unwrap();
        let tag = w.mac("t-fault-mac", b"cp").unwrap();

        // The token itself stays (token.object): it opens and logs in, but finds no key. Keys
        // seen before must then read as the HSM failing, not as absent.
        let aside = f
            .tokens
            .with_file_name(format!("aside-{}", FAULT_TOKENS[1]));
        std::fs::create_dir_all(&aside).unwrap();
        let keep = ["token.object", "token.lock", "generation"];
        for e in std::fs::read_dir(&dir).unwrap() {
            let e = e.unwrap();
            if !keep.iter().any(|k| e.file_name() == *k) {
                std::fs::rename(e.path(), aside.join(e.file_name())).unwrap();
            }
        }
        assert_all_unavailable(&w, &blob, &tag, "key files gone");
        for e in std::fs::read_dir(&aside).unwrap() {
            let e = e.unwrap();
            std::fs::rename(e.path(), dir.join(e.file_name())).unwrap();
        }
        assert_recovered(&w, &blob, &tag, "key files back");
    }
}
