//! The tonic service `ward.v1.Backup`: streams the vault's durable snapshot as a signed backup
//! file (vault/backup/format.rs), in chunks, from a blocking task (the HSM signs at the end).

use super::peer;
use super::status::to_status;
use crate::error::Error;
use crate::vault::backup::format;
use crate::vault::Vault;
use std::sync::Arc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use ward::v1::{self as pb, backup_server::Backup};

/// `ward.v1.Backup` over a [`Vault`].
pub struct BackupService {
    vault: Arc<Vault>,
}

impl BackupService {
    /// A service over `vault`.
    pub fn new(vault: Arc<Vault>) -> Self {
        Self { vault }
    }
}

#[tonic::async_trait]
impl Backup for BackupService {
    type StreamBackupStream = ReceiverStream<std::result::Result<pb::BackupChunk, Status>>;

    async fn stream_backup(
        &self,
        req: Request<pb::StreamBackupRequest>,
    ) -> std::result::Result<Response<Self::StreamBackupStream>, Status> {
        let peer = peer(&req)?;
        let snapshot = self.vault.backup(&peer).await.map_err(to_status)?;
        let audit = self.vault.audit().clone();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::task::spawn_blocking(move || {
            let (signer, label) = (audit.signer(), &audit.settings().key_label);
            let sent = format::encode(&snapshot, format::hsm_signer(&**signer, label), |data| {
                tx.blocking_send(Ok(pb::BackupChunk { data })).is_ok()
            });
            match sent {
                Ok(true) => {}
                Ok(false) => tracing::info!("backup stream abandoned by the client"),
                Err(e) => {
                    tracing::error!(error = %e, "backup not signed; stream ended incomplete");
                    let _ = tx.blocking_send(Err(to_status(Error::Unavailable(e))));
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}
