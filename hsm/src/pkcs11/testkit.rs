//! The shared fixture of the PKCS#11 tests: real SoftHSM. The library may be initialised once
//! per process and SOFTHSM2_CONF must be set before that, so every test shares one fixture per
//! test binary; under nextest each test gets its own process and therefore its own fixture.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use zeroize::Zeroizing;

use super::{Pkcs11Config, Pkcs11Wrapper};
use crate::{KeyWrapper, Mechanism};

pub(super) const TOKEN: &str = "ward-test";
/// A second token, only touched by the bad-PIN test.
pub(super) const PIN_TOKEN: &str = "ward-pin-test";
pub(super) const SO_PIN: &str = "so-secret-1234";
pub(super) const USER_PIN: &str = "user-secret-5678";

pub(super) struct Fixture {
    pub(super) module: PathBuf,
    /// SoftHSM's token directory (one subdirectory per token).
    pub(super) tokens: PathBuf,
    pub(super) gcm: Pkcs11Wrapper,
    pub(super) kwp: Pkcs11Wrapper,
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

pub(super) fn cfg(module: &Path, token: &str, pin: &str, mechanism: Mechanism) -> Pkcs11Config {
    Pkcs11Config {
        mechanism,
        ..Pkcs11Config::new(module, token, Zeroizing::new(pin.to_owned()))
    }
}

pub(super) fn fixture() -> &'static Fixture {
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
        let gcm = Pkcs11Wrapper::open(cfg(&module, TOKEN, USER_PIN, Mechanism::AesGcm)).unwrap();
        let kwp =
            Pkcs11Wrapper::open(cfg(&module, TOKEN, USER_PIN, Mechanism::AesKeyWrapPad)).unwrap();
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
pub(super) fn with_key(label: &str) -> &'static Fixture {
    let f = fixture();
    f.gcm.create_master_key(label).unwrap();
    f
}

pub(super) fn both(f: &Fixture) -> [&Pkcs11Wrapper; 2] {
    [&f.gcm, &f.kwp]
}
