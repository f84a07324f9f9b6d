//! The process's one PKCS#11 library: loaded and initialised once (C_Initialize), restarted by a
//! reconnect, finalised once at shutdown; and the process-wide lock that every PKCS#11 call
//! takes ([`OPS`]).
//!
//! PKCS#11 may be initialised once per process, so the context lives in a `static`.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{
    Mutex, MutexGuard, OnceLock, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard,
};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};

use crate::error::{map_err, module_load, Op};
use crate::HsmError;

/// The one initialised PKCS#11 library of this process.
pub(super) struct Context {
    pub(super) pkcs11: Pkcs11,
    module: PathBuf,
}

/// The library context, set once.
static CONTEXT: OnceLock<Context> = OnceLock::new();
/// Serialises the load-and-initialise of [`CONTEXT`] (OnceLock has no stable fallible init).
static CONTEXT_INIT: Mutex<()> = Mutex::new(());
/// Set by [`finalize`]; the context is dead afterwards.
static FINALIZED: AtomicBool = AtomicBool::new(false);
/// Shared by every PKCS#11 operation of this process; taken exclusively to create a token
/// object (master key), open a token or initialise one. SoftHSM 2.6 is not safe against
/// creating a token object while other calls run: now and then C_GenerateKey fails with
/// CKR_GENERAL_ERROR ("Could not initialize the attribute"), or yields a key whose attributes
/// were not all stored (SoftHSMv2 issue #573). These are rare events, so excluding everything
/// else for their duration costs nothing measurable.
static OPS: RwLock<()> = RwLock::new(());

/// A hold on [`OPS`], shared or exclusive.
pub(super) enum OpsGuard {
    Shared(#[allow(dead_code)] RwLockReadGuard<'static, ()>),
    Exclusive(#[allow(dead_code)] RwLockWriteGuard<'static, ()>),
}

/// Takes [`OPS`] shared (any ordinary call).
pub(super) fn ops_shared() -> OpsGuard {
    OpsGuard::Shared(OPS.read().unwrap_or_else(PoisonError::into_inner))
}

/// Takes [`OPS`] exclusively (object creation, token open or initialisation, finalisation).
pub(super) fn ops_exclusive() -> OpsGuard {
    OpsGuard::Exclusive(OPS.write().unwrap_or_else(PoisonError::into_inner))
}

/// Locks a mutex whose data stays consistent across a panic (every critical section here is a
/// single push/pop/insert), so a poisoned lock is safe to reuse.
pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The error of every call made after [`finalize`].
pub(super) fn finalized_error() -> HsmError {
    HsmError::Unavailable("the PKCS#11 library has been finalised".into())
}

/// Whether [`finalize`] has run: the library cannot be initialised again in this process.
pub(super) fn is_finalized() -> bool {
    FINALIZED.load(Ordering::Acquire)
}

/// The arguments of every C_Initialize of this process.
fn init_args() -> CInitializeArgs {
    // Without OS_LOCKING_OK SoftHSM turns its internal locks off.
    CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)
}

/// Loads and initialises the module at `module` once per process; later calls must name the
/// same module.
pub(super) fn context(module: &Path) -> Result<&'static Context, HsmError> {
    if is_finalized() {
        return Err(finalized_error());
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
    match pkcs11.initialize(init_args()) {
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

/// The library context if it has been loaded, whatever became of it since.
pub(super) fn loaded() -> Option<&'static Context> {
    CONTEXT.get()
}

impl Context {
    /// Finalises and initialises the library again, so that it reads the tokens afresh (see
    /// the reconnect in `token.rs`). Every session must be closed first. A failed C_Finalize
    /// is logged and ignored; a failed C_Initialize is returned.
    pub(super) fn restart(&self) -> Result<(), CkError> {
        match self.pkcs11.clone().finalize() {
            Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiNotInitialized, _)) => {}
            Err(e) => {
                tracing::warn!(error = %e, "C_Finalize failed while reconnecting; initialising anyway")
            }
        }
        match self.pkcs11.initialize(init_args()) {
            Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

/// Finalises the library (C_Finalize) for good, after `close_sessions` has closed every
/// session, with every other PKCS#11 call of the process excluded. Does nothing if the library
/// was never loaded or is already finalised.
pub(super) fn finalize(close_sessions: impl FnOnce()) -> Result<(), HsmError> {
    let _init = lock(&CONTEXT_INIT);
    let _ops = ops_exclusive();
    let Some(ctx) = CONTEXT.get() else {
        return Ok(());
    };
    if FINALIZED.swap(true, Ordering::AcqRel) {
        return Ok(());
    }
    close_sessions();
    ctx.pkcs11
        .clone()
        .finalize()
        .map_err(|e| map_err(e, "", Op::General))
}
