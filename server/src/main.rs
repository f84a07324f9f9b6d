//! `ward-server`: serve a configured vault, run a self-contained dev vault, or create the
//! master key.

use clap::{Parser, Subcommand};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use ward_hsm::{Hsm, HsmError, KeyWrapper, MacSigner};
use ward_server::config::Config;
use ward_server::server::{self, StartError};

#[derive(Parser)]
#[command(name = "ward-server", version, about = "Ward secrets vault server")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the vault described by a config file. The HSM PIN comes from WARD_HSM_PIN or the
    /// config's pin_file, never from the command line.
    Serve {
        /// Config file (TOML).
        #[arg(long)]
        config: PathBuf,
    },
    /// Development server: creates a SoftHSM token, master key, dev CA, certificates, policy
    /// and config under DIR on first run, reuses them afterwards, and serves.
    Dev {
        /// Where everything lives.
        #[arg(long, default_value = ".ward-dev")]
        data_dir: PathBuf,
        /// Listen address (port 0 picks a free port; the ready line names it).
        #[arg(long, default_value = "127.0.0.1:8443")]
        listen: SocketAddr,
    },
    /// Creates the master key and the audit checkpoint key named by the config on its token,
    /// if they do not exist yet.
    Init {
        /// Config file (TOML).
        #[arg(long)]
        config: PathBuf,
    },
    /// Restores a backup (`wardctl admin backup FILE`) into the config's data_dir, which must
    /// not exist yet or be empty (with `[store] backend = "etcd"`: the store goes into the
    /// etcd prefix, which must be empty, and data_dir gets the audit log). Its signature is
    /// checked in the HSM first; serving it needs the same HSM master key(s).
    Restore {
        /// Config file (TOML) naming the data_dir to create.
        #[arg(long)]
        config: PathBuf,
        /// The backup file.
        #[arg(long)]
        from: PathBuf,
    },
}

/// mimalloc instead of glibc malloc: the request path allocates many small, short-lived
/// buffers (protobuf, sled nodes, TLS records) across threads, and glibc's arenas showed up as
/// ~20% of server CPU under a fetch load (perf, BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Default log filter. cryptoki logs every mechanism number it has no name for at ERROR level
/// while listing a token's mechanisms; that is noise, not an error.
const DEFAULT_LOG: &str = "info,cryptoki::mechanism=off";

fn main() -> ExitCode {
    // Before anything else: a private umask (sled creates its files with the default mode) and
    // no core dumps (a dump would hold the unsealed keyring).
    let hardening = ward_server::harden::harden_process();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("WARD_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(DEFAULT_LOG)),
        )
        .with_writer(std::io::stderr)
        .init();
    ward_server::grpc::catch_panic::install_hook();
    for failure in hardening {
        tracing::warn!("{failure}");
    }
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ward-server: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

fn run(cli: Cli) -> Result<(), StartError> {
    // Everything that touches the process environment happens here, before any thread starts.
    if let Command::Restore { config, from } = &cli.command {
        let cfg = Config::load(config).map_err(StartError::Config)?;
        if let Some(conf) = &cfg.hsm.softhsm_conf {
            ward_hsm::softhsm::export_conf(conf);
        }
        // The backup's signature is checked in the HSM before anything is written.
        let hsm = server::open_hsm(&cfg)?;
        let r = ward_server::vault::backup::restore(
            from,
            &cfg.data_dir,
            cfg.audit.segment_bytes,
            &hsm,
            cfg.store.etcd().map(|e| e.store_config()).as_ref(),
        )
        .map_err(StartError::Storage)?;
        println!(
            "restored {} entries into {}; serving it needs master key(s) {} on token {:?}",
            r.entries,
            cfg.data_dir.display(),
            r.master_keys.join(", "),
            cfg.hsm.token_label
        );
        return Ok(());
    }
    let (cfg, dev_dir) = match &cli.command {
        Command::Serve { config } | Command::Init { config } => {
            let cfg = Config::load(config).map_err(StartError::Config)?;
            if let Some(conf) = &cfg.hsm.softhsm_conf {
                ward_hsm::softhsm::export_conf(conf);
            }
            (cfg, None)
        }
        // Handled above; nothing to serve.
        Command::Restore { .. } => return Ok(()),
        Command::Dev { data_dir, listen } => {
            let dir = std::path::absolute(data_dir)
                .map_err(|e| StartError::Config(format!("{}: {e}", data_dir.display())))?;
            let path = ward_server::dev::prepare_files(&dir, *listen)?;
            let mut cfg = Config::load(&path).map_err(StartError::Config)?;
            cfg.listen = *listen;
            (cfg, Some(dir))
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| StartError::Other(format!("runtime: {e}")))?;
    let result = runtime.block_on(async move {
        let hsm: Arc<dyn Hsm> = match (&cli.command, &dev_dir) {
            (Command::Dev { .. }, _) => {
                let cfg = cfg.clone();
                blocking(move || ward_server::dev::prepare_hsm(&cfg)).await?
            }
            (Command::Init { .. }, _) => {
                let cfg = cfg.clone();
                return blocking(move || init(&cfg)).await;
            }
            _ => {
                let cfg = cfg.clone();
                Arc::new(blocking(move || server::open_hsm(&cfg)).await?)
            }
        };
        server::serve(cfg, hsm, |at| {
            let addr = at.grpc;
            if let Some(dir) = &dev_dir {
                println!("{}", ward_server::dev::banner(dir, &at));
            }
            if let Some(m) = at.metrics {
                tracing::info!(addr = %m, "metrics listening");
                println!("ward-server metrics addr={m}");
            }
            if let Some(p) = at.portal {
                tracing::info!(addr = %p, "portal listening");
                println!("ward-server portal addr={p}");
            }
            tracing::info!(%addr, "ready");
            println!("ward-server ready addr={addr}");
        })
        .await
    });
    // A blocking task stuck in the storage engine (a stalled disk) must not keep the process
    // from exiting.
    runtime.shutdown_timeout(std::time::Duration::from_secs(2));
    result
}

fn init(cfg: &Config) -> Result<(), StartError> {
    let hsm = server::open_hsm(cfg)?;
    match hsm.create_master_key(&cfg.hsm.master_key_label) {
        Ok(()) => println!("created master key {:?}", cfg.hsm.master_key_label),
        Err(HsmError::MasterKeyExists { .. }) => {
            println!("master key {:?} already exists", cfg.hsm.master_key_label)
        }
        Err(e) => return Err(e.into()),
    }
    let audit_label = &cfg.audit.checkpoint_key_label;
    match hsm.create_mac_key(audit_label) {
        Ok(()) => println!("created audit checkpoint key {audit_label:?}"),
        Err(HsmError::MacKeyExists { .. }) => {
            println!("audit checkpoint key {audit_label:?} already exists")
        }
        Err(e) => return Err(e.into()),
    }
    Ok(())
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StartError> + Send + 'static,
) -> Result<T, StartError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| StartError::Other(e.to_string()))?
}
