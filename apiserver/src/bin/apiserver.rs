//! `apiserver`: shoal's control plane.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use apiserver::server::{self, controller::ControllerConfig, ServerConfig};
use clap::Parser;

/// shoal's control plane: stores DesiredStates, serves the status API and the node protocol.
#[derive(Debug, Parser)]
#[command(name = "apiserver", version)]
struct Args {
    /// Data directory (created if missing).
    #[arg(long)]
    data: PathBuf,
    /// Address to listen on (port 0 picks a free port, printed at start).
    #[arg(long, default_value = "127.0.0.1:7070")]
    listen: SocketAddr,
    /// Tokens file (YAML, see docs/security.md). Without it the server listens on loopback only.
    #[arg(long)]
    tokens: Option<PathBuf>,
    /// TLS certificate chain (PEM).
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// TLS private key (PEM).
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Largest request body in bytes.
    #[arg(long, default_value_t = server::DEFAULT_MAX_BODY)]
    max_body_bytes: usize,
    /// sled page cache in MiB.
    #[arg(long, default_value_t = 64)]
    cache_mib: u64,
    /// Seconds without a heartbeat before a node is not Ready.
    #[arg(long, default_value_t = 40)]
    ready_grace_seconds: u64,
    /// Events kept.
    #[arg(long, default_value_t = 10_000)]
    event_retention: usize,
}

fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let config = ServerConfig {
        data: args.data,
        listen: args.listen,
        tokens: args.tokens,
        tls: args.tls_cert.zip(args.tls_key),
        max_body: args.max_body_bytes,
        cache_bytes: args.cache_mib * 1024 * 1024,
        controller: ControllerConfig {
            event_retention: args.event_retention,
            ready_grace: Duration::from_secs(args.ready_grace_seconds),
            ..ControllerConfig::default()
        },
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    match runtime.block_on(server::run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("apiserver: {message}");
            ExitCode::from(2)
        }
    }
}
