//! The transport floor: `ward.v1.Secrets/FetchSecret` answered with a constant value, served
//! through Ward's own rustls configuration, accept loop and identity extraction. Comparing
//! Ward's fetch to it isolates what the vault itself costs (policy, store, decryption, audit,
//! fsync) from what gRPC over mutual TLS costs.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use tonic::{Request, Response, Status};
use ward::v1::{self as pb, secrets_server::Secrets, secrets_server::SecretsServer};
use ward_server::clock::SystemClock;
use ward_server::identity::Peer;
use ward_server::tls::{TlsFiles, TlsReloader};

/// Answers every FetchSecret with the same `value_size`-byte value.
pub struct Echo {
    response: pb::FetchSecretResponse,
}

impl Echo {
    /// An echo whose answers carry `value_size` bytes, like a fetched secret of that size.
    pub fn new(value_size: usize) -> Self {
        let value: Vec<u8> = (0..value_size).map(|i| b'a' + (i % 26) as u8).collect();
        Self {
            response: pb::FetchSecretResponse {
                name: "bench/echo".into(),
                version: 1,
                state: pb::VersionState::Primary as i32,
                checksum: crc32c::crc32c(&value),
                value,
                kind: pb::SecretKind::Static as i32,
                environment: "dev".into(),
                create_time: Some(ward_server::clock::to_timestamp(0)),
                ..Default::default()
            },
        }
    }
}

#[tonic::async_trait]
impl Secrets for Echo {
    async fn fetch_secret(
        &self,
        req: Request<pb::FetchSecretRequest>,
    ) -> Result<Response<pb::FetchSecretResponse>, Status> {
        // The same identity check Ward makes before anything else.
        if req.extensions().get::<Peer>().is_none() {
            return Err(Status::unauthenticated("no verified client certificate"));
        }
        let mut resp = self.response.clone();
        resp.name = req.into_inner().name;
        Ok(Response::new(resp))
    }

    async fn put_secret(
        &self,
        _: Request<pb::PutSecretRequest>,
    ) -> Result<Response<pb::PutSecretResponse>, Status> {
        Err(Status::unimplemented("echo serves FetchSecret only"))
    }

    async fn issue_key(
        &self,
        _: Request<pb::IssueKeyRequest>,
    ) -> Result<Response<pb::IssueKeyResponse>, Status> {
        Err(Status::unimplemented("echo serves FetchSecret only"))
    }

    async fn batch_fetch_secrets(
        &self,
        _: Request<pb::BatchFetchSecretsRequest>,
    ) -> Result<Response<pb::BatchFetchSecretsResponse>, Status> {
        Err(Status::unimplemented("echo serves FetchSecret only"))
    }

    async fn describe_secret(
        &self,
        _: Request<pb::DescribeSecretRequest>,
    ) -> Result<Response<pb::SecretMetadata>, Status> {
        Err(Status::unimplemented("echo serves FetchSecret only"))
    }

    async fn rotate_secret(
        &self,
        _: Request<pb::RotateSecretRequest>,
    ) -> Result<Response<pb::RotateSecretResponse>, Status> {
        Err(Status::unimplemented("echo serves FetchSecret only"))
    }

    async fn revoke_secret(
        &self,
        _: Request<pb::RevokeSecretRequest>,
    ) -> Result<Response<pb::RevokeSecretResponse>, Status> {
        Err(Status::unimplemented("echo serves FetchSecret only"))
    }

    async fn set_version_state(
        &self,
        _: Request<pb::SetVersionStateRequest>,
    ) -> Result<Response<pb::SetVersionStateResponse>, Status> {
        Err(Status::unimplemented("echo serves FetchSecret only"))
    }

    async fn destroy_version(
        &self,
        _: Request<pb::DestroyVersionRequest>,
    ) -> Result<Response<pb::DestroyVersionResponse>, Status> {
        Err(Status::unimplemented("echo serves FetchSecret only"))
    }

    type WatchSecretsStream = tokio_stream::Empty<Result<pb::WatchEvent, Status>>;

    async fn watch_secrets(
        &self,
        _: Request<pb::WatchSecretsRequest>,
    ) -> Result<Response<Self::WatchSecretsStream>, Status> {
        Err(Status::unimplemented("echo serves FetchSecret only"))
    }

    async fn list_secrets(
        &self,
        _: Request<pb::ListSecretsRequest>,
    ) -> Result<Response<pb::ListSecretsResponse>, Status> {
        Err(Status::unimplemented("echo serves FetchSecret only"))
    }
}

/// Files and address of an echo server.
#[derive(Debug, clap::Args)]
pub struct EchoArgs {
    /// Listen address (port 0 picks one; the ready line names it)
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: SocketAddr,
    /// Server certificate (PEM)
    #[arg(long)]
    pub cert: PathBuf,
    /// Server key (PEM)
    #[arg(long)]
    pub key: PathBuf,
    /// CA that client certificates must chain to (PEM)
    #[arg(long)]
    pub client_ca: PathBuf,
    /// Size of the value every answer carries
    #[arg(long, default_value_t = 64)]
    pub value_size: usize,
}

/// Serves the echo until the process is killed; prints `echo ready addr=…` once listening.
pub async fn serve(args: EchoArgs) -> Result<(), String> {
    let tls = TlsReloader::load(
        TlsFiles {
            cert: args.cert.clone(),
            key: args.key.clone(),
            client_ca: args.client_ca.clone(),
            crl: Vec::new(),
        },
        Arc::new(SystemClock),
    )?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", args.listen))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let incoming = ward_server::server::tls_incoming(listener, tls);
    println!("echo ready addr={addr}");
    tonic::transport::Server::builder()
        .add_service(SecretsServer::new(Echo::new(args.value_size)))
        .serve_with_incoming(incoming)
        .await
        .map_err(|e| format!("echo server: {e}"))
}
