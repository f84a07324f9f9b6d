//! The dev SoftHSM token of a server's data directory: its files, and its key objects.
//!
//! SoftHSM 2's file store keeps each token object in a file `<uuid>.object` under the token's
//! directory: a u64 generation, then every attribute as (type, kind, value), numbers as
//! big-endian u64s. Labels are encrypted there (the objects are private), key types are not, so
//! the master keys (the token's only AES keys; the audit key is a generic secret) can be told
//! from the other objects without the PIN.

use std::path::{Path, PathBuf};

use crate::{files_under, TestServer};

/// An attribute `CKA_KEY_TYPE` (0x100) of kind "unsigned long" (2) holding `CKK_AES` (0x1f), as
/// SoftHSM 2 stores it.
const AES_KEY_TYPE: [u8; 24] = {
    let mut a = [0u8; 24];
    a[6] = 0x01; // CKA_KEY_TYPE = 0x100
    a[15] = 0x02; // kind: unsigned long
    a[23] = 0x1f; // CKK_AES
    a
};

impl TestServer {
    /// The softhsm2.conf dev mode wrote (DIR/softhsm/softhsm2.conf), and the token directory
    /// it names (one subdirectory per token).
    pub fn softhsm_paths(&self) -> (PathBuf, PathBuf) {
        let conf = self.path.join("softhsm").join("softhsm2.conf");
        let text = std::fs::read_to_string(&conf).unwrap_or_else(|e| panic!("read {conf:?}: {e}"));
        let tokendir = text
            .lines()
            .filter_map(|l| l.split_once('='))
            .find(|(k, _)| k.trim() == "directories.tokendir")
            .map(|(_, v)| PathBuf::from(v.trim()))
            .unwrap_or_else(|| panic!("no directories.tokendir in {conf:?}"));
        (conf, tokendir)
    }

    /// The files of the token's AES key objects (the master keys), sorted.
    pub fn master_key_objects(&self) -> Vec<PathBuf> {
        let (_, tokendir) = self.softhsm_paths();
        let mut out: Vec<PathBuf> = files_under(&tokendir)
            .into_iter()
            .filter(|f| {
                f.extension().is_some_and(|e| e == "object")
                    && f.file_name().is_some_and(|n| n != "token.object")
            })
            .filter(|f| {
                let bytes = std::fs::read(f).unwrap_or_else(|e| panic!("read {f:?}: {e}"));
                bytes.windows(AES_KEY_TYPE.len()).any(|w| w == AES_KEY_TYPE)
            })
            .collect();
        out.sort();
        out
    }

    /// Deletes a token object (its `.object` file and its lock file), as C_DestroyObject would.
    /// Only while no server runs: a running SoftHSM keeps its objects in memory.
    pub fn delete_token_object(&mut self, object: &Path) {
        assert!(
            !self.is_running(),
            "stop the server before editing its token"
        );
        std::fs::remove_file(object).unwrap_or_else(|e| panic!("remove {object:?}: {e}"));
        let _ = std::fs::remove_file(object.with_extension("lock"));
    }
}
