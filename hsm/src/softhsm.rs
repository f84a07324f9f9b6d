//! SoftHSM helpers for dev mode and tests: find the module, write a private config, export it.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::HsmError;

/// Where SoftHSM's module usually lives, tried in order after `WARD_PKCS11_MODULE`.
const CANDIDATES: &[&str] = &[
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
    "/usr/lib64/pkcs11/libsofthsm2.so",
];

/// The SoftHSM PKCS#11 module: `WARD_PKCS11_MODULE` if set and present, else the first
/// well-known path that exists.
pub fn find_module() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("WARD_PKCS11_MODULE") {
        let p = PathBuf::from(p);
        if p.is_file() {
            return Some(p);
        }
        tracing::warn!(path = %p.display(), "WARD_PKCS11_MODULE does not name a file");
    }
    CANDIDATES.iter().map(PathBuf::from).find(|p| p.is_file())
}

/// Writes `dir/softhsm2.conf` (mode 0600) with its token directory `dir/tokens` (mode 0700);
/// returns the config's path.
pub fn write_config(dir: &Path) -> Result<PathBuf, HsmError> {
    let io = |what: &str, p: &Path, e: std::io::Error| {
        HsmError::Config(format!("{what} {}: {e}", p.display()))
    };
    fs::create_dir_all(dir).map_err(|e| io("cannot create", dir, e))?;
    let dir = dir
        .canonicalize()
        .map_err(|e| io("cannot resolve", dir, e))?;
    let tokens = dir.join("tokens");
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&tokens)
        .map_err(|e| io("cannot create", &tokens, e))?;
    // `create` leaves an existing directory's mode alone: enforce it.
    fs::set_permissions(&tokens, fs::Permissions::from_mode(0o700))
        .map_err(|e| io("cannot chmod", &tokens, e))?;

    let tokendir = tokens
        .to_str()
        .ok_or_else(|| HsmError::Config(format!("non-UTF-8 path {}", tokens.display())))?;
    if tokendir.contains(['\n', '\r']) {
        return Err(HsmError::Config(
            "token directory path contains a newline".into(),
        ));
    }
    let conf = dir.join("softhsm2.conf");
    let body = format!(
        "# Written by ward-hsm.\n\
         directories.tokendir = {tokendir}\n\
         objectstore.backend = file\n\
         log.level = ERROR\n\
         slots.removable = false\n"
    );
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&conf)
        .map_err(|e| io("cannot write", &conf, e))?;
    f.write_all(body.as_bytes())
        .map_err(|e| io("cannot write", &conf, e))?;
    fs::set_permissions(&conf, fs::Permissions::from_mode(0o600))
        .map_err(|e| io("cannot chmod", &conf, e))?;
    Ok(conf)
}

/// Points SoftHSM at `conf` by setting `SOFTHSM2_CONF`.
///
/// Call it before any other thread starts (the environment is not thread-safe to modify) and
/// before the first [`crate::Pkcs11Wrapper::open`] or [`crate::Pkcs11Wrapper::init_token`]:
/// SoftHSM reads the variable once, in `C_Initialize`. `std::env::set_var` is a safe function
/// in edition 2021.
pub fn export_conf(conf: &Path) {
    std::env::set_var("SOFTHSM2_CONF", conf);
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn config_file_and_modes() {
        let dir = tempfile::tempdir().unwrap();
        let conf = write_config(dir.path()).unwrap();
        let text = fs::read_to_string(&conf).unwrap();
        let tokens = dir.path().canonicalize().unwrap().join("tokens");
        assert!(text.contains(&format!("directories.tokendir = {}\n", tokens.display())));
        assert!(text.contains("objectstore.backend = file\n"));
        assert_eq!(
            fs::metadata(&conf).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(
            fs::metadata(&tokens).unwrap().permissions().mode() & 0o777,
            0o700
        );
        // Idempotent.
        assert_eq!(write_config(dir.path()).unwrap(), conf);
    }

    #[test]
    fn module_is_found() {
        // SoftHSM is installed on the machines that run this suite.
        assert!(find_module().is_some());
    }
}
