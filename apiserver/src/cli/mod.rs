//! The `shoal` operator CLI: argument parsing, commands and their exit codes.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use serde::Serialize;

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
    /// apiserver URL.
    #[arg(
        long,
        env = "SHOAL_SERVER",
        global = true,
        default_value = "http://127.0.0.1:7070"
    )]
    pub server: String,
    /// Bearer token (operator or viewer).
    #[arg(long, env = "SHOAL_TOKEN", global = true, hide_env_values = true)]
    pub token: Option<String>,
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
    /// Print the JSON Schema of DesiredState.
    Schema {
        /// Print the Markdown field reference made from the schema instead.
        #[arg(long)]
        markdown: bool,
    },
}

/// Parses the arguments, runs the command and returns its exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    ExitCode::from(run(cli))
}

/// Runs one parsed command line.
pub fn run(cli: Cli) -> u8 {
    match cli.command {
        Command::Validate { files } => validate(&files, cli.output),
        Command::Schema { markdown } => {
            if markdown {
                print!("{}", manifests::schema::reference_markdown());
            } else {
                print!("{}", manifests::schema::desired_state_schema_pretty());
            }
            EXIT_OK
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
        Output::Json => println!(
            "{}",
            serde_json::to_string_pretty(&report).expect("report is JSON")
        ),
        Output::Yaml => print!(
            "{}",
            serde_yaml::to_string(&report).expect("report is YAML")
        ),
    }
    for diagnostic in &report.errors {
        eprintln!("{diagnostic}");
    }
    if report.errors.is_empty() {
        EXIT_OK
    } else {
        let mut files: Vec<&str> = report.errors.iter().map(|d| d.file.as_str()).collect();
        files.dedup();
        eprintln!(
            "error: {} problem{} in {} file{}; fix them and run `shoal validate` again",
            report.errors.len(),
            if report.errors.len() == 1 { "" } else { "s" },
            files.len(),
            if files.len() == 1 { "" } else { "s" },
        );
        EXIT_ERROR
    }
}
