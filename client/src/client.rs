//! The connected SDK client: an mTLS channel per endpoint (see [`crate::endpoints`] for which
//! one a call uses), per-call timeouts, retries of calls that are safe to repeat (on another
//! endpoint when there is one), and client-side checking of value checksums.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tonic::transport::Channel;
use tonic::Code;
use zeroize::{Zeroize, Zeroizing};

use crate::config::{ClientConfig, DEFAULT_TIMEOUT};
use crate::endpoints::{EndpointStatus, Endpoints};
use crate::error::Error;
use crate::retry::RetryPolicy;
use crate::retry::{is_retryable, CallKind};
use ward::v1::admin_client::AdminClient;
use ward::v1::alerts_client::AlertsClient;
use ward::v1::audit_client::AuditClient;
use ward::v1::backup_client::BackupClient;
use ward::v1::keys_client::KeysClient;
use ward::v1::secrets_client::SecretsClient;
use ward::v1::{
    batch_fetch_result, BatchFetchSecretsRequest, BatchFetchSecretsResponse,
    DescribeKeyringRequest, DescribeSecretRequest, DestroyVersionRequest, DestroyVersionResponse,
    FetchSecretRequest, FetchSecretResponse, GetKeyUsageRequest, GetKeyUsageResponse,
    IssueKeyRequest, IssueKeyResponse, ItemError, KeyringStatus, ListSecretsRequest,
    ListSecretsResponse, PutSecretRequest, PutSecretResponse, ReportLeakRequest,
    ReportLeakResponse, RevokeSecretRequest, RevokeSecretResponse, RotateKeyringRequest,
    RotateKeyringResponse, RotateMasterKeyRequest, RotateMasterKeyResponse, RotateSecretRequest,
    RotateSecretResponse, SecretMetadata, SetVersionStateRequest, SetVersionStateResponse,
    StreamAuditRequest, StreamAuditResponse, TestWebhookRequest, TestWebhookResponse,
    UpdateKeyPolicyRequest, UpdateKeyPolicyResponse, VerifyAuditLogRequest, VerifyAuditLogResponse,
    VerifyKeyRequest, VerifyKeyResponse, WatchAlertsRequest, WatchAlertsResponse, WatchEvent,
    WatchSecretsRequest,
};

/// Largest response accepted. tonic's default (4 MiB) is below a full batch fetch: 100 items
/// of the server's default 64 KiB maximum value are 6.4 MiB, and the server's limit can be
/// raised.
const MAX_RESPONSE_BYTES: usize = 64 * 1024 * 1024;

/// A connected Ward client. Cheap to clone; clones share one HTTP/2 connection per endpoint
/// and what is known of each endpoint's health.
///
/// Reads (fetch, batch fetch, describe, list, zero-cost verify) are retried on `UNAVAILABLE`,
/// transport failures and `DEADLINE_EXCEEDED`; writes (`put_secret`, `issue_key`, the
/// lifecycle calls) only when their `request_id` is set, because the server deduplicates by
/// it, and never after `DEADLINE_EXCEEDED`. Every other status is returned at once.
///
/// With several endpoints (replicas of one cluster), each call goes to the first healthy one
/// in the configured order; a retry goes to the next endpoint not yet tried by that call,
/// without waiting, and backs off only when it comes back to one it tried. A call that is not
/// safe to repeat is sent once, to the best endpoint known, and its failure is returned. See
/// [`Client::endpoints`].
#[derive(Clone, Debug)]
pub struct Client {
    endpoints: Arc<Endpoints>,
    timeout: Duration,
    retry: RetryPolicy,
}

/// A fetched secret whose value lives in a zeroizing buffer; `Debug` shows no value.
pub struct FetchedSecret {
    /// Name, version, state, checksum and the rest, with `value` left empty.
    pub metadata: FetchSecretResponse,
    /// The secret value, wiped from memory when dropped.
    pub value: Zeroizing<Vec<u8>>,
}

impl fmt::Debug for FetchedSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FetchedSecret")
            .field("name", &self.metadata.name)
            .field("version", &self.metadata.version)
            .field("state", &self.metadata.state)
            .field("checksum", &self.metadata.checksum)
            .field(
                "value",
                &format_args!("<{} bytes redacted>", self.value.len()),
            )
            .finish_non_exhaustive()
    }
}

impl Client {
    /// Connects over mutual TLS to the first endpoint (in the configured order) that accepts
    /// a connection, retrying per the config's retry policy when none does; the other
    /// endpoints are connected when first used. An endpoint that refused is marked unhealthy.
    pub async fn connect(cfg: ClientConfig) -> Result<Self, Error> {
        Ok(Self {
            endpoints: Arc::new(Endpoints::connect(&cfg).await?),
            timeout: cfg.timeout(),
            retry: cfg.retry().clone(),
        })
    }

    /// Wraps an existing channel (e.g. to an in-process server) with default timeout and retries.
    pub fn from_channel(channel: Channel) -> Self {
        Self {
            endpoints: Arc::new(Endpoints::single(channel)),
            timeout: DEFAULT_TIMEOUT,
            retry: RetryPolicy::default(),
        }
    }

    /// What the client knows of each endpoint, in the configured order: whether it is
    /// healthy (calls go to the first healthy one) and how many times in a row it failed.
    pub fn endpoints(&self) -> Vec<EndpointStatus> {
        self.endpoints.status()
    }

    /// Sets the per-attempt call timeout.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Sets the retry policy.
    pub fn with_retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    /// The generated client on the channel of the endpoint a call would use now, for calls
    /// the SDK does not wrap (no timeout, retry or failover is added).
    pub fn raw(&self) -> SecretsClient<Channel> {
        secrets(self.endpoints.preferred())
    }

    /// The channel of the endpoint a call would use now, for other services on the same server
    /// (health, ext_authz).
    pub fn channel(&self) -> Channel {
        self.endpoints.preferred()
    }

    /// The generated `ward.v1.Keys` client on the channel of the endpoint a call would use now.
    pub fn raw_keys(&self) -> KeysClient<Channel> {
        keys(self.endpoints.preferred())
    }

    /// Asks whether a presented API key is good. A denial is an `Ok` response with
    /// `valid == false` and the reason in `result`; errors are the caller's faults and outages.
    ///
    /// A charged verification (cost absent or non-zero) spends quota, so it is never retried;
    /// a zero-cost check is a read and is retried like one.
    pub async fn verify_key(&self, req: VerifyKeyRequest) -> Result<VerifyKeyResponse, Error> {
        let kind = if req.cost == Some(0) {
            CallKind::Read
        } else {
            CallKind::Write
        };
        self.call_on(
            keys,
            kind,
            req,
            |mut c, r| async move { c.verify_key(r).await },
        )
        .await
    }

    /// Replaces fields of an API key's policy (those named by `update_mask`; all when empty).
    /// Retried only if `request_id` is set.
    pub async fn update_key_policy(
        &self,
        req: UpdateKeyPolicyRequest,
    ) -> Result<UpdateKeyPolicyResponse, Error> {
        let kind = CallKind::write(&req.request_id);
        self.call_on(keys, kind, req, |mut c, r| async move {
            c.update_key_policy(r).await
        })
        .await
    }

    /// The generated `ward.v1.Audit` client on the channel of the endpoint a call would use now
    /// (no timeout, retry or failover added).
    pub fn audit_raw(&self) -> AuditClient<Channel> {
        audit(self.endpoints.preferred())
    }

    /// Opens an audit stream (`ward.v1.Audit/StreamAudit`). The timeout and retries apply to
    /// opening it only; the stream then runs until the server ends it (not following) or the
    /// caller drops it. To resume after a disconnect, open another with `from_seq` = the last
    /// `seq` received + 1: every later record arrives exactly once.
    ///
    /// The audit log is per replica, and so are its sequence numbers: with several endpoints
    /// the stream comes from the endpoint that opened it, and a resumed stream may come from
    /// another replica's log. To follow one replica's log, give only its address.
    pub async fn stream_audit(
        &self,
        req: StreamAuditRequest,
    ) -> Result<tonic::Streaming<StreamAuditResponse>, Error> {
        self.call_on(audit, CallKind::Read, req, |mut c, r| async move {
            c.stream_audit(r).await
        })
        .await
    }

    /// Streams alert records (see `ward.v1.Alerts/WatchAlerts`).
    pub async fn watch_alerts(
        &self,
        req: WatchAlertsRequest,
    ) -> Result<tonic::Streaming<WatchAlertsResponse>, Error> {
        self.call_on(alerts, CallKind::Read, req, |mut c, r| async move {
            c.watch_alerts(r).await
        })
        .await
    }

    /// Reports a key found where it should not be (raises `key.leak_reported`). Not retried:
    /// a repeat would raise the alert twice.
    pub async fn report_leak(&self, req: ReportLeakRequest) -> Result<ReportLeakResponse, Error> {
        self.call_on(alerts, CallKind::Write, req, |mut c, r| async move {
            c.report_leak(r).await
        })
        .await
    }

    /// Sends a signed test event to a configured webhook URL.
    pub async fn test_webhook(&self, url: impl Into<String>) -> Result<TestWebhookResponse, Error> {
        let req = TestWebhookRequest { url: url.into() };
        self.call_on(alerts, CallKind::Write, req, |mut c, r| async move {
            c.test_webhook(r).await
        })
        .await
    }

    /// Usage counters of an API key (`version` 0: every version).
    pub async fn get_key_usage(
        &self,
        name: impl Into<String>,
        version: u64,
    ) -> Result<GetKeyUsageResponse, Error> {
        let req = GetKeyUsageRequest {
            name: name.into(),
            version,
        };
        self.call_on(keys, CallKind::Read, req, |mut c, r| async move {
            c.get_key_usage(r).await
        })
        .await
    }

    /// Verifies the audit log from `from_seq` to `to_seq` (0, 0: all of it). A broken log is a
    /// successful answer with `ok` false and `first_broken` set. With several endpoints this is
    /// the log of the replica that answers (each keeps its own).
    pub async fn verify_audit_log(
        &self,
        from_seq: u64,
        to_seq: u64,
    ) -> Result<VerifyAuditLogResponse, Error> {
        let req = VerifyAuditLogRequest { from_seq, to_seq };
        self.call_on(audit, CallKind::Read, req, |mut c, r| async move {
            c.verify_audit_log(r).await
        })
        .await
    }

    /// Stores a new PRIMARY version of a STATIC secret. Retried only if `request_id` is set.
    pub async fn put_secret(&self, req: PutSecretRequest) -> Result<PutSecretResponse, Error> {
        let kind = CallKind::write(&req.request_id);
        self.call(kind, req, |mut c, r| async move { c.put_secret(r).await })
            .await
    }

    /// Generates and stores a new API key; the response holds the plaintext key, once.
    /// Retried only if `request_id` is set (a retry then returns the same key).
    pub async fn issue_key(&self, req: IssueKeyRequest) -> Result<IssueKeyResponse, Error> {
        let kind = CallKind::write(&req.request_id);
        self.call(kind, req, |mut c, r| async move { c.issue_key(r).await })
            .await
    }

    /// Fetches one version of a secret (`version` 0 = PRIMARY) and checks its CRC32C.
    ///
    /// The response's `value` is the secret itself, in an ordinary `Vec`, and the derived
    /// `Debug` prints it: never log the response. Prefer [`Client::fetch_secret_zeroizing`]
    /// when the value is kept for a while. A checksum mismatch is `DATA_LOSS`.
    pub async fn fetch_secret(
        &self,
        name: impl Into<String>,
        version: u64,
    ) -> Result<FetchSecretResponse, Error> {
        let req = FetchSecretRequest {
            name: name.into(),
            version,
        };
        let mut resp = self
            .call(CallKind::Read, req, |mut c, r| async move {
                c.fetch_secret(r).await
            })
            .await?;
        match verify_checksum(&mut resp) {
            Ok(()) => Ok(resp),
            Err(item) => Err(Error::Status {
                code: Code::DataLoss,
                message: item.message,
            }),
        }
    }

    /// [`Client::fetch_secret`] with the value moved (not copied) into a zeroizing buffer.
    ///
    /// Copies made before the SDK sees the value (TLS and HTTP/2 buffers inside tonic) are
    /// outside its reach; this wipes the one the caller keeps.
    pub async fn fetch_secret_zeroizing(
        &self,
        name: impl Into<String>,
        version: u64,
    ) -> Result<FetchedSecret, Error> {
        let mut metadata = self.fetch_secret(name, version).await?;
        let value = Zeroizing::new(std::mem::take(&mut metadata.value));
        Ok(FetchedSecret { metadata, value })
    }

    /// Fetches many `(name, version)` pairs in one call (at most 100; version 0 = PRIMARY).
    ///
    /// Each item succeeds or fails on its own; an item whose checksum does not match its value
    /// is turned into a `DATA_LOSS` item error and its value wiped.
    pub async fn batch_fetch<I, S>(&self, items: I) -> Result<BatchFetchSecretsResponse, Error>
    where
        I: IntoIterator<Item = (S, u64)>,
        S: Into<String>,
    {
        let req = BatchFetchSecretsRequest {
            items: items
                .into_iter()
                .map(|(name, version)| FetchSecretRequest {
                    name: name.into(),
                    version,
                })
                .collect(),
        };
        let mut resp = self
            .call(CallKind::Read, req, |mut c, r| async move {
                c.batch_fetch_secrets(r).await
            })
            .await?;
        for result in &mut resp.results {
            if let Some(batch_fetch_result::Result::Secret(secret)) = &mut result.result {
                if let Err(item) = verify_checksum(secret) {
                    result.result = Some(batch_fetch_result::Result::Error(item));
                }
            }
        }
        Ok(resp)
    }

    /// Returns a secret's metadata and every version's state; never a value.
    pub async fn describe_secret(&self, name: impl Into<String>) -> Result<SecretMetadata, Error> {
        let req = DescribeSecretRequest { name: name.into() };
        self.call(CallKind::Read, req, |mut c, r| async move {
            c.describe_secret(r).await
        })
        .await
    }

    /// Adds a keyring term for new versions (`admin` verb). Never retried: each call adds a
    /// term.
    pub async fn rotate_keyring(&self) -> Result<RotateKeyringResponse, Error> {
        self.admin_once(|mut c| async move { c.rotate_keyring(RotateKeyringRequest {}).await })
            .await
    }

    /// Creates a new HSM master key and rewraps the keyring under it (`admin` verb); an empty
    /// label lets the server derive the next one. Never retried.
    pub async fn rotate_master_key(
        &self,
        new_label: impl Into<String>,
    ) -> Result<RotateMasterKeyResponse, Error> {
        let req = RotateMasterKeyRequest {
            new_label: new_label.into(),
        };
        self.admin_once(|mut c| async move { c.rotate_master_key(req).await })
            .await
    }

    /// The keyring's terms, master key and wrap count (`admin` verb).
    pub async fn describe_keyring(&self) -> Result<KeyringStatus, Error> {
        self.admin_once(|mut c| async move { c.describe_keyring(DescribeKeyringRequest {}).await })
            .await
    }

    /// Starts a backup of the whole vault (`admin` verb): the stream's chunks, concatenated,
    /// are the backup file (`ward-server restore --from FILE`). Never retried, and not limited
    /// by the per-call timeout (a large store takes as long as it takes; the connection's
    /// keep-alive notices a dead server).
    pub async fn backup_stream(&self) -> Result<tonic::Streaming<ward::v1::BackupChunk>, Error> {
        let (i, channel) = self.endpoints.next(&mut self.endpoints.tried());
        let result = BackupClient::new(channel)
            .stream_backup(ward::v1::StreamBackupRequest {})
            .await
            .map(tonic::Response::into_inner)
            .map_err(Error::from);
        self.endpoints.report(i, &result);
        result
    }

    /// One admin call, limited by the per-call timeout, never repeated.
    async fn admin_once<Resp, F, Fut>(&self, rpc: F) -> Result<Resp, Error>
    where
        F: FnOnce(AdminClient<Channel>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<Resp>, tonic::Status>>,
    {
        let (i, channel) = self.endpoints.next(&mut self.endpoints.tried());
        let result = self.within_timeout(rpc(AdminClient::new(channel))).await;
        self.endpoints.report(i, &result);
        result
    }

    /// Lists one page of secrets; pass the response's `next_page_token` back for the next.
    pub async fn list_secrets(
        &self,
        req: ListSecretsRequest,
    ) -> Result<ListSecretsResponse, Error> {
        self.call(CallKind::Read, req, |mut c, r| async move {
            c.list_secrets(r).await
        })
        .await
    }

    /// Lists every matching secret, following `next_page_token` from `req.page_token` on.
    pub async fn list_all(
        &self,
        mut req: ListSecretsRequest,
    ) -> Result<Vec<SecretMetadata>, Error> {
        let mut all = Vec::new();
        loop {
            let page = self.list_secrets(req.clone()).await?;
            all.extend(page.secrets);
            if page.next_page_token.is_empty() {
                return Ok(all);
            }
            // A server that hands back the token it was given would keep us here forever.
            if page.next_page_token == req.page_token {
                return Err(Error::Status {
                    code: Code::Internal,
                    message: "server returned the same page token twice".into(),
                });
            }
            req.page_token = page.next_page_token;
        }
    }

    /// Rotates a secret: a new PRIMARY (for an API key, generated and returned once in
    /// `api_key`), the old one ACTIVE for the grace period. Retried only if `request_id` is set
    /// (a retry then returns the same result, and the same key).
    pub async fn rotate_secret(
        &self,
        req: RotateSecretRequest,
    ) -> Result<RotateSecretResponse, Error> {
        let kind = CallKind::write(&req.request_id);
        self.call(
            kind,
            req,
            |mut c, r| async move { c.rotate_secret(r).await },
        )
        .await
    }

    /// Revokes one version or the whole secret, effective on the server's very next call.
    /// Retried only if `request_id` is set.
    pub async fn revoke_secret(
        &self,
        req: RevokeSecretRequest,
    ) -> Result<RevokeSecretResponse, Error> {
        let kind = CallKind::write(&req.request_id);
        self.call(
            kind,
            req,
            |mut c, r| async move { c.revoke_secret(r).await },
        )
        .await
    }

    /// Moves a version between ACTIVE and INACTIVE, or promotes an ACTIVE one to PRIMARY.
    /// Retried only if `request_id` is set.
    pub async fn set_version_state(
        &self,
        req: SetVersionStateRequest,
    ) -> Result<SetVersionStateResponse, Error> {
        let kind = CallKind::write(&req.request_id);
        self.call(
            kind,
            req,
            |mut c, r| async move { c.set_version_state(r).await },
        )
        .await
    }

    /// Destroys a version for good (its value can never be recovered). Retried only if
    /// `request_id` is set.
    pub async fn destroy_version(
        &self,
        req: DestroyVersionRequest,
    ) -> Result<DestroyVersionResponse, Error> {
        let kind = CallKind::write(&req.request_id);
        self.call(
            kind,
            req,
            |mut c, r| async move { c.destroy_version(r).await },
        )
        .await
    }

    /// Opens a WatchSecrets stream: first the differences from what `req.held` says the
    /// client holds, then SYNCED, then live changes. Opening is retried like a read and
    /// limited by the call timeout; the stream itself runs until the server ends it or it is
    /// dropped. See [`crate::Cache`] for a cache that keeps itself current with it.
    ///
    /// With several endpoints, the stream comes from one of them; when it breaks, that endpoint
    /// is marked unhealthy, so opening the stream again goes to another.
    pub async fn watch_secrets(&self, req: WatchSecretsRequest) -> Result<WatchStream, Error> {
        let (endpoint, inner) = self
            .call_at(secrets, CallKind::Read, req, |mut c, r| async move {
                c.watch_secrets(r).await
            })
            .await;
        Ok(WatchStream {
            inner: inner?,
            endpoints: self.endpoints.clone(),
            endpoint,
        })
    }

    /// Runs one Secrets RPC under the timeout, retry and failover policy.
    async fn call<Req, Resp, F, Fut>(&self, kind: CallKind, req: Req, rpc: F) -> Result<Resp, Error>
    where
        Req: Clone,
        F: FnMut(SecretsClient<Channel>, tonic::Request<Req>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<Resp>, tonic::Status>>,
    {
        self.call_on(secrets, kind, req, rpc).await
    }

    /// [`Client::call`] on any generated client, made by `make` on an endpoint's channel.
    async fn call_on<C, Req, Resp, F, Fut>(
        &self,
        make: fn(Channel) -> C,
        kind: CallKind,
        req: Req,
        rpc: F,
    ) -> Result<Resp, Error>
    where
        Req: Clone,
        F: FnMut(C, tonic::Request<Req>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<Resp>, tonic::Status>>,
    {
        self.call_at(make, kind, req, rpc).await.1
    }

    /// [`Client::call_on`], also saying which endpoint gave the answer. The request is cloned
    /// only when another attempt may follow, so a value in a non-retryable write exists in one
    /// copy. A retry goes to an endpoint this call has not tried yet, at once; only when every
    /// endpoint was tried does it wait out the retry backoff first.
    async fn call_at<C, Req, Resp, F, Fut>(
        &self,
        make: fn(Channel) -> C,
        kind: CallKind,
        req: Req,
        mut rpc: F,
    ) -> (usize, Result<Resp, Error>)
    where
        Req: Clone,
        F: FnMut(C, tonic::Request<Req>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<Resp>, tonic::Status>>,
    {
        let max = if kind.may_repeat() {
            self.retry.attempts()
        } else {
            1
        };
        let mut tried = self.endpoints.tried();
        let mut attempt = 1;
        loop {
            let (i, channel) = self.endpoints.next(&mut tried);
            if attempt >= max {
                let result = self.attempt(make(channel), &mut rpc, req).await;
                self.endpoints.report(i, &result);
                return (i, result);
            }
            let result = self.attempt(make(channel), &mut rpc, req.clone()).await;
            self.endpoints.report(i, &result);
            match result {
                Err(e) if is_retryable(kind, &e) => {
                    if tried.all() {
                        tokio::time::sleep(self.retry.backoff(attempt)).await;
                    }
                    attempt += 1;
                }
                other => return (i, other),
            }
        }
    }

    /// One attempt, limited by the per-call timeout.
    async fn attempt<C, Req, Resp, F, Fut>(
        &self,
        client: C,
        rpc: &mut F,
        msg: Req,
    ) -> Result<Resp, Error>
    where
        F: FnMut(C, tonic::Request<Req>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<Resp>, tonic::Status>>,
    {
        self.within_timeout(rpc(client, tonic::Request::new(msg)))
            .await
    }

    /// Awaits one RPC for at most the per-call timeout.
    ///
    /// The deadline is enforced here only, not sent as `grpc-timeout`: a tonic server answers
    /// an expired `grpc-timeout` with CANCELLED, which would race with the local timer and make
    /// the code (and so the retry decision) depend on timing. Dropping the call on timeout
    /// resets its HTTP/2 stream, which stops the handler on the server all the same.
    async fn within_timeout<Resp>(
        &self,
        call: impl Future<Output = Result<tonic::Response<Resp>, tonic::Status>>,
    ) -> Result<Resp, Error> {
        match tokio::time::timeout(self.timeout, call).await {
            Ok(Ok(response)) => Ok(response.into_inner()),
            Ok(Err(status)) => Err(Error::from(status)),
            Err(_) => Err(Error::Status {
                code: Code::DeadlineExceeded,
                message: format!("no answer within {:?}", self.timeout),
            }),
        }
    }
}

/// The generated clients on an endpoint's channel.
fn secrets(channel: Channel) -> SecretsClient<Channel> {
    SecretsClient::new(channel).max_decoding_message_size(MAX_RESPONSE_BYTES)
}

fn keys(channel: Channel) -> KeysClient<Channel> {
    KeysClient::new(channel).max_decoding_message_size(MAX_RESPONSE_BYTES)
}

fn audit(channel: Channel) -> AuditClient<Channel> {
    AuditClient::new(channel)
}

fn alerts(channel: Channel) -> AlertsClient<Channel> {
    AlertsClient::new(channel)
}

/// A WatchSecrets stream. Events carry metadata only, never a value.
#[derive(Debug)]
pub struct WatchStream {
    inner: tonic::Streaming<WatchEvent>,
    endpoints: Arc<Endpoints>,
    /// The endpoint serving the stream.
    endpoint: usize,
}

impl WatchStream {
    /// The next event; `None` once the server ended the stream. An error (e.g. UNAVAILABLE
    /// at server shutdown, or a transport failure) also ends it: reconnect, resending what is
    /// held, to lose nothing. Such an error marks the stream's endpoint unhealthy, so the
    /// reconnection goes to another endpoint when there is one.
    pub async fn next(&mut self) -> Option<Result<WatchEvent, Error>> {
        let item = self.inner.message().await.map_err(Error::from).transpose();
        if let Some(Err(e)) = &item {
            self.endpoints.report::<()>(self.endpoint, &Err(e.clone()));
        }
        item
    }
}

/// Checks a fetched value against its CRC32C; on mismatch wipes the value and describes the
/// failure as a `DATA_LOSS` item error.
fn verify_checksum(secret: &mut FetchSecretResponse) -> Result<(), ItemError> {
    if crc32c::crc32c(&secret.value) == secret.checksum {
        return Ok(());
    }
    secret.value.zeroize();
    Err(ItemError {
        code: Code::DataLoss as i32,
        message: format!(
            "checksum mismatch for {} version {}: value corrupted in transit or at rest",
            secret.name, secret.version
        ),
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn secret(value: &[u8], checksum: u32) -> FetchSecretResponse {
        FetchSecretResponse {
            name: "a/b".into(),
            version: 2,
            value: value.to_vec(),
            checksum,
            ..Default::default()
        }
    }

    #[test]
    fn checksum_ok_and_mismatch() {
        let mut good = secret(b"hunter2", crc32c::crc32c(b"hunter2"));
        assert!(verify_checksum(&mut good).is_ok());
        assert_eq!(good.value, b"hunter2");

        let mut bad = secret(b"hunter2", 1);
        let item = verify_checksum(&mut bad).unwrap_err();
        assert_eq!(item.code, Code::DataLoss as i32);
        assert!(!item.message.contains("hunter2"));
        assert!(bad.value.iter().all(|&b| b == 0));
    }

    #[test]
    fn fetched_secret_debug_redacts() {
        let s = FetchedSecret {
            metadata: secret(b"", 0),
            value: Zeroizing::new(b"hunter2".to_vec()),
        };
        let dbg = format!("{s:?}");
        assert!(
            !dbg.contains("hunter2") && !dbg.contains("104, 117"),
            "{dbg}"
        );
        assert!(dbg.contains("7 bytes redacted"));
    }

    #[tokio::test]
    async fn garbage_pem_is_a_config_error() {
        let ca = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
        let key = "-----BEGIN PRIVATE KEY-----\nMIIE\n-----END PRIVATE KEY-----\n";
        let cfg = ClientConfig::new("127.0.0.1:1", ca, ca, key)
            .unwrap()
            .with_retry(RetryPolicy::none());
        // Garbage PEM bodies are refused while building the TLS connector: a config error.
        let err = Client::connect(cfg).await.unwrap_err();
        assert!(matches!(err, Error::Config(_)), "{err:?}");
        assert!(
            err.message().starts_with("unusable TLS material: "),
            "{err}"
        );
    }
}
