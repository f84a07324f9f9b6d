//! The tonic service `ward.v1.Alerts`: converts between wire types and the alerts domain, takes
//! the caller from the verified connection, and maps errors through `status.rs`. No decisions
//! here.

use super::peer;
use super::status::to_status;
use super::wire::{alert_item, leak_report, test_webhook};
use crate::alerts::{AlertsApi, WatchQuery};
use crate::keys::Keys;
use futures::stream::{self, BoxStream, StreamExt};
use std::sync::Arc;
use tonic::{Request, Response, Status};
use ward::v1::{self as pb, alerts_server::Alerts};
use zeroize::Zeroizing;

/// `ward.v1.Alerts` over the alerts domain and the verifier (leak reports).
pub struct AlertsService {
    api: Arc<AlertsApi>,
    keys: Arc<Keys>,
}

impl AlertsService {
    /// A service over `api` and `keys`.
    pub fn new(api: Arc<AlertsApi>, keys: Arc<Keys>) -> Self {
        Self { api, keys }
    }
}

#[tonic::async_trait]
impl Alerts for AlertsService {
    type WatchAlertsStream = BoxStream<'static, Result<pb::WatchAlertsResponse, Status>>;

    async fn watch_alerts(
        &self,
        req: Request<pb::WatchAlertsRequest>,
    ) -> Result<Response<Self::WatchAlertsStream>, Status> {
        let peer = peer(&req)?;
        let r = req.into_inner();
        let query = WatchQuery {
            from_seq: r.from_seq,
            follow: r.follow,
            types: r.types,
            name_prefix: r.name_prefix,
        };
        let reader = self.api.watch(&peer, query).await.map_err(to_status)?;
        // Polled only as fast as the client takes messages, like StreamAudit.
        let items = stream::unfold(Some(reader), |state| async move {
            let mut reader = state?;
            match reader.next().await {
                Ok(Some(item)) => Some((Ok(alert_item(item)), Some(reader))),
                Ok(None) => None,
                Err(e) => Some((Err(to_status(e)), None)),
            }
        });
        Ok(Response::new(items.boxed()))
    }

    async fn report_leak(
        &self,
        req: Request<pb::ReportLeakRequest>,
    ) -> Result<Response<pb::ReportLeakResponse>, Status> {
        let peer = peer(&req)?;
        let r = req.into_inner();
        let report = self
            .keys
            .report_leak(
                &peer,
                Zeroizing::new(r.api_key),
                &r.location,
                &r.source,
                r.quarantine,
            )
            .await
            .map_err(to_status)?;
        Ok(Response::new(leak_report(report)))
    }

    async fn test_webhook(
        &self,
        req: Request<pb::TestWebhookRequest>,
    ) -> Result<Response<pb::TestWebhookResponse>, Status> {
        let peer = peer(&req)?;
        let r = req.into_inner();
        let (id, attempt) = self
            .api
            .test_webhook(&peer, &r.url)
            .await
            .map_err(to_status)?;
        Ok(Response::new(test_webhook(id, attempt)))
    }
}
