//! `nodelet`: the shoal node agent.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use nodelet::agent::{self, Agent, Shared};
use nodelet::artifact::{ArtifactCache, DownloadLimits};
use nodelet::backend::{driver, package, service, Backends};
use nodelet::client::{ApiClient, HttpClient};
use nodelet::host::{self, HostSampler};
use nodelet::journal::{read_json, write_atomic, StateDir};
use nodelet::launcher;
use nodelet::supervisor::Supervisor;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// The shoal node agent: keeps this node at its DesiredStates, probes health, reverts by itself.
///
/// Every setting can also come from the environment (`SHOAL_…`, named in each option's help);
/// `nodelet install` writes them to /etc/shoal/nodelet.env for its systemd unit.
#[derive(Debug, Parser)]
#[command(
    name = "nodelet",
    version,
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,
    /// apiserver URL; repeat it (or separate with commas) for replicas, tried in turn.
    #[arg(long, env = "SHOAL_SERVER", required = true)]
    server: Vec<String>,
    /// Join token, to register (once; the node token is kept in the state dir). Prefer
    /// --join-token-file or the environment: a command line is visible to every user in `ps`.
    #[arg(long, env = "SHOAL_JOIN_TOKEN", hide_env_values = true)]
    join_token: Option<String>,
    /// File holding the join token (one line; keep it mode 0600).
    #[arg(
        long,
        env = "SHOAL_JOIN_TOKEN_FILE",
        value_name = "FILE",
        conflicts_with = "join_token"
    )]
    join_token_file: Option<PathBuf>,
    /// Node token, when registered by other means.
    #[arg(
        long,
        env = "SHOAL_NODE_TOKEN",
        hide_env_values = true,
        conflicts_with_all = ["join_token", "join_token_file"]
    )]
    token: Option<String>,
    /// File holding the node token (one line), when registered by other means.
    #[arg(
        long,
        env = "SHOAL_NODE_TOKEN_FILE",
        value_name = "FILE",
        conflicts_with_all = ["join_token", "join_token_file", "token"]
    )]
    token_file: Option<PathBuf>,
    /// CA certificates (PEM) to trust besides the platform's, for the apiserver and artifact
    /// downloads: for a fleet whose certificates a private CA issued.
    #[arg(long, env = "SHOAL_CA_FILE", value_name = "FILE")]
    ca_file: Option<PathBuf>,
    /// Node name (a DNS label). Default: the hostname.
    #[arg(long, env = "SHOAL_NODE_NAME")]
    name: Option<String>,
    /// Extra labels, `k=v,k=v`.
    #[arg(long, env = "SHOAL_LABELS", value_delimiter = ',')]
    labels: Vec<String>,
    /// State directory. Default: <root>/var/lib/shoal/nodelet.
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Manage this tree instead of / (a sandbox: dpkg --root, services under it).
    #[arg(long, default_value = "/")]
    root: PathBuf,
    /// Seconds between heartbeats.
    #[arg(long, env = "SHOAL_HEARTBEAT_SECONDS", default_value_t = 10)]
    heartbeat_seconds: u64,
    /// Node variables, `NAME=VALUE` (repeatable): `${NAME}` in service arguments, environment and
    /// probes is replaced by VALUE on this node. `${NODE_NAME}` is always set.
    #[arg(long = "var")]
    vars: Vec<String>,
    /// Versions kept per component (unpacked services, `.deb`, `.ko`) for reverts; the
    /// version a change in flight goes back to is always kept.
    #[arg(long, default_value_t = 3)]
    keep_versions: usize,
    /// Largest artifact downloaded, in bytes (a manifest's `artifact.size` can only lower it).
    #[arg(long, default_value_t = 2 * 1024 * 1024 * 1024)]
    max_artifact_bytes: u64,
    /// Free bytes to leave on the state and root disks: downloads and unpacking stop short of
    /// it, and below it the node reports DiskPressure.
    #[arg(long, default_value_t = 64 * 1024 * 1024)]
    min_free_bytes: u64,
    /// A supervised service's log file is rotated at this size (one old file is kept).
    #[arg(long, default_value_t = 10 * 1024 * 1024)]
    service_log_bytes: u64,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Install this nodelet as a systemd service (shoal-nodelet.service): the settings in
    /// /etc/shoal/nodelet.env, the join token in /etc/shoal/nodelet-join-token (0600), the
    /// state in /var/lib/shoal/nodelet (0700); then enable and start it. Run it again to
    /// change a setting.
    Install(InstallArgs),
    /// Stop and remove the service installed by `nodelet install`. What the nodelet installed
    /// (services, packages, drivers) stays; its state stays too unless --purge.
    Uninstall(UninstallArgs),
}

#[derive(Debug, clap::Args)]
struct InstallArgs {
    /// apiserver URL; repeat it (or separate with commas) for replicas.
    #[arg(long, required = true)]
    server: Vec<String>,
    /// File holding the join token (copied; the copy is readable by root only).
    #[arg(long, value_name = "FILE")]
    join_token_file: PathBuf,
    /// Extra labels, `k=v,k=v`.
    #[arg(long, value_delimiter = ',')]
    labels: Vec<String>,
    /// Node name (a DNS label). Default: the hostname, at each start.
    #[arg(long)]
    name: Option<String>,
    /// CA bundle (PEM) to trust besides the platform's roots (copied).
    #[arg(long, value_name = "FILE")]
    ca_file: Option<PathBuf>,
    /// Seconds between heartbeats (default 10).
    #[arg(long)]
    heartbeat_seconds: Option<u64>,
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
    /// Remove the state folder too (the node token and the journal): the node must join
    /// again, and no longer knows what it installed.
    #[arg(long)]
    purge: bool,
    /// Remove from under DIR instead of / (see install --root).
    #[arg(long, value_name = "DIR", default_value = "/")]
    root: PathBuf,
}

/// `nodelet install`: every input checked before anything is written.
fn install(args: &InstallArgs) -> Result<(), String> {
    let servers = nodelet::client::server_urls(&args.server)?;
    let join_token = shoal_install::read_secret(&args.join_token_file, "--join-token-file")?;
    let ca_pem = match &args.ca_file {
        Some(path) => {
            shoal_tls::read_ca_file(path)?;
            Some(std::fs::read(path).map_err(|e| format!("--ca-file {}: {e}", path.display()))?)
        }
        None => None,
    };
    let labels = parse_labels(&args.labels)?;
    if let Some(name) = &args.name {
        if !manifests::validate::is_dns_label(name) {
            return Err(format!(
                "--name `{name}` is not a DNS label (a-z, 0-9, -; at most 63)"
            ));
        }
    }
    let exe = std::env::current_exe()
        .and_then(std::fs::canonicalize)
        .map_err(|e| format!("cannot tell where this nodelet binary is: {e}"))?;
    if let Some(note) = shoal_install::exe_note(&exe) {
        println!("{note}");
    }
    let options = nodelet::install::InstallOptions {
        servers,
        join_token,
        ca_pem,
        labels,
        name: args.name.clone(),
        heartbeat_seconds: args.heartbeat_seconds,
        exe,
    };
    let steps = nodelet::install::plan_install(&options, !args.no_start)?;
    for line in shoal_install::apply(&steps, &args.root)? {
        println!("{line}");
    }
    println!(
        "nodelet installed as {}{}",
        nodelet::install::UNIT,
        if args.no_start {
            " (not started: --no-start)"
        } else {
            ""
        }
    );
    Ok(())
}

fn uninstall(args: &UninstallArgs) -> Result<(), String> {
    for line in shoal_install::apply(&nodelet::install::plan_uninstall(args.purge), &args.root)? {
        println!("{line}");
    }
    println!("nodelet uninstalled");
    Ok(())
}

fn parse_labels(items: &[String]) -> Result<BTreeMap<String, String>, String> {
    let mut labels = BTreeMap::new();
    for item in items.iter().filter(|i| !i.is_empty()) {
        let (key, value) = item
            .split_once('=')
            .ok_or_else(|| format!("--labels: `{item}` is not key=value"))?;
        if !manifests::validate::is_label_key(key) || !manifests::validate::is_label_value(value) {
            return Err(format!("--labels: `{item}` is not a valid label (keys `name` or `prefix/name`, values up to 63 of [A-Za-z0-9-_.])"));
        }
        labels.insert(key.to_string(), value.to_string());
    }
    Ok(labels)
}

/// The node token, without holding up the agent: a token passed in or saved at an earlier
/// registration is used at once; registering (the first time, or again because the node's
/// labels changed, say after a kernel update) goes on in the background with backoff, so a
/// boot with the apiserver unreachable still starts every service from the journal.
fn connect(
    args: &Args,
    client: Arc<HttpClient>,
    dir: &StateDir,
    name: &str,
    labels: &BTreeMap<String, String>,
    first_boot: bool,
) -> Result<agent::TokenWatch, String> {
    if let Some(token) = &args.token {
        return Ok(tokio::sync::watch::channel(Some(token.clone())).1);
    }
    let labels_file = dir.path().join("registered-labels.json");
    let saved = dir.load_token()?;
    let registered_labels: Option<BTreeMap<String, String>> = read_json(&labels_file)?;
    let join = match (&saved, &args.join_token) {
        (Some(saved), None) => return Ok(tokio::sync::watch::channel(Some(saved.clone())).1),
        (Some(saved), Some(_)) if registered_labels.as_ref() == Some(labels) => {
            return Ok(tokio::sync::watch::channel(Some(saved.clone())).1)
        }
        (_, Some(join)) => join.clone(),
        (None, None) => {
            return Err("this node has no token yet: pass --join-token (or --token)".into())
        }
    };
    if saved.is_some() {
        tracing::info!("labels changed since registration; registering again in the background");
    }
    let (sender, tokens) = tokio::sync::watch::channel(saved);
    let dir = dir.clone();
    let name = name.to_string();
    let labels = labels.clone();
    tokio::spawn(async move {
        let mut backoff = Duration::from_secs(1);
        loop {
            let wait = match client.register(&join, &name, &labels).await {
                Ok(token) => {
                    if let Err(e) = dir.save_token(&token) {
                        tracing::error!(error = %e, "cannot store the node token; it is used from memory");
                    }
                    let labels_json = serde_json::to_vec(&labels).expect("labels serialize");
                    if let Err(e) = write_atomic(&labels_file, &labels_json) {
                        tracing::error!(error = %e, "cannot store the registered labels");
                    }
                    tracing::info!(node = %name, "registered");
                    let _ = sender.send(Some(token));
                    return;
                }
                Err(nodelet::client::ClientError::Rejected { status, message }) => {
                    if first_boot {
                        // Nothing to enforce yet, and the join token is wrong: say so and stop.
                        eprintln!("nodelet: registration refused ({status}): {message}");
                        std::process::exit(2);
                    }
                    tracing::error!(status, %message, "registration refused; enforcing the stored state and trying again in 5 minutes");
                    Duration::from_secs(300)
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot register yet; enforcing the stored state and retrying");
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                    backoff
                }
            };
            tokio::time::sleep(wait).await;
        }
    });
    Ok(tokens)
}

async fn run(mut args: Args) -> Result<(), String> {
    if let Some(file) = &args.join_token_file {
        args.join_token = Some(shoal_install::read_secret(file, "--join-token-file")?);
    }
    if let Some(file) = &args.token_file {
        args.token = Some(shoal_install::read_secret(file, "--token-file")?);
    }
    let root = std::fs::canonicalize(&args.root)
        .map_err(|e| format!("--root {}: {e}", args.root.display()))?;
    let state_dir = args
        .state_dir
        .clone()
        .unwrap_or_else(|| root.join("var/lib/shoal/nodelet"));
    std::fs::create_dir_all(&state_dir)
        .map_err(|e| format!("cannot create the state dir {}: {e}", state_dir.display()))?;
    // Held until the agent exits (the kernel lets go of it on a kill -9 too).
    let _lock = launcher::lock(&state_dir.join("agent.lock"), "nodelet agent")?;
    let dir = StateDir::new(state_dir.clone());
    let name = match &args.name {
        Some(name) => name.clone(),
        None => host::label_value(&sysinfo::System::host_name().unwrap_or_default())
            .to_ascii_lowercase(),
    };
    if !manifests::validate::is_dns_label(&name) {
        return Err(format!(
            "node name `{name}` is not a DNS label; pass --name"
        ));
    }
    let mut labels = host::self_labels();
    labels.extend(parse_labels(&args.labels)?);

    let cas = match &args.ca_file {
        Some(path) => shoal_tls::read_ca_file(path)?,
        None => Vec::new(),
    };
    let client = Arc::new(HttpClient::new(&args.server, &cas)?);
    let stored = dir.load_assignment()?;
    let first_boot = stored.is_none() && dir.load()?.applied.is_empty();
    let tokens = connect(&args, client.clone(), &dir, &name, &labels, first_boot)?;

    let runner = if root == std::path::Path::new("/") && service::systemd_is_pid1() {
        service::Runner::Systemd {
            unit_dir: PathBuf::from("/etc/systemd/system"),
        }
    } else {
        service::Runner::Supervisor(Arc::new(
            Supervisor::new(&state_dir).with_log_limit(args.service_log_bytes, 1),
        ))
    };
    let supervisor = match &runner {
        service::Runner::Supervisor(s) => Some(s.clone()),
        service::Runner::Systemd { .. } => None,
    };
    let package = package::PackageBackend::new(&root, &state_dir);
    package.prepare_sandbox().map_err(|e| e.to_string())?;
    let backends = Backends {
        service: service::ServiceBackend::new(&root, runner),
        driver: driver::DriverBackend::new(&root, &state_dir, driver::kernel_release()),
        package,
    };
    let limits = DownloadLimits {
        max_bytes: args.max_artifact_bytes,
        min_free_bytes: args.min_free_bytes,
        ..DownloadLimits::default()
    };
    let artifacts = ArtifactCache::new(
        state_dir.join("artifacts"),
        cas.iter()
            .fold(limits.client_builder(), |builder, ca| {
                builder.add_root_certificate(ca.clone())
            })
            .build()
            .map_err(|e| e.to_string())?,
    )
    .with_limits(limits);
    let shared = Arc::new(Shared::default());
    let host = Arc::new(HostSampler::new(&root));
    let mut vars = BTreeMap::from([("NODE_NAME".to_string(), name.clone())]);
    for item in &args.vars {
        let (key, value) = item
            .split_once('=')
            .ok_or_else(|| format!("--var: `{item}` is not NAME=VALUE"))?;
        vars.insert(key.to_string(), value.to_string());
    }
    let agent = Agent::new(backends, artifacts, host, dir.clone(), shared.clone())?
        .with_vars(vars)
        .with_settings(agent::AgentSettings {
            root: root.clone(),
            min_free_bytes: args.min_free_bytes,
            keep_versions: args.keep_versions,
        });

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let (assign_tx, assign_rx) = tokio::sync::watch::channel(stored);
    tokio::spawn(agent::follow(
        client.clone(),
        tokens.clone(),
        name.clone(),
        assign_tx,
        stop_rx.clone(),
    ));
    tokio::spawn(agent::heartbeat(
        client.clone(),
        tokens,
        name.clone(),
        shared,
        dir,
        Duration::from_secs(args.heartbeat_seconds.max(1)),
        stop_rx.clone(),
    ));
    // Started by a launcher: a launcher killed with -9 cannot stop its agent, and a new
    // launcher would start a second one on the same state, so the agent stops when its
    // parent is gone (it is re-parented).
    let launcher = std::env::var(launcher::LAUNCHED_ENV)
        .ok()
        .and_then(|pid| pid.parse::<i32>().ok())
        .map(nix::unistd::Pid::from_raw);
    tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
        let orphaned = async {
            match launcher {
                // Checked at once too: the launcher may have died before this ran.
                Some(parent) => loop {
                    if nix::unistd::getppid() != parent {
                        tracing::warn!("the launcher is gone: stopping");
                        break;
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
                },
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
            _ = orphaned => {}
        }
        let _ = stop_tx.send(true);
    });
    println!(
        "nodelet {name} running (root {}, state {})",
        root.display(),
        state_dir.display()
    );
    let result = agent.run(assign_rx, stop_rx).await;
    if let Some(supervisor) = supervisor {
        supervisor.stop_all().await;
    }
    result
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
                eprintln!("nodelet: {message}");
                ExitCode::from(2)
            }
        };
    }
    let (filter, warning) = host::log_filter(std::env::var("RUST_LOG").ok().as_deref());
    if let Some(warning) = warning {
        eprintln!("nodelet: {warning}");
    }
    tracing_subscriber::registry()
        .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
        .with(filter)
        .init();
    // With a release pinned (`<state>/releases/current`), this binary is the launcher that
    // runs it; the release it starts is the agent (docs/self-update.md).
    if std::env::var_os(launcher::LAUNCHED_ENV).is_none() {
        let state_dir = args
            .state_dir
            .clone()
            .unwrap_or_else(|| args.root.join("var/lib/shoal/nodelet"));
        let releases = launcher::Releases::new(&state_dir);
        if releases.current().is_some() {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("tokio runtime");
            return runtime.block_on(launcher::run(
                releases,
                std::env::args_os().skip(1).collect(),
            ));
        }
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let result = runtime.block_on(run(args));
    // A blocking read still going (a file artifact) must not hold the exit.
    runtime.shutdown_timeout(Duration::from_secs(1));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("nodelet: {message}");
            ExitCode::from(2)
        }
    }
}
