//! The apiserver: configuration, router assembly and the serve loop.

pub mod auth;
pub mod controller;
pub mod error;
pub mod lease;
pub mod limits;
pub mod metrics;
pub mod openapi;
pub mod routes;
mod serve;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::extract::DefaultBodyLimit;
use axum::Router;

use crate::store::{Backend, PostgresBackend, SledBackend, Store};
use auth::Tokens;
use controller::{Controller, ControllerConfig};
use metrics::Metrics;
use routes::AppState;

/// Everything `apiserver` is started with.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Data directory (sled, and git sync's checkout).
    pub data: PathBuf,
    /// A PostgreSQL URL to keep the store in instead of sled in `data`.
    pub store: Option<String>,
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Tokens file; without one the server only listens on loopback.
    pub tokens: Option<PathBuf>,
    /// TLS certificate and key (PEM).
    pub tls: Option<(PathBuf, PathBuf)>,
    /// Largest request body, bytes.
    pub max_body: usize,
    /// Most watches open at once, in total and per token.
    pub max_watches: (usize, usize),
    /// Most connections without a token yet, in total and per peer address.
    pub max_anonymous_connections: (usize, usize),
    /// sled page cache, bytes.
    pub cache_bytes: u64,
    /// Controller tunables.
    pub controller: ControllerConfig,
    /// Git sync, when configured.
    pub git: Option<crate::gitsync::GitConfig>,
}

/// Default request body limit: a generous manifest bundle, far below anything that could hurt.
pub const DEFAULT_MAX_BODY: usize = 4 * 1024 * 1024;

/// The router with its middleware, ready to serve.
pub fn app(state: AppState) -> Router {
    routes::routes()
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            routes::track_latency,
        ))
        .layer(DefaultBodyLimit::max(state.max_body))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            routes::admit,
        ))
        .with_state(state)
}

/// Checks the configuration, opens the store and serves until SIGINT or SIGTERM.
pub async fn run(config: ServerConfig) -> Result<(), String> {
    let tokens = match &config.tokens {
        Some(path) => Tokens::load(path)?,
        None => {
            if !config.listen.ip().is_loopback() {
                return Err(format!(
                    "refusing to listen on {} without --tokens: anyone who can reach it could change the fleet. \
                     Pass --tokens FILE (see docs/security.md), or listen on 127.0.0.1",
                    config.listen
                ));
            }
            tracing::warn!(
                "no --tokens file: every local caller is an operator; listening on loopback only"
            );
            Tokens::open()
        }
    };
    let backend: Arc<dyn Backend> = match &config.store {
        Some(url) => PostgresBackend::connect(url)
            .await
            .map_err(|e| e.to_string())?,
        None => Arc::new(
            SledBackend::open(&config.data, config.cache_bytes).map_err(|e| e.to_string())?,
        ),
    };
    let store = Store::open(backend).await.map_err(|e| e.to_string())?;
    let controller =
        Controller::new(store.clone(), config.controller.clone()).map_err(|e| e.to_string())?;
    let git_wake = Arc::new(tokio::sync::Notify::new());
    let git = config.git.clone().map(|git| {
        Arc::new(crate::gitsync::GitSync::new(
            git,
            &config.data,
            controller.clone(),
        ))
    });
    let state = AppState {
        controller: controller.clone(),
        tokens: Arc::new(tokens),
        metrics: Arc::new(Metrics::new()),
        max_body: config.max_body,
        git: git.clone(),
        git_wake: git_wake.clone(),
        watches: limits::WatchSlots::new(config.max_watches.0, config.max_watches.1),
    };
    if let Some(git) = git {
        tokio::spawn(git.run(git_wake));
    }
    let app = app(state);

    // Readiness changes are noticed by a sweep, not by a request.
    let sweeper = controller.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(2));
        loop {
            tick.tick().await;
            if let Err(e) = sweeper.sweep_readiness(SystemTime::now()).await {
                tracing::error!(error = %e, "readiness sweep failed");
            }
        }
    });

    // Load the certificate before announcing the address: a server that says it listens must serve.
    let tls = match &config.tls {
        Some((cert, key)) => {
            let _ = rustls::crypto::ring::default_provider().install_default();
            Some(
                axum_server::tls_rustls::RustlsConfig::from_pem_file(cert, key)
                    .await
                    .map_err(|e| {
                        format!(
                            "cannot load TLS certificate {} and key {}: {e}",
                            cert.display(),
                            key.display()
                        )
                    })?,
            )
        }
        None => None,
    };

    // Leader election, with a store other apiservers share: the leader alone runs the
    // rollout controller, the readiness sweep's events and git sync.
    if store.is_shared() {
        let elector = controller.clone();
        tokio::spawn(async move {
            // Every second (or a third of a short lease): a follower notices a silent
            // leader within a tick of the lease running out.
            let period = (elector.config().lease_duration / 3).min(Duration::from_secs(1));
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                if let Err(e) = elector.lease_tick().await {
                    tracing::warn!(error = %e, "leader election failed; retrying");
                }
            }
        });
    }

    // The rollout controller: one decision per DesiredState per second, all state in the store.
    let rollouts = controller.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut cue = rollouts.desired_states_changed();
        loop {
            // Every second, and at once when a DesiredState brings or removes a revision: an
            // apply reaches its first wave without waiting for the tick.
            let cued = tokio::select! {
                _ = tick.tick() => false,
                changed = cue.changed() => changed.is_ok(),
            };
            if cued {
                // Applies that come together are decided together.
                tokio::time::sleep(Duration::from_millis(50)).await;
                cue.borrow_and_update();
            }
            if let Err(e) = rollouts.reconcile_rollouts(SystemTime::now()).await {
                tracing::error!(error = %e, "rollout controller failed; retrying");
            }
            // A second from this decision to the next: a rollout steps at most once a second
            // whatever cued it.
            tick.reset();
        }
    });

    let listener =
        listen(config.listen).map_err(|e| format!("cannot listen on {}: {e}", config.listen))?;
    let bound = listener.local_addr().map_err(|e| e.to_string())?;
    let scheme = if tls.is_some() { "https" } else { "http" };
    // Tests and scripts read this line to find the port when --listen uses port 0.
    println!("apiserver listening on {scheme}://{bound}");
    tracing::info!(%bound, data = %config.data.display(), store = store.kind(), "apiserver started");

    let limits = limits::ConnectionLimits::new(
        config.max_anonymous_connections.0,
        config.max_anonymous_connections.1,
        HEADER_READ_TIMEOUT,
    );
    let tls = tls.map(|config| config.get_inner());
    let served = serve::serve(listener, app, tls, limits, shutdown_signal()).await;
    served.map_err(|e| format!("server failed: {e}"))?;
    // Heartbeats answered before their commit are stored before the process ends.
    controller.store_queued_reports().await;
    store.flush().await.map_err(|e| e.to_string())?;
    tracing::info!("apiserver stopped");
    Ok(())
}

/// Connections the kernel completes before the server accepts them. The standard library's
/// 128 overflows when thousands of nodes (or a flood) connect at once, and an overflowing
/// queue makes clients wait out SYN retransmissions (1 s, 3 s, 7 s…); the kernel caps this
/// at `net.core.somaxconn` (4096 on Debian 12).
const LISTEN_BACKLOG: u32 = 4096;

/// A non-blocking listener on `address` with a deep accept queue.
fn listen(address: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let socket = if address.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(address)?;
    let listener = socket.listen(LISTEN_BACKLOG)?.into_std()?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

/// A client has this long to send a request's headers: a slowloris connection (headers at
/// a byte a second) is closed, not kept for ever.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
