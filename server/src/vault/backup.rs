//! Backups at the vault level: authorization and audit around a durable snapshot of the store.

use super::Vault;
use crate::audit::AuditRecord;
use crate::error::Result;
use crate::store::Snapshot;
use crate::tls::Peer;

impl Vault {
    /// A consistent, durable snapshot of the whole store for `ward.v1.Backup` (`admin` verb).
    /// Audited like a read: nothing is released unless its audit record is durable.
    pub async fn backup(&self, peer: &Peer) -> Result<Snapshot> {
        let rec = AuditRecord::new(peer, "StreamBackup", self.now());
        let result = match self.authorize_admin(peer) {
            Ok(()) => crate::backup::durable_snapshot(self.store.clone()).await,
            Err(e) => Err(e),
        };
        self.finish_read(rec, result).await
    }
}
