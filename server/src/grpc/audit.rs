//! The tonic service `ward.v1.Audit`: converts between wire types and the audit domain, takes
//! the caller from the verified connection, and maps errors through `status.rs`. No decisions
//! here.

use super::peer;
use super::status::to_status;
use super::wire::{audit_item, verification};
use crate::audit::{AuditAccess, StreamQuery};
use futures::stream::{self, BoxStream, StreamExt};
use std::sync::Arc;
use tonic::{Request, Response, Status};
use ward::v1::{self as pb, audit_server::Audit};

/// `ward.v1.Audit` over [`AuditAccess`].
pub struct AuditService {
    access: Arc<AuditAccess>,
}

impl AuditService {
    /// A service over `access`.
    pub fn new(access: Arc<AuditAccess>) -> Self {
        Self { access }
    }
}

#[tonic::async_trait]
impl Audit for AuditService {
    type StreamAuditStream = BoxStream<'static, Result<pb::StreamAuditResponse, Status>>;

    async fn stream_audit(
        &self,
        req: Request<pb::StreamAuditRequest>,
    ) -> Result<Response<Self::StreamAuditStream>, Status> {
        let peer = peer(&req)?;
        let r = req.into_inner();
        let query = StreamQuery {
            from_seq: r.from_seq,
            last: r.last,
            follow: r.follow,
            identity: r.identity,
            name_prefix: r.name_prefix,
            method: r.method,
            outcome: r.outcome,
        };
        let reader = self.access.stream(&peer, query).await.map_err(to_status)?;
        // Polled only as fast as the client takes messages (HTTP/2 flow control): a consumer
        // that stops reading parks this stream, nothing else.
        let items = stream::unfold(Some(reader), |state| async move {
            let mut reader = state?;
            match reader.next().await {
                Ok(Some(item)) => Some((Ok(audit_item(item)), Some(reader))),
                Ok(None) => None,
                Err(e) => Some((Err(to_status(e)), None)),
            }
        });
        Ok(Response::new(items.boxed()))
    }

    async fn verify_audit_log(
        &self,
        req: Request<pb::VerifyAuditLogRequest>,
    ) -> Result<Response<pb::VerifyAuditLogResponse>, Status> {
        let peer = peer(&req)?;
        let r = req.into_inner();
        let v = self
            .access
            .verify(&peer, r.from_seq, r.to_seq)
            .await
            .map_err(to_status)?;
        Ok(Response::new(verification(v)))
    }
}
