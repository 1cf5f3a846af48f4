//! Arbiter: an HTTP training-and-inference service for pairwise preference prediction.

pub mod bench;
pub mod cli;
pub mod config;
pub mod data;
pub mod http;
pub mod jobs;
pub mod keys;
pub mod ml;
pub mod store;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::{Command, ServeArgs, Settings, StoreArgs, WorkerArgs};
use crate::http::{AppState, Limits};
use crate::jobs::runner::NO_TRAINER_REASON;
use crate::jobs::{Reaper, Runner, RunnerConfig, Trainer};
use crate::store::artifacts::Artifacts;
use crate::store::files::DataDir;
use crate::store::Store;

/// Logs to stderr; `RUST_LOG` filters (default: info, quieter sqlx).
pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,sqlx=warn,tower_http=info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_ansi(ansi).with_writer(std::io::stderr).try_init();
}

/// The trainer the service and the worker use: LoRA on the frozen base, on the configured
/// device. The base model is loaded by the first job, not at start.
pub fn default_trainer(store: &StoreArgs) -> anyhow::Result<Option<Arc<dyn Trainer>>> {
    let device = bench::parse_device(&store.device)?;
    Ok(Some(Arc::new(jobs::qlora::QloraTrainer::new(device, store.base_format, store.host_embeddings))))
}

/// Runs one command until it finishes or a shutdown signal arrives.
pub async fn run(settings: Settings) -> anyhow::Result<()> {
    match settings.command {
        Command::Train(args) => tokio::task::spawn_blocking(move || cli::train(&args)).await?,
        Command::Predict(args) => tokio::task::spawn_blocking(move || cli::predict(&args)).await?,
        Command::Bench(cmd) => tokio::task::spawn_blocking(move || bench::bench(&cmd)).await?,
        Command::Keys(cmd) => keys::run(cmd).await,
        Command::Serve(args) => {
            let trainer = default_trainer(&args.store)?;
            let app = App::build(args, trainer).await?;
            let token = app.shutdown_token();
            tokio::spawn(async move {
                shutdown_signal().await;
                token.cancel();
            });
            app.run().await
        }
        Command::Worker(args) => {
            let trainer = default_trainer(&args.store)?;
            let token = CancellationToken::new();
            let t = token.clone();
            tokio::spawn(async move {
                shutdown_signal().await;
                t.cancel();
            });
            run_worker(args, trainer, token).await
        }
    }
}

/// Opens the store (creating the data directory and applying migrations) and the artifact
/// store.
pub async fn open_store(args: &StoreArgs) -> anyhow::Result<(Store, DataDir, Artifacts)> {
    let dirs = DataDir::new(&args.data_dir);
    dirs.create().context("creating the data directory")?;
    let artifacts = Artifacts::open(args.artifact_store.as_deref(), dirs.root())?;
    tracing::info!(artifacts = %artifacts.describe(), "artifact store");
    let url = args.database_url();
    let store = Store::connect(&url)
        .await
        .with_context(|| format!("opening the database {}", store::redact_url(&url)))?;
    Ok((store, dirs, artifacts))
}

/// The start-up check of rows against files (see `store::reconcile`); problems are logged.
/// With a shared artifact store the data directory is only a working copy (files a node lacks
/// are fetched when needed): only the temporaries of interrupted writes and downloads go.
pub async fn reconcile(store: &Store, dirs: &DataDir, artifacts: &Artifacts) {
    if artifacts.is_shared() {
        match store::reconcile::remove_temporaries(store, dirs.root()).await {
            Ok(0) => {}
            Ok(n) => tracing::warn!(temp_removed = n, "start-up check of the data directory (a working copy)"),
            Err(e) => tracing::warn!(error = %e, "the start-up check of the data directory failed"),
        }
        return;
    }
    match store.reconcile(dirs, store::now_ms()).await {
        Ok(r) if r == store::reconcile::Reconciled::default() => {}
        Ok(r) => tracing::warn!(
            checkpoints_flagged = r.checkpoints_flagged,
            datasets_missing = r.datasets_missing,
            adapters_missing = r.adapters_missing,
            temp_removed = r.temp_removed,
            unreferenced_removed = r.unreferenced_removed,
            "start-up check of the data directory"
        ),
        Err(e) => tracing::warn!(error = %e, "the start-up check of the data directory failed"),
    }
}

/// `arbiter worker`: the job runner alone, until `shutdown`.
pub async fn run_worker(args: WorkerArgs, trainer: Option<Arc<dyn Trainer>>, shutdown: CancellationToken) -> anyhow::Result<()> {
    args.queue.check().map_err(anyhow::Error::msg)?;
    let config = RunnerConfig::from_args(&args.queue, &args.store)?;
    let (store, dirs, artifacts) = open_store(&args.store).await?;
    reconcile(&store, &dirs, &artifacts).await;
    let runner = Runner::new(store.clone(), dirs, artifacts, trainer, config);
    runner.run(shutdown).await;
    store.close().await;
    Ok(())
}

/// The service, built and bound but not yet serving. Tests build it with port 0 and read the
/// bound address; `run` serves until the shutdown token is cancelled.
pub struct App {
    listener: TcpListener,
    router: axum::Router,
    store: Store,
    runner: Option<Runner>,
    reaper: Option<Reaper>,
    shutdown: CancellationToken,
    header_timeout: Duration,
    drain_timeout: Duration,
}

impl App {
    pub async fn build(args: ServeArgs, trainer: Option<Arc<dyn Trainer>>) -> anyhow::Result<App> {
        args.queue.check().map_err(anyhow::Error::msg)?;
        let (store, dirs, artifacts) = open_store(&args.store).await?;
        reconcile(&store, &dirs, &artifacts).await;
        let loopback = args.addr.ip().is_loopback();
        let auth = http::auth::Auth::new(args.api_keys.as_ref().map(|k| k.0.as_str()), store.clone(), loopback)?;
        if !auth.any_keys().await? {
            anyhow::ensure!(
                loopback,
                "refusing to listen on {} without API keys: set ARBITER_API_KEYS (scope:key pairs) or create one with \
                 `arbiter keys create --scope admin`, or listen on a loopback address such as 127.0.0.1",
                args.addr
            );
            tracing::warn!(
                addr = %args.addr,
                "no API keys are configured: the API is open to every local user (set ARBITER_API_KEYS or run `arbiter keys create`)"
            );
        } else {
            tracing::info!(configured = auth.configured_keys(), "API keys required (Authorization: Bearer)");
        }
        let models_dir = args
            .models_dir
            .clone()
            .or_else(|| args.store.model.parent().map(std::path::Path::to_path_buf))
            .unwrap_or_else(|| std::path::PathBuf::from("."));
        let shutdown = CancellationToken::new();
        let queued_reason: Option<Arc<str>> = if args.no_worker {
            Some("this server runs no worker (--no-worker): a separate `arbiter worker` claims queued jobs".into())
        } else if trainer.is_none() {
            Some(NO_TRAINER_REASON.into())
        } else {
            None
        };
        let state = AppState {
            store: store.clone(),
            dirs: dirs.clone(),
            artifacts: artifacts.clone(),
            limits: Limits {
                max_body_bytes: args.max_body_bytes,
                request_timeout: Duration::from_secs(args.request_timeout_secs.max(1)),
                header_timeout: Duration::from_secs(args.header_timeout_secs.max(1)),
                max_dataset_rows: args.max_dataset_rows.max(1),
                max_text_chars: args.max_text_chars.max(1),
            },
            auth,
            models_dir,
            default_model: args.store.model.clone(),
            queued_reason,
            metrics: Arc::default(),
            max_attempts: i64::from(args.queue.max_attempts.max(1)),
            worker_ttl_ms: args.queue.lease_ms.min(i64::MAX as u64) as i64,
            shutdown: shutdown.clone(),
            predictor: http::predict::Predictor::from_args(&args)?,
        };
        // without a worker this node still reaps expired leases (workers elsewhere may die)
        let (runner, reaper) = match args.no_worker {
            true => (None, Some(Reaper::new(store.clone(), args.queue.lease(), args.queue.poll()))),
            false => {
                let config = RunnerConfig::from_args(&args.queue, &args.store)?;
                (Some(Runner::new(store.clone(), dirs, artifacts, trainer, config)), None)
            }
        };
        let listener = TcpListener::bind(args.addr).await.with_context(|| format!("binding {}", args.addr))?;
        let header_timeout = state.limits.header_timeout;
        let drain_timeout = state.limits.request_timeout;
        Ok(App { listener, router: http::router(state), store, runner, reaper, shutdown, header_timeout, drain_timeout })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Cancel it to stop: the server drains in-flight requests and the worker stops at a safe
    /// point, giving its job back to the queue.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    pub async fn run(self) -> anyhow::Result<()> {
        let addr = self.listener.local_addr()?;
        tracing::info!(%addr, worker = self.runner.is_some(), "arbiter listening");
        let worker = self.runner.map(|r| tokio::spawn(r.run(self.shutdown.clone())));
        let reaper = self.reaper.map(|r| tokio::spawn(r.run(self.shutdown.clone())));
        let served = http::serve::serve(
            self.listener,
            self.router,
            http::serve::ServeConfig { header_timeout: self.header_timeout, drain_timeout: self.drain_timeout },
            self.shutdown.clone(),
        )
        .await;
        self.shutdown.cancel();
        if let Some(worker) = worker {
            if tokio::time::timeout(Duration::from_secs(60), worker).await.is_err() {
                tracing::warn!("the worker did not stop within 60 s; exiting anyway");
            }
        }
        if let Some(reaper) = reaper {
            let _ = reaper.await;
        }
        self.store.close().await;
        tracing::info!("arbiter stopped");
        served.context("serving HTTP")
    }
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::warn!(error = %e, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = terminate => {},
    }
    tracing::info!("shutdown signal received");
}
