//! SDK and wardctl against an in-process mock of the Secrets service, over real mutual TLS with
//! rcgen certificates: the client side end to end, without the real server.
//!
//! The mock routes gRPC paths by hand instead of implementing the generated server trait, so an
//! RPC added to the proto later does not break this test binary (unknown paths answer
//! UNIMPLEMENTED).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use tokio::io::AsyncWriteExt;
use tonic::codegen::{http, BoxFuture, Context, Future, Poll, Service};
use tonic::server::{NamedService, UnaryService};
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};
use tonic::{Code, Status};

use ward_client::proto::{
    batch_fetch_result, BatchFetchResult, BatchFetchSecretsRequest, BatchFetchSecretsResponse,
    DescribeSecretRequest, FetchSecretRequest, FetchSecretResponse, IssueKeyRequest,
    IssueKeyResponse, ItemError, ListSecretsRequest, ListSecretsResponse, PutSecretRequest,
    PutSecretResponse, SecretKind, SecretMetadata, VersionInfo, VersionState,
};
use ward_client::{Client, ClientConfig, Error, RetryPolicy};

// ---------------------------------------------------------------------------------------------
// Certificates

/// A CA, a server certificate (SANs localhost, 127.0.0.1) and client identities, on disk.
struct Pki {
    dir: tempfile::TempDir,
    ca_pem: String,
    server_pem: String,
    server_key: String,
}

impl Pki {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let (ca_pem, issuer) = new_ca("Ward test CA");
        let (server_pem, server_key) = leaf(&issuer, "ward-server", &["localhost", "127.0.0.1"]);
        let (admin_pem, admin_key) = leaf(&issuer, "admin", &[]);
        let (_, stranger_issuer) = new_ca("Some other CA");
        let (stranger_pem, stranger_key) = leaf(&stranger_issuer, "stranger", &[]);
        let write = |name: &str, text: &str| std::fs::write(dir.path().join(name), text).unwrap();
        write("ca.pem", &ca_pem);
        write("admin.pem", &admin_pem);
        write("admin.key", &admin_key);
        write("stranger.pem", &stranger_pem);
        write("stranger.key", &stranger_key);
        Self {
            dir,
            ca_pem,
            server_pem,
            server_key,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn config(&self, addr: SocketAddr, who: &str) -> ClientConfig {
        ClientConfig::from_files(
            addr.to_string(),
            self.path("ca.pem"),
            self.path(&format!("{who}.pem")),
            self.path(&format!("{who}.key")),
        )
        .unwrap()
    }
}

fn new_ca(name: &str) -> (String, Issuer<'static, KeyPair>) {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    let key = KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    (cert.pem(), Issuer::new(params, key))
}

fn leaf(issuer: &Issuer<'static, KeyPair>, cn: &str, sans: &[&str]) -> (String, String) {
    let sans: Vec<String> = sans.iter().map(|s| s.to_string()).collect();
    let mut params = CertificateParams::new(sans).unwrap();
    params.distinguished_name.push(DnType::CommonName, cn);
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, issuer).unwrap();
    (cert.pem(), key.serialize_pem())
}

// ---------------------------------------------------------------------------------------------
// Mock server

#[derive(Default)]
struct Stored {
    kind: i32,
    environment: String,
    owner: String,
    labels: HashMap<String, String>,
    description: String,
    scopes: Vec<String>,
    /// (value, state) per version, version n at index n-1.
    versions: Vec<(Vec<u8>, i32)>,
}

impl Stored {
    fn primary(&self) -> u64 {
        self.versions
            .iter()
            .position(|(_, s)| *s == VersionState::Primary as i32)
            .map_or(0, |i| i as u64 + 1)
    }

    fn metadata(&self, name: &str, with_versions: bool) -> SecretMetadata {
        SecretMetadata {
            name: name.into(),
            kind: self.kind,
            environment: self.environment.clone(),
            owner: self.owner.clone(),
            labels: self.labels.clone(),
            description: self.description.clone(),
            scopes: self.scopes.clone(),
            primary_version: self.primary(),
            created_by: "admin".into(),
            versions: if with_versions {
                self.versions
                    .iter()
                    .enumerate()
                    .map(|(i, (v, s))| VersionInfo {
                        version: i as u64 + 1,
                        state: *s,
                        // Stands in for the server's keyed fingerprint.
                        fingerprint: format!("{:032x}", crc32c::crc32c(v)),
                        keyring_term: 1,
                        ..Default::default()
                    })
                    .collect()
            } else {
                Vec::new()
            },
            ..Default::default()
        }
    }
}

#[derive(Default)]
struct State {
    secrets: BTreeMap<String, Stored>,
    /// Calls received, by RPC name.
    calls: HashMap<String, u32>,
    /// The next this-many calls fail with UNAVAILABLE before doing anything.
    unavailable: u32,
    /// request_id → first answer, as the real server deduplicates.
    request_ids: HashMap<String, PutSecretResponse>,
    /// Whether every call came with a client certificate.
    all_had_client_cert: bool,
}

#[derive(Clone)]
struct Mock(Arc<Mutex<State>>);

impl Mock {
    fn new() -> Self {
        Self(Arc::new(Mutex::new(State {
            all_had_client_cert: true,
            ..Default::default()
        })))
    }

    fn calls(&self, rpc: &str) -> u32 {
        self.0.lock().unwrap().calls.get(rpc).copied().unwrap_or(0)
    }

    fn fail_next(&self, n: u32) {
        self.0.lock().unwrap().unavailable = n;
    }

    /// Common front of every RPC: counts it, checks the client certificate, injects failures.
    fn enter<T>(&self, rpc: &str, req: &tonic::Request<T>) -> Result<(), Status> {
        let mut st = self.0.lock().unwrap();
        *st.calls.entry(rpc.into()).or_default() += 1;
        if req.peer_certs().is_none_or(|c| c.is_empty()) {
            st.all_had_client_cert = false;
        }
        if st.unavailable > 0 {
            st.unavailable -= 1;
            return Err(Status::unavailable("injected failure"));
        }
        Ok(())
    }

    fn put(&self, req: tonic::Request<PutSecretRequest>) -> Result<PutSecretResponse, Status> {
        self.enter("PutSecret", &req)?;
        let r = req.into_inner();
        let mut st = self.0.lock().unwrap();
        if let Some(first) = st.request_ids.get(&r.request_id) {
            return Ok(first.clone());
        }
        if r.value.is_empty() {
            return Err(Status::invalid_argument("value must not be empty"));
        }
        if r.name.starts_with("forbidden/") {
            return Err(Status::permission_denied("admin may not write forbidden/x"));
        }
        let s = st.secrets.entry(r.name.clone()).or_insert_with(|| Stored {
            kind: SecretKind::Static as i32,
            environment: "dev".into(),
            owner: "admin".into(),
            ..Default::default()
        });
        if let Some(ev) = r.expected_version {
            if ev != s.primary() {
                return Err(Status::aborted("expected_version does not match"));
            }
        }
        for v in &mut s.versions {
            if v.1 == VersionState::Primary as i32 {
                v.1 = VersionState::Inactive as i32;
            }
        }
        let checksum = crc32c::crc32c(&r.value);
        s.versions.push((r.value, VersionState::Primary as i32));
        if !r.environment.is_empty() {
            s.environment = r.environment;
        }
        if !r.owner.is_empty() {
            s.owner = r.owner;
        }
        if !r.labels.is_empty() {
            s.labels = r.labels;
        }
        if !r.description.is_empty() {
            s.description = r.description;
        }
        let resp = PutSecretResponse {
            name: r.name,
            version: s.versions.len() as u64,
            checksum,
            create_time: Some(prost_types_now()),
        };
        if !r.request_id.is_empty() {
            st.request_ids.insert(r.request_id, resp.clone());
        }
        Ok(resp)
    }

    fn issue(&self, req: tonic::Request<IssueKeyRequest>) -> Result<IssueKeyResponse, Status> {
        self.enter("IssueKey", &req)?;
        let r = req.into_inner();
        let mut st = self.0.lock().unwrap();
        if st.secrets.contains_key(&r.name) {
            return Err(Status::already_exists(format!("secret {} exists", r.name)));
        }
        let key = "ward_dev_0123456789abcdefghijABCDEFGHIJ012345".to_owned();
        st.secrets.insert(
            r.name.clone(),
            Stored {
                kind: SecretKind::ApiKey as i32,
                environment: "dev".into(),
                owner: "admin".into(),
                scopes: r.scopes,
                labels: r.labels,
                versions: vec![(key.clone().into_bytes(), VersionState::Primary as i32)],
                ..Default::default()
            },
        );
        Ok(IssueKeyResponse {
            name: r.name,
            version: 1,
            api_key: key,
            key_id: "k1d".into(),
            create_time: None,
        })
    }

    fn lookup(st: &State, name: &str, version: u64) -> Result<FetchSecretResponse, Status> {
        if name.starts_with("forbidden/") {
            return Err(Status::permission_denied(format!("may not read {name}")));
        }
        let s = st
            .secrets
            .get(name)
            .ok_or_else(|| Status::not_found(format!("secret {name} not found")))?;
        let v = if version == 0 { s.primary() } else { version };
        let (value, state) = s
            .versions
            .get((v as usize).wrapping_sub(1))
            .ok_or_else(|| Status::not_found(format!("{name} has no version {v}")))?;
        let mut checksum = crc32c::crc32c(value);
        if name.starts_with("corrupt/") {
            checksum ^= 1;
        }
        Ok(FetchSecretResponse {
            name: name.into(),
            version: v,
            state: *state,
            value: value.clone(),
            checksum,
            kind: s.kind,
            environment: s.environment.clone(),
            create_time: Some(prost_types_now()),
            ..Default::default()
        })
    }

    async fn fetch(
        &self,
        req: tonic::Request<FetchSecretRequest>,
    ) -> Result<FetchSecretResponse, Status> {
        self.enter("FetchSecret", &req)?;
        let r = req.into_inner();
        if r.name.starts_with("slow/") {
            tokio::time::sleep(Duration::from_secs(3)).await;
        }
        Self::lookup(&self.0.lock().unwrap(), &r.name, r.version)
    }

    fn batch(
        &self,
        req: tonic::Request<BatchFetchSecretsRequest>,
    ) -> Result<BatchFetchSecretsResponse, Status> {
        self.enter("BatchFetchSecrets", &req)?;
        let st = self.0.lock().unwrap();
        let results = req
            .into_inner()
            .items
            .into_iter()
            .map(|i| BatchFetchResult {
                result: Some(match Self::lookup(&st, &i.name, i.version) {
                    Ok(s) => batch_fetch_result::Result::Secret(s),
                    Err(e) => batch_fetch_result::Result::Error(ItemError {
                        code: e.code() as i32,
                        message: e.message().into(),
                    }),
                }),
                name: i.name,
                requested_version: i.version,
            })
            .collect();
        Ok(BatchFetchSecretsResponse { results })
    }

    fn describe(
        &self,
        req: tonic::Request<DescribeSecretRequest>,
    ) -> Result<SecretMetadata, Status> {
        self.enter("DescribeSecret", &req)?;
        let name = req.into_inner().name;
        let st = self.0.lock().unwrap();
        let s = st
            .secrets
            .get(&name)
            .ok_or_else(|| Status::not_found(format!("secret {name} not found")))?;
        Ok(s.metadata(&name, true))
    }

    fn list(&self, req: tonic::Request<ListSecretsRequest>) -> Result<ListSecretsResponse, Status> {
        self.enter("ListSecrets", &req)?;
        let r = req.into_inner();
        let st = self.0.lock().unwrap();
        let size = if r.page_size == 0 {
            100
        } else {
            r.page_size as usize
        };
        let mut matching = st.secrets.iter().filter(|(name, s)| {
            name.starts_with(&r.name_prefix)
                && name.as_str() > r.page_token.as_str()
                && (r.environment.is_empty() || s.environment == r.environment)
                && (r.owner.is_empty() || s.owner == r.owner)
                && r.labels.iter().all(|(k, v)| s.labels.get(k) == Some(v))
        });
        let secrets: Vec<SecretMetadata> = matching
            .by_ref()
            .take(size)
            .map(|(n, s)| s.metadata(n, false))
            .collect();
        let next_page_token = match (matching.next(), secrets.last()) {
            (Some(_), Some(last)) => last.name.clone(),
            _ => String::new(),
        };
        Ok(ListSecretsResponse {
            secrets,
            next_page_token,
        })
    }
}

fn prost_types_now() -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: 1_700_000_000,
        nanos: 0,
    }
}

/// Adapts a one-shot async handler to tonic's `UnaryService`.
struct Handler<F>(Option<F>);

impl<Req, Resp, F, Fut> UnaryService<Req> for Handler<F>
where
    F: FnOnce(tonic::Request<Req>) -> Fut,
    Fut: Future<Output = Result<Resp, Status>> + Send + 'static,
{
    type Response = Resp;
    type Future = BoxFuture<tonic::Response<Resp>, Status>;

    fn call(&mut self, request: tonic::Request<Req>) -> Self::Future {
        match self.0.take() {
            Some(f) => {
                let fut = f(request);
                Box::pin(async move { fut.await.map(tonic::Response::new) })
            }
            None => Box::pin(async { Err(Status::internal("handler called twice")) }),
        }
    }
}

async fn unary<Req, Resp, F, Fut>(
    req: http::Request<tonic::body::Body>,
    f: F,
) -> http::Response<tonic::body::Body>
where
    Req: prost::Message + Default + Send + 'static,
    Resp: prost::Message + Send + 'static,
    F: FnOnce(tonic::Request<Req>) -> Fut,
    Fut: Future<Output = Result<Resp, Status>> + Send + 'static,
{
    let mut grpc = tonic::server::Grpc::new(tonic_prost::ProstCodec::<Resp, Req>::default());
    grpc.unary(Handler(Some(f)), req).await
}

impl Service<http::Request<tonic::body::Body>> for Mock {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        let m = self.clone();
        Box::pin(async move {
            let path = req.uri().path().to_owned();
            Ok(match path.as_str() {
                "/ward.v1.Secrets/PutSecret" => {
                    unary(req, move |r| std::future::ready(m.put(r))).await
                }
                "/ward.v1.Secrets/IssueKey" => {
                    unary(req, move |r| std::future::ready(m.issue(r))).await
                }
                "/ward.v1.Secrets/FetchSecret" => {
                    unary(req, move |r| async move { m.fetch(r).await }).await
                }
                "/ward.v1.Secrets/BatchFetchSecrets" => {
                    unary(req, move |r| std::future::ready(m.batch(r))).await
                }
                "/ward.v1.Secrets/DescribeSecret" => {
                    unary(req, move |r| std::future::ready(m.describe(r))).await
                }
                "/ward.v1.Secrets/ListSecrets" => {
                    unary(req, move |r| std::future::ready(m.list(r))).await
                }
                _ => Status::unimplemented(path).into_http(),
            })
        })
    }
}

impl NamedService for Mock {
    const NAME: &'static str = "ward.v1.Secrets";
}

/// Starts the mock on 127.0.0.1, port 0, requiring client certificates from the test CA.
async fn start(pki: &Pki) -> (SocketAddr, Mock) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let mock = Mock::new();
    let tls = ServerTlsConfig::new()
        .identity(Identity::from_pem(&pki.server_pem, &pki.server_key))
        .client_ca_root(Certificate::from_pem(&pki.ca_pem));
    let svc = mock.clone();
    tokio::spawn(async move {
        Server::builder()
            .tls_config(tls)
            .unwrap()
            .add_service(svc)
            .serve_with_incoming(TcpIncoming::from(listener))
            .await
            .unwrap();
    });
    (addr, mock)
}

fn put_req(name: &str, value: &[u8]) -> PutSecretRequest {
    PutSecretRequest {
        name: name.into(),
        value: value.to_vec(),
        ..Default::default()
    }
}

fn fast_retry() -> RetryPolicy {
    RetryPolicy::new(3, Duration::from_millis(1), Duration::from_millis(5))
}

// ---------------------------------------------------------------------------------------------
// SDK

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_round_trip() {
    let pki = Pki::new();
    let (addr, mock) = start(&pki).await;
    let client = Client::connect(pki.config(addr, "admin")).await.unwrap();

    let put = client
        .put_secret(put_req("app/db", b"s3cret"))
        .await
        .unwrap();
    assert_eq!((put.name.as_str(), put.version), ("app/db", 1));
    assert_eq!(put.checksum, crc32c::crc32c(b"s3cret"));
    client
        .put_secret(put_req("app/db", b"s3cret-2"))
        .await
        .unwrap();

    let got = client.fetch_secret("app/db", 0).await.unwrap();
    assert_eq!((got.version, got.value.as_slice()), (2, &b"s3cret-2"[..]));
    let old = client.fetch_secret_zeroizing("app/db", 1).await.unwrap();
    assert_eq!(old.value.as_slice(), b"s3cret");
    assert!(old.metadata.value.is_empty());
    assert_eq!(old.metadata.state, VersionState::Inactive as i32);

    let batch = client
        .batch_fetch(vec![("app/db", 1), ("missing", 0)])
        .await
        .unwrap();
    assert_eq!(batch.results.len(), 2);
    assert!(matches!(
        &batch.results[0].result,
        Some(batch_fetch_result::Result::Secret(s)) if s.value == b"s3cret"
    ));
    assert!(matches!(
        &batch.results[1].result,
        Some(batch_fetch_result::Result::Error(e)) if e.code == Code::NotFound as i32
    ));

    // A full batch of maximum-size values is larger than tonic's default 4 MiB message limit.
    let big = vec![7u8; 64 * 1024];
    client.put_secret(put_req("app/big", &big)).await.unwrap();
    let batch = client.batch_fetch(vec![("app/big", 0); 100]).await.unwrap();
    assert_eq!(batch.results.len(), 100);

    let meta = client.describe_secret("app/db").await.unwrap();
    assert_eq!(meta.primary_version, 2);
    assert_eq!(meta.versions.len(), 2);

    let key = client
        .issue_key(IssueKeyRequest {
            name: "app/key".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(key.api_key.starts_with("ward_dev_"));

    for i in 0..5 {
        client
            .put_secret(put_req(&format!("list/{i}"), b"v"))
            .await
            .unwrap();
    }
    let page = client
        .list_secrets(ListSecretsRequest {
            page_size: 2,
            name_prefix: "list/".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(page.secrets.len(), 2);
    assert_eq!(page.next_page_token, "list/1");
    let all = client
        .list_all(ListSecretsRequest {
            page_size: 2,
            name_prefix: "list/".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let names: Vec<_> = all.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(names, ["list/0", "list/1", "list/2", "list/3", "list/4"]);
    assert_eq!(mock.calls("ListSecrets"), 4);

    // raw() reaches the same server with the generated client.
    let raw = client
        .raw()
        .describe_secret(DescribeSecretRequest {
            name: "app/key".into(),
        })
        .await
        .unwrap();
    assert_eq!(raw.into_inner().kind, SecretKind::ApiKey as i32);
    assert!(mock.0.lock().unwrap().all_had_client_cert);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_retries_only_what_is_safe() {
    let pki = Pki::new();
    let (addr, mock) = start(&pki).await;
    let cfg = pki.config(addr, "admin").with_retry(fast_retry());
    let client = Client::connect(cfg).await.unwrap();
    client.put_secret(put_req("r/a", b"v")).await.unwrap();

    // A read survives two UNAVAILABLEs within three attempts...
    mock.fail_next(2);
    client.fetch_secret("r/a", 0).await.unwrap();
    assert_eq!(mock.calls("FetchSecret"), 3);
    // ...but not three.
    mock.fail_next(3);
    let err = client.fetch_secret("r/a", 0).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    assert_eq!(mock.calls("FetchSecret"), 6);

    // A write without request_id is sent once.
    mock.fail_next(1);
    let err = client.put_secret(put_req("r/b", b"v")).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    assert_eq!(mock.calls("PutSecret"), 2);

    // With a request_id it is retried, and applied once.
    mock.fail_next(1);
    let mut req = put_req("r/b", b"v");
    req.request_id = "req-1".into();
    let first = client.put_secret(req.clone()).await.unwrap();
    assert_eq!(mock.calls("PutSecret"), 4);
    let again = client.put_secret(req).await.unwrap();
    assert_eq!(first, again);
    assert_eq!(
        client.describe_secret("r/b").await.unwrap().versions.len(),
        1
    );

    // Server verdicts are final.
    let before = mock.calls("FetchSecret");
    let err = client.fetch_secret("nope", 0).await.unwrap_err();
    assert_eq!(
        err,
        Error::Status {
            code: Code::NotFound,
            message: "secret nope not found".into()
        }
    );
    assert_eq!(mock.calls("FetchSecret"), before + 1);
    let err = client.fetch_secret("forbidden/x", 0).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    let mut cas = put_req("r/a", b"w");
    cas.expected_version = Some(7);
    let err = client.put_secret(cas).await.unwrap_err();
    assert_eq!(err.code(), Code::Aborted);

    // A slow read times out per attempt and is retried: three attempts of 200 ms.
    let quick = Client::connect(
        pki.config(addr, "admin")
            .with_retry(fast_retry())
            .with_timeout(Duration::from_millis(200)),
    )
    .await
    .unwrap();
    let before = mock.calls("FetchSecret");
    let started = std::time::Instant::now();
    let err = quick.fetch_secret("slow/x", 0).await.unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err}");
    assert_eq!(mock.calls("FetchSecret"), before + 3);
    assert!(started.elapsed() < Duration::from_secs(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_rejects_corrupt_values() {
    let pki = Pki::new();
    let (addr, _mock) = start(&pki).await;
    let client = Client::connect(pki.config(addr, "admin")).await.unwrap();
    client.put_secret(put_req("corrupt/a", b"v")).await.unwrap();
    client.put_secret(put_req("fine", b"v")).await.unwrap();

    let err = client.fetch_secret("corrupt/a", 0).await.unwrap_err();
    assert_eq!(err.code(), Code::DataLoss);
    let batch = client
        .batch_fetch([("corrupt/a", 0), ("fine", 0)])
        .await
        .unwrap();
    assert!(matches!(
        &batch.results[0].result,
        Some(batch_fetch_result::Result::Error(e)) if e.code == Code::DataLoss as i32
    ));
    assert!(matches!(
        &batch.results[1].result,
        Some(batch_fetch_result::Result::Secret(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_tls_checks() {
    let pki = Pki::new();
    let (addr, _mock) = start(&pki).await;

    // The server name override is what gets verified: right name connects, wrong one fails.
    let ok = pki.config(addr, "admin").with_server_name("localhost");
    Client::connect(ok).await.unwrap();
    let wrong = pki
        .config(addr, "admin")
        .with_server_name("elsewhere.test")
        .with_retry(RetryPolicy::none());
    let err = Client::connect(wrong).await.unwrap_err();
    assert!(matches!(err, Error::Transport(_)), "{err:?}");
    assert_eq!(err.code(), Code::Unavailable);

    // A client certificate from another CA is refused by the server.
    let stranger = pki.config(addr, "stranger").with_retry(RetryPolicy::none());
    let result = match Client::connect(stranger).await {
        Ok(c) => c.fetch_secret("x", 0).await.map(drop),
        Err(e) => Err(e),
    };
    let err = result.unwrap_err();
    assert!(matches!(err, Error::Transport(_)), "{err:?}");

    // Nothing listening: a transport error naming the address.
    let dead = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead_addr = dead.local_addr().unwrap();
    drop(dead);
    let cfg = pki
        .config(dead_addr, "admin")
        .with_retry(RetryPolicy::none());
    let err = Client::connect(cfg).await.unwrap_err();
    assert!(matches!(err, Error::Transport(_)), "{err:?}");
    assert!(err.to_string().contains(&dead_addr.to_string()), "{err}");
}

// ---------------------------------------------------------------------------------------------
// wardctl

struct Run {
    code: i32,
    stdout: Vec<u8>,
    stderr: String,
}

impl Run {
    fn out(&self) -> String {
        String::from_utf8(self.stdout.clone()).unwrap()
    }
}

async fn wardctl(pki: &Pki, addr: Option<SocketAddr>, args: &[&str], stdin: &[u8]) -> Run {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_wardctl"));
    for var in [
        "WARD_ADDR",
        "WARD_CA",
        "WARD_CERT",
        "WARD_KEY",
        "WARD_SERVER_NAME",
        "WARD_TIMEOUT",
        "WARD_JSON",
    ] {
        cmd.env_remove(var);
    }
    if let Some(addr) = addr {
        cmd.env("WARD_ADDR", addr.to_string())
            .env("WARD_CA", pki.path("ca.pem"))
            .env("WARD_CERT", pki.path("admin.pem"))
            .env("WARD_KEY", pki.path("admin.key"));
    }
    let mut child = cmd
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin).await.unwrap();
    drop(input);
    let out = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: out.stdout,
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wardctl_commands() {
    let pki = Pki::new();
    let (addr, _mock) = start(&pki).await;
    let a = Some(addr);

    // put from stdin, exact bytes (trailing newline kept).
    let r = wardctl(&pki, a, &["put", "app/db", "--label", "team=pay"], b"pw\n").await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    let crc = crc32c::crc32c(b"pw\n");
    assert_eq!(r.out(), format!("app/db version 1 (crc32c {crc:08x})\n"));

    // put from a file, binary.
    let file = pki.path("value.bin");
    std::fs::write(&file, [0u8, 159, 146, 150]).unwrap();
    let f = file.to_str().unwrap();
    let r = wardctl(
        &pki,
        a,
        &["put", "app/bin", "--value-file", f, "--json"],
        b"",
    )
    .await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    let j: serde_json::Value = serde_json::from_slice(&r.stdout).unwrap();
    assert_eq!(j["version"], 1);

    // get: raw bytes, no newline added.
    let r = wardctl(&pki, a, &["get", "app/db"], b"").await;
    assert_eq!((r.code, r.stdout.as_slice()), (0, &b"pw\n"[..]));
    let r = wardctl(&pki, a, &["get", "app/bin", "--version", "1"], b"").await;
    assert_eq!(r.stdout, [0u8, 159, 146, 150]);
    let r = wardctl(&pki, a, &["--json", "get", "app/bin"], b"").await;
    let j: serde_json::Value = serde_json::from_slice(&r.stdout).unwrap();
    assert_eq!(j["value_base64"], "AJ+Slg==");
    assert_eq!(j["state"], "PRIMARY");
    assert_eq!(j["kind"], "STATIC");
    let r = wardctl(&pki, a, &["get", "app/db", "--json"], b"").await;
    let j: serde_json::Value = serde_json::from_slice(&r.stdout).unwrap();
    assert_eq!(j["value"], "pw\n");

    // issue: the key alone on stdout.
    let r = wardctl(&pki, a, &["issue", "app/key", "--scope", "read"], b"").await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(r.out(), "ward_dev_0123456789abcdefghijABCDEFGHIJ012345\n");
    assert!(r.stderr.contains("app/key version 1"), "{}", r.stderr);

    // batch-get: one line per item; exit 1 because one failed.
    let r = wardctl(&pki, a, &["batch-get", "app/db@1", "nope", "app/bin"], b"").await;
    assert_eq!(r.code, 1, "{}", r.stderr);
    let lines: Vec<String> = r.out().lines().map(String::from).collect();
    assert_eq!(lines[0], "app/db@1\tok\t1\tPRIMARY\tbase64:cHcK");
    assert!(
        lines[1].starts_with("nope@0\terror\tNOT_FOUND\t"),
        "{}",
        lines[1]
    );
    assert!(lines[2].starts_with("app/bin@0\tok\t1\tPRIMARY\tbase64:"));
    let r = wardctl(&pki, a, &["batch-get", "--json", "app/db"], b"").await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    let j: serde_json::Value = serde_json::from_slice(&r.stdout).unwrap();
    assert_eq!(j[0]["secret"]["value"], "pw\n");

    // describe.
    let r = wardctl(&pki, a, &["describe", "app/db"], b"").await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    let out = r.out();
    assert!(out.contains("labels       team=pay"), "{out}");
    assert!(out.contains("1        PRIMARY"), "{out}");
    let r = wardctl(&pki, a, &["describe", "app/db", "--json"], b"").await;
    let j: serde_json::Value = serde_json::from_slice(&r.stdout).unwrap();
    assert_eq!(j["versions"][0]["state"], "PRIMARY");
    assert_eq!(j["labels"]["team"], "pay");

    // ls: every page by default; one page with --page-size.
    let r = wardctl(&pki, a, &["ls", "--prefix", "app/"], b"").await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    let names: Vec<String> = r
        .out()
        .lines()
        .map(|l| l.split_whitespace().next().unwrap().to_owned())
        .collect();
    assert_eq!(names, ["app/bin", "app/db", "app/key"]);
    assert!(r.out().contains("API_KEY"));
    let r = wardctl(&pki, a, &["ls", "--json", "--page-size", "2"], b"").await;
    let j: serde_json::Value = serde_json::from_slice(&r.stdout).unwrap();
    assert_eq!(j["secrets"].as_array().unwrap().len(), 2);
    assert_eq!(j["next_page_token"], "app/db");
    let r = wardctl(&pki, a, &["ls", "--json", "--label", "team=pay"], b"").await;
    let j: serde_json::Value = serde_json::from_slice(&r.stdout).unwrap();
    assert_eq!(j.as_array().unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wardctl_errors() {
    let pki = Pki::new();
    let (addr, _mock) = start(&pki).await;
    let a = Some(addr);

    // Server errors: exit 1, `error: CODE: message`.
    let r = wardctl(&pki, a, &["get", "nope"], b"").await;
    assert_eq!(r.code, 1);
    assert_eq!(r.stderr, "error: NOT_FOUND: secret nope not found\n");
    let r = wardctl(&pki, a, &["put", "forbidden/x"], b"v").await;
    assert_eq!(r.code, 1);
    assert!(
        r.stderr.starts_with("error: PERMISSION_DENIED: "),
        "{}",
        r.stderr
    );

    // Usage and configuration errors: exit 2.
    let r = wardctl(&pki, a, &["put", "x"], b"").await;
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("value is empty"), "{}", r.stderr);
    let r = wardctl(&pki, None, &["get", "x"], b"").await;
    assert_eq!(r.code, 2);
    assert_eq!(r.stderr, "error: config: --ca (or WARD_CA) is required\n");
    let missing = pki.path("missing.pem");
    let r = wardctl(
        &pki,
        a,
        &["get", "x", "--cert", missing.to_str().unwrap()],
        b"",
    )
    .await;
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("missing.pem"), "{}", r.stderr);
    let r = wardctl(&pki, a, &["batch-get", "x@y"], b"").await;
    assert_eq!(r.code, 2);
    let r = wardctl(&pki, a, &["frobnicate"], b"").await;
    assert_eq!(r.code, 2);
    let r = wardctl(&pki, a, &["get", "x", "--addr", "http://127.0.0.1:1"], b"").await;
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("https"), "{}", r.stderr);

    // Unreachable server: exit 1, UNAVAILABLE.
    let r = wardctl(&pki, a, &["get", "x", "--addr", "127.0.0.1:1"], b"").await;
    assert_eq!(r.code, 1);
    assert!(r.stderr.starts_with("error: UNAVAILABLE: "), "{}", r.stderr);
    assert!(r.stderr.contains("127.0.0.1:1"), "{}", r.stderr);
    assert!(!r.stderr.contains("transport error"), "{}", r.stderr);
}
