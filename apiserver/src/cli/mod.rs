//! The `shoal` operator CLI: argument parsing, commands and their exit codes.

mod client;
mod demo;
mod resources;
mod rollout;
mod table;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use serde::Serialize;

use client::{CliError, Client};
use manifests::wire::{ApplyAction, ApplyResponse, DesiredStateObject};

/// Exit code for success (and "no difference").
pub const EXIT_OK: u8 = 0;
/// Exit code for "there is a difference" or "the rollout failed", where a command reports one.
pub const EXIT_DIFFERENT: u8 = 1;
/// Exit code for bad input or an error.
pub const EXIT_ERROR: u8 = 2;

/// Declarative fleet reconciler: pin services, drivers and packages for node groups and roll them out in canary waves.
#[derive(Debug, Parser)]
#[command(name = "shoal", version, propagate_version = true)]
pub struct Cli {
    /// apiserver URL; repeat it (or separate with commas) for replicas, tried in turn.
    #[arg(
        long,
        env = "SHOAL_SERVER",
        global = true,
        default_value = "http://127.0.0.1:7070"
    )]
    pub server: Vec<String>,
    /// Bearer token (operator or viewer).
    #[arg(long, env = "SHOAL_TOKEN", global = true, hide_env_values = true)]
    pub token: Option<String>,
    /// CA certificates (PEM) to trust besides the platform's: for an apiserver whose
    /// certificate a private CA issued.
    #[arg(long, env = "SHOAL_CA_FILE", global = true, value_name = "FILE")]
    pub ca_file: Option<std::path::PathBuf>,
    /// Do not check the apiserver's certificate at all. For a first test only: anyone on
    /// the path can then read and change what the CLI sends, its token included.
    #[arg(long, global = true)]
    pub insecure_skip_tls_verify: bool,
    /// Output format.
    #[arg(short = 'o', long, value_enum, global = true, default_value_t = Output::Table)]
    pub output: Output,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Output formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Human-readable.
    Table,
    /// YAML.
    Yaml,
    /// JSON.
    Json,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Check manifests offline: exit 0 when valid, 2 when not (problems on stderr).
    Validate {
        /// Files, directories (searched recursively for *.yaml, *.yml, *.json) or - for standard input.
        #[arg(short = 'f', long = "filename", required = true, num_args = 1..)]
        files: Vec<PathBuf>,
    },
    /// Send manifests to the apiserver: all of them or none.
    Apply {
        /// Files, directories or - for standard input.
        #[arg(short = 'f', long = "filename", required = true, num_args = 1..)]
        files: Vec<PathBuf>,
        /// Report what would change without storing anything.
        #[arg(long)]
        dry_run: bool,
        /// Delete DesiredStates that an earlier `apply --prune` of the same paths created and
        /// that these files no longer hold. Objects applied otherwise are never touched.
        #[arg(long)]
        prune: bool,
        /// Then follow the rollout of each revision this apply created (or of the newest one,
        /// when nothing changed): exit 0 complete, 1 aborted, rolled back or superseded, 2 timeout.
        #[arg(long, conflicts_with = "dry_run")]
        wait: bool,
        /// With --wait: give up after this long (exit 2), e.g. 10m, 90s.
        #[arg(long, requires = "wait", value_parser = humantime::parse_duration)]
        timeout: Option<std::time::Duration>,
    },
    /// Show how manifests differ from what the apiserver has: exit 0 none, 1 some, 2 error.
    Diff {
        /// Files, directories or - for standard input.
        #[arg(short = 'f', long = "filename", required = true, num_args = 1..)]
        files: Vec<PathBuf>,
    },
    /// Delete the DesiredStates named in manifests, or one by name: `shoal delete desiredstate NAME`.
    Delete {
        /// `desiredstate` (with NAME), when not using -f.
        kind: Option<String>,
        /// The name.
        name: Option<String>,
        /// Files, directories or - for standard input.
        #[arg(short = 'f', long = "filename", num_args = 1..)]
        files: Vec<PathBuf>,
        /// Succeed when the object does not exist.
        #[arg(long)]
        ignore_not_found: bool,
    },
    /// List nodes, desiredstates, rollouts or events, or show one.
    Get {
        /// nodes | desiredstates | rollouts | events (singular and short forms work: node, ds, ro, ev).
        kind: String,
        /// One object's name.
        name: Option<String>,
    },
    /// Show one node, desiredstate or rollout in detail, with its recent events.
    Describe {
        /// node | desiredstate | rollout.
        kind: String,
        /// The name.
        name: String,
    },
    /// Show which nodes would change what, in which wave, before applying.
    Plan {
        /// Files, directories or - for standard input.
        #[arg(short = 'f', long = "filename", required = true, num_args = 1..)]
        files: Vec<PathBuf>,
    },
    /// Follow and steer rollouts: status, history, pause, resume, undo.
    Rollout {
        /// What to do.
        #[command(subcommand)]
        verb: RolloutVerb,
    },
    /// Stop giving a node new revisions; it keeps what it runs (`shoal uncordon` undoes it).
    Cordon {
        /// The node.
        node: String,
    },
    /// Let a cordoned node follow its rollouts again.
    Uncordon {
        /// The node.
        node: String,
    },
    /// Run a whole fleet on this machine and watch shoal stop a bad release at the canary.
    Demo(demo::DemoArgs),
    /// Print the JSON Schema of DesiredState.
    Schema {
        /// Print the Markdown field reference made from the schema instead.
        #[arg(long)]
        markdown: bool,
    },
}

/// `shoal rollout …`.
#[derive(Debug, Subcommand)]
pub enum RolloutVerb {
    /// Waves and nodes of a rollout: exit 0 complete (or going), 1 aborted, rolled back or
    /// superseded, 2 timeout or error.
    Status {
        /// The DesiredState.
        name: String,
        /// Exactly this revision's rollout (as `shoal apply` prints it), never an older one.
        #[arg(long)]
        revision: Option<u64>,
        /// Follow until the rollout completes or aborts.
        #[arg(long, short = 'w')]
        watch: bool,
        /// With --watch: give up after this long (exit 2), e.g. 10m, 90s.
        #[arg(long, value_parser = humantime::parse_duration)]
        timeout: Option<std::time::Duration>,
    },
    /// Every revision, where it came from, and how its rollout ended.
    History {
        /// The DesiredState.
        name: String,
    },
    /// Hold the rollout at its current wave.
    Pause {
        /// The DesiredState.
        name: String,
    },
    /// Continue a paused rollout.
    Resume {
        /// The DesiredState.
        name: String,
    },
    /// Roll back: apply an earlier revision's spec as a new revision.
    Undo {
        /// The DesiredState.
        name: String,
        /// The revision to go back to (default: the last good one).
        #[arg(long)]
        to_revision: Option<u64>,
    },
}

/// Parses the arguments, runs the command and returns its exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    ExitCode::from(run(cli))
}

/// Runs one parsed command line.
pub fn run(cli: Cli) -> u8 {
    let outcome = match &cli.command {
        Command::Validate { files } => return validate(files, cli.output),
        Command::Schema { markdown } => {
            if *markdown {
                print!("{}", manifests::schema::reference_markdown());
            } else {
                print!("{}", manifests::schema::desired_state_schema_pretty());
            }
            return EXIT_OK;
        }
        Command::Apply {
            files,
            dry_run,
            prune,
            wait,
            timeout,
        } => connect(&cli).and_then(|c| {
            let applied = apply(&c, files, *dry_run, *prune, cli.output)?;
            if !*wait {
                return Ok(EXIT_OK);
            }
            rollout::wait_for_all(&c, &applied, *timeout)
        }),
        Command::Cordon { node } => connect(&cli).and_then(|c| cordon(&c, node, true, cli.output)),
        Command::Uncordon { node } => {
            connect(&cli).and_then(|c| cordon(&c, node, false, cli.output))
        }
        Command::Diff { files } => connect(&cli).and_then(|c| diff(&c, files)),
        Command::Delete {
            kind,
            name,
            files,
            ignore_not_found,
        } => connect(&cli).and_then(|c| {
            delete(
                &c,
                kind.as_deref(),
                name.as_deref(),
                files,
                *ignore_not_found,
                cli.output,
            )
        }),
        Command::Get { kind, name } => {
            connect(&cli).and_then(|c| resources::get(&c, kind, name.as_deref(), cli.output))
        }
        Command::Describe { kind, name } => {
            connect(&cli).and_then(|c| resources::describe(&c, kind, name))
        }
        Command::Demo(args) => demo::run(args),
        Command::Plan { files } => connect(&cli).and_then(|c| rollout::plan(&c, files, cli.output)),
        Command::Rollout { verb } => connect(&cli).and_then(|c| rollout::run(&c, verb, cli.output)),
    };
    match outcome {
        Ok(code) => code,
        Err(error) => {
            error.print();
            EXIT_ERROR
        }
    }
}

fn connect(cli: &Cli) -> Result<Client, CliError> {
    let trust = client::Trust {
        ca_file: cli.ca_file.clone(),
        skip_verify: cli.insecure_skip_tls_verify,
    };
    if trust.skip_verify {
        eprintln!(
            "warning: --insecure-skip-tls-verify: the apiserver's certificate is NOT checked; \
             anyone on the network path can read and change this traffic, the token included. \
             Pass --ca-file FILE with the CA that issued it instead."
        );
    }
    Client::with_servers(&cli.server, cli.token.clone(), &trust)
}

/// Prints a value as YAML or JSON.
fn print_structured<T: Serialize>(value: &T, output: Output) {
    match output {
        Output::Json => println!(
            "{}",
            serde_json::to_string_pretty(value).expect("serializable")
        ),
        Output::Yaml | Output::Table => {
            print!("{}", serde_yaml::to_string(value).expect("serializable"))
        }
    }
}

#[derive(Serialize)]
struct ValidObject {
    kind: &'static str,
    name: String,
    file: String,
    line: usize,
}

#[derive(Serialize)]
struct ValidationReport {
    valid: Vec<ValidObject>,
    errors: Vec<manifests::Diagnostic>,
}

fn print_diagnostics(diagnostics: &[manifests::Diagnostic], command: &str) {
    for diagnostic in diagnostics {
        eprintln!("{diagnostic}");
    }
    let mut files: Vec<&str> = diagnostics.iter().map(|d| d.file.as_str()).collect();
    files.dedup();
    eprintln!(
        "error: {} problem{} in {} file{}; fix them and run `shoal {command}` again",
        diagnostics.len(),
        if diagnostics.len() == 1 { "" } else { "s" },
        files.len(),
        if files.len() == 1 { "" } else { "s" },
    );
}

fn validate(files: &[PathBuf], output: Output) -> u8 {
    let loaded = manifests::load_paths(files);
    let report = ValidationReport {
        valid: loaded
            .objects
            .iter()
            .map(|parsed| ValidObject {
                kind: manifests::KIND_DESIRED_STATE,
                name: parsed.object.metadata.name.clone(),
                file: parsed.file.clone(),
                line: parsed.line,
            })
            .collect(),
        errors: loaded.diagnostics.clone(),
    };
    match output {
        Output::Table => {
            for object in &report.valid {
                println!(
                    "desiredstate/{} valid ({}:{})",
                    object.name, object.file, object.line
                );
            }
        }
        Output::Json | Output::Yaml => print_structured(&report, output),
    }
    if report.errors.is_empty() {
        EXIT_OK
    } else {
        print_diagnostics(&report.errors, "validate");
        EXIT_ERROR
    }
}

/// Reads and validates manifests locally; nothing is sent when any is invalid.
pub(crate) fn load_valid(
    files: &[PathBuf],
    command: &str,
) -> Result<Vec<manifests::Parsed>, CliError> {
    let loaded = manifests::load_paths(files);
    if !loaded.is_ok() {
        print_diagnostics(&loaded.diagnostics, command);
        return Err(CliError::new(
            "nothing was sent to the apiserver",
            "fix the problems above first",
        ));
    }
    Ok(loaded.objects)
}

/// The annotation naming the apply set an object belongs to (`apply --prune`).
pub const APPLY_SET: &str = "shoal/apply-set";

/// An apply set is named after the inputs, as absolute paths: applying the same
/// directory again, from anywhere, is the same set.
fn apply_set_id(files: &[PathBuf]) -> String {
    use sha2::Digest;
    let mut paths: Vec<String> = files
        .iter()
        .map(|f| {
            std::fs::canonicalize(f)
                .unwrap_or_else(|_| f.clone())
                .display()
                .to_string()
        })
        .collect();
    paths.sort();
    hex::encode(&sha2::Sha256::digest(paths.join("\n").as_bytes())[..8])
}

fn apply(
    client: &Client,
    files: &[PathBuf],
    dry_run: bool,
    prune: bool,
    output: Output,
) -> Result<ApplyResponse, CliError> {
    let mut objects = load_valid(files, "apply")?;
    let set = apply_set_id(files);
    if prune {
        for parsed in &mut objects {
            parsed
                .object
                .metadata
                .annotations
                .insert(APPLY_SET.into(), set.clone());
        }
    }
    let body: String = objects
        .iter()
        .map(|p| {
            format!(
                "---\n{}",
                serde_yaml::to_string(&p.object).expect("serializable")
            )
        })
        .collect();
    let path = if dry_run {
        "/api/v1/apply?dryRun=true"
    } else {
        "/api/v1/apply"
    };
    let mut response: ApplyResponse = client.post(path, "application/yaml", body)?;
    if prune {
        let keep: std::collections::BTreeSet<&str> = objects
            .iter()
            .map(|p| p.object.metadata.name.as_str())
            .collect();
        let live: Vec<DesiredStateObject> = client.get("/api/v1/desiredstates")?;
        for state in live {
            let ours = state.metadata.annotations.get(APPLY_SET) == Some(&set);
            if !ours || keep.contains(state.metadata.name.as_str()) {
                continue;
            }
            if !dry_run {
                client.delete::<DesiredStateObject>(&format!(
                    "/api/v1/desiredstates/{}?resourceVersion={}",
                    state.metadata.name, state.metadata.resource_version
                ))?;
            }
            response.results.push(manifests::wire::ApplyResult {
                kind: manifests::KIND_DESIRED_STATE.into(),
                name: state.metadata.name.clone(),
                action: ApplyAction::Pruned,
                revision: state.status.revision,
                resource_version: state.metadata.resource_version.clone(),
            });
        }
    }
    match output {
        Output::Table => {
            let suffix = if response.dry_run { " (dry run)" } else { "" };
            for result in &response.results {
                let action = match result.action {
                    ApplyAction::Created => "created",
                    ApplyAction::Configured => "configured",
                    ApplyAction::Unchanged => "unchanged",
                    ApplyAction::Pruned => "pruned",
                };
                println!(
                    "desiredstate/{} {action} (revision {}){suffix}",
                    result.name, result.revision
                );
            }
        }
        _ => print_structured(&response, output),
    }
    Ok(response)
}

/// The part of an object a person edits: what `diff` compares.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Comparable<'a> {
    api_version: &'a str,
    kind: &'a str,
    metadata: ComparableMeta<'a>,
    spec: &'a manifests::DesiredStateSpec,
}

#[derive(Serialize)]
struct ComparableMeta<'a> {
    name: &'a str,
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    labels: &'a std::collections::BTreeMap<String, String>,
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    annotations: &'a std::collections::BTreeMap<String, String>,
}

fn comparable_local(object: &manifests::DesiredState) -> String {
    let m = &object.metadata;
    comparable(
        &object.api_version,
        &object.kind,
        &m.name,
        &m.labels,
        &m.annotations,
        &object.spec,
    )
}

fn comparable_live(object: &DesiredStateObject) -> String {
    let m = &object.metadata;
    comparable(
        &object.api_version,
        &object.kind,
        &m.name,
        &m.labels,
        &m.annotations,
        &object.spec,
    )
}

fn comparable(
    api_version: &str,
    kind: &str,
    name: &str,
    labels: &std::collections::BTreeMap<String, String>,
    annotations: &std::collections::BTreeMap<String, String>,
    spec: &manifests::DesiredStateSpec,
) -> String {
    serde_yaml::to_string(&Comparable {
        api_version,
        kind,
        metadata: ComparableMeta {
            name,
            labels,
            annotations,
        },
        spec,
    })
    .expect("serializable")
}

fn diff(client: &Client, files: &[PathBuf]) -> Result<u8, CliError> {
    let objects = load_valid(files, "diff")?;
    let colour = std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let mut changed = false;
    for parsed in &objects {
        let name = &parsed.object.metadata.name;
        let live: Option<DesiredStateObject> =
            client.get_optional(&format!("/api/v1/desiredstates/{name}"))?;
        let (old, old_label) = match &live {
            Some(live) => (
                comparable_live(live),
                format!(
                    "live desiredstate/{name} (revision {})",
                    live.status.revision
                ),
            ),
            None => (
                String::new(),
                format!("live desiredstate/{name} (does not exist)"),
            ),
        };
        let new = comparable_local(&parsed.object);
        if old == new {
            continue;
        }
        changed = true;
        let text = similar::TextDiff::from_lines(&old, &new);
        let unified = text
            .unified_diff()
            .context_radius(3)
            .header(&old_label, &format!("{}:{}", parsed.file, parsed.line))
            .to_string();
        for line in unified.lines() {
            if !colour {
                println!("{line}");
            } else if line.starts_with("+++") || line.starts_with("---") {
                println!("\x1b[1m{line}\x1b[0m");
            } else if line.starts_with('+') {
                println!("\x1b[32m{line}\x1b[0m");
            } else if line.starts_with('-') {
                println!("\x1b[31m{line}\x1b[0m");
            } else if line.starts_with("@@") {
                println!("\x1b[36m{line}\x1b[0m");
            } else {
                println!("{line}");
            }
        }
    }
    Ok(if changed { EXIT_DIFFERENT } else { EXIT_OK })
}

fn cordon(client: &Client, node: &str, cordon: bool, output: Output) -> Result<u8, CliError> {
    let verb = if cordon { "cordon" } else { "uncordon" };
    let object: manifests::wire::NodeObject = client.post(
        &format!("/api/v1/nodes/{node}/{verb}"),
        "application/json",
        String::new(),
    )?;
    match output {
        Output::Table => println!("node/{node} {verb}ed"),
        _ => print_structured(&object, output),
    }
    Ok(EXIT_OK)
}

fn delete(
    client: &Client,
    kind: Option<&str>,
    name: Option<&str>,
    files: &[PathBuf],
    ignore_not_found: bool,
    output: Output,
) -> Result<u8, CliError> {
    let names: Vec<String> = match (kind, name, files.is_empty()) {
        (Some("node" | "nodes" | "no"), Some(name), true) => {
            return match client
                .delete::<manifests::wire::NodeObject>(&format!("/api/v1/nodes/{name}"))
            {
                Ok(object) => {
                    match output {
                        Output::Table => println!(
                            "node/{name} deleted; its token no longer works: a nodelet that comes back must join again"
                        ),
                        _ => print_structured(&object, output),
                    }
                    Ok(EXIT_OK)
                }
                Err(e) if e.status == Some(404) && ignore_not_found => Ok(EXIT_OK),
                Err(e) => Err(e),
            };
        }
        (Some(kind), Some(name), true) => {
            if !matches!(kind, "desiredstate" | "desiredstates" | "ds") {
                return Err(CliError::new(
                    format!("cannot delete `{kind}`"),
                    "delete a DesiredState (`shoal delete desiredstate NAME`) or a node (`shoal delete node NAME`)",
                ));
            }
            vec![name.to_string()]
        }
        (None, None, false) => load_valid(files, "delete")?
            .into_iter()
            .map(|p| p.object.metadata.name)
            .collect(),
        _ => {
            return Err(CliError::new(
                "say what to delete",
                "use `shoal delete -f FILE…` or `shoal delete desiredstate NAME`",
            ))
        }
    };
    let mut deleted = Vec::new();
    for name in names {
        match client.delete::<DesiredStateObject>(&format!("/api/v1/desiredstates/{name}")) {
            Ok(object) => {
                if output == Output::Table {
                    println!("desiredstate/{name} deleted");
                }
                deleted.push(object);
            }
            Err(e) if e.status == Some(404) && ignore_not_found => {}
            Err(e) => return Err(e),
        }
    }
    if output != Output::Table {
        print_structured(&deleted, output);
    }
    Ok(EXIT_OK)
}
