//! A token's fixed pool of open sessions, the borrow of one for a call, and logging in.
//!
//! `Session` is Send, not Sync: each session serves one caller at a time, and the pool stays
//! open for the life of the process, because closing the last session of a token logs the
//! process out of it.

use std::sync::{Condvar, Mutex, PoisonError};

use cryptoki::error::{Error as CkError, RvError};
use cryptoki::session::{Session, SessionState, UserType};
use cryptoki::types::AuthPin;
use zeroize::Zeroizing;

use super::context::{finalized_error, lock, OpsGuard};
use crate::error::{map_err, Op};
use crate::HsmError;

/// A fixed set of sessions handed out one caller at a time (Session is Send, not Sync).
///
/// The set is empty while the token is unreachable: [`Pool::take`] then fails at once instead
/// of waiting for a session that will never come back.
pub(super) struct Pool {
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
    pub(super) fn new() -> Self {
        Self {
            state: Mutex::new(PoolState {
                idle: Vec::new(),
                lent: 0,
                closed: false,
            }),
            available: Condvar::new(),
        }
    }

    /// Lends a session for one call on token `token`, holding `ops` (a hold on
    /// [`OPS`](super::context::OPS)) until the session is back in the pool.
    pub(super) fn lend<'p>(
        &'p self,
        token: &'p str,
        ops: OpsGuard,
    ) -> Result<Pooled<'p>, HsmError> {
        Ok(Pooled {
            pool: self,
            token,
            session: Some(self.take(token)?),
            _ops: ops,
        })
    }

    /// Takes a session, waiting for one to come back if all are in use.
    fn take(&self, token: &str) -> Result<Session, HsmError> {
        let mut st = lock(&self.state);
        loop {
            if st.closed {
                return Err(finalized_error());
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

    /// Takes every idle session out (to close them). Called with
    /// [`OPS`](super::context::OPS) held exclusively, when none is lent.
    pub(super) fn drain(&self) -> Vec<Session> {
        std::mem::take(&mut lock(&self.state).idle)
    }

    /// Hands freshly opened sessions to the pool.
    pub(super) fn refill(&self, sessions: Vec<Session>) {
        let mut st = lock(&self.state);
        if st.closed {
            return;
        }
        st.idle.extend(sessions);
        drop(st);
        self.available.notify_all();
    }

    /// Closes the idle sessions and refuses further use.
    pub(super) fn close(&self) {
        let idle = {
            let mut st = lock(&self.state);
            st.closed = true;
            std::mem::take(&mut st.idle)
        };
        drop(idle);
        self.available.notify_all();
    }
}

/// A session borrowed from a token's pool; returned on drop.
pub(super) struct Pooled<'p> {
    pool: &'p Pool,
    /// Label of the pool's token, for errors.
    token: &'p str,
    session: Option<Session>,
    /// Released after `drop` has returned the session to the pool.
    _ops: OpsGuard,
}

impl Pooled<'_> {
    pub(super) fn session(&self) -> Result<&Session, HsmError> {
        self.session
            .as_ref()
            .ok_or_else(|| HsmError::Unavailable("pooled session already returned".into()))
    }

    /// Maps an error from this session.
    pub(super) fn fail(&self, err: CkError, op: Op) -> HsmError {
        map_err(err, self.token, op)
    }
}

impl Drop for Pooled<'_> {
    fn drop(&mut self) {
        if let Some(session) = self.session.take() {
            self.pool.put(session);
        }
    }
}

/// Logs the application in as User on `s`'s token; already logged in is fine.
pub(super) fn login_user(
    s: &Session,
    token: &str,
    pin: &Zeroizing<String>,
) -> Result<(), HsmError> {
    let auth = AuthPin::from(pin.as_str());
    match s.login(UserType::User, Some(&auth)) {
        Ok(()) => Ok(()),
        Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => Ok(()),
        Err(e) => Err(map_err(e, token, Op::General)),
    }
}

/// Logs in unless the session already sees the token as User.
pub(super) fn ensure_logged_in(
    s: &Session,
    token: &str,
    pin: &Zeroizing<String>,
) -> Result<(), HsmError> {
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

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use crate::pkcs11::testkit::with_key;
    use crate::{HsmError, KeyWrapper};

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
}
