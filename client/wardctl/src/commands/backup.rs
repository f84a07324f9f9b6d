//! Writing a backup stream to a file so that an interrupted backup never looks complete.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use ward_client::{Client, Error};

use crate::failure::Failure;

/// Streams a backup into `file` through a private temporary file beside it, renamed into
/// place only once every chunk is on disk: an interrupted backup never looks complete.
pub async fn write_backup(client: &Client, file: &Path) -> Result<u64, Failure> {
    if file.exists() {
        return Err(Failure::Usage(format!(
            "{} exists; choose a new file",
            file.display()
        )));
    }
    let mut partial = file.as_os_str().to_owned();
    partial.push(".partial");
    let partial = PathBuf::from(partial);
    let mut out = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&partial)
        .map_err(|e| Failure::Usage(format!("cannot create {}: {e}", partial.display())))?;
    let result = async {
        let mut stream = client.backup_stream().await?;
        let mut bytes = 0u64;
        while let Some(chunk) = stream.message().await.map_err(Error::from)? {
            out.write_all(&chunk.data)?;
            bytes += chunk.data.len() as u64;
        }
        out.sync_all()?;
        std::fs::rename(&partial, file)?;
        Ok::<u64, Failure>(bytes)
    }
    .await;
    if result.is_err() {
        let _ = std::fs::remove_file(&partial);
    }
    result
}
