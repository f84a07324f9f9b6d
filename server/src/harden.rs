//! Process hardening done once at start-up, before any thread or file exists: a private umask
//! (so sled's own files, which it creates with the default mode, come out 0600 and its
//! directories 0700), no core dumps (a dump of this process would hold the unsealed keyring),
//! the check that refuses private-key and PIN files that other users could read, and private
//! directories for data and keys.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

/// The umask the server runs under: nothing for group or others.
pub const UMASK: u32 = 0o077;

/// Sets the umask to [`UMASK`] and disables core dumps (RLIMIT_CORE 0 and PR_SET_DUMPABLE 0,
/// which also keeps other non-root users of the same uid from ptrace-attaching). Call first
/// thing in `main`, before any thread starts. Returns what could not be done (each item is
/// also worth a warning, but none stops the server).
pub fn harden_process() -> Vec<String> {
    use nix::sys::resource::{setrlimit, Resource};
    use nix::sys::stat::{umask, Mode};
    let mut failed = Vec::new();
    umask(Mode::from_bits_truncate(UMASK as nix::libc::mode_t));
    if let Err(e) = setrlimit(Resource::RLIMIT_CORE, 0, 0) {
        failed.push(format!("cannot set RLIMIT_CORE to 0: {e}"));
    }
    if let Err(e) = nix::sys::prctl::set_dumpable(false) {
        failed.push(format!("cannot clear PR_SET_DUMPABLE: {e}"));
    }
    failed
}

/// Refuses a secret file (private key, PIN) that group or others may access in any way: it
/// must be mode 0600 or 0400. `what` names the file in the message.
pub fn check_private_file(path: &Path, what: &str) -> Result<(), String> {
    let meta = std::fs::metadata(path)
        .map_err(|e| format!("cannot read {what} {}: {e}", path.display()))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(format!(
            "{what} {} is accessible to group or others (mode {mode:04o}); refusing to use it: \
             run `chmod 600 {}`",
            path.display(),
            path.display()
        ));
    }
    Ok(())
}

/// Creates `dir` (and parents) readable by the owner only.
pub fn create_private_dir(dir: &std::path::Path) -> Result<(), String> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| format!("cannot restrict {}: {e}", dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn wide_secret_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("k");
        std::fs::File::create(&f)
            .unwrap()
            .write_all(b"secret")
            .unwrap();
        for (mode, ok) in [
            (0o600, true),
            (0o400, true),
            (0o640, false),
            (0o604, false),
            (0o644, false),
            (0o610, false),
            (0o660, false),
        ] {
            std::fs::set_permissions(&f, std::fs::Permissions::from_mode(mode)).unwrap();
            let r = check_private_file(&f, "test key");
            assert_eq!(r.is_ok(), ok, "mode {mode:o}: {r:?}");
            if let Err(e) = r {
                assert!(e.contains("chmod 600") && e.contains("test key"), "{e}");
            }
        }
        assert!(check_private_file(&dir.path().join("missing"), "x").is_err());
    }

    #[test]
    fn hardening_disables_core_dumps_and_narrows_the_umask() {
        // Changes this test process only (nextest runs each test in its own process).
        assert!(harden_process().is_empty());
        let (soft, hard) =
            nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_CORE).unwrap();
        assert_eq!((soft, hard), (0, 0));
        assert!(!nix::sys::prctl::get_dumpable().unwrap());
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("new");
        std::fs::write(&f, b"x").unwrap();
        let mode = std::fs::metadata(&f).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }
}
