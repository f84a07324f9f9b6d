//! The tonic service `ward.v1.Audit`: converts between wire types and the audit domain, takes
//! the caller from the verified connection, and maps errors through `status.rs`. No decisions
//! here.

use crate::audit::{
    code_name, AuditAccess, AuditRecord, Event, Problem, StreamItem, StreamQuery, Verification,
};
use crate::clock::to_timestamp;
use crate::service::peer;
use crate::status::to_status;
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
                Ok(Some(item)) => Some((Ok(response(item)), Some(reader))),
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

fn response(item: StreamItem) -> pb::StreamAuditResponse {
    let item = match item {
        StreamItem::Record(r, hash) => pb::stream_audit_response::Item::Record(record(*r, hash)),
        StreamItem::Gap { from, to, pruned } => {
            pb::stream_audit_response::Item::Gap(pb::AuditGap {
                from_seq: from,
                to_seq: to,
                pruned,
            })
        }
    };
    pb::StreamAuditResponse { item: Some(item) }
}

/// The wire form of a record.
pub fn record(r: AuditRecord, hash: [u8; 32]) -> pb::AuditRecord {
    let (kind, covers, below) = match &r.event {
        Event::Call => (pb::AuditRecordKind::Call, 0, 0),
        Event::Checkpoint(c) => (pb::AuditRecordKind::Checkpoint, c.covers_seq, 0),
        Event::Prune { below } => (pb::AuditRecordKind::Prune, 0, *below),
    };
    let targets = r
        .targets
        .iter()
        .enumerate()
        .map(|(i, (name, version))| pb::AuditTarget {
            name: name.clone(),
            version: *version,
            code: r.target_code(i),
        })
        .collect();
    pb::AuditRecord {
        seq: r.seq,
        time: Some(to_timestamp(r.time_ms)),
        kind: kind as i32,
        identity: r.identity,
        peer: r.peer,
        method: r.method,
        targets,
        code: r.code,
        code_name: code_name(r.code).to_owned(),
        request_id: r.request_id,
        key_id: r.key_id,
        prev_hash: r.prev_hash.to_vec(),
        hash: hash.to_vec(),
        checkpoint_covers_seq: covers,
        pruned_below_seq: below,
    }
}

fn verification(v: Verification) -> pb::VerifyAuditLogResponse {
    pb::VerifyAuditLogResponse {
        ok: v.ok(),
        from_seq: v.from,
        to_seq: v.to,
        records_checked: v.records_checked,
        checkpoints_verified: v.checkpoints_verified,
        signed_through_seq: v.signed_through,
        oldest_seq: v.oldest,
        head_seq: v.head,
        first_broken: v.first_broken.map(|b| pb::BrokenRecord {
            seq: b.seq,
            problem: problem(b.problem) as i32,
            reason: b.reason,
        }),
    }
}

fn problem(p: Problem) -> pb::AuditProblem {
    match p {
        Problem::Undecodable => pb::AuditProblem::Undecodable,
        Problem::Altered => pb::AuditProblem::Altered,
        Problem::Misplaced => pb::AuditProblem::Misplaced,
        Problem::Missing => pb::AuditProblem::Missing,
        Problem::Unlinked => pb::AuditProblem::Unlinked,
        Problem::CheckpointForged => pb::AuditProblem::CheckpointForged,
        Problem::CheckpointMismatch => pb::AuditProblem::CheckpointMismatch,
        Problem::CheckpointOrder => pb::AuditProblem::CheckpointOrder,
        Problem::Unsigned => pb::AuditProblem::Unsigned,
    }
}
