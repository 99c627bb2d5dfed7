//! `apiserver`: shoal's control plane.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use apiserver::server::{self, controller::ControllerConfig, ServerConfig};
use clap::Parser;

/// shoal's control plane: stores DesiredStates, serves the status API and the node protocol.
///
/// `--data`, `--listen`, `--tokens`, `--tls-cert`, `--tls-key` and `--store` can also come from
/// the environment (`SHOAL_DATA`, …); `apiserver install` writes them to /etc/shoal/apiserver.env.
#[derive(Debug, Parser)]
#[command(
    name = "apiserver",
    version,
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,
    /// Data directory (created if missing): the store (unless --store says otherwise) and
    /// git sync's checkout.
    #[arg(long, env = "SHOAL_DATA", required = true)]
    data: Option<PathBuf>,
    /// Keep the store in PostgreSQL instead of the data directory:
    /// postgres://user:password@host:port/database. Several apiservers may share one.
    #[arg(long, env = "SHOAL_STORE", hide_env_values = true)]
    store: Option<String>,
    /// Address to listen on (port 0 picks a free port, printed at start).
    #[arg(long, env = "SHOAL_LISTEN", default_value = "127.0.0.1:7070")]
    listen: SocketAddr,
    /// Tokens file (YAML, see docs/security.md). Without it the server listens on loopback only.
    #[arg(long, env = "SHOAL_TOKENS")]
    tokens: Option<PathBuf>,
    /// TLS certificate chain (PEM).
    #[arg(long, env = "SHOAL_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// TLS private key (PEM).
    #[arg(long, env = "SHOAL_TLS_KEY", requires = "tls_cert")]
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
    /// Seconds between stored heartbeats of a node whose report did not change (sled;
    /// the others are kept in memory). With a store shared by several apiservers every
    /// heartbeat is stored.
    #[arg(long, default_value_t = 60)]
    heartbeat_persist_seconds: u64,
    /// Git repository (URL or path) to sync manifests from.
    #[arg(long)]
    git_repo: Option<String>,
    /// Branch to sync.
    #[arg(long, default_value = "main", requires = "git_repo")]
    git_branch: String,
    /// Folder of the repository holding the manifests.
    #[arg(long, default_value = ".", requires = "git_repo")]
    git_path: String,
    /// How often to poll the repository (e.g. 60s, 5m).
    #[arg(long, default_value = "60s", requires = "git_repo", value_parser = humantime::parse_duration)]
    git_interval: Duration,
    /// File holding the webhook secret (GitHub HMAC key or GitLab token).
    #[arg(long, requires = "git_repo")]
    git_webhook_secret_file: Option<PathBuf>,
    /// Events kept.
    #[arg(long, default_value_t = 10_000)]
    event_retention: usize,
    /// With --store shared by several apiservers: how long the leader's lease lasts
    /// unrenewed. Another replica takes over within about this long after the leader dies.
    #[arg(long, default_value_t = 10)]
    lease_seconds: u64,
    /// Most watches (`?watch=true` streams) open at once; more are refused with 429.
    #[arg(long, default_value_t = server::limits::DEFAULT_MAX_WATCHES)]
    max_watches: usize,
    /// Most watches one token may hold open at once.
    #[arg(long, default_value_t = server::limits::DEFAULT_MAX_WATCHES_PER_TOKEN)]
    max_watches_per_token: usize,
    /// Most connections that have not shown a valid token yet. Over it (or over the
    /// per-peer limit), a new connection is served only for requests with a valid token and
    /// health probes; anything else is answered 503 with Retry-After.
    #[arg(long, default_value_t = server::limits::DEFAULT_MAX_ANONYMOUS_CONNECTIONS)]
    max_anonymous_connections: usize,
    /// Most connections without a valid token yet from one address.
    #[arg(long, default_value_t = server::limits::DEFAULT_MAX_ANONYMOUS_CONNECTIONS_PER_PEER)]
    max_anonymous_connections_per_peer: usize,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Install this apiserver as a systemd service (shoal-apiserver.service): settings in
    /// /etc/shoal/apiserver.env, the tokens file and TLS key copied with mode 0600, data in
    /// /var/lib/shoal/apiserver (0700); then enable and start it. Run it again to change a
    /// setting.
    Install(InstallArgs),
    /// Stop and remove the service; the data folder stays unless --purge.
    Uninstall(UninstallArgs),
}

#[derive(Debug, clap::Args)]
struct InstallArgs {
    /// Tokens file (YAML, see docs/security.md); copied, the copy readable by root only.
    #[arg(long, value_name = "FILE")]
    tokens: PathBuf,
    /// Address to listen on.
    #[arg(long, default_value = "0.0.0.0:7070")]
    listen: SocketAddr,
    /// TLS certificate chain (PEM); copied.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// TLS private key (PEM); copied, readable by root only.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// File holding a PostgreSQL URL (with its password) to keep the store in; the URL goes
    /// into the root-only settings file.
    #[arg(long, value_name = "FILE")]
    store_file: Option<PathBuf>,
    /// Write everything under DIR instead of / (an image being built, a test); systemctl is
    /// not called.
    #[arg(long, value_name = "DIR", default_value = "/")]
    root: PathBuf,
    /// Write the files, but do not enable or start the service.
    #[arg(long)]
    no_start: bool,
}

#[derive(Debug, clap::Args)]
struct UninstallArgs {
    /// Remove the data folder too: every DesiredState, revision, node and event.
    #[arg(long)]
    purge: bool,
    /// Remove from under DIR instead of / (see install --root).
    #[arg(long, value_name = "DIR", default_value = "/")]
    root: PathBuf,
}

/// `apiserver install`: every input checked (the tokens parsed, the certificate and key
/// loaded together) before anything is written.
fn install(args: &InstallArgs) -> Result<(), String> {
    use apiserver::install::{plan_install, InstallOptions, UNIT};
    let tokens = std::fs::read(&args.tokens)
        .map_err(|e| format!("--tokens {}: {e}", args.tokens.display()))?;
    server::auth::Tokens::parse(&String::from_utf8_lossy(&tokens))
        .map_err(|e| format!("--tokens {}: {e}", args.tokens.display()))?;
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => {
            let read = |p: &PathBuf, what: &str| {
                std::fs::read(p).map_err(|e| format!("{what} {}: {e}", p.display()))
            };
            let (cert_pem, key_pem) = (read(cert, "--tls-cert")?, read(key, "--tls-key")?);
            let _ = rustls::crypto::ring::default_provider().install_default();
            tokio::runtime::Builder::new_current_thread()
                .build()
                .map_err(|e| e.to_string())?
                .block_on(axum_server::tls_rustls::RustlsConfig::from_pem(
                    cert_pem.clone(),
                    key_pem.clone(),
                ))
                .map_err(|e| {
                    format!(
                        "--tls-cert {} and --tls-key {} do not make a certificate and its key: {e}",
                        cert.display(),
                        key.display()
                    )
                })?;
            Some((cert_pem, key_pem))
        }
        _ => None,
    };
    let store = match &args.store_file {
        Some(path) => {
            let url = shoal_install::read_secret(path, "--store-file")?;
            if !url.starts_with("postgres://") && !url.starts_with("postgresql://") {
                return Err(format!(
                    "--store-file {}: expected postgres://user:password@host:port/database",
                    path.display()
                ));
            }
            Some(url)
        }
        None => None,
    };
    let exe = std::env::current_exe()
        .and_then(std::fs::canonicalize)
        .map_err(|e| format!("cannot tell where this apiserver binary is: {e}"))?;
    if let Some(note) = shoal_install::exe_note(&exe) {
        println!("{note}");
    }
    let options = InstallOptions {
        listen: args.listen,
        tokens,
        tls,
        store,
        exe,
    };
    for line in shoal_install::apply(&plan_install(&options, !args.no_start)?, &args.root)? {
        println!("{line}");
    }
    println!(
        "apiserver installed as {UNIT}{}",
        if args.no_start {
            " (not started: --no-start)"
        } else {
            ""
        }
    );
    Ok(())
}

fn uninstall(args: &UninstallArgs) -> Result<(), String> {
    let steps = apiserver::install::plan_uninstall(args.purge);
    for line in shoal_install::apply(&steps, &args.root)? {
        println!("{line}");
    }
    println!("apiserver uninstalled");
    Ok(())
}

fn main() -> ExitCode {
    let args = Args::parse();
    let done = match &args.command {
        Some(Command::Install(install_args)) => Some(install(install_args)),
        Some(Command::Uninstall(uninstall_args)) => Some(uninstall(uninstall_args)),
        None => None,
    };
    if let Some(result) = done {
        return match result {
            Ok(()) => ExitCode::SUCCESS,
            Err(message) => {
                eprintln!("apiserver: {message}");
                ExitCode::from(2)
            }
        };
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let Some(data) = args.data.clone() else {
        eprintln!("apiserver: pass --data DIR (or set SHOAL_DATA)");
        return ExitCode::from(2);
    };
    let webhook_secret = match &args.git_webhook_secret_file {
        Some(path) => match std::fs::read_to_string(path) {
            Ok(secret) if !secret.trim().is_empty() => Some(secret.trim().to_string()),
            Ok(_) => {
                eprintln!(
                    "apiserver: {} is empty; put the webhook secret in it",
                    path.display()
                );
                return ExitCode::from(2);
            }
            Err(e) => {
                eprintln!("apiserver: cannot read {}: {e}", path.display());
                return ExitCode::from(2);
            }
        },
        None => None,
    };
    let git = args
        .git_repo
        .clone()
        .map(|repo| apiserver::gitsync::GitConfig {
            repo,
            branch: args.git_branch.clone(),
            path: args.git_path.clone(),
            interval: args.git_interval,
            webhook_secret,
        });
    let config = ServerConfig {
        git,
        data,
        store: args.store,
        listen: args.listen,
        tokens: args.tokens,
        tls: args.tls_cert.zip(args.tls_key),
        max_body: args.max_body_bytes,
        max_watches: (args.max_watches, args.max_watches_per_token),
        max_anonymous_connections: (
            args.max_anonymous_connections,
            args.max_anonymous_connections_per_peer,
        ),
        cache_bytes: args.cache_mib * 1024 * 1024,
        controller: ControllerConfig {
            event_retention: args.event_retention,
            ready_grace: Duration::from_secs(args.ready_grace_seconds),
            heartbeat_persist_interval: Duration::from_secs(args.heartbeat_persist_seconds),
            lease_duration: Duration::from_secs(args.lease_seconds.max(1)),
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
