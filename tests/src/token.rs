//! The dev SoftHSM token of a server's data directory.

use std::path::PathBuf;

use crate::TestServer;

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
}
