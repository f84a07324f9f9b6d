//! The test harness shared by the SDK's and wardctl's client-side tests: an in-process mock of
//! the Secrets service over real mutual TLS, with rcgen certificates.
//!
//! The mock routes gRPC paths by hand instead of implementing the generated server trait, so an
//! RPC added to the proto later does not break the test binaries (unknown paths answer
//! UNIMPLEMENTED). Each test binary uses part of it.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use tonic::codegen::{http, BoxFuture, Context, Future, Poll, Service};
use tonic::server::{NamedService, UnaryService};
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};
use tonic::Status;

use ward_client::proto::{
    batch_fetch_result, BatchFetchResult, BatchFetchSecretsRequest, BatchFetchSecretsResponse,
    DescribeSecretRequest, FetchSecretRequest, FetchSecretResponse, IssueKeyRequest,
    IssueKeyResponse, ItemError, ListSecretsRequest, ListSecretsResponse, PutSecretRequest,
    PutSecretResponse, SecretKind, SecretMetadata, VersionInfo, VersionState,
};
use ward_client::{ClientConfig, RetryPolicy};

// ---------------------------------------------------------------------------------------------
// Certificates

/// A CA, a server certificate (SANs localhost, 127.0.0.1) and client identities, on disk.
pub struct Pki {
    dir: tempfile::TempDir,
    ca_pem: String,
    server_pem: String,
    server_key: String,
}

impl Pki {
    pub fn new() -> Self {
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

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn config(&self, addr: SocketAddr, who: &str) -> ClientConfig {
        self.config_for(&addr.to_string(), who)
    }

    /// A configuration for `addrs` (one address or a comma-separated list).
    pub fn config_for(&self, addrs: &str, who: &str) -> ClientConfig {
        ClientConfig::from_files(
            addrs,
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
    /// Every call fails with UNAVAILABLE (health checks included) until cleared.
    down: bool,
    /// request_id → first answer, as the real server deduplicates.
    request_ids: HashMap<String, PutSecretResponse>,
    /// Whether every call came with a client certificate.
    all_had_client_cert: bool,
}

#[derive(Clone)]
pub struct Mock(Arc<Mutex<State>>);

impl Mock {
    fn new() -> Self {
        Self(Arc::new(Mutex::new(State {
            all_had_client_cert: true,
            ..Default::default()
        })))
    }

    pub fn calls(&self, rpc: &str) -> u32 {
        self.0.lock().unwrap().calls.get(rpc).copied().unwrap_or(0)
    }

    pub fn fail_next(&self, n: u32) {
        self.0.lock().unwrap().unavailable = n;
    }

    /// While down, every call (health checks included) answers UNAVAILABLE.
    pub fn set_down(&self, down: bool) {
        self.0.lock().unwrap().down = down;
    }

    /// Whether every call so far came with a client certificate.
    pub fn all_had_client_cert(&self) -> bool {
        self.0.lock().unwrap().all_had_client_cert
    }

    /// Common front of every RPC: counts it, checks the client certificate, injects failures.
    fn enter<T>(&self, rpc: &str, req: &tonic::Request<T>) -> Result<(), Status> {
        let mut st = self.0.lock().unwrap();
        *st.calls.entry(rpc.into()).or_default() += 1;
        if req.peer_certs().is_none_or(|c| c.is_empty()) {
            st.all_had_client_cert = false;
        }
        if st.down {
            return Err(Status::unavailable("injected: down"));
        }
        if st.unavailable > 0 {
            st.unavailable -= 1;
            return Err(Status::unavailable("injected failure"));
        }
        Ok(())
    }

    /// `grpc.health.v1.Health/Check`: SERVING unless failures are injected.
    fn health(
        &self,
        req: tonic::Request<HealthCheckRequest>,
    ) -> Result<HealthCheckResponse, Status> {
        self.enter("Check", &req)?;
        Ok(HealthCheckResponse { status: 1 })
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

/// `grpc.health.v1.HealthCheckRequest`, written out so the mock needs no health crate.
#[derive(Clone, PartialEq, prost::Message)]
struct HealthCheckRequest {
    #[prost(string, tag = "1")]
    service: String,
}

/// `grpc.health.v1.HealthCheckResponse` (status 1: SERVING).
#[derive(Clone, PartialEq, prost::Message)]
struct HealthCheckResponse {
    #[prost(int32, tag = "1")]
    status: i32,
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
                "/grpc.health.v1.Health/Check" => {
                    unary(req, move |r| std::future::ready(m.health(r))).await
                }
                _ => Status::unimplemented(path).into_http(),
            })
        })
    }
}

impl NamedService for Mock {
    const NAME: &'static str = "ward.v1.Secrets";
}

/// The same mock under the health service's name (tonic's router dispatches by service name).
#[derive(Clone)]
struct HealthRoute(Mock);

impl Service<http::Request<tonic::body::Body>> for HealthRoute {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        self.0.call(req)
    }
}

impl NamedService for HealthRoute {
    const NAME: &'static str = "grpc.health.v1.Health";
}

/// Starts the mock on 127.0.0.1, port 0, requiring client certificates from the test CA.
pub async fn start(pki: &Pki) -> (SocketAddr, Mock) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let mock = Mock::new();
    let tls = ServerTlsConfig::new()
        .identity(Identity::from_pem(&pki.server_pem, &pki.server_key))
        .client_ca_root(Certificate::from_pem(&pki.ca_pem));
    let svc = mock.clone();
    let health = HealthRoute(mock.clone());
    tokio::spawn(async move {
        Server::builder()
            .tls_config(tls)
            .unwrap()
            .add_service(svc)
            .add_service(health)
            .serve_with_incoming(TcpIncoming::from(listener))
            .await
            .unwrap();
    });
    (addr, mock)
}

pub fn put_req(name: &str, value: &[u8]) -> PutSecretRequest {
    PutSecretRequest {
        name: name.into(),
        value: value.to_vec(),
        ..Default::default()
    }
}

pub fn fast_retry() -> RetryPolicy {
    RetryPolicy::new(3, Duration::from_millis(1), Duration::from_millis(5))
}
