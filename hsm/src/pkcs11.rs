//! The PKCS#11 master-key wrapper: the process-wide library context, per-token pools of
//! logged-in sessions, master-key lookup and the self-describing wrapped-key formats.
//!
//! Wrapped blob formats (byte 0 says which; unwrap dispatches on it, whatever the configured
//! mechanism):
//!
//! * `0x01 || iv (12) || ciphertext || tag (16)` — CKM_AES_GCM through C_Encrypt/C_Decrypt,
//!   random IV from the OS, the AAD passed to the HSM, 128-bit tag.
//! * `0x02 || RFC 5649 output` — CKM_AES_KEY_WRAP_PAD through C_WrapKey/C_UnwrapKey of a
//!   temporary session object whose value is `key || SHA-256(aad)`; the digest is checked in
//!   constant time after unwrapping.
//!
//! Plaintext key material is held in `Zeroizing` buffers here. Two copies are outside this
//! crate's reach: the temporary KWP object inside the HSM (destroyed right after use), and the
//! scratch buffer cryptoki's `get_attributes` reads CKA_VALUE into before copying it out.
//!
//! Process-wide state: PKCS#11 may be initialised once per process, and the login state of a
//! token is shared by every session the process has on it (closing the last one logs out). So
//! the library context lives in a `static`, and each token opened is kept, with its session
//! pool, in a process-wide registry for the life of the process (or until [`finalize`]). A
//! second [`Pkcs11Wrapper::open`] of the same token shares that pool; its PIN is checked
//! against the one that opened the token without calling C_Login again.
//!
//! Faults at runtime: a call that fails because the HSM could not serve it marks its token
//! faulted, and the next call reconnects — every session closed, the library finalised and
//! initialised again, every open token's pool reopened and logged in — before it runs (see
//! `reconnect`). So a server survives its HSM going away and coming back without a restart.
//!
//! Concurrency: wraps, unwraps and MACs run in parallel, one pooled session each. Creating a
//! master or MAC key, opening a token, initialising one and reconnecting exclude every other
//! call of the process for their (short) duration, because SoftHSM 2.6 mishandles token-object
//! creation under concurrency (and a reconnect closes every session).
//!
//! Besides master keys the token holds HMAC keys ([`MacSigner`]): CKK_GENERIC_SECRET, 256 bits,
//! made with CKM_GENERIC_SECRET_KEY_GEN, used with CKM_SHA256_HMAC through C_Sign/C_Verify.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{
    Arc, Condvar, Mutex, MutexGuard, OnceLock, PoisonError, RwLock, RwLockReadGuard,
    RwLockWriteGuard,
};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::mechanism::{Mechanism as CkMechanism, MechanismType};
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, SessionState, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;
use rand::rngs::OsRng;
use rand::RngCore;
use sha2::{Digest, Sha256};
use zeroize::{Zeroize, Zeroizing};

use crate::error::{map_err, module_load, rv_of, Op};
use crate::{HsmError, KeyWrapper, MacSigner, Mechanism};

/// Blob tag of the AES-GCM format.
const TAG_GCM: u8 = 0x01;
/// Blob tag of the AES key-wrap-with-padding format.
const TAG_KWP: u8 = 0x02;
/// GCM IV length in bytes.
const GCM_IV_LEN: usize = 12;
/// GCM tag length in bytes.
const GCM_TAG_LEN: usize = 16;
/// Length of the AAD digest appended to the key in the KWP format.
const AAD_DIGEST_LEN: usize = 32;
/// Longest token label PKCS#11 can store (CK_TOKEN_INFO.label is 32 bytes, blank padded).
const MAX_TOKEN_LABEL: usize = 32;

/// How many sessions [`Pkcs11Config::new`] asks for.
pub const DEFAULT_SESSIONS: usize = 4;

/// How to reach the HSM: module, token, PIN, wrapping mechanism and session-pool size.
#[derive(Clone)]
pub struct Pkcs11Config {
    /// Path of the PKCS#11 shared library.
    pub module: PathBuf,
    /// Label of the token that holds the master keys (never a slot number).
    pub token_label: String,
    /// User PIN of the token.
    pub pin: Zeroizing<String>,
    /// Mechanism new wraps use.
    pub mechanism: Mechanism,
    /// Size of the session pool (at least 1; values below are raised to 1).
    pub sessions: usize,
}

impl Pkcs11Config {
    /// A configuration with AES-GCM and [`DEFAULT_SESSIONS`] sessions.
    pub fn new(
        module: impl Into<PathBuf>,
        token_label: impl Into<String>,
        pin: Zeroizing<String>,
    ) -> Self {
        Self {
            module: module.into(),
            token_label: token_label.into(),
            pin,
            mechanism: Mechanism::AesGcm,
            sessions: DEFAULT_SESSIONS,
        }
    }
}

impl fmt::Debug for Pkcs11Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pkcs11Config")
            .field("module", &self.module)
            .field("token_label", &self.token_label)
            .field("pin", &"<redacted>")
            .field("mechanism", &self.mechanism)
            .field("sessions", &self.sessions)
            .finish()
    }
}

// ---------------------------------------------------------------------------------------------
// Process-wide library context
// ---------------------------------------------------------------------------------------------

/// The one initialised PKCS#11 library of this process.
struct Context {
    pkcs11: Pkcs11,
    module: PathBuf,
}

/// The library context, set once.
static CONTEXT: OnceLock<Context> = OnceLock::new();
/// Serialises the load-and-initialise of [`CONTEXT`] (OnceLock has no stable fallible init).
static CONTEXT_INIT: Mutex<()> = Mutex::new(());
/// Set by [`finalize`]; the context is dead afterwards.
static FINALIZED: AtomicBool = AtomicBool::new(false);
/// Tokens opened by this process, each with its session pool. Kept until [`finalize`].
static TOKENS: Mutex<Vec<Arc<Token>>> = Mutex::new(Vec::new());
/// Shared by every PKCS#11 operation of this process; taken exclusively to create a token
/// object (master key), open a token or initialise one. SoftHSM 2.6 is not safe against
/// creating a token object while other calls run: now and then C_GenerateKey fails with
/// CKR_GENERAL_ERROR ("Could not initialize the attribute"), or yields a key whose attributes
/// were not all stored (SoftHSMv2 issue #573). These are rare events, so excluding everything
/// else for their duration costs nothing measurable.
static OPS: RwLock<()> = RwLock::new(());

/// A hold on [`OPS`], shared or exclusive.
enum OpsGuard {
    Shared(#[allow(dead_code)] RwLockReadGuard<'static, ()>),
    Exclusive(#[allow(dead_code)] RwLockWriteGuard<'static, ()>),
}

/// Takes [`OPS`] shared (any ordinary call).
fn ops_shared() -> OpsGuard {
    OpsGuard::Shared(OPS.read().unwrap_or_else(PoisonError::into_inner))
}

/// Takes [`OPS`] exclusively (object creation, token open or initialisation, finalisation).
fn ops_exclusive() -> OpsGuard {
    OpsGuard::Exclusive(OPS.write().unwrap_or_else(PoisonError::into_inner))
}

/// Locks a mutex whose data stays consistent across a panic (every critical section here is a
/// single push/pop/insert), so a poisoned lock is safe to reuse.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Loads and initialises the module at `module` once per process; later calls must name the
/// same module.
fn context(module: &Path) -> Result<&'static Context, HsmError> {
    if FINALIZED.load(Ordering::Acquire) {
        return Err(HsmError::Unavailable(
            "the PKCS#11 library has been finalised".into(),
        ));
    }
    let module = module.canonicalize().map_err(|e| HsmError::ModuleLoad {
        path: module.display().to_string(),
        detail: e.to_string(),
    })?;
    let check = |ctx: &'static Context| {
        if ctx.module == module {
            Ok(ctx)
        } else {
            Err(HsmError::Config(format!(
                "PKCS#11 module {} requested, but this process already loaded {}",
                module.display(),
                ctx.module.display()
            )))
        }
    };
    if let Some(ctx) = CONTEXT.get() {
        return check(ctx);
    }
    let _init = lock(&CONTEXT_INIT);
    if let Some(ctx) = CONTEXT.get() {
        return check(ctx);
    }
    let pkcs11 = Pkcs11::new(&module).map_err(|e| module_load(&module, e))?;
    // Without OS_LOCKING_OK SoftHSM turns its internal locks off.
    match pkcs11.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) => {}
        Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {
            tracing::debug!(module = %module.display(), "PKCS#11 library was already initialised");
        }
        Err(e) => return Err(module_load(&module, e)),
    }
    tracing::debug!(module = %module.display(), "PKCS#11 library initialised");
    let ctx = Context {
        pkcs11,
        module: module.clone(),
    };
    if CONTEXT.set(ctx).is_err() {
        // Unreachable: CONTEXT is only set here, under CONTEXT_INIT, after checking it is empty.
        return Err(HsmError::Unavailable(
            "PKCS#11 context initialised twice".into(),
        ));
    }
    CONTEXT.get().map(check).unwrap_or_else(|| {
        Err(HsmError::Unavailable(
            "PKCS#11 context vanished after initialisation".into(),
        ))
    })
}

/// Closes every pooled session and finalises the PKCS#11 library (C_Finalize).
///
/// Call it once at shutdown; it waits for calls in flight to finish. Afterwards every
/// wrapper call, `open` and `init_token` fails with [`HsmError::Unavailable`]: the library
/// cannot be initialised again in this process. Does nothing if the library was never loaded.
pub fn finalize() -> Result<(), HsmError> {
    let _init = lock(&CONTEXT_INIT);
    let _ops = ops_exclusive();
    let Some(ctx) = CONTEXT.get() else {
        return Ok(());
    };
    if FINALIZED.swap(true, Ordering::AcqRel) {
        return Ok(());
    }
    let tokens = std::mem::take(&mut *lock(&TOKENS));
    for token in &tokens {
        token.pool.close();
    }
    drop(tokens);
    ctx.pkcs11
        .clone()
        .finalize()
        .map_err(|e| map_err(e, "", Op::General))
}

// ---------------------------------------------------------------------------------------------
// Tokens, sessions
// ---------------------------------------------------------------------------------------------

/// Checks a token label: PKCS#11 stores at most 32 bytes, blank padded.
fn check_token_label(label: &str) -> Result<(), HsmError> {
    if label.is_empty() || label.len() > MAX_TOKEN_LABEL || label.ends_with(' ') {
        return Err(HsmError::Config(format!(
            "token label {label:?} must be 1 to {MAX_TOKEN_LABEL} bytes and not end in a space"
        )));
    }
    Ok(())
}

/// Checks a master-key label.
fn check_key_label(label: &str) -> Result<(), HsmError> {
    if label.is_empty() {
        return Err(HsmError::Config("master-key label is empty".into()));
    }
    Ok(())
}

/// The slot whose initialised token carries `label`, from a fresh slot list.
fn find_slot(pkcs11: &Pkcs11, label: &str) -> Result<Option<Slot>, HsmError> {
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
fn ct_eq(a: &[u8], b: &[u8]) -> bool {
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

/// A fixed set of sessions handed out one caller at a time (Session is Send, not Sync).
///
/// The set is empty while the token is unreachable: [`Pool::take`] then fails at once instead
/// of waiting for a session that will never come back.
struct Pool {
    state: Mutex<PoolState>,
    available: Condvar,
}

struct PoolState {
    idle: Vec<Session>,
    /// Sessions handed out and not yet returned.
    lent: usize,
    closed: bool,
}

impl Pool {
    fn new() -> Self {
        Self {
            state: Mutex::new(PoolState {
                idle: Vec::new(),
                lent: 0,
                closed: false,
            }),
            available: Condvar::new(),
        }
    }

    /// Takes a session, waiting for one to come back if all are in use.
    fn take(&self, token: &str) -> Result<Session, HsmError> {
        let mut st = lock(&self.state);
        loop {
            if st.closed {
                return Err(HsmError::Unavailable(
                    "the PKCS#11 library has been finalised".into(),
                ));
            }
            if let Some(s) = st.idle.pop() {
                st.lent += 1;
                return Ok(s);
            }
            if st.lent == 0 {
                return Err(HsmError::Unavailable(format!(
                    "no open session on token {token:?} (the HSM is unreachable)"
                )));
            }
            st = self
                .available
                .wait(st)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// Returns a session to the pool (or closes it if the pool has been closed).
    fn put(&self, session: Session) {
        let mut st = lock(&self.state);
        st.lent = st.lent.saturating_sub(1);
        if st.closed {
            drop(st);
            drop(session);
            return;
        }
        st.idle.push(session);
        drop(st);
        self.available.notify_one();
    }

    /// Takes every idle session out (to close them). Called with [`OPS`] held exclusively, when
    /// none is lent.
    fn drain(&self) -> Vec<Session> {
        std::mem::take(&mut lock(&self.state).idle)
    }

    /// Hands freshly opened sessions to the pool.
    fn refill(&self, sessions: Vec<Session>) {
        let mut st = lock(&self.state);
        if st.closed {
            return;
        }
        st.idle.extend(sessions);
        drop(st);
        self.available.notify_all();
    }

    /// Closes the idle sessions and refuses further use.
    fn close(&self) {
        let idle = {
            let mut st = lock(&self.state);
            st.closed = true;
            std::mem::take(&mut st.idle)
        };
        drop(idle);
        self.available.notify_all();
    }
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
struct Token {
    label: String,
    pkcs11: Pkcs11,
    /// The PIN that logged this process in; used to log in again after a reconnect and to check
    /// the PIN of later `open`s of the same token.
    pin: Zeroizing<String>,
    /// How many sessions the pool holds when the token is up.
    sessions: usize,
    pool: Pool,
    health: Mutex<Health>,
    /// Key handles by cache key (valid in every session of this process until a reconnect).
    handles: Mutex<Vec<(String, ObjectHandle)>>,
    /// Keys this process has found or created on the token. Ward never deletes one, so one of
    /// these going missing means the token lost its storage or is unreachable (SoftHSM then
    /// answers C_FindObjects with an empty list), not that the key never existed.
    seen: Mutex<Vec<(KeyKind, String)>>,
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
            handles: Mutex::new(Vec::new()),
            seen: Mutex::new(Vec::new()),
        };
        token.connect()?;
        tracing::info!(token = label, sessions, "PKCS#11 token opened");
        Ok(token)
    }

    /// Finds the token, opens its sessions, logs in and fills the pool; records the outcome in
    /// `health`. Called with [`OPS`] held exclusively (or before the token is shared).
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

    /// Borrows a session for an ordinary call (shared hold on [`OPS`]).
    fn acquire(&self) -> Result<Pooled<'_>, HsmError> {
        self.acquire_with(ops_shared())
    }

    /// Borrows a session with every other PKCS#11 call of the process excluded.
    fn acquire_exclusive(&self) -> Result<Pooled<'_>, HsmError> {
        self.acquire_with(ops_exclusive())
    }

    fn acquire_with(&self, ops: OpsGuard) -> Result<Pooled<'_>, HsmError> {
        // OPS is always taken before a pooled session, so an exclusive holder only waits for
        // shared holders to return their sessions, never the other way round.
        Ok(Pooled {
            token: self,
            session: Some(self.pool.take(&self.label)?),
            _ops: ops,
        })
    }

    fn cached(&self, key: &str) -> Option<ObjectHandle> {
        lock(&self.handles)
            .iter()
            .find(|(l, _)| l == key)
            .map(|(_, h)| *h)
    }

    fn remember(&self, kind: KeyKind, label: &str, handle: ObjectHandle) {
        let key = kind.cache_key(label);
        let mut handles = lock(&self.handles);
        handles.retain(|(l, _)| *l != key);
        handles.push((key, handle));
        drop(handles);
        let mut seen = lock(&self.seen);
        if !seen.iter().any(|(k, l)| *k == kind && l == label) {
            seen.push((kind, label.to_owned()));
        }
    }

    fn forget(&self, key: &str) {
        lock(&self.handles).retain(|(l, _)| l != key);
    }

    fn has_seen(&self, kind: KeyKind, label: &str) -> bool {
        lock(&self.seen)
            .iter()
            .any(|(k, l)| *k == kind && l == label)
    }
}

/// Rebuilds the PKCS#11 connection of the process after `token` faulted: closes every session,
/// finalises and re-initialises the library, then reopens and logs in the pool of every open
/// token. A lighter repair is not enough for SoftHSM 2.6: once a token's files go missing it
/// marks the token and its objects invalid for good, and only C_Initialize reads the token
/// directory afresh (measured; see RELIABILITY.md). A hardware HSM whose link dropped needs
/// new sessions and object handles, which this gives it too.
///
/// Excludes every other PKCS#11 call of the process meanwhile. Returns how `token` fared.
fn reconnect(token: &Token) -> Result<(), HsmError> {
    let _ops = ops_exclusive();
    if FINALIZED.load(Ordering::Acquire) {
        return Err(HsmError::Unavailable(
            "the PKCS#11 library has been finalised".into(),
        ));
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
    let Some(ctx) = CONTEXT.get() else {
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
        lock(&t.handles).clear();
        let mut health = lock(&t.health);
        if *health == Health::Up {
            *health = Health::Faulted;
        }
    }
    match ctx.pkcs11.clone().finalize() {
        Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiNotInitialized, _)) => {}
        Err(e) => {
            tracing::warn!(error = %e, "C_Finalize failed while reconnecting; initialising anyway")
        }
    }
    match ctx
        .pkcs11
        .initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
    {
        Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
        Err(e) => return Err(map_err(e, &token.label, Op::General)),
    }
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

/// Logs the application in as User on `s`'s token; already logged in is fine.
fn login_user(s: &Session, token: &str, pin: &Zeroizing<String>) -> Result<(), HsmError> {
    let auth = AuthPin::from(pin.as_str());
    match s.login(UserType::User, Some(&auth)) {
        Ok(()) => Ok(()),
        Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => Ok(()),
        Err(e) => Err(map_err(e, token, Op::General)),
    }
}

/// Logs in unless the session already sees the token as User.
fn ensure_logged_in(s: &Session, token: &str, pin: &Zeroizing<String>) -> Result<(), HsmError> {
    let state = s
        .get_session_info()
        .map_err(|e| map_err(e, token, Op::General))?
        .session_state();
    if matches!(state, SessionState::RwUser | SessionState::RoUser) {
        return Ok(());
    }
    tracing::warn!(token, "PKCS#11 session was not logged in; logging in again");
    login_user(s, token, pin)
}

/// A session borrowed from a token's pool; returned on drop.
struct Pooled<'t> {
    token: &'t Token,
    session: Option<Session>,
    /// Released after `drop` has returned the session to the pool.
    _ops: OpsGuard,
}

impl Pooled<'_> {
    fn session(&self) -> Result<&Session, HsmError> {
        self.session
            .as_ref()
            .ok_or_else(|| HsmError::Unavailable("pooled session already returned".into()))
    }

    /// Maps an error from this session.
    fn fail(&self, err: CkError, op: Op) -> HsmError {
        map_err(err, &self.token.label, op)
    }
}

impl Drop for Pooled<'_> {
    fn drop(&mut self) {
        if let Some(session) = self.session.take() {
            self.token.pool.put(session);
        }
    }
}

/// Overwrites the values of a template's CKA_VALUE attributes.
fn scrub(template: &mut [Attribute]) {
    for attr in template {
        if let Attribute::Value(v) = attr {
            v.zeroize();
        }
    }
}

/// A temporary session object, destroyed on drop.
struct TempObject<'s> {
    session: &'s Session,
    handle: ObjectHandle,
}

impl Drop for TempObject<'_> {
    fn drop(&mut self) {
        if let Err(e) = self.session.destroy_object(self.handle) {
            // A session object also dies with its session; nothing else to do.
            tracing::warn!(error = %e, "cannot destroy a temporary PKCS#11 object");
        }
    }
}

/// Template of the temporary generic-secret object used by the KWP format.
fn temp_key_template() -> Vec<Attribute> {
    vec![
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::GENERIC_SECRET),
        Attribute::Token(false),
        Attribute::Sensitive(false),
        Attribute::Extractable(true),
    ]
}

/// Template of a new master key (AES-256, token object, private, sensitive, not extractable).
fn master_key_template(label: &str) -> Vec<Attribute> {
    vec![
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::AES),
        Attribute::ValueLen(32.into()),
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Encrypt(true),
        Attribute::Decrypt(true),
        Attribute::Wrap(true),
        Attribute::Unwrap(true),
        Attribute::Label(label.as_bytes().to_vec()),
    ]
}

/// Search template for the master key `label`.
fn master_key_query(label: &str) -> [Attribute; 3] {
    [
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::AES),
        Attribute::Label(label.as_bytes().to_vec()),
    ]
}

/// Template of a new audit MAC key (256-bit generic secret for CKM_SHA256_HMAC: token object,
/// private, sensitive, not extractable, good for signing and verifying only).
fn mac_key_template(label: &str) -> Vec<Attribute> {
    vec![
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::GENERIC_SECRET),
        Attribute::ValueLen(32.into()),
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Sign(true),
        Attribute::Verify(true),
        Attribute::Encrypt(false),
        Attribute::Decrypt(false),
        Attribute::Wrap(false),
        Attribute::Unwrap(false),
        Attribute::Label(label.as_bytes().to_vec()),
    ]
}

/// The kinds of long-lived key this crate keeps on a token. Their handles share one cache, so
/// each kind has its own cache key space.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KeyKind {
    /// AES-256 master key (wraps key material).
    Master,
    /// Generic-secret HMAC key (signs audit checkpoints).
    Mac,
}

impl KeyKind {
    fn query(self, label: &str) -> Vec<Attribute> {
        match self {
            KeyKind::Master => master_key_query(label).to_vec(),
            KeyKind::Mac => vec![
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::KeyType(KeyType::GENERIC_SECRET),
                Attribute::Label(label.as_bytes().to_vec()),
            ],
        }
    }

    fn template(self, label: &str) -> Vec<Attribute> {
        match self {
            KeyKind::Master => master_key_template(label),
            KeyKind::Mac => mac_key_template(label),
        }
    }

    /// Key of the handle cache. Master keys keep their bare label (as before MAC keys existed).
    fn cache_key(self, label: &str) -> String {
        match self {
            KeyKind::Master => label.to_owned(),
            KeyKind::Mac => format!("\0mac\0{label}"),
        }
    }

    fn noun(self) -> &'static str {
        match self {
            KeyKind::Master => "master key",
            KeyKind::Mac => "MAC key",
        }
    }

    fn missing(self, label: &str) -> HsmError {
        let label = label.to_owned();
        match self {
            KeyKind::Master => HsmError::MasterKeyMissing { label },
            KeyKind::Mac => HsmError::MacKeyMissing { label },
        }
    }

    fn exists(self, label: &str) -> HsmError {
        let label = label.to_owned();
        match self {
            KeyKind::Master => HsmError::MasterKeyExists { label },
            KeyKind::Mac => HsmError::MacKeyExists { label },
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The wrapper
// ---------------------------------------------------------------------------------------------

/// A [`KeyWrapper`] whose master keys live on a PKCS#11 token (SoftHSM or a real HSM).
///
/// Cheap to share: every call borrows a session from the token's pool and blocks until one is
/// free. Async callers run the calls in `spawn_blocking`.
pub struct Pkcs11Wrapper {
    token: Arc<Token>,
    mechanism: Mechanism,
}

impl fmt::Debug for Pkcs11Wrapper {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pkcs11Wrapper")
            .field("token", &self.token.label)
            .field("mechanism", &self.mechanism)
            .finish()
    }
}

impl Pkcs11Wrapper {
    /// Opens the token `cfg.token_label` (loading and initialising the module on first use) and
    /// logs in; a second open of the same token in this process shares its session pool (its
    /// `sessions` setting is then ignored) after checking its PIN against the first one.
    pub fn open(cfg: Pkcs11Config) -> Result<Self, HsmError> {
        check_token_label(&cfg.token_label)?;
        let ctx = context(&cfg.module)?;
        let _ops = ops_exclusive();
        let mut tokens = lock(&TOKENS);
        let token = match tokens.iter().find(|t| t.label == cfg.token_label) {
            Some(t) => {
                // Never call C_Login again here: the process is already logged in, and
                // SoftHSM 2.6 then answers CKR_USER_ALREADY_LOGGED_IN without looking at the
                // PIN (so any PIN would pass), while another HSM might count a failure against
                // the token's shared login. Compare with the PIN that did log in instead.
                if !ct_eq(pin_digest(&cfg.pin).as_ref(), pin_digest(&t.pin).as_ref()) {
                    tracing::debug!(token = %cfg.token_label, "PIN differs from the one that opened the token");
                    return Err(HsmError::BadPin {
                        label: cfg.token_label.clone(),
                    });
                }
                tracing::debug!(token = %cfg.token_label, "sharing the session pool of an open token");
                Arc::clone(t)
            }
            None => {
                let t = Arc::new(Token::open(
                    &ctx.pkcs11,
                    &cfg.token_label,
                    &cfg.pin,
                    cfg.sessions.max(1),
                )?);
                tokens.push(Arc::clone(&t));
                t
            }
        };
        drop(tokens);
        let wrapper = Self {
            token,
            mechanism: cfg.mechanism,
        };
        wrapper.check_mechanism()?;
        Ok(wrapper)
    }

    /// Creates and initialises a new token labelled `label` on a free slot, with an SO PIN and
    /// a User PIN, entirely through PKCS#11 (no PIN on a command line).
    ///
    /// Fails with [`HsmError::Config`] if a token with that label already exists or no slot is
    /// free. Loads and initialises the module like [`Pkcs11Wrapper::open`].
    pub fn init_token(
        module: &Path,
        label: &str,
        so_pin: &str,
        user_pin: &str,
    ) -> Result<(), HsmError> {
        check_token_label(label)?;
        let ctx = context(module)?;
        let pkcs11 = &ctx.pkcs11;
        // Exclude every other call (and open()) while slots are renumbered.
        let _ops = ops_exclusive();
        let _tokens = lock(&TOKENS);
        if find_slot(pkcs11, label)?.is_some() {
            return Err(HsmError::Config(format!(
                "a token labelled {label:?} already exists"
            )));
        }
        let mut free = None;
        for slot in pkcs11
            .get_slots_with_token()
            .map_err(|e| map_err(e, label, Op::General))?
        {
            let info = pkcs11
                .get_token_info(slot)
                .map_err(|e| map_err(e, label, Op::General))?;
            if !info.token_initialized() {
                free = Some(slot);
                break;
            }
        }
        let free = free.ok_or_else(|| {
            HsmError::Config("no slot with an uninitialised token is available".into())
        })?;
        let so = AuthPin::from(so_pin);
        pkcs11
            .init_token(free, &so, label)
            .map_err(|e| map_err(e, label, Op::General))?;
        // SoftHSM moves an initialised token to a new slot id: find it again by label.
        let slot = find_slot(pkcs11, label)?.ok_or_else(|| HsmError::TokenNotFound {
            label: label.to_owned(),
        })?;
        let session = pkcs11
            .open_rw_session(slot)
            .map_err(|e| map_err(e, label, Op::General))?;
        session
            .login(UserType::So, Some(&so))
            .map_err(|e| map_err(e, label, Op::General))?;
        let user = AuthPin::from(user_pin);
        let init = session
            .init_pin(&user)
            .map_err(|e| map_err(e, label, Op::General));
        if let Err(e) = session.logout() {
            tracing::debug!(token = label, error = %e, "SO logout after C_InitPIN failed");
        }
        init?;
        tracing::info!(token = label, "PKCS#11 token initialised");
        Ok(())
    }

    /// Fails with [`HsmError::Unsupported`] if the token lacks the configured mechanism.
    fn check_mechanism(&self) -> Result<(), HsmError> {
        let wanted = match self.mechanism {
            Mechanism::AesGcm => MechanismType::AES_GCM,
            Mechanism::AesKeyWrapPad => MechanismType::AES_KEY_WRAP_PAD,
        };
        let token = &self.token;
        let slot =
            find_slot(&token.pkcs11, &token.label)?.ok_or_else(|| HsmError::TokenNotFound {
                label: token.label.clone(),
            })?;
        let list = token
            .pkcs11
            .get_mechanism_list(slot)
            .map_err(|e| map_err(e, &token.label, Op::General))?;
        if list.contains(&wanted) {
            Ok(())
        } else {
            Err(HsmError::Unsupported(format!(
                "token {:?} does not offer {wanted}",
                token.label
            )))
        }
    }

    /// Finds the master key `label`, from the cache or the token. `Ok(None)` if absent.
    fn lookup(
        &self,
        s: &mut Pooled<'_>,
        label: &str,
        use_cache: bool,
    ) -> Result<Option<ObjectHandle>, HsmError> {
        self.lookup_kind(s, KeyKind::Master, label, use_cache)
    }

    /// Finds the key of `kind` labelled `label`, from the cache or the token. `Ok(None)` if
    /// absent.
    fn lookup_kind(
        &self,
        s: &mut Pooled<'_>,
        kind: KeyKind,
        label: &str,
        use_cache: bool,
    ) -> Result<Option<ObjectHandle>, HsmError> {
        let cache_key = kind.cache_key(label);
        if use_cache {
            if let Some(h) = self.token.cached(&cache_key) {
                return Ok(Some(h));
            }
        }
        let query = kind.query(label);
        let mut found = match s.session()?.find_objects(&query) {
            Ok(f) => f,
            Err(e) => return Err(s.fail(e, Op::General)),
        };
        if found.is_empty() {
            // Private objects are invisible when logged out: make sure "absent" means absent.
            ensure_logged_in(s.session()?, &self.token.label, &self.token.pin)?;
            found = match s.session()?.find_objects(&query) {
                Ok(f) => f,
                Err(e) => return Err(s.fail(e, Op::General)),
            };
        }
        match found.as_slice() {
            [] => {
                self.token.forget(&cache_key);
                self.confirm_absent(s, kind, label)?;
                Ok(None)
            }
            [h] => {
                self.token.remember(kind, label, *h);
                Ok(Some(*h))
            }
            _ => Err(HsmError::Config(format!(
                "more than one {} is labelled {label:?}",
                kind.noun()
            ))),
        }
    }

    /// Decides whether an empty C_FindObjects means the key is absent or the token is failing.
    /// SoftHSM 2.6 answers a search with an empty list (not an error) once its token files are
    /// gone, so "absent" is believed only if the key was never seen here, the token still
    /// answers C_GetTokenInfo, and every key seen so far is still found. Otherwise the HSM is
    /// unavailable, which matters: a missing audit key would read as a forged checkpoint.
    fn confirm_absent(&self, s: &Pooled<'_>, kind: KeyKind, label: &str) -> Result<(), HsmError> {
        let token = &self.token.label;
        let lost = |kind: KeyKind, label: &str| {
            HsmError::Unavailable(format!(
                "{} {label:?}, found earlier, is no longer visible on token {token:?} (the HSM \
                 is unreachable or lost its storage)",
                kind.noun()
            ))
        };
        if self.token.has_seen(kind, label) {
            return Err(lost(kind, label));
        }
        let session = s.session()?;
        let slot = session
            .get_session_info()
            .map_err(|e| s.fail(e, Op::General))?
            .slot_id();
        self.token
            .pkcs11
            .get_token_info(slot)
            .map_err(|e| s.fail(e, Op::General))?;
        let seen = lock(&self.token.seen).clone();
        for (k, l) in seen {
            let found = session
                .find_objects(&k.query(&l))
                .map_err(|e| s.fail(e, Op::General))?;
            if found.is_empty() {
                return Err(lost(k, &l));
            }
        }
        Ok(())
    }

    /// Runs `f` with a pooled session and the handle of master key `label`, refreshing a
    /// stale cached handle once.
    fn with_key<T>(
        &self,
        label: &str,
        op: Op,
        f: impl FnMut(&Session, ObjectHandle) -> Result<T, CkError>,
    ) -> Result<T, HsmError> {
        self.with_kind(KeyKind::Master, label, op, f)
    }

    /// Runs `f` with a pooled session and the handle of the key of `kind` labelled `label`,
    /// refreshing a stale cached handle once, and reconnecting once if the HSM failed.
    fn with_kind<T>(
        &self,
        kind: KeyKind,
        label: &str,
        op: Op,
        mut f: impl FnMut(&Session, ObjectHandle) -> Result<T, CkError>,
    ) -> Result<T, HsmError> {
        check_key_label(label)?;
        self.call(true, || {
            let mut s = self.token.acquire()?;
            let from_cache = self.token.cached(&kind.cache_key(label)).is_some();
            let handle = self
                .lookup_kind(&mut s, kind, label, true)?
                .ok_or_else(|| kind.missing(label))?;
            match f(s.session()?, handle) {
                Ok(v) => Ok(v),
                Err(e)
                    if from_cache
                        && matches!(
                            rv_of(&e),
                            Some(RvError::KeyHandleInvalid | RvError::ObjectHandleInvalid)
                        ) =>
                {
                    tracing::debug!(token = %self.token.label, key = label, "stale key handle; looking it up again");
                    self.token.forget(&kind.cache_key(label));
                    let handle = self
                        .lookup_kind(&mut s, kind, label, false)?
                        .ok_or_else(|| kind.missing(label))?;
                    let r = f(s.session()?, handle);
                    r.map_err(|e| s.fail(e, op))
                }
                Err(e) => Err(s.fail(e, op)),
            }
        })
    }

    /// Runs one HSM operation. If an earlier call left the token faulted, reconnects first. If
    /// this one fails for lack of the HSM, marks the token faulted and, when `retry` is set
    /// (operations that are safe to repeat), reconnects and tries once more: after the HSM
    /// comes back, the first call is the one that finds the old connection dead, and it should
    /// not fail for that.
    fn call<T>(
        &self,
        retry: bool,
        mut op: impl FnMut() -> Result<T, HsmError>,
    ) -> Result<T, HsmError> {
        self.token.ready()?;
        match op() {
            Err(e) if is_fault(&e) => {
                self.token.fault(&e);
                if !retry {
                    return Err(e);
                }
                self.token.ready()?;
                let again = op();
                if let Err(e) = &again {
                    if is_fault(e) {
                        self.token.fault(e);
                    }
                }
                again
            }
            other => other,
        }
    }

    fn wrap_gcm(&self, label: &str, aad: &[u8], key: &[u8]) -> Result<Vec<u8>, HsmError> {
        let mut iv = [0u8; GCM_IV_LEN];
        OsRng.fill_bytes(&mut iv);
        let ct = self.with_key(label, Op::General, |s, h| {
            let mut iv_param = iv;
            let params = GcmParams::new(&mut iv_param, aad, (GCM_TAG_LEN as u64 * 8).into())?;
            s.encrypt(&CkMechanism::AesGcm(params), h, key)
        })?;
        let mut out = Vec::with_capacity(1 + GCM_IV_LEN + ct.len());
        out.push(TAG_GCM);
        out.extend_from_slice(&iv);
        out.extend_from_slice(&ct);
        Ok(out)
    }

    fn unwrap_gcm(
        &self,
        label: &str,
        aad: &[u8],
        body: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, HsmError> {
        if body.len() < GCM_IV_LEN + GCM_TAG_LEN {
            return Err(HsmError::Integrity);
        }
        let (iv, ct) = body.split_at(GCM_IV_LEN);
        self.with_key(label, Op::Unwrap, |s, h| {
            let mut iv_param = [0u8; GCM_IV_LEN];
            iv_param.copy_from_slice(iv);
            let params = GcmParams::new(&mut iv_param, aad, (GCM_TAG_LEN as u64 * 8).into())?;
            s.decrypt(&CkMechanism::AesGcm(params), h, ct)
                .map(Zeroizing::new)
        })
    }

    fn wrap_kwp(&self, label: &str, aad: &[u8], key: &[u8]) -> Result<Vec<u8>, HsmError> {
        let digest = Sha256::digest(aad);
        let wrapped = self.with_key(label, Op::General, |s, h| {
            let mut value = Vec::with_capacity(key.len() + AAD_DIGEST_LEN);
            value.extend_from_slice(key);
            value.extend_from_slice(&digest);
            let mut template = temp_key_template();
            template.push(Attribute::Value(value));
            let created = s.create_object(&template);
            scrub(&mut template);
            let temp = TempObject {
                session: s,
                handle: created?,
            };
            s.wrap_key(&CkMechanism::AesKeyWrapPad, h, temp.handle)
        })?;
        let mut out = Vec::with_capacity(1 + wrapped.len());
        out.push(TAG_KWP);
        out.extend_from_slice(&wrapped);
        Ok(out)
    }

    fn unwrap_kwp(
        &self,
        label: &str,
        aad: &[u8],
        body: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, HsmError> {
        // RFC 5649 output is a whole number of 64-bit blocks, at least two.
        if body.len() < 16 || !body.len().is_multiple_of(8) {
            return Err(HsmError::Integrity);
        }
        let value = self.with_key(label, Op::Unwrap, |s, h| {
            let handle =
                s.unwrap_key(&CkMechanism::AesKeyWrapPad, h, body, &temp_key_template())?;
            let temp = TempObject { session: s, handle };
            let attrs = s.get_attributes(temp.handle, &[AttributeType::Value])?;
            let mut value = None;
            for attr in attrs {
                if let Attribute::Value(v) = attr {
                    value = Some(Zeroizing::new(v));
                }
            }
            Ok(value)
        })?;
        let value = value.ok_or_else(|| {
            HsmError::Unavailable("the HSM did not return the unwrapped value".into())
        })?;
        // SoftHSM 2.6's C_WrapKey zero-pads the value to a multiple of 8 bytes before RFC 5649
        // wrapping (the blob's length indicator is the padded length), so its blobs unwrap to
        // `key || digest || 0{0..7}`; a conformant HSM returns exactly `key || digest`. Accept
        // both: try the exact length first, then with up to 7 trailing zero bytes removed.
        let want = Sha256::digest(aad);
        let len = value.len();
        let shortest = AAD_DIGEST_LEN.max(len.saturating_sub(7));
        let mut key_end = None;
        for end in (shortest..=len).rev() {
            if value[end..].iter().any(|&b| b != 0) {
                break;
            }
            if ct_eq(&value[end - AAD_DIGEST_LEN..end], &want) {
                key_end = Some(end - AAD_DIGEST_LEN);
                break;
            }
        }
        let Some(key_end) = key_end else {
            tracing::debug!(token = %self.token.label, key = label, "AAD digest mismatch after unwrap");
            return Err(HsmError::Integrity);
        };
        Ok(Zeroizing::new(value[..key_end].to_vec()))
    }
}

impl KeyWrapper for Pkcs11Wrapper {
    fn wrap(&self, label: &str, aad: &[u8], key: &[u8]) -> Result<Vec<u8>, HsmError> {
        match self.mechanism {
            Mechanism::AesGcm => self.wrap_gcm(label, aad, key),
            Mechanism::AesKeyWrapPad => self.wrap_kwp(label, aad, key),
        }
    }

    fn unwrap(
        &self,
        label: &str,
        aad: &[u8],
        wrapped: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, HsmError> {
        match wrapped.split_first() {
            Some((&TAG_GCM, body)) => self.unwrap_gcm(label, aad, body),
            Some((&TAG_KWP, body)) => self.unwrap_kwp(label, aad, body),
            _ => Err(HsmError::Integrity),
        }
    }

    fn has_master_key(&self, label: &str) -> Result<bool, HsmError> {
        check_key_label(label)?;
        self.call(true, || {
            let mut s = self.token.acquire()?;
            Ok(self.lookup(&mut s, label, false)?.is_some())
        })
    }

    fn create_master_key(&self, label: &str) -> Result<(), HsmError> {
        self.create_key(KeyKind::Master, label)
    }

    fn mechanism(&self) -> Mechanism {
        self.mechanism
    }
}

impl Pkcs11Wrapper {
    /// Generates a token key of `kind` labelled `label`, with every other PKCS#11 call of the
    /// process excluded (see [`OPS`]), and reads its attributes back. Not retried after a
    /// fault: the key may have been made before the failure.
    fn create_key(&self, kind: KeyKind, label: &str) -> Result<(), HsmError> {
        check_key_label(label)?;
        self.call(false, || self.create_key_once(kind, label))
    }

    fn create_key_once(&self, kind: KeyKind, label: &str) -> Result<(), HsmError> {
        let mut s = self.token.acquire_exclusive()?;
        if self.lookup_kind(&mut s, kind, label, false)?.is_some() {
            return Err(kind.exists(label));
        }
        let mechanism = match kind {
            KeyKind::Master => CkMechanism::AesKeyGen,
            KeyKind::Mac => CkMechanism::GenericSecretKeyGen,
        };
        let generated = s.session()?.generate_key(&mechanism, &kind.template(label));
        let handle = generated.map_err(|e| s.fail(e, Op::General))?;
        // Read the policy back: a key that is not sensitive and non-extractable (or cannot do
        // its job) must not be used, whatever the token did with the template.
        let wanted = kind.template(label);
        let types: Vec<AttributeType> = wanted.iter().map(Attribute::attribute_type).collect();
        let stored = s.session()?.get_attributes(handle, &types);
        let stored = match stored {
            Ok(a) => a,
            Err(e) => return Err(s.fail(e, Op::General)),
        };
        let noun = kind.noun();
        if let Some(bad) = wanted.iter().find(|w| !stored.contains(w)) {
            tracing::warn!(token = %self.token.label, key = label, attribute = ?bad.attribute_type(), "new {noun} lacks a required attribute; destroying it");
            if let Err(e) = s.session()?.destroy_object(handle) {
                tracing::warn!(token = %self.token.label, key = label, error = %e, "cannot destroy the faulty {noun}");
            }
            return Err(HsmError::Unavailable(format!(
                "the token stored {noun} {label:?} without {:?}; it was destroyed, try again",
                bad.attribute_type()
            )));
        }
        self.token.remember(kind, label, handle);
        tracing::info!(token = %self.token.label, key = label, "{noun} created");
        Ok(())
    }
}

impl MacSigner for Pkcs11Wrapper {
    fn has_mac_key(&self, label: &str) -> Result<bool, HsmError> {
        check_key_label(label)?;
        self.call(true, || {
            let mut s = self.token.acquire()?;
            Ok(self
                .lookup_kind(&mut s, KeyKind::Mac, label, false)?
                .is_some())
        })
    }

    fn create_mac_key(&self, label: &str) -> Result<(), HsmError> {
        self.create_key(KeyKind::Mac, label)
    }

    fn mac(&self, label: &str, data: &[u8]) -> Result<Vec<u8>, HsmError> {
        self.with_kind(KeyKind::Mac, label, Op::General, |s, h| {
            s.sign(&CkMechanism::Sha256Hmac, h, data)
        })
    }

    fn verify_mac(&self, label: &str, data: &[u8], tag: &[u8]) -> Result<bool, HsmError> {
        self.with_kind(KeyKind::Mac, label, Op::General, |s, h| {
            match s.verify(&CkMechanism::Sha256Hmac, h, data, tag) {
                Ok(()) => Ok(true),
                Err(e)
                    if matches!(
                        rv_of(&e),
                        Some(RvError::SignatureInvalid | RvError::SignatureLenRange)
                    ) =>
                {
                    Ok(false)
                }
                Err(e) => Err(e),
            }
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    //! Real SoftHSM. The library may be initialised once per process and SOFTHSM2_CONF must be
    //! set before that, so every test shares one fixture per test binary; under nextest each
    //! test gets its own process and therefore its own fixture.

    use super::*;
    use cryptoki::object::AttributeInfo;
    use std::sync::OnceLock;

    const TOKEN: &str = "ward-test";
    /// A second token, only touched by the bad-PIN test.
    const PIN_TOKEN: &str = "ward-pin-test";
    /// Tokens the fault tests break (each its own, so the others' keys stay put).
    const FAULT_TOKENS: [&str; 2] = ["ward-fault-dir", "ward-fault-objects"];
    const SO_PIN: &str = "so-secret-1234";
    const USER_PIN: &str = "user-secret-5678";

    struct Fixture {
        module: PathBuf,
        /// SoftHSM's token directory (one subdirectory per token).
        tokens: PathBuf,
        gcm: Pkcs11Wrapper,
        kwp: Pkcs11Wrapper,
    }

    /// Removes token directories left by earlier test processes that have exited (statics are
    /// never dropped, so each process leaves its directory behind).
    fn sweep_stale_dirs() {
        let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(rest) = name.to_str().and_then(|n| n.strip_prefix("ward-hsm-test-")) else {
                continue;
            };
            let Some(pid) = rest.split('-').next() else {
                continue;
            };
            if pid.parse::<u32>().is_ok() && !Path::new("/proc").join(pid).exists() {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }

    fn cfg(module: &Path, token: &str, pin: &str, mechanism: Mechanism) -> Pkcs11Config {
        Pkcs11Config {
            mechanism,
            ..Pkcs11Config::new(module, token, Zeroizing::new(pin.to_owned()))
        }
    }

    fn fixture() -> &'static Fixture {
        static FIXTURE: OnceLock<Fixture> = OnceLock::new();
        FIXTURE.get_or_init(|| {
            sweep_stale_dirs();
            let dir = tempfile::Builder::new()
                .prefix(&format!("ward-hsm-test-{}-", std::process::id()))
                .tempdir()
                .unwrap()
                .keep();
            let conf = crate::softhsm::write_config(&dir).unwrap();
            crate::softhsm::export_conf(&conf);
            let module = crate::softhsm::find_module().expect("SoftHSM module");
            Pkcs11Wrapper::init_token(&module, TOKEN, SO_PIN, USER_PIN).unwrap();
            Pkcs11Wrapper::init_token(&module, PIN_TOKEN, SO_PIN, USER_PIN).unwrap();
            let gcm =
                Pkcs11Wrapper::open(cfg(&module, TOKEN, USER_PIN, Mechanism::AesGcm)).unwrap();
            let kwp = Pkcs11Wrapper::open(cfg(&module, TOKEN, USER_PIN, Mechanism::AesKeyWrapPad))
                .unwrap();
            let tokens = dir.canonicalize().unwrap().join("tokens");
            Fixture {
                module,
                tokens,
                gcm,
                kwp,
            }
        })
    }

    /// A wrapper per mechanism, plus a fresh master key `label` on the shared token.
    fn with_key(label: &str) -> &'static Fixture {
        let f = fixture();
        f.gcm.create_master_key(label).unwrap();
        f
    }

    fn both(f: &Fixture) -> [&Pkcs11Wrapper; 2] {
        [&f.gcm, &f.kwp]
    }

    #[test]
    fn round_trips_and_formats() {
        let f = with_key("t-round-trip");
        for key in [&[0x42u8; 32][..], &[1, 2, 3][..], &[9u8; 64][..]] {
            for w in both(f) {
                let blob = w.wrap("t-round-trip", b"secret/a@v1", key).unwrap();
                match w.mechanism() {
                    Mechanism::AesGcm => {
                        assert_eq!(blob[0], 0x01);
                        assert_eq!(blob.len(), 1 + 12 + key.len() + 16);
                    }
                    _ => assert_eq!(blob[0], 0x02),
                }
                // Either wrapper unwraps either format: dispatch is on byte 0.
                for u in both(f) {
                    let out = u.unwrap("t-round-trip", b"secret/a@v1", &blob).unwrap();
                    assert_eq!(out.as_slice(), key);
                }
            }
        }
        // Fresh IV every time.
        let a = f.gcm.wrap("t-round-trip", b"x", &[0; 32]).unwrap();
        let b = f.gcm.wrap("t-round-trip", b"x", &[0; 32]).unwrap();
        assert_ne!(a, b);
    }

    #[test]
    fn every_key_length_round_trips() {
        // Exercises SoftHSM's zero padding of non-multiple-of-8 KWP inputs.
        let f = with_key("t-lengths");
        for len in 0..=41usize {
            let key: Vec<u8> = (0..len)
                .map(|i| if i + 1 == len { 0 } else { i as u8 + 1 })
                .collect();
            for w in both(f) {
                let blob = w.wrap("t-lengths", b"aad", &key).unwrap();
                let out = w.unwrap("t-lengths", b"aad", &blob).unwrap();
                assert_eq!(out.as_slice(), &key[..], "{:?} len {len}", w.mechanism());
            }
        }
    }

    #[test]
    fn wrong_aad_is_integrity() {
        let f = with_key("t-aad");
        for w in both(f) {
            let blob = w.wrap("t-aad", b"name=a version=1", &[7; 32]).unwrap();
            let err = w.unwrap("t-aad", b"name=a version=2", &blob).unwrap_err();
            assert!(
                matches!(err, HsmError::Integrity),
                "{:?}: {err:?}",
                w.mechanism()
            );
            let err = w.unwrap("t-aad", b"", &blob).unwrap_err();
            assert!(
                matches!(err, HsmError::Integrity),
                "{:?}: {err:?}",
                w.mechanism()
            );
        }
    }

    #[test]
    fn modified_blob_is_integrity() {
        let f = with_key("t-flip");
        for w in both(f) {
            let blob = w.wrap("t-flip", b"aad", &[7; 32]).unwrap();
            for i in 1..blob.len() {
                let mut bad = blob.clone();
                bad[i] ^= 0x01;
                let err = w.unwrap("t-flip", b"aad", &bad).unwrap_err();
                assert!(
                    matches!(err, HsmError::Integrity),
                    "{:?} byte {i}: {err:?}",
                    w.mechanism()
                );
            }
            // Unknown tag, truncation, extension, empty.
            let mut bad = blob.clone();
            bad[0] = 0x03;
            let truncated = &blob[..blob.len() - 1];
            let mut extended = blob.clone();
            extended.extend_from_slice(&[0; 8]);
            for bad in [&bad[..], truncated, &extended[..], &blob[..1], &[][..]] {
                let err = w.unwrap("t-flip", b"aad", bad).unwrap_err();
                assert!(
                    matches!(err, HsmError::Integrity),
                    "{:?}: {err:?}",
                    w.mechanism()
                );
            }
        }
    }

    #[test]
    fn other_master_key_is_integrity() {
        let f = with_key("t-key-a");
        f.gcm.create_master_key("t-key-b").unwrap();
        for w in both(f) {
            let blob = w.wrap("t-key-a", b"aad", &[7; 32]).unwrap();
            let err = w.unwrap("t-key-b", b"aad", &blob).unwrap_err();
            assert!(
                matches!(err, HsmError::Integrity),
                "{:?}: {err:?}",
                w.mechanism()
            );
        }
    }

    #[test]
    fn unknown_label_is_missing() {
        let f = fixture();
        for w in both(f) {
            assert!(!w.has_master_key("t-nope").unwrap());
            let err = w.wrap("t-nope", b"aad", &[1; 32]).unwrap_err();
            assert!(matches!(err, HsmError::MasterKeyMissing { ref label } if label == "t-nope"));
            let blob = [&[0x01][..], &[0u8; 60][..]].concat();
            let err = w.unwrap("t-nope", b"aad", &blob).unwrap_err();
            assert!(matches!(err, HsmError::MasterKeyMissing { .. }), "{err:?}");
        }
    }

    #[test]
    fn creating_twice_is_exists() {
        let f = with_key("t-twice");
        assert!(f.kwp.has_master_key("t-twice").unwrap());
        let err = f.kwp.create_master_key("t-twice").unwrap_err();
        assert!(matches!(err, HsmError::MasterKeyExists { ref label } if label == "t-twice"));
        assert_eq!(err.to_string(), "master key \"t-twice\" already exists");
    }

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

    #[test]
    fn master_key_is_sensitive_and_not_extractable() {
        let f = with_key("t-attrs");
        let mut s = f.gcm.token.acquire().unwrap();
        let h = f.gcm.lookup(&mut s, "t-attrs", false).unwrap().unwrap();
        let session = s.session().unwrap();
        let attrs = session
            .get_attributes(
                h,
                &[
                    AttributeType::Sensitive,
                    AttributeType::Extractable,
                    AttributeType::AlwaysSensitive,
                    AttributeType::NeverExtractable,
                    AttributeType::Token,
                    AttributeType::Private,
                    AttributeType::ValueLen,
                    AttributeType::Value,
                ],
            )
            .unwrap();
        let has = |a: &Attribute| attrs.iter().any(|b| b == a);
        assert!(has(&Attribute::Sensitive(true)), "{attrs:?}");
        assert!(has(&Attribute::Extractable(false)), "{attrs:?}");
        assert!(has(&Attribute::AlwaysSensitive(true)), "{attrs:?}");
        assert!(has(&Attribute::NeverExtractable(true)), "{attrs:?}");
        assert!(has(&Attribute::Token(true)), "{attrs:?}");
        assert!(has(&Attribute::Private(true)), "{attrs:?}");
        assert!(has(&Attribute::ValueLen(32.into())), "{attrs:?}");
        assert!(
            !attrs.iter().any(|a| matches!(a, Attribute::Value(_))),
            "CKA_VALUE was returned"
        );
        let info = session
            .get_attribute_info(h, &[AttributeType::Value])
            .unwrap();
        assert!(matches!(info[..], [AttributeInfo::Sensitive]), "{info:?}");
        // The key cannot be made extractable or wrapped out either.
        assert!(session
            .update_attributes(h, &[Attribute::Extractable(true)])
            .is_err());
        assert!(session.wrap_key(&CkMechanism::AesKeyWrapPad, h, h).is_err());
    }

    #[test]
    fn stale_handle_is_refreshed() {
        let f = with_key("t-stale");
        let old_blob = f.gcm.wrap("t-stale", b"aad", &[5; 32]).unwrap();
        // Replace the key behind the wrapper's back: the cached handle goes stale. Keep every
        // other call out meanwhile, as create_master_key does (see OPS).
        {
            let mut s = f.gcm.token.acquire_exclusive().unwrap();
            let h = f.gcm.lookup(&mut s, "t-stale", false).unwrap().unwrap();
            let session = s.session().unwrap();
            session.destroy_object(h).unwrap();
            session
                .generate_key(&CkMechanism::AesKeyGen, &master_key_template("t-stale"))
                .unwrap();
        }
        for w in both(f) {
            let blob = w.wrap("t-stale", b"aad", &[6; 32]).unwrap();
            assert_eq!(
                w.unwrap("t-stale", b"aad", &blob).unwrap().as_slice(),
                &[6; 32]
            );
            let err = w.unwrap("t-stale", b"aad", &old_blob).unwrap_err();
            assert!(matches!(err, HsmError::Integrity), "{err:?}");
        }
    }

    #[test]
    fn concurrent_wrap_unwrap() {
        let f = with_key("t-threads");
        std::thread::scope(|scope| {
            for t in 0u8..8 {
                scope.spawn(move || {
                    let w = if t % 2 == 0 { &f.gcm } else { &f.kwp };
                    for i in 0u8..40 {
                        let key = [t ^ i; 32];
                        let aad = format!("thread {t} item {i}");
                        let blob = w.wrap("t-threads", aad.as_bytes(), &key).unwrap();
                        let out = w.unwrap("t-threads", aad.as_bytes(), &blob).unwrap();
                        assert_eq!(out.as_slice(), &key);
                        let err = w.unwrap("t-threads", b"other", &blob).unwrap_err();
                        assert!(matches!(err, HsmError::Integrity), "{err:?}");
                    }
                });
            }
        });
    }

    #[test]
    fn mac_keys_sign_and_verify_inside_the_token() {
        let f = fixture();
        assert!(!f.gcm.has_mac_key("t-mac").unwrap());
        let err = f.gcm.mac("t-mac", b"data").unwrap_err();
        assert!(matches!(err, HsmError::MacKeyMissing { ref label } if label == "t-mac"));
        f.gcm.create_mac_key("t-mac").unwrap();
        assert!(f.kwp.has_mac_key("t-mac").unwrap());
        let err = f.kwp.create_mac_key("t-mac").unwrap_err();
        assert!(matches!(err, HsmError::MacKeyExists { .. }), "{err:?}");
        // A master key of the same label is a different object.
        assert!(!f.gcm.has_master_key("t-mac").unwrap());

        let tag = f.gcm.mac("t-mac", b"checkpoint 7").unwrap();
        assert_eq!(tag.len(), 32);
        assert_eq!(
            f.kwp.mac("t-mac", b"checkpoint 7").unwrap(),
            tag,
            "HMAC is deterministic"
        );
        assert!(f.gcm.verify_mac("t-mac", b"checkpoint 7", &tag).unwrap());
        assert!(!f.gcm.verify_mac("t-mac", b"checkpoint 8", &tag).unwrap());
        let mut bad = tag.clone();
        bad[0] ^= 1;
        assert!(!f.gcm.verify_mac("t-mac", b"checkpoint 7", &bad).unwrap());
        assert!(!f
            .gcm
            .verify_mac("t-mac", b"checkpoint 7", &tag[..16])
            .unwrap());
        // Another key gives another tag.
        f.gcm.create_mac_key("t-mac-2").unwrap();
        assert!(!f.gcm.verify_mac("t-mac-2", b"checkpoint 7", &tag).unwrap());

        // The key never leaves the token.
        let mut s = f.gcm.token.acquire().unwrap();
        let h = f
            .gcm
            .lookup_kind(&mut s, KeyKind::Mac, "t-mac", false)
            .unwrap()
            .unwrap();
        let session = s.session().unwrap();
        let attrs = session
            .get_attributes(
                h,
                &[
                    AttributeType::Sensitive,
                    AttributeType::Extractable,
                    AttributeType::NeverExtractable,
                    AttributeType::Token,
                    AttributeType::Value,
                ],
            )
            .unwrap();
        let has = |a: &Attribute| attrs.iter().any(|b| b == a);
        assert!(has(&Attribute::Sensitive(true)), "{attrs:?}");
        assert!(has(&Attribute::Extractable(false)), "{attrs:?}");
        assert!(has(&Attribute::NeverExtractable(true)), "{attrs:?}");
        assert!(has(&Attribute::Token(true)), "{attrs:?}");
        assert!(!attrs.iter().any(|a| matches!(a, Attribute::Value(_))));
    }

    #[test]
    fn config_debug_hides_pin() {
        let c = cfg(Path::new("/m.so"), "tok", "hunter2-pin", Mechanism::AesGcm);
        let s = format!("{c:?}");
        assert!(!s.contains("hunter2"), "{s}");
        assert!(s.contains("<redacted>"));
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
