//! Storage faults injected into a running server (ward-server's `fault-injection` feature,
//! server/src/store/fault.rs): the server is started with `WARD_FAULT_FILE` naming a file in its
//! data dir, and the test writes the faults in force into that file while it runs.

use std::path::PathBuf;

use crate::TestServer;

/// The environment variable that arms fault injection in a server built with it.
pub const FAULT_FILE_ENV: &str = "WARD_FAULT_FILE";
/// What the server logs when it reads the fault file.
const ARMED_LINE: &str = "storage fault injection armed";

impl TestServer {
    /// Restarts the server (`serve`) with storage fault injection armed and no fault in force;
    /// [`inject_faults`](Self::inject_faults) then changes what fails, at once. Panics if the
    /// binary was built without the `fault-injection` feature.
    pub fn restart_with_faults(&mut self) {
        self.inject_faults("");
        let file = self.fault_file();
        let mark = self.logs.lock().unwrap().stderr_mark();
        self.restart_with_env(&[(FAULT_FILE_ENV, file.to_str().unwrap())]);
        let since = self.logs.lock().unwrap().stderr_from(mark);
        assert!(
            since.contains(ARMED_LINE),
            "the server did not arm fault injection: build it with \
             `cargo build --workspace --bins --all-features` (feature fault-injection)\n{since}"
        );
    }

    /// Puts `faults` in force, one per line (`write`, `flush-hang`, `free-bytes N`; "" lifts
    /// them all). The file is replaced atomically, so the server never reads half of it.
    pub fn inject_faults(&self, faults: &str) {
        let file = self.fault_file();
        let tmp = file.with_extension("tmp");
        std::fs::write(&tmp, faults).unwrap();
        std::fs::rename(&tmp, &file).unwrap();
    }

    fn fault_file(&self) -> PathBuf {
        self.scratch_dir().join("storage-faults")
    }
}
