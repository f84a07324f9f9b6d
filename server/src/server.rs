//! Assembly and serving: opens the store, unseals, and serves `ward.v1.Secrets`, gRPC health
//! and server reflection (v1 and v1alpha; grpcurl 1.8.6 speaks only v1alpha) on one mutual-TLS
//! listener, until SIGTERM or SIGINT.

use crate::admin_service::AdminService;
use crate::clock::{Clock, SystemClock};
use crate::config::Config;
use crate::policy::Policy;
use crate::service::SecretsService;
use crate::store::sled_store::{SledStore, StoreOptions};
use crate::store::Store;
use crate::tls::{TlsConn, TlsFiles, TlsReloader};
use crate::unseal::unseal;
use crate::vault::{Settings, Vault};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_stream::wrappers::ReceiverStream;
use ward::v1::admin_server::AdminServer;
use ward::v1::backup_server::BackupServer;
use ward::v1::secrets_server::SecretsServer;
use ward_hsm::{HsmError, KeyWrapper, Mechanism, Pkcs11Config, Pkcs11Wrapper};

/// How long a client has to finish its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the server could not start; each kind has its own exit code.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// Configuration, policy or TLS files are wrong (exit 2).
    #[error("configuration: {0}")]
    Config(String),
    /// The HSM cannot be used: module, token, PIN or master key (exit 3).
    #[error("HSM: {0}")]
    Hsm(String),
    /// The store cannot be opened or read (exit 4).
    #[error("storage: {0}")]
    Storage(String),
    /// Anything else (exit 1).
    #[error("{0}")]
    Other(String),
}

impl StartError {
    /// The process exit code for this failure.
    pub fn exit_code(&self) -> u8 {
        match self {
            StartError::Config(_) => 2,
            StartError::Hsm(_) => 3,
            StartError::Storage(_) => 4,
            StartError::Other(_) => 1,
        }
    }
}

impl From<HsmError> for StartError {
    fn from(e: HsmError) -> Self {
        match e {
            HsmError::Config(m) => StartError::Config(m),
            other => StartError::Hsm(other.to_string()),
        }
    }
}

/// Opens the HSM named by the configuration (blocking: call from `spawn_blocking` or before
/// the runtime is busy).
pub fn open_hsm(cfg: &Config) -> Result<Pkcs11Wrapper, StartError> {
    let pin = cfg.pin().map_err(StartError::Config)?;
    let mechanism: Mechanism = cfg.hsm.mechanism.parse()?;
    Ok(Pkcs11Wrapper::open(Pkcs11Config {
        module: cfg.hsm.module.clone(),
        token_label: cfg.hsm.token_label.clone(),
        pin,
        mechanism,
        sessions: cfg.hsm.sessions,
    })?)
}

/// Serves until a shutdown signal. `ready` is called with the bound address once the
/// listener accepts connections.
pub async fn serve(
    cfg: Config,
    hsm: Arc<dyn KeyWrapper>,
    ready: impl FnOnce(SocketAddr),
) -> Result<(), StartError> {
    // One crypto provider, chosen explicitly (rustls is built without defaults).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let policy = Policy::load(&cfg.policy).map_err(StartError::Config)?;
    let tls = TlsReloader::load(TlsFiles::from_config(&cfg.tls)).map_err(StartError::Config)?;

    // The keyring names the master keys it is wrapped under (they change with rotation); the
    // config's label is used only to create the keyring of a new store. A new store is not
    // even created until its master key is known to exist.
    let label = cfg.hsm.master_key_label.clone();
    let options = StoreOptions {
        min_free_bytes: cfg.limits.min_free_bytes,
        flush_timeout: Duration::from_millis(cfg.limits.flush_timeout_ms),
    };
    let mut stalled = None;
    let mut open_store = || -> Result<Arc<dyn Store>, StartError> {
        create_private_dir(&cfg.data_dir).map_err(StartError::Storage)?;
        let store = SledStore::open_with(&cfg.data_dir, options.clone())
            .map_err(|e| StartError::Storage(e.to_string()))?;
        stalled = Some(store.stalled());
        Ok(Arc::new(store))
    };
    let (store, needed) = if cfg.data_dir.exists() {
        let store = open_store()?;
        let mut needed = crate::unseal::referenced_labels(&*store)
            .map_err(|e| StartError::Storage(e.to_string()))?;
        if needed.is_empty() {
            needed.push(label.clone());
        }
        (Some(store), needed)
    } else {
        (None, vec![label.clone()])
    };
    for wanted in needed {
        let (h, l) = (hsm.clone(), wanted.clone());
        let present = tokio::task::spawn_blocking(move || h.has_master_key(&l))
            .await
            .map_err(|e| StartError::Other(e.to_string()))??;
        if !present {
            return Err(StartError::Hsm(format!(
                "master key {wanted:?} not found on token {:?}; create it with `ward-server init \
                 --config FILE` (Ward never creates one silently outside dev mode)",
                cfg.hsm.token_label
            )));
        }
    }
    let store = match store {
        Some(s) => s,
        None => open_store()?,
    };
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let (keyring, index) =
        unseal(&store, &hsm, &label, clock.now_ms())
            .await
            .map_err(|e| match e {
                crate::error::Error::Unavailable(m) => StartError::Hsm(m),
                other => StartError::Storage(other.to_string()),
            })?;
    tracing::info!(term = keyring.current_term(), master_key = %label, "unsealed");

    let settings = Settings {
        issuer: cfg.issuer.clone(),
        environments: cfg.environments.clone(),
        default_environment: cfg.default_environment().to_owned(),
        max_value_bytes: cfg.limits.max_value_bytes,
        max_batch: cfg.limits.max_batch,
        grace_ms: cfg.limits.default_grace_seconds.saturating_mul(1000),
    };
    let vault = Arc::new(Vault::new(store, keyring, index, policy, clock, settings));
    let admin = AdminServer::new(AdminService::new(vault.clone(), hsm.clone()));
    let backup = BackupServer::new(crate::backup::BackupService::new(vault.clone()));

    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<SecretsServer<SecretsService>>().await;
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(ward::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection()
        .build_v1()
        .map_err(|e| StartError::Other(format!("reflection: {e}")))?;
    let reflection_v1alpha = reflection()
        .build_v1alpha()
        .map_err(|e| StartError::Other(format!("reflection: {e}")))?;
    let secrets = SecretsServer::new(SecretsService::new(vault))
        .max_decoding_message_size(cfg.limits.max_request_bytes);

    let listener = TcpListener::bind(cfg.listen)
        .await
        .map_err(|e| StartError::Config(format!("cannot listen on {}: {e}", cfg.listen)))?;
    let addr = listener
        .local_addr()
        .map_err(|e| StartError::Other(e.to_string()))?;
    let poll =
        (cfg.tls.reload_interval_ms > 0).then(|| Duration::from_millis(cfg.tls.reload_interval_ms));
    tls.spawn_watcher(poll);
    let incoming = accept_loop(listener, tls);
    ready(addr);

    tonic::transport::Server::builder()
        .layer(tower::util::MapResponseLayer::new(
            crate::status::size_limit_status as fn(_) -> _,
        ))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(secrets)
        .add_service(admin)
        .add_service(backup)
        .serve_with_incoming_shutdown(incoming, shutdown_or_stall(stalled.clone()))
        .await
        .map_err(|e| StartError::Other(format!("server: {e}")))?;
    if stalled.is_some_and(|s| *s.borrow()) {
        return Err(StartError::Storage(
            "the storage stalled (a flush to disk never finished: full disk or failing \
             device?); exiting so that the supervisor restarts the server once it is fixed"
                .into(),
        ));
    }
    tracing::info!("shut down");
    Ok(())
}

/// Accepts TCP connections and completes TLS handshakes off the accept path, so one slow or
/// hostile client cannot hold up the others. Failed handshakes are logged and dropped. Each
/// connection uses the TLS configuration in force when it arrives (see [`TlsReloader`]).
fn accept_loop(
    listener: TcpListener,
    tls: Arc<TlsReloader>,
) -> ReceiverStream<Result<TlsConn, std::io::Error>> {
    let (tx, rx) = tokio::sync::mpsc::channel(128);
    tokio::spawn(async move {
        loop {
            let (tcp, addr) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let (conn_tx, acceptor) = (tx.clone(), tls.acceptor());
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, TlsConn::accept(&acceptor, tcp, addr))
                    .await
                {
                    Ok(Ok(conn)) => {
                        let _ = conn_tx.send(Ok(conn)).await;
                    }
                    Ok(Err(e)) => tracing::info!(%addr, error = %e, "TLS handshake refused"),
                    Err(_) => tracing::info!(%addr, "TLS handshake timed out"),
                }
            });
            if tx.is_closed() {
                return;
            }
        }
    });
    ReceiverStream::new(rx)
}

/// Resolves on SIGTERM or SIGINT, or when the store has stalled.
async fn shutdown_or_stall(stalled: Option<tokio::sync::watch::Receiver<bool>>) {
    let stall = async {
        match stalled {
            Some(mut rx) => {
                let _ = rx.wait_for(|s| *s).await;
            }
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = shutdown_signal() => {}
        _ = stall => tracing::error!("storage stalled; shutting down"),
    }
}

async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot watch SIGTERM");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    tracing::info!("shutting down");
}

/// Creates `dir` (and parents) readable by the owner only.
pub fn create_private_dir(dir: &std::path::Path) -> Result<(), String> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| format!("cannot restrict {}: {e}", dir.display()))
}
