//! Creating a token (C_InitToken, then C_InitPIN as the SO), for dev mode and tests.

use std::path::Path;

use cryptoki::session::UserType;
use cryptoki::types::AuthPin;

use super::context::{context, ops_exclusive};
use super::token::{check_token_label, find_slot};
use crate::error::{map_err, Op};
use crate::HsmError;

/// Creates and initialises a new token labelled `label` on a free slot, with an SO PIN and a
/// User PIN, entirely through PKCS#11 (no PIN on a command line).
pub(super) fn init_token(
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
