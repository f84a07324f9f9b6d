//! Assembly and serving: opens the store (with the key directory in step), unseals, opens the
//! audit log (and starts its checkpointing and pruning), and serves `ward.v1.Secrets`,
//! `ward.v1.Keys`, `ward.v1.Admin`, `ward.v1.Audit`, `ward.v1.Alerts`, Envoy's ext_authz `Authorization`, gRPC
//! health and server reflection (v1 and v1alpha; grpcurl 1.8.6 speaks only v1alpha) on one
//! mutual-TLS listener, and `/metrics` and `/healthz` on a plain-HTTP one, until SIGTERM or
//! SIGINT.

use crate::alerts::outbox::Outbox;
use crate::alerts::signals::Signals;
use crate::alerts::{Alerts, AlertsApi};
use crate::audit::{AuditAccess, AuditLog};
use crate::changes::sweeper::SweepIndex;
use crate::changes::watch::WatchHub;
use crate::clock::{Clock, FileOffsetClock, SystemClock};
use crate::config::Config;
use crate::envelope::RECORD_MAC_LABEL;
use crate::grpc::admin::AdminService;
use crate::grpc::alerts::AlertsService;
use crate::grpc::audit::AuditService;
use crate::grpc::backup::BackupService;
use crate::grpc::extauthz::ExtAuthzService;
use crate::grpc::keys::KeysService;
use crate::grpc::limits::{ConnLimits, IdentityCallsLayer};
use crate::grpc::secrets::SecretsService;
use crate::harden::create_private_dir;
use crate::keys::directory::{DirectoryStore, KeyDirectory};
use crate::keys::{KeySettings, Keys};
use crate::metrics::{MeteredWrapper, RpcMetricsLayer};
use crate::model::keypolicy::RateLimit;
use crate::model::{Kind, VersionState};
use crate::policy::Policy;
use crate::portal::{Portal, PortalSettings};
use crate::store::sealed::SealedStore;
use crate::store::sled_store::{SledStore, StoreOptions};
use crate::store::Store;
use crate::tls::{Alpn, Handshake, TlsConn, TlsFiles, TlsReloader};
use crate::unseal::unseal;
use crate::vault::{Settings, Vault};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio_stream::wrappers::ReceiverStream;
use ward::v1::admin_server::AdminServer;
use ward::v1::alerts_server::AlertsServer;
use ward::v1::audit_server::AuditServer;
use ward::v1::backup_server::BackupServer;
use ward::v1::keys_server::KeysServer;
use ward::v1::secrets_server::SecretsServer;
use ward_hsm::{Hsm, HsmError, KeyWrapper, MacSigner, Mechanism, Pkcs11Config, Pkcs11Wrapper};

/// How long shutdown waits for the alerts still queued to be written.
const ALERT_DRAIN: Duration = Duration::from_secs(5);
/// How long the secret-version counts shown by /metrics may be reused (they need a scan).
const VERSION_COUNT_TTL: Duration = Duration::from_secs(5);

/// The addresses a started server listens on.
#[derive(Debug, Clone, Copy)]
pub struct Listening {
    /// gRPC over mutual TLS.
    pub grpc: SocketAddr,
    /// Plain-HTTP metrics and health, if enabled.
    pub metrics: Option<SocketAddr>,
    /// The developer portal (HTTPS, client certificate required), if configured.
    pub portal: Option<SocketAddr>,
}

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
    /// The audit log's files are damaged, or miss records the store names (exit 5).
    #[error("audit log: {0}")]
    AuditLog(String),
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
            StartError::AuditLog(_) => 5,
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

/// Serves until a shutdown signal. `ready` is called with the bound addresses once the
/// listeners accept connections.
pub async fn serve(
    cfg: Config,
    hsm: Arc<dyn Hsm>,
    ready: impl FnOnce(Listening),
) -> Result<(), StartError> {
    let metered = Arc::new(MeteredWrapper(hsm));
    let mac: Arc<dyn MacSigner> = metered.clone();
    let hsm: Arc<dyn KeyWrapper> = metered;
    let policy = Policy::load(&cfg.policy).map_err(StartError::Config)?;
    let clock: Arc<dyn Clock> = match &cfg.testing {
        None => Arc::new(SystemClock),
        Some(t) => {
            let c = FileOffsetClock::open(&t.clock_file).map_err(StartError::Config)?;
            tracing::warn!(
                clock_file = %t.clock_file.display(),
                "TEST CLOCK IN USE: time is the system clock plus the offset in this file; \
                 never run a real vault with [testing] set"
            );
            Arc::new(c)
        }
    };
    let tls = TlsReloader::load(TlsFiles::from_config(&cfg.tls), clock.clone())
        .map_err(StartError::Config)?;

    // The keyring names the master keys it is wrapped under (they change with rotation); the
    // config's label is used only to create the keyring of a new store. A new store is not
    // even created until its master key is known to exist.
    let label = cfg.hsm.master_key_label.clone();
    let options = StoreOptions {
        min_free_bytes: cfg.limits.min_free_bytes,
        flush_timeout: Duration::from_millis(cfg.limits.flush_timeout_ms),
        cache_bytes: cfg.limits.cache_mib * 1024 * 1024,
    };
    // With etcd, the data directory holds only this replica's id and audit log; the store is
    // the cluster's, and may already hold a keyring.
    let replica = crate::cluster::join(&cfg, clock.now_ms())
        .await
        .map_err(StartError::Storage)?;
    let mut stalled = None;
    let mut open_store = || -> Result<Arc<dyn Store>, StartError> {
        if let Some(r) = &replica {
            return Ok(r.store.clone());
        }
        create_private_dir(&cfg.data_dir).map_err(StartError::Storage)?;
        let store = SledStore::open_with(&cfg.data_dir, options.clone())
            .map_err(|e| StartError::Storage(e.to_string()))?;
        stalled = Some(store.stalled());
        Ok(Arc::new(store))
    };
    let (store, needed) = if replica.is_some() || cfg.data_dir.exists() {
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
    let audit_label = cfg.audit.checkpoint_key_label.clone();
    let has_audit_key = {
        let (mac, audit_label) = (mac.clone(), audit_label.clone());
        tokio::task::spawn_blocking(move || mac.has_mac_key(&audit_label))
            .await
            .map_err(|e| StartError::Other(e.to_string()))??
    };
    if !has_audit_key {
        return Err(StartError::Hsm(format!(
            "audit checkpoint key {audit_label:?} not found on token {:?}; create it with \
             `ward-server init --config FILE`",
            cfg.hsm.token_label
        )));
    }
    let sled = match store {
        Some(s) => s,
        None => open_store()?,
    };
    let wrapper: Arc<dyn KeyWrapper> = hsm.clone();
    let (keyring, index) = unseal(&sled, &wrapper, &label, clock.now_ms())
        .await
        .map_err(|e| match e {
            crate::error::Error::Unavailable(m) => StartError::Hsm(m),
            other => StartError::Storage(other.to_string()),
        })?;
    tracing::info!(term = keyring.current_term(), master_key = %label, "unsealed");
    // Secret records, key-index entries, quota ledgers and idempotency records are MACed under
    // a key derived at unseal and checked on every read (store::sealed); every component goes
    // through the directory store, so the in-memory key index and records can never lag a
    // commit (see keys::directory). Unseal reads only the keyring and index key, which the HSM
    // wrap authenticates.
    let sealed: Arc<dyn Store> = Arc::new(SealedStore::new(sled, index.derive(RECORD_MAC_LABEL)));
    let directory = Arc::new(
        KeyDirectory::load(&*sealed).map_err(|e| StartError::Storage(format!("key index: {e}")))?,
    );
    let directory_store = Arc::new(DirectoryStore::new(sealed, directory.clone()));
    let store: Arc<dyn Store> = directory_store.clone();

    let settings = Settings {
        issuer: cfg.issuer.clone(),
        environments: cfg.environments.clone(),
        default_environment: cfg.default_environment().to_owned(),
        max_value_bytes: cfg.limits.max_value_bytes,
        max_batch: cfg.limits.max_batch,
        grace_ms: cfg.limits.default_grace_seconds.saturating_mul(1000),
        max_versions_per_secret: cfg.limits.max_versions_per_secret,
        max_watches_per_identity: cfg.limits.max_watches_per_identity,
        scan_budget: cfg.limits.scan_budget,
    };
    let signer = mac.clone();
    let mut audit_settings = cfg.audit.settings();
    audit_settings.node = replica.as_ref().map(|r| r.id.clone());
    let audit = AuditLog::open(
        store.clone(),
        &cfg.data_dir.join("audit"),
        clock.clone(),
        signer,
        audit_settings,
    )
    .await
    .map_err(|e| match e {
        crate::error::Error::DataLoss(m) => StartError::AuditLog(m),
        other => StartError::Storage(format!("audit log: {other}")),
    })?;
    audit.start_background();
    let access = Arc::new(
        AuditAccess::new(
            audit.clone(),
            policy.clone(),
            clock.clone(),
            cfg.audit.max_streams,
        )
        .with_scan_budget(cfg.limits.scan_budget),
    );
    // Alerts: raised into a bounded queue on the request path, written (audit record, then
    // outbox) by one task, delivered by another.
    let (alerts, alert_queue) = Alerts::new(cfg.alerts.queue);
    let outbox = Arc::new(
        Outbox::open(store.clone(), clock.clone(), &cfg.alerts)
            .map_err(StartError::Config)?
            .for_node(replica.as_ref().map(|r| r.id.as_str())),
    );
    outbox.set_alerts(alerts.clone());
    let signals = cfg
        .alerts
        .signals
        .then(|| Arc::new(Signals::new(&cfg.alerts, alerts.clone())));
    let alerts_api = Arc::new(AlertsApi::new(
        access.clone(),
        outbox.clone(),
        policy.clone(),
        clock.clone(),
    ));
    let (stop_alerts, alerts_stopping) = tokio::sync::watch::channel(false);
    let alert_writer = tokio::spawn(crate::alerts::run_writer(
        alert_queue,
        audit.clone(),
        outbox.clone(),
        alerts_stopping,
    ));
    let deliveries_closed = Arc::new(tokio::sync::Notify::new());
    let deliveries = tokio::spawn(outbox.clone().run(deliveries_closed.clone()));
    // Watch streams and the sweeper follow the vault's changes; it tells them, knowing
    // neither.
    let hub = Arc::new(WatchHub::new(settings.max_watches_per_identity));
    let sweep_index = Arc::new(SweepIndex::default());
    let vault = Arc::new(Vault::new(
        store.clone(),
        audit,
        keyring,
        index,
        policy,
        clock,
        settings,
        vec![hub.clone(), sweep_index.clone()],
    ));
    // Changes other replicas commit reach this one's memory through the store's feed.
    let follower = store.follow().map(|feed| {
        tokio::spawn(crate::cluster::follow(
            feed,
            directory_store.clone(),
            vault.clone(),
            wrapper.clone(),
        ))
    });
    let admin = AdminServer::new(AdminService::new(vault.clone(), wrapper.clone()));
    let backup = BackupServer::new(BackupService::new(vault.clone()));
    vault
        .usage()
        .load(&store)
        .map_err(|e| StartError::Storage(format!("key usage: {e}")))?;
    let per_minute = cfg.keys.unknown_keys_per_minute;
    let unknown_key_limit = RateLimit::parse(per_minute, 60_000, cfg.keys.unknown_key_burst)
        .map_err(|e| StartError::Config(format!("keys: {e}")))?;
    let keys = Arc::new(
        Keys::new(
            vault.clone(),
            directory.clone(),
            KeySettings {
                unknown_key_limit,
                quota_block: cfg.store.quota_block(),
            },
        )
        .with_alerts(alerts.clone(), signals),
    );
    tracing::info!(keys = directory.index_len(), "key index loaded");
    crate::metrics::global().set_methods(crate::grpc::served_methods());
    let deadlines = tokio::spawn(crate::alerts::deadlines::run(
        vault.clone(),
        alerts.clone(),
        crate::alerts::deadlines::DeadlineSettings::from_config(&cfg.alerts),
        deliveries_closed.clone(),
    ));
    let sweeper = tokio::spawn(crate::changes::sweeper::run(
        vault.clone(),
        sweep_index,
        hub.closed(),
        Duration::from_millis(cfg.lifecycle.sweep_interval_ms),
    ));

    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<SecretsServer<SecretsService>>().await;
    health.set_serving::<KeysServer<KeysService>>().await;
    health.set_serving::<AuditServer<AuditService>>().await;
    health.set_serving::<AlertsServer<AlertsService>>().await;
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(ward::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(ward::ENVOY_AUTHZ_FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection()
        .build_v1()
        .map_err(|e| StartError::Other(format!("reflection: {e}")))?;
    let reflection_v1alpha = reflection()
        .build_v1alpha()
        .map_err(|e| StartError::Other(format!("reflection: {e}")))?;
    let secrets = SecretsServer::new(SecretsService::new(vault.clone(), hub.clone()))
        .max_decoding_message_size(cfg.limits.max_request_bytes);
    let keys_service = KeysServer::new(KeysService::new(keys.clone(), vault.clone()))
        .max_decoding_message_size(cfg.limits.max_request_bytes);
    let ext_authz = envoy_types::ext_authz::v3::pb::AuthorizationServer::new(ExtAuthzService::new(
        keys.clone(),
    ))
    .max_decoding_message_size(cfg.limits.max_request_bytes);

    let metrics_listener = if cfg.metrics.enabled {
        Some(TcpListener::bind(cfg.metrics.listen).await.map_err(|e| {
            StartError::Config(format!(
                "cannot listen on {} (metrics): {e}",
                cfg.metrics.listen
            ))
        })?)
    } else {
        None
    };
    let metrics_addr = metrics_listener
        .as_ref()
        .map(|l| l.local_addr())
        .transpose()
        .map_err(|e| StartError::Other(e.to_string()))?;
    if let Some(l) = metrics_listener {
        tokio::spawn(serve_metrics(l, vault.clone(), directory.clone()));
    }
    let flusher = tokio::spawn(flush_usage(
        vault.clone(),
        Duration::from_secs(cfg.keys.usage_flush_seconds),
    ));
    let audit_server = AuditServer::new(AuditService::new(access.clone()));
    let alerts_server = AlertsServer::new(AlertsService::new(alerts_api, keys.clone()))
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
    let portal_addr = match cfg.portal.listen {
        Some(at) => {
            let l = TcpListener::bind(at)
                .await
                .map_err(|e| StartError::Config(format!("cannot listen on {at} (portal): {e}")))?;
            let bound = l
                .local_addr()
                .map_err(|e| StartError::Other(e.to_string()))?;
            let portal = Arc::new(Portal::new(
                vault.clone(),
                keys.clone(),
                access.clone(),
                PortalSettings::from_config(&cfg.portal),
            ));
            let incoming =
                tls_incoming_alpn(l, tls.clone(), ConnLimits::from_config(&cfg), Alpn::Web);
            tokio::spawn(portal.serve(incoming));
            Some(bound)
        }
        None => None,
    };
    let incoming = tls_incoming_with(listener, tls, ConnLimits::from_config(&cfg));
    if let Some(r) = &replica {
        r.store.announce(&addr.to_string());
    }
    ready(Listening {
        grpc: addr,
        metrics: metrics_addr,
        portal: portal_addr,
    });

    let (l, t) = (&cfg.limits, &cfg.tls);
    let served = tonic::transport::Server::builder()
        .max_concurrent_streams(l.max_concurrent_streams)
        .http2_max_pending_accept_reset_streams(Some(l.max_pending_reset_streams))
        .http2_max_local_error_reset_streams(Some(l.max_local_reset_streams))
        .timeout(Duration::from_millis(l.request_timeout_ms))
        .max_connection_age(t.max_connection_age)
        .max_connection_age_grace(t.max_connection_age_grace)
        .http2_keepalive_interval(Some(t.keepalive_interval))
        .http2_keepalive_timeout(Some(t.keepalive_timeout))
        .layer(RpcMetricsLayer)
        .layer(IdentityCallsLayer::new(l.max_calls_per_identity))
        .layer(tower::util::MapResponseLayer::new(
            |r: http::Response<tonic::service::interceptor::ResponseBody<tonic::body::Body>>| {
                r.map(tonic::body::Body::new)
            },
        ))
        .layer(tonic::service::InterceptorLayer::new(
            crate::grpc::limits::refuse_when_stale(store.clone()),
        ))
        .layer(tower::util::MapResponseLayer::new(
            crate::grpc::status::size_limit_status as fn(_) -> _,
        ))
        .layer(crate::grpc::catch_panic::CatchPanicLayer::new(
            vault.clone(),
        ))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(secrets)
        .add_service(admin)
        .add_service(keys_service)
        .add_service(ext_authz)
        .add_service(audit_server)
        .add_service(alerts_server)
        .add_service(backup)
        .serve_with_incoming_shutdown(incoming, async {
            shutdown_or_stall(stalled.clone()).await;
            // Watch streams never end on their own; end them (clients reconnect elsewhere or
            // later) so the graceful shutdown does not wait on them. Stops the sweeper too.
            hub.close();
        })
        .await
        .map_err(|e| StartError::Other(format!("server: {e}")));
    hub.close();
    let _ = sweeper.await;
    flusher.abort();
    // Alerts still queued are written (their record and outbox entries) before the exit;
    // deliveries in the outbox wait for the next start (an attempt cut here is retried then).
    let _ = stop_alerts.send(true);
    if tokio::time::timeout(ALERT_DRAIN, alert_writer)
        .await
        .is_err()
    {
        tracing::warn!("alerts still queued at shutdown were not all written");
    }
    deliveries_closed.notify_waiters();
    deliveries.abort();
    deadlines.abort();
    // Usage counters and facts since the last periodic flush, made durable before exit.
    let flushed = write_usage(&vault);
    if let Err(e) = flushed.and(store.sync().await.map_err(Into::into)) {
        tracing::warn!(error = %e, "final usage flush failed");
    }
    if let Some(f) = follower {
        f.abort();
    }
    if let Some(r) = &replica {
        r.leave(&keys).await;
    }
    served?;
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

/// Writes the API keys' usage counters and the audit log's usage facts to the store (no
/// sync: they ride the next group commit, or the caller's).
fn write_usage(vault: &Vault) -> crate::error::Result<()> {
    vault.usage().flush(&**vault.store())?;
    vault.audit().flush_usage()?;
    Ok(())
}

/// Writes usage counters and facts to the store every `every`.
async fn flush_usage(vault: Arc<Vault>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let v = vault.clone();
        match tokio::task::spawn_blocking(move || write_usage(&v)).await {
            Ok(Err(e)) => tracing::warn!(error = %e, "usage flush failed"),
            Err(e) => tracing::warn!(error = %e, "usage flush task failed"),
            Ok(Ok(_)) => {}
        }
    }
}

type VersionCounts = BTreeMap<(&'static str, &'static str), u64>;

/// Serves `/metrics` and `/healthz` over plain HTTP/1.1.
async fn serve_metrics(listener: TcpListener, vault: Arc<Vault>, dir: Arc<KeyDirectory>) {
    let cache: Arc<Mutex<Option<(Instant, VersionCounts)>>> = Arc::default();
    loop {
        let (tcp, _) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "metrics accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let (vault, dir, cache) = (vault.clone(), dir.clone(), cache.clone());
        tokio::spawn(async move {
            let svc =
                hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let (vault, dir, cache) = (vault.clone(), dir.clone(), cache.clone());
                    async move {
                        Ok::<_, std::convert::Infallible>(
                            metrics_response(req.method(), req.uri().path(), vault, dir, cache)
                                .await,
                        )
                    }
                });
            let io = hyper_util::rt::TokioIo::new(tcp);
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(io, svc);
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "metrics connection ended");
            }
        });
    }
}

async fn metrics_response(
    method: &http::Method,
    path: &str,
    vault: Arc<Vault>,
    dir: Arc<KeyDirectory>,
    cache: Arc<Mutex<Option<(Instant, VersionCounts)>>>,
) -> http::Response<http_body_util::Full<bytes::Bytes>> {
    let reply = |status: u16, ctype: &str, body: String| {
        http::Response::builder()
            .status(status)
            .header("content-type", ctype)
            .body(http_body_util::Full::new(bytes::Bytes::from(body)))
            .unwrap_or_default()
    };
    if method != http::Method::GET && method != http::Method::HEAD {
        return reply(405, "text/plain", "method not allowed\n".into());
    }
    match path {
        // Not ready while what this replica holds may be out of date (a shared store).
        "/healthz" => match vault.store().fresh() {
            Ok(()) => reply(200, "text/plain", "ok\n".into()),
            Err(e) => reply(503, "text/plain", format!("{e}\n")),
        },
        "/metrics" => {
            let cached = cache
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .as_ref()
                .filter(|(at, _)| at.elapsed() < VERSION_COUNT_TTL)
                .map(|(_, c)| c.clone());
            let counts = match cached {
                Some(c) => c,
                None => {
                    let v = vault.clone();
                    let counted = tokio::task::spawn_blocking(move || v.count_versions()).await;
                    let counts: VersionCounts = match counted {
                        Ok(Ok(c)) => c
                            .into_iter()
                            .map(|((k, st), n)| ((kind_name(k), state_name(st)), n))
                            .collect(),
                        _ => {
                            tracing::warn!("counting secret versions for /metrics failed");
                            BTreeMap::new()
                        }
                    };
                    *cache.lock().unwrap_or_else(PoisonError::into_inner) =
                        Some((Instant::now(), counts.clone()));
                    counts
                }
            };
            let text = crate::metrics::global().render(&counts, dir.index_len());
            reply(200, "text/plain; version=0.0.4; charset=utf-8", text)
        }
        _ => reply(404, "text/plain", "not found\n".into()),
    }
}

fn kind_name(k: Kind) -> &'static str {
    match k {
        Kind::Static => "STATIC",
        Kind::ApiKey => "API_KEY",
    }
}

fn state_name(s: VersionState) -> &'static str {
    s.name()
}

/// Accepts TCP connections and completes TLS handshakes off the accept path, so one slow or
/// hostile client cannot hold up the others, with the default [`ConnLimits`]. The benchmark's
/// echo server uses this too, so its transport is exactly Ward's.
pub fn tls_incoming(
    listener: TcpListener,
    tls: Arc<TlsReloader>,
) -> ReceiverStream<Result<TlsConn, std::io::Error>> {
    tls_incoming_with(listener, tls, ConnLimits::default())
}

/// [`tls_incoming`] with the given limits: at most `max_connections` open (more are closed as
/// soon as accepted) and `max_handshakes` in progress (the accept loop waits for a slot).
/// Failed handshakes are logged and dropped; a certificate whose identity Ward refuses gets
/// UNAUTHENTICATED on every call (see `tls`). Each connection uses the TLS configuration in
/// force when it arrives (see [`TlsReloader`]).
pub fn tls_incoming_with(
    listener: TcpListener,
    tls: Arc<TlsReloader>,
    limits: ConnLimits,
) -> ReceiverStream<Result<TlsConn, std::io::Error>> {
    tls_incoming_alpn(listener, tls, limits, Alpn::Grpc)
}

/// [`tls_incoming_with`] offering `alpn` (the portal's listener offers HTTP/1.1 too).
pub fn tls_incoming_alpn(
    listener: TcpListener,
    tls: Arc<TlsReloader>,
    limits: ConnLimits,
    alpn: Alpn,
) -> ReceiverStream<Result<TlsConn, std::io::Error>> {
    let (tx, rx) = tokio::sync::mpsc::channel(128);
    tokio::spawn(async move {
        // Refusals are logged at most once a second (with a count), so a flood cannot flood
        // the log too.
        let (mut refused, mut logged): (u64, Option<Instant>) = (0, None);
        loop {
            let Some(handshake) = limits.handshake_slot().await else {
                return;
            };
            let (tcp, addr) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Some(slot) = limits.try_connection() else {
                drop(tcp);
                refused += 1;
                if logged.is_none_or(|at| at.elapsed() >= Duration::from_secs(1)) {
                    tracing::warn!(
                        %addr,
                        refused,
                        max = limits.max_connections,
                        "connection refused: limits.max_connections are open"
                    );
                    (refused, logged) = (0, Some(Instant::now()));
                }
                continue;
            };
            let (conn_tx, acceptor, tls) = (tx.clone(), tls.acceptor_for(alpn), tls.clone());
            let timeout = limits.handshake_timeout;
            tokio::spawn(async move {
                let accepted =
                    tokio::time::timeout(timeout, TlsConn::accept(&tls, &acceptor, tcp, addr))
                        .await;
                drop(handshake);
                match accepted {
                    Ok(Ok(Handshake::Ready(conn))) => {
                        let _ = conn_tx.send(Ok(conn.holding(slot))).await;
                    }
                    Ok(Ok(Handshake::Refused(conn))) => {
                        conn.answer(timeout).await;
                        drop(slot);
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
